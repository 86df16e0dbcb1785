#!/usr/bin/python3
"""Train a small LLaMA-architecture model on English text every Debian machine has, in numpy.

    train_tiny.py train --out DIR [--cache DIR] [--steps N] [--seconds S]
    train_tiny.py gradcheck          (the backward pass against finite differences, float64)

The corpus is the docstrings of the Python standard library (/usr/lib/python3.11: prose written
by people) and the license texts in /usr/share/common-licenses, ~1.5 MB; every 40th document
is held out. The tokenizer is our byte-level BPE (tools/bpe_train.py) trained on the same text.
The model is the architecture kvserve runs (RMSNorm, RoPE in the halves order, grouped-query
attention, SwiGLU, tied embeddings); forward and backward are written out below, AdamW with a
fixed seed and a fixed number of steps. The output is a Hugging Face directory (config.json,
model.safetensors in F32, tokenizer.json, tokenizer_config.json) that kvserve loads like any
other, plus the held-out text (held_out.txt), its token ids (held_out.ids) and train.json with
the held-out perplexity as the trainer computes it (windows of 128 predictions, each from a
fresh context, as `kvserve score --ids` scores one window).
"""

import argparse
import ast
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bpe_train  # noqa: E402

CFG = dict(vocab_size=2048, hidden_size=256, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
           head_dim=64, intermediate_size=512, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=512)
SEQ, BATCH = 128, 16


# ---- the corpus --------------------------------------------------------------------------
def docstrings(path):
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            d = ast.get_docstring(node)
            if d and len(d) > 80 and d.count(" ") > 10:  # prose, not one-liners
                out.append(d.strip())
    return out


def corpus():
    """(the documents, the files read): docstrings of the stdlib, then the licenses, sorted."""
    files = bpe_train.default_corpus_files()
    parts = []
    for f in files:
        if f.endswith(".py"):
            parts.extend(docstrings(f))
    for f in files:
        if not f.endswith(".py"):
            with open(f, encoding="utf-8", errors="replace") as fh:
                parts.append(fh.read().strip())
    return parts, len(files)


# ---- the model -------------------------------------------------------------------------
def init_params(cfg, rng, dtype=np.float32):
    H, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    QD, KD = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    L = cfg["num_hidden_layers"]
    p = {"embed": rng.normal(0, 0.02, (V, H)), "norm": np.ones(H)}
    for i in range(L):
        s_out = 0.02 / math.sqrt(2 * L)
        p.update({"%d.attn_norm" % i: np.ones(H), "%d.q" % i: rng.normal(0, 0.02, (QD, H)),
                  "%d.k" % i: rng.normal(0, 0.02, (KD, H)), "%d.v" % i: rng.normal(0, 0.02, (KD, H)),
                  "%d.o" % i: rng.normal(0, s_out, (H, QD)), "%d.ffn_norm" % i: np.ones(H),
                  "%d.gate" % i: rng.normal(0, 0.02, (F, H)), "%d.up" % i: rng.normal(0, 0.02, (F, H)),
                  "%d.down" % i: rng.normal(0, s_out, (H, F))})
    return {k: v.astype(dtype) for k, v in p.items()}


def rope_tables(cfg, T, dtype):
    hd = cfg["head_dim"]
    inv = cfg["rope_theta"] ** (-np.arange(0, hd // 2, dtype=np.float64) * 2 / hd)
    ang = np.arange(T, dtype=np.float64)[:, None] * inv[None, :]
    cos, sin = np.cos(ang), np.sin(ang)
    return np.concatenate([cos, cos], 1).astype(dtype), np.concatenate([sin, sin], 1).astype(dtype)


def rot(x):  # rotate_half: [-x2, x1]
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], -1)


def rot_t(z):  # its transpose: [z2, -z1]
    h = z.shape[-1] // 2
    return np.concatenate([z[..., h:], -z[..., :h]], -1)


def rmsnorm(x, g, eps):
    r = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    return x * r * g, r


def rmsnorm_back(dy, x, r, g):
    dxh = dy * g
    dg = (dy * x * r).reshape(-1, x.shape[-1]).sum(0)
    dx = r * dxh - (r ** 3) * x * (dxh * x).mean(-1, keepdims=True)
    return dx, dg


