#!/usr/bin/env bash
# The main job, from a fresh Debian 12 machine: install what is missing,
# build, train the default model once (tools/train_tiny.py: a 2.6M-weight
# LLaMA on the English text of the machine's Python docstrings and licenses),
# start a local redis-server and the kvserve gRPC service on loopback ports and
# stream a generation from it to the terminal with kvctl.
#   KVSERVE_MODEL=DIR   use another Hugging Face model directory, or a GGUF file
#   extra arguments are passed to `kvctl generate` (e.g. -n 100 "a prompt")
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j2 --target kvserve kvctl
model=${KVSERVE_MODEL:-$PWD/models/tiny-en}
if [[ -z ${KVSERVE_MODEL:-} && ! -f $model/config.json ]]; then
  echo "training the default model in $model (once, about 4 minutes: tools/train_tiny.py)"
  /usr/bin/python3 tools/train_tiny.py train --out "$model" | tail -n 2
fi
free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rport=$(free_port) port=$(free_port)
redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no >build/redis.log 2>&1 &
rpid=$!
build/kvserve serve --model "$model" --listen "127.0.0.1:$port" --threads 2 --redis "redis://127.0.0.1:$rport/0" \
  2>build/kvserve.log &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null || true; kill $rpid 2>/dev/null || true' EXIT
for _ in $(seq 300); do
  build/kvctl --addr "127.0.0.1:$port" --timeout 1 health >/dev/null 2>&1 && break
  kill -0 $pid 2>/dev/null || { cat build/kvserve.log; exit 1; }
  sleep 0.1
done
echo "kvserve is serving $model on 127.0.0.1:$port, prompt cache on redis 127.0.0.1:$rport (log: build/kvserve.log)"
if (($# == 0)); then set -- -n 80 --temperature 0.7 --top-p 0.9 --seed 1 "The"; fi
build/kvctl --addr "127.0.0.1:$port" generate "$@"
