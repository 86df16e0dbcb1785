#!/usr/bin/python3
"""Variants of real tokenizer.json files with other normalizers, pre-tokenizers and decoders,
so that every piece kvserve supports is compared with @huggingface/tokenizers (which implements
them all) on the same corpus, not only the combinations the shipped files happen to use.

    /usr/bin/python3 tests/ref/tokenizer_variants.py HF_DIR

reads HF_DIR/llama2.tokenizer.json and HF_DIR/qwen3.tokenizer.json and writes
HF_DIR/variant-*.tokenizer.json (vocab, merges and added tokens untouched); the tokenizer_vs_huggingface
test compares them with @huggingface/tokenizers like the shipped files.
"""
import json
import os
import sys

META = "\u2581"


def variants(sp, bl):
    """Where @huggingface/tokenizers (JS) implements a piece as the Rust crate does. Where it does not
    (Metaspace's split and its decoder, Prepend before nothing, Split's Merged behaviors), the C
    test tokenizer_sentencepiece_style_rust_semantics checks kvserve against Rust's semantics."""
    legacy = [{"type": "Replace", "pattern": {"String": META}, "content": " "}, {"type": "ByteFallback"},
              {"type": "Fuse"}]
    strip = [{"type": "Strip", "content": " ", "start": 1, "stop": 0}]
    out = {}
    for scheme in ("always", "first", "never"):
        out[f"metaspace-{scheme}"] = dict(
            sp, normalizer=None,
            pre_tokenizer={"type": "Metaspace", "replacement": META, "prepend_scheme": scheme, "split": False},
            decoder={"type": "Sequence", "decoders": legacy + (strip if scheme != "never" else [])})
    out["nfkc-lower-strip"] = dict(sp, normalizer={"type": "Sequence", "normalizers": [
        {"type": "NFKC"}, {"type": "Lowercase"}, {"type": "Strip", "strip_left": True, "strip_right": True},
        {"type": "Replace", "pattern": {"String": " "}, "content": META}]},
        decoder={"type": "Sequence", "decoders": legacy})
    out["nfd-regex"] = dict(sp, normalizer={"type": "Sequence", "normalizers": [
        {"type": "NFD"}, {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
        {"type": "Replace", "pattern": {"String": " "}, "content": META}]})
    out["bytelevel-nfkd-split"] = dict(bl, normalizer={"type": "NFKD"}, pre_tokenizer={
        "type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "[,.!?]"}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}]})
    return out


def main():
    d = sys.argv[1]
    sp = json.load(open(os.path.join(d, "llama2.tokenizer.json"), encoding="utf-8"))
    bl = json.load(open(os.path.join(d, "qwen3.tokenizer.json"), encoding="utf-8"))
    for name, tj in variants(sp, bl).items():
        path = os.path.join(d, f"variant-{name}.tokenizer.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(tj, f, ensure_ascii=False)
        print(path)


if __name__ == "__main__":
    main()
