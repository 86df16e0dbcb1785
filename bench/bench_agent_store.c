/* bench_agent_store.c — agents' warm tier: restoring an agent from Redis
 * against recomputing its history.
 *
 *   bench_agent_store --model DIR --redis URL [--history 2048] [--reps 20]
 *                     [--recompute-reps 3] [--threads 2] [--kv f32|f16]
 *
 * An agent of --history random ids is built (max_tokens 1); building it is
 * what a replica without the warm tier pays on the agent's next turn (the
 * history's prefill: time to the first token, fresh ids each repetition so
 * the prefix cache never helps). Its export is sealed as the server seals it
 * (HMAC-SHA256, agentauth.h) and written to Redis. Then, --reps times: drop
 * the agent, GET it from Redis, verify the seal, load it into the pool
 * (eng_agent_restore) — the path a turn takes on a replica that does not
 * hold the agent — each stage timed. Percentiles are nearest-rank. The
 * original design's bar: p95 < 5 ms per 32 blocks of 16 tokens.
 */
#include "agentauth.h"
#include "bench_util.h"
#include "eng.h"
#include "kvc.h"

#include <stdio.h>
#include <string.h>

typedef struct { int done; double t_first; } one;

static void on_event(void *ud, const eng_event *ev) {
    one *o = ud;
    if (ev->kind == ENG_EV_TOKEN && o->t_first == 0) o->t_first = now();
    if (ev->kind == ENG_EV_DONE) o->done = 1;
}

/* Build agent "a" from n fresh random ids; seconds to its first token. */
static double build(eng_engine *e, int32_t *ids, int n, int vocab, uint64_t *rng) {
    fill_random(ids, (size_t)n, vocab, rng);
    eng_agent_drop(e, "bench", "a");
    eng_request r;
    memset(&r, 0, sizeof r);
    r.ids = ids;
    r.n_ids = (size_t)n;
    r.tenant = "bench";
    r.agent_id = "a";
    eng_sampling_default(&r.params.sampling);
    r.params.max_tokens = 1;
    r.params.ignore_eos = 1;
    char err[256];
    uint64_t id;
    one o = {0, 0};
    double t0 = now();
    if (eng_submit(e, &r, &id, err, sizeof err) != ENG_OK) { fprintf(stderr, "bench: %s\n", err); return -1; }
    while (!o.done) eng_step(e, on_event, &o);
    return o.t_first - t0;
}

static void row(const char *what, double *x, int n) {
    double p50 = percentile(x, n, 50), p95 = percentile(x, n, 95);
    printf("| %-34s | %9.2f | %9.2f |\n", what, p50 * 1e3, p95 * 1e3);
}

