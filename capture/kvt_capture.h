/* kvt_capture.h - the capture API: an inference engine opens a capture session, submits its
 * post-RoPE keys, values and queries (per layer, in its own memory layout) plus per-token
 * tables and decode steps, and closes the session, which finishes a .kvt trace. Sits between
 * an engine (the built-in llama2.c engine, the Python binding, later a GPU path) and the
 * trace writer (traces/kvt_trace.h), which copies, compresses and writes on worker threads.
 *
 * Dimension letters: L layers, Hq query heads, Hkv KV heads, T prompt tokens, W window
 * queries, G decode steps, D head dim, B batch (always 1 here).
 */
#ifndef KVT_CAPTURE_H
#define KVT_CAPTURE_H

#include "kvt_common.h"
#include "kvt_trace.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------------------- */
/* Tensor views                                                                          */
/* ------------------------------------------------------------------------------------- */

/** Where a tensor's memory lives. CUDA views are read on the producer's stream (the view's
 *  `stream`): a kernel enqueued there gathers the slice into the session's own device buffers,
 *  so the engine may reuse its memory for anything it enqueues on that stream afterwards, and
 *  the call returns without waiting for the GPU (see kvt_capture_submit_kv). Needs a build with
 *  CUDA and a device (KVT_ERR_NO_CUDA otherwise). */
typedef enum kvt_mem {
    KVT_MEM_HOST = 0,
    KVT_MEM_CUDA = 1,
} kvt_mem;

#define KVT_VIEW_MAX_DIMS 4

/** A borrowed, strided view of an engine's tensor. The logical axis order is fixed:
 *  [H, T, D] (ndim 3) or [B, H, T, D] (ndim 4, B must be 1); the engine's memory layout is
 *  expressed through the strides, so a [B, T, H, D] buffer is passed as shape {1, H, T, D}
 *  with strides {T*H*D, D, H*D, 1}. Strides are in elements (not bytes), may be any value
 *  including 0 and negative, and `data` points at the logical element [0, 0, 0(, 0)].
 *  Borrowed only for the duration of the call that receives it. */
struct kvt_tensor_view {
    const void *data;                  /* element [0,..,0] */
    kvt_dtype dtype;                   /* f32, bf16 or f16 */
    int ndim;                          /* 3 ([H,T,D]) or 4 ([B,H,T,D]) */
    int64_t shape[KVT_VIEW_MAX_DIMS];  /* logical shape */
    int64_t stride[KVT_VIEW_MAX_DIMS]; /* in elements, per logical axis */
    kvt_mem mem;                       /* KVT_MEM_HOST or KVT_MEM_CUDA */
    int device_idx;                    /* CUDA device ordinal (KVT_MEM_CUDA); 0 for host */
    void *stream; /* KVT_MEM_CUDA: the producer's cudaStream_t (NULL: legacy default stream) */
};

/** Fill `v` as a contiguous row-major [H, T, D] host view of `data`. */
void kvt_tensor_view_hTd(struct kvt_tensor_view *v, const void *data, kvt_dtype dtype, int64_t h,
                         int64_t t, int64_t d);

/* ------------------------------------------------------------------------------------- */
/* Session                                                                               */
/* ------------------------------------------------------------------------------------- */

typedef enum kvt_rope_kind {
    KVT_ROPE_NONE = 0,
    KVT_ROPE_DEFAULT = 1, /* rotary on the 1-D position id */
    KVT_ROPE_MROPE = 2,   /* multimodal rotary on 3 position ids (t, h, w) */
} kvt_rope_kind;

/** Which dimensions of a head RoPE rotates together (recorded as model.rope.pairs). */
typedef enum kvt_rope_pairs {
    KVT_ROPE_PAIRS_UNKNOWN = 0,     /* not recorded */
    KVT_ROPE_PAIRS_HALF = 1,        /* (i, i + D/2): HF transformers' rotate_half */
    KVT_ROPE_PAIRS_INTERLEAVED = 2, /* (2i, 2i + 1): llama2.c, Meta's reference code */
} kvt_rope_pairs;

