/* workers.c — the pool of threads for handlers that may block (workers.h):
 * a FIFO of jobs under one lock, n threads taking them in order. */
#include "workers.h"

#include <pthread.h>
#include <stdlib.h>

typedef struct job {
    void (*fn)(void *);
    void *arg;
    struct job *next;
} job;

struct srv__workers {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    job *head, *tail;
    int busy;                   /* queued + running */
    int stop;
    pthread_t *thr;
    int n;
};

static void *loop(void *p) {
    srv__workers *w = p;
    pthread_mutex_lock(&w->mu);
    for (;;) {
        while (!w->head && !w->stop) pthread_cond_wait(&w->cv, &w->mu);
        job *j = w->head;
        if (!j) break; /* stopping, and nothing left */
        w->head = j->next;
        if (!w->head) w->tail = NULL;
        pthread_mutex_unlock(&w->mu);
        j->fn(j->arg);
        free(j);
        pthread_mutex_lock(&w->mu);
        w->busy--;
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

int srv__workers_open(srv__workers **out, int n) {
    *out = NULL;
    srv__workers *w = calloc(1, sizeof *w);
    if (!w || n < 1 || !(w->thr = calloc((size_t)n, sizeof *w->thr))) {
        free(w);
        return -1;
    }
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    while (w->n < n && pthread_create(&w->thr[w->n], NULL, loop, w) == 0) w->n++;
    if (!w->n) {
        srv__workers_close(w);
        return -1;
    }
    *out = w;
    return 0;
}

int srv__workers_run(srv__workers *w, void (*fn)(void *), void *arg) {
    job *j = w ? malloc(sizeof *j) : NULL;
    if (!j) return -1;
    j->fn = fn;
    j->arg = arg;
    j->next = NULL;
    pthread_mutex_lock(&w->mu);
    if (w->stop) {
        pthread_mutex_unlock(&w->mu);
        free(j);
        return -1;
    }
    if (w->tail) w->tail->next = j; else w->head = j;
    w->tail = j;
    w->busy++;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
    return 0;
}

int srv__workers_busy(srv__workers *w) {
    if (!w) return 0;
    pthread_mutex_lock(&w->mu);
    int b = w->busy;
    pthread_mutex_unlock(&w->mu);
    return b;
}

void srv__workers_close(srv__workers *w) {
    if (!w) return;
    pthread_mutex_lock(&w->mu);
    w->stop = 1;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
    for (int i = 0; i < w->n; i++) pthread_join(w->thr[i], NULL);
    for (job *j = w->head, *n; j; j = n) { /* (only if no thread ever started) */
        n = j->next;
        j->fn(j->arg);
        free(j);
    }
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cv);
    free(w->thr);
    free(w);
}
