/* cuemu_runtime.c - the runtime half of cuemu (cuda_runtime_api.h): one device, everything
 * synchronous and in order, device memory tracked so that copies in the wrong direction and
 * host pointers handed to kernels are reported as the errors a GPU would give (an illegal
 * address). Thread-safe (replay workers call it from several threads).
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cuda_runtime_api.h"

typedef struct blk {
    uintptr_t p;
    size_t n;
} blk;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static blk *blocks;
static size_t n_blocks, cap_blocks;
static _Thread_local cudaError_t last_error = cudaSuccess;
static _Thread_local int cur_device = 0;

struct CUstream_st {
    unsigned flags;
};
struct CUevent_st {
    unsigned flags;
    int recorded;
    double t_ms; /* host clock when recorded: work queued before it has run (launches and copies
                    complete at once here) */
};

void cuemu_set_error(cudaError_t e, const char *what)
{
    if (e != cudaSuccess) {
        fprintf(stderr, "cuemu: %s: %s\n", what, cudaGetErrorString(e));
        if (last_error == cudaSuccess)
            last_error = e;
    }
}

static cudaError_t fail(cudaError_t e, const char *what)
{
    cuemu_set_error(e, what);
    return e;
}

const char *cudaGetErrorString(cudaError_t e)
{
    switch (e) {
    case cudaSuccess:
        return "no error";
    case cudaErrorInvalidValue:
        return "invalid argument";
    case cudaErrorMemoryAllocation:
        return "out of memory";
    case cudaErrorInvalidDevice:
        return "invalid device ordinal";
    case cudaErrorInvalidDevicePointer:
        return "invalid device pointer";
    case cudaErrorInvalidResourceHandle:
        return "invalid resource handle";
    case cudaErrorNotReady:
        return "device not ready";
    case cudaErrorIllegalAddress:
        return "an illegal memory access was encountered";
    case cudaErrorLaunchFailure:
        return "unspecified launch failure";
    case cudaErrorInsufficientDriver:
        return "CUDA driver version is insufficient for CUDA runtime version";
    case cudaErrorNoDevice:
        return "no CUDA-capable device is detected";
    case cudaErrorNotSupported:
        return "operation not supported";
    }
    return "unknown error";
}

cudaError_t cudaGetLastError(void)
{
    cudaError_t e = last_error;
    last_error = cudaSuccess;
    return e;
}

cudaError_t cudaGetDeviceCount(int *n)
{
    *n = 1;
    return cudaSuccess;
}

cudaError_t cudaRuntimeGetVersion(int *v)
{
    *v = 13000;
    return cudaSuccess;
}

cudaError_t cudaGetDevice(int *d)
{
    *d = cur_device;
    return cudaSuccess;
}

cudaError_t cudaSetDevice(int d)
{
    if (d != 0)
        return fail(cudaErrorInvalidDevice, "cudaSetDevice");
    cur_device = d;
    return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp *p, int d)
{
    if (d != 0)
        return fail(cudaErrorInvalidDevice, "cudaGetDeviceProperties");
    memset(p, 0, sizeof(*p));
    snprintf(p->name, sizeof(p->name), "cuemu (CPU emulation)");
    p->totalGlobalMem = 1ull << 32;
    p->multiProcessorCount = 1;
    p->major = 9;
    p->sharedMemPerBlock = 48 << 10;
    p->maxThreadsPerBlock = 1024;
    p->warpSize = 32;
    return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void)
{
    return cudaSuccess;
}

/* ---- device memory ---- */

int cuemu_is_device(const void *ptr, size_t n)
{
    if (!ptr)
        return 1;
    uintptr_t p = (uintptr_t)ptr;
    int ok = 0;
    pthread_mutex_lock(&mu);
    for (size_t i = 0; i < n_blocks && !ok; i++)
        ok = p >= blocks[i].p && p - blocks[i].p <= blocks[i].n &&
             n <= blocks[i].n - (p - blocks[i].p);
    pthread_mutex_unlock(&mu);
    return ok;
}

cudaError_t cudaMalloc(void **p, size_t n)
{
    *p = NULL;
    void *m = malloc(n ? n : 1);
    if (!m)
        return fail(cudaErrorMemoryAllocation, "cudaMalloc");
    memset(m, 0xff, n); /* a GPU's fresh memory is not zero: NaN for floats here */
    pthread_mutex_lock(&mu);
    if (n_blocks == cap_blocks) {
        size_t nc = cap_blocks ? 2 * cap_blocks : 64;
        blk *nb = realloc(blocks, nc * sizeof(*nb));
        if (!nb) {
            pthread_mutex_unlock(&mu);
            free(m);
            return fail(cudaErrorMemoryAllocation, "cudaMalloc");
        }
        blocks = nb;
        cap_blocks = nc;
    }
    blocks[n_blocks].p = (uintptr_t)m;
    blocks[n_blocks].n = n;
    n_blocks++;
    pthread_mutex_unlock(&mu);
    *p = m;
    return cudaSuccess;
}

cudaError_t cudaFree(void *p)
{
    if (!p)
        return cudaSuccess;
    pthread_mutex_lock(&mu);
    for (size_t i = 0; i < n_blocks; i++)
        if (blocks[i].p == (uintptr_t)p) {
            blocks[i] = blocks[--n_blocks];
            pthread_mutex_unlock(&mu);
            free(p);
            return cudaSuccess;
        }
    pthread_mutex_unlock(&mu);
    return fail(cudaErrorInvalidDevicePointer, "cudaFree of a pointer cudaMalloc did not return");
}

