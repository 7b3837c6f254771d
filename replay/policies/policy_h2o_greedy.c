/* policy_h2o_greedy.c - `h2o-greedy` (POLICIES §6, the original H2O's eviction): the prompt
 * streamed through a cache of B entries (window included), one token per step, as H2O's
 * Algorithm 1 and its repository's simulation (FMInference/H2O, h2o_hf/utils_lm_eval/
 * modify_llama.py, local_heavy_hitter_mask) evict: token t joins the cache, query t's causal
 * attention (softmax over keys 0..t, as that simulation takes it, f32 probabilities) adds to the
 * score of every cached token, then, once the cache holds more than B, the cached token with the
 * lowest score among those at least W steps old leaves it for good (ties: the later token).
 * A cached token's score is therefore its column sum over the rows seen so far, and an evicted
 * token's would-be final sum does not bring it back: the kept sets differ from h2o's one-shot
 * top-(B - W) of the final sums, and from budget to budget (a ranking per budget).
 * GQA: a KV head's cache ranks by the reduction (reduce=mean|max|sum) of its query heads'
 * scores; heads=query gives every query head its own cache. B >= T keeps everything, B <= W the
 * last B tokens. Needs every prompt query (Q_all); O(T^2 D) per query head, like h2o from Q_all,
 * plus O(T B) per head and budget for the evictions.
 * decode=1 (H2O while generating, its Algorithm 1 over the decode steps): the same eviction goes
 * on from each budget's prompt-time cache: decode step d's token T + d joins, the step's query
 * rows (the full softmax over keys 0 .. T + d, f32 probabilities as the prompt's) add to every
 * token's score, and over capacity the lowest-scoring token at least W steps old leaves, or,
 * with none that old (B <= W), the oldest: a cache per budget and head through the steps
 * (sel->dec, measured and exported as decoding='s). */
#include <math.h>
#include <string.h>

#include "kvt_kernels.h"
#include "../replay_internal.h"

#define ROWS 32 /* query rows whose probabilities are computed at once */

typedef struct hg_budget {
    int B;        /* the cache's capacity (window included) */
    bool sim;     /* simulated over the prompt (W < B < T) */
    int n;        /* tokens cached */
    int32_t *mem; /* [B + 1] the cached tokens, in no order */
    int32_t *ev;  /* [T] the evicted tokens, in eviction order (decode=1: [T + G]) */
    int n_ev;
} hg_budget;

/* the selection head's score of token j: its query heads' partial column sums reduced as
 * kvt_gqa_reduce_ref reduces them */
static double hg_score(const double *acc, int nh, int T, kvt_reduce r, int j)
{
    double s = r == KVT_REDUCE_MAX ? -INFINITY : 0.0;
    for (int u = 0; u < nh; u++) {
        double x = acc[(size_t)u * T + j];
        s = r == KVT_REDUCE_MAX ? (x > s ? x : s) : s + x;
    }
    return r == KVT_REDUCE_MEAN ? s / nh : s;
}

/* step t of one budget's cache: token t joins; over capacity, the lowest-scoring token at
   least W steps old (j <= t - W) leaves, ties to the later token; with none that old (only
   while decoding, B <= W) the oldest. acc: [nh, T] (decode=1: T + G) */
static void hg_step(hg_budget *hb, const double *acc, int nh, int T, kvt_reduce r, int W, int t)
{
    hb->mem[hb->n++] = t;
    if (hb->n <= hb->B)
        return;
    int at = -1, u = -1;
    double lo = INFINITY;
    for (int i = 0; i < hb->n; i++) {
        const int j = hb->mem[i];
        if (j > t - W)
            continue;
        const double s = hg_score(acc, nh, T, r, j);
        if (at < 0 || s < lo || (s == lo && j > u)) {
            at = i, u = j, lo = s;
        }
    }
    /* at >= 0 with B > W: the cache holds B + 1 > W + 1 tokens, at most W from the last W
       steps */
    for (int i = 0; at < 0 && i < hb->n; i++)
        if (i == 0 || hb->mem[i] < u)
            u = hb->mem[i];
    for (int i = 0; at < 0; i++)
        if (hb->mem[i] == u)
            at = i;
    hb->ev[hb->n_ev++] = u;
    hb->mem[at] = hb->mem[--hb->n];
}

/* budget b's ranking of one head: the window (T-1, ..., T-W), the kept prefix ascending, the
   evicted from the last evicted back; without a simulation (B <= W or B >= T: no cache) the
   window then the prefix ascending */
static void hg_ranking(const hg_budget *hb, int T, int W, uint8_t *kept, int32_t *r)
{
    int k = 0;
    for (int j = T - 1; j >= T - W; j--)
        r[k++] = j;
    if (!hb->sim) {
        for (int j = 0; j < T - W; j++)
            r[k++] = j;
        return;
    }
    memset(kept, 0, (size_t)T);
    for (int i = 0; i < hb->n; i++)
        kept[hb->mem[i]] = 1;
    for (int j = 0; j < T - W; j++)
        if (kept[j])
            r[k++] = j;
    for (int i = hb->n_ev - 1; i >= 0; i--)
        if (hb->ev[i] < T - W) /* always: a token leaves at least W steps old */
            r[k++] = hb->ev[i];
}

