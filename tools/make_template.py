#!/usr/bin/env python
"""Write the job notebook `forgenb/templates/train.ipynb` (package data) with nbformat.

    python tools/make_template.py

The template is what papermill runs for every job, and the job's report once it ran. Edit the cells
here and rerun: cell ids are fixed so an unchanged cell stays unchanged in git, the notebook carries
no outputs, and the first code cell is tagged `parameters` for papermill.
"""
from pathlib import Path
import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

DEST = Path(__file__).resolve().parents[1]/'forgenb'/'templates'/'train.ipynb'

CELLS = [
('md', 'intro', """# forgenb training job

This notebook is a forgenb job, and once it has run, the job's report. The scheduler runs it with
papermill, passing `job_id` and `workspace`. You can also run it on a spec file yourself; the run is
recorded in the workspace as a job like any other:

    papermill "$(forgenb template)" report.ipynb -p spec job.yaml

It goes to the workspace that `$FORGENB_HOME` names; `-p workspace DIR` picks another."""),
('code', 'parameters', """job_id = None     # the job to run, from the workspace ledger (the scheduler sets it)
workspace = None  # the workspace folder (default: $FORGENB_HOME, /workspace/forgenb or ~/forgenb)
spec = None       # a job spec file (YAML or JSON), to run without submitting it first"""),
('code', 'open', """import os, time
import forgenb
from forgenb import jobs
from forgenb.core import InputError, Workspace

ws = (Workspace(workspace) if workspace else Workspace()).ensure()
if job_id is None:
    if spec is None:
        raise InputError('nothing to run: pass job_id (a submitted job) or spec (a job spec file)',
                         hint='papermill "$(forgenb template)" report.ipynb -p spec job.yaml')
    job_id = jobs.create_job(ws, spec, status='starting', pid=os.getpid(), host=jobs.HOST, heartbeat_at=time.time())['id']
job = jobs.get_job(ws, job_id)
print(f"job {job_id} ({job['name']}) in workspace {ws.root}, forgenb {forgenb.__version__}")"""),
('md', 'spec-md', """## The spec

Validated again now: the dataset or the model may have changed since the job was submitted. With
errors, the job fails here and the list says what to fix."""),
('code', 'spec', """from forgenb.config import dump_spec
report = jobs.validate_job(ws, job_id)
print(dump_spec(job['spec']))
report"""),
('md', 'inputs-md', """## Data and model"""),
('code', 'inputs', """from forgenb.catalog import model_info
ds = ws.ledger.get_dataset(job['spec']['data']['dataset'])
if ds: print(f"dataset  {ds['id']}: {ds['n_rows']} rows, format {ds['format']}, sha256 {ds['content_hash'][:12]}, {ds['path']}")
else: print(f"dataset  {job['spec']['data']['dataset']} (a file)")
info = model_info(job['spec']['model']['base'])
if info: print(f"model    {info.id}: {info.arch}, {info.n_params / 1e6:,.1f}M parameters, context {info.context_len}, {info.source}")
print(f"adapter  {job['spec']['lora']['method']} r={job['spec']['lora']['r']} alpha={job['spec']['lora']['alpha']} on {job['spec']['lora']['target_modules']}")"""),
('md', 'train-md', """## Training

Metrics, checkpoints and samples go to the workspace ledger as the job runs, so any notebook can
follow it (`forgenb.jobs.metrics_history(ws, job_id)`, `forgenb.jobs.log_tail(ws, job_id)`). The job
obeys stop, pause and resume commands between steps (`forgenb.jobs.stop(ws, job_id)`, ...).
With `distributed.num_processes` above 1 the cell starts that many processes through torchrun, one
per GPU the scheduler gave the job; their output shows below, and rank 0 alone writes the ledger."""),
('code', 'train', """from forgenb.distributed import run_distributed
summary = run_distributed(ws, job_id, progress='lines')  # N processes (torchrun) when distributed.num_processes > 1"""),
('md', 'summary-md', """## Summary"""),
('code', 'status', """job = jobs.get_job(ws, job_id)
print(f"{job['status']} at step {job['step']}" + (f" of {job['n_step']}" if job['n_step'] else '')
      + (f", {job['ended_at'] - job['started_at']:.0f} s" if job['ended_at'] and job['started_at'] else ''))
if job['status'] in ('paused', 'stopped'):
    print(f"resume it from step {job['resume_step'] or job['step']}: forgenb resume {job_id}   (or jobs.resume(ws, '{job_id}'))")
adapter = ws.run_dir(job_id)/'adapter'
if adapter.exists(): print(f'adapter: {adapter}')"""),
('code', 'losses', """jobs.plot_losses(ws, job_id)"""),
('code', 'table', """from IPython.display import Markdown
def table(rows, cols):
    "A Markdown table of `rows` (dicts), columns `cols`"
    if not rows: return Markdown('(none)')
    cell = lambda v: ('' if v is None else f'{v:.4g}' if isinstance(v, float) else str(v)).replace('|', '\\\\|').replace('\\n', ' ⏎ ')
    return Markdown('\\n'.join(['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
                              + ['| ' + ' | '.join(cell(r.get(c)) for c in cols) + ' |' for r in rows]))"""),
('md', 'samples-md', """### Samples: the first and the last"""),
('code', 'samples', """from IPython.display import HTML
rows = jobs.samples_table(ws, job_id)
html = jobs.samples_html(rows)  # image jobs: the pictures themselves
HTML(html) if html else table(rows, ['prompt', 'first_step', 'first', 'last_step', 'last'])"""),
('md', 'checkpoints-md', """### Checkpoints"""),
('code', 'checkpoints', """table(jobs.checkpoints_table(ws, job_id), ['step', 'kind', 'train_loss', 'valid_loss', 'path'])"""),
]

def build() -> nbformat.NotebookNode:
    nb = new_notebook(metadata={'kernelspec': {'display_name': 'python3', 'language': 'python', 'name': 'python3'},
                                'language_info': {'name': 'python'}})
    for kind, cid, src in CELLS:
        c = new_markdown_cell(src) if kind == 'md' else new_code_cell(src)
        c.id = cid
        if cid == 'parameters': c.metadata['tags'] = ['parameters']
        nb.cells.append(c)
    nbformat.validate(nb)
    return nb

if __name__ == '__main__':
    DEST.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(build(), DEST)
    print(DEST)
