/* colsum_cuda.cu - causal attention column sums (H2O scores) on the GPU, the device version of
 * kvt_colsum_accumulate_ref (capture_session.c): colsum[h][j] += sum over queries i >= j of
 * softmax_{j' <= i}(scale * q[h][i] . k[h / G][j'])[j], G = Hq / Hkv. Called by the capture
 * session's device path (capture_cuda.cu, kvt_capdev_colsum) when the engine submits device
 * tensors; nothing T x T is ever stored.
 *
 * Two kernels on the caller's stream, both built on one 64 x 64 tile of logits computed like
 * an SGEMM (Q and K chunks of 16 head dims staged in shared memory, 256 threads, 4 x 4 logits
 * per thread in registers):
 *   cs_row_stats_k  one block per (query tile of 64, head): walks the key tiles up to the
 *                   diagonal keeping an online max m and exponential sum s per query row, then
 *                   writes m_i (f32) and 1 / s_i (f64) into `work`.
 *   cs_col_sums_k   one block per (key tile of 64, head): walks the query tiles from the
 *                   diagonal down, adds expf(l_ij - m_i) * (1 / s_i) in f64 per key in
 *                   registers, reduces the 16 partial sums of each key through shared memory in
 *                   a fixed order, and one thread per key does colsum[h][j] += total. No atomics:
 *                   the same inputs give the same bits on every run.
 * Blocks are numbered heaviest tile first (the causal triangle), heads innermost, so the query
 * heads sharing a kv head run side by side and read the same K tiles from L2. (Putting the G
 * query heads of a kv head in one block would not raise the reuse of a K tile in shared
 * memory, which is BM = 64 rows either way.)
 *
 * Arithmetic: each logit is the reference's bit for bit: f32 dot product in d order with every
 * product and sum rounded (__fmul_rn / __fadd_rn: no fused multiply-add), then * scale in f32.
 * The row max is therefore exact; what differs is expf (CUDA's is within 2 ulp, glibc's within
 * 1) and the online exponential sum, whose terms are exp(l - m_running) rescaled in f64 instead
 * of expf(l - m_final). Hence KVT_COLSUM_CUDA_RTOL (colsum_cuda.h). Fused multiply-adds would
 * make the dot products about twice as fast but move every logit by ~sqrt(D) f32 ulps of its
 * partial sums, i.e. a relative error of ~1e-5 in the probabilities of peaky rows.
 *
 * Cost: the two passes each visit the ~T^2/2 causal (query, key) pairs of every query head with
 * D f32 multiplies and D adds, i.e. T^2 * Hq * D multiply-add pairs per layer (plus two expf per
 * pair): for Llama-3-8B (Hq 32, Hkv 8, D 128) at T = 32768, 4.4e12 pairs = 8.8e12 f32
 * instructions, >= 0.26 s per layer at an H200's ~3.4e13 f32 instructions/s on CUDA cores, so
 * about 0.4-0.5 s per layer in practice (estimate, not yet measured) and ~15 s for 32 layers.
 * Memory: the workspace (12 bytes per query and head) only.
 */
#include <cuda_runtime.h>

#include <limits.h>
#include <math.h>
#include <stdint.h>

#include "colsum_cuda.h"
#include "cuda_util.cuh" /* KVT_CU_LAUNCHED */

#define CS_THREADS 256
#define CS_BM      64 /* queries per tile */
#define CS_BN      64 /* keys per tile */
#define CS_BK      16 /* head dims per shared-memory chunk (D = 64, 80, 128: no padding) */
#define CS_TM      4  /* query rows per thread */
#define CS_TN      4  /* keys per thread */
#define CS_TX      (CS_BN / CS_TN) /* threads across a tile's keys */
#define CS_TY      (CS_BM / CS_TM) /* threads across a tile's queries */
#define CS_PAD     4 /* rows stay float4-aligned; transposed stores 2-way, not 16-way, conflicts */
#define CS_MAX_T   0x7fffffffu /* n_k bound: tile offsets stay in uint32_t */

static_assert(CS_TX * CS_TY == CS_THREADS, "one thread per 4 x 4 logits of a 64 x 64 tile");
static_assert(CS_TX <= 32 && 32 % CS_TX == 0, "a row's threads are lanes of one warp");
static_assert(CS_TM == 4 && CS_TN == 4, "the inner loop reads one float4 of Q and one of K");

/* Q and K chunks of a tile, head dim major: q[dd][row], k[dd][key]. */
struct cs_tiles {
    float q[CS_BK][CS_BM + CS_PAD];
    float k[CS_BK][CS_BN + CS_PAD];
};

