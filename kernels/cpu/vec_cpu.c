/* vec_cpu.c - the element-wise loops of the fast CPU path (softmax exponentials, finiteness
 * checks, row sums, norms and unit rows, modality masses), written so that the compiler
 * vectorises them (`omp simd` reductions, no branches in the loop bodies), each built for
 * several instruction sets (KVT_CLONES, cpu_internal.h) so the binary stays portable. Also
 * the coverage and redundancy sweeps, with results bitwise equal to their references.
 *
 * Results equal the references (kernels/ref/) up to summation order, and the exponential to
 * within 1 ulp of libm's (see kvt_exp_shift_sum_cpu).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "../ref/sweep_record.h"
#include "cpu_internal.h"
#include "kvt_kernels.h"

/* exp(x) for x <= 0, to ~1 ulp: x = k ln2 + r with |r| <= ln2/2 (ln2 in two parts, k*hi
 * exact), exp(r) by its Taylor polynomial to degree 13 (truncation < 1e-17), times 2^k made in
 * the exponent field. Below -708 (exp < 3.3e-308, 0 in f32) the result is 0. */
static inline __attribute__((always_inline)) double exp_nonpos(double x)
{
    const double shift = 0x1.8p52; /* adding it rounds to an integer kept in the low bits */
    const double log2e = 1.4426950408889634074, ln2_hi = 6.93147180369123816490e-01,
                 ln2_lo = 1.90821492927058770002e-10;
    double xc = x < -708.0 ? -708.0 : x;
    double t = xc * log2e + shift;
    double k = t - shift;
    double r = (xc - k * ln2_hi) - k * ln2_lo;
    double p = 1.0 / 6227020800.0; /* 1/13! */
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    /* t's low 12 bits hold k mod 4096; k in [-1021, 0] gives the biased exponent k + 1023 */
    uint64_t tb, sb;
    memcpy(&tb, &t, sizeof(tb));
    sb = (tb + 1023u) << 52;
    double two_k;
    memcpy(&two_k, &sb, sizeof(two_k));
    return x < -708.0 ? 0.0 : p * two_k;
}

KVT_CLONES double kvt_exp_shift_sum_cpu(double *z, int n, double shift)
{
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int j = 0; j < n; j++) {
        double e = exp_nonpos(z[j] - shift);
        z[j] = e;
        s += e;
    }
    return s;
}

KVT_CLONES int kvt_max_finite_cpu(const double *z, int n, double *zmax)
{
    double m = -INFINITY;
    int bad = 0;
#pragma omp simd reduction(max : m) reduction(| : bad)
    for (int j = 0; j < n; j++) {
        double x = z[j];
        bad |= !(x - x == 0.0); /* NaN and +-inf give NaN */
        m = x > m ? x : m;
    }
    if (bad)
        for (int j = 0; j < n; j++)
            if (!isfinite(z[j]))
                return j;
    *zmax = m;
    return -1;
}

KVT_CLONES void kvt_div_to_f32_cpu(const double *z, int n, double den, float *out)
{
#pragma omp simd
    for (int j = 0; j < n; j++)
        out[j] = (float)(z[j] / den);
}

KVT_CLONES size_t kvt_first_nonfinite_f32_cpu(const float *x, size_t n)
{
    const size_t CH = 4096;
    for (size_t i0 = 0; i0 < n; i0 += CH) {
        size_t m = n - i0 < CH ? n - i0 : CH;
        const float *y = x + i0;
        int bad = 0;
#pragma omp simd reduction(| : bad)
        for (size_t i = 0; i < m; i++)
            bad |= !(y[i] - y[i] == 0.0f);
        if (bad)
            for (size_t i = 0; i < m; i++)
                if (!isfinite(y[i]))
                    return i0 + i;
    }
    return n;
}

KVT_CLONES double kvt_sum_f32_cpu(const float *x, size_t n)
{
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (size_t i = 0; i < n; i++)
        s += x[i];
    return s;
}

KVT_CLONES void kvt_mass_by_mod_cpu(const float *p, const uint8_t *mod, int T, double *out)
{
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
#if KVT_N_MODALITIES != 4
#error "kvt_mass_by_mod_cpu assumes 4 modalities"
#endif
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int j = 0; j < T; j++) {
        int m = mod[j] < 3 ? mod[j] : 3;
        double x = p[j];
        s0 += m == 0 ? x : 0.0;
        s1 += m == 1 ? x : 0.0;
        s2 += m == 2 ? x : 0.0;
        s3 += m == 3 ? x : 0.0;
    }
    out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}

KVT_CLONES void kvt_row_norms_cpu(const float *x, int n, int D, double *out)
{
    for (int t = 0; t < n; t++) {
        const float *r = x + (size_t)t * D;
        double s = 0.0;
#pragma omp simd reduction(+ : s)
        for (int d = 0; d < D; d++)
            s += (double)r[d] * (double)r[d];
        out[t] = sqrt(s);
    }
}

KVT_CLONES void kvt_unit_rows_cpu(const float *x, int n, int D, float *ku, double *mean)
{
    if (mean)
        for (int d = 0; d < D; d++)
            mean[d] = 0.0;
    for (int t = 0; t < n; t++) {
        const float *r = x + (size_t)t * D;
        double s = 0.0;
#pragma omp simd reduction(+ : s)
        for (int d = 0; d < D; d++)
            s += (double)r[d] * (double)r[d];
        double nrm = sqrt(s);
        double inv = 1.0 / (nrm > 1e-12 ? nrm : 1e-12);
        if (ku) {
            float *o = ku + (size_t)t * D;
#pragma omp simd
            for (int d = 0; d < D; d++)
                o[d] = (float)((double)r[d] * inv);
        }
        if (mean)
#pragma omp simd
            for (int d = 0; d < D; d++)
                mean[d] += (double)r[d] * inv;
    }
    if (mean && n > 0)
        for (int d = 0; d < D; d++)
            mean[d] /= n;
}

