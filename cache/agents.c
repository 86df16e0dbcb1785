/* agents.c — the warm tier of agents: each agent's export (tokens and KV,
 * sealed by the server) under one key with a TTL, so that an agent evicted,
 * idle or left behind by a stopped replica can be restored on any replica.
 *
 * Key: PREFIX:a:HASH, HASH the SHA-256 of (model fingerprint, tenant, agent
 * id): ids of any bytes make well-formed keys, and one model's agents never
 * meet another's. The value is opaque here. */
#include "kvc_internal.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct kvc_agents {
    kvc_redis *r;
    char prefix[64];
    int ttl;
    pthread_mutex_t mu;
    kvc_agents_stats st;
};

int kvc_agents_open(kvc_agents **out, kvc_redis *r, const kvc_agents_options *o) {
    kvc_agents *a = calloc(1, sizeof *a);
    if (!a) return KVC_ENOMEM;
    a->r = r;
    snprintf(a->prefix, sizeof a->prefix, "%s", o && o->prefix ? o->prefix : "kvs");
    a->ttl = o && o->default_ttl_s > 0 ? o->default_ttl_s : 86400;
    pthread_mutex_init(&a->mu, NULL);
    *out = a;
    return KVC_OK;
}

void kvc_agents_close(kvc_agents *a) {
    if (!a) return;
    pthread_mutex_destroy(&a->mu);
    free(a);
}

void kvc_agents_stats_get(kvc_agents *a, kvc_agents_stats *s) {
    pthread_mutex_lock(&a->mu);
    *s = a->st;
    pthread_mutex_unlock(&a->mu);
}

static void count(kvc_agents *a, uint64_t *field, uint64_t *bytes, size_t n) {
    pthread_mutex_lock(&a->mu);
    (*field)++;
    if (bytes) *bytes += n;
    pthread_mutex_unlock(&a->mu);
}

static void key_of(const kvc_agents *a, uint64_t fp, const char *tenant, const char *id, char out[160]) {
    char hex[65];
    kvc__hash *h = kvc__hash_begin("kvserve-agent-v1");
    if (h) {
        kvc__hash_u64(h, fp);
        kvc__hash_str(h, tenant ? tenant : "");
        kvc__hash_str(h, id);
    }
    kvc__hash_hex(h, hex, 32);
    snprintf(out, 160, "%s:a:%s", a->prefix, hex);
}

int kvc_agents_put(kvc_agents *a, uint64_t fp, const char *tenant, const char *id, const uint8_t *v, size_t len,
                   int ttl_s) {
    char key[160], ttl[32];
    key_of(a, fp, tenant, id, key);
    snprintf(ttl, sizeof ttl, "%d", ttl_s > 0 ? ttl_s : a->ttl);
    const char *argv[] = {"SET", key, (const char *)v, "EX", ttl};
    size_t lens[] = {3, strlen(key), len, 2, strlen(ttl)};
    redisReply *rep = kvc__command_argv(a->r, 5, argv, lens);
    if (!rep) {
        count(a, &a->st.errors, NULL, 0);
        return KVC_EREDIS;
    }
    freeReplyObject(rep);
    count(a, &a->st.saves, &a->st.bytes_saved, len);
    return KVC_OK;
}

int kvc_agents_get(kvc_agents *a, uint64_t fp, const char *tenant, const char *id, uint8_t **v, size_t *len) {
    char key[160];
    key_of(a, fp, tenant, id, key);
    *v = NULL;
    *len = 0;
    const char *argv[] = {"GET", key};
    size_t lens[] = {3, strlen(key)};
    redisReply *rep = kvc__command_argv(a->r, 2, argv, lens);
    if (!rep) {
        count(a, &a->st.errors, NULL, 0);
        return KVC_EREDIS;
    }
    int rc = KVC_MISS;
    if (rep->type == REDIS_REPLY_STRING && rep->len > 0) {
        if (!(*v = malloc(rep->len))) rc = KVC_ENOMEM;
        else {
            memcpy(*v, rep->str, rep->len);
            *len = rep->len;
            rc = KVC_OK;
        }
    } else if (rep->type != REDIS_REPLY_NIL) rc = KVC_ECORRUPT;
    freeReplyObject(rep);
    if (rc == KVC_OK) count(a, &a->st.restores, &a->st.bytes_restored, *len);
    else if (rc == KVC_MISS) count(a, &a->st.misses, NULL, 0);
    else count(a, &a->st.errors, NULL, 0);
    return rc;
}

int kvc_agents_del(kvc_agents *a, uint64_t fp, const char *tenant, const char *id) {
    char key[160];
    key_of(a, fp, tenant, id, key);
    const char *argv[] = {"UNLINK", key};
    size_t lens[] = {6, strlen(key)};
    redisReply *rep = kvc__command_argv(a->r, 2, argv, lens);
    if (!rep) {
        count(a, &a->st.errors, NULL, 0);
        return KVC_EREDIS;
    }
    int rc = rep->type == REDIS_REPLY_INTEGER && rep->integer > 0 ? KVC_OK : KVC_MISS;
    freeReplyObject(rep);
    if (rc == KVC_OK) count(a, &a->st.deletes, NULL, 0);
    return rc;
}
