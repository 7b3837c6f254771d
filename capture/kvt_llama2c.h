/* kvt_llama2c.h - a built-in inference engine for llama2.c "legacy" checkpoints (Llama
 * architecture, GQA, shared or separate classifier): load and validate a checkpoint, run the
 * forward pass on the CPU in plain f32 C, and capture a real trace through the public capture
 * API (kvt_capture.h). Format and forward pass: models/README.md.
 *
 * Letters: L layers, Hq query heads, Hkv KV heads, D head dim, T prompt tokens, G decode
 * steps, S the model's maximum sequence length (seq_len).
 */
#ifndef KVT_LLAMA2C_H
#define KVT_LLAMA2C_H

#include "kvt_capture.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KVT_LLAMA2C_BOS        1       /* beginning-of-sequence token id */
#define KVT_LLAMA2C_ROPE_THETA 10000.0 /* RoPE base */
#define KVT_LLAMA2C_NORM_EPS   1e-5f   /* RMSNorm epsilon */

/** The checkpoint header, validated, plus derived sizes. */
typedef struct kvt_llama2c_config {
    int dim;                /* model width */
    int hidden_dim;         /* FFN width */
    int n_layers;           /* L */
    int n_heads;            /* Hq */
    int n_kv_heads;         /* Hkv */
    int vocab_size;         /* absolute value of the header field */
    int seq_len;            /* S */
    int head_dim;           /* D = dim / n_heads */
    int kv_dim;             /* Hkv * D */
    bool shared_classifier; /* header vocab_size > 0: logits use the embedding table */
} kvt_llama2c_config;

typedef struct kvt_llama2c_model kvt_llama2c_model;

/** Load a checkpoint: every header field and the exact file size are checked, and every
 *  weight must be finite.
 * @param out caller closes with kvt_llama2c_model_close.
 * @return KVT_OK; KVT_ERR_IO (cannot open or read); KVT_ERR_CORRUPT (bad header value, size
 *         mismatch, non-finite weight: the message says which); KVT_ERR_NOMEM. */
kvt_status kvt_llama2c_model_open(const char *path, kvt_llama2c_model **out);
void kvt_llama2c_model_close(kvt_llama2c_model *m);
/** Owned by the model, valid until close. */
const kvt_llama2c_config *kvt_llama2c_model_config(const kvt_llama2c_model *m);

/** Inference state: KV cache of S positions and scratch buffers. Tokens are fed in order. */
typedef struct kvt_llama2c_state kvt_llama2c_state;

/** @param keep_queries also keep every position's post-RoPE queries (for Q_all/colsum).
 *  @param out caller frees with kvt_llama2c_state_free. The model must outlive the state. */
kvt_status kvt_llama2c_state_create(const kvt_llama2c_model *m, bool keep_queries,
                                    kvt_llama2c_state **out);
void kvt_llama2c_state_free(kvt_llama2c_state *st);

/** Run one token at the next position (0, 1, 2, ...).
 * @param logits receives [vocab] logits, owned by the state, valid until the next forward.
 * @return KVT_OK; KVT_ERR_INVALID_ARG (token out of range); KVT_ERR_STATE (context full). */
kvt_status kvt_llama2c_forward(kvt_llama2c_state *st, int32_t token, const float **logits);

/** Positions run so far. */
uint32_t kvt_llama2c_state_n_pos(const kvt_llama2c_state *st);
/** A compressed KV cache: from now on, a position p >= n_masked attends, in layer l and query
 *  head h, only to the positions t < n_masked with keep[(l * Hq + h) * n_masked + t] nonzero
 *  (and to every position from n_masked to p); positions before n_masked are run with the
 *  whole cache, as a prompt is before a policy compresses it. keep [L, Hq, n_masked] is
 *  borrowed until the mask is changed or cleared (keep NULL, n_masked 0) or the state freed.
 * @return KVT_OK; KVT_ERR_INVALID_ARG (n_masked > seq_len, or keep NULL with n_masked > 0). */
kvt_status kvt_llama2c_state_set_mask(kvt_llama2c_state *st, const uint8_t *keep,
                                      uint32_t n_masked);
/** Forget the positions from pos on: the next forward runs at pos (pos <= positions run), so
 *  that several continuations of one prompt can be run from its cache.
 * @return KVT_OK; KVT_ERR_INVALID_ARG (pos beyond the positions run). */
