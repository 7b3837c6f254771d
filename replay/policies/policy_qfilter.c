/* policy_qfilter.c - `qfilter`: kvpress's QFilterPress (kvpress/presses/qfilter_press.py
 * @00a150c; Q-Filters, arXiv 2503.02812). Each KV head g of layer l has a filter f, a direction
 * in key space; token j scores -<f, k_j>, and each head keeps its highest-scoring tokens (ties
 * to the earlier token; no window by default, as kvpress; window=W keeps the last W first).
 *
 * The filters come from filters=FILE.npy, an array [layers, KV heads, D] (kvpress's
 * `q_filters` parameter, as its hub checkpoints nthngdy/<model>_qfilt hold it; [layers, query
 * heads, D] is also taken with heads=query), used as they are: the kept sets are then
 * QFilterPress's at B = max(1, int(T * (1 - compression_ratio))). Without a file, each filter is
 * calibrated on the trace itself, as the paper calibrates on a corpus: f is the top right
 * singular vector of the stacked window queries of the head's query heads (the unit eigenvector
 * of the largest eigenvalue of sum q q^T; every stored window query, whatever window= is; with
 * heads=query each query head's own), oriented so that the queries' projections on it sum to
 * at most zero (so that -<f, k> grows with the logit the queries give k along f; an exact zero
 * sum: the largest |f_e|, the lowest e among equals, negative). Queries that are all zero give
 * f = 0: every score ties and the earliest tokens are kept. */
#include <float.h>
#include <math.h>
#include <string.h>

#include "../replay_internal.h"

static void d_qfilter(kvt_policy_opts *o)
{
    o->alloc = 'b'; /* adaptive=1: kvpress's AdaKVPress over the press */
    o->window = 0;
}

/* The number of eigenvalues of the symmetric tridiagonal (d [n], e [n-1] off the diagonal)
 * below x (Sturm sequence; a zero pivot is taken as a tiny negative one) */
static int sturm_below(const double *d, const double *e, int n, double x, double tiny)
{
    int below = 0;
    double q = 1.0;
    for (int i = 0; i < n; i++) {
        q = d[i] - x - (i ? e[i - 1] * e[i - 1] / q : 0.0);
        if (q == 0.0)
            q = -tiny;
        below += q < 0.0;
    }
    return below;
}

/* Solve (T - mu I) y = b in place (b [n]) for the tridiagonal T (d, e): LU with row exchanges,
 * a pivot smaller than tiny taken as tiny. w: scratch [5 n]. */
static void tridiag_solve(const double *d, const double *e, int n, double mu, double tiny,
                          double *b, double *w)
{
    double *dd = w, *du = w + n, *du2 = w + 2 * n, *dl = w + 3 * n, *swap = w + 4 * n;
    for (int i = 0; i < n; i++) {
        dd[i] = d[i] - mu;
        du[i] = i + 1 < n ? e[i] : 0.0;
        dl[i] = i + 1 < n ? e[i] : 0.0;
        du2[i] = 0.0;
    }
    for (int i = 0; i + 1 < n; i++) {
        if (fabs(dd[i]) >= fabs(dl[i])) {
            swap[i] = 0;
            if (fabs(dd[i]) < tiny)
                dd[i] = dd[i] < 0 ? -tiny : tiny;
            double f = dl[i] / dd[i];
            dl[i] = f;
            dd[i + 1] -= f * du[i];
        } else { /* rows i and i + 1 exchanged */
            swap[i] = 1;
            double f = dd[i] / dl[i];
            dd[i] = dl[i];
            dl[i] = f;
            double t = du[i];
            du[i] = dd[i + 1];
            dd[i + 1] = t - f * dd[i + 1];
            if (i + 2 < n) {
                du2[i] = du[i + 1];
                du[i + 1] = -f * du[i + 1];
            }
        }
    }
    if (fabs(dd[n - 1]) < tiny)
        dd[n - 1] = dd[n - 1] < 0 ? -tiny : tiny;
    for (int i = 0; i + 1 < n; i++) {
        if (swap[i]) {
            double t = b[i];
            b[i] = b[i + 1];
            b[i + 1] = t - dl[i] * b[i];
        } else
            b[i + 1] -= dl[i] * b[i];
    }
    for (int i = n - 1; i >= 0; i--) {
        double s = b[i];
        if (i + 1 < n)
            s -= du[i] * b[i + 1];
        if (i + 2 < n)
            s -= du2[i] * b[i + 2];
        b[i] = s / dd[i];
    }
}

