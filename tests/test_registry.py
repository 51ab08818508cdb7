"""Completed jobs become model versions, and the aliases decide what `name@active` loads.

Pinned on the tiny Llama with jobs of a few steps: each completed job registers `name/vN` with its
lineage (also in the adapter's safetensors header); activate and rollback move `active`/`previous`
and leave events; `load('name@active')` gives exactly the logits the job's own model had when
training ended; a registration failure never turns a completed job into a failed one; changed
adapter files and jobs that did not complete are refused with a clear error.
"""
import os
os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import pytest, torch
from forgenb.core import Workspace, InputError
from forgenb.engine import Callback
from forgenb.data.text import import_text
from forgenb.presets import spec_from_preset
from forgenb.run import train
from forgenb.jobs import create_job
from forgenb.test_utils import tiny_model_dir, write_sample_dataset
from forgenb import registry as reg

IDS = torch.tensor([[5, 40, 41, 42, 43, 44, 45, 46]])

class FinalLogits(Callback):
    "Keeps the logits of the trained model on `IDS` as training ends"
    order = 100
    def after_fit(self):
        self.model.eval()
        with torch.no_grad(): self.logits = self.model(input_ids=IDS).logits.clone()

@pytest.fixture(scope='module')
def ws(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp('reg')
    ws = Workspace(root/'ws').ensure()
    tiny_model_dir(root/'models'/'tiny-llama')
    import_text(ws, write_sample_dataset(root/'s.jsonl', n=128), name='sample')
    return ws

def _spec(ws, **kw):
    return spec_from_preset('tiny-cpu-demo', ws, **{'model.base': str(ws.root.parent/'models'/'tiny-llama'), 'train.max_steps': 3,
                            'train.warmup': 0, 'train.lr': 1e-2, 'train.eval_every': 0, 'checkpoint.every': 0, 'sample.every': 0,
                            'data.val_split': None, 'data.val_size': 8, **kw})

@pytest.fixture(scope='module')
def jobs(ws):
    cbs = [FinalLogits(), FinalLogits()]
    j1 = train(_spec(ws), ws, name='rev', progress='off', cbs=[cbs[0]])
    j2 = train(_spec(ws, **{'train.seed': 1}), ws, name='rev', progress='off', cbs=[cbs[1]])
    return (j1, cbs[0].logits), (j2, cbs[1].logits)

def test_versions_appear_when_jobs_complete(ws, jobs):
    (j1, _), (j2, _) = jobs
    vs = reg.versions(ws, 'rev')
    assert [(v['ref'], v['job_id']) for v in vs] == [('rev/v1', j1['id']), ('rev/v2', j2['id'])]
    assert ws.ledger.get_job(j1['id'])['status'] == 'completed'
    lin = vs[1]['lineage']
    assert lin['job_id'] == j2['id'] and lin['dataset_id'] == 'sample'
    assert lin['dataset_hash'] == ws.ledger.get_dataset('sample')['content_hash']
    assert lin['base_model'].endswith('tiny-llama') and lin['base_config_sha256'] and lin['spec_hash'] == j2['spec_hash']
    assert lin['forgenb_version'] and lin['step'] == 3
    assert reg.read_lineage(vs[1]['path']) == lin
    assert set(vs[1]['files']) >= {'adapter_model.safetensors', 'adapter_config.json'}
    assert vs[1]['metrics']['train_loss'] > 0
    assert [e['data']['model'] for e in ws.ledger.events(kind='model.registered')] == ['rev/v1', 'rev/v2']
    assert reg.register(ws, j2['id'])['version'] == 2  # idempotent

def test_activate_and_rollback_move_active(ws, jobs):
    (j1, _), (j2, _) = jobs
    assert reg.get_version(ws, 'rev@active')['version'] == 1  # the first version is active at once
    reg.activate(ws, 'rev/v2')
    assert (reg.get_version(ws, 'rev@active')['job_id'], reg.get_version(ws, 'rev@previous')['job_id']) == (j2['id'], j1['id'])
    assert reg.rollback(ws, 'rev')['version'] == 1
    assert reg.get_version(ws, 'rev')['version'] == 1 and reg.get_version(ws, 'rev@previous')['version'] == 2
    assert reg.rollback(ws, 'rev')['version'] == 2
    kinds = [(e['kind'], e['data']['model']) for e in ws.ledger.events() if e['kind'] in ('model.activated', 'model.rolled_back')]
    assert kinds == [('model.activated', 'rev/v2'), ('model.rolled_back', 'rev/v1'), ('model.rolled_back', 'rev/v2')]
    with pytest.raises(InputError, match='active version'): reg.archive(ws, 'rev/v2')
    assert ws.models.archive('rev/v1')['status'] == 'archived'
    with pytest.raises(InputError, match='no previous version'): reg.rollback(ws, 'rev')
    with pytest.raises(InputError, match='archived'): reg.activate(ws, 'rev/v1')
    reg.archive(ws, 'rev/v1', False); reg.activate(ws, 'rev/v1')
    assert reg.get_version(ws, 'rev@active')['version'] == 1

def test_load_active_gives_the_jobs_own_logits(ws, jobs):
    (j1, want1), (j2, want2) = jobs
    for ref, want in (('rev/v1', want1), ('rev/v2', want2)):
        reg.activate(ws, ref)
        model, tok = ws.models.load('rev@active')
        assert not model.training and tok.chat_template
        with torch.no_grad(): got = model(input_ids=IDS).logits
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(want1, want2)

def test_unknown_refs_are_clear(ws, jobs):
    with pytest.raises(InputError, match="no model named 'nope'"): reg.load(ws, 'nope@active')
    with pytest.raises(InputError, match='has no version 9'): reg.load(ws, 'rev/v9')
    with pytest.raises(InputError, match='not understood'): reg.get_version(ws, 'rev/v1/x')

def test_changed_adapter_refuses_to_load(ws, jobs, tmp_path):
    job = train(_spec(ws), ws, name='changed', progress='off')
    f = reg.get_version(ws, 'changed/v1')['path'] + '/adapter_config.json'
    with open(f, 'a') as fh: fh.write(' ')
    with pytest.raises(InputError, match='changed since it was registered'): reg.load(ws, 'changed@active')

def test_registration_failure_keeps_the_job_completed(ws, monkeypatch):
    def boom(ws, job_id, name=None): raise OSError('disk full')
    monkeypatch.setattr(reg, 'register', boom)
    job = train(_spec(ws), ws, name='unlucky', progress='off')
    assert job['status'] == 'completed' and ws.ledger.get_job(job['id'])['status'] == 'completed'
    ev = ws.ledger.events(job_id=job['id'], kind='model.register_failed')
    assert ev and 'disk full' in ev[0]['data']['error']
    assert 'unlucky' not in reg.names(ws)

def test_only_completed_jobs_register(ws):
    job = create_job(ws, _spec(ws), name='queued-one')
    with pytest.raises(InputError, match='not completed'): reg.register(ws, job['id'])
