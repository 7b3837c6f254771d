/* attn_cpu.c - fast CPU variants of the attention kernels (attn_ref.c is the oracle): the
 * logits and the probability-weighted value sums are dense products in double (kvt_gemm_f64)
 * over blocks of keys converted from f32; the softmax is the reference's, row by row, through
 * the vectorised loops of vec_cpu.c.
 * Results equal the references up to the summation order of the dot products.
 */
#include <math.h>
#include <string.h>

#include "../ref/attn_row.h"
#include "kvt_kernels.h"

#define KB 256 /* keys per converted block: [KB, D] doubles stay in L2 */

/* kvt_attn_row with the logits of both blocks handed in (z1 [nv], z2 [nv2]: dense products),
 * through the vectorised loops: the same checks, messages and results up to summation order
 * and the exponential's last ulp */
static kvt_status fast_row(int i, double *z1, int nv, int T, const float *k2, double *z2, int nv2,
                           int n2, float *pi, float *p2, double *lse, double *zs)
{
    KVT_RETURN_IF(nv + nv2 == 0, KVT_ERR_INVALID_ARG, "attn_probs: query %d sees no key", i);
    double zmax;
    int bad = kvt_max_finite_cpu(z1, nv, &zmax);
    KVT_RETURN_IF(bad >= 0, KVT_ERR_NAN, "attn_probs: logit (%d,%d) not finite", i, bad);
    for (int j = 0; j < nv2; j++) {
        KVT_RETURN_IF(!isfinite(z2[j]), KVT_ERR_NAN, "attn_probs: logit (%d,k2 %d) not finite", i,
                      j);
        zmax = z2[j] > zmax ? z2[j] : zmax;
    }
    double zsum = kvt_exp_shift_sum_cpu(z1, nv, zmax);
    for (int j = 0; j < nv2; j++) {
        z2[j] = exp(z2[j] - zmax);
        zsum += z2[j];
    }
    kvt_div_to_f32_cpu(z1, nv, zsum, pi);
    memset(pi + nv, 0, (size_t)(T - nv) * sizeof(float));
    if (k2)
        for (int j = 0; j < n2; j++)
            p2[j] = j < nv2 ? (float)(z2[j] / zsum) : 0.0f;
    if (lse)
        *lse = zmax + log(zsum);
    if (zs)
        zs[0] = zmax, zs[1] = zsum;
    return KVT_OK;
}

/* the widest visible prefix of n_q queries over n keys (n_vis clamped to 0..n) */
static int widest(const int *n_vis, int n_q, int n)
{
    int w = 0;
    for (int i = 0; i < n_q; i++) {
        const int nv = kvt_clampi(n_vis[i], 0, n);
        w = nv > w ? nv : w;
    }
    return w;
}

/* z [n_q, nv_max] = scale * q k^T over the first nv_max keys, in blocks of KB keys (qd
 * [n_q, D], kd [KB, D] workspace) */
static void logits(const float *q, int n_q, int D, const float *k, int nv_max, double scale,
                   double *qd, double *kd, double *z)
{
    for (size_t i = 0; i < (size_t)n_q * D; i++)
        qd[i] = q[i];
    for (int j0 = 0; j0 < nv_max; j0 += KB) {
        int nb = nv_max - j0 < KB ? nv_max - j0 : KB;
        for (size_t i = 0; i < (size_t)nb * D; i++)
            kd[i] = k[(size_t)j0 * D + i];
        kvt_gemm_f64(true, n_q, nb, D, scale, qd, D, kd, D, 0.0, z + j0, nv_max);
    }
}

kvt_status kvt_attn_probs_cpu(const float *q, int n_q, int D, const float *k, int T,
                              const int *n_vis, const float *k2, int n2, const int *n_vis2,
                              double scale, float *pr, float *pr2, double *lse, double *work)
{
    return kvt_attn_probs_zs_cpu(q, n_q, D, k, T, n_vis, k2, n2, n_vis2, scale, pr, pr2, lse, NULL,
                                 work);
}

