"""The HTTP API's attack surface: no answer without Jupyter's token, no file outside the workspace, no upload over the limit,
and no 5xx for anything its OpenAPI document allows.

Against a real `jupyter server` (see tests/test_server.py::jupyter_api) with FORGENB_MAX_UPLOAD_MB=1:

- every route of `forgenb.server.ROUTES`, every method, answers 401 with the error shape `{error, message, detail}`
  and `WWW-Authenticate` without a token, with a wrong token header and with a wrong `?token=`;
- traversal attempts on every path-taking route (`..`, absolute paths, `%2e%2e`, `%2f`, backslashes, double
  encoding, symlinks out of the run folder, ledger rows whose paths lead out of the workspace) get 4xx and read
  nothing: each target outside is a FIFO, which the server would block on if it opened it, so every request
  must answer within a 10 s timeout; the same routes serve the files inside;
- an image folder uploaded as a zip becomes an image dataset with captions;
- uploads over the limit get 413 — declared by Content-Length, or chunked without one — malformed or
  non-multipart uploads 400, an unsupported file type 422, a zip with a member that climbs out
  ("zip slip") 422 with nothing written, and the workspace's files and ledger are unchanged;
- the OpenAPI document served at /openapi.json is a valid OpenAPI 3.1 document; schemathesis, loading it from
  the live server, sends generated requests (a few examples per operation) to every operation and never gets a
  5xx. The workspace's scheduler lock is held by the test, so generated job specs that pass validation stay queued.
"""
import fcntl, http.client, json, os, re, time
from pathlib import Path
import pytest, schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR

from forgenb.client import ApiError
from forgenb.server import PREFIX, ROUTES
from test_server import jupyter_api

SAMPLE = {'job_id': 'j1', 'dataset_id': 'd1', 'name': 'm1', 'step': '1', 'sample_id': '1', 'version': '1', 'path': 'log.txt'}


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('sec')
    with jupyter_api(tmp, by_config=False, env=dict(FORGENB_MAX_UPLOAD_MB='1')) as s:
        _plant(s.home, tmp/'outside')
        with open(s.home/'scheduler.lock', 'a+') as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # no scheduler may start in this workspace
            yield s


def _plant(home: Path, out: Path):
    "A completed job `j1` with files inside its run folder, symlinks and ledger rows leading to FIFOs outside"
    from forgenb.core import Workspace
    out.mkdir(); (out/'dir').mkdir()
    os.mkfifo(out/'secret'); os.mkfifo(out/'dir'/'secret')
    ws = Workspace(home); led = ws.ledger
    led.add_job('j1', {}, name='planted', status='completed')
    run = ws.run_dir('j1'); (run/'sub').mkdir(parents=True); (run/'adapter').mkdir()
    (run/'log.txt').write_text('inside\n'); (run/'sub'/'a.txt').write_text('a'); (run/'adapter'/'w.bin').write_bytes(b'w')
    (run/'out').symlink_to(out/'secret'); (run/'outdir').symlink_to(out/'dir'); (run/'adapter'/'leak').symlink_to(out/'secret')
    led.add_checkpoint('j1', 1, out/'dir'); led.add_checkpoint('j1', 2, run/'sub')
    led.add_sample('j1', 1, 'image', path=out/'secret'); led.add_sample('j1', 2, 'image', path=run/'sub'/'a.txt')


