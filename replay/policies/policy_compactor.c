/* policy_compactor.c - `compactor`: kvpress's CompactorPress (kvpress/presses/compactor_press.py;
 * Compactor, Chari & Van Durme 2025, arXiv 2507.08143). The first `sinks` tokens
 * (sink_size_start, 8) and the last `recent` (sink_size_end, 4) are protected; the tokens between
 * them, taken as a prompt of their own, score
 *   blend * z(leverage) + z(noncausal attention)
 * z() z-normalising over every head and token of that middle part: leverage as `leverage`
 * (pre-RoPE keys of the middle part, the Gaussian sketch of `sketch` columns), the attention as
 * `noncausal-attention` (its chunks from the first middle token). blend defaults to the
 * budget's compression ratio 1 - B/T (kvpress's blending=None), so each budget has its own
 * ranking (KVT_POLICY_PER_BUDGET); blend=X fixes it. Each head keeps the protected tokens
 * first (kvpress pads them with the largest score + 1: on a budget below their number, the
 * earlier ones, where torch.topk leaves the choice open), then the B highest scores, ties to
 * the earlier token. heads=query scores each query head's attention with its KV head's
 * leverage. */
#include <math.h>
#include <string.h>

#include "../replay_internal.h"

static void d_cpt(kvt_policy_opts *o)
{
    o->sinks = 8;
    o->recent = 4;
    o->chunk = 256;
    o->sketch = 48;
    o->blend = NAN;
}

/* each chunk [a, a + n) of C tokens from token 0 (C >= T: the whole prompt) ranked as compactor
 * ranks a prompt of those n tokens alone: their first `sinks` and last `recent` protected, the
 * rest by blend * z(leverage) + z(nca) over that middle; each budget's ranking into its row of
 * sel->border. r: each middle's queries turned to the positions of tokens T - n + sinks ..., as
 * kvpress's CompactorPress under ChunkPress slices the whole prompt's position embeddings */
static kvt_status cpt_rank(kvt_layer_ctx *c, const kvt_policy *p, int C, const int *B, int n_b,
                           const kvt_rope_pairs *r, kvt_layer_selection *sel)
{
    const kvt_policy_opts *o = &p->o;
    const int T = c->T, Hkv = c->Hkv, H = kvt_ctx_heads(c, o->per_query);
    const int Cn = C < T ? C : T, nc = (T + Cn - 1) / Cn;
    kvt_nca_range *rg = kvt_malloc((size_t)nc * sizeof(kvt_nca_range));
    size_t n_mid = 0; /* every chunk's middle tokens */
    for (int i = 0; rg && i < nc; i++) {
        const int a = i * Cn, n = T - a < Cn ? T - a : Cn;
        const int left = o->sinks < n ? o->sinks : n;
        const int right = o->recent < n - left ? o->recent : n - left;
        rg[i] = (kvt_nca_range){a + left, a + n - right, T - n + left, NULL};
        n_mid += (size_t)(n - left - right);
    }
    double *l = kvt_malloc(((size_t)Hkv * n_mid + 1) * sizeof(double));
    double *at = kvt_malloc(((size_t)H * n_mid + 1) * sizeof(double));
    double *s = kvt_malloc(((size_t)Cn + 1) * sizeof(double));
    int32_t *work = kvt_malloc(((size_t)Cn + 1) * sizeof(int32_t));
    kvt_status st = KVT_OK;
    if (!rg || !l || !at || !s || !work) {
        st = kvt_error_set(KVT_ERR_NOMEM, "compactor: out of memory");
        goto out;
    }
    size_t off = 0;
    for (int i = 0; i < nc && !st; off += (size_t)(rg[i].s1 - rg[i].s0), i++) {
        rg[i].out = at + (size_t)H * off;
        if (rg[i].s1 > rg[i].s0)
            st = kvt_leverage_scores(c, "compactor", o->sketch, o->seed, rg[i].s0, rg[i].s1,
                                     l + (size_t)Hkv * off);
    }
    if (!st && n_mid > 0)
        st = kvt_nca_scores(c, "compactor", o->per_query, o->chunk, rg, nc, r);
    off = 0;
    for (int i = 0; i < nc && !st; off += (size_t)(rg[i].s1 - rg[i].s0), i++) {
        const int a = i * Cn, n = T - a < Cn ? T - a : Cn, m = rg[i].s1 - rg[i].s0;
        const int left = rg[i].s0 - a;
        double *li = l + (size_t)Hkv * off, *ai = at + (size_t)H * off;
        if (m > 0) {
            kvt_znorm(li, (size_t)Hkv * m);
            kvt_znorm(ai, (size_t)H * m);
        }
        for (int b = 0; b < n_b && !st; b++) {
            const double f = c->budget_frac ? c->budget_frac[b] : (double)B[b] / T;
            const double blend = isnan(o->blend) ? 1.0 - f : o->blend;
            for (int h = 0; h < H && !st; h++) {
                const double *lh = li + (size_t)kvt_ctx_kv_of(c, o->per_query, h) * m,
                             *ah = ai + (size_t)h * m;
                int32_t *ord = sel->border + ((size_t)b * H + h) * T + a;
                for (int j = 0; j < n; j++)
                    s[j] =
                        j < left || j >= left + m ? INFINITY : blend * lh[j - left] + ah[j - left];
                st = kvt_rank_desc(s, n, ord, work);
                for (int j = 0; j < n && a > 0; j++)
                    ord[j] += a;
            }
        }
    }
out:
    kvt_free(rg);
    kvt_free(l);
    kvt_free(at);
    kvt_free(s);
    kvt_free(work);
    return st;
}

