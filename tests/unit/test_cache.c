/* test_cache.c — the prompt cache against a real redis-server started here
 * on a free loopback port: hits and misses, every key input, tenants, TTL,
 * namespace invalidation and purge, fail-open with the circuit breaker
 * when Redis dies and recovery when it returns, threads. */
#include "kvc.h"
#include "kvc_internal.h"
#include "test.h"

#include <arpa/inet.h>
#include <math.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int redis_port;
static pid_t redis_pid;

#define BOUND_S 120 /* the bound on every wait for a state: it only guards against hangs */

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int free_port(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t l = sizeof a;
    bind(fd, (struct sockaddr *)&a, sizeof a);
    getsockname(fd, (struct sockaddr *)&a, &l);
    close(fd);
    return ntohs(a.sin_port);
}

static int can_connect(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int ok = connect(fd, (struct sockaddr *)&a, sizeof a) == 0;
    close(fd);
    return ok;
}

/* Start redis-server on redis_port; 1 once it accepts connections, 0 if it
 * exited (the port was taken after free_port() chose it) or never answered. */
static int redis_start(void) {
    char port[16];
    snprintf(port, sizeof port, "%d", redis_port);
    redis_pid = fork();
    if (redis_pid == 0) {
        int null = open("/dev/null", O_WRONLY);
        if (null >= 0) { dup2(null, 1); dup2(null, 2); }
        execlp("redis-server", "redis-server", "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--loglevel", "warning", (char *)NULL);
        _exit(127);
    }
    for (double until = now_s() + BOUND_S; now_s() < until; sleep_ms(5)) {
        if (waitpid(redis_pid, NULL, WNOHANG) == redis_pid) { redis_pid = 0; return 0; }
        if (can_connect(redis_port)) return 1;
    }
    return 0;
}

static void redis_stop(void) {
    if (redis_pid > 0) {
        kill(redis_pid, SIGKILL);
        waitpid(redis_pid, NULL, 0);
        redis_pid = 0;
    }
}

static kvc_redis *connect_redis(int breaker_ms) {
    char url[64], err[256];
    snprintf(url, sizeof url, "redis://127.0.0.1:%d/0", redis_port);
    kvc_redis_options o = {.url = url, .breaker_open_ms = breaker_ms};
    kvc_redis *r = NULL;
    CHECK_MSG(kvc_redis_open(&r, &o, err, sizeof err) == KVC_OK, "%s", err);
    return r;
}

static const int32_t IDS[] = {1, 2, 3, 500, 42};
static const char *STOPS[] = {"\n\n", "END"};

static kvc_prompt_key base_key(void) {
    kvc_prompt_key k = {.model_fingerprint = 0x1234, .tenant = "alice", .ns = "docs", .ids = IDS, .n_ids = 5,
                        .max_tokens = 16, .temperature = 0, .top_p = 1, .repeat_penalty = 1, .seed = 7,
                        .stop = STOPS, .n_stop = 2};
    return k;
}

static kvc_completion sample_completion(void) {
    static int32_t toks[] = {9, 8, 7};
    kvc_completion c = {.text = (char *)"héllo wörld", .tokens = toks, .n_tokens = 3, .finish = 2,
                        .prompt_tokens = 5, .cached_tokens = 0, .generated_tokens = 3};
    c.text_len = strlen(c.text);
    return c;
}

static void test_url_parsing(void) {
    const char *bad[] = {"http://x", "redis://", "redis://h:0", "redis://h:99999", "redis://h/x", "unix://"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        kvc_redis *r = NULL;
        char err[256] = "";
        kvc_redis_options o = {.url = bad[i]};
        CHECK_MSG(kvc_redis_open(&r, &o, err, sizeof err) == KVC_EINVAL && strstr(err, "bad Redis URL"), "%s", bad[i]);
    }
    const char *good[] = {"redis://localhost", "redis://u:p@h:7000/3", "redis://:secret@10.0.0.1:6379/",
                          "unix:///run/redis.sock?db=2"};
    for (size_t i = 0; i < sizeof good / sizeof *good; i++) {
        kvc_redis *r = NULL;
        char err[256] = "";
        kvc_redis_options o = {.url = good[i]};
        CHECK_MSG(kvc_redis_open(&r, &o, err, sizeof err) == KVC_OK, "%s: %s", good[i], err);
        kvc_redis_close(r);
    }
}

