/* policy_mixkv.c - `mixkv-snapkv`, `mixkv-pyramidkv`, `mixkv-adakv`, `mixkv-sparsemm`
 * (POLICIES §4): rank by c = r*d' + (1-r)*(p + v') where p is the SnapKV score, v' the min-max
 * VNorm and d' the min-max KeyDiff diversity, both rescaled to mean(p), and r the head
 * redundancy (online from this prompt's keys by default, clamped to [0,1]; rtable=FILE for an
 * offline table keyed "layer-kvhead[-key]"). method= gives MixKV's ablations instead (§4.4):
 * attn p, keydiff d', vnorm p + v', knorm p + k' (k': v' of the negative key norms), mixkv
 * 0.33 (d' + p + v'). The budget allocation is the base method's (§4.3):
 * AdaKV allocates from pure attention p, SparseMM from its offline head scores (scores=FILE,
 * the caps of policy_sparsemm.c), and each head keeps its top-cap by c. One file for the four
 * variants: they share all. */
#include <math.h>

#include "../replay_internal.h"

typedef struct mix_state {
    int L, H;
    double *r;          /* [L, H] offline redundancy, or NULL (online r) */
    kvt_head_scores hs; /* mixkv-sparsemm's head scores (score NULL for the others) */
} mix_state;

static bool is_mix_sparsemm(const kvt_policy *p)
{
    return p->def == &kvt_policy_def_mixkv_sparsemm;
}

static kvt_status mix_init(kvt_policy *p)
{
    const bool smm = is_mix_sparsemm(p);
    if (!p->o.rtable && !smm)
        return KVT_OK;
    mix_state *s = kvt_calloc(1, sizeof(*s));
    KVT_RETURN_IF(!s, KVT_ERR_NOMEM, "out of memory");
    kvt_status st = KVT_OK;
    if (smm) {
        st = kvt_head_scores_read(p, &s->hs);
        if (st)
            goto out_free;
    }
    if (p->o.rtable) {
        st = kvt_read_head_table(p->o.rtable, &s->L, &s->H, &s->r);
        if (st)
            goto out_free;
    }
    p->state = s;
    return KVT_OK;
out_free:
    kvt_free(s->hs.score);
    kvt_free(s);
    return st;
}

static void mix_fini(kvt_policy *p)
{
    mix_state *s = p->state;
    if (s) {
        kvt_free(s->r);
        kvt_free(s->hs.score);
    }
    kvt_free(s);
    p->state = NULL;
}

/* u [P] min-max scaled over P (no epsilon: a flat u gives 0), then rescaled to mean mean_p,
 * into out: MixKV's v' (and k', of the negative key norms) */
static void minmax_to_mean(const double *u, int P, double sign, double mean_p, double *out)
{
    double mn = INFINITY, mx = -INFINITY, mu = 0.0;
    for (int j = 0; j < P; j++) {
        const double x = sign * u[j];
        mn = x < mn ? x : mn;
        mx = x > mx ? x : mx;
    }
    for (int j = 0; j < P; j++) {
        out[j] = mx > mn ? (sign * u[j] - mn) / (mx - mn) : 0.0;
        mu += out[j];
    }
    mu /= P;
    for (int j = 0; j < P; j++)
        out[j] = out[j] * mean_p / (mu + 1e-8);
}

