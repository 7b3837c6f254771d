/* policy_lagkv.c - `lagkv`: kvpress's LagKVPress (kvpress/presses/lagkv_press.py @08a43bf,
 * arXiv 2504.04704), from K and V alone. After `sinks` tokens the prompt is cut into partitions
 * of `lag` tokens; each partition is scored against the next one (its reference): per dimension,
 * a token's key is scaled by the reference's min and max, (x - min) / (max - min); its score is
 * the standard deviation of those over the dimensions (n - 1 divisor, as torch.std), softmaxed
 * over the partition; the same for the values, and the two averaged. Without cross=1 each
 * score becomes its rank inside its partition over lag (so partitions compete only by rank).
 * The sinks and the tail (the last whole partition and what follows it) score 1, above every
 * other token. A prompt shorter than sinks + 2 lag is not compressed by kvpress: the sinks
 * score 1 and the others (j - sinks) / (T - sinks), so a budget keeps the sinks and the most
 * recent tokens. Ties (many: every partition has the same ranks) go to the earlier token;
 * torch.topk leaves them unspecified. kvpress computes in the model's dtype, kvtrace in double.
 * A dimension constant over a reference partition gives 0/0 in both, and a NaN score: it ranks
 * above every number inside its partition (cross=0, as torch's sort), or is kept first, before
 * the sinks (cross=1, as torch.topk). */
#include <math.h>

#include "../replay_internal.h"

static void d_lag(kvt_policy_opts *o)
{
    o->alloc = 'b'; /* adaptive=1: kvpress's AdaKVPress over the press */
    o->window = 0;
    o->sinks = 4;
    o->lag = 128;
    o->cross = false;
}

/* out[t] for the lag rows of x (stride D) against the reference rows ref */
static void lag_states_score(const float *x, const float *ref, int lag, int D, double *mn,
                             double *mx, double *out)
{
    for (int d = 0; d < D; d++)
        mn[d] = INFINITY, mx[d] = -INFINITY;
    for (int t = 0; t < lag; t++)
        for (int d = 0; d < D; d++) {
            double v = ref[(size_t)t * D + d];
            mn[d] = v < mn[d] ? v : mn[d];
            mx[d] = v > mx[d] ? v : mx[d];
        }
    double top = -INFINITY;
    for (int t = 0; t < lag; t++) {
        double sum = 0, sq = 0;
        for (int d = 0; d < D; d++)
            sum += (x[(size_t)t * D + d] - mn[d]) / (mx[d] - mn[d]);
        double mean = sum / D;
        for (int d = 0; d < D; d++) {
            double u = (x[(size_t)t * D + d] - mn[d]) / (mx[d] - mn[d]) - mean;
            sq += u * u;
        }
        out[t] = D > 1 ? sqrt(sq / (D - 1)) : NAN;
        top = out[t] > top ? out[t] : top;
    }
    double z = 0;
    for (int t = 0; t < lag; t++)
        z += out[t] = exp(out[t] - top);
    for (int t = 0; t < lag; t++)
        out[t] /= z;
}

/* rank (0 = smallest) of each of s[0..n) in ascending order, NaN above every number, ties to the
 * earlier index; order is scratch [n] */
static void ascending_ranks(const double *s, int n, int32_t *order, int32_t *work, double *neg,
                            double *rank)
{
    for (int i = 0; i < n; i++) /* kvt_rank_desc_ref: descending, NaN last, ties earlier */
        neg[i] = isnan(s[i]) ? NAN : -s[i];
    kvt_rank_desc_ref(neg, n, order, work);
    /* descending -s = ascending s with NaN last: position i holds the i-th smallest */
    for (int i = 0; i < n; i++)
        rank[order[i]] = i;
}

static kvt_status sel_lag(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                          kvt_layer_selection *sel)
{
    const kvt_policy_opts *o = &p->o;
    const int T = c->T, D = c->D, S = o->sinks < T ? o->sinks : T, lag = o->lag;
    const int H = kvt_ctx_heads(c, o->per_query);
    KVT_FORWARD(kvt_ctx_fetch(c, KVT_CTX_KV));
    KVT_FORWARD(kvt_sel_init(sel, c, o->per_query, 0, n_b, true));
    double *sc = kvt_malloc(((size_t)H * T + 1) * sizeof(double));
    double *ks = kvt_malloc(((size_t)lag + 1) * sizeof(double));
    double *vs = kvt_malloc(((size_t)lag + 1) * sizeof(double));
    double *neg = kvt_malloc(((size_t)lag + 1) * sizeof(double));
    double *mn = kvt_malloc(((size_t)D + 1) * sizeof(double));
    double *mx = kvt_malloc(((size_t)D + 1) * sizeof(double));
    int32_t *ord = kvt_malloc(((size_t)lag + 1) * sizeof(int32_t));
    int32_t *wk = kvt_malloc(((size_t)lag + 1) * sizeof(int32_t));
    kvt_status st = KVT_OK;
    if (!sc || !ks || !vs || !neg || !mn || !mx || !ord || !wk) {
        st = kvt_error_set(KVT_ERR_NOMEM, "lagkv: out of memory");
        goto out;
    }
    for (int h = 0; h < H; h++) {
        double *s = sc + (size_t)h * T;
        int g = kvt_ctx_kv_of(c, o->per_query, h);
        for (int j = 0; j < T; j++)
            s[j] = 1.0;                     /* sinks and tail */
        if ((long)T < (long)S + 2L * lag) { /* not compressed: sinks, then the most recent */
            for (int j = S; j < T; j++)
                s[j] = (double)(j - S) / (T - S);
            continue;
        }
        const int n_part = (T - S) / lag; /* whole partitions; the last is the tail's start */
        const float *K = c->k + (size_t)g * T * D, *V = c->v + (size_t)g * T * D;
        for (int i = 0; i + 1 < n_part; i++) {
            size_t t0 = (size_t)S + (size_t)i * lag;
            lag_states_score(K + t0 * D, K + (t0 + lag) * D, lag, D, mn, mx, ks);
            lag_states_score(V + t0 * D, V + (t0 + lag) * D, lag, D, mn, mx, vs);
            for (int t = 0; t < lag; t++)
                ks[t] = (ks[t] + vs[t]) / 2;
            if (!o->cross)
                ascending_ranks(ks, lag, ord, wk, neg, vs); /* vs <- ranks */
            for (int t = 0; t < lag; t++) /* cross=1: a NaN score first, as torch.topk keeps it */
                s[t0 + t] = !o->cross ? vs[t] / lag : isnan(ks[t]) ? INFINITY : ks[t];
        }
    }
    st = kvt_sel_rank_counts(c, p, sc, 0, B, n_b, sel);
out:
    kvt_free(sc);
    kvt_free(ks);
    kvt_free(vs);
    kvt_free(neg);
    kvt_free(mn);
    kvt_free(mx);
    kvt_free(ord);
    kvt_free(wk);
    return st;
}

const kvt_policy_def kvt_policy_def_lagkv = {
    .name = "lagkv",
    .host_reads = KVT_CTX_KV,
    .summary = "kvpress LagKV: each partition scored against the next by its keys' and values' "
               "spread",
    .keys = "heads,sinks,lag,cross,adaptive,alpha,normalize,alloc,skip,critical,first,ceps",
    .defaults = d_lag,
    .select = sel_lag,
};
