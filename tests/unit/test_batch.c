/* test_batch.c — the block-pool batch engine on the tiny model (argv[1] =
 * models root): agents, continuous batching, prefix sharing, copy-on-write,
 * exhaustion and preemption, cancellation, export/import, threads. The
 * reference for "alone" is the single-sequence runtime (eng_generate). */
#include "internal.h"
#include "test.h"

#include <math.h>
#include <pthread.h>

#define MAXR 400

typedef struct {
    uint64_t id;
    int done, finish, error, n_tok, token_events;
    int32_t tok[256];
    char text[1024];
    size_t text_n, streamed_n;
    char streamed[1024];
    eng_usage usage;
} result;

typedef struct {
    result r[MAXR];
    int n;
    int max_concurrent_tokens;
} results;

static result *find_r(results *rs, uint64_t id) {
    for (int i = 0; i < rs->n; i++)
        if (rs->r[i].id == id) return &rs->r[i];
    return NULL;
}

static void on_event(void *ud, const eng_event *ev) {
    results *rs = ud;
    result *r = find_r(rs, ev->id);
    if (!r) return;
    if (ev->kind == ENG_EV_TOKEN) {
        r->token_events++;
        if (r->streamed_n + ev->text_len < sizeof r->streamed) {
            memcpy(r->streamed + r->streamed_n, ev->text, ev->text_len);
            r->streamed_n += ev->text_len;
        }
    } else {
        r->done++;
        r->finish = ev->finish;
        r->error = ev->error;
        r->usage = ev->usage;
        r->n_tok = (int)ev->n_tokens;
        memcpy(r->tok, ev->tokens, (ev->n_tokens < 256 ? ev->n_tokens : 256) * sizeof(int32_t));
        r->text_n = ev->text_len < sizeof r->text ? ev->text_len : sizeof r->text - 1;
        memcpy(r->text, ev->text, r->text_n);
    }
}

static int g_kv_f16; /* open models with an F16 KV cache */
static const char *g_model = "tiny"; /* the model of the tests run again for each architecture */

static eng_model *model(const char *name) {
    char dir[1024], err[512];
    snprintf(dir, sizeof dir, "%s/%s", t_arg, name);
    eng_options o = {.n_threads = 2, .kv_f16 = g_kv_f16};
    eng_model *m = NULL;
    CHECK_MSG(eng_model_open(&m, dir, &o, err, sizeof err) == ENG_OK, "%s", err);
    return m;
}

static eng_engine *engine(eng_model *m, int blocks, int step_tokens, int max_queue) {
    eng_engine_options o = {.n_blocks = blocks, .block_tokens = 16, .max_step_tokens = step_tokens,
                            .max_running = 16, .max_queue = max_queue};
    eng_engine *e = NULL;
    char err[256];
    CHECK_MSG(eng_engine_open(&e, m, &o, err, sizeof err) == ENG_OK, "%s", err);
    return e;
}

static eng_request req_ids(const int32_t *ids, size_t n, int max_tokens) {
    eng_request r;
    memset(&r, 0, sizeof r);
    r.ids = ids;
    r.n_ids = n;
    eng_sampling_default(&r.params.sampling);
    r.params.max_tokens = max_tokens;
    r.params.ignore_eos = 1;
    return r;
}

static uint64_t submit(eng_engine *e, results *rs, const eng_request *r) {
    uint64_t id = 0;
    char err[256];
    int rc = eng_submit(e, r, &id, err, sizeof err);
    CHECK_MSG(rc == ENG_OK, "submit: %s", err);
    if (rc == ENG_OK && rs->n < MAXR) {
        memset(&rs->r[rs->n], 0, sizeof rs->r[0]);
        rs->r[rs->n++].id = id;
    }
    return id;
}

static int run_all(eng_engine *e, results *rs) {
    int steps = 0, t;
    while ((t = eng_step(e, on_event, rs)) > 0 && steps < 100000) {
        steps++;
        if (t > rs->max_concurrent_tokens) rs->max_concurrent_tokens = t;
    }
    eng_step(e, on_event, rs); /* completions of cancels */
    return steps;
}

/* The single-sequence runtime's tokens for the same request. */
static void alone(eng_model *m, const int32_t *ids, size_t n, const eng_sampling *sp, int max_tokens, int32_t *out) {
    eng_gen_params p = {0};
    p.sampling = *sp;
    p.max_tokens = max_tokens;
    p.ignore_eos = 1;
    eng_gen_result r;
    char err[256];
    CHECK_MSG(eng_generate(m, ids, n, &p, NULL, NULL, &r, err, sizeof err) == ENG_OK, "%s", err);
    memcpy(out, r.tokens, (size_t)max_tokens * sizeof *out);
    eng_gen_result_free(&r);
}

static void rand_ids(int32_t *ids, int n, uint64_t seed, int vocab) {
    eng__rng r;
    eng__rng_seed(&r, seed);
    for (int i = 0; i < n; i++) ids[i] = 3 + (int32_t)(eng__rng_uniform(&r) * (vocab - 3));
}

static int free_blocks(eng_engine *e) {
    eng_stats s;
    eng_stats_get(e, &s);
    return s.blocks_free;
}

/* ---- tests -------------------------------------------------------------- */

/* The pool from a memory budget: as many blocks as fit (tiny: 2 layers x 16
 * tokens x 2 x 32 = 8 KiB a block in F32), a fraction of physical memory,
 * and n_blocks winning over a budget. */
static void test_pool_from_memory_budget(void) {
    eng_model *m = model("tiny");
    const eng_config *c = eng_model_config(m);
    double block = 2.0 * c->n_layers * 16 * c->n_kv_heads * c->head_dim * (g_kv_f16 ? 2 : 4);
    struct { int n_blocks; double mib; int want; } cases[] = {
        {0, 1, (int)(1048576 / block)}, {0, 3.5, (int)(3.5 * 1048576 / block)}, {7, 100, 7}, {0, 0.00001, -1}};
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        eng_engine_options o = {.n_blocks = cases[i].n_blocks, .kv_memory_mib = cases[i].mib, .block_tokens = 16};
        eng_engine *e = NULL;
        char err[256];
        CHECK_MSG(eng_engine_open(&e, m, &o, err, sizeof err) == ENG_OK, "%s", err);
        eng_stats st;
        eng_stats_get(e, &st);
        if (cases[i].want > 0) CHECK_MSG(st.blocks_total == cases[i].want, "case %zu: %d blocks", i, st.blocks_total);
        else CHECK_MSG(st.blocks_total >= 2, "a fraction of memory: %d blocks", st.blocks_total);
        eng_engine_close(e);
    }
    eng_model_close(m);
}

static void test_single_agent_fresh_and_resume(void) {
    eng_model *m = model(g_model);
    eng_engine *e = m ? engine(m, 64, 512, 64) : NULL;
    if (!e) { eng_model_close(m); return; }
    int32_t p1[20], p2[7], hist[20 + 16 + 7];
    rand_ids(p1, 20, 1, 1024);
    rand_ids(p2, 7, 2, 1024);
    results rs = {0};
    eng_request r = req_ids(p1, 20, 16);
    r.tenant = "t1";
    r.agent_id = "a1";
    submit(e, &rs, &r);
    run_all(e, &rs);
    result *a = &rs.r[0];
    CHECK(a->done == 1 && a->finish == ENG_FINISH_LENGTH && a->n_tok == 16);
    CHECK(a->usage.prompt_tokens == 20 && a->usage.cached_tokens == 0 && a->usage.generated_tokens == 16);
    CHECK(a->streamed_n == a->text_n && memcmp(a->streamed, a->text, a->text_n) == 0 && a->token_events == 16);
    eng_agent_info info;
    CHECK(eng_agent_get(e, "t1", "a1", &info) == ENG_OK && info.n_tokens == 36 && info.n_cached == 35 && !info.busy);
    CHECK(eng_agent_get(e, "t2", "a1", &info) == ENG_ENOTFOUND); /* tenants do not see each other */

    /* second turn: only the new tokens (plus the last generated one) are prefilled */
    r = req_ids(p2, 7, 12);
    r.tenant = "t1";
    r.agent_id = "a1";
    submit(e, &rs, &r);
    int computed = 0, t;
    while ((t = eng_step(e, on_event, &rs)) > 0) computed += t;
    result *b = &rs.r[1];
    CHECK(b->done == 1 && b->usage.prompt_tokens == 43 && b->usage.cached_tokens == 35);
    CHECK_MSG(computed == (7 + 1) + (12 - 1), "computed %d tokens", computed);
    /* identical to running the whole history fresh */
    memcpy(hist, p1, sizeof p1);
    memcpy(hist + 20, a->tok, 16 * sizeof(int32_t));
    memcpy(hist + 36, p2, sizeof p2);
    int32_t want[12];
    eng_sampling sp;
    eng_sampling_default(&sp);
    alone(m, hist, 43, &sp, 12, want);
    CHECK(memcmp(want, b->tok, sizeof want) == 0);
    /* reset starts fresh */
    r = req_ids(p2, 7, 4);
    r.tenant = "t1";
    r.agent_id = "a1";
    r.reset = 1;
    submit(e, &rs, &r);
    run_all(e, &rs);
    CHECK(rs.r[2].usage.prompt_tokens == 7 && rs.r[2].usage.cached_tokens == 0);
    CHECK(eng_agent_drop(e, "t1", "a1") == ENG_OK && eng_agent_drop(e, "t1", "a1") == ENG_ENOTFOUND);
    CHECK(free_blocks(e) == 64);
    eng_engine_close(e);
    eng_model_close(m);
}

