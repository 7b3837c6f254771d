/* policy_adakv.c - `adakv` (POLICIES §3): SnapKV scores; the layer's total H*(B-W) prefix
 * budget is shared between heads. alloc=a (default): the AdaKV-repo allocation used by MixKV
 * and KVCache-Factory (normalize=1, alpha=0.2); alloc=b: the paper/kvpress exact form. The
 * per-head ranking is computed once; only the per-head cut differs per budget. */
#include <stdlib.h>

#include "../replay_internal.h"

kvt_status kvt_adakv_counts(kvt_layer_ctx *c, const kvt_policy_opts *o, const double *alloc_s,
                            const int *B, int n_b, kvt_layer_selection *sel)
{
    const int T = c->T, W = o->window, P = T - W, H = sel->n_heads;
    int *caps = kvt_malloc((size_t)H * sizeof(int));
    double *sorted = NULL; /* the heads' scores in ranking order, once for every budget */
    kvt_status st = KVT_OK;
    if (!caps) {
        st = kvt_error_set(KVT_ERR_NOMEM, "adakv: out of memory");
        goto out_free;
    }
    for (int b = 0; b < n_b && !st; b++) {
        int32_t *cnt = sel->count + (size_t)b * H;
        int bb = B[b] - W;
        if (T <= B[b] || bb > P) { /* short prompt, or B = T: keep everything */
            for (int h = 0; h < H; h++)
                cnt[h] = T;
        } else if (bb <= 0) {
            for (int h = 0; h < H; h++)
                cnt[h] = B[b];
        } else if (c->layer < o->skip) {
            for (int h = 0; h < H; h++)
                cnt[h] = B[b];
        } else {
            if (!sorted) {
                sorted = kvt_malloc(((size_t)H * P + 1) * sizeof(double));
                st = sorted ? kvt_adakv_sort(alloc_s, H, P, sorted)
                            : kvt_error_set(KVT_ERR_NOMEM, "adakv: out of memory");
                if (st)
                    break;
            }
            st =
                kvt_adakv_alloc_sorted(sorted, H, P, bb, W, o->alpha, o->normalize, o->alloc, caps);
            for (int h = 0; h < H && !st; h++)
                cnt[h] = W + caps[h];
        }
    }
out_free:
    kvt_free(caps);
    kvt_free(sorted);
    return st;
}

static kvt_status sel_adakv(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                            kvt_layer_selection *sel)
{
    const kvt_policy_opts *o = &p->o;
    const double *s;
    KVT_FORWARD(kvt_ctx_check_window(c, "adakv", o->window));
    KVT_FORWARD(
        kvt_ctx_window_scores(c, o->window, o->kernel, o->pool, o->reduce, o->per_query, &s));
    KVT_FORWARD(kvt_sel_init(sel, c, o->per_query, o->window, n_b, true));
    if (p->o.critical) /* CriticalAdaKV over the SnapKV scores */
        return kvt_sel_rank_counts(c, p, s, o->window, B, n_b, sel);
    KVT_FORWARD(kvt_ctx_rank_window_all(c, sel, s, o->window));
    return kvt_adakv_counts(c, o, s, B, n_b, sel);
}

const kvt_policy_def kvt_policy_def_adakv = {
    .name = "adakv",
    .summary = "AdaKV: SnapKV ranking, head-adaptive budgets within a layer",
    .flags = KVT_POLICY_WINDOW_QUERY,
    .keys = "window,kernel,pool,reduce,heads,alpha,normalize,alloc,skip,critical,first,ceps",
    .select = sel_adakv,
};
