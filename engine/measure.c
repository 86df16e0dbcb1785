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

/* The read probe: each thread sums its own contiguous part of the buffer,
 * as a decode product streams its share of the panels, with vector loads
 * into four independent accumulators so that the loads, not the adds, set
 * the pace. Every instruction set the CPU has is tried (on some CPUs
 * 512-bit loads stream slower than 256-bit ones) and the best is the
 * machine's figure; the kernels are chosen at run time, as the engine's. */
enum { RD_SCALAR, RD_AVX2, RD_AVX512, RD_N };

typedef struct {
    const float *buf;
    size_t n; /* floats, a multiple of 64 per thread */
    int T, isa;
    float part[64]; /* one partial sum per thread */
} read_job;

static float read_scalar(const float *p, size_t n) {
    float acc[16] = {0};
    for (size_t i = 0; i < n; i += 16)
        for (int k = 0; k < 16; k++) acc[k] += p[i + k];
    float s = 0;
    for (int k = 0; k < 16; k++) s += acc[k];
    return s;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
__attribute__((target("avx2"))) static float read_avx2(const float *p, size_t n) {
    __m256 a = _mm256_setzero_ps(), b = a, c = a, d = a;
    for (size_t i = 0; i < n; i += 32) {
        a = _mm256_add_ps(a, _mm256_loadu_ps(p + i));
        b = _mm256_add_ps(b, _mm256_loadu_ps(p + i + 8));
        c = _mm256_add_ps(c, _mm256_loadu_ps(p + i + 16));
        d = _mm256_add_ps(d, _mm256_loadu_ps(p + i + 24));
    }
    float t[8];
    _mm256_storeu_ps(t, _mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d)));
    return t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7];
}

__attribute__((target("avx512f"))) static float read_avx512(const float *p, size_t n) {
    __m512 a = _mm512_setzero_ps(), b = a, c = a, d = a;
    for (size_t i = 0; i < n; i += 64) {
        a = _mm512_add_ps(a, _mm512_loadu_ps(p + i));
        b = _mm512_add_ps(b, _mm512_loadu_ps(p + i + 16));
        c = _mm512_add_ps(c, _mm512_loadu_ps(p + i + 32));
        d = _mm512_add_ps(d, _mm512_loadu_ps(p + i + 48));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
}

static int read_isa_ok(int isa) {
    if (isa == RD_AVX2) return __builtin_cpu_supports("avx2");
    if (isa == RD_AVX512) return eng__cpu_avx512();
    return 1;
}
#else
static int read_isa_ok(int isa) { return isa == RD_SCALAR; }
#endif

static void read_part(void *ctx, int t, int thread) {
    read_job *j = ctx;
    size_t per = j->n / (size_t)j->T / 64 * 64;
    const float *p = j->buf + (size_t)t * per;
    float s;
#if defined(__x86_64__) && defined(__GNUC__)
    if (j->isa == RD_AVX512) s = read_avx512(p, per);
    else if (j->isa == RD_AVX2) s = read_avx2(p, per);
    else
#endif
        s = read_scalar(p, per);
    j->part[thread] = s;
}

struct eng_probe {
    float *buf;
    size_t n;
    eng__pool *pool;
};

eng_probe *eng_probe_new(size_t mbytes, int n_threads) {
    eng_probe *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->n = mbytes * 1024 * 1024 / sizeof(float);
    p->buf = malloc(p->n * sizeof(float));
    p->pool = eng__pool_new(n_threads > 64 ? 64 : n_threads);
    if (!p->buf || !p->pool) {
        eng_probe_free(p);
        return NULL;
    }
    for (size_t i = 0; i < p->n; i++) p->buf[i] = (float)(i & 1023);
    return p;
}

double eng_probe_read_gbps(eng_probe *p, int passes) {
    double best = 0;
    volatile float sink = 0;
    int T = eng__pool_threads(p ? p->pool : NULL);
    for (int r = 0; p && r < passes; r++)
        for (int isa = 0; isa < RD_N; isa++) {
            if (!read_isa_ok(isa)) continue;
            read_job j = {p->buf, p->n, T > 64 ? 64 : T, isa, {0}};
            double t0 = eng__now();
            eng__pool_each(p->pool, read_part, &j);
            double dt = eng__now() - t0;
            double g = (double)(p->n / (size_t)j.T / 64 * 64 * (size_t)j.T) * sizeof(float) / dt / 1e9;
            for (int k = 0; k < 64; k++) sink += j.part[k];
            if (g > best) best = g;
        }
    (void)sink;
    return best;
}

void eng_probe_free(eng_probe *p) {
    if (!p) return;
    eng__pool_free(p->pool);
    free(p->buf);
    free(p);
}

double eng_measure_read_gbps(size_t mbytes, int n_threads) {
    eng_probe *p = eng_probe_new(mbytes, n_threads);
    double g = eng_probe_read_gbps(p, 5);
    eng_probe_free(p);
    return g;
}
