/* kvt_kernels.h - numeric primitives of the replay: window attention probabilities, GQA
 * reduction, 1-D pooling, norms, unit keys and head redundancy, deterministic ranking, and the
 * budget sweeps (recall and output error for every budget from one pass over a ranking,
 * key-space coverage, redundancy of the kept set), plus Quest page bounds.
 *
 * Every op exists as a plain C reference `kvt_<op>_ref` (kernels/ref/<op>_ref.c): plain loops,
 * no SIMD or threads, pointers + shapes, no file I/O. They are the oracle for the fast CPU
 * variants `kvt_<op>_cpu` (kernels/cpu/, dense products through OpenBLAS when it is found at
 * build time) and the later CUDA versions. The replay calls the dispatcher `kvt_<op>`, which
 * runs the `_cpu` variant, or the reference when KVT_KERNELS=ref is set in the environment or
 * kvt_kernels_use_ref(true) was called. Definitions: ../shared/POLICIES.md §0.1 and §12.
 *
 * Dimension letters: T prompt tokens (keys), D head dim, W window queries, Hq query heads,
 * Hkv KV heads, G decode steps. Arrays are row-major; "[T,D]" means T rows of D elements.
 * Scores and accumulations are in double; probabilities are stored in f32 (POLICIES §0.1.3).
 */
#ifndef KVT_KERNELS_H
#define KVT_KERNELS_H

#include "kvt_common.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KVT_N_MODALITIES 4 /* text, image, video, other (kvt_modality in kvt_trace.h) */

typedef enum kvt_reduce {
    KVT_REDUCE_MEAN = 0,
    KVT_REDUCE_MAX = 1,
    KVT_REDUCE_SUM = 2,
} kvt_reduce;

typedef enum kvt_pool {
    KVT_POOL_AVG = 0, /* zero padding, divisor always k (PyTorch count_include_pad=True) */
    KVT_POOL_MAX = 1, /* max over in-range entries (padding acts as -inf) */
} kvt_pool;

/** Softmax rows of attention in f32 with per-query visibility (causal masking).
 *  Query i sees keys k[j] for j < n_vis[i] (masked keys get probability 0) and, when k2 is
 *  given, k2[j] for j < n_vis2[i]. Logits z = <q,k>*scale are accumulated in double, the
 *  softmax is taken in double over all visible keys of both blocks, and stored in f32.
 * @param q      [n_q, D] queries
 * @param k      [T, D] keys (block 1)
 * @param n_vis  [n_q] visible prefix of k per query, 0..T
 * @param k2     [n2, D] keys of block 2 (e.g. decode keys) or NULL (then n2 = 0)
 * @param n_vis2 [n_q] visible prefix of k2 per query (ignored if k2 is NULL)
 * @param pr     out [n_q, T] probabilities over block 1
 * @param pr2    out [n_q, n2] probabilities over block 2 (NULL if k2 is NULL)
 * @param lse    out [n_q] log-sum-exp of the scaled logits, or NULL
 * @param work   [T + n2] doubles of workspace
 * @return KVT_OK; KVT_ERR_INVALID_ARG for bad shapes or a query that sees no key;
 *         KVT_ERR_NAN if a logit is not finite. */
kvt_status kvt_attn_probs_ref(const float *q, int n_q, int D, const float *k, int T,
                              const int *n_vis, const float *k2, int n2, const int *n_vis2,
                              double scale, float *pr, float *pr2, double *lse, double *work);
/** kvt_attn_probs_ref that also writes each query's softmax shift and normaliser to zs
 *  [n_q, 2] (zmax, zsum over both blocks; lse = zmax + log(zsum)), or not when zs is NULL. */
kvt_status kvt_attn_probs_zs_ref(const float *q, int n_q, int D, const float *k, int T,
                                 const int *n_vis, const float *k2, int n2, const int *n_vis2,
                                 double scale, float *pr, float *pr2, double *lse, double *zs,
                                 double *work);
