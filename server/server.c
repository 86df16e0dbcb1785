/* server.c — the gRPC service on the C core.
 *
 * Threads: `cq_threads` threads run the completion queue and dispatch each
 * finished operation to its tag's callback; one engine thread drives
 * eng_step() and routes token events to the calls that wait for them.
 * Every call is a small state machine with a reference count: one reference
 * per operation in flight plus one for whoever may still push to it.
 *
 * Lock order: srv.mu before call.mu; the engine's own lock is never held
 * while either is taken by the engine (its callbacks run unlocked). */
#include "srv.h"

#include "agentauth.h"
#include "batcher.h"
#include "descindex.h"
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

typedef struct srv srv;
typedef struct call call;

/* ---- small helpers -------------------------------------------------------- */
static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void logf_(const char *level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void logf_(const char *level, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    fprintf(stderr, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %s %s\n", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
            tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000, level, msg);
}
#define LOG_INFO(...) logf_("info", __VA_ARGS__)
#define LOG_WARN(...) logf_("warn", __VA_ARGS__)

/* Engine status -> gRPC status: the one place where the mapping lives. */
static grpc_status_code status_of(int rc) {
    switch (rc) {
    case ENG_OK: return GRPC_STATUS_OK;
    case ENG_EEMPTY: case ENG_EMAXTOK: case ENG_ECONTEXT: case ENG_ETOKEN: case ENG_EUTF8: case ENG_ESAMPLING:
    case ENG_EINVAL: case ENG_ECORRUPT: case ENG_EMODEL: return GRPC_STATUS_INVALID_ARGUMENT;
    case ENG_EQUEUE: case ENG_EPOOL: case ENG_ENOMEM: return GRPC_STATUS_RESOURCE_EXHAUSTED;
    case ENG_ENOTFOUND: return GRPC_STATUS_NOT_FOUND;
    case ENG_EBUSY: return GRPC_STATUS_FAILED_PRECONDITION;
    case ENG_EEXIST: return GRPC_STATUS_ALREADY_EXISTS;
    default: return GRPC_STATUS_INTERNAL;
    }
}

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
} method;

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
    int cancel_seen;            /* on_close saw a client cancel (srv.mu) */
    struct call *next_watch;
};

/* A request submitted by Submit or Stream, known to Step/Cancel by id. */
/* What a cache write needs, deep-copied from the request. */
typedef struct cache_req {
    kvc_prompt_key k;
    int32_t *ids;
    char *tenant, *ns;
    char **stop;
    int ttl;
} cache_req;

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
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int work, stop_engine, shutting_down, ready, serving;
    pthread_t eng_thr;
    srv_reg *reg;               /* requests by id (Stream and Submit) */
    parked *parked;
    call *watchers;
    token_ent *tokens;
    int n_tokens;
    srv__desc_index *desc;      /* the embedded descriptor set, for reflection */
    int active_calls;           /* generation calls in flight */
    kvc_redis *redis;
    kvc_prompt *pcache;
    kvc_rag *rag;
    srv_metrics *metrics;
    flight *flights;
    uint64_t singleflight_joined;
    srv__batcher *batcher;       /* windows Submit/Stream before the cache and engine */
    uint64_t purged_keys;       /* superseded prompt-cache keys deleted (Invalidate purge + background) */
    int pending;                /* requests in the batcher */
    pthread_t writer;
    struct cache_job *jobs, *jobs_tail; /* cache writes and purges for the writer thread, oldest first */
    pthread_cond_t jobs_cv;
    int writer_stop, has_writer;
    uint64_t next_cached_id;
    tag t_shutdown;
    int shutdown_done;
};

static void call_unref(call *c);

static void cq_dispatch(call *c, void (*fn)(call *, int), tag *t) {
    t->fn = fn;
    t->c = c;
}

static call *call_new(srv *s, int mi) {
    call *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->s = s;
    c->mi = mi;
    c->refs = 1;
    pthread_mutex_init(&c->mu, NULL);
    grpc_metadata_array_init(&c->md);
    grpc_call_details_init(&c->details);
    return c;
}

static void call_ref(call *c) {
    pthread_mutex_lock(&c->mu);
    c->refs++;
    pthread_mutex_unlock(&c->mu);
}

static void call_unref(call *c) {
    pthread_mutex_lock(&c->mu);
    int left = --c->refs;
    pthread_mutex_unlock(&c->mu);
    if (left) return;
    if (c->has_eng) { /* a Stream counts as in flight until its status is out */
        pthread_mutex_lock(&c->s->mu);
        c->s->active_calls--;
        pthread_mutex_unlock(&c->s->mu);
    }
    for (outmsg *m = c->qh, *n; m; m = n) {
        n = m->next;
        grpc_byte_buffer_destroy(m->bb);
        free(m);
    }
    if (c->payload) grpc_byte_buffer_destroy(c->payload);
    if (c->recv_bb) grpc_byte_buffer_destroy(c->recv_bb);
    if (c->fin_set) grpc_slice_unref(c->fin_details);
    grpc_metadata_array_destroy(&c->md);
    grpc_call_details_destroy(&c->details);
    if (c->gc) grpc_call_unref(c->gc);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

/* Unary (or early) answer: initial metadata, optional message, status. */
static void on_final(call *c, int ok) {
    (void)ok;
    call_unref(c);
}

static const char *method_name(const call *c);

static void count_call(call *c, grpc_status_code code) {
    pthread_mutex_lock(&c->mu);
    int first = !c->counted;
    c->counted = 1;
    pthread_mutex_unlock(&c->mu);
    if (first) srv_metrics_request(c->s->metrics, method_name(c), (int)code, now_s() - c->t_start);
}

static void finish_call(call *c, grpc_status_code code, const char *msg, const ProtobufCMessage *reply) {
    count_call(c, code);
    grpc_op ops[4];
    memset(ops, 0, sizeof ops);
    int n = 0;
    ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
    grpc_byte_buffer *bb = NULL;
    if (code == GRPC_STATUS_OK && reply) {
        bb = srv_pack(reply);
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n++].data.send_message.send_message = bb;
    }
    pthread_mutex_lock(&c->mu);
    c->status_started = 1;
    c->fin_code = code;
    c->fin_details = grpc_slice_from_copied_string(msg ? msg : "");
    c->fin_set = 1;
    pthread_mutex_unlock(&c->mu);
    ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[n].data.send_status_from_server.status = code;
    ops[n++].data.send_status_from_server.status_details = &c->fin_details;
    if (!c->close_started) {
        ops[n].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
        ops[n++].data.recv_close_on_server.cancelled = &c->close_cancelled;
    }
    cq_dispatch(c, on_final, &c->t_final);
    if (grpc_call_start_batch(c->gc, ops, (size_t)n, &c->t_final, NULL) != GRPC_CALL_OK) call_unref(c);
    if (bb) grpc_byte_buffer_destroy(bb);
}

static void finish_errorf(call *c, grpc_status_code code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void finish_errorf(call *c, grpc_status_code code, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    finish_call(c, code, msg, NULL);
}

/* ---- streaming: one send in flight, status after the last message ---------- */
static void stream_kick(call *c); /* with c->mu held */

static void on_send(call *c, int ok) {
    pthread_mutex_lock(&c->mu);
    c->sending = 0;
    if (!ok) c->broken = 1;
    stream_kick(c);
    pthread_mutex_unlock(&c->mu);
    call_unref(c);
}

static void on_status_sent(call *c, int ok) {
    (void)ok;
    call_unref(c);
}

static void stream_kick(call *c) {
    if (c->sending || c->status_started) return;
    if (c->qh && !c->broken) {
        outmsg *m = c->qh;
        c->qh = m->next;
        if (!c->qh) c->qt = NULL;
        grpc_op op;
        memset(&op, 0, sizeof op);
        op.op = GRPC_OP_SEND_MESSAGE;
        op.data.send_message.send_message = m->bb;
        c->sending = 1;
        c->refs++;
        cq_dispatch(c, on_send, &c->t_send);
        if (grpc_call_start_batch(c->gc, &op, 1, &c->t_send, NULL) != GRPC_CALL_OK) {
            c->sending = 0;
            c->broken = 1;
            c->refs--;
        }
        grpc_byte_buffer_destroy(m->bb);
        free(m);
        return;
    }
    if (c->finishing && (!c->qh || c->broken)) {
        grpc_op op;
        memset(&op, 0, sizeof op);
        c->status_started = 1;
        op.op = GRPC_OP_SEND_STATUS_FROM_SERVER;
        op.data.send_status_from_server.status = c->fin_code;
        op.data.send_status_from_server.status_details = &c->fin_details;
        c->refs++;
        cq_dispatch(c, on_status_sent, &c->t_final);
        if (grpc_call_start_batch(c->gc, &op, 1, &c->t_final, NULL) != GRPC_CALL_OK) c->refs--;
    }
}

static void on_close(call *c, int ok);

/* Send initial metadata and watch for the end of the call. */
static void stream_begin(call *c) {
    grpc_op ops[2];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    ops[1].data.recv_close_on_server.cancelled = &c->close_cancelled;
    c->close_started = 1;
    call_ref(c);
    cq_dispatch(c, on_close, &c->t_close);
    if (grpc_call_start_batch(c->gc, ops, 2, &c->t_close, NULL) != GRPC_CALL_OK) call_unref(c);
}

static void stream_push(call *c, const ProtobufCMessage *m) {
    outmsg *o = malloc(sizeof *o);
    if (!o) return;
    o->bb = srv_pack(m);
    o->next = NULL;
    pthread_mutex_lock(&c->mu);
    if (c->broken || c->finishing) {
        grpc_byte_buffer_destroy(o->bb);
        free(o);
    } else {
        if (c->qt) c->qt->next = o; else c->qh = o;
        c->qt = o;
        stream_kick(c);
    }
    pthread_mutex_unlock(&c->mu);
}

static void stream_end(call *c, grpc_status_code code, const char *msg) {
    count_call(c, code);
    pthread_mutex_lock(&c->mu);
    if (!c->finishing) {
        c->finishing = 1;
        c->fin_code = code;
        c->fin_details = grpc_slice_from_copied_string(msg ? msg : "");
        c->fin_set = 1;
        stream_kick(c);
    }
    pthread_mutex_unlock(&c->mu);
}

/* An error for a call whose stream may have begun already. */
static void fail_call(call *c, grpc_status_code code, const char *msg) {
    if (c->close_started) { /* only stream_begin starts the close watch before the status */
        stream_end(c, code, msg);
        call_unref(c);
    } else {
        finish_call(c, code, msg, NULL);
    }
}

/* ---- authentication ----------------------------------------------------------- */
/* The token file: one "TOKEN TENANT" per line (blank lines and lines starting
 * with # aside). Anything else refuses start-up with the line's number: more
 * or fewer fields, a token over 4096 bytes, a tenant over 255 bytes or not
 * UTF-8, a token given twice. Nothing is cut to fit. */
static int load_tokens(srv *s, const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "kvserve: token file %s: %s\n", path, strerror(errno));
        return -1;
    }
    char *line = NULL;
    size_t cap = 0;
    ssize_t got;
    int lineno = 0;
    const char *why = NULL;
    while (!why && (got = getline(&line, &cap, f)) >= 0) {
        lineno++;
        if (memchr(line, 0, (size_t)got)) { why = "a NUL byte"; break; }
        char *save = NULL, *tok = strtok_r(line, " \t\r\n", &save);
        if (!tok || tok[0] == '#') continue;
        char *ten = strtok_r(NULL, " \t\r\n", &save), *more = strtok_r(NULL, " \t\r\n", &save);
        if (!ten || more) why = "expected \"TOKEN TENANT\"";
        else if (strlen(tok) > 4096) why = "the token is longer than 4096 bytes";
        else if (strlen(ten) > 255) why = "the tenant is longer than 255 bytes";
        else if (*srv__utf8_problem((const uint8_t *)ten, strlen(ten))) why = "the tenant is not valid UTF-8";
        if (why) break;
        token_ent *nt = realloc(s->tokens, (size_t)(s->n_tokens + 1) * sizeof *nt);
        if (!nt) { why = "out of memory"; break; }
        s->tokens = nt;
        token_ent *t = &s->tokens[s->n_tokens];
        SHA256((const unsigned char *)tok, strlen(tok), t->hash);
        snprintf(t->tenant, sizeof t->tenant, "%s", ten);
        t->line = lineno;
        for (int k = 0; k < s->n_tokens && !why; k++)
            if (!memcmp(s->tokens[k].hash, t->hash, sizeof t->hash)) {
                fprintf(stderr, "kvserve: token file %s:%d: the token of line %d again\n", path, lineno,
                        s->tokens[k].line);
                why = ""; /* said */
            }
        s->n_tokens++;
    }
    free(line);
    if (!why && ferror(f)) why = strerror(errno);
    fclose(f);
    if (why && *why) fprintf(stderr, "kvserve: token file %s:%d: %s\n", path, lineno, why);
    if (why) return -1;
    if (!s->n_tokens) {
        fprintf(stderr, "kvserve: token file %s holds no tokens\n", path);
        return -1;
    }
    return 0;
}

/* Tenant of the call's bearer token (constant-time comparison of digests);
 * 0 when allowed. Without a token file every caller is tenant "". */
static int authenticate(call *c) {
    srv *s = c->s;
    c->tenant[0] = 0;
    if (!s->n_tokens) return 0;
    for (size_t i = 0; i < c->md.count; i++) {
        if (grpc_slice_str_cmp(c->md.metadata[i].key, "authorization")) continue;
        const grpc_slice v = c->md.metadata[i].value;
        size_t n = GRPC_SLICE_LENGTH(v);
        const char *p = (const char *)GRPC_SLICE_START_PTR(v);
        if (n < 7 || strncasecmp(p, "Bearer ", 7)) return -1;
        unsigned char h[SHA256_DIGEST_LENGTH];
        SHA256((const unsigned char *)p + 7, n - 7, h);
        int found = -1;
        for (int k = 0; k < s->n_tokens; k++)
            if (CRYPTO_memcmp(h, s->tokens[k].hash, sizeof h) == 0) found = k;
        if (found < 0) return -1;
        snprintf(c->tenant, sizeof c->tenant, "%s", s->tokens[found].tenant);
        return 0;
    }
    return -1;
}