/* decode=1: selection head s (query heads h0 .. h0 + nh - 1) through the decode
   steps from each budget's prompt-time set (its ranking's first count entries): acc [nh, T + G]
   holds the prompt rows' sums; sel->dec[b, s] gets each cache's last visible steps */
static kvt_status hg_decode(kvt_layer_ctx *c, const kvt_policy *p, kvt_layer_selection *sel,
                            hg_budget *hb, int n_b, int s, int h0, int nh, double *acc)
{
    const int T = c->T, G = c->Gd, H = sel->n_heads;
    const int W = p->o.window < T ? p->o.window : T;
    const size_t as = (size_t)T + G;
    for (int b = 0; b < n_b; b++) {
        const int n0 = sel->count[(size_t)b * H + s];
        const int32_t *r = sel->border + ((size_t)b * H + s) * T;
        KVT_FORWARD(kvt_dec_init(c, p, r, n0, &sel->dec[(size_t)b * H + s]));
        hb[b].n = n0;
        hb[b].n_ev = 0;
        memcpy(hb[b].mem, r, (size_t)n0 * sizeof(int32_t));
    }
    KVT_FORWARD(kvt_ctx_prd_group(c, h0 / c->Gs));
    /* [nh, G + 1] step d's decode-key probabilities of the heads, with kvt_dec_probs_heads' key
       rows and workspace */
    const int D = c->D;
    double *pe = kvt_malloc((size_t)nh * ((size_t)G + 1) * sizeof(double));
    double *z = kvt_malloc((size_t)nh * ((size_t)G + 1) * sizeof(double));
    const float **kp = kvt_malloc(((size_t)G + 1) * sizeof(*kp));
    float *qt = kvt_malloc((size_t)nh * D * sizeof(float));
    if (!pe || !z || !kp || !qt) {
        kvt_free(pe), kvt_free(z), kvt_free(kp), kvt_free(qt);
        return kvt_error_set(KVT_ERR_NOMEM, "%s: out of memory", p->def->name);
    }
    for (int d = 0; d < G; d++)
        kp[d] = kvt_dec_entry_key(c, h0 / c->Gs, T + d);
    kvt_status st = KVT_OK;
    for (int d = 0; d < G && !st; d++) {
        kvt_dec_probs_heads(c, h0, nh, d, kp, qt, z, pe, (size_t)G + 1);
        /* step d's row of each query head h0 + u over keys 0..T+d */
        for (int u = 0; u < nh && !st; u++) {
            const float *pr = kvt_ctx_prd_row(c, (size_t)(h0 + u) * G + (size_t)d);
            const double *pu = pe + (size_t)u * ((size_t)G + 1);
            double *a = acc + (size_t)u * as;
            for (int j = 0; j < T; j++)
                a[j] += (double)pr[j];
            for (int e = 0; e <= d; e++) {
                if (isnan(pu[e])) {
                    st = kvt_error_set(KVT_ERR_NAN,
                                       "%s: decode=1: NaN attention of decode step %d at layer "
                                       "%d, query head %d",
                                       p->def->name, d, c->layer, h0 + u);
                    break;
                }
                a[T + e] += (double)(float)pu[e];
            }
        }
        if (st)
            break;
        for (int b = 0; b < n_b; b++) {
            const int n_ev = hb[b].n_ev;
            hg_step(&hb[b], acc, nh, (int)as, p->o.reduce, W, T + d);
            if (hb[b].n_ev > n_ev) /* evicted after step d's attention */
                sel->dec[(size_t)b * H + s].last[hb[b].ev[n_ev]] = d;
        }
    }
    kvt_free(pe);
    kvt_free(z);
    kvt_free(kp);
    kvt_free(qt);
    return st;
}

