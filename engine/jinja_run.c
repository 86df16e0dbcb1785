/* jinja_run.c — chat templates, part two: values and the renderer (jinja.h;
 * the parser is jinja.c).
 *
 * Values are reference counted (jv); the constants undefined, none, true and
 * false are static. Lists, dicts, tuples, keyword arguments and the `loop`
 * object never change once built; namespaces do (set ns.x = ...), so they
 * are the only way to a cycle: every namespace is remembered by the
 * rendering and emptied at its end. Scopes (env) are reference counted too
 * because a {% call %} block's caller() keeps the scope it was written in.
 * Freeing never recurses, however deep a value is nested.
 *
 * The semantics are @huggingface/jinja 0.5.11's, read from its source and
 * written anew here: JavaScript numbers (one double; integer or float is a
 * flag), printing and ~ through JavaScript's String(), == as JavaScript's
 * loose equality, `in` as strict equality, string lengths and indexes in
 * UTF-16 units but slices in code points, filters chosen by the operand's
 * type, macros that see the caller's variables. Each refusal is an error
 * naming the line and column of the expression at fault. */
#include "jinja.h"
#include "internal.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <utf8proc.h>

enum { MAX_RENDER_DEPTH = 1000, MAX_VALUE_DEPTH = 512 };

typedef enum { JV_UNDEF, JV_NULL, JV_BOOL, JV_INT, JV_FLOAT, JV_STR, JV_LIST, JV_TUPLE, JV_DICT, JV_KWARGS, JV_NS,
               JV_FUNC } jv_kind;

/* functions: the globals, macros, caller() of a call block, and methods bound to a string or dict */
enum { F_NAMESPACE, F_RAISE, F_RANGE, F_STRFTIME, F_MACRO, F_CALLER, F_METHOD };
enum { M_UPPER, M_LOWER, M_STRIP, M_TITLE, M_CAPITALIZE, M_RSTRIP, M_LSTRIP, M_STARTSWITH, M_ENDSWITH, M_SPLIT,
       M_REPLACE, M_GET, M_ITEMS, M_KEYS, M_VALUES, M_DICTSORT };

typedef struct jv jv;
typedef struct env env;
typedef struct {
    char *k;
    size_t kn;
    jv *v;
} jent;

struct jv {
    int rc;                 /* references; -1 for the static constants */
    jv_kind k;
    jv *next;               /* the free list while being freed */
    union {
        int b;
        double num;                                   /* INT, FLOAT */
        struct { char *p; size_t n; } s;              /* STR: NUL-terminated, UTF-8 */
        struct { jv **v; size_t n, cap; } l;          /* LIST, TUPLE */
        struct { jent *e; size_t n, cap; } d;         /* DICT, KWARGS, NS: insertion order */
        struct { int fk, m; jv *self; const jn *node; env *scope; } f;
    } u;
};

struct env {
    int rc;
    env *parent;
    jent *e;
    size_t n, cap;
};

static jv V_UNDEF = {.rc = -1, .k = JV_UNDEF}, V_NULL = {.rc = -1, .k = JV_NULL},
          V_TRUE = {.rc = -1, .k = JV_BOOL, .u.b = 1}, V_FALSE = {.rc = -1, .k = JV_BOOL, .u.b = 0};

enum { FLOW_NONE, FLOW_BREAK, FLOW_CONTINUE };

typedef struct {
    const eng__jinja *t;
    char *err;
    size_t errlen;
    int rc;                 /* set once the rendering has failed */
    int flow;               /* a {% break %} / {% continue %} on its way to its loop */
    int depth;
    long steps;
    const jn *cur;          /* the node being evaluated: where an error without a node of its own is */
    jv **ns;                /* every namespace made (emptied at the end: cycles) */
    size_t nns, cap_ns;
} rt;

/* ---- errors --------------------------------------------------------------- */
static void vfail(rt *r, const jn *at, const char *fmt, va_list ap) {
    if (r->rc) return;
    r->rc = ENG_EINVAL;
    if (!at) at = r->cur;
    char msg[480];
    vsnprintf(msg, sizeof msg, fmt, ap);
    if (!at) { eng__fail(r->err, r->errlen, ENG_EINVAL, "%s", msg); return; }
    int line, col;
    eng__jinja_where(r->t, at->pos, &line, &col);
    eng__fail(r->err, r->errlen, ENG_EINVAL, "template line %d:%d: %s", line, col, msg);
}

__attribute__((format(printf, 3, 4))) static jv *fail(rt *r, const jn *at, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfail(r, at, fmt, ap);
    va_end(ap);
    return NULL;
}

__attribute__((format(printf, 3, 4))) static int failc(rt *r, const jn *at, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfail(r, at, fmt, ap);
    va_end(ap);
    return -1;
}

static void *oom(rt *r) {
    if (!r->rc) r->rc = eng__fail(r->err, r->errlen, ENG_ENOMEM, "out of memory");
    return NULL;
}

static const char *kind_name(const jv *v) {
    static const char *const names[] = {"undefined", "none", "boolean", "integer", "float", "string", "list",
                                        "tuple", "dict", "keyword arguments", "namespace", "function"};
    return names[v->k];
}

/* ---- values --------------------------------------------------------------- */
static jv *ref(jv *v) {
    if (v && v->rc >= 0) v->rc++;
    return v;
}

static void env_drop(env *e);

/* Release v; whatever reaches no references is freed, without recursion. */
static void drop(jv *v) {
    if (!v || v->rc < 0 || --v->rc > 0) return;
    v->next = NULL;
    for (jv *dead = v; dead;) {
        jv *x = dead;
        dead = x->next;
#define RELEASE(c)                                                          \
        do {                                                                \
            jv *c_ = (c);                                                   \
            if (c_ && c_->rc >= 0 && --c_->rc == 0) { c_->next = dead; dead = c_; } \
        } while (0)
        if (x->k == JV_LIST || x->k == JV_TUPLE) {
            for (size_t i = 0; i < x->u.l.n; i++) RELEASE(x->u.l.v[i]);
            free(x->u.l.v);
        } else if (x->k == JV_DICT || x->k == JV_KWARGS || x->k == JV_NS) {
            for (size_t i = 0; i < x->u.d.n; i++) { RELEASE(x->u.d.e[i].v); free(x->u.d.e[i].k); }
            free(x->u.d.e);
        } else if (x->k == JV_FUNC) {
            RELEASE(x->u.f.self);
            env_drop(x->u.f.scope);
        }
#undef RELEASE
        free(x);
    }
}

static jv *jv_new(rt *r, jv_kind k, size_t extra) {
    jv *v = calloc(1, sizeof *v + extra);
    if (!v) return oom(r);
    v->rc = 1;
    v->k = k;
    return v;
}

static jv *mk_num(rt *r, jv_kind k, double x) {
    jv *v = jv_new(r, k, 0);
    if (v) v->u.num = x;
    return v;
}

static jv *mk_bool(int b) { return b ? &V_TRUE : &V_FALSE; }

static jv *mk_str(rt *r, const jn *at, const char *s, size_t n) {
    if (n > ENG__JINJA_MAX_OUTPUT) return fail(r, at, "a string would exceed %d MiB", ENG__JINJA_MAX_OUTPUT >> 20);
    jv *v = jv_new(r, JV_STR, n + 1);
    if (!v) return NULL;
    v->u.s.p = (char *)(v + 1);
    if (n) memcpy(v->u.s.p, s, n);
    v->u.s.p[n] = 0;
    v->u.s.n = n;
    return v;
}

static jv *mk_cstr(rt *r, const char *s) { return mk_str(r, NULL, s, strlen(s)); }

/* A string from a buffer, which is freed. */
static jv *mk_buf(rt *r, const jn *at, eng__buf *b) {
    jv *v = r->rc ? NULL : mk_str(r, at, b->p ? b->p : "", b->n);
    free(b->p);
    *b = (eng__buf){0};
    return v;
}

/* Append to a buffer within the output limit. */
static int emit(rt *r, eng__buf *b, const char *s, size_t n) {
    if (r->rc) return -1;
    if (b->n + n > ENG__JINJA_MAX_OUTPUT)
        return failc(r, NULL, "text would exceed %d MiB", ENG__JINJA_MAX_OUTPUT >> 20);
    if (eng__buf_add(b, s, n)) { oom(r); return -1; }
    return 0;
}
static int emits(rt *r, eng__buf *b, const char *s) { return emit(r, b, s, strlen(s)); }

static jv *mk_list(rt *r, jv_kind k) { return jv_new(r, k, 0); }

/* Append x (its reference is taken, also on failure). */
static int list_add(rt *r, jv *l, jv *x) {
    if (!x) return -1;
    if (l->u.l.n == l->u.l.cap) {
        if (l->u.l.n >= ENG__JINJA_MAX_ITEMS) {
            drop(x);
            return failc(r, NULL, "a list would have more than %d items", ENG__JINJA_MAX_ITEMS);
        }
        size_t cap = l->u.l.cap ? l->u.l.cap * 2 : 8;
        jv **nv = realloc(l->u.l.v, cap * sizeof *nv);
        if (!nv) { drop(x); oom(r); return -1; }
        l->u.l.v = nv;
        l->u.l.cap = cap;
    }
    l->u.l.v[l->u.l.n++] = x;
    return 0;
}

static jv *mk_dict(rt *r, jv_kind k) {
    jv *d = jv_new(r, k, 0);
    if (d && k == JV_NS) {
        if (r->nns == r->cap_ns) {
            size_t cap = r->cap_ns ? r->cap_ns * 2 : 16;
            jv **nv = realloc(r->ns, cap * sizeof *nv);
            if (!nv) { drop(d); return oom(r); }
            r->ns = nv;
            r->cap_ns = cap;
        }
        r->ns[r->nns++] = ref(d);
    }
    return d;
}

static jent *ent_find(jent *e, size_t n, const char *k, size_t kn) {
    for (size_t i = 0; i < n; i++)
        if (e[i].kn == kn && !memcmp(e[i].k, k, kn)) return &e[i];
    return NULL;
}

/* Set key k to x in entries (insertion order; an existing key keeps its place). Takes x. */
static int ent_put(rt *r, jent **e, size_t *n, size_t *cap, const char *k, size_t kn, jv *x) {
    if (!x) return -1;
    jent *f = ent_find(*e, *n, k, kn);
    if (f) { drop(f->v); f->v = x; return 0; }
    if (*n == *cap) {
        size_t nc = *cap ? *cap * 2 : 8;
        jent *ne = realloc(*e, nc * sizeof *ne);
        if (!ne) { drop(x); oom(r); return -1; }
        *e = ne;
        *cap = nc;
    }
    char *key = malloc(kn + 1);
    if (!key) { drop(x); oom(r); return -1; }
    memcpy(key, k, kn);
    key[kn] = 0;
    (*e)[(*n)++] = (jent){key, kn, x};
    return 0;
}

static int dict_put(rt *r, jv *d, const char *k, size_t kn, jv *x) {
    return ent_put(r, &d->u.d.e, &d->u.d.n, &d->u.d.cap, k, kn, x);
}

static jv *dict_get(const jv *d, const char *k, size_t kn) {
    jent *f = ent_find(d->u.d.e, d->u.d.n, k, kn);
    return f ? f->v : NULL;
}

static int is_list(const jv *v) { return v->k == JV_LIST || v->k == JV_TUPLE; }
static int is_dict(const jv *v) { return v->k == JV_DICT || v->k == JV_KWARGS; } /* an ObjectValue */
static int is_attrs(const jv *v) { return is_dict(v) || v->k == JV_NS; }
static int is_num(const jv *v) { return v->k == JV_INT || v->k == JV_FLOAT; }
static int is_numlike(const jv *v) { return is_num(v) || v->k == JV_BOOL; }
static double numlike(const jv *v) { return v->k == JV_BOOL ? v->u.b : v->u.num; }

/* JavaScript's Number.isInteger decides the kind of a number from outside. */
static jv *mk_number(rt *r, double x) {
    return mk_num(r, isfinite(x) && x == trunc(x) ? JV_INT : JV_FLOAT, x);
}

/* __bool__ */
static int truthy(const jv *v) {
    switch (v->k) {
    case JV_UNDEF: case JV_NULL: return 0;
    case JV_BOOL: return v->u.b;
    case JV_INT: case JV_FLOAT: return v->u.num != 0 && !isnan(v->u.num);
    case JV_STR: return v->u.s.n > 0;
    case JV_LIST: case JV_TUPLE: return v->u.l.n > 0;
    case JV_DICT: case JV_KWARGS: return v->u.d.n > 0;
    default: return 1; /* a namespace, a function */
    }
}

/* JavaScript's truthiness of the raw value (what `!x.value` tests). */
static int raw_truthy(const jv *v) {
    if (v->k == JV_LIST || v->k == JV_TUPLE || is_dict(v)) return 1;
    return truthy(v);
}

/* ---- environments --------------------------------------------------------- */
static env *env_new(rt *r, env *parent) {
    env *e = calloc(1, sizeof *e);
    if (!e) return oom(r);
    e->rc = 1;
    e->parent = parent;
    if (parent) parent->rc++;
    return e;
}

static void env_drop(env *e) {
    while (e && --e->rc == 0) {
        env *p = e->parent;
        for (size_t i = 0; i < e->n; i++) { drop(e->e[i].v); free(e->e[i].k); }
        free(e->e);
        free(e);
        e = p;
    }
}

static int env_set(rt *r, env *e, const char *k, size_t kn, jv *x) { return ent_put(r, &e->e, &e->n, &e->cap, k, kn, x); }

static jv *env_get(const env *e, const char *k, size_t kn) {
    for (; e; e = e->parent) {
        jent *f = ent_find(e->e, e->n, k, kn);
        if (f) return f->v;
    }
    return NULL;
}

/* ---- JavaScript numbers ----------------------------------------------------- */
/* Number.prototype.toString(): the shortest digits that read back as x. */
static void num_fmt(double x, char *o) {
    if (isnan(x)) { strcpy(o, "NaN"); return; }
    if (isinf(x)) { strcpy(o, x < 0 ? "-Infinity" : "Infinity"); return; }
    if (x == 0) { strcpy(o, "0"); return; }
    char e[40];
    for (int p = 1; p <= 17; p++) {
        snprintf(e, sizeof e, "%.*e", p - 1, x);
        if (strtod(e, NULL) == x) break;
    }
    char d[24];
    int k = 0;
    const char *s = e + (e[0] == '-');
    for (; *s && *s != 'e'; s++)
        if (*s != '.') d[k++] = *s;
    int n = atoi(s + 1) + 1; /* the decimal point is after digit n */
    while (k > 1 && d[k - 1] == '0') k--;
    char *w = o;
    if (x < 0) *w++ = '-';
    if (k <= n && n <= 21) {
        memcpy(w, d, (size_t)k);
        w += k;
        for (int i = k; i < n; i++) *w++ = '0';
    } else if (n > 0 && n <= 21) {
        memcpy(w, d, (size_t)n);
        w += n;
        *w++ = '.';
        memcpy(w, d + n, (size_t)(k - n));
        w += k - n;
    } else if (n > -6 && n <= 0) {
        *w++ = '0';
        *w++ = '.';
        for (int i = 0; i < -n; i++) *w++ = '0';
        memcpy(w, d, (size_t)k);
        w += k;
    } else {
        *w++ = d[0];
        if (k > 1) { *w++ = '.'; memcpy(w, d + 1, (size_t)(k - 1)); w += k - 1; }
        w += sprintf(w, "e%c%d", n - 1 >= 0 ? '+' : '-', abs(n - 1));
    }
    *w = 0;
}

