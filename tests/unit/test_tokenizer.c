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
        {"{\"normalizer\":{\"type\":\"NFC\"},\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[]}}",
         ENG_EUNSUPPORTED, "NFC"},
        {"{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[]},\"pre_tokenizer\":{\"type\":\"Metaspace\"}}",
         ENG_EUNSUPPORTED, "Metaspace"},
        {"{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[]}}", ENG_EUNSUPPORTED, "ByteLevel"},
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

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: test_tokenizer TOKENIZER_JSON\n"); return 2; }
    static const test_case tests[] = {
        {"tokenizer_round_trip", test_round_trip},
        {"tokenizer_special_tokens", test_special_tokens},
        {"tokenizer_invalid_utf8_refused", test_invalid_utf8_refused},
        {"tokenizer_incremental_decode_utf8_safe", test_incremental_decode},
        {"tokenizer_unsupported_types_refused", test_unsupported_refused},
        {0, 0}};
    return run_tests(tests, argc, argv);
}
