/* policy_compactor.c - `compactor`: kvpress's CompactorPress (kvpress/presses/compactor_press.py;
 * Compactor, Chari & Van Durme 2025, arXiv 2507.08143). The first `sinks` tokens
 * (sink_size_start, 8) and the last `recent` (sink_size_end, 4) are protected; the tokens between
 * them, taken as a prompt of their own, score
 *   blend * z(leverage) + z(noncausal attention)
 * z() z-normalising over every head and token of that middle part: leverage as `leverage`
 * (pre-RoPE keys of the middle part, the Gaussian sketch of `sketch` columns), the attention as
 * `noncausal-attention` (its chunks from the first middle token). blend defaults to the
 * budget's compression ratio 1 - B/T (kvpress's blending=None), so each budget has its own
 * ranking (KVT_POLICY_PER_BUDGET); blend=X fixes it. Each head keeps the protected tokens
 * first (kvpress pads them with the largest score + 1: on a budget below their number, the
 * earlier ones, where torch.topk leaves the choice open), then the B highest scores, ties to
 * the earlier token. heads=query scores each query head's attention with its KV head's
 * leverage. */
#include <math.h>
#include <string.h>

#include "../replay_internal.h"

static void d_cpt(kvt_policy_opts *o)
{
    o->sinks = 8;
    o->recent = 4;
    o->chunk = 256;
    o->sketch = 48;
    o->blend = NAN;
}

static kvt_status sel_cpt(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                          kvt_layer_selection *sel)
{
    const kvt_policy_opts *o = &p->o;
    const int T = c->T, Hkv = c->Hkv, H = kvt_ctx_heads(c, o->per_query);
    const int left = o->sinks < T ? o->sinks : T;
    const int right = o->recent < T - left ? o->recent : T - left, s0 = left, s1 = T - right;
    const int n = s1 - s0;
    KVT_FORWARD(kvt_ctx_check_q_all(c, "compactor"));
    KVT_FORWARD(kvt_sel_init(sel, c, o->per_query, 0, n_b, true));
    KVT_FORWARD(kvt_sel_init_per_budget(sel));
    kvt_counts_uniform(sel, B, n_b);
    double *l = kvt_malloc(((size_t)Hkv * n + 1) * sizeof(double));
    double *a = kvt_malloc(((size_t)H * n + 1) * sizeof(double));
    double *s = kvt_malloc(((size_t)T + 1) * sizeof(double));
    int32_t *work = kvt_malloc(((size_t)T + 1) * sizeof(int32_t));
    kvt_status st = KVT_OK;
    if (!l || !a || !s || !work)
        st = kvt_error_set(KVT_ERR_NOMEM, "compactor: out of memory");
    if (!st && n > 0)
        st = kvt_leverage_scores(c, "compactor", o->sketch, o->seed, s0, s1, l);
    if (!st && n > 0)
        st = kvt_nca_scores(c, "compactor", o->per_query, o->chunk, s0, s1, a);
    if (!st && n > 0) {
        kvt_znorm(l, (size_t)Hkv * n);
        kvt_znorm(a, (size_t)H * n);
    }
    for (int b = 0; b < n_b && !st; b++) {
        const double f = c->budget_frac ? c->budget_frac[b] : (double)B[b] / T;
        const double blend = isnan(o->blend) ? 1.0 - f : o->blend;
        for (int h = 0; h < H && !st; h++) {
            const double *lh = l + (size_t)kvt_ctx_kv_of(c, o->per_query, h) * n,
                         *ah = a + (size_t)h * n;
            for (int j = 0; j < T; j++)
                s[j] = j < s0 || j >= s1 ? INFINITY : blend * lh[j - s0] + ah[j - s0];
            st = kvt_rank_desc(s, T, sel->border + ((size_t)b * H + h) * T, work);
        }
    }
    kvt_free(l);
    kvt_free(a);
    kvt_free(s);
    kvt_free(work);
    return st;
}

const kvt_policy_def kvt_policy_def_compactor = {
    .name = "compactor",
    .host_reads = KVT_CTX_KV,
    .summary = "kvpress CompactorPress: leverage of the pre-RoPE keys blended with non-causal "
               "chunked attention (blend = the compression ratio), sinks and recent protected",
    .keys = "heads,sinks,recent,chunk,sketch,seed,blend",
    .flags = KVT_POLICY_NEEDS_QALL | KVT_POLICY_NEEDS_ROPE | KVT_POLICY_PER_BUDGET,
    .defaults = d_cpt,
    .select = sel_cpt,
};
