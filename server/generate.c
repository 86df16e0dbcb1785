/* generate.c — Submit and Stream: registry, engine events, batcher, engine */
#include "internal.h"

rec *srv__rec_find(srv *s, uint64_t id, const char *tenant) {
    srv_reg_entry *e = srv__reg_find(s->reg, id);
    return e && !strcmp(e->tenant, tenant) ? (rec *)e : NULL;
}


/* A TokenEvent made by token_event(), freed whole. */
void srv__token_event_free(Kvserve__V1__TokenEvent *t) {
    if (!t) return;
    free(t->text);
    for (size_t i = 0; i < t->n_top_logprobs; i++) free(t->top_logprobs[i]);
    free(t->top_logprobs);
    free(t);
}

/* The message of a TOKEN event: its text copied, its pieces pointing into the
 * tokenizer (they live as long as the model). NULL when out of memory. */
static Kvserve__V1__TokenEvent *token_event(srv *s, const eng_event *ev, uint32_t index) {
    Kvserve__V1__TokenEvent *t = malloc(sizeof *t);
    if (!t) return NULL;
    kvserve__v1__token_event__init(t);
    t->id = ev->id;
    t->token = ev->token;
    t->text = srv__dup_n(ev->text, ev->text_len);
    t->index = index;
    if (ev->has_logprob) {
        const eng_tok *tok = eng_model_tok(s->model);
        size_t n = 0;
        t->logprob = ev->logprob;
        t->piece.data = (uint8_t *)eng_tok_piece(tok, ev->token, &n);
        t->piece.len = t->piece.data ? n : 0;
        if (ev->n_top && (t->top_logprobs = calloc((size_t)ev->n_top, sizeof *t->top_logprobs)))
            for (int k = 0; k < ev->n_top; k++) {
                Kvserve__V1__TopLogprob *a = malloc(sizeof *a);
                if (!a) break;
                kvserve__v1__top_logprob__init(a);
                a->token = ev->top_ids[k];
                a->logprob = ev->top_logprobs[k];
                a->piece.data = (uint8_t *)eng_tok_piece(tok, a->token, &n);
                a->piece.len = a->piece.data ? n : 0;
                t->top_logprobs[t->n_top_logprobs++] = a;
            }
    }
    if (!t->text) {
        srv__token_event_free(t);
        return NULL;
    }
    return t;
}

void srv__rec_free(rec *r) {
    srv__cache_req_free(r->cache);
    for (size_t i = 0; i < r->n_tok; i++) srv__token_event_free(r->tok[i]);
    free(r->tok);
    if (r->comp) {
        free(r->comp->text);
        free(r->comp->token_ids);
        free(r->comp->usage);
        free(r->comp->error);
        free(r->comp);
    }
    free(r);
}

void srv__rec_unlink(srv *s, rec *r) { srv__reg_remove(s->reg, &r->e); }

/* ENG_EQUEUE with a message when the tenant already has --max-results
 * requests whose results Step has not collected (srv.rq_mu held); else ENG_OK. */
static int results_full(srv *s, const char *tenant, char *err, size_t errlen) {
    if (srv__reg_tenant_count(s->reg, tenant) < s->cfg.max_results) return ENG_OK;
    snprintf(err, errlen, "%d requests of this tenant wait for Step to collect their results (--max-results); "
                          "collect or cancel some first", s->cfg.max_results);
    return ENG_EQUEUE;
}

/* Make x (calloc'd, filled or to be filled under srv.rq_mu) known by id
 * (srv.rq_mu held): ENG_OK, or ENG_EQUEUE (see results_full) or ENG_ENOMEM with a
 * message, x untouched. A Stream's record is not counted against the bound:
 * its call bounds it. */
int srv__rec_register(srv *s, rec *x, uint64_t id, const char *tenant, int streaming, char *err, size_t errlen) {
    int rc = streaming ? ENG_OK : results_full(s, tenant, err, errlen);
    if (rc) return rc;
    x->e.id = id;
    snprintf(x->e.tenant, sizeof x->e.tenant, "%s", tenant);
    x->e.collected_by_step = !streaming;
    if (srv__reg_add(s->reg, &x->e) == 0) return ENG_OK;
    snprintf(err, errlen, "out of memory");
    return ENG_ENOMEM;
}

