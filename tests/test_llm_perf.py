"""The LLM recipe's speed parts change nothing but speed, and a training step never waits for the device.

- `chunked_ce` gives the cross-entropy of the full logits, and the same gradients (hidden states and head), for
  any chunk size, with ignored targets, and under `no_grad`;
- `causal_lm_loss` on a packed batch gives the padded batch's loss and adapter gradients, for every tiny family
  (whether it trains with `sdpa_varlen` and the chunked loss, or falls back to transformers' own);
- `causal_lm_loss` keeps packed sequences apart even on a model whose config has `use_cache=True` (with a cache,
  transformers lets packed sequences attend to each other): it forces `use_cache=False`;
- outside log steps, a `Learner` step with the recipe's collators, loss and `sdpa_varlen` attention calls none of
  `.item()`, `.cpu()`, `.tolist()`, `.numpy()`, `float()`, `int()` or `bool()` on a tensor, padded or packed;
- `train.compile` compiles the model `build` returns.

(The packing isolation check for sdpa, eager and sdpa_varlen, and a packed run taking the same steps as a padded
one, are lessons in nbs/20_recipes.llm.ipynb.)
"""
import traceback
import numpy as np, pytest, torch
import torch.nn.functional as F
from forgenb.callbacks import Recorder
from forgenb.config import LoraCfg
from forgenb.engine import Callback, Learner, make_dl
from forgenb.recipes.llm import (PackCollator, PadCollator, apply_lora, build, causal_lm_loss, chunked_ce, make_collator,
                                 train_attention)
from forgenb.test_utils import TINY_ARCHS, tiny_model, tiny_tokenizer


@pytest.fixture(scope='module')
def tok(): return tiny_tokenizer()

def _examples(n, lo=5, hi=40, seed=0):
    rng = np.random.default_rng(seed)
    return [dict(input_ids=(ids := rng.integers(5, 200, k).tolist()), labels=ids) for k in rng.integers(lo, hi, n)]


