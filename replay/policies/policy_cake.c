/* policy_cake.c - `cake` (CAKE: Cascading and Adaptive KV cache Eviction with layer
 * preferences, ICLR 2025, arXiv 2503.12491; its released code cakekv, read in the fork
 * qtris123/cakekv: cake/model/modify_llama.py, cake/cake_cache.py CakeprefillKVCache, cake/utils.py
 * adjust_budgets, experiments/LongBench/pred_cake.py for the defaults). Its default, not
 * --cascading, mode: layer budgets from every layer's preference, then SnapKV-style eviction by an
 * indicator that adds the window attention's variance.
 *
 * With the window queries' attention A (the last W of them, softmax over all T keys, causal inside
 * the window) and the prefix P = [0, T - W):
 * - layer l's preference pref_l = H_l^(1/tau1) * V_l^(1/tau2), H_l = -sum over query heads,
 *   window queries and prefix keys of A log(A + 1e-10) (entropy: spatial dispersion), V_l = sum
 *   over query heads and prefix keys of A's variance over the window queries (unbiased: temporal
 *   shift);
 * - layer l keeps the window and b_l prefix tokens: b_l = pref_l / sum(pref) * (B - W) * L,
 *   truncated, then CAKE's adjust_budgets (a budget above |P| gives its excess equally to the
 *   layers below |P|, the remainder one each to the first of them; then the total is made
 *   (B - W) * L again, adding to the layers below |P| or taking from those above 1, equally and
 *   the remainder from the first), clamped to [0, |P|] (the code's topk takes at most |P|);
 * - a head keeps the b_l prefix tokens of largest mean_i A + gamma * var_i A, average-pooled
 *   (kernel 5, zero padding, divisor 5), the group's mean under heads=kv (ties: lower index).
 * A prompt of at most B + W tokens is kept whole (CAKE's own condition); B <= W keeps the last B
 * (every window policy's rule; the code's budgets would be negative there, and its topk fail).
 * tau1 = tau2 = 1 and gamma = 200 are pred_cake.py's defaults (its model2tau.json has tuned
 * pairs per model and cache size: e.g. Llama-3.1-8B at 1024: tau1=1.6, tau2=0.4).
 *
 * The budgets need every layer's preference, so the policy's bind reads each layer's window
 * queries and keys before any layer is replayed; a single-layer replay is refused.
 */
#include <string.h>

#include "../replay_internal.h"
#include "kvt_trace.h"

#define CAKE_KERNEL 5

typedef struct cake_state {
    int L, T;
    double *pref; /* [L] */
} cake_state;

static void d_cake(kvt_policy_opts *o)
{
    o->tau1 = 1.0;
    o->tau2 = 1.0;
    o->gamma = 200.0;
}

static kvt_status init_cake(kvt_policy *p)
{
    KVT_RETURN_IF(p->o.window < 2, KVT_ERR_INVALID_ARG,
                  "cake: window=%d: the variance over the window queries needs at least 2",
                  p->o.window);
    return KVT_OK;
}

static void unbind_cake(void *state)
{
    cake_state *s = state;
    if (s)
        kvt_free(s->pref);
    kvt_free(s);
}

/* mean and sum of squared deviations over the W rows (stride T) of column x[0] (the unbiased
 * variance is ss / (W - 1)) */
static void col_mean_ss(const float *x, int W, int T, double *mean, double *ss_out)
{
    double m = 0.0, ss = 0.0;
    for (int i = 0; i < W; i++)
        m += x[(size_t)i * T];
    m /= W;
    for (int i = 0; i < W; i++) {
        const double d = x[(size_t)i * T] - m;
        ss += d * d;
    }
    *mean = m, *ss_out = ss;
}

