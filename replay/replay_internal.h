/* replay_internal.h - what the policy files see: the option block, the policy definition that
 * each replay/policies/policy_<name>.c exports, the layer context computed once per layer and
 * shared by every policy, and the selection a policy fills in. Not installed.
 */
#ifndef KVT_REPLAY_INTERNAL_H
#define KVT_REPLAY_INTERNAL_H

#include <assert.h>
#include <math.h>

#include "kvt_replay.h"

#define KVT_NM KVT_N_MODALITIES

/* ---- options: one block for every policy; each definition lists the keys it accepts ---- */
/* cur: what a token's leverage is made of */
typedef enum kvt_leverage {
    KVT_LEVERAGE_KEY,
    KVT_LEVERAGE_VALUE,
    KVT_LEVERAGE_KV_AVG,
    KVT_LEVERAGE_KV_PRODUCT
} kvt_leverage;

/* mixkv-*: the score a head ranks its prefix by (MixKV's SELECT_METHOD ablations, §4.4) */
typedef enum kvt_mix_method {
    KVT_MIX_HEADWISE, /* r d' + (1 - r)(p + v'): the method */
    KVT_MIX_ATTN,     /* p */
    KVT_MIX_KEYDIFF,  /* d' */
    KVT_MIX_VNORM,    /* p + v' */
    KVT_MIX_KNORM,    /* p + k' (k': v' of the negative key norms) */
    KVT_MIX_FIXED     /* 0.33 (d' + p + v'): no head-wise adaptation */
} kvt_mix_method;

typedef struct kvt_policy_opts {
    int window;             /* observation window W (protected recent tokens for score policies) */
    int kernel;             /* pooling kernel (odd) */
    kvt_pool pool;          /* avg | max */
    kvt_reduce reduce;      /* GQA reduction of scores: mean | max | sum */
    bool per_query;         /* heads=query: one selection per query head */
    double alpha;           /* AdaKV safeguard floor_alpha */
    bool normalize;         /* AdaKV 3a normalize */
    char alloc;             /* AdaKV allocation 'a' (3a, repo) or 'b' (3b, paper/kvpress) */
    int skip;               /* AdaKV: layers < skip get the uniform budget */
    bool adaptive;          /* score policies: AdaKV's head-adaptive budgets from their scores */
    double beta;            /* PyramidKV beta */
    bool fallback;          /* PyramidKV KVCache-Factory fallback: N < 2*base -> uniform */
    int sinks;              /* StreamingLLM sinks */
    int recent;             /* duo-attention: recent tokens a streaming head keeps */
    double threshold;       /* simlayerkv: lazy_threshold */
    int last;               /* simlayerkv: n_last, the last queries that judge a layer */
    char merge;             /* merge=: 0 (none), 'p' (pivot) or 'w' (weighted): merge.c; 'e'
                               (position): elastic-cache's own */
    bool expected;          /* cam: each Bernoulli draw replaced by its expectation */
    double ratio;           /* SparseMM min ratio */
    char *scores;           /* SparseMM head-score JSON file (owned) */
    char *rtable;           /* MixKV offline redundancy table JSON (owned); NULL = online r */
    char *filters;          /* qfilter: Q-filters .npy [L, Hkv, D] or a safetensors file or
                               folder holding q_filters (owned); NULL = calibrated */
    double dms;             /* dms=: kvpress's DMSPress threshold (scores below it evicted
                               outside the last dms_window tokens; the budget caps the rest);
                               NaN = off */
    int dms_window;         /* dms=: DMSPress's sliding_window_size */
    bool dms_decoding;      /* dms_decoding=1: DMSPress(decoding=True), decode tokens evicted by
                               the threshold too as they leave the window (decoding.c) */
    char *stats;            /* expected-attention: the queries' statistics, a safetensors file
                               or folder holding query_mean, query_cov (owned); NULL = the
                               prompt's */
    int page;               /* Quest page size P */
    int dense_layers;       /* Quest: layers < dense_layers keep everything */
    kvt_reduce group;       /* Quest: GQA page-score aggregation max | sum */
    double theta;           /* HybridKV-like sparsity mass threshold */
    double tau;             /* HybridKV-like static threshold on k_theta/|P|; NaN = median split */
    double split;           /* HybridKV-like share r of the budget for static heads */
    double recent_share;    /* lookm: share of the budget kept as the most recent tokens */
    double tau1, tau2;      /* cake: the preference's entropy and variance exponents 1/tau */
    double gamma;           /* cake: weight of the window attention's variance in the score */
    int sketch;             /* leverage, compactor: Gaussian sketch columns (0: exact) */
    bool layerwise;         /* kvzip: every layer prunes the same share (no global threshold) */
    bool uniform;           /* kvzip: every head keeps its B best (KVzip's pair-uniform level) */
    double blend;           /* compactor: weight of the leverage; NaN: the compression ratio */
    int chunk;              /* ChunkKV, HybridKV-like chunk size C */
    int reuse;              /* ChunkKV: layers per group that share its first layer's chunks */
    bool chunk_kvpress;     /* align=kvpress: ChunkKV's chunks of the whole sequence, PyramidKV's
                               layer counts, as kvpress computes them */
    kvt_reduce chunk_score; /* HybridKV-like chunk score: sum | max */
    double floor_frac;      /* HybridKV-like static floor as a fraction of b */
    int merge_window;       /* LightKV-like matching window (vision tokens) */
    int n_future;           /* expected-attention: future positions the rotation averages */
    bool use_cov;           /* expected-attention: the queries' covariance term */
    bool use_vnorm;         /* expected-attention: scores times ||v|| */
    double epsilon;         /* expected-attention: added to the scores before ||v|| */
    int lag;                /* lagkv: partition size */
    bool cross;             /* lagkv: scores compared across partitions (not ranks) */
    kvt_leverage leverage;  /* cur: key | value | kv_avg | kv_product */
    kvt_mix_method method;  /* mixkv-*: headwise | attn | keydiff | vnorm | knorm | mixkv */
    int local;              /* cur: local block of the norms' normalisation; 0 = none */
    int block;              /* keydiff-block: tokens per block (BlockPress's block_size) */
    char *critical;      /* CriticalKV: per-token ||W_o v||_1 .npy [L, H', T] (owned); NULL = off */
    double first;        /* CriticalKV: first_stage_ratio */
    double ceps;         /* CriticalKV: epsilon added to the scores before the product */
    uint64_t seed;       /* random */
    double think;        /* think=: ThinK's share of key channels zeroed (think.c); 0 = off */
    int think_window;    /* think: the last window queries that score the channels */
    int think_recent;    /* think: the last prompt tokens whose keys are not pruned */
    char *layer_weights; /* layer_weights=FILE (owned): each layer's share of the budget
                            (layer_weights.c); NULL = every layer the budget */
    int chunk_length;    /* chunk_length=N: the budget shared over chunks of N tokens
                            (chunk_length.c); 0 = off */
    int decoding;        /* decoding=N: kvpress's DecodingPress, every N decode steps the cache
                            (prompt and decode tokens) compressed back to the budget by the
                            policy's scores (decoding.c); 0 = off */
    bool decode_prefill; /* prefill=1 (with decoding=): the prompt compressed to the budget at
                            prefill first (PrefillDecodingPress with the same press) */
    bool greedy_decode;  /* h2o-greedy decode=1: its eviction goes on through the decode steps
                            (H2O while generating; policy_h2o_greedy.c); rkv: its compressions
                            while decoding (policy_rkv.c) */
    double mix_lambda;   /* rkv: the attention term's weight (R-KV's mix_lambda) */
    int interval;        /* rkv: a compression whenever the length reaches a multiple of it */
    int chunk_scores;    /* with chunk_length: KVT_CHUNK_PROMPT (one ranking of the whole prompt),
                            KVT_CHUNK_OWN (each chunk scored as a prompt of its own, its queries
                            at their positions) or KVT_CHUNK_KVPRESS (the same, its window queries
                            turned to the prompt's last positions, as kvpress's ChunkPress) */
} kvt_policy_opts;

