/* coverage_cuda.cu - coverage on probe keys: the cosine table (kvt_cosine_table_ref: dot
 * products of f32 unit keys summed in double, rounded to f32), and each probe's running best
 * cosine in ranking order up to every cut (the running part of kvt_sweep_coverage_ref, with
 * the reference's comparison, so the bests are bitwise the reference's). The table: the
 * logits' tiles of 32 tokens x 64 probes staged in shared memory (cosine_k), bitwise the
 * reference's. The bests:
 * the ranked positions of each cut are cut into chunks of KVT_CB_CHUNK (256), one block per (32
 * probes, chunk) reduces its chunk on 8 token lanes, and one thread per probe then runs the
 * prefix over chunks up to every cut (cb_better keeps the reduction bitwise the reference's
 * scan).
 */
#include <math.h>
#include <stdlib.h>

#include "../ref/sweep_cuts.h"
#include "cuda_util.cuh"

/* One block per (KVT_TILE_KEYS probes, KVT_TILE_ROWS-token tiles blockIdx.y, blockIdx.y +
 * gridDim.y, ...): the logits' tile (kvt_cu_tile_dots, cuda_util.cuh) with the tokens' unit keys
 * as its rows and the probes' as its keys (read through probe[]), so each dot product is summed
 * in double, d in order (kvt_cu_madd_f32): bitwise kvt_cu_dot_f32 and the reference, rounded
 * to f32. (Its own 32 x 32 tile read, per dimension, a probe value and four broadcast token
 * values for 4 fused multiply-adds: shared memory three times the f64 units' time. The table
 * is the replay's largest f64 product, T x probes x D per KV head.) */
static __global__ void __launch_bounds__(KVT_TILE_THREADS)
    cosine_k(const float *ku, int T, int D, const int32_t *probe, int P, float *ct)
{
    __shared__ kvt_cu_tile_sm sm;
    const int tx = threadIdx.x % 32, ty = threadIdx.x / 32, j0 = blockIdx.x * KVT_TILE_KEYS;
    double acc[KVT_TILE_RPW][2];
    for (int r0 = blockIdx.y * KVT_TILE_ROWS; r0 < T; r0 += gridDim.y * KVT_TILE_ROWS) {
        kvt_cu_tile_dots(ku, T, r0, ku, probe, P, NULL, P, j0, D, sm, acc);
#pragma unroll
        for (int u = 0; u < KVT_TILE_RPW; u++) {
            const size_t t = (size_t)r0 + KVT_TILE_RPW * ty + u;
            for (int c = 0; c < 2; c++) {
                const int i = j0 + tx + 32 * c;
                if (t < (size_t)T && i < P)
                    ct[t * P + i] = (float)acc[u][c];
            }
        }
    }
}

/* The running best of the reference's scan, b = v > b ? v : b from -inf in ranking order, as a
 * reduction: the larger value wins, and among equal values (+0 and -0 included) the earlier
 * position, which is the one the scan keeps; NaN never wins. So the best of a chunk, and of a
 * prefix of chunks, is bitwise the scan's whatever the order of the reduction. */
static __device__ inline bool cb_better(float v, int t, float bv, int bt)
{
    return v > bv || (v == bv && t < bt);
}

#define CB_TILE  32 /* probes per block: one warp reads 32 consecutive floats of a table row */
#define CB_LANES 8  /* token lanes per block */

/* One block per (probe tile, chunk of ranked positions [cstart, cend)): each lane scans every
 * CB_LANES-th position (CB_AHEAD of them loaded before they are compared, so that several
 * loads are in flight: the reduction's result does not depend on its order), then lane 0 of
 * each probe merges the lanes. */
