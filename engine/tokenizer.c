/* tokenizer.c — byte-level BPE from a Hugging Face tokenizer.json.
 *
 * Encode follows the Hugging Face pipeline step by step:
 *   1. split the text on added tokens (leftmost-longest match);
 *   2. pre-tokenize each remaining span: the configured Split / Digits /
 *      ByteLevel steps, regexes through PCRE2 (UTF + Unicode properties);
 *   3. map each piece's bytes to the GPT-2 byte alphabet and run BPE: merge
 *      the adjacent pair of lowest rank (leftmost on ties) until none is left,
 *      exactly as tokenizers' Word::merge_all does (a heap with lazy deletion);
 *   4. the post-processor's BOS when asked.
 * Only byte-level BPE is supported; anything else is refused at open. */
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

enum step_kind { STEP_SPLIT, STEP_BYTELEVEL };
typedef struct {
    enum step_kind kind;
    pcre2_code *re;      /* NULL: no split */
    int keep_match;      /* matches become pieces */
    int keep_gap;        /* the text between matches becomes pieces */
    int add_prefix_space;
} pre_step;

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
    int32_t byte_id[256];   /* id of the single-byte token for each byte, -1 if none */
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

/* ---- loading ----------------------------------------------------------- */
static int compile_re(const char *pat, size_t len, pcre2_code **out, const char *path, char *err, size_t errlen) {
    int ec;
    PCRE2_SIZE off;
    *out = pcre2_compile((PCRE2_SPTR)pat, len, PCRE2_UTF | PCRE2_UCP, &ec, &off, NULL);
    if (!*out) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(ec, msg, sizeof msg);
        return eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: pre-tokenizer regex does not compile at offset %zu: %s",
                         path, (size_t)off, (char *)msg);
    }
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
        if (!cJSON_IsString(beh) || (strcmp(beh->valuestring, "Isolated") && strcmp(beh->valuestring, "Removed")))
            return eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: Split behavior %s is not supported (Isolated, Removed)",
                             path, cJSON_IsString(beh) ? beh->valuestring : "(none)");
        /* The behavior applies to the delimiters: the matches, or with
         * invert the text between them. Removed drops the delimiters. */
        int removed = strcmp(beh->valuestring, "Removed") == 0;
        int invert = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(pt, "invert"));
        s->keep_match = !(removed && !invert);
        s->keep_gap = !(removed && invert);
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
    } else {
        return eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: pre-tokenizer type %s is not supported "
                         "(Sequence, Split, Digits, ByteLevel)", path, type);
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

