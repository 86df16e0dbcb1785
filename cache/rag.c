/* rag.c — the RAG query cache: exact hash, then cosine similarity.
 *
 * Redis layout (G = 16 hex digits naming tenant, namespace, model, top_k;
 * Q = SHA-256 of the query text):
 *   PREFIX:r:G:Q   string: u32 dim | f32 normalised embedding[dim] | result bytes  (SET EX)
 *   PREFIX:rs:G    set of the Q of stored entries (members whose key expired are
 *                  dropped when a reload meets them)
 *   PREFIX:rv:G    the group's version, INCR on every store
 * A process keeps, per group, the matrix of normalised embeddings it loaded
 * and the version it saw; a lookup that finds another version reloads (so
 * other replicas' writes are followed), and a similar entry whose key has
 * expired is dropped from the matrix when it is met. */
#include "kvc_internal.h"


#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct group {
    char id[17];
    int dim;
    int64_t version;       /* -1: never loaded */
    float *m;              /* [n][dim] normalised */
    char (*q)[65];         /* query hash of each row */
    size_t n, cap;
    struct group *next;
} group;

struct kvc_rag {
    kvc_redis *r;
    char prefix[64];
    int ttl;
    pthread_mutex_t mu;
    group *groups;
    kvc_rag_stats st;
};

int kvc_rag_open(kvc_rag **out, kvc_redis *r, const kvc_rag_options *o) {
    kvc_rag *g = calloc(1, sizeof *g);
    if (!g) return KVC_ENOMEM;
    g->r = r;
    snprintf(g->prefix, sizeof g->prefix, "%s", o && o->prefix ? o->prefix : "kvs");
    g->ttl = o && o->default_ttl_s > 0 ? o->default_ttl_s : 3600;
    pthread_mutex_init(&g->mu, NULL);
    *out = g;
    return KVC_OK;
}

void kvc_rag_close(kvc_rag *g) {
    if (!g) return;
    for (group *x = g->groups, *n; x; x = n) {
        n = x->next;
        free(x->m);
        free(x->q);
        free(x);
    }
    pthread_mutex_destroy(&g->mu);
    free(g);
}

void kvc_rag_stats_get(kvc_rag *g, kvc_rag_stats *s) {
    pthread_mutex_lock(&g->mu);
    *s = g->st;
    pthread_mutex_unlock(&g->mu);
}

static void group_id(const kvc_rag_query *q, char out[17]) {
    kvc__hash *h = kvc__hash_begin("kvserve-rag-group-v1");
    if (h) {
        kvc__hash_str(h, q->tenant);
        kvc__hash_str(h, q->ns);
        kvc__hash_str(h, q->model);
        kvc__hash_u64(h, (uint64_t)(int64_t)q->top_k);
    }
    kvc__hash_hex(h, out, 8);
}

static void query_hash(const kvc_rag_query *q, char out[65]) {
    kvc__hash *h = kvc__hash_begin("kvserve-rag-query-v1");
    if (h) kvc__hash_bytes(h, q->query, q->query_len);
    kvc__hash_hex(h, out, 32);
}

/* An embedding has a direction to compare: every value finite, not all zero.
 * (In double, even subnormal values square to a positive norm.) */
int kvc_rag_embedding_ok(const float *v, int dim) {
    double ss = 0;
    for (int i = 0; i < dim; i++) {
        if (!isfinite(v[i])) return 0;
        ss += (double)v[i] * v[i];
    }
    return ss > 0 && isfinite(ss);
}

/* v / |v| (v must pass kvc_rag_embedding_ok): divided in double, so the
 * result is finite whatever the scale of v. */
static float *normalised(const float *v, int dim) {
    float *o = malloc((size_t)dim * sizeof *o);
    if (!o) return NULL;
    double ss = 0;
    for (int i = 0; i < dim; i++) ss += (double)v[i] * v[i];
    double norm = sqrt(ss);
    for (int i = 0; i < dim; i++) o[i] = (float)((double)v[i] / norm);
    return o;
}

static redisReply *cmd(kvc_rag *g, int argc, const char **argv) {
    size_t lens[8];
    for (int i = 0; i < argc; i++) lens[i] = strlen(argv[i]);
    return kvc__command_argv(g->r, argc, argv, lens);
}

static group *find_group(kvc_rag *g, const char *id) {
    for (group *x = g->groups; x; x = x->next)
        if (!strcmp(x->id, id)) return x;
    group *x = calloc(1, sizeof *x);
    if (!x) return NULL;
    memcpy(x->id, id, 17);
    x->version = -1;
    x->next = g->groups;
    g->groups = x;
    return x;
}

static int group_add(group *x, const char *qh, const float *v) {
    if (x->n == x->cap) {
        size_t nc = x->cap ? x->cap * 2 : 64;
        float *nm = realloc(x->m, nc * (size_t)x->dim * sizeof *nm);
        if (nm) x->m = nm;
        char(*nq)[65] = realloc(x->q, nc * sizeof *nq);
        if (nq) x->q = nq;
        if (!nm || !nq) return KVC_ENOMEM;
        x->cap = nc;
    }
    memcpy(x->m + x->n * (size_t)x->dim, v, (size_t)x->dim * sizeof *v);
    memcpy(x->q[x->n], qh, 65);
    x->n++;
    return KVC_OK;
}

