"""The `forgenb` control commands tell a script what came of a command through their exit status.

Against a job row that this test process answers for (a thread plays the job's loop, acknowledging
commands as `ControlCallback` does), with no training:

- a command the job does not acknowledge within `--timeout` exits 1, says so on stderr, and stays
  pending for the job to act on; `--no-wait` returns at once (status 0) with the command's id;
- an acknowledged command exits 0 and prints the job's result; one the job reports an error for
  (or ignored) exits 1 and prints the error;
- `forgenb worker` exits 1 when another scheduler holds the workspace's lock.
"""
import json, os, tempfile, threading, time
import pytest

import forgenb.jobs as jobs
from forgenb.cli import main
from forgenb.core import Workspace


@pytest.fixture
def ws():
    w = Workspace(tempfile.mkdtemp()).ensure()
    w.ledger.add_job('j', spec={}, status='running')
    w.ledger.update_job('j', pid=os.getpid(), host=jobs.HOST, heartbeat_at=time.time(), step=7)
    return w


def _run(capsys, ws, *argv):
    capsys.readouterr()
    code = main([*argv, '--home', str(ws.root)])
    out, err = capsys.readouterr()
    return code, out, err


def _answer(ws, results:dict):
    "A thread that acknowledges the job's commands with `results[kind]`, as the job's loop would"
    led, done = ws.ledger, threading.Event()
    def loop():
        while not done.is_set():
            for c in led.pending_commands('j'): led.ack_command(c['id'], dict(results[c['kind']], step=7))
            time.sleep(0.05)
    th = threading.Thread(target=loop, daemon=True); th.start()
    return done


def test_unacknowledged_and_unwaited_commands(ws, capsys):
    code, out, err = _run(capsys, ws, 'pause', 'j', '--timeout', '0.3', '--json')
    assert code == 1 and json.loads(out)['acknowledged'] is False and 'next step boundary' in err, (out, err)
    assert [c['kind'] for c in ws.ledger.pending_commands('j')] == ['pause'], 'the command stays for the job'
    code, out, _ = _run(capsys, ws, 'save-now', 'j', '--no-wait', '--json')
    assert code == 0 and json.loads(out) == dict(job_id='j', command='save_now', command_id=2, status='running')


def test_acknowledged_results_and_errors(ws, capsys):
    done = _answer(ws, dict(eval_now=dict(valid_loss=1.5), sample_now=dict(error='InputError: there is no SampleCallback'),
                            pause=dict(ignored='already paused')))
    try:
        code, out, _ = _run(capsys, ws, 'eval-now', 'j')
        assert code == 0 and 'valid_loss: 1.5' in out and 'step: 7' in out, out
        code, out, _ = _run(capsys, ws, 'sample-now', 'j', '--prompt', 'a', '--prompt', 'b', '--json')
        assert code == 1 and json.loads(out)['error'].startswith('InputError'), out
        assert ws.ledger.q("SELECT args FROM commands WHERE kind = 'sample_now'")[0]['args'] == dict(prompts=['a', 'b'])
        assert _run(capsys, ws, 'pause', 'j')[0] == 1
    finally: done.set()


def test_second_worker_exits_1(ws, capsys):
    lock = jobs._take_lock(ws)
    try: code, out, _ = _run(capsys, ws, 'worker', '--idle-exit', '0')
    finally: jobs._release(lock)
    assert code == 1 and 'another scheduler holds' in out, out
