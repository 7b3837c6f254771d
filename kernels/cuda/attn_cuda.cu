/* attn_cuda.cu - window/decode attention (kvt_attn_probs_ref, kvt_attn_output_ref).
 *
 * Probabilities, for blocks of query rows at a time (as many as fit a logit buffer of
 * KVT_ATTN_ZBUF_BYTES): tiles of KVT_TILE_ROWS (32) query rows x KVT_TILE_KEYS (64) keys (keys of
 * k, then of k2), one block each, compute their logits from query rows and keys staged in shared
 * memory (kvt_cu_tile_dots, cuda_util.cuh: a key is read from device memory once per tile of
 * rows), store them (double) and each row's max over the tile and sum of exp(z - that max). Logits
 * are dot products of f32 vectors summed in double in d order, each product and sum rounded as
 * the reference rounds them (kvt_cu_madd_f32: a fused multiply-add, the same bits):
 * bitwise the reference's. Then one thread per row takes the max m over its tiles (exact in any
 * order) and adds its tiles' sums rescaled to m in tile order, and one thread per stored logit
 * writes its probability: only the summation of the exponentials differs from the reference's
 * (its grouping, and the rescaling by exp(tile max - m): relative differences of a few 1e-16 in
 * the sum, a probability now and then one f32 ulp away). (The logits were computed twice before,
 * once per pass; storing them halves the dot products, with the same bits.)
 * Outputs: sums over blocks of keys for blocks of queries, then over the key blocks in order
 * (see output_part_k).
 */
#include <math.h>

#include "cuda_util.cuh"

/* One batch's arguments (blockIdx.z: the batch, whose arrays follow the previous batch's:
 * batch_of moves every pointer but the visible prefixes, which the batches share) */
typedef struct pr_args {
    const float *q, *k, *k2;
    int n_q, D, T, n2, n_kt; /* n_kt: key tiles over the T + n2 keys */
    int row0, n_rows, zrows; /* this block of rows: row0 .. row0 + n_rows - 1, of zrows at most */
    double *z;               /* [zrows, T + n2] the block's logits */
    const int *nv, *nv2;     /* [n_q] clamped visible prefixes of k and k2 */
    double scale;
    double *tmax, *tsum; /* [n_q, n_kt] per tile */
    double *m, *s;       /* [n_q] row max and exponential sum */
    float *pr, *pr2;
    double *lse;
    unsigned long long *bad;
} pr_args;

static __device__ inline pr_args batch_of(pr_args a)
{
    const size_t b = blockIdx.z, nq = (size_t)a.n_q, n_all = (size_t)a.T + a.n2;
    a.q += b * nq * a.D, a.k += b * a.T * a.D;
    if (a.k2)
        a.k2 += b * a.n2 * a.D, a.pr2 += b * nq * a.n2;
    a.z += b * a.zrows * n_all, a.tmax += b * nq * a.n_kt, a.tsum += b * nq * a.n_kt;
    a.m += b * nq, a.s += b * nq, a.pr += b * nq * a.T, a.bad += b;
    if (a.lse)
        a.lse += b * nq;
    return a;
}

/* The tile's logits (blockIdx.y: rows from a.row0, blockIdx.x: keys) into a.z, and each row's
 * max over the tile and sum of exp(z - that max). Thread (ty = warp, tx = lane) holds the logits
 * of rows KVT_TILE_RPW ty .. KVT_TILE_RPW (ty + 1) - 1 and keys tx, tx + 32 of the tile. */