kvt_status kvt_llama2c_state_rewind(kvt_llama2c_state *st, uint32_t pos);
/** A merged cache, with the mask (kvt_llama2c_state_set_mask) over the same n_masked positions:
 *  from now on a position p >= n_masked attends, in layer l and query head h, to the key and
 *  value mk, mv [((l * Hq + h) * n_masked + t) * D ...] in place of position t's cached ones
 *  wherever flag[(l * Hq + h) * n_masked + t] is nonzero (an entry the policy merged, as query
 *  head h sees it). Borrowed like the mask, until changed or cleared (flag NULL, n_masked 0).
 * @return KVT_OK; KVT_ERR_INVALID_ARG (n_masked > seq_len, or a NULL array with n_masked > 0). */
kvt_status kvt_llama2c_state_set_merged(kvt_llama2c_state *st, const uint8_t *flag, const float *mk,
                                        const float *mv, uint32_t n_masked);
/** Layer l's key cache, post-RoPE, row-major [S, Hkv, D] (rows < n_pos are valid). Owned by
 *  the state. */
const float *kvt_llama2c_state_keys(const kvt_llama2c_state *st, int layer);
/** Layer l's value cache [S, Hkv, D]. */
const float *kvt_llama2c_state_values(const kvt_llama2c_state *st, int layer);
/** Layer l's post-RoPE queries [S, Hq, D] with keep_queries; otherwise [1, Hq, D] holding
 *  the last position's. */
const float *kvt_llama2c_state_queries(const kvt_llama2c_state *st, int layer);

/* KVzip (arXiv 2505.23416, as kvpress's KVzipPress scores): n_sink, the previous chunk's tail
 * repeated before a chunk, the largest chunk */
#define KVT_KVZIP_SINKS     4
#define KVT_KVZIP_TAIL      8
#define KVT_KVZIP_MAX_CHUNK 2048

/** The chunk size of KVzip's reconstruction pass over T prompt tokens with n_instr instruction
 *  tokens: `want` (0: the largest that fits, at most KVT_KVZIP_MAX_CHUNK: the whole prompt if
 *  it fits as one chunk) checked to fit the model's context, since a chunk's repeat rows run at
 *  positions T, T + 1, ... (the instruction, the previous chunk's last KVT_KVZIP_TAIL tokens
 *  for every chunk but the first, the chunk).
 * @return KVT_OK; KVT_ERR_INVALID_ARG (no room after the prompt, or `want` too large: the
 *         message says the largest that fits). */
kvt_status kvt_llama2c_kvzip_chunk(const kvt_llama2c_config *c, uint32_t T, uint32_t n_instr,
                                   uint32_t want, uint32_t *chunk);

/** KVzip's context-reconstruction scores of a state that has run exactly the T prompt tokens
 *  `prompt` (created with keep_queries). For each chunk [a, b) of `chunk` tokens, the repeat
 *  input (instruction `instr`, the previous chunk's last KVT_KVZIP_TAIL tokens but for the first
 *  chunk, the chunk's tokens) runs at positions T.. with the whole prompt in view; then, per
 *  layer and KV head, every repeat query of the head's group attends (softmax, 1/sqrt(D)) to the
 *  keys [0, min(KVT_KVZIP_SINKS, a)), [a, b) and the repeat keys up to its own, and token j of
 *  the chunk scores the largest probability it gets. The repeat rows are then forgotten (the
 *  state is back at T, so decoding goes on as without the pass).
 * @param score [L, Hkv, T] out.
 * @return KVT_OK; KVT_ERR_INVALID_ARG (state not at T, no queries kept, a token outside the
 *         vocabulary, a chunk that does not fit: kvt_llama2c_kvzip_chunk); KVT_ERR_NOMEM. */
kvt_status kvt_llama2c_kvzip(kvt_llama2c_state *st, const int32_t *prompt, uint32_t T,
                             const int32_t *instr, uint32_t n_instr, uint32_t chunk, float *score);

/** Index of the largest logit (the first one on ties). */
int32_t kvt_llama2c_argmax(const float *logits, int n);
/** Sample from softmax(logits / temperature) with `rng`; temperature <= 0 is argmax. */
int32_t kvt_llama2c_sample(const float *logits, int n, float temperature, kvt_rng *rng);

