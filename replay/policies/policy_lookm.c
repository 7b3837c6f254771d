/* policy_lookm.c - `lookm` (POLICIES §11: LOOK-M, arXiv 2406.18139, EMNLP Findings 2024;
 * released code SUSTechBruce/LOOK-M, its kv_mode text_prior_pivot_merge and the
 * TextPivotMerge_LayerWise cache): the text-prior eviction of a multimodal prompt's KV cache at
 * the end of prefill, with the dropped tokens merged into the kept ones.
 *
 * Each head scores every token by the attention it receives, summed over every prompt query
 * (H2O's one-shot column sums: the trace's attn_colsum, or computed from its Q_all), reduced
 * over the query heads of a KV head with reduce= (mean: LOOK-M's port to GQA models averages
 * the group). At budget B a head keeps the R = floor(recent_share * B) most recent tokens and,
 * of the tokens before them, the best B - R: the non-visual (text) tokens first, by score, then
 * the image and video tokens, by score (ties to the lower index). LOOK-M's default
 * hh_ratio = recent_ratio = 0.1 is B = 20% of the prompt with recent_share=0.5 (the default).
 * The recent part grows with the budget, so each budget has a ranking of its own
 * (KVT_POLICY_PER_BUDGET), though a kept set still contains every smaller budget's (B - R never
 * falls as B grows; merge.c uses that). Without a modality table every token counts as text
 * (H2O with a recent window of recent_share * B).
 *
 * merge=pivot (the default) is LOOK-M's pivot merge, merge.c's (each dropped token averaged into
 * the kept entry with the most similar key, keys and values alike); merge=none is its
 * text_prior_h2o mode. merge=weighted is KVCache-Factory's weighted merge, not LOOK-M's
 * (whose weights are the raw cosines over a filtered subset).
 *
 * Two places where kvtrace follows the paper's description rather than the released code:
 * - the code adds -65516 to the image tokens' scores in half precision, where the steps are 32
 *   apart, which leaves nearly every image token tied; kvtrace ranks them by their scores;
 * - its keep mask (score >= 0 once the selected tokens are zeroed) also keeps every text token
 *   it did not select, so the cache exceeds the budget when the text before the recent window
 *   outnumbers B - R; kvtrace keeps B. When it does not, the two keep the same kinds of tokens:
 *   all of that text, the recent ones, and the best image tokens.
 */
#include "../replay_internal.h"
#include "kvt_trace.h"

static void d_lookm(kvt_policy_opts *o)
{
    o->window = 0; /* the recent part is recent_share of each budget */
    o->recent_share = 0.5;
    o->merge = 'p';
}

static bool visual(const uint8_t *mod, int j)
{
    return mod && (mod[j] == KVT_MOD_IMAGE || mod[j] == KVT_MOD_VIDEO);
}

static kvt_status sel_lookm(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                            kvt_layer_selection *sel)
{
    const kvt_policy_opts *o = &p->o;
    const double *cs;
    KVT_FORWARD(kvt_ctx_colsum(c, &cs));
    const int T = c->T, Hq = c->Hq, H = kvt_ctx_heads(c, o->per_query);
    const uint8_t *mod = c->in->modality;
    KVT_FORWARD(kvt_sel_init(sel, c, o->per_query, 0, n_b, true));
    KVT_FORWARD(kvt_sel_init_per_budget(sel));
    kvt_counts_uniform(sel, B, n_b);
    double *red = o->per_query ? NULL : kvt_malloc((size_t)H * T * sizeof(double) + 1);
    double *vs = kvt_malloc((size_t)T * sizeof(double) + 1);
    int32_t *idx = kvt_malloc((size_t)T * 4 + 4), *rank = kvt_malloc((size_t)T * 4 + 4);
    int32_t *work = kvt_malloc((size_t)T * 4 + 4), *prior = kvt_malloc((size_t)T * 4 + 4);
    kvt_status st = KVT_OK;
    if ((!o->per_query && !red) || !vs || !idx || !rank || !work || !prior) {
        st = kvt_error_set(KVT_ERR_NOMEM, "lookm: out of memory");
        goto out;
    }
    if (red && (st = kvt_gqa_reduce_ref(cs, Hq, c->Hkv, T, o->reduce, red)))
        goto out;
    for (int h = 0; h < H; h++) {
        const double *s = (red ? red : cs) + (size_t)h * T;
        /* the text-prior ranking of all T tokens: text by score, then visual by score */
        int n = 0;
        for (int pass = 0; pass < 2; pass++) {
            int m = 0;
            for (int j = 0; j < T; j++)
                if (visual(mod, j) == (pass == 1))
                    idx[m] = j, vs[m++] = s[j];
            if ((st = kvt_rank_desc(vs, m, rank, work)))
                goto out;
            for (int i = 0; i < m; i++)
                prior[n++] = idx[rank[i]];
        }
        /* budget b: the R most recent tokens (most recent first), then that ranking of the
           tokens before them */
        for (int b = 0; b < n_b; b++) {
            const int Bb = B[b] < T ? B[b] : T, R = (int)floor(o->recent_share * Bb);
            int32_t *r = sel->border + ((size_t)b * H + h) * T;
            int k = 0;
            for (int j = T - 1; j >= T - R; j--)
                r[k++] = j;
            for (int i = 0; i < T; i++)
                if (prior[i] < T - R)
                    r[k++] = prior[i];
        }
    }
out:
    kvt_free(red);
    kvt_free(vs);
    kvt_free(idx);
    kvt_free(rank);
    kvt_free(work);
    kvt_free(prior);
    return st;
}

const kvt_policy_def kvt_policy_def_lookm = {
    .name = "lookm",
    .summary = "LOOK-M: text before image tokens by accumulated attention, the most recent "
               "recent_share of the budget, the rest merged into the kept (merge=pivot)",
    .keys = "reduce,heads,recent_share,merge",
    .flags = KVT_POLICY_NEEDS_COLSUM | KVT_POLICY_PER_BUDGET,
    .defaults = d_lookm,
    .select = sel_lookm,
};
