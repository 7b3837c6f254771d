/* cuda_runtime_api.h (cuemu) - a CPU stand-in for the part of the CUDA runtime API kvtrace
 * uses, so that the CUDA sources and their GPU tests also build and run on a machine without a
 * GPU (tests/cuemu/README.md). NOT NVIDIA's header: only the names kvtrace calls, with the
 * semantics an in-order, single-device, synchronous GPU would have. Device memory is host
 * memory that cudaMalloc hands out (filled with 0xff bytes, so code that forgets to initialise
 * it reads NaNs) and tracks: kernel pointer arguments and copy directions are checked against
 * it. C and C++.
 */
#ifndef KVT_CUEMU_RUNTIME_API_H
#define KVT_CUEMU_RUNTIME_API_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum cudaError {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidDevice = 101,
    cudaErrorInvalidDevicePointer = 17,
    cudaErrorInvalidResourceHandle = 400,
    cudaErrorNotReady = 600,
    cudaErrorLaunchFailure = 719,
    cudaErrorIllegalAddress = 700,
    cudaErrorInsufficientDriver = 35,
    cudaErrorNoDevice = 100,
    cudaErrorNotSupported = 801,
} cudaError_t;

typedef enum cudaDeviceAttr {
    cudaDevAttrMemoryPoolsSupported = 115,
} cudaDeviceAttr;

typedef enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4,
} cudaMemcpyKind;

typedef struct CUstream_st *cudaStream_t;
typedef struct CUevent_st *cudaEvent_t;
typedef struct CUmemPoolHandle_st *cudaMemPool_t;

typedef enum cudaMemPoolAttr {
    cudaMemPoolReuseFollowEventDependencies = 1,
    cudaMemPoolReuseAllowOpportunistic = 2,
    cudaMemPoolReuseAllowInternalDependencies = 3,
    cudaMemPoolAttrReleaseThreshold = 4,
} cudaMemPoolAttr;

#define cudaStreamDefault      0x00
#define cudaStreamNonBlocking  0x01
#define cudaEventDefault       0x00
#define cudaEventBlockingSync  0x01
#define cudaEventDisableTiming 0x02
#define cudaHostAllocDefault   0x00
#define cudaHostAllocPortable  0x01

struct cudaDeviceProp {
    char name[256];
    size_t totalGlobalMem;
    int multiProcessorCount;
    int major, minor;
    size_t sharedMemPerBlock;
    int maxThreadsPerBlock;
    int warpSize;
};

const char *cudaGetErrorString(cudaError_t e);
cudaError_t cudaGetLastError(void);
cudaError_t cudaPeekAtLastError(void);
cudaError_t cudaGetDeviceCount(int *n);
cudaError_t cudaRuntimeGetVersion(int *v);
cudaError_t cudaGetDevice(int *d);
cudaError_t cudaSetDevice(int d);
cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp *p, int d);
cudaError_t cudaDeviceSynchronize(void);
cudaError_t cudaDeviceReset(void);
/* cudaDevAttrMemoryPoolsSupported: 1, or 0 with CUEMU_NO_POOLS=1 in the environment, which
 * also makes cudaMallocAsync / cudaFreeAsync fail (a GPU without memory pools) */
cudaError_t cudaDeviceGetAttribute(int *v, cudaDeviceAttr a, int d);

cudaError_t cudaMalloc(void **p, size_t n);
cudaError_t cudaFree(void *p);
cudaError_t cudaMallocAsync(void **p, size_t n, cudaStream_t s);
cudaError_t cudaMemGetInfo(size_t *free_b, size_t *total_b);
cudaError_t cudaFreeAsync(void *p, cudaStream_t s);
/* the device's default pool: a handle that only takes the attributes below (recorded, without
 * effect here: allocations are plain host memory); fails without memory pools */
cudaError_t cudaDeviceGetDefaultMemPool(cudaMemPool_t *pool, int d);
cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t pool, cudaMemPoolAttr a, void *v);
cudaError_t cudaHostAlloc(void **p, size_t n, unsigned flags);
cudaError_t cudaMallocHost(void **p, size_t n);
cudaError_t cudaFreeHost(void *p);
cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, cudaMemcpyKind k);
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, cudaMemcpyKind k, cudaStream_t s);
cudaError_t cudaMemset(void *p, int v, size_t n);
cudaError_t cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t s);

cudaError_t cudaStreamCreate(cudaStream_t *s);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags);
cudaError_t cudaEventCreate(cudaEvent_t *e);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned flags);
cudaError_t cudaEventDestroy(cudaEvent_t e);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s);
cudaError_t cudaEventQuery(cudaEvent_t e);
cudaError_t cudaEventSynchronize(cudaEvent_t e);
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b);

/* cuemu's own: work for stream s (cuemu_runtime.c: at once, or queued with CUEMU_DEFER=1); del
 * (may be NULL) frees ctx after fn ran. */
void cuemu_enqueue(cudaStream_t s, void (*fn)(void *), void *ctx, void (*del)(void *));
/* whether [p, p + n) lies in one live cudaMalloc block (1), or p is NULL (1). */
int cuemu_is_device(const void *p, size_t n);
/* the same, of device dev's memory */
int cuemu_is_device_on(const void *p, size_t n, int dev);
/* the device a kernel launched on s runs on (counted), or -1 with the error recorded when s
 * belongs to another device than the calling thread's current one */
int cuemu_launch_device(cudaStream_t s);
/* Record a launch or runtime error (returned by the next cudaGetLastError) and say so on
 * stderr; used by the device side. */
void cuemu_set_error(cudaError_t e, const char *what);
/* nonzero once the calling thread's exit has torn down its block scheduler (cuemu_device.cpp) */
int cuemu_thread_gone(void);

#ifdef __cplusplus
}
#endif
#endif /* KVT_CUEMU_RUNTIME_API_H */