/** Read whitespace-separated token ids from a text file.
 * @param ids receives the ids; caller frees with kvt_free.
 * @return KVT_OK; KVT_ERR_IO; KVT_ERR_CORRUPT (not an integer, or outside [0, vocab)). */
kvt_status kvt_llama2c_read_ids(const char *path, int vocab, int32_t **ids, uint32_t *n_ids);

/** What to run and capture. */
struct kvt_llama2c_capture_opts {
    const int32_t *prompt_ids; /* [n_prompt], or NULL to generate the prompt from BOS */
    uint32_t n_prompt;         /* T */
    uint64_t seed;             /* prompt sampling seed */
    float temperature;         /* prompt sampling temperature; <= 0 is greedy */
    uint32_t n_decode;         /* G greedy decode steps after the prompt */
    uint32_t window;           /* W */
    bool with_colsum;
    bool with_q_all;
    kvt_dtype kv_dtype;         /* stored dtype (KVT_DTYPE_INVALID = f32) */
    const char *model_name;     /* NULL: the checkpoint's file name without ".bin" */
    uint32_t decode_chunk;      /* decode steps per record (0 = the capture default, 64) */
    bool with_kvzip;            /* KVzip's reconstruction pass after the prompt: kvzip_score */
    uint32_t kvzip_chunk;       /* its chunk size (0: kvt_llama2c_kvzip_chunk's largest) */
    const int32_t *kvzip_instr; /* its instruction tokens [kvzip_n_instr] (may be NULL) */
    uint32_t kvzip_n_instr;
    kvt_writer_opts writer;
    /* Asked before each position is run (prompt positions 0..T-1, then decode positions
     * T..T+G-1) and, with_kvzip, before each chunk of the pass (position T); returning false
     * stops the run there (res->interrupted): in the decode steps, the trace is closed cleanly
     * with the prompt and the steps run so far; in the kvzip pass, with the prompt alone (no
     * kvzip_score, no decode step); inside the
     * prompt, where nothing replayable was captured yet, the file is removed (see
     * kvt_llama2c_capture). NULL runs to the end. A signal handler that sets a flag and a
     * callback that reads it give a clean Ctrl-C. */
    bool (*keep_going)(void *user, uint32_t pos);
    void *keep_going_user;
};

struct kvt_llama2c_capture_result {
    int32_t *tokens; /* [T + G + 1]: prompt, decode inputs, last generated; kvt_free */
    uint32_t n_tokens;
    float *logits; /* [T + G, vocab] logits at every position, if want_logits; kvt_free */
    struct kvt_capture_stats stats;
    bool interrupted;      /* keep_going returned false: the run stopped early */
    uint32_t n_prompt_run; /* prompt positions run (T unless interrupted during the prompt;
                            * the prompt's records are written only once all T have run, so
                            * n_prompt_run < T means no trace was kept) */
    bool kvzip_stopped;    /* interrupted in the kvzip pass: the trace holds no kvzip_score */
};

/** Run a checkpoint over a prompt (given, or generated from BOS with the seed) and G greedy
 *  decode steps, capturing K, V, the last W queries (and Q_all, column sums if asked), the
 *  decode steps and the token tables into `out_path` through kvt_capture_*.
 * @param res may be NULL; otherwise filled (free its arrays with kvt_free).
 * @param want_logits keep every position's logits in res->logits.
 * @return KVT_OK (also when keep_going stopped the run: stopped in the decode steps, the
 *         trace is finished, with an index and trailer, and holds the prompt and the decode
 *         steps completed before the stop, its meta_json capture_stats.n_decode fewer than the
 *         header's n_decode; stopped inside the prompt, nothing replayable was captured and the
 *         file the run wrote is removed: no file at out_path, or with writer.force over an
 *         existing trace, its temporary file is removed and the existing trace is unchanged.
 *         The trace writer may still have logged, while closing, that the new trace stays in
 *         that temporary file) or the first error (model, options, capture, write, KVT_ERR_IO
 *         when that file cannot be removed) with a message. */
kvt_status kvt_llama2c_capture(const char *model_path, const struct kvt_llama2c_capture_opts *o,
                               const char *out_path, struct kvt_llama2c_capture_result *res,
                               bool want_logits);

#ifdef __cplusplus
}
#endif
#endif /* KVT_LLAMA2C_H */
