/* model.c — open a Hugging Face model directory: config, weights, tokenizer. */
#define _DEFAULT_SOURCE 1 /* madvise */
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

/* One mapped safetensors file. */
typedef struct {
    char *path;
    uint8_t *map;
    size_t size;
    st_file st;
} wfile;

/* A matrix's rows as the GGUF file holds them (ENG_WEIGHTS_Q4_K): their
 * formats, and the blocks of those in Q4_K or Q6_K, so the matrix can be
 * repacked from the file's integers rather than requantized from F32. */
typedef struct {
    const eng__mat *m;
    const float *base; /* the matrix's F32 buffer while loading */
    int64_t rows, cols;
    size_t stride;     /* bytes of a row in raw: cols / 256 blocks of the largest format */
    uint8_t *type;     /* [rows] GGML_* of each row's tensor */
    uint8_t *raw;      /* [rows][stride], allocated when a K-quant tensor arrives */
} kcap;

#define MAX_CAPS 8

typedef struct {
    wfile *f;
    int n;
    int keep_k;             /* ENG_WEIGHTS_Q4_K from a GGUF file: capture the matrices' blocks */
    kcap cap[MAX_CAPS];
    int ncap;
    const eng__gguf *gg;    /* or the tensors of a GGUF file */
    const char *gpath;      /* ... at this path */
    const eng_config *cfg;  /* (for the heads of q and k in a GGUF file) */
    char *warning;          /* the model's: the first tensor with values that are not finite */
    size_t warning_len;
} wset;

static void cap_drop(kcap *c) {
    free(c->type);
    free(c->raw);
    memset(c, 0, sizeof *c);
}

static void wset_free(wset *s) {
    for (int i = 0; i < s->ncap; i++) cap_drop(&s->cap[i]);
    for (int i = 0; i < s->n; i++) {
        st_free(&s->f[i].st);
        eng__unmap_file(s->f[i].map, s->f[i].size);
        free(s->f[i].path);
    }
    free(s->f);
    memset(s, 0, sizeof *s);
}

static int wset_add(wset *s, const char *path, char *err, size_t errlen) {
    for (int i = 0; i < s->n; i++)
        if (strcmp(s->f[i].path, path) == 0) return ENG_OK;
    wfile *nf = realloc(s->f, (size_t)(s->n + 1) * sizeof *nf);
    if (!nf) return eng__fail(err, errlen, ENG_ENOMEM, "out of memory");
    s->f = nf;
    wfile *f = &s->f[s->n];
    memset(f, 0, sizeof *f);
    int rc = eng__map_file(path, &f->map, &f->size, err, errlen);
    if (rc) return rc;
    if (!(f->path = strdup(path))) {
        eng__unmap_file(f->map, f->size);
        return eng__fail(err, errlen, ENG_ENOMEM, "out of memory");
    }
    s->n++;
    return st_parse(f->map, f->size, path, &f->st, err, errlen);
}

/* A tensor's pages of the mapped file, read once, leave the resident set (a
 * private read-only mapping: touched again, they are read again). */
static void drop_pages(const void *p, size_t n) {
    long ps = sysconf(_SC_PAGESIZE);
    if (ps <= 0 || !n) return;
    uintptr_t a = (uintptr_t)p / (uintptr_t)ps * (uintptr_t)ps, e = (uintptr_t)p + n;
    madvise((void *)a, e - a, MADV_DONTNEED);
}

static void check_finite(wset *s, const char *file, const char *name, const float *dst, size_t n) {
    size_t bad = 0;
    for (size_t k = 0; k < n; k++) bad += !isfinite(dst[k]);
    if (bad && !s->warning[0]) /* it loads (the file is well formed), but its output will be garbage */
        snprintf(s->warning, s->warning_len, "%s: tensor \"%s\": %zu of %zu values are not finite (NaN or "
                 "infinite): the model will compute nonsense", file, name, bad, n);
}

/* The tensor t of d0 rows is going to dst: if that is in a captured matrix,
 * note its rows' format and keep its K-quant blocks, rows in our order
 * (permuted: llama's q or k, whose rows the file interleaves per head). */
