"""The HTTP API drives whole jobs through a real Jupyter server, authenticated by Jupyter's own token.

One `jupyter server` process per module (loopback, a free port, a random token, FORGENB_HOME in a temporary
folder, CPU only), with the extension enabled only by the shipped config file
`jupyter-config/jupyter_server_config.d/forgenb.json` (put on JUPYTER_CONFIG_PATH), serves /forgenb/api/v1.
Through `forgenb.client.Client`:

- a dataset uploaded as multipart is imported, listed and shown with stats and a preview; uploading the same
  file again is idempotent, different content under that name is 409, a malformed file is 422 naming the
  uploaded file and line, and leaves no dataset;
- a spec validates (200, ok); a spec with errors is refused at create with 422 and the validation report;
- a tiny CPU job (preset tiny-cpu-demo cut to 6 steps) is followed on the live stream to `end`: status
  changes, one metrics message per logged step, samples; a stream broken off after its first metrics and
  resumed with the last cursor (Last-Event-ID) continues with exactly the steps not yet seen;
- the adapter and a checkpoint come as tar archives named by Content-Disposition whose files equal the run
  folder's byte for byte; a sample and a run file download as themselves;
- commands on the finished job are 409, deleting a job whose process runs is 409, unknown ids 404,
  malformed JSON 400 with its position;
- completed jobs are model versions: the job registered itself, a second completed job (a copy of the first,
  recorded in the ledger) registers through the API as the next version, activating it makes the first
  `previous`, rollback swaps them back, and a version downloads as its adapter;
- a version exports as a merged model (201 with its manifest; again without overwrite is 409) that downloads
  as a tar whose weights equal the export's; an export not made yet is 404.
- the image jobs' latent cache is listed (least recently used first, with its usage), cleared by dataset, key,
  age and orphaned dataset — an entry a process holds is never removed and is reported under `in_use` — and
  capped (bytes, a size string, none; the cap evicts nothing in use); a bad filter or size is 422 naming the
  field and touches nothing, and without the token every cache route is 401.

`jupyter_api` starts such a server; tests/test_server_security.py (authentication, the OpenAPI fuzzer) uses it too.
"""
import hashlib, io, json, os, secrets, socket, subprocess, tarfile, tempfile, time
from contextlib import contextmanager
from pathlib import Path
import psutil, pytest

from forgenb.client import ApiError, Client
from forgenb.config import deep_merge
from forgenb.server import serve_argv

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(tempfile.gettempdir())/'forgenb-test-assets'
ENV = dict(HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', OMP_NUM_THREADS='1', TOKENIZERS_PARALLELISM='false', CUDA_VISIBLE_DEVICES='',
           FORGENB_WORKER_IDLE_EXIT='3', FORGENB_AUTO_RESUME='0', FORGENB_PROGRESS='lines', PYTHONUNBUFFERED='1')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def _stop_tree(home: Path):
    "Stop the scheduler and any job processes of the workspace at `home` (all started by this test's server)"
    import forgenb.jobs as jobs
    from forgenb.core import Workspace
    ws = Workspace(home)
    if not ws.db_path.exists(): return
    st = jobs.scheduler_status(ws)
    procs = [psutil.Process(st['pid'])] if st.get('pid') and psutil.pid_exists(st['pid']) else []
    procs += [psutil.Process(j['pid']) for j in ws.ledger.list_jobs(list(jobs.ACTIVE)) if j['pid'] and psutil.pid_exists(j['pid'])]
    for p in procs:
        try: p.kill()
        except psutil.NoSuchProcess: pass
    psutil.wait_procs(procs, timeout=10)


class Server:
    def __init__(self, url, token, home, proc, log): self.url, self.token, self.home, self.proc, self.log = url, token, home, proc, log
    def client(self, token=None) -> Client: return Client(self.url, self.token if token is None else token)


