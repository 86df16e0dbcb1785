/* matmul_q8.c — Y = X · Wᵀ with W in Q8_0: 8-bit weights in blocks of 32
 * along a row, one scale per block (ggml's Q8_0 values; GGUF Q8_0 tensors
 * keep theirs exactly, F32 matrices are quantized at load as ggml's
 * reference quantizer does: d = max|w| / 127 rounded to half, q = round(w / d)).
 *
 * Layout. Panels of 16 rows, as the F32 matrices (matmul.c). A panel is a
 * sequence of k-blocks of 32 columns, each 576 bytes: the 16 rows' scales
 * (float), then the 16 × 32 weights as eight groups of 4 columns, each group
 * 16 rows × 4 bytes: the 16 outputs of 4 columns are one 64-byte line. A
 * weight w is stored as the byte w + 128 (w ^ 0x80: an unsigned 1 .. 255).
 *
 * Products. Each row of X is quantized the same way per block of 32 (its
 * scale kept in float), and a block's product is an exact integer sum of 32
 * byte products: on AVX2 _mm256_maddubs_epi16 of |x| by w with x's sign
 * (at most 2 · 127 · 127 per pair: no saturation); with VNNI vpdpbusd of the
 * stored bytes w + 128 by x, less 128 · Σx (x's block sum, kept with its
 * scale) — one instruction per 64 weight bytes. Every stored weight is in
 * [-127, 127]: they all come from quant_block, which clips (a GGUF file's
 * Q8_0 values are requantized from their exact F32 values, which gives them
 * back as they were, ggml's quantizer never writing -128).
 * Then, per output, over the blocks in order: a = fma(dw · dx, (float)sum, a).
 * That order is the same whatever the number of rows, their group, the
 * thread or the instruction set: a row's result does not depend on the
 * batch, and the AVX512-VNNI, AVX2 and scalar paths agree bitwise (VNNI
 * where the CPU has it and AVX-512 is chosen; else AVX2). */
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_X86 1
#endif

#define PANEL 16
#define QB 32                               /* columns per block */
#define QBLOCK (PANEL * 4 + PANEL * QB)     /* bytes of a panel's k-block: scales, then weights */

size_t eng__q8_bytes(int out, int in) {
    return (size_t)(out + PANEL - 1) / PANEL * (size_t)(in / QB) * QBLOCK;
}

/* Round to IEEE half and back (nearest even): the scale a Q8_0 block stores. */
static float half_round(float f) {
    uint16_t h = eng__f32_to_f16(f);
    float r;
    st_to_f32(ST_F16, (const uint8_t *)&h, &r, 1);
    return r;
}

/* The definition: d = max|x| / 127, q = round(x / d) (to nearest even, as
 * x times 1/d), clipped to ±127. */
static float quant8_scalar(const float *x, int n, int8_t *q) {
    float amax = 0;
    for (int i = 0; i < n; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    float d = amax / 127.0f, id = d != 0 ? 1.0f / d : 0.0f;
    for (int i = 0; i < n; i++) {
        float v = rintf(x[i] * id);
        q[i] = (int8_t)(v > 127 ? 127 : v < -127 ? -127 : v);
    }
    return d;
}

#ifdef HAVE_X86
/* The same operations 16 and 8 lanes at a time (a maximum, a product, a
 * rounding to nearest even and a clip are exact in any order), for whole
 * vectors of finite values: the same bytes and scale, bit for bit. Decode
 * quantizes each product's input before the threads can start on it. */
__attribute__((target("avx512f,avx512bw"))) static float quant8_avx512(const float *x, int n, int8_t *q) {
    __m512 m = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) m = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x + i)), m);
    float amax = _mm512_reduce_max_ps(m), d = amax / 127.0f, id = d != 0 ? 1.0f / d : 0.0f;
    const __m512 vid = _mm512_set1_ps(id), lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
    for (int i = 0; i < n; i += 16) {
        __m512 v = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
        _mm_storeu_si128((__m128i *)(q + i), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
    }
    return d;
}

__attribute__((target("avx2"))) static float quant8_avx2(const float *x, int n, int8_t *q) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_setzero_ps();
    for (int i = 0; i < n; i += 8) m = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)), m);
    float t[8], amax = 0;
    _mm256_storeu_ps(t, m);
    for (int k = 0; k < 8; k++) amax = t[k] > amax ? t[k] : amax;
    float d = amax / 127.0f, id = d != 0 ? 1.0f / d : 0.0f;
    const __m256 vid = _mm256_set1_ps(id), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
    for (int i = 0; i < n; i += 8) {
        __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
        __m256i w = _mm256_cvtps_epi32(v); /* 8 int32 in [-127, 127] to 8 bytes */
        __m128i h = _mm_packs_epi32(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
        _mm_storel_epi64((__m128i *)(q + i), _mm_packs_epi16(h, h));
    }
    return d;
}
#endif

