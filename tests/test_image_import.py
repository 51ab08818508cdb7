"""A bad image never gets in, every bad file is named once, and a refused import leaves no trace.
For the corpus of `tests/bad_images/` (made by `tests/make_bad_images.py`), `import_images` raises one
`InputError` with exactly one line per bad file (what is wrong, and the fix) and no line for a good
one, and the workspace is byte-identical before and after (files and ledger rows); with
`skip_bad=True` the good files of the same folder are imported, byte for byte, under safe names,
with their captions (trigger applied) and sizes, and the bad ones are listed in the stats. An import
that fails while copying leaves nothing behind; the same content from another place is the same
dataset, other content under a taken name is refused.

The latent cache the diffusion recipe derives from image datasets is visible and bounded: its
entries list what they were made from, least recently used first; a size limit evicts the least
recently used entries when a new one is written, never one that a process holds (its lock, even from
another process) or that a waiting or running diffusion job of that dataset and model may read;
`clear_cache` removes all, the unused-for-N-days, one dataset's or the orphaned entries; deleting an
image dataset drops its entries; no temporary or half-removed folder is left behind."""
import hashlib, json, os, shutil, subprocess, sys, time
from pathlib import Path
import pytest
from PIL import Image
from forgenb.core import Workspace, InputError
from forgenb.data import image as I
from forgenb.data.image import import_images, load_image_rows, list_datasets, delete_dataset, open_image
import forgenb.ledger  # noqa: F401  (adds Workspace.ledger)

CORPUS = Path(__file__).parent/'bad_images'
FOLDER, META = CORPUS/'folder', CORPUS/'meta'

BAD = {  # bad file: (kind, what its line says)
    'zero_bytes.png': ('empty', 'image file is empty (0 bytes)'),
    'not_an_image.png': ('corrupt', 'is not an image: Pillow finds no PNG, JPEG or WebP data in it'),
    'truncated.jpg': ('corrupt', 'is truncated: the file ends before the image does'),
    'gif_named_png.png': ('unsupported', 'is a GIF image (named .png); supported: PNG, JPEG, WebP'),
    'animation.gif': ('unsupported', "unsupported image format '.gif'"),
    'photo.heic': ('unsupported', "unsupported image format '.heic'"),
    'no_caption.png': ('no caption', 'no caption file no_caption.txt'),
    'empty_caption.png': ('empty caption', 'caption file empty_caption.txt is empty'),
    'latin1_caption.png': ('bad caption', 'caption file latin1_caption.txt is not UTF-8 (byte 0xe9 at offset 6)'),
    'too_small.png': ('too small', 'is 12x12 px, smaller than min_size=16 on its shorter side'),
    'good_png_copy.png': ('duplicate', 'has the same bytes as good_png.png'),
}
GOOD = {  # source file -> (name in the snapshot, caption with trigger 'ohwx')
    'Good Space.JPG': ('Good_Space.jpg', 'ohwx, a yellow square'),
    'good_jpg.jpg': ('good_jpg.jpg', 'a photo of ohwx in the snow'),
    'good_png.png': ('good_png.png', 'ohwx, a red square on white'),
    'good_webp.webp': ('good_webp.webp', 'ohwx, a green square'),
    'nested/good_nested.png': ('nested/good_nested.png', 'ohwx, a navy square'),
}

def _sha(p): return hashlib.sha256(p.read_bytes()).hexdigest()

def _state(ws):
    "Every file and folder of the workspace (bytes by hash) and the ledger's datasets and events"
    items = sorted((str(p.relative_to(ws.root)), _sha(p) if p.is_file() else 'dir') for p in ws.root.rglob('*')
                   if not p.name.endswith('-shm'))  # SQLite's shared-memory index changes on reads
    return items, ws.ledger.q('SELECT * FROM datasets ORDER BY id'), ws.ledger.q('SELECT * FROM events ORDER BY id')

@pytest.fixture
def ws(tmp_path):
    ws = Workspace(tmp_path/'ws').ensure()
    ws.ledger.migrate()  # the ledger file exists before the first snapshot of the state
    return ws

