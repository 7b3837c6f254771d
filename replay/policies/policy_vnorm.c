/* policy_vnorm.c - `vnorm`: keep the values with the largest L2 norm, per KV head (the
 * intrinsic-importance term of MixKV §4.1.2 used alone). No window by default. */
#include "../replay_internal.h"

static void d_vnorm(kvt_policy_opts *o)
{
    o->window = 0;
}

static kvt_status sel_vnorm(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                            kvt_layer_selection *sel)
{
    return kvt_rank_by_kv_array(c, p, c->vnorm, 1.0, B, n_b, sel);
}

/* chunk_scores=own|kvpress: as knorm's (the norm is the token's own) */
static kvt_status chunk_vnorm(kvt_layer_ctx *c, const kvt_policy *p, int C, const int *B, int n_b,
                              kvt_layer_selection *sel)
{
    return kvt_chunk_rank_kv_array(c, p, c->vnorm, 1.0, C, n_b, sel);
}

const kvt_policy_def kvt_policy_def_vnorm = {
    .name = "vnorm",
    .summary = "VNorm: largest value L2 norms",
    .keys = "window,heads",
    .defaults = d_vnorm,
    .select = sel_vnorm,
    .chunk_rank = chunk_vnorm,
};
