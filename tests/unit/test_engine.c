/* test_engine.c — model loading, forward pass consistency, generation,
 * sampling and scoring on the generated tiny models (argv[1] = models root
 * with tiny, tiny-bf16, tiny-f16, tiny-sharded, tiny-untied). */
#include "internal.h"
#include "test.h"

#include <math.h>
#include <sys/stat.h>
#include <unistd.h>

static eng_model *open_named(const char *name, int batch) {
    char dir[1024], err[512];
    snprintf(dir, sizeof dir, "%s/%s", t_arg, name);
    eng_options o = {.n_threads = 2, .max_batch_tokens = batch};
    eng_model *m = NULL;
    int rc = eng_model_open(&m, dir, &o, err, sizeof err);
    CHECK_MSG(rc == ENG_OK, "%s: %s", name, err);
    return m;
}

static const int32_t PROMPT[] = {5, 17, 300, 42, 8, 999, 64, 128, 7, 3, 250, 11};
#define NP (sizeof PROMPT / sizeof *PROMPT)

static double max_rel_diff(const float *a, const float *b, size_t n) {
    double md = 0, mx = 0;
    for (size_t i = 0; i < n; i++) {
        md = fmax(md, fabs((double)a[i] - b[i]));
        mx = fmax(mx, fabs((double)b[i]));
    }
    return md / (mx > 0 ? mx : 1);
}

static float *logits_of(eng_model *m, const int32_t *ids, size_t n) {
    size_t V = (size_t)eng_model_config(m)->vocab_size;
    float *lg = malloc(n * V * sizeof *lg);
    char err[256];
    CHECK(eng_logits(m, ids, n, lg, err, sizeof err) == ENG_OK);
    return lg;
}

/* Every weight format gives the logits of the F32 file: exactly when the
 * values are the same (sharded), closely for rounded ones (BF16, F16). The
 * untied model has its own lm_head, so its logits must differ. */
static void test_weight_formats(void) {
    eng_model *f32 = open_named("tiny", 0);
    if (!f32) return;
    size_t V = (size_t)eng_model_config(f32)->vocab_size;
    CHECK(strcmp(eng_model_config(f32)->dtype, "F32") == 0);
    float *ref = logits_of(f32, PROMPT, NP);
    const struct { const char *name, *dtype; double tol; } v[] = {
        {"tiny-sharded", "F32", 0}, {"tiny-untied", "F32", -1}, {"tiny-bf16", "BF16", 0.05}, {"tiny-f16", "F16", 0.01}};
    for (size_t i = 0; i < sizeof v / sizeof *v; i++) {
        eng_model *m = open_named(v[i].name, 0);
        if (!m) continue;
        CHECK_MSG(strcmp(eng_model_config(m)->dtype, v[i].dtype) == 0, "%s dtype %s", v[i].name, eng_model_config(m)->dtype);
        float *lg = logits_of(m, PROMPT, NP);
        double d = max_rel_diff(lg, ref, NP * V);
        int ok = v[i].tol == 0 ? d == 0 : v[i].tol < 0 ? d > 0.1 : (d > 0 && d < v[i].tol);
        CHECK_MSG(ok, "%s: relative diff %g", v[i].name, d);
        free(lg);
        eng_model_close(m);
    }
    free(ref);
    eng_model_close(f32);
}

/* Prefill in chunks of 3 tokens gives the logits of one pass (KV written by
 * earlier chunks is read back from the blocks). */
static void test_chunked_prefill(void) {
    eng_model *a = open_named("tiny", 0), *b = open_named("tiny", 3);
    if (!a || !b) return;
    size_t V = (size_t)eng_model_config(a)->vocab_size;
    float *la = logits_of(a, PROMPT, NP), *lb = logits_of(b, PROMPT, NP);
    double d = max_rel_diff(lb, la, NP * V);
    CHECK_MSG(d < 1e-5, "chunked vs whole: %g", d);
    free(la);
    free(lb);
    eng_model_close(a);
    eng_model_close(b);
}

typedef struct {
    char text[8192];
    size_t n;
    int tokens, stop_after, bad_utf8;
} collect;

static int collect_cb(void *ud, int32_t token, const char *text, size_t len) {
    collect *c = ud;
    (void)token;
    if (!eng__utf8_valid(text, len)) c->bad_utf8++;
    if (c->n + len < sizeof c->text) { memcpy(c->text + c->n, text, len); c->n += len; }
    c->tokens++;
    return c->stop_after && c->tokens >= c->stop_after;
}

static eng_gen_params greedy(int n) {
    eng_gen_params p = {0};
    eng_sampling_default(&p.sampling);
    p.max_tokens = n;
    p.ignore_eos = 1;
    return p;
}

/* Greedy decoding with the KV cache picks, at every step, the argmax of a
 * full recomputation over the whole sequence. */
static void test_kv_decode_matches_recompute(void) {
    eng_model *m = open_named("tiny", 0);
    if (!m) return;
    size_t V = (size_t)eng_model_config(m)->vocab_size;
    eng_gen_params p = greedy(24);
    eng_gen_result r;
    collect c = {0};
    char err[256];
    CHECK(eng_generate(m, PROMPT, NP, &p, collect_cb, &c, &r, err, sizeof err) == ENG_OK);
    CHECK(r.generated_tokens == 24 && r.finish == ENG_FINISH_LENGTH && r.prompt_tokens == (int)NP);
    CHECK(c.n == r.text_len && memcmp(c.text, r.text, c.n) == 0 && c.bad_utf8 == 0);
    int32_t all[NP + 24];
    memcpy(all, PROMPT, sizeof PROMPT);
    memcpy(all + NP, r.tokens, 24 * sizeof(int32_t));
    float *lg = logits_of(m, all, NP + 23);
    for (int i = 0; i < 24; i++) {
        const float *row = lg + (NP - 1 + (size_t)i) * V;
        int32_t best = 0;
        for (size_t j = 1; j < V; j++)
            if (row[j] > row[best]) best = (int32_t)j;
        CHECK_MSG(best == r.tokens[i], "step %d: recompute argmax %d, generated %d", i, best, r.tokens[i]);
    }
    /* the text is the decoded tokens (invalid UTF-8 from a random model is
     * replaced, so compare only when the raw bytes are valid) */
    char *txt;
    size_t tl;
    CHECK(eng_tok_decode(eng_model_tok(m), r.tokens, 24, 1, &txt, &tl) == ENG_OK);
    CHECK(eng__utf8_valid(r.text, r.text_len));
    if (eng__utf8_valid(txt, tl)) CHECK(tl == r.text_len && memcmp(txt, r.text, tl) == 0);
    free(txt);
    free(lg);
    eng_gen_result_free(&r);
    eng_model_close(m);
}

