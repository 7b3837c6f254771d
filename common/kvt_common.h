/* kvt_common.h - status codes, logging, checked allocation with a failure hook, dtype
 * conversion (f16/bf16/f32), and a monotonic clock. The bottom of the kvtrace stack:
 * depends on libc only, and every other module uses it.
 */
#ifndef KVT_COMMON_H
#define KVT_COMMON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- status codes: fixed numbers, never renumbered (append only) ---- */
typedef enum kvt_status {
    KVT_OK = 0,
    KVT_ERR_IO = -1,           /* read/write/open failed (errno is in the message) */
    KVT_ERR_CORRUPT = -2,      /* input bytes are not a valid trace / file */
    KVT_ERR_VERSION = -3,      /* trace format version this reader does not know */
    KVT_ERR_NOMEM = -4,        /* an allocation failed */
    KVT_ERR_NO_CUDA = -5,      /* built without CUDA, or no device */
    KVT_ERR_CUDA = -6,         /* a CUDA call failed */
    KVT_ERR_INVALID_ARG = -7,  /* caller passed a bad argument */
    KVT_ERR_NOT_FOUND = -8,    /* requested record / tensor / key is absent */
    KVT_ERR_STATE = -9,        /* call out of order (e.g. append after finish) */
    KVT_ERR_OVERFLOW = -10,    /* a size computation overflowed */
    KVT_ERR_TRUNCATED = -11,   /* input ends early */
    KVT_ERR_CHECKSUM = -12,    /* a checksum did not match */
    KVT_ERR_UNSUPPORTED = -13, /* valid input, but a feature this build lacks */
    KVT_ERR_NAN = -14,         /* NaN or Inf where a finite number is required */
} kvt_status;

/** Short constant English name of a status ("corrupt input"). Never NULL. */
const char *kvt_status_str(kvt_status s);

