/* dispatch.c — the method table, new calls, the completion-queue threads */
#include "internal.h"

const method srv__methods[] = {
    {"/kvserve.v1.Generation/Submit", K_UNARY, srv__h_submit, 1, 1, 0, POOL_GENERATE},
    {"/kvserve.v1.Generation/Step", K_UNARY, srv__h_step, 1, 1, 1, POOL_NONE},
    {"/kvserve.v1.Generation/Stream", K_SSTREAM, srv__h_stream, 1, 1, 0, POOL_GENERATE},
    {"/kvserve.v1.Generation/Cancel", K_UNARY, srv__h_cancel, 1, 1, 1, POOL_NONE},
    {"/kvserve.v1.Generation/Stats", K_UNARY, srv__h_stats, 1, 1, 0, POOL_NONE},
    {"/kvserve.v1.Generation/Score", K_UNARY, srv__h_score, 1, 1, 0, POOL_GENERATE},
    {"/kvserve.v1.Agents/GetAgent", K_UNARY, srv__h_get_agent, 1, 1, 0, POOL_NONE},
    {"/kvserve.v1.Agents/ListAgents", K_UNARY, srv__h_list_agents, 1, 1, 0, POOL_NONE},
    {"/kvserve.v1.Agents/DropAgent", K_UNARY, srv__h_drop_agent, 1, 1, 0, POOL_REDIS}, /* (the warm tier too) */
    {"/kvserve.v1.Agents/ExportAgent", K_UNARY, srv__h_export_agent, 1, 1, 0, POOL_GENERATE},
    {"/kvserve.v1.Agents/ImportAgent", K_UNARY, srv__h_import_agent, 1, 1, 0, POOL_GENERATE},
    {"/kvserve.v1.Cache/Invalidate", K_UNARY, srv__h_invalidate, 1, 1, 0, POOL_REDIS},
    {"/kvserve.v1.Cache/Stats", K_UNARY, srv__h_cache_stats, 1, 1, 0, POOL_REDIS},
    {"/kvserve.v1.Cache/RagStore", K_UNARY, srv__h_rag_store, 1, 0, 0, POOL_REDIS},
    {"/kvserve.v1.Cache/RagLookup", K_UNARY, srv__h_rag_lookup, 1, 0, 0, POOL_REDIS},
    {"/grpc.health.v1.Health/Check", K_UNARY, srv__h_health_check, 0, 0, 0, POOL_NONE},
    {"/grpc.health.v1.Health/Watch", K_SSTREAM, srv__h_health_watch, 0, 0, 0, POOL_NONE},
    {"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", K_BIDI, srv__h_reflection, 1, 0, 0, POOL_NONE},
    {"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", K_BIDI, srv__h_reflection, 1, 0, 0, POOL_NONE},
};
const int srv__n_methods = (int)(sizeof srv__methods / sizeof *srv__methods);

const char *srv__method_name(const call *c) { return c->mi >= 0 ? srv__methods[c->mi].path : "unknown"; }

/* Scrape-time figures for the metrics endpoint. */
void srv__metrics_source(void *ud, srv_metrics_snapshot *m) {
    srv *s = ud;
    if (s->eng) {
        eng_stats st;
        eng_stats_get(s->eng, &st);
        m->blocks_used = st.blocks_used;
        m->blocks_free = st.blocks_free;
        m->blocks_cached = st.blocks_cached;
        m->blocks_shared = st.blocks_shared;
        m->running = st.running;
        m->waiting = st.waiting;
    }
    if (s->pcache) {
        kvc_prompt_stats ps;
        kvc_rag_stats gs;
        kvc_prompt_stats_get(s->pcache, &ps);
        kvc_rag_stats_get(s->rag, &gs);
        m->cache_enabled = 1;
        m->llm = (srv_cache_layer){ps.hits, ps.misses, ps.writes, ps.invalidations, ps.errors};
        m->rag = (srv_cache_layer){gs.hits, gs.misses, gs.writes, 0, gs.errors};
    }
    pthread_mutex_lock(&s->mu);
    m->serving = s->serving;
    if (s->batcher) { /* under srv.mu: shutdown takes it away under it before closing it */
        srv__batcher_stats bs;
        srv__batcher_stats_get(s->batcher, &bs);
        m->batch_rejected = bs.rejected;
        m->batch_expired = bs.expired;
        m->batch_cancelled = bs.removed;
        m->batch_closed = bs.closed;
        m->batch_queued = (int)bs.queued;
    }
    pthread_mutex_unlock(&s->mu);
    pthread_mutex_lock(&s->rq_mu);
    m->singleflight_joined = s->singleflight_joined;
    for (parked *p = s->parked; p; p = p->next) m->steps_parked++;
    m->requests_known = s->reg ? (int)(srv__reg_size(s->reg)) : 0;
    pthread_mutex_unlock(&s->rq_mu);
    pthread_mutex_lock(&s->jobs_mu);
    m->purged_keys = s->purged_keys;
    pthread_mutex_unlock(&s->jobs_mu);
    srv__agents_metrics(s, m);
}