/** The block-1 probabilities pr [n_q, T] a kvt_attn_probs_zs_ref call wrote, bit for bit,
 *  from the same q, k, n_vis and scale and its zs, without block 2 (whose logits cost
 *  O(n2 D) a query). work [T] doubles. KVT_ERR_NAN for a logit that is not finite. */
kvt_status kvt_attn_probs_again_ref(const float *q, int n_q, int D, const float *k, int T,
                                    const int *n_vis, double scale, const double *zs, float *pr,
                                    double *work);

/** H2O column sums from every prompt query: colsum[j] = sum_{i>=j} softmax_causal(q_i K^T)[j]
 *  (query i sees keys 0..i). O(T^2 D).
 * @param q    [T, D] all prompt queries of one head
 * @param k    [T, D] keys of its KV head
 * @param work [T] doubles of workspace
 * @param colsum out [T] */
kvt_status kvt_attn_colsum_ref(const float *q, const float *k, int T, int D, double scale,
                               double *work, double *colsum);
/** kvt_attn_colsum_ref with the logits of blocks of 64 query rows as dense products and the
 *  softmax through the vectorised loops: the same results up to the summation order of the
 *  dot products (a probability now and then one f32 ulp off), the same error for the first
 *  non-finite logit. Columns still add their rows in order. Allocates its own blocks
 *  (KVT_ERR_NOMEM); `work` is not used. Then the dispatcher. */
kvt_status kvt_attn_colsum_cpu(const float *q, const float *k, int T, int D, double scale,
                               double *work, double *colsum);
kvt_status kvt_attn_colsum(const float *q, const float *k, int T, int D, double scale, double *work,
                           double *colsum);

/** Mean over rows: out[j] = (1/n_rows) * sum_r x[r*ld + j] for j < n_cols. */
void kvt_col_mean_ref(const float *x, int n_rows, int ld, int n_cols, double *out);

/** GQA reduction of per-query-head rows to KV heads (group g = query heads g*G..g*G+G-1,
 *  G = Hq/Hkv, the repeat_kv layout).
 * @param a   [Hq, n]   @param out [Hkv, n] */
kvt_status kvt_gqa_reduce_ref(const double *a, int Hq, int Hkv, int n, kvt_reduce op, double *out);

/** 1-D pooling along n, stride 1, padding floor(k/2), output length n. k must be odd >= 1.
 *  AVG: sum over the in-range window divided by k (out-of-range entries count as 0).
 *  MAX: max over the in-range window. */
kvt_status kvt_pool1d_ref(const double *s, int n, int k, kvt_pool op, double *out);

/** L2 norm of each row: out[t] = ||x[t]||_2 (accumulated in double). x [n, D], out [n]. */
void kvt_row_norms_ref(const float *x, int n, int D, double *out);

/** Unit rows ku[t] = x[t]/max(||x[t]||, 1e-12) (F.normalize) and their mean over all n rows.
 * @param x [n, D]  @param ku out [n, D] (may be NULL)  @param mean out [D] (may be NULL) */
void kvt_unit_rows_ref(const float *x, int n, int D, float *ku, double *mean);

/** Head redundancy of n unit vectors with mean m (POLICIES §4.1.4, MixKV):
 *  r = (n*||m||^2 - 1)/(n - 1), the mean off-diagonal cosine. NaN for n < 2. */
double kvt_redundancy_ref(const double *mean, int D, int n);

/** Deterministic descending ranking: order[0..n) is a permutation of 0..n-1 sorted by score
 *  descending, ties by lower index first; NaN scores sort last (by index). Stable merge sort.
 * @param work [n] int32 workspace */
void kvt_rank_desc_ref(const double *score, int n, int32_t *order, int32_t *work);
/** The same permutation by a radix sort of 64-bit keys (rank_cpu.c; allocates 16n bytes:
 *  KVT_ERR_NOMEM), and its dispatcher. */
kvt_status kvt_rank_desc_cpu(const double *score, int n, int32_t *order, int32_t *work);
kvt_status kvt_rank_desc(const double *score, int n, int32_t *order, int32_t *work);

