/* policy_rkv.c - `rkv`: R-KV, redundancy-aware KV cache compression for reasoning models (Cai et
 * al., arXiv 2505.24133), replayed as its HF code runs it (Zefan-Cai/R-KV: rkv/compression/
 * r1_kv.py R1KV.update_kv, rkv/utils.py compute_attention_scores and cal_similarity, the
 * attention and CausalLM forwards of rkv/modeling.py, run_math.py's defaults).
 *
 * A compression of a cache of n >= B entries (B the budget, window W = 8 included) scores the
 * first n - W entries in the cache's order and keeps the best B - W of them, then the last W:
 *   attention: the last W queries of the sequence (post-RoPE) against every cached key, each
 *     logit the largest over the KV head's query heads (reduce=max; mean optional), softmax over
 *     the first n - W entries, the mean over the W rows, then max-pooled over `kernel` = 7
 *     neighbours in cache order;
 *   redundancy: the cosine similarity C of every two cached keys (unit keys k / (|k| + 1e-8)),
 *     its diagonal zeroed; in each row i the entry of the last column j with C_ij > threshold =
 *     0.5 (or column 0 when there is none) zeroed too; the column means, softmaxed over all n;
 *   score = lambda * attention - (1 - lambda) * redundancy (lambda = 0.1).
 * torch.topk leaves the kept entries in score order and the window follows: the next
 * compression pools and looks for the last similar column in that order, which the replay
 * keeps (ties to the earlier token, where torch leaves them unspecified).
 * When: R-KV's first forward (the prefill) compresses the prompt once it holds B tokens, with
 * its last W queries (the trace's Q_window); after each forward that brings the length to a
 * multiple of `interval` = 128 (divide_length) the next one compresses: decode step s (token T +
 * s) when (T + s) is such a multiple, over the cache holding token T + s, with the queries of
 * the last W tokens through s. That step's attention still sees the whole cache (the forward
 * attends with the keys it had before compressing), so evicted entries are last seen at step s.
 * The column sums are taken as u_j . (sum_i u_i) less the zeroed entries, the same values as
 * summing the matrix, without keeping it; each row's last similar column is found by scanning
 * blocks of columns from the end (a block of rows at a time, by the f64 GEMM), and the window
 * queries' logits come from one GEMM per compression. heads=query gives every query head its
 * own cache from its own logits. decode=0 keeps the prompt-time compression alone. lambda=1 is
 * the repository's SnapKV (rkv/compression/snapkv.py: the same compression by the pooled
 * attention alone). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvt_kernels.h"
#include "../replay_internal.h"

static void d_rkv(kvt_policy_opts *o)
{
    o->window = 8;
    o->kernel = 7;
    o->reduce = KVT_REDUCE_MAX;
    o->threshold = 0.5;
    o->mix_lambda = 0.1;
    o->interval = 128;
    o->greedy_decode = true;
}

static kvt_status init_rkv(kvt_policy *p)
{
    KVT_RETURN_IF(p->o.reduce == KVT_REDUCE_SUM, KVT_ERR_INVALID_ARG,
                  "rkv: reduce=sum: R-KV pools a group's logits by max or mean");
    return KVT_OK;
}

#define RKV_RB 64  /* rows of the similarity's blocks */
#define RKV_CB 256 /* columns of the similarity's blocks */

/* scratch for a cache of up to cap entries */
typedef struct rkv_work {
    double *z, *a, *ap, *cs, *sc, *u, *sum; /* [cap] x 5, [cap, D], [D] */
    double *blk;                            /* [RKV_RB, RKV_CB] */
    double *qm, *zq;                        /* [Gs * W, D], [Gs * W, cap] */
    int32_t *ord, *hit;                     /* [cap], [RKV_RB] */
} rkv_work;

static void rkv_work_free(rkv_work *w)
{
    kvt_free(w->z);
    kvt_free(w->a);
    kvt_free(w->ap);
    kvt_free(w->cs);
    kvt_free(w->sc);
    kvt_free(w->u);
    kvt_free(w->sum);
    kvt_free(w->blk);
    kvt_free(w->qm);
    kvt_free(w->zq);
    kvt_free(w->ord);
    kvt_free(w->hit);
}

