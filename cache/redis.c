/* redis.c — a small pool of hiredis connections with timeouts, lazy
 * (re)connection and a circuit breaker. */
#include "kvc_internal.h"

#include <hiredis/hiredis.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
    redisContext *c;
    int busy;
} slot;

struct kvc_redis {
    kvc_redis_options o;
    char host[256], path[256], user[128], pass[256];
    int port, db, unix_sock;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    slot *slots;
    int fails;               /* consecutive failures */
    double open_until;       /* circuit open until (monotonic seconds) */
    int probing;             /* one request is probing a half-open circuit */
    kvc_redis_stats st;
    char problem[256];       /* what on_problem was last told ("" = nothing yet, "ok") */
};

/* Tell on_problem about msg if it differs from what it heard last. */
static void note(kvc_redis *r, const char *msg) {
    if (!r->o.on_problem) return;
    char copy[256];
    pthread_mutex_lock(&r->mu);
    int changed = strcmp(r->problem, msg) != 0 && !(!r->problem[0] && !strcmp(msg, "ok"));
    if (changed) snprintf(r->problem, sizeof r->problem, "%s", msg);
    snprintf(copy, sizeof copy, "%s", msg);
    pthread_mutex_unlock(&r->mu);
    if (changed) r->o.on_problem(r->o.on_problem_ud, copy);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

const char *kvc_strerror(int code) {
    switch (code) {
    case KVC_OK: return "ok";
    case KVC_MISS: return "miss";
    case KVC_EINVAL: return "invalid argument";
    case KVC_EREDIS: return "redis unavailable";
    case KVC_ENOMEM: return "out of memory";
    case KVC_ECORRUPT: return "corrupt cached value";
    default: return "unknown error";
    }
}

static int parse_url(kvc_redis *r, const char *url, char *err, size_t errlen) {
    r->port = 6379;
    if (!strncmp(url, "unix://", 7)) {
        r->unix_sock = 1;
        const char *p = url + 7, *q = strchr(p, '?');
        size_t n = q ? (size_t)(q - p) : strlen(p);
        if (!n || n >= sizeof r->path) goto bad;
        memcpy(r->path, p, n);
        if (q && sscanf(q, "?db=%d", &r->db) != 1) goto bad;
        return KVC_OK;
    }
    if (strncmp(url, "redis://", 8)) goto bad;
    const char *p = url + 8, *at = strchr(p, '@');
    if (at) { /* user:password@ or :password@ */
        const char *colon = memchr(p, ':', (size_t)(at - p));
        if (colon) {
            snprintf(r->user, sizeof r->user, "%.*s", (int)(colon - p), p);
            snprintf(r->pass, sizeof r->pass, "%.*s", (int)(at - colon - 1), colon + 1);
        } else {
            snprintf(r->pass, sizeof r->pass, "%.*s", (int)(at - p), p);
        }
        p = at + 1;
    }
    const char *end = p + strcspn(p, ":/");
    if (end == p || (size_t)(end - p) >= sizeof r->host) goto bad;
    snprintf(r->host, sizeof r->host, "%.*s", (int)(end - p), p);
    if (*end == ':') {
        char *e;
        long port = strtol(end + 1, &e, 10);
        if (port <= 0 || port > 65535) goto bad;
        r->port = (int)port;
        end = e;
    }
    if (*end == '/' && end[1]) {
        char *e;
        r->db = (int)strtol(end + 1, &e, 10);
        if (*e || r->db < 0) goto bad;
    } else if (*end && strcmp(end, "/")) goto bad;
    return KVC_OK;
bad:
    snprintf(err, errlen, "bad Redis URL \"%s\" (redis://[user:password@]host:port/db or unix:///path?db=N)", url);
    return KVC_EINVAL;
}

int kvc_redis_open(kvc_redis **out, const kvc_redis_options *o, char *err, size_t errlen) {
    *out = NULL;
    kvc_redis *r = calloc(1, sizeof *r);
    if (!r) return KVC_ENOMEM;
    r->o = *o;
    if (r->o.connect_timeout_ms <= 0) r->o.connect_timeout_ms = 200;
    if (r->o.command_timeout_ms <= 0) r->o.command_timeout_ms = 200;
    if (r->o.pool_size <= 0) r->o.pool_size = 4;
    if (r->o.breaker_failures <= 0) r->o.breaker_failures = 3;
    if (r->o.breaker_open_ms <= 0) r->o.breaker_open_ms = 1000;
    if (!o->url || parse_url(r, o->url, err, errlen) != KVC_OK) {
        if (!o->url) snprintf(err, errlen, "no Redis URL");
        free(r);
        return KVC_EINVAL;
    }
    r->slots = calloc((size_t)r->o.pool_size, sizeof *r->slots);
    if (!r->slots) { free(r); return KVC_ENOMEM; }
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
    *out = r;
    return KVC_OK;
}

void kvc_redis_close(kvc_redis *r) {
    if (!r) return;
    for (int i = 0; i < r->o.pool_size; i++)
        if (r->slots[i].c) redisFree(r->slots[i].c);
    free(r->slots);
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cv);
    free(r);
}

void kvc_redis_stats_get(kvc_redis *r, kvc_redis_stats *s) {
    pthread_mutex_lock(&r->mu);
    *s = r->st;
    s->breaker_open = now_s() < r->open_until;
    pthread_mutex_unlock(&r->mu);
}

static struct timeval tv_ms(int ms) {
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    return tv;
}