static void test_seeded_sampling(void) {
    eng_model *m = open_named("tiny", 0);
    if (!m) return;
    eng_gen_params p = greedy(32);
    p.sampling.temperature = 1.5f;
    p.sampling.top_p = 0.95f;
    eng_gen_result a, b, c;
    char err[256];
    p.sampling.seed = 1234;
    CHECK(eng_generate(m, PROMPT, NP, &p, NULL, NULL, &a, err, sizeof err) == ENG_OK);
    CHECK(eng_generate(m, PROMPT, NP, &p, NULL, NULL, &b, err, sizeof err) == ENG_OK);
    CHECK(memcmp(a.tokens, b.tokens, 32 * sizeof(int32_t)) == 0);
    int differs = 0;
    for (uint64_t s = 1; s <= 4 && !differs; s++) {
        p.sampling.seed = 1234 + s;
        CHECK(eng_generate(m, PROMPT, NP, &p, NULL, NULL, &c, err, sizeof err) == ENG_OK);
        differs = memcmp(a.tokens, c.tokens, 32 * sizeof(int32_t)) != 0;
        eng_gen_result_free(&c);
    }
    CHECK(differs);
    /* top_k = 1 is greedy whatever the temperature */
    eng_gen_params g = greedy(32), k1 = greedy(32);
    k1.sampling.temperature = 2.0f;
    k1.sampling.top_k = 1;
    k1.sampling.seed = 99;
    eng_gen_result rg, rk;
    CHECK(eng_generate(m, PROMPT, NP, &g, NULL, NULL, &rg, err, sizeof err) == ENG_OK);
    CHECK(eng_generate(m, PROMPT, NP, &k1, NULL, NULL, &rk, err, sizeof err) == ENG_OK);
    CHECK(memcmp(rg.tokens, rk.tokens, 32 * sizeof(int32_t)) == 0);
    eng_gen_result_free(&a);
    eng_gen_result_free(&b);
    eng_gen_result_free(&rg);
    eng_gen_result_free(&rk);
    eng_model_close(m);
}

static void test_stop_strings_and_cancel(void) {
    eng_model *m = open_named("tiny", 0);
    if (!m) return;
    eng_gen_params p = greedy(40);
    p.sampling.temperature = 0.8f;
    p.sampling.seed = 7;
    eng_gen_result full, r;
    char err[256];
    CHECK(eng_generate(m, PROMPT, NP, &p, NULL, NULL, &full, err, sizeof err) == ENG_OK);
    CHECK(full.text_len >= 12);
    if (full.text_len >= 12) {
        char stop[4];
        memcpy(stop, full.text + full.text_len / 2, 3);
        stop[3] = 0;
        size_t at = (size_t)(strstr(full.text, stop) - full.text);
        const char *stops[] = {"never-appears-xyz", stop};
        p.stop = stops;
        p.n_stop = 2;
        collect c = {0};
        CHECK(eng_generate(m, PROMPT, NP, &p, collect_cb, &c, &r, err, sizeof err) == ENG_OK);
        CHECK_MSG(r.finish == ENG_FINISH_STOP && r.text_len == at && memcmp(r.text, full.text, at) == 0,
                  "stop '%s': finish %d, text %zu bytes, want %zu", stop, r.finish, r.text_len, at);
        CHECK(c.n == r.text_len && memcmp(c.text, r.text, c.n) == 0); /* streamed text never shows the stop */
        eng_gen_result_free(&r);
    }
    /* a callback that asks to stop cancels */
    p.n_stop = 0;
    collect c = {.stop_after = 5};
    CHECK(eng_generate(m, PROMPT, NP, &p, collect_cb, &c, &r, err, sizeof err) == ENG_OK);
    CHECK(r.finish == ENG_FINISH_CANCELLED && r.generated_tokens == 5);
    eng_gen_result_free(&r);
    eng_gen_result_free(&full);
    eng_model_close(m);
}

/* Stop strings spanning tokens are held back, EOS finishes with "stop". */
static void test_gen_state(void) {
    eng_model *m = open_named("tiny", 0);
    if (!m) return;
    const eng_tok *t = eng_model_tok(m);
    int32_t *ids;
    size_t n;
    const char *s = "Hello world, hello";
    CHECK(eng_tok_encode(t, s, strlen(s), 0, &ids, &n) == ENG_OK);
    eng_gen_params p = greedy(100);
    p.ignore_eos = 0;
    const char *stops[] = {"o w"};
    p.stop = stops;
    p.n_stop = 1;
    eng__gen *g = eng__gen_new(t, &p, eng_model_config(m)); /* the tiny model ends at id 0 */
    char out[64] = "";
    size_t on = 0;
    int fin = ENG_FINISH_NONE;
    for (size_t i = 0; i < n && fin == ENG_FINISH_NONE; i++) {
        const char *d;
        size_t dl;
        fin = eng__gen_push(g, ids[i], &d, &dl);
        memcpy(out + on, d, dl);
        on += dl;
        out[on] = 0;
        CHECK(strstr(out, "o w") == NULL && strstr(out, "o ") == NULL);
    }
    CHECK(fin == ENG_FINISH_STOP && strcmp(out, "Hell") == 0);
    eng__gen_free(g);
    p.n_stop = 0;
    g = eng__gen_new(t, &p, eng_model_config(m));
    const char *d;
    size_t dl;
    CHECK(eng__gen_push(g, ids[0], &d, &dl) == ENG_FINISH_NONE);
    CHECK(eng__gen_push(g, 0, &d, &dl) == ENG_FINISH_STOP);
    eng__gen_free(g);
    free(ids);
    eng_model_close(m);
}

