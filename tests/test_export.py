"""Every export checks itself, and an export that cannot be done leaves nothing behind.

On the tiny Llama (and a tiny Qwen2 for what GGUF refuses): the merged folder loads with plain
transformers and matches base + adapter logits (fp32: within 1e-4 x max|logit|); the GGUF file reads
back with gguf's reader with architecture `llama`, the expected tensor names and shapes, and, run in
numpy, gives the merged model's logits; a Llama whose tokenizer is a SentencePiece model (Llama 2 style)
gets a `llama` GGUF vocabulary equal to that model's pieces, scores and piece types, with its BOS, EOS and
UNK ids. The Modelfile's Go template renders fixed conversations exactly as the tokenizer's chat template
does (ChatML, and the real Llama 3, Gemma, Phi-3 (both of its templates) and Mistral templates, as
Ollama's template/index.json lists them); for those real templates the Modelfile's TEMPLATE is the
family's and renders Ollama's own expected output (its template/testdata), and its stop lines are the
template's end-of-turn word, EOS and the stops of Ollama's template/<name>.json. With an `ollama` binary
the model is created and smoke-tested, and without one `create=True` is refused.
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

def _train(ws, name, arch='llama', base=None):
    spec = spec_from_preset('tiny-cpu-demo', ws, **{'model.base': str(base or ws.root.parent/'models'/f'tiny-{arch}'), 'train.max_steps': 3,
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
    assert mf['from'] == str(ws.run_dir(job['id'])/'exports'/'merged') and mf['stops'] == ['<|im_end|>', '<|eos|>', '<|im_start|>']
    tok = tiny_tokenizer()
    conv = [dict(role='system', content='Be brief.'), dict(role='user', content='Reverse the letters.\nabc'),
            dict(role='assistant', content='cba'), dict(role='user', content='Again: xyz')]
    assert ex.render_go(mf['template'], conv) == tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)

# The real chat templates, as ollama/ollama's template/index.json lists them (each maps a Hugging Face
# chat template to Ollama's template of that family): llama3-instruct, gemma-instruct, phi-3 (three of
# them: the first Phi-3 mini/medium template, the same with BOS, the later one), mistral-instruct.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
          "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
         "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
         "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
         "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
PHI3_FIRST = ("{% for message in messages %}{% if (message['role'] == 'user') %}{{'<|user|>' + '\n' + message['content'] + '<|end|>' + '\n' + "
              "'<|assistant|>' + '\n'}}{% elif (message['role'] == 'assistant') %}{{message['content'] + '<|end|>' + '\n'}}{% endif %}{% endfor %}")
PHI3_FIRST_BOS = '{{ bos_token }}' + PHI3_FIRST
PHI3 = ("{{ bos_token }}{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}"
           "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")

@pytest.mark.parametrize('tpl,family,stop', [(LLAMA3, 'llama3', '<|eot_id|>'), (GEMMA, 'gemma', '<end_of_turn>'), (PHI3, 'phi3', '<|end|>'),
                                             (PHI3_FIRST, 'phi3-nosys', '<|end|>'), (PHI3_FIRST_BOS, 'phi3-nosys', '<|end|>'),
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

# Ollama's own rendering of one conversation, from ollama/ollama template/testdata/<template>/user-assistant-user
OLLAMA_CHAT = [dict(role='user', content='Hello, how are you?'), dict(role='assistant', content="I'm doing great. How can I help you today?"),
               dict(role='user', content="I'd like to show off how chat templating works!")]
OLLAMA_RENDERS = {
    'llama3': ("<|start_header_id|>user<|end_header_id|>\n\nHello, how are you?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
               "I'm doing great. How can I help you today?<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
               "I'd like to show off how chat templating works!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    'gemma': ("<start_of_turn>user\nHello, how are you?<end_of_turn>\n<start_of_turn>model\nI'm doing great. How can I help you today?"
              "<end_of_turn>\n<start_of_turn>user\nI'd like to show off how chat templating works!<end_of_turn>\n<start_of_turn>model\n"),
    'phi3': ("<|user|>\nHello, how are you?<|end|>\n<|assistant|>\nI'm doing great. How can I help you today?<|end|>\n"
             "<|user|>\nI'd like to show off how chat templating works!<|end|>\n<|assistant|>\n")}
_PHI3_STOPS = ['<|end|>', '<|eos|>', '<|system|>', '<|user|>', '<|assistant|>']

@pytest.mark.parametrize('tpl,family,stops', [
    (LLAMA3, 'llama3', ['<|eot_id|>', '<|eos|>', '<|start_header_id|>', '<|end_header_id|>']),
    (GEMMA, 'gemma', ['<end_of_turn>', '<|eos|>', '<start_of_turn>']),
    (PHI3, 'phi3', _PHI3_STOPS), (PHI3_FIRST, 'phi3-nosys', _PHI3_STOPS), (PHI3_FIRST_BOS, 'phi3-nosys', _PHI3_STOPS)])
def test_modelfile_of_real_chat_templates(ws, job, tpl, family, stops, monkeypatch):
    import forgenb.recipes.llm as llm
    tok = tiny_tokenizer(); tok.chat_template = tpl
    monkeypatch.setattr(llm, 'load_tokenizer', lambda cfg, src=None: tok)  # the job's model, carrying this template
    m = ex.export(ws, 'rev@active', 'ollama', overwrite=True)
    text = (Path(m['path'])/'Modelfile').read_text()
    mf = ex.parse_modelfile(text)
    assert m['family'] == family and mf['template'] == ex.FAMILIES[family]
    assert [l for l in text.splitlines() if l.startswith('PARAMETER')] == [f'PARAMETER stop {json.dumps(s)}' for s in stops]
    assert ex.render_go(mf['template'], OLLAMA_CHAT) == OLLAMA_RENDERS[family.split('-')[0]]

def _spm_llama(path: Path):
    "A tiny Llama whose tokenizer is a SentencePiece BPE model trained here, Llama 2 style; the folder and the model's processor"
    import io, sentencepiece as spm
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges
    from forgenb.test_utils import tiny_model
    rows = [json.loads(l) for l in write_sample_dataset(path.parent/'spm.jsonl', n=200).read_text().splitlines()]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([' '.join(r.values()) for r in rows]), model_writer=buf, vocab_size=320,
                                   model_type='bpe', byte_fallback=True, normalization_rule_name='identity',
                                   character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    vocab = {sp.IdToPiece(i): i for i in range(sp.vocab_size())}  # what transformers builds from the .model (it needs protobuf for that)
    tok = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab, {p: sp.GetScore(i) for p, i in vocab.items()}))
    tok.chat_template = GEMMA.replace("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}", '')
    for text in ('Reverse the letters.', 'ab cd', 'Hello World!\n ünï 42'): assert tok.encode(text, add_special_tokens=False) == sp.encode(text)
    tiny_model('llama', tok).save_pretrained(path); tok.save_pretrained(path)
    (path/'tokenizer.model').write_bytes(buf.getvalue())
    return path, sp

def test_gguf_of_a_sentencepiece_llama_keeps_its_vocab(ws):
    base, sp = _spm_llama(ws.root.parent/'models'/'spm-llama')
    job = _train(ws, 'spm', base=base)
    m = ex.export(ws, job['id'], 'gguf', outtype='f32')  # verified inside: names, shapes, and logits run in numpy
    merged = ws.run_dir(job['id'])/'exports'/'merged'
    assert (merged/'tokenizer.model').read_bytes() == (base/'tokenizer.model').read_bytes()
    r = gguf.GGUFReader(m['file'])
    arr = lambda k: [r.fields[k].parts[i] for i in r.fields[k].data]
    T, n = gguf.TokenType, sp.vocab_size()
    want_types = [T.UNKNOWN if sp.IsUnknown(i) else T.CONTROL if sp.IsControl(i) else T.BYTE if sp.IsByte(i) else T.NORMAL for i in range(n)]
    assert ex._field(r, 'tokenizer.ggml.model') == 'llama'
    assert [bytes(p).decode() for p in arr('tokenizer.ggml.tokens')] == [sp.IdToPiece(i) for i in range(n)]
    assert [float(p[0]) for p in arr('tokenizer.ggml.scores')] == [sp.GetScore(i) for i in range(n)]
    assert [int(p[0]) for p in arr('tokenizer.ggml.token_type')] == [int(t) for t in want_types]
    assert T.BYTE in want_types and T.UNKNOWN in want_types and T.CONTROL in want_types and T.NORMAL in want_types
    ids = {k: ex._field(r, f'tokenizer.ggml.{k}_token_id') for k in ('bos', 'eos', 'unknown')}
    assert ids == dict(bos=sp.bos_id(), eos=sp.eos_id(), unknown=sp.unk_id()) == dict(bos=1, eos=2, unknown=0)

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
