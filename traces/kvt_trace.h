/* kvt_trace.h - the .kvt trace container: a streaming writer (thread pool, bounded memory,
 * deterministic output) and a random-access reader with crash recovery and verification.
 * Byte layout: traces/FORMAT.md. Sits between capture/ (which writes) and replay/ (reads).
 *
 * Dimension letters: L layers, Hq query heads, Hkv KV heads, T prompt tokens, W window
 * queries, G decode steps, D head dim. A tensor record holds the rectangle
 * [head_begin, head_end) x [tok_begin, tok_end) x D of one (layer, kind) tensor.
 */
#ifndef KVT_TRACE_H
#define KVT_TRACE_H

#include "kvt_common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Format identity. Bump KVT_FORMAT_MAJOR on any layout-breaking change (readers reject an
 * unknown major) and KVT_FORMAT_MINOR when adding kinds/filters (readers skip unknown kinds). */
#define KVT_FORMAT_MAJOR      1
#define KVT_FORMAT_MINOR      1
#define KVT_FILE_MAGIC        0x5254564Bu /* "KVTR" as bytes on disk */
#define KVT_REC_MAGIC         0x4352564Bu /* "KVRC" */
#define KVT_END_MAGIC         0x4554564Bu /* "KVTE" */
#define KVT_FRAME_HEADER      0x184D2A5Au /* zstd skippable frame magics used by kvtrace */
#define KVT_FRAME_RECORD      0x184D2A5Bu
#define KVT_FRAME_INDEX       0x184D2A5Du
#define KVT_FRAME_END         0x184D2A5Fu
#define KVT_REC_HEADER_BYTES  88u /* record header (user data of a KVT_FRAME_RECORD frame) */
#define KVT_INDEX_ENTRY_BYTES 96u
#define KVT_TRAILER_BYTES     32u /* whole trailer frame, the last bytes of a complete file */

/* Record kinds: codes are part of the format, never renumber. */
typedef enum kvt_kind {
    KVT_KIND_K = 1,           /* [Hkv, T, D] post-RoPE prompt keys */
    KVT_KIND_V = 2,           /* [Hkv, T, D] prompt values */
    KVT_KIND_Q_WINDOW = 3,    /* [Hq, W, D] last W prompt queries, post-RoPE */
    KVT_KIND_Q_DECODE = 4,    /* [Hq, G, D] decode-step queries */
    KVT_KIND_K_DECODE = 5,    /* [Hkv, G, D] */
    KVT_KIND_V_DECODE = 6,    /* [Hkv, G, D] */
    KVT_KIND_ATTN_COLSUM = 7, /* [Hq, T, 1] f32: sum over prompt queries of causal attention */
    KVT_KIND_Q_ALL = 8,       /* [Hq, T, D] every prompt query */
    KVT_KIND_KVZIP_SCORE = 9, /* [Hkv, T, 1] f32: KVzip's context-reconstruction score */
    KVT_KIND_TOKEN_IDS = 16,  /* [1, T, 1] i32, layer -1 */
    KVT_KIND_MODALITY = 17,   /* [1, T, 1] u8 (kvt_modality), layer -1 */
    KVT_KIND_POSITIONS = 18,  /* [P, T, 1] i32, P = 1 or 3 (M-RoPE t/h/w), layer -1 */
    KVT_KIND_DECODE_TOKEN_IDS = 19, /* [1, G, 1] i32, layer -1 */
    KVT_KIND_TOKEN_TEXT = 20,       /* [1, n, 1] u8: UTF-8 strings, each NUL-terminated, layer -1 */
    KVT_KIND_META_JSON = 32,        /* [1, n, 1] u8: a JSON object (e.g. capture stats), layer -1 */
} kvt_kind;
#define KVT_KIND_MAX 64

/** "K", "V", "Q_window", ... or NULL for an unknown code. */
const char *kvt_kind_name(int kind);
/** Inverse of kvt_kind_name (case-insensitive); 0 if unknown. */
int kvt_kind_from_name(const char *name);

