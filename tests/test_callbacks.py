"""Control commands, threads and metric writes behave the same across threads and processes.

- A soft pause sent from another thread blocks the loop (the heartbeat goes on, other commands still work)
  until a `resume` from that thread; the job's status goes `paused`, then `running`, and the run's losses
  equal an uninterrupted run's.
- A hard pause writes a checkpoint and ends the fit; a *fresh process* that loads it with `load_checkpoint`
  trains to the end with the per-step losses of an uninterrupted run (tiny Llama + LoRA with dropout, to 1e-6).
- A fit that dies of an exception leaves no forgenb thread running, and its queued metric rows reach the
  ledger; rows still queued when the interpreter exits are flushed by the atexit hook.
- Under papermill, `ProgressCallback('auto')` prints lines, not a widget bar.
- GPU rows come from NVML when `pynvml` imports and initialises, and there are none when it fails (CPU).
"""
import json, os, subprocess, sys, tempfile, textwrap, threading, time, types
from functools import partial
from pathlib import Path
import pytest, torch

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', TOKENIZERS_PARALLELISM='false',
           CUDA_VISIBLE_DEVICES='')


def _workspace(job_id):
    import forgenb.ledger  # noqa: F401  (adds Workspace.ledger)
    from forgenb.core import Workspace
    ws = Workspace(tempfile.mkdtemp())
    ws.ledger.add_job(job_id, spec={})
    return ws


def _reg_learner(cbs, max_steps=40):
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import TensorDataset
    from forgenb.engine import Learner, make_dl, make_optimizer, set_seed
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    ds = TensorDataset(x, x @ torch.tensor([[1.], [-2.], [.5], [3.]]))
    def mse(model, batch): x, y = batch; return F.mse_loss(model(x), y)
    set_seed(0)
    return Learner(nn.Linear(4, 1), make_dl(ds, 4), make_dl(ds, 16, shuffle=False), loss_func=mse,
                   opt=partial(make_optimizer, name='sgd', lr=0.01), max_steps=max_steps, cbs=cbs)


def _wait_for(cond, timeout=20., every=0.02):
    t = time.monotonic()
    while not cond():
        if time.monotonic() - t > timeout: raise TimeoutError('condition not met in time')
        time.sleep(every)


def _losses(learn): return [v for _, v in learn.recorder.history['train/loss']]


def test_soft_pause_released_from_another_thread():
    from forgenb.callbacks import ControlCallback, Recorder
    from forgenb.engine import Callback

    class Slow(Callback):
        def after_step(self): time.sleep(0.02)

    ws = _workspace('soft'); L = ws.ledger
    straight = _reg_learner([Recorder(log_every=1)]); straight.fit()
    learn = _reg_learner([Recorder(log_every=1), ControlCallback(L, 'soft', poll_every_s=0.05, heartbeat_every_s=0.05), Slow()])
    seen = {}

    def client():
        _wait_for(lambda: L.get_job('soft')['step'] >= 3)
        L.add_command('soft', 'pause')
        _wait_for(lambda: L.get_job('soft')['status'] == 'paused')
        seen['step'], hb = learn.step, L.get_job('soft')['heartbeat_at']
        time.sleep(0.4)
        seen['still'] = learn.step == seen['step']
        seen['beating'] = L.get_job('soft')['heartbeat_at'] > hb
        i = L.add_command('soft', 'eval_now')
        _wait_for(lambda: L.one('SELECT acked_at FROM commands WHERE id = ?', i)['acked_at'] is not None)
        seen['eval'] = L.one('SELECT result FROM commands WHERE id = ?', i)['result']
        L.add_command('soft', 'resume')

    th = threading.Thread(target=client); th.start()
    learn.fit(); th.join(30)
    assert learn.step == 40 and seen['still'] and seen['beating'], seen
    assert seen['eval']['step'] == seen['step'] and seen['eval']['valid_loss'] > 0
    statuses = [e['data']['status'] for e in L.events(job_id='soft', kind='job.status')]
    assert statuses == ['queued', 'paused', 'running']
    assert _losses(learn) == _losses(straight)
    assert all(c['acked_at'] for c in L.q('SELECT acked_at FROM commands'))


# --- hard pause, resumed in a fresh process ---