void kvt_sym_top_eigvec(double *a, int n, double *x, double *w)
{
    double *hv = w, *d = w + (size_t)n * n, *e = d + n, *p = e + n, *lu = p + n;
    double anorm = 0.0;
    for (int i = 0; i < n; i++)
        for (int j = 0; j <= i; j++)
            anorm = fmax(anorm, fabs(a[(size_t)i * n + j]));
    if (anorm == 0.0 || n == 1) { /* any unit vector; the first */
        for (int i = 0; i < n; i++)
            x[i] = i == 0;
        return;
    }
    /* Householder: step k maps a's column k below the diagonal onto its first entry with
     * H = I - 2 u u^T (u in hv row k, zero up to k) applied on both sides of the trailing block */
    for (int k = 0; k + 2 < n; k++) {
        double *u = hv + (size_t)k * n, sg = 0.0;
        memset(u, 0, (size_t)n * sizeof(double));
        d[k] = a[(size_t)k * n + k];
        for (int i = k + 1; i < n; i++)
            sg += a[(size_t)i * n + k] * a[(size_t)i * n + k];
        sg = sqrt(sg);
        double x1 = a[(size_t)(k + 1) * n + k], alpha = x1 >= 0 ? -sg : sg;
        e[k] = alpha;
        if (sg == 0.0)
            continue; /* nothing below the diagonal: H = I */
        double un = 0.0;
        for (int i = k + 1; i < n; i++) {
            u[i] = a[(size_t)i * n + k] - (i == k + 1 ? alpha : 0.0);
            un += u[i] * u[i];
        }
        un = sqrt(un);
        for (int i = k + 1; i < n; i++)
            u[i] /= un;
        /* p = S u, q = p - (u^T p) u, S -= 2 (u q^T + q u^T), on S's lower triangle */
        for (int i = k + 1; i < n; i++)
            p[i] = 0.0;
        for (int i = k + 1; i < n; i++) {
            const double *ai = a + (size_t)i * n;
            double s = ai[i] * u[i];
            for (int j = k + 1; j < i; j++) {
                s += ai[j] * u[j];
                p[j] += ai[j] * u[i];
            }
            p[i] += s;
        }
        double kk = 0.0;
        for (int i = k + 1; i < n; i++)
            kk += u[i] * p[i];
        for (int i = k + 1; i < n; i++)
            p[i] -= kk * u[i];
        for (int i = k + 1; i < n; i++)
            for (int j = k + 1; j <= i; j++)
                a[(size_t)i * n + j] -= 2.0 * (u[i] * p[j] + p[i] * u[j]);
    }
    d[n - 2] = a[(size_t)(n - 2) * n + n - 2];
    d[n - 1] = a[(size_t)(n - 1) * n + n - 1];
    e[n - 2] = a[(size_t)(n - 1) * n + n - 2];
    /* the largest eigenvalue: at least the largest diagonal entry, at most Gershgorin's bound */
    double lo = d[0], hi = -INFINITY;
    for (int i = 0; i < n; i++) {
        double r = (i ? fabs(e[i - 1]) : 0.0) + (i + 1 < n ? fabs(e[i]) : 0.0);
        lo = fmax(lo, d[i]);
        hi = fmax(hi, d[i] + r);
    }
    const double tiny = DBL_EPSILON * anorm * n;
    hi += fabs(hi) * 4 * DBL_EPSILON + tiny;
    for (int it = 0; it < 200 && hi - lo > 2 * DBL_EPSILON * fmax(fabs(lo), fabs(hi)); it++) {
        double mid = 0.5 * (lo + hi);
        if (mid <= lo || mid >= hi)
            break;
        if (sturm_below(d, e, n, mid, tiny) == n)
            hi = mid;
        else
            lo = mid;
    }
    const double mu = 0.5 * (lo + hi);
    /* inverse iteration on the tridiagonal from the vector of ones, then the reflections
     * undone: x = H_0 H_1 ... H_{n-3} y */
    for (int i = 0; i < n; i++)
        x[i] = 1.0;
    for (int it = 0; it < 3; it++) {
        tridiag_solve(d, e, n, mu, tiny, x, lu);
        double s = 0.0;
        for (int i = 0; i < n; i++)
            s += x[i] * x[i];
        s = sqrt(s);
        for (int i = 0; i < n; i++)
            x[i] = s > 0 && isfinite(s) ? x[i] / s : i == 0;
    }
    for (int k = n - 3; k >= 0; k--) {
        const double *u = hv + (size_t)k * n;
        double s = 0.0;
        for (int i = k + 1; i < n; i++)
            s += u[i] * x[i];
        for (int i = k + 1; i < n; i++)
            x[i] -= 2.0 * s * u[i];
    }
}

