#!/usr/bin/python3
"""Independent float64 numpy reference for LLaMA-family models in a Hugging Face directory.

Written from the equations (HF transformers LlamaForCausalLM convention), sharing no code
with the C engine:

  x_0      = embed_tokens[ids]
  per layer:
    h      = RMSNorm(x) * input_layernorm         RMSNorm(x) = x / sqrt(mean(x^2) + eps)
    q,k,v  = h Wq^T, h Wk^T, h Wv^T               (nh, nkv, nkv heads of head_dim)
    q,k    = RoPE(q, pos), RoPE(k, pos)           rotate_half pairs (j, j + hd/2),
                                                  angle pos * theta^(-2j/hd)
    a_h    = softmax(q_h k_g^T / sqrt(hd) + causal mask) v_g,   g = h // (nh/nkv)
    x      = x + concat(a) Wo^T
    h      = RMSNorm(x) * post_attention_layernorm
    x      = x + (silu(h Wg^T) * (h Wu^T)) Wd^T
  logits   = (RMSNorm(x) * norm) W_lm^T           W_lm = lm_head or embed_tokens (tied)

The relatives (each from its published description, HF transformers' convention):
  - a projection with a bias adds it: qwen2 has q/k/v biases; llama's attention_bias gives
    q/k/v/o biases and mlp_bias gate/up/down biases;
  - qwen3: q and k are RMSNorm'ed per head (weights q_norm, k_norm over head_dim) before RoPE;
  - rope_scaling "dynamic" (NTK-aware): position p, when p + 1 exceeds the trained context L0
    (max_position_embeddings), rotates with the base raised to
    base * (factor * (p + 1) / L0 - (factor - 1)) ^ (hd / (hd - 2)), and the context grows to
    factor * L0;
  - rope_scaling "linear": every inverse frequency divided by the factor; "llama3" (Llama 3.1):
    with L = original_max_position_embeddings, a frequency whose wavelength 2*pi/f exceeds
    L/low_freq_factor is divided by the factor, one below L/high_freq_factor is kept, and in
    between s = (L/wavelength - low)/(high - low) blends: (1 - s) f/factor + s f.

  - sliding-window attention (Mistral's sliding_window on every layer; Qwen's use_sliding_window
    from max_window_layers on; Gemma 3 all but every sliding_window_pattern-th layer, or as
    layer_types lists them): the query at position q sees keys kv with q - W < kv <= q;
  - gemma3_text: RMSNorm(x) * (1 + w) everywhere (q/k norms too); embeddings times
    sqrt(hidden_size); x = x + post_attention_layernorm(attn(input_layernorm(x))),
    x = x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x))); the MLP's gate is
    GELU's tanh approximation; scores scaled by query_pre_attn_scalar^-1/2; sliding layers rotate
    with rope_local_base_freq and no scaling, global ones with rope_theta and rope_scaling;
    logits soft-capped cap * tanh(logits / cap) when final_logit_softcapping is set;
  - mixtures of experts (qwen3_moe, mixtral): p = softmax(h Wrouter^T); the k experts of the
    largest p, their weights p_e (divided by their sum with norm_topk_prob, and always for
    mixtral); out = sum_e p_e * down_e(silu(gate_e h) * up_e h). qwen3_moe layers in
    mlp_only_layers (or off the decoder_sparse_step) keep a dense MLP.

`forward(ids)` recomputes the whole sequence (no cache). `IncrementalDecoder` is a separate
KV-cached implementation used only to self-test the reference.

Self-test / CLI:
  ref_llama.py --model DIR --ids "1 2 3" [--gen N]     print argmax continuation
  ref_llama.py --model DIR --selftest                  full vs incremental, etc.
"""

import argparse
import json
import os
import sys

import numpy as np

