/* attn_ref.c - reference attention kernels of the replay: causal softmax rows in f32 over one
 * or two key blocks (window queries over the prompt; decode queries over prompt + decode
 * keys), H2O column sums from every prompt query, and plain scaled dot products.
 * POLICIES.md §0.1 steps 1-3 and §6.
 */
#include <math.h>

#include "kvt_kernels.h"

static double dot_f32(const float *a, const float *b, int D)
{
    double s = 0.0;
    for (int d = 0; d < D; d++)
        s += (double)a[d] * (double)b[d];
    return s;
}

void kvt_dot_rows_ref(const float *q, const float *k, int n, int D, double scale, double *out)
{
    /* q is (D), k is (n,D), out is (n) */
    for (int j = 0; j < n; j++)
        out[j] = dot_f32(q, k + (size_t)j * D, D) * scale;
}

static int clampi(int x, int lo, int hi)
{
    return x < lo ? lo : (x > hi ? hi : x);
}

kvt_status kvt_attn_probs_ref(const float *q, int n_q, int D, const float *k, int T,
                              const int *n_vis, const float *k2, int n2, const int *n_vis2,
                              double scale, float *pr, float *pr2, double *lse, double *work)
{
    KVT_RETURN_IF(n_q < 0 || D <= 0 || T < 0 || (k2 && n2 < 0), KVT_ERR_INVALID_ARG,
                  "attn_probs: bad shape n_q=%d D=%d T=%d n2=%d", n_q, D, T, n2);
    KVT_RETURN_IF(k2 && !pr2, KVT_ERR_INVALID_ARG, "attn_probs: pr2 is NULL");
    if (!k2)
        n2 = 0;
    double *z1 = work, *z2 = work + T; /* (T) and (n2) logits of the current query */
    for (int i = 0; i < n_q; i++) {
        /* q row i is (D); pr row i is (T); pr2 row i is (n2) */
        const float *qi = q + (size_t)i * D;
        int nv = clampi(n_vis[i], 0, T);
        int nv2 = k2 ? clampi(n_vis2[i], 0, n2) : 0;
        KVT_RETURN_IF(nv + nv2 == 0, KVT_ERR_INVALID_ARG, "attn_probs: query %d sees no key", i);
        double zmax = -INFINITY;
        for (int j = 0; j < nv; j++) {
            z1[j] = dot_f32(qi, k + (size_t)j * D, D) * scale;
            KVT_RETURN_IF(!isfinite(z1[j]), KVT_ERR_NAN, "attn_probs: logit (%d,%d) not finite", i,
                          j);
            zmax = z1[j] > zmax ? z1[j] : zmax;
        }
        for (int j = 0; j < nv2; j++) {
            z2[j] = dot_f32(qi, k2 + (size_t)j * D, D) * scale;
            KVT_RETURN_IF(!isfinite(z2[j]), KVT_ERR_NAN, "attn_probs: logit (%d,k2 %d) not finite",
                          i, j);
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
        float *pi = pr + (size_t)i * T;
        for (int j = 0; j < T; j++)
            pi[j] = j < nv ? (float)(z1[j] / zsum) : 0.0f;
        if (k2) {
            float *p2 = pr2 + (size_t)i * n2;
            for (int j = 0; j < n2; j++)
                p2[j] = j < nv2 ? (float)(z2[j] / zsum) : 0.0f;
        }
        if (lse)
            lse[i] = zmax + log(zsum);
    }
    return KVT_OK;
}

kvt_status kvt_attn_colsum_ref(const float *q, const float *k, int T, int D, double scale,
                               double *work, double *colsum)
{
    KVT_RETURN_IF(T < 0 || D <= 0, KVT_ERR_INVALID_ARG, "attn_colsum: bad shape T=%d D=%d", T, D);
    /* q, k are (T,D); work, colsum are (T) */
    for (int j = 0; j < T; j++)
        colsum[j] = 0.0;
    for (int i = 0; i < T; i++) {
        const float *qi = q + (size_t)i * D;
        double zmax = -INFINITY;
        for (int j = 0; j <= i; j++) {
            work[j] = dot_f32(qi, k + (size_t)j * D, D) * scale;
            KVT_RETURN_IF(!isfinite(work[j]), KVT_ERR_NAN, "attn_colsum: logit (%d,%d) not finite",
                          i, j);
            zmax = work[j] > zmax ? work[j] : zmax;
        }
        double zsum = 0.0;
        for (int j = 0; j <= i; j++) {
            work[j] = exp(work[j] - zmax);
            zsum += work[j];
        }
        for (int j = 0; j <= i; j++)
            colsum[j] += (double)(float)(work[j] / zsum); /* probabilities are f32 (§0.1.3) */
    }
    return KVT_OK;
}

void kvt_attn_output_ref(const float *p, int n_q, int T, size_t stride_p, const float *v, int D,
                         double *out, size_t stride_out)
{
    /* p rows [n_q] of [T]; v is (T,D); out rows [n_q] of [D] */
    for (int q = 0; q < n_q; q++) {
        const float *pq = p + (size_t)q * stride_p;
        double *oq = out + (size_t)q * stride_out;
        for (int d = 0; d < D; d++)
            oq[d] = 0.0;
        for (int j = 0; j < T; j++) {
            double pj = pq[j];
            if (pj == 0.0)
                continue;
            const float *vj = v + (size_t)j * D;
            for (int d = 0; d < D; d++)
                oq[d] += pj * vj[d];
        }
    }
}