/* Three agents of different prompt lengths in one batch, and a mix of greedy
 * and seeded requests: each output equals the request run alone. */
static void test_batch_equals_alone(void) {
    eng_model *m = model(g_model);
    eng_engine *e = m ? engine(m, 256, 64, 64) : NULL;
    if (!e) { eng_model_close(m); return; }
    enum { N = 8 };
    int lens[N] = {5, 40, 100, 1, 17, 64, 33, 130};
    int32_t prompts[N][130];
    eng_sampling sps[N];
    results rs = {0};
    for (int i = 0; i < N; i++) {
        rand_ids(prompts[i], lens[i], 100 + (uint64_t)i, 1024);
        eng_sampling_default(&sps[i]);
        if (i % 2) { sps[i].temperature = 1.3f; sps[i].top_k = 50; sps[i].top_p = 0.9f; sps[i].seed = 7 * (uint64_t)i; }
        eng_request r = req_ids(prompts[i], (size_t)lens[i], 24);
        r.params.sampling = sps[i];
        char name[16];
        snprintf(name, sizeof name, "agent%d", i);
        if (i < 3) { r.agent_id = name; r.tenant = "t"; }
        submit(e, &rs, &r);
    }
    run_all(e, &rs);
    CHECK(rs.max_concurrent_tokens > 8); /* several sequences really shared steps */
    for (int i = 0; i < N; i++) {
        int32_t want[24];
        alone(m, prompts[i], (size_t)lens[i], &sps[i], 24, want);
        CHECK_MSG(rs.r[i].done == 1 && rs.r[i].n_tok == 24 && memcmp(want, rs.r[i].tok, sizeof want) == 0,
                  "request %d (prompt %d, %s) differs from alone", i, lens[i], i % 2 ? "seeded" : "greedy");
    }
    eng_agent_info list[8];
    CHECK(eng_agent_list(e, "t", list, 8) == 3 && eng_agent_list(e, "other", list, 8) == 0);
    eng_engine_close(e);
    eng_model_close(m);
}

static void test_ten_then_drop_frees_all(void) {
    eng_model *m = model("tiny");
    eng_engine *e = m ? engine(m, 128, 512, 64) : NULL;
    if (!e) { eng_model_close(m); return; }
    int initial = free_blocks(e);
    results rs = {0};
    int32_t p[30];
    for (int i = 0; i < 10; i++) {
        rand_ids(p, 30, 500 + (uint64_t)i, 1024);
        eng_request r = req_ids(p, 30, 10);
        char name[16];
        snprintf(name, sizeof name, "g%d", i);
        r.agent_id = name;
        submit(e, &rs, &r);
    }
    run_all(e, &rs);
    CHECK(free_blocks(e) < initial);
    for (int i = 0; i < 10; i++) {
        char name[16];
        snprintf(name, sizeof name, "g%d", i);
        CHECK(eng_agent_drop(e, NULL, name) == ENG_OK);
    }
    eng_stats st;
    eng_stats_get(e, &st);
    CHECK(st.blocks_free == initial && st.blocks_used == 0 && st.running == 0 && st.agents == 0);
    eng_engine_close(e);
    eng_model_close(m);
}

static void test_request_errors(void) {
    eng_model *m = model("tiny");
    eng_engine *e = m ? engine(m, 8, 64, 4) : NULL;
    if (!e) { eng_model_close(m); return; }
    int32_t p[300];
    rand_ids(p, 300, 3, 1024);
    uint64_t id;
    char err[256];
    eng_request r = req_ids(p, 0, 4);
    CHECK(eng_submit(e, &r, &id, err, sizeof err) == ENG_EEMPTY && strstr(err, "empty"));
    r = req_ids(p, 4, 0);
    CHECK(eng_submit(e, &r, &id, err, sizeof err) == ENG_EMAXTOK && strstr(err, "max_tokens"));
    r = req_ids(p, 300, 300);
    CHECK(eng_submit(e, &r, &id, err, sizeof err) == ENG_ECONTEXT && strstr(err, "context"));
    r = req_ids(p, 100, 100); /* 200 tokens > 8 blocks of 16 */
    CHECK(eng_submit(e, &r, &id, err, sizeof err) == ENG_EPOOL && strstr(err, "blocks"));
    r = req_ids(p, 4, 4);
    r.reset = 1;
    CHECK(eng_submit(e, &r, &id, err, sizeof err) == ENG_EINVAL && strstr(err, "agent_id"));
    int32_t bad[] = {1, 5000};
    r = req_ids(bad, 2, 4);
    CHECK(eng_submit(e, &r, &id, err, sizeof err) == ENG_ETOKEN);
    r = req_ids(p, 4, 4);
    r.params.sampling.top_k = -1;
    CHECK(eng_submit(e, &r, &id, err, sizeof err) == ENG_ESAMPLING && strstr(err, "top_k"));
    r = req_ids(NULL, 0, 4);
    r.text = "\xff\xfe";
    r.text_len = 2;
    CHECK(eng_submit(e, &r, &id, err, sizeof err) == ENG_EUTF8);
    /* the queue bound */
    r = req_ids(p, 4, 4);
    for (int i = 0; i < 4; i++) CHECK(eng_submit(e, &r, &id, err, sizeof err) == ENG_OK);
    CHECK(eng_submit(e, &r, &id, err, sizeof err) == ENG_EQUEUE && strstr(err, "queue"));
    CHECK(eng_cancel(e, 987654) == ENG_ENOTFOUND);
    results rs = {0};
    run_all(e, &rs);
    CHECK(free_blocks(e) == 8);
    eng_engine_close(e);
    eng_model_close(m);
}

/* A pool too small for everything at once: sequences are preempted and
 * recomputed, every output is still exact, nothing deadlocks or leaks. */
static void test_exhaustion_preempts(void) {
    eng_model *m = model("tiny");
    eng_engine *e = m ? engine(m, 10, 64, 64) : NULL;
    if (!e) { eng_model_close(m); return; }
    enum { N = 6 };
    int32_t p[N][60];
    results rs = {0};
    eng_sampling sp;
    eng_sampling_default(&sp);
    for (int i = 0; i < N; i++) {
        rand_ids(p[i], 60, 900 + (uint64_t)i, 1024);
        eng_request r = req_ids(p[i], 60, 40); /* 100 tokens = 7 blocks each, pool 10 */
        submit(e, &rs, &r);
    }
    run_all(e, &rs);
    eng_stats st;
    eng_stats_get(e, &st);
    CHECK(st.preemptions > 0);
    CHECK(st.blocks_free == 10 && st.running == 0 && st.waiting == 0);
    for (int i = 0; i < N; i++) {
        int32_t want[40];
        alone(m, p[i], 60, &sp, 40, want);
        CHECK_MSG(rs.r[i].done == 1 && rs.r[i].finish == ENG_FINISH_LENGTH && memcmp(want, rs.r[i].tok, sizeof want) == 0,
                  "request %d", i);
    }
    eng_engine_close(e);
    eng_model_close(m);
}

