/* batch.c — the block-pool batch engine: paged KV pool, prefix sharing,
 * continuous batching, agents, cancellation, preemption.
 *
 * Every sequence is a list of tokens tok[0..n_tok) of which the first
 * n_cached have their K/V in the sequence's blocks. A step gives each running
 * sequence the next tokens tok[n_cached..] to compute (one for a decoding
 * sequence, a chunk for a prefilling one) under the token budget; a sequence
 * whose chunk reaches n_tok gets logits, samples a token and appends it.
 * Prefill and decode are the same operation with different chunk sizes.
 *
 * Blocks: ref counts count owners (sequences, idle agents). A full block is
 * registered under the hash chain of its tokens so that a later sequence
 * with the same prefix can take it; a registered block whose last owner
 * leaves stays "cached" (LRU) until the allocator needs it.
 *
 * Sliding windows: when every layer of the model slides, a block whose
 * positions all lie before the window of the next token to compute is given
 * back at once (its entry in the block table becomes -1), so a sequence holds
 * about window / block_tokens blocks however long it runs. Registered blocks
 * given back stay cached for the prefix index like any other.
 *
 * Isolation: a chain starts from its sharing scope (one per tenant, or one
 * for all with share_prefix_across_tenants), so a tenant never takes another
 * tenant's KV, nor learns from usage or timing that another sent a prefix.
 * KV that the engine did not compute itself (an imported agent's) never
 * enters the index, nor does any block computed after it. */
#include "batch.h"

#include <unistd.h>

/* eng_engine_score's caller, waiting on the engine's lock. */
typedef struct score_wait {
    pthread_cond_t cv;
    int done, rc;
    double *lp;             /* the sequence's plp, handed over */
    char msg[200];
} score_wait;

static void seq_free(seq *s) {
    if (!s) return;
    free(s->plp);
    free(s->tok);
    free(s->blk);
    eng__gen_free(s->gen);
    free(s->tenant);
    free(s->agent_id);
    free(s);
}

static int seq_reserve_tok(seq *s, int n) {
    if (n <= s->cap_tok) return ENG_OK;
    int nc = s->cap_tok ? s->cap_tok : 16;
    while (nc < n) nc *= 2;
    int32_t *nt = realloc(s->tok, (size_t)nc * sizeof *nt);
    if (!nt) return ENG_ENOMEM;
    s->tok = nt;
    s->cap_tok = nc;
    return ENG_OK;
}

static void seq_release_blocks(eng_engine *e, seq *s) {
    for (int i = 0; i < s->n_blk; i++)
        if (s->blk[i] >= 0) eng__bp_decref(&e->bp, s->blk[i]);
    s->n_blk = 0;
    s->n_cached = 0;
    s->n_foreign = 0; /* what it computes again is its own */
}

/* ---- events ------------------------------------------------------------ */
/* Room for `more` events in the array (not their text): reserved before
 * anything can finish, so that no DONE is ever lost to a failed allocation
 * (a Stream would wait for ever for its status). */
static int ev_reserve(ev_buf *b, size_t more) {
    while (b->n + more > b->cap) {
        size_t nc = b->cap ? b->cap * 2 : 64;
        eng_event *ne = realloc(b->ev, nc * sizeof *ne);
        size_t *to = realloc(b->text_off, nc * sizeof *to), *ko = to ? realloc(b->tok_off, nc * sizeof *ko) : NULL;
        size_t *lo = ko ? realloc(b->lp_off, nc * sizeof *lo) : NULL;
        if (ne) b->ev = ne;
        if (to) b->text_off = to;
        if (ko) b->tok_off = ko;
        if (lo) b->lp_off = lo;
        if (!ne || !to || !ko || !lo) return ENG_ENOMEM;
        b->cap = nc;
    }
    return ENG_OK;
}

/* Grow an arena to hold `need` more units of `size` bytes. */
static int arena_grow(void **p, size_t *cap, size_t used, size_t need, size_t size) {
    if (used + need <= *cap) return ENG_OK;
    size_t nc = (used + need) * 2 + 16;
    void *np = realloc(*p, nc * size);
    if (!np) return ENG_ENOMEM;
    *p = np;
    *cap = nc;
    return ENG_OK;
}

/* Add an event with its text and token ids (DONE: the output; TOKEN: the
 * top alternatives' ids) and nl doubles (TOKEN: the logprob, then the
 * alternatives'). ENG_ENOMEM if there is no room for it at all; 1 if it went
 * in without them (no memory); else ENG_OK. */
static int ev_add(ev_buf *b, const eng_event *ev, const char *text, size_t tl, const int32_t *toks, size_t nt,
                  const double *lp, size_t nl) {
    if (ev_reserve(b, 1)) return ENG_ENOMEM;
    int degraded = 0;
    if (arena_grow((void **)&b->text, &b->text_cap, b->text_n, tl + 1, 1) ||
        arena_grow((void **)&b->toks, &b->toks_cap, b->toks_n, nt, sizeof *b->toks) ||
        arena_grow((void **)&b->lps, &b->lps_cap, b->lps_n, nl, sizeof *b->lps)) {
        tl = nt = nl = 0;
        degraded = 1;
        if (arena_grow((void **)&b->text, &b->text_cap, b->text_n, 1, 1)) return ENG_ENOMEM;
    }
    b->lp_off[b->n] = b->lps_n;
    if (nl) memcpy(b->lps + b->lps_n, lp, nl * sizeof *lp);
    b->lps_n += nl;
    b->ev[b->n] = *ev;
    b->text_off[b->n] = b->text_n;
    memcpy(b->text + b->text_n, text, tl);
    b->text[b->text_n + tl] = 0;
    b->text_n += tl + 1;
    b->ev[b->n].text_len = tl;
    b->tok_off[b->n] = b->toks_n;
    if (nt) memcpy(b->toks + b->toks_n, toks, nt * sizeof *toks);
    b->toks_n += nt;
    b->ev[b->n].n_tokens = nt;
    if (!nl) b->ev[b->n].has_logprob = b->ev[b->n].n_top = 0;
    b->n++;
    return degraded;
}

