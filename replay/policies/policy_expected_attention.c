/* policy_expected_attention.c - `expected-attention`: NVIDIA kvpress's ExpectedAttentionPress
 * (kvpress/presses/expected_attention_press.py), replayed from a trace that holds Q_all.
 *
 * kvpress models the queries still to come as a Gaussian: the mean mu and covariance S of the
 * pre-RoPE queries of the prompt (its first `sinks` tokens left out), turned by the mean RoPE
 * rotation R over the next `future` positions (mu' = R mu, S' = R S R^T). A key k_j then
 * expects the logit z_j = s mu'.k_j + (s^2 / 2) k_j^T S' k_j (s = the softmax scale, 1/sqrt(D)
 * for every model kvpress supports: its /sqrt(d) and /d/2), softmaxed over the keys past the
 * sinks, averaged over the query heads of a KV head, and multiplied by ||v_j||:
 * score_j = (p_j + epsilon) * ||v_j||. The sinks are kept first (kvpress pads them with the
 * largest score), then the keys by score, ties to the earlier key. A budget B keeps the first B
 * of that order per KV head, as kvpress's top-k of int(T * (1 - compression_ratio)) does.
 *
 * kvpress computes mu = mean(h) Wq^T from the attention's input h and S = Wq Cov(h) Wq^T; the
 * same statistics follow from the trace's post-RoPE Q_all by undoing RoPE at each token's
 * position (model.rope: pairs, frequencies, attention_scaling, M-RoPE sections). They are equal
 * for a q_proj without bias; with one (Qwen2) kvpress's mu leaves the bias out and ours keeps it.
 * The future positions follow the trace's convention (FORMAT.md): T, T+1, ... (kvpress's
 * arange(q_len, q_len + n_future_positions)), and max + 1, ... on all three rows with M-RoPE.
 * window=W (default 0, not in kvpress) also keeps the last W tokens first. */
#include <math.h>
#include <string.h>

#include "../replay_internal.h"

static void d_ea(kvt_policy_opts *o)
{
    o->alloc = 'b'; /* adaptive=1: kvpress's AdaKVPress over the press */
    o->window = 0;
    o->sinks = 4;
    o->n_future = 512;
    o->use_cov = true;
    o->use_vnorm = true;
    o->epsilon = 0.0;
}

/* The layer's RoPE (rope.c: the pairs; off, the queries are used as stored) and the mean
 * rotation over the future positions. */
typedef struct ea_rope {
    kvt_rope_pairs p;
    double *cb, *sb; /* [half] a * mean cos, a * mean sin over the future positions */
} ea_rope;

static void ea_rope_free(ea_rope *r)
{
    kvt_rope_pairs_free(&r->p);
    kvt_free(r->cb);
    kvt_free(r->sb);
}

static kvt_status ea_rope_init(const kvt_layer_ctx *c, int n_future, ea_rope *r)
{
    const kvt_layer_input *in = c->in;
    const kvt_rope_info *ri = in->rope;
    const int T = c->T;
    memset(r, 0, sizeof(*r));
    KVT_FORWARD(kvt_rope_pairs_init(c, "expected-attention", &r->p));
    if (!r->p.on)
        return KVT_OK;
    const int half = r->p.half;
    r->cb = kvt_malloc((size_t)half * sizeof(double));
    r->sb = kvt_malloc((size_t)half * sizeof(double));
    if (!r->cb || !r->sb) {
        ea_rope_free(r);
        return kvt_error_set(KVT_ERR_NOMEM, "expected-attention: out of memory");
    }
    /* the first future position: T with 1-D RoPE, the largest prompt position + 1 with M-RoPE */
    double p0 = T;
    if (ri->type == 2) {
        int32_t m = INT32_MIN;
        for (int k = 0; k < 3; k++)
            for (int t = 0; t < T; t++)
                m = kvt_rope_pos(in, k, t) > m ? kvt_rope_pos(in, k, t) : m;
        p0 = (double)m + 1.0;
    }
    for (int i = 0; i < half; i++) {
        double sc = 0, ss = 0;
        for (int f = 0; f < n_future; f++) {
            double ang = (p0 + f) * r->p.freq[i];
            sc += cos(ang);
            ss += sin(ang);
        }
        r->cb[i] = r->p.a * sc / n_future;
        r->sb[i] = r->p.a * ss / n_future;
        if (!isfinite(r->cb[i]) || !isfinite(r->sb[i])) {
            ea_rope_free(r);
            return kvt_error_set(KVT_ERR_NAN,
                                 "expected-attention: the header's model.rope gives pair %d a "
                                 "rotation that is not finite (inv_freq %g, attention_scaling %g)",
                                 i, ri->inv_freq ? ri->inv_freq[i] : -1.0, r->p.a);
        }
    }
    return KVT_OK;
}

