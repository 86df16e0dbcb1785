/* config.c — the server's settings in one place: every option's flag, its
 * KVSERVE_* environment variable, type, range, default and help line. A
 * setting comes from its default, then the environment, then the command
 * line (the last wins); both are checked alike and a bad value is refused
 * naming the flag or the variable and the range. */
#include "internal.h"

#include <stddef.h>

enum { T_STR, T_INT, T_NUM, T_BOOL, T_WEIGHTS, T_F16 };

typedef struct {
    const char *flag;           /* --flag */
    const char *env;            /* KVSERVE_... */
    int type;
    double lo, hi;              /* T_INT, T_NUM */
    size_t off;                 /* into srv_config */
    const char *help;           /* "ARG  what (default)" */
} opt;

#define AT(field) offsetof(srv_config, field)
static const opt OPTS[] = {
    {"model", "KVSERVE_MODEL", T_STR, 0, 0, AT(model_dir), "MODEL  Hugging Face model directory or GGUF file (required)"},
    {"listen", "KVSERVE_LISTEN", T_STR, 0, 0, AT(listen), "HOST:PORT  gRPC address (127.0.0.1:50051)"},
    {"threads", "KVSERVE_THREADS", T_INT, 1, 256, AT(threads), "N  compute threads (all CPUs)"},
    {"cq-threads", "KVSERVE_CQ_THREADS", T_INT, 1, 64, AT(cq_threads), "N  gRPC completion-queue threads (2)"},
    {"worker-threads", "KVSERVE_WORKER_THREADS", T_INT, 1, 64, AT(worker_threads),
     "N  threads of each worker pool for handlers that may block (2)"},
    {"kv-memory", "KVSERVE_KV_MEMORY", T_NUM, 0.001, 1 << 24, AT(engine.kv_memory_mib),
     "MIB  KV pool size in MiB, or below 1 a fraction of physical memory (384)"},
    {"pool-blocks", "KVSERVE_POOL_BLOCKS", T_INT, 1, 1 << 24, AT(engine.n_blocks), "N  KV pool size in blocks instead"},
    {"block-tokens", "KVSERVE_BLOCK_TOKENS", T_INT, 1, 4096, AT(engine.block_tokens), "N  tokens per block (16)"},
    {"step-tokens", "KVSERVE_STEP_TOKENS", T_INT, 1, 65536, AT(engine.max_step_tokens), "N  token budget per step (512)"},
    {"max-running", "KVSERVE_MAX_RUNNING", T_INT, 1, 4096, AT(engine.max_running), "N  sequences at once (64)"},
    {"max-queue", "KVSERVE_MAX_QUEUE", T_INT, 1, 1 << 20, AT(engine.max_queue), "N  waiting requests (1024)"},
    {"ctx", "KVSERVE_MAX_CONTEXT", T_INT, 1, 1 << 24, AT(max_context), "N  context length cap (the model's)"},
    {"weights", "KVSERVE_WEIGHTS", T_WEIGHTS, 0, 0, AT(weights),
     "f32|bf16|q8_0|q4_k  what the weight matrices are kept in (f32; a GGUF file's Q8_0 or K-quants)"},
    {"kv", "KVSERVE_KV", T_F16, 0, 0, AT(kv_f16), "f32|f16  KV cache precision (f32)"},
    {"tls-cert", "KVSERVE_TLS_CERT", T_STR, 0, 0, AT(tls_cert), "PEM  certificate chain: TLS (with --tls-key)"},
    {"tls-key", "KVSERVE_TLS_KEY", T_STR, 0, 0, AT(tls_key), "PEM  private key"},
    {"tls-client-ca", "KVSERVE_TLS_CLIENT_CA", T_STR, 0, 0, AT(tls_client_ca), "PEM  require client certificates (mTLS)"},
    {"token-file", "KVSERVE_TOKEN_FILE", T_STR, 0, 0, AT(token_file), "FILE  lines \"TOKEN TENANT\": bearer tokens"},
    {"export-key", "KVSERVE_EXPORT_KEY", T_STR, 0, 0, AT(export_key_file),
     "FILE  key (32+ bytes) signing agent exports (a new one per process)"},
    {"share-prefix-across-tenants", "KVSERVE_SHARE_PREFIX_ACROSS_TENANTS", T_BOOL, 0, 0,
     AT(engine.share_prefix_across_tenants), "  tenants reuse each other's cached prompt KV (they trust each other)"},
    {"grace", "KVSERVE_GRACE_SECONDS", T_NUM, 0, 3600, AT(grace_seconds), "S  seconds in-flight calls get on SIGTERM (10)"},
    {"max-message-bytes", "KVSERVE_MAX_MESSAGE_BYTES", T_INT, 1024, 1 << 30, AT(max_message_bytes),
     "N  largest request accepted (64 MiB)"},
    {"max-wait-ms", "KVSERVE_MAX_WAIT_MS", T_INT, 1, 600000, AT(max_wait_ms), "MS  cap on Step's wait_ms (10000)"},
    {"max-results", "KVSERVE_MAX_RESULTS", T_INT, 1, 1 << 24, AT(max_results),
     "N  Submitted requests a tenant may leave uncollected by Step (1024)"},
    {"result-ttl", "KVSERVE_RESULT_TTL", T_INT, 1, 86400 * 7, AT(result_ttl_s),
     "S  how long a finished request's result waits for Step (600)"},
    {"redis", "KVSERVE_REDIS_URL", T_STR, 0, 0, AT(redis_url), "URL  caches on Redis (redis://host:port/db, unix:///path)"},
    {"redis-timeout-ms", "KVSERVE_REDIS_TIMEOUT_MS", T_INT, 1, 600000, AT(redis_timeout_ms),
     "MS  Redis connect and command timeout (200)"},
    {"cache-ttl", "KVSERVE_CACHE_TTL", T_INT, 1, 1e9, AT(cache_ttl_s), "S  default lifetime of cached completions (86400)"},
    {"agent-save-after", "KVSERVE_AGENT_SAVE_AFTER", T_NUM, 0, 1e9, AT(agent_save_after_s),
     "S  with --redis: agents' KV also goes to Redis after S s idle, on eviction and at shutdown, and any replica "
     "restores it (off)"},
    {"agent-ttl", "KVSERVE_AGENT_TTL", T_INT, 1, 1e9, AT(agent_ttl_s), "S  lifetime of an agent kept in Redis (86400)"},
    {"metrics", "KVSERVE_METRICS_LISTEN", T_STR, 0, 0, AT(metrics_listen),
     "HOST:PORT  Prometheus /metrics and /metrics/cache/statistics"},
    {"http", "KVSERVE_HTTP_LISTEN", T_STR, 0, 0, AT(http_listen),
     "HOST:PORT  the OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions"},
    {"served-model-name", "KVSERVE_SERVED_MODEL_NAME", T_STR, 0, 0, AT(served_model_name),
     "NAME  the model's name in the HTTP API (the model path's last part)"},
    {"price-per-1k", "KVSERVE_PRICE_PER_1K", T_NUM, 0, 1e9, AT(price_per_1k), "X  currency per 1k tokens, for cost saved (0)"},
    {"batch-max", "KVSERVE_BATCH_MAX", T_INT, 1, 4096, AT(batch_max), "N  batcher: dispatch when N requests wait (32) ..."},
    {"batch-window-ms", "KVSERVE_BATCH_WINDOW_MS", T_INT, 0, 60000, AT(batch_window_ms),
     "MS  ... or MS after the oldest arrival (0)"},
    {"batch-queue", "KVSERVE_BATCH_QUEUE", T_INT, 1, 1 << 20, AT(batch_queue),
     "N  requests the batcher holds; more: RESOURCE_EXHAUSTED (1024)"},
};
#define N_OPTS (sizeof OPTS / sizeof *OPTS)

