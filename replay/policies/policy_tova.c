/* policy_tova.c - `tova` (POLICIES §8): score[j] = attention of the last prompt query to j,
 * averaged over every query head of the layer; one set for all heads of the layer; the last
 * token is always kept (recorded window 1). */
#include <math.h>
#include <string.h>

#include "../replay_internal.h"

static kvt_status sel_tova(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                           kvt_layer_selection *sel)
{
    KVT_FORWARD(kvt_ctx_fetch(c, KVT_CTX_PRW));
    const int T = c->T, Hq = c->Hq, P = T - 1;
    KVT_FORWARD(kvt_sel_init(sel, c, p->o.per_query, 1, n_b, true));
    double *s = kvt_calloc((size_t)P + 1, sizeof(double));
    KVT_RETURN_IF(!s, KVT_ERR_NOMEM, "tova: out of memory");
    for (int h = 0; h < Hq; h++) {
        const float *last = c->prw + ((size_t)h * c->Wt + (c->Wt - 1)) * T;
        for (int j = 0; j < P; j++)
            s[j] += last[j];
    }
    for (int j = 0; j < P; j++)
        s[j] /= Hq;
    if (!isnan(p->o.dms)) { /* DMSPress over TOVAPress: the same scores for every head */
        const int H = sel->n_heads;
        double *sh = kvt_malloc(((size_t)H * P + 1) * sizeof(double));
        kvt_status st = sh ? KVT_OK : kvt_error_set(KVT_ERR_NOMEM, "tova: out of memory");
        for (int h = 0; h < H && !st; h++)
            memcpy(sh + (size_t)h * P, s, (size_t)P * sizeof(double));
        if (!st)
            st = kvt_sel_rank_counts(c, p, sh, 1, B, n_b, sel);
        kvt_free(sh);
        kvt_free(s);
        return st;
    }
    kvt_status st = kvt_rank_window(s, T, 1, sel->order);
    for (int h = 1; h < sel->n_heads && !st; h++)
        for (int t = 0; t < T; t++)
            sel->order[(size_t)h * T + t] = sel->order[t];
    kvt_free(s);
    kvt_counts_uniform(sel, B, n_b);
    return st;
}

/* chunk_scores=own|kvpress: kvpress's ChunkPress(TOVAPress): each chunk's last query's
 * attention to the chunk, the mean over every query head, the chunk's last token first */
static kvt_status chunk_tova(kvt_layer_ctx *c, const kvt_policy *p, int C, const int *B, int n_b,
                             kvt_layer_selection *sel)
{
    const int T = c->T, Hq = c->Hq, Cn = C < T ? C : T;
    KVT_FORWARD(kvt_sel_init(sel, c, p->o.per_query, 1, n_b, true));
    double *a = kvt_calloc((size_t)Hq * T, sizeof(double));
    double *s = kvt_malloc((size_t)Cn * sizeof(double));
    int32_t *loc = kvt_malloc((size_t)Cn * sizeof(int32_t));
    kvt_status st = a && s && loc ? KVT_OK : kvt_error_set(KVT_ERR_NOMEM, "tova: out of memory");
    if (!st)
        st = kvt_chunk_window_mass(c, "tova", C, 1, p->o.chunk_scores == KVT_CHUNK_KVPRESS, a);
    for (int a0 = 0; a0 < T && !st; a0 += C) {
        const int n = T - a0 < C ? T - a0 : C;
        for (int j = 0; j < n - 1; j++) {
            double x = 0.0;
            for (int h = 0; h < Hq; h++)
                x += a[(size_t)h * T + a0 + j];
            s[j] = x / Hq;
        }
        if ((st = kvt_rank_window(s, n, 1, loc)))
            break;
        for (int h = 0; h < sel->n_heads; h++)
            kvt_sel_put_chunk(sel, h, a0, n, loc);
    }
    kvt_free(a);
    kvt_free(s);
    kvt_free(loc);
    return st;
}

/* decoding=N: DecodingPress(TOVAPress) (decoding.c's simulate_steps). TOVAPress reads the last
 * buffered hidden state, step s's token, at its own position: step s's query attends to the
 * cache; each entry's softmax probability over the cache, the mean over every query head; the
 * newest token (step s's) first (kvpress pads it with the maximum). With N = 1 and prefill=1
 * this is TOVA's own eviction: one token leaves per step once the cache is full. */
static kvt_status step_tova(kvt_layer_ctx *c, const kvt_policy *p, int s, const double *z,
                            size_t zs, const int32_t *cache, int n, double *out)
{
    (void)p;
    for (int i = 0; i < n; i++)
        out[i] = 0.0;
    for (int u = 0; u < c->Hq; u++) {
        const double *zu = z + (size_t)u * zs;
        double m = -INFINITY, den = 0.0;
        for (int i = 0; i < n; i++)
            m = zu[cache[i]] > m || isnan(zu[cache[i]]) ? zu[cache[i]] : m;
        for (int i = 0; i < n; i++)
            den += exp(zu[cache[i]] - m);
        for (int i = 0; i < n; i++)
            out[i] += exp(zu[cache[i]] - m) / den;
    }
    for (int i = 0; i < n; i++)
        out[i] = cache[i] == c->T + s ? INFINITY : out[i] / c->Hq;
    return KVT_OK;
}

const kvt_policy_def kvt_policy_def_tova = {
    .name = "tova",
    .host_reads = KVT_CTX_PRW,
    .summary = "TOVA: last query's attention, layer-wise (one set per layer)",
    .keys = "heads,dms,dms_window,decoding,prefill",
    .select = sel_tova,
    .chunk_rank = chunk_tova,
    .chunk_reads = KVT_CTX_KV,
    .chunk_queries = true,
    .chunk_min = '1', /* TOVAPress takes the maximum of no scores on a one-token chunk */
    .step_scores = step_tova,
};
