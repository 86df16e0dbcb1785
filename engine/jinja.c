/* jinja.c — chat templates, part one: the source's whitespace rules, the
 * lexer and the parser (jinja.h; the renderer is jinja_run.c).
 *
 * The steps follow @huggingface/jinja's, in its order, because its quirks are
 * visible in the output:
 *   1. preprocess the source: drop one trailing "\n"; lstrip_blocks (spaces
 *      and tabs between a line start and "{%", "{#" or "{-" go); trim_blocks
 *      (the "\n" right after "%}", "#}" or "-}" goes); the transformers
 *      {% generation %} / {% endgeneration %} markers are removed, with the
 *      whitespace around them when they carry "-";
 *   2. lex: text outside tags; in tags, JavaScript's whitespace is skipped,
 *      "{%-" / "{{-" / "{#-" strip the text before, "-%}" / "-}}" / "-#}" the
 *      text after; "-" or "+" before a number where an operand is expected is
 *      part of the number;
 *   3. parse by recursive descent with its precedences (lowest first):
 *      a if c else b; or; and; not; comparisons and in / not in; + - ~;
 *      * / // %; **; is TEST; | FILTER; unary - +; calls, .attr and [index].
 * Every node keeps its offset in the source as given, so messages name the
 * line and column there, whatever step 1 removed. */
#include "jinja.h"
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- arena: every node and string of a template ------------------------- */
struct jchunk {
    struct jchunk *next;
    size_t used, cap;
    max_align_t data[];
};
struct jarena {
    struct jchunk *head;
};

static void *ar_alloc(struct jarena *a, size_t n) {
    n = (n + sizeof(max_align_t) - 1) / sizeof(max_align_t) * sizeof(max_align_t);
    struct jchunk *c = a->head;
    if (!c || c->cap - c->used < n) {
        size_t cap = n > 65536 ? n : 65536;
        c = malloc(sizeof *c + cap);
        if (!c) return NULL;
        c->next = a->head;
        c->used = 0;
        c->cap = cap;
        a->head = c;
    }
    void *p = (char *)c->data + c->used;
    c->used += n;
    memset(p, 0, n);
    return p;
}

static void ar_free(struct jarena *a) {
    if (!a) return;
    for (struct jchunk *c = a->head, *nx; c; c = nx) {
        nx = c->next;
        free(c);
    }
    free(a);
}

/* ---- JavaScript text rules ---------------------------------------------- */
uint32_t eng__js_cp(const char *s, size_t n, int *len) {
    const unsigned char *u = (const unsigned char *)s;
    int k = eng__utf8_seq(u, n);
    if (k <= 1) { *len = 1; return u[0]; } /* callers hold valid UTF-8; a stray byte is itself */
    *len = k;
    if (k == 2) return (uint32_t)(u[0] & 0x1F) << 6 | (u[1] & 0x3F);
    if (k == 3) return (uint32_t)(u[0] & 0x0F) << 12 | (uint32_t)(u[1] & 0x3F) << 6 | (u[2] & 0x3F);
    return (uint32_t)(u[0] & 0x07) << 18 | (uint32_t)(u[1] & 0x3F) << 12 | (uint32_t)(u[2] & 0x3F) << 6 | (u[3] & 0x3F);
}

int eng__js_space(uint32_t c) {
    return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) ||
           c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000 || c == 0xFEFF;
}

/* Bytes of the JavaScript whitespace at s[i..n), 0 if none there. */
static size_t space_len(const char *s, size_t n, size_t i) {
    int k;
    return i < n && eng__js_space(eng__js_cp(s + i, n - i, &k)) ? (size_t)k : 0;
}

void eng__jinja_where(const eng__jinja *t, uint32_t pos, int *line, int *col) {
    *line = 1;
    *col = 1;
    for (size_t i = 0; i < pos && i < t->len; i++) {
        if (t->src[i] == '\n') { ++*line; *col = 1; }
        else if (((unsigned char)t->src[i] & 0xC0) != 0x80) ++*col;
    }
}

/* ---- step 1: preprocessing, keeping each byte's offset in the source ----- */
typedef struct {
    char *p;
    uint32_t *at;
    size_t n, cap;
} pbuf;

