/* merge.c - merge=pivot|weighted on a fixed selection: KVCache-Factory's merge_kv (its
 * --merge option, the merges of LOOK-M, arXiv 2406.18139), pyramidkv/pyramidkv_utils.py. Every
 * token a head drops goes into the kept entry whose key is most like its own (cosine of keys
 * normalised as F.normalize, eps 1e-6; ties to the lower token index), keys and values alike:
 *   pivot:    x'_r = (x_r + sum_j (x_j + x_r) / 2) / (1 + n_r)   (scatter_reduce "mean")
 *   weighted: x'_r = (x_r + sum_j w_j x_j) / (1 + sum_j w_j),  w_j = max((cos_j + 1) / 2, 1e-6)
 * over the n_r dropped tokens j whose nearest kept entry is r. The similarities are products of
 * dropped unit keys by kept ones, in double (kvt_gemm_f64), in blocks of dropped rows. A head's
 * budgets go in increasing kept count: where a kept set contains the previous budget's (every
 * policy that keeps the first B of one ranking, and lookm), each dropped token keeps its nearest
 * kept token from there and is compared with the newly kept ones only, so all the budgets cost
 * at most one product of all T keys by the largest kept set, not one product per budget. The kept
 * sets stay the policy's; the selection gains merged sets (kvt_merged_set) that the metrics read
 * instead (analysis/RESULTS.md, merged policies). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvt_kernels.h"
#include "replay_internal.h"

#define MERGE_ROWS 256 /* dropped rows per product block */

/* unit keys of KV head g in double, k / max(||k||, 1e-6) */
static void unit_keys(const kvt_layer_ctx *c, int g, double *u)
{
    const int T = c->T, D = c->D;
    const float *k = c->k + (size_t)g * T * D;
    for (int j = 0; j < T; j++) {
        double n2 = 0.0;
        for (int d = 0; d < D; d++)
            n2 += (double)k[(size_t)j * D + d] * k[(size_t)j * D + d];
        double n = sqrt(n2), inv = 1.0 / (n > 1e-6 ? n : 1e-6);
        for (int d = 0; d < D; d++)
            u[(size_t)j * D + d] = k[(size_t)j * D + d] * inv;
    }
}

typedef struct merge_work {
    double *ukept, *sim, *acc_k, *acc_v, *wsum; /* [n, D], [ROWS, n], [n, D] x 2, [n] */
    int32_t *kept, *drop;                       /* [T] */
    uint8_t *in, *prev_in;                      /* [T] kept now, kept at the previous budget */
    int32_t *fresh, *pos, *near_t;              /* [T] */
    double *near_v;                             /* [T] */
} merge_work;

/* From the kept tokens w->kept[0..n) (ascending), the dropped ones w->drop[0..nd) and each dropped
 * token's nearest kept token near_t with its similarity near_v (entry pos[near_t]): the merged
 * set of KV head g. */
static kvt_status merge_sums(const kvt_layer_ctx *c, int g, char mode, merge_work *w, int n, int nd,
                             kvt_merged_set *out)
{
    const int T = c->T, D = c->D;
    const float *K = c->k + (size_t)g * T * D, *V = c->v + (size_t)g * T * D;
    /* the sums, in double, in dropped-token order */
    memset(w->acc_k, 0, (size_t)n * D * sizeof(double));
    memset(w->acc_v, 0, (size_t)n * D * sizeof(double));
    memset(w->wsum, 0, (size_t)n * sizeof(double));
    for (int i = 0; i < nd; i++) {
        const int j = w->drop[i], e = w->pos[w->near_t[j]];
        double wt = mode == 'w' ? fmax((w->near_v[j] + 1.0) / 2.0, 1e-6) : 1.0;
        for (int d = 0; d < D; d++) {
            w->acc_k[(size_t)e * D + d] += wt * K[(size_t)j * D + d];
            w->acc_v[(size_t)e * D + d] += wt * V[(size_t)j * D + d];
        }
        w->wsum[e] += wt;
    }
    int n_chg = 0;
    for (int e = 0; e < n; e++)
        n_chg += w->wsum[e] > 0;
    KVT_FORWARD(kvt_merged_alloc(out, n, n_chg, D));
    memcpy(out->idx, w->kept, (size_t)n * sizeof(int32_t));
    for (int e = 0, ce = 0; e < n; e++) {
        if (!(w->wsum[e] > 0))
            continue;
        out->changed[e] = 1;
        int r = w->kept[e];
        double s = w->wsum[e]; /* pivot: n_r, weighted: sum of w_j */
        for (int d = 0; d < D; d++) {
            double xk = K[(size_t)r * D + d], xv = V[(size_t)r * D + d];
            double mk, mv;
            if (mode == 'w')
                mk = (xk + w->acc_k[(size_t)e * D + d]) / (1.0 + s),
                mv = (xv + w->acc_v[(size_t)e * D + d]) / (1.0 + s);
            else /* each source's (x_j + x_r) / 2, averaged with x_r */
                mk = (xk + 0.5 * (w->acc_k[(size_t)e * D + d] + s * xk)) / (1.0 + s),
                mv = (xv + 0.5 * (w->acc_v[(size_t)e * D + d] + s * xv)) / (1.0 + s);
            out->k[(size_t)ce * D + d] = (float)mk;
            out->v[(size_t)ce * D + d] = (float)mv;
        }
        ce++;
    }
    return KVT_OK;
}

