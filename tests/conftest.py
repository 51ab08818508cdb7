"""Test-run plumbing shared by every test file.

A file whose tests share an expensive module-scoped fixture of its own (a Jupyter server, tiny pipelines, a
trained job, a torchrun launch) keeps its tests on one pytest-xdist worker (`--dist loadgroup`): otherwise each
worker builds the fixture again, doubling the work and running two copies of it at the same time (two torchrun
launches, two servers).

The files that launch torchrun (2 gloo processes each) share one group, so no two launches overlap: on CI's 2 cores
two launches at once are 4 busy processes plus 2 pytest workers, and one CI run saw a rank abort while its gloo
group was connecting (`terminate called without an active exception`) in two files at the same time.
"""
import pytest

def _own_wide_fixture(item) -> bool:
    mod = item.getparent(pytest.Module).nodeid
    return any(d.scope in ('module', 'session', 'package') and d.baseid == mod
               for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs)

TORCHRUN = ('test_distributed.py', 'test_distributed_jobs.py', 'test_distributed_diffusion.py')

@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    for item in items:
        mod = item.getparent(pytest.Module)
        if mod.path.name in TORCHRUN: item.add_marker(pytest.mark.xdist_group('torchrun'))
        elif _own_wide_fixture(item): item.add_marker(pytest.mark.xdist_group(mod.nodeid))


@pytest.fixture
def race():
    "Run the callables at once, each in a thread; what each returned, or the `InputError` it raised"
    import threading
    from forgenb.core import InputError
    def run(*fns, timeout=60):
        out = [None] * len(fns)
        def go(k):
            try: out[k] = fns[k]()
            except InputError as e: out[k] = e
        ts = [threading.Thread(target=go, args=(k,)) for k in range(len(fns))]
        for t in ts: t.start()
        for t in ts: t.join(timeout)
        return out
    return run
