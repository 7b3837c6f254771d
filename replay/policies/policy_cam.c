/* policy_cam.c - `cam`: KVCache-Factory's CAMKVCluster (CaM, ICML 2024; POLICIES §11;
 * pyramidkv/pyramidkv_utils.py). Before it evicts, CaM merges values forward: with a_j the
 * window queries' mean attention to token j (softmax over all T keys, causal inside the window;
 * GQA-reduced first with heads=kv), start = ceil(ratio T) (start_budget_ratio, 0.1) and W the
 * window, for t = start .. T-W-1 in order
 *   p_t = a_t / max(a[0, start) U a[t, t+W))   (0/0 -> 0, clamped to [0, 1])
 *   m_t ~ Bernoulli(p_t)   (expected=1: m_t = p_t, the draw's expectation)
 *   v[t+1 .. t+W] += m_t v[t] / W              (v[t] as merged so far)
 * Then it keeps the window and the prefix tokens with the largest column sums of the window
 * attention (no pooling), with the merged values; keys are not changed. The draws come from
 * kvt_rng seeded by seed ^ (layer+1)*0x9E3779B97F4A7C15 ^ (head+1)*0xC2B2AE3D27D4EB4F (torch's
 * bernoulli cannot be reproduced). A prompt shorter than B is kept as is (KVCF returns it
 * unchanged); at B = T every token is kept, merged. */
#include <math.h>
#include <string.h>

#include "../replay_internal.h"

/* the window queries' mean attention a [T] of selection head h (GQA-reduced) */
static void mean_attention(const kvt_layer_ctx *c, const kvt_policy_opts *o, int h, int W,
                           double *a, double *row)
{
    const int T = c->T, per = o->per_query ? 1 : c->Gs, hq0 = o->per_query ? h : h * c->Gs;
    memset(a, 0, (size_t)T * sizeof(double));
    for (int i = c->Wt - W; i < c->Wt; i++) {
        for (int j = 0; j < T; j++) { /* the group's reduction of query i's row */
            double r = 0.0;
            for (int u = 0; u < per; u++) {
                double x = c->prw[((size_t)(hq0 + u) * c->Wt + i) * T + j];
                r = u == 0 ? x : o->reduce == KVT_REDUCE_MAX ? fmax(r, x) : r + x;
            }
            row[j] = o->reduce == KVT_REDUCE_MEAN ? r / per : r;
        }
        for (int j = 0; j < T; j++)
            a[j] += row[j];
    }
    for (int j = 0; j < T; j++)
        a[j] /= W;
}

/* CaM's forward merge of KV head g's values into vm [T, D] (double); touched[j] = 1 where
 * token j's value changed */
static void cam_merge(const kvt_layer_ctx *c, const kvt_policy *p, int h, int g, int W,
                      const double *a, double *vm, uint8_t *touched)
{
    const int T = c->T, D = c->D;
    const float *V = c->v + (size_t)g * T * D;
    for (size_t i = 0; i < (size_t)T * D; i++)
        vm[i] = V[i];
    memset(touched, 0, (size_t)T);
    int start = (int)ceil(p->o.ratio * T);
    double mstart = -INFINITY;
    for (int j = 0; j < start && j < T; j++)
        mstart = fmax(mstart, a[j]);
    kvt_rng r;
    kvt_rng_seed(&r, p->o.seed ^ ((uint64_t)(c->layer + 1) * 0x9E3779B97F4A7C15ull) ^
                         ((uint64_t)(h + 1) * 0xC2B2AE3D27D4EB4Full));
    for (int t = start; t < T - W; t++) {
        double m = mstart;
        for (int j = t; j < t + W; j++)
            m = fmax(m, a[j]);
        double pr = a[t] / m;
        pr = isnan(pr) ? 0.0 : pr < 0 ? 0.0 : pr > 1 ? 1.0 : pr;
        double mask = p->o.expected ? pr : (kvt_rng_uniform(&r) < pr ? 1.0 : 0.0);
        if (!(mask > 0))
            continue;
        for (int j = t + 1; j <= t + W; j++) {
            for (int d = 0; d < D; d++)
                vm[(size_t)j * D + d] += vm[(size_t)t * D + d] * mask / W;
            touched[j] = 1;
        }
    }
}

