/* policy_chunkkv.c - `chunkkv` (POLICIES §11: ChunkKV, arXiv 2502.00299; kvpress
 * ChunkKVPress over SnapKVPress). The prefix P = [0, T-W) is cut into chunks of `chunk` tokens
 * from token 0 (the last one may be shorter). A chunk's score is the mean over its tokens of
 * the SnapKV window score (§0.1: pooled, GQA-reduced) summed over the layer's heads, as kvpress
 * scores it; the layer keeps the window plus the floor((B-W)/chunk) best chunks, whole, the
 * same chunks for every head (ties: lower chunk). A short last chunk among them keeps fewer
 * than B tokens; the results record the count kept. Defaults: chunk 10 (the paper's), W=32,
 * kernel 5, avgpool, GQA mean.
 * reuse=N: the paper's layer-wise index reuse. The layers form groups of N from layer 0, and every
 * layer of a group keeps the chunks the group's first layer selects (its window scores, its
 * ranking, its counts), measured with its own queries, keys and values. The first layers' window
 * scores are computed by the policy's bind from the trace (the same kernels as a layer's own on
 * the CPU), so a replay of one layer alone is refused.
 * align=kvpress: kvpress's own accounting instead. The whole sequence [0, T) is cut into chunks
 * from token 0, the window's tokens scoring the largest prefix score of any head (SnapKVPress
 * pads the window with it), and the layer keeps ChunkKVPress's max(1, int(n_chunks*(1-ratio)))
 * best chunks, in double as kvpress computes it, at ratio = 1 - f where f is the budget as the
 * fraction of T it was written as (20% -> 0.2; 64 tokens -> 64/T), which may be up to chunk-1
 * tokens more than B. */
#include <string.h>

#include "../replay_internal.h"
#include "kvt_trace.h"

typedef struct chunkkv_state {
    int n_g, T, H;
    double **s; /* [n_g = ceil(L / reuse)] each group's first layer's window scores [H, P] */
} chunkkv_state;

static void unbind_chunkkv(void *state)
{
    chunkkv_state *s = state;
    for (int g = 0; s && s->s && g < s->n_g; g++)
        kvt_free(s->s[g]);
    if (s)
        kvt_free(s->s);
    kvt_free(s);
}

/* layer l's window scores [H, P] as kvt_ctx_window_scores computes them on the CPU: each KV
 * group's window queries at once (kvt_attn_probs, as the layer context does), then
 * kvt_window_scores_from_probs */
static kvt_status layer_scores(kvt_trace_reader *r, int l, int Hq, int Hkv, int T,
                               const kvt_policy_opts *o, double *s)
{
    kvt_bind_qk x;
    KVT_FORWARD(kvt_bind_read_qk(r, l, KVT_KIND_Q_WINDOW, Hq, Hkv, T, "chunkkv", &x));
    const int D = x.D, Wt = x.nq, W = o->window < T ? o->window : T, P = T - W;
    const int nqw = Hq / Hkv * Wt; /* a KV group's window queries */
    float *pr = NULL;
    double *work = NULL;
    int *vis = NULL;
    kvt_status st = KVT_OK;
    if (Wt < W) {
        st = kvt_error_set(KVT_ERR_INVALID_ARG,
                           "chunkkv: window=%d but layer %d stores %d window queries (give "
                           "window=%d or less)",
                           W, l, Wt, Wt);
        goto out;
    }
    if (P <= 0)
        goto out;
    pr = kvt_malloc((size_t)Hq * Wt * T * sizeof(float)); /* [Hq, Wt, T] */
    work = kvt_malloc(((size_t)T + 1) * sizeof(double));
    vis = kvt_malloc((size_t)nqw * sizeof(int));
    if (!pr || !work || !vis) {
        st = kvt_error_set(KVT_ERR_NOMEM, "chunkkv: out of memory");
        goto out;
    }
    for (int i = 0; i < nqw; i++) /* query i of the window sits at T - Wt + i */
        vis[i] = T - Wt + i % Wt + 1;
    for (int g = 0; g < Hkv && !st; g++)
        st = kvt_attn_probs(x.q + (size_t)g * nqw * D, nqw, D, x.k + (size_t)g * T * D, T, vis,
                            NULL, 0, NULL, x.scale, pr + (size_t)g * nqw * T, NULL, NULL, work);
    if (!st)
        st = kvt_window_scores_from_probs(pr, Hq, Hkv, Wt, T, W, o->kernel, o->pool, o->reduce,
                                          o->per_query, s);
out:
    kvt_free(x.q);
    kvt_free(x.k);
    kvt_free(pr);
    kvt_free(work);
    kvt_free(vis);
    return st;
}