def forward(p, cfg, ids, targets=None):
    """ids [B][T] -> (mean loss, cache) or logits if no targets."""
    B, T = ids.shape
    H, nh, nkv, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps, L, grp = cfg["rms_norm_eps"], cfg["num_hidden_layers"], nh // nkv
    dt = p["embed"].dtype
    cos, sin = rope_tables(cfg, T, dt)
    mask = np.triu(np.full((T, T), -np.inf, dtype=dt), 1)
    scale = dt.type(1.0 / math.sqrt(hd))
    x = p["embed"][ids]
    cache = {"ids": ids, "layers": [], "cos": cos, "sin": sin, "scale": scale}
    for i in range(L):
        c = {"x": x}
        h, c["r1"] = rmsnorm(x, p["%d.attn_norm" % i], eps)
        c["h"] = h
        q = (h @ p["%d.q" % i].T).reshape(B, T, nh, hd).transpose(0, 2, 1, 3)
        k = (h @ p["%d.k" % i].T).reshape(B, T, nkv, hd).transpose(0, 2, 1, 3)
        v = (h @ p["%d.v" % i].T).reshape(B, T, nkv, hd).transpose(0, 2, 1, 3)
        q = q * cos + rot(q) * sin
        k = k * cos + rot(k) * sin
        kk, vv = np.repeat(k, grp, axis=1), np.repeat(v, grp, axis=1)
        s = (q @ kk.transpose(0, 1, 3, 2)) * scale + mask
        s = s - s.max(-1, keepdims=True)
        P = np.exp(s)
        P /= P.sum(-1, keepdims=True)
        a = (P @ vv).transpose(0, 2, 1, 3).reshape(B, T, nh * hd)
        c.update(q=q, kk=kk, vv=vv, P=P, a=a)
        x = x + a @ p["%d.o" % i].T
        c["x2"] = x
        h2, c["r2"] = rmsnorm(x, p["%d.ffn_norm" % i], eps)
        g, u = h2 @ p["%d.gate" % i].T, h2 @ p["%d.up" % i].T
        sg = 1.0 / (1.0 + np.exp(-g))
        act = g * sg * u
        c.update(h2=h2, g=g, u=u, sg=sg, act=act)
        x = x + act @ p["%d.down" % i].T
        cache["layers"].append(c)
    cache["xL"] = x
    xf, cache["rf"] = rmsnorm(x, p["norm"], eps)
    cache["xf"] = xf
    logits = xf @ p["embed"].T
    if targets is None:
        return logits
    m = logits.max(-1, keepdims=True)
    e = np.exp(logits - m)
    z = e.sum(-1, keepdims=True)
    logp_t = np.take_along_axis(logits - m - np.log(z), targets[..., None], -1)[..., 0]
    cache["probs"], cache["targets"] = e / z, targets
    return float(-logp_t.mean()), cache


def backward(p, cfg, cache):
    B, T = cache["ids"].shape
    H, nh, nkv, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    L, grp, scale = cfg["num_hidden_layers"], nh // nkv, cache["scale"]
    cos, sin = cache["cos"], cache["sin"]
    gr = {k: np.zeros_like(v) for k, v in p.items()}
    dlog = cache["probs"].copy()
    np.put_along_axis(dlog, cache["targets"][..., None], np.take_along_axis(dlog, cache["targets"][..., None], -1) - 1, -1)
    dlog /= B * T
    xf = cache["xf"]
    gr["embed"] += dlog.reshape(-1, dlog.shape[-1]).T @ xf.reshape(-1, H)
    dxf = dlog @ p["embed"]
    dx, gr["norm"] = rmsnorm_back(dxf, cache["xL"], cache["rf"], p["norm"])
    for i in reversed(range(L)):
        c = cache["layers"][i]
        # MLP
        dact = dx @ p["%d.down" % i]
        gr["%d.down" % i] += dx.reshape(-1, H).T @ c["act"].reshape(-1, c["act"].shape[-1])
        g, u, sg = c["g"], c["u"], c["sg"]
        du = dact * g * sg
        dg = dact * u * sg * (1 + g * (1 - sg))
        h2 = c["h2"].reshape(-1, H)
        gr["%d.gate" % i] += dg.reshape(-1, dg.shape[-1]).T @ h2
        gr["%d.up" % i] += du.reshape(-1, du.shape[-1]).T @ h2
        dh2 = dg @ p["%d.gate" % i] + du @ p["%d.up" % i]
        d, dgn = rmsnorm_back(dh2, c["x2"], c["r2"], p["%d.ffn_norm" % i])
        gr["%d.ffn_norm" % i] += dgn
        dx = dx + d
        # attention
        da = dx @ p["%d.o" % i]
        gr["%d.o" % i] += dx.reshape(-1, H).T @ c["a"].reshape(-1, nh * hd)
        dO = da.reshape(B, T, nh, hd).transpose(0, 2, 1, 3)
        P, q, kk, vv = c["P"], c["q"], c["kk"], c["vv"]
        dvv = P.transpose(0, 1, 3, 2) @ dO
        dP = dO @ vv.transpose(0, 1, 3, 2)
        dS = P * (dP - (dP * P).sum(-1, keepdims=True)) * scale
        dq = dS @ kk
        dkk = dS.transpose(0, 1, 3, 2) @ q
        dk = dkk.reshape(B, nkv, grp, T, hd).sum(2)
        dv = dvv.reshape(B, nkv, grp, T, hd).sum(2)
        dq = dq * cos + rot_t(dq * sin)
        dk = dk * cos + rot_t(dk * sin)
        dq = dq.transpose(0, 2, 1, 3).reshape(B * T, nh * hd)
        dk = dk.transpose(0, 2, 1, 3).reshape(B * T, nkv * hd)
        dv = dv.transpose(0, 2, 1, 3).reshape(B * T, nkv * hd)
        h = c["h"].reshape(-1, H)
        gr["%d.q" % i] += dq.T @ h
        gr["%d.k" % i] += dk.T @ h
        gr["%d.v" % i] += dv.T @ h
        dh = (dq @ p["%d.q" % i] + dk @ p["%d.k" % i] + dv @ p["%d.v" % i]).reshape(B, T, H)
        d, dgn = rmsnorm_back(dh, c["x"], c["r1"], p["%d.attn_norm" % i])
        gr["%d.attn_norm" % i] += dgn
        dx = dx + d
    np.add.at(gr["embed"], cache["ids"], dx)
    return gr


