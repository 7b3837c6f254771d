/* gemm_cpu.c - the dense products of the CPU fast path, and the switch between the fast path
 * and the plain references. With OpenBLAS (KVT_HAVE_BLAS) the products are cblas_dgemm /
 * cblas_sgemm, single-threaded because the replay already runs one worker per core; without
 * it a cache-blocked loop of the same shape does the work (slower, same results up to
 * summation order).
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#if defined(__linux__)
#include <strings.h>
#include <sys/auxv.h>
#endif

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

int kvt_blas_threads_set(int n)
{
#ifdef KVT_HAVE_BLAS
    const int prev = openblas_get_num_threads(); /* before init_once makes it 1 */
    pthread_once(&g_once, init_once);
    openblas_set_num_threads(n > 0 ? n : 1);
    return prev;
#else
    (void)n;
    pthread_once(&g_once, init_once);
    return 1;
#endif
}

const char *kvt_kernels_cpu_backend(void)
{
#ifdef KVT_HAVE_BLAS
    return "openblas";
#else
    return "blocked-c";
#endif
}

/* Set with OPENBLAS_CORETYPE by the re-execution (to the same value), so that the new process
 * can say the kernels were kvtrace's choice, not the user's. (OPENBLAS_CORETYPE alone is what
 * stops a second re-execution.) */
#define REEXEC_ENV "KVT_BLAS_REEXEC"

const char *kvt_kernels_blas_better_core(void)
{
#if defined(KVT_HAVE_BLAS) && (defined(__x86_64__) || defined(__i386__)) &&                        \
    (defined(__GNUC__) || defined(__clang__))
    const char *core = openblas_get_corename();
    /* OpenBLAS's DYNAMIC_ARCH picks its kernels by CPU model number and falls back to the
       generic Prescott (SSE3) ones on a model it does not know, whatever the CPU supports. A
       real Prescott-class CPU has no AVX2, so the test below never fires on one. The checks
       include the operating system's support of the AVX and AVX-512 register states. */
    if (!core || strcmp(core, "Prescott") != 0)
        return NULL;
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512cd"))
        return "SkylakeX";
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return "Haswell";
#endif
    return NULL;
}

void kvt_kernels_blas_reexec(char **argv)
{
#if defined(KVT_HAVE_BLAS) && defined(__linux__)
    const char *preload = getenv("LD_PRELOAD");
    /* OPENBLAS_CORETYPE set: the user's choice, or this is the re-executed process. No
       interpreter (AT_BASE 0): started as `ld.so kvtrace ...`, where /proc/self/exe is ld.so
       and would not take this argv (a static build has none either, and no re-execution:
       it links OpenBLAS with one kernel set anyway). Valgrind would not follow the exec. */
    if (!argv || !argv[0] || getenv("OPENBLAS_CORETYPE") || getauxval(AT_BASE) == 0 ||
        (preload && strstr(preload, "vgpreload")))
        return;
    const char *core = kvt_kernels_blas_better_core();
    if (!core)
        return;
    if (setenv("OPENBLAS_CORETYPE", core, 1) != 0 || setenv(REEXEC_ENV, core, 1) != 0)
        goto restore;
    execv("/proc/self/exe", argv); /* returns only on failure: go on with the generic kernels */
restore:
    unsetenv("OPENBLAS_CORETYPE");
    unsetenv(REEXEC_ENV);
#else
    (void)argv;
#endif
}

size_t kvt_kernels_cpu_describe(char *buf, size_t cap)
{
    if (kvt_kernels_ref_only()) { /* KVT_KERNELS=ref: no dense product runs in a library */
        int n = snprintf(buf, cap, "the plain reference loops (KVT_KERNELS=ref)");
        return n < 0 ? 0 : (size_t)n;
    }
#ifdef KVT_HAVE_BLAS
    const char *core = openblas_get_corename(), *set = getenv("OPENBLAS_CORETYPE");
    const char *mine = getenv(REEXEC_ENV), *better = kvt_kernels_blas_better_core();
    const char *config = openblas_get_config(); /* "OpenBLAS 0.3.21 DYNAMIC_ARCH ..." */
    int vlen = 0;
    if (config && !strncmp(config, "OpenBLAS ", 9))
        vlen = (int)strcspn(config + 9, " ");
    char why[160] = "";
    if (mine && set && !strcmp(mine, set))
        snprintf(why, sizeof(why), " (chosen by kvtrace: OpenBLAS did not recognise this CPU)");
    else if (set && core && !strcasecmp(set, core))
        snprintf(why, sizeof(why), " (set by OPENBLAS_CORETYPE)");
    else if (set) /* a name OpenBLAS does not know: it picked something else */
        snprintf(why, sizeof(why), " (OPENBLAS_CORETYPE=%.40s is not a kernel set OpenBLAS knows)",
                 set);
    else if (better)
        snprintf(why, sizeof(why), " (OpenBLAS's generic kernels: it did not recognise this CPU)");
    int n = snprintf(buf, cap, "OpenBLAS %.*s, %s kernels%s", vlen, config ? config + 9 : "",
                     core ? core : "unknown", why);
#else
    int n = snprintf(buf, cap, "plain C loops (built without OpenBLAS)");
#endif
    return n < 0 ? 0 : (size_t)n;
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