ST_DTYPES = {"F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2), "F64": ("<f8", 8)}


# ----------------------------------------------------------------------------- safetensors

def read_safetensors(path):
    """Return {name: float64 ndarray} for one .safetensors file."""
    with open(path, "rb") as f:
        buf = f.read()
    if len(buf) < 8:
        raise ValueError("%s: too short" % path)
    hlen = int.from_bytes(buf[:8], "little")
    if 8 + hlen > len(buf):
        raise ValueError("%s: header length %d exceeds file" % (path, hlen))
    header = json.loads(buf[8:8 + hlen].decode("utf-8"))
    base = 8 + hlen
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = info["dtype"]
        if dt not in ST_DTYPES:
            raise ValueError("%s: unsupported dtype %s for %s" % (path, dt, name))
        npdt, esize = ST_DTYPES[dt]
        shape = tuple(info["shape"])
        start, end = info["data_offsets"]
        n = int(np.prod(shape)) if shape else 1
        if end - start != n * esize or base + end > len(buf):
            raise ValueError("%s: bad data_offsets for %s" % (path, name))
        raw = np.frombuffer(buf, dtype=npdt, count=n, offset=base + start)
        if dt == "BF16":
            a = (raw.astype(np.uint32) << np.uint32(16)).view(np.float32)
        else:
            a = raw
        out[name] = a.astype(np.float64).reshape(shape)
    return out


def load_weights(model_dir):
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            wm = json.load(f)["weight_map"]
        tensors = {}
        for fn in sorted(set(wm.values())):
            part = read_safetensors(os.path.join(model_dir, fn))
            for k, v in part.items():
                if wm.get(k) != fn:
                    raise ValueError("tensor %s found in %s but index says %s" % (k, fn, wm.get(k)))
                tensors[k] = v
        missing = set(wm) - set(tensors)
        if missing:
            raise ValueError("tensors listed in index but missing: %s" % sorted(missing)[:5])
        return tensors
    return read_safetensors(os.path.join(model_dir, "model.safetensors"))


# ----------------------------------------------------------------------------- model

def round_bf16(a):
    """float64 array -> the nearest bfloat16 values (round to nearest even), as float64."""
    u = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32).astype(np.float64)


def q8_values(a):
    """Rows of float64 -> their Q8_0 values (ggml's definition): per block of 32, in float32,
    d = max|a| / 127, q = round-half-even(a * (1 / d)) in [-127, 127], value = half(d) * q.
    (half=False: the scale kept in float32, as kvserve keeps an activation's.)"""
    return _q8(a, True)


def _q8(a, half, n=32):
    if np.shape(a)[-1] % n:  # rows that are not whole blocks stay as they are (so does kvserve)
        return a
    b = np.asarray(a, dtype=np.float32).reshape(-1, n)
    d = np.abs(b).max(axis=1) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d > 0).astype(np.float32)
    q = np.clip(np.rint(b * inv[:, None]), -127, 127)
    dd = d.astype(np.float16).astype(np.float64) if half else d.astype(np.float64)
    return (dd[:, None] * q.astype(np.float64)).reshape(np.shape(a))


def q8_activations(h):
    """An activation row as kvserve's Q8_0 products see it: float32, quantized per block of 32."""
    return _q8(h, False)


def k_activations(h):
    """An activation row as kvserve's K-quant products see it: float32, quantized per 256 like
    Q8_0's per 32 (a row that is not whole blocks of 256 meets a Q8_0 matrix: per 32)."""
    return _q8(h, False, 256) if np.shape(h)[-1] % 256 == 0 else _q8(h, False)


MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3")