# ---- gradient check ----------------------------------------------------------------------
def gradcheck():
    cfg = dict(CFG, vocab_size=61, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=4, intermediate_size=24)
    rng = np.random.default_rng(7)
    p = init_params(cfg, rng, np.float64)
    for k in p:  # away from the initial symmetries (norms of ones, small weights)
        p[k] = p[k] + rng.normal(0, 0.3 if p[k].ndim == 1 else 0.2, p[k].shape)
    ids = rng.integers(0, cfg["vocab_size"], (2, 9))
    tg = rng.integers(0, cfg["vocab_size"], (2, 9))
    _, cache = forward(p, cfg, ids, tg)
    gr = backward(p, cfg, cache)
    worst, n = 0.0, 0
    for k in sorted(p):
        flat = p[k].reshape(-1)
        for j in rng.choice(flat.size, size=min(6, flat.size), replace=False):
            old = flat[j]
            flat[j] = old + 1e-5
            lp, _ = forward(p, cfg, ids, tg)
            flat[j] = old - 1e-5
            lm, _ = forward(p, cfg, ids, tg)
            flat[j] = old
            num, ana = (lp - lm) / 2e-5, gr[k].reshape(-1)[j]
            err = abs(num - ana) / max(1e-6, abs(num) + abs(ana))
            worst = max(worst, err)
            n += 1
            if err > 1e-5:
                print("FAIL %s[%d]: analytic %.8e numeric %.8e (relative %.1e)" % (k, j, ana, num, err))
    print("gradcheck: %d parameters of %d tensors, worst relative difference %.2e" % (n, len(p), worst))
    return 0 if worst <= 1e-5 else 1


# ---- training ----------------------------------------------------------------------------
def write_model(out, cfg, p, tok_text):
    os.makedirs(out, exist_ok=True)
    names = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight"}
    hf = {"attn_norm": "input_layernorm.weight", "ffn_norm": "post_attention_layernorm.weight",
          "q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
          "o": "self_attn.o_proj.weight", "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight",
          "down": "mlp.down_proj.weight"}
    tensors = []
    for k in sorted(p):
        if "." in k:
            i, part = k.split(".")
            tensors.append(("model.layers.%s.%s" % (i, hf[part]), p[k]))
        else:
            tensors.append((names[k], p[k]))
    header, off, blobs = {}, 0, []
    for name, a in tensors:
        b = np.ascontiguousarray(a, "<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        off += len(b)
        blobs.append(b)
    hj = json.dumps(header, separators=(",", ":")).encode()
    hj += b" " * ((8 - len(hj) % 8) % 8)
    with open(os.path.join(out, "model.safetensors"), "wb") as f:
        f.write(len(hj).to_bytes(8, "little"))
        f.write(hj)
        for b in blobs:
            f.write(b)
    conf = dict(cfg, architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=True,
                torch_dtype="float32", bos_token_id=0, eos_token_id=0, hidden_act="silu")
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(conf, f, indent=2)
    with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(tok_text)
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "add_bos_token": False,
                   "model_max_length": cfg["max_position_embeddings"]}, f, indent=2)