/* Shared prefixes: identical outputs, fewer blocks. */
static void test_prefix_sharing(void) {
    eng_model *m = model("tiny");
    eng_engine *e = m ? engine(m, 128, 512, 64) : NULL;
    if (!e) { eng_model_close(m); return; }
    enum { N = 4 };
    int32_t p[N][80];
    rand_ids(p[0], 80, 77, 1024);
    for (int i = 1; i < N; i++) {
        memcpy(p[i], p[0], 64 * sizeof(int32_t)); /* 4 full blocks in common */
        rand_ids(p[i] + 64, 16, 78 + (uint64_t)i, 1024);
    }
    results rs = {0};
    eng_request r = req_ids(p[0], 80, 8);
    submit(e, &rs, &r);
    run_all(e, &rs);
    CHECK(rs.r[0].usage.cached_tokens == 0);
    for (int i = 1; i < N; i++) {
        r = req_ids(p[i], 80, 8);
        submit(e, &rs, &r);
    }
    eng_step(e, on_event, &rs); /* all three prefill in one step */
    eng_stats st;
    eng_stats_get(e, &st);
    /* 80 tokens = 5 blocks each: 15 without sharing, 4 shared + 3 with it */
    CHECK_MSG(st.blocks_shared == 4 && st.blocks_used == 4 + 3 * 1, "shared %d used %d", st.blocks_shared,
              st.blocks_used);
    run_all(e, &rs);
    eng_sampling sp;
    eng_sampling_default(&sp);
    for (int i = 0; i < N; i++) {
        int32_t want[8];
        alone(m, p[i], 80, &sp, 8, want);
        CHECK_MSG(memcmp(want, rs.r[i].tok, sizeof want) == 0, "request %d", i);
        if (i) CHECK(rs.r[i].usage.cached_tokens == 64 && rs.r[i].usage.prompt_tokens == 80);
    }
    eng_stats_get(e, &st);
    CHECK(st.prefix_hit_tokens == 3 * 64);
    CHECK(st.blocks_used == 0);
    eng_engine_close(e);
    eng_model_close(m);
}

/* Two sequences prefill the same first block at once (the second block is
 * a duplicate, left unregistered); that block is later reused for another
 * prefix. A chain registered behind the duplicate must never be matched:
 * the output equals the single-sequence runtime. (A regression: the stale
 * hash of the duplicate once served KV computed after another prefix.) */
static void test_prefix_duplicates_never_serve_stale_kv(void) {
    eng_model *m = model("tiny");
    eng_engine *e = m ? engine(m, 5, 512, 64) : NULL;
    if (!e) { eng_model_close(m); return; }
    int32_t Y0[16], T[16], X0[16], Z[32], A[17], X[32], S5[33];
    int32_t *all[] = {Y0, T, X0, Z};
    int lens[] = {16, 16, 16, 32};
    for (int a = 0; a < 4; a++) rand_ids(all[a], lens[a], 200 + (uint64_t)a, 1000);
    memcpy(A, Y0, sizeof Y0);
    A[16] = 7;
    memcpy(X, X0, sizeof X0);
    memcpy(X + 16, T, sizeof T);
    memcpy(S5, Y0, sizeof Y0);
    memcpy(S5 + 16, T, sizeof T);
    S5[32] = 9;
    results rs = {0};
    eng_request r = req_ids(A, 17, 1);
    submit(e, &rs, &r);
    run_all(e, &rs);
    r = req_ids(Z, 32, 1);
    submit(e, &rs, &r);
    run_all(e, &rs);
    r = req_ids(X, 32, 1);
    submit(e, &rs, &r);
    submit(e, &rs, &r);
    run_all(e, &rs);
    r = req_ids(A, 17, 1);
    submit(e, &rs, &r);
    run_all(e, &rs);
    r = req_ids(S5, 33, 8);
    submit(e, &rs, &r);
    run_all(e, &rs);
    int32_t want[8];
    eng_sampling sp;
    eng_sampling_default(&sp);
    alone(m, S5, 33, &sp, 8, want);
    result *last = &rs.r[rs.n - 1];
    CHECK_MSG(last->done && memcmp(want, last->tok, sizeof want) == 0, "cached %d: output differs from alone",
              last->usage.cached_tokens);
    eng_engine_close(e);
    eng_model_close(m);
}

/* A forked agent shares every block, the partial last one too; each branch
 * copies it before writing and both continue exactly. */
static void test_fork_copy_on_write(void) {
    eng_model *m = model("tiny");
    eng_engine *e = m ? engine(m, 64, 512, 64) : NULL;
    if (!e) { eng_model_close(m); return; }
    int32_t p[21], qa[5], qb[9];
    rand_ids(p, 21, 31, 1024);
    rand_ids(qa, 5, 32, 1024);
    rand_ids(qb, 9, 33, 1024);
    results rs = {0};
    eng_request r = req_ids(p, 21, 6); /* 27 tokens: block 1 partly filled */
    r.agent_id = "root";
    submit(e, &rs, &r);
    run_all(e, &rs);
    CHECK(eng_agent_fork(e, NULL, "root", "branch") == ENG_OK);
    CHECK(eng_agent_fork(e, NULL, "root", "branch") == ENG_EEXIST);
    CHECK(eng_agent_fork(e, NULL, "nope", "x") == ENG_ENOTFOUND);
    eng_stats st;
    eng_stats_get(e, &st);
    CHECK(st.blocks_shared == 2);
    r = req_ids(qa, 5, 6);
    r.agent_id = "root";
    submit(e, &rs, &r);
    r = req_ids(qb, 9, 6);
    r.agent_id = "branch";
    submit(e, &rs, &r);
    run_all(e, &rs);
    int32_t ha[27 + 5], hb[27 + 9], want[6];
    memcpy(ha, p, sizeof p);
    memcpy(ha + 21, rs.r[0].tok, 6 * sizeof(int32_t));
    memcpy(hb, ha, 27 * sizeof(int32_t));
    memcpy(ha + 27, qa, sizeof qa);
    memcpy(hb + 27, qb, sizeof qb);
    eng_sampling sp;
    eng_sampling_default(&sp);
    alone(m, ha, 32, &sp, 6, want);
    CHECK(memcmp(want, rs.r[1].tok, sizeof want) == 0);
    alone(m, hb, 36, &sp, 6, want);
    CHECK(memcmp(want, rs.r[2].tok, sizeof want) == 0);
    CHECK(rs.r[1].usage.cached_tokens == 26 && rs.r[2].usage.cached_tokens == 26);
    eng_stats_get(e, &st);
    CHECK(st.blocks_shared == 1); /* block 0 still shared; block 1 was copied */
    CHECK(eng_agent_drop(e, NULL, "root") == ENG_OK && eng_agent_drop(e, NULL, "branch") == ENG_OK);
    CHECK(free_blocks(e) == 64);
    eng_engine_close(e);
    eng_model_close(m);
}

/* Hundreds of cancels at random moments: queued, prefilling, decoding. */
static void test_random_cancels_leak_nothing(void) {
    eng_model *m = model("tiny");
    eng_engine *e = m ? engine(m, 96, 48, 512) : NULL;
    if (!e) { eng_model_close(m); return; }
    static results rs;
    memset(&rs, 0, sizeof rs);
    eng__rng rng;
    eng__rng_seed(&rng, 4242);
    int32_t p[120];
    uint64_t ids[400];
    int n = 0, cancelled = 0;
    for (int round = 0; round < 400; round++) {
        int len = 1 + (int)(eng__rng_uniform(&rng) * 119);
        rand_ids(p, len, (uint64_t)round, 1024);
        eng_request r = req_ids(p, (size_t)len, 1 + (int)(eng__rng_uniform(&rng) * 30));
        char name[16];
        snprintf(name, sizeof name, "ag%d", round % 7);
        if (round % 3 == 0) r.agent_id = name;
        if (round % 3 == 0) r.reset = 1; /* keep agent histories short */
        ids[n++] = submit(e, &rs, &r);
        int steps = (int)(eng__rng_uniform(&rng) * 3);
        for (int k = 0; k < steps; k++) eng_step(e, on_event, &rs);
        if (eng__rng_uniform(&rng) < 0.6) {
            uint64_t victim = ids[(int)(eng__rng_uniform(&rng) * n)];
            if (eng_cancel(e, victim) == ENG_OK) cancelled++;
        }
    }
    run_all(e, &rs);
    int n_cancelled = 0, all_done = 1;
    for (int i = 0; i < rs.n; i++) {
        all_done &= rs.r[i].done == 1;
        n_cancelled += rs.r[i].finish == ENG_FINISH_CANCELLED;
    }
    CHECK(all_done);
    CHECK_MSG(n_cancelled == cancelled && cancelled > 50, "cancelled %d, reported %d", cancelled, n_cancelled);
    for (int i = 0; i < 7; i++) {
        char name[16];
        snprintf(name, sizeof name, "ag%d", i);
        eng_agent_drop(e, NULL, name);
    }
    eng_stats st;
    eng_stats_get(e, &st);
    CHECK_MSG(st.blocks_free == 96 && st.blocks_used == 0 && st.running == 0 && st.waiting == 0, "free %d used %d",
              st.blocks_free, st.blocks_used);
    eng_engine_close(e);
    eng_model_close(m);
}

