#!/usr/bin/env bash
# kvserve against llama.cpp on the same GGUF file, the same machine and threads.
#
#   bash bench/vs_llamacpp.sh MODEL.gguf [BUILD_DIR]
#   environment: THREADS (2), REPS (5: timed runs per test, after one warm-up),
#                ROUNDS (2: rounds of kvserve then llama.cpp, interleaved),
#                KVSERVE_WEIGHTS / KVSERVE_BATCH_WEIGHTS (override the weight format
#                chosen from the file: bench_engine's f32|bf16|q8|q4k, bench_batch's
#                f32|bf16|q8_0|q4_k),
#                LLAMACPP_ARGS (more llamacpp_bench.mjs options, e.g. "--kv f32 --fa off"),
#                LLAMACPP_THREADS (the thread counts llama.cpp runs with in each round, "1 THREADS"
#                by default; each figure takes llama.cpp's best of them: on a 2-vCPU VM its
#                one-thread decode was faster than its two-thread one)
#
# kvserve's weight format follows the file's matrices: F32 -> f32, BF16 and F16 -> bf16
# (2 bytes a weight, as llama.cpp keeps F16), Q8_0 (and Q4_0) -> q8, any Q4_K or Q6_K ->
# q4k (its K-quant blocks as they are, Q8_0 matrices kept as Q8_0).
#
# llama.cpp is node-llama-cpp's prebuilt linux-x64 build (bench/llamacpp): its
# libraries for every x86 CPU variant, of which ggml loads the best one for this CPU.
# It is installed from the npm registry alone (npm ci of bench/llamacpp's lock file,
# install scripts off, optional packages (GPU builds) left out), the first time or
# whenever the lock file changed.
#
# Each round runs, in this order: kvserve's bench_engine (pp128, pp512, tg64 and the
# machine's read bandwidth), kvserve's bench_batch (16 streams, prompt 128, 64
# generated), then bench/llamacpp/llamacpp_bench.mjs (pp128, pp512, tg64, b16). The
# table gives each figure's median over the rounds of each round's mean, and
# kvserve / llama.cpp.
#
# Not the same work in every detail: kvserve's KV cache is F32, llama.cpp's F16 (its
# default; LLAMACPP_ARGS="--kv f32" to match); kvserve's bench_batch S_TG counts 63
# decode steps after each sequence's first token (B*(tg-1)/T_TG, with continuous
# batching), llama.cpp's b16 64 steps; both are tokens per second of decode steps, and
# both include greedy sampling. node-llama-cpp attaches no persistent ggml threadpool to
# its contexts (llama-bench does), so each llama_decode starts and joins its worker
# threads; that cost is inside llama.cpp's own timer, not the binding's.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
model=${1:?usage: bash bench/vs_llamacpp.sh MODEL.gguf [BUILD_DIR]}
build=${2:-$here/../build}
threads=${THREADS:-2} reps=${REPS:-5} rounds=${ROUNDS:-2}
lthreads=${LLAMACPP_THREADS:-$( (echo 1; echo "$threads") | sort -un | tr '\n' ' ')}
lthreads=${lthreads% }
[[ -f $model ]] || { echo "vs_llamacpp: no such file: $model" >&2; exit 2; }
for b in bench_engine bench_batch; do
  [[ -x $build/bench/$b ]] || { echo "vs_llamacpp: $build/bench/$b is missing (build kvserve first)" >&2; exit 2; }
done
((rounds >= 1 && reps >= 1)) || { echo "vs_llamacpp: ROUNDS and REPS must be >= 1" >&2; exit 2; }

# ---- llama.cpp through node-llama-cpp: install once per lock file ----
js=$here/llamacpp
want=$(sha256sum "$js/package-lock.json" | cut -d' ' -f1)
if [[ ! -d $js/node_modules || $(cat "$js/node_modules/.kvserve-lock" 2>/dev/null) != "$want" ]]; then
  echo "vs_llamacpp: npm ci (bench/llamacpp: node-llama-cpp and its prebuilt linux-x64 binaries, ~85 MB)" >&2
  # --ignore-scripts: node-llama-cpp's postinstall would look for a llama.cpp build
  # (and, without a usable prebuilt binary, download the source to compile it);
  # NODE_LLAMA_CPP_SKIP_DOWNLOAD makes that postinstall a no-op in any case.
  # --omit=optional: the CUDA, Vulkan and other platforms' builds (optional
  # dependencies of node-llama-cpp, hundreds of MB) are not fetched; the CPU build is a
  # direct dependency of bench/llamacpp.
  (cd "$js" && NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm ci --ignore-scripts --omit=optional \
      --no-audit --no-fund --loglevel=error) >&2
  echo "$want" >"$js/node_modules/.kvserve-lock"
fi
export NODE_LLAMA_CPP_SKIP_DOWNLOAD=true

# ---- the weight format kvserve holds this file's matrices in ----
kw=$(node "$js/llamacpp_bench.mjs" --model "$model" --kvserve-weights) || exit 1
read -r ew bw mix < <(echo "$kw" |
  sed -E 's/^engine=([^ ]+) batch=([^ ]+) matrices="(.*)"$/\1 \2 \3/')
ew=${KVSERVE_WEIGHTS:-$ew} bw=${KVSERVE_BATCH_WEIGHTS:-$bw}
echo "model: $model ($mix of the weight matrices; kvserve: bench_engine --weights $ew, bench_batch --weights $bw)"
echo "threads $threads, $reps timed runs per test after a warm-up, $rounds rounds"
load0=$(cut -d' ' -f1-3 /proc/loadavg)
echo