/** The model whose cache is captured. Strings are copied at open. */
struct kvt_capture_model {
    const char *name;   /* e.g. "stories260K" */
    const char *arch;   /* e.g. "llama" */
    int n_layers;       /* L */
    int n_q_heads;      /* Hq */
    int n_kv_heads;     /* Hkv; Hq must be a multiple */
    int head_dim;       /* D */
    kvt_dtype kv_dtype; /* dtype stored in the trace for K, V and queries (f32/bf16/f16) */
    kvt_rope_kind rope; /* positional encoding, recorded in the header */
    double rope_theta;  /* RoPE base, finite and > 0; 0 when not applicable or not known */
    double attn_scale;  /* softmax scale, finite and > 0; 0 = 1/sqrt(D) */
    const char *engine_name;
    const char *engine_version;
    const char *gpu; /* device name, NULL on CPU (header "gpu": null) */
    /* Optional RoPE details, recorded in model.rope when set (zero: not recorded). Replaying
       a policy that needs pre-RoPE queries (expected-attention) needs rope_pairs. */
    kvt_rope_pairs rope_pairs;
    const double *rope_inv_freq;   /* [head_dim/2] frequencies of the pairs as the model uses
                                      them (scaled RoPE included); NULL: theta^(-2i/D) */
    double rope_attention_scaling; /* the factor on cos and sin (HF's attention_scaling; 0: 1) */
    int mrope_section[3];          /* M-RoPE: pairs in the t, h, w sections (sum head_dim/2) */
};

/** Capture settings. */
struct kvt_capture_opts {
    uint32_t n_tokens;          /* T: prompt tokens that will be submitted (>= 1) */
    uint32_t window;            /* W: last prompt queries kept as Q_window (1 <= W <= T) */
    uint32_t n_decode;          /* G planned: upper bound on decode steps (0 = no decode) */
    uint32_t decode_chunk;      /* decode steps per record (0 = 64, capped at n_decode) */
    bool with_colsum;           /* compute attn_colsum [Hq,T] from all prompt queries (causal) */
    bool with_q_all;            /* also store every prompt query as Q_all [Hq,T,D] */
    const char *capture_json;   /* optional JSON object merged into the header's "capture";
                                   its keys may not be the session's own (api, with_colsum,
                                   with_q_all, decode_chunk, zstd_level, byteplane) */
    kvt_writer_opts writer;     /* compression level, threads, memory bound, force */
    uint64_t device_ring_bytes; /* device views: device ring in slots of
                                   writer.max_record_bytes (0 = 256 MiB), and four times as much
                                   pinned host memory (as much where that cannot be pinned) */
};

/** Counters of a session, also written as the trace's final meta_json record. */
struct kvt_capture_stats {
    uint64_t n_submits;       /* successful submit calls */
    uint64_t bytes_submitted; /* bytes handed to the writer (stored dtype) */
    uint64_t stall_ns;        /* time submissions waited for the writer (backpressure) */
    uint64_t colsum_ns; /* time spent on column sums by the submitting thread (not in meta_json;
                           with device views: queuing the kernels and copying the sums back) */
    uint32_t n_decode;  /* decode steps captured in every layer (real G) */
    kvt_writer_stats writer; /* records, raw/compressed/file bytes */
    /* device views only (0 otherwise) */
    uint64_t device_d2h_bytes;  /* copied from the device ring to pinned host memory */
    uint64_t device_stall_ns;   /* submissions waiting for a free ring slot (backpressure) */
    uint64_t device_bytes;      /* peak device memory held by the capture (ring, buffers) */
    uint64_t pinned_bytes;      /* pinned host memory held by the capture */
    uint32_t device_peak_slots; /* most ring slots in flight at once */
    uint32_t device_slots;      /* ring slots */
    /* device views on another GPU than the session's first (a model split over GPUs): bytes
       copied to host memory and captured from there */
    uint64_t other_device_bytes;
};

