/* bench_batch.c — the block-pool batch engine in llama-batched-bench's terms,
 * then the cost of resuming an agent.
 *
 *   bench_batch --model DIR [--threads 2] [--reps 3] [--batches 1,2,4,8,16]
 *               [--pp 128] [--tg 64] [--resume-history 2048] [--resume-new 32]
 *               [--resume-reps 20] [--full-reps 2]
 *
 * 1. For each B: B requests (distinct random prompts of pp ids, greedy,
 *    ignore_eos, max_tokens tg) are submitted at once and eng_step() is driven
 *    until all are DONE. Times come from the event timestamps:
 *      T_PP  until every sequence has had its first TOKEN (all prompts done),
 *      T_TG  the rest, until every sequence is DONE,
 *      S_PP = B*pp/T_PP, S_TG = B*(tg-1)/T_TG, S = B*(pp+tg)/T, N_KV = B*(pp+tg).
 *    Unlike llama-batched-bench, continuous batching decodes the sequences that
 *    have their first token while later prompts are still being prefilled, so a
 *    few decode tokens fall inside T_PP (S_TG is slightly flattering, S_PP
 *    slightly pessimistic for B*pp > max_step_tokens). One warm-up run first.
 * 2. Agent resume: an agent (tenant "bench", id "a") is built from
 *    --resume-history random ids (max_tokens 1). Time to first token
 *    (submit -> first TOKEN event) of
 *      (a) a follow-up turn on the agent with --resume-new new ids,
 *      (b) a fresh request with --resume-new ids,
 *      (c) a fresh request of history + new ids (what one pays without agents),
 *      (d) a fresh request repeating the agent's exact history + new ids
 *          (no agent, but the agent's full blocks can be shared as a prefix).
 *    The agent is NOT rebuilt between repetitions of (a): it keeps growing by
 *    resume-new + 1 tokens per turn (the sampled token joins its history), as a
 *    real conversation does. Every prompt uses fresh random ids, so (b) and (c)
 *    never hit the prefix cache. "Reconstruction" is the wall time spent inside
 *    eng_submit for (a). Percentiles are nearest-rank. (a) and (b) are repeated
 *    --resume-reps times after one warm-up each; (c) and (d), slow, --full-reps.
 * 3. Pool statistics and the machine's limits.
 */
#include "bench_util.h"
#include "eng.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_BATCHES 32

typedef struct { double mean, sd; } stat2;

static stat2 stats(const double *x, int n) {
    stat2 s = {0, 0};
    for (int i = 0; i < n; i++) s.mean += x[i];
    s.mean /= n;
    for (int i = 0; i < n; i++) s.sd += (x[i] - s.mean) * (x[i] - s.mean);
    s.sd = n > 1 ? sqrt(s.sd / (n - 1)) : 0;
    return s;
}


/* What the event callback records for the requests of one measurement. */
typedef struct {
    int n;
    uint64_t *id;
    double *t_first, *t_done;
    int *n_tok, *finish, *error;
    eng_usage *usage;
    int32_t *last_token;  /* last generated id (agent history bookkeeping) */
    int n_first, n_done, stray;
    char message[256];    /* first error message seen */
} run_state;

static int run_alloc(run_state *st, int n) {
    memset(st, 0, sizeof *st);
    st->n = n;
    st->id = calloc((size_t)n, sizeof *st->id);
    st->t_first = calloc((size_t)n, sizeof *st->t_first);
    st->t_done = calloc((size_t)n, sizeof *st->t_done);
    st->n_tok = calloc((size_t)n, sizeof *st->n_tok);
    st->finish = calloc((size_t)n, sizeof *st->finish);
    st->error = calloc((size_t)n, sizeof *st->error);
    st->usage = calloc((size_t)n, sizeof *st->usage);
    st->last_token = calloc((size_t)n, sizeof *st->last_token);
    return st->id && st->t_first && st->t_done && st->n_tok && st->finish && st->error && st->usage &&
                   st->last_token
               ? 0
               : -1;
}