float eng__quant8(const float *x, int n, int8_t *q) {
#ifdef HAVE_X86
    static int isa = -1; /* 2 AVX-512, 1 AVX2, 0 neither */
    if (isa < 0) isa = eng__cpu_avx512() ? 2 : __builtin_cpu_supports("avx2") ? 1 : 0;
    if (isa == 2 && n % 16 == 0) return quant8_avx512(x, n, q);
    if (isa >= 1 && n % 8 == 0) return quant8_avx2(x, n, q);
#endif
    return quant8_scalar(x, n, q);
}

float eng__quant8_ref(const float *x, int n, int8_t *q) { return quant8_scalar(x, n, q); }

/* One block of 32 values: scale and 8-bit values (ggml's reference Q8_0). */
static float quant_block(const float *x, int8_t *q, int half_scale) {
    float d = eng__quant8(x, QB, q);
    return half_scale ? half_round(d) : d;
}

/* One panel: its F32 values packed ([in][16], matmul.c) to its Q8_0 bytes. */
void eng__q8_panel(uint8_t *dst, const float *panel, int in) {
    float row[QB];
    int8_t qs[QB];
    for (int r = 0; r < PANEL; r++)
        for (int b = 0; b < in / QB; b++) {
            uint8_t *blk = dst + (size_t)b * QBLOCK;
            for (int k = 0; k < QB; k++) row[k] = panel[((size_t)b * QB + (size_t)k) * PANEL + (size_t)r];
            float d = quant_block(row, qs, 1);
            memcpy(blk + 4 * r, &d, 4);
            for (int k = 0; k < QB; k++) blk[PANEL * 4 + (k / 4) * 64 + r * 4 + k % 4] = (uint8_t)qs[k] ^ 0x80u;
        }
}

/* In place, a panel at a time: panel p's Q8_0 bytes (576 per 16 x 32) go
 * where F32 (2048) bytes of panels up to p were, already read; then the
 * buffer shrinks. */
int eng__mat_to_q8(eng__weights *w, eng__mat *m, int out, int in) {
    if (m->q8 || m->bf16 || in % QB) return ENG_OK; /* rows that are not whole blocks stay as they are */
    size_t P = (size_t)(out + PANEL - 1) / PANEL, pb = (size_t)(in / QB) * QBLOCK;
    uint8_t *tmp = malloc(pb);
    if (!tmp) return ENG_ENOMEM;
    for (size_t p = 0; p < P; p++) {
        eng__q8_panel(tmp, (const float *)m->p + p * PANEL * (size_t)in, in);
        memcpy((uint8_t *)m->p + p * pb, tmp, pb);
    }
    free(tmp);
    w->bytes -= eng__mat_elems(out, in) * 4;
    w->bytes += eng__q8_bytes(out, in);
    void *shrunk = realloc(m->p, eng__q8_bytes(out, in));
    if (shrunk) m->p = shrunk;
    m->q8 = 1;
    return ENG_OK;
}

void eng__q8_row(const eng__mat *W, size_t r, int in, float *dst) {
    size_t nb = (size_t)(in / QB), p = r / PANEL, j = r % PANEL;
    for (size_t b = 0; b < nb; b++) {
        const uint8_t *blk = (const uint8_t *)W->p + (p * nb + b) * QBLOCK;
        float d;
        memcpy(&d, blk + 4 * j, 4);
        for (int k = 0; k < QB; k++) dst[b * QB + k] = d * (float)(int8_t)(blk[PANEL * 4 + (k / 4) * 64 + j * 4 + k % 4] ^ 0x80u);
    }
}

/* ---- kernels: panel p's outputs for rows [r0, r0 + R) --------------------- */
typedef struct {
    float *Y;
    const float *X;
    const int8_t *xq;       /* [n][in] */
    const float *dx;        /* [n][nb] */
    const int32_t *sx;      /* [n][nb]: 128 times the sum of a block of xq */
    const uint8_t *W;
    int n, in, out, chunk, isa;
    const eng__mat *M; /* W's matrix */
    int T;             /* threads (q8_share) */
    eng__share *share; /* q8_share's panels */
} q8_job;