/* ---- budget sweeps: every budget from one pass over a ranking ---- */

/** Bytes of workspace kvt_sweep_output_ref needs. */
size_t kvt_sweep_output_workspace_bytes(int n_q, int D);

/** Attention recall and relative output error of every cut of one ranking, for a batch of
 *  queries that share that ranking (POLICIES §12). The kept set at cut c is order[0..c) plus
 *  the always-kept extra keys (decode keys). For query q with probabilities p over the T
 *  prompt keys (mass p_extra on the extra keys, whose weighted value sum is o_extra) and
 *  total stored mass Z = sum_j p_j + p_extra (1 up to f32 rounding):
 *    recall = (sum_{s in S} p_s + p_extra) / Z
 *    o      = (a_full + o_extra) / Z                   (a_full = sum_j p_j v_j)
 *    o_S    = (sum_{s in S} p_s v_s + o_extra) / (sum_{s in S} p_s + p_extra)
 *    err    = ||o_S - o|| / ||o||       (1 when nothing with mass is kept; 0 if o = o_S = 0)
 *  so that the full set gives recall 1 and error 0 exactly.
 *  Cuts up to T/2 accumulate forward from the top of the ranking, larger cuts subtract the
 *  dropped tail from the full sum: each query costs at most T/2 * D.
 * @param p        rows [n_q] of [T] f32 probabilities, row q at p + q*stride_p
 * @param v        [T, D] values
 * @param a_full   rows of [D] doubles at a_full + q*stride_a: sum_j p_j v_j over all T keys
 * @param p_extra  [n_q] at p_extra[q*stride_e], or NULL (no extra keys)
 * @param o_extra  rows of [D] at o_extra + q*stride_a, or NULL
 * @param r_full   [n_q] at r_full[q*stride_e]: sum_j p_j of each query (the caller's cached
 *                 row sums), or NULL to compute them here
 * @param order    [T] permutation of 0..T-1
 * @param cuts     [n_cut] strictly increasing, each in 0..T
 * @param mod      [T] modality codes (< KVT_N_MODALITIES) or NULL
 * @param mass_mod rows of [KVT_N_MODALITIES] at mass_mod + q*stride_m: full mass per
 *                 modality (needed when mod != NULL)
 * @param recall   out [n_q, n_cut]   @param err out [n_q, n_cut] (may be NULL)
 * @param recall_mod out [n_q, n_cut, KVT_N_MODALITIES] kept mass / full mass per modality
 *                 (NaN where the full mass is 0), or NULL
 * @param work     kvt_sweep_output_workspace_bytes(n_q, D) bytes, 8-byte aligned */
kvt_status kvt_sweep_output_ref(int n_q, int T, int D, const float *p, size_t stride_p,
                                const float *v, const double *a_full, size_t stride_a,
                                const double *p_extra, size_t stride_e, const double *o_extra,
                                const double *r_full, const int32_t *order, const int32_t *cuts,
                                int n_cut, const uint8_t *mod, const double *mass_mod,
                                size_t stride_m, double *recall, double *err, double *recall_mod,
                                void *work);

/** Cosine table between every key and a set of probe keys: ct[j*n_probe + i] = <ku_j, ku_pi>
 *  for unit keys ku (zero keys give 0). ku [T, D] unit rows; probe [n_probe] indices < T;
 *  ct out [T, n_probe] (key-major so a sweep reads one contiguous row per kept key). */
kvt_status kvt_cosine_table_ref(const float *ku, int T, int D, const int32_t *probe, int n_probe,
                                float *ct);