static void run_free(run_state *st) {
    free(st->id); free(st->t_first); free(st->t_done); free(st->n_tok);
    free(st->finish); free(st->error); free(st->usage); free(st->last_token);
    memset(st, 0, sizeof *st);
}

/* reset the records, keeping the arrays, for n <= allocated requests */
static void run_reset(run_state *st, int n) {
    memset(st->id, 0, (size_t)n * sizeof *st->id);
    memset(st->t_first, 0, (size_t)n * sizeof *st->t_first);
    memset(st->t_done, 0, (size_t)n * sizeof *st->t_done);
    memset(st->n_tok, 0, (size_t)n * sizeof *st->n_tok);
    memset(st->finish, 0, (size_t)n * sizeof *st->finish);
    memset(st->error, 0, (size_t)n * sizeof *st->error);
    memset(st->usage, 0, (size_t)n * sizeof *st->usage);
    memset(st->last_token, 0, (size_t)n * sizeof *st->last_token);
    st->n = n;
    st->n_first = st->n_done = st->stray = 0;
    st->message[0] = 0;
}

static void on_event(void *ud, const eng_event *ev) {
    run_state *st = ud;
    double t = now();
    int i = 0;
    while (i < st->n && st->id[i] != ev->id) i++;
    if (i == st->n) { st->stray++; return; }
    if (ev->kind == ENG_EV_TOKEN) {
        if (st->n_tok[i]++ == 0) { st->t_first[i] = t; st->n_first++; }
        st->last_token[i] = ev->token;
    } else if (ev->kind == ENG_EV_DONE) {
        if (st->t_done[i] == 0) st->n_done++;
        st->t_done[i] = t;
        st->finish[i] = ev->finish;
        st->error[i] = ev->error;
        st->usage[i] = ev->usage;
        if (ev->finish == ENG_FINISH_ERROR && !st->message[0])
            snprintf(st->message, sizeof st->message, "%s", ev->message ? ev->message : "(no message)");
    } else {
        st->stray++;
    }
}

/* Step until every request of st is DONE. Returns the number of steps, or -1. */
static int drive(eng_engine *e, run_state *st) {
    int steps = 0, idle = 0;
    while (st->n_done < st->n) {
        int r = eng_step(e, on_event, st);
        if (r < 0) { fprintf(stderr, "bench: eng_step: %s\n", eng_strerror(r)); return -1; }
        steps++;
        if (r == 0 && st->n_done < st->n && ++idle > 1000) {
            fprintf(stderr, "bench: engine idle with %d of %d requests not done\n", st->n - st->n_done, st->n);
            return -1;
        }
        if (r > 0) idle = 0;
    }
    return steps;
}

static int submit(eng_engine *e, const int32_t *ids, size_t n, const char *agent, int max_tokens, uint64_t *id) {
    eng_request r;
    memset(&r, 0, sizeof r);
    r.ids = ids;
    r.n_ids = n;
    r.tenant = "bench";
    r.agent_id = agent;
    eng_sampling_default(&r.params.sampling);
    r.params.max_tokens = max_tokens;
    r.params.ignore_eos = 1;
    char err[512];
    int rc = eng_submit(e, &r, id, err, sizeof err);
    if (rc != ENG_OK) fprintf(stderr, "bench: eng_submit (%zu ids%s%s): %s\n", n, agent ? ", agent " : "",
                              agent ? agent : "", err);
    return rc;
}

/* every request finished by length with the expected number of tokens */
static int check_done(const run_state *st, int want, const char *what) {
    if (st->stray) { fprintf(stderr, "bench: %s: %d events for unknown requests\n", what, st->stray); return -1; }
    for (int i = 0; i < st->n; i++) {
        if (st->finish[i] != ENG_FINISH_LENGTH || st->usage[i].generated_tokens != want || st->n_tok[i] != want) {
            fprintf(stderr, "bench: %s: request %d finished \"%s\" (%s%s%s) with %d generated (%d TOKEN events), want \"length\" and %d\n",
                    what, i, eng_finish_name(st->finish[i]), st->error[i] ? eng_strerror(st->error[i]) : "",
                    st->message[0] ? ": " : "", st->message, st->usage[i].generated_tokens, st->n_tok[i], want);
            return -1;
        }
    }
    return 0;
}

