/* colsum_cuda.h - causal attention column sums (H2O scores) on the GPU: the device version of
 * kvt_colsum_accumulate_ref (kvt_capture.h), used by the capture session when the engine
 * submits device tensors (capture_cuda.cu). Internal to capture/; C-callable. Built only with
 * CUDA (colsum_cuda.cu); checked against the reference by tests/unit/test_capture_colsum_gpu.c.
 */
#ifndef KVT_COLSUM_CUDA_H
#define KVT_COLSUM_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "kvt_common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Agreement with kvt_colsum_accumulate_ref: |gpu - ref| <= ATOL + RTOL * |ref| per element.
 * The logits and row maxima are the reference's bit for bit, so every probability
 * expf(l - m) / s differs only through expf (CUDA's within 2 ulp, glibc's within 0.502 ulp:
 * <= 2.5 * 2^-23 = 3.0e-7 relative per term, on the numerator and, averaged, on s) and through
 * the online sum of pass 1 (exp(l - m_running) rescaled in f64, measured ~2e-8 in a host
 * emulation of the kernels at T <= 1030): <= ~6.2e-7 per probability, so also per column sum
 * (a sum of positive terms). ATOL only covers sums made entirely of subnormal expf results,
 * whose relative accuracy is not bounded. Assumes the reference is built without fused
 * multiply-adds (C11 mode: -ffp-contract=off), as the project builds it. */
#define KVT_COLSUM_CUDA_RTOL 1e-6
#define KVT_COLSUM_CUDA_ATOL 1e-30

/** Workspace of kvt_colsum_accumulate_cuda, in floats: 3 * Hq * n_q (per query its row max,
 *  f32, and the inverse of its exponential sum, f64). The caller allocates it on the device
 *  (cudaMalloc's alignment is enough: it must be 8-byte aligned). */
size_t kvt_colsum_cuda_work_floats(int n_q_heads, uint32_t n_q);

/** kvt_colsum_accumulate_ref on the device: for each query head h and query position i in
 *  [q_begin, q_begin + n_q), adds softmax over keys 0..i of scale * q[h][i] . k[h / (Hq/Hkv)][j]
 *  (f32 logits) to colsum[h][j] for every j <= i. Keys j >= q_begin + n_q are not touched.
 *  Two passes over 64 x 64 tiles of logits, nothing T x T stored: row max and exponential sum
 *  per query into `work`, then each key's probabilities summed in a fixed order (no atomics:
 *  the result is the same on every run). Logits are bitwise the reference's (f32 dot in d order
 *  without fused multiply-adds, then * scale); probabilities differ from it by a few f32 ulps
 *  (see KVT_COLSUM_CUDA_RTOL above).
 * @param q       [Hq, n_q, D] f32 device, query i at row i - q_begin.
 * @param k       [Hkv, n_k, D] f32 device, n_k >= q_begin + n_q.
 * @param colsum  [Hq, n_k] f64 device, accumulated (+=); the caller zeroes it once.
 * @param n_q_heads  Hq >= 1, a multiple of n_kv_heads (Hkv >= 1).
 * @param head_dim   D >= 1.
 * @param work    kvt_colsum_cuda_work_floats(Hq, n_q) floats of device memory, 8-byte aligned.
 * @param stream  cudaStream_t as void * (NULL: the legacy default stream). Asynchronous: the
 *                call returns once both kernels are enqueued; q, k, work and colsum must stay
 *                valid until they have run.
 * @return KVT_OK (n_q == 0: nothing is enqueued); KVT_ERR_INVALID_ARG (bad shape, NULL or
 *         misaligned pointer, grid too large); KVT_ERR_CUDA (a launch failed: the kernel and
 *         CUDA's message). A fault inside a kernel shows up at the next synchronisation. */
kvt_status kvt_colsum_accumulate_cuda(const float *q, const float *k, double *colsum, int n_q_heads,
                                      int n_kv_heads, uint32_t q_begin, uint32_t n_q, uint32_t n_k,
                                      int head_dim, float scale, float *work, void *stream);

#ifdef __cplusplus
}
#endif
#endif /* KVT_COLSUM_CUDA_H */