enum { KVT_CHUNK_PROMPT, KVT_CHUNK_OWN, KVT_CHUNK_KVPRESS };

typedef struct kvt_layer_ctx kvt_layer_ctx;
typedef struct kvt_policy_def kvt_policy_def;

/** layer_weights=FILE's weights, and what every layer's budget is computed from
 *  (layer_weights.c). */
typedef struct kvt_layer_weights {
    double *w; /* [n] each > 0 (owned), or NULL: every layer the budget */
    int n;
    double div; /* the weights are taken divided by this (their largest when their sum
                   overflows, else 1) */
    double sum; /* the sum of w / div */
} kvt_layer_weights;

struct kvt_policy {
    const kvt_policy_def *def;
    kvt_policy_opts o;
    char *label;
    void *state;          /* loaded files, owned (def->fini frees) */
    struct kvt_npy *crit; /* critical=FILE's array, owned, or NULL */
    bool one_trace;       /* its files describe one trace (kvt_policy_one_trace) */
    kvt_layer_weights lw; /* layer_weights=FILE's (lw.w NULL without) */
};

/** A policy: one file in replay/policies/ exports one of these, and policies/policy_list.h
 *  has one line for it. */
struct kvt_policy_def {
    const char *name;
    const char *summary;
    const char *keys; /* accepted option keys, comma-separated */
    unsigned flags;   /* KVT_POLICY_* */
    /* KVT_CTX_* arrays select reads on the host (kvt_ctx_fetch): with --device cuda they are
       copied from the GPU (or K and V widened) for it, which the host memory estimate counts
       (kvt_replay_worker_bytes); a fetch of any other array while it selects is an error */
    unsigned host_reads;
    void (*defaults)(kvt_policy_opts *o);
    /* optional: validate option combinations, load files into p->state */
    kvt_status (*init)(kvt_policy *p);
    void (*fini)(kvt_policy *p);
    /* optional, for a policy whose files describe a trace: before any layer of the trace at
       `path` (of this shape) is replayed, refuse it, or set *state to what select should see
       in p->state for this trace (kvt_replay_trace then replays a copy of the policy holding
       it, and frees it with unbind); leaving *state NULL keeps p->state */
    kvt_status (*bind)(const kvt_policy *p, const char *path, int n_layers, int n_q_heads,
                       int n_kv_heads, int n_tokens, void **state);
    void (*unbind)(void *state);
    /* optional, for a policy whose bind computes over the trace's tensors: what
       kvt_replay_check_trace runs in its place, every refusal of bind that the header and the
       records' shapes decide, without reading or computing over the tensors (a multi-trace
       replay checks every trace first; bind then runs once, for the replay) */
    kvt_status (*check)(const kvt_policy *p, const char *path, int n_layers, int n_q_heads,
                        int n_kv_heads, int n_tokens);
    /* optional: into buf[cap] the file that describes the trace at `path` for this policy
       (external's scores=DIR/NAME.npy); false when the policy has none per trace */
    bool (*trace_file)(const kvt_policy *p, const char *path, char *buf, size_t cap);
    /* fill sel (allocated with the kvt_sel_* helpers) for budgets [n_b] (tokens) */
    kvt_status (*select)(kvt_layer_ctx *c, const kvt_policy *p, const int *budgets, int n_b,
                         kvt_layer_selection *sel);
    /* optional, chunk_scores=own|kvpress (chunk_length.c): sel initialised (fixed, n_b budgets)
       with each chunk [a, a + n) of C tokens from token 0 ranked as the policy ranks a prompt
       of those n tokens alone: sel->order holds, per selection head, each chunk's tokens
       (absolute indices) in that ranking, the chunks one after another; the counts are set
       after it. chunk_reads: the KVT_CTX_* arrays it reads on the host besides host_reads;
       chunk_queries: it reads each chunk's last queries (Q_all; kvpress: and model.rope);
       chunk_min: what every chunk must hold more tokens than, as kvpress's press needs
       (kvt_chunk_min_len): 'w' window=, 's' sinks=, '1' one token, 'p' sinks= plus recent=,
       0 nothing. A policy with a ranking per budget (KVT_POLICY_PER_BUDGET) fills
       sel->border instead, each budget's (B, as select's) chunk by chunk. */
    kvt_status (*chunk_rank)(kvt_layer_ctx *c, const kvt_policy *p, int C, const int *B, int n_b,
                             kvt_layer_selection *sel);
    /* optional, decoding= and dms_decoding= (decoding.c): out [n] the scores (higher kept) of the n
       cache entries ent[i] (prompt token e < T, decode token e - T) whose keys k[i] [D]
       (post-RoPE) selection head h holds, as the policy scores a prompt's keys; the whole cache
       is given, in its order (an entry kept by a compression in its rank, then the decode
       tokens since), for scores relative to it (keydiff's mean key, expected-attention's sinks:
       the cache's first entries). step: the decode step after whose attention the cache is
       compressed (-1: every key scored once, cache_scores_per_key). work: 2 D doubles. */
    kvt_status (*cache_scores)(kvt_layer_ctx *c, const kvt_policy *p, int h, int step,
                               const int32_t *ent, const float *const *k, int n, double *out,
                               double *work);
    /* optional, decoding=: what cache_scores reads for every head and budget of a layer
       (expected-attention: the mean rotation, the decode steps' angles, the decode values'
       norms, its scratch), computed once before the layer's caches into c->dec_state and
       freed by dec_end after them */
    kvt_status (*dec_begin)(kvt_layer_ctx *c, const kvt_policy *p);
    void (*dec_end)(kvt_layer_ctx *c);
    /* optional, decoding= (decoding.c) over a policy scoring by the decode queries, one cache per
       layer (tova): out [n] the scores (higher kept) of the entries cache [n] after step s's
       attention, from z: query head u's logit (q.k times the scale) of step s's query and entry
       e's key at z[u * zs + e], for every entry of the cache */
    kvt_status (*step_scores)(kvt_layer_ctx *c, const kvt_policy *p, int s, const double *z,
                              size_t zs, const int32_t *cache, int n, double *out);
    bool cache_scores_kv;      /* cache_scores reads the keys alone, not the head h (knorm,
                                  keydiff, streamingllm) */
    bool cache_scores_per_key; /* a key's score does not depend on the rest of the cache
                                  (knorm, qfilter, streamingllm): scored once for every
                                  compression; needed by dms_decoding= */
    unsigned chunk_reads;
    bool chunk_queries;
    char chunk_min;
};

/** The KVT_CTX_* arrays policy p reads on the host: its definition's host_reads, its
 *  chunk_reads with chunk_scores=own|kvpress, and K, V and the decode probabilities with
 *  decoding= (its caches, decoding.c). */
unsigned kvt_policy_host_reads(const kvt_policy *p);
/** Whether p's caches evict decode tokens too (decoding=, dms_decoding=1, h2o-greedy's
 *  decode=1): its selections hold a cache per decode step (sel->dec), and the option named. */
bool kvt_policy_decode_evict(const kvt_policy *p);
const char *kvt_policy_decode_option(const kvt_policy *p);

#define KVT_POLICY(name) extern const kvt_policy_def kvt_policy_def_##name;
#include "policies/policy_list.h"
#undef KVT_POLICY

/** The registered definition of a name, or NULL. */
const kvt_policy_def *kvt_policy_def_find(const char *name);

/* ---- the layer context: computed once per layer, shared by every policy ---- */
#define KVT_SCORE_CACHE 12
typedef struct kvt_score_entry {
    int W, kernel, per_query;
    kvt_pool pool;
    kvt_reduce reduce;
    double *s;     /* [H', T - W] */
    int32_t *rank; /* [H', T] kvt_sel_rank_window_all of s with window W, or NULL (not yet) */
} kvt_score_entry;

