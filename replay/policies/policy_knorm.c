/* policy_knorm.c - `knorm` (POLICIES §8): keep the keys with the smallest L2 norm, per KV head.
 * No window protection by default (kvpress, KVCache-Factory); window=W protects the last W. */
#include <math.h>

#include "../replay_internal.h"

static void d_knorm(kvt_policy_opts *o)
{
    o->alloc = 'b'; /* adaptive=1: kvpress's AdaKVPress over the press */
    o->window = 0;
}

kvt_status kvt_rank_by_kv_array(kvt_layer_ctx *c, const kvt_policy *p, const double *x, double sign,
                                const int *B, int n_b, kvt_layer_selection *sel)
{
    const int T = c->T, W = p->o.window < T ? p->o.window : T, P = T - W;
    KVT_FORWARD(kvt_sel_init(sel, c, p->o.per_query, W, n_b, true));
    double *s = kvt_malloc(((size_t)sel->n_heads * P + 1) * sizeof(double));
    KVT_RETURN_IF(!s, KVT_ERR_NOMEM, "out of memory");
    for (int h = 0; h < sel->n_heads; h++) {
        int g = kvt_ctx_kv_of(c, p->o.per_query, h);
        for (int j = 0; j < P; j++)
            s[(size_t)h * P + j] = sign * x[(size_t)g * T + j];
    }
    kvt_status st = kvt_sel_rank_counts(c, p, s, W, B, n_b, sel);
    kvt_free(s);
    return st;
}

static kvt_status sel_knorm(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                            kvt_layer_selection *sel)
{
    return kvt_rank_by_kv_array(c, p, c->knorm, -1.0, B, n_b, sel);
}

/* chunk_scores=own|kvpress: a key's norm is its own, so each chunk keeps the same order as in
 * the prompt's ranking; only window= differs (each chunk's last tokens) */
static kvt_status chunk_knorm(kvt_layer_ctx *c, const kvt_policy *p, int C, const int *B, int n_b,
                              kvt_layer_selection *sel)
{
    return kvt_chunk_rank_kv_array(c, p, c->knorm, -1.0, C, n_b, sel);
}

/* decoding=: -||k|| of every cache entry (kvt_row_norms_ref's sum) */
static kvt_status cache_knorm(kvt_layer_ctx *c, const kvt_policy *p, int h, int step,
                              const int32_t *ent, const float *const *k, int n, double *out,
                              double *work)
{
    (void)ent, (void)p, (void)h, (void)work, (void)step;
    for (int i = 0; i < n; i++) {
        double s = 0.0;
        for (int e = 0; e < c->D; e++)
            s += (double)k[i][e] * (double)k[i][e];
        out[i] = -sqrt(s);
    }
    return KVT_OK;
}

const kvt_policy_def kvt_policy_def_knorm = {
    .name = "knorm",
    .summary = "KNorm: smallest key L2 norms",
    .keys = "window,heads,adaptive,alpha,normalize,alloc,skip,critical,first,ceps,dms,dms_window,"
            "dms_decoding,decoding,prefill",
    .defaults = d_knorm,
    .select = sel_knorm,
    .chunk_rank = chunk_knorm,
    .cache_scores = cache_knorm,
    .cache_scores_kv = true,
    .cache_scores_per_key = true,
};