/** A capture session. Not thread-safe: the engine serialises its calls (the writer behind it
 *  compresses and writes on its own threads). Every submission gathers the view into the
 *  stored dtype and hands it to the writer, which copies it; the caller's memory is free
 *  again when the call returns. With column sums, the session keeps each layer's keys in
 *  f32 ([Hkv, T, D]) from its first K/V submission until its queries are complete. */
typedef struct kvt_capture_session kvt_capture_session;

/** Open a capture session and write the trace's header.
 * @param path  output trace; an existing file is an error unless opts->writer.force.
 * @param model model description (copied).
 * @param opts  capture settings (copied).
 * @param out   receives the session; the caller ends it with kvt_capture_close.
 * @return KVT_OK; KVT_ERR_INVALID_ARG (bad model/opts, message says which field);
 *         KVT_ERR_IO (cannot create the file); KVT_ERR_NOMEM. */
kvt_status kvt_capture_open(const char *path, const struct kvt_capture_model *model,
                            const struct kvt_capture_opts *opts, kvt_capture_session **out);

/** Per-token tables of the prompt, each [T] (positions [P, T] row-major), written at once.
 *  Any pointer may be NULL, and the call itself is optional: at close, missing positions are
 *  written as 0..T-1 (P = 1; M-RoPE positions are never invented) and missing modality as
 *  all text, and meta_json lists them under "defaulted_tables"; missing token ids are absent.
 *  At most once per session, before the first decode step.
 * @param token_ids  [T] i32 or NULL.  @param modality [T] u8 (kvt_modality) or NULL.
 * @param positions  [P, T] i32 or NULL.  @param n_pos_rows P: 1, or 3 for M-RoPE.
 * @return KVT_OK; KVT_ERR_STATE (already set, or decode started); KVT_ERR_INVALID_ARG;
 *         the session's sticky write error. */
kvt_status kvt_capture_set_tokens(kvt_capture_session *s, const int32_t *token_ids,
                                  const uint8_t *modality, const int32_t *positions,
                                  int n_pos_rows);

/** Prompt keys and values of one layer for tokens [tok_begin, tok_begin + n), where n is the
 *  view's T extent. Per layer, token ranges must arrive in order with no gap (tok_begin equals
 *  the tokens already submitted for that layer); layers may interleave freely (whole prompt
 *  per layer, or ubatch by ubatch). Both views must be [(1,) Hkv, n, D].
 * @return KVT_OK; KVT_ERR_INVALID_ARG (shape/dtype/layer); KVT_ERR_STATE (out of order, or
 *         decode started); the sticky write error (KVT_ERR_IO...) after a failed write. */
kvt_status kvt_capture_submit_kv(kvt_capture_session *s, int layer, uint32_t tok_begin,
                                 const struct kvt_tensor_view *k, const struct kvt_tensor_view *v);

/* Device views (KVT_MEM_CUDA), in every submit call: the slice is gathered, converted to
 * kv_dtype and byte-plane split by a kernel on the view's stream into the session's device ring
 * (one slot per trace record), copied to pinned host memory on a side stream, and handed to the
 * writer once copied; the call does not wait for the GPU unless every slot is in flight
 * (stats.device_stall_ns), except at a layer's last query range with column sums (the sums are
 * copied to the host) and at each decode chunk's flush (the chunk is copied to the host). The
 * session's ring is on the first device view's CUDA device; a view on another device (a model
 * split over several GPUs: the layers on the others) is copied to host memory once the work
 * queued on its stream is done, and captured from there as a host view: the same records, but
 * the call waits for that GPU (stats.other_device_bytes counts them), and with column sums those
 * layers' sums are computed on the CPU (slow at long prompts: with_q_all and the replay's sums
 * are the alternative). Column sums run on the GPU (keys kept as f32 on the device until the
 * layer's queries are complete; a layer's keys and queries must then both be device or both
 * host views). Decode steps are gathered into device chunks and copied at each chunk's flush.
 * A CUDA failure is sticky like a write error. Errors: KVT_ERR_NO_CUDA (built without CUDA, no
 * device), KVT_ERR_CUDA. */

