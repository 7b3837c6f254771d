/* device_cuda.cu - kvt_cuda_devices: whether CUDA kernels can run here, and why not. */
#include <stdio.h>

#include "cuda_util.cuh"

extern "C" int kvt_cuda_devices(char *why, size_t cap)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        if (why && cap)
            snprintf(why, cap, "CUDA: %s", cudaGetErrorString(e));
        cudaGetLastError(); /* clear the sticky-free error state */
        return 0;
    }
    if (n == 0 && why && cap)
        snprintf(why, cap, "CUDA: no device");
    return n;
}