def _refused(ws, src, **kw) -> InputError:
    before = _state(ws)
    with pytest.raises(InputError) as ei: import_images(ws, src, **kw)
    assert _state(ws) == before
    return ei.value

def test_every_bad_file_gets_one_line_and_nothing_is_written(ws):
    e = _refused(ws, FOLDER, min_size=16, trigger='ohwx')
    assert {Path(p.file).name: p.kind for p in e.problems} == {k: v[0] for k, v in BAD.items()}
    lines = str(e).splitlines()
    assert lines[0].startswith(f'{FOLDER}: {len(BAD)} bad files (') and 'skip_bad=True' in lines[0]
    for name, (kind, says) in BAD.items():
        mine = [l for l in lines[1:] if l.startswith(f'  {name}:')]
        assert len(mine) == 1, (name, lines)
        assert says in mine[0] and '. Fix: ' in mine[0], (name, mine[0])
    assert len(lines) == 1 + len(BAD)
    assert not any(g in l for g in GOOD for l in lines[1:] if not l.startswith('  good_png_copy.png'))

def test_skip_bad_imports_the_good_files(ws):
    rec = import_images(ws, FOLDER, min_size=16, trigger='ohwx', skip_bad=True)
    assert (rec['id'], rec['kind'], rec['format'], rec['n_rows']) == ('folder', 'image', 'imagefolder', len(GOOD))
    st = rec['stats']
    assert sorted(s['file'] for s in st['skipped']) == sorted(BAD)
    assert st['warnings'][:3] == [f'skipped {len(BAD)} bad files (see stats["skipped"])',
                                  'ignored 1 file, neither images nor captions: README.md',
                                  '1 caption file without an image of the same name (a typo?): orphan.txt']
    assert st['trigger'] == dict(word='ohwx', held=1, token=1, prepended=3)
    d = ws.dataset_dir('folder')
    assert sorted(p.relative_to(d).as_posix() for p in d.rglob('*') if p.is_file()) == sorted(
        ['manifest.json', 'metadata.jsonl'] + [f'images/{n}' for n, _ in GOOD.values()])
    meta = [json.loads(l) for l in (d/'metadata.jsonl').read_text().splitlines()]
    assert {m['file_name']: m['text'] for m in meta} == {f'images/{n}': c for n, c in GOOD.values()}
    for src, (n, _) in GOOD.items():
        m = next(m for m in meta if m['file_name'] == f'images/{n}')
        assert (d/m['file_name']).read_bytes() == (FOLDER/src).read_bytes() and m['sha256'] == _sha(FOLDER/src)
        assert (m['width'], m['height']) == Image.open(FOLDER/src).size
    rows = load_image_rows(ws, 'folder')
    assert [(r['width'], r['height']) for r in rows] == [open_image(r['path']).size for r in rows]
    man = json.loads((d/'manifest.json').read_text())
    assert (man['content_hash'], man['kind'], man['trigger']) == (rec['content_hash'], 'image', 'ohwx')
    assert list(ws.tmp_dir.iterdir()) == []

def test_metadata_rows_and_images_each_get_one_line(ws):
    e = _refused(ws, META)
    got = sorted(I._line(p, META) for p in e.problems)
    assert got == sorted([
        "metadata.jsonl:3: field 'file_name': lists 'gone.png', which is not an image in " + f'{META}. Fix: fix the file name, or drop the row',
        "metadata.jsonl:6: row 5: field 'text': caption must be a string, found 7. Fix: put the caption in quotes",
        'b.png: empty caption in metadata.jsonl (line 2). Fix: write the caption in the text column',
        'c.png: listed 2 times in metadata.jsonl (lines 4, 5). Fix: keep one row',
        'd.png: not listed in metadata.jsonl. Fix: add a row {"file_name": "d.png", "text": "..."}',
        'e.png: not listed in metadata.jsonl. Fix: add a row {"file_name": "e.png", "text": "..."}'])
    rec = import_images(ws, META, skip_bad=True)
    assert rec['n_rows'] == 1 and [r['caption'] for r in load_image_rows(ws, 'meta')] == ['a red square']

