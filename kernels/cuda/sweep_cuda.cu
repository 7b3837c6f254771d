/* sweep_cuda.cu - the output sweep (kvt_sweep_output_ref): recall and relative output error
 * of every cut of one ranking, for a batch of queries sharing it, and the redundancy sweep
 * (kvt_sweep_redundancy_ref).
 *
 * The output sweep runs in two kernels, so that the walk over the ranked tokens is spread over
 * the whole GPU instead of one in-order chain per block (the first version: tens of blocks, a
 * millisecond per call on an H200, latency-bound). The ranked positions the reference walks
 * (forward from the top of the ranking for the cuts up to T/2, backward from the full sums for
 * the larger ones: kvt_sweep_n_fwd) are cut into chunks of at most SW_CHUNK positions that never
 * straddle a cut. sweep_part_k: one block per (SW_ROWS queries, chunk) sums the chunk's p_j v_j,
 * masses and masses by modality in double (each V row loaded once for the block's queries, 16 /
 * PER rows in flight per thread); sweep_rec_k: one block per (query, cut) adds the chunk sums
 * in walk order up to its cut (forward from zero, backward from the full output), so that no
 * cut waits for the chain of the cuts before it, and records the cut as kvt_sweep_record does,
 * its sums over d as a tree over the block (sweep_rf_k first sums each query's row mass when
 * the caller does not give it). Products and sums use
 * the _rn intrinsics (no fused multiply-add but kvt_cu_madd_f32's, which rounds as the separate
 * product and sum do: p times V, both f32 values). The sums are the reference's up to the order of
 * their additions (chunks, then chunks in order; d as a tree): within rounding, not bit for
 * bit; the test holds recall to 1e-10 and the error to 1e-7 relative.
 *
 * PER (dimensions per thread, a template parameter: 1 for D <= 128, 2 for D <= 256, else 4).
 *
 * The redundancy sweep likewise: rd_part_k sums each chunk's unit keys (one block per chunk,
 * the chunks forward only, as the reference walks), rd_cut_k adds the chunk sums in order up to
 * its cut (one block per cut) and takes the redundancy from their squares. Within rounding of
 * the reference (its sums in one chain), not bit for bit.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../ref/sweep_cuts.h"
#include "cuda_util.cuh"

#define SW_THREADS 128
#define SW_PER     4   /* dimensions per thread at most: D <= 512 */
#define SW_LOADS   16  /* V values loaded ahead per thread: 16 / PER rows */
#define SW_ROWS    4   /* query rows per block: they share the ranking, so a V row is loaded once */
#define SW_CHUNK   256 /* ranked positions per chunk at most */
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
    const int32_t *order;
    int n_cut, n_fwd, n_chunk_fwd;
    const int32_t *cs, *ce, *cend; /* chunk k: positions [cs[k], ce[k]); cut ci: chunks of its
                                      direction up to cend[ci] */
    const uint8_t *mod;
    const double *mass_mod;
    size_t stride_m;
    double *pacc, *pr, *prm; /* chunk sums [n_chunk, n_q, D], [n_chunk, n_q], [.., NM] */
    double *rfw;             /* [n_q] row masses when r_full is NULL (sweep_rf_k) */
    double *recall, *err, *recall_mod;
} sweep_args;

/* One block per (SW_ROWS queries, chunk): the chunk's sums of p_j v_j, p_j and p_j by
 * modality. The chunk's indices, probabilities (converted to double once, as they are staged)
 * and modalities are staged in shared memory SW_THREADS at a time; each thread then loads the V
 * values of 16 / PER tokens before adding them, so that several rows are in flight at once.
 * Only the first warp sums the masses (every thread summed them, a third of the block's f64
 * additions at D = 128, for thread 0 to store them). */
