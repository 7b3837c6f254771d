/* sweep_cuda.cu - the output sweep (kvt_sweep_output_ref): recall and relative output error
 * of every cut of one ranking, for a batch of queries sharing it. One block per SW_ROWS
 * queries (they share the ranking, so each V row is loaded once for all of them); thread d
 * keeps each query's running sum of dimensions d, d + 128, ... in registers, every thread keeps
 * the running masses (the same arithmetic in each), and at each cut thread r records query r
 * from the sums staged in shared memory, summing over d in order. Products and sums use the _rn
 * intrinsics (no fused multiply-add), tokens are added in the reference's order (forward from the
 * top of the ranking up to T/2, backward from the full sums beyond), so the results should equal
 * the reference's bit for bit; the test allows the CPU fast path's tolerances.
 *
 * The tokens of a ranking are taken in chunks of SW_THREADS: the block loads the chunk's
 * indices, probabilities and modalities into shared memory together (one coalesced step
 * instead of a chain of dependent loads per token), then every thread walks the chunk in order,
 * loading the V rows of 16 / PER tokens before adding them, so that several rows are in
 * flight at once. The order of the additions is unchanged.
 *
 * A block's walk is one chain over the ranked tokens (its additions must stay in order), and a
 * sweep has few blocks (n_q / SW_ROWS: 8 to 32 for the replay's heads), so the kernel's time is
 * the latency of that walk: one round trip to memory per group of V rows loaded together. PER
 * (dimensions per thread, a template parameter: 1 for D <= 128, 2 for D <= 256, else 4) keeps
 * the registers of a head dim of 128 to one value per token, so that 16 rows are in flight
 * rather than 4.
 */
#include <math.h>

#include "../ref/sweep_cuts.h"
#include "cuda_util.cuh"

#define SW_THREADS 128
#define SW_PER     4  /* dimensions per thread at most: D <= 512 */
#define SW_LOADS   16 /* V values loaded ahead per thread: 16 / PER rows */
#define SW_ROWS    4  /* query rows per block: they share the ranking, so a V row is loaded once */
#define NM         KVT_N_MODALITIES

typedef struct sweep_args {
    int n_q, T, D;
    const float *p;
    size_t stride_p;
    const float *v;
    const double *a_full;
    size_t stride_a;
    const double *p_extra;
    size_t stride_e;
    const double *o_extra, *r_full;
    const int32_t *order, *cuts;
    int n_cut, n_fwd;
    const uint8_t *mod;
    const double *mass_mod;
    size_t stride_m;
    double *recall, *err, *recall_mod;
} sweep_args;