/* FloatValue.toString(): integral values keep one decimal ("1.0", "-0.0"). */
static void float_fmt(double x, char *o) {
    if (x == 0 && signbit(x)) strcpy(o, "-0.0");
    else if (isfinite(x) && x == trunc(x) && fabs(x) < 1e21) snprintf(o, 40, "%.1f", x);
    else num_fmt(x, o);
}

static const char *skip_js_space(const char *s, const char *end) {
    while (s < end) {
        int k;
        if (!eng__js_space(eng__js_cp(s, (size_t)(end - s), &k))) break;
        s += k;
    }
    return s;
}

static const char *digits(const char *s, const char *end) {
    while (s < end && *s >= '0' && *s <= '9') s++;
    return s;
}

/* The longest StrDecimalLiteral at s ([+-] Infinity | digits [. digits] [e[+-]digits] | . digits ...); s if none. */
static const char *decimal_end(const char *s, const char *end) {
    const char *p = s + (s < end && (*s == '+' || *s == '-'));
    if (end - p >= 8 && !memcmp(p, "Infinity", 8)) return p + 8;
    const char *q = digits(p, end);
    int any = q > p;
    if (q < end && *q == '.') {
        const char *f = digits(q + 1, end);
        if (any || f > q + 1) { any = 1; q = f; }
    }
    if (!any) return s;
    if (q < end && (*q == 'e' || *q == 'E')) {
        const char *x = q + 1 + (q + 1 < end && (q[1] == '+' || q[1] == '-'));
        const char *xe = digits(x, end);
        if (xe > x) q = xe;
    }
    return q;
}

static double parse_decimal(const char *s, const char *end) {
    const char *p = s + (*s == '+' || *s == '-');
    if (end - p == 8 && !memcmp(p, "Infinity", 8)) return *s == '-' ? -INFINITY : INFINITY;
    char buf[400];
    size_t n = (size_t)(end - s);
    if (n >= sizeof buf) { /* a long literal: strtod on a copy of it */
        char *tmp = malloc(n + 1);
        if (!tmp) return NAN;
        memcpy(tmp, s, n);
        tmp[n] = 0;
        double v = strtod(tmp, NULL);
        free(tmp);
        return v;
    }
    memcpy(buf, s, n);
    buf[n] = 0;
    return strtod(buf, NULL);
}

/* Number(string) */
static double str_to_num(const char *s, size_t n) {
    const char *end = s + n;
    s = skip_js_space(s, end);
    while (end > s) { /* trailing whitespace */
        const char *b = end - 1;
        while (b > s && ((unsigned char)*b & 0xC0) == 0x80) b--;
        int k;
        if (!eng__js_space(eng__js_cp(b, (size_t)(end - b), &k))) break;
        end = b;
    }
    if (s == end) return 0;
    if (end - s > 2 && s[0] == '0' && strchr("xXoObB", s[1])) {
        int base = (s[1] | 0x20) == 'x' ? 16 : (s[1] | 0x20) == 'o' ? 8 : 2;
        double v = 0;
        for (const char *p = s + 2; p < end; p++) {
            int d = *p >= '0' && *p <= '9' ? *p - '0' : (*p | 0x20) >= 'a' && (*p | 0x20) <= 'f' ? (*p | 0x20) - 'a' + 10 : 99;
            if (d >= base) return NAN;
            v = v * base + d;
        }
        return v;
    }
    return decimal_end(s, end) == end ? parse_decimal(s, end) : NAN;
}

/* parseInt(string, 10) */
static double parse_int(const char *s, size_t n) {
    const char *end = s + n;
    s = skip_js_space(s, end);
    int neg = s < end && *s == '-';
    if (s < end && (*s == '-' || *s == '+')) s++;
    const char *e = digits(s, end);
    if (e == s) return NAN;
    double v = parse_decimal(s, e);
    return neg ? -v : v;
}

/* parseFloat(string) */
static double parse_float(const char *s, size_t n) {
    const char *end = s + n;
    s = skip_js_space(s, end);
    const char *e = decimal_end(s, end);
    return e == s ? NAN : parse_decimal(s, e);
}

/* ---- JavaScript strings --------------------------------------------------- */
static uint32_t cp_at(const char *s, size_t n, size_t i, int *k) { return eng__js_cp(s + i, n - i, k); }

static size_t utf16_len(const char *s, size_t n) {
    size_t u = 0;
    for (size_t i = 0; i < n;) {
        int k;
        u += cp_at(s, n, i, &k) >= 0x10000 ? 2 : 1;
        i += (size_t)k;
    }
    return u;
}

static size_t cp_count(const char *s, size_t n) {
    size_t c = 0;
    for (size_t i = 0; i < n; i++) c += ((unsigned char)s[i] & 0xC0) != 0x80;
    return c;
}

/* Byte offset of code point number c (n if past the end). */
static size_t cp_offset(const char *s, size_t n, size_t c) {
    size_t i = 0;
    for (; i < n && c; c--) {
        i++;
        while (i < n && ((unsigned char)s[i] & 0xC0) == 0x80) i++;
    }
    return i;
}

static int put_cp(rt *r, eng__buf *b, uint32_t cp) {
    utf8proc_uint8_t u[4];
    return emit(r, b, (const char *)u, (size_t)utf8proc_encode_char((utf8proc_int32_t)cp, u));
}

static int is_cased(uint32_t c) {
    utf8proc_category_t k = utf8proc_category((utf8proc_int32_t)c);
    return k == UTF8PROC_CATEGORY_LU || k == UTF8PROC_CATEGORY_LL || k == UTF8PROC_CATEGORY_LT;
}

/* toUpperCase's mappings of one character to several (SpecialCasing.txt, unconditional). */
static const char *upper_special(uint32_t c) {
    switch (c) {
    case 0xDF: return "SS";
    case 0x149: return "\xCA\xBCN";
    case 0x1F0: return "J\xCC\x8C";
    case 0x390: return "\xCE\x99\xCC\x88\xCC\x81";
    case 0x3B0: return "\xCE\xA5\xCC\x88\xCC\x81";
    case 0x587: return "\xD4\xB5\xD5\x92";
    case 0x1E96: return "H\xCC\xB1";
    case 0x1E97: return "T\xCC\x88";
    case 0x1E98: return "W\xCC\x8A";
    case 0x1E99: return "Y\xCC\x8A";
    case 0x1E9A: return "A\xCA\xBE";
    case 0xFB00: return "FF";
    case 0xFB01: return "FI";
    case 0xFB02: return "FL";
    case 0xFB03: return "FFI";
    case 0xFB04: return "FFL";
    case 0xFB05: case 0xFB06: return "ST";
    case 0xFB13: return "\xD5\x84\xD5\x86";
    case 0xFB14: return "\xD5\x84\xD4\xB5";
    case 0xFB15: return "\xD5\x84\xD4\xBB";
    case 0xFB16: return "\xD5\x8E\xD5\x86";
    case 0xFB17: return "\xD5\x84\xD4\xBD";
    default: return NULL;
    }
}

/* toUpperCase / toLowerCase of s, appended to o. */
static int case_map(rt *r, const char *s, size_t n, int upper, eng__buf *o) {
    uint32_t prev = 0;
    for (size_t i = 0; i < n;) {
        int k;
        uint32_t c = cp_at(s, n, i, &k), m;
        const char *sp = upper ? upper_special(c) : c == 0x130 ? "i\xCC\x87" : NULL;
        i += (size_t)k;
        if (sp) {
            if (emits(r, o, sp)) return -1;
            prev = c;
            continue;
        }
        if (upper) m = (uint32_t)utf8proc_toupper((utf8proc_int32_t)c);
        else if (c == 0x3A3 && is_cased(prev) && !(i < n && is_cased(cp_at(s, n, i, &k)))) m = 0x3C2; /* final sigma */
        else m = (uint32_t)utf8proc_tolower((utf8proc_int32_t)c);
        if (put_cp(r, o, m)) return -1;
        prev = c;
    }
    return 0;
}

static jv *str_case(rt *r, const jv *s, int upper) {
    eng__buf o = {0};
    if (case_map(r, s->u.s.p, s->u.s.n, upper, &o)) { free(o.p); return NULL; }
    return mk_buf(r, NULL, &o);
}

static int is_word_byte(char c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
}

/* /\b\w/g -> toUpperCase: ASCII words only, the rest of each word as it was */
static jv *str_title(rt *r, const jv *s) {
    jv *v = mk_str(r, NULL, s->u.s.p, s->u.s.n);
    for (size_t i = 0; v && i < v->u.s.n; i++) {
        char c = v->u.s.p[i];
        if (c >= 'a' && c <= 'z' && (i == 0 || !is_word_byte(v->u.s.p[i - 1]))) v->u.s.p[i] = (char)(c - 32);
    }
    return v;
}

/* charAt(0).toUpperCase() + slice(1) */
static jv *str_capitalize(rt *r, const jv *s) {
    if (!s->u.s.n) return ref((jv *)s);
    int k;
    uint32_t c = cp_at(s->u.s.p, s->u.s.n, 0, &k);
    if (c >= 0x10000) return ref((jv *)s); /* charAt(0) is half of it: unchanged */
    eng__buf o = {0};
    if (case_map(r, s->u.s.p, (size_t)k, 1, &o) || emit(r, &o, s->u.s.p + k, s->u.s.n - (size_t)k)) {
        free(o.p);
        return NULL;
    }
    return mk_buf(r, NULL, &o);
}

/* trim / trimStart / trimEnd */
static jv *str_trim(rt *r, const jv *s, int left, int right) {
    const char *b = s->u.s.p, *e = b + s->u.s.n;
    if (left) b = skip_js_space(b, e);
    while (right && e > b) {
        const char *p = e - 1;
        while (p > b && ((unsigned char)*p & 0xC0) == 0x80) p--;
        int k;
        if (!eng__js_space(eng__js_cp(p, (size_t)(e - p), &k))) break;
        e = p;
    }
    return mk_str(r, NULL, b, (size_t)(e - b));
}

static const char *find(const char *h, size_t hn, const char *nd, size_t nn) {
    if (nn == 0) return h;
    for (size_t i = 0; i + nn <= hn; i++)
        if (h[i] == nd[0] && !memcmp(h + i, nd, nn)) return h + i;
    return NULL;
}

/* Compare in UTF-16 code unit order (JavaScript's < on strings). */
static int cmp_utf16(const char *a, size_t an, const char *b, size_t bn) {
    size_t i = 0, j = 0;
    while (i < an && j < bn) {
        int ka, kb;
        uint32_t ca = cp_at(a, an, i, &ka), cb = cp_at(b, bn, j, &kb);
        if (ca != cb) {
            uint32_t ua = ca >= 0x10000 ? 0xD800 + ((ca - 0x10000) >> 10) : ca;
            uint32_t ub = cb >= 0x10000 ? 0xD800 + ((cb - 0x10000) >> 10) : cb;
            if (ua != ub) return ua < ub ? -1 : 1;
            return ca < cb ? -1 : 1; /* same high surrogate: the low ones are in code point order */
        }
        i += (size_t)ka;
        j += (size_t)kb;
    }
    return (i < an) - (j < bn);
}

/* ---- printing and JSON ---------------------------------------------------- */
typedef struct {
    int indent;             /* 0: none */
    int ascii;              /* ensure_ascii */
    int sort;               /* sort_keys */
    const char *item, *key; /* separators */
    size_t item_n, key_n;
} jopts;

static const jopts JSON_DEFAULT = {0, 0, 0, ", ", ": ", 2, 2};

/* JSON.stringify of a string, \uXXXX for every UTF-16 unit from U+007F with ensure_ascii. */
static int json_string(rt *r, const char *s, size_t n, int ascii, eng__buf *o) {
    if (emit(r, o, "\"", 1)) return -1;
    size_t run = 0; /* bytes copied as they are, flushed before each escape */
    for (size_t i = 0; i < n;) {
        int k;
        uint32_t c = cp_at(s, n, i, &k);
        char esc[16] = "";
        if (c == '"') strcpy(esc, "\\\"");
        else if (c == '\\') strcpy(esc, "\\\\");
        else if (c == '\b') strcpy(esc, "\\b");
        else if (c == '\f') strcpy(esc, "\\f");
        else if (c == '\n') strcpy(esc, "\\n");
        else if (c == '\r') strcpy(esc, "\\r");
        else if (c == '\t') strcpy(esc, "\\t");
        else if (c < 0x20) snprintf(esc, sizeof esc, "\\u%04x", (unsigned)c);
        else if (ascii && c >= 0x10000) snprintf(esc, sizeof esc, "\\u%04x\\u%04x", 0xD800 + ((c - 0x10000) >> 10), 0xDC00 + ((c - 0x10000) & 0x3FF));
        else if (ascii && c >= 0x7F) snprintf(esc, sizeof esc, "\\u%04x", (unsigned)c);
        if (*esc) {
            if (emit(r, o, s + i - run, run) || emits(r, o, esc)) return -1;
            run = 0;
        } else {
            run += (size_t)k;
        }
        i += (size_t)k;
    }
    return emit(r, o, s + n - run, run) || emit(r, o, "\"", 1) ? -1 : 0;
}

static int spaces(rt *r, eng__buf *o, double n) {
    static const char SP[] = "                                                                ";
    for (; n > 0; n -= 64)
        if (emit(r, o, SP, n < 64 ? (size_t)n : 64)) return -1;
    return 0;
}

static int pad(rt *r, eng__buf *o, int indent, int depth) {
    return emit(r, o, "\n", 1) || spaces(r, o, (double)indent * depth) ? -1 : 0;
}

static int to_json(rt *r, const jv *v, const jopts *op, int depth, int undef_null, eng__buf *o);

