/* policy_full.c - `full`: keeps every token at every budget (the reference point: recall 1,
 * error 0). The budget is ignored; results still record it. */
#include "../replay_internal.h"

static kvt_status sel_full(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                           kvt_layer_selection *sel)
{
    KVT_FORWARD(kvt_sel_init(sel, c, p->o.per_query, 0, n_b, true));
    for (int h = 0; h < sel->n_heads; h++)
        for (int t = 0; t < c->T; t++)
            sel->order[(size_t)h * c->T + t] = t;
    for (int b = 0; b < n_b * sel->n_heads; b++)
        sel->count[b] = c->T;
    return KVT_OK;
}

const kvt_policy_def kvt_policy_def_full = {
    .name = "full",
    .summary = "keep everything (reference)",
    .flags = KVT_POLICY_LAYER_BUDGETS,
    .keys = "heads",
    .select = sel_full,
};
