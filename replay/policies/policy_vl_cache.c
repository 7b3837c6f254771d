/* policy_vl_cache.c - `vl-cache` (POLICIES §11: VL-Cache, "Sparsity and Modality-Aware KV Cache
 * Compression for Vision-Language Model Inference Acceleration", arXiv 2410.23317, ICLR 2025;
 * no public code: built from the paper's method as POLICIES states it, the rest inferred and
 * marked so in analysis/RESULTS.md).
 *
 * The post-vision queries are the prompt tokens after its last image or video token (the
 * language prompt that follows the visual context); last=N takes only the last N of them.
 * With A their attention (softmax over the keys each sees, causal, computed in double):
 * - a layer's sparsity is the share of the entries A[h, i, j] (every query head h,
 *   post-vision query i at position t_i, key j <= t_i) below threshold x the row's largest
 *   (threshold = 0.01: 1% of the row maximum), decided on the logits (z_ij - max_j z_ij <
 *   log threshold, the same inequality without rounding the probabilities); its density d_l is
 *   1 - sparsity;
 * - the layers' budgets are proportional to their densities with the total kept L x B: layer l
 *   keeps clamp(lambda d_l, 1, T) tokens, lambda making them sum to L B (a layer held at 1 or
 *   T leaves the rest to the others in the same proportions), rounded down, the tokens left
 *   over one each to the largest remainders (ties: the lower layer) [inferred: the paper
 *   states the proportion, not the rounding or the bounds];
 * - a token's score is the post-vision attention it receives, sum over i of A[h, i, j]
 *   (heads=kv: reduce= over the KV head's query heads, the mean by default); every head of a
 *   layer keeps that layer's count of its highest scores (ties: the lower index).
 * window=W (default 0) keeps the last W tokens first, as every score policy's window does.
 * A budget of at least T keeps everything.
 *
 * The budgets need every layer's attention, so bind reads each layer's queries and keys before
 * any layer is replayed (the stored window queries when they hold the post-vision queries,
 * else Q_all, one head at a time) and keeps each layer's scores, L x H' x T floats; a
 * single-layer replay is refused. The layers are shared out among the replay's threads
 * (kvt_bind_each_layer: a thread per core by default; its workers have not started yet), and
 * an error is the lowest failed layer's.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "kvt_kernels.h"
#include "../replay_internal.h"
#include "kvt_trace.h"

#define VLC_BLOCK 128  /* post-vision queries per dense product */
#define VLC_TIE   1e-9 /* remainders closer than this tie (the lower layer first) */

typedef struct vlc_state {
    int L, T, H;
    double *density; /* [L] */
    float *score;    /* [L, H, T] */
} vlc_state;

static void d_vlc(kvt_policy_opts *o)
{
    o->window = 0;
    o->threshold = 0.01;
    o->last = 0; /* every post-vision query */
}

static void unbind_vlc(void *state)
{
    vlc_state *s = state;
    if (s) {
        kvt_free(s->density);
        kvt_free(s->score);
    }
    kvt_free(s);
}

/* the layers shared out among threads (bind runs before the replay's workers start) */
typedef struct vlc_work {
    kvt_trace_reader *r;
    const kvt_policy_opts *o;
    vlc_state *s;
    const int *nq; /* [L] stored queries of each layer */
    int qkind, Hq, Hkv, D, used;
    double scale; /* the softmax scale (the header's, or 1/sqrt(D)) */
} vlc_work;

/* Layer l's density and its heads' scores [H', T] into w->s (arg: the vlc_work; a call of
 * kvt_bind_each_layer): the last `used` of its nq stored queries (positions T - used .. T - 1),
 * one KV head's keys and one query head at a time. */
