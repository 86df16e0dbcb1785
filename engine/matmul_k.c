/* matmul_k.c — Y = X · Wᵀ with W in ggml's K-quants, Q4_K and Q6_K, kept as
 * their integers: a GGUF file's blocks are repacked exactly, and an F32
 * matrix can be quantized to Q4_K here (--weights q4_k).
 *
 * The formats (per row, super-blocks of 256 columns):
 *   Q4_K: half d and dmin; per sub-block j of 32 a 6-bit scale sc[j] and a
 *         6-bit min m[j]; 4-bit q: value = d * sc[j] * q - dmin * m[j].
 *   Q6_K: half d; per sub-block j of 16 a signed 8-bit scale sc[j]; 6-bit
 *         q: value = d * sc[j] * (q - 32).
 *
 * Layout. Panels of 16 rows, as everywhere (matmul.c); each panel holds one
 * format (a matrix stacked from tensors of two formats, as a Q4_K_M file's
 * attention with its Q6_K values, has panels of both), and its super-blocks
 * follow one another, each the 16 rows':
 *   Q4_K (2432 bytes): d[16], dmin[16] as float; sc[8][16], m[8][16] bytes;
 *         then per sub-block four chunks of 64 bytes, chunk c holding
 *         columns 8c..8c+3 (low nibbles) and 8c+4..8c+7 (high nibbles) as
 *         16 rows × 4 bytes. 4.75 bits a weight (the file's 4.5).
 *   Q6_K (3392 bytes): d[16] as float; sc[16][16] signed bytes; then per
 *         16 columns (one scale) three chunks of 64 bytes, 16 rows × 4 bytes
 *         each: two of the low 4 bits of q as Q4_K's nibbles (columns 0-3
 *         low, 4-7 high; 8-11, 12-15), one of the high 2 bits (from bit 0:
 *         those of the four columns the nibble chunks hold in that byte's
 *         place). 6.6 bits a weight (the file's 6.56), read in one stream.
 *
 * Products. X's rows are quantized per 256 columns (float scale dx, values
 * in [-127, 127], and the sums of each 16 values' quants). A
 * super-block's products are exact integer sums:
 *   Q4_K: isum = Σ_j sc[j] Σ q·xq, msum = Σ_j m[j] Σ xq, then
 *         a = fma(d·dx, isum, a); a = fma(-(dmin·dx), msum, a).
 *   Q6_K: isum = Σ_j sc[j] (Σ q·xq - 32 Σ xq), then a = fma(d·dx, isum, a).
 * (No sum overflows: |Σ q·xq| per sub-block ≤ 32·15·127 and isum ≤ 2^25 for
 * Q4_K; |Σ q·xq - 32 Σ xq| ≤ 16·32·127 and isum ≤ 2^27 for Q6_K; AVX2 keeps
 * pairs in 16 bits, at most 16·15·127 for Q4_K and 4·63·127 for Q6_K.) The float order is the
 * same whatever the number of rows, the thread or the instruction set: a
 * row's result does not depend on the batch, and the AVX512-VNNI, AVX2 and
 * scalar paths agree bitwise. */
#include "gguf.h"
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_X86 1
#endif

#define PANEL 16
#define SB 256                          /* columns per super-block */
#define K4_BYTES (128 + 256 + 2048)     /* a panel's Q4_K super-block */
#define K6_BYTES (64 + 256 + 2048 + 1024) /* a panel's Q6_K super-block */
#define K4_NIB 384                      /* offset of the nibbles */
#define K6_Q 320                        /* offset of the values */
/* Q6_K: the 64-byte chunks of the 16 columns of scale j: two of low 4 bits, one of high 2 bits */
#define K6_NIB(j, c) (K6_Q + (j) * 192 + (c) * 64)
#define K6_HI(j) (K6_Q + (j) * 192 + 128)

/* Q6_K value q (0..63) at column k of row j, as put_row stores it. */
static inline int k6_q(const uint8_t *blk, int j, int k) {
    int s = k / 32, c = (k % 32) / 8, i = k % 4, hi = (k % 8) / 4;
    int lo = blk[K6_NIB(2 * s + c / 2, c % 2) + j * 4 + i] >> (4 * hi) & 15;
    int top = blk[K6_HI(2 * s + c / 2) + j * 4 + i] >> (2 * (2 * (c % 2) + hi)) & 3;
    return lo | top << 4;
}

static float half_to_f32(const uint8_t *p) {
    float f;
    st_to_f32(ST_F16, p, &f, 1);
    return f;
}

static float half_round(float f) {
    uint16_t h = eng__f32_to_f16(f);
    return half_to_f32((const uint8_t *)&h);
}

