#!/usr/bin/env bash
# Creates bench/.venv with the reference implementation (PyTorch + transformers + gguf), used only
# for side-by-side benchmarks and for regenerating pinned reference values; never by the tool or
# by CI's tests. About 3 GB (PyPI's torch wheel is the CUDA build; it runs on CPU).
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import torch, transformers, gguf, peft" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
fi
.venv/bin/python -c "import torch, transformers; print('reference: torch', torch.__version__, 'transformers', transformers.__version__)"
