"""Jobs run as papermill executions of the real job notebook, outside the process that submitted them,
and survive the death of any process involved.

On the tiny Llama and the `sample` dataset (the `tiny-cpu-demo` preset cut to a few steps), on CPU:

- Three jobs submitted from a process whose whole process group is killed with SIGKILL while the first
  job runs (as a terminal's Ctrl-C or a kernel restart would) run in priority, then FIFO order under the
  detached scheduler that submit started, and complete untouched (queued, starting, running, completed:
  no interruption), each with a report notebook, a log, metrics, checkpoints, samples and an adapter;
  the scheduler exits once idle.
- A job killed with SIGKILL (scheduler, papermill and kernel) after its first checkpoint is reconciled
  as `interrupted`, resumable from that checkpoint, by the next reader of the ledger, which auto-resumes
  it and starts a new scheduler that takes over; killed again (the kernel only, the scheduler alive:
  papermill exits 138) it is auto-resumed by the scheduler; it completes with the adapter of an
  uninterrupted run of the same spec (max abs difference <= 1e-5) and exactly one metric row per step
  (the ledger's key (job, name, step) rules out duplicates; the test checks there is no gap).
- stop(save), soft pause / resume and hard pause / resume work through ledger commands on a running
  papermill job: a soft-paused job makes no progress while its heartbeat goes on; a hard pause exits
  and resume continues from the checkpoint's step; stop ends `stopped` with a checkpoint; save_now,
  sample_now (custom prompts) and eval_now are acknowledged with their results. The hard pause, the
  resume and the stop go through the `forgenb` CLI; `forgenb logs -f` follows the running job, and Ctrl-C
  (SIGINT) ends the following with status 130 while the job goes on; started before the stop, it
  returns by itself once the job has settled.
- An invalid spec is refused by submit with the report; a spec that went bad after submit (its model
  folder was removed) fails at validation in the job notebook, with the error list, before training.
- Running the template directly, exactly as documented (`papermill "$(forgenb template)" out.ipynb -p spec
  job.yaml`, in a shell, the workspace from `$FORGENB_HOME`), records a job that completes.
"""
import json, os, shutil, signal, subprocess, sys, tempfile, textwrap, time
from pathlib import Path
import nbformat, psutil, pytest
from safetensors.torch import load_file

import forgenb.jobs as jobs
from forgenb.config import deep_merge, dump_spec
from forgenb.core import InputError, Workspace

ENV = dict(OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', TOKENIZERS_PARALLELISM='false',
           CUDA_VISIBLE_DEVICES='', FORGENB_WORKER_IDLE_EXIT='3', FORGENB_AUTO_RESUME='0', FORGENB_PROGRESS='lines')
ASSETS = Path(tempfile.gettempdir())/'forgenb-test-assets'


def _model() -> Path:
    from forgenb.test_utils import tiny_model_dir
    return tiny_model_dir(ASSETS/'tiny-llama')  # built once, shared by test processes (file lock)


def _kill_job(job):
    "SIGKILL the job's kernel and its papermill parent"
    try: p = psutil.Process(job['pid'])
    except psutil.NoSuchProcess: return
    procs = [p] + [q for q in [p.parent()] if q is not None and any('papermill' in a for a in q.cmdline())]
    for q in procs:
        try: q.kill()
        except psutil.NoSuchProcess: pass
    psutil.wait_procs(procs, timeout=10)


@pytest.fixture
def ws(monkeypatch, tmp_path):
    from forgenb.data.text import import_text
    from forgenb.test_utils import write_sample_dataset
    for k, v in ENV.items(): monkeypatch.setenv(k, v)
    w = Workspace(tmp_path/'ws').ensure()
    import_text(w, write_sample_dataset(tmp_path/'sample.jsonl', fmt='alpaca'), name='sample')
    yield w
    st = jobs.scheduler_status(w)
    if st['running']: os.kill(st['pid'], signal.SIGKILL)
    for j in w.ledger.list_jobs(list(jobs.ACTIVE)):
        if j['pid'] and j['host'] == jobs.HOST: _kill_job(j)


def _spec(ws, steps, **over):
    from forgenb.presets import spec_from_preset
    return spec_from_preset('tiny-cpu-demo', ws, **{'model.base': str(_model()), 'train.max_steps': steps, 'train.warmup': 2,
                            'train.log_every': 1, 'train.eval_every': 0, 'sample.every': 0, 'checkpoint.every': 0,
                            'checkpoint.keep_last': 20, **over})


def _wait(cond, timeout, what, poll=0.1):
    t0 = time.time()
    while not (r := cond()):
        assert time.time() - t0 < timeout, f'timed out after {timeout} s waiting for {what}'
        time.sleep(poll)
    return r


