/* tokenizer.c — BPE from a Hugging Face tokenizer.json: byte-level (GPT-2
 * style: Llama 3, Qwen, SmolLM) and SentencePiece-style (characters with
 * byte fallback: Llama 2, Mistral, Gemma).
 *
 * Encode follows the Hugging Face pipeline step by step:
 *   1. split the text on added tokens (leftmost-longest match, a byte trie);
 *   2. normalize each remaining span (normalize.c: NFC, Replace, Prepend, ...);
 *   3. pre-tokenize it: the configured Split / Digits / ByteLevel / Metaspace
 *      steps, regexes through PCRE2 (UTF + Unicode properties);
 *   4. run BPE on each piece: byte-level pieces start from the GPT-2 byte
 *      alphabet, others from their characters (a character not in the vocab
 *      becomes its <0xXX> byte tokens with byte_fallback, else the unknown
 *      token, fused with its neighbours with fuse_unk); then merge the
 *      adjacent pair of lowest rank (leftmost on ties) until none is left,
 *      exactly as tokenizers' Word::merge_all does (a heap with lazy deletion);
 *   5. the post-processor's BOS when asked.
 * Decoding maps each token to its bytes once, at open: the ByteLevel
 * decoder's byte alphabet, or the Replace / ByteFallback / Fuse / Strip /
 * Metaspace decoders' rules. Unigram, WordPiece and WordLevel models, and the
 * normalizers, pre-tokenizers and decoders not named here, are refused at
 * open with a message naming them. */
#define PCRE2_CODE_UNIT_WIDTH 8
#include "internal.h"

#include <cjson/cJSON.h>
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The GPT-2 split pattern used by ByteLevel(use_regex = true). */
static const char GPT2_PATTERN[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

enum step_kind { STEP_SPLIT, STEP_BYTELEVEL, STEP_METASPACE };
enum merge_with { MW_NONE, MW_PREVIOUS, MW_NEXT }; /* Split's MergedWithPrevious / MergedWithNext */
enum prepend_scheme { PREPEND_ALWAYS, PREPEND_FIRST, PREPEND_NEVER };
typedef struct {
    enum step_kind kind;
    pcre2_code *re;      /* NULL: no split */
    int keep_match;      /* matches become pieces */
    int keep_gap;        /* the text between matches becomes pieces */
    enum merge_with merge; /* or: each match joins the piece before / after it */
    int add_prefix_space;
    char repl[8];        /* Metaspace: the replacement of ' ' (UTF-8) */
    size_t repl_len;
    enum prepend_scheme prepend; /* Metaspace */
} pre_step;

typedef struct {            /* a byte trie of the added tokens' contents */
    uint64_t *key;          /* (node << 8 | byte) + 1; 0 = empty slot */
    int32_t *child;
    size_t cap;
    int32_t *term;          /* [node]: the added token ending here, -1 */
    int32_t n_nodes, cap_nodes;
} trie;

typedef struct {
    char *content;
    size_t len;
    int32_t id;
    int special, lstrip, rstrip, single_word;
} added_tok;

typedef struct {            /* merge table entry: (a, b) -> rank, result */
    uint64_t key;           /* (a << 32 | b) + 1; 0 = empty slot */
    int32_t rank, id;
} merge_ent;

struct eng_tok {
    int n_ids;              /* 1 + highest id */
    char **str;             /* token string as in the vocab (byte-level chars) */
    uint32_t *str_len;
    char **bytes;           /* decoded bytes of each token */
    uint32_t *bytes_len;
    uint8_t *special;
    eng__strmap vocab;
    merge_ent *merges;
    size_t merge_cap;
    int ignore_merges;
    pre_step *steps;
    int n_steps;
    added_tok *added;
    int n_added;
    trie at;                /* the added tokens, for leftmost-longest matching */
    eng__norm *norm;        /* NULL: none */
    int byte_level;         /* a ByteLevel pre-tokenizer: pieces are bytes of the GPT-2 alphabet */
    int32_t byte_id[256];   /* byte-level: id of the single-byte token for each byte, -1 if none */
    int byte_fallback, fuse_unk;
    int32_t unk;            /* the model's unk_token, -1 if none */
    int32_t fallback_id[256]; /* byte_fallback: id of "<0xXX>" for each byte, -1 if none */
    int strip_start;        /* the Strip decoder strips this many leading spaces of the text */
    char meta[8];           /* the Metaspace decoder's replacement when it prepends: then in the first token */
    size_t meta_len;        /* of a text every replacement is dropped (not turned into a space) */
    char **first_bytes;     /* [id]: bytes of the token as the text's first, NULL: as bytes[id] */
    uint32_t *first_len;
    int bos;
};

/* ---- GPT-2 byte <-> unicode map ---------------------------------------- */
static void byte_map(unsigned cp[256]) {
    int n = 0;
    for (int b = 0; b < 256; b++) {
        if ((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF)) cp[b] = (unsigned)b;
        else cp[b] = 256u + (unsigned)n++;
    }
}

static int utf8_put(char *out, unsigned cp) {
    if (cp < 0x80) { out[0] = (char)cp; return 1; }
    if (cp < 0x800) { out[0] = (char)(0xC0 | cp >> 6); out[1] = (char)(0x80 | (cp & 0x3F)); return 2; }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | cp >> 12); out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | cp >> 18); out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Decode one code point; s must be valid UTF-8. */
static unsigned utf8_get(const unsigned char *s, int *len) {
    if (s[0] < 0x80) { *len = 1; return s[0]; }
    if (s[0] < 0xE0) { *len = 2; return (unsigned)(s[0] & 0x1F) << 6 | (s[1] & 0x3F); }
    if (s[0] < 0xF0) { *len = 3; return (unsigned)(s[0] & 0x0F) << 12 | (unsigned)(s[1] & 0x3F) << 6 | (s[2] & 0x3F); }
    *len = 4;
    return (unsigned)(s[0] & 0x07) << 18 | (unsigned)(s[1] & 0x3F) << 12 | (unsigned)(s[2] & 0x3F) << 6 | (s[3] & 0x3F);
}

/* ---- merge table ------------------------------------------------------- */
static uint64_t mix64(uint64_t x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdull; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ull; x ^= x >> 33;
    return x;
}

static const merge_ent *merge_get(const eng_tok *t, int32_t a, int32_t b) {
    uint64_t key = ((uint64_t)(uint32_t)a << 32 | (uint32_t)b) + 1;
    size_t mask = t->merge_cap - 1, i = mix64(key) & mask;
    while (t->merges[i].key) {
        if (t->merges[i].key == key) return &t->merges[i];
        i = (i + 1) & mask;
    }
    return NULL;
}

/* Insert unless present (the first rank of a duplicated merge wins, as in HF). */
static void merge_put(eng_tok *t, int32_t a, int32_t b, int32_t rank, int32_t id) {
    uint64_t key = ((uint64_t)(uint32_t)a << 32 | (uint32_t)b) + 1;
    size_t mask = t->merge_cap - 1, i = mix64(key) & mask;
    while (t->merges[i].key) {
        if (t->merges[i].key == key) return;
        i = (i + 1) & mask;
    }
    t->merges[i] = (merge_ent){key, rank, id};
}

/* ---- the added tokens' trie ---------------------------------------------- */
static int32_t trie_child(const trie *r, int32_t node, unsigned char c) {
    uint64_t key = ((uint64_t)node << 8 | c) + 1;
    for (size_t i = mix64(key) & (r->cap - 1); r->key[i]; i = (i + 1) & (r->cap - 1))
        if (r->key[i] == key) return r->child[i];
    return -1;
}