#define CB_AHEAD 4
static __global__ void chunk_best_k(const float *ct, int P, const int32_t *order,
                                    const int32_t *cstart, const int32_t *cend, float *segv,
                                    int32_t *segt)
{
    __shared__ float sv[CB_LANES][CB_TILE];
    __shared__ int32_t st[CB_LANES][CB_TILE];
    const int lp = threadIdx.x % CB_TILE, lt = threadIdx.x / CB_TILE;
    const int i = blockIdx.x * CB_TILE + lp, k = blockIdx.y;
    float bv = -INFINITY;
    int32_t bt = 0x7fffffff;
    if (i < P)
        for (int t0 = cstart[k] + lt; t0 < cend[k]; t0 += CB_LANES * CB_AHEAD) {
            float v[CB_AHEAD];
#pragma unroll
            for (int u = 0; u < CB_AHEAD; u++) {
                const int t = t0 + u * CB_LANES;
                v[u] = t < cend[k] ? ct[(size_t)order[t] * P + i] : -INFINITY;
            }
#pragma unroll
            for (int u = 0; u < CB_AHEAD; u++) {
                const int t = t0 + u * CB_LANES;
                if (t < cend[k] && cb_better(v[u], t, bv, bt))
                    bv = v[u], bt = t;
            }
        }
    sv[lt][lp] = bv;
    st[lt][lp] = bt;
    __syncthreads();
    if (lt == 0 && i < P) {
        for (int l = 1; l < CB_LANES; l++)
            if (cb_better(sv[l][lp], st[l][lp], bv, bt))
                bv = sv[l][lp], bt = st[l][lp];
        segv[(size_t)k * P + i] = bv;
        segt[(size_t)k * P + i] = bt;
    }
}

/* One thread per probe: the best of every prefix of chunks ending at a cut. */
static __global__ void cut_best_k(const float *segv, const int32_t *segt, int P,
                                  const int32_t *cut_first, int n_cut, float *best)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= P)
        return;
    float bv = -INFINITY;
    int32_t bt = 0x7fffffff;
    for (int c = 0; c < n_cut; c++) {
        for (int k = cut_first[c]; k < cut_first[c + 1]; k++)
            if (cb_better(segv[(size_t)k * P + i], segt[(size_t)k * P + i], bv, bt))
                bv = segv[(size_t)k * P + i], bt = segt[(size_t)k * P + i];
        best[(size_t)c * P + i] = bv;
    }
}

extern "C" kvt_status kvt_cosine_table_cuda(const float *ku, int T, int D, const int32_t *probe,
                                            int n_probe, float *ct, void *stream)
{
    KVT_RETURN_IF(T < 0 || D <= 0 || n_probe < 0, KVT_ERR_INVALID_ARG,
                  "cosine_table_cuda: bad shape T=%d D=%d n_probe=%d", T, D, n_probe);
    if (T == 0 || n_probe == 0)
        return KVT_OK;
    const unsigned n_tiles = kvt_cu_blocks((size_t)T, KVT_TILE_ROWS);
    dim3 grid(kvt_cu_blocks((size_t)n_probe, KVT_TILE_KEYS), n_tiles < 65535 ? n_tiles : 65535);
    cosine_k<<<grid, KVT_TILE_THREADS, 0, kvt_cu_stream(stream)>>>(ku, T, D, probe, n_probe, ct);
    KVT_CU_LAUNCHED();
    return KVT_OK;
}