/* ---- request registry ------------------------------------------------------------- */
static rec *rec_find(srv *s, uint64_t id, const char *tenant) {
    srv_reg_entry *e = srv__reg_find(s->reg, id);
    return e && !strcmp(e->tenant, tenant) ? (rec *)e : NULL;
}

static void cache_req_free(struct cache_req *q);

static void rec_free(rec *r) {
    cache_req_free(r->cache);
    for (size_t i = 0; i < r->n_tok; i++) {
        free(r->tok[i]->text);
        free(r->tok[i]);
    }
    free(r->tok);
    if (r->comp) {
        free(r->comp->text);
        free(r->comp->token_ids);
        free(r->comp->usage);
        free(r->comp->error);
        free(r->comp);
    }
    free(r);
}

static void rec_unlink(srv *s, rec *r) { srv__reg_remove(s->reg, &r->e); }

/* ENG_EQUEUE with a message when the tenant already has --max-results
 * requests whose results Step has not collected (srv.mu held); else ENG_OK. */
static int results_full(srv *s, const char *tenant, char *err, size_t errlen) {
    if (srv__reg_tenant_count(s->reg, tenant) < s->cfg.max_results) return ENG_OK;
    snprintf(err, errlen, "%d requests of this tenant wait for Step to collect their results (--max-results); "
                          "collect or cancel some first", s->cfg.max_results);
    return ENG_EQUEUE;
}

/* Make x (calloc'd, filled or to be filled under srv.mu) known by id (srv.mu
 * held): ENG_OK, or ENG_EQUEUE (see results_full) or ENG_ENOMEM with a
 * message, x untouched. A Stream's record is not counted against the bound:
 * its call bounds it. */
static int rec_register(srv *s, rec *x, uint64_t id, const char *tenant, int streaming, char *err, size_t errlen) {
    int rc = streaming ? ENG_OK : results_full(s, tenant, err, errlen);
    if (rc) return rc;
    x->e.id = id;
    snprintf(x->e.tenant, sizeof x->e.tenant, "%s", tenant);
    x->e.collected_by_step = !streaming;
    if (srv__reg_add(s->reg, &x->e) == 0) return ENG_OK;
    snprintf(err, errlen, "out of memory");
    return ENG_ENOMEM;
}

static char *dup_n(const char *p, size_t n) {
    char *d = malloc(n + 1);
    if (d) {
        memcpy(d, p, n);
        d[n] = 0;
    }
    return d;
}

static Kvserve__V1__FinishReason finish_of(int f) {
    switch (f) {
    case ENG_FINISH_STOP: return KVSERVE__V1__FINISH_REASON__STOP;
    case ENG_FINISH_LENGTH: return KVSERVE__V1__FINISH_REASON__LENGTH;
    case ENG_FINISH_CANCELLED: return KVSERVE__V1__FINISH_REASON__CANCELLED;
    case ENG_FINISH_ERROR: return KVSERVE__V1__FINISH_REASON__ERROR;
    default: return KVSERVE__V1__FINISH_REASON__FINISH_UNSPECIFIED;
    }
}

static Kvserve__V1__Completion *completion_of(const eng_event *ev) {
    Kvserve__V1__Completion *c = malloc(sizeof *c);
    Kvserve__V1__Usage *u = malloc(sizeof *u);
    if (!c || !u) { free(c); free(u); return NULL; }
    kvserve__v1__completion__init(c);
    kvserve__v1__usage__init(u);
    c->id = ev->id;
    c->text = dup_n(ev->text, ev->text_len);
    c->n_token_ids = ev->n_tokens;
    c->token_ids = malloc((ev->n_tokens ? ev->n_tokens : 1) * sizeof(int32_t));
    if (c->token_ids) memcpy(c->token_ids, ev->tokens, ev->n_tokens * sizeof(int32_t));
    c->finish_reason = finish_of(ev->finish);
    u->prompt_tokens = ev->usage.prompt_tokens;
    u->cached_tokens = ev->usage.cached_tokens;
    u->generated_tokens = ev->usage.generated_tokens;
    u->history_diverged = ev->usage.history_diverged != 0;
    c->usage = u;
    c->error = dup_n(ev->message ? ev->message : "", ev->message ? strlen(ev->message) : 0);
    return c;
}

static void free_completion(Kvserve__V1__Completion *c) {
    if (!c) return;
    free(c->text);
    free(c->token_ids);
    free(c->usage);
    free(c->error);
    free(c);
}

static void cache_enqueue(srv *s, cache_req *q, const eng_event *ev);
static void flight_done(srv *s, rec *r, const eng_event *ev);

