/* test_capture_colsum_gpu.c - the capture's GPU column sums (capture/colsum_cuda.cu) against
 * kvt_colsum_accumulate_ref: fixed-seed normal inputs (queries scaled x4 or x8 in some cases
 * so the softmax is peaky), T = 1, 37, 300, 1030 (not multiples of the 64-token tiles), heads
 * 1/1, 4/1, 8/2, 4/4, D = 1, 3, 64, 80, 128, 256, 512; each case as one call, as two calls
 * split at a query, and as a part [b, b + n) accumulated onto non-zero sums. Checks every
 * element within KVT_COLSUM_CUDA_RTOL, no NaN, keys after the queries untouched, guard words
 * around the sums and the workspace untouched, the same bits on a second run, bad arguments
 * refused; then times Llama-3-8B shapes (T = 8192; KVT_COLSUM_BENCH_T overrides, 0 skips).
 * Label gpu: exits 77 ("not run") without a CUDA device.
 */
#include <cuda_runtime_api.h>

#include "colsum_cuda.h"
#include "kvt_capture.h"
#include "kvt_test.h"

#define N_GUARD  16                /* guard doubles before and after each device buffer */
#define SENTINEL (-1234.567890123) /* their value: every mantissa bit busy */
/* split vs one call: the same probabilities (bit for bit: a query's row statistics do not
 * depend on how the queries are cut), only added in another grouping in f64: n rounding errors
 * of 2^-53 relative for n <= 1030 terms */
#define SPLIT_RTOL 1e-12

/* a device buffer of n doubles between two guards of SENTINEL; returns the inner pointer */
static double *guarded_dev(size_t n, const double *init)
{
    size_t tot = n + 2 * N_GUARD;
    double *h = malloc(tot * sizeof(double)), *d = NULL;
    for (size_t x = 0; x < tot; x++)
        h[x] = SENTINEL;
    if (init)
        memcpy(h + N_GUARD, init, n * sizeof(double));
    KVT_EXPECT(cudaMalloc((void **)&d, tot * sizeof(double)) == cudaSuccess);
    KVT_EXPECT(cudaMemcpy(d, h, tot * sizeof(double), cudaMemcpyHostToDevice) == cudaSuccess);
    free(h);
    return d + N_GUARD;
}

/* wait for the device, copy n doubles back (NULL: only the guards) and check the guards */
static void guarded_get(double *out, const double *d, size_t n, const char *what)
{
    size_t tot = n + 2 * N_GUARD;
    double *h = malloc(tot * sizeof(double));
    KVT_EXPECT(cudaDeviceSynchronize() == cudaSuccess);
    KVT_EXPECT(cudaMemcpy(h, d - N_GUARD, tot * sizeof(double), cudaMemcpyDeviceToHost) ==
               cudaSuccess);
    int bad = 0;
    for (size_t x = 0; x < N_GUARD; x++)
        bad += (h[x] != SENTINEL) + (h[N_GUARD + n + x] != SENTINEL);
    KVT_EXPECT_MSG(bad == 0, "%s: %d guard words overwritten", what, bad);
    if (out)
        memcpy(out, h + N_GUARD, n * sizeof(double));
    free(h);
}

static void guarded_free(double *d)
{
    if (d)
        cudaFree(d - N_GUARD);
}

static float *to_dev(const float *h, size_t n)
{
    float *d = NULL;
    KVT_EXPECT(cudaMalloc((void **)&d, n * sizeof(float) + 4) == cudaSuccess);
    if (n)
        KVT_EXPECT(cudaMemcpy(d, h, n * sizeof(float), cudaMemcpyHostToDevice) == cudaSuccess);
    return d;
}

/* queries [begin, begin + n) of q [Hq, T, D] as [Hq, n, D] (caller frees) */
static float *q_rows(const float *q, int Hq, uint32_t T, int D, uint32_t begin, uint32_t n)
{
    float *s = malloc((size_t)Hq * n * (size_t)D * sizeof(float) + 4);
    for (int h = 0; h < Hq; h++)
        memcpy(s + (size_t)h * n * (size_t)D, q + ((size_t)h * T + begin) * (size_t)D,
               (size_t)n * (size_t)D * sizeof(float));
    return s;
}

