/* batcher.h — the request batcher (server-internal): a bounded queue of
 * opaque items and one thread that dispatches them in windows: when
 * `max_batch` wait, or `window_ms` after the oldest waiting arrival,
 * whichever comes first (window 0: at once, taking whatever arrived
 * meanwhile). Items past their deadline are dropped before dispatch; removed
 * items are never dispatched. Callbacks run on the batcher's thread, no lock
 * held. It knows nothing of gRPC, Redis or the engine (test_batcher). */
#ifndef KVSERVE_SRV_BATCHER_H
#define KVSERVE_SRV_BATCHER_H

#include <stddef.h>
#include <stdint.h>

/* Returns: 0, or one of these. */
enum { SRV__EINVAL = -1, SRV__ENOMEM = -2, SRV__EFULL = -3 };

typedef struct srv__batcher srv__batcher;

typedef struct srv__batcher_options {
    int max_batch;              /* >= 1 */
    int window_ms;              /* >= 0 */
    int max_queue;              /* >= max_batch; a push beyond it is SRV__EFULL */
} srv__batcher_options;

enum { SRV__DROP_EXPIRED = 1, SRV__DROP_CLOSED = 2 };
typedef void (*srv__batch_fn)(void *ctx, void **items, size_t n);   /* 1..max_batch items, arrival order */
typedef void (*srv__drop_fn)(void *ctx, void *item, int reason);    /* SRV__DROP_* */

int srv__batcher_open(srv__batcher **out, const srv__batcher_options *o, srv__batch_fn dispatch, srv__drop_fn drop,
                     void *ctx);
/* deadline: CLOCK_MONOTONIC seconds, 0 = none. 0 or SRV__EFULL. */
int srv__batcher_push(srv__batcher *b, void *item, double deadline);
/* 1 if the item was still waiting and is now out (the caller owns it again). */
int srv__batcher_remove(srv__batcher *b, void *item);
/* Stop the thread; items still waiting go to drop(SRV__DROP_CLOSED). */
void srv__batcher_close(srv__batcher *b);

typedef struct srv__batcher_stats {
    uint64_t pushed, rejected;          /* accepted; refused because full */
    uint64_t batches, dispatched;       /* windows dispatched and the items in them */
    uint64_t expired, removed, closed;  /* dropped before dispatch */
    size_t queued;                      /* waiting now */
} srv__batcher_stats;
void srv__batcher_stats_get(srv__batcher *b, srv__batcher_stats *s);

#endif
