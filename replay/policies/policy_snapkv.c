/* policy_snapkv.c - `snapkv` (POLICIES §1): window attention scores (§0.1: mean over the last
 * W queries, GQA mean, pooling over the prefix), top-(B-W) of the prefix plus the window.
 * Defaults are MixKV's LVLM setting: W=32, kernel 5, avgpool, GQA mean, per KV head. */
#include <math.h>
#include <string.h>

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
    if (p->o.critical || !isnan(p->o.dms)) /* CriticalKV or DMSPress over the SnapKV scores */
        return kvt_sel_rank_counts(c, p, s, o->window, B, n_b, sel);
    KVT_FORWARD(kvt_ctx_rank_window_all(c, sel, s, o->window));
    kvt_counts_uniform(sel, B, n_b);
    return KVT_OK;
}

/* chunk_scores=own|kvpress: kvpress's ChunkPress(SnapKVPress): each chunk's window attention
 * from its own last W queries, then the same mean, GQA reduction and pooling within the chunk,
 * its window first */
static kvt_status chunk_snapkv(kvt_layer_ctx *c, const kvt_policy *p, int C, const int *B, int n_b,
                               kvt_layer_selection *sel)
{
    const kvt_policy_opts *o = &p->o;
    const int T = c->T, Hq = c->Hq, W = o->window, Cn = C < T ? C : T;
    KVT_FORWARD(kvt_sel_init(sel, c, o->per_query, W, n_b, true));
    double *a = kvt_calloc((size_t)Hq * T, sizeof(double));
    double *ac = kvt_malloc((size_t)Hq * Cn * sizeof(double));
    double *red = kvt_malloc((size_t)Hq * Cn * sizeof(double));
    double *s = kvt_malloc((size_t)Cn * sizeof(double));
    int32_t *loc = kvt_malloc((size_t)Cn * sizeof(int32_t));
    kvt_status st =
        a && ac && red && s && loc ? KVT_OK : kvt_error_set(KVT_ERR_NOMEM, "snapkv: out of memory");
    if (!st)
        st = kvt_chunk_window_mass(c, "snapkv", C, W, o->chunk_scores == KVT_CHUNK_KVPRESS, a);
    for (int a0 = 0; a0 < T && !st; a0 += C) {
        const int n = T - a0 < C ? T - a0 : C, P = n - W;
        for (int h = 0; h < Hq; h++)
            memcpy(ac + (size_t)h * P, a + (size_t)h * T + a0, (size_t)P * sizeof(double));
        const double *r = ac;
        if (!o->per_query) {
            if ((st = kvt_gqa_reduce_ref(ac, Hq, c->Hkv, P, o->reduce, red)))
                break;
            r = red;
        }
        for (int h = 0; h < sel->n_heads && !st; h++)
            if (!(st = kvt_pool1d_ref(r + (size_t)h * P, P, o->kernel, o->pool, s)) &&
                !(st = kvt_rank_window(s, n, W, loc)))
                kvt_sel_put_chunk(sel, h, a0, n, loc);
    }
    kvt_free(a);
    kvt_free(ac);
    kvt_free(red);
    kvt_free(s);
    kvt_free(loc);
    return st;
}

const kvt_policy_def kvt_policy_def_snapkv = {
    .name = "snapkv",
    .summary = "SnapKV: pooled window attention, uniform budget",
    .flags = KVT_POLICY_WINDOW_QUERY,
    .keys = "window,kernel,pool,reduce,heads,critical,first,ceps,merge,dms,dms_window",
    .select = sel_snapkv,
    .chunk_rank = chunk_snapkv,
    .chunk_reads = KVT_CTX_KV,
    .chunk_queries = true,
    .chunk_min = 'w', /* SnapKVPress asserts q_len > window_size */
};