static int json_list(rt *r, const jv *v, const jopts *op, int depth, int undef_null, eng__buf *o) {
    if (emit(r, o, "[", 1)) return -1;
    for (size_t i = 0; i < v->u.l.n; i++) {
        if (i && emit(r, o, op->item, op->item_n)) return -1;
        if (op->indent && pad(r, o, op->indent, depth + 1)) return -1;
        if (to_json(r, v->u.l.v[i], op, depth + 1, undef_null, o)) return -1;
    }
    if (op->indent && v->u.l.n && pad(r, o, op->indent, depth)) return -1;
    return emit(r, o, "]", 1);
}

/* Intl.Collator's order (ICU root) for ASCII, which sort_keys uses: punctuation,
 * digits, then letters with lower case first; others after, by code point. */
static int collate_primary(uint32_t c, int *upper) {
    static const char ORDER[] = " _-,;:!?.'\"()[]{}@*/\\&#%`^+<=>|~$0123456789";
    *upper = c >= 'A' && c <= 'Z';
    if (*upper) c += 32;
    if (c >= 'a' && c <= 'z') return (int)(sizeof ORDER) + (int)(c - 'a');
    const char *f = c && c < 0x80 ? strchr(ORDER, (int)c) : NULL;
    if (f) return (int)(f - ORDER) + 1;
    return c < 0x20 ? 0 : 1000 + (int)c;
}

static int collate(const char *a, size_t an, const char *b, size_t bn) {
    int tert = 0;
    size_t i = 0, j = 0;
    while (i < an && j < bn) {
        int ka, kb, ua, ub;
        int pa = collate_primary(cp_at(a, an, i, &ka), &ua), pb = collate_primary(cp_at(b, bn, j, &kb), &ub);
        if (pa != pb) return pa < pb ? -1 : 1;
        if (!tert && ua != ub) tert = ua ? 1 : -1;
        i += (size_t)ka;
        j += (size_t)kb;
    }
    if ((i < an) != (j < bn)) return i < an ? 1 : -1;
    return tert;
}

static int json_dict(rt *r, const jv *v, const jopts *op, int depth, int undef_null, eng__buf *o) {
    size_t n = v->u.d.n;
    const jent **es = malloc((n ? n : 1) * sizeof *es);
    if (!es) { oom(r); return -1; }
    for (size_t i = 0; i < n; i++) es[i] = &v->u.d.e[i];
    for (size_t i = 1; op->sort && i < n; i++) /* insertion sort: stable, and dicts are small */
        for (size_t j = i; j > 0 && collate(es[j - 1]->k, es[j - 1]->kn, es[j]->k, es[j]->kn) > 0; j--) {
            const jent *t = es[j]; es[j] = es[j - 1]; es[j - 1] = t;
        }
    int rc = emit(r, o, "{", 1);
    for (size_t i = 0; !rc && i < n; i++) {
        if (i) rc = emit(r, o, op->item, op->item_n);
        if (!rc && op->indent) rc = pad(r, o, op->indent, depth + 1);
        if (!rc) rc = json_string(r, es[i]->k, es[i]->kn, op->ascii, o);
        if (!rc) rc = emit(r, o, op->key, op->key_n);
        if (!rc) rc = to_json(r, es[i]->v, op, depth + 1, undef_null, o);
    }
    free(es);
    if (!rc && op->indent && n) rc = pad(r, o, op->indent, depth);
    return rc ? -1 : emit(r, o, "}", 1);
}

/* toJSON(): undefined is null, or "undefined" where a value is printed. */
static int to_json(rt *r, const jv *v, const jopts *op, int depth, int undef_null, eng__buf *o) {
    if (depth > MAX_VALUE_DEPTH) return failc(r, NULL, "a value nested deeper than %d levels (a namespace holding itself?)", MAX_VALUE_DEPTH);
    char num[40];
    switch (v->k) {
    case JV_NULL: return emits(r, o, "null");
    case JV_UNDEF: return emits(r, o, undef_null ? "null" : "undefined");
    case JV_BOOL: return emits(r, o, v->u.b ? "true" : "false");
    case JV_INT: case JV_FLOAT:
        if (!isfinite(v->u.num)) return emits(r, o, "null");
        num_fmt(v->u.num, num);
        return emits(r, o, num);
    case JV_STR: return json_string(r, v->u.s.p, v->u.s.n, op->ascii, o);
    case JV_LIST: return json_list(r, v, op, depth, undef_null, o);
    case JV_DICT: case JV_NS: return json_dict(r, v, op, depth, undef_null, o);
    default: return failc(r, NULL, "cannot convert %s to JSON (nor print it)", kind_name(v)); /* a tuple too, as there */
    }
}

/* RuntimeValue.toString(): what {{ v }} prints (none and undefined print nothing there). */
static int print_value(rt *r, const jv *v, eng__buf *o) {
    char num[40];
    switch (v->k) {
    case JV_UNDEF: return emits(r, o, "undefined");
    case JV_NULL: return emits(r, o, "null");
    case JV_BOOL: return emits(r, o, v->u.b ? "true" : "false");
    case JV_INT: num_fmt(v->u.num, num); return emits(r, o, num);
    case JV_FLOAT: float_fmt(v->u.num, num); return emits(r, o, num);
    case JV_STR: return emit(r, o, v->u.s.p, v->u.s.n);
    case JV_FUNC: return failc(r, NULL, "cannot print a function or macro (did you mean to call it?)");
    default: return to_json(r, v, &JSON_DEFAULT, 0, 0, o);
    }
}

/* String(v.value): what ~ and + of strings, join and raise_exception use. */
static int js_string(rt *r, const jv *v, eng__buf *o) {
    char num[40];
    switch (v->k) {
    case JV_INT: case JV_FLOAT: num_fmt(v->u.num, num); return emits(r, o, num);
    case JV_LIST: case JV_TUPLE:
        for (size_t i = 0; i < v->u.l.n; i++)
            if ((i && emit(r, o, ",", 1)) || print_value(r, v->u.l.v[i], o)) return -1;
        return 0;
    case JV_DICT: case JV_KWARGS: case JV_NS: return emits(r, o, "[object Map]");
    default: return print_value(r, v, o);
    }
}

static jv *json_value(rt *r, const jv *v, const jopts *op, int undef_null) {
    eng__buf o = {0};
    if (to_json(r, v, op, 0, undef_null, &o)) { free(o.p); return NULL; }
    return mk_buf(r, NULL, &o);
}

/* ---- comparisons ---------------------------------------------------------- */
/* a.value === b.value (sz: SameValueZero, NaN equal to itself) */
static int strict_eq(const jv *a, const jv *b, int sz) {
    if (is_num(a) && is_num(b)) return a->u.num == b->u.num || (sz && isnan(a->u.num) && isnan(b->u.num));
    if (a->k != b->k) return 0;
    switch (a->k) {
    case JV_UNDEF: case JV_NULL: return 1;
    case JV_BOOL: return a->u.b == b->u.b;
    case JV_STR: return a->u.s.n == b->u.s.n && !memcmp(a->u.s.p, b->u.s.p, a->u.s.n);
    default: return a == b;
    }
}

static int is_primitive(const jv *v) { return is_num(v) || v->k == JV_STR || v->k == JV_BOOL; }

/* a.value == b.value: JavaScript's loose equality. -1 on failure. */
static int loose_eq(rt *r, const jv *a, const jv *b) {
    int an = a->k == JV_NULL || a->k == JV_UNDEF, bn = b->k == JV_NULL || b->k == JV_UNDEF;
    if (an || bn) return an && bn;
    if (a->k == b->k || (is_num(a) && is_num(b))) return strict_eq(a, b, 0);
    if (a->k == JV_BOOL || b->k == JV_BOOL) { /* booleans compare as numbers */
        const jv *o = a->k == JV_BOOL ? b : a;
        double x = (a->k == JV_BOOL ? a : b)->u.b;
        if (is_num(o)) return x == o->u.num;
        if (o->k == JV_STR) return x == str_to_num(o->u.s.p, o->u.s.n);
        if (o->k == JV_FUNC || o->k == JV_BOOL) return 0;
    }
    if (is_num(a) && b->k == JV_STR) return a->u.num == str_to_num(b->u.s.p, b->u.s.n);
    if (a->k == JV_STR && is_num(b)) return b->u.num == str_to_num(a->u.s.p, a->u.s.n);
    if (is_primitive(a) == is_primitive(b) || a->k == JV_FUNC || b->k == JV_FUNC) return 0;
    /* an object against a primitive: the object as its string */
    const jv *obj = is_primitive(a) ? b : a, *prim = is_primitive(a) ? a : b;
    eng__buf o = {0};
    if (js_string(r, obj, &o)) { free(o.p); return -1; }
    jv tmp = {.rc = -1, .k = JV_STR, .u.s = {o.p ? o.p : "", o.n}};
    int eq = loose_eq(r, &tmp, prim);
    free(o.p);
    return eq;
}

/* compareRuntimeValues (sort, dictsort): <0, 0, >0, or failure (*bad). */
static int compare(rt *r, const jn *at, const jv *a, const jv *b, int case_sensitive, int *bad) {
    if ((a->k == JV_NULL && b->k == JV_NULL) || (a->k == JV_UNDEF && b->k == JV_UNDEF)) return 0;
    if (a->k == JV_NULL || b->k == JV_NULL || a->k == JV_UNDEF || b->k == JV_UNDEF || (a->k != b->k && !(is_numlike(a) && is_numlike(b)))) {
        *bad = failc(r, at, "cannot compare %s with %s", kind_name(a), kind_name(b));
        return 0;
    }
    if (is_numlike(a)) {
        double x = numlike(a), y = numlike(b);
        return x < y ? -1 : x > y ? 1 : 0;
    }
    if (a->k != JV_STR) { *bad = failc(r, at, "cannot compare values of type %s", kind_name(a)); return 0; }
    if (case_sensitive) return cmp_utf16(a->u.s.p, a->u.s.n, b->u.s.p, b->u.s.n);
    eng__buf x = {0}, y = {0};
    int c = 0;
    if (case_map(r, a->u.s.p, a->u.s.n, 0, &x) || case_map(r, b->u.s.p, b->u.s.n, 0, &y)) *bad = -1;
    else c = cmp_utf16(x.p ? x.p : "", x.n, y.p ? y.p : "", y.n);
    free(x.p);
    free(y.p);
    return c;
}

typedef struct {
    rt *r;
    const jn *at;
    int case_sensitive, reverse, bad;
    const jv *const *keys;  /* what each item is sorted by */
} sorter;

/* Stable merge sort of idx[0..n) by keys (Array.prototype.sort is stable). */
static void merge_sort(sorter *s, size_t *idx, size_t *tmp, size_t n) {
    if (n < 2 || s->bad) return;
    size_t h = n / 2;
    merge_sort(s, idx, tmp, h);
    merge_sort(s, idx + h, tmp, n - h);
    size_t i = 0, j = h, k = 0;
    while (i < h && j < n && !s->bad) {
        int c = compare(s->r, s->at, s->keys[idx[j]], s->keys[idx[i]], s->case_sensitive, &s->bad);
        if (s->reverse) c = -c;
        tmp[k++] = c < 0 ? idx[j++] : idx[i++];
    }
    while (i < h) tmp[k++] = idx[i++];
    while (j < n) tmp[k++] = idx[j++];
    memcpy(idx, tmp, n * sizeof *idx);
}

/* A new list of items ordered by keys. */
static jv *sorted(rt *r, const jn *at, jv *const *items, const jv *const *keys, size_t n, int cs, int reverse) {
    size_t *idx = malloc((n + 1) * sizeof *idx), *tmp = malloc((n + 1) * sizeof *tmp);
    jv *out = idx && tmp ? mk_list(r, JV_LIST) : oom(r);
    sorter s = {r, at, cs, reverse, 0, keys};
    if (out) {
        for (size_t i = 0; i < n; i++) idx[i] = i;
        merge_sort(&s, idx, tmp, n);
        for (size_t i = 0; i < n && !s.bad; i++)
            if (list_add(r, out, ref(items[idx[i]]))) s.bad = -1;
    }
    free(idx);
    free(tmp);
    if (s.bad) { drop(out); return NULL; }
    return out;
}

/* ---- the evaluator: declarations -------------------------------------------- */
static jv *eval(rt *r, const jn *n, env *e);
static int exec_block(rt *r, const jn_list *l, env *e, eng__buf *out);

typedef struct {
    jv **v;                 /* positional */
    size_t n, cap;
    jv *kw;                 /* keyword arguments (JV_KWARGS), or NULL */
} jargs;

static void args_free(jargs *a) {
    for (size_t i = 0; i < a->n; i++) drop(a->v[i]);
    free(a->v);
    drop(a->kw);
    *a = (jargs){0};
}

static int args_add(rt *r, jargs *a, jv *x) {
    if (!x) return -1;
    if (a->n == a->cap) {
        size_t cap = a->cap ? a->cap * 2 : 8;
        jv **nv = realloc(a->v, cap * sizeof *nv);
        if (!nv) { drop(x); oom(r); return -1; }
        a->v = nv;
        a->cap = cap;
    }
    a->v[a->n++] = x;
    return 0;
}

static int kw_add(rt *r, const jn *at, jargs *a, const char *k, size_t kn, jv *x) {
    if (!x) return -1;
    if (!a->kw && !(a->kw = mk_dict(r, JV_KWARGS))) { drop(x); return -1; }
    if (dict_get(a->kw, k, kn)) {
        drop(x);
        return failc(r, at, "got multiple values for keyword argument '%.*s'", (int)kn, k);
    }
    return dict_put(r, a->kw, k, kn, x);
}

/* Positional arguments (with *spread) first, then keyword arguments (with **spread). */
static int eval_args(rt *r, const jn_list *l, env *e, jargs *a) {
    *a = (jargs){0};
    for (int i = 0; i < l->n; i++) {
        const jn *x = l->v[i];
        if (x->kind == JN_KWARG || x->kind == JN_KWSPREAD) continue;
        if (x->kind != JN_SPREAD) { if (args_add(r, a, eval(r, x, e))) return -1; continue; }
        jv *v = eval(r, x->a, e);
        if (!v) return -1;
        int rc = is_list(v) ? 0 : failc(r, x, "cannot unpack %s with *", kind_name(v));
        for (size_t k = 0; !rc && k < v->u.l.n; k++) rc = args_add(r, a, ref(v->u.l.v[k]));
        drop(v);
        if (rc) return -1;
    }
    for (int i = 0; i < l->n; i++) {
        const jn *x = l->v[i];
        if (x->kind == JN_KWARG) {
            if (kw_add(r, x, a, x->s, x->n, eval(r, x->a, e))) return -1;
        } else if (x->kind == JN_KWSPREAD) {
            jv *v = eval(r, x->a, e);
            if (!v) return -1;
            int rc = is_dict(v) ? 0 : failc(r, x, "the argument after ** must be a mapping, not %s", kind_name(v));
            for (size_t k = 0; !rc && k < v->u.d.n; k++) rc = kw_add(r, x, a, v->u.d.e[k].k, v->u.d.e[k].kn, ref(v->u.d.e[k].v));
            drop(v);
            if (rc) return -1;
        }
    }
    return 0;
}

