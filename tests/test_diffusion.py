"""Image LoRA jobs on tiny SD 1.5 / SDXL / FLUX.1 pipelines (CPU): training lowers the loss, samples are PNG files at the
configured steps, a stopped job resumes at its step and continues exactly as an uninterrupted one (noise, timesteps,
flips and caption dropout drawn alike), gradient checkpointing and text-encoder LoRAs train, the diffusers
export changes a fresh pipeline's output, and the kohya export maps every key back through diffusers' loader.
FLUX.1 draws its training noise levels shifted for the image size exactly as the scheduler config and diffusers'
`calculate_shift` say (a fixed `diffusion.timestep_shift` overrides it), still learns, and resumes exactly. A build
records its cache entries (dataset, model, resolution) and keeps both while it makes them, even over the cache's limit."""
import json, math, os
from pathlib import Path
import numpy as np, pytest, torch
os.environ.setdefault('HF_HUB_OFFLINE', '1')
from forgenb.core import Workspace
from forgenb.engine import preserve_rng
from forgenb.test_utils import StopAt, tiny_pipeline_dir, write_sample_images
from forgenb.data.image import import_images, cache_entries, set_cache_limit
from forgenb.run import train, run_job
from forgenb.recipes import diffusion as D
import forgenb.ledger  # noqa: F401

@pytest.fixture(scope='module')
def ws(tmp_path_factory):
    d = tmp_path_factory.mktemp('diffusion')
    ws = Workspace(d/'ws').ensure()
    import_images(ws, write_sample_images(d/'shapes', n=4), name='shapes')
    ws.sd, ws.xl, ws.flux = tiny_pipeline_dir(d/'sd15'), tiny_pipeline_dir(d/'sdxl', 'sdxl'), tiny_pipeline_dir(d/'flux', 'flux')
    return ws

def _spec(base, **over):
    s = dict(kind='diffusion', name='shapes', model=dict(base=str(base)), data=dict(dataset='shapes', resolution=64, trigger='zxq', random_flip=True, caption_dropout=0.25),
             lora=dict(r=4, alpha=8, dropout=0.), sample=dict(prompts=['zxq, a red square'], every=2, seed=3),
             train=dict(max_steps=6, lr=3e-3, batch_size=2, grad_accum=1, precision='fp32', log_every=1, scheduler='constant', warmup=0),
             diffusion=dict(min_snr_gamma=5., noise_offset=0.05, sample_steps=2))
    for k, v in over.items(): s[k] = {**s.get(k, {}), **v}
    return s

def _losses(ws, job_id) -> dict:
    return dict(ws.ledger.metrics(job_id, 'train/loss')['train/loss'])

def _picture(base, lora=None, gs=7.5, **kw):
    from diffusers import DiffusionPipeline
    p = DiffusionPipeline.from_pretrained(base); p.set_progress_bar_config(disable=True)
    if lora: p.load_lora_weights(str(lora))
    return p('zxq, a red square', num_inference_steps=2, height=64, width=64, guidance_scale=gs,
             generator=torch.Generator().manual_seed(0), output_type='np', **kw).images[0]

@pytest.mark.parametrize('arch', ['sd', 'flux'])
def test_training_lowers_the_loss(ws, arch):
    over = dict(diffusion=dict(min_snr_gamma=None)) if arch == 'flux' else {}
    s = D.build(_spec(getattr(ws, arch), data=dict(resolution=128), train=dict(max_steps=40, lr=1e-2), **over), ws)
    def fixed():
        with preserve_rng(), torch.no_grad():
            torch.manual_seed(0)
            return np.mean([D.diffusion_loss(s.model, s.train_dl.dataset[j])[0].item() for _ in range(8) for j in range(len(s.train_dl.dataset))])
    before = fixed()
    D.make_learner(s).fit()
    assert fixed() < 0.97 * before

@pytest.fixture(scope='module')
def straight(ws): return train(_spec(ws.sd), ws, progress='off')

def test_samples_are_pngs_at_the_configured_steps(ws, straight):
    assert (straight['status'], straight['step']) == ('completed', 6)
    smp = ws.ledger.samples(straight['id'])
    assert [(r['step'], r['kind']) for r in smp] == [(0, 'image'), (2, 'image'), (4, 'image'), (6, 'image')]
    assert all(Path(r['path']).is_file() and Path(r['path']).read_bytes()[:4] == b'\x89PNG' for r in smp)
    line = json.loads((ws.run_dir(straight['id'])/'samples'/'step-2.jsonl').read_text())
    assert (line['output'], line['seed']) == ('samples/step-2-0.png', 3)

