"""The engine's overhead: forgenb's `Learner` against a bare PyTorch loop, same tiny LoRA model, same data, same maths.

    python bench/engine_overhead.py [--steps N] [--rounds R] [--out bench/results]

A benchmark, not a test: it asserts nothing; it writes `<out>/engine_overhead.json` (every number) and
`<out>/engine_overhead.md` (the table for the README), with the machine it ran on.

The arms train the same causal LM (`forgenb.test_utils.tiny_model('llama')`, and a bigger variant) wrapped with
peft LoRA (r=8 on q/k/v/o), on the same fixed random token batches, with AdamW, a cosine schedule and gradient
clipping, from the same seed (fp32 on CPU, bf16 autocast on CUDA):

- `bare`: a PyTorch loop doing the same operations by hand (forward with labels, backward, clip, step,
  scheduler step, zero_grad) over a plain `DataLoader`;
- `bare-again`: the same loop in another process, an A/A control: its "overhead" is the benchmark's noise;
- `learner`: `forgenb.engine.Learner` with no callbacks;
- `learner+cbs`: the `Learner` with the callbacks of a real job: `Recorder(log_every=10)` sending its rows to a
  `LedgerSink` on a temporary workspace's ledger, `ControlCallback` polling that ledger for commands (and
  writing heartbeats), `ProgressCallback(mode='off')`.

Each round starts one process per arm, so nothing (allocator, caches, accelerate's process-wide state, threads)
leaks from one arm to another; they are forked from a server that has only imported the libraries
(multiprocessing's forkserver), which spares each one seconds of imports. The arms then take turns, one step
each (`--chunk`), in a fresh random order each time around, the others waiting on a pipe: on a shared machine
the speed changes from one second to the next, and taking turns this often makes every arm see the same
machine. A step is timed from one forward's start to the next's by a `loss_func` wrapper every arm uses;
waiting for a turn is left out; warm-up steps are dropped.

Per size and arm the report gives the median step time; the overhead against `bare` as the median over rounds
of the per-round ratio of median step times, with its min-max over rounds; the same ratio taken over the pairs
of turns instead (each step of an arm against the `bare` step of the same turn, median over every pair of
every round: finer, as it cancels changes of speed within a round); the CPU time per step (all threads of the
process, so the sink's flushes and the heartbeats count); and the largest difference between the arm's losses
of the first steps and `bare`'s (same seed, data and operations: they must agree).
"""
from __future__ import annotations
import argparse, json, os, platform, random, statistics, tempfile, time, warnings
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

ARMS = ('bare', 'bare-again', 'learner', 'learner+cbs')
LABELS = {'bare': 'bare PyTorch loop', 'bare-again': 'the same, another process (A/A: noise)', 'learner': '`Learner`',
          'learner+cbs': '`Learner` + Recorder→LedgerSink, Control, Progress'}
# `tiny` is `tiny_model`'s own config (~100k parameters): its step is mostly Python and framework dispatch, the
# worst case for a loop's overhead. `small` (~2.5M) does more arithmetic per step, closer to a real run. A small
# step costs ~5x a tiny one, so it runs a quarter of the steps.
SIZES = dict(tiny=dict(overrides={}, step_frac=1.),
             small=dict(overrides=dict(hidden_size=256, num_hidden_layers=4, intermediate_size=512), step_frac=.25))
BATCH, SEQ, LR, WD, CLIP, LORA_R = 4, 64, 1e-3, 0.01, 1.0, 8
PRELOAD = ['torch', 'transformers', 'peft', 'accelerate', 'forgenb.engine', 'forgenb.callbacks', 'forgenb.ledger', 'forgenb.test_utils']


# ---------------------------------------------------------------------------------------------------------------
# An arm: one process, every size
# ---------------------------------------------------------------------------------------------------------------

def _rows(n, vocab, seed=0):
    "`n` fixed random token rows (a private generator: every arm gets the very same data)"
    import torch
    ids = torch.randint(0, vocab, (n, SEQ), generator=torch.Generator().manual_seed(seed))
    return [dict(input_ids=r, labels=r) for r in ids]

