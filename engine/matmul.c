/* matmul.c — Y = X · Wᵀ for the forward pass, on weights packed in panels.
 *
 * Layout. A matrix of `out` rows by `in` columns is held in panels of
 * PANEL = 16 rows: panel p holds, for k = 0 .. in-1, the 16 weights
 * W[16p .. 16p+15][k] next to each other (one 64-byte line in F32, half a
 * line in BF16), so a panel is one contiguous stream of `in` short rows. The
 * rows past `out` in the last panel are zero. Panel p occupies the same
 * bytes as rows 16p .. 16p+15 of the row-major matrix, so packing is done in
 * place, a panel at a time (eng__mat_pack).
 *
 * Kernel (an outer product). For one panel and a group of up to G rows of
 * X, G accumulators of 16 outputs each; at every k, the panel's row k (one
 * vector) times x[r][k] (broadcast) is added into accumulator r. Every
 * weight is read once from memory for all rows of the batch, the
 * accumulators never leave the registers, and nothing is reduced across
 * lanes. Rows of X are packed first as [k][r] per group, so the broadcasts
 * read one line per k. Decode (up to 16 rows, 6 with AVX2: one panel, all
 * rows, one pass) is bound by reading W. More rows (prefill) are bound by the multiply-adds:
 * two panels × 12 rows per tile (pair512), over slices of KC columns that
 * stay in L1 while every group of rows passes (mm_task).
 *
 * Order of the arithmetic. Each output is an FMA chain over k in order,
 * restarted at every KB-th k, and the chains' partial sums are added into Y
 * in order (Y = p0, Y += p1, ...). That bounds the rounding error like a
 * blocked sum (KB + in/KB roundings instead of in). The sequence is the same
 * whatever the number of rows, the group a row falls in, the thread, or the
 * instruction set (AVX-512, AVX2, scalar): a row of the product does not
 * depend on what else is in the batch, and the three paths agree bitwise. */
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_X86 1
#endif

#define PANEL 16
#define KB 64          /* k-block: an FMA chain's length before its sum goes to Y */
#define KC 256         /* k-slice of prefill (mm_task): whole k-blocks, so slicing keeps the order */
_Static_assert(KC % KB == 0, "a k-slice is whole k-blocks");
#define G512 16        /* rows per group: AVX-512, one panel */
#define G512P 12       /* AVX-512, two panels */
#define G256 6         /* AVX2 */
#define PF_AHEAD 4096  /* bytes of the panel stream prefetched ahead of the loads */

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

size_t eng__mat_elems(int out, int in) { return (size_t)(out + PANEL - 1) / PANEL * PANEL * (size_t)in; }

int eng__mat_pack(eng__mat *m, int out, int in) {
    size_t panel = (size_t)PANEL * in;
    float *tmp = malloc(panel * sizeof *tmp), *w = m->p;
    if (!tmp) return ENG_ENOMEM;
    memset(w + (size_t)out * in, 0, (eng__mat_elems(out, in) - (size_t)out * in) * sizeof *w);
    for (size_t p = 0; p < eng__mat_elems(out, in) / panel; p++) {
        float *src = w + p * panel;
        memcpy(tmp, src, panel * sizeof *tmp);
        for (int r = 0; r < PANEL; r++)
            for (int k = 0; k < in; k++) src[(size_t)k * PANEL + r] = tmp[(size_t)r * in + k];
    }
    free(tmp);
    return ENG_OK;
}

void eng__mat_free(eng__mat *m) {
    free(m->p);
    free(m->ktype);
    free(m->koff);
    memset(m, 0, sizeof *m);
}

size_t eng__mat_panel_off(const eng__mat *m, int p) {
    if (m->kq) return m->koff[p];
    if (m->q8) return eng__q8_bytes(PANEL, m->in) * (size_t)p;
    return (size_t)p * PANEL * (size_t)m->in * (m->bf16 ? 2 : 4);
}