static void test_export_import(void) {
    eng_model *m = model("tiny"), *other = model("tiny-untied");
    eng_engine *e1 = m ? engine(m, 64, 512, 64) : NULL, *e2 = m ? engine(m, 64, 512, 64) : NULL;
    eng_engine *eo = other ? engine(other, 64, 512, 64) : NULL;
    if (!e1 || !e2 || !eo) goto out;
    int32_t p1[25], p2[6];
    rand_ids(p1, 25, 61, 1024);
    rand_ids(p2, 6, 62, 1024);
    results r1 = {0}, r2 = {0};
    eng_request r = req_ids(p1, 25, 10);
    r.agent_id = "x";
    submit(e1, &r1, &r);
    run_all(e1, &r1);
    submit(e2, &r2, &r);
    run_all(e2, &r2);
    uint8_t *buf;
    size_t len;
    char err[256];
    CHECK(eng_agent_export(e2, NULL, "x", &buf, &len, err, sizeof err) == ENG_OK);
    CHECK(eng_agent_drop(e2, NULL, "x") == ENG_OK);
    CHECK(eng_agent_import(e2, NULL, "x", buf, len, err, sizeof err) == ENG_OK);
    CHECK(eng_agent_import(e2, NULL, "x", buf, len, err, sizeof err) == ENG_EEXIST);
    /* continue both: identical to never exporting */
    r = req_ids(p2, 6, 10);
    r.agent_id = "x";
    submit(e1, &r1, &r);
    run_all(e1, &r1);
    submit(e2, &r2, &r);
    run_all(e2, &r2);
    CHECK(r2.r[1].usage.cached_tokens == r1.r[1].usage.cached_tokens && r1.r[1].usage.cached_tokens == 34);
    CHECK(memcmp(r1.r[1].tok, r2.r[1].tok, 10 * sizeof(int32_t)) == 0);
    /* bad data */
    uint8_t *bad = malloc(len);
    memcpy(bad, buf, len);
    bad[len / 2] ^= 1;
    CHECK(eng_agent_import(e2, NULL, "y", bad, len, err, sizeof err) == ENG_ECORRUPT && strstr(err, "checksum"));
    CHECK(eng_agent_import(e2, NULL, "y", buf, len - 9, err, sizeof err) == ENG_ECORRUPT);
    CHECK(eng_agent_import(e2, NULL, "y", buf, 10, err, sizeof err) == ENG_ECORRUPT);
    memcpy(bad, buf, len);
    bad[8] = 99; /* version */
    CHECK(eng_agent_import(e2, NULL, "y", bad, len, err, sizeof err) == ENG_ECORRUPT && strstr(err, "version"));
    CHECK(eng_agent_import(eo, NULL, "y", buf, len, err, sizeof err) == ENG_EMODEL && strstr(err, "another model"));
    free(bad);
    CHECK(eng_agent_export(e2, NULL, "nope", &bad, &len, err, sizeof err) == ENG_ENOTFOUND && bad == NULL);
    free(buf);
out:
    eng_engine_close(e1);
    eng_engine_close(e2);
    eng_engine_close(eo);
    eng_model_close(m);
    eng_model_close(other);
}

/* The warm tier's engine side: versions, saved marks, save_next, the spill
 * hook at eviction and restore over a tokens-only (evicted) agent. */
typedef struct { int n; uint8_t *blob; size_t len; uint64_t version; char id[64]; } spilled;
static void on_spill(void *ud, const char *tenant, const char *id, uint64_t version, uint8_t *blob, size_t len) {
    (void)tenant;
    spilled *s = ud;
    s->n++;
    free(s->blob);
    s->blob = blob;
    s->len = len;
    s->version = version;
    snprintf(s->id, sizeof s->id, "%s", id);
}

static void test_warm_tier(void) {
    eng_model *m = model("tiny");
    eng_engine *e = m ? engine(m, 8, 512, 64) : NULL, *ref = m ? engine(m, 64, 512, 64) : NULL;
    if (!e || !ref) goto out;
    int32_t p1[40], p2[6], big[100];
    rand_ids(p1, 40, 71, 1024);
    rand_ids(p2, 6, 72, 1024);
    rand_ids(big, 100, 73, 1024);
    results r = {0}, rr = {0};
    spilled sp = {0};
    eng_engine_set_spill(e, on_spill, &sp);
    eng_request q = req_ids(p1, 40, 8);
    q.agent_id = "w";
    submit(e, &r, &q);
    run_all(e, &r);
    submit(ref, &rr, &q);
    run_all(ref, &rr);
    eng_agent_info info;
    CHECK(eng_agent_get(e, NULL, "w", &info) == ENG_OK && info.version == 1 && !info.saved && info.n_blocks == 3);
    /* save_next: idle threshold, then the retry window after a hand-out */
    char tenant[256], id[256];
    uint8_t *buf;
    size_t len;
    uint64_t v;
    CHECK(!eng_agent_save_next(e, 3600, 5, tenant, id, &buf, &len, &v));
    CHECK(eng_agent_save_next(e, 0, 5, tenant, id, &buf, &len, &v) && !strcmp(id, "w") && v == 1);
    CHECK(!eng_agent_save_next(e, 0, 5, tenant, id, &buf, &len, &v)); /* handed out: not again for 5 s */
    eng_agent_mark_saved(e, NULL, "w", 2); /* another version: no effect */
    CHECK(eng_agent_get(e, NULL, "w", &info) == ENG_OK && !info.saved);
    eng_agent_mark_saved(e, NULL, "w", 1);
    CHECK(eng_agent_get(e, NULL, "w", &info) == ENG_OK && info.saved);
    CHECK(eng_agent_restore(e, NULL, "w", buf, len, NULL, 0) == ENG_EEXIST); /* what is here is as good */
    /* eviction of a saved agent: no spill */
    eng_request b = req_ids(big, 100, 4);
    submit(e, &r, &b);
    run_all(e, &r);
    CHECK(eng_agent_get(e, NULL, "w", &info) == ENG_OK && info.n_blocks == 0 && info.n_tokens == 48);
    CHECK_MSG(sp.n == 0, "spilled %d", sp.n);
    /* a restore over the tokens-only agent brings the KV back; the turn continues exactly */
    char err[256];
    CHECK_MSG(eng_agent_restore(e, NULL, "w", buf, len, err, sizeof err) == ENG_OK, "%s", err);
    CHECK(eng_agent_get(e, NULL, "w", &info) == ENG_OK && info.n_blocks == 3 && info.saved);
    q = req_ids(p2, 6, 8);
    q.agent_id = "w";
    submit(e, &r, &q);
    run_all(e, &r);
    submit(ref, &rr, &q);
    run_all(ref, &rr);
    CHECK(r.r[2].usage.cached_tokens == 47 && rr.r[1].usage.cached_tokens == 47);
    CHECK(memcmp(r.r[2].tok, rr.r[1].tok, 8 * sizeof(int32_t)) == 0);
    /* now unsaved (a new turn): eviction hands the export to the spill hook first */
    CHECK(eng_agent_get(e, NULL, "w", &info) == ENG_OK && !info.saved);
    submit(e, &r, &b);
    run_all(e, &r);
    CHECK_MSG(sp.n == 1 && !strcmp(sp.id, "w") && sp.version == info.version, "spilled %d", sp.n);
    /* a stored copy of another history is not taken over what is here */
    int32_t other[6];
    rand_ids(other, 6, 74, 1024);
    CHECK(eng_agent_restore(e, NULL, "w", sp.blob, sp.len, err, sizeof err) == ENG_OK);
    CHECK(eng_agent_drop(e, NULL, "w") == ENG_OK);
    q = req_ids(other, 6, 2);
    q.agent_id = "w";
    submit(e, &r, &q);
    run_all(e, &r);
    CHECK(eng_agent_restore(e, NULL, "w", sp.blob, sp.len, err, sizeof err) == ENG_EEXIST);
    free(buf);
    free(sp.blob);
out:
    eng_engine_close(e);
    eng_engine_close(ref);
    eng_model_close(m);
}

/* Logprobs: each token's log-probability is the same whether the context
 * was decoded or prefilled and agrees with eng_score's (the single-sequence
 * runtime), to float rounding; its alternatives are sorted and hold the greedy choice first,
 * and sampling settings do not change them (the model's distribution). */
typedef struct { uint64_t id; int n; int32_t tok[32]; double lp[32]; int n_top[32]; int32_t top[32][5];
                 double top_lp[32][5]; int done; } lp_run;
static void on_lp(void *ud, const eng_event *ev) {
    lp_run *r = ud;
    if (ev->id != r->id) return;
    if (ev->kind == ENG_EV_DONE) { r->done = 1; return; }
    if (r->n >= 32 || !ev->has_logprob) return;
    r->tok[r->n] = ev->token;
    r->lp[r->n] = ev->logprob;
    r->n_top[r->n] = ev->n_top;
    for (int k = 0; k < ev->n_top && k < 5; k++) {
        r->top[r->n][k] = ev->top_ids[k];
        r->top_lp[r->n][k] = ev->top_logprobs[k];
    }
    r->n++;
}

