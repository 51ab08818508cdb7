"""GPU smoke test of the engine and both recipes: tiny jobs trained through `forgenb.train`, bf16, on CUDA.

    python bench/gpu_smoke.py --out DIR     # on the GPU (bench/gpu_check.sh runs it; it refuses to run without CUDA)
    python bench/gpu_smoke.py --cpu         # the same checks on CPU (CUDA hidden), about a minute

A plain script with asserts, not a test: it lives in bench/ so that the CPU test run (pytest's testpaths =
tests/) never collects it. For each recipe (`llm`: the tiny Llama of `forgenb.test_utils` on the sample task;
`sd15`: the tiny SD 1.5 pipeline on generated images, 64 px) it checks, in bf16 (base weights and autocast):

- `learns`: a job trained through `forgenb.train` completes on the device asked for (a callback reads where the
  weights and the batch are and the autocast dtype) with finite losses, and its loss on fixed batches, fixed noise
  and timesteps, measured before step 1 and after the last step, falls (LLM by >= 10%, images by >= 3%: with LoRA
  on a tiny random UNet the image loss is mostly noise);
- `adapter`: the job's adapter folder holds safetensors whose tensors are all finite and not all zero, and the
  job is a completed run with its step count;
- `resume`: the same spec run straight twice (the A/A: how repeatable the device is) and once stopped at a
  mid step, then resumed with `run_job`, gives per-step losses equal to the straight run's. On CPU equality is
  exact (max difference 0); on a GPU the resumed run may differ from the straight run by at most 4x what the
  straight run differs from itself (kernels with atomics are not bit-repeatable; where the A/A difference is 0 the
  resume must be exact too; a resume that restores the wrong random state or batch differs by orders of magnitude
  more). Both numbers are reported, with `bitwise`.

Each check's result goes to `<out>/smoke.json` as soon as it is known (so a kill keeps what was done); the exit
status is 1 if any check failed. Timings are printed, not asserted.
"""
from __future__ import annotations
import argparse, json, math, os, sys, tempfile, time, traceback
from pathlib import Path


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--cpu', action='store_true', help='run on CPU (CUDA hidden): the same checks, to test this script without a GPU')
    p.add_argument('--out', default=os.environ.get('OUT') or None, help='folder for smoke.json (default $OUT, else a temporary one)')
    p.add_argument('--recipes', default='llm,sd15', help='comma-separated, from llm, sd15')
    p.add_argument('--steps', type=int, default=40, help='steps of the learning run')
    p.add_argument('--resume-steps', type=int, default=8, help='steps of the resume runs (stopped at half)')
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------------------
# Callbacks the checks attach to a job (through train's `cbs`)
# --------------------------------------------------------------------------------------------------------------

