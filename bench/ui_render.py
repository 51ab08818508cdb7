"""How long the notebook UI keeps the kernel busy to draw big workspaces: the Jobs tab with 200 jobs, a job page with 100,000 points.

    python bench/ui_render.py [--rounds R] [--out bench/results]

A benchmark, not a test: it asserts nothing; it writes `<out>/ui_render.json` (every number) and
`<out>/ui_render.md` (the table for the README), with the machine it ran on. The target (issue 6) is under 2 s
of kernel time for each.

Cases, each built in a fresh temporary workspace:

- `jobs-200`: `JobsPanel` over 200 jobs (all statuses; 20 running, each with a `train/step_time` for its ETA);
- `view-100k-loss`: `attach` to a job with 100,000 steps of `train/loss` (the other metrics every 10 steps);
- `view-100k-all`: `attach` to a job with 100,000 steps of every metric the page draws (7 series, 700,000 rows);
- `...-live`: the same with `attach(job_id)` as a user calls it (live): the kernel only builds the widgets and
  the poller thread reads the history; "drawn after" is when the loss chart holds its points;
- `view-tick`: one live update of that page after 10 new steps arrived (what the poller does twice a second).

"Kernel time" is the wall time of the call on the kernel's thread: building the panel reads the ledger, builds
the series (smoothing every point), downsamples them, creates the widgets and serializes their state (outside
a kernel ipywidgets sends to a no-op comm, so serialization is counted, the network is not; the browser's own
drawing is not counted either — the browser test sees it). CPU time of the process is reported beside it.
Each case runs `--rounds` times; the table gives the median and the max.
"""
import argparse, json, os, platform, statistics, sys, tempfile, time
from pathlib import Path

os.environ.setdefault('HF_HUB_OFFLINE', '1')


def _ws():
    import forgenb.ledger  # noqa: F401
    from forgenb.core import Workspace
    return Workspace(tempfile.mkdtemp(prefix='forgenb-bench-ui-')).ensure()


SPEC = dict(name='bench', model=dict(base='/nonexistent/model'), data=dict(dataset='sample'), train=dict(max_steps=100_000))
STATUSES = ('queued', 'running', 'paused', 'completed', 'stopped', 'failed', 'interrupted', 'completed', 'completed', 'running')


def setup_jobs(n=200):
    ws = _ws(); led = ws.ledger
    for i in range(n):
        st = STATUSES[i % len(STATUSES)]
        led.add_job(f'job-{i:04d}', SPEC, name=f'bench {i}', status=st, n_step=1000)
        led.update_job(f'job-{i:04d}', step=i * 5 % 1000, pid=os.getpid() if st == 'running' else None, host=platform.node(), heartbeat_at=time.time())
        if st == 'running': led.add_metrics(f'job-{i:04d}', [(s, 'train/step_time', 0.1) for s in range(0, 500, 10)])
    return ws


ALL = ('train/loss', 'valid/loss', 'train/lr', 'train/grad_norm', 'train/tokens_per_s', 'train/mem_gb', 'train/step_time')


