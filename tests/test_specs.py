"""Every bad job spec gets a clear error before any training starts: the error names the file, the
line and the field path, and says how to fix it. Type errors come from `load_spec` (all problems at
once), errors in sense from `validate`. One file per mistake lives in tests/bad_specs/."""
import os
os.environ.setdefault('HF_HUB_OFFLINE', '1')
from pathlib import Path
import pytest
from forgenb.core import InputError
from forgenb.catalog import GiB, model_info
from forgenb.config import load_spec, validate
from forgenb.test_utils import tiny_model_dir

BAD = Path(__file__).parent/'bad_specs'
CPU = dict(cuda=False, bf16=False, bnb=False, memory=dict(device='cpu', free=8 * GiB, total=16 * GiB))

@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp('models')/'tiny-llama')

@pytest.fixture
def here(model_dir, tmp_path, monkeypatch):
    "A working folder where ./tiny-llama and data.jsonl exist, as the spec files expect"
    (tmp_path/'tiny-llama').symlink_to(model_dir)
    (tmp_path/'data.jsonl').write_text('{"text": "hello"}\n')
    monkeypatch.chdir(tmp_path)
    return tmp_path

def line_of(name, key):
    "1-based line of the last line in a bad spec that starts with `key`"
    return [i + 1 for i, l in enumerate((BAD/name).read_text().splitlines()) if l.strip().startswith(key)][-1]

# (file, field path, key whose line is reported, text the error must contain)
LOAD_ERRORS = [
    ('unknown_field.yaml', 'train.batch_sise', 'batch_sise:', "did you mean 'batch_size'?"),
    ('foreign_name.yaml', 'model.lr', 'lr:', 'move it to train.lr'),
    ('foreign_name.yaml', 'train.gradient_accumulation_steps', 'gradient_accumulation_steps:', 'forgenb calls it train.grad_accum'),
    ('wrong_type.yaml', 'lora.r', 'r:', 'valid integer'),
    ('wrong_type.yaml', 'train.scheduler', 'scheduler:', "'constant', 'linear' or 'cosine'"),
    ('seq_len_0.yaml', 'data.max_seq_len', 'max_seq_len:', 'greater than 0'),
]

@pytest.mark.parametrize('name,path,key,text', LOAD_ERRORS)
def test_type_errors_name_field_and_line(here, name, path, key, text):
    with pytest.raises(InputError) as ei: load_spec(BAD/name)
    p = next(p for p in ei.value.problems if p.path == path)
    assert p.line == line_of(name, key) and text in str(p)
    assert name in str(ei.value) and path in str(ei.value)

def test_all_problems_reported_at_once(here):
    with pytest.raises(InputError) as ei: load_spec(BAD/'wrong_type.yaml')
    assert [p.path for p in ei.value.problems] == ['lora.r', 'train.scheduler']
    assert '2 problems' in str(ei.value)

@pytest.mark.parametrize('name,line,text', [
    ('yaml_syntax.yaml', None, 'invalid YAML'),
    ('duplicate_key.yaml', 'lr:', "key 'lr' appears twice"),
    ('bad_json.json', 3, 'invalid JSON'),
])
def test_syntax_errors_name_file_and_line(here, name, line, text):
    with pytest.raises(InputError) as ei: load_spec(BAD/name)
    e = ei.value
    assert Path(e.file).name == name and text in str(e) and e.hint
    if isinstance(line, str): line = line_of(name, line)
    if line: assert e.line == line
    else: assert e.line is not None and f'{name}:{e.line}' in str(e)

# (file, field path, key whose line is reported, text the error must contain)
SENSE_ERRORS = [
    ('lr_too_high.yaml', 'train.lr', 'lr:', 'far too high'),
    ('rank_4096.yaml', 'lora.r', 'r:', 'exceeds the model hidden size 64'),
    ('seq_len_over_context.yaml', 'data.max_seq_len', 'max_seq_len:', 'longer than the model context of'),
    ('missing_model.yaml', 'model.base', 'base:', 'model folder does not exist'),
]

@pytest.mark.parametrize('name,path,key,text', SENSE_ERRORS)
def test_sense_errors_name_field_and_line(here, name, path, key, text):
    load_spec(BAD/name)  # well typed
    r = validate(BAD/name, env=CPU)
    assert not r.ok
    p = next(p for p in r.errors if p.path == path)
    assert p.line == line_of(name, key) and text in p.message and p.hint
    with pytest.raises(InputError) as ei: r.raise_errors()
    assert path in str(ei.value)

def test_context_named(here):
    p = next(p for p in validate(BAD/'seq_len_over_context.yaml', env=CPU).errors if p.path == 'data.max_seq_len')
    ctx = model_info('./tiny-llama').context_len
    assert f'context of {ctx} tokens' in p.message and p.hint == f'use at most {ctx}'

def test_validate_reports_type_errors_too(here):
    r = validate(BAD/'unknown_field.yaml', env=CPU)
    assert not r.ok and [p.path for p in r.errors] == ['train.batch_sise']
    r = validate(BAD/'yaml_syntax.yaml', env=CPU)
    assert not r.ok and r.errors[0].line is not None
