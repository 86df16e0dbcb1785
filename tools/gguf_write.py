#!/usr/bin/python3
"""Write a Hugging Face model directory as a GGUF file (v3, or v2), deterministically.

  /usr/bin/python3 tools/gguf_write.py --model DIR --out FILE.gguf [--type TYPE] [--version 2|3]
        [--dequantized DIR] [--no-merges]
  /usr/bin/python3 tools/gguf_write.py --tokenizer tokenizer.json --out FILE.gguf [--no-merges]

Written from the GGUF specification (ggml's docs/gguf.md) and ggml's block formats, for our
tests: no converted third-party file is in the repository, and no llama.cpp code is used.

TYPE is the type of the weight matrices (vectors stay F32): f32, f16, bf16, q8_0, q4_0, q4_k,
q6_k, or q4_k_m (Q4_K, with Q6_K for the embeddings, the output, attn_v and ffn_down, as the
Q4_K_M files people download mix them). A matrix whose rows are not whole blocks of its type
(32 elements for Q8_0/Q4_0, 256 for the K types) is written as Q8_0, else F16, and the choice is
printed. The quantizers are our own, simple ones from the formats' definitions (round to
nearest with per-block scales; Q4_K with per-sub-block minimums); the formats, not these
heuristics, are what a reader must get right.

--dequantized DIR also writes the model directory as the GGUF file's values, dequantized to
F32 (config and tokenizer files copied): the reference and the engine's F32 path run on it, to
check the quantized file's logits tightly.

Architectures: llama and mistral (general.architecture llama; q and k rows stored interleaved
per head as llama.cpp stores them), qwen2, qwen3. The tokenizer: byte-level BPE as
tokenizer.ggml.model gpt2 with its tokenizer.ggml.pre named from the pre-tokenizer; BPE with
byte fallback as llama (SentencePiece) with scores (a merged piece's score is minus the rank of
the first merge that makes it) and the merges too, unless --no-merges (a reader then derives
them from the scores, as it must for llama.cpp's own files).
"""
import argparse
import json
import os
import shutil
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mkmodel import encode, safetensors_header  # noqa: E402

# ---- GGUF container ------------------------------------------------------------------------
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
GGML = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 8, "Q4_K": 12, "Q6_K": 14, "BF16": 30}
BLOCK = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q4_0": (32, 18), "Q8_0": (32, 34),
         "Q4_K": (256, 144), "Q6_K": (256, 210)}
ALIGN = 32


def gstr(s):
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def gvalue(t, v):
    if t == STRING:
        return gstr(v)
    if t == BOOL:
        return struct.pack("<B", 1 if v else 0)
    fmt = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", U64: "Q", I64: "q", F64: "d"}[t]
    return struct.pack("<" + fmt, v)


def gkv(key, t, v, arr_type=None):
    out = gstr(key) + struct.pack("<I", t)
    if t == ARRAY:
        out += struct.pack("<IQ", arr_type, len(v))
        if arr_type in (F32, I32, U32):
            out += np.asarray(v, dtype={F32: "<f4", I32: "<i4", U32: "<u4"}[arr_type]).tobytes()
        else:
            out += b"".join(gvalue(arr_type, x) for x in v)
        return out
    return out + gvalue(t, v)