/* x (stride st between its D elements) <- R x, R = cb I + sb P per pair: (lo, hi) -> (cb lo -
 * sb hi, sb lo + cb hi), the rotation of HF's q * cos + rotate_half(q) * sin */
static void ea_rotate(const ea_rope *r, double *x, size_t st)
{
    for (int i = 0; i < r->p.half; i++) {
        double *l = x + (size_t)r->p.lo[i] * st, *h = x + (size_t)r->p.hi[i] * st, a = *l, b = *h;
        *l = r->cb[i] * a - r->sb[i] * b;
        *h = r->sb[i] * a + r->cb[i] * b;
    }
}

/* Expected-attention probabilities p[j] (j in [S, T); p[j < S] untouched) of query head h. */
static kvt_status ea_head(kvt_layer_ctx *c, const kvt_policy *p, const ea_rope *r,
                          const double *rot, int h, float *qh, double *X, const double *Kd,
                          double *M, double *cov, double *mu, double *p_out)
{
    const kvt_policy_opts *o = &p->o;
    const int T = c->T, D = c->D, S = o->sinks < T ? o->sinks : T, N = T - S;
    const float *q;
    KVT_FORWARD(kvt_ctx_q_all_head(c, "expected-attention", h, qh, &q));
    /* the pre-RoPE queries of tokens S..T-1 and their mean */
    memset(mu, 0, (size_t)D * sizeof(double));
    for (int t = S; t < T; t++) {
        const float *x = q + (size_t)t * D;
        double *y = X + (size_t)(t - S) * D;
        kvt_rope_undo(&r->p, r->p.on ? rot + (size_t)(t - S) * 2 * r->p.half : NULL, x, D, y);
        for (int d = 0; d < D; d++)
            mu[d] += y[d];
    }
    for (int d = 0; d < D; d++)
        mu[d] /= N;
    if (o->use_cov) { /* S = (1/N) Xc^T Xc, then R S R^T */
        for (int t = 0; t < N; t++)
            for (int d = 0; d < D; d++)
                X[(size_t)t * D + d] -= mu[d];
        kvt_gemm_f64_at(D, D, N, 1.0 / N, X, D, X, D, 0.0, cov, D);
        if (r->p.on) {
            for (int j = 0; j < D; j++) /* columns: R S */
                ea_rotate(r, cov + j, (size_t)D);
            for (int i = 0; i < D; i++) /* rows: (R S) R^T */
                ea_rotate(r, cov + (size_t)i * D, 1);
        }
        kvt_gemm_f64(false, N, D, D, 1.0, Kd + (size_t)S * D, D, cov, D, 0.0, M, D); /* K S' */
    }
    if (r->p.on)
        ea_rotate(r, mu, 1);
    const double s = c->scale;
    double zmax = -INFINITY;
    for (int j = S; j < T; j++) {
        const double *k = Kd + (size_t)j * D;
        double z = 0, zq = 0;
        for (int d = 0; d < D; d++)
            z += mu[d] * k[d];
        if (o->use_cov) {
            const double *m = M + (size_t)(j - S) * D;
            for (int d = 0; d < D; d++)
                zq += m[d] * k[d];
        }
        p_out[j] = s * z + 0.5 * s * s * zq;
        zmax = p_out[j] > zmax ? p_out[j] : zmax;
    }
    double sum = 0;
    for (int j = S; j < T; j++)
        sum += p_out[j] = exp(p_out[j] - zmax);
    for (int j = S; j < T; j++) {
        p_out[j] /= sum;
        KVT_RETURN_IF(!isfinite(p_out[j]), KVT_ERR_NAN,
                      "expected-attention: query head %d: the expected attention to token %d is "
                      "not finite (the header's model.rope frequencies or attention_scaling, or "
                      "the queries, are out of range)",
                      h, j);
    }
    return KVT_OK;
}

