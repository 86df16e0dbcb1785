/* gguf.c — parse GGUF files and convert their tensors to F32 (see gguf.h).
 * Written from the GGUF specification (ggml's docs/gguf.md) and ggml's
 * block formats: Q8_0 and Q4_0 blocks of 32, Q4_K and Q6_K super-blocks of
 * 256. */
#include "gguf.h"
#include "internal.h"

#include <stdlib.h>
#include <string.h>

typedef struct {
    const uint8_t *p, *end;
} rd;

static int take(rd *r, size_t n, const uint8_t **at) {
    if ((size_t)(r->end - r->p) < n) return -1;
    *at = r->p;
    r->p += n;
    return 0;
}

static int u32(rd *r, uint32_t *v) {
    const uint8_t *a;
    if (take(r, 4, &a)) return -1;
    memcpy(v, a, 4);
    return 0;
}

static int u64(rd *r, uint64_t *v) {
    const uint8_t *a;
    if (take(r, 8, &a)) return -1;
    memcpy(v, a, 8);
    return 0;
}

static int str(rd *r, const char **s, size_t *n) {
    uint64_t len;
    const uint8_t *a;
    if (u64(r, &len) || len > (uint64_t)(r->end - r->p) || take(r, (size_t)len, &a)) return -1;
    *s = (const char *)a;
    *n = (size_t)len;
    return 0;
}

static size_t vsize(uint32_t t) {
    static const size_t sz[GGUF_N_VTYPES] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    return t < GGUF_N_VTYPES ? sz[t] : 0;
}

/* Skip one value of type t (arrays nest at most `depth` more levels). */
static int skip_value(rd *r, uint32_t t, int depth) {
    const uint8_t *a;
    if (t == GGUF_STRING) {
        const char *s;
        size_t n;
        return str(r, &s, &n);
    }
    if (t == GGUF_ARRAY) {
        uint32_t et;
        uint64_t n;
        if (depth <= 0 || u32(r, &et) || u64(r, &n) || et >= GGUF_N_VTYPES) return -1;
        size_t es = vsize(et);
        if (es) {
            if (n > (uint64_t)(r->end - r->p) / es) return -1;
            return take(r, (size_t)(n * es), &a);
        }
        if (n > (uint64_t)(r->end - r->p) / 8) return -1; /* every string or array takes 8 bytes at least */
        for (uint64_t i = 0; i < n; i++)
            if (skip_value(r, et, depth - 1)) return -1;
        return 0;
    }
    size_t es = vsize(t);
    return es ? take(r, es, &a) : -1;
}

const char *gguf_type_name(uint32_t type) {
    switch (type) {
    case GGML_F32: return "F32";
    case GGML_F16: return "F16";
    case GGML_BF16: return "BF16";
    case GGML_Q4_0: return "Q4_0";
    case GGML_Q8_0: return "Q8_0";
    case GGML_Q4_K: return "Q4_K";
    case GGML_Q6_K: return "Q6_K";
    default: return NULL;
    }
}

/* ggml's other types, for a message that names them */
static const char *other_type_name(uint32_t type) {
    static const char *n[] = {[3] = "Q4_1", [6] = "Q5_0", [7] = "Q5_1", [9] = "Q8_1", [10] = "Q2_K", [11] = "Q3_K",
                              [13] = "Q5_K", [15] = "Q8_K", [16] = "IQ2_XXS", [17] = "IQ2_XS", [18] = "IQ3_XXS",
                              [19] = "IQ1_S", [20] = "IQ4_NL", [21] = "IQ3_S", [22] = "IQ2_S", [23] = "IQ4_XS",
                              [24] = "I8", [25] = "I16", [26] = "I32", [27] = "I64", [28] = "F64", [29] = "IQ1_M",
                              [34] = "TQ1_0", [35] = "TQ2_0"};
    return type < sizeof n / sizeof *n && n[type] ? n[type] : NULL;
}

int gguf_block(uint32_t type, size_t *elems, size_t *bytes) {
    switch (type) {
    case GGML_F32: *elems = 1; *bytes = 4; return 0;
    case GGML_F16:
    case GGML_BF16: *elems = 1; *bytes = 2; return 0;
    case GGML_Q4_0: *elems = 32; *bytes = 18; return 0;
    case GGML_Q8_0: *elems = 32; *bytes = 34; return 0;
    case GGML_Q4_K: *elems = 256; *bytes = 144; return 0;
    case GGML_Q6_K: *elems = 256; *bytes = 210; return 0;
    default: return -1;
    }
}