template <int PER> static __global__ void sweep_part_k(sweep_args a)
{
    constexpr int SW_UNROLL = SW_LOADS / PER; /* V rows loaded ahead */
    __shared__ int32_t j_sh[SW_THREADS];
    __shared__ double2 p_sh[SW_ROWS][SW_THREADS / 2];       /* [row][pair of positions] */
    __shared__ uint8_t m_sh[SW_THREADS], nz_sh[SW_THREADS]; /* nz: some row's weight is not 0 */
    const int q0 = blockIdx.x * SW_ROWS, k = blockIdx.y, tid = threadIdx.x, D = a.D;
    const int nr = a.n_q - q0 < SW_ROWS ? a.n_q - q0 : SW_ROWS; /* rows of this block */
    const bool masses = tid < 32; /* the first warp sums the masses (thread 0 stores them) */
    const int lo = a.cs[k], cnt = a.ce[k] - lo;
    double acc[SW_ROWS][PER], r[SW_ROWS], rm[SW_ROWS][NM];
#pragma unroll
    for (int rr = 0; rr < SW_ROWS; rr++) {
        for (int kk = 0; kk < PER; kk++)
            acc[rr][kk] = 0.0;
        r[rr] = 0.0;
        for (int m = 0; m < NM; m++)
            rm[rr][m] = 0.0;
    }
    for (int u0 = 0; u0 < cnt; u0 += SW_THREADS) { /* cnt is the same in every thread */
        const int m_ch = cnt - u0 < SW_THREADS ? cnt - u0 : SW_THREADS;
        __syncthreads(); /* the previous piece has been read */
        if (tid < m_ch) {
            int32_t j = a.order[lo + u0 + tid];
            bool nz = false;
            j_sh[tid] = j;
#pragma unroll
            for (int rr = 0; rr < SW_ROWS; rr++) { /* rows past the end: weight 0 */
                const double x = rr < nr ? (double)a.p[(size_t)(q0 + rr) * a.stride_p + j] : 0.0;
                nz = nz || x != 0.0;
                if (tid & 1)
                    p_sh[rr][tid >> 1].y = x;
                else
                    p_sh[rr][tid >> 1].x = x;
            }
            m_sh[tid] = a.mod ? a.mod[j] : 0;
            nz_sh[tid] = nz;
        }
        __syncthreads();
        for (int u = 0; u < m_ch; u += SW_UNROLL) {
            float x[SW_UNROLL][PER];
#pragma unroll
            for (int w = 0; w < SW_UNROLL; w++) { /* loads first: rows in flight */
                const bool any = u + w < m_ch && nz_sh[u + w];
#pragma unroll
                for (int kk = 0; kk < PER; kk++) {
                    int d = tid + kk * SW_THREADS;
                    x[w][kk] = any && d < D ? a.v[(size_t)j_sh[u + w] * D + d] : 0.0f;
                }
            }
#pragma unroll
            for (int w = 0; w < SW_UNROLL; w += 2) { /* then in order, two positions per load */
                if (u + w >= m_ch)
                    break;
#pragma unroll
                for (int rr = 0; rr < SW_ROWS; rr++) {
                    const double2 pp = p_sh[rr][(u + w) >> 1];
#pragma unroll
                    for (int h = 0; h < 2; h++) { /* position u + w, then u + w + 1 */
                        const double pj = h ? pp.y : pp.x;
                        if ((h && u + w + 1 >= m_ch) || pj == 0.0)
                            continue;
                        for (int kk = 0; kk < PER; kk++)
                            acc[rr][kk] = kvt_cu_madd_f32(acc[rr][kk], pj, (double)x[w + h][kk]);
                        if (!masses) /* warp-uniform */
                            continue;
                        r[rr] = __dadd_rn(r[rr], pj);
                        if (a.mod) { /* compile-time indices keep rm in registers */
                            const int m = m_sh[u + w + h] < NM ? m_sh[u + w + h] : NM - 1;
#pragma unroll
                            for (int mm = 0; mm < NM; mm++)
                                if (mm == m)
                                    rm[rr][mm] = __dadd_rn(rm[rr][mm], pj);
                        }
                    }
                }
            }
        }
    }
#pragma unroll
    for (int rr = 0; rr < SW_ROWS; rr++) {
        if (rr >= nr)
            break;
        const size_t o = (size_t)k * a.n_q + q0 + rr;
        for (int kk = 0; kk < PER; kk++) {
            int d = tid + kk * SW_THREADS;
            if (d < D)
                a.pacc[o * D + d] = acc[rr][kk];
        }
        if (tid == 0) { /* the first warp's threads hold the masses */
            a.pr[o] = r[rr];
            for (int m = 0; m < NM; m++)
                a.prm[o * NM + m] = rm[rr][m];
        }
    }
}