def encode_all(tok_obj, text):
    """Our tokenizer's ids of text (the reference encoder of tools/bpe_train.py)."""
    return np.array(bpe_train.Tokenizer(tok_obj).encode(text), dtype=np.int64)


def evaluate(p, cfg, ids):
    """Mean negative log-likelihood of ids[1:] given what precedes, in windows of SEQ tokens
    (each window starts fresh, as kvserve score scores one text)."""
    tot, n = 0.0, 0
    for s in range(0, len(ids) - 1, SEQ):
        w = ids[s:s + SEQ + 1]
        if len(w) < 2:
            break
        loss, _ = forward(p, cfg, w[None, :-1], w[None, 1:])
        tot += loss * (len(w) - 1)
        n += len(w) - 1
    return tot / n, n


def train(a):
    t0 = time.time()
    log = lambda m: print("[%6.1fs] %s" % (time.time() - t0, m), flush=True)  # noqa: E731
    parts, nfiles = corpus()
    train_text = "\n\n".join(t for i, t in enumerate(parts) if i % 40 != 39) + "\n"
    held = "\n\n".join(t for i, t in enumerate(parts) if i % 40 == 39) + "\n"  # every 40th document
    text = train_text + held
    log("corpus: %d files, %d chars (%d held out)" % (nfiles, len(text), len(held)))
    wc = bpe_train.count_words(train_text)
    id_to_tok, merges = bpe_train.train_bpe(wc, CFG["vocab_size"])
    tok_text = bpe_train.dump_tokenizer_json(bpe_train.tokenizer_json(id_to_tok, merges))
    tok = json.loads(tok_text)
    log("tokenizer: %d ids, %d merges" % (len(id_to_tok), len(merges)))
    ids = encode_all(tok, train_text)
    hid = encode_all(tok, held)
    log("tokens: %d training, %d held out" % (len(ids), len(hid)))
    rng = np.random.default_rng(a.seed)
    p = init_params(CFG, rng)
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    b1, b2, lr_max, wd = 0.9, 0.95, a.lr, 0.1
    steps, warm = a.steps, max(1, a.steps // 20)
    for step in range(1, steps + 1):
        starts = rng.integers(0, len(ids) - SEQ - 1, BATCH)
        x = np.stack([ids[s:s + SEQ] for s in starts])
        y = np.stack([ids[s + 1:s + SEQ + 1] for s in starts])
        loss, cache = forward(p, CFG, x, y)
        gr = backward(p, CFG, cache)
        norm = math.sqrt(sum(float((g * g).sum()) for g in gr.values()))
        clip = min(1.0, 1.0 / (norm + 1e-6))
        lr = lr_max * (step / warm if step <= warm else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / (steps - warm))))
        for k in p:
            g = gr[k] * clip
            m[k] = b1 * m[k] + (1 - b1) * g
            v2[k] = b2 * v2[k] + (1 - b2) * g * g
            mh, vh = m[k] / (1 - b1 ** step), v2[k] / (1 - b2 ** step)
            if p[k].ndim == 2:
                p[k] *= np.float32(1 - lr * wd)
            p[k] -= (lr * mh / (np.sqrt(vh) + 1e-8)).astype(np.float32)
        if step % 50 == 0 or step == 1:
            log("step %d/%d: loss %.4f (lr %.2e, |g| %.2f)" % (step, steps, loss, lr, norm))
    nll, n = evaluate(p, CFG, hid)
    log("held out: %d tokens, mean NLL %.6f, perplexity %.4f" % (n, nll, math.exp(nll)))
    write_model(a.out, CFG, p, tok_text)
    with open(os.path.join(a.out, "held_out.txt"), "w", encoding="utf-8") as f:
        f.write(held)
    with open(os.path.join(a.out, "held_out.ids"), "w") as f:
        f.write(" ".join(map(str, hid.tolist())) + "\n")
    with open(os.path.join(a.out, "train.json"), "w") as f:
        json.dump({"steps": steps, "batch": BATCH, "seq": SEQ, "seed": a.seed, "train_tokens": int(len(ids)),
                   "held_out_tokens": n, "held_out_nll": nll, "held_out_perplexity": math.exp(nll),
                   "seconds": time.time() - t0}, f, indent=2)
    log("wrote %s" % a.out)
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=int, default=600)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--seed", type=int, default=1)
    sub.add_parser("gradcheck")
    a = ap.parse_args(argv)
    return gradcheck() if a.cmd == "gradcheck" else train(a)


if __name__ == "__main__":
    sys.exit(main())
