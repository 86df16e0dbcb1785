/* agents.c — the batch engine's agents: conversations whose tokens and KV
 * blocks stay between requests; get, list, drop, fork (copy-on-write),
 * export and import (batch.h). */
#include "batch.h"

char *eng__dupstr(const char *s) {
    size_t n = strlen(s ? s : "");
    char *d = malloc(n + 1);
    if (d) memcpy(d, s ? s : "", n + 1);
    return d;
}

agent *eng__agent_find(eng_engine *e, const char *tenant, const char *id, int *index) {
    for (int i = 0; i < e->n_agents; i++)
        if (!strcmp(e->agents[i]->tenant, tenant ? tenant : "") && !strcmp(e->agents[i]->id, id)) {
            if (index) *index = i;
            return e->agents[i];
        }
    return NULL;
}

agent *eng__agent_new(eng_engine *e, const char *tenant, const char *id) {
    if (e->n_agents == e->cap_agents) {
        int nc = e->cap_agents ? e->cap_agents * 2 : 16;
        agent **na = realloc(e->agents, (size_t)nc * sizeof *na);
        if (!na) return NULL;
        e->agents = na;
        e->cap_agents = nc;
    }
    agent *a = calloc(1, sizeof *a);
    if (!a || !(a->tenant = eng__dupstr(tenant)) || !(a->id = eng__dupstr(id))) {
        if (a) { free(a->tenant); free(a); }
        return NULL;
    }
    a->last_used = eng__now();
    e->agents[e->n_agents++] = a;
    return a;
}

void eng__agent_release_blocks(eng_engine *e, agent *a) {
    for (int i = 0; i < a->n_blk; i++)
        if (a->blk[i] >= 0) eng__bp_decref(&e->bp, a->blk[i]);
    free(a->blk);
    a->blk = NULL;
    a->n_blk = 0;
    a->n_cached = 0;
    a->n_foreign = 0;
}

static void agent_destroy(eng_engine *e, int index) {
    agent *a = e->agents[index];
    eng__agent_release_blocks(e, a);
    free(a->tok);
    free(a->tenant);
    free(a->id);
    free(a);
    e->agents[index] = e->agents[--e->n_agents];
}

/* Free the blocks of the least recently used idle agent holding any; its
 * tokens stay, so its next turn recomputes (or finds its prefix cached). */
int eng__evict_idle_agent(eng_engine *e) {
    agent *best = NULL;
    for (int i = 0; i < e->n_agents; i++) {
        agent *a = e->agents[i];
        if (!a->busy && a->n_blk && (!best || a->last_used < best->last_used)) best = a;
    }
    if (!best) return 0;
    eng__agent_release_blocks(e, best);
    return 1;
}

/* ---- agents ----------------------------------------------------------------- */
static void fill_info(const agent *a, eng_agent_info *info) {
    memset(info, 0, sizeof *info);
    snprintf(info->agent_id, sizeof info->agent_id, "%s", a->id);
    info->n_tokens = a->n_tok;
    info->n_cached = a->n_cached;
    for (int i = 0; i < a->n_blk; i++) info->n_blocks += a->blk[i] >= 0;
    info->busy = a->busy;
    info->idle_seconds = a->busy ? 0 : eng__now() - a->last_used;
}

int eng_agent_get(eng_engine *e, const char *tenant, const char *agent_id, eng_agent_info *info) {
    pthread_mutex_lock(&e->mu);
    agent *a = eng__agent_find(e, tenant, agent_id, NULL);
    if (a) fill_info(a, info);
    pthread_mutex_unlock(&e->mu);
    return a ? ENG_OK : ENG_ENOTFOUND;
}

int eng_agent_list(eng_engine *e, const char *tenant, eng_agent_info *out, int max) {
    pthread_mutex_lock(&e->mu);
    int n = 0;
    for (int i = 0; i < e->n_agents; i++) {
        if (strcmp(e->agents[i]->tenant, tenant ? tenant : "")) continue;
        if (n < max) fill_info(e->agents[i], &out[n]);
        n++;
    }
    pthread_mutex_unlock(&e->mu);
    return n;
}