static int trie_add(trie *r, const char *s, size_t n, int32_t index) {
    int32_t node = 0;
    for (size_t k = 0; k < n; k++) {
        int32_t c = trie_child(r, node, (unsigned char)s[k]);
        if (c < 0) {
            if (r->n_nodes == r->cap_nodes) return ENG_ENOMEM; /* sized at build */
            c = r->n_nodes++;
            r->term[c] = -1;
            uint64_t key = ((uint64_t)node << 8 | (unsigned char)s[k]) + 1;
            size_t i = mix64(key) & (r->cap - 1);
            while (r->key[i]) i = (i + 1) & (r->cap - 1);
            r->key[i] = key;
            r->child[i] = c;
        }
        node = c;
    }
    if (r->term[node] < 0) r->term[node] = index; /* the first of duplicates wins */
    return ENG_OK;
}

static int trie_build(eng_tok *t) {
    trie *r = &t->at;
    size_t total = 1;
    for (int k = 0; k < t->n_added; k++) total += t->added[k].len;
    r->cap = 16;
    while (r->cap < total * 2) r->cap <<= 1;
    r->cap_nodes = (int32_t)total;
    r->key = calloc(r->cap, sizeof *r->key);
    r->child = malloc(r->cap * sizeof *r->child);
    r->term = malloc(total * sizeof *r->term);
    if (!r->key || !r->child || !r->term) return ENG_ENOMEM;
    r->n_nodes = 1;
    r->term[0] = -1;
    for (int k = 0; k < t->n_added; k++) {
        int rc = trie_add(r, t->added[k].content, t->added[k].len, k);
        if (rc) return rc;
    }
    return ENG_OK;
}

/* ---- loading ----------------------------------------------------------- */
/* Compile a tokenizer.json regex (Rust regex syntax) with PCRE2 (UTF, Unicode
 * properties). Rust's \s is the White_Space property; PCRE2's also matches
 * U+180E, so \s and \S are spelled as the property. NULL with a message on
 * failure. */
pcre2_code *eng__re_compile(const char *pat, size_t len, char *msg, size_t msglen) {
    if (len == PCRE2_ZERO_TERMINATED) len = strlen(pat);
    char *p = malloc(len * 8 + 1), *o = p;
    if (!p) { snprintf(msg, msglen, "out of memory"); return NULL; }
    for (size_t i = 0; i < len; i++) {
        if (pat[i] == '\\' && i + 1 < len && (pat[i + 1] == 's' || pat[i + 1] == 'S')) {
            o += sprintf(o, "\\%c{White_Space}", pat[i + 1] == 's' ? 'p' : 'P');
            i++;
        } else if (pat[i] == '\\' && i + 1 < len) {
            *o++ = pat[i++];
            *o++ = pat[i];
        } else {
            *o++ = pat[i];
        }
    }
    int ec;
    PCRE2_SIZE off;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)p, (size_t)(o - p), PCRE2_UTF | PCRE2_UCP, &ec, &off, NULL);
    free(p);
    if (!re) {
        PCRE2_UCHAR m[256];
        pcre2_get_error_message(ec, m, sizeof m);
        snprintf(msg, msglen, "does not compile: %s", (char *)m);
    }
    return re;
}

static int compile_re(const char *pat, size_t len, pcre2_code **out, const char *path, char *err, size_t errlen) {
    char why[320];
    if (!(*out = eng__re_compile(pat, len, why, sizeof why)))
        return eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: pre-tokenizer regex %.*s %s", path, (int)(len < 80 ? len : 80),
                         pat, why);
    return ENG_OK;
}

/* Escape a literal for PCRE2 (Split with a String pattern). */
static char *re_quote(const char *s) {
    size_t n = strlen(s);
    char *o = malloc(n * 2 + 7), *p = o;
    if (!o) return NULL;
    p += sprintf(p, "\\Q");
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '\\' && s[i + 1] == 'E') { p += sprintf(p, "\\E\\\\\\Q"); continue; }
        *p++ = s[i];
    }
    sprintf(p, "\\E");
    return o;
}

static int add_step(eng_tok *t, const cJSON *pt, const char *path, char *err, size_t errlen) {
    const cJSON *ty = cJSON_GetObjectItemCaseSensitive(pt, "type");
    if (!cJSON_IsString(ty)) return eng__fail(err, errlen, ENG_EFORMAT, "%s: pre_tokenizer without a type", path);
    const char *type = ty->valuestring;
    if (strcmp(type, "Sequence") == 0) {
        const cJSON *arr = cJSON_GetObjectItemCaseSensitive(pt, "pretokenizers"), *it;
        cJSON_ArrayForEach(it, arr) {
            int rc = add_step(t, it, path, err, errlen);
            if (rc) return rc;
        }
        return ENG_OK;
    }
    pre_step *ns = realloc(t->steps, (size_t)(t->n_steps + 1) * sizeof *ns);
    if (!ns) return ENG_ENOMEM;
    t->steps = ns;
    pre_step *s = &t->steps[t->n_steps];
    memset(s, 0, sizeof *s);
    if (strcmp(type, "ByteLevel") == 0) {
        s->kind = STEP_BYTELEVEL;
        s->keep_match = s->keep_gap = 1;
        s->add_prefix_space = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(pt, "add_prefix_space"));
        const cJSON *ur = cJSON_GetObjectItemCaseSensitive(pt, "use_regex");
        if (!ur || cJSON_IsTrue(ur)) {
            int rc = compile_re(GPT2_PATTERN, PCRE2_ZERO_TERMINATED, &s->re, path, err, errlen);
            if (rc) return rc;
        }
    } else if (strcmp(type, "Digits") == 0) {
        s->kind = STEP_SPLIT;
        s->keep_match = s->keep_gap = 1;
        int ind = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(pt, "individual_digits"));
        /* tokenizers uses char::is_numeric: general categories Nd, Nl, No. */
        int rc = compile_re(ind ? "\\p{N}" : "\\p{N}+", PCRE2_ZERO_TERMINATED, &s->re, path, err, errlen);
        if (rc) return rc;
    } else if (strcmp(type, "Split") == 0) {
        s->kind = STEP_SPLIT;
        const cJSON *pat = cJSON_GetObjectItemCaseSensitive(pt, "pattern");
        const cJSON *rx = cJSON_GetObjectItemCaseSensitive(pat, "Regex");
        const cJSON *st = cJSON_GetObjectItemCaseSensitive(pat, "String");
        const cJSON *beh = cJSON_GetObjectItemCaseSensitive(pt, "behavior");
        const char *b = cJSON_IsString(beh) ? beh->valuestring : "(none)";
        int invert = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(pt, "invert"));
        int merged = !strcmp(b, "MergedWithPrevious") || !strcmp(b, "MergedWithNext");
        if ((strcmp(b, "Isolated") && strcmp(b, "Removed") && !merged) || (merged && invert))
            return eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: Split behavior %s%s is not supported (Isolated, Removed, "
                             "MergedWithPrevious, MergedWithNext)", path, b, invert ? " with invert" : "");
        /* The behavior applies to the delimiters: the matches, or with
         * invert the text between them. Removed drops the delimiters; the
         * Merged ones join each match to the piece before or after it. */
        int removed = strcmp(b, "Removed") == 0;
        s->keep_match = !(removed && !invert);
        s->keep_gap = !(removed && invert);
        s->merge = !merged ? MW_NONE : !strcmp(b, "MergedWithPrevious") ? MW_PREVIOUS : MW_NEXT;
        int rc;
        if (cJSON_IsString(rx)) {
            rc = compile_re(rx->valuestring, strlen(rx->valuestring), &s->re, path, err, errlen);
        } else if (cJSON_IsString(st)) {
            char *q = re_quote(st->valuestring);
            if (!q) return ENG_ENOMEM;
            rc = compile_re(q, strlen(q), &s->re, path, err, errlen);
            free(q);
        } else {
            return eng__fail(err, errlen, ENG_EFORMAT, "%s: Split pre-tokenizer without a Regex or String pattern", path);
        }
        if (rc) return rc;
    } else if (strcmp(type, "Metaspace") == 0) {
        s->kind = STEP_METASPACE;
        const cJSON *r = cJSON_GetObjectItemCaseSensitive(pt, "replacement");
        const cJSON *ps = cJSON_GetObjectItemCaseSensitive(pt, "prepend_scheme");
        const cJSON *ap = cJSON_GetObjectItemCaseSensitive(pt, "add_prefix_space"); /* before prepend_scheme existed */
        const cJSON *sp = cJSON_GetObjectItemCaseSensitive(pt, "split");
        const char *rs = cJSON_IsString(r) ? r->valuestring : "\xE2\x96\x81";
        if (!rs[0] || strlen(rs) >= sizeof s->repl)
            return eng__fail(err, errlen, ENG_EFORMAT, "%s: Metaspace replacement must be one character", path);
        s->repl_len = strlen(rs);
        memcpy(s->repl, rs, s->repl_len);
        if (cJSON_IsString(ps))
            s->prepend = !strcmp(ps->valuestring, "first") ? PREPEND_FIRST
                       : !strcmp(ps->valuestring, "never") ? PREPEND_NEVER : PREPEND_ALWAYS;
        else s->prepend = ap && cJSON_IsFalse(ap) ? PREPEND_NEVER : PREPEND_ALWAYS;
        if (!sp || cJSON_IsTrue(sp)) { /* split before each replacement character, which starts its piece */
            char *q = re_quote(s->repl);
            if (!q) return ENG_ENOMEM;
            int rc = compile_re(q, strlen(q), &s->re, path, err, errlen);
            free(q);
            if (rc) return rc;
            s->keep_match = s->keep_gap = 1;
            s->merge = MW_NEXT;
        }
    } else {
        return eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: pre-tokenizer type %s is not supported "
                         "(Sequence, Split, Digits, ByteLevel, Metaspace)", path, type);
    }
    t->n_steps++;
    return ENG_OK;
}

