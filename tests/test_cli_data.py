"""The `forgenb` dataset, registry, server and UI commands route to the right function, and refuse bad input with exit status 2
before anything is written.

- `datasets import` decides text or images by one rule (`forgenb.cli.source_kind`, shared with the Dashboard): a folder, or a
  .jsonl/.csv that is named metadata.* or lies beside images, is an image set; a flag of the other kind is refused, not ignored;
- a folder with bad files exits 2 with one line per bad file (each naming it) and leaves no dataset, no snapshot folder behind;
- `datasets show` / `delete` dispatch on the row's kind; an unknown id exits 2 naming the ids of every kind;
- `serve` runs exactly `forgenb.server.serve_argv(...)` with `FORGENB_HOME` set to `--home`, and returns the server's status;
- `ui` / `attach` never overwrite a notebook of other content without `--force`;
- `registry export` refuses a flag its format does not read before any model is loaded.
"""
import json, os, shutil, tempfile
from pathlib import Path
import pytest

import forgenb.server as server
from forgenb.cli import main, source_kind, export_kwargs
from forgenb.core import Workspace, InputError
from forgenb.data.image import check_folder
from forgenb.test_utils import write_sample_dataset, write_sample_images

BAD = Path(__file__).parent/'bad_images'/'folder'


@pytest.fixture
def ws(): return Workspace(tempfile.mkdtemp()).ensure()


def _run(capsys, ws, *argv):
    capsys.readouterr()
    code = main([*argv, '--home', str(ws.root)])
    out, err = capsys.readouterr()
    return code, out, err


def test_source_kind(tmp_path):
    pics = write_sample_images(tmp_path/'pics', n=1)
    (pics/'captions.csv').write_text('file_name,text\nimg000.png,a cat\n')
    (tmp_path/'sub').mkdir(); (tmp_path/'sub'/'metadata.jsonl').write_text('')
    text = write_sample_dataset(tmp_path/'qa.csv', fmt='csv', n=4)
    assert [source_kind(p) for p in (pics, pics/'captions.csv', tmp_path/'sub'/'metadata.jsonl', text, tmp_path/'missing.csv')] == \
           ['image', 'image', 'image', 'text', 'text']


def test_import_metadata_csv_and_refused_flags(capsys, ws, tmp_path):
    pics = write_sample_images(tmp_path/'pics', n=2)
    for p in pics.glob('*.txt'): p.unlink()
    (pics/'metadata.csv').write_text('file_name,text\nimg000.png,a cat\nimg001.png,a dog\n')
    code, _, err = _run(capsys, ws, 'datasets', 'import', str(pics), '--format', 'alpaca')
    assert code == 2 and 'format only apply to text datasets' in err and ws.ledger.list_datasets() == []
    code, _, err = _run(capsys, ws, 'datasets', 'import', str(pics), '--min-size', '64by64')
    assert code == 2 and '--min-size' in err
    code, out, _ = _run(capsys, ws, 'datasets', 'import', str(pics/'metadata.csv'), '--name', 'pets', '--trigger', 'ohwx', '--min-size', '64x64', '--json')
    rec = json.loads(out)
    assert code == 0 and (rec['kind'], rec['n_rows'], rec['meta']['trigger']) == ('image', 2, 'ohwx')
    text = write_sample_dataset(tmp_path/'qa.jsonl', fmt='alpaca', n=8)
    code, _, err = _run(capsys, ws, 'datasets', 'import', str(text), '--trigger', 'ohwx')
    assert code == 2 and 'trigger only apply to image datasets' in err


def test_bad_folder_one_line_per_file(capsys, ws):
    _, probs, _ = check_folder(BAD)
    code, _, err = _run(capsys, ws, 'datasets', 'import', str(BAD))
    lines = err.strip().splitlines()
    assert code == 2 and f'{len(probs)} bad files' in lines[0] and '--skip-bad' in lines[0]
    assert len(lines) == 1 + len(probs)
    assert sorted(l.strip().split(':')[0] for l in lines[1:]) == sorted(Path(p.file).relative_to(BAD).as_posix() for p in probs)
    assert ws.ledger.list_datasets() == [] and not any(ws.root.joinpath('datasets').glob('*'))