static void test_hit_miss_and_key_inputs(void) {
    kvc_redis *r = connect_redis(0);
    kvc_prompt *p;
    kvc_prompt_open(&p, r, NULL);
    kvc_prompt_key k = base_key();
    kvc_completion c = sample_completion(), got;
    CHECK(kvc_prompt_get(p, &k, &got) == KVC_MISS);
    CHECK(kvc_prompt_put(p, &k, &c, 0) == KVC_OK);
    CHECK(kvc_prompt_get(p, &k, &got) == KVC_OK);
    CHECK(got.text_len == c.text_len && !memcmp(got.text, c.text, c.text_len) && got.n_tokens == 3 &&
          got.tokens[2] == 7 && got.finish == 2 && got.generated_tokens == 3 && got.prompt_tokens == 5);
    kvc_completion_free(&got);
    /* every input that changes the output changes the key */
    int32_t other_ids[] = {1, 2, 3, 500, 43};
    const char *other_stop[] = {"\n\n", "END!"};
    for (int v = 0; v < 10; v++) {
        kvc_prompt_key x = base_key();
        switch (v) {
        case 0: x.model_fingerprint++; break;
        case 1: x.tenant = "bob"; break;
        case 2: x.ns = "other"; break;
        case 3: x.ids = other_ids; break;
        case 4: x.n_ids = 4; break;
        case 5: x.max_tokens = 17; break;
        case 6: x.seed = 8; break;
        case 7: x.top_k = 40; break;
        case 8: x.stop = other_stop; break;
        case 9: x.n_stop = 1; break;
        }
        CHECK_MSG(kvc_prompt_get(p, &x, &got) == KVC_MISS, "variant %d hit", v);
    }
    /* tenant strings cannot be confused with namespace strings */
    kvc_prompt_key a = base_key(), b = base_key();
    a.tenant = "ab";
    a.ns = "c";
    b.tenant = "a";
    b.ns = "bc";
    CHECK(kvc_prompt_put(p, &a, &c, 0) == KVC_OK && kvc_prompt_get(p, &b, &got) == KVC_MISS);
    kvc_prompt_stats st;
    kvc_prompt_stats_get(p, &st);
    CHECK(st.hits == 1 && st.misses == 12 && st.writes == 2 && st.errors == 0);
    kvc_prompt_close(p);
    kvc_redis_close(r);
}

static void test_ttl_expiry(void) {
    kvc_redis *r = connect_redis(0);
    kvc_prompt *p;
    kvc_prompt_open(&p, r, NULL);
    kvc_prompt_key k = base_key();
    k.ns = "ttl";
    kvc_completion c = sample_completion(), got;
    CHECK(kvc_prompt_put(p, &k, &c, 1) == KVC_OK);
    CHECK(kvc_prompt_get(p, &k, &got) == KVC_OK);
    kvc_completion_free(&got);
    int rc = KVC_OK;
    for (double until = now_s() + BOUND_S; rc == KVC_OK && now_s() < until;) { /* Redis expires it after 1 s */
        if ((rc = kvc_prompt_get(p, &k, &got)) == KVC_OK) { kvc_completion_free(&got); sleep_ms(20); }
    }
    CHECK_MSG(rc == KVC_MISS, "a 1 s entry still there after %d s (rc %d)", BOUND_S, rc);
    kvc_prompt_close(p);
    kvc_redis_close(r);
}