/* Finish a sequence (not in the forward pass): DONE event, blocks back to
 * its agent or the pool, and onto the done list to be freed after delivery. */
static void seq_finish(eng_engine *e, seq *s, int finish, int error, const char *msg) {
    ENG_CHECK(s->state != SQ_DONE && !s->in_batch);
    if (!s->admitted) { /* finished while it waited (cancelled, refused): nothing generated yet */
        s->gen_start = s->n_tok;
        s->usage.prompt_tokens = s->n_tok;
    }
    s->finish = finish;
    s->usage.generated_tokens = s->n_tok - s->gen_start;
    if (s->waiter) { /* a scoring sequence: its caller gets the logprobs, nobody gets events */
        score_wait *w = s->waiter;
        w->rc = finish == ENG_FINISH_ERROR ? (error ? error : ENG_EINVAL) : finish == ENG_FINISH_CANCELLED ? ENG_EINVAL : 0;
        if (w->rc) snprintf(w->msg, sizeof w->msg, "%s", msg ? msg : "scoring was cancelled");
        else { w->lp = s->plp; s->plp = NULL; }
        w->done = 1;
        s->waiter = NULL;
        pthread_cond_broadcast(&w->cv);
        seq_release_blocks(e, s);
        if (s->state == SQ_RUNNING) list_remove(&e->running, s);
        else if (s->state == SQ_WAITING) list_remove(&e->waiting, s);
        s->state = SQ_DONE;
        list_push(&e->done, s, 0);
        return;
    }
    size_t tl;
    const char *text = eng__gen_text(s->gen, &tl);
    eng_event ev = {.kind = ENG_EV_DONE, .id = s->id, .finish = finish, .usage = s->usage, .error = error};
    if (msg) snprintf(s->msg, sizeof s->msg, "%s", msg);
    if (ev_add(&e->ev, &ev, text, tl, s->tok + s->gen_start, (size_t)s->usage.generated_tokens, NULL, 0) == 1) {
        /* (room for the event itself was reserved) no memory for the output: say so rather than lose it */
        e->ev.ev[e->ev.n - 1].finish = ENG_FINISH_ERROR;
        e->ev.ev[e->ev.n - 1].error = ENG_ENOMEM;
        snprintf(s->msg, sizeof s->msg, "out of memory: the output (%d tokens) was lost", s->usage.generated_tokens);
    }
    agent *a = s->agent_id && s->admitted ? eng__agent_find(e, s->tenant, s->agent_id, NULL) : NULL;
    if (a) {
        /* the agent keeps the context and its blocks */
        free(a->tok);
        free(a->blk);
        a->tok = s->tok;
        a->n_tok = s->n_tok;
        a->blk = s->blk;
        a->n_blk = s->n_blk;
        a->n_cached = s->n_cached;
        a->n_foreign = s->n_foreign;
        a->busy = 0;
        a->last_used = eng__now();
        a->version++;
        s->tok = NULL;
        s->blk = NULL;
        s->n_blk = 0;
    } else {
        seq_release_blocks(e, s);
    }
    if (s->state == SQ_RUNNING) list_remove(&e->running, s);
    else if (s->state == SQ_WAITING) list_remove(&e->waiting, s);
    s->state = SQ_DONE;
    list_push(&e->done, s, 0);
}

/* Deliver collected events with the lock released, then free done seqs. */
static void deliver(eng_engine *e, eng_event_cb cb, void *ud) {
    ev_buf b = e->ev;
    memset(&e->ev, 0, sizeof e->ev);
    seq_list done = e->done;
    memset(&e->done, 0, sizeof e->done);
    pthread_mutex_unlock(&e->mu);
    for (size_t i = 0; i < b.n; i++) {
        b.ev[i].text = b.text + b.text_off[i];
        static const int32_t none[1] = {0};
        b.ev[i].tokens = b.toks ? b.toks + b.tok_off[i] : none;
        if (b.ev[i].has_logprob) { /* a TOKEN event's ids are its alternatives' */
            b.ev[i].logprob = b.lps[b.lp_off[i]];
            b.ev[i].top_logprobs = b.lps + b.lp_off[i] + 1;
            b.ev[i].top_ids = b.ev[i].tokens;
            b.ev[i].tokens = none;
            b.ev[i].n_tokens = 0;
        }
        if (b.ev[i].kind == ENG_EV_DONE && b.ev[i].finish == ENG_FINISH_ERROR) {
            for (seq *s = done.head; s; s = s->next)
                if (s->id == b.ev[i].id) b.ev[i].message = s->msg;
        }
        if (cb) cb(ud, &b.ev[i]);
    }
    for (seq *s = done.head, *n; s; s = n) {
        n = s->next;
        seq_free(s);
    }
    free(b.ev); free(b.text_off); free(b.tok_off); free(b.lp_off); free(b.text); free(b.toks); free(b.lps);
}

