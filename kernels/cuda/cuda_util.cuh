/* cuda_util.cuh - shared by the CUDA kernels: CUDA errors as kvt_status (KVT_ERR_CUDA with the
 * call and CUDA's message), the stream cast, grid sizes. Internal to kernels/cuda/.
 */
#ifndef KVT_CUDA_UTIL_CUH
#define KVT_CUDA_UTIL_CUH

#include <cuda_runtime.h>

#include "kvt_kernels_cuda.h"

#define KVT_CU(call)                                                                               \
    do {                                                                                           \
        cudaError_t kvt_e_ = (call);                                                               \
        if (kvt_e_ != cudaSuccess)                                                                 \
            return kvt_error_set(KVT_ERR_CUDA, "%s: %s", #call, cudaGetErrorString(kvt_e_));       \
    } while (0)

/* after a launch: a bad configuration shows up here, a fault at the next synchronisation */
#define KVT_CU_LAUNCHED() KVT_CU(cudaGetLastError())

static inline cudaStream_t kvt_cu_stream(void *s)
{
    return (cudaStream_t)s;
}

static inline unsigned kvt_cu_blocks(size_t n, unsigned threads)
{
    size_t b = (n + threads - 1) / threads;
    return (unsigned)(b > 0x7fffffffu ? 0x7fffffffu : (b ? b : 1));
}

#endif /* KVT_CUDA_UTIL_CUH */
