/* internal.h — what the files of server/ share (not installed); names that
 * cross files start with srv__.
 *
 * Threads:
 *   completion-queue threads (cq_threads, dispatch.c)  run each finished gRPC
 *       operation's callback: handlers, sends, receives, closes;
 *   the engine thread (server.c)                        drives eng_step() and
 *       routes token events to their Stream or Step (generate.c);
 *   the batcher's thread (batcher.c)                    dispatches windows of
 *       Submit/Stream: prompt-cache lookups, then the engine;
 *   the cache writer (promptcache.c)                    writes completions and
 *       purges to Redis, in order;
 *   the agent keeper (agentstore.c)                     writes agents to Redis
 *       (spilled, idle) with --agent-save-after;
 *   two worker pools (workers.c, dispatch.c)            run the handlers that
 *       may block: Submit/Stream and agent export/import; the Cache service;
 *   libmicrohttpd's threads (metrics.c)                 serve /metrics.
 *
 * Locks, in the order they are taken (never the other way):
 *   srv.rq_mu  the request lock: the registry and every record in it, parked
 *              Steps, single-flight groups, and a generation call's engine
 *              link (eng_id, has_eng, cancel_seen). The engine thread routes
 *              each event under it; Step, Cancel and the batcher's dispatch
 *              take it too;
 *   srv.mu     the server lock: lifecycle (ready, serving, shutting_down,
 *              stop_engine, the engine wake-up), health watchers, the
 *              batcher handle and what waits there (pending), active_calls.
 *              Health checks, pool hand-offs and new calls take only this,
 *              briefly: the request paths never hold it for long;
 *   batcher.mu (batcher.c) under srv.mu (push, remove);
 *   call.mu    (call.c) each call's send queue and state;
 *   srv.jobs_mu the cache writer's queue and its purge count: a leaf;
 *   srv.keep_mu the agent keeper's spill queue (agentstore.c): a leaf, taken
 *              also under the engine's lock (the spill callback).
 * The engine's own lock is never held while it calls back (its event
 * callbacks run unlocked), so eng_submit/eng_cancel may be called under any
 * of these. */
#ifndef KVSERVE_SRV_INTERNAL_H
#define KVSERVE_SRV_INTERNAL_H

#include "srv.h"

#include "agentauth.h"
#include "batcher.h"
#include "descindex.h"
#include "workers.h"
#include "kvc.h"
#include "pbcheck.h"
#include "registry.h"
#include "pbio.h"
#include "metrics.h"

#include "grpc/health/v1/health.pb-c.h"
#include "grpc/reflection/v1/reflection.pb-c.h"
#include "kvserve/v1/kvserve.pb-c.h"

#include <errno.h>
#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <math.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>
#include <openssl/crypto.h>
#include <openssl/pem.h>
#include <openssl/sha.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

extern const unsigned char kvserve_descriptor_set[];
extern const size_t kvserve_descriptor_set_len;

typedef struct call call;
struct MHD_Daemon;

/* A call of the HTTP API to this server over the loopback channel (loopback.c). */
typedef struct loop_call {
    grpc_completion_queue *cq;
    grpc_call *call;
    grpc_metadata md;
    int has_md, status_pending, recv_pending, md_pending;
    grpc_metadata_array init_md, trail_md;
    grpc_status_code status;
    grpc_slice details;
    grpc_byte_buffer *recv;
} loop_call;

/* ---- calls ----------------------------------------------------------------- */
typedef struct tag {
    void (*fn)(call *c, int ok);
    call *c;
} tag;

typedef enum { K_UNARY, K_SSTREAM, K_BIDI } kind;
typedef void (*handler_fn)(call *c);

typedef struct {
    const char *path;
    kind k;
    handler_fn fn;
    int auth;       /* needs a valid token when tokens are configured */
    int needs_model;
    int drains;     /* still served while shutting down (Step, Cancel: they only touch existing requests) */
    int pool;       /* POOL_*: the handler runs on a worker pool, not on the completion-queue thread */
} method;

/* Handlers that may block run on worker pools (workers.c), so that the
 * completion-queue threads only ever do quick work: the Cache service's
 * Redis round trips on one pool (a stalled Redis holds only those), prompts
 * to render and tokenize and agent exports/imports on the other. */