/** Key-space coverage of every cut over the first n_eval probes (n_eval <= n_probe: those in
 *  the policy's prefix [0, T-W) when the probes ascend; ct rows stay n_probe long): for each
 *  probe i < n_eval, best_i = max_{s in order[0..c)} ct[s,i]; cov = mean_i best_i, radius =
 *  max_i (1 - best_i), cov_mod[m] = mean over probes of modality m (NaN if none), cov_drop =
 *  mean over the dropped probes (probe_pos[i] >= c: not among the kept) of best_i (NaN if
 *  none). NaN everywhere for c = 0 or n_eval = 0.
 * @param probe_mod [n_probe] modality of each probe or NULL (then cov_mod is not written)
 * @param probe_pos [n_probe] position of each probe's token in order, or NULL (then cov_drop
 *                  is not written)
 * @param work      [n_probe] floats
 * @param cov, radius out [n_cut]; cov_mod out [n_cut, KVT_N_MODALITIES] or NULL; cov_drop out
 *                  [n_cut] or NULL */
kvt_status kvt_sweep_coverage_ref(const float *ct, int T, int n_probe, int n_eval,
                                  const int32_t *order, const int32_t *cuts, int n_cut,
                                  const uint8_t *probe_mod, const int32_t *probe_pos, float *work,
                                  double *cov, double *radius, double *cov_mod, double *cov_drop);
/** The per-cut summary of kvt_sweep_coverage_ref from best [n_probe] (each probe's best cosine
 *  among the first `cut` ranked tokens): *cov the mean, *radius the largest 1 - best, cov_mod
 *  [NM] the mean by probe modality (NULL: skipped), *cov_drop the mean over the probes with
 *  probe_pos[i] >= cut (NaN if none; probe_pos or cov_drop NULL: skipped); NaN for an empty
 *  set. Shared by every implementation so that they summarise identically. */
void kvt_coverage_summary(const float *best, int n_probe, int cut, const uint8_t *probe_mod,
                          const int32_t *probe_pos, double *cov, double *radius, double *cov_mod,
                          double *cov_drop);
/** r of a kept set of n unit keys from their sum [D] (kvt_sweep_redundancy_ref's per-cut
 *  value; NaN for n < 2), shared by every implementation. */
double kvt_redundancy_of_sum(const double *sum, int D, int n);

/** Redundancy r of the kept set at every cut (kvt_redundancy_ref of the mean unit key of
 *  order[0..c)); NaN for c < 2. ku [T, D] unit keys; work [D] doubles; r out [n_cut]. */
kvt_status kvt_sweep_redundancy_ref(const float *ku, int T, int D, const int32_t *order,
                                    const int32_t *cuts, int n_cut, double *work, double *r);

/* ---- Quest (POLICIES §15) ---- */

/** Per-page channel minimum and maximum of the keys; page p covers tokens
 *  [p*P, min((p+1)*P, T)). k [T, D]; kmin, kmax out [n_pages, D], n_pages = ceil(T/P). */
kvt_status kvt_page_bounds_ref(const float *k, int T, int D, int P, float *kmin, float *kmax);

/** Quest upper bound of each page for one query: U[p] = sum_c max(q_c*kmin[p,c],
 *  q_c*kmax[p,c]) (accumulated in double). q [D]; U out [n_pages]. */
void kvt_page_upper_ref(const float *q, const float *kmin, const float *kmax, int n_pages, int D,
                        double *U);

/** Scaled dot products out[j] = <q, k_j> * scale (double accumulation). k [n, D]. */
void kvt_dot_rows_ref(const float *q, const float *k, int n, int D, double scale, double *out);

/* ---- fast CPU variants (kernels/cpu/) and dispatchers ---- */

/** Force the references (true) or the fast CPU variants (false) in the dispatchers. The default
 *  is the fast path unless the environment has KVT_KERNELS=ref. Not thread-safe against
 *  running kernels: call before a replay. */
void kvt_kernels_use_ref(bool ref_only);
bool kvt_kernels_ref_only(void);
/** Set OpenBLAS's thread count to n and return the one before (1 without OpenBLAS). The
 *  kernels set it to 1 on first use, for the whole process: a caller that shares the process's
 *  BLAS with another library (Python's torch) sets it back when it is done. */