/* The definition of the order (and the portable path). */
static void panel_scalar(const q8_job *j, size_t p, int r0, int R, int valid) {
    size_t nb = (size_t)(j->in / QB);
    const uint8_t *wp = j->W + p * nb * QBLOCK;
    for (int r = r0; r < r0 + R; r++) {
        float acc[PANEL] = {0};
        const int8_t *x = j->xq + (size_t)r * j->in;
        for (size_t b = 0; b < nb; b++) {
            const uint8_t *blk = wp + b * QBLOCK;
            float dx = j->dx[(size_t)r * nb + b];
            for (int o = 0; o < PANEL; o++) {
                int32_t s = 0;
                for (int k = 0; k < QB; k++) {
                    s += (int8_t)(blk[PANEL * 4 + (k / 4) * 64 + o * 4 + k % 4] ^ 0x80u) * x[b * QB + (size_t)k];
                }
                float dw;
                memcpy(&dw, blk + 4 * o, 4);
                acc[o] = fmaf(dw * dx, (float)s, acc[o]);
            }
        }
        float *y = j->Y + (size_t)r * j->out + p * PANEL;
        for (int o = 0; o < valid; o++) y[o] = acc[o];
    }
}

#ifdef HAVE_X86
#define AVX2 __attribute__((target("avx2,fma")))

/* Eight groups of 4 columns; per group the 16 outputs are two vectors of 8
 * rows × 4 bytes. TWO rows of X share each weight load (1 or 2: a constant
 * where it is inlined, so a lone row does no work for a second one). */
AVX2 static inline __attribute__((always_inline)) void rows_avx2(const q8_job *j, const uint8_t *wp, size_t nb, int r,
                                                                  int TWO, float *out0, float *out1) {
    const __m256i ones = _mm256_set1_epi16(1), bias = _mm256_set1_epi8((char)0x80);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps();
    const int8_t *x = j->xq + (size_t)r * j->in, *x2 = x + j->in;
    for (size_t b = 0; b < nb; b++) {
        const uint8_t *blk = wp + b * QBLOCK;
        __m256i s0 = _mm256_setzero_si256(), s1 = s0, t0 = s0, t1 = s0;
        for (int g = 0; g < 8; g++) {
            __m256i w0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(blk + 64 + g * 64)), bias);
            __m256i w1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(blk + 96 + g * 64)), bias);
            int32_t xv;
            memcpy(&xv, x + b * QB + (size_t)g * 4, 4);
            __m256i xb = _mm256_set1_epi32(xv), ax = _mm256_abs_epi8(xb);
            s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w0, xb)), ones));
            s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w1, xb)), ones));
            if (TWO == 2) {
                int32_t xv2;
                memcpy(&xv2, x2 + b * QB + (size_t)g * 4, 4);
                __m256i xb2 = _mm256_set1_epi32(xv2), ax2 = _mm256_abs_epi8(xb2);
                t0 = _mm256_add_epi32(t0, _mm256_madd_epi16(_mm256_maddubs_epi16(ax2, _mm256_sign_epi8(w0, xb2)), ones));
                t1 = _mm256_add_epi32(t1, _mm256_madd_epi16(_mm256_maddubs_epi16(ax2, _mm256_sign_epi8(w1, xb2)), ones));
            }
        }
        __m256 dw0 = _mm256_loadu_ps((const float *)blk), dw1 = _mm256_loadu_ps((const float *)blk + 8);
        __m256 dx = _mm256_set1_ps(j->dx[(size_t)r * nb + b]);
        a0 = _mm256_fmadd_ps(_mm256_mul_ps(dw0, dx), _mm256_cvtepi32_ps(s0), a0);
        a1 = _mm256_fmadd_ps(_mm256_mul_ps(dw1, dx), _mm256_cvtepi32_ps(s1), a1);
        if (TWO == 2) {
            __m256 dx2 = _mm256_set1_ps(j->dx[(size_t)(r + 1) * nb + b]);
            c0 = _mm256_fmadd_ps(_mm256_mul_ps(dw0, dx2), _mm256_cvtepi32_ps(t0), c0);
            c1 = _mm256_fmadd_ps(_mm256_mul_ps(dw1, dx2), _mm256_cvtepi32_ps(t1), c1);
        }
    }
    _mm256_storeu_ps(out0, a0);
    _mm256_storeu_ps(out0 + 8, a1);
    if (TWO == 2) {
        _mm256_storeu_ps(out1, c0);
        _mm256_storeu_ps(out1 + 8, c1);
    }
}

