/* model.c — open a model (a Hugging Face directory or a GGUF file): config,
 * tokenizer, weights (weights.c), the buffers a forward pass needs. */
#include "internal.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <math.h>
#include <stdlib.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

int eng_model_open(eng_model **out, const char *dir, const eng_options *opt, char *err, size_t errlen) {
    *out = NULL;
#ifdef __GLIBC__
    /* Matrices from 1 MiB up are mappings of their own, given back to the system when freed:
     * glibc's threshold would otherwise grow to the size of the first one freed, and the
     * F32 copies freed as each layer is converted would stay in the heap. */
    mallopt(M_MMAP_THRESHOLD, 1 << 20);
#endif
    eng_model *m = calloc(1, sizeof *m);
    if (!m) return eng__fail(err, errlen, ENG_ENOMEM, "out of memory");
    if (opt) m->opt = *opt;
    if (m->opt.n_threads <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        m->opt.n_threads = n > 0 ? (int)n : 1;
    }
    if (m->opt.max_batch_tokens <= 0) m->opt.max_batch_tokens = 512;

    char path[4096], *text = NULL;
    size_t len;
    eng__gguf gf;
    memset(&gf, 0, sizeof gf);
    int gguf = eng__is_gguf_path(dir), rc;
    struct stat sb;
    if (!gguf && stat(dir, &sb) == 0 && !S_ISDIR(sb.st_mode)) {
        rc = eng__fail(err, errlen, ENG_EFORMAT, "%s: not a model directory, nor a GGUF file (it does not start with "
                       "the GGUF magic)", dir);
        goto fail;
    }
    if (gguf) { /* one file: config, tokenizer and weights */
        snprintf(path, sizeof path, "%s", dir);
        cJSON *tj = NULL;
        if ((rc = eng__gguf_open(&gf, dir, err, errlen)) || (rc = eng__gguf_config(&gf.g, dir, &m->cfg, err, errlen)) ||
            (rc = eng__gguf_tokenizer(&gf.g, dir, &tj, err, errlen)))
            goto fail;
        rc = eng__tok_from_json(&m->tok, tj, dir, err, errlen);
        cJSON_Delete(tj);
        if (rc) goto fail;
    } else {
        snprintf(path, sizeof path, "%s/config.json", dir);
        if ((rc = eng__read_file(path, &text, &len, err, errlen))) goto fail;
        rc = eng__config_parse(text, len, path, &m->cfg, err, errlen);
        free(text);
        if (rc) goto fail;

        snprintf(path, sizeof path, "%s/generation_config.json", dir); /* optional: chat models' end-of-turn ids */
        if (access(path, F_OK) == 0) {
            if ((rc = eng__read_file(path, &text, &len, err, errlen))) goto fail;
            rc = eng__config_generation(text, len, path, &m->cfg, err, errlen);
            free(text);
            if (rc) goto fail;
        }

        snprintf(path, sizeof path, "%s/tokenizer.json", dir);
        if ((rc = eng_tok_open(&m->tok, path, err, errlen))) goto fail;
    }
    if (eng_tok_vocab_size(m->tok) > m->cfg.vocab_size) {
        rc = eng__fail(err, errlen, ENG_EFORMAT, "%s: tokenizer has %d ids but %s is %d", path,
                       eng_tok_vocab_size(m->tok), gguf ? "the embedding's row count" : "config.json vocab_size",
                       m->cfg.vocab_size);
        goto fail;
    }
    m->wkind = m->opt.bf16_weights ? ENG_WEIGHTS_BF16 : m->opt.weights;
    if (m->wkind == ENG_WEIGHTS_AUTO) { /* a Q8_0 file runs in Q8_0, a K-quant one in K-quants; else F32 */
        const gguf_tensor *t = gguf ? gguf_tensor_find(&gf.g, "blk.0.attn_q.weight") : NULL;
        m->wkind = t && t->type == GGML_Q8_0                              ? ENG_WEIGHTS_Q8_0
                   : t && (t->type == GGML_Q4_K || t->type == GGML_Q6_K) ? ENG_WEIGHTS_Q4_K
                                                                          : ENG_WEIGHTS_F32;
    }
    rc = eng__load_weights(m, dir, gguf ? &gf : NULL, err, errlen);
    eng__gguf_close(&gf); /* the weights are copied out */
    if (rc) goto fail;

    m->max_ctx = m->cfg.max_position;
    if (m->opt.max_context > 0 && m->opt.max_context < m->max_ctx) m->max_ctx = m->opt.max_context;
    const int B = 16;
    int nb = (m->max_ctx + B - 1) / B;
    m->kv_ids = malloc((size_t)nb * sizeof *m->kv_ids);
    m->rope[0] = fwd_rope_table(&m->cfg, m->max_ctx, 0);
    if (m->cfg.n_sliding && m->cfg.rope_local_theta != m->cfg.rope_theta)
        m->rope[1] = fwd_rope_table(&m->cfg, m->max_ctx, 1);
    m->scratch = fwd_scratch_new(&m->cfg, m->opt.max_batch_tokens, m->max_ctx, m->opt.n_threads);
    m->sampler = eng__sampler_new(m->cfg.vocab_size);
    m->pool = eng__pool_new(m->opt.n_threads > 64 ? 64 : m->opt.n_threads);
    size_t T = (size_t)m->opt.max_batch_tokens;
    m->logits = malloc(T * (size_t)m->cfg.vocab_size * sizeof(float));
    m->bpos = malloc(T * sizeof(int32_t));
    m->bseq = calloc(T, sizeof(int32_t));
    m->brows = malloc(T * sizeof(int32_t));
    if (!m->pool || !m->logits || !m->bpos || !m->bseq || !m->brows || !m->kv_ids || !m->rope[0] || (m->cfg.n_sliding && m->cfg.rope_local_theta != m->cfg.rope_theta && !m->rope[1]) || !m->scratch || !m->sampler ||
        kv_pool_init(&m->kv, nb, B, m->cfg.n_layers, m->cfg.n_kv_heads * m->cfg.head_dim, m->opt.kv_f16) != ENG_OK) {
        rc = eng__fail(err, errlen, ENG_ENOMEM, "out of memory for the KV cache and buffers");
        goto fail;
    }
    for (int i = 0; i < nb; i++) m->kv_ids[i] = i;
    /* The engine parallelises on its own threads, and OpenBLAS (attention
     * products inside those tasks) runs single-threaded: its idle threads
     * would otherwise spin in sched_yield against ours. */
    eng__blas_threads(1);
    *out = m;
    return ENG_OK;
fail:
    eng__gguf_close(&gf);
    eng_model_close(m);
    return rc;
}