/* kwargs.get(name): borrowed, or NULL */
static jv *kwarg(const jargs *a, const char *name) { return a->kw ? dict_get(a->kw, name, strlen(name)) : NULL; }

/* args.at(i) ?? kwargs.get(name): borrowed, or NULL */
static jv *pick(const jargs *a, size_t i, const char *name) {
    if (i < a->n) return a->v[i];
    return a->kw && name ? dict_get(a->kw, name, strlen(name)) : NULL;
}

/* ---- functions: globals, methods ----------------------------------------- */
static jv *mk_func(rt *r, int fk, int m, jv *self, const jn *node, env *scope) {
    jv *f = jv_new(r, JV_FUNC, 0);
    if (!f) { drop(self); return NULL; }
    f->u.f.fk = fk;
    f->u.f.m = m;
    f->u.f.self = self;
    f->u.f.node = node;
    f->u.f.scope = scope;
    if (scope) scope->rc++;
    return f;
}

/* A namespace entry from a [key, value] pair (or a two-character string). */
static int ns_pair(rt *r, const jn *at, jv *ns, const jv *pair) {
    const char *k = NULL;
    size_t kn = 0;
    jv *val = NULL;
    if (is_list(pair) && pair->u.l.n == 2 && pair->u.l.v[0]->k == JV_STR) {
        k = pair->u.l.v[0]->u.s.p;
        kn = pair->u.l.v[0]->u.s.n;
        val = ref(pair->u.l.v[1]);
    } else if (pair->k == JV_STR && cp_count(pair->u.s.p, pair->u.s.n) == 2) {
        k = pair->u.s.p;
        kn = cp_offset(pair->u.s.p, pair->u.s.n, 1);
        val = mk_str(r, at, pair->u.s.p + kn, pair->u.s.n - kn);
    } else {
        return failc(r, at, "namespace() expects a dict or a list of [key, value] pairs with string keys");
    }
    return dict_put(r, ns, k, kn, val);
}

static jv *fn_namespace(rt *r, const jn *at, jv **args, size_t n) {
    const jv *kw = n && args[n - 1]->k == JV_KWARGS ? args[--n] : NULL;
    if (n > 1) return fail(r, at, "namespace() takes at most 1 positional argument, got %zu", n);
    jv *ns = mk_dict(r, JV_NS);
    int rc = ns ? 0 : -1;
    if (!rc && n == 1 && is_dict(args[0])) {
        for (size_t i = 0; !rc && i < args[0]->u.d.n; i++)
            rc = dict_put(r, ns, args[0]->u.d.e[i].k, args[0]->u.d.e[i].kn, ref(args[0]->u.d.e[i].v));
    } else if (!rc && n == 1 && is_list(args[0])) {
        for (size_t i = 0; !rc && i < args[0]->u.l.n; i++) rc = ns_pair(r, at, ns, args[0]->u.l.v[i]);
    } else if (!rc && n == 1) {
        rc = failc(r, at, "'%s' object is not iterable", kind_name(args[0]));
    }
    for (size_t i = 0; !rc && kw && i < kw->u.d.n; i++) rc = dict_put(r, ns, kw->u.d.e[i].k, kw->u.d.e[i].kn, ref(kw->u.d.e[i].v));
    if (rc) { drop(ns); return NULL; }
    return ns;
}

static jv *fn_raise(rt *r, jv **args, size_t n) {
    eng__buf o = {0};
    if (n && args[0]->k != JV_UNDEF && js_string(r, args[0], &o)) { free(o.p); return NULL; }
    if (!r->rc) {
        r->rc = ENG_EINVAL;
        eng__fail(r->err, r->errlen, ENG_EINVAL, "%s", o.p ? o.p : "");
    }
    free(o.p);
    return NULL;
}

static jv *fn_range(rt *r, const jn *at, jv **args, size_t n) {
    double v[3] = {0, 0, 1};
    size_t given = 0;
    for (size_t i = 0; i < n && i < 3; i++) {
        if (args[i]->k == JV_UNDEF) break;
        if (!is_num(args[i])) return fail(r, at, "range() arguments must be numbers, got %s", kind_name(args[i]));
        v[i] = args[i]->u.num;
        given = i + 1;
    }
    double start = given >= 2 ? v[0] : 0, stop = given >= 2 ? v[1] : v[0], step = v[2];
    if (step == 0) return fail(r, at, "range() step must not be zero");
    jv *l = mk_list(r, JV_LIST);
    for (double x = start; l && (step > 0 ? x < stop : x > stop); x += step)
        if (list_add(r, l, mk_number(r, x))) { drop(l); return NULL; }
    return l;
}

/* strftime_now(format): %Y %m %d %b %B %H %M %% in local time, other % as they are */
static jv *fn_strftime(rt *r, const jn *at, jv **args, size_t n) {
    static const char *const MON[] = {"January", "February", "March", "April", "May", "June", "July", "August",
                                      "September", "October", "November", "December"};
    if (!n || args[0]->k != JV_STR) return fail(r, at, "strftime_now() needs a format string");
    time_t now = time(NULL);
    struct tm tm;
    localtime_r(&now, &tm);
    const jv *f = args[0];
    eng__buf o = {0};
    int rc = 0;
    for (size_t i = 0; !rc && i < f->u.s.n; i++) {
        char c = i + 1 < f->u.s.n ? f->u.s.p[i + 1] : 0, part[16];
        if (f->u.s.p[i] != '%' || !c || !strchr("YmdbBHM%", c)) { rc = emit(r, &o, f->u.s.p + i, 1); continue; }
        if (c == 'Y') snprintf(part, sizeof part, "%d", tm.tm_year + 1900);
        else if (c == 'm') snprintf(part, sizeof part, "%02d", tm.tm_mon + 1);
        else if (c == 'd') snprintf(part, sizeof part, "%02d", tm.tm_mday);
        else if (c == 'b') snprintf(part, sizeof part, "%.3s", MON[tm.tm_mon]);
        else if (c == 'B') snprintf(part, sizeof part, "%s", MON[tm.tm_mon]);
        else if (c == 'H') snprintf(part, sizeof part, "%02d", tm.tm_hour);
        else if (c == 'M') snprintf(part, sizeof part, "%02d", tm.tm_min);
        else strcpy(part, "%");
        rc = emits(r, &o, part);
        i++;
    }
    if (rc) { free(o.p); return NULL; }
    return mk_buf(r, at, &o);
}

/* str.split(sep=None, maxsplit=-1) as @huggingface/jinja has it */
static jv *m_split(rt *r, const jn *at, const jv *s, jv **args, size_t n) {
    const jv *sep = n > 0 ? args[0] : &V_NULL, *maxv = n > 1 ? args[1] : NULL;
    if (sep->k != JV_STR && sep->k != JV_NULL) return fail(r, at, "split(): the separator must be a string or none");
    if (maxv && maxv->k != JV_INT) return fail(r, at, "split(): maxsplit must be an integer");
    double max = maxv ? maxv->u.num : -1;
    jv *l = mk_list(r, JV_LIST);
    const char *p = s->u.s.p, *end = p + s->u.s.n;
    if (l && sep->k == JV_NULL) { /* runs of whitespace; none at the ends */
        for (p = skip_js_space(p, end); l && p < end;) {
            const char *w = p;
            while (w < end) { int k; if (eng__js_space(eng__js_cp(w, (size_t)(end - w), &k))) break; w += k; }
            int last = max != -1 && (double)l->u.l.n >= max;
            if (list_add(r, l, mk_str(r, at, p, (size_t)((last ? end : w) - p)))) return NULL;
            if (last) break;
            p = skip_js_space(w, end);
        }
        return l;
    }
    if (l && !sep->u.s.n) { drop(l); return fail(r, at, "split(): empty separator"); }
    for (const char *f; l && (f = find(p, (size_t)(end - p), sep->u.s.p, sep->u.s.n)); p = f + sep->u.s.n)
        if (list_add(r, l, mk_str(r, at, p, (size_t)(f - p)))) return NULL;
    if (l && list_add(r, l, mk_str(r, at, p, (size_t)(end - p)))) return NULL;
    if (!l || max == -1 || (double)l->u.l.n <= max) return l;
    /* more parts than maxsplit: the ones from index max (splice: negative counts from the end) are joined again */
    double from = max < 0 ? fmax((double)l->u.l.n + max, 0) : max;
    size_t k = (size_t)from;
    eng__buf o = {0};
    for (size_t i = k; i < l->u.l.n; i++)
        if ((i > k && emit(r, &o, sep->u.s.p, sep->u.s.n)) || emit(r, &o, l->u.l.v[i]->u.s.p, l->u.l.v[i]->u.s.n)) {
            free(o.p);
            drop(l);
            return NULL;
        }
    while (l->u.l.n > k) drop(l->u.l.v[--l->u.l.n]);
    if (list_add(r, l, mk_buf(r, at, &o))) return NULL;
    return l;
}

/* replace(old, new, count): every occurrence (count null or negative), at most count; an empty old matches between characters */
static jv *str_replace(rt *r, const jn *at, const jv *s, const jv *old, const jv *new_, double count) {
    if (count == 0) return ref((jv *)s);
    double left = count < 0 || isnan(count) ? INFINITY : count;
    eng__buf o = {0};
    const char *p = s->u.s.p, *end = p + s->u.s.n;
    int rc = 0;
    if (!old->u.s.n) {
        for (;;) {
            if (left > 0) { rc |= emit(r, &o, new_->u.s.p, new_->u.s.n); left--; }
            if (p >= end || rc) break;
            int k;
            eng__js_cp(p, (size_t)(end - p), &k);
            rc |= emit(r, &o, p, (size_t)k);
            p += k;
        }
    } else {
        for (const char *f; !rc && left > 0 && (f = find(p, (size_t)(end - p), old->u.s.p, old->u.s.n)); left--) {
            rc = emit(r, &o, p, (size_t)(f - p)) || emit(r, &o, new_->u.s.p, new_->u.s.n);
            p = f + old->u.s.n;
        }
        if (!rc) rc = emit(r, &o, p, (size_t)(end - p));
    }
    if (rc) { free(o.p); return NULL; }
    return mk_buf(r, at, &o);
}

static jv *m_replace(rt *r, const jn *at, const jv *s, jv **args, size_t n) {
    if (n < 2) return fail(r, at, "replace() takes at least two arguments");
    if (args[0]->k != JV_STR || args[1]->k != JV_STR) return fail(r, at, "replace(): the arguments must be strings");
    const jv *count = &V_NULL;
    if (n > 2) count = args[2]->k == JV_KWARGS ? dict_get(args[2], "count", 5) : args[2];
    if (!count) count = &V_NULL;
    if (count->k != JV_INT && count->k != JV_NULL) return fail(r, at, "replace(): count must be an integer or none");
    return str_replace(r, at, s, args[0], args[1], count->k == JV_INT ? count->u.num : -1);
}

static jv *m_affix(rt *r, const jn *at, const jv *s, jv **args, size_t n, int end) {
    const char *name = end ? "endswith" : "startswith";
    if (!n) return fail(r, at, "%s() takes at least one argument", name);
    const jv *pat = args[0];
    jv *const *opts = is_list(pat) ? pat->u.l.v : (jv *const *)&args[0];
    size_t nopt = is_list(pat) ? pat->u.l.n : 1;
    if (!is_list(pat) && pat->k != JV_STR) return fail(r, at, "%s(): the argument must be a string or a tuple of strings", name);
    for (size_t i = 0; i < nopt; i++) {
        const jv *o = opts[i];
        if (o->k != JV_STR) return fail(r, at, "%s(): the tuple's elements must be strings", name);
        if (o->u.s.n <= s->u.s.n && !memcmp(s->u.s.p + (end ? s->u.s.n - o->u.s.n : 0), o->u.s.p, o->u.s.n)) return &V_TRUE;
    }
    return &V_FALSE;
}

static jv *dict_pairs(rt *r, const jv *d, int what /* 0 items, 1 keys, 2 values */) {
    jv *l = mk_list(r, JV_LIST);
    for (size_t i = 0; l && i < d->u.d.n; i++) {
        const jent *e = &d->u.d.e[i];
        jv *x;
        if (what == 2) x = ref(e->v);
        else if (what == 1) x = mk_str(r, NULL, e->k, e->kn);
        else if ((x = mk_list(r, JV_LIST)) && (list_add(r, x, mk_str(r, NULL, e->k, e->kn)) || list_add(r, x, ref(e->v)))) {
            drop(x);
            x = NULL;
        }
        if (list_add(r, l, x)) { drop(l); return NULL; }
    }
    return l;
}

static jv *m_dictsort(rt *r, const jn *at, const jv *d, jv **args, size_t n) {
    const jv *kw = n && args[n - 1]->k == JV_KWARGS ? args[--n] : NULL;
    const jv *cs = n > 0 ? args[0] : kw ? dict_get(kw, "case_sensitive", 14) : NULL;
    const jv *by = n > 1 ? args[1] : kw ? dict_get(kw, "by", 2) : NULL;
    const jv *rev = n > 2 ? args[2] : kw ? dict_get(kw, "reverse", 7) : NULL;
    if ((cs && cs->k != JV_BOOL) || (rev && rev->k != JV_BOOL))
        return fail(r, at, "dictsort(): case_sensitive and reverse must be booleans");
    if (by && (by->k != JV_STR || (strcmp(by->u.s.p, "key") && strcmp(by->u.s.p, "value"))))
        return fail(r, at, "dictsort(): by must be 'key' or 'value'");
    int by_value = by && !strcmp(by->u.s.p, "value");
    jv *items = dict_pairs(r, d, 0);
    if (!items) return NULL;
    const jv **keys = malloc((items->u.l.n + 1) * sizeof *keys);
    jv *out = keys ? NULL : oom(r);
    if (keys) {
        for (size_t i = 0; i < items->u.l.n; i++) keys[i] = items->u.l.v[i]->u.l.v[by_value];
        out = sorted(r, at, items->u.l.v, keys, items->u.l.n, cs && cs->u.b, rev && rev->u.b);
    }
    free(keys);
    drop(items);
    return out;
}

