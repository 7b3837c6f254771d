/* kvt_replay.h - the replay engine: configured compression policies, budget lists, the
 * per-layer context shared by all policies, per-head selections (a ranking plus a cut per
 * budget), the budget sweep that measures every budget from one ranking, and the trace driver
 * that runs layer by layer on a thread pool. Sits between traces/ + kernels/ (below) and
 * analysis/ (which aggregates and writes results.json). Policy definitions:
 * ../shared/POLICIES.md; metric definitions: analysis/RESULTS.md.
 *
 * Letters: L layers, Hq query heads, Hkv KV heads, T prompt tokens, W stored window queries,
 * G decode steps, D head dim. A budget B is the number of entries kept per head per layer,
 * the policy's observation window included (the published convention).
 */
#ifndef KVT_REPLAY_H
#define KVT_REPLAY_H

#include "kvt_common.h"
#include "kvt_kernels.h"
#include "kvt_trace.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------------------- */
/* Budgets                                                                               */
/* ------------------------------------------------------------------------------------- */
typedef struct kvt_budget {
    bool is_fraction; /* written as "10%" */
    double value;     /* tokens, or the fraction of T in (0, 1] */
    char text[24];    /* as written, e.g. "64" or "10%" */
} kvt_budget;

/** Parse "64,128,10%,12.5%". Tokens must be integers >= 1, fractions in (0%, 100%].
 * @param out caller frees with kvt_free. @return KVT_OK or KVT_ERR_INVALID_ARG. */
kvt_status kvt_budgets_parse(const char *list, kvt_budget **out, size_t *n_out);

/** Tokens of a budget for a prompt of T tokens: the value itself, or max(1, floor(f*T + 0.5))
 *  for a fraction f, computed exactly from the decimal text ("20.5%" of 300 is 62). */
int kvt_budget_tokens(const kvt_budget *b, int n_tokens);

/* ------------------------------------------------------------------------------------- */
/* Policies                                                                              */
/* ------------------------------------------------------------------------------------- */
typedef struct kvt_policy kvt_policy;

/* kvt_policy_flags() bits */
#define KVT_POLICY_PER_STEP     0x1u   /* re-selects at every decode step (quest, hybridkv-like) */
#define KVT_POLICY_MERGED       0x2u   /* keeps merged K/V, not a subset (lightkv-like) */
#define KVT_POLICY_LIKE         0x4u   /* an offline emulation with no public reference ("-like") */
#define KVT_POLICY_NEEDS_DECODE 0x8u   /* needs Q_decode (oracle, quest) */
#define KVT_POLICY_NEEDS_COLSUM 0x10u  /* needs attn_colsum or Q_all (h2o) */
#define KVT_POLICY_WINDOW_QUERY 0x20u  /* ranks by the window queries: window >= 1 (snapkv, ...) */
#define KVT_POLICY_NEEDS_QALL   0x40u  /* needs Q_all (expected-attention, noncausal-attention) */
#define KVT_POLICY_NEEDS_ROPE   0x80u  /* needs the header's model.rope (expected-attention) */
#define KVT_POLICY_PER_BUDGET   0x100u /* a ranking per budget: sets not nested (keydiff-block) */
/* gives each layer its own budget (pyramidkv, cake, ...): takes no layer_weights= */
#define KVT_POLICY_LAYER_BUDGETS 0x200u
/* chunk_length=: the budget shared over chunks of the prompt, each keeping at least a token */
#define KVT_POLICY_CHUNKED 0x400u
/* decoding=, dms_decoding=1, h2o-greedy's decode=1: its per-step sets hold decode tokens too
   (indices T + s), some evicted */
#define KVT_POLICY_DECODE_EVICT 0x800u

/** Global defaults that a policy spec may override. */
typedef struct kvt_policy_globals {
    uint64_t seed;       /* for `random` (spec option seed=) */
    bool per_query_head; /* default heads=query instead of heads=kv */
    int window;          /* > 0: window= of every KVT_POLICY_WINDOW_QUERY policy whose spec
                            does not set it (replay --window) */
} kvt_policy_globals;

