#!/usr/bin/env bash
# The main job, from a fresh Debian 12 machine: install what is missing,
# build, generate the default model (SmolLM2-135M's exact shape, random
# weights, our trained BPE tokenizer) and stream a generation to the terminal.
#   KVSERVE_MODEL=DIR   use another Hugging Face model directory
#   extra arguments are passed to `kvserve generate` (e.g. a prompt, -n 100)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j2 --target kvserve
model=${KVSERVE_MODEL:-$PWD/models/smollm2-135m}
if [[ ! -f $model/config.json ]]; then
  echo "generating the default model in $model (once)"
  /usr/bin/python3 tools/mkmodel.py --preset smollm2-135m --out "$model" --cache models/.cache
fi
if (($# == 0)); then set -- -n 64 --temperature 0.8 --top-p 0.95 --seed 1 "The quick brown fox"; fi
exec build/kvserve generate --model "$model" --threads 2 "$@"