@contextmanager
def jupyter_api(tmp: Path, by_config=True, env=None):
    "A Jupyter server with the forgenb API on a free loopback port; a `Server`"
    port, token, home = _free_port(), secrets.token_hex(16), tmp/'ws'
    e = dict(os.environ, **ENV, FORGENB_HOME=str(home), JUPYTER_CONFIG_DIR=str(tmp/'jupyter-config'),
             JUPYTER_RUNTIME_DIR=str(tmp/'jupyter-runtime'), **(env or {}))
    if by_config: e['JUPYTER_CONFIG_PATH'] = str(REPO/'jupyter-config')
    log = tmp/'server.log'
    with open(log, 'wb') as f:
        p = subprocess.Popen(serve_argv(port, token=token, root_dir=str(tmp), allow_root=True, enable=not by_config),
                             env=e, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    srv = Server(f'http://127.0.0.1:{port}', token, home, p, log)
    try:
        t0 = time.monotonic()
        while True:
            try: srv.client().health(); break
            except (OSError, ApiError):
                if p.poll() is not None or time.monotonic() - t0 > 60: raise RuntimeError(f'the server did not start:\n{log.read_text()[-3000:]}')
                time.sleep(0.2)
        yield srv
    finally:
        p.kill(); p.wait()  # a test server: nothing to save, and a graceful shutdown takes seconds
        _stop_tree(home)


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    with jupyter_api(tmp_path_factory.mktemp('api')) as s: yield s


@pytest.fixture(scope='module')
def c(server): return server.client()


def _spec(c, steps=6):
    from forgenb.test_utils import tiny_model_dir
    model = tiny_model_dir(ASSETS/'tiny-llama')
    return deep_merge(c.preset('tiny-cpu-demo'), {'model': {'base': str(model)}, 'train': {
        'max_steps': steps, 'warmup': 1, 'log_every': 1, 'eval_every': 3}, 'sample': {'every': 3}, 'checkpoint': {'every': 3, 'keep_last': 5}})


def _sha(p: Path) -> str: return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope='module')
def flow(server, c, tmp_path_factory):
    "Upload, validate, queue two jobs (the second for the registry), follow the first with a broken-off and resumed stream"
    from forgenb.test_utils import write_sample_dataset
    tmp = tmp_path_factory.mktemp('flow')
    ds = c.upload_dataset(write_sample_dataset(tmp/'sample.jsonl', n=64), name='sample')
    spec = _spec(c)
    rep = c.validate(spec)
    a = c.submit(spec, name='api-model')
    first, rest, cursor = [], [], None
    for m in c.stream(a['id']):
        first.append(m)
        if m['event'] == 'metrics': cursor = m['id']; break
    rest = list(c.stream(a['id'], since=cursor))
    return dict(ds=ds, rep=rep, spec=spec, a=a, first=first, rest=rest, cursor=cursor, tmp=tmp)


def test_upload_list_show(c, flow):
    ds = flow['ds']
    assert (ds['id'], ds['kind'], ds['n_rows']) == ('sample', 'text', 64)
    assert [d['id'] for d in c.datasets()] == ['sample']
    page = c.dataset('sample', preview=2)
    assert page['manifest']['n_rows'] == 64 and page['stats'] and page['manifest']['content_hash'] == ds['content_hash']
    assert len(page['preview']) == 2 and 'Reverse the letters.' in page['preview'][0]['text']
    assert c.upload_dataset(flow['tmp']/'sample.jsonl', name='sample')['content_hash'] == ds['content_hash']  # idempotent
    other = flow['tmp']/'other.jsonl'
    other.write_text('{"instruction": "x", "input": "", "output": "y"}\n' * 3)
    with pytest.raises(ApiError) as e: c.upload_dataset(other, name='sample')
    assert e.value.status == 409 and e.value.error == 'conflict' and e.value.detail['field'] == 'name'
    bad = flow['tmp']/'bad.jsonl'
    bad.write_text('{"instruction": "x", "output": "y"}\n{"instruction": "x"\n')
    with pytest.raises(ApiError) as e: c.upload_dataset(bad)
    assert e.value.status == 422 and e.value.detail['file'] == 'bad.jsonl' and e.value.detail.get('line') == 2
    assert [d['id'] for d in c.datasets()] == ['sample']


def test_validate_and_refuse(c, flow):
    assert flow['rep']['ok'] and flow['rep']['errors'] == []
    assert c.validate({'kind': 'llm'})['ok'] is False
    bad = deep_merge(flow['spec'], {'lora': {'r': 0}})
    with pytest.raises(ApiError) as e: c.submit(bad)
    assert e.value.status == 422 and any(p['path'] == 'lora.r' for p in e.value.detail['report']['errors'])