/* sum of v over the block's threads (a tree in shared memory; every thread must call it) */
static __device__ double block_sum(double v, double *sh)
{
    const int tid = threadIdx.x;
    __syncthreads(); /* sh's previous use is over */
    sh[tid] = v;
    for (int w = SW_THREADS / 2; w > 0; w >>= 1) {
        __syncthreads();
        if (tid < w)
            sh[tid] = __dadd_rn(sh[tid], sh[tid + w]);
    }
    __syncthreads();
    return sh[0];
}

/* Without the row masses given (r_full NULL): one block per query sums its stored
 * probability row into rfw[q], once for all its cuts. */
static __global__ void sweep_rf_k(sweep_args a)
{
    __shared__ double red[SW_THREADS];
    const int q = blockIdx.x, tid = threadIdx.x;
    const float *pq = a.p + (size_t)q * a.stride_p;
    double s = 0.0;
    for (int j = tid; j < a.T; j += SW_THREADS)
        s = __dadd_rn(s, (double)pq[j]);
    s = block_sum(s, red);
    if (tid == 0)
        a.rfw[q] = s;
}

/* One block per (query, cut): the chunk sums of the cut's direction added in walk order up to
 * the cut (forward from zero, backward from the full output: the same additions, in the same
 * order, as one running sum over the cuts), then the cut's recall, error and recall by
 * modality (kvt_sweep_record). The cuts are independent, so none waits for another's chain. */
template <int PER> static __global__ void sweep_rec_k(sweep_args a)
{
    __shared__ double red[SW_THREADS];
    const int q = blockIdx.x, ci = blockIdx.y, tid = threadIdx.x, D = a.D;
    const double rf = a.r_full ? a.r_full[(size_t)q * a.stride_e] : a.rfw[q];
    const double pe = a.p_extra ? a.p_extra[(size_t)q * a.stride_e] : 0.0;
    const double *af = a.a_full + (size_t)q * a.stride_a;
    const double *oe = a.o_extra ? a.o_extra + (size_t)q * a.stride_a : NULL;
    const double *mq = a.mod ? a.mass_mod + (size_t)q * a.stride_m : NULL;
    const double total = __dadd_rn(rf, pe);
    const bool dir = ci >= a.n_fwd; /* backward: from the full sums down */
    double o[PER], e[PER], acc[PER], r = dir ? rf : 0.0, rm[NM];
    for (int kk = 0; kk < PER; kk++) { /* the full output, normalised */
        int d = tid + kk * SW_THREADS;
        e[kk] = d < D && oe ? oe[d] : 0.0;
        o[kk] = d < D && total > 0.0 ? __dadd_rn(af[d], e[kk]) / total : 0.0;
        acc[kk] = dir && d < D ? af[d] : 0.0;
    }
    for (int m = 0; m < NM; m++)
        rm[m] = dir && mq ? mq[m] : 0.0;
    for (int k = dir ? a.n_chunk_fwd : 0; k < a.cend[ci]; k++) { /* in walk order */
        const size_t o2 = (size_t)k * a.n_q + q;
        for (int kk = 0; kk < PER; kk++) {
            int d = tid + kk * SW_THREADS;
            if (d < D)
                acc[kk] = dir ? __dsub_rn(acc[kk], a.pacc[o2 * D + d])
                              : __dadd_rn(acc[kk], a.pacc[o2 * D + d]);
        }
        r = dir ? __dsub_rn(r, a.pr[o2]) : __dadd_rn(r, a.pr[o2]);
        if (a.mod)
            for (int m = 0; m < NM; m++)
                rm[m] = dir ? __dsub_rn(rm[m], a.prm[o2 * NM + m])
                            : __dadd_rn(rm[m], a.prm[o2 * NM + m]);
    }
    const double kept = __dadd_rn(r < 0.0 ? 0.0 : r, pe); /* cancellation: -1e-17 */
    const size_t oc = (size_t)q * a.n_cut + ci;
    if (a.err) {
        double den = 0.0, num = 0.0;
        for (int kk = 0; kk < PER; kk++) {
            int d = tid + kk * SW_THREADS;
            double os = d < D && kept > 0.0 ? __dadd_rn(acc[kk], e[kk]) / kept : 0.0;
            double df = __dsub_rn(os, o[kk]);
            den = __dadd_rn(den, __dmul_rn(o[kk], o[kk]));
            num = __dadd_rn(num, __dmul_rn(df, df));
        }
        den = block_sum(den, red);
        num = block_sum(num, red);
        if (tid == 0)
            a.err[oc] = kept <= 0.0 ? 1.0 : den > 0.0 ? sqrt(num / den) : (num > 0.0 ? 1.0 : 0.0);
    }
    if (tid == 0) {
        a.recall[oc] = total > 0.0 ? kept / total : 0.0;
        if (a.recall_mod)
            for (int m = 0; m < NM; m++)
                a.recall_mod[oc * NM + m] = mq[m] > 0.0 ? rm[m] / mq[m] : NAN;
    }
}

