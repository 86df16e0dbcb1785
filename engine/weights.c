/* weights.c — load a model's weights from its files (safetensors shards or
 * one GGUF file) into the formats the kernels read.
 *
 * A matrix streams from the mapped file into its final format a slab of
 * panels at a time (about 4 MB of F32): rows converted to F32, packed into
 * panels (matmul.c), sampled for the fingerprint, then converted to the
 * weights' format (BF16, Q8_0, K-quants) or copied (F32) into the matrix's
 * own buffer, allocated once at its final size; the file pages read are
 * dropped. So loading adds one slab to the final size, whatever the model.
 * A K-quant GGUF file's blocks are repacked from the file's bytes (their
 * exact integers), not requantized. */
#define _DEFAULT_SOURCE 1 /* madvise */
#include "internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#define PANEL 16
#define SLAB_FLOATS ((size_t)1 << 20) /* floats of F32 a slab holds at most (rounded to whole panels) */

/* One mapped safetensors file. */
typedef struct {
    char *path;
    uint8_t *map;
    size_t size;
    st_file st;
} wfile;

typedef struct {
    wfile *f;
    int n;
    const eng__gguf *gg;    /* or the tensors of a GGUF file */
    const char *gpath;      /* ... at this path */
    eng_config *cfg;        /* (dtype noted; the heads of q and k in a GGUF file) */
    int kind;               /* ENG_WEIGHTS_*: what the matrices become */
    char *warning;          /* the model's: the first tensor with values that are not finite */
    size_t warning_len;
    uint64_t h;             /* the fingerprint so far */
} wset;

/* A tensor found and its shape checked: where its rows are. */
typedef struct {
    const uint8_t *data;
    int gguf;               /* type is GGML_* (else ST_*) */
    uint32_t type;
    size_t row_bytes;       /* of one row of its inner dimension */
    int permuted;           /* llama's q or k in a GGUF file: rows interleaved per head */
    const char *file;
    char name[160];         /* as the file names it */
    int64_t rows, cols;
    size_t bad;             /* values read that are not finite */
    int64_t lo, hi;         /* rows read since the pages were last dropped */
} tsrc;

