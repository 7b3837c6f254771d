/* policy_elastic_cache.c - `elastic-cache`: Elastic Cache's instruction-encoding compression
 * (Liu et al., ECCV 2024, arXiv 2407.18121; code liuzuyan/ElasticCache, kv_cache.py, class
 * ElasticCache, read for the scores, the kept set and the merge). One set per layer:
 *   s[j] = mean over the layer's query heads of the attention every prompt query gives token j
 *          (its H2O column sum: attn_colsum, or computed from Q_all);
 *   kept = the first `sinks` tokens (start_size, 4), the last token (protect_size 1) and, of
 *          the tokens between them, the B - sinks - 1 "anchors" with the largest s (ties to the
 *          earlier token);
 *   every other token between them is merged into the anchor nearest to it in position (ties to
 *          the earlier anchor), keys and values alike: x'_a = (x_a + sum_j x_j) / (1 + n_a)
 *          (scatter_reduce "mean" with the anchor itself). The sinks and the last token take no
 *          merges; with no anchor (B <= sinks + 1) the dropped tokens are evicted.
 * The released code picks the anchors as torch.where(argsort(s) > forget_num), which compares
 * token indices with forget_num in rank order instead of ranking the tokens, and gathers the
 * merged tokens without the start_size offset; kvtrace follows the paper (the most important
 * tokens become the anchors; the merged ones are the tokens dropped). Its decode phase evicts
 * one cached entry per generated token at a fixed distance from the end (distance -25): the
 * replay measures the prompt's compression only, as analysis/RESULTS.md says. A prompt of at
 * most B tokens is kept as is. merge=position is this merge (the default); merge=none keeps the
 * anchors unmerged (the ablation), merge=pivot|weighted merges by key instead (merge.c). */
#include <string.h>

#include "../replay_internal.h"

/* the layer's ranking [T]: the last token, the sinks in order, then the tokens between by s
 * descending */
static kvt_status elastic_order(kvt_layer_ctx *c, int sinks, int32_t *order)
{
    const double *cs;
    KVT_FORWARD(kvt_ctx_colsum(c, &cs));
    const int T = c->T, Hq = c->Hq, S = sinks < T - 1 ? sinks : T - 1, n = T - 1 - S;
    int t = 0;
    order[t++] = T - 1;
    for (int j = 0; j < S; j++)
        order[t++] = j;
    if (n <= 0)
        return KVT_OK;
    double *s = kvt_calloc((size_t)n, sizeof(double));
    int32_t *work = kvt_malloc((size_t)n * sizeof(int32_t));
    kvt_status st = KVT_OK;
    if (!s || !work) {
        st = kvt_error_set(KVT_ERR_NOMEM, "elastic-cache: out of memory");
        goto out;
    }
    for (int h = 0; h < Hq; h++)
        for (int j = 0; j < n; j++)
            s[j] += cs[(size_t)h * T + S + j];
    for (int j = 0; j < n; j++)
        s[j] /= Hq;
    if ((st = kvt_rank_desc(s, n, order + t, work)))
        goto out;
    for (int i = 0; i < n; i++)
        order[t + i] += S;
out:
    kvt_free(s);
    kvt_free(work);
    return st;
}

/* The merged set of KV head g keeping the first cnt tokens of order. A dropped token goes to the
 * nearest anchor (a kept token in [sinks, T-1)), so each anchor's merged tokens are the dropped
 * ones of an interval around it: lo[a]..hi[a], n_m[a] of them. Scratch: in [T], anchor, n_m, lo,
 * hi [T], acc [2 D]. */
typedef struct elastic_work {
    uint8_t *in;
    int32_t *anchor, *n_m, *lo, *hi;
    double *acc;
} elastic_work;