/* ---- open / close --------------------------------------------------------- */
int eng_engine_open(eng_engine **out, eng_model *m, const eng_engine_options *o, char *err, size_t errlen) {
    *out = NULL;
    eng_engine *e = calloc(1, sizeof *e);
    if (!e) return eng__fail(err, errlen, ENG_ENOMEM, "out of memory");
    if (o) e->o = *o;
    if (e->o.block_tokens <= 0) e->o.block_tokens = 16;
    if (e->o.n_blocks <= 0 && e->o.kv_memory_mib > 0) { /* a memory budget: the blocks that fit in it */
        double mib = e->o.kv_memory_mib;
        if (mib < 1) {
            long pages = sysconf(_SC_PHYS_PAGES), ps = sysconf(_SC_PAGESIZE);
            mib = pages > 0 && ps > 0 ? mib * (double)pages * (double)ps / 1048576.0 : 0;
        }
        const eng_config *c = &m->cfg;
        double block = 2.0 * c->n_layers * e->o.block_tokens * c->n_kv_heads * c->head_dim * (m->opt.kv_f16 ? 2 : 4);
        double n = mib * 1048576.0 / block;
        e->o.n_blocks = n < 2 ? 2 : n > (1 << 24) ? 1 << 24 : (int)n;
    }
    if (e->o.n_blocks <= 0) e->o.n_blocks = 512;
    if (e->o.max_step_tokens <= 0) e->o.max_step_tokens = 512;
    if (e->o.max_running <= 0) e->o.max_running = 64;
    if (e->o.max_queue <= 0) e->o.max_queue = 1024;
    if (e->o.max_running > e->o.max_step_tokens) e->o.max_running = e->o.max_step_tokens;
    e->m = m;
    e->max_ctx = m->max_ctx;
    e->next_id = 1;
    e->hold = -1;
    pthread_mutex_init(&e->mu, NULL);
    const eng_config *c = &m->cfg;
    e->window = c->n_sliding == c->n_layers ? c->sliding_window : 0;
    int T = e->o.max_step_tokens;
    if (eng__bp_init(&e->bp, e->o.n_blocks, e->o.block_tokens, c, m->opt.kv_f16) != ENG_OK ||
        !(e->scratch = fwd_scratch_new(c, T, e->max_ctx, eng__pool_threads(e->m->pool))) ||
        !(e->sampler = eng__sampler_new(c->vocab_size)) ||
        !(e->logits = malloc((size_t)e->o.max_running * c->vocab_size * sizeof(float))) ||
        !(e->b_tok = malloc((size_t)T * sizeof(int32_t))) || !(e->b_pos = malloc((size_t)T * sizeof(int32_t))) ||
        !(e->b_seq = malloc((size_t)T * sizeof(int32_t))) || !(e->b_rows = malloc((size_t)T * sizeof(int32_t))) ||
        !(e->tables = malloc((size_t)e->o.max_running * sizeof(kv_table))) ||
        !(e->batch = malloc((size_t)e->o.max_running * sizeof(seq *)))) {
        eng_engine_close(e);
        return eng__fail(err, errlen, ENG_ENOMEM, "out of memory for a pool of %d blocks of %d tokens", e->o.n_blocks,
                         e->o.block_tokens);
    }
    *out = e;
    return ENG_OK;
}

void eng_engine_close(eng_engine *e) {
    if (!e) return;
    seq_list *lists[] = {&e->waiting, &e->running, &e->done};
    for (int k = 0; k < 3; k++)
        for (seq *s = lists[k]->head, *n; s; s = n) {
            n = s->next;
            seq_free(s);
        }
    for (int i = 0; i < e->n_agents; i++) {
        free(e->agents[i]->tok); free(e->agents[i]->blk); free(e->agents[i]->tenant); free(e->agents[i]->id);
        free(e->agents[i]);
    }
    free(e->agents);
    for (int i = 0; i < e->n_scopes; i++) free(e->scopes[i]);
    free(e->scopes);
    eng__bp_free(&e->bp);
    fwd_scratch_free(e->scratch);
    eng__sampler_free(e->sampler);
    free(e->raw_row);
    free(e->logits); free(e->b_tok); free(e->b_pos); free(e->b_seq); free(e->b_rows); free(e->tables); free(e->batch);
    free(e->ev.ev); free(e->ev.text_off); free(e->ev.tok_off); free(e->ev.lp_off); free(e->ev.text); free(e->ev.toks);
    free(e->ev.lps);
    pthread_mutex_destroy(&e->mu);
    free(e);
}

/* ---- submit / cancel ------------------------------------------------------ */
/* The prefix-sharing scope of a tenant (e->mu held): 0 for everyone when
 * tenants share, else one per tenant, numbered from 1 on first sight.
 * -1 when out of memory. */
static int scope_of(eng_engine *e, const char *tenant) {
    if (e->o.share_prefix_across_tenants) return 0;
    for (int i = 0; i < e->n_scopes; i++)
        if (!strcmp(e->scopes[i], tenant)) return i + 1;
    if (e->n_scopes == e->cap_scopes) {
        int nc = e->cap_scopes ? e->cap_scopes * 2 : 8;
        char **ns = realloc(e->scopes, (size_t)nc * sizeof *ns);
        if (!ns) return -1;
        e->scopes = ns;
        e->cap_scopes = nc;
    }
    if (!(e->scopes[e->n_scopes] = eng__dupstr(tenant))) return -1;
    return ++e->n_scopes;
}


