/* attn_ref.c - reference attention kernels of the replay: causal softmax rows in f32 over one
 * or two key blocks (window queries over the prompt; decode queries over prompt + decode
 * keys), H2O column sums from every prompt query, and plain scaled dot products.
 * POLICIES.md §0.1 steps 1-3 and §6.
 */
#include <math.h>

#include "attn_row.h"
#include "kvt_kernels.h"

void kvt_dot_rows_ref(const float *q, const float *k, int n, int D, double scale, double *out)
{
    /* q is (D), k is (n,D), out is (n) */
    for (int j = 0; j < n; j++)
        out[j] = kvt_dot_f32(q, k + (size_t)j * D, D) * scale;
}

kvt_status kvt_attn_probs_ref(const float *q, int n_q, int D, const float *k, int T,
                              const int *n_vis, const float *k2, int n2, const int *n_vis2,
                              double scale, float *pr, float *pr2, double *lse, double *work)
{
    return kvt_attn_probs_zs_ref(q, n_q, D, k, T, n_vis, k2, n2, n_vis2, scale, pr, pr2, lse, NULL,
                                 work);
}

kvt_status kvt_attn_probs_zs_ref(const float *q, int n_q, int D, const float *k, int T,
                                 const int *n_vis, const float *k2, int n2, const int *n_vis2,
                                 double scale, float *pr, float *pr2, double *lse, double *zs,
                                 double *work)
{
    KVT_RETURN_IF(n_q < 0 || D <= 0 || T < 0 || (k2 && n2 < 0), KVT_ERR_INVALID_ARG,
                  "attn_probs: bad shape n_q=%d D=%d T=%d n2=%d", n_q, D, T, n2);
    KVT_RETURN_IF(k2 && !pr2, KVT_ERR_INVALID_ARG, "attn_probs: pr2 is NULL");
    if (!k2)
        n2 = 0;
    double *z1 = work, *z2 = work + T; /* (T) and (n2) logits of the current query */
    for (int i = 0; i < n_q; i++) {
        /* q row i is (D); pr row i is (T); pr2 row i is (n2) */
        int nv = kvt_clampi(n_vis[i], 0, T), nv2 = k2 ? kvt_clampi(n_vis2[i], 0, n2) : 0;
        KVT_FORWARD(kvt_attn_row(i, q + (size_t)i * D, D, k, z1, nv, T, k2, z2, nv2, n2, scale,
                                 pr + (size_t)i * T, k2 ? pr2 + (size_t)i * n2 : NULL,
                                 lse ? lse + i : NULL, zs ? zs + 2 * (size_t)i : NULL));
    }
    return KVT_OK;
}

kvt_status kvt_attn_probs_again_ref(const float *q, int n_q, int D, const float *k, int T,
                                    const int *n_vis, double scale, const double *zs, float *pr,
                                    double *work)
{
    KVT_RETURN_IF(n_q < 0 || D <= 0 || T < 0, KVT_ERR_INVALID_ARG,
                  "attn_probs: bad shape n_q=%d D=%d T=%d", n_q, D, T);
    for (int i = 0; i < n_q; i++)
        KVT_FORWARD(kvt_attn_row_again(i, q + (size_t)i * D, D, k, work, kvt_clampi(n_vis[i], 0, T),
                                       T, scale, zs + 2 * (size_t)i, pr + (size_t)i * T));
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
            work[j] = kvt_dot_f32(qi, k + (size_t)j * D, D) * scale;
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

void kvt_accum_rows_ref(double *s, int nu, int D, const double *p, const float *v)
{
    for (int x = 0; x < nu; x++)
        for (int e = 0; e < D; e++)
            s[(size_t)x * D + e] += p[x] * (double)v[e];
}

void kvt_dot_queries_ref(const float *qt, int n_q, int D, const float *const *k, int n_k,
                         double *out)
{
    for (int j = 0; j < n_k; j++)
        for (int u = 0; u < n_q; u++) {
            double z = 0.0;
            for (int d = 0; d < D; d++)
                z += (double)qt[(size_t)d * n_q + u] * (double)k[j][d];
            out[(size_t)j * n_q + u] = z;
        }
}
