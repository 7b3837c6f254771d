/* attn_cuda.cu - window/decode attention (kvt_attn_probs_ref, kvt_attn_output_ref): one block
 * per query row. Logits are dot products of f32 vectors summed in double in d order without
 * fused multiply-adds (bitwise the reference's), recomputed in each of three passes (max,
 * exponential sum, probabilities) rather than stored, so no T-long scratch exists; the block
 * reductions change only the summation order of the exponentials. Outputs: one thread per
 * (query, dimension), summing over keys in order as the reference does.
 */
#include <math.h>

#include "cuda_util.cuh"

#define ATTN_THREADS 256

/* the scaled logit of query a and key b, rounded as the reference's */
static __device__ double logit(const float *a, const float *b, int D, double scale)
{
    return __dmul_rn(kvt_cu_dot_f32(a, b, D), scale);
}

/* bad: the first non-finite logit as (query << 32 | key), key >= 2^31 for block 2 */
static __global__ void probs_k(const float *q, int D, const float *k, int T, const int *n_vis,
                               const float *k2, int n2, const int *n_vis2, double scale, float *pr,
                               float *pr2, double *lse, unsigned long long *bad)
{
    __shared__ double sh[ATTN_THREADS / 32 + 1];
    const int i = blockIdx.x;
    const float *qi = q + (size_t)i * D;
    const int nv = n_vis[i], nv2 = k2 ? n_vis2[i] : 0;
    double m = -INFINITY;
    for (int j = threadIdx.x; j < nv + nv2; j += ATTN_THREADS) {
        double z = j < nv ? logit(qi, k + (size_t)j * D, D, scale)
                          : logit(qi, k2 + (size_t)(j - nv) * D, D, scale);
        if (!isfinite(z))
            atomicMin(bad, ((unsigned long long)i << 32) |
                               (j < nv ? (unsigned)j : 0x80000000u | (unsigned)(j - nv)));
        m = z > m ? z : m;
    }
    m = kvt_cu_block_reduce<ATTN_THREADS, true>(m, sh);
    double s = 0.0;
    for (int j = threadIdx.x; j < nv + nv2; j += ATTN_THREADS)
        s += exp(__dsub_rn(j < nv ? logit(qi, k + (size_t)j * D, D, scale)
                                  : logit(qi, k2 + (size_t)(j - nv) * D, D, scale),
                           m));
    s = kvt_cu_block_reduce<ATTN_THREADS, false>(s, sh);
    for (int j = threadIdx.x; j < T; j += ATTN_THREADS)
        pr[(size_t)i * T + j] =
            j < nv ? (float)(exp(__dsub_rn(logit(qi, k + (size_t)j * D, D, scale), m)) / s) : 0.0f;
    for (int j = threadIdx.x; k2 && j < n2; j += ATTN_THREADS)
        pr2[(size_t)i * n2 + j] =
            j < nv2 ? (float)(exp(__dsub_rn(logit(qi, k2 + (size_t)j * D, D, scale), m)) / s)
                    : 0.0f;
    if (lse && threadIdx.x == 0)
        lse[i] = m + log(s);
}

static __global__ void output_k(const float *p, int n_q, int T, size_t stride_p, const float *v,
                                int D, double *out, size_t stride_out)
{
    size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (size_t)n_q * D)
        return;
    int qi = (int)(t / D), d = (int)(t % D);
    const float *pq = p + (size_t)qi * stride_p;
    double s = 0.0;
    for (int j = 0; j < T; j++) { /* key order, skipping zeros, like the reference */
        double pj = pq[j];
        if (pj != 0.0)
            s = __dadd_rn(s, __dmul_rn(pj, (double)v[(size_t)j * D + d]));
    }
    out[(size_t)qi * stride_out + d] = s;
}

