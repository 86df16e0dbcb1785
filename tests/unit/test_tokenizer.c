/* test_tokenizer.c — tokenizer behaviour on our generated tokenizer (argv[1]
 * = its tokenizer.json): round trips, UTF-8 safety, special tokens,
 * refusal of unsupported tokenizer types. Exact ids against Hugging Face are
 * checked by tests/js/tokenizer_compare.mjs. */
#include "internal.h"
#include "test.h"

#include <unistd.h>

static eng_tok *open_tok(void) {
    eng_tok *t = NULL;
    char err[512];
    int rc = eng_tok_open(&t, t_arg, err, sizeof err);
    CHECK_MSG(rc == ENG_OK, "%s", err);
    return t;
}

static const char *SAMPLES[] = {
    "Hello, world!", "  leading and trailing spaces  ", "tabs\tand\nnewlines\r\n\n\n",
    "numbers 0 1 12 123 1234567 3.14159 -42", "héllo wörld ça va", "你好，世界", "こんにちは世界", "안녕하세요",
    "emoji 🎉👍🏽👨‍👩‍👧 🇫🇷", "def f(x):\n    return x * 2  # comment\n", "<|endoftext|> in text <|im_start|>",
    "don't I'LL we've", "", "a", "\xe2\x80\x8b zero width", "x\x7f\x01\x02 control",
};

static void test_round_trip(void) {
    eng_tok *t = open_tok();
    if (!t) return;
    for (size_t i = 0; i < sizeof SAMPLES / sizeof *SAMPLES; i++) {
        int32_t *ids;
        size_t n;
        CHECK(eng_tok_encode(t, SAMPLES[i], strlen(SAMPLES[i]), 0, &ids, &n) == ENG_OK);
        char *text;
        size_t len;
        CHECK(eng_tok_decode(t, ids, n, 0, &text, &len) == ENG_OK);
        CHECK_MSG(len == strlen(SAMPLES[i]) && memcmp(text, SAMPLES[i], len) == 0, "sample %zu: '%s' -> '%s'", i,
                  SAMPLES[i], text);
        free(ids);
        free(text);
    }
    eng_tok_close(t);
}

static void test_special_tokens(void) {
    eng_tok *t = open_tok();
    if (!t) return;
    int32_t *ids;
    size_t n;
    const char *s = "a<|endoftext|>b";
    CHECK(eng_tok_encode(t, s, strlen(s), 0, &ids, &n) == ENG_OK);
    int found = 0;
    for (size_t i = 0; i < n; i++) found += ids[i] == 0;
    CHECK(found == 1);
    char *text;
    size_t len;
    CHECK(eng_tok_decode(t, ids, n, 1, &text, &len) == ENG_OK && strcmp(text, "ab") == 0);
    free(text);
    free(ids);
    /* bad ids */
    int32_t bad[] = {1, 1 << 30};
    CHECK(eng_tok_decode(t, bad, 2, 0, &text, &len) == ENG_ETOKEN);
    size_t pl;
    CHECK(eng_tok_piece(t, -1, &pl) == NULL);
    eng_tok_close(t);
}

static void test_invalid_utf8_refused(void) {
    eng_tok *t = open_tok();
    if (!t) return;
    const char *bad[] = {"\xff", "abc\xc3", "\xed\xa0\x80", "\xc0\xaf", "\xf4\x90\x80\x80"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        int32_t *ids;
        size_t n;
        CHECK_MSG(eng_tok_encode(t, bad[i], strlen(bad[i]), 0, &ids, &n) == ENG_EUTF8, "case %zu", i);
    }
    eng_tok_close(t);
}

