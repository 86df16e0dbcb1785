#!/usr/bin/python3
"""A GGUF file computes what its model directory computes.

    /usr/bin/python3 tests/gguf/check_same.py --kvserve BUILD/kvserve --models MODELS

For each pair (tests/gen_gguf.sh writes the files) `kvserve logits` on the GGUF file and on the
directory must give the same bytes: the F32/F16/BF16 files against the safetensors models they
were written from (llama's q/k rows interleaved as llama.cpp stores them, and back), the
quantized files against their dequantized twins (the same values in F32, written by the
writer's own dequantizer: the C one must agree with it to the bit), GGUF v2 and v3 alike, and
with --weights bf16; a Q8_0 file run in Q8_0 (its default) as the F32 model quantized at load, and a
Q4_K file run in its K-quant blocks (its default) as the F32 model quantized to Q4_K at load. The tokenizer and the chat template read from a GGUF file give the same
ids and the same text as the directory's files.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

F32, BF16, Q8, Q4K = ["--weights", "f32"], ["--weights", "bf16"], ["--weights", "q8_0"], ["--weights", "q4_k"]
PAIRS = [  # (gguf, its options, directory, its options)
    ("tiny", [], "tiny", []), ("tiny-v2", [], "tiny", []), ("tiny-untied", [], "tiny-untied", []),
    ("tiny-qwen2", [], "tiny-qwen2", []), ("tiny-qwen3", [], "tiny-qwen3", []),
    ("tiny-llama-bias", [], "tiny-llama-bias", []), ("tiny-mistral", [], "tiny-mistral", []),
    ("tiny-llama2tok", [], "tiny-llama2tok", []), ("tiny-f16", [], "tiny-f16", []), ("tiny-bf16", [], "tiny-bf16", []),
    ("tiny", BF16, "tiny", BF16), ("tiny", Q8, "tiny", Q8),
    # quantized files dequantized to F32 = their dequantized twins
    ("tiny-q8_0", F32, "gguf/tiny-q8_0.deq", F32), ("tiny-q4_0", [], "gguf/tiny-q4_0.deq", []),
    ("tiny-k-q8_0", F32, "gguf/tiny-k-q8_0.deq", F32), ("tiny-k-q4_k", F32, "gguf/tiny-k-q4_k.deq", F32),
    ("tiny-k-q6_k", F32, "gguf/tiny-k-q6_k.deq", F32), ("tiny-k-q4_k_m", F32, "gguf/tiny-k-q4_k_m.deq", F32),
    ("tiny-k-q4_k_m", BF16 + ["--kv", "f16"], "gguf/tiny-k-q4_k_m.deq", BF16 + ["--kv", "f16"]),
    ("tiny-qwen3-q4_k_m", F32, "gguf/tiny-qwen3-q4_k_m.deq", F32),  # (rows of 64: Q8_0 in the file)
    # a Q8_0 file runs in Q8_0 by default, with its own values: the F32 model quantized at load
    # (our quantizer, ggml's reference one) computes the same
    ("tiny-q8_0", [], "tiny", Q8), ("tiny-k-q8_0", [], "tiny-k", Q8), ("tiny-k-q8_0", [], "gguf/tiny-k-q8_0.deq", Q8),
    ("tiny-qwen3-q4_k_m", [], "gguf/tiny-qwen3-q4_k_m.deq", Q8),
    # a K-quant file runs in its own blocks by default; --weights q4_k quantizes the F32 model at load
    # with our quantizer, the writer's: the same blocks, the same logits. Rows that are not whole
    # super-blocks of 256 (tiny's 64) are Q8_0 under q4_k, in a Q8_0 file as in a directory.
    ("tiny-k-q4_k", [], "tiny-k", Q4K), ("tiny-k-q4_k", Q4K, "tiny-k", Q4K), ("tiny-q8_0", Q4K, "tiny", Q8),
]
IDS = "1 5 9 200 17 3 999 42 7 64 128 256 511 2 3 4 5 6 7 8 9 10"
TEXTS = ["Hello, world! 12345", "  spaces\tand\nlines  ", "naïve café — ünïcödé 東京 🙂", ""]


def run(cmd, stdin=None):
    p = subprocess.run(cmd, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=600)
    if p.returncode != 0:
        raise AssertionError("%s: exit %d: %s" % (" ".join(cmd), p.returncode, p.stderr.decode(errors="replace")))
    return p.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kvserve", required=True)
    ap.add_argument("--models", required=True)
    a = ap.parse_args()
    K, M = a.kvserve, a.models
    passed = failed = 0

    def check(name, ok, msg=""):
        nonlocal passed, failed
        passed += ok
        failed += not ok
        print("%s %s %s" % ("PASS" if ok else "FAIL", name, msg), flush=True)

    tmp = tempfile.mkdtemp(prefix="kvgguf-")
    for g, gopts, d, dopts in PAIRS:
        out = []
        for k, (model, opts) in enumerate(((os.path.join(M, "gguf", g + ".gguf"), gopts), (os.path.join(M, d), dopts))):
            f = os.path.join(tmp, "l%d.f32" % k)
            run([K, "logits", "--model", model, "--ids", IDS, "--out", f] + opts)
            out.append(open(f, "rb").read())
        check("logits %s %s = %s %s" % (g, " ".join(gopts), d, " ".join(dopts)), out[0] == out[1] and len(out[0]) > 0,
              "(%d bytes)" % len(out[0]))
    for g, d in (("tiny", "tiny"), ("tiny-llama2tok", "tiny-llama2tok"), ("tiny-qwen3chat", "tiny-qwen3chat")):
        texts = json.dumps(TEXTS).encode()
        ids = [run([K, "tokenize", "--model", m, "--json"], texts) for m in (os.path.join(M, "gguf", g + ".gguf"),
                                                                                os.path.join(M, d))]
        check("tokenize %s" % g, ids[0] == ids[1], ids[0].decode()[:80])
    ctx = json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                      "add_generation_prompt": True}).encode()
    texts = [run([K, "chat-template", m], ctx) for m in (os.path.join(M, "gguf", "tiny-qwen3chat.gguf"),
                                                          os.path.join(M, "tiny-qwen3chat"))]
    check("chat-template tiny-qwen3chat", texts[0] == texts[1] and b"<|im_start|>" in texts[0], repr(texts[0][:60]))
    print("gguf: %d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