static int pb_put(pbuf *b, const char *s, const uint32_t *at, size_t n) {
    if (b->n + n > b->cap) {
        size_t cap = (b->n + n) * 2 + 64;
        char *np = realloc(b->p, cap);
        if (!np) return ENG_ENOMEM;
        b->p = np;
        uint32_t *na = realloc(b->at, cap * sizeof *na);
        if (!na) return ENG_ENOMEM;
        b->at = na;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    memcpy(b->at + b->n, at, n * sizeof *at);
    b->n += n;
    return ENG_OK;
}

static void pb_free(pbuf *b) {
    free(b->p);
    free(b->at);
}

/* A JavaScript line terminator (\n, \r, U+2028, U+2029) ends just before i. */
static int after_line_end(const char *s, size_t i) {
    if (i == 0) return 1;
    if (s[i - 1] == '\n' || s[i - 1] == '\r') return 1;
    return i >= 3 && !memcmp(s + i - 3, "\xE2\x80", 2) && (s[i - 1] == '\xA8' || s[i - 1] == '\xA9');
}

/* lstrip_blocks: /^[ \t]*({[#%-])/gm -> "$1" */
static int pre_lstrip(const pbuf *in, pbuf *out) {
    const char *s = in->p;
    for (size_t i = 0; i < in->n;) {
        if (after_line_end(s, i)) {
            size_t j = i;
            while (j < in->n && (s[j] == ' ' || s[j] == '\t')) j++;
            if (j + 1 < in->n && s[j] == '{' && (s[j + 1] == '#' || s[j + 1] == '%' || s[j + 1] == '-')) {
                int rc = pb_put(out, s + j, in->at + j, 2);
                if (rc) return rc;
                i = j + 2;
                continue;
            }
        }
        int rc = pb_put(out, s + i, in->at + i, 1);
        if (rc) return rc;
        i++;
    }
    return ENG_OK;
}

/* trim_blocks: /([#%-]})\n/g -> "$1" */
static int pre_trim(const pbuf *in, pbuf *out) {
    const char *s = in->p;
    for (size_t i = 0; i < in->n;) {
        if (i + 2 < in->n && (s[i] == '#' || s[i] == '%' || s[i] == '-') && s[i + 1] == '}' && s[i + 2] == '\n') {
            int rc = pb_put(out, s + i, in->at + i, 2);
            if (rc) return rc;
            i += 3;
            continue;
        }
        int rc = pb_put(out, s + i, in->at + i, 1);
        if (rc) return rc;
        i++;
    }
    return ENG_OK;
}

static size_t skip_space(const char *s, size_t n, size_t i) {
    size_t k;
    while ((k = space_len(s, n, i))) i += k;
    return i;
}

/* Is s[i..] "{%-? (end)?generation -?%}"? Its end in *end, the dashes in *l, *r. */
static int generation_tag(const char *s, size_t n, size_t i, size_t *end, int *l, int *r) {
    if (i + 1 >= n || s[i] != '{' || s[i + 1] != '%') return 0;
    i += 2;
    *l = i < n && s[i] == '-';
    i = skip_space(s, n, i + (size_t)*l);
    if (n - i >= 3 && !memcmp(s + i, "end", 3)) i += 3;
    if (n - i < 10 || memcmp(s + i, "generation", 10)) return 0;
    i = skip_space(s, n, i + 10);
    *r = i < n && s[i] == '-';
    i += (size_t)*r;
    if (i + 1 >= n || s[i] != '%' || s[i + 1] != '}') return 0;
    *end = i + 2;
    return 1;
}

/* /(\s*){%(-?)\s*(?:end)?generation\s*(-?)%}(\s*)/g: the tag goes, and the
 * whitespace before (after) it too when it has a "-" on that side. The
 * whitespace taken after a tag cannot be the next one's before. */
static int pre_generation(const pbuf *in, pbuf *out) {
    const char *s = in->p;
    size_t n = in->n, out_mark = 0; /* out->n where the text after the last match starts */
    for (size_t i = 0; i < n;) {
        size_t end;
        int l, r;
        if (!generation_tag(s, n, i, &end, &l, &r)) {
            int rc = pb_put(out, s + i, in->at + i, 1);
            if (rc) return rc;
            i++;
            continue;
        }
        if (l) { /* drop the whitespace just before, back to the last match at most */
            size_t k = out->n;
            while (k > out_mark) {
                size_t b = k - 1;
                while (b > out_mark && ((unsigned char)out->p[b] & 0xC0) == 0x80) b--;
                if (!space_len(out->p, k, b)) break;
                k = b;
            }
            out->n = k;
        }
        size_t after = skip_space(s, n, end);
        if (!r) {
            int rc = pb_put(out, s + end, in->at + end, after - end);
            if (rc) return rc;
        }
        out_mark = out->n;
        i = after;
    }
    return ENG_OK;
}

static int preprocess(const char *src, size_t len, pbuf *out) {
    pbuf a = {0}, b = {0};
    if (len && src[len - 1] == '\n') len--;
    int rc = ENG_ENOMEM;
    uint32_t *at = malloc((len ? len : 1) * sizeof *at);
    if (at) {
        for (size_t i = 0; i < len; i++) at[i] = (uint32_t)i;
        rc = pb_put(&a, src, at, len);
        free(at);
    }
    if (!rc) rc = pre_lstrip(&a, &b);
    a.n = 0;
    if (!rc) rc = pre_trim(&b, &a);
    if (!rc) rc = pre_generation(&a, out);
    pb_free(&a);
    pb_free(&b);
    return rc;
}

/* ---- step 2: tokens ----------------------------------------------------- */
typedef enum {
    T_NONE, T_TEXT, T_NUM, T_STR, T_NAME, T_EQUALS, T_LPAREN, T_RPAREN, T_OPEN_STMT, T_CLOSE_STMT, T_OPEN_EXPR,
    T_CLOSE_EXPR, T_LBRACKET, T_RBRACKET, T_LBRACE, T_RBRACE, T_COMMA, T_DOT, T_COLON, T_PIPE,
    T_ADD,   /* + - ~ between operands */
    T_MUL,   /* * / // % */
    T_POW,   /* ** */
    T_CMP,   /* < > <= >= == != */
    T_UNARY, /* - + where an operand is expected */
    T_COMMENT, T_EOF,
} tkind;

typedef struct {
    tkind k;
    const char *s;
    size_t n;
    uint32_t pos;
} tok;

typedef struct {
    const eng__jinja *tpl;
    const char *s;         /* the preprocessed source */
    const uint32_t *at;
    size_t n, i;
    tok *t;
    size_t nt, cap;
    int curly;             /* { } depth inside {{ }}: "}}" closes the tag only at 0 */
    char *err;
    size_t errlen;
} lexer;

__attribute__((format(printf, 5, 6))) static int fail_at(const eng__jinja *t, uint32_t pos, char *err, size_t errlen,
                                                         const char *fmt, ...);

static int fail_at(const eng__jinja *t, uint32_t pos, char *err, size_t errlen, const char *fmt, ...) {
    int line, col;
    eng__jinja_where(t, pos, &line, &col);
    char msg[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return eng__fail(err, errlen, ENG_EFORMAT, "template line %d:%d: %s", line, col, msg);
}

static uint32_t lx_pos(const lexer *x) { return x->i < x->n ? x->at[x->i] : (uint32_t)x->tpl->len; }

static int lx_end(lexer *x) {
    return fail_at(x->tpl, lx_pos(x), x->err, x->errlen, "unexpected end of template inside a tag");
}

static int lx_push(lexer *x, tkind k, const char *s, size_t n, uint32_t pos) {
    if (x->nt == x->cap) {
        size_t cap = x->cap ? x->cap * 2 : 256;
        tok *nt = realloc(x->t, cap * sizeof *nt);
        if (!nt) return ENG_ENOMEM;
        x->t = nt;
        x->cap = cap;
    }
    x->t[x->nt++] = (tok){k, s, n, pos};
    return ENG_OK;
}

static tkind lx_last(const lexer *x) { return x->nt ? x->t[x->nt - 1].k : T_NONE; }
static int lx_starts(const lexer *x, const char *lit) {
    size_t k = strlen(lit);
    return x->n - x->i >= k && !memcmp(x->s + x->i, lit, k);
}
static int is_digit(char c) { return c >= '0' && c <= '9'; }
static int is_word(char c) { return is_digit(c) || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }

/* "{%-", "{{-", "{#-": the text token before loses its trailing whitespace (and goes if nothing is left). */
static void lx_strip_before(lexer *x) {
    if (lx_last(x) != T_TEXT) return;
    tok *t = &x->t[x->nt - 1];
    while (t->n) {
        size_t b = t->n - 1;
        while (b && ((unsigned char)t->s[b] & 0xC0) == 0x80) b--;
        if (!space_len(t->s, t->n, b)) break;
        t->n = b;
    }
    if (!t->n) x->nt--;
}

static void lx_skip_space(lexer *x) { x->i = skip_space(x->s, x->n, x->i); }

static int lx_text(lexer *x) {
    size_t b = x->i;
    while (x->i < x->n &&
           !(x->s[x->i] == '{' && x->i + 1 < x->n && (x->s[x->i + 1] == '%' || x->s[x->i + 1] == '{' || x->s[x->i + 1] == '#')))
        x->i++;
    return x->i > b ? lx_push(x, T_TEXT, x->s + b, x->i - b, x->at[b]) : ENG_OK;
}

static int lx_comment(lexer *x) {
    uint32_t pos = x->at[x->i];
    x->i += 2;
    int strip_before = x->i < x->n && x->s[x->i] == '-';
    x->i += (size_t)strip_before;
    size_t b = x->i;
    while (!(x->i + 1 < x->n && x->s[x->i] == '#' && x->s[x->i + 1] == '}')) {
        if (x->i + 2 >= x->n) return fail_at(x->tpl, pos, x->err, x->errlen, "{# comment is never closed with #}");
        x->i++;
    }
    int strip_after = x->i > b && x->s[x->i - 1] == '-';
    if (strip_before) lx_strip_before(x);
    int rc = lx_push(x, T_COMMENT, x->s + b, x->i - b, pos);
    x->i += 2;
    if (strip_after) lx_skip_space(x);
    return rc;
}

/* Digits at x->i; a tag cannot end inside them. */
static int lx_digits(lexer *x) {
    while (x->i < x->n && is_digit(x->s[x->i]))
        if (++x->i >= x->n) return lx_end(x);
    return ENG_OK;
}

static int lx_number(lexer *x, size_t b, int fraction) {
    int rc = lx_digits(x);
    if (!rc && fraction && x->i + 1 < x->n && x->s[x->i] == '.' && is_digit(x->s[x->i + 1])) {
        x->i++;
        rc = lx_digits(x);
    }
    return rc ? rc : lx_push(x, T_NUM, x->s + b, x->i - b, x->at[b]);
}

/* "-" or "+": part of a number or a unary operator unless an operand precedes. Returns 1 if not consumed. */
static int lx_sign(lexer *x) {
    tkind last = lx_last(x);
    if (last == T_TEXT || last == T_NONE)
        return fail_at(x->tpl, lx_pos(x), x->err, x->errlen, "unexpected character '%c'", x->s[x->i]);
    if (last == T_NAME || last == T_NUM || last == T_STR || last == T_RPAREN || last == T_RBRACKET) return 1;
    size_t b = x->i++;
    if (x->i < x->n && is_digit(x->s[x->i])) return lx_number(x, b, 1);
    return lx_push(x, T_UNARY, x->s + b, 1, x->at[b]);
}

static int hexval(const char *s, int k, uint32_t *v) {
    *v = 0;
    for (int i = 0; i < k; i++) {
        char c = s[i];
        int d = is_digit(c) ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : (c >= 'A' && c <= 'F') ? c - 'A' + 10 : -1;
        if (d < 0) return -1;
        *v = *v << 4 | (uint32_t)d;
    }
    return 0;
}

static size_t put_utf8(char *o, uint32_t cp) {
    if (cp < 0x80) { o[0] = (char)cp; return 1; }
    if (cp < 0x800) { o[0] = (char)(0xC0 | cp >> 6); o[1] = (char)(0x80 | (cp & 0x3F)); return 2; }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | cp >> 12); o[1] = (char)(0x80 | ((cp >> 6) & 0x3F)); o[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | cp >> 18); o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* One escape after a backslash at x->i (already past it); its UTF-8 appended to o. */
static int lx_escape(lexer *x, char *o, size_t *on, uint32_t pos) {
    static const char from[] = "ntrbfv'\"\\", to[] = "\n\t\r\b\f\v'\"\\";
    if (x->i >= x->n) return lx_end(x);
    char e = x->s[x->i++];
    const char *f = e ? strchr(from, e) : NULL;
    if (f) { o[(*on)++] = to[f - from]; return ENG_OK; }
    if (e != 'x' && e != 'u')
        return fail_at(x->tpl, pos, x->err, x->errlen, "unknown escape '\\%c' in a string (\\n \\t \\r \\b \\f \\v \\' \\\" "
                       "\\\\ \\xHH \\uHHHH)", e);
    int k = e == 'x' ? 2 : 4;
    uint32_t cp;
    if (x->n - x->i < (size_t)k || hexval(x->s + x->i, k, &cp))
        return fail_at(x->tpl, pos, x->err, x->errlen, "bad escape '\\%c' in a string: %d hexadecimal digits expected", e, k);
    x->i += (size_t)k;
    uint32_t lo;
    if (cp >= 0xD800 && cp < 0xDC00 && x->n - x->i >= 6 && x->s[x->i] == '\\' && x->s[x->i + 1] == 'u' &&
        !hexval(x->s + x->i + 2, 4, &lo) && lo >= 0xDC00 && lo < 0xE000) {
        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        x->i += 6;
    } else if (cp >= 0xD800 && cp < 0xE000) {
        cp = 0xFFFD; /* half a surrogate pair: what Node writes for it */
    }
    *on += put_utf8(o + *on, cp);
    return ENG_OK;
}

static int lx_string(lexer *x, char *buf) {
    char q = x->s[x->i];
    uint32_t pos = x->at[x->i++];
    size_t on = 0;
    for (;;) {
        if (x->i >= x->n) return fail_at(x->tpl, pos, x->err, x->errlen, "string is never closed with %c", q);
        char c = x->s[x->i];
        if (c == q) break;
        if (c == '\\') {
            x->i++;
            int rc = lx_escape(x, buf, &on, pos);
            if (rc) return rc;
            continue;
        }
        buf[on++] = c;
        x->i++;
    }
    x->i++;
    return lx_push(x, T_STR, buf, on, pos);
}

static const struct { const char *s; tkind k; } PUNCT[] = {
    {"{%", T_OPEN_STMT}, {"%}", T_CLOSE_STMT}, {"{{", T_OPEN_EXPR}, {"}}", T_CLOSE_EXPR}, {"(", T_LPAREN},
    {")", T_RPAREN}, {"{", T_LBRACE}, {"}", T_RBRACE}, {"[", T_LBRACKET}, {"]", T_RBRACKET}, {",", T_COMMA},
    {".", T_DOT}, {":", T_COLON}, {"|", T_PIPE}, {"<=", T_CMP}, {">=", T_CMP}, {"==", T_CMP}, {"!=", T_CMP},
    {"<", T_CMP}, {">", T_CMP}, {"+", T_ADD}, {"-", T_ADD}, {"~", T_ADD}, {"**", T_POW}, {"*", T_MUL},
    {"//", T_MUL}, {"/", T_MUL}, {"%", T_MUL}, {"=", T_EQUALS},
};

/* Punctuation at x->i; 1 if there is none. */
static int lx_punct(lexer *x) {
    for (size_t k = 0; k < sizeof PUNCT / sizeof *PUNCT; k++) {
        if (PUNCT[k].k == T_CLOSE_EXPR && x->curly > 0) continue; /* "}}" closing a dict literal */
        if (!lx_starts(x, PUNCT[k].s)) continue;
        size_t len = strlen(PUNCT[k].s);
        if (PUNCT[k].k == T_OPEN_EXPR) x->curly = 0;
        else if (PUNCT[k].k == T_LBRACE) x->curly++;
        else if (PUNCT[k].k == T_RBRACE) x->curly--;
        int rc = lx_push(x, PUNCT[k].k, x->s + x->i, len, x->at[x->i]);
        x->i += len;
        return rc;
    }
    return 1;
}

/* One step inside a tag (the text between tags is lx_text's). */
static int lx_tag(lexer *x, char *strbuf) {
    if (lx_starts(x, "{#")) return lx_comment(x);
    if (lx_starts(x, "{%-") || lx_starts(x, "{{-")) {
        lx_strip_before(x);
        int stmt = x->s[x->i + 1] == '%';
        if (!stmt) x->curly = 0;
        int rc = lx_push(x, stmt ? T_OPEN_STMT : T_OPEN_EXPR, x->s + x->i, 2, x->at[x->i]);
        x->i += 3;
        return rc;
    }
    size_t b = x->i;
    lx_skip_space(x);
    if (x->i >= x->n) return x->i > b ? lx_end(x) : ENG_OK;
    if (lx_starts(x, "-%}") || lx_starts(x, "-}}")) {
        int stmt = x->s[x->i + 1] == '%';
        int rc = lx_push(x, stmt ? T_CLOSE_STMT : T_CLOSE_EXPR, x->s + x->i + 1, 2, x->at[x->i]);
        x->i += 3;
        lx_skip_space(x);
        return rc;
    }
    char c = x->s[x->i];
    int rc;
    if ((c == '-' || c == '+') && (rc = lx_sign(x)) != 1) return rc;
    if ((rc = lx_punct(x)) != 1) return rc;
    if (c == '\'' || c == '"') return lx_string(x, strbuf + x->i);
    if (is_digit(c)) return lx_number(x, x->i, lx_last(x) != T_DOT);
    if (is_word(c)) {
        b = x->i;
        while (x->i < x->n && is_word(x->s[x->i]))
            if (++x->i >= x->n) return lx_end(x);
        return lx_push(x, T_NAME, x->s + b, x->i - b, x->at[b]);
    }
    int k;
    uint32_t cp = eng__js_cp(x->s + x->i, x->n - x->i, &k);
    return fail_at(x->tpl, x->at[x->i], x->err, x->errlen, "unexpected character '%.*s' (U+%04X) in a tag", k,
                   x->s + x->i, (unsigned)cp);
}

/* strbuf: as long as the source; strings with escapes are unescaped into it. */
static int lex(lexer *x, char *strbuf) {
    while (x->i < x->n) {
        tkind last = lx_last(x);
        int rc;
        if (last == T_NONE || last == T_CLOSE_STMT || last == T_CLOSE_EXPR || last == T_COMMENT) {
            size_t before = x->nt;
            if ((rc = lx_text(x))) return rc;
            if (x->nt > before) continue;
        }
        if ((rc = lx_tag(x, strbuf))) return rc;
    }
    return lx_push(x, T_EOF, "", 0, (uint32_t)x->tpl->len);
}

/* ---- step 3: the parser ------------------------------------------------- */
typedef struct {
    const eng__jinja *tpl;
    struct jarena *ar;
    const tok *t;
    size_t i;
    int depth;
    char *err;
    size_t errlen;
    int rc;                /* the first error */
} parser;

static const tok *cur(const parser *p) { return &p->t[p->i]; }
static int is(const parser *p, tkind k) { return p->t[p->i].k == k; }
static int tok_is(const tok *t, const char *name) {
    return t->k == T_NAME && t->n == strlen(name) && !memcmp(t->s, name, t->n);
}
static int is_name(const parser *p, const char *name) { return tok_is(cur(p), name); }
static int is_name2(const parser *p, const char *a, const char *b) {
    return is_name(p, a) && p->t[p->i].k != T_EOF && tok_is(&p->t[p->i + 1], b);
}
/* {% NAME where NAME is one of names (NULL-terminated) */
static int is_stmt(const parser *p, const char *const *names) {
    if (!is(p, T_OPEN_STMT)) return 0;
    for (; *names; names++)
        if (tok_is(&p->t[p->i + 1], *names)) return 1;
    return 0;
}

static void describe(const tok *t, char *o, size_t on) {
    switch (t->k) {
    case T_EOF: snprintf(o, on, "the end of the template"); break;
    case T_TEXT: snprintf(o, on, "text"); break;
    case T_COMMENT: snprintf(o, on, "a comment"); break;
    case T_STR: snprintf(o, on, "a string"); break;
    case T_NAME: snprintf(o, on, "'%.*s'", (int)(t->n > 40 ? 40 : t->n), t->s); break;
    default: snprintf(o, on, "'%.*s'", (int)t->n, t->s); break;
    }
}

__attribute__((format(printf, 2, 3))) static void *perr(parser *p, const char *fmt, ...);

/* Fail at the current token: "template line L:C: <what>", and ", got <token>" after "expected ...". */
static void *perr(parser *p, const char *fmt, ...) {
    if (p->rc) return NULL;
    char what[300], got[80] = "";
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    if (!strncmp(what, "expected", 8)) {
        strcpy(got, ", got ");
        describe(cur(p), got + 6, sizeof got - 6);
    }
    p->rc = fail_at(p->tpl, cur(p)->pos, p->err, p->errlen, "%s%s", what, got);
    return NULL;
}

static int expect(parser *p, tkind k, const char *what) {
    if (!is(p, k)) { perr(p, "expected %s", what); return -1; }
    p->i++;
    return 0;
}

static int expect_name(parser *p, const char *name) {
    if (!is_name(p, name)) { perr(p, "expected '%s'", name); return -1; }
    p->i++;
    return 0;
}

static jn *node(parser *p, jn_kind k, uint32_t pos) {
    jn *n = ar_alloc(p->ar, sizeof *n);
    if (!n) { if (!p->rc) p->rc = eng__fail(p->err, p->errlen, ENG_ENOMEM, "out of memory"); return NULL; }
    n->kind = k;
    n->pos = pos;
    return n;
}

static int push(parser *p, jn_list *l, jn *x) {
    if (!x) return -1;
    if (l->n == 0 || (l->n >= 4 && !(l->n & (l->n - 1)))) { /* grow at 0, 4, 8, 16, ... */
        size_t cap = l->n ? (size_t)l->n * 2 : 4;
        jn **v = ar_alloc(p->ar, cap * sizeof *v);
        if (!v) { if (!p->rc) p->rc = eng__fail(p->err, p->errlen, ENG_ENOMEM, "out of memory"); return -1; }
        if (l->n) memcpy(v, l->v, (size_t)l->n * sizeof *v);
        l->v = v;
    }
    l->v[l->n++] = x;
    return 0;
}

static int deeper(parser *p) {
    if (++p->depth <= ENG__JINJA_MAX_DEPTH) return 0;
    perr(p, "nesting deeper than %d", ENG__JINJA_MAX_DEPTH);
    return -1;
}

static jn *parse_expr(parser *p);
static jn *parse_primary(parser *p);
static jn *parse_or(parser *p);
static int parse_any(parser *p, jn_list *into);

static jn *binary(parser *p, const tok *op, int code, jn *a, jn *b) {
    if (!a || !b) return NULL;
    jn *n = node(p, JN_BINARY, op->pos);
    if (n) { n->op = code; n->a = a; n->b = b; }
    return n;
}

static int op_code(const tok *t) {
    static const struct { const char *s; int op; } OPS[] = {
        {"+", JOP_ADD}, {"-", JOP_SUB}, {"~", JOP_CAT}, {"*", JOP_MUL}, {"/", JOP_DIV}, {"//", JOP_FLOORDIV},
        {"%", JOP_MOD}, {"**", JOP_POW}, {"==", JOP_EQ}, {"!=", JOP_NE}, {"<", JOP_LT}, {">", JOP_GT},
        {"<=", JOP_LE}, {">=", JOP_GE}};
    for (size_t k = 0; k < sizeof OPS / sizeof *OPS; k++)
        if (t->n == strlen(OPS[k].s) && !memcmp(t->s, OPS[k].s, t->n)) return OPS[k].op;
    return 0;
}

/* expr (, expr)* — a tuple when there is a comma; primaries only for a loop target. */
static jn *parse_sequence(parser *p, int primary) {
    uint32_t pos = cur(p)->pos;
    jn *first = primary ? parse_primary(p) : parse_expr(p);
    if (!first || !is(p, T_COMMA)) return first;
    jn *t = node(p, JN_TUPLE, pos);
    if (!t || push(p, &t->l, first)) return NULL;
    while (is(p, T_COMMA)) {
        p->i++;
        if (push(p, &t->l, primary ? parse_primary(p) : parse_expr(p))) return NULL;
    }
    return t;
}

/* ( args ): parameters of a macro / caller, or the arguments of a call. */
static int parse_args(parser *p, jn_list *out, int params) {
    if (expect(p, T_LPAREN, params ? "'(' and the parameters" : "'(' and the arguments")) return -1;
    int saw_kw = 0, saw_spread = 0;
    while (!is(p, T_RPAREN)) {
        const tok *t = cur(p);
        int kwspread = t->k == T_POW, spread = t->k == T_MUL && t->n == 1 && t->s[0] == '*';
        if (params && (kwspread || spread)) { perr(p, "argument unpacking is not allowed in parameters"); return -1; }
        jn *arg;
        if (kwspread || spread) {
            if (spread && saw_spread) { perr(p, "only one '*' argument unpacking is allowed"); return -1; }
            saw_spread |= spread;
            p->i++;
            if (!(arg = node(p, kwspread ? JN_KWSPREAD : JN_SPREAD, t->pos)) || !(arg->a = parse_expr(p))) return -1;
            if (kwspread) {
                if (push(p, out, arg)) return -1;
                if (is(p, T_COMMA)) p->i++;
                if (!is(p, T_RPAREN)) { perr(p, "expected ')': '**' must be the last argument"); return -1; }
                break;
            }
        } else {
            if (!(arg = parse_expr(p))) return -1;
            if (is(p, T_EQUALS)) {
                if (arg->kind != JN_NAME) { perr(p, "a keyword argument needs a name before '='"); return -1; }
                p->i++;
                jn *kw = node(p, JN_KWARG, arg->pos);
                if (!kw || !(kw->a = parse_expr(p))) return -1;
                kw->s = arg->s;
                kw->n = arg->n;
                arg = kw;
            }
            if (params) {
                if (arg->kind != JN_NAME && arg->kind != JN_KWARG) { perr(p, "expected a parameter name"); return -1; }
                for (int k = 0; k < out->n; k++)
                    if (out->v[k]->n == arg->n && !memcmp(out->v[k]->s, arg->s, arg->n)) {
                        perr(p, "duplicate parameter '%.*s'", (int)arg->n, arg->s);
                        return -1;
                    }
            }
            if (arg->kind == JN_KWARG) saw_kw = 1;
            else if (saw_kw) { perr(p, params ? "a parameter without default follows one with a default" : "a positional argument follows a keyword argument"); return -1; }
            else if (saw_spread) { perr(p, "a positional argument follows '*' unpacking"); return -1; }
        }
        if (push(p, out, arg)) return -1;
        if (is(p, T_COMMA)) p->i++;
    }
    p->i++;
    return 0;
}

static jn *parse_call(parser *p, jn *callee);

/* [index] or [start:stop:step] */
static jn *parse_subscript(parser *p) {
    jn *part[4] = {0};
    int n = 0, slice = 0;
    uint32_t pos = cur(p)->pos;
    while (!is(p, T_RBRACKET)) {
        jn *x = NULL;
        if (is(p, T_COLON)) {
            p->i++;
            slice = 1;
        } else {
            if (!(x = parse_expr(p))) return NULL;
            if (is(p, T_COLON)) { p->i++; slice = 1; }
        }
        if (n == 4 || (slice && n == 3)) return perr(p, "a slice has at most 3 parts");
        part[n++] = x;
    }
    if (!n) return perr(p, "expected an index or a slice inside []");
    if (!slice) return part[0];
    jn *s = node(p, JN_SLICE, pos);
    if (s) { s->a = part[0]; s->b = part[1]; s->c = part[2]; }
    return s;
}

static jn *parse_member(parser *p, jn *obj) {
    while (obj && (is(p, T_DOT) || is(p, T_LBRACKET))) {
        int computed = is(p, T_LBRACKET);
        jn *m = node(p, JN_MEMBER, cur(p)->pos);
        p->i++;
        if (!m) return NULL;
        m->a = obj;
        m->op = computed;
        if (computed) {
            if (!(m->b = parse_subscript(p)) || expect(p, T_RBRACKET, "']'")) return NULL;
        } else {
            if (!is(p, T_NAME) && !(is(p, T_NUM) && !memchr(cur(p)->s, '.', cur(p)->n)))
                return perr(p, "expected a name or an integer after '.'");
            if (!(m->b = parse_primary(p))) return NULL;
        }
        obj = m;
    }
    return obj;
}

static jn *parse_call(parser *p, jn *callee) {
    if (deeper(p)) return NULL;
    jn *c = node(p, JN_CALL, cur(p)->pos);
    if (!c || parse_args(p, &c->l, 0)) return NULL;
    c->a = callee;
    jn *r = parse_member(p, c);
    if (r && is(p, T_LPAREN)) r = parse_call(p, r);
    p->depth--;
    return r;
}

static jn *parse_call_member(parser *p) {
    jn *m = parse_member(p, parse_primary(p));
    return m && is(p, T_LPAREN) ? parse_call(p, m) : m;
}

static jn *parse_unary_sign(parser *p) {
    const tok *t = cur(p);
    if ((t->k == T_UNARY || t->k == T_ADD) && t->n == 1 && (t->s[0] == '-' || t->s[0] == '+')) {
        if (deeper(p)) return NULL;
        p->i++;
        jn *u = node(p, JN_UNARY, t->pos);
        if (!u || !(u->a = parse_unary_sign(p))) return NULL;
        u->op = t->s[0] == '-' ? JOP_NEG : JOP_POS;
        p->depth--;
        return u;
    }
    return parse_call_member(p);
}

static jn *parse_filter(parser *p) {
    jn *x = parse_unary_sign(p);
    while (x && is(p, T_PIPE)) {
        jn *f = node(p, JN_FILTER, cur(p)->pos);
        p->i++;
        if (!f) return NULL;
        if (!is(p, T_NAME)) return perr(p, "expected a filter name after '|'");
        jn *name = parse_primary(p);
        f->a = x;
        f->b = name && is(p, T_LPAREN) ? parse_call(p, name) : name;
        if (!f->b) return NULL;
        x = f;
    }
    return x;
}

static jn *parse_test(parser *p) {
    jn *x = parse_filter(p);
    while (x && is_name(p, "is")) {
        jn *t = node(p, JN_TEST, cur(p)->pos);
        p->i++;
        if (!t) return NULL;
        if (is_name(p, "not")) { t->op = 1; p->i++; }
        if (!is(p, T_NAME)) return perr(p, "expected a test name after 'is'");
        t->s = cur(p)->s;
        t->n = cur(p)->n;
        p->i++;
        t->a = x;
        x = t;
    }
    return x;
}

static jn *parse_power(parser *p) {
    jn *x = parse_test(p);
    while (x && is(p, T_POW)) {
        const tok *op = &p->t[p->i++];
        x = binary(p, op, JOP_POW, x, parse_test(p));
    }
    return x;
}

static jn *parse_mul(parser *p) {
    jn *x = parse_power(p);
    while (x && is(p, T_MUL)) {
        const tok *op = &p->t[p->i++];
        x = binary(p, op, op_code(op), x, parse_power(p));
    }
    return x;
}

static jn *parse_add(parser *p) {
    jn *x = parse_mul(p);
    while (x && is(p, T_ADD)) {
        const tok *op = &p->t[p->i++];
        x = binary(p, op, op_code(op), x, parse_mul(p));
    }
    return x;
}

static jn *parse_compare(parser *p) {
    jn *x = parse_add(p);
    while (x) {
        const tok *op = cur(p);
        int code;
        if (is_name2(p, "not", "in")) { code = JOP_NOTIN; p->i += 2; }
        else if (is_name(p, "in")) { code = JOP_IN; p->i++; }
        else if (is(p, T_CMP)) { code = op_code(op); p->i++; }
        else break;
        x = binary(p, op, code, x, parse_add(p));
    }
    return x;
}

/* not x; as in @huggingface/jinja, "not a not b" keeps only the last "not b". */
static jn *parse_not(parser *p) {
    jn *r = NULL;
    while (is_name(p, "not")) {
        if (deeper(p)) return NULL;
        uint32_t pos = cur(p)->pos;
        p->i++;
        jn *arg = parse_not(p);
        p->depth--;
        if (!arg || !(r = node(p, JN_UNARY, pos))) return NULL;
        r->op = JOP_NOT;
        r->a = arg;
    }
    return r ? r : parse_compare(p);
}

static jn *parse_and(parser *p) {
    jn *x = parse_not(p);
    while (x && is_name(p, "and")) {
        const tok *op = &p->t[p->i++];
        x = binary(p, op, JOP_AND, x, parse_not(p));
    }
    return x;
}

static jn *parse_or(parser *p) {
    jn *x = parse_and(p);
    while (x && is_name(p, "or")) {
        const tok *op = &p->t[p->i++];
        x = binary(p, op, JOP_OR, x, parse_and(p));
    }
    return x;
}

/* a if c else b; "a if c" alone is undefined when c is false */
static jn *parse_ternary(parser *p) {
    jn *x = parse_or(p);
    if (!x || !is_name(p, "if")) return x;
    jn *t = node(p, JN_SELECT, cur(p)->pos);
    p->i++;
    if (!t || !(t->b = parse_or(p))) return NULL;
    t->a = x;
    if (!is_name(p, "else")) return t;
    p->i++;
    t->kind = JN_TERNARY;
    t->c = parse_expr(p); /* a chain of else-ifs, each one level deeper */
    jn *cond = t->b;
    t->b = t->a;
    t->a = cond;
    return t->c ? t : NULL;
}

static jn *parse_expr(parser *p) {
    if (deeper(p)) return NULL;
    jn *x = parse_ternary(p);
    p->depth--;
    return x;
}

/* Adjacent string literals are one string. */
static jn *parse_string(parser *p) {
    jn *s = node(p, JN_STR, cur(p)->pos);
    if (!s) return NULL;
    size_t total = 0;
    for (size_t k = p->i; p->t[k].k == T_STR; k++) total += p->t[k].n;
    char *buf = ar_alloc(p->ar, total + 1);
    if (!buf) return perr(p, "out of memory");
    for (; is(p, T_STR); p->i++) {
        memcpy(buf + s->n, cur(p)->s, cur(p)->n);
        s->n += cur(p)->n;
    }
    s->s = buf;
    return s;
}

static jn *parse_list_literal(parser *p, uint32_t pos) {
    jn *l = node(p, JN_LIST, pos);
    while (l && !is(p, T_RBRACKET)) {
        if (push(p, &l->l, parse_expr(p))) return NULL;
        if (is(p, T_COMMA)) p->i++;
    }
    p->i++;
    return l;
}

static jn *parse_dict_literal(parser *p, uint32_t pos) {
    jn *d = node(p, JN_DICT, pos);
    while (d && !is(p, T_RBRACE)) {
        if (push(p, &d->l, parse_expr(p)) || expect(p, T_COLON, "':' between a key and its value") ||
            push(p, &d->l2, parse_expr(p)))
            return NULL;
        if (is(p, T_COMMA)) p->i++;
    }
    p->i++;
    return d;
}

static jn *parse_primary(parser *p) {
    const tok *t = cur(p);
    switch (t->k) {
    case T_NUM: {
        jn *n = node(p, memchr(t->s, '.', t->n) ? JN_FLOAT : JN_INT, t->pos);
        char *digits = n ? ar_alloc(p->ar, t->n + 1) : NULL; /* strtod must not read past the token */
        if (!digits) return n ? perr(p, "out of memory") : NULL;
        memcpy(digits, t->s, t->n);
        n->num = strtod(digits, NULL);
        p->i++;
        return n;
    }
    case T_STR: return parse_string(p);
    case T_NAME: {
        jn *n = node(p, JN_NAME, t->pos);
        if (n) { n->s = t->s; n->n = t->n; }
        p->i++;
        return n;
    }
    case T_LPAREN: {
        p->i++;
        jn *x = parse_sequence(p, 0);
        return x && !expect(p, T_RPAREN, "')'") ? x : NULL;
    }
    case T_LBRACKET: p->i++; return parse_list_literal(p, t->pos);
    case T_LBRACE: p->i++; return parse_dict_literal(p, t->pos);
    default: return perr(p, "expected a value");
    }
}

static const char *const BLOCK_ENDS[] = {"endif", "elif", "else", "endfor", "endset", "endmacro", "endcall",
                                          "endfilter", NULL};

/* Statements until {% one-of-ends %}. The end of the template, or another
 * block's end, there means this block is not closed: said at its opening. */
static int parse_body(parser *p, jn_list *into, const char *const *ends, const tok *opener) {
    while (!is_stmt(p, ends)) {
        if (is(p, T_EOF) || is_stmt(p, BLOCK_ENDS)) {
            if (p->rc) return -1;
            int line, col;
            eng__jinja_where(p->tpl, opener->pos, &line, &col);
            if (is(p, T_EOF))
                perr(p, "{%% %.*s %%} (line %d:%d) is never closed with {%% %s %%}", (int)opener->n, opener->s, line, col, ends[0]);
            else
                perr(p, "expected {%% %s %%} to close the {%% %.*s %%} of line %d:%d, not {%% %.*s %%}", ends[0], (int)opener->n,
                     opener->s, line, col, (int)p->t[p->i + 1].n, p->t[p->i + 1].s);
            return -1;
        }
        if (parse_any(p, into)) return -1;
    }
    return 0;
}

/* {% NAME %} that closes a block */
static int parse_end(parser *p, const char *name) {
    return expect(p, T_OPEN_STMT, "'{%'") || expect_name(p, name) || expect(p, T_CLOSE_STMT, "'%}'") ? -1 : 0;
}

static const char *const END_IF[] = {"endif", "elif", "else", NULL}, *const END_ONLY_IF[] = {"endif", NULL},
                  *const END_FOR[] = {"endfor", "else", NULL}, *const END_ONLY_FOR[] = {"endfor", NULL},
                  *const END_SET[] = {"endset", NULL}, *const END_MACRO[] = {"endmacro", NULL},
                  *const END_CALL[] = {"endcall", NULL}, *const END_FILTER[] = {"endfilter", NULL};

/* after "if" / "elif": test %} body, then elif (nested) or else; not the endif */
static jn *parse_if(parser *p, const tok *kw) {
    jn *n = node(p, JN_IF, kw->pos);
    if (!n || !(n->a = parse_expr(p)) || expect(p, T_CLOSE_STMT, "'%}' after the condition") ||
        parse_body(p, &n->l, END_IF, kw))
        return NULL;
    if (is_stmt(p, (const char *const[]){"elif", NULL})) {
        const tok *elif = &p->t[p->i + 1];
        p->i += 2;
        if (push(p, &n->l2, parse_if(p, elif))) return NULL;
    } else if (is_stmt(p, (const char *const[]){"else", NULL})) {
        p->i += 2;
        if (expect(p, T_CLOSE_STMT, "'%}' after else") || parse_body(p, &n->l2, END_ONLY_IF, kw)) return NULL;
    }
    return n;
}

static jn *parse_for(parser *p, const tok *kw) {
    jn *n = node(p, JN_FOR, kw->pos);
    if (!n || !(n->a = parse_sequence(p, 1))) return NULL;
    if (n->a->kind != JN_NAME && n->a->kind != JN_TUPLE) {
        p->rc = fail_at(p->tpl, n->a->pos, p->err, p->errlen, "a loop's target must be a name or names");
        return NULL;
    }
    if (expect_name(p, "in") || !(n->b = parse_expr(p)) || expect(p, T_CLOSE_STMT, "'%}'") ||
        parse_body(p, &n->l, END_FOR, kw))
        return NULL;
    if (is_stmt(p, (const char *const[]){"else", NULL})) {
        p->i += 2;
        if (expect(p, T_CLOSE_STMT, "'%}' after else") || parse_body(p, &n->l2, END_ONLY_FOR, kw)) return NULL;
    }
    return parse_end(p, "endfor") ? NULL : n;
}

static jn *parse_set(parser *p, const tok *kw) {
    jn *n = node(p, JN_SET, kw->pos);
    if (!n || !(n->a = parse_sequence(p, 0))) return NULL;
    if (is(p, T_EQUALS)) {
        p->i++;
        if (!(n->b = parse_sequence(p, 0))) return NULL;
    } else if (expect(p, T_CLOSE_STMT, "'=' or '%}'") || parse_body(p, &n->l, END_SET, kw) ||
               expect(p, T_OPEN_STMT, "'{%'") || expect_name(p, "endset")) {
        return NULL;
    }
    return expect(p, T_CLOSE_STMT, "'%}'") ? NULL : n;
}

/* Does anything under n read the name kwargs / varargs (set and loop targets aside)? */
static int uses_special(const jn *n) {
    if (!n) return 0;
    int u = 0;
    if (n->kind == JN_NAME) {
        if (n->n == 6 && !memcmp(n->s, "kwargs", 6)) u |= JN_USES_KWARGS;
        if (n->n == 7 && !memcmp(n->s, "varargs", 7)) u |= JN_USES_VARARGS;
        return u;
    }
    if (n->kind == JN_MACRO || n->kind == JN_CALLBLOCK) { /* parameters declare names; only defaults read */
        const jn_list *params = &n->l;
        for (int k = 0; k < params->n; k++) u |= uses_special(params->v[k]->kind == JN_KWARG ? params->v[k]->a : NULL);
        for (int k = 0; k < n->l2.n; k++) u |= uses_special(n->l2.v[k]);
        return u | uses_special(n->a);
    }
    int skip_a = n->kind == JN_SET || n->kind == JN_FOR;          /* targets */
    int skip_b = (n->kind == JN_MEMBER && !n->op) || n->kind == JN_FILTER || n->kind == JN_FILTERBLOCK; /* names */
    if (!skip_a) u |= uses_special(n->a);
    if (!skip_b) u |= uses_special(n->b);
    else if (n->b && n->b->kind == JN_CALL) { /* a filter's arguments */
        for (int k = 0; k < n->b->l.n; k++) u |= uses_special(n->b->l.v[k]);
    }
    u |= uses_special(n->c);
    for (int k = 0; k < n->l.n; k++) u |= uses_special(n->l.v[k]);
    for (int k = 0; k < n->l2.n; k++) u |= uses_special(n->l2.v[k]);
    return u;
}

/* kwargs / varargs read by a body and not declared as parameters */
static int special_args(const jn_list *params, const jn_list *body) {
    int u = 0;
    for (int k = 0; k < body->n; k++) u |= uses_special(body->v[k]);
    for (int k = 0; k < params->n; k++) {
        const jn *a = params->v[k];
        if (a->n == 6 && !memcmp(a->s, "kwargs", 6)) u &= ~JN_USES_KWARGS;
        if (a->n == 7 && !memcmp(a->s, "varargs", 7)) u &= ~JN_USES_VARARGS;
    }
    return u;
}

static jn *parse_macro(parser *p, const tok *kw) {
    jn *n = node(p, JN_MACRO, kw->pos);
    if (!n) return NULL;
    if (!is(p, T_NAME)) return perr(p, "expected the macro's name");
    n->s = cur(p)->s;
    n->n = cur(p)->n;
    p->i++;
    if (parse_args(p, &n->l, 1) || expect(p, T_CLOSE_STMT, "'%}'") || parse_body(p, &n->l2, END_MACRO, kw) ||
        parse_end(p, "endmacro"))
        return NULL;
    n->op = special_args(&n->l, &n->l2);
    return n;
}

/* {% call(params) macro(args) %} body {% endcall %}: the body is caller() */
static jn *parse_callblock(parser *p, const tok *kw) {
    jn *n = node(p, JN_CALLBLOCK, kw->pos);
    if (!n || (is(p, T_LPAREN) && parse_args(p, &n->l, 1))) return NULL;
    if (!is(p, T_NAME)) return perr(p, "expected the name of the macro to call");
    jn *callee = parse_primary(p);
    if (!callee || !(n->a = node(p, JN_CALL, cur(p)->pos)) || parse_args(p, &n->a->l, 0)) return NULL;
    n->a->a = callee;
    if (expect(p, T_CLOSE_STMT, "'%}'") || parse_body(p, &n->l2, END_CALL, kw) || parse_end(p, "endcall")) return NULL;
    n->op = special_args(&n->l, &n->l2);
    return n;
}

static jn *parse_filterblock(parser *p, const tok *kw) {
    jn *n = node(p, JN_FILTERBLOCK, kw->pos);
    if (!n) return NULL;
    if (!is(p, T_NAME)) return perr(p, "expected a filter name");
    n->b = parse_primary(p);
    if (n->b && is(p, T_LPAREN)) n->b = parse_call(p, n->b);
    if (!n->b || expect(p, T_CLOSE_STMT, "'%}'") || parse_body(p, &n->l, END_FILTER, kw) || parse_end(p, "endfilter"))
        return NULL;
    return n;
}

static jn *parse_statement(parser *p) {
    p->i++; /* {% */
    if (!is(p, T_NAME)) return perr(p, "expected a statement name after '{%%'");
    const tok *kw = cur(p);
    p->i++;
    if (tok_is(kw, "set")) return parse_set(p, kw);
    if (tok_is(kw, "if")) { jn *n = parse_if(p, kw); return n && !parse_end(p, "endif") ? n : NULL; }
    if (tok_is(kw, "for")) return parse_for(p, kw);
    if (tok_is(kw, "macro")) return parse_macro(p, kw);
    if (tok_is(kw, "call")) return parse_callblock(p, kw);
    if (tok_is(kw, "filter")) return parse_filterblock(p, kw);
    if (tok_is(kw, "break") || tok_is(kw, "continue")) {
        jn *n = node(p, tok_is(kw, "break") ? JN_BREAK : JN_CONTINUE, kw->pos);
        return n && !expect(p, T_CLOSE_STMT, "'%}'") ? n : NULL;
    }
    p->i--;
    return perr(p, "unknown statement '%.*s' (set, if, for, macro, call, filter, break, continue)", (int)kw->n, kw->s);
}

static int parse_any(parser *p, jn_list *into) {
    if (deeper(p)) return -1;
    const tok *t = cur(p);
    int rc = 0;
    if (t->k == T_COMMENT) {
        p->i++;
    } else if (t->k == T_TEXT) {
        jn *n = node(p, JN_TEXT, t->pos);
        if (n) { n->s = t->s; n->n = t->n; }
        p->i++;
        rc = push(p, into, n);
    } else if (t->k == T_OPEN_STMT) {
        rc = push(p, into, parse_statement(p));
    } else if (t->k == T_OPEN_EXPR) {
        p->i++;
        jn *x = parse_expr(p);
        rc = push(p, into, x && !expect(p, T_CLOSE_EXPR, "'}}'") ? x : NULL);
    } else {
        perr(p, "expected text, '{{' or '{%%'");
        rc = -1;
    }
    p->depth--;
    return rc;
}

/* ---- the API ------------------------------------------------------------ */
static int check_source(const char *src, size_t len, char *err, size_t errlen) {
    if (len > ENG__JINJA_MAX_SOURCE)
        return eng__fail(err, errlen, ENG_EUNSUPPORTED, "template of %zu bytes is bigger than the %d MiB supported", len,
                         ENG__JINJA_MAX_SOURCE >> 20);
    for (size_t i = 0; i < len;) {
        int k = eng__utf8_seq((const unsigned char *)src + i, len - i);
        if (k <= 0) return eng__fail(err, errlen, ENG_EUTF8, "template is not valid UTF-8 (byte %zu)", i);
        i += (size_t)k;
    }
    return ENG_OK;
}

static int tokenize(eng__jinja *t, tok **toks, char *err, size_t errlen) {
    pbuf pre = {0};
    int rc = preprocess(t->src, t->len, &pre);
    char *text = NULL, *strbuf = NULL;
    if (!rc && (!(text = ar_alloc(t->arena, pre.n + 1)) || !(strbuf = ar_alloc(t->arena, pre.n + 1)))) rc = ENG_ENOMEM;
    lexer x = {.tpl = t, .s = text, .at = pre.at, .n = pre.n, .err = err, .errlen = errlen};
    if (!rc) {
        if (pre.n) memcpy(text, pre.p, pre.n);
        rc = lex(&x, strbuf);
    }
    if (rc == ENG_ENOMEM) eng__fail(err, errlen, rc, "out of memory");
    pb_free(&pre);
    if (rc) { free(x.t); return rc; }
    *toks = x.t;
    return ENG_OK;
}

int eng__jinja_parse(const char *src, size_t len, eng__jinja **out, char *err, size_t errlen) {
    *out = NULL;
    int rc = check_source(src, len, err, errlen);
    if (rc) return rc;
    eng__jinja *t = calloc(1, sizeof *t);
    if (!t || !(t->arena = calloc(1, sizeof *t->arena)) || !(t->src = malloc(len + 1))) {
        eng__jinja_free(t);
        return eng__fail(err, errlen, ENG_ENOMEM, "out of memory");
    }
    if (len) memcpy(t->src, src, len);
    t->src[len] = 0;
    t->len = len;
    tok *toks = NULL;
    if ((rc = tokenize(t, &toks, err, errlen))) { eng__jinja_free(t); return rc; }
    parser p = {.tpl = t, .ar = t->arena, .t = toks, .err = err, .errlen = errlen};
    while (!p.rc && !is(&p, T_EOF))
        if (parse_any(&p, &t->body) && !p.rc) p.rc = ENG_EFORMAT;
    free(toks);
    if (p.rc) { eng__jinja_free(t); return p.rc; }
    *out = t;
    return ENG_OK;
}

void eng__jinja_free(eng__jinja *t) {
    if (!t) return;
    ar_free(t->arena);
    free(t->src);
    free(t);
}
