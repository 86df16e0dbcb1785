/* metrics.c — Prometheus text metrics and the cache statistics JSON over
 * HTTP (libmicrohttpd), from counters the RPC layer keeps. */
#include "metrics.h"

#include <cjson/cJSON.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Histogram buckets, seconds. */
static const double BUCKETS[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};
#define NB ((int)(sizeof BUCKETS / sizeof *BUCKETS))

typedef struct {
    uint64_t counts[NB + 1];
    double sum;
    uint64_t n;
} histo;

typedef struct {
    char method[96];
    int code;
    uint64_t n;
    histo latency;
} req_row;

struct srv_metrics {
    pthread_mutex_t mu;
    req_row *rows;
    int n_rows, cap_rows;
    req_row *hrows;             /* the HTTP API: route, HTTP status */
    int n_hrows, cap_hrows;
    histo ttft, itl, step_tokens, batch_size, agent_restore;
    uint64_t batched_requests;
    uint64_t tokens_saved, generated_tokens, prompt_tokens;
    double price_per_1k;
    struct MHD_Daemon *httpd;
    srv_metrics_source src;
    void *src_ud;
};

static void observe(histo *h, double v) {
    int i = 0;
    while (i < NB && v > BUCKETS[i]) i++;
    h->counts[i]++;
    h->sum += v;
    h->n++;
}

srv_metrics *srv_metrics_new(double price_per_1k) {
    srv_metrics *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    pthread_mutex_init(&m->mu, NULL);
    m->price_per_1k = price_per_1k;
    return m;
}

/* Count one request in a table of (name, code) rows (m->mu held). */
static void count_row(req_row **rows, int *n, int *cap, const char *name, int code, double seconds) {
    req_row *r = NULL;
    for (int i = 0; i < *n && !r; i++)
        if ((*rows)[i].code == code && !strcmp((*rows)[i].method, name)) r = &(*rows)[i];
    if (!r && *n == *cap) {
        int nc = *cap ? *cap * 2 : 32;
        req_row *nr = realloc(*rows, (size_t)nc * sizeof *nr);
        if (nr) { *rows = nr; *cap = nc; }
    }
    if (!r && *n < *cap) {
        r = &(*rows)[(*n)++];
        memset(r, 0, sizeof *r);
        snprintf(r->method, sizeof r->method, "%s", name);
        r->code = code;
    }
    if (r) {
        r->n++;
        observe(&r->latency, seconds);
    }
}

void srv_metrics_request(srv_metrics *m, const char *method, int code, double seconds) {
    if (!m) return;
    pthread_mutex_lock(&m->mu);
    count_row(&m->rows, &m->n_rows, &m->cap_rows, method, code, seconds);
    pthread_mutex_unlock(&m->mu);
}

void srv_metrics_http(srv_metrics *m, const char *route, int status, double seconds) {
    if (!m) return;
    pthread_mutex_lock(&m->mu);
    count_row(&m->hrows, &m->n_hrows, &m->cap_hrows, route, status, seconds);
    pthread_mutex_unlock(&m->mu);
}

void srv_metrics_agent_restore(srv_metrics *m, double s) {
    if (!m) return;
    pthread_mutex_lock(&m->mu);
    observe(&m->agent_restore, s);
    pthread_mutex_unlock(&m->mu);
}

void srv_metrics_ttft(srv_metrics *m, double s) {
    if (!m) return;
    pthread_mutex_lock(&m->mu);
    observe(&m->ttft, s);
    pthread_mutex_unlock(&m->mu);
}

void srv_metrics_itl(srv_metrics *m, double s) {
    if (!m) return;
    pthread_mutex_lock(&m->mu);
    observe(&m->itl, s);
    pthread_mutex_unlock(&m->mu);
}

void srv_metrics_step(srv_metrics *m, int tokens) {
    if (!m) return;
    pthread_mutex_lock(&m->mu);
    /* tokens per step, in the same buckets scaled by 1000 (1 .. 10000 tokens) */
    observe(&m->step_tokens, tokens / 1000.0);
    pthread_mutex_unlock(&m->mu);
}

void srv_metrics_batch(srv_metrics *m, int requests) {
    if (!m) return;
    pthread_mutex_lock(&m->mu);
    observe(&m->batch_size, requests / 1000.0); /* scaled like step_tokens */
    m->batched_requests += (uint64_t)requests;
    pthread_mutex_unlock(&m->mu);
}

