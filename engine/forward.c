/* forward.c — the LLaMA forward pass over a batch of tokens.
 *
 * Read top to bottom like the equations:
 *   x = embed[token]
 *   per layer:  h = x + Wo · attn(rope(Wq·n1(x)), rope(Wk·n1(x)), Wv·n1(x))
 *               (+ the biases of the projections that have them, and with
 *               qk_norm an RMSNorm over each head of q and k before RoPE)
 *               x = h + W2 · (silu(W1·n2(h)) ⊙ W3·n2(h))
 *   logits = Wlm · norm(x)
 * The relatives change parts of it: biases, q/k norms, sliding-window layers
 * that see only their last W positions (attend from lo = pos - W + 1), Gemma
 * 3's norms after each sublayer, scaled embeddings and GELU-tanh gate, and
 * mixture-of-experts layers whose MLP is the router's top-k experts, each
 * expert run once per batch over the tokens routed to it (moe()).
 * The matrix products run over all tokens of the batch at once (matmul.c,
 * the same arithmetic per token at any batch size); attention reads K/V
 * straight from the sequence's KV blocks. Tokens of several sequences may share a batch. */
#include "internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct fwd_scratch {
    int max_tokens, max_ctx, n_thr;
    float *x;      /* [T][H] residual stream */
    float *xb;     /* [T][H] normalised input of a sublayer */
    float *qkv;    /* [T][QD + 2 KD] */
    float *att;    /* [T][QD] attention output */
    float *hb;     /* [T][2F] gate | up */
    float *hb2;    /* [T][F] silu(gate) * up */
    float *tmp;    /* [T][H] sublayer output */
    float *xt;     /* [T][max(H, QD, F)] a matmul's input, packed (matmul.c) */
    float *scores; /* [threads][group][max_ctx] attention weights */
    float *kc, *vc;  /* [nkv][max_ctx][hd]: each KV head's keys and values, contiguous (prefill runs) */
    float *rows;     /* [threads][hd]: an F16 K or V row as floats */
    float *sm;       /* [threads][RB][max_ctx]: a block of a prefill run's scores */
    int *single;     /* [max_tokens]: rows attended token by token */
    /* mixture of experts */
    float *rl;       /* [T][E] router logits */
    int32_t *pick;   /* [T][k] chosen experts */
    float *pw;       /* [T][k] their weights */
    int32_t *rows_e; /* [T] tokens routed to the expert being run */
    float *we;       /* [T] their weights */
    float *xe, *he, *he2, *ye; /* [T][H], [T][2Fe], [T][Fe], [T][H] */
    /* KVSERVE_PROFILE=1: where one-token passes (decode) spend their time, printed at the end */
    int prof_on;
    long prof_passes;
    double prof[8];
};

enum { PH_ELEM, PH_QKV, PH_ATTN, PH_O, PH_W13, PH_W2, PH_HEAD, PH_WAIT, PH_N };
static const char *const ph_name[PH_N] = {"element-wise (embedding, norms, RoPE + KV store, SiLU, residuals)",
                                          "q/k/v product", "attention", "o product", "gate/up product",
                                          "down product", "LM head", "of which: waiting for the other threads"};

#define MAX_THREADS 64
/* Rows per block of a prefill run's attention products. */
#define RB 64

fwd_scratch *fwd_scratch_new(const eng_config *c, int T, int max_ctx, int threads) {
    fwd_scratch *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    size_t H = (size_t)c->hidden_size, QD = (size_t)c->n_heads * c->head_dim,
           KD = (size_t)c->n_kv_heads * c->head_dim, F = (size_t)c->intermediate_size;
    s->max_tokens = T;
    s->max_ctx = max_ctx;
    size_t thr = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : (size_t)threads; /* per-thread buffers */
    s->x = malloc((size_t)T * H * sizeof(float));
    s->xb = malloc((size_t)T * H * sizeof(float));
    s->qkv = malloc((size_t)T * (QD + 2 * KD) * sizeof(float));
    s->att = malloc((size_t)T * QD * sizeof(float));
    s->hb = malloc((size_t)T * 2 * F * sizeof(float));
    s->hb2 = malloc((size_t)T * F * sizeof(float));
    s->tmp = malloc((size_t)T * H * sizeof(float));
    size_t widest = H > QD ? H : QD, Fe = (size_t)c->moe_intermediate_size;
    widest = widest > F ? widest : F;
    s->xt = malloc((size_t)T * (widest > Fe ? widest : Fe) * sizeof(float));
    if (c->n_experts) {
        size_t E = (size_t)c->n_experts, k = (size_t)c->n_experts_used;
        s->rl = malloc((size_t)T * E * sizeof(float));
        s->pick = malloc((size_t)T * k * sizeof(int32_t));
        s->pw = malloc((size_t)T * k * sizeof(float));
        s->rows_e = malloc((size_t)T * sizeof(int32_t));
        s->we = malloc((size_t)T * sizeof(float));
        s->xe = malloc((size_t)T * H * sizeof(float));
        s->he = malloc((size_t)T * 2 * Fe * sizeof(float));
        s->he2 = malloc((size_t)T * Fe * sizeof(float));
        s->ye = malloc((size_t)T * H * sizeof(float));
        if (!s->rl || !s->pick || !s->pw || !s->rows_e || !s->we || !s->xe || !s->he || !s->he2 || !s->ye) {
            fwd_scratch_free(s);
            return NULL;
        }
    }
    s->scores = malloc(thr * (size_t)(c->n_heads / c->n_kv_heads) * (size_t)max_ctx * sizeof(float));
    size_t kvc = (size_t)c->n_kv_heads * (size_t)max_ctx * (size_t)c->head_dim;
    s->kc = malloc(kvc * sizeof(float));
    s->vc = malloc(kvc * sizeof(float));
    s->sm = malloc(thr * RB * (size_t)max_ctx * sizeof(float));
    s->single = malloc((size_t)T * sizeof *s->single);
    s->rows = malloc(thr * (size_t)c->head_dim * sizeof(float));
    if (!s->x || !s->xb || !s->qkv || !s->att || !s->hb || !s->hb2 || !s->tmp || !s->xt || !s->scores || !s->kc || !s->vc ||
        !s->sm || !s->single || !s->rows) {
        fwd_scratch_free(s);
        return NULL;
    }
    const char *pe = getenv("KVSERVE_PROFILE");
    s->prof_on = pe && pe[0] && strcmp(pe, "0") != 0;
    return s;
}

