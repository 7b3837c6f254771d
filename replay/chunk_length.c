/* chunk_length.c - chunk_length=N on a policy with a plain kept set: the prompt is cut into
 * chunks of N tokens from token 0 (the last one shorter), and at a budget of share f of the
 * prompt (its written share, or B/T) each chunk keeps max(1, int(len * f)) of its tokens
 * (all of them when f >= 1), the ones the policy ranks highest. This is kvpress's FinchPress
 * with chunk_length (one ranking of the whole prompt, a top-k per chunk), and its ChunkPress
 * over a press whose score of a token depends on that token alone (KnormPress; QFilterPress
 * with given filters). The policy's ranking is kept within each chunk; its own head budgets
 * are replaced by the chunks' (every head keeps the same count). Nested budgets stay nested,
 * so one ranking serves them all; a policy with a ranking per budget keeps one.
 * ChunkPress over other presses scores each chunk as a prompt of its own: chunk_scores=own
 * (kvt_sel_chunk_own) ranks each chunk with the policy's chunk_rank instead; snapkv's and
 * tova's read the chunk's last queries from Q_all (kvt_chunk_window_mass), at their own
 * positions, or with chunk_scores=kvpress turned to the positions of the prompt's last
 * tokens, as kvpress's SnapKVPress.compute_window_attention rotates them (the layer's
 * position embeddings, cos[:, -window_size:], are the whole prompt's). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "replay_internal.h"

/* the kept count of chunk [i, i + len) at share f */
static int chunk_keep(int len, double f)
{
    if (f >= 1.0)
        return len;
    double x = (double)len * f;
    int n = x >= 1.0 ? (int)x : 1;
    return n < len ? n : len;
}

/* by[T]: the tokens grouped by chunk, each chunk's in the order of ranking r; start[nc + 1] */
static void group(const int32_t *r, int T, int C, int nc, int32_t *by, int *start)
{
    for (int ch = 0; ch <= nc; ch++)
        start[ch] = ch * C < T ? ch * C : T;
    int *fill = start + nc + 1; /* [nc] next free slot of each chunk */
    for (int ch = 0; ch < nc; ch++)
        fill[ch] = start[ch];
    for (int i = 0; i < T; i++)
        by[fill[r[i] / C]++] = r[i];
}

/* idx[n] ordered by f (ties: the lower index), an insertion sort (few budgets) */
static void sort_by_frac(int *idx, int n, const double *f)
{
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0 && (f[idx[j - 1]] > f[idx[j]] ||
                                  (f[idx[j - 1]] == f[idx[j]] && idx[j - 1] > idx[j]));
             j--) {
            int t = idx[j];
            idx[j] = idx[j - 1];
            idx[j - 1] = t;
        }
}

kvt_status kvt_sel_chunk(const kvt_layer_ctx *c, const char *policy, int C, const int *B,
                         const double *frac, int n_b, kvt_layer_selection *sel)
{
    KVT_RETURN_IF(!sel->has_fixed || sel->merged || sel->step_head, KVT_ERR_INVALID_ARG,
                  "%s: chunk_length= shares the budget over chunks of a plain kept set, and this "
                  "policy keeps %s",
                  policy, sel->merged ? "merged entries" : "a set per decode step");
    const int T = sel->T, H = sel->n_heads, nc = (T + C - 1) / C;
    int32_t *by = kvt_malloc((size_t)T * sizeof(int32_t));
    int32_t *out = kvt_malloc((size_t)T * sizeof(int32_t));
    int *start = kvt_malloc((size_t)(2 * nc + 1) * sizeof(int));
    int *keep = kvt_malloc((size_t)nc * sizeof(int));
    int *ob = kvt_malloc((size_t)(n_b > 0 ? n_b : 1) * sizeof(int));
    uint8_t *taken = kvt_malloc((size_t)T);
    double *f = kvt_malloc((size_t)(n_b > 0 ? n_b : 1) * sizeof(double));
    kvt_status st = KVT_OK;
    if (!by || !out || !start || !keep || !ob || !taken || !f) {
        st = kvt_error_set(KVT_ERR_NOMEM, "%s: out of memory", policy);
        goto out;
    }
    for (int b = 0; b < n_b; b++) {
        f[b] = frac ? frac[b] : (double)B[b] / T;
        ob[b] = b;
    }
    sort_by_frac(ob, n_b, f);
    for (int h = 0; h < H; h++) {
        if (sel->border) { /* each budget's own ranking, top-k per chunk, then the rest */
            for (int b = 0; b < n_b; b++) {
                int32_t *r = sel->border + ((size_t)b * H + (size_t)h) * T;
                group(r, T, C, nc, by, start);
                memset(taken, 0, (size_t)T);
                int k = 0;
                for (int ch = 0; ch < nc; ch++)
                    for (int i = 0; i < chunk_keep(start[ch + 1] - start[ch], f[b]); i++)
                        taken[out[k++] = by[start[ch] + i]] = 1;
                sel->count[(size_t)b * H + h] = k;
                for (int i = 0; i < T; i++)
                    if (!taken[r[i]])
                        out[k++] = r[i];
                memcpy(r, out, (size_t)T * sizeof(int32_t));
            }
            continue;
        }
        /* one ranking: the budgets by share, each adding its chunks' next tokens */
        int32_t *r = sel->order + (size_t)h * T;
        group(r, T, C, nc, by, start);
        memset(taken, 0, (size_t)T);
        memset(keep, 0, (size_t)nc * sizeof(int));
        int k = 0;
        for (int j = 0; j < n_b; j++) {
            const int b = ob[j];
            for (int ch = 0; ch < nc; ch++) {
                const int n = chunk_keep(start[ch + 1] - start[ch], f[b]);
                for (; keep[ch] < n; keep[ch]++)
                    taken[out[k++] = by[start[ch] + keep[ch]]] = 1;
            }
            sel->count[(size_t)b * H + h] = k;
        }
        for (int i = 0; i < T; i++)
            if (!taken[r[i]])
                out[k++] = r[i];
        memcpy(r, out, (size_t)T * sizeof(int32_t));
    }
out:
    kvt_free(by);
    kvt_free(out);
    kvt_free(start);
    kvt_free(keep);
    kvt_free(ob);
    kvt_free(taken);
    kvt_free(f);
    return st;
}

