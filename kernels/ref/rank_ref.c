/* rank_ref.c - the deterministic ranking every policy uses: score descending, ties by lower
 * index, NaN last. torch.topk is not stable (POLICIES §0.1 "Tie-breaking"); this rule is the
 * documented kvtrace choice. A bottom-up merge sort: stable, O(n log n), no recursion.
 */
#include <math.h>

#include "kvt_kernels.h"

/* true if a ranks strictly before b */
static int before(const double *s, int32_t a, int32_t b)
{
    double x = s[a], y = s[b];
    int xn = isnan(x), yn = isnan(y);
    if (xn || yn) {
        if (xn != yn)
            return yn; /* the non-NaN one first */
        return a < b;
    }
    if (x != y)
        return x > y;
    return a < b;
}

void kvt_rank_desc_ref(const double *score, int n, int32_t *order, int32_t *work)
{
    /* score is (n); order, work are (n) */
    for (int i = 0; i < n; i++)
        order[i] = i;
    int32_t *src = order, *dst = work;
    for (int w = 1; w < n; w *= 2) {
        for (int lo = 0; lo < n; lo += 2 * w) {
            int mid = lo + w < n ? lo + w : n;
            int hi = lo + 2 * w < n ? lo + 2 * w : n;
            int i = lo, j = mid, o = lo;
            while (i < mid && j < hi)
                dst[o++] = before(score, src[j], src[i]) ? src[j++] : src[i++];
            while (i < mid)
                dst[o++] = src[i++];
            while (j < hi)
                dst[o++] = src[j++];
        }
        int32_t *t = src;
        src = dst;
        dst = t;
    }
    if (src != order)
        for (int i = 0; i < n; i++)
            order[i] = src[i];
}
