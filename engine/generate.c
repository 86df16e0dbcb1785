/* generate.c — single-sequence generation, logits and scoring on top of the
 * forward pass; streaming text (UTF-8 safe, stop strings held back). */
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- incremental detokenizer ------------------------------------------ */
struct eng_detok {
    const eng_tok *tok;
    unsigned char pend[8];  /* bytes of an unfinished character */
    size_t npend;
    int strip;              /* leading spaces still to strip (the decoder's, at the start of the text) */
    int started;            /* a token has been pushed (the first decodes differently with a Metaspace decoder) */
    eng__buf out;
};

eng_detok *eng_detok_new(const eng_tok *tok) {
    eng_detok *d = calloc(1, sizeof *d);
    if (d) {
        d->tok = tok;
        d->strip = eng__tok_strip_start(tok);
    }
    return d;
}

void eng_detok_free(eng_detok *d) {
    if (!d) return;
    free(d->out.p);
    free(d);
}

static const char REPLACEMENT[] = "\xEF\xBF\xBD";

/* Move complete characters from pend+src to out; keep an unfinished tail. */
static int detok_feed(eng_detok *d, const unsigned char *src, size_t n) {
    for (size_t i = 0; i < n; i++) {
        d->pend[d->npend++] = src[i];
        for (;;) {
            if (!d->npend) break;
            int k = eng__utf8_seq(d->pend, d->npend);
            if (k == 0) break; /* valid so far, incomplete */
            int rc;
            if (k < 0) { rc = eng__buf_add(&d->out, REPLACEMENT, 3); k = 1; }
            else if (d->strip > 0 && k == 1 && d->pend[0] == ' ') { rc = ENG_OK; d->strip--; }
            else rc = eng__buf_add(&d->out, (const char *)d->pend, (size_t)k);
            d->strip = k == 1 && d->pend[0] == ' ' ? d->strip : 0; /* only at the very start */
            if (rc) return rc;
            memmove(d->pend, d->pend + k, d->npend - (size_t)k);
            d->npend -= (size_t)k;
        }
    }
    return ENG_OK;
}

int eng_detok_push(eng_detok *d, int32_t token, const char **out, size_t *len) {
    d->out.n = 0;
    *out = "";
    *len = 0;
    size_t n;
    int special = eng__tok_is_special(d->tok, token);
    const char *p = eng__tok_piece_at(d->tok, token, !special && !d->started, &n);
    if (!p) return ENG_ETOKEN;
    if (!special) {
        d->started = 1;
        int rc = detok_feed(d, (const unsigned char *)p, n);
        if (rc) return rc;
    }
    if (d->out.p) *out = d->out.p;
    *len = d->out.n;
    return ENG_OK;
}

int eng_detok_flush(eng_detok *d, const char **out, size_t *len) {
    d->out.n = 0;
    int rc = d->npend ? eng__buf_add(&d->out, REPLACEMENT, 3) : ENG_OK;
    d->npend = 0;
    *out = d->out.p ? d->out.p : "";
    *len = d->out.n;
    return rc;
}

/* ---- generation state: stop strings, held-back text -------------------- */
struct eng__gen {
    eng_detok *dt;
    char **stop;
    size_t *stop_len;
    int n_stop;
    int max_tokens, ignore_eos, n_gen;
    int32_t eos[ENG_MAX_EOS];
    int n_eos;
    eng__buf text;   /* all output text so far */
    size_t emitted;  /* bytes of text already handed out */
};

eng__gen *eng__gen_new(const eng_tok *tok, const eng_gen_params *p, const eng_config *c) {
    eng__gen *g = calloc(1, sizeof *g);
    if (!g) return NULL;
    g->dt = eng_detok_new(tok);
    g->max_tokens = p->max_tokens;
    g->ignore_eos = p->ignore_eos;
    g->n_eos = c->n_eos;
    memcpy(g->eos, c->eos_ids, sizeof g->eos);
    g->stop = calloc((size_t)p->n_stop + 1, sizeof *g->stop);
    g->stop_len = calloc((size_t)p->n_stop + 1, sizeof *g->stop_len);
    if (!g->dt || !g->stop || !g->stop_len) { eng__gen_free(g); return NULL; }
    for (int i = 0; i < p->n_stop; i++) {
        if (!p->stop[i] || !p->stop[i][0]) continue;
        g->stop[g->n_stop] = strdup(p->stop[i]);
        if (!g->stop[g->n_stop]) { eng__gen_free(g); return NULL; }
        g->stop_len[g->n_stop] = strlen(p->stop[i]);
        g->n_stop++;
    }
    return g;
}

