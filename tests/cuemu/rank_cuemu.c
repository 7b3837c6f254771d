/* rank_cuemu.c - kvt_rank_desc_segmented_cuda under cuemu: rank_cuda.cu sorts with CUB, which
 * cuemu cannot run, so the emulated build ranks each segment with the reference instead. The
 * rank kernel is therefore NOT checked by the cuemu tests (only on a GPU, test_kernels_cuda).
 */
#include <stdlib.h>
#include <string.h>

#include "cuda_runtime_api.h"
#include "kvt_kernels_cuda.h"

kvt_status kvt_rank_desc_segmented_cuda(const double *score, int n_seg, int n, int32_t *order,
                                        void *stream)
{
    KVT_RETURN_IF(n_seg < 0 || n < 0, KVT_ERR_INVALID_ARG, "rank: bad shape");
    /* the work queued before on the stream (deferred under CUEMU_DEFER) writes the scores */
    KVT_RETURN_IF(cudaStreamSynchronize((cudaStream_t)stream) != cudaSuccess, KVT_ERR_CUDA,
                  "rank: the stream failed");
    KVT_RETURN_IF(!cuemu_is_device(score, (size_t)n_seg * n * sizeof(double)) ||
                      !cuemu_is_device(order, (size_t)n_seg * n * sizeof(int32_t)),
                  KVT_ERR_CUDA, "rank: pointers outside device memory");
    int32_t *work = malloc((size_t)(n > 0 ? n : 1) * 2 * sizeof(int32_t));
    KVT_RETURN_IF(!work, KVT_ERR_NOMEM, "out of memory");
    for (int s = 0; s < n_seg; s++)
        kvt_rank_desc_ref(score + (size_t)s * n, n, order + (size_t)s * n, work);
    free(work);
    return KVT_OK;
}
