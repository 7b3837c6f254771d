/* policy_noncausal_attention.c - `noncausal-attention`: kvpress's NonCausalAttnPress
 * (kvpress/presses/non_causal_attention_press.py @15a267d; Compactor, arXiv 2507.08143): the
 * prompt cut into chunks of `chunk` tokens from the first; inside each chunk every query
 * attends to every key of the chunk, with no causal mask and no scale (unscaled logits, as
 * kvpress and the paper's code); the attention each key receives is summed over the chunk's
 * queries, averaged over the query heads of a KV head (heads=query: each its own), times
 * ||v||, then averaged over a window of 3 tokens (zero padding counted, avg_pool1d's default).
 * kvpress then z-normalises over all heads and tokens, which does not change any head's order.
 * The last, partial chunk holds only the prompt's tokens. Queries come from Q_all (post-RoPE,
 * as kvpress recomputes them). Ties to the earlier token; kvpress computes the logits in the
 * model's dtype and the softmax in float32, kvtrace in double. */
#include <math.h>
#include <string.h>

#include "kvt_kernels.h"
#include "../replay_internal.h"

static void d_nca(kvt_policy_opts *o)
{
    o->alloc = 'b'; /* adaptive=1: kvpress's AdaKVPress over the press */
    o->window = 0;
    o->chunk = 256;
}

kvt_status kvt_nca_scores(kvt_layer_ctx *c, const char *policy, bool per_query, int C,
                          const kvt_nca_range *rg, int n_r, const kvt_rope_pairs *r)
{
    const kvt_layer_input *in = c->in;
    const int T = c->T, D = c->D, Hq = c->Hq, Gs = c->Gs;
    const int H = kvt_ctx_heads(c, per_query);
    KVT_FORWARD(kvt_ctx_check_q_all(c, policy));
    KVT_FORWARD(kvt_ctx_fetch(c, KVT_CTX_KV));
    size_t n_all = 0; /* every range's tokens */
    int Cm = 1;       /* the largest tile */
    for (int i = 0; i < n_r; i++) {
        const int n_s = rg[i].s1 - rg[i].s0, tile = C < n_s ? C : n_s;
        n_all += (size_t)n_s;
        Cm = tile > Cm ? tile : Cm;
    }
    double *acc = kvt_calloc((size_t)H * n_all + 1, sizeof(double)); /* range by range */
    double *z = kvt_malloc(((size_t)Cm * Cm + 1) * sizeof(double));  /* a tile's logits */
    double *qc = kvt_malloc(((size_t)Cm * D + 1) * sizeof(double));
    double *kc = kvt_malloc(((size_t)Cm * D + 1) * sizeof(double));
    float *qh = in->q_all ? NULL : kvt_malloc(((size_t)T * D + 1) * sizeof(float));
    float *qt = r ? kvt_malloc(((size_t)Cm * D + 1) * sizeof(float)) : NULL; /* turned */
    kvt_status st = KVT_OK;
    if (!acc || !z || !qc || !kc || (!in->q_all && !qh) || (r && !qt)) {
        st = kvt_error_set(KVT_ERR_NOMEM, "%s: out of memory", policy);
        goto out;
    }
    for (int h = 0; h < Hq && n_all > 0; h++) { /* each query head's Q_all read once */
        const float *q;
        if ((st = kvt_ctx_q_all_head(c, policy, h, qh, &q)))
            goto out;
        const int g = h / Gs;
        const float *k = c->k + (size_t)g * T * D;
        const double w = per_query ? 1.0 : 1.0 / Gs;
        double *ar = acc; /* this range's [H', s1 - s0] */
        for (int i = 0; i < n_r; ar += (size_t)H * (rg[i].s1 - rg[i].s0), i++) {
            const int s0 = rg[i].s0, s1 = rg[i].s1;
            double *a = ar + (size_t)(per_query ? h : g) * (s1 - s0);
            for (int c0 = s0; c0 < s1; c0 += C) {
                const int n = s1 - c0 < C ? s1 - c0 : C;
                const float *qs = q + (size_t)c0 * D;
                if (r &&
                    (st = kvt_chunk_turn_queries(c, policy, r, q, c0, n, rg[i].to + (c0 - s0), qt)))
                    goto out;
                for (size_t x = 0; x < (size_t)n * D; x++) { /* the tile's queries and keys */
                    qc[x] = r ? qt[x] : qs[x];
                    kc[x] = k[(size_t)c0 * D + x];
                }
                kvt_gemm_f64(true, n, n, D, 1.0, qc, D, kc, D, 0.0, z, n); /* unscaled logits */
                for (int y = 0; y < n; y++) { /* query c0 + y over the tile's keys */
                    double *zy = z + (size_t)y * n, top = -INFINITY, sum = 0;
                    for (int j = 0; j < n; j++)
                        top = zy[j] > top ? zy[j] : top;
                    for (int j = 0; j < n; j++)
                        sum += zy[j] = exp(zy[j] - top);
                    for (int j = 0; j < n; j++)
                        a[c0 - s0 + j] += w * zy[j] / sum;
                }
            }
        }
    }
    const double *ar = acc;
    for (int i = 0; i < n_r; ar += (size_t)H * (rg[i].s1 - rg[i].s0), i++) {
        const int s0 = rg[i].s0, n_s = rg[i].s1 - s0;
        for (int h = 0; h < H; h++) { /* times ||v||, then a mean over 3 tokens (zeros outside) */
            const double *a = ar + (size_t)h * n_s,
                         *vn = c->vnorm + (size_t)kvt_ctx_kv_of(c, per_query, h) * T + s0;
            for (int j = 0; j < n_s; j++) {
                double m = a[j] * vn[j];
                if (j > 0)
                    m += a[j - 1] * vn[j - 1];
                if (j + 1 < n_s)
                    m += a[j + 1] * vn[j + 1];
                rg[i].out[(size_t)h * n_s + j] = m / 3.0;
            }
        }
    }
out:
    kvt_free(acc);
    kvt_free(z);
    kvt_free(qc);
    kvt_free(kc);
    kvt_free(qh);
    kvt_free(qt);
    return st;
}