static jv *call_method(rt *r, const jn *at, const jv *f, jv **args, size_t n) {
    const jv *s = f->u.f.self;
    switch (f->u.f.m) {
    case M_UPPER: return str_case(r, s, 1);
    case M_LOWER: return str_case(r, s, 0);
    case M_STRIP: return str_trim(r, s, 1, 1);
    case M_LSTRIP: return str_trim(r, s, 1, 0);
    case M_RSTRIP: return str_trim(r, s, 0, 1);
    case M_TITLE: return str_title(r, s);
    case M_CAPITALIZE: return str_capitalize(r, s);
    case M_STARTSWITH: return m_affix(r, at, s, args, n, 0);
    case M_ENDSWITH: return m_affix(r, at, s, args, n, 1);
    case M_SPLIT: return m_split(r, at, s, args, n);
    case M_REPLACE: return m_replace(r, at, s, args, n);
    case M_GET: {
        if (!n || args[0]->k != JV_STR) return fail(r, at, "get(): the key must be a string");
        jv *v = dict_get(s, args[0]->u.s.p, args[0]->u.s.n);
        return ref(v ? v : n > 1 ? args[1] : &V_NULL);
    }
    case M_ITEMS: return dict_pairs(r, s, 0);
    case M_KEYS: return dict_pairs(r, s, 1);
    case M_VALUES: return dict_pairs(r, s, 2);
    default: return m_dictsort(r, at, s, args, n);
    }
}

/* A string's or a dict's builtin property: a bound method, or length; NULL if none. */
static jv *builtin(rt *r, jv *obj, const char *k, size_t kn) {
    static const char *const STR_M[] = {"upper", "lower", "strip", "title", "capitalize", "rstrip", "lstrip",
                                        "startswith", "endswith", "split", "replace"};
    static const char *const DICT_M[] = {"get", "items", "keys", "values", "dictsort"};
    int is_len = kn == 6 && !memcmp(k, "length", 6);
    if (obj->k == JV_STR) {
        if (is_len) return mk_num(r, JV_INT, (double)utf16_len(obj->u.s.p, obj->u.s.n));
        for (int i = 0; i < 11; i++)
            if (strlen(STR_M[i]) == kn && !memcmp(STR_M[i], k, kn)) return mk_func(r, F_METHOD, M_UPPER + i, ref(obj), NULL, NULL);
    } else if (is_list(obj)) {
        if (is_len) return mk_num(r, JV_INT, (double)obj->u.l.n);
    } else if (is_dict(obj)) {
        for (int i = 0; i < 5; i++)
            if (strlen(DICT_M[i]) == kn && !memcmp(DICT_M[i], k, kn)) return mk_func(r, F_METHOD, M_GET + i, ref(obj), NULL, NULL);
    }
    return NULL;
}

/* ---- macros and caller() ---------------------------------------------------- */
/* A copy of keyword arguments, from which bind_params takes those it uses. */
static jv *kw_copy(rt *r, const jv *src) {
    jv *kw = mk_dict(r, JV_DICT);
    for (size_t i = 0; kw && src && i < src->u.d.n; i++)
        if (dict_put(r, kw, src->u.d.e[i].k, src->u.d.e[i].kn, ref(src->u.d.e[i].v))) { drop(kw); return NULL; }
    return kw;
}

/* kw's value of key, taken out of kw; NULL if absent. */
static jv *kw_take(jv *kw, const char *k, size_t kn) {
    jent *f = ent_find(kw->u.d.e, kw->u.d.n, k, kn);
    if (!f) return NULL;
    jv *v = f->v;
    free(f->k);
    memmove(f, f + 1, (size_t)(kw->u.d.e + kw->u.d.n - (f + 1)) * sizeof *f);
    kw->u.d.n--;
    return v;
}

/* bindMacroArguments: positional, then by keyword, else undefined; kwargs and
 * varargs when the body reads them; defaults last, when every parameter is bound. */
static int bind_params(rt *r, const jn *at, const char *who, const jn_list *params, int special, jv **args, size_t n,
                       env *scope) {
    jv *kw = kw_copy(r, n && args[n - 1]->k == JV_KWARGS ? args[n - 1] : NULL);
    if (!kw) return -1;
    if (n && args[n - 1]->k == JV_KWARGS) n--;
    unsigned char *pending = calloc((size_t)params->n + 1, 1);
    int rc = pending ? 0 : (oom(r), -1);
    for (int i = 0; !rc && i < params->n; i++) {
        const jn *p = params->v[i];
        jv *v = (size_t)i < n ? ref(args[i]) : kw_take(kw, p->s, p->n);
        pending[i] = !v && p->kind == JN_KWARG;
        rc = env_set(r, scope, p->s, p->n, v ? v : &V_UNDEF);
    }
    if (!rc && (special & JN_USES_KWARGS)) rc = env_set(r, scope, "kwargs", 6, ref(kw));
    else if (!rc && kw->u.d.n) rc = failc(r, at, "macro %s takes no keyword argument '%s'", who, kw->u.d.e[0].k);
    if (!rc && (special & JN_USES_VARARGS)) {
        jv *rest = mk_list(r, JV_LIST);
        for (size_t i = (size_t)params->n; rest && i < n; i++)
            if (list_add(r, rest, ref(args[i]))) { drop(rest); rest = NULL; }
        rc = env_set(r, scope, "varargs", 7, rest);
    } else if (!rc && n > (size_t)params->n) {
        rc = failc(r, at, "macro %s takes not more than %d argument(s)", who, params->n);
    }
    for (int i = 0; !rc && i < params->n; i++)
        if (pending[i]) rc = env_set(r, scope, params->v[i]->s, params->v[i]->n, eval(r, params->v[i]->a, scope));
    free(pending);
    drop(kw);
    return rc;
}

/* A macro's (or caller()'s) body rendered in a new scope under parent. */
static jv *run_body(rt *r, const jn *at, const char *who, const jn_list *params, int special, const jn_list *body,
                    jv **args, size_t n, env *parent) {
    if (r->depth + 1 > MAX_RENDER_DEPTH) return fail(r, at, "macro calls nested deeper than %d", MAX_RENDER_DEPTH);
    r->depth++;
    env *scope = env_new(r, parent);
    eng__buf o = {0};
    jv *v = NULL;
    if (scope && !bind_params(r, at, who, params, special, args, n, scope) && !exec_block(r, body, scope, &o))
        v = mk_buf(r, at, &o);
    free(o.p);
    env_drop(scope);
    r->depth--;
    return v;
}

static jv *call_fn(rt *r, const jn *at, const jv *f, jv **args, size_t n, env *e) {
    char who[80];
    switch (f->u.f.fk) {
    case F_NAMESPACE: return fn_namespace(r, at, args, n);
    case F_RAISE: return fn_raise(r, args, n);
    case F_RANGE: return fn_range(r, at, args, n);
    case F_STRFTIME: return fn_strftime(r, at, args, n);
    case F_MACRO: {
        const jn *m = f->u.f.node;
        snprintf(who, sizeof who, "'%.*s'", (int)(m->n > 60 ? 60 : m->n), m->s);
        return run_body(r, at, who, &m->l, m->op, &m->l2, args, n, e); /* the caller's variables are visible */
    }
    case F_CALLER: {
        const jn *c = f->u.f.node;
        return run_body(r, at, "None", &c->l, c->op, &c->l2, args, n, f->u.f.scope);
    }
    default: return call_method(r, at, f, args, n);
    }
}

/* ---- tests (x is NAME) -------------------------------------------------------- */
static int known_test(const char *name, size_t n) {
    static const char *const TESTS[] = {"boolean", "callable", "odd", "even", "false", "true", "none", "string",
                                        "number", "integer", "iterable", "mapping", "sequence", "lower", "upper",
                                        "defined", "undefined", "equalto", "eq"};
    for (size_t i = 0; i < sizeof TESTS / sizeof *TESTS; i++)
        if (strlen(TESTS[i]) == n && !memcmp(TESTS[i], name, n)) return 1;
    return 0;
}

/* 1 / 0, or -1 on failure. b: the second operand of equalto / eq (selectattr) or NULL. */
static int run_test(rt *r, const jn *at, const char *name, size_t nn, const jv *a, const jv *b) {
#define IS(s) (nn == sizeof(s) - 1 && !memcmp(name, s, nn))
    if (IS("boolean")) return a->k == JV_BOOL;
    if (IS("callable")) return a->k == JV_FUNC;
    if (IS("odd") || IS("even")) {
        if (a->k != JV_INT) return failc(r, at, "the test %.*s needs an integer, got %s", (int)nn, name, kind_name(a));
        return (fmod(a->u.num, 2) != 0) == IS("odd");
    }
    if (IS("false") || IS("true")) return a->k == JV_BOOL && a->u.b == IS("true");
    if (IS("none")) return a->k == JV_NULL;
    if (IS("string")) return a->k == JV_STR;
    if (IS("number")) return is_num(a);
    if (IS("integer")) return a->k == JV_INT;
    if (IS("iterable")) return a->k == JV_LIST || a->k == JV_STR; /* not a tuple, not a dict: as @huggingface/jinja */
    if (IS("mapping")) return is_dict(a);
    if (IS("sequence")) return is_list(a) || is_dict(a) || a->k == JV_STR;
    if (IS("defined")) return a->k != JV_UNDEF;
    if (IS("undefined")) return a->k == JV_UNDEF;
    if (IS("lower") || IS("upper")) {
        if (a->k != JV_STR) return 0;
        eng__buf o = {0};
        if (case_map(r, a->u.s.p, a->u.s.n, IS("upper"), &o)) { free(o.p); return -1; }
        int same = o.n == a->u.s.n && !memcmp(o.p ? o.p : "", a->u.s.p, o.n);
        free(o.p);
        return same;
    }
    if (IS("equalto") || IS("eq")) {
        if (!b) return failc(r, at, "the test %.*s needs a value to compare with", (int)nn, name);
        return strict_eq(a, b, 0);
    }
#undef IS
    return failc(r, at, "unknown test '%.*s'", (int)nn, name);
}

/* ---- filters ------------------------------------------------------------------ */
/* getAttributeValue: "a.b.0" through dicts, namespaces and list indexes; borrowed, NULL if absent. */
static jv *attr_path(const jv *item, const char *path, size_t n) {
    const jv *v = item;
    for (const char *p = path, *end = path + n; v;) {
        const char *dot = memchr(p, '.', (size_t)(end - p));
        size_t pn = dot ? (size_t)(dot - p) : (size_t)(end - p);
        if (is_attrs(v)) {
            v = dict_get(v, p, pn);
        } else if (is_list(v)) {
            double i = parse_int(p, pn);
            v = !isnan(i) && i >= 0 && i < (double)v->u.l.n ? v->u.l.v[(size_t)i] : NULL;
        } else {
            v = NULL;
        }
        if (!dot) break;
        p = dot + 1;
    }
    return (jv *)v;
}

/* JS Array.prototype.at on a list */
static jv *list_at(const jv *l, double i) {
    if (isnan(i)) i = 0;
    i = trunc(i);
    if (i < 0) i += (double)l->u.l.n;
    return i >= 0 && i < (double)l->u.l.n ? l->u.l.v[(size_t)i] : NULL;
}

/* JS String.prototype.at: one UTF-16 unit (half a surrogate pair prints as U+FFFD) */
static jv *str_at(rt *r, const jv *s, double i) {
    if (isnan(i)) i = 0;
    i = trunc(i);
    double len = (double)utf16_len(s->u.s.p, s->u.s.n);
    if (i < 0) i += len;
    if (i < 0 || i >= len) return &V_UNDEF;
    size_t unit = 0;
    for (size_t b = 0; b < s->u.s.n;) {
        int k;
        uint32_t c = cp_at(s->u.s.p, s->u.s.n, b, &k);
        size_t w = c >= 0x10000 ? 2 : 1;
        if ((double)(unit + w) > i) return w == 2 ? mk_cstr(r, "\xEF\xBF\xBD") : mk_str(r, NULL, s->u.s.p + b, (size_t)k);
        unit += w;
        b += (size_t)k;
    }
    return &V_UNDEF;
}

static jv *join(rt *r, const jn *at, const jv *v, const char *sep, size_t sn) {
    eng__buf o = {0};
    int rc = 0;
    if (v->k == JV_STR) { /* Array.from(string): its code points */
        for (size_t i = 0; !rc && i < v->u.s.n;) {
            int k;
            cp_at(v->u.s.p, v->u.s.n, i, &k);
            rc = (i && emit(r, &o, sep, sn)) || emit(r, &o, v->u.s.p + i, (size_t)k);
            i += (size_t)k;
        }
    } else {
        for (size_t i = 0; !rc && i < v->u.l.n; i++) {
            const jv *x = v->u.l.v[i];
            rc = (i && emit(r, &o, sep, sn)) || (x->k != JV_NULL && x->k != JV_UNDEF && js_string(r, x, &o));
        }
    }
    if (rc) { free(o.p); return NULL; }
    return mk_buf(r, at, &o);
}

static jv *indent(rt *r, const jn *at, const jv *s, double width, int first, int blank) {
    if (width < 0 || !isfinite(width) || width > ENG__JINJA_MAX_OUTPUT) return fail(r, at, "indent(): bad width");
    eng__buf o = {0};
    const char *p = s->u.s.p, *end = p + s->u.s.n;
    int rc = 0;
    for (size_t line = 0; !rc; line++) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *le = nl ? nl : end;
        if (!((!first && line == 0) || (!blank && le == p))) rc = spaces(r, &o, width);
        if (!rc) rc = emit(r, &o, p, (size_t)(le - p));
        if (!nl || rc) break;
        rc = emit(r, &o, "\n", 1);
        p = nl + 1;
    }
    if (rc) { free(o.p); return NULL; }
    return mk_buf(r, at, &o);
}

static jv *unique(rt *r, const jv *l) {
    jv *out = mk_list(r, JV_LIST);
    for (size_t i = 0; out && i < l->u.l.n; i++) {
        int seen = 0;
        for (size_t j = 0; !seen && j < out->u.l.n; j++) seen = strict_eq(out->u.l.v[j], l->u.l.v[i], 1);
        if (!seen && list_add(r, out, ref(l->u.l.v[i]))) return NULL;
    }
    return out;
}

static jv *reversed(rt *r, const jv *l) {
    jv *out = mk_list(r, JV_LIST);
    for (size_t i = l->u.l.n; out && i > 0; i--)
        if (list_add(r, out, ref(l->u.l.v[i - 1]))) return NULL;
    return out;
}

/* {{ x | name }} on a list */
static jv *filter_list(rt *r, const jn *at, jv *v, const char *f) {
    size_t n = v->u.l.n;
    if (!strcmp(f, "list")) return ref(v);
    if (!strcmp(f, "first") || !strcmp(f, "last")) {
        if (!n) return fail(r, at, "%s of an empty list", f); /* @huggingface/jinja fails too, later */
        return ref(v->u.l.v[*f == 'f' ? 0 : n - 1]);
    }
    if (!strcmp(f, "length")) return mk_num(r, JV_INT, (double)n);
    if (!strcmp(f, "reverse")) return reversed(r, v);
    if (!strcmp(f, "sort")) return sorted(r, at, v->u.l.v, (const jv *const *)v->u.l.v, n, 0, 0);
    if (!strcmp(f, "join")) return join(r, at, v, "", 0);
    if (!strcmp(f, "string")) return json_value(r, v, &JSON_DEFAULT, 0);
    if (!strcmp(f, "unique")) return unique(r, v);
    return fail(r, at, "unknown filter '%s' for a list", f);
}