/** Create a policy from a spec "name[:key=value,key=value...]", e.g.
 *  "snapkv:window=32,kernel=7,pool=max". Unknown names or keys, or bad values, fail with a
 *  message that lists the accepted ones. Files named by options (sparsemm scores=, mixkv
 *  rtable=) are read here. @param g may be NULL. @param out free with kvt_policy_free.
 * @return KVT_OK, KVT_ERR_INVALID_ARG, KVT_ERR_IO, KVT_ERR_CORRUPT, KVT_ERR_NOMEM. */
kvt_status kvt_policy_create(const char *spec, const kvt_policy_globals *g, kvt_policy **out);
void kvt_policy_free(kvt_policy *p);

/** Parse a list "snapkv,adakv:alpha=0.2,snapkv:kernel=7,pool=max": a comma-separated item with
 *  '=' and no ':' is an option of the policy before it. Labels must be unique.
 * @param out array of n policies; free with kvt_policy_list_free. */
kvt_status kvt_policy_list_parse(const char *list, const kvt_policy_globals *g, kvt_policy ***out,
                                 size_t *n_out);
void kvt_policy_list_free(kvt_policy **p, size_t n);

/** CLI name ("snapkv"). Owned by the policy. */
const char *kvt_policy_name(const kvt_policy *p);
/** The spec as given ("snapkv:kernel=7"), used to tell runs apart. Owned by the policy. */
const char *kvt_policy_label(const kvt_policy *p);
unsigned kvt_policy_flags(const kvt_policy *p);
/** true if the policy selects per query head (heads=query), false per KV head. */
bool kvt_policy_per_query_head(const kvt_policy *p);
/** true if the policy's files describe one trace, so that it replays that trace alone
 *  (external with scores=FILE.npy; scores=DIR has a file per trace). */
bool kvt_policy_one_trace(const kvt_policy *p);
/** The file that describes the trace at `trace` for this policy, into buf[cap] (external
 *  with scores=DIR: DIR/NAME.npy for NAME.kvt); false when it has none per trace. Two traces
 *  that give the same file would share it: kvtrace replay refuses them. */
bool kvt_policy_trace_file(const kvt_policy *p, const char *trace, char *buf, size_t cap);
/** Every option with its effective value, as a JSON object text. Caller frees with kvt_free. */
char *kvt_policy_options_json(const kvt_policy *p);

/** The registry (for --help): name, one-line summary, options with defaults. */
typedef struct kvt_policy_about {
    const char *name;
    const char *summary;
    const char *options; /* "window=32,kernel=5,pool=avg,reduce=mean,heads=kv" */
    unsigned flags;
} kvt_policy_about;
size_t kvt_policy_registry_size(void);
void kvt_policy_registry_get(size_t i, kvt_policy_about *out);

/* ------------------------------------------------------------------------------------- */
/* One layer in memory                                                                   */
/* ------------------------------------------------------------------------------------- */
/** The tensors of one layer, f32, borrowed for the duration of a call. */
/** RoPE as a trace header's model.rope records it (traces/FORMAT.md), for policies that work on
 *  pre-RoPE queries (expected-attention). Pair i of a head turns by position * freq_i, with
 *  freq_i = inv_freq[i] or theta^(-2i/D); with M-RoPE the position is the t, h or w id of the
 *  section that holds pair i. */
typedef struct kvt_rope_info {
    int type;                 /* 0 none, 1 default (1-D), 2 mrope */
    int pairs;                /* 0 unknown, 1 half (i, i + D/2), 2 interleaved (2i, 2i + 1) */
    double theta;             /* base of the frequencies */
    const double *inv_freq;   /* [D/2] or NULL */
    double attention_scaling; /* the factor on cos and sin (0: 1) */
    int mrope_section[3];     /* M-RoPE: pairs in the t, h, w sections */
} kvt_rope_info;

