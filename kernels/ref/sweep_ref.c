/* sweep_ref.c - the budget sweeps: every budget of one ranking from a single pass.
 *  - recall and output error: a running (sum p*v, sum p) per query (POLICIES §12, DESIGN §3);
 *  - key-space coverage: a running best cosine per probe key;
 *  - redundancy of the kept set: a running sum of unit keys.
 * This is the reason a sweep over 8 budgets costs about as much as one budget.
 */
#include <math.h>
#include <string.h>

#include "kvt_kernels.h"
#include "sweep_record.h"

size_t kvt_sweep_output_workspace_bytes(int n_q, int D)
{
    return (size_t)(n_q > 0 ? n_q : 0) * (size_t)(D + 2 + NM) * sizeof(double);
}

typedef struct ref_add {
    int n_q, D;
    const float *p, *v;
    size_t stride_p;
    const int32_t *order;
    const uint8_t *mod;
} ref_add;

/* token by token, in ranking order (forward) or from the end (backward); zeros skipped */
static void ref_add_tokens(void *ctx, int t0, int t1, double sign, double *acc, double *r,
                           double *rm)
{
    const ref_add *a = ctx;
    for (int k = 0; k < t1 - t0; k++) {
        int32_t j = a->order[sign > 0 ? t0 + k : t1 - 1 - k];
        const float *vj = a->v + (size_t)j * a->D;
        for (int q = 0; q < a->n_q; q++) {
            double pj = a->p[(size_t)q * a->stride_p + j];
            if (pj == 0.0)
                continue;
            double *aq = acc + (size_t)q * a->D;
            if (sign > 0) {
                for (int d = 0; d < a->D; d++)
                    aq[d] += pj * vj[d];
                r[q] += pj;
                if (a->mod)
                    rm[(size_t)q * NM + a->mod[j]] += pj;
            } else {
                for (int d = 0; d < a->D; d++)
                    aq[d] -= pj * vj[d];
                r[q] -= pj;
                if (a->mod)
                    rm[(size_t)q * NM + a->mod[j]] -= pj;
            }
        }
    }
}

kvt_status kvt_sweep_output_ref(int n_q, int T, int D, const float *p, size_t stride_p,
                                const float *v, const double *a_full, size_t stride_a,
                                const double *p_extra, size_t stride_e, const double *o_extra,
                                const double *r_full, const int32_t *order, const int32_t *cuts,
                                int n_cut, const uint8_t *mod, const double *mass_mod,
                                size_t stride_m, double *recall, double *err, double *recall_mod,
                                void *work)
{
    ref_add a = {n_q, D, p, v, stride_p, order, mod};
    return kvt_sweep_drive(n_q, T, D, p, stride_p, a_full, stride_a, p_extra, stride_e, o_extra,
                           r_full, cuts, n_cut, mod, mass_mod, stride_m, recall, err, recall_mod,
                           work, ref_add_tokens, &a);
}

kvt_status kvt_cosine_table_ref(const float *ku, int T, int D, const int32_t *probe, int n_probe,
                                float *ct)
{
    KVT_RETURN_IF(T < 0 || D <= 0 || n_probe < 0, KVT_ERR_INVALID_ARG,
                  "cosine_table: bad shape T=%d D=%d n_probe=%d", T, D, n_probe);
    for (int i = 0; i < n_probe; i++)
        KVT_RETURN_IF(probe[i] < 0 || probe[i] >= T, KVT_ERR_INVALID_ARG,
                      "cosine_table: probe %d out of range", probe[i]);
    /* ku is (T, D); ct is (T, n_probe) */
    for (int j = 0; j < T; j++) {
        const float *kj = ku + (size_t)j * D;
        for (int i = 0; i < n_probe; i++) {
            const float *kp = ku + (size_t)probe[i] * D;
            double s = 0.0;
            for (int d = 0; d < D; d++)
                s += (double)kj[d] * (double)kp[d];
            ct[(size_t)j * n_probe + i] = (float)s;
        }
    }
    return KVT_OK;
}