static void test_request_errors(void) {
    eng_model *m = open_named("tiny", 0);
    if (!m) return;
    eng_gen_params p = greedy(8);
    eng_gen_result r;
    char err[256];
    CHECK(eng_generate(m, PROMPT, 0, &p, NULL, NULL, &r, err, sizeof err) == ENG_EEMPTY && strstr(err, "empty"));
    p.max_tokens = 0;
    CHECK(eng_generate(m, PROMPT, NP, &p, NULL, NULL, &r, err, sizeof err) == ENG_EMAXTOK && strstr(err, "max_tokens"));
    p.max_tokens = eng_model_config(m)->max_position;
    CHECK(eng_generate(m, PROMPT, NP, &p, NULL, NULL, &r, err, sizeof err) == ENG_ECONTEXT && strstr(err, "context"));
    p.max_tokens = 8;
    int32_t bad[] = {1, 2, 1 << 20};
    CHECK(eng_generate(m, bad, 3, &p, NULL, NULL, &r, err, sizeof err) == ENG_ETOKEN && strstr(err, "token 2"));
    p.sampling.top_p = 0;
    CHECK(eng_generate(m, PROMPT, NP, &p, NULL, NULL, &r, err, sizeof err) == ENG_ESAMPLING && strstr(err, "top_p"));
    p.sampling.top_p = 1;
    p.sampling.temperature = -1;
    CHECK(eng_generate(m, PROMPT, NP, &p, NULL, NULL, &r, err, sizeof err) == ENG_ESAMPLING && strstr(err, "temperature"));
    double lp[4];
    CHECK(eng_score(m, PROMPT, 1, lp, NULL, err, sizeof err) == ENG_EEMPTY);
    CHECK(strcmp(eng_strerror(ENG_ECONTEXT), eng_strerror(ENG_EEMPTY)) != 0);
    eng_model_close(m);
}

static void test_score_matches_logits(void) {
    eng_model *m = open_named("tiny", 0);
    if (!m) return;
    size_t V = (size_t)eng_model_config(m)->vocab_size;
    double lp[NP], ppl;
    char err[256];
    CHECK(eng_score(m, PROMPT, NP, lp, &ppl, err, sizeof err) == ENG_OK);
    float *lg = logits_of(m, PROMPT, NP);
    double sum = 0;
    for (size_t i = 0; i + 1 < NP; i++) {
        const float *row = lg + i * V;
        double mx = row[0], z = 0;
        for (size_t j = 1; j < V; j++) mx = fmax(mx, row[j]);
        for (size_t j = 0; j < V; j++) z += exp(row[j] - mx);
        double want = row[PROMPT[i + 1]] - mx - log(z);
        CHECK_MSG(fabs(lp[i] - want) < 1e-9 && lp[i] < 0, "pos %zu: %g vs %g", i, lp[i], want);
        sum += want;
    }
    CHECK(fabs(ppl - exp(-sum / (NP - 1))) < 1e-6 * ppl);
    free(lg);
    eng_model_close(m);
}

/* ---- model directory errors -------------------------------------------- */
static int copy_file(const char *from, const char *to, long limit) {
    FILE *a = fopen(from, "rb"), *b = fopen(to, "wb");
    if (!a || !b) { if (a) fclose(a); if (b) fclose(b); return -1; }
    char buf[65536];
    size_t r;
    long total = 0;
    while ((r = fread(buf, 1, sizeof buf, a)) > 0) {
        if (limit >= 0 && total + (long)r > limit) r = (size_t)(limit - total);
        fwrite(buf, 1, r, b);
        total += (long)r;
        if (limit >= 0 && total >= limit) break;
    }
    fclose(a);
    return fclose(b);
}

static void make_dir(const char *dst, const char *src_name, const char *skip) {
    const char *files[] = {"config.json", "model.safetensors", "tokenizer.json"};
    mkdir(dst, 0755);
    for (int i = 0; i < 3; i++) {
        char a[1024], b[1024];
        snprintf(a, sizeof a, "%s/%s/%s", t_arg, src_name, files[i]);
        snprintf(b, sizeof b, "%s/%s", dst, files[i]);
        unlink(b);
        if (!skip || strcmp(skip, files[i])) CHECK(copy_file(a, b, -1) == 0);
    }
}

static void replace_in_file(const char *path, const char *from, const char *to) {
    char *s;
    size_t n;
    CHECK(eng__read_file(path, &s, &n, NULL, 0) == ENG_OK);
    char *p = strstr(s, from);
    CHECK(p != NULL);
    if (!p) { free(s); return; }
    FILE *f = fopen(path, "w");
    fwrite(s, 1, (size_t)(p - s), f);
    fputs(to, f);
    fputs(p + strlen(from), f);
    fclose(f);
    free(s);
}

static int open_expect(const char *dir, int code, const char *n1, const char *n2) {
    eng_model *m = NULL;
    char err[512] = "";
    eng_options o = {.n_threads = 1};
    int rc = eng_model_open(&m, dir, &o, err, sizeof err);
    CHECK_MSG(rc == code && m == NULL && strstr(err, n1) && (!n2 || strstr(err, n2)), "%s: rc %d '%s' (want %s %s)",
              dir, rc, err, n1, n2 ? n2 : "");
    if (m) eng_model_close(m);
    return rc;
}

