/* batch.c — the block-pool batch engine: paged KV pool, prefix sharing,
 * continuous batching, agents, cancellation, preemption.
 *
 * Every sequence is a list of tokens tok[0..n_tok) of which the first
 * n_cached have their K/V in the sequence's blocks. A step gives each running
 * sequence the next tokens tok[n_cached..] to compute (one for a decoding
 * sequence, a chunk for a prefilling one) under the token budget; a sequence
 * whose chunk reaches n_tok gets logits, samples a token and appends it.
 * Prefill and decode are the same operation with different chunk sizes.
 *
 * Blocks: ref counts count owners (sequences, idle agents). A full block is
 * registered under the hash chain of its tokens so that a later sequence
 * with the same prefix can take it; a registered block whose last owner
 * leaves stays "cached" (LRU) until the allocator needs it.
 *
 * Sliding windows: when every layer of the model slides, a block whose
 * positions all lie before the window of the next token to compute is given
 * back at once (its entry in the block table becomes -1), so a sequence holds
 * about window / block_tokens blocks however long it runs. Registered blocks
 * given back stay cached for the prefix index like any other.
 *
 * Isolation: a chain starts from its sharing scope (one per tenant, or one
 * for all with share_prefix_across_tenants), so a tenant never takes another
 * tenant's KV, nor learns from usage or timing that another sent a prefix.
 * KV that the engine did not compute itself (an imported agent's) never
 * enters the index, nor does any block computed after it. */
#include "internal.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- block pool --------------------------------------------------------- */
typedef struct {
    kv_pool kv;
    int n, B;
    int32_t *ref;
    int32_t *free_stack;    /* blocks with no owner and no cached content */
    int n_free;
    int32_t *lru_prev, *lru_next; /* cached blocks, oldest at head */
    int lru_head, lru_tail, n_cached;
    uint8_t *registered;
    uint64_t *hash;         /* chain hash of the block's prefix */
    int32_t *parent;        /* block before it in the chain (-1 for the first) */
    int32_t *scope;         /* sharing scope of the chain (its first block's) */
    int32_t *btok;          /* [n][B] the tokens it holds */
    int32_t *bucket, *chain; /* hash -> block lookup */
    size_t n_bucket;
} bpool;

static void lru_remove(bpool *p, int b) {
    if (p->lru_prev[b] >= 0) p->lru_next[p->lru_prev[b]] = p->lru_next[b]; else p->lru_head = p->lru_next[b];
    if (p->lru_next[b] >= 0) p->lru_prev[p->lru_next[b]] = p->lru_prev[b]; else p->lru_tail = p->lru_prev[b];
    p->lru_prev[b] = p->lru_next[b] = -1;
    p->n_cached--;
}

static void lru_push(bpool *p, int b) {
    p->lru_prev[b] = p->lru_tail;
    p->lru_next[b] = -1;
    if (p->lru_tail >= 0) p->lru_next[p->lru_tail] = b; else p->lru_head = b;
    p->lru_tail = b;
    p->n_cached++;
}

static void unregister(bpool *p, int b) {
    int32_t *pp = &p->bucket[p->hash[b] & (p->n_bucket - 1)];
    while (*pp >= 0 && *pp != b) pp = &p->chain[*pp];
    if (*pp == b) *pp = p->chain[b];
    p->registered[b] = 0;
}

static uint64_t chain_hash(const bpool *p, int parent, int scope, const int32_t *tok) {
    uint64_t seed = parent >= 0 ? p->hash[parent] : 0x70726566697821ull + (uint64_t)scope * 0x9e3779b97f4a7c15ull;
    return eng__hash64(tok, (size_t)p->B * sizeof *tok, seed);
}

/* A registered block holding tok after parent in scope, or -1. (A child's
 * scope is its parent's: only first blocks need the comparison.) */
static int bp_lookup(const bpool *p, int parent, int scope, const int32_t *tok) {
    uint64_t h = chain_hash(p, parent, scope, tok);
    for (int b = p->bucket[h & (p->n_bucket - 1)]; b >= 0; b = p->chain[b])
        if (p->hash[b] == h && p->parent[b] == parent && p->scope[b] == scope &&
            memcmp(p->btok + (size_t)b * p->B, tok, (size_t)p->B * 4) == 0)
            return b;
    return -1;
}

/* Register a full block unless an identical one is registered already. */
static void bp_register(bpool *p, int b, int parent, int scope, const int32_t *tok) {
    if (p->registered[b] || bp_lookup(p, parent, scope, tok) >= 0) return;
    p->hash[b] = chain_hash(p, parent, scope, tok);
    p->parent[b] = parent;
    p->scope[b] = scope;
    memcpy(p->btok + (size_t)b * p->B, tok, (size_t)p->B * 4);
    size_t k = p->hash[b] & (p->n_bucket - 1);
    p->chain[b] = p->bucket[k];
    p->bucket[k] = b;
    p->registered[b] = 1;
}

/* A block with one owner, or -1 if none is free or cached. */
static int bp_alloc(bpool *p) {
    int b;
    if (p->n_free) b = p->free_stack[--p->n_free];
    else if (p->lru_head >= 0) {
        b = p->lru_head;
        lru_remove(p, b);
        unregister(p, b);
    } else return -1;
    p->ref[b] = 1;
    return b;
}

static void bp_incref(bpool *p, int b) {
    if (p->ref[b] == 0) lru_remove(p, b); /* only registered blocks are found with ref 0 */
    p->ref[b]++;
}

static void bp_decref(bpool *p, int b) {
    if (--p->ref[b] > 0) return;
    if (p->registered[b]) lru_push(p, b);
    else p->free_stack[p->n_free++] = b;
}