def _raw(server, method, path, headers=None, body=None, timeout=10.):
    "Send `path` as written (no client-side normalization); (status, headers, body)"
    u = server.url.split('//')[1]
    c = http.client.HTTPConnection(*u.split(':'), timeout=timeout)
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    out = (r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    c.close()
    return out


def _auth(server): return {'Authorization': f'token {server.token}'}


def _routes():
    return [(m, PREFIX + re.sub(r'\{(\w+)\}', lambda x: SAMPLE[x[1]], p)) for p, ops in ROUTES.items() for m in ops]


def test_every_route_needs_the_token(server):
    routes = _routes()
    assert len(routes) >= 50
    for method, path in routes:
        for headers, q in (({}, ''), ({'Authorization': 'token wrong'}, ''), ({}, '?token=wrong')):
            st, h, body = _raw(server, method, path + q, headers, body=b'{}' if method in ('POST', 'PUT') else None)
            assert st == 401, (method, path, headers, q, st, body[:200])
            d = json.loads(body)
            assert set(d) == {'error', 'message', 'detail'} and d['error'] == 'unauthorized' and h.get('www-authenticate') == 'token'
    assert _raw(server, 'GET', PREFIX + '/health', _auth(server))[0] == 200


TRAVERSALS = [
    '/jobs/j1/files/../../../outside/secret', '/jobs/j1/files/%2e%2e/%2e%2e/%2e%2e/outside/secret',
    '/jobs/j1/files/..%2f..%2f..%2foutside%2fsecret', '/jobs/j1/files/%2F{out}%2Fsecret', '/jobs/j1/files//{out}/secret',
    '/jobs/j1/files/out', '/jobs/j1/files/outdir/secret', '/jobs/j1/files/outdir', '/jobs/j1/files/sub/..%2f..%2f..%2foutside/secret',
    '/jobs/j1/files/..%5c..%5c..%5coutside%5csecret', '/jobs/j1/files/%252e%252e/%252e%252e/outside/secret', '/jobs/j1/files/sub%00/a.txt',
    '/jobs/..%2f..%2foutside/files/secret', '/jobs/%2e%2e/checkpoints', '/jobs/j1/checkpoints/1/download', '/jobs/j1/checkpoints/..%2f1/download',
    '/jobs/j1/samples/1/download', '/datasets/..%2f..%2foutside', '/presets/..%2f..%2fetc', '/models/..%2fx/versions/1',
    '/models/m1/versions/..%2f1/download', '/jobs/j1/stream?since=../../x',
]


def test_traversal_reads_nothing(server):
    out = str(server.home.parent/'outside').lstrip('/')
    for p in TRAVERSALS:
        st, _, body = _raw(server, 'GET', PREFIX + p.format(out=out), _auth(server))
        assert 400 <= st < 500, (p, st, body[:200])
    ok = {'/jobs/j1/files/log.txt': b'inside\n', '/jobs/j1/files/sub/a.txt': b'a', '/jobs/j1/samples/2/download': b'a'}
    for p, want in ok.items():
        st, h, body = _raw(server, 'GET', PREFIX + p, _auth(server))
        assert (st, body) == (200, want) and h['content-disposition'].startswith('attachment; filename=')
    import io, tarfile
    st, h, body = _raw(server, 'GET', PREFIX + '/jobs/j1/adapter/download', _auth(server))
    assert st == 200 and tarfile.open(fileobj=io.BytesIO(body)).getnames() == ['j1-adapter/w.bin']  # the symlink is left out
    st, _, body = _raw(server, 'GET', PREFIX + '/jobs/j1/checkpoints/2/download', _auth(server))
    assert st == 200 and tarfile.open(fileobj=io.BytesIO(body)).getnames() == ['j1-step-2/a.txt']
    listed = [f['path'] for f in server.client().files('j1')]
    assert 'log.txt' in listed and not any(f.startswith(('out', 'adapter/leak')) for f in listed)


def _tree(home: Path) -> dict:
    skip = ('forgenb.db', 'forgenb.db-wal', 'forgenb.db-shm', 'scheduler.lock', 'scheduler.log')
    return {str(p.relative_to(home)): p.stat().st_size for p in sorted(home.rglob('*')) if p.is_file() and p.name not in skip}


def test_image_folder_upload(server, tmp_path):
    from PIL import Image
    import zipfile
    with zipfile.ZipFile(tmp_path/'cats.zip', 'w') as z:
        for i in range(3):
            b = tmp_path/f'{i}.png'; Image.new('RGB', (64, 48), (40 * i, 0, 0)).save(b)
            z.write(b, f'cats/{i}.png'); z.writestr(f'cats/{i}.txt', f'a red cat number {i}')
    c = server.client()
    rec = c.upload_dataset(tmp_path/'cats.zip', name='cats')
    assert (rec['id'], rec['kind'], rec['n_rows']) == ('cats', 'image', 3)
    page = c.dataset('cats', preview=2)
    assert [r['caption'] for r in page['preview']] == ['a red cat number 0', 'a red cat number 1']
    assert c.delete_dataset('cats') == {'deleted': 'cats'} and 'cats' not in [d['id'] for d in c.datasets()]


def test_upload_limits_leave_workspace_unchanged(server, tmp_path):
    from forgenb.test_utils import write_sample_dataset
    c = server.client()
    before, ds_before = _tree(server.home), c.datasets()
    big = write_sample_dataset(tmp_path/'big.jsonl', n=20000)
    assert big.stat().st_size > 1 << 20
    with pytest.raises(ApiError) as e: c.upload_dataset(big, name='big')
    assert e.value.status == 413 and e.value.error == 'too_large' and e.value.detail['limit'] == 1 << 20
    from forgenb.client import multipart
    body, ctype = multipart({'name': 'big2'}, 'file', 'big.jsonl', big.read_bytes())
    with pytest.raises(ApiError) as e:  # chunked: no Content-Length, refused when the body crosses the limit
        c.open('POST', '/datasets', body=(body[i:i + 65536] for i in range(0, len(body), 65536)), headers={'Content-Type': ctype})
    assert e.value.status == 413
    bad = [({'Content-Type': 'application/json'}, b'{}', 400), ({'Content-Type': 'multipart/form-data; boundary=XX'}, b'--XX\r\nbroken', 400),
           ({'Content-Type': ctype}, multipart({}, 'file', 'x.txt', b'hello')[0].replace(ctype.split('=')[1].encode(), b'B'), 400)]
    for headers, b, code in bad:
        with pytest.raises(ApiError) as e: c.request('POST', '/datasets', body=b, headers=headers)
        assert e.value.status == code
    b2, ct2 = multipart({}, 'file', 'notes.txt', b'hello')
    with pytest.raises(ApiError) as e: c.request('POST', '/datasets', body=b2, headers={'Content-Type': ct2})
    assert e.value.status == 422 and e.value.detail['field'] == 'file'
    import zipfile
    with zipfile.ZipFile(tmp_path/'slip.zip', 'w') as z: z.writestr('imgs/a.txt', 'a'); z.writestr('../../../../evil.txt', 'x')
    with pytest.raises(ApiError) as e: c.upload_dataset(tmp_path/'slip.zip', name='slip')
    assert e.value.status == 422 and 'unsafe archive member' in e.value.message
    time.sleep(0.3)
    assert _tree(server.home) == before and c.datasets() == ds_before
    assert not list(server.home.parent.rglob('evil.txt'))
    assert not any((server.home/'.tmp').iterdir())


def test_openapi_fuzz_no_server_error(server):
    doc = server.client().openapi()
    OPENAPI_31_VALIDATOR.validate(doc)
    assert {p for p in doc['paths']} == set(ROUTES)
    schema = schemathesis.openapi.from_url(server.url + PREFIX + '/openapi.json', headers=_auth(server))
    ops, failures = [r.ok() for r in schema.get_all_operations()], []
    assert {(o.method.upper(), o.path) for o in ops} == {(m, p) for p, v in ROUTES.items() for m in v} - {('GET', '/openapi.json')}  # it skips its own
    for op in ops:
        @settings(max_examples=4, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck),
                  phases=[Phase.explicit, Phase.generate])
        @given(case=op.as_strategy())
        def fuzz(case):
            case.call_and_validate(base_url=server.url + PREFIX, headers=_auth(server), checks=[not_a_server_error], timeout=30)
        try: fuzz()
        except (Exception, BaseExceptionGroup) as e: failures.append(f'{op.method.upper()} {op.path}: {str(e)[:600]}')
    assert not failures, '\n\n'.join(failures)
