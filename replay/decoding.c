/* decoding.c - the caches of the policies that evict decode tokens too.
 *
 * decoding=N: kvpress's DecodingPress (presses/generation/decoding_press.py) over a policy
 * whose scores are its keys' own (knorm, keydiff, qfilter; simulate), or come from the queries
 * of the steps since the last compression (expected-attention: simulate, with what every head's
 * scores share prepared once by dec_begin), or the attention of the newest token's query,
 * averaged over the layer's query heads (tova; simulate_steps, one cache per layer, as
 * TOVAPress's scores are the layer's). The cache starts as the prompt-time set (the whole prompt;
 * with prefill=1 the policy's set at the budget, as PrefillDecodingPress with the same press at
 * prefill). Decode step s's token joins it, step s's query attends to it, and after every N-th step
 * (DecodingPress's forward hook, after the attention) a cache of more than B entries keeps the B
 * that the policy scores highest over the whole cache, prompt and decode tokens alike
 * (ScorerPress.compress at the ratio that keeps exactly B; ties to the earlier token, where
 * torch.topk leaves them unspecified). A cache of at most B entries is left as it is (ratio 0).
 *
 * dms_decoding=1: kvpress's DMSPress with decoding=True (dms_press.py) over knorm and qfilter
 * (simulate_dms): from the dms= set, the token leaving the sliding window after each step goes
 * if it scores below the threshold.
 *
 * A cache is held as each entry's last visible step. The decode metrics follow the caches: step s
 * is measured on the entries its query sees, from the full softmax's probabilities (the context's
 * over the prompt keys, exp(q.k*scale - lse) over the decode keys), as RESULTS.md defines recall
 * and output error. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "replay_internal.h"

void kvt_dec_free(kvt_layer_selection *sel)
{
    if (!sel->dec)
        return;
    for (int i = 0; i < sel->n_budgets * sel->n_heads; i++)
        kvt_free(sel->dec[i].last);
    kvt_free(sel->dec);
    sel->dec = NULL;
}

int kvt_dec_item_cmp(const void *a, const void *b)
{
    const kvt_dec_item *x = a, *y = b;
    if (x->s != y->s)
        return x->s > y->s ? -1 : 1;
    return (x->e > y->e) - (x->e < y->e);
}

const float *kvt_dec_entry_key(const kvt_layer_ctx *c, int g, int32_t e)
{
    return e < c->T ? c->k + ((size_t)g * c->T + (size_t)e) * c->D
                    : c->in->k_decode + ((size_t)g * c->Gd + (size_t)(e - c->T)) * c->D;
}

kvt_status kvt_dec_begin(const kvt_layer_ctx *c, const kvt_policy *p, int n_b,
                         kvt_layer_selection *sel)
{
    KVT_RETURN_IF(c->Gd > 0 && !c->has_extra, KVT_ERR_NOT_FOUND,
                  "%s: %s evicts decode tokens too, so it needs their keys and values "
                  "(K_decode, V_decode), which layer %d does not have",
                  p->def->name, kvt_policy_decode_option(p), c->layer);
    sel->dec_steps = c->Gd;
    sel->dec = kvt_calloc((size_t)n_b * sel->n_heads + 1, sizeof(kvt_dec_cache));
    KVT_RETURN_IF(!sel->dec, KVT_ERR_NOMEM, "%s: out of memory (decode caches)", p->def->name);
    return KVT_OK;
}

kvt_status kvt_dec_init(const kvt_layer_ctx *c, const kvt_policy *p, const int32_t *start, int n0,
                        kvt_dec_cache *dc)
{
    const int T = c->T, G = c->Gd;
    dc->last = kvt_malloc(((size_t)T + G) * sizeof(int32_t));
    KVT_RETURN_IF(!dc->last, KVT_ERR_NOMEM, "%s: out of memory (decode caches)", p->def->name);
    for (int e = 0; e < T + G; e++)
        dc->last[e] = e < T ? -1 : G - 1; /* a prompt token not kept at prefill: never seen */
    for (int i = 0; i < n0; i++)
        dc->last[start[i]] = G - 1;
    return KVT_OK;
}

