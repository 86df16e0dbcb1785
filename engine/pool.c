/* pool.c — a small thread pool for the engine's own parallel loops (the
 * matmul kernel, attention, the element-wise steps; OpenBLAS runs
 * single-threaded inside them).
 *
 * A decode step runs ~120 jobs back to back, each a few microseconds of
 * streaming weights, so a job's hand-off has to cost well under a
 * microsecond: no lock on the way. A job is published by one 64-bit word,
 * `state` = generation | task count | next task, which the workers poll;
 * a task is claimed by a compare-and-swap on it that also checks the
 * generation (a late worker never takes a task of a newer job), and the
 * caller waits for the count of finished tasks. After a job a worker keeps
 * polling for SPIN_US, then sleeps on a condition variable (so idle workers
 * do not hold a core between requests: OpenMP's long-spinning workers did,
 * and halved batched decode); the caller, too, polls before it sleeps. The
 * sleeps use a count of sleepers checked after the publishing store, both
 * sequentially consistent, so no wake-up is lost. */
#include "internal.h"

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* state: one-per-thread job (1 bit) | generation (23 bits) | tasks (20 bits) | next task (20 bits) */
#define NEXT_BITS 20
#define MAX_TASKS ((1 << NEXT_BITS) - 1)
#define GEN_MASK 0x7FFFFFu
#define ST_NEXT(s) ((int)((s) & MAX_TASKS))
#define ST_TASKS(s) ((int)(((s) >> NEXT_BITS) & MAX_TASKS))
#define ST_GEN(s) ((uint32_t)((s) >> (2 * NEXT_BITS)) & GEN_MASK)
#define ST_EACH (1ull << 63)

#define SPIN_US 200

struct eng__pool {
    /* polled by every thread: a line of its own each */
    _Alignas(64) uint64_t state;
    _Alignas(64) int finished; /* tasks of the current job done */
    _Alignas(64) void (*fn)(void *ctx, int task, int thread);
    void *ctx;
    int sleepers;      /* workers asleep on work_cv */
    int caller_asleep; /* the caller asleep on done_cv */
    int stop;
    int n_workers;
    uint32_t gen;
    pthread_mutex_t mu, run_mu;
    pthread_cond_t work_cv, done_cv;
    pthread_t *thr;
    int profile; /* KVSERVE_PROFILE: wait_s counts the caller's waits for the workers */
    double wait_s;
};

static inline void relax(void) {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
}

/* Claim a task of job `gen`: its index, or -1 when that job has none left
 * (or is no longer the current one). *n: the job's task count. */
static int claim(eng__pool *p, uint32_t gen, int *n) {
    uint64_t s = __atomic_load_n(&p->state, __ATOMIC_ACQUIRE);
    for (;;) {
        if (ST_GEN(s) != gen || ST_NEXT(s) >= ST_TASKS(s)) return -1;
        if (__atomic_compare_exchange_n(&p->state, &s, s + 1, 1, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            *n = ST_TASKS(s);
            return ST_NEXT(s);
        }
    }
}

/* Run tasks of job `gen` until none is left. A claimed task keeps its job
 * current (the caller waits for it), so fn and ctx read after the claim are
 * that job's. */
/* Count a finished task of a job of n; the last one wakes a sleeping caller. */
static void finish(eng__pool *p, int n) {
    if (__atomic_add_fetch(&p->finished, 1, __ATOMIC_SEQ_CST) == n && __atomic_load_n(&p->caller_asleep, __ATOMIC_SEQ_CST)) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_signal(&p->done_cv);
        pthread_mutex_unlock(&p->mu);
    }
}

static void work(eng__pool *p, uint32_t gen, int thread) {
    int t, n;
    while ((t = claim(p, gen, &n)) >= 0) {
        p->fn(p->ctx, t, thread);
        finish(p, n);
    }
}

typedef struct {
    eng__pool *p;
    int id;
} worker_arg;

static void *worker(void *a) {
    worker_arg w = *(worker_arg *)a;
    free(a);
    eng__pool *p = w.p;
    uint32_t seen = 0;
    for (;;) {
        /* poll for a new job, then sleep */
        double until = eng__now() + SPIN_US * 1e-6;
        uint32_t g = seen;
        uint64_t st = 0;
        for (int i = 0;; i++) {
            st = __atomic_load_n(&p->state, __ATOMIC_ACQUIRE);
            g = ST_GEN(st);
            if (g != seen || __atomic_load_n(&p->stop, __ATOMIC_RELAXED)) break;
            relax();
            if ((i & 63) == 63 && eng__now() > until) break;
        }
        if (g == seen && !__atomic_load_n(&p->stop, __ATOMIC_RELAXED)) {
            pthread_mutex_lock(&p->mu);
            __atomic_add_fetch(&p->sleepers, 1, __ATOMIC_SEQ_CST);
            while (ST_GEN(__atomic_load_n(&p->state, __ATOMIC_SEQ_CST)) == seen &&
                   !__atomic_load_n(&p->stop, __ATOMIC_SEQ_CST))
                pthread_cond_wait(&p->work_cv, &p->mu);
            __atomic_sub_fetch(&p->sleepers, 1, __ATOMIC_SEQ_CST);
            pthread_mutex_unlock(&p->mu);
            continue;
        }
        if (__atomic_load_n(&p->stop, __ATOMIC_RELAXED)) return NULL;
        seen = g;
        if (st & ST_EACH) { /* its own task: the job waits for it */
            p->fn(p->ctx, w.id, w.id);
            finish(p, p->n_workers + 1);
        } else {
            work(p, g, w.id);
        }
    }
}