/* composite score c [H', P] from pooled attention s [H', P] */
static kvt_status composite(kvt_layer_ctx *c, const kvt_policy *p, const double *s, double *out)
{
    KVT_FORWARD(kvt_ctx_fetch(c, KVT_CTX_KU));
    const kvt_policy_opts *o = &p->o;
    const mix_state *ms = p->state;
    const int T = c->T, D = c->D, W = o->window, P = T - W, H = kvt_ctx_heads(c, o->per_query);
    if (P <= 0)
        return KVT_OK;
    double *vn = kvt_malloc((size_t)P * sizeof(double)),
           *dv = kvt_malloc((size_t)P * sizeof(double));
    kvt_status st = KVT_OK;
    if (!vn || !dv) {
        st = kvt_error_set(KVT_ERR_NOMEM, "mixkv: out of memory");
        goto out_free;
    }
    for (int h = 0; h < H; h++) {
        int g = kvt_ctx_kv_of(c, o->per_query, h);
        const double *ph = s + (size_t)h * P;
        double mean_p = 0.0;
        for (int j = 0; j < P; j++)
            mean_p += ph[j];
        mean_p /= P;
        /* VNorm (or, method=knorm, the negative key norms): min-max over P */
        if (o->method == KVT_MIX_KNORM)
            minmax_to_mean(c->knorm + (size_t)g * T, P, -1.0, mean_p, vn);
        else
            minmax_to_mean(c->vnorm + (size_t)g * T, P, 1.0, mean_p, vn);
        /* KeyDiff: delta = -<unit key, mean unit key over all T>, min-max (+1e-8) over P */
        const double *m = c->kmean + (size_t)g * D;
        const float *ku = c->ku + (size_t)g * T * D;
        const bool m0 = kvt_ctx_mean_key_norm(c, g) == 0.0; /* no direction: every delta 0 */
        double mn = INFINITY, mx = -INFINITY, mu = 0.0;
        for (int j = 0; j < P; j++) {
            double d = 0.0;
            for (int e = 0; e < D && !m0; e++)
                d += (double)ku[(size_t)j * D + e] * m[e];
            dv[j] = -d;
            mn = dv[j] < mn ? dv[j] : mn;
            mx = dv[j] > mx ? dv[j] : mx;
        }
        for (int j = 0; j < P; j++) {
            dv[j] = (dv[j] - mn) / (mx - mn + 1e-8);
            mu += dv[j];
        }
        mu /= P;
        for (int j = 0; j < P; j++)
            dv[j] = dv[j] * mean_p / (mu + 1e-8);
        const bool headwise = o->method == KVT_MIX_HEADWISE; /* the only one weighing by r */
        double r = 0.0;
        if (headwise && ms && ms->r) {
            if (c->layer >= ms->L || g >= ms->H || isnan(ms->r[(size_t)c->layer * ms->H + g])) {
                st = kvt_error_set(KVT_ERR_NOT_FOUND,
                                   "%s: rtable %s has no entry for layer %d KV head %d",
                                   p->def->name, o->rtable, c->layer, g);
                goto out_free;
            }
            r = ms->r[(size_t)c->layer * ms->H + g];
        } else if (headwise) {
            r = c->r_all[g];
            r = isnan(r) ? 0.0 : (r < 0.0 ? 0.0 : (r > 1.0 ? 1.0 : r));
        }
        double *oh = out + (size_t)h * P;
        for (int j = 0; j < P; j++)
            switch (o->method) {
            case KVT_MIX_ATTN:
                oh[j] = ph[j];
                break;
            case KVT_MIX_KEYDIFF:
                oh[j] = dv[j];
                break;
            case KVT_MIX_VNORM:
            case KVT_MIX_KNORM: /* vn holds k' */
                oh[j] = ph[j] + vn[j];
                break;
            case KVT_MIX_FIXED: /* MixKV's constant, not 1/3 */
                oh[j] = 0.33 * (dv[j] + ph[j] + vn[j]);
                break;
            default:
                oh[j] = r * dv[j] + (1.0 - r) * (ph[j] + vn[j]);
            }
    }
out_free:
    kvt_free(vn);
    kvt_free(dv);
    return st;
}