typedef struct kvt_layer_input {
    int layer, n_layers;
    int T, D, Hq, Hkv;
    int W;              /* stored window queries */
    int G;              /* decode steps captured (0 if none) */
    double scale;       /* softmax scale of the logits; 0 = 1/sqrt(D) */
    const float *k, *v; /* [Hkv, T, D] post-RoPE keys, values */
    /* Or, instead of k and v (both NULL then): K and V as a trace stores them, [Hkv, T, D]
     * elements of k16_dtype (KVT_DTYPE_BF16 or KVT_DTYPE_F16). With the CUDA device they are
     * uploaded as they are (half the bytes) and widened there, and the host's f32 copies are
     * made only for the policies and metrics that read K or V on the host; on the host they are
     * widened first. Either way the results equal those from k and v widened beforehand. */
    const uint16_t *k16, *v16;
    kvt_dtype k16_dtype;
    /* Or K and V as a trace stores them (k16_dtype set, k and v NULL): k16 holds K's first
     * n_k_pieces records back to back, each described by a piece (kvt_trace_reader_read_sink:
     * its rectangle, its byte offset, byte planes not merged), v16 V's first n_v_pieces; and
     * kv_rest, when not NULL, reads the records after those (kv_rest(kv_user, KVT_KIND_K or
     * KVT_KIND_V, first record, sink): kvt_trace_reader_read_sink's contract). `replay --device
     * cuda` decompresses those into pinned memory as the GPU context starts, with no host copy
     * of the tensor, and merges the byte planes where it widens the elements. Each tensor's
     * pieces and records must cover its [Hkv, T] rows once. */
    const kvt_trace_piece *k_pieces, *v_pieces;
    size_t n_k_pieces, n_v_pieces;
    kvt_status (*kv_rest)(void *user, int kind, size_t first, const kvt_trace_sink *sink);
    void *kv_user;
    const float *q_window;            /* [Hq, W, D] last W prompt queries */
    const float *q_decode;            /* [Hq, G, D] or NULL */
    const float *k_decode, *v_decode; /* [Hkv, G, D] or NULL (both or neither) */
    const float *attn_colsum;         /* [Hq, T] or NULL */
    const float *q_all;               /* [Hq, T, D] or NULL */
    const uint8_t *modality;          /* [T] kvt_modality codes or NULL */
    /* Optional instead of q_all: load query head h's Q_all [T, D] into dst on demand, so that
     * only one head's queries are in memory (used for H2O column sums; kvt_replay_trace reads
     * them from the trace this way). */
    kvt_status (*q_all_head)(void *user, int h, float *dst);
    void *q_all_user;
    const int32_t *positions;  /* [n_pos_rows, T] prompt position ids, or NULL (0..T-1) */
    int n_pos_rows;            /* rows of positions: 1, or 3 with M-RoPE */
    const kvt_rope_info *rope; /* or NULL: not known */
    int cuda_device;           /* with KVT_DEVICE_CUDA: the CUDA device the layer runs on (0..) */
} kvt_layer_input;

/** Metrics of one (policy, budget, layer, head); NaN = not applicable (written as null).
 *  Definitions in analysis/RESULTS.md. */
typedef struct kvt_head_metrics {
    double n_keep;        /* measured kept entries (mean over decode steps if per-step) */
    double recall_window; /* attention mass kept, mean over window queries of the head */
    double err_window;    /* ||o_S - o|| / ||o|| on window queries */
    double recall_decode; /* same on held-out decode queries */
    double err_decode;
    double coverage;         /* mean over probe keys of the best cosine to a kept key */
    double coverage_radius;  /* max over probe keys of 1 - best cosine */
    double coverage_dropped; /* coverage over the probe keys not kept */
    double head_overlap;     /* mean Jaccard of the kept set with the layer's other heads' */
    double r_kept;           /* head redundancy of the kept keys */
    double oracle_overlap;   /* |S & O| / |O|, O = oracle's set at the same budget */
    double n_keep_mod[KVT_N_MODALITIES];
    double recall_window_mod[KVT_N_MODALITIES];
    double coverage_mod[KVT_N_MODALITIES];
    double r_kept_mod[KVT_N_MODALITIES]; /* head redundancy of the kept keys of each modality */
} kvt_head_metrics;

/** One exported kept set (analysis/RESULTS.md "Selection export"). */
typedef struct kvt_selection_rec {
    int policy, budget, layer, head;
    int step;           /* -1: the set kept for the prompt; >= 0: decode step (per-step) */
    const int32_t *idx; /* kept token indices, ascending; valid during the sink call */
    size_t n;
    /* a merged set's entries (KVT_POLICY_MERGED; NULL otherwise): changed [n] is 1 where entry
       idx[e] holds merged K and V, which k and v [n_changed, D] give in entry order */
    const uint8_t *changed;
    const float *k, *v;
} kvt_selection_rec;