static jv *filter_str(rt *r, const jn *at, jv *v, const char *f) {
    if (!strcmp(f, "length")) return mk_num(r, JV_INT, (double)utf16_len(v->u.s.p, v->u.s.n));
    if (!strcmp(f, "upper") || !strcmp(f, "lower")) return str_case(r, v, *f == 'u');
    if (!strcmp(f, "title")) return str_title(r, v);
    if (!strcmp(f, "capitalize")) return str_capitalize(r, v);
    if (!strcmp(f, "trim")) return str_trim(r, v, 1, 1);
    if (!strcmp(f, "indent")) return indent(r, at, v, 4, 0, 0);
    if (!strcmp(f, "join") || !strcmp(f, "string")) return ref(v);
    if (!strcmp(f, "int")) { double x = parse_int(v->u.s.p, v->u.s.n); return mk_num(r, JV_INT, isnan(x) ? 0 : x); }
    if (!strcmp(f, "float")) { double x = parse_float(v->u.s.p, v->u.s.n); return mk_num(r, JV_FLOAT, isnan(x) ? 0 : x); }
    return fail(r, at, "unknown filter '%s' for a string", f);
}

static jv *filter_num(rt *r, const jn *at, jv *v, const char *f) {
    if (!strcmp(f, "abs")) return mk_num(r, v->k, fabs(v->u.num));
    if (!strcmp(f, "int")) return mk_num(r, JV_INT, floor(v->u.num));
    if (!strcmp(f, "float")) return mk_num(r, JV_FLOAT, v->u.num);
    if (!strcmp(f, "string")) {
        eng__buf o = {0};
        if (print_value(r, v, &o)) { free(o.p); return NULL; }
        return mk_buf(r, at, &o);
    }
    return fail(r, at, "unknown filter '%s' for a number", f);
}

static jv *filter_dict(rt *r, const jn *at, jv *v, const char *f) {
    if (!strcmp(f, "items")) return dict_pairs(r, v, 0);
    if (!strcmp(f, "length")) return mk_num(r, JV_INT, (double)v->u.d.n);
    jv *b = builtin(r, v, f, strlen(f));
    if (!b) return r->rc ? NULL : fail(r, at, "unknown filter '%s' for a dict", f);
    if (b->k != JV_FUNC) return b;
    jv *res = call_method(r, at, b, NULL, 0);
    drop(b);
    return res;
}

static jv *filter_bool(rt *r, const jn *at, jv *v, const char *f) {
    if (!strcmp(f, "bool")) return mk_bool(v->u.b);
    if (!strcmp(f, "int")) return mk_num(r, JV_INT, v->u.b);
    if (!strcmp(f, "float")) return mk_num(r, JV_FLOAT, v->u.b);
    if (!strcmp(f, "string")) return mk_cstr(r, v->u.b ? "true" : "false");
    return fail(r, at, "unknown filter '%s' for a boolean", f);
}

/* x | name, chosen by the type of x */
static jv *filter_plain(rt *r, const jn *at, jv *v, const jn *fname) {
    char f[32];
    snprintf(f, sizeof f, "%.*s", (int)(fname->n < 31 ? fname->n : 31), fname->s);
    if (fname->n > 31) return fail(r, at, "unknown filter '%.*s'", (int)fname->n, fname->s);
    if (!strcmp(f, "safe")) return ref(v);
    if (!strcmp(f, "tojson")) return json_value(r, v, &JSON_DEFAULT, 1);
    if (is_list(v)) return filter_list(r, at, v, f);
    if (v->k == JV_STR) return filter_str(r, at, v, f);
    if (is_num(v)) return filter_num(r, at, v, f);
    if (is_dict(v)) return filter_dict(r, at, v, f);
    if (v->k == JV_BOOL) return filter_bool(r, at, v, f);
    return fail(r, at, "cannot apply the filter '%s' to %s", f, kind_name(v));
}

static jv *filter_tojson(rt *r, const jn *at, jv *v, const jargs *a) {
    const jv *ind = kwarg(a, "indent"), *asc = kwarg(a, "ensure_ascii"), *sk = kwarg(a, "sort_keys");
    const jv *sep = kwarg(a, "separators"); /* positional arguments are ignored, as there */
    jopts op = JSON_DEFAULT;
    if (ind && ind->k != JV_INT && ind->k != JV_NULL) return fail(r, at, "tojson(): indent must be an integer or none");
    if ((asc && asc->k != JV_BOOL) || (sk && sk->k != JV_BOOL)) return fail(r, at, "tojson(): ensure_ascii and sort_keys must be booleans");
    if (ind && ind->k == JV_INT && ind->u.num != 0) {
        if (ind->u.num < 0 || ind->u.num > ENG__JINJA_MAX_OUTPUT) return fail(r, at, "tojson(): bad indent");
        op.indent = (int)ind->u.num;
        op.item = ",";
        op.item_n = 1;
    }
    op.ascii = asc && asc->u.b;
    op.sort = sk && sk->u.b;
    if (sep && sep->k != JV_NULL) {
        if (!is_list(sep) || sep->u.l.n != 2 || sep->u.l.v[0]->k != JV_STR || sep->u.l.v[1]->k != JV_STR)
            return fail(r, at, "tojson(): separators must be a pair of strings");
        op.item = sep->u.l.v[0]->u.s.p;
        op.item_n = sep->u.l.v[0]->u.s.n;
        op.key = sep->u.l.v[1]->u.s.p;
        op.key_n = sep->u.l.v[1]->u.s.n;
    }
    return json_value(r, v, &op, 1);
}

static jv *filter_sort(rt *r, const jn *at, jv *v, const jargs *a) {
    const jv *rev = pick(a, 0, "reverse"), *cs = pick(a, 1, "case_sensitive"), *attr = pick(a, 2, "attribute");
    if ((rev && rev->k != JV_BOOL) || (cs && cs->k != JV_BOOL)) return fail(r, at, "sort(): reverse and case_sensitive must be booleans");
    if (attr && attr->k != JV_STR && attr->k != JV_INT && attr->k != JV_NULL)
        return fail(r, at, "sort(): attribute must be a string, an integer or none");
    size_t n = v->u.l.n;
    const jv **keys = malloc((n + 1) * sizeof *keys);
    if (!keys) return oom(r);
    char path[40];
    const char *ap = attr && attr->k == JV_STR ? attr->u.s.p : path;
    size_t an = attr && attr->k == JV_STR ? attr->u.s.n : 0;
    if (attr && attr->k == JV_INT) { num_fmt(attr->u.num, path); an = strlen(path); }
    for (size_t i = 0; i < n; i++) {
        const jv *k = attr && attr->k != JV_NULL ? attr_path(v->u.l.v[i], ap, an) : v->u.l.v[i];
        keys[i] = k ? k : &V_UNDEF;
    }
    jv *out = sorted(r, at, v->u.l.v, keys, n, cs && cs->u.b, rev && rev->u.b);
    free(keys);
    return out;
}

/* selectattr / rejectattr('attr' [, 'test' [, 'value']]): string literals only */
static jv *filter_select(rt *r, const jn *at, jv *v, const jn *call, int select, env *e) {
    for (size_t i = 0; i < v->u.l.n; i++)
        if (!is_attrs(v->u.l.v[i])) return fail(r, at, "%s applies to a list of dicts", select ? "selectattr" : "rejectattr");
    const jn_list *l = &call->l;
    for (int i = 0; i < l->n; i++)
        if (l->v[i]->kind != JN_STR) return fail(r, at, "the arguments of %s must be strings", select ? "selectattr" : "rejectattr");
    if (!l->n) return fail(r, at, "%s needs an attribute name", select ? "selectattr" : "rejectattr");
    const jn *attr = l->v[0], *test = l->n > 1 ? l->v[1] : NULL;
    if (test && !known_test(test->s, test->n)) return fail(r, test, "unknown test '%.*s'", (int)test->n, test->s);
    jv *val = l->n > 2 ? eval(r, l->v[2], e) : NULL;
    jv *out = l->n > 2 && !val ? NULL : mk_list(r, JV_LIST);
    for (size_t i = 0; out && i < v->u.l.n; i++) {
        jv *x = dict_get(v->u.l.v[i], attr->s, attr->n);
        int t = !x ? 0 : test ? run_test(r, test, test->s, test->n, x, val) : truthy(x);
        if (t < 0) { drop(out); out = NULL; break; }
        if (t == select && list_add(r, out, ref(v->u.l.v[i]))) out = NULL;
    }
    drop(val);
    return out;
}

static jv *filter_map(rt *r, const jn *at, jv *v, const jargs *a) {
    const jv *attr = kwarg(a, "attribute"), *dflt = kwarg(a, "default");
    if (!attr) return fail(r, at, "map() without attribute= is not supported");
    if (attr->k != JV_STR) return fail(r, at, "map(): attribute must be a string");
    jv *out = mk_list(r, JV_LIST);
    for (size_t i = 0; out && i < v->u.l.n; i++) {
        const jv *item = v->u.l.v[i];
        if (!is_attrs(item)) { drop(out); return fail(r, at, "map(attribute=) applies to a list of dicts"); }
        jv *x = attr_path(item, attr->u.s.p, attr->u.s.n);
        if (list_add(r, out, ref(x ? x : dflt ? (jv *)dflt : &V_UNDEF))) out = NULL;
    }
    return out;
}

static jv *filter_call(rt *r, const jn *at, jv *v, const jn *call, env *e);

static jv *apply_filter(rt *r, const jn *at, jv *v, const jn *f, env *e) {
    if (f->kind == JN_NAME) return filter_plain(r, at, v, f);
    if (f->kind == JN_CALL && f->a->kind == JN_NAME) return filter_call(r, at, v, f, e);
    return fail(r, at, "a filter must be a name or a call of one");
}

#define FNAME(lit) (call->a->n == sizeof(lit) - 1 && !memcmp(call->a->s, lit, call->a->n))

/* The filters taking arguments that do not depend on the operand's type. */
static jv *filter_call_any(rt *r, const jn *at, jv *v, const jn *call, const jargs *a, int *done) {
    *done = 1;
    if (FNAME("tojson")) return filter_tojson(r, at, v, a);
    if (FNAME("join")) {
        const jv *sep = pick(a, 0, "separator");
        if (v->k != JV_STR && !is_list(v)) return fail(r, at, "cannot apply the filter 'join' to %s", kind_name(v));
        if (sep && sep->k != JV_STR) return fail(r, at, "join(): the separator must be a string");
        return join(r, at, v, sep ? sep->u.s.p : "", sep ? sep->u.s.n : 0);
    }
    if (FNAME("int") || FNAME("float")) {
        int is_int = FNAME("int");
        const jv *d = pick(a, 0, "default");
        if (v->k == JV_STR) {
            double x = is_int ? parse_int(v->u.s.p, v->u.s.n) : parse_float(v->u.s.p, v->u.s.n);
            if (isnan(x)) return d ? ref((jv *)d) : mk_num(r, is_int ? JV_INT : JV_FLOAT, 0);
            return mk_num(r, is_int ? JV_INT : JV_FLOAT, x);
        }
        if (is_num(v)) return ref(v);
        if (v->k == JV_BOOL) return mk_num(r, is_int ? JV_INT : JV_FLOAT, v->u.b);
        return fail(r, at, "cannot apply the filter '%s' to %s", is_int ? "int" : "float", kind_name(v));
    }
    if (FNAME("default")) {
        const jv *d = a->n > 0 ? a->v[0] : NULL, *b = pick(a, 1, "boolean");
        if (b && b->k != JV_BOOL) return fail(r, at, "default(): the second argument must be a boolean");
        if (v->k == JV_UNDEF || (b && b->u.b && !truthy(v))) return d ? ref((jv *)d) : mk_cstr(r, "");
        return ref(v);
    }
    *done = 0;
    return NULL;
}

/* x | name(args) */
static jv *filter_call(rt *r, const jn *at, jv *v, const jn *call, env *e) {
    int select = FNAME("selectattr");
    if (is_list(v) && (select || FNAME("rejectattr"))) return filter_select(r, at, v, call, select, e);
    jargs a;
    if (eval_args(r, &call->l, e, &a)) { args_free(&a); return NULL; }
    int done;
    jv *res = filter_call_any(r, at, v, call, &a, &done);
    if (done) {
        /* res is the answer */
    } else if (is_list(v) && FNAME("sort")) {
        res = filter_sort(r, at, v, &a);
    } else if (is_list(v) && FNAME("map")) {
        res = filter_map(r, at, v, &a);
    } else if (v->k == JV_STR && FNAME("indent")) {
        const jv *w = pick(&a, 0, "width"), *first = pick(&a, 1, "first"), *blank = pick(&a, 2, "blank");
        if (w && w->k != JV_INT) res = fail(r, at, "indent(): width must be an integer");
        else res = indent(r, at, v, w ? w->u.num : 4, first && raw_truthy(first), blank && raw_truthy(blank));
    } else if (v->k == JV_STR && FNAME("replace")) {
        jv *kw = a.kw ? ref(a.kw) : mk_dict(r, JV_KWARGS);
        if (kw && !args_add(r, &a, kw)) res = m_replace(r, at, v, a.v, a.n);
    } else if (is_dict(v)) {
        jv *b = builtin(r, v, call->a->s, call->a->n);
        if (b && b->k == JV_FUNC && (!a.kw || !args_add(r, &a, ref(a.kw)))) res = call_method(r, at, b, a.v, a.n);
        else if (!r->rc) res = fail(r, at, "unknown filter '%.*s' for a dict", (int)call->a->n, call->a->s);
        drop(b);
    } else {
        res = fail(r, at, "cannot apply the filter '%.*s' to %s", (int)call->a->n, call->a->s, kind_name(v));
    }
    args_free(&a);
    return res;
}
#undef FNAME

/* ---- expressions ------------------------------------------------------------ */
/* utils.slice's bounds: start, stop and direction for a length and the given parts (NaN: not given). */
static void slice_bounds(double len, double v[3], double *dir) {
    double start = v[0], stop = v[1], step = v[2];
    if (step >= 0) {
        v[0] = isnan(start) ? 0 : start < 0 ? fmax(len + start, 0) : fmin(start, len);
        v[1] = isnan(stop) ? len : stop < 0 ? fmax(len + stop, 0) : fmin(stop, len);
    } else {
        v[0] = isnan(start) ? len - 1 : start < 0 ? fmax(len + start, -1) : fmin(start, len - 1);
        v[1] = isnan(stop) ? -1 : stop < -1 ? fmax(len + stop, -1) : fmin(stop, len - 1);
    }
    *dir = step > 0 ? 1 : step < 0 ? -1 : 0; /* a zero (or NaN) step gives nothing */
}

