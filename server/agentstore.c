/* agentstore.c — agents' warm tier: their KV in Redis (--agent-save-after).
 *
 * The hot tier is the KV pool; the warm one is Redis, shared by every
 * replica. An agent's export (tokens and KV), sealed with the server's key
 * (agentauth.h) for its tenant, is written:
 *   - when pool pressure is about to free its blocks (the engine hands the
 *     export to spill(), under its lock; the keeper thread writes it);
 *   - when it has been idle --agent-save-after seconds (the keeper polls);
 *   - at shutdown, after the last step (srv__agents_close).
 * A request naming an agent that holds no KV here (evicted, or never seen by
 * this replica) restores it first (srv__agent_fetch), so only the new tokens
 * are prefilled. Fail-open: a Redis that is down, slow or holds nothing means
 * the agent is recomputed from the tokens this replica has (or starts anew
 * on one that has none), never a failed request.
 *
 * Replicas share Redis and must share --export-key (a key made at start
 * verifies only in its own process). The warm tier has its own Redis
 * connections with a longer timeout: an agent is megabytes. */
#include "internal.h"

#define SPILL_MAX_BYTES ((size_t)512 << 20) /* exports waiting for the keeper; beyond, spills are dropped */
#define RETRY_S 5.0                          /* a failed save of an unchanged agent is tried again after this */

typedef struct spill {
    char tenant[256], id[256];
    uint64_t version;
    uint8_t *blob;
    size_t len;
    struct spill *next;
} spill;

/* Seal and write one export; mark the engine's agent saved. Consumes blob. */
static int save(srv *s, const char *tenant, const char *id, uint64_t version, uint8_t *blob, size_t len) {
    uint64_t fp = eng_model_fingerprint(s->model);
    int rc = srv__agent_seal(&s->akey, fp, tenant, &blob, &len) ? KVC_ENOMEM
             : kvc_agents_put(s->astore, fp, tenant, id, blob, len, s->cfg.agent_ttl_s);
    free(blob);
    if (rc == KVC_OK) eng_agent_mark_saved(s->eng, tenant, id, version);
    return rc;
}

/* The engine's spill callback (its lock held): queue the export. */
static void on_spill(void *ud, const char *tenant, const char *agent_id, uint64_t version, uint8_t *blob, size_t len) {
    srv *s = ud;
    spill *p = calloc(1, sizeof *p);
    pthread_mutex_lock(&s->keep_mu);
    if (!p || s->spill_bytes + len > SPILL_MAX_BYTES) {
        s->spills_dropped++;
        pthread_mutex_unlock(&s->keep_mu);
        free(p);
        free(blob);
        return;
    }
    snprintf(p->tenant, sizeof p->tenant, "%s", tenant);
    snprintf(p->id, sizeof p->id, "%s", agent_id);
    p->version = version;
    p->blob = blob;
    p->len = len;
    if (s->spills_tail) s->spills_tail->next = p;
    else s->spills = p;
    s->spills_tail = p;
    s->spill_bytes += len;
    pthread_cond_signal(&s->keep_cv);
    pthread_mutex_unlock(&s->keep_mu);
}

/* Save idle agents over the threshold: at most `max`, stopping at the first
 * Redis failure. Returns how many were saved. */
static int save_idle(srv *s, double min_idle, int max, int *failed) {
    char tenant[256], id[256];
    uint8_t *buf;
    size_t len;
    uint64_t version;
    int n = 0;
    while (n < max && eng_agent_save_next(s->eng, min_idle, RETRY_S, tenant, id, &buf, &len, &version)) {
        if (save(s, tenant, id, version, buf, len) != KVC_OK) {
            (*failed)++;
            break;
        }
        n++;
    }
    return n;
}

static void *keeper_loop(void *p) {
    srv *s = p;
    double after = s->cfg.agent_save_after_s;
    long tick_ms = after < 0.2 ? 50 : after > 4 ? 1000 : (long)(after * 250); /* a quarter of the idle time */
    for (;;) {
        pthread_mutex_lock(&s->keep_mu);
        if (!s->spills && !s->keeper_stop) {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_nsec += tick_ms * 1000000L;
            ts.tv_sec += ts.tv_nsec / 1000000000L;
            ts.tv_nsec %= 1000000000L;
            pthread_cond_timedwait(&s->keep_cv, &s->keep_mu, &ts);
        }
        spill *list = s->spills;
        s->spills = s->spills_tail = NULL;
        s->spill_bytes = 0;
        int stop = s->keeper_stop;
        pthread_mutex_unlock(&s->keep_mu);
        for (spill *n; list; list = n) {
            n = list->next;
            save(s, list->tenant, list->id, list->version, list->blob, list->len);
            free(list);
        }
        if (stop) break;
        int failed = 0;
        save_idle(s, after, 64, &failed);
    }
    return NULL;
}

