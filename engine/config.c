/* config.c — config.json of a Hugging Face LLaMA-family model. */
#include "internal.h"

#include <cjson/cJSON.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

/* Read an integer field; missing -> def (or error if def < -1). */
static int get_int(const cJSON *o, const char *key, long def, long lo, long hi, long *out,
                   const char *name, char *err, size_t errlen) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v || cJSON_IsNull(v)) {
        if (def == LONG_MIN)
            return eng__fail(err, errlen, ENG_EFORMAT, "%s: missing field \"%s\"", name, key);
        *out = def;
        return ENG_OK;
    }
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble))
        return eng__fail(err, errlen, ENG_EFORMAT, "%s: field \"%s\" must be an integer", name, key);
    if (v->valuedouble < (double)lo || v->valuedouble > (double)hi)
        return eng__fail(err, errlen, ENG_EFORMAT, "%s: field \"%s\" = %.0f is out of range [%ld, %ld]",
                         name, key, v->valuedouble, lo, hi);
    *out = (long)v->valuedouble;
    return ENG_OK;
}

static int get_num(const cJSON *o, const char *key, double def, double lo, double hi, double *out,
                   const char *name, char *err, size_t errlen) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v || cJSON_IsNull(v)) { *out = def; return ENG_OK; }
    if (!cJSON_IsNumber(v) || !(v->valuedouble >= lo && v->valuedouble <= hi))
        return eng__fail(err, errlen, ENG_EFORMAT, "%s: field \"%s\" must be a number in [%g, %g]",
                         name, key, lo, hi);
    *out = v->valuedouble;
    return ENG_OK;
}

/* bos/eos may be an integer, a list of integers (first is used) or null. */
static int get_tok_id(const cJSON *o, const char *key, int vocab, int *out, const char *name,
                      char *err, size_t errlen) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    *out = -1;
    if (!v || cJSON_IsNull(v)) return ENG_OK;
    if (cJSON_IsArray(v)) v = cJSON_GetArrayItem(v, 0);
    if (!v) return ENG_OK;
    if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble >= vocab ||
        v->valuedouble != floor(v->valuedouble))
        return eng__fail(err, errlen, ENG_EFORMAT, "%s: field \"%s\" must be a token id below vocab_size %d",
                         name, key, vocab);
    *out = (int)v->valuedouble;
    return ENG_OK;
}

/* Add the end-of-sequence ids of field "eos_token_id" (an id, a list of ids, or null). */
static int eos_ids(const cJSON *o, eng_config *cfg, const char *name, char *err, size_t errlen) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, "eos_token_id"), *it;
    if (!v || cJSON_IsNull(v)) return ENG_OK;
    if (!cJSON_IsArray(v) && !cJSON_IsNumber(v))
        return eng__fail(err, errlen, ENG_EFORMAT, "%s: eos_token_id must be a token id or a list of them", name);
    int single = cJSON_IsNumber(v);
    for (it = single ? v : v->child; it; it = single ? NULL : it->next) {
        if (!cJSON_IsNumber(it) || it->valuedouble < 0 || it->valuedouble >= cfg->vocab_size ||
            it->valuedouble != floor(it->valuedouble))
            return eng__fail(err, errlen, ENG_EFORMAT, "%s: field \"eos_token_id\" must hold token ids below vocab_size %d",
                             name, cfg->vocab_size);
        int32_t id = (int32_t)it->valuedouble, seen = 0;
        for (int i = 0; i < cfg->n_eos; i++) seen |= cfg->eos_ids[i] == id;
        if (seen) continue;
        if (cfg->n_eos == ENG_MAX_EOS)
            return eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: more than %d end-of-sequence ids", name, ENG_MAX_EOS);
        cfg->eos_ids[cfg->n_eos++] = id;
    }
    if (cfg->eos_id < 0 && cfg->n_eos) cfg->eos_id = cfg->eos_ids[0];
    return ENG_OK;
}

int eng__config_generation(const char *json, size_t len, const char *name, eng_config *cfg, char *err,
                           size_t errlen) {
    cJSON *o = cJSON_ParseWithLength(json, len);
    int rc = cJSON_IsObject(o) ? eos_ids(o, cfg, name, err, errlen)
                               : eng__fail(err, errlen, ENG_EFORMAT, "%s: not a JSON object", name);
    cJSON_Delete(o);
    return rc;
}

