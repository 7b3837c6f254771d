/* rank_cuda.cu - per-segment rankings (kvt_rank_desc_ref on each head's scores): every score
 * becomes kvt_rank_key (ascending key = the ranking order), then CUB's stable segmented radix
 * sort orders (key, index) pairs; stability keeps ties in index order, so each permutation is
 * the reference's exactly. Its temporaries are stream-ordered (kvt_cuda_malloc_async): a plain
 * cudaFree would wait for every stream of the device, the other replay workers' too.
 */
#include <cub/device/device_segmented_radix_sort.cuh>

#include "../ref/rank_key.h"
#include "cuda_util.cuh"

static __global__ void keys_k(const double *score, size_t total, int n, uint64_t *key, int32_t *idx,
                              int *off, int n_seg)
{
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= (size_t)n_seg)
        off[i] = (int)(i * (size_t)n);
    if (i >= total)
        return;
    key[i] = kvt_rank_key(score[i]);
    idx[i] = (int32_t)(i % (size_t)n);
}

extern "C" kvt_status kvt_rank_desc_segmented_cuda(const double *score, int n_seg, int n,
                                                   int32_t *order, void *stream)
{
    KVT_RETURN_IF(n_seg < 0 || n < 0 || (size_t)n_seg * (size_t)n > 0x7fffffffu,
                  KVT_ERR_INVALID_ARG, "rank_cuda: bad shape n_seg=%d n=%d", n_seg, n);
    size_t total = (size_t)n_seg * n;
    if (total == 0)
        return KVT_OK;
    cudaStream_t st = kvt_cu_stream(stream);
    uint64_t *k_in = NULL, *k_out = NULL;
    int32_t *idx = NULL;
    int *off = NULL;
    void *tmp = NULL;
    size_t tmp_bytes = 0;
    kvt_status s = KVT_OK;
    cudaError_t e;
    if ((e = (cudaError_t)kvt_cuda_malloc_async((void **)&k_in, total * sizeof(uint64_t), st)) !=
            cudaSuccess ||
        (e = (cudaError_t)kvt_cuda_malloc_async((void **)&k_out, total * sizeof(uint64_t), st)) !=
            cudaSuccess ||
        (e = (cudaError_t)kvt_cuda_malloc_async((void **)&idx, total * sizeof(int32_t), st)) !=
            cudaSuccess ||
        (e = (cudaError_t)kvt_cuda_malloc_async((void **)&off, ((size_t)n_seg + 1) * sizeof(int),
                                                st)) != cudaSuccess) {
        s = kvt_error_set(KVT_ERR_CUDA, "rank_cuda: cudaMalloc: %s", cudaGetErrorString(e));
        goto out;
    }
    keys_k<<<kvt_cu_blocks(total + 1, 256), 256, 0, st>>>(score, total, n, k_in, idx, off, n_seg);
    if ((e = cudaGetLastError()) != cudaSuccess ||
        (e = cub::DeviceSegmentedRadixSort::SortPairs(NULL, tmp_bytes, k_in, k_out, idx, order,
                                                      (int)total, n_seg, off, off + 1, 0, 64,
                                                      st)) != cudaSuccess ||
        (e = (cudaError_t)kvt_cuda_malloc_async(&tmp, tmp_bytes ? tmp_bytes : 1, st)) !=
            cudaSuccess ||
        (e = cub::DeviceSegmentedRadixSort::SortPairs(tmp, tmp_bytes, k_in, k_out, idx, order,
                                                      (int)total, n_seg, off, off + 1, 0, 64,
                                                      st)) != cudaSuccess ||
        (e = cudaStreamSynchronize(st)) != cudaSuccess)
        s = kvt_error_set(KVT_ERR_CUDA, "rank_cuda: %s", cudaGetErrorString(e));
out: /* freed in stream order, after the sort (NULL is fine) */
    void *bufs[] = {k_in, k_out, idx, off, tmp};
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++)
        if (bufs[i])
            kvt_cuda_free_async(bufs[i], st);
    return s;
}
