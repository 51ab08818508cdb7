"""A job submitted with `distributed.num_processes: 2` runs through the scheduler and the job notebook as one job.

The tiny demo spec with 2 processes is submitted and run by the scheduler (`forgenb.jobs.worker`, no GPU here: the
job takes the single CPU slot), whose job notebook starts the two gloo processes through torchrun; each runs
`run_job`. While it trains, a `stop` command is written to the ledger: rank 0 reads it and broadcasts it, so both
processes stop at the same step (otherwise one would wait forever in an all-reduce and the job would hang). The job
ends `stopped` at that step, with both processes' first line in its log, and one record: one `stop` checkpoint
(folder and ledger row), one adapter, samples at the start and at the stop, one acknowledgement of the command, each
status change once (the non-main process never writes the ledger).

FSDP jobs (`distributed.strategy: fsdp`, 2 gloo processes through `train_distributed`, 6 steps of the tiny demo spec with
a checkpoint, validation and samples every 3 steps) are the one-process job of the same spec:
- one set of metrics (steps 1..6 once), train losses equal to rtol 1e-4, the same samples (every process generates in
  lockstep, rank 0 records), validation at the same steps with the same value (rtol 1e-4: each row counted once,
  the processes share the validation batches, see `forgenb.engine.rank_batches`);
- the step-3 checkpoint holds the same files, the same adapter (atol 1e-5) and the *whole* optimizer moments (rtol 1e-3,
  atol 1e-8: gathered, not rank 0's shard); the final adapter equals one process's (atol 1e-5) and loads with
  `PeftModel.from_pretrained`. Float rounding differs (sharded all-gathers, another reduction order), as under DDP.
- resumed on 2 processes from that FSDP checkpoint, stopped at once by a queued `stop` (every process joins the save
  of a `stop` checkpoint, no hang), and resumed again from that checkpoint, the job ends with the losses (rtol 1e-6) and
  adapter (atol 1e-6) of the uninterrupted FSDP run.
"""
import json, os, shutil, subprocess, sys, time
from pathlib import Path
import pytest, torch


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


# FSDP jobs: same spec, 1 process (here) and 2 FSDP processes (torchrun), then an FSDP stop and resume.
FSDP_STEPS, FSDP_CKPT = 6, 3


def _fsdp_spec(ws, n, strategy):
    return _spec(ws, **{'data.dataset': str(ws.root/'rows.jsonl'), 'train.max_steps': FSDP_STEPS, 'train.batch_size': 8,
                        'train.warmup': 0, 'train.lr': 1e-3, 'train.eval_every': FSDP_CKPT, 'checkpoint.every': FSDP_CKPT,
                        'checkpoint.keep_last': 5, 'sample.every': FSDP_CKPT, 'sample.max_new_tokens': 6,
                        'distributed.num_processes': n, 'distributed.strategy': strategy})


@pytest.fixture(scope='module')
def fsdp_jobs(tmp_path_factory):
    "A 1-process job, the same job on 2 FSDP processes, and a copy of the latter resumed from its step-3 checkpoint, stopped, resumed"
    import forgenb
    from forgenb.core import Workspace
    from forgenb.distributed import run_distributed, train_distributed
    from forgenb.jobs import create_job
    from forgenb.test_utils import write_sample_dataset
    ws = Workspace(tmp_path_factory.mktemp('fsdp')/'ws').ensure()
    write_sample_dataset(ws.root/'rows.jsonl', n=96)
    one = forgenb.train(_fsdp_spec(ws, 1, 'auto'), ws=ws, progress='off')
    fsdp = train_distributed(_fsdp_spec(ws, 2, 'fsdp'), ws=ws, progress='off', echo=False)
    rest = create_job(ws, fsdp['spec'], status='interrupted')['id']
    shutil.copytree(ws.run_dir(fsdp['id'])/'checkpoints'/f'step-{FSDP_CKPT}', ws.run_dir(rest)/'checkpoints'/f'step-{FSDP_CKPT}')
    ws.ledger.update_job(rest, resume_step=FSDP_CKPT)
    cmd = ws.ledger.add_command(rest, 'stop')  # read at the resumed run's first poll: every process saves and stops at step 3
    stopped = run_distributed(ws, rest, progress='off', echo=False)
    return dict(ws=ws, one=one, fsdp=fsdp, stopped=stopped, cmd=cmd, rest=run_distributed(ws, rest, progress='off', echo=False))


def _close_files(a, b, atol):
    from safetensors.torch import load_file
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys() and ta
    for k in ta: torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=atol)