/* The filters as given (filters=FILE), read once */
static kvt_status init_qfilter(kvt_policy *p)
{
    if (!p->o.filters)
        return KVT_OK; /* calibrated on each trace */
    kvt_npy *a;
    KVT_FORWARD(kvt_array_load("qfilter", p->o.filters, "q_filters", 3,
                               "[layers, KV heads, head dim] (kvpress's q_filters)", "", &a));
    kvt_status st = KVT_OK;
    for (size_t i = 0; st == KVT_OK && i < a->n; i++)
        if (!isfinite(kvt_npy_at(a, i)))
            st = kvt_error_set(KVT_ERR_NAN, "qfilter: %s: %g at layer %d, head %d, dim %d",
                               p->o.filters, kvt_npy_at(a, i), (int)(i / a->shape[2] / a->shape[1]),
                               (int)(i / a->shape[2] % a->shape[1]), (int)(i % a->shape[2]));
    if (st) {
        kvt_npy_destroy(a);
        return st;
    }
    p->state = a;
    return KVT_OK;
}

/* The file's layers and heads (the KV heads, or the query heads with heads=query) against a
 * trace's, before its first layer (its head dimension: when a layer is replayed) */
static kvt_status bind_qfilter(const kvt_policy *p, const char *path, int L, int Hq, int Hkv, int T,
                               void **state)
{
    (void)path, (void)T, (void)state;
    const kvt_npy *a = p->state;
    KVT_RETURN_IF(
        a && (a->shape[0] != L || (a->shape[1] != Hkv && !(p->o.per_query && a->shape[1] == Hq))),
        KVT_ERR_INVALID_ARG,
        "qfilter: %s has shape (%d, %d, %d); this trace has %d layers and %d KV heads%s "
        "(filters=FILE: [layers, KV heads, head dim])",
        p->o.filters, a->shape[0], a->shape[1], a->shape[2], L, Hkv,
        p->o.per_query ? " (with heads=query: or its query heads)" : "");
    return KVT_OK;
}

/* f [D]: the filter of selection head h (KV head, or query head with heads=query) */
static void calibrate(const kvt_layer_ctx *c, bool per_query, int h, double *f, double *cov,
                      double *w)
{
    const int D = c->D, Wt = c->Wt;
    const int h0 = per_query ? h : h * c->Gs, nh = per_query ? 1 : c->Gs;
    const float *q = c->in->q_window + (size_t)h0 * Wt * D; /* [nh * Wt, D] */
    const size_t rows = (size_t)nh * Wt;
    memset(cov, 0, (size_t)D * D * sizeof(double));
    for (size_t r = 0; r < rows; r++)
        for (int i = 0; i < D; i++) {
            const double qi = q[r * D + i];
            for (int j = 0; j <= i; j++)
                cov[(size_t)i * D + j] += qi * q[r * D + j];
        }
    bool zero = true; /* (the upper triangle stays 0: the solver reads the lower) */
    for (size_t i = 0; i < (size_t)D * D && zero; i++)
        zero = cov[i] == 0.0;
    if (zero) {
        memset(f, 0, (size_t)D * sizeof(double));
        return;
    }
    kvt_sym_top_eigvec(cov, D, f, w);
    double s = 0.0; /* the queries' projections, summed */
    for (size_t r = 0; r < rows; r++)
        for (int e = 0; e < D; e++)
            s += q[r * D + e] * f[e];
    int big = 0;
    for (int e = 1; e < D; e++)
        big = fabs(f[e]) > fabs(f[big]) ? e : big;
    if (s > 0.0 || (s == 0.0 && f[big] > 0.0))
        for (int e = 0; e < D; e++)
            f[e] = -f[e];
}