static kvt_status rkv_work_alloc(const kvt_layer_ctx *c, const kvt_policy *p, size_t cap,
                                 rkv_work *w)
{
    memset(w, 0, sizeof(*w));
    const size_t D = (size_t)c->D;
    w->z = kvt_malloc((cap + 1) * sizeof(double));
    w->a = kvt_malloc((cap + 1) * sizeof(double));
    w->ap = kvt_malloc((cap + 1) * sizeof(double));
    w->cs = kvt_malloc((cap + 1) * sizeof(double));
    w->sc = kvt_malloc((cap + 1) * sizeof(double));
    w->u = kvt_malloc((cap * D + 1) * sizeof(double));
    w->sum = kvt_malloc(D * sizeof(double));
    w->blk = kvt_malloc((size_t)RKV_RB * RKV_CB * sizeof(double));
    w->qm = kvt_malloc(((size_t)c->Gs * p->o.window * D + 1) * sizeof(double));
    w->zq = kvt_malloc(((size_t)c->Gs * p->o.window * cap + 1) * sizeof(double));
    w->ord = kvt_malloc((cap + 1) * sizeof(int32_t));
    w->hit = kvt_malloc(RKV_RB * sizeof(int32_t));
    if (!w->z || !w->a || !w->ap || !w->cs || !w->sc || !w->u || !w->sum || !w->blk || !w->qm ||
        !w->zq || !w->ord || !w->hit) {
        rkv_work_free(w);
        return kvt_error_set(KVT_ERR_NOMEM, "rkv: out of memory");
    }
    return KVT_OK;
}

/* the keys of KV head g's cache entries ent [n] (NULL: the prompt's tokens 0..n-1), in
 * double and in cache order, into w->u */
static void rkv_keys(const kvt_layer_ctx *c, int g, const int32_t *ent, int n, rkv_work *w)
{
    for (int j = 0; j < n; j++) {
        const float *k = kvt_dec_entry_key(c, g, ent ? ent[j] : j);
        for (int e = 0; e < c->D; e++)
            w->u[(size_t)j * c->D + e] = (double)k[e];
    }
}

/* R1KV's scores w->sc [n - W] of the first n - W entries of a cache of n > W entries whose keys
 * are w->u [n, D] (rkv_keys), under the query rows w->qm [x * W + i, D] (rkv_queries: nq query
 * heads, the last W queries in order) */
static void rkv_scores(const kvt_layer_ctx *c, const kvt_policy *p, int n, int nq, rkv_work *w)
{
    const kvt_policy_opts *o = &p->o;
    const int W = o->window, P = n - W, D = c->D, hk = o->kernel / 2, R = nq * W;
    /* every row's logits over the first P keys at once: zq [R, P] */
    kvt_gemm_f64(true, R, P, D, c->scale, w->qm, D, w->u, D, 0.0, w->zq, P);
    for (int j = 0; j < P; j++)
        w->a[j] = 0.0;
    for (int i = 0; i < W; i++) { /* row i: softmax over the first P of the pooled logits */
        double zmax = -INFINITY, sum = 0.0;
        for (int j = 0; j < P; j++) {
            double r = o->reduce == KVT_REDUCE_MAX ? -INFINITY : 0.0;
            for (int x = 0; x < nq; x++) {
                const double d = w->zq[((size_t)x * W + i) * P + j];
                r = o->reduce == KVT_REDUCE_MAX ? (d > r ? d : r) : r + d;
            }
            w->z[j] = o->reduce == KVT_REDUCE_MAX ? r : r / nq;
            zmax = w->z[j] > zmax ? w->z[j] : zmax;
        }
        for (int j = 0; j < P; j++)
            sum += w->z[j] = exp(w->z[j] - zmax);
        for (int j = 0; j < P; j++)
            w->a[j] += w->z[j] / sum;
    }
    for (int j = 0; j < P; j++) { /* mean over the rows, max-pooled in cache order */
        double m = -INFINITY;
        for (int t = j - hk < 0 ? 0 : j - hk; t <= j + hk && t < P; t++)
            m = w->a[t] > m ? w->a[t] : m;
        w->ap[j] = m / W;
    }
    if (o->mix_lambda == 1.0) { /* the attention alone (the repository's SnapKV): no redundancy */
        for (int j = 0; j < P; j++)
            w->sc[j] = w->ap[j];
        return;
    }
    for (int e = 0; e < D; e++)
        w->sum[e] = 0.0;
    for (int j = 0; j < n; j++) { /* unit keys (in place of the keys) and their sum */
        double *u = w->u + (size_t)j * D, s = 0.0;
        for (int e = 0; e < D; e++)
            s += u[e] * u[e];
        const double inv = 1.0 / (sqrt(s) + 1e-8);
        for (int e = 0; e < D; e++) {
            u[e] *= inv;
            w->sum[e] += u[e];
        }
    }
    for (int j = 0; j < n; j++) { /* column sums without the diagonal */
        const double *u = w->u + (size_t)j * D;
        double s = 0.0, dd = 0.0;
        for (int e = 0; e < D; e++) {
            s += u[e] * w->sum[e];
            dd += u[e] * u[e];
        }
        w->cs[j] = s - dd;
    }
    /* each row's last column above the threshold (none: column 0) zeroed: blocks of RB rows
       against blocks of CB columns from the end, until every row of the block has found one */
    for (int i0 = 0; i0 < n; i0 += RKV_RB) {
        const int nr = n - i0 < RKV_RB ? n - i0 : RKV_RB;
        int left = nr;
        for (int r = 0; r < nr; r++)
            w->hit[r] = -1;
        for (int j1 = n; j1 > 0 && left > 0; j1 -= RKV_CB) {
            const int j0 = j1 - RKV_CB > 0 ? j1 - RKV_CB : 0, nc = j1 - j0;
            kvt_gemm_f64(true, nr, nc, D, 1.0, w->u + (size_t)i0 * D, D, w->u + (size_t)j0 * D, D,
                         0.0, w->blk, nc);
            for (int r = 0; r < nr; r++) {
                if (w->hit[r] >= 0)
                    continue;
                for (int j = j1 - 1; j >= j0; j--) {
                    const double cij = j == i0 + r ? 0.0 : w->blk[(size_t)r * nc + (j - j0)];
                    if (cij > o->threshold) {
                        w->hit[r] = j;
                        w->cs[j] -= cij;
                        left--;
                        break;
                    }
                }
            }
        }
        for (int r = 0; r < nr; r++) {
            const int i = i0 + r;
            if (w->hit[r] >= 0 || i == 0)
                continue; /* (row 0's column 0 is the diagonal, zero already) */
            const double *ui = w->u + (size_t)i * D;
            double c0 = 0.0;
            for (int e = 0; e < D; e++)
                c0 += ui[e] * w->u[e];
            w->cs[0] -= c0;
        }
    }
    double mmax = -INFINITY, msum = 0.0;
    for (int j = 0; j < n; j++) {
        w->cs[j] /= n;
        mmax = w->cs[j] > mmax ? w->cs[j] : mmax;
    }
    for (int j = 0; j < n; j++)
        msum += w->cs[j] = exp(w->cs[j] - mmax);
    for (int j = 0; j < P; j++)
        w->sc[j] = o->mix_lambda * w->ap[j] - (1.0 - o->mix_lambda) * (w->cs[j] / msum);
}

