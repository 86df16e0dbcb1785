/* prompt.c — the exact prompt cache.
 *
 * Keys: PREFIX:p:NS:GEN:HASH where NS is 16 hex digits naming (tenant,
 * namespace), GEN the namespace's generation and HASH the SHA-256 of a
 * canonical, length-prefixed encoding of everything that decides the output
 * (model fingerprint, tenant, namespace, generation, token ids, sampling
 * parameters, stop strings). Invalidation bumps PREFIX:gen:NS (O(1)); keys
 * of older generations are never read again and expire, or are purged. */
#include "kvc_internal.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct kvc_prompt {
    kvc_redis *r;
    char prefix[64];
    int ttl;
    pthread_mutex_t mu;
    kvc_prompt_stats st;
};

#define VALUE_VERSION 1u

int kvc_prompt_open(kvc_prompt **out, kvc_redis *r, const kvc_prompt_options *o) {
    kvc_prompt *p = calloc(1, sizeof *p);
    if (!p) return KVC_ENOMEM;
    p->r = r;
    snprintf(p->prefix, sizeof p->prefix, "%s", o && o->prefix ? o->prefix : "kvs");
    p->ttl = o && o->default_ttl_s > 0 ? o->default_ttl_s : 86400;
    pthread_mutex_init(&p->mu, NULL);
    *out = p;
    return KVC_OK;
}

void kvc_prompt_close(kvc_prompt *p) {
    if (!p) return;
    pthread_mutex_destroy(&p->mu);
    free(p);
}

void kvc_prompt_stats_get(kvc_prompt *p, kvc_prompt_stats *s) {
    pthread_mutex_lock(&p->mu);
    *s = p->st;
    pthread_mutex_unlock(&p->mu);
}

#define COUNT(p, field) \
    do { pthread_mutex_lock(&(p)->mu); (p)->st.field++; pthread_mutex_unlock(&(p)->mu); } while (0)

void kvc_completion_free(kvc_completion *c) {
    if (!c) return;
    free(c->text);
    free(c->tokens);
    memset(c, 0, sizeof *c);
}

/* ---- canonical encoding ------------------------------------------------------ */
/* 16 hex digits naming (tenant, namespace). */
static void ns_id(const char *tenant, const char *ns, char out[17]) {
    kvc__hash *h = kvc__hash_begin("kvserve-namespace-v1");
    if (h) {
        kvc__hash_str(h, tenant);
        kvc__hash_str(h, ns);
    }
    kvc__hash_hex(h, out, 8);
}

static int key_hash(const kvc_prompt_key *k, uint64_t gen, char out[65]) {
    kvc__hash *h = kvc__hash_begin("kvserve-prompt-v1");
    if (!h) return KVC_ENOMEM;
    kvc__hash_u64(h, k->model_fingerprint);
    kvc__hash_str(h, k->tenant);
    kvc__hash_str(h, k->ns);
    kvc__hash_u64(h, gen);
    kvc__hash_bytes(h, k->ids, k->n_ids * sizeof *k->ids);
    kvc__hash_u64(h, (uint64_t)(int64_t)k->max_tokens);
    float f[4] = {k->temperature, k->top_p, k->min_p, k->repeat_penalty};
    kvc__hash_bytes(h, f, sizeof f);
    int64_t iv[3] = {k->top_k, k->repeat_last_n, k->ignore_eos};
    kvc__hash_bytes(h, iv, sizeof iv);
    kvc__hash_u64(h, k->seed);
    kvc__hash_u64(h, (uint64_t)k->n_stop);
    for (int i = 0; i < k->n_stop; i++) kvc__hash_str(h, k->stop[i]);
    kvc__hash_hex(h, out, 32);
    return KVC_OK;
}

void kvc_prompt_key_digest(const kvc_prompt_key *k, char out[65]) {
    if (key_hash(k, 0, out) != KVC_OK) out[0] = 0;
}

static void gen_key(kvc_prompt *p, const char *ns_hex, char *key, size_t n) {
    snprintf(key, n, "%s:gen:%s", p->prefix, ns_hex);
}

/* A GET reply of a generation counter: the value, 0 if never invalidated. */
static uint64_t gen_of(const redisReply *rep) {
    return rep->type == REDIS_REPLY_STRING ? strtoull(rep->str, NULL, 10) : 0;
}

/* The namespace's current generation (0 if never invalidated); -1 on error. */
static int64_t generation(kvc_prompt *p, const char *ns_hex) {
    char key[128];
    gen_key(p, ns_hex, key, sizeof key);
    const char *argv[] = {"GET", key};
    size_t lens[] = {3, strlen(key)};
    redisReply *rep = kvc__command_argv(p->r, 2, argv, lens);
    if (!rep) return -1;
    int64_t g = (int64_t)gen_of(rep);
    freeReplyObject(rep);
    return g;
}

