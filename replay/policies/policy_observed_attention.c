/* policy_observed_attention.c - `observed-attention`: kvpress's ObservedAttentionPress
 * (kvpress/presses/observed_attention_press.py): the attention each key received from every
 * prompt query (the H2O column sums, from attn_colsum or Q_all), divided by the number of
 * queries that see it (T - j: causal), averaged over the query heads of a KV head; every token
 * scored, no window (window=W, not in kvpress, keeps the last W first). Unlike h2o (KVCache-
 * Factory's one-shot H2O: plain sums, a window of 32), recent tokens are not favoured for
 * having fewer queries that see them. */
#include "../replay_internal.h"

static void d_oa(kvt_policy_opts *o)
{
    o->window = 0;
}

static kvt_status sel_oa(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                         kvt_layer_selection *sel)
{
    const kvt_policy_opts *o = &p->o;
    const double *cs;
    KVT_FORWARD(kvt_ctx_colsum(c, &cs));
    const int T = c->T, W = o->window < T ? o->window : T, P = T - W, Hq = c->Hq;
    KVT_FORWARD(kvt_sel_init(sel, c, o->per_query, W, n_b, true));
    double *a = kvt_malloc(((size_t)Hq * P + 1) * sizeof(double));
    double *r = kvt_malloc(((size_t)Hq * P + 1) * sizeof(double));
    kvt_status st = KVT_OK;
    if (!a || !r) {
        st = kvt_error_set(KVT_ERR_NOMEM, "observed-attention: out of memory");
        goto out_free;
    }
    for (int h = 0; h < Hq; h++)
        for (int j = 0; j < P; j++)
            a[(size_t)h * P + j] = cs[(size_t)h * T + j] / (double)(T - j);
    if (!o->per_query && (st = kvt_gqa_reduce_ref(a, Hq, c->Hkv, P, KVT_REDUCE_MEAN, r)))
        goto out_free;
    st = kvt_sel_rank_window_all(sel, o->per_query ? a : r, W);
    kvt_counts_uniform(sel, B, n_b);
out_free:
    kvt_free(a);
    kvt_free(r);
    return st;
}

const kvt_policy_def kvt_policy_def_observed_attention = {
    .name = "observed-attention",
    .summary = "kvpress ObservedAttention: attention received from every prompt query, per "
               "query that sees the key",
    .keys = "window,heads",
    .flags = KVT_POLICY_NEEDS_COLSUM,
    .defaults = d_oa,
    .select = sel_oa,
};
