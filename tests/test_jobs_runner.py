"""The scheduler runs job notebooks with papermill and judges every exit; it can die without losing a job.

These tests use a small job notebook of their own (the template's contract: `job_id` and `workspace`
parameters; the job sets its own status), whose behaviour is picked by the job's name, so the scheduler
is tested apart from training:

- Exits are classified by the exit status, not the notebook: a cell that raises -> `failed` with that
  error; running out of memory -> `failed`, tagged `oom`, with the fix and a recommendation; a notebook
  that ends without a final status -> `failed`; a kernel killed with SIGKILL (papermill exits 138)
  -> `interrupted`, auto-resumed a bounded number of times from the same step, then left `interrupted`.
- Each job runs in its own folder with `report.ipynb` and `log.txt`, and an earlier attempt's report is kept.
- `max_parallel=2` runs two jobs at once.
- `kill -9` of the scheduler mid-job leaves the job running; two schedulers then started at the same
  moment share the workspace lock so that every job runs exactly once and all complete. A job that
  answers nothing is ended by `forgenb kill`: its kernel is gone and it is `stopped`, killed by the user.
"""
import json, os, signal, subprocess, sys, tempfile, time
from pathlib import Path
import nbformat, psutil
from nbformat.v4 import new_code_cell, new_notebook

ENV = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', CUDA_VISIBLE_DEVICES='')

FAKE = '''
import os, time
import forgenb.jobs as jobs
from forgenb.core import Workspace
ws = Workspace(workspace)
led = ws.ledger
job = led.get_job(job_id)
mode = job['name']
with open(ws.run_dir(job_id)/'runs.txt', 'a') as f: f.write(f'{os.getpid()} {os.getcwd()} {os.environ.get("CUDA_VISIBLE_DEVICES")!r}\\n')
if mode == 'raise': raise ValueError('boom')
if mode == 'oom': raise MemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
led.update_job(job_id, status='running', pid=os.getpid(), host=jobs.HOST, started_at=time.time())
if mode == 'die': os.kill(os.getpid(), 9)
while mode == 'hang': time.sleep(0.25); led.update_job(job_id, heartbeat_at=time.time())
for i in range(int(os.environ.get('FAKE_STEPS', 0)) if mode == 'sleep' else 0):
    time.sleep(0.25); led.update_job(job_id, step=i + 1, heartbeat_at=time.time())
if mode != 'nostatus': led.update_job(job_id, status='completed', ended_at=time.time())
'''


def _template(d) -> Path:
    nb = new_notebook(metadata={'kernelspec': {'display_name': 'python3', 'language': 'python', 'name': 'python3'}})
    nb.cells = [new_code_cell('job_id = None\nworkspace = None', metadata={'tags': ['parameters']}), new_code_cell(FAKE)]
    p = Path(d)/'fake.ipynb'
    nbformat.write(nb, p)
    return p


def _ws():
    import forgenb.ledger  # noqa: F401
    from forgenb.core import Workspace
    return Workspace(tempfile.mkdtemp()).ensure()


