"""forgenb's LLM LoRA training against transformers `Trainer` + peft: same model, data, hyperparameters and seed.

    python bench/llm_lora.py [--rounds R] [--steps N] [--out bench/results]          # CPU: a small random-init Llama (~5M)
    python bench/llm_lora.py --gpu [--models llama-1b,qwen-0.5b] [--compile]          # GPU: 1B/0.5B shapes, seq 2048, bf16

A benchmark, not a test: it asserts nothing; it writes `<out>/llm_lora[_gpu].json` (every number) and
`<out>/llm_lora[_gpu].md` (the table for the README), with the machine and the command.

Arms, each round in its own fresh process (so nothing one library patches can reach the other):

- `hf`: `transformers.Trainer` + peft, SDPA attention, `DataCollatorForSeq2Seq` padding (labels -100 on pads),
  its default optimizer (AdamW, fused where torch has it), constant learning rate, clipping at 1.0, no logging
  during the measured steps, a sequential sampler (so both arms see the same batches);
- `forgenb`: the recipe's pieces on the same model: `sdpa_varlen` attention, `PackCollator` (padding-free packing),
  `causal_lm_loss` (chunked cross-entropy), the engine's `Learner` with its default AdamW and a `Recorder`
  logging every 10 steps, as a job has.

Both start from the same random-init model (`torch.manual_seed(0)` before `from_config`) and the same LoRA
initialisation (r=16, alpha=32, dropout 0, the seven attention and MLP projections; seed 1), train the same
batches in the same order, fp32 on CPU and bf16 autocast with a bf16 base on a GPU, batch size `--batch`,
gradient accumulation 1.

Datasets (random token ids, every token trained): `variable` — lengths drawn from a lognormal with median 120
(sigma 0.6), clipped to [16, max_len]; `fixed` — every example `max_len` long.

Per round and dataset both arms start, each runs `--warmup` steps (not timed: allocation, first-call costs and,
with `--compile`, compilation), then they take turns, one timed step each (A B, B A, A B, ...), the other waiting
on a pipe: on a shared machine the speed changes from one second to the next, and turns make both arms see the
same machine. A timed step runs from its turn's start to the end of its optimizer step (device-synchronised), so
data loading and collation count. Reported: real (non-padding) tokens/s over the timed steps, the mean step
time, peak memory (the process's peak RSS on CPU; CUDA max allocated on a GPU), and the largest difference
between the two arms' losses over the first steps. The ratio forgenb/hf is taken per round, and the report gives
its median and min-max over rounds.

On a GPU it also reports MFU: model FLOPs per real token, measured with `torch.utils.flop_counter` on one
forward+backward of a packed batch (LoRA training ≈ 4·N_matmul per token — forward 2N, backward through the
activations 2N, no weight gradients for the frozen base — plus attention's 4·L·d per token per layer
forward for a sequence of length L, twice that backward; the counter counts what really runs), times the arm's
real tokens/s, over (a) the datasheet's dense bf16 peak and (b) a measured ceiling: the best of bf16 8192³
matmuls on this device.
"""
from __future__ import annotations
import argparse, json, os, statistics, tempfile, time
from pathlib import Path
from turns import Timer, machine, peak_mem_gb, report, start, take_turns, turn_fds  # the arms taking turns (bench/turns.py)

ARMS = ('hf', 'forgenb')
LR, WD, CLIP, LORA_R, SEED = 2e-4, 0.01, 1.0, 16, 0
TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']
MODELS = {
    # ~5M matmul parameters: a step of a few hundred ms on one CPU core
    'cpu-small': dict(model_type='llama', hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                      intermediate_size=688, vocab_size=8192, tie_word_embeddings=True),
    'llama-1b': dict(model_type='llama', hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=8192, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True),
    'qwen-0.5b': dict(model_type='qwen2', hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                      intermediate_size=4864, vocab_size=151936, rope_theta=1000000.0, tie_word_embeddings=True),
}
PEAK_BF16_TFLOPS = {'H100': 989.4, 'H200': 989.4, 'H800': 989.4, 'A100': 312., 'A800': 312., 'L40S': 362.1, 'L4': 121.,
                    'A10G': 70., 'A6000': 154.8, 'RTX 4090': 165.2, 'RTX 3090': 71.}
N_LOSSES = 10


# ---------------------------------------------------------------------------------------------------------------
# Data and model: the same in both arms
# ---------------------------------------------------------------------------------------------------------------

