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
 * tokens stay, so its next turn recomputes (or finds its prefix cached, or
 * the server restores it from the warm store, to which an unsaved version
 * is handed first through the spill callback). */
int eng__evict_idle_agent(eng_engine *e) {
    agent *best = NULL;
    for (int i = 0; i < e->n_agents; i++) {
        agent *a = e->agents[i];
        if (!a->busy && a->n_blk && (!best || a->last_used < best->last_used)) best = a;
    }
    if (!best) return 0;
    uint8_t *blob;
    size_t len;
    char err[64];
    if (e->spill && best->version != best->saved_version &&
        eng__agent_export_locked(e, best, &blob, &len, err, sizeof err) == ENG_OK) {
        best->tried_version = best->version;
        best->tried_at = eng__now();
        e->spill(e->spill_ud, best->tenant, best->id, best->version, blob, len); /* the blob is its own now */
    }
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
    info->version = a->version;
    info->saved = a->version == a->saved_version && a->version;
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
            b->version = 1; /* a new history: not in the store */
        }
    }
    pthread_mutex_unlock(&e->mu);
    return rc;
}

/* Export format (little-endian):
 *   "KVSAGENT" | u32 version | u64 model fingerprint | u32 n_layers | u32 kv_dim
 *   | u32 n_tokens | u32 n_cached | [version >= 2: u32 kv_from] | [version 3: u32 elem_bytes]
 *   | i32 tokens[n_tokens]
 *   | kv[n_cached - kv_from][n_layers][2][kv_dim] | u64 checksum of all bytes before it
 * Version 1 holds the KV of every position (kv_from = 0) in f32. Version 2,
 * written only when blocks behind a sliding window were given back, holds
 * positions kv_from .. n_cached - 1. Version 3, written by engines that keep
 * the KV in IEEE half, holds it as the pool does (elem_bytes 2): half the
 * bytes to store and move, and restored by a copy. */
#define EXPORT_MAGIC "KVSAGENT"
#define EXPORT_VERSION 3u
#define EXPORT_HDR (8 + 4 + 8 + 4 * 4)

static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

/* Serialise agent a (e->mu held, a idle). */
int eng__agent_export_locked(eng_engine *e, const agent *a, uint8_t **buf, size_t *len, char *err, size_t errlen) {
    const kv_pool *kv = &e->bp.kv;
    size_t L = (size_t)kv->n_layers, D = (size_t)kv->kv_dim;
    int from = 0; /* the first position whose block is held */
    while (from < a->n_cached && a->blk[from / e->bp.B] < 0) from += e->bp.B;
    if (from > a->n_cached) from = a->n_cached;
    size_t esz = kv->esz; /* 4: f32 (versions 1, 2); 2: the pool's halves (version 3) */
    uint32_t version = esz == 2 ? 3u : from ? 2u : 1u;
    size_t size = EXPORT_HDR + (version >= 2 ? 4 : 0) + (version >= 3 ? 4 : 0) + (size_t)a->n_tok * 4 +
                  (size_t)(a->n_cached - from) * L * 2 * D * esz + 8;
    uint8_t *b = malloc(size), *p = b;
    if (!b) return eng__fail(err, errlen, ENG_ENOMEM, "out of memory (%zu bytes)", size);
    memcpy(p, EXPORT_MAGIC, 8); p += 8;
    put32(p, version); p += 4;
    memcpy(p, &e->m->fingerprint, 8); p += 8;
    put32(p, (uint32_t)L); p += 4;
    put32(p, (uint32_t)D); p += 4;
    put32(p, (uint32_t)a->n_tok); p += 4;
    put32(p, (uint32_t)a->n_cached); p += 4;
    if (version >= 2) { put32(p, (uint32_t)from); p += 4; }
    if (version >= 3) { put32(p, (uint32_t)esz); p += 4; }
    memcpy(p, a->tok, (size_t)a->n_tok * 4); p += (size_t)a->n_tok * 4;
    kv_table t = {a->blk, a->n_blk};
    for (int pos = from; pos < a->n_cached; pos++)
        for (size_t l = 0; l < L; l++)
            if (esz == 2) { /* as held */
                memcpy(p, kv_k(kv, &t, (int)l, pos), D * 2); p += D * 2;
                memcpy(p, kv_v(kv, &t, (int)l, pos), D * 2); p += D * 2;
            } else {
                kv_get(kv, kv_k(kv, &t, (int)l, pos), p, (int)D); p += D * 4;
                kv_get(kv, kv_v(kv, &t, (int)l, pos), p, (int)D); p += D * 4;
            }
    uint64_t sum = eng__hash64(b, (size_t)(p - b), 0);
    memcpy(p, &sum, 8);
    *buf = b;
    *len = size;
    return ENG_OK;
}

