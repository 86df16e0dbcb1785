/* descindex.c — the reflection index over the embedded FileDescriptorSet
 * (descindex.h). Fields read (descriptor.proto): FileDescriptorSet.file (1);
 * FileDescriptorProto name (1), package (2), dependency (3), message_type
 * (4), enum_type (5), service (6); DescriptorProto name (1), nested_type (3),
 * enum_type (4); EnumDescriptorProto and MethodDescriptorProto name (1);
 * ServiceDescriptorProto name (1), method (2). */
#include "descindex.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const uint8_t *data;
    size_t len;
    char name[256];
    char **symbols;
    int n_symbols;
    int *deps;                  /* indices of the files it imports */
    int n_deps;
} file;

struct srv__desc_index {
    file *f;
    int n;
};

/* ---- protobuf wire reading --------------------------------------------- */
typedef struct {
    const uint8_t *p, *end;
} wire;

static int wire_varint(wire *w, uint64_t *v) {
    *v = 0;
    for (int sh = 0; sh < 64 && w->p < w->end; sh += 7) {
        uint8_t b = *w->p++;
        *v |= (uint64_t)(b & 0x7f) << sh;
        if (!(b & 0x80)) return 0;
    }
    return -1;
}

/* Next field: its number, and for a length-delimited field its bytes (data
 * NULL for the others, which are skipped). -1 at the end or on bad bytes. */
static int wire_next(wire *w, int *field, const uint8_t **data, size_t *len) {
    uint64_t key, v;
    if (w->p >= w->end || wire_varint(w, &key)) return -1;
    *field = (int)(key >> 3);
    *data = NULL;
    *len = 0;
    switch (key & 7) {
    case 0: return wire_varint(w, &v);
    case 1: if (w->end - w->p < 8) return -1; w->p += 8; return 0;
    case 5: if (w->end - w->p < 4) return -1; w->p += 4; return 0;
    case 2:
        if (wire_varint(w, &v) || v > (uint64_t)(w->end - w->p)) return -1;
        *data = w->p;
        *len = (size_t)v;
        w->p += v;
        return 0;
    default: return -1;
    }
}

/* ---- symbols ------------------------------------------------------------ */
static int add_symbol(file *f, const char *full) {
    char **ns = realloc(f->symbols, (size_t)(f->n_symbols + 1) * sizeof *ns);
    if (!ns) return -1;
    f->symbols = ns;
    if (!(f->symbols[f->n_symbols] = strdup(full))) return -1;
    f->n_symbols++;
    return 0;
}

/* A message ('m', with its nested messages and enums), an enum ('e'), a
 * service ('s', with its methods) or a method ('x') named under prefix. */
static int walk_named(file *f, const char *prefix, const uint8_t *d, size_t len, int kind) {
    wire w = {d, d + len};
    int fld;
    const uint8_t *v;
    size_t vl;
    char full[512] = "";
    while (!wire_next(&w, &fld, &v, &vl))
        if (fld == 1 && v) {
            snprintf(full, sizeof full, "%s%s%.*s", prefix, prefix[0] ? "." : "", (int)vl, (const char *)v);
            break;
        }
    if (!full[0]) return 0; /* unnamed: nothing to find it by */
    if (add_symbol(f, full)) return -1;
    for (w.p = d; !wire_next(&w, &fld, &v, &vl);) {
        if (!v) continue;
        int sub = kind == 'm' && fld == 3 ? 'm' : kind == 'm' && fld == 4 ? 'e' : kind == 's' && fld == 2 ? 'x' : 0;
        if (sub && walk_named(f, full, v, vl, sub)) return -1;
    }
    return 0;
}

