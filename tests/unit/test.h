/* test.h — a minimal test harness: TEST(name) functions registered in a
 * list, CHECK() records failures with file:line, main() runs them all and
 * prints "N passed, M failed". */
#ifndef KVSERVE_TEST_H
#define KVSERVE_TEST_H
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef void (*test_fn)(void);
static int t_failed_checks;
static const char *t_arg; /* first command-line argument (e.g. a models dir) */

#define CHECK(cond)                                                            \
    do {                                                                       \
        if (!(cond)) {                                                         \
            fprintf(stderr, "  %s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
            t_failed_checks++;                                                 \
        }                                                                      \
    } while (0)
#define CHECK_MSG(cond, ...)                                                   \
    do {                                                                       \
        if (!(cond)) {                                                         \
            fprintf(stderr, "  %s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                      \
            fputc('\n', stderr);                                               \
            t_failed_checks++;                                                 \
        }                                                                      \
    } while (0)

typedef struct { const char *name; test_fn fn; } test_case;

static int run_tests(const test_case *tests, int argc, char **argv) {
    int passed = 0, failed = 0;
    t_arg = argc > 1 ? argv[1] : NULL;
    const char *only = getenv("TEST_ONLY");
    for (const test_case *t = tests; t->name; t++) {
        if (only && !strstr(t->name, only)) continue;
        int before = t_failed_checks;
        t->fn();
        if (t_failed_checks == before) { passed++; printf("ok   %s\n", t->name); }
        else { failed++; printf("FAIL %s\n", t->name); }
        fflush(stdout);
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
#endif