/* kvt_replay_check_trace: bind's refusals that the shapes decide (each group's first layer's
 * window queries and keys, enough of them), without computing its scores */
static kvt_status check_chunkkv(const kvt_policy *p, const char *path, int L, int Hq, int Hkv,
                                int T)
{
    const kvt_policy_opts *o = &p->o;
    const int W = o->window < T ? o->window : T;
    return o->reuse <= 1 ? KVT_OK
                         : kvt_bind_check_windows(path, "chunkkv", L, o->reuse, Hq, Hkv, T, W);
}

/* reuse > 1: before the trace's first layer, every group's first layer's window scores */
static kvt_status bind_chunkkv(const kvt_policy *p, const char *path, int L, int Hq, int Hkv, int T,
                               void **state)
{
    const kvt_policy_opts *o = &p->o;
    if (o->reuse <= 1)
        return KVT_OK;
    const int W = o->window < T ? o->window : T, P = T - W, H = o->per_query ? Hq : Hkv;
    const int n_g = (L + o->reuse - 1) / o->reuse;
    chunkkv_state *s = kvt_calloc(1, sizeof(*s));
    kvt_trace_reader *r = NULL;
    kvt_status st = KVT_OK;
    if (!s || !(s->s = kvt_calloc((size_t)n_g + 1, sizeof(double *)))) {
        st = kvt_error_set(KVT_ERR_NOMEM, "chunkkv: out of memory");
        goto out;
    }
    s->n_g = n_g, s->T = T, s->H = H;
    if ((st = kvt_trace_reader_open(path, &r)))
        goto out;
    for (int g = 0; g < n_g && !st; g++) {
        if (!(s->s[g] = kvt_malloc((size_t)H * (P > 0 ? P : 1) * sizeof(double))))
            st = kvt_error_set(KVT_ERR_NOMEM, "chunkkv: out of memory");
        else
            st = layer_scores(r, g * o->reuse, Hq, Hkv, T, o, s->s[g]);
    }
out:
    if (r)
        kvt_trace_reader_close(r);
    if (st)
        unbind_chunkkv(s);
    else
        *state = s;
    return st;
}

