/* sweep_cpu.c - fast CPU variants of the budget sweeps (sweep_ref.c is the oracle).
 *  - Output sweep: between two cuts, the kept tokens' contribution to every query's running
 *    sum is one dense product, P[queries, tokens] x V[tokens, D], over gathered blocks of at
 *    most KB tokens (kvt_gemm_f64); recall and error are then recorded exactly as the
 *    reference does (sweep_record.h). Same forward/backward split at T/2.
 *  - Cosine table: ku [T, D] x ku[probes]^T as one f32 product (the table is f32 either way).
 */
#include <math.h>
#include <string.h>

#include "../ref/sweep_record.h"
#include "cpu_internal.h"
#include "kvt_kernels.h"

#define KB 256 /* gathered tokens per product */

size_t kvt_sweep_output_cpu_workspace_bytes(int n_q, int D)
{
    size_t nq = (size_t)(n_q > 0 ? n_q : 0);
    return kvt_sweep_output_workspace_bytes(n_q, D) +
           (nq * KB + (size_t)KB * D + nq * (1 + NM)) * sizeof(double);
}

typedef struct cpu_add {
    int n_q, D;
    const float *p, *v, *p_t;
    size_t stride_p, stride_t;
    const int32_t *order;
    const uint8_t *mod;
    double *pg, *vg; /* [n_q, KB] (token-major [KB, n_q] with p_t) and [KB, D] gathered blocks */
    double *sb;      /* [1 + NM, n_q] block sums of each query: all, by modality (with p_t) */
} cpu_add;

/* cpu_add_tokens from the token-major copy: token u's probabilities are one contiguous run,
 * gathered into pg [nb, n_q]; the product is then pg^T x vg */
KVT_CLONES static void cpu_add_tokens_t(const cpu_add *a, int t0, int t1, double sign, double *acc,
                                        double *r, double *rm)
{
    const int n_q = a->n_q, D = a->D;
    double *sum = a->sb, *sm = a->sb + n_q;
    for (int b0 = t0; b0 < t1; b0 += KB) {
        int nb = t1 - b0 < KB ? t1 - b0 : KB;
        memset(a->sb, 0, (size_t)n_q * (1 + NM) * sizeof(double));
        for (int u = 0; u < nb; u++) {
            int32_t j = a->order[b0 + u];
            const float *vj = a->v + (size_t)j * D, *pj = a->p_t + (size_t)j * a->stride_t;
            double *vgu = a->vg + (size_t)u * D, *pgu = a->pg + (size_t)u * n_q;
            if (u + PREFETCH < nb) { /* rows of a random token: hide their memory latency */
                int32_t jn = a->order[b0 + u + PREFETCH];
                prefetch_row(a->v + (size_t)jn * D, (size_t)D);
                prefetch_row(a->p_t + (size_t)jn * a->stride_t, (size_t)n_q);
            }
            for (int d = 0; d < D; d++)
                vgu[d] = vj[d];
            for (int q = 0; q < n_q; q++) {
                pgu[q] = pj[q];
                sum[q] += pj[q];
            }
            if (a->mod) {
                double *smj = sm + (size_t)a->mod[j] * n_q;
                for (int q = 0; q < n_q; q++)
                    smj[q] += pj[q];
            }
        }
        for (int q = 0; q < n_q; q++) {
            r[q] += sign * sum[q];
            if (a->mod)
                for (int m = 0; m < NM; m++)
                    rm[(size_t)q * NM + m] += sign * sm[(size_t)m * n_q + q];
        }
        kvt_gemm_f64_at(n_q, D, nb, sign, a->pg, n_q, a->vg, D, 1.0, acc, D);
    }
}

/* add sign * (contribution of order[t0..t1)) to acc, r and rm of every query, KB tokens at a
 * time: gather their probabilities and values, one product */