static kvt_status layer_post(void *arg, int l)
{
    const vlc_work *w = arg;
    kvt_trace_reader *r = w->r;
    const kvt_policy_opts *o = w->o;
    const int qkind = w->qkind, nq = w->nq[l], Hq = w->Hq, Hkv = w->Hkv, T = w->s->T, D = w->D;
    const int used = w->used, Gs = Hq / Hkv, H = o->per_query ? Hq : Hkv;
    const double scale = w->scale;
    double *density = &w->s->density[l];
    float *score = w->s->score + (size_t)l * w->s->H * T;
    const double lthr = o->threshold > 0 ? log(o->threshold) : -INFINITY;
    float *k = kvt_malloc((size_t)T * D * sizeof(float) + 1);
    float *q = kvt_malloc((size_t)nq * D * sizeof(float) + 1);
    double *kd = kvt_malloc((size_t)T * D * sizeof(double) + 1);
    double *qd = kvt_malloc((size_t)VLC_BLOCK * D * sizeof(double) + 1);
    double *z = kvt_malloc((size_t)VLC_BLOCK * T * sizeof(double) + 1);
    double *acc = kvt_calloc((size_t)Hq * T + 1, sizeof(double));
    double *red = kvt_malloc((size_t)H * T * sizeof(double) + 1);
    kvt_status st = KVT_OK;
    if (!k || !q || !kd || !qd || !z || !acc || !red) {
        st = kvt_error_set(KVT_ERR_NOMEM, "vl-cache: out of memory");
        goto out;
    }
    double n_sparse = 0.0, n_all = 0.0;
    for (int h = 0; h < Hq; h++) {
        if (h % Gs == 0) { /* the KV head's keys, in double */
            const uint32_t g = (uint32_t)(h / Gs);
            if ((st = kvt_trace_reader_read(r, l, KVT_KIND_K, g, g + 1, KVT_DTYPE_F32, k,
                                            (size_t)T * D * sizeof(float))))
                goto out;
            for (size_t e = 0; e < (size_t)T * D; e++)
                kd[e] = k[e];
        }
        if ((st = kvt_trace_reader_read(r, l, qkind, (uint32_t)h, (uint32_t)h + 1, KVT_DTYPE_F32, q,
                                        (size_t)nq * D * sizeof(float))))
            goto out;
        double *a = acc + (size_t)h * T;
        for (int i0 = 0; i0 < used; i0 += VLC_BLOCK) {
            const int n = used - i0 < VLC_BLOCK ? used - i0 : VLC_BLOCK;
            const float *qb = q + (size_t)(nq - used + i0) * D;
            for (size_t e = 0; e < (size_t)n * D; e++)
                qd[e] = qb[e];
            kvt_gemm_f64(true, n, T, D, scale, qd, D, kd, D, 0.0, z, T);
            for (int i = 0; i < n; i++) {
                const int t = T - used + i0 + i; /* this query sees keys 0..t */
                double *zi = z + (size_t)i * T, top;
                const int bad = kvt_max_finite_cpu(zi, t + 1, &top);
                if (bad >= 0) {
                    st = kvt_error_set(KVT_ERR_NAN,
                                       "vl-cache: layer %d query head %d: the logit of token "
                                       "%d's query on key %d is not finite",
                                       l, h, t, bad);
                    goto out;
                }
                int sparse = 0;
                for (int j = 0; j <= t; j++)
                    sparse += zi[j] - top < lthr;
                n_sparse += sparse;
                const double inv = 1.0 / kvt_exp_shift_sum_cpu(zi, t + 1, top);
                for (int j = 0; j <= t; j++)
                    a[j] += zi[j] * inv;
                n_all += t + 1;
            }
        }
    }
    *density = 1.0 - n_sparse / n_all;
    if (o->per_query)
        memcpy(red, acc, (size_t)Hq * T * sizeof(double));
    else if ((st = kvt_gqa_reduce_ref(acc, Hq, Hkv, T, o->reduce, red)))
        goto out;
    for (size_t e = 0; e < (size_t)H * T; e++)
        score[e] = (float)red[e];
out:
    kvt_free(k);
    kvt_free(q);
    kvt_free(kd);
    kvt_free(qd);
    kvt_free(z);
    kvt_free(acc);
    kvt_free(red);
    return st;
}

/* before the trace's first layer: every layer's density and scores */
static kvt_status bind_vlc(const kvt_policy *p, const char *path, int L, int Hq, int Hkv, int T,
                           void **state)
{
    kvt_trace_reader *r = NULL;
    vlc_state *s = kvt_calloc(1, sizeof(*s));
    kvt_post_vision pl = {0};
    kvt_status st = KVT_OK;
    if (!s) {
        st = kvt_error_set(KVT_ERR_NOMEM, "vl-cache: out of memory");
        goto out;
    }
    if ((st = kvt_trace_reader_open(path, &r)) ||
        (st = kvt_post_vision_plan(r, "vl-cache", p->o.last, L, Hq, Hkv, T, &pl)))
        goto out;
    s->L = L, s->T = T, s->H = p->o.per_query ? Hq : Hkv;
    s->density = kvt_malloc((size_t)L * sizeof(double) + 1);
    s->score = kvt_malloc((size_t)L * s->H * T * sizeof(float) + 1);
    if (!s->density || !s->score) {
        st = kvt_error_set(KVT_ERR_NOMEM,
                           "vl-cache: out of memory (%d layers x %d heads x %d tokens of scores)",
                           L, s->H, T);
        goto out;
    }
    /* the layers on the replay's threads, each holding one layer's work arrays */
    const int D = pl.D;
    const uint64_t per = ((uint64_t)T * D * 12 + (uint64_t)VLC_BLOCK * T * 8 +
                          (uint64_t)(Hq + s->H) * T * 8 + (uint64_t)pl.nq[0] * D * 4);
    vlc_work w = {.r = r,
                  .o = &p->o,
                  .s = s,
                  .nq = pl.nq,
                  .qkind = pl.qkind,
                  .Hq = Hq,
                  .Hkv = Hkv,
                  .D = D,
                  .used = pl.used,
                  .scale = kvt_bind_trace_scale(r, D)};
    st = kvt_bind_each_layer(L, per, layer_post, &w);
out:
    if (r)
        kvt_trace_reader_close(r);
    kvt_post_vision_free(&pl);
    if (st)
        unbind_vlc(s);
    else
        *state = s;
    return st;
}

