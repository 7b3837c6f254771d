/* ctx_gpu_stub.c - replay --device cuda in a build without CUDA: refused with one message. */
#include <stdio.h>

#include "ctx_gpu.h"

int kvt_ctx_gpu_devices(char *why, size_t cap)
{
    if (why && cap)
        snprintf(why, cap, "this kvtrace was built without CUDA");
    return 0;
}

kvt_status kvt_ctx_gpu_begin(const kvt_layer_input *in, int Gd, int rows, kvt_ctx_gpu **out)
{
    (void)in, (void)Gd, (void)rows;
    *out = NULL;
    return kvt_error_set(KVT_ERR_NO_CUDA, "replay: this kvtrace was built without CUDA");
}

kvt_status kvt_ctx_gpu_attn(kvt_ctx_gpu *g, bool decode, int group, int n_q, const int *n_vis,
                            const int *n_vis2, double scale, float *pr, float *pr2, double *lse,
                            double *out)
{
    (void)g, (void)decode, (void)group, (void)n_q, (void)n_vis, (void)n_vis2, (void)scale;
    (void)pr, (void)pr2, (void)lse, (void)out;
    return kvt_error_set(KVT_ERR_NO_CUDA, "replay: this kvtrace was built without CUDA");
}

kvt_status kvt_ctx_gpu_norms(kvt_ctx_gpu *g, int group, double *knorm, double *vnorm, float *ku,
                             double *kmean)
{
    (void)g, (void)group, (void)knorm, (void)vnorm, (void)ku, (void)kmean;
    return kvt_error_set(KVT_ERR_NO_CUDA, "replay: this kvtrace was built without CUDA");
}

void kvt_ctx_gpu_end(kvt_ctx_gpu *g)
{
    (void)g;
}
