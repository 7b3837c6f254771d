/* policy_pyramidkv.c - `pyramidkv` (POLICIES §2): SnapKV scores and ranking with the
 * layer-wise pyramid schedule b_l (the first layer keeps the most). Default: the MixKV/AdaKV
 * variant without KVCache-Factory's "N < 2(B-W) -> uniform" fallback (fallback=1 adds it). */
#include "../replay_internal.h"

static kvt_status sel_pyramid(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                              kvt_layer_selection *sel)
{
    const kvt_policy_opts *o = &p->o;
    const double *s;
    KVT_FORWARD(kvt_ctx_check_window(c, "pyramidkv", o->window));
    KVT_FORWARD(
        kvt_ctx_window_scores(c, o->window, o->kernel, o->pool, o->reduce, o->per_query, &s));
    KVT_FORWARD(kvt_sel_init(sel, c, o->per_query, o->window, n_b, true));
    KVT_FORWARD(kvt_ctx_rank_window_all(c, sel, s, o->window));
    for (int b = 0; b < n_b; b++) {
        int cnt;
        if (c->T < B[b])
            cnt = c->T;
        else if (B[b] <= o->window)
            cnt = B[b];
        else
            cnt = o->window + kvt_pyramid_layer_budget(B[b], o->window, c->T, c->n_layers, c->layer,
                                                       o->beta, o->fallback);
        if (cnt > c->T)
            cnt = c->T;
        for (int h = 0; h < sel->n_heads; h++)
            sel->count[(size_t)b * sel->n_heads + h] = cnt;
    }
    return KVT_OK;
}

const kvt_policy_def kvt_policy_def_pyramidkv = {
    .name = "pyramidkv",
    .summary = "PyramidKV: SnapKV ranking, pyramid layer budgets",
    .flags = KVT_POLICY_WINDOW_QUERY,
    .keys = "window,kernel,pool,reduce,heads,beta,fallback",
    .select = sel_pyramid,
};
