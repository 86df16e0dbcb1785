/* step.c — Step (and its parking), Cancel, Stats */
#include "internal.h"

/* Build a StepReply from the buffers of ids (srv.rq_mu held). */
static void step_reply(srv *s, call *c, const uint64_t *ids, size_t n) {
    Kvserve__V1__StepReply rep = KVSERVE__V1__STEP_REPLY__INIT;
    size_t nt = 0, nc = 0;
    rec *rs[256];
    for (size_t i = 0; i < n; i++) {
        rs[i] = srv__rec_find(s, ids[i], c->tenant);
        if (rs[i]) {
            nt += rs[i]->n_tok;
            nc += rs[i]->comp != NULL;
        }
    }
    rep.tokens = malloc((nt ? nt : 1) * sizeof *rep.tokens);
    rep.completions = malloc((nc ? nc : 1) * sizeof *rep.completions);
    if (!rep.tokens || !rep.completions) { /* nothing is taken: the client may Step again */
        free(rep.tokens);
        free(rep.completions);
        srv__finish_call(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory building the reply; Step again", NULL);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        rec *r = rs[i];
        if (!r) continue;
        for (size_t k = 0; k < r->n_tok; k++) rep.tokens[rep.n_tokens++] = r->tok[k];
        if (r->comp) rep.completions[rep.n_completions++] = r->comp;
    }
    srv__finish_call(c, GRPC_STATUS_OK, NULL, &rep.base);
    for (size_t i = 0; i < n; i++) {
        rec *r = rs[i];
        if (!r) continue;
        for (size_t k = 0; k < r->n_tok; k++) srv__token_event_free(r->tok[k]);
        r->n_tok = 0;
        if (r->comp) { /* delivered: forget the request */
            srv__free_completion(r->comp);
            r->comp = NULL;
            srv__rec_unlink(s, r);
            srv__rec_free(r);
        }
    }
    free(rep.tokens);
    free(rep.completions);
}

static int has_news(srv *s, const char *tenant, const uint64_t *ids, size_t n) {
    for (size_t i = 0; i < n; i++) {
        rec *r = srv__rec_find(s, ids[i], tenant);
        if (r && (r->n_tok || r->comp)) return 1;
    }
    return 0;
}

void srv__h_step(call *c) {
    srv *s = c->s;
    UNPACK(Kvserve__V1__StepRequest, kvserve__v1__step_request__descriptor, c, q);
    if (q->n_ids == 0 || q->n_ids > 256) {
        srv__finish_errorf(c, GRPC_STATUS_INVALID_ARGUMENT, "ids: give 1 to 256 request ids (got %zu)", q->n_ids);
        kvserve__v1__step_request__free_unpacked(q, NULL);
        return;
    }
    for (size_t i = 0; i < q->n_ids; i++)
        for (size_t k = 0; k < i; k++)
            if (q->ids[i] == q->ids[k]) {
                srv__finish_errorf(c, GRPC_STATUS_INVALID_ARGUMENT, "ids: request %llu is listed twice",
                              (unsigned long long)q->ids[i]);
                kvserve__v1__step_request__free_unpacked(q, NULL);
                return;
            }
    pthread_mutex_lock(&s->rq_mu);
    for (size_t i = 0; i < q->n_ids; i++) {
        rec *r = srv__rec_find(s, q->ids[i], c->tenant);
        if (!r || r->stream) {
            pthread_mutex_unlock(&s->rq_mu);
            srv__finish_errorf(c, GRPC_STATUS_NOT_FOUND, "ids: request %llu is unknown, finished and collected, or streamed",
                          (unsigned long long)q->ids[i]);
            kvserve__v1__step_request__free_unpacked(q, NULL);
            return;
        }
    }
    uint32_t wait = q->wait_ms < (uint32_t)s->cfg.max_wait_ms ? q->wait_ms : (uint32_t)s->cfg.max_wait_ms;
    if (wait == 0 || has_news(s, c->tenant, q->ids, q->n_ids)) {
        step_reply(s, c, q->ids, q->n_ids);
    } else {
        parked *p = calloc(1, sizeof *p);
        uint64_t *ids = malloc(q->n_ids * sizeof *ids);
        if (!p || !ids) {
            free(p);
            free(ids);
            srv__finish_errorf(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
        } else {
            memcpy(ids, q->ids, q->n_ids * sizeof *ids);
            p->c = c;
            p->ids = ids;
            p->n = q->n_ids;
            /* never past the client's deadline: events must not be taken
             * for a reply nobody will read */
            gpr_timespec left = gpr_time_sub(gpr_convert_clock_type(c->deadline, GPR_CLOCK_MONOTONIC),
                                             gpr_now(GPR_CLOCK_MONOTONIC));
            double left_s = (double)left.tv_sec + left.tv_nsec * 1e-9 - 0.05;
            double w = wait / 1000.0;
            p->until = srv__now_s() + (left_s < w ? (left_s > 0 ? left_s : 0) : w);
            /* and notice a client that goes away while we wait */
            grpc_op op;
            memset(&op, 0, sizeof op);
            op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
            op.data.recv_close_on_server.cancelled = &c->close_cancelled;
            c->close_started = 1;
            srv__call_ref(c);
            srv__cq_dispatch(c, srv__on_close, &c->t_close);
            if (grpc_call_start_batch(c->gc, &op, 1, &c->t_close, NULL) != GRPC_CALL_OK) {
                c->close_started = 0;
                srv__call_unref(c);
            }
            p->next = s->parked;
            s->parked = p;
            srv__wake_engine_locked(s); /* so that it polls the parked Step's deadline */
        }
    }
    pthread_mutex_unlock(&s->rq_mu);
    kvserve__v1__step_request__free_unpacked(q, NULL);
}

/* Engine thread: answer parked Steps that have news or have waited enough.
 * Returns whether Steps are still parked. */
int srv__check_parked(srv *s, int all) {
    pthread_mutex_lock(&s->rq_mu);
    double t = srv__now_s();
    for (parked **pp = &s->parked; *pp;) {
        parked *p = *pp;
        pthread_mutex_lock(&p->c->mu);
        int gone = p->c->closed;
        pthread_mutex_unlock(&p->c->mu);
        if (gone) { /* the client left: keep its events for its next Step */
            *pp = p->next;
            srv__call_unref(p->c);
            free(p->ids);
            free(p);
        } else if (all || t >= p->until || has_news(s, p->c->tenant, p->ids, p->n)) {
            *pp = p->next;
            step_reply(s, p->c, p->ids, p->n);
            free(p->ids);
            free(p);
        } else {
            pp = &p->next;
        }
    }
    /* forget results nobody collected within --result-ttl (oldest first: O(1) when none is due) */
    for (srv_reg_entry *e; (e = srv__reg_oldest_done_before(s->reg, t - s->cfg.result_ttl_s));) {
        srv__reg_remove(s->reg, e);
        srv__rec_free((rec *)e);
    }
    int left = s->parked != NULL;
    pthread_mutex_unlock(&s->rq_mu);
    return left;
}

void srv__h_cancel(call *c) {
    srv *s = c->s;
    UNPACK(Kvserve__V1__CancelRequest, kvserve__v1__cancel_request__descriptor, c, q);
    pthread_mutex_lock(&s->rq_mu);
    rec *r = srv__rec_find(s, q->id, c->tenant);
    int known = r && !r->comp;
    pthread_mutex_unlock(&s->rq_mu);
    int rc = known ? eng_cancel(s->eng, q->id) : ENG_ENOTFOUND;
    if (rc) srv__finish_errorf(c, GRPC_STATUS_NOT_FOUND, "id: request %llu is unknown or already finished",
                          (unsigned long long)q->id);
    else {
        Kvserve__V1__CancelReply rep = KVSERVE__V1__CANCEL_REPLY__INIT;
        srv__finish_call(c, GRPC_STATUS_OK, NULL, &rep.base);
    }
    kvserve__v1__cancel_request__free_unpacked(q, NULL);
}

void srv__h_stats(call *c) {
    eng_stats st;
    eng_stats_get(c->s->eng, &st);
    Kvserve__V1__StatsReply rep = KVSERVE__V1__STATS_REPLY__INIT;
    rep.blocks_total = st.blocks_total;
    rep.blocks_free = st.blocks_free;
    rep.blocks_used = st.blocks_used;
    rep.blocks_shared = st.blocks_shared;
    rep.blocks_cached = st.blocks_cached;
    rep.block_tokens = st.block_tokens;
    rep.running = st.running;
    rep.waiting = st.waiting;
    rep.agents = st.agents;
    rep.prefix_hit_tokens = st.prefix_hit_tokens;
    rep.preemptions = st.preemptions;
    srv__finish_call(c, GRPC_STATUS_OK, NULL, &rep.base);
}