void srv_config_default(srv_config *c) {
    memset(c, 0, sizeof *c); /* engine fields 0: the engine's own defaults */
    c->listen = "127.0.0.1:50051";
    c->cq_threads = 2;
    c->worker_threads = 2;
    c->grace_seconds = 10;
    c->engine.kv_memory_mib = 384; /* (what 512 blocks of SmolLM2-135M's shape take) */
    c->max_message_bytes = 64 << 20;
    c->max_wait_ms = 10000;
    c->max_results = 1024;
    c->result_ttl_s = 600;
    c->batch_max = 32;
    c->batch_queue = 1024;
    c->agent_save_after_s = -1;
    c->test_hold_file = getenv("KVSERVE_TEST_HOLD_FILE"); /* a test hook: no flag */
}

/* Set option o from text v; `from` names where it came from in messages. */
static int set(srv_config *c, const opt *o, const char *v, const char *from, char *err, size_t errlen) {
    void *dst = (char *)c + o->off;
    char *end;
    double d;
    switch (o->type) {
    case T_STR:
        *(const char **)dst = v;
        return 0;
    case T_BOOL:
        if (!strcmp(v, "1") || !strcasecmp(v, "true") || !strcasecmp(v, "yes")) *(int *)dst = 1;
        else if (!strcmp(v, "0") || !strcasecmp(v, "false") || !strcasecmp(v, "no") || !v[0]) *(int *)dst = 0;
        else break;
        return 0;
    case T_WEIGHTS: {
        static const char *const names[] = {"f32", "bf16", "q8_0", "q4_k"};
        for (int i = 0; i < 4; i++)
            if (!strcmp(v, names[i])) {
                *(int *)dst = ENG_WEIGHTS_F32 + i;
                return 0;
            }
        snprintf(err, errlen, "%s: f32, bf16, q8_0 or q4_k (got \"%s\")", from, v);
        return -1;
    }
    case T_F16: {
        const char *low = "f16";
        if (strcmp(v, "f32") && strcmp(v, low)) {
            snprintf(err, errlen, "%s: f32 or %s (got \"%s\")", from, low, v);
            return -1;
        }
        *(int *)dst = !strcmp(v, low);
        return 0;
    }
    default:
        d = strtod(v, &end);
        if (end == v || *end || !(d >= o->lo && d <= o->hi) || (o->type == T_INT && d != (double)(long)d)) {
            snprintf(err, errlen, "%s: %s in [%g, %g] (got \"%s\")", from, o->type == T_INT ? "an integer" : "a number",
                     o->lo, o->hi, v);
            return -1;
        }
        if (o->type == T_INT) *(int *)dst = (int)d;
        else *(double *)dst = d;
        return 0;
    }
    snprintf(err, errlen, "%s: true or false (got \"%s\")", from, v);
    return -1;
}