def _callbacks():
    import torch
    from forgenb.engine import Callback, preserve_rng

    def _loss(learn, b):
        r = learn.loss_func(learn.model, b)
        return float((r[0] if isinstance(r, tuple) else r).float())

    class FixedLoss(Callback):
        "The loss on the first `n` training batches with fixed noise (seed 0, `reps` draws), before step 1 and after the last"
        order = 90
        def __init__(self, n=4, reps=4): self.n, self.reps, self.values = n, reps, {}
        def _measure(self):
            with preserve_rng(), torch.no_grad(), self.learn.accelerator.autocast():
                if not hasattr(self, 'batches'): self.batches = [b for _, b in zip(range(self.n), self.learn.train_dl)]
                torch.manual_seed(0)
                return sum(_loss(self.learn, b) for _ in range(self.reps) for b in self.batches) / (self.reps * len(self.batches))
        def before_fit(self): self.values['before'] = self._measure()
        def after_fit(self): self.values['after'] = self._measure()

    class Where(Callback):
        "Where step 1 ran: the weights' devices and dtypes, the batch's device, the dtype a frozen Linear computed in"
        order = 90
        def __init__(self): self.seen, self.linear_out, self.batch_dev = None, None, None
        def before_fit(self):
            lin = next(m for m in self.learn.model.modules() if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad)
            def hook(m, i, o):
                if self.linear_out is None: self.linear_out = str(o.dtype)
            self._h = lin.register_forward_hook(hook)
        def after_loss(self):
            if self.batch_dev is None:
                b = self.learn.batch
                xs = list(b.values()) if isinstance(b, dict) else list(b) if isinstance(b, (list, tuple)) else [b]
                self.batch_dev = next((str(x.device) for x in xs if torch.is_tensor(x)), None)
        def after_step(self):
            if self.seen is not None: return
            self._h.remove()
            ps = list(self.learn.model.parameters())
            train, frozen = [p for p in ps if p.requires_grad], [p for p in ps if not p.requires_grad]
            self.seen = dict(device=str(ps[0].device), batch_device=self.batch_dev, frozen_linear_output=self.linear_out,
                             trainable=sorted({f'{p.device.type}/{p.dtype}' for p in train}),
                             frozen=sorted({f'{p.device.type}/{p.dtype}' for p in frozen}),
                             accelerator=str(self.learn.accelerator.device), mixed_precision=self.learn.accelerator.mixed_precision,
                             cuda_max_allocated_mib=round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None)

    from forgenb.test_utils import StopAt
    return FixedLoss, Where, StopAt


# --------------------------------------------------------------------------------------------------------------
# The two recipes' tiny jobs
# --------------------------------------------------------------------------------------------------------------

def llm_spec(ws, assets, steps):
    from forgenb.presets import spec_from_preset
    from forgenb.test_utils import tiny_model_dir, write_sample_dataset
    from forgenb.data.text import import_text
    if ws.ledger.get_dataset('sample') is None:
        import_text(ws, write_sample_dataset(assets/'sample.jsonl', fmt='alpaca'), name='sample')
    return spec_from_preset('tiny-cpu-demo', ws, **{
        'model.base': str(tiny_model_dir(assets/'tiny-llama')), 'model.dtype': 'bf16', 'data.dataset': 'sample',
        'train.precision': 'bf16', 'train.max_steps': steps, 'train.lr': 3e-3, 'train.warmup': 2, 'train.scheduler': 'constant',
        'train.batch_size': 8, 'train.log_every': 1, 'train.eval_every': steps, 'sample.every': steps,
        'checkpoint.every': 0, 'checkpoint.keep_last': 2})

def sd15_spec(ws, assets, steps):
    from forgenb.test_utils import tiny_pipeline_dir, write_sample_images
    from forgenb.data.image import import_images
    if ws.ledger.get_dataset('shapes') is None:
        import_images(ws, write_sample_images(assets/'shapes', n=4), name='shapes')
    return dict(kind='diffusion', name='shapes', model=dict(base=str(tiny_pipeline_dir(assets/'sd15')), dtype='bf16'),
                data=dict(dataset='shapes', resolution=64, trigger='zxq', random_flip=True, caption_dropout=0.25),
                lora=dict(r=4, alpha=8, dropout=0.), sample=dict(prompts=['zxq, a red square'], every=steps, seed=3),
                train=dict(max_steps=steps, lr=1e-2, batch_size=2, grad_accum=1, precision='bf16', log_every=1, scheduler='constant', warmup=0),
                diffusion=dict(min_snr_gamma=5., noise_offset=0.05, sample_steps=2))

# the spec; how far the fixed loss must fall; accelerate's mixed precision on CPU (both recipes honour the spec's bf16
# there too, so the CPU run takes the GPU's dtype path); on a GPU both must be bf16
SPECS = dict(llm=(llm_spec, 0.90, 'bf16'), sd15=(sd15_spec, 0.97, 'bf16'))


def _losses(ws, job_id) -> dict:
    return {int(s): float(v) for s, v in ws.ledger.metrics(job_id, 'train/loss')['train/loss']}

