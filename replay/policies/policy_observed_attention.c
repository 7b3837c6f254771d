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
    o->alloc = 'b'; /* adaptive=1: kvpress's AdaKVPress over the press */
    o->window = 0;
}

static kvt_status sel_oa(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                         kvt_layer_selection *sel)
{
    return kvt_rank_by_colsum(c, p, KVT_REDUCE_MEAN, true, B, n_b, sel);
}

const kvt_policy_def kvt_policy_def_observed_attention = {
    .name = "observed-attention",
    .summary = "kvpress ObservedAttention: attention received from every prompt query, per "
               "query that sees the key",
    .keys = "window,heads,adaptive,alpha,normalize,alloc,skip,critical,first,ceps,dms,dms_window",
    .flags = KVT_POLICY_NEEDS_COLSUM,
    .defaults = d_oa,
    .select = sel_oa,
};