static int bp_init(bpool *p, int n, int B, const eng_config *c, int kv_f16) {
    memset(p, 0, sizeof *p);
    p->n = n;
    p->B = B;
    p->n_bucket = 16;
    while (p->n_bucket < (size_t)n * 2) p->n_bucket <<= 1;
    if (kv_pool_init(&p->kv, n, B, c->n_layers, c->n_kv_heads * c->head_dim, kv_f16) != ENG_OK) return ENG_ENOMEM;
    p->ref = calloc((size_t)n, sizeof *p->ref);
    p->free_stack = malloc((size_t)n * sizeof *p->free_stack);
    p->lru_prev = malloc((size_t)n * sizeof *p->lru_prev);
    p->lru_next = malloc((size_t)n * sizeof *p->lru_next);
    p->registered = calloc((size_t)n, 1);
    p->hash = calloc((size_t)n, sizeof *p->hash);
    p->parent = malloc((size_t)n * sizeof *p->parent);
    p->scope = malloc((size_t)n * sizeof *p->scope);
    p->btok = malloc((size_t)n * B * sizeof *p->btok);
    p->chain = malloc((size_t)n * sizeof *p->chain);
    p->bucket = malloc(p->n_bucket * sizeof *p->bucket);
    if (!p->ref || !p->free_stack || !p->lru_prev || !p->lru_next || !p->registered || !p->hash || !p->parent ||
        !p->scope || !p->btok || !p->chain || !p->bucket)
        return ENG_ENOMEM;
    for (int i = 0; i < n; i++) {
        p->free_stack[i] = n - 1 - i;
        p->lru_prev[i] = p->lru_next[i] = -1;
    }
    p->n_free = n;
    for (size_t i = 0; i < p->n_bucket; i++) p->bucket[i] = -1;
    p->lru_head = p->lru_tail = -1;
    return ENG_OK;
}

static void bp_free(bpool *p) {
    kv_pool_free(&p->kv);
    free(p->ref); free(p->free_stack); free(p->lru_prev); free(p->lru_next); free(p->registered);
    free(p->hash); free(p->parent); free(p->scope); free(p->btok); free(p->chain); free(p->bucket);
}

/* ---- sequences and agents ---------------------------------------------- */
typedef struct agent {
    char *tenant, *id;
    int32_t *tok;
    int n_tok, n_cached;
    int n_foreign;          /* leading tokens whose KV was imported, not computed here */
    int32_t *blk;
    int n_blk;
    int busy;
    double last_used;
} agent;

enum { SQ_WAITING, SQ_RUNNING, SQ_DONE };

typedef struct seq {
    uint64_t id;
    int state;
    int32_t *tok;
    int n_tok, cap_tok, n_cached;
    int32_t *blk;
    int n_blk, cap_blk;
    int gen_start;          /* tok index of the first generated token */
    int scope;              /* prefix-sharing scope (its tenant's, or 0 when tenants share) */
    int n_foreign;          /* leading tokens whose KV was imported: their blocks are never shared */
    int max_tokens;
    eng_sampling sp;
    eng__rng rng;
    eng__gen *gen;
    char *tenant, *agent_id;
    int reset, full_context, admitted, cancelled, in_batch, chunk;
    eng_usage usage;
    int finish, error;
    char msg[200];
    struct seq *prev, *next;
} seq;

typedef struct {
    seq *head, *tail;
    int n;
} seq_list;

static void list_remove(seq_list *l, seq *s) {
    if (s->prev) s->prev->next = s->next; else l->head = s->next;
    if (s->next) s->next->prev = s->prev; else l->tail = s->prev;
    s->prev = s->next = NULL;
    l->n--;
}

static void list_push(seq_list *l, seq *s, int front) {
    if (front) {
        s->prev = NULL;
        s->next = l->head;
        if (l->head) l->head->prev = s; else l->tail = s;
        l->head = s;
    } else {
        s->next = NULL;
        s->prev = l->tail;
        if (l->tail) l->tail->next = s; else l->head = s;
        l->tail = s;
    }
    l->n++;
}

/* ---- events ------------------------------------------------------------ */
typedef struct {
    eng_event *ev;
    size_t n, cap;
    size_t *text_off, *tok_off; /* offsets into the arenas, fixed up at delivery */
    char *text;
    size_t text_n, text_cap;
    int32_t *toks;
    size_t toks_n, toks_cap;
} ev_buf;

struct eng_engine {
    eng_model *m;
    eng_engine_options o;
    pthread_mutex_t mu;
    bpool bp;
    int max_ctx;
    fwd_scratch *scratch;
    eng__sampler *sampler;
    float *logits;
    int32_t *b_tok, *b_pos, *b_seq, *b_rows;
    kv_table *tables;
    seq **batch;
    seq_list waiting, running, done;
    uint64_t next_id;
    agent **agents;
    int n_agents, cap_agents;
    ev_buf ev;
    uint64_t prefix_hits, preemptions;
    int hold;               /* test hook: no sequence generates past this many tokens (-1 = off) */
    int window;             /* every layer slides over this many positions (0: keep all blocks) */
    char **scopes;          /* tenant of each prefix-sharing scope (index + 1) */
    int n_scopes, cap_scopes;
};

static char *dupstr(const char *s) {
    size_t n = strlen(s ? s : "");
    char *d = malloc(n + 1);
    if (d) memcpy(d, s ? s : "", n + 1);
    return d;
}

static agent *agent_find(eng_engine *e, const char *tenant, const char *id, int *index) {
    for (int i = 0; i < e->n_agents; i++)
        if (!strcmp(e->agents[i]->tenant, tenant ? tenant : "") && !strcmp(e->agents[i]->id, id)) {
            if (index) *index = i;
            return e->agents[i];
        }
    return NULL;
}

static agent *agent_new(eng_engine *e, const char *tenant, const char *id) {
    if (e->n_agents == e->cap_agents) {
        int nc = e->cap_agents ? e->cap_agents * 2 : 16;
        agent **na = realloc(e->agents, (size_t)nc * sizeof *na);
        if (!na) return NULL;
        e->agents = na;
        e->cap_agents = nc;
    }
    agent *a = calloc(1, sizeof *a);
    if (!a || !(a->tenant = dupstr(tenant)) || !(a->id = dupstr(id))) {
        if (a) { free(a->tenant); free(a); }
        return NULL;
    }
    a->last_used = eng__now();
    e->agents[e->n_agents++] = a;
    return a;
}

