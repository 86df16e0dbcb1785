/* http.c — the OpenAI-compatible HTTP API (--http HOST:PORT) on
 * libmicrohttpd, one thread per connection:
 *   GET  /v1/models, /v1/models/NAME
 *   POST /v1/completions
 *   POST /v1/chat/completions     (stream: false -> one JSON body;
 *                                  stream: true  -> server-sent events)
 * A request becomes a kvserve.v1 Stream call on the loopback channel
 * (loopback.c) with the client's Authorization header, so it takes the gRPC
 * path exactly; statuses map to OpenAI's errors (openai.c). A client that
 * goes away mid-request cancels its call, and the engine frees its blocks. */
#define _GNU_SOURCE /* POLLRDHUP */
#include "internal.h"

#include "openai.h"

#include <microhttpd.h>
#include <poll.h>

#define HTTP_MAX_CONN 512        /* connections open at once */
#define HTTP_TIMEOUT_S 300       /* an idle connection is closed after this (streams send keep-alives) */
#define KEEPALIVE_S 15.0         /* an SSE comment when a stream has had nothing to send this long */
#define POLL_MS 100              /* how often a waiting request checks that its client is still there */

enum { R_NONE, R_MODELS, R_COMPLETIONS, R_CHAT, R_MODEL };
static const char *const ROUTE_NAMES[] = {"other", "/v1/models", "/v1/completions", "/v1/chat/completions",
                                          "/v1/models/{model}"};

typedef struct hreq {
    srv *s;
    struct MHD_Connection *conn;
    int route, refs;             /* refs: the connection's, and a stream response's */
    char *body;
    size_t len, cap;
    int too_big, answered;
    char auth[1024];
    double t0;
    int status;                  /* for the metrics */
    oai_req req;
    oai_resp resp;
    int parsed, resp_init;
    loop_call call;
    int call_open;
    char *out;                   /* a stream's bytes not yet handed to MHD */
    size_t out_len, out_off;
    int done;                    /* the last bytes are in out */
    double last_out;
} hreq;

static void hreq_unref(hreq *h) {
    if (--h->refs > 0) return;
    if (h->call_open) {
        srv__loop_cancel(&h->call);
        srv__loop_finish(&h->call, NULL, 0);
    }
    if (h->resp_init) srv__oai_resp_free(&h->resp);
    if (h->parsed) srv__oai_req_free(&h->req);
    srv_metrics_http(h->s->metrics, ROUTE_NAMES[h->route], h->status, srv__now_s() - h->t0);
    free(h->out);
    free(h->body);
    free(h);
}

static enum MHD_Result reply(hreq *h, int status, const char *type, char *body) {
    if (!body) {
        status = 500;
        body = strdup("{\"error\":{\"message\":\"out of memory\",\"type\":\"server_error\",\"param\":null,\"code\":null}}");
        if (!body) return MHD_NO;
    }
    h->status = status;
    h->answered = 1;
    struct MHD_Response *r = MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
    if (!r) { free(body); return MHD_NO; }
    MHD_add_response_header(r, "Content-Type", type);
    enum MHD_Result rc = MHD_queue_response(h->conn, (unsigned)status, r);
    MHD_destroy_response(r);
    return rc;
}

static enum MHD_Result reply_error(hreq *h, const oai_error *e) {
    return reply(h, e->status, "application/json", srv__oai_error_json(e));
}

static enum MHD_Result reply_status(hreq *h, int code, const char *msg) {
    oai_error e;
    srv__oai_error_of_status(code, msg, &e);
    return reply_error(h, &e);
}

/* The client closed its end (or the connection broke). */
static int client_gone(hreq *h) {
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(h->conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (!ci) return 0;
    struct pollfd p = {.fd = ci->connect_fd, .events = POLLRDHUP};
    return poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR));
}

enum { EV_MSG = 1, EV_END = 0, EV_GONE = -1, EV_IDLE = -2 };

/* The call's next StreamEvent, checking every POLL_MS that the client is
 * there; EV_IDLE after `idle_s` without one (streams: a keep-alive). */
static int next_event(hreq *h, Kvserve__V1__StreamEvent **ev, double idle_s) {
    double until = srv__now_s() + idle_s;
    for (;;) {
        ProtobufCMessage *m;
        int rc = srv__loop_next(&h->call, &kvserve__v1__stream_event__descriptor, &m, POLL_MS);
        if (rc == 1) { *ev = (Kvserve__V1__StreamEvent *)m; return EV_MSG; }
        if (rc == 0) return EV_END;
        if (client_gone(h)) return EV_GONE;
        if (idle_s > 0 && srv__now_s() >= until) return EV_IDLE;
    }
}