/* Compare got with want elementwise (|d| <= atol + rtol |want|, no NaN); print the worst
 * errors; returns mismatches (the first 10 printed with their head and key). */
static int cmp_sums(const char *what, const double *want, const double *got, int Hq, uint32_t T,
                    double rtol, double atol)
{
    int bad = 0;
    double max_abs = 0.0, max_rel = 0.0;
    for (size_t x = 0; x < (size_t)Hq * T; x++) {
        double d = fabs(got[x] - want[x]);
        bool ok = !isnan(got[x]) && !isnan(want[x]) && d <= atol + rtol * fabs(want[x]);
        if (d > max_abs)
            max_abs = d;
        if (want[x] != 0.0 && d / fabs(want[x]) > max_rel)
            max_rel = d / fabs(want[x]);
        if (!ok && bad++ < 10)
            fprintf(stderr, "  %s: h %zu key %zu: want %.17g got %.17g\n", what, x / T, x % T,
                    want[x], got[x]);
    }
    printf("  %-16s max abs err %.3g, max rel err %.3g (rtol %g)%s\n", what, max_abs, max_rel, rtol,
           bad ? " MISMATCH" : "");
    return bad;
}

/* One shape: q [Hq, T, D] ~ N(0, qmul^2), k [Hkv, T, D] ~ N(0, 1), scale 1/sqrt(D).
 * split: the two-call cut; [pb, pb + pn): the partial accumulation. */