void srv_metrics_tokens(srv_metrics *m, int prompt, int generated, int saved) {
    if (!m) return;
    pthread_mutex_lock(&m->mu);
    m->prompt_tokens += (uint64_t)prompt;
    m->generated_tokens += (uint64_t)generated;
    m->tokens_saved += (uint64_t)saved;
    pthread_mutex_unlock(&m->mu);
}

/* ---- rendering ------------------------------------------------------------ */
typedef struct {
    char *p;
    size_t n, cap;
} sbuf;

static void sb(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb(sbuf *b, const char *fmt, ...) {
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int k = vsnprintf(b->p ? b->p + b->n : NULL, b->p ? b->cap - b->n : 0, fmt, ap);
        va_end(ap);
        if (k < 0) return;
        if (b->p && b->n + (size_t)k < b->cap) { b->n += (size_t)k; return; }
        size_t nc = (b->cap + (size_t)k + 1) * 2;
        char *np = realloc(b->p, nc);
        if (!np) return;
        b->p = np;
        b->cap = nc;
    }
}

static void histo_text(sbuf *b, const char *name, const char *labels, const histo *h, double scale) {
    uint64_t cum = 0;
    for (int i = 0; i < NB; i++) {
        cum += h->counts[i];
        sb(b, "%s_bucket{%s%sle=\"%g\"} %llu\n", name, labels, labels[0] ? "," : "", BUCKETS[i] * scale,
           (unsigned long long)cum);
    }
    cum += h->counts[NB];
    sb(b, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", name, labels, labels[0] ? "," : "", (unsigned long long)cum);
    sb(b, "%s_sum%s%s%s %g\n", name, labels[0] ? "{" : "", labels, labels[0] ? "}" : "", h->sum * scale);
    sb(b, "%s_count%s%s%s %llu\n", name, labels[0] ? "{" : "", labels, labels[0] ? "}" : "", (unsigned long long)h->n);
}

static const char *CODES[] = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
                              "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
                              "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
                              "UNAUTHENTICATED"};