static kvt_status elastic_merge(const kvt_layer_ctx *c, int g, int sinks, const int32_t *order,
                                int cnt, elastic_work *w, kvt_merged_set *ms)
{
    const int T = c->T, D = c->D;
    const float *K = c->k + (size_t)g * T * D, *V = c->v + (size_t)g * T * D;
    memset(w->in, 0, (size_t)T);
    for (int i = 0; i < cnt; i++)
        w->in[order[i]] = 1;
    int na = 0; /* anchors, ascending */
    for (int j = sinks; j < T - 1; j++)
        if (w->in[j])
            w->anchor[na++] = j;
    for (int a = 0; a < na; a++)
        w->n_m[a] = 0;
    for (int j = 0, a = 0; j < T && na > 0; j++) {
        if (w->in[j])
            continue;
        while (a + 1 < na && w->anchor[a + 1] < j) /* the last anchor before j, if any */
            a++;
        int t = a;
        if (w->anchor[a] < j && a + 1 < na && w->anchor[a + 1] - j < j - w->anchor[a])
            t = a + 1; /* strictly nearer; a tie goes to the earlier anchor */
        if (w->n_m[t]++ == 0)
            w->lo[t] = j;
        w->hi[t] = j;
    }
    int n_chg = 0;
    for (int a = 0; a < na; a++)
        n_chg += w->n_m[a] > 0;
    int n = 0;
    for (int j = 0; j < T; j++)
        n += w->in[j];
    KVT_FORWARD(kvt_merged_alloc(ms, n, n_chg, D));
    double *ak = w->acc, *av = w->acc + D;
    for (int j = 0, e = 0, ce = 0, a = 0; j < T; j++) {
        if (!w->in[j])
            continue;
        ms->idx[e] = j;
        if (a < na && w->anchor[a] == j && w->n_m[a] > 0) {
            ms->changed[e] = 1;
            for (int d = 0; d < D; d++)
                ak[d] = K[(size_t)j * D + d], av[d] = V[(size_t)j * D + d];
            for (int i = w->lo[a]; i <= w->hi[a];
                 i++) /* the interval: the anchor is its only kept token */
                if (!w->in[i])
                    for (int d = 0; d < D; d++)
                        ak[d] += K[(size_t)i * D + d], av[d] += V[(size_t)i * D + d];
            const double inv = 1.0 / (1.0 + w->n_m[a]);
            for (int d = 0; d < D; d++) {
                ms->k[(size_t)ce * D + d] = (float)(ak[d] * inv);
                ms->v[(size_t)ce * D + d] = (float)(av[d] * inv);
            }
            ce++;
        }
        if (a < na && w->anchor[a] == j)
            a++;
        e++;
    }
    return KVT_OK;
}

static kvt_status sel_elastic(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                              kvt_layer_selection *sel)
{
    const int T = c->T, D = c->D, sinks = p->o.sinks < T - 1 ? p->o.sinks : T - 1;
    KVT_FORWARD(kvt_sel_init(sel, c, p->o.per_query, 1, n_b, true));
    KVT_FORWARD(elastic_order(c, p->o.sinks, sel->order));
    const int H = sel->n_heads;
    for (int h = 1; h < H; h++)
        memcpy(sel->order + (size_t)h * T, sel->order, (size_t)T * sizeof(int32_t));
    kvt_counts_uniform(sel, B, n_b);
    if (p->o.merge != 'e') /* none: the anchors alone; pivot, weighted: merge.c's, after this */
        return KVT_OK;
    KVT_FORWARD(kvt_ctx_fetch(c, KVT_CTX_KV));
    KVT_FORWARD(kvt_sel_init_merged(sel));
    elastic_work w = {kvt_malloc((size_t)T),
                      kvt_malloc((size_t)T * sizeof(int32_t)),
                      kvt_malloc((size_t)T * sizeof(int32_t)),
                      kvt_malloc((size_t)T * sizeof(int32_t)),
                      kvt_malloc((size_t)T * sizeof(int32_t)),
                      kvt_malloc((size_t)2 * D * sizeof(double))};
    kvt_status st = KVT_OK;
    if (!w.in || !w.anchor || !w.n_m || !w.lo || !w.hi || !w.acc)
        st = kvt_error_set(KVT_ERR_NOMEM, "elastic-cache: out of memory");
    for (int b = 0; b < n_b && !st; b++)
        for (int h = 0; h < H && !st; h++)
            st = elastic_merge(c, kvt_ctx_kv_of(c, p->o.per_query, h), sinks, sel->order,
                               sel->count[(size_t)b * H + h], &w, &sel->merged[(size_t)b * H + h]);
    kvt_free(w.in);
    kvt_free(w.anchor);
    kvt_free(w.n_m);
    kvt_free(w.lo);
    kvt_free(w.hi);
    kvt_free(w.acc);
    return st;
}

static void d_elastic(kvt_policy_opts *o)
{
    o->merge = 'e';
}

const kvt_policy_def kvt_policy_def_elastic_cache = {
    .name = "elastic-cache",
    .summary = "Elastic Cache: the sinks, the last token and the tokens with the most attention "
               "from every prompt query (layer-wise) as anchors; every other token merged into "
               "its nearest anchor by position (mean)",
    .flags = KVT_POLICY_NEEDS_COLSUM, /* merged unless merge=none (kvt_policy_flags) */
    .host_reads = KVT_CTX_KV,
    .keys = "heads,sinks,merge",
    .defaults = d_elastic,
    .select = sel_elastic,
};