static void test_invalidate_and_purge(void) {
    kvc_redis *r = connect_redis(0);
    kvc_prompt *p;
    kvc_prompt_open(&p, r, NULL);
    kvc_completion c = sample_completion(), got;
    int32_t ids[5] = {1, 2, 3, 4, 0};
    kvc_prompt_key k = base_key(), other = base_key();
    k.ns = "plan";
    k.ids = ids;
    other.ns = "keep";
    for (int i = 0; i < 20; i++) {
        ids[4] = i;
        CHECK(kvc_prompt_put(p, &k, &c, 0) == KVC_OK);
    }
    CHECK(kvc_prompt_put(p, &other, &c, 0) == KVC_OK);
    CHECK(kvc_prompt_get(p, &k, &got) == KVC_OK);
    kvc_completion_free(&got);
    uint64_t gen = 0;
    CHECK(kvc_prompt_invalidate(p, "alice", "plan", &gen) == KVC_OK && gen == 1);
    CHECK(kvc_prompt_get(p, &k, &got) == KVC_MISS);            /* gone at once */
    CHECK(kvc_prompt_get(p, &other, &got) == KVC_OK);           /* another namespace is untouched */
    kvc_completion_free(&got);
    kvc_prompt_key bob = k;
    bob.tenant = "bob";
    CHECK(kvc_prompt_put(p, &bob, &c, 0) == KVC_OK);
    CHECK(kvc_prompt_put(p, &k, &c, 0) == KVC_OK);              /* new generation entry */
    int deleted = 0;
    CHECK(kvc_prompt_purge(p, "alice", "plan", 1000, &deleted) == KVC_OK);
    CHECK_MSG(deleted == 20, "purged %d", deleted);
    CHECK(kvc_prompt_get(p, &k, &got) == KVC_OK);               /* the current generation stays */
    kvc_completion_free(&got);
    CHECK(kvc_prompt_get(p, &bob, &got) == KVC_OK);             /* bob's namespace of the same name too */
    kvc_completion_free(&got);
    kvc_prompt_stats st;
    kvc_prompt_stats_get(p, &st);
    CHECK(st.invalidations == 1);
    kvc_prompt_close(p);
    kvc_redis_close(r);
}

/* A write after an invalidation that came between its lookup and the write
 * lands in the generation it was looked up in: the invalidation stands.
 * Lookups of many keys in one pipelined call agree with single lookups. */
static void test_write_after_invalidate_and_get_many(void) {
    kvc_redis *r = connect_redis(500);
    kvc_prompt *p;
    kvc_prompt_open(&p, r, NULL);
    kvc_completion c = sample_completion(), got;
    kvc_prompt_key k = base_key();
    k.ns = "race";
    CHECK(kvc_prompt_get(p, &k, &got) == KVC_MISS);           /* resolves generation 0 */
    CHECK(k.gen_known && k.gen == 0);
    CHECK(kvc_prompt_invalidate(p, "alice", "race", NULL) == KVC_OK);
    CHECK(kvc_prompt_put(p, &k, &c, 0) == KVC_OK);            /* the generation that was looked up */
    kvc_prompt_key fresh = base_key();
    fresh.ns = "race";
    CHECK(kvc_prompt_get(p, &fresh, &got) == KVC_MISS);       /* never visible after the invalidation */
    CHECK(fresh.gen == 1);
    CHECK(kvc_prompt_put(p, &fresh, &c, 0) == KVC_OK);
    kvc_prompt_key a = base_key(), b = base_key(), m = base_key();
    a.ns = "race";
    b.ns = "race";
    b.max_tokens = 999;                                        /* not stored */
    m.ns = "other";
    kvc_prompt_key *keys[] = {&a, &b, &m};
    kvc_completion out[3];
    int rc[3];
    kvc_prompt_get_many(p, keys, 3, out, rc);
    CHECK(rc[0] == KVC_OK && out[0].n_tokens == c.n_tokens && !memcmp(out[0].text, c.text, c.text_len));
    CHECK(rc[1] == KVC_MISS && rc[2] == KVC_MISS);
    for (int i = 0; i < 3; i++) kvc_completion_free(&out[i]);
    kvc_prompt_close(p);
    kvc_redis_close(r);
}

