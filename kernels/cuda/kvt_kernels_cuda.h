/* kvt_kernels_cuda.h - CUDA versions of the replay's kernels (issue #7), callable from C.
 *
 * Every pointer is device memory unless its comment says host; `stream` is a cudaStream_t
 * passed as void * (NULL: the default stream); calls are asynchronous on it except where a
 * result comes back to the host. Each op is checked against its kernels/ref/ oracle by
 * tests/unit/test_kernels_cuda.c (label gpu: "not run" without a device).
 *
 * Status: every kernel here runs in CI on cuemu (tests/cuemu), but the CUB ranking (the
 * reference stands in for it there), and passed test_kernels_cuda on an H200 (bench/RESULTS.md),
 * except what changed after the last GPU session (checked on cuemu only so far): kvt_widen_cuda,
 * kvt_widen_stored_cuda, the redundancy sweep in chunks, the sweeps' one block per cut, the
 * coverage bests' smaller chunks, the attention's stored logits and batches (every KV group in
 * one call), the output kernel's dimensions per thread, the cosine table's and output sweep's
 * double stages, the sweeps' chunk tables built on the device (kvt_cu_chunk_table_k). All are
 * used by `replay --device cuda` (replay/cuda/ctx_gpu.c).
 */
#ifndef KVT_KERNELS_CUDA_H
#define KVT_KERNELS_CUDA_H

#include "kvt_kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

/** Usable CUDA devices; 0 with a one-line reason in why[cap] (no driver, no device). */
int kvt_cuda_devices(char *why, size_t cap);

/** Stream-ordered device memory (cudaMallocAsync / cudaFreeAsync, returning a cudaError_t)
 *  where the current device has memory pools; on one without them (some virtualised GPUs)
 *  cudaMalloc, and a free that first waits for the stream. The first call on a device with
 *  pools sets its default pool to keep freed memory (no release at each synchronisation) and
 *  not to make one stream's allocation wait for another stream's work. */
int kvt_cuda_malloc_async(void **p, size_t bytes, void *stream);
int kvt_cuda_free_async(void *p, void *stream);

/** kvt_attn_probs_ref on the device: q [n_q, D], k [T, D], k2 [n2, D] or NULL; n_vis and
 *  n_vis2 are HOST arrays [n_q] (clamped like the reference; a query that sees no key is
 *  KVT_ERR_INVALID_ARG); pr [n_q, T], pr2 [n_q, n2], lse [n_q] or NULL. A non-finite logit is
 *  KVT_ERR_NAN with the reference's message (the first in query, then key order).
 *  Synchronises the stream. */
kvt_status kvt_attn_probs_cuda(const float *q, int n_q, int D, const float *k, int T,
                               const int *n_vis, const float *k2, int n2, const int *n_vis2,
                               double scale, float *pr, float *pr2, double *lse, void *stream);
/** kvt_attn_probs_cuda on n_batch (1..65535) batches in one call, each with its own arrays
 *  following the previous batch's (batch b: q + b n_q D, k + b T D, k2 + b n2 D, pr + b n_q T,
 *  pr2 + b n_q n2, lse + b n_q) and the same visible prefixes: the replay's KV groups at once.
 *  Each batch's results are bitwise those of a call of its own; a non-finite logit is reported
 *  for the first batch that has one, as calls in batch order would. */
kvt_status kvt_attn_probs_batch_cuda(const float *q, int n_q, int D, const float *k, int T,
                                     const int *n_vis, const float *k2, int n2, const int *n_vis2,
                                     double scale, float *pr, float *pr2, double *lse, int n_batch,
                                     void *stream);

/** The device memory kvt_attn_probs_batch_cuda and kvt_attn_output_batch_cuda allocate for
 *  themselves (stream-ordered) for n_batch batches of n_q query rows over T keys (+ n2), both
 *  counted: with memory pools the first's may not be released yet when the second's is taken.
 *  Out of GPU memory there is KVT_ERR_NOMEM. */
size_t kvt_attn_cuda_temp_bytes(int n_q, int T, int n2, int D, int n_batch);
/** Of those, kvt_attn_output_batch_cuda's alone (its key blocks' partial sums), for n_batch
 *  batches of n_q rows over T keys. */
size_t kvt_attn_output_cuda_temp_bytes(int n_q, int T, int D, int n_batch);

/** Tests only: the size of kvt_attn_probs_cuda's logit buffer (the rows of logits it computes
 *  at a time, at least 32, 64 MiB by default; 0 restores the default). Any size gives the same
 *  bits. Not thread-safe: set it before kernels run. */
void kvt_attn_cuda_set_zbuf_bytes(size_t bytes);