/* ---- one GGUF block to its integers (the formats' definitions) ----------- */
static void k4_scale_min(int j, const uint8_t *q, int *sc, int *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* Q4_K: q[256] in 0..15 (sub-blocks 2i, 2i+1 share bytes 32i.., low then high nibbles). */
static void k4_unpack(const uint8_t *b, float *d, float *dmin, uint8_t sc[8], uint8_t mn[8], uint8_t q[SB]) {
    *d = half_to_f32(b);
    *dmin = half_to_f32(b + 2);
    for (int j = 0; j < 8; j++) {
        int s, m;
        k4_scale_min(j, b + 4, &s, &m);
        sc[j] = (uint8_t)s;
        mn[j] = (uint8_t)m;
    }
    for (int i = 0; i < 4; i++)
        for (int l = 0; l < 32; l++) {
            q[64 * i + l] = b[16 + 32 * i + l] & 15;
            q[64 * i + 32 + l] = b[16 + 32 * i + l] >> 4;
        }
}

/* Q6_K: w[256] = q - 32 in -32..31 (halves of 128: ql bytes l, l+32 hold
 * elements l, l+32 low and l+64, l+96 high; qh byte l their top bits). */
static void k6_unpack(const uint8_t *b, float *d, int8_t sc[16], int8_t w[SB]) {
    const uint8_t *ql = b, *qh = b + 128;
    memcpy(sc, b + 192, 16);
    *d = half_to_f32(b + 208);
    for (int h = 0; h < 2; h++, ql += 64, qh += 32, w += 128)
        for (int l = 0; l < 32; l++) {
            w[l] = (int8_t)(((ql[l] & 15) | ((qh[l] & 3) << 4)) - 32);
            w[l + 32] = (int8_t)(((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32);
            w[l + 64] = (int8_t)(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
            w[l + 96] = (int8_t)(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
        }
}

/* ---- our Q4_K quantizer (the same arithmetic as tools/gguf_write.py's) ----
 * Per sub-block: the range from min(x, 0) to max(x), 15 steps; the scales
 * and mins in 6 bits against the super-block's largest, halved d and dmin. */
static int clip_rint(float v, int lo, int hi) {
    float r = rintf(v);
    return r < (float)lo ? lo : r > (float)hi ? hi : (int)r;
}

void eng__k4_quantize(const float *x, uint8_t *b) {
    float scale[8], mins[8], smax = 0, mmax = 0;
    for (int j = 0; j < 8; j++) {
        float lo = x[32 * j], hi = x[32 * j];
        for (int k = 1; k < 32; k++) {
            lo = x[32 * j + k] < lo ? x[32 * j + k] : lo;
            hi = x[32 * j + k] > hi ? x[32 * j + k] : hi;
        }
        lo = lo < 0 ? lo : 0;
        scale[j] = (hi - lo) / 15.0f;
        mins[j] = -lo;
        smax = scale[j] > smax ? scale[j] : smax;
        mmax = mins[j] > mmax ? mins[j] : mmax;
    }
    float d = half_round(smax / 63.0f), dmin = half_round(mmax / 63.0f);
    uint8_t sc[8], mq[8], q[SB];
    for (int j = 0; j < 8; j++) {
        sc[j] = (uint8_t)(d > 0 ? clip_rint(scale[j] / d, 0, 63) : 0);
        mq[j] = (uint8_t)(dmin > 0 ? clip_rint(mins[j] / dmin, 0, 63) : 0);
        float es = d * (float)sc[j], em = dmin * (float)mq[j];
        for (int k = 0; k < 32; k++) q[32 * j + k] = (uint8_t)(es > 0 ? clip_rint((x[32 * j + k] + em) / es, 0, 15) : 0);
    }
    uint16_t hd = eng__f32_to_f16(d), hm = eng__f32_to_f16(dmin);
    memcpy(b, &hd, 2);
    memcpy(b + 2, &hm, 2);
    for (int j = 0; j < 4; j++) {
        b[4 + j] = (uint8_t)(sc[j] | ((sc[j + 4] >> 4) << 6));
        b[8 + j] = (uint8_t)(mq[j] | ((mq[j + 4] >> 4) << 6));
        b[12 + j] = (uint8_t)((sc[j + 4] & 15) | ((mq[j + 4] & 15) << 4));
    }
    for (int i = 0; i < 4; i++)
        for (int l = 0; l < 32; l++) b[16 + 32 * i + l] = (uint8_t)(q[64 * i + l] | (q[64 * i + 32 + l] << 4));
}

/* ---- packing ---------------------------------------------------------------- */
static size_t panel_bytes(int type, size_t nsb) { return nsb * (type == GGML_Q4_K ? K4_BYTES : K6_BYTES); }

/* Row j of a panel's super-block from the GGUF block b (NULL: a zero row). */
static void put_row(uint8_t *blk, int type, int j, const uint8_t *b) {
    if (type == GGML_Q4_K) {
        float d = 0, dmin = 0;
        uint8_t sc[8] = {0}, mn[8] = {0}, q[SB] = {0};
        if (b) k4_unpack(b, &d, &dmin, sc, mn, q);
        memcpy(blk + 4 * j, &d, 4);
        memcpy(blk + 64 + 4 * j, &dmin, 4);
        for (int s = 0; s < 8; s++) {
            blk[128 + s * PANEL + j] = sc[s];
            blk[256 + s * PANEL + j] = mn[s];
            for (int c = 0; c < 4; c++)
                for (int i = 0; i < 4; i++)
                    blk[K4_NIB + s * 256 + c * 64 + j * 4 + i] =
                        (uint8_t)(q[32 * s + 8 * c + i] | (q[32 * s + 8 * c + 4 + i] << 4));
        }
    } else {
        float d = 0;
        int8_t sc[16] = {0}, w[SB];
        memset(w, -32, sizeof w); /* q = 0: a zero row's values are -32 · 0 */
        if (b) k6_unpack(b, &d, sc, w);
        memcpy(blk + 4 * j, &d, 4);
        for (int s = 0; s < 16; s++) blk[64 + s * PANEL + j] = (uint8_t)sc[s];
        for (int s = 0; s < 8; s++)
            for (int c = 0; c < 4; c++)
                for (int i = 0; i < 4; i++) {
                    int q0 = w[32 * s + 8 * c + i] + 32, q1 = w[32 * s + 8 * c + 4 + i] + 32;
                    blk[K6_NIB(2 * s + c / 2, c % 2) + j * 4 + i] = (uint8_t)((q0 & 15) | (q1 & 15) << 4);
                    uint8_t *hb = &blk[K6_HI(2 * s + c / 2) + j * 4 + i];
                    if (c % 2 == 0) *hb = 0;
                    *hb |= (uint8_t)(((q0 >> 4) | (q1 >> 4) << 2) << (4 * (c % 2)));
                }
    }
}

size_t eng__k_panel_bytes(int type, int in) { return panel_bytes(type, (size_t)(in / SB)); }

void eng__k_panel(uint8_t *dst, int type, const uint8_t *const rows[PANEL], int in) {
    size_t nsb = (size_t)(in / SB), bb = (size_t)(type == GGML_Q4_K ? 144 : 210);
    for (size_t s = 0; s < nsb; s++) {
        uint8_t *blk = dst + s * (type == GGML_Q4_K ? K4_BYTES : K6_BYTES);
        for (int j = 0; j < PANEL; j++) put_row(blk, type, j, rows[j] ? rows[j] + s * bb : NULL);
    }
}

int eng__mat_to_k(eng__weights *w, eng__mat *m, int out, int in, const uint8_t *raw, size_t stride,
                  const uint8_t *types) {
    if (in % SB) return ENG_EFORMAT;
    size_t P = (size_t)(out + PANEL - 1) / PANEL, total = 0;
    for (size_t p = 0; p < P; p++) {
        int t = types[p * PANEL];
        if (t != GGML_Q4_K && t != GGML_Q6_K) return ENG_EFORMAT;
        for (size_t r = p * PANEL; r < p * PANEL + PANEL && r < (size_t)out; r++)
            if (types[r] != t) return ENG_EFORMAT; /* one format a panel */
        total += eng__k_panel_bytes(t, in);
    }
    uint8_t *blob = malloc(total), *kt = malloc(P);
    size_t *off = malloc((P + 1) * sizeof *off);
    if (!blob || !kt || !off) {
        free(blob);
        free(kt);
        free(off);
        return ENG_ENOMEM;
    }
    size_t at = 0;
    for (size_t p = 0; p < P; p++) {
        const uint8_t *rows[PANEL];
        for (int j = 0; j < PANEL; j++) rows[j] = p * PANEL + (size_t)j < (size_t)out ? raw + (p * PANEL + (size_t)j) * stride : NULL;
        kt[p] = types[p * PANEL];
        off[p] = at;
        eng__k_panel(blob + at, kt[p], rows, in);
        at += eng__k_panel_bytes(kt[p], in);
    }
    off[P] = at;
    w->bytes -= eng__mat_elems(out, in) * (m->bf16 ? 2 : 4);
    w->bytes += total + P + (P + 1) * sizeof *off;
    free(m->p);
    m->p = blob;
    m->ktype = kt;
    m->koff = off;
    m->kq = 1;
    m->bf16 = 0;
    return ENG_OK;
}

void eng__k_row(const eng__mat *W, size_t r, int in, float *dst) {
    size_t nsb = (size_t)(in / SB), p = r / PANEL;
    int j = (int)(r % PANEL), t = W->ktype[p];
    const uint8_t *pb = (const uint8_t *)W->p + W->koff[p];
    for (size_t s = 0; s < nsb; s++, dst += SB) {
        if (t == GGML_Q4_K) {
            const uint8_t *blk = pb + s * K4_BYTES;
            float d, dmin;
            memcpy(&d, blk + 4 * j, 4);
            memcpy(&dmin, blk + 64 + 4 * j, 4);
            for (int sb = 0; sb < 8; sb++) {
                float ds = d * (float)blk[128 + sb * PANEL + j], dm = dmin * (float)blk[256 + sb * PANEL + j];
                for (int c = 0; c < 4; c++)
                    for (int i = 0; i < 4; i++) {
                        uint8_t v = blk[K4_NIB + sb * 256 + c * 64 + j * 4 + i];
                        dst[32 * sb + 8 * c + i] = ds * (float)(v & 15) - dm;
                        dst[32 * sb + 8 * c + 4 + i] = ds * (float)(v >> 4) - dm;
                    }
            }
        } else {
            const uint8_t *blk = pb + s * K6_BYTES;
            float d;
            memcpy(&d, blk + 4 * j, 4);
            for (int k = 0; k < SB; k++)
                dst[k] = d * (float)(int8_t)blk[64 + (k / 16) * PANEL + j] * (float)(k6_q(blk, j, k) - 32);
        }
    }
}

/* ---- kernels ------------------------------------------------------------------ */
typedef struct {
    float *Y;
    const float *X;
    const int8_t *xq;   /* [n][in] */
    const float *dx;    /* [n][nsb] */
    const int16_t *xs;  /* [n][in / 16]: sums of xq per 16 */
    const eng__mat *W;
    int n, in, out, chunk, isa;
    int T;             /* threads (k_share) */
    eng__share *share; /* k_share's panels */
} k_job;

/* The definition of the order (and the portable path): outputs [0, valid) of
 * panel p for X's rows [r0, r0 + R). */
static void panel_scalar(const k_job *j, size_t p, int r0, int R, int valid) {
    size_t nsb = (size_t)(j->in / SB);
    int t = j->W->ktype[p];
    const uint8_t *pb = (const uint8_t *)j->W->p + j->W->koff[p];
    for (int r = r0; r < r0 + R; r++) {
        const int8_t *x = j->xq + (size_t)r * j->in;
        float *y = j->Y + (size_t)r * j->out + p * PANEL;
        for (int o = 0; o < valid; o++) {
            float a = 0;
            for (size_t s = 0; s < nsb; s++) {
                float dx = j->dx[(size_t)r * nsb + s];
                const int8_t *xb = x + s * SB;
                if (t == GGML_Q4_K) {
                    const uint8_t *blk = pb + s * K4_BYTES;
                    int32_t isum = 0, msum = 0;
                    for (int sb = 0; sb < 8; sb++) {
                        int32_t q = 0;
                        for (int c = 0; c < 4; c++)
                            for (int i = 0; i < 4; i++) {
                                uint8_t v = blk[K4_NIB + sb * 256 + c * 64 + o * 4 + i];
                                q += (v & 15) * xb[32 * sb + 8 * c + i] + (v >> 4) * xb[32 * sb + 8 * c + 4 + i];
                            }
                        const int16_t *xs = j->xs + ((size_t)r * j->in + s * SB) / 16 + 2 * (size_t)sb;
                        isum += blk[128 + sb * PANEL + o] * q;
                        msum += blk[256 + sb * PANEL + o] * (xs[0] + xs[1]);
                    }
                    float d, dmin;
                    memcpy(&d, blk + 4 * o, 4);
                    memcpy(&dmin, blk + 64 + 4 * o, 4);
                    a = fmaf(d * dx, (float)isum, a);
                    a = fmaf(-(dmin * dx), (float)msum, a);
                } else {
                    const uint8_t *blk = pb + s * K6_BYTES;
                    int32_t isum = 0;
                    for (int sb = 0; sb < 16; sb++) {
                        int32_t q = 0;
                        for (int k = 16 * sb; k < 16 * sb + 16; k++) q += k6_q(blk, o, k) * xb[k];
                        q -= 32 * j->xs[((size_t)r * j->in + s * SB) / 16 + (size_t)sb];
                        isum += (int8_t)blk[64 + sb * PANEL + o] * q;
                    }
                    float d;
                    memcpy(&d, blk + 4 * o, 4);
                    a = fmaf(d * dx, (float)isum, a);
                }
            }
            y[o] = a;
        }
    }
}

#ifdef HAVE_X86
#define AVX2 __attribute__((target("avx2,fma")))

/* 8 unsigned bytes (rows) as 16-bit pairs (v, v) in 32-bit lanes. */
AVX2 static inline __m256i pairs_u8(const uint8_t *p) {
    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    return _mm256_or_si256(v, _mm256_slli_epi32(v, 16));
}

static inline int32_t x4(const int8_t *x) {
    int32_t v;
    memcpy(&v, x, 4);
    return v;
}

/* One Q4_K super-block for ONE or TWO rows of X (a constant where inlined):
 * the integer sums of the 16 outputs, rows 0-7 and 8-15. */
AVX2 static inline __attribute__((always_inline)) void k4_sums(const uint8_t *blk, const int8_t *x, const int8_t *x2,
                                                                const int16_t *xs, const int16_t *xs2, int TWO,
                                                                __m256i is[4], __m256i ms[4]) {
    const __m256i m4 = _mm256_set1_epi8(15);
    __m256i i0 = _mm256_setzero_si256(), i1 = i0, i2 = i0, i3 = i0, n0 = i0, n1 = i0, n2 = i0, n3 = i0;
    for (int sb = 0; sb < 8; sb++) {
        const uint8_t *nb = blk + K4_NIB + sb * 256;
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, b0 = a0, b1 = a0;
        for (int c = 0; c < 4; c++) {
            __m256i v0 = _mm256_loadu_si256((const __m256i *)(nb + c * 64));
            __m256i v1 = _mm256_loadu_si256((const __m256i *)(nb + c * 64 + 32));
            __m256i l0 = _mm256_and_si256(v0, m4), h0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), m4);
            __m256i l1 = _mm256_and_si256(v1, m4), h1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), m4);
            __m256i xa = _mm256_set1_epi32(x4(x + 32 * sb + 8 * c)), xb = _mm256_set1_epi32(x4(x + 32 * sb + 8 * c + 4));
            a0 = _mm256_add_epi16(a0, _mm256_add_epi16(_mm256_maddubs_epi16(l0, xa), _mm256_maddubs_epi16(h0, xb)));
            a1 = _mm256_add_epi16(a1, _mm256_add_epi16(_mm256_maddubs_epi16(l1, xa), _mm256_maddubs_epi16(h1, xb)));
            if (TWO == 2) {
                __m256i ya = _mm256_set1_epi32(x4(x2 + 32 * sb + 8 * c)),
                        yb = _mm256_set1_epi32(x4(x2 + 32 * sb + 8 * c + 4));
                b0 = _mm256_add_epi16(b0, _mm256_add_epi16(_mm256_maddubs_epi16(l0, ya), _mm256_maddubs_epi16(h0, yb)));
                b1 = _mm256_add_epi16(b1, _mm256_add_epi16(_mm256_maddubs_epi16(l1, ya), _mm256_maddubs_epi16(h1, yb)));
            }
        }
        __m256i s0 = pairs_u8(blk + 128 + sb * PANEL), s1 = pairs_u8(blk + 128 + sb * PANEL + 8);
        __m256i m0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 256 + sb * PANEL)));
        __m256i m1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 256 + sb * PANEL + 8)));
        i0 = _mm256_add_epi32(i0, _mm256_madd_epi16(a0, s0));
        i1 = _mm256_add_epi32(i1, _mm256_madd_epi16(a1, s1));
        __m256i xv = _mm256_set1_epi32(xs[2 * sb] + xs[2 * sb + 1]); /* (its upper half meets the min's zero half) */
        n0 = _mm256_add_epi32(n0, _mm256_madd_epi16(m0, xv));
        n1 = _mm256_add_epi32(n1, _mm256_madd_epi16(m1, xv));
        if (TWO == 2) {
            i2 = _mm256_add_epi32(i2, _mm256_madd_epi16(b0, s0));
            i3 = _mm256_add_epi32(i3, _mm256_madd_epi16(b1, s1));
            __m256i yv = _mm256_set1_epi32(xs2[2 * sb] + xs2[2 * sb + 1]);
            n2 = _mm256_add_epi32(n2, _mm256_madd_epi16(m0, yv));
            n3 = _mm256_add_epi32(n3, _mm256_madd_epi16(m1, yv));
        }
    }
    is[0] = i0, is[1] = i1, is[2] = i2, is[3] = i3;
    ms[0] = n0, ms[1] = n1, ms[2] = n2, ms[3] = n3;
}

