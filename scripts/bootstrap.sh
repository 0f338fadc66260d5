#!/usr/bin/env bash
# Create the virtual environment seqmesh runs in.
# Without a GPU: the CPU build of torch 2.13.0 (a multi-GB CUDA build is never pulled by accident).
# With a GPU and a system torch already present: reuse it (--system-site-packages), install the rest.
set -euo pipefail
venv=${1:-.venv}
py=${PYTHON:-python3}
if command -v nvidia-smi >/dev/null 2>&1 && "$py" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  "$py" -m venv --system-site-packages "$venv"
else
  "$py" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q torch==2.13.0
fi
"$venv/bin/pip" install -q -e ".[dev]"