static int cap_rows(wset *s, const float *dst, const gguf_tensor *t, int64_t d0, int64_t d1, int permuted) {
    kcap *c = NULL;
    for (int i = 0; i < s->ncap && !c; i++)
        if (dst >= s->cap[i].base && dst < s->cap[i].base + s->cap[i].rows * s->cap[i].cols) c = &s->cap[i];
    if (!c || c->cols != d1) return ENG_OK;
    int64_t r0 = (dst - c->base) / c->cols;
    if (r0 + d0 > c->rows) return ENG_OK;
    memset(c->type + r0, (int)t->type, (size_t)d0);
    if (t->type != GGML_Q4_K && t->type != GGML_Q6_K) return ENG_OK;
    if (!c->raw && !(c->raw = malloc((size_t)c->rows * c->stride))) return ENG_ENOMEM;
    size_t rb = (size_t)(d1 / 256) * (t->type == GGML_Q4_K ? 144 : 210);
    int hd = s->cfg->head_dim;
    for (int64_t r = 0; r < d0; r++) {
        int64_t to = r;
        if (permuted) { /* within a head: file row 2i is our row i, 2i + 1 is i + hd/2 */
            int64_t h = r / hd * hd, i = r % hd;
            to = h + (i % 2 ? hd / 2 + i / 2 : i / 2);
        }
        memcpy(c->raw + (size_t)(r0 + to) * c->stride, t->data + (size_t)r * rb, rb);
    }
    return ENG_OK;
}

/* A tensor of a GGUF file under its checkpoint name: its shape (innermost
 * dimension first there) checked, converted to F32 into dst, q and k rows
 * back in the halves order. */
static int load_gguf_tensor(wset *s, const char *name, int64_t d0, int64_t d1, float *dst, eng_config *cfg,
                            char *err, size_t errlen) {
    const char *path = s->gpath;
    char buf[160];
    const char *gn = eng__gguf_name(name, buf, sizeof buf);
    const gguf_tensor *t = gn ? gguf_tensor_find(&s->gg->g, gn) : NULL;
    if (!t) return eng__fail(err, errlen, ENG_EFORMAT, "%s: tensor \"%s\" (%s) is missing", path, gn ? gn : name, name);
    int ndim = d1 ? 2 : 1;
    uint64_t want0 = (uint64_t)(d1 ? d1 : d0), want1 = d1 ? (uint64_t)d0 : 1;
    if ((int)t->n_dims != ndim || t->ne[0] != want0 || t->ne[1] != want1)
        return eng__fail(err, errlen, ENG_EFORMAT, "%s: tensor \"%s\" has shape [%llu, %llu] (innermost first), "
                         "expected [%llu, %llu]", path, gn, (unsigned long long)t->ne[0],
                         (unsigned long long)(t->n_dims > 1 ? t->ne[1] : 1), (unsigned long long)want0,
                         (unsigned long long)want1);
    snprintf(cfg->dtype, sizeof cfg->dtype, "%s", gguf_type_name(t->type));
    int is_q = strstr(gn, ".attn_q.") != NULL, is_k = strstr(gn, ".attn_k.") != NULL;
    int permuted = (is_q || is_k) && eng__gguf_permuted(&s->gg->g);
    if (d1 && cap_rows(s, dst, t, d0, d1, permuted)) return eng__fail(err, errlen, ENG_ENOMEM, "out of memory");
    size_t n = (size_t)d0 * (size_t)(d1 ? d1 : 1);
    /* a chunk at a time, its file pages dropped as it is read: the mapping
     * and the F32 copy of a large tensor are never resident together */
    size_t blk_e, blk_b, step = (size_t)1 << 20; /* elements per chunk: whole blocks */
    gguf_block(t->type, &blk_e, &blk_b);          /* (a type the parser accepted) */
    for (size_t k = 0; k < n; k += step) {
        size_t m = n - k < step ? n - k : step;
        gguf_to_f32(t->type, t->data + k / blk_e * blk_b, dst + k, m);
        drop_pages(t->data + k / blk_e * blk_b, m / blk_e * blk_b);
    }
    if (permuted) {
        int hd = s->cfg->head_dim;
        int64_t cols = d1 ? d1 : 1;
        float *tmp = malloc((size_t)hd * (size_t)cols * sizeof *tmp);
        if (!tmp) return eng__fail(err, errlen, ENG_ENOMEM, "out of memory");
        eng__gguf_unpermute(dst, d0, cols, hd, tmp);
        free(tmp);
    }
    check_finite(s, path, gn, dst, n);
    return ENG_OK;
}

/* Find a tensor by name in any file of the set, check its shape, convert it
 * to F32 into dst. */