/** Prompt queries of one layer for tokens [tok_begin, tok_begin + n), view [(1,) Hq, n, D].
 *  The session keeps those in the last W positions as Q_window, stores them all as Q_all if
 *  asked, and, with column sums, accumulates the causal softmax of each query over keys
 *  0..its position, which must therefore already have been submitted for this layer. The
 *  first range of a layer may start anywhere at or before T - W (at 0 with column sums or
 *  Q_all); later ranges continue without a gap. Column sums use the engine's values (before
 *  rounding to kv_dtype), f32 logits and f64 sums, one T-long row of scratch, O(T^2 Hq D)
 *  work on the calling thread; a layer's sums are written when its last query arrives.
 * @return as kvt_capture_submit_kv. */
kvt_status kvt_capture_submit_queries(kvt_capture_session *s, int layer, uint32_t tok_begin,
                                      const struct kvt_tensor_view *q);

/** KVzip's scores of one layer (the kvzip_score record, traces/FORMAT.md): host f32
 *  [Hkv, T] row-major, for each prompt key the largest attention it received in the engine's
 *  context-reconstruction pass. Once per layer, at any time before close; copied.
 * @return as kvt_capture_submit_kv; KVT_ERR_INVALID_ARG (a score not in [0, 1], NaN included);
 *         KVT_ERR_STATE (the layer's scores given twice). */
kvt_status kvt_capture_submit_kvzip(kvt_capture_session *s, int layer, const float *score);

/** One or more decode steps of one layer: steps [step, step + n) where n is the views' T
 *  extent; q is [(1,) Hq, n, D], k and v [(1,) Hkv, n, D]. Allowed once every layer's prompt
 *  K, V and queries are complete; per layer, steps arrive in order. Steps are buffered per
 *  layer and written as Q_decode/K_decode/V_decode records every decode_chunk steps and at
 *  close (a crash loses at most the unwritten chunk).
 * @return as kvt_capture_submit_kv; KVT_ERR_INVALID_ARG past the planned n_decode. */
kvt_status kvt_capture_submit_decode(kvt_capture_session *s, int layer, uint32_t step,
                                     const struct kvt_tensor_view *q,
                                     const struct kvt_tensor_view *k,
                                     const struct kvt_tensor_view *v);

/** The input token of decode step `step` (the token at position T + step). Steps in order. */
kvt_status kvt_capture_submit_decode_token(kvt_capture_session *s, uint32_t step, int32_t token_id);

/** Snapshot of the counters. */
void kvt_capture_get_stats(kvt_capture_session *s, struct kvt_capture_stats *out);

/** Timeline summary of the captured GPU run (from CUPTI, see kvt_timeline_start), written to
 *  the trace's final meta_json as "timeline" and shown by `kvtrace info`. Kernel times are
 *  sums of kernel durations (concurrent kernels each count); categories by kernel name
 *  (kvt_timeline_category); overlap counts kernels of the copy's own CUDA context (its
 *  device) only. n_memcpy counts each copy of a batched copy record. */
typedef struct kvt_capture_timeline {
    uint64_t n_kernels;
    uint64_t attention_ns, gemm_ns, other_ns;     /* GPU time by kernel category */
    uint64_t n_memcpy, memcpy_bytes, memcpy_ns;   /* every copy (host<->device, device<->device) */
    uint64_t capture_copy_bytes, capture_copy_ns; /* the capture's own copies (a subset) */
    uint64_t capture_copy_overlap_ns;             /* of those, time during which some kernel ran */
} kvt_capture_timeline;

/** Attach a timeline summary; the last call wins. */
kvt_status kvt_capture_set_timeline(kvt_capture_session *s, const kvt_capture_timeline *t);
/** Say why the trace has no timeline (one line, e.g. "CUPTI: no NVIDIA driver"); the
 *  default for a session given neither is "not collected by this engine". */
kvt_status kvt_capture_set_timeline_absent(kvt_capture_session *s, const char *reason);