/* Blocks a sequence of n_tok tokens, n_prompt of them to prefill, may hold
 * at once: all of them, or with every layer sliding, those of the window
 * plus the largest chunk a step computes. */
static long blocks_needed(const eng_engine *e, long n_prompt, long n_tok) {
    long B = e->bp.B, all = (n_tok + B - 1) / B;
    if (!e->window) return all;
    long chunk = n_prompt < e->o.max_step_tokens ? n_prompt : e->o.max_step_tokens;
    long slid = (e->window - 1 + chunk + B - 1) / B + 1;
    return slid < all ? slid : all;
}

/* With every layer sliding: give back the blocks wholly before the window of
 * the next position to compute (n_cached). */
static void release_behind(eng_engine *e, seq *s) {
    if (!e->window) return;
    int keep_from = s->n_cached - e->window + 1, B = e->bp.B;
    for (int k = 0; k < s->n_blk && (k + 1) * B <= keep_from; k++)
        if (s->blk[k] >= 0) {
            eng__bp_decref(&e->bp, s->blk[k]);
            s->blk[k] = -1;
        }
}

/* Everything eng_submit checks before queueing; on ENG_OK *ids (malloc'd,
 * *n of them) is the prompt as token ids, or NULL when ids is NULL. */
static int validate(eng_engine *e, const eng_request *r, int32_t **ids_out, size_t *n_out, char *err, size_t errlen) {
    const eng_model *m = e->m;
    const eng_gen_params *p = &r->params;
    int has_agent = r->agent_id && r->agent_id[0];
    if (r->reset && !has_agent) return eng__fail(err, errlen, ENG_EINVAL, "reset needs an agent_id");
    if (has_agent && strlen(r->agent_id) > MAX_NAME)
        return eng__fail(err, errlen, ENG_EINVAL, "agent_id is longer than %d bytes", MAX_NAME);
    if (r->tenant && strlen(r->tenant) > MAX_NAME)
        return eng__fail(err, errlen, ENG_EINVAL, "tenant is longer than %d bytes", MAX_NAME);
    if (p->max_tokens <= 0) return eng__fail(err, errlen, ENG_EMAXTOK, "max_tokens must be positive (got %d)", p->max_tokens);
    if (p->top_logprobs < 0 || p->top_logprobs > ENG_MAX_TOP_LOGPROBS || (p->top_logprobs && !p->logprobs))
        return eng__fail(err, errlen, ENG_EINVAL, "top_logprobs must be 0..%d, with logprobs (got %d)",
                         ENG_MAX_TOP_LOGPROBS, p->top_logprobs);
    int rc = eng_sampling_check(&p->sampling, err, errlen);
    if (rc) return rc;
    for (int i = 0; i < p->n_stop; i++)
        if (!p->stop[i]) return eng__fail(err, errlen, ENG_EINVAL, "stop string %d is NULL", i);

    int32_t *ids = NULL;
    size_t n = 0;
    if (r->text) {
        if ((rc = eng_tok_encode(m->tok, r->text, r->text_len, r->add_special, &ids, &n)))
            return eng__fail(err, errlen, rc, "prompt: %s", eng_strerror(rc));
    } else if (r->n_ids) {
        ids = malloc(r->n_ids * sizeof *ids);
        if (!ids) return eng__fail(err, errlen, ENG_ENOMEM, "out of memory");
        memcpy(ids, r->ids, r->n_ids * sizeof *ids);
        n = r->n_ids;
    }
    if (n == 0) { free(ids); return eng__fail(err, errlen, ENG_EEMPTY, "prompt is empty"); }
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= m->cfg.vocab_size) {
            int32_t bad = ids[i];
            free(ids);
            return eng__fail(err, errlen, ENG_ETOKEN, "prompt token %zu: id %d is outside the vocabulary [0, %d)", i,
                             bad, m->cfg.vocab_size);
        }
    if (n + (size_t)p->max_tokens > (size_t)e->max_ctx) {
        free(ids);
        return eng__fail(err, errlen, ENG_ECONTEXT, "prompt (%zu tokens) + max_tokens (%d) exceeds the context of %d",
                         n, p->max_tokens, e->max_ctx);
    }
    long need = blocks_needed(e, (long)n, (long)n + p->max_tokens);
    if (need > e->bp.n) {
        free(ids);
        return eng__fail(err, errlen, ENG_EPOOL, "prompt + max_tokens need %ld KV blocks but the pool has %d", need,
                         e->bp.n);
    }
    if (ids_out) *ids_out = ids; else free(ids);
    *n_out = n;
    return ENG_OK;
}

int eng_request_check(eng_engine *e, const eng_request *r, char *err, size_t errlen) {
    size_t n;
    return validate(e, r, NULL, &n, err, errlen);
}

