/* sweep_cuts.h - the cut-list check every budget sweep makes (CPU references, fast CPU path,
 * CUDA), one definition. Plain C that also compiles as C++. Internal to kernels/.
 */
#ifndef KVT_SWEEP_CUTS_H
#define KVT_SWEEP_CUTS_H

#include "kvt_kernels.h"

/* cuts [n_cut] strictly increasing within 0..T */
static inline kvt_status kvt_sweep_check_cuts(const int32_t *cuts, int n_cut, int T)
{
    for (int c = 0; c < n_cut; c++)
        KVT_RETURN_IF(cuts[c] < 0 || cuts[c] > T || (c > 0 && cuts[c] <= cuts[c - 1]),
                      KVT_ERR_INVALID_ARG, "sweep: cuts must increase strictly within 0..%d", T);
    return KVT_OK;
}

#endif /* KVT_SWEEP_CUTS_H */
