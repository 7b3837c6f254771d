/* policy_sparsemm.c - `sparsemm` (POLICIES §5) and `headkv` (§11): static per-head budgets from
 * an offline head score file (scores=FILE: JSON {"layer-head": number or [numbers]} or [[...]],
 * per query head, or per KV head when it has n_kv_heads columns). sigma = score / sum over all
 * L*Hq scores, summed per GQA group; cap = round(sigma*(b-min)*L*H' + min) (ties to even),
 * clamped to the prefix; ranking by the SnapKV score. The two differ in min:
 *   sparsemm  min = floor(ratio*b)          (ratio = 0.1);
 *   headkv    min = b - floor(b/beta)       (beta = head_beta = 1.01 in KVCache-Factory), i.e.
 *             cap = round(sigma*floor(b/beta)*L*H' + b - floor(b/beta)), per query head, with
 *             KVCache-Factory's HeadKVCluster defaults (kernel 7, max pooling).
 * The file's reader and the caps (kvt_head_scores_read, kvt_head_score_counts) are shared with
 * mixkv-sparsemm (policy_mixkv.c), which takes the SparseMM caps and ranks by MixKV's score. */
#include <math.h>
#include <string.h>

#include "../replay_internal.h"

static bool is_headkv(const kvt_policy *p)
{
    return !strcmp(p->def->name, "headkv");
}

kvt_status kvt_head_scores_read(const kvt_policy *p, kvt_head_scores *hs)
{
    const char *name = p->def->name;
    KVT_RETURN_IF(!p->o.scores, KVT_ERR_INVALID_ARG,
                  "%s needs scores=FILE, a JSON head-score table (see analysis/RESULTS.md)", name);
    kvt_status st = kvt_read_head_table(p->o.scores, &hs->n_layers, &hs->n_heads, &hs->score);
    if (st) {
        size_t n = strlen(p->o.scores);
        if (n > 4 && !strcmp(p->o.scores + n - 4, ".npy")) /* per-token scores: external's */
            return kvt_error_set(st,
                                 "%s: %s (%s takes a JSON table of per-head scores; per-token "
                                 "scores in a .npy file are for the external policy)",
                                 name, kvt_error_msg(), name);
        return st;
    }
    return KVT_OK;
}

kvt_status kvt_head_score_counts(const kvt_layer_ctx *c, const kvt_policy *p,
                                 const kvt_head_scores *hs, const int *B, int n_b,
                                 kvt_layer_selection *sel)
{
    const kvt_policy_opts *o = &p->o;
    const int L = c->n_layers, T = c->T, W = o->window, P = T - W;
    const char *name = p->def->name;
    KVT_RETURN_IF(hs->n_layers < L || (hs->n_heads != c->Hq && hs->n_heads != c->Hkv) ||
                      (o->per_query && hs->n_heads != c->Hq),
                  KVT_ERR_INVALID_ARG,
                  "%s: %s holds %d layers x %d heads; the model has %d layers, %d query "
                  "heads, %d KV heads",
                  name, o->scores, hs->n_layers, hs->n_heads, L, c->Hq, c->Hkv);
    double total = 0.0;
    for (int l = 0; l < L; l++)
        for (int h = 0; h < hs->n_heads; h++) {
            double x = hs->score[(size_t)l * hs->n_heads + h];
            KVT_RETURN_IF(isnan(x), KVT_ERR_INVALID_ARG, "%s: %s has no score for layer %d head %d",
                          name, o->scores, l, h);
            total += x;
        }
    KVT_RETURN_IF(!(total > 0.0), KVT_ERR_INVALID_ARG, "%s: scores in %s sum to %g", name,
                  o->scores, total);
    const int H = sel->n_heads, per = hs->n_heads / H; /* score columns per selection head */
    const bool headkv = is_headkv(p);
    for (int b = 0; b < n_b; b++) {
        int bb = B[b] - W;
        double mn = headkv ? bb - floor(bb / o->beta) : floor(o->ratio * bb);
        for (int h = 0; h < H; h++) {
            int cnt;
            if (T <= B[b]) /* B = T keeps everything, as for every policy */
                cnt = T;
            else if (bb <= 0)
                cnt = B[b];
            else {
                double sig = 0.0;
                for (int u = 0; u < per; u++)
                    sig += hs->score[(size_t)c->layer * hs->n_heads + h * per + u] / total;
                double cap = kvt_round_even(sig * (bb - mn) * L * H + mn);
                cap = cap < 0 ? 0 : (cap > P ? P : cap);
                cnt = W + (int)cap;
            }
            sel->count[(size_t)b * H + h] = cnt;
        }
    }
    return KVT_OK;
}

static kvt_status smm_init(kvt_policy *p)
{
    KVT_RETURN_IF(is_headkv(p) && !(p->o.beta >= 1.0), KVT_ERR_INVALID_ARG,
                  "headkv: beta=%g: must be at least 1 (min = b - floor(b/beta))", p->o.beta);
    kvt_head_scores *hs = kvt_calloc(1, sizeof(*hs));
    KVT_RETURN_IF(!hs, KVT_ERR_NOMEM, "out of memory");
    kvt_status st = kvt_head_scores_read(p, hs);
    if (st) {
        kvt_free(hs);
        return st;
    }
    p->state = hs;
    return KVT_OK;
}

static void smm_fini(kvt_policy *p)
{
    kvt_head_scores *hs = p->state;
    if (hs)
        kvt_free(hs->score);
    kvt_free(hs);
    p->state = NULL;
}

static kvt_status sel_smm(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                          kvt_layer_selection *sel)
{
    const kvt_policy_opts *o = &p->o;
    const double *s;
    KVT_FORWARD(kvt_ctx_check_window(c, p->def->name, o->window));
    KVT_FORWARD(
        kvt_ctx_window_scores(c, o->window, o->kernel, o->pool, o->reduce, o->per_query, &s));
    KVT_FORWARD(kvt_sel_init(sel, c, o->per_query, o->window, n_b, true));
    KVT_FORWARD(kvt_sel_rank_window_all(sel, s, o->window));
    return kvt_head_score_counts(c, p, p->state, B, n_b, sel);
}

static void d_headkv(kvt_policy_opts *o)
{
    o->window = 32;
    o->kernel = 7;
    o->pool = KVT_POOL_MAX;
    o->per_query = true; /* HeadKVCluster keeps a set per query head */
    o->beta = 1.01;
}

const kvt_policy_def kvt_policy_def_headkv = {
    .name = "headkv",
    .summary = "HeadKV: static head budgets from offline retrieval-reasoning head scores "
               "(scores=FILE)",
    .flags = KVT_POLICY_WINDOW_QUERY | KVT_POLICY_LAYER_BUDGETS,
    .keys = "window,kernel,pool,reduce,heads,beta,scores",
    .defaults = d_headkv,
    .init = smm_init,
    .fini = smm_fini,
    .select = sel_smm,
};

const kvt_policy_def kvt_policy_def_sparsemm = {
    .name = "sparsemm",
    .summary = "SparseMM: static head budgets from offline head scores (scores=FILE)",
    .flags = KVT_POLICY_WINDOW_QUERY | KVT_POLICY_LAYER_BUDGETS,
    .keys = "window,kernel,pool,reduce,heads,ratio,scores",
    .init = smm_init,
    .fini = smm_fini,
    .select = sel_smm,
};