/** Receives the kept sets of one layer, in one or more calls (called from worker threads,
 *  possibly out of layer order, each layer's calls from one thread in turn; the callee
 *  serialises layers). The layer's last call has last = true (it may hold no records). A call
 *  holds whole steps of (policy, head) pairs: for each step it covers (-1, the prompt-time set,
 *  comes with step 0 where the head has steps), every budget's record, budgets ascending; a
 *  pair's steps come in ascending order over the calls. The replay hands over at most about
 *  KVT_SELECTION_CHUNK indices a call (more only by the records of one step, two for a head's
 *  prompt-time set and its step 0), so a layer with many decode-time caches is never held
 *  whole. Return non-OK to stop the replay. */
typedef kvt_status (*kvt_selection_sink)(void *user, int layer, const kvt_selection_rec *recs,
                                         size_t n_recs, bool last);
/** Indices (plus records and merged values' floats) the replay gathers for one sink call */
#define KVT_SELECTION_CHUNK ((size_t)1 << 20)

/** Where the layer context (attention probabilities and outputs, norms, unit keys) and the
 *  recall/output-error, coverage and redundancy sweeps run: on the host, or on CUDA devices
 *  with the kernels of kernels/cuda (which also rank long prompts' scores; the policies' own
 *  logic runs on the host either way). kvt_replay_trace with CUDA spreads the workers' layers
 *  over the devices of kvt_replay_opts.cuda_devices (every visible one by default), each layer
 *  on one device. AUTO: CUDA when a device is usable, else the host.
 *  kvt_replay_trace with CUDA checks for a device itself, while its workers read their first
 *  layers (KVT_ERR_NO_CUDA, "no usable CUDA device (...)", without one). */
typedef enum kvt_device { KVT_DEVICE_CPU = 0, KVT_DEVICE_CUDA = 1, KVT_DEVICE_AUTO = 2 } kvt_device;
#define KVT_MAX_CUDA_DEVICES 64 /* kvt_replay_opts.cuda_devices' bits */

/** Resolve a requested device: AUTO becomes CUDA or CPU (why[cap] says why not CUDA); CUDA
 *  without a usable device (or without CUDA in the build) is KVT_ERR_NO_CUDA with the reason. */
kvt_status kvt_replay_resolve_device(kvt_device want, kvt_device *got, char *why, size_t cap);

/** For a program done with the GPU (after its last CUDA replay): releases what the process holds
 *  on the CUDA devices its replays used (cudaDeviceReset of each: device memory, streams, the
 *  context), which CUDA would otherwise do at exit (0.13-0.19 s after a replay on an H200).
 *  Called on a thread while the program writes its results, the teardown overlaps them.
 *  Nothing may use those devices in this process during or after the call: other libraries'
 *  CUDA state on them (a framework's tensors) is lost too. KVT_OK without CUDA in the build
 *  (nothing to release). */
kvt_status kvt_replay_release_device(void);
/** "cpu", "cuda" or "auto". */
const char *kvt_device_name(kvt_device d);

/** The kinds of kernels booked as sweeps (kvt_replay_profile.gpu_sweep_kind_ns): recall and
 *  output-error sweeps; coverage (cosine tables and each cut's bests); the kept sets'
 *  redundancy; scores (SnapKV's window scores, the oracle's decode means); rankings. */
enum {
    KVT_GPU_SWEEP_OUTPUT,
    KVT_GPU_SWEEP_COVERAGE,
    KVT_GPU_SWEEP_REDUNDANCY,
    KVT_GPU_SWEEP_SCORES,
    KVT_GPU_SWEEP_RANK,
    KVT_GPU_SWEEP_KINDS
};

/** Where a replay's time goes (replay --profile), summed over the workers (so the parts can
 *  exceed the wall time). The gpu_* fields are filled with --device cuda; their byte counts
 *  are what the kernels must read and write at least (inputs once, outputs once), so
 *  bytes / ns is the bandwidth achieved against the device's memory roofline. */
