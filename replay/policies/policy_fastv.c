/* policy_fastv.c - `fastv` (POLICIES §11: FastV, arXiv 2403.06764; released code
 * pkunlp-icler/FastV): sequence pruning of the visual tokens after layer K. Layers 0..K-1
 * (dense_layers=K, default 2) keep every token. From layer K on, every head of every layer keeps
 * the same set: the text (and other non-visual) tokens, then the image and video tokens that
 * layer K-1's attention ranks highest: the mean over its query heads of the attention each token
 * receives, summed over every prompt query (the default, POLICIES: the trace's column sums, or
 * computed from its Q_all), or over the last N prompt queries with last=N (FastV's released code
 * ranks by the last query's: last=1).
 *
 * At budget B the first B of that ranking are kept: the non-visual tokens, most recent first,
 * then the visual tokens by score (ties to the lower index). FastV's R = 50% is
 * B = n_non_visual + n_visual / 2; a budget below the non-visual count drops the oldest of them,
 * which FastV never does. The ranking comes from another layer, so it is made once per trace
 * before any layer is replayed (bind); a layer replay alone cannot run a layer >= K.
 */
#include <math.h>
#include <string.h>

#include "../replay_internal.h"
#include "kvt_trace.h"

typedef struct fastv_state {
    int T;
    int32_t *order; /* [T] the ranking of layers >= K */
} fastv_state;

static void d_fastv(kvt_policy_opts *o)
{
    o->dense_layers = 2;
    o->last = 0; /* every prompt query */
}

static kvt_status init_fastv(kvt_policy *p)
{
    KVT_RETURN_IF(p->o.dense_layers < 1, KVT_ERR_INVALID_ARG,
                  "fastv: dense_layers=0: the ranking needs layer K-1's attention (K >= 1)");
    return KVT_OK;
}

static void unbind_fastv(void *state)
{
    fastv_state *s = state;
    if (s)
        kvt_free(s->order);
    kvt_free(s);
}

/* score[T]: the attention each token receives at layer l, summed over the prompt queries (all,
 * or the last n of the stored window), averaged over the query heads */
static kvt_status layer_scores(kvt_trace_reader *r, int l, int Hq, int Hkv, int T, int n_last,
                               double *score)
{
    uint32_t nh, nt, dim;
    kvt_dtype dt;
    float *cs = NULL, *pr = NULL;
    double *work = NULL, *acc = NULL;
    int *n_vis = NULL;
    kvt_status st = KVT_OK;
    memset(score, 0, (size_t)T * sizeof(double));
    if (!n_last && !kvt_trace_reader_shape(r, l, KVT_KIND_ATTN_COLSUM, &nh, &nt, &dim, &dt)) {
        KVT_RETURN_IF(nh != (uint32_t)Hq || nt != (uint32_t)T || dim != 1, KVT_ERR_CORRUPT,
                      "fastv: layer %d's column sums are [%u, %u], not [%d, %d]", l, nh, nt, Hq, T);
        KVT_FORWARD(kvt_bind_read_f32(r, l, KVT_KIND_ATTN_COLSUM, (uint32_t)Hq, (size_t)Hq * T,
                                      "fastv", &cs));
        for (int h = 0; h < Hq; h++)
            for (int j = 0; j < T; j++)
                score[j] += cs[(size_t)h * T + j] / Hq;
        kvt_free(cs);
        return KVT_OK;
    }
    const int qkind = n_last ? KVT_KIND_Q_WINDOW : KVT_KIND_Q_ALL;
    KVT_RETURN_IF(
        !n_last && kvt_trace_reader_shape(r, l, qkind, &nh, &nt, &dim, &dt), KVT_ERR_NOT_FOUND,
        "fastv: layer %d has no attention column sums and no Q_all (capture with --colsum "
        "or --q-all; or last=1 ranks by the last prompt query, as FastV's code does)",
        l);
    kvt_bind_qk x;
    KVT_FORWARD(kvt_bind_read_qk(r, l, qkind, Hq, Hkv, T, "fastv", &x));
    const int D = x.D, nq = x.nq;
    const float *q = x.q, *k = x.k;
    const double scale = x.scale;
    if (n_last && nq < n_last) {
        st = kvt_error_set(KVT_ERR_INVALID_ARG,
                           "fastv: layer %d stores %d window queries; last=%d needs %d or more", l,
                           nq, n_last, n_last);
        goto out;
    }
    if (!n_last && nq != T) {
        st = kvt_error_set(KVT_ERR_CORRUPT, "fastv: layer %d's Q_all has %d queries, not %d", l, nq,
                           T);
        goto out;
    }
    work = kvt_malloc(((size_t)T + 1) * sizeof(double));
    acc = kvt_malloc((size_t)T * sizeof(double));
    pr = kvt_malloc((size_t)n_last * T * sizeof(float) + 1);
    n_vis = kvt_malloc((size_t)n_last * sizeof(int) + 1);
    if (!work || !acc || !pr || !n_vis) {
        st = kvt_error_set(KVT_ERR_NOMEM, "fastv: out of memory");
        goto out;
    }
    for (int i = 0; i < n_last; i++) /* the last n_last prompt queries see keys 0..their position */
        n_vis[i] = T - n_last + i + 1;
    for (int h = 0; h < Hq; h++) {
        const float *kh = k + (size_t)(h / (Hq / Hkv)) * T * D;
        if (!n_last) { /* the column sums from every prompt query */
            if ((st = kvt_attn_colsum(q + (size_t)h * T * D, kh, T, D, scale, work, acc)))
                goto out;
            for (int j = 0; j < T; j++)
                score[j] += acc[j] / Hq;
            continue;
        }
        /* the last n_last window queries' probabilities, as the replay computes window rows */
        if ((st = kvt_attn_probs(q + ((size_t)h * nq + nq - n_last) * D, n_last, D, kh, T, n_vis,
                                 NULL, 0, NULL, scale, pr, NULL, NULL, work)))
            goto out;
        for (int i = 0; i < n_last; i++)
            for (int j = 0; j < n_vis[i]; j++)
                score[j] += pr[(size_t)i * T + j] / Hq;
    }
out:
    kvt_free(pr);
    kvt_free(n_vis);
    kvt_free(x.q);
    kvt_free(x.k);
    kvt_free(work);
    kvt_free(acc);
    return st;
}

