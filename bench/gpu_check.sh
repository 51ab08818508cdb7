#!/usr/bin/env bash
# The one command a session lent a GPU machine runs (after `bash tools/gpu_wheels.sh` here):
#
#   run(command='bash bench/gpu_check.sh', carry=['.whl'], timeout_s=560)
#
# Steps, each under its own `timeout` and all under one deadline (GPU_CHECK_BUDGET_S, default 530 s, so the
# command ends inside timeout_s=560 and what it wrote comes back):
#   install   the wheels of .whl/ into /tmp/site (no network there), the checkout on PYTHONPATH; every
#             requirement of forgenb and of the carried wheels present, every forgenb module imports, CUDA
#             visible. Any problem here stops the script (exit 2) before the benchmarks spend minutes.
#   env       nvidia-smi, torch / CUDA / library versions, pip freeze of /tmp/site, the device's pip list
#   smoke     bench/gpu_smoke.py: tiny LLM and SD 1.5 jobs through forgenb.train in bf16 on cuda (learns,
#             adapter saved, resume as exact as the GPU repeats itself)
#   llm       bench/llm_lora.py --gpu, reduced to 1 round of 20 timed steps (its default is 3 rounds of 30)
#   diffusion bench/diffusion_lora.py --gpu, reduced to 2 rounds of 10 timed steps, arms diffusers,forgenb
# Everything lands in $OUT as it goes (at most 8 files come back): gpu_check.log (all output), env.txt,
# smoke.json, llm_lora_gpu.{json,md}, diffusion_lora_gpu.{json,md}. Exit status: 0 if every step passed,
# 2 on an install problem, 1 if a later step failed or ran out of time.
#
# Knobs (environment): GPU_CHECK_STEPS (default install,env,smoke,llm,diffusion; install always runs),
# GPU_CHECK_BUDGET_S, LLM_ARGS, DIFFUSION_ARGS (replace the reduced settings), SMOKE_ARGS.
# A rehearsal without a GPU (what was run where the kit was written): GPU_CHECK_CPU=1 (smoke --cpu, no CUDA required,
# steps install,env,smoke), GPU_CHECK_PYTHON (an interpreter holding only the device's packages), GPU_CHECK_PYVER,
# GPU_CHECK_WHL (wheels built for that interpreter), GPU_CHECK_SITE (instead of /tmp/site).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
T0=$SECONDS
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET_S:-530}))
CPU=${GPU_CHECK_CPU:-0}
PY=${GPU_CHECK_PYTHON:-python3}
PYVER=${GPU_CHECK_PYVER:-3.12}
WHL=${GPU_CHECK_WHL:-.whl}
SITE=${GPU_CHECK_SITE:-/tmp/site}
if [ "$CPU" = 1 ]; then STEPS=${GPU_CHECK_STEPS:-install,env,smoke}; SMOKE_CPU=--cpu; else STEPS=${GPU_CHECK_STEPS:-install,env,smoke,llm,diffusion}; SMOKE_CPU=; fi
LLM_ARGS=${LLM_ARGS:---rounds 1 --steps 20 --warmup 3}
DIFFUSION_ARGS=${DIFFUSION_ARGS:---rounds 2 --steps 10 --warmup 3 --arms diffusers,forgenb}
SMOKE_ARGS=${SMOKE_ARGS:-}
export PY SITE CPU HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HOME=/tmp/hf_home MPLBACKEND=Agg FORGENB_AUTO_RESUME=0 PYTHONDONTWRITEBYTECODE=1
SUMMARY=()
FAILED=0

say() { echo "[gpu_check +$((SECONDS - T0))s] $*"; }
die_install() {
  say "INSTALL PROBLEM: $*"
  say "nothing else was run. Fix the kit here (bash tools/gpu_wheels.sh; tools/gpu_device_packages.txt) before the next device call."
  exit 2
}
want() { [[ ",$STEPS," == *",$1,"* ]]; }
left() { echo $((DEADLINE - SECONDS)); }

