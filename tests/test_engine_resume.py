"""Resuming in a fresh process equals never stopping.

A first process trains 10 optimizer steps straight, and separately trains the same setup until a callback
stops it (at step 5, mid-epoch; at step 4, the end of an epoch) and saves `learn.state_dict()` plus the model
weights with `torch.save`. A second, fresh process, seeded differently, loads them with
`torch.load(weights_only=True)`, builds a new model, optimizer, scheduler and `Learner`, and trains to step 10.
Its per-batch losses, validation losses and final weights equal the straight run's (to 1e-6). The model has
dropout, so this also pins that the random streams are restored, and `grad_accum=2` over 7 batches an epoch,
so accumulation windows are ragged.
"""
import os, subprocess, sys
from functools import partial
from pathlib import Path
import torch

ROOT = Path(__file__).resolve().parents[1]


def _learner(seed, stop_at=None):
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import TensorDataset
    from forgenb.core import CancelFitException
    from forgenb.engine import Callback, Learner, make_dl, make_optimizer, make_scheduler, set_seed

    class Log(Callback):
        def __init__(self): self.losses, self.valid = [], []
        def after_loss(self): self.losses.append((self.epoch, self.batch_idx, self.loss.item()))
        def after_validate(self): self.valid.append((self.step, self.valid_loss))
        def after_step(self):
            if self.step == stop_at: raise CancelFitException()

    def data(n, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 4, generator=g)
        return TensorDataset(x, x @ torch.tensor([[1.], [-2.], [.5], [3.]]) + .1 * torch.randn(n, 1, generator=g))

    def mse(model, batch): x, y = batch; return F.mse_loss(model(x), y)

    set_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
    return Learner(model, make_dl(data(28, 0), 4, seed=7), make_dl(data(8, 1), 4, shuffle=False), loss_func=mse,
                   opt=partial(make_optimizer, lr=0.01), sched=partial(make_scheduler, name='cosine', n_steps=10, warmup=2),
                   grad_accum=2, max_steps=10, eval_every=3, cbs=[Log()])


def _result(learn):
    return dict(losses=learn.log.losses, valid=learn.log.valid, weights={k: v.clone() for k, v in learn.model.state_dict().items()})


def save(d):
    "Process 1: the straight run, and the interrupted runs' checkpoints"
    straight = _learner(0); straight.fit()
    torch.save(_result(straight), d/'straight.pt')
    for stop_at in (4, 5):
        learn = _learner(0, stop_at); learn.fit()
        assert learn.step == stop_at
        torch.save(dict(learn=learn.state_dict(), model=learn.model.state_dict(), first=_result(learn)), d/f'stop{stop_at}.pt')


def resume(d):
    "Process 2: load each checkpoint into fresh objects and train to the end"
    for stop_at in (4, 5):
        ckpt = torch.load(d/f'stop{stop_at}.pt', weights_only=True)
        learn = _learner(123)
        learn.model.load_state_dict(ckpt['model'])
        learn.load_state_dict(ckpt['learn']).fit()
        torch.save(_result(learn), d/f'resumed{stop_at}.pt')


def _run(step, d):
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', CUDA_VISIBLE_DEVICES='')
    subprocess.run([sys.executable, __file__, step, str(d)], cwd=ROOT, env=env, check=True, timeout=300)


def test_resume_in_a_fresh_process(tmp_path):
    _run('save', tmp_path)
    _run('resume', tmp_path)
    straight = torch.load(tmp_path/'straight.pt', weights_only=True)
    assert straight['losses'][-1][:2] == (2, 3) and len(straight['losses']) == 18  # 10 steps = 2 epochs of 7 + 4 batches
    for stop_at in (4, 5):
        first = torch.load(tmp_path/f'stop{stop_at}.pt', weights_only=True)['first']
        resumed = torch.load(tmp_path/f'resumed{stop_at}.pt', weights_only=True)
        n = len(first['losses'])
        assert first['losses'] == straight['losses'][:n]
        assert [b[:2] for b in resumed['losses']] == [b[:2] for b in straight['losses'][n:]]
        torch.testing.assert_close(torch.tensor([b[2] for b in resumed['losses']]),
                                   torch.tensor([b[2] for b in straight['losses'][n:]]), atol=1e-6, rtol=0)
        assert [v[0] for v in first['valid'] + resumed['valid']] == [v[0] for v in straight['valid']]
        torch.testing.assert_close(torch.tensor([v[1] for v in first['valid'] + resumed['valid']]),
                                   torch.tensor([v[1] for v in straight['valid']]), atol=1e-6, rtol=0)
        for k, w in straight['weights'].items(): torch.testing.assert_close(resumed['weights'][k], w, atol=1e-6, rtol=0)


if __name__ == '__main__':
    {'save': save, 'resume': resume}[sys.argv[1]](Path(sys.argv[2]))