static __global__ void probs_tile_k(pr_args a0)
{
    __shared__ kvt_cu_tile_sm sm;
    const pr_args a = batch_of(a0);
    const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
    const int r0 = a.row0 + blockIdx.y * KVT_TILE_ROWS, j0 = blockIdx.x * KVT_TILE_KEYS,
              n_all = a.T + a.n2, r_end = a.row0 + a.n_rows;
    double acc[KVT_TILE_RPW][2];
    kvt_cu_tile_dots(a.q, r_end, r0, a.k, NULL, a.T, a.k2, n_all, j0, a.D, sm, acc);
#pragma unroll
    for (int u = 0; u < KVT_TILE_RPW; u++) {
        const int i = r0 + KVT_TILE_RPW * ty + u; /* the same row in the whole warp */
        double z[2];
        bool vis[2];
        for (int c = 0; c < 2; c++) {
            const int j = j0 + tx + 32 * c;
            vis[c] = false;
            if (i < r_end && j < n_all)
                vis[c] = j < a.T ? j < a.nv[i] : j - a.T < a.nv2[i];
            z[c] = __dmul_rn(acc[u][c], a.scale);
            if (i < r_end && j < n_all)
                a.z[(size_t)(i - a.row0) * n_all + j] = z[c];
            if (vis[c] && !isfinite(z[c]))
                atomicMin(a.bad, ((unsigned long long)i << 32) |
                                     (j < a.T ? (unsigned)j : 0x80000000u | (unsigned)(j - a.T)));
        }
        /* the row's max over the tile and its sum of exp(z - that max): fixed trees over the
           lanes */
        double tm, ts;
        kvt_cu_warp_max_sumexp(z, vis, &tm, &ts);
        if (tx == 0 && i < r_end) {
            a.tmax[(size_t)i * a.n_kt + blockIdx.x] = tm;
            a.tsum[(size_t)i * a.n_kt + blockIdx.x] = ts;
        }
    }
}

/* one thread per stored logit of the block's rows (blockIdx.y: row - a.row0): its probability
 * from the row's max and sum (a masked key 0) */
static __global__ void probs_write_k(pr_args a0)
{
    const pr_args a = batch_of(a0);
    const int n_all = a.T + a.n2, j = blockIdx.x * blockDim.x + threadIdx.x;
    const int i = a.row0 + blockIdx.y;
    if (j >= n_all)
        return;
    const bool vis = j < a.T ? j < a.nv[i] : j - a.T < a.nv2[i];
    const double z = a.z[(size_t)blockIdx.y * n_all + j];
    float p = vis ? (float)(exp(__dsub_rn(z, a.m[i])) / a.s[i]) : 0.0f;
    if (j < a.T)
        a.pr[(size_t)i * a.T + j] = p;
    else
        a.pr2[(size_t)i * a.n2 + (j - a.T)] = p;
}

/* one thread per row: m = the max over the row's tiles (exact in any order), s = the sum in
 * tile order of each tile's sum rescaled to m (tile sum x exp(tile max - m)), the log-sum-exp */
static __global__ void probs_rows_k(pr_args a0)
{
    const pr_args a = batch_of(a0);
    const int i = a.row0 + blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= a.row0 + a.n_rows)
        return;
    const double *tm = a.tmax + (size_t)i * a.n_kt, *ts = a.tsum + (size_t)i * a.n_kt;
    double m = -INFINITY, s = 0.0;
    for (int c = 0; c < a.n_kt; c++)
        m = tm[c] > m ? tm[c] : m;
    for (int c = 0; c < a.n_kt; c++)
        if (ts[c] > 0.0) /* a tile with no visible key adds nothing */
            s += ts[c] * exp(__dsub_rn(tm[c], m));
    a.m[i] = m;
    a.s[i] = s;
    if (a.lse)
        a.lse[i] = m + log(s);
}

/* Outputs in two steps: blocks of OUT_ROWS queries x OUT_KEYS keys sum p[q][j] v[j][d] over
 * their keys in key order (thread d keeps the OUT_ROWS running sums of dimensions d, d + 128,
 * ... up to PER of them, a template parameter: 1 for D <= 128, 2 for D <= 256, else 4; a V row is
 * loaded once for all of the block's queries, the probabilities converted to double once, as
 * they are staged), then one thread per (query, d) adds the key blocks' sums in block order. Only
 * the grouping of the sum differs from the reference's single in-order chain (relative
 * differences of a few 1e-16). (Before, every thread kept 4 dimensions whatever D: at D = 128
 * three quarters of the products were of zeros.) The staged probabilities are read two keys
 * per (broadcast) load: one a key for each of the 8 rows took the shared memory twice the
 * time of the fused multiply-adds they feed. */
