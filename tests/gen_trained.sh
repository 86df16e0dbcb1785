#!/usr/bin/env bash
# Train the small English model (tools/train_tiny.py, ~4 minutes on 2 cores) into $1/tiny-en
# (default build/models), unless it is there from the same trainer already.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-$here/build/models}/tiny-en
stamp=$(cat "$here"/tools/train_tiny.py "$here"/tools/bpe_train.py | sha256sum | cut -c1-16)
if [[ -f $out/.stamp && $(cat "$out/.stamp") == "$stamp" ]]; then exit 0; fi
rm -rf "$out"
/usr/bin/python3 "$here/tools/train_tiny.py" train --out "$out"
echo "$stamp" > "$out/.stamp"
