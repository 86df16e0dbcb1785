/* matmul.c — Y = X · Wᵀ for the forward pass.
 *
 * Large batches (prefill) go to OpenBLAS sgemm. Small ones (decode: 1 to
 * SMALL_MAX rows) go to our own kernel, because they are bound by reading W
 * and OpenBLAS sgemm reads W at well under the machine's bandwidth for few
 * rows: the kernel streams each weight row once for all rows of the batch,
 * 4 weight rows × 4 batch rows per tile, 16 accumulators in AVX-512
 * registers. Weights are F32 or BF16 (widened to F32 on load: products and
 * sums stay F32).
 *
 * Every output element is the same sequence of operations whatever the
 * number of rows, the tile it falls in, or the thread that computes it: a
 * token's logits do not depend on what else is in the batch. */
#include "internal.h"

#include <cblas.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_X86 1
#endif

#define SMALL_MAX 32 /* rows up to which the own kernel beats sgemm (bench_batch) */

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#ifdef HAVE_X86
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma")))

/* Loads of 16 weights at k under mask m, as F32. */
#define LOAD_F32(w, k, m) _mm512_maskz_loadu_ps(m, (const float *)(w) + (k))
#define LOAD_BF16(w, k, m) \
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)(w) + (k))), 16))
#define MASK(in, k) ((in) - (k) >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << ((in) - (k))) - 1))
#define X(c) _mm512_maskz_loadu_ps(m, x + (size_t)(c) * ldx + k)
#define FMA(a, w, x) a = _mm512_fmadd_ps(w, x, a)
#define OUT(c, r, a) y[(size_t)(c) * ldy + (r)] = _mm512_reduce_add_ps(a)

/* The 4 weight rows of a tile are contiguous, and the next tile follows
 * them: each k step prefetches the bytes at the same offset in the next
 * tile (one tile ahead). Rows are short (1-5 KB), too short for the
 * hardware's stream prefetcher to get going on each. */
#define PREFETCH(ESZ)                                                                                        \
    for (int q = 0; q < 16 * 4 * (ESZ) / 64; q++)                                                            \
        _mm_prefetch((const char *)w0 + 4 * in * (ESZ) + k * 4 * (ESZ) + q * 64, _MM_HINT_T0);

/* One k step of 16 lanes under mask m (all ones but in the tail). */
#define STEP44(LOAD)                                                                                         \
    __m512 v0 = LOAD(w0, k, m), v1 = LOAD(w1, k, m), v2 = LOAD(w2, k, m), v3 = LOAD(w3, k, m), xv;           \
    xv = X(0); FMA(a00, v0, xv); FMA(a01, v1, xv); FMA(a02, v2, xv); FMA(a03, v3, xv);                      \
    xv = X(1); FMA(a10, v0, xv); FMA(a11, v1, xv); FMA(a12, v2, xv); FMA(a13, v3, xv);                      \
    xv = X(2); FMA(a20, v0, xv); FMA(a21, v1, xv); FMA(a22, v2, xv); FMA(a23, v3, xv);                      \
    xv = X(3); FMA(a30, v0, xv); FMA(a31, v1, xv); FMA(a32, v2, xv); FMA(a33, v3, xv);
#define STEP41(LOAD)                                                                                         \
    __m512 xv = X(0);                                                                                        \
    FMA(a0, LOAD(w0, k, m), xv); FMA(a1, LOAD(w1, k, m), xv); FMA(a2, LOAD(w2, k, m), xv); FMA(a3, LOAD(w3, k, m), xv);

/* The three tile shapes, written out so that every accumulator stays in a
 * register: 4 weight rows × 4 batch rows, 4 × 1, and 1 × 1. Each output is
 * one accumulator over k in order, reduced once: the same arithmetic in
 * every shape. */