def _lm_learner(cbs, seed=0, max_steps=8):
    from peft import LoraConfig, get_peft_model
    from forgenb.engine import Learner, make_dl, make_optimizer, make_scheduler, set_seed
    from forgenb.test_utils import tiny_model, tiny_tokenizer
    tok = tiny_tokenizer()
    model = tiny_model('llama', tok, seed=0)
    set_seed(seed)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=['q_proj', 'v_proj'], lora_dropout=0.1))
    def data(n, s):
        ids = torch.randint(0, len(tok), (n, 12), generator=torch.Generator().manual_seed(s))
        return [dict(input_ids=x, labels=x) for x in ids]
    return Learner(model, make_dl(data(32, 1), 4, seed=1), make_dl(data(8, 2), 4, shuffle=False),
                   opt=partial(make_optimizer, lr=1e-2), sched=partial(make_scheduler, name='cosine', n_steps=max_steps, warmup=2),
                   grad_accum=2, max_steps=max_steps, eval_every=3, cbs=cbs)


def resume(run_dir, out):
    "The fresh process: a new model and learner, from another seed, load the latest checkpoint and finish"
    from forgenb.callbacks import CheckpointCallback, Recorder, latest_checkpoint, load_checkpoint
    learn = _lm_learner([Recorder(log_every=1), CheckpointCallback(run_dir)], seed=123)
    man = load_checkpoint(learn, latest_checkpoint(run_dir))
    learn.fit()
    Path(out).write_text(json.dumps(dict(kind=man['kind'], step=man['step'], losses=_losses(learn))))


def test_hard_pause_then_resume_in_a_fresh_process(tmp_path):
    from forgenb.callbacks import CheckpointCallback, ControlCallback, Recorder
    from forgenb.engine import Callback

    class Sender(Callback):
        order = 25
        def after_step(self):
            if self.step == 5: L.add_command('hard', 'pause', mode='hard')

    ws = _workspace('hard'); L = ws.ledger; run_dir = ws.run_dir('hard')
    straight = _lm_learner([Recorder(log_every=1)]); straight.fit()
    first = _lm_learner([Recorder(log_every=1), CheckpointCallback(run_dir, ledger=L, job_id='hard'),
                         ControlCallback(L, 'hard', poll_every_s=0), Sender()])
    first.fit()
    assert (first.step, first.stop_reason) == (5, 'paused')
    res = L.q('SELECT result FROM commands WHERE job_id = ?', 'hard')[0]['result']
    assert res['checkpoint'] == str(run_dir/'checkpoints/step-5') and res['mode'] == 'hard'
    assert L.checkpoints('hard')[-1]['kind'] == 'stop'
    out = tmp_path/'resumed.json'
    subprocess.run([sys.executable, __file__, 'resume', str(run_dir), str(out)], cwd=ROOT, env=ENV, check=True, timeout=300)
    got = json.loads(out.read_text())
    assert (got['kind'], got['step']) == ('stop', 5)
    want = _losses(straight)
    assert _losses(first) == want[:5]
    assert len(got['losses']) == 3 and max(abs(a - b) for a, b in zip(got['losses'], want[5:])) < 1e-6


# --- exceptions, threads and the atexit flush ---

def _forgenb_threads(): return [t for t in threading.enumerate() if t.name.startswith('forgenb-') and t.is_alive()]


def test_a_crashed_fit_leaves_no_thread_and_loses_no_queued_row():
    from forgenb.callbacks import ControlCallback, LedgerSink, Recorder, ResourceMonitor
    from forgenb.engine import Callback

    class Boom(Callback):
        def after_step(self):
            time.sleep(0.01)
            if self.step == 12: raise RuntimeError('boom')

    ws = _workspace('crash'); L = ws.ledger
    sink = LedgerSink(L, 'crash', flush_every_s=0.05, idle_exit=2)
    learn = _reg_learner([Recorder(log_every=5, sink=sink), ResourceMonitor(every_s=0.02),
                          ControlCallback(L, 'crash', heartbeat_every_s=0.02), Boom()])
    with pytest.raises(RuntimeError, match='boom'): learn.fit()
    _wait_for(lambda: not _forgenb_threads(), timeout=5)
    assert [s for s, _ in L.metrics('crash', 'train/loss')['train/loss']] == [1, 5, 10]
    assert L.metrics('crash', 'sys/rss_gb')['sys/rss_gb']


