/* policy_pyramidkv.c - `pyramidkv` (POLICIES §2): SnapKV scores and ranking with the
 * layer-wise pyramid schedule b_l (the first layer keeps the most). Default: the MixKV/AdaKV
 * variant without KVCache-Factory's "N < 2(B-W) -> uniform" fallback (fallback=1 adds it).
 * align=kvpress: kvpress's PyramidKVPress schedule instead (kvt_pyramid_kvpress_count). */
#include <math.h>

#include "../replay_internal.h"

/* Entries layer l of L keeps under kvpress's PyramidKVPress.get_layer_budget
 * (kvpress/presses/pyramidkv_press.py @08a43bf), window inside, in its float arithmetic:
 * x = T (1 - ratio), mcp = W + x, min = (mcp - W) / beta, max = 2 (mcp - W) - min, max clamped
 * to T - W (min then 2 (mcp - W) - max); unless T >= max >= min >= W, round(x) (its SnapKV
 * fallback); else round(max - l (max - min) / (L - 1)), Python's round (half to even). ratio is
 * kvpress's compression_ratio, 1 - the budget's share of T. */
int kvt_pyramid_kvpress_count(double ratio, int W, int T, int L, int l, double beta)
{
    double x = T * (1.0 - ratio), mcp = W + x;
    double min_num = (mcp - W) / beta, max_num = (mcp - W) * 2 - min_num;
    if (max_num >= T - W) {
        max_num = T - W;
        min_num = (mcp - W) * 2 - max_num;
    }
    double n;
    if (L <= 1 || !(T >= max_num && max_num >= min_num && min_num >= W))
        n = kvt_round_even(x); /* (one layer: kvpress divides by L - 1 = 0; the plain budget) */
    else
        n = kvt_round_even(max_num - l * ((max_num - min_num) / (L - 1)));
    return n < 0 ? 0 : n > T ? T : (int)n;
}

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
        if (o->chunk_kvpress) { /* align=kvpress: the ratio as kvpress would be given it */
            double f = c->budget_frac ? c->budget_frac[b] : (double)B[b] / c->T;
            cnt =
                kvt_pyramid_kvpress_count(1.0 - f, o->window, c->T, c->n_layers, c->layer, o->beta);
        } else if (c->T < B[b])
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
    .flags = KVT_POLICY_WINDOW_QUERY | KVT_POLICY_LAYER_BUDGETS,
    .keys = "window,kernel,pool,reduce,heads,beta,fallback,align,merge",
    .select = sel_pyramid,
};