/* The first panel whose start is at least t/T of the bytes. */
static int share_start(const eng__mat *m, int t, int T) {
    int P = (m->out + PANEL - 1) / PANEL;
    if (t <= 0) return 0;
    if (t >= T) return P;
    size_t goal = (size_t)((double)eng__mat_panel_off(m, P) * t / T);
    int lo = 0, hi = P; /* the first p with off(p) >= goal */
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (eng__mat_panel_off(m, mid) < goal) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

void eng__mat_share(const eng__mat *m, int t, int T, int *p0, int *p1) {
    *p0 = share_start(m, t, T);
    *p1 = share_start(m, t + 1, T);
}

void eng__share_init(eng__share *s, const eng__mat *m, int T) {
    s->T = T < 1 ? 1 : T > SHARE_MAX ? SHARE_MAX : T;
    for (int t = 0; t < s->T; t++) {
        int p0, p1;
        eng__mat_share(m, t, s->T, &p0, &p1);
        s->cell[t].c = (uint64_t)p0 | (uint64_t)p1 << 32;
    }
}

int eng__share_next(eng__share *s, int t, int *a, int *b) {
    uint64_t c = __atomic_load_n(&s->cell[t].c, __ATOMIC_ACQUIRE);
    while ((uint32_t)c < (uint32_t)(c >> 32)) /* its own share: the next panel */
        if (__atomic_compare_exchange_n(&s->cell[t].c, &c, c + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            *a = (int)(uint32_t)c;
            *b = *a + 1;
            return 1;
        }
    for (;;) { /* its own is done: half of the largest rest, from its end */
        int v = -1;
        uint32_t most = 1; /* a lone panel is left to its owner, who is on it next */
        for (int u = 0; u < s->T; u++) {
            uint64_t cu = __atomic_load_n(&s->cell[u].c, __ATOMIC_ACQUIRE);
            uint32_t left = (uint32_t)(cu >> 32) > (uint32_t)cu ? (uint32_t)(cu >> 32) - (uint32_t)cu : 0;
            if (u != t && left > most) most = left, v = u;
        }
        if (v < 0) return 0;
        uint64_t cv = __atomic_load_n(&s->cell[v].c, __ATOMIC_ACQUIRE);
        uint32_t f = (uint32_t)cv, e = (uint32_t)(cv >> 32);
        if (e <= f + 1) continue;
        uint32_t k = (e - f) / 2;
        if (__atomic_compare_exchange_n(&s->cell[v].c, &cv, (uint64_t)f | (uint64_t)(e - k) << 32, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE)) {
            *a = (int)(e - k);
            *b = (int)e;
            return 1;
        }
    }
}

void eng__mat_row(const eng__mat *W, size_t r, int in, float *dst) {
    if (W->q8) {
        eng__q8_row(W, r, in, dst);
        return;
    }
    if (W->kq) {
        eng__k_row(W, r, in, dst);
        return;
    }
    size_t base = r / PANEL * PANEL * (size_t)in + r % PANEL;
    for (int k = 0; k < in; k++) {
        size_t i = base + (size_t)k * PANEL;
        dst[k] = W->bf16 ? bf16_to_f32(((const uint16_t *)W->p)[i]) : ((const float *)W->p)[i];
    }
}

/* ---- kernels --------------------------------------------------------------
 * One call: panel w (in rows of 16), a group of R packed rows xt[k][R], the
 * outputs y[r * ldy + 0 .. valid-1]. pf: where to prefetch from, advancing
 * with k (ahead in the stream on a panel's first pass, else the line just
 * loaded). */

typedef void (*panel_fn)(float *, size_t, const void *, int, const float *, int, size_t, size_t, int, int,
                         const char *);

/* Scalar: the portable path and the definition of the order. */
static void panel_scalar(float *y, size_t ldy, const void *w, int bf16, const float *xt, int R, size_t kb, size_t ke,
                         int add, int valid, const char *pf) {
    (void)pf;
    for (int r = 0; r < R; r++)
        for (int j = 0; j < valid; j++) {
            for (size_t k0 = kb; k0 < ke; k0 += KB) {
                size_t k1 = k0 + KB < ke ? k0 + KB : ke;
                float a = 0;
                for (size_t k = k0; k < k1; k++) {
                    size_t i = k * PANEL + (size_t)j;
                    float wv = bf16 ? bf16_to_f32(((const uint16_t *)w)[i]) : ((const float *)w)[i];
                    a = fmaf(wv, xt[k * (size_t)R + (size_t)r], a);
                }
                y[(size_t)r * ldy + (size_t)j] = k0 > kb || add ? y[(size_t)r * ldy + (size_t)j] + a : a;
            }
        }
}

#ifdef HAVE_X86
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma")))
#define AVX2 __attribute__((target("avx2,fma")))
#define INLINE static inline __attribute__((always_inline))

/* AVX-512: one vector per panel row, up to 16 rows (16 accumulators). */
AVX512 INLINE void panel512(float *y, size_t ldy, const void *w, int bf16, const float *xt, const int R, size_t kb,
                            size_t ke, int add, int valid, const char *pf) {
    const __mmask16 vm = valid >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << valid) - 1);
    const size_t rb = bf16 ? 32 : 64; /* bytes per panel row */
    __m512 acc[G512];
    for (size_t k0 = kb; k0 < ke; k0 += KB) {
        size_t k1 = k0 + KB < ke ? k0 + KB : ke;
#pragma GCC unroll 16
        for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
        for (size_t k = k0; k < k1; k++) {
            __m512 wv = bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                   _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)w + k * PANEL))), 16))
                             : _mm512_loadu_ps((const float *)w + k * PANEL);
            _mm_prefetch(pf + k * rb, _MM_HINT_T0);
            const float *x = xt + k * (size_t)R;