static void test_logprobs(void) {
    eng_model *m = model("tiny");
    eng_engine *e = m ? engine(m, 64, 512, 64) : NULL;
    if (!e) goto out;
    int32_t p[20], other[30];
    rand_ids(p, 20, 81, 1024);
    rand_ids(other, 30, 82, 1024);
    lp_run runs[2];
    for (int v = 0; v < 2; v++) { /* greedy alone; then sampled with a penalty, beside another request */
        memset(&runs[v], 0, sizeof runs[v]);
        eng_request q = req_ids(p, 20, 12);
        q.params.logprobs = 1;
        q.params.top_logprobs = 5;
        if (v) {
            q.params.sampling.temperature = 0.8f;
            q.params.sampling.repeat_penalty = 1.3f;
            q.params.sampling.seed = 5;
            eng_request o = req_ids(other, 30, 12);
            uint64_t oid;
            CHECK(eng_submit(e, &o, &oid, NULL, 0) == ENG_OK);
        }
        char err[256];
        CHECK_MSG(eng_submit(e, &q, &runs[v].id, err, sizeof err) == ENG_OK, "%s", err);
        while (!runs[v].done) eng_step(e, on_lp, &runs[v]);
        while (eng_step(e, NULL, NULL) > 0) {}
        lp_run *r = &runs[v];
        CHECK(r->n == 12);
        int32_t ctx[32];
        memcpy(ctx, p, sizeof p);
        memcpy(ctx + 20, r->tok, (size_t)r->n * sizeof *ctx);
        double sc[32];
        CHECK(eng_score(m, ctx, 20 + (size_t)r->n, sc, NULL, err, sizeof err) == ENG_OK);
        if (!v) { /* the same context prefilled: the same logprob (to float rounding) */
            lp_run b;
            memset(&b, 0, sizeof b);
            eng_request q2 = req_ids(ctx, 26, 2);
            q2.params.logprobs = 1;
            CHECK(eng_submit(e, &q2, &b.id, err, sizeof err) == ENG_OK);
            while (!b.done) eng_step(e, on_lp, &b);
            CHECK_MSG(fabs(b.lp[0] - r->lp[6]) < 1e-4, "decoded %.17g, prefilled %.17g", r->lp[6], b.lp[0]);
        }
        for (int i = 0; i < r->n; i++) {
            /* eng_score runs the single-sequence runtime: its logits agree to float rounding */
            CHECK_MSG(fabs(r->lp[i] - sc[19 + i]) < 1e-4, "token %d: %.17g vs score %.17g", i, r->lp[i], sc[19 + i]);
            CHECK(r->n_top[i] == 5);
            for (int k = 1; k < 5; k++) CHECK(r->top_lp[i][k] <= r->top_lp[i][k - 1]);
            if (!v) CHECK(r->top[i][0] == r->tok[i] && r->top_lp[i][0] == r->lp[i]);
            CHECK(r->lp[i] <= r->top_lp[i][0]);
        }
    }
    /* bad values */
    eng_request q = req_ids(p, 20, 2);
    q.params.top_logprobs = 3; /* without logprobs */
    uint64_t id;
    char err[256];
    CHECK(eng_submit(e, &q, &id, err, sizeof err) == ENG_EINVAL && strstr(err, "top_logprobs"));
    q.params.logprobs = 1;
    q.params.top_logprobs = ENG_MAX_TOP_LOGPROBS + 1;
    CHECK(eng_submit(e, &q, &id, err, sizeof err) == ENG_EINVAL);
out:
    eng_engine_close(e);
    eng_model_close(m);
}

/* eng_engine_score from another thread while the test steps: the logprobs
 * of a generation's context agree with the generation's own (to float
 * rounding: a prefill's attention products are summed in an order that
 * depends on its chunk), with 4 logits rows a step (scoring prefill chunks of
 * at most 4) and another request in the batch. */
typedef struct { eng_engine *e; eng_request r; int32_t *ids; double *lp; size_t n; int rc; _Atomic int done; } score_job;
static void *score_thread(void *p) {
    score_job *j = p;
    char err[256];
    j->rc = eng_engine_score(j->e, &j->r, NULL, NULL, &j->ids, &j->lp, &j->n, err, sizeof err);
    j->done = 1;
    return NULL;
}

static void test_engine_score(void) {
    eng_model *m = model("tiny");
    eng_engine_options o = {.n_blocks = 64, .block_tokens = 16, .max_step_tokens = 512, .max_running = 4, .max_queue = 64};
    eng_engine *e = NULL;
    char err[256];
    if (!m || eng_engine_open(&e, m, &o, err, sizeof err) != ENG_OK) goto out;
    int32_t p[37], other[25];
    rand_ids(p, 37, 91, 1024);
    rand_ids(other, 25, 92, 1024);
    lp_run g;
    memset(&g, 0, sizeof g);
    eng_request q = req_ids(p, 37, 10);
    q.params.logprobs = 1;
    CHECK(eng_submit(e, &q, &g.id, err, sizeof err) == ENG_OK);
    while (!g.done) eng_step(e, on_lp, &g);
    int32_t ctx[47];
    memcpy(ctx, p, sizeof p);
    memcpy(ctx + 37, g.tok, 10 * sizeof *ctx);
    score_job j = {.e = e, .r = req_ids(ctx, 47, 1)};
    eng_request o2 = req_ids(other, 25, 20);
    uint64_t oid;
    CHECK(eng_submit(e, &o2, &oid, err, sizeof err) == ENG_OK);
    pthread_t th;
    pthread_create(&th, NULL, score_thread, &j);
    for (long spins = 0; !j.done && spins < 100000000L; spins++) eng_step(e, NULL, NULL);
    pthread_join(th, NULL);
    CHECK_MSG(j.rc == ENG_OK && j.n == 47, "rc %d n %zu", j.rc, j.n);
    for (int i = 0; j.rc == ENG_OK && i < 10; i++)
        CHECK_MSG(fabs(j.lp[36 + i] - g.lp[i]) < 1e-4, "token %d: scored %.17g, generated %.17g", i, j.lp[36 + i],
                  g.lp[i]);
    free(j.ids);
    free(j.lp);
    while (eng_step(e, NULL, NULL) > 0) {}
    eng_stats st;
    eng_stats_get(e, &st);
    CHECK(st.running == 0 && st.waiting == 0 && st.blocks_used == 0);
    /* refusals */
    int32_t *ids;
    double *lp;
    size_t n;
    eng_request one = req_ids(p, 1, 1);
    CHECK(eng_engine_score(e, &one, NULL, NULL, &ids, &lp, &n, err, sizeof err) == ENG_EEMPTY);
    eng_request ag = req_ids(p, 5, 1);
    ag.agent_id = "a";
    CHECK(eng_engine_score(e, &ag, NULL, NULL, &ids, &lp, &n, err, sizeof err) == ENG_EINVAL && strstr(err, "agent"));
out:
    eng_engine_close(e);
    eng_model_close(m);
}

/* The same properties with keys and values held in IEEE half: batched =
 * alone, preemption stays exact, copy-on-write forks, export → import →
 * identical continuation; and an F16-KV export is refused by an F32-KV
 * engine of the same weights (another fingerprint: other logits). */
static void test_f16_kv(void) {
    g_kv_f16 = 1;
    test_batch_equals_alone();
    test_exhaustion_preempts();
    test_fork_copy_on_write();
    test_export_import();
    test_warm_tier();
    eng_model *m16 = model("tiny");
    g_kv_f16 = 0;
    eng_model *m32 = model("tiny");
    eng_engine *e16 = m16 ? engine(m16, 64, 512, 64) : NULL, *e32 = m32 ? engine(m32, 64, 512, 64) : NULL;
    if (e16 && e32) {
        int32_t p[20];
        rand_ids(p, 20, 71, 1024);
        results rs = {0};
        eng_request r = req_ids(p, 20, 4);
        r.agent_id = "h";
        submit(e16, &rs, &r);
        run_all(e16, &rs);
        uint8_t *buf = NULL;
        size_t len = 0;
        char err[256];
        CHECK(eng_agent_export(e16, NULL, "h", &buf, &len, err, sizeof err) == ENG_OK);
        uint32_t version;
        memcpy(&version, buf + 8, 4);
        CHECK_MSG(version == 3 && len < 20 * 2 * 2 * 32 * 4, "version %u, %zu bytes: the KV as halves", version, len);
        CHECK(eng_agent_import(e32, NULL, "h", buf, len, err, sizeof err) == ENG_EMODEL);
        free(buf);
    }
    eng_engine_close(e16);
    eng_engine_close(e32);
    eng_model_close(m16);
    eng_model_close(m32);
}

