/* capture_dev.h - the device side of a capture session (internal to capture/): device views
 * are gathered on the producer's stream by a kernel into the session's own device ring (dtype
 * conversion and byte-plane split done there, one ring slot per trace record), copied to a
 * pinned host ring on a side stream behind an event, and handed to the trace writer (whose
 * threads compress and write) once their copy has completed. Backpressure: a submission that
 * finds no free slot waits for the oldest one's copy and counts the wait.
 *
 * capture_cuda.cu implements it with the CUDA runtime; capture_cuda_stub.c, built without
 * CUDA, answers KVT_ERR_NO_CUDA. Calls come from the session's thread only, with views the
 * session has checked are on this side's device (need_dev in capture_session.c).
 */
#ifndef KVT_CAPTURE_DEV_H
#define KVT_CAPTURE_DEV_H

#include "kvt_common.h"
#include "kvt_trace.h"

#ifdef __cplusplus
extern "C" {
#endif

/** A strided [H, T, D] view of device memory (strides in elements). */
typedef struct kvt_capdev_view {
    const void *data; /* element [0, 0, 0] */
    kvt_dtype dtype;  /* f32, bf16, f16 */
    int64_t n_h, n_t, n_d;
    int64_t s_h, s_t, s_d;
    void *stream; /* producer's cudaStream_t (on the device the session checked: need_dev) */
} kvt_capdev_view;

typedef struct kvt_capdev_stats {
    uint64_t d2h_bytes;      /* copied to the pinned ring */
    uint64_t stall_ns;       /* submissions waiting for a free slot */
    uint32_t n_slots;        /* ring slots */
    uint32_t peak_in_flight; /* most slots in use at once */
    uint64_t slot_bytes;     /* bytes per slot (device and pinned) */
    uint64_t device_bytes;   /* device memory held now: ring, column-sum and decode buffers */
    uint64_t peak_device_bytes;
    uint64_t pinned_bytes; /* pinned host memory held */
} kvt_capdev_stats;

typedef struct kvt_capdev kvt_capdev;

/** Create the device side on CUDA device `device` for writer w: ring of about ring_bytes (0:
 *  256 MiB) in slots of the writer's max_record_bytes, four times as much pinned host memory
 *  (slots lent to the writer until compressed; as much where that cannot be pinned), a
 *  non-blocking side stream. The caller's current device is restored before return.
 * @return KVT_OK; KVT_ERR_NO_CUDA (built without CUDA, or no usable device); KVT_ERR_CUDA
 *         (out of device or pinned memory, or another CUDA failure: the message says which). */
kvt_status kvt_capdev_create(int device, kvt_trace_writer *w, uint64_t ring_bytes,
                             kvt_capdev **out);

/** Allocate, ahead of a session, the device ring and pinned host memory that kvt_capdev_create
 *  would (ring_bytes and slot_bytes as there, 0: 256 MiB and 4 MiB): the next one created with
 *  that device and size takes them instead of allocating (pinning host memory is the slow part
 *  of opening a session). One reservation is held per process: another size or device
 *  replaces it; the same keeps it. Thread-safe.
 * @return KVT_OK; KVT_ERR_NO_CUDA; KVT_ERR_INVALID_ARG (no such device); KVT_ERR_CUDA. */
kvt_status kvt_capdev_reserve(int device, uint64_t ring_bytes, uint64_t slot_bytes);
/** Free a reservation no session took (none: nothing happens). */
void kvt_capdev_unreserve(void);
/** Bytes of the ring held by the reservation (0: none). */
uint64_t kvt_capdev_reserved_bytes(void);

/** Tokens from t0 of v as the record block `info` (kind, layer, heads [0, H), tokens
 *  [tok_begin, tok_end), dim D, stored dtype): cut into the writer's records
 *  (kvt_trace_writer_parts), each gathered on v->stream into a ring slot and queued for
 *  copying. Returns without waiting for the GPU (unless the ring is full). */
kvt_status kvt_capdev_emit(kvt_capdev *d, const kvt_capdev_view *v, int64_t t0,
                           const kvt_record_info *info);

/** Gather tokens [t0, t0 + nt) of v, converted to dst_dt (no byte planes), on v->stream into
 *  device memory: row (h, t) goes to dst + ((h * dst_h_rows) + dst_t0 + t) * D elements. */
kvt_status kvt_capdev_gather(kvt_capdev *d, const kvt_capdev_view *v, int64_t t0, int64_t nt,
                             kvt_dtype dst_dt, void *dst, int64_t dst_h_rows, int64_t dst_t0);

/** Device memory owned by the session (counted in stats.device_bytes). Zeroed on `stream`
 *  when zero is set. Freed by kvt_capdev_mem_free or at kvt_capdev_free. */
kvt_status kvt_capdev_mem_alloc(kvt_capdev *d, size_t bytes, bool zero, void *stream, void **out);
/** bytes at src (memory of CUDA device `device`) into host memory dst, after the work queued on
 *  stream (the producer's, on that device) is done: a view on another device than the
 *  session's, captured from the host. */
kvt_status kvt_capdev_copy_to_host(int device, void *stream, const void *src, size_t bytes,
                                   void *dst);
void kvt_capdev_mem_free(kvt_capdev *d, void *p);

/** A point in a stream's work: what was enqueued on it before kvt_capdev_mark_at, for other
 *  streams (kvt_capdev_after, kvt_capdev_side_after) or the host (kvt_capdev_mark_sync) to
 *  wait for. Marks are events the device side owns (freed with it), so the session keeps no
 *  engine stream beyond the call that handed it: a buffer's producer marks it, its consumer
 *  waits for the mark. */
typedef struct kvt_capdev_mark kvt_capdev_mark;
/** Record *m (created on first use) at the end of the work enqueued so far on `stream`. A
 *  wait already enqueued on the mark keeps the point it saw. */
kvt_status kvt_capdev_mark_at(kvt_capdev *d, kvt_capdev_mark **m, void *stream);
/** Work enqueued on `stream` from now on waits for m (NULL: nothing). The host does not wait. */
kvt_status kvt_capdev_after(kvt_capdev *d, const kvt_capdev_mark *m, void *stream);
/** The same for the session's own side stream (its copies to the host). */
kvt_status kvt_capdev_side_after(kvt_capdev *d, const kvt_capdev_mark *m);
/** The host waits for m (NULL: nothing). */
kvt_status kvt_capdev_mark_sync(kvt_capdev *d, const kvt_capdev_mark *m);

/** Copy bytes from device to host on the side stream after `after` (NULL: no mark; the side
 *  stream also waits for what kvt_capdev_side_after gave it) and wait for it (rare: column
 *  sums, decode chunks). */
kvt_status kvt_capdev_to_host(kvt_capdev *d, const kvt_capdev_mark *after, const void *src,
                              void *dst, size_t bytes);

/** Causal column sums on the device (kvt_colsum_accumulate_ref's contract, device pointers:
 *  q [Hq, n_q, D] f32, k [Hkv, n_k, D] f32, colsum [Hq, n_k] f64 += ), on `stream`. */
kvt_status kvt_capdev_colsum(kvt_capdev *d, const float *q, const float *k, double *colsum,
                             int n_q_heads, int n_kv_heads, uint32_t q_begin, uint32_t n_q,
                             uint32_t n_k, int head_dim, float scale, void *stream);

/** The side stream the ring's device-to-host copies run on (a cudaStream_t), or NULL. */
void *kvt_capdev_stream(const kvt_capdev *d);

/** Wait for every queued copy and hand the records to the writer. */
kvt_status kvt_capdev_drain(kvt_capdev *d);

/** kvt_capdev_drain, then wait until the device has finished all work (every stream). */
kvt_status kvt_capdev_sync(kvt_capdev *d);

void kvt_capdev_get_stats(const kvt_capdev *d, kvt_capdev_stats *out);

/** Wait for outstanding copies (records not yet handed over are dropped: call drain first to
 *  keep them) and free everything. NULL is fine. */
void kvt_capdev_free(kvt_capdev *d);

#ifdef __cplusplus
}
#endif
#endif /* KVT_CAPTURE_DEV_H */