static kvt_status sel_cpt(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                          kvt_layer_selection *sel)
{
    KVT_FORWARD(kvt_ctx_check_q_all(c, "compactor"));
    KVT_FORWARD(kvt_sel_init(sel, c, p->o.per_query, 0, n_b, true));
    KVT_FORWARD(kvt_sel_init_per_budget(sel));
    kvt_counts_uniform(sel, B, n_b);
    return cpt_rank(c, p, c->T, B, n_b, NULL, sel);
}

/* chunk_scores=own|kvpress: kvpress's ChunkPress(CompactorPress): each chunk its own sinks,
 * recent tokens, leverage (centred on the chunk's middle; the sketch drawn from the same seed
 * in every chunk) and non-causal attention (its tiles from the chunk's first middle token),
 * z-normalised over the chunk's middle; blend the budget's ratio, the same in every chunk.
 * kvpress: the middle's queries turned by T - (a + n) positions (cpt_rank) */
static kvt_status chunk_cpt(kvt_layer_ctx *c, const kvt_policy *p, int C, const int *B, int n_b,
                            kvt_layer_selection *sel)
{
    KVT_FORWARD(kvt_ctx_check_q_all(c, "compactor"));
    KVT_FORWARD(kvt_sel_init(sel, c, p->o.per_query, 0, n_b, true));
    KVT_FORWARD(kvt_sel_init_per_budget(sel));
    kvt_rope_pairs r;
    memset(&r, 0, sizeof(r));
    const bool turn = p->o.chunk_scores == KVT_CHUNK_KVPRESS && C < c->T;
    if (turn)
        KVT_FORWARD(kvt_rope_pairs_init(c, "compactor", &r));
    kvt_status st = cpt_rank(c, p, C, B, n_b, turn ? &r : NULL, sel);
    kvt_rope_pairs_free(&r);
    return st;
}

const kvt_policy_def kvt_policy_def_compactor = {
    .name = "compactor",
    .host_reads = KVT_CTX_KV,
    .summary = "kvpress CompactorPress: leverage of the pre-RoPE keys blended with non-causal "
               "chunked attention (blend = the compression ratio), sinks and recent protected",
    .keys = "heads,sinks,recent,chunk,sketch,seed,blend",
    .flags = KVT_POLICY_NEEDS_QALL | KVT_POLICY_NEEDS_ROPE | KVT_POLICY_PER_BUDGET,
    .defaults = d_cpt,
    .select = sel_cpt,
    .chunk_rank = chunk_cpt,
    .chunk_min = 'p', /* CompactorPress fails on a chunk with nothing between sinks and recent */
};
