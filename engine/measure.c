/* measure.c — the machine's limits, measured the way the engine uses it:
 * sgemm throughput (prefill is sgemm-bound) and streaming read bandwidth
 * (single-sequence decode reads every weight once per token). */
#include "internal.h"

#include <cblas.h>
#include <stdlib.h>
#include <string.h>

double eng_measure_sgemm_gflops(int n, int n_threads) {
    float *a = malloc((size_t)n * n * sizeof(float)), *b = malloc((size_t)n * n * sizeof(float)),
          *c = malloc((size_t)n * n * sizeof(float));
    double best = 0;
    if (a && b && c) {
        for (size_t i = 0; i < (size_t)n * n; i++) { a[i] = (float)(i % 7) * 0.1f; b[i] = (float)(i % 5) * 0.1f; }
        openblas_set_num_threads(n_threads);
        for (int r = 0; r < 5; r++) {
            double t0 = eng__now();
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
            double dt = eng__now() - t0, g = 2.0 * n * (double)n * n / dt / 1e9;
            if (g > best) best = g;
        }
    }
    free(a); free(b); free(c);
    return best;
}

double eng_measure_read_gbps(size_t mbytes, int n_threads) {
    size_t n = mbytes * 1024 * 1024 / sizeof(float);
    float *buf = malloc(n * sizeof(float));
    if (!buf) return 0;
    for (size_t i = 0; i < n; i++) buf[i] = (float)(i & 1023);
    double best = 0;
    volatile float sink = 0;
    for (int r = 0; r < 5; r++) {
        double t0 = eng__now();
        float total = 0;
        /* 16 independent accumulators so the sum vectorises and is bound by loads */
#pragma omp parallel for reduction(+ : total) num_threads(n_threads) schedule(static)
        for (size_t blk = 0; blk < n / 4096; blk++) {
            float acc[16] = {0};
            const float *p = buf + blk * 4096;
            for (size_t i = 0; i < 4096; i += 16)
                for (int k = 0; k < 16; k++) acc[k] += p[i + k];
            for (int k = 0; k < 16; k++) total += acc[k];
        }
        double dt = eng__now() - t0, g = (double)(n / 4096 * 4096) * sizeof(float) / dt / 1e9;
        sink += total;
        if (g > best) best = g;
    }
    (void)sink;
    free(buf);
    return best;
}
