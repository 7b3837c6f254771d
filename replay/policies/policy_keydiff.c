/* policy_keydiff.c - `keydiff` (POLICIES §8): score[j] = -cos(k_j, m) with m the mean unit key
 * over all T tokens, per KV head: the keys least like the average are kept. No window by
 * default (kvpress). */
#include <math.h>

#include "../replay_internal.h"

static void d_keydiff(kvt_policy_opts *o)
{
    o->alloc = 'b'; /* adaptive=1: kvpress's AdaKVPress over the press */
    o->window = 0;
}

static kvt_status sel_keydiff(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                              kvt_layer_selection *sel)
{
    KVT_FORWARD(kvt_ctx_fetch(c, KVT_CTX_KU));
    const int T = c->T, D = c->D;
    double *cosm = kvt_malloc((size_t)c->Hkv * T * sizeof(double));
    KVT_RETURN_IF(!cosm, KVT_ERR_NOMEM, "keydiff: out of memory");
    for (int g = 0; g < c->Hkv; g++) {
        const double *m = c->kmean + (size_t)g * D, nm = kvt_ctx_mean_key_norm(c, g);
        for (int j = 0; j < T; j++) {
            const float *k = c->ku + ((size_t)g * T + j) * D;
            double d = 0.0;
            for (int e = 0; e < D; e++)
                d += (double)k[e] * m[e];
            cosm[(size_t)g * T + j] = nm > 0.0 ? d / nm : 0.0;
        }
    }
    kvt_status st = kvt_rank_by_kv_array(c, p, cosm, -1.0, B, n_b, sel);
    kvt_free(cosm);
    return st;
}

/* chunk_scores=own|kvpress: kvpress's ChunkPress(KeyDiffPress): each chunk's keys scored
 * against the chunk's own mean unit key */
static kvt_status chunk_keydiff(kvt_layer_ctx *c, const kvt_policy *p, int C, const int *B, int n_b,
                                kvt_layer_selection *sel)
{
    KVT_FORWARD(kvt_ctx_fetch(c, KVT_CTX_KU));
    const int T = c->T, D = c->D;
    double *cosm = kvt_malloc((size_t)c->Hkv * T * sizeof(double));
    double *m = kvt_malloc((size_t)D * sizeof(double));
    kvt_status st = KVT_OK;
    if (!cosm || !m) {
        st = kvt_error_set(KVT_ERR_NOMEM, "keydiff: out of memory");
        goto out;
    }
    for (int g = 0; g < c->Hkv; g++)
        for (int a = 0; a < T; a += C) {
            const int n = T - a < C ? T - a : C;
            const float *ku = c->ku + ((size_t)g * T + a) * D;
            for (int e = 0; e < D; e++)
                m[e] = 0.0;
            for (int j = 0; j < n; j++)
                for (int e = 0; e < D; e++)
                    m[e] += ku[(size_t)j * D + e];
            double nm = 0.0;
            for (int e = 0; e < D; e++) {
                m[e] /= n;
                nm += m[e] * m[e];
            }
            nm = sqrt(nm) > KVT_MEAN_KEY_EPS ? sqrt(nm) : 0.0;
            for (int j = 0; j < n; j++) {
                double d = 0.0;
                for (int e = 0; e < D; e++)
                    d += (double)ku[(size_t)j * D + e] * m[e];
                cosm[(size_t)g * T + a + j] = nm > 0.0 ? d / nm : 0.0;
            }
        }
    st = kvt_chunk_rank_kv_array(c, p, cosm, -1.0, C, n_b, sel);
out:
    kvt_free(cosm);
    kvt_free(m);
    return st;
}

/* decoding=: -cos(k, m) with m the mean unit key of the cache's entries, as the prompt's
 * scores (kvt_unit_rows_ref: the mean of the unit keys in double, each cosine from the unit key
 * rounded to f32) */
static kvt_status cache_keydiff(kvt_layer_ctx *c, const kvt_policy *p, int h, int step,
                                const int32_t *ent, const float *const *k, int n, double *out,
                                double *work)
{
    (void)ent, (void)p, (void)h, (void)step;
    const int D = c->D;
    double *m = work, *u = work + D;
    for (int e = 0; e < D; e++)
        m[e] = 0.0;
    for (int i = 0; i < n; i++) {
        double s = 0.0;
        for (int e = 0; e < D; e++)
            s += (double)k[i][e] * (double)k[i][e];
        const double inv = 1.0 / (sqrt(s) > 1e-12 ? sqrt(s) : 1e-12);
        for (int e = 0; e < D; e++)
            m[e] += (double)k[i][e] * inv;
    }
    double nm = 0.0;
    for (int e = 0; e < D; e++) {
        m[e] /= n;
        nm += m[e] * m[e];
    }
    nm = sqrt(nm) > KVT_MEAN_KEY_EPS ? sqrt(nm) : 0.0;
    for (int i = 0; i < n; i++) {
        double s = 0.0, d = 0.0;
        for (int e = 0; e < D; e++)
            s += (double)k[i][e] * (double)k[i][e];
        const double inv = 1.0 / (sqrt(s) > 1e-12 ? sqrt(s) : 1e-12);
        for (int e = 0; e < D; e++) {
            u[e] = (float)((double)k[i][e] * inv);
            d += u[e] * m[e];
        }
        out[i] = nm > 0.0 ? -d / nm : 0.0;
    }
    return KVT_OK;
}

const kvt_policy_def kvt_policy_def_keydiff = {
    .name = "keydiff",
    .host_reads = KVT_CTX_KU,
    .summary = "KeyDiff: keys least similar to the mean key",
    .keys = "window,heads,adaptive,alpha,normalize,alloc,skip,critical,first,ceps,dms,dms_window,"
            "decoding,prefill",
    .defaults = d_keydiff,
    .select = sel_keydiff,
    .chunk_rank = chunk_keydiff,
    .cache_scores = cache_keydiff,
    .cache_scores_kv = true,
};