static void test_fail_open_and_recovery(void) {
    kvc_redis *r = connect_redis(500);
    kvc_prompt *p;
    kvc_prompt_open(&p, r, NULL);
    kvc_prompt_key k = base_key();
    k.ns = "failopen";
    kvc_completion c = sample_completion(), got;
    CHECK(kvc_prompt_put(p, &k, &c, 0) == KVC_OK);
    redis_stop();
    int errors = 0;
    for (int i = 0; i < 50; i++) errors += kvc_prompt_get(p, &k, &got) == KVC_EREDIS;
    CHECK(errors == 50);
    kvc_redis_stats rs;
    kvc_redis_stats_get(r, &rs);
    /* the breaker skips Redis once open (a dead Redis costs no latency); every 500 ms one
     * lookup probes it, so "most", not "all but the first three" */
    CHECK_MSG(rs.breaker_open && rs.breaker_opens >= 1 && rs.skipped > 40, "opens %llu skipped %llu",
              (unsigned long long)rs.breaker_opens, (unsigned long long)rs.skipped);
    CHECK(kvc_prompt_put(p, &k, &c, 0) == KVC_EREDIS);
    kvc_prompt_stats st;
    kvc_prompt_stats_get(p, &st);
    CHECK(st.errors >= 51);
    CHECK(redis_start()); /* on the same port (SO_REUSEADDR) */
    int ok = 0; /* after the breaker's open time (500 ms) a probe finds Redis back */
    for (double until = now_s() + BOUND_S; !ok && now_s() < until;) {
        ok = kvc_prompt_put(p, &k, &c, 0) == KVC_OK;
        if (!ok) sleep_ms(20);
    }
    CHECK(ok);
    CHECK(kvc_prompt_get(p, &k, &got) == KVC_OK);
    kvc_completion_free(&got);
    kvc_redis_stats_get(r, &rs);
    CHECK(!rs.breaker_open && rs.reconnects >= 2);
    kvc_prompt_close(p);
    kvc_redis_close(r);
}

/* ---- RAG cache ---------------------------------------------------------------- */
#define DIM 384

/* kvc__dot_rows (the RAG cache's similarity search): small tables on the
 * caller, big ones in slices on threads (with a partial last slice); both
 * match a float64 product. */
static void test_dot_rows(void) {
    const size_t dims = 384, counts[] = {3, 5000};
    uint64_t x = 99;
    for (size_t c = 0; c < 2; c++) {
        size_t n = counts[c];
        float *m = malloc(n * dims * sizeof *m), *q = malloc(dims * sizeof *q), *out = malloc(n * sizeof *out);
        for (size_t i = 0; i < n * dims; i++) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            m[i] = (float)((double)(x % 2001) / 1000.0 - 1.0);
        }
        for (size_t i = 0; i < dims; i++) q[i] = (float)i / (float)dims - 0.5f;
        kvc__dot_rows(m, n, dims, q, out);
        double worst = 0;
        for (size_t r = 0; r < n; r++) {
            double ref = 0, mag = 0;
            for (size_t k = 0; k < dims; k++) {
                ref += (double)m[r * dims + k] * q[k];
                mag += fabs((double)m[r * dims + k] * q[k]);
            }
            double e = fabs(out[r] - ref) / (mag + 1e-30);
            if (e > worst) worst = e;
        }
        CHECK_MSG(worst < 1e-5, "%zu rows: relative error %.2e", n, worst);
        free(m); free(q); free(out);
    }
}

static char heard[8][256];
static int n_heard;
static void on_problem(void *ud, const char *msg) {
    (void)ud;
    snprintf(heard[n_heard++ % 8], sizeof heard[0], "%s", msg);
}

static int cmd3(kvc_redis *r, const char *a, const char *b, const char *c) {
    const char *argv[3] = {a, b, c};
    size_t lens[3] = {strlen(a), strlen(b), strlen(c)};
    return kvc__command_ok(r, 3, argv, lens);
}

/* An error reply (WRONGTYPE) is the command's failure, not the link's: the
 * breaker stays shut; the operator hears Redis's own words once per change,
 * and that it works again; a refused AUTH names itself. */
