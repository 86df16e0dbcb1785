/* dot.c — kvc__dot_rows, the RAG cache's similarity scan: one dot product
 * per row of a matrix, bound by reading it. */
#include "kvc_internal.h"

#include <pthread.h>
#include <unistd.h>

/* Vectorised for the best instruction set the CPU has (GCC function
 * multi-versioning), not for the build machine's. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define HOT __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define HOT
#endif

#define SLICE 2048       /* rows per task */
#define MAX_THREADS 16

typedef struct {
    const float *m, *q;
    float *out;
    size_t n, dim;
    size_t next;         /* next slice to take (under mu) */
    pthread_mutex_t mu;
} dot_job;

/* Rows [r0, r1): 16 partial sums (one vector) per row, then the tail. */
HOT static void dot_slice(const dot_job *j, size_t r0, size_t r1) {
    const size_t dim = j->dim;
    const float *restrict q = j->q;
    for (size_t r = r0; r < r1; r++) {
        const float *restrict row = j->m + r * dim;
        float acc[16] = {0}, s = 0;
        size_t k = 0;
        for (; k + 16 <= dim; k += 16)
            for (int l = 0; l < 16; l++) acc[l] += row[k + l] * q[k + l];
        for (; k < dim; k++) s += row[k] * q[k];
        for (int l = 0; l < 16; l++) s += acc[l];
        j->out[r] = s;
    }
}

/* Take slices until none is left. */
static void *dot_worker(void *p) {
    dot_job *j = p;
    for (;;) {
        pthread_mutex_lock(&j->mu);
        size_t r0 = j->next;
        j->next += SLICE;
        pthread_mutex_unlock(&j->mu);
        if (r0 >= j->n) return NULL;
        dot_slice(j, r0, r0 + SLICE < j->n ? r0 + SLICE : j->n);
    }
}

/* Small tables on the caller alone; big ones (a megabyte and more, where
 * starting threads costs a few percent of the scan) in slices on up to one
 * thread per CPU, the caller being one of them. (OpenBLAS sgemv called from
 * several threads at once would serialise on its own lock.) */
void kvc__dot_rows(const float *m, size_t n, size_t dim, const float *q, float *out) {
    if (n == 0) return;
    dot_job j = {m, q, out, n, dim, 0, PTHREAD_MUTEX_INITIALIZER};
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    size_t slices = (n + SLICE - 1) / SLICE, want = n * dim >= (1u << 18) ? (size_t)(cpus > 1 ? cpus : 1) : 1;
    if (want > slices) want = slices;
    if (want > MAX_THREADS) want = MAX_THREADS;
    pthread_t thr[MAX_THREADS];
    size_t started = 0;
    while (started + 1 < want && pthread_create(&thr[started], NULL, dot_worker, &j) == 0) started++;
    dot_worker(&j); /* (if no thread starts, the caller does it all) */
    for (size_t i = 0; i < started; i++) pthread_join(thr[i], NULL);
    pthread_mutex_destroy(&j.mu);
}