static kvt_status sel_h2o_greedy(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                                 kvt_layer_selection *sel)
{
    const char *name = p->def->name;
    KVT_FORWARD(kvt_ctx_check_q_all(c, name));
    KVT_FORWARD(kvt_ctx_fetch(c, KVT_CTX_KV));
    const bool pq = p->o.per_query;
    const int T = c->T, D = c->D, Gs = c->Gs, H = kvt_ctx_heads(c, pq), nh = pq ? 1 : Gs;
    const int W = p->o.window < T ? p->o.window : T;
    KVT_FORWARD(kvt_sel_init(sel, c, pq, W, n_b, true));
    KVT_FORWARD(kvt_sel_init_per_budget(sel));
    kvt_counts_uniform(sel, B, n_b);
    /* decode=1: the caches go on through the decode steps (hg_decode), the scores of decode
       tokens too: acc [nh, T + G] */
    const int G = p->o.greedy_decode ? c->Gd : 0;
    const size_t as = (size_t)T + G;
    if (p->o.greedy_decode) {
        KVT_FORWARD(kvt_dec_begin(c, p, n_b, sel));
        if (G > 0)
            KVT_FORWARD(kvt_ctx_fetch(c, KVT_CTX_PRD));
    }

    const bool own_q = !c->in->q_all; /* Q_all loaded head by head */
    double *acc = kvt_malloc(((size_t)nh * as + 1) * sizeof(double));
    double *work = kvt_malloc(((size_t)T + 1) * sizeof(double));
    float *pr = kvt_malloc(((size_t)nh * ROWS * T + 1) * sizeof(float));
    float *qbuf = own_q ? kvt_malloc(((size_t)nh * T * D + 1) * sizeof(float)) : NULL;
    const float **q = kvt_calloc((size_t)nh + 1, sizeof(*q));
    hg_budget *hb = kvt_calloc((size_t)n_b + 1, sizeof(*hb));
    uint8_t *kept = kvt_malloc((size_t)T + 1);
    int nvis[ROWS];
    kvt_status st = KVT_OK;
    if (!acc || !work || !pr || (own_q && !qbuf) || !q || !hb || !kept) {
        st = kvt_error_set(KVT_ERR_NOMEM, "%s: out of memory", name);
        goto out;
    }
    /* a budget to simulate (W < B < T), or decode steps: the attention rows are needed */
    bool any = G > 0;
    for (int b = 0; b < n_b; b++) {
        hb[b].B = B[b];
        hb[b].sim = W < B[b] && B[b] < T;
        const size_t cap = (size_t)B[b] < as ? (size_t)B[b] : as; /* the most it holds */
        if ((hb[b].sim || G > 0) && (!(hb[b].mem = kvt_malloc((cap + 2) * sizeof(int32_t))) ||
                                     !(hb[b].ev = kvt_malloc((as + 1) * sizeof(int32_t))))) {
            st = kvt_error_set(KVT_ERR_NOMEM, "%s: out of memory", name);
            goto out;
        }
        any |= hb[b].sim;
    }
    for (int s = 0; s < H && !st; s++) {
        const int h0 = pq ? s : s * Gs, g = kvt_ctx_kv_of(c, pq, s);
        const float *k = c->k + (size_t)g * T * D;
        for (int b = 0; b < n_b; b++)
            hb[b].n = hb[b].n_ev = 0;
        for (int u = 0; u < nh && any && !st; u++)
            st = kvt_ctx_q_all_head(c, name, h0 + u, qbuf ? qbuf + (size_t)u * T * D : NULL, &q[u]);
        memset(acc, 0, (size_t)nh * as * sizeof(double));
        for (int t0 = 0; t0 < T && any && !st; t0 += ROWS) {
            const int nr = T - t0 < ROWS ? T - t0 : ROWS, nk = t0 + nr;
            for (int i = 0; i < nr; i++)
                nvis[i] = t0 + i + 1;
            /* rows t0 .. t0+nr-1 of each query head over the keys they see, [nr, nk] */
            for (int u = 0; u < nh && !st; u++)
                st = kvt_attn_probs(q[u] + (size_t)t0 * D, nr, D, k, nk, nvis, NULL, 0, NULL,
                                    c->scale, pr + (size_t)u * ROWS * T, NULL, NULL, work);
            for (int i = 0; i < nr && !st; i++) {
                const int t = t0 + i;
                for (int u = 0; u < nh; u++) { /* every token's score takes row t */
                    const float *row = pr + (size_t)u * ROWS * T + (size_t)i * nk;
                    double *a = acc + (size_t)u * as;
                    for (int j = 0; j <= t; j++)
                        a[j] += (double)row[j];
                }
                for (int b = 0; b < n_b; b++)
                    if (hb[b].sim)
                        hg_step(&hb[b], acc, nh, (int)as, p->o.reduce, W, t);
            }
        }
        for (int b = 0; b < n_b && !st; b++)
            hg_ranking(&hb[b], T, W, kept, sel->border + ((size_t)b * H + s) * T);
        if (!st && G > 0)
            st = hg_decode(c, p, sel, hb, n_b, s, h0, nh, acc);
    }
out:
    for (int b = 0; hb && b < n_b; b++) {
        kvt_free(hb[b].mem);
        kvt_free(hb[b].ev);
    }
    kvt_free(hb);
    kvt_free(acc);
    kvt_free(work);
    kvt_free(pr);
    kvt_free(qbuf);
    kvt_free(q);
    kvt_free(kept);
    return st;
}

const kvt_policy_def kvt_policy_def_h2o_greedy = {
    .name = "h2o-greedy",
    .summary = "H2O's greedy eviction over the prompt: every query's attention accumulates on the "
               "cached tokens, the lowest non-recent one leaves once the cache holds more than B "
               "(a set per budget)",
    .keys = "window,reduce,heads,decode",
    .flags = KVT_POLICY_NEEDS_QALL | KVT_POLICY_PER_BUDGET,
    .host_reads = KVT_CTX_KV,
    .select = sel_h2o_greedy,
};
