"""Every change of a job's status says why, naming its cause.

A tiny job runs in this process through a stop command, then (run again) a soft pause with its resume and a
hard pause, then (run again) to the end. Every `job.status` event it leaves has a non-empty `reason`, and
the reason names the cause: the command's kind and id for `stopping`, `stopped`, `paused` and the `running`
after a soft pause; the process for a run that begins; the steps for `completed`; the exception's type
and step for `failed`.
"""
import tempfile


def _sender(led, job_id, at):
    from forgenb.engine import Callback
    class Sender(Callback):
        "Posts commands after the given steps, as a user would; the job polls at every step"
        order = 25
        def after_step(self):
            for kind, args in at.pop(self.step, []): led.add_command(job_id, kind, **args)
    return Sender()


def _tiny_job_ws():
    "A workspace with the tiny Llama and 64 rows, and a 10-step spec for them"
    from forgenb.core import Workspace
    from forgenb.data.text import import_text
    from forgenb.presets import spec_from_preset
    from forgenb.test_utils import tiny_model_dir, write_sample_dataset
    ws = Workspace(tempfile.mkdtemp()).ensure()
    model = tiny_model_dir(ws.root/'models'/'tiny-llama', arch='llama')
    import_text(ws, write_sample_dataset(ws.root/'few.jsonl', fmt='alpaca', n=64), name='few')
    return ws, spec_from_preset('tiny-cpu-demo', ws, **{'model.base': str(model), 'data.dataset': 'few', 'train.max_steps': 10,
                                                         'train.eval_every': 0, 'checkpoint.every': 0, 'sample.every': 0,
                                                         'sample.prompts': [], 'train.log_every': 5})


def test_every_status_change_has_its_reason():
    from forgenb.jobs import create_job
    from forgenb.run import run_job
    ws, spec = _tiny_job_ws(); led = ws.ledger
    jid = create_job(ws, spec, status='starting', reason='the test runs it')['id']
    run = lambda at: run_job(ws, jid, progress='off', poll_every_s=0., cbs=[_sender(led, jid, at)])
    assert run({2: [('stop', {})]})['status'] == 'stopped'
    assert run({4: [('pause', {}), ('resume', {})], 6: [('pause', dict(mode='hard'))]})['status'] == 'paused'
    assert run({})['status'] == 'completed'

    cmd = {(c['kind'], (c['args'] or {}).get('mode', 'soft')): c['id'] for c in led.q('SELECT * FROM commands WHERE job_id = ?', jid)}
    stop, soft, resume, hard = cmd['stop', 'soft'], cmd['pause', 'soft'], cmd['resume', 'soft'], cmd['pause', 'hard']
    got = [(e['data']['status'], e['data']['reason']) for e in led.events(job_id=jid, kind='job.status')]
    began = 'began the run'
    want = [('starting', 'the test runs it'),
            ('running', began), ('stopping', f'stop command {stop} at step 2'), ('stopped', f'after stop command {stop} at step 2'),
            ('running', began), ('paused', f'soft pause command {soft} at step 4'), ('running', f'resumed by resume command {resume} at step 4'),
            ('stopping', f'hard pause command {hard} at step 6'), ('paused', f'after hard pause command {hard} at step 6'),
            ('running', began), ('completed', 'finished: step 10 of 10')]
    assert [s for s, _ in got] == [s for s, _ in want], got
    for (status, reason), (_, cause) in zip(got, want): assert reason and cause in reason, (status, reason, cause)


def test_a_failed_run_names_the_exception():
    import pytest
    from forgenb.engine import Callback
    from forgenb.jobs import create_job
    from forgenb.run import run_job
    class Boom(Callback):
        def after_step(self):
            if self.step == 1: raise RuntimeError('boom')
    ws, spec = _tiny_job_ws()
    jid = create_job(ws, spec, status='starting')['id']
    with pytest.raises(RuntimeError, match='boom'): run_job(ws, jid, progress='off', cbs=[Boom()])
    last = ws.ledger.events(job_id=jid, kind='job.status')[-1]['data']
    assert (last['status'], last['reason']) == ('failed', 'failed: RuntimeError at step 1')