/* BOS from a TemplateProcessing post-processor: the special token before $A. */
static int find_bos(const cJSON *pp, eng_tok *t) {
    const cJSON *ty = cJSON_GetObjectItemCaseSensitive(pp, "type");
    if (!cJSON_IsString(ty)) return -1;
    if (strcmp(ty->valuestring, "Sequence") == 0) {
        const cJSON *it;
        cJSON_ArrayForEach(it, cJSON_GetObjectItemCaseSensitive(pp, "processors")) {
            int b = find_bos(it, t);
            if (b >= 0) return b;
        }
        return -1;
    }
    if (strcmp(ty->valuestring, "TemplateProcessing") != 0) return -1;
    const cJSON *it;
    cJSON_ArrayForEach(it, cJSON_GetObjectItemCaseSensitive(pp, "single")) {
        if (cJSON_GetObjectItemCaseSensitive(it, "Sequence")) return -1;
        const cJSON *sp = cJSON_GetObjectItemCaseSensitive(it, "SpecialToken");
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(sp, "id");
        if (!cJSON_IsString(id)) continue;
        const cJSON *ent = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(pp, "special_tokens"),
                                                            id->valuestring);
        const cJSON *ids = cJSON_GetObjectItemCaseSensitive(ent, "ids");
        const cJSON *first = cJSON_GetArrayItem(ids, 0);
        if (cJSON_IsNumber(first) && first->valuedouble >= 0 && first->valuedouble < t->n_ids) return (int)first->valuedouble;
        int32_t v = eng__strmap_get(&t->vocab, id->valuestring, strlen(id->valuestring));
        return v;
    }
    return -1;
}

static int set_token(eng_tok *t, int32_t id, const char *s, size_t len) {
    if (t->str[id]) return ENG_OK;   /* first definition wins */
    t->str[id] = malloc(len + 1);
    if (!t->str[id]) return ENG_ENOMEM;
    memcpy(t->str[id], s, len);
    t->str[id][len] = 0;
    t->str_len[id] = (uint32_t)len;
    return ENG_OK;
}

/* What the decoder does to one token, short of Fuse (concatenation) and
 * Strip/Metaspace at the start of the text (t->strip_start). */
typedef struct {
    int byte_level;          /* the ByteLevel decoder */
    int byte_fallback;       /* ByteFallback: "<0xXX>" is that byte */
    struct { char *from, *to; } rep[4];  /* Replace (String patterns), in order; Metaspace's replacement */
    int n_rep;
} decoder;

static void decoder_free(decoder *d) {
    for (int i = 0; i < d->n_rep; i++) { free(d->rep[i].from); free(d->rep[i].to); }
}

static int add_rep(decoder *d, const char *from, const char *to, const char *path, char *err, size_t errlen) {
    if (d->n_rep == 4) return eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: more than 4 Replace decoders", path);
    if (!(d->rep[d->n_rep].from = strdup(from)) || !(d->rep[d->n_rep].to = strdup(to))) {
        free(d->rep[d->n_rep].from);
        return ENG_ENOMEM;
    }
    d->n_rep++;
    return ENG_OK;
}

static int load_decoder(eng_tok *t, decoder *d, const cJSON *j, const char *path, char *err, size_t errlen) {
    if (!j || cJSON_IsNull(j)) return ENG_OK;
    const cJSON *ty = cJSON_GetObjectItemCaseSensitive(j, "type");
    const char *k = cJSON_IsString(ty) ? ty->valuestring : "?";
    if (!strcmp(k, "Sequence")) {
        const cJSON *it;
        cJSON_ArrayForEach(it, cJSON_GetObjectItemCaseSensitive(j, "decoders")) {
            int rc = load_decoder(t, d, it, path, err, errlen);
            if (rc) return rc;
        }
        return ENG_OK;
    }
    if (!strcmp(k, "ByteLevel")) d->byte_level = 1;
    else if (!strcmp(k, "ByteFallback")) d->byte_fallback = 1;
    else if (!strcmp(k, "Fuse")) {}
    else if (!strcmp(k, "Replace")) {
        const cJSON *st = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(j, "pattern"), "String");
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(j, "content");
        if (!cJSON_IsString(st) || !st->valuestring[0] || !cJSON_IsString(c))
            return eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: a Replace decoder needs a String pattern and content", path);
        return add_rep(d, st->valuestring, c->valuestring, path, err, errlen);
    } else if (!strcmp(k, "Strip")) {
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(j, "content"), *a = cJSON_GetObjectItemCaseSensitive(j, "start");
        const cJSON *z = cJSON_GetObjectItemCaseSensitive(j, "stop");
        if (!cJSON_IsString(c) || strcmp(c->valuestring, " ") || (cJSON_IsNumber(z) && z->valuedouble != 0) ||
            !cJSON_IsNumber(a) || a->valuedouble < 0 || a->valuedouble > 8)
            return eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: only a Strip decoder of leading spaces is supported", path);
        t->strip_start = (int)a->valuedouble;
    } else if (!strcmp(k, "Metaspace")) {
        const cJSON *r = cJSON_GetObjectItemCaseSensitive(j, "replacement");
        const cJSON *ps = cJSON_GetObjectItemCaseSensitive(j, "prepend_scheme");
        const cJSON *ap = cJSON_GetObjectItemCaseSensitive(j, "add_prefix_space");
        int never = cJSON_IsString(ps) ? !strcmp(ps->valuestring, "never") : ap && cJSON_IsFalse(ap);
        const char *rs = cJSON_IsString(r) ? r->valuestring : "\xE2\x96\x81";
        if (!rs[0] || strlen(rs) >= sizeof t->meta)
            return eng__fail(err, errlen, ENG_EFORMAT, "%s: Metaspace replacement must be one character", path);
        if (!never) { /* as the Rust crate does: in the first token every replacement goes, not only the leading one */
            t->meta_len = strlen(rs);
            memcpy(t->meta, rs, t->meta_len);
        }
        return add_rep(d, rs, " ", path, err, errlen);
    } else {
        return eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: decoder %s is not supported (ByteLevel, Replace, ByteFallback, "
                         "Fuse, Strip, Metaspace, Sequence)", path, k);
    }
    return ENG_OK;
}