def _job(ws, job_id): return jobs.get_job(ws, job_id)


def _exited(ws, job_id, n=1, timeout=60):
    "Wait until the scheduler has seen the job's papermill process exit `n` times (the report is complete)"
    return _wait(lambda: len(jobs.job_events(ws, job_id, kind='job.exited')) >= n, timeout, 'the job process to exit')


def _report_errors(path):
    nb = nbformat.read(path, as_version=4)
    return [o for c in nb.cells for o in c.get('outputs', []) if o.get('output_type') == 'error']


def test_submitted_jobs_run_in_order_detached_from_the_submitter(ws):
    spec_file = ws.root/'job.yaml'
    dump_spec(_spec(ws, 6, **{'checkpoint.every': 3, 'sample.every': 3}), spec_file)
    code = textwrap.dedent('''
        import sys, time
        from forgenb.jobs import submit
        ids = [submit(sys.argv[1], sys.argv[2], name=n, priority=p, start=n == 'c') for n, p in (('a', 0), ('b', 0), ('c', 5))]
        print(' '.join(ids), flush=True)
        time.sleep(600)''')
    sub = subprocess.Popen([sys.executable, '-c', code, str(ws.root), str(spec_file)], stdout=subprocess.PIPE, text=True,
                           start_new_session=True)
    ids = dict(zip('abc', sub.stdout.readline().split()))
    _wait(lambda: _job(ws, ids['c'])['status'] == 'running', 240, 'the first job to run')
    os.killpg(sub.pid, signal.SIGKILL); sub.wait()  # the submitter and its process group die; its jobs go on
    done = {n: jobs.wait_job(ws, i, timeout=300) for n, i in ids.items()}
    assert {n: j['status'] for n, j in done.items()} == dict(a='completed', b='completed', c='completed'), done
    assert done['c']['started_at'] < done['a']['started_at'] < done['b']['started_at']
    for j in done.values():
        d = ws.run_dir(j['id'])
        _exited(ws, j['id'])
        assert _report_errors(d/'report.ipynb') == []
        assert 'Summary' in (d/'report.ipynb').read_text() and 'step' in (d/'log.txt').read_text()
        assert (d/'adapter'/'adapter_config.json').is_file()
        assert [s for s, _ in jobs.metrics_history(ws, j['id'], ['train/loss'])['train/loss']] == [1, 2, 3, 4, 5, 6]
        assert [c['step'] for c in jobs.job_checkpoints(ws, j['id'])] == [3, 6]
        assert jobs.job_samples(ws, j['id'])
        assert [e['data']['status'] for e in jobs.job_events(ws, j['id'], kind='job.status')] == ['queued', 'starting', 'running', 'completed']
    assert jobs.job_stats(ws)['counts']['completed'] == 3 and jobs.job_stats(ws)['success_rate'] == 1.0
    _wait(lambda: not jobs.scheduler_status(ws)['running'], 30, 'the idle scheduler to exit')


def _pause_resume(ws, job_id, save=False):
    "Soft-pause (and checkpoint) the job at a known step, then resume it: its last stop/pause/resume command is the resume"
    jobs.wait_command(ws, jobs.pause(ws, job_id)['command_id'], timeout=60)
    jobs.wait_job(ws, job_id, until=['paused'], timeout=60)
    if save: jobs.wait_command(ws, jobs.save_now(ws, job_id)['command_id'], timeout=60)
    jobs.wait_command(ws, jobs.resume(ws, job_id)['command_id'], timeout=60)


