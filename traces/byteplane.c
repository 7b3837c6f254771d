/* byteplane.c - the byte-plane filter (FORMAT.md filter 1): byte b of every element is
 * stored contiguously, plane after plane, so exponent bytes of f16/bf16/f32 tensors sit
 * together and compress well while mantissa bytes (nearly random) do not pollute them.
 */
#include <string.h>

#include "dtype_bits.h"
#include "trace_internal.h"

void kvt_byteplane_split(const void *src, void *dst, size_t n, size_t elem)
{
    const uint8_t *s = src;
    uint8_t *d = dst;
    if (elem == 2) {
        uint8_t *p0 = d, *p1 = d + n;
        for (size_t i = 0; i < n; i++) {
            p0[i] = s[2 * i];
            p1[i] = s[2 * i + 1];
        }
        return;
    }
    if (elem == 4) {
        uint8_t *p0 = d, *p1 = d + n, *p2 = d + 2 * n, *p3 = d + 3 * n;
        for (size_t i = 0; i < n; i++) {
            p0[i] = s[4 * i];
            p1[i] = s[4 * i + 1];
            p2[i] = s[4 * i + 2];
            p3[i] = s[4 * i + 3];
        }
        return;
    }
    for (size_t b = 0; b < elem; b++)
        for (size_t i = 0; i < n; i++)
            d[b * n + i] = s[i * elem + b];
}

void kvt_byteplane_merge(const void *src, void *dst, size_t n, size_t elem)
{
    kvt_byteplane_merge_range(src, n, elem, 0, n, dst);
}

void kvt_byteplane_merge_range(const void *planes, size_t n, size_t elem, size_t first,
                               size_t count, void *dst)
{
    const uint8_t *s = (const uint8_t *)planes + first;
    uint8_t *d = dst;
    if (elem == 2) {
        const uint8_t *p0 = s, *p1 = s + n;
        for (size_t i = 0; i < count; i++) {
            d[2 * i] = p0[i];
            d[2 * i + 1] = p1[i];
        }
        return;
    }
    if (elem == 4) {
        const uint8_t *p0 = s, *p1 = s + n, *p2 = s + 2 * n, *p3 = s + 3 * n;
        for (size_t i = 0; i < count; i++) {
            d[4 * i] = p0[i];
            d[4 * i + 1] = p1[i];
            d[4 * i + 2] = p2[i];
            d[4 * i + 3] = p3[i];
        }
        return;
    }
    for (size_t b = 0; b < elem; b++)
        for (size_t i = 0; i < count; i++)
            d[i * elem + b] = s[b * n + i];
}

void kvt_byteplane_to_f32(kvt_dtype dt, const void *planes, size_t n, size_t first, size_t count,
                          float *dst)
{
    const uint8_t *s = (const uint8_t *)planes + first;
    const uint8_t *p0 = s, *p1 = s + n;
    if (dt == KVT_DTYPE_BF16) { /* the bf16 bits are the upper half of the f32's */
        for (size_t i = 0; i < count; i++)
            dst[i] = kvt_bits_u2f((uint32_t)p0[i] << 16 | (uint32_t)p1[i] << 24);
    } else if (dt == KVT_DTYPE_F16) {
        for (size_t i = 0; i < count; i++)
            dst[i] = kvt_bits_f16_to_f32((uint32_t)p0[i] | (uint32_t)p1[i] << 8);
    } else /* f32: the planes merged are the floats */
        kvt_byteplane_merge_range(planes, n, 4, first, count, dst);
}
