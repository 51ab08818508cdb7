"""A command is acknowledged within one step plus one second, whenever it arrives.

A job's `ControlCallback` looks for commands at step boundaries, at most every `poll_every_s` (one second
in a job). On a fake clock, where each batch takes `dt` seconds (so the test does not depend on the
machine's speed), a command is sent after every batch of a run, each just after the job may have polled.
Each one is acknowledged at a step boundary no later than one step plus `poll_every_s` after it was sent,
and its acknowledgement names that step; with gradient accumulation, one step is one optimizer step
(a window of batches). Commands that arrive while the job is between polls are acted on together, in the
order they were sent.
"""
import tempfile, time, types
from functools import partial
import pytest, torch


class _Clock:
    "`time` for `forgenb.callbacks`, with a `monotonic` that only the test advances"
    def __init__(self): self.t = 1000.
    def monotonic(self): return self.t
    def __getattr__(self, k): return getattr(time, k)


def _learner(cbs, grad_accum, max_steps):
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import TensorDataset
    from forgenb.engine import Learner, make_dl, make_optimizer, set_seed
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    ds = TensorDataset(x, x.sum(1, keepdim=True))
    def mse(model, batch): x, y = batch; return F.mse_loss(model(x), y)
    set_seed(0)
    return Learner(nn.Linear(4, 1), make_dl(ds, 4), make_dl(ds, 16, shuffle=False), loss_func=mse,
                   opt=partial(make_optimizer, name='sgd', lr=0.01), grad_accum=grad_accum, max_steps=max_steps, cbs=cbs)


@pytest.mark.parametrize('dt,grad_accum', [(0.3, 1), (0.07, 1), (0.15, 2), (1.7, 1)])
def test_commands_are_acknowledged_within_one_step_and_a_second(monkeypatch, dt, grad_accum):
    import forgenb.callbacks as cbm
    import forgenb.ledger  # noqa: F401  (adds Workspace.ledger)
    from forgenb.core import Workspace
    from forgenb.engine import Callback
    clock, poll, n_step = _Clock(), 1.0, 40
    monkeypatch.setattr(cbm, 'time', clock)
    led = Workspace(tempfile.mkdtemp()).ledger
    led.add_job('j', spec={})
    sent, acked = {}, {}

    class Tick(Callback):
        order = 0
        def before_batch(self): clock.t += dt  # the batch takes dt seconds

    class Client(Callback):
        order = 40  # after ControlCallback (30) has looked for commands at this boundary
        def after_batch(self):
            for c in led.q('SELECT id, result FROM commands WHERE acked_at IS NOT NULL'):
                acked.setdefault(c['id'], (clock.t, self.learn.step, c['result']['step']))
            if (n_step - self.learn.step) * grad_accum * dt > poll + 2 * dt * grad_accum:  # time left to answer
                sent[led.add_command('j', 'eval_now')] = clock.t

    learn = _learner([Tick(), cbm.ControlCallback(led, 'j', poll_every_s=poll, heartbeat_every_s=3600), Client()], grad_accum, n_step)
    learn.fit()
    step_s = dt * grad_accum
    assert len(sent) > 10 and sent.keys() == acked.keys(), 'every command sent was acknowledged'
    late = {i: (t_ack - sent[i], step_s) for i, (t_ack, _, _) in acked.items() if t_ack - sent[i] > poll + step_s + 1e-9}
    assert not late, f'acknowledged later than one step ({step_s} s) plus {poll} s: {late}'
    assert all(step == ack_step for _, step, ack_step in acked.values()), 'the acknowledgement names the step it was acted on at'
    order = [c['id'] for c in led.q('SELECT id FROM commands ORDER BY acked_at, id')]
    assert order == sorted(order), 'acted on in the order they were sent'
