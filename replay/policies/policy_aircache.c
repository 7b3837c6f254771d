/* policy_aircache.c - `aircache-like` (POLICIES §11: AirCache, "Activating Inter-modal Relevancy
 * KV Cache Compression for Efficient Large Vision-Language Model Inference", arXiv 2503.23956,
 * ICCV 2025; no public code, and the paper's method section was not readable from here: built
 * from its abstract and two paper notes that give its equations; what they leave open is
 * inferred and marked so in analysis/RESULTS.md). Only visual tokens are evicted; every other
 * token is kept.
 *
 * The instruction is the prompt after its last image or video token (last=N: its last N
 * tokens). Per layer and query head, with logits z = scale q.k computed in double:
 * - the elite observation window E: the instruction tokens j whose attention from the last
 *   prompt token, softmax over the instruction's keys, is at least threshold (0.9) x the row's
 *   largest, decided on the logits (z_j - max z >= log threshold);
 * - each elite token e attends, softmax over the visual keys and the elite keys up to e, and the
 *   visual tokens' importance I is the mean of those rows over E;
 * a selection head's I is the group's (heads=kv: reduce= over its query heads, the mean by
 * default), the layer's the mean over every query head. Its strength is sum I, its skewness
 * N/((N-1)(N-2)) sum ((I - mean)/sd)^3 over the N visual tokens (sd over N; 0 when N < 3 or
 * sd = 0). Across layers each is divided by its mean over the layers (skewness shifted up by
 * its minimum first when that is negative; a mean of 0 gives 1), and layer l's weight is the
 * mean of the two.
 * At budget B (tokens per head, as every policy's) a layer keeps every non-visual token and of
 * the (B - N_text) x L visual tokens left its share by weight, clamped to [1, N] (the water-
 * filling and rounding of vl-cache: kvt_vlcache_counts on the weights over their largest);
 * each head keeps its share of visual tokens by I (ties: the lower index). B <= N_text keeps the
 * B most recent non-visual tokens; B >= T keeps everything.
 *
 * The budgets need every layer's statistics, so bind reads each layer's keys and queries (the
 * stored window queries when they hold the instruction, else Q_all, one head at a time) before
 * any layer is replayed and keeps each layer's importances, L x H' x T floats; a single-layer
 * replay is refused. The layers are shared out among the replay's threads
 * (kvt_bind_each_layer), and an error is the lowest failed layer's.
 */
#include <math.h>
#include <string.h>

#include "kvt_kernels.h"
#include "../replay_internal.h"
#include "kvt_trace.h"

typedef struct aic_state {
    int L, T, H, n_vis;
    double *weight; /* [L] each layer's weight over the largest */
    float *score;   /* [L, H, T] visual tokens' importance (0 elsewhere) */
    uint8_t *vis;   /* [T] 1 for an image or video token */
} aic_state;

static void d_aic(kvt_policy_opts *o)
{
    o->window = 0;
    o->threshold = 0.9;
    o->last = 0; /* the whole instruction */
}

static void unbind_aic(void *state)
{
    aic_state *s = state;
    if (s) {
        kvt_free(s->weight);
        kvt_free(s->score);
        kvt_free(s->vis);
    }
    kvt_free(s);
}

/* what layer l's bind reads and computes with */
typedef struct aic_work {
    kvt_trace_reader *r;
    const kvt_policy_opts *o;
    const kvt_post_vision *pl;
    aic_state *s;
    int Hq, Hkv, D;
    double scale;
    double *strength, *skew; /* [L] */
} aic_work;

/* z[i] = scale q.k of query qe and the keys keys[0..n) (rows of K); false when one is not
 * finite. *top receives the largest. */
static bool logits(const double *qe, const double *K, int D, double scale, const int32_t *keys,
                   int n, double *z, double *top)
{
    *top = -INFINITY;
    for (int i = 0; i < n; i++) {
        const double *k = K + (size_t)keys[i] * D;
        double d = 0.0;
        for (int c = 0; c < D; c++)
            d += qe[c] * k[c];
        z[i] = d * scale;
        if (!isfinite(z[i]))
            return false;
        *top = z[i] > *top ? z[i] : *top;
    }
    return true;
}

/* the softmax row of query qe over the keys keys[0..n), each visual key's probability added
 * into acc at its token; z [n] is work */