/* Streaming never emits half a character, and the pieces add up to the text. */
static void test_incremental_decode(void) {
    eng_tok *t = open_tok();
    if (!t) return;
    const char *s = "héllo 你好 🎉👍🏽 ok ∑ x";
    int32_t *ids;
    size_t n;
    CHECK(eng_tok_encode(t, s, strlen(s), 0, &ids, &n) == ENG_OK);
    CHECK(n > 10); /* the small vocab splits characters across tokens */
    eng_detok *d = eng_detok_new(t);
    char out[256] = "";
    size_t on = 0;
    for (size_t i = 0; i < n; i++) {
        const char *p;
        size_t pl;
        CHECK(eng_detok_push(d, ids[i], &p, &pl) == ENG_OK);
        CHECK(eng__utf8_valid(p, pl));
        memcpy(out + on, p, pl);
        on += pl;
    }
    const char *p;
    size_t pl;
    CHECK(eng_detok_flush(d, &p, &pl) == ENG_OK && pl == 0);
    CHECK(on == strlen(s) && memcmp(out, s, on) == 0);
    eng_detok_free(d);
    free(ids);

    /* A lone continuation byte comes out as U+FFFD; an unfinished one at the end too. */
    d = eng_detok_new(t);
    const char *raw = "\x80";
    CHECK(eng_tok_encode(t, "a", 1, 0, &ids, &n) == ENG_OK);
    int32_t cont = -1;
    for (int32_t id = 0; id < eng_tok_vocab_size(t) && cont < 0; id++) {
        const char *q = eng_tok_piece(t, id, &pl);
        if (q && pl == 1 && q[0] == raw[0]) cont = id;
    }
    CHECK(cont >= 0);
    CHECK(eng_detok_push(d, cont, &p, &pl) == ENG_OK && pl == 3 && memcmp(p, "\xEF\xBF\xBD", 3) == 0);
    eng_detok_free(d);
    free(ids);
    eng_tok_close(t);
}

static int write_file(const char *path, const char *s) {
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    fputs(s, f);
    return fclose(f);
}