/* acc[a][b] = q row (r0 + ty * TM + a) . k row (j0 + tx * TN + b) of one head, exactly as the
 * reference computes it: f32, d = 0..D-1 in order, each product and each sum rounded. Rows at
 * or past n_q, keys at or past n_k and dims at or past D read as 0 (adding +0 * +0 leaves a
 * sum unchanged). Every thread of the block must call it (it synchronises). */
static __device__ __forceinline__ void cs_tile_dots(const float *__restrict__ qh,
                                                    const float *__restrict__ kh, uint32_t r0,
                                                    uint32_t n_q, uint32_t j0, uint32_t n_k, int D,
                                                    cs_tiles &sm, float acc[CS_TM][CS_TN])
{
    const int tid = threadIdx.x, tx = tid % CS_TX, ty = tid / CS_TX;
#pragma unroll
    for (int a = 0; a < CS_TM; a++)
#pragma unroll
        for (int b = 0; b < CS_TN; b++)
            acc[a][b] = 0.0f;
    for (int d0 = 0; d0 < D; d0 += CS_BK) {
        /* consecutive threads read consecutive dims of a row (coalesced) */
        for (int e = tid; e < CS_BM * CS_BK; e += CS_THREADS) {
            const int row = e / CS_BK, dd = e % CS_BK, d = d0 + dd;
            const uint32_t r = r0 + (uint32_t)row;
            sm.q[dd][row] = (r < n_q && d < D) ? qh[(size_t)r * D + d] : 0.0f;
        }
        for (int e = tid; e < CS_BN * CS_BK; e += CS_THREADS) {
            const int col = e / CS_BK, dd = e % CS_BK, d = d0 + dd;
            const uint32_t j = j0 + (uint32_t)col;
            sm.k[dd][col] = (j < n_k && d < D) ? kh[(size_t)j * D + d] : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int dd = 0; dd < CS_BK; dd++) {
            const float4 qa = *reinterpret_cast<const float4 *>(&sm.q[dd][ty * CS_TM]);
            const float4 kb = *reinterpret_cast<const float4 *>(&sm.k[dd][tx * CS_TN]);
            const float qv[CS_TM] = {qa.x, qa.y, qa.z, qa.w};
            const float kv[CS_TN] = {kb.x, kb.y, kb.z, kb.w};
#pragma unroll
            for (int a = 0; a < CS_TM; a++)
#pragma unroll
                for (int b = 0; b < CS_TN; b++)
                    acc[a][b] = __fadd_rn(acc[a][b], __fmul_rn(qv[a], kv[b]));
        }
        __syncthreads();
    }
}

/* (m, s) <- the merge of two online-softmax states: max and sum of exp(l - max). A state that
 * has seen nothing is (-inf, 0). Symmetric in its two arguments. */
static __device__ __forceinline__ void cs_merge(float &m, double &s, float m2, double s2)
{
    const float mx = m2 > m ? m2 : m;
    const double a = s != 0.0 ? s * exp((double)m - (double)mx) : 0.0;
    const double b = s2 != 0.0 ? s2 * exp((double)m2 - (double)mx) : 0.0;
    m = mx;
    s = a + b;
}

/* Pass 1: per query row r of head h, m_out = max over keys j <= i of the logit, inv_out =
 * 1 / sum of exp(logit - m). Block b: query tile n_qt - 1 - b / Hq (heaviest first), head
 * b % Hq. Rows are [Hq, n_q]. */