/* A connected context, authenticated and on the right database, or NULL. */
static redisContext *dial(kvc_redis *r) {
    struct timeval ct = tv_ms(r->o.connect_timeout_ms);
    redisContext *c = r->unix_sock ? redisConnectUnixWithTimeout(r->path, ct) : redisConnectWithTimeout(r->host, r->port, ct);
    if (!c || c->err) {
        char msg[256];
        snprintf(msg, sizeof msg, "cannot connect: %s", c ? c->errstr : "out of memory");
        note(r, msg);
        if (c) redisFree(c);
        return NULL;
    }
    redisSetTimeout(c, tv_ms(r->o.command_timeout_ms));
    redisReply *rep = NULL;
    const char *step = "AUTH";
    if (r->pass[0]) {
        rep = r->user[0] ? redisCommand(c, "AUTH %s %s", r->user, r->pass) : redisCommand(c, "AUTH %s", r->pass);
        if (!rep || rep->type == REDIS_REPLY_ERROR) goto fail;
        freeReplyObject(rep);
    }
    step = "SELECT";
    if (r->db) {
        rep = redisCommand(c, "SELECT %d", r->db);
        if (!rep || rep->type == REDIS_REPLY_ERROR) goto fail;
        freeReplyObject(rep);
    }
    return c;
fail:;
    char msg[256];
    snprintf(msg, sizeof msg, "%s failed: %s", step,
             rep && rep->type == REDIS_REPLY_ERROR ? rep->str : c->errstr[0] ? c->errstr : "no reply");
    note(r, msg);
    if (rep) freeReplyObject(rep);
    redisFree(c);
    return NULL;
}

/* Take a free slot, or -1 if the circuit is open. */
static int acquire(kvc_redis *r) {
    pthread_mutex_lock(&r->mu);
    double t = now_s();
    if (t < r->open_until || (r->open_until > 0 && r->probing)) {
        r->st.skipped++;
        pthread_mutex_unlock(&r->mu);
        return -1;
    }
    if (r->open_until > 0) r->probing = 1; /* half-open: this request probes */
    int i;
    for (;;) {
        for (i = 0; i < r->o.pool_size && r->slots[i].busy; i++) {}
        if (i < r->o.pool_size) break;
        pthread_cond_wait(&r->cv, &r->mu);
    }
    r->slots[i].busy = 1;
    pthread_mutex_unlock(&r->mu);
    return i;
}

/* Give slot i back. link_ok: Redis was reached and answered (error replies
 * included: they are the command's failure, not the link's). */
static void release(kvc_redis *r, int i, int link_ok, int reply_errors) {
    pthread_mutex_lock(&r->mu);
    r->slots[i].busy = 0;
    r->st.commands++;
    r->st.errors += (uint64_t)reply_errors;
    if (link_ok) {
        r->fails = 0;
        r->open_until = 0;
    } else {
        r->st.errors++;
        if (++r->fails >= r->o.breaker_failures) {
            if (now_s() >= r->open_until) r->st.breaker_opens++;
            r->open_until = now_s() + r->o.breaker_open_ms / 1000.0;
        }
    }
    r->probing = 0;
    pthread_cond_signal(&r->cv);
    pthread_mutex_unlock(&r->mu);
}

int kvc__pipeline(kvc_redis *r, size_t n, const kvc__cmd *cmds, redisReply **out) {
    for (size_t k = 0; k < n; k++) out[k] = NULL;
    if (!n) return 0;
    int i = acquire(r);
    if (i < 0) return -1;
    slot *s = &r->slots[i];
    if (!s->c) {
        s->c = dial(r);
        if (s->c) {
            pthread_mutex_lock(&r->mu);
            r->st.reconnects++;
            pthread_mutex_unlock(&r->mu);
        }
    }
    /* write every command, then read every reply: one round trip */
    int ok = s->c != NULL;
    for (size_t k = 0; ok && k < n; k++)
        ok = redisAppendCommandArgv(s->c, cmds[k].argc, cmds[k].argv, cmds[k].lens) == REDIS_OK;
    size_t got = 0;
    for (; ok && got < n; got++) {
        void *rep = NULL;
        ok = redisGetReply(s->c, &rep) == REDIS_OK && rep;
        out[got] = rep;
    }
    char msg[256] = "";
    if (!ok && s->c) { /* broken or timed out: the connection's state is unknown, reconnect next time */
        snprintf(msg, sizeof msg, "command failed: %s", s->c->errstr[0] ? s->c->errstr : "no reply");
        redisFree(s->c);
        s->c = NULL;
    }
    int errors = 0;
    for (size_t k = 0; k < n; k++) /* an error reply is this command's failure, not the link's */
        if (out[k] && out[k]->type == REDIS_REPLY_ERROR) {
            if (!msg[0]) snprintf(msg, sizeof msg, "%s", out[k]->str ? out[k]->str : "error reply");
            freeReplyObject(out[k]);
            out[k] = NULL;
            errors++;
        }
    if (!ok)
        for (size_t k = 0; k < n; k++)
            if (out[k]) { freeReplyObject(out[k]); out[k] = NULL; }
    release(r, i, ok, errors);
    if (msg[0]) note(r, msg);
    else if (ok) note(r, "ok");
    return ok && !errors ? 0 : -1;
}

redisReply *kvc__command_argv(kvc_redis *r, int argc, const char **argv, const size_t *lens) {
    kvc__cmd c = {argc, argv, lens};
    redisReply *rep;
    kvc__pipeline(r, 1, &c, &rep);
    return rep;
}

int kvc__command_ok(kvc_redis *r, int argc, const char **argv, const size_t *lens) {
    redisReply *rep = kvc__command_argv(r, argc, argv, lens);
    if (!rep) return -1;
    freeReplyObject(rep);
    return 0;
}