typedef enum kvt_modality {
    KVT_MOD_TEXT = 0,
    KVT_MOD_IMAGE = 1,
    KVT_MOD_VIDEO = 2,
    KVT_MOD_OTHER = 3,
} kvt_modality;
const char *kvt_modality_name(int m);

typedef enum kvt_filter {
    KVT_FILTER_NONE = 0,      /* payload is the raw little-endian elements */
    KVT_FILTER_BYTEPLANE = 1, /* byte b of every element, for b = 0..size-1, plane after plane */
} kvt_filter;

/** Describes one record: what the writer appends and what the reader lists. */
typedef struct kvt_record_info {
    int kind;            /* kvt_kind */
    int32_t layer;       /* -1 for token tables and metadata */
    uint32_t head_begin; /* first head (or row) covered */
    uint32_t head_end;   /* one past the last */
    uint32_t tok_begin;  /* first token covered */
    uint32_t tok_end;
    uint32_t dim; /* D (1 for tables) */
    kvt_dtype dtype;
    /* reader-filled: */
    kvt_filter filter;
    uint32_t seq;         /* record number in order of append */
    uint64_t raw_bytes;   /* payload size before compression */
    uint64_t comp_bytes;  /* zstd frame size */
    uint64_t file_offset; /* offset of the record's header frame */
} kvt_record_info;

/* ------------------------------------------------------------------------------------- */
/* Writer                                                                                */
/* ------------------------------------------------------------------------------------- */
typedef struct kvt_trace_writer kvt_trace_writer;

/** The writer's record size when opts.max_record_bytes is 0 (the GPU capture's ring slots too). */
#define KVT_WRITER_MAX_RECORD_DEFAULT (4ull << 20)

typedef struct kvt_writer_opts {
    int level;                  /* zstd level (0 = 3); outside zstd's range: refused */
    int n_threads;              /* compression threads; 0 = compress in the caller */
    uint64_t max_pending_bytes; /* bound on queued + in-flight raw bytes; 0 = 256 MiB */
    bool no_shuffle;            /* disable the byte-plane filter (for benchmarks) */
    uint64_t max_record_bytes;  /* split tensors along heads above this; 0 = 4 MiB
                                   (KVT_WRITER_MAX_RECORD_DEFAULT) */
    bool force;                 /* overwrite an existing file */
} kvt_writer_opts;

typedef struct kvt_writer_stats {
    uint64_t n_records;
    uint64_t raw_bytes;
    uint64_t comp_bytes; /* payload frames only */
    uint64_t file_bytes; /* everything written so far */
    uint64_t stall_ns;   /* time appenders waited for queue space */
    uint64_t peak_pending_bytes;
} kvt_writer_stats;

/** Create a trace file and write its header frame. A new file is written in place (a crash
 *  leaves its complete records readable there). An existing one (opts->force) is replaced
 *  only by a successful finish: until then the trace is written to a temporary file next to
 *  it (kvt_create_tmp_sibling), which an unfinished writer leaves (and names in a warning).
 * @param path        output path; fails with KVT_ERR_IO if it exists and !opts->force, or
 *                    exists and is not a regular file (a device or FIFO is never replaced).
 * @param header_json a JSON object (see FORMAT.md §JSON header); copied.
 * @param opts        may be NULL for defaults.
 * @param out         receives the writer; caller frees with kvt_trace_writer_free.
 * @return KVT_OK, KVT_ERR_IO, KVT_ERR_INVALID_ARG (not a JSON object), KVT_ERR_NOMEM. */
kvt_status kvt_trace_writer_create(const char *path, const char *header_json,
                                   const kvt_writer_opts *opts, kvt_trace_writer **out);

/** Append a tensor or table: `data` is the row-major [head_end-head_begin, tok_end-tok_begin,
 *  dim] block described by `info` (filter/seq/bytes fields ignored). Copied before return;
 *  may block while the queue is full (the wait is counted in stats.stall_ns). Large blocks
 *  are split along heads into several records. Thread-safe. A block that overlaps one
 *  appended before to its tensor is refused (KVT_ERR_INVALID_ARG; the writer goes on). A
 *  KVT_ERR_NOMEM before any of the block's records was queued leaves the writer as it was (the
 *  same block may be appended again); one after some were queued stops the writer (sticky).
 * @return KVT_OK, KVT_ERR_INVALID_ARG, KVT_ERR_NOMEM, KVT_ERR_STATE (after finish), or the
 *         sticky error of an earlier failed write (KVT_ERR_IO...). */