struct kvt_layer_ctx {
    const kvt_layer_input *in;
    int T, D, Hq, Hkv, Gs, Wt, Gd, layer, n_layers;
    double scale;   /* the input's scale, or 1/sqrt(D) */
    bool has_extra; /* decode keys/values present: decode queries also see them */
    /* [Hkv, T, D] K and V in f32 on the host: the input's, or widened from its 16-bit ones
     * (into kv_own); with the GPU and 16-bit input NULL until kvt_ctx_fetch(KVT_CTX_KV) */
    const float *k, *v;
    float *kv_own;
    /* window queries (all W stored, causal inside the window) */
    float *prw;        /* [Hq, Wt, T] f32 probabilities */
    double *aw;        /* [Hq, Wt, D] sum_j p_j v_j */
    double *lsew;      /* [Hq, Wt] log-sum-exp of the logits */
    double *rsw;       /* [Hq, Wt] sum of each probability row (stored mass, ~1) */
    double *massw_mod; /* [Hq, Wt, NM] full mass per modality, or NULL */
    /* decode queries (held out) */
    /* [Hq, Gd, T] probabilities over prompt keys; with prd_one only one KV group's rows
     * [Gs, Gd, T] at a time: a reader calls kvt_ctx_prd_group, then kvt_ctx_prd_row */
    float *prd;
    bool prd_one;      /* prd holds one KV group's rows (KVT_DECODE_PROBS_GROUP) */
    int prd_g;         /* with prd_one the group whose rows prd holds, or -1 */
    size_t prd_r0;     /* the first query row (h * Gd + s) prd holds: 0, or prd_g * Gs * Gd */
    int prd_rb;        /* decode rows per kvt_attn_probs call (bounds its logits and dpr2) */
    int *dvis, *dvis2; /* [prd_rb] T; [Gs * Gd] i % Gd + 1: the rows' visible keys */
    float *dpr2;       /* [prd_rb, Gd] the rows' probabilities over decode keys (has_extra) */
    double *dwork;     /* [T + Gd] */
    double *dzs;       /* with prd_one [Hq, Gd, 2] each row's softmax shift and normaliser */
    double *ad;        /* [Hq, Gd, D] sum over prompt keys of p_j v_j */
    double *pd_extra;  /* [Hq, Gd] mass on decode keys 0..s (NULL without decode K/V) */
    double *od_extra;  /* [Hq, Gd, D] sum over decode keys of p v */
    double *lsed;      /* [Hq, Gd] */
    double *rsd;       /* [Hq, Gd] sum of each probability row over the prompt keys */
    /* per KV head */
    double *knorm, *vnorm; /* [Hkv, T] */
    float *ku;             /* [Hkv, T, D] unit keys */
    double *kmean;         /* [Hkv, D] mean unit key over all T */
    double *r_all;         /* [Hkv] */
    double *colsum;        /* [Hq, T] H2O column sums, lazily (kvt_ctx_colsum) */
    kvt_score_entry cache[KVT_SCORE_CACHE];
    int n_cache;
    struct kvt_ctx_gpu *gpu;  /* replay --device cuda: device copies for the output sweeps */
    unsigned on_device;       /* KVT_CTX_* arrays only on the GPU so far (kvt_ctx_fetch) */
    kvt_replay_profile *prof; /* may be NULL */
    uint64_t read_ns;         /* building it read K and V from the trace (kv_rest) this long */
    /* the policy whose select runs (run_select), or NULL: kvt_ctx_fetch holds it to
       selecting_reads (kvt_policy_host_reads) */
    const kvt_policy_def *selecting;
    unsigned selecting_reads;
    /* [n_budgets] each budget as the fraction of T it was written as (10% -> 0.1; 64 tokens ->
     * 64/T), or NULL (then B/T): kvpress-aligned policies take their ratio from it */
    const double *budget_frac;
    void *dec_state; /* the selecting policy's dec_begin, while its decode caches are built */
};

/** kvt_replay_layer_metrics with each budget's fraction of T (kvt_layer_ctx.budget_frac; may
 *  be NULL), as kvt_replay_trace knows it from the budgets as written; r_all (may be NULL)
 *  receives the layer's head redundancy [Hkv] from the context's mean unit keys, and r_all_mod
 *  (may be NULL) that of each modality's keys [Hkv, NM] (NaN without a modality table). */
kvt_status kvt_replay_layer_metrics_frac(const kvt_layer_input *in, kvt_policy *const *pols,
                                         size_t n_pol, const int *budget_tokens,
                                         const double *budget_frac, size_t n_budgets,
                                         const kvt_replay_opts *o, kvt_head_metrics *out,
                                         double *r_all, double *r_all_mod);

kvt_status kvt_ctx_build(const kvt_layer_input *in, kvt_layer_ctx *c);
/** kvt_ctx_build with the attention probabilities and outputs, norms and unit keys computed on
 *  the GPU (gpu true: replay --device cuda; KVT_ERR_NO_CUDA without CUDA), the rest on the
 *  host. The CUDA kernels follow the _ref kernels, so the context equals the one
 *  KVT_KERNELS=ref builds, within their documented tolerances. With dp KVT_DECODE_PROBS_GROUP
 *  (and more than one KV head) the host holds the decode probabilities one KV group at a time
 *  (prd_one; with the GPU, which holds them all, once a host reader fetches them). */
kvt_status kvt_ctx_build_on(const kvt_layer_input *in, kvt_layer_ctx *c, bool gpu,
                            kvt_decode_probs dp, kvt_replay_profile *prof);

/** With the GPU, the window and decode probabilities (prw, prd) and the unit keys (ku) stay on
 *  the device: a host reader of any of them first calls kvt_ctx_fetch with their bits, which
 *  copies those not yet on the host (a no-op on the CPU). So do the readers of K or V (k, v)
 *  when the input's are 16-bit: KVT_CTX_KV widens them on the host. A policy may fetch only
 *  what its definition's host_reads declares, on either device: KVT_ERR_STATE otherwise. */
#define KVT_CTX_PRW 1u
#define KVT_CTX_PRD 2u
#define KVT_CTX_KU  4u
#define KVT_CTX_KV  8u
kvt_status kvt_ctx_fetch(kvt_layer_ctx *c, unsigned what);

/** Make prd hold KV group g's decode probability rows (a no-op unless prd_one and another
 *  group is held: then they are computed again, in the same calls as when the context was
 *  built, so every reader gets the same bits as with all of them held; with the GPU, copied
 *  from the device if a host reader has fetched KVT_CTX_PRD, else only mapped for the device
 *  sweeps, which are given host pointers into prd). */
kvt_status kvt_ctx_prd_group(kvt_layer_ctx *c, int g);

/** Row r (query head h, step s: r = h * Gd + s) of the decode probabilities over the prompt
 *  keys [T]; with prd_one, r lies in the group kvt_ctx_prd_group made held. */
static inline const float *kvt_ctx_prd_row(const kvt_layer_ctx *c, size_t r)
{
    assert(!c->prd_one ||
           (c->prd_g >= 0 && r >= c->prd_r0 && r - c->prd_r0 < (size_t)c->Gs * (size_t)c->Gd));
    return c->prd + (r - c->prd_r0) * (size_t)c->T;
}

/** For each head (query heads with per_query, else KV heads) the mean over its query heads'
 *  decode probability rows (in head then step order) of each prompt key j < P: out [H', P]
 *  (the oracle's scores; on the GPU without copying the probabilities, bitwise the same). */
kvt_status kvt_ctx_decode_means(kvt_layer_ctx *c, bool per_query, int P, double *out);

