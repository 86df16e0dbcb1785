#!/usr/bin/python3
"""Deterministic Hugging Face LLaMA model directory generator (random weights, trained tokenizer).

  /usr/bin/python3 tools/mkmodel.py --preset tiny|smollm2-135m --out DIR
        [--dtype f32|f16|bf16] [--shards N] [--untied] [--seed S] [--cache DIR]

Writes config.json, model.safetensors (or model-0000i-of-0000N.safetensors plus
model.safetensors.index.json), tokenizer.json, tokenizer_config.json, generation_config.json.

Determinism: every tensor is drawn from its own generator, seeded by (seed, crc32(name)),
in float32. So the same seed gives byte-identical files, the F16/BF16 files hold exactly the
F32 values rounded (F16 via numpy, BF16 round-to-nearest-even of the top 16 bits), and the
sharded / untied variants hold the same values as the plain tied one (the untied model only
adds lm_head.weight).

Weight scales are chosen so a random model behaves like a model (activations O(1) through
many layers, attention neither uniform nor one-hot, well separated logits, non-trivial greedy
continuations): q/k/v/gate/up ~ N(0, 1/fan_in), o/down ~ N(0, 64/fan_in), embeddings (and
an untied lm_head) ~ N(0, 1), norm weights 1 + N(0, 0.05^2).
"""

import argparse
import json
import os
import sys
import time
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bpe_train  # noqa: E402

PRESETS = {
    "tiny": dict(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, intermediate_size=160, rope_theta=10000.0,
                 rms_norm_eps=1e-5, max_position_embeddings=512),
    # the LLaMA relatives at the tiny size: Qwen2 (q/k/v biases), Qwen3 (q/k norms, head_dim apart
    # from hidden/heads), Llama 3.1 (llama3 RoPE scaling), and Llama with every bias and linear scaling
    "tiny-qwen2": dict(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, intermediate_size=160, rope_theta=1000000.0,
                       rms_norm_eps=1e-6, max_position_embeddings=512, model_type="qwen2"),
    "tiny-qwen3": dict(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=32, intermediate_size=160, rope_theta=1000000.0,
                       rms_norm_eps=1e-6, max_position_embeddings=512, model_type="qwen3"),
    "tiny-llama31": dict(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, intermediate_size=160, rope_theta=500000.0,
                         rms_norm_eps=1e-5, max_position_embeddings=512,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # rows of 256: whole super-blocks of the GGUF K-quants (Q4_K, Q6_K) in every matrix
    "tiny-k": dict(vocab_size=1024, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64, intermediate_size=512, rope_theta=10000.0,
                   rms_norm_eps=1e-5, max_position_embeddings=512),
    "tiny-mistral": dict(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, intermediate_size=160, rope_theta=1000000.0,
                         rms_norm_eps=1e-5, max_position_embeddings=512, model_type="mistral"),
    "tiny-llama-bias": dict(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, intermediate_size=160, rope_theta=10000.0,
                            rms_norm_eps=1e-5, max_position_embeddings=512, attention_bias=True, mlp_bias=True,
                            rope_scaling={"type": "linear", "factor": 2.0}),
    # dynamic (NTK-aware) RoPE scaling: trained context 64, grown 4x; the tests' 84-154 tokens go past it
    "tiny-llama-dynamic": dict(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, intermediate_size=160, rope_theta=10000.0,
                               rms_norm_eps=1e-5, max_position_embeddings=64,
                               rope_scaling={"rope_type": "dynamic", "factor": 4.0}),
    # sliding windows shorter than the tests' sequences (20-token prompts + 64 generated), with
    # 16-token blocks: Mistral v0.1 (every layer slides), Gemma 3 (every 2nd layer global here,
    # its own local RoPE base, linear scaling on the global layers, query_pre_attn_scalar apart
    # from head_dim, final soft-capping on), and the mixtures of experts
    "tiny-mistral-sw": dict(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, intermediate_size=160, rope_theta=1000000.0,
                            rms_norm_eps=1e-5, max_position_embeddings=512, model_type="mistral", sliding_window=24),
    "tiny-gemma3": dict(vocab_size=1024, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=1, head_dim=32, intermediate_size=160, rope_theta=1000000.0,
                        rms_norm_eps=1e-6, max_position_embeddings=512, model_type="gemma3_text", sliding_window=20,
                        sliding_window_pattern=2, query_pre_attn_scalar=24, rope_local_base_freq=10000.0,
                        final_logit_softcapping=30.0, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "tiny-qwen3-moe": dict(vocab_size=1024, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, intermediate_size=160, rope_theta=1000000.0,
                           rms_norm_eps=1e-6, max_position_embeddings=512, model_type="qwen3_moe", num_experts=8,
                           num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True,
                           mlp_only_layers=[1]),
    "tiny-mixtral": dict(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, intermediate_size=48, rope_theta=1000000.0,
                         rms_norm_eps=1e-5, max_position_embeddings=512, model_type="mixtral", num_local_experts=4,
                         num_experts_per_tok=2),
    # for benchmarks of the K-quants: rows that are whole super-blocks of 256 (SmolLM2's 576 are not)
    "bench-k-200m": dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=16, num_attention_heads=16,
                         num_key_value_heads=4, head_dim=64, intermediate_size=2816, rope_theta=10000.0,
                         rms_norm_eps=1e-5, max_position_embeddings=4096),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         intermediate_size=1536, rope_theta=100000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=8192),
}

