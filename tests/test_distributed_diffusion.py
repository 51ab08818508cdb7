"""Image jobs on 2 processes (gloo, CPU): DDP and FSDP through the job system, like one job.

Tiny SD 1.5, 5 images in batches of 4, so every epoch holds a batch of 4 and a batch of 1: the second process's share
of the 1-image batch is empty and trains on a padding row weighted 0 (accelerate cannot slice a loader of whole
buckets, so `BatchSet` deals each process its rows). 6 steps, a checkpoint and samples every 3:
- DDP and FSDP jobs complete with one set of metrics (steps 1..6 once), the samples and checkpoints of one job;
- the throughput counts every image once: per logged step, samples/s x step time is 4 or 1, and each epoch's two steps
  add up to the 5 images;
- FSDP trains like DDP: the same losses (rtol 1e-4) and adapter (atol 1e-5): under both, every process draws its noise
  and timesteps from (seed, step, rank), so only float rounding differs;
- under FSDP the denoiser's blocks are sharded (their LoRA weights are `DTensor`s) while the frozen VAE and text
  encoder stay whole on each process (`fsdp_ignored_modules`);
- a DDP job resumed on 2 processes from its step-3 checkpoint continues exactly (losses rtol 1e-6, adapter atol 1e-6).
"""
import json, os, shutil, sys
from pathlib import Path
import pytest, torch

STEPS, CKPT = 6, 3


def _spec(base, strategy):
    return dict(kind='diffusion', name='shapes', model=dict(base=str(base)),
                data=dict(dataset='shapes', resolution=64, trigger='zxq', random_flip=True, caption_dropout=0.25),
                lora=dict(r=4, alpha=8, dropout=0.), sample=dict(prompts=['zxq, a red square'], every=CKPT, seed=3),
                train=dict(max_steps=STEPS, lr=3e-3, batch_size=4, grad_accum=1, precision='fp32', log_every=1, scheduler='constant', warmup=0),
                checkpoint=dict(every=CKPT, keep_last=5), diffusion=dict(min_snr_gamma=5., sample_steps=2),
                distributed=dict(num_processes=2, strategy=strategy))


def _sharding(ws_root, base, out):
    "In each of 2 FSDP processes: build the job's learner and report which parameters FSDP sharded"
    from forgenb.core import Workspace
    from forgenb.distributed import FSDP_ENV
    from forgenb.recipes import diffusion as D
    os.environ.update(FSDP_ENV)
    setup = D.build(_spec(base, 'fsdp'), Workspace(ws_root))
    learn = D.make_learner(setup)
    m = learn.accelerator.unwrap_model(learn.model)
    kind = lambda ps: sorted({type(p).__name__ for p in ps})
    res = dict(lora=kind(p for n, p in m.denoiser.named_parameters() if 'lora_' in n),
               vae=kind(m.vae.parameters()), text=kind(p for te in m.text_encoders for p in te.parameters()))
    if learn.accelerator.is_main_process: Path(out).write_text(json.dumps(res))


@pytest.fixture(scope='module')
def jobs(tmp_path_factory):
    "A DDP job, the same job under FSDP, a copy of the DDP job resumed from its step-3 checkpoint; FSDP's sharding"
    from forgenb.core import Workspace
    from forgenb.data.image import import_images
    from forgenb.distributed import launch, run_distributed, train_distributed
    from forgenb.jobs import create_job
    from forgenb.test_utils import tiny_pipeline_dir, write_sample_images
    d = tmp_path_factory.mktemp('ddiff')
    ws = Workspace(d/'ws').ensure()
    import_images(ws, write_sample_images(d/'shapes', n=5), name='shapes')
    base = tiny_pipeline_dir(d/'sd15')
    ddp = train_distributed(_spec(base, 'auto'), ws=ws, progress='off', echo=False)
    fsdp = train_distributed(_spec(base, 'fsdp'), ws=ws, progress='off', echo=False)
    rest = create_job(ws, ddp['spec'], status='interrupted')['id']
    shutil.copytree(ws.run_dir(ddp['id'])/'checkpoints'/f'step-{CKPT}', ws.run_dir(rest)/'checkpoints'/f'step-{CKPT}')
    ws.ledger.update_job(rest, resume_step=CKPT)
    rest = run_distributed(ws, rest, progress='off', echo=False)
    launch([__file__, str(ws.root), str(base), str(d/'sharding.json')], 2, echo=False)
    return dict(ws=ws, ddp=ddp, fsdp=fsdp, rest=rest, sharding=json.loads((d/'sharding.json').read_text()))


def _metric(ws, job_id, name='train/loss'): return ws.ledger.metrics(job_id, name)[name]


def _adapter(job):
    from safetensors.torch import load_file
    return load_file(Path(job['result']['adapter'])/'pytorch_lora_weights.safetensors')


def _close(a, b, atol):
    assert a.keys() == b.keys() and a
    for k in a: torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol)


@pytest.mark.parametrize('kind', ['ddp', 'fsdp'])
def test_a_two_process_image_job_is_one_job(jobs, kind):
    ws, job = jobs['ws'], jobs[kind]
    assert (job['status'], job['step']) == ('completed', STEPS), job['error']
    assert [s for s, _ in _metric(ws, job['id'])] == list(range(1, STEPS + 1))
    assert sorted({s['step'] for s in ws.ledger.samples(job['id'])}) == [0, CKPT, STEPS]
    assert [(c['step'], c['kind']) for c in ws.ledger.checkpoints(job['id'])] == [(CKPT, 'periodic'), (STEPS, 'final')]
    rate, dt = _metric(ws, job['id'], 'train/samples_per_s'), _metric(ws, job['id'], 'train/step_time')
    images = [round(r * t, 6) for (_, r), (_, t) in zip(rate, dt)]
    assert all(sorted(images[i:i + 2]) == [1., 4.] for i in range(0, STEPS, 2)), images  # each epoch: a batch of 4, one of 1


def test_fsdp_trains_like_ddp_and_shards_only_the_denoiser(jobs):
    ws, ddp, fsdp = jobs['ws'], jobs['ddp'], jobs['fsdp']
    assert [v for _, v in _metric(ws, fsdp['id'])] == pytest.approx([v for _, v in _metric(ws, ddp['id'])], rel=1e-4)
    _close(_adapter(fsdp), _adapter(ddp), 1e-5)
    assert jobs['sharding'] == dict(lora=['DTensor'], vae=['Parameter'], text=['Parameter'])


def test_a_ddp_image_job_resumes_exactly_on_two_processes(jobs):
    ws, ddp, rest = jobs['ws'], jobs['ddp'], jobs['rest']
    assert (rest['status'], rest['step']) == ('completed', STEPS), rest['error']
    a, b = _metric(ws, ddp['id'])[CKPT:], _metric(ws, rest['id'])
    assert [s for s, _ in b] == [s for s, _ in a] and [v for _, v in b] == pytest.approx([v for _, v in a], rel=1e-6)
    _close(_adapter(rest), _adapter(ddp), 1e-6)


if __name__ == '__main__':
    _sharding(*sys.argv[1:])