static int load_tensor(wset *s, const char *name, int64_t d0, int64_t d1, float *dst,
                       eng_config *cfg, char *err, size_t errlen) {
    if (s->gg) return load_gguf_tensor(s, name, d0, d1, dst, cfg, err, errlen);
    for (int i = 0; i < s->n; i++) {
        const st_tensor *t = st_find(&s->f[i].st, name);
        if (!t) continue;
        int ndim = d1 ? 2 : 1;
        if (t->ndim != ndim || t->shape[0] != d0 || (ndim == 2 && t->shape[1] != d1)) {
            char got[96] = "", *p = got;
            for (int k = 0; k < t->ndim; k++)
                p += snprintf(p, sizeof got - (size_t)(p - got), "%s%lld", k ? ", " : "", (long long)t->shape[k]);
            if (ndim == 2)
                return eng__fail(err, errlen, ENG_EFORMAT, "%s: tensor \"%s\" has shape [%s], expected [%lld, %lld]",
                                 s->f[i].path, name, got, (long long)d0, (long long)d1);
            return eng__fail(err, errlen, ENG_EFORMAT, "%s: tensor \"%s\" has shape [%s], expected [%lld]",
                             s->f[i].path, name, got, (long long)d0);
        }
        static const char *names[] = {"F32", "F16", "BF16"};
        snprintf(cfg->dtype, sizeof cfg->dtype, "%s", names[t->dtype]);
        size_t n = (size_t)d0 * (size_t)(d1 ? d1 : 1);
        size_t es = t->dtype == ST_F32 ? 4 : 2, step = (size_t)1 << 20; /* a chunk at a time, as above */
        for (size_t k = 0; k < n; k += step) {
            size_t m = n - k < step ? n - k : step;
            st_to_f32(t->dtype, t->data + k * es, dst + k, m);
            drop_pages(t->data + k * es, m * es);
        }
        check_finite(s, s->f[i].path, name, dst, n);
        return ENG_OK;
    }
    return eng__fail(err, errlen, ENG_EFORMAT, "%s%s: tensor \"%s\" is missing", s->n ? s->f[0].path : "weights",
                     s->n > 1 ? " (and other shards)" : "", name);
}

/* Collect weight files: model.safetensors, or the shards named by
 * model.safetensors.index.json. */
static int open_weight_files(wset *s, const char *dir, char *err, size_t errlen) {
    char path[4096];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    if (access(path, F_OK) != 0) {
        snprintf(path, sizeof path, "%s/model.safetensors", dir);
        if (access(path, F_OK) != 0)
            return eng__fail(err, errlen, ENG_EIO, "%s: no model.safetensors or model.safetensors.index.json", dir);
        return wset_add(s, path, err, errlen);
    }
    char *text;
    size_t len;
    int rc = eng__read_file(path, &text, &len, err, errlen);
    if (rc) return rc;
    cJSON *idx = cJSON_ParseWithLength(text, len);
    free(text);
    const cJSON *wm = cJSON_GetObjectItemCaseSensitive(idx, "weight_map");
    if (!cJSON_IsObject(wm)) {
        cJSON_Delete(idx);
        return eng__fail(err, errlen, ENG_EFORMAT, "%s: no \"weight_map\" object", path);
    }
    const cJSON *it;
    cJSON_ArrayForEach(it, wm) {
        if (!cJSON_IsString(it) || strchr(it->valuestring, '/') || it->valuestring[0] == '.') {
            rc = eng__fail(err, errlen, ENG_EFORMAT, "%s: weight_map entry \"%s\" is not a file name in the directory",
                           path, it->string);
            break;
        }
        char shard[4096];
        snprintf(shard, sizeof shard, "%s/%s", dir, it->valuestring);
        if ((rc = wset_add(s, shard, err, errlen)) != ENG_OK) break;
        int found = 0;
        for (int i = 0; i < s->n && !found; i++)
            if (strcmp(s->f[i].path, shard) == 0) found = st_find(&s->f[i].st, it->string) != NULL;
        if (!found) {
            rc = eng__fail(err, errlen, ENG_EFORMAT, "%s: tensor \"%s\" is not in %s as the index says", path,
                           it->string, it->valuestring);
            break;
        }
    }
    cJSON_Delete(idx);
    return rc;
}

void eng__free_weights(eng__weights *w, const eng_config *c) {
    if (w->layers)
        for (int l = 0; l < c->n_layers; l++) {
            eng__layer *L = &w->layers[l];
            free(L->attn_norm); eng__mat_free(&L->wqkv); eng__mat_free(&L->wo); free(L->ffn_norm);
            eng__mat_free(&L->w13); eng__mat_free(&L->w2);
            free(L->bqkv); free(L->bo); free(L->b13); free(L->b2); free(L->q_norm); free(L->k_norm);
            free(L->post_attn_norm); free(L->post_ffn_norm); eng__mat_free(&L->router);
            for (int e = 0; e < c->n_experts && L->ew13; e++) eng__mat_free(&L->ew13[e]);
            for (int e = 0; e < c->n_experts && L->ew2; e++) eng__mat_free(&L->ew2[e]);
            free(L->ew13); free(L->ew2);
        }
    if (w->lm_head.p != w->embed.p) eng__mat_free(&w->lm_head);
    eng__mat_free(&w->embed);
    free(w->layers);
    free(w->norm);
    memset(w, 0, sizeof *w);
}

