/* rope.c - a layer's RoPE as the trace header records it (kvt_rope_info), checked and laid out
 * per rotation pair, for the policies that undo it (expected-attention's queries, leverage's and
 * compactor's keys): pair i turns dimensions lo[i] and hi[i] by position * freq[i], the position
 * from row[i] of the token's positions (the M-RoPE section that holds pair i), and HF scales cos
 * and sin by attention_scaling. */
#include <math.h>
#include <string.h>

#include "replay_internal.h"

int32_t kvt_rope_pos(const kvt_layer_input *in, int row, int t)
{
    if (!in->positions)
        return t;
    return in->positions[(size_t)(row < in->n_pos_rows ? row : 0) * in->T + t];
}

void kvt_rope_pairs_free(kvt_rope_pairs *r)
{
    kvt_free(r->lo);
    kvt_free(r->hi);
    kvt_free(r->row);
    kvt_free(r->freq);
    memset(r, 0, sizeof(*r));
}

kvt_status kvt_rope_pairs_init(const kvt_layer_ctx *c, const char *policy, kvt_rope_pairs *r)
{
    const kvt_layer_input *in = c->in;
    const kvt_rope_info *ri = in->rope;
    const int D = c->D, half = D / 2;
    memset(r, 0, sizeof(*r));
    KVT_RETURN_IF(!ri, KVT_ERR_NOT_FOUND, "%s: the trace's RoPE (model.rope) is not known", policy);
    if (ri->type == 0)
        return KVT_OK;
    KVT_RETURN_IF(ri->type != 1 && ri->type != 2, KVT_ERR_INVALID_ARG, "%s: unknown RoPE type %d",
                  policy, ri->type);
    KVT_RETURN_IF(ri->pairs != 1 && ri->pairs != 2, KVT_ERR_NOT_FOUND,
                  "%s: the trace does not say which dimensions RoPE pairs "
                  "(model.rope.pairs): capture it with this version of kvtrace",
                  policy);
    KVT_RETURN_IF(D % 2, KVT_ERR_INVALID_ARG, "%s: RoPE with an odd head_dim %d", policy, D);
    KVT_RETURN_IF(!ri->inv_freq && !(ri->theta > 0 && isfinite(ri->theta)), KVT_ERR_NOT_FOUND,
                  "%s: the trace's model.rope has neither inv_freq nor a theta", policy);
    const int *ms = ri->mrope_section;
    if (ri->type == 2)
        KVT_RETURN_IF(ms[0] < 0 || ms[1] < 0 || ms[2] < 0 || ms[0] + ms[1] + ms[2] != half ||
                          in->n_pos_rows != 3 || !in->positions,
                      KVT_ERR_NOT_FOUND,
                      "%s: an M-RoPE trace needs model.rope.mrope_section "
                      "(summing to head_dim/2 = %d) and 3 rows of positions",
                      policy, half);
    r->on = true;
    r->half = half;
    r->a = ri->attention_scaling > 0 ? ri->attention_scaling : 1.0;
    r->lo = kvt_malloc((size_t)half * sizeof(int));
    r->hi = kvt_malloc((size_t)half * sizeof(int));
    r->row = kvt_malloc((size_t)half * sizeof(int));
    r->freq = kvt_malloc((size_t)half * sizeof(double));
    if (!r->lo || !r->hi || !r->row || !r->freq) {
        kvt_rope_pairs_free(r);
        return kvt_error_set(KVT_ERR_NOMEM, "%s: out of memory", policy);
    }
    for (int i = 0; i < half; i++) {
        r->lo[i] = ri->pairs == 2 ? 2 * i : i;
        r->hi[i] = ri->pairs == 2 ? 2 * i + 1 : i + half;
        r->row[i] = ri->type == 2 ? (i < ms[0] ? 0 : i < ms[0] + ms[1] ? 1 : 2) : 0;
        r->freq[i] = ri->inv_freq ? ri->inv_freq[i] : pow(ri->theta, -2.0 * i / (double)D);
    }
    return KVT_OK;
}

kvt_status kvt_rope_angles(const kvt_rope_pairs *r, const kvt_layer_input *in, int t0, int t1,
                           const char *policy, double *cs)
{
    for (int t = t0; r->on && t < t1; t++)
        for (int i = 0; i < r->half; i++) {
            double ang = (double)kvt_rope_pos(in, r->row[i], t) * r->freq[i];
            double *x = cs + ((size_t)(t - t0) * r->half + i) * 2;
            x[0] = cos(ang);
            x[1] = sin(ang);
            KVT_RETURN_IF(!isfinite(x[0]) || !isfinite(x[1]) || !(r->a > 0 && isfinite(r->a)),
                          KVT_ERR_NAN,
                          "%s: the header's model.rope turns pair %d of token %d by an angle "
                          "that is not finite (frequency %g, attention_scaling %g)",
                          policy, i, t, r->freq[i], r->a);
        }
    return KVT_OK;
}

void kvt_rope_undo(const kvt_rope_pairs *r, const double *cs, const float *x, int D, double *y)
{
    for (int d = 0; d < D; d++)
        y[d] = x[d];
    for (int i = 0; r->on && i < r->half; i++) {
        double co = cs[2 * i], sn = cs[2 * i + 1], a = x[r->lo[i]], b = x[r->hi[i]];
        y[r->lo[i]] = (co * a + sn * b) / r->a;
        y[r->hi[i]] = (co * b - sn * a) / r->a;
    }
}
