/* ctx_gpu.h - the layer context's GPU backend (replay --device cuda), internal to replay/: the
 * layer's tensors are uploaded once, then the attention probabilities and outputs of each KV
 * group, their row masses and the key/value norms, unit keys and their mean are computed by the
 * CUDA kernels (kernels/cuda, each checked against its _ref). The small results are copied into
 * the host context; the large ones (probabilities, unit keys) stay on the device until a host
 * reader asks for them (kvt_ctx_gpu_fetch, through kvt_ctx_fetch), so every policy runs
 * unchanged on the host. The context keeps the device copies for the layer's lifetime: the
 * output sweeps (recall and output error of every cut of a ranking), the coverage cosine tables
 * and bests, the redundancy of kept sets, SnapKV's window scores and h2o's column sums from
 * Q_all run on the GPU. ctx_gpu.c needs CUDA; ctx_gpu_stub.c answers KVT_ERR_NO_CUDA without it.
 */
#ifndef KVT_REPLAY_CTX_GPU_H
#define KVT_REPLAY_CTX_GPU_H

#include "kvt_replay.h"

typedef struct kvt_ctx_gpu kvt_ctx_gpu;
struct kvt_layer_ctx;

/** Usable CUDA devices (0 with a one-line reason in why[cap]). */
int kvt_ctx_gpu_devices(char *why, size_t cap);

/** Device memory one layer's context may hold at most (every array kvt_ctx_gpu_* allocates,
 *  at its largest for sweeps of n_cut cuts (budgets x policies: policies that rank alike share
 *  a sweep) and n_probe probes, h2o's column-sum buffers and the attention kernels' own
 *  workspace included), with 5% and 16 MiB to spare: what one replay worker thread holds on
 *  the GPU at once. 0 without CUDA. */
uint64_t kvt_ctx_gpu_worker_bytes(int T, int D, int Hq, int Hkv, int Wt, int Gd, bool extra,
                                  int n_probe, int n_cut);
/** CUDA device dev's free and total memory (cudaMemGetInfo; dev becomes the calling thread's
 *  current device, its context created): 0, or -1 (nothing written). */
int kvt_ctx_gpu_mem(int dev, uint64_t *free_bytes, uint64_t *total_bytes);
/** cudaDeviceReset of every device this process made a context on here (kvt_ctx_gpu_mem,
 *  kvt_ctx_gpu_begin; kvt_replay_release_device); KVT_OK without CUDA. */
kvt_status kvt_ctx_gpu_release(void);
/** The calling thread is done with layer contexts: its pinned staging buffers freed now, while
 *  the thread is whole, rather than by its exit's destructor. Nothing without CUDA. */
void kvt_ctx_gpu_thread_end(void);

/** Upload the layer (K, V, Q_window, and the decode tensors when present) to CUDA device
 *  in->cuda_device (the calling thread's current device from then on); K and V
 *  given in 16 bits (in->k16, in->v16, or as stored: in->k_pieces, in->kv_rest) are uploaded
 *  so and widened to f32 there.
 *  rows: the most query rows of one group (Gs * max(Wt, Gd)). prof (may be NULL) receives the
 *  GPU's share of the time split: uploads, kernels with the bytes they must move, downloads. */
kvt_status kvt_ctx_gpu_begin(const kvt_layer_input *in, int Gd, int rows, kvt_replay_profile *prof,
                             kvt_ctx_gpu **out);

/** Nanoseconds kvt_ctx_gpu_begin spent inside the input's kv_rest (reading K and V from the
 *  trace into pinned memory, their copies overlapping it): the profile's read, not context. */
uint64_t kvt_ctx_gpu_read_ns(const kvt_ctx_gpu *g);

/** The first non-finite element of the uploaded K and of V (their index, or Hkv*T*D when all
 *  are finite): the layer's check of its inputs, on the device instead of a host scan. */
kvt_status kvt_ctx_gpu_check_kv(kvt_ctx_gpu *g, size_t *bad_k, size_t *bad_v);

/** Every KV group's attention in one call and one round trip, as kvt_attn_probs +
 *  kvt_attn_output on the host for each group: window queries (decode false: the n_q Q_window
 *  rows of each group, keys 0..T-1 visible per n_vis) or decode queries (decode true: Q_decode
 *  rows, plus decode keys per n_vis2 when the layer has them); n_vis, n_vis2 [n_q] the same for
 *  every group. Host outputs, group after group (Hkv n_q rows): lse [rows], out [rows, D]
 *  (double), rowsum [rows] (each probability row's sum over the prompt keys,
 *  kvt_row_mass_cuda), for window queries of a layer with modalities mass [rows, KVT_NM] (else
 *  NULL), and for decode queries with decode keys p_extra [rows] and o_extra [rows, D] (or
 *  NULL): each row's probability mass on the decode keys and their part of its output
 *  (kvt_row_mass_cuda and kvt_attn_output_batch_cuda on the device, for a block of a KV
 *  group's rows at a time when all groups' would exceed 256 MiB; the decode keys'
 *  probabilities never leave it and are freed, so the decode call is made once). The
 *  probabilities over the prompt stay on the device (kvt_ctx_gpu_fetch). A non-finite logit
 *  is reported for the first group that has one. */
kvt_status kvt_ctx_gpu_attn(kvt_ctx_gpu *g, bool decode, int n_q, const int *n_vis,
                            const int *n_vis2, double scale, double *lse, double *out,
                            double *rowsum, double *mass, double *p_extra, double *o_extra);

