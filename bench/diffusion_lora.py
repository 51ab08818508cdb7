"""forgenb's image LoRA recipe against a loop written like diffusers' example scripts: same SDXL-shaped UNet, cached
latents and embeddings, hyperparameters, seed, noise and timesteps.

    python bench/diffusion_lora.py [--rounds R] [--steps N] [--out bench/results]   # CPU: a small SDXL-shaped UNet
    python bench/diffusion_lora.py --gpu                                             # GPU: SDXL's UNet at full size, 1024 px, bf16
    python bench/diffusion_lora.py --caching                                         # the second table: what caching buys

A benchmark, not a test: it asserts nothing; it writes `<out>/diffusion_lora[_gpu].json` (every number) and
`<out>/diffusion_lora[_gpu].md` (the table for the README), with the machine and the command.

Arms (`--arms`), each round in its own fresh process (so nothing one of them imports or patches can reach the other):

- `diffusers`: a plain PyTorch loop as in diffusers' `examples/text_to_image/train_text_to_image_lora_sdxl.py` (and
  `train_text_to_image_lora.py` for SD 1.5): `unet.add_adapter(LoraConfig(r, alpha, init_lora_weights='gaussian',
  target_modules=['to_k', 'to_q', 'to_v', 'to_out.0']))`, the LoRA parameters cast to fp32, `torch.optim.AdamW` on them
  (the script's defaults: betas (0.9, 0.999), weight decay 1e-2, eps 1e-8), `get_scheduler('constant')`,
  `DDPMScheduler` noise (`randn_like`, then `randint` timesteps, `add_noise`), SDXL's `add_time_ids` and pooled
  embeddings as `added_cond_kwargs`, MSE on epsilon, `clip_grad_norm_(1.0)`, `step`, `zero_grad`; bf16 autocast
  with a bf16 frozen UNet on a GPU (what accelerate's `mixed_precision='bf16'` does there), fp32 on CPU;
- `forgenb`: the recipe's own pieces after `build()` has loaded and cached: `add_lora`, `noise_scheduler`,
  `DiffusionLoRA` (whose `forward` is the loss), the recipe's `ImageData`/`BatchSet` over the cached tensors,
  `make_dl`, `diffusion_loss`, and `make_learner` (its `Learner`: accelerate, the recipe's AdamW, constant schedule,
  clipping at 1.0) with a `Recorder(log_every=10)`, as a job has. `build()` itself is not timed: it loads a
  pipeline from disk and runs the VAE and text encoders once, and a random-init UNet has no folder to load;
- `forgenb-fix`: a diagnostic, the `forgenb` arm with two per-step host costs that a profile found taken out:
  `DiffusionLoRA._latents` and `._text` each read `self.denoiser.dtype`, and diffusers' `ModelMixin.dtype` walks
  every module (2,018 in the small UNet, 7,530 in SDXL's) looking for layerwise-casting hooks; and
  `AdapterMetaCallback.after_step` calls `accelerator.unwrap_model` (another walk) every step. The arm caches both
  (see `_fix`); it shows what fixing them in the recipe would buy.

On a GPU the arms share the device (they take turns, so only one computes at a time); `--arms diffusers,forgenb`
leaves the diagnostic arm out where memory is short.

Both arms build the very same UNet (`torch.manual_seed(0)` before the constructor), the same LoRA (seed 1 before the
adapter goes in; r=`--rank`, alpha=r, dropout 0), and the same "cached" tensors: per image a latent (standard
normal, as scaled SD latents roughly are), 77 prompt embeddings, a pooled embedding and SDXL's time ids (original
size = target size, crop (0, 0)). Both seed torch with 2 right before the first step; from there each step draws
`randn_like(latents)` then `randint` timesteps and nothing else from the global RNG (the recipe's data loader has
its own generator; no flips, no caption dropout, no dropout), so both arms see the same noise and timesteps and
their losses agree at the first step to float rounding, and drift only as rounding differences in the updates
accumulate (the recipe averages the MSE per image and then over the batch; the script takes one mean; the
optimizers differ in their foreach/fused path).

Per round both arms start, each runs `--warmup` untimed steps, then they take turns, one timed step each (A B,
B A, ...), the other waiting on a pipe, so both see the same machine. A timed step runs from its turn's start to
the end of its optimizer step (device-synchronised): moving the batch to the device counts. Reported: images/s,
the mean step time, peak memory (the process's peak RSS on CPU, with the part added after the model was built;
`torch.cuda.max_memory_allocated` on a GPU) and the largest difference between the arms' losses over the first
`N_LOSSES` steps. The ratio forgenb/diffusers is taken per round: median and min-max over rounds.

`--gpu` uses SDXL's UNet config at full size (block_out_channels (320, 640, 1280), transformer depths (1, 2, 10),
heads (5, 10, 20), cross-attention 2048, text_time conditioning 2816), random init, 1024 px images = 128x128
latents, batch 4, bf16. The recipe turns on gradient checkpointing at 1024 px by default (`train.grad_ckpt: auto`)
and diffusers' script does not (`--gradient_checkpointing` is off by default): `--grad-ckpt auto` (the default)
compares the two defaults, `off`/`on` sets both arms alike.
"""
from __future__ import annotations
import argparse, json, os, platform, random, statistics, sys, tempfile, time, warnings
from datetime import datetime, timezone
from pathlib import Path
from turns import Timer, machine, peak_mem_gb, report, rss_gb, start, take_turns, turn_fds  # the arms taking turns (bench/turns.py)

