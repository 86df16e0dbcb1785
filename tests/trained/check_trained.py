#!/usr/bin/python3
"""The trained default model (tools/train_tiny.py) through kvserve, end to end.

    check_trained.py --kvserve BUILD/kvserve --model MODELS/tiny-en

1. kvserve's tokenizer gives the held-out text the trainer's own ids.
2. kvserve's perplexity on the held-out ids, scored in the trainer's windows with `kvserve score
   --ids`, equals the trainer's evaluation (train.json) to 1e-4 relative: loader, tokenizer and
   forward pass checked against the code the weights were trained with.
3. The perplexity change of BF16 weights, an F16 KV cache, Q8_0 and Q4_K weights (each within 5%).
4. A generation is English: at least half of its words are in Debian's word list (wamerican).
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys

SEQ = 128


def run(cmd, stdin=None):
    p = subprocess.run(cmd, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=600)
    if p.returncode:
        raise SystemExit("FAIL: %s: exit %d: %s" % (" ".join(cmd[:3]), p.returncode, p.stderr.decode(errors="replace")))
    return p.stdout.decode()


def held_out_nll(K, M, ids, opts):
    """Mean NLL of the held-out ids through `kvserve score --ids`, in the trainer's windows."""
    tot, n = 0.0, 0
    for s in range(0, len(ids) - 1, SEQ):
        w = ids[s:s + SEQ + 1]
        if len(w) < 2:
            break
        out = run([K, "score", "--model", M, "--ids", " ".join(map(str, w))] + opts)
        m = re.search(r"tokens (\d+)\s+mean logprob (-?[0-9.]+)", out)
        tot += -float(m.group(2)) * int(m.group(1))
        n += int(m.group(1))
    return tot / n, n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kvserve", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--words", default="/usr/share/dict/words")
    a = ap.parse_args()
    K, M = a.kvserve, a.model
    failed = 0
    tr = json.load(open(os.path.join(M, "train.json")))
    ids = [int(t) for t in open(os.path.join(M, "held_out.ids")).read().split()]

    text = open(os.path.join(M, "held_out.txt"), "rb").read()
    got = [int(t) for t in run([K, "tokenize", "--model", M], text).split()]
    ok = got == ids
    failed += not ok
    print("%s tokenizer: %d held-out ids%s" % ("PASS" if ok else "FAIL", len(ids), "" if ok else
          " differ (first at %d)" % next(i for i, (x, y) in enumerate(zip(got + [-1], ids + [-2])) if x != y)))

    nll, n = held_out_nll(K, M, ids, [])
    rel = abs(nll - tr["held_out_nll"]) / tr["held_out_nll"]
    ok = n == tr["held_out_tokens"] and rel <= 1e-4
    failed += not ok
    print("%s perplexity: kvserve %.6f nats/token (%.4f) on %d tokens, trainer %.6f (%.4f): relative %.1e"
          % ("PASS" if ok else "FAIL", nll, math.exp(nll), n, tr["held_out_nll"], tr["held_out_perplexity"], rel))

    # the lower precisions, measured on a trained model: within 5% of F32's perplexity
    for name, opts in (("BF16 weights", ["--weights", "bf16"]), ("F16 KV", ["--kv", "f16"]),
                       ("Q8_0 weights", ["--weights", "q8_0"]), ("Q4_K weights", ["--weights", "q4_k"])):
        x, _ = held_out_nll(K, M, ids, opts)
        ok = math.exp(x) <= 1.05 * math.exp(nll)
        failed += not ok
        print("%s %s: perplexity %.4f (%+.4f%%, %+.6f nats/token)" % ("PASS" if ok else "FAIL", name, math.exp(x),
              100 * (math.exp(x - nll) - 1), x - nll))

    words = {w.strip().lower() for w in open(a.words, encoding="utf-8", errors="replace")}
    gen = run([K, "generate", "--model", M, "-n", "200", "--temperature", "0.7", "--top-p", "0.9", "--seed", "1",
               "The"])
    found = re.findall(r"[A-Za-z]+", gen)
    frac = sum(w.lower() in words for w in found) / max(1, len(found))
    ok = len(found) >= 40 and frac >= 0.5
    failed += not ok
    print("%s words: %d of %d words of a 200-token generation are in %s (%.0f%%)"
          % ("PASS" if ok else "FAIL", sum(w.lower() in words for w in found), len(found), a.words, 100 * frac))
    print("generation: %r" % gen[:300])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