#define KERNELS(SUF, LOAD)                                                                                   \
    AVX512 static void t44_##SUF(float *y, size_t ldy, const float *x, size_t ldx, const void *w, size_t in) { \
        const void *w0 = w, *w1 = (const char *)w + in * ESZ_##SUF, *w2 = (const char *)w + 2 * in * ESZ_##SUF, \
                   *w3 = (const char *)w + 3 * in * ESZ_##SUF;                                               \
        __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00,  \
               a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00, a32 = a00, a33 = a00; \
        size_t k = 0;                                                                                        \
        for (; k + 16 <= in; k += 16) { const __mmask16 m = 0xFFFF; PREFETCH(ESZ_##SUF) STEP44(LOAD) }       \
        if (k < in) { const __mmask16 m = MASK(in, k); STEP44(LOAD) }                                        \
        OUT(0, 0, a00); OUT(0, 1, a01); OUT(0, 2, a02); OUT(0, 3, a03);                                      \
        OUT(1, 0, a10); OUT(1, 1, a11); OUT(1, 2, a12); OUT(1, 3, a13);                                      \
        OUT(2, 0, a20); OUT(2, 1, a21); OUT(2, 2, a22); OUT(2, 3, a23);                                      \
        OUT(3, 0, a30); OUT(3, 1, a31); OUT(3, 2, a32); OUT(3, 3, a33);                                      \
    }                                                                                                        \
    AVX512 static void t41_##SUF(float *y, size_t ldy, const float *x, size_t ldx, const void *w, size_t in) { \
        const void *w0 = w, *w1 = (const char *)w + in * ESZ_##SUF, *w2 = (const char *)w + 2 * in * ESZ_##SUF, \
                   *w3 = (const char *)w + 3 * in * ESZ_##SUF;                                               \
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                          \
        size_t k = 0;                                                                                        \
        for (; k + 16 <= in; k += 16) { const __mmask16 m = 0xFFFF; PREFETCH(ESZ_##SUF) STEP41(LOAD) }       \
        if (k < in) { const __mmask16 m = MASK(in, k); STEP41(LOAD) }                                        \
        (void)ldx;                                                                                           \
        OUT(0, 0, a0); OUT(0, 1, a1); OUT(0, 2, a2); OUT(0, 3, a3);                                          \
    }                                                                                                        \
    AVX512 static void t11_##SUF(float *y, size_t ldy, const float *x, size_t ldx, const void *w, size_t in) { \
        __m512 a = _mm512_setzero_ps();                                                                      \
        size_t k = 0;                                                                                        \
        for (; k + 16 <= in; k += 16) { const __mmask16 m = 0xFFFF; FMA(a, LOAD(w, k, m), X(0)); }           \
        if (k < in) { const __mmask16 m = MASK(in, k); FMA(a, LOAD(w, k, m), X(0)); }                        \
        (void)ldx;                                                                                           \
        OUT(0, 0, a);                                                                                        \
    }
#define ESZ_f32 4
#define ESZ_bf16 2
KERNELS(f32, LOAD_F32)
KERNELS(bf16, LOAD_BF16)

typedef void (*tile_fn)(float *, size_t, const float *, size_t, const void *, size_t);

/* Output columns [o0, o1) for all n rows. Weight rows go in blocks of WB:
 * a block stays in L1 while every group of 4 batch rows passes over it, and
 * each group of batch rows is reused for the WB/4 tiles of the block. */
#define WB 8
AVX512 static void cols_avx512(float *Y, const float *X, const void *W, int bf16, int n, size_t in, int out, int o0,
                               int o1) {
    tile_fn f44 = bf16 ? t44_bf16 : t44_f32, f41 = bf16 ? t41_bf16 : t41_f32, f11 = bf16 ? t11_bf16 : t11_f32;
    size_t esz = bf16 ? 2 : 4, ldy = (size_t)out;
    for (int ob = o0; ob < o1; ob += WB) {
        int oe = ob + WB < o1 ? ob + WB : o1, full = ob + (oe - ob) / 4 * 4;
        int i = 0;
        for (; i + 4 <= n; i += 4)
            for (int o = ob; o < full; o += 4)
                f44(Y + (size_t)i * ldy + o, ldy, X + (size_t)i * in, in, (const char *)W + (size_t)o * in * esz, in);
        for (; i < n; i++)
            for (int o = ob; o < full; o += 4)
                f41(Y + (size_t)i * ldy + o, ldy, X + (size_t)i * in, in, (const char *)W + (size_t)o * in * esz, in);
        for (i = 0; i < n; i++) /* fewer than 4 rows left at the end of the range */
            for (int r = full; r < oe; r++)
                f11(Y + (size_t)i * ldy + r, ldy, X + (size_t)i * in, in, (const char *)W + (size_t)r * in * esz, in);
    }
}
#endif

/* Portable kernel: the same per-element order on CPUs without AVX-512
 * (16 partial sums per element, combined at the end). */
static void cols_generic(float *Y, const float *X, const void *W, int bf16, int n, size_t in, int out, int o0,
                         int o1) {
    for (int o = o0; o < o1; o++) {
        const float *wf = (const float *)W + (size_t)o * in;
        const uint16_t *wh = (const uint16_t *)W + (size_t)o * in;
        for (int i = 0; i < n; i++) {
            const float *x = X + (size_t)i * in;
            float part[16] = {0};
            for (size_t k = 0; k < in; k++) part[k % 16] += (bf16 ? bf16_to_f32(wh[k]) : wf[k]) * x[k];
            float s = 0;
            for (int l = 0; l < 16; l++) s += part[l];
            Y[(size_t)i * out + o] = s;
        }
    }
}

typedef struct {
    float *Y;
    const float *X;
    const void *W;
    int bf16, n, out, chunk;
    size_t in;
    int avx512;
} mm_job;

static void mm_task(void *ctx, int task, int thread) {
    (void)thread;
    const mm_job *j = ctx;
    int o0 = task * j->chunk, o1 = o0 + j->chunk < j->out ? o0 + j->chunk : j->out;
#ifdef HAVE_X86
    if (j->avx512) {
        cols_avx512(j->Y, j->X, j->W, j->bf16, j->n, j->in, j->out, o0, o1);
        return;
    }
#endif
    cols_generic(j->Y, j->X, j->W, j->bf16, j->n, j->in, j->out, o0, o1);
}

int eng__cpu_avx512(void) {
#ifdef HAVE_X86
    static int v = -1;
    if (v < 0) v = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                __builtin_cpu_supports("avx512vl") && !getenv("KVSERVE_NO_AVX512");
    return v;
#else
    return 0;
#endif
}

void eng__mat_row(const eng__mat *W, size_t r, int in, float *dst) {
    if (!W->bf16) {
        memcpy(dst, (const float *)W->p + r * (size_t)in, (size_t)in * sizeof *dst);
        return;
    }
    st_to_f32(ST_BF16, (const uint8_t *)W->p + r * (size_t)in * 2, dst, (size_t)in);
}

/* BF16 weights and many rows: widen a slab of weight rows to F32, then
 * sgemm on it (the conversion is paid once per slab for all rows). */
enum { SLAB = 256 };

static void matmul_bf16_sgemm(float *Y, const float *X, const eng__mat *W, int n, int in, int out) {
    float *slab = malloc((size_t)SLAB * (size_t)in * sizeof *slab);
    if (!slab) { /* no memory for the slab: the kernel, slower but exact */
        mm_job j = {Y, X, W->p, 1, n, out, out, (size_t)in, eng__cpu_avx512()};
        mm_task(&j, 0, 0);
        return;
    }
    for (int o = 0; o < out; o += SLAB) {
        int m = out - o < SLAB ? out - o : SLAB;
        for (int r = 0; r < m; r++) eng__mat_row(W, (size_t)(o + r), in, slab + (size_t)r * in);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, m, in, 1.0f, X, in, slab, in, 0.0f, Y + o, out);
    }
    free(slab);
}

int eng__matmul_own(const eng__mat *W, int n) { return n <= SMALL_MAX && (W->bf16 || eng__cpu_avx512()); }

void eng__matmul(float *Y, const float *X, const eng__mat *W, int n, int in, int out, eng__pool *pool) {
    if (W->bf16 && n > SMALL_MAX) {
        matmul_bf16_sgemm(Y, X, W, n, in, out);
        return;
    }
    if (eng__matmul_own(W, n)) {
        int threads = eng__pool_threads(pool);
        /* about 8 chunks per thread, multiples of 4 columns */
        int chunk = (out + threads * 8 - 1) / (threads * 8);
        chunk = (chunk + 3) & ~3;
        if (chunk < 16) chunk = 16;
        mm_job j = {Y, X, W->p, W->bf16, n, out, chunk, (size_t)in, eng__cpu_avx512()};
        eng__pool_run(pool, (out + chunk - 1) / chunk, mm_task, &j);
        return;
    }
    const float *w = W->p;
    if (n == 1)
        cblas_sgemv(CblasRowMajor, CblasNoTrans, out, in, 1.0f, w, in, X, 1, 0.0f, Y, 1);
    else
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, out, in, 1.0f, X, in, w, in, 0.0f, Y, out);
}
