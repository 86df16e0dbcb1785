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

/* A value of many megabytes read in one GET goes through hiredis's growing
 * reader buffer, its reply string and a copy of ours: several times its
 * size in fresh pages, which cost more than the bytes (bench/
 * agent_store_bench.sh). So: STRLEN, one buffer, and GETRANGE in chunks the
 * allocator reuses. A value replaced between chunks reads torn; the caller's
 * seal check catches that (it is then a miss). */
#define GET_CHUNK ((size_t)4 << 20)

static redisReply *cmd3(kvc_agents *a, const char *c0, const char *key, const char *x, const char *y) {
    const char *argv[] = {c0, key, x, y};
    size_t lens[] = {strlen(c0), strlen(key), x ? strlen(x) : 0, y ? strlen(y) : 0};
    return kvc__command_argv(a->r, x ? 4 : 2, argv, lens);
}

int kvc_agents_get(kvc_agents *a, uint64_t fp, const char *tenant, const char *id, uint8_t **v, size_t *len) {
    char key[160];
    key_of(a, fp, tenant, id, key);
    *v = NULL;
    *len = 0;
    redisReply *rep = cmd3(a, "STRLEN", key, NULL, NULL);
    if (!rep) {
        count(a, &a->st.errors, NULL, 0);
        return KVC_EREDIS;
    }
    long long n = rep->type == REDIS_REPLY_INTEGER ? rep->integer : -1;
    freeReplyObject(rep);
    if (n <= 0) {
        count(a, n == 0 ? &a->st.misses : &a->st.errors, NULL, 0);
        return n == 0 ? KVC_MISS : KVC_ECORRUPT;
    }
    uint8_t *buf = malloc((size_t)n);
    if (!buf) {
        count(a, &a->st.errors, NULL, 0);
        return KVC_ENOMEM;
    }
    int rc = KVC_OK;
    for (size_t off = 0; off < (size_t)n && rc == KVC_OK; off += GET_CHUNK) {
        size_t want = (size_t)n - off < GET_CHUNK ? (size_t)n - off : GET_CHUNK;
        char from[32], to[32];
        snprintf(from, sizeof from, "%zu", off);
        snprintf(to, sizeof to, "%zu", off + want - 1);
        if (!(rep = cmd3(a, "GETRANGE", key, from, to))) rc = KVC_EREDIS;
        else {
            if (rep->type != REDIS_REPLY_STRING || rep->len != want) rc = want && rep->len == 0 ? KVC_MISS : KVC_ECORRUPT;
            else memcpy(buf + off, rep->str, want);
            freeReplyObject(rep);
        }
    }
    if (rc != KVC_OK) {
        free(buf);
        count(a, rc == KVC_MISS ? &a->st.misses : &a->st.errors, NULL, 0); /* (expired or replaced meanwhile) */
        return rc;
    }
    *v = buf;
    *len = (size_t)n;
    count(a, &a->st.restores, &a->st.bytes_restored, *len);
    return KVC_OK;
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