static __global__ void __launch_bounds__(CS_THREADS)
    cs_row_stats_k(const float *__restrict__ q, const float *__restrict__ k, int Hq, int group,
                   uint32_t q_begin, uint32_t n_q, uint32_t n_k, int D, float scale, uint32_t n_qt,
                   float *__restrict__ m_out, double *__restrict__ inv_out)
{
    __shared__ __align__(16) cs_tiles sm;
    const uint32_t blk = blockIdx.x;
    const uint32_t r0 = (n_qt - 1 - blk / (uint32_t)Hq) * CS_BM;
    const int h = (int)(blk % (uint32_t)Hq);
    const int tx = threadIdx.x % CS_TX, ty = threadIdx.x / CS_TX;
    const float *qh = q + (size_t)h * n_q * D;           /* [n_q, D] */
    const float *kh = k + (size_t)(h / group) * n_k * D; /* [n_k, D] */
    /* the tile's last query sees keys 0..i_last (i_last < n_k) */
    const uint32_t i_last = q_begin + min(r0 + CS_BM, n_q) - 1;

    float m[CS_TM];
    double s[CS_TM];
#pragma unroll
    for (int a = 0; a < CS_TM; a++) {
        m[a] = -INFINITY;
        s[a] = 0.0;
    }
    float acc[CS_TM][CS_TN];
    for (uint32_t j0 = 0; j0 <= i_last; j0 += CS_BN) {
        cs_tile_dots(qh, kh, r0, n_q, j0, n_k, D, sm, acc);
#pragma unroll
        for (int a = 0; a < CS_TM; a++) {
            const uint32_t r = r0 + (uint32_t)(ty * CS_TM + a);
            if (r >= n_q)
                continue;
            const uint32_t i = q_begin + r;
            float l[CS_TN], mt = -INFINITY;
#pragma unroll
            for (int b = 0; b < CS_TN; b++) {
                const uint32_t j = j0 + (uint32_t)(tx * CS_TN + b);
                l[b] = __fmul_rn(acc[a][b], scale);
                if (j <= i && l[b] > mt) /* as the reference: a NaN logit never becomes the max */
                    mt = l[b];
            }
            if (mt > m[a]) {
                if (s[a] != 0.0)
                    s[a] *= exp((double)m[a] - (double)mt);
                m[a] = mt;
            }
#pragma unroll
            for (int b = 0; b < CS_TN; b++) {
                const uint32_t j = j0 + (uint32_t)(tx * CS_TN + b);
                if (j <= i)
                    s[a] += (double)expf(__fsub_rn(l[b], m[a]));
            }
        }
    }
    /* merge the CS_TX states of each row: lanes tx ^ o of the same warp */
#pragma unroll
    for (int a = 0; a < CS_TM; a++) {
        float mr = m[a];
        double sr = s[a];
#pragma unroll
        for (int o = CS_TX / 2; o > 0; o >>= 1) {
            const float m2 = __shfl_xor_sync(0xffffffffu, mr, o);
            const double s2 = __shfl_xor_sync(0xffffffffu, sr, o);
            cs_merge(mr, sr, m2, s2);
        }
        const uint32_t r = r0 + (uint32_t)(ty * CS_TM + a);
        if (tx == 0 && r < n_q) {
            m_out[(size_t)h * n_q + r] = mr;
            inv_out[(size_t)h * n_q + r] = 1.0 / sr;
        }
    }
}

/* Pass 2: colsum[h][j] += sum over query rows r with q_begin + r >= j of
 * expf(logit - m_in[h][r]) * inv_in[h][r], for the keys j < q_begin + n_q of key tile
 * b / Hq (the lowest keys, which the most queries see, first), head b % Hq. */
static __global__ void __launch_bounds__(CS_THREADS)
    cs_col_sums_k(const float *__restrict__ q, const float *__restrict__ k,
                  double *__restrict__ colsum, int Hq, int group, uint32_t q_begin, uint32_t n_q,
                  uint32_t n_k, int D, float scale, const float *__restrict__ m_in,
                  const double *__restrict__ inv_in)
{
    __shared__ __align__(16) cs_tiles sm;
    __shared__ double red[CS_TY][CS_BN];
    const uint32_t blk = blockIdx.x;
    const uint32_t j0 = blk / (uint32_t)Hq * CS_BN;
    const int h = (int)(blk % (uint32_t)Hq);
    const int tid = threadIdx.x, tx = tid % CS_TX, ty = tid / CS_TX;
    const float *qh = q + (size_t)h * n_q * D;           /* [n_q, D] */
    const float *kh = k + (size_t)(h / group) * n_k * D; /* [n_k, D] */
    const float *mh = m_in + (size_t)h * n_q;            /* [n_q] */
    const double *invh = inv_in + (size_t)h * n_q;       /* [n_q] */
    /* the first query row that sees key j0, rounded down to its tile */
    const uint32_t r_first = j0 > q_begin ? j0 - q_begin : 0;

    double col[CS_TN];
#pragma unroll
    for (int b = 0; b < CS_TN; b++)
        col[b] = 0.0;
    float acc[CS_TM][CS_TN];
    for (uint32_t r0 = r_first / CS_BM * CS_BM; r0 < n_q; r0 += CS_BM) {
        cs_tile_dots(qh, kh, r0, n_q, j0, n_k, D, sm, acc);
#pragma unroll
        for (int a = 0; a < CS_TM; a++) {
            const uint32_t r = r0 + (uint32_t)(ty * CS_TM + a);
            if (r >= n_q)
                continue;
            const uint32_t i = q_begin + r;
            const float mi = mh[r];
            const double inv = invh[r];
#pragma unroll
            for (int b = 0; b < CS_TN; b++) {
                const uint32_t j = j0 + (uint32_t)(tx * CS_TN + b);
                if (j <= i) {
                    const float e = expf(__fsub_rn(__fmul_rn(acc[a][b], scale), mi));
                    col[b] += (double)e * inv;
                }
            }
        }
    }
#pragma unroll
    for (int b = 0; b < CS_TN; b++)
        red[ty][tx * CS_TN + b] = col[b];
    __syncthreads();
    if (tid < CS_BN) {
        const uint32_t j = j0 + (uint32_t)tid;
        if (j < q_begin + n_q) { /* later keys are seen by no query of this call */
            double c = 0.0;
            for (int y = 0; y < CS_TY; y++)
                c += red[y][tid];
            colsum[(size_t)h * n_k + j] += c;
        }
    }
}