def test_stream_to_end_and_resume(c, flow):
    a = flow['a']['id']
    msgs = flow['first'] + flow['rest']
    assert msgs[-1]['event'] == 'end' and msgs[-1]['data']['status'] == 'completed'
    statuses = [m['data']['status'] for m in msgs if m['event'] == 'status']
    assert statuses[0] in ('queued', 'starting', 'running') and statuses[-1] == 'completed'
    steps = [m['data']['step'] for m in msgs if m['event'] == 'metrics' and 'train/loss' in m['data']['values']]
    assert steps == list(range(1, 7))  # each step once, across the reconnect, none missing
    assert flow['cursor'].startswith('1:') and [m['data']['step'] for m in flow['rest'] if m['event'] == 'metrics'][0] == 2
    assert {m['data']['step'] for m in msgs if m['event'] == 'sample'} == {0, 3, 6}
    ev_ids = [m['data']['id'] for m in msgs if m['event'] == 'event']
    assert ev_ids == sorted(set(ev_ids))  # no event twice
    hist = c.metrics(a, names=['train/loss'])
    assert [s for s, _ in hist['train/loss']] == list(range(1, 7))
    assert c.metrics(a, since=4, names=['train/loss'])['train/loss'][0][0] == 5
    assert c.job(a)['status'] == 'completed' and c.job(a)['spec']['train']['max_steps'] == 6
    assert any('completed' in str(e['data']) for e in c.events(a, kind='job.status'))
    assert c.logs(a, tail=5) and len(c.logs(a, tail=5)) <= 5
    assert a in [j['id'] for j in c.past_jobs()] and c.job_stats()['counts']['completed'] >= 1
    assert [j['id'] for j in c.jobs(status='completed', limit=1)] == [a]


def test_downloads(server, c, flow, tmp_path):
    a = flow['a']['id']
    run = server.home/'runs'/a
    ad = c.download_adapter(a, tmp_path)
    assert ad.name == f'{a}-adapter' and {f.name: _sha(f) for f in ad.iterdir()} == {f.name: _sha(f) for f in (run/'adapter').iterdir() if f.is_file()}
    cks = c.checkpoints(a)
    assert [k['step'] for k in cks] == [3, 6] and all(k['exists'] for k in cks)
    ck = c.download_checkpoint(a, 3, tmp_path)
    assert _sha(ck/'manifest.json') == _sha(run/'checkpoints'/'step-3'/'manifest.json')
    tar = c.download_checkpoint(a, 6, tmp_path/'t', extract=False)
    assert tar.name == f'{a}-step-6.tar' and 'manifest.json' in [Path(n).name for n in tarfile.open(tar).getnames()]
    s = c.samples(a)[0]
    assert c.download_sample(a, s['id'], tmp_path).read_text() == s['prompt'] + s['output']
    assert 'log.txt' in [f['path'] for f in c.files(a)]
    assert c.download_file(a, 'job.yaml', tmp_path).read_bytes() == (run/'job.yaml').read_bytes()


def test_states_and_ids(c, flow):
    a = flow['a']['id']
    for cmd in (lambda: c.stop(a), lambda: c.pause(a), lambda: c.save_now(a), lambda: c.sample_now(a, prompts=['hi']), lambda: c.eval_now(a)):
        with pytest.raises(ApiError) as e: cmd()
        assert e.value.status == 409 and a in e.value.message
    for call in (lambda: c.job('nope'), lambda: c.stop('nope'), lambda: c.delete_job('nope'), lambda: c.dataset('nope'),
                 lambda: c.download_checkpoint(a, 99), lambda: c.preset('nope')):
        with pytest.raises(ApiError) as e: call()
        assert e.value.status == 404 and e.value.error == 'not_found'
    with pytest.raises(ApiError) as e: c.request('POST', '/validate', body=b'{"kind": "llm",\n "x": }', headers={'Content-Type': 'application/json'})
    assert e.value.status == 400 and e.value.detail == {'line': 2, 'column': 7, 'pos': 22}
    with pytest.raises(ApiError) as e: c.pause(a, mode='sideways')
    assert e.value.status in (409, 422)