static void test_error_replies_and_problems(void) {
    char url[96], err[256];
    snprintf(url, sizeof url, "redis://127.0.0.1:%d/0", redis_port);
    kvc_redis_options o = {.url = url, .on_problem = on_problem};
    kvc_redis *r = NULL;
    CHECK_MSG(kvc_redis_open(&r, &o, err, sizeof err) == KVC_OK, "%s", err);
    if (!r) return;
    n_heard = 0;
    CHECK(cmd3(r, "SET", "kvtest:wrongtype", "v") == 0);
    kvc_redis_stats before, after;
    kvc_redis_stats_get(r, &before);
    for (int i = 0; i < 6; i++) CHECK(cmd3(r, "LPUSH", "kvtest:wrongtype", "x") == -1);
    kvc_redis_stats_get(r, &after);
    CHECK_MSG(!after.breaker_open && after.breaker_opens == before.breaker_opens && after.skipped == before.skipped,
              "error replies opened the breaker");
    CHECK(after.errors == before.errors + 6);
    CHECK_MSG(n_heard == 1 && strstr(heard[0], "WRONGTYPE"), "heard %d: %s", n_heard, n_heard ? heard[0] : "");
    CHECK(cmd3(r, "SET", "kvtest:wrongtype", "w") == 0);
    CHECK_MSG(n_heard == 2 && !strcmp(heard[1], "ok"), "heard %d", n_heard);
    kvc_redis_close(r);
    /* a password this Redis does not have */
    snprintf(url, sizeof url, "redis://:not-the-password@127.0.0.1:%d/0", redis_port);
    n_heard = 0;
    CHECK(kvc_redis_open(&r, &o, err, sizeof err) == KVC_OK);
    if (!r) return;
    CHECK(cmd3(r, "SET", "kvtest:x", "v") == -1);
    CHECK_MSG(n_heard == 1 && strstr(heard[0], "AUTH failed: ") && strstr(heard[0], "ERR"), "heard %d: %s", n_heard,
              n_heard ? heard[0] : "");
    kvc_redis_close(r);
}

static void unit_vec(float *v, int axis) {
    memset(v, 0, DIM * sizeof *v);
    v[axis] = 1;
}

/* A vector at cosine c from axis a, leaning towards axis b; scaled by 3 to
 * show normalisation. */
static void at_cos(float *v, int a, int b, double c) {
    memset(v, 0, DIM * sizeof *v);
    v[a] = (float)(3 * c);
    v[b] = (float)(3 * sqrt(1 - c * c));
}

static kvc_rag_query rq(const char *tenant, const char *text, const float *e, int dim) {
    kvc_rag_query q = {.tenant = tenant, .ns = "kb", .model = "minilm", .top_k = 5, .query = text,
                       .query_len = strlen(text), .embedding = e, .dim = dim};
    return q;
}

