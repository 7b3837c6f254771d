/* policy_lightkv.c - `lightkv-like` (POLICIES §10 "LightKV-like KV merge", an offline proxy):
 * merges vision K/V of the prefix instead of selecting. Per head and budget B:
 *   w_i   = attention to token i from the text window queries (all window queries if none is
 *           text), summed over every query head of the layer (POLICIES §10's proxy:
 *           Σ_h Σ_{i' in window} Pr[i', i], as the original weighs one hidden state for all
 *           heads), so every head merges with the same weights;
 *   target vision entries = max(1, B - (T - n_vision)); while above it, one bipartite round:
 *           the current vision entries (in token order) are cut into runs of merge_window;
 *           within a run, even positions are sources and odd positions destinations; each
 *           source's best destination is the one of highest key cosine (ties: lower index);
 *           the sources of highest similarity over all runs (ties: lower token index), at
 *           most the excess, merge into their destinations:
 *           x_dst = (w_dst x_dst + sum w_src x_src) / (w_dst + sum w_src) for K and V, and
 *           w_dst += sum w_src;
 *   text tokens and the window are never merged. A merged entry is reported under its
 *   destination's token index. Metrics use the merged K/V (POLICIES §13.7); attention recall
 *   is not defined for merged entries (null). Without vision tokens nothing changes. */
#include <math.h>
#include <string.h>

#include "../replay_internal.h"

static void d_light(kvt_policy_opts *o)
{
    o->window = 32;
}

/* cosine of two rows given the product of their norms (0 for a zero row) */
static double cos_rows(const float *a, const float *b, int D, double nn)
{
    double ab = 0;
    for (int d = 0; d < D; d++)
        ab += (double)a[d] * b[d];
    return nn > 1e-24 ? ab / nn : 0.0;
}

/* the vision entries of one head during merging */
typedef struct merge_state {
    float *k, *v; /* [n, D] */
    double *w;    /* [n] weights */
    int32_t *idx; /* [n] token index */
    uint8_t *chg; /* [n] the entry was a merge target in some round */
} merge_state;

typedef struct merge_buf {
    merge_state cur, tmp; /* tmp: a copy for a budget whose last round is partial */
    int32_t *dst;         /* [n] best destination position of each source (-1 none) */
    double *sim;          /* [n] its similarity */
    double *key;          /* [n] ranking key of candidates */
    int32_t *ord, *work;
    uint8_t *gone, *has;
    double *wk;          /* [n] accumulated weight */
    double *nrm;         /* [n] key norms of the current round */
    double *acck, *accv; /* [n, D] weighted sums of the destinations */
} merge_buf;

/* one round's candidates of state st (n entries): each source's best destination and the
 * sources ranked by similarity (ties: lower position = lower token index) into
 * rank = mb->work + n. Returns the number of candidates. */
static int round_candidates(merge_buf *mb, const merge_state *st, int n, int D, int MW)
{
    int n_cand = 0;
    for (int i = 0; i < n; i++) { /* norms once per round, not once per pair */
        double aa = 0.0;
        const float *ki = st->k + (size_t)i * D;
        for (int d = 0; d < D; d++)
            aa += (double)ki[d] * ki[d];
        mb->nrm[i] = sqrt(aa);
    }
    for (int r0 = 0; r0 < n; r0 += MW) {
        int r1 = r0 + MW < n ? r0 + MW : n;
        for (int s = r0; s < r1; s += 2) {
            mb->dst[s] = -1;
            double best = -INFINITY;
            for (int d = r0 + 1; d < r1; d += 2) {
                double x = cos_rows(st->k + (size_t)s * D, st->k + (size_t)d * D, D,
                                    mb->nrm[s] * mb->nrm[d]);
                if (x > best) {
                    best = x;
                    mb->dst[s] = d;
                }
            }
            if (mb->dst[s] >= 0)
                mb->sim[n_cand] = best, mb->ord[n_cand] = s, n_cand++;
        }
    }
    for (int i = 0; i < n_cand; i++)
        mb->key[i] = mb->sim[i];
    if (n_cand > 0)
        kvt_rank_desc_ref(mb->key, n_cand, mb->work + n, mb->work);
    return n_cand;
}