typedef struct kvt_replay_profile {
    uint64_t wall_ns;
    uint64_t read_ns;    /* reading, decompressing and converting the trace's tensors */
    uint64_t context_ns; /* building layer contexts (attention, norms; GPU parts included) */
    uint64_t measure_ns; /* policies, rankings and sweeps (with the GPU's window scores and
                            column sums, which policies ask for) */
    uint64_t n_layers;
    /* --device cuda: kernels and copies by CUDA events around each call's kernels and each
       copy (the GPU's own time, read once the stream has passed them: the profile adds no
       wait); bytes: at least what each must move */
    uint64_t gpu_upload_ns, gpu_upload_bytes; /* host to device */
    uint64_t gpu_attn_ns, gpu_attn_bytes;     /* attention probabilities and outputs */
    uint64_t gpu_norm_ns, gpu_norm_bytes;   /* 16-bit K and V widened, their finite check, key/value
                                               norms and unit keys */
    uint64_t gpu_sweep_ns, gpu_sweep_bytes; /* recall/error sweeps, coverage (cosine tables and
                                               bests), SnapKV window scores */
    uint64_t gpu_sweep_calls;               /* output sweeps and coverage-best calls */
    uint64_t gpu_download_ns, gpu_download_bytes; /* device to host */
    /* FLOP the kernels must do, in double: they take logits and sums in f64, in the references'
       order, to agree with them bit for bit */
    uint64_t gpu_attn_flop;  /* attention: 2 x (Q.K + P.V) products */
    uint64_t gpu_sweep_flop; /* output sweeps (a product and a sum per walked token, query and
                                dimension; each cut's error) and coverage's cosine tables */
    uint64_t gpu_colsum_ns, gpu_colsum_bytes; /* h2o column sums from Q_all */
    uint64_t gpu_colsum_flop; /* Q.K over the causal half, twice (row stats, then sums) */
    /* --device cuda's memory plan (set by each trace's replay, not added): the device memory
       one worker's layer may hold, the free and total memory at the start of the devices the
       workers use (summed), the workers allowed on those devices at once (summed) of the
       worker threads, and which devices those are (bit d: CUDA device d) */
    uint64_t gpu_worker_bytes, gpu_mem_free, gpu_mem_total, gpu_slots, gpu_threads;
    uint64_t gpu_devices;
    uint64_t select_ns;         /* of measure_ns: the policies' selections (rankings and cuts) */
    uint64_t gpu_sweep_wall_ns; /* of measure_ns: host clock inside the GPU's sweep, coverage and
                                   redundancy calls (uploads, kernels, waits, downloads) */
    uint64_t gpu_plan_ns; /* creating the CUDA context and asking its free memory (a thread) */
    uint64_t gpu_wait_ns; /* workers waiting, after reading, for the plan or a GPU slot */
    uint64_t gpu_sweep_kind_ns[KVT_GPU_SWEEP_KINDS]; /* gpu_sweep_ns by kind (they add up to it) */
    /* --device cuda, K and V stored in 16 bits: bytes read ahead into host memory while the GPU
       was not ready for the layer, and bytes decompressed straight into pinned memory as the
       layer's context started (both in read_ns) */
    uint64_t kv_ahead_bytes, kv_streamed_bytes;
    /* --device cuda: the times the host waited for a layer context's stream (its results, a
       staging buffer free again), and the host clock inside those waits */
    uint64_t gpu_syncs, gpu_sync_ns;
    uint64_t gpu_device_layers[KVT_MAX_CUDA_DEVICES]; /* --device cuda: layers run on device d */
    /* layers replayed with KVT_DECODE_PROBS_GROUP, the KV groups' decode probabilities they
       computed again for a later reader, and the time that took (in measure_ns); with
       --device cuda the groups copied from the device for a host reader instead, and their
       time */
    uint64_t prd_group_layers, prd_again, prd_again_ns, prd_copied, prd_copied_ns;
} kvt_replay_profile;

/** How a worker holds a layer's decode-query probabilities over the prompt keys, 4 Hq G T
 *  bytes: a long generation's largest array (17 GiB for Llama-3-8B at T 8192, G 16384). */
typedef enum kvt_decode_probs {
    /* ALL, unless the worker threads would then not fit in the memory and GROUP holds less
       (kvt_replay_decode_probs_auto) */
    KVT_DECODE_PROBS_AUTO = 0,
    KVT_DECODE_PROBS_ALL, /* all of them, computed once */
    /* one KV group's at a time (1/Hkv of them), computed again for each reader that goes
       over the groups (the oracle, h2o-greedy:decode=1, the sweeps, each decode-time cache's
       metrics): slower, the results bitwise the same; with the GPU, which holds them all, the
       host's copy for the readers on the host, copied one group at a time */
    KVT_DECODE_PROBS_GROUP,
} kvt_decode_probs;