extern "C" kvt_status kvt_coverage_best_cuda_ws(const float *ct, int T, int n_probe,
                                                const int32_t *order, const int32_t *cuts,
                                                int n_cut, float *best, void *work,
                                                size_t work_bytes, void *stream)
{
    KVT_RETURN_IF(T < 0 || n_probe < 0 || n_cut < 0, KVT_ERR_INVALID_ARG,
                  "coverage_cuda: bad shape");
    KVT_FORWARD(kvt_sweep_check_cuts(cuts, n_cut, T));
    if (n_probe == 0 || n_cut == 0)
        return KVT_OK;
    KVT_RETURN_IF(!work || work_bytes < kvt_sweep_cuda_work_bytes(T, n_cut, n_probe),
                  KVT_ERR_INVALID_ARG, "coverage_cuda: workspace of %zu bytes is too small",
                  work_bytes);
    /* the chunks: each cut's new positions [cuts[c-1], cuts[c]) in pieces of KVT_CB_CHUNK;
       cf[c]: cut c's first chunk, cf[n_cut] their count. Built on the device from the cuts
       (kvt_cu_chunk_table: all cuts forward, the cuts' ends one place on), or for more than
       KVT_CU_PCUTS cuts here and copied */
    size_t max_chunk = (size_t)n_cut + (size_t)T / KVT_CB_CHUNK + 1;
    size_t ints = 2 * max_chunk + (size_t)n_cut + 1;
    int32_t *dtab = (int32_t *)work;
    float *segv = (float *)((char *)work + ((ints * sizeof(int32_t) + 15) / 16) * 16);
    int32_t *segt = (int32_t *)(segv + max_chunk * (size_t)n_probe);
    cudaStream_t st = kvt_cu_stream(stream);
    int n_chunk = 0, n_fwd_chunk = 0;
    cudaError_t e;
    if (n_cut <= KVT_CU_PCUTS) {
        n_chunk = kvt_cu_chunk_count(cuts, n_cut, n_cut, T, KVT_CB_CHUNK, &n_fwd_chunk);
        e = kvt_cu_chunk_table(cuts, n_cut, n_cut, T, KVT_CB_CHUNK, dtab, dtab + max_chunk,
                               dtab + 2 * max_chunk + 1, NULL, dtab + 2 * max_chunk, st);
    } else {
        int32_t *tab = (int32_t *)malloc(ints * sizeof(int32_t));
        KVT_RETURN_IF(!tab, KVT_ERR_NOMEM, "out of memory");
        int32_t *cf = tab + 2 * max_chunk;
        cf[0] = 0; /* cut c's first chunk: the end of cut c - 1's */
        n_chunk = kvt_cu_chunks_host(cuts, n_cut, n_cut, T, KVT_CB_CHUNK, tab, tab + max_chunk,
                                     cf + 1, &n_fwd_chunk);
        e = cudaMemcpyAsync(dtab, tab, ints * sizeof(int32_t), cudaMemcpyHostToDevice, st);
        free(tab); /* a pageable source is staged before the call returns */
    }
    KVT_RETURN_IF(e != cudaSuccess, KVT_ERR_CUDA, "coverage_cuda: %s", cudaGetErrorString(e));
    if (n_chunk > 0) {
        KVT_RETURN_IF(n_chunk > 65535, KVT_ERR_UNSUPPORTED, "coverage_cuda: %d chunks", n_chunk);
        dim3 grid((unsigned)((n_probe + CB_TILE - 1) / CB_TILE), (unsigned)n_chunk);
        chunk_best_k<<<grid, CB_TILE * CB_LANES, 0, st>>>(ct, n_probe, order, dtab,
                                                          dtab + max_chunk, segv, segt);
        KVT_CU_LAUNCHED();
    }
    cut_best_k<<<kvt_cu_blocks((size_t)n_probe, 128), 128, 0, st>>>(
        segv, segt, n_probe, dtab + 2 * max_chunk, n_cut, best);
    KVT_CU_LAUNCHED();
    return KVT_OK;
}

extern "C" kvt_status kvt_coverage_best_cuda(const float *ct, int T, int n_probe,
                                             const int32_t *order, const int32_t *cuts, int n_cut,
                                             float *best, void *stream)
{
    size_t wb = kvt_sweep_cuda_work_bytes(T, n_cut, n_probe);
    void *work = NULL;
    KVT_CU(cudaMalloc(&work, wb));
    kvt_status s =
        kvt_coverage_best_cuda_ws(ct, T, n_probe, order, cuts, n_cut, best, work, wb, stream);
    cudaError_t e = cudaStreamSynchronize(kvt_cu_stream(stream)); /* before the workspace goes */
    cudaFree(work);
    KVT_FORWARD(s);
    KVT_RETURN_IF(e != cudaSuccess, KVT_ERR_CUDA, "coverage_cuda: %s", cudaGetErrorString(e));
    return KVT_OK;
}
