/* critical.c - kvpress's CriticalKVPress and CriticalAdaKVPress (kvpress/presses/
 * criticalkv_press.py @0603dec; CriticalKV, arXiv 2502.03805) over a score policy's scores
 * (`critical=FILE.npy`), and the ranking-and-counts step every score policy ends with.
 *
 * FILE holds w [L, H', T] (critical=DIR: DIR/NAME.npy for each trace NAME.kvt, read when the
 * trace is replayed, replay_run.c): for each layer, head and prompt token the L1 norm of the value
 * projected by the head's slice of the output projection, ||v_j W_o[h]||_1, averaged over the
 * query heads of a KV head (kvpress's vwl1norm; kvtrace.critical_norms computes it from a
 * trace's V and the model's o_proj weights). H' is the KV heads, or with heads=query the query
 * heads (each its own norms) or the KV heads (each query head takes its KV head's).
 *
 * CriticalKV, at a budget of B tokens per head: the first-stage tokens, the floor(B * first)
 * highest scores s (first = 0.5), are kept; the rest of the budget goes to the highest
 * (s_j + ceps) * w_j (ceps = 1e-4) among the other tokens. The window comes first (kvpress
 * scores it at the layer's maximum, so it is in the first stage): floor(B * first) - W prefix
 * tokens are first-stage ones. These sets are nested across budgets, so they are one ranking:
 * prefix count n = 1, 2, ... adds one token each, which the simulation below finds in O(P).
 *
 * CriticalAdaKV (adaptive=1, or the adakv policy; alloc=b): each head's count c is AdaKV's
 * (kvpress's AdaKVPress rule: floor(alpha B) forced per head, then the layer's best scores);
 * the head keeps its max(floor(alpha B), floor(c * first)) best scores (the forced ones and
 * the first stage), then the best (s + ceps) w up to c. Those sets are not always nested (a
 * larger budget can move a head's stage line without adding to its count), so the selection has
 * a ranking per budget. Ties to the earlier token, NaN products last. */
#include <math.h>
#include <string.h>

#include "replay_internal.h"

typedef struct crit_work {
    int32_t *sig, *rho, *wk; /* [P]: prefix tokens by s, by (s + ceps) w; sort scratch */
    double *r;               /* [P] (s + ceps) w */
    uint8_t *mark;           /* [P] 1: in the first stage, 2: in the second */
} crit_work;

kvt_status kvt_critical_check(const kvt_policy *p, const kvt_npy *a, const char *file, int L,
                              int Hq, int Hkv, int T)
{
    const bool rows = a->shape[1] == Hkv || (p->o.per_query && a->shape[1] == Hq);
    KVT_RETURN_IF(a->shape[0] != L || !rows || a->shape[2] != T, KVT_ERR_INVALID_ARG,
                  "%s: critical=%s has shape (%d, %d, %d); this trace needs (%d, %d, %d): "
                  "layers, KV heads%s, prompt tokens (one file per trace)",
                  p->def->name, file, a->shape[0], a->shape[1], a->shape[2], L, Hkv, T,
                  p->o.per_query ? " (or query heads)" : "");
    return KVT_OK;
}

/* sig and rho of selection head h from its prefix scores s [P]: r = (s + ceps) w */
static kvt_status head_orders(const kvt_layer_ctx *c, const kvt_policy *p, int h, const double *s,
                              int P, crit_work *w)
{
    const kvt_npy *a = p->crit;
    const int row = a->shape[1] == c->Hkv ? kvt_ctx_kv_of(c, p->o.per_query, h) : h;
    const size_t base = ((size_t)c->layer * a->shape[1] + row) * c->T;
    for (int j = 0; j < P; j++) {
        const double wj = kvt_npy_at(a, base + j);
        KVT_RETURN_IF(!(wj >= 0 && wj < INFINITY), KVT_ERR_NAN,
                      "%s: critical=%s: norm %g at layer %d, head %d, token %d (must be finite "
                      "and >= 0)",
                      p->def->name, p->o.critical, wj, c->layer, row, j);
        w->r[j] = (s[j] + p->o.ceps) * wj;
    }
    KVT_FORWARD(kvt_rank_desc(s, P, w->sig, w->wk));
    return kvt_rank_desc(w->r, P, w->rho, w->wk);
}

/* the window, most recent first, into order[0..T-P) */
static void window_first(int32_t *order, int T, int P)
{
    for (int t = 0; t < T - P; t++)
        order[t] = T - 1 - t;
}

/* CriticalKV's one ranking of the prefix into out [P]: prefix count n keeps
 * k(n) = max(0, floor((n + W) first) - W) first-stage tokens (sig's first k) and n - k(n)
 * others in rho's order. From n to n + 1 either the second stage takes its next token, or the
 * first stage takes sig[k]: that token is new, or was in the second stage, which then takes
 * its next token instead. */