static void agent_release_blocks(eng_engine *e, agent *a) {
    for (int i = 0; i < a->n_blk; i++)
        if (a->blk[i] >= 0) bp_decref(&e->bp, a->blk[i]);
    free(a->blk);
    a->blk = NULL;
    a->n_blk = 0;
    a->n_cached = 0;
    a->n_foreign = 0;
}

static void agent_destroy(eng_engine *e, int index) {
    agent *a = e->agents[index];
    agent_release_blocks(e, a);
    free(a->tok);
    free(a->tenant);
    free(a->id);
    free(a);
    e->agents[index] = e->agents[--e->n_agents];
}

/* Free the blocks of the least recently used idle agent holding any; its
 * tokens stay, so its next turn recomputes (or finds its prefix cached). */
static int evict_idle_agent(eng_engine *e) {
    agent *best = NULL;
    for (int i = 0; i < e->n_agents; i++) {
        agent *a = e->agents[i];
        if (!a->busy && a->n_blk && (!best || a->last_used < best->last_used)) best = a;
    }
    if (!best) return 0;
    agent_release_blocks(e, best);
    return 1;
}

static void seq_free(seq *s) {
    if (!s) return;
    free(s->tok);
    free(s->blk);
    eng__gen_free(s->gen);
    free(s->tenant);
    free(s->agent_id);
    free(s);
}

static int seq_reserve_tok(seq *s, int n) {
    if (n <= s->cap_tok) return ENG_OK;
    int nc = s->cap_tok ? s->cap_tok : 16;
    while (nc < n) nc *= 2;
    int32_t *nt = realloc(s->tok, (size_t)nc * sizeof *nt);
    if (!nt) return ENG_ENOMEM;
    s->tok = nt;
    s->cap_tok = nc;
    return ENG_OK;
}

static void seq_release_blocks(eng_engine *e, seq *s) {
    for (int i = 0; i < s->n_blk; i++)
        if (s->blk[i] >= 0) bp_decref(&e->bp, s->blk[i]);
    s->n_blk = 0;
    s->n_cached = 0;
    s->n_foreign = 0; /* what it computes again is its own */
}

/* ---- events ------------------------------------------------------------ */
/* Room for `more` events in the array (not their text): reserved before
 * anything can finish, so that no DONE is ever lost to a failed allocation
 * (a Stream would wait for ever for its status). */
static int ev_reserve(ev_buf *b, size_t more) {
    while (b->n + more > b->cap) {
        size_t nc = b->cap ? b->cap * 2 : 64;
        eng_event *ne = realloc(b->ev, nc * sizeof *ne);
        size_t *to = realloc(b->text_off, nc * sizeof *to), *ko = to ? realloc(b->tok_off, nc * sizeof *ko) : NULL;
        if (ne) b->ev = ne;
        if (to) b->text_off = to;
        if (ko) b->tok_off = ko;
        if (!ne || !to || !ko) return ENG_ENOMEM;
        b->cap = nc;
    }
    return ENG_OK;
}

/* Grow an arena to hold `need` more units of `size` bytes. */
static int arena_grow(void **p, size_t *cap, size_t used, size_t need, size_t size) {
    if (used + need <= *cap) return ENG_OK;
    size_t nc = (used + need) * 2 + 16;
    void *np = realloc(*p, nc * size);
    if (!np) return ENG_ENOMEM;
    *p = np;
    *cap = nc;
    return ENG_OK;
}

/* Add an event. ENG_ENOMEM if there is no room for it at all; 1 if it went
 * in without its text and tokens (no memory for them); else ENG_OK. */
static int ev_add(ev_buf *b, const eng_event *ev, const char *text, size_t tl, const int32_t *toks, size_t nt) {
    if (ev_reserve(b, 1)) return ENG_ENOMEM;
    int degraded = 0;
    if (arena_grow((void **)&b->text, &b->text_cap, b->text_n, tl + 1, 1) ||
        arena_grow((void **)&b->toks, &b->toks_cap, b->toks_n, nt, sizeof *b->toks)) {
        tl = nt = 0;
        degraded = 1;
        if (arena_grow((void **)&b->text, &b->text_cap, b->text_n, 1, 1)) return ENG_ENOMEM;
    }
    b->ev[b->n] = *ev;
    b->text_off[b->n] = b->text_n;
    memcpy(b->text + b->text_n, text, tl);
    b->text[b->text_n + tl] = 0;
    b->text_n += tl + 1;
    b->ev[b->n].text_len = tl;
    b->tok_off[b->n] = b->toks_n;
    if (nt) memcpy(b->toks + b->toks_n, toks, nt * sizeof *toks);
    b->toks_n += nt;
    b->ev[b->n].n_tokens = nt;
    b->n++;
    return degraded;
}

/* Finish a sequence (not in the forward pass): DONE event, blocks back to
 * its agent or the pool, and onto the done list to be freed after delivery. */