def make_data(kind, n, max_len, vocab, seed=0) -> list[dict]:
    "`n` examples of random token ids: lognormal lengths (median 120) or all `max_len`"
    import numpy as np
    rng = np.random.default_rng(seed)
    lens = np.full(n, max_len) if kind == 'fixed' else np.clip(rng.lognormal(np.log(120), 0.6, n).astype(int), 16, max_len)
    return [dict(input_ids=(ids := rng.integers(3, vocab, int(k)).tolist()), labels=ids) for k in lens]

def make_model(name, max_len, cuda):
    "The random-init causal LM `name` with the benchmark's LoRA (seeded: every arm gets the very same weights)"
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from peft import LoraConfig, get_peft_model
    kw = dict(MODELS[name]); mt = kw.pop('model_type')
    cfg = AutoConfig.for_model(mt, max_position_embeddings=max(max_len, 2048), use_cache=False, **kw)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if cuda else torch.float32, attn_implementation='sdpa')
    torch.manual_seed(1)
    return get_peft_model(m, LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=0., target_modules=TARGETS, task_type='CAUSAL_LM'))

def run_hf(a, data, timer):
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments
    from forgenb.test_utils import tiny_tokenizer  # only its pad token; forgenb.test_utils patches nothing
    cuda = torch.cuda.is_available()
    model = make_model(a.model, a.max_len, cuda)
    class Recording(Trainer):
        def compute_loss(self, model, inputs, *args, **kw):
            loss = super().compute_loss(model, inputs, *args, **kw)
            if len(timer.losses) < N_LOSSES: timer.losses.append(loss.detach())
            return loss
    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw): timer.step_done(state.global_step)
    with tempfile.TemporaryDirectory() as d:
        args = TrainingArguments(output_dir=d, per_device_train_batch_size=a.batch, max_steps=a.warmup + a.steps,
                                 learning_rate=LR, weight_decay=WD, lr_scheduler_type='constant', max_grad_norm=CLIP,
                                 logging_steps=10**6, save_strategy='no', report_to=[], seed=SEED, bf16=cuda, use_cpu=not cuda,
                                 dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True,
                                 train_sampling_strategy='sequential')
        tr = Recording(model=model, args=args, train_dataset=data, callbacks=[Clock()],
                       data_collator=DataCollatorForSeq2Seq(tiny_tokenizer(), padding=True, label_pad_token_id=-100))
        tr.train()

def run_forgenb(a, data, timer):
    import torch
    from functools import partial
    from forgenb.callbacks import Recorder
    from forgenb.engine import Callback, Learner, make_dl, make_optimizer
    from forgenb.recipes.llm import causal_lm_loss, make_collator, train_attention
    cuda = torch.cuda.is_available()
    model = make_model(a.model, a.max_len, cuda)
    base = model.get_base_model()
    base.set_attn_implementation(train_attention(base))
    if a.compile: model.compile(dynamic=True)
    class Clock(Callback):
        def after_loss(self):
            if len(timer.losses) < N_LOSSES: timer.losses.append(self.loss)
        def after_step(self): timer.step_done(self.step)
    learn = Learner(model, make_dl(data, a.batch, shuffle=False, collate_fn=make_collator(None, packing=True)),
                    loss_func=causal_lm_loss, opt=partial(make_optimizer, lr=LR, weight_decay=WD),
                    cbs=[Recorder(log_every=10), Clock()], precision='bf16' if cuda else 'fp32', max_grad_norm=CLIP,
                    max_steps=a.warmup + a.steps)
    learn.fit()
    if a.flops: timer.flops_per_token = _flops_per_token(learn, data[:a.batch])

def _flops_per_token(learn, exs) -> float:
    "Model FLOPs of one forward+backward of a packed batch, per real token, as torch's counter counts them"
    from torch.utils.flop_counter import FlopCounterMode
    from forgenb.recipes.llm import PackCollator
    b = {k: v.to(learn.accelerator.device) if hasattr(v, 'to') else v for k, v in PackCollator()(exs).items()}
    with FlopCounterMode(display=False) as fc, learn.accelerator.autocast():
        learn.loss_func(learn.model, b)[0].backward()
    learn.opt.zero_grad()
    return fc.get_total_flops() / b['n_tokens']

