/* byteplane.c - the byte-plane filter (FORMAT.md filter 1): byte b of every element is
 * stored contiguously, plane after plane, so exponent bytes of f16/bf16/f32 tensors sit
 * together and compress well while mantissa bytes (nearly random) do not pollute them.
 */
#include <string.h>

#include "kvt_trace.h"

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
    const uint8_t *s = src;
    uint8_t *d = dst;
    if (elem == 2) {
        const uint8_t *p0 = s, *p1 = s + n;
        for (size_t i = 0; i < n; i++) {
            d[2 * i] = p0[i];
            d[2 * i + 1] = p1[i];
        }
        return;
    }
    if (elem == 4) {
        const uint8_t *p0 = s, *p1 = s + n, *p2 = s + 2 * n, *p3 = s + 3 * n;
        for (size_t i = 0; i < n; i++) {
            d[4 * i] = p0[i];
            d[4 * i + 1] = p1[i];
            d[4 * i + 2] = p2[i];
            d[4 * i + 3] = p3[i];
        }
        return;
    }
    for (size_t b = 0; b < elem; b++)
        for (size_t i = 0; i < n; i++)
            d[i * elem + b] = s[b * n + i];
}
