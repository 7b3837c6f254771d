/* capture_cuda_stub.c - the device side of a capture session in a build without CUDA: device
 * tensors are refused with one clear message (capture_dev.h; capture_cuda.cu is the real one).
 */
#include <string.h>

#include "capture_dev.h"

kvt_status kvt_capdev_create(int device, kvt_trace_writer *w, uint64_t ring_bytes, kvt_capdev **out)
{
    (void)device;
    (void)w;
    (void)ring_bytes;
    if (out)
        *out = NULL;
    return kvt_error_set(KVT_ERR_NO_CUDA,
                         "capture: this kvtrace was built without CUDA: device tensors cannot be "
                         "captured (rebuild with the CUDA toolkit, or pass host tensors)");
}

kvt_status kvt_capdev_reserve(int device, uint64_t ring_bytes, uint64_t slot_bytes)
{
    (void)device;
    (void)ring_bytes;
    (void)slot_bytes;
    return kvt_error_set(KVT_ERR_NO_CUDA, "capture: this kvtrace was built without CUDA");
}

void kvt_capdev_unreserve(void)
{
}

uint64_t kvt_capdev_reserved_bytes(void)
{
    return 0;
}

kvt_status kvt_capdev_emit(kvt_capdev *d, const kvt_capdev_view *v, int64_t t0,
                           const kvt_record_info *info)
{
    (void)d, (void)v, (void)t0, (void)info;
    return kvt_error_set(KVT_ERR_NO_CUDA, "capture: built without CUDA");
}

kvt_status kvt_capdev_gather(kvt_capdev *d, const kvt_capdev_view *v, int64_t t0, int64_t nt,
                             kvt_dtype dst_dt, void *dst, int64_t dst_h_rows, int64_t dst_t0)
{
    (void)d, (void)v, (void)t0, (void)nt, (void)dst_dt, (void)dst, (void)dst_h_rows, (void)dst_t0;
    return kvt_error_set(KVT_ERR_NO_CUDA, "capture: built without CUDA");
}

kvt_status kvt_capdev_copy_to_host(int device, void *stream, const void *src, size_t bytes,
                                   void *dst)
{
    (void)device, (void)stream, (void)src, (void)bytes, (void)dst;
    return kvt_error_set(KVT_ERR_NO_CUDA, "capture: built without CUDA");
}

kvt_status kvt_capdev_mem_alloc(kvt_capdev *d, size_t bytes, bool zero, void *stream, void **out)
{
    (void)d, (void)bytes, (void)zero, (void)stream;
    if (out)
        *out = NULL;
    return kvt_error_set(KVT_ERR_NO_CUDA, "capture: built without CUDA");
}

void kvt_capdev_mem_free(kvt_capdev *d, void *p)
{
    (void)d, (void)p;
}

kvt_status kvt_capdev_to_host(kvt_capdev *d, const kvt_capdev_mark *after, const void *src,
                              void *dst, size_t bytes)
{
    (void)d, (void)after, (void)src, (void)dst, (void)bytes;
    return kvt_error_set(KVT_ERR_NO_CUDA, "capture: built without CUDA");
}

kvt_status kvt_capdev_mark_at(kvt_capdev *d, kvt_capdev_mark **m, void *stream)
{
    (void)d, (void)m, (void)stream;
    return kvt_error_set(KVT_ERR_NO_CUDA, "capture: built without CUDA");
}

kvt_status kvt_capdev_after(kvt_capdev *d, const kvt_capdev_mark *m, void *stream)
{
    (void)d, (void)m, (void)stream;
    return kvt_error_set(KVT_ERR_NO_CUDA, "capture: built without CUDA");
}

kvt_status kvt_capdev_side_after(kvt_capdev *d, const kvt_capdev_mark *m)
{
    (void)d, (void)m;
    return kvt_error_set(KVT_ERR_NO_CUDA, "capture: built without CUDA");
}

kvt_status kvt_capdev_mark_sync(kvt_capdev *d, const kvt_capdev_mark *m)
{
    (void)d, (void)m;
    return kvt_error_set(KVT_ERR_NO_CUDA, "capture: built without CUDA");
}

kvt_status kvt_capdev_colsum(kvt_capdev *d, const float *q, const float *k, double *colsum,
                             int n_q_heads, int n_kv_heads, uint32_t q_begin, uint32_t n_q,
                             uint32_t n_k, int head_dim, float scale, void *stream)
{
    (void)d, (void)q, (void)k, (void)colsum, (void)n_q_heads, (void)n_kv_heads, (void)q_begin;
    (void)n_q, (void)n_k, (void)head_dim, (void)scale, (void)stream;
    return kvt_error_set(KVT_ERR_NO_CUDA, "capture: built without CUDA");
}

kvt_status kvt_capdev_drain(kvt_capdev *d)
{
    (void)d;
    return KVT_OK;
}

void kvt_capdev_get_stats(const kvt_capdev *d, kvt_capdev_stats *out)
{
    (void)d;
    if (out)
        memset(out, 0, sizeof(*out));
}

void kvt_capdev_free(kvt_capdev *d)
{
    (void)d;
}

void *kvt_capdev_stream(const kvt_capdev *d)
{
    (void)d;
    return NULL;
}

kvt_status kvt_capdev_sync(kvt_capdev *d)
{
    (void)d;
    return KVT_OK;
}
