/* policy_finch.c - `finch`: kvpress's FinchPress (FINCH, TACL 2024; kvpress/presses/
 * finch_press.py @0603dec). SnapKV's window attention with the question as the window: FINCH
 * puts a delimiter between the context and the question and takes the question's tokens as the
 * window, so `window` is the question's length (the trace must hold that many window queries).
 * score_j = mean over the window queries i = 0..W-1 of c_i * P[i, j] over the prefix
 * j < T - W, with c_i = T - W + i (kvpress's normalize_scores, the keys the query sees less one)
 * or 1 (normalize=0); GQA mean (heads=kv); no pooling. The window first, then the prefix by score,
 * ties to the lower index. kvpress's chunk_length (a top-k per chunk) is the generic
 * chunk_length= (chunk_length.c); its key re-rotation, which moves the kept keys' positions,
 * not the set, is not replayed. */
#include "../replay_internal.h"

static kvt_status sel_finch(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                            kvt_layer_selection *sel)
{
    const kvt_policy_opts *o = &p->o;
    const int T = c->T, W = o->window, P = T - W;
    KVT_FORWARD(kvt_ctx_check_window(c, "finch", W));
    KVT_FORWARD(kvt_ctx_fetch(c, KVT_CTX_PRW));
    KVT_FORWARD(kvt_sel_init(sel, c, o->per_query, W, n_b, true));
    const int H = sel->n_heads, per = o->per_query ? 1 : c->Gs; /* query heads per head */
    double *s = kvt_calloc((size_t)H * (P > 0 ? P : 1), sizeof(double));
    KVT_RETURN_IF(!s, KVT_ERR_NOMEM, "finch: out of memory");
    for (int h = 0; h < H; h++) {
        double *sh = s + (size_t)h * P;
        for (int u = 0; u < per; u++) {
            int hq = o->per_query ? h : h * c->Gs + u;
            for (int i = 0; i < W; i++) { /* window query i: the trace's row Wt - W + i */
                const float *row = c->prw + ((size_t)hq * c->Wt + (c->Wt - W + i)) * T;
                double ci = o->normalize ? (double)(T - W + i) : 1.0;
                for (int j = 0; j < P; j++)
                    sh[j] += ci * row[j];
            }
        }
        for (int j = 0; j < P; j++)
            sh[j] /= (double)W * per;
    }
    kvt_status st = kvt_sel_rank_window_all(sel, s, W);
    kvt_free(s);
    KVT_FORWARD(st);
    kvt_counts_uniform(sel, B, n_b);
    return KVT_OK;
}

static void d_finch(kvt_policy_opts *o)
{
    o->normalize = true; /* kvpress's normalize_scores */
}

const kvt_policy_def kvt_policy_def_finch = {
    .name = "finch",
    .summary =
        "FINCH (kvpress FinchPress): window attention of the question (window = its length), "
        "each query's weighted by the keys it sees",
    .flags = KVT_POLICY_WINDOW_QUERY,
    .host_reads = KVT_CTX_PRW,
    .keys = "window,heads,normalize",
    .defaults = d_finch,
    .select = sel_finch,
};
