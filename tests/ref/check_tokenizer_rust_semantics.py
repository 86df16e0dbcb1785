#!/usr/bin/env python3
"""Inputs where @huggingface/tokenizers (JS) departs from the Rust `tokenizers`
crate (Digits uses char::is_numeric, not ASCII \\d; the ByteLevel regex uses
Unicode \\s): kvserve follows Rust. Checked against tools/bpe_train.py's
independent Python encoder (the `regex` module with Rust's semantics).

  check_tokenizer_rust_semantics.py --kvserve BIN --tokenizer DIR/tokenizer.json --cases FILE.json
"""
import argparse, json, os, subprocess, sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
import bpe_train  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--kvserve", required=True)
ap.add_argument("--tokenizer", required=True)
ap.add_argument("--cases", required=True)
a = ap.parse_args()
cases = json.load(open(a.cases, encoding="utf-8"))
ref = bpe_train.Tokenizer(a.tokenizer)
out = subprocess.run([a.kvserve, "tokenize", "--tokenizer", a.tokenizer, "--json"],
                     input=json.dumps(cases).encode(), capture_output=True, check=True)
ours = json.loads(out.stdout)
passed = failed = 0
for text, got in zip(cases, ours):
    want = ref.encode(text)
    if got == want:
        passed += 1
    else:
        failed += 1
        print(f"FAIL {text!r}: kvserve {got} python {want}")
print(f"tokenizer-rust-semantics: {passed} passed, {failed} failed")
sys.exit(1 if failed or not passed else 0)