/* the compression after step s's attention of a cache [n > B] whose entries score sc [n]: the B
   scoring highest (ties to the earlier token) stay, in cache[0..B) in that order; the others'
   last visible step is s. h names the head in an error (-1: the layer's cache). */
static kvt_status compress(const kvt_layer_ctx *c, const kvt_policy *p, int h, int s, int B,
                           const double *sc, int32_t *cache, int n, kvt_dec_item *it,
                           kvt_dec_cache *dc)
{
    const int T = c->T;
    for (int i = 0; i < n; i++) {
        const char *kind = cache[i] < T ? "prompt" : "decode";
        const int tok = cache[i] < T ? cache[i] : cache[i] - T;
        KVT_RETURN_IF(isnan(sc[i]) && h < 0, KVT_ERR_NAN,
                      "%s: decoding=: NaN score of %s token %d at layer %d", p->def->name, kind,
                      tok, c->layer);
        KVT_RETURN_IF(isnan(sc[i]), KVT_ERR_NAN,
                      "%s: decoding=: NaN score of %s token %d at layer %d, head %d", p->def->name,
                      kind, tok, c->layer, h);
        it[i] = (kvt_dec_item){sc[i], cache[i]};
    }
    qsort(it, (size_t)n, sizeof(*it), kvt_dec_item_cmp);
    for (int i = B; i < n; i++) /* evicted after step s's attention */
        dc->last[it[i].e] = s;
    for (int i = 0; i < B; i++)
        cache[i] = it[i].e;
    return KVT_OK;
}

/* one (budget, head)'s cache from the prompt-time set `start` [n0]: dc->last[e] the last step
   whose query sees entry e (prompt token e < T, decode token e - T). key_sc [T + G]: every
   entry's score when the press scores each key alone, else NULL: the cache is scored at each
   compression (keydiff's mean key) */
static kvt_status simulate(kvt_layer_ctx *c, const kvt_policy *p, int h, int B,
                           const int32_t *start, int n0, const double *key_sc, kvt_dec_cache *dc,
                           int32_t *cache, kvt_dec_item *it, const float **kp, double *sc,
                           double *work)
{
    const int T = c->T, G = c->Gd, N = p->o.decoding, g = kvt_ctx_kv_of(c, p->o.per_query, h);
    int n = n0, since = 0;
    KVT_FORWARD(kvt_dec_init(c, p, start, n0, dc));
    memcpy(cache, start, (size_t)n0 * sizeof(int32_t));
    for (int s = 0; s < G; s++) {
        cache[n++] = T + s;
        if (++since < N)
            continue;
        since = 0;
        if (n <= B)
            continue; /* DecodingPress's ratio 0: nothing evicted */
        if (key_sc)
            for (int i = 0; i < n; i++)
                sc[i] = key_sc[cache[i]];
        else {
            for (int i = 0; i < n; i++)
                kp[i] = kvt_dec_entry_key(c, g, cache[i]);
            KVT_FORWARD(p->def->cache_scores(c, p, h, s, cache, kp, n, sc, work));
        }
        KVT_FORWARD(compress(c, p, h, s, B, sc, cache, n, it, dc));
        n = B;
    }
    return KVT_OK;
}

/* decoding= over a policy scoring by step s's queries (step_scores: tova): every budget's cache,
   one per layer (the policy's set is the same in every head), stepped together, so that each
   query head's logit of step s is computed once for the entries any cache holds; the caches go
   to sel->dec's head 0 of each budget */