static char *render_prometheus(srv_metrics *m) {
    srv_metrics_snapshot s;
    memset(&s, 0, sizeof s);
    if (m->src) m->src(m->src_ud, &s);
    sbuf b = {0};
    const char *layers[] = {"llm", "rag"};
    const srv_cache_layer *L[] = {&s.llm, &s.rag};
    sb(&b, "# HELP kvserve_cache_hits_total Cache lookups answered from the cache.\n# TYPE kvserve_cache_hits_total counter\n");
    for (int i = 0; i < 2; i++) sb(&b, "kvserve_cache_hits_total{layer=\"%s\"} %llu\n", layers[i], (unsigned long long)L[i]->hits);
    sb(&b, "# HELP kvserve_cache_misses_total Cache lookups not answered.\n# TYPE kvserve_cache_misses_total counter\n");
    for (int i = 0; i < 2; i++) sb(&b, "kvserve_cache_misses_total{layer=\"%s\"} %llu\n", layers[i], (unsigned long long)L[i]->misses);
    sb(&b, "# HELP kvserve_cache_writes_total Entries written.\n# TYPE kvserve_cache_writes_total counter\n");
    for (int i = 0; i < 2; i++) sb(&b, "kvserve_cache_writes_total{layer=\"%s\"} %llu\n", layers[i], (unsigned long long)L[i]->writes);
    sb(&b, "# HELP kvserve_cache_invalidations_total Namespaces invalidated.\n# TYPE kvserve_cache_invalidations_total counter\n");
    sb(&b, "kvserve_cache_invalidations_total{layer=\"llm\"} %llu\n", (unsigned long long)s.llm.invalidations);
    sb(&b, "# HELP kvserve_cache_errors_total Cache operations that failed (Redis down or slow: fail-open).\n"
           "# TYPE kvserve_cache_errors_total counter\n");
    for (int i = 0; i < 2; i++) sb(&b, "kvserve_cache_errors_total{layer=\"%s\"} %llu\n", layers[i], (unsigned long long)L[i]->errors);
    sb(&b, "# HELP kvserve_cache_singleflight_joined_total Requests answered by an identical one in flight.\n"
           "# TYPE kvserve_cache_singleflight_joined_total counter\nkvserve_cache_singleflight_joined_total %llu\n",
       (unsigned long long)s.singleflight_joined);
    sb(&b, "# HELP kvserve_cache_purged_keys_total Superseded prompt-cache keys deleted after invalidations.\n"
           "# TYPE kvserve_cache_purged_keys_total counter\nkvserve_cache_purged_keys_total %llu\n",
       (unsigned long long)s.purged_keys);
    pthread_mutex_lock(&m->mu);
    sb(&b, "# HELP kvserve_cache_tokens_saved_total Prompt and generated tokens not computed thanks to the prompt cache.\n"
           "# TYPE kvserve_cache_tokens_saved_total counter\nkvserve_cache_tokens_saved_total %llu\n",
       (unsigned long long)m->tokens_saved);
    sb(&b, "# HELP kvserve_cache_cost_saved_total Tokens saved times the configured price per 1k tokens.\n"
           "# TYPE kvserve_cache_cost_saved_total counter\nkvserve_cache_cost_saved_total %g\n",
       (double)m->tokens_saved / 1000.0 * m->price_per_1k);
    sb(&b, "# HELP kvserve_tokens_total Tokens processed by the engine.\n# TYPE kvserve_tokens_total counter\n"
           "kvserve_tokens_total{kind=\"prompt\"} %llu\nkvserve_tokens_total{kind=\"generated\"} %llu\n",
       (unsigned long long)m->prompt_tokens, (unsigned long long)m->generated_tokens);
    sb(&b, "# HELP kvserve_requests_total RPCs by method and status code.\n# TYPE kvserve_requests_total counter\n");
    for (int i = 0; i < m->n_rows; i++)
        sb(&b, "kvserve_requests_total{method=\"%s\",code=\"%s\"} %llu\n", m->rows[i].method,
           m->rows[i].code >= 0 && m->rows[i].code <= 16 ? CODES[m->rows[i].code] : "UNKNOWN",
           (unsigned long long)m->rows[i].n);
    sb(&b, "# HELP kvserve_request_duration_seconds RPC latency by method.\n# TYPE kvserve_request_duration_seconds histogram\n");
    for (int i = 0; i < m->n_rows; i++) {
        char lab[160];
        snprintf(lab, sizeof lab, "method=\"%s\",code=\"%s\"", m->rows[i].method,
                 m->rows[i].code >= 0 && m->rows[i].code <= 16 ? CODES[m->rows[i].code] : "UNKNOWN");
        histo_text(&b, "kvserve_request_duration_seconds", lab, &m->rows[i].latency, 1);
    }
    if (m->n_hrows) {
        sb(&b, "# HELP kvserve_http_requests_total HTTP API requests by route and status.\n"
               "# TYPE kvserve_http_requests_total counter\n");
        for (int i = 0; i < m->n_hrows; i++)
            sb(&b, "kvserve_http_requests_total{route=\"%s\",code=\"%d\"} %llu\n", m->hrows[i].method, m->hrows[i].code,
               (unsigned long long)m->hrows[i].n);
        sb(&b, "# HELP kvserve_http_request_duration_seconds HTTP API latency (streams: until their end).\n"
               "# TYPE kvserve_http_request_duration_seconds histogram\n");
        for (int i = 0; i < m->n_hrows; i++) {
            char lab[160];
            snprintf(lab, sizeof lab, "route=\"%s\",code=\"%d\"", m->hrows[i].method, m->hrows[i].code);
            histo_text(&b, "kvserve_http_request_duration_seconds", lab, &m->hrows[i].latency, 1);
        }
    }
    sb(&b, "# HELP kvserve_time_to_first_token_seconds From a Stream call's arrival to its first token.\n"
           "# TYPE kvserve_time_to_first_token_seconds histogram\n");
    histo_text(&b, "kvserve_time_to_first_token_seconds", "", &m->ttft, 1);
    sb(&b, "# HELP kvserve_inter_token_latency_seconds Between consecutive tokens of a stream.\n"
           "# TYPE kvserve_inter_token_latency_seconds histogram\n");
    histo_text(&b, "kvserve_inter_token_latency_seconds", "", &m->itl, 1);
    sb(&b, "# HELP kvserve_engine_step_tokens Tokens computed per engine step (batch size).\n"
           "# TYPE kvserve_engine_step_tokens histogram\n");
    histo_text(&b, "kvserve_engine_step_tokens", "", &m->step_tokens, 1000);
    sb(&b, "# HELP kvserve_batch_size Requests per window the batcher dispatched.\n"
           "# TYPE kvserve_batch_size histogram\n");
    histo_text(&b, "kvserve_batch_size", "", &m->batch_size, 1000);
    if (s.agent_store_enabled) {
        sb(&b, "# HELP kvserve_agent_restore_seconds Bringing an agent back from Redis: fetch, check, load into the pool.\n"
               "# TYPE kvserve_agent_restore_seconds histogram\n");
        histo_text(&b, "kvserve_agent_restore_seconds", "", &m->agent_restore, 1);
    }
    sb(&b, "# HELP kvserve_batched_requests_total Requests the batcher dispatched.\n"
           "# TYPE kvserve_batched_requests_total counter\nkvserve_batched_requests_total %llu\n",
       (unsigned long long)m->batched_requests);
    pthread_mutex_unlock(&m->mu);
    sb(&b, "# HELP kvserve_batcher_dropped_total Requests dropped before dispatch, by reason.\n"
           "# TYPE kvserve_batcher_dropped_total counter\n"
           "kvserve_batcher_dropped_total{reason=\"rejected\"} %llu\nkvserve_batcher_dropped_total{reason=\"expired\"} %llu\n"
           "kvserve_batcher_dropped_total{reason=\"cancelled\"} %llu\nkvserve_batcher_dropped_total{reason=\"shutdown\"} %llu\n"
           "# HELP kvserve_batcher_queued Requests waiting in the batcher.\n# TYPE kvserve_batcher_queued gauge\n"
           "kvserve_batcher_queued %d\n",
       (unsigned long long)s.batch_rejected, (unsigned long long)s.batch_expired,
       (unsigned long long)s.batch_cancelled, (unsigned long long)s.batch_closed, s.batch_queued);
    sb(&b, "# HELP kvserve_steps_parked Step calls waiting for events.\n# TYPE kvserve_steps_parked gauge\n"
           "kvserve_steps_parked %d\n"
           "# HELP kvserve_requests_known Requests known by id: running, or finished with a result not yet collected.\n"
           "# TYPE kvserve_requests_known gauge\nkvserve_requests_known %d\n",
       s.steps_parked, s.requests_known);
    if (s.agent_store_enabled)
        sb(&b, "# HELP kvserve_agent_store_total Agents' warm tier in Redis, by operation.\n"
               "# TYPE kvserve_agent_store_total counter\n"
               "kvserve_agent_store_total{op=\"save\"} %llu\nkvserve_agent_store_total{op=\"restore\"} %llu\n"
               "kvserve_agent_store_total{op=\"miss\"} %llu\nkvserve_agent_store_total{op=\"error\"} %llu\n"
               "kvserve_agent_store_total{op=\"spill_dropped\"} %llu\n"
               "# HELP kvserve_agent_store_bytes_total Bytes of agents written to and read from Redis.\n"
               "# TYPE kvserve_agent_store_bytes_total counter\n"
               "kvserve_agent_store_bytes_total{dir=\"saved\"} %llu\nkvserve_agent_store_bytes_total{dir=\"restored\"} %llu\n",
           (unsigned long long)s.agent_saves, (unsigned long long)s.agent_restores, (unsigned long long)s.agent_misses,
           (unsigned long long)s.agent_errors, (unsigned long long)s.agent_spills_dropped,
           (unsigned long long)s.agent_bytes_saved, (unsigned long long)s.agent_bytes_restored);
    sb(&b, "# HELP kvserve_kv_blocks KV pool blocks by state.\n# TYPE kvserve_kv_blocks gauge\n"
           "kvserve_kv_blocks{state=\"used\"} %d\nkvserve_kv_blocks{state=\"free\"} %d\n"
           "kvserve_kv_blocks{state=\"cached\"} %d\nkvserve_kv_blocks{state=\"shared\"} %d\n",
       s.blocks_used, s.blocks_free, s.blocks_cached, s.blocks_shared);
    sb(&b, "# HELP kvserve_requests_running Sequences running in the engine.\n# TYPE kvserve_requests_running gauge\n"
           "kvserve_requests_running %d\n# HELP kvserve_requests_queued Requests waiting for the engine.\n"
           "# TYPE kvserve_requests_queued gauge\nkvserve_requests_queued %d\n",
       s.running, s.waiting);
    return b.p;
}