enum { POOL_NONE = 0, POOL_GENERATE, POOL_REDIS };

typedef struct outmsg {
    grpc_byte_buffer *bb;
    struct outmsg *next;
} outmsg;

struct call {
    srv *s;
    int mi;                     /* method index, -1 for an unknown method */
    grpc_call *gc;
    gpr_timespec deadline;
    grpc_metadata_array md;
    grpc_call_details details;  /* unknown methods only */
    grpc_byte_buffer *payload;
    grpc_byte_buffer *recv_bb;
    tag t_new, t_send, t_close, t_recv, t_final;
    pthread_mutex_t mu;
    int refs;
    char tenant[256];
    outmsg *qh, *qt;
    int sending, finishing, status_started, broken;
    grpc_status_code fin_code;
    grpc_slice fin_details;
    int close_cancelled;
    int fin_set;                /* fin_details holds a slice */
    int close_started;          /* RECV_CLOSE_ON_SERVER is in flight */
    int closed;                 /* ... and has completed */
    uint64_t eng_id;            /* Stream: the engine request */
    int has_eng;
    int watcher;                /* Health.Watch */
    int reflection_v1alpha;
    uint32_t index;             /* tokens streamed so far */
    double t_start;             /* arrival, for latency metrics */
    int counted;                /* its status was counted in the metrics */
    int pending;                /* Submit/Stream waiting in the batcher (srv.mu) */
    void *pend_item;            /* ... as this item */
    int cancel_seen;            /* srv__on_close saw a client cancel (srv.rq_mu, like eng_id and has_eng) */
    struct call *next_watch;
};

/* What a cache write needs, deep-copied from the request. */
typedef struct cache_req {
    kvc_prompt_key k;
    int32_t *ids;
    char *tenant, *ns;
    char **stop;
    int ttl;
} cache_req;

/* A job for the cache writer: a completion to write, or a purge. */
typedef struct cache_job {
    char *purge_tenant, *purge_ns; /* a background purge of a namespace's superseded keys */
    cache_req *req;
    kvc_completion comp;
    struct cache_job *next;
} cache_job;

/* Single-flight: identical cacheable Streams in flight share one engine run. */
typedef struct follower {
    call *c;
    struct follower *next;
} follower;

typedef struct flight {
    char digest[65];
    uint64_t leader;            /* the engine request everyone waits for */
    follower *followers;
    struct flight *next;
} flight;

/* A request submitted by Submit or Stream, known to Step/Cancel by id. */
typedef struct rec {
    srv_reg_entry e;            /* id, tenant, lists (first member: a rec is its entry) */
    flight *flight;             /* the request leads a single-flight group */
    double t_start, t_last;     /* submission, last token: TTFT and inter-token latency */
    cache_req *cache;           /* write the completion to the prompt cache */
    char tenant[256];
    call *stream;               /* Stream owns it; else Step collects */
    Kvserve__V1__TokenEvent **tok;
    size_t n_tok, cap_tok;
    Kvserve__V1__Completion *comp;
    uint32_t index;
} rec;

typedef struct parked {         /* a Step waiting for events */
    call *c;
    uint64_t *ids;
    size_t n;
    double until;
    struct parked *next;
} parked;

typedef struct {
    unsigned char hash[SHA256_DIGEST_LENGTH];
    char tenant[256];
    int line;                   /* in the token file */
} token_ent;