def test_show_delete_dispatch(capsys, ws, tmp_path):
    write_sample_images(tmp_path/'pics', n=3)
    assert _run(capsys, ws, 'datasets', 'import', str(tmp_path/'pics'))[0] == 0
    assert _run(capsys, ws, 'datasets', 'import', str(write_sample_dataset(tmp_path/'qa.jsonl', fmt='alpaca', n=8)))[0] == 0
    code, out, _ = _run(capsys, ws, 'datasets', 'list')
    assert code == 0 and [l.split()[:2] for l in out.splitlines()[2:]] == [['qa', 'text'], ['pics', 'image']]
    code, out, _ = _run(capsys, ws, 'datasets', 'show', 'pics', '--preview', '3')
    assert code == 0 and 'buckets at resolution 512:' in out and out.count('img00') == 3
    code, out, _ = _run(capsys, ws, 'datasets', 'show', 'qa', '--preview', '1')
    assert code == 0 and '--- row 0' in out
    for cmd in ('show', 'delete'):
        code, _, err = _run(capsys, ws, 'datasets', cmd, 'nope')
        assert code == 2 and "no dataset 'nope'" in err and 'qa, pics' in err
    assert _run(capsys, ws, 'datasets', 'delete', 'pics')[0] == 0
    assert [d['id'] for d in ws.ledger.list_datasets()] == ['qa'] and not ws.dataset_dir('pics').exists()


def test_serve_runs_serve_argv(capsys, ws, monkeypatch):
    calls = []
    monkeypatch.delenv('FORGENB_HOME', raising=False)
    monkeypatch.setattr(server.subprocess, 'call', lambda argv: calls.append((argv, os.environ.get('FORGENB_HOME'))) or 3)
    code, _, _ = _run(capsys, ws, 'serve', '--port', '8765', '--ip', '0.0.0.0', '--token', 't', '--root-dir', '/srv')
    root = hasattr(os, 'geteuid') and os.geteuid() == 0
    assert code == 3 and calls == [(server.serve_argv(8765, '0.0.0.0', 't', '/srv', allow_root=root), str(ws.root))]


def test_launchers_do_not_overwrite(capsys, ws, tmp_path):
    ws.ledger.add_job('j1', spec={}, status='completed')
    out = tmp_path/'nb.ipynb'
    assert _run(capsys, ws, 'attach', 'j1', '--out', str(out))[0] == 0
    assert json.loads(out.read_text())['cells'][1]['source'] == f"import forgenb\nforgenb.attach('j1', {str(ws.root)!r})"
    code, _, err = _run(capsys, ws, 'ui', '--out', str(out))
    assert code == 2 and '--force' in err and 'attach' in out.read_text()
    code, stdout, _ = _run(capsys, ws, 'ui', '--out', str(out), '--force')
    assert code == 0 and 'Dashboard' in out.read_text() and f'jupyter lab {out}' in stdout


def test_export_flags_refused_early(capsys, ws):
    assert export_kwargs('gguf', outtype='f32', from_=None, create=None, overwrite=True) == dict(outtype='f32', overwrite=True)
    with pytest.raises(InputError, match='--from does not apply to --format gguf'): export_kwargs('gguf', from_='adapter')
    code, _, err = _run(capsys, ws, 'registry', 'export', 'nope', '--format', 'peft', '--overwrite')
    assert code == 2 and '--overwrite does not apply to --format peft' in err
    code, _, err = _run(capsys, ws, 'registry', 'versions', 'nope')
    assert code == 2 and "no model named 'nope'" in err
    assert _run(capsys, ws, 'registry', 'list')[1].strip() == '(none)'
