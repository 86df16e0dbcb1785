/* bench_rag.c — RAG cache lookup time at N entries of D dimensions against a
 * real Redis, next to the memory-bandwidth bound of the similarity scan.
 *
 *   bench_rag --redis redis://127.0.0.1:6379/0 [--entries 10000,100000] [--dim 384] [--lookups 200]
 */
#include "eng.h"
#include "kvc.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static uint64_t rng = 88172645463325252ull;
static float frand(void) {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return (float)((rng >> 11) * 0x1.0p-53) * 2 - 1;
}

int main(int argc, char **argv) {
    const char *url = NULL, *sizes = "10000,100000";
    int dim = 384, lookups = 200;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--redis") && i + 1 < argc) url = argv[++i];
        else if (!strcmp(argv[i], "--entries") && i + 1 < argc) sizes = argv[++i];
        else if (!strcmp(argv[i], "--dim") && i + 1 < argc) dim = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--lookups") && i + 1 < argc) lookups = atoi(argv[++i]);
        else { fprintf(stderr, "usage: bench_rag --redis URL [--entries N,M] [--dim D] [--lookups K]\n"); return 2; }
    }
    if (!url || dim < 2 || lookups < 1) { fprintf(stderr, "usage: bench_rag --redis URL ...\n"); return 2; }
    char err[256];
    kvc_redis_options ro = {.url = url, .command_timeout_ms = 5000};
    kvc_redis *r;
    if (kvc_redis_open(&r, &ro, err, sizeof err)) { fprintf(stderr, "bench_rag: %s\n", err); return 1; }
    double gbps = eng_measure_read_gbps(512, 2);
    printf("command:");
    for (int i = 0; i < argc; i++) printf(" %s", argv[i]);
    printf("\nread bandwidth (2 threads): %.1f GB/s\n\n", gbps);
    printf("| entries | dim | lookup p50 ms | lookup p99 ms | scan bound ms | store s (all) |\n|---|---|---|---|---|---|\n");
    float *e = malloc((size_t)dim * sizeof *e);
    double *t = malloc((size_t)lookups * sizeof *t);
    for (const char *p = sizes; *p;) {
        long n = strtol(p, (char **)&p, 10);
        if (*p == ',') p++;
        if (n <= 0) break;
        kvc_rag *g;
        kvc_rag_open(&g, r, NULL);
        char ns[32], q[64];
        snprintf(ns, sizeof ns, "bench-%ld", n);
        double t0 = now_s();
        for (long i = 0; i < n; i++) {
            for (int k = 0; k < dim; k++) e[k] = frand();
            snprintf(q, sizeof q, "query %ld", i);
            kvc_rag_query rq = {.tenant = "bench", .ns = ns, .model = "m", .top_k = 5, .query = q,
                                .query_len = strlen(q), .embedding = e, .dim = dim};
            if (kvc_rag_store(g, &rq, (const uint8_t *)"result", 6, 3600) != KVC_OK) {
                fprintf(stderr, "bench_rag: store failed at %ld\n", i);
                return 1;
            }
        }
        double store_s = now_s() - t0;
        kvc_rag_close(g); /* a fresh process-side index: the first lookup loads it */
        kvc_rag_open(&g, r, NULL);
        uint8_t *res;
        size_t len;
        float sim;
        int exact;
        for (int k = 0; k < dim; k++) e[k] = frand();
        kvc_rag_query warm = {.tenant = "bench", .ns = ns, .model = "m", .top_k = 5, .query = "warm",
                              .query_len = 4, .embedding = e, .dim = dim};
        kvc_rag_lookup(g, &warm, 0.95f, &res, &len, &sim, &exact);
        free(res);
        for (int i = 0; i < lookups; i++) {
            for (int k = 0; k < dim; k++) e[k] = frand();
            snprintf(q, sizeof q, "miss %d", i);
            kvc_rag_query rq = {.tenant = "bench", .ns = ns, .model = "m", .top_k = 5, .query = q,
                                .query_len = strlen(q), .embedding = e, .dim = dim};
            double a = now_s();
            kvc_rag_lookup(g, &rq, 0.95f, &res, &len, &sim, &exact); /* a full scan: random vectors miss */
            t[i] = (now_s() - a) * 1000;
            free(res);
        }
        qsort(t, (size_t)lookups, sizeof *t, cmp_d);
        double bound = (double)n * dim * 4 / (gbps * 1e9) * 1000;
        printf("| %ld | %d | %.3f | %.3f | %.3f | %.1f |\n", n, dim, t[lookups / 2], t[(lookups * 99) / 100], bound,
               store_s);
        kvc_rag_close(g);
    }
    printf("\nA lookup = exact GET + version GET (round trips to Redis) + one sgemv over the matrix.\n");
    free(e);
    free(t);
    kvc_redis_close(r);
    return 0;
}