static kvt_status sel_chunkkv(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                              kvt_layer_selection *sel)
{
    const kvt_policy_opts *o = &p->o;
    const double *s;
    KVT_FORWARD(kvt_ctx_check_window(c, "chunkkv", o->window));
    if (o->reuse > 1) { /* the group's first layer's scores */
        const chunkkv_state *cs = p->state;
        KVT_RETURN_IF(!cs, KVT_ERR_INVALID_ARG,
                      "chunkkv: reuse=%d takes a layer's chunks from the first layer of its group: "
                      "replay the whole trace (kvtrace replay), not one layer",
                      o->reuse);
        KVT_RETURN_IF(cs->T != c->T || cs->H != kvt_ctx_heads(c, o->per_query) ||
                          c->layer / o->reuse >= cs->n_g,
                      KVT_ERR_STATE, "chunkkv: bound to another trace's shape");
        s = cs->s[c->layer / o->reuse];
    } else
        KVT_FORWARD(
            kvt_ctx_window_scores(c, o->window, o->kernel, o->pool, o->reduce, o->per_query, &s));
    KVT_FORWARD(kvt_sel_init(sel, c, o->per_query, o->window, n_b, true));
    const int T = c->T, W = o->window < T ? o->window : T, P = T - W, C = o->chunk;
    const bool kvp = o->chunk_kvpress;
    const int N = kvp ? T : P; /* the tokens cut into chunks */
    const int H = kvt_ctx_heads(c, o->per_query), n_chunks = (N + C - 1) / C;
    const size_t nc = (size_t)(n_chunks > 0 ? n_chunks : 1), Nn = (size_t)(N > 0 ? N : 1);
    double *tok = kvt_calloc(Nn, sizeof(double)), *cs = kvt_calloc(nc, sizeof(double));
    int32_t *cord = kvt_calloc(nc, sizeof(int32_t)), *work = kvt_calloc(nc, sizeof(int32_t));
    kvt_status st = KVT_OK;
    if (!tok || !cs || !cord || !work) {
        st = kvt_error_set(KVT_ERR_NOMEM, "chunkkv: out of memory");
        goto cleanup;
    }
    double top = 0; /* align=kvpress: the window's score, the largest prefix score of any head */
    for (size_t i = 0; kvp && i < (size_t)H * P; i++)
        top = i == 0 || s[i] > top ? s[i] : top;
    for (int h = 0; h < H; h++) { /* the heads' sum, head by head */
        for (int j = 0; j < P; j++)
            tok[j] += s[(size_t)h * P + j];
        for (int j = P; j < N; j++)
            tok[j] += top;
    }
    for (int i = 0; i < n_chunks; i++) { /* the mean, exact when the tokens are equal (the */
        int j0 = i * C, j1 = j0 + C < N ? j0 + C : N; /* window's): such chunks tie */
        double d = 0;
        for (int j = j0; j < j1; j++)
            d += tok[j] - tok[j0];
        cs[i] = tok[j0] + d / (j1 - j0);
    }
    kvt_chunk_order(cs, n_chunks, C, N, kvp ? 0 : W, T, sel->order, work, cord);
    for (int h = 1; h < sel->n_heads; h++)
        memcpy(sel->order + (size_t)h * T, sel->order, (size_t)T * sizeof(int32_t));
    for (int b = 0; b < n_b; b++) {
        int keep;
        if (B[b] >= T)
            keep = T;
        else if (kvp) { /* kvpress: int(n_chunks * (1 - ratio)) in double, at least one */
            double f = c->budget_frac ? c->budget_frac[b] : (double)B[b] / T, ratio = 1.0 - f;
            double x = (double)n_chunks * (1.0 - ratio);
            int take = x >= 1.0 ? (int)x : 1;
            keep = kvt_chunk_count(cord, take, n_chunks, C, N);
        } else
            keep = B[b] <= W ? B[b] : W + kvt_chunk_count(cord, (B[b] - W) / C, n_chunks, C, P);
        for (int h = 0; h < sel->n_heads; h++)
            sel->count[(size_t)b * sel->n_heads + h] = keep;
    }
cleanup:
    kvt_free(tok);
    kvt_free(cs);
    kvt_free(cord);
    kvt_free(work);
    return st;
}

static void d_chunkkv(kvt_policy_opts *o)
{
    o->chunk = 10;
}

const kvt_policy_def kvt_policy_def_chunkkv = {
    .name = "chunkkv",
    .summary = "ChunkKV: whole chunks of the prefix by their SnapKV score, one set per layer",
    .flags = KVT_POLICY_WINDOW_QUERY,
    .keys = "window,kernel,pool,reduce,heads,chunk,align,reuse",
    .defaults = d_chunkkv,
    .bind = bind_chunkkv,
    .check = check_chunkkv,
    .unbind = unbind_chunkkv,
    .select = sel_chunkkv,
};