template <int PER> static __global__ void sweep_k(sweep_args a)
{
    constexpr int SW_UNROLL = SW_LOADS / PER;               /* V rows loaded ahead */
    __shared__ double acc_sh[SW_ROWS][SW_THREADS * SW_PER]; /* any PER: D <= 512 */
    __shared__ double rf_sh[SW_ROWS];
    __shared__ int32_t j_sh[SW_THREADS];
    __shared__ float p_sh[SW_ROWS][SW_THREADS];
    __shared__ uint8_t m_sh[SW_THREADS];
    const int q0 = blockIdx.x * SW_ROWS, tid = threadIdx.x, D = a.D;
    const int nr = a.n_q - q0 < SW_ROWS ? a.n_q - q0 : SW_ROWS; /* rows of this block */
    if (tid < nr) { /* row q0 + tid's stored mass, summed in key order */
        const int q = q0 + tid;
        double s = 0.0;
        if (a.r_full) {
            s = a.r_full[(size_t)q * a.stride_e];
        } else {
            const float *pq = a.p + (size_t)q * a.stride_p;
            for (int j = 0; j < a.T; j++)
                s = __dadd_rn(s, (double)pq[j]);
        }
        rf_sh[tid] = s;
    }
    __syncthreads();
    double acc[SW_ROWS][PER], r[SW_ROWS], rm[SW_ROWS][NM];
    for (int dir = 0; dir < 2; dir++) {
        int n = dir ? a.n_cut - a.n_fwd : a.n_fwd, t = dir ? a.T : 0;
        if (n == 0)
            continue;
#pragma unroll
        for (int rr = 0; rr < SW_ROWS; rr++) {
            const int q = q0 + rr;
            const bool live = rr < nr;
            for (int k = 0; k < PER; k++) {
                int d = tid + k * SW_THREADS;
                acc[rr][k] = live && dir && d < D ? a.a_full[(size_t)q * a.stride_a + d] : 0.0;
            }
            r[rr] = live && dir ? rf_sh[rr] : 0.0;
            for (int m = 0; m < NM; m++)
                rm[rr][m] = live && dir && a.mod ? a.mass_mod[(size_t)q * a.stride_m + m] : 0.0;
        }
        for (int kk = 0; kk < n; kk++) {
            int ci = dir ? a.n_cut - 1 - kk : kk, c = a.cuts[ci];
            int cnt = dir ? t - c : c - t;
            for (int u0 = 0; u0 < cnt; u0 += SW_THREADS) { /* cnt is the same in every thread */
                const int m_ch = cnt - u0 < SW_THREADS ? cnt - u0 : SW_THREADS;
                __syncthreads(); /* the previous chunk has been read */
                if (tid < m_ch) {
                    int32_t j = a.order[dir ? t - 1 - (u0 + tid) : t + u0 + tid];
                    j_sh[tid] = j;
#pragma unroll
                    for (int rr = 0; rr < SW_ROWS; rr++) /* rows past the end: weight 0 */
                        p_sh[rr][tid] = rr < nr ? a.p[(size_t)(q0 + rr) * a.stride_p + j] : 0.0f;
                    m_sh[tid] = a.mod ? a.mod[j] : 0;
                }
                __syncthreads();
                for (int u = 0; u < m_ch; u += SW_UNROLL) {
                    float x[SW_UNROLL][PER];
#pragma unroll
                    for (int w = 0; w < SW_UNROLL; w++) { /* loads first: rows in flight */
                        bool any = false;
#pragma unroll
                        for (int rr = 0; rr < SW_ROWS; rr++)
                            any = any || (u + w < m_ch && p_sh[rr][u + w] != 0.0f);
#pragma unroll
                        for (int k = 0; k < PER; k++) {
                            int d = tid + k * SW_THREADS;
                            x[w][k] = any && d < D ? a.v[(size_t)j_sh[u + w] * D + d] : 0.0f;
                        }
                    }
#pragma unroll
                    for (int w = 0; w < SW_UNROLL; w++) { /* then in order */
                        if (u + w >= m_ch)
                            break;
#pragma unroll
                        for (int rr = 0; rr < SW_ROWS; rr++) {
                            double pj = (double)p_sh[rr][u + w];
                            if (pj == 0.0)
                                continue;
                            for (int k = 0; k < PER; k++) {
                                int d = tid + k * SW_THREADS;
                                if (d < D) {
                                    double xv = __dmul_rn(pj, (double)x[w][k]);
                                    acc[rr][k] =
                                        dir ? __dsub_rn(acc[rr][k], xv) : __dadd_rn(acc[rr][k], xv);
                                }
                            }
                            r[rr] = dir ? __dsub_rn(r[rr], pj) : __dadd_rn(r[rr], pj);
                            if (a.mod) { /* compile-time indices keep rm in registers */
                                const int m = m_sh[u + w];
#pragma unroll
                                for (int mm = 0; mm < NM; mm++)
                                    if (mm == m)
                                        rm[rr][mm] = dir ? __dsub_rn(rm[rr][mm], pj)
                                                         : __dadd_rn(rm[rr][mm], pj);
                            }
                        }
                    }
                }
            }
            t = c;
            /* record cut ci (kvt_sweep_record, in order over d): thread rr for row q0 + rr */
#pragma unroll
            for (int rr = 0; rr < SW_ROWS; rr++)
                for (int k = 0; k < PER; k++) {
                    int d = tid + k * SW_THREADS;
                    if (d < D)
                        acc_sh[rr][d] = acc[rr][k];
                }
            __shared__ double r_sh[SW_ROWS], rm_sh[SW_ROWS][NM];
            if (tid == 0) /* every thread holds the same masses */
                for (int rr = 0; rr < SW_ROWS; rr++) {
                    r_sh[rr] = r[rr];
                    for (int m = 0; m < NM; m++)
                        rm_sh[rr][m] = rm[rr][m];
                }
            __syncthreads();
            if (tid < nr) {
                const int q = q0 + tid;
                const double rf = rf_sh[tid], rq = r_sh[tid];
                const double pe = a.p_extra ? a.p_extra[(size_t)q * a.stride_e] : 0.0;
                const double *af = a.a_full + (size_t)q * a.stride_a;
                const double *oe = a.o_extra ? a.o_extra + (size_t)q * a.stride_a : NULL;
                double kept = __dadd_rn(rq < 0.0 ? 0.0 : rq, pe), total = __dadd_rn(rf, pe);
                size_t o = (size_t)q * a.n_cut + ci;
                a.recall[o] = total > 0.0 ? kept / total : 0.0;
                if (a.err) {
                    double num = 0.0, den = 0.0;
                    for (int d = 0; d < D; d++) {
                        double e = oe ? oe[d] : 0.0;
                        double of = total > 0.0 ? __dadd_rn(af[d], e) / total : 0.0;
                        double os = kept > 0.0 ? __dadd_rn(acc_sh[tid][d], e) / kept : 0.0;
                        double df = __dsub_rn(os, of);
                        num = __dadd_rn(num, __dmul_rn(df, df));
                        den = __dadd_rn(den, __dmul_rn(of, of));
                    }
                    a.err[o] = kept <= 0.0 ? 1.0
                               : den > 0.0 ? sqrt(num / den)
                                           : (num > 0.0 ? 1.0 : 0.0);
                }
                if (a.recall_mod)
                    for (int m = 0; m < NM; m++) {
                        double mm = a.mass_mod[(size_t)q * a.stride_m + m];
                        a.recall_mod[o * NM + m] = mm > 0.0 ? rm_sh[tid][m] / mm : NAN;
                    }
            }
            __syncthreads();
        }
    }
}