kvt_status kvt_attn_probs_zs_cpu(const float *q, int n_q, int D, const float *k, int T,
                                 const int *n_vis, const float *k2, int n2, const int *n_vis2,
                                 double scale, float *pr, float *pr2, double *lse, double *zs,
                                 double *work)
{
    KVT_RETURN_IF(n_q < 0 || D <= 0 || T < 0 || (k2 && n2 < 0), KVT_ERR_INVALID_ARG,
                  "attn_probs: bad shape n_q=%d D=%d T=%d n2=%d", n_q, D, T, n2);
    KVT_RETURN_IF(k2 && !pr2, KVT_ERR_INVALID_ARG, "attn_probs: pr2 is NULL");
    (void)work;
    if (!k2)
        n2 = 0;
    const int nv_max = widest(n_vis, n_q, T), nv2_max = k2 ? widest(n_vis2, n_q, n2) : 0;
    kvt_status st = KVT_OK;
    double *qd = kvt_malloc(((size_t)n_q * D + 1) * sizeof(double));
    double *kd = kvt_malloc(((size_t)KB * D) * sizeof(double));
    double *z = kvt_malloc(((size_t)n_q * nv_max + 1) * sizeof(double));
    double *z2 = kvt_malloc(((size_t)n_q * nv2_max + 1) * sizeof(double));
    if (!qd || !kd || !z || !z2) {
        st = kvt_error_set(KVT_ERR_NOMEM, "attn_probs: out of memory");
        goto out_free;
    }
    /* z [n_q, nv_max] = scale * q k^T over the visible prefix of the widest query, and z2
       [n_q, nv2_max] over block 2's */
    logits(q, n_q, D, k, nv_max, scale, qd, kd, z);
    if (nv2_max > 0)
        logits(q, n_q, D, k2, nv2_max, scale, qd, kd, z2);
    for (int i = 0; i < n_q && !st; i++) {
        int nv = kvt_clampi(n_vis[i], 0, T), nv2 = k2 ? kvt_clampi(n_vis2[i], 0, n2) : 0;
        st = fast_row(i, z + (size_t)i * nv_max, nv, T, k2, z2 + (size_t)i * nv2_max, nv2, n2,
                      pr + (size_t)i * T, k2 ? pr2 + (size_t)i * n2 : NULL, lse ? lse + i : NULL,
                      zs ? zs + 2 * (size_t)i : NULL);
    }
out_free:
    kvt_free(qd);
    kvt_free(kd);
    kvt_free(z);
    kvt_free(z2);
    return st;
}

kvt_status kvt_attn_probs_again_cpu(const float *q, int n_q, int D, const float *k, int T,
                                    const int *n_vis, double scale, const double *zs, float *pr,
                                    double *work)
{
    (void)work;
    KVT_RETURN_IF(n_q < 0 || D <= 0 || T < 0, KVT_ERR_INVALID_ARG,
                  "attn_probs: bad shape n_q=%d D=%d T=%d", n_q, D, T);
    const int nv_max = widest(n_vis, n_q, T);
    kvt_status st = KVT_OK;
    double *qd = kvt_malloc(((size_t)n_q * D + 1) * sizeof(double));
    double *kd = kvt_malloc(((size_t)KB * D) * sizeof(double));
    double *z = kvt_malloc(((size_t)n_q * nv_max + 1) * sizeof(double));
    if (!qd || !kd || !z) {
        st = kvt_error_set(KVT_ERR_NOMEM, "attn_probs: out of memory");
        goto out_free;
    }
    logits(q, n_q, D, k, nv_max, scale, qd, kd, z); /* the first call's products */
    for (int i = 0; i < n_q; i++) {                 /* fast_row's steps for block 1 */
        const int nv = kvt_clampi(n_vis[i], 0, T);
        double *z1 = z + (size_t)i * nv_max, zmax;
        float *pi = pr + (size_t)i * T;
        int bad = kvt_max_finite_cpu(z1, nv, &zmax);
        if (bad >= 0) {
            st = kvt_error_set(KVT_ERR_NAN, "attn_probs: logit (%d,%d) not finite", i, bad);
            break;
        }
        (void)kvt_exp_shift_sum_cpu(z1, nv, zs[2 * (size_t)i]);
        kvt_div_to_f32_cpu(z1, nv, zs[2 * (size_t)i + 1], pi);
        memset(pi + nv, 0, (size_t)(T - nv) * sizeof(float));
    }
out_free:
    kvt_free(qd);
    kvt_free(kd);
    kvt_free(z);
    return st;
}

#define QB 64 /* query rows per block of the column sums: [QB, T] logits, at most 32 MiB */