/* obj[start:stop:step]: a list of the items, or the string of the code points */
static jv *slice_of(rt *r, const jn *at, const jv *obj, double v[3]) {
    int strs = obj->k == JV_STR;
    size_t len = strs ? cp_count(obj->u.s.p, obj->u.s.n) : obj->u.l.n;
    size_t *off = strs ? malloc((len + 1) * sizeof *off) : NULL; /* each code point's byte offset */
    if (strs && !off) return oom(r);
    for (size_t i = 0, b = 0; strs && i <= len; i++) {
        off[i] = b;
        b += i < len ? cp_offset(obj->u.s.p + b, obj->u.s.n - b, 1) : 0;
    }
    double dir;
    slice_bounds((double)len, v, &dir);
    eng__buf o = {0};
    jv *out = strs ? NULL : mk_list(r, JV_LIST);
    int rc = !strs && !out;
    for (double i = v[0]; !rc && dir * i < dir * v[1]; i += v[2]) {
        size_t k = (size_t)i;
        rc = strs ? emit(r, &o, obj->u.s.p + off[k], off[k + 1] - off[k]) : list_add(r, out, ref(obj->u.l.v[k]));
    }
    free(off);
    if (!strs) {
        if (rc) { drop(out); out = NULL; }
        return out;
    }
    if (rc) { free(o.p); return NULL; }
    return mk_buf(r, at, &o);
}

static jv *eval_slice(rt *r, const jn *at, jv *obj, const jn *s, env *e) {
    if (!is_list(obj) && obj->k != JV_STR) return fail(r, at, "only a list or a string can be sliced, not %s", kind_name(obj));
    const jn *parts[3] = {s->a, s->b, s->c};
    double v[3] = {NAN, NAN, 1};
    for (int i = 0; i < 3; i++) {
        jv *x = eval(r, parts[i], e);
        if (!x) return NULL;
        int ok = x->k == JV_INT || x->k == JV_UNDEF;
        if (x->k == JV_INT) v[i] = x->u.num;
        if (!ok) fail(r, parts[i], "slice indexes must be integers, not %s", kind_name(x));
        drop(x);
        if (!ok) return NULL;
    }
    return slice_of(r, at, obj, v);
}

/* obj.name, obj[key], obj.0 */
static jv *member(rt *r, const jn *at, jv *obj, const char *k, size_t kn, const jv *idx, const jv *key) {
    jv *v = NULL;
    if (is_attrs(obj)) {
        if (!k) return fail(r, at, "a %s's key must be a string, not %s", kind_name(obj), kind_name(key));
        v = dict_get(obj, k, kn);
        if (v) return ref(v);
        return obj->k == JV_NS ? &V_UNDEF : (v = builtin(r, obj, k, kn)) ? v : r->rc ? NULL : &V_UNDEF;
    }
    if (is_list(obj) || obj->k == JV_STR) {
        if (idx) {
            if (obj->k == JV_STR) return str_at(r, obj, idx->u.num);
            v = list_at(obj, idx->u.num);
            return ref(v ? v : &V_UNDEF);
        }
        if (!k) return fail(r, at, "an index of a %s must be an integer or a string, not %s", kind_name(obj), kind_name(key));
    } else if (!k) {
        return fail(r, at, "a key must be a string, not %s", kind_name(key));
    }
    v = builtin(r, obj, k, kn);
    return v ? v : r->rc ? NULL : &V_UNDEF;
}

static jv *eval_member(rt *r, const jn *n, env *e) {
    jv *obj = eval(r, n->a, e);
    if (!obj) return NULL;
    jv *res;
    if (n->op && n->b->kind == JN_SLICE) {
        res = eval_slice(r, n, obj, n->b, e);
    } else if (!n->op) { /* .name or .0 */
        jv idx = {.rc = -1, .k = JV_INT, .u.num = n->b->num};
        res = n->b->kind == JN_INT ? member(r, n, obj, NULL, 0, &idx, &idx) : member(r, n, obj, n->b->s, n->b->n, NULL, NULL);
    } else {
        jv *key = eval(r, n->b, e);
        res = !key ? NULL
              : key->k == JV_STR ? member(r, n, obj, key->u.s.p, key->u.s.n, NULL, key)
              : key->k == JV_INT ? member(r, n, obj, NULL, 0, key, key)
                                 : member(r, n, obj, NULL, 0, NULL, key);
        drop(key);
    }
    drop(obj);
    return res;
}

static jv *eval_call(rt *r, const jn *n, env *e) {
    jargs a;
    jv *f = NULL, *res = NULL;
    if (!eval_args(r, &n->l, e, &a) && (!a.kw || !args_add(r, &a, ref(a.kw))) && (f = eval(r, n->a, e))) {
        if (f->k != JV_FUNC) res = fail(r, n, "cannot call %s: it is not a function", kind_name(f));
        else res = call_fn(r, n, f, a.v, a.n, e);
    }
    drop(f);
    args_free(&a);
    return res;
}

/* a op b on numbers; &V_UNDEF when op is not one of theirs. */
static jv *arith(rt *r, int op, const jv *a, const jv *b) {
    double x = a->u.num, y = b->u.num;
    jv_kind k = a->k == JV_FLOAT || b->k == JV_FLOAT ? JV_FLOAT : JV_INT;
    switch (op) {
    case JOP_ADD: return mk_num(r, k, x + y);
    case JOP_SUB: return mk_num(r, k, x - y);
    case JOP_MUL: return mk_num(r, k, x * y);
    case JOP_DIV: return mk_num(r, JV_FLOAT, x / y);
    case JOP_FLOORDIV: return mk_num(r, k, floor(x / y));
    case JOP_MOD: return mk_num(r, k, fmod(x, y));
    case JOP_LT: return mk_bool(x < y);
    case JOP_GT: return mk_bool(x > y);
    case JOP_LE: return mk_bool(x <= y);
    case JOP_GE: return mk_bool(x >= y);
    default: return &V_UNDEF; /* not a numeric operator: the others are tried */
    }
}

static jv *power(rt *r, const jn *n, const jv *a, const jv *b) {
    double x = numlike(a), y = numlike(b);
    if (x == 0 && y < 0) return fail(r, n, "0.0 cannot be raised to a negative power");
    double p = pow(x, y);
    if (!isfinite(p)) return fail(r, n, "** gives a number that is not finite and real");
    return mk_num(r, a->k == JV_FLOAT || b->k == JV_FLOAT || y < 0 ? JV_FLOAT : JV_INT, p);
}

static jv *concat(rt *r, const jn *n, const jv *a, const jv *b) {
    eng__buf o = {0};
    if (js_string(r, a, &o) || js_string(r, b, &o)) { free(o.p); return NULL; }
    return mk_buf(r, n, &o);
}

static const char *op_name(int op) {
    static const char *const names[] = {"", "+", "-", "~", "*", "/", "//", "%", "**", "==", "!=", "<", ">", "<=", ">=",
                                        "in", "not in", "and", "or", "not", "-", "+"};
    return names[op];
}

/* The operators other than and / or, on evaluated operands (the evaluateBinaryExpression chain). */
static jv *binary_op(rt *r, const jn *n, const jv *a, const jv *b) {
    int op = n->op, in = op == JOP_IN || op == JOP_NOTIN;
    if (op == JOP_EQ || op == JOP_NE) {
        int eq = loose_eq(r, a, b);
        return eq < 0 ? NULL : mk_bool(eq == (op == JOP_EQ));
    }
    if (a->k == JV_UNDEF || b->k == JV_UNDEF) {
        if (b->k == JV_UNDEF && in) return mk_bool(op == JOP_NOTIN);
        return fail(r, n, "cannot apply '%s' to an undefined value", op_name(op));
    }
    if (a->k == JV_NULL || b->k == JV_NULL) return fail(r, n, "cannot apply '%s' to none", op_name(op));
    if (op == JOP_CAT) return concat(r, n, a, b);
    if (op == JOP_POW && is_numlike(a) && is_numlike(b)) return power(r, n, a, b);
    if (is_num(a) && is_num(b)) {
        jv *v = arith(r, op, a, b);
        if (v != &V_UNDEF) return v;
    } else if (is_list(a) && is_list(b)) {
        if (op == JOP_ADD) {
            jv *l = mk_list(r, JV_LIST);
            for (size_t i = 0; l && i < a->u.l.n + b->u.l.n; i++)
                if (list_add(r, l, ref(i < a->u.l.n ? a->u.l.v[i] : b->u.l.v[i - a->u.l.n]))) l = NULL;
            return l;
        }
    } else if (is_list(b) && in) {
        int found = 0;
        for (size_t i = 0; !found && i < b->u.l.n; i++) found = strict_eq(b->u.l.v[i], a, 0);
        return mk_bool(found == (op == JOP_IN));
    }
    if ((a->k == JV_STR || b->k == JV_STR) && op == JOP_ADD) return concat(r, n, a, b);
    if (a->k == JV_STR && b->k == JV_STR && in)
        return mk_bool((find(b->u.s.p, b->u.s.n, a->u.s.p, a->u.s.n) != NULL) == (op == JOP_IN));
    if (a->k == JV_STR && is_dict(b) && in) return mk_bool((dict_get(b, a->u.s.p, a->u.s.n) != NULL) == (op == JOP_IN));
    return fail(r, n, "unsupported operand types for '%s': %s and %s", op_name(op), kind_name(a), kind_name(b));
}

static jv *eval_binary(rt *r, const jn *n, env *e) {
    jv *a = eval(r, n->a, e);
    if (!a) return NULL;
    if (n->op == JOP_AND || n->op == JOP_OR) {
        if (truthy(a) == (n->op == JOP_OR)) return a;
        drop(a);
        return eval(r, n->b, e);
    }
    jv *b = eval(r, n->b, e), *res = b ? binary_op(r, n, a, b) : NULL;
    drop(a);
    drop(b);
    return res;
}

static jv *eval_unary(rt *r, const jn *n, env *e) {
    jv *a = eval(r, n->a, e), *res = NULL;
    if (!a) return NULL;
    if (n->op == JOP_NOT) res = mk_bool(!truthy(a));
    else if (is_numlike(a)) res = mk_num(r, a->k == JV_FLOAT ? JV_FLOAT : JV_INT, (n->op == JOP_NEG ? -1 : 1) * numlike(a));
    else res = fail(r, n, "unary '%s' needs a number, not %s", op_name(n->op), kind_name(a));
    drop(a);
    return res;
}

static jv *eval_items(rt *r, const jn *n, env *e) {
    jv *l = mk_list(r, n->kind == JN_TUPLE ? JV_TUPLE : JV_LIST);
    for (int i = 0; l && i < n->l.n; i++)
        if (list_add(r, l, eval(r, n->l.v[i], e))) { drop(l); return NULL; }
    return l;
}

static jv *eval_dict(rt *r, const jn *n, env *e) {
    jv *d = mk_dict(r, JV_DICT);
    for (int i = 0; d && i < n->l.n; i++) {
        jv *k = eval(r, n->l.v[i], e), *v = k ? eval(r, n->l2.v[i], e) : NULL;
        int rc = !v ? -1 : k->k != JV_STR ? failc(r, n->l.v[i], "a dict key must be a string, not %s", kind_name(k))
                                          : dict_put(r, d, k->u.s.p, k->u.s.n, ref(v));
        drop(k);
        drop(v);
        if (rc) { drop(d); return NULL; }
    }
    return d;
}

static jv *eval_test(rt *r, const jn *n, env *e) {
    jv *a = eval(r, n->a, e);
    if (!a) return NULL;
    int t = run_test(r, n, n->s, n->n, a, NULL);
    drop(a);
    return t < 0 ? NULL : mk_bool(t != n->op);
}

static jv *eval_node(rt *r, const jn *n, env *e) {
    switch (n->kind) {
    case JN_INT: return mk_num(r, JV_INT, n->num);
    case JN_FLOAT: return mk_num(r, JV_FLOAT, n->num);
    case JN_STR: return mk_str(r, n, n->s, n->n);
    case JN_NAME: { jv *v = env_get(e, n->s, n->n); return ref(v ? v : &V_UNDEF); }
    case JN_LIST: case JN_TUPLE: return eval_items(r, n, e);
    case JN_DICT: return eval_dict(r, n, e);
    case JN_MEMBER: return eval_member(r, n, e);
    case JN_CALL: return eval_call(r, n, e);
    case JN_FILTER: {
        jv *v = eval(r, n->a, e), *res = v ? apply_filter(r, n, v, n->b, e) : NULL;
        drop(v);
        return res;
    }
    case JN_TEST: return eval_test(r, n, e);
    case JN_UNARY: return eval_unary(r, n, e);
    case JN_BINARY: return eval_binary(r, n, e);
    case JN_TERNARY: {
        jv *c = eval(r, n->a, e);
        if (!c) return NULL;
        int t = truthy(c);
        drop(c);
        return eval(r, t ? n->b : n->c, e);
    }
    case JN_SELECT: {
        jv *c = eval(r, n->b, e);
        if (!c) return NULL;
        int t = truthy(c);
        drop(c);
        return t ? eval(r, n->a, e) : &V_UNDEF;
    }
    default: return fail(r, n, "this cannot be evaluated here");
    }
}

static jv *eval(rt *r, const jn *n, env *e) {
    if (r->rc || r->flow) return NULL;
    if (!n) return &V_UNDEF;
    if (++r->steps > ENG__JINJA_MAX_STEPS) return fail(r, n, "the template takes more than %ld steps", ENG__JINJA_MAX_STEPS);
    if (++r->depth > MAX_RENDER_DEPTH) { r->depth--; return fail(r, n, "expressions nested deeper than %d", MAX_RENDER_DEPTH); }
    const jn *outer = r->cur;
    r->cur = n;
    jv *v = eval_node(r, n, e);
    r->cur = outer;
    r->depth--;
    return v;
}

/* ---- statements ------------------------------------------------------------- */
static int bind_target(rt *r, const jn *target, jv *v, env *e) {
    if (target->kind == JN_NAME) return env_set(r, e, target->s, target->n, ref(v));
    for (int i = 0; i < target->l.n; i++) {
        const jn *t = target->l.v[i];
        if (t->kind != JN_NAME) return failc(r, t, "only names can be unpacked into");
        if (env_set(r, e, t->s, t->n, ref(v->u.l.v[i]))) return -1;
    }
    return 0;
}