static void seq_finish(eng_engine *e, seq *s, int finish, int error, const char *msg) {
    if (!s->admitted) { /* finished while it waited (cancelled, refused): nothing generated yet */
        s->gen_start = s->n_tok;
        s->usage.prompt_tokens = s->n_tok;
    }
    s->finish = finish;
    s->usage.generated_tokens = s->n_tok - s->gen_start;
    size_t tl;
    const char *text = eng__gen_text(s->gen, &tl);
    eng_event ev = {.kind = ENG_EV_DONE, .id = s->id, .finish = finish, .usage = s->usage, .error = error};
    if (msg) snprintf(s->msg, sizeof s->msg, "%s", msg);
    if (ev_add(&e->ev, &ev, text, tl, s->tok + s->gen_start, (size_t)s->usage.generated_tokens) == 1) {
        /* (room for the event itself was reserved) no memory for the output: say so rather than lose it */
        e->ev.ev[e->ev.n - 1].finish = ENG_FINISH_ERROR;
        e->ev.ev[e->ev.n - 1].error = ENG_ENOMEM;
        snprintf(s->msg, sizeof s->msg, "out of memory: the output (%d tokens) was lost", s->usage.generated_tokens);
    }
    agent *a = s->agent_id && s->admitted ? agent_find(e, s->tenant, s->agent_id, NULL) : NULL;
    if (a) {
        /* the agent keeps the context and its blocks */
        free(a->tok);
        free(a->blk);
        a->tok = s->tok;
        a->n_tok = s->n_tok;
        a->blk = s->blk;
        a->n_blk = s->n_blk;
        a->n_cached = s->n_cached;
        a->n_foreign = s->n_foreign;
        a->busy = 0;
        a->last_used = eng__now();
        s->tok = NULL;
        s->blk = NULL;
        s->n_blk = 0;
    } else {
        seq_release_blocks(e, s);
    }
    if (s->state == SQ_RUNNING) list_remove(&e->running, s);
    else if (s->state == SQ_WAITING) list_remove(&e->waiting, s);
    s->state = SQ_DONE;
    list_push(&e->done, s, 0);
}

/* Deliver collected events with the lock released, then free done seqs. */
static void deliver(eng_engine *e, eng_event_cb cb, void *ud) {
    ev_buf b = e->ev;
    memset(&e->ev, 0, sizeof e->ev);
    seq_list done = e->done;
    memset(&e->done, 0, sizeof e->done);
    pthread_mutex_unlock(&e->mu);
    for (size_t i = 0; i < b.n; i++) {
        b.ev[i].text = b.text + b.text_off[i];
        static const int32_t none[1] = {0};
        b.ev[i].tokens = b.toks ? b.toks + b.tok_off[i] : none;
        if (b.ev[i].kind == ENG_EV_DONE && b.ev[i].finish == ENG_FINISH_ERROR) {
            for (seq *s = done.head; s; s = s->next)
                if (s->id == b.ev[i].id) b.ev[i].message = s->msg;
        }
        if (cb) cb(ud, &b.ev[i]);
    }
    for (seq *s = done.head, *n; s; s = n) {
        n = s->next;
        seq_free(s);
    }
    free(b.ev); free(b.text_off); free(b.tok_off); free(b.text); free(b.toks);
}

/* ---- open / close --------------------------------------------------------- */
int eng_engine_open(eng_engine **out, eng_model *m, const eng_engine_options *o, char *err, size_t errlen) {
    *out = NULL;
    eng_engine *e = calloc(1, sizeof *e);
    if (!e) return eng__fail(err, errlen, ENG_ENOMEM, "out of memory");
    if (o) e->o = *o;
    if (e->o.n_blocks <= 0) e->o.n_blocks = 512;
    if (e->o.block_tokens <= 0) e->o.block_tokens = 16;
    if (e->o.max_step_tokens <= 0) e->o.max_step_tokens = 512;
    if (e->o.max_running <= 0) e->o.max_running = 64;
    if (e->o.max_queue <= 0) e->o.max_queue = 1024;
    if (e->o.max_running > e->o.max_step_tokens) e->o.max_running = e->o.max_step_tokens;
    e->m = m;
    e->max_ctx = m->max_ctx;
    e->next_id = 1;
    e->hold = -1;
    pthread_mutex_init(&e->mu, NULL);
    const eng_config *c = &m->cfg;
    e->window = c->n_sliding == c->n_layers ? c->sliding_window : 0;
    int T = e->o.max_step_tokens;
    if (bp_init(&e->bp, e->o.n_blocks, e->o.block_tokens, c, m->opt.kv_f16) != ENG_OK ||
        !(e->scratch = fwd_scratch_new(c, T, e->max_ctx, eng__pool_threads(e->m->pool))) ||
        !(e->sampler = eng__sampler_new(c->vocab_size)) ||
        !(e->logits = malloc((size_t)e->o.max_running * c->vocab_size * sizeof(float))) ||
        !(e->b_tok = malloc((size_t)T * sizeof(int32_t))) || !(e->b_pos = malloc((size_t)T * sizeof(int32_t))) ||
        !(e->b_seq = malloc((size_t)T * sizeof(int32_t))) || !(e->b_rows = malloc((size_t)T * sizeof(int32_t))) ||
        !(e->tables = malloc((size_t)e->o.max_running * sizeof(kv_table))) ||
        !(e->batch = malloc((size_t)e->o.max_running * sizeof(seq *)))) {
        eng_engine_close(e);
        return eng__fail(err, errlen, ENG_ENOMEM, "out of memory for a pool of %d blocks of %d tokens", e->o.n_blocks,
                         e->o.block_tokens);
    }
    *out = e;
    return ENG_OK;
}

void eng_engine_close(eng_engine *e) {
    if (!e) return;
    seq_list *lists[] = {&e->waiting, &e->running, &e->done};
    for (int k = 0; k < 3; k++)
        for (seq *s = lists[k]->head, *n; s; s = n) {
            n = s->next;
            seq_free(s);
        }
    for (int i = 0; i < e->n_agents; i++) {
        free(e->agents[i]->tok); free(e->agents[i]->blk); free(e->agents[i]->tenant); free(e->agents[i]->id);
        free(e->agents[i]);
    }
    free(e->agents);
    for (int i = 0; i < e->n_scopes; i++) free(e->scopes[i]);
    free(e->scopes);
    bp_free(&e->bp);
    fwd_scratch_free(e->scratch);
    eng__sampler_free(e->sampler);
    free(e->logits); free(e->b_tok); free(e->b_pos); free(e->b_seq); free(e->b_rows); free(e->tables); free(e->batch);
    free(e->ev.ev); free(e->ev.text_off); free(e->ev.tok_off); free(e->ev.text); free(e->ev.toks);
    pthread_mutex_destroy(&e->mu);
    free(e);
}

/* ---- submit / cancel ------------------------------------------------------ */
/* The prefix-sharing scope of a tenant (e->mu held): 0 for everyone when
 * tenants share, else one per tenant, numbered from 1 on first sight.
 * -1 when out of memory. */
