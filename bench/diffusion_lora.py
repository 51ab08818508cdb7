"""What caching buys an image LoRA: step time of the diffusion recipe with cached latents and embeddings, with live
VAE encoding, and with the text encoder training (so its embeddings cannot be cached).

    python bench/diffusion_lora.py [--steps N] [--rounds R] [--resolution PX] [--out bench/results]

A benchmark, not a test: it asserts nothing; it writes `<out>/diffusion_lora.json` (every number) and
`<out>/diffusion_lora.md` (a table), with the machine it ran on.

The arms train the same tiny SD 1.5 pipeline (`forgenb.test_utils.tiny_pipeline_dir`) on the same six generated
images (`write_sample_images`), LoRA r=8 on the UNet's attention, batch 2, fp32 on CPU (bf16 on CUDA):

- `cached`: latents and text embeddings from the workspace cache (the recipe's default);
- `live-vae`: `diffusion.cache_latents: false`, the VAE encodes each batch's pixels every step;
- `train-te`: `diffusion.train_text_encoder: true`, the text encoder runs (and trains) every step.

Each arm is built once per round (the cache is made by the first build, `cached`'s, and reused by the
others, so their build times leave it out); then the arms take
turns, `--chunk` steps each, in a fresh random order each round, so that on a shared machine each sees the
same speed. A step is timed from one forward's start to the next's (a `loss_func` wrapper); warm-up steps are
dropped. With the tiny models the VAE and the text encoder are as small as the UNet, so the gaps here are a
floor: on SD 1.5 proper the VAE encoder alone costs about as much as a UNet forward at 512 px.
"""
from __future__ import annotations
import argparse, json, os, platform, random, statistics, tempfile, time, warnings
from datetime import datetime, timezone
from pathlib import Path

ARMS = dict(cached={}, **{'live-vae': dict(cache_latents=False), 'train-te': dict(train_text_encoder=True)})

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

def run(steps=60, rounds=3, chunk=5, warmup=5, resolution=128, out='bench/results'):
    "Run the arms in turns; write and return the results"
    warnings.filterwarnings('ignore')
    from forgenb.core import Workspace
    from forgenb.data.image import import_images
    from forgenb.test_utils import tiny_pipeline_dir, write_sample_images
    tmp = Path(tempfile.mkdtemp())
    ws = Workspace(tmp/'ws').ensure()
    import_images(ws, write_sample_images(tmp/'shapes', n=6), name='shapes')
    base = tiny_pipeline_dir(tmp/'sd15')
    res = {a: dict(step_s=[], build_s=[]) for a in ARMS}
    for r in range(rounds):
        arms = {}
        for a, dif in ARMS.items():
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
                cuda=_cuda(), steps=steps, rounds=rounds, chunk=chunk, resolution=resolution, omp=os.environ.get('OMP_NUM_THREADS'))
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    (out/'diffusion_lora.json').write_text(json.dumps(dict(meta=meta, rows=rows, raw=res), indent=1))
    md = ['| arm | median step (ms) | vs cached | build (s) | steps |', '|---|---|---|---|---|']
    md += [f"| {r['arm']} | {r['median_step_ms']} | {r['vs_cached']} | {r['build_s']} | {r['n_steps']} |" for r in rows]
    (out/'diffusion_lora.md').write_text(f"{meta['when']}, {meta['machine']}, {meta['cpu_count']} CPUs, cuda={meta['cuda']}, "
                                         f"{resolution} px\n\n" + '\n'.join(md) + '\n')
    return rows

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--steps', type=int, default=60); ap.add_argument('--rounds', type=int, default=3)
    ap.add_argument('--chunk', type=int, default=5); ap.add_argument('--resolution', type=int, default=128)
    ap.add_argument('--out', default='bench/results')
    a = ap.parse_args()
    for r in run(a.steps, a.rounds, a.chunk, resolution=a.resolution, out=a.out): print(r)