/* The chunks of a sweep on the host (kvt_cu_chunk_table_k's table, in pieces of `chunk`): forward
 * ones over [0, cuts[n_fwd-1]), then backward ones from T down to cuts[n_fwd], none straddling a
 * cut; cend[ci]: the end of cut ci's chunks. Returns the count (at most kvt_sweep_max_chunks);
 * *n_fwd_chunk: the forward ones. */
int kvt_cu_chunks_host(const int32_t *cuts, int n_cut, int n_fwd, int T, int chunk, int32_t *cs,
                       int32_t *ce, int32_t *cend, int *n_fwd_chunk)
{
    int n = 0, t = 0;
    for (int ci = 0; ci < n_fwd; ci++) {
        for (int lo = t; lo < cuts[ci]; lo += chunk) {
            cs[n] = lo;
            ce[n++] = cuts[ci] - lo < chunk ? cuts[ci] : lo + chunk;
        }
        cend[ci] = n;
        t = cuts[ci];
    }
    *n_fwd_chunk = n;
    t = T;
    for (int ci = n_cut - 1; ci >= n_fwd; ci--) {
        for (int hi = t; hi > cuts[ci]; hi -= chunk) {
            cs[n] = hi - cuts[ci] < chunk ? cuts[ci] : hi - chunk;
            ce[n++] = hi;
        }
        cend[ci] = n;
        t = cuts[ci];
    }
    return n;
}

/* a bound on kvt_cu_chunks_host's count: each direction walks at most T/2 positions */
static size_t sweep_max_chunks(int T, int n_cut)
{
    return (size_t)(T > 0 ? T : 0) / SW_CHUNK + (size_t)(n_cut > 0 ? n_cut : 0) + 2;
}

/* A sweep's chunk table in its workspace: chunk starts [mc], ends [mc], each cut's end of
 * chunks [n_cut], then, with_cuts, the cuts [n_cut]; the chunk sums follow at
 * chunk_table_bytes (16-byte aligned). */
static size_t chunk_table_bytes(int T, int n_cut, bool with_cuts)
{
    const size_t nc = n_cut > 0 ? (size_t)n_cut : 0;
    return ((2 * sweep_max_chunks(T, n_cut) + nc * (with_cuts ? 2 : 1)) * sizeof(int32_t) + 15) /
           16 * 16;
}

