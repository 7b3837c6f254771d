/* scores_cuda.cu - the scores policies rank by: SnapKV window scores (kvt_col_mean_ref over the
 * last W window queries, kvt_gqa_reduce_ref, kvt_pool1d_ref: one thread per output, summing in
 * the references' order, so the scores are bitwise theirs) and H2O column sums
 * (kvt_attn_colsum_ref: a block per query finds its max and exponential sum, then one thread per
 * key adds that key's f32 probability over the queries that see it, in query order; nothing
 * T x T is stored).
 */
#include <math.h>

#include "cuda_util.cuh"

#define CS_THREADS 256

/* a[h][j] = mean over window rows Wt-W..Wt-1 of prw[h] (row length T), j < P */
static __global__ void col_mean_k(const float *prw, int Hq, int Wt, int W, int T, int P, double *a)
{
    size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (size_t)Hq * P)
        return;
    int h = (int)(t / P), j = (int)(t % P);
    const float *x = prw + ((size_t)h * Wt + (Wt - W)) * T;
    double s = 0.0;
    for (int r = 0; r < W; r++)
        s = __dadd_rn(s, (double)x[(size_t)r * T + j]);
    a[t] = W > 0 ? s / W : s;
}

static __global__ void gqa_k(const double *a, int Hq, int Hkv, int P, int op, double *out)
{
    size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (size_t)Hkv * P)
        return;
    int g = (int)(t / P), j = (int)(t % P), G = Hq / Hkv;
    double acc = op == KVT_REDUCE_MAX ? -INFINITY : 0.0;
    for (int u = 0; u < G; u++) {
        double x = a[(size_t)(g * G + u) * P + j];
        acc = op == KVT_REDUCE_MAX ? (x > acc ? x : acc) : __dadd_rn(acc, x);
    }
    out[t] = op == KVT_REDUCE_MEAN ? acc / G : acc;
}

static __global__ void pool_k(const double *s, int H, int P, int k, int op, double *out)
{
    size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (size_t)H * P)
        return;
    int row = (int)(t / P), j = (int)(t % P), hk = k / 2;
    const double *x = s + (size_t)row * P;
    double acc = op == KVT_POOL_MAX ? -INFINITY : 0.0;
    for (int u = j - hk; u <= j + hk; u++) {
        if (u < 0 || u >= P)
            continue;
        acc = op == KVT_POOL_MAX ? (x[u] > acc ? x[u] : acc) : __dadd_rn(acc, x[u]);
    }
    out[t] = op == KVT_POOL_AVG ? acc / k : acc;
}

extern "C" kvt_status kvt_window_scores_cuda(const float *prw, int Hq, int Hkv, int Wt, int W,
                                             int T, int kernel, kvt_pool pool, kvt_reduce reduce,
                                             bool per_query, double *work, double *out,
                                             void *stream)
{
    KVT_RETURN_IF(Hq < 1 || Hkv < 1 || Hq % Hkv || W < 1 || W > Wt || W > T, KVT_ERR_INVALID_ARG,
                  "window_scores_cuda: bad shape Hq=%d Hkv=%d Wt=%d W=%d T=%d", Hq, Hkv, Wt, W, T);
    KVT_RETURN_IF(kernel < 1 || kernel % 2 == 0, KVT_ERR_INVALID_ARG,
                  "pool1d: kernel size %d must be odd and >= 1", kernel);
    KVT_RETURN_IF(pool != KVT_POOL_AVG && pool != KVT_POOL_MAX, KVT_ERR_INVALID_ARG,
                  "pool1d: bad op %d", (int)pool);
    KVT_RETURN_IF(reduce != KVT_REDUCE_MEAN && reduce != KVT_REDUCE_MAX && reduce != KVT_REDUCE_SUM,
                  KVT_ERR_INVALID_ARG, "gqa_reduce: bad op %d", (int)reduce);
    const int P = T - W, H = per_query ? Hq : Hkv;
    if (P == 0)
        return KVT_OK;
    cudaStream_t st = kvt_cu_stream(stream);
    double *a = work, *red = work + (size_t)Hq * P; /* work: (Hq + Hkv) * P doubles */
    col_mean_k<<<kvt_cu_blocks((size_t)Hq * P, 256), 256, 0, st>>>(prw, Hq, Wt, W, T, P, a);
    KVT_CU_LAUNCHED();
    if (!per_query) {
        gqa_k<<<kvt_cu_blocks((size_t)Hkv * P, 256), 256, 0, st>>>(a, Hq, Hkv, P, (int)reduce, red);
        KVT_CU_LAUNCHED();
    }
    pool_k<<<kvt_cu_blocks((size_t)H * P, 256), 256, 0, st>>>(per_query ? a : red, H, P, kernel,
                                                              (int)pool, out);
    KVT_CU_LAUNCHED();
    return KVT_OK;
}

