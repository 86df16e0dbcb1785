/* bench_engine.c — prefill and decode throughput in llama-bench's terms
 * (pp128, pp512, tg64), next to the machine's limits measured in the same
 * run: read bandwidth (decode streams every weight once per token) and sgemm
 * GFLOP/s (prefill is matrix products).
 *
 *   bench_engine --model MODEL [--threads 2] [--reps 3] [--weights f32,bf16,kv16,q8]
 * (MODEL: a directory or a GGUF file)
 *
 * Each precision runs in a fresh model; the perplexity of a fixed text and
 * the resident size are reported for each, and the BF16/F32 ratios.
 */
#include "bench_util.h"
#include "eng.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct { double mean, sd; } stat2;

static stat2 stats(const double *x, int n) {
    stat2 s = {0, 0};
    for (int i = 0; i < n; i++) s.mean += x[i];
    s.mean /= n;
    for (int i = 0; i < n; i++) s.sd += (x[i] - s.mean) * (x[i] - s.mean);
    s.sd = n > 1 ? sqrt(s.sd / (n - 1)) : 0;
    return s;
}

/* Resident set size of this process, bytes. */
/* A /proc/self/status figure in bytes: "VmRSS:" (resident now), "VmHWM:" (the peak). */
static double status_bytes(const char *key) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    double kb = 0;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, key, strlen(key))) kb = atof(line + strlen(key));
    if (f) fclose(f);
    return kb * 1024;
}
static double rss_bytes(void) { return status_bytes("VmRSS:"); }

/* A fixed text for the perplexity check: the same ids for every precision. */
static const char *PPL_TEXT =
    "The quick brown fox jumps over the lazy dog. In the beginning the Universe was created. This has made a lot of "
    "people very angry and been widely regarded as a bad move. It was the best of times, it was the worst of times, "
    "it was the age of wisdom, it was the age of foolishness, it was the epoch of belief, it was the epoch of "
    "incredulity. Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my "
    "purse, and nothing particular to interest me on shore, I thought I would sail about a little and see the "
    "watery part of the world.";

typedef struct {
    double tps[3], sd[3], limit[3], ppl, rss, wbytes, kv_bytes, peak_load, rss_load;
    double paired; /* tg64: median of each run's fraction of the probe read just before and after it */
} run_result;