kvt_status kvt_trace_writer_append(kvt_trace_writer *w, const kvt_record_info *info,
                                   const void *data);

/** The records kvt_trace_writer_append would cut `info`'s block into (groups of whole heads,
 *  or one head's tokens in chunks, each at most max_record_bytes): *n receives the count and
 *  the first min(n, cap) parts are filled, in append order. Each part's rows are a contiguous
 *  range of the block. For producers that lay out (and byte-plane split) records themselves.
 * @return KVT_OK, KVT_ERR_INVALID_ARG. */
kvt_status kvt_trace_writer_parts(const kvt_trace_writer *w, const kvt_record_info *info,
                                  kvt_record_info *parts, size_t cap, size_t *n);

/** Whether the writer byte-plane splits multi-byte elements (not opts.no_shuffle). */
bool kvt_trace_writer_shuffles(const kvt_trace_writer *w);
/** The writer's largest record payload in bytes (opts.max_record_bytes after defaults). */
uint64_t kvt_trace_writer_max_record_bytes(const kvt_trace_writer *w);
/** The file the writer writes: the trace's path, or, when it replaces an existing trace
 *  (opts.force), the temporary file next to it that only a committed finish renames over the
 *  trace (otherwise the new trace stays there and the old one is unchanged). After that
 *  rename, the trace's path (a symbolic link's target). Valid until kvt_trace_writer_free. */
const char *kvt_trace_writer_file(const kvt_trace_writer *w);

/** Append ONE record (at most max_record_bytes, e.g. a part from kvt_trace_writer_parts)
 *  whose payload is already byte-plane split (kvt_byteplane_split over its elements) when
 *  kvt_trace_writer_shuffles(w) and the element is wider than a byte, and plain otherwise.
 *  Copied before return, like kvt_trace_writer_append.
 * @return as kvt_trace_writer_append; KVT_ERR_INVALID_ARG for a record that is too large. */
kvt_status kvt_trace_writer_append_planes(kvt_trace_writer *w, const kvt_record_info *info,
                                          const void *planes);

/** kvt_trace_writer_append_planes without the copy: the payload is lent to the writer, which
 *  reads it from a compression thread and then calls release(ctx), exactly once, from
 *  whichever thread finishes with it, also when the record is refused or the writer fails
 *  (then possibly before this returns). The caller must not change or free the payload
 *  before that. release may run with the writer's lock held: it must not call the writer. A
 *  lent payload does not count against opts.max_pending_bytes and never waits for room (its
 *  lender bounds the memory); capture's device ring lends its pinned slots.
 * @return as kvt_trace_writer_append_planes (release called whatever the result);
 *         KVT_ERR_INVALID_ARG with a NULL release (the only case release is not called). */
kvt_status kvt_trace_writer_lend_planes(kvt_trace_writer *w, const kvt_record_info *info,
                                        const void *planes, void (*release)(void *ctx), void *ctx);

/** Convenience: append a JSON object as a KVT_KIND_META_JSON record. */
kvt_status kvt_trace_writer_append_json(kvt_trace_writer *w, const char *json);

/** Wait for queued records, write the index and trailer, fsync. After it, only free.
 *  Replacing an existing trace (opts.force), the new one is then renamed over it. */
kvt_status kvt_trace_writer_finish(kvt_trace_writer *w);
/** kvt_trace_writer_finish; with commit = false an existing trace it would replace is kept
 *  and the finished new one stays in its temporary file (named in a warning at free), e.g.
 *  for a capture that ended incomplete. Without an existing trace, commit changes nothing. */
kvt_status kvt_trace_writer_finish_ex(kvt_trace_writer *w, bool commit);

/** Snapshot of counters (thread-safe). */
void kvt_trace_writer_get_stats(kvt_trace_writer *w, kvt_writer_stats *out);