/* "<0xXX>": the byte, else -1. */
static int fallback_byte(const char *s, size_t n) {
    unsigned v;
    char tail;
    if (n != 6 || strncmp(s, "<0x", 3) || s[5] != '>' || sscanf(s + 3, "%2X%c", &v, &tail) != 2 || tail != '>') return -1;
    return (int)v;
}

/* Decoded bytes of a token under a decoder of pieces: ByteFallback's byte,
 * or the text with the Replace rules applied in order. */
static int make_piece_bytes(eng_tok *t, int32_t id, const decoder *d) {
    const char *s = t->str[id];
    size_t n = t->str_len[id];
    int b = d->byte_fallback ? fallback_byte(s, n) : -1;
    char *o;
    size_t k;
    if (b >= 0) {
        if (!(o = malloc(2))) return ENG_ENOMEM;
        o[0] = (char)b;
        k = 1;
    } else {
        size_t cap = n + 1;
        for (int r = 0; r < d->n_rep; r++) cap = cap * (strlen(d->rep[r].to) + 1) + 1; /* generous */
        if (!(o = malloc(cap))) return ENG_ENOMEM;
        memcpy(o, s, n);
        k = n;
        for (int r = 0; r < d->n_rep; r++) {
            const char *f = d->rep[r].from, *to = d->rep[r].to;
            size_t fl = strlen(f), tl = strlen(to), w = 0;
            char *x = malloc(cap);
            if (!x) { free(o); return ENG_ENOMEM; }
            for (size_t i = 0; i < k;) {
                if (i + fl <= k && !memcmp(o + i, f, fl)) { memcpy(x + w, to, tl); w += tl; i += fl; }
                else x[w++] = o[i++];
            }
            free(o);
            o = x;
            k = w;
        }
    }
    o[k] = 0;
    t->bytes[id] = o;
    t->bytes_len[id] = (uint32_t)k;
    return ENG_OK;
}

/* With a Metaspace decoder that prepends: each token's bytes when it comes
 * first in a text, its replacement characters dropped (then the decoder's
 * other rules), for the tokens that hold one. */
static int make_first_bytes(eng_tok *t, const decoder *d) {
    t->first_bytes = calloc((size_t)t->n_ids, sizeof *t->first_bytes);
    t->first_len = calloc((size_t)t->n_ids, sizeof *t->first_len);
    if (!t->first_bytes || !t->first_len) return ENG_ENOMEM;
    for (int32_t id = 0; id < t->n_ids; id++) {
        const char *s = t->str[id];
        if (!s || !strstr(s, t->meta) || (d->byte_fallback && fallback_byte(s, t->str_len[id]) >= 0)) continue;
        char *o = malloc(t->str_len[id] + 1);
        if (!o) return ENG_ENOMEM;
        size_t k = 0;
        for (size_t i = 0; i < t->str_len[id];) {
            if (!strncmp(s + i, t->meta, t->meta_len)) { i += t->meta_len; continue; }
            o[k++] = s[i++];
        }
        o[k] = 0;
        /* the other Replace rules (none, with a Metaspace decoder, in the files seen) do not apply to what is left */
        t->first_bytes[id] = o;
        t->first_len[id] = (uint32_t)k;
    }
    return ENG_OK;
}

/* Decoded bytes of a token, as the ByteLevel decoder does it: every char
 * mapped back to its byte if all are in the byte alphabet, else the raw text. */
static int make_bytes(eng_tok *t, int32_t id, const int char_byte[0x200]) {
    const char *s = t->str[id];
    size_t n = t->str_len[id];
    char *o = malloc(n + 1);
    if (!o) return ENG_ENOMEM;
    size_t k = 0, i = 0;
    int ok = 1;
    while (i < n) {
        int l;
        unsigned cp = utf8_get((const unsigned char *)s + i, &l);
        if (cp >= 0x200 || char_byte[cp] < 0) { ok = 0; break; }
        o[k++] = (char)char_byte[cp];
        i += (size_t)l;
    }
    if (!ok) { memcpy(o, s, n); k = n; }
    o[k] = 0;
    t->bytes[id] = o;
    t->bytes_len[id] = (uint32_t)k;
    return ENG_OK;
}

/* tokenizer.json's "model": BPE with a vocab object and a merges list, no
 * WordPiece-style affixes. */
static int check_model(const cJSON *model, const char *path, char *err, size_t errlen) {
    const cJSON *mty = cJSON_GetObjectItemCaseSensitive(model, "type");
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
    if (cJSON_IsString(mty) && strcmp(mty->valuestring, "BPE") != 0)
        return eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: %s tokenizers are not supported (only BPE: byte-level or "
                         "with byte fallback)", path, mty->valuestring);
    if (!cJSON_IsObject(vocab) || !cJSON_IsArray(merges))
        return eng__fail(err, errlen, cJSON_IsArray(vocab) ? ENG_EUNSUPPORTED : ENG_EFORMAT,
                         "%s: model needs a vocab object and a merges list (a vocab list is a Unigram tokenizer's, "
                         "which is not supported)", path);
    const cJSON *cont = cJSON_GetObjectItemCaseSensitive(model, "continuing_subword_prefix");
    const cJSON *eow = cJSON_GetObjectItemCaseSensitive(model, "end_of_word_suffix");
    if ((cJSON_IsString(cont) && cont->valuestring[0]) || (cJSON_IsString(eow) && eow->valuestring[0]))
        return eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: BPE with a continuing_subword_prefix or end_of_word_suffix "
                         "(WordPiece-style subwords) is not supported", path);
    return ENG_OK;
}