static int full_key_at(const kvc_prompt *p, const kvc_prompt_key *k, uint64_t gen, char *key, size_t n) {
    char ns[17], hash[65];
    ns_id(k->tenant, k->ns, ns);
    if (key_hash(k, gen, hash) != KVC_OK) return KVC_ENOMEM;
    snprintf(key, n, "%s:p:%s:%llu:%s", p->prefix, ns, (unsigned long long)gen, hash);
    return KVC_OK;
}

/* ---- value encoding: version, finish, usage, tokens, text ---------------------- */
static uint8_t *encode(const kvc_completion *c, size_t *len) {
    size_t n = 4 * 7 + c->n_tokens * 4 + c->text_len;
    uint8_t *b = malloc(n), *q = b;
    if (!b) return NULL;
    uint32_t hdr[7] = {VALUE_VERSION, (uint32_t)c->finish, (uint32_t)c->prompt_tokens, (uint32_t)c->cached_tokens,
                       (uint32_t)c->generated_tokens, (uint32_t)c->n_tokens, (uint32_t)c->text_len};
    memcpy(q, hdr, sizeof hdr);
    q += sizeof hdr;
    memcpy(q, c->tokens, c->n_tokens * 4);
    q += c->n_tokens * 4;
    memcpy(q, c->text, c->text_len);
    *len = n;
    return b;
}

static int decode(const char *d, size_t n, kvc_completion *c) {
    uint32_t hdr[7];
    memset(c, 0, sizeof *c);
    if (n < sizeof hdr) return KVC_ECORRUPT;
    memcpy(hdr, d, sizeof hdr);
    if (hdr[0] != VALUE_VERSION || n != sizeof hdr + (size_t)hdr[5] * 4 + hdr[6]) return KVC_ECORRUPT;
    c->finish = (int)hdr[1];
    c->prompt_tokens = (int)hdr[2];
    c->cached_tokens = (int)hdr[3];
    c->generated_tokens = (int)hdr[4];
    c->n_tokens = hdr[5];
    c->text_len = hdr[6];
    c->tokens = malloc(c->n_tokens * 4 + 1);
    c->text = malloc(c->text_len + 1);
    if (!c->tokens || !c->text) { kvc_completion_free(c); return KVC_ENOMEM; }
    memcpy(c->tokens, d + sizeof hdr, c->n_tokens * 4);
    memcpy(c->text, d + sizeof hdr + c->n_tokens * 4, c->text_len);
    c->text[c->text_len] = 0;
    return KVC_OK;
}

enum { KEYLEN = 256 };

void kvc_prompt_get_many(kvc_prompt *p, kvc_prompt_key *const *k, size_t n, kvc_completion *c, int *rc) {
    char (*keys)[KEYLEN] = malloc((n ? n : 1) * sizeof *keys);
    kvc__cmd *cmds = malloc((n ? n : 1) * sizeof *cmds);
    const char **argv = malloc((n ? n : 1) * 2 * sizeof *argv);
    size_t *lens = malloc((n ? n : 1) * 2 * sizeof *lens);
    redisReply **rep = calloc(n ? n : 1, sizeof *rep);
    int fail = !keys || !cmds || !argv || !lens || !rep ? KVC_ENOMEM : KVC_OK;
    for (size_t i = 0; i < n; i++) {
        memset(&c[i], 0, sizeof c[i]);
        rc[i] = fail;
    }
    /* round 1: each key's namespace generation */
    for (size_t i = 0; !fail && i < n; i++) {
        char ns[17];
        ns_id(k[i]->tenant, k[i]->ns, ns);
        gen_key(p, ns, keys[i], KEYLEN);
        argv[2 * i] = "GET";
        lens[2 * i] = 3;
        argv[2 * i + 1] = keys[i];
        lens[2 * i + 1] = strlen(keys[i]);
        cmds[i] = (kvc__cmd){2, &argv[2 * i], &lens[2 * i]};
    }
    if (!fail) kvc__pipeline(p->r, n, cmds, rep);
    size_t m = 0; /* round 2: the values, for the keys whose generation is known */
    for (size_t i = 0; !fail && i < n; i++) {
        if (!rep[i]) {
            rc[i] = KVC_EREDIS;
            continue;
        }
        k[i]->gen = gen_of(rep[i]);
        k[i]->gen_known = 1;
        ns_id(k[i]->tenant, k[i]->ns, k[i]->gen_ns);
        freeReplyObject(rep[i]);
        rep[i] = NULL;
        rc[i] = full_key_at(p, k[i], k[i]->gen, keys[i], KEYLEN);
        if (rc[i] != KVC_OK) continue;
        lens[2 * i + 1] = strlen(keys[i]);
        cmds[m++] = (kvc__cmd){2, &argv[2 * i], &lens[2 * i]};
    }
    if (m) kvc__pipeline(p->r, m, cmds, rep);
    for (size_t i = 0, r2 = 0; !fail && i < n; i++) {
        if (rc[i] != KVC_OK) continue;
        redisReply *v = rep[r2++];
        rc[i] = !v ? KVC_EREDIS : v->type == REDIS_REPLY_STRING ? decode(v->str, (size_t)v->len, &c[i]) : KVC_MISS;
        if (v) freeReplyObject(v);
    }
    pthread_mutex_lock(&p->mu);
    for (size_t i = 0; i < n; i++) {
        if (rc[i] == KVC_OK) p->st.hits++;
        else p->st.misses++;
        if (rc[i] < 0) p->st.errors++;
    }
    pthread_mutex_unlock(&p->mu);
    free(keys);
    free(cmds);
    free(argv);
    free(lens);
    free(rep);
}

