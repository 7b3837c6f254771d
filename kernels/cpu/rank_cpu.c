/* rank_cpu.c - the ranking (kvt_rank_desc_ref's order: score descending, ties by lower index,
 * NaN last) by an LSD radix sort of 64-bit keys instead of a comparison merge sort: each score
 * becomes a key whose ascending order is that order (ties and NaNs keep the index order, since
 * every pass is stable), then 8-bit digits, skipping a digit that all keys share. Same
 * permutation as the reference, bit for bit.
 */
#include <string.h>

#include "../ref/rank_key.h"
#include "kvt_kernels.h"

kvt_status kvt_rank_desc_cpu(const double *score, int n, int32_t *order, int32_t *work)
{
    if (n < 64) { /* not worth the buffers */
        kvt_rank_desc_ref(score, n, order, work);
        return KVT_OK;
    }
    uint64_t *k0 = kvt_malloc((size_t)n * 2 * sizeof(uint64_t));
    int32_t *i1 = work;
    KVT_RETURN_IF(!k0, KVT_ERR_NOMEM, "rank: out of memory");
    uint64_t *k1 = k0 + n;
    int32_t *i0 = order;
    for (int j = 0; j < n; j++) {
        k0[j] = kvt_rank_key(score[j]);
        i0[j] = j;
    }
    for (int shift = 0; shift < 64; shift += 8) {
        size_t cnt[256] = {0};
        for (int j = 0; j < n; j++)
            cnt[(k0[j] >> shift) & 255]++;
        if (cnt[(k0[0] >> shift) & 255] == (size_t)n)
            continue; /* every key has this digit */
        size_t pos = 0;
        for (int d = 0; d < 256; d++) {
            size_t c = cnt[d];
            cnt[d] = pos;
            pos += c;
        }
        for (int j = 0; j < n; j++) {
            size_t p = cnt[(k0[j] >> shift) & 255]++;
            k1[p] = k0[j];
            i1[p] = i0[j];
        }
        uint64_t *tk = k0;
        k0 = k1, k1 = tk;
        int32_t *ti = i0;
        i0 = i1, i1 = ti;
    }
    if (i0 != order)
        memcpy(order, i0, (size_t)n * sizeof(int32_t));
    kvt_free(k0 < k1 ? k0 : k1); /* the allocation starts at the lower of the two */
    return KVT_OK;
}
