/* policy_chunkkv.c - `chunkkv` (POLICIES §11: ChunkKV, arXiv 2502.00299; kvpress
 * ChunkKVPress over SnapKVPress). The prefix P = [0, T-W) is cut into chunks of `chunk` tokens
 * from token 0 (the last one may be shorter). A chunk's score is the mean over its tokens of
 * the SnapKV window score (§0.1: pooled, GQA-reduced) summed over the layer's heads, as kvpress
 * scores it; the layer keeps the window plus the floor((B-W)/chunk) best chunks, whole, the
 * same chunks for every head (ties: lower chunk). A short last chunk among them keeps fewer
 * than B tokens; the results record the count kept. Defaults: chunk 10 (the paper's), W=32,
 * kernel 5, avgpool, GQA mean. Not emulated: the paper's layer-wise index reuse (each layer
 * selects its own chunks here). */
#include <string.h>

#include "../replay_internal.h"

static kvt_status sel_chunkkv(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                              kvt_layer_selection *sel)
{
    const kvt_policy_opts *o = &p->o;
    const double *s;
    KVT_FORWARD(kvt_ctx_check_window(c, "chunkkv", o->window));
    KVT_FORWARD(
        kvt_ctx_window_scores(c, o->window, o->kernel, o->pool, o->reduce, o->per_query, &s));
    KVT_FORWARD(kvt_sel_init(sel, c, o->per_query, o->window, n_b, true));
    const int T = c->T, W = o->window < T ? o->window : T, P = T - W, C = o->chunk;
    const int H = kvt_ctx_heads(c, o->per_query), n_chunks = (P + C - 1) / C;
    const size_t nc = (size_t)(n_chunks > 0 ? n_chunks : 1), Pn = (size_t)(P > 0 ? P : 1);
    double *tok = kvt_calloc(Pn, sizeof(double)), *cs = kvt_calloc(nc, sizeof(double));
    int32_t *cord = kvt_calloc(nc, sizeof(int32_t)), *work = kvt_calloc(nc, sizeof(int32_t));
    kvt_status st = KVT_OK;
    if (!tok || !cs || !cord || !work) {
        st = kvt_error_set(KVT_ERR_NOMEM, "chunkkv: out of memory");
        goto cleanup;
    }
    for (int h = 0; h < H; h++) /* the heads' sum, head by head */
        for (int j = 0; j < P; j++)
            tok[j] += s[(size_t)h * P + j];
    for (int i = 0; i < n_chunks; i++) {
        int j0 = i * C, j1 = j0 + C < P ? j0 + C : P;
        double sum = 0;
        for (int j = j0; j < j1; j++)
            sum += tok[j];
        cs[i] = sum / (j1 - j0);
    }
    kvt_chunk_order(cs, n_chunks, C, P, W, T, sel->order, work, cord);
    for (int h = 1; h < sel->n_heads; h++)
        memcpy(sel->order + (size_t)h * T, sel->order, (size_t)T * sizeof(int32_t));
    for (int b = 0; b < n_b; b++) {
        int keep = B[b] >= T   ? T
                   : B[b] <= W ? B[b]
                               : W + kvt_chunk_count(cord, (B[b] - W) / C, n_chunks, C, P);
        for (int h = 0; h < sel->n_heads; h++)
            sel->count[(size_t)b * sel->n_heads + h] = keep;
    }
cleanup:
    kvt_free(tok);
    kvt_free(cs);
    kvt_free(cord);
    kvt_free(work);
    return st;
}

static void d_chunkkv(kvt_policy_opts *o)
{
    o->chunk = 10;
}

const kvt_policy_def kvt_policy_def_chunkkv = {
    .name = "chunkkv",
    .summary = "ChunkKV: whole chunks of the prefix by their SnapKV score, one set per layer",
    .flags = KVT_POLICY_WINDOW_QUERY,
    .keys = "window,kernel,pool,reduce,heads,chunk",
    .defaults = d_chunkkv,
    .select = sel_chunkkv,
};