def _model(size, tok, device):
    "The tiny LM of `size` with fresh LoRA adapters; the adapters' init draws from the seeded global stream"
    from peft import LoraConfig, get_peft_model
    from forgenb.engine import set_seed
    from forgenb.test_utils import tiny_model
    set_seed(0)
    m = tiny_model('llama', tok, seed=0, **SIZES[size]['overrides'])
    cfg = LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=0., target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj'])
    return get_peft_model(m, cfg).to(device)

class _Clock:
    "The `loss_func` of every arm: stamps wall and CPU time at each forward's start, and takes turns with the other arms"
    def __init__(self, conn, warmup, chunk, n, cuda):
        self.conn, self.warmup, self.chunk, self.n, self.cuda = conn, warmup, chunk, n, cuda
        self.pre, self.start, self.losses = [], [], []  # per call: (wall, cpu) before waiting for our turn, and after
    def _stamp(self):
        if self.cuda:
            import torch; torch.cuda.synchronize()  # time steps, not kernel launches
        return time.perf_counter(), time.process_time()
    def __call__(self, model, batch):
        i, t = len(self.start), self._stamp()
        self.pre.append(t)
        if i == self.n - 1 or (i >= self.warmup and (i - self.warmup) % self.chunk == 0):
            self.conn.send('last' if i == self.n - 1 else 'turn'); self.conn.recv()  # hand over, wait for our next turn
            t = self._stamp()
        self.start.append(t)
        loss = model(**batch).loss
        self.losses.append(loss.detach())
        return loss
    def steps(self):
        "(wall, cpu) seconds of each measured step: from its forward's start to the next's, turns taken out"
        return [(self.pre[i + 1][0] - self.start[i][0], self.pre[i + 1][1] - self.start[i][1]) for i in range(self.warmup, self.n - 1)]

def _sched(opt, n_steps):
    from transformers import get_scheduler
    return get_scheduler('cosine', opt, num_warmup_steps=10, num_training_steps=n_steps)

