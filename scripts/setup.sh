#!/usr/bin/env bash
# Create .venv and install vlapt with its test dependencies. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first: a CPU build when the machine's pip can find one (much smaller), else PyPI's default.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install -q "torch==2.13.0+cpu" 2>/dev/null || .venv/bin/pip install -q "torch>=2.2"
fi
.venv/bin/pip install -q -e ".[dev]"
.venv/bin/python -c "import vlapt, torch, metaworld; print('vlapt ready: torch', torch.__version__)"
