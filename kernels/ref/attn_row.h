/* attn_row.h - one query's causal softmax, shared by kvt_attn_probs_ref and its fast CPU
 * variant so that both turn logits into probabilities identically: the block-1 logits are
 * computed here (reference) or handed in (the fast path's dense product), the block-2 logits
 * are always computed here; every logit is checked finite; probabilities are stored in f32 (0
 * past the visible prefix), with the log-sum-exp. Internal to kernels/.
 */
#ifndef KVT_ATTN_ROW_H
#define KVT_ATTN_ROW_H

#include <math.h>

#include "kvt_kernels.h"

static inline int kvt_clampi(int x, int lo, int hi)
{
    return x < lo ? lo : (x > hi ? hi : x);
}

static inline double kvt_dot_f32(const float *a, const float *b, int D)
{
    double s = 0.0;
    for (int d = 0; d < D; d++)
        s += (double)a[d] * (double)b[d];
    return s;
}

/* Query i (qi [D]): z1 [nv] holds its block-1 logits, or is filled here from k [T, D] when k
 * is not NULL; z2 is [n2] workspace for block 2 (k2 [n2, D], nv2 visible; k2 may be NULL).
 * pi out [T], p2 out [n2] (when k2), *lse out (may be NULL), zs out [2] the shift and the
 * normaliser (may be NULL: kvt_attn_row_again's). */
static inline kvt_status kvt_attn_row(int i, const float *qi, int D, const float *k, double *z1,
                                      int nv, int T, const float *k2, double *z2, int nv2, int n2,
                                      double scale, float *pi, float *p2, double *lse, double *zs)
{
    KVT_RETURN_IF(nv + nv2 == 0, KVT_ERR_INVALID_ARG, "attn_probs: query %d sees no key", i);
    double zmax = -INFINITY;
    for (int j = 0; j < nv; j++) {
        if (k)
            z1[j] = kvt_dot_f32(qi, k + (size_t)j * D, D) * scale;
        KVT_RETURN_IF(!isfinite(z1[j]), KVT_ERR_NAN, "attn_probs: logit (%d,%d) not finite", i, j);
        zmax = z1[j] > zmax ? z1[j] : zmax;
    }
    for (int j = 0; j < nv2; j++) {
        z2[j] = kvt_dot_f32(qi, k2 + (size_t)j * D, D) * scale;
        KVT_RETURN_IF(!isfinite(z2[j]), KVT_ERR_NAN, "attn_probs: logit (%d,k2 %d) not finite", i,
                      j);
        zmax = z2[j] > zmax ? z2[j] : zmax;
    }
    double zsum = 0.0;
    for (int j = 0; j < nv; j++) {
        z1[j] = exp(z1[j] - zmax);
        zsum += z1[j];
    }
    for (int j = 0; j < nv2; j++) {
        z2[j] = exp(z2[j] - zmax);
        zsum += z2[j];
    }
    for (int j = 0; j < T; j++)
        pi[j] = j < nv ? (float)(z1[j] / zsum) : 0.0f;
    if (k2)
        for (int j = 0; j < n2; j++)
            p2[j] = j < nv2 ? (float)(z2[j] / zsum) : 0.0f;
    if (lse)
        *lse = zmax + log(zsum);
    if (zs)
        zs[0] = zmax, zs[1] = zsum;
    return KVT_OK;
}

/* kvt_attn_row's pi again from the logits and its zs (block 2 not needed): bit for bit */
static inline kvt_status kvt_attn_row_again(int i, const float *qi, int D, const float *k,
                                            double *z1, int nv, int T, double scale,
                                            const double *zs, float *pi)
{
    for (int j = 0; j < nv; j++) {
        z1[j] = kvt_dot_f32(qi, k + (size_t)j * D, D) * scale;
        KVT_RETURN_IF(!isfinite(z1[j]), KVT_ERR_NAN, "attn_probs: logit (%d,%d) not finite", i, j);
    }
    for (int j = 0; j < nv; j++)
        z1[j] = exp(z1[j] - zs[0]);
    for (int j = 0; j < T; j++)
        pi[j] = j < nv ? (float)(z1[j] / zs[1]) : 0.0f;
    return KVT_OK;
}

#endif /* KVT_ATTN_ROW_H */
