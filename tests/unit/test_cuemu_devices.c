/* test_cuemu_devices.c - cuemu's several devices (CUEMU_DEVICES=N, tests/cuemu) keep the CUDA
 * rules that replay --device cuda's multi-GPU tests rely on, so that code using the wrong device
 * fails there as on a GPU: the current device is per thread; memory, streams and events belong
 * to the device current when they were made (cudaMallocAsync: its stream's); a kernel launched on
 * another device's stream fails, as does one given another device's memory; an event recorded on
 * another device's stream fails; cudaMemGetInfo and cudaDeviceReset are the current device's;
 * CUEMU_MEM_BYTES="A,B" gives each device its own memory. The kernel: kvt_widen_cuda (bf16 to
 * f32). Only on cuemu (a machine with one GPU cannot run it).
 */
#include <cuda_runtime_api.h>
#include <pthread.h>

#include "kvt_kernels_cuda.h"
#include "kvt_test.h"

#define N 64

static void *current_elsewhere(void *arg)
{
    int *d = arg;
    cudaGetDevice(d);
    return NULL;
}

/* bf16 of 1.5 * i on dev's stream s, from src into dst; the widened values checked when ok */
static void widen(const uint16_t *src, float *dst, cudaStream_t s, bool ok)
{
    kvt_status st = kvt_widen_cuda(KVT_DTYPE_BF16, src, N, dst, (void *)s);
    cudaGetLastError();
    KVT_EXPECT_MSG((st == KVT_OK) == ok, "widen: %s (%s), expected %s", kvt_status_str(st),
                   kvt_error_msg(), ok ? "success" : "a failure");
    if (!ok || st != KVT_OK)
        return;
    float h[N];
    KVT_EXPECT(cudaStreamSynchronize(s) == cudaSuccess);
    KVT_EXPECT(cudaMemcpy(h, dst, sizeof(h), cudaMemcpyDeviceToHost) == cudaSuccess);
    for (int i = 0; i < N; i++)
        KVT_EXPECT(h[i] == 1.5f * (float)i);
}

int main(void)
{
    setenv("CUEMU_DEVICES", "2", 1);
    setenv("CUEMU_MEM_BYTES", "1048576,4194304", 1);
    int n = 0, d = -1;
    KVT_EXPECT(cudaGetDeviceCount(&n) == cudaSuccess && n == 2);
    KVT_EXPECT(cudaSetDevice(2) == cudaErrorInvalidDevice);
    cudaGetLastError();

    uint16_t hs[N];
    for (int i = 0; i < N; i++) { /* 1.5 * i is exact in bf16 for i < 64 */
        float f = 1.5f * (float)i;
        uint32_t b;
        memcpy(&b, &f, 4);
        hs[i] = (uint16_t)(b >> 16);
    }
    uint16_t *src[2];
    float *dst[2];
    cudaStream_t st[2];
    cudaEvent_t ev[2];
    size_t fr[2], tot[2];
    for (int dev = 0; dev < 2; dev++) {
        KVT_EXPECT(cudaSetDevice(dev) == cudaSuccess);
        KVT_EXPECT(cudaMemGetInfo(&fr[dev], &tot[dev]) == cudaSuccess);
        KVT_EXPECT(cudaStreamCreateWithFlags(&st[dev], cudaStreamNonBlocking) == cudaSuccess);
        KVT_EXPECT(cudaEventCreateWithFlags(&ev[dev], cudaEventDisableTiming) == cudaSuccess);
        KVT_EXPECT(cudaMalloc((void **)&src[dev], sizeof(hs)) == cudaSuccess);
        KVT_EXPECT(cudaMemcpy(src[dev], hs, sizeof(hs), cudaMemcpyHostToDevice) == cudaSuccess);
        KVT_EXPECT(cudaMallocAsync((void **)&dst[dev], N * sizeof(float), st[dev]) == cudaSuccess);
    }
    /* each device's own memory (CUEMU_MEM_BYTES's list), and what it lends */
    KVT_EXPECT_EQ_U64(tot[0], 1048576);
    KVT_EXPECT_EQ_U64(tot[1], 4194304);
    void *big = NULL;
    KVT_EXPECT(cudaMalloc(&big, 2 << 20) == cudaSuccess); /* device 1 current: 4 MiB */
    cudaFree(big);
    KVT_EXPECT(cudaSetDevice(0) == cudaSuccess);
    KVT_EXPECT(cudaMemGetInfo(&fr[0], &tot[0]) == cudaSuccess); /* its own blocks only */
    KVT_EXPECT_EQ_U64(fr[0], tot[0] - sizeof(hs) - N * sizeof(float));
    KVT_EXPECT(cudaMalloc(&big, 2 << 20) == cudaErrorMemoryAllocation); /* device 0: 1 MiB */
    cudaGetLastError();

    /* the current device is the thread's own */
    pthread_t th;
    KVT_EXPECT(cudaSetDevice(1) == cudaSuccess);
    KVT_EXPECT(pthread_create(&th, NULL, current_elsewhere, &d) == 0);
    pthread_join(th, NULL);
    KVT_EXPECT(d == 0);

    /* kernels: on the current device's stream with its memory only */
    widen(src[1], dst[1], st[1], true);
    widen(src[0], dst[1], st[1], false); /* another device's input */
    widen(src[1], dst[0], st[1], false); /* another device's output */
    widen(src[0], dst[0], st[0], false); /* device 0's stream while device 1 is current */
    KVT_EXPECT(cudaSetDevice(0) == cudaSuccess);
    widen(src[0], dst[0], st[0], true);
    widen(src[1], dst[1], st[1], false);

    /* events: recorded on their own device's streams only; waited for across devices */
    KVT_EXPECT(cudaEventRecord(ev[0], st[0]) == cudaSuccess);
    KVT_EXPECT(cudaEventRecord(ev[0], st[1]) == cudaErrorInvalidResourceHandle);
    cudaGetLastError();
    KVT_EXPECT(cudaStreamWaitEvent(st[1], ev[0], 0) == cudaSuccess);
    KVT_EXPECT(cudaEventSynchronize(ev[0]) == cudaSuccess);

    /* copies between devices' memory and the host work from any current device */
    KVT_EXPECT(cudaMemcpy(dst[0], dst[1], N * sizeof(float), cudaMemcpyDeviceToDevice) ==
               cudaSuccess);

    /* a reset frees the current device's memory only */
    KVT_EXPECT(cudaSetDevice(1) == cudaSuccess);
    KVT_EXPECT(cudaStreamDestroy(st[1]) == cudaSuccess);
    KVT_EXPECT(cudaEventDestroy(ev[1]) == cudaSuccess);
    KVT_EXPECT(cudaDeviceReset() == cudaSuccess);
    KVT_EXPECT(cudaMemGetInfo(&fr[1], &tot[1]) == cudaSuccess && fr[1] == tot[1]);
    KVT_EXPECT(cudaSetDevice(0) == cudaSuccess);
    widen(src[0], dst[0], st[0], true); /* device 0's memory is still there */
    KVT_EXPECT(cudaFree(dst[1]) == cudaErrorInvalidDevicePointer); /* gone with the reset */
    cudaGetLastError();
    cudaStreamDestroy(st[0]);
    cudaEventDestroy(ev[0]);
    cudaFree(src[0]);
    cudaFree(dst[0]);
    return kvt_test_result("test_cuemu_devices");
}
