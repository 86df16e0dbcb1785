/* bench_util.h — what the C benchmarks share: a monotonic clock,
 * nearest-rank percentiles, random token ids. Header-only. */
#ifndef KVSERVE_BENCH_UTIL_H
#define KVSERVE_BENCH_UTIL_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

static inline int bench_cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* nearest-rank percentile (p in (0,100]) of n values; sorts x in place */
static inline double percentile(double *x, int n, double p) {
    qsort(x, (size_t)n, sizeof *x, bench_cmp_double);
    int k = (int)ceil(p / 100.0 * n) - 1;
    if (k < 0) k = 0;
    if (k >= n) k = n - 1;
    return x[k];
}

static inline double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static inline void fill_random(int32_t *ids, size_t n, int vocab, uint64_t *x) {
    for (size_t i = 0; i < n; i++) {
        *x ^= *x << 13; *x ^= *x >> 7; *x ^= *x << 17;
        ids[i] = (int32_t)(*x % (uint64_t)vocab);
    }
}

#endif