/* Text prompts, stop strings and streaming through the engine. */
static void test_text_and_stop(void) {
    eng_model *m = model("tiny");
    eng_engine *e = m ? engine(m, 64, 512, 64) : NULL;
    if (!e) { eng_model_close(m); return; }
    results rs = {0};
    eng_request r = req_ids(NULL, 0, 30);
    r.text = "Hello there, how are you?";
    r.text_len = strlen(r.text);
    r.params.sampling.temperature = 0.9f;
    r.params.sampling.seed = 5;
    submit(e, &rs, &r);
    run_all(e, &rs);
    result *a = &rs.r[0];
    CHECK(a->done && a->text_n >= 8 && eng__utf8_valid(a->text, a->text_n));
    CHECK(a->streamed_n == a->text_n && memcmp(a->streamed, a->text, a->text_n) == 0);
    if (a->text_n >= 8) {
        char stop[4] = {a->text[a->text_n / 2], a->text[a->text_n / 2 + 1], a->text[a->text_n / 2 + 2], 0};
        size_t at = (size_t)(strstr(a->text, stop) - a->text);
        const char *stops[] = {stop};
        r.params.stop = stops;
        r.params.n_stop = 1;
        submit(e, &rs, &r);
        run_all(e, &rs);
        result *b = &rs.r[1];
        CHECK_MSG(b->finish == ENG_FINISH_STOP && b->text_n == at && memcmp(b->text, a->text, at) == 0,
                  "stop '%s': %zu bytes, want %zu", stop, b->text_n, at);
        CHECK(b->streamed_n == b->text_n);
    }
    eng_engine_close(e);
    eng_model_close(m);
}

/* submit and cancel from another thread while this one steps */
typedef struct {
    eng_engine *e;
    int submitted, cancelled;
} thr_arg;

static void *submitter(void *p) {
    thr_arg *a = p;
    int32_t ids[40];
    for (int i = 0; i < 200; i++) {
        rand_ids(ids, 40, 7000 + (uint64_t)i, 1024);
        eng_request r = req_ids(ids, 40, 8);
        uint64_t id;
        char err[128];
        if (eng_submit(a->e, &r, &id, err, sizeof err) == ENG_OK) {
            a->submitted++;
            if (i % 2 && eng_cancel(a->e, id) == ENG_OK) a->cancelled++;
        }
    }
    return NULL;
}

typedef struct {
    int done, cancelled;
} counter;

static void count_cb(void *ud, const eng_event *ev) {
    counter *c = ud;
    if (ev->kind != ENG_EV_DONE) return;
    c->done++;
    c->cancelled += ev->finish == ENG_FINISH_CANCELLED;
}

static void test_threads(void) {
    eng_model *m = model("tiny");
    eng_engine *e = m ? engine(m, 128, 128, 512) : NULL;
    if (!e) { eng_model_close(m); return; }
    thr_arg a = {e, 0, 0};
    counter c = {0, 0};
    pthread_t th;
    pthread_create(&th, NULL, submitter, &a);
    int idle = 0;
    while (idle < 3) {
        if (eng_step(e, count_cb, &c) == 0) idle++;
        else idle = 0;
        if (c.done < a.submitted) idle = 0;
    }
    pthread_join(th, NULL);
    while (eng_step(e, count_cb, &c) > 0) {}
    eng_step(e, count_cb, &c);
    CHECK_MSG(c.done == a.submitted && c.cancelled == a.cancelled && a.submitted == 200, "done %d of %d, cancelled %d of %d",
              c.done, a.submitted, c.cancelled, a.cancelled);
    CHECK(free_blocks(e) == 128);
    eng_engine_close(e);
    eng_model_close(m);
}

/* The test hook: held requests stop at n tokens and stay running with their
 * blocks; a cancel while held completes at once; lifting the hold lets them
 * finish with exactly the tokens of an unheld run. */
static void test_hold(void) {
    eng_model *m = model("tiny");
    eng_engine *e = m ? engine(m, 64, 512, 64) : NULL;
    if (!e) { eng_model_close(m); return; }
    int32_t p[3][12], want[3][20];
    eng_sampling sp;
    eng_sampling_default(&sp);
    for (int i = 0; i < 3; i++) {
        rand_ids(p[i], 12, 9100 + (uint64_t)i, 1024);
        alone(m, p[i], 12, &sp, 20, want[i]);
    }
    static results rs;
    memset(&rs, 0, sizeof rs);
    eng_engine_hold(e, 3);
    uint64_t id[3];
    for (int i = 0; i < 3; i++) {
        eng_request r = req_ids(p[i], 12, 20);
        id[i] = submit(e, &rs, &r);
    }
    for (int k = 0; k < 50; k++) eng_step(e, on_event, &rs); /* far more steps than 3 tokens need */
    eng_stats st;
    eng_stats_get(e, &st);
    CHECK_MSG(st.running == 3 && st.waiting == 0, "running %d waiting %d", st.running, st.waiting);
    CHECK(st.blocks_free < st.blocks_total);
    for (int i = 0; i < 3; i++) CHECK_MSG(rs.r[i].token_events == 3 && !rs.r[i].done, "request %d: %d tokens", i,
                                          rs.r[i].token_events);
    CHECK(eng_step(e, on_event, &rs) == 0); /* nothing to compute while held */
    /* cancelled while it still waits (before any step admits it): nothing generated */
    eng_request rq = req_ids(p[0], 12, 20);
    uint64_t queued = submit(e, &rs, &rq);
    CHECK(eng_cancel(e, queued) == ENG_OK);
    eng_step(e, on_event, &rs);
    result *qr = find_r(&rs, queued);
    CHECK_MSG(qr && qr->done == 1 && qr->finish == ENG_FINISH_CANCELLED && qr->n_tok == 0 &&
              qr->usage.generated_tokens == 0 && qr->usage.prompt_tokens == 12,
              "a request cancelled before admission reported %d generated tokens", qr ? qr->n_tok : -1);
    CHECK(eng_cancel(e, id[1]) == ENG_OK);
    eng_step(e, on_event, &rs);
    CHECK(rs.r[1].done == 1 && rs.r[1].finish == ENG_FINISH_CANCELLED && rs.r[1].n_tok == 3);
    eng_engine_hold(e, -1);
    run_all(e, &rs);
    for (int i = 0; i < 3; i += 2) {
        CHECK(rs.r[i].done == 1 && rs.r[i].finish == ENG_FINISH_LENGTH && rs.r[i].n_tok == 20);
        CHECK_MSG(!memcmp(rs.r[i].tok, want[i], sizeof want[i]), "request %d: held run differs from alone", i);
    }
    CHECK(free_blocks(e) == 64);
    eng_engine_close(e);
    eng_model_close(m);
}

/* Prefix sharing stays inside a tenant: the same prompt from another tenant
 * reuses nothing (no KV, no cached_tokens to learn from); with
 * share_prefix_across_tenants it does. Outputs equal the runtime alone. */
static void test_prefix_per_tenant(void) {
    eng_model *m = model("tiny");
    if (!m) return;
    int32_t p[40], want[6];
    rand_ids(p, 40, 8801, 1024);
    eng_sampling sp;
    eng_sampling_default(&sp);
    alone(m, p, 40, &sp, 6, want);
    for (int share = 0; share < 2; share++) {
        eng_engine_options o = {.n_blocks = 64, .block_tokens = 16, .max_step_tokens = 512, .max_running = 16,
                                .max_queue = 64, .share_prefix_across_tenants = share};
        eng_engine *e = NULL;
        char err[256];
        CHECK_MSG(eng_engine_open(&e, m, &o, err, sizeof err) == ENG_OK, "%s", err);
        if (!e) break;
        static results rs;
        memset(&rs, 0, sizeof rs);
        const char *who[3] = {"alice", "alice", "bob"};
        for (int i = 0; i < 3; i++) {
            eng_request r = req_ids(p, 40, 6);
            r.tenant = who[i];
            submit(e, &rs, &r);
            run_all(e, &rs);
            CHECK_MSG(!memcmp(rs.r[i].tok, want, sizeof want), "share %d request %d: output differs", share, i);
        }
        CHECK(rs.r[0].usage.cached_tokens == 0);
        CHECK(rs.r[1].usage.cached_tokens == 32); /* alice's own two full blocks */
        CHECK_MSG(rs.r[2].usage.cached_tokens == (share ? 32 : 0), "share %d: bob reused %d of alice's tokens", share,
                  rs.r[2].usage.cached_tokens);
        eng_stats st;
        eng_stats_get(e, &st);
        CHECK(st.prefix_hit_tokens == (uint64_t)(share ? 64 : 32));
        eng_engine_close(e);
    }
    eng_model_close(m);
}

