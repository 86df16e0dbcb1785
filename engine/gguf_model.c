/* gguf_model.c — a GGUF model file as the Hugging Face directory it stands
 * for: its metadata as config.json, its tensor names as the checkpoint's,
 * its chat template. The weights themselves are read by weights.c.
 *
 * Architectures (general.architecture): llama (also Mistral and SmolLM
 * files, which llama.cpp writes as llama), qwen2, qwen3. llama.cpp stores a
 * llama file's q and k projections with each head's rows interleaved for
 * its RoPE of adjacent pairs; weights.c reads them back in the halves
 * order of transformers (and ours). */
#include "gguf.h"
#include "internal.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int eng__is_gguf_path(const char *path) {
    struct stat sb;
    if (stat(path, &sb) != 0 || !S_ISREG(sb.st_mode)) return 0;
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    char m[4];
    int is = fread(m, 1, 4, f) == 4 && !memcmp(m, "GGUF", 4);
    fclose(f);
    return is;
}

int eng__gguf_open(eng__gguf *f, const char *path, char *err, size_t errlen) {
    memset(f, 0, sizeof *f);
    int rc = eng__map_file(path, &f->map, &f->size, err, errlen);
    if (rc) return rc;
    rc = gguf_parse(f->map, f->size, path, &f->g, err, errlen);
    if (rc) eng__gguf_close(f);
    return rc;
}

void eng__gguf_close(eng__gguf *f) {
    gguf_free(&f->g);
    eng__unmap_file(f->map, f->size);
    memset(f, 0, sizeof *f);
}

/* ---- tensor names ---------------------------------------------------------- */
static const char *const LAYER_NAMES[][2] = {
    {"input_layernorm.weight", "attn_norm.weight"},
    {"post_attention_layernorm.weight", "ffn_norm.weight"},
    {"self_attn.q_proj.weight", "attn_q.weight"},
    {"self_attn.k_proj.weight", "attn_k.weight"},
    {"self_attn.v_proj.weight", "attn_v.weight"},
    {"self_attn.o_proj.weight", "attn_output.weight"},
    {"self_attn.q_proj.bias", "attn_q.bias"},
    {"self_attn.k_proj.bias", "attn_k.bias"},
    {"self_attn.v_proj.bias", "attn_v.bias"},
    {"self_attn.o_proj.bias", "attn_output.bias"},
    {"self_attn.q_norm.weight", "attn_q_norm.weight"},
    {"self_attn.k_norm.weight", "attn_k_norm.weight"},
    {"mlp.gate_proj.weight", "ffn_gate.weight"},
    {"mlp.up_proj.weight", "ffn_up.weight"},
    {"mlp.down_proj.weight", "ffn_down.weight"},
    {"mlp.gate_proj.bias", "ffn_gate.bias"},
    {"mlp.up_proj.bias", "ffn_up.bias"},
    {"mlp.down_proj.bias", "ffn_down.bias"},
};

const char *eng__gguf_name(const char *hf, char *buf, size_t n) {
    if (!strcmp(hf, "model.embed_tokens.weight")) return "token_embd.weight";
    if (!strcmp(hf, "model.norm.weight")) return "output_norm.weight";
    if (!strcmp(hf, "lm_head.weight")) return "output.weight";
    int l, used = 0;
    if (sscanf(hf, "model.layers.%d.%n", &l, &used) == 1 && used > 0)
        for (size_t i = 0; i < sizeof LAYER_NAMES / sizeof *LAYER_NAMES; i++)
            if (!strcmp(hf + used, LAYER_NAMES[i][0])) {
                snprintf(buf, n, "blk.%d.%s", l, LAYER_NAMES[i][1]);
                return buf;
            }
    return NULL;
}

int eng__gguf_permuted(const gguf_file *g) {
    const char *a;
    size_t n;
    return !gguf_str(g, "general.architecture", &a, &n) && n == 5 && !memcmp(a, "llama", 5);
}

/* ---- metadata -> config.json ------------------------------------------------ */
static int add_int(cJSON *o, const char *k, int64_t v) { return cJSON_AddNumberToObject(o, k, (double)v) != NULL; }

/* "{arch}.{suffix}" as an integer or a number, if present. */
static int arch_int(const gguf_file *g, const char *arch, const char *suffix, int64_t *v) {
    char key[160];
    snprintf(key, sizeof key, "%s.%s", arch, suffix);
    return gguf_int(g, key, v);
}