/* rope_scaling: null, {"rope_type" (or "type"): "default" | "linear" | "llama3", ...}. */
static int rope_scaling(const cJSON *o, eng_config *cfg, const char *name, char *err, size_t errlen) {
    const cJSON *rs = cJSON_GetObjectItemCaseSensitive(o, "rope_scaling");
    if (!rs || cJSON_IsNull(rs)) return ENG_OK;
    const cJSON *ty = cJSON_GetObjectItemCaseSensitive(rs, "rope_type");
    if (!ty) ty = cJSON_GetObjectItemCaseSensitive(rs, "type");
    const char *t = cJSON_IsString(ty) ? ty->valuestring : "?";
    if (!strcmp(t, "default")) return ENG_OK;
    if (strcmp(t, "linear") && strcmp(t, "llama3") && strcmp(t, "dynamic"))
        return eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: rope_scaling type \"%s\" is not supported (linear, llama3, "
                         "dynamic)", name, t);
    double d = 0;
    int rc;
    const char *rname = "rope_scaling";
    if ((rc = get_num(rs, "factor", 0, 1e-3, 1e6, &d, rname, err, errlen))) return rc;
    if (!(d > 0)) return eng__fail(err, errlen, ENG_EFORMAT, "%s: rope_scaling needs a positive factor", name);
    cfg->rope_factor = (float)d;
    cfg->rope_scaling = !strcmp(t, "dynamic") ? ENG_ROPE_DYNAMIC : ENG_ROPE_LINEAR;
    if (!strcmp(t, "llama3")) {
        long om;
        double lo, hi;
        if ((rc = get_num(rs, "low_freq_factor", 1.0, 1e-6, 1e6, &lo, rname, err, errlen)) ||
            (rc = get_num(rs, "high_freq_factor", 4.0, 1e-6, 1e6, &hi, rname, err, errlen)) ||
            (rc = get_int(rs, "original_max_position_embeddings", 8192, 1, 1L << 24, &om, rname, err, errlen)))
            return rc;
        if (!(hi > lo))
            return eng__fail(err, errlen, ENG_EFORMAT, "%s: rope_scaling needs high_freq_factor > low_freq_factor", name);
        cfg->rope_scaling = ENG_ROPE_LLAMA3;
        cfg->rope_low_freq_factor = (float)lo;
        cfg->rope_high_freq_factor = (float)hi;
        cfg->rope_original_max = (int)om;
    }
    return ENG_OK;
}

