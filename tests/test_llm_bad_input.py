"""Bad input to the LLM recipe stops `build` before training, fast, with an `InputError` that names the field and the fix.

Each case is the `tiny-cpu-demo` preset with one thing wrong. `build` must raise (never return a
`Setup`), within a few seconds (no network attempt: the hub is offline), and its message must name
the field or file and say what to change.
"""
import importlib.util, json, os, time
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import pytest, torch
from forgenb.core import InputError, Workspace
from forgenb.data.text import import_text
from forgenb.presets import spec_from_preset
from forgenb.recipes.llm import build, load_base
from forgenb.config import ModelCfg
from forgenb.test_utils import tiny_model_dir, write_sample_dataset, sample_task

@pytest.fixture(scope='module')
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp('llm_bad')
    ws = Workspace(root/'ws').ensure()
    tiny_model_dir(ws.root/'models'/'tiny-llama')
    import_text(ws, write_sample_dataset(root/'sample.jsonl', n=64), name='sample')
    long = root/'long_prompts.jsonl'
    long.write_text(''.join(json.dumps({**r, 'input': r['input'] + ' and more words' * 12}) + '\n' for r in sample_task(8)))
    longer = root/'longer_prompts.jsonl'  # beyond the tiny model's 256 tokens
    longer.write_text(''.join(json.dumps({**r, 'input': r['input'] + ' and more words' * 90}) + '\n' for r in sample_task(8)))
    (root/'empty-model').mkdir()
    return ws

CASES = {  # overrides of the preset ({root}: the scratch folder), and what the message must say
    'missing model folder': ({'model.base': '{root}/ws/models/nope'}, ['model.base', 'does not exist']),
    'folder without config': ({'model.base': '{root}/empty-model'}, ['model.base', 'no config.json']),
    'hub id not cached, offline': ({'model.base': 'Qwen/Qwen2.5-0.5B-Instruct'}, ['model.base', 'hf download Qwen/Qwen2.5-0.5B-Instruct']),
    'incompatible target module': ({'lora.target_modules': ['c_attn']}, ['lora.target_modules', 'c_attn', 'q_proj']),
    'unknown modules_to_save': ({'lora.modules_to_save': ['wte']}, ['lora.modules_to_save', 'embed_tokens']),
    'no trainable tokens': ({'data.dataset': '{root}/long_prompts.jsonl'}, ['data.max_seq_len', 'raise data.max_seq_len to at least']),
    'prompts longer than the context': ({'data.dataset': '{root}/longer_prompts.jsonl', 'data.max_seq_len': 256},
                                        ['data.max_seq_len', 'shorten the prompts: the model reads at most 256 tokens']),
    'chat template that hides the replies': ({'data.chat_template': "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"},
                                             ['data.mask_prompt', 'data.chat_template renders the assistant turns']),
    'sequence length 0': ({'data.max_seq_len': 0}, ['data.max_seq_len', 'above 0']),
    'validation set as large as the data': ({'data.val_split': None, 'data.val_size': 64}, ['data.val_size', 'from 1 to 63']),
    'unknown dataset id': ({'data.dataset': 'smaple'}, ['data.dataset', "did you mean 'sample'"]),
    'missing data file': ({'data.dataset': '{root}/nope.jsonl'}, ['data.dataset', 'not found']),
    '4-bit base without CUDA or bitsandbytes': ({'model.load_in': '4bit', 'lora.method': 'qlora'}, ['model.load_in']),
}

@pytest.fixture(autouse=True)
def offline(monkeypatch):
    "The hub is offline, whatever the environment said when huggingface_hub was imported"
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)

def _fill(over, root): return {k: v.replace('{root}', str(root)) if isinstance(v, str) else v for k, v in over.items()}

@pytest.mark.parametrize('case', CASES)
def test_bad_spec_stops_build(ws, case):
    over, needles = CASES[case]
    over = _fill(over, ws.root.parent)
    if case.startswith('4-bit'):
        if torch.cuda.is_available() and importlib.util.find_spec('bitsandbytes'): pytest.skip('4-bit loading works here')
    t = time.time()
    with pytest.raises(InputError) as e:
        build(spec_from_preset('tiny-cpu-demo', ws, **over), ws)
    msg = str(e.value)
    assert time.time() - t < 10, msg
    for n in needles: assert n in msg, (n, msg)
    assert 'Fix:' in msg or '\n' in msg, msg  # a hint, or a list of problems each with its own

def test_no_partial_dataset_left(ws):
    "A build that fails on the data leaves the workspace's dataset list as it was, apart from the imported file"
    before = {d['id'] for d in ws.ledger.list_datasets()}
    with pytest.raises(InputError): build(spec_from_preset('tiny-cpu-demo', ws, **{'data.dataset': str(ws.root.parent/'long_prompts.jsonl')}), ws)
    after = {d['id'] for d in ws.ledger.list_datasets()}
    assert after - before <= {'long_prompts'}
    assert not [p for p in ws.datasets_dir.iterdir() if p.name.startswith('.')]

def test_load_base_offline_is_fast(ws):
    "A hub id outside the cache fails in well under the 26 s a network attempt costs"
    t = time.time()
    with pytest.raises(InputError, match='not in the local Hugging Face cache'): load_base(ModelCfg(base='nobody/nothing'))
    assert time.time() - t < 2
