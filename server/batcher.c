/* batcher.c — the request batcher: a bounded queue in front of the engine
 * and one thread that hands the queue over in windows.
 *
 * A window opens at the oldest waiting arrival. It is dispatched when
 * `max_batch` items wait or `window_ms` after that arrival, whichever comes
 * first; an item whose deadline passed is dropped before dispatch, and
 * a removed (cancelled) item is simply never dispatched. The callbacks run on
 * the batcher's thread with no lock held, so they may push again. */
#include "batcher.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
    void *item;
    double arrived;             /* monotonic seconds */
    double deadline;            /* monotonic seconds; 0 = none */
} slot;

struct srv__batcher {
    srv__batcher_options o;
    srv__batch_fn dispatch;
    srv__drop_fn drop;
    void *ctx;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t thr;
    slot *q;                    /* ring of o.max_queue slots */
    void **batch, **dead;       /* the thread's scratch: max_batch each */
    size_t head, n;
    int stop;
    srv__batcher_stats st;
};

static double mono_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void *run(void *p);

int srv__batcher_open(srv__batcher **out, const srv__batcher_options *o, srv__batch_fn dispatch, srv__drop_fn drop,
                     void *ctx) {
    *out = NULL;
    if (!o || o->max_batch < 1 || o->window_ms < 0 || o->max_queue < o->max_batch || !dispatch || !drop)
        return SRV__EINVAL;
    srv__batcher *b = calloc(1, sizeof *b);
    if (!b) return SRV__ENOMEM;
    b->o = *o;
    b->dispatch = dispatch;
    b->drop = drop;
    b->ctx = ctx;
    b->q = calloc((size_t)o->max_queue, sizeof *b->q);
    b->batch = calloc((size_t)o->max_batch, sizeof *b->batch);
    b->dead = calloc((size_t)o->max_batch, sizeof *b->dead);
    if (!b->q || !b->batch || !b->dead) goto fail;
    pthread_mutex_init(&b->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&b->cv, &ca);
    pthread_condattr_destroy(&ca);
    if (pthread_create(&b->thr, NULL, run, b)) {
        pthread_cond_destroy(&b->cv);
        pthread_mutex_destroy(&b->mu);
        goto fail;
    }
    *out = b;
    return 0;
fail:
    free(b->q);
    free(b->batch);
    free(b->dead);
    free(b);
    return SRV__ENOMEM;
}

int srv__batcher_push(srv__batcher *b, void *item, double deadline) {
    pthread_mutex_lock(&b->mu);
    if (b->stop || b->n == (size_t)b->o.max_queue) {
        b->st.rejected++;
        pthread_mutex_unlock(&b->mu);
        return SRV__EFULL;
    }
    b->q[(b->head + b->n) % (size_t)b->o.max_queue] = (slot){item, mono_s(), deadline};
    b->n++;
    b->st.pushed++;
    pthread_cond_signal(&b->cv);
    pthread_mutex_unlock(&b->mu);
    return 0;
}

int srv__batcher_remove(srv__batcher *b, void *item) {
    size_t cap = (size_t)b->o.max_queue;
    pthread_mutex_lock(&b->mu);
    size_t i = 0;
    while (i < b->n && b->q[(b->head + i) % cap].item != item) i++;
    int found = i < b->n;
    if (found) { /* close the gap, keeping arrival order */
        for (; i + 1 < b->n; i++) b->q[(b->head + i) % cap] = b->q[(b->head + i + 1) % cap];
        b->n--;
        b->st.removed++;
    }
    pthread_mutex_unlock(&b->mu);
    return found;
}

void srv__batcher_stats_get(srv__batcher *b, srv__batcher_stats *s) {
    pthread_mutex_lock(&b->mu);
    *s = b->st;
    s->queued = b->n;
    pthread_mutex_unlock(&b->mu);
}

/* Take up to max_batch items off the queue (mu held); expired ones go to
 * `dead` instead. */
static size_t take(srv__batcher *b, void **batch, void **dead, size_t *n_dead, double now) {
    size_t n = 0, cap = (size_t)b->o.max_queue;
    *n_dead = 0;
    while (b->n && n < (size_t)b->o.max_batch) {
        slot s = b->q[b->head];
        b->head = (b->head + 1) % cap;
        b->n--;
        if (s.deadline > 0 && s.deadline <= now) dead[(*n_dead)++] = s.item;
        else batch[n++] = s.item;
    }
    b->st.expired += *n_dead;
    if (n) {
        b->st.batches++;
        b->st.dispatched += n;
    }
    return n;
}

static void *run(void *p) {
    srv__batcher *b = p;
    size_t max = (size_t)b->o.max_batch;
    void **batch = b->batch, **dead = b->dead;
    pthread_mutex_lock(&b->mu);
    for (;;) {
        if (b->stop) break;
        if (!b->n) {
            pthread_cond_wait(&b->cv, &b->mu);
            continue;
        }
        /* the window is timed from the oldest waiting arrival */
        double now = mono_s(), end = b->q[b->head].arrived + b->o.window_ms / 1000.0;
        if (b->n < max && now < end) {
            struct timespec ts;
            double t = end;
            ts.tv_sec = (time_t)t;
            ts.tv_nsec = (long)((t - (double)ts.tv_sec) * 1e9);
            pthread_cond_timedwait(&b->cv, &b->mu, &ts);
            continue;
        }
        size_t n_dead, n = take(b, batch, dead, &n_dead, now);
        pthread_mutex_unlock(&b->mu);
        for (size_t i = 0; i < n_dead; i++) b->drop(b->ctx, dead[i], SRV__DROP_EXPIRED);
        if (n) b->dispatch(b->ctx, batch, n);
        pthread_mutex_lock(&b->mu);
    }
    /* closing: nothing more is dispatched */
    while (b->n) {
        void *it = b->q[b->head].item;
        b->head = (b->head + 1) % (size_t)b->o.max_queue;
        b->n--;
        b->st.closed++;
        pthread_mutex_unlock(&b->mu);
        b->drop(b->ctx, it, SRV__DROP_CLOSED);
        pthread_mutex_lock(&b->mu);
    }
    pthread_mutex_unlock(&b->mu);
    return NULL;
}

void srv__batcher_close(srv__batcher *b) {
    if (!b) return;
    pthread_mutex_lock(&b->mu);
    b->stop = 1;
    pthread_cond_signal(&b->cv);
    pthread_mutex_unlock(&b->mu);
    pthread_join(b->thr, NULL);
    pthread_cond_destroy(&b->cv);
    pthread_mutex_destroy(&b->mu);
    free(b->q);
    free(b->batch);
    free(b->dead);
    free(b);
}