int eng_agent_drop(eng_engine *e, const char *tenant, const char *agent_id) {
    pthread_mutex_lock(&e->mu);
    int idx, rc = ENG_OK;
    agent *a = eng__agent_find(e, tenant, agent_id, &idx);
    if (!a) rc = ENG_ENOTFOUND;
    else if (a->busy) rc = ENG_EBUSY;
    else agent_destroy(e, idx);
    pthread_mutex_unlock(&e->mu);
    return rc;
}

int eng_agent_fork(eng_engine *e, const char *tenant, const char *src, const char *dst) {
    if (!dst || !dst[0] || strlen(dst) > MAX_NAME) return ENG_EINVAL;
    pthread_mutex_lock(&e->mu);
    int rc = ENG_OK;
    agent *a = eng__agent_find(e, tenant, src, NULL), *b;
    if (!a) rc = ENG_ENOTFOUND;
    else if (a->busy) rc = ENG_EBUSY;
    else if (eng__agent_find(e, tenant, dst, NULL)) rc = ENG_EEXIST;
    else if (!(b = eng__agent_new(e, tenant, dst))) rc = ENG_ENOMEM;
    else {
        b->tok = malloc((size_t)(a->n_tok ? a->n_tok : 1) * sizeof *b->tok);
        b->blk = malloc((size_t)(a->n_blk ? a->n_blk : 1) * sizeof *b->blk);
        if (!b->tok || !b->blk) {
            agent_destroy(e, e->n_agents - 1);
            rc = ENG_ENOMEM;
        } else {
            memcpy(b->tok, a->tok, (size_t)a->n_tok * sizeof *b->tok);
            memcpy(b->blk, a->blk, (size_t)a->n_blk * sizeof *b->blk);
            for (int i = 0; i < a->n_blk; i++)
                if (a->blk[i] >= 0) eng__bp_incref(&e->bp, a->blk[i]);
            b->n_tok = a->n_tok;
            b->n_blk = a->n_blk;
            b->n_cached = a->n_cached;
            b->n_foreign = a->n_foreign;
        }
    }
    pthread_mutex_unlock(&e->mu);
    return rc;
}

/* Export format (little-endian):
 *   "KVSAGENT" | u32 version | u64 model fingerprint | u32 n_layers | u32 kv_dim
 *   | u32 n_tokens | u32 n_cached | [version 2: u32 kv_from] | i32 tokens[n_tokens]
 *   | f32 kv[n_cached - kv_from][n_layers][2][kv_dim] | u64 checksum of all bytes before it
 * Version 1 holds the KV of every position (kv_from = 0). Version 2, written
 * only when blocks behind a sliding window were given back, holds positions
 * kv_from .. n_cached - 1. */
#define EXPORT_MAGIC "KVSAGENT"
#define EXPORT_VERSION 2u
#define EXPORT_HDR (8 + 4 + 8 + 4 * 4)

static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

