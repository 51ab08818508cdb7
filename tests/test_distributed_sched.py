"""The scheduler gives a job as many GPUs as it has processes, never one GPU to two jobs, and frees them when it ends.

A fake job notebook (the template's contract: `job_id` and `workspace` parameters) records when it ran and the
`CUDA_VISIBLE_DEVICES` it got, and sleeps. On a machine with 3 (named) GPUs: a 2-process job takes 2 of them; the
next 2-process job waits at the head of the queue (a 1-process job behind it waits too: the queue keeps its order)
until the first ends, then takes 2, and the 1-process job the third; a job asking for 4 fails at once, saying so.
Jobs whose runs overlap in time never share a GPU. Without GPUs a 2-process job takes the single slot.
"""
import os, subprocess, sys, tempfile, time
from pathlib import Path
import nbformat
from nbformat.v4 import new_code_cell, new_notebook

FAKE = '''
import os, time
import forgenb.jobs as jobs
from forgenb.core import Workspace
ws = Workspace(workspace)
led = ws.ledger
t0 = time.time()
led.update_job(job_id, status='running', pid=os.getpid(), host=jobs.HOST, started_at=t0)
time.sleep(1.5)
with open(ws.run_dir(job_id)/'ran.txt', 'w') as f: f.write(f'{t0} {time.time()} {os.environ.get("CUDA_VISIBLE_DEVICES")}')
led.update_job(job_id, status='completed', ended_at=time.time())
'''


def _setup():
    import forgenb.ledger  # noqa: F401
    from forgenb.core import Workspace
    ws = Workspace(tempfile.mkdtemp()).ensure()
    nb = new_notebook(metadata={'kernelspec': {'display_name': 'python3', 'language': 'python', 'name': 'python3'}})
    nb.cells = [new_code_cell('job_id = None\nworkspace = None', metadata={'tags': ['parameters']}), new_code_cell(FAKE)]
    nbformat.write(nb, ws.root/'fake.ipynb')
    return ws


def _run(ws, gpus):
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', CUDA_VISIBLE_DEVICES=gpus)
    p = subprocess.run([sys.executable, '-m', 'forgenb.jobs', 'worker', '--home', str(ws.root), '--template', str(ws.root/'fake.ipynb'),
                        '--idle-exit', '0'], env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr


def _ran(ws, job_id):
    t0, t1, gpus = (ws.run_dir(job_id)/'ran.txt').read_text().split(' ')
    return float(t0), float(t1), set(gpus.split(','))


def test_gpus_per_process():
    ws = _setup()
    led = ws.ledger
    for i, (name, n) in enumerate([('a', 2), ('b', 2), ('c', 1), ('big', 4)]):
        led.add_job(name, spec=dict(distributed=dict(num_processes=n)), name=name, priority=-i)
    _run(ws, '0,1,2')
    big = led.get_job('big')
    assert big['status'] == 'failed' and 'asks for 4 processes' in big['error'] and 'has 3 GPU(s)' in big['error']
    ran = {j: _ran(ws, j) for j in 'abc'}
    assert all(led.get_job(j)['status'] == 'completed' for j in 'abc')
    assert [len(ran[j][2]) for j in 'abc'] == [2, 2, 1] and all(set(led.get_job(j)['gpus']) == ran[j][2] for j in 'abc')
    assert ran['b'][0] >= ran['a'][1] and ran['c'][0] >= ran['a'][1], 'b waits for a; c waits behind b'
    for x in 'abc':
        for y in 'abc':
            if x < y and ran[x][0] < ran[y][1] and ran[y][0] < ran[x][1]: assert not ran[x][2] & ran[y][2], (x, y, ran)


def test_cpu_slot():
    ws = _setup()
    led = ws.ledger
    for i, name in enumerate('pq'): led.add_job(name, spec=dict(distributed=dict(num_processes=2)), name=name, priority=-i)
    _run(ws, '')
    (p0, p1, _), (q0, q1, _) = _ran(ws, 'p'), _ran(ws, 'q')
    assert [led.get_job(j)['status'] for j in 'pq'] == ['completed', 'completed'] and q0 >= p1
