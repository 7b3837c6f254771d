/* widen_ref.c - one trace record's 16-bit elements, as the trace stores them (traces/FORMAT.md:
 * row-major, or split into byte planes), widened to f32 into their place in a [H, T, D]
 * tensor. The oracle of kvt_widen_stored_cuda, and the host's way for `replay --device cuda`'s
 * K and V when a policy reads them on the host.
 */
#include "dtype_bits.h"
#include "kvt_kernels.h"
#include "widen_args.h"

kvt_status kvt_widen_stored_ref(kvt_dtype dt, bool planes, const uint8_t *src, int n_heads,
                                int n_tok, int D, size_t stride_head, float *dst)
{
    KVT_FORWARD(kvt_widen_stored_args("widen_stored", dt, n_heads, n_tok, D, stride_head));
    const size_t row = (size_t)n_tok * D, n = (size_t)n_heads * row;
    /* element i = (h, r): its bytes at src[2i], src[2i + 1], or src[i], src[n + i] */
    const size_t lo_step = planes ? 1 : 2, hi_at = planes ? n : 1;
    for (int h = 0; h < n_heads; h++) {
        float *out = dst + (size_t)h * stride_head;
        for (size_t r = 0; r < row; r++) {
            const size_t i = (size_t)h * row + r;
            const uint32_t b = (uint32_t)src[lo_step * i] | (uint32_t)src[lo_step * i + hi_at] << 8;
            out[r] = dt == KVT_DTYPE_BF16 ? kvt_bits_bf16_to_f32(b) : kvt_bits_f16_to_f32(b);
        }
    }
    return KVT_OK;
}
