"""The notebook UI follows the ledger without blocking the kernel and without losing or mangling anything.

Pinned here, without a browser (tests/test_browser.py drives a real one):

- a live panel picks up rows another process writes to the ledger while the kernel's main thread is busy;
- two kernels attached to one job see the same points and status (no client keeps state of its own);
- a resumed job, which writes the steps after its checkpoint again, is re-read rather than mixed;
- a panel whose tick raises shows the error and does not stop the poller; a dropped panel leaves it;
- a deleted job's page says so and offers no actions;
- downsampling keeps at most `n` points, in step order, with the series' extremes;
- the new-job form has a field for every leaf of the spec schema and round-trips a spec unchanged;
- the system panel reads `nvidia-smi`'s CSV (a fake one here: no GPU in CI), including `[N/A]` fields.
"""
import gc, json, os, subprocess, sys, tempfile, textwrap, time
import numpy as np
import forgenb.ledger  # noqa: F401
from forgenb import jobs
from forgenb.core import Workspace
from forgenb.config import load_spec, spec_schema
from forgenb.ui.charts import downsample
from forgenb.ui.panels import POLLER, JobForm, JobState, JobView, Panel, SystemPanel, attach, gpu_stats

SPEC = dict(name='t', model=dict(base='/nonexistent/model'), data=dict(dataset='sample'), train=dict(max_steps=1000))
ENV = dict(os.environ, HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1')


def _ws(n_steps=50):
    ws = Workspace(tempfile.mkdtemp()).ensure()
    ws.ledger.add_job('j', SPEC, name='t', status='running', n_step=1000)
    ws.ledger.update_job('j', pid=os.getpid(), host=jobs.HOST, heartbeat_at=time.time())
    ws.ledger.add_metrics('j', [(s, 'train/loss', 2 - s / 1000) for s in range(0, n_steps, 10)])
    return ws


def _py(code, *args):
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code), *args], env=ENV, capture_output=True, text=True, timeout=60, check=True).stdout


def _wait(cond, timeout=10.):
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout: return False
        time.sleep(0.02)
    return True


def test_live_view_follows_another_process_while_main_thread_is_busy():
    ws = _ws(); v = attach('j', ws)
    try:
        assert _wait(lambda: v.loaded)
        w = subprocess.Popen([sys.executable, '-c', textwrap.dedent('''
            import sys, time, forgenb.ledger
            from forgenb.core import Workspace
            led = Workspace(sys.argv[1]).ledger
            for s in range(50, 150, 10): led.add_metrics('j', [(s, 'train/loss', 1.0)]); time.sleep(0.05)
            '''), str(ws.root)], env=ENV)
        seen, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < 20 and seen < 15:  # the main thread computes; it never calls the view
            sum(i * i for i in range(20_000)); seen = v.points()['loss']['train/loss']
        w.wait(30)
        assert seen == 15 and w.returncode == 0
    finally: v.close()


def test_two_kernels_see_the_same_job():
    ws = _ws(); ws.ledger.add_metrics('j', [(20, 'valid/loss', 1.5)])
    mine = attach('j', ws, live=False)
    other = json.loads(_py('''
        import sys, json
        from forgenb.ui.panels import attach
        v = attach('j', sys.argv[1], live=False)
        print(json.dumps(dict(points=v.points(), status=v.status_text, loss=v.charts['loss'].plotted('train/loss'))))
        ''', str(ws.root)))
    assert other['points'] == mine.points() and other['status'] == mine.status_text
    assert other['loss'] == [list(x) for x in mine.charts['loss'].plotted('train/loss')]


def test_resumed_job_is_read_again():
    ws = _ws(100); st = JobState(ws, 'j')
    assert len(st.poll()['metrics']['train/loss']) == 10
    ws.ledger.update_job('j', resume_step=50)  # a resume from step 50 writes steps 60.. again, with new values
    ws.ledger.add_metrics('j', [(s, 'train/loss', 7.) for s in range(60, 100, 10)])
    r = st.poll()
    assert r['reset'] and r['metrics']['train/loss'][:, 1].tolist() == [2 - s / 1000 for s in range(0, 60, 10)] + [7.] * 4
    v = JobView('j', ws, live=False)
    assert v.charts['loss'].plotted('train/loss')[1][-1] == 7.


