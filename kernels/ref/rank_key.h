/* rank_key.h - the ranking order as an unsigned key: ascending key = score descending, -0.0
 * equal to +0.0, every NaN after every number (ties then go by index: stable sorts keep the
 * index order). Shared by the radix ranking of the CPU fast path and the CUDA segmented sort,
 * so both give kvt_rank_desc_ref's permutation exactly. Internal to kernels/.
 */
#ifndef KVT_RANK_KEY_H
#define KVT_RANK_KEY_H

#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define KVT_HD __host__ __device__
#else
#define KVT_HD
#endif

static inline KVT_HD uint64_t kvt_rank_key(double x)
{
    if (x != x)
        return UINT64_MAX;
    if (x == 0.0)
        x = 0.0; /* -0.0 ranks with +0.0 */
    uint64_t b;
    memcpy(&b, &x, sizeof(b));
    uint64_t asc = (b >> 63) ? ~b : b | 0x8000000000000000ull; /* ascending in x */
    return ~asc;
}

#endif /* KVT_RANK_KEY_H */
