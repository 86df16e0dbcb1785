/* promptcache.c — the prompt cache in Submit and Stream: lookups, writes, single-flight */
#include "internal.h"

void srv__cache_req_free(cache_req *q) {
    if (!q) return;
    free(q->ids);
    free(q->tenant);
    free(q->ns);
    for (int i = 0; q->stop && i < q->k.n_stop; i++) free(q->stop[i]);
    free(q->stop);
    free(q);
}

/* Deterministic requests are cached unless asked otherwise: greedy, or a fixed seed. */
int srv__cacheable(const Kvserve__V1__GenerateRequest *g) {
    if (g->agent_id && g->agent_id[0]) return 0; /* an agent's context lives in the engine */
    if (g->logprobs) return 0;                   /* (the cache keeps no logprobs) */
    if (g->cache && g->cache->mode == KVSERVE__V1__CACHE_POLICY__MODE__BYPASS) return 0;
    if (g->cache && g->cache->cache_nondeterministic) return 1;
    return !g->sampling || g->sampling->temperature == 0 || g->sampling->seed != 0;
}

/* Tokenize (once: the engine then gets the ids) and build the key material. */
cache_req *srv__cache_prepare(srv *s, const char *tenant, const Kvserve__V1__GenerateRequest *g, eng_request *r) {
    if (r->params.max_tokens <= 0 || (!r->text && !r->n_ids)) return NULL; /* invalid: the engine says why */
    cache_req *q = calloc(1, sizeof *q);
    if (!q) return NULL;
    size_t n = 0;
    if (r->text) {
        if (eng_tok_encode(eng_model_tok(s->model), r->text, r->text_len, r->add_special, &q->ids, &n) != ENG_OK) {
            free(q);
            return NULL; /* the engine reports the error */
        }
        r->text = NULL;
        r->ids = q->ids;
        r->n_ids = n;
    } else {
        n = r->n_ids;
        q->ids = malloc((n ? n : 1) * sizeof *q->ids);
        if (q->ids) memcpy(q->ids, r->ids, n * sizeof *q->ids);
    }
    q->tenant = strdup(tenant);
    q->ns = strdup(g->namespace_ ? g->namespace_ : "");
    q->stop = calloc(g->n_stop + 1, sizeof *q->stop);
    if (!q->ids || !q->tenant || !q->ns || !q->stop) { srv__cache_req_free(q); return NULL; }
    for (size_t i = 0; i < g->n_stop; i++) q->stop[i] = strdup(g->stop[i]);
    const eng_sampling *sp = &r->params.sampling;
    q->k = (kvc_prompt_key){.model_fingerprint = eng_model_fingerprint(s->model), .tenant = q->tenant, .ns = q->ns,
                            .ids = q->ids, .n_ids = n, .max_tokens = r->params.max_tokens,
                            .temperature = sp->temperature, .top_p = sp->top_p, .min_p = sp->min_p,
                            .repeat_penalty = sp->repeat_penalty, .top_k = sp->top_k,
                            .repeat_last_n = sp->repeat_last_n, .ignore_eos = r->params.ignore_eos, .seed = sp->seed,
                            .stop = (const char *const *)q->stop, .n_stop = (int)g->n_stop};
    q->ttl = g->cache ? (int)g->cache->ttl_seconds : 0;
    return q;
}

/* Queue a job for the writer. First in, first out: a write is done before
 * any job queued after it. */
void srv__job_push(srv *s, cache_job *j) {
    j->next = NULL;
    pthread_mutex_lock(&s->jobs_mu);
    if (s->jobs_tail) s->jobs_tail->next = j; else s->jobs = j;
    s->jobs_tail = j;
    pthread_cond_signal(&s->jobs_cv);
    pthread_mutex_unlock(&s->jobs_mu);
}

