/* device_cuda.cu - kvt_cuda_devices: whether CUDA kernels can run here, and why not;
 * kvt_cuda_malloc_async / kvt_cuda_free_async: stream-ordered memory, or plain without pools. */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>

#include "cuda_util.cuh"

extern "C" int kvt_cuda_devices(char *why, size_t cap)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        /* without a driver the runtime says "driver version is insufficient": say what is
           missing instead */
        void *drv = e == cudaErrorInsufficientDriver ? dlopen("libcuda.so.1", RTLD_LAZY) : NULL;
        int rt = 0;
        cudaRuntimeGetVersion(&rt);
        if (why && cap && e == cudaErrorInsufficientDriver && !drv)
            snprintf(why, cap, "no NVIDIA driver: libcuda.so.1 is not installed");
        else if (why && cap && e == cudaErrorInsufficientDriver)
            snprintf(why, cap, "the NVIDIA driver is older than this build's CUDA %d.%d runtime",
                     rt / 1000, rt % 1000 / 10);
        else if (why && cap && e == cudaErrorNoDevice)
            snprintf(why, cap, "no NVIDIA GPU found");
        else if (why && cap)
            snprintf(why, cap, "CUDA: %s", cudaGetErrorString(e));
        if (drv)
            dlclose(drv);
        cudaGetLastError(); /* clear the sticky-free error state */
        return 0;
    }
    if (n == 0 && why && cap)
        snprintf(why, cap, "CUDA: no device");
    return n;
}

/* The device's default pool keeps the memory freed into it (release threshold: all of it) and
 * does not make one stream's allocation wait for another stream's work (no internal
 * dependencies). By default it returns unused memory to the driver at every synchronisation, so
 * each stream-ordered allocation after a cudaStreamSynchronize (the replay: one per kernel call,
 * every attention call's temporaries, every layer's buffers) maps physical memory again; and
 * with several worker streams it may reuse a block another worker freed by making the
 * allocating stream wait for that worker's queued kernels. Setting an attribute twice (racing
 * threads) is harmless; a failure leaves the pool as it was (only slower). */
static void pool_setup(int dev)
{
    cudaMemPool_t pool;
    if (cudaDeviceGetDefaultMemPool(&pool, dev) != cudaSuccess) {
        cudaGetLastError(); /* this call's error only */
        return;
    }
    uint64_t keep = UINT64_MAX;
    int no = 0;
    if (cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep) != cudaSuccess ||
        cudaMemPoolSetAttribute(pool, cudaMemPoolReuseAllowInternalDependencies, &no) !=
            cudaSuccess)
        cudaGetLastError();
}

/* Whether the current device has memory pools (stream-ordered allocation), asked once per
 * device (then its default pool is set up: pool_setup); racing threads store the same answer. */
static bool pools_ok(void)
{
    static int known[64]; /* 0 not asked, 1 yes, 2 no */
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64)
        return false;
    int v = __atomic_load_n(&known[dev], __ATOMIC_RELAXED);
    if (!v) {
        int a = 0;
        cudaError_t e = cudaDeviceGetAttribute(&a, cudaDevAttrMemoryPoolsSupported, dev);
        if (e != cudaSuccess)
            cudaGetLastError(); /* this call's error only: a pending launch error stays */
        v = e == cudaSuccess && a ? 1 : 2;
        if (v == 1)
            pool_setup(dev);
        __atomic_store_n(&known[dev], v, __ATOMIC_RELAXED);
    }
    return v == 1;
}

extern "C" int kvt_cuda_malloc_async(void **p, size_t bytes, void *stream)
{
    if (pools_ok())
        return (int)cudaMallocAsync(p, bytes, kvt_cu_stream(stream));
    return (int)cudaMalloc(p, bytes);
}

extern "C" int kvt_cuda_free_async(void *p, void *stream)
{
    if (pools_ok())
        return (int)cudaFreeAsync(p, kvt_cu_stream(stream));
    cudaError_t e = cudaStreamSynchronize(kvt_cu_stream(stream)); /* its work may still read p */
    cudaError_t f = cudaFree(p);
    return (int)(e != cudaSuccess ? e : f);
}