/* Chunk tables of the sweeps (this file's output and redundancy sweeps, coverage_cuda.cu's
 * bests), built on the device from cuts passed by value (KVT_CU_PCUTS at most): a table copied from
 * pageable host memory may make the stream wait for all the work queued on it before the copy
 * (CUDA's documented behaviour for pageable staging), so that sweeps queued together would run one
 * round trip each. The ranked positions walked for each cut, in pieces of `chunk` that never
 * straddle a cut: the cuts of index < n_fwd forward from the previous cut (0 for the first), the
 * others backward from the next cut (T for the last); table order: the forward cuts' chunks in cut
 * order, then the backward ones from the last cut down. cs, ce: each chunk's positions [cs, ce)
 * (forward chunks ascending, backward ones descending from the upper end); cend[ci]: the end of cut
 * ci's chunks in the table. Optional: the cuts copied to cuts_out, *zero_at = 0 (for a table of
 * starts, cend = starts + 1). kvt_cu_chunk_count (cuda_util.cuh) gives the host the counts its
 * launches need. One block. */
typedef struct kvt_cu_cuts {
    int32_t c[KVT_CU_PCUTS];
} kvt_cu_cuts;

static __global__ void kvt_cu_chunk_table_k(kvt_cu_cuts cp, int n_cut, int n_fwd, int T, int chunk,
                                            int32_t *cs, int32_t *ce, int32_t *cend,
                                            int32_t *cuts_out, int32_t *zero_at)
{
    __shared__ int32_t first[KVT_CU_PCUTS]; /* each cut's first chunk in the table */
    const int32_t *cuts = cp.c;
    if (threadIdx.x == 0) {
        int n = 0;
        for (int ci = 0; ci < n_fwd; ci++) {
            first[ci] = n;
            n += (cuts[ci] - (ci ? cuts[ci - 1] : 0) + chunk - 1) / chunk;
            cend[ci] = n;
        }
        for (int ci = n_cut - 1; ci >= n_fwd; ci--) {
            first[ci] = n;
            n += ((ci + 1 < n_cut ? cuts[ci + 1] : T) - cuts[ci] + chunk - 1) / chunk;
            cend[ci] = n;
        }
        if (zero_at)
            *zero_at = 0;
    }
    __syncthreads();
    for (int ci = 0; ci < n_cut; ci++) {
        const bool fwd = ci < n_fwd;
        const int32_t lo = fwd ? (ci ? cuts[ci - 1] : 0) : cuts[ci];
        const int32_t hi = fwd ? cuts[ci] : (ci + 1 < n_cut ? cuts[ci + 1] : T);
        const int nch = (hi - lo + chunk - 1) / chunk;
        for (int k = threadIdx.x; k < nch; k += blockDim.x) {
            int32_t b, e;
            if (fwd)
                b = lo + k * chunk, e = hi - b < chunk ? hi : b + chunk;
            else
                e = hi - k * chunk, b = e - lo < chunk ? lo : e - chunk;
            cs[first[ci] + k] = b;
            ce[first[ci] + k] = e;
        }
        if (cuts_out && threadIdx.x == 0)
            cuts_out[ci] = cuts[ci];
    }
}

cudaError_t kvt_cu_chunk_table(const int32_t *cuts, int n_cut, int n_fwd, int T, int chunk,
                               int32_t *cs, int32_t *ce, int32_t *cend, int32_t *cuts_out,
                               int32_t *zero_at, cudaStream_t st)
{
    kvt_cu_cuts cp;
    memset(&cp, 0, sizeof(cp));
    memcpy(cp.c, cuts, (size_t)n_cut * sizeof(int32_t));
    kvt_cu_chunk_table_k<<<1, 128, 0, st>>>(cp, n_cut, n_fwd, T, chunk, cs, ce, cend, cuts_out,
                                            zero_at);
    return cudaGetLastError();
}

