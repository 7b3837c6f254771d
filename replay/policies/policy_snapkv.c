/* policy_snapkv.c - `snapkv` (POLICIES §1): window attention scores (§0.1: mean over the last
 * W queries, GQA mean, pooling over the prefix), top-(B-W) of the prefix plus the window.
 * Defaults are MixKV's LVLM setting: W=32, kernel 5, avgpool, GQA mean, per KV head. */
#include "../replay_internal.h"

static kvt_status sel_snapkv(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                             kvt_layer_selection *sel)
{
    const kvt_policy_opts *o = &p->o;
    const double *s;
    KVT_FORWARD(kvt_ctx_check_window(c, "snapkv", o->window));
    KVT_FORWARD(
        kvt_ctx_window_scores(c, o->window, o->kernel, o->pool, o->reduce, o->per_query, &s));
    KVT_FORWARD(kvt_sel_init(sel, c, o->per_query, o->window, n_b, true));
    if (p->o.critical) /* CriticalKV over the SnapKV scores */
        return kvt_sel_rank_counts(c, p, s, o->window, B, n_b, sel);
    KVT_FORWARD(kvt_ctx_rank_window_all(c, sel, s, o->window));
    kvt_counts_uniform(sel, B, n_b);
    return KVT_OK;
}

const kvt_policy_def kvt_policy_def_snapkv = {
    .name = "snapkv",
    .summary = "SnapKV: pooled window attention, uniform budget",
    .flags = KVT_POLICY_WINDOW_QUERY,
    .keys = "window,kernel,pool,reduce,heads,critical,first,ceps,merge",
    .select = sel_snapkv,
};