ATEXIT = """
import sys, forgenb.ledger
from forgenb.core import Workspace
from forgenb.callbacks import LedgerSink
ws = Workspace(sys.argv[1]); ws.ledger.add_job('j', spec={})
LedgerSink(ws.ledger, 'j', flush_every_s=600).write([(s, 'train/loss', 1. / s) for s in range(1, 101)])
"""

def test_rows_queued_at_exit_are_flushed(tmp_path):
    subprocess.run([sys.executable, '-c', ATEXIT, str(tmp_path)], cwd=ROOT, env=ENV, check=True, timeout=120)
    import forgenb.ledger  # noqa: F401
    from forgenb.core import Workspace
    assert len(Workspace(tmp_path).ledger.metrics('j')['train/loss']) == 100


# --- progress under papermill ---

NB_CELLS = ["""
import torch, torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from forgenb.engine import Learner, make_dl
from forgenb.callbacks import ProgressCallback, Recorder, progress_mode
ds = TensorDataset(torch.randn(24, 4), torch.randn(24, 1))
learn = Learner(nn.Linear(4, 1), make_dl(ds, 4), loss_func=lambda m, b: F.mse_loss(m(b[0]), b[1]), max_steps=6,
                cbs=[Recorder(log_every=2), ProgressCallback(every=2)])
learn.fit()
print('mode', progress_mode())
"""]

def test_progress_prints_lines_under_papermill(tmp_path):
    pytest.importorskip('papermill')
    import nbformat
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(textwrap.dedent(c)) for c in NB_CELLS])
    nb.metadata['kernelspec'] = dict(name='python3', display_name='python3', language='python')
    nbformat.write(nb, tmp_path/'in.ipynb')
    env = {k: v for k, v in ENV.items() if k != 'FORGENB_PROGRESS'}
    subprocess.run([sys.executable, '-m', 'papermill', str(tmp_path/'in.ipynb'), str(tmp_path/'out.ipynb'), '-k', 'python3',
                    '--no-progress-bar'], cwd=ROOT, env=env, check=True, timeout=180, capture_output=True)
    outs = nbformat.read(tmp_path/'out.ipynb', as_version=4).cells[0].outputs
    text = ''.join(o.get('text', '') for o in outs if o.output_type == 'stream')
    assert [l.split()[1] for l in text.splitlines() if l.startswith('step ')] == ['2/6', '4/6', '6/6']
    assert 'mode lines' in text
    assert not any('application/vnd.jupyter.widget-view+json' in o.get('data', {}) for o in outs)


# --- GPUs through NVML ---

def _fake_nvml(fail=False):
    def init():
        if fail: raise RuntimeError('NVML Shared Library Not Found')
    mem = types.SimpleNamespace(used=3 * 2**30, total=80 * 2**30)
    return types.SimpleNamespace(
        nvmlInit=init, nvmlDeviceGetCount=lambda: 2, nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: b'NVIDIA H100' if h == 0 else 'NVIDIA H100', nvmlDeviceGetMemoryInfo=lambda h: mem,
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=40 + h), nvmlDeviceGetTemperature=lambda h, k: 60,
        NVML_TEMPERATURE_GPU=0)


def test_gpu_stats_from_nvml(monkeypatch):
    from forgenb.callbacks import _sys_metrics, gpu_stats, system_snapshot
    monkeypatch.setitem(sys.modules, 'pynvml', _fake_nvml())
    gpus = gpu_stats()
    assert [(g['index'], g['name'], g['util_pct'], g['mem_used_gb'], g['mem_total_gb'], g['temp_c']) for g in gpus] == \
           [(0, 'NVIDIA H100', 40., 3., 80., 60.), (1, 'NVIDIA H100', 41., 3., 80., 60.)]
    m = _sys_metrics()
    assert m['sys/gpu1_util_pct'] == 41. and m['sys/gpu0_mem_total_gb'] == 80.
    assert system_snapshot(cpu_interval=0)['gpus'] == gpus
    if not torch.cuda.is_available():
        monkeypatch.setitem(sys.modules, 'pynvml', _fake_nvml(fail=True))
        assert gpu_stats() == [] and not any(k.startswith('sys/gpu') for k in _sys_metrics())


if __name__ == '__main__':
    {'resume': resume}[sys.argv[1]](*sys.argv[2:])