/* layer l's entropy H and variance V of the last W window queries' attention to the prefix */
static kvt_status layer_pref(kvt_trace_reader *r, int l, int Hq, int Hkv, int T, int W, double *H,
                             double *V)
{
    float *pr = NULL;
    double *work = NULL;
    int *n_vis = NULL;
    kvt_bind_qk x;
    KVT_FORWARD(kvt_bind_read_qk(r, l, KVT_KIND_Q_WINDOW, Hq, Hkv, T, "cake", &x));
    const int D = x.D, Wt = x.nq;
    const float *q = x.q, *k = x.k;
    const double scale = x.scale;
    kvt_status st = KVT_OK;
    if (Wt < W) {
        st = kvt_error_set(KVT_ERR_INVALID_ARG,
                           "cake: window=%d but layer %d stores %d window queries (give window=%d "
                           "or less)",
                           W, l, Wt, Wt);
        goto out;
    }
    const int P = T - W;
    work = kvt_malloc(((size_t)T + 1) * sizeof(double));
    pr = kvt_malloc((size_t)W * T * sizeof(float) + 1);
    n_vis = kvt_malloc((size_t)W * sizeof(int) + 1);
    if (!work || !pr || !n_vis) {
        st = kvt_error_set(KVT_ERR_NOMEM, "cake: out of memory");
        goto out;
    }
    for (int i = 0; i < W; i++) /* the last W prompt queries see keys 0..their position */
        n_vis[i] = T - W + i + 1;
    double h = 0.0, v = 0.0;
    for (int hq = 0; hq < Hq; hq++) {
        const float *kh = k + (size_t)(hq / (Hq / Hkv)) * T * D;
        if ((st = kvt_attn_probs(q + ((size_t)hq * Wt + Wt - W) * D, W, D, kh, T, n_vis, NULL, 0,
                                 NULL, scale, pr, NULL, NULL, work)))
            goto out;
        for (int j = 0; j < P; j++) { /* every window query sees the whole prefix */
            for (int i = 0; i < W; i++) {
                const double a = pr[(size_t)i * T + j];
                h -= a * log(a + 1e-10);
            }
            double m, ss;
            col_mean_ss(pr + j, W, T, &m, &ss);
            v += ss / (W - 1);
        }
    }
    *H = h, *V = v;
out:
    kvt_free(x.q);
    kvt_free(x.k);
    kvt_free(pr);
    kvt_free(work);
    kvt_free(n_vis);
    return st;
}

/* kvt_replay_check_trace: bind's refusals that the shapes decide (every layer's window
 * queries and keys, enough window queries), without computing the preferences */
static kvt_status check_cake(const kvt_policy *p, const char *path, int L, int Hq, int Hkv, int T)
{
    const int W = p->o.window;
    return T <= W ? KVT_OK : kvt_bind_check_windows(path, "cake", L, 1, Hq, Hkv, T, W);
}

/* before the trace's first layer: every layer's preference */
static kvt_status bind_cake(const kvt_policy *p, const char *path, int L, int Hq, int Hkv, int T,
                            void **state)
{
    const int W = p->o.window;
    if (T <= W) /* no prefix: every budget keeps the prompt whole or its last B */
        return KVT_OK;
    cake_state *s = kvt_calloc(1, sizeof(*s));
    kvt_trace_reader *r = NULL;
    kvt_status st = KVT_OK;
    if (!s || !(s->pref = kvt_malloc((size_t)L * sizeof(double) + 1))) {
        st = kvt_error_set(KVT_ERR_NOMEM, "cake: out of memory");
        goto out;
    }
    s->L = L, s->T = T;
    if ((st = kvt_trace_reader_open(path, &r)))
        goto out;
    for (int l = 0; l < L && !st; l++) {
        double H = 0.0, V = 0.0;
        if (!(st = layer_pref(r, l, Hq, Hkv, T, W, &H, &V)))
            s->pref[l] = pow(H, 1.0 / p->o.tau1) * pow(V, 1.0 / p->o.tau2);
    }
out:
    if (r)
        kvt_trace_reader_close(r);
    if (st)
        unbind_cake(s);
    else
        *state = s;
    return st;
}

/* CAKE's adjust_budgets (cake/utils.py) on b[L] in place, total the layers' sum, P the prefix */
static void adjust_budgets(int64_t *b, int L, int64_t total, int64_t P)
{
    int64_t excess = 0;
    for (int l = 0; l < L; l++)
        if (b[l] > P)
            excess += b[l] - P, b[l] = P;
    if (excess > 0) {
        int nv = 0;
        for (int l = 0; l < L; l++)
            nv += b[l] < P;
        if (nv > 0) {
            int64_t per = excess / nv, rem = excess % nv;
            for (int l = 0; l < L; l++)
                if (b[l] < P)
                    b[l] += per + (rem > 0), rem -= rem > 0;
        }
    }
    int64_t cur = 0;
    for (int l = 0; l < L; l++)
        cur += b[l];
    const int64_t diff = total - cur;
    if (diff == 0)
        return;
    uint8_t valid[KVT_MAX_LAYERS_CAKE];
    int nv = 0;
    for (int l = 0; l < L; l++)
        nv += valid[l] = diff > 0 ? b[l] < P : b[l] > 1;
    if (nv == 0)
        return;
    const int64_t ad = diff > 0 ? diff : -diff;
    int64_t per = ad / nv, rem = ad % nv;
    for (int l = 0; l < L; l++)
        if (valid[l]) {
            const int64_t d = per + (rem > 0);
            rem -= rem > 0;
            b[l] += diff > 0 ? d : -d;
        }
}

