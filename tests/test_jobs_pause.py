"""A soft pause waits at a bounded polling rate, even where steps poll at every boundary.

A job of N processes runs its `ControlCallback` with `poll_every_s=0` (all ranks poll at the same steps,
each poll a broadcast and a SQLite read). While softly paused, the callback looks for commands every
`pause_poll_s` (default 1 s) instead: over a pause of about a second and a half it asks the ledger a
handful of times, not thousands, and the resume still releases it and the run completes.
"""
import tempfile, threading, time
from functools import partial
import torch


class _Counting:
    "A ledger that counts `pending_commands` calls made while the callback is paused"
    def __init__(self, led): self.led, self.cb, self.n = led, None, 0
    def __getattr__(self, k): return getattr(self.led, k)
    def pending_commands(self, job_id):
        if self.cb is not None and self.cb.paused: self.n += 1
        return self.led.pending_commands(job_id)


def _learner(cbs):
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import TensorDataset
    from forgenb.engine import Learner, make_dl, make_optimizer
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    def mse(model, batch): x, y = batch; return F.mse_loss(model(x), y)
    ds = TensorDataset(x, x.sum(1, keepdim=True))
    return Learner(nn.Linear(4, 1), make_dl(ds, 4), None, loss_func=mse,
                   opt=partial(make_optimizer, name='sgd', lr=0.01), max_steps=6, cbs=cbs)


def test_paused_wait_polls_a_bounded_number_of_times():
    import forgenb.ledger  # noqa: F401
    from forgenb.callbacks import ControlCallback
    from forgenb.core import Workspace
    led = Workspace(tempfile.mkdtemp()).ledger
    led.add_job('p', spec={})
    counting = _Counting(led)
    cb = counting.cb = ControlCallback(counting, 'p', poll_every_s=0.)
    led.add_command('p', 'pause')  # read at before_fit: the run pauses before its first step
    def release():
        while led.get_job('p')['status'] != 'paused': time.sleep(0.01)
        time.sleep(1.5); led.add_command('p', 'resume')
    t = threading.Thread(target=release); t.start()
    learn = _learner([cb]); learn.fit(); t.join()
    assert learn.step == 6 and led.get_job('p')['status'] == 'running'
    assert 1 <= counting.n <= 6, counting.n  # a poll at once, then one per `pause_poll_s`; spinning would make thousands