def _diff(a:dict, b:dict) -> float:
    assert a.keys() == b.keys(), f'different steps logged: {sorted(a)} vs {sorted(b)}'
    return max(abs(a[k] - b[k]) for k in a)


def check_learns(ws, name, spec, steps, cpu, ratio, cpu_mp):
    from forgenb.run import train
    FixedLoss, Where, _ = _callbacks()
    fixed, where = FixedLoss(), Where()
    t = time.perf_counter()
    job = train(spec, ws, name=f'{name}-learns', progress='off', cbs=[fixed, where])
    dt = time.perf_counter() - t
    losses = _losses(ws, job['id'])
    r = dict(job_id=job['id'], status=job['status'], step=job['step'], train_seconds=round(dt, 2), where=where.seen, fixed_loss=fixed.values,
             first_losses=[losses[k] for k in sorted(losses)[:5]], last_losses=[losses[k] for k in sorted(losses)[-5:]])
    assert (job['status'], job['step']) == ('completed', steps), f"the job ended {job['status']} at step {job['step']}: {job.get('error')}"
    assert where.seen is not None, 'the Where callback never ran'
    want = 'cpu' if cpu else 'cuda'
    assert where.seen['device'].startswith(want) and where.seen['accelerator'].startswith(want), f'trained on {where.seen}, not {want}'
    assert where.seen['batch_device'] is None or where.seen['batch_device'].startswith(want), f'the batch was on {where.seen}'
    mp = cpu_mp if cpu else 'bf16'
    assert where.seen['mixed_precision'] == mp, f"mixed precision {where.seen['mixed_precision']!r}, not {mp!r}: {where.seen}"
    if mp == 'bf16': assert where.seen['frozen_linear_output'] == 'torch.bfloat16', f'a frozen Linear did not compute in bf16: {where.seen}'
    assert losses and all(math.isfinite(v) for v in losses.values()), f'non-finite losses: {losses}'
    assert fixed.values['after'] < ratio * fixed.values['before'], f"fixed-batch loss did not fall enough: {fixed.values} (want after < {ratio} x before)"
    return r, job

def check_adapter(ws, job):
    import torch
    from safetensors.torch import load_file
    d = ws.run_dir(job['id'])/'adapter'
    files = sorted(d.glob('*.safetensors'))
    assert files, f'no adapter weights in {d}: {sorted(p.name for p in d.iterdir()) if d.exists() else "missing"}'
    n, nonzero = 0, 0
    for f in files:
        for k, v in load_file(f).items():
            assert torch.isfinite(v.float()).all(), f'{f.name}: {k} has non-finite values'
            n += 1; nonzero += bool(v.float().abs().sum() > 0)
    assert n and nonzero, f'{n} tensors, {nonzero} not all zero'
    return dict(files=[f.name for f in files], tensors=n, nonzero_tensors=nonzero, bytes=sum(f.stat().st_size for f in files))