static void test_model_dir_errors(void) {
    char dir[] = "/tmp/kvmodelXXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    char path[1200];
    open_expect("/nonexistent-model-dir", ENG_EIO, "/nonexistent-model-dir/config.json", NULL);
    make_dir(dir, "tiny", "model.safetensors");
    open_expect(dir, ENG_EIO, "model.safetensors", NULL);
    make_dir(dir, "tiny", "tokenizer.json");
    open_expect(dir, ENG_EIO, "tokenizer.json", NULL);
    /* truncated weights */
    make_dir(dir, "tiny", NULL);
    snprintf(path, sizeof path, "%s/%s/model.safetensors", t_arg, "tiny");
    char dst[1200];
    snprintf(dst, sizeof dst, "%s/model.safetensors", dir);
    struct stat sb;
    stat(path, &sb);
    CHECK(copy_file(path, dst, sb.st_size / 2) == 0);
    open_expect(dir, ENG_EFORMAT, "model.safetensors", "truncated");
    /* a config that disagrees with the tensors */
    make_dir(dir, "tiny", NULL);
    snprintf(path, sizeof path, "%s/config.json", dir);
    replace_in_file(path, "\"intermediate_size\": 160", "\"intermediate_size\": 128");
    open_expect(dir, ENG_EFORMAT, "model.layers.0.mlp.gate_proj.weight", "expected [128, 64]");
    /* untied config but no lm_head in the file */
    make_dir(dir, "tiny", NULL);
    replace_in_file(path, "\"tie_word_embeddings\": true", "\"tie_word_embeddings\": false");
    open_expect(dir, ENG_EFORMAT, "lm_head.weight", "missing");
    /* an unknown dtype in the header */
    make_dir(dir, "tiny", NULL);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    {
        FILE *f = fopen(path, "r+b");
        char hdr[4096] = {0};
        CHECK(fread(hdr, 1, sizeof hdr - 1, f) > 0);
        char *p = strstr(hdr + 8, "\"F32\"");
        CHECK(p != NULL);
        if (p) { fseek(f, p - hdr, SEEK_SET); fwrite("\"I32\"", 1, 5, f); }
        fclose(f);
    }
    open_expect(dir, ENG_EUNSUPPORTED, "dtype I32", "model.safetensors");
    const char *files[] = {"config.json", "model.safetensors", "tokenizer.json"};
    for (int i = 0; i < 3; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        unlink(path);
    }
    rmdir(dir);
}

/* ---- sampler ------------------------------------------------------------ */
static void sample_set(const eng_sampling *p, const float *logits, int V, int draws, int *counts) {
    eng__sampler *s = eng__sampler_new(V);
    eng__rng rng;
    eng__rng_seed(&rng, p->seed);
    float *tmp = malloc((size_t)V * sizeof *tmp);
    memset(counts, 0, (size_t)V * sizeof *counts);
    for (int i = 0; i < draws; i++) {
        memcpy(tmp, logits, (size_t)V * sizeof *tmp);
        counts[eng__sample(s, p, &rng, tmp, NULL, 0)]++;
    }
    free(tmp);
    eng__sampler_free(s);
}

static void test_sampler_filters(void) {
    /* probabilities 1/15, 2/15, 4/15, 8/15 at temperature 1 */
    const float lg[4] = {0, logf(2), logf(4), logf(8)};
    int cnt[4];
    eng_sampling p;
    eng_sampling_default(&p);
    p.temperature = 1;
    p.seed = 42;
    sample_set(&p, lg, 4, 30000, cnt);
    for (int i = 0; i < 4; i++) {
        double want = 30000.0 * (1 << i) / 15;
        CHECK_MSG(fabs(cnt[i] - want) < 5 * sqrt(want), "token %d: %d draws, expected %.0f", i, cnt[i], want);
    }
    p.top_k = 2;
    sample_set(&p, lg, 4, 3000, cnt);
    CHECK(cnt[0] == 0 && cnt[1] == 0 && cnt[2] > 0 && cnt[3] > cnt[2]);
    p.top_k = 0;
    p.top_p = 0.5f; /* 8/15 already reaches 0.5 */
    sample_set(&p, lg, 4, 1000, cnt);
    CHECK(cnt[3] == 1000);
    p.top_p = 0.7f; /* needs 8/15 + 4/15 */
    sample_set(&p, lg, 4, 3000, cnt);
    CHECK(cnt[0] == 0 && cnt[1] == 0 && cnt[2] > 0);
    p.top_p = 1;
    p.min_p = 0.3f; /* cut at 0.3 * 8/15 = 0.16: keeps 8/15 and 4/15 */
    sample_set(&p, lg, 4, 3000, cnt);
    CHECK(cnt[0] == 0 && cnt[1] == 0 && cnt[2] > 0 && cnt[3] > 0);
    p.min_p = 0;
    p.temperature = 0.05f; /* nearly greedy */
    sample_set(&p, lg, 4, 1000, cnt);
    CHECK(cnt[3] == 1000);
}

/* A decode product of a loaded matrix (its shape known: the panels shared
 * out between the threads, eng__share, with stealing) gives the bits of the
 * same product as the pool's tasks, on 2 and 3 threads. */
static int same_shared_out(const eng__mat *m, int n, int in, int out, const float *X, const float *Y, float *xt,
                           eng__pool *pool) {
    if (n > DECODE_ROWS) return 1;
    eng__mat l = *m;
    l.out = out;
    l.in = in;
    float *Ys = malloc((size_t)n * out * sizeof *Ys);
    eng__pool *p3 = eng__pool_new(3);
    int same = Ys != NULL;
    for (int k = 0; k < 2 && Ys; k++) {
        eng__matmul(Ys, X, &l, n, in, out, xt, k ? p3 : pool);
        same &= !memcmp(Ys, Y, (size_t)n * out * sizeof *Ys);
    }
    eng__pool_free(p3);
    free(Ys);
    return same;
}

/* Each task of a job runs once, whatever the number of tasks, and with
 * workers both polling and asleep (after a pause longer than their
 * polling); eng__pool_each runs once on every thread; eng__share hands out
 * every panel exactly once among threads that take and steal at once. */
static int task_runs[4096];
static void count_task(void *ctx, int task, int thread) {
    (void)ctx;
    (void)thread;
    __atomic_add_fetch(&task_runs[task], 1, __ATOMIC_RELAXED);
}