/* merge the `take` best candidates of the round into their destinations and compact st;
 * returns the new entry count */
static int round_apply(merge_buf *mb, merge_state *st, int n, int D, int take)
{
    const int32_t *rank = mb->work + n;
    memset(mb->gone, 0, (size_t)n);
    memset(mb->has, 0, (size_t)n);
    for (int d = 0; d < n; d++)
        mb->wk[d] = st->w[d];
    for (int i = 0; i < take; i++) {
        int s = mb->ord[rank[i]], d = mb->dst[s];
        mb->gone[s] = 1;
        double *ak = mb->acck + (size_t)d * D, *av = mb->accv + (size_t)d * D;
        if (!mb->has[d]) {
            mb->has[d] = 1;
            st->chg[d] = 1;
            for (int e = 0; e < D; e++) {
                ak[e] = st->w[d] * st->k[(size_t)d * D + e];
                av[e] = st->w[d] * st->v[(size_t)d * D + e];
            }
        }
        for (int e = 0; e < D; e++) {
            ak[e] += st->w[s] * st->k[(size_t)s * D + e];
            av[e] += st->w[s] * st->v[(size_t)s * D + e];
        }
        mb->wk[d] += st->w[s];
    }
    for (int d = 0; d < n; d++) {
        if (!mb->has[d] || !(mb->wk[d] > 0.0))
            continue; /* zero total weight: keep the destination unchanged */
        for (int e = 0; e < D; e++) {
            st->k[(size_t)d * D + e] = (float)(mb->acck[(size_t)d * D + e] / mb->wk[d]);
            st->v[(size_t)d * D + e] = (float)(mb->accv[(size_t)d * D + e] / mb->wk[d]);
        }
    }
    int m = 0; /* compact */
    for (int d = 0; d < n; d++) {
        if (mb->gone[d])
            continue;
        if (m != d) {
            memmove(st->k + (size_t)m * D, st->k + (size_t)d * D, D * sizeof(float));
            memmove(st->v + (size_t)m * D, st->v + (size_t)d * D, D * sizeof(float));
            st->idx[m] = st->idx[d];
        }
        st->chg[m] = st->chg[d];
        st->w[m] = mb->wk[d];
        m++;
    }
    return m;
}

/* the merged set: non-vision tokens unchanged + the n vision entries of st, by token index.
 * Only the changed entries (merge targets) carry their own K/V; the others are token idx's. */
static kvt_status emit(const kvt_layer_ctx *c, int P, const merge_state *st, int n, int n_vis,
                       kvt_merged_set *out)
{
    const int T = c->T, D = c->D;
    const uint8_t *mod = c->in->modality;
    int n_out = T - n_vis + n, n_chg = 0;
    for (int i = 0; i < n; i++)
        n_chg += st->chg[i] != 0;
    KVT_FORWARD(kvt_merged_alloc(out, n_out, n_chg, D));
    int vi = 0, o_i = 0, ci = 0;
    for (int j = 0; j < T; j++) {
        bool vis = j < P && mod && (mod[j] == 1 || mod[j] == 2);
        if (vis) {
            if (vi < n && st->idx[vi] == j) {
                if (st->chg[vi]) {
                    memcpy(out->k + (size_t)ci * D, st->k + (size_t)vi * D, D * sizeof(float));
                    memcpy(out->v + (size_t)ci * D, st->v + (size_t)vi * D, D * sizeof(float));
                    ci++;
                }
                out->changed[o_i] = st->chg[vi];
                out->idx[o_i++] = j;
                vi++;
            }
            continue;
        }
        out->idx[o_i++] = j;
    }
    return KVT_OK;
}

/* The merged sets of KV head g for every budget from one merging process: every budget runs
 * the same full rounds until the round that would take it below its target; that round is
 * its last and only partial, so it is applied to a copy (mb->tmp). out[b] gets budget b. */