/* One budget of a head, kept tokens `rank[0..cnt)` of KV head g, after the previous budget (in
 * increasing kept count) left in w->prev_in its kept set and in near_t / near_v each token's
 * nearest kept token then. When this kept set contains that one (nested sets: every policy that
 * keeps the first B of one ranking), the tokens dropped now were dropped then, and only the
 * newly kept keys are compared with them; otherwise the search starts afresh. Either way a
 * dropped token goes to the kept token of the largest cosine, ties to the lower token index. */
static kvt_status merge_step(const kvt_layer_ctx *c, const double *u, int g, char mode,
                             const int32_t *rank, int cnt, merge_work *w, kvt_merged_set *out)
{
    const int T = c->T, D = c->D;
    memset(w->in, 0, (size_t)T);
    for (int i = 0; i < cnt; i++)
        w->in[rank[i]] = 1;
    bool nested = true;
    for (int j = 0; j < T && nested; j++)
        nested = !w->prev_in[j] || w->in[j];
    if (!nested) {
        memset(w->prev_in, 0, (size_t)T);
        for (int j = 0; j < T; j++)
            w->near_t[j] = -1, w->near_v[j] = -INFINITY;
    }
    int n = 0, nd = 0, nf = 0;
    for (int j = 0; j < T; j++) {
        if (w->in[j]) {
            w->pos[j] = n;
            w->kept[n++] = j;
            if (!w->prev_in[j])
                w->fresh[nf++] = j;
        } else
            w->drop[nd++] = j;
    }
    uint8_t *t = w->prev_in; /* this budget's set is the next one's previous */
    w->prev_in = w->in, w->in = t;
    if (n == 0 || nd == 0) { /* nothing to merge into, or nothing dropped */
        KVT_FORWARD(kvt_merged_alloc(out, n, 0, D));
        memcpy(out->idx, w->kept, (size_t)n * sizeof(int32_t));
        return KVT_OK;
    }
    for (int e = 0; e < nf; e++)
        memcpy(w->ukept + (size_t)e * D, u + (size_t)w->fresh[e] * D, (size_t)D * sizeof(double));
    /* each dropped token's nearest among the newly kept, against its nearest so far */
    double *ud = w->acc_k; /* MERGE_ROWS dropped unit keys (acc_k is free until the sums) */
    for (int r0 = 0; r0 < nd && nf > 0; r0 += MERGE_ROWS) {
        int m = nd - r0 < MERGE_ROWS ? nd - r0 : MERGE_ROWS;
        for (int i = 0; i < m; i++)
            memcpy(ud + (size_t)i * D, u + (size_t)w->drop[r0 + i] * D, (size_t)D * sizeof(double));
        kvt_gemm_f64(true, m, nf, D, 1.0, ud, D, w->ukept, D, 0.0, w->sim, nf);
        for (int i = 0; i < m; i++) {
            const double *row = w->sim + (size_t)i * nf;
            const int j = w->drop[r0 + i];
            int bt = w->near_t[j];
            double bv = w->near_v[j];
            for (int e = 0; e < nf; e++) /* ties keep the lower token */
                if (row[e] > bv || (row[e] == bv && w->fresh[e] < bt))
                    bv = row[e], bt = w->fresh[e];
            w->near_t[j] = bt, w->near_v[j] = bv;
        }
    }
    return merge_sums(c, g, mode, w, n, nd, out);
}