/* ---- error messages: the last error detail of the calling thread ---- */
/** Record a formatted message for the calling thread and return `s` (for chaining). */
kvt_status kvt_error_set(kvt_status s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/** The calling thread's last error message ("" if none). Owned by the library, valid until
 *  the next kvt call on this thread. */
const char *kvt_error_msg(void);
void kvt_error_clear(void);

#define KVT_RETURN_IF(cond, status, ...)                                                           \
    do {                                                                                           \
        if (cond)                                                                                  \
            return kvt_error_set((status), __VA_ARGS__);                                           \
    } while (0)
#define KVT_FORWARD(expr)                                                                          \
    do {                                                                                           \
        kvt_status kvt_fwd_s_ = (expr);                                                            \
        if (kvt_fwd_s_ != KVT_OK)                                                                  \
            return kvt_fwd_s_;                                                                     \
    } while (0)

/* ---- logging (stderr); level from KVT_LOG=error|warn|info|debug, default warn ---- */
typedef enum { KVT_LOG_ERROR = 0, KVT_LOG_WARN, KVT_LOG_INFO, KVT_LOG_DEBUG } kvt_log_level;
void kvt_log(kvt_log_level lvl, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void kvt_log_set_level(kvt_log_level lvl);
/* A display that owns the current stderr line (a progress line) writes each message itself,
 * under the log's lock: `line` is the whole message with its newline; the hook ends its own
 * line first and writes it under the display's lock, so no redraw lands in between. NULL
 * restores plain writes to stderr. */
typedef void (*kvt_log_hook)(void *user, const char *line);
void kvt_log_set_hook(kvt_log_hook write_line, void *user);

/* ---- allocation with a failure hook (fault injection in tests) ---- */
void *kvt_malloc(size_t n);
void *kvt_calloc(size_t count, size_t size);
void *kvt_realloc(void *p, size_t n);
void kvt_free(void *p);
char *kvt_strdup(const char *s);
/** Keep this thread's freed blocks of 1 MiB and more for its next allocations of about the
 *  same size (a worker that allocates the same arrays for every layer), until
 *  kvt_alloc_cache_end() frees them. Blocks must then be freed by kvt_free (as always). */
void kvt_alloc_cache_begin(void);
void kvt_alloc_cache_end(void);
/** Free the cached blocks that no allocation took since the previous trim (a worker calls it
 *  after each layer, so the cache holds at most what one layer frees and the next reuses). */
void kvt_alloc_cache_trim(void);
/** Bytes this thread's cache holds now. */
size_t kvt_alloc_cache_bytes(void);
/** Make the n-th kvt_* allocation from now fail (1 = the next one); 0 disables. Counts all
 *  threads. Returns the number of allocations made since the last call. For tests. */
uint64_t kvt_alloc_fail_at(uint64_t n);
/** true if the injected failure has fired since the last kvt_alloc_fail_at(). */
bool kvt_alloc_fail_fired(void);

/** *out = a*b; returns true on overflow (and leaves *out unspecified). */
static inline bool kvt_mul_overflow(size_t a, size_t b, size_t *out)
{
    return __builtin_mul_overflow(a, b, out);
}
static inline bool kvt_add_overflow(size_t a, size_t b, size_t *out)
{
    return __builtin_add_overflow(a, b, out);
}

/* ---- dtypes: codes are part of the trace format (traces/FORMAT.md), never renumber ---- */
typedef enum kvt_dtype {
    KVT_DTYPE_INVALID = 0,
    KVT_DTYPE_F16 = 1,
    KVT_DTYPE_BF16 = 2,
    KVT_DTYPE_F32 = 3,
    KVT_DTYPE_I32 = 4,
    KVT_DTYPE_U8 = 5,
} kvt_dtype;

/** Bytes per element (0 for an unknown code). */
size_t kvt_dtype_size(kvt_dtype dt);
/** "f16", "bf16", "f32", "i32", "u8" or NULL. */
const char *kvt_dtype_name(kvt_dtype dt);
/** Parse "f16"/"fp16"/"float16", "bf16"/"bfloat16", "f32"/"fp32"/"float32". */
kvt_dtype kvt_dtype_from_name(const char *name);
bool kvt_dtype_is_float(kvt_dtype dt);

float kvt_f16_to_f32(uint16_t h);
uint16_t kvt_f32_to_f16(float f); /* round to nearest even, Inf/NaN kept */
float kvt_bf16_to_f32(uint16_t b);
uint16_t kvt_f32_to_bf16(float f); /* round to nearest even, NaN kept quiet */

/** Convert n elements of a float dtype to f32 (dst may not alias src). */
kvt_status kvt_convert_to_f32(kvt_dtype src_dt, const void *src, float *dst, size_t n);
/** Convert n f32 values to a float dtype (f16/bf16 round to nearest even). */
kvt_status kvt_convert_from_f32(kvt_dtype dst_dt, const float *src, void *dst, size_t n);

/* ---- misc ---- */
/** "0.1.0": the library version. */
const char *kvt_version_string(void);
/** The ABI these headers describe: bumped when a public struct or signature changes (3:
 *  kvt_capture_model and kvt_layer_input gained RoPE details; 4: kvt_layer_input's 16-bit K
 *  and V; 5: kvt_layer_input's K and V as stored, kvt_replay_profile's K and V bytes). An
 *  engine that may load another build of libkvtrace.so checks kvt_abi_version() ==
 *  KVT_ABI_VERSION before any other call. */
#define KVT_ABI_VERSION 5
/** The ABI of the loaded libkvtrace.so (only the shared library defines it). */
int kvt_abi_version(void);
/** Monotonic time in nanoseconds. */
uint64_t kvt_now_ns(void);
/** Number of online CPUs (>= 1). */
int kvt_cpu_count(void);
/** Memory this process can still take, in bytes: the smallest of the system's MemAvailable
 *  (/proc/meminfo) and the room under each cgroup memory limit on the process's cgroup or an
 *  ancestor (v2 memory.max, v1 memory.limit_in_bytes): the limit less the usage, the
 *  inactive page cache not counted as used. 0 when none of them can be read. Tests set
 *  KVT_TEST_MEM_ROOT to read a made-up machine's files instead (kvt_mem_available_in). */
uint64_t kvt_mem_available(void);
/** kvt_mem_available with every path under `root` (root + "/proc/meminfo", ... + "/sys/fs/
 *  cgroup/..."): for tests. */
uint64_t kvt_mem_available_in(const char *root);

/** Create a new temporary file next to `path` (the same directory, so that rename is atomic)
 *  for writing (O_EXCL, mode & ~umask): PATH.tmp.PID.N when its last component fits in
 *  NAME_MAX, else DIR/.kvt-PID-N.tmp, N counting the calls of the process, skipping names a
 *  killed process left behind. *tmp receives its name (caller frees with kvt_free).
 *  @return the descriptor, or -1 with errno set (*tmp NULL). */
int kvt_create_tmp_sibling(const char *path, unsigned mode, char **tmp);
/** The caller is done with the temporary `tmp` from kvt_create_tmp_sibling (renamed, removed,
 *  or kept on purpose): kvt_tmp_remove_on_signals no longer removes it. */
void kvt_tmp_forget(const char *tmp);
/** A temporary directory of plain files (a report's staging directory), removed with its
 *  files by kvt_tmp_remove_on_signals until kvt_tmp_dir_forget; one at a time (a second is not
 *  registered). */
void kvt_tmp_dir_remember(const char *dir);
void kvt_tmp_dir_forget(const char *dir);
/** For a command: SIGINT, SIGTERM and SIGHUP remove the temporaries still being written (a
 *  replay's selection export, a results.json, synth --force's new trace, a report's staging
 *  directory), then end the process by the signal as before. */
void kvt_tmp_remove_on_signals(void);
/** The file an output written to `path` replaces, as a trace does: `path`, or where it is a
 *  symbolic link its target (the link stays and points at the new file). *final receives it
 *  (kvt_free it), *mode the existing file's permissions, or -1 when there is none.
 * @return KVT_OK, KVT_ERR_IO (a link to a missing file), KVT_ERR_NOMEM. */
kvt_status kvt_output_target(const char *path, char **final, int *mode);

/* ---- UTF-8 text (JSON holds nothing else) ---- */
/** The offset of the first byte of `s` that does not begin a valid UTF-8 sequence (an overlong
 *  form, a surrogate, past U+10FFFF, a cut sequence), or -1 when all of `s` is valid. */
ptrdiff_t kvt_utf8_invalid_at(const char *s);
/** Replace each byte of `s` that is not part of a valid UTF-8 sequence with '?', in place (a
 *  name derived from a file name, before it goes into JSON). Returns how many it replaced. */
size_t kvt_utf8_sanitize(char *s);
/** Read the regular file `path` whole into a new NUL-terminated buffer (*txt, kvt_free it; *len
 *  bytes before the NUL). KVT_ERR_IO (cannot open, not a regular file, a read error),
 *  KVT_ERR_INVALID_ARG (more than max_bytes: the message says so), KVT_ERR_NOMEM. */
kvt_status kvt_read_text_file(const char *path, size_t max_bytes, char **txt, size_t *len);
/** Write `len` bytes of `txt` plus a newline to `path` atomically: a temporary sibling
 *  (kvt_create_tmp_sibling, mode 0666 & ~umask, or the replaced file's), fsync, rename over
 *  `path` (a symbolic link's target: kvt_output_target), fsync the directory. On any failure
 *  the temporary is removed and `path` is untouched.
 * @return KVT_OK, KVT_ERR_IO (the message names the file and errno), KVT_ERR_NOMEM. */
kvt_status kvt_write_file_atomic(const char *path, const char *txt, size_t len);
/** fsync the directory holding `path`, so that a rename into it is durable (best effort). */
void kvt_fsync_dir_of(const char *path);
/** The directory part of `path` into dir ("." without a slash, "/" for a file in the root). */
void kvt_dir_of(const char *path, char *dir, size_t cap);
/** x as the shortest of %.15g / %.16g / %.17g that reads back as x, into buf. */
void kvt_fmt_double(double x, char *buf, size_t cap);

/** Open an input for reading only if it is a regular file: opened without blocking (a FIFO
 *  would wait for a writer forever), checked with fstat, then made blocking again.
 *  @return a descriptor, or -1 with errno set (EINVAL: not a regular file). */
int kvt_open_regular(const char *path);
/** kvt_open_regular as a stdio stream ("rb"); NULL with errno set. */
FILE *kvt_fopen_regular(const char *path);
/** The message for a failed kvt_open_regular / kvt_fopen_regular of `path` (errno): "PATH: not
 *  a regular file" or "PATH: REASON", in a static per-thread buffer. */
const char *kvt_open_error(const char *path);

/** Deterministic xorshift64* generator (tests, synth, random policy); never rand(). */
typedef struct kvt_rng {
    uint64_t s;
} kvt_rng;
void kvt_rng_seed(kvt_rng *r, uint64_t seed);
uint64_t kvt_rng_u64(kvt_rng *r);
double kvt_rng_uniform(kvt_rng *r); /* [0,1) */
double kvt_rng_normal(kvt_rng *r);  /* standard normal (Box-Muller) */

#ifdef __cplusplus
}
#endif
#endif /* KVT_COMMON_H */