typedef struct {
    eng__share sh;
    int *taken;
} share_probe;

static void take_panels(void *ctx, int t, int thread) {
    (void)thread;
    share_probe *sp = ctx;
    int a, b;
    while (eng__share_next(&sp->sh, t, &a, &b))
        for (int p = a; p < b; p++) __atomic_add_fetch(&sp->taken[p], 1, __ATOMIC_RELAXED);
}

static void test_pool_and_shares(void) {
    for (int threads = 1; threads <= 4; threads++) {
        eng__pool *pool = eng__pool_new(threads);
        CHECK(pool && eng__pool_threads(pool) == threads);
        int bad = 0;
        for (int job = 0; job < 300; job++) {
            int n = job % 7 == 0 ? 4096 : 1 + job % 37;
            memset(task_runs, 0, sizeof task_runs);
            if (job % 50 == 49) /* the workers go to sleep */
                for (double t0 = eng__now(); eng__now() - t0 < 2e-3;) {}
            if (job % 3 == 0) {
                eng__pool_each(pool, count_task, NULL);
                n = threads;
            } else {
                eng__pool_run(pool, n, count_task, NULL);
            }
            for (int t = 0; t < 4096; t++) bad += task_runs[t] != (t < n);
        }
        CHECK_MSG(bad == 0, "%d threads: %d tasks ran other than once", threads, bad);
        const int shapes[][2] = {{1, 64}, {17, 64}, {100, 32}, {2000, 32}}; /* panels, columns */
        for (size_t k = 0; k < sizeof shapes / sizeof *shapes; k++) {
            eng__mat m = {.out = shapes[k][0] * 16 - 3, .in = shapes[k][1]};
            int P = shapes[k][0];
            share_probe *sp = malloc(sizeof *sp);
            sp->taken = calloc((size_t)P, sizeof *sp->taken);
            eng__share_init(&sp->sh, &m, threads);
            int lo = 0;
            for (int t = 0; t < threads; t++) { /* the shares tile the panels */
                int p0, p1;
                eng__mat_share(&m, t, threads, &p0, &p1);
                CHECK(p0 == lo && p1 >= p0);
                lo = p1;
            }
            CHECK(lo == P);
            eng__pool_each(pool, take_panels, sp);
            int wrong = 0;
            for (int p = 0; p < P; p++) wrong += sp->taken[p] != 1;
            CHECK_MSG(wrong == 0, "%d threads, %d panels: %d not taken exactly once", threads, P, wrong);
            free(sp->taken);
            free(sp);
        }
        eng__pool_free(pool);
    }
}

/* The matmul kernel against a float64 product, for F32 and BF16 weights,
 * shapes with tails (in and out not multiples of 16), batches of 1 to 40
 * rows (several groups of rows), on every instruction set this CPU has.
 * Every row of a batch is bitwise equal to that row computed alone (a
 * token's logits do not depend on what else is in the batch), and the
 * AVX-512, AVX2 and scalar paths agree bitwise. */
static void test_matmul_kernel(void) {
    eng__pool *pool = eng__pool_new(2);
    const int shapes[][2] = {{37, 13}, {64, 64}, {576, 23}, {16, 4}, {1, 5}, {100, 129}, {200, 48}};
    int isas[3], n_isa = 0;
    isas[n_isa++] = ENG__ISA_SCALAR;
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isas[n_isa++] = ENG__ISA_AVX2;
    if (eng__cpu_avx512()) isas[n_isa++] = ENG__ISA_AVX512;
    CHECK_MSG(n_isa > 1, "only the scalar kernel runs on this CPU: the vector kernels are not tested");
#endif
    uint64_t x = 12345;
    for (size_t sh = 0; sh < sizeof shapes / sizeof *shapes; sh++) {
        int in = shapes[sh][0], out = shapes[sh][1], nmax = 40;
        size_t elems = eng__mat_elems(out, in);
        float *W = malloc((size_t)out * in * sizeof *W), *X = malloc((size_t)nmax * in * sizeof *X);
        float *Y = malloc((size_t)nmax * out * sizeof *Y), *Y1 = malloc((size_t)out * sizeof *Y1);
        float *Yref = malloc((size_t)nmax * out * sizeof *Yref), *xt = malloc((size_t)nmax * in * sizeof *xt);
        float *Wp = malloc(elems * sizeof *Wp);
        uint16_t *Wh = malloc(elems * sizeof *Wh);
        for (int i = 0; i < out * in; i++) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            W[i] = (float)((double)(x % 2001) / 1000.0 - 1.0);
        }
        for (int i = 0; i < nmax * in; i++) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            X[i] = (float)((double)(x % 2001) / 1000.0 - 1.0);
        }
        eng__mat packed = {.p = Wp};
        memcpy(Wp, W, (size_t)out * in * sizeof *W);
        CHECK(eng__mat_pack(&packed, out, in) == ENG_OK);
        for (size_t i = 0; i < elems; i++) { /* BF16 by truncation: any BF16 values will do */
            uint32_t u;
            memcpy(&u, &Wp[i], 4);
            Wh[i] = (uint16_t)(u >> 16);
        }
        float row[700];
        eng__mat_row(&packed, (size_t)out - 1, in, row); /* the layout keeps every row */
        CHECK(!memcmp(row, W + (size_t)(out - 1) * in, (size_t)in * sizeof *row));
        for (int bf = 0; bf < 2; bf++) {
            eng__mat m = {.p = bf ? (void *)Wh : (void *)Wp, .bf16 = bf};
            for (int n = 1; n <= nmax; n += n < 18 ? 1 : 11) {
                for (int ii = 0; ii < n_isa; ii++) {
                    eng__matmul_isa(isas[ii]);
                    eng__matmul(Y, X, &m, n, in, out, xt, pool);
                    if (ii == 0) memcpy(Yref, Y, (size_t)n * out * sizeof *Y);
                    CHECK_MSG(!memcmp(Yref, Y, (size_t)n * out * sizeof *Y), "in %d out %d n %d %s: ISA %d differs from scalar",
                              in, out, n, bf ? "BF16" : "F32", isas[ii]);
                    int same = 1;
                    for (int i = 0; i < n; i++) { /* bitwise the same as alone */
                        eng__matmul(Y1, X + (size_t)i * in, &m, 1, in, out, xt, pool);
                        same &= !memcmp(Y1, Y + (size_t)i * out, (size_t)out * sizeof *Y1);
                    }
                    CHECK_MSG(same, "in %d out %d n %d %s ISA %d: a row differs from the same row alone", in, out, n,
                              bf ? "BF16" : "F32", isas[ii]);
                    CHECK_MSG(same_shared_out(&m, n, in, out, X, Y, xt, pool), "in %d out %d n %d %s ISA %d: shared out differs",
                              in, out, n, bf ? "BF16" : "F32", isas[ii]);
                }
                double worst = 0;
                for (int i = 0; i < n; i++)
                    for (int o = 0; o < out; o++) {
                        double ref = 0, mag = 0;
                        float wr[700];
                        eng__mat_row(&m, (size_t)o, in, wr);
                        for (int k = 0; k < in; k++) {
                            double w = wr[k];
                            ref += w * X[(size_t)i * in + k];
                            mag += fabs(w * X[(size_t)i * in + k]);
                        }
                        double e = fabs(Y[(size_t)i * out + o] - ref) / (mag + 1e-30);
                        if (e > worst) worst = e;
                    }
                CHECK_MSG(worst < 1e-6, "in %d out %d n %d %s: relative error %.2e", in, out, n, bf ? "BF16" : "F32", worst);
            }
        }
        eng__matmul_isa(-1);
        free(W); free(X); free(Y); free(Y1); free(Yref); free(xt); free(Wp); free(Wh);
    }
    eng__pool_free(pool);
}

