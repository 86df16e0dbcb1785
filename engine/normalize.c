/* normalize.c — Hugging Face tokenizer normalizers: NFC, NFD, NFKC, NFKD
 * (through utf8proc), Replace (a literal or a PCRE2 regex, replaced by a
 * literal), Prepend, Lowercase, Strip, and Sequence of them.
 *
 * A normalizer turns the text between added tokens into the text the
 * pre-tokenizer and the model see; tokenizer.c applies it span by span, as
 * tokenizers' AddedVocabulary does. Loaded once, read-only afterwards. */
#define PCRE2_CODE_UNIT_WIDTH 8
#include "internal.h"

#include <cjson/cJSON.h>
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

enum norm_kind { N_NFC, N_NFD, N_NFKC, N_NFKD, N_REPLACE, N_PREPEND, N_LOWER, N_STRIP };

typedef struct {
    enum norm_kind kind;
    pcre2_code *re;          /* Replace with a Regex pattern */
    char *lit;               /* Replace with a String pattern; Prepend's string */
    size_t lit_len;
    char *content;           /* Replace's replacement */
    size_t content_len;
    int left, right;         /* Strip */
} norm_step;

struct eng__norm {
    norm_step *s;
    int n;
};

static int add(eng__norm *z, const cJSON *j, const char *path, char *err, size_t errlen) {
    const cJSON *ty = cJSON_GetObjectItemCaseSensitive(j, "type");
    if (!cJSON_IsString(ty)) return eng__fail(err, errlen, ENG_EFORMAT, "%s: normalizer without a type", path);
    const char *t = ty->valuestring;
    if (!strcmp(t, "Sequence")) {
        const cJSON *it;
        cJSON_ArrayForEach(it, cJSON_GetObjectItemCaseSensitive(j, "normalizers")) {
            int rc = add(z, it, path, err, errlen);
            if (rc) return rc;
        }
        return ENG_OK;
    }
    norm_step st;
    memset(&st, 0, sizeof st);
    if (!strcmp(t, "NFC")) st.kind = N_NFC;
    else if (!strcmp(t, "NFD")) st.kind = N_NFD;
    else if (!strcmp(t, "NFKC")) st.kind = N_NFKC;
    else if (!strcmp(t, "NFKD")) st.kind = N_NFKD;
    else if (!strcmp(t, "Lowercase")) st.kind = N_LOWER;
    else if (!strcmp(t, "Strip")) {
        st.kind = N_STRIP;
        const cJSON *l = cJSON_GetObjectItemCaseSensitive(j, "strip_left"), *r = cJSON_GetObjectItemCaseSensitive(j, "strip_right");
        st.left = !l || cJSON_IsTrue(l);
        st.right = !r || cJSON_IsTrue(r);
    } else if (!strcmp(t, "Prepend")) {
        const cJSON *p = cJSON_GetObjectItemCaseSensitive(j, "prepend");
        if (!cJSON_IsString(p)) return eng__fail(err, errlen, ENG_EFORMAT, "%s: Prepend normalizer without a string", path);
        st.kind = N_PREPEND;
        st.lit_len = strlen(p->valuestring);
        if (!(st.lit = strdup(p->valuestring))) return ENG_ENOMEM;
    } else if (!strcmp(t, "Replace")) {
        const cJSON *pat = cJSON_GetObjectItemCaseSensitive(j, "pattern");
        const cJSON *rx = cJSON_GetObjectItemCaseSensitive(pat, "Regex"), *s = cJSON_GetObjectItemCaseSensitive(pat, "String");
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(j, "content");
        if (!cJSON_IsString(c) || !(cJSON_IsString(rx) || cJSON_IsString(s)))
            return eng__fail(err, errlen, ENG_EFORMAT, "%s: Replace normalizer needs a String or Regex pattern and content",
                             path);
        st.kind = N_REPLACE;
        st.content_len = strlen(c->valuestring);
        if (!(st.content = strdup(c->valuestring))) return ENG_ENOMEM;
        if (cJSON_IsString(rx)) {
            char why[320];
            if (!(st.re = eng__re_compile(rx->valuestring, strlen(rx->valuestring), why, sizeof why))) {
                free(st.content);
                return eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: Replace normalizer regex %s", path, why);
            }
        } else {
            st.lit_len = strlen(s->valuestring);
            if (!st.lit_len) { free(st.content); return ENG_OK; } /* replaces nothing */
            if (!(st.lit = strdup(s->valuestring))) { free(st.content); return ENG_ENOMEM; }
        }
    } else {
        return eng__fail(err, errlen, ENG_EUNSUPPORTED,
                         "%s: normalizer %s is not supported (NFC, NFD, NFKC, NFKD, Replace, Prepend, Lowercase, Strip, "
                         "Sequence)", path, t);
    }
    norm_step *ns = realloc(z->s, (size_t)(z->n + 1) * sizeof *ns);
    if (!ns) { free(st.lit); free(st.content); pcre2_code_free(st.re); return ENG_ENOMEM; }
    z->s = ns;
    z->s[z->n++] = st;
    return ENG_OK;
}

int eng__norm_open(eng__norm **out, const struct cJSON *j, const char *path, char *err, size_t errlen) {
    *out = NULL;
    if (!j || cJSON_IsNull(j)) return ENG_OK;
    eng__norm *z = calloc(1, sizeof *z);
    if (!z) return ENG_ENOMEM;
    int rc = add(z, j, path, err, errlen);
    if (rc || !z->n) {
        eng__norm_free(z);
        return rc;
    }
    *out = z;
    return ENG_OK;
}