char *srv__dup_n(const char *p, size_t n) {
    char *d = malloc(n + 1);
    if (d) {
        memcpy(d, p, n);
        d[n] = 0;
    }
    return d;
}

Kvserve__V1__FinishReason srv__finish_of(int f) {
    switch (f) {
    case ENG_FINISH_STOP: return KVSERVE__V1__FINISH_REASON__STOP;
    case ENG_FINISH_LENGTH: return KVSERVE__V1__FINISH_REASON__LENGTH;
    case ENG_FINISH_CANCELLED: return KVSERVE__V1__FINISH_REASON__CANCELLED;
    case ENG_FINISH_ERROR: return KVSERVE__V1__FINISH_REASON__ERROR;
    default: return KVSERVE__V1__FINISH_REASON__FINISH_UNSPECIFIED;
    }
}

static Kvserve__V1__Completion *completion_of(const eng_event *ev) {
    Kvserve__V1__Completion *c = malloc(sizeof *c);
    Kvserve__V1__Usage *u = malloc(sizeof *u);
    if (!c || !u) { free(c); free(u); return NULL; }
    kvserve__v1__completion__init(c);
    kvserve__v1__usage__init(u);
    c->id = ev->id;
    c->text = srv__dup_n(ev->text, ev->text_len);
    c->n_token_ids = ev->n_tokens;
    c->token_ids = malloc((ev->n_tokens ? ev->n_tokens : 1) * sizeof(int32_t));
    if (c->token_ids) memcpy(c->token_ids, ev->tokens, ev->n_tokens * sizeof(int32_t));
    c->finish_reason = srv__finish_of(ev->finish);
    u->prompt_tokens = ev->usage.prompt_tokens;
    u->cached_tokens = ev->usage.cached_tokens;
    u->generated_tokens = ev->usage.generated_tokens;
    u->history_diverged = ev->usage.history_diverged != 0;
    c->usage = u;
    c->error = srv__dup_n(ev->message ? ev->message : "", ev->message ? strlen(ev->message) : 0);
    return c;
}

void srv__free_completion(Kvserve__V1__Completion *c) {
    if (!c) return;
    free(c->text);
    free(c->token_ids);
    free(c->usage);
    free(c->error);
    free(c);
}


