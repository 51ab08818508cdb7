"""bf16 on CPU runs the LLM recipe's GPU dtype path, and it trains and resumes exactly.

What a GPU job does by default (`model.dtype: auto` is bf16 there): a bf16 frozen base, fp32 LoRA weights (peft's
`autocast_adapter_dtype`), the forward under bf16 autocast, the chunked cross-entropy over bf16 hidden states. CPU tests
otherwise run fp32 (the default on a CPU), so this file pins that path here, with padding and with packing
(per-sequence attention over flattened batches): the base stays bf16 and the adapter fp32 after training, the losses
are finite, the loss on the training rows falls, and a job stopped at step 3 and resumed ends with the uninterrupted
run's losses (bit-equal: CPU kernels are deterministic) and adapter.
"""
import pytest, torch
from forgenb.test_utils import StopAt


def _spec(ws, packing, **kw):
    from forgenb.presets import spec_from_preset
    from forgenb.test_utils import tiny_model_dir, write_sample_dataset
    return spec_from_preset('tiny-cpu-demo', ws, **{'model.base': str(tiny_model_dir(ws.root/'tiny')), 'model.dtype': 'bf16',
                                                  'train.precision': 'bf16', 'train.max_steps': 6, 'train.lr': 3e-3,
                                                  'train.warmup': 0, 'train.eval_every': 0, 'train.log_every': 1,
                                                  'sample.every': 0, 'sample.prompts': ['abc'], 'sample.max_new_tokens': 4,
                                                  'checkpoint.every': 0, 'data.packing': packing, 'data.max_seq_len': 64,
                                                  'data.dataset': str(write_sample_dataset(ws.root/'rows.jsonl', n=64)), **kw})


@pytest.mark.parametrize('packing', [False, True])
def test_bf16_trains_keeps_its_dtypes_and_resumes_exactly(tmp_path, packing):
    from safetensors.torch import load_file
    from forgenb.core import Workspace
    from forgenb.recipes import llm as L
    from forgenb.run import run_job, train
    ws = Workspace(tmp_path/'ws').ensure()
    s = L.build(_spec(ws, packing), ws)
    assert {p.dtype for p in s.model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in s.model.parameters() if p.requires_grad} == {torch.float32}
    straight = train(_spec(ws, packing), ws, progress='off')
    stopped = train(_spec(ws, packing), ws, progress='off', cbs=[StopAt(3)])
    assert stopped['status'] == 'stopped' and stopped['step'] == 3
    done = run_job(ws, stopped['id'], progress='off')
    assert (straight['status'], done['status'], done['step']) == ('completed', 'completed', 6), (straight['error'], done['error'])
    loss = lambda j: [v for _, v in ws.ledger.metrics(j['id'], 'train/loss')['train/loss']]
    a = loss(straight)
    assert len(a) == 6 and all(torch.isfinite(torch.tensor(a))) and a[-1] < a[0]
    assert loss(stopped) == a
    wa, wb = (load_file(f"{j['result']['adapter']}/adapter_model.safetensors") for j in (straight, done))
    assert wa.keys() == wb.keys() and {v.dtype for v in wa.values()} == {torch.float32}
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