typedef struct kvt_replay_opts {
    int n_threads;         /* worker threads over layers; 0 = all cores, as many as memory_limit
                              holds (kvt_replay_threads) */
    uint64_t memory_limit; /* bytes the workers may hold together when n_threads is 0; 0 = what
                              the system has available (kvt_mem_available) */
    int coverage_probes;   /* probe keys for coverage (see RESULTS.md); 0 = no coverage;
                              negative = default 256 */
    /* progress: layers done of total, called under a lock; may be NULL */
    void (*progress)(void *user, uint64_t done, uint64_t total);
    void *progress_user;
    kvt_selection_sink sink; /* may be NULL */
    void *sink_user;
    /* layers to replay, [n_layers of the trace]: nonzero = replay it; NULL = every layer. The
       others keep NaN metrics and r_all (a partial result, see kvt_shard_owns) */
    const uint8_t *layer_mask;
    size_t layer_mask_len; /* entries of layer_mask; must equal the trace's n_layers */
    kvt_device device;     /* KVT_DEVICE_CPU (default), _CUDA or _AUTO (resolved at the start) */
    /* with CUDA: bit d = CUDA device d may run layers (a device whose free memory holds no
       layer is left out unless none does); 0 = every visible device. At most as many devices
       as worker threads are used (the first of them), so one worker creates one context. A
       device that is not there: KVT_ERR_NO_CUDA, "CUDA device d: ..." */
    uint64_t cuda_devices;
    /* with CUDA and cuda_devices 0: processes sharing this machine's GPUs (an MPI launch's on
       one node), this one being cuda_share_index of cuda_share_count: it takes the visible
       devices d with d % count == index, or, with fewer devices than processes, device
       index % devices. count <= 1: every visible device */
    int cuda_share_index, cuda_share_count;
    kvt_replay_profile *profile;   /* may be NULL; when given, times are ADDED to it */
    kvt_decode_probs decode_probs; /* 0: KVT_DECODE_PROBS_AUTO */
} kvt_replay_opts;

/** Sharding (scale-out): the (trace, layer) units of a replay are numbered in order, traces in
 *  command-line order and layers 0..L-1 within a trace. Unit u belongs to shard u % n_shards
 *  (round-robin, so every shard gets about the same number of layers).
 * @return true if shard `index` of `count` replays unit `unit`. */
bool kvt_shard_owns(uint64_t unit, int index, int count);

#define KVT_DEFAULT_COVERAGE_PROBES 256

/** Opaque selection of one policy on one layer: per head a ranking and a cut per budget. */
typedef struct kvt_layer_selection kvt_layer_selection;

/** Run one policy on one layer. @param budget_tokens [n_budgets] tokens (>= 1).
 * @param out free with kvt_layer_selection_free. */
kvt_status kvt_replay_layer_select(const kvt_layer_input *in, const kvt_policy *p,
                                   const int *budget_tokens, size_t n_budgets,
                                   kvt_layer_selection **out);
void kvt_layer_selection_free(kvt_layer_selection *s);
/** Heads of the selection: Hkv, or Hq with heads=query. */
int kvt_layer_selection_n_heads(const kvt_layer_selection *s);
/** Decode steps with per-step sets (0 for fixed-set policies; a decoding= policy's caches: the
 *  decode steps). */
int kvt_layer_selection_n_steps(const kvt_layer_selection *s);
/** true if the prompt-time (fixed) set exists (false for quest). */
bool kvt_layer_selection_has_fixed(const kvt_layer_selection *s);
/** true if head `head` re-selects per decode step (or, with decoding=, has a cache per step). */
bool kvt_layer_selection_head_per_step(const kvt_layer_selection *s, int head);
/** Kept token indices (ascending) of (budget, head), step -1 for the fixed set. For merged
 *  policies, the representative (destination) index of each kept entry. With decoding=, step
 *  s's cache: prompt tokens and decode tokens (T + s' for step s').
 * @param idx out, capacity cap; @param n receives the count (also when cap is too small,
 *        then KVT_ERR_INVALID_ARG). */
kvt_status kvt_layer_selection_kept(const kvt_layer_selection *s, size_t budget, int head, int step,
                                    int32_t *idx, size_t cap, size_t *n);