int kvc_prompt_get(kvc_prompt *p, kvc_prompt_key *k, kvc_completion *c) {
    int rc;
    kvc_prompt_get_many(p, &k, 1, c, &rc);
    return rc;
}

int kvc_prompt_put(kvc_prompt *p, const kvc_prompt_key *k, const kvc_completion *c, int ttl_s) {
    char key[KEYLEN], ttl[32], ns[17];
    ns_id(k->tenant, k->ns, ns);
    int64_t gen = k->gen_known && !strcmp(k->gen_ns, ns) ? (int64_t)k->gen : generation(p, ns);
    int rc = gen < 0 ? KVC_EREDIS : full_key_at(p, k, (uint64_t)gen, key, sizeof key);
    size_t vlen = 0;
    uint8_t *v = rc == KVC_OK ? encode(c, &vlen) : NULL;
    if (rc == KVC_OK && !v) rc = KVC_ENOMEM;
    if (rc == KVC_OK) {
        snprintf(ttl, sizeof ttl, "%d", ttl_s > 0 ? ttl_s : p->ttl);
        const char *argv[] = {"SET", key, (const char *)v, "EX", ttl};
        size_t lens[] = {3, strlen(key), vlen, 2, strlen(ttl)};
        redisReply *rep = kvc__command_argv(p->r, 5, argv, lens);
        if (!rep) rc = KVC_EREDIS;
        else freeReplyObject(rep);
    }
    free(v);
    if (rc == KVC_OK) COUNT(p, writes);
    else COUNT(p, errors);
    return rc;
}

int kvc_prompt_invalidate(kvc_prompt *p, const char *tenant, const char *ns, uint64_t *gen) {
    char id[17], key[128];
    ns_id(tenant, ns, id);
    snprintf(key, sizeof key, "%s:gen:%s", p->prefix, id);
    const char *argv[] = {"INCR", key};
    size_t lens[] = {4, strlen(key)};
    redisReply *rep = kvc__command_argv(p->r, 2, argv, lens);
    if (!rep) {
        COUNT(p, errors);
        return KVC_EREDIS;
    }
    if (gen) *gen = (uint64_t)rep->integer;
    freeReplyObject(rep);
    COUNT(p, invalidations);
    return KVC_OK;
}

int kvc_prompt_purge(kvc_prompt *p, const char *tenant, const char *ns, int max, int *deleted) {
    char id[17], pattern[128], cursor[32] = "0";
    ns_id(tenant, ns, id);
    int64_t gen = generation(p, id);
    *deleted = 0;
    if (gen < 0) return KVC_EREDIS;
    snprintf(pattern, sizeof pattern, "%s:p:%s:*", p->prefix, id);
    size_t plen = strlen(p->prefix) + 3 + 16 + 1;
    do {
        const char *argv[] = {"SCAN", cursor, "MATCH", pattern, "COUNT", "500"};
        size_t lens[] = {4, strlen(cursor), 5, strlen(pattern), 5, 3};
        redisReply *rep = kvc__command_argv(p->r, 6, argv, lens);
        if (!rep || rep->type != REDIS_REPLY_ARRAY || rep->elements != 2) {
            if (rep) freeReplyObject(rep);
            return KVC_EREDIS;
        }
        snprintf(cursor, sizeof cursor, "%s", rep->element[0]->str);
        redisReply *keys = rep->element[1];
        const char *uargv[501];
        size_t ulens[501];
        int n = 1;
        uargv[0] = "UNLINK";
        ulens[0] = 6;
        for (size_t i = 0; i < keys->elements && *deleted + n - 1 < max; i++) {
            const char *kname = keys->element[i]->str;
            if (keys->element[i]->len > plen && strtoll(kname + plen, NULL, 10) < gen) {
                uargv[n] = kname;
                ulens[n++] = keys->element[i]->len;
            }
        }
        if (n > 1) {
            redisReply *u = kvc__command_argv(p->r, n, uargv, ulens);
            if (u) {
                *deleted += (int)u->integer;
                freeReplyObject(u);
            }
        }
        freeReplyObject(rep);
    } while (strcmp(cursor, "0") && *deleted < max);
    return KVC_OK;
}