static kvt_status simulate_steps(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                                 kvt_layer_selection *sel)
{
    const int T = c->T, G = c->Gd, N = p->o.decoding, Hq = c->Hq, D = c->D, H = sel->n_heads;
    const size_t nmax = (size_t)T + (size_t)G + 1;
    int32_t *caches = kvt_malloc((size_t)n_b * nmax * sizeof(int32_t));
    int32_t *stamp = kvt_malloc(nmax * sizeof(int32_t)); /* the step whose logits z holds */
    int *n = kvt_malloc(((size_t)n_b + 1) * sizeof(int));
    double *z = kvt_malloc((size_t)Hq * nmax * sizeof(double)),
           *sc = kvt_malloc(nmax * sizeof(double)),
           *zg = kvt_malloc(nmax * (size_t)c->Gs * sizeof(double));
    float *qt = kvt_malloc((size_t)Hq * D * sizeof(float)); /* step s's queries, [g][D][Gs] */
    const float **kp = kvt_malloc(nmax * sizeof(float *));
    int32_t *todo = kvt_malloc(nmax * sizeof(int32_t)); /* entries without step s's logits */
    kvt_dec_item *it = kvt_malloc(nmax * sizeof(kvt_dec_item));
    kvt_status st = KVT_OK;
    if (!caches || !stamp || !n || !z || !sc || !zg || !qt || !kp || !todo || !it)
        st = kvt_error_set(KVT_ERR_NOMEM, "%s: decoding=: out of memory", p->def->name);
    for (int b = 0; b < n_b && !st; b++) {
        n[b] = sel->count[(size_t)b * H];
        memcpy(caches + (size_t)b * nmax, kvt_sel_ranking(sel, b, 0),
               (size_t)n[b] * sizeof(int32_t));
        st = kvt_dec_init(c, p, caches + (size_t)b * nmax, n[b], &sel->dec[(size_t)b * H]);
    }
    for (size_t e = 0; e < nmax && !st; e++)
        stamp[e] = -1;
    for (int s = 0, since = 0; s < G && !st; s++) {
        for (int b = 0; b < n_b; b++)
            caches[(size_t)b * nmax + n[b]++] = T + s;
        if (++since < N)
            continue;
        since = 0;
        for (int u = 0; u < Hq; u++) { /* each group's queries transposed, for kvt_dot_queries */
            const float *q = c->in->q_decode + ((size_t)u * G + (size_t)s) * D;
            float *t = qt + (size_t)(u / c->Gs) * D * c->Gs + u % c->Gs;
            for (int d = 0; d < D; d++)
                t[(size_t)d * c->Gs] = q[d];
        }
        for (int b = 0; b < n_b && !st; b++) {
            int32_t *cache = caches + (size_t)b * nmax;
            if (n[b] <= B[b])
                continue; /* DecodingPress's ratio 0: nothing evicted */
            int nt = 0;
            for (int i = 0; i < n[b]; i++) {
                const int32_t e = cache[i];
                if (stamp[e] != s)
                    todo[nt++] = e;
                stamp[e] = s;
            }
            for (int g = 0; g < c->Hkv; g++) { /* each logit summed over d in order */
                for (int i = 0; i < nt; i++)
                    kp[i] = kvt_dec_entry_key(c, g, todo[i]);
                kvt_dot_queries(qt + (size_t)g * D * c->Gs, c->Gs, D, kp, nt, zg);
                for (int i = 0; i < nt; i++)
                    for (int x = 0; x < c->Gs; x++)
                        z[(size_t)(g * c->Gs + x) * nmax + (size_t)todo[i]] =
                            zg[(size_t)i * c->Gs + x] * c->scale;
            }
            st = p->def->step_scores(c, p, s, z, nmax, cache, n[b], sc);
            if (!st)
                st = compress(c, p, -1, s, B[b], sc, cache, n[b], it, &sel->dec[(size_t)b * H]);
            n[b] = B[b];
        }
    }
    kvt_free(caches);
    kvt_free(stamp);
    kvt_free(n);
    kvt_free(z);
    kvt_free(sc);
    kvt_free(zg);
    kvt_free(qt);
    kvt_free(kp);
    kvt_free(todo);
    kvt_free(it);
    return st;
}

/* dms_decoding=1: kvpress's DMSPress(decoding=True) from its prefill set `start` [n0] (dms=,
   capped at the budget): each token's score key_sc[e] is the press's of its key alone (knorm,
   qfilter), and after step s's attention the token T + s - dms_window leaves the sliding
   window, evicted if it is still cached and scores below the threshold */
