/* score_ref.c - reference score kernels: window mean of probabilities, GQA reduction, 1-D
 * pooling with PyTorch's padding semantics, row norms, unit keys with their mean, and the
 * MixKV head redundancy. POLICIES.md §0.1 steps 4-6 and §4.1.
 */
#include <math.h>

#include "kvt_kernels.h"

void kvt_col_mean_ref(const float *x, int n_rows, int ld, int n_cols, double *out)
{
    /* x is (n_rows, ld), out is (n_cols) */
    for (int j = 0; j < n_cols; j++)
        out[j] = 0.0;
    for (int r = 0; r < n_rows; r++) {
        const float *row = x + (size_t)r * ld;
        for (int j = 0; j < n_cols; j++)
            out[j] += row[j];
    }
    if (n_rows > 0)
        for (int j = 0; j < n_cols; j++)
            out[j] /= n_rows;
}

kvt_status kvt_gqa_reduce_ref(const double *a, int Hq, int Hkv, int n, kvt_reduce op, double *out)
{
    KVT_RETURN_IF(Hkv <= 0 || Hq <= 0 || Hq % Hkv != 0 || n < 0, KVT_ERR_INVALID_ARG,
                  "gqa_reduce: Hq=%d is not a multiple of Hkv=%d", Hq, Hkv);
    KVT_RETURN_IF(op != KVT_REDUCE_MEAN && op != KVT_REDUCE_MAX && op != KVT_REDUCE_SUM,
                  KVT_ERR_INVALID_ARG, "gqa_reduce: bad op %d", (int)op);
    int G = Hq / Hkv;
    /* a is (Hq, n), out is (Hkv, n) */
    for (int g = 0; g < Hkv; g++) {
        double *o = out + (size_t)g * n;
        for (int j = 0; j < n; j++) {
            double acc = op == KVT_REDUCE_MAX ? -INFINITY : 0.0;
            for (int u = 0; u < G; u++) {
                double x = a[(size_t)(g * G + u) * n + j];
                if (op == KVT_REDUCE_MAX)
                    acc = x > acc ? x : acc;
                else
                    acc += x;
            }
            o[j] = op == KVT_REDUCE_MEAN ? acc / G : acc;
        }
    }
    return KVT_OK;
}

kvt_status kvt_pool1d_ref(const double *s, int n, int k, kvt_pool op, double *out)
{
    KVT_RETURN_IF(k < 1 || k % 2 == 0, KVT_ERR_INVALID_ARG,
                  "pool1d: kernel size %d must be odd and >= 1", k);
    KVT_RETURN_IF(op != KVT_POOL_AVG && op != KVT_POOL_MAX, KVT_ERR_INVALID_ARG,
                  "pool1d: bad op %d", (int)op);
    int h = k / 2;
    /* s is (n), out is (n) */
    for (int j = 0; j < n; j++) {
        double acc = op == KVT_POOL_MAX ? -INFINITY : 0.0;
        for (int t = j - h; t <= j + h; t++) {
            if (t < 0 || t >= n)
                continue; /* AVG: counts as 0; MAX: -inf */
            if (op == KVT_POOL_MAX)
                acc = s[t] > acc ? s[t] : acc;
            else
                acc += s[t];
        }
        out[j] = op == KVT_POOL_AVG ? acc / k : acc;
    }
    return KVT_OK;
}

void kvt_row_norms_ref(const float *x, int n, int D, double *out)
{
    /* x is (n, D), out is (n) */
    for (int t = 0; t < n; t++) {
        double s = 0.0;
        const float *r = x + (size_t)t * D;
        for (int d = 0; d < D; d++)
            s += (double)r[d] * (double)r[d];
        out[t] = sqrt(s);
    }
}

void kvt_unit_rows_ref(const float *x, int n, int D, float *ku, double *mean)
{
    /* x, ku are (n, D), mean is (D) */
    if (mean)
        for (int d = 0; d < D; d++)
            mean[d] = 0.0;
    for (int t = 0; t < n; t++) {
        const float *r = x + (size_t)t * D;
        double s = 0.0;
        for (int d = 0; d < D; d++)
            s += (double)r[d] * (double)r[d];
        double nrm = sqrt(s);
        double inv = 1.0 / (nrm > 1e-12 ? nrm : 1e-12);
        for (int d = 0; d < D; d++) {
            double u = (double)r[d] * inv;
            if (ku)
                ku[(size_t)t * D + d] = (float)u;
            if (mean)
                mean[d] += u;
        }
    }
    if (mean && n > 0)
        for (int d = 0; d < D; d++)
            mean[d] /= n;
}

double kvt_redundancy_ref(const double *mean, int D, int n)
{
    if (n < 2)
        return NAN;
    double m2 = 0.0;
    for (int d = 0; d < D; d++)
        m2 += mean[d] * mean[d];
    return ((double)n * m2 - 1.0) / (double)(n - 1);
}
