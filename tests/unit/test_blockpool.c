/* test_blockpool.c — the batch engine's KV block pool alone (engine/blockpool.c):
 * reference counts, the free stack, registration under a hash chain per
 * sharing scope, the LRU of cached blocks and its eviction. */
#include "batch.h"
#include "test.h"

static eng_config tiny_config(void) {
    eng_config c;
    memset(&c, 0, sizeof c);
    c.n_layers = 2;
    c.n_kv_heads = 1;
    c.head_dim = 4;
    return c;
}

static void test_alloc_refcount_free(void) {
    eng_config c = tiny_config();
    bpool p;
    CHECK(eng__bp_init(&p, 3, 4, &c, 0) == ENG_OK);
    int a = eng__bp_alloc(&p), b = eng__bp_alloc(&p), d = eng__bp_alloc(&p);
    CHECK(a >= 0 && b >= 0 && d >= 0 && a != b && b != d && a != d && p.n_free == 0);
    CHECK(eng__bp_alloc(&p) == -1); /* all owned, none cached */
    eng__bp_incref(&p, a);
    eng__bp_decref(&p, a);
    CHECK(p.ref[a] == 1 && p.n_free == 0);
    eng__bp_decref(&p, a); /* unregistered: back on the free stack */
    CHECK(p.ref[a] == 0 && p.n_free == 1 && p.n_cached == 0);
    CHECK(eng__bp_alloc(&p) == a);
    eng__bp_free(&p);
}

static void test_registered_blocks_cached_then_evicted_oldest_first(void) {
    eng_config c = tiny_config();
    bpool p;
    CHECK(eng__bp_init(&p, 2, 4, &c, 0) == ENG_OK);
    const int32_t t1[4] = {1, 2, 3, 4}, t2[4] = {5, 6, 7, 8};
    int x = eng__bp_alloc(&p), y = eng__bp_alloc(&p);
    eng__bp_register(&p, x, -1, 1, t1);      /* scope 1: a first block */
    eng__bp_register(&p, y, x, 1, t2);       /* its child */
    CHECK(eng__bp_lookup(&p, -1, 1, t1) == x && eng__bp_lookup(&p, x, 1, t2) == y);
    CHECK(eng__bp_lookup(&p, -1, 2, t1) == -1); /* another scope sees nothing */
    CHECK(eng__bp_lookup(&p, -1, 1, t2) == -1); /* the child only after its parent */
    eng__bp_decref(&p, x);
    eng__bp_decref(&p, y);
    CHECK(p.n_cached == 2 && p.n_free == 0 && p.ref[x] == 0);
    eng__bp_incref(&p, y); /* found again by a lookup: out of the LRU */
    CHECK(p.n_cached == 1 && p.ref[y] == 1);
    eng__bp_decref(&p, y); /* now y is the newest cached, x the oldest */
    int z = eng__bp_alloc(&p);
    CHECK(z == x && p.ref[x] == 1 && eng__bp_lookup(&p, -1, 1, t1) == -1); /* the oldest went, unregistered */
    /* x reused for another prefix: the old child's chain was hashed from x's old content, so it is
     * never found under the new one (admission only walks chains from registered blocks) */
    const int32_t t3[4] = {9, 9, 9, 9};
    eng__bp_register(&p, z, -1, 1, t3);
    CHECK(eng__bp_lookup(&p, -1, 1, t3) == z && eng__bp_lookup(&p, z, 1, t2) == -1);
    eng__bp_decref(&p, z);
    CHECK(p.n_free == 0 && p.n_cached == 2); /* both registered, both cached */
    eng__bp_free(&p);
}

int main(int argc, char **argv) {
    static const test_case tests[] = {
        {"alloc_refcount_free", test_alloc_refcount_free},
        {"registered_blocks_cached_then_evicted_oldest_first", test_registered_blocks_cached_then_evicted_oldest_first},
        {0, 0}};
    return run_tests(tests, argc, argv);
}
