/* policy_lightkv.c - `lightkv-like` (POLICIES §10 "LightKV-like KV merge", an offline proxy):
 * merges vision K/V of the prefix instead of selecting. Per head and budget B:
 *   w_i   = attention to token i from the text window queries (all window queries if none is
 *           text), summed over the head's query heads;
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

typedef struct merge_buf {
    float *k, *v; /* [n, D] current vision entries */
    double *w;    /* [n] */
    int32_t *idx; /* [n] token index */
    int32_t *dst; /* [n] best destination position of each source (-1 none) */
    double *sim;  /* [n] its similarity */
    double *key;  /* [n] ranking key of candidates */
    int32_t *ord, *work;
    uint8_t *gone, *has, *chg; /* chg [n]: the entry was a merge target in some round */
    double *wk;                /* [n] accumulated weight */
    double *nrm;               /* [n] key norms of the current round */
    double *acck, *accv;       /* [n, D] weighted sums of the destinations */
} merge_buf;

static kvt_status merge_head(const kvt_layer_ctx *c, int g, const double *wt, int B,
                             const kvt_policy_opts *o, merge_buf *mb, kvt_merged_set *out)
{
    const int T = c->T, D = c->D, W = o->window, P = T - W;
    const uint8_t *mod = c->in->modality;
    int n = 0;
    for (int j = 0; j < P; j++)
        if (mod && (mod[j] == 1 || mod[j] == 2)) {
            memcpy(mb->k + (size_t)n * D, c->in->k + ((size_t)g * T + j) * D, D * sizeof(float));
            memcpy(mb->v + (size_t)n * D, c->in->v + ((size_t)g * T + j) * D, D * sizeof(float));
            mb->w[n] = wt[j];
            mb->idx[n] = j;
            mb->chg[n] = 0;
            n++;
        }
    int n_vis = n, target = B - (T - n_vis);
    if (target < 1)
        target = 1;
    if (T <= B)
        target = n_vis;
    const int MW = o->merge_window;
    while (n > target) {
        int n_cand = 0;
        for (int i = 0; i < n; i++) { /* norms once per round, not once per pair */
            double aa = 0.0;
            const float *ki = mb->k + (size_t)i * D;
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
                    double x = cos_rows(mb->k + (size_t)s * D, mb->k + (size_t)d * D, D,
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
        if (n_cand == 0)
            break;
        /* rank candidates by similarity (ties: lower position = lower token index) */
        for (int i = 0; i < n_cand; i++)
            mb->key[i] = mb->sim[i];
        int32_t *rank = mb->work + n; /* second half of work */
        kvt_rank_desc_ref(mb->key, n_cand, rank, mb->work);
        int take = n - target < n_cand ? n - target : n_cand;
        memset(mb->gone, 0, (size_t)n);
        memset(mb->has, 0, (size_t)n);
        for (int d = 0; d < n; d++)
            mb->wk[d] = mb->w[d];
        for (int i = 0; i < take; i++) {
            int s = mb->ord[rank[i]], d = mb->dst[s];
            mb->gone[s] = 1;
            double *ak = mb->acck + (size_t)d * D, *av = mb->accv + (size_t)d * D;
            if (!mb->has[d]) {
                mb->has[d] = 1;
                mb->chg[d] = 1;
                for (int e = 0; e < D; e++) {
                    ak[e] = mb->w[d] * mb->k[(size_t)d * D + e];
                    av[e] = mb->w[d] * mb->v[(size_t)d * D + e];
                }
            }
            for (int e = 0; e < D; e++) {
                ak[e] += mb->w[s] * mb->k[(size_t)s * D + e];
                av[e] += mb->w[s] * mb->v[(size_t)s * D + e];
            }
            mb->wk[d] += mb->w[s];
        }
        for (int d = 0; d < n; d++) {
            if (!mb->has[d] || !(mb->wk[d] > 0.0))
                continue; /* zero total weight: keep the destination unchanged */
            for (int e = 0; e < D; e++) {
                mb->k[(size_t)d * D + e] = (float)(mb->acck[(size_t)d * D + e] / mb->wk[d]);
                mb->v[(size_t)d * D + e] = (float)(mb->accv[(size_t)d * D + e] / mb->wk[d]);
            }
        }
        /* compact */
        int m = 0;
        for (int d = 0; d < n; d++) {
            if (mb->gone[d])
                continue;
            if (m != d) {
                memmove(mb->k + (size_t)m * D, mb->k + (size_t)d * D, D * sizeof(float));
                memmove(mb->v + (size_t)m * D, mb->v + (size_t)d * D, D * sizeof(float));
                mb->idx[m] = mb->idx[d];
            }
            mb->chg[m] = mb->chg[d];
            mb->w[m] = mb->wk[d];
            m++;
        }
        n = m;
    }
    /* output: non-vision tokens unchanged + the vision entries, by token index. Only the
     * changed entries (merge targets) carry their own K/V; the others are token idx's. */
    int n_out = T - n_vis + n, n_chg = 0;
    for (int i = 0; i < n; i++)
        n_chg += mb->chg[i] != 0;
    out->n = n_out;
    out->n_changed = n_chg;
    out->k = kvt_malloc(((size_t)n_chg * D + 1) * sizeof(float));
    out->v = kvt_malloc(((size_t)n_chg * D + 1) * sizeof(float));
    out->idx = kvt_malloc((size_t)n_out * sizeof(int32_t));
    out->changed = kvt_calloc((size_t)n_out + 1, 1);
    KVT_RETURN_IF(!out->k || !out->v || !out->idx || !out->changed, KVT_ERR_NOMEM,
                  "lightkv: out of memory");
    int vi = 0, o_i = 0, ci = 0;
    for (int j = 0; j < T; j++) {
        bool vis = j < P && mod && (mod[j] == 1 || mod[j] == 2);
        if (vis) {
            if (vi < n && mb->idx[vi] == j) {
                if (mb->chg[vi]) {
                    memcpy(out->k + (size_t)ci * D, mb->k + (size_t)vi * D, D * sizeof(float));
                    memcpy(out->v + (size_t)ci * D, mb->v + (size_t)vi * D, D * sizeof(float));
                    ci++;
                }
                out->changed[o_i] = mb->chg[vi];
                out->idx[o_i++] = j;
                vi++;
            }
            continue;
        }
        out->idx[o_i++] = j;
    }
    return KVT_OK;
}

static kvt_status sel_light(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                            kvt_layer_selection *sel)
{
    const kvt_policy_opts *o = &p->o;
    const int T = c->T, D = c->D, W = o->window;
    KVT_FORWARD(kvt_ctx_check_window(c, "lightkv-like", W));
    KVT_FORWARD(kvt_sel_init(sel, c, o->per_query, W, n_b, false));
    KVT_FORWARD(kvt_sel_init_merged(sel));
    const int H = sel->n_heads, per = o->per_query ? 1 : c->Gs;
    merge_buf mb = {0};
    double *wt = kvt_calloc((size_t)T, sizeof(double));
    mb.k = kvt_malloc((size_t)T * D * sizeof(float));
    mb.v = kvt_malloc((size_t)T * D * sizeof(float));
    mb.w = kvt_malloc((size_t)T * sizeof(double));
    mb.wk = kvt_malloc((size_t)T * sizeof(double));
    mb.nrm = kvt_malloc((size_t)T * sizeof(double));
    mb.sim = kvt_malloc((size_t)T * sizeof(double));
    mb.key = kvt_malloc((size_t)T * sizeof(double));
    mb.idx = kvt_malloc((size_t)T * sizeof(int32_t));
    mb.dst = kvt_malloc((size_t)T * sizeof(int32_t));
    mb.ord = kvt_malloc((size_t)T * sizeof(int32_t));
    mb.work = kvt_malloc((size_t)2 * T * sizeof(int32_t));
    mb.gone = kvt_malloc((size_t)T);
    mb.has = kvt_malloc((size_t)T);
    mb.chg = kvt_malloc((size_t)T);
    mb.acck = kvt_malloc((size_t)T * D * sizeof(double));
    mb.accv = kvt_malloc((size_t)T * D * sizeof(double));
    kvt_status st = KVT_OK;
    if (!wt || !mb.k || !mb.v || !mb.w || !mb.wk || !mb.nrm || !mb.sim || !mb.key || !mb.idx ||
        !mb.dst || !mb.ord || !mb.work || !mb.gone || !mb.has || !mb.chg || !mb.acck || !mb.accv) {
        st = kvt_error_set(KVT_ERR_NOMEM, "lightkv-like: out of memory");
        goto out_free;
    }
    const uint8_t *mod = c->in->modality;
    int n_text = 0;
    for (int i = 0; i < W; i++)
        n_text += !mod || mod[T - W + i] == 0;
    for (int h = 0; h < H && !st; h++) {
        for (int j = 0; j < T; j++)
            wt[j] = 0.0;
        for (int u = 0; u < per; u++)
            for (int i = 0; i < W; i++) {
                if (n_text && mod && mod[T - W + i] != 0)
                    continue;
                const float *pr = c->prw + ((size_t)(h * per + u) * c->Wt + (c->Wt - W + i)) * T;
                for (int j = 0; j < T; j++)
                    wt[j] += pr[j];
            }
        int g = kvt_ctx_kv_of(c, o->per_query, h);
        for (int b = 0; b < n_b && !st; b++)
            st = merge_head(c, g, wt, B[b], o, &mb, &sel->merged[(size_t)b * H + h]);
    }
out_free:
    kvt_free(wt);
    kvt_free(mb.k);
    kvt_free(mb.v);
    kvt_free(mb.w);
    kvt_free(mb.wk);
    kvt_free(mb.nrm);
    kvt_free(mb.sim);
    kvt_free(mb.key);
    kvt_free(mb.idx);
    kvt_free(mb.dst);
    kvt_free(mb.ord);
    kvt_free(mb.work);
    kvt_free(mb.gone);
    kvt_free(mb.has);
    kvt_free(mb.chg);
    kvt_free(mb.acck);
    kvt_free(mb.accv);
    return st;
}

const kvt_policy_def kvt_policy_def_lightkv_like = {
    .name = "lightkv-like",
    .summary = "LightKV-like [inferred]: merges vision K/V guided by text queries",
    .keys = "window,heads,merge_window",
    .flags = KVT_POLICY_MERGED | KVT_POLICY_LIKE,
    .defaults = d_light,
    .select = sel_light,
};