static void group_remove(group *x, size_t i) {
    x->n--;
    if (i == x->n) return;
    memcpy(x->m + i * (size_t)x->dim, x->m + x->n * (size_t)x->dim, (size_t)x->dim * sizeof(float));
    memcpy(x->q[i], x->q[x->n], 65);
}

/* Decode "u32 dim | floats | result". */
static int parse_entry(const char *d, size_t n, int *dim, const float **v, const char **res, size_t *rlen) {
    uint32_t dm;
    if (n < 4) return KVC_ECORRUPT;
    memcpy(&dm, d, 4);
    if (dm == 0 || dm > 65536 || n < 4 + (size_t)dm * 4) return KVC_ECORRUPT;
    float probe;
    for (uint32_t i = 0; i < dm; i++) { /* an entry written before embeddings were checked */
        memcpy(&probe, d + 4 + 4 * (size_t)i, 4);
        if (!isfinite(probe)) return KVC_ECORRUPT;
    }
    *dim = (int)dm;
    *v = (const float *)(d + 4);
    *res = d + 4 + (size_t)dm * 4;
    *rlen = n - 4 - (size_t)dm * 4;
    return KVC_OK;
}

/* Reload the group's vectors from Redis if its version moved (g->mu held). */
static int sync_group(kvc_rag *g, group *x) {
    char key[160];
    snprintf(key, sizeof key, "%s:rv:%s", g->prefix, x->id);
    const char *gv[] = {"GET", key};
    redisReply *rep = cmd(g, 2, gv);
    if (!rep) return KVC_EREDIS;
    int64_t ver = rep->type == REDIS_REPLY_STRING ? strtoll(rep->str, NULL, 10) : 0;
    freeReplyObject(rep);
    if (ver == x->version) return KVC_OK;
    g->st.reloads++;
    x->n = 0;
    snprintf(key, sizeof key, "%s:rs:%s", g->prefix, x->id);
    const char *sm[] = {"SMEMBERS", key};
    redisReply *mem = cmd(g, 2, sm);
    if (!mem) return KVC_EREDIS;
    for (size_t i = 0; i < mem->elements; i++) {
        char ek[256];
        snprintf(ek, sizeof ek, "%s:r:%s:%s", g->prefix, x->id, mem->element[i]->str);
        const char *ga[] = {"GET", ek};
        redisReply *e = cmd(g, 2, ga);
        int dim;
        const float *v;
        const char *res;
        size_t rl;
        if (e && e->type == REDIS_REPLY_STRING && parse_entry(e->str, (size_t)e->len, &dim, &v, &res, &rl) == KVC_OK &&
            (x->dim == 0 || x->dim == dim) && strlen(mem->element[i]->str) == 64) {
            x->dim = dim;
            group_add(x, mem->element[i]->str, v);
        } else if (e && e->type == REDIS_REPLY_NIL) { /* expired: forget the member */
            const char *sr[] = {"SREM", key, mem->element[i]->str};
            redisReply *d = cmd(g, 3, sr);
            if (d) freeReplyObject(d);
        }
        if (e) freeReplyObject(e);
    }
    freeReplyObject(mem);
    x->version = ver;
    return KVC_OK;
}

int kvc_rag_store(kvc_rag *g, const kvc_rag_query *q, const uint8_t *result, size_t len, int ttl_s) {
    if (!q->embedding || q->dim <= 0 || q->dim > 65536 || !kvc_rag_embedding_ok(q->embedding, q->dim)) return KVC_EINVAL;
    char gid[17], qh[65], key[256], skey[160], vkey[160], ttl[32];
    group_id(q, gid);
    query_hash(q, qh);
    pthread_mutex_lock(&g->mu);
    group *x = find_group(g, gid);
    int rc = x ? sync_group(g, x) : KVC_ENOMEM;
    if (rc == KVC_OK && x->dim && x->dim != q->dim) rc = KVC_EINVAL;
    float *v = rc == KVC_OK ? normalised(q->embedding, q->dim) : NULL;
    uint8_t *val = v ? malloc(4 + (size_t)q->dim * 4 + len) : NULL;
    if (rc == KVC_OK && !val) rc = KVC_ENOMEM;
    if (rc == KVC_OK) {
        uint32_t dm = (uint32_t)q->dim;
        memcpy(val, &dm, 4);
        memcpy(val + 4, v, (size_t)q->dim * 4);
        if (len) memcpy(val + 4 + (size_t)q->dim * 4, result, len);
        snprintf(key, sizeof key, "%s:r:%s:%s", g->prefix, gid, qh);
        snprintf(skey, sizeof skey, "%s:rs:%s", g->prefix, gid);
        snprintf(vkey, sizeof vkey, "%s:rv:%s", g->prefix, gid);
        snprintf(ttl, sizeof ttl, "%d", ttl_s > 0 ? ttl_s : g->ttl);
        const char *sa[] = {"SET", key, (const char *)val, "EX", ttl};
        size_t sl[] = {3, strlen(key), 4 + (size_t)q->dim * 4 + len, 2, strlen(ttl)};
        redisReply *rep = kvc__command_argv(g->r, 5, sa, sl);
        const char *ad[] = {"SADD", skey, qh};
        redisReply *r2 = rep ? cmd(g, 3, ad) : NULL;
        const char *in[] = {"INCR", vkey};
        redisReply *r3 = r2 ? cmd(g, 2, in) : NULL;
        if (!r3) rc = KVC_EREDIS;
        else if (x->version >= 0 && r3->integer == x->version + 1) { /* nobody else wrote: extend in place */
            x->dim = q->dim;
            int found = 0;
            for (size_t i = 0; i < x->n && !found; i++) found = !strcmp(x->q[i], qh);
            if (!found) group_add(x, qh, v);
            x->version = r3->integer;
        }
        if (rep) freeReplyObject(rep);
        if (r2) freeReplyObject(r2);
        if (r3) freeReplyObject(r3);
    }
    if (rc == KVC_OK) g->st.writes++;
    else if (rc != KVC_EINVAL) g->st.errors++;
    pthread_mutex_unlock(&g->mu);
    free(v);
    free(val);
    return rc;
}