/** Add v to a profile counter (workers share the profile); prof may be NULL. */
static inline void kvt_prof_add(kvt_replay_profile *prof, uint64_t *field, uint64_t v)
{
    if (prof)
        __atomic_fetch_add(field, v, __ATOMIC_RELAXED);
}
/* K or V given as a trace stores it (kvt_layer_input.k_pieces, kv_rest): the rows its pieces
 * cover so far, checked in bounds, once each, and complete at the end */
typedef struct kvt_kv_cover {
    const kvt_layer_input *in;
    const char *what; /* "K" or "V" */
    uint8_t *seen;    /* [Hkv * T] */
    size_t covered, n;
    uint64_t end; /* the last byte of any piece so far, plus one */
    void *buf;    /* kvt_kv_cover_room's buffer, of cap bytes */
    size_t cap;
} kvt_kv_cover;
/** K or V (kind) of in as stored, tracked by c (which `sink` adds the records it gets to): the
 *  input's given pieces added, then given(user, pc, n_pc) puts them where they go, then the
 *  records kv_rest reads go through sink (*rest_ns += the time inside kv_rest; may be NULL),
 *  and c is ended: every row covered once. */
kvt_status kvt_kv_cover_run(kvt_kv_cover *c, const kvt_layer_input *in, int kind,
                            kvt_status (*given)(void *user, const kvt_trace_piece *pc, size_t n_pc),
                            void *user, const kvt_trace_sink *sink, uint64_t *rest_ns);
/** Piece p (its bytes at p->offset of a tensor's [Hkv, T, D] 16-bit elements) added; `bytes`:
 *  the record's size as read, which must be the piece's (0: not read, not checked). */
kvt_status kvt_kv_cover_add(kvt_kv_cover *c, const kvt_trace_piece *p, uint64_t bytes);
/** *buf = host room for a record of `bytes` read for this tensor (one buffer, grown; freed by
 *  kvt_kv_cover_end). */
kvt_status kvt_kv_cover_room(kvt_kv_cover *c, size_t bytes, void **buf);
/** The layer's K and V come as stored pieces (kvt_layer_input.k_pieces, kv_rest). */
static inline bool kvt_kv_stored(const kvt_layer_input *in)
{
    return in->kv_rest || in->n_k_pieces || in->n_v_pieces;
}

#define KVT_PROF_ADD(prof, field, v) kvt_prof_add((prof), (prof) ? &(prof)->field : NULL, (v))
void kvt_ctx_free(kvt_layer_ctx *c);

/** Heads of a granularity and the KV head of head h. */
static inline int kvt_ctx_heads(const kvt_layer_ctx *c, bool per_query)
{
    return per_query ? c->Hq : c->Hkv;
}
static inline int kvt_ctx_kv_of(const kvt_layer_ctx *c, bool per_query, int h)
{
    return per_query ? h / c->Gs : h;
}

/* The norm of KV head g's mean unit key as the diversity scores (keydiff, MixKV's KeyDiff term)
 * use it, or 0 when it is at most 1e-9: keys that cancel out leave a mean whose direction is the
 * sums' rounding, which the CPU's and the GPU's sums settle differently (analysis/RESULTS.md);
 * it is taken as zero, and every such score ties. */
#define KVT_MEAN_KEY_EPS 1e-9
static inline double kvt_ctx_mean_key_norm(const kvt_layer_ctx *c, int g)
{
    const double *m = c->kmean + (size_t)g * c->D;
    double s = 0.0;
    for (int e = 0; e < c->D; e++)
        s += m[e] * m[e];
    s = sqrt(s);
    return s > KVT_MEAN_KEY_EPS ? s : 0.0;
}

/** SnapKV's window scores [H', P] (P = T - W > 0) from window probabilities prw [Hq, Wt, T]:
 *  the mean over the last W window queries, the GQA reduction (unless per_query), the pooling;
 *  what kvt_ctx_window_scores computes on the CPU (chunkkv's reuse= computes them at bind). */
kvt_status kvt_window_scores_from_probs(const float *prw, int Hq, int Hkv, int Wt, int T, int W,
                                        int kernel, kvt_pool pool, kvt_reduce reduce,
                                        bool per_query, double *s);
/** SnapKV window scores (POLICIES §0.1): mean over the last W window queries, GQA reduction
 *  (KV granularity) then pooling over the prefix P = [0, T-W). kernel 1 = no pooling.
 *  *out is [H', P] (row stride P), owned by the context. W must be 1..Wt. */
kvt_status kvt_ctx_window_scores(kvt_layer_ctx *c, int W, int kernel, kvt_pool pool,
                                 kvt_reduce reduce, bool per_query, const double **out);
/** H2O column sums [Hq, T] from attn_colsum or computed from Q_all. */
kvt_status kvt_ctx_colsum(kvt_layer_ctx *c, const double **out);
/** Validate a window W against the stored window (policies that use window queries). */
kvt_status kvt_ctx_check_window(const kvt_layer_ctx *c, const char *policy, int W);
/** A policy that reads every prompt query: KVT_ERR_NOT_FOUND, saying how to capture them, when
 *  the layer input has no Q_all. */
kvt_status kvt_ctx_check_q_all(const kvt_layer_ctx *c, const char *policy);
/** Query head h's Q_all [T, D] in *q: the input's own rows, or loaded into buf [T * D] through
 *  q_all_head; KVT_ERR_NAN naming the policy, head and token when one is not finite. */
kvt_status kvt_ctx_q_all_head(const kvt_layer_ctx *c, const char *policy, int h, float *buf,
                              const float **q);

/* ---- the selection a policy fills ---- */
typedef struct kvt_merged_set {
    int n;            /* kept entries */
    int n_changed;    /* entries whose K/V differ from their token's (merge targets) */
    float *k, *v;     /* [n_changed, D] K/V of the changed entries, in entry order; an unchanged
                         entry's K/V are token idx's rows of the layer input (not copied). v is
                         NULL when the changed entries keep their tokens' values (think=) */
    int32_t *idx;     /* [n] representative token index, ascending */
    uint8_t *changed; /* [n] 1 if the entry's K/V differ from token idx's (a merge target) */
} kvt_merged_set;

struct kvt_layer_selection {
    int n_heads, per_query, window, n_budgets, T, D, n_steps;
    bool has_fixed;
    int32_t *order;            /* [H', T] fixed ranking: a permutation of 0..T-1 */
    int32_t *border;           /* [n_b, H', T] a ranking per budget (KVT_POLICY_PER_BUDGET: kept
                                  sets not nested across budgets), or NULL: order serves them all
                                  (kvt_sel_ranking) */
    int32_t *count;            /* [n_b, H'] entries kept from the top of the ranking */
    uint8_t *step_head;        /* [H'] 1 if the head re-selects per decode step */
    int32_t *step_order;       /* [H', n_steps, T] */
    int32_t *step_count;       /* [n_b, H', n_steps] */
    kvt_merged_set *merged;    /* [n_b, H'] (merged policies only) */
    struct kvt_dec_cache *dec; /* decoding=, dms_decoding=1: [n_b, H'] each cache through the
                                  decode steps (decoding.c), or NULL */
    int dec_steps;             /* with dec: the decode steps simulated (Gd) */
    double pruned_share;     /* the share of a changed entry's memory not stored (think=: its key's
                                zeroed channels, p / (2 D)); 0 for merges. n_keep counts a changed
                                entry as 1 - pruned_share */
    struct kvt_ctx_gpu *gpu; /* the layer context's GPU while the policy selects (rankings there);
                                NULL after run_select */
};

kvt_status kvt_sel_init(kvt_layer_selection *s, const kvt_layer_ctx *c, bool per_query, int window,
                        int n_b, bool fixed);
kvt_status kvt_sel_init_steps(kvt_layer_selection *s, int n_steps);
kvt_status kvt_sel_init_merged(kvt_layer_selection *s);
/** A merged set's arrays (freed by kvt_sel_clear) for n entries, n_chg of them changed (K/V
 *  rows of D), changed[] zeroed; n and n_changed set. */