/** Run every policy on one layer and measure every budget.
 * @param out [n_pol, n_budgets, Hq] metrics; entries of head index >= the policy's head
 *            count are set to NaN. @param o may be NULL (defaults); o->sink, when set, receives
 *            the kept sets (records carry the index into `pols` and in->layer). */
kvt_status kvt_replay_layer_metrics(const kvt_layer_input *in, kvt_policy *const *pols,
                                    size_t n_pol, const int *budget_tokens, size_t n_budgets,
                                    const kvt_replay_opts *o, kvt_head_metrics *out);

/* ------------------------------------------------------------------------------------- */
/* Whole trace                                                                           */
/* ------------------------------------------------------------------------------------- */
/** Everything measured on one trace. Plain data: analysis/ reads and writes it. */
typedef struct kvt_trace_result {
    char *path;           /* kvt_strdup'ed */
    char *header_json;    /* the trace's JSON header */
    char fingerprint[17]; /* kvt_trace_reader_fingerprint ("" from an older results.json) */
    char *model_name, *model_arch;
    int n_layers, n_q_heads, n_kv_heads, head_dim, n_tokens;
    int window_stored, n_decode;
    bool has_decode_kv; /* K_decode and V_decode present */
    bool has_modality;
    int kv_elem_bytes; /* bytes per K/V element in the trace (2 for f16/bf16) */
    char kv_dtype[8];
    int64_t modality_counts[KVT_N_MODALITIES];
    int n_probes; /* coverage probe keys used (per head) */
    size_t n_policies, n_budgets;
    char **policy_labels; /* [n_policies] */
    char **policy_names;  /* [n_policies] */
    unsigned *policy_flags;
    int *policy_heads;   /* [n_policies] Hkv or Hq */
    int *policy_window;  /* [n_policies] observation window W the policy used */
    char **budget_texts; /* [n_budgets] */
    int *budget_tokens;  /* [n_budgets] */
    int *min_budget;     /* [n_policies, n_budgets] the smallest budget of a layer of the run:
                            budget_tokens, or with layer_weights= the smallest layer's */
    double *r_all;       /* [L, Hkv] redundancy of all keys */
    double *r_all_mod;   /* [L, Hkv, NM] redundancy of all keys of each modality (NaN without
                            a modality table, or under two keys of it) */
    kvt_head_metrics *m; /* [n_policies, n_budgets, L, Hq] */
} kvt_trace_result;

/** Metrics slot of (policy, budget, layer, head). */
static inline kvt_head_metrics *kvt_trace_result_at(const kvt_trace_result *r, size_t pol,
                                                    size_t bud, int layer, int head)
{
    return &r->m[((pol * r->n_budgets + bud) * (size_t)r->n_layers + (size_t)layer) *
                     (size_t)r->n_q_heads +
                 (size_t)head];
}

/** Allocate an empty result with all metrics NaN (used by the replay and by the results.json
 *  reader). Strings are copied. Free with kvt_trace_result_free. */
kvt_status kvt_trace_result_create(int n_layers, int n_q_heads, int n_kv_heads, size_t n_policies,
                                   size_t n_budgets, kvt_trace_result **out);
void kvt_trace_result_free(kvt_trace_result *r);

/** Layer and token counts of a trace, from its header (n_layers, n_tokens). Either pointer
 *  may be NULL. */
kvt_status kvt_replay_trace_shape(const char *path, int *n_layers, int *n_tokens);

/** Everything kvt_replay_trace checks of the trace at `path` and these policies at these
 *  budgets before its first layer: the header against layer 0's records; the stored window
 *  queries (unless every budget is above the prompt's length, which keeps it whole), decode
 *  queries and column sums the policies need; the policies' own files for this trace
 *  (external's scores: shape and values) and what their binds refuse (cake's, vl-cache's,
 *  fastv's and chunkkv reuse='s from the modality table and the shapes alone, without
 *  computing over the tensors; kvzip's reads its scores). A replay of many traces refuses a
 *  bad one before the first trace runs. */
kvt_status kvt_replay_check_trace(const char *path, kvt_policy *const *pols, size_t n_pol,
                                  const kvt_budget *budgets, size_t n_budgets);