static bool elite_row(const double *qe, const double *K, int D, double scale, const int32_t *keys,
                      int n, const uint8_t *vis, double *z, double *acc)
{
    double top, sum = 0.0;
    if (!logits(qe, K, D, scale, keys, n, z, &top))
        return false;
    for (int i = 0; i < n; i++)
        sum += (z[i] = exp(z[i] - top));
    for (int i = 0; i < n; i++)
        if (vis[keys[i]])
            acc[keys[i]] += z[i] / sum;
    return true;
}

/* layer l (arg: the aic_work; a call of kvt_bind_each_layer, which touches only layer l's
 * part): every query head's importance of the visual tokens, the selection heads' scores into
 * s->score, the layer's strength and skewness */
static kvt_status layer_aic(void *arg, int l)
{
    aic_work *w = arg;
    const kvt_post_vision *pl = w->pl;
    aic_state *s = w->s;
    const int T = s->T, D = w->D, Hq = w->Hq, Hkv = w->Hkv, Gs = Hq / Hkv, H = s->H;
    const int nq = pl->nq[l], p0 = T - pl->used, nv = s->n_vis;
    const double lthr = w->o->threshold > 0 ? log(w->o->threshold) : -INFINITY;
    float *k = kvt_malloc((size_t)T * D * sizeof(float) + 1);
    float *q = kvt_malloc((size_t)nq * D * sizeof(float) + 1);
    double *kd = kvt_malloc((size_t)T * D * sizeof(double) + 1);
    double *qe = kvt_malloc((size_t)D * sizeof(double) + 1);
    double *z = kvt_malloc((size_t)T * sizeof(double) + 1);
    double *acc = kvt_calloc((size_t)Hq * T + 1, sizeof(double));
    double *red = kvt_malloc((size_t)H * T * sizeof(double) + 1);
    int32_t *keys = kvt_malloc((size_t)T * sizeof(int32_t) + 1);
    int32_t *elite = kvt_malloc((size_t)T * sizeof(int32_t) + 1);
    kvt_status st = KVT_OK;
    if (!k || !q || !kd || !qe || !z || !acc || !red || !keys || !elite) {
        st = kvt_error_set(KVT_ERR_NOMEM, "aircache-like: out of memory");
        goto out;
    }
    int n_keys0 = 0; /* the visual keys, every elite row's */
    for (int j = 0; j < T; j++)
        if (s->vis[j])
            keys[n_keys0++] = j;
    for (int h = 0; h < Hq; h++) {
        if (h % Gs == 0) { /* the KV head's keys, in double */
            const uint32_t g = (uint32_t)(h / Gs);
            if ((st = kvt_trace_reader_read(w->r, l, KVT_KIND_K, g, g + 1, KVT_DTYPE_F32, k,
                                            (size_t)T * D * sizeof(float))))
                goto out;
            for (size_t e = 0; e < (size_t)T * D; e++)
                kd[e] = k[e];
        }
        if ((st = kvt_trace_reader_read(w->r, l, pl->qkind, (uint32_t)h, (uint32_t)h + 1,
                                        KVT_DTYPE_F32, q, (size_t)nq * D * sizeof(float))))
            goto out;
        /* the elite window: the last token's attention over the instruction's keys */
        const float *ql = q + (size_t)(nq - 1) * D;
        for (int c = 0; c < D; c++)
            qe[c] = ql[c];
        int n_inst = 0;
        for (int j = p0; j < T; j++)
            keys[n_keys0 + n_inst++] = j;
        double *a = acc + (size_t)h * T, top;
        bool ok = logits(qe, kd, D, w->scale, keys + n_keys0, n_inst, z, &top);
        int n_el = 0; /* (the largest always passes: threshold <= 1) */
        for (int i = 0; ok && i < n_inst; i++)
            if (z[i] - top >= lthr)
                elite[n_el++] = p0 + i;
        /* each elite token's attention over the visual keys and the elite keys up to it */
        for (int i = 0; ok && i < n_el; i++) {
            const int e = elite[i];
            const float *qr = q + (size_t)(nq - (T - e)) * D;
            for (int c = 0; c < D; c++)
                qe[c] = qr[c];
            keys[n_keys0 + i] = e; /* elite[0..i], ascending */
            ok = elite_row(qe, kd, D, w->scale, keys, n_keys0 + i + 1, s->vis, z, a);
        }
        if (!ok) {
            st = kvt_error_set(KVT_ERR_NAN,
                               "aircache-like: layer %d query head %d: a logit of the "
                               "instruction's queries is not finite",
                               l, h);
            goto out;
        }
        for (int i = 0; i < n_keys0; i++) /* (only visual keys were added to) */
            a[keys[i]] /= n_el;
    }
    if (w->o->per_query)
        memcpy(red, acc, (size_t)Hq * T * sizeof(double));
    else if ((st = kvt_gqa_reduce_ref(acc, Hq, Hkv, T, w->o->reduce, red)))
        goto out;
    float *score = s->score + (size_t)l * H * T;
    for (size_t e = 0; e < (size_t)H * T; e++)
        score[e] = (float)red[e];
    /* the layer's importance: the mean over every query head */
    double sum = 0.0, m2 = 0.0, m3 = 0.0;
    for (int j = 0; j < T; j++) {
        if (!s->vis[j])
            continue;
        double x = 0.0;
        for (int h = 0; h < Hq; h++)
            x += acc[(size_t)h * T + j];
        z[j] = x / Hq;
        sum += z[j];
    }
    const double mean = sum / nv;
    for (int j = 0; j < T; j++)
        if (s->vis[j]) {
            const double d = z[j] - mean;
            m2 += d * d;
            m3 += d * d * d;
        }
    const double sd = sqrt(m2 / nv);
    w->strength[l] = sum;
    w->skew[l] =
        nv >= 3 && sd > 0 ? (double)nv / ((double)(nv - 1) * (nv - 2)) * m3 / (sd * sd * sd) : 0.0;
out:
    kvt_free(k);
    kvt_free(q);
    kvt_free(kd);
    kvt_free(qe);
    kvt_free(z);
    kvt_free(acc);
    kvt_free(red);
    kvt_free(keys);
    kvt_free(elite);
    return st;
}

