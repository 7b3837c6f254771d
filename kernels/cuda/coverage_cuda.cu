/* coverage_cuda.cu - coverage on probe keys: the cosine table (kvt_cosine_table_ref: dot
 * products of f32 unit keys summed in double, rounded to f32), and each probe's running best
 * cosine in ranking order up to every cut (the running part of kvt_sweep_coverage_ref, with
 * the reference's comparison, so the bests are bitwise the reference's). One thread per
 * (token, probe) and per probe respectively: correct first; tiling is left for the tuning.
 */
#include <math.h>

#include "../ref/sweep_cuts.h"
#include "cuda_util.cuh"

static __global__ void cosine_k(const float *ku, int T, int D, const int32_t *probe, int P,
                                float *ct)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= P)
        return;
    const float *kp = ku + (size_t)probe[i] * D;
    for (int t = blockIdx.y; t < T; t += gridDim.y) {
        const float *kt = ku + (size_t)t * D;
        ct[(size_t)t * P + i] = (float)kvt_cu_dot_f32(kt, kp, D);
    }
}

static __global__ void best_k(const float *ct, int P, const int32_t *order, const int32_t *cuts,
                              int n_cut, float *best)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= P)
        return;
    float b = -INFINITY;
    int t = 0;
    for (int c = 0; c < n_cut; c++) {
        for (; t < cuts[c]; t++) {
            float v = ct[(size_t)order[t] * P + i];
            b = v > b ? v : b;
        }
        best[(size_t)c * P + i] = b;
    }
}

extern "C" kvt_status kvt_cosine_table_cuda(const float *ku, int T, int D, const int32_t *probe,
                                            int n_probe, float *ct, void *stream)
{
    KVT_RETURN_IF(T < 0 || D <= 0 || n_probe < 0, KVT_ERR_INVALID_ARG,
                  "cosine_table_cuda: bad shape T=%d D=%d n_probe=%d", T, D, n_probe);
    if (T == 0 || n_probe == 0)
        return KVT_OK;
    dim3 grid(kvt_cu_blocks((size_t)n_probe, 128), T < 65535 ? T : 65535);
    cosine_k<<<grid, 128, 0, kvt_cu_stream(stream)>>>(ku, T, D, probe, n_probe, ct);
    KVT_CU_LAUNCHED();
    return KVT_OK;
}

extern "C" kvt_status kvt_coverage_best_cuda(const float *ct, int T, int n_probe,
                                             const int32_t *order, const int32_t *cuts, int n_cut,
                                             float *best, void *stream)
{
    KVT_RETURN_IF(T < 0 || n_probe < 0 || n_cut < 0, KVT_ERR_INVALID_ARG,
                  "coverage_cuda: bad shape");
    KVT_FORWARD(kvt_sweep_check_cuts(cuts, n_cut, T));
    if (n_probe == 0 || n_cut == 0)
        return KVT_OK;
    cudaStream_t st = kvt_cu_stream(stream);
    int32_t *dcuts = NULL;
    KVT_CU(cudaMalloc(&dcuts, (size_t)n_cut * sizeof(int32_t)));
    cudaError_t e =
        cudaMemcpyAsync(dcuts, cuts, (size_t)n_cut * sizeof(int32_t), cudaMemcpyHostToDevice, st);
    if (e == cudaSuccess) {
        best_k<<<kvt_cu_blocks((size_t)n_probe, 128), 128, 0, st>>>(ct, n_probe, order, dcuts,
                                                                    n_cut, best);
        e = cudaGetLastError();
    }
    if (e == cudaSuccess)
        e = cudaStreamSynchronize(st); /* before the cuts go */
    cudaFree(dcuts);
    KVT_RETURN_IF(e != cudaSuccess, KVT_ERR_CUDA, "coverage_cuda: %s", cudaGetErrorString(e));
    return KVT_OK;
}
