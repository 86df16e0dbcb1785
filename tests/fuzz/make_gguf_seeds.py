#!/usr/bin/python3
"""Write the GGUF fuzz seeds (tests/fuzz/corpus_gguf), small files of every part the reader knows.

    /usr/bin/python3 tests/fuzz/make_gguf_seeds.py tests/fuzz/corpus_gguf

llama_q8: a one-layer llama model (hidden 32) with a byte-level tokenizer of 260 tokens, its
matrices Q8_0 and Q4_0; spm: a SentencePiece tokenizer with scores and no merges, a chat
template; ktensors: one tensor of each K type (Q4_K, Q6_K), F16 and BF16, no model.
Deterministic: the same files every run.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools"))
import gguf_write as gw  # noqa: E402


def byte_vocab():
    # GPT-2's printable map of the 256 bytes
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def main(out):
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(7)
    tokens = byte_vocab() + ["he", "ll", "hell", "hello"]
    merges = ["h e", "l l", "he ll", "hell o"]
    A = "llama"
    kvs = [gw.gkv("general.architecture", gw.STRING, A), gw.gkv("general.alignment", gw.U32, 32)]
    for k, v in (("context_length", 64), ("embedding_length", 32), ("block_count", 1), ("feed_forward_length", 64),
                 ("attention.head_count", 2), ("attention.head_count_kv", 1)):
        kvs.append(gw.gkv("%s.%s" % (A, k), gw.U32, v))
    kvs += [gw.gkv(A + ".attention.layer_norm_rms_epsilon", gw.F32, 1e-5), gw.gkv(A + ".rope.freq_base", gw.F32, 1e4),
            gw.gkv("tokenizer.ggml.model", gw.STRING, "gpt2"), gw.gkv("tokenizer.ggml.pre", gw.STRING, "smollm"),
            gw.gkv("tokenizer.ggml.tokens", gw.ARRAY, tokens, gw.STRING),
            gw.gkv("tokenizer.ggml.token_type", gw.ARRAY, [1] * len(tokens), gw.I32),
            gw.gkv("tokenizer.ggml.merges", gw.ARRAY, merges, gw.STRING),
            gw.gkv("tokenizer.ggml.bos_token_id", gw.U32, 0), gw.gkv("tokenizer.ggml.eos_token_id", gw.U32, 1)]
    V, H, F, hd = len(tokens), 32, 64, 16
    shapes = {"token_embd.weight": (V, H), "output_norm.weight": (H,), "blk.0.attn_norm.weight": (H,),
              "blk.0.ffn_norm.weight": (H,), "blk.0.attn_q.weight": (2 * hd, H), "blk.0.attn_k.weight": (hd, H),
              "blk.0.attn_v.weight": (hd, H), "blk.0.attn_output.weight": (H, 2 * hd), "blk.0.ffn_gate.weight": (F, H),
              "blk.0.ffn_up.weight": (F, H), "blk.0.ffn_down.weight": (H, F)}
    tensors = []
    for i, (name, shape) in enumerate(shapes.items()):
        x = rng.standard_normal(shape).astype(np.float32)
        ty = "F32" if len(shape) == 1 else ("Q8_0" if i % 2 else "Q4_0")
        tensors.append((name, list(reversed(shape)), ty, gw.to_bytes(x, ty)))
    gw.write_gguf(os.path.join(out, "llama_q8"), kvs, tensors)

    pieces = ["<unk>", "<s>", "</s>"] + ["<0x%02X>" % b for b in range(8)] + ["\u2581", "a", "b", "\u2581a", "ab", "\u2581ab"]
    types = [2, 3, 3] + [6] * 8 + [1] * 6
    scores = [0.0] * 11 + [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0]
    kvs = [gw.gkv("general.architecture", gw.STRING, "llama"), gw.gkv("tokenizer.ggml.model", gw.STRING, "llama"),
           gw.gkv("tokenizer.ggml.tokens", gw.ARRAY, pieces, gw.STRING),
           gw.gkv("tokenizer.ggml.token_type", gw.ARRAY, types, gw.I32),
           gw.gkv("tokenizer.ggml.scores", gw.ARRAY, scores, gw.F32),
           gw.gkv("tokenizer.ggml.unknown_token_id", gw.U32, 0), gw.gkv("tokenizer.ggml.bos_token_id", gw.U32, 1),
           gw.gkv("tokenizer.ggml.add_bos_token", gw.BOOL, True),
           gw.gkv("tokenizer.chat_template", gw.STRING, "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")]
    gw.write_gguf(os.path.join(out, "spm"), kvs, [], version=2)

    tensors = []
    for name, ty, shape in (("a", "Q4_K", (2, 256)), ("b", "Q6_K", (1, 256)), ("c", "F16", (3, 5)), ("d", "BF16", (7,))):
        x = rng.standard_normal(shape).astype(np.float32)
        tensors.append((name, list(reversed(shape)), ty, gw.to_bytes(x, ty)))
    gw.write_gguf(os.path.join(out, "ktensors"), [gw.gkv("general.name", gw.STRING, "k")], tensors)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus_gguf"))