/* kvt_cu_chunks_host's table (the cuts of index < n_fwd walked forward) into work on the stream:
 * built there from the cuts (kvt_cu_chunk_table), or for more than KVT_CU_PCUTS cuts built here and
 * copied; *n_chunk, *n_chunk_fwd: all the chunks, the forward ones */
static kvt_status put_chunk_table(const int32_t *cuts, int n_cut, int n_fwd, int T, bool with_cuts,
                                  void *work, cudaStream_t st, const char *who, int *n_chunk,
                                  int *n_chunk_fwd)
{
    const size_t mc = sweep_max_chunks(T, n_cut);
    if (n_cut <= KVT_CU_PCUTS) {
        int32_t *tab = (int32_t *)work;
        *n_chunk = kvt_cu_chunk_count(cuts, n_cut, n_fwd, T, SW_CHUNK, n_chunk_fwd);
        cudaError_t e =
            kvt_cu_chunk_table(cuts, n_cut, n_fwd, T, SW_CHUNK, tab, tab + mc, tab + 2 * mc,
                               with_cuts ? tab + 2 * mc + n_cut : NULL, NULL, st);
        KVT_RETURN_IF(e != cudaSuccess, KVT_ERR_CUDA, "%s: %s", who, cudaGetErrorString(e));
        return KVT_OK;
    }
    const size_t ints = 2 * mc + (size_t)n_cut * (with_cuts ? 2 : 1);
    int32_t *tab = (int32_t *)malloc(ints * sizeof(int32_t));
    KVT_RETURN_IF(!tab, KVT_ERR_NOMEM, "out of memory");
    *n_chunk = kvt_cu_chunks_host(cuts, n_cut, n_fwd, T, SW_CHUNK, tab, tab + mc, tab + 2 * mc,
                                  n_chunk_fwd);
    if (with_cuts)
        memcpy(tab + 2 * mc + n_cut, cuts, (size_t)n_cut * sizeof(int32_t));
    cudaError_t e = cudaMemcpyAsync(work, tab, ints * sizeof(int32_t), cudaMemcpyHostToDevice, st);
    free(tab); /* a pageable source is staged before the call returns */
    KVT_RETURN_IF(e != cudaSuccess, KVT_ERR_CUDA, "%s: %s", who, cudaGetErrorString(e));
    return KVT_OK;
}

extern "C" size_t kvt_sweep_output_cuda_work_bytes(int n_q, int T, int D, int n_cut)
{
    size_t mc = sweep_max_chunks(T, n_cut), nq = n_q > 0 ? (size_t)n_q : 0;
    return chunk_table_bytes(T, n_cut, false) +
           (mc * nq * ((size_t)(D > 0 ? D : 0) + 1 + NM) + nq) * sizeof(double) + 16;
}