typedef struct { double t_pp, t_tg, t; int steps; } batch_times;

/* One llama-batched-bench measurement: B sequences of pp prompt ids, tg generated. */
static int run_batch(eng_engine *e, run_state *st, int32_t *ids, int B, int pp, int tg, int vocab, uint64_t *rng,
                     batch_times *bt) {
    run_reset(st, B);
    for (int b = 0; b < B; b++) fill_random(ids + (size_t)b * pp, (size_t)pp, vocab, rng);
    double t0 = now();
    for (int b = 0; b < B; b++)
        if (submit(e, ids + (size_t)b * pp, (size_t)pp, NULL, tg, &st->id[b]) != ENG_OK) return -1;
    int steps = drive(e, st);
    if (steps < 0 || check_done(st, tg, "batch") != 0) return -1;
    double t_first = 0, t_done = 0;
    for (int b = 0; b < B; b++) {
        if (st->t_first[b] > t_first) t_first = st->t_first[b];
        if (st->t_done[b] > t_done) t_done = st->t_done[b];
    }
    bt->t_pp = t_first - t0;
    bt->t_tg = t_done - t_first;
    bt->t = t_done - t0;
    bt->steps = steps;
    return 0;
}

/* One request timed from submit to first token; *t_submit = time inside eng_submit. */
static int run_one(eng_engine *e, run_state *st, const int32_t *ids, size_t n, const char *agent, double *ttft,
                   double *t_submit) {
    run_reset(st, 1);
    double t0 = now();
    if (submit(e, ids, n, agent, 1, &st->id[0]) != ENG_OK) return -1;
    double t1 = now();
    if (drive(e, st) < 0 || check_done(st, 1, agent ? "agent turn" : "single request") != 0) return -1;
    *ttft = st->t_first[0] - t0;
    if (t_submit) *t_submit = t1 - t0;
    return 0;
}

static int parse_batches(const char *s, int *out, int *n) {
    *n = 0;
    while (*s) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s || v < 1 || v > 1024 || *n == MAX_BATCHES) return -1;
        out[(*n)++] = (int)v;
        s = end;
        if (*s == ',') s++;
        else if (*s) return -1;
    }
    return *n ? 0 : -1;
}

static const char *usage_text =
    "usage: bench_batch --model DIR [--threads N] [--reps N] [--batches 1,2,4,8,16] [--pp N] [--tg N]\n"
    "                   [--resume-history N] [--resume-new N] [--resume-reps N] [--full-reps N]\n"
    "                   [--weights f32|bf16|q8_0|q4_k] [--kv f32|f16] (MODEL: a directory or a GGUF file)\n";