/** The file the session writes (kvt_trace_writer_file): its path, or with writer.force over
 *  an existing trace the temporary file that a complete close renames over it. Valid until
 *  kvt_capture_close. */
const char *kvt_capture_file(const kvt_capture_session *s);

/** The CUDA stream (a cudaStream_t) on which the session copies device tensors to the host:
 *  its own, created with the first device tensor; NULL before that or without CUDA. For
 *  kvt_timeline_stream_id, so that a CUPTI timeline counts those copies as the capture's. */
void *kvt_capture_device_stream(const kvt_capture_session *s);

/** Allocate, before the model runs, the device ring and pinned host memory that the next
 *  session capturing device tensors on `device` would allocate at its first device tensor
 *  (ring_bytes and max_record_bytes as in its options, 0 for the defaults): that session takes
 *  them instead, so the first forward pass does not wait while host memory is pinned. One
 *  reservation per process; another size or device replaces it. Thread-safe.
 * @return KVT_OK; KVT_ERR_NO_CUDA (no CUDA build or device); KVT_ERR_INVALID_ARG; KVT_ERR_CUDA
 *         (out of device or pinned memory). */
kvt_status kvt_capture_reserve_device(int device, uint64_t ring_bytes, uint64_t max_record_bytes);
/** Free a reservation that no session took (none: nothing happens). */
void kvt_capture_release_device_reserve(void);
/** Bytes of device ring held by the reservation (0: none, or a session took it). */
uint64_t kvt_capture_device_reserved_bytes(void);

/** Wait until every device-to-host copy the session queued is done (their records go to the
 *  writer) and the session's device has finished all work. Call it before kvt_timeline_stop:
 *  CUPTI's flush returns complete records only for finished work. KVT_OK at once for a session
 *  without device tensors; a CUDA failure is the session's sticky error. */
kvt_status kvt_capture_sync_device(kvt_capture_session *s);

/** Finish and free the session: flush buffered decode steps, write the token tables if they
 *  were not given, a meta_json record with the statistics, the index and the trailer. The
 *  session is freed whatever the result.
 *  - If an earlier write failed, nothing more is written: the file ends at its last complete
 *    record (readable, recovered by a forward scan) and the sticky error is returned.
 *  - If the prompt is incomplete (a layer lacks K, V or queries), the trace is still
 *    finished with what was submitted, its meta_json says "complete": false, and
 *    KVT_ERR_STATE is returned; `kvtrace verify` lists what is missing.
 * @param stats may be NULL; receives the final counters.
 * @return KVT_OK; KVT_ERR_STATE; the sticky write error; KVT_ERR_IO. */
kvt_status kvt_capture_close(kvt_capture_session *s, struct kvt_capture_stats *stats);

/* ------------------------------------------------------------------------------------- */
/* Summaries (exposed for tests and other engines)                                       */
/* ------------------------------------------------------------------------------------- */

/** Causal attention column sums of one layer, reference implementation (plain loops, f32
 *  logits, f64 accumulation, one query row of scratch: no T x T matrix).
 *  colsum[h][j] += sum over queries i in [q_begin, q_begin + n_q) with i >= j of
 *  softmax_j'(<=i)(scale * q[h][i] . k[h / (Hq/Hkv)][j']) evaluated at j.
 * @param q      [Hq, n_q, D] f32, query i at row i - q_begin.
 * @param k      [Hkv, n_k, D] f32 with n_k >= q_begin + n_q.
 * @param colsum [Hq, n_k] f64 accumulator (caller zeroes it once).
 * @param scratch n_k floats. */
void kvt_colsum_accumulate_ref(const float *q, const float *k, double *colsum, int n_q_heads,
                               int n_kv_heads, uint32_t q_begin, uint32_t n_q, uint32_t n_k,
                               int head_dim, float scale, float *scratch);

/** One GPU activity for kvt_timeline_summarize: a kernel (name) or a copy (bytes, in all;
 *  n_copies: the copies one batched record stands for, 0 counting as 1; capture: a copy the
 *  capture made itself). Times in ns on one clock. context: the CUDA context it ran in
 *  (CUPTI's context id; 0 for all when there is one): a copy overlaps only the kernels of its
 *  own context, which run on the same device. */