extern "C" size_t kvt_sweep_cuda_work_bytes(int T, int n_cut, int n_probe)
{
    size_t nc = n_cut > 0 ? (size_t)n_cut : 0, np = n_probe > 0 ? (size_t)n_probe : 0;
    size_t n_chunk = nc + (T > 0 ? (size_t)T / KVT_CB_CHUNK + 1 : 0);
    /* coverage: chunk starts, ends, each cut's first chunk (ints), then the chunks' best values
     * (floats) and positions (ints) */
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
    KVT_RETURN_IF(!work || work_bytes < kvt_sweep_output_cuda_work_bytes(n_q, T, D, n_cut),
                  KVT_ERR_INVALID_ARG, "sweep_output_cuda: workspace of %zu bytes is too small",
                  work_bytes);
    const int n_fwd = kvt_sweep_n_fwd(cuts, n_cut, T);
    const size_t mc = sweep_max_chunks(T, n_cut);
    cudaStream_t st = kvt_cu_stream(stream);
    int n_chunk = 0, n_chunk_fwd = 0;
    KVT_FORWARD(put_chunk_table(cuts, n_cut, n_fwd, T, false, work, st, "sweep_output_cuda",
                                &n_chunk, &n_chunk_fwd));
    KVT_RETURN_IF(n_chunk > 65535 || n_cut > 65535, KVT_ERR_UNSUPPORTED,
                  "sweep_output_cuda: %d chunks, %d cuts", n_chunk, n_cut);
    const int32_t *dtab = (const int32_t *)work;
    double *pacc = (double *)((char *)work + chunk_table_bytes(T, n_cut, false));
    sweep_args a;
    a.n_q = n_q, a.T = T, a.D = D, a.p = p, a.stride_p = stride_p, a.v = v;
    a.a_full = a_full, a.stride_a = stride_a, a.p_extra = p_extra, a.stride_e = stride_e;
    a.o_extra = o_extra, a.r_full = r_full, a.order = order, a.n_cut = n_cut, a.n_fwd = n_fwd;
    a.n_chunk_fwd = n_chunk_fwd;
    a.cs = dtab, a.ce = dtab + mc, a.cend = dtab + 2 * mc;
    a.mod = mod, a.mass_mod = mass_mod, a.stride_m = stride_m;
    a.pacc = pacc, a.pr = pacc + (size_t)n_chunk * n_q * D, a.prm = a.pr + (size_t)n_chunk * n_q;
    a.rfw = a.prm + (size_t)n_chunk * n_q * NM;
    a.recall = recall, a.err = err, a.recall_mod = mod ? recall_mod : NULL;
    if (n_chunk > 0) {
        const dim3 grid((unsigned)((n_q + SW_ROWS - 1) / SW_ROWS), (unsigned)n_chunk);
        if (D <= SW_THREADS)
            sweep_part_k<1><<<grid, SW_THREADS, 0, st>>>(a);
        else if (D <= 2 * SW_THREADS)
            sweep_part_k<2><<<grid, SW_THREADS, 0, st>>>(a);
        else
            sweep_part_k<4><<<grid, SW_THREADS, 0, st>>>(a);
        KVT_CU_LAUNCHED();
    }
    if (!r_full) {
        sweep_rf_k<<<(unsigned)n_q, SW_THREADS, 0, st>>>(a);
        KVT_CU_LAUNCHED();
    }
    const dim3 grid_c((unsigned)n_q, (unsigned)n_cut);
    if (D <= SW_THREADS)
        sweep_rec_k<1><<<grid_c, SW_THREADS, 0, st>>>(a);
    else if (D <= 2 * SW_THREADS)
        sweep_rec_k<2><<<grid_c, SW_THREADS, 0, st>>>(a);
    else
        sweep_rec_k<4><<<grid_c, SW_THREADS, 0, st>>>(a);
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
    size_t wb = kvt_sweep_output_cuda_work_bytes(n_q, T, D, n_cut);
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

typedef struct rd_args {
    const float *ku;
    int D, n_cut;
    const int32_t *order, *cuts, *cs, *ce, *cend; /* as sweep_args (forward chunks only) */
    double *part;                                 /* [n_chunk, D] each chunk's sums */
    double *r;
} rd_args;

/* One block per chunk of ranked positions: thread d sums dimensions d, d + 128, ... of the
 * chunk's unit keys in ranking order (RD_LOADS rows loaded ahead, added in order). */
static __global__ void rd_part_k(rd_args a)
{
    __shared__ int32_t j_sh[RD_THREADS];
    const int k = blockIdx.x, tid = threadIdx.x, D = a.D, lo = a.cs[k], cnt = a.ce[k] - lo;
    double acc[RD_PER];
    for (int kk = 0; kk < RD_PER; kk++)
        acc[kk] = 0.0;
    for (int u0 = 0; u0 < cnt; u0 += RD_THREADS) {
        const int m = cnt - u0 < RD_THREADS ? cnt - u0 : RD_THREADS;
        __syncthreads(); /* the previous piece has been read */
        if (tid < m)
            j_sh[tid] = a.order[lo + u0 + tid];
        __syncthreads();
        for (int u = 0; u < m; u += RD_LOADS) {
            float x[RD_LOADS][RD_PER];
#pragma unroll
            for (int w = 0; w < RD_LOADS; w++)
#pragma unroll
                for (int kk = 0; kk < RD_PER; kk++) {
                    const int d = tid + kk * RD_THREADS;
                    x[w][kk] = u + w < m && d < D ? a.ku[(size_t)j_sh[u + w] * D + d] : 0.0f;
                }
#pragma unroll
            for (int w = 0; w < RD_LOADS; w++)
                if (u + w < m)
#pragma unroll
                    for (int kk = 0; kk < RD_PER; kk++)
                        acc[kk] = __dadd_rn(acc[kk], (double)x[w][kk]);
        }
    }
    for (int kk = 0; kk < RD_PER; kk++) {
        const int d = tid + kk * RD_THREADS;
        if (d < D)
            a.part[(size_t)k * D + d] = acc[kk];
    }
}

/* One block per cut: the chunk sums added in walk order up to the cut, then thread 0 sums the
 * squares over d in order (kvt_redundancy_of_sum). */
static __global__ void rd_cut_k(rd_args a)
{
    __shared__ double sum_sh[RD_THREADS * RD_PER];
    const int ci = blockIdx.x, tid = threadIdx.x, D = a.D;
    double acc[RD_PER];
    for (int kk = 0; kk < RD_PER; kk++)
        acc[kk] = 0.0;
    for (int k = 0; k < a.cend[ci]; k++)
        for (int kk = 0; kk < RD_PER; kk++) {
            const int d = tid + kk * RD_THREADS;
            if (d < D)
                acc[kk] = __dadd_rn(acc[kk], a.part[(size_t)k * D + d]);
        }
    for (int kk = 0; kk < RD_PER; kk++) {
        const int d = tid + kk * RD_THREADS;
        if (d < D)
            sum_sh[d] = acc[kk];
    }
    __syncthreads();
    if (tid == 0) {
        const int c = a.cuts[ci];
        double s2 = 0.0;
        for (int d = 0; d < D; d++)
            s2 = __dadd_rn(s2, __dmul_rn(sum_sh[d], sum_sh[d]));
        a.r[ci] = c < 2 ? (double)NAN : (s2 / c - 1.0) / (double)(c - 1);
    }
}

extern "C" size_t kvt_sweep_redundancy_cuda_work_bytes(int T, int D, int n_cut)
{
    return chunk_table_bytes(T, n_cut, true) +
           sweep_max_chunks(T, n_cut) * (size_t)(D > 0 ? D : 0) * sizeof(double);
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
    KVT_RETURN_IF(!work || work_bytes < kvt_sweep_redundancy_cuda_work_bytes(T, D, n_cut),
                  KVT_ERR_INVALID_ARG, "sweep_redundancy_cuda: workspace of %zu bytes is too small",
                  work_bytes);
    /* the chunk table (forward only, as the reference walks) with the cuts; the chunks' sums */
    const size_t mc = sweep_max_chunks(T, n_cut);
    cudaStream_t st = kvt_cu_stream(stream);
    int n_chunk = 0, n_chunk_fwd = 0;
    KVT_FORWARD(put_chunk_table(cuts, n_cut, n_cut, T, true, work, st, "sweep_redundancy_cuda",
                                &n_chunk, &n_chunk_fwd));
    const int32_t *dtab = (const int32_t *)work;
    rd_args a;
    a.ku = ku, a.D = D, a.n_cut = n_cut, a.order = order;
    a.cs = dtab, a.ce = dtab + mc, a.cend = dtab + 2 * mc, a.cuts = dtab + 2 * mc + n_cut;
    a.part = (double *)((char *)work + chunk_table_bytes(T, n_cut, true));
    a.r = r;
    if (n_chunk > 0) {
        rd_part_k<<<(unsigned)n_chunk, RD_THREADS, 0, st>>>(a);
        KVT_CU_LAUNCHED();
    }
    rd_cut_k<<<(unsigned)n_cut, RD_THREADS, 0, st>>>(a);
    KVT_CU_LAUNCHED();
    return KVT_OK;
}