/* The model types we run, and what each adds to the LLaMA layer. */
static const char *const TYPES[] = {"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "qwen3_moe", "mixtral"};

static int type_known(const char *t) {
    for (size_t i = 0; i < sizeof TYPES / sizeof *TYPES; i++)
        if (!strcmp(t, TYPES[i])) return 1;
    return 0;
}

/* Which layers slide. An explicit layer_types list ("sliding_attention" /
 * "full_attention", as recent transformers write it) wins; else each family's
 * rule: Mistral every layer when sliding_window is set; Qwen with
 * use_sliding_window the layers from max_window_layers on; Gemma 3 all but
 * every sliding_window_pattern-th. A window no shorter than the context
 * slides nothing. */
static int sliding_layers(const cJSON *o, eng_config *cfg, const char *type, const char *name, char *err,
                          size_t errlen) {
    const cJSON *sw = cJSON_GetObjectItemCaseSensitive(o, "sliding_window");
    int gemma = !strcmp(type, "gemma3_text"), qwen = !strncmp(type, "qwen", 4);
    if (qwen && !cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(o, "use_sliding_window"))) return ENG_OK;
    long w = gemma ? 4096 : 0;
    int rc;
    if (sw && !cJSON_IsNull(sw) && (rc = get_int(o, "sliding_window", 0, 1, 1L << 24, &w, name, err, errlen))) return rc;
    if (w <= 0 || w >= cfg->max_position) return ENG_OK;
    const cJSON *lt = cJSON_GetObjectItemCaseSensitive(o, "layer_types");
    long pattern = 6, first = 0;
    if (gemma) {
        const char *key = cJSON_GetObjectItemCaseSensitive(o, "sliding_window_pattern") ? "sliding_window_pattern"
                                                                                         : "_sliding_window_pattern";
        if ((rc = get_int(o, key, 6, 1, 1 << 20, &pattern, name, err, errlen))) return rc;
    } else if (qwen && (rc = get_int(o, "max_window_layers", cfg->n_layers, 0, 1 << 20, &first, name, err, errlen))) {
        return rc;
    }
    if (lt && !cJSON_IsNull(lt) && (!cJSON_IsArray(lt) || cJSON_GetArraySize(lt) != cfg->n_layers))
        return eng__fail(err, errlen, ENG_EFORMAT, "%s: layer_types must list num_hidden_layers (%d) entries", name,
                         cfg->n_layers);
    for (int l = 0; l < cfg->n_layers; l++) {
        int slides;
        if (cJSON_IsArray(lt)) {
            const cJSON *t = cJSON_GetArrayItem(lt, l);
            const char *ts = cJSON_IsString(t) ? t->valuestring : "";
            if (strcmp(ts, "sliding_attention") && strcmp(ts, "full_attention"))
                return eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: layer_types[%d] \"%s\" is not supported "
                                 "(sliding_attention, full_attention)", name, l, ts);
            slides = !strcmp(ts, "sliding_attention");
        } else {
            slides = gemma ? (l + 1) % pattern != 0 : l >= first;
        }
        if (slides) {
            cfg->layer_flags[l] |= ENG_LAYER_SLIDING;
            cfg->n_sliding++;
        }
    }
    if (cfg->n_sliding) cfg->sliding_window = (int)w;
    return ENG_OK;
}

/* Gemma 3: the activation, the attention's query scale, soft-capping, the local RoPE base. */
static int gemma3(const cJSON *o, eng_config *cfg, const char *name, char *err, size_t errlen) {
    cfg->gemma = 1;
    const cJSON *act = cJSON_GetObjectItemCaseSensitive(o, "hidden_activation");
    if (!act || cJSON_IsNull(act)) act = cJSON_GetObjectItemCaseSensitive(o, "hidden_act");
    if (cJSON_IsString(act) && strcmp(act->valuestring, "gelu_pytorch_tanh"))
        return eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: hidden_activation \"%s\" is not supported (only "
                         "\"gelu_pytorch_tanh\")", name, act->valuestring);
    const cJSON *asc = cJSON_GetObjectItemCaseSensitive(o, "attn_logit_softcapping");
    if (asc && !cJSON_IsNull(asc))
        return eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: attn_logit_softcapping is not supported", name);
    double d = 0;
    int rc;
    if ((rc = get_num(o, "query_pre_attn_scalar", cfg->head_dim, 1e-6, 1e9, &d, name, err, errlen))) return rc;
    cfg->attn_scale = (float)(1.0 / sqrt(d));
    if ((rc = get_num(o, "final_logit_softcapping", 0, 0, 1e9, &d, name, err, errlen))) return rc;
    cfg->final_softcap = (float)d;
    if ((rc = get_num(o, "rope_local_base_freq", 10000.0, 1.0, 1e12, &d, name, err, errlen))) return rc;
    cfg->rope_local_theta = (float)d;
    return ENG_OK;
}

/* Mixture of experts: qwen3_moe (num_experts, moe_intermediate_size, norm_topk_prob,
 * decoder_sparse_step, mlp_only_layers) or mixtral (num_local_experts over
 * intermediate_size, always renormalised; every layer). */