extern "C" size_t kvt_sweep_cuda_work_bytes(int T, int n_cut, int n_probe)
{
    size_t nc = n_cut > 0 ? (size_t)n_cut : 0, np = n_probe > 0 ? (size_t)n_probe : 0;
    size_t n_chunk = nc + (T > 0 ? (size_t)T / KVT_CB_CHUNK + 1 : 0);
    /* sweep: the cuts; coverage: chunk starts, ends, each cut's first chunk (ints), then the
     * chunks' best values (floats) and positions (ints) */
    size_t ints = 2 * n_chunk + nc + 1;
    return ((ints * sizeof(int32_t) + 15) / 16) * 16 + n_chunk * np * (sizeof(float) + 4) + 16;
}

extern "C" kvt_status
kvt_sweep_output_cuda_ws(int n_q, int T, int D, const float *p, size_t stride_p, const float *v,
                         const double *a_full, size_t stride_a, const double *p_extra,
                         size_t stride_e, const double *o_extra, const double *r_full,
                         const int32_t *order, const int32_t *cuts, int n_cut, const uint8_t *mod,
                         const double *mass_mod, size_t stride_m, double *recall, double *err,
                         double *recall_mod, void *work, size_t work_bytes, void *stream)
{
    KVT_RETURN_IF(n_q < 0 || T < 0 || D <= 0 || n_cut < 0, KVT_ERR_INVALID_ARG,
                  "sweep_output_cuda: bad shape n_q=%d T=%d D=%d", n_q, T, D);
    KVT_RETURN_IF(D > SW_THREADS * SW_PER, KVT_ERR_UNSUPPORTED,
                  "sweep_output_cuda: head dim %d > %d", D, SW_THREADS * SW_PER);
    KVT_RETURN_IF(mod && !mass_mod, KVT_ERR_INVALID_ARG, "sweep_output: mod without mass_mod");
    KVT_FORWARD(kvt_sweep_check_cuts(cuts, n_cut, T));
    if (n_q == 0 || n_cut == 0)
        return KVT_OK;
    KVT_RETURN_IF(!work || work_bytes < (size_t)n_cut * sizeof(int32_t), KVT_ERR_INVALID_ARG,
                  "sweep_output_cuda: workspace of %zu bytes is too small", work_bytes);
    int n_fwd = kvt_sweep_n_fwd(cuts, n_cut, T);
    cudaStream_t st = kvt_cu_stream(stream);
    int32_t *dcuts = (int32_t *)work;
    sweep_args a;
    a.n_q = n_q, a.T = T, a.D = D, a.p = p, a.stride_p = stride_p, a.v = v;
    a.a_full = a_full, a.stride_a = stride_a, a.p_extra = p_extra, a.stride_e = stride_e;
    a.o_extra = o_extra, a.r_full = r_full, a.order = order, a.cuts = dcuts, a.n_cut = n_cut;
    a.n_fwd = n_fwd, a.mod = mod, a.mass_mod = mass_mod, a.stride_m = stride_m;
    a.recall = recall, a.err = err, a.recall_mod = mod ? recall_mod : NULL;
    KVT_CU(
        cudaMemcpyAsync(dcuts, cuts, (size_t)n_cut * sizeof(int32_t), cudaMemcpyHostToDevice, st));
    const unsigned nb = (unsigned)((n_q + SW_ROWS - 1) / SW_ROWS);
    if (D <= SW_THREADS)
        sweep_k<1><<<nb, SW_THREADS, 0, st>>>(a);
    else if (D <= 2 * SW_THREADS)
        sweep_k<2><<<nb, SW_THREADS, 0, st>>>(a);
    else
        sweep_k<4><<<nb, SW_THREADS, 0, st>>>(a);
    KVT_CU_LAUNCHED();
    return KVT_OK;
}