/* f(lambda) = sum of clamp(lambda d_l, 1, T) */
static double vlc_fill(const double *d, int L, int T, double lambda)
{
    double f = 0.0;
    for (int l = 0; l < L; l++) {
        const double x = lambda * d[l];
        f += x < 1.0 ? 1.0 : x > T ? (double)T : x;
    }
    return f;
}

kvt_status kvt_vlcache_counts(const double *density, int L, int T, int B, int *counts)
{
    KVT_RETURN_IF(L < 1 || T < 1 || B < 1, KVT_ERR_INVALID_ARG,
                  "vl-cache: %d layers, %d tokens, budget %d", L, T, B);
    double dmin = INFINITY;
    for (int l = 0; l < L; l++) {
        KVT_RETURN_IF(!(density[l] > 0.0 && density[l] <= 1.0), KVT_ERR_INVALID_ARG,
                      "vl-cache: layer %d's density %g is not in (0, 1]", l, density[l]);
        dmin = density[l] < dmin ? density[l] : dmin;
    }
    if (B >= T) {
        for (int l = 0; l < L; l++)
            counts[l] = T;
        return KVT_OK;
    }
    /* the smallest lambda whose fill reaches L B, to the last bit (the fill grows with it) */
    const double S = (double)B * L;
    double lo = 0.0, hi = (double)T / dmin;
    for (;;) {
        const double mid = lo + (hi - lo) / 2;
        if (mid <= lo || mid >= hi)
            break;
        if (vlc_fill(density, L, T, mid) < S)
            lo = mid;
        else
            hi = mid;
    }
    double *frac = kvt_malloc((size_t)L * sizeof(double) + 1);
    KVT_RETURN_IF(!frac, KVT_ERR_NOMEM, "vl-cache: out of memory");
    int64_t left = (int64_t)B * L;
    for (int l = 0; l < L; l++) { /* held at 1 or T: no remainder */
        const double x = hi * density[l];
        counts[l] = x <= 1.0 ? 1 : x >= T ? T : (int)floor(x);
        frac[l] = x <= 1.0 || x >= T ? -1.0 : x - floor(x);
        left -= counts[l];
    }
    /* the tokens left, one each to the largest remainders (within VLC_TIE: the lower layer first);
       should any
       be left after those, to the first layers below T */
    while (left > 0) {
        int best = -1;
        for (int l = 0; l < L; l++)
            if (counts[l] < T && (best < 0 || frac[l] > frac[best] + VLC_TIE))
                best = l;
        if (best < 0)
            break;
        counts[best]++;
        frac[best] = -2.0;
        left--;
    }
    kvt_free(frac);
    return KVT_OK;
}

static kvt_status sel_vlc(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                          kvt_layer_selection *sel)
{
    const kvt_policy_opts *o = &p->o;
    const vlc_state *s = p->state;
    const int T = c->T, W = o->window < T ? o->window : T, P = T - W, L = c->n_layers;
    KVT_RETURN_IF(!s, KVT_ERR_INVALID_ARG,
                  "vl-cache: a layer's budget comes from every layer's post-vision attention: "
                  "replay the whole trace (kvtrace replay), not one layer");
    KVT_RETURN_IF(s->T != T || s->L != L, KVT_ERR_STATE,
                  "vl-cache: bound to a trace of %d layers and %d tokens, not %d and %d", s->L,
                  s->T, L, T);
    KVT_FORWARD(kvt_sel_init(sel, c, o->per_query, W, n_b, true));
    const int H = sel->n_heads;
    KVT_RETURN_IF(H != s->H, KVT_ERR_STATE, "vl-cache: bound for %d heads, not %d", s->H, H);
    double *sc = kvt_malloc(((size_t)H * P + 1) * sizeof(double));
    int *counts = kvt_malloc((size_t)L * sizeof(int) + 1);
    kvt_status st = KVT_OK;
    if (!sc || !counts) {
        st = kvt_error_set(KVT_ERR_NOMEM, "vl-cache: out of memory");
        goto out;
    }
    for (int h = 0; h < H; h++) /* the prefix's scores, [H', P] */
        for (int j = 0; j < P; j++)
            sc[(size_t)h * P + j] = s->score[((size_t)c->layer * H + h) * T + j];
    if ((st = kvt_sel_rank_window_all(sel, sc, W)))
        goto out;
    for (int b = 0; b < n_b && !st; b++) {
        if ((st = kvt_vlcache_counts(s->density, L, T, B[b], counts)))
            break;
        for (int h = 0; h < H; h++)
            sel->count[(size_t)b * H + h] = counts[c->layer];
    }
out:
    kvt_free(sc);
    kvt_free(counts);
    return st;
}

const kvt_policy_def kvt_policy_def_vl_cache = {
    .name = "vl-cache",
    .summary = "VL-Cache: layer budgets by the density of the post-vision attention (the prompt "
               "after its last image/video token; threshold=0.01 of a row's max is sparse), "
               "tokens by the post-vision attention they receive (last=N: the last N queries)",
    .flags = KVT_POLICY_LAYER_BUDGETS,
    .keys = "window,heads,reduce,threshold,last",
    .defaults = d_vlc,
    .bind = bind_vlc,
    .check = kvt_post_vision_check,
    .unbind = unbind_vlc,
    .select = sel_vlc,
};