void fwd_scratch_free(fwd_scratch *s) {
    if (!s) return;
    if (s->prof_on && s->prof_passes) {
        double total = 0;
        for (int i = 0; i < PH_WAIT; i++) total += s->prof[i];
        fprintf(stderr, "kvserve profile: %ld one-token passes, %.3f ms each:\n", s->prof_passes,
                1e3 * total / (double)s->prof_passes);
        for (int i = 0; i < PH_N; i++)
            fprintf(stderr, "  %6.3f ms %5.1f%%  %s\n", 1e3 * s->prof[i] / (double)s->prof_passes,
                    100 * s->prof[i] / total, ph_name[i]);
    }
    free(s->x); free(s->xb); free(s->qkv); free(s->att); free(s->hb); free(s->hb2); free(s->tmp); free(s->xt); free(s->scores);
    free(s->kc); free(s->vc); free(s->sm); free(s->single); free(s->rows);
    free(s->rl); free(s->pick); free(s->pw); free(s->rows_e); free(s->we); free(s->xe); free(s->he); free(s->he2);
    free(s->ye);
    free(s);
}

/* The rotation frequency of pair j at position pos, with rope_scaling
 * applied: linear divides every frequency by the factor; llama3 divides the
 * low ones (wavelength beyond original_max / low_freq_factor), keeps the high
 * ones (below original_max / high_freq_factor) and blends in between;
 * dynamic raises the base for positions past the trained context, each
 * position as transformers rotates it when it is generated token by token
 * (a position that arrives within a longer forward pass there takes that
 * pass's length instead; here the rotation of a position never depends on
 * how the context was cut into passes, so resumed = fresh and prefixes are
 * shared). */
static double rope_freq(const eng_config *c, int j, int local, int pos) {
    double base = local ? c->rope_local_theta : c->rope_theta;
    if (!local && c->rope_scaling == ENG_ROPE_DYNAMIC && pos + 1 > c->rope_original_max) {
        /* NTK-aware dynamic scaling for a context of L = pos + 1 beyond the trained L0:
         * base' = base * (factor * L / L0 - (factor - 1)) ^ (hd / (hd - 2)) */
        const double f = c->rope_factor, L = pos + 1.0, L0 = c->rope_original_max, hd = c->head_dim;
        base *= pow(f * L / L0 - (f - 1), hd / (hd - 2));
    }
    double inv = pow(base, -2.0 * j / c->head_dim);
    if (local) return inv; /* the sliding layers' own base, never scaled (gemma3) */
    if (c->rope_scaling == ENG_ROPE_LINEAR) return inv / c->rope_factor;
    if (c->rope_scaling == ENG_ROPE_FACTORS) return inv / c->rope_ff[j];
    if (c->rope_scaling != ENG_ROPE_LLAMA3) return inv;
    const double pi = 3.14159265358979323846, om = c->rope_original_max, f = c->rope_factor;
    const double lo = c->rope_low_freq_factor, hi = c->rope_high_freq_factor, wavelen = 2 * pi / inv;
    if (wavelen < om / hi) return inv;
    if (wavelen > om / lo) return inv / f;
    double smooth = (om / wavelen - lo) / (hi - lo);
    return (1 - smooth) * inv / f + smooth * inv;
}

float *fwd_rope_table(const eng_config *c, int max_ctx, int local) {
    int half = c->head_dim / 2;
    float *t = malloc((size_t)max_ctx * (size_t)half * 2 * sizeof(float));
    if (!t) return NULL;
    for (int p = 0; p < max_ctx; p++)
        for (int j = 0; j < half; j++) {
            double inv = rope_freq(c, j, local, p), a = p * inv;
            t[((size_t)p * half + j) * 2] = (float)cos(a);
            t[((size_t)p * half + j) * 2 + 1] = (float)sin(a);
        }
    return t;
}

static void rmsnorm(float *o, const float *x, const float *w, int n, float eps) {
    double ss = 0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float r = (float)(1.0 / sqrt(ss / n + eps));
    for (int i = 0; i < n; i++) o[i] = x[i] * r * w[i];
}