def test_a_stopped_job_resumes_at_its_step_and_continues_exactly(ws, straight):
    job = train(_spec(ws.sd), ws, progress='off', cbs=[StopAt(3)])
    assert (job['status'], job['step']) == ('stopped', 3)
    assert (ws.run_dir(job['id'])/'checkpoints'/'step-3'/'trainable.safetensors').is_file()
    done = run_job(ws, job['id'], progress='off')
    assert (done['status'], done['step']) == ('completed', 6)
    assert _losses(ws, job['id']) == _losses(ws, straight['id'])
    assert [r['step'] for r in ws.ledger.samples(job['id'])] == [0, 2, 3, 4, 6]  # and one where it stopped

def test_diffusers_export_loads_into_a_fresh_pipeline_and_changes_it(ws, straight):
    adapter = ws.run_dir(straight['id'])/'adapter'
    assert (adapter/D.WEIGHTS).is_file()
    base, loaded = _picture(ws.sd), _picture(ws.sd, adapter)
    assert np.abs(base - loaded).max() > 0.01
    h = D.read_header(adapter)
    meta = json.loads(h['forgenb'])
    assert (meta['steps'], meta['rank'], meta['alpha'], meta['trigger'], meta['resolution']) == (6, 4, 8, 'zxq', 64)
    assert meta['dataset_hash'] == ws.ledger.get_dataset('shapes')['content_hash'] == h['ss_dataset_hash']
    assert meta['base_model'] == str(ws.sd)

def test_kohya_export_maps_every_key_back_and_draws_the_same_picture(ws, straight):
    from forgenb.export import export
    m = export(ws, straight['id'], 'kohya')
    kohya = Path(m['file'])
    assert kohya.parent == ws.run_dir(straight['id'])/'exports'/'kohya' and m['check'] == f"{m['check'].split('/')[0]}/{m['check'].split('/')[0]} keys mapped"
    rep = D.kohya_coverage(kohya, D.to_peft(D.load_file(ws.run_dir(straight['id'])/'adapter'/D.WEIGHTS)))
    assert rep['n_mapped'] == rep['n_keys'] > 0 and all(k.startswith('lora_unet_') for k in D.load_file(kohya))
    assert D.read_header(kohya)['ss_trigger_word'] == 'zxq'
    assert np.abs(_picture(ws.sd, kohya) - _picture(ws.sd, ws.run_dir(straight['id'])/'adapter')).max() == 0

def test_sdxl_with_text_encoders_exports_both_formats(ws, tmp_path):
    s = D.build(_spec(ws.xl, train=dict(max_steps=2, grad_ckpt=True), diffusion=dict(train_text_encoder=True, prediction='v_prediction')), ws)
    D.make_learner(s).fit()
    out = D.export_diffusers(s.model, tmp_path/'xl')
    rep = D.export_kohya(out, tmp_path/'xl.kohya.safetensors')
    keys = set(D.load_file(rep['path']))
    assert rep['n_mapped'] == rep['n_keys'] and {k.split('_')[1] for k in keys} == {'unet', 'te1', 'te2'}
    a, b = _picture(ws.xl, out), _picture(ws.xl, rep['path'])
    assert np.abs(a - b).max() == 0 and np.abs(a - _picture(ws.xl)).max() > 0.01

def _flux_spec(ws): return _spec(ws.flux, diffusion=dict(min_snr_gamma=None, guidance_scale=3.5))

@pytest.fixture(scope='module')
def flux_job(ws): return train(_flux_spec(ws), ws, progress='off')

def test_flux_job_trains_samples_and_exports_a_lora_that_loads(ws, flux_job):
    job = flux_job
    assert (job['status'], job['step']) == ('completed', 6) and job['result']['facts']['prediction'] == 'flow_matching'
    assert [r['step'] for r in ws.ledger.samples(job['id'])] == [0, 2, 4, 6]
    adapter = ws.run_dir(job['id'])/'adapter'
    assert set(D._lora_cfgs(adapter)) == {'transformer'}
    kw = dict(gs=3.5, max_sequence_length=32)
    assert np.abs(_picture(ws.flux, **kw) - _picture(ws.flux, adapter, **kw)).max() > 0.01
    with pytest.raises(D.InputError, match='no kohya export'): D.export_kohya(adapter, ws.root/'flux.kohya.safetensors')

def test_a_completed_image_job_is_a_model_version_that_loads(ws, straight):
    from forgenb.registry import versions, read_lineage, load
    v = [v for v in versions(ws) if v['job_id'] == straight['id']]
    assert len(v) == 1 and v[0]['lineage']['kind'] == 'diffusion'
    assert read_lineage(ws.run_dir(straight['id'])/'adapter')['job_id'] == straight['id']
    pipe, tok = load(ws, v[0]['ref'], device=None)
    assert tok is None and pipe.get_list_adapters()

