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

/* LagKV's scratch: a partition's scores, ranks and the references' extremes */
typedef struct lag_work {
    double *ks, *vs, *neg, *mn, *mx;
    int32_t *ord, *wk;
} lag_work;

static void lag_work_free(lag_work *w)
{
    kvt_free(w->ks);
    kvt_free(w->vs);
    kvt_free(w->neg);
    kvt_free(w->mn);
    kvt_free(w->mx);
    kvt_free(w->ord);
    kvt_free(w->wk);
}

static kvt_status lag_work_init(lag_work *w, int lag, int D)
{
    w->ks = kvt_malloc(((size_t)lag + 1) * sizeof(double));
    w->vs = kvt_malloc(((size_t)lag + 1) * sizeof(double));
    w->neg = kvt_malloc(((size_t)lag + 1) * sizeof(double));
    w->mn = kvt_malloc(((size_t)D + 1) * sizeof(double));
    w->mx = kvt_malloc(((size_t)D + 1) * sizeof(double));
    w->ord = kvt_malloc(((size_t)lag + 1) * sizeof(int32_t));
    w->wk = kvt_malloc(((size_t)lag + 1) * sizeof(int32_t));
    if (w->ks && w->vs && w->neg && w->mn && w->mx && w->ord && w->wk)
        return KVT_OK;
    lag_work_free(w);
    return kvt_error_set(KVT_ERR_NOMEM, "lagkv: out of memory");
}

/* s [n]: LagKV's scores of the tokens [a0, a0 + n) of KV head g scored as a prompt of their
 * own (the whole prompt, or a chunk of it) */
static void lag_scores(const kvt_layer_ctx *c, const kvt_policy_opts *o, int g, int a0, int n,
                       lag_work *w, double *s)
{
    const int D = c->D, S = o->sinks < n ? o->sinks : n, lag = o->lag;
    for (int j = 0; j < n; j++)
        s[j] = 1.0;                     /* sinks and tail */
    if ((long)n < (long)S + 2L * lag) { /* not compressed: sinks, then the most recent */
        for (int j = S; j < n; j++)
            s[j] = (double)(j - S) / (n - S);
        return;
    }
    const int n_part = (n - S) / lag; /* whole partitions; the last is the tail's start */
    const float *K = c->k + ((size_t)g * c->T + a0) * D, *V = c->v + ((size_t)g * c->T + a0) * D;
    for (int i = 0; i + 1 < n_part; i++) {
        size_t t0 = (size_t)S + (size_t)i * lag;
        lag_states_score(K + t0 * D, K + (t0 + lag) * D, lag, D, w->mn, w->mx, w->ks);
        lag_states_score(V + t0 * D, V + (t0 + lag) * D, lag, D, w->mn, w->mx, w->vs);
        for (int t = 0; t < lag; t++)
            w->ks[t] = (w->ks[t] + w->vs[t]) / 2;
        if (!o->cross)
            ascending_ranks(w->ks, lag, w->ord, w->wk, w->neg, w->vs); /* vs <- ranks */
        for (int t = 0; t < lag; t++) /* cross=1: a NaN score first, as torch.topk keeps it */
            s[t0 + t] = !o->cross ? w->vs[t] / lag : isnan(w->ks[t]) ? INFINITY : w->ks[t];
    }
}

/* sc [Hkv, T]: each KV head's LagKV scores of every chunk of C tokens from token 0 scored as a
 * prompt of its own (C >= T: the whole prompt) */
static kvt_status lag_chunks(kvt_layer_ctx *c, const kvt_policy_opts *o, int C, double *sc)
{
    const int T = c->T;
    KVT_FORWARD(kvt_ctx_fetch(c, KVT_CTX_KV));
    lag_work w;
    KVT_FORWARD(lag_work_init(&w, o->lag, c->D));
    for (int g = 0; g < c->Hkv; g++) /* per KV head; heads=query takes its KV head's */
        for (int a = 0; a < T; a += C)
            lag_scores(c, o, g, a, T - a < C ? T - a : C, &w, sc + (size_t)g * T + a);
    lag_work_free(&w);
    return KVT_OK;
}

static kvt_status sel_lag(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                          kvt_layer_selection *sel)
{
    double *sc = kvt_malloc(((size_t)c->Hkv * c->T + 1) * sizeof(double));
    KVT_RETURN_IF(!sc, KVT_ERR_NOMEM, "lagkv: out of memory");
    kvt_status st = lag_chunks(c, &p->o, c->T, sc);
    if (!st)
        st = kvt_rank_by_kv_array(c, p, sc, 1.0, B, n_b, sel); /* window 0 */
    kvt_free(sc);
    return st;
}

/* chunk_scores=own|kvpress: kvpress's ChunkPress(LagKVPress): each chunk's own sinks,
 * partitions and tail */
static kvt_status chunk_lag(kvt_layer_ctx *c, const kvt_policy *p, int C, const int *B, int n_b,
                            kvt_layer_selection *sel)
{
    double *sc = kvt_malloc(((size_t)c->Hkv * c->T + 1) * sizeof(double));
    KVT_RETURN_IF(!sc, KVT_ERR_NOMEM, "lagkv: out of memory");
    kvt_status st = lag_chunks(c, &p->o, C, sc);
    if (!st)
        st = kvt_chunk_rank_kv_array(c, p, sc, 1.0, C, n_b, sel);
    kvt_free(sc);
    return st;
}

const kvt_policy_def kvt_policy_def_lagkv = {
    .name = "lagkv",
    .host_reads = KVT_CTX_KV,
    .summary = "kvpress LagKV: each partition scored against the next by its keys' and values' "
               "spread",
    .keys = "heads,sinks,lag,cross,adaptive,alpha,normalize,alloc,skip,critical,first,ceps,dms,"
            "dms_window",
    .defaults = d_lag,
    .select = sel_lag,
    .chunk_rank = chunk_lag,
};