int kvt_blas_threads_set(int n);
/** "openblas" or "blocked-c": what the fast CPU variants use for dense products. */
const char *kvt_kernels_cpu_backend(void);
/** The kernel set OpenBLAS should use on this CPU when it fell back to its generic Prescott
 *  kernels because it did not know the CPU model (Debian 12's OpenBLAS 0.3.21 on Intel Emerald
 *  Rapids, say, where the replay's dense products then run ~2x slower): "SkylakeX" with
 *  AVX-512, "Haswell" with AVX2 and FMA; NULL when OpenBLAS chose well, or without OpenBLAS. */
const char *kvt_kernels_blas_better_core(void);
/** Call first thing in a program's main(), before any thread starts. When
 *  kvt_kernels_blas_better_core() names a kernel set, re-executes the program (/proc/self/exe,
 *  the same argv and environment) with OPENBLAS_CORETYPE set to it: OpenBLAS reads that variable
 *  only when it loads, so this is the one way to pick its kernels. Returns without doing
 *  anything when OPENBLAS_CORETYPE is already set (the user's choice, or after the
 *  re-execution), when the program was started through the dynamic loader (`ld.so prog`),
 *  under valgrind (which would not follow the exec), without OpenBLAS, or when the exec fails
 *  (the program goes on with the generic kernels). */
void kvt_kernels_blas_reexec(char **argv);
/** One line on what the CPU's dense products run on, e.g. "OpenBLAS 0.3.21, SkylakeX kernels
 *  (chosen by kvtrace: OpenBLAS did not recognise this CPU)", or the reference loops under
 *  KVT_KERNELS=ref, into buf[cap]
 *  (truncated to fit); returns the length snprintf would. */
size_t kvt_kernels_cpu_describe(char *buf, size_t cap);

/** Row-major C[m,n] = alpha * A[m,k] * op(B) + beta * C, op(B) = B [k,n] or, with b_trans, the
 *  transpose of B [n,k]. OpenBLAS (single-threaded: the replay runs one worker per core) or a
 *  plain loop. */
void kvt_gemm_f64(bool b_trans, int m, int n, int k, double alpha, const double *A, int lda,
                  const double *B, int ldb, double beta, double *C, int ldc);
void kvt_gemm_f32(bool b_trans, int m, int n, int k, float alpha, const float *A, int lda,
                  const float *B, int ldb, float beta, float *C, int ldc);
/** Row-major C[m,n] = alpha * A^T * B + beta * C with A [k,m] and B [k,n]. */
void kvt_gemm_f64_at(int m, int n, int k, double alpha, const double *A, int lda, const double *B,
                     int ldb, double beta, double *C, int ldc);
/** dst[j * ld_dst + i] = src[i * ld_src + j] for i < rows, j < cols (cache-blocked). */
void kvt_transpose_f32_cpu(const float *src, int rows, int cols, size_t ld_src, float *dst,
                           size_t ld_dst);

/** Probability-weighted value sums: out[q][d] = sum_j p[q][j] * v[j][d] (double accumulation).
 *  p rows [n_q] of [T] at p + q*stride_p; v [T, D]; out rows of [D] at out + q*stride_out. */
void kvt_attn_output_ref(const float *p, int n_q, int T, size_t stride_p, const float *v, int D,
                         double *out, size_t stride_out);
kvt_status kvt_attn_output_cpu(const float *p, int n_q, int T, size_t stride_p, const float *v,
                               int D, double *out, size_t stride_out);
kvt_status kvt_attn_output(const float *p, int n_q, int T, size_t stride_p, const float *v, int D,
                           double *out, size_t stride_out);

/** kvt_attn_probs_ref computed with dense products (same arguments and results up to the
 *  summation order of the logits). Allocates its own blocks (KVT_ERR_NOMEM): both blocks'
 *  logits in f64, [n_q, the widest visible prefix] each; `work` is not used. */
kvt_status kvt_attn_probs_cpu(const float *q, int n_q, int D, const float *k, int T,
                              const int *n_vis, const float *k2, int n2, const int *n_vis2,
                              double scale, float *pr, float *pr2, double *lse, double *work);
kvt_status kvt_attn_probs(const float *q, int n_q, int D, const float *k, int T, const int *n_vis,
                          const float *k2, int n2, const int *n_vis2, double scale, float *pr,
                          float *pr2, double *lse, double *work);