AVX2 static void rows1_avx2(const q8_job *j, const uint8_t *wp, size_t nb, int r, float *o0) {
    rows_avx2(j, wp, nb, r, 1, o0, NULL);
}

AVX2 static void rows2_avx2(const q8_job *j, const uint8_t *wp, size_t nb, int r, float *o0, float *o1) {
    rows_avx2(j, wp, nb, r, 2, o0, o1);
}


/* AVX512-VNNI: a group of 4 columns of the panel's 16 rows is one vector,
 * and vpdpbusd adds each row's 4 products (w + 128 times x) into its 32-bit
 * lane; less 128 · Σx, the same integer sums, so the same result to the bit. */
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma")))

VNNI static inline __attribute__((always_inline)) void rows_vnni(const q8_job *j, const uint8_t *wp, size_t nb, int r,
                                                                  int TWO, float *out0, float *out1) {
    __m512 a = _mm512_setzero_ps(), c = _mm512_setzero_ps();
    const int8_t *x = j->xq + (size_t)r * j->in, *x2 = x + j->in;
    const int32_t *sx = j->sx + (size_t)r * nb;
    for (size_t b = 0; b < nb; b++) {
        const uint8_t *blk = wp + b * QBLOCK;
        __m512i s = _mm512_set1_epi32(-sx[b]), t = TWO == 2 ? _mm512_set1_epi32(-sx[nb + b]) : s;
        for (int g = 0; g < 8; g++) {
            __m512i w = _mm512_loadu_si512((const void *)(blk + 64 + g * 64));
            int32_t xv;
            memcpy(&xv, x + b * QB + (size_t)g * 4, 4);
            s = _mm512_dpbusd_epi32(s, w, _mm512_set1_epi32(xv));
            if (TWO == 2) {
                int32_t xv2;
                memcpy(&xv2, x2 + b * QB + (size_t)g * 4, 4);
                t = _mm512_dpbusd_epi32(t, w, _mm512_set1_epi32(xv2));
            }
        }
        __m512 dw = _mm512_loadu_ps((const float *)blk);
        a = _mm512_fmadd_ps(_mm512_mul_ps(dw, _mm512_set1_ps(j->dx[(size_t)r * nb + b])), _mm512_cvtepi32_ps(s), a);
        if (TWO == 2)
            c = _mm512_fmadd_ps(_mm512_mul_ps(dw, _mm512_set1_ps(j->dx[(size_t)(r + 1) * nb + b])), _mm512_cvtepi32_ps(t), c);
    }
    _mm512_storeu_ps(out0, a);
    if (TWO == 2) _mm512_storeu_ps(out1, c);
}

VNNI static void rows2_vnni(const q8_job *j, const uint8_t *wp, size_t nb, int r, float *o0, float *o1) {
    rows_vnni(j, wp, nb, r, 2, o0, o1);
}

/* A lone row (decode) with 256-bit vectors (AVX512-VL): rows 0-7 and 8-15
 * of each group of 4 columns in two halves, the same integer sums. On Zen 5
 * 256-bit loads stream from memory faster than 512-bit ones (the read probe
 * too): single-stream decode 4% faster in paired runs (SmolLM2-135M's shape). */
VNNI static void rows1_vnni256(const q8_job *j, const uint8_t *wp, size_t nb, int r, float *o0) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    const int8_t *x = j->xq + (size_t)r * j->in;
    const int32_t *sx = j->sx + (size_t)r * nb;
    for (size_t b = 0; b < nb; b++) {
        const uint8_t *blk = wp + b * QBLOCK;
        __m256i s0 = _mm256_set1_epi32(-sx[b]), s1 = s0;
        for (int g = 0; g < 8; g++) {
            int32_t xv;
            memcpy(&xv, x + b * QB + (size_t)g * 4, 4);
            __m256i xb = _mm256_set1_epi32(xv);
            s0 = _mm256_dpbusd_epi32(s0, _mm256_loadu_si256((const __m256i *)(blk + 64 + g * 64)), xb);
            s1 = _mm256_dpbusd_epi32(s1, _mm256_loadu_si256((const __m256i *)(blk + 96 + g * 64)), xb);
        }
        __m256 dx = _mm256_set1_ps(j->dx[(size_t)r * nb + b]);
        a0 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps((const float *)blk), dx), _mm256_cvtepi32_ps(s0), a0);
        a1 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps((const float *)blk + 8), dx), _mm256_cvtepi32_ps(s1), a1);
    }
    _mm256_storeu_ps(o0, a0);
    _mm256_storeu_ps(o0 + 8, a1);
}
static void panel_x86(const q8_job *j, size_t p, int r0, int R, int valid, int vnni) {
    size_t nb = (size_t)(j->in / QB);
    const uint8_t *wp = j->W + p * nb * QBLOCK;
    for (int r = r0; r < r0 + R; r += 2) {
        int two = r + 1 < r0 + R;
        float t[2][16];
        if (vnni) {
            if (two) rows2_vnni(j, wp, nb, r, t[0], t[1]);
            else rows1_vnni256(j, wp, nb, r, t[0]);
        } else {
            if (two) rows2_avx2(j, wp, nb, r, t[0], t[1]);
            else rows1_avx2(j, wp, nb, r, t[0]);
        }
        for (int q = 0; q <= two; q++) {
            float *y = j->Y + (size_t)(r + q) * j->out + p * PANEL;
            if (valid == PANEL) memcpy(y, t[q], sizeof t[q]);
            else for (int o = 0; o < valid; o++) y[o] = t[q][o];
        }
    }
}
#endif

