/* cuda_util.cuh - shared by the CUDA kernels: CUDA errors as kvt_status (KVT_ERR_CUDA with the
 * call and CUDA's message), the stream cast, grid sizes, the references' dot product, block
 * reductions. Internal to kernels/cuda/.
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

/* Dot product of two f32 vectors in double, d in order, each product and sum rounded as the
 * CPU references round them (no fused multiply-add). */
static __device__ inline double kvt_cu_dot_f32(const float *a, const float *b, int D)
{
    double s = 0.0;
    for (int d = 0; d < D; d++)
        s = __dadd_rn(s, __dmul_rn((double)a[d], (double)b[d]));
    return s;
}

/* Block-wide max (MAX) or sum of one double per thread, the result in every thread. THREADS is
 * the block size (a multiple of 32); sh holds THREADS / 32 + 1 doubles of shared memory. Every
 * thread of the block must call it. */
template <int THREADS, bool MAX> static __device__ double kvt_cu_block_reduce(double x, double *sh)
{
    for (int o = 16; o > 0; o >>= 1) {
        double y = __shfl_down_sync(0xffffffffu, x, o);
        x = MAX ? (y > x ? y : x) : x + y;
    }
    if (threadIdx.x % 32 == 0)
        sh[threadIdx.x / 32] = x;
    __syncthreads();
    if (threadIdx.x == 0) {
        double r = sh[0];
        for (int w = 1; w < THREADS / 32; w++)
            r = MAX ? (sh[w] > r ? sh[w] : r) : r + sh[w];
        sh[THREADS / 32] = r;
    }
    __syncthreads();
    double r = sh[THREADS / 32];
    __syncthreads();
    return r;
}

#endif /* KVT_CUDA_UTIL_CUH */