/* the trace's modality table [T] into mod, or its refusal */
static kvt_status read_modality(kvt_trace_reader *r, int T, uint8_t *mod)
{
    KVT_RETURN_IF(
        kvt_trace_reader_read(r, -1, KVT_KIND_MODALITY, 0, 1, KVT_DTYPE_INVALID, mod, (size_t)T),
        KVT_ERR_NOT_FOUND, "fastv: the trace has no modality table (which tokens are visual)");
    return KVT_OK;
}

/* kvt_replay_check_trace: bind's refusals that the modality table and layer K-1's shapes
 * decide, without computing the ranking */
static kvt_status check_fastv(const kvt_policy *p, const char *path, int L, int Hq, int Hkv, int T)
{
    const int K = p->o.dense_layers, n_last = p->o.last, l = K - 1;
    if (K >= L) /* no layer is pruned */
        return KVT_OK;
    kvt_trace_reader *r = NULL;
    uint8_t *mod = kvt_malloc((size_t)T + 1);
    kvt_status st = KVT_OK;
    uint32_t nh, nt, dim;
    kvt_dtype dt;
    int nq;
    if (!mod)
        return kvt_error_set(KVT_ERR_NOMEM, "fastv: out of memory");
    if ((st = kvt_trace_reader_open(path, &r)))
        goto out;
    if ((st = read_modality(r, T, mod)))
        goto out;
    if (!n_last && !kvt_trace_reader_shape(r, l, KVT_KIND_ATTN_COLSUM, &nh, &nt, &dim, &dt)) {
        if (nh != (uint32_t)Hq || nt != (uint32_t)T || dim != 1)
            st = kvt_error_set(KVT_ERR_CORRUPT,
                               "fastv: layer %d's column sums are [%u, %u], not "
                               "[%d, %d]",
                               l, nh, nt, Hq, T);
        goto out;
    }
    const int qkind = n_last ? KVT_KIND_Q_WINDOW : KVT_KIND_Q_ALL;
    if (!n_last && kvt_trace_reader_shape(r, l, qkind, &nh, &nt, &dim, &dt)) {
        st = kvt_error_set(KVT_ERR_NOT_FOUND,
                           "fastv: layer %d has no attention column sums and no Q_all (capture "
                           "with --colsum or --q-all; or last=1 ranks by the last prompt query, "
                           "as FastV's code does)",
                           l);
        goto out;
    }
    if ((st = kvt_bind_check_qk(r, l, qkind, Hq, Hkv, T, "fastv", &nq, NULL)))
        goto out;
    if (n_last && nq < n_last)
        st = kvt_error_set(KVT_ERR_INVALID_ARG,
                           "fastv: layer %d stores %d window queries; last=%d needs %d or more", l,
                           nq, n_last, n_last);
    else if (!n_last && nq != T)
        st = kvt_error_set(KVT_ERR_CORRUPT, "fastv: layer %d's Q_all has %d queries, not %d", l, nq,
                           T);
out:
    if (r)
        kvt_trace_reader_close(r);
    kvt_free(mod);
    return st;
}

