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
 * window=W (default 0, not in kvpress) also keeps the last W tokens first.
 * chunk_scores=own|kvpress (with chunk_length=) scores each chunk from its own queries, turned
 * to the positions after it, or, as kvpress's ChunkPress(ExpectedAttentionPress) computes on a
 * chunk's hidden states, to the chunk's length and on (ea_chunks).
 *
 * stats=FILE is kvpress's ExpectedAttentionStatsPress (expected_attention_with_stats.py
 * @00a150c): mu and S of each query head are not the prompt's but a calibration set's, read
 * from the safetensors file (or hub checkpoint folder) of its ExpectedAttentionStats:
 * query_mean [layers, query heads, D] and query_cov [layers, query heads, D, D], the pre-RoPE
 * queries' mean and covariance, used as they are; the rest as above (Q_all is not needed).
 *
 * decoding=N is kvpress's DecodingPress over the press: the decode steps' caches (decoding.c),
 * scored at each compression from the queries of the steps before it (cache_ea below). */
#include <math.h>
#include <string.h>

#include "../replay_internal.h"

/* stats=FILE's arrays (p->state) */
typedef struct ea_stats {
    kvt_npy *mu, *cov; /* [L, Hq, D], [L, Hq, D, D] */
} ea_stats;

static void fini_ea(kvt_policy *p)
{
    ea_stats *s = p->state;
    if (s) {
        kvt_npy_destroy(s->mu);
        kvt_npy_destroy(s->cov);
        kvt_free(s);
    }
    p->state = NULL;
}

/* stats=FILE read once: both tensors, of matching shapes, every value finite */
static kvt_status init_ea(kvt_policy *p)
{
    const char *f = p->o.stats;
    /* DecodingPress hands the press N steps' hidden states, and it leaves out the first
       `sinks` of them */
    KVT_RETURN_IF(p->o.decoding > 0 && !f && p->o.decoding <= p->o.sinks, KVT_ERR_INVALID_ARG,
                  "expected-attention: decoding=%d: the statistics are of the queries of the "
                  "last N decode steps but their first sinks=%d (kvpress's DecodingPress and "
                  "ExpectedAttentionPress), so N must exceed sinks",
                  p->o.decoding, p->o.sinks);
    if (!f)
        return KVT_OK;
    char file[4096];
    KVT_RETURN_IF(!kvt_safetensors_file(f, file, sizeof(file)) || !kvt_is_safetensors(file),
                  KVT_ERR_INVALID_ARG,
                  "expected-attention: stats=%s is not a safetensors file, nor a folder holding "
                  "model.safetensors (kvpress's ExpectedAttentionStats, as saved on the hub)",
                  f);
    ea_stats *s = kvt_calloc(1, sizeof(*s));
    KVT_RETURN_IF(!s, KVT_ERR_NOMEM, "expected-attention: out of memory");
    p->state = s;
    KVT_FORWARD(kvt_array_load("expected-attention", f, "query_mean", 3,
                               "[layers, query heads, head dim] (query_mean)", "", &s->mu));
    KVT_FORWARD(kvt_array_load("expected-attention", f, "query_cov", 4,
                               "[layers, query heads, head dim, head dim] (query_cov)", "",
                               &s->cov));
    const int *m = s->mu->shape, *c = s->cov->shape;
    KVT_RETURN_IF(c[0] != m[0] || c[1] != m[1] || c[2] != m[2] || c[3] != m[2], KVT_ERR_INVALID_ARG,
                  "expected-attention: stats=%s: query_mean has shape (%d, %d, %d) and query_cov "
                  "(%d, %d, %d, %d); expected (L, H, D) and (L, H, D, D)",
                  f, m[0], m[1], m[2], c[0], c[1], c[2], c[3]);
    for (int k = 0; k < 2; k++) {
        const kvt_npy *a = k ? s->cov : s->mu;
        for (size_t i = 0; i < a->n; i++)
            KVT_RETURN_IF(!isfinite(kvt_npy_at(a, i)), KVT_ERR_NAN,
                          "expected-attention: stats=%s: %s element %zu (layer %zu) is %g", f,
                          k ? "query_cov" : "query_mean", i, i / (a->n / (size_t)m[0]),
                          kvt_npy_at(a, i));
    }
    return KVT_OK;
}