int eng_agent_export(eng_engine *e, const char *tenant, const char *agent_id, uint8_t **buf, size_t *len, char *err,
                     size_t errlen) {
    *buf = NULL;
    *len = 0;
    pthread_mutex_lock(&e->mu);
    agent *a = eng__agent_find(e, tenant, agent_id, NULL);
    int rc;
    if (!a) rc = eng__fail(err, errlen, ENG_ENOTFOUND, "no agent \"%s\"", agent_id);
    else if (a->busy) rc = eng__fail(err, errlen, ENG_EBUSY, "agent \"%s\" is running a request", agent_id);
    else rc = eng__agent_export_locked(e, a, buf, len, err, errlen);
    pthread_mutex_unlock(&e->mu);
    return rc;
}

/* An export, checked (no lock needed): where its parts are. */
typedef struct {
    uint32_t nt, nc, from, L, D, esz;
    const uint8_t *tok, *kv;
} parsed;

static int parse_export(eng_engine *e, const char *agent_id, const uint8_t *buf, size_t len, parsed *x, char *err,
                        size_t errlen) {
    if (!agent_id || !agent_id[0] || strlen(agent_id) > MAX_NAME)
        return eng__fail(err, errlen, ENG_EINVAL, "agent_id must be 1..%d bytes", MAX_NAME);
    if (len < EXPORT_HDR + 8 || memcmp(buf, EXPORT_MAGIC, 8) != 0)
        return eng__fail(err, errlen, ENG_ECORRUPT, "not an exported agent (bad magic or too short: %zu bytes)", len);
    uint32_t version = get32(buf + 8);
    if (version < 1 || version > EXPORT_VERSION)
        return eng__fail(err, errlen, ENG_ECORRUPT, "export format version %u is not supported (this build reads 1..%u)",
                         version, EXPORT_VERSION);
    size_t hdr = EXPORT_HDR + (version >= 2 ? 4 : 0) + (version >= 3 ? 4 : 0);
    if (len < hdr + 8) return eng__fail(err, errlen, ENG_ECORRUPT, "too short for its header: %zu bytes", len);
    uint64_t sum;
    memcpy(&sum, buf + len - 8, 8);
    if (eng__hash64(buf, len - 8, 0) != sum)
        return eng__fail(err, errlen, ENG_ECORRUPT, "checksum mismatch: the data is corrupt or truncated");
    uint64_t fp;
    memcpy(&fp, buf + 12, 8);
    const kv_pool *kv = &e->bp.kv;
    uint32_t L = get32(buf + 20), D = get32(buf + 24), nt = get32(buf + 28), nc = get32(buf + 32);
    uint32_t from = version >= 2 ? get32(buf + 36) : 0, esz = version >= 3 ? get32(buf + 40) : 4;
    if (fp != e->m->fingerprint || L != (uint32_t)kv->n_layers || D != (uint32_t)kv->kv_dim)
        return eng__fail(err, errlen, ENG_EMODEL, "the agent was exported from another model");
    if (esz != (esz == 2 ? kv->esz : 4))
        return eng__fail(err, errlen, ENG_EMODEL, "the agent's KV is in %u-byte values; this pool keeps %zu",
                         esz, kv->esz);
    if (nc > nt || nt > (uint32_t)e->max_ctx || from > nc ||
        len != hdr + (size_t)nt * 4 + (size_t)(nc - from) * L * 2 * D * esz + 8)
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
    int B = e->bp.B, need = ((int)nc + B - 1) / B, skip = (int)from / B;
    if (need - skip > e->bp.n)
        return eng__fail(err, errlen, ENG_EPOOL, "the agent needs %d blocks, the pool has %d", need - skip, e->bp.n);
    *x = (parsed){nt, nc, from, L, D, esz, tp, tp + (size_t)nt * 4};
    return ENG_OK;
}

/* Install a parsed export as tenant/agent_id (e->mu held). With `replace`
 * the existing agent of that name (idle) gives way, but only once the new
 * one's blocks are secured: a failure leaves it as it was. */