typedef struct kvt_timeline_event {
    uint64_t start_ns, end_ns;
    bool is_copy;
    bool capture;
    uint64_t bytes;
    const char *name;
    uint32_t context;
    uint64_t n_copies;
} kvt_timeline_event;

enum { KVT_TL_ATTENTION = 0, KVT_TL_GEMM = 1, KVT_TL_OTHER = 2 };
/** Category of a kernel by its (mangled or demangled) name, case-insensitive substrings:
 *  attention ("attn", "attention", "flash", "fmha", "sdpa", "softmax", "paged"; in a name that
 *  says "flashinfer" instead "attn", "attention", "fmha", "paged", "kvcache", "prefill",
 *  "decode", so that FlashInfer's norms, all-reduce and sampling are not attention), then GEMM
 *  ("gemm", "gemv", "cutlass", "xmma", "cublas", "matmul", "nvjet": cuBLAS's Hopper GEMMs),
 *  else other. */
int kvt_timeline_category(const char *name);
/** Sum events into t (zeroed first). Overlap: the time of each capture copy during which at
 *  least one kernel of the copy's context ran (kernel intervals merged per context first).
 *  Events need not be sorted. Allocates a sorted copy of the kernel intervals
 *  (KVT_ERR_NOMEM). */
kvt_status kvt_timeline_summarize(const kvt_timeline_event *ev, size_t n, kvt_capture_timeline *t);

/** A CUPTI activity collector (kernels and copies of every CUDA context of the process).
 *  CUPTI is loaded at run time (dlopen), so a machine without it or without a GPU runs the
 *  capture without a timeline. Returns NULL, with a one-line reason in why[cap], when CUPTI
 *  cannot be used (not built in, library or driver missing, a libcupti of another major
 *  version or lacking a function, another CUPTI client attached: Nsight Systems/Compute,
 *  cuda-gdb, compute-sanitizer, torch.profiler: named as CUPTI names it where its
 *  cuptiSubscribe_v2 does); hand that reason to kvt_capture_set_timeline_absent. The
 *  collector holds CUPTI's only subscriber (named "kvtrace") from start to
 *  stop, so a profiler started meanwhile (torch.profiler included) cannot attach: its own
 *  start fails, and torch.profiler does not retry. torch.profiler holds CUPTI from its first
 *  use to the end of the process, so a timeline after it is refused. */
typedef struct kvt_timeline kvt_timeline;
kvt_timeline *kvt_timeline_start(char *why, size_t cap);
/** CUPTI's ids of a CUDA stream (a cudaStream_t / CUstream passed as void *): its context's
 *  and its own, which is unique only within that context. For kvt_timeline_stop's
 *  capture_context and capture_stream. KVT_ERR_NOT_FOUND when the driver or CUPTI does not
 *  know the stream (the default stream without a current context). */
kvt_status kvt_timeline_stream_id(kvt_timeline *tl, void *stream, uint32_t *context_id,
                                  uint32_t *stream_id);
/** Stop collecting and summarise; copies on CUPTI's stream capture_stream of context
 *  capture_context (kvt_timeline_stream_id; capture_stream 0 = none) count as the capture's
 *  own, and their overlap counts kernels of that context only. Frees the collector.
 *  Synchronise first (a capture: kvt_capture_sync_device): activity still running on the GPU
 *  is missing or incomplete.
 * @return KVT_OK; KVT_ERR_STATE when the summary would be short: CUPTI dropped records, or
 *  delivered incomplete or invalid ones (work still running); KVT_ERR_NOMEM;
 *  KVT_ERR_INVALID_ARG (no collector). The message says which. */
kvt_status kvt_timeline_stop(kvt_timeline *tl, uint32_t capture_context, uint32_t capture_stream,
                             kvt_capture_timeline *out);

#ifdef __cplusplus
}
#endif
#endif /* KVT_CAPTURE_H */