static float *walloc(eng__weights *w, size_t n) {
    w->bytes += n * sizeof(float);
    return malloc(n * sizeof(float));
}

/* F32 -> BF16, round to nearest even (NaN stays NaN). */
static uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* In place: element i moves from byte 4i to byte 2i (read before written,
 * as 2i <= 4i), then the buffer shrinks to half and the rest goes back. */
static int mat_to_bf16(eng__weights *w, eng__mat *m, size_t n) {
    if (m->bf16) return ENG_OK;
    const float *f = m->p;
    uint16_t *h = m->p;
    for (size_t i = 0; i < n; i++) {
        float v = f[i];
        h[i] = to_bf16(v);
    }
    void *shrunk = realloc(m->p, n * sizeof *h);
    if (shrunk) m->p = shrunk;
    m->bf16 = 1;
    w->bytes -= n * (sizeof(float) - sizeof *h);
    return ENG_OK;
}

static int convert_k(wset *s, eng__weights *w, eng__mat *m, int out, int in);

/* A packed F32 matrix to the weights' kind (F32: as it is). */
static int convert_mat(wset *s, eng__weights *w, eng__mat *m, int kind, int out, int in) {
    if (kind == ENG_WEIGHTS_BF16) return mat_to_bf16(w, m, eng__mat_elems(out, in));
    if (kind == ENG_WEIGHTS_Q8_0) return eng__mat_to_q8(w, m, out, in);
    if (kind == ENG_WEIGHTS_Q4_K) return convert_k(s, w, m, out, in);
    return ENG_OK;
}

/* Layer l's matrices to kind, as soon as the layer is loaded and hashed: the
 * F32 copy of the whole model never exists at once. */
static int convert_layer(wset *s, eng__weights *w, const eng_config *c, int l, int kind) {
    int H = c->hidden_size, F = c->intermediate_size, Fe = c->moe_intermediate_size;
    int QD = c->n_heads * c->head_dim, KD = c->n_kv_heads * c->head_dim;
    eng__layer *L = &w->layers[l];
    if (convert_mat(s, w, &L->wqkv, kind, QD + 2 * KD, H) || convert_mat(s, w, &L->wo, kind, H, QD)) return ENG_ENOMEM;
    if (L->w13.p && (convert_mat(s, w, &L->w13, kind, 2 * F, H) || convert_mat(s, w, &L->w2, kind, H, F)))
        return ENG_ENOMEM;
    for (int e = 0; L->ew13 && e < c->n_experts; e++) /* the router stays F32: it picks the experts */
        if (convert_mat(s, w, &L->ew13[e], kind, 2 * Fe, H) || convert_mat(s, w, &L->ew2[e], kind, H, Fe))
            return ENG_ENOMEM;
    s->ncap = 0; /* (every capture was dropped) */
#ifdef __GLIBC__
    malloc_trim(0); /* the freed F32 of heap-allocated matrices goes back to the system */
#endif
    return ENG_OK;
}

/* Gemma's RMSNorm scales by 1 + w: store it that way (the same float32 sum
 * the published model computes), so every norm is x / rms(x) * w'. */
static void plus_one(float *w, int64_t n) {
    for (int64_t i = 0; i < n; i++) w[i] = 1.0f + w[i];
}

/* A [rows][cols] matrix to be packed, F32 while loading. */
static int mat_alloc(eng__weights *w, eng__mat *m, int64_t rows, int64_t cols) {
    m->p = walloc(w, eng__mat_elems((int)rows, (int)cols));
    return m->p ? ENG_OK : ENG_ENOMEM;
}

/* ... whose rows' GGUF blocks are captured (s->keep_k). */
static int mat_alloc_cap(wset *s, eng__weights *w, eng__mat *m, int64_t rows, int64_t cols) {
    if (mat_alloc(w, m, rows, cols)) return ENG_ENOMEM;
    if (!s->keep_k || s->ncap == MAX_CAPS) return ENG_OK;
    kcap *c = &s->cap[s->ncap];
    *c = (kcap){m, m->p, rows, cols, (size_t)(cols / 256) * 210, calloc((size_t)rows, 1), NULL};
    if (!c->type) return ENG_ENOMEM;
    s->ncap++;
    return ENG_OK;
}