/* One FileDescriptorProto: its name, package and symbols. */
static int index_file(file *f, const uint8_t *v, size_t vl) {
    memset(f, 0, sizeof *f);
    f->data = v;
    f->len = vl;
    char pkg[256] = "";
    wire w = {v, v + vl};
    const uint8_t *x;
    size_t xl;
    int ff;
    while (!wire_next(&w, &ff, &x, &xl)) {
        if (ff == 1 && x) snprintf(f->name, sizeof f->name, "%.*s", (int)xl, (const char *)x);
        if (ff == 2 && x) snprintf(pkg, sizeof pkg, "%.*s", (int)xl, (const char *)x);
    }
    for (w.p = v; !wire_next(&w, &ff, &x, &xl);) {
        if (!x) continue;
        int kind = ff == 4 ? 'm' : ff == 5 ? 'e' : ff == 6 ? 's' : 0;
        if (kind && walk_named(f, pkg, x, xl, kind)) return -1;
    }
    return 0;
}

/* The files file i imports, by name (imports not in the set are skipped). */
static int link_deps(srv__desc_index *x, int i) {
    wire w = {x->f[i].data, x->f[i].data + x->f[i].len};
    const uint8_t *v;
    size_t vl;
    int ff;
    while (!wire_next(&w, &ff, &v, &vl)) {
        if (ff != 3 || !v) continue;
        for (int k = 0; k < x->n; k++)
            if (strlen(x->f[k].name) == vl && !memcmp(x->f[k].name, v, vl)) {
                int *nd = realloc(x->f[i].deps, (size_t)(x->f[i].n_deps + 1) * sizeof *nd);
                if (!nd) return -1;
                x->f[i].deps = nd;
                x->f[i].deps[x->f[i].n_deps++] = k;
            }
    }
    return 0;
}

int srv__desc_open(srv__desc_index **out, const uint8_t *set, size_t len) {
    *out = NULL;
    srv__desc_index *x = calloc(1, sizeof *x);
    if (!x) return -1;
    wire w = {set, set + len};
    int fld;
    const uint8_t *v;
    size_t vl;
    while (w.p < w.end) {
        if (wire_next(&w, &fld, &v, &vl)) goto fail;
        if (fld != 1 || !v) continue;
        file *nf = realloc(x->f, (size_t)(x->n + 1) * sizeof *nf);
        if (!nf) goto fail;
        x->f = nf;
        if (index_file(&x->f[x->n++], v, vl)) goto fail;
    }
    for (int i = 0; i < x->n; i++)
        if (link_deps(x, i)) goto fail;
    *out = x;
    return 0;
fail:
    srv__desc_close(x);
    return -1;
}

void srv__desc_close(srv__desc_index *x) {
    if (!x) return;
    for (int i = 0; i < x->n; i++) {
        for (int k = 0; k < x->f[i].n_symbols; k++) free(x->f[i].symbols[k]);
        free(x->f[i].symbols);
        free(x->f[i].deps);
    }
    free(x->f);
    free(x);
}

int srv__desc_count(const srv__desc_index *x) { return x ? x->n : 0; }

int srv__desc_by_name(const srv__desc_index *x, const char *name) {
    for (int i = 0; x && name && i < x->n; i++)
        if (!strcmp(x->f[i].name, name)) return i;
    return -1;
}

int srv__desc_by_symbol(const srv__desc_index *x, const char *symbol) {
    for (int i = 0; x && symbol && i < x->n; i++)
        for (int k = 0; k < x->f[i].n_symbols; k++)
            if (!strcmp(x->f[i].symbols[k], symbol)) return i;
    return -1;
}

static void closure(const srv__desc_index *x, int i, unsigned char *seen, const uint8_t **data, size_t *len,
                    size_t max, size_t *n) {
    if (seen[i]) return;
    seen[i] = 1;
    if (*n < max) {
        data[*n] = x->f[i].data;
        len[*n] = x->f[i].len;
    }
    (*n)++;
    for (int k = 0; k < x->f[i].n_deps; k++) closure(x, x->f[i].deps[k], seen, data, len, max, n);
}

size_t srv__desc_closure(const srv__desc_index *x, int i, const uint8_t **data, size_t *len, size_t max) {
    if (!x || i < 0 || i >= x->n) return 0;
    unsigned char *seen = calloc((size_t)x->n, 1);
    if (!seen) return 0;
    size_t n = 0;
    closure(x, i, seen, data, len, max, &n);
    free(seen);
    return n;
}