static kvt_status simulate_dms(kvt_layer_ctx *c, const kvt_policy *p, int h, const int32_t *start,
                               int n0, const double *key_sc, kvt_dec_cache *dc)
{
    const int T = c->T, G = c->Gd;
    KVT_FORWARD(kvt_dec_init(c, p, start, n0, dc));
    for (int s = 0; s < G; s++) {
        const int e = T + s - p->o.dms_window;
        if (e < 0 || dc->last[e] < s)
            continue; /* none leaves yet, or it was not kept at prefill */
        KVT_RETURN_IF(isnan(key_sc[e]), KVT_ERR_NAN,
                      "%s: dms_decoding=: NaN score of %s token %d at layer %d, head %d "
                      "(DMSPress would keep it)",
                      p->def->name, e < T ? "prompt" : "decode", e < T ? e : e - T, c->layer, h);
        if (key_sc[e] < p->o.dms)
            dc->last[e] = s;
    }
    return KVT_OK;
}

kvt_status kvt_sel_decoding(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                            kvt_layer_selection *sel)
{
    const int T = c->T, G = c->Gd, H = sel->n_heads;
    KVT_RETURN_IF(!sel->has_fixed || sel->merged || sel->step_head, KVT_ERR_STATE,
                  "%s: decoding=: internal error: not a plain kept set", p->def->name);
    KVT_FORWARD(kvt_dec_begin(c, p, n_b, sel));
    if (p->o.decoding > 0 && !p->o.decode_prefill) /* DecodingPress alone: the prompt whole */
        for (int i = 0; i < n_b * H; i++)
            sel->count[i] = T;
    if (G == 0)
        return KVT_OK;
    KVT_FORWARD(kvt_ctx_fetch(c, KVT_CTX_KV));
    /* a press that scores each key alone (knorm, qfilter; dms_decoding's presses): every
       entry's score once per head, [H, T + G], for all budgets and compressions */
    const bool per_key = p->def->cache_scores_per_key;
    KVT_RETURN_IF(p->o.dms_decoding && !per_key, KVT_ERR_STATE,
                  "%s: dms_decoding=: internal error: the press scores keys with the cache",
                  p->def->name);
    const size_t nmax = (size_t)T + (size_t)G + 1;
    int32_t *cache = kvt_malloc(nmax * sizeof(int32_t));
    kvt_dec_item *it = kvt_malloc(nmax * sizeof(kvt_dec_item));
    const float **kp = kvt_malloc(nmax * sizeof(float *));
    double *sc = kvt_malloc(nmax * sizeof(double)),
           *work = kvt_malloc(2 * (size_t)c->D * sizeof(double));
    double *key_sc = per_key ? kvt_malloc((size_t)H * (T + G) * sizeof(double) + 1) : NULL;
    kvt_status st = KVT_OK;
    if (!cache || !it || !kp || !sc || !work || (per_key && !key_sc))
        st = kvt_error_set(KVT_ERR_NOMEM, "%s: decoding=: out of memory", p->def->name);
    for (int h = 0; h < H && per_key && !st; h++) {
        const int g = kvt_ctx_kv_of(c, p->o.per_query, h);
        for (int e = 0; e < T + G; e++) {
            cache[e] = e;
            kp[e] = kvt_dec_entry_key(c, g, e);
        }
        st =
            p->def->cache_scores(c, p, h, -1, cache, kp, T + G, key_sc + (size_t)h * (T + G), work);
    }
    if (p->def->step_scores && !st) /* one cache per layer, each head a copy of head 0's */
        st = simulate_steps(c, p, B, n_b, sel);
    if (p->def->dec_begin && !st)
        st = p->def->dec_begin(c, p);
    for (int b = 0; b < n_b && !st; b++)
        for (int h = 0; h < H && !st; h++) {
            const int n0 = sel->count[(size_t)b * H + h];
            const int32_t *start = kvt_sel_ranking(sel, b, h);
            kvt_dec_cache *dc = &sel->dec[(size_t)b * H + h];
            const double *ks = per_key ? key_sc + (size_t)h * (T + G) : NULL;
            /* heads=query over scores of the KV head's keys alone: a query head starting from
               its group's first head's set has that head's cache; a layer's cache
               (simulate_steps) is head 0's in every head */
            const bool layer = p->def->step_scores != NULL;
            if (layer && h == 0)
                continue;
            const int h0 = layer ? 0 : p->o.per_query ? h - h % c->Gs : h;
            const bool same =
                h0 < h && sel->count[(size_t)b * H + h0] == n0 &&
                !memcmp(kvt_sel_ranking(sel, b, h0), start, (size_t)n0 * sizeof(int32_t));
            if (layer && !same)
                st = kvt_error_set(KVT_ERR_STATE,
                                   "%s: decoding=: internal error: head %d's set is not the "
                                   "layer's",
                                   p->def->name, h);
            else if (same && (layer || p->def->cache_scores_kv)) {
                const int32_t *src = sel->dec[(size_t)b * H + h0].last;
                if (!(dc->last = kvt_malloc(((size_t)T + G) * sizeof(int32_t))))
                    st = kvt_error_set(KVT_ERR_NOMEM, "%s: out of memory", p->def->name);
                else
                    memcpy(dc->last, src, ((size_t)T + G) * sizeof(int32_t));
            } else
                st = p->o.dms_decoding
                         ? simulate_dms(c, p, h, start, n0, ks, dc)
                         : simulate(c, p, h, B[b], start, n0, ks, dc, cache, it, kp, sc, work);
        }
    if (p->def->dec_end)
        p->def->dec_end(c);
    kvt_free(cache);
    kvt_free(it);
    kvt_free(kp);
    kvt_free(sc);
    kvt_free(work);
    kvt_free(key_sc);
    return st;
}

