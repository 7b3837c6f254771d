/* policy_leverage.c - `leverage`: kvpress's LeverageScorePress (kvpress/presses/leverage_press.py;
 * Compactor, Chari & Van Durme 2025, arXiv 2507.08143): a key's statistical leverage among the
 * layer's pre-RoPE keys of its KV head. The keys are un-rotated (rope.c: the trace's model.rope
 * and positions), centred on their mean over the tokens, sketched on the right by a Gaussian
 * Phi [D, sketch] / sqrt(sketch) (default 48; sketch=0: no sketch, the exact leverage), and
 * token j scores l_j = x_j (G + eps I)^-1 x_j^T, G = X^T X, clamped at 0; eps is kvpress's
 * Cholesky jitter (1e-2, raised tenfold while the factorisation fails, 5 tries). kvpress then
 * z-normalises over every head and token, which changes no ranking. torch's draws cannot be
 * reproduced: Phi comes from kvt_rng seeded by seed ^ (layer+1)*0x9E3779B97F4A7C15 ^
 * (g+1)*0xC2B2AE3D27D4EB4F, row by row. kvpress works in float32 after the sketch, kvtrace in
 * double. Ties to the earlier token; heads=query gives each query head its KV head's scores. */
#include <math.h>
#include <string.h>

#include "kvt_kernels.h"
#include "../replay_internal.h"

#define LEV_ROWS 512 /* rows per product of the leverage */

/* L (lower, [k, k]) with L L^T = A + eps I, A symmetric [k, k]: false when not positive */
static bool cholesky(const double *A, int k, double eps, double *L)
{
    for (int i = 0; i < k; i++)
        for (int j = 0; j <= i; j++) {
            double s = A[(size_t)i * k + j] + (i == j ? eps : 0.0);
            for (int m = 0; m < j; m++)
                s -= L[(size_t)i * k + m] * L[(size_t)j * k + m];
            if (i == j) {
                if (!(s > 0) || !isfinite(s))
                    return false;
                L[(size_t)i * k + i] = sqrt(s);
            } else
                L[(size_t)i * k + j] = s / L[(size_t)j * k + j];
        }
    return true;
}

kvt_status kvt_leverage_scores(kvt_layer_ctx *c, const char *policy, int sketch, uint64_t seed,
                               int s0, int s1, double *out)
{
    const int T = c->T, D = c->D, Hkv = c->Hkv, n = s1 - s0, k = sketch > 0 ? sketch : D;
    if (n <= 0)
        return KVT_OK;
    KVT_FORWARD(kvt_ctx_fetch(c, KVT_CTX_KV));
    kvt_rope_pairs r;
    KVT_FORWARD(kvt_rope_pairs_init(c, policy, &r));
    double *cs = r.on ? kvt_malloc(((size_t)n * D + 1) * sizeof(double)) : NULL;
    double *Y = kvt_malloc(((size_t)n * D + 1) * sizeof(double));
    double *X = sketch > 0 ? kvt_malloc(((size_t)n * k + 1) * sizeof(double)) : Y;
    double *phi = sketch > 0 ? kvt_malloc(((size_t)D * k + 1) * sizeof(double)) : NULL;
    double *G = kvt_malloc(((size_t)k * k + 1) * sizeof(double));
    double *L = kvt_calloc((size_t)k * k + 1, sizeof(double));
    double *Li = kvt_malloc(((size_t)k * k + 1) * sizeof(double));
    double *mu = kvt_malloc(((size_t)D + 1) * sizeof(double));
    double *z = kvt_malloc(((size_t)LEV_ROWS * k + 1) * sizeof(double));
    kvt_status st = KVT_OK;
    if ((r.on && !cs) || !Y || !X || (sketch > 0 && !phi) || !G || !L || !Li || !mu || !z) {
        st = kvt_error_set(KVT_ERR_NOMEM, "%s: out of memory", policy);
        goto out;
    }
    if (r.on && (st = kvt_rope_angles(&r, c->in, s0, s1, policy, cs)))
        goto out;
    for (int g = 0; g < Hkv; g++) {
        const float *K = c->k + (size_t)g * T * D;
        memset(mu, 0, (size_t)D * sizeof(double));
        for (int t = 0; t < n; t++) { /* the pre-RoPE keys and their mean */
            double *y = Y + (size_t)t * D;
            kvt_rope_undo(&r, r.on ? cs + (size_t)t * 2 * r.half : NULL, K + (size_t)(s0 + t) * D,
                          D, y);
            for (int d = 0; d < D; d++)
                mu[d] += y[d];
        }
        for (int d = 0; d < D; d++)
            mu[d] /= n;
        for (int t = 0; t < n; t++)
            for (int d = 0; d < D; d++)
                Y[(size_t)t * D + d] -= mu[d];
        if (sketch > 0) {
            kvt_rng rng;
            kvt_rng_seed(&rng, seed ^ ((uint64_t)(c->layer + 1) * 0x9E3779B97F4A7C15ull) ^
                                   ((uint64_t)(g + 1) * 0xC2B2AE3D27D4EB4Full));
            const double inv = 1.0 / sqrt((double)k);
            for (size_t i = 0; i < (size_t)D * k; i++)
                phi[i] = kvt_rng_normal(&rng) * inv;
            kvt_gemm_f64(false, n, k, D, 1.0, Y, D, phi, k, 0.0, X, k);
        }
        kvt_gemm_f64_at(k, k, n, 1.0, X, k, X, k, 0.0, G, k);
        for (int i = 0; i < k; i++) /* 0.5 (G + G^T) */
            for (int j = 0; j < i; j++)
                G[(size_t)i * k + j] = G[(size_t)j * k + i] =
                    0.5 * (G[(size_t)i * k + j] + G[(size_t)j * k + i]);
        double eps = 1e-2, tried = eps;
        bool ok = false;
        for (int tr = 0; tr < 5 && !(ok = cholesky(G, k, tried = eps, L)); tr++)
            eps = fmax(1e-8, eps == 0.0 ? 1e-2 : 10.0 * eps);
        if (!ok) {
            st = kvt_error_set(KVT_ERR_NAN,
                               "%s: layer %d KV head %d: the keys' Gram matrix is not positive "
                               "definite even with %g added (keys not finite or out of range)",
                               policy, c->layer, g, tried);
            goto out;
        }
        /* Li = L^-1 (lower), column by column by forward substitution; then each row's
           ||L^-1 x||^2 = ||x Li^T||^2, a product per block of rows */
        memset(Li, 0, (size_t)k * k * sizeof(double));
        for (int col = 0; col < k; col++)
            for (int i = col; i < k; i++) {
                double v = i == col ? 1.0 : 0.0;
                for (int m = col; m < i; m++)
                    v -= L[(size_t)i * k + m] * Li[(size_t)m * k + col];
                Li[(size_t)i * k + col] = v / L[(size_t)i * k + i];
            }
        for (int t0 = 0; t0 < n; t0 += LEV_ROWS) {
            const int m = n - t0 < LEV_ROWS ? n - t0 : LEV_ROWS;
            kvt_gemm_f64(true, m, k, k, 1.0, X + (size_t)t0 * k, k, Li, k, 0.0, z, k);
            for (int t = 0; t < m; t++) {
                double s = 0;
                for (int i = 0; i < k; i++)
                    s += z[(size_t)t * k + i] * z[(size_t)t * k + i];
                out[(size_t)g * n + t0 + t] = s > 0 ? s : 0.0;
            }
        }
    }
out:
    kvt_free(cs);
    if (X != Y)
        kvt_free(X);
    kvt_free(Y);
    kvt_free(phi);
    kvt_free(G);
    kvt_free(L);
    kvt_free(Li);
    kvt_free(mu);
    kvt_free(z);
    kvt_rope_pairs_free(&r);
    return st;
}