/* Q6_K's q of 4 columns × 16 rows from a nibble chunk v (low or high half,
 * hi) and its high-bit chunk hb at shift 2·(2·odd + hi), as bytes 0..63. */
AVX2 static inline __m256i k6q_avx2(__m256i v, __m256i hb, int hi, int sh) {
    const __m256i m4 = _mm256_set1_epi8(15), m30 = _mm256_set1_epi8(0x30);
    __m256i lo = hi ? _mm256_and_si256(_mm256_srli_epi16(v, 4), m4) : _mm256_and_si256(v, m4);
    __m256i top = sh < 4 ? _mm256_slli_epi16(hb, 4 - sh) : sh == 4 ? hb : _mm256_srli_epi16(hb, sh - 4);
    return _mm256_or_si256(lo, _mm256_and_si256(top, m30));
}

/* One Q6_K super-block: per 16 columns, Σ q·x (each 8 columns' pairs in 16
 * bits, then 32), less 32 Σ x, times the scale. */
AVX2 static inline __attribute__((always_inline)) void k6_sums(const uint8_t *blk, const int8_t *x, const int8_t *x2,
                                                                const int16_t *xs, const int16_t *xs2, int TWO,
                                                                __m256i is[4]) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i i0 = _mm256_setzero_si256(), i1 = i0, i2 = i0, i3 = i0;
    for (int j = 0; j < 16; j++) { /* the 16 columns of scale j: nibble chunks 2h, 2h + 1 of sub-block j / 2 */
        const uint8_t *nb = blk + K6_NIB(j, 0), *hp = blk + K6_HI(j); /* one stream: the chunks in reading order */
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, b0 = a0, b1 = a0;
        for (int half = 0; half < 2; half++) { /* rows 0-7, 8-15 */
            __m256i hb = _mm256_loadu_si256((const __m256i *)(hp + 32 * half)), acc = _mm256_setzero_si256(),
                    acc2 = acc;
            for (int c = 0; c < 2; c++) { /* two pairs a lane in 16 bits (≤ 2·2·63·127), then 32 */
                __m256i v = _mm256_loadu_si256((const __m256i *)(nb + c * 64 + 32 * half));
                __m256i q0 = k6q_avx2(v, hb, 0, 4 * c), q1 = k6q_avx2(v, hb, 1, 4 * c + 2);
                const int8_t *xc = x + 16 * j + 8 * c;
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_add_epi16(
                                                _mm256_maddubs_epi16(q0, _mm256_set1_epi32(x4(xc))),
                                                _mm256_maddubs_epi16(q1, _mm256_set1_epi32(x4(xc + 4)))), ones));
                if (TWO == 2) {
                    const int8_t *yc = x2 + 16 * j + 8 * c;
                    acc2 = _mm256_add_epi32(acc2, _mm256_madd_epi16(_mm256_add_epi16(
                                                      _mm256_maddubs_epi16(q0, _mm256_set1_epi32(x4(yc))),
                                                      _mm256_maddubs_epi16(q1, _mm256_set1_epi32(x4(yc + 4)))), ones));
                }
            }
            if (half) a1 = acc, b1 = acc2;
            else a0 = acc, b0 = acc2;
        }
        __m256i s0 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 64 + j * PANEL)));
        __m256i s1 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 64 + j * PANEL + 8)));
        __m256i c32 = _mm256_set1_epi32(32 * xs[j]);
        i0 = _mm256_add_epi32(i0, _mm256_mullo_epi32(_mm256_sub_epi32(a0, c32), s0));
        i1 = _mm256_add_epi32(i1, _mm256_mullo_epi32(_mm256_sub_epi32(a1, c32), s1));
        if (TWO == 2) {
            __m256i d32 = _mm256_set1_epi32(32 * xs2[j]);
            i2 = _mm256_add_epi32(i2, _mm256_mullo_epi32(_mm256_sub_epi32(b0, d32), s0));
            i3 = _mm256_add_epi32(i3, _mm256_mullo_epi32(_mm256_sub_epi32(b1, d32), s1));
        }
    }
    is[0] = i0, is[1] = i1, is[2] = i2, is[3] = i3;
}