static int no_pools(void)
{
    const char *e = getenv("CUEMU_NO_POOLS");
    return e && *e && strcmp(e, "0") != 0;
}

cudaError_t cudaDeviceGetAttribute(int *v, cudaDeviceAttr a, int d)
{
    if (d != 0)
        return fail(cudaErrorInvalidDevice, "cudaDeviceGetAttribute");
    if (a != cudaDevAttrMemoryPoolsSupported)
        return fail(cudaErrorInvalidValue, "cudaDeviceGetAttribute");
    *v = !no_pools();
    return cudaSuccess;
}

cudaError_t cudaMallocAsync(void **p, size_t n, cudaStream_t s)
{
    (void)s;
    if (no_pools())
        return fail(cudaErrorNotSupported, "cudaMallocAsync without memory pools");
    return cudaMalloc(p, n);
}

cudaError_t cudaFreeAsync(void *p, cudaStream_t s)
{
    (void)s;
    if (no_pools())
        return fail(cudaErrorNotSupported, "cudaFreeAsync without memory pools");
    return p ? cudaFree(p) : fail(cudaErrorInvalidValue, "cudaFreeAsync(NULL)");
}

cudaError_t cudaHostAlloc(void **p, size_t n, unsigned flags)
{
    (void)flags;
    *p = malloc(n ? n : 1);
    return *p ? cudaSuccess : fail(cudaErrorMemoryAllocation, "cudaHostAlloc");
}

cudaError_t cudaMallocHost(void **p, size_t n)
{
    return cudaHostAlloc(p, n, 0);
}

cudaError_t cudaFreeHost(void *p)
{
    free(p);
    return cudaSuccess;
}

cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, cudaMemcpyKind k)
{
    if (n == 0)
        return cudaSuccess;
    int dd = cuemu_is_device(dst, n), sd = cuemu_is_device(src, n);
    int want_d = k == cudaMemcpyHostToDevice || k == cudaMemcpyDeviceToDevice;
    int want_s = k == cudaMemcpyDeviceToHost || k == cudaMemcpyDeviceToDevice;
    if (k != cudaMemcpyDefault && k != cudaMemcpyHostToHost && (dd != want_d || sd != want_s))
        return fail(cudaErrorInvalidValue,
                    "cudaMemcpy: a pointer is not on the side its kind says");
    memmove(dst, src, n);
    return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, cudaMemcpyKind k, cudaStream_t s)
{
    (void)s;
    return cudaMemcpy(dst, src, n, k);
}

cudaError_t cudaMemset(void *p, int v, size_t n)
{
    if (!cuemu_is_device(p, n))
        return fail(cudaErrorInvalidValue, "cudaMemset of memory that is not a device block");
    memset(p, v, n);
    return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t s)
{
    (void)s;
    return cudaMemset(p, v, n);
}

/* ---- streams and events: everything has completed when it is enqueued ---- */

cudaError_t cudaStreamCreate(cudaStream_t *s)
{
    return cudaStreamCreateWithFlags(s, 0);
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags)
{
    *s = calloc(1, sizeof(**s));
    if (!*s)
        return fail(cudaErrorMemoryAllocation, "cudaStreamCreate");
    (*s)->flags = flags;
    return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t s)
{
    free(s);
    return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t s)
{
    (void)s;
    return cudaSuccess;
}

cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags)
{
    (void)s, (void)flags;
    return e ? cudaSuccess : fail(cudaErrorInvalidResourceHandle, "cudaStreamWaitEvent");
}

cudaError_t cudaEventCreate(cudaEvent_t *e)
{
    return cudaEventCreateWithFlags(e, 0);
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned flags)
{
    *e = calloc(1, sizeof(**e));
    if (!*e)
        return fail(cudaErrorMemoryAllocation, "cudaEventCreate");
    (*e)->flags = flags;
    return cudaSuccess;
}

cudaError_t cudaEventDestroy(cudaEvent_t e)
{
    free(e);
    return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s)
{
    (void)s;
    if (!e)
        return fail(cudaErrorInvalidResourceHandle, "cudaEventRecord");
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    e->t_ms = (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
    e->recorded = 1;
    return cudaSuccess;
}

cudaError_t cudaEventQuery(cudaEvent_t e)
{
    return e ? cudaSuccess : fail(cudaErrorInvalidResourceHandle, "cudaEventQuery");
}

cudaError_t cudaEventSynchronize(cudaEvent_t e)
{
    return e ? cudaSuccess : fail(cudaErrorInvalidResourceHandle, "cudaEventSynchronize");
}

cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b)
{
    if (!a || !b || (a->flags & cudaEventDisableTiming) || (b->flags & cudaEventDisableTiming))
        return fail(cudaErrorInvalidResourceHandle, "cudaEventElapsedTime");
    if (!a->recorded || !b->recorded) /* as CUDA: an event never recorded has no time */
        return fail(cudaErrorInvalidResourceHandle, "cudaEventElapsedTime");
    *ms = (float)(b->t_ms - a->t_ms);
    return cudaSuccess;
}