/* rotate_half RoPE on one head: pairs (j, j + hd/2). */
static void rope(float *v, const float *cs, int hd) {
    int half = hd / 2;
    for (int j = 0; j < half; j++) {
        float a = v[j], b = v[j + half], c = cs[2 * j], s = cs[2 * j + 1];
        v[j] = a * c - b * s;
        v[j + half] = b * c + a * s;
    }
}

/* exp over 16 lanes: glibc's vector expf (libmvec, AVX-512 variant). */
#if defined(__x86_64__) && defined(__GNUC__) && defined(KVSERVE_HAVE_MVEC)
#include <immintrin.h>
#define VEXP 1
__attribute__((target("avx512f"))) __m512 _ZGVeN16v_expf(__m512 x);

/* row[0..n) <- softmax(row[0..n)), 16 lanes at a time. */
__attribute__((target("avx512f"))) static void softmax512(float *row, int n) {
    __m512 mx = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
    int p = 0;
    for (; p + 16 <= n; p += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(row + p));
    float m = _mm512_reduce_max_ps(mx);
    for (; p < n; p++) m = row[p] > m ? row[p] : m;
    const __m512 vm = _mm512_set1_ps(m);
    for (p = 0; p + 16 <= n; p += 16) {
        __m512 e = _ZGVeN16v_expf(_mm512_sub_ps(_mm512_loadu_ps(row + p), vm));
        _mm512_storeu_ps(row + p, e);
        sum = _mm512_add_ps(sum, e);
    }
    if (p < n) {
        __mmask16 k = (__mmask16)((1u << (n - p)) - 1);
        __m512 e = _ZGVeN16v_expf(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, row + p), vm));
        _mm512_mask_storeu_ps(row + p, k, e);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(k, e));
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
    for (p = 0; p + 16 <= n; p += 16) _mm512_storeu_ps(row + p, _mm512_mul_ps(_mm512_loadu_ps(row + p), inv));
    for (; p < n; p++) row[p] *= _mm512_cvtss_f32(inv);
}

/* o = silu(g) * u = g / (1 + exp(-g)) * u, 16 lanes at a time. */
__attribute__((target("avx512f"))) static void silu_mul512(float *o, const float *g, const float *u, int n) {
    const __m512 one = _mm512_set1_ps(1.0f);
    int d = 0;
    for (; d < n; d += 16) {
        __mmask16 k = n - d >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - d)) - 1);
        __m512 gv = _mm512_maskz_loadu_ps(k, g + d);
        __m512 e = _ZGVeN16v_expf(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        _mm512_mask_storeu_ps(o + d, k, _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(one, e)), _mm512_maskz_loadu_ps(k, u + d)));
    }
}
#endif

/* row[0..n) <- softmax(row[0..n)), in place. */
static inline void softmax(float *row, int n) {
#ifdef VEXP
    if (eng__cpu_avx512()) {
        softmax512(row, n);
        return;
    }
#endif
    float mx = -INFINITY, sum = 0;
    for (int p = 0; p < n; p++) mx = row[p] > mx ? row[p] : mx;
    for (int p = 0; p < n; p++) {
        row[p] = expf(row[p] - mx);
        sum += row[p];
    }
    float inv = 1.0f / sum;
    for (int p = 0; p < n; p++) row[p] *= inv;
}

/* o = gelu_tanh(g) * u, GELU's tanh approximation (Gemma's gelu_pytorch_tanh). */
static void gelu_tanh_mul(float *o, const float *g, const float *u, int n) {
    const float k = 0.7978845608028654f; /* sqrt(2 / pi) */
    for (int d = 0; d < n; d++) {
        float x = g[d];
        o[d] = 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x))) * u[d];
    }
}

static void silu_mul(float *o, const float *g, const float *u, int n) {
#ifdef VEXP
    if (eng__cpu_avx512()) {
        silu_mul512(o, g, u, n);
        return;
    }
#endif
    for (int d = 0; d < n; d++) o[d] = g[d] / (1.0f + expf(-g[d])) * u[d];
}

/* Hot loops are compiled for several instruction sets; the loader picks the
 * best one the CPU has (GCC function multi-versioning). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define HOT __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define HOT
#endif

/* Attention of the `group` query heads that share KV head kvh, for one token
 * at position pos, over positions lo..pos of its sequence (lo > 0 in a
 * sliding-window layer). The hot loop of attention: each K row and each V row
 * is read once for the whole group, block by block, straight from the KV
 * pool. Scores are kept at their absolute positions in sc. */