def arm_main(a):
    "One arm, one dataset: train, and print one JSON line of measurements"
    import torch
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', 1)))
    n = a.batch * (a.warmup + a.steps)
    data = make_data(a.dataset, n, a.max_len, MODELS[a.model]['vocab_size'])
    if torch.cuda.is_available(): torch.cuda.reset_peak_memory_stats()
    timer = Timer(a.warmup, a.warmup + a.steps, turn_fds(a))
    (run_hf if a.arm == 'hf' else run_forgenb)(a, data, timer)
    dt = sum(timer.dts)
    real = sum(len(e['input_ids']) for e in data[a.batch * a.warmup:])
    out = dict(arm=a.arm, dataset=a.dataset, model=a.model, tokens_per_s=real / dt, step_s=dt / a.steps, real_tokens=real,
               peak_mem_gb=peak_mem_gb(), losses=[float(l) for l in timer.losses],
               flops_per_token=getattr(timer, 'flops_per_token', None))
    print('RESULT ' + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# The driver: rounds of A B, ratios, MFU, the report
# ---------------------------------------------------------------------------------------------------------------

def run_pair(a, dataset, model, flops=False) -> list[dict]:
    "Both arms at once, taking turns step by step"
    def args(arm):
        return (['--arm', arm, '--dataset', dataset, '--model', model, '--batch', a.batch, '--max-len', a.max_len, '--steps', a.steps,
                 '--warmup', a.warmup] + (['--compile'] if a.compile and arm == 'forgenb' else []) + (['--flops'] if flops and arm == 'forgenb' else []))
    return take_turns([start(__file__, args(arm), f'{arm}/{dataset}') for arm in ARMS], a.steps)

def matmul_tflops(n=8192, reps=20) -> float:
    "The best bf16 n³ matmul rate on this GPU, in TFLOP/s: the measured ceiling"
    import torch
    x, y = (torch.randn(n, n, device='cuda', dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3): x @ y
    best = 0.
    for _ in range(reps):
        torch.cuda.synchronize(); t = time.perf_counter(); x @ y; torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e12)
    return best

def _machine() -> dict:
    import transformers, peft
    return machine(transformers, peft)

def _peak_for(gpu_name) -> float|None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu_name), None)

def summarize(rows, models, datasets, ceiling=None, peak=None) -> dict:
    out = {}
    for m in models:
        for ds in datasets:
            rs = [r for r in rows if r['model'] == m and r['dataset'] == ds]
            by = {arm: [r for r in rs if r['arm'] == arm] for arm in ARMS}
            ratios = [f['tokens_per_s'] / h['tokens_per_s'] for h, f in zip(by['hf'], by['forgenb'])]
            mem = [f['peak_mem_gb'] / h['peak_mem_gb'] for h, f in zip(by['hf'], by['forgenb'])]
            dloss = max(max(abs(x - y) for x, y in zip(h['losses'], f['losses'])) for h, f in zip(by['hf'], by['forgenb']))
            s = dict(ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios), mem_ratio=statistics.median(mem),
                     max_loss_diff=dloss, rounds=len(ratios),
                     **{f'{arm}_{k}': statistics.median(r[k] for r in by[arm]) for arm in ARMS for k in ('tokens_per_s', 'step_s', 'peak_mem_gb')})
            fpt = next((r['flops_per_token'] for r in by['forgenb'] if r.get('flops_per_token')), None)
            if fpt:
                s['flops_per_token'] = fpt
                for arm in ARMS:
                    achieved = fpt * s[f'{arm}_tokens_per_s'] / 1e12
                    if peak: s[f'{arm}_mfu_datasheet'] = achieved / peak
                    if ceiling: s[f'{arm}_mfu_measured'] = achieved / ceiling
            out[f'{m}/{ds}'] = s
    return out