int eng_agent_export(eng_engine *e, const char *tenant, const char *agent_id, uint8_t **buf, size_t *len, char *err,
                     size_t errlen) {
    *buf = NULL;
    *len = 0;
    pthread_mutex_lock(&e->mu);
    agent *a = eng__agent_find(e, tenant, agent_id, NULL);
    int rc = ENG_OK;
    if (!a) { rc = eng__fail(err, errlen, ENG_ENOTFOUND, "no agent \"%s\"", agent_id); goto out; }
    if (a->busy) { rc = eng__fail(err, errlen, ENG_EBUSY, "agent \"%s\" is running a request", agent_id); goto out; }
    const kv_pool *kv = &e->bp.kv;
    size_t L = (size_t)kv->n_layers, D = (size_t)kv->kv_dim;
    int from = 0; /* the first position whose block is held */
    while (from < a->n_cached && a->blk[from / e->bp.B] < 0) from += e->bp.B;
    if (from > a->n_cached) from = a->n_cached;
    size_t size = EXPORT_HDR + (from ? 4 : 0) + (size_t)a->n_tok * 4 + (size_t)(a->n_cached - from) * L * 2 * D * 4 + 8;
    uint8_t *b = malloc(size), *p = b;
    if (!b) { rc = eng__fail(err, errlen, ENG_ENOMEM, "out of memory (%zu bytes)", size); goto out; }
    memcpy(p, EXPORT_MAGIC, 8); p += 8;
    put32(p, from ? 2u : 1u); p += 4;
    memcpy(p, &e->m->fingerprint, 8); p += 8;
    put32(p, (uint32_t)L); p += 4;
    put32(p, (uint32_t)D); p += 4;
    put32(p, (uint32_t)a->n_tok); p += 4;
    put32(p, (uint32_t)a->n_cached); p += 4;
    if (from) { put32(p, (uint32_t)from); p += 4; }
    memcpy(p, a->tok, (size_t)a->n_tok * 4); p += (size_t)a->n_tok * 4;
    kv_table t = {a->blk, a->n_blk};
    for (int pos = from; pos < a->n_cached; pos++)
        for (size_t l = 0; l < L; l++) {
            kv_get(kv, kv_k(kv, &t, (int)l, pos), p, (int)D); p += D * 4; /* F32 in the format */
            kv_get(kv, kv_v(kv, &t, (int)l, pos), p, (int)D); p += D * 4;
        }
    uint64_t sum = eng__hash64(b, (size_t)(p - b), 0);
    memcpy(p, &sum, 8);
    *buf = b;
    *len = size;
out:
    pthread_mutex_unlock(&e->mu);
    return rc;
}

