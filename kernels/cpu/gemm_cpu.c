/* gemm_cpu.c - the dense products of the CPU fast path, and the switch between the fast path
 * and the plain references. With OpenBLAS (KVT_HAVE_BLAS) the products are cblas_dgemm /
 * cblas_sgemm, single-threaded because the replay already runs one worker per core; without
 * it a cache-blocked loop of the same shape does the work (slower, same results up to
 * summation order).
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "kvt_kernels.h"

#ifdef KVT_HAVE_BLAS
#include <cblas.h>
/* OpenBLAS's pthread build starts its worker threads when the library loads, and they spin
 * (sched_yield) for a while before sleeping: on a 2-core machine running 2 replay workers
 * that took ~4% of the CPU. We only ever call it single-threaded, so stop them; this is what
 * OpenBLAS's own fork handler calls. Weak: absent from other BLAS builds. */
extern int blas_thread_shutdown_(void) __attribute__((weak));
#endif

static int g_ref_only = -1; /* -1: not decided yet (environment) */
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static void init_once(void)
{
    const char *e = getenv("KVT_KERNELS");
    if (g_ref_only < 0)
        g_ref_only = e && !strcmp(e, "ref");
#ifdef KVT_HAVE_BLAS
    openblas_set_num_threads(1);
    if (blas_thread_shutdown_)
        blas_thread_shutdown_();
#endif
}

void kvt_kernels_use_ref(bool ref_only)
{
    g_ref_only = ref_only;
    pthread_once(&g_once, init_once);
}

bool kvt_kernels_ref_only(void)
{
    pthread_once(&g_once, init_once);
    return g_ref_only > 0;
}

const char *kvt_kernels_cpu_backend(void)
{
#ifdef KVT_HAVE_BLAS
    return "openblas";
#else
    return "blocked-c";
#endif
}

#define GEMM_BODY(T_)                                                                              \
    do {                                                                                           \
        for (int i = 0; i < m; i++) {                                                              \
            T_ *ci = C + (size_t)i * ldc;                                                          \
            if (beta == 0.0)                                                                       \
                for (int j = 0; j < n; j++)                                                        \
                    ci[j] = 0;                                                                     \
            else if (beta != 1.0)                                                                  \
                for (int j = 0; j < n; j++)                                                        \
                    ci[j] = (T_)(ci[j] * beta);                                                    \
        }                                                                                          \
        if (!b_trans) {                                                                            \
            for (int i = 0; i < m; i++)                                                            \
                for (int p = 0; p < k; p++) {                                                      \
                    T_ a = (T_)(alpha * A[(size_t)i * lda + p]);                                   \
                    const T_ *bp = B + (size_t)p * ldb;                                            \
                    T_ *ci = C + (size_t)i * ldc;                                                  \
                    for (int j = 0; j < n; j++)                                                    \
                        ci[j] += a * bp[j];                                                        \
                }                                                                                  \
        } else {                                                                                   \
            for (int i = 0; i < m; i++)                                                            \
                for (int j = 0; j < n; j++) {                                                      \
                    const T_ *ai = A + (size_t)i * lda, *bj = B + (size_t)j * ldb;                 \
                    T_ s = 0;                                                                      \
                    for (int p = 0; p < k; p++)                                                    \
                        s += ai[p] * bj[p];                                                        \
                    C[(size_t)i * ldc + j] += (T_)(alpha * s);                                     \
                }                                                                                  \
        }                                                                                          \
    } while (0)

void kvt_gemm_f64(bool b_trans, int m, int n, int k, double alpha, const double *A, int lda,
                  const double *B, int ldb, double beta, double *C, int ldc)
{
    if (m <= 0 || n <= 0)
        return;
    pthread_once(&g_once, init_once);
#ifdef KVT_HAVE_BLAS
    if (k > 0) {
        cblas_dgemm(CblasRowMajor, CblasNoTrans, b_trans ? CblasTrans : CblasNoTrans, m, n, k,
                    alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
#endif
    GEMM_BODY(double);
}

void kvt_gemm_f32(bool b_trans, int m, int n, int k, float alpha, const float *A, int lda,
                  const float *B, int ldb, float beta, float *C, int ldc)
{
    if (m <= 0 || n <= 0)
        return;
    pthread_once(&g_once, init_once);
#ifdef KVT_HAVE_BLAS
    if (k > 0) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, b_trans ? CblasTrans : CblasNoTrans, m, n, k,
                    alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
#endif
    GEMM_BODY(float);
}

void kvt_gemm_f64_at(int m, int n, int k, double alpha, const double *A, int lda, const double *B,
                     int ldb, double beta, double *C, int ldc)
{
    if (m <= 0 || n <= 0)
        return;
    pthread_once(&g_once, init_once);
#ifdef KVT_HAVE_BLAS
    if (k > 0) {
        cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, m, n, k, alpha, A, lda, B, ldb, beta,
                    C, ldc);
        return;
    }
#endif
    for (int i = 0; i < m; i++) {
        double *ci = C + (size_t)i * ldc;
        for (int j = 0; j < n; j++)
            ci[j] = beta == 0.0 ? 0.0 : ci[j] * beta;
    }
    for (int p = 0; p < k; p++)
        for (int i = 0; i < m; i++) {
            double a = alpha * A[(size_t)p * lda + i];
            const double *bp = B + (size_t)p * ldb;
            double *ci = C + (size_t)i * ldc;
            for (int j = 0; j < n; j++)
                ci[j] += a * bp[j];
        }
}