int kvt_dec_visible(const kvt_layer_selection *sel, int b, int h, int s, int32_t *out)
{
    const int T = sel->T;
    const int32_t *last = sel->dec[(size_t)b * sel->n_heads + h].last;
    int n = 0;
    for (int e = 0; e <= T + s; e++)
        if (last[e] >= s) { /* (a decode token after step s is not born yet) */
            if (out)
                out[n] = e;
            n++;
        }
    return n;
}

void kvt_dec_probs_heads(const kvt_layer_ctx *c, int u0, int nu, int s, const float *const *kp,
                         float *qt, double *z, double *out, size_t ostride)
{
    const int D = c->D, G = c->Gd;
    for (int x = 0; x < nu; x++) {
        const float *q = c->in->q_decode + ((size_t)(u0 + x) * G + (size_t)s) * D;
        for (int e = 0; e < D; e++)
            qt[(size_t)e * nu + x] = q[e];
    }
    kvt_dot_queries(qt, nu, D, kp, s + 1, z);
    for (int x = 0; x < nu; x++) {
        const double lse = c->lsed[(size_t)(u0 + x) * G + (size_t)s];
        double *o = out + (size_t)x * ostride;
        for (int d = 0; d <= s; d++)
            o[d] = exp(z[(size_t)d * nu + x] * c->scale - lse);
    }
}

/* One decode step of one selection head as kvt_dec_metrics measures every cache at it: what is
 * the same for every cache, and the workspace */
typedef struct dec_step {
    int s, u0, nu;                /* the step; the query heads measured: u0 .. u0 + nu - 1 */
    const float *V, *Vd;          /* the KV head's prompt and decode values */
    const float **prow;           /* [nu] each query head's probability row over the prompt */
    const double *pdec;           /* [nu, G + 1] and over the decode keys 0..s */
    const double *o, *Z;          /* [nu, D], [nu] the full outputs and their masses */
    int32_t *vis, *comp;          /* [T + G + 1] each */
    double *oS, *mass, *pw, *tmp; /* [nu, D], [nu], [nu], [D] */
} dec_step;

/* (budget b, head h)'s cache of sel at the step: its prompt entries added to *kept, each query
 * head's recall and output error to *rec and *err */
