"""Every export checks itself, and an export that cannot be done leaves nothing behind.

On the tiny Llama (and a tiny Qwen2 for what GGUF refuses): the merged folder loads with plain
transformers and matches base + adapter logits (fp32: within 1e-4 x max|logit|); the GGUF file reads
back with gguf's reader with architecture `llama`, the expected tensor names and shapes, and, run in
numpy, gives the merged model's logits; the Modelfile's Go template renders fixed conversations
exactly as the tokenizer's chat template does (ChatML, Llama 3, Gemma, Phi-3 and Mistral style templates); with
an `ollama` binary the model is created and smoke-tested, and without one `create=True` is refused.
"""
import os, json, stat
os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
from pathlib import Path
import gguf, pytest, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from forgenb.core import Workspace, InputError
from forgenb.data.text import import_text
from forgenb.presets import spec_from_preset
from forgenb.run import train
from forgenb.recipes.llm import load_base
from forgenb.test_utils import tiny_model_dir, tiny_tokenizer, write_sample_dataset
from forgenb import export as ex

@pytest.fixture(scope='module')
def ws(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp('exp')
    ws = Workspace(root/'ws').ensure()
    for arch in ('llama', 'qwen2'): tiny_model_dir(root/'models'/f'tiny-{arch}', arch=arch)
    import_text(ws, write_sample_dataset(root/'s.jsonl', n=128), name='sample')
    return ws

def _train(ws, name, arch='llama'):
    spec = spec_from_preset('tiny-cpu-demo', ws, **{'model.base': str(ws.root.parent/'models'/f'tiny-{arch}'), 'train.max_steps': 3,
                            'train.warmup': 0, 'train.lr': 1e-2, 'train.eval_every': 0, 'checkpoint.every': 0, 'sample.every': 0,
                            'data.val_split': None, 'data.val_size': 8})
    return train(spec, ws, name=name, progress='off')

@pytest.fixture(scope='module')
def job(ws): return _train(ws, 'rev')

def _leftovers(d: Path): return sorted(p.name for p in d.iterdir() if p.name.startswith('.')) if d.exists() else []

def test_merged_loads_and_matches_base_plus_adapter(ws, job):
    m = ex.export(ws, 'rev@active', 'merged')
    d = Path(m['path'])
    assert d == ws.run_dir(job['id'])/'exports'/'merged' and not (d/'adapter_config.json').exists()
    merged = AutoModelForCausalLM.from_pretrained(d)
    assert type(merged).__name__ == 'LlamaForCausalLM'
    base, tok = load_base(ex.source(ws, 'rev@active')['spec'].model)
    ref = PeftModel.from_pretrained(base, job['result']['adapter']).eval()
    ids = ex.probe_ids(tok)
    with torch.no_grad():
        want = ref(ids).logits
        got = merged(ids).logits
        with ref.disable_adapter(): plain = ref(ids).logits
    assert (want - plain).abs().max() > 1e-2  # the adapter does change the model, so the match below means something
    assert (got - want).abs().max() <= 1e-4 * max(1., want.abs().max().item())
    assert m['check']['max_logit_diff'] <= m['check']['allowed']
    man = json.loads((d/ex.MANIFEST).read_text())
    assert man['format'] == 'merged' and man['lineage']['job_id'] == job['id'] and 'model.safetensors' in man['files']
    with pytest.raises(InputError, match='overwrite=True'): ex.export(ws, 'rev@active', 'merged')

def test_gguf_reads_back_and_computes_the_same(ws, job):
    m = ex.export(ws, job['id'], 'gguf', outtype='f32')
    r = gguf.GGUFReader(m['file'])
    assert ex._field(r, 'general.architecture') == 'llama' and ex._field(r, 'llama.block_count') == 2
    assert ex._field(r, 'tokenizer.ggml.model') == 'gpt2' and ex._field(r, 'tokenizer.chat_template')
    per_block = ['attn_norm', 'attn_q', 'attn_k', 'attn_v', 'attn_output', 'ffn_norm', 'ffn_gate', 'ffn_up', 'ffn_down']
    names = {'token_embd.weight', 'output_norm.weight'} | {f'blk.{i}.{n}.weight' for i in range(2) for n in per_block}
    shapes = {t.name: tuple(int(x) for x in reversed(t.shape.tolist())) for t in r.tensors}
    assert set(shapes) == names  # tied embeddings: no output.weight
    tok = tiny_tokenizer()
    assert shapes['token_embd.weight'] == (len(tok), 64) and shapes['blk.0.attn_k.weight'] == (32, 64)
    assert shapes['blk.1.ffn_down.weight'] == (64, 128) and shapes['output_norm.weight'] == (64,)
    merged = AutoModelForCausalLM.from_pretrained(ws.run_dir(job['id'])/'exports'/'merged')
    ids = ex.probe_ids(tok)
    with torch.no_grad(): want = merged(ids).logits[0].numpy()
    assert abs(ex.gguf_logits(m['file'], ids) - want).max() < 1e-4

def test_gguf_f16_is_smaller_and_close(ws, job):
    m = ex.export(ws, job['id'], 'gguf', overwrite=True)
    r = gguf.GGUFReader(m['file'])
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types['blk.0.attn_q.weight'] == 'F16' and types['blk.0.attn_norm.weight'] == 'F32'
    assert m['check']['logits']['max_logit_diff'] <= m['check']['logits']['allowed']

def test_modelfile_template_renders_like_the_chat_template(ws, job):
    m = ex.export(ws, 'rev@active', 'ollama')
    assert m['ollama'].startswith('not created: the ollama binary is not on PATH') and 'ollama create rev:v1 -f' in m['ollama']
    mf = ex.parse_modelfile((Path(m['path'])/'Modelfile').read_text())
    assert mf['from'] == str(ws.run_dir(job['id'])/'exports'/'merged') and mf['stops'] == ['<|im_end|>', '<|eos|>']
    tok = tiny_tokenizer()
    conv = [dict(role='system', content='Be brief.'), dict(role='user', content='Reverse the letters.\nabc'),
            dict(role='assistant', content='cba'), dict(role='user', content='Again: xyz')]
    assert ex.render_go(mf['template'], conv) == tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)

LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
          "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
         "{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
         "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")

PHI3 = ("{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
        "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
        "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}"
           "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")

@pytest.mark.parametrize('tpl,family,stop', [(LLAMA3, 'llama3', '<|eot_id|>'), (GEMMA, 'gemma', '<end_of_turn>'), (PHI3, 'phi3', '<|end|>'),
                                             (MISTRAL, 'mistral', '<|eos|>')])
def test_other_families_are_found_and_checked(tpl, family, stop):
    tok = tiny_tokenizer(); tok.chat_template = tpl
    fam, go = ex.ollama_template(tok)
    assert fam == family and ex.stop_words(tok)[0] == stop
    conv = [dict(role='user', content='hi'), dict(role='assistant', content='yo'), dict(role='user', content='and?')]
    want = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert ex.render_go(go, conv) == want.removeprefix(tok.bos_token)  # llama.cpp and Ollama add BOS when they tokenize

def test_unknown_template_is_refused():
    tok = tiny_tokenizer(); tok.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"
    with pytest.raises(InputError, match='matches none of the known families'): ex.ollama_template(tok)
    assert ex.template_mismatch(tok, ex.FAMILIES['chatml']).startswith("for ['user']")

@pytest.fixture
def fake_ollama(tmp_path, monkeypatch):
    "An `ollama` on PATH that logs its arguments; `run` answers, or fails when FAIL is set"
    b, log = tmp_path/'bin', tmp_path/'calls.txt'
    b.mkdir(); (b/'ollama').write_text(f'#!/bin/sh\necho "$@" >> {log}\n'
                                       'if [ "$1" = run ]; then [ -n "$FAIL" ] && exit 1; echo olleh; fi\n')
    (b/'ollama').chmod(stat.S_IRWXU)
    monkeypatch.setenv('PATH', f"{b}{os.pathsep}{os.environ['PATH']}")
    return log

def test_ollama_create_and_smoke_test(ws, job, fake_ollama):
    m = ex.export(ws, 'rev@active', 'ollama', from_='gguf', overwrite=True)
    assert m['ollama']['reply'] == 'olleh' and m['ollama']['model'] == 'rev:v1'
    calls = fake_ollama.read_text().splitlines()
    assert calls[0].startswith('create rev:v1 -f ') and calls[1] == 'run rev:v1 Hello'
    assert ex.parse_modelfile((Path(m['path'])/'Modelfile').read_text())['from'].endswith('-f16.gguf')

def test_failed_smoke_test_leaves_nothing(ws, fake_ollama, monkeypatch):
    job = _train(ws, 'smoke')
    monkeypatch.setenv('FAIL', '1')
    with pytest.raises(RuntimeError, match='smoke test failed'): ex.export(ws, 'smoke@active', 'ollama')
    d = ws.run_dir(job['id'])/'exports'
    assert not (d/'ollama').exists() and not _leftovers(d)
    assert fake_ollama.read_text().splitlines()[-1] == 'rm smoke:v1'

def test_impossible_exports_fail_clearly_and_leave_nothing(ws, monkeypatch):
    monkeypatch.setenv('PATH', '/nonexistent')
    job = _train(ws, 'qwen', arch='qwen2')
    exp = ws.run_dir(job['id'])/'exports'
    with pytest.raises(InputError, match='GGUF export supports llama, mistral models; this one is qwen2'): ex.export(ws, 'qwen@active', 'gguf')
    assert not exp.exists()
    with pytest.raises(InputError, match='ollama binary, which is not on PATH'): ex.export(ws, 'qwen@active', 'ollama', create=True)
    assert not exp.exists()
    with pytest.raises(InputError, match='unknown export format'): ex.export(ws, 'qwen@active', 'kohya')
    with pytest.raises(InputError, match='unknown Modelfile source'): ex.export(ws, 'qwen@active', 'ollama', from_='cloud')
    assert not exp.exists() or not any(exp.iterdir())
