/* dtype.c - dtype table and f16/bf16 <-> f32 conversion with round-to-nearest-even (the bit
 * manipulations live in dtype_bits.h, shared with the CUDA capture). Traces store what the
 * engine produced; replay converts to f32 in blocks with these.
 */
#include "dtype_bits.h"
#include "kvt_common.h"

#include <math.h>
#include <string.h>
#include <strings.h>

size_t kvt_dtype_size(kvt_dtype dt)
{
    switch (dt) {
    case KVT_DTYPE_F16:
    case KVT_DTYPE_BF16:
        return 2;
    case KVT_DTYPE_F32:
    case KVT_DTYPE_I32:
        return 4;
    case KVT_DTYPE_U8:
        return 1;
    default:
        return 0;
    }
}

const char *kvt_dtype_name(kvt_dtype dt)
{
    switch (dt) {
    case KVT_DTYPE_F16:
        return "f16";
    case KVT_DTYPE_BF16:
        return "bf16";
    case KVT_DTYPE_F32:
        return "f32";
    case KVT_DTYPE_I32:
        return "i32";
    case KVT_DTYPE_U8:
        return "u8";
    default:
        return NULL;
    }
}

kvt_dtype kvt_dtype_from_name(const char *n)
{
    if (!n)
        return KVT_DTYPE_INVALID;
    if (!strcasecmp(n, "f16") || !strcasecmp(n, "fp16") || !strcasecmp(n, "float16"))
        return KVT_DTYPE_F16;
    if (!strcasecmp(n, "bf16") || !strcasecmp(n, "bfloat16"))
        return KVT_DTYPE_BF16;
    if (!strcasecmp(n, "f32") || !strcasecmp(n, "fp32") || !strcasecmp(n, "float32"))
        return KVT_DTYPE_F32;
    return KVT_DTYPE_INVALID;
}

bool kvt_dtype_is_float(kvt_dtype dt)
{
    return dt == KVT_DTYPE_F16 || dt == KVT_DTYPE_BF16 || dt == KVT_DTYPE_F32;
}

float kvt_bf16_to_f32(uint16_t b)
{
    return kvt_bits_bf16_to_f32(b);
}

uint16_t kvt_f32_to_bf16(float f)
{
    return (uint16_t)kvt_bits_f32_to_bf16(f);
}

float kvt_f16_to_f32(uint16_t h)
{
    return kvt_bits_f16_to_f32(h);
}

uint16_t kvt_f32_to_f16(float f)
{
    return (uint16_t)kvt_bits_f32_to_f16(f);
}

kvt_status kvt_convert_to_f32(kvt_dtype src_dt, const void *src, float *dst, size_t n)
{
    const uint16_t *s16 = src;
    switch (src_dt) {
    case KVT_DTYPE_F32:
        memmove(dst, src, n * 4);
        return KVT_OK;
    case KVT_DTYPE_BF16:
        for (size_t i = 0; i < n; i++)
            dst[i] = kvt_bf16_to_f32(s16[i]);
        return KVT_OK;
    case KVT_DTYPE_F16:
        for (size_t i = 0; i < n; i++)
            dst[i] = kvt_f16_to_f32(s16[i]);
        return KVT_OK;
    default:
        return kvt_error_set(KVT_ERR_INVALID_ARG, "cannot convert dtype %d to f32", (int)src_dt);
    }
}

kvt_status kvt_convert_from_f32(kvt_dtype dst_dt, const float *src, void *dst, size_t n)
{
    uint16_t *d16 = dst;
    switch (dst_dt) {
    case KVT_DTYPE_F32:
        memmove(dst, src, n * 4);
        return KVT_OK;
    case KVT_DTYPE_BF16:
        for (size_t i = 0; i < n; i++)
            d16[i] = kvt_f32_to_bf16(src[i]);
        return KVT_OK;
    case KVT_DTYPE_F16:
        for (size_t i = 0; i < n; i++)
            d16[i] = kvt_f32_to_f16(src[i]);
        return KVT_OK;
    default:
        return kvt_error_set(KVT_ERR_INVALID_ARG, "cannot convert f32 to dtype %d", (int)dst_dt);
    }
}