/* KV that comes from an import is not the engine's own computation: a forged
 * export (tokens say one thing, KV another; checksum recomputed) must never
 * reach another sequence through the prefix index, even once a later turn
 * completes the block it started. */
static void test_imported_kv_never_shared(void) {
    eng_model *m = model("tiny");
    eng_engine *e = m ? engine(m, 64, 512, 64) : NULL;
    if (!e) { eng_model_close(m); return; }
    int32_t p[10], q[20], victim[24], want[6];
    rand_ids(p, 10, 8811, 1024);
    rand_ids(q, 20, 8812, 1024);
    static results rs;
    memset(&rs, 0, sizeof rs);
    eng_request r = req_ids(p, 10, 1);
    r.agent_id = "x";
    submit(e, &rs, &r);
    run_all(e, &rs);
    uint8_t *buf = NULL;
    size_t len = 0;
    char err[256];
    CHECK(eng_agent_export(e, NULL, "x", &buf, &len, err, sizeof err) == ENG_OK);
    if (!buf) goto out;
    /* forge: triple every key and value, recompute the (unkeyed) checksum */
    const eng_config *c = eng_model_config(m);
    size_t kv0 = 36 + 11 * 4, nkv = (size_t)10 * c->n_layers * 2 * c->n_kv_heads * c->head_dim;
    CHECK(len == kv0 + nkv * 4 + 8);
    for (size_t i = 0; i < nkv; i++) {
        float v;
        memcpy(&v, buf + kv0 + 4 * i, 4);
        v *= 3;
        memcpy(buf + kv0 + 4 * i, &v, 4);
    }
    uint64_t sum = eng__hash64(buf, len - 8, 0);
    memcpy(buf + len - 8, &sum, 8);
    CHECK(eng_agent_drop(e, NULL, "x") == ENG_OK);
    CHECK_MSG(eng_agent_import(e, NULL, "x", buf, len, err, sizeof err) == ENG_OK, "%s", err);
    r = req_ids(q, 20, 2); /* completes block 0 (10 imported tokens + 6 of these) and block 1 */
    r.agent_id = "x";
    submit(e, &rs, &r);
    run_all(e, &rs);
    /* another sequence whose prompt starts with the agent's first 32 tokens */
    memcpy(victim, p, 10 * sizeof *p);
    victim[10] = rs.r[0].tok[0];
    memcpy(victim + 11, q, 13 * sizeof *q);
    eng_sampling sp;
    eng_sampling_default(&sp);
    alone(m, victim, 24, &sp, 6, want);
    r = req_ids(victim, 24, 6);
    submit(e, &rs, &r);
    run_all(e, &rs);
    CHECK_MSG(rs.r[2].usage.cached_tokens == 0, "the victim reused %d tokens of imported KV",
              rs.r[2].usage.cached_tokens);
    CHECK_MSG(!memcmp(rs.r[2].tok, want, sizeof want), "the victim's output was changed by an import");
out:
    free(buf);
    eng_engine_close(e);
    eng_model_close(m);
}

/* The LLaMA relatives (Qwen2 biases, Qwen3 q/k norms, Llama 3.1 RoPE scaling,
 * Llama with every bias, Mistral with a sliding window, Gemma 3 with local and
 * global layers, the mixtures of experts Qwen3-MoE and Mixtral, dynamic RoPE):
 * prefix sharing, batched = alone, agent resume = fresh, preemption
 * exact, export -> import continues identically; the paged pool needs
 * nothing of its own for them. */
static void test_relatives(void) {
    static const char *models[] = {"tiny-qwen2", "tiny-qwen3", "tiny-llama31", "tiny-llama-bias", "tiny-mistral-sw",
                                   "tiny-gemma3", "tiny-qwen3-moe", "tiny-mixtral", "tiny-llama-dynamic"};
    for (size_t k = 0; k < sizeof models / sizeof *models; k++) {
        g_model = models[k];
        int before = t_failed_checks;
        test_batch_equals_alone();
        test_single_agent_fresh_and_resume();
        eng_model *m = model(g_model);
        eng_engine *e = m ? engine(m, 64, 512, 64) : NULL;
        if (e) {
            int32_t p[20], q[6];
            rand_ids(p, 20, 4100 + k, 1024);
            rand_ids(q, 6, 4200 + k, 1024);
            static results rs;
            memset(&rs, 0, sizeof rs);
            eng_request r = req_ids(p, 20, 8);
            r.agent_id = "x";
            submit(e, &rs, &r);
            run_all(e, &rs);
            uint8_t *buf = NULL;
            size_t len = 0;
            char err[256];
            CHECK(eng_agent_export(e, NULL, "x", &buf, &len, err, sizeof err) == ENG_OK);
            CHECK(eng_agent_import(e, NULL, "y", buf, len, err, sizeof err) == ENG_OK);
            free(buf);
            r = req_ids(q, 6, 8);
            r.agent_id = "x";
            submit(e, &rs, &r);
            r.agent_id = "y";
            submit(e, &rs, &r);
            run_all(e, &rs);
            CHECK(rs.r[1].done && rs.r[2].done && !memcmp(rs.r[1].tok, rs.r[2].tok, 8 * sizeof(int32_t)));
            /* prefix sharing: a second request with the same 40-token prompt reuses its two full
             * blocks and answers as the first (and as the single-sequence runtime) did */
            int32_t shared[40], want[8];
            rand_ids(shared, 40, 4300 + k, 1024);
            eng_sampling sp;
            eng_sampling_default(&sp);
            alone(m, shared, 40, &sp, 8, want);
            r = req_ids(shared, 40, 8);
            submit(e, &rs, &r);
            run_all(e, &rs);
            submit(e, &rs, &r);
            run_all(e, &rs);
            CHECK_MSG(rs.r[4].usage.cached_tokens == 32 && !memcmp(rs.r[3].tok, want, sizeof want) &&
                      !memcmp(rs.r[4].tok, want, sizeof want), "prefix sharing: cached %d", rs.r[4].usage.cached_tokens);
            eng_engine_close(e);
        }
        eng_model_close(m);
        if (t_failed_checks != before) fprintf(stderr, "  (with %s)\n", g_model);
    }
    g_model = "tiny";
}

/* full_context (a rendered chat resent whole each turn): the agent keeps the
 * KV of the longest common prefix; a divergence is reported and what follows
 * it recomputed; the output always equals a fresh run of the whole prompt. */
static void test_full_context(void) {
    static const char *models[] = {"tiny", "tiny-mistral-sw"};
    for (int k = 0; k < 2; k++) {
        eng_model *m = model(models[k]);
        eng_engine *e = m ? engine(m, 64, 512, 64) : NULL;
        if (!e) { eng_model_close(m); continue; }
        int32_t ctx[160], want[8];
        rand_ids(ctx, 40, 6100, 1024);
        eng_sampling sp;
        eng_sampling_default(&sp);
        static results rs;
        memset(&rs, 0, sizeof rs);
        eng_request r = req_ids(ctx, 40, 8);
        r.agent_id = "c";
        r.full_context = 1;
        submit(e, &rs, &r);
        run_all(e, &rs);
        CHECK(rs.r[0].done && !rs.r[0].usage.history_diverged && rs.r[0].usage.cached_tokens == 0);
        /* turn 2: history + 6 new tokens: only those (and the last generated one) computed */
        memcpy(ctx + 40, rs.r[0].tok, 8 * sizeof *ctx);
        rand_ids(ctx + 48, 6, 6101, 1024);
        alone(m, ctx, 54, &sp, 8, want);
        r = req_ids(ctx, 54, 8);
        r.agent_id = "c";
        r.full_context = 1;
        submit(e, &rs, &r);
        run_all(e, &rs);
        CHECK_MSG(rs.r[1].done && !rs.r[1].usage.history_diverged && rs.r[1].usage.cached_tokens == 47 &&
                  rs.r[1].usage.prompt_tokens == 54 && !memcmp(rs.r[1].tok, want, sizeof want),
                  "%s turn 2: cached %d prompt %d", models[k], rs.r[1].usage.cached_tokens, rs.r[1].usage.prompt_tokens);
        /* turn 3 diverges at 37 (an edited message): blocks 0-1 kept, the rest computed */
        rand_ids(ctx + 37, 20, 6102, 1024);
        alone(m, ctx, 57, &sp, 8, want);
        r = req_ids(ctx, 57, 8);
        r.agent_id = "c";
        r.full_context = 1;
        submit(e, &rs, &r);
        run_all(e, &rs);
        int keep = k ? 0 : 32; /* with a window of 24, block 0 went back: nothing to keep before 37 */
        CHECK_MSG(rs.r[2].done && rs.r[2].usage.history_diverged && rs.r[2].usage.cached_tokens >= keep &&
                  rs.r[2].usage.cached_tokens <= 37 && !memcmp(rs.r[2].tok, want, sizeof want),
                  "%s turn 3: cached %d", models[k], rs.r[2].usage.cached_tokens);
        /* turn 4: the same context again: one token recomputed for its logits */
        r = req_ids(ctx, 57, 8);
        r.agent_id = "c";
        r.full_context = 1;
        submit(e, &rs, &r);
        run_all(e, &rs);
        CHECK(rs.r[3].done && rs.r[3].usage.history_diverged && !memcmp(rs.r[3].tok, want, sizeof want));
        CHECK(eng_agent_drop(e, NULL, "c") == ENG_OK && free_blocks(e) == 64);
        eng_engine_close(e);
        eng_model_close(m);
    }
}