void kvt_znorm(double *x, size_t n)
{
    double m = 0, v = 0;
    for (size_t i = 0; i < n; i++)
        m += x[i];
    m /= n > 0 ? (double)n : 1.0;
    for (size_t i = 0; i < n; i++)
        v += (x[i] - m) * (x[i] - m);
    double sd = n > 1 ? sqrt(v / (double)(n - 1)) : 0.0;
    sd = sd > 1e-6 ? sd : 1e-6;
    for (size_t i = 0; i < n; i++)
        x[i] = (x[i] - m) / sd;
}

static void d_lev(kvt_policy_opts *o)
{
    o->alloc = 'b'; /* adaptive=1: kvpress's AdaKVPress over the press */
    o->window = 0;
    o->sketch = 48;
}

static kvt_status sel_lev(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                          kvt_layer_selection *sel)
{
    double *l = kvt_malloc(((size_t)c->Hkv * c->T + 1) * sizeof(double));
    KVT_RETURN_IF(!l, KVT_ERR_NOMEM, "leverage: out of memory");
    kvt_status st = kvt_leverage_scores(c, "leverage", p->o.sketch, p->o.seed, 0, c->T, l);
    if (!st) {
        kvt_znorm(l, (size_t)c->Hkv * c->T);
        st = kvt_rank_by_kv_array(c, p, l, 1.0, B, n_b, sel);
    }
    kvt_free(l);
    return st;
}

/* chunk_scores=own|kvpress: kvpress's ChunkPress(LeverageScorePress): each key's leverage
 * among its chunk's keys alone (centred on the chunk's mean). A chunk's sketch is drawn from
 * the same seed as the prompt's (kvpress draws a new one per call) */
static kvt_status chunk_lev(kvt_layer_ctx *c, const kvt_policy *p, int C, const int *B, int n_b,
                            kvt_layer_selection *sel)
{
    const int T = c->T, Hkv = c->Hkv, Cn = C < T ? C : T;
    double *l = kvt_malloc(((size_t)Hkv * T + 1) * sizeof(double));
    double *lc = kvt_malloc(((size_t)Hkv * Cn + 1) * sizeof(double));
    kvt_status st = KVT_OK;
    if (!l || !lc)
        st = kvt_error_set(KVT_ERR_NOMEM, "leverage: out of memory");
    for (int a = 0; !st && a < T; a += C) {
        const int n = T - a < C ? T - a : C;
        if ((st = kvt_leverage_scores(c, "leverage", p->o.sketch, p->o.seed, a, a + n, lc)))
            break;
        for (int g = 0; g < Hkv; g++)
            memcpy(l + (size_t)g * T + a, lc + (size_t)g * n, (size_t)n * sizeof(double));
    }
    if (!st)
        st = kvt_chunk_rank_kv_array(c, p, l, 1.0, C, n_b, sel);
    kvt_free(l);
    kvt_free(lc);
    return st;
}

const kvt_policy_def kvt_policy_def_leverage = {
    .name = "leverage",
    .host_reads = KVT_CTX_KV,
    .summary = "kvpress LeverageScorePress (Compactor): each pre-RoPE key's statistical leverage "
               "among its KV head's keys, through a Gaussian sketch",
    .keys = "window,heads,sketch,seed,adaptive,alpha,normalize,alloc,skip,critical,first,ceps,"
            "dms,dms_window",
    .flags = KVT_POLICY_NEEDS_ROPE,
    .defaults = d_lev,
    .select = sel_lev,
    .chunk_rank = chunk_lev,
};
