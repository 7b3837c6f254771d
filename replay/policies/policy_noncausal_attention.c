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

#include "../replay_internal.h"

static void d_nca(kvt_policy_opts *o)
{
    o->alloc = 'b'; /* adaptive=1: kvpress's AdaKVPress over the press */
    o->window = 0;
    o->chunk = 256;
}

static kvt_status sel_nca(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                          kvt_layer_selection *sel)
{
    const kvt_layer_input *in = c->in;
    const kvt_policy_opts *o = &p->o;
    const int T = c->T, D = c->D, Hq = c->Hq, Gs = c->Gs, C = o->chunk;
    const int W = o->window < T ? o->window : T, P = T - W, H = kvt_ctx_heads(c, o->per_query);
    KVT_FORWARD(kvt_ctx_check_q_all(c, "noncausal-attention"));
    KVT_FORWARD(kvt_ctx_fetch(c, KVT_CTX_KV));
    KVT_FORWARD(kvt_sel_init(sel, c, o->per_query, W, n_b, true));
    double *acc = kvt_calloc((size_t)H * T + 1, sizeof(double));
    double *sc = kvt_malloc(((size_t)H * P + 1) * sizeof(double));
    double *z = kvt_malloc(((size_t)C + 1) * sizeof(double));
    float *qh = in->q_all ? NULL : kvt_malloc(((size_t)T * D + 1) * sizeof(float));
    kvt_status st = KVT_OK;
    if (!acc || !sc || !z || (!in->q_all && !qh)) {
        st = kvt_error_set(KVT_ERR_NOMEM, "noncausal-attention: out of memory");
        goto out;
    }
    for (int h = 0; h < Hq; h++) {
        const float *q;
        if ((st = kvt_ctx_q_all_head(c, "noncausal-attention", h, qh, &q)))
            goto out;
        const int g = h / Gs;
        const float *k = c->k + (size_t)g * T * D;
        double *a = acc + (size_t)(o->per_query ? h : g) * T, w = o->per_query ? 1.0 : 1.0 / Gs;
        for (int c0 = 0; c0 < T; c0 += C) {
            const int n = T - c0 < C ? T - c0 : C;
            for (int i = 0; i < n; i++) { /* query c0 + i over the chunk's keys */
                const float *qi = q + (size_t)(c0 + i) * D;
                double top = -INFINITY, sum = 0;
                for (int j = 0; j < n; j++) {
                    const float *kj = k + (size_t)(c0 + j) * D;
                    double dot = 0;
                    for (int d = 0; d < D; d++)
                        dot += (double)qi[d] * kj[d];
                    z[j] = dot;
                    top = dot > top ? dot : top;
                }
                for (int j = 0; j < n; j++)
                    sum += z[j] = exp(z[j] - top);
                for (int j = 0; j < n; j++)
                    a[c0 + j] += w * z[j] / sum;
            }
        }
    }
    for (int h = 0; h < H; h++) { /* times ||v||, then a mean over 3 tokens (zeros outside) */
        const double *a = acc + (size_t)h * T,
                     *vn = c->vnorm + (size_t)kvt_ctx_kv_of(c, o->per_query, h) * T;
        for (int j = 0; j < P; j++) {
            double m = a[j] * vn[j];
            if (j > 0)
                m += a[j - 1] * vn[j - 1];
            if (j + 1 < T)
                m += a[j + 1] * vn[j + 1];
            sc[(size_t)h * P + j] = m / 3.0;
        }
    }
    st = kvt_sel_rank_counts(c, p, sc, W, B, n_b, sel);
out:
    kvt_free(acc);
    kvt_free(sc);
    kvt_free(z);
    kvt_free(qh);
    return st;
}

const kvt_policy_def kvt_policy_def_noncausal_attention = {
    .name = "noncausal-attention",
    .host_reads = KVT_CTX_KV,
    .summary = "kvpress NonCausalAttn (Compactor): attention inside chunks of the prompt, no "
               "causal mask, times ||v||",
    .keys = "window,heads,chunk,adaptive,alpha,normalize,alloc,skip,critical,first,ceps",
    .flags = KVT_POLICY_NEEDS_QALL,
    .defaults = d_nca,
    .select = sel_nca,
};
