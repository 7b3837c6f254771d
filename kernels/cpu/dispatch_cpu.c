/* dispatch_cpu.c - the dispatchers kvt_<op>: the fast CPU variant, or the reference when
 * kvt_kernels_ref_only() (KVT_KERNELS=ref). A CUDA branch joins here later.
 */
#include "kvt_kernels.h"

kvt_status kvt_attn_output(const float *p, int n_q, int T, size_t stride_p, const float *v, int D,
                           double *out, size_t stride_out)
{
    if (kvt_kernels_ref_only()) {
        KVT_RETURN_IF(n_q < 0 || T < 0 || D <= 0, KVT_ERR_INVALID_ARG,
                      "attn_output: bad shape n_q=%d T=%d D=%d", n_q, T, D);
        kvt_attn_output_ref(p, n_q, T, stride_p, v, D, out, stride_out);
        return KVT_OK;
    }
    return kvt_attn_output_cpu(p, n_q, T, stride_p, v, D, out, stride_out);
}

kvt_status kvt_attn_probs(const float *q, int n_q, int D, const float *k, int T, const int *n_vis,
                          const float *k2, int n2, const int *n_vis2, double scale, float *pr,
                          float *pr2, double *lse, double *work)
{
    return (kvt_kernels_ref_only() ? kvt_attn_probs_ref : kvt_attn_probs_cpu)(
        q, n_q, D, k, T, n_vis, k2, n2, n_vis2, scale, pr, pr2, lse, work);
}

kvt_status kvt_attn_probs_zs(const float *q, int n_q, int D, const float *k, int T,
                             const int *n_vis, const float *k2, int n2, const int *n_vis2,
                             double scale, float *pr, float *pr2, double *lse, double *zs,
                             double *work)
{
    return (kvt_kernels_ref_only() ? kvt_attn_probs_zs_ref : kvt_attn_probs_zs_cpu)(
        q, n_q, D, k, T, n_vis, k2, n2, n_vis2, scale, pr, pr2, lse, zs, work);
}

kvt_status kvt_attn_probs_again(const float *q, int n_q, int D, const float *k, int T,
                                const int *n_vis, double scale, const double *zs, float *pr,
                                double *work)
{
    return (kvt_kernels_ref_only() ? kvt_attn_probs_again_ref : kvt_attn_probs_again_cpu)(
        q, n_q, D, k, T, n_vis, scale, zs, pr, work);
}

kvt_status kvt_attn_colsum(const float *q, const float *k, int T, int D, double scale, double *work,
                           double *colsum)
{
    return (kvt_kernels_ref_only() ? kvt_attn_colsum_ref : kvt_attn_colsum_cpu)(q, k, T, D, scale,
                                                                                work, colsum);
}

kvt_status kvt_sweep_output(int n_q, int T, int D, const float *p, size_t stride_p,
                            const float *p_t, size_t stride_t, const float *v, const double *a_full,
                            size_t stride_a, const double *p_extra, size_t stride_e,
                            const double *o_extra, const double *r_full, const int32_t *order,
                            const int32_t *cuts, int n_cut, const uint8_t *mod,
                            const double *mass_mod, size_t stride_m, double *recall, double *err,
                            double *recall_mod, void *work)
{
    if (kvt_kernels_ref_only())
        return kvt_sweep_output_ref(n_q, T, D, p, stride_p, v, a_full, stride_a, p_extra, stride_e,
                                    o_extra, r_full, order, cuts, n_cut, mod, mass_mod, stride_m,
                                    recall, err, recall_mod, work);
    return kvt_sweep_output_cpu(n_q, T, D, p, stride_p, p_t, stride_t, v, a_full, stride_a, p_extra,
                                stride_e, o_extra, r_full, order, cuts, n_cut, mod, mass_mod,
                                stride_m, recall, err, recall_mod, work);
}

kvt_status kvt_cosine_table(const float *ku, int T, int D, const int32_t *probe, int n_probe,
                            float *ct)
{
    return (kvt_kernels_ref_only() ? kvt_cosine_table_ref : kvt_cosine_table_cpu)(ku, T, D, probe,
                                                                                  n_probe, ct);
}

void kvt_row_norms(const float *x, int n, int D, double *out)
{
    (kvt_kernels_ref_only() ? kvt_row_norms_ref : kvt_row_norms_cpu)(x, n, D, out);
}

void kvt_unit_rows(const float *x, int n, int D, float *ku, double *mean)
{
    (kvt_kernels_ref_only() ? kvt_unit_rows_ref : kvt_unit_rows_cpu)(x, n, D, ku, mean);
}

kvt_status kvt_sweep_coverage(const float *ct, int T, int n_probe, int n_eval, const int32_t *order,
                              const int32_t *cuts, int n_cut, const uint8_t *probe_mod,
                              const int32_t *probe_pos, float *work, double *cov, double *radius,
                              double *cov_mod, double *cov_drop)
{
    return (kvt_kernels_ref_only() ? kvt_sweep_coverage_ref : kvt_sweep_coverage_cpu)(
        ct, T, n_probe, n_eval, order, cuts, n_cut, probe_mod, probe_pos, work, cov, radius,
        cov_mod, cov_drop);
}

kvt_status kvt_sweep_redundancy(const float *ku, int T, int D, const int32_t *order,
                                const int32_t *cuts, int n_cut, double *work, double *r)
{
    return (kvt_kernels_ref_only() ? kvt_sweep_redundancy_ref : kvt_sweep_redundancy_cpu)(
        ku, T, D, order, cuts, n_cut, work, r);
}

kvt_status kvt_rank_desc(const double *score, int n, int32_t *order, int32_t *work)
{
    if (kvt_kernels_ref_only()) {
        kvt_rank_desc_ref(score, n, order, work);
        return KVT_OK;
    }
    return kvt_rank_desc_cpu(score, n, order, work);
}

void kvt_accum_rows(double *s, int nu, int D, const double *p, const float *v)
{
    (kvt_kernels_ref_only() ? kvt_accum_rows_ref : kvt_accum_rows_cpu)(s, nu, D, p, v);
}

void kvt_dot_queries(const float *qt, int n_q, int D, const float *const *k, int n_k, double *out)
{
    (kvt_kernels_ref_only() ? kvt_dot_queries_ref : kvt_dot_queries_cpu)(qt, n_q, D, k, n_k, out);
}