HOT static void attend(float *out, const float *q, const kv_pool *kv, const kv_table *t, int layer, int lo, int pos,
                       int kvh, int hd, int group, int ctx, float scale, float *sc, float *row_buf) {
    const int B = kv->block_tokens, kvd = kv->kv_dim;
    for (int p0 = lo - lo % B; p0 <= pos; p0 += B) {
        const void *K = kv_at(kv, kv_k(kv, t, layer, p0), (size_t)kvh * hd);
        int i0 = p0 < lo ? lo - p0 : 0, end = p0 + B <= pos + 1 ? B : pos + 1 - p0;
        for (int i = i0; i < end; i++) {
            const float *k = kv_at(kv, K, (size_t)i * kvd);
            if (kv->f16) {
                kv_get(kv, k, row_buf, hd);
                k = row_buf;
            }
            for (int g = 0; g < group; g++) {
                const float *qg = q + (size_t)g * hd;
                float s = 0;
#pragma omp simd reduction(+ : s)
                for (int d = 0; d < hd; d++) s += qg[d] * k[d];
                sc[(size_t)g * ctx + p0 + i] = s * scale;
            }
        }
    }
    for (int g = 0; g < group; g++) {
        softmax(sc + (size_t)g * ctx + lo, pos + 1 - lo);
    }
    memset(out, 0, (size_t)group * hd * sizeof(float));
    for (int p0 = lo - lo % B; p0 <= pos; p0 += B) {
        const void *V = kv_at(kv, kv_v(kv, t, layer, p0), (size_t)kvh * hd);
        int i0 = p0 < lo ? lo - p0 : 0, end = p0 + B <= pos + 1 ? B : pos + 1 - p0;
        for (int i = i0; i < end; i++) {
            const float *v = kv_at(kv, V, (size_t)i * kvd);
            if (kv->f16) {
                kv_get(kv, v, row_buf, hd);
                v = row_buf;
            }
            for (int g = 0; g < group; g++) {
                float w = sc[(size_t)g * ctx + p0 + i], *o = out + (size_t)g * hd;
#pragma omp simd
                for (int d = 0; d < hd; d++) o[d] += w * v[d];
            }
        }
    }
}

/* Runs shorter than this go token by token through attend(). */
#define RUN_MIN 32

/* Attention of a prefill run: m consecutive positions p0 .. p0+m-1 of one
 * sequence (rows i0.. of the batch), as matrix products. First each KV
 * head's keys and values are gathered from the blocks into contiguous
 * [ctx][hd] copies (a task per KV head); then a task per query head and
 * block of RB rows computes S = Q·Kᵀ·scale (sgemm) over the positions the
 * block can see, a causal (and, in a sliding layer, windowed) softmax per
 * row, and O = S·V (sgemm). Within a block the masked corners are computed
 * and zeroed: a little more than the visible part of the FLOPs, at sgemm's
 * rate instead of one dot product at a time. The tasks run on the engine's
 * threads; OpenBLAS runs single-threaded inside each (eng_model_open). */
typedef struct {
    fwd_scratch *s;
    const kv_pool *kv;
    const kv_table *t;
    int layer, i0, p0, m, group, hd, QD, QKV;
    int window;  /* 0, or the sliding window: row at position p sees p - window + 1 .. p */
    float scale;
} run_job;

/* First position a row at position p sees. */
static inline int first_seen(int window, int p) { return window && p - window + 1 > 0 ? p - window + 1 : 0; }

static void run_gather_task(void *ctx, int h, int thread) {
    (void)thread;
    const run_job *j = ctx;
    const kv_pool *kv = j->kv;
    const int ctxn = j->p0 + j->m, B = kv->block_tokens, hd = j->hd;
    float *kc = j->s->kc + (size_t)h * j->s->max_ctx * hd, *vc = j->s->vc + (size_t)h * j->s->max_ctx * hd;
    for (int p = first_seen(j->window, j->p0); p < ctxn;) { /* blocks before the window may be gone */
        int rows = B - p % B < ctxn - p ? B - p % B : ctxn - p;
        const void *K = kv_at(kv, kv_k(kv, j->t, j->layer, p), (size_t)h * hd),
                   *V = kv_at(kv, kv_v(kv, j->t, j->layer, p), (size_t)h * hd);
        for (int r = 0; r < rows; r++) {
            kv_get(kv, kv_at(kv, K, (size_t)r * kv->kv_dim), kc + (size_t)(p + r) * hd, hd);
            kv_get(kv, kv_at(kv, V, (size_t)r * kv->kv_dim), vc + (size_t)(p + r) * hd, hd);
        }
        p += rows;
    }
}

static void run_attend_task(void *ctx, int task, int thread) {
    const run_job *j = ctx;
    const int blocks = (j->m + RB - 1) / RB, qh = task / blocks, r0 = task % blocks * RB, hd = j->hd;
    const int h = qh / j->group, r1 = r0 + RB < j->m ? r0 + RB : j->m, nr = r1 - r0;
    /* rows [r0, r1) see positions c0 .. p0 + r1 - 1: the products skip what is masked for all of them */
    const int c0 = first_seen(j->window, j->p0 + r0), cb = j->p0 + r1 - c0;
    const float *kc = j->s->kc + ((size_t)h * j->s->max_ctx + (size_t)c0) * hd,
                *vc = j->s->vc + ((size_t)h * j->s->max_ctx + (size_t)c0) * hd;
    float *sm = j->s->sm + (size_t)thread * RB * j->s->max_ctx;
    const float *Q = j->s->qkv + (size_t)(j->i0 + r0) * j->QKV + (size_t)qh * hd;
    eng__sgemm(1, nr, cb, hd, j->scale, Q, j->QKV, kc, hd, sm, cb);
    for (int r = 0; r < nr; r++) { /* row r0 + r sees positions lo .. last */
        float *row = sm + (size_t)r * cb;
        int last = j->p0 + r0 + r - c0, lo = first_seen(j->window, j->p0 + r0 + r) - c0;
        for (int p = 0; p < lo; p++) row[p] = 0;
        softmax(row + lo, last + 1 - lo);
        for (int p = last + 1; p < cb; p++) row[p] = 0;
    }
    eng__sgemm(0, nr, hd, cb, 1.0f, sm, cb, vc, hd, j->s->att + (size_t)(j->i0 + r0) * j->QD + (size_t)qh * hd, j->QD);
}