ARMS = ('diffusers', 'forgenb', 'forgenb-fix')
LR, WD, CLIP, SEED, TEXT_LEN = 1e-4, 1e-2, 1.0, 2, 77
TARGETS = ['to_k', 'to_q', 'to_v', 'to_out.0']
SDXL_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                      prediction_type='epsilon', steps_offset=1, timestep_spacing='leading', clip_sample=False)
_SDXL_BLOCKS = dict(in_channels=4, out_channels=4, layers_per_block=2, down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'),
                    up_block_types=('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'), use_linear_projection=True,
                    addition_embed_type='text_time', norm_num_groups=32)
MODELS = {
    # SDXL's layout (3 levels, 2 resnets per level, attention in the lower two, text_time conditioning), narrow and shallow
    'cpu-small': dict(unet=dict(_SDXL_BLOCKS, sample_size=32, block_out_channels=(32, 64, 128), transformer_layers_per_block=(1, 1, 2),
                                attention_head_dim=(1, 2, 4), cross_attention_dim=128, addition_time_embed_dim=16,
                                projection_class_embeddings_input_dim=6 * 16 + 64),
                      pooled=64, latent=32, batch=2),
    # stabilityai/stable-diffusion-xl-base-1.0's unet/config.json
    'sdxl': dict(unet=dict(_SDXL_BLOCKS, sample_size=128, block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                           attention_head_dim=(5, 10, 20), cross_attention_dim=2048, addition_time_embed_dim=256,
                           projection_class_embeddings_input_dim=2816),
                 pooled=1280, latent=128, batch=4),
}
N_LOSSES = 10


# ---------------------------------------------------------------------------------------------------------------
# Model and data: the same in both arms
# ---------------------------------------------------------------------------------------------------------------

def make_unet(name, cuda):
    "The random-init SDXL-shaped UNet `name`, frozen (seeded: both arms get the very same weights)"
    import torch
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    with torch.device('cuda' if cuda else 'cpu'): unet = UNet2DConditionModel(**MODELS[name]['unet'])
    unet = (unet.to(torch.bfloat16) if cuda else unet).requires_grad_(False)
    if cuda: torch.cuda.reset_peak_memory_stats()  # the fp32 weights the constructor made are gone: not part of training's peak
    return unet

