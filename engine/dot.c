/* dot.c — eng_dot_rows, the RAG cache's similarity scan: one dot product
 * per row of a matrix, bound by reading it. */
#include "internal.h"

#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

/* Vectorised for the best instruction set the CPU has (GCC function
 * multi-versioning), not for the build machine's. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define HOT __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define HOT
#endif

/* eng_dot_rows: slices of rows on a pool of its own (one thread per CPU,
 * made on first use). Bound by reading m; a plain loop the compiler
 * vectorises (OpenBLAS sgemv called from several threads at once would
 * serialise on its own lock, and in kvserve runs single-threaded). */
static eng__pool *dot_pool;
static pthread_once_t dot_once = PTHREAD_ONCE_INIT;
static void dot_pool_init(void) {
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    dot_pool = eng__pool_new(cpus < 1 ? 1 : cpus > 16 ? 16 : (int)cpus);
}

typedef struct {
    const float *m, *q;
    float *out;
    size_t n, dim, per;
} dot_job;

HOT static void dot_task(void *ctx, int task, int thread) {
    (void)thread;
    const dot_job *j = ctx;
    size_t r0 = (size_t)task * j->per, r1 = r0 + j->per < j->n ? r0 + j->per : j->n, dim = j->dim;
    const float *restrict q = j->q;
    for (size_t r = r0; r < r1; r++) {
        const float *restrict row = j->m + r * dim;
        float acc[16] = {0}, s = 0; /* 16 partial sums: one vector */
        size_t k = 0;
        for (; k + 16 <= dim; k += 16)
            for (int l = 0; l < 16; l++) acc[l] += row[k + l] * q[k + l];
        for (; k < dim; k++) s += row[k] * q[k];
        for (int l = 0; l < 16; l++) s += acc[l];
        j->out[r] = s;
    }
}

void eng_dot_rows(const float *m, size_t n, size_t dim, const float *q, float *out) {
    if (n == 0) return;
    pthread_once(&dot_once, dot_pool_init);
    dot_job j = {m, q, out, n, dim, 2048};
    /* small tables on the caller alone */
    eng__pool_run(n * dim >= (1u << 18) ? dot_pool : NULL, (int)((n + j.per - 1) / j.per), dot_task, &j);
}