kvt_status kvt_sweep_coverage_ref(const float *ct, int T, int n_probe, int n_eval,
                                  const int32_t *order, const int32_t *cuts, int n_cut,
                                  const uint8_t *probe_mod, const int32_t *probe_pos, float *work,
                                  double *cov, double *radius, double *cov_mod, double *cov_drop)
{
    KVT_RETURN_IF(T < 0 || n_probe < 0 || n_eval < 0 || n_eval > n_probe || n_cut < 0,
                  KVT_ERR_INVALID_ARG, "sweep_coverage: bad shape");
    KVT_FORWARD(kvt_sweep_check_cuts(cuts, n_cut, T));
    float *best = work; /* (n_eval) */
    for (int i = 0; i < n_eval; i++)
        best[i] = -INFINITY;
    int t = 0;
    for (int ci = 0; ci < n_cut; ci++) {
        for (; t < cuts[ci]; t++) {
            const float *row = ct + (size_t)order[t] * n_probe;
            for (int i = 0; i < n_eval; i++)
                best[i] = row[i] > best[i] ? row[i] : best[i];
        }
        kvt_coverage_summary(best, n_eval, cuts[ci], probe_mod, probe_pos, cov + ci, radius + ci,
                             cov_mod ? cov_mod + (size_t)ci * NM : NULL,
                             cov_drop ? cov_drop + ci : NULL);
    }
    return KVT_OK;
}

void kvt_coverage_summary(const float *best, int n_probe, int cut, const uint8_t *probe_mod,
                          const int32_t *probe_pos, double *cov, double *radius, double *cov_mod,
                          double *cov_drop)
{
    double s = 0.0, rad = -INFINITY, sm[NM] = {0}, sd = 0.0;
    int cm[NM] = {0}, nd = 0;
    for (int i = 0; i < n_probe; i++) {
        s += best[i];
        rad = 1.0 - best[i] > rad ? 1.0 - best[i] : rad;
        if (probe_mod) {
            sm[probe_mod[i]] += best[i];
            cm[probe_mod[i]]++;
        }
        if (probe_pos && probe_pos[i] >= cut) {
            sd += best[i];
            nd++;
        }
    }
    bool empty = cut == 0 || n_probe == 0;
    *cov = empty ? NAN : s / n_probe;
    *radius = empty ? NAN : rad;
    if (probe_pos && cov_drop)
        *cov_drop = empty || nd == 0 ? NAN : sd / nd;
    if (probe_mod && cov_mod)
        for (int m = 0; m < NM; m++)
            cov_mod[m] = empty || !cm[m] ? NAN : sm[m] / cm[m];
}

kvt_status kvt_sweep_redundancy_ref(const float *ku, int T, int D, const int32_t *order,
                                    const int32_t *cuts, int n_cut, double *work, double *r)
{
    KVT_RETURN_IF(T < 0 || D <= 0 || n_cut < 0, KVT_ERR_INVALID_ARG, "sweep_redundancy: bad shape");
    KVT_FORWARD(kvt_sweep_check_cuts(cuts, n_cut, T));
    double *sum = work; /* (D) running sum of the kept unit keys */
    for (int d = 0; d < D; d++)
        sum[d] = 0.0;
    int t = 0;
    for (int ci = 0; ci < n_cut; ci++) {
        for (; t < cuts[ci]; t++) {
            const float *k = ku + (size_t)order[t] * D;
            for (int d = 0; d < D; d++)
                sum[d] += k[d];
        }
        r[ci] = kvt_redundancy_of_sum(sum, D, cuts[ci]);
    }
    return KVT_OK;
}

double kvt_redundancy_of_sum(const double *sum, int D, int n)
{
    if (n < 2)
        return NAN;
    double s2 = 0.0;
    for (int d = 0; d < D; d++)
        s2 += sum[d] * sum[d];
    /* n*||m||^2 = ||sum||^2 / n */
    return (s2 / n - 1.0) / (double)(n - 1);
}
