/* gguf_vocab.c — a GGUF file's tokenizer metadata as the tokenizer.json it
 * stands for, so that one tokenizer implementation serves both layouts.
 *
 *   tokenizer.ggml.model "gpt2"   byte-level BPE: tokens (byte-level strings)
 *                                 and merges; tokenizer.ggml.pre names the
 *                                 pre-tokenizer (its split regex below);
 *   tokenizer.ggml.model "llama"  SentencePiece-style BPE with byte fallback:
 *                                 tokens, scores, and merges when the file
 *                                 has them; else the merges are derived from
 *                                 the scores (a pair's rank is its merged
 *                                 piece's score, highest first), which is
 *                                 how SentencePiece applies a BPE model.
 * token_type: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
 * 6 byte. Control and unknown tokens are special added tokens,
 * user-defined ones plain added tokens. tokenizer.ggml.add_bos_token adds
 * the BOS in front (tokenizer.json's TemplateProcessing). */
#include "gguf.h"
#include "internal.h"

#include <cjson/cJSON.h>
#include <stdlib.h>
#include <string.h>

/* A pre-tokenizer name (llama.cpp's names for them) and the tokenizer.json
 * fragments of the models that use it. */
typedef struct {
    const char *names;          /* '|'-separated */
    const char *pre_tokenizer;  /* JSON */
    const char *normalizer;     /* JSON or NULL */
    int ignore_merges;
} pre_kind;

#define BYTELEVEL_NOREGEX "{\"type\":\"ByteLevel\",\"add_prefix_space\":false,\"trim_offsets\":true,\"use_regex\":false}"
#define SPLIT(re, behavior, invert)                                                                                    \
    "{\"type\":\"Split\",\"pattern\":{\"Regex\":\"" re "\"},\"behavior\":\"" behavior "\",\"invert\":" invert "}"
#define CONTRACTIONS "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
#define SEQ2(a, b) "{\"type\":\"Sequence\",\"pretokenizers\":[" a "," b "]}"

static const pre_kind PRE[] = {
    {"llama-bpe|llama3|llama-v3|falcon3|dbrx|smaug-bpe",
     SEQ2(SPLIT(CONTRACTIONS "|[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?\\\\p{L}+|\\\\p{N}{1,3}| ?[^\\\\s\\\\p{L}\\\\p{N}]+[\\\\r\\\\n]*|"
                "\\\\s*[\\\\r\\\\n]+|\\\\s+(?!\\\\S)|\\\\s+", "Isolated", "false"), BYTELEVEL_NOREGEX),
     NULL, 1},
    {"qwen2|deepseek-r1-qwen",
     SEQ2(SPLIT(CONTRACTIONS "|[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?\\\\p{L}+|\\\\p{N}| ?[^\\\\s\\\\p{L}\\\\p{N}]+[\\\\r\\\\n]*|"
                "\\\\s*[\\\\r\\\\n]+|\\\\s+(?!\\\\S)|\\\\s+", "Isolated", "false"), BYTELEVEL_NOREGEX),
     "{\"type\":\"NFC\"}", 0},
    {"gpt-4o",
     SEQ2(SPLIT("[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?[\\\\p{Lu}\\\\p{Lt}\\\\p{Lm}\\\\p{Lo}\\\\p{M}]*[\\\\p{Ll}\\\\p{Lm}\\\\p{Lo}\\\\p{M}]+"
                "(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?[\\\\p{Lu}\\\\p{Lt}\\\\p{Lm}\\\\p{Lo}\\\\p{M}]+"
                "[\\\\p{Ll}\\\\p{Lm}\\\\p{Lo}\\\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\\\\p{N}{1,3}| ?[^\\\\s\\\\p{L}\\\\p{N}]+"
                "[\\\\r\\\\n/]*|\\\\s*[\\\\r\\\\n]+|\\\\s+(?!\\\\S)|\\\\s+", "Removed", "true"), BYTELEVEL_NOREGEX),
     NULL, 0},
    {"smollm",
     SEQ2("{\"type\":\"Digits\",\"individual_digits\":true}",
          "{\"type\":\"ByteLevel\",\"add_prefix_space\":false,\"trim_offsets\":true,\"use_regex\":true}"),
     NULL, 0},
    {"gpt-2|gpt2|default",
     "{\"type\":\"ByteLevel\",\"add_prefix_space\":false,\"trim_offsets\":true,\"use_regex\":true}", NULL, 0},
};