static eng_engine *engine_b(eng_model *m, int blocks, int block_tokens, int step_tokens) {
    eng_engine_options o = {.n_blocks = blocks, .block_tokens = block_tokens, .max_step_tokens = step_tokens,
                            .max_running = 16, .max_queue = 64};
    eng_engine *e = NULL;
    char err[256];
    CHECK_MSG(eng_engine_open(&e, m, &o, err, sizeof err) == ENG_OK, "%s", err);
    return e;
}

/* Every layer slides (window 24, blocks of 16): a sequence ten times the pool
 * runs, holding a window's worth of blocks, with the single-sequence output;
 * an agent given back its early blocks exports the window (format 2), imports
 * into an engine of another block size and continues identically; a prefix
 * whose blocks were given back is still found in the cache. */
static void test_sliding_window_bounded(void) {
    eng_model *m = model("tiny-mistral-sw");
    eng_engine *e = m ? engine_b(m, 6, 16, 16) : NULL, *e2 = m ? engine_b(m, 12, 8, 32) : NULL;
    if (!e || !e2) goto out;
    enum { P = 40, G = 200 };
    int32_t p[P], q[5], want[G], hist[P + G + 5], want2[10];
    rand_ids(p, P, 5150, 1024);
    rand_ids(q, 5, 5151, 1024);
    eng_sampling sp;
    eng_sampling_default(&sp);
    alone(m, p, P, &sp, G, want);
    static results rs;
    memset(&rs, 0, sizeof rs);
    eng_request r = req_ids(p, P, G); /* 240 tokens = 15 blocks, the pool has 6 */
    r.agent_id = "long";
    submit(e, &rs, &r);
    int most = 0;
    while (eng_step(e, on_event, &rs) > 0) {
        eng_stats st;
        eng_stats_get(e, &st);
        if (st.blocks_used > most) most = st.blocks_used;
    }
    int diff_at = -1;
    for (int i = 0; i < G && diff_at < 0; i++)
        if (rs.r[0].tok[i] != want[i]) diff_at = i;
    CHECK_MSG(rs.r[0].done && rs.r[0].finish == ENG_FINISH_LENGTH && diff_at < 0,
              "the long sequence differs from the single-sequence runtime at token %d (n %d)", diff_at, rs.r[0].n_tok);
    CHECK_MSG(most <= 4, "held up to %d blocks (window 24 + a step of 16 needs at most 4)", most);
    eng_agent_info info;
    CHECK(eng_agent_get(e, NULL, "long", &info) == ENG_OK && info.n_cached == P + G - 1 && info.n_blocks <= 3);
    /* export the window, import it elsewhere, continue both */
    uint8_t *buf = NULL;
    size_t len = 0;
    char err[256];
    CHECK_MSG(eng_agent_export(e, NULL, "long", &buf, &len, err, sizeof err) == ENG_OK, "%s", err);
    if (!buf) goto out;
    uint32_t version;
    memcpy(&version, buf + 8, 4);
    CHECK(version == 2);
    CHECK_MSG(eng_agent_import(e2, NULL, "long", buf, len, err, sizeof err) == ENG_OK, "%s", err);
    /* a forged start past the window is refused */
    uint32_t from;
    memcpy(&from, buf + 36, 4);
    uint32_t late = from + 64;
    memcpy(buf + 36, &late, 4);
    uint64_t sum = eng__hash64(buf, len - 8, 0);
    memcpy(buf + len - 8, &sum, 8);
    CHECK(eng_agent_import(e2, NULL, "forged", buf, len, err, sizeof err) == ENG_ECORRUPT);
    free(buf);
    memcpy(hist, p, sizeof p);
    memcpy(hist + P, want, sizeof want);
    memcpy(hist + P + G, q, sizeof q);
    alone(m, hist, P + G + 5, &sp, 10, want2);
    static results r1, r2;
    memset(&r1, 0, sizeof r1);
    memset(&r2, 0, sizeof r2);
    r = req_ids(q, 5, 10);
    r.agent_id = "long";
    submit(e, &r1, &r);
    submit(e2, &r2, &r);
    run_all(e, &r1);
    run_all(e2, &r2);
    CHECK_MSG(r1.r[0].done && !memcmp(r1.r[0].tok, want2, sizeof want2), "the follow-up differs from a fresh run");
    CHECK_MSG(r2.r[0].done && !memcmp(r2.r[0].tok, want2, sizeof want2), "the imported agent's follow-up differs");
    CHECK(r1.r[0].usage.cached_tokens == P + G - 1);
    CHECK(eng_agent_drop(e, NULL, "long") == ENG_OK && eng_agent_drop(e2, NULL, "long") == ENG_OK);
    CHECK(free_blocks(e) == 6 && free_blocks(e2) == 12);
    /* prefix blocks given back behind the window stay findable */
    int32_t a[64], b[64], wa[8], wb[8];
    rand_ids(a, 64, 5152, 1024);
    memcpy(b, a, 48 * sizeof *a);
    rand_ids(b + 48, 16, 5153, 1024);
    alone(m, a, 64, &sp, 8, wa);
    alone(m, b, 64, &sp, 8, wb);
    static results r3;
    memset(&r3, 0, sizeof r3);
    r = req_ids(a, 64, 8);
    submit(e, &r3, &r);
    run_all(e, &r3);
    r = req_ids(b, 64, 8);
    submit(e, &r3, &r);
    run_all(e, &r3);
    CHECK(!memcmp(r3.r[0].tok, wa, sizeof wa) && !memcmp(r3.r[1].tok, wb, sizeof wb));
    CHECK_MSG(r3.r[1].usage.cached_tokens == 48, "cached %d", r3.r[1].usage.cached_tokens);
out:
    eng_engine_close(e);
    eng_engine_close(e2);
    eng_model_close(m);
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: test_batch MODELS_DIR\n"); return 2; }
    static const test_case tests[] = {
        {"single_agent_fresh_and_resume", test_single_agent_fresh_and_resume},
        {"sliding_window_memory_bounded_export_prefix", test_sliding_window_bounded},
        {"full_context_keeps_the_common_prefix", test_full_context},
        {"batch_equals_alone_three_agents_greedy_seeded", test_batch_equals_alone},
        {"ten_generations_then_drop_frees_all", test_ten_then_drop_frees_all},
        {"request_errors_distinct", test_request_errors},
        {"exhaustion_preempts_and_stays_exact", test_exhaustion_preempts},
        {"prefix_sharing_fewer_blocks_same_output", test_prefix_sharing},
        {"prefix_duplicates_never_serve_stale_kv", test_prefix_duplicates_never_serve_stale_kv},
        {"fork_copy_on_write", test_fork_copy_on_write},
        {"random_cancels_leak_nothing", test_random_cancels_leak_nothing},
        {"export_import_continues_identically", test_export_import},
        {"warm_tier_versions_spill_restore", test_warm_tier},
        {"logprobs_equal_score_top_sorted", test_logprobs},
        {"engine_score_agrees_with_generation_logprobs", test_engine_score},
        {"text_prompts_stop_strings_streaming", test_text_and_stop},
        {"submit_cancel_from_another_thread", test_threads},
        {"f16_kv_batch_preempt_fork_export", test_f16_kv},
        {"hold_keeps_requests_running_until_lifted", test_hold},
        {"prefix_sharing_stays_inside_a_tenant", test_prefix_per_tenant},
        {"imported_kv_never_enters_the_prefix_index", test_imported_kv_never_shared},
        {"relatives_batched_resumed_exported_like_llama", test_relatives},
        {"pool_from_memory_budget", test_pool_from_memory_budget},
        {0, 0}};
    return run_tests(tests, argc, argv);
}
