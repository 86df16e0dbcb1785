/* pool.c — a small thread pool for the engine's own parallel loops (the
 * matmul kernel, attention, the element-wise steps; OpenBLAS runs
 * single-threaded inside them). After a job a worker polls for the next one
 * for SPIN_US (a decode step runs ~200 jobs back to back, and a futex
 * wake-up per job cost a third of the second core), then sleeps on a
 * condition variable, so idle workers do not hold a core between requests
 * (OpenMP's long-spinning workers did, and halved batched decode). */
#include "internal.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

struct eng__pool {
    pthread_mutex_t mu, run_mu;
    pthread_cond_t work_cv, done_cv;
    pthread_t *thr;
    int n_workers;
    /* the current job */
    void (*fn)(void *ctx, int task, int thread);
    void *ctx;
    int n_tasks, next, busy;
    unsigned gen;
    int stop;
    int profile;   /* KVSERVE_PROFILE: wait_s counts the caller's waits for the workers */
    double wait_s;
};

/* Take tasks until none is left. */
static void drain(eng__pool *p, int thread) {
    for (;;) {
        pthread_mutex_lock(&p->mu);
        int t = p->next < p->n_tasks ? p->next++ : -1;
        pthread_mutex_unlock(&p->mu);
        if (t < 0) return;
        p->fn(p->ctx, t, thread);
    }
}

typedef struct {
    eng__pool *p;
    int id;
} worker_arg;

#define SPIN_US 200

/* Poll (without the lock) until the job generation moves past `seen`, stop
 * is set, or SPIN_US pass. */
static void spin(eng__pool *p, unsigned seen) {
    double until = eng__now() + SPIN_US * 1e-6;
    for (;;) {
        for (int i = 0; i < 64; i++) {
            if (__atomic_load_n(&p->gen, __ATOMIC_ACQUIRE) != seen || __atomic_load_n(&p->stop, __ATOMIC_RELAXED)) return;
#if defined(__x86_64__)
            __builtin_ia32_pause();
#endif
        }
        if (eng__now() > until) return;
    }
}

static void *worker(void *a) {
    worker_arg w = *(worker_arg *)a;
    free(a);
    eng__pool *p = w.p;
    unsigned seen = 0;
    for (;;) {
        spin(p, seen);
        pthread_mutex_lock(&p->mu);
        while (!p->stop && p->gen == seen) pthread_cond_wait(&p->work_cv, &p->mu);
        if (p->stop) {
            pthread_mutex_unlock(&p->mu);
            return NULL;
        }
        seen = p->gen;
        p->busy++;
        pthread_mutex_unlock(&p->mu);
        drain(p, w.id);
        pthread_mutex_lock(&p->mu);
        if (--p->busy == 0) pthread_cond_signal(&p->done_cv);
        pthread_mutex_unlock(&p->mu);
    }
}

eng__pool *eng__pool_new(int n_threads) {
    eng__pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
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
    pthread_mutex_lock(&p->mu);
    __atomic_store_n(&p->stop, 1, __ATOMIC_RELAXED);
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

void eng__pool_run(eng__pool *p, int n_tasks, void (*fn)(void *ctx, int task, int thread), void *ctx) {
    if (!p || p->n_workers == 0 || n_tasks <= 1) {
        for (int t = 0; t < n_tasks; t++) fn(ctx, t, 0);
        return;
    }
    pthread_mutex_lock(&p->run_mu); /* one job at a time */
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->ctx = ctx;
    p->n_tasks = n_tasks;
    p->next = 0;
    __atomic_add_fetch(&p->gen, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&p->work_cv);
    pthread_mutex_unlock(&p->mu);
    drain(p, 0);
    /* all tasks are taken; wait for the workers still running one: poll
     * first (they finish within microseconds), then sleep */
    double t0 = eng__now(), until = t0 + SPIN_US * 1e-6;
    while ((__atomic_load_n(&p->busy, __ATOMIC_ACQUIRE) > 0 || __atomic_load_n(&p->next, __ATOMIC_ACQUIRE) < n_tasks) &&
           eng__now() < until) {
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
    }
    pthread_mutex_lock(&p->mu);
    while (p->busy > 0 || p->next < p->n_tasks) pthread_cond_wait(&p->done_cv, &p->mu);
    pthread_mutex_unlock(&p->mu);
    if (p->profile) p->wait_s += eng__now() - t0;
    pthread_mutex_unlock(&p->run_mu);
}

double eng__pool_wait(const eng__pool *p) { return p ? p->wait_s : 0; }