/* pp128, pp512, tg64 and the perplexity of PPL_TEXT with the given weights. */
static int run(const char *dir, int threads, int reps, int wkind, int kv16, double gbps, double gflops,
               const char *only, eng_probe *probe, run_result *out) {
    eng_model *m;
    char err[512];
    eng_options o = {.n_threads = threads, .max_batch_tokens = 512, .max_context = 1024, .weights = wkind,
                     .kv_f16 = kv16};
    FILE *cr = fopen("/proc/self/clear_refs", "w"); /* "5": the peak restarts from the resident set now */
    if (cr) {
        fputs("5", cr);
        fclose(cr);
    }
    double before = rss_bytes();
    if (eng_model_open(&m, dir, &o, err, sizeof err) != ENG_OK) { fprintf(stderr, "bench: %s\n", err); return 1; }
    out->peak_load = status_bytes("VmHWM:") - before; /* what the load added at its peak */
    out->rss_load = rss_bytes() - before;
    const eng_config *c = eng_model_config(m);
    /* weights streamed per decoded token: all layers + the LM head (the
     * embedding row read is negligible; tied models read the matrix once). */
    double H = c->hidden_size, F = c->intermediate_size, L = c->n_layers;
    double QD = (double)c->n_heads * c->head_dim, KD = (double)c->n_kv_heads * c->head_dim, V = c->vocab_size;
    double layer_params = H * (QD + 2 * KD) + QD * H + 3 * H * F;
    /* bytes per weight as held (F32 4, BF16 2, Q8_0 1.125, the K-quants their mix): the
     * weights' bytes over their count, an untied embedding counted but not read per token */
    double held = L * layer_params + V * H * (c->tie_embeddings ? 1 : 2);
    out->wbytes = (double)eng_model_weight_bytes(m);
    double wb = out->wbytes / held;
    double token_bytes = wb * (L * layer_params + V * H);
    double flops_per_token = 2 * (L * layer_params + V * H);
    out->kv_bytes = 1024.0 * L * 2 * KD * (kv16 ? 2 : 4); /* the dense single-sequence cache of max_context 1024 */
    const int tests[][2] = {{128, 0}, {512, 0}, {0, 64}};
    eng_gen_params gp;
    memset(&gp, 0, sizeof gp);
    eng_sampling_default(&gp.sampling);
    gp.ignore_eos = 1;
    int32_t *ids = malloc(1024 * sizeof *ids);
    uint64_t x = 88172645463325252ull;
    const char *tname[3] = {"pp128", "pp512", "tg64"};
    for (int t = 0; t < 3; t++) {
        double r[100];
        out->tps[t] = out->sd[t] = 0;
        out->limit[t] = 1;
        if (only && !strstr(only, tname[t])) continue;
        int np = tests[t][0] ? tests[t][0] : 1, ng = tests[t][1];
        double pair[100];
        for (int k = 0; k < reps + 1; k++) { /* first run warms up */
            double g0 = ng && k ? eng_probe_read_gbps(probe, 2) : 0;
            for (int i = 0; i < np; i++) {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                ids[i] = (int32_t)(x % (uint64_t)c->vocab_size);
            }
            gp.max_tokens = ng ? ng + 1 : 1;
            eng_gen_result res;
            if (eng_generate(m, ids, (size_t)np, &gp, NULL, NULL, &res, err, sizeof err) != ENG_OK) {
                fprintf(stderr, "bench: %s\n", err);
                return 1;
            }
            /* tg: ng forward passes after the first sampled token */
            double v = ng ? ng / res.decode_seconds : np / res.prefill_seconds;
            if (k) r[k - 1] = v;
            if (ng && k) pair[k - 1] = v * token_bytes / ((g0 + eng_probe_read_gbps(probe, 2)) / 2 * 1e9);
            eng_gen_result_free(&res);
        }
        stat2 s = stats(r, reps);
        out->tps[t] = s.mean;
        out->sd[t] = s.sd;
        out->limit[t] = ng ? gbps * 1e9 / token_bytes : gflops * 1e9 / flops_per_token;
        if (ng) out->paired = percentile(pair, reps, 50);
    }
    int32_t *pids = NULL;
    size_t n = 0;
    double ppl = 0;
    if (eng_tok_encode(eng_model_tok(m), PPL_TEXT, strlen(PPL_TEXT), 1, &pids, &n) == ENG_OK) {
        double *lp = malloc(n * sizeof *lp);
        if (lp && eng_score(m, pids, n, lp, &ppl, err, sizeof err) != ENG_OK) ppl = 0;
        free(lp);
    }
    free(pids);
    out->ppl = ppl;
    out->rss = rss_bytes();
    free(ids);
    eng_model_close(m);
    return 0;
}

