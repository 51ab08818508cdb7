"""Claiming is one atomic transaction: schedulers racing for a queue never take the same job.

- 4 processes claim from a queue of 80 jobs at once, as fast as they can: every job is claimed exactly
  once (the claimed sets are disjoint and cover the queue), each job has exactly one `starting` event,
  and the claims follow priority, then submission order, in each process.
- The scheduler lock is exclusive and dies with its holder: a second `worker` finds it held and leaves,
  and after the holder is killed with SIGKILL a new scheduler takes it.
- Reconciliation finds the latest checkpoint exactly as `forgenb.callbacks.latest_checkpoint` does,
  without importing torch; and a job on another host is judged by its heartbeat.
"""
import json, os, signal, subprocess, sys, tempfile, textwrap, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', CUDA_VISIBLE_DEVICES='', FORGENB_AUTO_RESUME='0')


def _ws():
    import forgenb.ledger  # noqa: F401  (adds Workspace.ledger)
    from forgenb.core import Workspace
    return Workspace(tempfile.mkdtemp()).ensure()


CLAIMER = textwrap.dedent("""
    import json, sys, time
    from forgenb.jobs import claim
    root, go = sys.argv[1], float(sys.argv[2])
    while time.time() < go: time.sleep(0.001)
    got = []
    while (j := claim(root)) is not None: got.append([j['id'], j['priority']])
    print(json.dumps(got))
""")


def test_racing_claimers_take_each_job_once():
    ws = _ws()
    led = ws.ledger
    ids = [f'j-{i:03d}' for i in range(80)]
    for i, j in enumerate(ids): led.add_job(j, spec={}, priority=i % 3)
    go = time.time() + 3  # all four start claiming at the same moment, after their imports
    ps = [subprocess.Popen([sys.executable, '-c', CLAIMER, str(ws.root), str(go)], stdout=subprocess.PIPE, text=True, env=ENV)
          for _ in range(4)]
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in ps]
    assert all(p.returncode == 0 for p in ps)
    claimed = [j for out in outs for j, _ in out]
    assert sorted(claimed) == ids, 'every job claimed exactly once'
    assert sum(len(o) > 0 for o in outs) >= 2, 'the claimers really raced'
    for out in outs:  # each process sees the queue in order: priority desc, then submission
        keys = [(-p, j) for j, p in out]
        assert keys == sorted(keys)
    for j in ids:
        starts = [e for e in led.events(j, kind='job.status') if e['data']['status'] == 'starting']
        assert len(starts) == 1
        assert led.get_job(j)['status'] == 'starting'


def test_scheduler_lock_is_exclusive_and_dies_with_its_holder():
    from forgenb.jobs import scheduler_status, worker
    ws = _ws()
    p = subprocess.Popen([sys.executable, '-m', 'forgenb.jobs', 'worker', '--home', str(ws.root), '--stay'],
                         env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        t0 = time.time()
        while not scheduler_status(ws)['running']:
            assert time.time() - t0 < 60 and p.poll() is None
            time.sleep(0.1)
        assert scheduler_status(ws)['pid'] == p.pid
        assert worker(ws, verbose=False) == dict(ran=[], exit='locked')
    finally:
        os.kill(p.pid, signal.SIGKILL); p.wait()
    assert scheduler_status(ws) == dict(running=False)
    assert worker(ws, idle_exit=0, poll_s=0.05, verbose=False) == dict(ran=[], exit='idle')


def test_latest_step_matches_callbacks_and_foreign_hosts_use_heartbeats():
    from forgenb.callbacks import latest_checkpoint
    from forgenb.jobs import _latest_step, reconcile
    ws = _ws()
    led = ws.ledger
    led.add_job('j', spec={})
    d = ws.run_dir('j')/'checkpoints'
    assert _latest_step(ws, 'j') is None and latest_checkpoint(ws.run_dir('j')) is None
    for s in (5, 10): (d/f'step-{s}').mkdir(parents=True); (d/f'step-{s}'/'manifest.json').write_text(json.dumps(dict(step=s)))
    (d/'step-15').mkdir(); (d/'step-15'/'manifest.json').write_text('{"step": 1')  # torn manifest
    (d/'.step-20.abc.tmp').mkdir(); (d/'step-x').mkdir()
    assert _latest_step(ws, 'j') == 10 == int(latest_checkpoint(ws.run_dir('j')).name.split('-')[1])
    now = time.time()
    led.update_job('j', status='running', host='another-host', pid=1, heartbeat_at=now - 5, step=12)
    assert reconcile(ws, auto_resume=0) == []
    led.update_job('j', heartbeat_at=now - 120)
    assert reconcile(ws, auto_resume=0) == [dict(id='j', status='interrupted', step=12, resume_step=10)]
    assert led.get_job('j')['error'] == 'the job process died at step 12; resumable from checkpoint step 10'
