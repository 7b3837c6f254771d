/* test_capture_timeline_gpu.c - the CUPTI collector on a real GPU (label gpu; exit 77, "not
 * run", without a device or where CUPTI may not trace): two 8 MiB copies, one on a stream
 * marked as the capture's, must appear in the summary with their exact bytes, and no kernel
 * runs. Then a capture session of device tensors, timed as Python's close() does it
 * (kvt_capture_sync_device, the session's own stream from kvt_capture_device_stream): its
 * device-to-host copies count as the capture's, at least the bytes it says it copied.
 * Built only with CUDA and CUPTI headers.
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
    uint32_t cid = 0, sid = 0;
    KVT_CHECK(kvt_timeline_stream_id(tl, st, &cid, &sid));
    KVT_EXPECT(cudaMemcpyAsync(d, h, N, cudaMemcpyHostToDevice, st) == cudaSuccess);
    KVT_EXPECT(cudaStreamSynchronize(st) == cudaSuccess);
    KVT_EXPECT(cudaMemcpy(h, d, N, cudaMemcpyDeviceToHost) == cudaSuccess);
    KVT_EXPECT(cudaDeviceSynchronize() == cudaSuccess);
    kvt_capture_timeline t;
    KVT_CHECK(kvt_timeline_stop(tl, cid, sid, &t));
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

    /* a capture of device tensors: one layer, K/V [2, 512, 64] and Q [4, 512, 64] f32 */
    enum { H = 2, HQ = 4, T = 512, D = 64 };
    float *dk = NULL, *dq = NULL;
    KVT_EXPECT(cudaMalloc((void **)&dk, sizeof(float) * H * T * D) == cudaSuccess);
    KVT_EXPECT(cudaMalloc((void **)&dq, sizeof(float) * HQ * T * D) == cudaSuccess);
    KVT_EXPECT(cudaMemset(dk, 0x3c, sizeof(float) * H * T * D) == cudaSuccess);
    KVT_EXPECT(cudaMemset(dq, 0x3c, sizeof(float) * HQ * T * D) == cudaSuccess);
    KVT_EXPECT(cudaStreamCreate(&st) == cudaSuccess);
    tl = kvt_timeline_start(why, sizeof(why));
    KVT_EXPECT_MSG(tl != NULL, "%s", why);
    struct kvt_capture_model m = {.name = "tl",
                                  .arch = "llama",
                                  .n_layers = 1,
                                  .n_q_heads = HQ,
                                  .n_kv_heads = H,
                                  .head_dim = D,
                                  .kv_dtype = KVT_DTYPE_F32};
    struct kvt_capture_opts o = {.n_tokens = T, .window = 16, .writer = {.force = true}};
    char path[256];
    kvt_capture_session *s = NULL;
    KVT_CHECK(kvt_capture_open(kvt_test_tmp(path, sizeof(path), "tl.kvt"), &m, &o, &s));
    struct kvt_tensor_view vk, vq;
    kvt_tensor_view_hTd(&vk, dk, KVT_DTYPE_F32, H, T, D);
    kvt_tensor_view_hTd(&vq, dq, KVT_DTYPE_F32, HQ, T, D);
    vk.mem = vq.mem = KVT_MEM_CUDA;
    vk.stream = vq.stream = st;
    KVT_CHECK(kvt_capture_submit_kv(s, 0, 0, &vk, &vk));
    KVT_CHECK(kvt_capture_submit_queries(s, 0, 0, &vq));
    KVT_CHECK(kvt_capture_sync_device(s));
    void *own = kvt_capture_device_stream(s);
    KVT_EXPECT(own != NULL);
    cid = sid = 0;
    if (tl && own)
        KVT_CHECK(kvt_timeline_stream_id(tl, own, &cid, &sid));
    struct kvt_capture_stats cs;
    kvt_capture_get_stats(s, &cs);
    if (tl) {
        KVT_CHECK(kvt_timeline_stop(tl, cid, sid, &t));
        printf("capture timeline: %llu copies, capture's %llu bytes (session copied %llu)\n",
               (unsigned long long)t.n_memcpy, (unsigned long long)t.capture_copy_bytes,
               (unsigned long long)cs.device_d2h_bytes);
        KVT_EXPECT(cs.device_d2h_bytes > 0);
        KVT_EXPECT(t.capture_copy_bytes >= cs.device_d2h_bytes);
        KVT_EXPECT(t.capture_copy_ns > 0);
    }
    KVT_CHECK(kvt_capture_close(s, NULL));
    unlink(path);
    cudaStreamDestroy(st);
    cudaFree(dk);
    cudaFree(dq);
    return kvt_test_result("test_capture_timeline_gpu");
}
