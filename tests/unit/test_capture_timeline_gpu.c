/* test_capture_timeline_gpu.c - the CUPTI collector on a real GPU (label gpu; exit 77, "not
 * run", without a device or where CUPTI may not trace): two 8 MiB copies, one on a stream
 * marked as the capture's, must appear in the summary with their exact bytes, and no kernel
 * runs. Built only with CUDA and CUPTI headers.
 */
#include <cuda_runtime_api.h>
#include <stdio.h>

#include "kvt_capture.h"
#include "kvt_test.h"

int main(void)
{
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
        printf("test_capture_timeline_gpu: no CUDA device: not run\n");
        return 77;
    }
    char why[256];
    kvt_timeline *tl = kvt_timeline_start(why, sizeof(why));
    if (!tl) {
        printf("test_capture_timeline_gpu: %s: not run\n", why);
        return 77;
    }
    const size_t N = (size_t)8 << 20;
    void *d = NULL, *h = NULL;
    cudaStream_t st;
    KVT_EXPECT(cudaMalloc(&d, N) == cudaSuccess && cudaMallocHost(&h, N) == cudaSuccess);
    KVT_EXPECT(cudaStreamCreate(&st) == cudaSuccess);
    uint32_t sid = 0;
    KVT_CHECK(kvt_timeline_stream_id(tl, st, &sid));
    KVT_EXPECT(cudaMemcpyAsync(d, h, N, cudaMemcpyHostToDevice, st) == cudaSuccess);
    KVT_EXPECT(cudaStreamSynchronize(st) == cudaSuccess);
    KVT_EXPECT(cudaMemcpy(h, d, N, cudaMemcpyDeviceToHost) == cudaSuccess);
    KVT_EXPECT(cudaDeviceSynchronize() == cudaSuccess);
    kvt_capture_timeline t;
    KVT_CHECK(kvt_timeline_stop(tl, sid, &t));
    printf("timeline: %llu copies, %llu bytes, %llu ns; capture's %llu bytes; %llu kernels\n",
           (unsigned long long)t.n_memcpy, (unsigned long long)t.memcpy_bytes,
           (unsigned long long)t.memcpy_ns, (unsigned long long)t.capture_copy_bytes,
           (unsigned long long)t.n_kernels);
    KVT_EXPECT_EQ_U64(t.n_memcpy, 2);
    KVT_EXPECT_EQ_U64(t.memcpy_bytes, 2 * N);
    KVT_EXPECT_EQ_U64(t.capture_copy_bytes, N);
    KVT_EXPECT(t.memcpy_ns > 0 && t.capture_copy_ns > 0 && t.capture_copy_ns < t.memcpy_ns);
    KVT_EXPECT_EQ_U64(t.n_kernels, 0);
    KVT_EXPECT_EQ_U64(t.capture_copy_overlap_ns, 0);
    cudaStreamDestroy(st);
    cudaFree(d);
    cudaFreeHost(h);
    return kvt_test_result("test_capture_timeline_gpu");
}