# step NAME MAX_S MIN_S CMD...: run CMD under `timeout` (the lesser of MAX_S and the time left); skip it when
# less than MIN_S is left; record ok / FAILED (rc) / TIMED OUT / skipped
step() {
  local name=$1 max=$2 min=$3; shift 3
  local t=$(left); (( t > max )) && t=$max
  if (( t < min )); then say "SKIP $name: $(left) s left, it needs at least $min s"; SUMMARY+=("$name: skipped (no time left)"); FAILED=1; return; fi
  local shown="$*"; (( ${#shown} > 160 )) && shown="${shown:0:40}..."
  say "BEGIN $name (timeout ${t} s): $shown"
  local s=$SECONDS rc=0
  timeout --kill-after=10 "$t" "$@" || rc=$?
  local d=$((SECONDS - s))
  if (( rc == 0 )); then SUMMARY+=("$name: ok (${d} s)")
  elif (( rc == 124 || rc == 137 )); then SUMMARY+=("$name: TIMED OUT after ${d} s (limit ${t} s)"); FAILED=1
  else SUMMARY+=("$name: FAILED, exit $rc (${d} s)"); FAILED=1; fi
  say "END $name: ${SUMMARY[-1]}"
}

env_info() {
  {
    echo "== date"; date -u
    echo "== nvidia-smi"; nvidia-smi
    echo "== nvidia-smi --query-gpu"; nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,power.limit,temperature.gpu --format=csv
    echo "== machine"; uname -a; nproc; free -g; ldd --version 2>&1 | head -1; df -h /tmp | tail -1
    echo "== python / torch"
    "$PY" - <<'EOF'
import importlib.metadata as md, platform, sys, torch
print('python', sys.version.replace('\n', ' '), sys.executable)
gpu = torch.cuda.is_available()
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'device', torch.cuda.get_device_name() if gpu else None,
      'capability', torch.cuda.get_device_capability() if gpu else None, 'bf16', torch.cuda.is_bf16_supported() if gpu else None)
for p in ('transformers', 'peft', 'accelerate', 'diffusers', 'datasets', 'huggingface_hub', 'safetensors', 'tokenizers', 'numpy',
          'triton', 'flash_attn', 'liger_kernel', 'bitsandbytes', 'fsspec', 'pyarrow', 'papermill', 'ipykernel'):
    try: print(f'{p} {md.version(p)}')
    except md.PackageNotFoundError: print(f'{p} (not installed)')
EOF
    echo "== pip freeze --path $SITE (carried)"; "$PY" -m pip freeze --path "$SITE" 2>/dev/null
    echo "== pip check (whole environment; conflicts inside the image are not ours)"; "$PY" -m pip check 2>&1 | head -40
    echo "== pip list of the device (PYTHONPATH unset)"; env -u PYTHONPATH "$PY" -m pip list --format=freeze 2>/dev/null
  } > "$OUT/env.txt" 2>&1
  grep -A3 '^== python / torch' "$OUT/env.txt"
}

main() {
# ---------------------------------------------------------------------------------------------------------------
# install: fail loudly, and early
# ---------------------------------------------------------------------------------------------------------------
say "forgenb GPU check in $ROOT; results in $OUT; steps: $STEPS; budget $(left) s"
command -v "$PY" >/dev/null || die_install "no $PY on PATH"
"$PY" -c "import sys; assert '%d.%d' % sys.version_info[:2] == '$PYVER', sys.version" \
  || die_install "$PY is $("$PY" -V 2>&1), the wheels in $WHL/ are for $PYVER: rebuild them for this Python (tools/gpu_wheels.sh)"
compgen -G "$WHL/*.whl" >/dev/null || die_install "no wheels in $WHL/: run 'bash tools/gpu_wheels.sh' here, and pass carry=['.whl'] to run"
[ -f "$WHL/MANIFEST.txt" ] || die_install "$WHL/MANIFEST.txt is missing: rerun tools/gpu_wheels.sh"
rm -rf "$SITE"
say "installing $(ls "$WHL"/*.whl | wc -l) wheels into $SITE"
timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHL"/*.whl \
  || die_install "pip install --target $SITE $WHL/*.whl failed (above): a wheel's platform tag may not suit this machine (see '"$PY" -m pip debug --verbose')"
export PYTHONPATH=$SITE:$ROOT WHL
# a minimal dist-info, so importlib.metadata knows forgenb's version (the code itself is the checkout's, via PYTHONPATH)
timeout 60 "$PY" - <<'EOF' || die_install "could not write forgenb's dist-info"
import os, re, pathlib, tomllib
v = re.search(r'__version__\s*=\s*"([^"]+)"', open('forgenb/__init__.py').read())[1]
deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']
d = pathlib.Path(os.environ['SITE'])/f'forgenb-{v}.dist-info'; d.mkdir(exist_ok=True)
(d/'METADATA').write_text(f'Metadata-Version: 2.1\nName: forgenb\nVersion: {v}\n' + ''.join(f'Requires-Dist: {r}\n' for r in deps))
(d/'entry_points.txt').write_text('[console_scripts]\nforgenb = forgenb.cli:main\n')
(d/'RECORD').write_text('')
EOF
say "checking requirements and imports"
timeout 240 "$PY" - <<'EOF' || die_install "requirements or imports are broken (above)"
import importlib, importlib.metadata as md, os, re, sys, time, traceback, warnings
from packaging.requirements import Requirement
norm = lambda n: re.sub(r'[-_.]+', '-', n).lower()
carried = [norm(l.split('==')[0]) for l in open(os.environ['WHL'] + '/MANIFEST.txt').read().split()]
missing, conflicts = [], []
for dist in ['forgenb'] + carried:
    try: reqs = md.requires(dist) or []
    except md.PackageNotFoundError: missing.append(f'{dist} (carried, but not installed)'); continue
    for r in map(Requirement, reqs):
        if r.marker and not r.marker.evaluate({'extra': ''}): continue
        try: have = md.version(r.name)
        except md.PackageNotFoundError: missing.append(f'{r.name} (needed by {dist}: {r})'); continue
        if r.specifier and not r.specifier.contains(have, prereleases=True): conflicts.append(f'{dist} wants {r}, this machine has {r.name} {have}')
for c in conflicts: print('WARNING, version conflict (not fatal unless an import below fails):', c)
if missing: sys.exit('MISSING requirements:\n  ' + '\n  '.join(missing) + '\nadd them to .whl/ (tools/gpu_wheels.sh; if the device image lost a package, drop it from tools/gpu_device_packages.txt)')
mods = ['forgenb.core', 'forgenb.config', 'forgenb.presets', 'forgenb.ledger', 'forgenb.engine', 'forgenb.callbacks', 'forgenb.data.text',
        'forgenb.data.image', 'forgenb.recipes.llm', 'forgenb.recipes.diffusion', 'forgenb.run', 'forgenb.jobs', 'forgenb.export',
        'forgenb.registry', 'forgenb.eval', 'forgenb.distributed', 'forgenb.catalog', 'forgenb.cli', 'forgenb.client', 'forgenb.test_utils',
        'forgenb.server', 'forgenb.ui.panels', 'diffusers', 'datasets', 'papermill', 'ipykernel.kernelapp', 'nbformat', 'gguf', 'bqplot',
        'ipywidgets', 'jupyter_server.serverapp', 'pydantic', 'fastcore.basics']
bad = []
for m in mods:
    t = time.perf_counter()
    try:
        with warnings.catch_warnings(): warnings.simplefilter('ignore'); importlib.import_module(m)
    except Exception: bad.append(f'{m}:\n{traceback.format_exc(limit=-3)}')
if bad: sys.exit('IMPORT FAILURES:\n' + '\n'.join(bad))
import torch
if os.environ['CPU'] != '1':
    if not torch.cuda.is_available(): sys.exit(f'torch {torch.__version__} sees no CUDA device')
    x = torch.randn(256, 256, device='cuda', dtype=torch.bfloat16); torch.cuda.synchronize()
    assert torch.isfinite((x @ x).float()).all()
where = torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU (rehearsal)'
print(f'ok: {len(mods)} modules import; torch {torch.__version__} (CUDA {torch.version.cuda}) on {where}; '
      f'{len(carried)} carried distributions; {len(conflicts)} version conflicts (warnings above)')
EOF
SUMMARY+=("install: ok ($((SECONDS - T0)) s)")
say "install ok"

# ---------------------------------------------------------------------------------------------------------------
# env: what ran where
# ---------------------------------------------------------------------------------------------------------------
want env && step env 60 10 bash -c "$(declare -f env_info); env_info"

# ---------------------------------------------------------------------------------------------------------------
# smoke, then the two benchmarks (each writes its own files into $OUT)
# ---------------------------------------------------------------------------------------------------------------
# shellcheck disable=SC2086
want smoke && step smoke 180 60 "$PY" bench/gpu_smoke.py --out "$OUT" $SMOKE_CPU $SMOKE_ARGS
# shellcheck disable=SC2086
want llm && step llm 240 90 "$PY" bench/llm_lora.py --gpu $LLM_ARGS --out "$OUT"
# shellcheck disable=SC2086
want diffusion && step diffusion 240 90 "$PY" bench/diffusion_lora.py --gpu $DIFFUSION_ARGS --out "$OUT"

# ---------------------------------------------------------------------------------------------------------------
say "summary ($((SECONDS - T0)) s in all):"
for s in "${SUMMARY[@]}"; do echo "  $s"; done
for f in "$OUT"/llm_lora_gpu.md "$OUT"/diffusion_lora_gpu.md; do [ -f "$f" ] && { echo; echo "== $(basename "$f")"; cat "$f"; }; done
[ -f "$OUT/smoke.json" ] && "$PY" -c "
import json; r = json.load(open('$OUT/smoke.json'))
for k, v in r['checks'].items():
    extra = {x: v[x] for x in ('aa_max_diff', 'resume_max_diff', 'fixed_loss', 'train_seconds') if x in v}
    print(f\"  smoke {k}: {'ok' if v['ok'] else 'FAILED ' + v.get('error', '')} {extra}\")"
say "files in \$OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
return $FAILED
}

main 2>&1 | tee -a "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
