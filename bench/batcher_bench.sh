#!/usr/bin/env bash
# The request batcher's window against throughput and latency: a closed loop
# of C clients sending random prompts to the same model, once per window
# setting (the server restarted each time), and prompt-cache hits at 1 and 16
# clients. Used to choose the defaults (docs/operations.md).
#   bench/batcher_bench.sh [MODEL_DIR] [BUILD_DIR] [WINDOWS_MS...]
set -euo pipefail
model=${1:-build/models/smollm2-135m} build=${2:-build}
shift $(( $# > 2 ? 2 : $# )) || true
windows=("${@:-0 2 10 50}")
read -r -a windows <<<"${windows[*]}"
C=${C:-16} REQ=${REQ:-48} PT=${PT:-64} NT=${NT:-32}
port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rport=$(port)
redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 &
rpid=$!
kpid=
trap 'kill -TERM $kpid 2>/dev/null; kill $rpid 2>/dev/null' EXIT
for _ in $(seq 100); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.05; done
printf '| window ms | engine: t/s | req/s | TTFT p50 / p99 ms | latency p50 / p99 ms | hits, 1 client: req/s, p50 ms | hits, 16 clients: req/s, p50 ms |\n'
printf '|---|---|---|---|---|---|---|\n'
for w in "${windows[@]}"; do
  redis-cli -p "$rport" flushall >/dev/null   # kvctl's random prompts repeat: no hits carried over
  kport=$(port)
  "$build/kvserve" serve --model "$model" --listen "127.0.0.1:$kport" --redis "redis://127.0.0.1:$rport/0" \
    --threads 2 --batch-window-ms "$w" --batch-max 16 2>/dev/null &
  kpid=$!
  for _ in $(seq 300); do "$build/kvctl" --addr "127.0.0.1:$kport" --timeout 1 health >/dev/null 2>&1 && break; sleep 0.1; done
  K=("$build/kvctl" --addr "127.0.0.1:$kport")
  # random prompts, sampled (not cacheable): every request runs the engine
  e=$("${K[@]}" load --concurrency "$C" --requests "$REQ" --prompt-tokens "$PT" -n "$NT" --ignore-eos \
        --temperature 0.8 --quiet x)
  grep -q '(failed 0)' <<<"$e" || echo "warning: $e" >&2
  tps=$(sed -n 's/.* s: \([0-9.]*\) tokens\/s.*/\1/p' <<<"$e")
  rps=$(sed -n 's/.* tokens\/s, \([0-9.]*\) requests\/s.*/\1/p' <<<"$e")
  ttft=$(sed -n 's/.*ttft p50 \([0-9.]*\) ms p99 \([0-9.]*\) ms.*/\1 \/ \2/p' <<<"$e")
  lat=$(sed -n 's/.*latency p50 \([0-9.]*\) ms p99 \([0-9.]*\) ms.*/\1 \/ \2/p' <<<"$e")
  "${K[@]}" generate -n 16 --ignore-eos --quiet "A cached question $w" >/dev/null 2>&1
  sleep 0.3
  h=()
  for c in 1 16; do
    l=$("${K[@]}" load --same --concurrency "$c" --requests 2000 -n 16 --ignore-eos --quiet "A cached question $w")
    h+=("$(sed -n 's/.* tokens\/s, \([0-9.]*\) requests\/s.*/\1/p' <<<"$l"), $(sed -n 's/.*latency p50 \([0-9.]*\) ms.*/\1/p' <<<"$l")")
  done
  printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$w" "$tps" "$rps" "$ttft" "$lat" "${h[0]}" "${h[1]}"
  kill -TERM "$kpid"; wait "$kpid" 2>/dev/null || true; kpid=
done
