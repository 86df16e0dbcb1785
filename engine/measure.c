/* measure.c — the machine's limits, measured the way the engine uses it:
 * sgemm throughput (prefill is sgemm-bound) and streaming read bandwidth
 * (single-sequence decode reads every weight once per token). */
#include "internal.h"

#include <cblas.h>
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>
#include <string.h>

double eng_measure_sgemm_gflops(int n, int n_threads) {
    float *a = malloc((size_t)n * n * sizeof(float)), *b = malloc((size_t)n * n * sizeof(float)),
          *c = malloc((size_t)n * n * sizeof(float));
    double best = 0;
    if (a && b && c) {
        for (size_t i = 0; i < (size_t)n * n; i++) { a[i] = (float)(i % 7) * 0.1f; b[i] = (float)(i % 5) * 0.1f; }
        int was = openblas_get_num_threads();
        openblas_set_num_threads(n_threads);
        for (int r = 0; r < 5; r++) {
            double t0 = eng__now();
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
            double dt = eng__now() - t0, g = 2.0 * n * (double)n * n / dt / 1e9;
            if (g > best) best = g;
        }
        openblas_set_num_threads(was);
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

/* eng_dot_rows: slices of rows on a pool of its own (one thread per CPU,
 * made on first use). Bound by reading m; a plain loop the compiler
 * vectorises (OpenBLAS sgemv called from several threads at once would
 * serialise on its own lock, and in kvserve runs single-threaded). */
static eng__pool *dot_pool;
static pthread_once_t dot_once = PTHREAD_ONCE_INIT;
static void dot_pool_init(void) {
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    dot_pool = eng__pool_new(cpus < 1 ? 1 : cpus > 16 ? 16 : (int)cpus);
}

typedef struct {
    const float *m, *q;
    float *out;
    size_t n, dim, per;
} dot_job;

static void dot_task(void *ctx, int task, int thread) {
    (void)thread;
    const dot_job *j = ctx;
    size_t r0 = (size_t)task * j->per, r1 = r0 + j->per < j->n ? r0 + j->per : j->n, dim = j->dim;
    const float *restrict q = j->q;
    for (size_t r = r0; r < r1; r++) {
        const float *restrict row = j->m + r * dim;
        float acc[16] = {0}, s = 0; /* 16 partial sums: one vector */
        size_t k = 0;
        for (; k + 16 <= dim; k += 16)
            for (int l = 0; l < 16; l++) acc[l] += row[k + l] * q[k + l];
        for (; k < dim; k++) s += row[k] * q[k];
        for (int l = 0; l < 16; l++) s += acc[l];
        j->out[r] = s;
    }
}

void eng_dot_rows(const float *m, size_t n, size_t dim, const float *q, float *out) {
    if (n == 0) return;
    pthread_once(&dot_once, dot_pool_init);
    dot_job j = {m, q, out, n, dim, 2048};
    /* small tables on the caller alone */
    eng__pool_run(n * dim >= (1u << 18) ? dot_pool : NULL, (int)((n + j.per - 1) / j.per), dot_task, &j);
}