/* The ids: the vocab's and the added tokens' strings, the vocab map. */
static int load_ids(eng_tok *t, const cJSON *vocab, const cJSON *added, const char *path, char *err, size_t errlen) {
    const cJSON *it;
    int max_id = -1, rc;
    cJSON_ArrayForEach(it, vocab) {
        if (!cJSON_IsNumber(it) || it->valuedouble < 0 || it->valuedouble > (1 << 24))
            return eng__fail(err, errlen, ENG_EFORMAT, "%s: vocab entry \"%s\" has a bad id", path, it->string);
        if ((int)it->valuedouble > max_id) max_id = (int)it->valuedouble;
    }
    cJSON_ArrayForEach(it, added) {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(it, "id");
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(it, "content");
        if (!cJSON_IsNumber(id) || id->valuedouble < 0 || id->valuedouble > (1 << 24) || !cJSON_IsString(c) ||
            !c->valuestring[0])
            return eng__fail(err, errlen, ENG_EFORMAT, "%s: added token without a valid id and content", path);
        if ((int)id->valuedouble > max_id) max_id = (int)id->valuedouble;
    }
    t->n_ids = max_id + 1;
    t->str = calloc((size_t)t->n_ids, sizeof *t->str);
    t->str_len = calloc((size_t)t->n_ids, sizeof *t->str_len);
    t->bytes = calloc((size_t)t->n_ids, sizeof *t->bytes);
    t->bytes_len = calloc((size_t)t->n_ids, sizeof *t->bytes_len);
    t->special = calloc((size_t)t->n_ids, 1);
    if (!t->str || !t->str_len || !t->bytes || !t->bytes_len || !t->special ||
        eng__strmap_init(&t->vocab, (size_t)t->n_ids) != ENG_OK)
        return ENG_ENOMEM;
    cJSON_ArrayForEach(it, vocab) {
        int32_t id = (int32_t)it->valuedouble;
        if (!eng__utf8_valid(it->string, strlen(it->string)))
            return eng__fail(err, errlen, ENG_EFORMAT, "%s: vocab entry %d is not valid UTF-8", path, (int)id);
        if ((rc = set_token(t, id, it->string, strlen(it->string)))) return rc;
        if (eng__strmap_get(&t->vocab, it->string, strlen(it->string)) < 0 &&
            (rc = eng__strmap_put(&t->vocab, t->str[id], t->str_len[id], id)))
            return rc;
    }
    t->n_added = cJSON_GetArraySize(added);
    t->added = calloc((size_t)t->n_added + 1, sizeof *t->added);
    if (!t->added) return ENG_ENOMEM;
    int k = 0;
    cJSON_ArrayForEach(it, added) {
        added_tok *a = &t->added[k++];
        const char *c = cJSON_GetObjectItemCaseSensitive(it, "content")->valuestring;
        a->id = (int32_t)cJSON_GetObjectItemCaseSensitive(it, "id")->valuedouble;
        a->len = strlen(c);
        a->content = malloc(a->len + 1);
        if (!a->content) return ENG_ENOMEM;
        memcpy(a->content, c, a->len + 1);
        a->special = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(it, "special"));
        a->lstrip = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(it, "lstrip"));
        a->rstrip = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(it, "rstrip"));
        a->single_word = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(it, "single_word"));
        if (!eng__utf8_valid(c, a->len))
            return eng__fail(err, errlen, ENG_EFORMAT, "%s: added token %d is not valid UTF-8", path, (int)a->id);
        if ((rc = set_token(t, a->id, c, a->len))) return rc;
        t->special[a->id] = (uint8_t)a->special;
    }
    return ENG_OK;
}

/* Each token's bytes: the byte alphabet and byte-fallback ids, the
 * pre-tokenizer (a ByteLevel step makes the pieces byte-level), the
 * decoder's view of a piece, the unknown token. */
static int load_pieces(eng_tok *t, const cJSON *root, decoder *dcd, const char *path, char *err, size_t errlen) {
    unsigned cp[256];
    int char_byte[0x200], rc;
    byte_map(cp);
    for (int i = 0; i < 0x200; i++) char_byte[i] = -1;
    for (int b = 0; b < 256; b++) {
        char u[8];
        int l = utf8_put(u, cp[b]);
        char_byte[cp[b]] = b;
        t->byte_id[b] = eng__strmap_get(&t->vocab, u, (size_t)l);
        snprintf(u, sizeof u, "<0x%02X>", b);
        t->fallback_id[b] = eng__strmap_get(&t->vocab, u, 6);
    }
    const cJSON *pt = cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer");
    if (pt && !cJSON_IsNull(pt) && (rc = add_step(t, pt, path, err, errlen))) return rc;
    for (int i = 0; i < t->n_steps; i++) t->byte_level |= t->steps[i].kind == STEP_BYTELEVEL;
    const cJSON *dec = cJSON_GetObjectItemCaseSensitive(root, "decoder");
    int bl_bytes = dcd->byte_level || (t->byte_level && (!dec || cJSON_IsNull(dec)));
    for (int32_t id = 0; id < t->n_ids; id++)
        if (t->str[id] && (rc = bl_bytes ? make_bytes(t, id, char_byte) : make_piece_bytes(t, id, dcd))) return rc;
    if (t->meta_len && (rc = make_first_bytes(t, dcd))) return rc;
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    const cJSON *unk = cJSON_GetObjectItemCaseSensitive(model, "unk_token");
    if (cJSON_IsString(unk) && (t->unk = eng__strmap_get(&t->vocab, unk->valuestring, strlen(unk->valuestring))) < 0)
        return eng__fail(err, errlen, ENG_EFORMAT, "%s: unk_token \"%s\" is not in the vocab", path, unk->valuestring);
    for (int b = 0; t->byte_level && b < 256; b++)
        if (t->byte_id[b] < 0)
            return eng__fail(err, errlen, ENG_EFORMAT, "%s: the vocab lacks the byte-level token for byte 0x%02x", path, b);
    return ENG_OK;
}

/* One merge, "a b" or ["a", "b"]: its halves. */
static int merge_halves(const cJSON *it, const char **a, size_t *la, const char **b, size_t *lb) {
    if (cJSON_IsString(it)) {
        const char *sp = it->valuestring[0] ? strchr(it->valuestring + 1, ' ') : NULL;
        if (!sp) return -1;
        *a = it->valuestring;
        *la = (size_t)(sp - *a);
        *b = sp + 1;
        *lb = strlen(*b);
        return 0;
    }
    if (cJSON_IsArray(it) && cJSON_GetArraySize(it) == 2 && cJSON_IsString(cJSON_GetArrayItem(it, 0)) &&
        cJSON_IsString(cJSON_GetArrayItem(it, 1))) {
        *a = cJSON_GetArrayItem(it, 0)->valuestring;
        *la = strlen(*a);
        *b = cJSON_GetArrayItem(it, 1)->valuestring;
        *lb = strlen(*b);
        return 0;
    }
    return -1;
}

/* The merges, by rank: both halves and their join must be tokens. */
static int load_merges(eng_tok *t, const cJSON *merges, const char *path, char *err, size_t errlen) {
    t->merge_cap = 16;
    while (t->merge_cap < (size_t)cJSON_GetArraySize(merges) * 2 + 2) t->merge_cap <<= 1;
    t->merges = calloc(t->merge_cap, sizeof *t->merges);
    if (!t->merges) return ENG_ENOMEM;
    int rank = 0, rc = ENG_OK;
    eng__buf join = {0};
    const cJSON *it;
    cJSON_ArrayForEach(it, merges) {
        const char *a, *b;
        size_t la, lb;
        if (merge_halves(it, &a, &la, &b, &lb)) {
            rc = eng__fail(err, errlen, ENG_EFORMAT, cJSON_IsString(it) ? "%s: merge #%d is not \"a b\""
                           : "%s: merge #%d is neither \"a b\" nor [a, b]", path, rank);
            break;
        }
        join.n = 0;
        if (eng__buf_add(&join, a, la) || eng__buf_add(&join, b, lb)) { rc = ENG_ENOMEM; break; }
        int32_t ia = eng__strmap_get(&t->vocab, a, la), ib = eng__strmap_get(&t->vocab, b, lb);
        int32_t ir = eng__strmap_get(&t->vocab, join.p, join.n);
        if (ia < 0 || ib < 0 || ir < 0) {
            rc = eng__fail(err, errlen, ENG_EFORMAT, "%s: merge #%d (\"%.*s\" + \"%.*s\") uses a token not in the vocab",
                           path, rank, (int)la, a, (int)lb, b);
            break;
        }
        merge_put(t, ia, ib, rank, ir);
        rank++;
    }
    free(join.p);
    return rc;
}