/* The call ended without a completion: its status as an error. */
static void call_error(hreq *h, oai_error *e) {
    char msg[512];
    int st = srv__loop_finish(&h->call, msg, sizeof msg);
    h->call_open = 0;
    srv__oai_error_of_status(st == GRPC_STATUS_OK ? GRPC_STATUS_INTERNAL : st, st == GRPC_STATUS_OK ? "the stream ended without a completion" : msg, e);
}

/* A completion that failed in the engine (e.g. an agent's history past the context). */
static int completion_failed(const Kvserve__V1__Completion *c, oai_error *e) {
    if (c->finish_reason != KVSERVE__V1__FINISH_REASON__ERROR && c->finish_reason != KVSERVE__V1__FINISH_REASON__CANCELLED)
        return 0;
    srv__oai_error_of_status(c->finish_reason == KVSERVE__V1__FINISH_REASON__ERROR ? GRPC_STATUS_INVALID_ARGUMENT
                                                                                  : GRPC_STATUS_CANCELLED,
                             c->error && c->error[0] ? c->error : "cancelled", e);
    return 1;
}

/* ---- streams: the response's content reader ------------------------------------------ */
static void set_out(hreq *h, char *bytes) {
    free(h->out);
    h->out = bytes;
    h->out_len = bytes ? strlen(bytes) : 0;
    h->out_off = 0;
}

/* Turn one event into bytes for the client (stream). */
static void stream_event(hreq *h, Kvserve__V1__StreamEvent *ev) {
    if (ev->event_case == KVSERVE__V1__STREAM_EVENT__EVENT_TOKEN) {
        set_out(h, srv__oai_token(&h->resp, ev->token));
    } else if (ev->event_case == KVSERVE__V1__STREAM_EVENT__EVENT_COMPLETION) {
        oai_error e;
        set_out(h, completion_failed(ev->completion, &e) ? srv__oai_stream_error(&e) : srv__oai_finish(&h->resp, ev->completion));
        h->done = 1;
    }
}

static ssize_t stream_reader(void *cls, uint64_t pos, char *buf, size_t max) {
    (void)pos;
    hreq *h = cls;
    for (;;) {
        if (h->out_off < h->out_len) {
            size_t n = h->out_len - h->out_off < max ? h->out_len - h->out_off : max;
            memcpy(buf, h->out + h->out_off, n);
            h->out_off += n;
            h->last_out = srv__now_s();
            return (ssize_t)n;
        }
        if (h->done) return MHD_CONTENT_READER_END_OF_STREAM;
        Kvserve__V1__StreamEvent *ev = NULL;
        double idle = KEEPALIVE_S - (srv__now_s() - h->last_out);
        int rc = next_event(h, &ev, idle > 0.01 ? idle : 0.01); /* (0 would mean: no keep-alives) */
        if (rc == EV_GONE) {
            h->status = 499; /* (nginx's "client closed request") */
            srv__loop_cancel(&h->call);
            return MHD_CONTENT_READER_END_WITH_ERROR;
        }
        if (rc == EV_IDLE) {
            set_out(h, strdup(": keep-alive\n\n"));
            continue;
        }
        if (rc == EV_END) {
            oai_error e;
            call_error(h, &e);
            set_out(h, srv__oai_stream_error(&e));
            h->done = 1;
            continue;
        }
        stream_event(h, ev);
        protobuf_c_message_free_unpacked(&ev->base, NULL);
    }
}

static void stream_free(void *cls) { hreq_unref(cls); }

