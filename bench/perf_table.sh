#!/usr/bin/env bash
# The performance issue's table: our figures next to this machine's limits,
# measured in the same run (bench_engine, then bench_batch), and beside
# llama.cpp's figures as an issue reported them from ANOTHER machine (2 cores
# of an AMD EPYC): constants, not measured here; a ratio between the two
# columns means nothing unless this machine is that one.
#   bench/perf_table.sh [MODEL_DIR] [BUILD_DIR]
set -euo pipefail
model=${1:-build/models/smollm2-135m} build=${2:-build}
e=$("$build/bench/bench_engine" --model "$model" --threads 2 --reps 3)
b=$("$build/bench/bench_batch" --model "$model" --threads 2 --batches 1,2,4,8,16 --reps 3 \
      --resume-history 128 --resume-reps 1 --full-reps 1)
echo "$e"
echo
echo "$b" | sed -n '/## Batched generation/,/## Agent resume/p' | sed '$d'
row() { awk -F'|' -v w="$1" -v k="$2" -v t="$3" '{gsub(/ /,"",$2); gsub(/ /,"",$3); gsub(/ /,"",$4)} $2==w && $3==k && $4==t {gsub(/ /,"",$5); gsub(/ /,"",$7); split($7,a,"("); gsub(/ /,"",$8); print $5, a[1], $8}' <<<"$e"; }
read -r tg lim_tg fr_tg <<<"$(row F32 F32 tg64)"
read -r pp lim_pp fr_pp <<<"$(row F32 F32 pp512)"
read -r tgb lim_tgb fr_tgb <<<"$(row BF16 F32 tg64)"
stg() { awk -F'|' -v B="$1" '{gsub(/ /,"",$4)} $4==B && NF > 10 {gsub(/ /,"",$9); print $9}' <<<"$b" | head -1; }
b16=$(stg 16)
# 16 streams need both: the multiply-adds of 16 tokens (sgemm) and one read of
# the weights per step (bandwidth, shared by the 16): the lower bound binds
lim_b16=$(awk -v c="$lim_pp" -v b="$lim_tg" 'BEGIN{m = 16 * b; if (c < m) m = c; printf "%.0f", m}')
why_b16=$(awk -v c="$lim_pp" -v b="$lim_tg" 'BEGIN{print (c < 16 * b) ? "sgemm: compute-bound" : "read bandwidth × 16"}')
echo
echo "| figure | llama.cpp (copied from an issue: another machine, not measured here) | kvserve, this machine | this machine's limit | fraction of the limit |"
echo "|---|---|---|---|---|"
echo "| decode, 1 stream, F32 (tg64) | 60 t/s | $tg t/s | $lim_tg t/s (read bandwidth) | $fr_tg |"
echo "| prefill pp512, F32 | 545–565 t/s | $pp t/s | $lim_pp t/s (sgemm) | $fr_pp |"
echo "| batched decode, 16 streams (S_TG) | 146 t/s | $b16 t/s | $lim_b16 t/s ($why_b16) | $(awk -v a="$b16" -v b="$lim_b16" 'BEGIN{printf "%.2f", a/b}') |"
echo "| decode, 1 stream, BF16 weights | — | $tgb t/s ($(awk -v a="$tgb" -v b="$tg" 'BEGIN{printf "%.2f", a/b}')× F32) | $lim_tgb t/s (read bandwidth) | $fr_tgb |"