/* budgets in increasing kept count (ties: the lower budget index) */
typedef struct by_count {
    int count, b;
} by_count;

static int cmp_by_count(const void *a, const void *b)
{
    const by_count *x = a, *y = b;
    return x->count != y->count ? (x->count > y->count) - (x->count < y->count)
                                : (x->b > y->b) - (x->b < y->b);
}

kvt_status kvt_sel_merge(kvt_layer_ctx *c, char mode, kvt_layer_selection *sel)
{
    KVT_RETURN_IF(!sel->has_fixed || sel->step_head || sel->merged, KVT_ERR_STATE,
                  "merge: internal error: not a fixed selection");
    KVT_FORWARD(kvt_ctx_fetch(c, KVT_CTX_KV));
    KVT_FORWARD(kvt_sel_init_merged(sel));
    const int T = c->T, D = c->D, H = sel->n_heads, nb = sel->n_budgets;
    kvt_status st = KVT_OK;
    merge_work w = {0};
    double *u = kvt_malloc(((size_t)T * D + 1) * sizeof(double));
    w.ukept = kvt_malloc(((size_t)T * D + 1) * sizeof(double));
    w.sim = kvt_malloc(((size_t)MERGE_ROWS * T + 1) * sizeof(double));
    w.acc_k = kvt_malloc(((size_t)(T > MERGE_ROWS ? T : MERGE_ROWS) * D + 1) * sizeof(double));
    w.acc_v = kvt_malloc(((size_t)T * D + 1) * sizeof(double));
    w.wsum = kvt_malloc(((size_t)T + 1) * sizeof(double));
    w.kept = kvt_malloc(((size_t)T + 1) * sizeof(int32_t));
    w.drop = kvt_malloc(((size_t)T + 1) * sizeof(int32_t));
    w.in = kvt_malloc((size_t)T + 1);
    w.prev_in = kvt_malloc((size_t)T + 1);
    w.fresh = kvt_malloc(((size_t)T + 1) * sizeof(int32_t));
    w.pos = kvt_malloc(((size_t)T + 1) * sizeof(int32_t));
    w.near_t = kvt_malloc(((size_t)T + 1) * sizeof(int32_t));
    w.near_v = kvt_malloc(((size_t)T + 1) * sizeof(double));
    by_count *ord = kvt_malloc(((size_t)nb + 1) * sizeof(by_count));
    if (!u || !w.ukept || !w.sim || !w.acc_k || !w.acc_v || !w.wsum || !w.kept || !w.drop ||
        !w.in || !w.prev_in || !w.fresh || !w.pos || !w.near_t || !w.near_v || !ord) {
        st = kvt_error_set(KVT_ERR_NOMEM, "merge: out of memory");
        goto out;
    }
    int have = -1; /* the KV head whose unit keys u holds */
    for (int h = 0; h < H && !st; h++) {
        int g = kvt_ctx_kv_of(c, sel->per_query, h);
        if (g != have)
            unit_keys(c, g, u), have = g;
        for (int b = 0; b < nb; b++)
            ord[b] = (by_count){sel->count[(size_t)b * H + h], b};
        qsort(ord, (size_t)nb, sizeof(*ord), cmp_by_count);
        memset(w.prev_in, 0, (size_t)T); /* the first budget starts afresh */
        for (int j = 0; j < T; j++)
            w.near_t[j] = -1, w.near_v[j] = -INFINITY;
        for (int i = 0; i < nb && !st; i++) {
            const int b = ord[i].b;
            st = merge_step(c, u, g, mode, kvt_sel_ranking(sel, b, h), ord[i].count, &w,
                            &sel->merged[(size_t)b * H + h]);
        }
    }
out:
    kvt_free(u);
    kvt_free(w.ukept);
    kvt_free(w.sim);
    kvt_free(w.acc_k);
    kvt_free(w.acc_v);
    kvt_free(w.wsum);
    kvt_free(w.kept);
    kvt_free(w.drop);
    kvt_free(w.in);
    kvt_free(w.prev_in);
    kvt_free(w.fresh);
    kvt_free(w.pos);
    kvt_free(w.near_t);
    kvt_free(w.near_v);
    kvt_free(ord);
    return st;
}