void kvt_transpose_f32_cpu(const float *src, int rows, int cols, size_t ld_src, float *dst,
                           size_t ld_dst)
{
    /* through a padded 32x32 tile: each source row segment is read once, contiguously, and each
     * destination row written once, so power-of-two source strides (a row of T = 8192
     * probabilities is 32 KiB) do not thrash the L1 sets */
    enum { TB = 32 };
    float tile[TB][TB + 1];
    for (int i0 = 0; i0 < rows; i0 += TB)
        for (int j0 = 0; j0 < cols; j0 += TB) {
            int ni = rows - i0 < TB ? rows - i0 : TB, nj = cols - j0 < TB ? cols - j0 : TB;
            for (int i = 0; i < ni; i++) {
                const float *s = src + (size_t)(i0 + i) * ld_src + j0;
                for (int j = 0; j < nj; j++)
                    tile[j][i] = s[j];
            }
            for (int j = 0; j < nj; j++) {
                float *d = dst + (size_t)(j0 + j) * ld_dst + i0;
                for (int i = 0; i < ni; i++)
                    d[i] = tile[j][i];
            }
        }
}

KVT_CLONES kvt_status kvt_sweep_coverage_cpu(const float *ct, int T, int n_probe, int n_eval,
                                             const int32_t *order, const int32_t *cuts, int n_cut,
                                             const uint8_t *probe_mod, const int32_t *probe_pos,
                                             float *work, double *cov, double *radius,
                                             double *cov_mod, double *cov_drop)
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
            if (t + PREFETCH < T)
                prefetch_row(ct + (size_t)order[t + PREFETCH] * n_probe, (size_t)n_eval);
#pragma omp simd
            for (int i = 0; i < n_eval; i++)
                best[i] = row[i] > best[i] ? row[i] : best[i];
        }
        /* the per-cut summary is the reference's own */
        kvt_coverage_summary(best, n_eval, cuts[ci], probe_mod, probe_pos, cov + ci, radius + ci,
                             cov_mod ? cov_mod + (size_t)ci * NM : NULL,
                             cov_drop ? cov_drop + ci : NULL);
    }
    return KVT_OK;
}

KVT_CLONES kvt_status kvt_sweep_redundancy_cpu(const float *ku, int T, int D, const int32_t *order,
                                               const int32_t *cuts, int n_cut, double *work,
                                               double *r)
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
            if (t + PREFETCH < T)
                prefetch_row(ku + (size_t)order[t + PREFETCH] * D, (size_t)D);
#pragma omp simd
            for (int d = 0; d < D; d++)
                sum[d] += k[d];
        }
        r[ci] = kvt_redundancy_of_sum(sum, D, cuts[ci]);
    }
    return KVT_OK;
}

/* Each s[x][e] takes one product and one addition, as in the reference: bitwise its result
 * (no contraction into a fused multiply-add: ISO C mode's default, -ffp-contract=off) */
KVT_CLONES void kvt_accum_rows_cpu(double *s, int nu, int D, const double *p, const float *v)
{
    for (int x = 0; x < nu; x++) {
        const double a = p[x];
        double *sx = s + (size_t)x * D;
#pragma omp simd
        for (int e = 0; e < D; e++)
            sx[e] += a * (double)v[e];
    }
}

/* Four keys at a time, and for each four queries at a time: sixteen independent sums (the
 * additions' latency bounds a single dot product), each over d in order from 0 as the
 * reference's. The last keys of an incomplete group of four are computed twice, not stored. */
KVT_CLONES void kvt_dot_queries_cpu(const float *qt, int n_q, int D, const float *const *k, int n_k,
                                    double *out)
{
    for (int j0 = 0; j0 < n_k; j0 += 4) {
        const int nk = n_k - j0 < 4 ? n_k - j0 : 4;
        const float *k0 = k[j0], *k1 = k[j0 + (nk > 1)], *k2 = k[j0 + 2 * (nk > 2)],
                    *k3 = k[j0 + 3 * (nk > 3)];
        double *o = out + (size_t)j0 * n_q;
        int u = 0;
        for (; u + 4 <= n_q; u += 4) {
            double a[4][4] = {{0.0}}; /* [key][query] */
            for (int d = 0; d < D; d++) {
                const float *q = qt + (size_t)d * n_q + u;
                const double kd[4] = {k0[d], k1[d], k2[d], k3[d]};
                for (int j = 0; j < 4; j++)
                    for (int l = 0; l < 4; l++)
                        a[j][l] += (double)q[l] * kd[j];
            }
            for (int j = 0; j < nk; j++)
                for (int l = 0; l < 4; l++)
                    o[(size_t)j * n_q + u + l] = a[j][l];
        }
        for (; u < n_q; u++) { /* a query left over: four keys' sums */
            double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
            for (int d = 0; d < D; d++) {
                const double qd = qt[(size_t)d * n_q + u];
                a0 += qd * k0[d];
                a1 += qd * k1[d];
                a2 += qd * k2[d];
                a3 += qd * k3[d];
            }
            const double a[4] = {a0, a1, a2, a3};
            for (int j = 0; j < nk; j++)
                o[(size_t)j * n_q + u] = a[j];
        }
    }
}
