/* bench_engine.c — prefill and decode throughput in llama-bench's terms
 * (pp128, pp512, tg64), next to the machine's limits measured in the same
 * run: read bandwidth (decode streams every weight once per token) and sgemm
 * GFLOP/s (prefill is matrix products).
 *
 *   bench_engine --model DIR [--threads 2] [--reps 3]
 */
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

int main(int argc, char **argv) {
    const char *dir = NULL;
    int threads = 2, reps = 3;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--model") && i + 1 < argc) dir = argv[++i];
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc) threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
        else { fprintf(stderr, "usage: bench_engine --model DIR [--threads N] [--reps N]\n"); return 2; }
    }
    if (!dir || threads < 1 || reps < 1 || reps > 100) { fprintf(stderr, "usage: bench_engine --model DIR [--threads N] [--reps N]\n"); return 2; }

    double gbps = eng_measure_read_gbps(1024, threads);
    double gflops = eng_measure_sgemm_gflops(1024, threads);

    eng_model *m;
    char err[512];
    eng_options o = {.n_threads = threads, .max_batch_tokens = 512, .max_context = 1024};
    if (eng_model_open(&m, dir, &o, err, sizeof err) != ENG_OK) { fprintf(stderr, "bench: %s\n", err); return 1; }
    const eng_config *c = eng_model_config(m);
    double wbytes = (double)eng_model_weight_bytes(m);
    double params = wbytes / 4;
    /* weights streamed per decoded token: all layers + the LM head (the
     * embedding row read is negligible; tied models read the matrix once). */
    double H = c->hidden_size, F = c->intermediate_size, L = c->n_layers;
    double QD = (double)c->n_heads * c->head_dim, KD = (double)c->n_kv_heads * c->head_dim, V = c->vocab_size;
    double layer_params = H * (QD + 2 * KD) + QD * H + 3 * H * F;
    double token_bytes = 4 * (L * layer_params + V * H);
    double flops_per_token = 2 * (L * layer_params + V * H);

    const int tests[][2] = {{128, 0}, {512, 0}, {0, 64}};
    const char *names[] = {"pp128", "pp512", "tg64"};
    printf("model: %s (%.1fM params, %.0f MiB F32, %s files)\n", dir, params / 1e6, wbytes / 1048576, c->dtype);
    printf("machine: read bandwidth %.1f GB/s, sgemm %.1f GFLOP/s (1024^3), %d threads\n\n", gbps, gflops, threads);
    printf("| %-6s | %9s | %8s | %-22s | %s\n", "test", "t/s", "+/-", "machine limit (t/s)", "fraction");
    printf("|--------|-----------|----------|------------------------|---------\n");
    eng_gen_params gp;
    memset(&gp, 0, sizeof gp);
    eng_sampling_default(&gp.sampling);
    gp.ignore_eos = 1;
    int32_t *ids = malloc(1024 * sizeof *ids);
    uint64_t x = 88172645463325252ull;
    for (int t = 0; t < 3; t++) {
        double r[100];
        int np = tests[t][0] ? tests[t][0] : 1, ng = tests[t][1];
        for (int k = 0; k < reps + 1; k++) { /* first run warms up */
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
            eng_gen_result_free(&res);
        }
        stat2 s = stats(r, reps);
        double limit = ng ? gbps * 1e9 / token_bytes : gflops * 1e9 / flops_per_token;
        char lim[64];
        snprintf(lim, sizeof lim, "%.0f (%s)", limit, ng ? "bandwidth" : "sgemm");
        printf("| %-6s | %9.1f | %8.1f | %-22s | %.2f\n", names[t], s.mean, s.sd, lim, s.mean / limit);
    }
    printf("\nbytes of weights per decoded token: %.0f MB; FLOPs per prefilled token: %.2f GFLOP\n", token_bytes / 1e6,
           flops_per_token / 1e9);
    free(ids);
    eng_model_close(m);
    return 0;
}