/* the query rows of the last W queries through decode step s (-1: the prompt's last W), of the
 * selection head's query heads u0 .. u0 + nq - 1, in double into w->qm (head x's row i at
 * x * W + i) */
static void rkv_queries(const kvt_layer_ctx *c, const kvt_policy *p, int u0, int nq, int s,
                        rkv_work *w)
{
    const kvt_layer_input *in = c->in;
    const int W = p->o.window, D = c->D;
    for (int x = 0; x < nq; x++)
        for (int i = 0; i < W; i++) {
            const int t = s - (W - 1) + i; /* decode query t, or window query Wt + t */
            const float *q =
                t >= 0 ? in->q_decode + (((size_t)(u0 + x)) * c->Gd + (size_t)t) * D
                       : in->q_window + (((size_t)(u0 + x)) * c->Wt + (size_t)(c->Wt + t)) * D;
            for (int e = 0; e < D; e++)
                w->qm[((size_t)x * W + i) * D + e] = (double)q[e];
        }
}

/* one (budget, head)'s cache through the decode steps from the prompt-time cache start [n0] (in
 * R-KV's order), each compression's evictions last seen at its step */
static kvt_status rkv_decode(kvt_layer_ctx *c, const kvt_policy *p, int h, int B,
                             const int32_t *start, int n0, kvt_dec_cache *dc, int32_t *cache,
                             kvt_dec_item *it, rkv_work *w)
{
    const kvt_policy_opts *o = &p->o;
    const int T = c->T, G = c->Gd, W = o->window;
    const int g = kvt_ctx_kv_of(c, o->per_query, h), u0 = o->per_query ? h : g * c->Gs;
    const int nq = o->per_query ? 1 : c->Gs;
    int n = n0;
    KVT_FORWARD(kvt_dec_init(c, p, start, n0, dc));
    memcpy(cache, start, (size_t)n0 * sizeof(int32_t));
    for (int s = 0; s < G; s++) {
        cache[n++] = T + s;
        if (((int64_t)T + s) % o->interval != 0 || n < B)
            continue;
        rkv_keys(c, g, cache, n, w);
        rkv_queries(c, p, u0, nq, s, w);
        rkv_scores(c, p, n, nq, w);
        for (int i = 0; i < n - W; i++) {
            KVT_RETURN_IF(isnan(w->sc[i]), KVT_ERR_NAN,
                          "rkv: NaN score of %s token %d after decode step %d at layer %d, head "
                          "%d",
                          cache[i] < T ? "prompt" : "decode",
                          cache[i] < T ? cache[i] : cache[i] - T, s, c->layer, h);
            it[i] = (kvt_dec_item){w->sc[i], cache[i]};
        }
        qsort(it, (size_t)(n - W), sizeof(*it), kvt_dec_item_cmp);
        for (int i = B - W; i < n - W; i++) /* evicted in step s's forward, after its attention */
            dc->last[it[i].e] = s;
        for (int i = 0; i < W; i++)
            w->ord[i] = cache[n - W + i];
        for (int i = 0; i < B - W; i++)
            cache[i] = it[i].e;
        memcpy(cache + B - W, w->ord, (size_t)W * sizeof(int32_t));
        n = B;
    }
    return KVT_OK;
}

