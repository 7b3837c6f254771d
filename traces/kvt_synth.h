/* kvt_synth.h - model-shaped synthetic traces for tests and benchmarks (`kvtrace synth`).
 * Deterministic by seed, with documented structure that policies can find: attention sinks,
 * local and retrieval heads, near-duplicate key clusters whose share varies per head, image
 * spans more redundant than text, decode queries that resemble the window queries.
 * The generative model and its measured numbers are in traces/SYNTH.md. Sits beside
 * capture/ as a producer of traces; writes only through the kvt_trace_writer API.
 *
 * Dimension letters: L layers, Hq query heads, Hkv KV heads, T prompt tokens, W window
 * queries, G decode steps, D head dim, P position ids per token (1, or 3 for M-RoPE).
 */
#ifndef KVT_SYNTH_H
#define KVT_SYNTH_H

#include "kvt_common.h"
#include "kvt_trace.h"

#ifdef __cplusplus
extern "C" {
#endif

/** Bumped whenever the same options start producing different tensors. */
#define KVT_SYNTH_GENERATOR_VERSION 1
#define KVT_SYNTH_MAX_NEEDLES       8
#define KVT_SYNTH_MAX_TOKENS        (1u << 24)
#define KVT_SYNTH_MAX_DECODE        (1u << 16)
#define KVT_SYNTH_COLSUM_AUTO_MAX_T 4096u /* colsum on by default up to this T */

typedef enum kvt_synth_rope {
    KVT_SYNTH_ROPE_DEFAULT = 0, /* 1-D rotary, pairs (i, i + D/2) */
    KVT_SYNTH_ROPE_MROPE = 1,   /* Qwen2-VL multimodal rotary: t/h/w sections of the pairs */
} kvt_synth_rope;

/** One model shape. Entries of a static table: never freed. */
typedef struct kvt_synth_shape {
    const char *name; /* "tiny", "llama3-8b", ... */
    const char *arch; /* model.arch in the header: "llama", "qwen2_vl" */
    int n_layers;     /* L */
    int n_q_heads;    /* Hq */
    int n_kv_heads;   /* Hkv (divides Hq) */
    int head_dim;     /* D (even) */
    kvt_synth_rope rope;
    double rope_theta;
    int mrope_section[3];    /* rotary pairs per t/h/w section (sum D/2); M-RoPE only */
    double image_frac;       /* default share of image tokens */
    int32_t vocab;           /* token ids are drawn from [0, vocab) */
    int32_t bos_id;          /* id of token 0 */
    int32_t image_token_id;  /* id of every image token */
    const char *description; /* one line for --help */
} kvt_synth_shape;

/** Number of shapes in the table. */
size_t kvt_synth_n_shapes(void);
/** Shape i (0 <= i < kvt_synth_n_shapes()), or NULL. */
const kvt_synth_shape *kvt_synth_shape_at(size_t i);
/** Shape by name (exact), or NULL. */
const kvt_synth_shape *kvt_synth_shape_find(const char *name);
/** Comma-separated shape names ("tiny, tiny-vl, ..."): a static string. */
const char *kvt_synth_shape_names(void);

typedef enum kvt_synth_switch {
    KVT_SYNTH_AUTO = 0,
    KVT_SYNTH_ON = 1,
    KVT_SYNTH_OFF = 2,
} kvt_synth_switch;

typedef struct kvt_synth_opts {
    const char *shape;        /* shape name; borrowed for the call */
    uint32_t n_tokens;        /* T, 1 .. KVT_SYNTH_MAX_TOKENS */
    uint32_t window;          /* W, 1 .. T; 0 = min(32, T) */
    uint32_t n_decode;        /* G (0 = no decode records); kvt_synth_opts_init sets 16 */
    double image_frac;        /* share of image tokens in [0, 1); negative = shape default */
    uint64_t seed;            /* any value; same options => byte-identical trace */
    kvt_dtype dtype;          /* F16, BF16 or F32 for K/V/Q; INVALID = BF16 */
    kvt_synth_switch colsum;  /* ATTN_COLSUM records; AUTO = on iff T <= 4096 */
    bool q_all;               /* Q_ALL records (every prompt query) */
    int n_threads;            /* layers generated in parallel by kvt_synth_write; 0 = 1 */
    kvt_progress_fn progress; /* called after each layer is written (may be NULL) */
    void *progress_user;
    int n_layers; /* layers written: the shape's first n_layers (their records are those of
                     the whole shape's trace); 0 = all of the shape's */
} kvt_synth_opts;

/** Defaults: window 0 (min(32, T)), n_decode 16, image_frac -1 (shape default), seed 1,
 *  BF16, colsum AUTO, no Q_all, 1 thread, all of the shape's layers. `shape` and `n_tokens` are
 * left for the caller. */
void kvt_synth_opts_init(kvt_synth_opts *o);

/** Check options and resolve defaults into *out (window, dtype, image_frac, colsum never AUTO).
 * @return KVT_OK or KVT_ERR_INVALID_ARG with a one-line message (kvt_error_msg()): unknown
 *         shape (lists the valid ones), T = 0 or too large, W > T, bad dtype, image_frac,
 *         n_layers outside 0..the shape's layer count. Resolved n_layers is never 0. */
kvt_status kvt_synth_opts_resolve(const kvt_synth_opts *o, kvt_synth_opts *out,
                                  const kvt_synth_shape **shape);

/** Raw (uncompressed) bytes the trace's records will hold, for sizing and progress. */
kvt_status kvt_synth_raw_bytes(const kvt_synth_opts *o, uint64_t *out);

/** Generate the trace described by `o` and write it to `path`: the JSON header, the token
 *  tables, then every layer in order, one layer in memory per generating thread.
 * @param wo writer options (level, compression threads, force); may be NULL.
 * @return KVT_OK; KVT_ERR_INVALID_ARG (see kvt_synth_opts_resolve); the writer's errors
 *         (KVT_ERR_IO when the file exists without wo->force...); KVT_ERR_NOMEM. */
kvt_status kvt_synth_write(const kvt_synth_opts *o, const char *path, const kvt_writer_opts *wo);

/* ---- in-memory generation (tests, benchmarks, studies): no file involved ---- */

/** Per-token tables shared by all layers. */
typedef struct kvt_synth_tokens {
    uint32_t n_tokens;         /* T */
    uint32_t n_decode;         /* G */
    int n_pos;                 /* P: 1, or 3 (t, h, w) for M-RoPE */
    int32_t *token_ids;        /* [T] */
    uint8_t *modality;         /* [T] kvt_modality */
    int32_t *positions;        /* [P, T] */
    int32_t *decode_token_ids; /* [G] (NULL when G = 0) */
    int32_t *decode_positions; /* [P, G] (NULL when G = 0) */
    uint32_t n_sinks;          /* tokens [0, n_sinks) are attention sinks */
    uint32_t image_begin;      /* image span [image_begin, image_end); empty if equal */
    uint32_t image_end;
    uint32_t grid_h, grid_w; /* image tokens laid row-major on a grid_h x grid_w grid */
} kvt_synth_tokens;

/** Build the token tables for `o` (resolved or not).
 * @param out caller frees with kvt_synth_tokens_free.
 * @return KVT_OK, KVT_ERR_INVALID_ARG, KVT_ERR_NOMEM. */
kvt_status kvt_synth_tokens_create(const kvt_synth_opts *o, kvt_synth_tokens **out);
void kvt_synth_tokens_free(kvt_synth_tokens *t);

typedef enum kvt_synth_role {
    KVT_SYNTH_ROLE_LOCAL = 0,     /* attends to recent tokens (RoPE carrier) */
    KVT_SYNTH_ROLE_RETRIEVAL = 1, /* attends to the layer's needles */
    KVT_SYNTH_ROLE_SINK = 2,      /* mostly on the attention sinks */
    KVT_SYNTH_ROLE_SEMANTIC = 3,  /* spread over one cluster of near-duplicate keys */
} kvt_synth_role;
/** "local", "retrieval", "sink", "semantic" or "?". */
const char *kvt_synth_role_name(int role);

/** One layer's tensors as f32, already rounded to the trace dtype (so they equal what a
 *  reader returns from the written file, converted to f32). Row-major. */
typedef struct kvt_synth_layer {
    int layer;
    uint32_t n_tokens, window, n_decode; /* T, W, G */
    int n_q_heads, n_kv_heads, head_dim; /* Hq, Hkv, D */
    float *k;                            /* [Hkv, T, D] post-RoPE keys */
    float *v;                            /* [Hkv, T, D] */
    float *q_window;                     /* [Hq, W, D]  = rows T-W..T-1 of the prompt queries */
    float *q_decode;                     /* [Hq, G, D]  (NULL when G = 0) */
    float *k_decode;                     /* [Hkv, G, D] (NULL when G = 0) */
    float *v_decode;                     /* [Hkv, G, D] (NULL when G = 0) */
    float *q_all;                        /* [Hq, T, D]  (NULL unless opts.q_all) */
    float *attn_colsum;                  /* [Hq, T]     (NULL when colsum is off) */
    /* the planted structure, for tests and studies: */
    uint32_t n_needles;
    uint32_t needle_idx[KVT_SYNTH_MAX_NEEDLES]; /* sorted token indices */
    uint8_t *head_role;                         /* [Hq] kvt_synth_role */
    float *r_target;                            /* [Hkv] designed key redundancy */
    int16_t *key_cluster; /* [Hkv, T] near-duplicate cluster of each key (-1: none) */
} kvt_synth_layer;

/** Generate layer `layer` (0 <= layer < L) of the trace described by `o`; independent of
 *  every other layer (generate them in any order or in parallel).
 * @param tok the token tables from kvt_synth_tokens_create for the same options, or NULL
 *            (then they are built internally); borrowed for the call.
 * @param out caller frees with kvt_synth_layer_free.
 * @return KVT_OK, KVT_ERR_INVALID_ARG, KVT_ERR_OVERFLOW, KVT_ERR_NOMEM. */
kvt_status kvt_synth_layer_create(const kvt_synth_opts *o, const kvt_synth_tokens *tok, int layer,
                                  kvt_synth_layer **out);
void kvt_synth_layer_free(kvt_synth_layer *x);

/** Causal attention column sums of one head: out[j] = sum over i >= j of softmax_j'<=i(
 *  q_i . k_j' / sqrt(D))[j]. Blockwise, O(T) extra memory, f32 softmax, f64 accumulation.
 *  q: [T, D], k: [T, D], out: [T]. Exposed so tests can check it against brute force.
 * @return KVT_OK, KVT_ERR_INVALID_ARG, KVT_ERR_NOMEM. */
kvt_status kvt_synth_colsum_head(const float *q, const float *k, uint32_t n_tokens, int head_dim,
                                 float *out);

/** Mean pairwise cosine of the unit rows of x[i], i in [begin, end) (MixKV's head
 *  redundancy r = (N |mean unit row|^2 - 1) / (N - 1)); 0 when fewer than 2 rows.
 *  x: [.., D] row-major. */
double kvt_synth_redundancy(const float *x, int head_dim, uint32_t begin, uint32_t end);

#ifdef __cplusplus
}
#endif
#endif /* KVT_SYNTH_H */