/* Engine thread (srv.rq_mu held): hand a finished completion to the writer. */
void srv__cache_enqueue(srv *s, cache_req *q, const eng_event *ev) {
    cache_job *j = calloc(1, sizeof *j);
    if (!j) { srv__cache_req_free(q); return; }
    j->req = q;
    j->comp.text = malloc(ev->text_len + 1);
    j->comp.tokens = malloc((ev->n_tokens ? ev->n_tokens : 1) * sizeof(int32_t));
    if (!j->comp.text || !j->comp.tokens) {
        kvc_completion_free(&j->comp);
        srv__cache_req_free(q);
        free(j);
        return;
    }
    memcpy(j->comp.text, ev->text, ev->text_len);
    j->comp.text_len = ev->text_len;
    memcpy(j->comp.tokens, ev->tokens, ev->n_tokens * sizeof(int32_t));
    j->comp.n_tokens = ev->n_tokens;
    j->comp.finish = ev->finish;
    j->comp.prompt_tokens = ev->usage.prompt_tokens;
    j->comp.cached_tokens = ev->usage.cached_tokens;
    j->comp.generated_tokens = ev->usage.generated_tokens;
    srv__job_push(s, j);
}

/* Writes to Redis happen here, off the engine and completion-queue threads. */
void *srv__writer_loop(void *p) {
    srv *s = p;
    pthread_mutex_lock(&s->jobs_mu);
    for (;;) {
        while (!s->jobs && !s->writer_stop) pthread_cond_wait(&s->jobs_cv, &s->jobs_mu);
        cache_job *j = s->jobs;
        if (!j) break;
        s->jobs = j->next;
        if (!s->jobs) s->jobs_tail = NULL;
        int stopping = s->writer_stop;
        pthread_mutex_unlock(&s->jobs_mu);
        int purged = 0;
        if (j->purge_ns && !stopping) /* SCAN + UNLINK, 500 keys a batch */
            kvc_prompt_purge(s->pcache, j->purge_tenant, j->purge_ns, 1 << 30, &purged);
        else if (j->req)
            kvc_prompt_put(s->pcache, &j->req->k, &j->comp, j->req->ttl); /* failures are counted, not fatal */
        kvc_completion_free(&j->comp);
        srv__cache_req_free(j->req);
        free(j->purge_tenant);
        free(j->purge_ns);
        free(j);
        pthread_mutex_lock(&s->jobs_mu);
        s->purged_keys += (uint64_t)purged;
    }
    pthread_mutex_unlock(&s->jobs_mu);
    return NULL;
}

/* Answer from a cached completion (or a single-flight leader's: streams
 * only, srv.rq_mu held), streamed like a generation and marked cached. */
