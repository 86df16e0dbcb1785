/* batch.h — what the files of the batch engine share (not installed):
 * blockpool.c (the KV block pool: reference counts, the prefix index's hash
 * chains, the LRU of cached blocks), batch.c (sequences, events, admission,
 * scheduling, the step) and agents.c (the agent registry, fork, export and
 * import). The engine's lock (eng_engine.mu) guards all of it. */
#ifndef KVSERVE_ENG_BATCH_H
#define KVSERVE_ENG_BATCH_H

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
    uint64_t version;       /* bumped whenever its history changes (a turn ends, import, restore) */
    uint64_t saved_version; /* the version the warm store holds (eng_agent_mark_saved; 0: none) */
    uint64_t tried_version; /* the version last handed out to be saved, and when */
    double tried_at;
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
    int logprobs, top_logprobs;
    struct score_wait *waiter; /* eng_engine_score: a scoring sequence (no events; logprobs of its prompt) */
    double *plp;            /* ... log P(tok[i+1] | tok[..i]) as the prefill computes them */
    int row0;               /* its first logits row in this step */
    eng_usage usage;
    int finish, error;
    char msg[200];
    struct seq *prev, *next;
} seq;

typedef struct {
    seq *head, *tail;
    int n;
} seq_list;

static inline void list_remove(seq_list *l, seq *s) {
    ENG_CHECK(l->n > 0 && (s->prev ? s->prev->next == s : l->head == s));
    if (s->prev) s->prev->next = s->next; else l->head = s->next;
    if (s->next) s->next->prev = s->prev; else l->tail = s->prev;
    s->prev = s->next = NULL;
    l->n--;
}

static inline void list_push(seq_list *l, seq *s, int front) {
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
    size_t *text_off, *tok_off, *lp_off; /* offsets into the arenas, fixed up at delivery */
    double *lps;            /* TOKEN events' logprob, then their top alternatives' */
    size_t lps_n, lps_cap;
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
    float *raw_row;         /* a logits row kept for logprobs when the repetition penalty changes it */
    eng_spill_cb spill;     /* told an unsaved agent's export before eviction frees its KV */
    void *spill_ud;
};

#define MAX_NAME 255 /* bytes of a tenant or agent id */

/* blockpool.c */
int eng__bp_alloc(bpool *p);
int eng__bp_init(bpool *p, int n, int B, const eng_config *c, int kv_f16);
int eng__bp_lookup(const bpool *p, int parent, int scope, const int32_t *tok);
void eng__bp_decref(bpool *p, int b);
void eng__bp_free(bpool *p);
void eng__bp_incref(bpool *p, int b);
void eng__bp_register(bpool *p, int b, int parent, int scope, const int32_t *tok);

/* agents.c */
agent *eng__agent_find(eng_engine *e, const char *tenant, const char *id, int *index);
agent *eng__agent_new(eng_engine *e, const char *tenant, const char *id);
char *eng__dupstr(const char *s);
int eng__evict_idle_agent(eng_engine *e);
int eng__agent_export_locked(eng_engine *e, const agent *a, uint8_t **buf, size_t *len, char *err, size_t errlen);
void eng__agent_release_blocks(eng_engine *e, agent *a);

#endif
