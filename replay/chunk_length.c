/* chunk_length.c - chunk_length=N on a policy with a plain kept set: the prompt is cut into
 * chunks of N tokens from token 0 (the last one shorter), and at a budget of share f of the
 * prompt (its written share, or B/T) each chunk keeps max(1, int(len * f)) of its tokens
 * (all of them when f >= 1), the ones the policy ranks highest. This is kvpress's FinchPress
 * with chunk_length (one ranking of the whole prompt, a top-k per chunk), and its ChunkPress
 * over a press whose score of a token depends on that token alone (KnormPress; QFilterPress
 * with given filters): ChunkPress scores each chunk as a prompt of its own, which other
 * scores see differently. The policy's ranking is kept within each chunk; its own head
 * budgets are replaced by the chunks' (every head keeps the same count). Nested budgets stay
 * nested, so one ranking serves them all; a policy with a ranking per budget keeps one. */
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