void eng__norm_free(eng__norm *z) {
    if (!z) return;
    for (int i = 0; i < z->n; i++) {
        free(z->s[i].lit);
        free(z->s[i].content);
        pcre2_code_free(z->s[i].re);
    }
    free(z->s);
    free(z);
}

/* Rust's char::is_whitespace (the White_Space property). */
static int white(utf8proc_int32_t c) {
    return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) ||
           c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

static int unicode_form(const norm_step *st, const char *s, size_t n, eng__buf *o) {
    static const utf8proc_option_t opts[] = {UTF8PROC_COMPOSE, UTF8PROC_DECOMPOSE, UTF8PROC_COMPOSE | UTF8PROC_COMPAT,
                                             UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT};
    utf8proc_uint8_t *r = NULL;
    utf8proc_ssize_t k = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)n, &r,
                                      opts[st->kind] | UTF8PROC_STABLE);
    if (k < 0) return k == UTF8PROC_ERROR_NOMEM ? ENG_ENOMEM : ENG_EUTF8;
    int rc = eng__buf_add(o, (const char *)r, (size_t)k);
    free(r);
    return rc;
}

static int lower(const char *s, size_t n, eng__buf *o) {
    for (size_t i = 0; i < n;) {
        utf8proc_int32_t c;
        utf8proc_ssize_t k = utf8proc_iterate((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(n - i), &c);
        if (k <= 0) return ENG_EUTF8;
        i += (size_t)k;
        utf8proc_uint8_t u[8];
        int rc;
        if (c == 0x130) rc = eng__buf_add(o, "i\xCC\x87", 3); /* the one full lowercase mapping of two characters */
        else rc = eng__buf_add(o, (const char *)u, (size_t)utf8proc_encode_char(utf8proc_tolower(c), u));
        if (rc) return rc;
    }
    return ENG_OK;
}

static int strip(const norm_step *st, const char *s, size_t n, eng__buf *o) {
    size_t b = 0, e = n;
    while (st->left && b < e) {
        utf8proc_int32_t c;
        utf8proc_ssize_t k = utf8proc_iterate((const utf8proc_uint8_t *)s + b, (utf8proc_ssize_t)(e - b), &c);
        if (k <= 0 || !white(c)) break;
        b += (size_t)k;
    }
    while (st->right && e > b) {
        size_t p = e - 1;
        while (p > b && ((unsigned char)s[p] & 0xC0) == 0x80) p--;
        utf8proc_int32_t c;
        if (utf8proc_iterate((const utf8proc_uint8_t *)s + p, (utf8proc_ssize_t)(e - p), &c) <= 0 || !white(c)) break;
        e = p;
    }
    return eng__buf_add(o, s + b, e - b);
}

static int replace(const norm_step *st, const char *s, size_t n, eng__buf *o, pcre2_match_data *md) {
    size_t last = 0, at = 0;
    int rc;
    for (;;) {
        size_t ms, me;
        if (st->re) {
            int r = pcre2_match(st->re, (PCRE2_SPTR)s, n, at, PCRE2_NO_UTF_CHECK, md, NULL);
            if (r < 0) break;
            PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
            ms = ov[0];
            me = ov[1];
            if (me == ms) { /* an empty match replaces nothing: step over one character */
                if (ms >= n) break;
                at = ms + 1;
                while (at < n && ((unsigned char)s[at] & 0xC0) == 0x80) at++;
                continue;
            }
        } else {
            const char *f = NULL;
            for (size_t i = at; i + st->lit_len <= n; i++)
                if (!memcmp(s + i, st->lit, st->lit_len)) { f = s + i; break; }
            if (!f) break;
            ms = (size_t)(f - s);
            me = ms + st->lit_len;
        }
        if ((rc = eng__buf_add(o, s + last, ms - last)) || (rc = eng__buf_add(o, st->content, st->content_len))) return rc;
        last = at = me;
    }
    return eng__buf_add(o, s + last, n - last);
}

int eng__norm_apply(const eng__norm *z, const char *s, size_t n, char **out, size_t *out_len) {
    eng__buf a = {0}, b = {0};
    int rc = eng__buf_add(&a, s, n);
    pcre2_match_data *md = pcre2_match_data_create(4, NULL);
    if (!md) rc = ENG_ENOMEM;
    for (int i = 0; !rc && i < z->n; i++) {
        const norm_step *st = &z->s[i];
        b.n = 0;
        switch (st->kind) {
        case N_NFC: case N_NFD: case N_NFKC: case N_NFKD: rc = unicode_form(st, a.p, a.n, &b); break;
        case N_LOWER: rc = lower(a.p, a.n, &b); break;
        case N_STRIP: rc = strip(st, a.p, a.n, &b); break;
        case N_REPLACE: rc = replace(st, a.p, a.n, &b, md); break;
        case N_PREPEND: /* only before something */
            rc = eng__buf_add(&b, st->lit, a.n ? st->lit_len : 0);
            if (!rc) rc = eng__buf_add(&b, a.p, a.n);
            break;
        }
        eng__buf t = a;
        a = b;
        b = t;
    }
    pcre2_match_data_free(md);
    free(b.p);
    if (rc) { free(a.p); return rc; }
    *out = a.p;
    *out_len = a.n;
    return ENG_OK;
}