void srv__answer_cached(call *c, int streaming, kvc_completion *hit) {
    srv *s = c->s;
    srv_metrics_tokens(s->metrics, 0, 0, hit->prompt_tokens + hit->generated_tokens);
    Kvserve__V1__Usage u = KVSERVE__V1__USAGE__INIT;
    u.prompt_tokens = hit->prompt_tokens;
    u.cached_tokens = hit->prompt_tokens; /* nothing was computed */
    u.generated_tokens = hit->generated_tokens;
    Kvserve__V1__Completion comp = KVSERVE__V1__COMPLETION__INIT;
    comp.text = hit->text;
    comp.n_token_ids = hit->n_tokens;
    comp.token_ids = hit->tokens;
    comp.finish_reason = srv__finish_of(hit->finish);
    comp.usage = &u;
    comp.cached = 1;
    comp.id = (1ull << 63) | (atomic_fetch_add(&s->next_cached_id, 1) + 1); /* an id space of its own */
    /* token events: the detokenizer's deltas, clamped to the cached text */
    eng_detok *d = eng_detok_new(eng_model_tok(s->model));
    size_t emitted = 0;
    rec *x = streaming ? NULL : calloc(1, sizeof *x); /* made known by id once complete */
    if (streaming && !c->close_started) srv__stream_begin(c);
    for (size_t i = 0; i < hit->n_tokens && d; i++) {
        const char *t;
        size_t tl;
        eng_detok_push(d, hit->tokens[i], &t, &tl);
        size_t take = emitted + tl <= hit->text_len ? tl : hit->text_len - emitted;
        Kvserve__V1__TokenEvent te = KVSERVE__V1__TOKEN_EVENT__INIT;
        te.id = comp.id;
        te.token = hit->tokens[i];
        te.index = (uint32_t)i;
        te.text = srv__dup_n(hit->text + emitted, take);
        emitted += take;
        if (streaming) {
            Kvserve__V1__StreamEvent se = KVSERVE__V1__STREAM_EVENT__INIT;
            se.event_case = KVSERVE__V1__STREAM_EVENT__EVENT_TOKEN;
            se.token = &te;
            srv__stream_push(c, &se.base);
            free(te.text);
        } else if (x) {
            Kvserve__V1__TokenEvent *tp = malloc(sizeof *tp);
            Kvserve__V1__TokenEvent **nt = realloc(x->tok, (x->n_tok + 1) * sizeof *nt);
            if (tp && nt) {
                *tp = te;
                x->tok = nt;
                x->tok[x->n_tok++] = tp;
            } else {
                if (nt) x->tok = nt;
                free(tp);
                free(te.text);
            }
        }
    }
    eng_detok_free(d);
    if (streaming) {
        Kvserve__V1__StreamEvent se = KVSERVE__V1__STREAM_EVENT__INIT;
        se.event_case = KVSERVE__V1__STREAM_EVENT__EVENT_COMPLETION;
        se.completion = &comp;
        srv__stream_push(c, &se.base);
        srv__stream_end(c, GRPC_STATUS_OK, "");
        srv__call_unref(c);
        return;
    }
    if (!x) { srv__finish_errorf(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory"); return; }
    Kvserve__V1__Completion *cp = malloc(sizeof *cp);
    Kvserve__V1__Usage *up = malloc(sizeof *up);
    if (cp && up) {
        *cp = comp;
        *up = u;
        cp->usage = up;
        cp->text = srv__dup_n(hit->text, hit->text_len);
        cp->token_ids = malloc((hit->n_tokens ? hit->n_tokens : 1) * sizeof(int32_t));
        if (cp->token_ids) memcpy(cp->token_ids, hit->tokens, hit->n_tokens * sizeof(int32_t));
        cp->error = srv__dup_n("", 0);
    } else {
        free(cp);
        free(up);
        cp = NULL;
    }
    x->comp = cp;
    char err[256];
    pthread_mutex_lock(&s->rq_mu);
    int rc = srv__rec_register(s, x, comp.id, c->tenant, 0, err, sizeof err);
    if (!rc) srv__reg_done(s->reg, &x->e, srv__now_s());
    pthread_mutex_unlock(&s->rq_mu);
    if (rc) {
        srv__rec_free(x);
        srv__finish_errorf(c, srv__status_of(rc), "%s", err);
        return;
    }
    Kvserve__V1__SubmitReply rep = KVSERVE__V1__SUBMIT_REPLY__INIT;
    rep.id = comp.id;
    srv__finish_call(c, GRPC_STATUS_OK, NULL, &rep.base);
}

/* The leader of a single-flight group finished (srv.rq_mu held): answer every
 * follower with its result, streamed like a cache hit; if the leader was
 * cancelled or failed, followers are told to retry. */
void srv__flight_done(srv *s, rec *r, const eng_event *ev) {
    flight *f = r->flight;
    r->flight = NULL;
    for (flight **pp = &s->flights; *pp; pp = &(*pp)->next)
        if (*pp == f) {
            *pp = f->next;
            break;
        }
    int ok = ev->finish == ENG_FINISH_STOP || ev->finish == ENG_FINISH_LENGTH;
    kvc_completion comp = {.text = (char *)ev->text, .text_len = ev->text_len, .tokens = (int32_t *)ev->tokens,
                           .n_tokens = ev->n_tokens, .finish = ev->finish, .prompt_tokens = ev->usage.prompt_tokens,
                           .generated_tokens = ev->usage.generated_tokens};
    for (follower *w = f->followers, *n; w; w = n) {
        n = w->next;
        if (ok) srv__answer_cached(w->c, 1, &comp);
        else {
            char msg[128];
            snprintf(msg, sizeof msg, "the identical request this one joined was %s; retry", eng_finish_name(ev->finish));
            srv__fail_call(w->c, GRPC_STATUS_UNAVAILABLE, msg);
        }
        free(w);
    }
    free(f);
}
