/* test_srvconfig.c — the server's settings (server/config.c): defaults, then
 * KVSERVE_* variables, then flags; every bad value refused naming the flag
 * or the variable and its range; the checks across settings. */
#include "srv.h"
#include "test.h"

#include <stdlib.h>
#include <string.h>

static int load(srv_config *c, char *err, int argc, char **argv) {
    err[0] = 0;
    return srv_config_load(c, argc, argv, err, 320);
}

static void clear_env(void) {
    static const char *vars[] = {"KVSERVE_MODEL", "KVSERVE_POOL_BLOCKS", "KVSERVE_GRACE_SECONDS", "KVSERVE_WEIGHTS",
                                 "KVSERVE_SHARE_PREFIX_ACROSS_TENANTS", "KVSERVE_BATCH_MAX", "KVSERVE_TLS_CERT",
                                 "KVSERVE_LISTEN"};
    for (size_t i = 0; i < sizeof vars / sizeof *vars; i++) unsetenv(vars[i]);
}

static void test_defaults_env_then_flags(void) {
    clear_env();
    srv_config c;
    char err[320];
    char *none[] = {NULL};
    CHECK(load(&c, err, 0, none) == -1 && strstr(err, "--model DIR or KVSERVE_MODEL"));
    setenv("KVSERVE_MODEL", "/models/a", 1);
    CHECK_MSG(load(&c, err, 0, none) == 0, "%s", err);
    CHECK(!strcmp(c.model_dir, "/models/a") && !strcmp(c.listen, "127.0.0.1:50051") && c.cq_threads == 2 &&
          c.worker_threads == 2 && c.grace_seconds == 10 && c.batch_max == 32 && c.batch_queue == 1024 &&
          c.engine.n_blocks == 0 && c.engine.kv_memory_mib == 384 && !c.weights && !c.engine.share_prefix_across_tenants);
    setenv("KVSERVE_POOL_BLOCKS", "64", 1);
    setenv("KVSERVE_WEIGHTS", "bf16", 1);
    setenv("KVSERVE_SHARE_PREFIX_ACROSS_TENANTS", "yes", 1);
    char *a1[] = {"--pool-blocks", "128", "--grace=2.5", "--model", "/models/b", "--kv", "f16"};
    CHECK_MSG(load(&c, err, 7, a1) == 0, "%s", err);
    CHECK(c.engine.n_blocks == 128 && c.grace_seconds == 2.5 && !strcmp(c.model_dir, "/models/b") && c.weights == ENG_WEIGHTS_BF16 &&
          c.kv_f16 && c.engine.share_prefix_across_tenants);
    char *help[] = {"--pool-blocks", "1", "--help"};
    CHECK(load(&c, err, 3, help) == 1);
    clear_env();
}

static void test_bad_values_named(void) {
    clear_env();
    setenv("KVSERVE_MODEL", "/m", 1);
    srv_config c;
    char err[320];
    struct { const char *env, *val; char *argv[4]; int argc; const char *needle; } bad[] = {
        {"KVSERVE_POOL_BLOCKS", "lots", {0}, 0, "KVSERVE_POOL_BLOCKS: an integer in [1, 1.67772e+07] (got \"lots\")"},
        {"KVSERVE_GRACE_SECONDS", "-1", {0}, 0, "KVSERVE_GRACE_SECONDS: a number in [0, 3600]"},
        {"KVSERVE_WEIGHTS", "q4", {0}, 0, "KVSERVE_WEIGHTS: f32, bf16, q8_0 or q4_k (got \"q4\")"},
        {"KVSERVE_SHARE_PREFIX_ACROSS_TENANTS", "maybe", {0}, 0, "true or false"},
        {NULL, NULL, {"--pool-blocks", "1.5"}, 2, "--pool-blocks: an integer"},
        {NULL, NULL, {"--grace", "7200"}, 2, "--grace: a number in [0, 3600] (got \"7200\")"},
        {NULL, NULL, {"--nope", "1"}, 2, "unknown option \"--nope\""},
        {NULL, NULL, {"--grace"}, 1, "--grace needs a value"},
        {NULL, NULL, {"stray"}, 1, "unexpected argument \"stray\""},
        {NULL, NULL, {"--tls-cert", "a.pem"}, 2, "--tls-cert and --tls-key go together"},
        {NULL, NULL, {"--batch-max", "64", "--batch-queue", "8"}, 4, "--batch-max <= --batch-queue"},
        {NULL, NULL, {"--listen", ""}, 2, "--listen / KVSERVE_LISTEN"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        if (bad[i].env) setenv(bad[i].env, bad[i].val, 1);
        int rc = load(&c, err, bad[i].argc, bad[i].argv);
        CHECK_MSG(rc == -1 && strstr(err, bad[i].needle), "case %zu: rc %d, '%s'", i, rc, err);
        if (bad[i].env) unsetenv(bad[i].env);
    }
    clear_env();
}

int main(int argc, char **argv) {
    static const test_case tests[] = {
        {"defaults_then_environment_then_flags", test_defaults_env_then_flags},
        {"bad_values_named_with_their_range", test_bad_values_named},
        {0, 0}};
    return run_tests(tests, argc, argv);
}