static int arch_num(const gguf_file *g, const char *arch, const char *suffix, double *v) {
    char key[160];
    snprintf(key, sizeof key, "%s.%s", arch, suffix);
    return gguf_num(g, key, v);
}

int eng__gguf_config(const gguf_file *g, const char *path, eng_config *cfg, char *err, size_t errlen) {
    const char *as;
    size_t an;
    if (gguf_str(g, "general.architecture", &as, &an))
        return eng__fail(err, errlen, ENG_EFORMAT, "%s: no general.architecture", path);
    char arch[32];
    snprintf(arch, sizeof arch, "%.*s", (int)(an < 31 ? an : 31), as);
    if (an > 31 || (strcmp(arch, "llama") && strcmp(arch, "qwen2") && strcmp(arch, "qwen3")))
        return eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: GGUF architecture \"%s\" is not supported yet (llama, "
                         "qwen2, qwen3; the same models as safetensors directories load in every architecture kvserve "
                         "runs)", path, arch);
    const gguf_tensor *emb = gguf_tensor_find(g, "token_embd.weight");
    if (!emb || emb->n_dims != 2)
        return eng__fail(err, errlen, ENG_EFORMAT, "%s: tensor \"token_embd.weight\" is missing or not a matrix", path);
    int64_t H, L, F, nh, nkv, ctx, hd = 0, vd = 0, rd = 0, bos, eos;
    double eps, theta = 10000.0, d;
    struct { const char *key; int64_t *v; } need[] = {{"embedding_length", &H}, {"block_count", &L},
        {"feed_forward_length", &F}, {"attention.head_count", &nh}, {"context_length", &ctx}};
    for (size_t i = 0; i < sizeof need / sizeof *need; i++)
        if (arch_int(g, arch, need[i].key, need[i].v))
            return eng__fail(err, errlen, ENG_EFORMAT, "%s: metadata %s.%s is missing or not an integer", path, arch,
                             need[i].key);
    if (arch_num(g, arch, "attention.layer_norm_rms_epsilon", &eps))
        return eng__fail(err, errlen, ENG_EFORMAT, "%s: metadata %s.attention.layer_norm_rms_epsilon is missing or not "
                         "a number", path, arch);
    if (arch_int(g, arch, "attention.head_count_kv", &nkv)) nkv = nh;
    arch_num(g, arch, "rope.freq_base", &theta);
    if (!arch_int(g, arch, "attention.key_length", &hd) && !arch_int(g, arch, "attention.value_length", &vd) && vd != hd)
        return eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: key_length %lld and value_length %lld differ", path,
                         (long long)hd, (long long)vd);
    if (!hd && nh > 0) hd = H / nh;
    if (!arch_int(g, arch, "rope.dimension_count", &rd) && rd != hd)
        return eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: RoPE over %lld of a head's %lld dimensions (partial rotary) "
                         "is not supported", path, (long long)rd, (long long)hd);
    cJSON *o = cJSON_CreateObject();
    int ok = o && cJSON_AddStringToObject(o, "model_type", arch) && add_int(o, "hidden_size", H) &&
             add_int(o, "num_hidden_layers", L) && add_int(o, "intermediate_size", F) &&
             add_int(o, "num_attention_heads", nh) && add_int(o, "num_key_value_heads", nkv) && add_int(o, "head_dim", hd) &&
             add_int(o, "max_position_embeddings", ctx) && cJSON_AddNumberToObject(o, "rms_norm_eps", eps) &&
             cJSON_AddNumberToObject(o, "rope_theta", theta) && add_int(o, "vocab_size", (int64_t)emb->ne[1]) &&
             cJSON_AddBoolToObject(o, "tie_word_embeddings", !gguf_tensor_find(g, "output.weight"));
    if (ok && !strcmp(arch, "llama"))
        ok = cJSON_AddBoolToObject(o, "attention_bias", gguf_tensor_find(g, "blk.0.attn_q.bias") != NULL) &&
             cJSON_AddBoolToObject(o, "mlp_bias", gguf_tensor_find(g, "blk.0.ffn_gate.bias") != NULL);
    if (ok && !gguf_int(g, "tokenizer.ggml.bos_token_id", &bos)) ok = add_int(o, "bos_token_id", bos);
    if (ok) { /* the end of a text, and of a turn (eot, eom) */
        cJSON *e = cJSON_AddArrayToObject(o, "eos_token_id");
        const char *keys[] = {"tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"};
        ok = e != NULL;
        for (int i = 0; ok && i < 3; i++)
            if (!gguf_int(g, keys[i], &eos) && eos >= 0) ok = cJSON_AddItemToArray(e, cJSON_CreateNumber((double)eos));
    }
    const char *st;
    size_t sn;
    char key[160];
    snprintf(key, sizeof key, "%s.rope.scaling.type", arch);
    if (ok && !gguf_str(g, key, &st, &sn) && !(sn == 4 && !memcmp(st, "none", 4))) {
        if (!(sn == 6 && !memcmp(st, "linear", 6))) {
            cJSON_Delete(o);
            return eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: RoPE scaling \"%.*s\" is not supported in GGUF files "
                             "yet (linear is)", path, (int)(sn > 32 ? 32 : sn), st);
        }
        if (arch_num(g, arch, "rope.scaling.factor", &d)) d = 1.0;
        cJSON *rs = cJSON_AddObjectToObject(o, "rope_scaling");
        ok = rs && cJSON_AddStringToObject(rs, "rope_type", "linear") && cJSON_AddNumberToObject(rs, "factor", d);
    }
    char *text = ok ? cJSON_PrintUnformatted(o) : NULL;
    cJSON_Delete(o);
    if (!text) return eng__fail(err, errlen, ENG_ENOMEM, "%s: out of memory", path);
    int rc = eng__config_parse(text, strlen(text), path, cfg, err, errlen);
    free(text);
    if (rc) return rc;
    /* rope_freqs: a divisor per frequency (how llama.cpp writes Llama 3.1's RoPE scaling) */
    const gguf_tensor *ff = gguf_tensor_find(g, "rope_freqs.weight");
    if (ff) {
        int half = cfg->head_dim / 2;
        if (ff->type != GGML_F32 || ff->n_dims != 1 || ff->ne[0] != (uint64_t)half || half > 256)
            return eng__fail(err, errlen, ENG_EFORMAT, "%s: tensor \"rope_freqs.weight\" must be %d F32 values (half the "
                             "head dimension)", path, half);
        if (cfg->rope_scaling != ENG_ROPE_NONE)
            return eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: both rope_freqs and a RoPE scaling type", path);
        memcpy(cfg->rope_ff, ff->data, (size_t)half * sizeof(float));
        for (int j = 0; j < half; j++)
            if (!(cfg->rope_ff[j] > 0) || !isfinite(cfg->rope_ff[j]))
                return eng__fail(err, errlen, ENG_EFORMAT, "%s: rope_freqs.weight[%d] is not a positive number", path, j);
        cfg->rope_scaling = ENG_ROPE_FACTORS;
    }
    return ENG_OK;
}