/** The zs variants of the fast path and the dispatchers (kvt_attn_probs_zs_ref). */
kvt_status kvt_attn_probs_zs_cpu(const float *q, int n_q, int D, const float *k, int T,
                                 const int *n_vis, const float *k2, int n2, const int *n_vis2,
                                 double scale, float *pr, float *pr2, double *lse, double *zs,
                                 double *work);
kvt_status kvt_attn_probs_zs(const float *q, int n_q, int D, const float *k, int T,
                             const int *n_vis, const float *k2, int n2, const int *n_vis2,
                             double scale, float *pr, float *pr2, double *lse, double *zs,
                             double *work);
/** kvt_attn_probs_again_ref on the fast path, bit for bit what a kvt_attn_probs_zs_cpu call
 *  wrote given the same n_q as well (its dense product's rows); then the dispatcher. */
kvt_status kvt_attn_probs_again_cpu(const float *q, int n_q, int D, const float *k, int T,
                                    const int *n_vis, double scale, const double *zs, float *pr,
                                    double *work);
kvt_status kvt_attn_probs_again(const float *q, int n_q, int D, const float *k, int T,
                                const int *n_vis, double scale, const double *zs, float *pr,
                                double *work);

/** Workspace of kvt_sweep_output_cpu and of the dispatcher kvt_sweep_output (at least
 *  kvt_sweep_output_workspace_bytes). */
size_t kvt_sweep_output_cpu_workspace_bytes(int n_q, int D);
/** kvt_sweep_output_ref with the kept tokens between cuts as dense products. p_t, when not
 *  NULL, holds the same probabilities token-major: token j's n_q values at p_t + j*stride_t
 *  (gathering a kept token then reads one contiguous run); it must equal p exactly. */
kvt_status kvt_sweep_output_cpu(int n_q, int T, int D, const float *p, size_t stride_p,
                                const float *p_t, size_t stride_t, const float *v,
                                const double *a_full, size_t stride_a, const double *p_extra,
                                size_t stride_e, const double *o_extra, const double *r_full,
                                const int32_t *order, const int32_t *cuts, int n_cut,
                                const uint8_t *mod, const double *mass_mod, size_t stride_m,
                                double *recall, double *err, double *recall_mod, void *work);
kvt_status kvt_sweep_output(int n_q, int T, int D, const float *p, size_t stride_p,
                            const float *p_t, size_t stride_t, const float *v, const double *a_full,
                            size_t stride_a, const double *p_extra, size_t stride_e,
                            const double *o_extra, const double *r_full, const int32_t *order,
                            const int32_t *cuts, int n_cut, const uint8_t *mod,
                            const double *mass_mod, size_t stride_m, double *recall, double *err,
                            double *recall_mod, void *work);

/* Element-wise loops of the fast path (vec_cpu.c), vectorised; on x86-64 also built for
 * AVX2 and AVX-512 and picked at load time. */
/** z[j] = exp(z[j] - shift) for j < n, where every z[j] <= shift; returns their sum. Within
 *  1 ulp of libm's exp; 0 where z[j] - shift < -708. */
double kvt_exp_shift_sum_cpu(double *z, int n, double shift);
/** Index of the first non-finite z[j], or -1 with *zmax = max z[j] (-inf when n == 0). */
int kvt_max_finite_cpu(const double *z, int n, double *zmax);
/** out[j] = (float)(z[j] / den). */
void kvt_div_to_f32_cpu(const double *z, int n, double den, float *out);
/** Index of the first non-finite x[i], or n. */
size_t kvt_first_nonfinite_f32_cpu(const float *x, size_t n);
/** Sum of x [n] in double. */
double kvt_sum_f32_cpu(const float *x, size_t n);
/** out[m] = sum of p[j] over the tokens of modality m (codes >= NM count as the last). */
void kvt_mass_by_mod_cpu(const float *p, const uint8_t *mod, int T, double *out);
/** kvt_row_norms_ref and kvt_unit_rows_ref, vectorised (same results up to summation order),
 *  and their dispatchers. */