KVT_CLONES static void cpu_add_tokens(void *ctx, int t0, int t1, double sign, double *acc,
                                      double *r, double *rm)
{
    const cpu_add *a = ctx;
    const int n_q = a->n_q, D = a->D;
    if (a->p_t) {
        cpu_add_tokens_t(a, t0, t1, sign, acc, r, rm);
        return;
    }
    for (int b0 = t0; b0 < t1; b0 += KB) {
        int nb = t1 - b0 < KB ? t1 - b0 : KB;
        for (int u = 0; u < nb; u++) {
            const float *vj = a->v + (size_t)a->order[b0 + u] * D;
            for (int d = 0; d < D; d++)
                a->vg[(size_t)u * D + d] = vj[d];
        }
        for (int q = 0; q < n_q; q++) {
            const float *pq = a->p + (size_t)q * a->stride_p;
            double *pgq = a->pg + (size_t)q * nb, s = 0.0;
            for (int u = 0; u < nb; u++) {
                double pj = pq[a->order[b0 + u]];
                pgq[u] = pj;
                s += pj;
                if (a->mod)
                    rm[(size_t)q * NM + a->mod[a->order[b0 + u]]] += sign * pj;
            }
            r[q] += sign * s;
        }
        kvt_gemm_f64(false, n_q, D, nb, sign, a->pg, nb, a->vg, D, 1.0, acc, D);
    }
}

kvt_status kvt_sweep_output_cpu(int n_q, int T, int D, const float *p, size_t stride_p,
                                const float *p_t, size_t stride_t, const float *v,
                                const double *a_full, size_t stride_a, const double *p_extra,
                                size_t stride_e, const double *o_extra, const double *r_full,
                                const int32_t *order, const int32_t *cuts, int n_cut,
                                const uint8_t *mod, const double *mass_mod, size_t stride_m,
                                double *recall, double *err, double *recall_mod, void *work)
{
    /* work: the driver's part, then pg (n_q, KB), vg (KB, D), sb (1 + NM, n_q) */
    double *pg = (double *)((char *)work + kvt_sweep_output_workspace_bytes(n_q, D));
    size_t nq = (size_t)(n_q > 0 ? n_q : 0);
    cpu_add a = {n_q,      D,     p,   v,  p_t,          stride_p,
                 stride_t, order, mod, pg, pg + nq * KB, pg + nq * KB + (size_t)KB * D};
    return kvt_sweep_drive(n_q, T, D, p, stride_p, a_full, stride_a, p_extra, stride_e, o_extra,
                           r_full, cuts, n_cut, mod, mass_mod, stride_m, recall, err, recall_mod,
                           work, cpu_add_tokens, &a);
}

kvt_status kvt_cosine_table_cpu(const float *ku, int T, int D, const int32_t *probe, int n_probe,
                                float *ct)
{
    KVT_RETURN_IF(T < 0 || D <= 0 || n_probe < 0, KVT_ERR_INVALID_ARG,
                  "cosine_table: bad shape T=%d D=%d n_probe=%d", T, D, n_probe);
    for (int i = 0; i < n_probe; i++)
        KVT_RETURN_IF(probe[i] < 0 || probe[i] >= T, KVT_ERR_INVALID_ARG,
                      "cosine_table: probe %d out of range", probe[i]);
    if (T == 0 || n_probe == 0)
        return KVT_OK;
    /* ct [T, n_probe] = ku [T, D] x kp [n_probe, D]^T in f32 */
    float *kp = kvt_malloc((size_t)n_probe * D * sizeof(float));
    if (!kp)
        return kvt_error_set(KVT_ERR_NOMEM, "cosine_table: out of memory");
    for (int i = 0; i < n_probe; i++)
        memcpy(kp + (size_t)i * D, ku + (size_t)probe[i] * D, (size_t)D * sizeof(float));
    kvt_gemm_f32(true, T, n_probe, D, 1.0f, ku, D, kp, D, 0.0f, ct, n_probe);
    kvt_free(kp);
    return KVT_OK;
}