static void test_unsupported_refused(void) {
    char path[] = "/tmp/kvtokXXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    close(fd);
    struct { const char *json; int code; const char *needle; } cases[] = {
        {"{\"model\":{\"type\":\"Unigram\",\"vocab\":[[\"a\",0.0]]}}", ENG_EUNSUPPORTED, "Unigram"},
        {"{\"model\":{\"type\":\"WordPiece\",\"vocab\":{\"a\":0}}}", ENG_EUNSUPPORTED, "WordPiece"},
        {"{\"normalizer\":{\"type\":\"Precompiled\"},\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[]}}",
         ENG_EUNSUPPORTED, "normalizer Precompiled is not supported"},
        {"{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[]},\"pre_tokenizer\":{\"type\":\"Whitespace\"}}",
         ENG_EUNSUPPORTED, "pre-tokenizer type Whitespace"},
        {"{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[]},\"decoder\":{\"type\":\"WordPiece\"}}",
         ENG_EUNSUPPORTED, "decoder WordPiece"},
        {"{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[],\"continuing_subword_prefix\":\"##\"}}",
         ENG_EUNSUPPORTED, "continuing_subword_prefix"},
        {"{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[]},\"pre_tokenizer\":{\"type\":\"Split\","
         "\"pattern\":{\"String\":\"-\"},\"behavior\":\"Contiguous\"}}", ENG_EUNSUPPORTED, "Split behavior Contiguous"},
        {"{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[],\"unk_token\":\"<unk>\"}}", ENG_EFORMAT,
         "unk_token"},
        {"{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[\"a b\"]}}", ENG_EFORMAT, "not in the vocab"},
        {"{\"model\":", ENG_EFORMAT, "JSON"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        CHECK(write_file(path, cases[i].json) == 0);
        eng_tok *t = NULL;
        char err[512] = "";
        int rc = eng_tok_open(&t, path, err, sizeof err);
        CHECK_MSG(rc == cases[i].code && strstr(err, cases[i].needle) && strstr(err, path), "case %zu: rc %d '%s'", i,
                  rc, err);
        CHECK(t == NULL);
    }
    unlink(path);
    eng_tok *t = NULL;
    char err[512];
    CHECK(eng_tok_open(&t, "/nonexistent/tokenizer.json", err, sizeof err) == ENG_EIO && strstr(err, "/nonexistent"));
}

/* A SentencePiece-style tokenizer built here, checked against the Rust
 * tokenizers crate's semantics worked out by hand: characters, byte
 * fallback, fused unknowns, Prepend only before something, Split's merged
 * behaviors, Metaspace's prepend schemes and its decoder dropping every
 * replacement of the first token. */
static const char SP_VOCAB[] =
    "\"vocab\":{\"<unk>\":0,\"<s>\":1,\"</s>\":2,\"\u2581\":4,\"a\":5,\"b\":6,\"\u2581a\":7,\"ab\":8,\"\u2581ab\":9,"
    "\"-\":10,\"x\":11,\"\u2581\u2581\":12,\"-b\":13,\"a-\":14,\"<0xC3>\":15,\"<0xA9>\":16},"
    "\"merges\":[\"\u2581 a\",\"a b\",\"\u2581a b\",\"- b\",\"a -\",\"\u2581 \u2581\"]";
static const char SP_ADDED[] =
    "\"added_tokens\":[{\"id\":0,\"content\":\"<unk>\",\"special\":true},{\"id\":1,\"content\":\"<s>\",\"special\":true},"
    "{\"id\":2,\"content\":\"</s>\",\"special\":true}]";

static eng_tok *sp_tok(const char *path, const char *normalizer, const char *pre, const char *decoder) {
    char json[4096];
    snprintf(json, sizeof json, "{\"normalizer\":%s,\"pre_tokenizer\":%s,\"decoder\":%s,%s,\"model\":{\"type\":\"BPE\","
             "\"unk_token\":\"<unk>\",\"fuse_unk\":true,\"byte_fallback\":true,%s}}", normalizer, pre, decoder, SP_ADDED,
             SP_VOCAB);
    CHECK(write_file(path, json) == 0);
    eng_tok *t = NULL;
    char err[512] = "";
    CHECK_MSG(eng_tok_open(&t, path, err, sizeof err) == ENG_OK, "%s", err);
    return t;
}

static int ids_are(const eng_tok *t, const char *text, const int32_t *want, size_t n) {
    int32_t *ids = NULL;
    size_t k = 0;
    int ok = eng_tok_encode(t, text, strlen(text), 0, &ids, &k) == ENG_OK && k == n &&
             (n == 0 || memcmp(ids, want, n * sizeof *want) == 0);
    if (!ok) {
        fprintf(stderr, "  \"%s\":", text);
        for (size_t i = 0; i < k; i++) fprintf(stderr, " %d", ids[i]);
        fprintf(stderr, "\n");
    }
    free(ids);
    return ok;
}

static int decodes_to(const eng_tok *t, const int32_t *ids, size_t n, const char *want) {
    char *s = NULL;
    size_t len = 0;
    int ok = eng_tok_decode(t, ids, n, 0, &s, &len) == ENG_OK && len == strlen(want) && memcmp(s, want, len) == 0;
    if (!ok) fprintf(stderr, "  decoded \"%.*s\", want \"%s\"\n", (int)len, s ? s : "", want);
    free(s);
    return ok;
}

static void test_sentencepiece_style(void) {
    char path[] = "/tmp/kvspXXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    close(fd);
    const char *legacy_norm = "{\"type\":\"Sequence\",\"normalizers\":[{\"type\":\"Prepend\",\"prepend\":\"\u2581\"},"
                              "{\"type\":\"Replace\",\"pattern\":{\"String\":\" \"},\"content\":\"\u2581\"}]}";
    const char *legacy_dec = "{\"type\":\"Sequence\",\"decoders\":[{\"type\":\"Replace\",\"pattern\":{\"String\":\"\u2581\"},"
                             "\"content\":\" \"},{\"type\":\"ByteFallback\"},{\"type\":\"Fuse\"},{\"type\":\"Strip\","
                             "\"content\":\" \",\"start\":1,\"stop\":0}]}";
    eng_tok *t = sp_tok(path, legacy_norm, "null", legacy_dec);
    if (t) {
        CHECK(ids_are(t, "ab", (int32_t[]){9}, 1));                   /* ▁ a b -> ▁a b -> ▁ab */
        CHECK(ids_are(t, "\xC3\xA9", (int32_t[]){4, 15, 16}, 3));     /* é is not in the vocab: its bytes */
        CHECK(ids_are(t, "zzq", (int32_t[]){4, 0}, 2));               /* no byte tokens either: one fused <unk> */
        CHECK(ids_are(t, "", NULL, 0));                                /* Prepend only before something */
        CHECK(ids_are(t, "<s>ab", (int32_t[]){1, 9}, 2));             /* each span after an added token is normalized */
        CHECK(decodes_to(t, (int32_t[]){9, 4, 15, 16}, 4, "ab \xC3\xA9")); /* Strip: one leading space of the text */
        CHECK(decodes_to(t, (int32_t[]){12, 5}, 2, " a"));
        eng_detok *d = eng_detok_new(t);
        const char *p;
        size_t pl;
        CHECK(eng_detok_push(d, 12, &p, &pl) == ENG_OK && pl == 1 && p[0] == ' '); /* the stream strips alike */
        CHECK(eng_detok_push(d, 5, &p, &pl) == ENG_OK && pl == 1 && p[0] == 'a');
        eng_detok_free(d);
        d = eng_detok_new(t); /* byte-fallback tokens: nothing until the character is whole */
        CHECK(eng_detok_push(d, 4, &p, &pl) == ENG_OK && pl == 0);   /* "▁": the stripped leading space */
        CHECK(eng_detok_push(d, 15, &p, &pl) == ENG_OK && pl == 0);  /* <0xC3>: half of é */
        CHECK(eng_detok_push(d, 16, &p, &pl) == ENG_OK && pl == 2 && !memcmp(p, "\xC3\xA9", 2));
        eng_detok_free(d);
        eng_tok_close(t);
    }
    const char *strip_norm = "{\"type\":\"Sequence\",\"normalizers\":[{\"type\":\"Strip\",\"strip_left\":true,"
                             "\"strip_right\":true},{\"type\":\"Prepend\",\"prepend\":\"\u2581\"}]}";
    if ((t = sp_tok(path, strip_norm, "null", "null"))) {
        CHECK(ids_are(t, " \t ", NULL, 0));                            /* stripped to nothing: nothing prepended */
        CHECK(ids_are(t, "  ab\n", (int32_t[]){9}, 1));
        eng_tok_close(t);
    }
    const char *split = "{\"type\":\"Split\",\"pattern\":{\"String\":\"-\"},\"behavior\":\"%s\",\"invert\":false}";
    char pre[256];
    snprintf(pre, sizeof pre, split, "Isolated");
    if ((t = sp_tok(path, "null", pre, "null"))) {
        CHECK(ids_are(t, "a-b--x", (int32_t[]){5, 10, 6, 10, 10, 11}, 6));
        eng_tok_close(t);
    }
    snprintf(pre, sizeof pre, split, "MergedWithPrevious");
    if ((t = sp_tok(path, "null", pre, "null"))) {
        CHECK(ids_are(t, "a-b--x", (int32_t[]){14, 6, 10, 10, 11}, 5));  /* a- | b- | - | x */
        eng_tok_close(t);
    }
    snprintf(pre, sizeof pre, split, "MergedWithNext");
    if ((t = sp_tok(path, "null", pre, "null"))) {
        CHECK(ids_are(t, "a-b--x", (int32_t[]){5, 13, 10, 10, 11}, 5));  /* a | -b | - | -x */
        eng_tok_close(t);
    }
    const char *meta = "{\"type\":\"Metaspace\",\"replacement\":\"\u2581\",\"prepend_scheme\":\"%s\",\"split\":true}";
    const char *schemes[] = {"always", "first", "never"};
    for (int k = 0; k < 3; k++) {
        snprintf(pre, sizeof pre, meta, schemes[k]);
        if (!(t = sp_tok(path, "null", pre, pre))) continue;
        /* ▁a | ▁b (always, first) or a | ▁b (never); after an added token only `always` prepends */
        CHECK_MSG(ids_are(t, "a b", k < 2 ? (int32_t[]){7, 4, 6} : (int32_t[]){5, 4, 6}, 3), "%s", schemes[k]);
        CHECK_MSG(ids_are(t, "<s>a b", k == 0 ? (int32_t[]){1, 7, 4, 6} : (int32_t[]){1, 5, 4, 6}, 4), "%s", schemes[k]);
        /* the decoder: in the first token every replacement goes, unless it never prepends */
        CHECK_MSG(decodes_to(t, (int32_t[]){12, 12, 5}, 3, k < 2 ? "  a" : "    a"), "%s", schemes[k]);
        CHECK_MSG(decodes_to(t, (int32_t[]){7, 4, 6}, 3, k < 2 ? "a b" : " a b"), "%s", schemes[k]);
        eng_tok_close(t);
    }
    unlink(path);
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: test_tokenizer TOKENIZER_JSON\n"); return 2; }
    static const test_case tests[] = {
        {"tokenizer_round_trip", test_round_trip},
        {"tokenizer_special_tokens", test_special_tokens},
        {"tokenizer_invalid_utf8_refused", test_invalid_utf8_refused},
        {"tokenizer_incremental_decode_utf8_safe", test_incremental_decode},
        {"tokenizer_unsupported_types_refused", test_unsupported_refused},
        {"tokenizer_sentencepiece_style_rust_semantics", test_sentencepiece_style},
        {0, 0}};
    return run_tests(tests, argc, argv);
}