kvt_status kvt_merged_alloc(kvt_merged_set *out, int n, int n_chg, int D);
/** kvt_merged_alloc without v (NULL): the changed entries keep their tokens' values. */
kvt_status kvt_merged_alloc_keys(kvt_merged_set *out, int n, int n_chg, int D);
/** A ranking per budget (border), after kvt_sel_init with fixed: budget b keeps the first
 *  count[b][h] of its own ranking. The policy fills border; after it selects, order (which no
 *  metric reads then) is set to the last budget's rankings. */
kvt_status kvt_sel_init_per_budget(kvt_layer_selection *s);
/** Head h's ranking at budget b: its own with per-budget rankings, else the shared one. */
static inline const int32_t *kvt_sel_ranking(const kvt_layer_selection *s, int b, int h)
{
    return s->border ? s->border + ((size_t)b * s->n_heads + (size_t)h) * s->T
                     : s->order + (size_t)h * s->T;
}
void kvt_sel_clear(kvt_layer_selection *s);

/** order = the window (most recent first: T-1, T-2, ..., T-W) then the prefix P = [0, T-W)
 *  ranked by score descending (ties: lower index). score is [T-W]. W is clamped to T. */
kvt_status kvt_rank_window(const double *score, int T, int W, int32_t *order);
/** Rank every head: order[h] = kvt_rank_window(score + h*(T-W), T, W). */
kvt_status kvt_sel_rank_window_all(kvt_layer_selection *s, const double *score, int W);
/** kvt_sel_rank_window_all for a score array the context owns (kvt_ctx_window_scores): the
 *  ranking is computed once per (scores, W) and copied to the policies that ask again. */
kvt_status kvt_ctx_rank_window_all(kvt_layer_ctx *c, kvt_layer_selection *s, const double *score,
                                   int W);
/** Chunks of the prefix P = [0, P): chunk i is [i*C, min((i+1)*C, P)), n_chunks = ceil(P/C).
 *  kvt_chunk_order: cord [n_chunks] = the chunks by score cs descending (ties: lower chunk);
 *  ord [T] = the window (T-1, ..., T-W) then the chunks' tokens in that order, ascending
 *  inside a chunk. work is [n_chunks]. kvt_chunk_count: tokens in the first n_take of cord. */
void kvt_chunk_order(const double *cs, int n_chunks, int C, int P, int W, int T, int32_t *ord,
                     int32_t *work, int32_t *cord);
int kvt_chunk_count(const int32_t *cord, int n_take, int n_chunks, int C, int P);
/** merge=pivot|weighted (merge.c, KVCache-Factory's merge_kv): turn a fixed selection into
 *  merged sets, each dropped token merged into the kept entry with the most similar key
 *  (mode 'p' or 'w'). Reads K and V on the host (kvt_ctx_fetch). */
kvt_status kvt_sel_merge(kvt_layer_ctx *c, char mode, kvt_layer_selection *sel);
/** think=R (think.c, ThinK's key channel pruning): turn a fixed selection into merged sets
 *  whose entries before the last think_recent tokens have the floor(D*R) channels of least
 *  query-weighted key energy zeroed. Reads K and V on the host (kvt_ctx_fetch). */
kvt_status kvt_sel_think(kvt_layer_ctx *c, const kvt_policy_opts *o, kvt_layer_selection *sel);

/** decoding=N (decoding.c, kvpress's DecodingPress): one (budget, head)'s cache through the
 *  decode steps. Step s's token joins the cache, its query attends to the cache, and after
 *  every N-th step a cache of more than B entries keeps the B the policy scores highest
 *  (cache_scores; ties to the earlier token). dms_decoding=1 (DMSPress(decoding=True)): after
 *  each step the token leaving the sliding window goes if it scores below dms=. */
typedef struct kvt_dec_cache {
    int32_t *last; /* [T + G] the last decode step whose query sees entry e: prompt token e < T
                      (-1: not kept at prefill), decode token e - T; G - 1 if never evicted */
} kvt_dec_cache;
/** A selection's decode-time caches begin: refused (naming p's option) on a layer without the
 *  decode steps' keys and values; sel->dec [n_b, heads] allocated, empty. */
kvt_status kvt_dec_begin(const kvt_layer_ctx *c, const kvt_policy *p, int n_b,
                         kvt_layer_selection *sel);
/** dc->last for a cache holding the prompt-time set `start` [n0] and every decode token. */
kvt_status kvt_dec_init(const kvt_layer_ctx *c, const kvt_policy *p, const int32_t *start, int n0,
                        kvt_dec_cache *dc);
/** out [nu, ostride]: the probabilities of query heads u0 .. u0 + nu - 1 (one KV group's) at
 *  decode step s over the decode keys 0..s, under the full softmax (exp(q.k * scale - lse),
 *  the lse over the prompt and those keys), each logit summed over d in order
 *  (kvt_dot_queries). kp [s + 1] the group's decode key rows; qt [D, nu] and z [(s + 1) nu]
 *  workspace. */
void kvt_dec_probs_heads(const kvt_layer_ctx *c, int u0, int nu, int s, const float *const *kp,
                         float *qt, double *z, double *out, size_t ostride);
/** A cache entry e and its score s, for the top B of a decode-time cache: kvt_dec_item_cmp
 *  sorts by score descending, ties to the earlier entry (torch.topk leaves them unspecified). */
typedef struct kvt_dec_item {
    double s;
    int32_t e;
} kvt_dec_item;
int kvt_dec_item_cmp(const void *a, const void *b);
/** The key [D] of cache entry e of KV head g: prompt token e < T (the context's K) or decode
 *  token e - T (the input's K_decode). */
const float *kvt_dec_entry_key(const kvt_layer_ctx *c, int g, int32_t e);
/** Simulate sel's caches at budgets B[n_b] from its prompt-time sets (decoding=: the whole
 *  prompt unless prefill=1, which keeps the policy's sets; dms_decoding=1: the dms= sets).
 *  Needs K_decode and V_decode. */
kvt_status kvt_sel_decoding(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                            kvt_layer_selection *sel);
/** The entries step s's query sees in (budget b, head h)'s cache, ascending, into out
 *  [T + s + 1] (NULL: only counted); returns their count. */
int kvt_dec_visible(const kvt_layer_selection *sel, int b, int h, int s, int32_t *out);
/** recall_decode, err_decode and n_keep of every (budget, head) of n_sel decoding= selections
 *  of one granularity (per_query alike), over their caches (ms[k] [b * stride + h], as the
 *  sweeps fill them). Each step's full output and decode-key probabilities, the same for
 *  every selection, are computed once for all; each selection's metrics are those it gets
 *  alone, bit for bit. */
kvt_status kvt_dec_metrics(kvt_layer_ctx *c, const kvt_layer_selection *const *sels,
                           kvt_head_metrics *const *ms, int n_sel, size_t stride);
void kvt_dec_free(kvt_layer_selection *sel);

/** chunk_length=C (chunk_length.c) on sel, a plain kept set at budgets B[n_b] (shares frac, or
 *  B/T when NULL): each chunk of C tokens from token 0 keeps max(1, int(len * f)) of its
 *  tokens (all when f >= 1) in the order of the policy's ranking (each budget's own with
 *  per-budget rankings); every head's count is their sum. Refused (naming `policy`) for merged
 *  or per-step sets. */
kvt_status kvt_sel_chunk(const kvt_layer_ctx *c, const char *policy, int C, const int *B,
                         const double *frac, int n_b, kvt_layer_selection *sel);
/** chunk_scores=own|kvpress (chunk_length.c): sel from p's chunk_rank, each chunk of
 *  chunk_length tokens ranked as a prompt of its own, with uniform counts (kvt_sel_chunk then
 *  shares the budget over the chunks). */
