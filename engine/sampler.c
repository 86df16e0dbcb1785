/* sampler.c — token selection: repetition penalty, temperature, top-k,
 * top-p, min-p (in the order Hugging Face generate applies them), seeded. */
#include "internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct { float l; int32_t i; } cand;

struct eng__sampler {
    int V;
    float *prob;
    cand *c;
    uint8_t *seen;
};

/* xoshiro256**, seeded through splitmix64 */
void eng__rng_seed(eng__rng *r, uint64_t seed) {
    for (int i = 0; i < 4; i++) {
        uint64_t z = (seed += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        r->s[i] = z ^ (z >> 31);
    }
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

double eng__rng_uniform(eng__rng *r) {
    uint64_t *s = r->s, res = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3]; s[2] ^= t; s[3] = rotl(s[3], 45);
    return (double)(res >> 11) * 0x1.0p-53;
}

eng__sampler *eng__sampler_new(int vocab) {
    eng__sampler *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->V = vocab;
    s->prob = malloc((size_t)vocab * sizeof *s->prob);
    s->c = malloc((size_t)vocab * sizeof *s->c);
    s->seen = calloc((size_t)vocab, 1);
    if (!s->prob || !s->c || !s->seen) { eng__sampler_free(s); return NULL; }
    return s;
}

void eng__sampler_free(eng__sampler *s) {
    if (!s) return;
    free(s->prob); free(s->c); free(s->seen);
    free(s);
}

void eng_sampling_default(eng_sampling *s) {
    memset(s, 0, sizeof *s);
    s->temperature = 0.0f;
    s->top_p = 1.0f;
    s->repeat_penalty = 1.0f;
}

int eng_sampling_check(const eng_sampling *s, char *err, size_t errlen) {
    if (!(s->temperature >= 0.0f) || s->temperature > 100.0f)
        return eng__fail(err, errlen, ENG_ESAMPLING, "temperature must be in [0, 100]");
    if (s->top_k < 0) return eng__fail(err, errlen, ENG_ESAMPLING, "top_k must be >= 0");
    if (!(s->top_p > 0.0f && s->top_p <= 1.0f)) return eng__fail(err, errlen, ENG_ESAMPLING, "top_p must be in (0, 1]");
    if (!(s->min_p >= 0.0f && s->min_p < 1.0f)) return eng__fail(err, errlen, ENG_ESAMPLING, "min_p must be in [0, 1)");
    if (!(s->repeat_penalty > 0.0f && s->repeat_penalty <= 100.0f))
        return eng__fail(err, errlen, ENG_ESAMPLING, "repeat_penalty must be in (0, 100]");
    if (s->repeat_last_n < 0) return eng__fail(err, errlen, ENG_ESAMPLING, "repeat_last_n must be >= 0");
    return ENG_OK;
}

static int32_t argmax(const float *x, int n) {
    int32_t best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

/* Descending logit, then ascending id: a total order, so results never
 * depend on the sort algorithm. */
static int cand_before(const cand *a, const cand *b) { return a->l > b->l || (a->l == b->l && a->i < b->i); }
static int cand_cmp(const void *a, const void *b) {
    return cand_before(a, b) ? -1 : cand_before(b, a) ? 1 : 0;
}

/* Move the k best of c[0..n) to the front, sorted. Bounded heap whose root
 * is the worst kept candidate: O(n log k). */
static void top_k_select(cand *c, int n, int k) {
    for (int i = 0; i < n; i++) {
        cand v = c[i];
        int j;
        if (i < k) { /* sift up */
            j = i;
            while (j > 0 && cand_before(&c[(j - 1) / 2], &v)) { c[j] = c[(j - 1) / 2]; j = (j - 1) / 2; }
            c[j] = v;
            continue;
        }
        if (!cand_before(&v, &c[0])) continue;
        j = 0; /* replace the root, sift down */
        for (;;) {
            int ch = 2 * j + 1;
            if (ch >= k) break;
            if (ch + 1 < k && cand_before(&c[ch], &c[ch + 1])) ch++;
            if (!cand_before(&v, &c[ch])) break;
            c[j] = c[ch];
            j = ch;
        }
        c[j] = v;
    }
    qsort(c, (size_t)k, sizeof *c, cand_cmp);
}

int32_t eng__sample(eng__sampler *s, const eng_sampling *p, eng__rng *rng, float *logits,
                    const int32_t *history, size_t n_history) {
    const int V = s->V;
    if (p->repeat_penalty != 1.0f && n_history) {
        size_t from = p->repeat_last_n > 0 && (size_t)p->repeat_last_n < n_history ? n_history - (size_t)p->repeat_last_n : 0;
        for (size_t i = from; i < n_history; i++) {
            int32_t t = history[i];
            if (t < 0 || t >= V || s->seen[t]) continue;
            s->seen[t] = 1;
            logits[t] = logits[t] > 0 ? logits[t] / p->repeat_penalty : logits[t] * p->repeat_penalty;
        }
        for (size_t i = from; i < n_history; i++)
            if (history[i] >= 0 && history[i] < V) s->seen[history[i]] = 0;
    }
    if (p->temperature <= 0.0f) return argmax(logits, V);

    const float inv_t = 1.0f / p->temperature;
    cand *c = s->c;
    int n = V;
    for (int i = 0; i < V; i++) c[i] = (cand){logits[i], i};
    if (p->top_k > 0 && p->top_k < V) {
        top_k_select(c, V, p->top_k);
        n = p->top_k;
    } else if (p->top_p < 1.0f) {
        qsort(c, (size_t)n, sizeof *c, cand_cmp);
    }
    /* softmax over the candidates, temperature applied */
    float mx = -INFINITY;
    for (int i = 0; i < n; i++) mx = fmaxf(mx, c[i].l);
    double sum = 0;
    for (int i = 0; i < n; i++) {
        s->prob[i] = expf((c[i].l - mx) * inv_t);
        sum += s->prob[i];
    }
    if (p->top_p < 1.0f) { /* smallest prefix (sorted) whose mass reaches top_p */
        double cum = 0;
        int keep = 0;
        while (keep < n && cum < p->top_p * sum) cum += s->prob[keep++];
        n = keep > 0 ? keep : 1;
        sum = cum > 0 ? cum : s->prob[0];
    }
    if (p->min_p > 0.0f) { /* relative to the most probable candidate */
        float pmax = 0;
        for (int i = 0; i < n; i++) pmax = fmaxf(pmax, s->prob[i]);
        float cut = p->min_p * pmax;
        int k = 0;
        sum = 0;
        for (int i = 0; i < n; i++)
            if (s->prob[i] >= cut) {
                c[k] = c[i];
                s->prob[k] = s->prob[i];
                sum += s->prob[k++];
            }
        n = k;
    }
    double u = eng__rng_uniform(rng) * sum, cum = 0;
    for (int i = 0; i < n; i++) {
        cum += s->prob[i];
        if (u < cum) return c[i].i;
    }
    return c[n - 1].i;
}

void eng__logsoftmax_parts(const float *x, size_t V, double *mx, double *logsum) {
    float m = x[0];
    for (size_t j = 1; j < V; j++) m = x[j] > m ? x[j] : m;
    double sum = 0;
    for (size_t j = 0; j < V; j++) sum += exp((double)x[j] - m);
    *mx = m;
    *logsum = log(sum);
}

void eng__top_logits(const float *x, int V, int n, int32_t *ids) {
    int k = 0; /* ids[0..k) sorted, largest first */
    for (int j = 0; j < V; j++) {
        if (k == n && !(x[j] > x[ids[n - 1]])) continue; /* (equal: the lower id, already in, stays) */
        int at = k < n ? k++ : n - 1;
        while (at > 0 && x[j] > x[ids[at - 1]]) {
            ids[at] = ids[at - 1];
            at--;
        }
        ids[at] = j;
    }
}
