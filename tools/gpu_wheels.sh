#!/usr/bin/env bash
# Download into .whl/ every wheel forgenb needs that the GPU device image lacks (Python 3.12, manylinux x86-64),
# one version each, --no-deps, then verify HERE that the set is complete. bench/gpu_check.sh installs them there.
#
#   bash tools/gpu_wheels.sh            # resolve, download, verify (needs network here; ~1 minute)
#   bash tools/gpu_wheels.sh --verify   # only verify the .whl/ already there
#
# How: the forgenb dependencies (pyproject.toml) that tools/gpu_device_packages.txt does not list are resolved by
# a Python 3.12 pip (--only-binary, constrained to the device's known versions); of the result, whatever the device
# already has is dropped and the rest is downloaded for manylinux <= 2_28 (the device's glibc is not recorded).
# Verification, in a throw-away Python 3.12 venv: one empty stand-in wheel per device package (its known version,
# else this .venv's, else the resolver's), forgenb itself built as a wheel, then everything installed from
# .whl/ + stand-ins with --no-index --no-deps, and `pip check` must report no missing or conflicting requirement.
# The project itself does not travel as a wheel: gpu_check.sh puts the checkout on PYTHONPATH, so what is tested
# is always the code of the tree that was sent.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WHL=$ROOT/.whl
if [ -z "${PY312:-}" ]; then   # the first python3.12 that runs (a pyenv shim may not)
  for c in python3.12 /root/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do
    "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { PY312=$c; break; }
  done
fi
PIP_HERE=${PIP_HERE:-$ROOT/.venv/bin/python}       # any pip for `pip download` (platform flags make it target 3.12)
MAX_MIB=${MAX_MIB:-40}
WORK=$(mktemp -d /tmp/gpu_wheels.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
die() { echo "gpu_wheels: $*" >&2; exit 1; }
[ -n "${PY312:-}" ] || die "no python3.12 here (set PY312=/path/to/python3.12)"
"$PY312" -m pip --version >/dev/null || die "$PY312 has no pip"

# .whl/ must never be committed: ignore it locally if the checkout does not already
git check-ignore -q .whl/x.whl 2>/dev/null || echo '/.whl/' >> .git/info/exclude

# Names (normalized) and known versions of what the device has; the pyproject deps it lacks
"$PY312" - "$WORK" <<'EOF'
import re, sys, tomllib, pathlib
w = pathlib.Path(sys.argv[1]); norm = lambda n: re.sub(r'[-_.]+', '-', n).lower()
dev = [l.split('#')[0].strip() for l in open('tools/gpu_device_packages.txt')]
dev = [l for l in dev if l]
(w/'device_names.txt').write_text('\n'.join(norm(l.split('==')[0]) for l in dev) + '\n')
(w/'constraints.txt').write_text(''.join(l + '\n' for l in dev if '==' in l))
names = {norm(l.split('==')[0]) for l in dev}
deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']
top = [d for d in deps if norm(re.match(r'[A-Za-z0-9_.-]+', d)[0]) not in names]
(w/'top.txt').write_text('\n'.join(top) + '\n')
print('forgenb dependencies missing on the device:', ', '.join(top))
EOF

PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64)

if [ "${1:-}" != "--verify" ]; then
  # 1. resolve the closure for Python 3.12 against the device's pinned versions; keep what the device lacks
  "$PY312" -m pip install -q --dry-run --ignore-installed --only-binary=:all: --target "$WORK/t" \
      --report "$WORK/report.json" -c "$WORK/constraints.txt" -r "$WORK/top.txt" 2> >(grep -v 'is ignored: it is neither' >&2) \
      || die "pip could not resolve the dependencies for Python 3.12 (see above)"
  "$PY312" - "$WORK" <<'EOF'
import json, re, sys, pathlib
w = pathlib.Path(sys.argv[1]); norm = lambda n: re.sub(r'[-_.]+', '-', n).lower()
dev = set((w/'device_names.txt').read_text().split())
got = [(i['metadata']['name'], i['metadata']['version']) for i in json.load(open(w/'report.json'))['install']]
(w/'resolved.txt').write_text(''.join(f'{norm(n)}=={v}\n' for n, v in got))
(w/'carry.txt').write_text(''.join(f'{n}=={v}\n' for n, v in sorted(got, key=lambda x: norm(x[0])) if norm(n) not in dev))
print(f'resolved {len(got)} distributions; {sum(norm(n) not in dev for n, _ in got)} to carry')
EOF
  # 2. download them: a clean folder, one version each
  rm -rf "$WHL"; mkdir -p "$WHL"
  "$PIP_HERE" -m pip download -q --no-deps "${PLAT[@]}" -d "$WHL" -r "$WORK/carry.txt" 2> >(grep -v 'is ignored: it is neither' >&2) \
      || die "download failed: a pinned version may have no wheel for manylinux <= 2_28; pick another in carry.txt's pin"
  cp "$WORK/carry.txt" "$WHL/MANIFEST.txt"
  cp "$WORK/resolved.txt" "$WHL/RESOLVED.txt"