/* each layer's weight over the largest, from the strengths and skewnesses [L] */
void kvt_aircache_weights(const double *strength, const double *skew, int L, double *weight)
{
    double shift = 0.0, ms = 0.0, mk = 0.0, top = 0.0;
    for (int l = 0; l < L; l++)
        shift = skew[l] < shift ? skew[l] : shift;
    for (int l = 0; l < L; l++) {
        ms += strength[l] / L;
        mk += (skew[l] - shift) / L;
    }
    for (int l = 0; l < L; l++) {
        weight[l] =
            ((ms > 0 ? strength[l] / ms : 1.0) + (mk > 0 ? (skew[l] - shift) / mk : 1.0)) / 2;
        top = weight[l] > top ? weight[l] : top;
    }
    for (int l = 0; l < L; l++) /* (0, 1] for kvt_vlcache_counts; a weight of 0 keeps 1 token */
        weight[l] = top > 0 && weight[l] > 0 ? weight[l] / top : top > 0 ? 1e-12 : 1.0;
}

/* before the trace's first layer: every layer's importances and weight */
static kvt_status bind_aic(const kvt_policy *p, const char *path, int L, int Hq, int Hkv, int T,
                           void **state)
{
    kvt_trace_reader *r = NULL;
    aic_state *s = kvt_calloc(1, sizeof(*s));
    kvt_post_vision pl = {0};
    double *strength = NULL, *skew = NULL;
    kvt_status st = KVT_OK;
    if (!s) {
        st = kvt_error_set(KVT_ERR_NOMEM, "aircache-like: out of memory");
        goto out;
    }
    if ((st = kvt_trace_reader_open(path, &r)) ||
        (st = kvt_post_vision_plan(r, "aircache-like", p->o.last, L, Hq, Hkv, T, &pl)))
        goto out;
    s->L = L, s->T = T, s->H = p->o.per_query ? Hq : Hkv;
    s->weight = kvt_malloc((size_t)L * sizeof(double) + 1);
    s->score = kvt_malloc((size_t)L * s->H * T * sizeof(float) + 1);
    s->vis = kvt_malloc((size_t)T + 1);
    strength = kvt_malloc((size_t)L * sizeof(double) + 1);
    skew = kvt_malloc((size_t)L * sizeof(double) + 1);
    if (!s->weight || !s->score || !s->vis || !strength || !skew) {
        st = kvt_error_set(KVT_ERR_NOMEM,
                           "aircache-like: out of memory (%d layers x %d heads x %d tokens of "
                           "scores)",
                           L, s->H, T);
        goto out;
    }
    for (int j = 0; j < T; j++) {
        s->vis[j] = pl.mod[j] == KVT_MOD_IMAGE || pl.mod[j] == KVT_MOD_VIDEO;
        s->n_vis += s->vis[j];
    }
    aic_work w = {.r = r,
                  .o = &p->o,
                  .pl = &pl,
                  .s = s,
                  .Hq = Hq,
                  .Hkv = Hkv,
                  .D = pl.D,
                  .scale = kvt_bind_trace_scale(r, pl.D),
                  .strength = strength,
                  .skew = skew};
    /* the layers on the replay's threads, each holding one layer's work arrays */
    const uint64_t per = (uint64_t)T * pl.D * 12 + (uint64_t)(Hq + s->H) * T * 8 +
                         (uint64_t)T * 16 + (uint64_t)pl.nq[0] * pl.D * 4;
    st = kvt_bind_each_layer(L, per, layer_aic, &w);
    if (!st)
        kvt_aircache_weights(strength, skew, L, s->weight);
out:
    if (r)
        kvt_trace_reader_close(r);
    kvt_post_vision_free(&pl);
    kvt_free(strength);
    kvt_free(skew);
    if (st)
        unbind_aic(s);
    else
        *state = s;
    return st;
}