/* A handler on its worker pool: shutdown may have begun while it waited. */
static void run_on_pool(void *p) {
    call *c = p;
    srv *s = c->s;
    const method *m = &srv__methods[c->mi];
    pthread_mutex_lock(&s->mu);
    int down = s->shutting_down;
    pthread_mutex_unlock(&s->mu);
    if (m->needs_model && down && !m->drains) {
        srv__finish_errorf(c, GRPC_STATUS_UNAVAILABLE, "the server is shutting down");
        return;
    }
    m->fn(c);
}

static void on_new_call(call *c, int ok) {
    srv *s = c->s;
    if (!ok) { /* shutting down */
        srv__call_unref(c);
        return;
    }
    srv__request_call(s, c->mi); /* keep one waiting for the next caller */
    c->t_start = srv__now_s();
    if (c->mi < 0) {
        char path[256];
        snprintf(path, sizeof path, "%.*s", (int)GRPC_SLICE_LENGTH(c->details.method),
                 (const char *)GRPC_SLICE_START_PTR(c->details.method));
        srv__finish_errorf(c, GRPC_STATUS_UNIMPLEMENTED, "unknown method %s", path);
        return;
    }
    const method *m = &srv__methods[c->mi];
    if (m->auth && srv__authenticate(c) != 0) {
        srv__finish_errorf(c, GRPC_STATUS_UNAUTHENTICATED, "missing or invalid bearer token");
        return;
    }
    pthread_mutex_lock(&s->mu);
    int ready = s->ready, down = s->shutting_down;
    pthread_mutex_unlock(&s->mu);
    if (m->needs_model && !ready) {
        srv__finish_errorf(c, GRPC_STATUS_UNAVAILABLE, "the model is still loading");
        return;
    }
    if (m->needs_model && down && !m->drains) {
        srv__finish_errorf(c, GRPC_STATUS_UNAVAILABLE, "the server is shutting down");
        return;
    }
    if (m->pool && srv__workers_run(s->pools[m->pool], run_on_pool, c) == 0) return;
    m->fn(c); /* (no pool: here) */
}

void srv__request_call(srv *s, int mi) {
    call *c = srv__call_new(s, mi);
    if (!c) return;
    srv__cq_dispatch(c, on_new_call, &c->t_new);
    grpc_call_error e;
    if (mi < 0)
        e = grpc_server_request_call(s->server, &c->gc, &c->details, &c->md, s->cq, s->cq, &c->t_new);
    else
        e = grpc_server_request_registered_call(s->server, s->rm[mi], &c->gc, &c->deadline, &c->md,
                                                srv__methods[mi].k == K_BIDI ? NULL : &c->payload, s->cq, s->cq, &c->t_new);
    if (e != GRPC_CALL_OK) srv__call_unref(c);
}

void srv__on_shutdown(call *c, int ok) {
    (void)c;
    (void)ok;
}

void *srv__cq_loop(void *p) {
    srv *s = p;
    for (;;) {
        grpc_event ev = grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
        if (ev.type != GRPC_OP_COMPLETE) continue;
        tag *t = ev.tag;
        if (t == &s->t_shutdown) {
            pthread_mutex_lock(&s->mu);
            s->shutdown_done = 1;
            pthread_mutex_unlock(&s->mu);
            continue;
        }
        t->fn(t->c, ev.success);
    }
    return NULL;
}
