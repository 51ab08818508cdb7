"""What the side-by-side benchmarks share: arms in their own processes that take turns step by step.

The driver starts one process per arm with a pair of pipes; each arm warms up, then says "done" after each step and
waits for "go" before the next, so the driver can let the arms step in turn (A B, B A, ...) and both see the same
machine. An arm prints one line `RESULT <json>` at the end. Used by `llm_lora.py` and `diffusion_lora.py`.
"""
from __future__ import annotations
import json, os, platform, resource, subprocess, sys, time
from pathlib import Path

def sync():
    "Wait for the GPU, when there is one, so a step's time is its real time"
    import torch
    if torch.cuda.is_available(): torch.cuda.synchronize()

def peak_mem_gb() -> float:
    "Peak memory of this process: CUDA max allocated on a GPU, else peak RSS"
    import torch
    if torch.cuda.is_available(): return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

def rss_gb() -> float:
    "The process's resident memory now"
    return int(Path('/proc/self/statm').read_text().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**30

class Timer:
    """Times each step after the warm-up (wall and CPU time), taking turns with the other arm; keeps the first losses.

    With `fds` (two pipe ends from the driver), after each step from the warm-up's last on, the arm says "done"
    and waits for "go" before the next. A timed step runs from "go" to the end of the step: its data loading counts."""
    def __init__(self, warmup, total, fds=None):
        self.warmup, self.total, self.fds, self.t0, self.c0, self.dts, self.cpu_dts, self.losses = warmup, total, fds, None, None, [], [], []
    def step_done(self, step):
        if step < self.warmup: return
        sync()
        if self.t0 is not None: self.dts.append(time.perf_counter() - self.t0); self.cpu_dts.append(time.process_time() - self.c0)
        if self.fds: os.write(self.fds[1], b'd')
        if step == self.total: return
        if self.fds: os.read(self.fds[0], 1)
        self.t0, self.c0 = time.perf_counter(), time.process_time()

def turn_fds(a):
    "The pipe ends an arm got from the driver (`--turn-fds`), or None when it runs alone"
    return tuple(map(int, a.turn_fds.split(','))) if a.turn_fds else None

def start(script, args:list, label:str) -> dict:
    "Start `python script *args` as one arm, with the pipes to take turns with the driver"
    go_r, go_w = os.pipe(); done_r, done_w = os.pipe()
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'TOKENIZERS_PARALLELISM': 'false'}
    p = subprocess.Popen([sys.executable, str(script), *map(str, args), '--turn-fds', f'{go_r},{done_w}'],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, pass_fds=(go_r, done_w))
    os.close(go_r); os.close(done_w)
    return dict(p=p, go=go_w, done=done_r, label=label)

def _wait_done(x):
    if not os.read(x['done'], 1): raise SystemExit(f"{x['label']} died:\n{x['p'].communicate()[1][-4000:]}")

def _finish(x) -> dict:
    out, err = x['p'].communicate()
    line = [l for l in out.splitlines() if l.startswith('RESULT ')]
    if x['p'].returncode or not line: raise SystemExit(f"{x['label']} failed ({x['p'].returncode}):\n{err[-4000:]}")
    return json.loads(line[-1][7:])

def take_turns(xs:list, steps:int) -> list[dict]:
    "Arms `xs` (from `start`) warm up, then take one step each in turn (A B, B A, ...); their results"
    for x in xs: _wait_done(x)  # warmed up
    for i in range(steps):
        for x in (xs if i % 2 == 0 else xs[::-1]):
            os.write(x['go'], b'g'); _wait_done(x)
    return [_finish(x) for x in xs]

def machine(*modules) -> dict:
    "The machine and the versions of `modules` (imported modules), for the report"
    import torch
    cpu = next((l.split(':', 1)[1].strip() for l in Path('/proc/cpuinfo').read_text().splitlines() if l.startswith('model name')), platform.processor())
    m = dict(host=platform.node(), nproc=os.cpu_count(), cpu=cpu, omp_threads=os.environ.get('OMP_NUM_THREADS'),
             python=platform.python_version(), torch=torch.__version__, **{mod.__name__: mod.__version__ for mod in modules},
             load_after=os.getloadavg())
    if torch.cuda.is_available(): m['gpu'] = torch.cuda.get_device_name()
    return m

def report(out, stem:str, mach:dict, load_before, markdown, **fields) -> dict:
    """The run's result (date, command, `mach` with the load average before, `fields`), written as `<stem>.json` and
    `<stem>.md` (by `markdown(result)`) in folder `out`, and printed"""
    from datetime import datetime, timezone
    res = dict(date=datetime.now(timezone.utc).isoformat(timespec='seconds'), command=' '.join(['python'] + sys.argv),
               machine=dict(mach, load_before=load_before), **fields)
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    (out/f'{stem}.json').write_text(json.dumps(res, indent=1))
    (out/f'{stem}.md').write_text(markdown(res))
    print(markdown(res))
    return res
