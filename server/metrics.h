/* metrics.h — counters and histograms of the RPC layer, served as
 * Prometheus text (/metrics) and cache statistics JSON
 * (/metrics/cache/statistics) over HTTP. Internal to server/. */
#ifndef KVSERVE_METRICS_H
#define KVSERVE_METRICS_H

#include <netinet/in.h>
#include <stdint.h>

typedef struct srv_metrics srv_metrics;

typedef struct {
    uint64_t hits, misses, writes, invalidations, errors;
} srv_cache_layer;

/* Figures read at scrape time from their owners (engine, caches). */
typedef struct {
    int cache_enabled;
    srv_cache_layer llm, rag;
    int blocks_used, blocks_free, blocks_cached, blocks_shared, running, waiting;
    uint64_t singleflight_joined;  /* requests that waited for an identical one instead of running */
    uint64_t purged_keys;          /* superseded prompt-cache keys deleted */
    /* the request batcher */
    uint64_t batch_rejected, batch_expired, batch_cancelled, batch_closed;
    int batch_queued;
    int steps_parked;              /* Step calls waiting for events */
    int requests_known;           /* requests known by id: running, or finished and not yet collected */
    int serving;                   /* health: ready and not draining (/healthz) */
    /* agents' warm tier (Redis) */
    int agent_store_enabled;
    uint64_t agent_saves, agent_restores, agent_misses, agent_errors, agent_spills_dropped;
    uint64_t agent_bytes_saved, agent_bytes_restored;
} srv_metrics_snapshot;
typedef void (*srv_metrics_source)(void *ud, srv_metrics_snapshot *s);

srv_metrics *srv_metrics_new(double price_per_1k);
/* Limits of the HTTP port (docs/operations.md). */
#define METRICS_TIMEOUT_S 10   /* an idle or stalled connection is closed after this */
#define METRICS_MAX_CONN 64    /* connections open at once */
#define METRICS_MAX_PER_IP 8   /* ... from one client address */
/* Serve HTTP on HOST:PORT (IPv4 literal): /metrics, /metrics/cache/statistics
 * and /healthz (200 while SERVING, else 503: for load balancers and probes
 * that speak HTTP/1.1). 0 or -1. */
int srv_metrics_listen(srv_metrics *m, const char *hostport, srv_metrics_source src, void *ud);
void srv_metrics_free(srv_metrics *m);
/* "A.B.C.D:PORT" into sa: 0 or -1. */
int srv_parse_hostport(const char *hostport, struct sockaddr_in *sa);

/* All safe from any thread; NULL m is a no-op. */
void srv_metrics_request(srv_metrics *m, const char *method, int code, double seconds);
void srv_metrics_ttft(srv_metrics *m, double seconds);
void srv_metrics_agent_restore(srv_metrics *m, double seconds); /* an agent brought back from Redis */
void srv_metrics_itl(srv_metrics *m, double seconds);
void srv_metrics_step(srv_metrics *m, int tokens);
void srv_metrics_batch(srv_metrics *m, int requests);   /* one window dispatched by the batcher */
void srv_metrics_tokens(srv_metrics *m, int prompt, int generated, int saved);
/* An HTTP API request (http.c): route, HTTP status, seconds. */
void srv_metrics_http(srv_metrics *m, const char *route, int status, double seconds);

#endif
