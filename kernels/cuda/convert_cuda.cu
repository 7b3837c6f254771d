/* convert_cuda.cu - kvt_widen_cuda: f16/bf16 elements to f32 on the device, bit for bit as the
 * host's kvt_convert_to_f32 (both take common/dtype_bits.h's conversions), so that
 * `replay --device cuda` uploads K and V as the trace stores them (half the bytes of f32) and
 * widens them there; kvt_widen_stored_cuda does the same for one trace record's elements still
 * in byte planes, placed into their rows (the host merges no planes). Grid-stride loops over
 * coalesced loads and stores: memory-bound.
 */
#include <stdint.h>

#include "../ref/widen_args.h"
#include "cuda_util.cuh"
#include "dtype_bits.h"

template <bool BF16> static __global__ void widen_k(const uint16_t *src, size_t n, float *dst)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] = BF16 ? kvt_bits_bf16_to_f32(src[i]) : kvt_bits_f16_to_f32(src[i]);
}

extern "C" kvt_status kvt_widen_cuda(kvt_dtype dt, const uint16_t *src, size_t n, float *dst,
                                     void *stream)
{
    KVT_RETURN_IF(dt != KVT_DTYPE_BF16 && dt != KVT_DTYPE_F16, KVT_ERR_INVALID_ARG,
                  "widen_cuda: %s is not a 16-bit float dtype",
                  kvt_dtype_name(dt) ? kvt_dtype_name(dt) : "an unknown code");
    KVT_RETURN_IF(n && (!src || !dst), KVT_ERR_INVALID_ARG, "widen_cuda: no buffer");
    if (n == 0)
        return KVT_OK;
    cudaStream_t st = kvt_cu_stream(stream);
    const unsigned nb = kvt_cu_blocks(n, 256), grid = nb < 8192 ? nb : 8192;
    if (dt == KVT_DTYPE_BF16)
        widen_k<true><<<grid, 256, 0, st>>>(src, n, dst);
    else
        widen_k<false><<<grid, 256, 0, st>>>(src, n, dst);
    KVT_CU_LAUNCHED();
    return KVT_OK;
}

/* element i of the record = (h, r): bytes src[i] and src[n + i] (planes) or src[2i], src[2i+1] */
template <bool BF16, bool PLANES>
static __global__ void widen_stored_k(const uint8_t *src, size_t n, size_t row, size_t stride_head,
                                      float *dst)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const uint32_t b = PLANES ? (uint32_t)src[i] | (uint32_t)src[n + i] << 8
                                  : (uint32_t)((const uint16_t *)src)[i];
        const size_t h = i / row;
        dst[h * stride_head + (i - h * row)] =
            BF16 ? kvt_bits_bf16_to_f32(b) : kvt_bits_f16_to_f32(b);
    }
}

extern "C" kvt_status kvt_widen_stored_cuda(kvt_dtype dt, bool planes, const uint8_t *src,
                                            int n_heads, int n_tok, int D, size_t stride_head,
                                            float *dst, void *stream)
{
    KVT_FORWARD(kvt_widen_stored_args("widen_stored_cuda", dt, n_heads, n_tok, D, stride_head));
    const size_t row = (size_t)n_tok * D, n = (size_t)n_heads * row;
    KVT_RETURN_IF(n && (!src || !dst || (!planes && ((uintptr_t)src & 1))), KVT_ERR_INVALID_ARG,
                  "widen_stored_cuda: no buffer, or 16-bit elements not 2-byte aligned");
    if (n == 0)
        return KVT_OK;
    cudaStream_t st = kvt_cu_stream(stream);
    const unsigned nb = kvt_cu_blocks(n, 256), grid = nb < 8192 ? nb : 8192;
    const bool bf = dt == KVT_DTYPE_BF16;
    if (bf && planes)
        widen_stored_k<true, true><<<grid, 256, 0, st>>>(src, n, row, stride_head, dst);
    else if (bf)
        widen_stored_k<true, false><<<grid, 256, 0, st>>>(src, n, row, stride_head, dst);
    else if (planes)
        widen_stored_k<false, true><<<grid, 256, 0, st>>>(src, n, row, stride_head, dst);
    else
        widen_stored_k<false, false><<<grid, 256, 0, st>>>(src, n, row, stride_head, dst);
    KVT_CU_LAUNCHED();
    return KVT_OK;
}