extern "C" kvt_status kvt_sweep_output_cuda(int n_q, int T, int D, const float *p, size_t stride_p,
                                            const float *v, const double *a_full, size_t stride_a,
                                            const double *p_extra, size_t stride_e,
                                            const double *o_extra, const double *r_full,
                                            const int32_t *order, const int32_t *cuts, int n_cut,
                                            const uint8_t *mod, const double *mass_mod,
                                            size_t stride_m, double *recall, double *err,
                                            double *recall_mod, void *stream)
{
    size_t wb = kvt_sweep_cuda_work_bytes(T, n_cut, 0);
    void *work = NULL;
    KVT_CU(cudaMalloc(&work, wb));
    kvt_status s = kvt_sweep_output_cuda_ws(
        n_q, T, D, p, stride_p, v, a_full, stride_a, p_extra, stride_e, o_extra, r_full, order,
        cuts, n_cut, mod, mass_mod, stride_m, recall, err, recall_mod, work, wb, stream);
    cudaFree(work);
    return s;
}

#define RD_THREADS 128
#define RD_PER     4  /* dimensions per thread at most: D <= 512 */
#define RD_LOADS   16 /* ranked rows loaded ahead */

/* kvt_sweep_redundancy_ref in one block: thread d keeps the running sums of dimensions d,
 * d + 128, ... over the ranked unit keys in ranking order (loading RD_LOADS rows ahead, adding
 * them in order), and at each cut thread 0 sums the squares over d in order
 * (kvt_redundancy_of_sum): the reference's additions, in its order, bit for bit. */