extern "C" kvt_status kvt_attn_probs_cuda(const float *q, int n_q, int D, const float *k, int T,
                                          const int *n_vis, const float *k2, int n2,
                                          const int *n_vis2, double scale, float *pr, float *pr2,
                                          double *lse, void *stream)
{
    KVT_RETURN_IF(n_q < 0 || D <= 0 || T < 0 || (k2 && n2 < 0), KVT_ERR_INVALID_ARG,
                  "attn_probs_cuda: bad shape n_q=%d D=%d T=%d n2=%d", n_q, D, T, n2);
    KVT_RETURN_IF(k2 && !pr2, KVT_ERR_INVALID_ARG, "attn_probs_cuda: pr2 is NULL");
    if (!k2)
        n2 = 0;
    if (n_q == 0)
        return KVT_OK;
    /* visible prefixes clamped as the reference clamps them; a query must see a key */
    int *vis = (int *)malloc((size_t)n_q * 2 * sizeof(int));
    KVT_RETURN_IF(!vis, KVT_ERR_NOMEM, "attn_probs_cuda: out of memory");
    for (int i = 0; i < n_q; i++) {
        int a = n_vis[i] < 0 ? 0 : (n_vis[i] > T ? T : n_vis[i]);
        int b = !k2 ? 0 : (n_vis2[i] < 0 ? 0 : (n_vis2[i] > n2 ? n2 : n_vis2[i]));
        vis[i] = a, vis[n_q + i] = b;
        if (a + b == 0) {
            free(vis);
            return kvt_error_set(KVT_ERR_INVALID_ARG, "attn_probs: query %d sees no key", i);
        }
    }
    cudaStream_t st = kvt_cu_stream(stream);
    int *dvis = NULL;
    unsigned long long *dbad = NULL, bad = ~0ull;
    cudaError_t e;
    /* stream-ordered temporaries: freeing them does not synchronise the whole device */
    if ((e = cudaMallocAsync((void **)&dvis, (size_t)n_q * 2 * sizeof(int), st)) == cudaSuccess &&
        (e = cudaMallocAsync((void **)&dbad, sizeof(bad), st)) == cudaSuccess &&
        (e = cudaMemcpyAsync(dvis, vis, (size_t)n_q * 2 * sizeof(int), cudaMemcpyHostToDevice,
                             st)) == cudaSuccess &&
        (e = cudaMemcpyAsync(dbad, &bad, sizeof(bad), cudaMemcpyHostToDevice, st)) == cudaSuccess) {
        probs_k<<<n_q, ATTN_THREADS, 0, st>>>(q, D, k, T, dvis, k2, n2, dvis + n_q, scale, pr, pr2,
                                              lse, dbad);
        if ((e = cudaGetLastError()) == cudaSuccess)
            e = cudaMemcpyAsync(&bad, dbad, sizeof(bad), cudaMemcpyDeviceToHost, st);
        if (e == cudaSuccess)
            e = cudaStreamSynchronize(st);
    }
    free(vis);
    if (dvis)
        cudaFreeAsync(dvis, st);
    if (dbad)
        cudaFreeAsync(dbad, st);
    KVT_RETURN_IF(e != cudaSuccess, KVT_ERR_CUDA, "attn_probs_cuda: %s", cudaGetErrorString(e));
    if (bad != ~0ull) {
        unsigned j = (unsigned)(bad & 0xffffffffu);
        int i = (int)(bad >> 32);
        if (j & 0x80000000u)
            return kvt_error_set(KVT_ERR_NAN, "attn_probs: logit (%d,k2 %u) not finite", i,
                                 j & 0x7fffffffu);
        return kvt_error_set(KVT_ERR_NAN, "attn_probs: logit (%d,%u) not finite", i, j);
    }
    return KVT_OK;
}

extern "C" kvt_status kvt_attn_output_cuda(const float *p, int n_q, int T, size_t stride_p,
                                           const float *v, int D, double *out, size_t stride_out,
                                           void *stream)
{
    KVT_RETURN_IF(n_q < 0 || T < 0 || D <= 0, KVT_ERR_INVALID_ARG,
                  "attn_output_cuda: bad shape n_q=%d T=%d D=%d", n_q, T, D);
    size_t n = (size_t)n_q * D;
    if (n == 0)
        return KVT_OK;
    output_k<<<kvt_cu_blocks(n, 128), 128, 0, kvt_cu_stream(stream)>>>(p, n_q, T, stride_p, v, D,
                                                                       out, stride_out);
    KVT_CU_LAUNCHED();
    return KVT_OK;
}
