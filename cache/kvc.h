/* kvc.h — kvserve's caches on Redis (hiredis). Every redis* call of the
 * project lives in cache/. The caches know nothing of gRPC or the model's
 * internals; keys are built from what the caller gives them.
 *
 * Fail-open: when Redis is down or slow, lookups are misses, writes are
 * dropped and counted as errors, and callers carry on. After
 * `breaker_failures` consecutive failures the circuit opens and Redis is not
 * tried for `breaker_open_ms` (a dead Redis costs no latency); then one
 * request probes it and, if it answers, the circuit closes again.
 *
 * Thread-safety: every function may be called from any thread.
 */
#ifndef KVSERVE_KVC_H
#define KVSERVE_KVC_H

#include <stddef.h>
#include <stdint.h>

enum {
    KVC_OK = 0,
    KVC_MISS = 1,       /* not an error: nothing cached */
    KVC_EINVAL = -1,    /* bad argument (e.g. URL) */
    KVC_EREDIS = -2,    /* Redis failed or the circuit is open: treated as a miss */
    KVC_ENOMEM = -3,
    KVC_ECORRUPT = -4,  /* a cached value that does not decode (treated as a miss) */
};
const char *kvc_strerror(int code);

/* ---- Redis connection --------------------------------------------------- */
typedef struct kvc_redis kvc_redis;

typedef struct kvc_redis_options {
    const char *url;            /* redis://[user:password@]host:port[/db] or unix:///path[?db=N] */
    int connect_timeout_ms;     /* 0 = 200 */
    int command_timeout_ms;     /* 0 = 200 */
    int pool_size;              /* connections (0 = 4) */
    int breaker_failures;       /* consecutive failures that open the circuit (0 = 3) */
    int breaker_open_ms;        /* how long it stays open (0 = 1000) */
    /* Told, once per change, what is wrong with Redis in its own words ("Connection refused",
     * "WRONGPASS invalid username-password pair", "WRONGTYPE ...") and when it works again
     * (msg "ok"). Called without the pool's lock, from the thread of the command. NULL: silent. */
    void (*on_problem)(void *ud, const char *msg);
    void *on_problem_ud;
} kvc_redis_options;

/* Parse the URL and prepare the pool. Connections are made lazily, so a
 * Redis that is down at start is not an error (fail-open). */
int kvc_redis_open(kvc_redis **out, const kvc_redis_options *o, char *err, size_t errlen);
void kvc_redis_close(kvc_redis *r);

typedef struct kvc_redis_stats {
    /* errors: commands that failed, link failures (which count towards the circuit breaker) and error
     * replies (which do not: Redis answered) alike; skipped: refused while open */
    uint64_t commands, errors, reconnects, breaker_opens, skipped;
    int breaker_open;
} kvc_redis_stats;
void kvc_redis_stats_get(kvc_redis *r, kvc_redis_stats *s);

/* ---- prompt cache --------------------------------------------------------- */
typedef struct kvc_prompt kvc_prompt;

/* Everything that decides a completion. The key is SHA-256 of a canonical,
 * length-prefixed encoding of all of it plus the namespace's generation. */
typedef struct kvc_prompt_key {
    uint64_t model_fingerprint;
    const char *tenant;
    const char *ns;
    const int32_t *ids;         /* the whole context (agent history + prompt) */
    size_t n_ids;
    int max_tokens;
    float temperature, top_p, min_p, repeat_penalty;
    int top_k, repeat_last_n, ignore_eos;
    uint64_t seed;
    const char *const *stop;
    int n_stop;
    /* Set by a lookup: the namespace generation the key was resolved in. A
     * later put of the same key writes into that generation, so an
     * invalidation between lookup and write is never undone. (A copy of the
     * key given another tenant or namespace reads that one's generation.) */
    int gen_known;
    uint64_t gen;
    char gen_ns[17];            /* the (tenant, namespace) id gen belongs to */
} kvc_prompt_key;

typedef struct kvc_completion {
    char *text;                 /* malloc'd by kvc_prompt_get */
    size_t text_len;
    int32_t *tokens;            /* malloc'd by kvc_prompt_get */
    size_t n_tokens;
    int finish;                 /* the engine's finish reason */
    int prompt_tokens, cached_tokens, generated_tokens;
} kvc_completion;
void kvc_completion_free(kvc_completion *c);

typedef struct kvc_prompt_options {
    const char *prefix;         /* Redis key prefix (0 = "kvs") */
    int default_ttl_s;          /* 0 = 86400 */
} kvc_prompt_options;

int kvc_prompt_open(kvc_prompt **out, kvc_redis *r, const kvc_prompt_options *o);
void kvc_prompt_close(kvc_prompt *p);

/* A digest of everything in the key (not the namespace generation): names
 * identical requests in flight, for single-flight. 64 hex digits + NUL. */
void kvc_prompt_key_digest(const kvc_prompt_key *k, char out[65]);