def _worker(ws, template, *args, env=None):
    return subprocess.Popen([sys.executable, '-m', 'forgenb.jobs', 'worker', '--home', str(ws.root), '--template', str(template), *args],
                            env=dict(ENV, **(env or {})), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait(cond, timeout, what):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, f'timed out waiting for {what}'
        time.sleep(0.2)


def test_exits_are_classified():
    import forgenb.jobs as jobs
    ws = _ws()
    led, t = ws.ledger, _template(ws.root)
    for name in ('ok', 'raise', 'oom', 'nostatus', 'die'): led.add_job(name, spec={}, name=name)
    (ws.run_dir('ok')).mkdir(parents=True); (ws.run_dir('ok')/'report.ipynb').write_text('{}')  # an earlier attempt's report
    p = _worker(ws, t, '--idle-exit', '0', '--max-parallel', '2', env=dict(FORGENB_AUTO_RESUME='1'))
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out
    job = {j: led.get_job(j) for j in ('ok', 'raise', 'oom', 'nostatus', 'die')}
    assert job['ok']['status'] == 'completed'
    runs = (ws.run_dir('ok')/'runs.txt').read_text().split()
    assert runs[1] == str(ws.run_dir('ok')) and runs[2] == "''"  # cwd is the run folder; no GPU to pin (the worker's setting is kept)
    assert (ws.run_dir('ok')/'report.ipynb').stat().st_size > 1000 and (ws.run_dir('ok')/'report.1.ipynb').read_text() == '{}'
    assert '=== ' in (ws.run_dir('ok')/'log.txt').read_text() and 'Executing Cell' in (ws.run_dir('ok')/'log.txt').read_text()

    assert (job['raise']['status'], job['raise']['error']) == ('failed', 'ValueError: boom')
    assert job['nostatus']['status'] == 'failed' and 'without a final status' in job['nostatus']['error']
    assert job['oom']['status'] == 'failed' and job['oom']['error'].startswith('oom: MemoryError: CUDA out of memory')
    assert 'batch_size' in job['oom']['error']
    assert led.q("SELECT kind FROM recommendations WHERE job_id = 'oom'") == [dict(kind='oom')]
    [diag] = led.events('oom', kind='job.diagnosis')
    assert diag['data'] == dict(reason='oom', fix=jobs.OOM_FIX), 'the reason, `oom`, and the fix are recorded as an event'
    assert led.q("SELECT kind FROM recommendations WHERE job_id = 'raise'") == [], 'only out-of-memory failures are tagged'

    assert job['die']['status'] == 'interrupted' and job['die']['resume_step'] is None
    assert job['die']['error'].startswith('the kernel died (papermill exit 138) at step 0; no checkpoint yet')
    exits = [e['data']['returncode'] for e in led.events('die', kind='job.exited')]
    assert exits == [138, 138], 'one automatic resume, then it stays interrupted'
    assert len((ws.run_dir('die')/'runs.txt').read_text().splitlines()) == 2
    # two jobs ran at once: some job was claimed before the process of another had exited
    ev = lambda j, k: [e['ts'] for e in led.events(j) if e['kind'] == k and (k == 'job.exited' or e['data']['status'] == 'starting')]
    spans = sorted((a, b) for j in job for a, b in zip(ev(j, 'job.status'), ev(j, 'job.exited')))
    assert len(spans) == 6 and any(b[0] < a[1] for a, b in zip(spans, spans[1:])), spans


def test_killed_scheduler_loses_nothing_and_two_new_ones_run_each_job_once():
    from forgenb.jobs import scheduler_status, process_alive
    ws = _ws()
    led, t = ws.ledger, _template(ws.root)
    for i in range(3): led.add_job(f'j{i}', spec={}, name='sleep', priority=-i)
    led.add_job('hung', spec={}, name='hang', priority=-3)
    first = _worker(ws, t, '--idle-exit', '0', env=dict(FAKE_STEPS='16'))
    _wait(lambda: led.get_job('j0')['status'] == 'running' and led.get_job('j0')['step'] >= 1, 120, 'j0 to run')
    os.kill(first.pid, signal.SIGKILL); first.wait()
    assert scheduler_status(ws) == dict(running=False)
    assert led.get_job('j0')['status'] == 'running' and process_alive(led.get_job('j0')), 'the job outlives its scheduler'
    two = [_worker(ws, t, '--idle-exit', '0', env=dict(FAKE_STEPS='4')) for _ in range(2)]
    _wait(lambda: led.get_job('hung')['status'] == 'running', 240, 'the hanging job to run')
    hung = led.get_job('hung')['pid']
    from forgenb.cli import main
    assert main(['kill', 'hung', '--home', str(ws.root)]) == 0
    outs = [p.communicate(timeout=300)[0] for p in two]
    j = led.get_job('hung')
    assert (j['status'], j['error']) == ('stopped', 'killed by the user at step 0') and not psutil.pid_exists(hung), j
    assert sorted('another scheduler holds' in o for o in outs) == [False, True], outs
    for i in range(3):
        j = led.get_job(f'j{i}')
        assert j['status'] == 'completed', j
        assert len((ws.run_dir(f'j{i}')/'runs.txt').read_text().splitlines()) == 1, 'ran exactly once'
        assert [e['data']['status'] for e in led.events(f'j{i}', kind='job.status')].count('starting') == 1
    assert led.get_job('j0')['step'] == 16, 'the orphaned job finished on its own'


def test_one_job_per_gpu_pinned_with_cuda_visible_devices():
    ws = _ws()
    led, t = ws.ledger, _template(ws.root)
    for i in range(3): led.add_job(f'g{i}', spec={}, name='sleep', priority=-i)
    p = _worker(ws, t, '--idle-exit', '0', env=dict(CUDA_VISIBLE_DEVICES='3,5', FAKE_STEPS='8'))
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out
    rows = {j: led.get_job(j) for j in ('g0', 'g1', 'g2')}
    assert all(r['status'] == 'completed' for r in rows.values())
    seen = {j: (ws.run_dir(j)/'runs.txt').read_text().split()[2] for j in rows}
    assert {j: r['gpus'] for j, r in rows.items()} == {j: [v.strip("'")] for j, v in seen.items()}, 'each job saw only its GPU'
    assert sorted(seen[j] for j in ('g0', 'g1')) == ["'3'", "'5'"], 'the first two ran at once, one per GPU'
    assert rows['g2']['started_at'] >= min(rows['g0']['ended_at'], rows['g1']['ended_at']), 'the third waited for a free GPU'
