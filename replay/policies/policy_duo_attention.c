/* policy_duo_attention.c - `duo-attention`: kvpress's DuoAttentionPress (DuoAttention,
 * arXiv 2410.10819; kvpress/presses/duo_attention_press.py @00a150c). An offline score per KV
 * head of every layer (scores=FILE, [layers, KV heads]: DuoAttention's full_attention_heads.tsv,
 * a JSON head table or a 2-D .npy), clipped to [0, 1] as kvpress clips the published patterns.
 * The lowest-scored heads of the whole model become streaming heads, which keep `sinks` first
 * tokens and the `recent` last (kvpress reads 128 and 256 from the pattern's config.json);
 * the others (retrieval heads) keep the whole prompt. Ties: the lower (layer, head) streams
 * first (numpy's argsort leaves them unspecified).
 *
 * kvpress's knob is the share of streaming heads (head_compression_ratio); kvtrace's is the
 * budget B, the mean entries per head: at prompt length T > sinks + recent,
 * n = ceil(N (T - B) / (T - sinks - recent)) of the N = layers x KV heads heads stream, the
 * fewest that bring the model's mean down to B; B >= T: none. When B < sinks + recent every
 * head streams and keeps sinks + recent, more than B (results.json's kept counts say so); a
 * prompt of at most sinks + recent tokens is kept whole. Every head's ranking is StreamingLLM's
 * (the sinks, then the most recent first), so the sets are nested across budgets. */
#include <math.h>
#include <string.h>

#include "../replay_internal.h"

typedef struct duo_state {
    int L, H;      /* the file's layers and KV heads */
    int32_t *rank; /* [L*H] each head's place in the ascending order of the clipped scores */
} duo_state;

static void duo_fini(kvt_policy *p)
{
    duo_state *s = p->state;
    if (s)
        kvt_free(s->rank);
    kvt_free(s);
    p->state = NULL;
}

/* scores=FILE as [L, H] doubles: a 2-D .npy, or kvt_read_head_table's JSON or text forms */
static kvt_status read_scores(const char *path, int *L, int *H, double **out)
{
    size_t n = strlen(path);
    if (!(n > 4 && !strcmp(path + n - 4, ".npy")))
        return kvt_read_head_table(path, L, H, out);
    kvt_npy a;
    KVT_FORWARD(kvt_read_npy(path, &a));
    kvt_status st = KVT_OK;
    if (a.ndim != 2 || a.shape[0] < 1 || a.shape[1] < 1)
        st =
            kvt_error_set(KVT_ERR_INVALID_ARG, "%s: expected a 2-D array [layers, KV heads]", path);
    else if (!(*out = kvt_malloc(a.n * sizeof(double))))
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
    else {
        for (size_t i = 0; i < a.n; i++)
            (*out)[i] = kvt_npy_at(&a, i);
        *L = a.shape[0], *H = a.shape[1];
    }
    kvt_npy_free(&a);
    return st;
}

static kvt_status duo_init(kvt_policy *p)
{
    KVT_RETURN_IF(!p->o.scores, KVT_ERR_INVALID_ARG,
                  "duo-attention needs scores=FILE: the [layers, KV heads] gate scores "
                  "(DuoAttention's full_attention_heads.tsv, JSON or .npy)");
    double *sc = NULL;
    int L = 0, H = 0;
    kvt_status st = read_scores(p->o.scores, &L, &H, &sc);
    if (st)
        return kvt_error_set(st, "duo-attention: %s", kvt_error_msg());
    const size_t N = (size_t)L * H;
    duo_state *s = kvt_calloc(1, sizeof(*s));
    int32_t *work = kvt_malloc(N * sizeof(int32_t));
    if (!s || !work || !(s->rank = kvt_malloc(N * sizeof(int32_t)))) {
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < N; i++) {
        double x = sc[i];
        if (isnan(x)) {
            st = kvt_error_set(KVT_ERR_INVALID_ARG,
                               "duo-attention: %s has no score for layer %zu head %zu", p->o.scores,
                               i / (size_t)H, i % (size_t)H);
            goto out;
        }
        sc[i] = 0.0 - (x < 0 ? 0 : x > 1 ? 1 : x); /* descending of -x (no -0): ascending */
    }
    int32_t *ord = kvt_malloc(N * sizeof(int32_t));
    if (!ord) {
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
        goto out;
    }
    st = kvt_rank_desc(sc, (int)N, ord, work);
    for (size_t i = 0; i < N && !st; i++)
        s->rank[ord[i]] = (int32_t)i;
    kvt_free(ord);
    if (st)
        goto out;
    s->L = L, s->H = H;
    p->state = s;
    s = NULL;
out:
    if (s)
        kvt_free(s->rank);
    kvt_free(s);
    kvt_free(work);
    kvt_free(sc);
    return st;
}

static kvt_status sel_duo(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                          kvt_layer_selection *sel)
{
    const duo_state *s = p->state;
    KVT_RETURN_IF(s->L != c->n_layers || s->H != c->Hkv, KVT_ERR_INVALID_ARG,
                  "duo-attention: %s holds %d layers x %d heads; the model has %d layers, %d KV "
                  "heads (a gate per KV head of every layer)",
                  p->o.scores, s->L, s->H, c->n_layers, c->Hkv);
    const int T = c->T;
    KVT_FORWARD(kvt_sel_init(sel, c, p->o.per_query, 0, n_b, true));
    kvt_sel_streaming_order(sel, p->o.sinks);
    const long long keep = (long long)p->o.sinks + p->o.recent; /* a streaming head's */
    const long long N = (long long)s->L * s->H, span = T - keep;
    const int G = p->o.per_query ? c->Hq / c->Hkv : 1;
    for (int b = 0; b < n_b; b++) {
        long long n = 0; /* streaming heads */
        if (span > 0 && B[b] < T)
            n = (N * (T - B[b]) + span - 1) / span;
        for (int h = 0; h < sel->n_heads; h++) {
            bool streams = s->rank[(size_t)c->layer * s->H + h / G] < n;
            sel->count[(size_t)b * sel->n_heads + h] = streams && keep < T ? (int)keep : T;
        }
    }
    return KVT_OK;
}

static void d_duo(kvt_policy_opts *o)
{
    o->sinks = 128; /* the sink_size and recent_size of DuoAttention's published patterns */
    o->recent = 256;
}

const kvt_policy_def kvt_policy_def_duo_attention = {
    .name = "duo-attention",
    .summary = "DuoAttention (kvpress DuoAttentionPress): streaming heads (the lowest of "
               "scores=FILE) keep sinks + recent, the others all; B sets how many stream",
    .flags = KVT_POLICY_LAYER_BUDGETS,
    .keys = "heads,sinks,recent,scores",
    .defaults = d_duo,
    .init = duo_init,
    .fini = duo_fini,
    .select = sel_duo,
};