/* Engine thread: route an event to its Stream call or its Step buffer. */
void srv__on_event(void *ud, const eng_event *ev) {
    srv *s = ud;
    pthread_mutex_lock(&s->rq_mu);
    rec *r = (rec *)srv__reg_find(s->reg, ev->id);
    if (!r) { pthread_mutex_unlock(&s->rq_mu); return; }
    if (ev->kind == ENG_EV_TOKEN) {
        double t_now = srv__now_s();
        if (r->stream) { /* latencies a client sees: Stream's (a Submitted token waits for Step) */
            if (r->index == 0) srv_metrics_ttft(s->metrics, t_now - r->t_start);
            else srv_metrics_itl(s->metrics, t_now - r->t_last);
        }
        r->t_last = t_now;
        Kvserve__V1__TokenEvent *t = token_event(s, ev, r->index++);
        if (r->stream && t) {
            Kvserve__V1__StreamEvent se = KVSERVE__V1__STREAM_EVENT__INIT;
            se.event_case = KVSERVE__V1__STREAM_EVENT__EVENT_TOKEN;
            se.token = t;
            srv__stream_push(r->stream, &se.base);
            srv__token_event_free(t);
        } else if (t) {
            if (r->n_tok == r->cap_tok) {
                size_t nc = r->cap_tok ? r->cap_tok * 2 : 16;
                Kvserve__V1__TokenEvent **nt = realloc(r->tok, nc * sizeof *nt);
                if (nt) { r->tok = nt; r->cap_tok = nc; }
            }
            if (r->n_tok < r->cap_tok) r->tok[r->n_tok++] = t;
            else srv__token_event_free(t);
        }
    } else {
        srv_metrics_tokens(s->metrics, ev->usage.prompt_tokens - ev->usage.cached_tokens, ev->usage.generated_tokens, 0);
        if (r->flight) srv__flight_done(s, r, ev);
        Kvserve__V1__Completion *c = completion_of(ev);
        if (r->cache && (ev->finish == ENG_FINISH_STOP || ev->finish == ENG_FINISH_LENGTH)) {
            srv__cache_enqueue(s, r->cache, ev);
            r->cache = NULL;
        }
        if (r->stream) {
            call *sc = r->stream;
            if (c) {
                Kvserve__V1__StreamEvent se = KVSERVE__V1__STREAM_EVENT__INIT;
                se.event_case = KVSERVE__V1__STREAM_EVENT__EVENT_COMPLETION;
                se.completion = c;
                srv__stream_push(sc, &se.base);
            }
            srv__free_completion(c);
            if (c) srv__stream_end(sc, GRPC_STATUS_OK, "");
            else srv__stream_end(sc, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory building the completion");
            srv__rec_unlink(s, r);
            srv__rec_free(r);
            pthread_mutex_unlock(&s->rq_mu);
            srv__call_unref(sc);
            return;
        }
        r->comp = c;
        srv__reg_done(s->reg, &r->e, srv__now_s()); /* kept for Step until --result-ttl */
    }
    pthread_mutex_unlock(&s->rq_mu);
}

/* GenerateRequest.messages rendered with the model's chat template into
 * *text (malloc'd). ENG_OK, or ENG_EINVAL with a message naming the field. */
static int render_chat(srv *s, const Kvserve__V1__GenerateRequest *g, char **text, size_t *len, char *err,
                       size_t errlen) {
    if ((g->prompt && g->prompt[0]) || g->n_prompt_ids) {
        snprintf(err, errlen, "messages: give prompt, prompt_ids or messages, not two of them");
        return ENG_EINVAL;
    }
    if (!s->chat) {
        snprintf(err, errlen, "messages: %s", s->chat_why);
        return ENG_EINVAL;
    }
    if (g->n_messages > 4096) {
        snprintf(err, errlen, "messages: at most 4096 messages (got %zu)", g->n_messages);
        return ENG_EINVAL;
    }
    eng_chat_msg *m = calloc(g->n_messages, sizeof *m);
    if (!m) {
        snprintf(err, errlen, "out of memory");
        return ENG_ENOMEM;
    }
    for (size_t i = 0; i < g->n_messages; i++) {
        m[i].role = g->messages[i]->role ? g->messages[i]->role : "";
        m[i].content = g->messages[i]->content ? g->messages[i]->content : "";
        if (!m[i].role[0]) {
            free(m);
            snprintf(err, errlen, "messages[%zu].role is empty", i);
            return ENG_EINVAL;
        }
    }
    char why[400];
    int rc = eng_chat_render(s->chat, m, g->n_messages, !g->no_generation_prompt, text, len, why, sizeof why);
    free(m);
    if (rc) {
        snprintf(err, errlen, "messages: the chat template refused them: %s", why);
        return ENG_EINVAL;
    }
    return ENG_OK;
}

/* GenerateRequest -> eng_request (pointers into g, or into chat: the
 * rendered messages). */
static int to_engine_request(const Kvserve__V1__GenerateRequest *g, const char *chat, size_t chat_len,
                             const char *tenant, eng_request *r, char *err, size_t errlen) {
    memset(r, 0, sizeof *r);
    if (chat) {
        r->text = chat;
        r->text_len = chat_len;
        r->full_context = 1; /* with an agent: the whole conversation each turn */
    } else if (g->prompt && g->prompt[0]) {
        r->text = g->prompt;
        r->text_len = strlen(g->prompt);
    } else {
        r->ids = g->prompt_ids;
        r->n_ids = g->n_prompt_ids;
    }
    r->add_special = !chat && g->add_special_tokens; /* a template writes its own BOS */
    r->tenant = tenant;
    r->agent_id = g->agent_id;
    r->reset = g->reset;
    r->params.logprobs = g->logprobs;
    r->params.top_logprobs = g->top_logprobs;
    eng_sampling_default(&r->params.sampling);
    if (g->sampling) {
        const Kvserve__V1__Sampling *sp = g->sampling;
        r->params.sampling.temperature = sp->temperature;
        r->params.sampling.top_k = sp->top_k;
        r->params.sampling.top_p = sp->top_p == 0 ? 1.0f : sp->top_p;
        r->params.sampling.min_p = sp->min_p;
        r->params.sampling.repeat_penalty = sp->repeat_penalty == 0 ? 1.0f : sp->repeat_penalty;
        r->params.sampling.repeat_last_n = sp->repeat_last_n;
        r->params.sampling.seed = sp->seed;
    }
    r->params.max_tokens = g->max_tokens;
    r->params.stop = (const char *const *)g->stop;
    r->params.n_stop = (int)g->n_stop;
    r->params.ignore_eos = g->ignore_eos;
    if (g->n_stop > 16) {
        snprintf(err, errlen, "stop: at most 16 stop strings");
        return ENG_EINVAL;
    }
    return ENG_OK;
}

void srv__wake_engine(srv *s) {
    s->work = 1;
    pthread_cond_signal(&s->cv);
}

void srv__wake_engine_locked(srv *s) {
    pthread_mutex_lock(&s->mu);
    srv__wake_engine(s);
    pthread_mutex_unlock(&s->mu);
}

/* ---- Submit and Stream: handler -> batcher -> prompt cache -> engine ---------------- */
/* A Submit or Stream waiting in the batcher. It holds the handler's call
 * reference and the parsed request (r points into g). */
typedef struct pend {
    call *c;
    int streaming;
    int lookup;                 /* look it up in the prompt cache first */
    Kvserve__V1__GenerateRequest *g;
    char *chat;                 /* g's messages rendered, or NULL */
    int32_t *ids;               /* the prompt tokenized before the server lock, or NULL */
    eng_request r;
    cache_req *cq;
} pend;

static void pend_free(pend *p) {
    srv__cache_req_free(p->cq);
    free(p->chat);
    free(p->ids);
    kvserve__v1__generate_request__free_unpacked(p->g, NULL);
    free(p);
}

/* Hand the request to the engine (batcher thread): join an identical Stream
 * in flight, or submit it. Consumes p. */
/* A text prompt to ids (a long one takes a while: this runs on the handler's
 * worker pool). On failure the text stays, for eng_submit to say why. */
static void tokenize(srv *s, pend *p) {
    size_t n = 0;
    if (!p->r.text) return;
    if (eng_tok_encode(eng_model_tok(s->model), p->r.text, p->r.text_len, p->r.add_special, &p->ids, &n) == ENG_OK) {
        p->r.text = NULL;
        p->r.ids = p->ids;
        p->r.n_ids = n;
    }
}

static void start_generation(srv *s, pend *p) {
    call *c = p->c;
    int streaming = p->streaming;
    char err[512] = "";
    uint64_t id = 0;
    char digest[65] = "";
    if (p->cq && streaming) kvc_prompt_key_digest(&p->cq->k, digest);
    pthread_mutex_lock(&s->rq_mu);
    int joined = 0;
    if (digest[0]) { /* an identical request already running: wait for its result */
        for (flight *f = s->flights; f && !joined; f = f->next)
            if (!strcmp(f->digest, digest)) {
                follower *fw = malloc(sizeof *fw);
                if (!fw) break;
                fw->c = c; /* keeps the handler's reference until answered */
                fw->next = f->followers;
                f->followers = fw;
                s->singleflight_joined++;
                joined = 1;
            }
    }
    rec *x = NULL;
    int rc = ENG_OK;
    if (!joined) {
        x = calloc(1, sizeof *x);
        rc = !x ? ENG_ENOMEM : streaming ? ENG_OK : results_full(s, c->tenant, err, sizeof err);
        if (!x) snprintf(err, sizeof err, "out of memory");
        if (!rc) rc = eng_submit(s->eng, &p->r, &id, err, sizeof err);
        if (!rc && (rc = srv__rec_register(s, x, id, c->tenant, streaming, err, sizeof err))) eng_cancel(s->eng, id);
        if (!rc && digest[0] && (x->flight = calloc(1, sizeof *x->flight))) {
            memcpy(x->flight->digest, digest, sizeof digest);
            x->flight->leader = id;
            x->flight->next = s->flights;
            s->flights = x->flight;
        }
        if (!rc) {
            x->t_start = c->t_start;
            x->cache = p->cq;
            p->cq = NULL;
            if (streaming) {
                x->stream = c;
                srv__call_ref(c); /* the registry's reference, dropped on DONE */
                c->eng_id = id;
                c->has_eng = 1;
                if (c->cancel_seen) eng_cancel(s->eng, id); /* the client left while it waited */
            }
        } else {
            free(x);
        }
    }
    /* it leaves the batcher's count only now that it is known by id (or
     * joined a flight, or failed): a draining shutdown never sees a gap */
    pthread_mutex_lock(&s->mu);
    c->pending = 0;
    s->pending--;
    if (!joined && !rc) {
        if (streaming) s->active_calls++;
        srv__wake_engine(s);
    }
    pthread_mutex_unlock(&s->mu);
    pthread_mutex_unlock(&s->rq_mu);
    pend_free(p);
    if (joined) return; /* answered with the flight it joined */
    if (rc) {
        srv__fail_call(c, srv__status_of(rc), err);
    } else if (streaming) {
        srv__call_unref(c); /* the handler's reference */
    } else {
        Kvserve__V1__SubmitReply rep = KVSERVE__V1__SUBMIT_REPLY__INIT;
        rep.id = id;
        srv__finish_call(c, GRPC_STATUS_OK, NULL, &rep.base);
    }
}

/* The call left the batcher (it no longer counts as waiting there). */
static void unpend(srv *s, call *c) {
    pthread_mutex_lock(&s->mu);
    c->pending = 0;
    s->pending--;
    pthread_mutex_unlock(&s->mu);
}

/* The batcher's dispatch: the window's prompt-cache lookups in two
 * pipelined Redis round trips, hits answered, the rest to the engine. */
void srv__on_batch(void *ud, void **items, size_t n) {
    srv *s = ud;
    pend **ps = (pend **)items;
    srv_metrics_batch(s->metrics, (int)n);
    kvc_prompt_key **keys = malloc(n * sizeof *keys);
    kvc_completion *hits = malloc(n * sizeof *hits);
    int *rcs = malloc(n * sizeof *rcs);
    size_t *which = malloc(n * sizeof *which), m = 0;
    for (size_t i = 0; keys && hits && rcs && which && i < n; i++)
        if (ps[i]->lookup) {
            keys[m] = &ps[i]->cq->k;
            which[m++] = i;
        }
    if (m) kvc_prompt_get_many(s->pcache, keys, m, hits, rcs);
    for (size_t k = 0; k < m; k++) {
        pend *p = ps[which[k]];
        if (rcs[k] != KVC_OK) continue;
        unpend(s, p->c);
        srv__answer_cached(p->c, p->streaming, &hits[k]);
        kvc_completion_free(&hits[k]);
        ps[which[k]] = NULL;
        pend_free(p);
    }
    for (size_t i = 0; i < n; i++)
        if (ps[i]) start_generation(s, ps[i]);
    free(keys);
    free(hits);
    free(rcs);
    free(which);
}

/* The batcher dropped a request before dispatch. */
void srv__on_batch_drop(void *ud, void *item, int reason) {
    srv *s = ud;
    pend *p = item;
    call *c = p->c;
    unpend(s, c);
    pend_free(p);
    if (reason == SRV__DROP_EXPIRED) srv__fail_call(c, GRPC_STATUS_DEADLINE_EXCEEDED, "deadline passed while queued");
    else srv__fail_call(c, GRPC_STATUS_UNAVAILABLE, "the server is shutting down");
}

/* The call's deadline on the monotonic clock the batcher uses (0 = none). */
static double mono_deadline(const call *c) {
    gpr_timespec d = c->deadline;
    if (gpr_time_cmp(d, gpr_inf_future(d.clock_type)) == 0) return 0;
    gpr_timespec left = gpr_time_sub(d, gpr_now(d.clock_type));
    return srv__now_s() + gpr_timespec_to_micros(left) * 1e-6;
}

static void h_generate(call *c, int streaming) {
    srv *s = c->s;
    UNPACK(Kvserve__V1__GenerateRequest, kvserve__v1__generate_request__descriptor, c, g);
    char err[512] = "";
    pend *p = calloc(1, sizeof *p);
    if (!p) {
        kvserve__v1__generate_request__free_unpacked(g, NULL);
        srv__finish_errorf(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
        return;
    }
    p->c = c;
    p->g = g;
    p->streaming = streaming;
    c->pend_item = p;
    size_t chat_len = 0;
    int rc = g->n_messages ? render_chat(s, g, &p->chat, &chat_len, err, sizeof err) : ENG_OK;
    if (!rc) rc = to_engine_request(g, p->chat, chat_len, c->tenant, &p->r, err, sizeof err);
    if (!rc) srv__agent_fetch(s, c->tenant, p->r.agent_id, p->r.reset); /* an agent not here: from Redis */
    if (rc) {
        pend_free(p);
        srv__finish_call(c, srv__status_of(rc), err, NULL);
        return;
    }
    p->cq = s->pcache && srv__cacheable(g) ? srv__cache_prepare(s, c->tenant, g, &p->r) : NULL;
    tokenize(s, p); /* here, on the handler's pool: not on the batcher's thread, not under the server lock */
    /* a request the cache may answer is checked now, as the engine would check it */
    if (p->cq && (rc = eng_request_check(s->eng, &p->r, err, sizeof err)) != ENG_OK) {
        pend_free(p);
        srv__finish_call(c, srv__status_of(rc), err, NULL);
        return;
    }
    p->lookup = p->cq && !(g->cache && g->cache->mode == KVSERVE__V1__CACHE_POLICY__MODE__REFRESH);
    if (streaming) srv__stream_begin(c); /* from here a client cancel is seen while it waits */
    pthread_mutex_lock(&s->mu); /* before the batcher's lock: remove() runs under srv.mu too */
    c->pending = 1;
    s->pending++;
    int full = !s->batcher || srv__batcher_push(s->batcher, p, mono_deadline(c)) != 0;
    int closed = !s->batcher; /* shutting down */
    if (full) {
        c->pending = 0;
        s->pending--;
    }
    pthread_mutex_unlock(&s->mu);
    if (full) {
        pend_free(p);
        if (closed) srv__fail_call(c, GRPC_STATUS_UNAVAILABLE, "the server is shutting down");
        else srv__fail_call(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "request queue is full; retry later");
    }
}

void srv__h_submit(call *c) { h_generate(c, 0); }
void srv__h_stream(call *c) { h_generate(c, 1); }

/* The end of a streaming call: a client cancel or expired deadline cancels
 * the engine request, which frees its blocks. */
void srv__on_close(call *c, int ok) {
    (void)ok;
    pthread_mutex_lock(&c->mu);
    c->closed = 1;
    pthread_mutex_unlock(&c->mu);
    if (c->close_cancelled) {
        srv *s = c->s;
        srv__count_call(c, GRPC_STATUS_CANCELLED);
        pthread_mutex_lock(&s->rq_mu); /* pairs with start_generation: one of the two cancels */
        c->cancel_seen = 1;
        if (c->has_eng) eng_cancel(s->eng, c->eng_id);
        pend *p = NULL; /* still in the batcher: take it out, it never reaches the engine */
        pthread_mutex_lock(&s->mu);
        if (c->pending && s->batcher) {
            /* find our pend: the batcher compares addresses only */
            p = c->pend_item;
            if (!srv__batcher_remove(s->batcher, p)) p = NULL;
            else {
                c->pending = 0;
                s->pending--;
            }
        }
        pthread_mutex_unlock(&s->mu);
        pthread_mutex_unlock(&s->rq_mu);
        if (p) {
            pend_free(p);
            srv__call_unref(c); /* the handler's reference the pend held */
        }
    }
    if (c->watcher) {
        srv *s = c->s;
        int found = 0;
        pthread_mutex_lock(&s->mu);
        for (call **pp = &s->watchers; *pp; pp = &(*pp)->next_watch)
            if (*pp == c) {
                *pp = c->next_watch;
                found = 1;
                break;
            }
        pthread_mutex_unlock(&s->mu);
        if (found) srv__call_unref(c); /* the watcher list's reference */
    }
    srv__call_unref(c);
}