static int scope_of(eng_engine *e, const char *tenant) {
    if (e->o.share_prefix_across_tenants) return 0;
    for (int i = 0; i < e->n_scopes; i++)
        if (!strcmp(e->scopes[i], tenant)) return i + 1;
    if (e->n_scopes == e->cap_scopes) {
        int nc = e->cap_scopes ? e->cap_scopes * 2 : 8;
        char **ns = realloc(e->scopes, (size_t)nc * sizeof *ns);
        if (!ns) return -1;
        e->scopes = ns;
        e->cap_scopes = nc;
    }
    if (!(e->scopes[e->n_scopes] = dupstr(tenant))) return -1;
    return ++e->n_scopes;
}

#define MAX_NAME 255

/* Blocks a sequence of n_tok tokens, n_prompt of them to prefill, may hold
 * at once: all of them, or with every layer sliding, those of the window
 * plus the largest chunk a step computes. */
static long blocks_needed(const eng_engine *e, long n_prompt, long n_tok) {
    long B = e->bp.B, all = (n_tok + B - 1) / B;
    if (!e->window) return all;
    long chunk = n_prompt < e->o.max_step_tokens ? n_prompt : e->o.max_step_tokens;
    long slid = (e->window - 1 + chunk + B - 1) / B + 1;
    return slid < all ? slid : all;
}

/* With every layer sliding: give back the blocks wholly before the window of
 * the next position to compute (n_cached). */
static void release_behind(eng_engine *e, seq *s) {
    if (!e->window) return;
    int keep_from = s->n_cached - e->window + 1, B = e->bp.B;
    for (int k = 0; k < s->n_blk && (k + 1) * B <= keep_from; k++)
        if (s->blk[k] >= 0) {
            bp_decref(&e->bp, s->blk[k]);
            s->blk[k] = -1;
        }
}

/* Everything eng_submit checks before queueing; on ENG_OK *ids (malloc'd,
 * *n of them) is the prompt as token ids, or NULL when ids is NULL. */
static int validate(eng_engine *e, const eng_request *r, int32_t **ids_out, size_t *n_out, char *err, size_t errlen) {
    const eng_model *m = e->m;
    const eng_gen_params *p = &r->params;
    int has_agent = r->agent_id && r->agent_id[0];
    if (r->reset && !has_agent) return eng__fail(err, errlen, ENG_EINVAL, "reset needs an agent_id");
    if (has_agent && strlen(r->agent_id) > MAX_NAME)
        return eng__fail(err, errlen, ENG_EINVAL, "agent_id is longer than %d bytes", MAX_NAME);
    if (r->tenant && strlen(r->tenant) > MAX_NAME)
        return eng__fail(err, errlen, ENG_EINVAL, "tenant is longer than %d bytes", MAX_NAME);
    if (p->max_tokens <= 0) return eng__fail(err, errlen, ENG_EMAXTOK, "max_tokens must be positive (got %d)", p->max_tokens);
    int rc = eng_sampling_check(&p->sampling, err, errlen);
    if (rc) return rc;
    for (int i = 0; i < p->n_stop; i++)
        if (!p->stop[i]) return eng__fail(err, errlen, ENG_EINVAL, "stop string %d is NULL", i);

    int32_t *ids = NULL;
    size_t n = 0;
    if (r->text) {
        if ((rc = eng_tok_encode(m->tok, r->text, r->text_len, r->add_special, &ids, &n)))
            return eng__fail(err, errlen, rc, "prompt: %s", eng_strerror(rc));
    } else if (r->n_ids) {
        ids = malloc(r->n_ids * sizeof *ids);
        if (!ids) return eng__fail(err, errlen, ENG_ENOMEM, "out of memory");
        memcpy(ids, r->ids, r->n_ids * sizeof *ids);
        n = r->n_ids;
    }
    if (n == 0) { free(ids); return eng__fail(err, errlen, ENG_EEMPTY, "prompt is empty"); }
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= m->cfg.vocab_size) {
            int32_t bad = ids[i];
            free(ids);
            return eng__fail(err, errlen, ENG_ETOKEN, "prompt token %zu: id %d is outside the vocabulary [0, %d)", i,
                             bad, m->cfg.vocab_size);
        }
    if (n + (size_t)p->max_tokens > (size_t)e->max_ctx) {
        free(ids);
        return eng__fail(err, errlen, ENG_ECONTEXT, "prompt (%zu tokens) + max_tokens (%d) exceeds the context of %d",
                         n, p->max_tokens, e->max_ctx);
    }
    long need = blocks_needed(e, (long)n, (long)n + p->max_tokens);
    if (need > e->bp.n) {
        free(ids);
        return eng__fail(err, errlen, ENG_EPOOL, "prompt + max_tokens need %ld KV blocks but the pool has %d", need,
                         e->bp.n);
    }
    if (ids_out) *ids_out = ids; else free(ids);
    *n_out = n;
    return ENG_OK;
}

int eng_request_check(eng_engine *e, const eng_request *r, char *err, size_t errlen) {
    size_t n;
    return validate(e, r, NULL, &n, err, errlen);
}