static const pre_kind *pre_of(const char *name, size_t n) {
    for (size_t i = 0; i < sizeof PRE / sizeof *PRE; i++)
        for (const char *p = PRE[i].names; *p;) {
            const char *e = strchr(p, '|');
            size_t l = e ? (size_t)(e - p) : strlen(p);
            if (l == n && !memcmp(p, name, n)) return &PRE[i];
            p += l + (e != NULL);
        }
    return NULL;
}

static cJSON *parse_const(const char *json) { return cJSON_Parse(json); }

/* A string of the file as a C string (NUL inside: refused). */
static char *cstr(const char *s, size_t n) {
    if (memchr(s, 0, n)) return NULL;
    char *d = malloc(n + 1);
    if (d) {
        memcpy(d, s, n);
        d[n] = 0;
    }
    return d;
}

typedef struct {
    const char *s;
    size_t n;
} piece;

/* merges derived from scores: (score of the merged piece, its id, left id, right id) */
typedef struct {
    float score;
    int32_t id, l, r;
} smerge;

static int smerge_cmp(const void *a, const void *b) {
    const smerge *x = a, *y = b;
    if (x->score != y->score) return x->score > y->score ? -1 : 1;
    if (x->id != y->id) return x->id < y->id ? -1 : 1;
    if (x->l != y->l) return x->l < y->l ? -1 : 1;
    return (x->r > y->r) - (x->r < y->r);
}

/* Every split of every scored piece into two pieces of the vocabulary, best
 * merged score first, as "left right" strings in merges. */
static int merges_from_scores(const gguf_kv *scores, const piece *tok, const uint8_t *types, int32_t n, cJSON *merges,
                              const char *path, char *err, size_t errlen) {
    eng__strmap m;
    if (eng__strmap_init(&m, (size_t)n)) return ENG_ENOMEM;
    for (int32_t i = 0; i < n; i++)
        if ((types[i] == 1 || types[i] == 0 || types[i] == 4) && eng__strmap_get(&m, tok[i].s, tok[i].n) < 0 &&
            eng__strmap_put(&m, tok[i].s, tok[i].n, i)) {
            eng__strmap_free(&m);
            return ENG_ENOMEM;
        }
    size_t cap = 1024, k = 0;
    smerge *v = malloc(cap * sizeof *v);
    int rc = v ? ENG_OK : ENG_ENOMEM;
    for (int32_t i = 0; i < n && !rc; i++) {
        if (types[i] != 1 && types[i] != 0 && types[i] != 4) continue;
        for (size_t cut = 1; cut < tok[i].n && !rc; cut++) {
            if ((tok[i].s[cut] & 0xC0) == 0x80) continue; /* inside a character */
            int32_t l = eng__strmap_get(&m, tok[i].s, cut), r = eng__strmap_get(&m, tok[i].s + cut, tok[i].n - cut);
            if (l < 0 || r < 0) continue;
            if (k == cap) {
                smerge *nv = realloc(v, (cap *= 2) * sizeof *nv);
                if (!nv) { rc = ENG_ENOMEM; break; }
                v = nv;
            }
            v[k++] = (smerge){(float)gguf_arr_num(scores, (uint64_t)i), i, l, r};
        }
    }
    if (!rc) qsort(v, k, sizeof *v, smerge_cmp);
    for (size_t i = 0; i < k && !rc; i++) {
        cJSON *pair = cJSON_CreateArray();
        if (pair && !cJSON_AddItemToArray(merges, pair)) { cJSON_Delete(pair); pair = NULL; }
        char *a = cstr(tok[v[i].l].s, tok[v[i].l].n), *b = cstr(tok[v[i].r].s, tok[v[i].r].n);
        if (!pair || !a || !b ||
            !cJSON_AddItemToArray(pair, cJSON_CreateString(a)) || !cJSON_AddItemToArray(pair, cJSON_CreateString(b)))
            rc = ENG_ENOMEM;
        free(a);
        free(b);
    }
    free(v);
    eng__strmap_free(&m);
    if (rc) eng__fail(err, errlen, rc, "%s: out of memory deriving merges", path);
    return rc;
}

