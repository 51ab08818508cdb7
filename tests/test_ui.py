"""The notebook UI follows the ledger without blocking the kernel and without losing or mangling anything.

Pinned here, without a browser (tests/test_browser.py drives a real one):

- a live panel picks up rows another process writes to the ledger while the kernel's main thread is busy;
- two kernels attached to one job see the same points and status (no client keeps state of its own);
- a resumed job writes the steps after its checkpoint again: a view attached before the resume
  converges to exactly what a fresh attach draws, at every poll, without reading the whole history again;
- a view whose job has ended for good, once it has read everything, polls at the idle cadence (`IDLE_EVERY`, a third
  of the reads) but never stops: a late metric still shows, and a resume from anywhere is followed;
- a panel whose tick raises shows the error and does not stop the poller; a dropped panel leaves it;
- a deleted job's page says so and offers no actions;
- downsampling keeps at most `n` points, in step order, with the series' extremes;
- the new-job form has a field for every leaf of the spec schema and round-trips a spec unchanged;
- the system panel reads GPUs through the library's one NVML reader (a fake `pynvml` here: no GPU in CI),
  including a figure the device does not report.
"""
import gc, json, os, subprocess, sys, tempfile, textwrap, time, types
import numpy as np
import forgenb.ledger  # noqa: F401
from forgenb import jobs
from forgenb.core import Workspace
from forgenb.config import load_spec, spec_schema
from forgenb.ui.charts import downsample
from forgenb.catalog import nvml_gpus
from forgenb.ui.panels import POLLER, JobForm, JobState, JobView, Panel, SystemPanel, attach

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


def _drawn(v) -> dict:
    "What every mark of the view's charts draws now: {chart/mark: (steps, values)}"
    return {f'{k}/{m}': tuple(map(np.asarray, xy)) for k, c in v.charts.items() for m, xy in c.data().items()}


def _same(live, ws):
    fresh = JobView('j', ws, live=False)
    a, b = _drawn(live), _drawn(fresh)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k][0].tolist() == b[k][0].tolist(), k
        np.testing.assert_allclose(a[k][1], b[k][1], rtol=1e-12, err_msg=k)
    assert live.status_text == fresh.status_text
    return a


def _attempt(led, resume_step, *statuses):
    "The ledger side of a kill and a resume: the job is settled as interrupted, requeued and started again"
    led.update_job('j', status='interrupted', resume_step=resume_step)
    for st in statuses: led.update_job('j', status=st)


def _log(led, steps, v):
    led.add_metrics('j', [r for s in steps for r in ((s, 'train/loss', v + s / 1000), (s, 'train/lr', v))])
    led.add_metrics('j', [(s, 'valid/loss', v) for s in steps if s % 20 == 0])


def test_a_view_attached_before_a_resume_draws_what_a_fresh_attach_draws():
    ws = Workspace(tempfile.mkdtemp()).ensure(); led = ws.ledger
    led.add_job('j', SPEC, name='t', status='running', n_step=100)
    _log(led, range(0, 58), 1.)  # attempt 1 reaches step 57; its last checkpoint is at step 30
    v = JobView('j', ws, live=False)
    assert v.points()['loss']['train/loss'] == 58
    _attempt(led, 30, 'queued', 'starting', 'running')
    _log(led, range(31, 45), 2.)  # attempt 2, half way back to where attempt 1 died
    v.refresh()
    d = _same(v, ws)
    assert d['loss/train/loss'][1][44] == 2.044 and d['loss/train/loss'][1][45] == 1.045  # the ledger's rows, as they are now
    _log(led, range(45, 61), 2.)
    v.refresh(); _same(v, ws)
    assert v.state._redo == {} and v.state.last['train/loss'] == 2.06  # past the old end: the window closed
    _attempt(led, 50, 'running')  # attempt 3 (no scheduler: the run started by hand) resumes from a later checkpoint
    _log(led, range(51, 55), 3.); v.refresh(); _same(v, ws)
    _attempt(led, 50, 'running')  # attempt 4, from the same checkpoint (`resume_step` does not change)
    _log(led, range(51, 53), 4.); v.refresh(); _same(v, ws)
    _attempt(led, 40, 'running')  # attempt 5 runs to the end between two polls (`resume_step` is cleared again)
    _log(led, range(41, 100), 5.); led.update_job('j', status='completed', resume_step=None)
    v.refresh()
    d = _same(v, ws)
    assert d['loss/train/loss'][1][40:42].tolist() == [2.04, 5.041] and v.state._redo == {} and v.state.finished