static int experts(const cJSON *o, eng_config *cfg, const char *type, const char *name, char *err, size_t errlen) {
    int mixtral = !strcmp(type, "mixtral");
    long ne, nu, mf, step = 1;
    int rc;
    if ((rc = get_int(o, mixtral ? "num_local_experts" : "num_experts", LONG_MIN, 1, 4096, &ne, name, err, errlen)) ||
        (rc = get_int(o, "num_experts_per_tok", LONG_MIN, 1, 4096, &nu, name, err, errlen)))
        return rc;
    if (nu > ne)
        return eng__fail(err, errlen, ENG_EFORMAT, "%s: num_experts_per_tok %ld exceeds the %ld experts", name, nu, ne);
    if (mixtral) {
        mf = cfg->intermediate_size;
        cfg->moe_norm_topk = 1;
    } else {
        if ((rc = get_int(o, "moe_intermediate_size", LONG_MIN, 1, 1L << 20, &mf, name, err, errlen)) ||
            (rc = get_int(o, "decoder_sparse_step", 1, 1, 1 << 20, &step, name, err, errlen)))
            return rc;
        cfg->moe_norm_topk = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(o, "norm_topk_prob"));
    }
    cfg->n_experts = (int)ne;
    cfg->n_experts_used = (int)nu;
    cfg->moe_intermediate_size = (int)mf;
    for (int l = 0; l < cfg->n_layers; l++)
        if (mixtral || (l + 1) % step == 0) cfg->layer_flags[l] |= ENG_LAYER_MOE;
    const cJSON *only = cJSON_GetObjectItemCaseSensitive(o, "mlp_only_layers"), *it;
    if (mixtral || !only || cJSON_IsNull(only)) return ENG_OK;
    if (!cJSON_IsArray(only))
        return eng__fail(err, errlen, ENG_EFORMAT, "%s: mlp_only_layers must be a list of layer indices", name);
    cJSON_ArrayForEach(it, only) {
        if (!cJSON_IsNumber(it) || it->valuedouble < 0 || it->valuedouble >= cfg->n_layers ||
            it->valuedouble != floor(it->valuedouble))
            return eng__fail(err, errlen, ENG_EFORMAT, "%s: mlp_only_layers holds %g, not a layer index", name,
                             cJSON_IsNumber(it) ? it->valuedouble : -1.0);
        cfg->layer_flags[(int)it->valuedouble] &= (unsigned char)~ENG_LAYER_MOE;
    }
    return ENG_OK;
}

int eng__config_parse(const char *json, size_t len, const char *name, eng_config *cfg,
                      char *err, size_t errlen) {
    memset(cfg, 0, sizeof *cfg);
    cJSON *o = cJSON_ParseWithLength(json, len);
    if (!o || !cJSON_IsObject(o)) {
        cJSON_Delete(o);
        return eng__fail(err, errlen, ENG_EFORMAT, "%s: not a JSON object", name);
    }
    int rc = ENG_OK;
    const cJSON *mt = cJSON_GetObjectItemCaseSensitive(o, "model_type");
    const char *type = cJSON_IsString(mt) ? mt->valuestring : "llama";
    if (!strcmp(type, "gemma3") && cJSON_IsObject(cJSON_GetObjectItemCaseSensitive(o, "text_config"))) {
        rc = eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: model_type \"gemma3\" is Gemma 3 with vision, which is not "
                       "supported; its text-only checkpoints (model_type \"gemma3_text\", e.g. gemma-3-1b) are", name);
        goto out;
    }
    if (!type_known(type)) {
        rc = eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: model_type \"%s\" is not supported (llama, mistral, qwen2, "
                       "qwen3, gemma3_text, qwen3_moe, mixtral)", name, type);
        goto out;
    }
    snprintf(cfg->model_type, sizeof cfg->model_type, "%s", type);
    int gemma = !strcmp(type, "gemma3_text");
    const cJSON *act = cJSON_GetObjectItemCaseSensitive(o, "hidden_act");
    if (!gemma && cJSON_IsString(act) && strcmp(act->valuestring, "silu") != 0) {
        rc = eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: hidden_act \"%s\" is not supported (only \"silu\")",
                       name, act->valuestring);
        goto out;
    }
    if ((rc = rope_scaling(o, cfg, name, err, errlen))) goto out;
    int qwen2 = !strcmp(type, "qwen2"), qwen3 = !strncmp(type, "qwen3", 5);
    int abias = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(o, "attention_bias"));
    cfg->qkv_bias = qwen2 || abias;  /* Qwen2: q, k, v biases, none on o */
    cfg->o_bias = !qwen2 && abias;
    cfg->mlp_bias = !strcmp(type, "llama") && cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(o, "mlp_bias"));
    cfg->qk_norm = qwen3 || gemma;

    long v;
    const long BIG = 1L << 20;
