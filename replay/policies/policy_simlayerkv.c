/* policy_simlayerkv.c - `simlayerkv`: kvpress's SimLayerKVPress (SimLayerKV, arXiv 2410.13846;
 * kvpress/presses/simlayerkv_press.py @adca7bb). A layer is lazy when its last `last` window
 * queries (n_last, default 1) put more than `threshold` (lazy_threshold) of their attention,
 * averaged over every query head and those queries, on the tokens a lazy layer keeps; a lazy
 * layer keeps `sinks` first tokens (n_initial, 4) and the most recent, the others keep the
 * whole prompt. One decision per layer, the same set for all its heads.
 *
 * kvpress's lazy cache is n_initial + n_recent - n_last entries; kvtrace's budget B is that
 * size, so B stands for n_recent = B - sinks + last. The attention is SnapKV's window attention
 * of the last queries (softmax over all T keys, causal inside the window) without the last
 * `last` key columns, as kvpress's compute_window_attention; its score sums the first `sinks`
 * columns and the n_recent columns before the last `last`. B >= T, threshold 1 (kvpress's
 * "off") or a prompt of at most B + 2 last tokens (kvpress's n_initial + n_recent + n_last)
 * keep everything. B <= sinks keeps the first B tokens (kvpress has no such case). */
#include "../replay_internal.h"

static kvt_status sel_simlayer(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                               kvt_layer_selection *sel)
{
    const kvt_policy_opts *o = &p->o;
    const int T = c->T, last = o->last;
    KVT_RETURN_IF(last > c->Wt, KVT_ERR_INVALID_ARG,
                  "simlayerkv: last=%d needs %d window queries; the trace holds %d", last, last,
                  c->Wt);
    KVT_FORWARD(kvt_ctx_fetch(c, KVT_CTX_PRW));
    KVT_FORWARD(kvt_sel_init(sel, c, o->per_query, 0, n_b, true));
    kvt_sel_streaming_order(sel, o->sinks);
    const int P = T - last; /* the key columns kvpress scores */
    double *a = kvt_calloc((size_t)(P > 0 ? P : 1), sizeof(double));
    KVT_RETURN_IF(!a, KVT_ERR_NOMEM, "simlayerkv: out of memory");
    for (int h = 0; h < c->Hq; h++)
        for (int i = c->Wt - last; i < c->Wt; i++) {
            const float *row = c->prw + ((size_t)h * c->Wt + i) * T;
            for (int j = 0; j < P; j++)
                a[j] += row[j];
        }
    for (int j = 0; j < P; j++)
        a[j] /= (double)c->Hq * last;
    for (int b = 0; b < n_b; b++) {
        int cnt = T;
        /* lazy is possible: T > B + 2 last, i.e. T > sinks + n_recent + last */
        if (o->threshold < 1.0 && (long long)B[b] + 2LL * last < T) {
            int S = o->sinks < B[b] ? o->sinks : B[b];
            int n_recent = B[b] - S + last; /* < P - S: the two ranges do not overlap */
            double score = 0.0;
            for (int j = 0; j < S; j++)
                score += a[j];
            for (int j = P - n_recent; j < P; j++)
                score += a[j];
            if (score > o->threshold)
                cnt = B[b];
        }
        for (int h = 0; h < sel->n_heads; h++)
            sel->count[(size_t)b * sel->n_heads + h] = cnt;
    }
    kvt_free(a);
    return KVT_OK;
}

const kvt_policy_def kvt_policy_def_simlayerkv = {
    .name = "simlayerkv",
    .summary = "SimLayerKV (kvpress SimLayerKVPress): lazy layers keep sinks + recent, the "
               "others all (threshold: Llama3 0.9, Llama2 0.65, Mistral 0.8, Qwen 0.85)",
    .flags = KVT_POLICY_LAYER_BUDGETS,
    .host_reads = KVT_CTX_PRW,
    .keys = "heads,sinks,threshold,last",
    .select = sel_simlayer,
};
