/* ctx_gpu_stub.c - replay --device cuda in a build without CUDA: refused with one message. */
#include <stdio.h>

#include "ctx_gpu.h"

int kvt_ctx_gpu_devices(char *why, size_t cap)
{
    if (why && cap)
        snprintf(why, cap, "this kvtrace was built without CUDA");
    return 0;
}

uint64_t kvt_ctx_gpu_worker_bytes(int T, int D, int Hq, int Hkv, int Wt, int Gd, bool extra,
                                  int n_probe, int n_cut)
{
    (void)T, (void)D, (void)Hq, (void)Hkv, (void)Wt, (void)Gd, (void)extra, (void)n_probe;
    (void)n_cut;
    return 0;
}

kvt_status kvt_ctx_gpu_release(void)
{
    return KVT_OK;
}

void kvt_ctx_gpu_thread_end(void)
{
}

int kvt_ctx_gpu_mem(int dev, uint64_t *free_bytes, uint64_t *total_bytes)
{
    (void)dev, (void)free_bytes, (void)total_bytes;
    return -1;
}

kvt_status kvt_ctx_gpu_begin(const kvt_layer_input *in, int Gd, int rows, kvt_replay_profile *prof,
                             kvt_ctx_gpu **out)
{
    (void)in, (void)Gd, (void)rows, (void)prof;
    *out = NULL;
    return kvt_error_set(KVT_ERR_NO_CUDA, "replay: this kvtrace was built without CUDA");
}

uint64_t kvt_ctx_gpu_read_ns(const kvt_ctx_gpu *g)
{
    (void)g;
    return 0;
}

kvt_status kvt_ctx_gpu_check_kv(kvt_ctx_gpu *g, size_t *bad_k, size_t *bad_v)
{
    (void)g, (void)bad_k, (void)bad_v;
    return kvt_error_set(KVT_ERR_NO_CUDA, "replay: this kvtrace was built without CUDA");
}

kvt_status kvt_ctx_gpu_attn(kvt_ctx_gpu *g, bool decode, int n_q, const int *n_vis,
                            const int *n_vis2, double scale, double *lse, double *out,
                            double *rowsum, double *mass, double *p_extra, double *o_extra)
{
    (void)g, (void)decode, (void)n_q, (void)n_vis, (void)n_vis2, (void)scale;
    (void)lse, (void)out, (void)rowsum, (void)mass, (void)p_extra, (void)o_extra;
    return kvt_error_set(KVT_ERR_NO_CUDA, "replay: this kvtrace was built without CUDA");
}

kvt_status kvt_ctx_gpu_norms(kvt_ctx_gpu *g, double *knorm, double *vnorm, double *kmean)
{
    (void)g, (void)knorm, (void)vnorm, (void)kmean;
    return kvt_error_set(KVT_ERR_NO_CUDA, "replay: this kvtrace was built without CUDA");
}

kvt_status kvt_ctx_gpu_fetch(kvt_ctx_gpu *g, kvt_gpu_array which, void *host)
{
    (void)g, (void)which, (void)host;
    return kvt_error_set(KVT_ERR_NO_CUDA, "replay: this kvtrace was built without CUDA");
}

kvt_status kvt_ctx_gpu_fetch_prd_rows(kvt_ctx_gpu *g, size_t r0, size_t n, float *host)
{
    (void)g, (void)r0, (void)n, (void)host;
    return kvt_error_set(KVT_ERR_NO_CUDA, "replay: this kvtrace was built without CUDA");
}

void kvt_ctx_gpu_map_prd(kvt_ctx_gpu *g, const float *host, size_t r0, size_t n)
{
    (void)g, (void)host, (void)r0, (void)n;
}

kvt_status kvt_ctx_gpu_finish(kvt_ctx_gpu *g, const struct kvt_layer_ctx *c)
{
    (void)g, (void)c;
    return kvt_error_set(KVT_ERR_NO_CUDA, "replay: this kvtrace was built without CUDA");
}

kvt_status kvt_ctx_gpu_sweep_output(kvt_ctx_gpu *g, int n_q, int T, int D, const float *p,
                                    size_t stride_p, int group, const double *a_full,
                                    size_t stride_a, const double *p_extra, size_t stride_e,
                                    const double *o_extra, const double *r_full,
                                    const int32_t *order, const int32_t *cuts, int n_cut,
                                    const uint8_t *mod, const double *mass_mod, size_t stride_m,
                                    double *recall, double *err, double *recall_mod)
{
    (void)g, (void)n_q, (void)T, (void)D, (void)p, (void)stride_p, (void)group, (void)a_full;
    (void)stride_a, (void)p_extra, (void)stride_e, (void)o_extra, (void)r_full, (void)order;
    (void)cuts, (void)n_cut, (void)mod, (void)mass_mod, (void)stride_m, (void)recall, (void)err;
    (void)recall_mod;
    return kvt_error_set(KVT_ERR_NO_CUDA, "replay: this kvtrace was built without CUDA");
}

kvt_status kvt_ctx_gpu_defer(kvt_ctx_gpu *g, bool on)
{
    (void)g, (void)on;
    return kvt_error_set(KVT_ERR_NO_CUDA, "replay: this kvtrace was built without CUDA");
}

kvt_status kvt_ctx_gpu_cosines(kvt_ctx_gpu *g, int group, const int32_t *probe, int n_probe)
{
    (void)g, (void)group, (void)probe, (void)n_probe;
    return kvt_error_set(KVT_ERR_NO_CUDA, "replay: this kvtrace was built without CUDA");
}

kvt_status kvt_ctx_gpu_set_sweep(kvt_ctx_gpu *g, int group, const int32_t *order,
                                 const int32_t *cuts, int n_cut, float *best, double *rk)
{
    (void)g, (void)group, (void)order, (void)cuts, (void)n_cut, (void)best, (void)rk;
    return kvt_error_set(KVT_ERR_NO_CUDA, "replay: this kvtrace was built without CUDA");
}

kvt_status kvt_ctx_gpu_window_scores(kvt_ctx_gpu *g, int W, int kernel, kvt_pool pool,
                                     kvt_reduce reduce, bool per_query, double *out)
{
    (void)g, (void)W, (void)kernel, (void)pool, (void)reduce, (void)per_query, (void)out;
    return kvt_error_set(KVT_ERR_NO_CUDA, "replay: this kvtrace was built without CUDA");
}

kvt_status kvt_ctx_gpu_decode_scores(kvt_ctx_gpu *g, bool per_query, int P, double *out)
{
    (void)g, (void)per_query, (void)P, (void)out;
    return kvt_error_set(KVT_ERR_NO_CUDA, "replay: this kvtrace was built without CUDA");
}

kvt_status kvt_ctx_gpu_rank(kvt_ctx_gpu *g, const double *score, int H, int P, int32_t *order)
{
    (void)g, (void)score, (void)H, (void)P, (void)order;
    return kvt_error_set(KVT_ERR_NO_CUDA, "replay: this kvtrace was built without CUDA");
}

kvt_status kvt_ctx_gpu_colsum_head(kvt_ctx_gpu *g, int h, const float *q, double scale, double *out)
{
    (void)g, (void)h, (void)q, (void)scale, (void)out;
    return kvt_error_set(KVT_ERR_NO_CUDA, "replay: this kvtrace was built without CUDA");
}

void kvt_ctx_gpu_end(kvt_ctx_gpu *g)
{
    (void)g;
}
