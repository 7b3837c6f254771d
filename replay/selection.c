/* selection.c - the selection a policy fills (per head: a ranking, a cut per budget, optional
 * per-decode-step rankings, or merged entries), the window-first ranking shared by the
 * SnapKV family, and the public accessors that tests and the export use.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/ctx_gpu.h"
#include "replay_internal.h"

static kvt_status zalloc(void **p, size_t n, size_t elem)
{
    size_t bytes;
    if (kvt_mul_overflow(n, elem, &bytes))
        return kvt_error_set(KVT_ERR_OVERFLOW, "selection: size overflow");
    *p = kvt_calloc(bytes ? bytes : 1, 1);
    return *p ? KVT_OK : kvt_error_set(KVT_ERR_NOMEM, "selection: out of memory");
}

kvt_status kvt_sel_init(kvt_layer_selection *s, const kvt_layer_ctx *c, bool per_query, int window,
                        int n_b, bool fixed)
{
    memset(s, 0, sizeof(*s));
    s->n_heads = kvt_ctx_heads(c, per_query);
    s->per_query = per_query;
    s->window = window;
    s->n_budgets = n_b;
    s->T = c->T;
    s->D = c->D;
    s->gpu = c->gpu;
    s->has_fixed = fixed;
    if (!fixed)
        return KVT_OK;
    kvt_status st = zalloc((void **)&s->order, (size_t)s->n_heads * c->T, sizeof(int32_t));
    if (!st)
        st = zalloc((void **)&s->count, (size_t)n_b * s->n_heads, sizeof(int32_t));
    return st;
}

kvt_status kvt_sel_init_steps(kvt_layer_selection *s, int n_steps)
{
    s->n_steps = n_steps;
    kvt_status st = zalloc((void **)&s->step_head, (size_t)s->n_heads, 1);
    if (!st)
        st = zalloc((void **)&s->step_order, (size_t)s->n_heads * n_steps * s->T, sizeof(int32_t));
    if (!st)
        st = zalloc((void **)&s->step_count, (size_t)s->n_budgets * s->n_heads * n_steps,
                    sizeof(int32_t));
    return st;
}

kvt_status kvt_sel_init_per_budget(kvt_layer_selection *s)
{
    return zalloc((void **)&s->border, (size_t)s->n_budgets * s->n_heads * s->T, sizeof(int32_t));
}

kvt_status kvt_sel_init_merged(kvt_layer_selection *s)
{
    return zalloc((void **)&s->merged, (size_t)s->n_budgets * s->n_heads, sizeof(kvt_merged_set));
}

void kvt_sel_clear(kvt_layer_selection *s)
{
    if (!s)
        return;
    kvt_free(s->order);
    kvt_free(s->border);
    kvt_free(s->count);
    kvt_free(s->step_head);
    kvt_free(s->step_order);
    kvt_free(s->step_count);
    if (s->merged)
        for (int i = 0; i < s->n_budgets * s->n_heads; i++) {
            kvt_free(s->merged[i].k);
            kvt_free(s->merged[i].v);
            kvt_free(s->merged[i].idx);
            kvt_free(s->merged[i].changed);
        }
    kvt_free(s->merged);
    kvt_dec_free(s);
    memset(s, 0, sizeof(*s));
}

/* the window first, most recent first: a budget B < W keeps the last B tokens */
static void window_first(int T, int W, int32_t *order)
{
    for (int i = 0; i < W; i++)
        order[i] = T - 1 - i;
}

kvt_status kvt_rank_window(const double *score, int T, int W, int32_t *order)
{
    if (W > T)
        W = T;
    if (W < 0)
        W = 0;
    int P = T - W;
    window_first(T, W, order);
    if (P == 0)
        return KVT_OK;
    int32_t *work = kvt_malloc((size_t)P * sizeof(int32_t));
    KVT_RETURN_IF(!work, KVT_ERR_NOMEM, "rank: out of memory");
    kvt_status st = kvt_rank_desc(score, P, order + W, work);
    kvt_free(work);
    return st;
}

void kvt_chunk_order(const double *cs, int n_chunks, int C, int P, int W, int T, int32_t *ord,
                     int32_t *work, int32_t *cord)
{
    window_first(T, W, ord);
    kvt_rank_desc_ref(cs, n_chunks, cord, work);
    int t = W;
    for (int i = 0; i < n_chunks; i++)
        for (int j = cord[i] * C; j < P && j < (cord[i] + 1) * C; j++)
            ord[t++] = j;
}

int kvt_chunk_count(const int32_t *cord, int n_take, int n_chunks, int C, int P)
{
    int cnt = 0;
    for (int i = 0; i < n_take && i < n_chunks; i++) {
        int j0 = cord[i] * C, j1 = j0 + C < P ? j0 + C : P;
        cnt += j1 - j0;
    }
    return cnt;
}

static kvt_status merged_alloc(kvt_merged_set *out, int n, int n_chg, int D, bool values)
{
    out->n = n;
    out->n_changed = n_chg;
    out->k = kvt_malloc(((size_t)n_chg * D + 1) * sizeof(float));
    out->v = values ? kvt_malloc(((size_t)n_chg * D + 1) * sizeof(float)) : NULL;
    out->idx = kvt_malloc((size_t)n * sizeof(int32_t) + 1);
    out->changed = kvt_calloc((size_t)n + 1, 1);
    KVT_RETURN_IF(!out->k || (values && !out->v) || !out->idx || !out->changed, KVT_ERR_NOMEM,
                  "selection: out of memory (merged set)");
    return KVT_OK;
}