/** kvt_attn_output_ref on the device: out[q][d] = sum over keys j of p[q][j] v[j][d], in
 *  double: in key order within blocks of 1024 keys, the blocks' sums then in order (a few 1e-16
 *  relative from the reference's single chain). D <= 512, else KVT_ERR_UNSUPPORTED. */
kvt_status kvt_attn_output_cuda(const float *p, int n_q, int T, size_t stride_p, const float *v,
                                int D, double *out, size_t stride_out, void *stream);
/** kvt_attn_output_cuda on n_batch (1..65535) batches in one call (batch b: p + b n_q stride_p,
 *  v + b T D, out + b n_q stride_out), each bitwise a call of its own. */
kvt_status kvt_attn_output_batch_cuda(const float *p, int n_q, int T, size_t stride_p,
                                      const float *v, int D, double *out, size_t stride_out,
                                      int n_batch, void *stream);

/** kvt_sweep_output_ref on the device (same arguments; cuts on the HOST, no workspace; head
 *  dim D <= 512, else KVT_ERR_UNSUPPORTED). The walked tokens are summed in chunks of at most
 *  256 ranked positions in parallel, the chunks' sums then in the reference's walk order,
 *  without fused multiply-adds: the reference's sums up to the order of the additions (within
 *  rounding, not bit for bit). Synchronises the stream. */
kvt_status kvt_sweep_output_cuda(int n_q, int T, int D, const float *p, size_t stride_p,
                                 const float *v, const double *a_full, size_t stride_a,
                                 const double *p_extra, size_t stride_e, const double *o_extra,
                                 const double *r_full, const int32_t *order, const int32_t *cuts,
                                 int n_cut, const uint8_t *mod, const double *mass_mod,
                                 size_t stride_m, double *recall, double *err, double *recall_mod,
                                 void *stream);

/** SnapKV window scores (replay's kvt_ctx_window_scores): for each query head the mean of the
 *  last W of its Wt window-query probability rows over the prefix P = T - W (prw [Hq, Wt, T]),
 *  then (unless per_query) the GQA reduction to Hkv heads, then 1-D pooling with `kernel`:
 *  out [H', P]. work: (Hq + Hkv) * P doubles. Sums in the references' order: bitwise theirs. */
kvt_status kvt_window_scores_cuda(const float *prw, int Hq, int Hkv, int Wt, int W, int T,
                                  int kernel, kvt_pool pool, kvt_reduce reduce, bool per_query,
                                  double *work, double *out, void *stream);

/** out[h][j] = the mean of rows h*R .. h*R+R-1 of x [H*R, T] at column j < P, the rows added in
 *  order and the sum divided by R: kvt_col_mean_ref(x + h*R*T, R, T, P, out + h*P), bitwise
 *  (the oracle's scores from the decode probabilities). */
kvt_status kvt_col_mean_cuda(const float *x, int H, int R, int T, int P, double *out, void *stream);

/** kvt_attn_colsum_ref on the device (H2O's column sums of one head from every prompt query,
 *  q and k [T, D]): colsum [T]; work: 2T doubles. A non-finite logit is KVT_ERR_NAN with the
 *  reference's message. Synchronises the stream once (for that check). */
kvt_status kvt_attn_colsum_cuda(const float *q, const float *k, int T, int D, double scale,
                                double *work, double *colsum, void *stream);

/** kvt_row_norms_ref: out[t] = ||x[t]|| for rows x [n, D] f32, in double. */
kvt_status kvt_row_norms_cuda(const float *x, int n, int D, double *out, void *stream);

/** kvt_unit_rows_ref: ku [n, D] = x / max(||x||, 1e-12) in f32 (ku may be NULL); mean [D]
 *  the mean unit row in double (may be NULL), summed in parts of rows in a fixed order: the
 *  reference's up to rounding. inv_work: kvt_unit_rows_cuda_work(n, D) doubles of device
 *  workspace (n without the mean). */
kvt_status kvt_unit_rows_cuda(const float *x, int n, int D, float *ku, double *mean,
                              double *inv_work, void *stream);
size_t kvt_unit_rows_cuda_work(int n, int D);

/** Row masses of probabilities p [n rows at stride] x [T]: sum[i] = the sum of row i in
 *  double (as kvt_sum_f32_cpu, in another order), and with mod [T] (may be NULL) mass [n, NM]
 *  as kvt_mass_by_mod_cpu (codes >= NM count as the last). Every pointer on the device. */
kvt_status kvt_row_mass_cuda(const float *p, int n, int T, size_t stride, const uint8_t *mod,
                             double *sum, double *mass, void *stream);

/** *first (device) = the lowest index i < n with x[i] (device) not finite, or n when all are:
 *  kvt_first_nonfinite_f32_cpu on the device. */
kvt_status kvt_first_nonfinite_cuda(const float *x, size_t n, unsigned long long *first,
                                    void *stream);

