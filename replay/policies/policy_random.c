/* policy_random.c - `random`: the window (default W=32) plus a seeded uniform random sample of
 * the prefix. The ranking is a Fisher-Yates shuffle of the prefix from kvt_rng seeded with
 * seed ^ (layer+1)*0x9E3779B97F4A7C15 ^ (head+1)*0xC2B2AE3D27D4EB4F, so every budget's set is
 * a prefix of the same shuffle (nested sets) and runs are reproducible. */
#include "../replay_internal.h"

static void d_random(kvt_policy_opts *o)
{
    o->window = 32;
}

static kvt_status sel_random(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                             kvt_layer_selection *sel)
{
    int T = c->T, W = p->o.window < T ? p->o.window : T;
    KVT_FORWARD(kvt_sel_init(sel, c, p->o.per_query, W, n_b, true));
    for (int h = 0; h < sel->n_heads; h++) {
        int32_t *ord = sel->order + (size_t)h * T;
        for (int i = 0; i < W; i++)
            ord[i] = T - 1 - i;
        for (int j = 0; j < T - W; j++)
            ord[W + j] = j;
        kvt_rng r;
        kvt_rng_seed(&r, p->o.seed ^ ((uint64_t)(c->layer + 1) * 0x9E3779B97F4A7C15ull) ^
                             ((uint64_t)(h + 1) * 0xC2B2AE3D27D4EB4Full));
        for (int i = T - W - 1; i > 0; i--) {
            int j = (int)(kvt_rng_u64(&r) % (uint64_t)(i + 1));
            int32_t t = ord[W + i];
            ord[W + i] = ord[W + j];
            ord[W + j] = t;
        }
    }
    kvt_counts_uniform(sel, B, n_b);
    return KVT_OK;
}

const kvt_policy_def kvt_policy_def_random = {
    .name = "random",
    .summary = "window + seeded random prefix tokens (baseline)",
    .keys = "window,seed,heads",
    .defaults = d_random,
    .select = sel_random,
};