int eng__tok_from_json(eng_tok **out, const cJSON *root, const char *path, char *err, size_t errlen) {
    *out = NULL;
    int rc;
    eng_tok *t = calloc(1, sizeof *t);
    if (!t) return ENG_ENOMEM;
    t->bos = t->unk = -1;
    decoder dcd;
    memset(&dcd, 0, sizeof dcd);
    if (!cJSON_IsObject(root)) { rc = eng__fail(err, errlen, ENG_EFORMAT, "%s: not a JSON object", path); goto fail; }
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    if ((rc = check_model(model, path, err, errlen)) ||
        (rc = eng__norm_open(&t->norm, cJSON_GetObjectItemCaseSensitive(root, "normalizer"), path, err, errlen)) ||
        (rc = load_decoder(t, &dcd, cJSON_GetObjectItemCaseSensitive(root, "decoder"), path, err, errlen)))
        goto fail;
    t->ignore_merges = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(model, "ignore_merges"));
    t->byte_fallback = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(model, "byte_fallback"));
    t->fuse_unk = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(model, "fuse_unk"));
    if ((rc = load_ids(t, cJSON_GetObjectItemCaseSensitive(model, "vocab"),
                       cJSON_GetObjectItemCaseSensitive(root, "added_tokens"), path, err, errlen)) ||
        (rc = load_pieces(t, root, &dcd, path, err, errlen)) ||
        (rc = load_merges(t, cJSON_GetObjectItemCaseSensitive(model, "merges"), path, err, errlen)) ||
        (rc = trie_build(t)))
        goto fail;
    t->bos = find_bos(cJSON_GetObjectItemCaseSensitive(root, "post_processor"), t);
    decoder_free(&dcd);
    *out = t;
    return ENG_OK;
fail:
    if (rc == ENG_ENOMEM) eng__fail(err, errlen, rc, "%s: out of memory", path);
    decoder_free(&dcd);
    eng_tok_close(t);
    return rc;
}

/* A tokenizer.json, or a GGUF file's tokenizer metadata. */
int eng_tok_open(eng_tok **out, const char *path, char *err, size_t errlen) {
    *out = NULL;
    cJSON *root = NULL;
    int rc;
    if (eng__is_gguf_path(path)) {
        eng__gguf f;
        if ((rc = eng__gguf_open(&f, path, err, errlen))) return rc;
        rc = eng__gguf_tokenizer(&f.g, path, &root, err, errlen);
        eng__gguf_close(&f);
        if (rc) return rc;
    } else {
        char *text;
        size_t len;
        if ((rc = eng__read_file(path, &text, &len, err, errlen))) return rc;
        root = cJSON_ParseWithLength(text, len);
        free(text);
    }
    rc = eng__tok_from_json(out, root, path, err, errlen);
    cJSON_Delete(root);
    return rc;
}

void eng_tok_close(eng_tok *t) {
    if (!t) return;
    for (int i = 0; i < t->n_ids; i++) {
        if (t->str) free(t->str[i]);
        if (t->bytes) free(t->bytes[i]);
        if (t->first_bytes) free(t->first_bytes[i]);
    }
    free(t->first_bytes);
    free(t->first_len);
    free(t->str); free(t->str_len); free(t->bytes); free(t->bytes_len); free(t->special);
    eng__strmap_free(&t->vocab);
    free(t->merges);
    for (int i = 0; i < t->n_steps; i++) pcre2_code_free(t->steps[i].re);
    free(t->steps);
    for (int i = 0; i < t->n_added; i++) free(t->added[i].content);
    free(t->added);
    free(t->at.key); free(t->at.child); free(t->at.term);
    eng__norm_free(t->norm);
    free(t);
}

int eng_tok_vocab_size(const eng_tok *t) { return t->n_ids; }
int eng_tok_bos(const eng_tok *t) { return t->bos; }

const char *eng_tok_piece(const eng_tok *t, int32_t id, size_t *len) {
    if (id < 0 || id >= t->n_ids || !t->bytes[id]) return NULL;
    *len = t->bytes_len[id];
    return t->bytes[id];
}

/* ---- encoding ---------------------------------------------------------- */
typedef struct {
    int32_t *v;
    size_t n, cap;
} ids_buf;

static int ids_push(ids_buf *b, int32_t id) {
    if (b->n == b->cap) {
        size_t nc = b->cap ? b->cap * 2 : 64;
        int32_t *nv = realloc(b->v, nc * sizeof *nv);
        if (!nv) return ENG_ENOMEM;
        b->v = nv;
        b->cap = nc;
    }
    b->v[b->n++] = id;
    return ENG_OK;
}

typedef struct { size_t off, len; } span;
typedef struct {
    span *v;
    size_t n, cap;
} span_buf;

static int span_push(span_buf *b, size_t off, size_t len) {
    if (len == 0) return ENG_OK;
    if (b->n == b->cap) {
        size_t nc = b->cap ? b->cap * 2 : 64;
        span *nv = realloc(b->v, nc * sizeof *nv);
        if (!nv) return ENG_ENOMEM;
        b->v = nv;
        b->cap = nc;
    }
    b->v[b->n++] = (span){off, len};
    return ENG_OK;
}

typedef struct {                 /* BPE work: symbols and a heap of merges */
    struct sym { int32_t id, prev, next, len; } *sym;
    struct mrg { int32_t rank, pos, id; } *heap;
    size_t cap, hcap, hn;
} bpe_work;

static int mrg_less(const struct mrg *a, const struct mrg *b) {
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static int heap_push(bpe_work *w, struct mrg m) {
    if (w->hn == w->hcap) {
        size_t nc = w->hcap ? w->hcap * 2 : 64;
        struct mrg *nh = realloc(w->heap, nc * sizeof *nh);
        if (!nh) return ENG_ENOMEM;
        w->heap = nh;
        w->hcap = nc;
    }
    size_t i = w->hn++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!mrg_less(&m, &w->heap[p])) break;
        w->heap[i] = w->heap[p];
        i = p;
    }
    w->heap[i] = m;
    return ENG_OK;
}

static struct mrg heap_pop(bpe_work *w) {
    struct mrg top = w->heap[0], last = w->heap[--w->hn];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= w->hn) break;
        if (c + 1 < w->hn && mrg_less(&w->heap[c + 1], &w->heap[c])) c++;
        if (!mrg_less(&w->heap[c], &last)) break;
        w->heap[i] = w->heap[c];
        i = c;
    }
    if (w->hn) w->heap[i] = last;
    return top;
}

static int try_push(const eng_tok *t, bpe_work *w, int32_t pos, int32_t a, int32_t b) {
    const merge_ent *m = merge_get(t, a, b);
    return m ? heap_push(w, (struct mrg){m->rank, pos, m->id}) : ENG_OK;
}

static int bpe_merge(const eng_tok *t, bpe_work *w, size_t n, ids_buf *out);