/* ---- routes -------------------------------------------------------------------------- */
/* GET /v1/models and GET /v1/models/NAME. */
static enum MHD_Result models(hreq *h, const char *one) {
    Kvserve__V1__StatsRequest q = KVSERVE__V1__STATS_REQUEST__INIT; /* the token and the server's state, checked */
    if (srv__loop_start(h->s, &h->call, "/kvserve.v1.Generation/Stats", &q.base, h->auth)) {
        srv__loop_finish(&h->call, NULL, 0);
        return reply_status(h, GRPC_STATUS_UNAVAILABLE, "the server is not serving");
    }
    ProtobufCMessage *m = NULL;
    srv__loop_next(&h->call, &kvserve__v1__stats_reply__descriptor, &m, -1);
    if (m) protobuf_c_message_free_unpacked(m, NULL);
    char msg[512];
    int st = srv__loop_finish(&h->call, msg, sizeof msg);
    if (st != GRPC_STATUS_OK) return reply_status(h, st, msg);
    if (one && strcmp(one, h->s->model_name)) {
        oai_error e = {.status = 404, .type = "invalid_request_error"};
        snprintf(e.param, sizeof e.param, "model");
        snprintf(e.code, sizeof e.code, "model_not_found");
        snprintf(e.message, sizeof e.message, "The model `%.200s` does not exist; this server serves `%.200s`", one,
                 h->s->model_name);
        return reply_error(h, &e);
    }
    cJSON *o = cJSON_CreateObject(), *d = cJSON_AddArrayToObject(o, "data"), *x = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "object", "list");
    cJSON_AddStringToObject(x, "id", h->s->model_name);
    cJSON_AddStringToObject(x, "object", "model");
    cJSON_AddNumberToObject(x, "created", (double)h->s->started_at);
    cJSON_AddStringToObject(x, "owned_by", "kvserve");
    cJSON_AddNumberToObject(x, "max_model_len", eng_model_config(h->s->model)->max_position);
    char *s;
    if (one) {
        s = cJSON_PrintUnformatted(x);
        cJSON_Delete(x);
    } else {
        cJSON_AddItemToArray(d, x);
        s = cJSON_PrintUnformatted(o);
    }
    cJSON_Delete(o);
    return reply(h, 200, "application/json", s);
}

static enum MHD_Result generate(hreq *h) {
    oai_error e;
    h->parsed = 1;
    if (srv__oai_parse(h->route == R_CHAT ? OAI_CHAT : OAI_COMPLETIONS, h->body ? h->body : "", h->len,
                       h->s->model_name, &h->req, &e))
        return reply_error(h, &e);
    static _Atomic unsigned long long next_id = 1;
    unsigned long long rid = next_id++ ^ ((unsigned long long)getpid() << 40);
    srv__oai_resp_init(&h->resp, &h->req, rid, (long)time(NULL));
    h->resp_init = 1;
    if (srv__loop_start(h->s, &h->call, "/kvserve.v1.Generation/Stream", &h->req.g.base, h->auth)) {
        srv__loop_finish(&h->call, NULL, 0);
        return reply_status(h, GRPC_STATUS_UNAVAILABLE, "the server is not serving");
    }
    h->call_open = 1;
    /* the first event, or the status that refuses the request: an HTTP error while one can still be sent */
    Kvserve__V1__StreamEvent *ev = NULL;
    int rc = next_event(h, &ev, 0);
    if (rc == EV_GONE) {
        h->status = 499;
        return MHD_NO;
    }
    if (rc == EV_END) {
        call_error(h, &e);
        return reply_error(h, &e);
    }
    if (!h->req.stream) { /* gather it all, then one body */
        for (;;) {
            if (ev->event_case == KVSERVE__V1__STREAM_EVENT__EVENT_TOKEN) {
                srv__oai_token(&h->resp, ev->token);
            } else if (ev->event_case == KVSERVE__V1__STREAM_EVENT__EVENT_COMPLETION) {
                enum MHD_Result r = completion_failed(ev->completion, &e)
                                        ? reply_error(h, &e)
                                        : reply(h, 200, "application/json", srv__oai_finish(&h->resp, ev->completion));
                protobuf_c_message_free_unpacked(&ev->base, NULL);
                return r;
            }
            protobuf_c_message_free_unpacked(&ev->base, NULL);
            ev = NULL;
            rc = next_event(h, &ev, 0);
            if (rc == EV_GONE) {
                h->status = 499;
                srv__loop_cancel(&h->call);
                return MHD_NO;
            }
            if (rc == EV_END) {
                call_error(h, &e);
                return reply_error(h, &e);
            }
        }
    }
    /* a stream: the role chunk and the first event now, the rest as the reader asks */
    char *first = h->req.kind == OAI_CHAT ? srv__oai_chat_start(&h->resp) : NULL;
    stream_event(h, ev);
    protobuf_c_message_free_unpacked(&ev->base, NULL);
    if (first) {
        size_t n = strlen(first) + h->out_len + 1;
        char *both = malloc(n);
        if (both) snprintf(both, n, "%s%s", first, h->out ? h->out : "");
        free(first);
        set_out(h, both);
    }
    h->last_out = srv__now_s();
    struct MHD_Response *r = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16 * 1024, stream_reader, h, stream_free);
    if (!r) return MHD_NO;
    h->refs++;
    h->status = 200;
    h->answered = 1;
    MHD_add_response_header(r, "Content-Type", "text/event-stream");
    MHD_add_response_header(r, "Cache-Control", "no-cache");
    MHD_add_response_header(r, "X-Accel-Buffering", "no");
    enum MHD_Result ret = MHD_queue_response(h->conn, 200, r);
    MHD_destroy_response(r);
    return ret;
}

