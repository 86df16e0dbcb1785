/* test_batcher.c — the request batcher: the window and max_batch are
 * honoured, the queue is bounded, expired and removed items never reach
 * dispatch, close hands back what waits, and many producers lose nothing.
 * Waits below are bounded polls (they guard against hangs; nothing asserts
 * an upper bound on speed). Where a check needs this thread to have pushed
 * several items within one window, it measures that it did and is skipped
 * when a loaded machine kept it from doing so. */
#include "batcher.h"
#include "test.h"

#include <pthread.h>
#include <time.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* What the callbacks saw. */
typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int batches, items, max_seen;
    int sizes[64];
    double first_dispatch;
    int seen[4096];             /* dispatch count per item number */
    int dropped[4096];          /* drop reason per item number */
    int block;                  /* dispatch waits while set */
    int in_dispatch;
} rec;

static rec R;

static void reset(void) {
    pthread_mutex_destroy(&R.mu);
    pthread_cond_destroy(&R.cv);
    memset(&R, 0, sizeof R);
    pthread_mutex_init(&R.mu, NULL);
    pthread_cond_init(&R.cv, NULL);
}

static void on_batch(void *ctx, void **items, size_t n) {
    (void)ctx;
    pthread_mutex_lock(&R.mu);
    R.in_dispatch = 1;
    pthread_cond_broadcast(&R.cv);
    while (R.block) pthread_cond_wait(&R.cv, &R.mu);
    if (!R.batches) R.first_dispatch = now_s();
    if (R.batches < 64) R.sizes[R.batches] = (int)n;
    R.batches++;
    R.items += (int)n;
    if ((int)n > R.max_seen) R.max_seen = (int)n;
    for (size_t i = 0; i < n; i++) R.seen[(intptr_t)items[i]]++;
    R.in_dispatch = 0;
    pthread_cond_broadcast(&R.cv);
    pthread_mutex_unlock(&R.mu);
}

static void on_drop(void *ctx, void *item, int reason) {
    (void)ctx;
    pthread_mutex_lock(&R.mu);
    R.dropped[(intptr_t)item] = reason;
    pthread_cond_broadcast(&R.cv);
    pthread_mutex_unlock(&R.mu);
}

#define ITEM(i) ((void *)(intptr_t)(i))

#define BOUND_S 120 /* the bound on every wait for a state */

/* Wait (at most BOUND_S) until the callbacks have seen `items` dispatched. */
static int wait_items(int items) {
    double until = now_s() + BOUND_S;
    pthread_mutex_lock(&R.mu);
    while (R.items < items && now_s() < until) {
        pthread_mutex_unlock(&R.mu);
        sleep_ms(2);
        pthread_mutex_lock(&R.mu);
    }
    int ok = R.items >= items;
    pthread_mutex_unlock(&R.mu);
    return ok;
}

static srv__batcher *open_b(int max_batch, int window_ms, int max_queue) {
    srv__batcher *b = NULL;
    srv__batcher_options o = {max_batch, window_ms, max_queue};
    CHECK(srv__batcher_open(&b, &o, on_batch, on_drop, NULL) == 0);
    return b;
}

/* Fewer than max_batch: one dispatch of all of them, not before the window. */
static void test_window_is_honoured(void) {
    reset();
    srv__batcher *b = open_b(8, 300, 64);
    double t0 = now_s();
    for (int i = 1; i <= 3; i++) CHECK(srv__batcher_push(b, ITEM(i), 0) == 0);
    double pushed = now_s() - t0;
    CHECK(wait_items(3));
    if (pushed < 0.300) CHECK_MSG(R.batches == 1 && R.sizes[0] == 3, "%d batches", R.batches);
    else fprintf(stderr, "  (pushing took %.3f s, longer than the window: one-window check skipped)\n", pushed);
    CHECK_MSG(R.first_dispatch - t0 >= 0.300 - 0.001, "dispatched after %.3f s, window 0.300 s", R.first_dispatch - t0);
    srv__batcher_stats st;
    srv__batcher_stats_get(b, &st);
    CHECK(st.pushed == 3 && st.batches == (uint64_t)R.batches && st.dispatched == 3 && st.queued == 0);
    srv__batcher_close(b);
}