/** Every KV head's knorm, vnorm [Hkv, T], kmean [Hkv, D] (host) in one round trip, as
 *  kvt_row_norms and kvt_unit_rows per head; the unit keys stay on the device
 *  (kvt_ctx_gpu_fetch). */
kvt_status kvt_ctx_gpu_norms(kvt_ctx_gpu *g, double *knorm, double *vnorm, double *kmean);

/** The large arrays the device keeps, for a host reader: the whole of one into host memory. */
typedef enum { KVT_GPU_PRW, KVT_GPU_PRD, KVT_GPU_KU } kvt_gpu_array;
kvt_status kvt_ctx_gpu_fetch(kvt_ctx_gpu *g, kvt_gpu_array which, void *host);

/** Decode probability rows r0 .. r0+n-1 of [Hq Gd, T] into host [n, T] (one KV group's with
 *  --decode-probs group: kvt_ctx_prd_group). */
kvt_status kvt_ctx_gpu_fetch_prd_rows(kvt_ctx_gpu *g, size_t r0, size_t n, float *host);
/** Map the host buffer of one KV group's decode probability rows (prd with prd_one) to their
 *  device rows r0 .. r0+n-1, for the sweeps given host pointers into it. */
void kvt_ctx_gpu_map_prd(kvt_ctx_gpu *g, const float *host, size_t r0, size_t n);

/** After the host context is complete: map the host context's arrays to their device copies, so
 * that kvt_ctx_gpu_sweep_output can run on the host pointers the host sweep would use. */
kvt_status kvt_ctx_gpu_finish(kvt_ctx_gpu *g, const struct kvt_layer_ctx *c);

/** kvt_sweep_output_ref's contract on the GPU, given the HOST pointers the host sweep would
 *  use (each must point into the context's arrays; they are mapped to the device copies) and
 *  the KV head `group` whose values V the queries read; order and cuts on the host; results
 *  [n_q, n_cut] (and by modality) into host memory. (A head dim the kernels do not take fails
 *  earlier, at the layer's attention.) */
kvt_status kvt_ctx_gpu_sweep_output(kvt_ctx_gpu *g, int n_q, int T, int D, const float *p,
                                    size_t stride_p, int group, const double *a_full,
                                    size_t stride_a, const double *p_extra, size_t stride_e,
                                    const double *o_extra, const double *r_full,
                                    const int32_t *order, const int32_t *cuts, int n_cut,
                                    const uint8_t *mod, const double *mass_mod, size_t stride_m,
                                    double *recall, double *err, double *recall_mod);

/** With on, the sweep and set-sweep calls that follow only queue their work and their results'
 *  downloads; with off, they are waited for (the host arrays complete), so that a head's sweeps
 *  cost one round trip. Their host result arrays must not be read in between. Returns the
 *  wait's status (a kernel's fault surfaces there). */
kvt_status kvt_ctx_gpu_defer(kvt_ctx_gpu *g, bool on);

/** The cosine table of KV head `group`'s unit keys against the probe keys (probe [n_probe]
 *  host indices), kept on the device for kvt_ctx_gpu_set_sweep: kvt_cosine_table_ref. */
kvt_status kvt_ctx_gpu_cosines(kvt_ctx_gpu *g, int group, const int32_t *probe, int n_probe);

/** The set metrics of one ranking of KV head `group` at every cut (order, cuts on the host), in
 *  one round trip: each probe's best cosine among order[0..cuts[c]) into best [n_cut, n_probe]
 *  (host; NULL: none), from the last cosine table, and the redundancy of each kept set into
 *  rk [n_cut] (host), kvt_sweep_redundancy_ref bit for bit. */
kvt_status kvt_ctx_gpu_set_sweep(kvt_ctx_gpu *g, int group, const int32_t *order,
                                 const int32_t *cuts, int n_cut, float *best, double *rk);

/** SnapKV window scores from the device's window probabilities (kvt_ctx_window_scores'
 *  contract: mean over the last W window queries, GQA reduction unless per_query, pooling),
 *  out [H', T - W] into host memory; W < T. */
kvt_status kvt_ctx_gpu_window_scores(kvt_ctx_gpu *g, int W, int kernel, kvt_pool pool,
                                     kvt_reduce reduce, bool per_query, double *out);

/** The oracle's scores from the device's decode probabilities: for each head (query heads with
 *  per_query, else KV heads) the mean over its query heads' decode rows (in order) of each
 *  prompt key j < P, out [H', P] into host memory (kvt_col_mean_ref's arithmetic). */
kvt_status kvt_ctx_gpu_decode_scores(kvt_ctx_gpu *g, bool per_query, int P, double *out);

/** kvt_rank_desc on each of H rows of score [H, P] (host), order [H, P] (host): the same
 *  permutations, from a stable radix sort on the device (kvt_rank_desc_segmented_cuda). */
kvt_status kvt_ctx_gpu_rank(kvt_ctx_gpu *g, const double *score, int H, int P, int32_t *order);

/** H2O column sums of query head h from all its prompt queries q [T, D] (host), against its
 *  KV head's keys already on the device: kvt_attn_colsum_ref's contract, out [T] (host). */
kvt_status kvt_ctx_gpu_colsum_head(kvt_ctx_gpu *g, int h, const float *q, double scale,
                                   double *out);

/** Free the device memory and stream (NULL is fine). */
void kvt_ctx_gpu_end(kvt_ctx_gpu *g);

#endif /* KVT_REPLAY_CTX_GPU_H */