int srv__agents_open(srv *s, char *err, size_t errlen) {
    if (s->cfg.agent_save_after_s < 0 || !s->cfg.redis_url) return 0;
    int t = s->cfg.redis_timeout_ms > 0 ? s->cfg.redis_timeout_ms : 200;
    kvc_redis_options ro = {.url = s->cfg.redis_url, .connect_timeout_ms = t,
                            .command_timeout_ms = t * 10 > 5000 ? t * 10 : 5000, .pool_size = 2};
    pthread_mutex_init(&s->keep_mu, NULL);
    pthread_cond_init(&s->keep_cv, NULL);
    s->has_keep_mu = 1;
    if (kvc_redis_open(&s->aredis, &ro, err, errlen) != KVC_OK) return -1;
    kvc_agents_options ao = {.default_ttl_s = s->cfg.agent_ttl_s};
    if (kvc_agents_open(&s->astore, s->aredis, &ao) != KVC_OK) {
        snprintf(err, errlen, "out of memory opening the agent store");
        return -1;
    }
    if (pthread_create(&s->keeper, NULL, keeper_loop, s) != 0) {
        snprintf(err, errlen, "cannot start the agent keeper thread: %s", strerror(errno));
        return -1;
    }
    s->has_keeper = 1;
    eng_engine_set_spill(s->eng, on_spill, s);
    if (s->akey.generated)
        LOG_WARN("--agent-save-after without --export-key: agents saved to Redis restore only into this process "
                 "(give every replica the same key file)");
    LOG_INFO("agents: kept in Redis too (after %.3g s idle, on eviction and at shutdown; TTL %d s)",
             s->cfg.agent_save_after_s, s->cfg.agent_ttl_s > 0 ? s->cfg.agent_ttl_s : 86400);
    return 0;
}

/* After the last engine step: write what was spilled, then every agent not
 * yet saved; stop the keeper; close. */
void srv__agents_close(srv *s) {
    if (s->has_keeper) {
        pthread_mutex_lock(&s->keep_mu);
        s->keeper_stop = 1;
        pthread_cond_signal(&s->keep_cv);
        pthread_mutex_unlock(&s->keep_mu);
        pthread_join(s->keeper, NULL);
        s->has_keeper = 0;
        if (s->eng) {
            eng_stats st;
            eng_stats_get(s->eng, &st);
            int failed = 0, n = save_idle(s, 0, st.agents, &failed);
            if (n || failed)
                LOG_INFO("agents: %d saved to Redis at shutdown%s", n, failed ? " (Redis failed: the rest are lost)" : "");
        }
    }
    if (s->eng) eng_engine_set_spill(s->eng, NULL, NULL);
    for (spill *p = s->spills, *n; p; p = n) { /* (none: the keeper took them) */
        n = p->next;
        free(p->blob);
        free(p);
    }
    s->spills = NULL;
    kvc_agents_close(s->astore);
    s->astore = NULL;
    kvc_redis_close(s->aredis);
    s->aredis = NULL;
    if (s->has_keep_mu) {
        pthread_mutex_destroy(&s->keep_mu);
        pthread_cond_destroy(&s->keep_cv);
        s->has_keep_mu = 0;
    }
}

/* Before a turn of agent `id` (a worker thread): if the agent holds no KV
 * here, bring it back from Redis. Failures are logged and counted, never
 * the request's. */
void srv__agent_fetch(srv *s, const char *tenant, const char *id, int reset) {
    if (!s->astore || !id || !id[0] || reset) return;
    eng_agent_info info;
    if (eng_agent_get(s->eng, tenant, id, &info) == ENG_OK && (info.busy || info.n_blocks > 0 || !info.n_tokens))
        return; /* hot (or running, or empty) */
    double t0 = srv__now_s();
    uint8_t *buf;
    size_t len, n;
    uint64_t fp = eng_model_fingerprint(s->model);
    if (kvc_agents_get(s->astore, fp, tenant, id, &buf, &len) != KVC_OK) return;
    char err[256];
    int rc = ENG_ECORRUPT;
    if (srv__agent_verify(&s->akey, fp, tenant, buf, len, &n))
        snprintf(err, sizeof err, "its signature does not verify (is --export-key the same on every replica?)");
    else rc = eng_agent_restore(s->eng, tenant, id, buf, n, err, sizeof err);
    free(buf);
    if (rc == ENG_OK) srv_metrics_agent_restore(s->metrics, srv__now_s() - t0);
    else if (rc != ENG_EEXIST && rc != ENG_EBUSY) {
        pthread_mutex_lock(&s->keep_mu);
        s->restore_errors++;
        pthread_mutex_unlock(&s->keep_mu);
        LOG_WARN("agent \"%s\": not restored from Redis: %s (it is recomputed)", id, err);
    }
}

/* DropAgent: forget it in Redis too, or it would come back. */
int srv__agent_forget(srv *s, const char *tenant, const char *id) {
    if (!s->astore) return KVC_MISS;
    return kvc_agents_del(s->astore, eng_model_fingerprint(s->model), tenant, id);
}

void srv__agents_metrics(srv *s, srv_metrics_snapshot *m) {
    if (!s->astore) return;
    kvc_agents_stats st;
    kvc_agents_stats_get(s->astore, &st);
    m->agent_store_enabled = 1;
    m->agent_saves = st.saves;
    m->agent_restores = st.restores;
    m->agent_misses = st.misses;
    m->agent_bytes_saved = st.bytes_saved;
    m->agent_bytes_restored = st.bytes_restored;
    pthread_mutex_lock(&s->keep_mu);
    m->agent_errors = st.errors + s->restore_errors;
    m->agent_spills_dropped = s->spills_dropped;
    pthread_mutex_unlock(&s->keep_mu);
}