static void test_case(uint32_t T, int Hq, int Hkv, int D, float qmul, uint32_t split, uint32_t pb,
                      uint32_t pn, uint64_t seed, cudaStream_t st)
{
    printf("colsum T=%u Hq=%d Hkv=%d D=%d q x%g split %u part [%u, %u) %s\n", T, Hq, Hkv, D,
           (double)qmul, split, pb, pb + pn, st ? "own stream" : "default stream");
    kvt_rng r;
    kvt_rng_seed(&r, seed);
    const size_t nq = (size_t)Hq * T * (size_t)D, nk = (size_t)Hkv * T * (size_t)D,
                 ns = (size_t)Hq * T;
    float *q = malloc(nq * sizeof(float)), *k = malloc(nk * sizeof(float));
    for (size_t x = 0; x < nq; x++)
        q[x] = (float)(kvt_rng_normal(&r) * qmul);
    for (size_t x = 0; x < nk; x++)
        k[x] = (float)kvt_rng_normal(&r);
    const float scale = (float)(1.0 / sqrt((double)D));
    float *scratch = malloc((size_t)T * sizeof(float));
    double *want = calloc(ns, sizeof(double)), *want2 = calloc(ns, sizeof(double));
    double *init = malloc(ns * sizeof(double)), *want3 = malloc(ns * sizeof(double));
    double *got = malloc(ns * sizeof(double)), *got2 = malloc(ns * sizeof(double));
    float *qa = q_rows(q, Hq, T, D, 0, split), *qb = q_rows(q, Hq, T, D, split, T - split);
    float *qp = q_rows(q, Hq, T, D, pb, pn);
    for (size_t x = 0; x < ns; x++) /* half zeros, half in [0, 1): accumulation onto both */
        init[x] = kvt_rng_uniform(&r) < 0.5 ? 0.0 : kvt_rng_uniform(&r);
    memcpy(want3, init, ns * sizeof(double));

    /* the reference: one call, two calls (the same additions in the same order: bitwise), a
     * part onto init */
    kvt_colsum_accumulate_ref(q, k, want, Hq, Hkv, 0, T, T, D, scale, scratch);
    kvt_colsum_accumulate_ref(qa, k, want2, Hq, Hkv, 0, split, T, D, scale, scratch);
    kvt_colsum_accumulate_ref(qb, k, want2, Hq, Hkv, split, T - split, T, D, scale, scratch);
    KVT_EXPECT_MSG(!memcmp(want, want2, ns * sizeof(double)), "reference split at %u", split);
    kvt_colsum_accumulate_ref(qp, k, want3, Hq, Hkv, pb, pn, T, D, scale, scratch);

    float *dq = to_dev(q, nq), *dk = to_dev(k, nk),
          *dqa = to_dev(qa, (size_t)Hq * split * (size_t)D);
    float *dqb = to_dev(qb, (size_t)Hq * (T - split) * (size_t)D),
          *dqp = to_dev(qp, (size_t)Hq * pn * (size_t)D);
    /* the workspace, also between guards (sized in doubles: 3 floats per query and head) */
    size_t n_work = (kvt_colsum_cuda_work_floats(Hq, T) + 1) / 2;
    double *dwork = guarded_dev(n_work, NULL);
    float *work = (float *)dwork;
    void *s = (void *)st;

    /* one call, twice: the same bits */
    double *dc = guarded_dev(ns, NULL), *dc2 = guarded_dev(ns, NULL);
    KVT_EXPECT(cudaMemset(dc, 0, ns * sizeof(double)) == cudaSuccess);
    KVT_EXPECT(cudaMemset(dc2, 0, ns * sizeof(double)) == cudaSuccess);
    KVT_CHECK(kvt_colsum_accumulate_cuda(dq, dk, dc, Hq, Hkv, 0, T, T, D, scale, work, s));
    KVT_CHECK(kvt_colsum_accumulate_cuda(dq, dk, dc2, Hq, Hkv, 0, T, T, D, scale, work, s));
    guarded_get(got, dc, ns, "colsum");
    guarded_get(got2, dc2, ns, "colsum (second run)");
    KVT_EXPECT_MSG(
        cmp_sums("one call", want, got, Hq, T, KVT_COLSUM_CUDA_RTOL, KVT_COLSUM_CUDA_ATOL) == 0,
        "T=%u Hq=%d Hkv=%d D=%d", T, Hq, Hkv, D);
    KVT_EXPECT_MSG(!memcmp(got, got2, ns * sizeof(double)), "second run differs");
    for (int h = 0; h < Hq; h++) { /* each query's probabilities sum to 1 (up to its sum's */
        double tot = 0.0;          /* error: ~3e-9 in the host emulation) */
        for (uint32_t j = 0; j < T; j++)
            tot += got[(size_t)h * T + j];
        KVT_EXPECT_NEAR(tot, (double)T, KVT_COLSUM_CUDA_RTOL * T);
    }

    /* two calls [0, split) and [split, T) */
    KVT_EXPECT(cudaMemset(dc2, 0, ns * sizeof(double)) == cudaSuccess);
    KVT_CHECK(kvt_colsum_accumulate_cuda(dqa, dk, dc2, Hq, Hkv, 0, split, T, D, scale, work, s));
    KVT_CHECK(
        kvt_colsum_accumulate_cuda(dqb, dk, dc2, Hq, Hkv, split, T - split, T, D, scale, work, s));
    guarded_get(got2, dc2, ns, "colsum (split)");
    KVT_EXPECT_MSG(cmp_sums("split vs ref", want2, got2, Hq, T, KVT_COLSUM_CUDA_RTOL,
                            KVT_COLSUM_CUDA_ATOL) == 0,
                   "split at %u", split);
    KVT_EXPECT_MSG(cmp_sums("split vs one", got, got2, Hq, T, SPLIT_RTOL, 0.0) == 0,
                   "split at %u vs one call", split);

    /* part [pb, pb + pn) onto init; keys from pb + pn on keep init's bits */
    guarded_free(dc2);
    dc2 = guarded_dev(ns, init);
    KVT_CHECK(kvt_colsum_accumulate_cuda(dqp, dk, dc2, Hq, Hkv, pb, pn, T, D, scale, work, s));
    guarded_get(got2, dc2, ns, "colsum (part)");
    KVT_EXPECT_MSG(cmp_sums("part vs ref", want3, got2, Hq, T, KVT_COLSUM_CUDA_RTOL,
                            KVT_COLSUM_CUDA_ATOL) == 0,
                   "part [%u, %u)", pb, pb + pn);
    int touched = 0;
    for (int h = 0; h < Hq; h++)
        for (uint32_t j = pb + pn; j < T; j++)
            touched += memcmp(&got2[(size_t)h * T + j], &init[(size_t)h * T + j], 8) != 0;
    KVT_EXPECT_MSG(touched == 0, "%d sums after the queries changed", touched);
    guarded_get(NULL, dwork, n_work, "work");

    cudaFree(dq), cudaFree(dk), cudaFree(dqa), cudaFree(dqb), cudaFree(dqp);
    guarded_free(dwork), guarded_free(dc), guarded_free(dc2);
    free(q), free(k), free(scratch), free(want), free(want2), free(want3), free(init);
    free(got), free(got2), free(qa), free(qb), free(qp);
}