void eng__gen_free(eng__gen *g) {
    if (!g) return;
    eng_detok_free(g->dt);
    for (int i = 0; g->stop && i < g->n_stop; i++) free(g->stop[i]);
    free(g->stop);
    free(g->stop_len);
    free(g->text.p);
    free(g);
}

/* Earliest occurrence of any stop string that ends after `from`, or -1. */
static long find_stop(const eng__gen *g, size_t from) {
    long best = -1;
    for (int i = 0; i < g->n_stop; i++) {
        size_t L = g->stop_len[i];
        if (g->text.n < L) continue;
        size_t s0 = from >= L ? from - L + 1 : 0;
        for (size_t s = s0; s + L <= g->text.n; s++)
            if (memcmp(g->text.p + s, g->stop[i], L) == 0) {
                if (best < 0 || (long)s < best) best = (long)s;
                break;
            }
    }
    return best;
}

/* Length of the longest suffix of text that is a proper prefix of a stop
 * string: those bytes may still become a stop string and are held back. */
static size_t stop_holdback(const eng__gen *g) {
    size_t best = 0;
    for (int i = 0; i < g->n_stop; i++) {
        size_t L = g->stop_len[i];
        for (size_t k = L - 1; k > best; k--)
            if (k <= g->text.n && memcmp(g->text.p + g->text.n - k, g->stop[i], k) == 0) { best = k; break; }
    }
    return best;
}

static void take(eng__gen *g, size_t upto, const char **delta, size_t *dlen) {
    *delta = g->text.p ? g->text.p + g->emitted : "";
    *dlen = upto > g->emitted ? upto - g->emitted : 0;
    if (upto > g->emitted) g->emitted = upto;
}

void eng__gen_flush(eng__gen *g, const char **delta, size_t *dlen) {
    const char *tail;
    size_t tn;
    if (eng_detok_flush(g->dt, &tail, &tn) == ENG_OK && tn) eng__buf_add(&g->text, tail, tn);
    take(g, g->text.n, delta, dlen);
}

int eng__gen_push(eng__gen *g, int32_t token, const char **delta, size_t *dlen) {
    *delta = "";
    *dlen = 0;
    g->n_gen++;
    int eos = 0;
    for (int i = 0; i < g->n_eos; i++) eos |= token == g->eos[i];
    if (eos && !g->ignore_eos) {
        eng__gen_flush(g, delta, dlen);
        return ENG_FINISH_STOP;
    }
    const char *piece;
    size_t pn;
    size_t before = g->text.n;
    if (eng_detok_push(g->dt, token, &piece, &pn) != ENG_OK || eng__buf_add(&g->text, piece, pn) != ENG_OK)
        return ENG_FINISH_ERROR;
    if (g->n_stop && g->text.n > before) {
        long s = find_stop(g, before);
        if (s >= 0) {
            g->text.n = (size_t)s;
            g->text.p[s] = 0;
            take(g, (size_t)s, delta, dlen);
            return ENG_FINISH_STOP;
        }
    }
    if (g->n_gen >= g->max_tokens) {
        eng__gen_flush(g, delta, dlen);
        return ENG_FINISH_LENGTH;
    }
    take(g, g->text.n - stop_holdback(g), delta, dlen);
    return ENG_FINISH_NONE;
}

const char *eng__gen_text(eng__gen *g, size_t *len) {
    *len = g->text.n;
    return g->text.p ? g->text.p : "";
}