struct srv {
    srv_config cfg;
    srv_agent_key akey;         /* signs agent exports, checks imports */
    grpc_server *server;
    grpc_completion_queue *cq;
    void **rm;
    pthread_t *cq_thr;
    int n_cq;
    eng_model *model;
    eng_engine *eng;
    eng_chat *chat;             /* the model's chat template, or NULL if it has none */
    char chat_why[256];         /* why there is none */
    pthread_mutex_t rq_mu;      /* the request lock (see the top of this file) */
    pthread_mutex_t mu;         /* the server lock */
    pthread_cond_t cv;
    int work, stop_engine, shutting_down, ready, serving;
    pthread_t eng_thr;
    int has_eng_thr;            /* eng_thr runs */
    int grpc_inited, started;   /* grpc_init() called; the gRPC server started */
    srv_reg *reg;               /* requests by id (Stream and Submit; rq_mu) */
    parked *parked;             /* rq_mu */
    call *watchers;
    token_ent *tokens;
    int n_tokens;
    srv__desc_index *desc;      /* the embedded descriptor set, for reflection */
    srv__workers *pools[3];     /* [POOL_GENERATE], [POOL_REDIS] */
    int active_calls;           /* generation calls in flight */
    kvc_redis *redis;
    kvc_prompt *pcache;
    kvc_rag *rag;
    srv_metrics *metrics;
    flight *flights;            /* rq_mu */
    uint64_t singleflight_joined; /* rq_mu */
    srv__batcher *batcher;       /* windows Submit/Stream before the cache and engine */
    uint64_t purged_keys;       /* superseded prompt-cache keys deleted (Invalidate purge + background; jobs_mu) */
    int pending;                /* requests in the batcher */
    pthread_t writer;
    pthread_mutex_t jobs_mu;
    struct cache_job *jobs, *jobs_tail; /* cache writes and purges for the writer thread, oldest first (jobs_mu) */
    pthread_cond_t jobs_cv;
    int writer_stop, has_writer;
    _Atomic uint64_t next_cached_id; /* ids of answers from the cache */
    /* agents' warm tier (agentstore.c; NULL astore: off) */
    kvc_redis *aredis;          /* its own connections: agents are large */
    kvc_agents *astore;
    pthread_t keeper;
    int has_keeper, has_keep_mu, keeper_stop;
    pthread_mutex_t keep_mu;    /* a leaf: the spill queue and the counts below */
    pthread_cond_t keep_cv;
    struct spill *spills, *spills_tail;
    size_t spill_bytes;
    uint64_t spills_dropped, restore_errors;
    /* the HTTP API (http.c, loopback.c) */
    struct MHD_Daemon *httpd;
    grpc_channel *loop_ch;      /* to this server's private Unix socket */
    char loop_dir[200];         /* ... in this directory (0700) */
    char model_name[256];       /* what /v1/models lists */
    long started_at;            /* Unix time of the start */
    tag t_shutdown;
    int shutdown_done;
};

/* A timestamped line on stderr (util.c). */
#define LOG_INFO(...) srv__logf("info", __VA_ARGS__)
#define LOG_WARN(...) srv__logf("warn", __VA_ARGS__)

/* In a handler: decode the call's request into `var` (a `type`), or finish
 * the call with INVALID_ARGUMENT saying why and return. */