int main(int argc, char **argv) {
    eng_blas_select(argv); /* AVX-512 BLAS kernels where OpenBLAS would not pick them */
    const char *dir = NULL, *batches_arg = "1,2,4,8,16";
    int threads = 2, reps = 3, pp = 128, tg = 64, hist = 2048, nnew = 32, rreps = 20, freps = 2, wkind = ENG_WEIGHTS_F32, kv16 = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int has = i + 1 < argc;
        if (!strcmp(a, "--model") && has) dir = argv[++i];
        else if (!strcmp(a, "--threads") && has) threads = atoi(argv[++i]);
        else if (!strcmp(a, "--reps") && has) reps = atoi(argv[++i]);
        else if (!strcmp(a, "--batches") && has) batches_arg = argv[++i];
        else if (!strcmp(a, "--pp") && has) pp = atoi(argv[++i]);
        else if (!strcmp(a, "--tg") && has) tg = atoi(argv[++i]);
        else if (!strcmp(a, "--resume-history") && has) hist = atoi(argv[++i]);
        else if (!strcmp(a, "--resume-new") && has) nnew = atoi(argv[++i]);
        else if (!strcmp(a, "--resume-reps") && has) rreps = atoi(argv[++i]);
        else if (!strcmp(a, "--full-reps") && has) freps = atoi(argv[++i]);
        else if (!strcmp(a, "--weights") && has && (!strcmp(argv[i + 1], "f32") || !strcmp(argv[i + 1], "bf16") ||
                                                    !strcmp(argv[i + 1], "q8_0") || !strcmp(argv[i + 1], "q4_k"))) {
            i++;
            wkind = !strcmp(argv[i], "bf16")   ? ENG_WEIGHTS_BF16
                    : !strcmp(argv[i], "q8_0") ? ENG_WEIGHTS_Q8_0
                    : !strcmp(argv[i], "q4_k") ? ENG_WEIGHTS_Q4_K
                                               : ENG_WEIGHTS_F32;
        }
        else if (!strcmp(a, "--kv") && has && (!strcmp(argv[i + 1], "f32") || !strcmp(argv[i + 1], "f16")))
            kv16 = !strcmp(argv[++i], "f16");
        else { fputs(usage_text, stderr); return 2; }
    }
    int batches[MAX_BATCHES], nb = 0;
    if (!dir || threads < 1 || reps < 1 || reps > 100 || pp < 1 || tg < 1 || hist < 1 || nnew < 1 || rreps < 1 ||
        rreps > 1000 || freps < 1 || freps > 1000 || parse_batches(batches_arg, batches, &nb) != 0) {
        fputs(usage_text, stderr);
        return 2;
    }
    int bmax = 0;
    for (int i = 0; i < nb; i++) if (batches[i] > bmax) bmax = batches[i];

    printf("command:");
    for (int i = 0; i < argc; i++) printf(" %s", argv[i]);
    printf("\n");
    const char *env[] = {"OMP_WAIT_POLICY", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE"};
    printf("environment:");
    for (size_t i = 0; i < sizeof env / sizeof env[0]; i++) printf(" %s=%s", env[i], getenv(env[i]) ? getenv(env[i]) : "(unset)");
    printf("\n");

    /* Context: the agent grows by nnew+1 per turn over rreps+1 turns (one
     * warm-up); (d) repeats its history plus nnew. */
    const int bt_tokens = 16;
    long agent_max = (long)hist + 1 + (long)(rreps + 1) * (nnew + 1);
    long need_ctx = agent_max + nnew + 1;
    if (pp + tg > need_ctx) need_ctx = pp + tg;
    if (need_ctx > 1L << 20) { fprintf(stderr, "bench: sizes too large\n"); return 2; }
    int max_ctx = need_ctx > 4096 ? (int)need_ctx : 4096;

    eng_model *m;
    char err[512];
    eng_options o = {.n_threads = threads, .max_batch_tokens = 512, .max_context = max_ctx, .weights = wkind,
                     .kv_f16 = kv16};
    if (eng_model_open(&m, dir, &o, err, sizeof err) != ENG_OK) { fprintf(stderr, "bench: %s\n", err); return 1; }
    const eng_config *c = eng_model_config(m);
    if (c->max_position < need_ctx) {
        fprintf(stderr, "bench: the model's context (%d) is shorter than the test needs (%ld)\n", c->max_position,
                need_ctx);
        eng_model_close(m);
        return 2;
    }

    /* Pool: part 1's sequences at once, plus everything alive at once in part
     * 2 (the agent at its largest, an (a)/(b) turn, a (c)/(d) request), plus
     * one spare block per sequence. Part 1's blocks stay cached but are
     * evictable, so this is generous. */
    long blocks_seq = (pp + tg + bt_tokens - 1) / bt_tokens + 1;
    long blocks_p1 = bmax * blocks_seq;
    long blocks_p2 = (agent_max + nnew + bt_tokens) / bt_tokens + 1 + (nnew + 1 + bt_tokens) / bt_tokens + 1 +
                     2 * ((agent_max + nnew + 1 + bt_tokens) / bt_tokens + 1);
    long n_blocks = blocks_p1 + blocks_p2 + 16;
    double kv_token_bytes = 2.0 * c->n_layers * c->n_kv_heads * c->head_dim * 4;
    eng_engine_options eo = {.n_blocks = (int)n_blocks, .block_tokens = bt_tokens, .max_step_tokens = 512,
                             .max_running = bmax > 16 ? bmax : 16, .max_queue = 0};
    eng_engine *e;
    if (eng_engine_open(&e, m, &eo, err, sizeof err) != ENG_OK) {
        fprintf(stderr, "bench: %s\n", err);
        eng_model_close(m);
        return 1;
    }
    printf("model: %s (%.0f MiB of weights, %d layers, %d KV heads x %d, vocab %d)\n", dir,
           eng_model_weight_bytes(m) / 1048576.0, c->n_layers, c->n_kv_heads, c->head_dim, c->vocab_size);
    printf("engine: %d threads, context %d, pool %ld blocks x %d tokens (%.0f MiB of KV, %.1f KiB/token), "
           "max_step_tokens %d, max_running %d\n\n",
           threads, max_ctx < c->max_position ? max_ctx : c->max_position, n_blocks, bt_tokens, n_blocks * bt_tokens * kv_token_bytes / 1048576,
           kv_token_bytes / 1024, eo.max_step_tokens, eo.max_running);
    fflush(stdout);

    int rc = 1;
    uint64_t rng = 88172645463325252ull;
    size_t ids_cap = (size_t)bmax * pp;
    if ((size_t)need_ctx > ids_cap) ids_cap = (size_t)need_ctx;
    int32_t *ids = malloc(ids_cap * sizeof *ids);
    int32_t *history = malloc((size_t)(agent_max + nnew + 1) * sizeof *history); /* the agent's tokens */
    int na = rreps > freps ? rreps : freps;
    double *ttft_a = malloc((size_t)na * sizeof(double)), *recon = malloc((size_t)na * sizeof(double));
    double *ttft_b = malloc((size_t)na * sizeof(double)), *ttft_c = malloc((size_t)na * sizeof(double));
    double *ttft_d = malloc((size_t)na * sizeof(double));
    eng_usage *use_a = malloc((size_t)na * sizeof *use_a), use_c = {0}, use_d = {0};
    run_state st;
    memset(&st, 0, sizeof st);
    if (!ids || !history || !ttft_a || !recon || !ttft_b || !ttft_c || !ttft_d || !use_a || run_alloc(&st, bmax) != 0) {
        fprintf(stderr, "bench: out of memory\n");
        goto out;
    }

    /* ---- 1. batched prefill + decode ---- */
    printf("## Batched generation (greedy, ignore_eos; mean of %d reps after a warm-up)\n\n", reps);
    printf("| %5s | %5s | %4s | %6s | %8s | %9s | %8s | %9s | %7s | %8s | %9s | %6s |\n", "PP", "TG", "B", "N_KV",
           "T_PP s", "S_PP t/s", "T_TG s", "S_TG t/s", "+/-", "T s", "S t/s", "steps");
    printf("|-------|-------|------|--------|----------|-----------|----------|-----------|---------|----------|"
           "-----------|--------|\n");
    fflush(stdout);
    {
        batch_times w;
        if (run_batch(e, &st, ids, batches[0], pp, tg, c->vocab_size, &rng, &w) != 0) goto out;
    }
    for (int bi = 0; bi < nb; bi++) {
        int B = batches[bi];
        double tpp[100], ttg[100], tt[100], spp[100], stg[100], s[100];
        int steps = 0;
        for (int k = 0; k < reps; k++) {
            batch_times bt;
            if (run_batch(e, &st, ids, B, pp, tg, c->vocab_size, &rng, &bt) != 0) goto out;
            tpp[k] = bt.t_pp; ttg[k] = bt.t_tg; tt[k] = bt.t;
            spp[k] = B * (double)pp / bt.t_pp;
            stg[k] = tg > 1 && bt.t_tg > 0 ? B * (double)(tg - 1) / bt.t_tg : 0;
            s[k] = B * (double)(pp + tg) / bt.t;
            steps = bt.steps;
        }
        printf("| %5d | %5d | %4d | %6d | %8.3f | %9.1f | %8.3f | %9.1f | %7.1f | %8.3f | %9.1f | %6d |\n", pp, tg, B,
               B * (pp + tg), stats(tpp, reps).mean, stats(spp, reps).mean, stats(ttg, reps).mean,
               stats(stg, reps).mean, stats(stg, reps).sd, stats(tt, reps).mean, stats(s, reps).mean, steps);
        fflush(stdout);
    }

    /* ---- 2. agent resume ---- */
    printf("\n## Agent resume (history %d tokens, %d new tokens per turn, max_tokens 1)\n\n", hist, nnew);
    int nh = 0;
    {
        double t_build;
        fill_random(history, (size_t)hist, c->vocab_size, &rng);
        if (run_one(e, &st, history, (size_t)hist, "a", &t_build, NULL) != 0) goto out;
        nh = hist;
        history[nh++] = st.last_token[0];
        printf("agent built: %d-token prompt prefilled in %.3f s (%.1f t/s), usage prompt %d cached %d\n", hist,
               t_build, hist / t_build, st.usage[0].prompt_tokens, st.usage[0].cached_tokens);
    }
    /* (a) follow-up turns; the first one is a warm-up */
    int anomalies = 0;
    for (int k = -1; k < rreps; k++) {
        double t, ts;
        fill_random(history + nh, (size_t)nnew, c->vocab_size, &rng);
        if (run_one(e, &st, history + nh, (size_t)nnew, "a", &t, &ts) != 0) goto out;
        nh += nnew;
        history[nh++] = st.last_token[0];
        if (k < 0) continue;
        ttft_a[k] = t;
        recon[k] = ts;
        use_a[k] = st.usage[0];
        /* expected: the whole history is context, only the new ids and the
         * previous turn's sampled token (no KV yet) are prefilled */
        if (use_a[k].prompt_tokens != nh - 1 || use_a[k].cached_tokens != nh - 1 - (nnew + 1)) anomalies++;
    }
    /* (b) fresh short requests; (c) fresh full-length requests */
    for (int k = -1; k < rreps; k++) {
        double t;
        fill_random(ids, (size_t)nnew, c->vocab_size, &rng);
        if (run_one(e, &st, ids, (size_t)nnew, NULL, &t, NULL) != 0) goto out;
        if (k >= 0) ttft_b[k] = t;
    }
    for (int k = 0; k < freps; k++) {
        double t;
        fill_random(ids, (size_t)(hist + nnew), c->vocab_size, &rng);
        if (run_one(e, &st, ids, (size_t)(hist + nnew), NULL, &t, NULL) != 0) goto out;
        ttft_c[k] = t;
        use_c = st.usage[0];
    }
    /* (d) the agent's exact history + new ids, without the agent */
    for (int k = 0; k < freps; k++) {
        double t;
        memcpy(ids, history, (size_t)nh * sizeof *ids);
        fill_random(ids + nh, (size_t)nnew, c->vocab_size, &rng);
        if (run_one(e, &st, ids, (size_t)(nh + nnew), NULL, &t, NULL) != 0) goto out;
        ttft_d[k] = t;
        use_d = st.usage[0];
    }

    {
        int amin = use_a[0].prompt_tokens, amax = use_a[rreps - 1].prompt_tokens;
        stat2 sa = stats(ttft_a, rreps), sb = stats(ttft_b, rreps), sc = stats(ttft_c, freps), sd = stats(ttft_d, freps);
        stat2 sr = stats(recon, rreps);
        double a50 = percentile(ttft_a, rreps, 50), a95 = percentile(ttft_a, rreps, 95);
        double b50 = percentile(ttft_b, rreps, 50), b95 = percentile(ttft_b, rreps, 95);
        double r50 = percentile(recon, rreps, 50), r95 = percentile(recon, rreps, 95), rmax = recon[rreps - 1];
        printf("\n| %-44s | %4s | %16s | %9s | %9s | %9s |\n", "time to first token", "n", "context (cached)",
               "p50 ms", "p95 ms", "mean ms");
        printf("|----------------------------------------------|------|------------------|-----------|-----------|----"
               "-------|\n");
        char ctx[64];
        snprintf(ctx, sizeof ctx, "%d-%d", amin, amax);
        printf("| %-44s | %4d | %16s | %9.2f | %9.2f | %9.2f |\n", "(a) agent follow-up, new tokens only", rreps, ctx,
               a50 * 1e3, a95 * 1e3, sa.mean * 1e3);
        snprintf(ctx, sizeof ctx, "%d (0)", nnew);
        printf("| %-44s | %4d | %16s | %9.2f | %9.2f | %9.2f |\n", "(b) fresh request, new tokens only", rreps, ctx,
               b50 * 1e3, b95 * 1e3, sb.mean * 1e3);
        snprintf(ctx, sizeof ctx, "%d (%d)", use_c.prompt_tokens, use_c.cached_tokens);
        printf("| %-44s | %4d | %16s | %9s | %9s | %9.2f |\n", "(c) fresh request, history + new tokens", freps, ctx,
               "", "", sc.mean * 1e3);
        snprintf(ctx, sizeof ctx, "%d (%d)", use_d.prompt_tokens, use_d.cached_tokens);
        printf("| %-44s | %4d | %16s | %9s | %9s | %9.2f |\n", "(d) agent's history + new, no agent (prefix)", freps,
               ctx, "", "", sd.mean * 1e3);
        printf("\n(a) usage per turn (prompt_tokens / cached_tokens -> prefilled):");
        for (int k = 0; k < rreps; k++) {
            if (k % 5 == 0) printf("\n   ");
            printf(" %d/%d->%d", use_a[k].prompt_tokens, use_a[k].cached_tokens,
                   use_a[k].prompt_tokens - use_a[k].cached_tokens);
        }
        printf("\n(a) turns whose usage is not prompt = history, prefilled = new + 1: %d of %d\n", anomalies, rreps);
        printf("(a) agent grows by %d tokens per turn (not rebuilt): context %d -> %d over the %d timed turns\n",
               nnew + 1, amin, amax, rreps);
        printf("(a) reconstruction (time inside eng_submit): p50 %.1f us, p95 %.1f us, max %.1f us, mean %.1f us\n",
               r50 * 1e6, r95 * 1e6, rmax * 1e6, sr.mean * 1e6);
        printf("speed-up of (a) over (c): %.1fx (mean TTFT)\n", sc.mean / sa.mean);
        eng_agent_info ai;
        if (eng_agent_get(e, "bench", "a", &ai) == ENG_OK)
            printf("agent \"a\": %d tokens, %d with KV, %d blocks, busy %d\n", ai.n_tokens, ai.n_cached, ai.n_blocks,
                   ai.busy);
        else
            printf("agent \"a\": not found by eng_agent_get\n");
    }

    /* ---- 3. pool and machine ---- */
    {
        eng_stats es;
        eng_stats_get(e, &es);
        printf("\n## Pool\n\nblocks: total %d, free %d (of which cached %d), used %d, shared %d; block %d tokens\n",
               es.blocks_total, es.blocks_free, es.blocks_cached, es.blocks_used, es.blocks_shared, es.block_tokens);
        printf("running %d, waiting %d, agents %d, prefix hit tokens %llu, preemptions %llu\n", es.running, es.waiting,
               es.agents, (unsigned long long)es.prefix_hit_tokens, (unsigned long long)es.preemptions);
        double gbps = eng_measure_read_gbps(1024, threads);
        double gflops = eng_measure_sgemm_gflops(1024, threads);
        printf("\nmachine: read bandwidth %.1f GB/s, sgemm %.1f GFLOP/s (1024^3), %d threads\n", gbps, gflops, threads);
    }
    rc = 0;
out:
    run_free(&st);
    free(ids); free(history); free(ttft_a); free(recon); free(ttft_b); free(ttft_c); free(ttft_d); free(use_a);
    eng_engine_close(e);
    eng_model_close(m);
    return rc;
}