#pragma GCC unroll 16
            for (int r = 0; r < R; r++) acc[r] = _mm512_fmadd_ps(wv, _mm512_set1_ps(x[r]), acc[r]);
        }
#pragma GCC unroll 16
        for (int r = 0; r < R; r++) {
            float *yr = y + (size_t)r * ldy;
            __m512 v = k0 > kb || add ? _mm512_add_ps(_mm512_maskz_loadu_ps(vm, yr), acc[r]) : acc[r];
            _mm512_mask_storeu_ps(yr, vm, v);
        }
    }
}

/* AVX-512 for many rows (prefill): two adjacent panels, up to 12 rows (24
 * accumulators): per k, two weight vectors and 12 broadcasts feed 24 FMAs,
 * where one panel × 16 rows needs 17 loads for 16. Same order per output.
 * F32 only: mm_task widens BF16 slices before they get here. */
AVX512 INLINE void pair512(float *y, size_t ldy, const float *w, size_t pstride, const float *xt, const int R,
                           size_t kb, size_t ke, int add, int valid1, const char *pf) {
    const __mmask16 vm1 = valid1 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << valid1) - 1);
    const size_t rb = 64;
    const float *w1 = (const float *)((const char *)w + pstride);
    __m512 a0[G512P], a1[G512P];
    for (size_t k0 = kb; k0 < ke; k0 += KB) {
        size_t k1 = k0 + KB < ke ? k0 + KB : ke;
#pragma GCC unroll 12
        for (int r = 0; r < R; r++) a0[r] = a1[r] = _mm512_setzero_ps();
        for (size_t k = k0; k < k1; k++) {
            __m512 v0 = _mm512_loadu_ps(w + k * PANEL), v1 = _mm512_loadu_ps(w1 + k * PANEL);
            _mm_prefetch(pf + k * rb, _MM_HINT_T0);
            _mm_prefetch(pf + pstride + k * rb, _MM_HINT_T0);
            const float *x = xt + k * (size_t)R;
#pragma GCC unroll 12
            for (int r = 0; r < R; r++) {
                __m512 b = _mm512_set1_ps(x[r]);
                a0[r] = _mm512_fmadd_ps(v0, b, a0[r]);
                a1[r] = _mm512_fmadd_ps(v1, b, a1[r]);
            }
        }
#pragma GCC unroll 12
        for (int r = 0; r < R; r++) {
            float *yr = y + (size_t)r * ldy;
            __m512 u0 = k0 > kb || add ? _mm512_add_ps(_mm512_loadu_ps(yr), a0[r]) : a0[r];
            __m512 u1 = k0 > kb || add ? _mm512_add_ps(_mm512_maskz_loadu_ps(vm1, yr + 16), a1[r]) : a1[r];
            _mm512_storeu_ps(yr, u0);
            _mm512_mask_storeu_ps(yr + 16, vm1, u1);
        }
    }
}

/* AVX2: two vectors per panel row, up to 6 rows (12 accumulators). */
AVX2 INLINE void panel256(float *y, size_t ldy, const void *w, int bf16, const float *xt, const int R, size_t kb,
                          size_t ke, int add, int valid, const char *pf) {
    const size_t rb = bf16 ? 32 : 64;
    __m256 lo[G256], hi[G256];
    for (size_t k0 = kb; k0 < ke; k0 += KB) {
        size_t k1 = k0 + KB < ke ? k0 + KB : ke;
#pragma GCC unroll 6
        for (int r = 0; r < R; r++) lo[r] = hi[r] = _mm256_setzero_ps();
        for (size_t k = k0; k < k1; k++) {
            __m256 wl, wh;
            if (bf16) {
                __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + k * PANEL));
                wl = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(h)), 16));
                wh = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(h, 1)), 16));
            } else {
                wl = _mm256_loadu_ps((const float *)w + k * PANEL);
                wh = _mm256_loadu_ps((const float *)w + k * PANEL + 8);
            }
            _mm_prefetch(pf + k * rb, _MM_HINT_T0);
            const float *x = xt + k * (size_t)R;