/* The items a loop runs over (its condition applied); a new list. */
static jv *loop_items(rt *r, const jn *n, env *scope) {
    const jn *src = n->b->kind == JN_SELECT ? n->b->a : n->b, *cond = n->b->kind == JN_SELECT ? n->b->b : NULL;
    jv *it = eval(r, src, scope);
    if (!it) return NULL;
    if (!is_list(it) && !is_dict(it)) {
        fail(r, n->b, "cannot loop over %s", kind_name(it));
        drop(it);
        return NULL;
    }
    if (is_dict(it)) { jv *keys = dict_pairs(r, it, 1); drop(it); if (!(it = keys)) return NULL; }
    jv *items = mk_list(r, JV_LIST);
    for (size_t i = 0; items && i < it->u.l.n; i++) {
        jv *cur = it->u.l.v[i];
        int keep = 1;
        if (n->a->kind == JN_TUPLE && cur->k != JV_LIST) keep = failc(r, n->a, "cannot unpack %s", kind_name(cur));
        else if (n->a->kind == JN_TUPLE && cur->u.l.n != (size_t)n->a->l.n)
            keep = failc(r, n->a, "too %s items to unpack (%zu for %d names)", cur->u.l.n < (size_t)n->a->l.n ? "few" : "many",
                         cur->u.l.n, n->a->l.n);
        if (keep > 0 && cond) {
            env *ls = env_new(r, scope);
            jv *t = ls && !bind_target(r, n->a, cur, ls) ? eval(r, cond, ls) : NULL;
            keep = t ? truthy(t) : -1;
            drop(t);
            env_drop(ls);
        }
        if (keep < 0 || (keep && list_add(r, items, ref(cur)))) { drop(items); items = NULL; }
    }
    drop(it);
    return items;
}

static jv *loop_object(rt *r, jv *items, size_t i) {
    size_t n = items->u.l.n;
    jv *loop = mk_dict(r, JV_DICT);
    if (loop && (dict_put(r, loop, "index", 5, mk_num(r, JV_INT, (double)i + 1)) ||
                 dict_put(r, loop, "index0", 6, mk_num(r, JV_INT, (double)i)) ||
                 dict_put(r, loop, "revindex", 8, mk_num(r, JV_INT, (double)(n - i))) ||
                 dict_put(r, loop, "revindex0", 9, mk_num(r, JV_INT, (double)(n - i - 1))) ||
                 dict_put(r, loop, "first", 5, mk_bool(i == 0)) || dict_put(r, loop, "last", 4, mk_bool(i == n - 1)) ||
                 dict_put(r, loop, "length", 6, mk_num(r, JV_INT, (double)n)) ||
                 dict_put(r, loop, "previtem", 8, ref(i > 0 ? items->u.l.v[i - 1] : &V_UNDEF)) ||
                 dict_put(r, loop, "nextitem", 8, ref(i + 1 < n ? items->u.l.v[i + 1] : &V_UNDEF)))) {
        drop(loop);
        return NULL;
    }
    return loop;
}

/* As @huggingface/jinja: an iteration ended by break or continue leaves no
 * text, and the else block runs unless an iteration ran to its end. */
static int exec_for(rt *r, const jn *n, env *e, eng__buf *out) {
    env *scope = env_new(r, e);
    jv *items = scope ? loop_items(r, n, scope) : NULL;
    int rc = items ? 0 : -1, ran = 0;
    for (size_t i = 0; !rc && i < items->u.l.n; i++) {
        size_t mark = out->n;
        if (env_set(r, scope, "loop", 4, loop_object(r, items, i)) || bind_target(r, n->a, items->u.l.v[i], scope)) {
            rc = -1;
            break;
        }
        if (!exec_block(r, &n->l, scope, out)) { ran = 1; continue; }
        if (r->rc || !r->flow) { rc = -1; break; }
        out->n = mark;
        if (out->p) out->p[mark] = 0;
        int brk = r->flow == FLOW_BREAK;
        r->flow = FLOW_NONE;
        if (brk) break;
    }
    if (!rc && !ran) rc = exec_block(r, &n->l2, scope, out);
    drop(items);
    env_drop(scope);
    return rc;
}

static int exec_set(rt *r, const jn *n, env *e) {
    jv *v;
    if (n->b) {
        v = eval(r, n->b, e);
    } else {
        eng__buf o = {0};
        v = exec_block(r, &n->l, e, &o) ? NULL : mk_buf(r, n, &o);
        free(o.p);
    }
    if (!v) return -1;
    const jn *t = n->a;
    int rc;
    if (t->kind == JN_NAME) {
        rc = env_set(r, e, t->s, t->n, ref(v));
    } else if (t->kind == JN_TUPLE) {
        if (!is_list(v)) rc = failc(r, t, "cannot unpack %s", kind_name(v));
        else if (v->u.l.n != (size_t)t->l.n)
            rc = failc(r, t, "too %s items to unpack (%zu for %d names)", v->u.l.n < (size_t)t->l.n ? "few" : "many", v->u.l.n,
                       t->l.n);
        else rc = bind_target(r, t, v, e);
    } else if (t->kind == JN_MEMBER) {
        jv *obj = eval(r, t->a, e);
        if (!obj) rc = -1;
        else if (obj->k != JV_NS) rc = failc(r, t, "only a namespace's attributes can be set, not a %s's", kind_name(obj));
        else if (t->b->kind != JN_NAME) rc = failc(r, t, "the attribute to set must be a name");
        else rc = dict_put(r, obj, t->b->s, t->b->n, ref(v));
        drop(obj);
    } else {
        rc = failc(r, t, "cannot assign to this");
    }
    drop(v);
    return rc;
}

static int print_result(rt *r, jv *v, eng__buf *out) {
    if (!v) return -1;
    int rc = v->k == JV_NULL || v->k == JV_UNDEF ? 0 : print_value(r, v, out);
    drop(v);
    return rc;
}

/* m(args) with caller() bound, in a scope of its own under e */
static jv *call_with_caller(rt *r, const jn *n, jv *f, jargs *a, jv *caller, env *e) {
    if (f->k != JV_FUNC) return fail(r, n, "cannot call %s: it is not a function", kind_name(f));
    env *inner = env_new(r, e);
    jv *res = inner && !env_set(r, inner, "caller", 6, ref(caller)) ? call_fn(r, n, f, a->v, a->n, inner) : NULL;
    env_drop(inner);
    return res;
}

/* {% call(params) m(args) %}body{% endcall %}: m runs with caller() = the body;
 * m always gets keyword arguments (maybe none) last. */
static int exec_callblock(rt *r, const jn *n, env *e, eng__buf *out) {
    jargs a;
    jv *f = NULL, *res = NULL, *caller = NULL;
    if (!eval_args(r, &n->a->l, e, &a) && !args_add(r, &a, a.kw ? ref(a.kw) : mk_dict(r, JV_KWARGS)) &&
        (f = eval(r, n->a->a, e)) && (caller = mk_func(r, F_CALLER, 0, NULL, n, e)))
        res = call_with_caller(r, n, f, &a, caller, e);
    drop(caller);
    drop(f);
    args_free(&a);
    return print_result(r, res, out);
}

static int exec_filterblock(rt *r, const jn *n, env *e, eng__buf *out) {
    eng__buf o = {0};
    jv *body = exec_block(r, &n->l, e, &o) ? NULL : mk_buf(r, n, &o);
    free(o.p);
    jv *res = body ? apply_filter(r, n, body, n->b, e) : NULL;
    drop(body);
    return print_result(r, res, out);
}

static int exec_stmt(rt *r, const jn *n, env *e, eng__buf *out) {
    r->cur = n;
    switch (n->kind) {
    case JN_TEXT: return emit(r, out, n->s, n->n);
    case JN_IF: {
        jv *c = eval(r, n->a, e);
        if (!c) return -1;
        int t = truthy(c);
        drop(c);
        return exec_block(r, t ? &n->l : &n->l2, e, out);
    }
    case JN_FOR: return exec_for(r, n, e, out);
    case JN_SET: return exec_set(r, n, e);
    case JN_MACRO: return env_set(r, e, n->s, n->n, mk_func(r, F_MACRO, 0, NULL, n, NULL));
    case JN_CALLBLOCK: return exec_callblock(r, n, e, out);
    case JN_FILTERBLOCK: return exec_filterblock(r, n, e, out);
    case JN_BREAK: case JN_CONTINUE: r->flow = n->kind == JN_BREAK ? FLOW_BREAK : FLOW_CONTINUE; return -1;
    default: return print_result(r, eval(r, n, e), out);
    }
}

static int exec_block(rt *r, const jn_list *l, env *e, eng__buf *out) {
    if (++r->depth > MAX_RENDER_DEPTH) { r->depth--; return failc(r, NULL, "blocks nested deeper than %d", MAX_RENDER_DEPTH); }
    int rc = 0;
    for (int i = 0; !rc && i < l->n; i++) rc = r->rc || r->flow ? -1 : exec_stmt(r, l->v[i], e, out);
    r->depth--;
    return rc;
}

/* ---- the context ------------------------------------------------------------ */
/* An array index in JavaScript's sense: such keys come first, in numeric order. */
static int index_key(const char *k, size_t n, double *v) {
    if (!n || n > 10 || (n > 1 && k[0] == '0')) return 0;
    for (size_t i = 0; i < n; i++)
        if (k[i] < '0' || k[i] > '9') return 0;
    *v = parse_decimal(k, k + n);
    return *v < 4294967295.0;
}

/* Reorder d's entries as Object.entries() of the parsed JSON has them. */
static int index_keys_first(rt *r, jv *d) {
    size_t n = d->u.d.n, ni = 0;
    jent *tmp = malloc((n + 1) * sizeof *tmp);
    double *key = malloc((n + 1) * sizeof *key);
    if (!tmp || !key) { free(tmp); free(key); oom(r); return -1; }
    for (size_t i = 0; i < n; i++) /* the indexes, sorted as they come (insertion) */
        if (index_key(d->u.d.e[i].k, d->u.d.e[i].kn, &key[ni])) {
            size_t j = ni++;
            double k = key[j];
            for (; j > 0 && key[j - 1] > k; j--) { key[j] = key[j - 1]; tmp[j] = tmp[j - 1]; }
            key[j] = k;
            tmp[j] = d->u.d.e[i];
        }
    for (size_t i = 0, m = ni; i < n; i++) /* then the others in their order */
        if (!index_key(d->u.d.e[i].k, d->u.d.e[i].kn, &key[n])) tmp[m++] = d->u.d.e[i];
    if (n) memcpy(d->u.d.e, tmp, n * sizeof *tmp);
    free(tmp);
    free(key);
    return 0;
}

static jv *from_json(rt *r, const cJSON *j, int depth) {
    if (depth > 1000) return fail(r, NULL, "the context is nested deeper than 1000 levels");
    if (cJSON_IsFalse(j) || cJSON_IsTrue(j)) return mk_bool(cJSON_IsTrue(j));
    if (cJSON_IsNull(j)) return &V_NULL;
    if (cJSON_IsNumber(j)) return mk_number(r, j->valuedouble);
    if (cJSON_IsString(j)) {
        size_t n = strlen(j->valuestring);
        if (!eng__utf8_valid(j->valuestring, n)) {
            if (!r->rc) r->rc = eng__fail(r->err, r->errlen, ENG_EUTF8, "a string of the context is not valid UTF-8");
            return NULL;
        }
        return mk_str(r, NULL, j->valuestring, n);
    }
    const cJSON *c;
    if (cJSON_IsArray(j)) {
        jv *l = mk_list(r, JV_LIST);
        cJSON_ArrayForEach(c, j) if (!l || list_add(r, l, from_json(r, c, depth + 1))) { drop(l); return NULL; }
        return l;
    }
    if (cJSON_IsObject(j)) {
        jv *d = mk_dict(r, JV_DICT);
        cJSON_ArrayForEach(c, j) {
            if (!d || !c->string || dict_put(r, d, c->string, strlen(c->string), from_json(r, c, depth + 1))) {
                drop(d);
                return c && !c->string ? fail(r, NULL, "a key of the context is missing") : NULL;
            }
        }
        if (index_keys_first(r, d)) { drop(d); return NULL; }
        return d;
    }
    return fail(r, NULL, "the context holds a value that is not JSON");
}

static int set_globals(rt *r, env *g) {
    static const struct { const char *k; int fk; } FNS[] = {
        {"namespace", F_NAMESPACE}, {"raise_exception", F_RAISE}, {"range", F_RANGE}, {"strftime_now", F_STRFTIME}};
    for (size_t i = 0; i < sizeof FNS / sizeof *FNS; i++)
        if (env_set(r, g, FNS[i].k, strlen(FNS[i].k), mk_func(r, FNS[i].fk, 0, NULL, NULL, NULL))) return -1;
    return env_set(r, g, "true", 4, &V_TRUE) || env_set(r, g, "false", 5, &V_FALSE) || env_set(r, g, "none", 4, &V_NULL) ||
                   env_set(r, g, "True", 4, &V_TRUE) || env_set(r, g, "False", 5, &V_FALSE) ||
                   env_set(r, g, "None", 4, &V_NULL)
               ? -1
               : 0;
}

static int set_context(rt *r, env *g, const cJSON *ctx) {
    if (!cJSON_IsObject(ctx)) return failc(r, NULL, "the context must be a JSON object");
    jv *d = from_json(r, ctx, 0);
    int rc = d ? 0 : -1;
    for (size_t i = 0; !rc && i < d->u.d.n; i++) {
        const jent *en = &d->u.d.e[i];
        if (ent_find(g->e, g->n, en->k, en->kn)) rc = failc(r, NULL, "the context may not set '%s' (a name the template language has)", en->k);
        else rc = env_set(r, g, en->k, en->kn, ref(en->v));
    }
    drop(d);
    return rc;
}

int eng__jinja_render(const eng__jinja *t, const cJSON *ctx, char **out, size_t *len, char *err, size_t errlen) {
    *out = NULL;
    *len = 0;
    rt r = {.t = t, .err = err, .errlen = errlen};
    env *g = env_new(&r, NULL);
    eng__buf o = {0};
    int rc = !g || set_globals(&r, g) || set_context(&r, g, ctx) ? -1 : exec_block(&r, &t->body, g, &o);
    if (rc && !r.rc) failc(&r, NULL, "{%% break %%} or {%% continue %%} outside a loop");
    env_drop(g);
    for (size_t i = 0; i < r.nns; i++) { /* namespaces may hold each other: empty them all, then let go */
        jv *ns = r.ns[i];
        for (size_t k = 0; k < ns->u.d.n; k++) { drop(ns->u.d.e[k].v); free(ns->u.d.e[k].k); }
        ns->u.d.n = 0;
    }
    for (size_t i = 0; i < r.nns; i++) drop(r.ns[i]);
    free(r.ns);
    if (r.rc) { free(o.p); return r.rc; }
    if (!o.p && eng__buf_add(&o, "", 0)) return eng__fail(err, errlen, ENG_ENOMEM, "out of memory");
    *out = o.p;
    *len = o.n;
    return ENG_OK;
}