def setup_view(n=100_000, every_metric=False):
    import math, random
    ws = _ws(); led = ws.ledger; rng = random.Random(0)
    led.add_job('big', SPEC, name='big', status='running', n_step=2 * n)
    led.update_job('big', step=n - 1, pid=os.getpid(), host=platform.node(), heartbeat_at=time.time())
    rows = [(s, 'train/loss', 2 * math.exp(-s / n * 3) + rng.random() * 0.1) for s in range(n)]
    rows += [(s, 'valid/loss', 2 * math.exp(-s / n * 3)) for s in range(0, n, 1000)]
    others = [m for m in ALL if m not in ('train/loss', 'valid/loss')]
    rows += [(s, m, rng.random()) for s in range(0, n, 1 if every_metric else 10) for m in others]
    for i in range(0, len(rows), 50_000): led.add_metrics('big', rows[i:i + 50_000])
    return ws, len(rows)


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def machine() -> dict:
    cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), platform.processor()) if Path('/proc/cpuinfo').exists() else platform.processor()
    import bqplot, ipywidgets
    return dict(cpu=cpu, cores=os.cpu_count(), python=platform.python_version(), system=platform.platform(), load_avg=os.getloadavg(),
                ipywidgets=ipywidgets.__version__, bqplot=bqplot.__version__, when=time.strftime('%Y-%m-%d %H:%M:%S %Z'))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--rounds', type=int, default=5); p.add_argument('--out', default=str(Path(__file__).parent/'results'))
    a = p.parse_args(argv)
    from forgenb.ui.panels import JobsPanel, attach
    res = {}
    ws = setup_jobs()
    res['jobs-200'] = [timed(lambda: JobsPanel(ws, live=False)) for _ in range(a.rounds)]
    res['jobs-200'] = [dict(wall=w, cpu=c, rows=len(o.rows())) for o, w, c in res['jobs-200']]
    for case, every in (('view-100k-loss', False), ('view-100k-all', True)):
        ws, n_rows = setup_view(every_metric=every)
        runs, live = [], []
        for _ in range(a.rounds):
            v, w, c = timed(lambda: attach('big', ws, live=False))
            runs.append(dict(wall=w, cpu=c, ledger_rows=n_rows, points_drawn=sum(sum(d.values()) for d in v.points().values()),
                             series_points=len(v.charts['loss'].series['train/loss'])))
            lv, w, c = timed(lambda: attach('big', ws))
            t0 = time.perf_counter()
            while not (lv.loaded and lv.points()['loss']['train/loss']): time.sleep(0.01)
            live.append(dict(wall=w, cpu=c, ready=w + time.perf_counter() - t0)); lv.close()
        res[case], res[case + '-live'] = runs, live
    ticks, led = [], ws.ledger
    for i in range(a.rounds):
        s0 = 100_000 + i * 10
        led.add_metrics('big', [(s, m, 0.5) for s in range(s0, s0 + 10) for m in ALL])
        v.charts['loss']._throttle.last = -1e9  # measure a tick that draws, not one the throttle skips
        _, w, c = timed(v.tick); ticks.append(dict(wall=w, cpu=c))
    res['view-tick'] = ticks
    out = dict(machine=machine(), rounds=a.rounds, results=res)
    d = Path(a.out); d.mkdir(parents=True, exist_ok=True)
    (d/'ui_render.json').write_text(json.dumps(out, indent=1))
    md = ['| case | kernel time, median (max) | CPU time, median | what |', '|---|---|---|---|']
    what = {'jobs-200': '200 jobs in the table', 'view-100k-loss': '`attach(job_id, live=False)`: 100,000 loss points (+ 6 series every 10 steps), all read on the kernel thread',
            'view-100k-all': '7 series x 100,000 steps', 'view-tick': 'one live update, 10 new steps x 7 series'}
    what |= {k + '-live': f"the same, `attach(job_id)` live: the history is read by the poller thread; drawn after {{ready}}" for k in ('view-100k-loss', 'view-100k-all')}
    for k, runs in res.items():
        ws_ = [r['wall'] for r in runs]; cs = [r['cpu'] for r in runs]
        ready = f"{statistics.median(r['ready'] for r in runs):.2f} s (median)" if 'ready' in runs[0] else ''
        md.append(f'| `{k}` | {statistics.median(ws_):.3f} s ({max(ws_):.3f} s) | {statistics.median(cs):.3f} s | {what[k].format(ready=ready)} |')
    m = out['machine']
    md.append(f"\nMachine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, ipywidgets {m['ipywidgets']}, bqplot {m['bqplot']}; "
              f"load average at the end {', '.join(f'{x:.1f}' for x in m['load_avg'])}; {m['when']}.")
    (d/'ui_render.md').write_text('\n'.join(md) + '\n')
    print('\n'.join(md))
    return 0


if __name__ == '__main__': sys.exit(main())