def test_killed_job_is_reconciled_and_resumes_to_the_same_adapter(ws, monkeypatch):
    spec = _spec(ws, 16, **{'checkpoint.every': 4})
    victim = jobs.submit(ws, spec, name='victim', priority=1, start=False)
    ref = jobs.submit(ws, spec, name='reference')
    # 1. kill everything (the scheduler, papermill and the kernel) after a checkpoint: the next reader of the ledger
    #    reconciles the job as interrupted, auto-resumes it from that checkpoint, and starts a new scheduler
    monkeypatch.setenv('FORGENB_AUTO_RESUME', '3')
    _wait(lambda: _job(ws, victim)['status'] == 'running', 240, 'the job to start')
    _pause_resume(ws, victim, save=True)
    first, old = jobs.job_checkpoints(ws, victim)[-1]['step'], jobs.scheduler_status(ws)['pid']
    os.kill(old, signal.SIGKILL)
    _kill_job(_job(ws, victim))
    def _statuses():  # reading the ledger reconciles the job (once the killed processes are gone)
        return [(e['data']['status'], e['data'].get('reason')) for e in jobs.job_events(ws, victim, kind='job.status')]
    ev = _wait(lambda: (ev := _statuses()) and 'interrupted' in [st for st, _ in ev[:-1]] and ev, 30, 'the job to be reconciled and requeued')
    i = [st for st, _ in ev].index('interrupted')
    (st, died), (st2, again) = ev[i:i + 2]
    assert st == 'interrupted' and died.startswith('the job process died at step') and died.endswith(f'resumable from checkpoint step {first}'), died
    assert (st2, again) == ('queued', f'auto-resume 1/3 from step {first}')
    _wait(lambda: jobs.scheduler_status(ws).get('pid') not in (None, old), 60, 'a new scheduler')
    # 2. the new scheduler runs it on; kill the kernel only, with the scheduler alive: it judges the exit and resumes it
    _wait(lambda: _job(ws, victim)['status'] == 'running', 240, 'the resumed run')
    _pause_resume(ws, victim)
    os.kill(_job(ws, victim)['pid'], signal.SIGKILL)
    # read the ledger without reconciling, so that the scheduler judges the exit
    done = _wait(lambda: (j := ws.ledger.get_job(victim))['status'] in jobs.FINAL and j, 300, 'the job to end')
    assert done['status'] == 'completed', done
    reasons = [e['data'].get('reason', '') for e in jobs.job_events(ws, victim, kind='job.status')]
    i = next(i for i, r in enumerate(reasons) if r.startswith('the kernel died (papermill exit 138)'))
    assert reasons[i + 1].startswith('auto-resume '), reasons
    assert jobs.wait_job(ws, ref, timeout=300)['status'] == 'completed'
    # 3. the same adapter and one metric row per step as the run nobody interrupted
    a, b = (load_file(ws.run_dir(i)/'adapter'/'adapter_model.safetensors') for i in (victim, ref))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    ma, mb = (jobs.metrics_history(ws, i, ['train/loss'], max_points=None)['train/loss'] for i in (victim, ref))
    assert [s for s, _ in ma] == list(range(1, 17)) == [s for s, _ in mb]
    assert ws.ledger.one("SELECT COUNT(*) AS n FROM metrics WHERE job_id = ? AND name = 'train/loss'", victim)['n'] == 16
    assert max(abs(x - y) for (_, x), (_, y) in zip(ma, mb)) <= 1e-5


CLI = 'import sys; from forgenb.cli import main; sys.exit(main())'