#define OUT_ROWS    8
#define OUT_KEYS    1024
#define OUT_THREADS 128
#define OUT_PER     4  /* dimensions per thread at most: D <= 512 */
#define OUT_CH      64 /* probabilities staged at a time (even: read in pairs) */

template <int PER>
static __global__ void output_part_k(const float *p, int n_q, int T, size_t stride_p,
                                     const float *v, int D, double *part)
{
    __shared__ double2 p_sh[OUT_ROWS][OUT_CH / 2]; /* [row][pair of keys] */
    p += (size_t)blockIdx.z * n_q * stride_p, v += (size_t)blockIdx.z * T * D; /* the batch's */
    part += (size_t)blockIdx.z * gridDim.x * n_q * D;
    const int tid = threadIdx.x, q0 = blockIdx.y * OUT_ROWS, jb = blockIdx.x * OUT_KEYS;
    const int je = T - jb < OUT_KEYS ? T : jb + OUT_KEYS;
    double acc[OUT_ROWS][PER];
#pragma unroll
    for (int r = 0; r < OUT_ROWS; r++)
        for (int u = 0; u < PER; u++)
            acc[r][u] = 0.0;
    for (int j0 = jb; j0 < je; j0 += OUT_CH) {
        const int n = je - j0 < OUT_CH ? je - j0 : OUT_CH;
        __syncthreads(); /* the previous chunk is consumed */
        for (int e = tid; e < OUT_ROWS * OUT_CH; e += OUT_THREADS) {
            int r = e / OUT_CH, c = e % OUT_CH;
            double x =
                q0 + r < n_q && c < n ? (double)p[(size_t)(q0 + r) * stride_p + j0 + c] : 0.0;
            if (c & 1)
                p_sh[r][c >> 1].y = x;
            else
                p_sh[r][c >> 1].x = x;
        }
        __syncthreads();
        for (int c = 0; c < n; c += 2) { /* key order, skipping zeros, like the reference */
            const bool two = c + 1 < n;  /* an odd chunk's last key alone */
            double x0[PER], x1[PER];
            for (int u = 0; u < PER; u++) {
                int d = tid + u * OUT_THREADS;
                x0[u] = d < D ? (double)v[(size_t)(j0 + c) * D + d] : 0.0;
                x1[u] = two && d < D ? (double)v[(size_t)(j0 + c + 1) * D + d] : 0.0;
            }
#pragma unroll
            for (int r = 0; r < OUT_ROWS; r++) {
                const double2 pj = p_sh[r][c >> 1]; /* f32 values */
                if (pj.x != 0.0)
                    for (int u = 0; u < PER; u++)
                        acc[r][u] = kvt_cu_madd_f32(acc[r][u], pj.x, x0[u]);
                if (pj.y != 0.0) /* 0 past the chunk's end */
                    for (int u = 0; u < PER; u++)
                        acc[r][u] = kvt_cu_madd_f32(acc[r][u], pj.y, x1[u]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < OUT_ROWS; r++)
        for (int u = 0; u < PER; u++) {
            int d = tid + u * OUT_THREADS;
            if (q0 + r < n_q && d < D)
                part[((size_t)blockIdx.x * n_q + q0 + r) * D + d] = acc[r][u];
        }
}

static __global__ void output_sum_k(const double *part, int n_kb, int n_q, int D, double *out,
                                    size_t stride_out)
{
    size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    part += (size_t)blockIdx.z * n_kb * n_q * D, out += (size_t)blockIdx.z * n_q * stride_out;
    if (t >= (size_t)n_q * D)
        return;
    int qi = (int)(t / D), d = (int)(t % D);
    double s = 0.0;
    for (int b = 0; b < n_kb; b++)
        s = __dadd_rn(s, part[((size_t)b * n_q + qi) * D + d]);
    out[(size_t)qi * stride_out + d] = s;
}

/* the logit buffer's size: rows of T + n2 logits in whole tiles of rows, at least one tile, at
 * most 32768 rows (a grid's y extent) */
#define KVT_ATTN_ZBUF_BYTES ((size_t)64 << 20)
static size_t zbuf_bytes = KVT_ATTN_ZBUF_BYTES;

extern "C" void kvt_attn_cuda_set_zbuf_bytes(size_t bytes)
{
    zbuf_bytes = bytes ? bytes : KVT_ATTN_ZBUF_BYTES;
}

static int zbuf_rows(int n_q, int n_all, int n_batch)
{
    size_t r = zbuf_bytes / ((size_t)n_all * n_batch * sizeof(double));
    r = r / KVT_TILE_ROWS * KVT_TILE_ROWS;
    if (r < KVT_TILE_ROWS)
        r = KVT_TILE_ROWS;
    if (r > 32768)
        r = 32768;
    const size_t all = ((size_t)n_q + KVT_TILE_ROWS - 1) / KVT_TILE_ROWS * KVT_TILE_ROWS;
    return (int)(r < all ? r : all);
}

/* batches per launch: as many as fit the same buffer size at `each` bytes a batch, at least one
 * (so that batching the groups never makes a workspace larger than one group's at its least) */
static int sub_batches(size_t each, int n_batch)
{
    size_t k = zbuf_bytes / (each ? each : 1);
    if (k < 1)
        k = 1;
    return k < (size_t)n_batch ? (int)k : n_batch;
}

static kvt_status probs_batch(const float *q, int n_q, int D, const float *k, int T, const int *vis,
                              const float *k2, int n2, double scale, float *pr, float *pr2,
                              double *lse, int n_batch, int R, void *stream);

extern "C" kvt_status kvt_attn_probs_cuda(const float *q, int n_q, int D, const float *k, int T,
                                          const int *n_vis, const float *k2, int n2,
                                          const int *n_vis2, double scale, float *pr, float *pr2,
                                          double *lse, void *stream)
{
    return kvt_attn_probs_batch_cuda(q, n_q, D, k, T, n_vis, k2, n2, n_vis2, scale, pr, pr2, lse, 1,
                                     stream);
}

extern "C" kvt_status kvt_attn_probs_batch_cuda(const float *q, int n_q, int D, const float *k,
                                                int T, const int *n_vis, const float *k2, int n2,
                                                const int *n_vis2, double scale, float *pr,
                                                float *pr2, double *lse, int n_batch, void *stream)
{
    KVT_RETURN_IF(n_q < 0 || D <= 0 || T < 0 || (k2 && n2 < 0) || n_batch < 1 || n_batch > 65535,
                  KVT_ERR_INVALID_ARG, "attn_probs_cuda: bad shape n_q=%d D=%d T=%d n2=%d x %d",
                  n_q, D, T, n2, n_batch);
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
    /* as many batches per launch as fit the logit buffer at one tile of rows each; the first
       launch with a non-finite logit reports it, so batches are still reported in order */
    const size_t n_all = (size_t)T + n2, nq = (size_t)n_q;
    const int nbs = sub_batches(KVT_TILE_ROWS * n_all * sizeof(double), n_batch);
    const int R = zbuf_rows(n_q, (int)n_all, nbs);
    kvt_status s = KVT_OK;
    for (int b0 = 0; !s && b0 < n_batch; b0 += nbs) {
        const size_t b = (size_t)b0;
        s = probs_batch(q + b * nq * D, n_q, D, k + b * T * D, T, vis, k2 ? k2 + b * n2 * D : NULL,
                        n2, scale, pr + b * nq * T, pr2 ? pr2 + b * nq * n2 : NULL,
                        lse ? lse + b * nq : NULL, n_batch - b0 < nbs ? n_batch - b0 : nbs, R,
                        stream);
    }
    free(vis);
    return s;
}

/* kvt_attn_probs_batch_cuda for n_batch batches in one launch, R rows of logits at a time; vis
 * [2, n_q] the clamped visible prefixes of k and k2 (host) */
static kvt_status probs_batch(const float *q, int n_q, int D, const float *k, int T, const int *vis,
                              const float *k2, int n2, double scale, float *pr, float *pr2,
                              double *lse, int n_batch, int R, void *stream)
{
    cudaStream_t st = kvt_cu_stream(stream);
    const int n_all = T + n2, n_kt = (n_all + KVT_TILE_KEYS - 1) / KVT_TILE_KEYS;
    const size_t nb = (size_t)n_batch,
                 n_w = nb * (((size_t)n_kt + 1) * 2 * n_q + (size_t)R * n_all);
    int *dvis = NULL;
    /* per batch: tile maxima, tile sums [n_q, n_kt] each, row max, row sum [n_q] each, logits
       [R, n_all] */
    double *dw = NULL;
    unsigned long long *dbad = NULL, *bad = (unsigned long long *)malloc(nb * sizeof(*bad));
    if (!bad)
        return kvt_error_set(KVT_ERR_NOMEM, "attn_probs_cuda: out of memory");
    for (size_t b = 0; b < nb; b++)
        bad[b] = ~0ull;
    cudaError_t e;
    /* stream-ordered temporaries: freeing them does not synchronise the whole device */
    if ((e = (cudaError_t)kvt_cuda_malloc_async((void **)&dvis, (size_t)n_q * 2 * sizeof(int),
                                                st)) == cudaSuccess &&
        (e = (cudaError_t)kvt_cuda_malloc_async((void **)&dw, n_w * sizeof(double), st)) ==
            cudaSuccess &&
        (e = (cudaError_t)kvt_cuda_malloc_async((void **)&dbad, nb * sizeof(*bad), st)) ==
            cudaSuccess &&
        (e = cudaMemcpyAsync(dvis, vis, (size_t)n_q * 2 * sizeof(int), cudaMemcpyHostToDevice,
                             st)) == cudaSuccess &&
        (e = cudaMemcpyAsync(dbad, bad, nb * sizeof(*bad), cudaMemcpyHostToDevice, st)) ==
            cudaSuccess) {
        pr_args a;
        a.q = q, a.k = k, a.k2 = k2, a.n_q = n_q, a.D = D, a.T = T, a.n2 = n2, a.n_kt = n_kt;
        a.nv = dvis, a.nv2 = dvis + n_q, a.scale = scale, a.zrows = R;
        a.tmax = dw, a.tsum = a.tmax + nb * n_q * n_kt, a.m = a.tsum + nb * n_q * n_kt;
        a.s = a.m + nb * n_q, a.z = a.s + nb * n_q;
        a.pr = pr, a.pr2 = pr2, a.lse = lse, a.bad = dbad;
        for (int r0 = 0; r0 < n_q; r0 += R) { /* one block of rows at a time */
            a.row0 = r0, a.n_rows = n_q - r0 < R ? n_q - r0 : R;
            const unsigned n_rt = (unsigned)((a.n_rows + KVT_TILE_ROWS - 1) / KVT_TILE_ROWS);
            probs_tile_k<<<dim3((unsigned)n_kt, n_rt, (unsigned)nb), KVT_TILE_THREADS, 0, st>>>(a);
            probs_rows_k<<<dim3((unsigned)((a.n_rows + 127) / 128), 1, (unsigned)nb), 128, 0, st>>>(
                a);
            probs_write_k<<<dim3(kvt_cu_blocks((size_t)n_all, 256), (unsigned)a.n_rows,
                                 (unsigned)nb),
                            256, 0, st>>>(a);
        }
        if ((e = cudaGetLastError()) == cudaSuccess)
            e = cudaMemcpyAsync(bad, dbad, nb * sizeof(*bad), cudaMemcpyDeviceToHost, st);
        if (e == cudaSuccess)
            e = cudaStreamSynchronize(st);
    }
    if (dvis)
        kvt_cuda_free_async(dvis, st);
    if (dw)
        kvt_cuda_free_async(dw, st);
    if (dbad)
        kvt_cuda_free_async(dbad, st);
    if (e == cudaErrorMemoryAllocation) {
        cudaGetLastError(); /* not sticky: clear it */
        free(bad);
        return kvt_error_set(KVT_ERR_NOMEM,
                             "attn_probs_cuda: out of GPU memory for %.1f MiB of "
                             "workspace",
                             (n_w * sizeof(double)) / 1048576.0);
    }
    if (e != cudaSuccess) {
        free(bad);
        return kvt_error_set(KVT_ERR_CUDA, "attn_probs_cuda: %s", cudaGetErrorString(e));
    }
    /* the first batch with a non-finite logit, as the batches one call each would report it */
    unsigned long long first = ~0ull;
    for (size_t b = 0; b < nb && first == ~0ull; b++)
        first = bad[b];
    free(bad);
    if (first != ~0ull) {
        unsigned j = (unsigned)(first & 0xffffffffu);
        int i = (int)(first >> 32);
        if (j & 0x80000000u)
            return kvt_error_set(KVT_ERR_NAN, "attn_probs: logit (%d,k2 %u) not finite", i,
                                 j & 0x7fffffffu);
        return kvt_error_set(KVT_ERR_NAN, "attn_probs: logit (%d,%u) not finite", i, j);
    }
    return KVT_OK;
}

extern "C" size_t kvt_attn_cuda_temp_bytes(int n_q, int T, int n2, int D, int n_batch)
{
    if (n_q <= 0 || T < 0 || n2 < 0 || D <= 0 || n_batch < 1)
        return 0;
    const size_t n_all = (size_t)T + n2, n_kt = (n_all + KVT_TILE_KEYS - 1) / KVT_TILE_KEYS;
    /* the batches one launch takes (as the call splits them) */
    const size_t nbs = (size_t)sub_batches(KVT_TILE_ROWS * n_all * sizeof(double), n_batch);
    const size_t zb = (size_t)zbuf_rows(n_q, (int)n_all, (int)nbs) * n_all * sizeof(double);
    return (size_t)n_q * 2 * sizeof(int) +
           nbs * ((n_kt + 1) * 2 * n_q * sizeof(double) + zb + sizeof(unsigned long long)) +
           kvt_attn_output_cuda_temp_bytes(n_q, T, D, n_batch);
}

extern "C" size_t kvt_attn_output_cuda_temp_bytes(int n_q, int T, int D, int n_batch)
{
    if (n_q <= 0 || T <= 0 || D <= 0 || n_batch < 1)
        return 0;
    /* a launch's key blocks' sums, for as many batches as the call gives one launch */
    const size_t each = ((size_t)T + OUT_KEYS - 1) / OUT_KEYS * n_q * D * sizeof(double);
    return (size_t)sub_batches(each, n_batch) * each;
}

extern "C" kvt_status kvt_attn_output_cuda(const float *p, int n_q, int T, size_t stride_p,
                                           const float *v, int D, double *out, size_t stride_out,
                                           void *stream)
{
    return kvt_attn_output_batch_cuda(p, n_q, T, stride_p, v, D, out, stride_out, 1, stream);
}

static kvt_status output_batch(const float *p, int n_q, int T, size_t stride_p, const float *v,
                               int D, double *out, size_t stride_out, int n_batch, void *stream);

extern "C" kvt_status kvt_attn_output_batch_cuda(const float *p, int n_q, int T, size_t stride_p,
                                                 const float *v, int D, double *out,
                                                 size_t stride_out, int n_batch, void *stream)
{
    KVT_RETURN_IF(n_q < 0 || T < 0 || D <= 0 || n_batch < 1 || n_batch > 65535, KVT_ERR_INVALID_ARG,
                  "attn_output_cuda: bad shape n_q=%d T=%d D=%d x %d", n_q, T, D, n_batch);
    KVT_RETURN_IF(D > OUT_THREADS * OUT_PER, KVT_ERR_UNSUPPORTED,
                  "attn_output_cuda: head dim %d > %d", D, OUT_THREADS * OUT_PER);
    if ((size_t)n_q * D == 0)
        return KVT_OK;
    /* as many batches per launch as keep the key blocks' sums within the logit buffer's size */
    const size_t n_kb = ((size_t)T + OUT_KEYS - 1) / OUT_KEYS, nq = (size_t)n_q;
    const int nbo = sub_batches(n_kb * nq * D * sizeof(double), n_batch);
    for (int b0 = 0; b0 < n_batch; b0 += nbo) {
        const size_t b = (size_t)b0;
        KVT_FORWARD(output_batch(p + b * nq * stride_p, n_q, T, stride_p, v + b * T * D, D,
                                 out + b * nq * stride_out, stride_out,
                                 n_batch - b0 < nbo ? n_batch - b0 : nbo, stream));
    }
    return KVT_OK;
}

/* kvt_attn_output_batch_cuda for n_batch batches in one launch */
static kvt_status output_batch(const float *p, int n_q, int T, size_t stride_p, const float *v,
                               int D, double *out, size_t stride_out, int n_batch, void *stream)
{
    size_t n = (size_t)n_q * D, nb = (size_t)n_batch;
    cudaStream_t st = kvt_cu_stream(stream);
    const int n_kb = (T + OUT_KEYS - 1) / OUT_KEYS, n_rb = (n_q + OUT_ROWS - 1) / OUT_ROWS;
    /* [n_batch, n_kb, n_q, D], stream-ordered: no device-wide synchronisation */
    double *part = NULL;
    if (n_kb > 0) {
        cudaError_t ea =
            (cudaError_t)kvt_cuda_malloc_async((void **)&part, nb * n_kb * n * sizeof(double), st);
        if (ea == cudaErrorMemoryAllocation) {
            cudaGetLastError(); /* not sticky: clear it */
            return kvt_error_set(KVT_ERR_NOMEM,
                                 "attn_output_cuda: out of GPU memory for %.1f MiB of workspace",
                                 (nb * n_kb * n * sizeof(double)) / 1048576.0);
        }
        KVT_CU(ea);
        const dim3 grid((unsigned)n_kb, (unsigned)n_rb, (unsigned)nb);
        if (D <= OUT_THREADS)
            output_part_k<1><<<grid, OUT_THREADS, 0, st>>>(p, n_q, T, stride_p, v, D, part);
        else if (D <= 2 * OUT_THREADS)
            output_part_k<2><<<grid, OUT_THREADS, 0, st>>>(p, n_q, T, stride_p, v, D, part);
        else
            output_part_k<4><<<grid, OUT_THREADS, 0, st>>>(p, n_q, T, stride_p, v, D, part);
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess) {
            kvt_cuda_free_async(part, st);
            return kvt_error_set(KVT_ERR_CUDA, "attn_output_cuda: %s", cudaGetErrorString(e));
        }
    }
    output_sum_k<<<dim3(kvt_cu_blocks(n, 128), 1, (unsigned)nb), 128, 0, st>>>(part, n_kb, n_q, D,
                                                                               out, stride_out);
    cudaError_t e = cudaGetLastError();
    if (part)
        kvt_cuda_free_async(part, st);
    KVT_RETURN_IF(e != cudaSuccess, KVT_ERR_CUDA, "attn_output_cuda: %s", cudaGetErrorString(e));
    return KVT_OK;
}