/** Free the writer. Without a successful finish, queued records are written (if possible)
 *  but no index/trailer is: the file is what a crash leaves, recoverable by the reader. */
void kvt_trace_writer_free(kvt_trace_writer *w);
/** Free the writer and remove the file it wrote, unless a finish committed it: for a trace
 *  that has no value unfinished (one that can be made again, as synth's). An existing trace
 *  it would have replaced (opts.force) stays as it was. */
void kvt_trace_writer_discard(kvt_trace_writer *w);

/* ------------------------------------------------------------------------------------- */
/* Reader                                                                                */
/* ------------------------------------------------------------------------------------- */
typedef struct kvt_trace_reader kvt_trace_reader;

/** Open a trace: header, then the index via the trailer; without a valid trailer, recover by
 *  a forward scan up to the last complete record (kvt_trace_reader_recovered() says so).
 * @param out caller closes with kvt_trace_reader_close.
 * @return KVT_OK, KVT_ERR_IO, KVT_ERR_CORRUPT (bad magic/header), KVT_ERR_VERSION. */
kvt_status kvt_trace_reader_open(const char *path, kvt_trace_reader **out);
void kvt_trace_reader_close(kvt_trace_reader *r);

/** The JSON header text. Owned by the reader, valid until close. */
const char *kvt_trace_reader_header_json(const kvt_trace_reader *r);
/** Format version of the file. */
void kvt_trace_reader_version(const kvt_trace_reader *r, int *major, int *minor);
/** true if the trailer/index was missing or bad and records were found by scanning. */
bool kvt_trace_reader_recovered(const kvt_trace_reader *r);
/** A one-line reason the index could not be used ("" if not recovered). */
const char *kvt_trace_reader_recovery_note(const kvt_trace_reader *r);
/** File size in bytes. */
uint64_t kvt_trace_reader_file_bytes(const kvt_trace_reader *r);
/** What the trace holds, as 16 hex digits: FNV-1a 64 over the JSON header and every record's
 *  (kind, layer, heads, tokens, dim, dtype, raw bytes, payload checksum) in file order. Two
 *  files of the same capture give the same fingerprint wherever they are; another prompt or
 *  capture gives another (the payload checksums cover the data). out: 17 bytes. */
void kvt_trace_reader_fingerprint(const kvt_trace_reader *r, char out[17]);

size_t kvt_trace_reader_n_records(const kvt_trace_reader *r);
/** Record i in file order (0 <= i < n_records). */
kvt_status kvt_trace_reader_record(const kvt_trace_reader *r, size_t i, kvt_record_info *out);

/** Shape of the (layer, kind) tensor assembled from all its records: n_heads = max head_end,
 *  n_tok = max tok_end, dim, stored dtype. KVT_ERR_NOT_FOUND if there is no record. */
kvt_status kvt_trace_reader_shape(const kvt_trace_reader *r, int32_t layer, int kind,
                                  uint32_t *n_heads, uint32_t *n_tok, uint32_t *dim,
                                  kvt_dtype *dtype);

/** Read heads [head_begin, head_end) of (layer, kind) into dst as row-major
 *  [heads, n_tok, dim] in `as_dtype` (KVT_DTYPE_INVALID = stored dtype; KVT_DTYPE_F32 converts
 *  float kinds). Touches only the records that intersect the range. Thread-safe.
 * @return KVT_OK; KVT_ERR_NOT_FOUND if (layer, kind) is absent or the range is not fully
 *         covered; KVT_ERR_INVALID_ARG if dst_cap is too small; KVT_ERR_CORRUPT or
 *         KVT_ERR_CHECKSUM for a damaged record; KVT_ERR_IO. */
kvt_status kvt_trace_reader_read(kvt_trace_reader *r, int32_t layer, int kind, uint32_t head_begin,
                                 uint32_t head_end, kvt_dtype as_dtype, void *dst, size_t dst_cap);

/** One record of a tensor read as stored (kvt_trace_reader_read_sink): the rectangle
 *  [head_begin, head_end) x [tok_begin, tok_end) x dim, its n elements row-major or, when
 *  `planes` (FORMAT.md filter 1), as byte planes: byte b of element i at b n + i. `offset`:
 *  the bytes of the tensor's records before it, in file order (where it lands when they are
 *  stored back to back). */
