/* blockpool.c — the KV block pool of the batch engine: blocks with reference
 * counts, full blocks registered under the hash chain of their tokens (a
 * sharing scope first), and an LRU of cached blocks nobody owns (batch.h). */
#include "batch.h"

static void lru_remove(bpool *p, int b) {
    ENG_CHECK(p->ref[b] == 0 && p->registered[b] && p->n_cached > 0);
    if (p->lru_prev[b] >= 0) p->lru_next[p->lru_prev[b]] = p->lru_next[b]; else p->lru_head = p->lru_next[b];
    if (p->lru_next[b] >= 0) p->lru_prev[p->lru_next[b]] = p->lru_prev[b]; else p->lru_tail = p->lru_prev[b];
    p->lru_prev[b] = p->lru_next[b] = -1;
    p->n_cached--;
}

static void lru_push(bpool *p, int b) {
    ENG_CHECK(p->ref[b] == 0 && p->lru_prev[b] < 0 && p->lru_next[b] < 0 && p->lru_head != b);
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
int eng__bp_lookup(const bpool *p, int parent, int scope, const int32_t *tok) {
    uint64_t h = chain_hash(p, parent, scope, tok);
    for (int b = p->bucket[h & (p->n_bucket - 1)]; b >= 0; b = p->chain[b])
        if (p->hash[b] == h && p->parent[b] == parent && p->scope[b] == scope &&
            memcmp(p->btok + (size_t)b * p->B, tok, (size_t)p->B * 4) == 0)
            return b;
    return -1;
}

/* Register a full block unless an identical one is registered already. */
void eng__bp_register(bpool *p, int b, int parent, int scope, const int32_t *tok) {
    if (p->registered[b] || eng__bp_lookup(p, parent, scope, tok) >= 0) return;
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
int eng__bp_alloc(bpool *p) {
    int b;
    if (p->n_free) b = p->free_stack[--p->n_free];
    else if (p->lru_head >= 0) {
        b = p->lru_head;
        lru_remove(p, b);
        unregister(p, b);
    } else return -1;
    ENG_CHECK(p->ref[b] == 0 && !p->registered[b]);
    p->ref[b] = 1;
    return b;
}

void eng__bp_incref(bpool *p, int b) {
    ENG_CHECK(b >= 0 && b < p->n && (p->ref[b] > 0 || p->registered[b]));
    if (p->ref[b] == 0) lru_remove(p, b); /* only registered blocks are found with ref 0 */
    p->ref[b]++;
}

void eng__bp_decref(bpool *p, int b) {
    ENG_CHECK(b >= 0 && b < p->n && p->ref[b] > 0);
    if (--p->ref[b] > 0) return;
    if (p->registered[b]) lru_push(p, b);
    else p->free_stack[p->n_free++] = b;
    ENG_CHECK(p->n_free + p->n_cached <= p->n);
}

int eng__bp_init(bpool *p, int n, int B, const eng_config *c, int kv_f16) {
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

void eng__bp_free(bpool *p) {
    kv_pool_free(&p->kv);
    free(p->ref); free(p->free_stack); free(p->lru_prev); free(p->lru_next); free(p->registered);
    free(p->hash); free(p->parent); free(p->scope); free(p->btok); free(p->chain); free(p->bucket);
}