/* bad arguments are refused before anything is enqueued; n_q == 0 does nothing */
static void test_args(void)
{
    const int Hq = 4, Hkv = 2, D = 8;
    const uint32_t T = 10;
    float *dq = NULL, *dk = NULL;
    KVT_EXPECT(cudaMalloc((void **)&dq, (size_t)Hq * T * (size_t)D * sizeof(float)) == cudaSuccess);
    KVT_EXPECT(cudaMalloc((void **)&dk, (size_t)Hkv * T * (size_t)D * sizeof(float)) ==
               cudaSuccess);
    KVT_EXPECT(cudaMemset(dq, 0, (size_t)Hq * T * (size_t)D * sizeof(float)) == cudaSuccess);
    KVT_EXPECT(cudaMemset(dk, 0, (size_t)Hkv * T * (size_t)D * sizeof(float)) == cudaSuccess);
    size_t ns = (size_t)Hq * T, n_work = (kvt_colsum_cuda_work_floats(Hq, T) + 1) / 2;
    double *zero = calloc(ns, sizeof(double)), *got = malloc(ns * sizeof(double));
    double *dc = guarded_dev(ns, zero), *dwork = guarded_dev(n_work, NULL);
    float *w = (float *)dwork;
    KVT_EXPECT_EQ_U64(kvt_colsum_cuda_work_floats(Hq, T), 3 * ns);
    KVT_EXPECT_STATUS(kvt_colsum_accumulate_cuda(dq, dk, dc, 3, 2, 0, T, T, D, 1.0f, w, NULL),
                      KVT_ERR_INVALID_ARG); /* Hq not a multiple of Hkv */
    KVT_EXPECT_STATUS(kvt_colsum_accumulate_cuda(dq, dk, dc, Hq, 0, 0, T, T, D, 1.0f, w, NULL),
                      KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_colsum_accumulate_cuda(dq, dk, dc, Hq, Hkv, 0, T, T, 0, 1.0f, w, NULL),
                      KVT_ERR_INVALID_ARG); /* D = 0 */
    KVT_EXPECT_STATUS(kvt_colsum_accumulate_cuda(dq, dk, dc, Hq, Hkv, 1, T, T, D, 1.0f, w, NULL),
                      KVT_ERR_INVALID_ARG); /* queries past the keys */
    KVT_EXPECT_STATUS(
        kvt_colsum_accumulate_cuda(dq, dk, dc, Hq, Hkv, 0xffffffffu, 2, T, D, 1.0f, w, NULL),
        KVT_ERR_INVALID_ARG); /* q_begin + n_q wraps in 32 bits */
    KVT_EXPECT_STATUS(
        kvt_colsum_accumulate_cuda(dq, dk, dc, Hq, Hkv, 0, T, T, D, 1.0f, w + 1, NULL),
        KVT_ERR_INVALID_ARG); /* misaligned workspace */
    KVT_EXPECT_STATUS(kvt_colsum_accumulate_cuda(dq, dk, NULL, Hq, Hkv, 0, T, T, D, 1.0f, w, NULL),
                      KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(
        kvt_colsum_accumulate_cuda(NULL, NULL, NULL, Hq, Hkv, 3, 0, T, D, 1.0f, NULL, NULL),
        KVT_OK); /* no queries: nothing to do, nothing read */
    KVT_EXPECT_STATUS(kvt_colsum_accumulate_cuda(dq, dk, dc, Hq, Hkv, T, 0, T, D, 1.0f, w, NULL),
                      KVT_OK);
    guarded_get(got, dc, ns, "colsum (bad arguments)");
    guarded_get(NULL, dwork, n_work, "work (bad arguments)");
    KVT_EXPECT(!memcmp(got, zero, ns * sizeof(double)));
    cudaFree(dq), cudaFree(dk);
    guarded_free(dc), guarded_free(dwork);
    free(zero), free(got);
}

/* Llama-3-8B's attention shape (Hq 32, Hkv 8) at T tokens: time one call per head dim. No
 * reference (too slow on the CPU); each head's sums must add up to T. */
static void bench(uint32_t T)
{
    const int Hq = 32, Hkv = 8, Ds[] = {64, 80, 128};
    kvt_rng r;
    kvt_rng_seed(&r, 777);
    for (size_t di = 0; di < sizeof(Ds) / sizeof(Ds[0]); di++) {
        const int D = Ds[di];
        const size_t nq = (size_t)Hq * T * (size_t)D, nk = (size_t)Hkv * T * (size_t)D,
                     ns = (size_t)Hq * T;
        float *q = malloc(nq * sizeof(float)), *k = malloc(nk * sizeof(float));
        for (size_t x = 0; x < nq; x++)
            q[x] = (float)(kvt_rng_uniform(&r) * 2.0 - 1.0) * 2.0f;
        for (size_t x = 0; x < nk; x++)
            k[x] = (float)(kvt_rng_uniform(&r) * 2.0 - 1.0) * 2.0f;
        float *dq = to_dev(q, nq), *dk = to_dev(k, nk), *dw = NULL;
        double *dc = NULL, *got = malloc(ns * sizeof(double));
        KVT_EXPECT(cudaMalloc((void **)&dw, kvt_colsum_cuda_work_floats(Hq, T) * sizeof(float)) ==
                   cudaSuccess);
        KVT_EXPECT(cudaMalloc((void **)&dc, ns * sizeof(double)) == cudaSuccess);
        const float scale = (float)(1.0 / sqrt((double)D));
        cudaEvent_t e0, e1;
        KVT_EXPECT(cudaEventCreate(&e0) == cudaSuccess && cudaEventCreate(&e1) == cudaSuccess);
        KVT_CHECK(kvt_colsum_accumulate_cuda(dq, dk, dc, Hq, Hkv, 0, T, T, D, scale, dw, NULL));
        KVT_EXPECT(cudaMemset(dc, 0, ns * sizeof(double)) == cudaSuccess); /* after a warm-up */
        KVT_EXPECT(cudaEventRecord(e0, NULL) == cudaSuccess);
        KVT_CHECK(kvt_colsum_accumulate_cuda(dq, dk, dc, Hq, Hkv, 0, T, T, D, scale, dw, NULL));
        KVT_EXPECT(cudaEventRecord(e1, NULL) == cudaSuccess);
        KVT_EXPECT(cudaEventSynchronize(e1) == cudaSuccess);
        float ms = 0.0f;
        KVT_EXPECT(cudaEventElapsedTime(&ms, e0, e1) == cudaSuccess);
        KVT_EXPECT(cudaMemcpy(got, dc, ns * sizeof(double), cudaMemcpyDeviceToHost) == cudaSuccess);
        double worst = 0.0;
        for (int h = 0; h < Hq; h++) {
            double tot = 0.0;
            for (uint32_t j = 0; j < T; j++)
                tot += got[(size_t)h * T + j];
            worst = fmax(worst, fabs(tot - T));
        }
        KVT_EXPECT_MSG(worst <= KVT_COLSUM_CUDA_RTOL * T, "bench D=%d: a head's sums miss T by %g",
                       D, worst);
        /* T^2 Hq D multiply-add pairs over the two passes (T(T+1)/2 pairs each) */
        double pairs = (double)T * (T + 1) * Hq * D;
        printf("bench T=%u Hq=%d Hkv=%d D=%d: %.2f ms, %.2f T mul-add pairs/s (f32 rate %.1f "
               "TFLOP/s without FMA); layer at T=32768 ~ %.0f ms\n",
               T, Hq, Hkv, D, ms, pairs / (ms * 1e-3) / 1e12, 2.0 * pairs / (ms * 1e-3) / 1e12,
               ms * (32768.0 / T) * (32768.0 / T));
        cudaEventDestroy(e0), cudaEventDestroy(e1);
        cudaFree(dq), cudaFree(dk), cudaFree(dw), cudaFree(dc);
        free(q), free(k), free(got);
    }
}

int main(void)
{
    int n_dev = 0;
    cudaError_t e = cudaGetDeviceCount(&n_dev);
    if (e != cudaSuccess || n_dev == 0) {
        printf("SKIP: test_capture_colsum_gpu: no CUDA device (%s): not run\n",
               e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
        return 77;
    }
    cudaStream_t st;
    KVT_EXPECT(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking) == cudaSuccess);
    /* KVT_COLSUM_MAX_T leaves out the cases with a longer prompt (compute-sanitizer's racecheck
       runs them about 1000x slower than the GPU) */
    const char *mt = getenv("KVT_COLSUM_MAX_T");
    const uint32_t max_T = mt && *mt ? (uint32_t)strtoul(mt, NULL, 10) : UINT32_MAX;
    /* every T with every head layout once, D and peakiness rotating over them */
    const uint32_t Ts[] = {1, 37, 300, 1030};
    const int heads[][2] = {{1, 1}, {4, 1}, {8, 2}, {4, 4}};
    const int Ds[] = {64, 80, 128, 3};
    uint64_t seed = 1;
    for (int ti = 0; ti < 4; ti++)
        for (int hi = 0; hi < 4; hi++) {
            const uint32_t T = Ts[ti];
            if (T > max_T)
                continue;
            const uint32_t split =
                T * 2 / 5 + 1 + (uint32_t)hi < T ? T * 2 / 5 + 1 + (uint32_t)hi : T;
            const uint32_t pb = T / 4 + 3 < T ? T / 4 + 3 : T - 1;
            const uint32_t pn = T - pb > 1 ? (T / 3 < T - pb - 1 ? T / 3 : T - pb - 1) : 1;
            test_case(T, heads[hi][0], heads[hi][1], Ds[(ti + hi) % 4], (ti + hi) % 2 ? 4.0f : 1.0f,
                      split, pb, pn, seed++, (ti + hi) % 2 ? st : NULL);
        }
    test_case(37, 4, 1, 1, 1.0f, 0, 36, 1, seed++, NULL); /* D = 1; split at 0: 0 + T */
    if (max_T >= 300) {
        test_case(300, 2, 1, 256, 1.0f, 300, 1, 298, seed++, st); /* D = 256; split at T: T + 0 */
        test_case(300, 1, 1, 512, 4.0f, 64, 64, 128, seed++,
                  NULL); /* D = 512; cuts on tile edges */
    }
    if (max_T >= 1030)
        test_case(1030, 1, 1, 128, 8.0f, 515, 640, 390, seed++, st); /* very peaky, part to T */
    test_args();
    const char *bt = getenv("KVT_COLSUM_BENCH_T");
    uint32_t T_bench = bt ? (uint32_t)strtoul(bt, NULL, 10) : 8192;
    if (T_bench)
        bench(T_bench);
    cudaStreamDestroy(st);
    return kvt_test_result("test_capture_colsum_gpu");
}
