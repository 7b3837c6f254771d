/* sweep_record.h - the per-cut record of the output sweep, shared by kvt_sweep_output_ref and
 * its fast CPU variant so that both compute recall and error from the kept sums identically.
 * Internal to kernels/.
 */
#ifndef KVT_SWEEP_RECORD_H
#define KVT_SWEEP_RECORD_H

#include <math.h>

#include "kvt_kernels.h"

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

#endif /* KVT_SWEEP_RECORD_H */
