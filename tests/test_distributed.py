"""N processes train like one: DDP and FSDP through accelerate, on CPU (gloo), launched by torchrun.

The same tiny LoRA run (tiny Llama, chat rows whose prompts are masked, so micro-batches hold unequal numbers of
loss tokens; global batch 8, `grad_accum=2`, 6 steps across an epoch boundary) trains in 1 process and in 2:

- DDP, 2 processes: the per-step losses equal one process's to rtol 1e-4 and the adapter to atol 1e-5. Not bit-equal
  because each rank pads its own half-batch (other sequence lengths, other kernels) and gloo sums the gradients in
  another order: float32 rounding, ~1e-7 relative per step, which a few Adam steps keep far below these bounds.
  The loss is the mean over the window's tokens on both processes (normalized by the global token count), so the
  equality also pins that normalization.
- Stopped at step 3 on 2 processes (a `stop` checkpoint written by the main process only) and resumed in 2 fresh
  processes, the run continues exactly: losses and adapter equal the uninterrupted 2-process run (to 1e-6), with
  LoRA dropout on, since every rank reseeds from (seed, step, rank).
- A checkpoint of 2 processes (no dropout) resumed in 1 process continues the 2-process run (rtol 1e-4): batches
  are global, so the data position and optimizer state mean the same for any number of processes.
- FSDP2 (accelerate `fsdp_version=2`, decoder layers wrapped, LoRA parameters sharded with the frozen ones) trains the
  same run on 2 processes with the same losses and adapter as one process.
- Validation (13 rows in batches of 4, so the last batch is partial and the two processes' shares are unequal)
  gives one process's loss: before training to rtol 1e-6 (the same weights; only the batch shapes differ), after
  it to rtol 1e-4 (the weights differ by the training rounding above). No row counts twice.
- The Recorder's throughput counts every process: per logged step, samples/s x step time = 16 samples (the global
  batch of 8 times `grad_accum` 2) and tokens/s x step time = one process's loss tokens for that step.
"""
import json, os, subprocess, sys
from pathlib import Path
import pytest, torch

ROOT = Path(__file__).resolve().parents[1]
N_STEPS, STOP_AT = 6, 3


def _learner(dropout, stop_at=None, run_dir=None):
    import torch.nn.functional as F
    from torch.nn.utils.rnn import pad_sequence
    from peft import LoraConfig, get_peft_model
    from forgenb.core import CancelFitException
    from forgenb.callbacks import CheckpointCallback, Recorder
    from forgenb.data.text import tokenize_rows
    from forgenb.engine import Callback, Learner, make_dl, make_optimizer, set_seed
    from forgenb.test_utils import sample_task, tiny_model, tiny_tokenizer

    class Log(Callback):
        def __init__(self): self.losses = []
        def after_step(self):
            self.losses.append(self.window_loss.item())
            if self.step == stop_at: raise CancelFitException()

    def collate(exs):
        ids = [torch.tensor(e['input_ids']) for e in exs]
        return dict(input_ids=pad_sequence(ids, batch_first=True, padding_value=tok.pad_token_id),
                    attention_mask=pad_sequence([torch.ones_like(i) for i in ids], batch_first=True),
                    labels=pad_sequence([torch.tensor(e['labels']) for e in exs], batch_first=True, padding_value=-100))

    def loss(model, b): return model(**b).loss, (b['labels'][:, 1:] != -100).sum()

    tok = tiny_tokenizer()
    rows = [dict(messages=[dict(role='user', content=f"{r['instruction']}\n{r['input']}"), dict(role='assistant', content=r['output'])])
            for r in sample_task(64)]
    data = tokenize_rows(rows, tok)
    set_seed(0)
    model = get_peft_model(tiny_model('llama', tok), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=['q_proj', 'v_proj']))
    cbs = [Log(), Recorder(log_every=1)] + ([CheckpointCallback(run_dir, keep_best=False)] if run_dir else [])
    valid = make_dl(tokenize_rows(rows[:13], tok), 4, shuffle=False, collate_fn=collate)
    return Learner(model, make_dl(data, 8, seed=0, collate_fn=collate), valid, loss_func=loss, opt=lambda m: make_optimizer(m, lr=1e-2),
                   grad_accum=2, max_steps=N_STEPS, eval_epoch_end=False, cbs=cbs)


RUNS = dict(ddp=dict(dropout=0.), straight=dict(dropout=.1), first=dict(dropout=.1, stop_at=STOP_AT, ckpt=True),
            rest=dict(dropout=.1, ckpt=True, resume=True), fsdp=dict(dropout=0., fsdp=True),
            first0=dict(dropout=0., stop_at=STOP_AT, ckpt=True, run='run0'), rest1=dict(dropout=0., ckpt=True, resume=True, run='run0'))