/* ---- chat ----------------------------------------------------------------- */
static char *token_text(const gguf_file *g, const char *key) {
    int64_t id;
    const gguf_kv *toks = gguf_get(g, "tokenizer.ggml.tokens");
    if (gguf_int(g, key, &id) || !toks || toks->type != GGUF_ARRAY || toks->arr_type != GGUF_STRING || id < 0 ||
        (uint64_t)id >= toks->n)
        return NULL;
    const uint8_t *p = toks->val;
    const char *s = NULL;
    size_t n = 0;
    for (int64_t i = 0; i <= id; i++) gguf_next_str(&p, &s, &n);
    char *d = malloc(n + 1);
    if (d) {
        memcpy(d, s, n);
        d[n] = 0;
    }
    return d;
}

int eng__gguf_chat(const gguf_file *g, const char *path, char **tpl, char **bos, char **eos, char *err, size_t errlen) {
    const char *s;
    size_t n;
    *tpl = *bos = *eos = NULL;
    if (gguf_str(g, "tokenizer.chat_template", &s, &n))
        return eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s has no chat_template (tokenizer.chat_template)", path);
    if (memchr(s, 0, n)) return eng__fail(err, errlen, ENG_EFORMAT, "%s: the chat template holds a NUL byte", path);
    if (!(*tpl = malloc(n + 1))) return eng__fail(err, errlen, ENG_ENOMEM, "out of memory");
    memcpy(*tpl, s, n);
    (*tpl)[n] = 0;
    *bos = token_text(g, "tokenizer.ggml.bos_token_id");
    *eos = token_text(g, "tokenizer.ggml.eos_token_id");
    return ENG_OK;
}