int main(int argc, char **argv) {
    eng_blas_select(argv);
    const char *dir = NULL, *url = NULL;
    int hist = 2048, reps = 20, rreps = 3, threads = 2, kv16 = 0;
    for (int i = 1; i < argc; i++) {
        int has = i + 1 < argc;
        if (!strcmp(argv[i], "--model") && has) dir = argv[++i];
        else if (!strcmp(argv[i], "--redis") && has) url = argv[++i];
        else if (!strcmp(argv[i], "--history") && has) hist = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--reps") && has) reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--recompute-reps") && has) rreps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--threads") && has) threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--kv") && has) kv16 = !strcmp(argv[++i], "f16");
        else dir = NULL, i = argc;
    }
    if (!dir || !url || hist < 16 || hist > 1 << 20 || reps < 1 || reps > 10000 || rreps < 1 || threads < 1) {
        fprintf(stderr, "usage: bench_agent_store --model DIR --redis URL [--history N] [--reps N] "
                        "[--recompute-reps N] [--threads N] [--kv f32|f16]\n");
        return 2;
    }
    char err[512];
    eng_model *m;
    eng_options o = {.n_threads = threads, .max_context = hist + 64, .kv_f16 = kv16};
    if (eng_model_open(&m, dir, &o, err, sizeof err) != ENG_OK) { fprintf(stderr, "bench: %s\n", err); return 1; }
    const eng_config *c = eng_model_config(m);
    int blocks = (hist + 1 + 15) / 16;
    eng_engine_options eo = {.n_blocks = 2 * blocks + 8, .block_tokens = 16};
    eng_engine *e;
    if (eng_engine_open(&e, m, &eo, err, sizeof err) != ENG_OK) { fprintf(stderr, "bench: %s\n", err); return 1; }
    kvc_redis *r;
    kvc_agents *st;
    kvc_redis_options ro = {.url = url, .connect_timeout_ms = 2000, .command_timeout_ms = 30000, .pool_size = 1};
    if (kvc_redis_open(&r, &ro, err, sizeof err) != KVC_OK || kvc_agents_open(&st, r, NULL) != KVC_OK) {
        fprintf(stderr, "bench: redis: %s\n", err);
        return 1;
    }
    srv_agent_key key;
    if (srv__agent_key_init(&key, NULL, err, sizeof err)) { fprintf(stderr, "bench: %s\n", err); return 1; }
    int32_t *ids = malloc((size_t)hist * sizeof *ids);
    double *rec = calloc((size_t)rreps, sizeof *rec), *tot = calloc((size_t)reps, sizeof *tot);
    double *tget = calloc((size_t)reps, sizeof *tget), *tver = calloc((size_t)reps, sizeof *tver);
    double *tload = calloc((size_t)reps, sizeof *tload);
    uint64_t rng = 88172645463325252ull, fp = eng_model_fingerprint(m);
    if (!ids || !rec || !tot || !tget || !tver || !tload) return 1;
    printf("model: %s (%d layers, %d KV heads x %d), KV %s, %d threads; agent of %d tokens\n\n", dir, c->n_layers,
           c->n_kv_heads, c->head_dim, kv16 ? "F16" : "F32", threads, hist);
    if (build(e, ids, 64, c->vocab_size, &rng) < 0) return 1; /* warm-up */
    for (int i = 0; i < rreps; i++)
        if ((rec[i] = build(e, ids, hist, c->vocab_size, &rng)) < 0) return 1;
    uint8_t *blob;
    size_t len;
    if (eng_agent_export(e, "bench", "a", &blob, &len, err, sizeof err) != ENG_OK ||
        srv__agent_seal(&key, fp, "bench", &blob, &len) ||
        kvc_agents_put(st, fp, "bench", "a", blob, len, 600) != KVC_OK) {
        fprintf(stderr, "bench: export or Redis SET failed: %s\n", err);
        return 1;
    }
    free(blob);
    eng_agent_info info;
    eng_agent_get(e, "bench", "a", &info);
    int nblk = info.n_blocks;
    for (int i = 0; i < reps; i++) {
        eng_agent_drop(e, "bench", "a");
        uint8_t *v;
        size_t vl, bl;
        double t0 = now();
        if (kvc_agents_get(st, fp, "bench", "a", &v, &vl) != KVC_OK) { fprintf(stderr, "bench: GET failed\n"); return 1; }
        double t1 = now();
        if (srv__agent_verify(&key, fp, "bench", v, vl, &bl)) { fprintf(stderr, "bench: seal\n"); return 1; }
        double t2 = now();
        if (eng_agent_restore(e, "bench", "a", v, bl, err, sizeof err) != ENG_OK) {
            fprintf(stderr, "bench: restore: %s\n", err);
            return 1;
        }
        double t3 = now();
        free(v);
        tget[i] = t1 - t0;
        tver[i] = t2 - t1;
        tload[i] = t3 - t2;
        tot[i] = t3 - t0;
    }
    printf("stored: %zu bytes (%.2f MiB) for %d blocks; %d restores, %d recomputations\n\n", len, len / 1048576.0,
           nblk, reps, rreps);
    printf("| %-34s | %9s | %9s |\n|------------------------------------|-----------|-----------|\n", "ms", "p50", "p95");
    double rec_p50 = percentile(rec, rreps, 50), tot_p50 = percentile(tot, reps, 50), tot_p95 = percentile(tot, reps, 95);
    row("GET from Redis", tget, reps);
    row("verify the seal (HMAC-SHA256)", tver, reps);
    row("load into the pool", tload, reps);
    row("restore, total", tot, reps);
    row("recompute the history (prefill)", rec, rreps);
    printf("\nrestore p95 per 32 blocks: %.2f ms (the design's bar: < 5 ms)\n", tot_p95 * 1e3 * 32.0 / nblk);
    printf("recompute / restore (p50): %.1fx\n", rec_p50 / tot_p50);
    printf("Redis GET rate: %.0f MB/s\n", len / percentile(tget, reps, 50) / 1e6);
    kvc_agents_close(st);
    kvc_redis_close(r);
    eng_engine_close(e);
    eng_model_close(m);
    free(ids);
    free(rec);
    free(tot);
    free(tget);
    free(tver);
    free(tload);
    return 0;
}