kvt_status kvt_sel_chunk_own(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                             kvt_layer_selection *sel);
/** Chunk [a, a + n)'s ranking loc [n] (indices 0..n-1 of the chunk) into head h's order
 *  (chunk_rank). */
void kvt_sel_put_chunk(kvt_layer_selection *sel, int h, int a, int n, const int32_t *loc);
/** chunk_rank of a score per KV head and token (knorm, vnorm; keydiff's chunk-local scores):
 *  each chunk [a, a + n) of C tokens ranked by sign * x[g][j], its last min(window, n) tokens
 *  first (newest first), then the rest by score descending (ties: the lower index). */
kvt_status kvt_chunk_rank_kv_array(kvt_layer_ctx *c, const kvt_policy *p, const double *x,
                                   double sign, int C, int n_b, kvt_layer_selection *sel);
/** Each chunk's window attention (chunk_scores=own|kvpress on snapkv, tova): for every query
 *  head h and chunk [a, a + n) of C tokens from token 0 (each n > W: kvt_sel_chunk_own checks
 *  it), a[h][a + j] (j < n - W) = the mean over the chunk's last W queries (Q_all
 *  rows a + n - W ...; kvpress: turned to the positions of tokens T - W ... by the header's
 *  RoPE) of their attention to token a + j, softmax over the chunk's keys they see. a is
 *  [Hq, T]; its entries at each chunk's window are left as they are. */
kvt_status kvt_chunk_window_mass(kvt_layer_ctx *c, const char *policy, int C, int W, bool kvpress,
                                 double *a);
struct kvt_rope_pairs; /* (below, with rope.c) */
/** qn [n, D] = rows t0 .. t0 + n - 1 of a query head's Q_all q [T, D]; with r (on), each turned
 *  by the header's RoPE from its own position to that of token to + i, as kvpress rotates a
 *  chunk's queries with the whole prompt's position embeddings (KVT_ERR_NAN, naming the
 *  policy, for an angle that is not finite). */
kvt_status kvt_chunk_turn_queries(const kvt_layer_ctx *c, const char *policy,
                                  const struct kvt_rope_pairs *r, const float *q, int t0, int n,
                                  int to, float *qn);
/** The tokens each chunk must exceed for p with chunk_scores=own|kvpress, as kvpress's press
 *  needs (its definition's chunk_min: snapkv its window; tova its last query, 1; streamingllm,
 *  expected-attention their sinks; compactor its sinks and recent tokens), or 0; *what names
 *  the option ("window", "sinks", "sinks+recent"). */
int kvt_chunk_min_len(const kvt_policy *p, const char **what);
/** Chunks of C tokens of a T-token prompt, each scored as a prompt of its own, must each hold
 *  more than W (the option `what`): KVT_ERR_INVALID_ARG, its message after "who: ", when one
 *  does not. */
kvt_status kvt_chunk_window_check(const char *who, int C, int W, const char *what, int T);
/** layer_weights=FILE's weights into *lw (layer_weights.c): a .npy of one dimension, or text
 *  numbers separated by blanks, commas or newlines (a JSON array too; '#' comments), each
 *  finite and > 0. lw->w is the caller's to kvt_free. Errors name the policy and the file. */
kvt_status kvt_layer_weights_read(const char *policy, const char *path, kvt_layer_weights *lw);
/** Layer `layer`'s budgets under the weights lw (layer < lw->n): Bl[b] = max(1, floor(B[b] *
 *  w_l / mean(w) + 0.5)); fl[b] = frac[b] * w_l / mean(w) when fl is not NULL (frac then not
 *  NULL). */
void kvt_layer_budgets(const kvt_layer_weights *lw, int layer, const int *B, const double *frac,
                       int n_b, int *Bl, double *fl);
/** The smallest layer's budget at budget B under lw (B itself without weights, lw->w NULL). */
int kvt_layer_budget_min(const kvt_layer_weights *lw, int B);
/** Every head's ranking (order, after kvt_sel_init with fixed) StreamingLLM's: the first
 *  `sinks` tokens, then the rest from the most recent backwards. */
void kvt_sel_streaming_order(kvt_layer_selection *s, int sinks);
/** count[b][h] = min(T, B_b) for every head (uniform budgets, window included). */
void kvt_counts_uniform(kvt_layer_selection *s, const int *budgets, int n_b);
/** Round half to even (torch.round, Python round). */
double kvt_round_even(double x);

/** AdaKV allocation (POLICIES §3) from per-head prefix scores p [H', P]: caps [H'] of
 *  selected prefix tokens for prefix budget b (per head, window excluded). */
kvt_status kvt_adakv_alloc(const double *p, int H, int P, int b, int W, double alpha,
                           bool normalize, char form, int *caps);
/** The same in two steps: sorted [H', P] = each head's scores in ranking order (once per
 *  layer), then the caps of one prefix budget b from them. */
kvt_status kvt_adakv_sort(const double *p, int H, int P, double *sorted);
kvt_status kvt_adakv_alloc_sorted(const double *sorted, int H, int P, int b, int W, double alpha,
                                  bool normalize, char form, int *caps);

/** count[b][h] of an AdaKV allocation (policy options window, alpha, normalize, alloc, skip)
 *  computed from the per-head prefix scores alloc_s [H', T-W]; short prompts keep all. */
kvt_status kvt_adakv_counts(kvt_layer_ctx *c, const kvt_policy_opts *o, const double *alloc_s,
                            const int *B, int n_b, kvt_layer_selection *sel);

/** A score policy's ranking and counts from its prefix scores s [H', T-W], window W: without
 *  critical=, each head ranked by s (kvt_sel_rank_window_all) with the uniform budget or, with
 *  adaptive=1, AdaKV's counts from s (alloc=a refuses negative or infinite scores); with it,
 *  kvpress's CriticalKVPress (uniform counts, one ranking) or, with adaptive=1 (and for adakv),
 *  CriticalAdaKVPress (AdaKV's counts, alloc=b, and a ranking per budget) over s (critical.c). */
kvt_status kvt_sel_rank_counts(kvt_layer_ctx *c, const kvt_policy *p, const double *s, int W,
                               const int *B, int n_b, kvt_layer_selection *sel);

/** The unit eigenvector x [n] of the largest eigenvalue of the symmetric a [n, n] (row-major;
 *  only its lower triangle is read, and destroyed): Householder tridiagonalisation, bisection
 *  on Sturm counts, inverse iteration (qfilter's calibration). An all-zero a gives e_0.
 *  w: scratch [n * n + 8 n]. */
void kvt_sym_top_eigvec(double *a, int n, double *x, double *w);

/** Score policies (knorm, vnorm, keydiff, cur): rank the prefix [0, T-W) of each head by
 *  sign * x[g][j] (x is a per-KV-head array [Hkv, T]), window W = p->o.window, uniform counts. */
kvt_status kvt_rank_by_kv_array(kvt_layer_ctx *c, const kvt_policy *p, const double *x, double sign,
                                const int *B, int n_b, kvt_layer_selection *sel);

/** Column-sum policies (h2o, observed-attention): rank the prefix [0, T-W) of each head by the
 *  H2O column sums (attn_colsum or Q_all), each divided by the T - j queries that see token j
 *  with per_viewer, GQA-reduced with reduce (heads=kv), window W = p->o.window, uniform
 *  counts. */
kvt_status kvt_rank_by_colsum(kvt_layer_ctx *c, const kvt_policy *p, kvt_reduce reduce,
                              bool per_viewer, const int *B, int n_b, kvt_layer_selection *sel);

/** CAKE's entries per layer at budget B (window W included) from the layers' preferences
 *  pref[L] (policy_cake.c): (B - W) * L prefix tokens split by the preferences, truncated, CAKE's
 *  adjust_budgets, clamped to [0, T - W]; B <= W keeps the last B, T <= B + W all T. */
