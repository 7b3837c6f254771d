/* ctx_gpu.c - the layer context's GPU backend (ctx_gpu.h): uploads a layer once, runs the
 * attention and norm kernels of kernels/cuda on its own non-blocking stream and copies their
 * results into the host context. Every copy is on that stream and waited for, so the host
 * arrays are complete when a call returns. Several replay workers may each hold one at once.
 */
#include <cuda_runtime_api.h>
#include <string.h>

#include "ctx_gpu.h"
#include "kvt_kernels_cuda.h"

struct kvt_ctx_gpu {
    cudaStream_t st;
    int T, D, Hq, Hkv, Wt, Gd, rows;
    bool extra;
    float *k, *v, *qw, *qd, *kd, *vd; /* device copies of the layer's inputs */
    float *pr, *pr2, *ku;             /* [rows, T], [rows, Gd], [T, D] */
    double *lse, *out, *norm, *mean;  /* [rows], [rows, D], [T], [D] */
    double *inv;                      /* [T] unit-row workspace */
};

#define GPU_OK(call)                                                                               \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess)                                                                     \
            return kvt_error_set(KVT_ERR_CUDA, "replay --device cuda: %s: %s", #call,              \
                                 cudaGetErrorString(e_));                                          \
    } while (0)

int kvt_ctx_gpu_devices(char *why, size_t cap)
{
    return kvt_cuda_devices(why, cap);
}

static kvt_status dalloc(void **p, size_t bytes)
{
    GPU_OK(cudaMalloc(p, bytes ? bytes : 1));
    return KVT_OK;
}

static kvt_status upload(kvt_ctx_gpu *g, float **dst, const float *src, size_t n)
{
    KVT_FORWARD(dalloc((void **)dst, n * sizeof(float)));
    GPU_OK(cudaMemcpyAsync(*dst, src, n * sizeof(float), cudaMemcpyHostToDevice, g->st));
    return KVT_OK;
}

static kvt_status download(kvt_ctx_gpu *g, void *dst, const void *src, size_t bytes)
{
    GPU_OK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, g->st));
    return KVT_OK;
}

void kvt_ctx_gpu_end(kvt_ctx_gpu *g)
{
    if (!g)
        return;
    if (g->st)
        cudaStreamSynchronize(g->st);
    void *bufs[] = {g->k,   g->v,  g->qw,  g->qd,  g->kd,   g->vd,   g->pr,
                    g->pr2, g->ku, g->lse, g->out, g->norm, g->mean, g->inv};
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++)
        if (bufs[i])
            cudaFree(bufs[i]);
    if (g->st)
        cudaStreamDestroy(g->st);
    kvt_free(g);
}

static kvt_status begin(const kvt_layer_input *in, kvt_ctx_gpu *g)
{
    const size_t T = (size_t)g->T, D = (size_t)g->D, kv = (size_t)g->Hkv * T * D;
    const size_t rows = (size_t)g->rows;
    GPU_OK(cudaSetDevice(0));
    GPU_OK(cudaStreamCreateWithFlags(&g->st, cudaStreamNonBlocking));
    KVT_FORWARD(upload(g, &g->k, in->k, kv));
    KVT_FORWARD(upload(g, &g->v, in->v, kv));
    KVT_FORWARD(upload(g, &g->qw, in->q_window, (size_t)g->Hq * g->Wt * D));
    if (g->Gd > 0)
        KVT_FORWARD(upload(g, &g->qd, in->q_decode, (size_t)g->Hq * g->Gd * D));
    if (g->extra) {
        KVT_FORWARD(upload(g, &g->kd, in->k_decode, (size_t)g->Hkv * g->Gd * D));
        KVT_FORWARD(upload(g, &g->vd, in->v_decode, (size_t)g->Hkv * g->Gd * D));
        KVT_FORWARD(dalloc((void **)&g->pr2, rows * (size_t)g->Gd * sizeof(float)));
    }
    KVT_FORWARD(dalloc((void **)&g->pr, rows * T * sizeof(float)));
    KVT_FORWARD(dalloc((void **)&g->lse, rows * sizeof(double)));
    KVT_FORWARD(dalloc((void **)&g->out, rows * D * sizeof(double)));
    KVT_FORWARD(dalloc((void **)&g->ku, T * D * sizeof(float)));
    KVT_FORWARD(dalloc((void **)&g->norm, T * sizeof(double)));
    KVT_FORWARD(dalloc((void **)&g->mean, D * sizeof(double)));
    KVT_FORWARD(dalloc((void **)&g->inv, T * sizeof(double)));
    return KVT_OK;
}