static cJSON *layer_json(const srv_cache_layer *l) {
    cJSON *o = cJSON_CreateObject();
    double total = (double)(l->hits + l->misses);
    cJSON_AddNumberToObject(o, "hits", (double)l->hits);
    cJSON_AddNumberToObject(o, "misses", (double)l->misses);
    cJSON_AddNumberToObject(o, "writes", (double)l->writes);
    cJSON_AddNumberToObject(o, "errors", (double)l->errors);
    cJSON_AddNumberToObject(o, "hit_rate", total > 0 ? (double)l->hits / total : 0);
    return o;
}

static char *render_statistics(srv_metrics *m) {
    srv_metrics_snapshot s;
    memset(&s, 0, sizeof s);
    if (m->src) m->src(m->src_ud, &s);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddBoolToObject(o, "enabled", s.cache_enabled);
    cJSON_AddItemToObject(o, "llm", layer_json(&s.llm));
    cJSON_AddItemToObject(o, "rag", layer_json(&s.rag));
    srv_cache_layer all = {s.llm.hits + s.rag.hits, s.llm.misses + s.rag.misses, s.llm.writes + s.rag.writes,
                           s.llm.invalidations, s.llm.errors + s.rag.errors};
    cJSON_AddItemToObject(o, "combined", layer_json(&all));
    pthread_mutex_lock(&m->mu);
    cJSON_AddNumberToObject(o, "tokens_saved", (double)m->tokens_saved);
    cJSON_AddNumberToObject(o, "cost_saved", (double)m->tokens_saved / 1000.0 * m->price_per_1k);
    pthread_mutex_unlock(&m->mu);
    char *txt = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return txt;
}

