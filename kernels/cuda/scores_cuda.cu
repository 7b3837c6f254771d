/* scores_cuda.cu - the scores policies rank by: SnapKV window scores (kvt_col_mean_ref over the
 * last W window queries, kvt_gqa_reduce_ref, kvt_pool1d_ref: one thread per output, summing in
 * the references' order, so the scores are bitwise theirs) and H2O column sums
 * (kvt_attn_colsum_ref, on tiles of logits: see cs_args; nothing T x T is stored).
 */
#include <math.h>

#include "cuda_util.cuh"

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

extern "C" kvt_status kvt_col_mean_cuda(const float *x, int H, int R, int T, int P, double *out,
                                        void *stream)
{
    KVT_RETURN_IF(H < 0 || R < 1 || T < 0 || P < 0 || P > T, KVT_ERR_INVALID_ARG,
                  "col_mean_cuda: bad shape H=%d R=%d T=%d P=%d", H, R, T, P);
    if (H == 0 || P == 0)
        return KVT_OK;
    col_mean_k<<<kvt_cu_blocks((size_t)H * P, 256), 256, 0, kvt_cu_stream(stream)>>>(x, H, R, R, T,
                                                                                     P, out);
    KVT_CU_LAUNCHED();
    return KVT_OK;
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

/* H2O's column sums, on 32 x 64 tiles of logits (kvt_cu_tile_dots). Pass 1 (cs_stats_k), one
 * block per tile of 32 query rows, heaviest first: walks the key tiles up to the diagonal and
 * keeps per row the max m and the sum s of exp(z - m), merging each tile's max and sum. Pass 2
 * (cs_cols_k), one block per tile of 64 keys: walks the row tiles from the diagonal down, in
 * order, stages each tile's f32 probabilities in shared memory, and thread c adds column c's 32
 * in row order, so every column sum adds its terms in the reference's order. Logits are
 * bitwise the reference's and m is exact; s differs by its grouping (a few 1e-16), and so a
 * probability now and then by one f32 ulp. */
typedef struct cs_args {
    const float *q, *k;
    int T, D, n_rt;
    double scale;
    double *m, *s, *colsum;
    unsigned long long *bad;
} cs_args;

static __global__ void __launch_bounds__(KVT_TILE_THREADS) cs_stats_k(cs_args a)
{
    __shared__ kvt_cu_tile_sm sm;
    const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
    const int r0 = (a.n_rt - 1 - (int)blockIdx.x) * KVT_TILE_ROWS;
    const int last = (r0 + KVT_TILE_ROWS < a.T ? r0 + KVT_TILE_ROWS : a.T) - 1; /* sees 0..last */
    double m[KVT_TILE_RPW], s[KVT_TILE_RPW], acc[KVT_TILE_RPW][2];
#pragma unroll
    for (int u = 0; u < KVT_TILE_RPW; u++)
        m[u] = -INFINITY, s[u] = 0.0;
    for (int j0 = 0; j0 <= last; j0 += KVT_TILE_KEYS) {
        kvt_cu_tile_dots(a.q, a.T, r0, a.k, NULL, a.T, NULL, a.T, j0, a.D, sm, acc);
#pragma unroll
        for (int u = 0; u < KVT_TILE_RPW; u++) {
            const int i = r0 + KVT_TILE_RPW * ty + u; /* the same row in the whole warp */
            double z[2], tm, ts;
            bool vis[2];
            for (int c = 0; c < 2; c++) {
                const int j = j0 + tx + 32 * c;
                vis[c] = i < a.T && j <= i;
                z[c] = __dmul_rn(acc[u][c], a.scale);
                if (vis[c] && !isfinite(z[c]))
                    atomicMin(a.bad, ((unsigned long long)i << 32) | (unsigned)j);
            }
            kvt_cu_warp_max_sumexp(z, vis, &tm, &ts);
            if (ts > 0.0) { /* the tile holds keys this row sees: merge, the same in every lane */
                if (tm > m[u]) {
                    s[u] = (s[u] > 0.0 ? s[u] * exp(__dsub_rn(m[u], tm)) : 0.0) + ts;
                    m[u] = tm;
                } else {
                    s[u] += ts * exp(__dsub_rn(tm, m[u]));
                }
            }
        }
    }
#pragma unroll
    for (int u = 0; u < KVT_TILE_RPW; u++) {
        const int i = r0 + KVT_TILE_RPW * ty + u;
        if (tx == 0 && i < a.T) {
            a.m[i] = m[u];
            a.s[i] = s[u];
        }
    }
}

static __global__ void __launch_bounds__(KVT_TILE_THREADS) cs_cols_k(cs_args a)
{
    __shared__ kvt_cu_tile_sm sm;
    __shared__ float p_sh[KVT_TILE_ROWS][KVT_TILE_KEYS + 1];
    const int tid = threadIdx.x, tx = tid % 32, ty = tid / 32;
    const int j0 = (int)blockIdx.x * KVT_TILE_KEYS; /* the lowest keys, seen by most rows, first */
    double col = 0.0, acc[KVT_TILE_RPW][2];         /* col: key j0 + tid, for tid < 64 */
    for (int r0 = j0 / KVT_TILE_ROWS * KVT_TILE_ROWS; r0 < a.T; r0 += KVT_TILE_ROWS) {
        kvt_cu_tile_dots(a.q, a.T, r0, a.k, NULL, a.T, NULL, a.T, j0, a.D, sm, acc);
#pragma unroll
        for (int u = 0; u < KVT_TILE_RPW; u++) {
            const int i = r0 + KVT_TILE_RPW * ty + u;
            for (int c = 0; c < 2; c++) {
                const int j = j0 + tx + 32 * c;
                float p = 0.0f; /* probabilities are f32 (POLICIES.md 0.1.3), as the reference's */
                if (i < a.T && j <= i)
                    p = (float)(exp(__dsub_rn(__dmul_rn(acc[u][c], a.scale), a.m[i])) / a.s[i]);
                p_sh[KVT_TILE_RPW * ty + u][tx + 32 * c] = p;
            }
        }
        __syncthreads();
        if (tid < KVT_TILE_KEYS)
            for (int r = 0; r < KVT_TILE_ROWS; r++) /* rows in order; + 0 for rows that do not
                                                       see the key leaves the sum as it is */
                col = __dadd_rn(col, (double)p_sh[r][tid]);
        __syncthreads();
    }
    if (tid < KVT_TILE_KEYS && j0 + tid < a.T)
        a.colsum[j0 + tid] = col;
}

extern "C" kvt_status kvt_attn_colsum_cuda(const float *q, const float *k, int T, int D,
                                           double scale, double *work, double *colsum, void *stream)
{
    KVT_RETURN_IF(T < 0 || D <= 0, KVT_ERR_INVALID_ARG, "attn_colsum: bad shape T=%d D=%d", T, D);
    if (T == 0)
        return KVT_OK;
    cudaStream_t st = kvt_cu_stream(stream);
    unsigned long long *dbad = NULL, bad = ~0ull;
    KVT_CU((cudaError_t)kvt_cuda_malloc_async((void **)&dbad, sizeof(bad),
                                              st)); /* stream-ordered: see attn */
    cs_args ca;
    ca.q = q, ca.k = k, ca.T = T, ca.D = D, ca.n_rt = (T + KVT_TILE_ROWS - 1) / KVT_TILE_ROWS;
    ca.scale = scale, ca.m = work, ca.s = work + T, ca.colsum = colsum, ca.bad = dbad;
    cudaError_t e = cudaMemcpyAsync(dbad, &bad, sizeof(bad), cudaMemcpyHostToDevice, st);
    if (e == cudaSuccess) {
        cs_stats_k<<<(unsigned)ca.n_rt, KVT_TILE_THREADS, 0, st>>>(ca);
        e = cudaGetLastError();
    }
    if (e == cudaSuccess)
        e = cudaMemcpyAsync(&bad, dbad, sizeof(bad), cudaMemcpyDeviceToHost, st);
    if (e == cudaSuccess)
        e = cudaStreamSynchronize(st);
    kvt_cuda_free_async(dbad, st);
    KVT_RETURN_IF(e != cudaSuccess, KVT_ERR_CUDA, "attn_colsum_cuda: %s", cudaGetErrorString(e));
    if (bad != ~0ull)
        return kvt_error_set(KVT_ERR_NAN, "attn_colsum: logit (%d,%u) not finite", (int)(bad >> 32),
                             (unsigned)(bad & 0xffffffffu));
    ca.bad = NULL; /* freed; pass 2 does not check */
    cs_cols_k<<<(unsigned)((T + KVT_TILE_KEYS - 1) / KVT_TILE_KEYS), KVT_TILE_THREADS, 0, st>>>(ca);
    KVT_CU_LAUNCHED();
    return KVT_OK;
}