#pragma GCC unroll 6
            for (int r = 0; r < R; r++) {
                __m256 b = _mm256_broadcast_ss(x + r);
                lo[r] = _mm256_fmadd_ps(wl, b, lo[r]);
                hi[r] = _mm256_fmadd_ps(wh, b, hi[r]);
            }
        }
        /* the stores go through memory lane by lane at the panel's edge */
#pragma GCC unroll 6
        for (int r = 0; r < R; r++) {
            float *yr = y + (size_t)r * ldy, t[16];
            _mm256_storeu_ps(t, lo[r]);
            _mm256_storeu_ps(t + 8, hi[r]);
            if (valid == 16 && (k0 > kb || add)) {
                _mm256_storeu_ps(yr, _mm256_add_ps(_mm256_loadu_ps(yr), lo[r]));
                _mm256_storeu_ps(yr + 8, _mm256_add_ps(_mm256_loadu_ps(yr + 8), hi[r]));
            } else if (valid == 16) {
                _mm256_storeu_ps(yr, lo[r]);
                _mm256_storeu_ps(yr + 8, hi[r]);
            } else {
                for (int j = 0; j < valid; j++) yr[j] = k0 > kb || add ? yr[j] + t[j] : t[j];
            }
        }
    }
}

/* One function per group size, so that every loop over r is unrolled and
 * the accumulators are registers. */
#define DEF512(R) \
    AVX512 static void p512_##R(float *y, size_t ldy, const void *w, int bf16, const float *xt, int r_, size_t kb, \
                                size_t ke, int add, int valid, const char *pf) {                                \
        (void)r_;                                                                                               \
        if (bf16) panel512(y, ldy, w, 1, xt, R, kb, ke, add, valid, pf);                                        \
        else panel512(y, ldy, w, 0, xt, R, kb, ke, add, valid, pf);                                             \
    }
#define DEF256(R) \
    AVX2 static void p256_##R(float *y, size_t ldy, const void *w, int bf16, const float *xt, int r_, size_t kb, \
                              size_t ke, int add, int valid, const char *pf) {                                \
        (void)r_;                                                                                             \
        if (bf16) panel256(y, ldy, w, 1, xt, R, kb, ke, add, valid, pf);                                      \
        else panel256(y, ldy, w, 0, xt, R, kb, ke, add, valid, pf);                                           \
    }
DEF512(1) DEF512(2) DEF512(3) DEF512(4) DEF512(5) DEF512(6) DEF512(7) DEF512(8)
DEF512(9) DEF512(10) DEF512(11) DEF512(12) DEF512(13) DEF512(14) DEF512(15) DEF512(16)
DEF256(1) DEF256(2) DEF256(3) DEF256(4) DEF256(5) DEF256(6)
typedef void (*pair_fn)(float *, size_t, const float *, size_t, const float *, int, size_t, size_t, int, int,
                        const char *);
#define DEFPAIR(R) \
    AVX512 static void q512_##R(float *y, size_t ldy, const float *w, size_t ps, const float *xt, int r_, size_t kb, \
                                size_t ke, int add, int valid1, const char *pf) {                                   \
        (void)r_;                                                                                                   \
        pair512(y, ldy, w, ps, xt, R, kb, ke, add, valid1, pf);                                                     \
    }
DEFPAIR(1) DEFPAIR(2) DEFPAIR(3) DEFPAIR(4) DEFPAIR(5) DEFPAIR(6)
DEFPAIR(7) DEFPAIR(8) DEFPAIR(9) DEFPAIR(10) DEFPAIR(11) DEFPAIR(12)
static const pair_fn Q512[G512P + 1] = {NULL, q512_1, q512_2, q512_3, q512_4, q512_5, q512_6,
                                        q512_7, q512_8, q512_9, q512_10, q512_11, q512_12};
static const panel_fn K512[G512 + 1] = {NULL, p512_1, p512_2, p512_3, p512_4, p512_5, p512_6, p512_7, p512_8,
                                        p512_9, p512_10, p512_11, p512_12, p512_13, p512_14, p512_15, p512_16};