const char *eng_finish_name(int r) {
    switch (r) {
    case ENG_FINISH_STOP: return "stop";
    case ENG_FINISH_LENGTH: return "length";
    case ENG_FINISH_CANCELLED: return "cancelled";
    case ENG_FINISH_ERROR: return "error";
    default: return "none";
    }
}

/* ---- running the model on one sequence --------------------------------- */
static int check_ids(const eng_model *m, const int32_t *ids, size_t n, char *err, size_t errlen) {
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= m->cfg.vocab_size)
            return eng__fail(err, errlen, ENG_ETOKEN, "token %zu: id %d is outside the vocabulary [0, %d)", i, ids[i],
                             m->cfg.vocab_size);
    return ENG_OK;
}

/* Forward ids[0..n) at positions start.. of the model's single sequence.
 * Logits of rows [out_from, n) land in m->logits (at most max_batch rows per
 * call), and the callback gets them chunk by chunk. */
typedef void (*rows_cb)(void *ud, size_t first_row, size_t n_rows, const float *logits);

static void run_chunks(eng_model *m, const int32_t *ids, size_t n, size_t start, int all_rows, rows_cb cb, void *ud) {
    const size_t T = (size_t)m->opt.max_batch_tokens;
    int32_t *pos = m->bpos, *seq = m->bseq, *rows = m->brows;
    kv_table tab = {m->kv_ids, m->kv.n_blocks};
    for (size_t c0 = 0; c0 < n; c0 += T) {
        size_t cn = n - c0 < T ? n - c0 : T;
        for (size_t i = 0; i < cn; i++) pos[i] = (int32_t)(start + c0 + i);
        fwd_batch b = {.n = (int)cn, .tokens = ids + c0, .pos = pos, .seq = seq, .tables = &tab, .logits = m->logits};
        if (all_rows) {
            for (size_t i = 0; i < cn; i++) rows[i] = (int32_t)i;
            b.n_out = (int)cn;
        } else if (c0 + cn == n) {
            rows[0] = (int32_t)(cn - 1);
            b.n_out = 1;
        }
        b.out_rows = rows;
        fwd_run(&m->cfg, &m->w, &m->kv, m->scratch, (const float *const *)m->rope, m->pool, &b);
        if (b.n_out && cb) cb(ud, all_rows ? c0 : n - 1, (size_t)b.n_out, m->logits);
    }
}

typedef struct {
    float *out;
    size_t V;
} copy_ud;

static void copy_rows(void *ud, size_t first, size_t nr, const float *lg) {
    copy_ud *c = ud;
    memcpy(c->out + first * c->V, lg, nr * c->V * sizeof(float));
}

int eng_logits(eng_model *m, const int32_t *ids, size_t n, float *out, char *err, size_t errlen) {
    if (n == 0) return eng__fail(err, errlen, ENG_EEMPTY, "no tokens");
    if (n > (size_t)m->max_ctx)
        return eng__fail(err, errlen, ENG_ECONTEXT, "%zu tokens exceed the context of %d", n, m->max_ctx);
    int rc = check_ids(m, ids, n, err, errlen);
    if (rc) return rc;
    copy_ud c = {out, (size_t)m->cfg.vocab_size};
    run_chunks(m, ids, n, 0, 1, copy_rows, &c);
    return ENG_OK;
}

typedef struct {
    const int32_t *ids;
    size_t n, V;
    double *lp;
} score_ud;

static void score_rows(void *ud, size_t first, size_t nr, const float *lg) {
    score_ud *s = ud;
    for (size_t r = 0; r < nr; r++) {
        size_t i = first + r; /* logits of position i predict ids[i + 1] */
        if (i + 1 >= s->n) break;
        const float *x = lg + r * s->V;
        double mx, logsum;
        eng__logsoftmax_parts(x, s->V, &mx, &logsum);
        s->lp[i] = (double)x[s->ids[i + 1]] - mx - logsum;
    }
}