/* per query i: m[i] = max over keys j <= i of the scaled logit, s[i] = sum of exp(z - m) */
static __global__ void row_stats_k(const float *q, const float *k, int T, int D, double scale,
                                   double *m_out, double *s_out, unsigned long long *bad)
{
    __shared__ double sh[CS_THREADS / 32 + 1];
    const int i = blockIdx.x;
    const float *qi = q + (size_t)i * D;
    double m = -INFINITY;
    for (int j = threadIdx.x; j <= i; j += CS_THREADS) {
        double z = __dmul_rn(kvt_cu_dot_f32(qi, k + (size_t)j * D, D), scale);
        if (!isfinite(z))
            atomicMin(bad, ((unsigned long long)i << 32) | (unsigned)j);
        m = z > m ? z : m;
    }
    m = kvt_cu_block_reduce<CS_THREADS, true>(m, sh);
    double s = 0.0;
    for (int j = threadIdx.x; j <= i; j += CS_THREADS)
        s += exp(__dsub_rn(__dmul_rn(kvt_cu_dot_f32(qi, k + (size_t)j * D, D), scale), m));
    s = kvt_cu_block_reduce<CS_THREADS, false>(s, sh);
    if (threadIdx.x == 0) {
        m_out[i] = m;
        s_out[i] = s;
    }
}

/* colsum[j] = sum over queries i >= j, in order, of the f32 probability of key j */
static __global__ void colsum_k(const float *q, const float *k, int T, int D, double scale,
                                const double *m, const double *s, double *colsum)
{
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= T)
        return;
    const float *kj = k + (size_t)j * D;
    double c = 0.0;
    for (int i = j; i < T; i++) {
        double e = exp(__dsub_rn(__dmul_rn(kvt_cu_dot_f32(q + (size_t)i * D, kj, D), scale), m[i]));
        c = __dadd_rn(c, (double)(float)(e / s[i]));
    }
    colsum[j] = c;
}

extern "C" kvt_status kvt_attn_colsum_cuda(const float *q, const float *k, int T, int D,
                                           double scale, double *work, double *colsum, void *stream)
{
    KVT_RETURN_IF(T < 0 || D <= 0, KVT_ERR_INVALID_ARG, "attn_colsum: bad shape T=%d D=%d", T, D);
    if (T == 0)
        return KVT_OK;
    cudaStream_t st = kvt_cu_stream(stream);
    unsigned long long *dbad = NULL, bad = ~0ull;
    KVT_CU(cudaMallocAsync((void **)&dbad, sizeof(bad), st)); /* stream-ordered: see attn */
    cudaError_t e = cudaMemcpyAsync(dbad, &bad, sizeof(bad), cudaMemcpyHostToDevice, st);
    if (e == cudaSuccess) {
        row_stats_k<<<T, CS_THREADS, 0, st>>>(q, k, T, D, scale, work, work + T, dbad);
        e = cudaGetLastError();
    }
    if (e == cudaSuccess)
        e = cudaMemcpyAsync(&bad, dbad, sizeof(bad), cudaMemcpyDeviceToHost, st);
    if (e == cudaSuccess)
        e = cudaStreamSynchronize(st);
    cudaFreeAsync(dbad, st);
    KVT_RETURN_IF(e != cudaSuccess, KVT_ERR_CUDA, "attn_colsum_cuda: %s", cudaGetErrorString(e));
    if (bad != ~0ull)
        return kvt_error_set(KVT_ERR_NAN, "attn_colsum: logit (%d,%u) not finite", (int)(bad >> 32),
                             (unsigned)(bad & 0xffffffffu));
    colsum_k<<<kvt_cu_blocks((size_t)T, 128), 128, 0, st>>>(q, k, T, D, scale, work, work + T,
                                                            colsum);
    KVT_CU_LAUNCHED();
    return KVT_OK;
}