static kvt_status sel_cam(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                          kvt_layer_selection *sel)
{
    const kvt_policy_opts *o = &p->o;
    const int T = c->T, D = c->D, W = o->window, P = T - W;
    KVT_FORWARD(kvt_ctx_check_window(c, "cam", W));
    KVT_FORWARD(kvt_ctx_fetch(c, KVT_CTX_PRW | KVT_CTX_KV));
    KVT_FORWARD(kvt_sel_init(sel, c, o->per_query, W, n_b, true));
    KVT_FORWARD(kvt_sel_init_merged(sel));
    const int H = sel->n_heads;
    kvt_status st = KVT_OK;
    double *a = kvt_malloc(((size_t)H * T + 1) * sizeof(double));
    double *row = kvt_malloc(((size_t)T + 1) * sizeof(double));
    double *s = kvt_malloc(((size_t)H * (P > 0 ? P : 1)) * sizeof(double));
    double *vm = kvt_malloc(((size_t)T * D + 1) * sizeof(double));
    uint8_t *touched = kvt_malloc((size_t)T + 1), *in = kvt_malloc((size_t)T + 1);
    if (!a || !row || !s || !vm || !touched || !in) {
        st = kvt_error_set(KVT_ERR_NOMEM, "cam: out of memory");
        goto out;
    }
    for (int h = 0; h < H; h++) { /* the ranking: the window, then the prefix by column sums */
        mean_attention(c, o, h, W, a + (size_t)h * T, row);
        memcpy(s + (size_t)h * P, a + (size_t)h * T, (size_t)P * sizeof(double));
    }
    if ((st = kvt_sel_rank_window_all(sel, s, W)))
        goto out;
    kvt_counts_uniform(sel, B, n_b);
    for (int h = 0; h < H && !st; h++) {
        const int g = kvt_ctx_kv_of(c, o->per_query, h);
        const float *K = c->k + (size_t)g * T * D;
        cam_merge(c, p, h, g, W, a + (size_t)h * T, vm, touched);
        for (int b = 0; b < n_b && !st; b++) {
            kvt_merged_set *ms = &sel->merged[(size_t)b * H + h];
            const int cnt = sel->count[(size_t)b * H + h];
            const bool merged = B[b] <= T; /* a shorter prompt stays as it is */
            memset(in, 0, (size_t)T);
            for (int i = 0; i < cnt; i++)
                in[sel->order[(size_t)h * T + i]] = 1;
            int n = 0, n_chg = 0;
            for (int j = 0; j < T; j++)
                if (in[j])
                    n++, n_chg += merged && touched[j];
            if ((st = kvt_merged_alloc(ms, n, n_chg, D)))
                break;
            for (int j = 0, e = 0, ce = 0; j < T; j++) {
                if (!in[j])
                    continue;
                ms->idx[e] = j;
                if (merged && touched[j]) {
                    ms->changed[e] = 1;
                    memcpy(ms->k + (size_t)ce * D, K + (size_t)j * D, (size_t)D * sizeof(float));
                    for (int d = 0; d < D; d++)
                        ms->v[(size_t)ce * D + d] = (float)vm[(size_t)j * D + d];
                    ce++;
                }
                e++;
            }
        }
    }
out:
    kvt_free(a);
    kvt_free(row);
    kvt_free(s);
    kvt_free(vm);
    kvt_free(touched);
    kvt_free(in);
    return st;
}

static void d_cam(kvt_policy_opts *o)
{
    o->ratio = 0.1; /* start_budget_ratio */
}

const kvt_policy_def kvt_policy_def_cam = {
    .name = "cam",
    .summary = "CaM (KVCache-Factory CAMKVCluster): values merged forward by Bernoulli draws "
               "before SnapKV's eviction (unpooled)",
    .flags = KVT_POLICY_WINDOW_QUERY | KVT_POLICY_MERGED,
    .host_reads = KVT_CTX_PRW | KVT_CTX_KV,
    .keys = "window,reduce,heads,ratio,expected,seed",
    .defaults = d_cam,
    .select = sel_cam,
};