/* Rows r (and r + 1 when TWO) of X against panel p: 16 outputs each. */
AVX2 static inline __attribute__((always_inline)) void rows_avx2(const k_job *j, size_t p, int r, int TWO, float *o0,
                                                                  float *o1) {
    size_t nsb = (size_t)(j->in / SB), nx = (size_t)(j->in / 16);
    int t = j->W->ktype[p];
    const uint8_t *pb = (const uint8_t *)j->W->p + j->W->koff[p];
    const int8_t *x = j->xq + (size_t)r * j->in, *x2 = x + j->in;
    const int16_t *xs = j->xs + (size_t)r * nx, *xs2 = xs + nx;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, c0 = a0, c1 = a0;
    for (size_t s = 0; s < nsb; s++) {
        __m256i is[4], ms[4];
        const uint8_t *blk = pb + s * (t == GGML_Q4_K ? K4_BYTES : K6_BYTES);
        if (t == GGML_Q4_K) k4_sums(blk, x + s * SB, x2 + s * SB, xs + s * 16, xs2 + s * 16, TWO, is, ms);
        else k6_sums(blk, x + s * SB, x2 + s * SB, xs + s * 16, xs2 + s * 16, TWO, is);
        __m256 d0 = _mm256_loadu_ps((const float *)blk), d1 = _mm256_loadu_ps((const float *)blk + 8);
        __m256 dx = _mm256_set1_ps(j->dx[(size_t)r * nsb + s]);
        a0 = _mm256_fmadd_ps(_mm256_mul_ps(d0, dx), _mm256_cvtepi32_ps(is[0]), a0);
        a1 = _mm256_fmadd_ps(_mm256_mul_ps(d1, dx), _mm256_cvtepi32_ps(is[1]), a1);
        __m256 dx2 = _mm256_setzero_ps();
        if (TWO == 2) {
            dx2 = _mm256_set1_ps(j->dx[(size_t)(r + 1) * nsb + s]);
            c0 = _mm256_fmadd_ps(_mm256_mul_ps(d0, dx2), _mm256_cvtepi32_ps(is[2]), c0);
            c1 = _mm256_fmadd_ps(_mm256_mul_ps(d1, dx2), _mm256_cvtepi32_ps(is[3]), c1);
        }
        if (t == GGML_Q4_K) {
            __m256 e0 = _mm256_loadu_ps((const float *)(blk + 64)), e1 = _mm256_loadu_ps((const float *)(blk + 96));
            a0 = _mm256_fnmadd_ps(_mm256_mul_ps(e0, dx), _mm256_cvtepi32_ps(ms[0]), a0);
            a1 = _mm256_fnmadd_ps(_mm256_mul_ps(e1, dx), _mm256_cvtepi32_ps(ms[1]), a1);
            if (TWO == 2) {
                c0 = _mm256_fnmadd_ps(_mm256_mul_ps(e0, dx2), _mm256_cvtepi32_ps(ms[2]), c0);
                c1 = _mm256_fnmadd_ps(_mm256_mul_ps(e1, dx2), _mm256_cvtepi32_ps(ms[3]), c1);
            }
        }
    }
    _mm256_storeu_ps(o0, a0);
    _mm256_storeu_ps(o0 + 8, a1);
    if (TWO == 2) {
        _mm256_storeu_ps(o1, c0);
        _mm256_storeu_ps(o1 + 8, c1);
    }
}