/* max_batch waiting dispatch at once; the rest wait for their window. */
static void test_max_batch_is_honoured(void) {
    reset();
    srv__batcher *b = open_b(4, 60000, 64);
    for (int i = 1; i <= 10; i++) CHECK(srv__batcher_push(b, ITEM(i), 0) == 0);
    CHECK(wait_items(8));
    srv__batcher_stats st;
    srv__batcher_stats_get(b, &st);
    CHECK_MSG(R.batches == 2 && R.sizes[0] == 4 && R.sizes[1] == 4, "batches %d", R.batches);
    CHECK(st.queued == 2);                          /* 9 and 10: their minute is not up */
    for (int i = 1; i <= 8; i++) CHECK(R.seen[i] == 1);
    srv__batcher_close(b);                           /* close hands them back */
    CHECK(R.dropped[9] == SRV__DROP_CLOSED && R.dropped[10] == SRV__DROP_CLOSED && !R.seen[9] && !R.seen[10]);
    CHECK(R.items == 8);
}

/* A window of 0 dispatches at once: one item alone is not held. */
static void test_zero_window(void) {
    reset();
    srv__batcher *b = open_b(16, 0, 64);
    CHECK(srv__batcher_push(b, ITEM(1), 0) == 0);
    CHECK(wait_items(1));
    CHECK(R.batches == 1 && R.sizes[0] == 1);
    srv__batcher_close(b);
}

/* While dispatch is busy the queue fills to max_queue; more is refused. */
static void test_bounded_queue(void) {
    reset();
    R.block = 1;
    srv__batcher *b = open_b(1, 0, 2);
    CHECK(srv__batcher_push(b, ITEM(1), 0) == 0);
    pthread_mutex_lock(&R.mu); /* item 1 is in dispatch, held there */
    double until = now_s() + BOUND_S;
    while (!R.in_dispatch && now_s() < until) {
        pthread_mutex_unlock(&R.mu);
        sleep_ms(1);
        pthread_mutex_lock(&R.mu);
    }
    CHECK(R.in_dispatch);
    pthread_mutex_unlock(&R.mu);
    CHECK(srv__batcher_push(b, ITEM(2), 0) == 0);
    CHECK(srv__batcher_push(b, ITEM(3), 0) == 0);
    CHECK(srv__batcher_push(b, ITEM(4), 0) == SRV__EFULL);
    srv__batcher_stats st;
    srv__batcher_stats_get(b, &st);
    CHECK(st.rejected == 1 && st.queued == 2);
    pthread_mutex_lock(&R.mu);
    R.block = 0;
    pthread_cond_broadcast(&R.cv);
    pthread_mutex_unlock(&R.mu);
    CHECK(wait_items(3));
    CHECK(R.seen[1] == 1 && R.seen[2] == 1 && R.seen[3] == 1 && !R.seen[4]);
    CHECK(R.max_seen == 1);
    srv__batcher_close(b);
}

/* Past its deadline before the window closes: dropped, never dispatched. */
static void test_expired_dropped(void) {
    reset();
    srv__batcher *b = open_b(8, 300, 64);
    double t0 = now_s();
    CHECK(srv__batcher_push(b, ITEM(1), now_s() + 0.05) == 0); /* dispatch is 0.3 s after it at the earliest */
    CHECK(srv__batcher_push(b, ITEM(2), now_s() + 3600) == 0);
    CHECK(srv__batcher_push(b, ITEM(3), 0) == 0);
    double pushed = now_s() - t0;
    CHECK(wait_items(2));
    CHECK(R.dropped[1] == SRV__DROP_EXPIRED && !R.seen[1]);
    CHECK(R.seen[2] == 1 && R.seen[3] == 1);
    if (pushed < 0.300) CHECK(R.sizes[0] == 2);
    srv__batcher_stats st;
    srv__batcher_stats_get(b, &st);
    CHECK(st.expired == 1 && st.dispatched == 2);
    srv__batcher_close(b);
}