DTYPES = {  # cli name -> (safetensors dtype, bytes per element, torch_dtype)
    "f32": ("F32", 4, "float32"),
    "f16": ("F16", 2, "float16"),
    "bf16": ("BF16", 2, "bfloat16"),
}

EMBED_STD = 1.0
NORM_NOISE = 0.05
# Extra gain on the residual-writing projections (o_proj, down_proj). With tied embeddings a
# random model whose layers barely move the residual stream just repeats its last token;
# making the layer outputs ~8x the embedding gives varied greedy continuations (tiny: 15-33
# distinct ids in 64 steps; smollm2-135m: 11-24) with clear top-1/top-2 gaps (median 2-10).
OUT_GAIN = 8.0

CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                 "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tensor_specs(cfg, tied):
    """[(name, shape, init_kind, std)] in canonical (file) order."""
    V, H = cfg["vocab_size"], cfg["hidden_size"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    F = cfg["intermediate_size"]
    mt = cfg.get("model_type", "llama")
    qkv_bias = mt == "qwen2" or cfg.get("attention_bias", False)
    o_bias = mt == "llama" and cfg.get("attention_bias", False)
    mlp_bias = mt == "llama" and cfg.get("mlp_bias", False)
    B = 0.5  # bias std: large enough to matter against projections of std ~1
    gemma = mt == "gemma3_text"
    moe_layers = set()
    if mt == "mixtral":
        moe_layers = set(range(cfg["num_hidden_layers"]))
    elif mt == "qwen3_moe":
        moe_layers = set(range(cfg["num_hidden_layers"])) - set(cfg.get("mlp_only_layers", []))
    s = [("model.embed_tokens.weight", (V, H), "normal", EMBED_STD)]
    for i in range(cfg["num_hidden_layers"]):
        p = "model.layers.%d." % i
        if qkv_bias:
            s += [(p + "self_attn.q_proj.bias", (nh * hd,), "normal", B),
                  (p + "self_attn.k_proj.bias", (nkv * hd,), "normal", B),
                  (p + "self_attn.v_proj.bias", (nkv * hd,), "normal", B)]
        if o_bias:
            s += [(p + "self_attn.o_proj.bias", (H,), "normal", B)]
        if mlp_bias:
            s += [(p + "mlp.gate_proj.bias", (F,), "normal", B), (p + "mlp.up_proj.bias", (F,), "normal", B),
                  (p + "mlp.down_proj.bias", (H,), "normal", B)]
        # Gemma stores its norm weights as w in x / rms(x) * (1 + w): drawn around 0, not 1
        norm = ("normal", NORM_NOISE) if gemma else ("norm", NORM_NOISE)
        if mt in ("qwen3", "qwen3_moe") or gemma:
            qk = ("normal", 0.2) if gemma else ("norm", 0.2)
            s += [(p + "self_attn.q_norm.weight", (hd,)) + qk, (p + "self_attn.k_norm.weight", (hd,)) + qk]
        s += [
            (p + "input_layernorm.weight", (H,)) + norm,
            (p + "self_attn.q_proj.weight", (nh * hd, H), "normal", H ** -0.5),
            (p + "self_attn.k_proj.weight", (nkv * hd, H), "normal", H ** -0.5),
            (p + "self_attn.v_proj.weight", (nkv * hd, H), "normal", H ** -0.5),
            (p + "self_attn.o_proj.weight", (H, nh * hd), "normal", OUT_GAIN * (nh * hd) ** -0.5),
            (p + "post_attention_layernorm.weight", (H,)) + ((("gain", NORM_NOISE)) if gemma else norm),
        ]
        if gemma:
            s += [(p + "pre_feedforward_layernorm.weight", (H,)) + norm,
                  (p + "post_feedforward_layernorm.weight", (H,), "gain", NORM_NOISE)]
        if i in moe_layers:
            s += expert_specs(cfg, p)
        else:
            s += [
                (p + "mlp.gate_proj.weight", (F, H), "normal", H ** -0.5),
                (p + "mlp.up_proj.weight", (F, H), "normal", H ** -0.5),
                (p + "mlp.down_proj.weight", (H, F), "normal", OUT_GAIN * F ** -0.5),
            ]
    s.append(("model.norm.weight", (H,)) + (("normal", NORM_NOISE) if gemma else ("norm", NORM_NOISE)))
    if not tied:
        s.append(("lm_head.weight", (V, H), "normal", EMBED_STD))
    return s


def expert_specs(cfg, p):
    """A mixture-of-experts layer's router and experts (qwen3_moe or mixtral names). The
    router's scale makes the routing clear-cut (top-k well apart) but not one-hot."""
    H = cfg["hidden_size"]
    if cfg["model_type"] == "mixtral":
        E, Fe, base, names = cfg["num_local_experts"], cfg["intermediate_size"], "block_sparse_moe", ("w1", "w3", "w2")
    else:
        E, Fe, base, names = cfg["num_experts"], cfg["moe_intermediate_size"], "mlp", ("gate_proj", "up_proj", "down_proj")
    s = [(p + base + ".gate.weight", (E, H), "normal", 0.5)]
    for e in range(E):
        q = "%s%s.experts.%d." % (p, base, e)
        s += [(q + names[0] + ".weight", (Fe, H), "normal", H ** -0.5),
              (q + names[1] + ".weight", (Fe, H), "normal", H ** -0.5),
              (q + names[2] + ".weight", (H, Fe), "normal", OUT_GAIN * Fe ** -0.5)]
    return s


def gen_tensor(seed, name, shape, kind, std):
    """float32 values of one tensor; depends only on (seed, name, shape, kind, std)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
    a = rng.standard_normal(int(np.prod(shape)), dtype=np.float32)
    a *= np.float32(std)
    if kind == "norm":
        a += np.float32(1.0)
    elif kind == "gain":  # Gemma's norms on the sublayers' outputs, (1 + w) ~ OUT_GAIN: see OUT_GAIN
        a += np.float32(OUT_GAIN - 1.0)
    return a.reshape(shape)


def f32_to_bf16_bits(a):
    """Round-to-nearest-even of float32 to bfloat16, returned as uint16 bits."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    r = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return r.astype(np.uint16)


def encode(a, dtype):
    if dtype == "f32":
        return np.ascontiguousarray(a, dtype="<f4").tobytes()
    if dtype == "f16":
        return np.ascontiguousarray(a.astype("<f2")).tobytes()
    if dtype == "bf16":
        return f32_to_bf16_bits(a).astype("<u2").tobytes()
    raise ValueError(dtype)


def safetensors_header(entries, st_dtype):
    """entries: [(name, shape, nbytes)] in data order -> (header bytes padded to 8, data size)."""
    hdr = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape, nb in entries:
        hdr[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [off, off + nb]}
        off += nb
    js = json.dumps(hdr, separators=(",", ":"), sort_keys=True).encode("utf-8")
    js += b" " * ((-len(js)) % 8)
    return len(js).to_bytes(8, "little") + js, off


def split_shards(specs, nbytes, n):
    """Contiguous split of the canonical tensor list into n shards of about equal bytes."""
    if n < 1 or n > len(specs):
        raise SystemExit("--shards must be in 1..%d" % len(specs))
    total = sum(nbytes)
    groups, cur, acc = [], [], 0
    for k, (spec, nb) in enumerate(zip(specs, nbytes)):
        remaining_tensors = len(specs) - k
        remaining_groups = n - len(groups)
        # close the current group if it reached its share, or if every remaining tensor
        # is needed to give each remaining group one
        if cur and (acc >= total * (len(groups) + 1) / n or remaining_tensors < remaining_groups):
            groups.append(cur)
            cur = []
        cur.append(spec)
        acc += nb
    groups.append(cur)
    assert len(groups) == n, (len(groups), n)
    return groups


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def make_config(cfg, tied, dtype):
    mt = cfg.get("model_type", "llama")
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
            "mixtral": "MixtralForCausalLM"}[mt]
    c = make_llama_config(cfg, tied, dtype)
    c["architectures"] = [arch]
    c["model_type"] = mt
    c["attention_bias"] = bool(cfg.get("attention_bias", False))
    c["mlp_bias"] = bool(cfg.get("mlp_bias", False))
    c["rope_scaling"] = cfg.get("rope_scaling")
    if mt != "llama":
        for k in ("mlp_bias", "pretraining_tp"):
            c.pop(k, None)
        if mt in ("mistral", "mixtral"):
            c["sliding_window"] = cfg.get("sliding_window")
        elif mt != "gemma3_text":
            c.update({"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg["num_hidden_layers"]})
    if mt == "gemma3_text":
        for k in ("hidden_act",):
            c.pop(k)
        c.update({"hidden_activation": "gelu_pytorch_tanh", "attn_logit_softcapping": None})
        for k in ("sliding_window", "sliding_window_pattern", "query_pre_attn_scalar", "rope_local_base_freq",
                  "final_logit_softcapping"):
            c[k] = cfg[k]
    for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "mlp_only_layers",
              "num_local_experts"):
        if k in cfg:
            c[k] = cfg[k]
    if mt == "qwen3_moe":
        c["decoder_sparse_step"] = 1
    return c


def make_llama_config(cfg, tied, dtype):
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": cfg.get("bos_token_id", 0),
        "eos_token_id": cfg.get("eos_token_id", 0),
        "head_dim": cfg["head_dim"],
        "hidden_act": "silu",
        "hidden_size": cfg["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": cfg["intermediate_size"],
        "max_position_embeddings": cfg["max_position_embeddings"],
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": cfg["num_attention_heads"],
        "num_hidden_layers": cfg["num_hidden_layers"],
        "num_key_value_heads": cfg["num_key_value_heads"],
        "pretraining_tp": 1,
        "rms_norm_eps": cfg["rms_norm_eps"],
        "rope_scaling": None,
        "rope_theta": cfg["rope_theta"],
        "tie_word_embeddings": tied,
        "torch_dtype": DTYPES[dtype][2],
        "transformers_version": "4.42.3",
        "use_cache": True,
        "vocab_size": cfg["vocab_size"],
    }


def make_tokenizer_config(cfg):
    dec = {}
    for i, s in enumerate(bpe_train.SPECIAL_TOKENS):
        dec[str(i)] = {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                       "single_word": False, "special": True}
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": dec,
        "additional_special_tokens": bpe_train.SPECIAL_TOKENS[1:],
        "bos_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "model_max_length": cfg["max_position_embeddings"],
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": "<|endoftext|>",
        "vocab_size": cfg["vocab_size"],
    }