static kvt_status merge_head(const kvt_layer_ctx *c, int g, const double *wt, const int *B, int n_b,
                             const kvt_policy_opts *o, merge_buf *mb, int *target,
                             kvt_merged_set *const *out)
{
    const int T = c->T, D = c->D, W = o->window, P = T - W, MW = o->merge_window;
    const uint8_t *mod = c->in->modality;
    merge_state *st = &mb->cur;
    int n = 0;
    for (int j = 0; j < P; j++)
        if (mod && (mod[j] == 1 || mod[j] == 2)) {
            memcpy(st->k + (size_t)n * D, c->k + ((size_t)g * T + j) * D, D * sizeof(float));
            memcpy(st->v + (size_t)n * D, c->v + ((size_t)g * T + j) * D, D * sizeof(float));
            st->w[n] = wt[j];
            st->idx[n] = j;
            st->chg[n] = 0;
            n++;
        }
    const int n_vis = n;
    int left = n_b;
    for (int b = 0; b < n_b; b++) {
        target[b] = B[b] - (T - n_vis);
        if (target[b] < 1)
            target[b] = 1;
        if (T <= B[b])
            target[b] = n_vis;
    }
    while (left > 0) {
        for (int b = 0; b < n_b; b++) /* reached: the current state is the set */
            if (target[b] >= 0 && n <= target[b]) {
                KVT_FORWARD(emit(c, P, st, n, n_vis, out[b]));
                target[b] = -1, left--;
            }
        if (left == 0)
            break;
        int n_cand = round_candidates(mb, st, n, D, MW);
        for (int b = 0; b < n_b; b++) {
            if (target[b] < 0 || (n_cand > 0 && n - target[b] >= n_cand))
                continue;
            /* no candidate left (keep the current state) or a partial last round */
            int m = n;
            if (n_cand > 0) {
                merge_state *t = &mb->tmp;
                memcpy(t->k, st->k, (size_t)n * D * sizeof(float));
                memcpy(t->v, st->v, (size_t)n * D * sizeof(float));
                memcpy(t->w, st->w, (size_t)n * sizeof(double));
                memcpy(t->idx, st->idx, (size_t)n * sizeof(int32_t));
                memcpy(t->chg, st->chg, (size_t)n);
                m = round_apply(mb, t, n, D, n - target[b]);
                KVT_FORWARD(emit(c, P, t, m, n_vis, out[b]));
            } else
                KVT_FORWARD(emit(c, P, st, m, n_vis, out[b]));
            target[b] = -1, left--;
        }
        if (left == 0)
            break;
        n = round_apply(mb, st, n, D, n_cand); /* a full round, shared by the rest */
    }
    return KVT_OK;
}

/* out = a copy of src (heads=query: the query heads of one KV head merge alike) */
static kvt_status merged_copy(const kvt_merged_set *src, int D, kvt_merged_set *out)
{
    KVT_FORWARD(kvt_merged_alloc(out, src->n, src->n_changed, D));
    memcpy(out->k, src->k, (size_t)src->n_changed * D * sizeof(float));
    memcpy(out->v, src->v, (size_t)src->n_changed * D * sizeof(float));
    memcpy(out->idx, src->idx, (size_t)src->n * sizeof(int32_t));
    memcpy(out->changed, src->changed, (size_t)src->n);
    return KVT_OK;
}