static void critical_order(const crit_work *w, int P, int W, double first, int32_t *out)
{
    memset(w->mark, 0, (size_t)P);
    int k = 0, q = 0; /* first-stage size; rho's next candidate */
    for (int n = 1; n <= P; n++) {
        int kn = (int)floor((double)(n + W) * first) - W;
        kn = kn < 0 ? 0 : kn;
        int32_t tok = -1;
        if (kn > k) { /* (first <= 1: at most one more) */
            const int32_t a = w->sig[k++];
            const bool was = w->mark[a] == 2;
            w->mark[a] = 1;
            if (!was)
                tok = a;
        }
        if (tok < 0) { /* the second stage's next token */
            while (w->mark[w->rho[q]])
                q++;
            tok = w->rho[q];
            w->mark[tok] = 2;
        }
        out[n - 1] = tok;
    }
}

/* CriticalAdaKV's ranking of the prefix for a head keeping c prefix tokens, kp of them by s:
 * sig's first kp, then rho's first c - kp of the others, then the rest in sig's order */
static void ada_order(const crit_work *w, int P, int kp, int c, int32_t *out)
{
    memset(w->mark, 0, (size_t)P);
    int n = 0;
    for (int i = 0; i < kp; i++)
        w->mark[out[n++] = w->sig[i]] = 1;
    for (int i = 0; i < P && n < c; i++)
        if (!w->mark[w->rho[i]])
            w->mark[out[n++] = w->rho[i]] = 1;
    for (int i = 0; i < P; i++)
        if (!w->mark[w->sig[i]])
            out[n++] = w->sig[i];
}

/* the counts of a score policy's selection from its prefix scores s [H', T-W] (each head's
 * ranking already in sel): the uniform budget, or with adaptive=1 AdaKV's head budgets (alpha,
 * normalize, alloc, skip; POLICIES §3). alloc=b, kvpress's AdaKVPress over the press, takes any
 * scores but NaN; alloc=a shares the budget by the scores' mass and refuses a score that is
 * negative or infinite. */
static kvt_status sel_counts(kvt_layer_ctx *c, const kvt_policy *p, const double *s, int W,
                             const int *B, int n_b, kvt_layer_selection *sel)
{
    if (!p->o.adaptive) {
        kvt_counts_uniform(sel, B, n_b);
        return KVT_OK;
    }
    const int H = sel->n_heads, P = c->T - W;
    for (size_t i = 0; i < (size_t)H * P; i++) {
        const double v = s[i];
        const int h = (int)(i / P), j = (int)(i % P);
        KVT_RETURN_IF(isnan(v), KVT_ERR_NAN,
                      "%s: adaptive=1: NaN score at layer %d, head %d, token %d", p->def->name,
                      c->layer, h, j);
        KVT_RETURN_IF(p->o.alloc == 'a' && !(v >= 0 && v < INFINITY), KVT_ERR_INVALID_ARG,
                      "%s: score %g at layer %d, head %d, token %d: adaptive=1 with alloc=a "
                      "shares the budget by the scores' mass, so they must be finite and >= 0 "
                      "(alloc=b, kvpress's AdaKVPress, takes any scores)",
                      p->def->name, v, c->layer, h, j);
    }
    kvt_policy_opts o = p->o;
    o.window = W;
    return kvt_adakv_counts(c, &o, s, B, n_b, sel);
}

/* dms=: kvpress's DMSPress over the policy's scores s [H', P] (P = T - W): the last dms_window
 * tokens are kept, and of the tokens before them those scoring >= the threshold; the budget caps
 * each head's count. The ranking is the policy's window, then the rest of the DMS window
 * (oldest first), then the earlier tokens by score, so the count c_h of a head keeps exactly
 * that set, and min(B, c_h) its top B */
