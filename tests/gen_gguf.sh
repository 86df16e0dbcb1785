#!/usr/bin/env bash
# Write the GGUF test files (tools/gguf_write.py) from the test models in $1
# (default build/models) into $1/gguf: the same models as GGUF files, in each
# weight type with their dequantized twins (DIR.deq, the reference runs on
# them), and tokenizer-only files of the real tokenizer.json files. A file is
# rewritten only when the writer or the models changed.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
models=${1:-$here/build/models}
out=$models/gguf
py=/usr/bin/python3
mkdir -p "$out"
stamp=$(cat "$here"/tools/gguf_write.py "$here"/tools/mkmodel.py "$here"/tools/bpe_train.py | sha256sum | cut -c1-16)

w() { # name, gguf_write args...
  local name=$1; shift
  if [[ -f $out/$name.stamp && $(cat "$out/$name.stamp") == "$stamp $*" ]]; then return; fi
  rm -rf "${out:?}/$name.gguf" "${out:?}/$name.deq"
  "$py" "$here/tools/gguf_write.py" --out "$out/$name.gguf" --quiet "$@"
  echo "$stamp $*" > "$out/$name.stamp"
}
m=$models
# the same values as the safetensors models: identical logits
w tiny             --model "$m/tiny"
w tiny-v2          --model "$m/tiny" --version 2
w tiny-untied      --model "$m/tiny-untied"
w tiny-qwen2       --model "$m/tiny-qwen2"
w tiny-qwen3       --model "$m/tiny-qwen3"
w tiny-llama-bias  --model "$m/tiny-llama-bias"
w tiny-mistral     --model "$m/tiny-mistral"
w tiny-llama31     --model "$m/tiny-llama31"     # llama3 RoPE scaling as rope_freqs
w tiny-llama2tok   --model "$m/tiny-llama2tok"
w tiny-qwen3chat   --model "$m/tiny-qwen3chat"
w tiny-f16         --model "$m/tiny-f16" --type f16   # the same values as the F16 directory
w tiny-bf16        --model "$m/tiny-bf16" --type bf16
# quantized, with the dequantized values beside them
for t in q8_0 q4_0; do w "tiny-$t" --model "$m/tiny" --type $t --dequantized "$out/tiny-$t.deq"; done
for t in q8_0 q4_k q6_k q4_k_m; do w "tiny-k-$t" --model "$m/tiny-k" --type $t --dequantized "$out/tiny-k-$t.deq"; done
w tiny-qwen3-q4_k_m --model "$m/tiny-qwen3" --type q4_k_m --dequantized "$out/tiny-qwen3-q4_k_m.deq" # rows of 64: Q8_0
# tokenizers only: ids identical to @huggingface/tokenizers on the tokenizer.json they came from
for t in llama3 gpt4o qwen3 llama2 gemma3; do w "tok-$t" --tokenizer "$m/hf/$t.tokenizer.json"; done
for t in llama2 gemma3; do w "tok-$t-nomerges" --tokenizer "$m/hf/$t.tokenizer.json" --no-merges; done
echo "GGUF files ready in $out"