class LlamaRef:
    def __init__(self, model_dir, bf16_matrices=False, kv_f16=False, q8=False, kquant=False):
        """bf16_matrices: round every weight matrix (not the norms) to bfloat16 first, as
        kvserve does with --weights bf16. kv_f16: round keys (after RoPE) and values to IEEE
        half before attention, as kvserve's --kv f16 cache holds them. q8: the matrices in Q8_0
        (q8_values) and every product's input quantized likewise (q8_activations), as kvserve
        computes with --weights q8_0. kquant: the matrices as the directory holds them (the
        dequantized values of a K-quant GGUF file) and every product's input quantized as kvserve
        does with --weights q4_k (k_activations)."""
        self.kv_f16 = kv_f16
        self.act = q8_activations if q8 else k_activations if kquant else (lambda h: h)
        with open(os.path.join(model_dir, "config.json")) as f:
            c = json.load(f)
        self.cfg = c
        self.V = c["vocab_size"]
        self.H = c["hidden_size"]
        self.L = c["num_hidden_layers"]
        self.nh = c["num_attention_heads"]
        self.nkv = c.get("num_key_value_heads", self.nh)
        self.hd = c.get("head_dim") or self.H // self.nh
        self.F = c["intermediate_size"]
        self.eps = float(c["rms_norm_eps"])
        self.theta = float(c.get("rope_theta", 10000.0))
        self.tied = bool(c.get("tie_word_embeddings", False))
        self.model_type = mt = c.get("model_type", "llama")
        self.gemma = mt == "gemma3_text"
        if self.gemma:
            self.hd = c.get("head_dim") or 256
            self.theta = float(c.get("rope_theta", 1000000.0))
            self.tied = bool(c.get("tie_word_embeddings", True))
        self.qk_norm = mt in ("qwen3", "qwen3_moe") or self.gemma
        self.scale = float(c.get("query_pre_attn_scalar", self.hd)) ** -0.5 if self.gemma else 1.0 / np.sqrt(self.hd)
        self.softcap = c.get("final_logit_softcapping") if self.gemma else None
        self.inv_freq = self._inv_freq(c.get("rope_scaling"))
        self.inv_freq_local = self.inv_freq
        if self.gemma:
            th = float(c.get("rope_local_base_freq", 10000.0))
            self.inv_freq_local = th ** (-np.arange(self.hd // 2, dtype=np.float64) * 2.0 / self.hd)
        self.window = self._windows(c)
        self.moe = self._moe_layers(c)
        w = load_weights(model_dir)
        if bf16_matrices or q8:
            for k in list(w):
                if (k.endswith(".weight") and k.split(".")[-2] in MATRICES) or k in ("model.embed_tokens.weight",
                                                                                       "lm_head.weight"):
                    w[k] = q8_values(w[k]) if q8 else round_bf16(w[k])
        self.w = w
        self.embed = w["model.embed_tokens.weight"]
        if self.tied:
            self.lm_head = self.embed  # HF ties lm_head to embed_tokens (any lm_head.weight is ignored)
        else:
            self.lm_head = w["lm_head.weight"]
        self._check_shapes()

    def _windows(self, c):
        """Per layer: the sliding window W, or None for full attention."""
        mt, L, W = self.model_type, self.L, c.get("sliding_window")
        if self.gemma:
            W = W or 4096
        if mt.startswith("qwen") and not c.get("use_sliding_window"):
            W = None
        if W is None or mt == "llama":
            return [None] * L
        if c.get("layer_types"):
            return [W if t == "sliding_attention" else None for t in c["layer_types"]]
        if self.gemma:
            pat = c.get("sliding_window_pattern", 6)
            return [W if (i + 1) % pat else None for i in range(L)]
        if mt.startswith("qwen"):
            return [W if i >= c.get("max_window_layers", L) else None for i in range(L)]
        return [W] * L

    def _moe_layers(self, c):
        mt = self.model_type
        if mt == "mixtral":
            return set(range(self.L))
        if mt == "qwen3_moe":
            step = c.get("decoder_sparse_step", 1)
            return {i for i in range(self.L) if (i + 1) % step == 0} - set(c.get("mlp_only_layers") or [])
        return set()

    def _check_shapes(self):
        V, H, nh, nkv, hd, F = self.V, self.H, self.nh, self.nkv, self.hd, self.F
        exp = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
        for i in range(self.L):
            p = "model.layers.%d." % i
            exp.update({
                p + "input_layernorm.weight": (H,),
                p + "self_attn.q_proj.weight": (nh * hd, H),
                p + "self_attn.k_proj.weight": (nkv * hd, H),
                p + "self_attn.v_proj.weight": (nkv * hd, H),
                p + "self_attn.o_proj.weight": (H, nh * hd),
                p + "post_attention_layernorm.weight": (H,),
            })
            if i not in self.moe:
                exp.update({p + "mlp.gate_proj.weight": (F, H), p + "mlp.up_proj.weight": (F, H),
                            p + "mlp.down_proj.weight": (H, F)})
        if not self.tied:
            exp["lm_head.weight"] = (V, H)
        for k, s in exp.items():
            if k not in self.w:
                raise ValueError("missing tensor %s" % k)
            if self.w[k].shape != s:
                raise ValueError("tensor %s has shape %s, expected %s" % (k, self.w[k].shape, s))

    def _inv_freq(self, rs):
        half = self.hd // 2
        f = self.theta ** (-np.arange(half, dtype=np.float64) * 2.0 / self.hd)
        kind = (rs or {}).get("rope_type", (rs or {}).get("type", "default"))
        self.dynamic = None
        if kind == "default":
            return f
        if kind == "dynamic":  # per position, in rope(): (factor, trained context L0)
            self.dynamic = (float(rs["factor"]), float(self.cfg.get("max_position_embeddings", 2048)))
            return f
        factor = float(rs["factor"])
        if kind == "linear":
            return f / factor
        if kind != "llama3":
            raise ValueError("rope_scaling %r not in this reference" % kind)
        L, lo, hi = float(rs["original_max_position_embeddings"]), float(rs["low_freq_factor"]), \
            float(rs["high_freq_factor"])
        out = []
        for fj in f:
            wl = 2 * np.pi / fj
            if wl < L / hi:
                out.append(fj)
            elif wl > L / lo:
                out.append(fj / factor)
            else:
                sm = (L / wl - lo) / (hi - lo)
                out.append((1 - sm) * fj / factor + sm * fj)
        return np.array(out)

    def proj(self, i, name, h):
        """h @ W^T (+ bias when the checkpoint has one) for layer i's projection `name`."""
        p = "model.layers.%d.%s" % (i, name)
        y = self.act(h) @ self.w[p + ".weight"].T
        b = self.w.get(p + ".bias")
        return y if b is None else y + b

    def qk(self, i, q, k):
        """qwen3, gemma3: RMSNorm over each head of q and k (before RoPE)."""
        if not self.qk_norm:
            return q, k
        p = "model.layers.%d.self_attn." % i
        return self.norm(q, self.w[p + "q_norm.weight"]), self.norm(k, self.w[p + "k_norm.weight"])

    def norm(self, x, w):
        """The model's RMSNorm: weight w, or 1 + w for Gemma."""
        return self.rmsnorm(x, 1.0 + w if self.gemma else w)

    def gate_act(self, x):
        if self.gemma:  # GELU, tanh approximation
            return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))
        return self.silu(x)

    def mlp(self, i, h):
        """The feed-forward part of layer i on normalised rows h [n, H]."""
        p = "model.layers.%d." % i
        if i not in self.moe:
            return self.proj(i, "mlp.down_proj", self.gate_act(self.proj(i, "mlp.gate_proj", h)) *
                             self.proj(i, "mlp.up_proj", h))
        mix = self.model_type == "mixtral"
        base = p + ("block_sparse_moe." if mix else "mlp.")
        names = ("w1", "w3", "w2") if mix else ("gate_proj", "up_proj", "down_proj")
        k = self.cfg["num_experts_per_tok"]
        renorm = mix or bool(self.cfg.get("norm_topk_prob"))
        logits = h @ self.w[base + "gate.weight"].T
        prob = np.exp(logits - logits.max(axis=-1, keepdims=True))
        prob /= prob.sum(axis=-1, keepdims=True)
        out = np.zeros_like(h)
        for t in range(h.shape[0]):
            top = np.argsort(-prob[t], kind="stable")[:k]
            wts = prob[t, top] / (prob[t, top].sum() if renorm else 1.0)
            for e, we in zip(top, wts):
                q = base + "experts.%d." % e
                g = self.act(h[t]) @ self.w[q + names[0] + ".weight"].T
                u = self.act(h[t]) @ self.w[q + names[1] + ".weight"].T
                out[t] += we * (self.act(self.silu(g) * u) @ self.w[q + names[2] + ".weight"].T)
        return out

    def layer(self, i):
        p = "model.layers.%d." % i
        g = lambda n: self.w[p + n]
        return (g("input_layernorm.weight"), g("self_attn.q_proj.weight"),
                g("self_attn.k_proj.weight"), g("self_attn.v_proj.weight"),
                g("self_attn.o_proj.weight"), g("post_attention_layernorm.weight"),
                g("mlp.gate_proj.weight"), g("mlp.up_proj.weight"), g("mlp.down_proj.weight"))

    # --- building blocks
    def rmsnorm(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def rope(self, x, positions, local=False):
        """x: [n, heads, hd]; positions: [n] ints. local: a Gemma sliding layer's own base."""
        hd = self.hd
        half = hd // 2
        f = self.inv_freq_local if local else self.inv_freq
        pos = np.asarray(positions, dtype=np.float64)
        if self.dynamic and not local:
            # NTK-aware dynamic scaling (the "dynamic" rope_type): a context of length L beyond the
            # trained L0 rotates with base * (factor * L / L0 - (factor - 1)) ^ (hd / (hd - 2)); each
            # position p takes L = p + 1, as when the sequence is generated one token at a time
            fac, L0 = self.dynamic
            L = np.maximum(pos + 1, L0)
            base = self.theta * (fac * L / L0 - (fac - 1)) ** (hd / (hd - 2))
            f = base[:, None] ** (-np.arange(half, dtype=np.float64)[None, :] * 2.0 / hd)
            ang = pos[:, None] * f
        else:
            ang = pos[:, None] * f[None, :]  # [n, half]
        cos = np.cos(ang)[:, None, :]
        sin = np.sin(ang)[:, None, :]
        x1, x2 = x[..., :half], x[..., half:]
        # x*cos + rotate_half(x)*sin, rotate_half(x) = cat(-x2, x1)
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    @staticmethod
    def silu(x):
        return x / (1.0 + np.exp(-x))

    # --- full recompute
    def forward(self, ids, last_only=False):
        """Logits [n, V] (or [V] for the last position if last_only) for token ids."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 1 or len(ids) == 0:
            raise ValueError("need a non-empty 1-D id list")
        if ids.min() < 0 or ids.max() >= self.V:
            raise ValueError("token id out of range")
        n = len(ids)
        nh, nkv, hd = self.nh, self.nkv, self.hd
        group = nh // nkv
        pos = np.arange(n)
        causal = np.triu(np.ones((n, n), dtype=bool), k=1)  # True above the diagonal = masked
        scale = self.scale
        x = self.embed[ids].copy()
        if self.gemma:
            x *= np.sqrt(self.H)
        for i in range(self.L):
            p_ = "model.layers.%d." % i
            W = self.window[i]
            mask = causal if W is None else causal | (pos[None, :] <= pos[:, None] - W)
            h = self.norm(x, self.w[p_ + "input_layernorm.weight"])
            q, k = self.qk(i, self.proj(i, "self_attn.q_proj", h).reshape(n, nh, hd),
                           self.proj(i, "self_attn.k_proj", h).reshape(n, nkv, hd))
            local = self.gemma and W is not None
            q, k = self.rope(q, pos, local), self.rope(k, pos, local)
            v = self.proj(i, "self_attn.v_proj", h).reshape(n, nkv, hd)
            if self.kv_f16:
                k = k.astype(np.float16).astype(np.float64)
                v = v.astype(np.float16).astype(np.float64)
            att = np.empty((n, nh, hd))
            for hh in range(nh):
                g = hh // group
                s = (q[:, hh, :] @ k[:, g, :].T) * scale            # [n, n]
                s[mask] = -np.inf
                s = s - s.max(axis=1, keepdims=True)
                p = np.exp(s)
                p /= p.sum(axis=1, keepdims=True)
                att[:, hh, :] = p @ v[:, g, :]
            a = self.proj(i, "self_attn.o_proj", att.reshape(n, nh * hd))
            if self.gemma:
                x = x + self.norm(a, self.w[p_ + "post_attention_layernorm.weight"])
                h = self.norm(x, self.w[p_ + "pre_feedforward_layernorm.weight"])
                x = x + self.norm(self.mlp(i, h), self.w[p_ + "post_feedforward_layernorm.weight"])
            else:
                x = x + a
                x = x + self.mlp(i, self.rmsnorm(x, self.w[p_ + "post_attention_layernorm.weight"]))
        if last_only:
            x = x[-1:]
        x = self.norm(x, self.w["model.norm.weight"])
        logits = self.act(x) @ self.lm_head.T
        if self.softcap:
            logits = self.softcap * np.tanh(logits / self.softcap)
        return logits[0] if last_only else logits

    def greedy(self, ids, n_new):
        """Greedy continuation with a full recompute per step; ties -> lowest id.
        Returns (new_ids, list of (top1 - top2) logit gaps per step)."""
        seq = list(ids)
        out, gaps = [], []
        for _ in range(n_new):
            lg = self.forward(seq, last_only=True)
            t = int(np.argmax(lg))  # first maximum = lowest id among ties
            top2 = np.partition(lg, -2)[-2:]
            gaps.append(float(top2[1] - top2[0]))
            out.append(t)
            seq.append(t)
        return out, gaps


class IncrementalDecoder:
    """KV-cached decoding, written separately from LlamaRef.forward (self-test only)."""

    def __init__(self, m):
        self.m = m
        self.k = [np.zeros((0, m.nkv, m.hd)) for _ in range(m.L)]
        self.v = [np.zeros((0, m.nkv, m.hd)) for _ in range(m.L)]

    def step(self, tok):
        m = self.m
        pos = self.k[0].shape[0]
        group = m.nh // m.nkv
        x = m.embed[tok].copy()
        for i in range(m.L):
            w_in, wq, wk, wv, wo, w_post, wg, wu, wd = m.layer(i)
            h = m.rmsnorm(x, w_in)
            q, k = m.qk(i, m.proj(i, "self_attn.q_proj", h).reshape(1, m.nh, m.hd),
                        m.proj(i, "self_attn.k_proj", h).reshape(1, m.nkv, m.hd))
            q = m.rope(q, [pos])[0]
            k = m.rope(k, [pos])
            v = m.proj(i, "self_attn.v_proj", h).reshape(1, m.nkv, m.hd)
            self.k[i] = np.concatenate([self.k[i], k])
            self.v[i] = np.concatenate([self.v[i], v])
            out = np.empty(m.nh * m.hd)
            for hh in range(m.nh):
                g = hh // group
                s = self.k[i][:, g, :] @ q[hh] / np.sqrt(m.hd)
                p = np.exp(s - s.max())
                p /= p.sum()
                out[hh * m.hd:(hh + 1) * m.hd] = p @ self.v[i][:, g, :]
            x = x + m.proj(i, "self_attn.o_proj", out)
            h = m.rmsnorm(x, w_post)
            x = x + m.proj(i, "mlp.down_proj", m.silu(m.proj(i, "mlp.gate_proj", h)) * m.proj(i, "mlp.up_proj", h))
        return m.lm_head @ m.act(m.rmsnorm(x, m.w["model.norm.weight"]))


def selftest(model_dir, n_prompt=12, n_gen=8, seed=7):
    m = LlamaRef(model_dir)
    rng = np.random.default_rng(seed)
    ids = [int(t) for t in rng.integers(3, m.V, size=n_prompt)]
    full = m.forward(ids)
    dec = IncrementalDecoder(m)
    inc = np.stack([dec.step(t) for t in ids])
    d1 = np.abs(full - inc).max() / np.abs(full).max()
    # last_only agrees with the full matrix
    d2 = np.abs(m.forward(ids, last_only=True) - full[-1]).max()
    # greedy: full recompute vs incremental
    g_full, gaps = m.greedy(ids, n_gen)
    g_inc = []
    lg = inc[-1]
    for _ in range(n_gen):
        t = int(np.argmax(lg))
        g_inc.append(t)
        lg = dec.step(t)
    # prefix property: logits of a prefix do not depend on later tokens (causality)
    d3 = np.abs(m.forward(ids[:5]) - full[:5]).max() / np.abs(full).max()
    # RoPE: a rotation (norm preserving) whose q.k products depend only on the offset;
    # position 0 is the identity
    q = rng.standard_normal((1, 1, m.hd))
    k = rng.standard_normal((1, 1, m.hd))
    dots = [float(np.sum(m.rope(q, [p + 17]) * m.rope(k, [p]))) for p in (0, 5, 300)]
    d4 = max(abs(d - dots[0]) for d in dots) + abs(np.linalg.norm(m.rope(q, [123])) - np.linalg.norm(q)) \
        + np.abs(m.rope(q, [0]) - q).max()
    ok = d1 < 1e-12 and d2 < 1e-12 and g_full == g_inc and d3 < 1e-12 and d4 < 1e-9
    print("selftest %s: full-vs-incremental rel %.2e, last_only %.2e, causal-prefix rel %.2e, "
          "rope %.1e, greedy %s (min gap %.3f), logit std %.2f: %s"
          % (model_dir, d1, d2, d3, d4, "agree" if g_full == g_inc else "DIFFER", min(gaps),
             full.std(), "OK" if ok else "FAIL"))
    print("  greedy:", " ".join(map(str, g_full)))
    return ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--ids")
    ap.add_argument("--gen", type=int, default=0)
    ap.add_argument("--selftest", action="store_true")
    a = ap.parse_args(argv)
    if a.selftest:
        return 0 if selftest(a.model) else 1
    m = LlamaRef(a.model)
    ids = [int(t) for t in a.ids.split()]
    if a.gen:
        out, gaps = m.greedy(ids, a.gen)
        print(" ".join(map(str, out)))
    else:
        lg = m.forward(ids, last_only=True)
        print("argmax %d, max %.6f" % (int(np.argmax(lg)), lg.max()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