extern "C" size_t kvt_colsum_cuda_work_floats(int n_q_heads, uint32_t n_q)
{
    /* doubles 1 / s first (8-byte aligned), then floats m */
    return n_q_heads > 0 ? (size_t)3 * (size_t)n_q_heads * n_q : 0;
}

extern "C" kvt_status kvt_colsum_accumulate_cuda(const float *q, const float *k, double *colsum,
                                                 int n_q_heads, int n_kv_heads, uint32_t q_begin,
                                                 uint32_t n_q, uint32_t n_k, int head_dim,
                                                 float scale, float *work, void *stream)
{
    const int Hq = n_q_heads, Hkv = n_kv_heads, D = head_dim;
    KVT_RETURN_IF(Hq < 1 || Hkv < 1 || Hq % Hkv != 0, KVT_ERR_INVALID_ARG,
                  "colsum_cuda: %d query heads are not a positive multiple of %d kv heads", Hq,
                  Hkv);
    KVT_RETURN_IF(D < 1, KVT_ERR_INVALID_ARG, "colsum_cuda: head_dim %d < 1", D);
    KVT_RETURN_IF((uint64_t)q_begin + n_q > n_k, KVT_ERR_INVALID_ARG,
                  "colsum_cuda: queries [%u, %llu) go past the %u keys", q_begin,
                  (unsigned long long)q_begin + n_q, n_k);
    KVT_RETURN_IF(n_k > CS_MAX_T, KVT_ERR_INVALID_ARG, "colsum_cuda: %u keys (at most %u)", n_k,
                  CS_MAX_T);
    if (n_q == 0)
        return KVT_OK;
    KVT_RETURN_IF(!q || !k || !colsum || !work, KVT_ERR_INVALID_ARG,
                  "colsum_cuda: NULL q, k, colsum or work");
    KVT_RETURN_IF((uintptr_t)work % sizeof(double) != 0 || (uintptr_t)colsum % sizeof(double) != 0,
                  KVT_ERR_INVALID_ARG, "colsum_cuda: work and colsum must be 8-byte aligned");
    const uint64_t n_qt = ((uint64_t)n_q + CS_BM - 1) / CS_BM;
    const uint64_t n_kt = ((uint64_t)q_begin + n_q + CS_BN - 1) / CS_BN;
    KVT_RETURN_IF(n_qt * (uint64_t)Hq > INT_MAX || n_kt * (uint64_t)Hq > INT_MAX,
                  KVT_ERR_INVALID_ARG, "colsum_cuda: %d heads x %u tokens: grid too large", Hq,
                  n_k);

    double *inv = reinterpret_cast<double *>(work); /* [Hq, n_q] */
    float *m = work + (size_t)2 * (size_t)Hq * n_q; /* [Hq, n_q] */
    cudaStream_t st = kvt_cu_stream(stream);
    cs_row_stats_k<<<(unsigned)(n_qt * (uint64_t)Hq), CS_THREADS, 0, st>>>(
        q, k, Hq, Hq / Hkv, q_begin, n_q, n_k, D, scale, (uint32_t)n_qt, m, inv);
    KVT_CU_LAUNCHED();
    cs_col_sums_k<<<(unsigned)(n_kt * (uint64_t)Hq), CS_THREADS, 0, st>>>(
        q, k, colsum, Hq, Hq / Hkv, q_begin, n_q, n_k, D, scale, m, inv);
    KVT_CU_LAUNCHED();
    return KVT_OK;
}
