/* think.c - think=R on a plain kept set: ThinK's query-driven pruning of key channels (Xu et
 * al., "ThinK: Thinner Key Cache by Query-Driven Pruning", arXiv 2407.21018, ICLR 2025), as
 * KVCache-Factory's key_pruner_query_driven (the authors' code, used after SnapKV's selection)
 * and kvpress's ThinKPress compute it. For each selection head and budget, on the kept entries:
 *   q_c = mean over the head's query heads (heads=kv: its group; heads=query: itself) and the
 *         last think_window window queries of q_c^2
 *   k_c = mean over the kept entries of k_c^2
 * The floor(D * R) channels of smallest q_c * k_c (ties: the lower channel first) are zeroed in
 * the keys of the kept entries before the last think_recent prompt tokens; values, and the keys
 * of the recent tokens, are left as they are. The kept sets stay the policy's. They become
 * merged sets whose changed entries hold the pruned keys, and the metrics read those
 * (analysis/RESULTS.md, "think="). Products and sums in double. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "replay_internal.h"

typedef struct think_chan {
    double s;
    int c;
} think_chan;

static int cmp_chan(const void *a, const void *b)
{
    const think_chan *x = a, *y = b;
    if (x->s != y->s)
        return x->s < y->s ? -1 : 1;
    return (x->c > y->c) - (x->c < y->c);
}

/* q_c of selection head h (KV head g): over query heads [h0, h0 + nq) and the last tw window
 * queries */
static void query_channels(const kvt_layer_ctx *c, int h0, int nq, int tw, double *qn)
{
    const int D = c->D, Wt = c->Wt;
    memset(qn, 0, (size_t)D * sizeof(double));
    for (int h = h0; h < h0 + nq; h++)
        for (int i = Wt - tw; i < Wt; i++) {
            const float *q = c->in->q_window + ((size_t)h * Wt + i) * D;
            for (int d = 0; d < D; d++)
                qn[d] += (double)q[d] * q[d];
        }
    for (int d = 0; d < D; d++)
        qn[d] /= (double)nq * tw;
}

/* head h's merged set at one budget: kept[0..n) ascending, pruned[D] the zeroed channels */
static kvt_status pruned_set(const kvt_layer_ctx *c, int g, const int32_t *kept, int n, int lim,
                             const uint8_t *pruned, bool any, kvt_merged_set *out)
{
    const int T = c->T, D = c->D;
    const float *K = c->k + (size_t)g * T * D;
    int n_chg = 0;
    for (int e = 0; any && e < n; e++)
        n_chg += kept[e] < lim;
    KVT_FORWARD(kvt_merged_alloc_keys(out, n, n_chg, D)); /* values: the tokens' own */
    memcpy(out->idx, kept, (size_t)n * sizeof(int32_t));
    for (int e = 0, ce = 0; e < n && ce < n_chg; e++) {
        if (kept[e] >= lim)
            continue;
        out->changed[e] = 1;
        const float *k = K + (size_t)kept[e] * D;
        float *ko = out->k + (size_t)ce * D;
        for (int d = 0; d < D; d++)
            ko[d] = pruned[d] ? 0.0f : k[d];
        ce++;
    }
    return KVT_OK;
}

kvt_status kvt_sel_think(kvt_layer_ctx *c, const kvt_policy_opts *o, kvt_layer_selection *sel)
{
    KVT_RETURN_IF(!sel->has_fixed || sel->step_head || sel->merged, KVT_ERR_STATE,
                  "think: internal error: not a fixed selection");
    const int T = c->T, D = c->D, H = sel->n_heads, nb = sel->n_budgets, tw = o->think_window;
    KVT_RETURN_IF(tw < 1 || tw > c->Wt, KVT_ERR_INVALID_ARG,
                  "think_window=%d needs %d stored window queries; layer %d has %d", tw, tw,
                  c->layer, c->Wt);
    const int n_prune = (int)floor((double)D * o->think), group = c->Hq / c->Hkv;
    const int lim = o->think_recent < T ? T - o->think_recent : 0; /* pruned: idx < lim */
    KVT_FORWARD(kvt_ctx_fetch(c, KVT_CTX_KV));
    KVT_FORWARD(kvt_sel_init_merged(sel));
    sel->pruned_share = (double)n_prune / (2.0 * D); /* of an entry's K and V */
    kvt_status st = KVT_OK;
    double *qn = kvt_malloc(((size_t)D + 1) * sizeof(double));
    double *kn = kvt_malloc(((size_t)D + 1) * sizeof(double));
    think_chan *ch = kvt_malloc(((size_t)D + 1) * sizeof(think_chan));
    uint8_t *pruned = kvt_malloc((size_t)D + 1), *in = kvt_malloc((size_t)T + 1);
    int32_t *kept = kvt_malloc(((size_t)T + 1) * sizeof(int32_t));
    if (!qn || !kn || !ch || !pruned || !in || !kept) {
        st = kvt_error_set(KVT_ERR_NOMEM, "think: out of memory");
        goto out;
    }
    for (int h = 0; h < H && !st; h++) {
        const int g = kvt_ctx_kv_of(c, sel->per_query, h);
        query_channels(c, sel->per_query ? h : g * group, sel->per_query ? 1 : group, tw, qn);
        const float *K = c->k + (size_t)g * T * D;
        for (int b = 0; b < nb && !st; b++) {
            const int n = sel->count[(size_t)b * H + h];
            const int32_t *r = kvt_sel_ranking(sel, b, h);
            memset(in, 0, (size_t)T);
            for (int i = 0; i < n; i++)
                in[r[i]] = 1;
            int m = 0;
            for (int j = 0; j < T; j++)
                if (in[j])
                    kept[m++] = j;
            memset(kn, 0, (size_t)D * sizeof(double));
            for (int e = 0; e < m; e++)
                for (int d = 0; d < D; d++)
                    kn[d] += (double)K[(size_t)kept[e] * D + d] * K[(size_t)kept[e] * D + d];
            for (int d = 0; d < D; d++)
                ch[d] = (think_chan){qn[d] * (m ? kn[d] / m : 0.0), d};
            qsort(ch, (size_t)D, sizeof(*ch), cmp_chan);
            memset(pruned, 0, (size_t)D);
            for (int i = 0; i < n_prune; i++)
                pruned[ch[i].c] = 1;
            st = pruned_set(c, g, kept, m, lim, pruned, n_prune > 0,
                            &sel->merged[(size_t)b * H + h]);
        }
    }
out:
    kvt_free(qn);
    kvt_free(kn);
    kvt_free(ch);
    kvt_free(pruned);
    kvt_free(in);
    kvt_free(kept);
    return st;
}