fi

# 3. verify: one version each, size, every wheel in the manifest, and completeness in a Python 3.12 venv
[ -f "$WHL/MANIFEST.txt" ] || die "no .whl/MANIFEST.txt: run without --verify first"
"$PY312" - "$WHL" "$MAX_MIB" <<'EOF'
import re, sys, pathlib, collections
d, cap = pathlib.Path(sys.argv[1]), float(sys.argv[2]); norm = lambda n: re.sub(r'[-_.]+', '-', n).lower()
whls = sorted(d.glob('*.whl'))
names = collections.Counter(norm(w.name.split('-')[0]) for w in whls)
dup = [n for n, c in names.items() if c > 1]
want = {norm(l.split('==')[0]) for l in (d/'MANIFEST.txt').read_text().split()}
size = sum(w.stat().st_size for w in whls) / 2**20
print(f'{len(whls)} wheels, {size:.1f} MiB')
if dup: sys.exit(f'gpu_wheels: several versions of {dup}: pip --target would refuse')
if want - set(names): sys.exit(f'gpu_wheels: not downloaded: {sorted(want - set(names))}')
if size > cap: sys.exit(f'gpu_wheels: {size:.1f} MiB is over {cap} MiB (the tree that travels is capped at 64 MiB)')
EOF

"$PY312" -m venv --without-pip "$WORK/venv"
VP=("$PY312" -m pip --python "$WORK/venv/bin/python")   # pip run against the check venv
"$PIP_HERE" -m pip list --format=freeze 2>/dev/null > "$WORK/here.txt" || true
"$PY312" - "$WORK" "$WHL" <<'EOF'
# one empty stand-in wheel per device package, at the device's version (known), else this .venv's, else the resolver's
import re, sys, pathlib, zipfile, hashlib, base64
w, whl = map(pathlib.Path, sys.argv[1:3]); norm = lambda n: re.sub(r'[-_.]+', '-', n).lower()
def versions(p): return {norm(l.split('==')[0]): l.split('==')[1] for l in p.read_text().split() if '==' in l} if p.exists() else {}
known, here, res = versions(w/'constraints.txt'), versions(w/'here.txt'), versions(whl/'RESOLVED.txt')
(w/'stubs').mkdir()
for n in (w/'device_names.txt').read_text().split():
    v = known.get(n) or here.get(n) or res.get(n) or '0.0.1'
    dist = n.replace('-', '_'); di = f'{dist}-{v}.dist-info'
    files = {f'{di}/METADATA': f'Metadata-Version: 2.1\nName: {n}\nVersion: {v}\n',
             f'{di}/WHEEL': 'Wheel-Version: 1.0\nGenerator: gpu_wheels\nRoot-Is-Purelib: true\nTag: py3-none-any\n'}
    rec = ''.join(f"{k},sha256={base64.urlsafe_b64encode(hashlib.sha256(t.encode()).digest()).rstrip(b'=').decode()},{len(t)}\n" for k, t in files.items())
    with zipfile.ZipFile(w/'stubs'/f'{dist}-{v}-py3-none-any.whl', 'w') as z:
        for k, t in files.items(): z.writestr(k, t)
        z.writestr(f'{di}/RECORD', rec + f'{di}/RECORD,,\n')
EOF
"$PIP_HERE" -m pip wheel -q --no-deps --no-build-isolation --no-index -w "$WORK/self" . >/dev/null 2>&1 \
    || die "could not build forgenb's wheel here (for the check only)"
"${VP[@]}" install -q --no-index --no-deps "$WORK"/stubs/*.whl 2>&1 | grep -v 'is ignored' || true
"${VP[@]}" install -q --no-index --no-deps "$WHL"/*.whl "$WORK"/self/*.whl 2>&1 | grep -v 'is ignored' || true
"${VP[@]}" show -q forgenb >/dev/null 2>&1 || die "forgenb did not install in the check venv"
if ! "${VP[@]}" check > "$WORK/check.txt" 2>&1; then
  cat "$WORK/check.txt" >&2
  die "INCOMPLETE: pip check found missing or conflicting requirements (above) with .whl/ + the device's packages"
fi
# what a run(carry=['.whl']) call sends: tracked + untracked-not-ignored files + .whl/ (the cap is 64 MiB)
tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 du -cb 2>/dev/null | awk '$2 == "total" {s += $1} END {print s + 0}')
send=$(( (tree + $(du -sb "$WHL" | cut -f1)) / 1048576 ))
echo "gpu_wheels: a call with carry=['.whl'] sends about $send MiB (cap 64 MiB)"
(( send < 60 )) || die "the tree that travels would be $send MiB: close to or over the 64 MiB cap"
echo "gpu_wheels: OK: $(ls "$WHL"/*.whl | wc -l) wheels, $(du -sh "$WHL" | cut -f1) in .whl/; forgenb + .whl/ + the device's packages pass pip check (Python $("$WORK/venv/bin/python" -c 'import platform; print(platform.python_version())'))"