static enum MHD_Result on_http(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                               const char *version, const char *upload_data, size_t *upload_size, void **con_cls) {
    (void)version; (void)upload_data; (void)upload_size; (void)con_cls;
    srv_metrics *m = cls;
    char *body = NULL;
    const char *type = "text/plain; charset=utf-8";
    unsigned status = MHD_HTTP_OK;
    if (strcmp(method, "GET")) {
        status = MHD_HTTP_METHOD_NOT_ALLOWED;
        body = strdup("GET only\n");
    } else if (!strcmp(url, "/metrics")) {
        body = render_prometheus(m);
        type = "text/plain; version=0.0.4; charset=utf-8";
    } else if (!strcmp(url, "/metrics/cache/statistics")) {
        body = render_statistics(m);
        type = "application/json";
    } else if (!strcmp(url, "/healthz")) {
        srv_metrics_snapshot h;
        memset(&h, 0, sizeof h);
        if (m->src) m->src(m->src_ud, &h);
        status = h.serving ? MHD_HTTP_OK : MHD_HTTP_SERVICE_UNAVAILABLE;
        body = strdup(h.serving ? "SERVING\n" : "NOT_SERVING\n");
    } else {
        status = MHD_HTTP_NOT_FOUND;
        body = strdup("not found: try /metrics, /metrics/cache/statistics or /healthz\n");
    }
    if (!body) return MHD_NO;
    struct MHD_Response *r = MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
    MHD_add_response_header(r, "Content-Type", type);
    enum MHD_Result ret = MHD_queue_response(conn, status, r);
    MHD_destroy_response(r);
    return ret;
}

int srv_parse_hostport(const char *hostport, struct sockaddr_in *sa) {
    char host[64];
    int port;
    const char *colon = strrchr(hostport, ':');
    if (!colon || (size_t)(colon - hostport) >= sizeof host || (port = atoi(colon + 1)) <= 0 || port > 65535) return -1;
    snprintf(host, sizeof host, "%.*s", (int)(colon - hostport), hostport);
    memset(sa, 0, sizeof *sa);
    sa->sin_family = AF_INET;
    sa->sin_port = htons((uint16_t)port);
    return inet_pton(AF_INET, host, &sa->sin_addr) == 1 ? 0 : -1;
}

int srv_metrics_listen(srv_metrics *m, const char *hostport, srv_metrics_source src, void *ud) {
    m->src = src;
    m->src_ud = ud;
    struct sockaddr_in sa;
    if (srv_parse_hostport(hostport, &sa)) return -1;
    int port = ntohs(sa.sin_port);
    /* The port needs no token, so it must not be a way to starve the server:
     * idle or slow connections are closed after METRICS_TIMEOUT_S, at most
     * METRICS_MAX_CONN are open (METRICS_MAX_PER_IP from one address), and
     * epoll/poll rather than select, which fails past descriptor 1023. */
    m->httpd = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_AUTO, (uint16_t)port, NULL, NULL, on_http,
                                m, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&sa,
                                MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int)METRICS_TIMEOUT_S,
                                MHD_OPTION_CONNECTION_LIMIT, (unsigned int)METRICS_MAX_CONN,
                                MHD_OPTION_PER_IP_CONNECTION_LIMIT, (unsigned int)METRICS_MAX_PER_IP, MHD_OPTION_END);
    return m->httpd ? 0 : -1;
}

void srv_metrics_free(srv_metrics *m) {
    if (!m) return;
    if (m->httpd) MHD_stop_daemon(m->httpd);
    free(m->rows);
    free(m->hrows);
    pthread_mutex_destroy(&m->mu);
    free(m);
}