/* Matrix m in K-quants: from the file's blocks where every row has them (and
 * each panel one format); from the file's values where they are Q8_0 (which
 * requantizing gives back); else quantized by us, to Q4_K, or to Q8_0 when
 * its rows are not whole super-blocks. The capture is dropped. */
static int convert_k(wset *s, eng__weights *w, eng__mat *m, int out, int in) {
    kcap *c = NULL;
    for (int i = 0; i < s->ncap && !c; i++)
        if (s->cap[i].m == m) c = &s->cap[i];
    int rc = ENG_EFORMAT, all_q8 = c != NULL;
    if (c) {
        for (int64_t r = 0; r < c->rows; r++) all_q8 &= c->type[r] == GGML_Q8_0;
        if (c->raw) rc = eng__mat_to_k(w, m, out, in, c->raw, c->stride, c->type);
        cap_drop(c);
        if (rc != ENG_EFORMAT) return rc;
    }
    if (all_q8 || in % 256) return eng__mat_to_q8(w, m, out, in);
    size_t nsb = (size_t)in / 256, stride = nsb * 144;
    uint8_t *raw = malloc((size_t)out * stride), *types = malloc((size_t)out);
    float *row = malloc((size_t)in * sizeof *row);
    if (!raw || !types || !row) rc = ENG_ENOMEM;
    for (int r = 0; r < out && rc != ENG_ENOMEM; r++) {
        eng__mat_row(m, (size_t)r, in, row);
        for (size_t b = 0; b < nsb; b++) eng__k4_quantize(row + b * 256, raw + (size_t)r * stride + b * 144);
        types[r] = GGML_Q4_K;
    }
    if (rc != ENG_ENOMEM) rc = eng__mat_to_k(w, m, out, in, raw, stride, types);
    free(raw);
    free(types);
    free(row);
    return rc;
}

/* One mixture-of-experts layer: the router and every expert's gate, up and
 * down projections (qwen3_moe: mlp.gate, mlp.experts.E.{gate,up,down}_proj;
 * mixtral: block_sparse_moe.gate, block_sparse_moe.experts.E.{w1,w3,w2}). */
static int load_experts(wset *s, eng_model *m, int l, char *err, size_t errlen) {
    eng_config *c = &m->cfg;
    eng__weights *w = &m->w;
    eng__layer *L = &w->layers[l];
    const int64_t H = c->hidden_size, E = c->n_experts, Fe = c->moe_intermediate_size;
    int mixtral = !strcmp(c->model_type, "mixtral");
    const char *base = mixtral ? "block_sparse_moe" : "mlp";
    const char *gate = mixtral ? "w1" : "gate_proj", *up = mixtral ? "w3" : "up_proj", *down = mixtral ? "w2" : "down_proj";
    char n[160];
    int rc;
    L->ew13 = calloc((size_t)E, sizeof *L->ew13);
    L->ew2 = calloc((size_t)E, sizeof *L->ew2);
    if (!L->ew13 || !L->ew2 || mat_alloc(w, &L->router, E, H))
        return eng__fail(err, errlen, ENG_ENOMEM, "out of memory for the experts");
    snprintf(n, sizeof n, "model.layers.%d.%s.gate.weight", l, base);
    if ((rc = load_tensor(s, n, E, H, eng__f32(&L->router), c, err, errlen))) return rc;
    for (int64_t e = 0; e < E; e++) {
        if (mat_alloc(w, &L->ew13[e], 2 * Fe, H) || mat_alloc(w, &L->ew2[e], H, Fe))
            return eng__fail(err, errlen, ENG_ENOMEM, "out of memory for the experts");
        snprintf(n, sizeof n, "model.layers.%d.%s.experts.%lld.%s.weight", l, base, (long long)e, gate);
        if ((rc = load_tensor(s, n, Fe, H, eng__f32(&L->ew13[e]), c, err, errlen))) return rc;
        snprintf(n, sizeof n, "model.layers.%d.%s.experts.%lld.%s.weight", l, base, (long long)e, up);
        if ((rc = load_tensor(s, n, Fe, H, eng__f32(&L->ew13[e]) + Fe * H, c, err, errlen))) return rc;
        snprintf(n, sizeof n, "model.layers.%d.%s.experts.%lld.%s.weight", l, base, (long long)e, down);
        if ((rc = load_tensor(s, n, H, Fe, eng__f32(&L->ew2[e]), c, err, errlen))) return rc;
        if (eng__mat_pack(&L->ew13[e], (int)(2 * Fe), (int)H) || eng__mat_pack(&L->ew2[e], (int)H, (int)Fe))
            return eng__fail(err, errlen, ENG_ENOMEM, "out of memory packing weights");
    }
    if (eng__mat_pack(&L->router, (int)E, (int)H)) return eng__fail(err, errlen, ENG_ENOMEM, "out of memory packing weights");
    return ENG_OK;
}