static void test_rag_exact_similar_tenants_replicas(void) {
    kvc_redis *r1 = connect_redis(0), *r2 = connect_redis(0);
    kvc_rag *a, *b;
    kvc_rag_open(&a, r1, NULL);
    kvc_rag_open(&b, r2, NULL); /* another replica */
    float e[DIM], q[DIM];
    unit_vec(e, 0);
    const uint8_t res[] = "doc-17,doc-4,doc-9";
    kvc_rag_query s = rq("alice", "what is paged attention?", e, DIM);
    CHECK(kvc_rag_store(a, &s, res, sizeof res, 0) == KVC_OK);
    uint8_t *out;
    size_t len;
    float sim;
    int exact;
    CHECK(kvc_rag_lookup(a, &s, 0.95f, &out, &len, &sim, &exact) == KVC_OK && exact && sim == 1.0f &&
          len == sizeof res && !memcmp(out, res, len));
    free(out);
    at_cos(q, 0, 1, 0.951);
    kvc_rag_query near = rq("alice", "explain paged attention", q, DIM);
    CHECK(kvc_rag_lookup(a, &near, 0.95f, &out, &len, &sim, &exact) == KVC_OK && !exact && fabsf(sim - 0.951f) < 1e-4f);
    free(out);
    at_cos(q, 0, 1, 0.949);
    CHECK(kvc_rag_lookup(a, &near, 0.95f, &out, &len, &sim, &exact) == KVC_MISS);
    CHECK(kvc_rag_lookup(a, &near, 0.90f, &out, &len, &sim, &exact) == KVC_OK); /* the threshold is the caller's */
    free(out);
    /* another tenant, model or top_k never sees it */
    kvc_rag_query bob = rq("bob", "what is paged attention?", e, DIM);
    CHECK(kvc_rag_lookup(a, &bob, 0.5f, &out, &len, &sim, &exact) == KVC_MISS);
    kvc_rag_query other = s;
    other.top_k = 6;
    CHECK(kvc_rag_lookup(a, &other, 0.5f, &out, &len, &sim, &exact) == KVC_MISS);
    /* a store by the other replica is found here */
    unit_vec(e, 7);
    kvc_rag_query s2 = rq("alice", "kv cache eviction", e, DIM);
    CHECK(kvc_rag_store(b, &s2, (const uint8_t *)"x", 1, 0) == KVC_OK);
    at_cos(q, 7, 8, 0.99);
    kvc_rag_query n2 = rq("alice", "how are kv blocks evicted", q, DIM);
    CHECK(kvc_rag_lookup(a, &n2, 0.95f, &out, &len, &sim, &exact) == KVC_OK && len == 1 && out[0] == 'x');
    free(out);
    /* dimension mismatch */
    float small[128] = {1};
    kvc_rag_query bad = rq("alice", "short vector", small, 128);
    CHECK(kvc_rag_lookup(a, &bad, 0.95f, &out, &len, &sim, &exact) == KVC_EINVAL);
    CHECK(kvc_rag_store(a, &bad, res, 1, 0) == KVC_EINVAL);
    kvc_rag_stats st;
    kvc_rag_stats_get(a, &st);
    CHECK(st.hits == 4 && st.exact_hits == 1 && st.writes == 1 && st.reloads >= 2);
    kvc_rag_close(a);
    kvc_rag_close(b);
    kvc_redis_close(r1);
    kvc_redis_close(r2);
}

/* Embeddings without a direction are refused; any finite scale works (norms
 * in double: subnormal vectors keep their direction); similarities are finite. */
static void test_rag_embeddings(void) {
    kvc_redis *r = connect_redis(0);
    kvc_rag *a;
    kvc_rag_open(&a, r, NULL);
    float e[DIM], q[DIM];
    unit_vec(e, 3);
    e[3] = NAN;
    kvc_rag_query bad = rq("erin", "nan", e, DIM);
    bad.ns = "embeddings";
    CHECK(!kvc_rag_embedding_ok(e, DIM));
    CHECK(kvc_rag_store(a, &bad, (const uint8_t *)"x", 1, 0) == KVC_EINVAL);
    uint8_t *out = NULL;
    size_t len;
    float sim;
    int exact;
    CHECK(kvc_rag_lookup(a, &bad, 0.95f, &out, &len, &sim, &exact) == KVC_EINVAL && !out);
    e[3] = INFINITY;
    CHECK(!kvc_rag_embedding_ok(e, DIM) && kvc_rag_store(a, &bad, (const uint8_t *)"x", 1, 0) == KVC_EINVAL);
    memset(e, 0, sizeof e);
    CHECK(!kvc_rag_embedding_ok(e, DIM) && kvc_rag_store(a, &bad, (const uint8_t *)"x", 1, 0) == KVC_EINVAL);
    /* the smallest subnormal float on two axes: direction (1, 1) */
    uint32_t one = 1;
    float tiny;
    memcpy(&tiny, &one, 4);
    e[3] = e[4] = tiny;
    CHECK(kvc_rag_embedding_ok(e, DIM));
    kvc_rag_query sub = rq("erin", "subnormal", e, DIM);
    sub.ns = "embeddings";
    CHECK(kvc_rag_store(a, &sub, (const uint8_t *)"s", 1, 0) == KVC_OK);
    memset(q, 0, sizeof q);
    q[3] = q[4] = 1e30f;
    kvc_rag_query big = rq("erin", "huge", q, DIM);
    big.ns = "embeddings";
    CHECK(kvc_rag_lookup(a, &big, 0.95f, &out, &len, &sim, &exact) == KVC_OK);
    CHECK_MSG(isfinite(sim) && fabsf(sim - 1) < 1e-5f && !exact, "similarity %g", (double)sim);
    free(out);
    kvc_rag_close(a);
    kvc_redis_close(r);
}