static kvt_status sel_nca(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                          kvt_layer_selection *sel)
{
    const kvt_policy_opts *o = &p->o;
    const int T = c->T, W = o->window < T ? o->window : T, P = T - W;
    const int H = kvt_ctx_heads(c, o->per_query);
    KVT_FORWARD(kvt_ctx_check_q_all(c, "noncausal-attention"));
    KVT_FORWARD(kvt_sel_init(sel, c, o->per_query, W, n_b, true));
    double *sc = kvt_malloc(((size_t)H * T + 1) * sizeof(double));
    KVT_RETURN_IF(!sc, KVT_ERR_NOMEM, "noncausal-attention: out of memory");
    const kvt_nca_range rg = {0, T, 0, sc};
    kvt_status st = kvt_nca_scores(c, "noncausal-attention", o->per_query, o->chunk, &rg, 1, NULL);
    if (!st && !isnan(o->dms)) /* kvpress's z-scores, which a DMS threshold reads (a ranking,
                                  AdaKV's alloc=b and CriticalKV's orders do not change) */
        kvt_znorm(sc, (size_t)H * T);
    for (int h = 0; h < H && !st; h++) /* the prefix's scores, packed [H', P] */
        memmove(sc + (size_t)h * P, sc + (size_t)h * T, (size_t)P * sizeof(double));
    if (!st)
        st = kvt_sel_rank_counts(c, p, sc, W, B, n_b, sel);
    kvt_free(sc);
    return st;
}

const kvt_policy_def kvt_policy_def_noncausal_attention = {
    .name = "noncausal-attention",
    .host_reads = KVT_CTX_KV,
    .summary = "kvpress NonCausalAttn (Compactor): attention inside chunks of the prompt, no "
               "causal mask, times ||v||",
    .keys = "window,heads,chunk,adaptive,alpha,normalize,alloc,skip,critical,first,ceps,dms,"
            "dms_window",
    .flags = KVT_POLICY_NEEDS_QALL,
    .defaults = d_nca,
    .select = sel_nca,
};