int eng_submit(eng_engine *e, const eng_request *r, uint64_t *id, char *err, size_t errlen) {
    const eng_model *m = e->m;
    const eng_gen_params *p = &r->params;
    int has_agent = r->agent_id && r->agent_id[0];
    int32_t *ids;
    size_t n;
    int rc = validate(e, r, &ids, &n, err, errlen);
    if (rc) return rc;
    seq *s = calloc(1, sizeof *s);
    if (!s) { free(ids); return eng__fail(err, errlen, ENG_ENOMEM, "out of memory"); }
    s->tok = ids;
    s->n_tok = s->cap_tok = (int)n;
    s->max_tokens = p->max_tokens;
    s->sp = p->sampling;
    eng__rng_seed(&s->rng, p->sampling.seed);
    s->gen = eng__gen_new(m->tok, p, &m->cfg);
    s->tenant = dupstr(r->tenant);
    s->agent_id = has_agent ? dupstr(r->agent_id) : NULL;
    s->reset = r->reset;
    s->full_context = has_agent && r->full_context;
    if (!s->gen || !s->tenant || (has_agent && !s->agent_id)) {
        seq_free(s);
        return eng__fail(err, errlen, ENG_ENOMEM, "out of memory");
    }
    pthread_mutex_lock(&e->mu);
    if (e->waiting.n >= e->o.max_queue) {
        pthread_mutex_unlock(&e->mu);
        seq_free(s);
        return eng__fail(err, errlen, ENG_EQUEUE, "the queue is full (%d waiting)", e->o.max_queue);
    }
    if ((s->scope = scope_of(e, s->tenant)) < 0) {
        pthread_mutex_unlock(&e->mu);
        seq_free(s);
        return eng__fail(err, errlen, ENG_ENOMEM, "out of memory");
    }
    s->id = e->next_id++;
    s->state = SQ_WAITING;
    list_push(&e->waiting, s, 0);
    *id = s->id;
    pthread_mutex_unlock(&e->mu);
    return ENG_OK;
}

static seq *find_seq(eng_engine *e, uint64_t id) {
    seq_list *lists[] = {&e->running, &e->waiting};
    for (int k = 0; k < 2; k++)
        for (seq *s = lists[k]->head; s; s = s->next)
            if (s->id == id) return s;
    return NULL;
}

int eng_cancel(eng_engine *e, uint64_t id) {
    pthread_mutex_lock(&e->mu);
    seq *s = find_seq(e, id);
    int rc = ENG_ENOTFOUND;
    if (s && !s->cancelled && !s->in_batch && ev_reserve(&e->ev, 1)) {
        rc = ENG_ENOMEM; /* not cancelled: it still finishes by itself */
    } else if (s && !s->cancelled) {
        s->cancelled = 1;
        /* not in the forward pass right now: free its blocks at once */
        if (!s->in_batch) seq_finish(e, s, ENG_FINISH_CANCELLED, 0, NULL);
        rc = ENG_OK;
    }
    pthread_mutex_unlock(&e->mu);
    return rc;
}

/* ---- scheduling ----------------------------------------------------------- */
/* A full-context request on agent a (idle, e->mu held): keep the agent's
 * history up to the longest common prefix with the prompt (leaving at least
 * one prompt token to compute) and its KV as far as it is still right, and
 * make s's prompt what follows. KV is kept only in blocks no one else can
 * see: a block holding the cut that is shared or in the prefix index is
 * recomputed from its start, as is everything when the cut falls behind a
 * sliding window's given-back blocks. */
static void keep_common_prefix(eng_engine *e, agent *a, seq *s) {
    int lcp = 0, B = e->bp.B;
    while (lcp < a->n_tok && lcp < s->n_tok - 1 && a->tok[lcp] == s->tok[lcp]) lcp++;
    if (lcp < a->n_tok) s->usage.history_diverged = 1;
    int keep = lcp < a->n_cached ? lcp : a->n_cached;
    if (keep < a->n_cached && keep % B) {
        int b = a->blk[keep / B];
        if (b < 0 || e->bp.ref[b] > 1 || e->bp.registered[b]) keep -= keep % B;
    }
    int first_needed = e->window && keep - e->window + 1 > 0 ? keep - e->window + 1 : 0;
    if (keep > 0 && a->blk[first_needed / B] < 0) keep = 0; /* the window reaches into given-back blocks */
    if (keep == 0) {
        agent_release_blocks(e, a);
    } else {
        int nb = (keep + B - 1) / B;
        for (int i = nb; i < a->n_blk; i++)
            if (a->blk[i] >= 0) bp_decref(&e->bp, a->blk[i]);
        if (a->n_blk > nb) a->n_blk = nb;
        a->n_cached = keep;
        if (a->n_foreign > keep) a->n_foreign = keep;
    }
    a->n_tok = lcp;
    memmove(s->tok, s->tok + lcp, (size_t)(s->n_tok - lcp) * sizeof *s->tok);
    s->n_tok -= lcp;
}

/* Admit a waiting sequence: join its agent's context, take cached prefix
 * blocks. Returns 0 if admitted, 1 if it must wait (agent busy), -1 if it was
 * finished with an error. */