int gguf_is(const uint8_t *data, size_t size) { return size >= 4 && !memcmp(data, "GGUF", 4); }

static int by_offset(const void *a, const void *b) {
    const gguf_tensor *x = *(const gguf_tensor *const *)a, *y = *(const gguf_tensor *const *)b;
    return x->data < y->data ? -1 : x->data > y->data;
}

static int kv_by_key(const void *a, const void *b) {
    const gguf_kv *x = *(const gguf_kv *const *)a, *y = *(const gguf_kv *const *)b;
    size_t n = x->klen < y->klen ? x->klen : y->klen;
    int c = memcmp(x->key, y->key, n);
    return c ? c : (x->klen > y->klen) - (x->klen < y->klen);
}

static int by_name(const void *a, const void *b) {
    const gguf_tensor *x = *(const gguf_tensor *const *)a, *y = *(const gguf_tensor *const *)b;
    size_t n = x->name_len < y->name_len ? x->name_len : y->name_len;
    int c = memcmp(x->name, y->name, n);
    return c ? c : (x->name_len > y->name_len) - (x->name_len < y->name_len);
}

#define BAD(...) eng__fail(err, errlen, ENG_EFORMAT, __VA_ARGS__)

static int parse_kv(rd *r, const char *name, gguf_file *g, size_t i, char *err, size_t errlen) {
    gguf_kv *kv = &g->kv[i];
    if (str(r, &kv->key, &kv->klen) || kv->klen == 0 || kv->klen > 65535)
        return BAD("%s: metadata entry %zu: bad key (the file is truncated or corrupt)", name, i);
    if (u32(r, &kv->type) || kv->type >= GGUF_N_VTYPES)
        return BAD("%s: metadata \"%.*s\": unknown value type", name, (int)kv->klen, kv->key);
    if (kv->type == GGUF_ARRAY) {
        kv->val = r->p;
        rd look = *r;
        if (u32(&look, &kv->arr_type) || u64(&look, &kv->n) || kv->arr_type >= GGUF_N_VTYPES)
            return BAD("%s: metadata \"%.*s\": bad array header", name, (int)kv->klen, kv->key);
        if (skip_value(r, GGUF_ARRAY, 4))
            return BAD("%s: metadata \"%.*s\": the array runs past the end of the file or nests too deep", name,
                       (int)kv->klen, kv->key);
        kv->val += 12; /* the first element */
    } else {
        kv->val = r->p;
        if (skip_value(r, kv->type, 0))
            return BAD("%s: metadata \"%.*s\": the value runs past the end of the file", name, (int)kv->klen, kv->key);
    }
    return ENG_OK;
}

static int parse_tensor(rd *r, const char *name, gguf_tensor *t, uint64_t *offset, size_t i, char *err,
                        size_t errlen) {
    if (str(r, &t->name, &t->name_len) || t->name_len == 0 || t->name_len > 255)
        return BAD("%s: tensor %zu: bad name (the file is truncated or corrupt)", name, i);
    const int nl = (int)t->name_len;
    if (u32(r, &t->n_dims) || t->n_dims < 1 || t->n_dims > 4)
        return BAD("%s: tensor \"%.*s\": %u dimensions (1 to 4 are possible)", name, nl, t->name, t->n_dims);
    t->n_elems = 1;
    for (uint32_t d = 0; d < t->n_dims; d++) {
        if (u64(r, &t->ne[d]) || t->ne[d] == 0 || t->ne[d] > (1ull << 40) || t->n_elems > (1ull << 40) / t->ne[d])
            return BAD("%s: tensor \"%.*s\": dimension %u is zero, absurd or missing", name, nl, t->name, d);
        t->n_elems *= t->ne[d];
    }
    for (uint32_t d = t->n_dims; d < 4; d++) t->ne[d] = 1;
    if (u32(r, &t->type) || u64(r, offset))
        return BAD("%s: tensor \"%.*s\": the file is truncated", name, nl, t->name);
    size_t be, bb;
    if (gguf_block(t->type, &be, &bb)) {
        const char *o = other_type_name(t->type);
        if (o) return eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: tensor \"%.*s\" has type %s, which kvserve does "
                                "not read (it reads F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q6_K)", name, nl, t->name, o);
        return BAD("%s: tensor \"%.*s\": unknown type %u", name, nl, t->name, t->type);
    }
    if (t->ne[0] % be)
        return BAD("%s: tensor \"%.*s\": %s rows of %llu elements are not whole blocks of %zu", name, nl, t->name,
                   gguf_type_name(t->type), (unsigned long long)t->ne[0], be);
    t->nbytes = (size_t)(t->n_elems / be * bb);
    return ENG_OK;
}