static void test_rag_expiry(void) {
    kvc_redis *r = connect_redis(0);
    kvc_rag *a;
    kvc_rag_open(&a, r, NULL);
    float e[DIM], q[DIM];
    unit_vec(e, 20);
    kvc_rag_query s = rq("carol", "short lived", e, DIM);
    CHECK(kvc_rag_store(a, &s, (const uint8_t *)"r", 1, 1) == KVC_OK);
    at_cos(q, 20, 21, 0.99);
    kvc_rag_query n = rq("carol", "short-lived?", q, DIM);
    uint8_t *out;
    size_t len;
    float sim;
    int exact;
    CHECK(kvc_rag_lookup(a, &n, 0.95f, &out, &len, &sim, &exact) == KVC_OK);
    free(out);
    int rc = KVC_OK;
    for (double until = now_s() + BOUND_S; rc == KVC_OK && now_s() < until;) { /* Redis expires it after 1 s */
        if ((rc = kvc_rag_lookup(a, &s, 0.95f, &out, &len, &sim, &exact)) == KVC_OK) { free(out); sleep_ms(20); }
    }
    CHECK_MSG(rc == KVC_MISS, "a 1 s entry still there after %d s (rc %d)", BOUND_S, rc);
    CHECK(kvc_rag_lookup(a, &n, 0.95f, &out, &len, &sim, &exact) == KVC_MISS);
    kvc_rag_close(a);
    kvc_redis_close(r);
}

typedef struct {
    kvc_prompt *p;
    int id, hits;
} thr;

static void *worker(void *a) {
    thr *t = a;
    for (int i = 0; i < 50; i++) {
        int32_t ids[2] = {t->id, i};
        kvc_prompt_key k = base_key();
        k.ns = "threads";
        k.ids = ids;
        k.n_ids = 2;
        kvc_completion c = sample_completion(), got;
        if (kvc_prompt_put(t->p, &k, &c, 0) == KVC_OK && kvc_prompt_get(t->p, &k, &got) == KVC_OK) {
            t->hits++;
            kvc_completion_free(&got);
        }
    }
    return NULL;
}

static void test_threads(void) {
    kvc_redis *r = connect_redis(0);
    kvc_prompt *p;
    kvc_prompt_open(&p, r, NULL);
    pthread_t th[8];
    thr a[8];
    for (int i = 0; i < 8; i++) {
        a[i] = (thr){p, i, 0};
        pthread_create(&th[i], NULL, worker, &a[i]);
    }
    int hits = 0;
    for (int i = 0; i < 8; i++) {
        pthread_join(th[i], NULL);
        hits += a[i].hits;
    }
    CHECK(hits == 400);
    kvc_prompt_close(p);
    kvc_redis_close(r);
}

int main(int argc, char **argv) {
    int up = 0;
    for (int attempt = 0; attempt < 5 && !up; attempt++) { /* another process may take a "free" port first */
        redis_port = free_port();
        if (!(up = redis_start())) redis_stop();
    }
    if (!up) { fprintf(stderr, "redis-server did not start\n"); return 1; }
    static const test_case tests[] = {
        {"redis_url_parsing", test_url_parsing},
        {"prompt_hit_miss_every_key_input", test_hit_miss_and_key_inputs},
        {"prompt_ttl_expiry", test_ttl_expiry},
        {"namespace_invalidate_and_purge", test_invalidate_and_purge},
        {"write_after_invalidate_and_get_many", test_write_after_invalidate_and_get_many},
        {"fail_open_breaker_and_recovery", test_fail_open_and_recovery},
        {"error_replies_do_not_open_the_breaker_problems_told_once", test_error_replies_and_problems},
        {"dot_rows_threads_match_float64", test_dot_rows},
        {"threads", test_threads},
        {"rag_exact_similar_tenants_replicas_dims", test_rag_exact_similar_tenants_replicas},
        {"rag_expiry", test_rag_expiry},
        {"rag_embeddings_finite_with_a_direction", test_rag_embeddings},
        {0, 0}};
    int rc = run_tests(tests, argc, argv);
    redis_stop();
    return rc;
}