static void attend_run(fwd_scratch *s, const kv_pool *kv, const kv_table *t, int layer, int i0, int p0, int m,
                       int nkv, int group, int hd, int QD, int QKV, int window, float scale, eng__pool *pool) {
    run_job j = {s, kv, t, layer, i0, p0, m, group, hd, QD, QKV, window, scale};
    eng__pool_run(pool, nkv, run_gather_task, &j);
    eng__pool_run(pool, nkv * group * ((m + RB - 1) / RB), run_attend_task, &j);
}

#if defined(__x86_64__) && defined(__GNUC__)
/* 16 elements j*16.. of a KV row as floats (F16 rows widened by vcvtph2ps). */
#define ROW16(row, j)                                                                                   \
    (f16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)(row) + (j) * 16))) \
         : _mm512_loadu_ps((const float *)(row) + (j) * 16))
/* attend() for head_dim 64 and up to 4 query heads per KV head, with the
 * queries and the outputs held in AVX-512 registers: each K row is 4
 * vectors and yields one score per query head (one reduction each); each V
 * row is 4 vectors added into every head's 4 output accumulators. Same
 * operations per element for every token, batch or not. */
__attribute__((target("avx512f"))) static void attend64(float *out, const float *q, const kv_pool *kv,
                                                        const kv_table *t, int layer, int lo, int pos, int kvh,
                                                        int group, int ctx, float scale, float *sc) {
    const int B = kv->block_tokens, kvd = kv->kv_dim;
    __m512 qv[4][4];
    for (int g = 0; g < 4; g++)
        for (int d = 0; d < 4; d++) qv[g][d] = g < group ? _mm512_loadu_ps(q + g * 64 + d * 16) : _mm512_setzero_ps();
    const int f16 = kv->f16;
    /* Software prefetch: a block's rows of one head are short strided runs
     * (a few lines per row, the blocks scattered in the pool), too short for
     * the hardware prefetcher, and a batch's KV is read from memory every
     * step. While a block's keys are scored, the next block's keys and this
     * block's values are fetched. */
    const size_t row_bytes = 64 * kv->esz;
    for (int p0 = lo - lo % B; p0 <= pos; p0 += B) {
        const void *K = kv_at(kv, kv_k(kv, t, layer, p0), (size_t)kvh * 64);
        int i0 = p0 < lo ? lo - p0 : 0, end = p0 + B <= pos + 1 ? B : pos + 1 - p0;
        const char *nk = p0 + B <= pos ? kv_at(kv, kv_k(kv, t, layer, p0 + B), (size_t)kvh * 64) : NULL;
        const char *cv = kv_at(kv, kv_v(kv, t, layer, p0), (size_t)kvh * 64);
        int nend = p0 + 2 * B <= pos + 1 ? B : pos + 1 - p0 - B;
        for (int i = i0; i < end; i++)
            for (size_t l = 0; l < row_bytes; l += 64) _mm_prefetch(cv + (size_t)i * kvd * kv->esz + l, _MM_HINT_T0);
        if (nk)
            for (int i = 0; i < nend; i++)
                for (size_t l = 0; l < row_bytes; l += 64) _mm_prefetch(nk + (size_t)i * kvd * kv->esz + l, _MM_HINT_T0);
        for (int i = i0; i < end; i++) {
            const void *k = kv_at(kv, K, (size_t)i * kvd);
            __m512 k0 = ROW16(k, 0), k1 = ROW16(k, 1), k2 = ROW16(k, 2), k3 = ROW16(k, 3);
            for (int g = 0; g < group; g++) {
                __m512 a = _mm512_mul_ps(qv[g][0], k0);
                a = _mm512_fmadd_ps(qv[g][1], k1, a);
                a = _mm512_fmadd_ps(qv[g][2], k2, a);
                a = _mm512_fmadd_ps(qv[g][3], k3, a);
                sc[(size_t)g * ctx + p0 + i] = _mm512_reduce_add_ps(a) * scale;
            }
        }
    }
    for (int g = 0; g < group; g++) {
        softmax(sc + (size_t)g * ctx + lo, pos + 1 - lo);
    }
    __m512 o[4][4];
    for (int g = 0; g < 4; g++)
        for (int d = 0; d < 4; d++) o[g][d] = _mm512_setzero_ps();
    for (int p0 = lo - lo % B; p0 <= pos; p0 += B) {
        const void *V = kv_at(kv, kv_v(kv, t, layer, p0), (size_t)kvh * 64);
        int i0 = p0 < lo ? lo - p0 : 0, end = p0 + B <= pos + 1 ? B : pos + 1 - p0;
        for (int i = i0; i < end; i++) {
            const void *v = kv_at(kv, V, (size_t)i * kvd);
            __m512 v0 = ROW16(v, 0), v1 = ROW16(v, 1), v2 = ROW16(v, 2), v3 = ROW16(v, 3);
            for (int g = 0; g < group; g++) {
                __m512 w = _mm512_set1_ps(sc[(size_t)g * ctx + p0 + i]);
                o[g][0] = _mm512_fmadd_ps(w, v0, o[g][0]);
                o[g][1] = _mm512_fmadd_ps(w, v1, o[g][1]);
                o[g][2] = _mm512_fmadd_ps(w, v2, o[g][2]);
                o[g][3] = _mm512_fmadd_ps(w, v3, o[g][3]);
            }
        }
    }
    for (int g = 0; g < group; g++)
        for (int d = 0; d < 4; d++) _mm512_storeu_ps(out + g * 64 + d * 16, o[g][d]);
}