def test_csv_metadata(ws, tmp_path):
    d = tmp_path/'csv'; d.mkdir()
    for n, c in (('x.png', 'red'), ('y.webp', 'blue')): Image.new('RGB', (40, 40), c).save(d/n)
    (d/'metadata.csv').write_text('file_name,caption\nx.png,"a red, square box"\ny.webp,a blue box\n')
    rec = import_images(ws, d, name='csv-set')
    assert [(r['file_name'], r['caption']) for r in load_image_rows(ws, rec['id'])] == [
        ('images/x.png', 'a red, square box'), ('images/y.webp', 'a blue box')]

def test_a_failed_copy_leaves_nothing(ws, monkeypatch):
    real, n = shutil.copyfile, []
    def flaky(a, b):
        n.append(a)
        if len(n) == 3: raise OSError(28, 'No space left on device')
        return real(a, b)
    monkeypatch.setattr(I.shutil, 'copyfile', flaky)
    before = _state(ws)
    with pytest.raises(OSError): import_images(ws, FOLDER, skip_bad=True)
    assert _state(ws) == before and list(ws.tmp_dir.iterdir()) == []

def test_same_content_is_the_same_dataset(ws, tmp_path):
    rec = import_images(ws, FOLDER, skip_bad=True)
    moved = shutil.copytree(FOLDER, tmp_path/'elsewhere')
    assert import_images(ws, moved, name='folder', skip_bad=True) == rec
    (moved/'good_png.txt').write_text('another caption')
    e = _refused(ws, moved, name='folder', skip_bad=True)
    assert "dataset 'folder' already exists with different content" in str(e) and "delete_dataset(ws, 'folder')" in str(e)
    assert [r['id'] for r in list_datasets(ws)] == ['folder']
    delete_dataset(ws, 'folder')
    assert list(ws.datasets_dir.iterdir()) == [] and list_datasets(ws) == []

def test_only_bad_files_is_an_error_even_with_skip_bad(ws, tmp_path):
    d = tmp_path/'bad'; d.mkdir()
    shutil.copy(FOLDER/'zero_bytes.png', d); shutil.copy(FOLDER/'no_caption.png', d)
    e = _refused(ws, d, skip_bad=True)
    assert [Path(p.file).name for p in e.problems] == ['no_caption.png', 'zero_bytes.png']
    assert 'no such folder' in str(_refused(ws, tmp_path/'nope'))

def test_concurrent_imports_of_one_name(ws, tmp_path, race):
    "Two threads import different folders under one name: one wins, the other is refused, the folder is the winner's"
    srcs = [shutil.copytree(FOLDER/'nested', tmp_path/f'src{k}') for k in range(2)]
    (srcs[1]/'good_nested.txt').write_text('another caption')
    out = race(*[lambda s=s: import_images(Workspace(ws.root), s, name='shared') for s in srcs])
    won = [o for o in out if isinstance(o, dict)]
    assert len(won) == 1 and sum(isinstance(o, InputError) for o in out) == 1
    man = json.loads((ws.dataset_dir('shared')/'manifest.json').read_text())
    assert man['content_hash'] == won[0]['content_hash'] == ws.ledger.get_dataset('shared')['content_hash']
    assert [p.name for p in ws.datasets_dir.iterdir()] == ['shared'] and list(ws.tmp_dir.iterdir()) == []


def _entry(ws, name, dataset, age, model='sd', n=1000):
    "A fake cache entry of `n` bytes made from `dataset`, last used `age` seconds ago"
    rec = ws.ledger.get_dataset(dataset)
    with I.cache_lock(ws, name):
        I.write_cache_entry(ws, name, {'tensors.safetensors': b'x' * n}, what=name.split('-')[0], dataset=dataset, model=model,
                            dataset_hash=rec['content_hash'] if rec else f'hash-of-{dataset}', resolution=512)
    t = time.time() - age
    os.utime(I.cache_root(ws)/name, (t, t))

def _keys(ws): return [e['key'] for e in I.cache_entries(ws)]

