/* cache_rpc.c — the Cache service: Invalidate, Stats, RagStore, RagLookup */
#include "internal.h"

void srv__h_invalidate(call *c) {
    UNPACK(Kvserve__V1__InvalidateRequest, kvserve__v1__invalidate_request__descriptor, c, q);
    srv *s = c->s;
    uint64_t gen = 0;
    int purged = 0;
    if (!s->pcache) srv__finish_errorf(c, GRPC_STATUS_FAILED_PRECONDITION, "the cache is not configured (--redis)");
    else if (kvc_prompt_invalidate(s->pcache, c->tenant, q->namespace_, &gen) != KVC_OK)
        srv__finish_errorf(c, GRPC_STATUS_UNAVAILABLE, "Redis is unavailable; the namespace was not invalidated");
    else {
        if (q->purge) { /* now, counted in the reply */
            kvc_prompt_purge(s->pcache, c->tenant, q->namespace_, 1 << 30, &purged);
            pthread_mutex_lock(&s->jobs_mu);
            s->purged_keys += (uint64_t)purged;
            pthread_mutex_unlock(&s->jobs_mu);
        } else { /* later, on the writer thread */
            cache_job *j = calloc(1, sizeof *j);
            if (j && (j->purge_tenant = strdup(c->tenant)) && (j->purge_ns = strdup(q->namespace_ ? q->namespace_ : ""))) {
                srv__job_push(s, j);
            } else if (j) {
                free(j->purge_tenant);
                free(j);
            }
        }
        Kvserve__V1__InvalidateReply rep = KVSERVE__V1__INVALIDATE_REPLY__INIT;
        rep.generation = gen;
        rep.purged = purged;
        srv__finish_call(c, GRPC_STATUS_OK, NULL, &rep.base);
    }
    kvserve__v1__invalidate_request__free_unpacked(q, NULL);
}

void srv__h_cache_stats(call *c) {
    srv *s = c->s;
    Kvserve__V1__CacheStatsReply rep = KVSERVE__V1__CACHE_STATS_REPLY__INIT;
    Kvserve__V1__CacheLayerStats llm = KVSERVE__V1__CACHE_LAYER_STATS__INIT, rag = KVSERVE__V1__CACHE_LAYER_STATS__INIT;
    rep.llm = &llm;
    rep.rag = &rag;
    if (s->pcache) {
        kvc_prompt_stats ps;
        kvc_redis_stats rs;
        kvc_prompt_stats_get(s->pcache, &ps);
        kvc_redis_stats_get(s->redis, &rs);
        rep.enabled = 1;
        llm.hits = ps.hits;
        llm.misses = ps.misses;
        llm.writes = ps.writes;
        llm.invalidations = ps.invalidations;
        llm.errors = ps.errors;
        llm.hit_rate = ps.hits + ps.misses ? (double)ps.hits / (double)(ps.hits + ps.misses) : 0;
        rep.breaker_open = rs.breaker_open;
        rep.redis_errors = rs.errors;
        rep.redis_reconnects = rs.reconnects;
        kvc_rag_stats gs;
        kvc_rag_stats_get(s->rag, &gs);
        rag.hits = gs.hits;
        rag.misses = gs.misses;
        rag.writes = gs.writes;
        rag.errors = gs.errors;
        rag.hit_rate = gs.hits + gs.misses ? (double)gs.hits / (double)(gs.hits + gs.misses) : 0;
    }
    srv__finish_call(c, GRPC_STATUS_OK, NULL, &rep.base);
}