def test_running_job_cannot_be_deleted(server, c):
    "A job whose process runs (here: this test process stands in for it) is 409 on delete; stopped, it deletes"
    import forgenb.jobs as jobs
    from forgenb.core import Workspace
    led = Workspace(server.home).ledger
    led.add_job('busy1', {}, name='busy', status='running')
    led.update_job('busy1', pid=os.getpid(), host=jobs.HOST, started_at=time.time() - 5, heartbeat_at=time.time())
    try:
        with pytest.raises(ApiError) as e: c.delete_job('busy1')
        assert e.value.status == 409 and 'stop' in (e.value.detail.get('hint') or '')
        assert c.job('busy1')['status'] == 'running'
    finally: led.update_job('busy1', status='stopped', pid=None)
    assert c.delete_job('busy1') == {'deleted': 'busy1'}
    with pytest.raises(ApiError) as e: c.job('busy1')
    assert e.value.status == 404


def _copy_job(home: Path, job_id: str) -> str:
    "A second completed job with a copy of `job_id`'s adapter, recorded in the ledger (a second real job would double the test's time)"
    import shutil
    from forgenb.core import Workspace
    ws = Workspace(home); led = ws.ledger; job = led.get_job(job_id)
    new = job_id + '-copy'
    shutil.copytree(ws.run_dir(job_id)/'adapter', ws.run_dir(new)/'adapter')
    led.add_job(new, job['spec'], name=job['name'], status='completed', dataset_id=job['dataset_id'], spec_hash=job['spec_hash'], n_step=job['n_step'])
    led.update_job(new, step=job['step'], result=dict(job['result'], adapter=str(ws.run_dir(new)/'adapter')), ended_at=time.time())
    return new


def test_registry_activate_rollback(server, c, flow, tmp_path):
    a = flow['a']['id']
    va = c.post('/models', body={'job_id': a})  # the completed job registered itself; registering again is idempotent
    assert va['name'] == 'api-model' and 'active' in va['aliases']
    b = _copy_job(server.home, a)
    vb = c.post('/models', body={'job_id': b})
    assert (vb['name'], vb['version'], vb['aliases']) == ('api-model', va['version'] + 1, [])
    assert [(v['job_id'], v['version']) for v in c.get('/models/api-model/versions')] == [(a, va['version']), (b, vb['version'])]
    act = c.post('/models/api-model/activate', body={'version': vb['version']})
    assert act['job_id'] == b and 'active' in act['aliases']
    assert 'previous' in c.get(f"/models/api-model/versions/{va['version']}")['aliases']
    back = c.post('/models/api-model/rollback')
    assert back['job_id'] == a and 'active' in back['aliases']
    ad = c.download(f"/models/api-model/versions/{va['version']}/download", tmp_path, extract=True)
    assert ad.name == f"api-model-v{va['version']}-peft" and _sha(ad/'adapter_model.safetensors') == _sha(Path(va['path'])/'adapter_model.safetensors')
    for path in ('/models/nope/rollback', '/models/api-model/versions/99', f'/jobs/{a}/checkpoints/99999999999999999999/download'):
        with pytest.raises(ApiError) as e: c.post(path) if path.endswith('rollback') else c.get(path)
        assert e.value.status == 404
    with pytest.raises(ApiError) as e: c.post(f"/models/api-model/versions/{va['version']}/archive", body={'archived': True})
    assert e.value.status == 409  # the active version cannot be archived
    with pytest.raises(ApiError) as e: c.post('/models', body={'job_id': 'nope'})
    assert e.value.status == 404


def test_export_and_download(c, flow, tmp_path):
    m = c.post('/models/api-model/versions/1/export', body={'format': 'merged'})
    assert m['format'] == 'merged' and 'model.safetensors' in ' '.join(m['files'])
    assert [e['format'] for e in c.get('/models/api-model/versions/1/exports')] == ['merged']
    with pytest.raises(ApiError) as e: c.post('/models/api-model/versions/1/export', body={'format': 'merged'})
    assert e.value.status == 409  # exists already; overwrite=true replaces it
    d = c.download('/models/api-model/versions/1/download', tmp_path, query={'format': 'merged'}, extract=True)
    assert d.name == 'api-model-v1-merged' and (d/'config.json').is_file() and _sha(d/'model.safetensors') == _sha(Path(m['path'])/'model.safetensors')
    with pytest.raises(ApiError) as e: c.download('/models/api-model/versions/1/download', tmp_path, query={'format': 'gguf'})
    assert e.value.status == 404  # not exported yet