def _metric(ws, job_id, name='train/loss'): return ws.ledger.metrics(job_id, name)[name]


def test_fsdp_job_equals_one_process(fsdp_jobs):
    ws, one, fsdp = fsdp_jobs['ws'], fsdp_jobs['one'], fsdp_jobs['fsdp']
    assert (one['status'], fsdp['status'], fsdp['step']) == ('completed', 'completed', FSDP_STEPS), fsdp['error']
    a, b = _metric(ws, one['id']), _metric(ws, fsdp['id'])
    assert [s for s, _ in b] == list(range(1, FSDP_STEPS + 1))  # one set of metrics: rank 0's
    assert [v for _, v in b] == pytest.approx([v for _, v in a], rel=1e-4)
    va, vb = _metric(ws, one['id'], 'valid/loss'), _metric(ws, fsdp['id'], 'valid/loss')
    assert [s for s, _ in vb] == [s for s, _ in va] == [FSDP_CKPT, FSDP_STEPS]
    assert [v for _, v in vb] == pytest.approx([v for _, v in va], rel=1e-4)
    assert [(s['step'], s['prompt'], s['output']) for s in ws.ledger.samples(fsdp['id'])] == [(s['step'], s['prompt'], s['output']) for s in ws.ledger.samples(one['id'])]
    assert [(c['step'], c['kind']) for c in ws.ledger.checkpoints(fsdp['id'])] == [(FSDP_CKPT, 'periodic'), (FSDP_STEPS, 'final')]


def test_fsdp_checkpoint_and_adapter_are_the_one_process_ones(fsdp_jobs):
    "Same files (PEFT adapter, trainer state, manifest), same adapter and optimizer moments as 1 process; the adapter loads in peft"
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    ws, one, fsdp = fsdp_jobs['ws'], fsdp_jobs['one'], fsdp_jobs['fsdp']
    ca, cb = (ws.run_dir(j['id'])/'checkpoints'/f'step-{FSDP_CKPT}' for j in (one, fsdp))
    ma, mb = (json.loads((c/'manifest.json').read_text()) for c in (ca, cb))
    assert ma['files'].keys() == mb['files'].keys() and mb['format'] == 'peft'
    _close_files(ca/'adapter'/'adapter_model.safetensors', cb/'adapter'/'adapter_model.safetensors', 1e-5)
    sa, sb = (torch.load(c/'trainer_state.pt', weights_only=True) for c in (ca, cb))
    assert (sb['step'], sb['opt']['state'].keys()) == (FSDP_CKPT, sa['opt']['state'].keys())
    for i, st in sa['opt']['state'].items():
        for k, v in st.items(): torch.testing.assert_close(sb['opt']['state'][i][k], v, rtol=1e-3, atol=1e-8)  # whole tensors, not shards
    _close_files(ws.run_dir(one['id'])/'adapter'/'adapter_model.safetensors', Path(fsdp['result']['adapter'])/'adapter_model.safetensors', 1e-5)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ws.root/'tiny'), fsdp['result']['adapter'])
    assert model.peft_config['default'].r == 16


def test_fsdp_stop_and_resume_on_two_processes_is_exact(fsdp_jobs):
    "Resumed from the FSDP step-3 checkpoint, stopped there by a command (both processes save), resumed again: the rest of the uninterrupted run"
    ws, fsdp, stopped, rest = fsdp_jobs['ws'], fsdp_jobs['fsdp'], fsdp_jobs['stopped'], fsdp_jobs['rest']
    assert (stopped['status'], stopped['step']) == ('stopped', FSDP_CKPT), stopped['error']
    assert [e['data']['id'] for e in ws.ledger.events(rest['id']) if e['kind'] == 'command.acked'] == [fsdp_jobs['cmd']]
    assert (rest['status'], rest['step']) == ('completed', FSDP_STEPS), rest['error']
    assert [(c['step'], c['kind']) for c in ws.ledger.checkpoints(rest['id'])] == [(FSDP_CKPT, 'stop'), (FSDP_STEPS, 'final')]
    a, b = _metric(ws, fsdp['id'])[FSDP_CKPT:], _metric(ws, rest['id'])
    assert [s for s, _ in b] == [s for s, _ in a] and [v for _, v in b] == pytest.approx([v for _, v in a], rel=1e-6)
    _close_files(Path(fsdp['result']['adapter'])/'adapter_model.safetensors', Path(rest['result']['adapter'])/'adapter_model.safetensors', 1e-6)