/* Quantize the rows of X (row i: task i). */
static void quant_rows(void *ctx, int r, int thread) {
    (void)thread;
    const q8_job *j = ctx;
    const float *X = j->X;
    size_t nb = (size_t)(j->in / QB);
    for (size_t b = 0; b < nb; b++) {
        int8_t *q = (int8_t *)j->xq + (size_t)r * j->in + b * QB;
        ((float *)j->dx)[(size_t)r * nb + b] = quant_block(X + (size_t)r * j->in + b * QB, q, 0);
        int32_t sum = 0;
        for (int k = 0; k < QB; k++) sum += q[k];
        ((int32_t *)j->sx)[(size_t)r * nb + b] = 128 * sum;
    }
}

/* Panels [task * chunk, +chunk), every row; rows in groups of 8 per panel so a
 * panel's blocks stay in L1 while the group passes. */
static void q8_panels(const q8_job *j, int p0, int p1) {
    for (int p = p0; p < p1; p++) {
        int valid = j->out - p * PANEL < PANEL ? j->out - p * PANEL : PANEL;
        for (int r0 = 0; r0 < j->n; r0 += 8) {
            int R = j->n - r0 < 8 ? j->n - r0 : 8;
#ifdef HAVE_X86
            if (j->isa != ENG__ISA_SCALAR) {
                panel_x86(j, (size_t)p, r0, R, valid, j->isa == ENG__ISA_AVX512 && eng__cpu_vnni());
                continue;
            }
#endif
            panel_scalar(j, (size_t)p, r0, R, valid);
        }
    }
}

static void q8_task(void *ctx, int task, int thread) {
    (void)thread;
    const q8_job *j = ctx;
    int P = (j->out + PANEL - 1) / PANEL, p1 = (task + 1) * j->chunk < P ? (task + 1) * j->chunk : P;
    q8_panels(j, task * j->chunk, p1);
}

/* A decode product: thread t's panels from eng__share (matmul.c, mm_share). */
static void q8_share(void *ctx, int t, int thread) {
    (void)thread;
    const q8_job *j = ctx;
    int p0, p1;
    while (eng__share_next(j->share, t, &p0, &p1)) q8_panels(j, p0, p1);
}

void eng__matmul_q8(float *Y, const float *X, const eng__mat *W, int n, int in, int out, float *xt, eng__pool *pool,
                    int isa) {
    /* the quantized rows in the workspace: n * in bytes, then n * nb scales
     * and n * nb sums (n * in * 1.25 bytes of its n * in floats) */
    int8_t *xq = (int8_t *)xt;
    float *dx = (float *)(void *)(xt + ((size_t)n * in + 3) / 4);
    int32_t *sx = (int32_t *)(void *)(dx + (size_t)n * (size_t)(in / QB));
    q8_job j = {Y, X, xq, dx, sx, W->p, n, in, out, 0, isa, W, eng__pool_threads(pool), NULL};
    eng__pool_run((size_t)n * in >= 65536 ? pool : NULL, n, quant_rows, &j);
    if (eng__decode_shared(W, n, in, out)) {
        eng__share sh;
        eng__share_init(&sh, W, j.T);
        j.share = &sh;
        eng__pool_each(pool, q8_share, &j);
        return;
    }
    int P = (out + PANEL - 1) / PANEL, tasks = eng__pool_threads(pool) * (n <= 8 ? 2 : 4);
    j.chunk = (P + tasks - 1) / tasks;
    eng__pool_run(pool, (P + j.chunk - 1) / j.chunk, q8_task, &j);
}