/* ---- chunk_scores=own|kvpress: each chunk ranked as a prompt of its own ---- */

kvt_status kvt_sel_chunk_own(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                             kvt_layer_selection *sel)
{
    const char *what;
    const int m = kvt_chunk_min_len(p, &what); /* (the trace's check refuses it first) */
    if (m > 0)
        KVT_FORWARD(kvt_chunk_window_check(p->def->name, p->o.chunk_length, m, what, c->T));
    KVT_FORWARD(p->def->chunk_rank(c, p, p->o.chunk_length, B, n_b, sel));
    kvt_counts_uniform(sel, B, n_b); /* kvt_sel_chunk sets each chunk's share */
    return KVT_OK;
}

void kvt_sel_put_chunk(kvt_layer_selection *sel, int h, int a, int n, const int32_t *loc)
{
    int32_t *o = sel->order + (size_t)h * sel->T + a;
    for (int i = 0; i < n; i++)
        o[i] = a + loc[i];
}

kvt_status kvt_chunk_rank_kv_array(kvt_layer_ctx *c, const kvt_policy *p, const double *x,
                                   double sign, int C, int n_b, kvt_layer_selection *sel)
{
    const int T = c->T;
    const int Cn = C < T ? C : T;
    KVT_FORWARD(kvt_sel_init(sel, c, p->o.per_query, p->o.window < T ? p->o.window : T, n_b, true));
    double *s = kvt_malloc((size_t)Cn * sizeof(double));
    int32_t *loc = kvt_malloc((size_t)Cn * sizeof(int32_t));
    kvt_status st =
        s && loc ? KVT_OK : kvt_error_set(KVT_ERR_NOMEM, "%s: out of memory", p->def->name);
    for (int h = 0; h < sel->n_heads && !st; h++) {
        const double *xg = x + (size_t)kvt_ctx_kv_of(c, p->o.per_query, h) * T;
        for (int a = 0; a < T && !st; a += C) {
            const int n = T - a < C ? T - a : C, W = p->o.window < n ? p->o.window : n;
            for (int j = 0; j < n - W; j++)
                s[j] = sign * xg[a + j];
            if (!(st = kvt_rank_window(s, n, W, loc)))
                kvt_sel_put_chunk(sel, h, a, n, loc);
        }
    }
    kvt_free(s);
    kvt_free(loc);
    return st;
}