class _Boom(Panel):
    def __init__(self): self._setup(tempfile.mkdtemp(), True); self.start()
    def tick(self): raise RuntimeError('boom')


class _Count(Panel):
    def __init__(self): self._setup(tempfile.mkdtemp(), True); self.n = 0; self.start()
    def tick(self): self.n += 1


def test_poller_survives_a_failing_panel_and_forgets_dropped_ones():
    boom, count = _Boom(), _Count()
    try:
        assert _wait(lambda: count.n >= 3) and 'RuntimeError: boom' in boom.message
        n = len(POLLER); del boom; gc.collect()
        assert len(POLLER) == n - 1
        k = count.n; assert _wait(lambda: count.n > k)
    finally: count.close()


def test_deleted_job_page():
    ws = _ws(); ws.ledger.update_job('j', status='stopped', pid=None)
    v = JobView('j', ws, live=False)
    jobs.delete_job(ws, 'j'); v.refresh()
    assert 'was deleted' in v.header.value and all(b.disabled for b in v.actions.buttons.values())


def test_downsample_keeps_extremes_in_order():
    rng = np.random.default_rng(0)
    for _ in range(200):
        m, n = int(rng.integers(1, 5000)), int(rng.integers(3, 600))
        x = np.sort(rng.choice(10 * m, m, replace=False)); y = rng.standard_normal(m)
        dx, dy = downsample(x, y, n)
        assert len(dx) <= max(n, 2) and (np.diff(dx) > 0).all() and dx[0] == x[0] and dx[-1] == x[-1]
        assert dy.max() == y.max() and dy.min() == y.min()


def _leaves(schema):
    for sec, p in schema['properties'].items():
        if '$ref' in p: yield from (f'{sec}.{k}' for k in schema['$defs'][p['$ref'].rsplit('/', 1)[-1]]['properties'])
        elif sec != 'preset': yield sec


def test_form_covers_the_schema_and_round_trips_a_spec():
    ws = Workspace(tempfile.mkdtemp()).ensure()
    f = JobForm(ws, env=dict(cuda=False, bf16=False, bnb=False, memory=dict(device='cpu', free=2**33, total=2**34)), preset=None)
    assert set(_leaves(spec_schema())) == set(f.fields)
    spec = dict(name='x', kind='llm', model=dict(base='/m', load_in=None, revision='main'),
                lora=dict(target_modules=['q_proj', 'v_proj'], r=8, dropout=0.1),
                data=dict(dataset='d', columns={'input': 'q', 'output': 'a'}, val_size=10, system_prompt='Be brief, please.'),
                train=dict(max_steps=10, warmup=5, grad_ckpt=True, max_grad_norm=None, epochs=1.5),
                sample=dict(prompts=['a, b', 'line one\nline two'], every=5), export=dict(formats=['peft', 'gguf']))
    f.load(spec)
    assert f.parse_errors == [] and load_spec(f.spec()).model_dump() == load_spec(spec).model_dump()


def test_system_panel_reads_nvidia_smi(monkeypatch, tmp_path):
    fake = tmp_path/'nvidia-smi'
    fake.write_text('#!/bin/sh\necho "0, NVIDIA H200, 37, 1024, 143771, 45"\necho "1, NVIDIA H200, [N/A], 0, 143771, [N/A]"\n'); fake.chmod(0o755)
    monkeypatch.setenv('PATH', f'{tmp_path}:{os.environ["PATH"]}')
    g = gpu_stats()
    assert g[0] == dict(index=0, name='NVIDIA H200', util=37.0, mem_used_gb=1.0, mem_total_gb=143771 / 1024, temp=45.0)
    assert g[1]['util'] is None and g[1]['temp'] is None
    sp = SystemPanel(tmp_path, live=False)
    assert 'GPU 1 NVIDIA H200 memory' in sp.meters.value and sp.chart.points()['gpu0 %'] == 1