def markdown(res) -> str:
    mc, a = res['machine'], res['args']
    where = f"{mc['gpu']} (CUDA)" if 'gpu' in mc else f"{mc['cpu']}, {mc['nproc']} cores, OMP_NUM_THREADS={mc['omp_threads']}"
    lines = [f"Machine: {where}; torch {mc['torch']}, transformers {mc['transformers']}, peft {mc['peft']}; load average before "
             f"{mc['load_before'][0]:.2f}, after {mc['load_after'][0]:.2f}. {res['date']}.", '',
             f"Command: `{res['command']}`", '',
             f"Batch {a['batch']}, max length {a['max_len']}, {a['warmup']} warm-up + {a['steps']} timed steps per arm and round "
             f"(the arms taking turns step by step), {a['rounds']} rounds.", '',
             '| model / data | hf tokens/s | forgenb tokens/s | ratio (median, min–max) | hf step | forgenb step | peak mem hf → forgenb | loss diff (first steps) |',
             '|---|---|---|---|---|---|---|---|']
    for k, s in res['summary'].items():
        lines.append(f"| {k} | {s['hf_tokens_per_s']:,.0f} | {s['forgenb_tokens_per_s']:,.0f} | **{s['ratio']:.2f}×** ({s['ratio_min']:.2f}–{s['ratio_max']:.2f}) "
                     f"| {s['hf_step_s']*1e3:,.0f} ms | {s['forgenb_step_s']*1e3:,.0f} ms | {s['hf_peak_mem_gb']:.2f} → {s['forgenb_peak_mem_gb']:.2f} GB "
                     f"({s['mem_ratio']:.2f}×) | {s['max_loss_diff']:.1e} |")
    if any('flops_per_token' in s for s in res['summary'].values()):
        lines += ['', f"MFU (model FLOPs per real token from torch's counter × real tokens/s; datasheet peak {res.get('peak_tflops')} TFLOP/s, "
                      f"measured bf16 matmul ceiling {res.get('ceiling_tflops', 0):.0f} TFLOP/s):", '',
                  '| model / data | GFLOP/token | hf MFU (datasheet / measured) | forgenb MFU (datasheet / measured) |', '|---|---|---|---|']
        for k, s in res['summary'].items():
            if 'flops_per_token' not in s: continue
            f = lambda arm: f"{s.get(f'{arm}_mfu_datasheet', float('nan')):.1%} / {s.get(f'{arm}_mfu_measured', float('nan')):.1%}"
            lines.append(f"| {k} | {s['flops_per_token']/1e9:.2f} | {f('hf')} | {f('forgenb')} |")
    return '\n'.join(lines) + '\n'

def main(a):
    import torch
    gpu = torch.cuda.is_available()
    if a.gpu and not gpu: raise SystemExit('--gpu: no CUDA device here')
    load_before = os.getloadavg()
    models = a.models.split(',') if a.models else (['llama-1b', 'qwen-0.5b'] if a.gpu else ['cpu-small'])
    datasets = a.datasets.split(',')
    rows = []
    for r in range(a.rounds):
        for m in models:
            for ds in datasets:
                for x in run_pair(a, ds, m, flops=gpu and r == 0):
                    rows.append(x)
                    print(f"round {r} {m}/{ds} {x['arm']}: {x['tokens_per_s']:,.0f} tok/s, {x['step_s']*1e3:.0f} ms/step, "
                          f"{x['peak_mem_gb']:.2f} GB", flush=True)
    ceiling = matmul_tflops() if gpu else None
    peak = a.peak_tflops or (_peak_for(torch.cuda.get_device_name()) if gpu else None)
    report(a.out, 'llm_lora_gpu' if a.gpu else 'llm_lora', _machine(), load_before, markdown, args=vars(a), ceiling_tflops=ceiling,
           peak_tflops=peak, rows=rows, summary=summarize(rows, models, datasets, ceiling, peak))

def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--steps', type=int, default=None, help='timed steps per arm (default 12 on CPU, 30 on GPU)')
    p.add_argument('--warmup', type=int, default=None, help='untimed steps first (default 3 on CPU, 5 on GPU)')
    p.add_argument('--batch', type=int, default=None, help='examples per step (default 8)')
    p.add_argument('--max-len', type=int, default=None, help='max (and fixed) length (default 256 on CPU, 2048 on GPU)')
    p.add_argument('--datasets', default='variable,fixed')
    p.add_argument('--models', default=None, help=f'comma-separated, from {", ".join(MODELS)}')
    p.add_argument('--gpu', action='store_true', help='the GPU configuration: 1B/0.5B shapes, seq 2048, bf16, MFU')
    p.add_argument('--compile', action='store_true', help='torch.compile the forgenb arm (warm-up steps absorb compilation)')
    p.add_argument('--peak-tflops', type=float, default=None, help="the device's dense bf16 peak, if not in the table")
    p.add_argument('--out', default=str(Path(__file__).parent/'results'))
    # one arm in one process (used by the driver)
    p.add_argument('--arm', choices=ARMS); p.add_argument('--dataset'); p.add_argument('--model'); p.add_argument('--flops', action='store_true')
    p.add_argument('--turn-fds', default=None)
    a = p.parse_args(argv)
    gpu = a.gpu or (a.model in ('llama-1b', 'qwen-0.5b'))
    a.steps = a.steps or (30 if gpu else 12)
    a.warmup = a.warmup if a.warmup is not None else (5 if gpu else 3)
    a.batch = a.batch or 8
    a.max_len = a.max_len or (2048 if gpu else 256)
    return a

if __name__ == '__main__':
    a = parse()
    arm_main(a) if a.arm else main(a)