static int submit_seq(eng_engine *e, const eng_request *r, score_wait *w, void (*queued)(void *), void *qud,
                      uint64_t *id, char *err, size_t errlen) {
    const eng_model *m = e->m;
    const eng_gen_params *p = &r->params;
    int has_agent = r->agent_id && r->agent_id[0];
    int32_t *ids;
    size_t n;
    int rc = validate(e, r, &ids, &n, err, errlen);
    if (rc) return rc;
    seq *s = calloc(1, sizeof *s);
    if (!s) { free(ids); return eng__fail(err, errlen, ENG_ENOMEM, "out of memory"); }
    s->tok = ids;
    s->n_tok = s->cap_tok = (int)n;
    s->max_tokens = p->max_tokens;
    s->sp = p->sampling;
    s->logprobs = p->logprobs != 0;
    s->top_logprobs = !p->logprobs ? 0 : p->top_logprobs < m->cfg.vocab_size ? p->top_logprobs : m->cfg.vocab_size;
    eng__rng_seed(&s->rng, p->sampling.seed);
    s->gen = eng__gen_new(m->tok, p, &m->cfg);
    s->tenant = eng__dupstr(r->tenant);
    s->agent_id = has_agent ? eng__dupstr(r->agent_id) : NULL;
    s->reset = r->reset;
    s->full_context = has_agent && r->full_context;
    if (w && n > 1 && !(s->plp = calloc(n - 1, sizeof *s->plp))) {
        seq_free(s);
        return eng__fail(err, errlen, ENG_ENOMEM, "out of memory");
    }
    if (!s->gen || !s->tenant || (has_agent && !s->agent_id)) {
        seq_free(s);
        return eng__fail(err, errlen, ENG_ENOMEM, "out of memory");
    }
    pthread_mutex_lock(&e->mu);
    if (e->waiting.n >= e->o.max_queue) {
        pthread_mutex_unlock(&e->mu);
        seq_free(s);
        return eng__fail(err, errlen, ENG_EQUEUE, "the queue is full (%d waiting)", e->o.max_queue);
    }
    if ((s->scope = scope_of(e, s->tenant)) < 0) {
        pthread_mutex_unlock(&e->mu);
        seq_free(s);
        return eng__fail(err, errlen, ENG_ENOMEM, "out of memory");
    }
    s->id = e->next_id++;
    s->state = SQ_WAITING;
    s->waiter = w;
    list_push(&e->waiting, s, 0);
    *id = s->id;
    pthread_mutex_unlock(&e->mu);
    if (!w) return ENG_OK;
    if (queued) queued(qud);
    pthread_mutex_lock(&e->mu); /* the stepping thread finishes it (seq_finish) */
    while (!w->done) pthread_cond_wait(&w->cv, &e->mu);
    pthread_mutex_unlock(&e->mu);
    return ENG_OK;
}

int eng_submit(eng_engine *e, const eng_request *r, uint64_t *id, char *err, size_t errlen) {
    return submit_seq(e, r, NULL, NULL, NULL, id, err, errlen);
}

int eng_engine_score(eng_engine *e, const eng_request *r, void (*queued)(void *), void *ud, int32_t **ids_out,
                     double **logprobs, size_t *n_out, char *err, size_t errlen) {
    *ids_out = NULL;
    *logprobs = NULL;
    *n_out = 0;
    if (r->agent_id && r->agent_id[0]) return eng__fail(err, errlen, ENG_EINVAL, "agent_id: scoring takes no agent");
    eng_request q = *r;
    memset(&q.params, 0, sizeof q.params);
    eng_sampling_default(&q.params.sampling);
    q.params.max_tokens = 1; /* (its one token is dropped) */
    q.reset = q.full_context = 0;
    int32_t *ids;
    size_t n;
    int rc = validate(e, &q, &ids, &n, err, errlen);
    if (rc) return rc;
    if (n < 2) {
        free(ids);
        return eng__fail(err, errlen, ENG_EEMPTY, "scoring needs at least 2 tokens, got %zu", n);
    }
    q.text = NULL; /* tokenized once */
    q.ids = ids;
    q.n_ids = n;
    score_wait w = {.done = 0};
    pthread_cond_init(&w.cv, NULL);
    uint64_t id;
    rc = submit_seq(e, &q, &w, queued, ud, &id, err, errlen);
    pthread_cond_destroy(&w.cv);
    if (!rc && w.rc) rc = eng__fail(err, errlen, w.rc, "%s", w.msg);
    if (rc) {
        free(ids);
        free(w.lp);
        return rc;
    }
    *ids_out = ids;
    *logprobs = w.lp;
    *n_out = n;
    return ENG_OK;
}

static seq *find_seq(eng_engine *e, uint64_t id) {
    seq_list *lists[] = {&e->running, &e->waiting};
    for (int k = 0; k < 2; k++)
        for (seq *s = lists[k]->head; s; s = s->next)
            if (s->id == id) return s;
    return NULL;
}

int eng_cancel(eng_engine *e, uint64_t id) {
    pthread_mutex_lock(&e->mu);
    seq *s = find_seq(e, id);
    int rc = ENG_ENOTFOUND;
    if (s && !s->cancelled && !s->in_batch && ev_reserve(&e->ev, 1)) {
        rc = ENG_ENOMEM; /* not cancelled: it still finishes by itself */
    } else if (s && !s->cancelled) {
        s->cancelled = 1;
        /* not in the forward pass right now: free its blocks at once */
        if (!s->in_batch) seq_finish(e, s, ENG_FINISH_CANCELLED, 0, NULL);
        rc = ENG_OK;
    }
    pthread_mutex_unlock(&e->mu);
    return rc;
}