static int use_attend64(int hd, int group) { return eng__cpu_avx512() && hd == 64 && group <= 4; }
#else
static void attend64(float *out, const float *q, const kv_pool *kv, const kv_table *t, int layer, int lo, int pos,
                     int kvh, int group, int ctx, float scale, float *sc) {
    (void)out; (void)q; (void)kv; (void)t; (void)layer; (void)lo; (void)pos; (void)kvh; (void)group; (void)ctx;
    (void)scale; (void)sc;
}
static int use_attend64(int hd, int group) { (void)hd; (void)group; return 0; }
#endif

/* One attention task: token i, KV head g (all the query heads of its group). */
typedef struct {
    const fwd_batch *b;
    const kv_pool *kv;
    fwd_scratch *s;
    int layer, nkv, group, hd, QD, QKV;
    int per_head; /* a task per (token, KV head), else per token */
    int window;   /* 0 or the layer's sliding window */
    float scale;
} att_job;

static void att_head(const att_job *j, int i, int g, int thread) {
    float *sc = j->s->scores + (size_t)thread * j->group * j->s->max_ctx;
    const int pos = j->b->pos[i], lo = first_seen(j->window, pos);
    if (use_attend64(j->hd, j->group)) {
        attend64(j->s->att + (size_t)i * j->QD + (size_t)g * j->group * j->hd,
                 j->s->qkv + (size_t)i * j->QKV + (size_t)g * j->group * j->hd, j->kv, &j->b->tables[j->b->seq[i]],
                 j->layer, lo, pos, g, j->group, j->s->max_ctx, j->scale, sc);
        return;
    }
    attend(j->s->att + (size_t)i * j->QD + (size_t)g * j->group * j->hd,
           j->s->qkv + (size_t)i * j->QKV + (size_t)g * j->group * j->hd, j->kv, &j->b->tables[j->b->seq[i]], j->layer,
           lo, pos, g, j->hd, j->group, j->s->max_ctx, j->scale, sc, j->s->rows + (size_t)thread * j->hd);
}

/* One attention task: token i, its KV heads one after another on the same
 * thread (their keys and values share the blocks' rows: what one head's pass
 * brings into cache around its slice, the next one uses). */
static void att_task(void *ctx, int task, int thread) {
    const att_job *j = ctx;
    if (j->per_head) {
        att_head(j, j->s->single[task / j->nkv], task % j->nkv, thread);
        return;
    }
    for (int g = 0; g < j->nkv; g++) att_head(j, j->s->single[task], g, thread);
}

/* The element-wise steps between the matrix products, a task per slice of
 * rows (each row's arithmetic is the same whoever computes it). */
enum { ROW_NORM_ATTN, ROW_ROPE_STORE, ROW_RESID_NORM_FFN, ROW_SILU, ROW_RESID };
typedef struct {
    const eng_config *c;
    const eng__layer *L;
    const kv_pool *kv;
    fwd_scratch *s;
    const float *const *rope_t; /* [0] the global table, [1] the sliding layers' */
    const fwd_batch *b;
    int op, layer, n, per;
    int local;                  /* this layer uses rope_t[1] */
} rows_job;