def make_cache(name, n_images) -> tuple[dict, dict, list]:
    "What the recipe's cache holds for `n_images` images: latents, text (embeddings, pooled), rows (original sizes)"
    import torch
    m, g = MODELS[name], torch.Generator().manual_seed(0)
    px, cross = m['latent'] * 8, m['unet']['cross_attention_dim']
    lat = {str(i): torch.randn(4, m['latent'], m['latent'], generator=g) for i in range(n_images)}
    text = {}
    for i in range(n_images):
        text[str(i)] = torch.randn(TEXT_LEN, cross, generator=g)
        text[f'{i}.pooled'] = torch.randn(m['pooled'], generator=g)
    return lat, text, [dict(width=px, height=px) for _ in range(n_images)]

def run_diffusers(a, cache, timer):
    "The loop of diffusers' train_text_to_image_lora_sdxl.py, without accelerate, on the cached tensors"
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    cuda = torch.cuda.is_available()
    dev, weight_dtype = torch.device('cuda' if cuda else 'cpu'), torch.bfloat16 if cuda else torch.float32
    timer.rss_imports = rss_gb()
    unet = make_unet(a.model, cuda)
    torch.manual_seed(1)
    unet.add_adapter(LoraConfig(r=a.rank, lora_alpha=a.rank, init_lora_weights='gaussian', target_modules=TARGETS))
    for p in unet.parameters():  # cast_training_params(unet, dtype=torch.float32)
        if p.requires_grad: p.data = p.data.float()
    if a.grad_ckpt == 'on': unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    noise_scheduler = DDPMScheduler(**SDXL_SCHEDULER)
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), weight_decay=WD, eps=1e-8)
    lr_scheduler = get_scheduler('constant', optimizer=optimizer)
    lat, text, rows = cache
    B = a.batch
    def batches():  # the script's collate_fn: stacked cached tensors, sizes and crops per image
        for j in range(len(lat) // B):
            idx = range(j * B, (j + 1) * B)
            yield dict(model_input=torch.stack([lat[str(i)] for i in idx]), prompt_embeds=torch.stack([text[str(i)] for i in idx]),
                       pooled_prompt_embeds=torch.stack([text[f'{i}.pooled'] for i in idx]),
                       original_sizes=[(rows[i]['height'], rows[i]['width']) for i in idx], crop_top_lefts=[(0, 0)] * B)
    def compute_time_ids(original_size, crops_coords_top_left):
        target_size = (a.resolution, a.resolution)
        return torch.tensor([list(original_size + crops_coords_top_left + target_size)]).to(dev, dtype=weight_dtype)
    unet.train()
    torch.manual_seed(SEED)
    for step, batch in enumerate(batches(), 1):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            model_input = batch['model_input'].to(dev).to(weight_dtype)
            noise = torch.randn_like(model_input)
            bsz = model_input.shape[0]
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=model_input.device).long()
            noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)
            add_time_ids = torch.cat([compute_time_ids(s, c) for s, c in zip(batch['original_sizes'], batch['crop_top_lefts'])])
            unet_added_conditions = {'time_ids': add_time_ids}
            prompt_embeds = batch['prompt_embeds'].to(dev, dtype=weight_dtype)
            unet_added_conditions.update({'text_embeds': batch['pooled_prompt_embeds'].to(dev, dtype=weight_dtype)})
            model_pred = unet(noisy_model_input, timesteps, prompt_embeds, added_cond_kwargs=unet_added_conditions, return_dict=False)[0]
            loss = F.mse_loss(model_pred.float(), noise.float(), reduction='mean')
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step(); lr_scheduler.step(); optimizer.zero_grad()
        if len(timer.losses) < N_LOSSES: timer.losses.append(loss.detach())
        timer.step_done(step)

