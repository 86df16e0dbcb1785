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

/* rope_scaling: null, {"rope_type" (or "type"): "default" | "linear" | "llama3", ...}. */
static int rope_scaling(const cJSON *o, eng_config *cfg, const char *name, char *err, size_t errlen) {
    const cJSON *rs = cJSON_GetObjectItemCaseSensitive(o, "rope_scaling");
    if (!rs || cJSON_IsNull(rs)) return ENG_OK;
    const cJSON *ty = cJSON_GetObjectItemCaseSensitive(rs, "rope_type");
    if (!ty) ty = cJSON_GetObjectItemCaseSensitive(rs, "type");
    const char *t = cJSON_IsString(ty) ? ty->valuestring : "?";
    if (!strcmp(t, "default")) return ENG_OK;
    if (strcmp(t, "linear") && strcmp(t, "llama3"))
        return eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: rope_scaling type \"%s\" is not supported (linear, llama3)",
                         name, t);
    double d;
    int rc;
    const char *rname = "rope_scaling";
    if ((rc = get_num(rs, "factor", 0, 1e-3, 1e6, &d, rname, err, errlen))) return rc;
    if (!(d > 0)) return eng__fail(err, errlen, ENG_EFORMAT, "%s: rope_scaling needs a positive factor", name);
    cfg->rope_factor = (float)d;
    cfg->rope_scaling = ENG_ROPE_LINEAR;
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
    if (strcmp(type, "llama") && strcmp(type, "mistral") && strcmp(type, "qwen2") && strcmp(type, "qwen3")) {
        rc = eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: model_type \"%s\" is not supported (llama, mistral, qwen2, "
                       "qwen3)", name, type);
        goto out;
    }
    snprintf(cfg->model_type, sizeof cfg->model_type, "%s", type);
    const cJSON *act = cJSON_GetObjectItemCaseSensitive(o, "hidden_act");
    if (cJSON_IsString(act) && strcmp(act->valuestring, "silu") != 0) {
        rc = eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: hidden_act \"%s\" is not supported (only \"silu\")",
                       name, act->valuestring);
        goto out;
    }
    if ((rc = rope_scaling(o, cfg, name, err, errlen))) goto out;
    int qwen2 = !strcmp(type, "qwen2"), qwen3 = !strcmp(type, "qwen3");
    int abias = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(o, "attention_bias"));
    cfg->qkv_bias = qwen2 || abias;  /* Qwen2: q, k, v biases, none on o */
    cfg->o_bias = !qwen2 && abias;
    cfg->mlp_bias = !qwen2 && !qwen3 && cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(o, "mlp_bias"));
    cfg->qk_norm = qwen3;
    /* sliding windows: Qwen's use_sliding_window, Mistral's sliding_window (a window no shorter
     * than the context slides nothing) */
    if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(o, "use_sliding_window"))) {
        rc = eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: use_sliding_window = true is not supported", name);
        goto out;
    }

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
    long hd_def = cfg->hidden_size / cfg->n_heads;
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
    double d;
    if ((rc = get_num(o, "rope_theta", 10000.0, 1.0, 1e12, &d, name, err, errlen)) != ENG_OK) goto out;
    cfg->rope_theta = (float)d;
    if ((rc = get_num(o, "rms_norm_eps", 1e-6, 0.0, 1.0, &d, name, err, errlen)) != ENG_OK) goto out;
    cfg->rms_eps = (float)d;
    const cJSON *tie = cJSON_GetObjectItemCaseSensitive(o, "tie_word_embeddings");
    if (tie && !cJSON_IsBool(tie) && !cJSON_IsNull(tie)) {
        rc = eng__fail(err, errlen, ENG_EFORMAT, "%s: tie_word_embeddings must be true or false", name);
        goto out;
    }
    cfg->tie_embeddings = cJSON_IsTrue(tie);
    if ((rc = get_tok_id(o, "bos_token_id", cfg->vocab_size, &cfg->bos_id, name, err, errlen)) != ENG_OK) goto out;
    if ((rc = get_tok_id(o, "eos_token_id", cfg->vocab_size, &cfg->eos_id, name, err, errlen)) != ENG_OK) goto out;
    if (!strcmp(type, "mistral") || !strcmp(type, "qwen2") || !strcmp(type, "qwen3")) {
        const cJSON *sw = cJSON_GetObjectItemCaseSensitive(o, "sliding_window");
        int used = !strcmp(type, "mistral") || cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(o, "use_sliding_window"));
        if (used && cJSON_IsNumber(sw) && sw->valuedouble < cfg->max_position) {
            rc = eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: sliding_window %.0f shorter than the context (%d) is not "
                           "supported", name, sw->valuedouble, cfg->max_position);
            goto out;
        }
    }
out:
    cJSON_Delete(o);
    return rc;
}