static void rows_task(void *ctx, int task, int thread) {
    (void)thread;
    const rows_job *j = ctx;
    const eng_config *c = j->c;
    fwd_scratch *s = j->s;
    const int H = c->hidden_size, hd = c->head_dim, nh = c->n_heads, nkv = c->n_kv_heads, F = c->intermediate_size;
    const int QD = nh * hd, KD = nkv * hd, QKV = QD + 2 * KD, half = hd / 2;
    const int i0 = task * j->per, i1 = i0 + j->per < j->n ? i0 + j->per : j->n;
    for (int i = i0; i < i1; i++) {
        float *x = s->x + (size_t)i * H, *xb = s->xb + (size_t)i * H, *tmp = s->tmp + (size_t)i * H;
        switch (j->op) {
        case ROW_NORM_ATTN:
            rmsnorm(xb, x, j->L->attn_norm, H, c->rms_eps);
            break;
        case ROW_ROPE_STORE: { /* [biases, q/k norms,] RoPE on q and k, then k and v into the sequence's blocks */
            float *q = s->qkv + (size_t)i * QKV, *k = q + QD, *v = k + KD;
            const float *cs = j->rope_t[j->local] + (size_t)j->b->pos[i] * half * 2;
            if (j->L->bqkv)
                for (int d = 0; d < QKV; d++) q[d] += j->L->bqkv[d];
            if (j->L->q_norm) {
                for (int h = 0; h < nh; h++) rmsnorm(q + h * hd, q + h * hd, j->L->q_norm, hd, c->rms_eps);
                for (int h = 0; h < nkv; h++) rmsnorm(k + h * hd, k + h * hd, j->L->k_norm, hd, c->rms_eps);
            }
            for (int h = 0; h < nh; h++) rope(q + h * hd, cs, hd);
            for (int h = 0; h < nkv; h++) rope(k + h * hd, cs, hd);
            const kv_table *t = &j->b->tables[j->b->seq[i]];
            kv_put(j->kv, kv_k(j->kv, t, j->layer, j->b->pos[i]), k, KD);
            kv_put(j->kv, kv_v(j->kv, t, j->layer, j->b->pos[i]), v, KD);
            break;
        }
        case ROW_RESID_NORM_FFN:
            if (j->L->bo)
                for (int d = 0; d < H; d++) tmp[d] += j->L->bo[d];
            if (j->L->post_attn_norm) rmsnorm(tmp, tmp, j->L->post_attn_norm, H, c->rms_eps);
            for (int d = 0; d < H; d++) x[d] += tmp[d];
            rmsnorm(xb, x, j->L->ffn_norm, H, c->rms_eps);
            break;
        case ROW_SILU: {
            float *g = s->hb + (size_t)i * 2 * F;
            if (j->L->b13)
                for (int d = 0; d < 2 * F; d++) g[d] += j->L->b13[d];
            if (c->gemma) gelu_tanh_mul(s->hb2 + (size_t)i * F, g, g + F, F);
            else silu_mul(s->hb2 + (size_t)i * F, g, g + F, F);
            break;
        }
        case ROW_RESID:
            if (j->L->b2)
                for (int d = 0; d < H; d++) tmp[d] += j->L->b2[d];
            if (j->L->post_ffn_norm) rmsnorm(tmp, tmp, j->L->post_ffn_norm, H, c->rms_eps);
            for (int d = 0; d < H; d++) x[d] += tmp[d];
            break;
        }
    }
}

/* Rows on the engine's threads when there are enough of them to pay for the
 * hand-off (a few microseconds). */
static void rows_run(rows_job *j, int op, eng__pool *pool) {
    int threads = eng__pool_threads(pool), tasks = j->n >= 4 ? threads * 2 : 1;
    j->op = op;
    j->per = (j->n + tasks - 1) / tasks;
    eng__pool_run(j->n >= 4 ? pool : NULL, (j->n + j->per - 1) / j->per, rows_task, j);
}

/* ---- mixture of experts ------------------------------------------------- */
/* Route each token: softmax over the router's logits, the k largest (lowest
 * index first on ties), renormalised to sum to 1 when configured. */
static void route(const eng_config *c, fwd_scratch *s, int n) {
    const int E = c->n_experts, k = c->n_experts_used;
    for (int i = 0; i < n; i++) {
        float *l = s->rl + (size_t)i * E, *w = s->pw + (size_t)i * k;
        int32_t *pk = s->pick + (size_t)i * k;
        softmax(l, E);
        for (int r = 0; r < k; r++) {
            int best = -1;
            for (int e = 0; e < E; e++) {
                int taken = 0;
                for (int q = 0; q < r; q++) taken |= pk[q] == e;
                if (!taken && (best < 0 || l[e] > l[best])) best = e;
            }
            pk[r] = best;
            w[r] = l[best];
        }
        if (c->moe_norm_topk) {
            float sum = 0;
            for (int r = 0; r < k; r++) sum += w[r];
            for (int r = 0; r < k; r++) w[r] /= sum;
        }
    }
}

/* The experts' MLP over the normalised rows xb -> tmp. Each expert runs once,
 * over the tokens routed to it (its weights stream once per batch); a token's
 * outputs are added in expert order, so its result is the same in any batch. */
static void moe(const eng_config *c, const eng__layer *L, fwd_scratch *s, int n, eng__pool *pool) {
    const int H = c->hidden_size, E = c->n_experts, k = c->n_experts_used, Fe = c->moe_intermediate_size;
    eng__matmul(s->rl, s->xb, &L->router, n, H, E, s->xt, pool);
    route(c, s, n);
    memset(s->tmp, 0, (size_t)n * H * sizeof(float));
    for (int e = 0; e < E; e++) {
        int m = 0;
        for (int i = 0; i < n; i++)
            for (int r = 0; r < k; r++)
                if (s->pick[(size_t)i * k + r] == e) {
                    s->rows_e[m] = i;
                    s->we[m] = s->pw[(size_t)i * k + r];
                    memcpy(s->xe + (size_t)m * H, s->xb + (size_t)i * H, (size_t)H * sizeof(float));
                    m++;
                }
        if (!m) continue;
        eng__matmul(s->he, s->xe, &L->ew13[e], m, H, 2 * Fe, s->xt, pool);
        for (int r = 0; r < m; r++) {
            const float *g = s->he + (size_t)r * 2 * Fe;
            silu_mul(s->he2 + (size_t)r * Fe, g, g + Fe, Fe);
        }
        eng__matmul(s->ye, s->he2, &L->ew2[e], m, Fe, H, s->xt, pool);
        for (int r = 0; r < m; r++) {
            float *o = s->tmp + (size_t)s->rows_e[r] * H, w = s->we[r];
            const float *y = s->ye + (size_t)r * H;
            for (int d = 0; d < H; d++) o[d] += w * y[d];
        }
    }
}