static void wset_free(wset *s) {
    for (int i = 0; i < s->n; i++) {
        st_free(&s->f[i].st);
        eng__unmap_file(s->f[i].map, s->f[i].size);
        free(s->f[i].path);
    }
    free(s->f);
    s->f = NULL;
    s->n = 0;
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

/* ---- tensors ------------------------------------------------------------------ */

/* The tensor under its checkpoint name, of d0 rows of d1 values (d1 = 0: a
 * vector of d0), in a GGUF file (innermost dimension first there) or any
 * file of the set. */
static int find_tensor(wset *s, const char *name, int64_t d0, int64_t d1, tsrc *t, char *err, size_t errlen) {
    memset(t, 0, sizeof *t);
    t->rows = d1 ? d0 : 1;
    t->cols = d1 ? d1 : d0;
    t->lo = INT64_MAX;
    t->hi = -1;
    if (s->gg) {
        const char *path = s->gpath;
        const char *gn = eng__gguf_name(name, t->name, sizeof t->name);
        const gguf_tensor *g = gn ? gguf_tensor_find(&s->gg->g, gn) : NULL;
        if (!g) return eng__fail(err, errlen, ENG_EFORMAT, "%s: tensor \"%s\" (%s) is missing", path, gn ? gn : name, name);
        int ndim = d1 ? 2 : 1;
        uint64_t want0 = (uint64_t)t->cols, want1 = (uint64_t)t->rows;
        if ((int)g->n_dims != ndim || g->ne[0] != want0 || g->ne[1] != want1)
            return eng__fail(err, errlen, ENG_EFORMAT, "%s: tensor \"%s\" has shape [%llu, %llu] (innermost first), "
                             "expected [%llu, %llu]", path, gn, (unsigned long long)g->ne[0],
                             (unsigned long long)(g->n_dims > 1 ? g->ne[1] : 1), (unsigned long long)want0,
                             (unsigned long long)want1);
        snprintf(s->cfg->dtype, sizeof s->cfg->dtype, "%s", gguf_type_name(g->type));
        size_t be, bb;
        gguf_block(g->type, &be, &bb); /* (a type the parser accepted: rows are whole blocks) */
        t->data = g->data;
        t->gguf = 1;
        t->type = g->type;
        t->row_bytes = (size_t)t->cols / be * bb;
        t->permuted = (strstr(gn, ".attn_q.") || strstr(gn, ".attn_k.")) && eng__gguf_permuted(&s->gg->g);
        t->file = path;
        return ENG_OK;
    }
    for (int i = 0; i < s->n; i++) {
        const st_tensor *st = st_find(&s->f[i].st, name);
        if (!st) continue;
        int ndim = d1 ? 2 : 1;
        if (st->ndim != ndim || st->shape[0] != d0 || (ndim == 2 && st->shape[1] != d1)) {
            char got[96] = "", *p = got;
            for (int k = 0; k < st->ndim; k++)
                p += snprintf(p, sizeof got - (size_t)(p - got), "%s%lld", k ? ", " : "", (long long)st->shape[k]);
            if (ndim == 2)
                return eng__fail(err, errlen, ENG_EFORMAT, "%s: tensor \"%s\" has shape [%s], expected [%lld, %lld]",
                                 s->f[i].path, name, got, (long long)d0, (long long)d1);
            return eng__fail(err, errlen, ENG_EFORMAT, "%s: tensor \"%s\" has shape [%s], expected [%lld]",
                             s->f[i].path, name, got, (long long)d0);
        }
        static const char *names[] = {"F32", "F16", "BF16"};
        snprintf(s->cfg->dtype, sizeof s->cfg->dtype, "%s", names[st->dtype]);
        t->data = st->data;
        t->type = (uint32_t)st->dtype;
        t->row_bytes = (size_t)t->cols * (st->dtype == ST_F32 ? 4 : 2);
        t->file = s->f[i].path;
        snprintf(t->name, sizeof t->name, "%s", name);
        return ENG_OK;
    }
    return eng__fail(err, errlen, ENG_EFORMAT, "%s%s: tensor \"%s\" is missing", s->n ? s->f[0].path : "weights",
                     s->n > 1 ? " (and other shards)" : "", name);
}

/* The file's row of our row r of n: a GGUF file's llama q and k (and their
 * biases) interleave each head's rows (its RoPE of adjacent pairs); ours
 * are the halves order. */
static int64_t unpermute(int permuted, int64_t r, int64_t n, int hd) {
    if (!permuted || r / hd * hd + hd > n) return r;
    int64_t h = r / hd * hd, i = r % hd;
    return h + (i < hd / 2 ? 2 * i : 2 * (i - hd / 2) + 1);
}

static int64_t file_row(const tsrc *t, int64_t r, int hd) { return unpermute(t->permuted, r, t->rows, hd); }

static const uint8_t *row_bytes(const tsrc *t, int64_t fr) { return t->data + (size_t)fr * t->row_bytes; }

/* File row fr as F32 into dst (cols values). */
static void read_row(tsrc *t, int64_t fr, float *dst) {
    if (t->gguf) gguf_to_f32(t->type, row_bytes(t, fr), dst, (size_t)t->cols);
    else st_to_f32((int)t->type, row_bytes(t, fr), dst, (size_t)t->cols);
    for (int64_t k = 0; k < t->cols; k++) t->bad += !isfinite(dst[k]);
    t->lo = fr < t->lo ? fr : t->lo;
    t->hi = fr > t->hi ? fr : t->hi;
}

/* The pages of the rows read since the last call leave the resident set (a
 * private read-only mapping: touched again, they are read again). */
static void drop_read(tsrc *t) {
    long ps = sysconf(_SC_PAGESIZE);
    if (ps <= 0 || t->hi < t->lo) return;
    uintptr_t a = (uintptr_t)row_bytes(t, t->lo) / (uintptr_t)ps * (uintptr_t)ps,
              e = (uintptr_t)row_bytes(t, t->hi + 1);
    madvise((void *)a, e - a, MADV_DONTNEED);
    t->lo = INT64_MAX;
    t->hi = -1;
}

static void done_tensor(wset *s, tsrc *t) {
    drop_read(t);
    if (t->bad && !s->warning[0]) /* it loads (the file is well formed), but its output will be garbage */
        snprintf(s->warning, s->warning_len, "%s: tensor \"%s\": %zu of %zu values are not finite (NaN or "
                 "infinite): the model will compute nonsense", t->file, t->name, t->bad,
                 (size_t)(t->rows * t->cols));
}

/* The fingerprint: every 61st value of each weight array (61: every lane of
 * the panels) in load order, then its length. fp_from continues an array
 * from element `at` (x holds elements at.. at + n). */
static void fp_from(wset *s, const float *x, size_t at, size_t n, size_t *next) {
    for (; *next < at + n; *next += 61) s->h = eng__hash64(&x[*next - at], sizeof(float), s->h);
}

static void fp_end(wset *s, size_t n) { s->h = eng__hash64(&n, sizeof n, s->h); }

static void fp_vec(wset *s, const float *x, size_t n) {
    size_t next = 0;
    fp_from(s, x, 0, n, &next);
    fp_end(s, n);
}

/* A vector of n floats, malloc'd. */
static int load_vec(wset *s, eng__weights *w, const char *name, int64_t n, float **out, char *err, size_t errlen) {
    tsrc t;
    int rc = find_tensor(s, name, n, 0, &t, err, errlen);
    if (rc) return rc;
    float *v = malloc((size_t)n * sizeof *v);
    if (!v || !(*out = malloc((size_t)n * sizeof **out))) {
        free(v);
        return eng__fail(err, errlen, ENG_ENOMEM, "out of memory");
    }
    w->bytes += (size_t)n * sizeof **out;
    read_row(&t, 0, v);
    for (int64_t i = 0; i < n; i++) (*out)[i] = v[unpermute(t.permuted, i, n, s->cfg->head_dim)];
    free(v);
    done_tensor(s, &t);
    return ENG_OK;
}

/* ---- matrices ----------------------------------------------------------------- */
enum { FMT_F32, FMT_BF16, FMT_Q8, FMT_KFILE, FMT_KQUANT };

static uint16_t to_bf16(float f) { /* round to nearest even; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static int is_k(uint32_t type) { return type == GGML_Q4_K || type == GGML_Q6_K; }

/* What a matrix of these parts becomes under the weights' kind: F32 and BF16
 * as asked; Q8_0 where rows are whole blocks of 32; K-quants: a file's own
 * Q4_K/Q6_K blocks when every panel has one format, Q8_0 where the file has
 * Q8_0 or rows are not whole super-blocks of 256, else our Q4_K. */
static int choose_format(const wset *s, const tsrc *t, int np, int64_t in) {
    if (s->kind == ENG_WEIGHTS_BF16) return FMT_BF16;
    if (s->kind == ENG_WEIGHTS_Q8_0) return in % 32 ? FMT_F32 : FMT_Q8;
    if (s->kind != ENG_WEIGHTS_Q4_K) return FMT_F32;
    int all_k = in % 256 == 0, all_q8 = 1;
    int64_t r0 = 0;
    for (int i = 0; i < np; i++) {
        all_k &= t[i].gguf && is_k(t[i].type);
        all_q8 &= t[i].gguf && t[i].type == GGML_Q8_0;
        if (i && r0 % PANEL && t[i].type != t[i - 1].type) all_k = 0; /* a panel of two formats */
        r0 += t[i].rows;
    }
    if (all_k) return FMT_KFILE;
    if (all_q8 || in % 256) return in % 32 ? FMT_F32 : FMT_Q8;
    return FMT_KQUANT;
}

/* Matrix m: the parts' rows stacked (q, k, v; gate, up), in columns. */
static int load_matrix(wset *s, eng__weights *w, eng__mat *m, const char *const *names, const int64_t *rows, int np,
                       int64_t in, char *err, size_t errlen) {
    tsrc t[3];
    int64_t out = 0;
    int rc;
    for (int i = 0; i < np; i++) {
        if ((rc = find_tensor(s, names[i], rows[i], in, &t[i], err, errlen))) return rc;
        out += rows[i];
    }
    const int hd = s->cfg->head_dim, fmt = choose_format(s, t, np, in);
    const size_t P = (size_t)(out + PANEL - 1) / PANEL, pe = (size_t)PANEL * (size_t)in, elems = P * pe;
    size_t pbytes = fmt == FMT_F32 ? pe * 4 : fmt == FMT_BF16 ? pe * 2 : fmt == FMT_Q8 ? eng__q8_bytes(PANEL, (int)in) : 0;
    size_t total = P * pbytes;
    if (fmt == FMT_KFILE || fmt == FMT_KQUANT) {
        if (!(m->ktype = malloc(P)) || !(m->koff = malloc((P + 1) * sizeof *m->koff)))
            return eng__fail(err, errlen, ENG_ENOMEM, "out of memory for weights");
        int64_t r = 0;
        for (size_t p = 0; p < P; p++, r += PANEL) {
            int part = 0;
            for (int64_t acc = t[0].rows; part < np - 1 && r >= acc; acc += t[++part].rows) {}
            m->ktype[p] = (uint8_t)(fmt == FMT_KFILE ? t[part].type : GGML_Q4_K);
            m->koff[p] = total;
            total += eng__k_panel_bytes(m->ktype[p], (int)in);
        }
        m->koff[P] = total;
        w->bytes += P + (P + 1) * sizeof *m->koff;
        m->kq = 1;
    }
    if (!(m->p = malloc(total ? total : 1))) return eng__fail(err, errlen, ENG_ENOMEM, "out of memory for weights");
    w->bytes += total;
    m->bf16 = fmt == FMT_BF16;
    m->q8 = fmt == FMT_Q8;

    size_t slab_p = SLAB_FLOATS / pe ? SLAB_FLOATS / pe : 1, next = 0, nsb = (size_t)in / 256;
    float *slab = malloc(slab_p * pe * sizeof *slab);
    uint8_t *q4 = fmt == FMT_KQUANT ? malloc((size_t)PANEL * nsb * 144) : NULL;
    if (!slab || (fmt == FMT_KQUANT && !q4)) rc = eng__fail(err, errlen, ENG_ENOMEM, "out of memory loading weights");
    for (size_t p0 = 0; p0 < P && !rc; p0 += slab_p) {
        size_t np_ = P - p0 < slab_p ? P - p0 : slab_p;
        int64_t r0 = (int64_t)(p0 * PANEL), nr = out - r0 < (int64_t)(np_ * PANEL) ? out - r0 : (int64_t)(np_ * PANEL);
        for (int64_t r = 0; r < nr; r++) { /* row-major, then packed in place */
            int part = 0;
            int64_t lr = r0 + r;
            while (lr >= t[part].rows) lr -= t[part++].rows;
            read_row(&t[part], file_row(&t[part], lr, hd), slab + (size_t)r * (size_t)in);
        }
        eng__mat slab_m = {.p = slab};
        if (eng__mat_pack(&slab_m, (int)nr, (int)in)) {
            rc = eng__fail(err, errlen, ENG_ENOMEM, "out of memory packing weights");
            break;
        }
        fp_from(s, slab, p0 * pe, np_ * pe, &next);
        for (size_t k = 0; k < np_; k++) {
            const float *panel = slab + k * pe;
            size_t p = p0 + k;
            uint8_t *dst = (uint8_t *)m->p + (m->kq ? m->koff[p] : p * pbytes);
            if (fmt == FMT_F32) {
                memcpy(dst, panel, pbytes);
            } else if (fmt == FMT_BF16) {
                for (size_t i = 0; i < pe; i++) {
                    uint16_t v = to_bf16(panel[i]);
                    memcpy(dst + 2 * i, &v, 2);
                }
            } else if (fmt == FMT_Q8) {
                eng__q8_panel(dst, panel, (int)in);
            } else {
                const uint8_t *rp[PANEL];
                float row[256];
                for (int j = 0; j < PANEL; j++) {
                    int64_t gr = (int64_t)(p * PANEL) + j, lr = gr;
                    int part = 0;
                    rp[j] = NULL;
                    if (gr >= out) continue;
                    while (lr >= t[part].rows) lr -= t[part++].rows;
                    if (fmt == FMT_KFILE) {
                        rp[j] = row_bytes(&t[part], file_row(&t[part], lr, hd));
                        continue;
                    }
                    for (size_t b = 0; b < nsb; b++) { /* our quantizer, on the row's F32 values */
                        for (int c = 0; c < 256; c++) row[c] = panel[(b * 256 + (size_t)c) * PANEL + (size_t)j];
                        eng__k4_quantize(row, q4 + (size_t)j * nsb * 144 + b * 144);
                    }
                    rp[j] = q4 + (size_t)j * nsb * 144;
                }
                eng__k_panel(dst, m->ktype[p], rp, (int)in);
            }
        }
        for (int i = 0; i < np; i++) drop_read(&t[i]);
    }
    free(slab);
    free(q4);
    if (rc) return rc;
    m->out = (int)out;
    m->in = (int)in;
    fp_end(s, elems);
    for (int i = 0; i < np; i++) done_tensor(s, &t[i]);
    return ENG_OK;
}

static int load_matrix1(wset *s, eng__weights *w, eng__mat *m, const char *name, int64_t rows, int64_t in, char *err,
                        size_t errlen) {
    return load_matrix(s, w, m, &name, &rows, 1, in, err, errlen);
}

/* ---- the model ---------------------------------------------------------------- */

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

/* Gemma's RMSNorm scales by 1 + w: store it that way (the same float32 sum
 * the published model computes), so every norm is x / rms(x) * w'. */
static void plus_one(float *w, int64_t n) {
    for (int64_t i = 0; i < n; i++) w[i] = 1.0f + w[i];
}

/* One mixture-of-experts layer: the router (F32: it picks the experts) and
 * every expert's gate, up and down projections (qwen3_moe: mlp.gate,
 * mlp.experts.E.{gate,up,down}_proj; mixtral: block_sparse_moe.gate,
 * block_sparse_moe.experts.E.{w1,w3,w2}). */
static int load_experts(wset *s, eng_model *m, int l, char *err, size_t errlen) {
    eng_config *c = &m->cfg;
    eng__weights *w = &m->w;
    eng__layer *L = &w->layers[l];
    const int64_t H = c->hidden_size, E = c->n_experts, Fe = c->moe_intermediate_size;
    int mixtral = !strcmp(c->model_type, "mixtral");
    const char *base = mixtral ? "block_sparse_moe" : "mlp";
    const char *gate = mixtral ? "w1" : "gate_proj", *up = mixtral ? "w3" : "up_proj", *down = mixtral ? "w2" : "down_proj";
    char n[160], n2[160];
    int rc;
    L->ew13 = calloc((size_t)E, sizeof *L->ew13);
    L->ew2 = calloc((size_t)E, sizeof *L->ew2);
    if (!L->ew13 || !L->ew2) return eng__fail(err, errlen, ENG_ENOMEM, "out of memory for the experts");
    snprintf(n, sizeof n, "model.layers.%d.%s.gate.weight", l, base);
    int kind = s->kind;
    s->kind = ENG_WEIGHTS_F32;
    rc = load_matrix1(s, w, &L->router, n, E, H, err, errlen);
    s->kind = kind;
    if (rc) return rc;
    for (int64_t e = 0; e < E; e++) {
        snprintf(n, sizeof n, "model.layers.%d.%s.experts.%lld.%s.weight", l, base, (long long)e, gate);
        snprintf(n2, sizeof n2, "model.layers.%d.%s.experts.%lld.%s.weight", l, base, (long long)e, up);
        const char *gu[2] = {n, n2};
        const int64_t rows[2] = {Fe, Fe};
        if ((rc = load_matrix(s, w, &L->ew13[e], gu, rows, 2, H, err, errlen))) return rc;
        snprintf(n, sizeof n, "model.layers.%d.%s.experts.%lld.%s.weight", l, base, (long long)e, down);
        if ((rc = load_matrix1(s, w, &L->ew2[e], n, H, Fe, err, errlen))) return rc;
    }
    return ENG_OK;
}

/* Layer l: norms, attention (q, k, v stacked), the MLP or the experts, and
 * the optional parts of the LLaMA relatives. Hashed in the fingerprint's
 * order: attention norm, q/k/v, o, MLP norm, gate/up, down, the post norms,
 * the experts, the biases, the q/k norms. */
static int load_layer(wset *s, eng_model *m, int l, char *err, size_t errlen) {
    eng_config *c = &m->cfg;
    eng__weights *w = &m->w;
    eng__layer *L = &w->layers[l];
    const int64_t H = c->hidden_size, F = c->intermediate_size, hd = c->head_dim;
    const int64_t QD = (int64_t)c->n_heads * c->head_dim, KD = (int64_t)c->n_kv_heads * c->head_dim;
    const int moe = c->layer_flags[l] & ENG_LAYER_MOE;
    char n[3][128];
    int rc;
#define NAME(i, suffix) snprintf(n[i], sizeof n[i], "model.layers.%d.%s", l, suffix)
#define VEC(suffix, count, dst) \
    NAME(0, suffix); \
    if ((rc = load_vec(s, w, n[0], count, &(dst), err, errlen))) return rc;
    VEC("input_layernorm.weight", H, L->attn_norm);
    if (c->gemma) { /* post_attention_layernorm is on the attention's output; pre_feedforward on the MLP's input */
        VEC("post_attention_layernorm.weight", H, L->post_attn_norm);
        VEC("pre_feedforward_layernorm.weight", H, L->ffn_norm);
        VEC("post_feedforward_layernorm.weight", H, L->post_ffn_norm);
    } else {
        VEC("post_attention_layernorm.weight", H, L->ffn_norm);
    }
    if (c->qkv_bias) { /* biases and q/k norms: small, read first, hashed last */
        float *b[3];
        VEC("self_attn.q_proj.bias", QD, b[0]);
        VEC("self_attn.k_proj.bias", KD, b[1]);
        VEC("self_attn.v_proj.bias", KD, b[2]);
        L->bqkv = malloc((size_t)(QD + 2 * KD) * sizeof *L->bqkv);
        if (L->bqkv) {
            memcpy(L->bqkv, b[0], (size_t)QD * sizeof(float));
            memcpy(L->bqkv + QD, b[1], (size_t)KD * sizeof(float));
            memcpy(L->bqkv + QD + KD, b[2], (size_t)KD * sizeof(float));
        }
        for (int i = 0; i < 3; i++) free(b[i]);
        if (!L->bqkv) return eng__fail(err, errlen, ENG_ENOMEM, "out of memory");
    }
    if (c->o_bias) {
        VEC("self_attn.o_proj.bias", H, L->bo);
    }
    if (c->mlp_bias) {
        float *b[2];
        VEC("mlp.gate_proj.bias", F, b[0]);
        VEC("mlp.up_proj.bias", F, b[1]);
        L->b13 = malloc((size_t)(2 * F) * sizeof *L->b13);
        if (L->b13) {
            memcpy(L->b13, b[0], (size_t)F * sizeof(float));
            memcpy(L->b13 + F, b[1], (size_t)F * sizeof(float));
        }
        free(b[0]);
        free(b[1]);
        if (!L->b13) return eng__fail(err, errlen, ENG_ENOMEM, "out of memory");
        VEC("mlp.down_proj.bias", H, L->b2);
    }
    if (c->qk_norm) {
        VEC("self_attn.q_norm.weight", hd, L->q_norm);
        VEC("self_attn.k_norm.weight", hd, L->k_norm);
    }
#undef VEC
    if (c->gemma) {
        float *norms[] = {L->attn_norm, L->ffn_norm, L->post_attn_norm, L->post_ffn_norm};
        for (int k = 0; k < 4; k++) plus_one(norms[k], H);
        plus_one(L->q_norm, hd);
        plus_one(L->k_norm, hd);
    }
    fp_vec(s, L->attn_norm, (size_t)H);
    NAME(0, "self_attn.q_proj.weight");
    NAME(1, "self_attn.k_proj.weight");
    NAME(2, "self_attn.v_proj.weight");
    const char *qkv[3] = {n[0], n[1], n[2]};
    const int64_t qkv_rows[3] = {QD, KD, KD};
    if ((rc = load_matrix(s, w, &L->wqkv, qkv, qkv_rows, 3, H, err, errlen))) return rc;
    NAME(0, "self_attn.o_proj.weight");
    if ((rc = load_matrix1(s, w, &L->wo, n[0], H, QD, err, errlen))) return rc;
    fp_vec(s, L->ffn_norm, (size_t)H);
    if (!moe) {
        NAME(0, "mlp.gate_proj.weight");
        NAME(1, "mlp.up_proj.weight");
        const char *gu[2] = {n[0], n[1]};
        const int64_t gu_rows[2] = {F, F};
        if ((rc = load_matrix(s, w, &L->w13, gu, gu_rows, 2, H, err, errlen))) return rc;
        NAME(0, "mlp.down_proj.weight");
        if ((rc = load_matrix1(s, w, &L->w2, n[0], H, F, err, errlen))) return rc;
    }
#undef NAME
    if (L->post_attn_norm) fp_vec(s, L->post_attn_norm, (size_t)H);
    if (L->post_ffn_norm) fp_vec(s, L->post_ffn_norm, (size_t)H);
    if (moe && (rc = load_experts(s, m, l, err, errlen))) return rc;
    if (L->bqkv) fp_vec(s, L->bqkv, (size_t)(QD + 2 * KD));
    if (L->bo) fp_vec(s, L->bo, (size_t)H);
    if (L->b13) fp_vec(s, L->b13, (size_t)(2 * F));
    if (L->b2) fp_vec(s, L->b2, (size_t)H);
    if (L->q_norm) fp_vec(s, L->q_norm, (size_t)hd);
    if (L->k_norm) fp_vec(s, L->k_norm, (size_t)hd);
    return ENG_OK;
}

/* The config's part of the fingerprint. */
static uint64_t fp_config(const eng_config *c) {
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
    return h;
}

/* The fingerprint: the config, then the weights' F32 values as they load
 * (embedding, final norm, LM head, each layer), then the precisions. */
int eng__load_weights(eng_model *m, const char *dir, const eng__gguf *gg, char *err, size_t errlen) {
    eng_config *c = &m->cfg;
    eng__weights *w = &m->w;
    wset s = {0};
    s.warning = m->warning;
    s.warning_len = sizeof m->warning;
    s.gg = gg;
    s.gpath = dir;
    s.cfg = c;
    s.kind = m->wkind;
    s.h = fp_config(c);
    int rc = gg ? ENG_OK : open_weight_files(&s, dir, err, errlen);
    if (rc) goto out;
    const int64_t H = c->hidden_size, V = c->vocab_size;
    if (!(w->layers = calloc((size_t)c->n_layers, sizeof *w->layers))) {
        rc = eng__fail(err, errlen, ENG_ENOMEM, "out of memory for weights");
        goto out;
    }
    if ((rc = load_matrix1(&s, w, &w->embed, "model.embed_tokens.weight", V, H, err, errlen))) goto out;
    if ((rc = load_vec(&s, w, "model.norm.weight", H, &w->norm, err, errlen))) goto out;
    if (c->gemma) plus_one(w->norm, H);
    fp_vec(&s, w->norm, (size_t)H);
    if (c->tie_embeddings) w->lm_head = w->embed;
    else if ((rc = load_matrix1(&s, w, &w->lm_head, "lm_head.weight", V, H, err, errlen))) goto out;
    for (int l = 0; l < c->n_layers; l++)
        if ((rc = load_layer(&s, m, l, err, errlen))) goto out;
    int prec[2] = {m->wkind == ENG_WEIGHTS_BF16, m->opt.kv_f16 != 0}; /* another precision computes other logits */
    s.h = eng__hash64(prec, sizeof prec, s.h);
    if (m->wkind == ENG_WEIGHTS_Q8_0) s.h = eng__hash64("q8_0", 4, s.h); /* (the earlier fingerprints stay as they were) */
    if (m->wkind == ENG_WEIGHTS_Q4_K) s.h = eng__hash64("q4_k", 4, s.h);
    m->fingerprint = s.h;
out:
    wset_free(&s);
    if (rc) eng__free_weights(w, c);
    return rc;
}

uint64_t eng_model_fingerprint(const eng_model *m) { return m->fingerprint; }