static int admit(eng_engine *e, seq *s) {
    if (!s->admitted && s->agent_id) {
        agent *a = agent_find(e, s->tenant, s->agent_id, NULL);
        if (a && a->busy) return 1;
        if (!a && !(a = agent_new(e, s->tenant, s->agent_id))) {
            seq_finish(e, s, ENG_FINISH_ERROR, ENG_ENOMEM, "out of memory");
            return -1;
        }
        if (s->reset) {
            agent_release_blocks(e, a);
            a->n_tok = 0;
        }
        if (s->full_context) keep_common_prefix(e, a, s);
        long total = (long)a->n_tok + s->n_tok;
        if (total + s->max_tokens > e->max_ctx) {
            char msg[160];
            snprintf(msg, sizeof msg, "agent history (%d) + prompt (%d) + max_tokens (%d) exceeds the context of %d",
                     a->n_tok, s->n_tok, s->max_tokens, e->max_ctx);
            seq_finish(e, s, ENG_FINISH_ERROR, ENG_ECONTEXT, msg);
            return -1;
        }
        if (blocks_needed(e, total, total + s->max_tokens) > e->bp.n) {
            seq_finish(e, s, ENG_FINISH_ERROR, ENG_EPOOL, "agent history + prompt + max_tokens can never fit in the KV pool");
            return -1;
        }
        if (seq_reserve_tok(s, (int)total + s->max_tokens) != ENG_OK) {
            seq_finish(e, s, ENG_FINISH_ERROR, ENG_ENOMEM, "out of memory");
            return -1;
        }
        memmove(s->tok + a->n_tok, s->tok, (size_t)s->n_tok * sizeof *s->tok);
        if (a->n_tok) memcpy(s->tok, a->tok, (size_t)a->n_tok * sizeof *s->tok);
        s->n_tok = (int)total;
        free(s->blk);
        s->blk = a->blk;
        s->n_blk = s->cap_blk = a->n_blk;
        s->n_cached = a->n_cached;
        s->n_foreign = a->n_foreign;
        a->blk = NULL;
        a->n_blk = 0;
        a->n_cached = 0;
        a->busy = 1;
    }
    if (seq_reserve_tok(s, s->n_tok + s->max_tokens) != ENG_OK) {
        seq_finish(e, s, ENG_FINISH_ERROR, ENG_ENOMEM, "out of memory");
        return -1;
    }
    /* reuse cached full blocks of the same prefix (at least one token is
     * always computed, to have logits) */
    if (s->n_blk == 0) {
        int B = e->bp.B, parent = -1, nfull = (s->n_tok - 1) / B, hits = 0;
        if (s->cap_blk < nfull) {
            int32_t *nb = realloc(s->blk, (size_t)(nfull ? nfull : 1) * sizeof *nb);
            if (!nb) { seq_finish(e, s, ENG_FINISH_ERROR, ENG_ENOMEM, "out of memory"); return -1; }
            s->blk = nb;
            s->cap_blk = nfull;
        }
        for (int k = 0; k < nfull; k++) {
            int b = bp_lookup(&e->bp, parent, s->scope, s->tok + (size_t)k * B);
            if (b < 0) break;
            bp_incref(&e->bp, b);
            s->blk[s->n_blk++] = b;
            parent = b;
            hits++;
        }
        s->n_cached = hits * B;
        e->prefix_hits += (uint64_t)hits * B;
    }
    if (!s->admitted) {
        s->gen_start = s->n_tok;
        s->usage.prompt_tokens = s->n_tok;
        s->usage.cached_tokens = s->n_cached;
        s->admitted = 1;
    }
    list_remove(&e->waiting, s);
    list_push(&e->running, s, 0);
    s->state = SQ_RUNNING;
    return 0;
}

/* Put a running sequence back at the front of the queue; it recomputes its
 * context when readmitted (its prefix blocks may still be cached). */
static void preempt(eng_engine *e, seq *s) {
    seq_release_blocks(e, s);
    list_remove(&e->running, s);
    list_push(&e->waiting, s, 1);
    s->state = SQ_WAITING;
    e->preemptions++;
}

/* Give s blocks for positions up to `upto` (exclusive); copy-on-write the
 * block holding position n_cached if it is shared. ENG_OK or ENG_EPOOL. */
static int ensure_blocks(eng_engine *e, seq *s, int upto) {
    bpool *p = &e->bp;
    int need = (upto + p->B - 1) / p->B;
    if (need > s->cap_blk) {
        int32_t *nb = realloc(s->blk, (size_t)need * sizeof *nb);
        if (!nb) return ENG_ENOMEM;
        s->blk = nb;
        s->cap_blk = need;
    }
    int first = s->n_cached / p->B;
    if (first < s->n_blk && p->ref[s->blk[first]] > 1) {
        int nb = bp_alloc(p);
        while (nb < 0 && evict_idle_agent(e)) nb = bp_alloc(p);
        if (nb < 0) return ENG_EPOOL;
        size_t bb = p->kv.block_elems * p->kv.esz;
        memcpy((char *)p->kv.mem + (size_t)nb * bb, (char *)p->kv.mem + (size_t)s->blk[first] * bb, bb);
        bp_decref(p, s->blk[first]);
        s->blk[first] = nb;
    }
    while (s->n_blk < need) {
        int b = bp_alloc(p);
        while (b < 0 && evict_idle_agent(e)) b = bp_alloc(p);
        if (b < 0) return ENG_EPOOL;
        s->blk[s->n_blk++] = b;
    }
    return ENG_OK;
}

/* Register the full blocks that tok[0..n_cached) completed. A chain is only
 * extended from a registered parent: a block that duplicates one registered
 * by a twin sequence stays unregistered, its hash is stale, and children
 * hashed from it could later match KV computed after another prefix. A block
 * holding imported KV is never registered, so neither is anything after it
 * (its KV was computed from the imported one). */
static void register_full(eng_engine *e, seq *s, int before) {
    int B = e->bp.B;
    for (int k = before / B; k < s->n_cached / B; k++) {
        int parent = k ? s->blk[k - 1] : -1;
        if ((k && (parent < 0 || !e->bp.registered[parent])) || k * B < s->n_foreign) return; /* (a parent given back ends it) */
        bp_register(&e->bp, s->blk[k], parent, s->scope, s->tok + (size_t)k * B);
    }
}

/* Choose this step's work. Returns the number of sequences in the batch. */
static int schedule(eng_engine *e, int *n_tokens) {
    /* admit */
    for (seq *s = e->waiting.head, *n; s && e->running.n < e->o.max_running; s = n) {
        n = s->next;
        admit(e, s);
    }
    int budget = e->o.max_step_tokens, nb = 0;
    /* decoding sequences first (one token each), oldest first; then prefill chunks */
    for (int pass = 0; pass < 2; pass++) {
        for (seq *s = e->running.head, *n; s && budget > 0; s = n) {
            n = s->next;
            if (s->in_batch) continue;
            if (e->hold >= 0 && s->n_tok - s->gen_start >= e->hold) continue; /* held (tests only) */
            int left = s->n_tok - s->n_cached;
            if ((pass == 0) != (left == 1)) continue;
            int chunk = left < budget ? left : budget;
            while (ensure_blocks(e, s, s->n_cached + chunk) != ENG_OK) {
                /* preempt the youngest other sequence that is not in the batch */
                seq *victim = NULL;
                for (seq *v = e->running.tail; v; v = v->prev)
                    if (v != s && !v->in_batch) { victim = v; break; }
                if (!victim) break;
                if (victim == n) n = victim->next;
                preempt(e, victim);
            }
            if (s->n_blk * e->bp.B < s->n_cached + chunk) {
                /* no room even alone in the batch: wait for the batch to finish */
                if (nb == 0) { preempt(e, s); }
                continue;
            }
            s->in_batch = 1;
            s->chunk = chunk;
            e->batch[nb++] = s;
            budget -= chunk;
        }
    }
    *n_tokens = e->o.max_step_tokens - budget;
    return nb;
}