void fwd_run(const eng_config *c, const eng__weights *w, const kv_pool *kv, fwd_scratch *s, const float *const *rope_t,
             eng__pool *pool, const fwd_batch *b) {
    const int H = c->hidden_size, hd = c->head_dim, nh = c->n_heads, nkv = c->n_kv_heads;
    const int QD = nh * hd, KD = nkv * hd, QKV = QD + 2 * KD, F = c->intermediate_size, V = c->vocab_size;
    const int n = b->n, group = nh / nkv;
    if (n <= 0) return;

    double pt = s->prof_on && n == 1 ? eng__now() : 0, pw = pt ? eng__pool_wait(pool) : 0;
#define MARK(ph) \
    if (pt) { \
        double u_ = eng__now(); \
        s->prof[ph] += u_ - pt; \
        pt = u_; \
    }
    long att_work = 0; /* multiply-adds of attention per layer */
    for (int i = 0; i < n; i++) att_work += (long)(b->pos[i] + 1) * nh * hd;
    for (int i = 0; i < n; i++) eng__mat_row(&w->embed, (size_t)b->tokens[i], H, s->x + (size_t)i * H);
    if (c->gemma) { /* Gemma scales the embeddings by sqrt(hidden) (in the weights' precision: F32 here) */
        const float g = (float)sqrt((double)H);
        for (size_t i = 0; i < (size_t)n * H; i++) s->x[i] *= g;
    }

    for (int l = 0; l < c->n_layers; l++) {
        const eng__layer *L = &w->layers[l];
        const int window = c->layer_flags[l] & ENG_LAYER_SLIDING ? c->sliding_window : 0;
        rows_job rj = {c, L, kv, s, rope_t, b, 0, l, n, 0, window && rope_t[1]};
        rows_run(&rj, ROW_NORM_ATTN, pool);
        MARK(PH_ELEM);
        eng__matmul(s->qkv, s->xb, &L->wqkv, n, H, QKV, s->xt, pool);
        MARK(PH_QKV);
        rows_run(&rj, ROW_ROPE_STORE, pool);
        MARK(PH_ELEM);

        /* attention: long runs of one sequence (prefill) as matrix
         * products; the other tokens one by one on threads when there is
         * enough work: a task per token (all its KV heads, which share the
         * blocks' rows), or per (token, KV head) when there are fewer tokens
         * than threads */
        int n_single = 0;
        for (int i = 0; i < n;) {
            int j = i + 1;
            while (j < n && b->seq[j] == b->seq[i] && b->pos[j] == b->pos[j - 1] + 1) j++;
            if (j - i >= RUN_MIN) {
                attend_run(s, kv, &b->tables[b->seq[i]], l, i, b->pos[i], j - i, nkv, group, hd, QD, QKV, window,
                           c->attn_scale, pool);
            } else {
                for (int k = i; k < j; k++) s->single[n_single++] = k;
            }
            i = j;
        }
        att_job job = {b, kv, s, l, nkv, group, hd, QD, QKV, n_single < eng__pool_threads(pool), window, c->attn_scale};
        eng__pool_run(att_work > 262144 ? pool : NULL, job.per_head ? n_single * nkv : n_single, att_task, &job);
        MARK(PH_ATTN);
        eng__matmul(s->tmp, s->att, &L->wo, n, QD, H, s->xt, pool);
        MARK(PH_O);
        rows_run(&rj, ROW_RESID_NORM_FFN, pool);
        MARK(PH_ELEM);
        if (L->ew13) {
            moe(c, L, s, n, pool);
            MARK(PH_W13);
        } else {
            eng__matmul(s->hb, s->xb, &L->w13, n, H, 2 * F, s->xt, pool);
            MARK(PH_W13);
            rows_run(&rj, ROW_SILU, pool);
            MARK(PH_ELEM);
            eng__matmul(s->tmp, s->hb2, &L->w2, n, F, H, s->xt, pool);
            MARK(PH_W2);
        }
        rows_run(&rj, ROW_RESID, pool);
        MARK(PH_ELEM);
    }

    if (b->n_out <= 0) return;
    for (int r = 0; r < b->n_out; r++)
        rmsnorm(s->xb + (size_t)r * H, s->x + (size_t)b->out_rows[r] * H, w->norm, H, c->rms_eps);
    MARK(PH_ELEM);
    eng__matmul(b->logits, s->xb, &w->lm_head, b->n_out, H, V, s->xt, pool);
    if (c->final_softcap > 0) {
        const float cap = c->final_softcap;
        for (size_t i = 0; i < (size_t)b->n_out * V; i++) b->logits[i] = cap * tanhf(b->logits[i] / cap);
    }
    MARK(PH_HEAD);
#undef MARK
    if (pt) {
        s->prof[PH_WAIT] += eng__pool_wait(pool) - pw;
        s->prof_passes++;
    }
}