AVX2 static void rows1_avx2(const k_job *j, size_t p, int r, float *o0) { rows_avx2(j, p, r, 1, o0, NULL); }
AVX2 static void rows2_avx2(const k_job *j, size_t p, int r, float *o0, float *o1) { rows_avx2(j, p, r, 2, o0, o1); }

/* AVX512-VNNI: a chunk of the panel's 16 rows × 4 bytes is one vector, and
 * vpdpbusd adds each row's 4 products into its 32-bit lane (Q4_K: the
 * unsigned nibbles times x; Q6_K: |x| times w with x's sign). The sums are
 * the same integers, the floats the same operations: the same bits. */
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma")))

VNNI static inline __attribute__((always_inline)) void k4_vnni(const uint8_t *blk, const int8_t *x, const int8_t *x2,
                                                                const int16_t *xs, const int16_t *xs2, int TWO,
                                                                __m512i *is, __m512i *ms) {
    const __m512i m4 = _mm512_set1_epi8(15);
    __m512i i0 = _mm512_setzero_si512(), i1 = i0, n0 = i0, n1 = i0;
    for (int sb = 0; sb < 8; sb++) {
        const uint8_t *nb = blk + K4_NIB + sb * 256;
        /* low and high nibbles in two sums: half the chain of dependent vpdpbusd */
        __m512i a = _mm512_setzero_si512(), a2 = a, b = a, b2 = a;
        for (int c = 0; c < 4; c++) {
            __m512i v = _mm512_loadu_si512((const void *)(nb + c * 64));
            __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
            a = _mm512_dpbusd_epi32(a, lo, _mm512_set1_epi32(x4(x + 32 * sb + 8 * c)));
            a2 = _mm512_dpbusd_epi32(a2, hi, _mm512_set1_epi32(x4(x + 32 * sb + 8 * c + 4)));
            if (TWO == 2) {
                b = _mm512_dpbusd_epi32(b, lo, _mm512_set1_epi32(x4(x2 + 32 * sb + 8 * c)));
                b2 = _mm512_dpbusd_epi32(b2, hi, _mm512_set1_epi32(x4(x2 + 32 * sb + 8 * c + 4)));
            }
        }
        a = _mm512_add_epi32(a, a2);
        b = _mm512_add_epi32(b, b2);
        __m512i sc = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(blk + 128 + sb * PANEL)));
        __m512i mn = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(blk + 256 + sb * PANEL)));
        i0 = _mm512_add_epi32(i0, _mm512_mullo_epi32(a, sc));
        n0 = _mm512_add_epi32(n0, _mm512_madd_epi16(mn, _mm512_set1_epi32(xs[2 * sb] + xs[2 * sb + 1])));
        if (TWO == 2) {
            i1 = _mm512_add_epi32(i1, _mm512_mullo_epi32(b, sc));
            n1 = _mm512_add_epi32(n1, _mm512_madd_epi16(mn, _mm512_set1_epi32(xs2[2 * sb] + xs2[2 * sb + 1])));
        }
    }
    is[0] = i0, is[1] = i1, ms[0] = n0, ms[1] = n1;
}