def check_resume(ws, name, spec, n, cpu):
    from forgenb.run import train, run_job
    *_, StopAt = _callbacks()
    a = train(spec, ws, name=f'{name}-straight', progress='off')
    b = train(spec, ws, name=f'{name}-straight-again', progress='off')
    s = train(spec, ws, name=f'{name}-stopped', progress='off', cbs=[StopAt(n // 2)])
    assert (s['status'], s['step']) == ('stopped', n // 2), f"the stopped run: {s['status']} at {s['step']}"
    ck = ws.run_dir(s['id'])/'checkpoints'/f'step-{n // 2}'
    assert ck.is_dir(), f'no checkpoint at {ck}'
    done = run_job(ws, s['id'], progress='off')
    assert (done['status'], done['step']) == ('completed', n), f"the resumed run: {done['status']} at {done['step']}"
    la, lb, ls = _losses(ws, a['id']), _losses(ws, b['id']), _losses(ws, s['id'])
    aa, res = _diff(la, lb), _diff(la, ls)
    r = dict(steps=n, stopped_at=n // 2, aa_max_diff=aa, resume_max_diff=res, bitwise=res == 0.0,
             losses_straight=[la[k] for k in sorted(la)], losses_resumed=[ls[k] for k in sorted(ls)])
    assert all(math.isfinite(v) for v in ls.values()), r
    if cpu: assert res == 0.0, f'resume is not exact on CPU: max |diff| {res:.3g}'
    else: assert res <= 4 * aa, f'resumed vs straight differ by {res:.3g}, more than 4x straight vs straight ({aa:.3g})'
    return r


# --------------------------------------------------------------------------------------------------------------

def main(a):
    if a.cpu: os.environ['CUDA_VISIBLE_DEVICES'] = ''
    for k, v in dict(HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', TOKENIZERS_PARALLELISM='false', FORGENB_AUTO_RESUME='0').items():
        os.environ.setdefault(k, v)
    import torch
    if not a.cpu and not torch.cuda.is_available(): raise SystemExit('gpu_smoke: no CUDA device here (use --cpu to run the checks on CPU)')
    from forgenb.core import Workspace
    out = Path(a.out or tempfile.mkdtemp(prefix='gpu_smoke_out.')); out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix='gpu_smoke.'))
    ws, assets = Workspace(root/'ws').ensure(), root/'assets'
    res = dict(mode='cpu' if a.cpu else 'cuda', torch=torch.__version__, cuda=torch.version.cuda,
               gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None, checks={}, failed=[])
    def save():
        tmp = out/'smoke.json.tmp'; tmp.write_text(json.dumps(res, indent=1, default=str)); tmp.replace(out/'smoke.json')
    def run(label, f, *args):
        t = time.perf_counter()
        try:
            r = f(*args); ok = True
        except Exception as e:
            r, ok = dict(error=f'{type(e).__name__}: {e}', traceback=traceback.format_exc()[-3000:]), False
            res['failed'].append(label)
        r = r[0] if ok and isinstance(r, tuple) else r
        res['checks'][label] = dict(ok=ok, seconds=round(time.perf_counter() - t, 2), **r)
        save()
        print(f"{'PASS' if ok else 'FAIL'} {label} ({time.perf_counter() - t:.1f} s)" + ('' if ok else f": {r['error']}"), flush=True)
        return r, ok
    t0 = time.perf_counter()
    for name in a.recipes.split(','):
        make, ratio, cpu_mp = SPECS[name]
        t = time.perf_counter()
        try: spec, rspec = make(ws, assets, a.steps), make(ws, assets, a.resume_steps)
        except Exception as e:
            run(f'{name}.setup', lambda: (_ for _ in ()).throw(e)); continue
        print(f'{name}: assets ready in {time.perf_counter() - t:.1f} s', flush=True)
        job = {}
        def learns():
            r, j = check_learns(ws, name, spec, a.steps, a.cpu, ratio, cpu_mp); job['j'] = j; return r
        _, ok = run(f'{name}.learns', learns)
        if 'j' not in job:  # the job itself failed: find it in the ledger for the adapter check's message
            js = [j for j in ws.ledger.list_jobs() if j.get('name') == f'{name}-learns']
            if js: job['j'] = js[0]
        if 'j' in job: run(f'{name}.adapter', check_adapter, ws, job['j'])
        run(f'{name}.resume', check_resume, ws, name, rspec, a.resume_steps, a.cpu)
    res['seconds'] = round(time.perf_counter() - t0, 1)
    save()
    print(f"gpu_smoke ({res['mode']}): {len(res['checks']) - len(res['failed'])}/{len(res['checks'])} checks passed in {res['seconds']} s; "
          f"results in {out/'smoke.json'}" + (f"; FAILED: {', '.join(res['failed'])}" if res['failed'] else ''), flush=True)
    return 1 if res['failed'] else 0

if __name__ == '__main__':
    sys.exit(main(parse()))