def _train(name, out_dir):
    "Run `name` of `RUNS` in this process (one of N); the main process writes its losses and full adapter"
    from forgenb.callbacks import latest_checkpoint, load_checkpoint
    from forgenb.distributed import FSDP_ENV
    r = RUNS.get(name, RUNS['ddp'])
    run_dir = Path(out_dir)/r.get('run', 'run')
    os.environ.update(FSDP_ENV if r.get('fsdp') else dict(ACCELERATE_USE_FSDP='false'))
    learn = _learner(r['dropout'], r.get('stop_at'), run_dir if r.get('ckpt') else None)
    if r.get('resume'): load_checkpoint(learn, latest_checkpoint(run_dir))
    valid0 = learn.validate()
    learn.fit()
    h = learn.recorder.history
    flow = [(s * t, k * t) for (_, s), (_, t), (_, k) in zip(h['train/samples_per_s'], h['train/step_time'], h['train/tokens_per_s'])]
    sd = learn.accelerator.get_state_dict(learn.model)  # every process: FSDP gathers the shards
    res = dict(losses=learn.log.losses, adapter={k: v.tolist() for k, v in sd.items() if 'lora_' in k}, step=learn.step,
               n=learn.accelerator.num_processes, kind=learn.accelerator.distributed_type.value,
               valid=[valid0, learn.validate()], flow=flow)
    if learn.accelerator.is_main_process: (Path(out_dir)/f'{name}.json').write_text(json.dumps(res))
    return res


def _launch(tmp, *names):
    "Run `names` one after the other in the same 2 processes (torchrun, through forgenb.distributed.launch); their results"
    from forgenb.distributed import launch
    launch([__file__, tmp, *names], 2, echo=False)
    return [json.loads((tmp/f'{n}.json').read_text()) for n in names]


def _close(a, b, rtol=0., atol=0.):
    assert a['losses'] == pytest.approx(b['losses'], rel=rtol, abs=atol)
    assert a['adapter'].keys() == b['adapter'].keys()
    for k in a['adapter']: torch.testing.assert_close(torch.tensor(a['adapter'][k]), torch.tensor(b['adapter'][k]), rtol=0, atol=max(atol, 1e-5))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    "The one-process reference (here), 2 processes (DDP runs, two stops), a resume in 1 process (here), 2 processes (resume, FSDP)"
    tmp = tmp_path_factory.mktemp('dist')
    one = _train('one', tmp)
    ddp, straight, first, _ = _launch(tmp, 'ddp', 'straight', 'first', 'first0')
    rest1 = _train('rest1', tmp)
    rest, fsdp = _launch(tmp, 'rest', 'fsdp')
    return dict(one=one, ddp=ddp, straight=straight, first=first, rest=rest, fsdp=fsdp, rest1=rest1, tmp=tmp)


def test_ddp_equals_one_process(runs):
    one, two = runs['one'], runs['ddp']
    assert (one['n'], two['n'], two['kind'], len(two['losses'])) == (1, 2, 'MULTI_CPU', N_STEPS)
    _close(two, one, rtol=1e-4)


@pytest.mark.parametrize('kind', ['ddp', 'fsdp'])
def test_validation_and_throughput_count_every_row_once(runs, kind):
    one, two = runs['one'], runs[kind]
    assert two['valid'][0] == pytest.approx(one['valid'][0], rel=1e-6)
    assert two['valid'][1] == pytest.approx(one['valid'][1], rel=1e-4)
    assert [s for s, _ in two['flow']] == pytest.approx([16.] * N_STEPS, rel=1e-6)
    assert [k for _, k in two['flow']] == pytest.approx([k for _, k in one['flow']], rel=1e-6)


def test_fsdp_equals_one_process(runs):
    assert (runs['fsdp']['n'], runs['fsdp']['kind']) == (2, 'FSDP')
    _close(runs['fsdp'], runs['one'], rtol=1e-4)


def test_ddp_resume_is_exact(runs):
    straight, first, rest = runs['straight'], runs['first'], runs['rest']
    assert first['step'] == STOP_AT and sorted(p.name for p in (runs['tmp']/'run'/'checkpoints').iterdir()) == [f'step-{STOP_AT}', f'step-{N_STEPS}']
    assert first['losses'] == pytest.approx(straight['losses'][:STOP_AT], rel=1e-6)
    _close(rest, dict(straight, losses=straight['losses'][STOP_AT:]), rtol=1e-6, atol=1e-6)




def test_resume_on_another_world_size(runs):
    "Batches are global: a 2-process checkpoint (no dropout) resumes in 1 process and continues the 2-process run"
    assert runs['rest1']['n'] == 1
    _close(runs['rest1'], dict(runs['ddp'], losses=runs['ddp']['losses'][STOP_AT:]), rtol=1e-4)


if __name__ == '__main__':
    for name in sys.argv[2:]: _train(name, sys.argv[1])