/* BPE over one pre-tokenized piece of raw bytes. The hot loop of encoding. */
static int bpe_piece(const eng_tok *t, const unsigned char *s, size_t n, bpe_work *w, ids_buf *out) {
    if (t->ignore_merges) {
        /* the whole piece in byte-level form, if it is one token */
        char stackbuf[256], *bl = n * 2 <= sizeof stackbuf ? stackbuf : malloc(n * 2);
        if (!bl) return ENG_ENOMEM;
        size_t k = 0;
        for (size_t i = 0; i < n; i++) {
            size_t l;
            const char *c = t->str[t->byte_id[s[i]]];
            l = t->str_len[t->byte_id[s[i]]];
            memcpy(bl + k, c, l);
            k += l;
        }
        int32_t id = eng__strmap_get(&t->vocab, bl, k);
        if (bl != stackbuf) free(bl);
        if (id >= 0) return ids_push(out, id);
    }
    if (n > w->cap) {
        struct sym *ns = realloc(w->sym, n * sizeof *ns);
        if (!ns) return ENG_ENOMEM;
        w->sym = ns;
        w->cap = n;
    }
    for (size_t i = 0; i < n; i++)
        w->sym[i] = (struct sym){t->byte_id[s[i]], (int32_t)i - 1, i + 1 < n ? (int32_t)i + 1 : -1, 1};
    return bpe_merge(t, w, n, out);
}

/* BPE over one piece of characters (no ByteLevel step): each character is
 * its vocab token, or with byte_fallback its "<0xXX>" tokens, or the unknown
 * token (one for a run of them with fuse_unk; dropped when there is none). */
static int bpe_chars(const eng_tok *t, const unsigned char *s, size_t n, bpe_work *w, ids_buf *out) {
    if (t->ignore_merges) {
        int32_t id = eng__strmap_get(&t->vocab, (const char *)s, n);
        if (id >= 0) return ids_push(out, id);
    }
    if (n > w->cap) { /* at most one symbol per byte */
        struct sym *ns = realloc(w->sym, n * sizeof *ns);
        if (!ns) return ENG_ENOMEM;
        w->sym = ns;
        w->cap = n;
    }
    size_t k = 0;
    int prev_unk = 0;
    for (size_t i = 0; i < n;) {
        size_t l = (size_t)eng__utf8_seq(s + i, n - i); /* the text is valid UTF-8 */
        int32_t id = eng__strmap_get(&t->vocab, (const char *)s + i, l);
        int fb = id < 0 && t->byte_fallback;
        for (size_t b = 0; fb && b < l; b++) fb = t->fallback_id[s[i + b]] >= 0;
        if (id >= 0 || fb) {
            for (size_t b = 0; b < (id >= 0 ? 1 : l); b++, k++)
                w->sym[k] = (struct sym){id >= 0 ? id : t->fallback_id[s[i + b]], (int32_t)k - 1, (int32_t)k + 1, 1};
            prev_unk = 0;
        } else if (t->unk >= 0 && !(t->fuse_unk && prev_unk)) {
            w->sym[k] = (struct sym){t->unk, (int32_t)k - 1, (int32_t)k + 1, 1};
            k++;
            prev_unk = 1;
        }
        i += l;
    }
    if (!k) return ENG_OK;
    w->sym[k - 1].next = -1;
    return bpe_merge(t, w, k, out);
}

/* Merge the n symbols of w->sym (linked in order) by rank and emit their ids. */
static int bpe_merge(const eng_tok *t, bpe_work *w, size_t n, ids_buf *out) {
    w->hn = 0;
    int rc;
    for (size_t i = 0; i + 1 < n; i++)
        if ((rc = try_push(t, w, (int32_t)i, w->sym[i].id, w->sym[i + 1].id))) return rc;
    while (w->hn) {
        struct mrg top = heap_pop(w);
        struct sym *cur = &w->sym[top.pos];
        if (cur->len == 0 || cur->next < 0) continue;
        struct sym *right = &w->sym[cur->next];
        const merge_ent *m = merge_get(t, cur->id, right->id);
        if (!m || m->rank != top.rank || m->id != top.id) continue; /* stale */
        cur->id = top.id;
        cur->len += right->len;
        right->len = 0;
        cur->next = right->next;
        if (cur->next >= 0) w->sym[cur->next].prev = top.pos;
        if (cur->prev >= 0 && (rc = try_push(t, w, cur->prev, w->sym[cur->prev].id, cur->id))) return rc;
        if (cur->next >= 0 && (rc = try_push(t, w, top.pos, cur->id, w->sym[cur->next].id))) return rc;
    }
    for (int32_t i = 0; i >= 0; i = w->sym[i].next)
        if ((rc = ids_push(out, w->sym[i].id))) return rc;
    return ENG_OK;
}

/* Split each span of `in` by the step's regex into matches and the gaps
 * between them, keeping either or both as pieces, or joining each match to
 * the piece before or after it. */
static int split_re(const pre_step *st, const char *arena, const span_buf *in, span_buf *out, pcre2_match_data *md) {
    const pcre2_code *re = st->re;
    int keep_match = st->keep_match, keep_gap = st->keep_gap, rc;
    for (size_t i = 0; i < in->n; i++) {
        size_t off = in->v[i].off, len = in->v[i].len, last = 0, start = 0;
        const PCRE2_SPTR subj = (PCRE2_SPTR)(arena + off);
        while (start <= len) {
            int r = pcre2_match(re, subj, len, start, PCRE2_NO_UTF_CHECK, md, NULL);
            if (r < 0) break;
            PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
            size_t ms = ov[0], me = ov[1];
            if (me == ms) { /* empty match: step one character */
                if (ms >= len) break;
                start = ms + 1;
                while (start < len && ((unsigned char)subj[start] & 0xC0) == 0x80) start++;
                continue;
            }
            if (st->merge == MW_PREVIOUS) { /* the gap and the match after it */
                if ((rc = span_push(out, off + last, me - last))) return rc;
                last = start = me;
                continue;
            }
            if (st->merge == MW_NEXT) { /* the match starts the next piece */
                if ((rc = span_push(out, off + last, ms - last))) return rc;
                last = ms;
                start = me;
                continue;
            }
            if (keep_gap && (rc = span_push(out, off + last, ms - last))) return rc;
            if (keep_match && (rc = span_push(out, off + ms, me - ms))) return rc;
            last = start = me;
        }
        if ((keep_gap || st->merge != MW_NONE) && (rc = span_push(out, off + last, len - last))) return rc;
    }
    return ENG_OK;
}

typedef struct {
    char *arena;
    size_t n, cap;
} arena_buf;

static int arena_add(arena_buf *a, const char *s, size_t n, size_t *off) {
    if (a->n + n > a->cap) {
        size_t nc = (a->n + n) * 2 + 64;
        char *na = realloc(a->arena, nc);
        if (!na) return ENG_ENOMEM;
        a->arena = na;
        a->cap = nc;
    }
    if (n) memcpy(a->arena + a->n, s, n);
    *off = a->n;
    a->n += n;
    return ENG_OK;
}

typedef struct {
    bpe_work w;
    span_buf a, b;
    arena_buf ar;
    pcre2_match_data *md;
} enc_ctx;

/* Metaspace: every ' ' of each piece becomes the replacement, which is then
 * also prepended (always, or to the input's first piece only) unless the
 * piece starts with it. Pieces are rewritten at the end of the arena. */