def _follow(ws, job_id):
    "`forgenb logs JOB -f` in a process of its own, once it has printed its first line"
    p = subprocess.Popen([sys.executable, '-c', CLI, 'logs', job_id, '-f', '-n', '3', '--home', str(ws.root)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline(), p.communicate()
    return p


def _cli(capsys, ws, *argv) -> str:
    "Run `forgenb ARGV --home WS` here; what it printed (it must succeed)"
    from forgenb.cli import main
    capsys.readouterr()
    code = main([*argv, '--home', str(ws.root)])
    out, err = capsys.readouterr()
    assert code == 0, (argv, out, err)
    return out


def test_stop_and_pauses_through_commands(ws, capsys):
    spec = _spec(ws, 100000, **{'sample.prompts': ['Reverse the letters.\nabc'], 'data.val_split': 0.1})
    jid = jobs.submit(ws, spec, name='control')
    _wait(lambda: _job(ws, jid)['status'] == 'running' and _job(ws, jid)['step'] >= 2, 240, 'the job to run')
    # Ctrl-C ends `forgenb logs -f`, not the job
    f = _follow(ws, jid)
    f.send_signal(signal.SIGINT)
    out, err = f.communicate(timeout=60)
    assert f.returncode == 130 and 'goes on' in err, (f.returncode, err)
    step = _job(ws, jid)['step']
    _wait(lambda: _job(ws, jid)['status'] == 'running' and _job(ws, jid)['step'] > step, 60, 'progress after the Ctrl-C')
    res = jobs.wait_command(ws, jobs.save_now(ws, jid)['command_id'])['result']
    assert Path(res['checkpoint']).is_dir()
    assert jobs.wait_command(ws, jobs.sample_now(ws, jid, ['Reverse the letters.\nxyz'])['command_id'])['result']['n'] == 1
    assert 'Reverse the letters.\nxyz' in [s['prompt'] for s in jobs.job_samples(ws, jid)]
    assert isinstance(jobs.wait_command(ws, jobs.eval_now(ws, jid)['command_id'])['result']['valid_loss'], float)
    # soft pause: no progress, heartbeat goes on
    ack = jobs.wait_command(ws, jobs.pause(ws, jid)['command_id'])
    jobs.wait_job(ws, jid, until=['paused'], timeout=60)
    q = _wait(lambda: (j := _job(ws, jid))['heartbeat_at'] > ack['acked_at'] + 2 and j, 30, 'a heartbeat while paused')
    assert (q['status'], q['step']) == ('paused', ack['result']['step']), 'no progress while paused; the heartbeat goes on'
    assert max(s for s, _ in jobs.metrics_history(ws, jid, ['train/loss'], max_points=None)['train/loss']) <= q['step']
    with pytest.raises(InputError, match='already paused'): jobs.pause(ws, jid, 'hard')
    jobs.resume(ws, jid)
    _wait(lambda: _job(ws, jid)['status'] == 'running' and _job(ws, jid)['step'] > q['step'], 60, 'progress after resume')
    # hard pause: checkpoint, the process exits; resume continues from that step in a new process
    assert 'checkpoint:' in _cli(capsys, ws, 'pause', jid, '--hard')
    h = jobs.wait_job(ws, jid, timeout=60)
    assert (h['status'], h['pid']) == ('paused', None) and h['resume_step'] == h['step'], h
    assert jobs.job_checkpoints(ws, jid)[-1]['step'] == h['step']
    assert json.loads(_cli(capsys, ws, 'resume', jid, '--json')) == dict(job_id=jid, status='queued', resume_step=h['step'])
    _wait(lambda: _job(ws, jid)['status'] == 'running' and _job(ws, jid)['step'] > h['step'], 240, 'the resumed run')
    assert f"resume step {h['step']}" in (ws.run_dir(jid)/'log.txt').read_text()
    requeued = [e['ts'] for e in jobs.job_events(ws, jid, kind='job.status') if e['data']['status'] == 'queued'][-1]
    before = ws.ledger.one('SELECT MAX(ts) AS t FROM metrics WHERE job_id = ? AND step <= ?', jid, h['step'])['t']
    after = ws.ledger.one('SELECT MIN(step) AS s FROM metrics WHERE job_id = ? AND ts > ?', jid, requeued)['s']
    assert before < requeued and after == h['step'] + 1, 'the resumed run went on from the checkpoint, redoing no step'
    # stop with a checkpoint, while `forgenb logs -f` follows the job to its end
    f = _follow(ws, jid)
    assert Path(json.loads(_cli(capsys, ws, 'stop', jid, '--json'))['checkpoint']).is_dir()
    s = jobs.wait_job(ws, jid, timeout=60)
    assert s['status'] == 'stopped', s
    out, err = f.communicate(timeout=60)
    assert f.returncode == 0 and 'step' in out, (f.returncode, out[-2000:], err)
    assert jobs.job_checkpoints(ws, jid)[-1]['step'] == s['step'] and jobs.job_checkpoints(ws, jid)[-1]['kind'] == 'stop'
    with pytest.raises(InputError, match='nothing to stop'): jobs.stop(ws, jid)
    assert (ws.run_dir(jid)/'report.1.ipynb').is_file() and (ws.run_dir(jid)/'report.ipynb').is_file()


def test_invalid_specs_never_train(ws):
    with pytest.raises(InputError, match='nothing was submitted') as e:
        jobs.submit(ws, deep_merge(_spec(ws, 4).model_dump(mode='json'), dict(data=dict(dataset='missing'))), start=False)
    assert [p.path for p in e.value.report.errors] == ['data.dataset']
    assert ws.ledger.list_jobs() == [] and list(ws.runs_dir.iterdir()) == []
    model = Path(shutil.copytree(_model(), ws.root/'models'/'mine'))
    jid = jobs.submit(ws, _spec(ws, 4, **{'model.base': str(model)}))
    shutil.rmtree(model)
    j = jobs.wait_job(ws, jid, timeout=240)
    assert j['status'] == 'failed' and 'model.base' in j['error'] and 'the job did not start' in j['error'], j
    assert j['step'] == 0 and jobs.metrics_history(ws, jid) == {}
    _exited(ws, jid)
    nb = nbformat.read(ws.run_dir(jid)/'report.ipynb', as_version=4)
    ran = {c.id: c.metadata.papermill.status for c in nb.cells if c.cell_type == 'code'}
    assert (ran['open'], ran['spec'], ran['train']) == ('completed', 'failed', 'pending'), ran


def test_running_the_template_directly_records_a_job(ws):
    dump_spec(_spec(ws, 3), ws.root/'job.yaml')
    env = dict(os.environ, FORGENB_HOME=str(ws.root), PATH=f'{Path(sys.executable).parent}{os.pathsep}{os.environ["PATH"]}')
    r = subprocess.run(['bash', '-c', 'papermill "$(forgenb template)" out.ipynb -p spec job.yaml'], cwd=ws.root, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    [j] = jobs.list_jobs(ws)
    assert (j['status'], j['step']) == ('completed', 3)
    assert _report_errors(ws.root/'out.ipynb') == []
