#!/bin/bash
# Agents' warm tier: restore from Redis against recomputing, for a 2,048-token
# agent, on a redis-server of its own (a free loopback port, no persistence).
#
#   bash bench/agent_store_bench.sh MODEL [BUILD] [extra bench_agent_store args]
#
# Runs bench_agent_store with the KV in F32 and in F16 (what Redis stores and
# moves is half as large).
set -euo pipefail
model=${1:?usage: agent_store_bench.sh MODEL [BUILD] [args]}
build=${2:-build}
shift $(( $# >= 2 ? 2 : 1 ))
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
rpid=$!
trap 'kill $rpid 2>/dev/null || true' EXIT
for _ in $(seq 200); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done
echo "redis-server $(redis-server --version | awk '{print $3}') on 127.0.0.1:$port; $(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
for kv in f32 f16; do
  echo
  "$build/bench/bench_agent_store" --model "$model" --redis "redis://127.0.0.1:$port/0" --kv "$kv" "$@"
done