static int install(eng_engine *e, const char *tenant, const char *agent_id, const parsed *x, int replace, char *err,
                   size_t errlen) {
    const kv_pool *kv = &e->bp.kv;
    int B = e->bp.B, need = ((int)x->nc + B - 1) / B, skip = (int)x->from / B; /* blocks 0..skip-1 are not held */
    int rc = ENG_OK, got = 0;
    int32_t *blk = malloc((size_t)(need ? need : 1) * sizeof *blk);
    int32_t *tok = malloc((size_t)(x->nt ? x->nt : 1) * sizeof *tok);
    agent *a;
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
    memcpy(tok, x->tok, (size_t)x->nt * 4);
    if (x->from % B && skip < need) { /* the first held block starts before the data: zero what came before it */
        size_t bb = kv->block_elems * kv->esz;
        memset((char *)kv->mem + (size_t)blk[skip] * bb, 0, bb);
    }
    kv_table t = {blk, need};
    const uint8_t *p = x->kv;
    size_t row = (size_t)x->D * x->esz;
    for (uint32_t pos = x->from; pos < x->nc; pos++)
        for (uint32_t l = 0; l < x->L; l++)
            if (x->esz == 2) { /* as the pool holds it */
                memcpy(kv_k(kv, &t, (int)l, (int)pos), p, row); p += row;
                memcpy(kv_v(kv, &t, (int)l, (int)pos), p, row); p += row;
            } else {
                kv_put(kv, kv_k(kv, &t, (int)l, (int)pos), p, (int)x->D); p += row;
                kv_put(kv, kv_v(kv, &t, (int)l, (int)pos), p, (int)x->D); p += row;
            }
    int idx;
    uint64_t version = 1;
    if (replace && (a = eng__agent_find(e, tenant, agent_id, &idx))) {
        version = a->version + 1;
        agent_destroy(e, idx);
    }
    if (!(a = eng__agent_new(e, tenant, agent_id))) { rc = eng__fail(err, errlen, ENG_ENOMEM, "out of memory"); goto out; }
    a->tok = tok;
    a->n_tok = (int)x->nt;
    a->blk = blk;
    a->n_blk = need;
    a->n_cached = (int)x->nc;
    a->n_foreign = (int)x->nc; /* not our computation: never shared through the prefix index */
    a->version = version;
    tok = NULL;
    blk = NULL;
out:
    if (blk)
        for (int i = 0; i < got; i++)
            if (blk[i] >= 0) eng__bp_decref(&e->bp, blk[i]);
    free(blk);
    free(tok);
    return rc;
}

int eng_agent_import(eng_engine *e, const char *tenant, const char *agent_id, const uint8_t *buf, size_t len,
                     char *err, size_t errlen) {
    parsed x;
    int rc = parse_export(e, agent_id, buf, len, &x, err, errlen);
    if (rc) return rc;
    pthread_mutex_lock(&e->mu);
    if (eng__agent_find(e, tenant, agent_id, NULL))
        rc = eng__fail(err, errlen, ENG_EEXIST, "agent \"%s\" exists; drop it first", agent_id);
    else rc = install(e, tenant, agent_id, &x, 0, err, errlen);
    pthread_mutex_unlock(&e->mu);
    return rc;
}

/* ---- the warm tier ---------------------------------------------------------- */
void eng_engine_set_spill(eng_engine *e, eng_spill_cb cb, void *ud) {
    pthread_mutex_lock(&e->mu);
    e->spill = cb;
    e->spill_ud = ud;
    pthread_mutex_unlock(&e->mu);
}

int eng_agent_restore(eng_engine *e, const char *tenant, const char *agent_id, const uint8_t *buf, size_t len,
                      char *err, size_t errlen) {
    parsed x;
    int rc = parse_export(e, agent_id, buf, len, &x, err, errlen);
    if (rc) return rc;
    pthread_mutex_lock(&e->mu);
    agent *a = eng__agent_find(e, tenant, agent_id, NULL);
    if (a && a->busy) rc = eng__fail(err, errlen, ENG_EBUSY, "agent \"%s\" is running a request", agent_id);
    else if (a && (a->n_tok > (int)x.nt || memcmp(a->tok, x.tok, (size_t)a->n_tok * 4) || a->n_cached >= (int)x.nc))
        rc = eng__fail(err, errlen, ENG_EEXIST, "agent \"%s\" here is as far as the stored one, or elsewhere", agent_id);
    else if (!(rc = install(e, tenant, agent_id, &x, a != NULL, err, errlen))) {
        a = eng__agent_find(e, tenant, agent_id, NULL);
        if (a) a->saved_version = a->version;
    }
    pthread_mutex_unlock(&e->mu);
    return rc;
}

int eng_agent_save_next(eng_engine *e, double min_idle_s, double retry_s, char *tenant, char *agent_id,
                        uint8_t **buf, size_t *len, uint64_t *version) {
    int found = 0;
    pthread_mutex_lock(&e->mu);
    double now = eng__now();
    for (int i = 0; i < e->n_agents && !found; i++) {
        agent *a = e->agents[i];
        if (a->busy || !a->n_cached || a->version == a->saved_version || now - a->last_used < min_idle_s) continue;
        if (a->tried_version == a->version && now - a->tried_at < retry_s) continue;
        char err[64];
        if (eng__agent_export_locked(e, a, buf, len, err, sizeof err) != ENG_OK) continue;
        a->tried_version = a->version;
        a->tried_at = now;
        snprintf(tenant, 256, "%s", a->tenant);
        snprintf(agent_id, 256, "%s", a->id);
        *version = a->version;
        found = 1;
    }
    pthread_mutex_unlock(&e->mu);
    return found;
}

void eng_agent_mark_saved(eng_engine *e, const char *tenant, const char *agent_id, uint64_t version) {
    pthread_mutex_lock(&e->mu);
    agent *a = eng__agent_find(e, tenant, agent_id, NULL);
    if (a && a->version == version) a->saved_version = version;
    pthread_mutex_unlock(&e->mu);
}