kvt_status kvt_cake_counts(const double *pref, int L, int T, int W, int B, int *counts)
{
    KVT_RETURN_IF(L < 1 || L > KVT_MAX_LAYERS_CAKE, KVT_ERR_INVALID_ARG,
                  "cake: %d layers (1 to %d)", L, KVT_MAX_LAYERS_CAKE);
    const int whole = B <= W ? (B < T ? B : T) : T; /* the last B; or the whole prompt */
    if (B <= W || T <= B + W) { /* CAKE's own condition: seq_len <= cache_size + window_size */
        for (int l = 0; l < L; l++)
            counts[l] = whole;
        return KVT_OK;
    }
    const int64_t P = T - W, total = (int64_t)(B - W) * L;
    double sum = 0.0;
    for (int i = 0; i < L; i++)
        sum += pref[i];
    int64_t b[KVT_MAX_LAYERS_CAKE];
    for (int i = 0; i < L; i++) {
        /* every preference zero (or not a number): the layers share alike */
        double f = sum > 0 && isfinite(sum) ? pref[i] / sum * (double)total : (double)total / L;
        b[i] = (int64_t)f; /* numpy's astype(int): toward zero */
    }
    adjust_budgets(b, L, total, P);
    for (int l = 0; l < L; l++)
        counts[l] = W + (int)(b[l] < 0 ? 0 : b[l] > P ? P : b[l]);
    return KVT_OK;
}

static kvt_status sel_cake(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                           kvt_layer_selection *sel)
{
    const kvt_policy_opts *o = &p->o;
    const cake_state *s = p->state;
    const int T = c->T, W = o->window < T ? o->window : T, P = T - W, L = c->n_layers;
    KVT_RETURN_IF(P > 0 && !s, KVT_ERR_INVALID_ARG,
                  "cake: a layer's budget comes from every layer's preference: replay the whole "
                  "trace (kvtrace replay), not one layer");
    KVT_RETURN_IF(P > 0 && (s->T != T || s->L != L), KVT_ERR_STATE,
                  "cake: bound to a trace of %d layers and %d tokens, not %d and %d", s->L, s->T, L,
                  T);
    KVT_FORWARD(kvt_ctx_check_window(c, "cake", W));
    KVT_FORWARD(kvt_ctx_fetch(c, KVT_CTX_PRW));
    KVT_FORWARD(kvt_sel_init(sel, c, o->per_query, W, n_b, true));
    const int H = sel->n_heads, per = o->per_query ? 1 : c->Gs;
    const size_t np = P > 0 ? (size_t)P : 1;
    double *raw = kvt_calloc((size_t)H * np, sizeof(double));
    double *pooled = kvt_malloc((size_t)H * np * sizeof(double));
    int *counts = kvt_malloc((size_t)L * sizeof(int) + 1);
    kvt_status st = KVT_OK;
    if (!raw || !pooled || !counts) {
        st = kvt_error_set(KVT_ERR_NOMEM, "cake: out of memory");
        goto out;
    }
    /* mean + gamma * var over the last W window queries, the group's mean under heads=kv */
    for (int h = 0; h < H; h++)
        for (int u = 0; u < per; u++) {
            const int hq = o->per_query ? h : h * c->Gs + u;
            const float *rows = c->prw + ((size_t)hq * c->Wt + (c->Wt - W)) * T;
            for (int j = 0; j < P; j++) {
                double m, ss;
                col_mean_ss(rows + j, W, T, &m, &ss);
                raw[(size_t)h * P + j] += (m + o->gamma * ss / (W - 1)) / per;
            }
        }
    for (int h = 0; h < H && P > 0 && !st; h++)
        st = kvt_pool1d_ref(raw + (size_t)h * P, P, CAKE_KERNEL, KVT_POOL_AVG,
                            pooled + (size_t)h * P);
    if (st || (st = kvt_sel_rank_window_all(sel, pooled, W)))
        goto out;
    for (int b = 0; b < n_b && !st; b++) {
        int n = B[b] < T ? B[b] : T;
        if (P > 0 && !(st = kvt_cake_counts(s->pref, L, T, W, B[b], counts)))
            n = counts[c->layer];
        for (int h = 0; h < H; h++)
            sel->count[(size_t)b * H + h] = n;
    }
out:
    kvt_free(raw);
    kvt_free(pooled);
    kvt_free(counts);
    return st;
}

const kvt_policy_def kvt_policy_def_cake = {
    .name = "cake",
    .summary = "CAKE: layer budgets by each layer's window-attention entropy^(1/tau1) x "
               "variance^(1/tau2); tokens by pooled mean + gamma x variance of that attention",
    .flags = KVT_POLICY_WINDOW_QUERY | KVT_POLICY_LAYER_BUDGETS,
    .host_reads = KVT_CTX_PRW,
    .keys = "window,heads,tau1,tau2,gamma",
    .defaults = d_cake,
    .init = init_cake,
    .bind = bind_cake,
    .check = check_cake,
    .unbind = unbind_cake,
    .select = sel_cake,
};