def test_cache_list_clear_limit(server, c):
    from forgenb.core import Workspace
    from forgenb.data.image import cache_lock, write_cache_entry
    ws = Workspace(server.home)
    for k, ds in (('latents-a', 'pics'), ('latents-b', 'pics'), ('latents-c', 'dogs'), ('text-d', 'dogs')):
        write_cache_entry(ws, k, {'x.bin': b'0' * 1000}, what=k.split('-')[0], dataset=ds, model='tiny', resolution=64)
    write_cache_entry(ws, 'latents-e', {'x.bin': b'0' * 1000}, what='latents', dataset='gone', dataset_hash='f' * 64, model='tiny', resolution=64)
    got = c.cache()
    assert [e['key'] for e in got['entries']] == ['latents-a', 'latents-b', 'latents-c', 'text-d', 'latents-e']
    assert got['usage']['n_entries'] == 5 and got['usage']['size'] == sum(e['size'] for e in got['entries']) and got['usage']['limit'] is None
    assert [e['key'] for e in c.clear_cache(orphaned=True)['removed']] == ['latents-e']
    with cache_lock(ws, 'latents-a'):  # this process holds it, as a running job holds the entry it reads
        assert c.cache()['usage']['in_use'] == 1
        r = c.clear_cache(dataset='pics')
    assert ([e['key'] for e in r['removed']], [e['key'] for e in r['in_use']], r['freed']) == (['latents-b'], ['latents-a'], r['removed'][0]['size'])
    assert c.clear_cache(keys=['text-d'], unused_days=1) == {'removed': [], 'in_use': [], 'freed': 0}  # used just now
    assert [e['key'] for e in c.clear_cache(keys=['text-d'])['removed']] == ['text-d']
    with cache_lock(ws, 'latents-a'): lim = c.set_cache_limit(0)
    left = c.cache()['entries']
    assert [e['key'] for e in left] == ['latents-a'] and lim == {'limit': 0, 'size': left[0]['size']}
    assert c.set_cache_limit('20GB')['limit'] == 20 * 10**9 and c.cache()['usage']['limit'] == 20 * 10**9
    assert c.set_cache_limit(None)['limit'] is None and c.cache()['usage']['limit'] is None
    bad = [('POST', '/cache/clear', {'unused_days': -1}, 'unused_days'), ('POST', '/cache/clear', {'unused_days': 'old'}, 'unused_days'),
           ('POST', '/cache/clear', {'dataset': 3}, 'dataset'), ('POST', '/cache/clear', {'orphaned': 'yes'}, 'orphaned'),
           ('POST', '/cache/clear', {'keys': 'latents-a'}, 'keys'), ('POST', '/cache/clear', {'unused_day': 30}, 'unused_day'),
           ('PUT', '/cache/limit', {'limit': 'lots'}, 'limit'), ('PUT', '/cache/limit', {'limit': -5}, 'limit'),
           ('PUT', '/cache/limit', {'limit': True}, 'limit'), ('PUT', '/cache/limit', {'limit': 10**30}, 'limit'), ('PUT', '/cache/limit', {}, 'limit')]
    for method, path, body, field in bad:
        with pytest.raises(ApiError) as e: c.request(method, path, body=body)
        assert (e.value.status, e.value.error, e.value.detail['field']) == (422, 'invalid', field), (body, e.value)
    assert [e['key'] for e in c.cache()['entries']] == ['latents-a'] and c.cache()['usage']['limit'] is None  # the refusals touched nothing
    import http.client
    conn = http.client.HTTPConnection(server.url.split('//')[1], timeout=10)
    conn.request('PUT', '/forgenb/api/v1/cache/limit', body=b'{"limit": "lots"}', headers={'Authorization': f'token {server.token}', 'Content-Type': 'application/json'})
    r = conn.getresponse(); raw = json.loads(r.read()); conn.close()
    assert r.status == 422 and set(raw) == {'error', 'message', 'detail'} and raw['detail']['field'] == 'limit' and 'not a size' in raw['message']
    for client in (server.client(token=''), server.client(token='wrong')):
        for call in (client.cache, client.clear_cache, lambda: client.set_cache_limit(None)):
            with pytest.raises(ApiError) as e: call()
            assert (e.value.status, e.value.error) == (401, 'unauthorized')
    assert [e['key'] for e in c.cache()['entries']] == ['latents-a']
    assert [e['key'] for e in c.clear_cache()['removed']] == ['latents-a'] and c.cache()['entries'] == []