static const panel_fn K256[G256 + 1] = {NULL, p256_1, p256_2, p256_3, p256_4, p256_5, p256_6};
#endif

static void scalar_fn(float *y, size_t ldy, const void *w, int bf16, const float *xt, int R, size_t kb, size_t ke,
                      int add, int valid, const char *pf) {
    panel_scalar(y, ldy, w, bf16, xt, R, kb, ke, add, valid, pf);
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

int eng__cpu_vnni(void) {
#ifdef HAVE_X86
    static int v = -1;
    if (v < 0) v = eng__cpu_avx512() && __builtin_cpu_supports("avx512vnni");
    return v;
#else
    return 0;
#endif
}

static int isa_forced = -1;
void eng__matmul_isa(int isa) { isa_forced = isa; }

static int isa_best(void) {
    if (isa_forced >= 0) return isa_forced;
#ifdef HAVE_X86
    if (eng__cpu_avx512()) return ENG__ISA_AVX512;
    static int avx2 = -1;
    if (avx2 < 0) avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (avx2) return ENG__ISA_AVX2;
#endif
    return ENG__ISA_SCALAR;
}

/* ---- driver ---------------------------------------------------------------- */
typedef struct {
    float *Y;
    const float *X;
    float *xt;
    const void *W;
    const eng__mat *M;                   /* W's matrix */
    int bf16, isa, n, G, in, out, chunk; /* G: rows per group; chunk: panels per task */
    int T;                               /* threads (mm_share) */
    eng__share *share;                   /* mm_share's panels */
    int pairs;                           /* two panels per tile (AVX-512, several groups) */
} mm_job;

static panel_fn kernel_for(int isa, int R) {
#ifdef HAVE_X86
    if (isa == ENG__ISA_AVX512) return K512[R];
    if (isa == ENG__ISA_AVX2) return K256[R];
#endif
    (void)isa; (void)R;
    return scalar_fn;
}

/* Pack rows [g*G, g*G + R) of X as [k][R]. */
static void pack_task(void *ctx, int g, int thread) {
    (void)thread;
    const mm_job *j = ctx;
    int r0 = g * j->G, R = j->n - r0 < j->G ? j->n - r0 : j->G;
    const float *x = j->X + (size_t)r0 * j->in;
    float *t = j->xt + (size_t)r0 * j->in;
    for (int r = 0; r < R; r++)
        for (int k = 0; k < j->in; k++) t[(size_t)k * R + r] = x[(size_t)r * j->in + k];
}

/* A decode product (a few rows, bound by reading the weights): thread t
 * streams its share of the panels (eng__share). The same kernel per panel
 * as mm_task. */
static void mm_share(void *ctx, int t, int thread) {
    (void)thread;
    const mm_job *j = ctx;
    int p0, p1;
    size_t pbytes = (size_t)PANEL * j->in * (j->bf16 ? 2 : 4);
    while (eng__share_next(j->share, t, &p0, &p1))
        for (int p = p0; p < p1; p++) {
            const char *w = (const char *)j->W + (size_t)p * pbytes;
            int valid = j->out - p * PANEL < PANEL ? j->out - p * PANEL : PANEL;
            kernel_for(j->isa, j->n)(j->Y + (size_t)p * PANEL, (size_t)j->out, w, j->bf16, j->xt, j->n, 0,
                                     (size_t)j->in, 0, valid, w + PF_AHEAD);
        }
}

/* Panels [task * chunk, +chunk) for every group of rows. One group (decode):
 * each panel in one pass, prefetching ahead in the stream of panels. More
 * (prefill): each panel in slices of KC columns, every group passing over
 * a slice while it is in L1; the slice of all groups' packed rows (n * KC
 * floats) stays in L2 for the next panel. The k-blocks of an output still
 * reach Y in order, so the arithmetic is that of one pass. */
static void mm_task(void *ctx, int task, int thread) {
    (void)thread;
    const mm_job *j = ctx;
    int P = (j->out + PANEL - 1) / PANEL, p1 = (task + 1) * j->chunk < P ? (task + 1) * j->chunk : P;
    size_t esz = j->bf16 ? 2 : 4, pbytes = (size_t)PANEL * j->in * esz, in = (size_t)j->in;
    const int step = j->pairs ? 2 : 1; /* two panels per tile */
    float wide[2 * KC * PANEL];         /* a BF16 slice of one or two panels, widened once for all groups */
    for (int p = task * j->chunk; p < p1; p += step) {
        const char *w = (const char *)j->W + (size_t)p * pbytes;
        int two = step == 2 && p + 1 < p1;
        int last = two ? p + 1 : p, valid = j->out - last * PANEL < PANEL ? j->out - last * PANEL : PANEL;
        float *y = j->Y + (size_t)p * PANEL;
        if (j->n <= j->G) { /* one group of rows: decode */
            kernel_for(j->isa, j->n)(y, (size_t)j->out, w, j->bf16, j->xt, j->n, 0, in, 0, valid, w + PF_AHEAD);
            continue;
        }
        for (size_t k0 = 0; k0 < in; k0 += KC) {
            size_t k1 = k0 + KC < in ? k0 + KC : in, kb = k0, ke = k1, wstride = pbytes;
            const char *ws = w;
            int bf16 = j->bf16;
            if (bf16) { /* widen the slice (exact), then the F32 kernel over it */
                size_t len = (k1 - k0) * PANEL;
                for (int q = 0; q <= two; q++)
                    st_to_f32(ST_BF16, (const uint8_t *)w + q * pbytes + k0 * PANEL * 2, wide + (size_t)q * KC * PANEL,
                              len);
                ws = (const char *)wide, kb = 0, ke = k1 - k0, wstride = (size_t)KC * PANEL * 4, bf16 = 0;
            }
            for (int r0 = 0; r0 < j->n; r0 += j->G) {
                int R = j->n - r0 < j->G ? j->n - r0 : j->G;
                /* this slice's columns of the group's packed rows */
                const float *xt = j->xt + (size_t)r0 * in + (k0 - kb) * (size_t)R;
                const char *pf = r0 || ws != w ? ws : ws + PF_AHEAD; /* the first group reads the slice from memory */
                int add = k0 > 0;
#ifdef HAVE_X86
                if (two) { /* F32 here: BF16 slices were widened above */
                    Q512[R](y + (size_t)r0 * j->out, (size_t)j->out, (const float *)ws, wstride, xt, R, kb, ke, add,
                            valid, pf);
                    continue;
                }
#else
                (void)wstride; /* pairs are AVX-512 only */
#endif
                kernel_for(j->isa, R)(y + (size_t)r0 * j->out, (size_t)j->out, ws, bf16, xt, R, kb, ke, add, valid, pf);
            }
        }
    }
}

void eng__matmul(float *Y, const float *X, const eng__mat *W, int n, int in, int out, float *xt, eng__pool *pool) {
    if (n <= 0 || out <= 0) return;
    int isa = isa_best();
    if (W->q8) {
        eng__matmul_q8(Y, X, W, n, in, out, xt, pool, isa);
        return;
    }
    if (W->kq) {
        eng__matmul_k(Y, X, W, n, in, out, xt, pool, isa);
        return;
    }
    /* rows per group: all of them in one pass when they fit the registers
     * (decode); else the widest tile's */
    int one = isa == ENG__ISA_AVX2 ? 6 : 16;
    int G = n <= one ? n : isa == ENG__ISA_AVX512 ? G512P : one;
    mm_job j = {Y, X, xt, W->p, W, W->bf16, isa, n, G, in, out, 0, eng__pool_threads(pool), NULL, 0};
#ifdef HAVE_X86
    j.pairs = n > one && isa == ENG__ISA_AVX512;
#endif
    int groups = (n + G - 1) / G;
    eng__pool_run((size_t)n * in >= 65536 ? pool : NULL, groups, pack_task, &j);
    if (eng__decode_shared(W, n, in, out)) {
        eng__share sh;
        eng__share_init(&sh, W, j.T);
        j.share = &sh;
        eng__pool_each(pool, mm_share, &j);
        return;
    }
    /* a few tasks per thread: long streams of panels for the prefetchers
     * (decode is bound by reading them), yet some slack for a thread that
     * falls behind (bench: 2 per thread for one group of rows, 4 for more);
     * an even number of panels per task for the pairs */
    int P = (out + PANEL - 1) / PANEL, tasks = eng__pool_threads(pool) * (n <= G ? 2 : 4);
    j.chunk = (P + tasks - 1) / tasks;
    if (j.pairs) j.chunk += j.chunk & 1;
    eng__pool_run(pool, (P + j.chunk - 1) / j.chunk, mm_task, &j);
}