VNNI static inline __m512i k6q_vnni(__m512i v, __m512i hb, int hi, int sh) {
    const __m512i m4 = _mm512_set1_epi8(15), m30 = _mm512_set1_epi8(0x30);
    __m512i lo = hi ? _mm512_and_si512(_mm512_srli_epi16(v, 4), m4) : _mm512_and_si512(v, m4);
    __m512i top = sh < 4 ? _mm512_slli_epi16(hb, (unsigned)(4 - sh)) : sh == 4 ? hb : _mm512_srli_epi16(hb, (unsigned)(sh - 4));
    return _mm512_or_si512(lo, _mm512_and_si512(top, m30));
}

VNNI static inline __attribute__((always_inline)) void k6_vnni(const uint8_t *blk, const int8_t *x, const int8_t *x2,
                                                                const int16_t *xs, const int16_t *xs2, int TWO,
                                                                __m512i *is) {
    const __m512i zero = _mm512_setzero_si512();
    __m512i i0 = zero, i1 = zero;
    for (int j = 0; j < 16; j++) {
        const uint8_t *nb = blk + K6_NIB(j, 0), *hp = blk + K6_HI(j); /* one stream: the chunks in reading order */
        __m512i hb = _mm512_loadu_si512((const void *)hp);
        __m512i a = zero, b = zero, a2 = zero, b2 = zero;
        for (int c = 0; c < 2; c++) {
            __m512i v = _mm512_loadu_si512((const void *)(nb + c * 64));
            __m512i q0 = k6q_vnni(v, hb, 0, 4 * c), q1 = k6q_vnni(v, hb, 1, 4 * c + 2);
            const int8_t *xc = x + 16 * j + 8 * c;
            a = _mm512_dpbusd_epi32(a, q0, _mm512_set1_epi32(x4(xc)));
            a2 = _mm512_dpbusd_epi32(a2, q1, _mm512_set1_epi32(x4(xc + 4)));
            if (TWO == 2) {
                const int8_t *yc = x2 + 16 * j + 8 * c;
                b = _mm512_dpbusd_epi32(b, q0, _mm512_set1_epi32(x4(yc)));
                b2 = _mm512_dpbusd_epi32(b2, q1, _mm512_set1_epi32(x4(yc + 4)));
            }
        }
        __m512i sc = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 64 + j * PANEL)));
        a = _mm512_sub_epi32(_mm512_add_epi32(a, a2), _mm512_set1_epi32(32 * xs[j]));
        i0 = _mm512_add_epi32(i0, _mm512_mullo_epi32(a, sc));
        if (TWO == 2) {
            b = _mm512_sub_epi32(_mm512_add_epi32(b, b2), _mm512_set1_epi32(32 * xs2[j]));
            i1 = _mm512_add_epi32(i1, _mm512_mullo_epi32(b, sc));
        }
    }
    is[0] = i0, is[1] = i1;
}