kvt_status kvt_attn_colsum_cpu(const float *q, const float *k, int T, int D, double scale,
                               double *work, double *colsum)
{
    (void)work;
    KVT_RETURN_IF(T < 0 || D <= 0, KVT_ERR_INVALID_ARG, "attn_colsum: bad shape T=%d D=%d", T, D);
    for (int j = 0; j < T; j++)
        colsum[j] = 0.0;
    if (T == 0)
        return KVT_OK;
    kvt_status st = KVT_OK;
    const size_t cap = ((size_t)32 << 20) / (sizeof(double) * (size_t)T); /* rows in 32 MiB */
    const int qb = cap >= QB ? QB : cap < 1 ? 1 : (int)cap;
    double *qd = kvt_malloc((size_t)qb * D * sizeof(double));
    double *kd = kvt_malloc((size_t)KB * D * sizeof(double));
    double *z = kvt_malloc((size_t)qb * T * sizeof(double));
    float *pf = kvt_malloc((size_t)T * sizeof(float));
    if (!qd || !kd || !z || !pf) {
        st = kvt_error_set(KVT_ERR_NOMEM, "attn_colsum: out of memory");
        goto out_free;
    }
    for (int i0 = 0; i0 < T && !st; i0 += qb) {
        const int nq = T - i0 < qb ? T - i0 : qb, last = i0 + nq; /* rows see keys < last */
        for (size_t i = 0; i < (size_t)nq * D; i++)
            qd[i] = q[(size_t)i0 * D + i];
        for (int j0 = 0; j0 < last; j0 += KB) { /* z [nq, last] = scale * q k^T */
            int nb = last - j0 < KB ? last - j0 : KB;
            for (size_t i = 0; i < (size_t)nb * D; i++)
                kd[i] = k[(size_t)j0 * D + i];
            kvt_gemm_f64(true, nq, nb, D, scale, qd, D, kd, D, 0.0, z + j0, last);
        }
        for (int r = 0; r < nq; r++) { /* rows in order: every column adds them in order */
            const int i = i0 + r, nv = i + 1;
            double *row = z + (size_t)r * last, zmax;
            int bad = kvt_max_finite_cpu(row, nv, &zmax);
            if (bad >= 0) {
                st = kvt_error_set(KVT_ERR_NAN, "attn_colsum: logit (%d,%d) not finite", i, bad);
                break;
            }
            double zsum = kvt_exp_shift_sum_cpu(row, nv, zmax);
            kvt_div_to_f32_cpu(row, nv, zsum, pf); /* probabilities are f32 (§0.1.3) */
            for (int j = 0; j < nv; j++)
                colsum[j] += (double)pf[j];
        }
    }
out_free:
    kvt_free(qd);
    kvt_free(kd);
    kvt_free(z);
    kvt_free(pf);
    return st;
}

kvt_status kvt_attn_output_cpu(const float *p, int n_q, int T, size_t stride_p, const float *v,
                               int D, double *out, size_t stride_out)
{
    KVT_RETURN_IF(n_q < 0 || T < 0 || D <= 0, KVT_ERR_INVALID_ARG,
                  "attn_output: bad shape n_q=%d T=%d D=%d", n_q, T, D);
    double *pd = kvt_malloc(((size_t)n_q * KB + 1) * sizeof(double));
    double *vd = kvt_malloc(((size_t)KB * D) * sizeof(double));
    if (!pd || !vd) {
        kvt_free(pd);
        kvt_free(vd);
        return kvt_error_set(KVT_ERR_NOMEM, "attn_output: out of memory");
    }
    for (int q = 0; q < n_q; q++)
        memset(out + (size_t)q * stride_out, 0, (size_t)D * sizeof(double));
    for (int j0 = 0; j0 < T; j0 += KB) {
        int nb = T - j0 < KB ? T - j0 : KB;
        for (int q = 0; q < n_q; q++)
            for (int u = 0; u < nb; u++)
                pd[(size_t)q * nb + u] = p[(size_t)q * stride_p + j0 + u];
        for (size_t i = 0; i < (size_t)nb * D; i++)
            vd[i] = v[(size_t)j0 * D + i];
        kvt_gemm_f64(false, n_q, D, nb, 1.0, pd, nb, vd, D, 1.0, out, (int)stride_out);
    }
    kvt_free(pd);
    kvt_free(vd);
    return KVT_OK;
}
