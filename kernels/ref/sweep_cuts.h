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

/* The output sweep walks forward from the top of the ranking for the cuts up to T/2 and
 * backward from the full sums for the larger ones (kvt_sweep_drive, sweep_cuda.cu), so each
 * query costs at most T/2 tokens. The number of forward cuts, of checked cuts: */
static inline int kvt_sweep_n_fwd(const int32_t *cuts, int n_cut, int T)
{
    int n_fwd = 0;
    while (n_fwd < n_cut && cuts[n_fwd] <= T / 2)
        n_fwd++;
    return n_fwd;
}

/* the tokens the sweep adds (or takes away) per query: up to the last forward cut, and from T
 * down to the first backward one */
static inline int64_t kvt_sweep_walk(const int32_t *cuts, int n_cut, int T)
{
    int n_fwd = kvt_sweep_n_fwd(cuts, n_cut, T);
    return (int64_t)(n_fwd > 0 ? cuts[n_fwd - 1] : 0) + (n_fwd < n_cut ? T - cuts[n_fwd] : 0);
}

#endif /* KVT_SWEEP_CUTS_H */