/* Q8_0 matrices (matmul_q8.c): the AVX2 and scalar paths bitwise equal,
 * every row of a batch bitwise equal to the row alone, and the result the
 * exact integer arithmetic of the quantized values: within float rounding of
 * the float64 sum over blocks of dw * dx * (sum of q_w * q_x), with x
 * quantized here as the engine quantizes it. */
static void test_matmul_q8(void) {
    { /* the vector quantizers are the scalar definition, bit for bit: ties to even, zeros, the clip */
        uint64_t r = 4242;
        int bad = 0;
        const int ns[] = {32, 256, 48, 40, 13, 1024};
        for (int it = 0; it < 400; it++) {
            int n = ns[it % 6];
            float x[1024];
            int8_t q1[1024], q2[1024];
            for (int i = 0; i < n; i++) {
                r ^= r << 13; r ^= r >> 7; r ^= r << 17;
                x[i] = it % 4 == 0 ? (float)((int)(r % 255) - 127) * 0.5f /* halves: ties */
                                   : (float)((double)(r % 20001) / 10000.0 - 1.0) * (float)(1 << (it % 9));
                if (r % 17 == 0) x[i] = it % 2 ? -0.0f : 0.0f;
            }
            if (it % 50 == 1) memset(x, 0, sizeof x); /* all zeros: d = 0 */
            float d1 = eng__quant8(x, n, q1), d2 = eng__quant8_ref(x, n, q2);
            bad += memcmp(&d1, &d2, sizeof d1) != 0 || memcmp(q1, q2, (size_t)n) != 0;
        }
        CHECK_MSG(bad == 0, "eng__quant8: %d of 400 blocks differ from the scalar definition", bad);
    }
    eng__pool *pool = eng__pool_new(2);
    const int shapes[][2] = {{32, 13}, {64, 64}, {96, 17}, {256, 40}, {160, 1}};
    int isas[3], n_isa = 0;
    isas[n_isa++] = ENG__ISA_SCALAR;
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isas[n_isa++] = ENG__ISA_AVX2;
#endif
    if (eng__cpu_vnni()) isas[n_isa++] = ENG__ISA_AVX512;
    uint64_t x = 777;
    for (size_t sh = 0; sh < sizeof shapes / sizeof *shapes; sh++) {
        int in = shapes[sh][0], out = shapes[sh][1], nmax = 21;
        float *Wp = malloc(eng__mat_elems(out, in) * sizeof *Wp), *X = malloc((size_t)nmax * in * sizeof *X);
        float *Y = malloc((size_t)nmax * out * sizeof *Y), *Y1 = malloc((size_t)out * sizeof *Y1);
        float *Yref = malloc((size_t)nmax * out * sizeof *Yref), *xt = malloc((size_t)nmax * in * sizeof *xt);
        for (int i = 0; i < out * in; i++) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            Wp[i] = (float)((double)(x % 2001) / 1000.0 - 1.0) * (i % 7 ? 1.0f : 3.0f);
        }
        for (int i = 0; i < nmax * in; i++) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            X[i] = (float)((double)(x % 2001) / 1000.0 - 1.0);
        }
        eng__weights w = {0};
        eng__mat m = {.p = Wp};
        CHECK(eng__mat_pack(&m, out, in) == ENG_OK && eng__mat_to_q8(&w, &m, out, in) == ENG_OK && m.q8);
        for (int n = 1; n <= nmax; n += n < 10 ? 1 : 11) {
            for (int ii = 0; ii < n_isa; ii++) {
                eng__matmul_isa(isas[ii]);
                eng__matmul(Y, X, &m, n, in, out, xt, pool);
                if (ii == 0) memcpy(Yref, Y, (size_t)n * out * sizeof *Y);
                CHECK_MSG(!memcmp(Yref, Y, (size_t)n * out * sizeof *Y), "Q8_0 in %d out %d n %d: ISA %d differs from scalar",
                          in, out, n, isas[ii]);
                int same = 1;
                for (int i = 0; i < n; i++) {
                    eng__matmul(Y1, X + (size_t)i * in, &m, 1, in, out, xt, pool);
                    same &= !memcmp(Y1, Y + (size_t)i * out, (size_t)out * sizeof *Y1);
                }
                CHECK_MSG(same, "Q8_0 in %d out %d n %d ISA %d: a row differs from the same row alone", in, out, n, isas[ii]);
                CHECK_MSG(same_shared_out(&m, n, in, out, X, Y, xt, pool), "Q8_0 in %d out %d n %d ISA %d: shared out differs",
                          in, out, n, isas[ii]);
            }
            double worst = 0;
            for (int i = 0; i < n; i++) {
                float xq[256], wr[256];
                const float *xi = X + (size_t)i * in;
                for (int b = 0; b < in / 32; b++) { /* x quantized as the engine does */
                    float amax = 0;
                    for (int k = 0; k < 32; k++) amax = fabsf(xi[b * 32 + k]) > amax ? fabsf(xi[b * 32 + k]) : amax;
                    float d = amax / 127.0f, id = d != 0 ? 1.0f / d : 0.0f;
                    for (int k = 0; k < 32; k++) xq[b * 32 + k] = d * rintf(xi[b * 32 + k] * id);
                }
                for (int o = 0; o < out; o++) {
                    eng__mat_row(&m, (size_t)o, in, wr);
                    double ref = 0, mag = 0;
                    for (int k = 0; k < in; k++) {
                        double wv = wr[k];
                        ref += wv * xq[k];
                        mag += fabs(wv * xq[k]);
                    }
                    double e = fabs(Y[(size_t)i * out + o] - ref) / (mag + 1e-30);
                    worst = e > worst ? e : worst;
                }
            }
            CHECK_MSG(worst < 1e-5, "Q8_0 in %d out %d n %d: relative error %.2e", in, out, n, worst);
        }
        eng__matmul_isa(-1);
        free(m.p); free(X); free(Y); free(Y1); free(Yref); free(xt);
    }
    eng__pool_free(pool);
}