int eng_score(eng_model *m, const int32_t *ids, size_t n, double *logprobs, double *ppl, char *err, size_t errlen) {
    if (n < 2) return eng__fail(err, errlen, ENG_EEMPTY, "scoring needs at least 2 tokens, got %zu", n);
    if (n > (size_t)m->max_ctx)
        return eng__fail(err, errlen, ENG_ECONTEXT, "%zu tokens exceed the context of %d", n, m->max_ctx);
    int rc = check_ids(m, ids, n, err, errlen);
    if (rc) return rc;
    score_ud s = {ids, n, (size_t)m->cfg.vocab_size, logprobs};
    run_chunks(m, ids, n, 0, 1, score_rows, &s);
    if (ppl) {
        double sum = 0;
        for (size_t i = 0; i + 1 < n; i++) sum += logprobs[i];
        *ppl = exp(-sum / (double)(n - 1));
    }
    return ENG_OK;
}

void eng_gen_result_free(eng_gen_result *r) {
    if (!r) return;
    free(r->text);
    free(r->tokens);
    memset(r, 0, sizeof *r);
}

int eng_generate(eng_model *m, const int32_t *prompt, size_t n, const eng_gen_params *p, eng_token_cb cb, void *ud,
                 eng_gen_result *res, char *err, size_t errlen) {
    memset(res, 0, sizeof *res);
    if (n == 0) return eng__fail(err, errlen, ENG_EEMPTY, "prompt is empty");
    if (p->max_tokens <= 0)
        return eng__fail(err, errlen, ENG_EMAXTOK, "max_tokens must be positive (got %d)", p->max_tokens);
    if (n + (size_t)p->max_tokens > (size_t)m->max_ctx)
        return eng__fail(err, errlen, ENG_ECONTEXT, "prompt (%zu tokens) + max_tokens (%d) exceeds the context of %d",
                         n, p->max_tokens, m->max_ctx);
    int rc = check_ids(m, prompt, n, err, errlen);
    if (rc) return rc;
    if ((rc = eng_sampling_check(&p->sampling, err, errlen))) return rc;

    size_t cap = n + (size_t)p->max_tokens;
    int32_t *hist = malloc(cap * sizeof *hist);
    eng__gen *g = eng__gen_new(m->tok, p, &m->cfg);
    if (!hist || !g) {
        free(hist);
        eng__gen_free(g);
        return eng__fail(err, errlen, ENG_ENOMEM, "out of memory");
    }
    memcpy(hist, prompt, n * sizeof *hist);
    eng__rng rng;
    eng__rng_seed(&rng, p->sampling.seed);

    double t0 = eng__now();
    run_chunks(m, prompt, n, 0, 0, NULL, NULL);
    double t1 = eng__now();
    size_t len = n;
    int finish = ENG_FINISH_NONE;
    while (finish == ENG_FINISH_NONE) {
        int32_t tok = eng__sample(m->sampler, &p->sampling, &rng, m->logits, hist, len);
        hist[len++] = tok;
        const char *delta;
        size_t dl;
        finish = eng__gen_push(g, tok, &delta, &dl);
        if (cb && cb(ud, tok, delta, dl) != 0 && finish == ENG_FINISH_NONE) {
            finish = ENG_FINISH_CANCELLED;
            break;
        }
        if (finish == ENG_FINISH_NONE) run_chunks(m, &tok, 1, len - 1, 0, NULL, NULL);
    }
    res->decode_seconds = eng__now() - t1;
    res->prefill_seconds = t1 - t0;
    res->finish = finish;
    res->prompt_tokens = (int)n;
    res->generated_tokens = (int)(len - n);
    size_t tl;
    const char *txt = eng__gen_text(g, &tl);
    res->text = malloc(tl + 1);
    res->tokens = malloc((len - n + 1) * sizeof *res->tokens);
    if (!res->text || !res->tokens) {
        eng_gen_result_free(res);
        rc = eng__fail(err, errlen, ENG_ENOMEM, "out of memory");
    } else {
        memcpy(res->text, txt, tl);
        res->text[tl] = 0;
        res->text_len = tl;
        memcpy(res->tokens, hist + n, (len - n) * sizeof *res->tokens);
    }
    free(hist);
    eng__gen_free(g);
    return rc;
}
