/* dtype.c - dtype table and f16/bf16 <-> f32 conversion with round-to-nearest-even. Traces
 * store what the engine produced; replay converts to f32 in blocks with these.
 */
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

static uint32_t f2u(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float u2f(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

float kvt_bf16_to_f32(uint16_t b)
{
    return u2f((uint32_t)b << 16);
}

uint16_t kvt_f32_to_bf16(float f)
{
    uint32_t u = f2u(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN: keep sign, force quiet */
        return (uint16_t)((u >> 16) | 0x40u);
    uint32_t lsb = (u >> 16) & 1u;
    u += 0x7fffu + lsb;
    return (uint16_t)(u >> 16);
}

float kvt_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    if (exp == 0) {
        if (man == 0)
            return u2f(sign);
        /* subnormal: value = man * 2^-24 */
        float v = (float)man * 5.9604644775390625e-08f;
        return sign ? -v : v;
    }
    if (exp == 31)
        return u2f(sign | 0x7f800000u | (man << 13));
    return u2f(sign | ((exp + 112u) << 23) | (man << 13));
}

uint16_t kvt_f32_to_f16(float f)
{
    uint32_t u = f2u(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) /* Inf or NaN */
        return (uint16_t)(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u));
    if (a >= 0x477ff000u) /* rounds to >= 65520: overflow to Inf */
        return (uint16_t)(sign | 0x7c00u);
    if (a < 0x38800000u) { /* below the smallest normal f16 (2^-14): subnormal or zero */
        float v = u2f(a) * 16777216.0f; /* scale by 2^24: units of the f16 subnormal */
        uint32_t m = (uint32_t)nearbyintf(v);
        return (uint16_t)(sign | m); /* m == 0x400 becomes the smallest normal, correctly */
    }
    uint32_t exp = (a >> 23) - 112u;
    uint32_t man = a & 0x7fffffu;
    uint32_t h = (exp << 10) | (man >> 13);
    uint32_t rem = man & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u)))
        h++;
    return (uint16_t)(sign | h);
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