int gguf_parse(const uint8_t *data, size_t size, const char *name, gguf_file *out, char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    rd r = {data, data + size};
    const uint8_t *magic;
    uint64_t n_t, n_kv;
    if (take(&r, 4, &magic) || memcmp(magic, "GGUF", 4)) return BAD("%s: not a GGUF file (no GGUF magic)", name);
    if (u32(&r, &out->version)) return BAD("%s: truncated GGUF header", name);
    if (out->version == 0x02000000u || out->version == 0x03000000u)
        return eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: a big-endian GGUF file; kvserve reads little-endian ones",
                         name);
    if (out->version != 2 && out->version != 3)
        return eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: GGUF version %u (kvserve reads versions 2 and 3)", name,
                         out->version);
    if (u64(&r, &n_t) || u64(&r, &n_kv)) return BAD("%s: truncated GGUF header", name);
    /* a metadata entry takes 12 bytes at least, a tensor description 28 */
    if (n_kv > (size_t)(r.end - r.p) / 12 || n_t > (size_t)(r.end - r.p) / 28)
        return BAD("%s: the header counts %llu tensors and %llu metadata entries, more than the file can hold", name,
                   (unsigned long long)n_t, (unsigned long long)n_kv);
    out->n_kv = (size_t)n_kv;
    out->n_t = (size_t)n_t;
    out->kv = calloc(out->n_kv ? out->n_kv : 1, sizeof *out->kv);
    out->t = calloc(out->n_t ? out->n_t : 1, sizeof *out->t);
    uint64_t *offs = malloc((out->n_t ? out->n_t : 1) * sizeof *offs);
    gguf_tensor **order = malloc((out->n_t ? out->n_t : 1) * sizeof *order);
    int rc = ENG_OK;
    if (!out->kv || !out->t || !offs || !order) {
        rc = eng__fail(err, errlen, ENG_ENOMEM, "%s: out of memory", name);
        goto done;
    }
    for (size_t i = 0; i < out->n_kv && !rc; i++) rc = parse_kv(&r, name, out, i, err, errlen);
    if (rc) goto done;
    { /* a key twice: sorted, so that a file of millions of keys costs n log n, not n squared */
        const gguf_kv **keys = malloc((out->n_kv ? out->n_kv : 1) * sizeof *keys);
        if (!keys) {
            rc = eng__fail(err, errlen, ENG_ENOMEM, "%s: out of memory", name);
            goto done;
        }
        for (size_t i = 0; i < out->n_kv; i++) keys[i] = &out->kv[i];
        qsort(keys, out->n_kv, sizeof *keys, kv_by_key);
        for (size_t i = 1; i < out->n_kv && !rc; i++)
            if (!kv_by_key(&keys[i - 1], &keys[i]))
                rc = BAD("%s: metadata \"%.*s\" appears twice", name, (int)keys[i]->klen, keys[i]->key);
        free(keys);
        if (rc) goto done;
    }
    int64_t al = 32;
    const gguf_kv *a = gguf_get(out, "general.alignment");
    if (a && a->type != GGUF_U32) {
        rc = BAD("%s: general.alignment is not a uint32", name);
        goto done;
    }
    if (a) {
        uint32_t v;
        memcpy(&v, a->val, 4);
        al = v;
        if (al == 0 || (al & (al - 1)) || al > 65536) {
            rc = BAD("%s: general.alignment %lld is not a power of two up to 65536", name, (long long)al);
            goto done;
        }
    }
    out->alignment = (size_t)al;
    for (size_t i = 0; i < out->n_t && !rc; i++) rc = parse_tensor(&r, name, &out->t[i], &offs[i], i, err, errlen);
    if (rc) goto done;
    size_t head = (size_t)(r.p - data), start = (head + out->alignment - 1) / out->alignment * out->alignment;
    if (start > size && out->n_t) {
        rc = BAD("%s: the file ends before its tensor data", name);
        goto done;
    }
    for (size_t i = 0; i < out->n_t; i++) {
        gguf_tensor *t = &out->t[i];
        if (offs[i] % out->alignment) {
            rc = BAD("%s: tensor \"%.*s\": offset %llu is not a multiple of the alignment %zu", name, (int)t->name_len,
                     t->name, (unsigned long long)offs[i], out->alignment);
            goto done;
        }
        if (offs[i] > size - start || t->nbytes > size - start - offs[i]) {
            rc = BAD("%s: tensor \"%.*s\": its %zu bytes at offset %llu run past the end of the file (%zu bytes of data)",
                     name, (int)t->name_len, t->name, t->nbytes, (unsigned long long)offs[i], size - start);
            goto done;
        }
        t->data = data + start + offs[i];
        order[i] = t;
    }
    qsort(order, out->n_t, sizeof *order, by_name);
    for (size_t i = 1; i < out->n_t; i++)
        if (!by_name(&order[i - 1], &order[i])) {
            rc = BAD("%s: tensor \"%.*s\" appears twice", name, (int)order[i]->name_len, order[i]->name);
            goto done;
        }
    qsort(order, out->n_t, sizeof *order, by_offset);
    for (size_t i = 1; i < out->n_t; i++)
        if (order[i]->data < order[i - 1]->data + order[i - 1]->nbytes) {
            rc = BAD("%s: tensors \"%.*s\" and \"%.*s\" overlap", name, (int)order[i - 1]->name_len,
                     order[i - 1]->name, (int)order[i]->name_len, order[i]->name);
            goto done;
        }