/* Layer l: norms, attention (q, k, v stacked), the MLP or the experts, and
 * the optional parts of the LLaMA relatives. */
static int load_layer(wset *s, eng_model *m, int l, char *err, size_t errlen) {
    eng_config *c = &m->cfg;
    eng__weights *w = &m->w;
    eng__layer *L = &w->layers[l];
    const int64_t H = c->hidden_size, F = c->intermediate_size, hd = c->head_dim;
    const int64_t QD = (int64_t)c->n_heads * c->head_dim, KD = (int64_t)c->n_kv_heads * c->head_dim;
    const int moe = c->layer_flags[l] & ENG_LAYER_MOE;
    char n[128];
    int rc;
    L->attn_norm = walloc(w, (size_t)H);
    L->ffn_norm = walloc(w, (size_t)H);
    if (!L->attn_norm || !L->ffn_norm || mat_alloc_cap(s, w, &L->wqkv, QD + 2 * KD, H) ||
        mat_alloc_cap(s, w, &L->wo, H, QD) ||
        (!moe && (mat_alloc_cap(s, w, &L->w13, 2 * F, H) || mat_alloc_cap(s, w, &L->w2, H, F))))
        return eng__fail(err, errlen, ENG_ENOMEM, "out of memory for weights");
#define OPT(ptr, count) \
    if (!((ptr) = walloc(w, (size_t)(count)))) return eng__fail(err, errlen, ENG_ENOMEM, "out of memory");
#define LOAD(suffix, d0, d1, dst) \
    snprintf(n, sizeof n, "model.layers.%d.%s", l, suffix); \
    if ((rc = load_tensor(s, n, d0, d1, dst, c, err, errlen))) return rc;
    LOAD("input_layernorm.weight", H, 0, L->attn_norm);
    if (c->gemma) { /* post_attention_layernorm is on the attention's output; pre_feedforward on the MLP's input */
        OPT(L->post_attn_norm, H);
        OPT(L->post_ffn_norm, H);
        LOAD("post_attention_layernorm.weight", H, 0, L->post_attn_norm);
        LOAD("pre_feedforward_layernorm.weight", H, 0, L->ffn_norm);
        LOAD("post_feedforward_layernorm.weight", H, 0, L->post_ffn_norm);
    } else {
        LOAD("post_attention_layernorm.weight", H, 0, L->ffn_norm);
    }
    LOAD("self_attn.q_proj.weight", QD, H, eng__f32(&L->wqkv));
    LOAD("self_attn.k_proj.weight", KD, H, eng__f32(&L->wqkv) + QD * H);
    LOAD("self_attn.v_proj.weight", KD, H, eng__f32(&L->wqkv) + (QD + KD) * H);
    LOAD("self_attn.o_proj.weight", H, QD, eng__f32(&L->wo));
    if (moe) {
        if ((rc = load_experts(s, m, l, err, errlen))) return rc;
    } else {
        LOAD("mlp.gate_proj.weight", F, H, eng__f32(&L->w13));
        LOAD("mlp.up_proj.weight", F, H, eng__f32(&L->w13) + F * H);
        LOAD("mlp.down_proj.weight", H, F, eng__f32(&L->w2));
    }
    if (c->qkv_bias) {
        OPT(L->bqkv, QD + 2 * KD);
        LOAD("self_attn.q_proj.bias", QD, 0, L->bqkv);
        LOAD("self_attn.k_proj.bias", KD, 0, L->bqkv + QD);
        LOAD("self_attn.v_proj.bias", KD, 0, L->bqkv + QD + KD);
    }
    if (c->o_bias) {
        OPT(L->bo, H);
        LOAD("self_attn.o_proj.bias", H, 0, L->bo);
    }
    if (c->mlp_bias) {
        OPT(L->b13, 2 * F);
        OPT(L->b2, H);
        LOAD("mlp.gate_proj.bias", F, 0, L->b13);
        LOAD("mlp.up_proj.bias", F, 0, L->b13 + F);
        LOAD("mlp.down_proj.bias", H, 0, L->b2);
    }
    if (c->qk_norm) {
        OPT(L->q_norm, hd);
        OPT(L->k_norm, hd);
        LOAD("self_attn.q_norm.weight", hd, 0, L->q_norm);
        LOAD("self_attn.k_norm.weight", hd, 0, L->k_norm);
    }
#undef LOAD
#undef OPT
    if (c->gemma) {
        float *norms[] = {L->attn_norm, L->ffn_norm, L->post_attn_norm, L->post_ffn_norm};
        for (int k = 0; k < 4; k++) plus_one(norms[k], H);
        plus_one(L->q_norm, hd);
        plus_one(L->k_norm, hd);
    }
    /* loaded row-major; the kernels read panels */
    if (eng__mat_pack(&L->wqkv, (int)(QD + 2 * KD), (int)H) || eng__mat_pack(&L->wo, (int)H, (int)QD) ||
        (!moe && (eng__mat_pack(&L->w13, (int)(2 * F), (int)H) || eng__mat_pack(&L->w2, (int)H, (int)F))))
        return eng__fail(err, errlen, ENG_ENOMEM, "out of memory packing weights");
    return ENG_OK;
}