/** Estimated peak host memory, in bytes, of one replay worker on one layer of `path` with
 *  these policies (`coverage_probes` as in kvt_replay_opts: negative = the default) on
 *  `device`: the arrays of the layer context (K, V and unit keys in f32, the window and decode
 *  attention probabilities), the probe cosine table, rankings and policy scratch, modelled per
 *  prompt token and fitted on measured peaks (bench/RESULTS.md), on the high side by 15-25%.
 *  With KVT_DEVICE_CUDA the context's arrays stay on the GPU but for those the policies read
 *  on the host (kvt_policy_def's host_reads), and K and V are held as stored (for bf16 traces
 *  30% to 70% of the CPU's estimate); KVT_DEVICE_AUTO counts as the CPU. The replay's
 *  memory is about this times its worker threads (with CUDA, plus the runtime's own). */
kvt_status kvt_replay_worker_bytes(const char *path, kvt_policy *const *pols, size_t n_pol,
                                   int coverage_probes, kvt_device device, uint64_t *bytes);
/** kvt_replay_worker_bytes with the decode probabilities held whole (*all) and, when group is
 *  not NULL, one KV group at a time (*group, KVT_DECODE_PROBS_GROUP): one header read. */
kvt_status kvt_replay_worker_bytes_modes(const char *path, kvt_policy *const *pols, size_t n_pol,
                                         int coverage_probes, kvt_device device, uint64_t *all,
                                         uint64_t *group);
/** KVT_DECODE_PROBS_AUTO resolved: with a worker holding wb_all bytes (all of the decode
 *  probabilities: kvt_replay_worker_bytes) or wb_group (one KV group's), GROUP when wb_group is
 *  less and kvt_replay_threads(requested, cores, n_layers, ..., memory) plans more threads
 *  with it, or plans threads that do not fit at wb_all; else ALL (also when memory is 0:
 *  unknown). */
kvt_decode_probs kvt_replay_decode_probs_auto(int requested, int cores, int n_layers,
                                              uint64_t wb_all, uint64_t wb_group, uint64_t memory);
/** Worker threads for a replay of `n_layers` layers: `requested` when > 0; else `cores` (<= 0:
 *  the CPU count), lowered to what `memory` bytes hold at `worker_bytes` each (memory 0:
 *  unknown, no limit), at least 1. Never more than n_layers when it is >= 1. */
int kvt_replay_threads(int requested, int cores, int n_layers, uint64_t worker_bytes,
                       uint64_t memory);

/** Replay a trace file: every policy at every budget, layer by layer on a thread pool.
 * @return KVT_OK; errors from the reader; KVT_ERR_NOT_FOUND naming a tensor a policy needs
 *         (Q_decode for oracle/quest, attn_colsum or Q_all for h2o). */
kvt_status kvt_replay_trace(const char *path, kvt_policy *const *pols, size_t n_pol,
                            const kvt_budget *budgets, size_t n_budgets, const kvt_replay_opts *o,
                            kvt_trace_result **out);

/** One kept set as kvt_replay_sets hands it on (a flat form for foreign-function callers such
 *  as Python's ctypes): policy and budget indices, layer, head (a query head when query_head,
 *  else a KV head), step (-1: the prompt's set), its n entries idx ascending and, for a merged
 *  set, changed [n] (1 where the entry holds merged K and V) and k, v [n_changed, D] in entry
 *  order (NULL, and n_changed 0, otherwise). The arrays are valid during the call. Return 0 to
 *  go on, anything else to stop the replay (KVT_ERR_STATE). */
typedef int (*kvt_sets_fn)(void *user, int policy, int budget, int layer, int head, int query_head,
                           int step, int n, const int32_t *idx, const uint8_t *changed,
                           int n_changed, int D, const float *k, const float *v);

/** Replay the policies (a --policies list) at the budgets (a --budgets list) on the trace at
 *  path with the random policies' seed, on one thread and without coverage, and hand every
 *  kept set to fn, layer by layer in order (within a layer in kvt_selection_sink's order: a
 *  policy's heads in turn, each head's steps in order, a step's budgets together): what
 *  `kvtrace replay --export-selection` writes, with a merged policy's keys and values too
 *  (kvtrace.hf.e2e reads them). */
kvt_status kvt_replay_sets(const char *path, const char *policies, const char *budgets,
                           uint64_t seed, kvt_sets_fn fn, void *user);

#ifdef __cplusplus
}
#endif
#endif /* KVT_REPLAY_H */
