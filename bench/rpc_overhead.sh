#!/usr/bin/env bash
# The cost of the RPC layer: generated tokens/s through Stream (kvctl load,
# B concurrent streams) against the engine alone (bench_batch, B sequences)
# on the same workload: B requests of a 128-token prompt and 64 generated.
#   bench/rpc_overhead.sh [MODEL_DIR] [BUILD_DIR]
set -euo pipefail
model=${1:-build/models/smollm2-135m} build=${2:-build} threads=${THREADS:-2}
port=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$build/kvserve" serve --model "$model" --listen "127.0.0.1:$port" --threads "$threads" --max-running 16 \
  --pool-blocks 2048 2>/tmp/rpc_overhead_server.log &
pid=$!
trap 'kill $pid 2>/dev/null' EXIT
for _ in $(seq 200); do "$build/kvctl" --addr "127.0.0.1:$port" --timeout 1 health >/dev/null 2>&1 && break; sleep 0.1; done
printf '| streams | engine alone (t/s) | through Stream (t/s) | ratio |\n|---|---|---|---|\n'
for B in 1 16; do
  # engine: T (total seconds) of the B row; generated tokens/s = B*64/T
  T=$("$build/bench/bench_batch" --model "$model" --threads "$threads" --reps 2 --batches "$B" --pp 128 --tg 64 \
        --resume-history 16 --resume-new 4 --resume-reps 1 --full-reps 1 2>/dev/null | awk -F'|' -v b="$B" '$4+0==b && $2+0==128 {gsub(/ /,"",$11); print $11; exit}')
  eng=$(awk -v b="$B" -v t="$T" 'BEGIN{printf "%.1f", b*64/t}')
  best=0
  for r in 1 2; do
    line=$("$build/kvctl" --addr "127.0.0.1:$port" load --concurrency "$B" --requests "$B" --prompt-tokens 128 \
             -n 64 --ignore-eos --quiet x)
    tps=$(sed -n 's/.* s: \([0-9.]*\) tokens\/s.*/\1/p' <<<"$line")
    best=$(awk -v a="$best" -v b="$tps" 'BEGIN{print (b>a)?b:a}')
  done
  printf '| %d | %s | %s | %.2f |\n' "$B" "$eng" "$best" "$(awk -v a="$best" -v b="$eng" 'BEGIN{print a/b}')"
done
kill -TERM $pid; wait $pid
