/* policy_keydiff_block.c - `keydiff-block`: kvpress's BlockPress(KeyDiffPress()) (kvpress/presses/
 * block_press.py @0603dec, keydiff_press.py @08a43bf), the block-wise prompt processing of the
 * KeyDiff paper (arXiv 2504.15364). At a budget of N tokens each KV head starts from tokens
 * [0, N); each following block of `block` tokens (default 128, the first one at token N) joins
 * them, and the N candidates least like the candidates' own mean unit key stay: score
 * -cos(k_j, m), m the mean of the candidates' unit keys (keydiff's score on the candidates
 * alone; a mean of norm below KVT_MEAN_KEY_EPS scores them all 0). What stays after the last
 * block is kept. Scores are rounded to a multiple of 2^-30, so that scores equal but for
 * rounding (two candidates are always equally like their mean) tie, and ties go to the earlier
 * token (torch.topk leaves them unspecified; kvpress scores in the model's dtype). B >= T keeps
 * every token; heads=query gives each query head its KV head's sets; no window.
 * The sets are not nested across budgets, so the selection has a ranking per budget
 * (KVT_POLICY_PER_BUDGET): the kept set ascending, then the other tokens ascending. Each budget
 * costs about (T - N) / block * (N + block) * D multiply-adds per KV head. */
#include <math.h>
#include <string.h>

#include "../replay_internal.h"

static void d_kdb(kvt_policy_opts *o)
{
    o->window = 0;
    o->block = 128;
}

typedef struct kdb_work {
    int32_t *kept, *cand, *ord, *wk;
    double *sc, *m;
} kdb_work;

/* kept[0..N) ascending: the set BlockPress(KeyDiffPress) keeps at budget N < T from the keys
 * k [T, D] and their norms kn [T] of one KV head. The unit keys k / max(|k|, 1e-12) are
 * formed in double (the context's f32 ones would leave two candidates' scores 1e-8 apart). */
static kvt_status block_keep(const float *k, const double *kn, int T, int D, int N, int bs,
                             kdb_work *w)
{
    for (int j = 0; j < N; j++)
        w->kept[j] = j;
    for (int i = N; i < T; i += bs) {
        const int e = T - i < bs ? T : i + bs, n = N + (e - i);
        memcpy(w->cand, w->kept, (size_t)N * sizeof(int32_t)); /* ascending: kept < i */
        for (int j = i; j < e; j++)
            w->cand[N + (j - i)] = j;
        for (int d = 0; d < D; d++)
            w->m[d] = 0.0;
        for (int t = 0; t < n; t++) {
            const float *kt = k + (size_t)w->cand[t] * D;
            const double u = 1.0 / fmax(kn[w->cand[t]], 1e-12);
            for (int d = 0; d < D; d++)
                w->m[d] += kt[d] * u;
        }
        double nm = 0.0;
        for (int d = 0; d < D; d++) {
            w->m[d] /= n;
            nm += w->m[d] * w->m[d];
        }
        nm = sqrt(nm);
        for (int t = 0; t < n; t++) {
            const float *kt = k + (size_t)w->cand[t] * D;
            double x = 0.0;
            for (int d = 0; d < D && nm > KVT_MEAN_KEY_EPS; d++)
                x += (double)kt[d] * w->m[d];
            x /= fmax(kn[w->cand[t]], 1e-12);
            /* to a multiple of 2^-30: scores that differ only by rounding tie (two candidates
               are always equally like their mean), and ties go to the earlier token */
            w->sc[t] = nm > KVT_MEAN_KEY_EPS ? nearbyint(-x / nm * 0x1p30) * 0x1p-30 : 0.0;
        }
        KVT_FORWARD(kvt_rank_desc(w->sc, n, w->ord, w->wk)); /* ties: the earlier position */
        /* the first N positions, back in ascending order (positions ascend with tokens) */
        memset(w->wk, 0, (size_t)n * sizeof(int32_t));
        for (int t = 0; t < N; t++)
            w->wk[w->ord[t]] = 1;
        for (int t = 0, q = 0; t < n; t++)
            if (w->wk[t])
                w->kept[q++] = w->cand[t];
    }
    return KVT_OK;
}

static kvt_status sel_kdb(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                          kvt_layer_selection *sel)
{
    KVT_FORWARD(kvt_ctx_fetch(c, KVT_CTX_KV));
    const int T = c->T, D = c->D, bs = p->o.block, H = kvt_ctx_heads(c, p->o.per_query);
    KVT_FORWARD(kvt_sel_init(sel, c, p->o.per_query, 0, n_b, true));
    KVT_FORWARD(kvt_sel_init_per_budget(sel));
    kvt_counts_uniform(sel, B, n_b);
    const size_t nc = (size_t)T + (size_t)bs + 1;
    kdb_work w = {.kept = kvt_malloc(((size_t)T + 1) * sizeof(int32_t)),
                  .cand = kvt_malloc(nc * sizeof(int32_t)),
                  .ord = kvt_malloc(nc * sizeof(int32_t)),
                  .wk = kvt_malloc(nc * sizeof(int32_t)),
                  .sc = kvt_malloc(nc * sizeof(double)),
                  .m = kvt_malloc(((size_t)D + 1) * sizeof(double))};
    uint8_t *in = kvt_malloc((size_t)T + 1);
    kvt_status st = KVT_OK;
    if (!w.kept || !w.cand || !w.ord || !w.wk || !w.sc || !w.m || !in)
        st = kvt_error_set(KVT_ERR_NOMEM, "keydiff-block: out of memory");
    for (int b = 0; b < n_b && !st; b++) {
        const int N = B[b] < T ? B[b] : T;
        for (int g = 0; g < c->Hkv && !st; g++) {
            if (N < T)
                st =
                    block_keep(c->k + (size_t)g * T * D, c->knorm + (size_t)g * T, T, D, N, bs, &w);
            else
                for (int j = 0; j < T; j++)
                    w.kept[j] = j;
            memset(in, 0, (size_t)T);
            for (int t = 0; t < N; t++)
                in[w.kept[t]] = 1;
            for (int h = 0; h < H && !st; h++) {
                if (kvt_ctx_kv_of(c, p->o.per_query, h) != g)
                    continue;
                int32_t *r = sel->border + ((size_t)b * H + h) * T;
                memcpy(r, w.kept, (size_t)N * sizeof(int32_t));
                for (int j = 0, k = N; j < T; j++)
                    if (!in[j])
                        r[k++] = j;
            }
        }
    }
    kvt_free(w.kept);
    kvt_free(w.cand);
    kvt_free(w.ord);
    kvt_free(w.wk);
    kvt_free(w.sc);
    kvt_free(w.m);
    kvt_free(in);
    return st;
}

const kvt_policy_def kvt_policy_def_keydiff_block = {
    .name = "keydiff-block",
    .host_reads = KVT_CTX_KV,
    .flags = KVT_POLICY_PER_BUDGET,
    .summary = "kvpress BlockPress(KeyDiffPress): KeyDiff re-applied block by block over the "
               "prompt (a set per budget)",
    .keys = "heads,block",
    .defaults = d_kdb,
    .select = sel_kdb,
};