/* Engine thread: route an event to its Stream call or its Step buffer. */
static void on_event(void *ud, const eng_event *ev) {
    srv *s = ud;
    pthread_mutex_lock(&s->mu);
    rec *r = (rec *)srv__reg_find(s->reg, ev->id);
    if (!r) { pthread_mutex_unlock(&s->mu); return; }
    if (ev->kind == ENG_EV_TOKEN) {
        double t_now = now_s();
        if (r->index == 0) srv_metrics_ttft(s->metrics, t_now - r->t_start);
        else srv_metrics_itl(s->metrics, t_now - r->t_last);
        r->t_last = t_now;
        Kvserve__V1__TokenEvent *t = malloc(sizeof *t);
        if (t) {
            kvserve__v1__token_event__init(t);
            t->id = ev->id;
            t->token = ev->token;
            t->text = dup_n(ev->text, ev->text_len);
            t->index = r->index++;
        }
        if (r->stream && t) {
            Kvserve__V1__StreamEvent se = KVSERVE__V1__STREAM_EVENT__INIT;
            se.event_case = KVSERVE__V1__STREAM_EVENT__EVENT_TOKEN;
            se.token = t;
            stream_push(r->stream, &se.base);
            free(t->text);
            free(t);
        } else if (t) {
            if (r->n_tok == r->cap_tok) {
                size_t nc = r->cap_tok ? r->cap_tok * 2 : 16;
                Kvserve__V1__TokenEvent **nt = realloc(r->tok, nc * sizeof *nt);
                if (nt) { r->tok = nt; r->cap_tok = nc; }
            }
            if (r->n_tok < r->cap_tok) r->tok[r->n_tok++] = t;
            else { free(t->text); free(t); }
        }
    } else {
        srv_metrics_tokens(s->metrics, ev->usage.prompt_tokens - ev->usage.cached_tokens, ev->usage.generated_tokens, 0);
        if (r->flight) flight_done(s, r, ev);
        Kvserve__V1__Completion *c = completion_of(ev);
        if (r->cache && (ev->finish == ENG_FINISH_STOP || ev->finish == ENG_FINISH_LENGTH)) {
            cache_enqueue(s, r->cache, ev);
            r->cache = NULL;
        }
        if (r->stream) {
            call *sc = r->stream;
            if (c) {
                Kvserve__V1__StreamEvent se = KVSERVE__V1__STREAM_EVENT__INIT;
                se.event_case = KVSERVE__V1__STREAM_EVENT__EVENT_COMPLETION;
                se.completion = c;
                stream_push(sc, &se.base);
            }
            free_completion(c);
            if (c) stream_end(sc, GRPC_STATUS_OK, "");
            else stream_end(sc, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory building the completion");
            rec_unlink(s, r);
            rec_free(r);
            pthread_mutex_unlock(&s->mu);
            call_unref(sc);
            return;
        }
        r->comp = c;
        srv__reg_done(s->reg, &r->e, now_s()); /* kept for Step until --result-ttl */
    }
    pthread_mutex_unlock(&s->mu);
}

/* ---- handlers ------------------------------------------------------------------------ */
/* A request's message: NULL (and why in err) if the bytes do not decode as
 * d, or a string field is not UTF-8 or holds a NUL, or an enum field holds a
 * value the enum does not define. */
static ProtobufCMessage *unpack_request(const ProtobufCMessageDescriptor *d, grpc_byte_buffer *bb, char *err,
                                        size_t errlen) {
    grpc_byte_buffer_reader rd;
    snprintf(err, errlen, "request is not a valid %s", d->name);
    if (!bb || !grpc_byte_buffer_reader_init(&rd, bb)) return NULL;
    grpc_slice sl = grpc_byte_buffer_reader_readall(&rd);
    grpc_byte_buffer_reader_destroy(&rd);
    ProtobufCMessage *m = NULL;
    if (srv__pb_check(d, GRPC_SLICE_START_PTR(sl), GRPC_SLICE_LENGTH(sl), err, errlen) == 0 &&
        !(m = protobuf_c_message_unpack(d, NULL, GRPC_SLICE_LENGTH(sl), GRPC_SLICE_START_PTR(sl))))
        snprintf(err, errlen, "request is not a valid %s", d->name);
    grpc_slice_unref(sl);
    return m;
}

#define UNPACK(type, desc, c, var)                                                        \
    char var##_err[320];                                                                  \
    type *var = (type *)unpack_request(&desc, (c)->payload, var##_err, sizeof var##_err); \
    if (!var) {                                                                           \
        finish_errorf(c, GRPC_STATUS_INVALID_ARGUMENT, "%s", var##_err);                 \
        return;                                                                           \
    }

/* GenerateRequest.messages rendered with the model's chat template into
 * *text (malloc'd). ENG_OK, or ENG_EINVAL with a message naming the field. */
static int render_chat(srv *s, const Kvserve__V1__GenerateRequest *g, char **text, size_t *len, char *err,
                       size_t errlen) {
    if ((g->prompt && g->prompt[0]) || g->n_prompt_ids) {
        snprintf(err, errlen, "messages: give prompt, prompt_ids or messages, not two of them");
        return ENG_EINVAL;
    }
    if (!s->chat) {
        snprintf(err, errlen, "messages: %s", s->chat_why);
        return ENG_EINVAL;
    }
    if (g->n_messages > 4096) {
        snprintf(err, errlen, "messages: at most 4096 messages (got %zu)", g->n_messages);
        return ENG_EINVAL;
    }
    eng_chat_msg *m = calloc(g->n_messages, sizeof *m);
    if (!m) {
        snprintf(err, errlen, "out of memory");
        return ENG_ENOMEM;
    }
    for (size_t i = 0; i < g->n_messages; i++) {
        m[i].role = g->messages[i]->role ? g->messages[i]->role : "";
        m[i].content = g->messages[i]->content ? g->messages[i]->content : "";
        if (!m[i].role[0]) {
            free(m);
            snprintf(err, errlen, "messages[%zu].role is empty", i);
            return ENG_EINVAL;
        }
    }
    char why[400];
    int rc = eng_chat_render(s->chat, m, g->n_messages, !g->no_generation_prompt, text, len, why, sizeof why);
    free(m);
    if (rc) {
        snprintf(err, errlen, "messages: the chat template refused them: %s", why);
        return ENG_EINVAL;
    }
    return ENG_OK;
}

/* GenerateRequest -> eng_request (pointers into g, or into chat: the
 * rendered messages). */
static int to_engine_request(const Kvserve__V1__GenerateRequest *g, const char *chat, size_t chat_len,
                             const char *tenant, eng_request *r, char *err, size_t errlen) {
    memset(r, 0, sizeof *r);
    if (chat) {
        r->text = chat;
        r->text_len = chat_len;
        r->full_context = 1; /* with an agent: the whole conversation each turn */
    } else if (g->prompt && g->prompt[0]) {
        r->text = g->prompt;
        r->text_len = strlen(g->prompt);
    } else {
        r->ids = g->prompt_ids;
        r->n_ids = g->n_prompt_ids;
    }
    r->add_special = !chat && g->add_special_tokens; /* a template writes its own BOS */
    r->tenant = tenant;
    r->agent_id = g->agent_id;
    r->reset = g->reset;
    eng_sampling_default(&r->params.sampling);
    if (g->sampling) {
        const Kvserve__V1__Sampling *sp = g->sampling;
        r->params.sampling.temperature = sp->temperature;
        r->params.sampling.top_k = sp->top_k;
        r->params.sampling.top_p = sp->top_p == 0 ? 1.0f : sp->top_p;
        r->params.sampling.min_p = sp->min_p;
        r->params.sampling.repeat_penalty = sp->repeat_penalty == 0 ? 1.0f : sp->repeat_penalty;
        r->params.sampling.repeat_last_n = sp->repeat_last_n;
        r->params.sampling.seed = sp->seed;
    }
    r->params.max_tokens = g->max_tokens;
    r->params.stop = (const char *const *)g->stop;
    r->params.n_stop = (int)g->n_stop;
    r->params.ignore_eos = g->ignore_eos;
    if (g->n_stop > 16) {
        snprintf(err, errlen, "stop: at most 16 stop strings");
        return ENG_EINVAL;
    }
    return ENG_OK;
}

static void wake_engine(srv *s) {
    s->work = 1;
    pthread_cond_signal(&s->cv);
}

static void wake_engine_locked(srv *s) {
    pthread_mutex_lock(&s->mu);
    wake_engine(s);
    pthread_mutex_unlock(&s->mu);
}

/* ---- prompt cache ------------------------------------------------------------------- */
typedef struct cache_job {
    char *purge_tenant, *purge_ns; /* a background purge of a namespace's superseded keys */
    cache_req *req;
    kvc_completion comp;
    struct cache_job *next;
} cache_job;

static void cache_req_free(cache_req *q) {
    if (!q) return;
    free(q->ids);
    free(q->tenant);
    free(q->ns);
    for (int i = 0; q->stop && i < q->k.n_stop; i++) free(q->stop[i]);
    free(q->stop);
    free(q);
}

/* Deterministic requests are cached unless asked otherwise: greedy, or a fixed seed. */
static int cacheable(const Kvserve__V1__GenerateRequest *g) {
    if (g->agent_id && g->agent_id[0]) return 0; /* an agent's context lives in the engine */
    if (g->cache && g->cache->mode == KVSERVE__V1__CACHE_POLICY__MODE__BYPASS) return 0;
    if (g->cache && g->cache->cache_nondeterministic) return 1;
    return !g->sampling || g->sampling->temperature == 0 || g->sampling->seed != 0;
}

/* Tokenize (once: the engine then gets the ids) and build the key material. */
static cache_req *cache_prepare(srv *s, const char *tenant, const Kvserve__V1__GenerateRequest *g, eng_request *r) {
    if (r->params.max_tokens <= 0 || (!r->text && !r->n_ids)) return NULL; /* invalid: the engine says why */
    cache_req *q = calloc(1, sizeof *q);
    if (!q) return NULL;
    size_t n = 0;
    if (r->text) {
        if (eng_tok_encode(eng_model_tok(s->model), r->text, r->text_len, r->add_special, &q->ids, &n) != ENG_OK) {
            free(q);
            return NULL; /* the engine reports the error */
        }
        r->text = NULL;
        r->ids = q->ids;
        r->n_ids = n;
    } else {
        n = r->n_ids;
        q->ids = malloc((n ? n : 1) * sizeof *q->ids);
        if (q->ids) memcpy(q->ids, r->ids, n * sizeof *q->ids);
    }
    q->tenant = strdup(tenant);
    q->ns = strdup(g->namespace_ ? g->namespace_ : "");
    q->stop = calloc(g->n_stop + 1, sizeof *q->stop);
    if (!q->ids || !q->tenant || !q->ns || !q->stop) { cache_req_free(q); return NULL; }
    for (size_t i = 0; i < g->n_stop; i++) q->stop[i] = strdup(g->stop[i]);
    const eng_sampling *sp = &r->params.sampling;
    q->k = (kvc_prompt_key){.model_fingerprint = eng_model_fingerprint(s->model), .tenant = q->tenant, .ns = q->ns,
                            .ids = q->ids, .n_ids = n, .max_tokens = r->params.max_tokens,
                            .temperature = sp->temperature, .top_p = sp->top_p, .min_p = sp->min_p,
                            .repeat_penalty = sp->repeat_penalty, .top_k = sp->top_k,
                            .repeat_last_n = sp->repeat_last_n, .ignore_eos = r->params.ignore_eos, .seed = sp->seed,
                            .stop = (const char *const *)q->stop, .n_stop = (int)g->n_stop};
    q->ttl = g->cache ? (int)g->cache->ttl_seconds : 0;
    return q;
}

/* Queue a job for the writer (srv.mu held). First in, first out: a write is
 * done before any job queued after it. */
static void job_push(srv *s, cache_job *j) {
    j->next = NULL;
    if (s->jobs_tail) s->jobs_tail->next = j; else s->jobs = j;
    s->jobs_tail = j;
    pthread_cond_signal(&s->jobs_cv);
}

/* Engine thread (srv.mu held): hand a finished completion to the writer. */
static void cache_enqueue(srv *s, cache_req *q, const eng_event *ev) {
    cache_job *j = calloc(1, sizeof *j);
    if (!j) { cache_req_free(q); return; }
    j->req = q;
    j->comp.text = malloc(ev->text_len + 1);
    j->comp.tokens = malloc((ev->n_tokens ? ev->n_tokens : 1) * sizeof(int32_t));
    if (!j->comp.text || !j->comp.tokens) {
        kvc_completion_free(&j->comp);
        cache_req_free(q);
        free(j);
        return;
    }
    memcpy(j->comp.text, ev->text, ev->text_len);
    j->comp.text_len = ev->text_len;
    memcpy(j->comp.tokens, ev->tokens, ev->n_tokens * sizeof(int32_t));
    j->comp.n_tokens = ev->n_tokens;
    j->comp.finish = ev->finish;
    j->comp.prompt_tokens = ev->usage.prompt_tokens;
    j->comp.cached_tokens = ev->usage.cached_tokens;
    j->comp.generated_tokens = ev->usage.generated_tokens;
    job_push(s, j);
}

/* Writes to Redis happen here, off the engine and completion-queue threads. */
static void *writer_loop(void *p) {
    srv *s = p;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        while (!s->jobs && !s->writer_stop) pthread_cond_wait(&s->jobs_cv, &s->mu);
        cache_job *j = s->jobs;
        if (!j) break;
        s->jobs = j->next;
        if (!s->jobs) s->jobs_tail = NULL;
        int stopping = s->writer_stop;
        pthread_mutex_unlock(&s->mu);
        int purged = 0;
        if (j->purge_ns && !stopping) /* SCAN + UNLINK, 500 keys a batch */
            kvc_prompt_purge(s->pcache, j->purge_tenant, j->purge_ns, 1 << 30, &purged);
        else if (j->req)
            kvc_prompt_put(s->pcache, &j->req->k, &j->comp, j->req->ttl); /* failures are counted, not fatal */
        kvc_completion_free(&j->comp);
        cache_req_free(j->req);
        free(j->purge_tenant);
        free(j->purge_ns);
        free(j);
        pthread_mutex_lock(&s->mu);
        s->purged_keys += (uint64_t)purged;
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* Answer from a cached completion, streamed like a generation and marked cached. */
static void answer_from(call *c, int streaming, kvc_completion *hit, int mu_held);

static void answer_cached(call *c, int streaming, kvc_completion *hit) { answer_from(c, streaming, hit, 0); }

/* A single-flight follower (srv.mu held; streams only). */
static void answer_shared(call *c, kvc_completion *comp) { answer_from(c, 1, comp, 1); }

static void answer_from(call *c, int streaming, kvc_completion *hit, int mu_held) {
    srv *s = c->s;
    srv_metrics_tokens(s->metrics, 0, 0, hit->prompt_tokens + hit->generated_tokens);
    Kvserve__V1__Usage u = KVSERVE__V1__USAGE__INIT;
    u.prompt_tokens = hit->prompt_tokens;
    u.cached_tokens = hit->prompt_tokens; /* nothing was computed */
    u.generated_tokens = hit->generated_tokens;
    Kvserve__V1__Completion comp = KVSERVE__V1__COMPLETION__INIT;
    comp.text = hit->text;
    comp.n_token_ids = hit->n_tokens;
    comp.token_ids = hit->tokens;
    comp.finish_reason = finish_of(hit->finish);
    comp.usage = &u;
    comp.cached = 1;
    if (!mu_held) pthread_mutex_lock(&s->mu);
    comp.id = (1ull << 63) | ++s->next_cached_id; /* an id space of its own */
    if (!mu_held) pthread_mutex_unlock(&s->mu);
    /* token events: the detokenizer's deltas, clamped to the cached text */
    eng_detok *d = eng_detok_new(eng_model_tok(s->model));
    size_t emitted = 0;
    rec *x = streaming ? NULL : calloc(1, sizeof *x); /* made known by id once complete */
    if (streaming && !c->close_started) stream_begin(c);
    for (size_t i = 0; i < hit->n_tokens && d; i++) {
        const char *t;
        size_t tl;
        eng_detok_push(d, hit->tokens[i], &t, &tl);
        size_t take = emitted + tl <= hit->text_len ? tl : hit->text_len - emitted;
        Kvserve__V1__TokenEvent te = KVSERVE__V1__TOKEN_EVENT__INIT;
        te.id = comp.id;
        te.token = hit->tokens[i];
        te.index = (uint32_t)i;
        te.text = dup_n(hit->text + emitted, take);
        emitted += take;
        if (streaming) {
            Kvserve__V1__StreamEvent se = KVSERVE__V1__STREAM_EVENT__INIT;
            se.event_case = KVSERVE__V1__STREAM_EVENT__EVENT_TOKEN;
            se.token = &te;
            stream_push(c, &se.base);
            free(te.text);
        } else if (x) {
            Kvserve__V1__TokenEvent *tp = malloc(sizeof *tp);
            Kvserve__V1__TokenEvent **nt = realloc(x->tok, (x->n_tok + 1) * sizeof *nt);
            if (tp && nt) {
                *tp = te;
                x->tok = nt;
                x->tok[x->n_tok++] = tp;
            } else {
                if (nt) x->tok = nt;
                free(tp);
                free(te.text);
            }
        }
    }
    eng_detok_free(d);
    if (streaming) {
        Kvserve__V1__StreamEvent se = KVSERVE__V1__STREAM_EVENT__INIT;
        se.event_case = KVSERVE__V1__STREAM_EVENT__EVENT_COMPLETION;
        se.completion = &comp;
        stream_push(c, &se.base);
        stream_end(c, GRPC_STATUS_OK, "");
        call_unref(c);
        return;
    }
    if (!x) { finish_errorf(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory"); return; }
    Kvserve__V1__Completion *cp = malloc(sizeof *cp);
    Kvserve__V1__Usage *up = malloc(sizeof *up);
    if (cp && up) {
        *cp = comp;
        *up = u;
        cp->usage = up;
        cp->text = dup_n(hit->text, hit->text_len);
        cp->token_ids = malloc((hit->n_tokens ? hit->n_tokens : 1) * sizeof(int32_t));
        if (cp->token_ids) memcpy(cp->token_ids, hit->tokens, hit->n_tokens * sizeof(int32_t));
        cp->error = dup_n("", 0);
    } else {
        free(cp);
        free(up);
        cp = NULL;
    }
    x->comp = cp;
    char err[256];
    pthread_mutex_lock(&s->mu);
    int rc = rec_register(s, x, comp.id, c->tenant, 0, err, sizeof err);
    if (!rc) srv__reg_done(s->reg, &x->e, now_s());
    pthread_mutex_unlock(&s->mu);
    if (rc) {
        rec_free(x);
        finish_errorf(c, status_of(rc), "%s", err);
        return;
    }
    Kvserve__V1__SubmitReply rep = KVSERVE__V1__SUBMIT_REPLY__INIT;
    rep.id = comp.id;
    finish_call(c, GRPC_STATUS_OK, NULL, &rep.base);
}

/* The leader of a single-flight group finished (srv.mu held): answer every
 * follower with its result, streamed like a cache hit; if the leader was
 * cancelled or failed, followers are told to retry. */
static void flight_done(srv *s, rec *r, const eng_event *ev) {
    flight *f = r->flight;
    r->flight = NULL;
    for (flight **pp = &s->flights; *pp; pp = &(*pp)->next)
        if (*pp == f) {
            *pp = f->next;
            break;
        }
    int ok = ev->finish == ENG_FINISH_STOP || ev->finish == ENG_FINISH_LENGTH;
    kvc_completion comp = {.text = (char *)ev->text, .text_len = ev->text_len, .tokens = (int32_t *)ev->tokens,
                           .n_tokens = ev->n_tokens, .finish = ev->finish, .prompt_tokens = ev->usage.prompt_tokens,
                           .generated_tokens = ev->usage.generated_tokens};
    for (follower *w = f->followers, *n; w; w = n) {
        n = w->next;
        if (ok) answer_shared(w->c, &comp);
        else {
            char msg[128];
            snprintf(msg, sizeof msg, "the identical request this one joined was %s; retry", eng_finish_name(ev->finish));
            fail_call(w->c, GRPC_STATUS_UNAVAILABLE, msg);
        }
        free(w);
    }
    free(f);
}

/* ---- Submit and Stream: handler -> batcher -> prompt cache -> engine ---------------- */
/* A Submit or Stream waiting in the batcher. It holds the handler's call
 * reference and the parsed request (r points into g). */
typedef struct pend {
    call *c;
    int streaming;
    int lookup;                 /* look it up in the prompt cache first */
    Kvserve__V1__GenerateRequest *g;
    char *chat;                 /* g's messages rendered, or NULL */
    int32_t *ids;               /* the prompt tokenized before the server lock, or NULL */
    eng_request r;
    cache_req *cq;
} pend;

static void pend_free(pend *p) {
    cache_req_free(p->cq);
    free(p->chat);
    free(p->ids);
    kvserve__v1__generate_request__free_unpacked(p->g, NULL);
    free(p);
}

/* Hand the request to the engine (batcher thread): join an identical Stream
 * in flight, or submit it. Consumes p. */
static void start_generation(srv *s, pend *p) {
    call *c = p->c;
    int streaming = p->streaming;
    char err[512] = "";
    uint64_t id = 0;
    char digest[65] = "";
    if (p->cq && streaming) kvc_prompt_key_digest(&p->cq->k, digest);
    if (p->r.text) { /* tokenize outside the server lock: a long prompt must not stall the other calls */
        size_t n = 0;
        if (eng_tok_encode(eng_model_tok(s->model), p->r.text, p->r.text_len, p->r.add_special, &p->ids, &n) == ENG_OK) {
            p->r.text = NULL;
            p->r.ids = p->ids;
            p->r.n_ids = n;
        } /* else eng_submit says why */
    }
    pthread_mutex_lock(&s->mu);
    c->pending = 0;
    s->pending--;
    if (digest[0]) { /* an identical request already running: wait for its result */
        for (flight *f = s->flights; f; f = f->next)
            if (!strcmp(f->digest, digest)) {
                follower *fw = malloc(sizeof *fw);
                if (!fw) break;
                fw->c = c; /* keeps the handler's reference until answered */
                fw->next = f->followers;
                f->followers = fw;
                s->singleflight_joined++;
                pthread_mutex_unlock(&s->mu);
                pend_free(p);
                return;
            }
    }
    rec *x = calloc(1, sizeof *x);
    int rc = !x ? ENG_ENOMEM : streaming ? ENG_OK : results_full(s, c->tenant, err, sizeof err);
    if (!x) snprintf(err, sizeof err, "out of memory");
    if (!rc) rc = eng_submit(s->eng, &p->r, &id, err, sizeof err);
    if (!rc && (rc = rec_register(s, x, id, c->tenant, streaming, err, sizeof err))) eng_cancel(s->eng, id);
    if (!rc && digest[0] && (x->flight = calloc(1, sizeof *x->flight))) {
        memcpy(x->flight->digest, digest, sizeof digest);
        x->flight->leader = id;
        x->flight->next = s->flights;
        s->flights = x->flight;
    }
    if (!rc) {
        x->t_start = c->t_start;
        x->cache = p->cq;
        p->cq = NULL;
        if (streaming) {
            x->stream = c;
            call_ref(c); /* the registry's reference, dropped on DONE */
            c->eng_id = id;
            c->has_eng = 1;
            s->active_calls++;
            if (c->cancel_seen) eng_cancel(s->eng, id); /* the client left while it waited */
        }
        wake_engine(s);
    } else {
        free(x);
    }
    pthread_mutex_unlock(&s->mu);
    pend_free(p);
    if (rc) {
        fail_call(c, status_of(rc), err);
    } else if (streaming) {
        call_unref(c); /* the handler's reference */
    } else {
        Kvserve__V1__SubmitReply rep = KVSERVE__V1__SUBMIT_REPLY__INIT;
        rep.id = id;
        finish_call(c, GRPC_STATUS_OK, NULL, &rep.base);
    }
}

/* The call left the batcher (it no longer counts as waiting there). */
static void unpend(srv *s, call *c) {
    pthread_mutex_lock(&s->mu);
    c->pending = 0;
    s->pending--;
    pthread_mutex_unlock(&s->mu);
}

/* The batcher's dispatch: the window's prompt-cache lookups in two
 * pipelined Redis round trips, hits answered, the rest to the engine. */
static void on_batch(void *ud, void **items, size_t n) {
    srv *s = ud;
    pend **ps = (pend **)items;
    srv_metrics_batch(s->metrics, (int)n);
    kvc_prompt_key **keys = malloc(n * sizeof *keys);
    kvc_completion *hits = malloc(n * sizeof *hits);
    int *rcs = malloc(n * sizeof *rcs);
    size_t *which = malloc(n * sizeof *which), m = 0;
    for (size_t i = 0; keys && hits && rcs && which && i < n; i++)
        if (ps[i]->lookup) {
            keys[m] = &ps[i]->cq->k;
            which[m++] = i;
        }
    if (m) kvc_prompt_get_many(s->pcache, keys, m, hits, rcs);
    for (size_t k = 0; k < m; k++) {
        pend *p = ps[which[k]];
        if (rcs[k] != KVC_OK) continue;
        unpend(s, p->c);
        answer_cached(p->c, p->streaming, &hits[k]);
        kvc_completion_free(&hits[k]);
        ps[which[k]] = NULL;
        pend_free(p);
    }
    for (size_t i = 0; i < n; i++)
        if (ps[i]) start_generation(s, ps[i]);
    free(keys);
    free(hits);
    free(rcs);
    free(which);
}

/* The batcher dropped a request before dispatch. */
static void on_batch_drop(void *ud, void *item, int reason) {
    srv *s = ud;
    pend *p = item;
    call *c = p->c;
    unpend(s, c);
    pend_free(p);
    if (reason == SRV__DROP_EXPIRED) fail_call(c, GRPC_STATUS_DEADLINE_EXCEEDED, "deadline passed while queued");
    else fail_call(c, GRPC_STATUS_UNAVAILABLE, "the server is shutting down");
}

/* The call's deadline on the monotonic clock the batcher uses (0 = none). */
static double mono_deadline(const call *c) {
    gpr_timespec d = c->deadline;
    if (gpr_time_cmp(d, gpr_inf_future(d.clock_type)) == 0) return 0;
    gpr_timespec left = gpr_time_sub(d, gpr_now(d.clock_type));
    return now_s() + gpr_timespec_to_micros(left) * 1e-6;
}

static void h_generate(call *c, int streaming) {
    srv *s = c->s;
    UNPACK(Kvserve__V1__GenerateRequest, kvserve__v1__generate_request__descriptor, c, g);
    char err[512] = "";
    pend *p = calloc(1, sizeof *p);
    if (!p) {
        kvserve__v1__generate_request__free_unpacked(g, NULL);
        finish_errorf(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
        return;
    }
    p->c = c;
    p->g = g;
    p->streaming = streaming;
    c->pend_item = p;
    size_t chat_len = 0;
    int rc = g->n_messages ? render_chat(s, g, &p->chat, &chat_len, err, sizeof err) : ENG_OK;
    if (!rc) rc = to_engine_request(g, p->chat, chat_len, c->tenant, &p->r, err, sizeof err);
    if (rc) {
        pend_free(p);
        finish_call(c, status_of(rc), err, NULL);
        return;
    }
    p->cq = s->pcache && cacheable(g) ? cache_prepare(s, c->tenant, g, &p->r) : NULL;
    /* a request the cache may answer is checked now, as the engine would check it */
    if (p->cq && (rc = eng_request_check(s->eng, &p->r, err, sizeof err)) != ENG_OK) {
        pend_free(p);
        finish_call(c, status_of(rc), err, NULL);
        return;
    }
    p->lookup = p->cq && !(g->cache && g->cache->mode == KVSERVE__V1__CACHE_POLICY__MODE__REFRESH);
    if (streaming) stream_begin(c); /* from here a client cancel is seen while it waits */
    pthread_mutex_lock(&s->mu); /* before the batcher's lock: remove() runs under srv.mu too */
    c->pending = 1;
    s->pending++;
    int full = srv__batcher_push(s->batcher, p, mono_deadline(c)) != 0;
    if (full) {
        c->pending = 0;
        s->pending--;
    }
    pthread_mutex_unlock(&s->mu);
    if (full) {
        pend_free(p);
        fail_call(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "request queue is full; retry later");
    }
}

static void h_submit(call *c) { h_generate(c, 0); }
static void h_stream(call *c) { h_generate(c, 1); }

/* The end of a streaming call: a client cancel or expired deadline cancels
 * the engine request, which frees its blocks. */
static void on_close(call *c, int ok) {
    (void)ok;
    pthread_mutex_lock(&c->mu);
    c->closed = 1;
    pthread_mutex_unlock(&c->mu);
    if (c->close_cancelled) {
        srv *s = c->s;
        count_call(c, GRPC_STATUS_CANCELLED);
        pthread_mutex_lock(&s->mu); /* pairs with start_generation: one of the two cancels */
        c->cancel_seen = 1;
        if (c->has_eng) eng_cancel(s->eng, c->eng_id);
        pend *p = NULL; /* still in the batcher: take it out, it never reaches the engine */
        if (c->pending && s->batcher) {
            /* find our pend: the batcher compares addresses only */
            p = c->pend_item;
            if (!srv__batcher_remove(s->batcher, p)) p = NULL;
            else {
                c->pending = 0;
                s->pending--;
            }
        }
        pthread_mutex_unlock(&s->mu);
        if (p) {
            pend_free(p);
            call_unref(c); /* the handler's reference the pend held */
        }
    }
    if (c->watcher) {
        srv *s = c->s;
        int found = 0;
        pthread_mutex_lock(&s->mu);
        for (call **pp = &s->watchers; *pp; pp = &(*pp)->next_watch)
            if (*pp == c) {
                *pp = c->next_watch;
                found = 1;
                break;
            }
        pthread_mutex_unlock(&s->mu);
        if (found) call_unref(c); /* the watcher list's reference */
    }
    call_unref(c);
}

/* Build a StepReply from the buffers of ids (srv.mu held). */
static void step_reply(srv *s, call *c, const uint64_t *ids, size_t n) {
    Kvserve__V1__StepReply rep = KVSERVE__V1__STEP_REPLY__INIT;
    size_t nt = 0, nc = 0;
    rec *rs[256];
    for (size_t i = 0; i < n; i++) {
        rs[i] = rec_find(s, ids[i], c->tenant);
        if (rs[i]) {
            nt += rs[i]->n_tok;
            nc += rs[i]->comp != NULL;
        }
    }
    rep.tokens = malloc((nt ? nt : 1) * sizeof *rep.tokens);
    rep.completions = malloc((nc ? nc : 1) * sizeof *rep.completions);
    if (!rep.tokens || !rep.completions) { /* nothing is taken: the client may Step again */
        free(rep.tokens);
        free(rep.completions);
        finish_call(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory building the reply; Step again", NULL);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        rec *r = rs[i];
        if (!r) continue;
        for (size_t k = 0; k < r->n_tok; k++) rep.tokens[rep.n_tokens++] = r->tok[k];
        if (r->comp) rep.completions[rep.n_completions++] = r->comp;
    }
    finish_call(c, GRPC_STATUS_OK, NULL, &rep.base);
    for (size_t i = 0; i < n; i++) {
        rec *r = rs[i];
        if (!r) continue;
        for (size_t k = 0; k < r->n_tok; k++) { free(r->tok[k]->text); free(r->tok[k]); }
        r->n_tok = 0;
        if (r->comp) { /* delivered: forget the request */
            free_completion(r->comp);
            r->comp = NULL;
            rec_unlink(s, r);
            rec_free(r);
        }
    }
    free(rep.tokens);
    free(rep.completions);
}

static int has_news(srv *s, const char *tenant, const uint64_t *ids, size_t n) {
    for (size_t i = 0; i < n; i++) {
        rec *r = rec_find(s, ids[i], tenant);
        if (r && (r->n_tok || r->comp)) return 1;
    }
    return 0;
}

static void h_step(call *c) {
    srv *s = c->s;
    UNPACK(Kvserve__V1__StepRequest, kvserve__v1__step_request__descriptor, c, q);
    if (q->n_ids == 0 || q->n_ids > 256) {
        finish_errorf(c, GRPC_STATUS_INVALID_ARGUMENT, "ids: give 1 to 256 request ids (got %zu)", q->n_ids);
        kvserve__v1__step_request__free_unpacked(q, NULL);
        return;
    }
    for (size_t i = 0; i < q->n_ids; i++)
        for (size_t k = 0; k < i; k++)
            if (q->ids[i] == q->ids[k]) {
                finish_errorf(c, GRPC_STATUS_INVALID_ARGUMENT, "ids: request %llu is listed twice",
                              (unsigned long long)q->ids[i]);
                kvserve__v1__step_request__free_unpacked(q, NULL);
                return;
            }
    pthread_mutex_lock(&s->mu);
    for (size_t i = 0; i < q->n_ids; i++) {
        rec *r = rec_find(s, q->ids[i], c->tenant);
        if (!r || r->stream) {
            pthread_mutex_unlock(&s->mu);
            finish_errorf(c, GRPC_STATUS_NOT_FOUND, "ids: request %llu is unknown, finished and collected, or streamed",
                          (unsigned long long)q->ids[i]);
            kvserve__v1__step_request__free_unpacked(q, NULL);
            return;
        }
    }
    uint32_t wait = q->wait_ms < (uint32_t)s->cfg.max_wait_ms ? q->wait_ms : (uint32_t)s->cfg.max_wait_ms;
    if (wait == 0 || has_news(s, c->tenant, q->ids, q->n_ids)) {
        step_reply(s, c, q->ids, q->n_ids);
    } else {
        parked *p = calloc(1, sizeof *p);
        uint64_t *ids = malloc(q->n_ids * sizeof *ids);
        if (!p || !ids) {
            free(p);
            free(ids);
            finish_errorf(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
        } else {
            memcpy(ids, q->ids, q->n_ids * sizeof *ids);
            p->c = c;
            p->ids = ids;
            p->n = q->n_ids;
            /* never past the client's deadline: events must not be taken
             * for a reply nobody will read */
            gpr_timespec left = gpr_time_sub(gpr_convert_clock_type(c->deadline, GPR_CLOCK_MONOTONIC),
                                             gpr_now(GPR_CLOCK_MONOTONIC));
            double left_s = (double)left.tv_sec + left.tv_nsec * 1e-9 - 0.05;
            double w = wait / 1000.0;
            p->until = now_s() + (left_s < w ? (left_s > 0 ? left_s : 0) : w);
            /* and notice a client that goes away while we wait */
            grpc_op op;
            memset(&op, 0, sizeof op);
            op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
            op.data.recv_close_on_server.cancelled = &c->close_cancelled;
            c->close_started = 1;
            call_ref(c);
            cq_dispatch(c, on_close, &c->t_close);
            if (grpc_call_start_batch(c->gc, &op, 1, &c->t_close, NULL) != GRPC_CALL_OK) {
                c->close_started = 0;
                call_unref(c);
            }
            p->next = s->parked;
            s->parked = p;
            wake_engine(s);
        }
    }
    pthread_mutex_unlock(&s->mu);
    kvserve__v1__step_request__free_unpacked(q, NULL);
}

/* Engine thread: answer parked Steps that have news or have waited enough. */
static void check_parked(srv *s, int all) {
    pthread_mutex_lock(&s->mu);
    double t = now_s();
    for (parked **pp = &s->parked; *pp;) {
        parked *p = *pp;
        pthread_mutex_lock(&p->c->mu);
        int gone = p->c->closed;
        pthread_mutex_unlock(&p->c->mu);
        if (gone) { /* the client left: keep its events for its next Step */
            *pp = p->next;
            call_unref(p->c);
            free(p->ids);
            free(p);
        } else if (all || t >= p->until || has_news(s, p->c->tenant, p->ids, p->n)) {
            *pp = p->next;
            step_reply(s, p->c, p->ids, p->n);
            free(p->ids);
            free(p);
        } else {
            pp = &p->next;
        }
    }
    /* forget results nobody collected within --result-ttl (oldest first: O(1) when none is due) */
    for (srv_reg_entry *e; (e = srv__reg_oldest_done_before(s->reg, t - s->cfg.result_ttl_s));) {
        srv__reg_remove(s->reg, e);
        rec_free((rec *)e);
    }
    pthread_mutex_unlock(&s->mu);
}

static void h_cancel(call *c) {
    srv *s = c->s;
    UNPACK(Kvserve__V1__CancelRequest, kvserve__v1__cancel_request__descriptor, c, q);
    pthread_mutex_lock(&s->mu);
    rec *r = rec_find(s, q->id, c->tenant);
    int known = r && !r->comp;
    pthread_mutex_unlock(&s->mu);
    int rc = known ? eng_cancel(s->eng, q->id) : ENG_ENOTFOUND;
    if (rc) finish_errorf(c, GRPC_STATUS_NOT_FOUND, "id: request %llu is unknown or already finished",
                          (unsigned long long)q->id);
    else {
        Kvserve__V1__CancelReply rep = KVSERVE__V1__CANCEL_REPLY__INIT;
        finish_call(c, GRPC_STATUS_OK, NULL, &rep.base);
    }
    kvserve__v1__cancel_request__free_unpacked(q, NULL);
}

static void h_stats(call *c) {
    eng_stats st;
    eng_stats_get(c->s->eng, &st);
    Kvserve__V1__StatsReply rep = KVSERVE__V1__STATS_REPLY__INIT;
    rep.blocks_total = st.blocks_total;
    rep.blocks_free = st.blocks_free;
    rep.blocks_used = st.blocks_used;
    rep.blocks_shared = st.blocks_shared;
    rep.blocks_cached = st.blocks_cached;
    rep.block_tokens = st.block_tokens;
    rep.running = st.running;
    rep.waiting = st.waiting;
    rep.agents = st.agents;
    rep.prefix_hit_tokens = st.prefix_hit_tokens;
    rep.preemptions = st.preemptions;
    finish_call(c, GRPC_STATUS_OK, NULL, &rep.base);
}

static void h_invalidate(call *c) {
    UNPACK(Kvserve__V1__InvalidateRequest, kvserve__v1__invalidate_request__descriptor, c, q);
    srv *s = c->s;
    uint64_t gen = 0;
    int purged = 0;
    if (!s->pcache) finish_errorf(c, GRPC_STATUS_FAILED_PRECONDITION, "the cache is not configured (--redis)");
    else if (kvc_prompt_invalidate(s->pcache, c->tenant, q->namespace_, &gen) != KVC_OK)
        finish_errorf(c, GRPC_STATUS_UNAVAILABLE, "Redis is unavailable; the namespace was not invalidated");
    else {
        if (q->purge) { /* now, counted in the reply */
            kvc_prompt_purge(s->pcache, c->tenant, q->namespace_, 1 << 30, &purged);
            pthread_mutex_lock(&s->mu);
            s->purged_keys += (uint64_t)purged;
            pthread_mutex_unlock(&s->mu);
        } else { /* later, on the writer thread */
            cache_job *j = calloc(1, sizeof *j);
            if (j && (j->purge_tenant = strdup(c->tenant)) && (j->purge_ns = strdup(q->namespace_ ? q->namespace_ : ""))) {
                pthread_mutex_lock(&s->mu);
                job_push(s, j);
                pthread_mutex_unlock(&s->mu);
            } else if (j) {
                free(j->purge_tenant);
                free(j);
            }
        }
        Kvserve__V1__InvalidateReply rep = KVSERVE__V1__INVALIDATE_REPLY__INIT;
        rep.generation = gen;
        rep.purged = purged;
        finish_call(c, GRPC_STATUS_OK, NULL, &rep.base);
    }
    kvserve__v1__invalidate_request__free_unpacked(q, NULL);
}

static void h_cache_stats(call *c) {
    srv *s = c->s;
    Kvserve__V1__CacheStatsReply rep = KVSERVE__V1__CACHE_STATS_REPLY__INIT;
    Kvserve__V1__CacheLayerStats llm = KVSERVE__V1__CACHE_LAYER_STATS__INIT, rag = KVSERVE__V1__CACHE_LAYER_STATS__INIT;
    rep.llm = &llm;
    rep.rag = &rag;
    if (s->pcache) {
        kvc_prompt_stats ps;
        kvc_redis_stats rs;
        kvc_prompt_stats_get(s->pcache, &ps);
        kvc_redis_stats_get(s->redis, &rs);
        rep.enabled = 1;
        llm.hits = ps.hits;
        llm.misses = ps.misses;
        llm.writes = ps.writes;
        llm.invalidations = ps.invalidations;
        llm.errors = ps.errors;
        llm.hit_rate = ps.hits + ps.misses ? (double)ps.hits / (double)(ps.hits + ps.misses) : 0;
        rep.breaker_open = rs.breaker_open;
        rep.redis_errors = rs.errors;
        rep.redis_reconnects = rs.reconnects;
        kvc_rag_stats gs;
        kvc_rag_stats_get(s->rag, &gs);
        rag.hits = gs.hits;
        rag.misses = gs.misses;
        rag.writes = gs.writes;
        rag.errors = gs.errors;
        rag.hit_rate = gs.hits + gs.misses ? (double)gs.hits / (double)(gs.hits + gs.misses) : 0;
    }
    finish_call(c, GRPC_STATUS_OK, NULL, &rep.base);
}

/* Common checks of a RAG request; 0 when fine (else the call is answered). */
static int rag_check(call *c, const float *emb, size_t dim, int top_k) {
    if (!c->s->rag) {
        finish_errorf(c, GRPC_STATUS_FAILED_PRECONDITION, "the cache is not configured (--redis)");
        return -1;
    }
    if (dim == 0 || dim > 65536) {
        finish_errorf(c, GRPC_STATUS_INVALID_ARGUMENT, "embedding: give 1 to 65536 values (got %zu)", dim);
        return -1;
    }
    if (!kvc_rag_embedding_ok(emb, (int)dim)) {
        size_t bad = 0;
        while (bad < dim && isfinite(emb[bad])) bad++;
        if (bad < dim) finish_errorf(c, GRPC_STATUS_INVALID_ARGUMENT, "embedding: value %zu is not finite", bad);
        else finish_errorf(c, GRPC_STATUS_INVALID_ARGUMENT, "embedding: all values are zero (it has no direction)");
        return -1;
    }
    if (top_k < 0) {
        finish_errorf(c, GRPC_STATUS_INVALID_ARGUMENT, "top_k: must be >= 0");
        return -1;
    }
    return 0;
}

static void h_rag_store(call *c) {
    UNPACK(Kvserve__V1__RagStoreRequest, kvserve__v1__rag_store_request__descriptor, c, q);
    if (!rag_check(c, q->embedding, q->n_embedding, q->top_k)) {
        kvc_rag_query rq = {.tenant = c->tenant, .ns = q->namespace_, .model = q->embedding_model, .top_k = q->top_k,
                            .query = q->query, .query_len = strlen(q->query), .embedding = q->embedding,
                            .dim = (int)q->n_embedding};
        int rc = kvc_rag_store(c->s->rag, &rq, q->result.data, q->result.len, (int)q->ttl_seconds);
        if (rc == KVC_EINVAL)
            finish_errorf(c, GRPC_STATUS_INVALID_ARGUMENT,
                          "embedding: dimension %zu does not match the entries stored for this namespace, model and top_k",
                          q->n_embedding);
        else {
            Kvserve__V1__RagStoreReply rep = KVSERVE__V1__RAG_STORE_REPLY__INIT;
            rep.stored = rc == KVC_OK; /* fail-open: a write Redis refused is counted, not an error */
            finish_call(c, GRPC_STATUS_OK, NULL, &rep.base);
        }
    }
    kvserve__v1__rag_store_request__free_unpacked(q, NULL);
}

static void h_rag_lookup(call *c) {
    UNPACK(Kvserve__V1__RagLookupRequest, kvserve__v1__rag_lookup_request__descriptor, c, q);
    if (!(q->threshold >= 0 && q->threshold <= 1)) {
        finish_errorf(c, GRPC_STATUS_INVALID_ARGUMENT, "threshold: must be in [0, 1]");
    } else if (!rag_check(c, q->embedding, q->n_embedding, q->top_k)) {
        kvc_rag_query rq = {.tenant = c->tenant, .ns = q->namespace_, .model = q->embedding_model, .top_k = q->top_k,
                            .query = q->query, .query_len = strlen(q->query), .embedding = q->embedding,
                            .dim = (int)q->n_embedding};
        uint8_t *res = NULL;
        size_t len = 0;
        float sim = 0;
        int exact = 0;
        int rc = kvc_rag_lookup(c->s->rag, &rq, q->threshold > 0 ? q->threshold : 0.95f, &res, &len, &sim, &exact);
        if (rc == KVC_EINVAL)
            finish_errorf(c, GRPC_STATUS_INVALID_ARGUMENT,
                          "embedding: dimension %zu does not match the entries stored for this namespace, model and top_k",
                          q->n_embedding);
        else {
            Kvserve__V1__RagLookupReply rep = KVSERVE__V1__RAG_LOOKUP_REPLY__INIT;
            rep.hit = rc == KVC_OK; /* errors are misses (fail-open) */
            if (rep.hit) {
                rep.result.data = res;
                rep.result.len = len;
                rep.similarity = sim;
                rep.exact = exact;
            }
            finish_call(c, GRPC_STATUS_OK, NULL, &rep.base);
        }
        free(res);
    }
    kvserve__v1__rag_lookup_request__free_unpacked(q, NULL);
}

static void agent_msg(const eng_agent_info *i, Kvserve__V1__AgentInfo *a) {
    kvserve__v1__agent_info__init(a);
    a->agent_id = (char *)i->agent_id;
    a->tokens = i->n_tokens;
    a->cached_tokens = i->n_cached;
    a->blocks = i->n_blocks;
    a->busy = i->busy;
    a->idle_seconds = i->idle_seconds;
}

static int check_agent_id(call *c, const char *id) {
    if (!id || !id[0]) {
        finish_errorf(c, GRPC_STATUS_INVALID_ARGUMENT, "agent_id: required");
        return -1;
    }
    return 0;
}

static void h_get_agent(call *c) {
    UNPACK(Kvserve__V1__AgentRequest, kvserve__v1__agent_request__descriptor, c, q);
    eng_agent_info info;
    if (!check_agent_id(c, q->agent_id)) {
        if (eng_agent_get(c->s->eng, c->tenant, q->agent_id, &info) != ENG_OK)
            finish_errorf(c, GRPC_STATUS_NOT_FOUND, "agent_id: no agent \"%s\"", q->agent_id);
        else {
            Kvserve__V1__AgentInfo a;
            agent_msg(&info, &a);
            finish_call(c, GRPC_STATUS_OK, NULL, &a.base);
        }
    }
    kvserve__v1__agent_request__free_unpacked(q, NULL);
}

static void h_list_agents(call *c) {
    eng_agent_info *infos = NULL;
    int n = eng_agent_list(c->s->eng, c->tenant, NULL, 0), got = 0;
    if (n > 0 && (infos = calloc((size_t)n, sizeof *infos))) got = eng_agent_list(c->s->eng, c->tenant, infos, n);
    if (got > n) got = n;
    Kvserve__V1__ListAgentsReply rep = KVSERVE__V1__LIST_AGENTS_REPLY__INIT;
    Kvserve__V1__AgentInfo *msgs = calloc((size_t)(got ? got : 1), sizeof *msgs);
    Kvserve__V1__AgentInfo **ptrs = calloc((size_t)(got ? got : 1), sizeof *ptrs);
    if (msgs && ptrs)
        for (int i = 0; i < got; i++) {
            agent_msg(&infos[i], &msgs[i]);
            ptrs[i] = &msgs[i];
        }
    rep.n_agents = msgs && ptrs ? (size_t)got : 0;
    rep.agents = ptrs;
    finish_call(c, GRPC_STATUS_OK, NULL, &rep.base);
    free(msgs);
    free(ptrs);
    free(infos);
}

static void h_drop_agent(call *c) {
    UNPACK(Kvserve__V1__AgentRequest, kvserve__v1__agent_request__descriptor, c, q);
    if (!check_agent_id(c, q->agent_id)) {
        int rc = eng_agent_drop(c->s->eng, c->tenant, q->agent_id);
        if (rc == ENG_ENOTFOUND) finish_errorf(c, GRPC_STATUS_NOT_FOUND, "agent_id: no agent \"%s\"", q->agent_id);
        else if (rc) finish_errorf(c, status_of(rc), "agent \"%s\": %s", q->agent_id, eng_strerror(rc));
        else {
            Kvserve__V1__DropAgentReply rep = KVSERVE__V1__DROP_AGENT_REPLY__INIT;
            finish_call(c, GRPC_STATUS_OK, NULL, &rep.base);
        }
    }
    kvserve__v1__agent_request__free_unpacked(q, NULL);
}

static void h_export_agent(call *c) {
    UNPACK(Kvserve__V1__AgentRequest, kvserve__v1__agent_request__descriptor, c, q);
    if (!check_agent_id(c, q->agent_id)) {
        uint8_t *buf;
        size_t len;
        char err[256];
        int rc = eng_agent_export(c->s->eng, c->tenant, q->agent_id, &buf, &len, err, sizeof err);
        if (!rc && srv__agent_seal(&c->s->akey, eng_model_fingerprint(c->s->model), c->tenant, &buf, &len)) {
            free(buf);
            rc = ENG_ENOMEM;
            snprintf(err, sizeof err, "out of memory");
        }
        if (rc) finish_call(c, status_of(rc), err, NULL);
        else {
            Kvserve__V1__ExportAgentReply rep = KVSERVE__V1__EXPORT_AGENT_REPLY__INIT;
            rep.data.data = buf;
            rep.data.len = len;
            finish_call(c, GRPC_STATUS_OK, NULL, &rep.base);
            free(buf);
        }
    }
    kvserve__v1__agent_request__free_unpacked(q, NULL);
}

static void h_import_agent(call *c) {
    UNPACK(Kvserve__V1__ImportAgentRequest, kvserve__v1__import_agent_request__descriptor, c, q);
    if (!check_agent_id(c, q->agent_id)) {
        char err[256];
        size_t n = 0;
        int rc = ENG_ECORRUPT;
        if (srv__agent_verify(&c->s->akey, eng_model_fingerprint(c->s->model), c->tenant, q->data.data, q->data.len, &n))
            snprintf(err, sizeof err, "not an export of this server for this tenant (its signature does not verify: "
                                      "altered, truncated, another tenant's, or signed with another --export-key)");
        else
            rc = eng_agent_import(c->s->eng, c->tenant, q->agent_id, q->data.data, n, err, sizeof err);
        eng_agent_info info;
        if (rc) finish_errorf(c, status_of(rc), "data: %s", err);
        else if (eng_agent_get(c->s->eng, c->tenant, q->agent_id, &info) == ENG_OK) {
            Kvserve__V1__AgentInfo a;
            agent_msg(&info, &a);
            finish_call(c, GRPC_STATUS_OK, NULL, &a.base);
        } else finish_errorf(c, GRPC_STATUS_INTERNAL, "agent vanished after import");
    }
    kvserve__v1__import_agent_request__free_unpacked(q, NULL);
}

/* ---- health ------------------------------------------------------------------------- */
static const char *KNOWN_SERVICES[] = {"", "kvserve.v1.Generation", "kvserve.v1.Agents", "kvserve.v1.Cache",
                                       "grpc.health.v1.Health",
                                       "grpc.reflection.v1.ServerReflection",
                                       "grpc.reflection.v1alpha.ServerReflection"};

static int health_status(srv *s, const char *svc) {
    int known = 0;
    for (size_t i = 0; i < sizeof KNOWN_SERVICES / sizeof *KNOWN_SERVICES; i++) known |= !strcmp(svc, KNOWN_SERVICES[i]);
    if (!known) return GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN;
    return s->serving ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
                      : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING;
}

static void h_health_check(call *c) {
    UNPACK(Grpc__Health__V1__HealthCheckRequest, grpc__health__v1__health_check_request__descriptor, c, q);
    pthread_mutex_lock(&c->s->mu);
    int st = health_status(c->s, q->service);
    pthread_mutex_unlock(&c->s->mu);
    if (st == GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN)
        finish_errorf(c, GRPC_STATUS_NOT_FOUND, "service: unknown service \"%s\"", q->service);
    else {
        Grpc__Health__V1__HealthCheckResponse rep = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
        rep.status = st;
        finish_call(c, GRPC_STATUS_OK, NULL, &rep.base);
    }
    grpc__health__v1__health_check_request__free_unpacked(q, NULL);
}

static void push_health(call *c, int st) {
    Grpc__Health__V1__HealthCheckResponse rep = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    rep.status = st;
    stream_push(c, &rep.base);
}

static void h_health_watch(call *c) {
    srv *s = c->s;
    UNPACK(Grpc__Health__V1__HealthCheckRequest, grpc__health__v1__health_check_request__descriptor, c, q);
    /* remember the service name in the tenant slot's neighbour: reuse details */
    pthread_mutex_lock(&s->mu);
    c->watcher = 1;
    snprintf(c->tenant, sizeof c->tenant, "%s", q->service);
    stream_begin(c);
    push_health(c, health_status(s, q->service));
    call_ref(c); /* the watcher list's reference */
    c->next_watch = s->watchers;
    s->watchers = c;
    pthread_mutex_unlock(&s->mu);
    grpc__health__v1__health_check_request__free_unpacked(q, NULL);
    call_unref(c);
}

/* srv.mu held */
static void notify_watchers(srv *s) {
    for (call *w = s->watchers; w; w = w->next_watch) push_health(w, health_status(s, w->tenant));
}

/* ---- reflection ---------------------------------------------------------------------- */
static void reflection_answer(call *c, Grpc__Reflection__V1__ServerReflectionRequest *q) {
    srv *s = c->s;
    Grpc__Reflection__V1__ServerReflectionResponse rep = GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__INIT;
    Grpc__Reflection__V1__ListServiceResponse ls = GRPC__REFLECTION__V1__LIST_SERVICE_RESPONSE__INIT;
    enum { N_SERVICES = sizeof KNOWN_SERVICES / sizeof *KNOWN_SERVICES - 1 }; /* (the first is "": the server) */
    Grpc__Reflection__V1__ServiceResponse svc[N_SERVICES], *svcp[N_SERVICES];
    Grpc__Reflection__V1__FileDescriptorResponse fd = GRPC__REFLECTION__V1__FILE_DESCRIPTOR_RESPONSE__INIT;
    Grpc__Reflection__V1__ErrorResponse er = GRPC__REFLECTION__V1__ERROR_RESPONSE__INIT;
    enum { MAX_FILES = 16 };
    ProtobufCBinaryData files[MAX_FILES];
    const uint8_t *fdata[MAX_FILES];
    size_t flen[MAX_FILES], nf = 0;
    rep.valid_host = q->host;
    rep.original_request = q;
    int found = -1;
    switch (q->message_request_case) {
    case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_LIST_SERVICES:
        for (int i = 0; i < N_SERVICES; i++) {
            grpc__reflection__v1__service_response__init(&svc[i]);
            svc[i].name = (char *)KNOWN_SERVICES[i + 1];
            svcp[i] = &svc[i];
        }
        ls.n_service = N_SERVICES;
        ls.service = svcp;
        rep.message_response_case = GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_LIST_SERVICES_RESPONSE;
        rep.list_services_response = &ls;
        break;
    case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_BY_FILENAME:
        found = srv__desc_by_name(s->desc, q->file_by_filename);
        break;
    case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_CONTAINING_SYMBOL:
        found = srv__desc_by_symbol(s->desc, q->file_containing_symbol);
        break;
    default:
        break;
    }
    if (rep.message_response_case == GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE__NOT_SET) {
        if (found >= 0 && (nf = srv__desc_closure(s->desc, found, fdata, flen, MAX_FILES)) <= MAX_FILES) {
            for (size_t i = 0; i < nf; i++) files[i] = (ProtobufCBinaryData){flen[i], (uint8_t *)fdata[i]};
            fd.n_file_descriptor_proto = nf;
            fd.file_descriptor_proto = files;
            rep.message_response_case =
                GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_FILE_DESCRIPTOR_RESPONSE;
            rep.file_descriptor_response = &fd;
        } else {
            int unimpl = q->message_request_case ==
                             GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_CONTAINING_EXTENSION ||
                         q->message_request_case ==
                             GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_ALL_EXTENSION_NUMBERS_OF_TYPE;
            er.error_code = unimpl ? GRPC_STATUS_UNIMPLEMENTED : GRPC_STATUS_NOT_FOUND;
            er.error_message = unimpl ? "extensions are not used by kvserve" : "not found";
            rep.message_response_case = GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_ERROR_RESPONSE;
            rep.error_response = &er;
        }
    }
    stream_push(c, &rep.base);
}

static void on_reflection_recv(call *c, int ok);

static void reflection_recv(call *c) {
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &c->recv_bb;
    call_ref(c);
    cq_dispatch(c, on_reflection_recv, &c->t_recv);
    if (grpc_call_start_batch(c->gc, &op, 1, &c->t_recv, NULL) != GRPC_CALL_OK) {
        call_unref(c);
        stream_end(c, GRPC_STATUS_INTERNAL, "recv failed");
    }
}

static void on_reflection_recv(call *c, int ok) {
    grpc_byte_buffer *bb = c->recv_bb;
    c->recv_bb = NULL;
    if (!ok || !bb) { /* the client closed its side */
        stream_end(c, GRPC_STATUS_OK, "");
    } else {
        char why[320];
        Grpc__Reflection__V1__ServerReflectionRequest *q = (Grpc__Reflection__V1__ServerReflectionRequest *)unpack_request(
            &grpc__reflection__v1__server_reflection_request__descriptor, bb, why, sizeof why);
        grpc_byte_buffer_destroy(bb);
        if (!q) stream_end(c, GRPC_STATUS_INVALID_ARGUMENT, why);
        else {
            reflection_answer(c, q);
            grpc__reflection__v1__server_reflection_request__free_unpacked(q, NULL);
            reflection_recv(c);
        }
    }
    call_unref(c);
}

static void h_reflection(call *c) {
    stream_begin(c);
    reflection_recv(c);
    call_unref(c);
}

/* ---- method table and call dispatch ---------------------------------------------------- */
static const method METHODS[] = {
    {"/kvserve.v1.Generation/Submit", K_UNARY, h_submit, 1, 1, 0},
    {"/kvserve.v1.Generation/Step", K_UNARY, h_step, 1, 1, 1},
    {"/kvserve.v1.Generation/Stream", K_SSTREAM, h_stream, 1, 1, 0},
    {"/kvserve.v1.Generation/Cancel", K_UNARY, h_cancel, 1, 1, 1},
    {"/kvserve.v1.Generation/Stats", K_UNARY, h_stats, 1, 1, 0},
    {"/kvserve.v1.Agents/GetAgent", K_UNARY, h_get_agent, 1, 1, 0},
    {"/kvserve.v1.Agents/ListAgents", K_UNARY, h_list_agents, 1, 1, 0},
    {"/kvserve.v1.Agents/DropAgent", K_UNARY, h_drop_agent, 1, 1, 0},
    {"/kvserve.v1.Agents/ExportAgent", K_UNARY, h_export_agent, 1, 1, 0},
    {"/kvserve.v1.Agents/ImportAgent", K_UNARY, h_import_agent, 1, 1, 0},
    {"/kvserve.v1.Cache/Invalidate", K_UNARY, h_invalidate, 1, 1, 0},
    {"/kvserve.v1.Cache/Stats", K_UNARY, h_cache_stats, 1, 1, 0},
    {"/kvserve.v1.Cache/RagStore", K_UNARY, h_rag_store, 1, 0, 0},
    {"/kvserve.v1.Cache/RagLookup", K_UNARY, h_rag_lookup, 1, 0, 0},
    {"/grpc.health.v1.Health/Check", K_UNARY, h_health_check, 0, 0, 0},
    {"/grpc.health.v1.Health/Watch", K_SSTREAM, h_health_watch, 0, 0, 0},
    {"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", K_BIDI, h_reflection, 1, 0, 0},
    {"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", K_BIDI, h_reflection, 1, 0, 0},
};
#define N_METHODS ((int)(sizeof METHODS / sizeof *METHODS))

static const char *method_name(const call *c) { return c->mi >= 0 ? METHODS[c->mi].path : "unknown"; }

/* Scrape-time figures for the metrics endpoint. */
static void metrics_source(void *ud, srv_metrics_snapshot *m) {
    srv *s = ud;
    if (s->eng) {
        eng_stats st;
        eng_stats_get(s->eng, &st);
        m->blocks_used = st.blocks_used;
        m->blocks_free = st.blocks_free;
        m->blocks_cached = st.blocks_cached;
        m->blocks_shared = st.blocks_shared;
        m->running = st.running;
        m->waiting = st.waiting;
    }
    if (s->pcache) {
        kvc_prompt_stats ps;
        kvc_rag_stats gs;
        kvc_prompt_stats_get(s->pcache, &ps);
        kvc_rag_stats_get(s->rag, &gs);
        m->cache_enabled = 1;
        m->llm = (srv_cache_layer){ps.hits, ps.misses, ps.writes, ps.invalidations, ps.errors};
        m->rag = (srv_cache_layer){gs.hits, gs.misses, gs.writes, 0, gs.errors};
    }
    if (s->batcher) {
        srv__batcher_stats bs;
        srv__batcher_stats_get(s->batcher, &bs);
        m->batch_rejected = bs.rejected;
        m->batch_expired = bs.expired;
        m->batch_cancelled = bs.removed;
        m->batch_closed = bs.closed;
        m->batch_queued = (int)bs.queued;
    }
    pthread_mutex_lock(&s->mu);
    m->singleflight_joined = s->singleflight_joined;
    m->purged_keys = s->purged_keys;
    for (parked *p = s->parked; p; p = p->next) m->steps_parked++;
    m->requests_known = s->reg ? (int)(srv__reg_size(s->reg)) : 0;
    pthread_mutex_unlock(&s->mu);
}

static void request_call(srv *s, int mi);

static void on_new_call(call *c, int ok) {
    srv *s = c->s;
    if (!ok) { /* shutting down */
        call_unref(c);
        return;
    }
    request_call(s, c->mi); /* keep one waiting for the next caller */
    c->t_start = now_s();
    if (c->mi < 0) {
        char path[256];
        snprintf(path, sizeof path, "%.*s", (int)GRPC_SLICE_LENGTH(c->details.method),
                 (const char *)GRPC_SLICE_START_PTR(c->details.method));
        finish_errorf(c, GRPC_STATUS_UNIMPLEMENTED, "unknown method %s", path);
        return;
    }
    const method *m = &METHODS[c->mi];
    if (m->auth && authenticate(c) != 0) {
        finish_errorf(c, GRPC_STATUS_UNAUTHENTICATED, "missing or invalid bearer token");
        return;
    }
    pthread_mutex_lock(&s->mu);
    int ready = s->ready, down = s->shutting_down;
    pthread_mutex_unlock(&s->mu);
    if (m->needs_model && !ready) {
        finish_errorf(c, GRPC_STATUS_UNAVAILABLE, "the model is still loading");
        return;
    }
    if (m->needs_model && down && !m->drains) {
        finish_errorf(c, GRPC_STATUS_UNAVAILABLE, "the server is shutting down");
        return;
    }
    m->fn(c);
}

static void request_call(srv *s, int mi) {
    call *c = call_new(s, mi);
    if (!c) return;
    cq_dispatch(c, on_new_call, &c->t_new);
    grpc_call_error e;
    if (mi < 0)
        e = grpc_server_request_call(s->server, &c->gc, &c->details, &c->md, s->cq, s->cq, &c->t_new);
    else
        e = grpc_server_request_registered_call(s->server, s->rm[mi], &c->gc, &c->deadline, &c->md,
                                                METHODS[mi].k == K_BIDI ? NULL : &c->payload, s->cq, s->cq, &c->t_new);
    if (e != GRPC_CALL_OK) call_unref(c);
}

static void on_shutdown(call *c, int ok) {
    (void)c;
    (void)ok;
}

static void *cq_loop(void *p) {
    srv *s = p;
    for (;;) {
        grpc_event ev = grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
        if (ev.type != GRPC_OP_COMPLETE) continue;
        tag *t = ev.tag;
        if (t == &s->t_shutdown) {
            pthread_mutex_lock(&s->mu);
            s->shutdown_done = 1;
            pthread_mutex_unlock(&s->mu);
            continue;
        }
        t->fn(t->c, ev.success);
    }
    return NULL;
}

/* Test hook (KVSERVE_TEST_HOLD_FILE, docs/testing.md): while the file exists,
 * no request generates more tokens than the number written in it (0 if it
 * holds none). Returns the hold, or -1 when the file is absent. */
static int read_hold(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    int n = 0;
    if (fscanf(f, "%d", &n) != 1 || n < 0) n = 0;
    fclose(f);
    return n;
}

static void *engine_loop(void *p) {
    srv *s = p;
    for (;;) {
        pthread_mutex_lock(&s->mu);
        int stop = s->stop_engine;
        pthread_mutex_unlock(&s->mu);
        if (stop) break;
        int held = -1;
        if (s->cfg.test_hold_file) eng_engine_hold(s->eng, held = read_hold(s->cfg.test_hold_file));
        int n = eng_step(s->eng, on_event, s);
        if (n > 0) srv_metrics_step(s->metrics, n);
        check_parked(s, 0);
        if (n == 0) {
            pthread_mutex_lock(&s->mu);
            if (!s->work && !s->stop_engine) {
                struct timespec ts;
                clock_gettime(CLOCK_REALTIME, &ts);
                long wait_ns = s->parked || held >= 0 ? 5000000L : 200000000L; /* a held test polls its file */
                ts.tv_nsec += wait_ns;
                if (ts.tv_nsec >= 1000000000L) { ts.tv_sec++; ts.tv_nsec -= 1000000000L; }
                pthread_cond_timedwait(&s->cv, &s->mu, &ts);
            }
            s->work = 0;
            pthread_mutex_unlock(&s->mu);
        }
    }
    return NULL;
}

/* ---- start-up and shutdown -------------------------------------------------------------- */
static char *read_pem(const char *path, const char *what, int key) {
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "kvserve: %s %s: %s\n", what, path, strerror(errno));
        return NULL;
    }
    /* check that it parses as PEM before handing it to gRPC */
    void *obj = key ? (void *)PEM_read_PrivateKey(f, NULL, NULL, NULL) : (void *)PEM_read_X509(f, NULL, NULL, NULL);
    if (!obj) {
        fprintf(stderr, "kvserve: %s %s: not a valid PEM %s\n", what, path, key ? "private key" : "certificate");
        fclose(f);
        return NULL;
    }
    if (key) EVP_PKEY_free(obj); else X509_free(obj);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)n + 1);
    if (b && fread(b, 1, (size_t)n, f) != (size_t)n) { free(b); b = NULL; }
    if (b) b[n] = 0;
    fclose(f);
    return b;
}

/* The signal pipe: process-wide by nature, written by the handler only. */
static int sig_pipe[2] = {-1, -1};

static void on_signal(int sig) {
    int saved = errno;
    unsigned char b = (unsigned char)sig;
    ssize_t r = write(sig_pipe[1], &b, 1);
    (void)r;
    errno = saved;
}

static grpc_server_credentials *make_creds(const srv_config *c) {
    if (!c->tls_cert && !c->tls_key) return grpc_insecure_server_credentials_create();
    if (!c->tls_cert || !c->tls_key) {
        fprintf(stderr, "kvserve: TLS needs both --tls-cert and --tls-key\n");
        return NULL;
    }
    char *cert = read_pem(c->tls_cert, "--tls-cert", 0), *key = cert ? read_pem(c->tls_key, "--tls-key", 1) : NULL;
    char *ca = key && c->tls_client_ca ? read_pem(c->tls_client_ca, "--tls-client-ca", 0) : NULL;
    grpc_server_credentials *cr = NULL;
    if (cert && key) { /* the key must belong to the certificate */
        BIO *bc = BIO_new_mem_buf(cert, -1), *bk = BIO_new_mem_buf(key, -1);
        X509 *x = PEM_read_bio_X509(bc, NULL, NULL, NULL);
        EVP_PKEY *k = PEM_read_bio_PrivateKey(bk, NULL, NULL, NULL);
        int match = x && k && X509_check_private_key(x, k) == 1;
        X509_free(x);
        EVP_PKEY_free(k);
        BIO_free(bc);
        BIO_free(bk);
        if (!match) {
            fprintf(stderr, "kvserve: --tls-key %s does not match --tls-cert %s\n", c->tls_key, c->tls_cert);
            free(cert);
            free(key);
            free(ca);
            return NULL;
        }
    }
    if (cert && key && (!c->tls_client_ca || ca)) {
        grpc_ssl_pem_key_cert_pair pair = {key, cert};
        cr = grpc_ssl_server_credentials_create_ex(
            ca, &pair, 1, ca ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE,
            NULL);
    }
    free(cert);
    free(key);
    free(ca);
    return cr;
}

static void free_files(srv *s) {
    srv__desc_close(s->desc);
    s->desc = NULL;
}

static int getenv_int(const char *name, int def) {
    const char *v = getenv(name);
    return v && *v ? atoi(v) : def;
}

void srv_config_default(srv_config *c) {
    memset(c, 0, sizeof *c);
    c->model_dir = getenv("KVSERVE_MODEL");
    c->listen = getenv("KVSERVE_LISTEN") ? getenv("KVSERVE_LISTEN") : "127.0.0.1:50051";
    c->threads = getenv_int("KVSERVE_THREADS", 0);
    c->cq_threads = getenv_int("KVSERVE_CQ_THREADS", 2);
    c->engine.n_blocks = getenv_int("KVSERVE_POOL_BLOCKS", 0);
    c->engine.block_tokens = getenv_int("KVSERVE_BLOCK_TOKENS", 0);
    c->engine.max_step_tokens = getenv_int("KVSERVE_STEP_TOKENS", 0);
    c->engine.max_running = getenv_int("KVSERVE_MAX_RUNNING", 0);
    c->engine.max_queue = getenv_int("KVSERVE_MAX_QUEUE", 0);
    c->max_context = getenv_int("KVSERVE_MAX_CONTEXT", 0);
    c->tls_cert = getenv("KVSERVE_TLS_CERT");
    c->tls_key = getenv("KVSERVE_TLS_KEY");
    c->tls_client_ca = getenv("KVSERVE_TLS_CLIENT_CA");
    c->token_file = getenv("KVSERVE_TOKEN_FILE");
    c->export_key_file = getenv("KVSERVE_EXPORT_KEY");
    c->engine.share_prefix_across_tenants = getenv_int("KVSERVE_SHARE_PREFIX_ACROSS_TENANTS", 0) != 0;
    c->grace_seconds = getenv("KVSERVE_GRACE_SECONDS") ? atof(getenv("KVSERVE_GRACE_SECONDS")) : 10;
    c->max_message_bytes = getenv_int("KVSERVE_MAX_MESSAGE_BYTES", 64 << 20);
    c->max_wait_ms = getenv_int("KVSERVE_MAX_WAIT_MS", 10000);
    c->max_results = getenv_int("KVSERVE_MAX_RESULTS", 1024);
    c->result_ttl_s = getenv_int("KVSERVE_RESULT_TTL", 600);
    c->redis_url = getenv("KVSERVE_REDIS_URL");
    c->redis_timeout_ms = getenv_int("KVSERVE_REDIS_TIMEOUT_MS", 0);
    c->cache_ttl_s = getenv_int("KVSERVE_CACHE_TTL", 0);
    c->metrics_listen = getenv("KVSERVE_METRICS_LISTEN");
    c->price_per_1k = getenv("KVSERVE_PRICE_PER_1K") ? atof(getenv("KVSERVE_PRICE_PER_1K")) : 0;
    c->batch_max = getenv_int("KVSERVE_BATCH_MAX", 32);
    c->batch_window_ms = getenv_int("KVSERVE_BATCH_WINDOW_MS", 0);
    c->batch_queue = getenv_int("KVSERVE_BATCH_QUEUE", 1024);
    c->bf16_weights = getenv("KVSERVE_WEIGHTS") && !strcmp(getenv("KVSERVE_WEIGHTS"), "bf16");
    c->kv_f16 = getenv("KVSERVE_KV") && !strcmp(getenv("KVSERVE_KV"), "f16");
    c->test_hold_file = getenv("KVSERVE_TEST_HOLD_FILE");
}

static void *writer_loop(void *p);

/* The Redis pool's news, once per change: an operator sees "NOAUTH", "Connection refused", ... */
static void redis_problem(void *ud, const char *msg) {
    (void)ud;
    if (!strcmp(msg, "ok")) LOG_INFO("redis: working again (the caches are back)");
    else LOG_WARN("redis: %s (the caches fail open: requests go on without them)", msg);
}

/* Undo what srv_run set up before serving; exit code 2. */
static int early_exit(srv *s) {
    if (s->has_writer) {
        pthread_mutex_lock(&s->mu);
        s->writer_stop = 1;
        pthread_cond_signal(&s->jobs_cv);
        pthread_mutex_unlock(&s->mu);
        pthread_join(s->writer, NULL);
    }
    srv_metrics_free(s->metrics);
    kvc_rag_close(s->rag);
    kvc_prompt_close(s->pcache);
    kvc_redis_close(s->redis);
    free_files(s);
    free(s->tokens);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    pthread_cond_destroy(&s->jobs_cv);
    srv__reg_free(s->reg);
    free(s);
    return 2;
}

/* Every connection is a descriptor: take all the process may have (the soft
 * limit, often 1024, up to the hard one), so that clients run out of
 * patience before the server runs out of descriptors. */
static void raise_fd_limit(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rlim_t was = rl.rlim_cur;
        rl.rlim_cur = rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &rl) == 0)
            LOG_INFO("descriptor limit raised from %llu to %llu", (unsigned long long)was,
                     (unsigned long long)rl.rlim_max);
    }
}

int srv_run(const srv_config *cfg) {
    srv *s = calloc(1, sizeof *s);
    if (!s) return 1;
    raise_fd_limit();
    s->cfg = *cfg;
    if (s->cfg.cq_threads <= 0) s->cfg.cq_threads = 2;
    if (s->cfg.grace_seconds < 0) s->cfg.grace_seconds = 10;
    if (s->cfg.max_wait_ms <= 0) s->cfg.max_wait_ms = 10000;
    if (s->cfg.max_message_bytes <= 0) s->cfg.max_message_bytes = 64 << 20;
    if (s->cfg.max_results <= 0) s->cfg.max_results = 1024;
    if (s->cfg.result_ttl_s <= 0) s->cfg.result_ttl_s = 600;
    if (!(s->reg = srv__reg_new())) { free(s); return 1; }
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    pthread_cond_init(&s->jobs_cv, NULL);
    int rc = 1;
    if (!s->cfg.model_dir) {
        fprintf(stderr, "kvserve: give the model directory (--model DIR or KVSERVE_MODEL)\n");
        srv__reg_free(s->reg);
        free(s);
        return 2;
    }
    if (s->cfg.batch_max < 1 || s->cfg.batch_window_ms < 0 || s->cfg.batch_queue < s->cfg.batch_max) {
        fprintf(stderr, "kvserve: batcher: need 1 <= --batch-max <= --batch-queue and --batch-window-ms >= 0 (got %d, %d, %d)\n",
                s->cfg.batch_max, s->cfg.batch_queue, s->cfg.batch_window_ms);
        srv__reg_free(s->reg);
        free(s);
        return 2;
    }
    if (s->cfg.token_file && load_tokens(s, s->cfg.token_file)) {
        free(s->tokens);
        srv__reg_free(s->reg);
        free(s);
        return 2;
    }
    char kerr[512];
    if (srv__agent_key_init(&s->akey, s->cfg.export_key_file, kerr, sizeof kerr)) {
        fprintf(stderr, "kvserve: %s\n", kerr);
        free(s->tokens);
        srv__reg_free(s->reg);
        free(s);
        return 2;
    }
    if (srv__desc_open(&s->desc, kvserve_descriptor_set, kvserve_descriptor_set_len)) {
        srv__reg_free(s->reg);
        free(s);
        return 1;
    }
    s->metrics = srv_metrics_new(s->cfg.price_per_1k);
    if (s->cfg.metrics_listen && s->metrics && srv_metrics_listen(s->metrics, s->cfg.metrics_listen, metrics_source, s)) {
        fprintf(stderr, "kvserve: --metrics %s: cannot listen (an IPv4 HOST:PORT, free)\n", s->cfg.metrics_listen);
        srv_metrics_free(s->metrics);
        free_files(s);
        free(s->tokens);
        srv__reg_free(s->reg);
        free(s);
        return 2;
    }

    if (s->cfg.redis_url) { /* Redis may be down now: the cache is fail-open */
        char err[256] = "";
        kvc_redis_options ro = {.url = s->cfg.redis_url, .connect_timeout_ms = s->cfg.redis_timeout_ms,
                                .command_timeout_ms = s->cfg.redis_timeout_ms, .on_problem = redis_problem};
        kvc_prompt_options po = {.default_ttl_s = s->cfg.cache_ttl_s};
        int bad = kvc_redis_open(&s->redis, &ro, err, sizeof err) != KVC_OK;
        if (!bad && kvc_prompt_open(&s->pcache, s->redis, &po) != KVC_OK)
            bad = snprintf(err, sizeof err, "out of memory opening the prompt cache") > 0;
        if (!bad && kvc_rag_open(&s->rag, s->redis, NULL) != KVC_OK)
            bad = snprintf(err, sizeof err, "out of memory opening the RAG cache") > 0;
        if (bad) {
            kvc_prompt_close(s->pcache);
            fprintf(stderr, "kvserve: --redis: %s\n", err);
            kvc_redis_close(s->redis);
            srv_metrics_free(s->metrics);
            free_files(s);
            free(s->tokens);
            srv__reg_free(s->reg);
            free(s);
            return 2;
        }
        s->has_writer = pthread_create(&s->writer, NULL, writer_loop, s) == 0;
        if (!s->has_writer) { /* queued writes would wait for ever */
            fprintf(stderr, "kvserve: cannot start the cache writer thread: %s\n", strerror(errno));
            return early_exit(s);
        }
    }

    /* SIGTERM / SIGINT write to a pipe from whatever thread takes them (the
     * BLAS library starts threads before main, so masks cannot route them) */
    if (pipe(sig_pipe) != 0) return early_exit(s);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    grpc_init();
    grpc_server_credentials *creds = make_creds(&s->cfg);
    if (!creds) {
        grpc_shutdown();
        return early_exit(s);
    }
    grpc_arg args[3];
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[0].value.integer = s->cfg.max_message_bytes;
    args[1].type = GRPC_ARG_INTEGER;
    args[1].key = GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
    args[1].value.integer = s->cfg.max_message_bytes;
    args[2].type = GRPC_ARG_INTEGER; /* a second server on the same port must fail, not share it */
    args[2].key = GRPC_ARG_ALLOW_REUSEPORT;
    args[2].value.integer = 0;
    grpc_channel_args cargs = {3, args};
    s->server = grpc_server_create(&cargs, NULL);
    s->cq = grpc_completion_queue_create_for_next(NULL);
    grpc_server_register_completion_queue(s->server, s->cq, NULL);
    s->rm = calloc(N_METHODS, sizeof *s->rm);
    for (int i = 0; i < N_METHODS; i++)
        s->rm[i] = grpc_server_register_method(s->server, METHODS[i].path, NULL,
                                               METHODS[i].k == K_BIDI ? GRPC_SRM_PAYLOAD_NONE
                                                                      : GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER,
                                               0);
    int port = grpc_server_add_http2_port(s->server, s->cfg.listen, creds);
    grpc_server_credentials_release(creds);
    if (!port) {
        fprintf(stderr, "kvserve: cannot listen on %s (address in use or invalid)\n", s->cfg.listen);
        grpc_server_destroy(s->server);
        grpc_completion_queue_shutdown(s->cq);
        while (grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type != GRPC_QUEUE_SHUTDOWN) {}
        grpc_completion_queue_destroy(s->cq);
        grpc_shutdown();
        free(s->rm);
        return early_exit(s);
    }
    grpc_server_start(s->server);
    s->n_cq = s->cfg.cq_threads;
    s->cq_thr = calloc((size_t)s->n_cq, sizeof *s->cq_thr);
    for (int i = 0; s->cq_thr && i < s->n_cq; i++)
        if (pthread_create(&s->cq_thr[i], NULL, cq_loop, s) != 0) {
            LOG_WARN("could start only %d of %d completion-queue threads", i, s->n_cq);
            s->n_cq = i; /* (shutdown joins those) */
        }
    if (!s->cq_thr) s->n_cq = 0;
    if (s->n_cq == 0) LOG_WARN("no completion-queue thread could start: calls will not be served");
    for (int i = -1; i < N_METHODS; i++) request_call(s, i);
    LOG_INFO("listening on %s (port %d)%s%s; loading %s", s->cfg.listen, port, s->cfg.tls_cert ? ", TLS" : "",
             s->cfg.tls_client_ca ? " + client certificates" : "", s->cfg.model_dir);

    /* load the model while health says NOT_SERVING */
    char err[512];
    eng_options eo = {.n_threads = s->cfg.threads, .max_context = s->cfg.max_context,
                      .bf16_weights = s->cfg.bf16_weights, .kv_f16 = s->cfg.kv_f16};
    double t0 = now_s();
    int lrc = eng_model_open(&s->model, s->cfg.model_dir, &eo, err, sizeof err);
    if (!lrc) lrc = eng_engine_open(&s->eng, s->model, &s->cfg.engine, err, sizeof err);
    if (!lrc && eng_chat_open(&s->chat, s->cfg.model_dir, s->chat_why, sizeof s->chat_why) != ENG_OK) {
        LOG_INFO("no chat template: %s (requests with messages are refused)", s->chat_why);
        s->chat = NULL;
    }
    srv__batcher_options bo = {s->cfg.batch_max, s->cfg.batch_window_ms, s->cfg.batch_queue};
    if (!lrc && srv__batcher_open(&s->batcher, &bo, on_batch, on_batch_drop, s) != 0) {
        snprintf(err, sizeof err, "batcher: out of memory");
        lrc = ENG_ENOMEM;
    }
    if (lrc) {
        fprintf(stderr, "kvserve: %s\n", err);
        rc = 2;
    } else {
        eng_stats st;
        eng_stats_get(s->eng, &st);
        LOG_INFO("model loaded in %.2fs: %s files, weights held in %s (%zu MiB), %d %s KV blocks of %d tokens, "
                 "BLAS kernels %s; serving",
                 now_s() - t0, eng_model_config(s->model)->dtype, s->cfg.bf16_weights ? "BF16" : "F32",
                 eng_model_weight_bytes(s->model) >> 20, st.blocks_total, s->cfg.kv_f16 ? "F16" : "F32",
                 st.block_tokens, eng_blas_core());
        if (eng_model_warning(s->model)) LOG_WARN("%s", eng_model_warning(s->model));
        if (eng_blas_note())
            LOG_INFO("BLAS: OpenBLAS would have run its %s kernels on this AVX-512 CPU; switched to %s "
                     "(KVSERVE_BLAS_CORE=keep to keep them)", eng_blas_note(), eng_blas_core());
        if (s->akey.generated)
            LOG_INFO("agent exports are signed with a key made at start: they import only into this process "
                     "(--export-key FILE to keep one across restarts and replicas)");
        if (s->cfg.test_hold_file)
            LOG_WARN("test hook KVSERVE_TEST_HOLD_FILE=%s: while that file exists, requests are held at the "
                     "number of tokens it holds", s->cfg.test_hold_file);
        if (s->n_cq == 0 || pthread_create(&s->eng_thr, NULL, engine_loop, s) != 0) {
            memset(&s->eng_thr, 0, sizeof s->eng_thr);
            fprintf(stderr, "kvserve: cannot start the %s thread%s: %s\n", s->n_cq ? "engine" : "completion-queue",
                    s->n_cq ? "" : "s", strerror(errno));
            rc = 2; /* never SERVING */
        } else {
            pthread_mutex_lock(&s->mu);
            s->ready = 1;
            s->serving = 1;
            notify_watchers(s);
            pthread_mutex_unlock(&s->mu);
            unsigned char sig = 0;
            while (read(sig_pipe[0], &sig, 1) < 0 && errno == EINTR) {}
            LOG_INFO("signal %d: shutting down (grace %.1fs)", sig, s->cfg.grace_seconds);
            rc = 0;
        }
    }

    /* Graceful shutdown. From here new generation, agent and cache-admin
     * calls are refused (UNAVAILABLE; Step and Cancel go on), and only then
     * do watchers hear NOT_SERVING, so
     * that a client that has seen it can count on it. Streams, parked Steps,
     * what waits in the batcher and Submitted requests get the grace to
     * finish, and what finishes meanwhile stays collectable by Step. */
    pthread_mutex_lock(&s->mu);
    s->serving = 0;
    s->shutting_down = 1;
    notify_watchers(s);
    pthread_mutex_unlock(&s->mu);
    double drain_start = now_s(), until = drain_start + s->cfg.grace_seconds;
    for (;;) {
        pthread_mutex_lock(&s->mu);
        int busy = s->active_calls > 0 || s->parked || s->pending || srv__reg_running_steps(s->reg) > 0 ||
                   srv__reg_newest_done_at(s->reg) >= drain_start;
        pthread_mutex_unlock(&s->mu);
        if (!busy || now_s() >= until) break;
        sleep_ms(20);
    }
    srv__batcher_close(s->batcher); /* what still waits is refused (UNAVAILABLE) */
    s->batcher = NULL;
    /* past the grace: cancel the engine requests first, so that each stream
     * still gets its completion (finish CANCELLED) and status OK, and each
     * Submitted request a CANCELLED completion for Step */
    if (s->eng_thr) {
        pthread_mutex_lock(&s->mu);
        size_t n = 0, cap = 0;
        uint64_t *ids = NULL;
        for (srv_reg_entry *e = srv__reg_first(s->reg); e; e = e->next) {
            if (e->done) continue;
            if (n == cap) {
                uint64_t *ni = realloc(ids, (cap = cap ? cap * 2 : 64) * sizeof *ni);
                if (!ni) break;
                ids = ni;
            }
            ids[n++] = e->id;
        }
        pthread_mutex_unlock(&s->mu);
        for (size_t i = 0; i < n; i++) eng_cancel(s->eng, ids[i]);
        free(ids);
        wake_engine_locked(s);
        for (int i = 0; i < 100; i++) { /* up to a second for those completions to go out */
            pthread_mutex_lock(&s->mu);
            int left = s->active_calls || srv__reg_running_steps(s->reg) > 0;
            pthread_mutex_unlock(&s->mu);
            if (!left) break;
            sleep_ms(10);
        }
        check_parked(s, 1); /* parked Steps take what came, the CANCELLED completions included */
    }
    /* Health watchers end with a status after their NOT_SERVING, before the
     * calls left are cancelled: a cancel could cut the message off the wire. */
    pthread_mutex_lock(&s->mu);
    for (call *w = s->watchers; w; w = w->next_watch) stream_end(w, GRPC_STATUS_UNAVAILABLE, "the server is shutting down");
    pthread_mutex_unlock(&s->mu);
    for (int i = 0; i < 500; i++) { /* up to 5 s: each leaves the list once its client has the status */
        pthread_mutex_lock(&s->mu);
        int left = s->watchers != NULL;
        pthread_mutex_unlock(&s->mu);
        if (!left) break;
        sleep_ms(10);
    }
    cq_dispatch(NULL, on_shutdown, &s->t_shutdown);
    grpc_server_shutdown_and_notify(s->server, s->cq, &s->t_shutdown);
    grpc_server_cancel_all_calls(s->server);
    for (int i = 0; i < 500; i++) { /* the cancelled streams' completions come through the engine */
        pthread_mutex_lock(&s->mu);
        int left = s->active_calls, done = s->shutdown_done;
        pthread_mutex_unlock(&s->mu);
        if ((!left || !s->eng_thr) && done) break;
        sleep_ms(10);
    }
    if (s->eng_thr) {
        pthread_mutex_lock(&s->mu);
        s->stop_engine = 1;
        pthread_cond_signal(&s->cv);
        pthread_mutex_unlock(&s->mu);
        pthread_join(s->eng_thr, NULL);
    }
    if (s->has_writer) { /* finish the cache writes already queued */
        pthread_mutex_lock(&s->mu);
        s->writer_stop = 1;
        pthread_cond_signal(&s->jobs_cv);
        pthread_mutex_unlock(&s->mu);
        pthread_join(s->writer, NULL);
    }
    /* followers of flights that never finished: their calls were cancelled */
    for (flight *f = s->flights, *fn; f; f = fn) {
        fn = f->next;
        for (follower *w = f->followers, *n; w; w = n) {
            n = w->next;
            call_unref(w->c);
            free(w);
        }
        free(f);
    }
    s->flights = NULL;
    /* drop what is left of the watchers and records */
    pthread_mutex_lock(&s->mu);
    call *w = s->watchers;
    s->watchers = NULL;
    pthread_mutex_unlock(&s->mu);
    for (call *n; w; w = n) {
        n = w->next_watch;
        call_unref(w);
    }
    grpc_server_destroy(s->server);
    grpc_completion_queue_shutdown(s->cq);
    for (int i = 0; i < s->n_cq; i++) pthread_join(s->cq_thr[i], NULL);
    grpc_completion_queue_destroy(s->cq);
    for (srv_reg_entry *e = srv__reg_first(s->reg), *n; e; e = n) {
        rec *r = (rec *)e;
        n = e->next;
        if (r->stream) call_unref(r->stream);
        rec_free(r);
    }
    eng_engine_close(s->eng);
    eng_chat_close(s->chat);
    eng_model_close(s->model);
    grpc_shutdown();
    free_files(s);
    srv_metrics_free(s->metrics); /* stops its HTTP thread first: it reads the engine and caches */
    kvc_rag_close(s->rag);
    kvc_prompt_close(s->pcache);
    kvc_redis_close(s->redis);
    pthread_cond_destroy(&s->jobs_cv);
    free(s->cq_thr);
    free(s->rm);
    free(s->tokens);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    srv__reg_free(s->reg);
    OPENSSL_cleanse(&s->akey, sizeof s->akey);
    free(s);
    signal(SIGTERM, SIG_DFL);
    signal(SIGINT, SIG_DFL);
    close(sig_pipe[0]);
    close(sig_pipe[1]);
    LOG_INFO("stopped");
    return rc;
}