int eng_agent_import(eng_engine *e, const char *tenant, const char *agent_id, const uint8_t *buf, size_t len,
                     char *err, size_t errlen) {
    if (!agent_id || !agent_id[0] || strlen(agent_id) > MAX_NAME)
        return eng__fail(err, errlen, ENG_EINVAL, "agent_id must be 1..%d bytes", MAX_NAME);
    if (len < EXPORT_HDR + 8 || memcmp(buf, EXPORT_MAGIC, 8) != 0)
        return eng__fail(err, errlen, ENG_ECORRUPT, "not an exported agent (bad magic or too short: %zu bytes)", len);
    uint32_t version = get32(buf + 8);
    if (version < 1 || version > EXPORT_VERSION)
        return eng__fail(err, errlen, ENG_ECORRUPT, "export format version %u is not supported (this build reads 1..%u)",
                         version, EXPORT_VERSION);
    size_t hdr = EXPORT_HDR + (version >= 2 ? 4 : 0);
    if (len < hdr + 8) return eng__fail(err, errlen, ENG_ECORRUPT, "too short for its header: %zu bytes", len);
    uint64_t sum;
    memcpy(&sum, buf + len - 8, 8);
    if (eng__hash64(buf, len - 8, 0) != sum)
        return eng__fail(err, errlen, ENG_ECORRUPT, "checksum mismatch: the data is corrupt or truncated");
    uint64_t fp;
    memcpy(&fp, buf + 12, 8);
    const kv_pool *kv = &e->bp.kv;
    uint32_t L = get32(buf + 20), D = get32(buf + 24), nt = get32(buf + 28), nc = get32(buf + 32);
    uint32_t from = version >= 2 ? get32(buf + 36) : 0;
    if (fp != e->m->fingerprint || L != (uint32_t)kv->n_layers || D != (uint32_t)kv->kv_dim)
        return eng__fail(err, errlen, ENG_EMODEL, "the agent was exported from another model");
    if (nc > nt || nt > (uint32_t)e->max_ctx || from > nc ||
        len != hdr + (size_t)nt * 4 + (size_t)(nc - from) * L * 2 * D * 4 + 8)
        return eng__fail(err, errlen, ENG_ECORRUPT, "sizes in the header do not match the data");
    /* KV may start late only where nothing will look back that far */
    long first_needed = e->window ? (long)nc - e->window + 1 : 0;
    if (from && (long)from > (first_needed > 0 ? first_needed : 0))
        return eng__fail(err, errlen, ENG_ECORRUPT, "the KV starts at position %u, but the next token sees from %ld",
                         from, first_needed > 0 ? first_needed : 0);
    const uint8_t *tp = buf + hdr;
    for (uint32_t i = 0; i < nt; i++) {
        int32_t v;
        memcpy(&v, tp + 4 * i, 4);
        if (v < 0 || v >= e->m->cfg.vocab_size) return eng__fail(err, errlen, ENG_ECORRUPT, "token %u out of range", i);
    }
    int B = e->bp.B, need = ((int)nc + B - 1) / B, skip = (int)from / B; /* blocks 0..skip-1 are not held */
    if (need - skip > e->bp.n)
        return eng__fail(err, errlen, ENG_EPOOL, "the agent needs %d blocks, the pool has %d", need - skip, e->bp.n);
    pthread_mutex_lock(&e->mu);
    int rc = ENG_OK;
    agent *a = NULL;
    int32_t *blk = NULL, *tok = NULL;
    int got = 0;
    if (eng__agent_find(e, tenant, agent_id, NULL)) {
        rc = eng__fail(err, errlen, ENG_EEXIST, "agent \"%s\" exists; drop it first", agent_id);
        goto out;
    }
    blk = malloc((size_t)(need ? need : 1) * sizeof *blk);
    tok = malloc((size_t)(nt ? nt : 1) * sizeof *tok);
    if (!blk || !tok) { rc = eng__fail(err, errlen, ENG_ENOMEM, "out of memory"); goto out; }
    for (; got < need; got++) {
        if (got < skip) { blk[got] = -1; continue; }
        int b = eng__bp_alloc(&e->bp);
        while (b < 0 && eng__evict_idle_agent(e)) b = eng__bp_alloc(&e->bp);
        if (b < 0) {
            rc = eng__fail(err, errlen, ENG_EPOOL, "no free KV blocks for the agent (%d needed)", need - skip);
            goto out;
        }
        blk[got] = b;
    }
    memcpy(tok, tp, (size_t)nt * 4);
    if (from % B && skip < need) { /* the first held block starts before the data: zero what came before it */
        size_t bb = kv->block_elems * kv->esz;
        memset((char *)kv->mem + (size_t)blk[skip] * bb, 0, bb);
    }
    kv_table t = {blk, need};
    const uint8_t *p = tp + (size_t)nt * 4;
    for (uint32_t pos = from; pos < nc; pos++)
        for (uint32_t l = 0; l < L; l++) {
            kv_put(kv, kv_k(kv, &t, (int)l, (int)pos), p, (int)D); p += (size_t)D * 4;
            kv_put(kv, kv_v(kv, &t, (int)l, (int)pos), p, (int)D); p += (size_t)D * 4;
        }
    if (!(a = eng__agent_new(e, tenant, agent_id))) { rc = eng__fail(err, errlen, ENG_ENOMEM, "out of memory"); goto out; }
    a->tok = tok;
    a->n_tok = (int)nt;
    a->blk = blk;
    a->n_blk = need;
    a->n_cached = (int)nc;
    a->n_foreign = (int)nc; /* not our computation: never shared through the prefix index */
    tok = NULL;
    blk = NULL;
out:
    if (blk)
        for (int i = 0; i < got; i++)
            if (blk[i] >= 0) eng__bp_decref(&e->bp, blk[i]);
    free(blk);
    free(tok);
    pthread_mutex_unlock(&e->mu);
    return rc;
}
