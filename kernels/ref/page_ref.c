/* page_ref.c - Quest page summaries (POLICIES §15): per-page channel min/max of the keys and
 * the per-query upper bound U = sum_c max(q_c*m_c, q_c*M_c) of the largest q.k in a page.
 */
#include "kvt_kernels.h"

kvt_status kvt_page_bounds_ref(const float *k, int T, int D, int P, float *kmin, float *kmax)
{
    KVT_RETURN_IF(T < 0 || D <= 0 || P <= 0, KVT_ERR_INVALID_ARG,
                  "page_bounds: bad shape T=%d D=%d P=%d", T, D, P);
    int n_pages = (T + P - 1) / P;
    /* k is (T, D); kmin, kmax are (n_pages, D) */
    for (int p = 0; p < n_pages; p++) {
        float *mn = kmin + (size_t)p * D, *mx = kmax + (size_t)p * D;
        int t0 = p * P, t1 = t0 + P < T ? t0 + P : T;
        for (int d = 0; d < D; d++)
            mn[d] = mx[d] = k[(size_t)t0 * D + d];
        for (int t = t0 + 1; t < t1; t++)
            for (int d = 0; d < D; d++) {
                float x = k[(size_t)t * D + d];
                mn[d] = x < mn[d] ? x : mn[d];
                mx[d] = x > mx[d] ? x : mx[d];
            }
    }
    return KVT_OK;
}

void kvt_page_upper_ref(const float *q, const float *kmin, const float *kmax, int n_pages, int D,
                        double *U)
{
    /* q is (D); kmin, kmax are (n_pages, D); U is (n_pages) */
    for (int p = 0; p < n_pages; p++) {
        double s = 0.0;
        for (int d = 0; d < D; d++) {
            double a = (double)q[d] * kmin[(size_t)p * D + d];
            double b = (double)q[d] * kmax[(size_t)p * D + d];
            s += a > b ? a : b;
        }
        U[p] = s;
    }
}