typedef struct kvt_trace_piece {
    uint32_t head_begin, head_end, tok_begin, tok_end;
    bool planes;
    uint64_t offset;
} kvt_trace_piece;

/** Where kvt_trace_reader_read_sink puts a tensor's records. */
typedef struct kvt_trace_sink {
    /** *buf = room for the next record's `bytes`, or NULL to stop before it */
    kvt_status (*room)(void *user, size_t bytes, void **buf);
    /** the record's elements as stored are in room's buffer */
    kvt_status (*put)(void *user, const kvt_trace_piece *p, void *buf);
    void *user;
} kvt_trace_sink;

/** Records holding (layer, kind). */
size_t kvt_trace_reader_n_pieces(const kvt_trace_reader *r, int32_t layer, int kind);

/** The records of (layer, kind) from the first-th (in file order) as the trace stores them,
 *  one at a time: each decompressed straight into the sink's room and handed to its put, no
 *  byte-plane merge, no conversion, for a caller that places the elements itself
 *  (`replay --device cuda` merges and widens them on the GPU, reading into pinned memory). *next
 *  (may be NULL): the record it stopped before (room gave NULL), or the record count. Every
 *  call first checks the whole tensor from the index (overlapping records, rows not covered:
 *  the errors of kvt_trace_reader_read); a damaged record is its error. Thread-safe. */
kvt_status kvt_trace_reader_read_sink(kvt_trace_reader *r, int32_t layer, int kind, size_t first,
                                      const kvt_trace_sink *sink, size_t *next);

/** Read one record's decoded payload (row-major rectangle, stored dtype). */
kvt_status kvt_trace_reader_read_record(kvt_trace_reader *r, size_t i, void *dst, size_t dst_cap);

/** Bytes read from the file by this reader so far (for random-access tests). */
uint64_t kvt_trace_reader_bytes_read(const kvt_trace_reader *r);

/* ------------------------------------------------------------------------------------- */
/* Verification                                                                          */
/* ------------------------------------------------------------------------------------- */
typedef struct kvt_verify_problem {
    uint64_t file_offset; /* where in the file; 0 where it has no place (something missing) */
    int32_t seq;          /* record number if known, else -1 */
    int kind;             /* record kind if known, else 0 */
    int32_t layer;
    char what[200];
} kvt_verify_problem;

typedef struct kvt_verify_report {
    bool header_ok;
    bool trailer_ok;
    bool index_ok;
    uint64_t n_records_ok; /* records whose header and payload verify */
    uint64_t n_records_bad;
    uint64_t n_records_expected; /* from the index/trailer, 0 if unknown */
    uint64_t tail_bytes_lost;    /* bytes after the last complete unit */
    size_t n_problems;
    kvt_verify_problem *problems; /* owned by the report */
} kvt_verify_report;

/** Check every header, payload checksum (decompressing each payload), the index and trailer,
 *  and record-number gaps. Returns KVT_OK if it could run (even if damage was found; see
 *  report), or KVT_ERR_IO / KVT_ERR_CORRUPT / KVT_ERR_VERSION if the file is not a trace. */
kvt_status kvt_trace_verify(const char *path, kvt_verify_report *report);
/** Progress callback: records checked so far and in total. */
typedef void (*kvt_progress_fn)(void *user, uint64_t done, uint64_t total);
/** kvt_trace_verify with a progress callback (may be NULL), called after each record. */
kvt_status kvt_trace_verify_ex(const char *path, kvt_verify_report *report,
                               kvt_progress_fn progress, void *user);
void kvt_verify_report_free(kvt_verify_report *report);

/* ---- byte-plane filter (exposed for capture/ and tests) ---- */
/** dst[b*n + i] = byte b of element i; n elements of `elem` bytes. */
void kvt_byteplane_split(const void *src, void *dst, size_t n, size_t elem);
void kvt_byteplane_merge(const void *src, void *dst, size_t n, size_t elem);

#ifdef __cplusplus
}
#endif
#endif /* KVT_TRACE_H */