done:
    free(offs);
    free(order);
    if (rc) gguf_free(out);
    return rc;
}

void gguf_free(gguf_file *g) {
    free(g->kv);
    free(g->t);
    memset(g, 0, sizeof *g);
}

const gguf_kv *gguf_get(const gguf_file *g, const char *key) {
    size_t n = strlen(key);
    for (size_t i = 0; i < g->n_kv; i++)
        if (g->kv[i].klen == n && !memcmp(g->kv[i].key, key, n)) return &g->kv[i];
    return NULL;
}

const gguf_tensor *gguf_tensor_find(const gguf_file *g, const char *name) {
    size_t n = strlen(name);
    for (size_t i = 0; i < g->n_t; i++)
        if (g->t[i].name_len == n && !memcmp(g->t[i].name, name, n)) return &g->t[i];
    return NULL;
}

static double num_at(uint32_t type, const uint8_t *p) {
    switch (type) {
    case GGUF_U8: return *p;
    case GGUF_I8: return (int8_t)*p;
    case GGUF_BOOL: return *p != 0;
    case GGUF_U16: { uint16_t v; memcpy(&v, p, 2); return v; }
    case GGUF_I16: { int16_t v; memcpy(&v, p, 2); return v; }
    case GGUF_U32: { uint32_t v; memcpy(&v, p, 4); return v; }
    case GGUF_I32: { int32_t v; memcpy(&v, p, 4); return v; }
    case GGUF_F32: { float v; memcpy(&v, p, 4); return v; }
    case GGUF_U64: { uint64_t v; memcpy(&v, p, 8); return (double)v; }
    case GGUF_I64: { int64_t v; memcpy(&v, p, 8); return (double)v; }
    case GGUF_F64: { double v; memcpy(&v, p, 8); return v; }
    default: return 0;
    }
}

int gguf_int(const gguf_file *g, const char *key, int64_t *out) {
    const gguf_kv *kv = gguf_get(g, key);
    if (!kv || kv->type == GGUF_F32 || kv->type == GGUF_F64 || kv->type == GGUF_STRING || kv->type == GGUF_ARRAY)
        return -1;
    if (kv->type == GGUF_U64) {
        uint64_t v;
        memcpy(&v, kv->val, 8);
        if (v > INT64_MAX) return -1;
        *out = (int64_t)v;
    } else if (kv->type == GGUF_I64) {
        memcpy(out, kv->val, 8);
    } else {
        *out = (int64_t)num_at(kv->type, kv->val);
    }
    return 0;
}

int gguf_num(const gguf_file *g, const char *key, double *out) {
    const gguf_kv *kv = gguf_get(g, key);
    if (!kv || kv->type == GGUF_STRING || kv->type == GGUF_ARRAY) return -1;
    *out = num_at(kv->type, kv->val);
    return 0;
}

int gguf_str(const gguf_file *g, const char *key, const char **s, size_t *len) {
    const gguf_kv *kv = gguf_get(g, key);
    if (!kv || kv->type != GGUF_STRING) return -1;
    const uint8_t *p = kv->val;
    gguf_next_str(&p, s, len);
    return 0;
}

void gguf_next_str(const uint8_t **p, const char **s, size_t *len) {
    uint64_t n;
    memcpy(&n, *p, 8);
    *s = (const char *)*p + 8;
    *len = (size_t)n;
    *p += 8 + n;
}