/** dst[i] = src[i] widened to f32 for n elements of dt (KVT_DTYPE_BF16 or KVT_DTYPE_F16, in
 *  the low bits of each uint16_t), bit for bit as kvt_convert_to_f32 (NaN and Inf kept, f16
 *  subnormals exact). */
kvt_status kvt_widen_cuda(kvt_dtype dt, const uint16_t *src, size_t n, float *dst, void *stream);
/** kvt_widen_stored_ref on the device (src and dst device memory; src 2-byte aligned unless
 *  planes): one trace record's elements as stored, byte planes merged here, widened into their
 *  rows. Bit for bit the reference. */
kvt_status kvt_widen_stored_cuda(kvt_dtype dt, bool planes, const uint8_t *src, int n_heads,
                                 int n_tok, int D, size_t stride_head, float *dst, void *stream);

/** kvt_rank_desc_ref on each of n_seg segments: score [n_seg, n] (double), order [n_seg, n]
 *  receives each segment's permutation of 0..n-1 (score descending, ties by lower index, NaN
 *  last): the same permutations as the reference (a stable segmented radix sort of
 *  kvt_rank_key). Allocates and frees temporary device memory; synchronises the stream. */
kvt_status kvt_rank_desc_segmented_cuda(const double *score, int n_seg, int n, int32_t *order,
                                        void *stream);

/** kvt_cosine_table_ref: ct [T, n_probe] = ku [T, D] . ku[probe]^T, summed in double and
 *  rounded to f32. probe [n_probe] (device) indices in 0..T-1 (not checked on the device). */
kvt_status kvt_cosine_table_cuda(const float *ku, int T, int D, const int32_t *probe, int n_probe,
                                 float *ct, void *stream);

/** The running part of kvt_sweep_coverage_ref: best [n_cut, n_probe] f32 = each probe's best
 *  cosine among ranked tokens order[0..cuts[c]) (order [T] on the device, cuts [n_cut] on
 *  the host, strictly increasing within 0..T). kvt_coverage_summary turns a row of best into
 *  the metrics exactly as the reference does. */
kvt_status kvt_coverage_best_cuda(const float *ct, int T, int n_probe, const int32_t *order,
                                  const int32_t *cuts, int n_cut, float *best, void *stream);

/* The sweep and coverage kernels above allocate a small device workspace per call, and freeing
 * device memory synchronises the whole device; callers that sweep many rankings (the replay)
 * pass one workspace instead, of at least kvt_sweep_cuda_work_bytes(T, n_cut, n_probe) bytes
 * (coverage; the output sweep: kvt_sweep_output_cuda_work_bytes; the redundancy sweep:
 * kvt_sweep_redundancy_cuda_work_bytes). The _ws calls are
 * asynchronous (they do not synchronise the stream: the workspace must live until their kernels
 * have run). */
#define KVT_CB_CHUNK 256 /* ranked positions per block of the coverage bests */
size_t kvt_sweep_cuda_work_bytes(int T, int n_cut, int n_probe);
/* kvt_sweep_output_cuda_ws's workspace: its chunk table and the chunks' sums */
size_t kvt_sweep_output_cuda_work_bytes(int n_q, int T, int D, int n_cut);
kvt_status kvt_sweep_output_cuda_ws(int n_q, int T, int D, const float *p, size_t stride_p,
                                    const float *v, const double *a_full, size_t stride_a,
                                    const double *p_extra, size_t stride_e, const double *o_extra,
                                    const double *r_full, const int32_t *order, const int32_t *cuts,
                                    int n_cut, const uint8_t *mod, const double *mass_mod,
                                    size_t stride_m, double *recall, double *err,
                                    double *recall_mod, void *work, size_t work_bytes,
                                    void *stream);
/** kvt_sweep_redundancy_ref on the device (ku, order device; cuts on the HOST, copied into
 *  work, of at least kvt_sweep_redundancy_cuda_work_bytes; r [n_cut] device): the walk in
 *  chunks summed in parallel, then in order, so within rounding of the reference's one chain
 *  of sums (not bit for bit). */
size_t kvt_sweep_redundancy_cuda_work_bytes(int T, int D, int n_cut);
kvt_status kvt_sweep_redundancy_cuda_ws(const float *ku, int T, int D, const int32_t *order,
                                        const int32_t *cuts, int n_cut, double *r, void *work,
                                        size_t work_bytes, void *stream);
kvt_status kvt_coverage_best_cuda_ws(const float *ct, int T, int n_probe, const int32_t *order,
                                     const int32_t *cuts, int n_cut, float *best, void *work,
                                     size_t work_bytes, void *stream);

#ifdef __cplusplus
}
#endif
#endif /* KVT_KERNELS_CUDA_H */
