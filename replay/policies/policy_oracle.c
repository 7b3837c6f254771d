/* policy_oracle.c - `oracle`: ranks the prompt tokens by the attention the held-out decode
 * queries give them (mean over the head's query heads and all decode steps) and keeps the
 * top B, with no window by default. Because decode recall is linear in the kept set, this is
 * the best any set of B entries per head can do on decode recall: the upper bound. Needs
 * Q_decode. */
#include "../replay_internal.h"

static void d_oracle(kvt_policy_opts *o)
{
    o->window = 0;
}

static kvt_status sel_oracle(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                             kvt_layer_selection *sel)
{
    KVT_RETURN_IF(c->Gd < 1, KVT_ERR_NOT_FOUND,
                  "oracle needs decode queries: the trace has no Q_decode for layer %d "
                  "(capture decode steps)",
                  c->layer);
    const int T = c->T, W = p->o.window < T ? p->o.window : T, P = T - W;
    KVT_FORWARD(kvt_sel_init(sel, c, p->o.per_query, W, n_b, true));
    double *s = kvt_calloc((size_t)sel->n_heads * P + 1, sizeof(double));
    KVT_RETURN_IF(!s, KVT_ERR_NOMEM, "oracle: out of memory");
    kvt_status st = kvt_ctx_decode_means(c, p->o.per_query, P, s);
    if (!st)
        st = kvt_sel_rank_window_all(sel, s, W);
    kvt_free(s);
    kvt_counts_uniform(sel, B, n_b);
    return st;
}

const kvt_policy_def kvt_policy_def_oracle = {
    .name = "oracle",
    .summary = "upper bound: ranks by the held-out decode queries' attention",
    .keys = "window,heads",
    .flags = KVT_POLICY_NEEDS_DECODE,
    .defaults = d_oracle,
    .select = sel_oracle,
};