/* Config fields plus every 61st value of every weight matrix: cheap, and
 * any other model (shape or weights) gives another value. */
static uint64_t fp_add(uint64_t h, const float *x, size_t n) {
    for (size_t i = 0; i < n; i += 61) h = eng__hash64(&x[i], sizeof(float), h); /* 61: every lane of the panels */
    return eng__hash64(&n, sizeof n, h);
}

/* The fingerprint in three parts, hashed in this order as the model loads
 * (the same values as when it was computed on the whole F32 model at once):
 * the config, the embedding, final norm and LM head; each layer; the precisions. */
static uint64_t fp_head(const eng_model *m) {
    const eng_config *c = &m->cfg;
    int dims[] = {c->vocab_size, c->hidden_size, c->n_layers, c->n_heads, c->n_kv_heads, c->head_dim,
                  c->intermediate_size, c->tie_embeddings, c->qkv_bias, c->o_bias, c->mlp_bias, c->qk_norm,
                  c->rope_scaling, c->rope_original_max};
    float fl[] = {c->rope_theta, c->rms_eps, c->rope_factor, c->rope_low_freq_factor, c->rope_high_freq_factor};
    uint64_t h = eng__hash64(dims, sizeof dims, 0x6b76736572766531ull);
    h = eng__hash64(fl, sizeof fl, h);
    /* the later architectures' fields (hashed only when used: the fingerprints of the
     * models we ran before, and so their exported agents, stay valid) */
    float fl2[] = {c->rope_local_theta, c->attn_scale, c->final_softcap};
    int more[] = {c->sliding_window, c->gemma, c->n_experts, c->n_experts_used, c->moe_intermediate_size,
                  c->moe_norm_topk};
    if (c->sliding_window || c->gemma || c->n_experts) {
        h = eng__hash64(fl2, sizeof fl2, h);
        h = eng__hash64(more, sizeof more, h);
        h = eng__hash64(c->layer_flags, (size_t)c->n_layers, h);
    }
    if (c->rope_scaling == ENG_ROPE_FACTORS) h = eng__hash64(c->rope_ff, (size_t)(c->head_dim / 2) * sizeof(float), h);
    size_t H = (size_t)c->hidden_size, V = (size_t)c->vocab_size;
    h = fp_add(h, eng__f32(&m->w.embed), eng__mat_elems((int)V, (int)H));
    h = fp_add(h, m->w.norm, H);
    if (m->w.lm_head.p != m->w.embed.p) h = fp_add(h, eng__f32(&m->w.lm_head), eng__mat_elems((int)V, (int)H));
    return h;
}

static uint64_t fp_layer(const eng_model *m, int l, uint64_t h) {
    const eng_config *c = &m->cfg;
    size_t H = (size_t)c->hidden_size, F = (size_t)c->intermediate_size;
    size_t QD = (size_t)c->n_heads * c->head_dim, KD = (size_t)c->n_kv_heads * c->head_dim;
    const eng__layer *L = &m->w.layers[l];
    h = fp_add(h, L->attn_norm, H);
    h = fp_add(h, eng__f32(&L->wqkv), eng__mat_elems((int)(QD + 2 * KD), (int)H));
    h = fp_add(h, eng__f32(&L->wo), eng__mat_elems((int)H, (int)QD));
    h = fp_add(h, L->ffn_norm, H);
    if (L->w13.p) h = fp_add(h, eng__f32(&L->w13), eng__mat_elems((int)(2 * F), (int)H));
    if (L->w2.p) h = fp_add(h, eng__f32(&L->w2), eng__mat_elems((int)H, (int)F));
    if (L->post_attn_norm) h = fp_add(h, L->post_attn_norm, H);
    if (L->post_ffn_norm) h = fp_add(h, L->post_ffn_norm, H);
    if (L->router.p) h = fp_add(h, eng__f32(&L->router), eng__mat_elems(c->n_experts, (int)H));
    for (int e = 0; L->ew13 && e < c->n_experts; e++) {
        h = fp_add(h, eng__f32(&L->ew13[e]), eng__mat_elems(2 * c->moe_intermediate_size, (int)H));
        h = fp_add(h, eng__f32(&L->ew2[e]), eng__mat_elems((int)H, c->moe_intermediate_size));
    }
    if (L->bqkv) h = fp_add(h, L->bqkv, QD + 2 * KD);
    if (L->bo) h = fp_add(h, L->bo, H);
    if (L->b13) h = fp_add(h, L->b13, 2 * F);
    if (L->b2) h = fp_add(h, L->b2, H);
    if (L->q_norm) h = fp_add(h, L->q_norm, (size_t)c->head_dim);
    if (L->k_norm) h = fp_add(h, L->k_norm, (size_t)c->head_dim);
    return h;
}

