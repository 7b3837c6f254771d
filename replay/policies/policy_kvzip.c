/* policy_kvzip.c - `kvzip` (KVzip: query-agnostic KV cache compression with context
 * reconstruction, arXiv 2505.23416; as kvpress's KVzipPress computes it, kvpress/presses/
 * kvzip_press.py). The scores come from the capture: the trace's kvzip_score records
 * (traces/FORMAT.md), the largest attention each prompt key received, over its KV head's query
 * heads, while the model repeated the prompt (capture-llama2c --kvzip).
 *
 * With s[l][g][j] those scores, and s = 1 for the first `sinks` tokens (kvpress's n_sink = 4:
 * the score array starts at 1 there), a budget of fraction f of the prompt (its written share,
 * or B/T) has the compression ratio r = 1 - f, and:
 * - layerwise=0 (kvpress's default): over all L x Hkv x T scores sorted ascending, the
 *   threshold is the one at index max(int(N r) - 1, 0); layer l prunes its n_l scores at or
 *   below it (so the layers share the pruning unevenly, and ties at the threshold all go);
 * - layerwise=1: every layer prunes n_l = int(Hkv T r);
 * - uniform=1 (the released code's `pair-uniform` level, snu-mllab/KVzip attention/score.py):
 *   every KV head keeps its B best scores, as any score policy at budget B (ties: lower token);
 * - layer l keeps its Hkv T - n_l largest scores, its heads flattened (heads share the layer's
 *   budget unevenly, a head may keep none): ties kept by lower head, then lower token. KVzip has
 *   no safeguard floor. B >= T keeps everything (kvpress compresses only with r > 0).
 * kvpress computes the scores in the model's dtype (bf16 for most models), which makes ties far
 * more common than in a trace's f32 scores. kvpress's score array starts at 1 for the first
 * n_sink tokens but its reconstruction overwrites them when it starts before n_sink (a model
 * without a chat template); sinks=0 replays that case.
 *
 * The layers' budgets need every layer's scores, so the policy's bind reads them all before any
 * layer is replayed; a single-layer replay is refused.
 */
#include <stdlib.h>
#include <string.h>

#include "../replay_internal.h"
#include "kvt_trace.h"

typedef struct kvzip_state {
    int L, Hkv, T;
    float *s;      /* [L, Hkv, T] the scores, sinks at 1 */
    float *sorted; /* [L * Hkv * T] ascending (the global threshold), or NULL */
} kvzip_state;

static void d_kvzip(kvt_policy_opts *o)
{
    o->window = 0;
    o->sinks = 4;
}

static kvt_status init_kvzip(kvt_policy *p)
{
    KVT_RETURN_IF(p->o.uniform && p->o.layerwise, KVT_ERR_INVALID_ARG,
                  "kvzip: uniform=1 gives every head the budget, layerwise=1 shares a layer's "
                  "between its heads: give one of them");
    return KVT_OK;
}

static void unbind_kvzip(void *state)
{
    kvzip_state *s = state;
    if (s) {
        kvt_free(s->s);
        kvt_free(s->sorted);
    }
    kvt_free(s);
}