kvt_status kvt_ctx_gpu_begin(const kvt_layer_input *in, int Gd, int rows, kvt_ctx_gpu **out)
{
    *out = NULL;
    kvt_ctx_gpu *g = kvt_calloc(1, sizeof(*g));
    KVT_RETURN_IF(!g, KVT_ERR_NOMEM, "out of memory");
    g->T = in->T, g->D = in->D, g->Hq = in->Hq, g->Hkv = in->Hkv, g->Wt = in->W, g->Gd = Gd;
    g->rows = rows > 0 ? rows : 1;
    g->extra = Gd > 0 && in->k_decode && in->v_decode;
    kvt_status s = begin(in, g);
    if (s != KVT_OK) {
        kvt_ctx_gpu_end(g);
        return s;
    }
    *out = g;
    return KVT_OK;
}

kvt_status kvt_ctx_gpu_attn(kvt_ctx_gpu *g, bool decode, int group, int n_q, const int *n_vis,
                            const int *n_vis2, double scale, float *pr, float *pr2, double *lse,
                            double *out)
{
    KVT_RETURN_IF(!g || n_q < 1 || n_q > g->rows, KVT_ERR_INVALID_ARG,
                  "replay --device cuda: bad attention call (%d rows)", n_q);
    const size_t T = (size_t)g->T, D = (size_t)g->D;
    const float *q = (decode ? g->qd : g->qw) + (size_t)group * n_q * D; /* the group's rows */
    const float *K = g->k + (size_t)group * T * D, *V = g->v + (size_t)group * T * D;
    bool extra = decode && g->extra;
    const float *Kd = extra ? g->kd + (size_t)group * g->Gd * D : NULL;
    KVT_FORWARD(kvt_attn_probs_cuda(q, n_q, g->D, K, g->T, n_vis, Kd, extra ? g->Gd : 0,
                                    extra ? n_vis2 : NULL, scale, g->pr, extra ? g->pr2 : NULL,
                                    g->lse, (void *)g->st));
    KVT_FORWARD(kvt_attn_output_cuda(g->pr, n_q, g->T, T, V, g->D, g->out, D, (void *)g->st));
    KVT_FORWARD(download(g, pr, g->pr, (size_t)n_q * T * sizeof(float)));
    if (extra && pr2)
        KVT_FORWARD(download(g, pr2, g->pr2, (size_t)n_q * g->Gd * sizeof(float)));
    KVT_FORWARD(download(g, lse, g->lse, (size_t)n_q * sizeof(double)));
    KVT_FORWARD(download(g, out, g->out, (size_t)n_q * D * sizeof(double)));
    GPU_OK(cudaStreamSynchronize(g->st));
    return KVT_OK;
}

kvt_status kvt_ctx_gpu_norms(kvt_ctx_gpu *g, int group, double *knorm, double *vnorm, float *ku,
                             double *kmean)
{
    KVT_RETURN_IF(!g, KVT_ERR_INVALID_ARG, "replay --device cuda: no context");
    const size_t T = (size_t)g->T, D = (size_t)g->D;
    const float *K = g->k + (size_t)group * T * D, *V = g->v + (size_t)group * T * D;
    KVT_FORWARD(kvt_row_norms_cuda(K, g->T, g->D, g->norm, (void *)g->st));
    KVT_FORWARD(download(g, knorm, g->norm, T * sizeof(double))); /* before V reuses g->norm */
    KVT_FORWARD(kvt_row_norms_cuda(V, g->T, g->D, g->norm, (void *)g->st));
    KVT_FORWARD(download(g, vnorm, g->norm, T * sizeof(double)));
    KVT_FORWARD(kvt_unit_rows_cuda(K, g->T, g->D, g->ku, g->mean, g->inv, (void *)g->st));
    KVT_FORWARD(download(g, ku, g->ku, T * D * sizeof(float)));
    KVT_FORWARD(download(g, kmean, g->mean, D * sizeof(double)));
    GPU_OK(cudaStreamSynchronize(g->st));
    return KVT_OK;
}
