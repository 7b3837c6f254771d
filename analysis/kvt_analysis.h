/* kvt_analysis.h - what kvtrace concludes from a replay: the results of one or more traces
 * (kvt_trace_result, filled by replay/), their aggregation per layer, per model and per
 * modality, the versioned results.json writer and reader (the only input of report/ and
 * recommend), and the selection export (kept indices per policy, budget, layer and head).
 * Every field is documented in analysis/RESULTS.md.
 */
#ifndef KVT_ANALYSIS_H
#define KVT_ANALYSIS_H

#include "kvt_common.h"
#include "kvt_replay.h"

struct cJSON;
/** x as a raw cJSON number that reads back bit-exact (the shortest of %.15g/%.16g/%.17g that
 *  round-trips, kvt_fmt_double; cJSON's own printer accepts a 1-ulp difference), or null for
 *  NaN and +-Inf; NULL when out of memory. How results.json, e2e.json and `recommend --e2e
 *  --json` write their numbers. */
struct cJSON *kvt_json_number(double x);

#ifdef __cplusplus
extern "C" {
#endif

#define KVT_RESULTS_VERSION 1 /* results.json "results_version"; bump on incompatible change */
/* selection export version (1: no end record; 3: an export with a per-step policy or two
 * budgets, whose binary layout may hold a set as its changes from the step's or the budget's
 * before) */
#define KVT_SELECTION_VERSION 3

typedef struct kvt_results_policy {
    char *label;        /* the spec as given, unique in a run */
    char *name;         /* registry name */
    char *options_json; /* effective options, a JSON object text */
    unsigned flags;     /* KVT_POLICY_* */
} kvt_results_policy;

/** A replay of several traces (prompts) with one set of policies and budgets. */
typedef struct kvt_results {
    int results_version;
    char *generator; /* "kvtrace 0.1.0" */
    size_t n_policies;
    kvt_results_policy *policies;
    size_t n_budgets;
    kvt_budget *budgets;
    uint64_t seed;
    int coverage_probes;
    int n_threads;
    char device[8]; /* where the layer contexts were computed: "cpu" or "cuda" */
    bool per_query_head;
    size_t n_traces;
    kvt_trace_result **traces; /* owned */
    /* partial result of `replay --shard index/count` (RESULTS.md "shard"); count 0 = complete */
    int shard_index, shard_count;
    size_t n_units; /* (trace, layer) units replayed by this shard */
    int *units;     /* [n_units][2]: trace index, layer; owned */
} kvt_results;

/** Create an empty result set with these settings (copied). Free with kvt_results_free. */
kvt_status kvt_results_create(kvt_policy *const *pols, size_t n_pol, const kvt_budget *budgets,
                              size_t n_budgets, kvt_results **out);
/** Append a trace; takes ownership of t (also on failure). Its policies and budgets must
 *  match the result set's. */
kvt_status kvt_results_add_trace(kvt_results *r, kvt_trace_result *t);
void kvt_results_free(kvt_results *r);
/** Mark r as shard `index` of `count` with these (trace index, layer) units [n_units][2]
 *  (copied). */
kvt_status kvt_results_set_shard(kvt_results *r, int index, int count, const int *units,
                                 size_t n_units);
/** Combine the partial results of every shard of one sharded replay into the result one
 *  unsharded run gives, in place: on success parts[0] holds the merged, complete result (no
 *  shard). Checks first that the parts have the same settings (policies, budgets, seed,
 *  coverage probes, heads, traces, shard count), that each shard index appears once and each
 *  (trace, layer) unit exactly once; on failure nothing is modified. Per-head metrics and
 *  r_all (also by modality) are copied unit by unit; every aggregate is recomputed from them
 *  when written.
 * @param names [n] file names for messages (may be NULL).
 * @return KVT_OK, KVT_ERR_INVALID_ARG (a message naming the mismatch), KVT_ERR_NOMEM. */
kvt_status kvt_results_merge(kvt_results *const *parts, const char *const *names, size_t n);

/** Write results.json (RESULTS.md). Fails with KVT_ERR_IO if the file exists and !force.
 *  Written to PATH.tmp then renamed, so a reader never sees half a file. */
kvt_status kvt_results_write(const kvt_results *r, const char *path, bool force);
/** Read a results.json written by kvt_results_write (any results_version <= ours).
 * @return KVT_OK, KVT_ERR_IO, KVT_ERR_CORRUPT, KVT_ERR_VERSION (newer file). */
kvt_status kvt_results_read(const char *path, kvt_results **out);
/** The text kvt_results_write writes (without its final newline), in kvt_malloc'ed memory
 *  (*txt, NUL-terminated, *len bytes; kvt_free it): how a result travels between processes. */
kvt_status kvt_results_to_json(const kvt_results *r, char **txt, size_t *len);
/** Parse `len` bytes of results.json text as kvt_results_read does; `name` names it in
 *  messages. */
kvt_status kvt_results_parse(const char *txt, size_t len, const char *name, kvt_results **out);

/* ---- aggregation ---- */

/** Model-, layer- or run-level summary of one (policy, budget). Metric means skip NaN
 *  (not applicable) entries; a mean over nothing is NaN. */
typedef struct kvt_run_summary {
    double n_keep; /* mean kept entries per head and layer */
    double recall_window, err_window, recall_decode, err_decode;
    double coverage, coverage_radius, r_kept, r_all, oracle_overlap;
    double coverage_dropped, head_overlap;
    double recall_window_mod[KVT_N_MODALITIES];
    double coverage_mod[KVT_N_MODALITIES];
    double r_kept_mod[KVT_N_MODALITIES]; /* mean head redundancy of each modality's kept keys */
    double r_all_mod[KVT_N_MODALITIES];  /* mean head redundancy of each modality's keys */
    double kept_mod[KVT_N_MODALITIES];   /* kept entries of each modality, summed */
    double total_mod[KVT_N_MODALITIES];  /* entries of each modality in the full cache, summed */
    double kept_entries;                 /* sum over layers and heads of n_keep */
    double full_entries;                 /* L * Hkv * T: entries of the uncompressed cache */
    double kept_bytes;                   /* kept_entries * D * 2 (K and V) * element bytes */
    double full_bytes;
    double compression_ratio; /* full_bytes / kept_bytes */
    double kept_fraction;     /* kept_entries / full_entries */
} kvt_run_summary;

/** Summary of (policy, budget) over every layer and head of one trace; layer >= 0 restricts it
 *  to that layer. */
kvt_status kvt_summarize_trace(const kvt_trace_result *t, size_t pol, size_t bud, int layer,
                               kvt_run_summary *out);
/** Summary over all traces: metric means are the mean of the per-trace means; entries and
 *  bytes are summed; ratios recomputed from the sums. */
kvt_status kvt_summarize_results(const kvt_results *r, size_t pol, size_t bud,
                                 kvt_run_summary *out);

/* ---- selection export ---- */
typedef struct kvt_selection_writer kvt_selection_writer;

/** Open a selection export. A path ending in ".json" writes JSON, anything else the binary
 *  layout of RESULTS.md. trace_paths [n_traces] are recorded in the header.
 * @param out free with kvt_selection_writer_close. */
kvt_status kvt_selection_writer_open(const char *path, bool force, kvt_policy *const *pols,
                                     size_t n_pol, const kvt_budget *budgets, size_t n_budgets,
                                     const char *const *trace_paths, size_t n_traces,
                                     kvt_selection_writer **out);
/** Start trace `trace_idx` with its layer count and resolved budget tokens [n_budgets]. Records
 *  are then written in layer order whatever order the workers finish in. */
kvt_status kvt_selection_writer_begin_trace(kvt_selection_writer *w, int trace_idx, int n_layers,
                                            const int *budget_tokens);
/** A kvt_selection_sink: pass it with the writer as user pointer. Thread-safe. The records may
 *  come in any order within a layer (the file's order is restored at its last call); each
 *  record's delta base (the step or budget before it, same policy and head) is found in the
 *  same call, or, for the step before, in an earlier call of the layer, as the replay's calls
 *  give them. A whole layer in one call: last = true. */
kvt_status kvt_selection_writer_sink(void *writer, int layer, const kvt_selection_rec *recs,
                                     size_t n_recs, bool last);
/** Finish the trace (all its layers must have arrived). */
kvt_status kvt_selection_writer_end_trace(kvt_selection_writer *w);
/** kvt_selection_writer_open for the part of `replay --shard shard_index/shard_count`: the
 *  header gains "shard": {"index", "count", ...} (RESULTS.md) with the fields of the JSON
 *  object shard_extra (may be NULL): the settings every part of one replay shares (seed,
 *  policy options, trace fingerprints), which kvt_selection_merge compares. Each trace is
 *  begun with kvt_selection_writer_begin_trace_part. shard_count 0 = kvt_selection_writer_open.
 */
kvt_status kvt_selection_writer_open_part(const char *path, bool force, kvt_policy *const *pols,
                                          size_t n_pol, const kvt_budget *budgets, size_t n_budgets,
                                          const char *const *trace_paths, size_t n_traces,
                                          int shard_index, int shard_count, const char *shard_extra,
                                          kvt_selection_writer **out);
/** begin_trace for a part: only the layers with mask[l] != 0 will come (mask NULL: all). */
kvt_status kvt_selection_writer_begin_trace_part(kvt_selection_writer *w, int trace_idx,
                                                 int n_layers, const int *budget_tokens,
                                                 const uint8_t *mask);
/** A writer whose header is that of a read export h (policies, budgets, traces; no shard):
 *  how kvtrace merge writes the export of the parts' records (kvt_selection_merge). */
struct kvt_selection_header;
kvt_status kvt_selection_writer_open_like(const char *path, bool force,
                                          const struct kvt_selection_header *h,
                                          kvt_selection_writer **out);
/** A writer without a file, for one process of several (an MPI launch): the layers it is given
 *  are encoded as the export at `path` (binary or JSON by its name) will hold them, and kept
 *  per (trace, layer) for kvt_selection_writer_take_block; end_trace accepts any subset of a
 *  trace's layers. Close it with kvt_selection_writer_close. */
kvt_status kvt_selection_writer_open_blocks(const char *path, kvt_policy *const *pols, size_t n_pol,
                                            size_t n_budgets, size_t n_traces,
                                            kvt_selection_writer **out);
/** Blocks writer: hand over the encoded records of one ended trace's layer (*bytes: kvt_free
 *  it; *n bytes, *n_recs records). KVT_ERR_NOT_FOUND if that layer was not given here (or was
 *  taken already). */
kvt_status kvt_selection_writer_take_block(kvt_selection_writer *w, int trace, int layer,
                                           char **bytes, size_t *n, size_t *n_recs);
/** File writer: write a layer of the current trace that a blocks writer encoded (the bytes of
 *  take_block; ownership passes, also on failure), as if its records had come through the
 *  sink. */
kvt_status kvt_selection_writer_put_block(kvt_selection_writer *w, int layer, char *bytes, size_t n,
                                          size_t n_recs);
/** Finish the file (JSON closing brackets) and close it. The export is written under a
 *  temporary name in the same directory and renamed to its path here, only when every trace
 *  that was begun also ended and no write failed; otherwise the temporary is removed, an
 *  existing file at the path is left as it was, and the first error seen is returned. */
kvt_status kvt_selection_writer_close(kvt_selection_writer *w);
/** Close without publishing, complete or not: the temporary is removed and an existing file
 *  at the path is left as it was (for a caller whose other output failed). NULL is a no-op. */
void kvt_selection_writer_discard(kvt_selection_writer *w);

/** Merge the selection exports of every shard of one `replay --shard i/n --export-selection`
 *  (n parts, any order) into `out` (binary, or JSON if it ends in .json): the export one
 *  unsharded replay writes, byte for byte. Refuses whole exports, parts of other replays
 *  (policies, budgets, traces), a shard missing or given twice, and a layer in a part that
 *  does not own it; on failure nothing is written and an existing `out` stays.
 * @return KVT_OK, KVT_ERR_INVALID_ARG (a message naming the mismatch), KVT_ERR_IO, the
 *  reader's errors. */
kvt_status kvt_selection_merge(const char *const *paths, size_t n, const char *out, bool force);

/* ---- selection export reader (analysis/selection_read.c) ---- */
typedef struct kvt_selection kvt_selection;

#define KVT_SELECTION_FLAG_STEP   0x1u /* record is a per-decode-step set (step >= 0) */
#define KVT_SELECTION_FLAG_MERGED 0x2u /* indices are merged representatives (lightkv-like) */
#define KVT_SELECTION_FLAG_QHEAD  0x4u /* head is a query head (else a KV head) */
/* in the binary file only (version 3): the record holds its set's changes from the set of
 * the step before (DELTA) or of the budget before (BDELTA), same policy, layer and head; the
 * reader gives every record whole, without these flags */
#define KVT_SELECTION_FLAG_DELTA  0x8u
#define KVT_SELECTION_FLAG_BDELTA 0x10u

/** A policy as the export's header records it. */
typedef struct kvt_selection_policy {
    const char *label; /* the spec as given */
    const char *name;  /* registry name */
    bool query_heads;  /* granularity "query_head" (else "kv_head") */
    bool per_step;
    bool merged;
} kvt_selection_policy;

/** The header of an export; every pointer is owned by the kvt_selection, valid until
 *  kvt_selection_free. */
typedef struct kvt_selection_header {
    int selection_version;
    const char *generator;
    bool json; /* read from the JSON layout (else binary) */
    size_t n_policies;
    const kvt_selection_policy *policies; /* [n_policies] */
    size_t n_budgets;
    const char *const *budgets; /* [n_budgets] budget texts ("64", "10%") */
    size_t n_traces;
    const char *const *traces; /* [n_traces] trace paths */
    size_t n_records;
    int shard_index, shard_count; /* a part of replay --shard I/N; count 0: a whole export */
    const char *shard_settings;   /* the part's "shard" object but its index (JSON), or NULL */
} kvt_selection_header;

/** One kept set (RESULTS.md "Selection export"). idx is owned by the kvt_selection. */
typedef struct kvt_selection_record {
    int trace, policy, budget; /* indices into the header's lists */
    int layer, head;
    int step;          /* -1: the set kept for the prompt; s >= 0: decode step s */
    unsigned flags;    /* KVT_SELECTION_FLAG_* */
    int budget_tokens; /* the budget in tokens for this trace */
    size_t n;
    const int32_t *idx; /* [n] token indices, ascending and unique */
} kvt_selection_record;

/** Read a selection export written by kvt_selection_writer_close, binary or JSON (detected
 *  from the content: a JSON file starts with '{'). Every count, length and index is checked
 *  against the file before use; a delta record (version 3) is checked by applying it to its
 *  base. Memory is the file, the whole records' sets and one set in every 32 links of a
 *  chain of delta records: the others are expanded on access (kvt_selection_copy_set, or
 *  kvt_selection_record_at and _find, which then hold the set until kvt_selection_free). The
 *  accessors may be called from several threads.
 * @param out caller frees with kvt_selection_free.
 * @return KVT_OK, KVT_ERR_IO (cannot read, not a regular file), KVT_ERR_CORRUPT (the message
 *  names what is wrong and the byte offset or record), KVT_ERR_VERSION (newer export),
 *  KVT_ERR_NOMEM. */
kvt_status kvt_selection_read(const char *path, kvt_selection **out);
void kvt_selection_free(kvt_selection *s);
/** The header; owned by s, valid until kvt_selection_free. */
const kvt_selection_header *kvt_selection_get_header(const kvt_selection *s);
/** Record i (0 <= i < n_records) in file order with its whole set, or NULL (i out of range,
 *  or no memory to expand a delta record's set); owned by s. A delta record's set stays
 *  expanded until kvt_selection_free: to walk every record, use kvt_selection_record_info and
 *  kvt_selection_copy_set, which hold nothing. */
const kvt_selection_record *kvt_selection_record_at(const kvt_selection *s, size_t i);
/** Record i's fields into *out without expanding its set: out->n is the set's size, out->idx
 *  the set where s holds it whole, else NULL.
 * @return KVT_OK or KVT_ERR_INVALID_ARG (no record i). */
kvt_status kvt_selection_record_info(const kvt_selection *s, size_t i, kvt_selection_record *out);
/** Record i's set, ascending, into dst[cap] (cap >= its n), expanded without being kept: a
 *  walk in file order applies one delta a record.
 * @return KVT_OK, KVT_ERR_INVALID_ARG (no record i, or cap too small), KVT_ERR_NOMEM. */
kvt_status kvt_selection_copy_set(const kvt_selection *s, size_t i, int32_t *dst, size_t cap);
/** The record number of (trace, policy, budget, layer, head, step) into *i.
 * @return KVT_OK or KVT_ERR_NOT_FOUND (*i SIZE_MAX). */
kvt_status kvt_selection_find_record(const kvt_selection *s, int trace, int policy, int budget,
                                     int layer, int head, int step, size_t *i);
/** The kept indices of (trace, policy, budget, layer, head, step); step -1 is the prompt-time
 *  set. *idx is owned by s, valid until kvt_selection_free (a delta record's set is expanded
 *  and held from then on).
 * @return KVT_OK, KVT_ERR_NOT_FOUND (no such record: *idx NULL, *n 0), KVT_ERR_NOMEM. */
kvt_status kvt_selection_find(const kvt_selection *s, int trace, int policy, int budget, int layer,
                              int head, int step, const int32_t **idx, size_t *n);
/** Shape of (trace, policy) as its records give it: layers (1 + largest layer), heads (1 +
 *  largest head) and decode steps (1 + largest step, 0 if none). All 0 if it has no record.
 *  Computed at open: a lookup is a binary search.
 * @return KVT_OK or KVT_ERR_INVALID_ARG (trace or policy outside the header's lists). */
kvt_status kvt_selection_shape(const kvt_selection *s, int trace, int policy, int *n_layers,
                               int *n_heads, int *n_steps);
/** Every head's kept set of (trace, policy, budget, layer, step) as one mask: out[h * n_tokens
 *  + j] is 1 where head h keeps token j, else 0, for the heads of kvt_selection_shape (out has
 *  cap bytes, at least heads x n_tokens). At a decode step 0 <= step < the policy's steps, a
 *  per-step policy's head without a set of its own there (one that does not re-select) keeps
 *  its prompt-time set, as the replay measured it. One call for what a caller would otherwise
 *  find, size and copy head by head (kvtrace.Selection.mask, kvtrace.hf.e2e's step masks).
 * @return KVT_OK, KVT_ERR_NOT_FOUND (a head has no such set), KVT_ERR_INVALID_ARG (trace or
 *         policy unknown, cap too small, a kept token at or beyond n_tokens), KVT_ERR_NOMEM. */
kvt_status kvt_selection_mask(const kvt_selection *s, int trace, int policy, int budget, int layer,
                              int step, size_t n_tokens, uint8_t *out, size_t cap);

#ifdef __cplusplus
}
#endif
#endif /* KVT_ANALYSIS_H */