/* K-quant matrices (matmul_k.c) from GGUF blocks: Q4_K ones of our quantizer
 * and of random bytes (every scale, min and value a file may hold), Q6_K ones
 * of random bytes, panels of both formats in one matrix. A row reads back as
 * the format's dequantized values exactly; the AVX2 and scalar paths agree
 * bitwise; every row of a batch equals the row alone; the result is the
 * float64 product of the dequantized values with x quantized per 256 as the
 * engine does, within float rounding. */
static uint64_t xs64(uint64_t *x) {
    *x ^= *x << 13; *x ^= *x >> 7; *x ^= *x << 17;
    return *x;
}

static void random_k_block(uint64_t *x, int type, uint8_t *b, const float *vals) {
    size_t n = type == GGML_Q4_K ? 144 : 210;
    for (size_t i = 0; i < n; i++) b[i] = (uint8_t)xs64(x);
    float dv = (float)(xs64(x) % 1000 + 1) * 1e-5f;
    uint16_t d = eng__f32_to_f16(dv), dm = eng__f32_to_f16(dv * 0.5f);
    if (type == GGML_Q4_K) {
        memcpy(b, &d, 2);
        memcpy(b + 2, &dm, 2);
        if (vals) eng__k4_quantize(vals, b);
    } else {
        memcpy(b + 208, &d, 2);
    }
}

