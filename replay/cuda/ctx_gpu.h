/* ctx_gpu.h - the layer context's GPU backend (replay --device cuda), internal to replay/: the
 * layer's tensors are uploaded once, then the attention probabilities and outputs of each KV
 * group and the key/value norms, unit keys and their mean are computed by the CUDA kernels
 * (kernels/cuda, each checked against its _ref) and copied into the host context, so every
 * policy and sweep then runs unchanged on the host. ctx_gpu.c needs CUDA; ctx_gpu_stub.c
 * answers KVT_ERR_NO_CUDA in a build without it.
 */
#ifndef KVT_REPLAY_CTX_GPU_H
#define KVT_REPLAY_CTX_GPU_H

#include "kvt_replay.h"

typedef struct kvt_ctx_gpu kvt_ctx_gpu;

/** Usable CUDA devices (0 with a one-line reason in why[cap]). */
int kvt_ctx_gpu_devices(char *why, size_t cap);

/** Upload the layer (K, V, Q_window, and the decode tensors when present) to device 0.
 *  rows: the most query rows of one group (Gs * max(Wt, Gd)). */
kvt_status kvt_ctx_gpu_begin(const kvt_layer_input *in, int Gd, int rows, kvt_ctx_gpu **out);

/** One KV group's attention, as kvt_attn_probs + kvt_attn_output on the host: window queries
 *  (decode false: Q_window rows of group g, keys 0..T-1 visible per n_vis) or decode queries
 *  (decode true: Q_decode rows, plus decode keys per n_vis2 when the layer has them). Host
 *  outputs: pr [n_q, T], pr2 [n_q, Gd] or NULL, lse [n_q], out [n_q, D] (double). */
kvt_status kvt_ctx_gpu_attn(kvt_ctx_gpu *g, bool decode, int group, int n_q, const int *n_vis,
                            const int *n_vis2, double scale, float *pr, float *pr2, double *lse,
                            double *out);

/** KV head `group`: knorm, vnorm [T], ku [T, D], kmean [D] (host), as kvt_row_norms and
 *  kvt_unit_rows. */
kvt_status kvt_ctx_gpu_norms(kvt_ctx_gpu *g, int group, double *knorm, double *vnorm, float *ku,
                             double *kmean);

/** Free the device memory and stream (NULL is fine). */
void kvt_ctx_gpu_end(kvt_ctx_gpu *g);

#endif /* KVT_REPLAY_CTX_GPU_H */