static const gguf_kv *array_of(const gguf_file *g, const char *key, int want_string, uint64_t n_want, const char *path,
                               char *err, size_t errlen, int *rc) {
    const gguf_kv *kv = gguf_get(g, key);
    *rc = ENG_OK;
    if (!kv) return NULL;
    int is_str = kv->type == GGUF_ARRAY && kv->arr_type == GGUF_STRING;
    int is_num = kv->type == GGUF_ARRAY && kv->arr_type != GGUF_STRING && kv->arr_type != GGUF_ARRAY;
    if ((want_string && !is_str) || (!want_string && !is_num))
        *rc = eng__fail(err, errlen, ENG_EFORMAT, "%s: %s is not an array of %s", path, key,
                        want_string ? "strings" : "numbers");
    else if (n_want && kv->n != n_want)
        *rc = eng__fail(err, errlen, ENG_EFORMAT, "%s: %s has %llu entries for %llu tokens", path, key,
                        (unsigned long long)kv->n, (unsigned long long)n_want);
    return *rc ? NULL : kv;
}

static int add_str(cJSON *o, const char *k, const char *v) { return cJSON_AddStringToObject(o, k, v) != NULL; }

int eng__gguf_tokenizer(const gguf_file *g, const char *path, cJSON **out, char *err, size_t errlen) {
    *out = NULL;
    const char *model_s, *pre_s = "default";
    size_t model_n, pre_n = 7;
    if (gguf_str(g, "tokenizer.ggml.model", &model_s, &model_n))
        return eng__fail(err, errlen, ENG_EFORMAT, "%s: no tokenizer.ggml.model (the file carries no tokenizer)", path);
    int spm = model_n == 5 && !memcmp(model_s, "llama", 5);
    if (!spm && !(model_n == 4 && !memcmp(model_s, "gpt2", 4)))
        return eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: tokenizer.ggml.model \"%.*s\" is not supported (gpt2: "
                         "byte-level BPE; llama: SentencePiece BPE)", path, (int)(model_n > 64 ? 64 : model_n), model_s);
    gguf_str(g, "tokenizer.ggml.pre", &pre_s, &pre_n);
    const pre_kind *pk = spm ? NULL : pre_of(pre_s, pre_n);
    if (!spm && !pk)
        return eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: tokenizer.ggml.pre \"%.*s\" is not a pre-tokenizer kvserve "
                         "knows (llama-bpe, qwen2, gpt-4o, smollm, gpt-2, default)", path,
                         (int)(pre_n > 64 ? 64 : pre_n), pre_s);
    int rc;
    const gguf_kv *toks = array_of(g, "tokenizer.ggml.tokens", 1, 0, path, err, errlen, &rc);
    if (rc) return rc;
    if (!toks || toks->n == 0 || toks->n > (1u << 24))
        return eng__fail(err, errlen, ENG_EFORMAT, "%s: tokenizer.ggml.tokens is missing, empty or absurdly long", path);
    int32_t n = (int32_t)toks->n;
    const gguf_kv *types = array_of(g, "tokenizer.ggml.token_type", 0, toks->n, path, err, errlen, &rc);
    if (rc) return rc;
    const gguf_kv *scores = array_of(g, "tokenizer.ggml.scores", 0, toks->n, path, err, errlen, &rc);
    if (rc) return rc;
    const gguf_kv *mkv = array_of(g, "tokenizer.ggml.merges", 1, 0, path, err, errlen, &rc);
    if (rc) return rc;
    if (!spm && !mkv) return eng__fail(err, errlen, ENG_EFORMAT, "%s: a gpt2 tokenizer without tokenizer.ggml.merges", path);
    if (spm && !mkv && !scores)
        return eng__fail(err, errlen, ENG_EFORMAT, "%s: a llama tokenizer with neither merges nor scores", path);
    int64_t bos = -1, unk = -1, add_bos = 0, add_space = 1;
    if (gguf_int(g, "tokenizer.ggml.bos_token_id", &bos) || bos >= n) bos = -1;
    if (gguf_int(g, "tokenizer.ggml.unknown_token_id", &unk) || unk >= n) unk = -1;
    if (gguf_int(g, "tokenizer.ggml.add_bos_token", &add_bos)) add_bos = spm; /* llama.cpp's default */
    gguf_int(g, "tokenizer.ggml.add_space_prefix", &add_space);

    piece *tok = malloc((size_t)n * sizeof *tok);
    uint8_t *ty = malloc((size_t)n);
    cJSON *root = cJSON_CreateObject(), *model = cJSON_AddObjectToObject(root, "model");
    cJSON *vocab = cJSON_AddObjectToObject(model, "vocab"), *merges = cJSON_AddArrayToObject(model, "merges");
    cJSON *added = cJSON_AddArrayToObject(root, "added_tokens");
    rc = tok && ty && root && model && vocab && merges && added && add_str(model, "type", "BPE") ? ENG_OK : ENG_ENOMEM;
    const uint8_t *p = toks->val;
    for (int32_t i = 0; i < n && !rc; i++) {
        gguf_next_str(&p, &tok[i].s, &tok[i].n);
        double t = types ? gguf_arr_num(types, (uint64_t)i) : 1;
        ty[i] = t >= 0 && t <= 6 ? (uint8_t)t : 1;
        if (i == unk) ty[i] = 2;
        if (!tok[i].n) { rc = eng__fail(err, errlen, ENG_EFORMAT, "%s: token %d is empty", path, (int)i); break; }
        if (memchr(tok[i].s, 0, tok[i].n)) {
            rc = eng__fail(err, errlen, ENG_EUNSUPPORTED, "%s: token %d holds a NUL byte", path, (int)i);
            break;
        }
        char *s = cstr(tok[i].s, tok[i].n);
        if (!s) { rc = ENG_ENOMEM; break; }
        int special = ty[i] == 2 || ty[i] == 3, user = ty[i] == 4;
        /* byte-level special tokens live only in added_tokens (as in tokenizer.json); SentencePiece ones in both */
        /* (a repeated string is added again: the tokenizer keeps the first id for it, and the string for both) */
        if ((spm || (!special && !user)) && !cJSON_AddNumberToObject(vocab, s, i)) rc = ENG_ENOMEM;
        if (!rc && (special || user)) {
            cJSON *a = cJSON_CreateObject();
            if (!a || !cJSON_AddItemToArray(added, a) || !cJSON_AddNumberToObject(a, "id", i) || !add_str(a, "content", s) ||
                !cJSON_AddBoolToObject(a, "special", special) || !cJSON_AddBoolToObject(a, "normalized", !special && spm))
                rc = ENG_ENOMEM;
        }
        free(s);
    }
    if (!rc && mkv) {
        p = mkv->val;
        for (uint64_t i = 0; i < mkv->n && !rc; i++) {
            const char *s;
            size_t l;
            gguf_next_str(&p, &s, &l);
            char *m = cstr(s, l);
            if (!m || !strchr(m, ' ')) {
                rc = m ? eng__fail(err, errlen, ENG_EFORMAT, "%s: merge %llu is not two pieces separated by a space", path,
                                   (unsigned long long)i)
                       : eng__fail(err, errlen, ENG_EFORMAT, "%s: merge %llu holds a NUL byte", path,
                                   (unsigned long long)i);
                free(m);
                break;
            }
            if (!cJSON_AddItemToArray(merges, cJSON_CreateString(m))) rc = ENG_ENOMEM;
            free(m);
        }
    } else if (!rc) {
        rc = merges_from_scores(scores, tok, ty, n, merges, path, err, errlen);
    }
    if (!rc && spm) {
        if (!cJSON_AddTrueToObject(model, "byte_fallback") || !cJSON_AddTrueToObject(model, "fuse_unk")) rc = ENG_ENOMEM;
        char *u = unk >= 0 ? cstr(tok[unk].s, tok[unk].n) : NULL;
        if (!rc && u && !add_str(model, "unk_token", u)) rc = ENG_ENOMEM;
        free(u);
        const char *norm = add_space ? "{\"type\":\"Sequence\",\"normalizers\":[{\"type\":\"Prepend\",\"prepend\":\"\\u2581\"},"
                                       "{\"type\":\"Replace\",\"pattern\":{\"String\":\" \"},\"content\":\"\\u2581\"}]}"
                                     : "{\"type\":\"Replace\",\"pattern\":{\"String\":\" \"},\"content\":\"\\u2581\"}";
        const char *dec = add_space ? "{\"type\":\"Sequence\",\"decoders\":[{\"type\":\"Replace\",\"pattern\":{\"String\":"
                                      "\"\\u2581\"},\"content\":\" \"},{\"type\":\"ByteFallback\"},{\"type\":\"Fuse\"},"
                                      "{\"type\":\"Strip\",\"content\":\" \",\"start\":1,\"stop\":0}]}"
                                    : "{\"type\":\"Sequence\",\"decoders\":[{\"type\":\"Replace\",\"pattern\":{\"String\":"
                                      "\"\\u2581\"},\"content\":\" \"},{\"type\":\"ByteFallback\"},{\"type\":\"Fuse\"}]}";
        if (!rc && (!cJSON_AddItemToObject(root, "normalizer", parse_const(norm)) ||
                    !cJSON_AddItemToObject(root, "decoder", parse_const(dec))))
            rc = ENG_ENOMEM;
    } else if (!rc) {
        if (!cJSON_AddItemToObject(root, "pre_tokenizer", parse_const(pk->pre_tokenizer)) ||
            !cJSON_AddItemToObject(root, "decoder", parse_const("{\"type\":\"ByteLevel\"}")) ||
            (pk->normalizer && !cJSON_AddItemToObject(root, "normalizer", parse_const(pk->normalizer))) ||
            (pk->ignore_merges && !cJSON_AddTrueToObject(model, "ignore_merges")))
            rc = ENG_ENOMEM;
    }
    if (!rc && add_bos && bos >= 0) { /* TemplateProcessing: BOS, then the text */
        char *b = cstr(tok[bos].s, tok[bos].n);
        cJSON *pp = cJSON_AddObjectToObject(root, "post_processor");
        cJSON *single = pp ? cJSON_AddArrayToObject(pp, "single") : NULL;
        cJSON *st = cJSON_CreateObject(), *seq = cJSON_CreateObject();
        if (st && !cJSON_AddItemToArray(single, st)) { cJSON_Delete(st); st = NULL; }
        if (seq && !cJSON_AddItemToArray(single, seq)) { cJSON_Delete(seq); seq = NULL; }
        cJSON *sp = st ? cJSON_AddObjectToObject(st, "SpecialToken") : NULL;
        cJSON *sq = seq ? cJSON_AddObjectToObject(seq, "Sequence") : NULL;
        cJSON *sts = pp ? cJSON_AddObjectToObject(pp, "special_tokens") : NULL;
        cJSON *ent = sts && b ? cJSON_AddObjectToObject(sts, b) : NULL;
        cJSON *ids = ent ? cJSON_AddArrayToObject(ent, "ids") : NULL;
        if (!b || !sp || !sq || !ids || !add_str(pp, "type", "TemplateProcessing") || !add_str(sp, "id", b) ||
            !add_str(sq, "id", "A") || !add_str(ent, "id", b) || !cJSON_AddItemToArray(ids, cJSON_CreateNumber((double)bos)))
            rc = ENG_ENOMEM;
        free(b);
    }
    free(tok);
    free(ty);
    if (rc) {
        if (rc == ENG_ENOMEM) eng__fail(err, errlen, rc, "%s: out of memory building the tokenizer", path);
        cJSON_Delete(root);
        return rc;
    }
    *out = root;
    return ENG_OK;
}
