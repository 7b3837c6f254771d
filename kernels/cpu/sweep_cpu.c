/* sweep_cpu.c - fast CPU variants of the budget sweeps (sweep_ref.c is the oracle).
 *  - Output sweep: between two cuts, the kept tokens' contribution to every query's running
 *    sum is one dense product, P[queries, tokens] x V[tokens, D], over gathered blocks of at
 *    most KB tokens (kvt_gemm_f64); recall and error are then recorded exactly as the
 *    reference does (sweep_record.h). Same forward/backward split at T/2.
 *  - Cosine table: ku [T, D] x ku[probes]^T in double, rounded to f32 as the reference does.
 */
#include <math.h>
#include <string.h>

#include "../ref/sweep_record.h"
#include "kvt_kernels.h"

#define KB 256 /* gathered tokens per product */

size_t kvt_sweep_output_cpu_workspace_bytes(int n_q, int D)
{
    size_t nq = (size_t)(n_q > 0 ? n_q : 0);
    return kvt_sweep_output_workspace_bytes(n_q, D) + (nq * KB + (size_t)KB * D) * sizeof(double);
}

/* add sign * (contribution of order[t0..t1)) to acc, r and rm of every query */
static void add_tokens(int n_q, int D, const float *p, size_t stride_p, const float *v,
                       const int32_t *order, int t0, int t1, const uint8_t *mod, double sign,
                       double *acc, double *r, double *rm, double *pg, double *vg)
{
    for (int b0 = t0; b0 < t1; b0 += KB) {
        int nb = t1 - b0 < KB ? t1 - b0 : KB;
        for (int u = 0; u < nb; u++) {
            const float *vj = v + (size_t)order[b0 + u] * D;
            for (int d = 0; d < D; d++)
                vg[(size_t)u * D + d] = vj[d];
        }
        for (int q = 0; q < n_q; q++) {
            const float *pq = p + (size_t)q * stride_p;
            double *pgq = pg + (size_t)q * nb, s = 0.0;
            for (int u = 0; u < nb; u++) {
                double pj = pq[order[b0 + u]];
                pgq[u] = pj;
                s += pj;
                if (mod)
                    rm[(size_t)q * NM + mod[order[b0 + u]]] += sign * pj;
            }
            r[q] += sign * s;
        }
        kvt_gemm_f64(false, n_q, D, nb, sign, pg, nb, vg, D, 1.0, acc, D);
    }
}

