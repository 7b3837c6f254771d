/* device_cuda.cu - kvt_cuda_devices: whether CUDA kernels can run here, and why not. */
#include <dlfcn.h>
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