VNNI static inline __attribute__((always_inline)) void rows_vnni(const k_job *j, size_t p, int r, int TWO, float *o0,
                                                                  float *o1) {
    size_t nsb = (size_t)(j->in / SB), nx = (size_t)(j->in / 16);
    int t = j->W->ktype[p];
    const uint8_t *pb = (const uint8_t *)j->W->p + j->W->koff[p];
    const int8_t *x = j->xq + (size_t)r * j->in, *x2 = x + j->in;
    const int16_t *xs = j->xs + (size_t)r * nx, *xs2 = xs + nx;
    __m512 a = _mm512_setzero_ps(), c = a;
    for (size_t s = 0; s < nsb; s++) {
        __m512i is[2], ms[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
        const uint8_t *blk = pb + s * (t == GGML_Q4_K ? K4_BYTES : K6_BYTES);
        if (t == GGML_Q4_K) k4_vnni(blk, x + s * SB, x2 + s * SB, xs + s * 16, xs2 + s * 16, TWO, is, ms);
        else k6_vnni(blk, x + s * SB, x2 + s * SB, xs + s * 16, xs2 + s * 16, TWO, is);
        __m512 d = _mm512_loadu_ps((const float *)blk), dx = _mm512_set1_ps(j->dx[(size_t)r * nsb + s]);
        a = _mm512_fmadd_ps(_mm512_mul_ps(d, dx), _mm512_cvtepi32_ps(is[0]), a);
        __m512 dx2 = _mm512_setzero_ps();
        if (TWO == 2) {
            dx2 = _mm512_set1_ps(j->dx[(size_t)(r + 1) * nsb + s]);
            c = _mm512_fmadd_ps(_mm512_mul_ps(d, dx2), _mm512_cvtepi32_ps(is[1]), c);
        }
        if (t == GGML_Q4_K) {
            __m512 e = _mm512_loadu_ps((const float *)(blk + 64));
            a = _mm512_fnmadd_ps(_mm512_mul_ps(e, dx), _mm512_cvtepi32_ps(ms[0]), a);
            if (TWO == 2) c = _mm512_fnmadd_ps(_mm512_mul_ps(e, dx2), _mm512_cvtepi32_ps(ms[1]), c);
        }
    }
    _mm512_storeu_ps(o0, a);
    if (TWO == 2) _mm512_storeu_ps(o1, c);
}

VNNI static void rows1_vnni(const k_job *j, size_t p, int r, float *o0) { rows_vnni(j, p, r, 1, o0, NULL); }
VNNI static void rows2_vnni(const k_job *j, size_t p, int r, float *o0, float *o1) { rows_vnni(j, p, r, 2, o0, o1); }

static void panel_x86(const k_job *j, size_t p, int r0, int R, int valid, int vnni) {
    for (int r = r0; r < r0 + R; r += 2) {
        int two = r + 1 < r0 + R;
        float t[2][16];
        if (vnni) {
            if (two) rows2_vnni(j, p, r, t[0], t[1]);
            else rows1_vnni(j, p, r, t[0]);
        } else if (two) {
            rows2_avx2(j, p, r, t[0], t[1]);
        } else {
            rows1_avx2(j, p, r, t[0]);
        }
        for (int q = 0; q <= two; q++) {
            float *y = j->Y + (size_t)(r + q) * j->out + p * PANEL;
            if (valid == PANEL) memcpy(y, t[q], sizeof t[q]);
            else for (int o = 0; o < valid; o++) y[o] = t[q][o];
        }
    }
}
#endif

/* Row r of X: per super-block the float scale and the values (as Q8_0's
 * activations, over 256), and the sums of each 32. */
static void quant_rows(void *ctx, int r, int thread) {
    (void)thread;
    const k_job *j = ctx;
    size_t nsb = (size_t)(j->in / SB);
    const float *x = j->X + (size_t)r * j->in;
    int8_t *q = (int8_t *)j->xq + (size_t)r * j->in;
    for (size_t s = 0; s < nsb; s++) ((float *)j->dx)[(size_t)r * nsb + s] = eng__quant8(x + s * SB, SB, q + s * SB);
    int16_t *xs = (int16_t *)j->xs + (size_t)r * (size_t)(j->in / 16);
    for (int b = 0; b < j->in / 16; b++) {
        int sum = 0;
        for (int i = 0; i < 16; i++) sum += q[16 * b + i];
        xs[b] = (int16_t)sum;
    }
}

static void k_panels(const k_job *j, int p0, int p1) {
    for (int p = p0; p < p1; p++) {
        int valid = j->out - p * PANEL < PANEL ? j->out - p * PANEL : PANEL;
        for (int r0 = 0; r0 < j->n; r0 += 8) { /* a panel's super-blocks stay in L1 while a group passes */
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

static void k_task(void *ctx, int task, int thread) {
    (void)thread;
    const k_job *j = ctx;
    int P = (j->out + PANEL - 1) / PANEL, p1 = (task + 1) * j->chunk < P ? (task + 1) * j->chunk : P;
    k_panels(j, task * j->chunk, p1);
}

/* A decode product: thread t's panels from eng__share (matmul.c, mm_share;
 * the shares are by bytes: the panels of a Q4_K_M matrix differ in size). */
static void k_share(void *ctx, int t, int thread) {
    (void)thread;
    const k_job *j = ctx;
    int p0, p1;
    while (eng__share_next(j->share, t, &p0, &p1)) k_panels(j, p0, p1);
}

void eng__matmul_k(float *Y, const float *X, const eng__mat *W, int n, int in, int out, float *xt, eng__pool *pool,
                   int isa) {
    /* the workspace (n * in floats): n * in values, n * in / 256 scales, n * in / 16 sums */
    int8_t *xq = (int8_t *)xt;
    float *dx = xt + ((size_t)n * in + 3) / 4;
    int16_t *xs = (int16_t *)(void *)(dx + (size_t)n * (in / SB));
    k_job j = {Y, X, xq, dx, xs, W, n, in, out, 0, isa, eng__pool_threads(pool), NULL};
    eng__pool_run((size_t)n * in >= 65536 ? pool : NULL, n, quant_rows, &j);
    if (eng__decode_shared(W, n, in, out)) {
        eng__share sh;
        eng__share_init(&sh, W, j.T);
        j.share = &sh;
        eng__pool_each(pool, k_share, &j);
        return;
    }
    int P = (out + PANEL - 1) / PANEL, tasks = eng__pool_threads(pool) * (n <= 8 ? 2 : 4);
    j.chunk = (P + tasks - 1) / tasks;
    eng__pool_run(pool, (P + j.chunk - 1) / j.chunk, k_task, &j);
}