kvt_status kvt_chunk_turn_queries(const kvt_layer_ctx *c, const char *policy,
                                  const kvt_rope_pairs *r, const float *q, int t0, int n, int to,
                                  float *qn)
{
    const int D = c->D;
    memcpy(qn, q + (size_t)t0 * D, (size_t)n * D * sizeof(float));
    if (!r || !r->on || to == t0)
        return KVT_OK;
    for (int k = 0; k < r->half; k++) { /* pair by pair: a run of equal turns shares its cos */
        int64_t last = INT64_MIN;
        double co = 1.0, sn = 0.0;
        for (int i = 0; i < n; i++) {
            const int64_t d = (int64_t)kvt_rope_pos(c->in, r->row[k], to + i) -
                              kvt_rope_pos(c->in, r->row[k], t0 + i);
            if (d != last) {
                const double ang = (double)d * r->freq[k];
                co = cos(ang);
                sn = sin(ang);
                last = d;
            }
            KVT_RETURN_IF(!isfinite(co) || !isfinite(sn), KVT_ERR_NAN,
                          "%s: the header's model.rope turns pair %d of token %d by an angle that "
                          "is not finite (frequency %g)",
                          policy, k, t0 + i, r->freq[k]);
            float *y = qn + (size_t)i * D;
            const double u = y[r->lo[k]], v = y[r->hi[k]];
            y[r->lo[k]] = (float)(co * u - sn * v);
            y[r->hi[k]] = (float)(co * v + sn * u);
        }
    }
    return KVT_OK;
}

int kvt_chunk_min_len(const kvt_policy *p, const char **what)
{
    const char m = p->o.chunk_scores && p->def->chunk_rank ? p->def->chunk_min : 0;
    *what = m == 's' ? "sinks" : m == 'p' ? "sinks+recent" : "window";
    return m == 'w'   ? p->o.window
           : m == 's' ? p->o.sinks
           : m == 'p' ? p->o.sinks + p->o.recent
           : m == '1' ? 1
                      : 0;
}

kvt_status kvt_chunk_window_check(const char *who, int C, int W, const char *what, int T)
{
    const int last = T - (T - 1) / C * C; /* the last chunk's tokens */
    KVT_RETURN_IF(C <= W && C < T, KVT_ERR_INVALID_ARG,
                  "%s: chunk_length=%d: scoring each chunk on its own needs chunks longer than "
                  "%s=%d (kvpress fails on such chunks too)",
                  who, C, what, W);
    KVT_RETURN_IF(last <= W, KVT_ERR_INVALID_ARG,
                  "%s: chunk_length=%d leaves a last chunk of %d token%s, and scoring it on its "
                  "own needs more than %s=%d (kvpress fails on such a chunk too): "
                  "choose a chunk_length that leaves more, or a smaller %s",
                  who, C, last, last == 1 ? "" : "s", what, W, what);
    return KVT_OK;
}

kvt_status kvt_chunk_window_mass(kvt_layer_ctx *c, const char *policy, int C, int W, bool kvpress,
                                 double *a)
{
    const int T = c->T, D = c->D, Cn = C < T ? C : T, nc = (T + C - 1) / C;
    KVT_FORWARD(kvt_ctx_check_q_all(c, policy));
    KVT_FORWARD(kvt_ctx_fetch(c, KVT_CTX_KV));
    kvt_rope_pairs r;
    memset(&r, 0, sizeof(r));
    if (kvpress && nc > 1)
        KVT_FORWARD(kvt_rope_pairs_init(c, policy, &r));
    float *qbuf = c->in->q_all ? NULL : kvt_malloc((size_t)T * D * sizeof(float));
    float *qw = kvt_malloc((size_t)W * D * sizeof(float));
    float *pr = kvt_malloc((size_t)W * Cn * sizeof(float));
    double *work = kvt_malloc((size_t)Cn * sizeof(double));
    int *vis = kvt_malloc((size_t)W * sizeof(int));
    kvt_status st = KVT_OK;
    if ((!c->in->q_all && !qbuf) || !qw || !pr || !work || !vis) {
        st = kvt_error_set(KVT_ERR_NOMEM, "%s: out of memory", policy);
        goto out;
    }
    for (int h = 0; h < c->Hq && !st; h++) {
        const float *q;
        if ((st = kvt_ctx_q_all_head(c, policy, h, qbuf, &q)))
            break;
        const float *K = c->k + (size_t)(h / c->Gs) * T * D;
        for (int a0 = 0; a0 < T && !st; a0 += C) {
            const int n = T - a0 < C ? T - a0 : C;
            for (int i = 0; i < W; i++) /* query i sits at chunk position n - W + i */
                vis[i] = n - W + i + 1;
            if (!(st = kvt_chunk_turn_queries(c, policy, kvpress ? &r : NULL, q, a0 + n - W, W,
                                              T - W, qw)) &&
                !(st = kvt_attn_probs(qw, W, D, K + (size_t)a0 * D, n, vis, NULL, 0, NULL, c->scale,
                                      pr, NULL, NULL, work)))
                kvt_col_mean_ref(pr, W, n, n - W, a + (size_t)h * T + a0);
        }
    }
out:
    kvt_rope_pairs_free(&r);
    kvt_free(qbuf);
    kvt_free(qw);
    kvt_free(pr);
    kvt_free(work);
    kvt_free(vis);
    return st;
}