/* A removed (cancelled) item is out: not dispatched, not dropped, order kept.
 * (A window of a minute: only max_batch dispatches within the test.) */
static void test_removed_never_dispatched(void) {
    reset();
    srv__batcher *b = open_b(8, 60000, 64);
    for (int i = 1; i <= 4; i++) CHECK(srv__batcher_push(b, ITEM(i), 0) == 0);
    CHECK(srv__batcher_remove(b, ITEM(2)) == 1);
    CHECK(srv__batcher_remove(b, ITEM(2)) == 0);
    CHECK(srv__batcher_remove(b, ITEM(99)) == 0);
    for (int i = 5; i <= 9; i++) CHECK(srv__batcher_push(b, ITEM(i), 0) == 0); /* 8 waiting: dispatched */
    CHECK(wait_items(8));
    CHECK(!R.seen[2] && !R.dropped[2] && R.seen[1] && R.seen[3] && R.seen[4] && R.seen[9]);
    CHECK(R.batches == 1 && R.sizes[0] == 8);
    CHECK(srv__batcher_remove(b, ITEM(3)) == 0); /* dispatched already */
    srv__batcher_stats st;
    srv__batcher_stats_get(b, &st);
    CHECK(st.removed == 1 && st.dispatched == 8);
    srv__batcher_close(b);
}

static void test_bad_options(void) {
    srv__batcher *b = (srv__batcher *)1;
    srv__batcher_options bad[] = {{0, 1, 8}, {4, -1, 8}, {8, 1, 4}};
    for (int i = 0; i < 3; i++) {
        CHECK(srv__batcher_open(&b, &bad[i], on_batch, on_drop, NULL) == SRV__EINVAL);
        CHECK(b == NULL);
    }
}

/* Four producers, 4000 items, a 1 ms window: each dispatched exactly once. */
static void *producer(void *arg) {
    srv__batcher *b = *(srv__batcher **)arg;
    static int next = 0;
    for (;;) {
        int i = __atomic_add_fetch(&next, 1, __ATOMIC_SEQ_CST);
        if (i > 4000) break;
        while (srv__batcher_push(b, ITEM(i), 0) == SRV__EFULL) sleep_ms(1);
    }
    return NULL;
}

static void test_many_producers(void) {
    reset();
    srv__batcher *b = open_b(8, 1, 256);
    pthread_t th[4];
    for (int i = 0; i < 4; i++) pthread_create(&th[i], NULL, producer, &b);
    for (int i = 0; i < 4; i++) pthread_join(th[i], NULL);
    CHECK(wait_items(4000));
    int once = 1;
    for (int i = 1; i <= 4000; i++) once &= R.seen[i] == 1;
    CHECK(once);
    CHECK(R.max_seen <= 8);
    srv__batcher_close(b);
}

int main(int argc, char **argv) {
    pthread_mutex_init(&R.mu, NULL);
    pthread_cond_init(&R.cv, NULL);
    static const test_case tests[] = {
        {"window_is_honoured", test_window_is_honoured},
        {"max_batch_is_honoured", test_max_batch_is_honoured},
        {"zero_window", test_zero_window},
        {"bounded_queue", test_bounded_queue},
        {"expired_dropped", test_expired_dropped},
        {"removed_never_dispatched", test_removed_never_dispatched},
        {"bad_options", test_bad_options},
        {"many_producers", test_many_producers},
        {NULL, NULL},
    };
    return run_tests(tests, argc, argv);
}