static kvt_status sel_aic(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                          kvt_layer_selection *sel)
{
    const kvt_policy_opts *o = &p->o;
    const aic_state *s = p->state;
    const int T = c->T, L = c->n_layers;
    KVT_RETURN_IF(!s, KVT_ERR_INVALID_ARG,
                  "aircache-like: a layer's budget comes from every layer's visual attention: "
                  "replay the whole trace (kvtrace replay), not one layer");
    KVT_RETURN_IF(s->T != T || s->L != L, KVT_ERR_STATE,
                  "aircache-like: bound to a trace of %d layers and %d tokens, not %d and %d", s->L,
                  s->T, L, T);
    KVT_FORWARD(kvt_sel_init(sel, c, o->per_query, 0, n_b, true));
    const int H = sel->n_heads, nv = s->n_vis, nt = T - nv;
    KVT_RETURN_IF(H != s->H, KVT_ERR_STATE, "aircache-like: bound for %d heads, not %d", s->H, H);
    int *counts = kvt_malloc((size_t)L * sizeof(int) + 1);
    double *sc = kvt_malloc((size_t)T * sizeof(double) + 1);
    int32_t *vord = kvt_malloc((size_t)T * sizeof(int32_t) + 1);
    kvt_status st = KVT_OK;
    if (!counts || !sc || !vord) {
        st = kvt_error_set(KVT_ERR_NOMEM, "aircache-like: out of memory");
        goto out;
    }
    for (int h = 0; h < H; h++) {
        /* the non-visual tokens, the most recent first, then the visual ones by importance */
        int32_t *ord = sel->order + (size_t)h * T;
        int n = 0, m = 0;
        for (int j = T - 1; j >= 0; j--)
            if (!s->vis[j])
                ord[n++] = j;
        const float *f = s->score + ((size_t)c->layer * H + h) * T;
        for (int j = 0; j < T; j++)
            if (s->vis[j])
                sc[m] = f[j], vord[m++] = j;
        if ((st = kvt_rank_window(sc, m, 0, ord + n)))
            goto out;
        for (int i = 0; i < m; i++) /* ranks of the visual list to their tokens */
            ord[n + i] = vord[ord[n + i]];
    }
    for (int b = 0; b < n_b && !st; b++) {
        int keep = B[b] >= T ? T : B[b] <= nt ? B[b] : -1;
        if (keep < 0) {
            if ((st = kvt_vlcache_counts(s->weight, L, nv, B[b] - nt, counts)))
                break;
            keep = nt + counts[c->layer];
        }
        for (int h = 0; h < H; h++)
            sel->count[(size_t)b * H + h] = keep;
    }
out:
    kvt_free(counts);
    kvt_free(sc);
    kvt_free(vord);
    return st;
}

const kvt_policy_def kvt_policy_def_aircache_like = {
    .name = "aircache-like",
    .summary = "AirCache-like [inferred]: keeps the non-visual tokens; visual tokens by the "
               "attention of the elite instruction tokens (the last token's attention >= "
               "threshold=0.9 of its max), layer budgets by that attention's strength and "
               "skewness",
    .keys = "heads,reduce,threshold,last",
    .flags = KVT_POLICY_LIKE | KVT_POLICY_LAYER_BUDGETS,
    .defaults = d_aic,
    .bind = bind_aic,
    .check = kvt_post_vision_check,
    .unbind = unbind_aic,
    .select = sel_aic,
};