# chunked cross-entropy ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('chunk', [1, 7, 37, 1000])
@pytest.mark.parametrize('head_trains', [False, True])
def test_chunked_ce_equals_plain(chunk, head_trains):
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=head_trains)
    y = torch.randint(0, 50, (37,)); y[::3] = -100
    plain, ours = F.cross_entropy(h @ w.T, y), chunked_ce(h, w, y, chunk=chunk)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)
    inputs = (h, w) if head_trains else (h,)
    for a, b in zip(torch.autograd.grad(ours, inputs), torch.autograd.grad(plain, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    with torch.no_grad(): torch.testing.assert_close(chunked_ce(h, w, y, chunk=chunk), plain.detach(), rtol=1e-5, atol=1e-6)

def test_chunked_ce_all_ignored_is_zero_with_zero_grads():
    h, w = torch.randn(8, 4, requires_grad=True), torch.randn(10, 4)
    loss = chunked_ce(h, w, torch.full((8,), -100), chunk=3)
    assert loss.item() == 0.
    assert torch.equal(torch.autograd.grad(loss, h)[0], torch.zeros_like(h))


# packing isolation needs use_cache=False ------------------------------------------------------------------------

def test_causal_lm_loss_forces_no_cache(tok):
    exs = _examples(3)
    m = tiny_model('llama', tok).eval()
    m.config.use_cache = True
    packed, pad = PackCollator()(exs), PadCollator(tok.pad_token_id)(exs)
    core = {k: packed[k] for k in ('input_ids', 'labels', 'position_ids')}
    with torch.no_grad():
        padded = m(**{k: v for k, v in pad.items() if k != 'n_tokens'}).loss
        assert abs(m(**core).loss - padded) > 1e-3  # the library default leaks across packed sequences
        torch.testing.assert_close(causal_lm_loss(m, packed)[0], padded, rtol=0, atol=1e-5)


@pytest.mark.parametrize('arch', TINY_ARCHS)
def test_packed_loss_and_grads_equal_padded_for_every_family(tok, arch):
    m = tiny_model(arch, tok)
    m.set_attn_implementation(train_attention(m))
    pm = apply_lora(m, LoraCfg(r=4, alpha=8, dropout=0.))
    exs = _examples(4)
    params = [p for p in pm.parameters() if p.requires_grad]
    (lp, _), (lq, _) = causal_lm_loss(pm, PadCollator(tok.pad_token_id)(exs)), causal_lm_loss(pm, PackCollator()(exs))
    ref = pm(**{k: v for k, v in PadCollator(tok.pad_token_id)(exs).items() if k != 'n_tokens'}, use_cache=False).loss
    torch.testing.assert_close(lp, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(lq, ref, rtol=0, atol=1e-5)
    for a, b in zip(torch.autograd.grad(lq, params), torch.autograd.grad(ref, params)): torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# no host sync in a step ------------------------------------------------------------------------------------------

SYNCS = ('item', 'cpu', 'tolist', 'numpy', '__float__', '__int__', '__bool__')

class SyncCounter(Callback):
    "Counts tensor-to-host reads in each batch, by whether its step logs (`Recorder(log_every=4)`)"
    order = 100
    def __init__(self): self.calls, self.orig, self.logs = {True: [], False: []}, {}, None
    def before_fit(self):
        for name in SYNCS:
            f = self.orig[name] = getattr(torch.Tensor, name)
            def counted(t, *a, _f=f, _name=name, **kw):
                if self.logs is not None and not _host_counter():
                    self.calls[self.logs].append((_name, ''.join(traceback.format_stack(limit=5)[:-1])))
                return _f(t, *a, **kw)
            setattr(torch.Tensor, name, counted)
    def after_fit(self):
        for name, f in self.orig.items(): setattr(torch.Tensor, name, f)
    def before_batch(self):
        s = self.learn.step + 1
        self.logs = s % 4 == 0 or s == 1
    def after_batch(self): self.logs = None

def _host_counter() -> bool:
    # torch's foreach AdamW reads its step counter, a CPU tensor by design (not `capturable`), each step; on a GPU
    # the fused AdamW keeps it on the device. It is host memory either way: not a device sync.
    return any('torch/optim/' in f.filename for f in traceback.extract_stack(limit=4)[:-2])

@pytest.mark.parametrize('packing', [False, True])
def test_no_host_sync_outside_log_steps(tok, packing):
    m = tiny_model('llama', tok)
    m.set_attn_implementation(train_attention(m))
    pm = apply_lora(m, LoraCfg(r=4, alpha=8))
    count = SyncCounter()
    learn = Learner(pm, make_dl(_examples(64), 4, True, 0, make_collator(tok, packing)), loss_func=causal_lm_loss,
                    cbs=[Recorder(log_every=4), count], max_grad_norm=1.0, max_steps=9)
    learn.fit()
    assert pm.base_model.model.config._attn_implementation == 'sdpa_varlen'
    assert count.calls[False] == [], count.calls[False][0][1]
    assert any(name == 'tolist' for name, _ in count.calls[True])  # the counter sees the Recorder's one read per log step
    assert learn.recorder.history['train/tokens_per_s']


# torch.compile is wired ------------------------------------------------------------------------------------------

def test_train_compile_compiles_the_model(tmp_path):
    from forgenb.core import Workspace
    from forgenb.data.text import import_text
    from forgenb.presets import spec_from_preset
    from forgenb.test_utils import tiny_model_dir, write_sample_dataset
    ws = Workspace(tmp_path/'ws').ensure()
    tiny_model_dir(ws.root/'models'/'tiny-llama')
    import_text(ws, write_sample_dataset(tmp_path/'sample.jsonl', n=64), name='sample')
    over = {'data.val_split': None, 'data.val_size': None, 'train.max_steps': 2}
    plain = build(spec_from_preset('tiny-cpu-demo', ws, **over), ws)
    compiled = build(spec_from_preset('tiny-cpu-demo', ws, **over, **{'train.compile': True}), ws)
    assert plain.model._compiled_call_impl is None and compiled.model._compiled_call_impl is not None
