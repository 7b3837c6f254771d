/* dtype_bits.h - f16/bf16 <-> f32 conversions on bit patterns (round to nearest even; Inf
 * kept; NaN kept, quiet), one definition for the host (common/dtype.c, kvt_f32_to_bf16 and
 * friends) and for CUDA kernels (capture/capture_cuda.cu), so that the GPU capture converts
 * bit for bit as the host does. Header-only, C and CUDA C++; KVT_HD marks both sides.
 */
#ifndef KVT_DTYPE_BITS_H
#define KVT_DTYPE_BITS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kvt_common.h"

#if defined(__CUDACC__)
#define KVT_HD __host__ __device__
#else
#define KVT_HD
#endif

static inline KVT_HD uint32_t kvt_bits_f2u(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline KVT_HD float kvt_bits_u2f(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline KVT_HD float kvt_bits_bf16_to_f32(uint32_t b)
{
    return kvt_bits_u2f((b & 0xffffu) << 16);
}

static inline KVT_HD uint32_t kvt_bits_f32_to_bf16(float f)
{
    uint32_t u = kvt_bits_f2u(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN: keep sign, force quiet */
        return ((u >> 16) | 0x40u) & 0xffffu;
    uint32_t lsb = (u >> 16) & 1u;
    u += 0x7fffu + lsb;
    return u >> 16;
}

static inline KVT_HD float kvt_bits_f16_to_f32(uint32_t h)
{
    uint32_t sign = (h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    if (exp == 0) {
        if (man == 0)
            return kvt_bits_u2f(sign);
        float v = (float)man * 5.9604644775390625e-08f; /* subnormal: exactly man * 2^-24 */
        return sign ? -v : v;
    }
    if (exp == 31)
        return kvt_bits_u2f(sign | 0x7f800000u | (man << 13));
    return kvt_bits_u2f(sign | ((exp + 112u) << 23) | (man << 13));
}

static inline KVT_HD uint32_t kvt_bits_f32_to_f16(float f)
{
    uint32_t u = kvt_bits_f2u(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) /* Inf or NaN */
        return sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u);
    if (a >= 0x477ff000u) /* rounds to >= 65520: overflow to Inf */
        return sign | 0x7c00u;
    if (a < 0x38800000u) { /* below the smallest normal f16 (2^-14): subnormal or zero */
        float v = kvt_bits_u2f(a) * 16777216.0f; /* scale by 2^24: units of the subnormal */
        return sign | (uint32_t)rintf(v);        /* 0x400 becomes the smallest normal */
    }
    uint32_t exp = (a >> 23) - 112u;
    uint32_t man = a & 0x7fffffu;
    uint32_t h = (exp << 10) | (man >> 13);
    uint32_t rem = man & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u)))
        h++;
    return sign | h;
}

/* An element of float dtype dt (bf16 and f16 in the low 16 bits) to f32, and f32 to dt's bits
 * (round to nearest even). Any dtype but BF16 and F16 is taken as F32. */
static inline KVT_HD float kvt_bits_to_f32(uint32_t bits, int dt)
{
    if (dt == KVT_DTYPE_BF16)
        return kvt_bits_bf16_to_f32(bits);
    if (dt == KVT_DTYPE_F16)
        return kvt_bits_f16_to_f32(bits);
    return kvt_bits_u2f(bits);
}

static inline KVT_HD uint32_t kvt_bits_from_f32(float f, int dt)
{
    if (dt == KVT_DTYPE_BF16)
        return kvt_bits_f32_to_bf16(f);
    if (dt == KVT_DTYPE_F16)
        return kvt_bits_f32_to_f16(f);
    return kvt_bits_f2u(f);
}

#endif /* KVT_DTYPE_BITS_H */