def run_forgenb(a, cache, timer):
    "The recipe's pieces on the same UNet and cache, trained by `make_learner`'s `Learner` with a `Recorder`"
    import types, torch
    from diffusers import DDPMScheduler
    from forgenb.callbacks import Recorder
    from forgenb.config import load_spec
    from forgenb.engine import Callback, make_dl, make_optimizer, make_scheduler
    from forgenb.recipes import diffusion as D
    from functools import partial
    cuda = torch.cuda.is_available()
    timer.rss_imports = rss_gb()
    spec = load_spec(dict(kind='diffusion', name='bench', model=dict(base='random-init'), data=dict(dataset='cache', resolution=a.resolution),
                          lora=dict(r=a.rank, alpha=a.rank, dropout=0.),
                          train=dict(max_steps=a.warmup + a.steps, lr=LR, batch_size=a.batch, grad_accum=1, scheduler='constant', warmup=0,
                                     weight_decay=WD, precision='bf16' if cuda else 'fp32', seed=SEED,
                                     grad_ckpt={'auto': 'auto', 'on': True, 'off': False}[a.grad_ckpt])))
    pipe = types.SimpleNamespace(unet=make_unet(a.model, cuda), vae=None, arch='sdxl', scheduler=DDPMScheduler(**SDXL_SCHEDULER))
    sched = D.noise_scheduler(pipe)
    torch.manual_seed(1)
    cfgs = D.add_lora(pipe, spec.lora, False, D._grad_ckpt(spec))
    lat, text, rows = cache
    n = len(rows)
    sizes = [(a.resolution, a.resolution)] * n
    data = D.ImageData('cache', 'bench', rows, [''] * n, sizes, [list(range(j * a.batch, (j + 1) * a.batch)) for j in range(n // a.batch)], lat, text)
    model = D.DiffusionLoRA(pipe, sched, spec.diffusion, 0., False, None, cfgs, D._meta(spec, data, 'sdxl', 'epsilon'))
    total = a.warmup + a.steps
    setup = D.Setup(spec, model, pipe, make_dl(D.BatchSet(data), 1, False, SEED, D._first), None, D.diffusion_loss,
                    partial(make_optimizer, lr=LR, weight_decay=WD), partial(make_scheduler, name='constant', n_steps=total, warmup=0),
                    None, data, dict(total_steps=total))
    class Clock(Callback):
        def after_loss(self):
            if len(timer.losses) < N_LOSSES: timer.losses.append(self.loss)
        def after_step(self): timer.step_done(self.step)
    learn = D.make_learner(setup, cbs=[Recorder(log_every=10), Clock()])
    if a.arm == 'forgenb-fix': _fix(learn, pipe.unet)
    timer.grad_ckpt = bool(D._grad_ckpt(spec))
    torch.manual_seed(SEED)
    if a.profile: return _profile(learn, a.profile)
    learn.fit()

def _fix(learn, unet):
    """The `forgenb-fix` arm: the recipe with the two per-step costs the profile found taken out (a diagnostic, not a patch
    forgenb ships): diffusers' `ModelMixin.dtype` walks every module (twice a step: `_latents` and `_text`), and
    `AdapterMetaCallback.after_step` calls `accelerator.unwrap_model` (another walk) every step"""
    from forgenb.recipes.diffusion import AdapterMetaCallback
    dt = unet.dtype
    unet.__class__ = type(type(unet).__name__, (type(unet),), dict(dtype=property(lambda self: dt)))
    meta = learn.accelerator.unwrap_model(learn.model).meta
    class FixedMeta(AdapterMetaCallback):
        def after_step(self): meta['steps'] = self.learn.step
    learn.remove_cbs([c for c in learn.cbs if isinstance(c, AdapterMetaCallback)]).add_cbs([FixedMeta()])

def _profile(learn, n):
    "Profile `n` steps of `learn` after a warm-up step (CPU); print the top of the table"
    import torch
    learn.fit(max_steps=1)
    with torch.profiler.profile() as prof: learn.fit(max_steps=1 + n)
    print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=30), file=sys.stderr, flush=True)

def arm_main(a):
    "One arm: train, and print one JSON line of measurements"
    import torch
    warnings.filterwarnings('ignore')
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', 1)))
    cache = make_cache(a.model, a.batch * (a.warmup + a.steps))
    if torch.cuda.is_available(): torch.cuda.reset_peak_memory_stats()
    timer = Timer(a.warmup, a.warmup + a.steps, turn_fds(a))
    timer.rss_built = None
    run = run_diffusers if a.arm == 'diffusers' else run_forgenb
    _orig = timer.step_done
    def step_done(step):  # the resident memory once the model is built and the first step has run
        if timer.rss_built is None: timer.rss_built = rss_gb()
        _orig(step)
    timer.step_done = step_done
    rss_before = rss_gb()
    run(a, cache, timer)
    if a.profile: return
    dt = sum(timer.dts)
    out = dict(arm=a.arm, model=a.model, images_per_s=a.batch * a.steps / dt, step_s=dt / a.steps, peak_mem_gb=peak_mem_gb(),
               rss_start_gb=rss_before, rss_imports_gb=timer.rss_imports, rss_after_step1_gb=timer.rss_built, losses=[float(l) for l in timer.losses],
               grad_ckpt=getattr(timer, 'grad_ckpt', a.grad_ckpt == 'on'), cpu_step_s=statistics.median(timer.cpu_dts),
               step_times=timer.dts, cpu_step_times=timer.cpu_dts)
    print('RESULT ' + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# The driver: rounds of A B, ratios, the report
# ---------------------------------------------------------------------------------------------------------------

def run_pair(a) -> list[dict]:
    "The arms at once, taking turns step by step"
    def args(arm):
        return ['--arm', arm, '--model', a.model, '--batch', a.batch, '--rank', a.rank, '--steps', a.steps, '--warmup', a.warmup,
                '--grad-ckpt', a.grad_ckpt]
    return take_turns([start(__file__, args(arm), arm) for arm in a.arms.split(',')], a.steps)

def _machine() -> dict:
    import diffusers, peft, accelerate
    return machine(diffusers, peft, accelerate)

def _unet_params(name) -> int:
    "Parameters of UNet `name` (built on the meta device: no memory)"
    import torch
    from diffusers import UNet2DConditionModel
    with torch.device('meta'): return sum(p.numel() for p in UNet2DConditionModel(**MODELS[name]['unet']).parameters())

def _vs(d, f) -> dict:
    "Arm rows `f` against the diffusers rows `d` of the same rounds"
    ratios = [y['images_per_s'] / x['images_per_s'] for x, y in zip(d, f)]
    cpu = [x['cpu_step_s'] / y['cpu_step_s'] for x, y in zip(d, f)]  # > 1: the arm needs less CPU time per step
    diffs = [[abs(u - v) for u, v in zip(x['losses'], y['losses'])] for x, y in zip(d, f)]
    # per turn: each step against the diffusers step of the same turn (cancels changes of speed within a round)
    turns = [dt / ft for x, y in zip(d, f) for dt, ft in zip(x['step_times'], y['step_times'])]
    return dict(ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios), turn_ratio=statistics.median(turns),
                cpu_ratio=statistics.median(cpu), cpu_ratio_min=min(cpu), cpu_ratio_max=max(cpu),
                mem_ratio=statistics.median(y['peak_mem_gb'] / x['peak_mem_gb'] for x, y in zip(d, f)),
                loss_diff_step0=max(x[0] for x in diffs), max_loss_diff=max(max(x) for x in diffs))

def summarize(rows, arms) -> dict:
    by = {arm: [r for r in rows if r['arm'] == arm] for arm in arms}
    out = dict(rounds=len(by['diffusers']), first_losses={arm: by[arm][0]['losses'] for arm in arms})
    for arm in arms:
        out[arm] = {k: statistics.median(r[k] for r in by[arm]) for k in ('images_per_s', 'step_s', 'cpu_step_s', 'peak_mem_gb', 'rss_imports_gb')}
        out[arm]['grad_ckpt'] = by[arm][0]['grad_ckpt']
        if arm != 'diffusers': out[arm].update(_vs(by['diffusers'], by[arm]))
    return out

def _cell(x, k, fmt, none='—'): return format(x[k], fmt) if k in x else none

def markdown(res) -> str:
    mc, a, s = res['machine'], res['args'], res['summary']
    where = f"{mc['gpu']} (CUDA)" if 'gpu' in mc else f"{mc['cpu']}, {mc['nproc']} cores, OMP_NUM_THREADS={mc['omp_threads']}"
    cpu = 'gpu' not in mc
    mem = 'peak RSS' if cpu else 'CUDA max allocated'
    arms = a['arms'].split(',')
    lines = [f"Machine: {where}; torch {mc['torch']}, diffusers {mc['diffusers']}, peft {mc['peft']}, accelerate {mc['accelerate']}; "
             f"load average before {mc['load_before'][0]:.2f}, after {mc['load_after'][0]:.2f}. {res['date']}.", '',
             f"Command: `{res['command']}`", '',
             f"UNet `{a['model']}` ({res['unet_params']/1e6:,.1f}M parameters, random init), {a['resolution']} px "
             f"({a['resolution']//8}x{a['resolution']//8} latents), batch {a['batch']}, LoRA r={a['rank']} on {', '.join(TARGETS)}, "
             f"{'bf16' if 'gpu' in mc else 'fp32'}, gradient checkpointing " + ', '.join(f"{arm} {'on' if s[arm]['grad_ckpt'] else 'off'}" for arm in arms) +
             f"; {a['warmup']} warm-up + {a['steps']} timed steps per arm and round (the arms taking turns step by step), {s['rounds']} rounds. "
             f"Ratios against `diffusers`: per round, then the median (min–max) over rounds; per turn: each step against the diffusers "
             f"step of the same turn, median over all turns; CPU: diffusers' CPU time per step over the arm's (> 1: the arm needs less).", '',
             f"| arm | images/s | vs diffusers (median, min–max) | per turn | step (wall) | CPU time per step | CPU vs diffusers | "
             f"peak memory ({mem}) |" + (' of it after the imports |' if cpu else '') + ' loss diff step 0 / max first 10 |',
             '|---|---|---|---|---|---|---|---|---|' + ('---|' if cpu else '')]
    for arm in arms:
        x = s[arm]
        vs = f"**{x['ratio']:.3f}×** ({x['ratio_min']:.3f}–{x['ratio_max']:.3f})" if 'ratio' in x else '1'
        lines.append(f"| `{arm}` | {x['images_per_s']:.2f} | {vs} | {_cell(x, 'turn_ratio', '.3f')} | {x['step_s']*1e3:,.0f} ms | "
                     f"{x['cpu_step_s']*1e3:,.0f} ms | {_cell(x, 'cpu_ratio', '.3f')} | {x['peak_mem_gb']:.2f} GB |"
                     + (f" {x['peak_mem_gb'] - x['rss_imports_gb']:.2f} GB |" if cpu else '')
                     + (f" {x['loss_diff_step0']:.1e} / {x['max_loss_diff']:.1e} |" if 'ratio' in x else ' — |'))
    return '\n'.join(lines) + '\n'

def main(a):
    import torch
    gpu = torch.cuda.is_available()
    if a.gpu and not gpu: raise SystemExit('--gpu: no CUDA device here (SDXL at full size needs one: about 2.6B UNet parameters)')
    load_before = os.getloadavg()
    rows = []
    for r in range(a.rounds):
        for x in run_pair(a):
            rows.append(x)
            print(f"round {r} {x['arm']}: {x['images_per_s']:.2f} images/s, {x['step_s']*1e3:.0f} ms/step, {x['peak_mem_gb']:.2f} GB, "
                  f"losses {[round(l, 5) for l in x['losses'][:3]]}", flush=True)
    report(a.out, 'diffusion_lora_gpu' if a.gpu else 'diffusion_lora', _machine(), load_before, markdown, args=vars(a),
           unet_params=_unet_params(a.model), rows=rows, summary=summarize(rows, a.arms.split(',')))



# ---------------------------------------------------------------------------------------------------------------
# The second table (--caching): what caching buys, the recipe against itself
#
# The arms train the same tiny SD 1.5 pipeline (`forgenb.test_utils.tiny_pipeline_dir`) on the same six generated
# images (`write_sample_images`), LoRA r=8 on the UNet's attention, batch 2, fp32 on CPU (bf16 on CUDA):
# `cached` (latents and text embeddings from the workspace cache, the recipe's default); `live-vae`
# (`diffusion.cache_latents: false`: the VAE encodes each batch's pixels every step); `train-te`
# (`diffusion.train_text_encoder: true`: the text encoder runs and trains every step). Each arm is built once per
# round (the first build, `cached`'s, makes the cache); the arms take turns, `chunk` steps each, in a fresh random
# order, in this one process. With the tiny models the VAE and the text encoder are as small as the UNet, so the
# gaps are a floor: on SD 1.5 proper the VAE encoder alone costs about as much as a UNet forward at 512 px.
# ---------------------------------------------------------------------------------------------------------------

CACHING_ARMS = dict(cached={}, **{'live-vae': dict(cache_latents=False), 'train-te': dict(train_text_encoder=True)})

def _spec(base, resolution, **dif):
    return dict(kind='diffusion', name='bench', model=dict(base=str(base)), data=dict(dataset='shapes', resolution=resolution),
                lora=dict(r=8, alpha=8, dropout=0.), diffusion=dif,
                train=dict(max_steps=10**6, lr=1e-4, batch_size=2, grad_accum=1, precision='bf16' if _cuda() else 'fp32'))

def _cuda():
    import torch
    return torch.cuda.is_available()

class _Timed:
    "A `loss_func` that records the time between the starts of consecutive forwards"
    def __init__(self, f): self.f, self.t, self.times = f, None, []
    def __call__(self, model, batch):
        now = time.perf_counter()
        if self.t is not None: self.times.append(now - self.t)
        self.t = now
        return self.f(model, batch)

def _arm(ws, base, resolution, dif):
    from forgenb.recipes import diffusion as D
    t0 = time.perf_counter()
    s = D.build(_spec(base, resolution, **dif), ws)
    built = time.perf_counter() - t0
    timed = _Timed(s.loss_func)
    s.loss_func = timed
    return D.make_learner(s), timed, built

def run_caching(steps=60, rounds=3, chunk=5, warmup=5, resolution=128, out='bench/results'):
    "The caching arms (one process, in turns of `chunk` steps); write `diffusion_lora_caching.{json,md}`, return the rows"
    warnings.filterwarnings('ignore')
    from forgenb.core import Workspace
    from forgenb.data.image import import_images
    from forgenb.test_utils import tiny_pipeline_dir, write_sample_images
    tmp = Path(tempfile.mkdtemp())
    ws = Workspace(tmp/'ws').ensure()
    import_images(ws, write_sample_images(tmp/'shapes', n=6), name='shapes')
    base = tiny_pipeline_dir(tmp/'sd15')
    res = {a: dict(step_s=[], build_s=[]) for a in CACHING_ARMS}
    for r in range(rounds):
        arms = {}
        for a, dif in CACHING_ARMS.items():
            learn, timed, built = _arm(ws, base, resolution, dif)
            arms[a] = (learn, timed); res[a]['build_s'].append(built)
        done = 0
        while done < steps + warmup:
            for a in random.sample(list(arms), len(arms)):
                learn, timed = arms[a]
                timed.t = None  # waiting for a turn is not a step
                learn.fit(max_steps=learn.step + chunk)
            done += chunk
        for a, (_, timed) in arms.items(): res[a]['step_s'] += timed.times[warmup:]
    base_ms = statistics.median(res['cached']['step_s']) * 1e3
    rows = [dict(arm=a, median_step_ms=round(statistics.median(v['step_s']) * 1e3, 2), vs_cached=round(statistics.median(v['step_s']) * 1e3 / base_ms, 3),
                 build_s=round(statistics.median(v['build_s']), 2), n_steps=len(v['step_s'])) for a, v in res.items()]
    meta = dict(when=datetime.now(timezone.utc).isoformat(timespec='seconds'), machine=platform.platform(), cpu_count=os.cpu_count(),
                cuda=_cuda(), command=' '.join(['python'] + sys.argv), load=os.getloadavg(), steps=steps, rounds=rounds, chunk=chunk, resolution=resolution, omp=os.environ.get('OMP_NUM_THREADS'))
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    (out/'diffusion_lora_caching.json').write_text(json.dumps(dict(meta=meta, rows=rows, raw=res), indent=1))
    md = ['| arm | median step (ms) | vs cached | build (s) | steps |', '|---|---|---|---|---|']
    md += [f"| {r['arm']} | {r['median_step_ms']} | {r['vs_cached']} | {r['build_s']} | {r['n_steps']} |" for r in rows]
    (out/'diffusion_lora_caching.md').write_text(f"{meta['when']}, {meta['machine']}, {meta['cpu_count']} CPUs, cuda={meta['cuda']}, "
                                         f"{resolution} px\n\n" + '\n'.join(md) + '\n')
    return rows


def parse(argv=None):
    p = argparse.ArgumentParser(description=' '.join(__doc__.split('\n\n')[0].split()))
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--steps', type=int, default=None, help='timed steps per arm and round (default 20 on CPU, 30 on GPU; --caching: 60)')
    p.add_argument('--warmup', type=int, default=None, help='untimed steps first (default 3 on CPU, 5 on GPU)')
    p.add_argument('--batch', type=int, default=None, help="images per step (default: the model's, 2 on CPU, 4 for SDXL)")
    p.add_argument('--rank', type=int, default=16, help='LoRA rank (alpha = rank)')
    p.add_argument('--model', default=None, choices=list(MODELS), help='default cpu-small, or sdxl with --gpu')
    p.add_argument('--grad-ckpt', default='auto', choices=('auto', 'on', 'off'),
                   help="auto: each arm's default (the recipe: on at >= 1024 px; the script: off); on/off: both arms")
    p.add_argument('--arms', default='diffusers,forgenb,forgenb-fix', help=f'comma-separated, from {", ".join(ARMS)} (diffusers first)')
    p.add_argument('--gpu', action='store_true', help="SDXL's UNet at full size, 1024 px, batch 4, bf16 (needs CUDA)")
    p.add_argument('--caching', action='store_true', help='the second table instead: the recipe cached vs live VAE vs training the text encoder')
    p.add_argument('--chunk', type=int, default=5, help='--caching: steps per turn')
    p.add_argument('--out', default=str(Path(__file__).parent/'results'))
    # one arm in one process (used by the driver); --profile N: profile N steps of the forgenb arm instead of timing
    p.add_argument('--arm', choices=ARMS); p.add_argument('--turn-fds', default=None); p.add_argument('--profile', type=int, default=0)
    a = p.parse_args(argv)
    a.model = a.model or ('sdxl' if a.gpu else 'cpu-small')
    gpu = a.model == 'sdxl'
    a.steps = a.steps or (60 if a.caching else 30 if gpu else 20)
    a.warmup = a.warmup if a.warmup is not None else (5 if gpu else 3)
    a.batch = a.batch or MODELS[a.model]['batch']
    a.resolution = MODELS[a.model]['latent'] * 8
    return a

if __name__ == '__main__':
    a = parse()
    if a.caching:
        for r in run_caching(a.steps, a.rounds, a.chunk, out=a.out): print(r)
    elif a.arm: arm_main(a)
    else: main(a)