static int metaspace(const pre_step *st, enc_ctx *c, int first) {
    int rc;
    for (size_t i = 0; i < c->a.n; i++) {
        span *p = &c->a.v[i];
        size_t old = p->off, len = p->len, start = c->ar.n, tmp;
        /* (checked after the replacement: a piece that starts with a space starts with it too) */
        int pre = (st->prepend == PREPEND_ALWAYS || (st->prepend == PREPEND_FIRST && first && i == 0)) &&
                  !(len && c->ar.arena[old] == ' ') &&
                  !(len >= st->repl_len && !memcmp(c->ar.arena + old, st->repl, st->repl_len));
        if (pre && (rc = arena_add(&c->ar, st->repl, st->repl_len, &tmp))) return rc;
        for (size_t k = 0; k < len; k++) {
            char ch = c->ar.arena[old + k]; /* (the arena may move as it grows) */
            if ((rc = ch == ' ' ? arena_add(&c->ar, st->repl, st->repl_len, &tmp) : arena_add(&c->ar, &ch, 1, &tmp)))
                return rc;
        }
        p->off = start;
        p->len = c->ar.n - start;
    }
    return ENG_OK;
}

/* Normalize, pre-tokenize and BPE one span of text that holds no added
 * token; `first`: it starts the input. */
static int encode_span(const eng_tok *t, enc_ctx *c, const char *s, size_t n, int first, ids_buf *out) {
    int rc;
    size_t off;
    c->ar.n = 0;
    c->a.n = 0;
    char *norm = NULL;
    if (t->norm) {
        if ((rc = eng__norm_apply(t->norm, s, n, &norm, &n))) return rc;
        s = norm;
    }
    rc = arena_add(&c->ar, s, n, &off);
    free(norm);
    if (rc || (rc = span_push(&c->a, off, n))) return rc;
    for (int k = 0; k < t->n_steps; k++) {
        const pre_step *st = &t->steps[k];
        if (st->kind == STEP_METASPACE && (rc = metaspace(st, c, first))) return rc;
        if (st->kind == STEP_BYTELEVEL && st->add_prefix_space) {
            for (size_t i = 0; i < c->a.n; i++) {
                span *p = &c->a.v[i];
                if (c->ar.arena[p->off] == ' ') continue;
                size_t noff, len = p->len, old = p->off;
                if ((rc = arena_add(&c->ar, " ", 1, &noff))) return rc;
                size_t tmp;
                if ((rc = arena_add(&c->ar, c->ar.arena + old, len, &tmp))) return rc;
                p->off = noff;
                p->len = len + 1;
            }
        }
        if (!st->re) continue;
        c->b.n = 0;
        if ((rc = split_re(st, c->ar.arena, &c->a, &c->b, c->md))) return rc;
        span_buf tmp = c->a;
        c->a = c->b;
        c->b = tmp;
    }
    for (size_t i = 0; i < c->a.n; i++) {
        const unsigned char *p = (const unsigned char *)c->ar.arena + c->a.v[i].off;
        if ((rc = t->byte_level ? bpe_piece(t, p, c->a.v[i].len, &c->w, out) : bpe_chars(t, p, c->a.v[i].len, &c->w, out)))
            return rc;
    }
    return ENG_OK;
}

static int is_word_char(unsigned char c) { return c >= 0x80 || c == '_' || (c >= '0' && c <= '9') || ((c | 32) >= 'a' && (c | 32) <= 'z'); }
static int is_space(unsigned char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

/* Leftmost-longest added token at or after pos: returns its index, or -1.
 * *ms and *me get the match range including stripped whitespace. */
static int find_added(const eng_tok *t, const char *s, size_t n, size_t pos, size_t *ms, size_t *me) {
    for (size_t i = pos; i < n; i++) {
        int best = -1;
        for (int32_t node = 0, j = (int32_t)i; (size_t)j < n && (node = trie_child(&t->at, node, (unsigned char)s[j])) >= 0;) {
            j++;
            int k = t->at.term[node];
            if (k < 0) continue;
            const added_tok *a = &t->added[k]; /* longer than any found before: the trie walks longer and longer */
            if (a->single_word && ((i > 0 && is_word_char((unsigned char)s[i - 1])) ||
                                   (i + a->len < n && is_word_char((unsigned char)s[i + a->len]))))
                continue;
            best = k;
        }
        if (best >= 0) {
            const added_tok *a = &t->added[best];
            size_t b = i, e = i + a->len;
            if (a->lstrip) while (b > pos && is_space((unsigned char)s[b - 1])) b--;
            if (a->rstrip) while (e < n && is_space((unsigned char)s[e])) e++;
            *ms = b;
            *me = e;
            return best;
        }
    }
    return -1;
}

int eng_tok_encode(const eng_tok *t, const char *text, size_t len, int add_special, int32_t **ids, size_t *n_ids) {
    *ids = NULL;
    *n_ids = 0;
    if (!eng__utf8_valid(text, len)) return ENG_EUTF8;
    ids_buf out = {0};
    enc_ctx c;
    memset(&c, 0, sizeof c);
    int rc = ENG_OK;
    c.md = pcre2_match_data_create(4, NULL);
    if (!c.md) return ENG_ENOMEM;
    if (add_special && t->bos >= 0 && (rc = ids_push(&out, t->bos))) goto done;
    size_t pos = 0;
    while (pos < len) {
        size_t ms = len, me = len;
        int k = t->n_added ? find_added(t, text, len, pos, &ms, &me) : -1;
        if (k < 0) ms = me = len;
        if (ms > pos && (rc = encode_span(t, &c, text + pos, ms - pos, pos == 0, &out))) goto done;
        if (k >= 0 && (rc = ids_push(&out, t->added[k].id))) goto done;
        pos = me;
    }
done:
    pcre2_match_data_free(c.md);
    free(c.w.sym); free(c.w.heap); free(c.a.v); free(c.b.v); free(c.ar.arena);
    if (rc) { free(out.v); return rc; }
    if (!out.v) out.v = malloc(sizeof *out.v); /* never NULL on success */
    if (!out.v) return ENG_ENOMEM;
    *ids = out.v;
    *n_ids = out.n;
    return ENG_OK;
}

int eng_tok_decode(const eng_tok *t, const int32_t *ids, size_t n, int skip_special, char **text, size_t *len) {
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= t->n_ids) return ENG_ETOKEN;
        if (!(skip_special && t->special[ids[i]])) total += t->bytes_len[ids[i]];
    }
    char *o = malloc(total + 1);
    if (!o) return ENG_ENOMEM;
    size_t k = 0;
    int first = 1;
    for (size_t i = 0; i < n; i++) {
        if (skip_special && t->special[ids[i]]) continue;
        size_t pl;
        const char *p = eng__tok_piece_at(t, ids[i], first, &pl);
        if (p) memcpy(o + k, p, pl);
        k += p ? pl : 0;
        first = 0;
    }
    o[k] = 0;
    size_t cut = 0; /* the decoders' Strip / Metaspace: the leading spaces the encoder added */
    while ((int)cut < t->strip_start && cut < k && o[cut] == ' ') cut++;
    if (cut) memmove(o, o + cut, k - cut + 1);
    *text = o;
    *len = k - cut;
    return ENG_OK;
}

int eng__tok_strip_start(const eng_tok *t) { return t->strip_start; }

const char *eng__tok_piece_at(const eng_tok *t, int32_t id, int first, size_t *len) {
    if (id < 0 || id >= t->n_ids || !t->bytes[id]) return NULL;
    if (first && t->first_bytes && t->first_bytes[id]) {
        *len = t->first_len[id];
        return t->first_bytes[id];
    }
    *len = t->bytes_len[id];
    return t->bytes[id];
}

int eng__tok_is_special(const eng_tok *t, int32_t id) { return id >= 0 && id < t->n_ids && t->special[id]; }