def _plan(led, sql) -> str: return ' '.join(r[3] for r in led.con.execute('EXPLAIN QUERY PLAN ' + sql))


def test_the_redo_window_reads_only_the_steps_since_the_checkpoint():
    ws = Workspace(tempfile.mkdtemp()).ensure(); led = ws.ledger
    led.add_job('j', SPEC, name='t', status='running', n_step=10**6)
    _log(led, range(0, 10_000), 1.)
    st = JobState(ws, 'j'); st.poll()
    _attempt(led, 9_990, 'running'); _log(led, [9_991], 2.)
    traced = []
    led.con.set_trace_callback(traced.append)
    try: r = st.poll()
    finally: led.con.set_trace_callback(None)
    assert r['metrics']['train/loss'].tolist() == [[9_991, 2. + 9.991]] and r['metrics']['train/lr'].tolist() == [[9_991, 2.]]
    assert {n: w[:2] for n, w in st._redo.items()} == {'train/loss': (9_990, 9_999), 'train/lr': (9_990, 9_999)}  # valid/loss ends at 9_980
    redo = [q for q in traced if 'BETWEEN' in q]
    assert len(redo) == 2 and all('BETWEEN 9990 AND 9999' in q for q in redo)
    assert all('step>? AND step<?' in _plan(led, q) for q in redo)  # a range of the primary key: ten rows, not ten thousand
    assert 'USING INDEX events_job (job_id=? AND id>?)' in _plan(led, traced[0])


def test_a_finished_jobs_view_polls_slowly_and_still_follows():
    from forgenb.ui.panels import IDLE_EVERY
    ws = _ws(); ws.ledger.update_job('j', status='stopped', pid=None)
    v = attach('j', ws)
    try:
        assert _wait(lambda: v.loaded and getattr(v, '_idle_until', 0.) > 0)  # read everything, found nothing new: idle
        assert v.following and v in POLLER._panels and v.points()['loss']['train/loss'] == 5
        polls, poll = [], v.state.poll
        v.state.poll = lambda: polls.append(1) or poll()
        t0 = time.monotonic(); time.sleep(3 * IDLE_EVERY)
        assert len(polls) <= (time.monotonic() - t0) / IDLE_EVERY + 1  # 0.25 s apart it would be 9
        ws.ledger.add_metrics('j', [(99, 'train/loss', 0.5)])  # a late row (or a resume from elsewhere) still shows
        assert _wait(lambda: v.points()['loss']['train/loss'] == 6)
        v.stop()
        assert v not in POLLER._panels and v.status_text.endswith('live updates stopped')
        v.on_action('resume', 'ok', 'resumed')  # a resume from its own buttons follows the job again
        assert v.following and v in POLLER._panels and 'stopped' not in v.status_text.split('·')[-1]
    finally: v.close()


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


def _fake_nvml():
    def util(h):
        if h == 1: raise RuntimeError('NVML_ERROR_NOT_SUPPORTED')
        return types.SimpleNamespace(gpu=37)
    return types.SimpleNamespace(nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: 2, nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetUUID=lambda h: f'GPU-{h}', nvmlDeviceGetName=lambda h: b'NVIDIA H200', NVML_TEMPERATURE_GPU=0,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=2**30, free=139 * 2**30, total=140 * 2**30),
        nvmlDeviceGetUtilizationRates=util, nvmlDeviceGetTemperature=lambda h, k: 45)


def test_system_panel_reads_the_gpus_through_nvml(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, 'pynvml', _fake_nvml())
    monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)
    g = nvml_gpus()
    assert g[0] == dict(index=0, nvml_index=0, uuid='GPU-0', name='NVIDIA H200', util_pct=37.0, mem_used_gb=1.0, mem_free_gb=139.0,
                        mem_total_gb=140.0, temp_c=45.0)
    assert g[1]['util_pct'] is None and g[1]['temp_c'] == 45.0
    sp = SystemPanel(tmp_path, live=False)
    assert sp.last_stats['gpus'] == g and 'GPU 1 NVIDIA H200 memory' in sp.meters.value and '1.0 / 140.0 GB' in sp.meters.value
    assert sp.chart.points()['gpu0 %'] == 1 and sp.chart.points()['gpu1 %'] == 0  # no figure: a gap, not a zero