static kvt_status sel_dms(kvt_layer_ctx *c, const kvt_policy *p, const double *s, int W,
                          const int *B, int n_b, kvt_layer_selection *sel)
{
    const int T = c->T, P = T - W, H = sel->n_heads;
    const int Wd = p->o.dms_window < T ? p->o.dms_window : T, Pd = T - (Wd > W ? Wd : W);
    double *x = kvt_malloc(((size_t)H * P + 1) * sizeof(double));
    KVT_RETURN_IF(!x, KVT_ERR_NOMEM, "%s: out of memory", p->def->name);
    kvt_status st = KVT_OK;
    int *keep = kvt_malloc(((size_t)H + 1) * sizeof(int));
    if (!keep)
        st = kvt_error_set(KVT_ERR_NOMEM, "%s: out of memory", p->def->name);
    for (int h = 0; h < H && !st; h++) {
        const double *sh = s + (size_t)h * P;
        double *xh = x + (size_t)h * P;
        keep[h] = T - Pd; /* the DMS window (and the policy's) */
        for (int j = 0; j < P && !st; j++) {
            if (j < Pd && isnan(sh[j])) /* (the DMS window's scores are not looked at) */
                st = kvt_error_set(KVT_ERR_NAN,
                                   "%s: dms=: NaN score at layer %d, head %d, token %d "
                                   "(DMSPress would keep it)",
                                   p->def->name, c->layer, h, j);
            xh[j] = j < Pd ? sh[j] : INFINITY;
            keep[h] += j < Pd && sh[j] >= p->o.dms;
        }
    }
    if (!st)
        st = kvt_sel_rank_window_all(sel, x, W);
    int32_t *tmp = st ? NULL : kvt_malloc(((size_t)P + 1) * sizeof(int32_t));
    if (!st && !tmp)
        st = kvt_error_set(KVT_ERR_NOMEM, "%s: out of memory", p->def->name);
    for (int h = 0; h < H && !st && Pd < P; h++) { /* the DMS window right after the policy's,
                                                      before other protected tokens (sinks) */
        int32_t *o = sel->order + (size_t)h * T + W;
        int k = 0;
        for (int i = 0; i < P; i++)
            if (o[i] >= Pd)
                tmp[k++] = o[i];
        for (int i = 0; i < P; i++)
            if (o[i] < Pd)
                tmp[k++] = o[i];
        memcpy(o, tmp, (size_t)P * sizeof(int32_t));
    }
    kvt_free(tmp);
    if (!st) {
        kvt_counts_uniform(sel, B, n_b);
        for (int b = 0; b < n_b; b++)
            for (int h = 0; h < H; h++) {
                int *n = &sel->count[(size_t)b * H + h];
                *n = *n < keep[h] ? *n : keep[h];
            }
    }
    kvt_free(x);
    kvt_free(keep);
    return st;
}

kvt_status kvt_sel_rank_counts(kvt_layer_ctx *c, const kvt_policy *p, const double *s, int W,
                               const int *B, int n_b, kvt_layer_selection *sel)
{
    if (!isnan(p->o.dms))
        return sel_dms(c, p, s, W, B, n_b, sel);
    if (!p->o.critical) {
        KVT_FORWARD(kvt_sel_rank_window_all(sel, s, W));
        return sel_counts(c, p, s, W, B, n_b, sel);
    }
    KVT_RETURN_IF(!p->crit, KVT_ERR_INVALID_ARG,
                  "%s: critical=%s is a directory of per-trace files, read by a trace replay "
                  "(kvt_replay_trace); give a layer replay its FILE.npy",
                  p->def->name, p->o.critical);
    KVT_FORWARD(kvt_critical_check(p, p->crit, p->o.critical, c->n_layers, c->Hq, c->Hkv, c->T));
    const int T = c->T, P = T - W, H = sel->n_heads;
    const bool ada = p->o.adaptive || p->def == &kvt_policy_def_adakv;
    kvt_status st = KVT_OK;
    if (ada) { /* AdaKV's counts (kvpress's rule, alloc=b) from the scores */
        kvt_policy_opts o = p->o;
        o.window = W;
        if ((st = kvt_sel_init_per_budget(sel)) || (st = kvt_adakv_counts(c, &o, s, B, n_b, sel)))
            return st;
    } else
        kvt_counts_uniform(sel, B, n_b);
    crit_work w = {.sig = kvt_malloc(((size_t)P + 1) * sizeof(int32_t)),
                   .rho = kvt_malloc(((size_t)P + 1) * sizeof(int32_t)),
                   .wk = kvt_malloc(((size_t)P + 1) * sizeof(int32_t)),
                   .r = kvt_malloc(((size_t)P + 1) * sizeof(double)),
                   .mark = kvt_malloc((size_t)P + 1)};
    if (!w.sig || !w.rho || !w.wk || !w.r || !w.mark)
        st = kvt_error_set(KVT_ERR_NOMEM, "%s: out of memory", p->def->name);
    for (int h = 0; h < H && !st; h++) {
        if ((st = head_orders(c, p, h, s + (size_t)h * P, P, &w)))
            break;
        if (!ada) {
            int32_t *order = sel->order + (size_t)h * T;
            window_first(order, T, P);
            critical_order(&w, P, W, p->o.first, order + (T - P));
            continue;
        }
        for (int b = 0; b < n_b; b++) {
            int32_t *order = sel->border + ((size_t)b * H + h) * T;
            const int cnt = sel->count[(size_t)b * H + h], cp = cnt - (T - P);
            const int n_safe = (int)floor(p->o.alpha * B[b]);
            const int st1 = (int)floor(cnt * p->o.first);
            int kp = (n_safe > st1 ? n_safe : st1) - (T - P);
            kp = kp < 0 ? 0 : kp > cp ? cp : kp;
            window_first(order, T, P);
            ada_order(&w, P, cp < 0 ? 0 : kp, cp < 0 ? 0 : cp, order + (T - P));
        }
    }
    kvt_free(w.sig);
    kvt_free(w.rho);
    kvt_free(w.wk);
    kvt_free(w.r);
    kvt_free(w.mark);
    return st;
}
