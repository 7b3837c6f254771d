/* test_common_dtype.c - f16/bf16 <-> f32 conversion: every 16-bit pattern round-trips
 * exactly, rounding is to nearest even, overflow/underflow/NaN follow IEEE 754.
 */
#include "kvt_test.h"

static uint32_t bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float from_bits(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

int main(void)
{
    /* every f16 pattern: f16 -> f32 -> f16 is the identity (NaNs stay NaN) */
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = kvt_f16_to_f32((uint16_t)h);
        uint16_t back = kvt_f32_to_f16(f);
        bool nan = ((h >> 10) & 0x1f) == 0x1f && (h & 0x3ff);
        if (nan ? !(f != f) || (back & 0x7c00) != 0x7c00 || !(back & 0x3ff) : back != h)
            bad++;
    }
    KVT_EXPECT_EQ_U64(bad, 0);
    bad = 0;
    for (uint32_t b = 0; b < 65536; b++) {
        float f = kvt_bf16_to_f32((uint16_t)b);
        uint16_t back = kvt_f32_to_bf16(f);
        bool nan = ((b >> 7) & 0xff) == 0xff && (b & 0x7f);
        if (nan ? !(f != f) : back != b)
            bad++;
    }
    KVT_EXPECT_EQ_U64(bad, 0);

    /* known values */
    KVT_EXPECT(kvt_f16_to_f32(0x3c00) == 1.0f);
    KVT_EXPECT(kvt_f16_to_f32(0xc000) == -2.0f);
    KVT_EXPECT(kvt_f16_to_f32(0x7bff) == 65504.0f);
    KVT_EXPECT(kvt_f16_to_f32(0x0001) == 5.9604644775390625e-08f); /* smallest subnormal */
    KVT_EXPECT_EQ_U64(kvt_f32_to_f16(65520.0f), 0x7c00);           /* rounds to Inf */
    KVT_EXPECT_EQ_U64(kvt_f32_to_f16(65519.0f), 0x7bff);
    KVT_EXPECT_EQ_U64(kvt_f32_to_f16(1e-9f), 0x0000); /* underflow to 0 */
    KVT_EXPECT_EQ_U64(kvt_f32_to_f16(-0.0f), 0x8000);
    /* ties to even: 1 + 2^-11 is halfway between 1 and 1+2^-10 -> 1 (even) */
    KVT_EXPECT_EQ_U64(kvt_f32_to_f16(1.0f + 0.00048828125f), 0x3c00);
    /* 1 + 3*2^-11 is halfway between 1+2^-10 (odd) and 1+2^-9 -> 1+2^-9 */
    KVT_EXPECT_EQ_U64(kvt_f32_to_f16(1.0f + 3 * 0.00048828125f), 0x3c02);
    /* bf16 ties to even */
    KVT_EXPECT_EQ_U64(kvt_f32_to_bf16(from_bits(0x3f808000u)), 0x3f80);
    KVT_EXPECT_EQ_U64(kvt_f32_to_bf16(from_bits(0x3f818000u)), 0x3f82);
    KVT_EXPECT_EQ_U64(kvt_f32_to_bf16(from_bits(0x3f808001u)), 0x3f81);
    KVT_EXPECT_EQ_U64(kvt_f32_to_bf16(from_bits(0x7f7fffffu)), 0x7f80); /* max float -> Inf */
    KVT_EXPECT(kvt_bf16_to_f32(kvt_f32_to_bf16(from_bits(0x7fc00001u))) !=
               kvt_bf16_to_f32(kvt_f32_to_bf16(from_bits(0x7fc00001u)))); /* NaN stays NaN */

    /* f32 -> f16 agrees with the exact rounding of the f32 value for random inputs */
    kvt_rng rng;
    kvt_rng_seed(&rng, 7);
    bad = 0;
    for (int i = 0; i < 200000; i++) {
        float f = from_bits((uint32_t)kvt_rng_u64(&rng));
        if (f != f || fabsf(f) > 65504.0f || fabsf(f) < 6.1035156e-05f)
            continue;
        uint16_t h = kvt_f32_to_f16(f);
        float r = kvt_f16_to_f32(h);
        float up = kvt_f16_to_f32((uint16_t)(h + 1)), dn = kvt_f16_to_f32((uint16_t)(h - 1));
        /* the chosen value is at least as close as both neighbours */
        if (fabs((double)f - r) > fabs((double)f - up) ||
            fabs((double)f - r) > fabs((double)f - dn))
            bad++;
    }
    KVT_EXPECT_EQ_U64(bad, 0);

    float src[4] = {1.5f, -2.25f, 0.0f, 3.0e4f};
    uint16_t h16[4];
    float back[4];
    KVT_CHECK(kvt_convert_from_f32(KVT_DTYPE_BF16, src, h16, 4));
    KVT_CHECK(kvt_convert_to_f32(KVT_DTYPE_BF16, h16, back, 4));
    KVT_EXPECT(back[0] == 1.5f && back[1] == -2.25f && back[2] == 0.0f);
    KVT_EXPECT_STATUS(kvt_convert_to_f32(KVT_DTYPE_I32, h16, back, 1), KVT_ERR_INVALID_ARG);
    KVT_EXPECT(kvt_dtype_from_name("bfloat16") == KVT_DTYPE_BF16);
    KVT_EXPECT(kvt_dtype_from_name("fp16") == KVT_DTYPE_F16);
    KVT_EXPECT(kvt_dtype_from_name("f64") == KVT_DTYPE_INVALID);
    (void)bits;
    return kvt_test_result("test_common_dtype");
}
