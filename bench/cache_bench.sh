#!/usr/bin/env bash
# Prompt-cache-hit RPCs/s and latency at 1, 16 and 64 concurrent clients
# (kvctl load of one identical deterministic request, so every call after the
# first is a hit), next to redis-benchmark GET on the same Redis; then the
# RAG lookup time at 10k and 100k entries of 384 dims (bench_rag).
#   bench/cache_bench.sh [MODEL_DIR] [BUILD_DIR]
set -euo pipefail
model=${1:-build/models/tiny} build=${2:-build}
port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rport=$(port) kport=$(port)
redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 &
rpid=$!
"$build/kvserve" serve --model "$model" --listen "127.0.0.1:$kport" --redis "redis://127.0.0.1:$rport/0" \
  --threads 1 2>/tmp/cache_bench_server.log &
kpid=$!
trap 'kill -TERM $kpid 2>/dev/null; kill $rpid 2>/dev/null' EXIT
for _ in $(seq 200); do "$build/kvctl" --addr "127.0.0.1:$kport" --timeout 1 health >/dev/null 2>&1 && break; sleep 0.1; done
K=("$build/kvctl" --addr "127.0.0.1:$kport")
"${K[@]}" generate -n 16 --ignore-eos --quiet "A cached question" 2>/dev/null   # the miss that fills the cache
sleep 0.5
printf '| clients | cache-hit Stream RPCs/s | p50 ms | p99 ms | redis-benchmark GET req/s |\n|---|---|---|---|---|\n'
for c in 1 16 64; do
  n=$((c * 100 > 2000 ? c * 100 : 2000))
  line=$("${K[@]}" load --same --concurrency "$c" --requests "$n" -n 16 --ignore-eos --quiet "A cached question")
  rps=$(sed -n 's/.* tokens\/s, \([0-9.]*\) requests\/s.*/\1/p' <<<"$line")
  p50=$(sed -n 's/.*latency p50 \([0-9.]*\) ms.*/\1/p' <<<"$line")
  p99=$(sed -n 's/.*latency p50 [0-9.]* ms p99 \([0-9.]*\) ms.*/\1/p' <<<"$line")
  rb=$(redis-benchmark -p "$rport" -t get -c "$c" -n 100000 -q 2>/dev/null | sed -n 's/.*GET: \([0-9.]*\) requests per second.*/\1/p' | tail -1)
  printf '| %d | %s | %s | %s | %s |\n' "$c" "$rps" "$p50" "$p99" "$rb"
done
"$build/kvctl" --addr "127.0.0.1:$kport" stats >/dev/null
echo
"$build/bench/bench_rag" --redis "redis://127.0.0.1:$rport/0" --entries 10000,100000 --dim 384 --lookups 200