static int route_of(const char *url, const char *method, int *allowed) {
    struct { const char *path, *method; int r; } t[] = {
        {"/v1/models", "GET", R_MODELS}, {"/v1/completions", "POST", R_COMPLETIONS},
        {"/v1/chat/completions", "POST", R_CHAT}};
    for (size_t i = 0; i < sizeof t / sizeof *t; i++)
        if (!strcmp(url, t[i].path)) {
            *allowed = !strcmp(method, t[i].method);
            return t[i].r;
        }
    *allowed = !strcmp(method, "GET");
    return !strncmp(url, "/v1/models/", 11) && url[11] ? R_MODEL : R_NONE;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                                  const char *version, const char *upload, size_t *upload_size, void **con_cls) {
    (void)version;
    srv *s = cls;
    hreq *h = *con_cls;
    if (!h) {
        if (!(h = calloc(1, sizeof *h))) return MHD_NO;
        h->s = s;
        h->conn = conn;
        h->refs = 1;
        h->t0 = srv__now_s();
        h->status = 500;
        const char *a = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Authorization");
        if (a) snprintf(h->auth, sizeof h->auth, "%s", a);
        *con_cls = h;
        return MHD_YES;
    }
    if (*upload_size) {
        size_t n = *upload_size;
        *upload_size = 0;
        if (h->too_big) return MHD_YES;
        size_t limit = (size_t)s->cfg.max_message_bytes;
        if (h->len + n > limit) { /* the rest is read and dropped: the client gets its 413 once it has sent it */
            h->too_big = 1;
            return MHD_YES;
        }
        if (h->len + n + 1 > h->cap) {
            size_t nc = (h->len + n + 1) * 2;
            char *nb = realloc(h->body, nc);
            if (!nb) return MHD_NO;
            h->body = nb;
            h->cap = nc;
        }
        memcpy(h->body + h->len, upload, n);
        h->len += n;
        h->body[h->len] = 0;
        return MHD_YES;
    }
    if (h->answered) return MHD_YES;
    if (h->too_big) {
        oai_error e = {.status = 413, .type = "invalid_request_error"};
        snprintf(e.message, sizeof e.message, "the body is larger than %d bytes (--max-message-bytes)", s->cfg.max_message_bytes);
        return reply_error(h, &e);
    }
    int allowed;
    h->route = route_of(url, method, &allowed);
    if (h->route == R_NONE) {
        oai_error e = {.status = 404, .type = "invalid_request_error"};
        snprintf(e.code, sizeof e.code, "unknown_url");
        snprintf(e.message, sizeof e.message, "no route %.200s %.200s (this server has GET /v1/models, "
                 "POST /v1/completions, POST /v1/chat/completions)", method, url);
        return reply_error(h, &e);
    }
    if (!allowed) {
        oai_error e = {.status = 405, .type = "invalid_request_error"};
        snprintf(e.message, sizeof e.message, "%.200s takes %s", url, h->route == R_MODELS || h->route == R_MODEL ? "GET" : "POST");
        return reply_error(h, &e);
    }
    return h->route == R_MODELS ? models(h, NULL) : h->route == R_MODEL ? models(h, url + 11) : generate(h);
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls, enum MHD_RequestTerminationCode toe) {
    (void)cls;
    (void)conn;
    hreq *h = *con_cls;
    if (!h) return;
    if (toe != MHD_REQUEST_TERMINATED_COMPLETED_OK && h->status == 200) h->status = 499;
    *con_cls = NULL;
    hreq_unref(h);
}

int srv__http_start(srv *s, char *err, size_t errlen) {
    struct sockaddr_in sa;
    if (srv_parse_hostport(s->cfg.http_listen, &sa)) {
        snprintf(err, errlen, "--http %s: an IPv4 HOST:PORT", s->cfg.http_listen);
        return -1;
    }
    s->httpd = MHD_start_daemon(MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_AUTO,
                                ntohs(sa.sin_port), NULL, NULL, on_request, s, MHD_OPTION_SOCK_ADDR,
                                (struct sockaddr *)&sa, MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)HTTP_TIMEOUT_S,
                                MHD_OPTION_CONNECTION_LIMIT, (unsigned)HTTP_MAX_CONN, MHD_OPTION_NOTIFY_COMPLETED,
                                on_completed, s, MHD_OPTION_END);
    if (!s->httpd) {
        snprintf(err, errlen, "--http %s: cannot listen (address in use?)", s->cfg.http_listen);
        return -1;
    }
    return 0;
}

void srv__http_stop(srv *s) {
    if (s->httpd) MHD_stop_daemon(s->httpd);
    s->httpd = NULL;
}