static void cache_step(const kvt_layer_ctx *c, const kvt_layer_selection *sel, int b, int h,
                       const dec_step *t, double *rec, double *err, double *kept)
{
    const int T = c->T, D = c->D, G = sel->dec_steps, nu = t->nu;
    int32_t *vis = t->vis, *comp = t->comp;
    double *oS = t->oS, *mass = t->mass, *pw = t->pw, *tmp = t->tmp;
    const int n = kvt_dec_visible(sel, b, h, t->s, vis);
    int np = 0;
    while (np < n && vis[np] < T)
        np++;
    *kept += np;
    /* more than half the prompt seen: its part summed as the whole prompt's (ad, rsd) less the
       tokens not seen (comp, ascending) */
    const bool less = np > T / 2;
    int nc = 0;
    for (int j = 0, i = 0; less && j < T; j++) {
        if (i < np && vis[i] == j)
            i++;
        else
            comp[nc++] = j;
    }
    /* each entry's value row read once for the group's query heads (each head's sums in the
       same order as alone) */
    for (int x = 0; x < nu; x++) {
        const size_t r = (size_t)(t->u0 + x) * c->Gd + (size_t)t->s;
        double *sx = oS + (size_t)x * D;
        mass[x] = less ? c->rsd[r] : 0.0;
        for (int e = 0; e < D; e++)
            sx[e] = less ? c->ad[r * D + e] : 0.0;
    }
    for (int i = 0; i < nc; i++) { /* s - p*v is s + (-p)*v, bit for bit */
        for (int x = 0; x < nu; x++) {
            const double pj = t->prow[x][comp[i]];
            mass[x] -= pj;
            pw[x] = -pj;
        }
        kvt_accum_rows(oS, nu, D, pw, t->V + (size_t)comp[i] * D);
    }
    for (int i = less ? np : 0; i < n; i++) {
        const int j = vis[i];
        for (int x = 0; x < nu; x++) {
            pw[x] = j < T ? (double)t->prow[x][j] : t->pdec[(size_t)x * (G + 1) + (size_t)(j - T)];
            mass[x] += pw[x];
        }
        kvt_accum_rows(oS, nu, D, pw, j < T ? t->V + (size_t)j * D : t->Vd + (size_t)(j - T) * D);
    }
    for (int x = 0; x < nu; x++) {
        const double *ox = t->o + (size_t)x * D, *sx = oS + (size_t)x * D, Z = t->Z[x];
        double dn = 0.0, on = 0.0;
        for (int e = 0; e < D; e++) {
            const double oe = ox[e] / Z;
            tmp[e] = mass[x] > 0.0 ? sx[e] / mass[x] - oe : -oe;
            dn += tmp[e] * tmp[e];
            on += oe * oe;
        }
        *rec += Z > 0.0 ? mass[x] / Z : 0.0;
        *err += mass[x] > 0.0 ? (on > 0.0 ? sqrt(dn / on) : 0.0) : 1.0;
    }
}

