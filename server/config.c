/* config.c — the server configuration's defaults and environment */
#include "internal.h"

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
    c->worker_threads = getenv_int("KVSERVE_WORKER_THREADS", 2);
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