/* the statistics' layers and query heads against a trace's, before its first layer (their
 * head dimension: when a layer is replayed) */
static kvt_status bind_ea(const kvt_policy *p, const char *path, int L, int Hq, int Hkv, int T,
                          void **state)
{
    (void)path, (void)Hkv, (void)T, (void)state;
    const ea_stats *s = p->state;
    KVT_RETURN_IF(s && (s->mu->shape[0] != L || s->mu->shape[1] != Hq), KVT_ERR_INVALID_ARG,
                  "expected-attention: stats=%s has %d layers and %d query heads; this trace has "
                  "%d and %d (statistics of another model?)",
                  p->o.stats, s->mu->shape[0], s->mu->shape[1], L, Hq);
    return KVT_OK;
}

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
    memset(r, 0, sizeof(*r)); /* freed again harmlessly (ea_chunks frees every chunk's) */
}

/* the first future position of a prompt, or a chunk, of tokens [a0, a0 + n): a0 + n with 1-D
 * RoPE, the largest of their positions + 1 with M-RoPE (the trace's convention) */
static double ea_future_start(const kvt_layer_ctx *c, int a0, int n)
{
    const kvt_layer_input *in = c->in;
    if (!in->rope || in->rope->type != 2)
        return (double)a0 + n;
    int32_t m = INT32_MIN;
    for (int k = 0; k < 3; k++)
        for (int t = a0; t < a0 + n; t++)
            m = kvt_rope_pos(in, k, t) > m ? kvt_rope_pos(in, k, t) : m;
    return (double)m + 1.0;
}