int eng_tok_open(eng_tok **out, const char *path, char *err, size_t errlen) {
    *out = NULL;
    char *text;
    size_t len;
    int rc = eng__read_file(path, &text, &len, err, errlen);
    if (rc) return rc;
    cJSON *root = cJSON_ParseWithLength(text, len);
    free(text);
    eng_tok *t = calloc(1, sizeof *t);
    if (!t) { cJSON_Delete(root); return ENG_ENOMEM; }
    t->bos = -1;
    if (!cJSON_IsObject(root)) { rc = eng__fail(err, errlen, ENG_EFORMAT, "%s: not a JSON object", path); goto fail; }

    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    const cJSON *mty = cJSON_GetObjectItemCaseSensitive(model, "type");
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
    if (cJSON_IsString(mty) && strcmp(mty->valuestring, "BPE") != 0) {
        rc = eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: tokenizer model type %s is not supported (only byte-level BPE)",
                       path, mty->valuestring);
        goto fail;
    }
    if (!cJSON_IsObject(vocab) || !cJSON_IsArray(merges)) {
        rc = eng__fail(err, errlen, cJSON_IsArray(vocab) ? ENG_EUNSUPPORTED : ENG_EFORMAT,
                       "%s: model needs a vocab object and a merges list (only byte-level BPE is supported)", path);
        goto fail;
    }
    const cJSON *norm = cJSON_GetObjectItemCaseSensitive(root, "normalizer");
    if (norm && !cJSON_IsNull(norm)) {
        const cJSON *nt = cJSON_GetObjectItemCaseSensitive(norm, "type");
        int empty_seq = cJSON_IsString(nt) && strcmp(nt->valuestring, "Sequence") == 0 &&
                        cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(norm, "normalizers")) == 0;
        if (!empty_seq) {
            rc = eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: normalizer %s is not supported", path,
                           cJSON_IsString(nt) ? nt->valuestring : "?");
            goto fail;
        }
    }
    const cJSON *dec = cJSON_GetObjectItemCaseSensitive(root, "decoder");
    const cJSON *dty = cJSON_GetObjectItemCaseSensitive(dec, "type");
    if (dec && !cJSON_IsNull(dec) && !(cJSON_IsString(dty) && strcmp(dty->valuestring, "ByteLevel") == 0)) {
        rc = eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: decoder %s is not supported (only ByteLevel)", path,
                       cJSON_IsString(dty) ? dty->valuestring : "?");
        goto fail;
    }
    const cJSON *byte_fb = cJSON_GetObjectItemCaseSensitive(model, "byte_fallback");
    const cJSON *cont = cJSON_GetObjectItemCaseSensitive(model, "continuing_subword_prefix");
    const cJSON *eow = cJSON_GetObjectItemCaseSensitive(model, "end_of_word_suffix");
    if (cJSON_IsTrue(byte_fb) || (cJSON_IsString(cont) && cont->valuestring[0]) ||
        (cJSON_IsString(eow) && eow->valuestring[0])) {
        rc = eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: BPE with byte_fallback or subword prefixes/suffixes is not "
                       "supported (only byte-level BPE)", path);
        goto fail;
    }
    t->ignore_merges = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(model, "ignore_merges"));

    /* ids */
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(root, "added_tokens"), *it;
    int max_id = -1;
    cJSON_ArrayForEach(it, vocab) {
        if (!cJSON_IsNumber(it) || it->valuedouble < 0 || it->valuedouble > (1 << 24)) {
            rc = eng__fail(err, errlen, ENG_EFORMAT, "%s: vocab entry \"%s\" has a bad id", path, it->string);
            goto fail;
        }
        if ((int)it->valuedouble > max_id) max_id = (int)it->valuedouble;
    }
    cJSON_ArrayForEach(it, added) {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(it, "id");
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(it, "content");
        if (!cJSON_IsNumber(id) || id->valuedouble < 0 || id->valuedouble > (1 << 24) || !cJSON_IsString(c) ||
            !c->valuestring[0]) {
            rc = eng__fail(err, errlen, ENG_EFORMAT, "%s: added token without a valid id and content", path);
            goto fail;
        }
        if ((int)id->valuedouble > max_id) max_id = (int)id->valuedouble;
    }
    t->n_ids = max_id + 1;
    t->str = calloc((size_t)t->n_ids, sizeof *t->str);
    t->str_len = calloc((size_t)t->n_ids, sizeof *t->str_len);
    t->bytes = calloc((size_t)t->n_ids, sizeof *t->bytes);
    t->bytes_len = calloc((size_t)t->n_ids, sizeof *t->bytes_len);
    t->special = calloc((size_t)t->n_ids, 1);
    if (!t->str || !t->str_len || !t->bytes || !t->bytes_len || !t->special ||
        eng__strmap_init(&t->vocab, (size_t)t->n_ids) != ENG_OK) {
        rc = ENG_ENOMEM;
        goto fail;
    }
    cJSON_ArrayForEach(it, vocab) {
        int32_t id = (int32_t)it->valuedouble;
        if ((rc = set_token(t, id, it->string, strlen(it->string)))) goto fail;
        if (eng__strmap_get(&t->vocab, it->string, strlen(it->string)) < 0 &&
            (rc = eng__strmap_put(&t->vocab, t->str[id], t->str_len[id], id)))
            goto fail;
    }
    t->n_added = cJSON_GetArraySize(added);
    t->added = calloc((size_t)t->n_added + 1, sizeof *t->added);
    if (!t->added) { rc = ENG_ENOMEM; goto fail; }
    int k = 0;
    cJSON_ArrayForEach(it, added) {
        added_tok *a = &t->added[k++];
        const char *c = cJSON_GetObjectItemCaseSensitive(it, "content")->valuestring;
        a->id = (int32_t)cJSON_GetObjectItemCaseSensitive(it, "id")->valuedouble;
        a->len = strlen(c);
        a->content = malloc(a->len + 1);
        if (!a->content) { rc = ENG_ENOMEM; goto fail; }
        memcpy(a->content, c, a->len + 1);
        a->special = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(it, "special"));
        a->lstrip = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(it, "lstrip"));
        a->rstrip = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(it, "rstrip"));
        a->single_word = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(it, "single_word"));
        if ((rc = set_token(t, a->id, c, a->len))) goto fail;
        t->special[a->id] = (uint8_t)a->special;
    }

    /* byte alphabet */
    unsigned cp[256];
    int char_byte[0x200];
    byte_map(cp);
    for (int i = 0; i < 0x200; i++) char_byte[i] = -1;
    for (int b = 0; b < 256; b++) {
        char u[4];
        int l = utf8_put(u, cp[b]);
        char_byte[cp[b]] = b;
        t->byte_id[b] = eng__strmap_get(&t->vocab, u, (size_t)l);
    }
    for (int32_t id = 0; id < t->n_ids; id++)
        if (t->str[id] && (rc = make_bytes(t, id, char_byte))) goto fail;

    /* merges: "a b" strings or ["a", "b"] pairs */
    t->merge_cap = 16;
    while (t->merge_cap < (size_t)cJSON_GetArraySize(merges) * 2 + 2) t->merge_cap <<= 1;
    t->merges = calloc(t->merge_cap, sizeof *t->merges);
    if (!t->merges) { rc = ENG_ENOMEM; goto fail; }
    int rank = 0;
    char *buf = NULL;
    size_t bufcap = 0;
    cJSON_ArrayForEach(it, merges) {
        const char *a, *b;
        size_t la, lb;
        if (cJSON_IsString(it)) {
            const char *sp = strchr(it->valuestring + 1, ' ');
            if (!sp) { free(buf); rc = eng__fail(err, errlen, ENG_EFORMAT, "%s: merge \"%s\" is not \"a b\"", path, it->valuestring); goto fail; }
            a = it->valuestring; la = (size_t)(sp - a);
            b = sp + 1; lb = strlen(b);
        } else if (cJSON_IsArray(it) && cJSON_GetArraySize(it) == 2 && cJSON_IsString(cJSON_GetArrayItem(it, 0)) &&
                   cJSON_IsString(cJSON_GetArrayItem(it, 1))) {
            a = cJSON_GetArrayItem(it, 0)->valuestring; la = strlen(a);
            b = cJSON_GetArrayItem(it, 1)->valuestring; lb = strlen(b);
        } else {
            free(buf);
            rc = eng__fail(err, errlen, ENG_EFORMAT, "%s: merge #%d is neither \"a b\" nor [a, b]", path, rank);
            goto fail;
        }
        int32_t ia = eng__strmap_get(&t->vocab, a, la), ib = eng__strmap_get(&t->vocab, b, lb);
        if (la + lb + 1 > bufcap) {
            bufcap = (la + lb + 1) * 2;
            char *nb = realloc(buf, bufcap);
            if (!nb) { free(buf); rc = ENG_ENOMEM; goto fail; }
            buf = nb;
        }
        memcpy(buf, a, la);
        memcpy(buf + la, b, lb);
        int32_t ir = eng__strmap_get(&t->vocab, buf, la + lb);
        if (ia < 0 || ib < 0 || ir < 0) {
            free(buf);
            rc = eng__fail(err, errlen, ENG_EFORMAT, "%s: merge #%d (\"%.*s\" + \"%.*s\") uses a token not in the vocab",
                           path, rank, (int)la, a, (int)lb, b);
            goto fail;
        }
        merge_put(t, ia, ib, rank, ir);
        rank++;
    }
    free(buf);

    /* pre-tokenizer */
    const cJSON *pt = cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer");
    if (pt && !cJSON_IsNull(pt) && (rc = add_step(t, pt, path, err, errlen))) goto fail;
    int has_bl = 0;
    for (int i = 0; i < t->n_steps; i++) has_bl |= t->steps[i].kind == STEP_BYTELEVEL;
    if (!has_bl) {
        rc = eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: no ByteLevel pre-tokenizer: only byte-level BPE is supported", path);
        goto fail;
    }
    for (int b = 0; b < 256; b++)
        if (t->byte_id[b] < 0) {
            rc = eng__fail(err, errlen, ENG_EFORMAT, "%s: the vocab lacks the byte-level token for byte 0x%02x", path, b);
            goto fail;
        }
    t->bos = find_bos(cJSON_GetObjectItemCaseSensitive(root, "post_processor"), t);
    cJSON_Delete(root);
    *out = t;
    return ENG_OK;