void kvt_row_norms_cpu(const float *x, int n, int D, double *out);
void kvt_unit_rows_cpu(const float *x, int n, int D, float *ku, double *mean);
void kvt_row_norms(const float *x, int n, int D, double *out);
void kvt_unit_rows(const float *x, int n, int D, float *ku, double *mean);

/** s[x][e] += p[x] * v[e] for x < nu, e < D (s [nu, D] row-major, double; v [D] f32): one
 *  value row into nu query heads' output sums, each weighted by its probability. The fast
 *  variant is bitwise the reference (element-wise, no fused multiply-add). */
void kvt_accum_rows_ref(double *s, int nu, int D, const double *p, const float *v);
void kvt_accum_rows_cpu(double *s, int nu, int D, const double *p, const float *v);
void kvt_accum_rows(double *s, int nu, int D, const double *p, const float *v);
/** out[j * n_q + u] = sum over d = 0..D-1, in that order from 0.0, of
 *  (double)qt[d * n_q + u] * k[j][d]: n_q queries (qt: transposed, [D, n_q]) against n_k f32
 *  keys (k: n_k row pointers), each dot product in double. The fast variant sums four keys
 *  and four queries at a time, bitwise the reference. */
void kvt_dot_queries_ref(const float *qt, int n_q, int D, const float *const *k, int n_k,
                         double *out);
void kvt_dot_queries_cpu(const float *qt, int n_q, int D, const float *const *k, int n_k,
                         double *out);
void kvt_dot_queries(const float *qt, int n_q, int D, const float *const *k, int n_k, double *out);

/** kvt_sweep_coverage_ref and kvt_sweep_redundancy_ref vectorised over probes / dimensions;
 *  bitwise the same results. Then their dispatchers. */
kvt_status kvt_sweep_coverage_cpu(const float *ct, int T, int n_probe, int n_eval,
                                  const int32_t *order, const int32_t *cuts, int n_cut,
                                  const uint8_t *probe_mod, const int32_t *probe_pos, float *work,
                                  double *cov, double *radius, double *cov_mod, double *cov_drop);
kvt_status kvt_sweep_redundancy_cpu(const float *ku, int T, int D, const int32_t *order,
                                    const int32_t *cuts, int n_cut, double *work, double *r);
kvt_status kvt_sweep_coverage(const float *ct, int T, int n_probe, int n_eval, const int32_t *order,
                              const int32_t *cuts, int n_cut, const uint8_t *probe_mod,
                              const int32_t *probe_pos, float *work, double *cov, double *radius,
                              double *cov_mod, double *cov_drop);
kvt_status kvt_sweep_redundancy(const float *ku, int T, int D, const int32_t *order,
                                const int32_t *cuts, int n_cut, double *work, double *r);

/** kvt_cosine_table_ref as one f32 dense product (SGEMM) over the unit keys: the table is f32
 *  in both, and the two differ by a few f32 ulps (summation in f32 instead of double). */
kvt_status kvt_cosine_table_cpu(const float *ku, int T, int D, const int32_t *probe, int n_probe,
                                float *ct);
kvt_status kvt_cosine_table(const float *ku, int T, int D, const int32_t *probe, int n_probe,
                            float *ct);

/** One trace record's elements as stored (traces/FORMAT.md) widened to f32 into their place:
 *  src holds n_heads x n_tok x D elements of dt (KVT_DTYPE_BF16 or KVT_DTYPE_F16) row-major,
 *  or, when planes, as byte planes (the n low bytes, then the n high bytes); element (h, t, d)
 *  goes to dst[h * stride_head + t * D + d]. Bit for bit kvt_convert_to_f32 of the merged
 *  elements. */
kvt_status kvt_widen_stored_ref(kvt_dtype dt, bool planes, const uint8_t *src, int n_heads,
                                int n_tok, int D, size_t stride_head, float *dst);

#ifdef __cplusplus
}
#endif
#endif /* KVT_KERNELS_H */
