/* convert_cuda.cu - kvt_widen_cuda: f16/bf16 elements to f32 on the device, bit for bit as the
 * host's kvt_convert_to_f32 (both take common/dtype_bits.h's conversions), so that
 * `replay --device cuda` uploads K and V as the trace stores them (half the bytes of f32) and
 * widens them there. A grid-stride loop over coalesced loads and stores: memory-bound.
 */
#include <stdint.h>

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