double gguf_arr_num(const gguf_kv *kv, uint64_t i) { return num_at(kv->arr_type, kv->val + i * vsize(kv->arr_type)); }

/* ---- block formats ------------------------------------------------------- */
static float half(const uint8_t *p) {
    float f;
    st_to_f32(ST_F16, p, &f, 1);
    return f;
}

/* Q8_0: a half scale d, then 32 signed bytes; x = d * q. */
static void q8_0(const uint8_t *b, float *y) {
    float d = half(b);
    for (int j = 0; j < 32; j++) y[j] = d * (float)(int8_t)b[2 + j];
}

/* Q4_0: a half scale d, then 16 bytes: element j in the low nibble of byte j,
 * element j + 16 in its high nibble; x = d * (q - 8). */
static void q4_0(const uint8_t *b, float *y) {
    float d = half(b);
    for (int j = 0; j < 16; j++) {
        y[j] = d * (float)((b[2 + j] & 15) - 8);
        y[j + 16] = d * (float)((b[2 + j] >> 4) - 8);
    }
}

/* Q4_K: half d and dmin, 12 bytes of eight 6-bit scales and eight 6-bit
 * mins, 128 bytes of 4-bit quants. Sub-block s (32 elements) is
 * d * scale[s] * q - dmin * min[s]; sub-blocks 2i and 2i+1 share bytes
 * 32i..32i+31, low nibbles then high nibbles. */
static void scale_min_k4(int j, const uint8_t *q, int *sc, int *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

static void q4_k(const uint8_t *b, float *y) {
    float d = half(b), dmin = half(b + 2);
    const uint8_t *scales = b + 4, *qs = b + 16;
    for (int i = 0; i < 4; i++) {
        int s0, m0, s1, m1;
        scale_min_k4(2 * i, scales, &s0, &m0);
        scale_min_k4(2 * i + 1, scales, &s1, &m1);
        float d0 = d * (float)s0, o0 = dmin * (float)m0, d1 = d * (float)s1, o1 = dmin * (float)m1;
        for (int l = 0; l < 32; l++) {
            y[64 * i + l] = d0 * (float)(qs[32 * i + l] & 15) - o0;
            y[64 * i + 32 + l] = d1 * (float)(qs[32 * i + l] >> 4) - o1;
        }
    }
}

/* Q6_K: 128 bytes of low 4 bits, 64 bytes of high 2 bits, 16 signed 8-bit
 * scales (one per 16 elements), a half d; x = d * scale * (q - 32). Each
 * half of 128 elements: byte l of ql holds elements l (low nibble) and l+64
 * (high), byte l+32 elements l+32 and l+96; byte l of qh their high bits. */
static void q6_k(const uint8_t *b, float *y) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    float d = half(b + 208);
    for (int h = 0; h < 2; h++, ql += 64, qh += 32, y += 128) {
        for (int l = 0; l < 32; l++) {
            int q1 = ((ql[l] & 15) | (((qh[l] >> 0) & 3) << 4)) - 32;
            int q2 = ((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32;
            int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            const int8_t *s = sc + 8 * h + l / 16;
            y[l] = d * (float)s[0] * (float)q1;
            y[l + 32] = d * (float)s[2] * (float)q2;
            y[l + 64] = d * (float)s[4] * (float)q3;
            y[l + 96] = d * (float)s[6] * (float)q4;
        }
    }
}

void gguf_to_f32(uint32_t type, const uint8_t *src, float *dst, size_t n) {
    switch (type) {
    case GGML_F32: memcpy(dst, src, n * sizeof(float)); return;
    case GGML_F16: st_to_f32(ST_F16, src, dst, n); return;
    case GGML_BF16: st_to_f32(ST_BF16, src, dst, n); return;
    case GGML_Q8_0: for (size_t i = 0; i < n / 32; i++) q8_0(src + 34 * i, dst + 32 * i); return;
    case GGML_Q4_0: for (size_t i = 0; i < n / 32; i++) q4_0(src + 18 * i, dst + 32 * i); return;
    case GGML_Q4_K: for (size_t i = 0; i < n / 256; i++) q4_k(src + 144 * i, dst + 256 * i); return;
    case GGML_Q6_K: for (size_t i = 0; i < n / 256; i++) q6_k(src + 210 * i, dst + 256 * i); return;
    default: memset(dst, 0, n * sizeof(float));
    }
}