kvt_status kvt_dec_metrics(kvt_layer_ctx *c, const kvt_layer_selection *const *sels,
                           kvt_head_metrics *const *ms, int n_sel, size_t stride)
{
    if (n_sel < 1 || sels[0]->dec_steps == 0)
        return KVT_OK;
    const kvt_layer_selection *sel0 = sels[0];
    const int T = c->T, D = c->D, G = sel0->dec_steps, H = sel0->n_heads;
    int n_bs = 0; /* the budgets of all selections */
    for (int k = 0; k < n_sel; k++) {
        KVT_RETURN_IF(!sels[k]->per_query != !sel0->per_query || sels[k]->dec_steps != G,
                      KVT_ERR_INVALID_ARG, "decoding=: metrics of unlike selections at once");
        n_bs += sels[k]->n_budgets;
    }
    KVT_FORWARD(kvt_ctx_fetch(c, KVT_CTX_PRD | KVT_CTX_KV));
    const int NU = sel0->per_query ? 1 : c->Gs; /* the query heads measured per selection head */
    const size_t nmax = (size_t)T + (size_t)G + 1;
    int32_t *vis = kvt_malloc(nmax * sizeof(int32_t)), *comp = kvt_malloc(nmax * sizeof(int32_t));
    /* per query head of the group: step s's decode probabilities [G + 1], the full output and
       its mass (o, Z), the cache's (oS, mass); per budget of each selection rec, err, kept */
    double *pdec = kvt_malloc((size_t)NU * ((size_t)G + 1) * sizeof(double));
    double *o =
        kvt_malloc((3 * (size_t)NU * D + 4 * (size_t)NU + 3 * (size_t)n_bs) * sizeof(double));
    /* kvt_dec_probs_heads' key rows and workspace; step s's prompt probability row of each
       query head */
    const float **kp = kvt_malloc(((size_t)G + 1) * sizeof(*kp));
    const float **prow = kvt_malloc((size_t)NU * sizeof(*prow));
    float *qt = kvt_malloc((size_t)NU * D * sizeof(float));
    double *zq = kvt_malloc((size_t)NU * ((size_t)G + 1) * sizeof(double));
    kvt_status st = KVT_OK;
    if (!vis || !comp || !pdec || !o || !kp || !prow || !qt || !zq) {
        st = kvt_error_set(KVT_ERR_NOMEM, "decoding=: out of memory (metrics)");
        goto out;
    }
    double *oS = o + (size_t)NU * D, *tmp = oS + (size_t)NU * D, *Z = tmp + (size_t)NU * D;
    double *mass = Z + NU, *pw = mass + NU; /* pw [NU] one entry's weight in each head's sum */
    double *rec = pw + NU, *err = rec + n_bs, *kept = err + n_bs; /* [n_bs] each */
    dec_step t = {.nu = NU,
                  .prow = prow,
                  .pdec = pdec,
                  .o = o,
                  .Z = Z,
                  .vis = vis,
                  .comp = comp,
                  .oS = oS,
                  .mass = mass,
                  .pw = pw,
                  .tmp = tmp};
    for (int h = 0; h < H; h++) {
        const int g = kvt_ctx_kv_of(c, sel0->per_query, h);
        t.u0 = sel0->per_query ? h : g * c->Gs;
        t.V = c->v + (size_t)g * T * D;
        t.Vd = c->in->v_decode + (size_t)g * G * D;
        if ((st = kvt_ctx_prd_group(c, g)))
            goto out;
        for (int d = 0; d < G; d++)
            kp[d] = kvt_dec_entry_key(c, g, T + d);
        for (int b = 0; b < n_bs; b++)
            rec[b] = err[b] = kept[b] = 0.0;
        for (int s = 0; s < G; s++) {
            /* the full output of each query head at step s: the prompt's part (ad) and the
               decode keys' (the same for every budget and selection) */
            for (int x = 0; x < NU; x++) {
                const size_t r = (size_t)(t.u0 + x) * c->Gd + (size_t)s;
                double *ox = o + (size_t)x * D;
                Z[x] = c->rsd[r];
                for (int e = 0; e < D; e++)
                    ox[e] = c->ad[r * D + e];
                prow[x] = kvt_ctx_prd_row(c, r);
            }
            kvt_dec_probs_heads(c, t.u0, NU, s, kp, qt, zq, pdec, (size_t)G + 1);
            for (int d = 0; d <= s; d++) { /* every head's sums over d in order, as alone */
                for (int x = 0; x < NU; x++) {
                    pw[x] = pdec[(size_t)x * (G + 1) + (size_t)d];
                    Z[x] += pw[x];
                }
                kvt_accum_rows(o, NU, D, pw, t.Vd + (size_t)d * D);
            }
            t.s = s;
            for (int k = 0, b0 = 0; k < n_sel; b0 += sels[k]->n_budgets, k++)
                for (int b = 0; b < sels[k]->n_budgets; b++)
                    cache_step(c, sels[k], b, h, &t, &rec[b0 + b], &err[b0 + b], &kept[b0 + b]);
        }
        for (int k = 0, b0 = 0; k < n_sel; b0 += sels[k]->n_budgets, k++)
            for (int b = 0; b < sels[k]->n_budgets; b++) {
                kvt_head_metrics *hm = &ms[k][(size_t)b * stride + (size_t)h];
                hm->recall_decode = rec[b0 + b] / ((double)G * NU);
                hm->err_decode = err[b0 + b] / ((double)G * NU);
                hm->n_keep = kept[b0 + b] / G;
            }
    }
out:
    kvt_free(vis);
    kvt_free(comp);
    kvt_free(pdec);
    kvt_free(o);
    kvt_free(kp);
    kvt_free(prow);
    kvt_free(qt);
    kvt_free(zq);
    return st;
}