/* before the trace's first layer: layer K-1's ranking of the visual tokens */
static kvt_status bind_fastv(const kvt_policy *p, const char *path, int L, int Hq, int Hkv, int T,
                             void **state)
{
    const int K = p->o.dense_layers;
    if (K >= L) /* no layer is pruned */
        return KVT_OK;
    kvt_trace_reader *r = NULL;
    uint8_t *mod = kvt_malloc((size_t)T + 1);
    double *score = kvt_malloc((size_t)T * sizeof(double) + 1);
    int32_t *vis = kvt_malloc((size_t)T * sizeof(int32_t) + 1), *rank = NULL, *work = NULL;
    double *vs = kvt_malloc((size_t)T * sizeof(double) + 1);
    fastv_state *s = kvt_calloc(1, sizeof(*s));
    kvt_status st = KVT_OK;
    if (!mod || !score || !vis || !vs || !s || !(s->order = kvt_malloc((size_t)T * 4 + 4)) ||
        !(rank = kvt_malloc((size_t)T * 4 + 4)) || !(work = kvt_malloc((size_t)T * 4 + 4))) {
        st = kvt_error_set(KVT_ERR_NOMEM, "fastv: out of memory");
        goto out;
    }
    s->T = T;
    if ((st = kvt_trace_reader_open(path, &r)))
        goto out;
    if ((st = read_modality(r, T, mod)))
        goto out;
    if ((st = layer_scores(r, K - 1, Hq, Hkv, T, p->o.last, score)))
        goto out;
    int n = 0, nv = 0;
    for (int j = T - 1; j >= 0; j--) /* non-visual tokens, most recent first */
        if (mod[j] != KVT_MOD_IMAGE && mod[j] != KVT_MOD_VIDEO)
            s->order[n++] = j;
    for (int j = 0; j < T; j++)
        if (mod[j] == KVT_MOD_IMAGE || mod[j] == KVT_MOD_VIDEO)
            vis[nv] = j, vs[nv++] = score[j];
    if ((st = kvt_rank_desc(vs, nv, rank, work)))
        goto out;
    for (int i = 0; i < nv; i++) /* then the visual ones by layer K-1's attention */
        s->order[n + i] = vis[rank[i]];
out:
    if (r)
        kvt_trace_reader_close(r);
    kvt_free(mod);
    kvt_free(score);
    kvt_free(vis);
    kvt_free(vs);
    kvt_free(rank);
    kvt_free(work);
    if (st)
        unbind_fastv(s);
    else
        *state = s;
    return st;
}

static kvt_status sel_fastv(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                            kvt_layer_selection *sel)
{
    const fastv_state *s = p->state;
    const int T = c->T, dense = c->layer < p->o.dense_layers;
    KVT_RETURN_IF(!dense && !s, KVT_ERR_INVALID_ARG,
                  "fastv: layer %d is ranked by layer %d's attention: replay the whole trace "
                  "(kvtrace replay), not one layer",
                  c->layer, p->o.dense_layers - 1);
    KVT_RETURN_IF(!dense && s->T != T, KVT_ERR_STATE,
                  "fastv: bound to a trace of %d tokens, not %d", s->T, T);
    KVT_FORWARD(kvt_sel_init(sel, c, p->o.per_query, 0, n_b, true));
    for (int h = 0; h < sel->n_heads; h++)
        for (int t = 0; t < T; t++)
            sel->order[(size_t)h * T + t] = dense ? t : s->order[t];
    for (int b = 0; b < n_b; b++)
        for (int h = 0; h < sel->n_heads; h++)
            sel->count[(size_t)b * sel->n_heads + h] = dense || B[b] > T ? T : B[b];
    return KVT_OK;
}

const kvt_policy_def kvt_policy_def_fastv = {
    .name = "fastv",
    .summary = "FastV: layers below dense_layers=K (2) whole; later layers keep the non-visual "
               "tokens, then the image/video tokens layer K-1's attention ranks highest (summed "
               "over every prompt query, or the last N with last=N; FastV's code: last=1)",
    .flags = KVT_POLICY_LAYER_BUDGETS,
    .keys = "heads,dense_layers,last",
    .defaults = d_fastv,
    .init = init_fastv,
    .bind = bind_fastv,
    .check = check_fastv,
    .unbind = unbind_fastv,
    .select = sel_fastv,
};