void eng_model_close(eng_model *m) {
    if (!m) return;
    eng__free_weights(&m->w, &m->cfg);
    eng_tok_close(m->tok);
    free(m->rope[0]);
    free(m->rope[1]);
    free(m->kv_ids);
    kv_pool_free(&m->kv);
    fwd_scratch_free(m->scratch);
    eng__sampler_free(m->sampler);
    eng__pool_free(m->pool);
    free(m->logits);
    free(m->bpos);
    free(m->bseq);
    free(m->brows);
    free(m);
}

const char *eng_model_warning(const eng_model *m) { return m->warning[0] ? m->warning : NULL; }

const eng_config *eng_model_config(const eng_model *m) { return &m->cfg; }
int eng_model_weights(const eng_model *m) { return m->wkind; }
const eng_tok *eng_model_tok(const eng_model *m) { return m->tok; }
size_t eng_model_weight_bytes(const eng_model *m) { return m->w.bytes; }

int kv_pool_init(kv_pool *p, int n_blocks, int block_tokens, int n_layers, int kv_dim, int f16) {
    memset(p, 0, sizeof *p);
    p->n_blocks = n_blocks;
    p->block_tokens = block_tokens;
    p->n_layers = n_layers;
    p->kv_dim = kv_dim;
    p->f16 = f16 != 0;
    p->esz = f16 ? 2 : 4;
    p->block_elems = (size_t)2 * n_layers * block_tokens * kv_dim;
    p->mem = calloc((size_t)n_blocks * p->block_elems, p->esz);
    return p->mem ? ENG_OK : ENG_ENOMEM;
}

/* IEEE half <-> float, round to nearest even; overflow -> infinity. */
uint16_t eng__f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
    if (a >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0)); /* inf, NaN */
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);                                    /* >= 65520 */
    if (a < 0x38800000u) { /* below the smallest normal half: a multiple of 2^-24 */
        float v;
        memcpy(&v, &a, 4);
        return (uint16_t)(sign | (uint32_t)lrintf(v * 16777216.0f));
    }
    return (uint16_t)(sign | ((a + 0xfffu + ((a >> 13) & 1u) - (112u << 23)) >> 13));
}

void kv_put(const kv_pool *p, void *dst, const void *src, int n) {
    if (!p->f16) {
        memcpy(dst, src, (size_t)n * sizeof(float));
        return;
    }
    for (int i = 0; i < n; i++) {
        float v;
        memcpy(&v, (const char *)src + 4 * (size_t)i, 4);
        uint16_t h = eng__f32_to_f16(v);
        memcpy((char *)dst + 2 * (size_t)i, &h, 2);
    }
}

void kv_get(const kv_pool *p, const void *src, void *dst, int n) {
    if (!p->f16) {
        memcpy(dst, src, (size_t)n * sizeof(float));
        return;
    }
    float tmp[256];
    for (int i = 0; i < n; i += 256) { /* st_to_f32 reads bytes; its output must be aligned */
        int m = n - i < 256 ? n - i : 256;
        st_to_f32(ST_F16, (const uint8_t *)src + 2 * (size_t)i, tmp, (size_t)m);
        memcpy((char *)dst + 4 * (size_t)i, tmp, (size_t)m * 4);
    }
}

void kv_pool_free(kv_pool *p) {
    free(p->mem);
    memset(p, 0, sizeof *p);
}