static kvt_status sel_mix(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                          kvt_layer_selection *sel, char base)
{
    const kvt_policy_opts *o = &p->o;
    const double *s;
    KVT_FORWARD(kvt_ctx_check_window(c, p->def->name, o->window));
    KVT_FORWARD(
        kvt_ctx_window_scores(c, o->window, o->kernel, o->pool, o->reduce, o->per_query, &s));
    KVT_FORWARD(kvt_sel_init(sel, c, o->per_query, o->window, n_b, true));
    int P = c->T - o->window;
    double *cs = kvt_malloc(((size_t)sel->n_heads * (P > 0 ? P : 0) + 1) * sizeof(double));
    KVT_RETURN_IF(!cs, KVT_ERR_NOMEM, "mixkv: out of memory");
    kvt_status st = composite(c, p, s, cs);
    if (!st)
        st = kvt_sel_rank_window_all(sel, cs, o->window);
    kvt_free(cs);
    if (st)
        return st;
    if (base == 'a')
        return kvt_adakv_counts(c, o, s, B, n_b, sel);
    if (base == 'm') {
        const mix_state *ms = p->state;
        return kvt_head_score_counts(c, p, &ms->hs, B, n_b, sel);
    }
    for (int b = 0; b < n_b; b++) {
        int cnt = B[b] < c->T ? B[b] : c->T;
        if (base == 'p' && c->T >= B[b] && B[b] > o->window)
            cnt = o->window + kvt_pyramid_layer_budget(B[b], o->window, c->T, c->n_layers, c->layer,
                                                       o->beta, o->fallback);
        for (int h = 0; h < sel->n_heads; h++)
            sel->count[(size_t)b * sel->n_heads + h] = cnt < c->T ? cnt : c->T;
    }
    return KVT_OK;
}

static kvt_status sel_mix_snap(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                               kvt_layer_selection *sel)
{
    return sel_mix(c, p, B, n_b, sel, 's');
}

static kvt_status sel_mix_pyr(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                              kvt_layer_selection *sel)
{
    return sel_mix(c, p, B, n_b, sel, 'p');
}

static kvt_status sel_mix_ada(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                              kvt_layer_selection *sel)
{
    return sel_mix(c, p, B, n_b, sel, 'a');
}

static kvt_status sel_mix_smm(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                              kvt_layer_selection *sel)
{
    return sel_mix(c, p, B, n_b, sel, 'm');
}

const kvt_policy_def kvt_policy_def_mixkv_snapkv = {
    .name = "mixkv-snapkv",
    .host_reads = KVT_CTX_KU,
    .summary = "MixKV on SnapKV: importance x diversity, uniform budget",
    .flags = KVT_POLICY_WINDOW_QUERY,
    .keys = "window,kernel,pool,reduce,heads,rtable,method",
    .init = mix_init,
    .fini = mix_fini,
    .select = sel_mix_snap,
};

const kvt_policy_def kvt_policy_def_mixkv_pyramidkv = {
    .name = "mixkv-pyramidkv",
    .host_reads = KVT_CTX_KU,
    .summary = "MixKV on PyramidKV: importance x diversity, pyramid layer budgets",
    .flags = KVT_POLICY_WINDOW_QUERY | KVT_POLICY_LAYER_BUDGETS,
    .keys = "window,kernel,pool,reduce,heads,rtable,method,beta,fallback",
    .init = mix_init,
    .fini = mix_fini,
    .select = sel_mix_pyr,
};

const kvt_policy_def kvt_policy_def_mixkv_adakv = {
    .name = "mixkv-adakv",
    .host_reads = KVT_CTX_KU,
    .summary = "MixKV on AdaKV: allocation from attention, ranking by the mixture",
    .flags = KVT_POLICY_WINDOW_QUERY,
    .keys = "window,kernel,pool,reduce,heads,rtable,method,alpha,normalize,alloc,skip",
    .init = mix_init,
    .fini = mix_fini,
    .select = sel_mix_ada,
};

const kvt_policy_def kvt_policy_def_mixkv_sparsemm = {
    .name = "mixkv-sparsemm",
    .host_reads = KVT_CTX_KU,
    .summary = "MixKV on SparseMM: head budgets from offline head scores (scores=FILE), "
               "ranking by the mixture",
    .flags = KVT_POLICY_WINDOW_QUERY | KVT_POLICY_LAYER_BUDGETS,
    .keys = "window,kernel,pool,reduce,heads,rtable,method,ratio,scores",
    .init = mix_init,
    .fini = mix_fini,
    .select = sel_mix_smm,
};
