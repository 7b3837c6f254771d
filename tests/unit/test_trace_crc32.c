/* test_trace_crc32.c - kvt_crc32 (the folded PCLMULQDQ path where the CPU has it) equals
 * zlib's crc32 for every length 0..1100 at every alignment 0..15, for chained updates split
 * anywhere, and on a few MB of random bytes; crc32("123456789") is FORMAT.md's check value.
 */
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "kvt_test.h"
#include "trace_internal.h"

int main(void)
{
    KVT_EXPECT_EQ_U64(kvt_crc32("123456789", 9), 0xCBF43926u);
    size_t big = (4u << 20) + 77;
    uint8_t *b = malloc(big + 16);
    kvt_rng rng;
    kvt_rng_seed(&rng, 7);
    for (size_t i = 0; i < big + 16; i++)
        b[i] = (uint8_t)kvt_rng_u64(&rng);
    int bad = 0;
    for (size_t a = 0; a < 16; a++)
        for (size_t n = 0; n <= 1100; n++)
            bad += kvt_crc32(b + a, n) != (uint32_t)crc32(0, b + a, (uInt)n);
    KVT_EXPECT_MSG(bad == 0, "%d lengths/alignments differ from zlib", bad);
    bad = 0;
    for (size_t n = 0; n <= 300; n += 7) /* chained: prefix, then the rest */
        for (size_t k = 0; k <= n; k += 5) {
            uint32_t c = kvt_crc32_update(kvt_crc32(b, k), b + k, n - k);
            bad += c != (uint32_t)crc32(0, b, (uInt)n);
        }
    KVT_EXPECT_MSG(bad == 0, "%d chained updates differ from zlib", bad);
    KVT_EXPECT_EQ_U64(kvt_crc32(b + 3, big), (uint32_t)crc32(0, b + 3, (uInt)big));
    KVT_EXPECT_EQ_U64(kvt_crc32_update(0xdeadbeefu, b, big),
                      (uint32_t)crc32(0xdeadbeefu, b, (uInt)big));
    memset(b, 0xff, big);
    KVT_EXPECT_EQ_U64(kvt_crc32(b, big), (uint32_t)crc32(0, b, (uInt)big));
    free(b);
    return kvt_test_result("test_trace_crc32");
}