/* Fetch an entry's result; KVC_MISS if it expired, KVC_EINVAL if it was
 * stored with another dimension. */
static int fetch(kvc_rag *g, const char *gid, const char *qh, int want_dim, uint8_t **result, size_t *len) {
    char key[256];
    snprintf(key, sizeof key, "%s:r:%s:%s", g->prefix, gid, qh);
    const char *ga[] = {"GET", key};
    redisReply *e = cmd(g, 2, ga);
    if (!e) return KVC_EREDIS;
    int rc = KVC_MISS, dim;
    const float *v;
    const char *res;
    size_t rl;
    if (e->type == REDIS_REPLY_STRING) {
        rc = parse_entry(e->str, (size_t)e->len, &dim, &v, &res, &rl);
        if (rc == KVC_OK && dim != want_dim) rc = KVC_EINVAL;
        if (rc == KVC_OK) {
            *result = malloc(rl ? rl : 1);
            if (!*result) rc = KVC_ENOMEM;
            else {
                memcpy(*result, res, rl);
                *len = rl;
            }
        }
    }
    freeReplyObject(e);
    return rc;
}

int kvc_rag_lookup(kvc_rag *g, const kvc_rag_query *q, float threshold, uint8_t **result, size_t *len,
                   float *similarity, int *exact) {
    *result = NULL;
    *len = 0;
    *similarity = 0;
    *exact = 0;
    if (!q->embedding || q->dim <= 0 || q->dim > 65536 || !kvc_rag_embedding_ok(q->embedding, q->dim)) return KVC_EINVAL;
    char gid[17], qh[65];
    group_id(q, gid);
    query_hash(q, qh);
    pthread_mutex_lock(&g->mu);
    group *x = find_group(g, gid);
    int rc = x ? KVC_OK : KVC_ENOMEM;
    if (rc == KVC_OK) { /* the exact query first */
        rc = fetch(g, gid, qh, q->dim, result, len);
        if (rc == KVC_OK) {
            *similarity = 1.0f;
            *exact = 1;
        }
    }
    if (rc == KVC_MISS) rc = sync_group(g, x);
    if (rc == KVC_OK && !*exact) {
        if (x->dim && x->dim != q->dim) rc = KVC_EINVAL;
        else if (x->n == 0) rc = KVC_MISS;
        else {
            float *v = normalised(q->embedding, q->dim), *sims = malloc(x->n * sizeof *sims);
            rc = v && sims ? KVC_MISS : KVC_ENOMEM;
            if (v && sims) {
                kvc__dot_rows(x->m, x->n, (size_t)x->dim, v, sims);
                /* best candidates first; a candidate that expired is dropped */
                for (;;) { /* (a NaN similarity never wins, nor hits) */
                    size_t best = 0;
                    for (size_t i = 1; i < x->n; i++)
                        if (sims[i] > sims[best] || isnan(sims[best])) best = i;
                    if (x->n == 0 || !(sims[best] >= threshold)) break;
                    int f = fetch(g, gid, x->q[best], x->dim, result, len);
                    if (f == KVC_OK) {
                        *similarity = sims[best];
                        rc = KVC_OK;
                        break;
                    }
                    if (f != KVC_MISS) { rc = f; break; }
                    sims[best] = sims[x->n - 1];
                    group_remove(x, best);
                }
            }
            free(v);
            free(sims);
        }
    }
    if (rc == KVC_OK) {
        g->st.hits++;
        if (*exact) g->st.exact_hits++;
    } else {
        g->st.misses++;
        if (rc != KVC_MISS && rc != KVC_EINVAL) g->st.errors++;
    }
    pthread_mutex_unlock(&g->mu);
    return rc;
}