/* the RoPE pairs and the mean rotation over the future positions p0, p0 + 1, ... */
static kvt_status ea_rope_init(const kvt_layer_ctx *c, int n_future, double p0, ea_rope *r)
{
    const kvt_rope_info *ri = c->in->rope;
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

/* Expected-attention probabilities p[j] (j in [a0 + S, a0 + n); the rest untouched) of query
 * head h (its Q_all q [T, D]) over the prompt, or chunk, of tokens [a0, a0 + n): its queries'
 * statistics, its keys (Kd [T, D]) past its first S (the sinks). X and M hold n rows; rot the
 * angles of every token. */
static kvt_status ea_head(kvt_layer_ctx *c, const kvt_policy *p, const ea_rope *r,
                          const double *rot, int h, int a0, int n, const float *q, double *X,
                          const double *Kd, double *M, double *cov, double *mu, double *p_out)
{
    const kvt_policy_opts *o = &p->o;
    const int D = c->D, S = o->sinks < n ? o->sinks : n, N = n - S, half = r->p.half;
    const ea_stats *fs = p->state;
    Kd += (size_t)a0 * D;
    if (fs) { /* stats=: the calibration set's, as they are */
        const size_t at = (size_t)c->layer * c->Hq + h;
        for (int d = 0; d < D; d++)
            mu[d] = kvt_npy_at(fs->mu, at * D + d);
        for (size_t i = 0; o->use_cov && i < (size_t)D * D; i++)
            cov[i] = kvt_npy_at(fs->cov, at * D * D + i);
    } else { /* the pre-RoPE queries of tokens S..n-1 and their mean */
        q += (size_t)a0 * D;
        memset(mu, 0, (size_t)D * sizeof(double));
        for (int t = S; t < n; t++) {
            const float *x = q + (size_t)t * D;
            double *y = X + (size_t)(t - S) * D;
            kvt_rope_undo(&r->p, r->p.on ? rot + (size_t)(a0 + t) * 2 * half : NULL, x, D, y);
            for (int d = 0; d < D; d++)
                mu[d] += y[d];
        }
        for (int d = 0; d < D; d++)
            mu[d] /= N;
    }
    if (o->use_cov) { /* S = (1/N) Xc^T Xc (or the file's), then R S R^T */
        if (!fs) {
            for (int t = 0; t < N; t++)
                for (int d = 0; d < D; d++)
                    X[(size_t)t * D + d] -= mu[d];
            kvt_gemm_f64_at(D, D, N, 1.0 / N, X, D, X, D, 0.0, cov, D);
        }
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
    double zmax = -INFINITY, *pz = p_out + a0;
    for (int j = S; j < n; j++) {
        const double *k = Kd + (size_t)j * D;
        double z = 0, zq = 0;
        for (int d = 0; d < D; d++)
            z += mu[d] * k[d];
        if (o->use_cov) {
            const double *m = M + (size_t)(j - S) * D;
            for (int d = 0; d < D; d++)
                zq += m[d] * k[d];
        }
        pz[j] = s * z + 0.5 * s * s * zq;
        zmax = pz[j] > zmax ? pz[j] : zmax;
    }
    double sum = 0;
    for (int j = S; j < n; j++)
        sum += pz[j] = exp(pz[j] - zmax);
    for (int j = S; j < n; j++) {
        pz[j] /= sum;
        KVT_RETURN_IF(!isfinite(pz[j]), KVT_ERR_NAN,
                      "expected-attention: query head %d: the expected attention to token %d is "
                      "not finite (the header's model.rope frequencies or attention_scaling, or "
                      "the queries, are out of range)",
                      h, a0 + j);
    }
    return KVT_OK;
}

/* acc [H', T]: at the tokens [a0 + S, a0 + n) of each chunk [a0, a0 + n) of C tokens from
 * token 0 (C >= T: the prompt), the expected attention (GQA mean, or per query head) from the
 * chunk's queries' statistics, turned to the future positions after it (kvpress: n, n + 1,
 * ..., kvpress's arange(q_len, ...) of a chunk scored on its own) */
static kvt_status ea_chunks(kvt_layer_ctx *c, const kvt_policy *p, int C, bool kvpress, double *acc)
{
    const kvt_layer_input *in = c->in;
    const kvt_policy_opts *o = &p->o;
    const int T = c->T, D = c->D, Gs = c->Gs, Cn = C < T ? C : T, nc = (T + C - 1) / C;
    size_t td = (size_t)T * D + 1;
    ea_rope *r = kvt_calloc((size_t)nc, sizeof(ea_rope));
    KVT_RETURN_IF(!r, KVT_ERR_NOMEM, "expected-attention: out of memory");
    kvt_status st = KVT_OK;
    for (int ch = 0; ch < nc && !st; ch++) {
        const int a0 = ch * C, n = T - a0 < C ? T - a0 : C;
        st = ea_rope_init(c, o->n_future, kvpress ? n : ea_future_start(c, a0, n), &r[ch]);
    }
    double *ph = kvt_malloc(((size_t)T + 1) * sizeof(double));
    double *X = kvt_malloc(((size_t)Cn * D + 1) * sizeof(double));
    double *Kd = kvt_malloc(td * sizeof(double));
    double *M = o->use_cov ? kvt_malloc(((size_t)Cn * D + 1) * sizeof(double)) : NULL;
    double *cov = kvt_malloc((size_t)D * D * sizeof(double)), *mu = kvt_malloc(D * sizeof(double));
    const bool qs = !p->state; /* the statistics from the queries (not stats=) */
    float *qh = in->q_all || !qs ? NULL : kvt_malloc(td * sizeof(float));
    /* cos and sin of every token's angle per pair, shared by the heads: [T, half, 2] */
    double *rot = r[0].p.on && qs ? kvt_malloc(td * sizeof(double)) : NULL;
    if (!st && (!ph || !X || !Kd || (o->use_cov && !M) || !cov || !mu ||
                (!in->q_all && qs && !qh) || (r[0].p.on && qs && !rot)))
        st = kvt_error_set(KVT_ERR_NOMEM, "expected-attention: out of memory");
    if (!st && r[0].p.on && qs)
        st = kvt_rope_angles(&r[0].p, in, 0, T, "expected-attention", rot);
    for (int g = 0; !st && g < c->Hkv; g++) {
        const float *k = c->k + (size_t)g * T * D;
        for (size_t i = 0; i < (size_t)T * D; i++)
            Kd[i] = k[i];
        for (int h = g * Gs; !st && h < (g + 1) * Gs; h++) {
            const float *q = NULL;
            if (qs && (st = kvt_ctx_q_all_head(c, "expected-attention", h, qh, &q)))
                break;
            double *a = acc + (size_t)(o->per_query ? h : g) * T, w = o->per_query ? 1.0 : 1.0 / Gs;
            for (int ch = 0; !st && ch < nc; ch++) {
                const int a0 = ch * C, n = T - a0 < C ? T - a0 : C;
                const int S = o->sinks < n ? o->sinks : n;
                if (S < n && !(st = ea_head(c, p, &r[ch], rot, h, a0, n, q, X, Kd, M, cov, mu, ph)))
                    for (int j = a0 + S; j < a0 + n; j++)
                        a[j] += w * ph[j];
            }
        }
    }
    for (int ch = 0; ch < nc; ch++)
        ea_rope_free(&r[ch]);
    kvt_free(r);
    kvt_free(ph);
    kvt_free(X);
    kvt_free(Kd);
    kvt_free(M);
    kvt_free(cov);
    kvt_free(mu);
    kvt_free(qh);
    kvt_free(rot);
    return st;
}

/* the layer's queries (Q_all), or stats=FILE's statistics of this trace's shape */
static kvt_status ea_check(kvt_layer_ctx *c, const kvt_policy *p)
{
    const ea_stats *s = p->state;
    if (!s)
        return kvt_ctx_check_q_all(c, "expected-attention");
    KVT_FORWARD(bind_ea(p, NULL, c->n_layers, c->Hq, c->Hkv, c->T, NULL));
    KVT_RETURN_IF(s->mu->shape[2] != c->D, KVT_ERR_INVALID_ARG,
                  "expected-attention: stats=%s has statistics of %d dimensions; this trace's "
                  "heads have %d",
                  p->o.stats, s->mu->shape[2], c->D);
    return KVT_OK;
}

/* head h's score of token a0 + j of the prompt, or chunk, [a0, a0 + n): the sinks first */
static double ea_score(const kvt_layer_ctx *c, const kvt_policy *p, const double *acc, int h,
                       int a0, int n, int j)
{
    const kvt_policy_opts *o = &p->o;
    const int S = o->sinks < n ? o->sinks : n, t = a0 + j;
    const double a = acc[(size_t)h * c->T + t];
    return j < S ? INFINITY
           : o->use_vnorm
               ? (a + o->epsilon) * c->vnorm[(size_t)kvt_ctx_kv_of(c, o->per_query, h) * c->T + t]
               : a;
}

static kvt_status sel_ea(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                         kvt_layer_selection *sel)
{
    const kvt_policy_opts *o = &p->o;
    const int T = c->T, W = o->window < T ? o->window : T, P = T - W;
    const int H = kvt_ctx_heads(c, o->per_query);
    /* decoding= without prefill=1 keeps the prompt whole (decoding.c): no prompt statistics,
       so no Q_all; the sinks first, then the prompt in order, as DecodingPress's cache */
    const bool whole = o->decoding > 0 && !o->decode_prefill;
    if (!whole || p->state)
        KVT_FORWARD(ea_check(c, p));
    KVT_FORWARD(kvt_ctx_fetch(c, KVT_CTX_KV));
    KVT_FORWARD(kvt_sel_init(sel, c, o->per_query, W, n_b, true));
    double *acc = kvt_calloc((size_t)H * T + 1, sizeof(double));
    double *sc = kvt_malloc(((size_t)H * P + 1) * sizeof(double));
    kvt_status st = KVT_OK;
    if (!acc || !sc)
        st = kvt_error_set(KVT_ERR_NOMEM, "expected-attention: out of memory");
    if (!st && !whole)
        st = ea_chunks(c, p, T, false, acc);
    for (int h = 0; !st && h < H; h++)
        for (int j = 0; j < P; j++)
            sc[(size_t)h * P + j] =
                whole ? (j < o->sinks ? INFINITY : -(double)j) : ea_score(c, p, acc, h, 0, T, j);
    if (!st)
        st = kvt_sel_rank_counts(c, p, sc, W, B, n_b, sel);
    kvt_free(acc);
    kvt_free(sc);
    return st;
}

/* chunk_scores=own|kvpress: kvpress's ChunkPress(ExpectedAttentionPress): each chunk's own
 * queries' statistics (its first `sinks` left out), turned to the positions after it (own) or,
 * as kvpress's arange(q_len, q_len + n_future_positions) of the chunk, to n, n + 1, ... (n the
 * chunk's length), over its own keys past its sinks; each chunk's sinks first, then its last
 * window= tokens */
static kvt_status chunk_ea(kvt_layer_ctx *c, const kvt_policy *p, int C, const int *B, int n_b,
                           kvt_layer_selection *sel)
{
    const kvt_policy_opts *o = &p->o;
    const int T = c->T, Cn = C < T ? C : T, H = kvt_ctx_heads(c, o->per_query);
    KVT_FORWARD(ea_check(c, p));
    KVT_FORWARD(kvt_ctx_fetch(c, KVT_CTX_KV));
    KVT_FORWARD(kvt_sel_init(sel, c, o->per_query, o->window < T ? o->window : T, n_b, true));
    double *acc = kvt_calloc((size_t)H * T + 1, sizeof(double));
    double *s = kvt_malloc((size_t)Cn * sizeof(double));
    int32_t *loc = kvt_malloc((size_t)Cn * sizeof(int32_t));
    kvt_status st = KVT_OK;
    if (!acc || !s || !loc)
        st = kvt_error_set(KVT_ERR_NOMEM, "expected-attention: out of memory");
    if (!st)
        st = ea_chunks(c, p, C, o->chunk_scores == KVT_CHUNK_KVPRESS, acc);
    for (int a0 = 0; !st && a0 < T; a0 += C) {
        const int n = T - a0 < C ? T - a0 : C, W = o->window < n ? o->window : n;
        for (int h = 0; !st && h < H; h++) {
            for (int j = 0; j < n - W; j++)
                s[j] = ea_score(c, p, acc, h, a0, n, j);
            if (!(st = kvt_rank_window(s, n, W, loc)))
                kvt_sel_put_chunk(sel, h, a0, n, loc);
        }
    }
    kvt_free(acc);
    kvt_free(s);
    kvt_free(loc);
    return st;
}

/* decoding=N (decoding.c): kvpress's DecodingPress(ExpectedAttentionPress). DecodingPress
 * hands the press the hidden states of the N decode steps since its last compression; the
 * press leaves out their first `sinks`, so the statistics are the mean and covariance (1/m) of
 * the pre-RoPE queries of the last m = N - sinks steps (Q_decode with RoPE undone at each step's
 * position: T + s, or with M-RoPE the largest prompt position + 1 + s on all rows). kvpress
 * turns them by the mean rotation over the positions q_len, q_len + 1, ... with q_len the
 * hidden states' length, here N (not the cache's positions). The sinks are the cache's first
 * `sinks` entries: kvpress pads them with the largest score + 1, and its top-k leaves the kept
 * entries in score order, so they stay the prompt's first tokens (decoding.c keeps each cache in
 * that order). With stats= the file's statistics, turned the same way, serve every compression
 * (ExpectedAttentionStatsPress). The quadratic term from the m queries without forming S:
 * k^T R S R^T k = (1/m) sum_i ((R (x_i - mu)) . k)^2. */
#define EA_BLK 256 /* cache entries scored per GEMM */

typedef struct ea_dec {
    ea_rope r;              /* the mean rotation over N, N + 1, ... */
    double *ang;            /* [G, half, 2] cos and sin of each decode step's angles (RoPE on) */
    double *vd;             /* [Hkv, G] ||v|| of the decode values */
    double *st_mu, *st_cov; /* stats=: [Hq, D] R mu, [Hq, D, D] R S R^T */
    double *acc, *z;        /* [T + G] */
    double *kd;             /* [T + G, D] the cache's keys in cache order */
    double *mm; /* [1 + m, D] a query head's R mu, then its R (x_i - mu), at one compression */
    double *zz; /* [EA_BLK * (1 + max(m, D))] a block's products */
    int m;
} ea_dec;

static void ea_dec_end(kvt_layer_ctx *c)
{
    ea_dec *e = c->dec_state;
    if (!e)
        return;
    ea_rope_free(&e->r);
    kvt_free(e->ang);
    kvt_free(e->vd);
    kvt_free(e->st_mu);
    kvt_free(e->st_cov);
    kvt_free(e->acc);
    kvt_free(e->z);
    kvt_free(e->kd);
    kvt_free(e->mm);
    kvt_free(e->zz);
    kvt_free(e);
    c->dec_state = NULL;
}

static kvt_status ea_dec_begin(kvt_layer_ctx *c, const kvt_policy *p)
{
    const kvt_policy_opts *o = &p->o;
    const kvt_layer_input *in = c->in;
    const int D = c->D, G = c->Gd, T = c->T, N = o->decoding;
    const ea_stats *fs = p->state;
    ea_dec *e = kvt_calloc(1, sizeof(*e));
    KVT_RETURN_IF(!e, KVT_ERR_NOMEM, "expected-attention: out of memory");
    c->dec_state = e;
    if (fs)
        KVT_FORWARD(ea_check(c, p));
    KVT_FORWARD(ea_rope_init(c, o->n_future, (double)N, &e->r));
    const int half = e->r.p.half;
    e->m = fs ? 0 : N - o->sinks;
    e->vd = kvt_malloc(((size_t)c->Hkv * G + 1) * sizeof(double));
    e->acc = kvt_malloc(((size_t)T + G + 1) * sizeof(double));
    e->z = kvt_malloc(((size_t)T + G + 1) * sizeof(double));
    e->kd = kvt_malloc(((size_t)T + G + 1) * D * sizeof(double));
    e->mm = kvt_malloc(((size_t)e->m + 1) * D * sizeof(double));
    e->zz = kvt_malloc((size_t)EA_BLK * (1 + (size_t)(e->m > D ? e->m : D)) * sizeof(double));
    KVT_RETURN_IF(!e->vd || !e->acc || !e->z || !e->kd || !e->mm || !e->zz, KVT_ERR_NOMEM,
                  "expected-attention: out of memory");
    for (int g = 0; g < c->Hkv; g++)
        kvt_row_norms(in->v_decode + (size_t)g * G * D, G, D, e->vd + (size_t)g * G);
    if (e->r.p.on && !fs) { /* each decode step's angles, at the position after the prompt */
        const double base = ea_future_start(c, 0, T);
        e->ang = kvt_malloc(((size_t)G * half + 1) * 2 * sizeof(double));
        KVT_RETURN_IF(!e->ang, KVT_ERR_NOMEM, "expected-attention: out of memory");
        for (int t = 0; t < G; t++)
            for (int i = 0; i < half; i++) {
                double *x = e->ang + ((size_t)t * half + i) * 2, a = (base + t) * e->r.p.freq[i];
                x[0] = cos(a);
                x[1] = sin(a);
                KVT_RETURN_IF(!isfinite(x[0]) || !isfinite(x[1]), KVT_ERR_NAN,
                              "expected-attention: the header's model.rope turns pair %d of "
                              "decode step %d by an angle that is not finite (frequency %g)",
                              i, t, e->r.p.freq[i]);
            }
    }
    if (fs) { /* stats=: every compression's statistics, turned once */
        e->st_mu = kvt_malloc((size_t)c->Hq * D * sizeof(double));
        e->st_cov = o->use_cov ? kvt_malloc((size_t)c->Hq * D * D * sizeof(double)) : NULL;
        KVT_RETURN_IF(!e->st_mu || (o->use_cov && !e->st_cov), KVT_ERR_NOMEM,
                      "expected-attention: out of memory");
        for (int u = 0; u < c->Hq; u++) {
            const size_t at = (size_t)c->layer * c->Hq + u;
            double *mu = e->st_mu + (size_t)u * D;
            double *cov = o->use_cov ? e->st_cov + (size_t)u * D * D : NULL;
            for (int d = 0; d < D; d++)
                mu[d] = kvt_npy_at(fs->mu, at * D + d);
            if (e->r.p.on)
                ea_rotate(&e->r, mu, 1);
            for (size_t i = 0; cov && i < (size_t)D * D; i++)
                cov[i] = kvt_npy_at(fs->cov, at * D * D + i);
            for (int j = 0; cov && e->r.p.on && j < D; j++) /* R S, then (R S) R^T */
                ea_rotate(&e->r, cov + j, (size_t)D);
            for (int i = 0; cov && e->r.p.on && i < D; i++)
                ea_rotate(&e->r, cov + (size_t)i * D, 1);
        }
    }
    return KVT_OK;
}

/* query head u's statistics of the compression after step s (the m steps before it, through
 * s) into e->mm: R mu, then the m rows R (x_i - mu) */
static kvt_status ea_dec_stats(const kvt_layer_ctx *c, const kvt_policy *p, ea_dec *e, int u, int s)
{
    const int D = c->D, G = c->Gd, m = e->m, half = e->r.p.half;
    const float *q = c->in->q_decode + (size_t)u * G * D;
    double *mu = e->mm, *ys = e->mm + D;
    memset(mu, 0, (size_t)D * sizeof(double));
    for (int i = 0; i < m; i++) {
        const int t = s - m + 1 + i;
        double *y = ys + (size_t)i * D;
        kvt_rope_undo(&e->r.p, e->r.p.on ? e->ang + (size_t)t * 2 * half : NULL, q + (size_t)t * D,
                      D, y);
        for (int d = 0; d < D; d++) {
            KVT_RETURN_IF(!isfinite(y[d]), KVT_ERR_NAN,
                          "%s: decoding=: query head %d's decode query of step %d is not finite "
                          "(dimension %d) at layer %d",
                          p->def->name, u, t, d, c->layer);
            mu[d] += y[d];
        }
    }
    for (int d = 0; d < D; d++)
        mu[d] /= m;
    for (int i = 0; i < m && p->o.use_cov; i++) {
        double *y = ys + (size_t)i * D;
        for (int d = 0; d < D; d++)
            y[d] -= mu[d];
        if (e->r.p.on)
            ea_rotate(&e->r, y, 1);
    }
    if (e->r.p.on)
        ea_rotate(&e->r, mu, 1);
    return KVT_OK;
}

/* the cache's scores after step s: its first `sinks` entries first (+inf), the rest by the
 * expected attention of the m steps' queries (or stats=), the KV head's query heads' mean (or
 * head h's own), times ||v|| */
static kvt_status cache_ea(kvt_layer_ctx *c, const kvt_policy *p, int h, int s, const int32_t *ent,
                           const float *const *k, int n, double *out, double *work)
{
    (void)work;
    const kvt_policy_opts *o = &p->o;
    ea_dec *e = c->dec_state;
    const int D = c->D, T = c->T, S = o->sinks < n ? o->sinks : n;
    const int g = kvt_ctx_kv_of(c, o->per_query, h);
    const int u0 = o->per_query ? h : g * c->Gs, u1 = o->per_query ? h + 1 : (g + 1) * c->Gs;
    const double sc = c->scale, w = 1.0 / (u1 - u0);
    KVT_RETURN_IF(!e || s < 0, KVT_ERR_STATE,
                  "expected-attention: decoding=: internal error: no decode statistics");
    for (int j = 0; j < n; j++) {
        e->acc[j] = 0.0;
        for (int d = 0; d < D; d++) /* the cache's keys in double */
            e->kd[(size_t)j * D + d] = (double)k[j][d];
    }
    for (int u = u0; u < u1; u++) {
        /* mu and the m turned queries, the rows of one matrix, against blocks of keys */
        const double *mm = e->mm, *cov = NULL;
        if (e->st_mu) {
            mm = e->st_mu + (size_t)u * D;
            cov = o->use_cov ? e->st_cov + (size_t)u * D * D : NULL;
        } else
            KVT_FORWARD(ea_dec_stats(c, p, e, u, s));
        const int rows = !cov && o->use_cov ? 1 + e->m : 1;
        double zmax = -INFINITY;
        for (int j0 = S; j0 < n; j0 += EA_BLK) {
            const int nb = n - j0 < EA_BLK ? n - j0 : EA_BLK;
            const double *kb = e->kd + (size_t)j0 * D;
            kvt_gemm_f64(true, rows, nb, D, 1.0, mm, D, kb, D, 0.0, e->zz, nb);
            if (cov) /* stats=: k^T S' k from (K S') k */
                kvt_gemm_f64(false, nb, D, D, 1.0, kb, D, cov, D, 0.0, e->zz + nb, D);
            for (int j = 0; j < nb; j++) {
                double zq = 0.0;
                if (cov)
                    for (int d = 0; d < D; d++)
                        zq += e->zz[nb + (size_t)j * D + d] * kb[(size_t)j * D + d];
                else if (rows > 1) {
                    for (int i = 1; i < rows; i++)
                        zq += e->zz[(size_t)i * nb + j] * e->zz[(size_t)i * nb + j];
                    zq /= e->m;
                }
                const double z = sc * e->zz[j] + 0.5 * sc * sc * zq;
                e->z[j0 + j] = z;
                zmax = z > zmax ? z : zmax;
            }
        }
        double sum = 0.0;
        for (int j = S; j < n; j++)
            sum += e->z[j] = exp(e->z[j] - zmax);
        for (int j = S; j < n; j++) {
            const double pj = e->z[j] / sum;
            KVT_RETURN_IF(!isfinite(pj), KVT_ERR_NAN,
                          "expected-attention: decoding=: query head %d: the expected attention "
                          "to %s token %d after decode step %d is not finite at layer %d",
                          u, ent[j] < T ? "prompt" : "decode", ent[j] < T ? ent[j] : ent[j] - T, s,
                          c->layer);
            e->acc[j] += w * pj;
        }
    }
    for (int j = 0; j < n; j++) {
        const double vn =
            ent[j] < T ? c->vnorm[(size_t)g * T + ent[j]] : e->vd[(size_t)g * c->Gd + (ent[j] - T)];
        out[j] = j < S ? INFINITY : o->use_vnorm ? (e->acc[j] + o->epsilon) * vn : e->acc[j];
    }
    return KVT_OK;
}

const kvt_policy_def kvt_policy_def_expected_attention = {
    .name = "expected-attention",
    .host_reads = KVT_CTX_KV,
    .summary = "kvpress ExpectedAttention: attention expected from the queries' mean and "
               "covariance at future positions, times ||v||",
    .keys = "window,heads,sinks,future,cov,vnorm,epsilon,stats,adaptive,alpha,normalize,alloc,"
            "skip,critical,first,ceps,dms,dms_window,decoding,prefill",
    .flags = KVT_POLICY_NEEDS_QALL | KVT_POLICY_NEEDS_ROPE,
    .defaults = d_ea,
    .init = init_ea,
    .fini = fini_ea,
    .bind = bind_ea,
    .select = sel_ea,
    .chunk_rank = chunk_ea,
    .chunk_min = 's', /* ExpectedAttentionPress asserts the chunk exceeds n_sink */
    .cache_scores = cache_ea,
    .dec_begin = ea_dec_begin,
    .dec_end = ea_dec_end,
};