/* KVC_OK (hit, *c filled), KVC_MISS, or an error (count it; treat as a miss). */
int kvc_prompt_get(kvc_prompt *p, kvc_prompt_key *k, kvc_completion *c);
/* n lookups in two pipelined round trips (generations, then values):
 * rc[i] and c[i] as kvc_prompt_get gives them. */
void kvc_prompt_get_many(kvc_prompt *p, kvc_prompt_key *const *k, size_t n, kvc_completion *c, int *rc);
/* Store with a TTL (seconds; 0 = default), value and expiry set atomically. */
int kvc_prompt_put(kvc_prompt *p, const kvc_prompt_key *k, const kvc_completion *c, int ttl_s);
/* Drop a whole namespace of a tenant: O(1), bumps the namespace's
 * generation so old keys are never read again (they expire by TTL). *gen
 * gets the new generation. */
int kvc_prompt_invalidate(kvc_prompt *p, const char *tenant, const char *ns, uint64_t *gen);
/* Delete up to `max` keys of superseded generations of (tenant, ns) with
 * SCAN + UNLINK in batches; *deleted counts them. */
int kvc_prompt_purge(kvc_prompt *p, const char *tenant, const char *ns, int max, int *deleted);

typedef struct kvc_prompt_stats {
    uint64_t hits, misses, writes, invalidations, errors;
} kvc_prompt_stats;
void kvc_prompt_stats_get(kvc_prompt *p, kvc_prompt_stats *s);

/* ---- RAG query cache ------------------------------------------------------- *
 * Entries are grouped by (tenant, namespace, embedding model, top_k). Lookup
 * tries the exact query text first, then cosine similarity of the query's
 * embedding against the group's stored embeddings (an in-process matrix of
 * normalised vectors, scanned on threads). Redis is the source of truth: each store
 * bumps the group's version, and a lookup that sees a new version reloads the
 * group's vectors; entries that expired in Redis are dropped when met. */
typedef struct kvc_rag kvc_rag;

typedef struct kvc_rag_options {
    const char *prefix;         /* Redis key prefix (0 = "kvs") */
    int default_ttl_s;          /* 0 = 3600 */
} kvc_rag_options;

typedef struct kvc_rag_query {
    const char *tenant, *ns, *model;
    int top_k;
    const char *query;          /* the query text */
    size_t query_len;
    const float *embedding;
    int dim;
} kvc_rag_query;

int kvc_rag_open(kvc_rag **out, kvc_redis *r, const kvc_rag_options *o);
void kvc_rag_close(kvc_rag *g);
/* 1 if the embedding can be compared: 1..65536 finite values, not all zero. */
int kvc_rag_embedding_ok(const float *v, int dim);
/* Store the caller's retrieval result for the query (value and TTL atomic).
 * KVC_EINVAL if the embedding is not usable (kvc_rag_embedding_ok) or its
 * dimension differs from the group's. */
int kvc_rag_store(kvc_rag *g, const kvc_rag_query *q, const uint8_t *result, size_t len, int ttl_s);
/* KVC_OK with *result (malloc'd), *similarity (never NaN) and *exact;
 * KVC_MISS; KVC_EINVAL on an unusable embedding or a dimension mismatch;
 * other errors count as misses. */
int kvc_rag_lookup(kvc_rag *g, const kvc_rag_query *q, float threshold, uint8_t **result, size_t *len,
                   float *similarity, int *exact);

typedef struct kvc_rag_stats {
    uint64_t hits, exact_hits, misses, writes, errors, reloads;
} kvc_rag_stats;
void kvc_rag_stats_get(kvc_rag *g, kvc_rag_stats *s);

/* ---- agents' warm tier -------------------------------------------------------- *
 * One value per (model, tenant, agent): the caller's sealed export of the
 * agent, with a TTL. Large values: give this store a connection pool of its
 * own with a command timeout that fits them. */
typedef struct kvc_agents kvc_agents;

typedef struct kvc_agents_options {
    const char *prefix;         /* Redis key prefix (0 = "kvs") */
    int default_ttl_s;          /* 0 = 86400 */
} kvc_agents_options;

int kvc_agents_open(kvc_agents **out, kvc_redis *r, const kvc_agents_options *o);
void kvc_agents_close(kvc_agents *a);
/* Store (replacing what was there), value and expiry set atomically. */
int kvc_agents_put(kvc_agents *a, uint64_t model_fingerprint, const char *tenant, const char *agent_id,
                   const uint8_t *v, size_t len, int ttl_s);
/* KVC_OK with *v (malloc'd) and *len, KVC_MISS, or an error (a miss to the caller). */
int kvc_agents_get(kvc_agents *a, uint64_t model_fingerprint, const char *tenant, const char *agent_id, uint8_t **v,
                   size_t *len);
/* KVC_OK (deleted), KVC_MISS (there was none) or an error. */
int kvc_agents_del(kvc_agents *a, uint64_t model_fingerprint, const char *tenant, const char *agent_id);

typedef struct kvc_agents_stats {
    uint64_t saves, restores, misses, deletes, errors, bytes_saved, bytes_restored;
} kvc_agents_stats;
void kvc_agents_stats_get(kvc_agents *a, kvc_agents_stats *s);

#endif