def write_gguf(path, kvs, tensors, version=3):
    """kvs: [bytes of one entry]; tensors: [(name, ne (innermost first), type name, data bytes)]."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs)) + b"".join(kvs)
    infos, off = b"", 0
    for name, ne, ty, data in tensors:
        infos += gstr(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
        infos += struct.pack("<IQ", GGML[ty], off)
        off += len(data) + (-len(data)) % ALIGN
    with open(path, "wb") as f:
        f.write(head + infos)
        f.write(b"\0" * ((-f.tell()) % ALIGN))
        for _, _, _, data in tensors:
            f.write(data)
            f.write(b"\0" * ((-len(data)) % ALIGN))


# ---- block formats: quantize (ours) and dequantize (the formats' definitions) ----------------
def f16(x):
    return np.asarray(x, dtype=np.float32).astype(np.float16)


def q8_0(x):
    b = x.reshape(-1, 32).astype(np.float32)
    d = np.abs(b).max(axis=1) / np.float32(127)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    q = np.clip(np.rint(b * inv[:, None]), -127, 127).astype(np.int8)
    out = np.zeros((b.shape[0], 34), np.uint8)
    out[:, 0:2] = f16(d).view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q.view(np.uint8)
    return out.tobytes()


def dq8_0(raw, n):
    a = np.frombuffer(raw, np.uint8).reshape(-1, 34)
    d = a[:, 0:2].copy().view(np.float16).astype(np.float32)
    return (d * a[:, 2:].view(np.int8).astype(np.float32)).reshape(n)


def q4_0(x):
    b = x.reshape(-1, 32).astype(np.float32)
    idx = np.abs(b).argmax(axis=1)
    mx = b[np.arange(b.shape[0]), idx]
    d = mx / np.float32(-8)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype(np.float32)
    q = np.clip(np.floor(b * inv[:, None] + np.float32(8.5)), 0, 15).astype(np.uint8)
    out = np.zeros((b.shape[0], 18), np.uint8)
    out[:, 0:2] = f16(d).view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q[:, :16] | (q[:, 16:] << 4)
    return out.tobytes()


def dq4_0(raw, n):
    a = np.frombuffer(raw, np.uint8).reshape(-1, 18)
    d = a[:, 0:2].copy().view(np.float16).astype(np.float32)
    lo = (a[:, 2:] & 15).astype(np.float32) - np.float32(8)
    hi = (a[:, 2:] >> 4).astype(np.float32) - np.float32(8)
    return np.concatenate([d * lo, d * hi], axis=1).reshape(n)


def pack_scales_k4(sc, m):
    """Eight 6-bit scales and mins per super-block -> 12 bytes (ggml's K-quant scale layout)."""
    q = np.zeros((sc.shape[0], 12), np.uint8)
    q[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    q[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    q[:, 8:12] = (sc[:, 4:8] & 15) | ((m[:, 4:8] & 15) << 4)
    return q


def unpack_scales_k4(q):
    sc = np.zeros((q.shape[0], 8), np.uint8)
    m = np.zeros((q.shape[0], 8), np.uint8)
    sc[:, 0:4] = q[:, 0:4] & 63
    m[:, 0:4] = q[:, 4:8] & 63
    sc[:, 4:8] = (q[:, 8:12] & 15) | ((q[:, 0:4] >> 6) << 4)
    m[:, 4:8] = (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)
    return sc, m


def q4_k(x):
    b = x.reshape(-1, 8, 32).astype(np.float32)
    lo = np.minimum(b.min(axis=2), 0)
    scale = (b.max(axis=2) - lo) / np.float32(15)
    mins = -lo
    d = f16(scale.max(axis=1) / np.float32(63)).astype(np.float32)
    dmin = f16(mins.max(axis=1) / np.float32(63)).astype(np.float32)
    sc = np.clip(np.rint(np.divide(scale, d[:, None], out=np.zeros_like(scale), where=d[:, None] > 0)), 0, 63)
    mq = np.clip(np.rint(np.divide(mins, dmin[:, None], out=np.zeros_like(mins), where=dmin[:, None] > 0)), 0, 63)
    es = d[:, None] * sc.astype(np.float32)
    em = dmin[:, None] * mq.astype(np.float32)
    q = np.clip(np.rint(np.divide(b + em[:, :, None], es[:, :, None], out=np.zeros_like(b),
                                  where=es[:, :, None] > 0)), 0, 15).astype(np.uint8)
    out = np.zeros((b.shape[0], 144), np.uint8)
    out[:, 0:2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    out[:, 2:4] = dmin.astype(np.float16).view(np.uint8).reshape(-1, 2)
    out[:, 4:16] = pack_scales_k4(sc.astype(np.uint8), mq.astype(np.uint8))
    qs = q.reshape(-1, 4, 2, 32)  # pairs of sub-blocks share 32 bytes: low nibbles, then high
    out[:, 16:] = (qs[:, :, 0, :] | (qs[:, :, 1, :] << 4)).reshape(-1, 128)
    return out.tobytes()


def dq4_k(raw, n):
    a = np.frombuffer(raw, np.uint8).reshape(-1, 144)
    d = a[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = a[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = unpack_scales_k4(a[:, 4:16])
    qs = a[:, 16:].reshape(-1, 4, 32)
    q = np.stack([qs & 15, qs >> 4], axis=2).reshape(-1, 8, 32).astype(np.float32)
    ds = d * sc.astype(np.float32)
    dm = dmin * m.astype(np.float32)
    return (ds[:, :, None] * q - dm[:, :, None]).reshape(n)


def q6_k(x):
    b = x.reshape(-1, 16, 16).astype(np.float32)
    scale = np.abs(b).max(axis=2) / np.float32(31)
    d = f16(scale.max(axis=1) / np.float32(127)).astype(np.float32)
    sc = np.clip(np.rint(np.divide(scale, d[:, None], out=np.zeros_like(scale), where=d[:, None] > 0)), 0, 127)
    es = d[:, None] * sc.astype(np.float32)
    q = np.clip(np.rint(np.divide(b, es[:, :, None], out=np.zeros_like(b), where=es[:, :, None] > 0)), -32, 31)
    q = (q + 32).astype(np.uint8).reshape(-1, 2, 4, 32)  # halves of 128: quarters of 32
    ql = np.zeros((q.shape[0], 2, 64), np.uint8)
    ql[:, :, 0:32] = (q[:, :, 0] & 15) | ((q[:, :, 2] & 15) << 4)
    ql[:, :, 32:64] = (q[:, :, 1] & 15) | ((q[:, :, 3] & 15) << 4)
    qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
    out = np.zeros((q.shape[0], 210), np.uint8)
    out[:, 0:128] = ql.reshape(-1, 128)
    out[:, 128:192] = qh.reshape(-1, 64)
    out[:, 192:208] = sc.astype(np.int8).view(np.uint8)
    out[:, 208:210] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return out.tobytes()


def dq6_k(raw, n):
    a = np.frombuffer(raw, np.uint8).reshape(-1, 210)
    ql = a[:, 0:128].reshape(-1, 2, 64)
    qh = a[:, 128:192].reshape(-1, 2, 32)
    sc = a[:, 192:208].view(np.int8).astype(np.float32)
    d = a[:, 208:210].copy().view(np.float16).astype(np.float32).reshape(-1)
    q = np.stack([(ql[:, :, 0:32] & 15) | ((qh & 3) << 4), (ql[:, :, 32:64] & 15) | (((qh >> 2) & 3) << 4),
                  (ql[:, :, 0:32] >> 4) | (((qh >> 4) & 3) << 4), (ql[:, :, 32:64] >> 4) | (((qh >> 6) & 3) << 4)],
                 axis=2).astype(np.float32) - np.float32(32)  # [blocks][half][quarter][32]
    ds = (d[:, None] * sc).reshape(-1, 2, 4, 2)  # scale k covers elements 16k..16k+15
    return (ds[:, :, :, :, None] * q.reshape(-1, 2, 4, 2, 16)).reshape(n)


def to_bytes(x, ty):
    if ty == "F32":
        return np.ascontiguousarray(x, "<f4").tobytes()
    if ty == "F16":
        return encode(x, "f16")
    if ty == "BF16":
        return encode(x, "bf16")
    return {"Q8_0": q8_0, "Q4_0": q4_0, "Q4_K": q4_k, "Q6_K": q6_k}[ty](x)


def from_bytes(raw, ty, n):
    if ty == "F32":
        return np.frombuffer(raw, "<f4").copy()
    if ty == "F16":
        return np.frombuffer(raw, "<f2").astype(np.float32)
    if ty == "BF16":
        return (np.frombuffer(raw, "<u2").astype(np.uint32) << np.uint32(16)).view(np.float32)
    return {"Q8_0": dq8_0, "Q4_0": dq4_0, "Q4_K": dq4_k, "Q6_K": dq6_k}[ty](raw, n)


# ---- the model ---------------------------------------------------------------------------
ST = {"F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2)}


def read_safetensors(path):
    with open(path, "rb") as f:
        buf = f.read()
    hlen = int.from_bytes(buf[:8], "little")
    hdr = json.loads(buf[8:8 + hlen])
    out = {}
    for name, info in hdr.items():
        if name == "__metadata__":
            continue
        dt, esz = ST[info["dtype"]]
        s, e = info["data_offsets"]
        raw = np.frombuffer(buf, dt, count=(e - s) // esz, offset=8 + hlen + s)
        a = (raw.astype(np.uint32) << np.uint32(16)).view(np.float32) if info["dtype"] == "BF16" else raw
        out[name] = a.astype(np.float32).reshape(info["shape"])
    return out


def read_weights(d):
    idx = os.path.join(d, "model.safetensors.index.json")
    files = sorted(set(json.load(open(idx))["weight_map"].values())) if os.path.exists(idx) else ["model.safetensors"]
    w = {}
    for f in files:
        w.update(read_safetensors(os.path.join(d, f)))
    return w


LAYER = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
         "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
         "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
         "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
         "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.bias": "attn_output.bias",
         "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
         "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
         "mlp.down_proj.weight": "ffn_down.weight", "mlp.gate_proj.bias": "ffn_gate.bias",
         "mlp.up_proj.bias": "ffn_up.bias", "mlp.down_proj.bias": "ffn_down.bias"}


def gguf_name(hf):
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    parts = hf.split(".", 3)
    if len(parts) == 4 and parts[0] == "model" and parts[1] == "layers" and parts[3] in LAYER:
        return "blk.%s.%s" % (parts[2], LAYER[parts[3]])
    raise SystemExit("gguf_write: no GGUF name for tensor %s" % hf)


def permute(w, heads):
    """Halves order -> llama.cpp's interleaved order (row 2i: row i, row 2i+1: row i + hd/2) per head."""
    rows = w.shape[0]
    hd = rows // heads
    return w.reshape(heads, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def matrix_type(gname, want, ne0):
    if want == "Q4_K_M":
        big = gname in ("token_embd.weight", "output.weight") or gname.endswith((".attn_v.weight", ".ffn_down.weight"))
        want = "Q6_K" if big else "Q4_K"
    for ty in (want, "Q8_0", "F16"):
        if ne0 % BLOCK[ty][0] == 0:
            return ty
    return "F16"


# ---- the tokenizer -----------------------------------------------------------------------
PRE_SPLITS = {  # the Split regex of each pre-tokenizer we name (as the readers of GGUF files name them)
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
             r"\s+(?!\S)|\s+",
    "gpt-4o": r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
              r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
              r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def pre_name(tj):
    pt = tj.get("pre_tokenizer") or {}
    steps = pt.get("pretokenizers", [pt]) if pt.get("type") == "Sequence" else [pt]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        rx = steps[0].get("pattern", {}).get("Regex")
        for name, want in PRE_SPLITS.items():
            if rx == want:
                return name
    raise SystemExit("gguf_write: a pre-tokenizer we have no GGUF name for: %s" % json.dumps(pt)[:300])


def adds_bos(tj):
    pp = tj.get("post_processor") or {}
    procs = pp.get("processors", [pp]) if pp.get("type") == "Sequence" else [pp]
    for p in procs:
        if p.get("type") == "TemplateProcessing":
            first = (p.get("single") or [{}])[0]
            return "SpecialToken" in first
    return False


def tokenizer_kvs(tj, n_vocab, no_merges, tok_cfg):
    m = tj["model"]
    if m.get("type", "BPE") != "BPE":
        raise SystemExit("gguf_write: only BPE tokenizers")
    spm = bool(m.get("byte_fallback"))
    vocab = m["vocab"]
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    n = max(n_vocab, max(list(vocab.values()) + list(added) + [-1]) + 1)
    tokens, types = ["[PAD%d]" % i for i in range(n)], [5] * n
    for s, i in vocab.items():
        tokens[i], types[i] = s, 1
        if spm and len(s) == 6 and s.startswith("<0x") and s.endswith(">"):
            types[i] = 6
    for i, a in added.items():
        tokens[i] = a["content"]
        types[i] = 3 if a.get("special") else 4
    unk = m.get("unk_token")
    if unk is not None and unk in vocab:
        types[vocab[unk]] = 2
    merges = [x if isinstance(x, str) else " ".join(x) for x in m.get("merges", [])]
    kvs = [gkv("tokenizer.ggml.model", STRING, "llama" if spm else "gpt2")]
    if not spm:
        kvs.append(gkv("tokenizer.ggml.pre", STRING, pre_name(tj)))
    kvs += [gkv("tokenizer.ggml.tokens", ARRAY, tokens, STRING), gkv("tokenizer.ggml.token_type", ARRAY, types, I32)]
    if spm:
        rank = {}
        for r, mg in enumerate(merges):
            rank.setdefault(mg.replace(" ", "", 1), r)
        kvs.append(gkv("tokenizer.ggml.scores", ARRAY,
                       [-float(rank[t]) if t in rank else 0.0 for t in tokens], F32))
        norm = json.dumps(tj.get("normalizer"))
        kvs.append(gkv("tokenizer.ggml.add_space_prefix", BOOL, '"Prepend"' in norm))
    if merges and not (spm and no_merges):
        kvs.append(gkv("tokenizer.ggml.merges", ARRAY, merges, STRING))
    ids = {t: i for i, t in enumerate(tokens)}
    cfg = tok_cfg or {}

    def special(key):
        v = cfg.get(key)
        return v.get("content") if isinstance(v, dict) else v
    bos = special("bos_token")
    if bos is None and adds_bos(tj):
        bos = tj["post_processor"]["single"][0]["SpecialToken"]["id"]
    if bos in ids:
        kvs.append(gkv("tokenizer.ggml.bos_token_id", U32, ids[bos]))
    if special("eos_token") in ids:
        kvs.append(gkv("tokenizer.ggml.eos_token_id", U32, ids[special("eos_token")]))
    if unk in ids:
        kvs.append(gkv("tokenizer.ggml.unknown_token_id", U32, ids[unk]))
    kvs.append(gkv("tokenizer.ggml.add_bos_token", BOOL, adds_bos(tj)))
    tpl = cfg.get("chat_template")
    if isinstance(tpl, str):
        kvs.append(gkv("tokenizer.chat_template", STRING, tpl))
    return kvs


def model_kvs(cfg, arch):
    A = arch
    H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or H // nh
    kvs = [gkv("general.architecture", STRING, A), gkv("general.name", STRING, "kvserve test model"),
           gkv("general.alignment", U32, ALIGN),
           gkv(A + ".context_length", U32, cfg["max_position_embeddings"]), gkv(A + ".embedding_length", U32, H),
           gkv(A + ".block_count", U32, cfg["num_hidden_layers"]),
           gkv(A + ".feed_forward_length", U32, cfg["intermediate_size"]),
           gkv(A + ".attention.head_count", U32, nh),
           gkv(A + ".attention.head_count_kv", U32, cfg.get("num_key_value_heads", nh)),
           gkv(A + ".attention.key_length", U32, hd), gkv(A + ".attention.value_length", U32, hd),
           gkv(A + ".rope.dimension_count", U32, hd),
           gkv(A + ".rope.freq_base", F32, float(cfg.get("rope_theta", 10000.0))),
           gkv(A + ".attention.layer_norm_rms_epsilon", F32, float(cfg["rms_norm_eps"])),
           gkv(A + ".vocab_size", U32, cfg["vocab_size"])]
    rs = cfg.get("rope_scaling")
    extra = []
    if rs:
        kind = rs.get("rope_type", rs.get("type"))
        if kind == "linear":
            kvs += [gkv(A + ".rope.scaling.type", STRING, "linear"),
                    gkv(A + ".rope.scaling.factor", F32, float(rs["factor"]))]
        elif kind == "llama3":  # as llama.cpp writes it: a divisor per frequency, tensor rope_freqs
            extra.append(("rope_freqs.weight", [hd // 2], "F32", to_bytes(llama3_factors(cfg, hd), "F32")))
        else:
            raise SystemExit("gguf_write: rope_scaling %s is not written (linear, llama3)" % kind)
    eos = cfg.get("eos_token_id")
    eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return kvs, eos, extra


def llama3_factors(cfg, hd):
    """Llama 3.1's RoPE scaling as one divisor per frequency: 1 for the high frequencies, the
    factor for the low ones, a blend between (from the published rule, in float64)."""
    rs, base = cfg["rope_scaling"], float(cfg.get("rope_theta", 10000.0))
    f, lo, hi = float(rs["factor"]), float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
    om = float(rs.get("original_max_position_embeddings", 8192))
    out = []
    for j in range(hd // 2):
        wavelen = 2 * np.pi / base ** (-2.0 * j / hd)
        if wavelen < om / hi:
            out.append(1.0)
        elif wavelen > om / lo:
            out.append(f)
        else:
            smooth = (om / wavelen - lo) / (hi - lo)
            out.append(1.0 / ((1 - smooth) / f + smooth))
    return np.array(out, dtype=np.float32)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="Hugging Face model directory")
    ap.add_argument("--tokenizer", help="only a tokenizer.json (and NAME.tokenizer_config.json beside it)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--type", default="f32", choices=("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k", "q6_k", "q4_k_m"))
    ap.add_argument("--version", type=int, default=3, choices=(2, 3))
    ap.add_argument("--dequantized", help="also write the dequantized values as a model directory here")
    ap.add_argument("--no-merges", action="store_true", help="a SentencePiece tokenizer without its merges")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    if bool(a.model) == bool(a.tokenizer):
        ap.error("give --model or --tokenizer")
    log = (lambda s: None) if a.quiet else (lambda s: print(s, file=sys.stderr))

    if a.tokenizer:
        tj = json.load(open(a.tokenizer, encoding="utf-8"))
        side = a.tokenizer[:-len("tokenizer.json")] + "tokenizer_config.json"
        tc = json.load(open(side, encoding="utf-8")) if a.tokenizer.endswith("tokenizer.json") and os.path.exists(side) else {}
        kvs = [gkv("general.architecture", STRING, "llama")] + tokenizer_kvs(tj, 0, a.no_merges, tc)
        write_gguf(a.out, kvs, [], a.version)
        return 0

    cfg = json.load(open(os.path.join(a.model, "config.json")))
    mt = cfg.get("model_type")
    arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}.get(mt)
    if not arch:
        raise SystemExit("gguf_write: model_type %s is not written (llama, mistral, qwen2, qwen3)" % mt)
    if cfg.get("sliding_window") and (mt == "mistral" or cfg.get("use_sliding_window")):
        raise SystemExit("gguf_write: sliding windows are not written")
    tj = json.load(open(os.path.join(a.model, "tokenizer.json"), encoding="utf-8"))
    tcp = os.path.join(a.model, "tokenizer_config.json")
    tc = json.load(open(tcp, encoding="utf-8")) if os.path.exists(tcp) else {}
    kvs, eos, extra = model_kvs(cfg, arch)
    kvs += tokenizer_kvs(tj, cfg["vocab_size"], a.no_merges, tc)
    kvs = [k for k in kvs if not k.startswith(gstr("tokenizer.ggml.eos_token_id"))]
    gen = os.path.join(a.model, "generation_config.json")
    if os.path.exists(gen):
        ge = json.load(open(gen)).get("eos_token_id")
        for e in ge if isinstance(ge, list) else [ge] if ge is not None else []:
            if e not in eos:
                eos.append(e)
    for key, e in zip(("eos_token_id", "eot_token_id", "eom_token_id"), eos):
        kvs.append(gkv("tokenizer.ggml." + key, U32, e))

    w = read_weights(a.model)
    nh, nkv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    tensors, deq, counts = list(extra), {}, {}
    for hf in sorted(w, key=lambda k: (not k.startswith("model.embed"), k)):
        x = w[hf]
        gn = gguf_name(hf)
        if arch == "llama" and (".q_proj." in hf or ".k_proj." in hf):
            x = permute(x, nh if ".q_proj." in hf else nkv)
        ty = matrix_type(gn, a.type.upper(), x.shape[-1]) if x.ndim == 2 else "F32"
        data = to_bytes(x, ty)
        counts[ty] = counts.get(ty, 0) + 1
        tensors.append((gn, list(reversed(x.shape)), ty, data))
        if a.dequantized:
            v = from_bytes(data, ty, x.size).reshape(x.shape)
            if arch == "llama" and (".q_proj." in hf or ".k_proj." in hf):  # back to the halves order
                heads = nh if ".q_proj." in hf else nkv
                hd = x.shape[0] // heads
                v = v.reshape(heads, hd // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
            deq[hf] = v
    write_gguf(a.out, kvs, tensors, a.version)
    log("gguf_write: %s: %d tensors (%s), %d bytes" % (a.out, len(tensors),
        ", ".join("%d %s" % (n, t) for t, n in sorted(counts.items())), os.path.getsize(a.out)))
    if a.dequantized:
        os.makedirs(a.dequantized, exist_ok=True)
        for f in os.listdir(a.model):
            if f.endswith(".json") and not f.startswith("model.safetensors"):
                shutil.copy(os.path.join(a.model, f), os.path.join(a.dequantized, f))
        c2 = dict(cfg, torch_dtype="float32")
        with open(os.path.join(a.dequantized, "config.json"), "w") as f:
            json.dump(c2, f, indent=2)
        names = sorted(deq)
        head, _ = safetensors_header([(n, deq[n].shape, deq[n].size * 4) for n in names], "F32")
        with open(os.path.join(a.dequantized, "model.safetensors"), "wb") as f:
            f.write(head)
            for n in names:
                f.write(np.ascontiguousarray(deq[n], "<f4").tobytes())
    return 0


if __name__ == "__main__":
    sys.exit(main())