eng__pool *eng__pool_new(int n_threads) {
    eng__pool *p = aligned_alloc(64, (sizeof(eng__pool) + 63) / 64 * 64);
    if (!p) return NULL;
    memset(p, 0, sizeof *p);
    pthread_mutex_init(&p->mu, NULL);
    pthread_mutex_init(&p->run_mu, NULL);
    pthread_cond_init(&p->work_cv, NULL);
    pthread_cond_init(&p->done_cv, NULL);
    int n = n_threads > 1 ? n_threads - 1 : 0;
    const char *pe = getenv("KVSERVE_PROFILE");
    p->profile = pe && pe[0] && strcmp(pe, "0") != 0;
    p->thr = calloc((size_t)(n ? n : 1), sizeof *p->thr);
    if (!p->thr) { free(p); return NULL; }
    for (int i = 0; i < n; i++) {
        worker_arg *a = malloc(sizeof *a);
        if (!a) break;
        a->p = p;
        a->id = i + 1;
        if (pthread_create(&p->thr[i], NULL, worker, a) != 0) { free(a); break; }
        p->n_workers++;
    }
    return p;
}

void eng__pool_free(eng__pool *p) {
    if (!p) return;
    __atomic_store_n(&p->stop, 1, __ATOMIC_SEQ_CST);
    pthread_mutex_lock(&p->mu);
    pthread_cond_broadcast(&p->work_cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->n_workers; i++) pthread_join(p->thr[i], NULL);
    free(p->thr);
    pthread_mutex_destroy(&p->mu);
    pthread_mutex_destroy(&p->run_mu);
    pthread_cond_destroy(&p->work_cv);
    pthread_cond_destroy(&p->done_cv);
    free(p);
}

int eng__pool_threads(const eng__pool *p) { return p ? p->n_workers + 1 : 1; }

/* A job of more tasks than `state` counts runs as slices of MAX_TASKS. */
typedef struct {
    void (*fn)(void *ctx, int task, int thread);
    void *ctx;
    int base;
} slice;

static void slice_task(void *ctx, int task, int thread) {
    const slice *s = ctx;
    s->fn(s->ctx, s->base + task, thread);
}

/* Publish a job of n_tasks (each: one per thread), take part, wait for the rest. */
static void run_job(eng__pool *p, int n_tasks, int each, void (*fn)(void *ctx, int task, int thread), void *ctx) {
    pthread_mutex_lock(&p->run_mu); /* one job at a time */
    p->fn = fn;
    p->ctx = ctx;
    __atomic_store_n(&p->finished, 0, __ATOMIC_RELAXED);
    uint32_t gen = p->gen = (p->gen + 1) & GEN_MASK;
    uint64_t st = (uint64_t)gen << (2 * NEXT_BITS) | (uint64_t)n_tasks << NEXT_BITS | (each ? ST_EACH : 0);
    __atomic_store_n(&p->state, st, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&p->sleepers, __ATOMIC_SEQ_CST) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->work_cv);
        pthread_mutex_unlock(&p->mu);
    }
    if (each) {
        fn(ctx, 0, 0);
        finish(p, n_tasks);
    } else {
        work(p, gen, 0);
    }
    /* every task is claimed; wait for the ones still running: poll first
     * (they finish within microseconds), then sleep */
    double t0 = p->profile ? eng__now() : 0, until = eng__now() + SPIN_US * 1e-6;
    for (int i = 0; __atomic_load_n(&p->finished, __ATOMIC_ACQUIRE) < n_tasks; i++) {
        relax();
        if ((i & 63) == 63 && eng__now() > until) {
            pthread_mutex_lock(&p->mu);
            __atomic_store_n(&p->caller_asleep, 1, __ATOMIC_SEQ_CST);
            while (__atomic_load_n(&p->finished, __ATOMIC_SEQ_CST) < n_tasks) pthread_cond_wait(&p->done_cv, &p->mu);
            __atomic_store_n(&p->caller_asleep, 0, __ATOMIC_RELAXED);
            pthread_mutex_unlock(&p->mu);
            break;
        }
    }
    if (p->profile) p->wait_s += eng__now() - t0;
    pthread_mutex_unlock(&p->run_mu);
}

void eng__pool_run(eng__pool *p, int n_tasks, void (*fn)(void *ctx, int task, int thread), void *ctx) {
    if (!p || p->n_workers == 0 || n_tasks <= 1) {
        for (int t = 0; t < n_tasks; t++) fn(ctx, t, 0);
        return;
    }
    if (n_tasks > MAX_TASKS) {
        for (int b = 0; b < n_tasks; b += MAX_TASKS) {
            slice s = {fn, ctx, b};
            eng__pool_run(p, n_tasks - b < MAX_TASKS ? n_tasks - b : MAX_TASKS, slice_task, &s);
        }
        return;
    }
    run_job(p, n_tasks, 0, fn, ctx);
}

void eng__pool_each(eng__pool *p, void (*fn)(void *ctx, int task, int thread), void *ctx) {
    if (!p || p->n_workers == 0) {
        fn(ctx, 0, 0);
        return;
    }
    run_job(p, p->n_workers + 1, 1, fn, ctx);
}

double eng__pool_wait(const eng__pool *p) { return p ? p->wait_s : 0; }