/* ---- scheduling ----------------------------------------------------------- */
/* A full-context request on agent a (idle, e->mu held): keep the agent's
 * history up to the longest common prefix with the prompt (leaving at least
 * one prompt token to compute) and its KV as far as it is still right, and
 * make s's prompt what follows. KV is kept only in blocks no one else can
 * see: a block holding the cut that is shared or in the prefix index is
 * recomputed from its start, as is everything when the cut falls behind a
 * sliding window's given-back blocks. */
static void keep_common_prefix(eng_engine *e, agent *a, seq *s) {
    int lcp = 0, B = e->bp.B;
    while (lcp < a->n_tok && lcp < s->n_tok - 1 && a->tok[lcp] == s->tok[lcp]) lcp++;
    if (lcp < a->n_tok) s->usage.history_diverged = 1;
    int keep = lcp < a->n_cached ? lcp : a->n_cached;
    if (keep < a->n_cached && keep % B) {
        int b = a->blk[keep / B];
        if (b < 0 || e->bp.ref[b] > 1 || e->bp.registered[b]) keep -= keep % B;
    }
    int first_needed = e->window && keep - e->window + 1 > 0 ? keep - e->window + 1 : 0;
    if (keep > 0 && a->blk[first_needed / B] < 0) keep = 0; /* the window reaches into given-back blocks */
    if (keep == 0) {
        eng__agent_release_blocks(e, a);
    } else {
        int nb = (keep + B - 1) / B;
        for (int i = nb; i < a->n_blk; i++)
            if (a->blk[i] >= 0) eng__bp_decref(&e->bp, a->blk[i]);
        if (a->n_blk > nb) a->n_blk = nb;
        a->n_cached = keep;
        if (a->n_foreign > keep) a->n_foreign = keep;
    }
    a->n_tok = lcp;
    memmove(s->tok, s->tok + lcp, (size_t)(s->n_tok - lcp) * sizeof *s->tok);
    s->n_tok -= lcp;
}

/* Admit a waiting sequence: join its agent's context, take cached prefix
 * blocks. Returns 0 if admitted, 1 if it must wait (agent busy), -1 if it was
 * finished with an error. */
static int admit(eng_engine *e, seq *s) {
    if (!s->admitted && s->agent_id) {
        agent *a = eng__agent_find(e, s->tenant, s->agent_id, NULL);
        if (a && a->busy) return 1;
        if (!a && !(a = eng__agent_new(e, s->tenant, s->agent_id))) {
            seq_finish(e, s, ENG_FINISH_ERROR, ENG_ENOMEM, "out of memory");
            return -1;
        }
        if (s->reset) {
            eng__agent_release_blocks(e, a);
            a->n_tok = 0;
        }
        if (s->full_context) keep_common_prefix(e, a, s);
        long total = (long)a->n_tok + s->n_tok;
        if (total + s->max_tokens > e->max_ctx) {
            char msg[160];
            snprintf(msg, sizeof msg, "agent history (%d) + prompt (%d) + max_tokens (%d) exceeds the context of %d",
                     a->n_tok, s->n_tok, s->max_tokens, e->max_ctx);
            seq_finish(e, s, ENG_FINISH_ERROR, ENG_ECONTEXT, msg);
            return -1;
        }
        if (blocks_needed(e, total, total + s->max_tokens) > e->bp.n) {
            seq_finish(e, s, ENG_FINISH_ERROR, ENG_EPOOL, "agent history + prompt + max_tokens can never fit in the KV pool");
            return -1;
        }
        if (seq_reserve_tok(s, (int)total + s->max_tokens) != ENG_OK) {
            seq_finish(e, s, ENG_FINISH_ERROR, ENG_ENOMEM, "out of memory");
            return -1;
        }
        memmove(s->tok + a->n_tok, s->tok, (size_t)s->n_tok * sizeof *s->tok);
        if (a->n_tok) memcpy(s->tok, a->tok, (size_t)a->n_tok * sizeof *s->tok);
        s->n_tok = (int)total;
        free(s->blk);
        s->blk = a->blk;
        s->n_blk = s->cap_blk = a->n_blk;
        s->n_cached = a->n_cached;
        s->n_foreign = a->n_foreign;
        a->blk = NULL;
        a->n_blk = 0;
        a->n_cached = 0;
        a->busy = 1;
    }
    if (seq_reserve_tok(s, s->n_tok + s->max_tokens) != ENG_OK) {
        seq_finish(e, s, ENG_FINISH_ERROR, ENG_ENOMEM, "out of memory");
        return -1;
    }
    /* reuse cached full blocks of the same prefix (at least one token is
     * always computed, to have logits) */
    if (s->n_blk == 0 && !s->waiter) { /* (a scoring sequence computes every position) */
        int B = e->bp.B, parent = -1, nfull = (s->n_tok - 1) / B, hits = 0;
        if (s->cap_blk < nfull) {
            int32_t *nb = realloc(s->blk, (size_t)(nfull ? nfull : 1) * sizeof *nb);
            if (!nb) { seq_finish(e, s, ENG_FINISH_ERROR, ENG_ENOMEM, "out of memory"); return -1; }
            s->blk = nb;
            s->cap_blk = nfull;
        }
        for (int k = 0; k < nfull; k++) {
            int b = eng__bp_lookup(&e->bp, parent, s->scope, s->tok + (size_t)k * B);
            if (b < 0) break;
            eng__bp_incref(&e->bp, b);
            s->blk[s->n_blk++] = b;
            parent = b;
            hits++;
        }
        s->n_cached = hits * B;
        e->prefix_hits += (uint64_t)hits * B;
    }
    if (!s->admitted) {
        s->gen_start = s->n_tok;
        s->usage.prompt_tokens = s->n_tok;
        s->usage.cached_tokens = s->n_cached;
        s->admitted = 1;
    }
    list_remove(&e->waiting, s);
    list_push(&e->running, s, 0);
    s->state = SQ_RUNNING;
    return 0;
}