static void test_matmul_k(void) {
    eng__pool *pool = eng__pool_new(2);
    const int shapes[][3] = {{256, 16, 0}, {512, 40, 1}, {256, 7, 2}, {768, 33, 1}}; /* in, out, kind of rows */
    int isas[3], n_isa = 0;
    isas[n_isa++] = ENG__ISA_SCALAR;
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isas[n_isa++] = ENG__ISA_AVX2;
#endif
    if (eng__cpu_vnni()) isas[n_isa++] = ENG__ISA_AVX512;
    uint64_t x = 4242;
    for (size_t sh = 0; sh < sizeof shapes / sizeof *shapes; sh++) {
        int in = shapes[sh][0], out = shapes[sh][1], kind = shapes[sh][2], nmax = 19, nsb = in / 256;
        size_t stride = (size_t)nsb * 210;
        uint8_t *raw = calloc((size_t)out, stride), types[64];
        float *Wf = malloc((size_t)out * in * sizeof *Wf), *X = malloc((size_t)nmax * in * sizeof *X);
        float *Y = malloc((size_t)nmax * out * sizeof *Y), *Y1 = malloc((size_t)out * sizeof *Y1);
        float *Yref = malloc((size_t)nmax * out * sizeof *Yref), *xt = malloc((size_t)nmax * in * sizeof *xt);
        float vals[256];
        for (int r = 0; r < out; r++) {
            /* kind 0: our quantizer's Q4_K; 1: panels alternate Q4_K (random) and Q6_K; 2: Q6_K */
            int t = kind == 0 ? GGML_Q4_K : kind == 2 ? GGML_Q6_K : (r / 16) % 2 ? GGML_Q6_K : GGML_Q4_K;
            types[r] = (uint8_t)t;
            for (int b = 0; b < nsb; b++) {
                for (int k = 0; k < 256; k++) vals[k] = (float)((double)(xs64(&x) % 2001) / 1000.0 - 1.0) * (k % 5 ? 1 : 4);
                uint8_t *blk = raw + (size_t)r * stride + (size_t)b * (t == GGML_Q4_K ? 144 : 210);
                random_k_block(&x, t, blk, kind == 0 ? vals : NULL);
                gguf_to_f32((uint32_t)t, blk, Wf + (size_t)r * in + b * 256, 256);
            }
        }
        for (int i = 0; i < nmax * in; i++) X[i] = (float)((double)(xs64(&x) % 2001) / 1000.0 - 1.0);
        for (int k = 0; k < in; k++) X[k] = 1.0f; /* row 0: every activation the largest quant */
        memset(X + in, 0, (size_t)in * sizeof *X); /* row 1: zero */
        eng__weights w = {0};
        eng__mat m = {.p = malloc(eng__mat_elems(out, in) * sizeof(float))};
        if (out > 16) { /* a panel of two formats is refused, and nothing changes */
            uint8_t bad[64];
            memcpy(bad, types, sizeof bad);
            bad[17] = bad[17] == GGML_Q4_K ? GGML_Q6_K : GGML_Q4_K;
            CHECK(eng__mat_to_k(&w, &m, out, in, raw, stride, bad) == ENG_EFORMAT && !m.kq);
        }
        CHECK(eng__mat_to_k(&w, &m, out, in - 32, raw, stride, types) == ENG_EFORMAT && !m.kq);
        CHECK(eng__mat_to_k(&w, &m, out, in, raw, stride, types) == ENG_OK && m.kq);
        int rows_same = 1;
        for (int r = 0; r < out; r++) {
            float row[768];
            eng__mat_row(&m, (size_t)r, in, row);
            rows_same &= !memcmp(row, Wf + (size_t)r * in, (size_t)in * sizeof *row);
        }
        CHECK_MSG(rows_same, "K-quant in %d out %d: a row does not read back as its dequantized values", in, out);
        for (int n = 1; n <= nmax; n += n < 10 ? 1 : 9) {
            for (int ii = 0; ii < n_isa; ii++) {
                eng__matmul_isa(isas[ii]);
                eng__matmul(Y, X, &m, n, in, out, xt, pool);
                if (ii == 0) memcpy(Yref, Y, (size_t)n * out * sizeof *Y);
                CHECK_MSG(!memcmp(Yref, Y, (size_t)n * out * sizeof *Y), "K in %d out %d n %d: ISA %d differs from scalar",
                          in, out, n, isas[ii]);
                int same = 1;
                for (int i = 0; i < n; i++) {
                    eng__matmul(Y1, X + (size_t)i * in, &m, 1, in, out, xt, pool);
                    same &= !memcmp(Y1, Y + (size_t)i * out, (size_t)out * sizeof *Y1);
                }
                CHECK_MSG(same, "K in %d out %d n %d ISA %d: a row differs from the same row alone", in, out, n, isas[ii]);
                CHECK_MSG(same_shared_out(&m, n, in, out, X, Y, xt, pool), "K in %d out %d n %d ISA %d: shared out differs",
                          in, out, n, isas[ii]);
            }
            double worst = 0;
            for (int i = 0; i < n; i++) {
                float xq[768];
                const float *xi = X + (size_t)i * in;
                for (int b = 0; b < nsb; b++) { /* x quantized as the engine does, per 256 */
                    float amax = 0;
                    for (int k = 0; k < 256; k++) amax = fabsf(xi[b * 256 + k]) > amax ? fabsf(xi[b * 256 + k]) : amax;
                    float d = amax / 127.0f, id = d != 0 ? 1.0f / d : 0.0f;
                    for (int k = 0; k < 256; k++) xq[b * 256 + k] = d * rintf(xi[b * 256 + k] * id);
                }
                for (int o = 0; o < out; o++) {
                    double ref = 0, mag = 0;
                    for (int k = 0; k < in; k++) {
                        double wv = Wf[(size_t)o * in + k];
                        ref += wv * xq[k];
                        mag += fabs(wv * xq[k]);
                    }
                    double e = fabs(Y[(size_t)i * out + o] - ref) / (mag + 1e-30);
                    worst = e > worst ? e : worst;
                }
            }
            CHECK_MSG(worst < 1e-5, "K in %d out %d n %d: relative error %.2e", in, out, n, worst);
        }
        eng__matmul_isa(-1);
        eng__mat_free(&m);
        free(raw); free(Wf); free(X); free(Y); free(Y1); free(Yref); free(xt);
    }
    eng__pool_free(pool);
}

static void test_sampler_repetition_penalty(void) {
    eng__sampler *s = eng__sampler_new(3);
    eng__rng rng;
    eng__rng_seed(&rng, 1);
    eng_sampling p;
    eng_sampling_default(&p);
    p.repeat_penalty = 1.5f;
    int32_t hist[] = {0, 0, 2};
    float a[3] = {2.0f, 1.9f, -5};   /* 2 / 1.5 = 1.33 < 1.9 */
    CHECK(eng__sample(s, &p, &rng, a, hist, 3) == 1);
    CHECK(fabsf(a[0] - 2.0f / 1.5f) < 1e-6f && a[2] == -7.5f); /* applied once per distinct token */
    float b[3] = {-1.0f, -1.2f, -9};  /* -1 * 1.5 = -1.5 < -1.2 */
    CHECK(eng__sample(s, &p, &rng, b, hist, 1) == 1);
    p.repeat_last_n = 1;              /* only token 2 is in the window */
    float c[3] = {2.0f, 1.9f, -5};
    CHECK(eng__sample(s, &p, &rng, c, hist, 3) == 0);
    eng__sampler_free(s);
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: test_engine MODELS_DIR\n"); return 2; }
    static const test_case tests[] = {
        {"weights_f32_bf16_f16_sharded_untied", test_weight_formats},
        {"pool_tasks_once_and_shares_stolen_once", test_pool_and_shares},
        {"matmul_kernel_tails_and_batch_invariance", test_matmul_kernel},
        {"matmul_q8_isa_and_batch_invariance", test_matmul_q8},
        {"matmul_k_isa_and_batch_invariance", test_matmul_k},
        {"chunked_prefill_matches_single_pass", test_chunked_prefill},
        {"kv_decode_matches_full_recompute", test_kv_decode_matches_recompute},
        {"seeded_sampling_reproducible", test_seeded_sampling},
        {"stop_strings_and_cancel", test_stop_strings_and_cancel},
        {"gen_state_holdback_and_eos", test_gen_state},
        {"request_errors_distinct", test_request_errors},
        {"score_matches_log_softmax", test_score_matches_logits},
        {"model_dir_errors_named", test_model_dir_errors},
        {"sampler_filters", test_sampler_filters},
        {"sampler_repetition_penalty", test_sampler_repetition_penalty},
        {0, 0}};
    return run_tests(tests, argc, argv);
}