kvt_status kvt_sweep_output_cpu(int n_q, int T, int D, const float *p, size_t stride_p,
                                const float *v, const double *a_full, size_t stride_a,
                                const double *p_extra, size_t stride_e, const double *o_extra,
                                const double *r_full, const int32_t *order, const int32_t *cuts,
                                int n_cut, const uint8_t *mod, const double *mass_mod,
                                size_t stride_m, double *recall, double *err, double *recall_mod,
                                void *work)
{
    KVT_RETURN_IF(n_q < 0 || T < 0 || D <= 0 || n_cut < 0, KVT_ERR_INVALID_ARG,
                  "sweep_output: bad shape n_q=%d T=%d D=%d", n_q, T, D);
    KVT_RETURN_IF(mod && !mass_mod, KVT_ERR_INVALID_ARG, "sweep_output: mod without mass_mod");
    for (int c = 0; c < n_cut; c++)
        KVT_RETURN_IF(cuts[c] < 0 || cuts[c] > T || (c > 0 && cuts[c] <= cuts[c - 1]),
                      KVT_ERR_INVALID_ARG, "sweep: cuts must increase strictly within 0..%d", T);
    if (!mod)
        recall_mod = NULL;
    /* work: acc (n_q, D), r (n_q), rm (n_q, NM), r_full (n_q), then pg (n_q, KB), vg (KB, D) */
    double *acc = work, *r = acc + (size_t)n_q * D, *rm = r + n_q, *rf = rm + (size_t)n_q * NM;
    double *pg = rf + n_q, *vg = pg + (size_t)n_q * KB;
    int half = T / 2, n_fwd = 0;
    while (n_fwd < n_cut && cuts[n_fwd] <= half)
        n_fwd++;

    memset(work, 0, kvt_sweep_output_workspace_bytes(n_q, D));
    for (int q = 0; q < n_q; q++) {
        if (r_full) {
            rf[q] = r_full[(size_t)q * stride_e];
            continue;
        }
        const float *pq = p + (size_t)q * stride_p;
        double s = 0.0;
        for (int j = 0; j < T; j++)
            s += pq[j];
        rf[q] = s;
    }
#define RECORD(q, ci, rq)                                                                          \
    kvt_sweep_record(q, ci, n_cut, D, acc + (size_t)(q)*D, rq, rm + (size_t)(q)*NM, rf[q],         \
                     a_full + (size_t)(q)*stride_a,                                                \
                     p_extra ? p_extra + (size_t)(q)*stride_e : NULL,                              \
                     o_extra ? o_extra + (size_t)(q)*stride_a : NULL,                              \
                     mass_mod ? mass_mod + (size_t)(q)*stride_m : NULL, recall, err, recall_mod)
    /* forward: kept = order[0..c) for the cuts up to T/2 */
    int t = 0;
    for (int ci = 0; ci < n_fwd; ci++) {
        add_tokens(n_q, D, p, stride_p, v, order, t, cuts[ci], mod, 1.0, acc, r, rm, pg, vg);
        t = cuts[ci];
        for (int q = 0; q < n_q; q++)
            RECORD(q, ci, r[q]);
    }
    if (n_fwd == n_cut)
        return KVT_OK;

    /* backward: kept = everything minus order[c..T) for the cuts above T/2 */
    for (int q = 0; q < n_q; q++) {
        r[q] = rf[q];
        memcpy(acc + (size_t)q * D, a_full + (size_t)q * stride_a, (size_t)D * sizeof(double));
        for (int m = 0; m < NM; m++)
            rm[(size_t)q * NM + m] = mod ? mass_mod[(size_t)q * stride_m + m] : 0.0;
    }
    t = T;
    for (int ci = n_cut - 1; ci >= n_fwd; ci--) {
        add_tokens(n_q, D, p, stride_p, v, order, cuts[ci], t, mod, -1.0, acc, r, rm, pg, vg);
        t = cuts[ci];
        for (int q = 0; q < n_q; q++)
            RECORD(q, ci, r[q] < 0.0 ? 0.0 : r[q]); /* cancellation can leave -1e-17 */
    }
#undef RECORD
    return KVT_OK;
}

kvt_status kvt_cosine_table_cpu(const float *ku, int T, int D, const int32_t *probe, int n_probe,
                                float *ct)
{
    KVT_RETURN_IF(T < 0 || D <= 0 || n_probe < 0, KVT_ERR_INVALID_ARG,
                  "cosine_table: bad shape T=%d D=%d n_probe=%d", T, D, n_probe);
    for (int i = 0; i < n_probe; i++)
        KVT_RETURN_IF(probe[i] < 0 || probe[i] >= T, KVT_ERR_INVALID_ARG,
                      "cosine_table: probe %d out of range", probe[i]);
    /* in double, rounded to f32 like the reference: [KB keys] x [n_probe] at a time */
    double *kp = kvt_malloc(((size_t)n_probe * D + 1) * sizeof(double));
    double *kd = kvt_malloc(((size_t)KB * D) * sizeof(double));
    double *cd = kvt_malloc(((size_t)KB * n_probe + 1) * sizeof(double));
    if (!kp || !kd || !cd) {
        kvt_free(kp);
        kvt_free(kd);
        kvt_free(cd);
        return kvt_error_set(KVT_ERR_NOMEM, "cosine_table: out of memory");
    }
    for (int i = 0; i < n_probe; i++)
        for (int d = 0; d < D; d++)
            kp[(size_t)i * D + d] = ku[(size_t)probe[i] * D + d];
    for (int j0 = 0; j0 < T; j0 += KB) {
        int nb = T - j0 < KB ? T - j0 : KB;
        for (size_t i = 0; i < (size_t)nb * D; i++)
            kd[i] = ku[(size_t)j0 * D + i];
        kvt_gemm_f64(true, nb, n_probe, D, 1.0, kd, D, kp, D, 0.0, cd, n_probe);
        for (size_t i = 0; i < (size_t)nb * n_probe; i++)
            ct[(size_t)j0 * n_probe + i] = (float)cd[i];
    }
    kvt_free(kp);
    kvt_free(kd);
    kvt_free(cd);
    return KVT_OK;
}