/* Common checks of a RAG request; 0 when fine (else the call is answered). */
static int rag_check(call *c, const float *emb, size_t dim, int top_k) {
    if (!c->s->rag) {
        srv__finish_errorf(c, GRPC_STATUS_FAILED_PRECONDITION, "the cache is not configured (--redis)");
        return -1;
    }
    if (dim == 0 || dim > 65536) {
        srv__finish_errorf(c, GRPC_STATUS_INVALID_ARGUMENT, "embedding: give 1 to 65536 values (got %zu)", dim);
        return -1;
    }
    if (!kvc_rag_embedding_ok(emb, (int)dim)) {
        size_t bad = 0;
        while (bad < dim && isfinite(emb[bad])) bad++;
        if (bad < dim) srv__finish_errorf(c, GRPC_STATUS_INVALID_ARGUMENT, "embedding: value %zu is not finite", bad);
        else srv__finish_errorf(c, GRPC_STATUS_INVALID_ARGUMENT, "embedding: all values are zero (it has no direction)");
        return -1;
    }
    if (top_k < 0) {
        srv__finish_errorf(c, GRPC_STATUS_INVALID_ARGUMENT, "top_k: must be >= 0");
        return -1;
    }
    return 0;
}

void srv__h_rag_store(call *c) {
    UNPACK(Kvserve__V1__RagStoreRequest, kvserve__v1__rag_store_request__descriptor, c, q);
    if (!rag_check(c, q->embedding, q->n_embedding, q->top_k)) {
        kvc_rag_query rq = {.tenant = c->tenant, .ns = q->namespace_, .model = q->embedding_model, .top_k = q->top_k,
                            .query = q->query, .query_len = strlen(q->query), .embedding = q->embedding,
                            .dim = (int)q->n_embedding};
        int rc = kvc_rag_store(c->s->rag, &rq, q->result.data, q->result.len, (int)q->ttl_seconds);
        if (rc == KVC_EINVAL)
            srv__finish_errorf(c, GRPC_STATUS_INVALID_ARGUMENT,
                          "embedding: dimension %zu does not match the entries stored for this namespace, model and top_k",
                          q->n_embedding);
        else {
            Kvserve__V1__RagStoreReply rep = KVSERVE__V1__RAG_STORE_REPLY__INIT;
            rep.stored = rc == KVC_OK; /* fail-open: a write Redis refused is counted, not an error */
            srv__finish_call(c, GRPC_STATUS_OK, NULL, &rep.base);
        }
    }
    kvserve__v1__rag_store_request__free_unpacked(q, NULL);
}

void srv__h_rag_lookup(call *c) {
    UNPACK(Kvserve__V1__RagLookupRequest, kvserve__v1__rag_lookup_request__descriptor, c, q);
    if (!(q->threshold >= 0 && q->threshold <= 1)) {
        srv__finish_errorf(c, GRPC_STATUS_INVALID_ARGUMENT, "threshold: must be in [0, 1]");
    } else if (!rag_check(c, q->embedding, q->n_embedding, q->top_k)) {
        kvc_rag_query rq = {.tenant = c->tenant, .ns = q->namespace_, .model = q->embedding_model, .top_k = q->top_k,
                            .query = q->query, .query_len = strlen(q->query), .embedding = q->embedding,
                            .dim = (int)q->n_embedding};
        uint8_t *res = NULL;
        size_t len = 0;
        float sim = 0;
        int exact = 0;
        int rc = kvc_rag_lookup(c->s->rag, &rq, q->threshold > 0 ? q->threshold : 0.95f, &res, &len, &sim, &exact);
        if (rc == KVC_EINVAL)
            srv__finish_errorf(c, GRPC_STATUS_INVALID_ARGUMENT,
                          "embedding: dimension %zu does not match the entries stored for this namespace, model and top_k",
                          q->n_embedding);
        else {
            Kvserve__V1__RagLookupReply rep = KVSERVE__V1__RAG_LOOKUP_REPLY__INIT;
            rep.hit = rc == KVC_OK; /* errors are misses (fail-open) */
            if (rep.hit) {
                rep.result.data = res;
                rep.result.len = len;
                rep.similarity = sim;
                rep.exact = exact;
            }
            srv__finish_call(c, GRPC_STATUS_OK, NULL, &rep.base);
        }
        free(res);
    }
    kvserve__v1__rag_lookup_request__free_unpacked(q, NULL);
}
