/* measure.c — the machine's limits, measured the way the engine uses it:
 * sgemm throughput (the compute ceiling of prefill) and streaming read bandwidth
 * (single-sequence decode reads every weight once per token). */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

double eng_measure_sgemm_gflops(int n, int n_threads) {
    float *a = malloc((size_t)n * n * sizeof(float)), *b = malloc((size_t)n * n * sizeof(float)),
          *c = malloc((size_t)n * n * sizeof(float));
    double best = 0;
    if (a && b && c) {
        for (size_t i = 0; i < (size_t)n * n; i++) { a[i] = (float)(i % 7) * 0.1f; b[i] = (float)(i % 5) * 0.1f; }
        int was = eng__blas_threads(n_threads);
        for (int r = 0; r < 5; r++) {
            double t0 = eng__now();
            eng__sgemm(1, n, n, n, 1.0f, a, n, b, n, c, n);
            double dt = eng__now() - t0, g = 2.0 * n * (double)n * n / dt / 1e9;
            if (g > best) best = g;
        }
        eng__blas_threads(was);
    }
    free(a); free(b); free(c);
    return best;
}

typedef struct {
    const float *buf;
    size_t blocks;   /* of 4096 floats */
    float part[64];  /* one partial sum per thread */
} read_job;

/* Sum one block with 16 independent accumulators so it vectorises and is
 * bound by loads. */
#define READ_TASKS 64
static void read_task(void *ctx, int task, int thread) {
    read_job *j = ctx;
    float acc[16] = {0};
    size_t per = j->blocks / READ_TASKS;
    const float *p = j->buf + (size_t)task * per * 4096;
    for (size_t i = 0; i < per * 4096; i += 16)
        for (int k = 0; k < 16; k++) acc[k] += p[i + k];
    for (int k = 0; k < 16; k++) j->part[thread] += acc[k];
}

double eng_measure_read_gbps(size_t mbytes, int n_threads) {
    size_t n = mbytes * 1024 * 1024 / sizeof(float);
    float *buf = malloc(n * sizeof(float));
    eng__pool *pool = eng__pool_new(n_threads > 64 ? 64 : n_threads);
    double best = 0;
    if (buf && pool) {
        for (size_t i = 0; i < n; i++) buf[i] = (float)(i & 1023);
        volatile float sink = 0;
        for (int r = 0; r < 5; r++) {
            read_job j = {buf, n / 4096, {0}};
            double t0 = eng__now();
            eng__pool_run(pool, READ_TASKS, read_task, &j);
            double dt = eng__now() - t0, g = (double)(j.blocks / READ_TASKS * READ_TASKS * 4096) * sizeof(float) / dt / 1e9;
            for (int k = 0; k < 64; k++) sink += j.part[k];
            if (g > best) best = g;
        }
        (void)sink;
    }
    eng__pool_free(pool);
    free(buf);
    return best;
}
