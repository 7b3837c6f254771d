/* policy_streamingllm.c - `streamingllm` (POLICIES §7): the first `sinks` tokens (default 4)
 * plus the most recent B - sinks. Positions only; the same for every head and layer. The
 * ranking is sinks first, then the tokens from the most recent backwards. */
#include <math.h>

#include "../replay_internal.h"

static kvt_status sel_streaming(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                                kvt_layer_selection *sel)
{
    KVT_FORWARD(kvt_sel_init(sel, c, p->o.per_query, 0, n_b, true));
    kvt_sel_streaming_order(sel, p->o.sinks);
    kvt_counts_uniform(sel, B, n_b);
    return KVT_OK;
}

/* chunk_scores=own|kvpress: kvpress's ChunkPress(StreamingLLMPress): each chunk keeps its own
 * first `sinks` tokens, then its most recent */
static kvt_status chunk_streaming(kvt_layer_ctx *c, const kvt_policy *p, int C, const int *B,
                                  int n_b, kvt_layer_selection *sel)
{
    const int T = c->T, S = p->o.sinks;
    KVT_FORWARD(kvt_sel_init(sel, c, p->o.per_query, 0, n_b, true));
    for (int h = 0; h < sel->n_heads; h++) {
        int32_t *o = sel->order + (size_t)h * T;
        for (int a = 0; a < T; a += C) {
            const int n = T - a < C ? T - a : C;
            int k = a;
            for (int i = 0; i < S; i++)
                o[k++] = a + i;
            for (int i = n - 1; i >= S; i--)
                o[k++] = a + i;
        }
    }
    return KVT_OK;
}

/* decoding=N: StreamingLLM's rolling cache (StartRecentKVCache, as its eval_long_ppl trims it
 * after each token's forward): a compression keeps the sinks (+inf) and then the most recent
 * entries, scored by their position */
static kvt_status cache_streaming(kvt_layer_ctx *c, const kvt_policy *p, int h, int step,
                                  const int32_t *ent, const float *const *k, int n, double *out,
                                  double *work)
{
    (void)c, (void)h, (void)k, (void)work, (void)step;
    for (int i = 0; i < n; i++)
        out[i] = ent[i] < p->o.sinks ? INFINITY : (double)ent[i];
    return KVT_OK;
}

const kvt_policy_def kvt_policy_def_streamingllm = {
    .name = "streamingllm",
    .summary = "attention sinks + most recent tokens",
    .keys = "sinks,heads,merge,decoding,prefill",
    .select = sel_streaming,
    .chunk_rank = chunk_streaming,
    .chunk_min = 's', /* StreamingLLMPress asserts the chunk exceeds n_sink */
    .cache_scores = cache_streaming,
    .cache_scores_kv = true,
    .cache_scores_per_key = true,
};