int srv_config_check(const srv_config *c, char *err, size_t errlen) {
    if (!c->model_dir || !c->model_dir[0]) {
        snprintf(err, errlen, "give the model directory (--model DIR or KVSERVE_MODEL)");
        return -1;
    }
    if (!c->listen || !c->listen[0]) {
        snprintf(err, errlen, "--listen / KVSERVE_LISTEN: an address HOST:PORT");
        return -1;
    }
    if (!c->tls_cert != !c->tls_key) {
        snprintf(err, errlen, "--tls-cert and --tls-key go together");
        return -1;
    }
    if (c->tls_client_ca && !c->tls_cert) {
        snprintf(err, errlen, "--tls-client-ca needs --tls-cert and --tls-key");
        return -1;
    }
    if (c->batch_queue < c->batch_max) {
        snprintf(err, errlen, "batcher: need 1 <= --batch-max <= --batch-queue and --batch-window-ms >= 0 (got %d, %d, "
                 "%d)", c->batch_max, c->batch_queue, c->batch_window_ms);
        return -1;
    }
    if (c->agent_save_after_s >= 0 && !c->redis_url) {
        snprintf(err, errlen, "--agent-save-after / KVSERVE_AGENT_SAVE_AFTER keeps agents in Redis: give --redis too");
        return -1;
    }
    return 0;
}

int srv_config_load(srv_config *c, int argc, char **argv, char *err, size_t errlen) {
    srv_config_default(c);
    char from[96];
    for (size_t i = 0; i < N_OPTS; i++) {
        const char *v = getenv(OPTS[i].env);
        if (!v || !v[0]) continue; /* set but empty: the default (as compose files write unset ones) */
        snprintf(from, sizeof from, "%s", OPTS[i].env);
        if (set(c, &OPTS[i], v, from, err, errlen)) return -1;
    }
    for (int a = 0; a < argc; a++) {
        const char *arg = argv[a];
        if (!strcmp(arg, "--help") || !strcmp(arg, "-h")) return 1;
        if (strncmp(arg, "--", 2)) {
            snprintf(err, errlen, "unexpected argument \"%s\" (see kvserve serve --help)", arg);
            return -1;
        }
        const char *name = arg + 2, *eq = strchr(name, '=');
        size_t nl = eq ? (size_t)(eq - name) : strlen(name);
        const opt *o = NULL;
        for (size_t i = 0; i < N_OPTS && !o; i++)
            if (strlen(OPTS[i].flag) == nl && !strncmp(OPTS[i].flag, name, nl)) o = &OPTS[i];
        if (!o) {
            snprintf(err, errlen, "unknown option \"%.*s\" (see kvserve serve --help)", (int)(nl + 2), arg);
            return -1;
        }
        const char *v = eq ? eq + 1 : NULL;
        if (o->type == T_BOOL && !v) v = "1";
        if (!v && a + 1 < argc) v = argv[++a];
        snprintf(from, sizeof from, "--%s", o->flag);
        if (!v) {
            snprintf(err, errlen, "%s needs a value", from);
            return -1;
        }
        if (set(c, o, v, from, err, errlen)) return -1;
    }
    return srv_config_check(c, err, errlen);
}

void srv_config_usage(FILE *out) {
    for (size_t i = 0; i < N_OPTS; i++) {
        const char *h = OPTS[i].help, *sp = strstr(h, "  ");
        char left[64];
        snprintf(left, sizeof left, "--%s %.*s", OPTS[i].flag, sp ? (int)(sp - h) : 0, h);
        fprintf(out, "  %-32s %s  [%s]\n", left, sp ? sp + 2 : h, OPTS[i].env);
    }
}
