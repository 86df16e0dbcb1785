/* workers.h — a small pool of threads for the handlers that may block
 * (server-internal): Redis round trips (the Cache service), large prompts
 * to render and tokenize (Submit, Stream), agent exports and imports. The
 * completion-queue threads hand those calls over and go back to the queue,
 * so health checks, reflection, Step and Cancel never wait behind them. */
#ifndef KVSERVE_SRV_WORKERS_H
#define KVSERVE_SRV_WORKERS_H

typedef struct srv__workers srv__workers;

/* n threads (>= 1). 0, or -1 if not one could start. */
int srv__workers_open(srv__workers **out, int n);
/* Queue fn(arg): 0, or -1 when closed or out of memory (run it yourself). */
int srv__workers_run(srv__workers *w, void (*fn)(void *), void *arg);
/* Jobs queued or running now (for the metrics and the tests). */
int srv__workers_busy(srv__workers *w);
/* Run what is queued, then stop and join the threads. */
void srv__workers_close(srv__workers *w);

#endif
