"""A job submitted with `distributed.num_processes: 2` runs through the scheduler and the job notebook as one job.

The tiny demo spec with 2 processes is submitted and run by the scheduler (`forgenb.jobs.worker`, no GPU here: the
job takes the single CPU slot), whose job notebook starts the two gloo processes through torchrun; each runs
`run_job`. While it trains, a `stop` command is written to the ledger: rank 0 reads it and broadcasts it, so both
processes stop at the same step (otherwise one would wait forever in an all-reduce and the job would hang). The job
ends `stopped` at that step, with both processes' first line in its log, and one record: one `stop` checkpoint
(folder and ledger row), one adapter, samples at the start and at the stop, one acknowledgement of the command, each
status change once (the non-main process never writes the ledger).
"""
import os, subprocess, sys, time


def _spec(ws, **kw):
    from forgenb.presets import spec_from_preset
    from forgenb.test_utils import tiny_model_dir, write_sample_dataset
    return spec_from_preset('tiny-cpu-demo', ws, **{'model.base': str(tiny_model_dir(ws.root/'tiny')), 'train.eval_every': 0,
                                                  'data.dataset': str(write_sample_dataset(ws.root/'rows.jsonl', n=256)),
                                                  'train.log_every': 1, 'sample.every': 0, 'sample.prompts': ['abc'],
                                                  'checkpoint.every': 0, 'distributed.num_processes': 2, **kw})


def _wait(cond, timeout=240., what='condition'):
    t0 = time.monotonic()
    while not (v := cond()):
        assert time.monotonic() - t0 < timeout, f'no {what} after {timeout} s'
        time.sleep(0.2)
    return v


def test_two_process_job_through_the_scheduler_stops_as_one(tmp_path):
    import forgenb.jobs as jobs
    from forgenb.core import Workspace
    ws = Workspace(tmp_path/'ws').ensure()
    job_id = jobs.submit(ws, _spec(ws, **{'train.max_steps': 5000}), start=False)
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', CUDA_VISIBLE_DEVICES='')
    p = subprocess.Popen([sys.executable, '-m', 'forgenb.jobs', 'worker', '--home', str(ws.root), '--idle-exit', '0'],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    led = ws.ledger
    _wait(lambda: (led.get_job(job_id)['step'] or 0) >= 2, what='job at step 2')
    cmd = led.add_command(job_id, 'stop')
    out = p.communicate(timeout=240)[0]
    job, log = led.get_job(job_id), (ws.run_dir(job_id)/'log.txt').read_text()
    assert p.returncode == 0 and job['status'] == 'stopped', (job['error'], out[-2000:], log[-3000:])
    k = job['step']
    assert 2 <= k < 5000 and f'process 0 of 2 of job {job_id}' in log and f'process 1 of 2 of job {job_id}' in log
    assert [(c['step'], c['kind']) for c in led.checkpoints(job_id)] == [(k, 'stop')]
    assert [d.name for d in (ws.run_dir(job_id)/'checkpoints').iterdir()] == [f'step-{k}']
    assert (ws.run_dir(job_id)/'adapter'/'adapter_model.safetensors').exists()
    assert sorted(s['step'] for s in led.samples(job_id)) == [0, k]
    ev = led.events(job_id)
    assert [e['data']['id'] for e in ev if e['kind'] == 'command.acked'] == [cmd]
    assert [e['data']['status'] for e in ev if e['kind'] == 'job.status'] == ['queued', 'starting', 'running', 'stopping', 'stopped']
    assert [s for s, _ in led.metrics(job_id, 'train/loss')['train/loss']][-1] == k