def test_flux_noise_levels_shift_with_the_image_size_as_calculate_shift_says(ws):
    from types import SimpleNamespace
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from diffusers.training_utils import compute_density_for_timestep_sampling
    from forgenb.config import DiffusionCfg, load_spec
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(ws.flux, subfolder='scheduler')
    c = sched.config
    assert c.use_dynamic_shifting
    def draw(px, **cfg):  # 64 noise levels for a px² image: FLUX.1's VAE downsamples 8x
        torch.manual_seed(0)
        return D.DiffusionLoRA._sigmas(SimpleNamespace(sched=sched, cfg=DiffusionCfg(**cfg)), 64, px // 8, px // 8)
    torch.manual_seed(0)
    u = compute_density_for_timestep_sampling('logit_normal', 64, logit_mean=0., logit_std=1.)
    mus = {px: calculate_shift((px // 16) ** 2, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift) for px in (256, 1024)}
    assert mus == {256: c.base_shift, 1024: c.max_shift}
    for px, mu in mus.items(): assert torch.allclose(draw(px), math.exp(mu) / (math.exp(mu) + 1 / u - 1), atol=1e-6)
    assert (draw(1024) > draw(256)).all()
    assert torch.allclose(draw(1024, timestep_shift=1.0), u) and torch.allclose(draw(256, timestep_shift=3.0), 3 * u / (1 + 2 * u))
    with pytest.raises(D.InputError, match='timestep_shift'): load_spec(dict(_flux_spec(ws), diffusion=dict(timestep_shift=0)))

def test_a_stopped_flux_job_resumes_at_its_step_and_continues_exactly(ws, flux_job):
    job = train(_flux_spec(ws), ws, progress='off', cbs=[StopAt(3)])
    assert (job['status'], job['step']) == ('stopped', 3)
    done = run_job(ws, job['id'], progress='off')
    assert (done['status'], done['step']) == ('completed', 6)
    losses = _losses(ws, job['id'])
    assert losses == _losses(ws, flux_job['id']) and len(losses) == 6 and all(math.isfinite(v) for v in losses.values())

def test_a_build_records_its_cache_entries_and_keeps_both_over_the_limit(ws, straight):
    mine = [e for e in cache_entries(ws) if e['model'] == str(ws.sd)]
    assert {(e['what'], e['resolution']) for e in mine} >= {('latents', 64), ('text', None)} and {e['dataset'] for e in mine} == {'shapes'}
    assert {e['dataset_hash'] for e in mine} == {ws.ledger.get_dataset('shapes')['content_hash']}
    try:
        set_cache_limit(ws, 1)
        assert cache_entries(ws) == []
        D.build(_spec(ws.xl), ws)
        assert sorted(e['what'] for e in cache_entries(ws)) == ['latents', 'text']
    finally: set_cache_limit(ws, None)

@pytest.mark.parametrize('arch', ['sd15', 'sdxl', 'flux'])
def test_bf16_runs_the_gpu_dtype_path_and_resumes_exactly(ws, arch):
    "bf16 on CPU is what a GPU job runs: frozen bf16 weights (the VAE fp32), fp32 adapters under autocast; SDXL trains its text encoders"
    base = dict(sd15=ws.sd, sdxl=ws.xl, flux=ws.flux)[arch]
    over = dict(model=dict(base=str(base), dtype='bf16'), train=dict(precision='bf16', max_steps=4), sample=dict(every=0),
                diffusion=dict(train_text_encoder=arch == 'sdxl', sample_steps=2, **({'min_snr_gamma': None} if arch == 'flux' else {})))
    s = D.build(_spec(base, **over), ws)
    m = s.model
    assert (m.denoiser.dtype, m.vae.dtype) == (torch.bfloat16, torch.float32)
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    assert any(p.requires_grad for te in m.text_encoders for p in te.parameters()) == (arch == 'sdxl')
    straight = train(_spec(base, **over), ws, progress='off')
    stopped = train(_spec(base, **over), ws, progress='off', cbs=[StopAt(2)])
    done = run_job(ws, stopped['id'], progress='off')
    assert (straight['status'], done['status'], done['step']) == ('completed', 'completed', 4), (straight['error'], done['error'])
    losses = _losses(ws, straight['id'])
    assert len(losses) == 4 and all(np.isfinite(v) for v in losses.values())
    assert _losses(ws, stopped['id']) == losses