static kvt_status sel_ea(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                         kvt_layer_selection *sel)
{
    const kvt_layer_input *in = c->in;
    const kvt_policy_opts *o = &p->o;
    const int T = c->T, D = c->D, Hkv = c->Hkv, Gs = c->Gs;
    const int W = o->window < T ? o->window : T, P = T - W, S = o->sinks < T ? o->sinks : T;
    const int N = T - S, H = kvt_ctx_heads(c, o->per_query);
    KVT_FORWARD(kvt_ctx_check_q_all(c, "expected-attention"));
    KVT_FORWARD(kvt_ctx_fetch(c, KVT_CTX_KV));
    ea_rope r;
    KVT_FORWARD(ea_rope_init(c, o->n_future, &r));
    kvt_status st = kvt_sel_init(sel, c, o->per_query, W, n_b, true);
    if (st) {
        ea_rope_free(&r);
        return st;
    }
    size_t td = (size_t)T * D + 1;
    double *acc = kvt_calloc((size_t)H * T + 1, sizeof(double));
    double *ph = kvt_malloc(((size_t)T + 1) * sizeof(double));
    double *sc = kvt_malloc(((size_t)H * P + 1) * sizeof(double));
    double *X = kvt_malloc(td * sizeof(double)), *Kd = kvt_malloc(td * sizeof(double));
    double *M = o->use_cov ? kvt_malloc(td * sizeof(double)) : NULL;
    double *cov = kvt_malloc((size_t)D * D * sizeof(double)), *mu = kvt_malloc(D * sizeof(double));
    float *qh = in->q_all ? NULL : kvt_malloc(td * sizeof(float));
    /* cos and sin of every token's angle per pair, shared by the heads: [N, half, 2] */
    double *rot = r.p.on ? kvt_malloc(((size_t)N * D + 1) * sizeof(double)) : NULL;
    if (!acc || !ph || !sc || !X || !Kd || (o->use_cov && !M) || !cov || !mu ||
        (!in->q_all && !qh) || (r.p.on && !rot)) {
        st = kvt_error_set(KVT_ERR_NOMEM, "expected-attention: out of memory");
        goto out;
    }
    if (r.p.on && (st = kvt_rope_angles(&r.p, in, S, T, "expected-attention", rot)))
        goto out;
    for (int g = 0; N > 0 && g < Hkv; g++) {
        const float *k = c->k + (size_t)g * T * D;
        for (size_t i = 0; i < (size_t)T * D; i++)
            Kd[i] = k[i];
        for (int h = g * Gs; h < (g + 1) * Gs; h++) {
            if ((st = ea_head(c, p, &r, rot, h, qh, X, Kd, M, cov, mu, ph)))
                goto out;
            double *a = acc + (size_t)(o->per_query ? h : g) * T, w = o->per_query ? 1.0 : 1.0 / Gs;
            for (int j = S; j < T; j++)
                a[j] += w * ph[j];
        }
    }
    for (int h = 0; h < H; h++) {
        const double *a = acc + (size_t)h * T,
                     *vn = c->vnorm + (size_t)kvt_ctx_kv_of(c, o->per_query, h) * T;
        for (int j = 0; j < P; j++)
            sc[(size_t)h * P + j] = j < S          ? INFINITY
                                    : o->use_vnorm ? (a[j] + o->epsilon) * vn[j]
                                                   : a[j];
    }
    st = kvt_sel_rank_counts(c, p, sc, W, B, n_b, sel);
out:
    kvt_free(acc);
    kvt_free(ph);
    kvt_free(sc);
    kvt_free(X);
    kvt_free(Kd);
    kvt_free(M);
    kvt_free(cov);
    kvt_free(mu);
    kvt_free(qh);
    kvt_free(rot);
    ea_rope_free(&r);
    return st;
}

const kvt_policy_def kvt_policy_def_expected_attention = {
    .name = "expected-attention",
    .host_reads = KVT_CTX_KV,
    .summary = "kvpress ExpectedAttention: attention expected from the queries' mean and "
               "covariance at future positions, times ||v||",
    .keys = "window,heads,sinks,future,cov,vnorm,epsilon,adaptive,alpha,normalize,alloc,skip,"
            "critical,first,ceps",
    .flags = KVT_POLICY_NEEDS_QALL | KVT_POLICY_NEEDS_ROPE,
    .defaults = d_ea,
    .select = sel_ea,
};