/* Put a running sequence back at the front of the queue; it recomputes its
 * context when readmitted (its prefix blocks may still be cached). */
static void preempt(eng_engine *e, seq *s) {
    seq_release_blocks(e, s);
    list_remove(&e->running, s);
    list_push(&e->waiting, s, 1);
    s->state = SQ_WAITING;
    e->preemptions++;
}

/* Give s blocks for positions up to `upto` (exclusive); copy-on-write the
 * block holding position n_cached if it is shared. ENG_OK or ENG_EPOOL. */
static int ensure_blocks(eng_engine *e, seq *s, int upto) {
    bpool *p = &e->bp;
    int need = (upto + p->B - 1) / p->B;
    if (need > s->cap_blk) {
        int32_t *nb = realloc(s->blk, (size_t)need * sizeof *nb);
        if (!nb) return ENG_ENOMEM;
        s->blk = nb;
        s->cap_blk = need;
    }
    int first = s->n_cached / p->B;
    if (first < s->n_blk && p->ref[s->blk[first]] > 1) {
        int nb = eng__bp_alloc(p);
        while (nb < 0 && eng__evict_idle_agent(e)) nb = eng__bp_alloc(p);
        if (nb < 0) return ENG_EPOOL;
        size_t bb = p->kv.block_elems * p->kv.esz;
        memcpy((char *)p->kv.mem + (size_t)nb * bb, (char *)p->kv.mem + (size_t)s->blk[first] * bb, bb);
        eng__bp_decref(p, s->blk[first]);
        s->blk[first] = nb;
    }
    while (s->n_blk < need) {
        int b = eng__bp_alloc(p);
        while (b < 0 && eng__evict_idle_agent(e)) b = eng__bp_alloc(p);
        if (b < 0) return ENG_EPOOL;
        s->blk[s->n_blk++] = b;
    }
    return ENG_OK;
}

/* Register the full blocks that tok[0..n_cached) completed. A chain is only
 * extended from a registered parent: a block that duplicates one registered
 * by a twin sequence stays unregistered, its hash is stale, and children
 * hashed from it could later match KV computed after another prefix. A block
 * holding imported KV is never registered, so neither is anything after it
 * (its KV was computed from the imported one). */
static void register_full(eng_engine *e, seq *s, int before) {
    int B = e->bp.B;
    for (int k = before / B; k < s->n_cached / B; k++) {
        int parent = k ? s->blk[k - 1] : -1;
        if ((k && (parent < 0 || !e->bp.registered[parent])) || k * B < s->n_foreign) return; /* (a parent given back ends it) */
        eng__bp_register(&e->bp, s->blk[k], parent, s->scope, s->tok + (size_t)k * B);
    }
}

/* Choose this step's work. Returns the number of sequences in the batch. */
static int schedule(eng_engine *e, int *n_tokens) {
    /* admit */
    for (seq *s = e->waiting.head, *n; s && e->running.n < e->o.max_running; s = n) {
        n = s->next;
        admit(e, s);
    }
    int budget = e->o.max_step_tokens, nb = 0, rows = e->o.max_running; /* logits rows of the step */
    /* decoding sequences first (one token each), oldest first; then prefill chunks */
    for (int pass = 0; pass < 2; pass++) {
        for (seq *s = e->running.head, *n; s && budget > 0; s = n) {
            n = s->next;
            if (s->in_batch) continue;
            if (e->hold >= 0 && s->n_tok - s->gen_start >= e->hold) continue; /* held (tests only) */
            int left = s->n_tok - s->n_cached;
            if ((pass == 0) != (left == 1)) continue;
            int chunk = left < budget ? left : budget;
            if (s->waiter && chunk > rows) chunk = rows; /* a scoring prefill wants every position's logits */
            if (chunk == 0 || (!s->waiter && rows == 0)) continue;
            while (ensure_blocks(e, s, s->n_cached + chunk) != ENG_OK) {
                /* preempt the youngest other sequence that is not in the batch */
                seq *victim = NULL;
                for (seq *v = e->running.tail; v; v = v->prev)
                    if (v != s && !v->in_batch) { victim = v; break; }
                if (!victim) break;
                if (victim == n) n = victim->next;
                preempt(e, victim);
            }
            if (s->n_blk * e->bp.B < s->n_cached + chunk) {
                /* no room even alone in the batch: wait for the batch to finish */
                if (nb == 0) { preempt(e, s); }
                continue;
            }
            s->in_batch = 1;
            s->chunk = chunk;
            e->batch[nb++] = s;
            budget -= chunk;
            rows -= s->waiter ? chunk : s->n_cached + chunk == s->n_tok;
        }
    }
    *n_tokens = e->o.max_step_tokens - budget;
    return nb;
}