kvt_status kvt_merged_alloc(kvt_merged_set *out, int n, int n_chg, int D)
{
    return merged_alloc(out, n, n_chg, D, true);
}

kvt_status kvt_merged_alloc_keys(kvt_merged_set *out, int n, int n_chg, int D)
{
    return merged_alloc(out, n, n_chg, D, false);
}

void kvt_sel_streaming_order(kvt_layer_selection *s, int sinks)
{
    const int T = s->T, S = sinks < T ? sinks : T;
    for (int h = 0; h < s->n_heads; h++) {
        int32_t *ord = s->order + (size_t)h * T;
        for (int i = 0; i < S; i++)
            ord[i] = i;
        for (int i = 0; i < T - S; i++)
            ord[S + i] = T - 1 - i;
    }
}

void kvt_counts_uniform(kvt_layer_selection *s, const int *budgets, int n_b)
{
    for (int b = 0; b < n_b; b++)
        for (int h = 0; h < s->n_heads; h++)
            s->count[(size_t)b * s->n_heads + h] = budgets[b] < s->T ? budgets[b] : s->T;
}

double kvt_round_even(double x)
{
    return nearbyint(x); /* default rounding mode: to nearest, ties to even */
}

/* ---- public API ---- */
void kvt_layer_selection_free(kvt_layer_selection *s)
{
    if (!s)
        return;
    kvt_sel_clear(s);
    kvt_free(s);
}

int kvt_layer_selection_n_heads(const kvt_layer_selection *s)
{
    return s->n_heads;
}

int kvt_layer_selection_n_steps(const kvt_layer_selection *s)
{
    return s->dec ? s->dec_steps : s->n_steps;
}

bool kvt_layer_selection_has_fixed(const kvt_layer_selection *s)
{
    return s->has_fixed || s->merged;
}

bool kvt_layer_selection_head_per_step(const kvt_layer_selection *s, int head)
{
    return head >= 0 && head < s->n_heads && (s->dec || (s->step_head && s->step_head[head]));
}

static int cmp_i32(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

kvt_status kvt_layer_selection_kept(const kvt_layer_selection *s, size_t budget, int head, int step,
                                    int32_t *idx, size_t cap, size_t *n)
{
    KVT_RETURN_IF(budget >= (size_t)s->n_budgets || head < 0 || head >= s->n_heads,
                  KVT_ERR_INVALID_ARG, "selection: budget %zu / head %d out of range", budget,
                  head);
    const int32_t *src;
    size_t cnt;
    if (s->merged && step < 0) {
        const kvt_merged_set *m = &s->merged[budget * (size_t)s->n_heads + (size_t)head];
        src = m->idx;
        cnt = (size_t)m->n;
    } else if (step < 0) {
        KVT_RETURN_IF(!s->has_fixed, KVT_ERR_NOT_FOUND,
                      "selection: this policy has no prompt-time set (per decode step only)");
        src = kvt_sel_ranking(s, (int)budget, head);
        cnt = (size_t)s->count[budget * (size_t)s->n_heads + (size_t)head];
    } else if (s->dec) { /* decode-time caches: the cache step `step`'s query sees */
        KVT_RETURN_IF(step >= s->dec_steps, KVT_ERR_NOT_FOUND,
                      "selection: no decode step %d (the trace has %d)", step, s->dec_steps);
        *n = (size_t)kvt_dec_visible(s, (int)budget, head, step, NULL);
        KVT_RETURN_IF(cap < *n, KVT_ERR_INVALID_ARG, "selection: capacity %zu < %zu", cap, *n);
        kvt_dec_visible(s, (int)budget, head, step, idx);
        return KVT_OK;
    } else {
        KVT_RETURN_IF(step >= s->n_steps || !s->step_head || !s->step_head[head], KVT_ERR_NOT_FOUND,
                      "selection: head %d has no per-step set %d", head, step);
        src = s->step_order + ((size_t)head * s->n_steps + (size_t)step) * s->T;
        cnt = (size_t)s->step_count[(budget * (size_t)s->n_heads + (size_t)head) * s->n_steps +
                                    (size_t)step];
    }
    *n = cnt;
    KVT_RETURN_IF(cap < cnt, KVT_ERR_INVALID_ARG, "selection: capacity %zu < %zu", cap, cnt);
    memcpy(idx, src, cnt * sizeof(int32_t));
    qsort(idx, cnt, sizeof(int32_t), cmp_i32);
    return KVT_OK;
}

kvt_status kvt_sel_rank_window_all(kvt_layer_selection *s, const double *score, int W)
{
    int T = s->T, P = T - (W < T ? W : T), Wc = T - P;
    if (s->gpu && P >= 4096) { /* the same permutations (a stable radix sort of kvt_rank_key) */
        int32_t *ord = kvt_malloc((size_t)s->n_heads * P * sizeof(int32_t));
        KVT_RETURN_IF(!ord, KVT_ERR_NOMEM, "rank: out of memory");
        kvt_status st = kvt_ctx_gpu_rank(s->gpu, score, s->n_heads, P, ord);
        for (int h = 0; h < s->n_heads && !st; h++) {
            window_first(T, Wc, s->order + (size_t)h * T);
            memcpy(s->order + (size_t)h * T + Wc, ord + (size_t)h * P, (size_t)P * sizeof(int32_t));
        }
        kvt_free(ord);
        return st;
    }
    for (int h = 0; h < s->n_heads; h++)
        KVT_FORWARD(kvt_rank_window(score + (size_t)h * P, T, W, s->order + (size_t)h * T));
    return KVT_OK;
}