def test_cache_entries_say_what_they_hold_and_clear_cache_picks_them(ws):
    for k, age in (('latents-old', 10 * 86400), ('text-old', 9 * 86400), ('latents-new', 60)): _entry(ws, k, 'cats', age)
    es = I.cache_entries(ws)
    assert [e['key'] for e in es] == ['latents-old', 'text-old', 'latents-new']
    assert {k: es[0][k] for k in ('what', 'dataset', 'model', 'resolution', 'in_use')} == dict(what='latents', dataset='cats', model='sd', resolution=512, in_use=False)
    assert es[0]['size'] > 1000 and es[0]['last_used'] < es[2]['last_used'] and I.cache_usage(ws)['size'] == sum(e['size'] for e in es)
    assert json.loads(json.dumps(es)) == es  # plain data
    out = I.clear_cache(ws, unused_days=7)
    assert [e['key'] for e in out['removed']] == ['latents-old', 'text-old'] and out['freed'] == sum(e['size'] for e in es[:2])
    assert _keys(ws) == ['latents-new'] and I.clear_cache(ws)['freed'] > 0 and _keys(ws) == []
    assert [p.name for p in I.cache_root(ws).iterdir() if p.name.startswith('.') and p.name != '.locks'] == []

def test_the_limit_evicts_least_recently_used_but_never_an_entry_in_use(ws):
    _entry(ws, 'latents-job', 'cats', 400, model='flux')
    _entry(ws, 'latents-held', 'dogs', 300)
    _entry(ws, 'latents-a', 'dogs', 200)
    _entry(ws, 'latents-b', 'dogs', 100)
    ws.ledger.add_job('j1', dict(kind='diffusion', model=dict(base='flux'), data=dict(dataset='cats')), kind='diffusion', status='running')
    ws.ledger.add_job('j2', dict(kind='diffusion', model=dict(base='sd'), data=dict(dataset='dogs')), kind='diffusion', status='interrupted')
    cap = int(3.5 * max(e['size'] for e in I.cache_entries(ws)))  # room for three entries
    with I.cache_lock(ws, 'latents-held'):
        assert I.set_cache_limit(ws, f'{cap}B') == cap
        assert _keys(ws) == ['latents-job', 'latents-held', 'latents-b']  # latents-a, the oldest unused, went
        _entry(ws, 'latents-c', 'dogs', 0)
        assert _keys(ws) == ['latents-job', 'latents-held', 'latents-c']  # writing c evicted b
        assert [e['in_use'] for e in I.cache_entries(ws)] == [True, True, False]
    ws.ledger.move_job('j1', 'completed', 'done')
    _entry(ws, 'latents-d', 'dogs', 0)
    assert _keys(ws) == ['latents-held', 'latents-c', 'latents-d'] and I.cache_limit(ws) == cap
    I.set_cache_limit(ws, None)
    assert I.cache_limit(ws) is None
    with pytest.raises(InputError, match='not a size'): I.set_cache_limit(ws, 'lots')

def test_an_entry_another_process_holds_is_not_removed(ws):
    _entry(ws, 'latents-x', 'cats', 100)
    code = 'import sys; from forgenb.core import Workspace; from forgenb.data.image import cache_lock\n' \
           f'with cache_lock(Workspace({str(ws.root)!r}), "latents-x"): print("held", flush=True); sys.stdin.read()'
    p = subprocess.Popen([sys.executable, '-c', code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == 'held'
        out = I.clear_cache(ws)
        assert out['removed'] == [] and [e['key'] for e in out['in_use']] == ['latents-x'] and _keys(ws) == ['latents-x']
    finally:
        p.stdin.close(); p.wait(30)
    assert [e['key'] for e in I.clear_cache(ws)['removed']] == ['latents-x']

def test_deleting_an_image_dataset_drops_its_cache_entries(ws, tmp_path):
    import_images(ws, FOLDER/'nested', name='nested')
    _entry(ws, 'latents-n', 'nested', 10); _entry(ws, 'text-n', 'nested', 10); _entry(ws, 'latents-o', 'other', 10)
    _entry(ws, 'latents-f', str(tmp_path), 10)
    assert [e['key'] for e in I.clear_cache(ws, orphaned=True)['removed']] == ['latents-o']  # no dataset 'other', no such folder
    delete_dataset(ws, 'nested')
    assert _keys(ws) == ['latents-f']