int main(int argc, char **argv) {
    eng_blas_select(argv); /* AVX-512 BLAS kernels where OpenBLAS would not pick them */
    const char *dir = NULL, *weights = "f32,bf16,kv16,q8", *only = NULL;
    int threads = 2, reps = 3;
    const char *usage = "usage: bench_engine --model MODEL [--threads N] [--reps N] [--weights f32,bf16,kv16,q8,q4k]\n"
                        "                    [--tests pp128,pp512,tg64]\n"
                        "  (q4k: ggml's K-quants; a K-quant GGUF file's own blocks, else quantized to Q4_K)\n";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--model") && i + 1 < argc) dir = argv[++i];
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc) threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--weights") && i + 1 < argc) weights = argv[++i];
        else if (!strcmp(argv[i], "--tests") && i + 1 < argc) only = argv[++i];
        else { fputs(usage, stderr); return 2; }
    }
    if (!dir || threads < 1 || reps < 1 || reps > 100) { fputs(usage, stderr); return 2; }

    /* the limits: the best of three probes (a shared machine only ever
     * measures lower than what it can do) */
    double gbps = 0, gflops = 0;
    for (int i = 0; i < 3; i++) {
        double g = eng_measure_read_gbps(1024, threads), f = eng_measure_sgemm_gflops(1024, threads);
        gbps = g > gbps ? g : gbps;
        gflops = f > gflops ? f : gflops;
    }
    /* read again before and after each decode run (256 MiB, best of 2) */
    const size_t probe_mib = 256;
    eng_probe *probe = eng_probe_new(probe_mib, threads);
    if (!probe) { fputs("bench: out of memory\n", stderr); return 1; }
    printf("model: %s\nmachine: read bandwidth %.1f GB/s, sgemm %.1f GFLOP/s (1024^3, OpenBLAS %s kernels), %d threads\n\n",
           dir, gbps, gflops, eng_blas_core(), threads);
    printf("| weights | KV  | test   |       t/s |      +/- | machine limit (t/s)    | fraction | paired\n");
    printf("|---------|-----|--------|-----------|----------|------------------------|----------|-------\n");
    const char *names[] = {"pp128", "pp512", "tg64"};
    /* F32; BF16 weights; F32 weights with an F16 KV cache; Q8_0 weights; K-quants */
    enum { NC = 5 };
    const char *cfg_name[NC] = {"f32", "bf16", "kv16", "q8", "q4k"}, *wname[NC] = {"F32", "BF16", "F32", "Q8_0", "K"};
    const int cfg_w[NC] = {ENG_WEIGHTS_F32, ENG_WEIGHTS_BF16, ENG_WEIGHTS_F32, ENG_WEIGHTS_Q8_0, ENG_WEIGHTS_Q4_K},
              cfg_kv16[NC] = {0, 0, 1, 0, 0};
    run_result rr[NC];
    int have[NC];
    for (int b = 0; b < NC; b++) {
        have[b] = strstr(weights, cfg_name[b]) != NULL;
        if (!have[b]) continue;
        if (run(dir, threads, reps, cfg_w[b], cfg_kv16[b], gbps, gflops, only, probe, &rr[b])) return 1;
        rr[b].rss -= (double)(probe_mib << 20); /* not the model's */
        for (int t = 0; t < 3; t++) {
            char pv[16] = "";
            if (t == 2) snprintf(pv, sizeof pv, "%.2f", rr[b].paired);
            if (!only || strstr(only, names[t]))
                printf("| %-7s | %-3s | %-6s | %9.1f | %8.1f | %6.0f (%-9s)      | %8.2f | %s\n", wname[b],
                       cfg_kv16[b] ? "F16" : "F32", names[t], rr[b].tps[t], rr[b].sd[t], rr[b].limit[t],
                       t == 2 ? "bandwidth" : "sgemm", rr[b].tps[t] / rr[b].limit[t], pv);
        }
    }
    printf("\n");
    const char *label[NC] = {"F32", "BF16 weights", "F16 KV", "Q8_0 weights", "K-quant weights"};
    for (int b = 0; b < NC; b++)
        if (have[b]) {
            printf("%s: fixed text: mean negative log-likelihood %.6f nats/token (perplexity %.4g); weights %.0f MiB, "
                   "KV %.0f MiB, resident %.0f MiB (weights + KV + %.0f MiB)",
                   label[b], log(rr[b].ppl), rr[b].ppl, rr[b].wbytes / 1048576, rr[b].kv_bytes / 1048576,
                   rr[b].rss / 1048576, (rr[b].rss - rr[b].wbytes - rr[b].kv_bytes) / 1048576);
            printf("; the load added %.0f MiB to the resident set at its peak, %.0f MiB once done",
                   rr[b].peak_load / 1048576, rr[b].rss_load / 1048576);
            printf("\n");
        }
    for (int b = 1; b < NC; b++)
        if (have[0] && have[b])
            printf("%s / F32: decode %.2fx, pp512 %.2fx; perplexity %+.4f%% (%+.6f nats/token)\n", label[b],
                   rr[b].tps[2] / rr[0].tps[2], rr[b].tps[1] / rr[0].tps[1], 100 * (rr[b].ppl / rr[0].ppl - 1),
                   log(rr[b].ppl) - log(rr[0].ppl));
    eng_probe_free(probe);
    return 0;
}