static int cmp_f32(const void *a, const void *b)
{
    const float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* before the trace's first layer: every layer's scores */
static kvt_status bind_kvzip(const kvt_policy *p, const char *path, int L, int Hq, int Hkv, int T,
                             void **state)
{
    (void)Hq;
    const size_t per = (size_t)Hkv * T, N = (size_t)L * per;
    kvzip_state *s = kvt_calloc(1, sizeof(*s));
    kvt_trace_reader *r = NULL;
    kvt_status st = KVT_OK;
    if (!s || !(s->s = kvt_malloc(N * sizeof(float) + 1)) ||
        (!p->o.layerwise && !p->o.uniform && !(s->sorted = kvt_malloc(N * sizeof(float) + 1)))) {
        st = kvt_error_set(KVT_ERR_NOMEM, "kvzip: out of memory (%zu scores)", N);
        goto out;
    }
    s->L = L, s->Hkv = Hkv, s->T = T;
    if ((st = kvt_trace_reader_open(path, &r)))
        goto out;
    for (int l = 0; l < L && !st; l++) {
        uint32_t h = 0, t = 0, d = 0;
        kvt_dtype dt;
        if (kvt_trace_reader_shape(r, l, KVT_KIND_KVZIP_SCORE, &h, &t, &d, &dt) != KVT_OK) {
            st = kvt_error_set(KVT_ERR_INVALID_ARG,
                               "kvzip: layer %d has no kvzip_score record (KVzip's scores come "
                               "from a reconstruction pass at capture: capture-llama2c --kvzip)",
                               l);
            break;
        }
        if (h != (uint32_t)Hkv || t != (uint32_t)T || d != 1) {
            st = kvt_error_set(KVT_ERR_CORRUPT,
                               "kvzip: layer %d's kvzip_score is [%u, %u, %u], not [%d, %d, 1]", l,
                               h, t, d, Hkv, T);
            break;
        }
        float *x = s->s + (size_t)l * per;
        if ((st = kvt_trace_reader_read(r, l, KVT_KIND_KVZIP_SCORE, 0, (uint32_t)Hkv, KVT_DTYPE_F32,
                                        x, per * sizeof(float))))
            break;
        for (size_t i = 0; i < per && !st; i++)
            if (!(x[i] >= 0.0f && x[i] <= 1.0f))
                st = kvt_error_set(KVT_ERR_CORRUPT,
                                   "kvzip: layer %d, KV head %zu, token %zu: kvzip_score %g is "
                                   "not an attention probability in [0, 1]",
                                   l, i / T, i % T, (double)x[i]);
        for (int g = 0; g < Hkv; g++)
            for (int j = 0; j < T && j < p->o.sinks; j++)
                x[(size_t)g * T + j] = 1.0f;
    }
    if (!st && s->sorted) {
        memcpy(s->sorted, s->s, N * sizeof(float));
        qsort(s->sorted, N, sizeof(float), cmp_f32);
    }
out:
    if (r)
        kvt_trace_reader_close(r);
    if (st)
        unbind_kvzip(s);
    else
        *state = s;
    return st;
}

/* entries layer l prunes at compression ratio r (0 < r < 1) */
static int64_t kvzip_pruned(const kvzip_state *s, int l, bool layerwise, double r)
{
    const size_t per = (size_t)s->Hkv * s->T;
    if (layerwise)
        return (int64_t)((double)per * r);
    const size_t N = (size_t)s->L * per;
    int64_t n = (int64_t)((double)N * r) - 1;
    const float thres = s->sorted[n > 0 ? n : 0];
    int64_t c = 0;
    const float *x = s->s + (size_t)l * per;
    for (size_t i = 0; i < per; i++)
        c += x[i] <= thres;
    return c;
}

static kvt_status sel_kvzip(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                            kvt_layer_selection *sel)
{
    const kvzip_state *s = p->state;
    const int T = c->T, H = c->Hkv;
    KVT_RETURN_IF(!s, KVT_ERR_INVALID_ARG,
                  "kvzip: a layer's budget comes from every layer's scores: replay the whole "
                  "trace (kvtrace replay), not one layer");
    KVT_RETURN_IF(s->T != T || s->L != c->n_layers || s->Hkv != H, KVT_ERR_STATE,
                  "kvzip: bound to a trace of %d layers, %d KV heads and %d tokens, not %d, %d "
                  "and %d",
                  s->L, s->Hkv, s->T, c->n_layers, H, T);
    KVT_FORWARD(kvt_sel_init(sel, c, false, 0, n_b, true));
    const size_t per = (size_t)H * T;
    const bool shared = !p->o.uniform; /* the layer's heads share its entries */
    const float *x = s->s + (size_t)c->layer * per;
    double *sc = kvt_malloc(per * sizeof(double));
    int32_t *ord = NULL, *work = NULL;
    kvt_status st = KVT_OK;
    if (shared) {
        ord = kvt_malloc(per * sizeof(int32_t));
        work = kvt_malloc(per * sizeof(int32_t));
    }
    if (!sc || (shared && (!ord || !work))) {
        st = kvt_error_set(KVT_ERR_NOMEM, "kvzip: out of memory");
        goto out;
    }
    for (size_t i = 0; i < per; i++)
        sc[i] = x[i];
    /* each head's ranking, and (shared) the layer's over its heads flattened: the same order
     * within a head (score descending, lower token first), so a head's share of the layer's top
     * entries is the top of its own ranking */
    if ((st = kvt_sel_rank_window_all(sel, sc, 0)) ||
        (shared && (st = kvt_rank_desc(sc, (int)per, ord, work))))
        goto out;
    for (int b = 0; b < n_b; b++) {
        int32_t *cnt = sel->count + (size_t)b * H;
        if (B[b] >= T || !shared) { /* the whole prompt, or (uniform) each head its B best */
            for (int h = 0; h < H; h++)
                cnt[h] = B[b] < T ? B[b] : T;
            continue;
        }
        const double f = c->budget_frac ? c->budget_frac[b] : (double)B[b] / T;
        int64_t keep = (int64_t)per - kvzip_pruned(s, c->layer, p->o.layerwise, 1.0 - f);
        memset(cnt, 0, (size_t)H * sizeof(int32_t));
        for (int64_t i = 0; i < keep; i++)
            cnt[ord[i] / T]++;
    }
out:
    kvt_free(sc);
    kvt_free(ord);
    kvt_free(work);
    return st;
}

const kvt_policy_def kvt_policy_def_kvzip = {
    .name = "kvzip",
    .summary = "KVzip: the attention each key gets while the model repeats the prompt "
               "(kvzip_score, captured); one threshold over every layer's heads",
    .flags = KVT_POLICY_LAYER_BUDGETS,
    .keys = "sinks,layerwise,uniform",
    .defaults = d_kvzip,
    .init = init_kvzip,
    .bind = bind_kvzip,
    .unbind = unbind_kvzip,
    .select = sel_kvzip,
};