def _bare(model, rows, clock, n_steps, cuda):
    "The loop a user would write by hand: same data order, optimizer, schedule, clipping"
    import torch
    from torch.utils.data import DataLoader
    dev = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD, fused=cuda or None, foreach=not cuda or None)
    sched = _sched(opt, n_steps)
    model.train()
    for batch in DataLoader(rows, batch_size=BATCH, shuffle=False):
        batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
        with torch.autocast('cuda', torch.bfloat16, enabled=cuda):
            loss = clock(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step(); sched.step(); opt.zero_grad()

def _real_cbs(ws_dir):
    "The callbacks of a real job, on a fresh workspace's ledger"
    import forgenb.ledger  # noqa: F401  (adds Workspace.ledger)
    from forgenb.callbacks import ControlCallback, LedgerSink, ProgressCallback, Recorder
    from forgenb.core import Workspace
    ledger = Workspace(ws_dir).ensure().ledger
    ledger.add_job('bench', spec={})
    return [Recorder(log_every=10, sink=LedgerSink(ledger, 'bench')), ControlCallback(ledger, 'bench'), ProgressCallback(mode='off')]

def _learner(model, rows, clock, n_steps, cuda, cbs):
    from forgenb.engine import Learner, make_dl, make_optimizer
    learn = Learner(model, make_dl(rows, BATCH, shuffle=False), loss_func=clock, opt=partial(make_optimizer, lr=LR, weight_decay=WD),
                    sched=partial(_sched, n_steps=n_steps), cbs=cbs, precision='bf16' if cuda else 'fp32',
                    max_grad_norm=CLIP, max_steps=n_steps)
    learn.fit()

def _steps(size, steps): return max(int(steps * SIZES[size]['step_frac']), 10)
def _chunk(size, chunk): return max(round(chunk * SIZES[size]['step_frac']), 1)

def worker(conn, arm, sizes, steps, warmup, chunk, n_losses, threads):
    "Train every size with `arm`, taking turns with the other arms through `conn`; send each size's results"
    import torch
    from forgenb.test_utils import tiny_tokenizer
    torch.set_num_threads(threads)
    warnings.filterwarnings('ignore')
    cuda = torch.cuda.is_available()
    tok = tiny_tokenizer()
    for size in sizes:
        n = warmup + _steps(size, steps) + 1  # +1: a step's time ends where the next forward starts
        model, rows = _model(size, tok, 'cuda' if cuda else 'cpu'), _rows(n * BATCH, len(tok))
        clock = _Clock(conn, warmup, _chunk(size, chunk), n, cuda)
        with tempfile.TemporaryDirectory() as ws:
            if arm.startswith('bare'): _bare(model, rows, clock, n, cuda)
            else: _learner(model, rows, clock, n, cuda, _real_cbs(ws) if arm == 'learner+cbs' else None)
        assert len(clock.start) == n, (arm, size, len(clock.start), n)
        st = clock.steps()
        conn.send(dict(step_s=[round(w, 7) for w, _ in st], cpu_s=[round(c, 7) for _, c in st],
                       losses=[l.item() for l in clock.losses[:n_losses]], threads=torch.get_num_threads(), cuda=cuda,
                       params=sum(p.numel() for p in model.parameters()),
                       trainable=sum(p.numel() for p in model.parameters() if p.requires_grad)))


# ---------------------------------------------------------------------------------------------------------------
# Driver: rounds of turns, summary, report
# ---------------------------------------------------------------------------------------------------------------

def _busy_s():
    "CPU seconds every process of this machine has used so far (from /proc/stat)"
    with open('/proc/stat') as f: fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf('SC_CLK_TCK')  # all but idle and iowait

def _own_cpu_s(procs):
    import psutil
    return sum(sum(psutil.Process(p.pid).cpu_times()[:2]) for p in procs if p.is_alive())

def _recv(conn, proc):
    "The next message from an arm; an error if its process died"
    while not conn.poll(1.):
        if not proc.is_alive(): raise RuntimeError(f'an arm died (exit code {proc.exitcode})')
    return conn.recv()

def _take_turns(conns, procs, seed=0):
    "Give each arm a turn, in a fresh random order each time around, until every arm has measured its last step"
    arms, last, rng = list(conns), set(), random.Random(seed)
    while len(last) < len(arms):
        for a in rng.sample(arms, len(arms)):  # no arm always goes first, or always follows the same one
            if a in last: continue
            conns[a].send('go')
            if _recv(conns[a], procs[a]) == 'last': last.add(a)

def run_round(ctx, args, seed=0) -> dict:
    "One round: a fresh process per arm, every size, the arms taking turns"
    conns, procs = {}, {}
    for arm in ARMS:
        conns[arm], child = ctx.Pipe()
        procs[arm] = ctx.Process(target=worker, args=(child, arm, args.sizes, args.steps, args.warmup, args.chunk, args.losses, args.threads))
        procs[arm].start()
    res = {arm: {} for arm in ARMS}
    for size in args.sizes:
        for arm in ARMS: assert _recv(conns[arm], procs[arm]) == 'turn'  # built and warmed up: waiting for its first turn
        busy0, own0, t0 = _busy_s(), _own_cpu_s(procs.values()), time.perf_counter()
        _take_turns(conns, procs, seed)
        busy1, own1, wall = _busy_s(), _own_cpu_s(procs.values()), time.perf_counter() - t0
        for arm in ARMS: conns[arm].send('go')  # finish the fit, unmeasured
        for arm in ARMS: res[arm][size] = dict(_recv(conns[arm], procs[arm]), wall_s=wall,
                                               others_cores=max(busy1 - busy0 - (own1 - own0), 0.) / wall)
    for p in procs.values():
        p.join()
        if p.exitcode: raise RuntimeError(f'an arm failed (exit code {p.exitcode})')
    return res

def _cpu_model():
    try:
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'): return line.split(':', 1)[1].strip()
    except OSError: pass
    return platform.processor() or platform.machine()

def machine(threads) -> dict:
    "What the numbers were measured on"
    import torch
    from importlib import metadata
    m = dict(cpu=_cpu_model(), cores=os.cpu_count(), cores_usable=len(os.sched_getaffinity(0)), torch_threads=threads,
             gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, python=platform.python_version(),
             os=platform.platform(), date=datetime.now(timezone.utc).isoformat(timespec='seconds'))
    for pkg in ('torch', 'transformers', 'peft', 'accelerate', 'forgenb'): m[pkg] = metadata.version(pkg)
    return m

def _med(xs): return statistics.median(xs)
def _pct(r): return (r - 1) * 100
def _chunks(xs, k): return [_med(xs[i:i + k]) for i in range(0, len(xs), k)]

def _vs_bare(runs, base, chunk) -> dict:
    "Overhead of `runs` (one per round) against `base` (the same rounds' `bare`)"
    ratio = [_med(r['step_s']) / _med(b['step_s']) for r, b in zip(runs, base)]
    pairs = [x / y for r, b in zip(runs, base) for x, y in zip(_chunks(r['step_s'], chunk), _chunks(b['step_s'], chunk))]
    cpu = [_med(r['cpu_s']) / _med(b['cpu_s']) for r, b in zip(runs, base)]
    return dict(overhead_pct=_pct(_med(ratio)), overhead_pct_min=_pct(min(ratio)), overhead_pct_max=_pct(max(ratio)),
                overhead_us=_med([(_med(r['step_s']) - _med(b['step_s'])) * 1e6 for r, b in zip(runs, base)]),
                paired_overhead_pct=_pct(_med(pairs)), n_pairs=len(pairs), cpu_overhead_pct=_pct(_med(cpu)),
                loss_max_diff=max(max(abs(x - y) for x, y in zip(r['losses'], b['losses'])) for r, b in zip(runs, base)))

def summarize(rounds, args) -> dict:
    "Per size and arm: median step time; overhead against `bare` per round and per pair of turns"
    out = {}
    for size in args.sizes:
        per = {arm: [r[arm][size] for r in rounds] for arm in ARMS}
        b = per['bare'][0]
        s = out[size] = dict(params=b['params'], trainable=b['trainable'], measured_steps=len(b['step_s']), arms={},
                             others_cores=[r['bare'][size]['others_cores'] for r in rounds])
        for arm in ARMS:
            meds = [_med(x['step_s']) * 1e3 for x in per[arm]]
            a = s['arms'][arm] = dict(step_ms=_med(meds), step_ms_rounds=meds, cpu_ms=_med([_med(x['cpu_s']) * 1e3 for x in per[arm]]))
            if arm != 'bare': a.update(_vs_bare(per[arm], per['bare'], _chunk(size, args.chunk)))
    return out

def markdown(res) -> str:
    "The README table"
    m, cfg = res['machine'], res['config']
    lines = ['| model | loop | step, ms (median) | overhead: per round, median (min…max) | overhead: per turn, median | '
             f"CPU time/step | max \\|Δloss\\|, first {cfg['losses']} steps |", '|---|---|---:|---:|---:|---:|---:|']
    for size, s in res['summary'].items():
        name = f"{size}: {s['params'] / 1e6:.2f}M params, {s['trainable'] / 1e3:.0f}k LoRA; {s['measured_steps']} steps × {cfg['rounds']} rounds"
        for arm, a in s['arms'].items():
            if arm == 'bare': lines.append(f"| {name} | {LABELS[arm]} | {a['step_ms']:.2f} | | | {a['cpu_ms']:.2f} ms | |"); continue
            lines.append(f"| | {LABELS[arm]} | {a['step_ms']:.2f} | {a['overhead_pct']:+.1f}% ({a['overhead_pct_min']:+.1f}…{a['overhead_pct_max']:+.1f}), "
                         f"{a['overhead_us']:+.0f} µs | {a['paired_overhead_pct']:+.1f}% | {a['cpu_overhead_pct']:+.1f}% | {a['loss_max_diff']:.1e} |")
    load = [x for s in res['summary'].values() for x in s['others_cores']]
    first = next(iter(res['summary']))
    bare = res['summary'][first]['arms']['bare']['step_ms_rounds']
    dev = m['gpu'] or f"{m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch thread{'s' if m['torch_threads'] > 1 else ''})"
    lines += ['', f"{dev}; torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, accelerate {m['accelerate']}; "
              f"{'bf16' if m['gpu'] else 'fp32'}, batches of {cfg['batch']}×{cfg['seq']} tokens, AdamW + cosine + clipping, LoRA r={LORA_R} "
              f"on q/k/v/o; arms taking turns every {cfg['chunk']} step(s); {m['date'][:10]}. Other processes on this machine used "
              f"{statistics.fmean(load):.1f} cores on average ({min(load):.1f}–{max(load):.1f}) while the arms ran; the {first} model's bare "
              f"step took {min(bare):.1f}–{max(bare):.1f} ms from round to round."]
    return '\n'.join(lines) + '\n'

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--steps', type=int, default=250, help='measured steps per arm and round for the tiny model (small: a quarter)')
    p.add_argument('--rounds', type=int, default=5, help='rounds, each with a fresh process per arm')
    p.add_argument('--warmup', type=int, default=10, help='steps dropped at the start of each run')
    p.add_argument('--chunk', type=int, default=1, help='steps per turn (small: a quarter, at least 1)')
    p.add_argument('--sizes', default='tiny,small', help=f"comma-separated, of {', '.join(SIZES)}")
    p.add_argument('--threads', type=int, default=int(os.environ.get('OMP_NUM_THREADS', 1)), help='torch threads (default $OMP_NUM_THREADS or 1)')
    p.add_argument('--losses', type=int, default=20, help='first steps whose losses are compared with bare')
    p.add_argument('--out', default=str(Path(__file__).parent/'results'))
    args = p.parse_args(argv)
    args.sizes = [s for s in args.sizes.split(',') if s]
    if bad := [s for s in args.sizes if s not in SIZES]: p.error(f"unknown size(s) {bad}: use {', '.join(SIZES)}")
    import multiprocessing as mp
    os.environ.update(HF_HUB_OFFLINE='1', TOKENIZERS_PARALLELISM='false')  # the arms inherit it
    ctx = mp.get_context('forkserver')
    ctx.set_forkserver_preload(PRELOAD)
    rounds, t0 = [], time.perf_counter()
    for r in range(args.rounds):
        rounds.append(run_round(ctx, args, seed=r))
        for size in args.sizes:
            meds = ', '.join(f"{arm} {_med(rounds[-1][arm][size]['step_s']) * 1e3:.2f}" for arm in ARMS)
            print(f"round {r + 1}/{args.rounds} {size:<5} ms/step: {meds}  (other processes: {rounds[-1]['bare'][size]['others_cores']:.1f} cores)", flush=True)
    res = dict(machine=machine(args.threads),
               config=dict(steps=args.steps, rounds=args.rounds, warmup=args.warmup, chunk=args.chunk, sizes=args.sizes, losses=args.losses,
                           batch=BATCH, seq=SEQ, lr=LR, weight_decay=WD, clip=CLIP, lora_r=LORA_R,
                           size_overrides={s: SIZES[s]['overrides'] for s in args.sizes}),
               summary=summarize(rounds, args), rounds=rounds, total_s=time.perf_counter() - t0)
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    (out/'engine_overhead.json').write_text(json.dumps(res, indent=1))
    (out/'engine_overhead.md').write_text(md := markdown(res))
    print(f"\n{md}\nwritten to {out}/engine_overhead.json and .md in {res['total_s']:.0f} s")

if __name__ == '__main__': main()