fail:
    if (rc == ENG_ENOMEM) eng__fail(err, errlen, rc, "%s: out of memory", path);
    cJSON_Delete(root);
    eng_tok_close(t);
    return rc;
}

void eng_tok_close(eng_tok *t) {
    if (!t) return;
    for (int i = 0; i < t->n_ids; i++) {
        if (t->str) free(t->str[i]);
        if (t->bytes) free(t->bytes[i]);
    }
    free(t->str); free(t->str_len); free(t->bytes); free(t->bytes_len); free(t->special);
    eng__strmap_free(&t->vocab);
    free(t->merges);
    for (int i = 0; i < t->n_steps; i++) pcre2_code_free(t->steps[i].re);
    free(t->steps);
    for (int i = 0; i < t->n_added; i++) free(t->added[i].content);
    free(t->added);
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

/* Split each span of `in` by the regex into matches and the gaps between
 * them, keeping either or both as pieces. */
static int split_re(const pcre2_code *re, int keep_match, int keep_gap, const char *arena, const span_buf *in, span_buf *out,
                    pcre2_match_data *md) {
    int rc;
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
            if (keep_gap && (rc = span_push(out, off + last, ms - last))) return rc;
            if (keep_match && (rc = span_push(out, off + ms, me - ms))) return rc;
            last = start = me;
        }
        if (keep_gap && (rc = span_push(out, off + last, len - last))) return rc;
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
    memcpy(a->arena + a->n, s, n);
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

/* Pre-tokenize and BPE one span of text that holds no added token. */
static int encode_span(const eng_tok *t, enc_ctx *c, const char *s, size_t n, ids_buf *out) {
    int rc;
    size_t off;
    c->ar.n = 0;
    c->a.n = 0;
    if ((rc = arena_add(&c->ar, s, n, &off)) || (rc = span_push(&c->a, off, n))) return rc;
    for (int k = 0; k < t->n_steps; k++) {
        const pre_step *st = &t->steps[k];
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
        if ((rc = split_re(st->re, st->keep_match, st->keep_gap, c->ar.arena, &c->a, &c->b, c->md))) return rc;
        span_buf tmp = c->a;
        c->a = c->b;
        c->b = tmp;
    }
    for (size_t i = 0; i < c->a.n; i++)
        if ((rc = bpe_piece(t, (const unsigned char *)c->ar.arena + c->a.v[i].off, c->a.v[i].len, &c->w, out)))
            return rc;
    return ENG_OK;
}

static int is_word_char(unsigned char c) { return c >= 0x80 || c == '_' || (c >= '0' && c <= '9') || ((c | 32) >= 'a' && (c | 32) <= 'z'); }
static int is_space(unsigned char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

/* Leftmost-longest added token at or after pos: returns its index, or -1.
 * *ms and *me get the match range including stripped whitespace. */
static int find_added(const eng_tok *t, const char *s, size_t n, size_t pos, size_t *ms, size_t *me) {
    for (size_t i = pos; i < n; i++) {
        int best = -1;
        for (int k = 0; k < t->n_added; k++) {
            const added_tok *a = &t->added[k];
            if (a->len > n - i || (best >= 0 && a->len <= t->added[best].len)) continue;
            if (memcmp(s + i, a->content, a->len) != 0) continue;
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
        if (ms > pos && (rc = encode_span(t, &c, text + pos, ms - pos, &out))) goto done;
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
    for (size_t i = 0; i < n; i++) {
        if (skip_special && t->special[ids[i]]) continue;
        if (t->bytes[ids[i]]) memcpy(o + k, t->bytes[ids[i]], t->bytes_len[ids[i]]);
        k += t->bytes_len[ids[i]];
    }
    o[k] = 0;
    *text = o;
    *len = k;
    return ENG_OK;
}

int eng__tok_is_special(const eng_tok *t, int32_t id) { return id >= 0 && id < t->n_ids && t->special[id]; }