static kvt_status sel_rkv(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                          kvt_layer_selection *sel)
{
    const kvt_policy_opts *o = &p->o;
    const bool pq = o->per_query;
    const int T = c->T, G = o->greedy_decode ? c->Gd : 0, H = kvt_ctx_heads(c, pq);
    const int W = o->window, Wp = W < T ? W : T, P = T - Wp, nq = pq ? 1 : c->Gs;
    KVT_FORWARD(kvt_ctx_check_window(c, "rkv", W));
    for (int b = 0; b < n_b; b++)
        KVT_RETURN_IF(B[b] <= W, KVT_ERR_INVALID_ARG,
                      "rkv: a budget of %d tokens: R-KV keeps the last window=%d and needs a "
                      "budget above it (R1KV asserts budget > window_size)",
                      B[b], W);
    KVT_FORWARD(kvt_ctx_fetch(c, KVT_CTX_KV));
    KVT_FORWARD(kvt_sel_init(sel, c, pq, Wp, n_b, true));
    bool compress = false; /* the prompt is compressed at some budget (T >= B) */
    for (int b = 0; b < n_b; b++)
        compress |= T >= B[b];
    const size_t cap = (size_t)T + G + 1;
    double *sc = kvt_calloc((size_t)H * P + 1, sizeof(double));
    int32_t *cache = kvt_malloc(cap * sizeof(int32_t)), *start = kvt_malloc(cap * sizeof(int32_t));
    kvt_dec_item *it = kvt_malloc(cap * sizeof(kvt_dec_item));
    rkv_work w = {0};
    kvt_status st = KVT_OK;
    if (!sc || !cache || !start || !it)
        st = kvt_error_set(KVT_ERR_NOMEM, "rkv: out of memory");
    if (!st)
        st = rkv_work_alloc(c, p, cap, &w);
    for (int h = 0; h < H && !st && compress && P > 0; h++) { /* the prompt's scores */
        const int g = kvt_ctx_kv_of(c, pq, h);
        rkv_keys(c, g, NULL, T, &w);
        rkv_queries(c, p, pq ? h : g * c->Gs, nq, -1, &w);
        rkv_scores(c, p, T, nq, &w);
        for (int j = 0; j < P && !st; j++) {
            if (isnan(w.sc[j]))
                st = kvt_error_set(KVT_ERR_NAN, "rkv: NaN score of token %d at layer %d, head %d",
                                   j, c->layer, h);
            sc[(size_t)h * P + j] = w.sc[j];
        }
    }
    if (!st)
        st = kvt_sel_rank_counts(c, p, sc, Wp, B, n_b, sel);
    if (!st && o->greedy_decode)
        st = kvt_dec_begin(c, p, n_b, sel);
    for (int b = 0; b < n_b && !st && G > 0; b++)
        for (int h = 0; h < H && !st; h++) {
            const int32_t *r = kvt_sel_ranking(sel, b, h);
            int n0 = 0;
            if (T >= B[b]) { /* R-KV's order: the best B - W by score, then the window */
                for (int i = Wp; i < B[b]; i++)
                    start[n0++] = r[i];
                for (int j = P; j < T; j++)
                    start[n0++] = j;
            } else
                for (int j = 0; j < T; j++)
                    start[n0++] = j;
            st = rkv_decode(c, p, h, B[b], start, n0, &sel->dec[(size_t)b * H + h], cache, it, &w);
        }
    rkv_work_free(&w);
    kvt_free(sc);
    kvt_free(cache);
    kvt_free(start);
    kvt_free(it);
    return st;
}

const kvt_policy_def kvt_policy_def_rkv = {
    .name = "rkv",
    .summary = "R-KV: attention of the last window queries against redundancy among the keys, "
               "compressing the cache while decoding (reasoning models)",
    .keys = "window,kernel,reduce,heads,threshold,lambda,interval,decode",
    .host_reads = KVT_CTX_KV,
    .defaults = d_rkv,
    .init = init_rkv,
    .select = sel_rkv,
};
