/* policy_h2o.c - `h2o` (POLICIES §6, the KVCache-Factory one-shot variant): score[j] = sum
 * over every prompt query of its causal attention to j (attn_colsum from the trace, or
 * computed from Q_all), GQA-reduced, no pooling; top-(B-W) of the prefix plus the window. */
#include "../replay_internal.h"

kvt_status kvt_rank_by_colsum(kvt_layer_ctx *c, const kvt_policy *p, kvt_reduce reduce,
                              bool per_viewer, const int *B, int n_b, kvt_layer_selection *sel)
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
        st = kvt_error_set(KVT_ERR_NOMEM, "%s: out of memory", p->def->name);
        goto out_free;
    }
    for (int h = 0; h < Hq; h++)
        for (int j = 0; j < P; j++)
            a[(size_t)h * P + j] = cs[(size_t)h * T + j] / (per_viewer ? (double)(T - j) : 1.0);
    if (!o->per_query && (st = kvt_gqa_reduce_ref(a, Hq, c->Hkv, P, reduce, r)))
        goto out_free;
    st = kvt_sel_rank_counts(c, p, o->per_query ? a : r, W, B, n_b, sel);
out_free:
    kvt_free(a);
    kvt_free(r);
    return st;
}

static kvt_status sel_h2o(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                          kvt_layer_selection *sel)
{
    return kvt_rank_by_colsum(c, p, p->o.reduce, false, B, n_b, sel);
}

const kvt_policy_def kvt_policy_def_h2o = {
    .name = "h2o",
    .summary = "H2O: accumulated attention of all prompt queries (one shot)",
    .keys = "window,reduce,heads,merge",
    .flags = KVT_POLICY_NEEDS_COLSUM,
    .select = sel_h2o,
};