#define KVT_MAX_LAYERS_CAKE 4096
kvt_status kvt_cake_counts(const double *pref, int L, int T, int W, int B, int *counts);
/** vl-cache's token counts [L] at budget B from each layer's density (0, 1] of its post-vision
 *  attention (policy_vl_cache.c): clamp(lambda d_l, 1, T) summing to L B, rounded down, the
 *  tokens left one each to the largest remainders (ties within 1e-9: the lower layer); B >= T
 *  keeps all T. */
kvt_status kvt_vlcache_counts(const double *density, int L, int T, int B, int *counts);
/** aircache-like's layer weights [L] (policy_aircache.c) from each layer's strength and
 *  skewness: each divided by its mean over the layers (the skewness shifted up by its minimum
 *  when that is negative; a mean of 0 gives 1), their mean, over the largest; a weight of 0
 *  becomes 1e-12 (the layer keeps one visual token). */
void kvt_aircache_weights(const double *strength, const double *skew, int L, double *weight);

/* ---- reads of the bind hooks that open the trace (bind_read.c) ---- */
/** The trace header's model.attn_scale, or 1/sqrt(D), as the replay takes it. */
double kvt_bind_trace_scale(kvt_trace_reader *r, int D);
/** Every head of (layer l, kind), n elements, as f32 into *out (kvt_malloc'ed; the caller frees);
 *  an allocation failure names the policy. */
kvt_status kvt_bind_read_f32(kvt_trace_reader *r, int l, int kind, uint32_t heads, size_t n,
                             const char *policy, float **out);
/** Layer l's queries of kind qkind (window queries or Q_all) and its keys, in f32. */
typedef struct kvt_bind_qk {
    float *q, *k; /* [Hq, nq, D], [Hkv, T, D] (kvt_malloc'ed; the caller frees) */
    int nq, D;
    double scale; /* kvt_bind_trace_scale */
} kvt_bind_qk;
/** Read them, the queries checked to be [Hq, 1..T, D] and K [Hkv, T, D] (KVT_ERR_NOT_FOUND when
 *  the layer has no such queries, KVT_ERR_CORRUPT for another shape; errors name the policy). */
kvt_status kvt_bind_read_qk(kvt_trace_reader *r, int l, int qkind, int Hq, int Hkv, int T,
                            const char *policy, kvt_bind_qk *out);
/** In a bind hook: the threads the replay was given (kvt_replay_opts.n_threads; 0: every core),
 *  which a bind that computes on threads of its own keeps to. */
int kvt_bind_threads(void);
/** In a bind hook: fn(arg, l) for every layer l in [0, L), shared out among the replay's
 *  threads (kvt_bind_threads, every core when 0), no more than L, 64, and, when per_thread
 *  bytes are given, what half the available memory holds; the calling thread is one of them.
 *  fn must touch only layer l's part of what arg points to (a trace reader read from several
 *  threads included). Returns the error of the lowest layer that failed, as one thread would
 *  have met it first (the layers after a failure may be left undone). */
kvt_status kvt_bind_each_layer(int L, uint64_t per_thread, kvt_status (*fn)(void *arg, int l),
                               void *arg);
/** kvt_bind_read_qk's checks of the shapes alone, without reading: *nq and *D (may be NULL)
 *  receive the stored queries and head dim. */
kvt_status kvt_bind_check_qk(kvt_trace_reader *r, int l, int qkind, int Hq, int Hkv, int T,
                             const char *policy, int *nq, int *D);
/** What a trace's modality table and record shapes say of the post-vision queries a policy
 *  ranks by (vl-cache, aircache-like): the prompt after its last image or video token, or the
 *  last `last` of those tokens (last > 0). Every refusal they decide, its message naming the
 *  policy: no modality table, no visual token, a prompt ending with one, too few stored
 *  queries and no Q_all, another layer's shapes. */
typedef struct kvt_post_vision {
    int used;     /* post-vision queries used: positions T - used .. T - 1 */
    int last_vis; /* the last image or video token */
    int qkind;    /* where they are read: KVT_KIND_Q_WINDOW (the last nq stored) or Q_ALL */
    int D;
    int *nq;      /* [L] each layer's stored queries of qkind */
    uint8_t *mod; /* [T] the modality table, as stored */
} kvt_post_vision;
kvt_status kvt_post_vision_plan(kvt_trace_reader *r, const char *policy, int last, int L, int Hq,
                                int Hkv, int T, kvt_post_vision *pl);
void kvt_post_vision_free(kvt_post_vision *pl);
/** The check hook of vl-cache and aircache-like: kvt_post_vision_plan's refusals for the trace
 *  at path (the policy's last=), without reading a tensor. */
kvt_status kvt_post_vision_check(const kvt_policy *p, const char *path, int L, int Hq, int Hkv,
                                 int T);
/** The check hooks of cake and chunkkv: layers 0, step, 2 step... of the trace at path have
 *  window queries and keys (kvt_bind_check_qk) and at least W window queries. */
kvt_status kvt_bind_check_windows(const char *path, const char *policy, int L, int step, int Hq,
                                  int Hkv, int T, int W);

/** A range of tokens that kvt_nca_scores scores as a prompt of its own: [s0, s1); with a
 *  rotation, query s0 + i is first turned to the position of token to + i
 *  (kvt_chunk_turn_queries); out [H', s1 - s0]. */
typedef struct kvt_nca_range {
    int s0, s1, to;
    double *out;
} kvt_nca_range;
/** kvpress's NonCausalAttnPress scores (policy_noncausal_attention.c) of each range rg[n_r] as
 *  if it were the whole prompt: tiles of C from s0, every query of a tile over every key of it
 *  (unscaled, no mask), summed over the tile's queries, averaged over a KV head's query heads
 *  (per_query: each its own), times ||v||, averaged over 3 tokens (zeros outside [s0, s1)).
 *  Each query head's Q_all is read once for every range; r (not NULL) turns the queries as
 *  each range's `to` says. Errors name the policy. */
kvt_status kvt_nca_scores(kvt_layer_ctx *c, const char *policy, bool per_query, int C,
                          const kvt_nca_range *rg, int n_r, const struct kvt_rope_pairs *r);

/** Leverage scores (policy_leverage.c, kvpress's LeverageScorePress) of the tokens [s0, s1) of
 *  every KV head among themselves: pre-RoPE keys centred on their mean, sketched by `sketch`
 *  Gaussian columns (0: none), x (X^T X + eps I)^-1 x^T. out [Hkv, s1 - s0]; needs the trace's
 *  RoPE (errors name the policy). */
kvt_status kvt_leverage_scores(kvt_layer_ctx *c, const char *policy, int sketch, uint64_t seed,
                               int s0, int s1, double *out);
/** x <- (x - mean) / max(unbiased std, 1e-6) over its n elements (kvpress's z-normalisation). */
void kvt_znorm(double *x, size_t n);

/* ---- RoPE undone (rope.c): expected-attention's queries, leverage's and compactor's keys ---- */
/** The trace's RoPE per rotation pair: pair i turns dimensions lo[i], hi[i] by the position of
 *  row row[i] (the M-RoPE section) times freq[i]; cos and sin are scaled by a. */
typedef struct kvt_rope_pairs {
    bool on; /* false: no RoPE (model.rope type none): vectors are used as stored */
    int half;
    double a; /* attention_scaling */
    int *lo, *hi, *row;
    double *freq;
} kvt_rope_pairs;
/** From the layer input's model.rope; errors (no RoPE known, pairs unknown, an M-RoPE trace
 *  without its sections or positions) name the policy. kvt_rope_pairs_free releases. */