def write_weights(out, cfg, tied, dtype, shards, seed, log):
    st_dtype, esize, _ = DTYPES[dtype]
    specs = tensor_specs(cfg, tied)
    nbytes = [int(np.prod(shape)) * esize for _, shape, _, _ in specs]
    size_of = {s[0]: nb for s, nb in zip(specs, nbytes)}
    total = sum(nbytes)
    groups = split_shards(specs, nbytes, shards)
    weight_map = {}
    for gi, group in enumerate(groups):
        fname = "model.safetensors" if shards == 1 else \
            "model-%05d-of-%05d.safetensors" % (gi + 1, shards)
        header, dsize = safetensors_header([(n, sh, size_of[n]) for n, sh, _, _ in group], st_dtype)
        path = os.path.join(out, fname)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(header)
            for name, shape, kind, std in group:
                f.write(encode(gen_tensor(seed, name, shape, kind, std), dtype))
                weight_map[name] = fname
        os.replace(tmp, path)
        log("  wrote %s (%d tensors, %.1f MB)" % (fname, len(group), (len(header) + dsize) / 1e6))
    if shards > 1:
        write_json(os.path.join(out, "model.safetensors.index.json"),
                   {"metadata": {"total_size": total},
                    "weight_map": dict(sorted(weight_map.items()))})
    return total, sum(int(np.prod(s[1])) for s in specs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="f32", choices=sorted(DTYPES))
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--untied", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", help="directory to cache trained tokenizers in")
    ap.add_argument("--tokenizer", help="use this real tokenizer.json (and NAME.tokenizer_config.json beside it, if "
                                        "any) instead of training one; the vocab size follows it")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    cfg = dict(PRESETS[args.preset])
    tok_text = tok_config = None
    if args.tokenizer:
        with open(args.tokenizer, encoding="utf-8") as f:
            tok_text = f.read()
        tj = json.loads(tok_text)
        ids = list(tj["model"]["vocab"].values()) + [a["id"] for a in tj.get("added_tokens", [])]
        cfg["vocab_size"] = max(ids) + 1
        side = args.tokenizer[:-len("tokenizer.json")] + "tokenizer_config.json"
        if args.tokenizer.endswith("tokenizer.json") and os.path.isfile(side):
            with open(side, encoding="utf-8") as f:
                tok_config = json.load(f)
        added = {a["content"]: a["id"] for a in tj.get("added_tokens", [])}
        for key in ("bos_token", "eos_token"):
            v = (tok_config or {}).get(key)
            v = v.get("content") if isinstance(v, dict) else v
            if v in added:
                cfg[key + "_id"] = added[v]
    tied = not args.untied
    n_tensors = len(tensor_specs(cfg, tied))
    if not 1 <= args.shards <= n_tensors:
        ap.error("--shards must be in 1..%d for this preset" % n_tensors)
    os.makedirs(args.out, exist_ok=True)
    # remove stale weight files from an earlier run with a different layout
    for fn in os.listdir(args.out):
        if fn.startswith("model") and (fn.endswith(".safetensors") or fn == "model.safetensors.index.json"):
            os.remove(os.path.join(args.out, fn))

    t0 = time.time()
    if tok_text is None:
        tok_text = bpe_train.build_tokenizer_json_text(cfg["vocab_size"], args.cache, log=log)
    with open(os.path.join(args.out, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(tok_text)
    t1 = time.time()
    log("tokenizer.json: %.1fs" % (t1 - t0))

    write_json(os.path.join(args.out, "config.json"), make_config(cfg, tied, args.dtype))
    write_json(os.path.join(args.out, "tokenizer_config.json"), tok_config or make_tokenizer_config(cfg))
    write_json(os.path.join(args.out, "generation_config.json"),
               {"_from_model_config": True, "bos_token_id": cfg.get("bos_token_id", 0),
                "eos_token_id": cfg.get("eos_token_id", 0),
                "transformers_version": "4.42.3"})
    total, nparams = write_weights(args.out, cfg, tied, args.dtype, args.shards, args.seed, log)
    t2 = time.time()
    log("weights: %d params, %.1f MB, %.1fs; total %.1fs" % (nparams, total / 1e6, t2 - t1, t2 - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