static kvt_status sel_light(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                            kvt_layer_selection *sel)
{
    KVT_FORWARD(kvt_ctx_fetch(c, KVT_CTX_PRW | KVT_CTX_KV));
    const kvt_policy_opts *o = &p->o;
    const int T = c->T, D = c->D, W = o->window;
    KVT_FORWARD(kvt_ctx_check_window(c, "lightkv-like", W));
    KVT_FORWARD(kvt_sel_init(sel, c, o->per_query, W, n_b, false));
    KVT_FORWARD(kvt_sel_init_merged(sel));
    const int H = sel->n_heads;
    merge_buf mb = {0};
    double *wt = kvt_calloc((size_t)T, sizeof(double));
    int *target = kvt_malloc((size_t)n_b * sizeof(int));
    kvt_merged_set **outs = kvt_malloc((size_t)n_b * sizeof(*outs));
    merge_state *sts[2] = {&mb.cur, &mb.tmp};
    bool ok = wt && target && outs;
    for (int i = 0; i < 2; i++) {
        sts[i]->k = kvt_malloc((size_t)T * D * sizeof(float));
        sts[i]->v = kvt_malloc((size_t)T * D * sizeof(float));
        sts[i]->w = kvt_malloc((size_t)T * sizeof(double));
        sts[i]->idx = kvt_malloc((size_t)T * sizeof(int32_t));
        sts[i]->chg = kvt_malloc((size_t)T);
        ok = ok && sts[i]->k && sts[i]->v && sts[i]->w && sts[i]->idx && sts[i]->chg;
    }
    mb.wk = kvt_malloc((size_t)T * sizeof(double));
    mb.nrm = kvt_malloc((size_t)T * sizeof(double));
    mb.sim = kvt_malloc((size_t)T * sizeof(double));
    mb.key = kvt_malloc((size_t)T * sizeof(double));
    mb.dst = kvt_malloc((size_t)T * sizeof(int32_t));
    mb.ord = kvt_malloc((size_t)T * sizeof(int32_t));
    mb.work = kvt_malloc((size_t)2 * T * sizeof(int32_t));
    mb.gone = kvt_malloc((size_t)T);
    mb.has = kvt_malloc((size_t)T);
    mb.acck = kvt_malloc((size_t)T * D * sizeof(double));
    mb.accv = kvt_malloc((size_t)T * D * sizeof(double));
    kvt_status st = KVT_OK;
    if (!ok || !mb.wk || !mb.nrm || !mb.sim || !mb.key || !mb.dst || !mb.ord || !mb.work ||
        !mb.gone || !mb.has || !mb.acck || !mb.accv) {
        st = kvt_error_set(KVT_ERR_NOMEM, "lightkv-like: out of memory");
        goto out_free;
    }
    const uint8_t *mod = c->in->modality;
    int n_text = 0;
    for (int i = 0; i < W; i++)
        n_text += !mod || mod[T - W + i] == 0;
    for (int j = 0; j < T; j++)
        wt[j] = 0.0;
    for (int hq = 0; hq < c->Hq; hq++)
        for (int i = 0; i < W; i++) {
            if (n_text && mod && mod[T - W + i] != 0)
                continue;
            const float *pr = c->prw + ((size_t)hq * c->Wt + (c->Wt - W + i)) * T;
            for (int j = 0; j < T; j++)
                wt[j] += pr[j];
        }
    for (int h = 0; h < H && !st; h++) {
        int g = kvt_ctx_kv_of(c, o->per_query, h);
        if (h > 0 && kvt_ctx_kv_of(c, o->per_query, h - 1) == g) {
            /* the same keys, values and (layer-wide) weights as the previous head: its sets */
            for (int b = 0; b < n_b && !st; b++)
                st = merged_copy(&sel->merged[(size_t)b * H + h - 1], D,
                                 &sel->merged[(size_t)b * H + h]);
            continue;
        }
        for (int b = 0; b < n_b; b++)
            outs[b] = &sel->merged[(size_t)b * H + h];
        st = merge_head(c, g, wt, B, n_b, o, &mb, target, outs);
    }
out_free:
    kvt_free(wt);
    kvt_free(target);
    kvt_free(outs);
    for (int i = 0; i < 2; i++) {
        kvt_free(sts[i]->k);
        kvt_free(sts[i]->v);
        kvt_free(sts[i]->w);
        kvt_free(sts[i]->idx);
        kvt_free(sts[i]->chg);
    }
    kvt_free(mb.wk);
    kvt_free(mb.nrm);
    kvt_free(mb.sim);
    kvt_free(mb.key);
    kvt_free(mb.dst);
    kvt_free(mb.ord);
    kvt_free(mb.work);
    kvt_free(mb.gone);
    kvt_free(mb.has);
    kvt_free(mb.acck);
    kvt_free(mb.accv);
    return st;
}

const kvt_policy_def kvt_policy_def_lightkv_like = {
    .name = "lightkv-like",
    .host_reads = KVT_CTX_PRW | KVT_CTX_KV,
    .summary = "LightKV-like [inferred]: merges vision K/V guided by text queries",
    .keys = "window,heads,merge_window",
    .flags = KVT_POLICY_MERGED | KVT_POLICY_LIKE | KVT_POLICY_WINDOW_QUERY,
    .defaults = d_light,
    .select = sel_light,
};