kvt_status kvt_rope_pairs_init(const kvt_layer_ctx *c, const char *policy, kvt_rope_pairs *r);
void kvt_rope_pairs_free(kvt_rope_pairs *r);
/** Token t's position in row `row` (t itself without a positions table). */
int32_t kvt_rope_pos(const kvt_layer_input *in, int row, int t);
/** cs [(t1 - t0), half, 2]: cos and sin of each pair's angle at tokens t0..t1-1 (KVT_ERR_NAN,
 *  naming the policy, for an angle or a scaling that is not finite). */
kvt_status kvt_rope_angles(const kvt_rope_pairs *r, const kvt_layer_input *in, int t0, int t1,
                           const char *policy, double *cs);
/** y [D] = the pre-RoPE vector of the post-RoPE x [D] at a token whose angles are cs [half, 2]
 *  (HF's x cos + rotate_half(x) sin, divided by attention_scaling, undone). */
void kvt_rope_undo(const kvt_rope_pairs *r, const double *cs, const float *x, int D, double *y);

/** PyramidKV: selected prefix tokens at layer l for budget B (POLICIES §2). Returns -1 when
 *  the prompt is short (no compression). */
int kvt_pyramid_layer_budget(int B, int W, int T, int L, int l, double beta, bool fallback);
/** Entries layer l keeps under kvpress's PyramidKVPress at compression_ratio ratio, window W
 *  included (policy_pyramidkv.c, align=kvpress), in [0, T]. */
int kvt_pyramid_kvpress_count(double ratio, int W, int T, int L, int l, double beta);

/** Read a file of per-(layer, head) numbers: a JSON object with keys "L-H" or "L-H-key" whose
 *  values are numbers or arrays of numbers (averaged), a JSON array of arrays [L][H], or (a
 *  file not starting with '{' or '[') a text table, a row per layer of finite numbers
 *  separated by tabs, blanks or commas, '#' lines and blank lines skipped, every row as long
 *  as the first (DuoAttention's full_attention_heads.tsv). *out [L*H] (missing = NaN). Caller
 *  frees with kvt_free. */
kvt_status kvt_read_head_table(const char *path, int *n_layers, int *n_heads, double **out);

/** Offline per-(layer, head) scores of SparseMM and HeadKV (scores=FILE) [n_layers, n_heads]:
 *  a column per query head, or per KV head. */
typedef struct kvt_head_scores {
    int n_layers, n_heads;
    double *score; /* [n_layers, n_heads], owned (kvt_free) */
} kvt_head_scores;
/** Read p->o.scores (kvt_read_head_table) into *hs; KVT_ERR_INVALID_ARG naming the policy when
 *  it has no scores= option. The caller frees hs->score with kvt_free. */
kvt_status kvt_head_scores_read(const kvt_policy *p, kvt_head_scores *hs);
/** count[b][h] of the SparseMM allocation (POLICIES §5), or HeadKV's for the policy `headkv`
 *  (§11), from hs (sel initialised, its heads' granularity that of p->o.per_query):
 *  sigma = score / the sum over the model's layers, summed over a selection head's columns;
 *  W + round_half_even(sigma*(b - min)*L*H' + min) clamped to the prefix, b = B - W,
 *  min = floor(ratio*b) (headkv: b - floor(b/beta)); T <= B keeps all T, B <= W keeps B.
 *  KVT_ERR_INVALID_ARG when the table does not fit the model (too few layers, neither Hq nor
 *  Hkv columns, Hkv columns with heads=query, a missing score, a sum that is not positive). */
kvt_status kvt_head_score_counts(const kvt_layer_ctx *c, const kvt_policy *p,
                                 const kvt_head_scores *hs, const int *B, int n_b,
                                 kvt_layer_selection *sel);

/** A NumPy .npy array of floats (npy.c), little-endian, C order. */
#define KVT_NPY_MAX_DIMS 8
typedef struct kvt_npy {
    int ndim, shape[KVT_NPY_MAX_DIMS];
    int elem;   /* bytes per element: 2 (float16, or bfloat16), 4 (float32) or 8 (float64) */
    bool bf16;  /* 2-byte elements are bfloat16 (a safetensors BF16 tensor) */
    size_t n;   /* elements */
    void *data; /* n * elem bytes */
} kvt_npy;
/** Read PATH (np.save of a float16/32/64 array, versions 1.0-3.0). KVT_ERR_IO (cannot open;
 *  not a regular file), KVT_ERR_CORRUPT (not .npy, cut short, data size off the shape),
 *  KVT_ERR_UNSUPPORTED (another dtype, big-endian, Fortran order). kvt_npy_free releases. */
kvt_status kvt_read_npy(const char *path, kvt_npy *out);
/** Element i as a double. */
double kvt_npy_at(const kvt_npy *a, size_t i);
void kvt_npy_free(kvt_npy *a);
/** PATH opened for reading (kvt_fopen_regular) into *f, its size in bytes into *size;
 *  KVT_ERR_IO with the message otherwise (*f NULL). */
kvt_status kvt_fopen_sized(const char *path, FILE **f, uint64_t *size);
/** out's n elements (bytes bytes) read from f's position into new memory (out->data, out->n);
 *  KVT_ERR_NOMEM or KVT_ERR_IO naming PATH otherwise. */
kvt_status kvt_npy_read_data(kvt_npy *out, uint64_t n, uint64_t bytes, FILE *f, const char *path);
/** Tensor `name` of the safetensors file PATH (safetensors.c; F64, F32, F16 or BF16).
 *  KVT_ERR_IO (cannot open), KVT_ERR_CORRUPT (not safetensors, cut short, offsets off the
 *  shape), KVT_ERR_NOT_FOUND (no such tensor: the message lists those it holds),
 *  KVT_ERR_UNSUPPORTED (another dtype). kvt_npy_free releases. */
kvt_status kvt_read_safetensors(const char *path, const char *name, kvt_npy *out);
/** PATH is a regular file that starts as a safetensors file does (a header length, then '{'). */
bool kvt_is_safetensors(const char *path);
/** Into buf[cap] the file a safetensors PATH names: PATH/model.safetensors for a folder (a hub
 *  checkpoint as downloaded), else PATH; false when it does not fit. */
bool kvt_safetensors_file(const char *path, char *buf, size_t cap);
/** A new array read from PATH (kvt_read_npy), which must have 3 dimensions (`dims` names them
 *  in the error); an error reads "POLICY: what went wrong" followed by `hint`. */
kvt_status kvt_npy_load(const char *policy, const char *path, const char *dims, const char *hint,
                        kvt_npy **out);
/** As kvt_npy_load, with `ndim` dimensions, from a .npy file or, when PATH is a safetensors
 *  file or a directory holding model.safetensors (a hub checkpoint), its tensor `tensor`. */
kvt_status kvt_array_load(const char *policy, const char *path, const char *tensor, int ndim,
                          const char *dims, const char *hint, kvt_npy **out);
/** kvt_npy_free, and the array's own memory (a may be NULL). */
void kvt_npy_destroy(kvt_npy *a);
/** A policy's fini for a state that is a kvt_npy (external's scores, qfilter's filters). */
void kvt_policy_fini_npy(kvt_policy *p);
/** DIR/NAME.npy for the trace NAME.kvt (or a trace named NAME) at path `trace`, into buf[cap];
 *  false when it does not fit (external's scores=DIR, critical=DIR). */
bool kvt_trace_npy_path(const char *dir, const char *trace, char *buf, size_t cap);
/** Whether path names a directory. */
bool kvt_is_dir(const char *path);
/** critical=: the array a (read from `file`) against a trace of L layers, Hq query and Hkv KV
 *  heads and T tokens (rows: KV heads, or query heads with heads=query): one line otherwise. */
kvt_status kvt_critical_check(const kvt_policy *p, const kvt_npy *a, const char *file, int L,
                              int Hq, int Hkv, int T);

#endif /* KVT_REPLAY_INTERNAL_H */