static uint64_t fp_tail(const eng_model *m, uint64_t h) {
    int prec[2] = {m->wkind == ENG_WEIGHTS_BF16, m->opt.kv_f16 != 0}; /* another precision computes other logits */
    h = eng__hash64(prec, sizeof prec, h);
    if (m->wkind == ENG_WEIGHTS_Q8_0) h = eng__hash64("q8_0", 4, h); /* (the earlier fingerprints stay as they were) */
    if (m->wkind == ENG_WEIGHTS_Q4_K) h = eng__hash64("q4_k", 4, h);
    return h;
}

int eng__load_weights(eng_model *m, const char *dir, const eng__gguf *gg, char *err, size_t errlen) {
    eng_config *c = &m->cfg;
    eng__weights *w = &m->w;
    wset s = {0};
    s.warning = m->warning;
    s.warning_len = sizeof m->warning;
    s.gg = gg;
    s.gpath = dir;
    s.cfg = c;
    int rc = gg ? ENG_OK : open_weight_files(&s, dir, err, errlen);
    if (rc) goto out;
    const int64_t H = c->hidden_size, V = c->vocab_size;
    s.keep_k = gg && m->wkind == ENG_WEIGHTS_Q4_K;
    w->norm = walloc(w, (size_t)H);
    w->layers = calloc((size_t)c->n_layers, sizeof *w->layers);
    if (mat_alloc_cap(&s, w, &w->embed, V, H) || !w->norm || !w->layers) { rc = eng__fail(err, errlen, ENG_ENOMEM, "out of memory for weights"); goto out; }
    if ((rc = load_tensor(&s, "model.embed_tokens.weight", V, H, eng__f32(&w->embed), c, err, errlen))) goto out;
    if ((rc = load_tensor(&s, "model.norm.weight", H, 0, w->norm, c, err, errlen))) goto out;
    if (c->gemma) plus_one(w->norm, H);
    if (c->tie_embeddings) {
        w->lm_head = w->embed;
    } else {
        if (mat_alloc_cap(&s, w, &w->lm_head, V, H)) { rc = eng__fail(err, errlen, ENG_ENOMEM, "out of memory"); goto out; }
        if ((rc = load_tensor(&s, "lm_head.weight", V, H, eng__f32(&w->lm_head), c, err, errlen))) goto out;
    }
    if (eng__mat_pack(&w->embed, (int)V, (int)H) ||
        (w->lm_head.p != w->embed.p && eng__mat_pack(&w->lm_head, (int)V, (int)H))) {
        rc = eng__fail(err, errlen, ENG_ENOMEM, "out of memory packing weights");
        goto out;
    }
    /* hashed in F32, then converted: from here one layer at a time is F32 */
    uint64_t h = fp_head(m);
    if (convert_mat(&s, w, &w->embed, m->wkind, (int)V, (int)H) ||
        (!c->tie_embeddings && convert_mat(&s, w, &w->lm_head, m->wkind, (int)V, (int)H))) {
        rc = eng__fail(err, errlen, ENG_ENOMEM, "out of memory converting the weights");
        goto out;
    }
    if (c->tie_embeddings) w->lm_head = w->embed;
    s.ncap = 0;
    for (int l = 0; l < c->n_layers; l++) {
        if ((rc = load_layer(&s, m, l, err, errlen))) goto out;
        h = fp_layer(m, l, h);
        if (convert_layer(&s, w, c, l, m->wkind)) {
            rc = eng__fail(err, errlen, ENG_ENOMEM, "out of memory converting the weights");
            goto out;
        }
    }
    m->fingerprint = fp_tail(m, h); /* of the F32 values, and the precision */
out:
    wset_free(&s);
    if (rc) eng__free_weights(w, c);
    return rc;
}

uint64_t eng_model_fingerprint(const eng_model *m) { return m->fingerprint; }

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
