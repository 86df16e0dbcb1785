/* test_descindex.c — the reflection index over the server's embedded
 * descriptor set (server/descindex.c), without gRPC: every service, method,
 * message (nested ones too) and enum is found in its file, imports close
 * transitively, and malformed bytes are refused rather than misread. */
#include "descindex.h"
#include "test.h"

#include <string.h>

extern const unsigned char kvserve_descriptor_set[];
extern const size_t kvserve_descriptor_set_len;

static srv__desc_index *open_set(void) {
    srv__desc_index *x = NULL;
    CHECK(srv__desc_open(&x, kvserve_descriptor_set, kvserve_descriptor_set_len) == 0);
    return x;
}

static void test_symbols_in_their_files(void) {
    srv__desc_index *x = open_set();
    if (!x) return;
    CHECK(srv__desc_count(x) >= 4);
    int kv = srv__desc_by_name(x, "kvserve/v1/kvserve.proto"), health = srv__desc_by_name(x, "grpc/health/v1/health.proto");
    CHECK(kv >= 0 && health >= 0 && kv != health);
    static const char *in_kv[] = {"kvserve.v1.Generation", "kvserve.v1.Generation.Stream", "kvserve.v1.Agents.ImportAgent",
                                  "kvserve.v1.Cache.RagLookup", "kvserve.v1.GenerateRequest", "kvserve.v1.ChatMessage",
                                  "kvserve.v1.Usage", "kvserve.v1.FinishReason", "kvserve.v1.CachePolicy.Mode"};
    for (size_t i = 0; i < sizeof in_kv / sizeof *in_kv; i++)
        CHECK_MSG(srv__desc_by_symbol(x, in_kv[i]) == kv, "%s", in_kv[i]);
    CHECK(srv__desc_by_symbol(x, "grpc.health.v1.Health.Watch") == health);
    CHECK(srv__desc_by_symbol(x, "grpc.reflection.v1.ServerReflection") >= 0);
    CHECK(srv__desc_by_symbol(x, "grpc.reflection.v1alpha.ServerReflection") >= 0);
    static const char *absent[] = {"kvserve.v1", "kvserve.v1.Nope", "Generation", "kvserve.v1.Generation.", ""};
    for (size_t i = 0; i < sizeof absent / sizeof *absent; i++)
        CHECK_MSG(srv__desc_by_symbol(x, absent[i]) < 0, "%s", absent[i]);
    CHECK(srv__desc_by_name(x, "nope.proto") < 0 && srv__desc_by_name(x, NULL) < 0);
    srv__desc_close(x);
}

static void test_closure(void) {
    srv__desc_index *x = open_set();
    if (!x) return;
    const uint8_t *data[16];
    size_t len[16];
    for (int i = 0; i < srv__desc_count(x); i++) {
        size_t n = srv__desc_closure(x, i, data, len, 16);
        CHECK(n >= 1 && n <= (size_t)srv__desc_count(x) && len[0] > 0);
        for (size_t a = 0; a < n && n <= 16; a++) /* each once */
            for (size_t b = a + 1; b < n; b++) CHECK(data[a] != data[b]);
    }
    CHECK(srv__desc_closure(x, -1, data, len, 16) == 0 && srv__desc_closure(x, 999, data, len, 16) == 0);
    srv__desc_close(x);
}

static void test_malformed_refused(void) {
    srv__desc_index *x = NULL;
    static const uint8_t bad[][4] = {{0x0a, 0x05, 0x01, 0x02}, /* a file longer than the bytes */
                                     {0x0a, 0xff, 0xff, 0xff}, /* an unterminated length */
                                     {0x0f, 0x00, 0x00, 0x00}};  /* wire type 7 */
    for (size_t i = 0; i < 3; i++) {
        CHECK_MSG(srv__desc_open(&x, bad[i], sizeof bad[i]) == -1 && !x, "case %zu", i);
    }
    /* every truncation of the real set is refused or indexes a prefix of it, never read past its end */
    for (size_t cut = 0; cut < kvserve_descriptor_set_len; cut += 97) {
        if (srv__desc_open(&x, kvserve_descriptor_set, cut) == 0) srv__desc_close(x);
        x = NULL;
    }
    CHECK(srv__desc_open(&x, kvserve_descriptor_set, 0) == 0 && srv__desc_count(x) == 0);
    srv__desc_close(x);
}

int main(int argc, char **argv) {
    static const test_case tests[] = {
        {"symbols_found_in_their_files", test_symbols_in_their_files},
        {"imports_close_each_file_once", test_closure},
        {"malformed_sets_refused", test_malformed_refused},
        {0, 0}};
    return run_tests(tests, argc, argv);
}
