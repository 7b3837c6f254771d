/* sweep_record.h - the output sweep's driver and per-cut record, shared by kvt_sweep_output_ref
 * and its fast CPU variant: argument checks, the forward/backward split at T/2 and how recall
 * and error come from the kept sums are written once; a variant only supplies how the
 * contribution of a run of ranked tokens is added to the running sums. Internal to kernels/.
 */
#ifndef KVT_SWEEP_RECORD_H
#define KVT_SWEEP_RECORD_H

#include <math.h>
#include <string.h>

#include "kvt_kernels.h"
#include "sweep_cuts.h"

#define NM KVT_N_MODALITIES

/* Record recall/err for query q given the kept sums (acc [D], r, rm [NM]). Both the kept and
 * the full output are normalised by their own stored mass, so that the full set gives recall 1
 * and error 0 exactly even though f32 probabilities do not sum to exactly 1. */
static inline void kvt_sweep_record(int q, int ci, int n_cut, int D, const double *acc, double r,
                                    const double *rm, double r_full, const double *a_full,
                                    const double *p_extra, const double *o_extra,
                                    const double *mass_mod, double *recall, double *err,
                                    double *recall_mod)
{
    double pe = p_extra ? p_extra[0] : 0.0;
    double kept = r + pe, total = r_full + pe;
    recall[(size_t)q * n_cut + ci] = total > 0.0 ? kept / total : 0.0;
    if (err) {
        double num = 0.0, den = 0.0;
        for (int d = 0; d < D; d++) {
            double oe = o_extra ? o_extra[d] : 0.0;
            double o = total > 0.0 ? (a_full[d] + oe) / total : 0.0;
            double os = kept > 0.0 ? (acc[d] + oe) / kept : 0.0;
            num += (os - o) * (os - o);
            den += o * o;
        }
        double e;
        if (kept <= 0.0)
            e = 1.0;
        else if (den > 0.0)
            e = sqrt(num / den);
        else
            e = num > 0.0 ? 1.0 : 0.0;
        err[(size_t)q * n_cut + ci] = e;
    }
    if (recall_mod)
        for (int m = 0; m < NM; m++)
            recall_mod[((size_t)q * n_cut + ci) * NM + m] =
                mass_mod[m] > 0.0 ? rm[m] / mass_mod[m] : NAN;
}

/* A variant's step: add sign * (the contribution of order[t0..t1)) to the running sums
 * acc [n_q, D], r [n_q] and rm [n_q, NM] of every query. */
typedef void (*kvt_sweep_add_fn)(void *ctx, int t0, int t1, double sign, double *acc, double *r,
                                 double *rm);

/* kvt_sweep_output_ref's contract (kvt_kernels.h) with the token sums supplied by `add`. work
 * starts with kvt_sweep_output_workspace_bytes(n_q, D) bytes: acc, r, rm, r_full. */
static inline kvt_status
kvt_sweep_drive(int n_q, int T, int D, const float *p, size_t stride_p, const double *a_full,
                size_t stride_a, const double *p_extra, size_t stride_e, const double *o_extra,
                const double *r_full, const int32_t *cuts, int n_cut, const uint8_t *mod,
                const double *mass_mod, size_t stride_m, double *recall, double *err,
                double *recall_mod, void *work, kvt_sweep_add_fn add, void *ctx)
{
    KVT_RETURN_IF(n_q < 0 || T < 0 || D <= 0 || n_cut < 0, KVT_ERR_INVALID_ARG,
                  "sweep_output: bad shape n_q=%d T=%d D=%d", n_q, T, D);
    KVT_RETURN_IF(mod && !mass_mod, KVT_ERR_INVALID_ARG, "sweep_output: mod without mass_mod");
    KVT_FORWARD(kvt_sweep_check_cuts(cuts, n_cut, T));
    if (!mod)
        recall_mod = NULL;
    double *acc = work, *r = acc + (size_t)n_q * D, *rm = r + n_q, *rf = rm + (size_t)n_q * NM;
    int n_fwd = kvt_sweep_n_fwd(cuts, n_cut, T);
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
    /* forward: kept = order[0..c) for the cuts up to T/2; backward: kept = everything minus
     * order[c..T) for the larger cuts, so each query costs at most T/2 tokens */
    for (int dir = 0; dir < 2; dir++) {
        int n = dir ? n_cut - n_fwd : n_fwd, t = dir ? T : 0;
        if (dir && n > 0)
            for (int q = 0; q < n_q; q++) {
                r[q] = rf[q];
                memcpy(acc + (size_t)q * D, a_full + (size_t)q * stride_a,
                       (size_t)D * sizeof(double));
                for (int m = 0; m < NM; m++)
                    rm[(size_t)q * NM + m] = mod ? mass_mod[(size_t)q * stride_m + m] : 0.0;
            }
        for (int k = 0; k < n; k++) {
            int ci = dir ? n_cut - 1 - k : k;
            if (dir)
                add(ctx, cuts[ci], t, -1.0, acc, r, rm);
            else
                add(ctx, t, cuts[ci], 1.0, acc, r, rm);
            t = cuts[ci];
            for (int q = 0; q < n_q; q++) {
                double rq = r[q] < 0.0 ? 0.0 : r[q]; /* cancellation can leave -1e-17 */
                kvt_sweep_record(
                    q, ci, n_cut, D, acc + (size_t)q * D, rq, rm + (size_t)q * NM, rf[q],
                    a_full + (size_t)q * stride_a, p_extra ? p_extra + (size_t)q * stride_e : NULL,
                    o_extra ? o_extra + (size_t)q * stride_a : NULL,
                    mass_mod ? mass_mod + (size_t)q * stride_m : NULL, recall, err, recall_mod);
            }
        }
    }
    return KVT_OK;
}

#endif /* KVT_SWEEP_RECORD_H */
