/* safetensors.c — parse and validate safetensors files.
 *
 * Layout: u64 little-endian header length N, N bytes of JSON
 * {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
 *  "__metadata__": {...}}, then the data section. Offsets are relative to the
 * data section. Nothing in the header is trusted: every range is checked
 * against the file size, the shape and the other tensors. */
#include "internal.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define ST_MAX_HEADER (100u << 20)

static int dtype_of(const char *s, enum st_dtype *dt, size_t *esize) {
    if (strcmp(s, "F32") == 0) { *dt = ST_F32; *esize = 4; return 1; }
    if (strcmp(s, "F16") == 0) { *dt = ST_F16; *esize = 2; return 1; }
    if (strcmp(s, "BF16") == 0) { *dt = ST_BF16; *esize = 2; return 1; }
    return 0;
}

static int cmp_range(const void *a, const void *b) {
    const st_tensor *x = *(const st_tensor *const *)a, *y = *(const st_tensor *const *)b;
    return (x->data > y->data) - (x->data < y->data);
}

void st_free(st_file *f) {
    if (!f) return;
    for (int i = 0; i < f->n; i++) free(f->t[i].name);
    free(f->t);
    f->t = NULL;
    f->n = 0;
}

int st_parse(const uint8_t *data, size_t size, const char *name, st_file *out,
             char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    if (size < 8)
        return eng__fail(err, errlen, ENG_EFORMAT, "%s: truncated (%zu bytes, no header length)", name, size);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | data[i];
    if (hlen > ST_MAX_HEADER || hlen > size - 8)
        return eng__fail(err, errlen, ENG_EFORMAT, "%s: header length %llu exceeds the file (%zu bytes)",
                         name, (unsigned long long)hlen, size);
    const uint8_t *base = data + 8 + hlen;
    size_t dsize = size - 8 - (size_t)hlen;
    cJSON *root = cJSON_ParseWithLength((const char *)data + 8, (size_t)hlen);
    if (!root || !cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return eng__fail(err, errlen, ENG_EFORMAT, "%s: header is not a JSON object", name);
    }
    int rc = ENG_OK, n = cJSON_GetArraySize(root);
    st_tensor **sorted = NULL;
    out->t = calloc((size_t)n + 1, sizeof *out->t);
    if (!out->t) { rc = eng__fail(err, errlen, ENG_ENOMEM, "%s: out of memory", name); goto out; }
    const cJSON *it;
    cJSON_ArrayForEach(it, root) {
        const char *tn = it->string ? it->string : "";
        if (strcmp(tn, "__metadata__") == 0) continue;
        if (!cJSON_IsObject(it)) {
            rc = eng__fail(err, errlen, ENG_EFORMAT, "%s: tensor \"%s\": entry is not an object", name, tn);
            goto out;
        }
        const cJSON *jd = cJSON_GetObjectItemCaseSensitive(it, "dtype");
        const cJSON *js = cJSON_GetObjectItemCaseSensitive(it, "shape");
        const cJSON *jo = cJSON_GetObjectItemCaseSensitive(it, "data_offsets");
        if (!cJSON_IsString(jd) || !cJSON_IsArray(js) || !cJSON_IsArray(jo) || cJSON_GetArraySize(jo) != 2) {
            rc = eng__fail(err, errlen, ENG_EFORMAT, "%s: tensor \"%s\": needs dtype, shape and data_offsets [begin, end]",
                           name, tn);
            goto out;
        }
        st_tensor *t = &out->t[out->n];
        size_t esize;
        if (!dtype_of(jd->valuestring, &t->dtype, &esize)) {
            rc = eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: tensor \"%s\": dtype %s is not supported (F32, F16, BF16)",
                           name, tn, jd->valuestring);
            goto out;
        }
        int nd = cJSON_GetArraySize(js);
        if (nd > 4) {
            rc = eng__fail(err, errlen, ENG_EFORMAT, "%s: tensor \"%s\": %d dimensions (at most 4)", name, tn, nd);
            goto out;
        }
        uint64_t numel = 1;
        const cJSON *d;
        int k = 0;
        cJSON_ArrayForEach(d, js) {
            if (!cJSON_IsNumber(d) || d->valuedouble < 0 || d->valuedouble > 1e12 ||
                d->valuedouble != floor(d->valuedouble)) {
                rc = eng__fail(err, errlen, ENG_EFORMAT, "%s: tensor \"%s\": bad shape", name, tn);
                goto out;
            }
            t->shape[k++] = (int64_t)d->valuedouble;
            numel *= (uint64_t)d->valuedouble;
            if (numel > (1ull << 40)) {
                rc = eng__fail(err, errlen, ENG_EFORMAT, "%s: tensor \"%s\": shape too large", name, tn);
                goto out;
            }
        }
        t->ndim = nd;
        double ob = cJSON_GetArrayItem(jo, 0)->valuedouble, oe = cJSON_GetArrayItem(jo, 1)->valuedouble;
        if (!cJSON_IsNumber(cJSON_GetArrayItem(jo, 0)) || !cJSON_IsNumber(cJSON_GetArrayItem(jo, 1)) ||
            ob != floor(ob) || oe != floor(oe)) {
            rc = eng__fail(err, errlen, ENG_EFORMAT, "%s: tensor \"%s\": data_offsets must be two whole numbers (got "
                           "[%.17g, %.17g])", name, tn, ob, oe);
            goto out;
        }
        if (ob < 0 || oe < ob || oe > (double)dsize) {
            rc = eng__fail(err, errlen, ENG_EFORMAT,
                           "%s: tensor \"%s\": data_offsets [%.0f, %.0f] lie outside the data section (%zu bytes)%s",
                           name, tn, ob, oe, dsize, oe > (double)dsize ? ": file truncated?" : "");
            goto out;
        }
        if ((uint64_t)(oe - ob) != numel * esize) {
            rc = eng__fail(err, errlen, ENG_EFORMAT,
                           "%s: tensor \"%s\": data_offsets cover %.0f bytes but shape and dtype need %llu",
                           name, tn, oe - ob, (unsigned long long)(numel * esize));
            goto out;
        }
        t->data = base + (size_t)ob;
        t->nbytes = (size_t)(oe - ob);
        t->name = strdup(tn);
        if (!t->name) { rc = eng__fail(err, errlen, ENG_ENOMEM, "%s: out of memory", name); goto out; }
        out->n++;
    }
    /* No two tensors may share bytes. */
    sorted = malloc(((size_t)out->n + 1) * sizeof *sorted);
    if (!sorted) { rc = eng__fail(err, errlen, ENG_ENOMEM, "%s: out of memory", name); goto out; }
    for (int i = 0; i < out->n; i++) sorted[i] = &out->t[i];
    qsort(sorted, (size_t)out->n, sizeof *sorted, cmp_range);
    for (int i = 1; i < out->n; i++) {
        if (sorted[i - 1]->data + sorted[i - 1]->nbytes > sorted[i]->data) {
            rc = eng__fail(err, errlen, ENG_EFORMAT, "%s: tensors \"%s\" and \"%s\" overlap", name,
                           sorted[i - 1]->name, sorted[i]->name);
            goto out;
        }
    }
out:
    free(sorted);
    cJSON_Delete(root);
    if (rc != ENG_OK) st_free(out);
    return rc;
}

const st_tensor *st_find(const st_file *f, const char *name) {
    for (int i = 0; i < f->n; i++)
        if (strcmp(f->t[i].name, name) == 0) return &f->t[i];
    return NULL;
}

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) bits = sign;
        else { /* subnormal */
            float f = (float)man * (1.0f / 16777216.0f);
            return sign ? -f : f;
        }
    } else if (exp == 31) bits = sign | 0x7f800000u | (man << 13);
    else bits = sign | ((exp + 112) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

void st_to_f32(enum st_dtype dt, const uint8_t *src, float *dst, size_t n) {
    switch (dt) {
    case ST_F32: memcpy(dst, src, n * 4); break;
    case ST_F16:
        for (size_t i = 0; i < n; i++) dst[i] = half_to_float((uint16_t)(src[2 * i] | src[2 * i + 1] << 8));
        break;
    case ST_BF16:
        for (size_t i = 0; i < n; i++) {
            uint32_t bits = (uint32_t)(src[2 * i] | src[2 * i + 1] << 8) << 16;
            memcpy(&dst[i], &bits, 4);
        }
        break;
    }
}