static __global__ void redundancy_k(const float *ku, int D, const int32_t *order,
                                    const int32_t *cuts, int n_cut, double *r)
{
    __shared__ double sum_sh[RD_THREADS * RD_PER];
    __shared__ int32_t j_sh[RD_THREADS];
    const int tid = threadIdx.x;
    double acc[RD_PER];
    for (int k = 0; k < RD_PER; k++)
        acc[k] = 0.0;
    int t = 0;
    for (int ci = 0; ci < n_cut; ci++) {
        const int c = cuts[ci];
        for (int u0 = t; u0 < c; u0 += RD_THREADS) {
            const int m = c - u0 < RD_THREADS ? c - u0 : RD_THREADS;
            __syncthreads(); /* the previous chunk has been read */
            if (tid < m)
                j_sh[tid] = order[u0 + tid];
            __syncthreads();
            for (int u = 0; u < m; u += RD_LOADS) {
                float x[RD_LOADS][RD_PER];
#pragma unroll
                for (int w = 0; w < RD_LOADS; w++)
#pragma unroll
                    for (int k = 0; k < RD_PER; k++) {
                        const int d = tid + k * RD_THREADS;
                        x[w][k] = u + w < m && d < D ? ku[(size_t)j_sh[u + w] * D + d] : 0.0f;
                    }
#pragma unroll
                for (int w = 0; w < RD_LOADS; w++)
                    if (u + w < m)
#pragma unroll
                        for (int k = 0; k < RD_PER; k++)
                            acc[k] = __dadd_rn(acc[k], (double)x[w][k]);
            }
        }
        t = c;
        for (int k = 0; k < RD_PER; k++) {
            const int d = tid + k * RD_THREADS;
            if (d < D)
                sum_sh[d] = acc[k];
        }
        __syncthreads();
        if (tid == 0) {
            double s2 = 0.0;
            for (int d = 0; d < D; d++)
                s2 = __dadd_rn(s2, __dmul_rn(sum_sh[d], sum_sh[d]));
            r[ci] = c < 2 ? (double)NAN : (s2 / c - 1.0) / (double)(c - 1);
        }
        __syncthreads(); /* sum_sh is read before the next cut writes it */
    }
}

extern "C" kvt_status kvt_sweep_redundancy_cuda_ws(const float *ku, int T, int D,
                                                   const int32_t *order, const int32_t *cuts,
                                                   int n_cut, double *r, void *work,
                                                   size_t work_bytes, void *stream)
{
    KVT_RETURN_IF(T < 0 || D <= 0 || n_cut < 0, KVT_ERR_INVALID_ARG,
                  "sweep_redundancy_cuda: bad shape T=%d D=%d", T, D);
    KVT_RETURN_IF(D > RD_THREADS * RD_PER, KVT_ERR_UNSUPPORTED,
                  "sweep_redundancy_cuda: head dim %d > %d", D, RD_THREADS * RD_PER);
    KVT_FORWARD(kvt_sweep_check_cuts(cuts, n_cut, T));
    if (n_cut == 0)
        return KVT_OK;
    KVT_RETURN_IF(!work || work_bytes < (size_t)n_cut * sizeof(int32_t), KVT_ERR_INVALID_ARG,
                  "sweep_redundancy_cuda: workspace of %zu bytes is too small", work_bytes);
    cudaStream_t st = kvt_cu_stream(stream);
    int32_t *dcuts = (int32_t *)work;
    KVT_CU(
        cudaMemcpyAsync(dcuts, cuts, (size_t)n_cut * sizeof(int32_t), cudaMemcpyHostToDevice, st));
    redundancy_k<<<1, RD_THREADS, 0, st>>>(ku, D, order, dcuts, n_cut, r);
    KVT_CU_LAUNCHED();
    return KVT_OK;
}