/* f [D]: selection head h's filter, the file's row (the query head's with Hq rows, else its KV
 * head's) or calibrated (cov, w: scratch of D*D and 8*D + D*D doubles) */
static void head_filter(const kvt_layer_ctx *c, const kvt_policy *p, int h, double *f, double *cov,
                        double *w)
{
    const kvt_npy *a = p->state;
    const int D = c->D, g = kvt_ctx_kv_of(c, p->o.per_query, h);
    if (a) {
        const int fh = a->shape[1] == c->Hkv ? g : h;
        const size_t base = ((size_t)c->layer * a->shape[1] + fh) * D;
        for (int e = 0; e < D; e++)
            f[e] = kvt_npy_at(a, base + e);
    } else
        calibrate(c, p->o.per_query, h, f, cov, w);
}

static kvt_status sel_qfilter(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                              kvt_layer_selection *sel)
{
    const kvt_npy *a = p->state;
    const int T = c->T, D = c->D, H = kvt_ctx_heads(c, p->o.per_query);
    const int W = p->o.window < T ? p->o.window : T, P = T - W;
    if (a) { /* a layer replay's policy is not bound to a trace */
        KVT_FORWARD(bind_qfilter(p, NULL, c->n_layers, c->Hq, c->Hkv, T, NULL));
        KVT_RETURN_IF(a->shape[2] != D, KVT_ERR_INVALID_ARG,
                      "qfilter: %s has filters of %d dimensions; this trace's heads have %d",
                      p->o.filters, a->shape[2], D);
    }
    KVT_FORWARD(kvt_ctx_fetch(c, KVT_CTX_KV));
    KVT_FORWARD(kvt_sel_init(sel, c, p->o.per_query, W, n_b, true));
    const size_t n_s = (size_t)H * P + 1, n_w = a ? 0 : (size_t)2 * D * D + 8 * (size_t)D;
    double *s = kvt_malloc((n_s + D + n_w) * sizeof(double));
    KVT_RETURN_IF(!s, KVT_ERR_NOMEM, "qfilter: out of memory");
    double *f = s + n_s, *cov = f + D, *w = cov + (size_t)D * D;
    for (int h = 0; h < H; h++) {
        const int g = kvt_ctx_kv_of(c, p->o.per_query, h);
        head_filter(c, p, h, f, cov, w);
        for (int j = 0; j < P; j++) {
            const float *k = c->k + ((size_t)g * T + j) * D;
            double dot = 0.0;
            for (int e = 0; e < D; e++)
                dot += f[e] * k[e];
            s[(size_t)h * P + j] = -dot;
        }
    }
    kvt_status st = kvt_sel_rank_counts(c, p, s, W, B, n_b, sel);
    kvt_free(s);
    return st;
}

/* decoding=: -<f, k> of every cache entry, f the head's filter as the prompt's scores use */
static kvt_status cache_qfilter(kvt_layer_ctx *c, const kvt_policy *p, int h, int step,
                                const int32_t *ent, const float *const *k, int n, double *out,
                                double *work)
{
    (void)ent, (void)work, (void)step;
    const int D = c->D;
    double *f = kvt_malloc(((size_t)2 * D * D + 9 * (size_t)D) * sizeof(double));
    KVT_RETURN_IF(!f, KVT_ERR_NOMEM, "qfilter: out of memory");
    head_filter(c, p, h, f, f + D, f + D + (size_t)D * D);
    for (int i = 0; i < n; i++) {
        double dot = 0.0;
        for (int e = 0; e < D; e++)
            dot += f[e] * k[i][e];
        out[i] = -dot;
    }
    kvt_free(f);
    return KVT_OK;
}

const kvt_policy_def kvt_policy_def_qfilter = {
    .name = "qfilter",
    .host_reads = KVT_CTX_KV,
    .summary = "kvpress QFilterPress: keys scored -<f, k> against each KV head's Q-filter f "
               "(filters=FILE.npy [layers, KV heads, D], or calibrated on the window queries)",
    .keys = "window,heads,filters,adaptive,alpha,normalize,alloc,skip,critical,first,ceps,dms,"
            "dms_window,dms_decoding,decoding,prefill",
    .defaults = d_qfilter,
    .init = init_qfilter,
    .fini = kvt_policy_fini_npy,
    .bind = bind_qfilter,
    .select = sel_qfilter,
    .cache_scores = cache_qfilter,
    .cache_scores_per_key = true,
};
