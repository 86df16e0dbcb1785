/* blas.c — every call into OpenBLAS: the products the engine hands it, its
 * threads, and making it use its AVX-512 kernels where it would not.
 *
 * OpenBLAS (0.3.21 in Debian 12) chooses its kernels when the library loads:
 * from OPENBLAS_CORETYPE if set, else from the CPU models it knows. On CPUs
 * newer than it (AMD Zen 5, for one), or with OPENBLAS_CORETYPE naming an
 * older core, it runs its AVX2 kernels on a CPU that has AVX-512 (1024³
 * sgemm ~1.7x slower). So at the start of main, with KVSERVE_BLAS_CORE=auto
 * (the default): if the CPU has the AVX-512 subsets OpenBLAS's SkylakeX
 * kernels need and OpenBLAS runs other kernels, kvserve sets
 * OPENBLAS_CORETYPE=SkylakeX and executes itself again. KVSERVE_BLAS_CORE=keep
 * leaves OpenBLAS alone; KVSERVE_BLAS_CORE=NAME forces OpenBLAS core NAME.
 * The second run sees KVSERVE_BLAS_CORE=keep, so it never loops. */
#include "internal.h"

#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

char *openblas_get_corename(void);

static int has_avx512(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
    return 0;
#endif
}

const char *eng__blas_better_core(const char *current, int avx512) {
    static const char *const AVX512_CORES[] = {"skylakex", "cooperlake", "sapphirerapids"};
    if (!avx512 || !current) return NULL;
    for (size_t i = 0; i < sizeof AVX512_CORES / sizeof *AVX512_CORES; i++)
        if (!strcasecmp(current, AVX512_CORES[i])) return NULL;
    return "SkylakeX";
}

const char *eng_blas_core(void) { return openblas_get_corename(); }

static char previous[64]; /* what OpenBLAS ran before we re-executed, for the log */

const char *eng_blas_note(void) {
    const char *p = getenv("KVSERVE_BLAS_PREVIOUS");
    if (p && *p && strcasecmp(p, openblas_get_corename())) {
        snprintf(previous, sizeof previous, "%s", p);
        return previous;
    }
    return NULL;
}

void eng_blas_select(char **argv) {
    const char *want = getenv("KVSERVE_BLAS_CORE");
    if (want && !strcmp(want, "keep")) return;
    const char *cur = openblas_get_corename();
    const char *better = want && *want && strcmp(want, "auto") ? (strcasecmp(want, cur) ? want : NULL)
                                                               : eng__blas_better_core(cur, has_avx512());
    if (!better) return;
    setenv("KVSERVE_BLAS_PREVIOUS", cur, 1);
    setenv("OPENBLAS_CORETYPE", better, 1);
    setenv("KVSERVE_BLAS_CORE", "keep", 1);
    execv("/proc/self/exe", argv);
    /* exec failed: carry on with the kernels we have */
}

/* C[m][n] = alpha * A[m][k] · op(B) (+ 0 · C), row-major; op(B) = Bᵀ with
 * B [n][k] when b_trans, else B [k][n]. */
void eng__sgemm(int b_trans, int m, int n, int k, float alpha, const float *A, int lda, const float *B, int ldb,
                float *C, int ldc) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, b_trans ? CblasTrans : CblasNoTrans, m, n, k, alpha, A, lda, B, ldb, 0.0f,
                C, ldc);
}

int eng__blas_threads(int n) {
    int was = openblas_get_num_threads();
    if (n > 0) openblas_set_num_threads(n);
    return was;
}