int eng_step(eng_engine *e, eng_event_cb cb, void *ud) {
    pthread_mutex_lock(&e->mu);
    /* room for every event this step can make: a token and a DONE per running sequence, a DONE per
     * waiting one refused at admission; without it, wait (nothing is lost, nothing runs) */
    if (ev_reserve(&e->ev, 2 * (size_t)(e->running.n + e->o.max_running) + (size_t)e->waiting.n)) {
        pthread_mutex_unlock(&e->mu);
        return 0;
    }
    int n_tokens = 0, nb = schedule(e, &n_tokens);
    if (nb == 0) {
        deliver(e, cb, ud);
        return 0;
    }
    /* lay out the batch: tokens of each sequence, logits for those that reach their end */
    int t = 0, n_out = 0;
    for (int i = 0; i < nb; i++) {
        seq *s = e->batch[i];
        e->tables[i] = (kv_table){s->blk, s->n_blk};
        for (int k = 0; k < s->chunk; k++, t++) {
            e->b_tok[t] = s->tok[s->n_cached + k];
            e->b_pos[t] = s->n_cached + k;
            e->b_seq[t] = i;
        }
        if (s->n_cached + s->chunk == s->n_tok) e->b_rows[n_out++] = t - 1;
    }
    fwd_batch b = {.n = t, .tokens = e->b_tok, .pos = e->b_pos, .seq = e->b_seq, .tables = e->tables,
                   .n_out = n_out, .out_rows = e->b_rows, .logits = e->logits};
    pthread_mutex_unlock(&e->mu);
    fwd_run(&e->m->cfg, &e->m->w, &e->bp.kv, e->scratch, (const float *const *)e->m->rope, e->m->pool, &b);
    pthread_mutex_lock(&e->mu);

    const size_t V = (size_t)e->m->cfg.vocab_size;
    int row = 0;
    for (int i = 0; i < nb; i++) {
        seq *s = e->batch[i];
        int before = s->n_cached, has_row = s->n_cached + s->chunk == s->n_tok;
        s->n_cached += s->chunk;
        s->in_batch = 0;
        register_full(e, s, before);
        release_behind(e, s);
        float *lg = has_row ? e->logits + (size_t)row++ * V : NULL;
        if (s->cancelled) {
            seq_finish(e, s, ENG_FINISH_CANCELLED, 0, NULL);
            continue;
        }
        if (!lg) continue;
        int32_t tok = eng__sample(e->sampler, &s->sp, &s->rng, lg, s->tok, (size_t)s->n_tok);
        s->tok[s->n_tok++] = tok;
        const char *d;
        size_t dl;
        int fin = eng__gen_push(s->gen, tok, &d, &dl);
        eng_event ev = {.kind = ENG_EV_TOKEN, .id = s->id, .token = tok};
        ev_add(&e->ev, &ev, d, dl, NULL, 0);
        if (fin != ENG_FINISH_NONE) seq_finish(e, s, fin, 0, NULL);
    }
    deliver(e, cb, ud);
    return n_tokens;
}

void eng_engine_hold(eng_engine *e, int n) {
    pthread_mutex_lock(&e->mu);
    e->hold = n < 0 ? -1 : n;
    pthread_mutex_unlock(&e->mu);
}

void eng_stats_get(eng_engine *e, eng_stats *st) {
    pthread_mutex_lock(&e->mu);
    memset(st, 0, sizeof *st);
    st->blocks_total = e->bp.n;
    st->blocks_free = e->bp.n_free + e->bp.n_cached;
    st->blocks_cached = e->bp.n_cached;
    st->blocks_used = e->bp.n - st->blocks_free;
    for (int i = 0; i < e->bp.n; i++) st->blocks_shared += e->bp.ref[i] > 1;
    st->block_tokens = e->bp.B;
    st->running = e->running.n;
    st->waiting = e->waiting.n;
    st->agents = e->n_agents;
    st->prefix_hit_tokens = e->prefix_hits;
    st->preemptions = e->preemptions;
    pthread_mutex_unlock(&e->mu);
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
    agent *a = agent_find(e, tenant, agent_id, NULL);
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
    agent *a = agent_find(e, tenant, agent_id, &idx);
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
    agent *a = agent_find(e, tenant, src, NULL), *b;
    if (!a) rc = ENG_ENOTFOUND;
    else if (a->busy) rc = ENG_EBUSY;
    else if (agent_find(e, tenant, dst, NULL)) rc = ENG_EEXIST;
    else if (!(b = agent_new(e, tenant, dst))) rc = ENG_ENOMEM;
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
                if (a->blk[i] >= 0) bp_incref(&e->bp, a->blk[i]);
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
    agent *a = agent_find(e, tenant, agent_id, NULL);
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
    if (agent_find(e, tenant, agent_id, NULL)) {
        rc = eng__fail(err, errlen, ENG_EEXIST, "agent \"%s\" exists; drop it first", agent_id);
        goto out;
    }
    blk = malloc((size_t)(need ? need : 1) * sizeof *blk);
    tok = malloc((size_t)(nt ? nt : 1) * sizeof *tok);
    if (!blk || !tok) { rc = eng__fail(err, errlen, ENG_ENOMEM, "out of memory"); goto out; }
    for (; got < need; got++) {
        if (got < skip) { blk[got] = -1; continue; }
        int b = bp_alloc(&e->bp);
        while (b < 0 && evict_idle_agent(e)) b = bp_alloc(&e->bp);
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
    if (!(a = agent_new(e, tenant, agent_id))) { rc = eng__fail(err, errlen, ENG_ENOMEM, "out of memory"); goto out; }
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
            if (blk[i] >= 0) bp_decref(&e->bp, blk[i]);
    free(blk);
    free(tok);
    pthread_mutex_unlock(&e->mu);
    return rc;
}
