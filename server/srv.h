/* srv.h — kvserve's RPC layer on the gRPC C core (every grpc_* call of the
 * project lives in server/). One public entry: run a server until SIGTERM. */
#ifndef KVSERVE_SRV_H
#define KVSERVE_SRV_H

#include "eng.h"

#include <stdio.h>

#include <stddef.h>

typedef struct srv_config {
    const char *model_dir;       /* Hugging Face model directory */
    const char *listen;          /* host:port, e.g. 127.0.0.1:50051 */
    int threads;                 /* compute threads (0 = all CPUs) */
    int cq_threads;              /* completion-queue threads (0 = 2) */
    int worker_threads;          /* threads of each pool for handlers that may block (0 = 2; internal.h) */
    eng_engine_options engine;   /* pool size, block size, budgets */
    int max_context;             /* cap on the context (0 = model's) */
    const char *tls_cert;        /* PEM certificate chain: enables TLS */
    const char *tls_key;         /* PEM private key */
    const char *tls_client_ca;   /* PEM CA: require and verify client certificates (mTLS) */
    const char *token_file;      /* lines "TOKEN TENANT": enables bearer-token auth */
    const char *export_key_file; /* HMAC key of agent exports (NULL: a random one per process) */
    double grace_seconds;        /* on SIGTERM: time in-flight calls get to finish (0: none, cancel at once) */
    int max_message_bytes;       /* largest request accepted (0 = 64 MiB) */
    int max_wait_ms;             /* cap on Step's wait_ms (0 = 10000) */
    int max_results;             /* Submitted requests per tenant not yet collected by Step (0 = 1024) */
    int result_ttl_s;            /* how long a finished request's result waits for Step (0 = 600) */
    const char *redis_url;       /* enables the prompt cache: redis://host:port/db or unix:///path */
    int redis_timeout_ms;        /* Redis connect and command timeout (0 = 200) */
    int cache_ttl_s;             /* default TTL of cached completions (0 = 86400) */
    double agent_save_after_s;   /* with redis_url: agents' KV also lives in Redis, written after this many
                                  * seconds idle, on eviction and at shutdown, restored on any replica (< 0: off) */
    int agent_ttl_s;             /* lifetime of an agent in Redis (0 = 86400) */
    const char *metrics_listen;  /* HOST:PORT for /metrics (Prometheus) and /metrics/cache/statistics */
    const char *http_listen;     /* HOST:PORT of the OpenAI-compatible HTTP API (NULL: none) */
    const char *served_model_name; /* the model's name in the HTTP API (NULL: the model path's last part) */
    double price_per_1k;         /* currency per 1k tokens, for the cost-saved metric */
    int batch_max;               /* batcher: dispatch when this many wait ... */
    int batch_window_ms;         /* ... or this long after the first arrival */
    int batch_queue;             /* requests waiting at most; beyond: RESOURCE_EXHAUSTED */
    int weights;                 /* ENG_WEIGHTS_*: what the weight matrices are kept in (AUTO: the file's) */
    int kv_f16;                  /* keep the KV cache in IEEE half */
    const char *test_hold_file;  /* test hook (KVSERVE_TEST_HOLD_FILE, docs/testing.md); NULL in production */
} srv_config;

/* The defaults alone. */
void srv_config_default(srv_config *c);
/* Defaults, then KVSERVE_* environment variables, then the command line
 * (args after "serve": "--flag value" or "--flag=value"), each value checked
 * against its range, then the checks across settings. 0; 1 for --help; -1
 * with a message in err naming the flag or variable. */
int srv_config_load(srv_config *c, int argc, char **argv, char *err, size_t errlen);
/* The checks across settings (model given, TLS pairs, the batcher's sizes): 0 or -1 and why. */
int srv_config_check(const srv_config *c, char *err, size_t errlen);
/* One line per option: flag, argument, what it does (default), its variable. */
void srv_config_usage(FILE *out);

typedef struct srv srv;

/* Start listening (health NOT_SERVING) and load the model. 0 and *out, or a
 * process exit code after one line on stderr (bad model dir, port in use,
 * bad PEM, ...) with everything undone. */
int srv_open(srv **out, const srv_config *c);
/* SERVING until SIGTERM or SIGINT; returns 0. */
int srv_serve(srv *s);
/* Drain gracefully (the grace for calls in flight), stop, free. */
void srv_shutdown(srv *s);
/* srv_open, srv_serve, srv_shutdown: the process's exit code. */
int srv_run(const srv_config *c);

#endif