int eng_step(eng_engine *e, eng_event_cb cb, void *ud) {
    pthread_mutex_lock(&e->mu);
    /* room for every event this step can make: a token and a DONE per running sequence, a DONE per
     * waiting one refused at admission; without it, wait (nothing is lost, nothing runs) */
    if (ev_reserve(&e->ev, 2 * (size_t)(e->running.n + e->o.max_running) + (size_t)e->waiting.n)) {
        pthread_mutex_unlock(&e->mu);
        return 0;
    }
    int n_tokens = 0, nb = schedule(e, &n_tokens);
    if (nb == 0) {
        deliver(e, cb, ud);
        return 0;
    }
    /* lay out the batch: tokens of each sequence, logits for those that reach their end */
    int t = 0, n_out = 0;
    for (int i = 0; i < nb; i++) {
        seq *s = e->batch[i];
        e->tables[i] = (kv_table){s->blk, s->n_blk};
        s->row0 = n_out;
        for (int k = 0; k < s->chunk; k++, t++) {
            e->b_tok[t] = s->tok[s->n_cached + k];
            e->b_pos[t] = s->n_cached + k;
            e->b_seq[t] = i;
            if (s->waiter && k < s->chunk - 1) e->b_rows[n_out++] = t;
        }
        if (s->waiter || s->n_cached + s->chunk == s->n_tok) e->b_rows[n_out++] = t - 1;
    }
    fwd_batch b = {.n = t, .tokens = e->b_tok, .pos = e->b_pos, .seq = e->b_seq, .tables = e->tables,
                   .n_out = n_out, .out_rows = e->b_rows, .logits = e->logits};
    pthread_mutex_unlock(&e->mu);
    fwd_run(&e->m->cfg, &e->m->w, &e->bp.kv, e->scratch, (const float *const *)e->m->rope, e->m->pool, &b);
    pthread_mutex_lock(&e->mu);

    const size_t V = (size_t)e->m->cfg.vocab_size;
    for (int i = 0; i < nb; i++) {
        seq *s = e->batch[i];
        int before = s->n_cached, has_row = s->n_cached + s->chunk == s->n_tok;
        s->n_cached += s->chunk;
        s->in_batch = 0;
        register_full(e, s, before);
        release_behind(e, s);
        if (s->waiter && s->plp) /* position before + k predicts token before + k + 1 */
            for (int k = 0; k < s->chunk && before + k + 1 < s->gen_start; k++) {
                const float *x = e->logits + (size_t)(s->row0 + k) * V;
                double mx, logsum;
                eng__logsoftmax_parts(x, V, &mx, &logsum);
                s->plp[before + k] = (double)x[s->tok[before + k + 1]] - mx - logsum;
            }
        float *lg = has_row ? e->logits + (size_t)(s->row0 + (s->waiter ? s->chunk - 1 : 0)) * V : NULL;
        if (s->cancelled) {
            seq_finish(e, s, ENG_FINISH_CANCELLED, 0, NULL);
            continue;
        }
        if (!lg) continue;
        double lp[1 + ENG_MAX_TOP_LOGPROBS], mx = 0, logsum = 0;
        int32_t top[ENG_MAX_TOP_LOGPROBS];
        const float *raw = lg;
        if (s->logprobs) { /* of the raw distribution, before the sampler changes anything */
            eng__logsoftmax_parts(lg, V, &mx, &logsum);
            if (s->top_logprobs) eng__top_logits(lg, (int)V, s->top_logprobs, top);
            for (int k = 0; k < s->top_logprobs; k++) lp[1 + k] = (double)lg[top[k]] - mx - logsum;
            if (s->sp.repeat_penalty != 1.0f && (e->raw_row || (e->raw_row = malloc(V * sizeof *e->raw_row))))
                raw = memcpy(e->raw_row, lg, V * sizeof *lg);
        }
        int32_t tok = eng__sample(e->sampler, &s->sp, &s->rng, lg, s->tok, (size_t)s->n_tok);
        s->tok[s->n_tok++] = tok;
        const char *d;
        size_t dl;
        int fin = eng__gen_push(s->gen, tok, &d, &dl);
        eng_event ev = {.kind = ENG_EV_TOKEN, .id = s->id, .token = tok, .has_logprob = s->logprobs,
                        .n_top = s->top_logprobs};
        lp[0] = (double)raw[tok] - mx - logsum;
        if (!s->waiter) ev_add(&e->ev, &ev, d, dl, top, s->logprobs ? (size_t)s->top_logprobs : 0, lp, s->logprobs ? 1 + (size_t)s->top_logprobs : 0);
        if (fin != ENG_FINISH_NONE) seq_finish(e, s, fin, 0, NULL);
    }
    deliver(e, cb, ud);
    return n_tokens;
}

void eng_engine_hold(eng_engine *e, int n) {
    pthread_mutex_lock(&e->mu);
    e->hold = n < 0 ? -1 : n;
    pthread_mutex_unlock(&e->mu);
}

void eng_stats_get(eng_engine *e, eng_stats *st) {
    pthread_mutex_lock(&e->mu);
    memset(st, 0, sizeof *st);
    st->blocks_total = e->bp.n;
    st->blocks_free = e->bp.n_free + e->bp.n_cached;
    st->blocks_cached = e->bp.n_cached;
    st->blocks_used = e->bp.n - st->blocks_free;
    for (int i = 0; i < e->bp.n; i++) st->blocks_shared += e->bp.ref[i] > 1;
    st->block_tokens = e->bp.B;
    st->running = e->running.n;
    st->waiting = e->waiting.n;
    st->agents = e->n_agents;
    st->prefix_hit_tokens = e->prefix_hits;
    st->preemptions = e->preemptions;
    pthread_mutex_unlock(&e->mu);
}