#define INT_FIELD(key, def, lo, hi, dst) \
    if ((rc = get_int(o, key, def, lo, hi, &v, name, err, errlen)) != ENG_OK) goto out; \
    dst = (int)v;
    INT_FIELD("vocab_size", LONG_MIN, 1, 1L << 24, cfg->vocab_size);
    INT_FIELD("hidden_size", LONG_MIN, 1, BIG, cfg->hidden_size);
    INT_FIELD("num_hidden_layers", LONG_MIN, 1, 1024, cfg->n_layers);
    INT_FIELD("num_attention_heads", LONG_MIN, 1, 4096, cfg->n_heads);
    INT_FIELD("num_key_value_heads", cfg->n_heads, 1, 4096, cfg->n_kv_heads);
    INT_FIELD("intermediate_size", LONG_MIN, 1, BIG, cfg->intermediate_size);
    INT_FIELD("max_position_embeddings", 2048, 1, 1L << 24, cfg->max_position);
    long hd_def = gemma ? 256 : cfg->hidden_size / cfg->n_heads;
    INT_FIELD("head_dim", hd_def, 2, 4096, cfg->head_dim);
#undef INT_FIELD
    if (cfg->n_heads % cfg->n_kv_heads != 0) {
        rc = eng__fail(err, errlen, ENG_EFORMAT, "%s: num_attention_heads %d is not a multiple of num_key_value_heads %d",
                       name, cfg->n_heads, cfg->n_kv_heads);
        goto out;
    }
    if (cfg->head_dim % 2 != 0) {
        rc = eng__fail(err, errlen, ENG_EFORMAT, "%s: head_dim %d must be even for RoPE", name, cfg->head_dim);
        goto out;
    }
    double d = 0;
    if (cfg->rope_scaling == ENG_ROPE_DYNAMIC) { /* NTK-aware: the context grows by the factor */
        if (cfg->rope_factor < 1) {
            rc = eng__fail(err, errlen, ENG_EFORMAT, "%s: dynamic rope_scaling needs a factor >= 1", name);
            goto out;
        }
        cfg->rope_original_max = cfg->max_position;
        double grown = (double)cfg->max_position * cfg->rope_factor;
        cfg->max_position = grown > (double)(1 << 24) ? 1 << 24 : (int)grown;
    }
    if ((rc = get_num(o, "rope_theta", gemma ? 1000000.0 : 10000.0, 1.0, 1e12, &d, name, err, errlen)) != ENG_OK) goto out;
    cfg->rope_theta = (float)d;
    cfg->rope_local_theta = cfg->rope_theta;
    if ((rc = get_num(o, "rms_norm_eps", 1e-6, 0.0, 1.0, &d, name, err, errlen)) != ENG_OK) goto out;
    cfg->rms_eps = (float)d;
    cfg->attn_scale = (float)(1.0 / sqrt((double)cfg->head_dim));
    const cJSON *tie = cJSON_GetObjectItemCaseSensitive(o, "tie_word_embeddings");
    if (tie && !cJSON_IsBool(tie) && !cJSON_IsNull(tie)) {
        rc = eng__fail(err, errlen, ENG_EFORMAT, "%s: tie_word_embeddings must be true or false", name);
        goto out;
    }
    cfg->tie_embeddings = gemma && !tie ? 1 : cJSON_IsTrue(tie); /* Gemma ties unless told otherwise */
    if ((rc = get_tok_id(o, "bos_token_id", cfg->vocab_size, &cfg->bos_id, name, err, errlen)) != ENG_OK) goto out;
    if ((rc = get_tok_id(o, "eos_token_id", cfg->vocab_size, &cfg->eos_id, name, err, errlen)) != ENG_OK) goto out;
    if ((rc = eos_ids(o, cfg, name, err, errlen)) != ENG_OK) goto out;
    if (gemma && (rc = gemma3(o, cfg, name, err, errlen))) goto out;
    if ((!strcmp(type, "qwen3_moe") || !strcmp(type, "mixtral")) && (rc = experts(o, cfg, type, name, err, errlen)))
        goto out;
    if (strcmp(type, "llama") && (rc = sliding_layers(o, cfg, type, name, err, errlen))) goto out;
out:
    cJSON_Delete(o);
    return rc;
}