out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for ((r = 1; r <= rounds; r++)); do
  echo "== round $r: kvserve" >&2
  "$build/bench/bench_engine" --model "$model" --threads "$threads" --reps "$reps" --weights "$ew" >"$out/e$r" 2>&1 ||
    { cat "$out/e$r" >&2; exit 1; }
  # The agent-resume part of bench_batch cannot be turned off: make it as small as it goes.
  "$build/bench/bench_batch" --model "$model" --threads "$threads" --reps "$reps" --batches 16 --pp 128 --tg 64 \
    --weights "$bw" --resume-history 16 --resume-new 1 --resume-reps 1 --full-reps 1 >"$out/b$r" 2>&1 ||
    { cat "$out/b$r" >&2; exit 1; }
  for lt in $lthreads; do
    echo "== round $r: llama.cpp, $lt threads" >&2
    # shellcheck disable=SC2086  # LLAMACPP_ARGS: words on purpose
    node "$js/llamacpp_bench.mjs" --model "$model" --threads "$lt" --reps "$reps" \
      --tests pp128,pp512,tg64,b16 ${LLAMACPP_ARGS:-} >"$out/l$r-$lt" 2>&1 || { cat "$out/l$r-$lt" >&2; exit 1; }
  done
  cp "$out/l$r-${lthreads%% *}" "$out/l$r"
done

# ---- per-round figures ----
# bench_engine: "| Q8_0 | F32 | pp512 | t/s | ..."; bench_batch: "| PP | TG | B | N_KV | T_PP |
# S_PP | T_TG | S_TG | ..."; llamacpp_bench: "| pp512 | mean | sd | best | runs |".
eng() { awk -F'|' -v t="$2" '{g=$4; gsub(/ /,"",g)} g==t {v=$5; gsub(/ /,"",v); print v; exit}' "$1"; }
bat() { awk -F'|' '{b=$4; gsub(/ /,"",b)} b=="16" && NF > 10 {v=$9; gsub(/ /,"",v); print v; exit}' "$1"; }
lcp1() { awk -F'|' -v t="$2" '{g=$2; gsub(/ /,"",g)} g==t {v=$3; gsub(/ /,"",v); print v; exit}' "$1"; }
# llama.cpp's figure in round $1: its best over the thread counts (and which, in W)
declare -A W
lcp() {
  local best=0 bt="" v lt
  for lt in $lthreads; do
    v=$(lcp1 "$out/l$1-$lt" "$2")
    if awk -v a="$v" -v b="$best" 'BEGIN {exit !(a > b)}'; then best=$v bt=$lt; fi
  done
  W[$2]+=" $bt"
  echo "$best"
}
bw() { sed -nE 's/^machine: read bandwidth ([0-9.]+) GB\/s.*/\1/p' "$1"; }
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {if (NR == 0) print "-"; else if (NR % 2) print a[(NR+1)/2]; else printf "%.1f\n", (a[NR/2]+a[NR/2+1])/2}'; }

declare -A K L
probe=""
for ((r = 1; r <= rounds; r++)); do
  for t in pp128 pp512 tg64; do K[$t]+=" $(eng "$out/e$r" "$t")"; lcp "$r" "$t" >"$out/v"; L[$t]+=" $(cat "$out/v")"; done
  K[b16]+=" $(bat "$out/b$r")"; lcp "$r" b16 >"$out/v"; L[b16]+=" $(cat "$out/v")"
  probe+=" $(bw "$out/e$r")"
done

echo "### llama.cpp build and model, as llamacpp_bench.mjs reported them (round 1)"
echo
grep -E '^(llama\.cpp|ggml CPU backend|model|threads|llama\.cpp context):' "$out/l1" | sed 's/^/    /'
echo
echo "### Binding overhead (llamacpp_bench.mjs, each round)"
echo
for ((r = 1; r <= rounds; r++)); do grep -E '^(pp[0-9]+|tg64|b16): ' "$out/l$r" | sed "s/^/    round $r: /"; done
echo
echo "### Per round (each a mean of $reps timed runs)"
echo
echo "| figure | kvserve, rounds | llama.cpp, rounds | llama.cpp's best thread count, rounds |"
echo "|---|---|---|---|"
for t in pp128 pp512 tg64 b16; do echo "| $t |${K[$t]} |${L[$t]} |${W[$t]} |"; done
echo "| read-bandwidth probe (bench_engine, GB/s) |$probe | | |"
echo
echo "### kvserve against llama.cpp: medians over $rounds rounds (kvserve $threads threads, llama.cpp the best of $lthreads; $(basename "$model"))"
echo
echo "| figure | kvserve | llama.cpp | ratio |"
echo "|---|---|---|---|"
row() {
  local k l
  k=$(median <<<"${K[$2]}") l=$(median <<<"${L[$2]}")
  echo "| $1 | $k t/s | $l t/s | $(awk -v a="$k" -v b="$l" 'BEGIN {if (b > 0 && a > 0) printf "%.2f", a / b; else print "-"}') |"
}
row "prefill pp512" pp512
row "decode tg64, 1 stream" tg64
row "batched decode, 16 streams, S_TG (prompt 128, 64 generated)" b16
row "prefill pp128" pp128
echo "| read-bandwidth probe, bench_engine | $(median <<<"$probe") GB/s | | |"
echo
echo "load average (1, 5, 15 min): $load0 before, $(cut -d' ' -f1-3 /proc/loadavg) after. Other load on these"
echo "cores hurts llama.cpp's figures far more than kvserve's (ggml's threads spin at a barrier after every"
echo "graph node, so one preempted thread stalls the others): compare runs made on a quiet machine."
echo "ratio: kvserve / llama.cpp (above 1: kvserve is faster). kvserve weights: $ew (bench_engine), $bw (bench_batch),"
echo "KV cache F32; llama.cpp holds the file's own tensors, with the settings of its 'threads:' line above."