#define UNPACK(type, desc, c, var)                                                                 \
    char var##_err[320];                                                                           \
    type *var = (type *)srv__unpack_request(&desc, (c)->payload, var##_err, sizeof var##_err);     \
    if (!var) {                                                                                    \
        srv__finish_errorf(c, GRPC_STATUS_INVALID_ARGUMENT, "%s", var##_err);                      \
        return;                                                                                    \
    }

/* the method table (dispatch.c) and the services health and reflection know (health.c) */
extern const method srv__methods[];
extern const int srv__n_methods;
#define N_METHODS srv__n_methods
extern const char *const srv__known_services[]; /* the first is "": the server as a whole */
extern const size_t srv__n_known_services;

/* util.c */
double srv__now_s(void);
grpc_status_code srv__status_of(int rc);
void srv__logf(const char *level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void srv__sleep_ms(long ms);

/* call.c */
ProtobufCMessage *srv__unpack_request(const ProtobufCMessageDescriptor *d, grpc_byte_buffer *bb, char *err,
                                        size_t errlen);
call *srv__call_new(srv *s, int mi);
void srv__call_ref(call *c);
void srv__call_unref(call *c);
void srv__count_call(call *c, grpc_status_code code);
void srv__cq_dispatch(call *c, void (*fn)(call *, int), tag *t);
void srv__fail_call(call *c, grpc_status_code code, const char *msg);
void srv__finish_call(call *c, grpc_status_code code, const char *msg, const ProtobufCMessage *reply);
void srv__finish_errorf(call *c, grpc_status_code code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void srv__stream_begin(call *c);
void srv__stream_end(call *c, grpc_status_code code, const char *msg);
void srv__stream_push(call *c, const ProtobufCMessage *m);

/* auth.c */
grpc_server_credentials *srv__make_creds(const srv_config *c);
int srv__authenticate(call *c);
int srv__load_tokens(srv *s, const char *path);

/* generate.c */
Kvserve__V1__FinishReason srv__finish_of(int f);
char *srv__dup_n(const char *p, size_t n);
int srv__rec_register(srv *s, rec *x, uint64_t id, const char *tenant, int streaming, char *err, size_t errlen);
rec *srv__rec_find(srv *s, uint64_t id, const char *tenant);
void srv__free_completion(Kvserve__V1__Completion *c);
void srv__h_stream(call *c);
void srv__h_submit(call *c);
void srv__on_batch(void *ud, void **items, size_t n);
void srv__on_batch_drop(void *ud, void *item, int reason);
void srv__on_close(call *c, int ok);
void srv__on_event(void *ud, const eng_event *ev);
void srv__rec_free(rec *r);
void srv__token_event_free(Kvserve__V1__TokenEvent *t);
void srv__h_score(call *c);
void srv__rec_unlink(srv *s, rec *r);
void srv__wake_engine(srv *s);
void srv__wake_engine_locked(srv *s);

/* promptcache.c */
cache_req *srv__cache_prepare(srv *s, const char *tenant, const Kvserve__V1__GenerateRequest *g, eng_request *r);
int srv__cacheable(const Kvserve__V1__GenerateRequest *g);
void *srv__writer_loop(void *p);
void srv__answer_cached(call *c, int streaming, kvc_completion *hit);
void srv__cache_enqueue(srv *s, cache_req *q, const eng_event *ev);
void srv__cache_req_free(cache_req *q);
void srv__flight_done(srv *s, rec *r, const eng_event *ev);
void srv__job_push(srv *s, cache_job *j);

/* step.c */
int srv__check_parked(srv *s, int all);
void srv__h_cancel(call *c);
void srv__h_stats(call *c);
void srv__h_step(call *c);

/* cache_rpc.c */
void srv__h_cache_stats(call *c);
void srv__h_invalidate(call *c);
void srv__h_rag_lookup(call *c);
void srv__h_rag_store(call *c);

/* agentstore.c */
int srv__agents_open(srv *s, char *err, size_t errlen);
void srv__agents_close(srv *s);
void srv__agent_fetch(srv *s, const char *tenant, const char *id, int reset);
int srv__agent_forget(srv *s, const char *tenant, const char *id);
void srv__agents_metrics(srv *s, srv_metrics_snapshot *m);

/* loopback.c */
int srv__loop_listen(srv *s);
void srv__loop_close(srv *s);
/* Start a unary or server-streaming call: the request sent and closed. 0 or -1. */
int srv__loop_start(srv *s, loop_call *c, const char *method, const ProtobufCMessage *req, const char *authorization);
/* The next message: 1 (*out), 0 at the end of the stream, -1 after timeout_ms (< 0: wait for ever). */
int srv__loop_next(loop_call *c, const ProtobufCMessageDescriptor *d, ProtobufCMessage **out, int timeout_ms);
void srv__loop_cancel(loop_call *c);
/* Wait for the status, free the call: the status code (its details into msg). */
int srv__loop_finish(loop_call *c, char *msg, size_t msglen);

/* http.c */
int srv__http_start(srv *s, char *err, size_t errlen);
void srv__http_stop(srv *s);

/* agents.c */
void srv__h_drop_agent(call *c);
void srv__h_export_agent(call *c);
void srv__h_get_agent(call *c);
void srv__h_import_agent(call *c);
void srv__h_list_agents(call *c);

/* health.c */
void srv__h_health_check(call *c);
void srv__h_health_watch(call *c);
void srv__notify_watchers(srv *s);

/* reflection.c */
void srv__h_reflection(call *c);

/* dispatch.c */
const char *srv__method_name(const call *c);
void *srv__cq_loop(void *p);
void srv__metrics_source(void *ud, srv_metrics_snapshot *m);
void srv__on_shutdown(call *c, int ok);
void srv__request_call(srv *s, int mi);

#endif
