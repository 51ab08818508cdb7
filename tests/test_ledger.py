"""The ledger stays consistent under several *processes* writing at once: every write lands,
no process sees `database is locked`, and a fresh workspace opened by many processes at the same
moment is migrated exactly once."""
import multiprocessing as mp
from forgenb.core import Workspace
from forgenb.ledger import Ledger, MIGRATIONS
import forgenb.ledger  # noqa: F401  (adds Workspace.ledger)

def _write(root, n, k):
    led = Workspace(root).ledger
    for j in range(k):
        with led.tx():
            last = led.one('SELECT COUNT(*) AS c FROM events WHERE kind = ?', 'count')['c']
            led.add_event('count', writer=n, seen=last)

def test_concurrent_processes(tmp_path):
    ctx = mp.get_context('spawn')
    ps = [ctx.Process(target=_write, args=(str(tmp_path), n, 40)) for n in range(4)]
    for p in ps: p.start()
    for p in ps: p.join(60)
    assert all(p.exitcode == 0 for p in ps)
    ev = Ledger(tmp_path/'forgenb.db').events(kind='count', limit=10_000)
    assert len(ev) == 160
    # each read-then-write ran inside one IMMEDIATE transaction, so the counts it saw are 0..159 exactly once
    assert sorted(e['data']['seen'] for e in ev) == list(range(160))

def test_ledger_survives_fork_and_reopen(tmp_path):
    led = Ledger(tmp_path/'l.db')
    led.add_event('before')
    ctx = mp.get_context('fork')
    p = ctx.Process(target=lambda: led.add_event('in-child'))
    p.start(); p.join(30)
    assert p.exitcode == 0
    assert [e['kind'] for e in Ledger(tmp_path/'l.db').events()] == ['before', 'in-child']
    assert Ledger(tmp_path/'l.db').version == len(MIGRATIONS)
