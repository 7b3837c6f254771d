/* policy_cur.c - `cur`: kvpress's CURPress (kvpress/presses/cur_press.py @a0b8d34; CurDKV, arXiv
 * 2509.15038), from K and V alone. Each token's leverage is approximated by its squared key
 * and value norms, k2_j = ||k_j||^2 and v2_j = ||v_j||^2; with local=w (default 16; 0: off)
 * each is divided by its sum over the token's block of w tokens (blocks from token 0, the last
 * one short: kvpress pads it with zeros, which do not change the sum). The score is k2
 * (leverage=key), v2 (value), (k2 + v2) / 2 (kv_avg) or k2 v2 (kv_product, the default),
 * divided by its sum over the prompt; the first `sinks` tokens (default 4) score 1. Each KV
 * head keeps its highest scores (heads=query gives each query head its KV head's set), ties to
 * the earlier token; kvpress computes in the model's dtype, kvtrace in double. A block whose
 * norms are all zero divides 0 by 0 in both: its tokens, and after the normalisation every
 * token of the head but the sinks, score NaN, which ranks above every number (torch.topk's
 * order): the head keeps its earliest tokens after the sinks, then the sinks. kvpress's
 * use_random_leverage (a torch.randn projection) is not replayed: no draw of it could be
 * reproduced. An older CURPress (@cef9208) took the blocks' last T entries instead of their first
 * when T is not a multiple of w, shifting the scores by the padding; kvtrace follows the fixed one.
 */
#include <math.h>

#include "../replay_internal.h"

static void d_cur(kvt_policy_opts *o)
{
    o->alloc = 'b'; /* adaptive=1: kvpress's AdaKVPress over the press */
    o->window = 0;
    o->sinks = 4;
    o->leverage = KVT_LEVERAGE_KV_PRODUCT;
    o->local = 16;
}

/* x [T] divided by its sum over each block of w tokens (w > 0) */
static void local_norm(double *x, int T, int w)
{
    for (int b0 = 0; b0 < T; b0 += w) {
        const int b1 = T - b0 > w ? b0 + w : T;
        double s = 0.0;
        for (int j = b0; j < b1; j++)
            s += x[j];
        for (int j = b0; j < b1; j++)
            x[j] /= s;
    }
}

/* s [n]: CURPress's scores of the tokens [a0, a0 + n) of KV head g scored as a prompt of
 * their own (the whole prompt, or a chunk of it); k2, v2 [n] scratch */
static void cur_scores(const kvt_layer_ctx *c, const kvt_policy_opts *o, int g, int a0, int n,
                       double *k2, double *v2, double *s)
{
    const int D = c->D;
    const float *K = c->k + ((size_t)g * c->T + a0) * D, *V = c->v + ((size_t)g * c->T + a0) * D;
    double sum = 0.0;
    for (int j = 0; j < n; j++) {
        double a = 0.0, b = 0.0;
        for (int e = 0; e < D; e++) {
            a += (double)K[(size_t)j * D + e] * K[(size_t)j * D + e];
            b += (double)V[(size_t)j * D + e] * V[(size_t)j * D + e];
        }
        k2[j] = a, v2[j] = b;
    }
    if (o->local > 0) {
        local_norm(k2, n, o->local);
        local_norm(v2, n, o->local);
    }
    for (int j = 0; j < n; j++) {
        switch (o->leverage) {
        case KVT_LEVERAGE_KEY:
            s[j] = k2[j];
            break;
        case KVT_LEVERAGE_VALUE:
            s[j] = v2[j];
            break;
        case KVT_LEVERAGE_KV_AVG:
            s[j] = (k2[j] + v2[j]) / 2;
            break;
        default:
            s[j] = k2[j] * v2[j];
            break;
        }
        sum += s[j];
    }
    for (int j = 0; j < n; j++) { /* NaN first, as torch.topk */
        s[j] = j < o->sinks ? 1.0 : s[j] / sum;
        s[j] = isnan(s[j]) ? INFINITY : s[j];
    }
}

/* x [Hkv, T]: every KV head's scores, each chunk of C tokens (C >= T: the prompt) scored on
 * its own */
static kvt_status cur_chunks(kvt_layer_ctx *c, const kvt_policy_opts *o, int C, double *x)
{
    const int T = c->T, Cn = C < T ? C : T;
    KVT_FORWARD(kvt_ctx_fetch(c, KVT_CTX_KV));
    double *k2 = kvt_malloc((2 * (size_t)Cn + 1) * sizeof(double));
    KVT_RETURN_IF(!k2, KVT_ERR_NOMEM, "cur: out of memory");
    for (int g = 0; g < c->Hkv; g++) /* per KV head; heads=query takes its KV head's */
        for (int a = 0; a < T; a += C)
            cur_scores(c, o, g, a, T - a < C ? T - a : C, k2, k2 + Cn, x + (size_t)g * T + a);
    kvt_free(k2);
    return KVT_OK;
}

static kvt_status sel_cur(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                          kvt_layer_selection *sel)
{
    double *x = kvt_malloc(((size_t)c->Hkv * c->T + 1) * sizeof(double));
    KVT_RETURN_IF(!x, KVT_ERR_NOMEM, "cur: out of memory");
    kvt_status st = cur_chunks(c, &p->o, c->T, x);
    if (!st)
        st = kvt_rank_by_kv_array(c, p, x, 1.0, B, n_b, sel); /* window 0 */
    kvt_free(x);
    return st;
}

/* chunk_scores=own|kvpress: kvpress's ChunkPress(CURPress): each chunk's own blocks, sum and
 * sinks */
static kvt_status chunk_cur(kvt_layer_ctx *c, const kvt_policy *p, int C, const int *B, int n_b,
                            kvt_layer_selection *sel)
{
    double *x = kvt_malloc(((size_t)c->Hkv * c->T + 1) * sizeof(double));
    KVT_RETURN_IF(!x, KVT_ERR_NOMEM, "cur: out of memory");
    kvt_status st = cur_chunks(c, &p->o, p->o.chunk_length, x);
    if (!st)
        st = kvt_chunk_rank_kv_array(c, p, x, 1.0, C, n_b, sel);
    kvt_free(x);
    return st;
}

const kvt_policy_def kvt_policy_def_cur = {
    .name = "cur",
    .host_reads = KVT_CTX_KV,
    .summary = "kvpress CURPress (CurDKV): leverage from squared key and value norms, "
               "normalised in local blocks",
    .keys = "heads,sinks,leverage,local,adaptive,alpha,normalize,alloc,skip,critical,first,ceps,"
            "dms,dms_window",
    .defaults = d_cur,
    .select = sel_cur,
    .chunk_rank = chunk_cur,
};
