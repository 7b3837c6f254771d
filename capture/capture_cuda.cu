/* capture_cuda.cu - the device side of a capture session (capture_dev.h) on the CUDA runtime.
 *
 * Pipeline per trace record (CAPTURE.md §5):
 *   producer stream: gather_k reads the engine's strided [H, T, D] slice, converts it to the
 *                    stored dtype (common/dtype_bits.h, as the host does) and writes it byte-plane
 *                    split into a slot of the device ring; ev_gathered is recorded after it.
 *   side stream:     waits for ev_gathered, copies the slot into the same slot of the pinned
 *                    host ring, records ev_done.
 *   host:            slots complete in order; a completed slot is lent to the trace writer
 *                    (kvt_trace_writer_lend_planes: no copy on the engine's thread; a
 *                    compression thread reads the pinned slot) and is free again when the
 *                    writer hands it back (release_slot, from that thread).
 * The engine's memory is read only by gather_k, on its own stream, so it may reuse that memory
 * for anything it enqueues afterwards. A submission that finds every slot in flight waits
 * for the oldest slot's ev_done, and one whose slot is still lent waits for the writer to
 * hand it back (both stats.stall_ns).
 *
 * (Before: the engine's thread copied each completed slot into a fresh writer buffer. On an
 * H200 with a Llama-3-8B-shaped prefill that copy and its page faults ran at about 3.5 GB/s
 * and held the engine's thread, so capture added 84-132% to prefill.)
 */
#include <cuda_runtime.h>

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "capture_dev.h"
#include "colsum_cuda.h"
#include "cuda_util.cuh" /* KVT_CU, kvt_cu_stream */
#include "dtype_bits.h"

#define CD_DEFAULT_RING (256ull << 20)
#define CD_HOST_MULT    4u /* pinned slots per device slot: lent slots wait for compression */
#define CD_MAX_SLOTS    4096u
#define CD_THREADS      256
#define CD_MAX_BLOCKS   8192u

typedef struct cd_slot {
    kvt_record_info info; /* the record this slot holds */
    cudaEvent_t ev_gathered, ev_done;
    kvt_capdev *d; /* for release_slot */
    bool lent;     /* with the writer (under d->mu) */
} cd_slot;

struct kvt_capdev_mark {
    cudaEvent_t ev;
    kvt_capdev_mark *next;
};

typedef struct cd_mem {
    void *p;
    size_t n;
} cd_mem;

struct kvt_capdev {
    int device;
    kvt_trace_writer *w;
    bool planes;            /* the writer wants byte-plane split payloads */
    uint8_t *dring;         /* [n_slots * slot_bytes] device */
    uint8_t *hring;         /* [n_hslots * slot_bytes] pinned host */
    cudaStream_t side;      /* non-blocking copy stream */
    kvt_capdev_mark *marks; /* every mark made (freed with the device side) */
    cd_slot *slots;
    /* record r (the r-th emitted) uses device slot r % n_slots until its copy to the host is
       done, and host slot r % n_hslots (>= n_slots: CD_HOST_MULT times, or as many where that
       much host memory cannot be pinned) until the writer hands it back; slots[] is per host
       slot. Records next - count .. next - 1 are in flight (count <= n_slots) */
    uint32_t n_hslots;
    uint64_t next;
    uint32_t count;
    pthread_mutex_t mu; /* slots[].lent, n_lent: the writer's threads hand slots back */
    pthread_cond_t cv;
    uint32_t n_lent;
    bool sync_ok; /* mu and cv were created */
    kvt_record_info *parts;
    size_t parts_cap;
    float *cs_work; /* column-sum workspace */
    size_t cs_work_floats;
    cd_mem *mem; /* allocations handed out by kvt_capdev_mem_alloc */
    size_t n_mem, cap_mem;
    kvt_capdev_stats st;
};

/* Sets the capture's device for the scope of a call and restores the caller's. */
struct cd_device_scope {
    int prev;
    bool ok;
    explicit cd_device_scope(int dev) : prev(-1), ok(false)
    {
        if (cudaGetDevice(&prev) != cudaSuccess)
            prev = -1;
        ok = cudaSetDevice(dev) == cudaSuccess;
    }
    ~cd_device_scope()
    {
        if (prev >= 0)
            cudaSetDevice(prev);
    }
};

#define CD_SCOPE(d)                                                                                \
    cd_device_scope cd_scope_((d)->device);                                                        \
    KVT_RETURN_IF(!cd_scope_.ok, KVT_ERR_CUDA, "capture: cannot select CUDA device %d", (d)->device)

/* ---- the gather kernel ---- */

typedef struct cd_src {
    const uint8_t *p;
    int dt, es;
    int64_t s_h, s_t, s_d; /* elements */
} cd_src;

typedef struct cd_dst {
    uint8_t *p;
    int dt, es;
    int planes;         /* byte-plane split over the block's n elements */
    int64_t h_rows, t0; /* plain layout: row (h, t) at (h * h_rows + t0 + t) * D */
} cd_dst;

/* Element e of the [nh, nt, D] block (heads from h0, tokens from t0 of the source). I is the
 * index type: 32-bit when the block allows it (divisions are cheaper). */
template <typename I>
static __global__ void gather_k(cd_src src, int64_t h0, int64_t t0, I nh, I nt, I D, cd_dst dst)
{
    I n = nh * nt * D, ntd = nt * D;
    (void)nh;
    for (I e = (I)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (I)gridDim.x * blockDim.x) {
        I h = e / ntd, r = e - h * ntd, t = r / D, d = r - t * D;
        const uint8_t *sp = src.p + ((h0 + (int64_t)h) * src.s_h + (t0 + (int64_t)t) * src.s_t +
                                     (int64_t)d * src.s_d) *
                                        src.es;
        uint32_t bits = src.es == 2 ? (uint32_t) * (const uint16_t *)sp : *(const uint32_t *)sp;
        uint32_t out =
            src.dt == dst.dt ? bits : kvt_bits_from_f32(kvt_bits_to_f32(bits, src.dt), dst.dt);
        if (dst.planes) {
            for (int b = 0; b < dst.es; b++)
                dst.p[(size_t)b * n + e] = (uint8_t)(out >> (8 * b));
        } else {
            int64_t o = ((int64_t)h * dst.h_rows + dst.t0 + (int64_t)t) * (int64_t)D + (int64_t)d;
            if (dst.es == 2)
                ((uint16_t *)dst.p)[o] = (uint16_t)out;
            else
                ((uint32_t *)dst.p)[o] = out;
        }
    }
}

static kvt_status launch_gather(const kvt_capdev_view *v, int64_t h0, int64_t nh, int64_t t0,
                                int64_t nt, const cd_dst *dst)
{
    cd_src src = {(const uint8_t *)v->data,
                  (int)v->dtype,
                  (int)kvt_dtype_size(v->dtype),
                  v->s_h,
                  v->s_t,
                  v->s_d};
    int64_t n = nh * nt * v->n_d;
    if (n <= 0)
        return KVT_OK;
    size_t blocks = ((size_t)n + CD_THREADS - 1) / CD_THREADS;
    unsigned g = (unsigned)(blocks < CD_MAX_BLOCKS ? blocks : CD_MAX_BLOCKS);
    cudaStream_t st = kvt_cu_stream(v->stream);
    if (n < (int64_t)0x7fffffff)
        gather_k<uint32_t><<<g, CD_THREADS, 0, st>>>(src, h0, t0, (uint32_t)nh, (uint32_t)nt,
                                                     (uint32_t)v->n_d, *dst);
    else
        gather_k<uint64_t><<<g, CD_THREADS, 0, st>>>(src, h0, t0, (uint64_t)nh, (uint64_t)nt,
                                                     (uint64_t)v->n_d, *dst);
    KVT_CU(cudaGetLastError());
    return KVT_OK;
}

/* ---- a ring reserved ahead of a session (kvt_capdev_reserve) ---- */

static pthread_mutex_t g_res_mu = PTHREAD_MUTEX_INITIALIZER;
static struct {
    int device;
    uint64_t bytes;  /* device ring; 0: none held */
    uint64_t hbytes; /* pinned ring */
    uint8_t *dring, *hring;
} g_res;

/* Slots of `slot` bytes in a ring of about ring_bytes (0: the default). */
static uint64_t ring_slots(uint64_t ring_bytes, uint64_t slot)
{
    uint64_t ring = ring_bytes ? ring_bytes : CD_DEFAULT_RING;
    uint64_t n = slot ? ring / slot : 0;
    return n < 2 ? 2 : n > CD_MAX_SLOTS ? CD_MAX_SLOTS : n;
}

/* The pinned ring for a device ring of `bytes`: CD_HOST_MULT times as large, or as large where
 * that cannot be pinned. */
static bool pin_ring(uint8_t **out, uint64_t bytes, uint64_t *got)
{
    *out = NULL;
    *got = 0;
    if (cudaHostAlloc((void **)out, (size_t)(bytes * CD_HOST_MULT), cudaHostAllocDefault) ==
        cudaSuccess) {
        *got = bytes * CD_HOST_MULT;
        return true;
    }
    (void)cudaGetLastError();
    *out = NULL;
    if (cudaHostAlloc((void **)out, (size_t)bytes, cudaHostAllocDefault) == cudaSuccess) {
        *got = bytes;
        return true;
    }
    *out = NULL;
    return false;
}

static void res_free_locked(void)
{
    if (g_res.bytes) {
        cd_device_scope scope(g_res.device);
        cudaFree(g_res.dring);
        cudaFreeHost(g_res.hring);
    }
    memset(&g_res, 0, sizeof(g_res));
}

/* KVT_OK when CUDA device `device` exists. */
static kvt_status check_device(int device)
{
    int n_dev = 0;
    cudaError_t e = cudaGetDeviceCount(&n_dev);
    KVT_RETURN_IF(e != cudaSuccess || n_dev == 0, KVT_ERR_NO_CUDA,
                  "capture: no usable CUDA device (%s)", cudaGetErrorString(e));
    KVT_RETURN_IF(device < 0 || device >= n_dev, KVT_ERR_INVALID_ARG,
                  "capture: CUDA device %d does not exist (%d devices)", device, n_dev);
    return KVT_OK;
}

extern "C" kvt_status kvt_capdev_reserve(int device, uint64_t ring_bytes, uint64_t slot_bytes)
{
    KVT_FORWARD(check_device(device));
    cudaError_t e;
    uint64_t slot = slot_bytes ? slot_bytes : KVT_WRITER_MAX_RECORD_DEFAULT;
    uint64_t bytes = ring_slots(ring_bytes, slot) * slot;
    kvt_status st = KVT_OK;
    pthread_mutex_lock(&g_res_mu);
    if (g_res.bytes != bytes || g_res.device != device) {
        res_free_locked();
        cd_device_scope scope(device);
        uint8_t *dr = NULL, *hr = NULL;
        uint64_t hbytes = 0;
        if (!scope.ok)
            st = kvt_error_set(KVT_ERR_CUDA, "capture: cannot select CUDA device %d", device);
        else if ((e = cudaMalloc(&dr, (size_t)bytes)) != cudaSuccess)
            st = kvt_error_set(KVT_ERR_CUDA, "capture: cannot allocate a %llu-byte device ring: %s",
                               (unsigned long long)bytes, cudaGetErrorString(e));
        else if (!pin_ring(&hr, bytes, &hbytes))
            st = kvt_error_set(KVT_ERR_CUDA, "capture: cannot pin %llu bytes of host memory: %s",
                               (unsigned long long)bytes, cudaGetErrorString(cudaGetLastError()));
        if (st == KVT_OK) {
            g_res.device = device;
            g_res.bytes = bytes;
            g_res.hbytes = hbytes;
            g_res.dring = dr;
            g_res.hring = hr;
        } else if (dr) {
            cudaFree(dr);
        }
    }
    pthread_mutex_unlock(&g_res_mu);
    return st;
}

extern "C" void kvt_capdev_unreserve(void)
{
    pthread_mutex_lock(&g_res_mu);
    res_free_locked();
    pthread_mutex_unlock(&g_res_mu);
}

extern "C" uint64_t kvt_capdev_reserved_bytes(void)
{
    pthread_mutex_lock(&g_res_mu);
    uint64_t b = g_res.bytes;
    pthread_mutex_unlock(&g_res_mu);
    return b;
}

/* ---- create / free ---- */

/* The writer is done with a lent slot (any thread). */
static void release_slot(void *ctx)
{
    cd_slot *s = (cd_slot *)ctx;
    kvt_capdev *d = s->d;
    pthread_mutex_lock(&d->mu);
    s->lent = false;
    d->n_lent--;
    pthread_cond_broadcast(&d->cv);
    pthread_mutex_unlock(&d->mu);
}

extern "C" void kvt_capdev_free(kvt_capdev *d)
{
    if (!d)
        return;
    if (d->sync_ok) { /* the writer's threads still read lent slots of the pinned ring */
        pthread_mutex_lock(&d->mu);
        while (d->n_lent > 0)
            pthread_cond_wait(&d->cv, &d->mu);
        pthread_mutex_unlock(&d->mu);
        pthread_cond_destroy(&d->cv);
        pthread_mutex_destroy(&d->mu);
    }
    {
        cd_device_scope scope(d->device);
        if (d->side)
            cudaStreamSynchronize(d->side); /* no DMA into pinned memory we are about to free */
        if (d->slots) {
            for (uint32_t i = 0; i < d->n_hslots; i++) {
                if (d->slots[i].ev_gathered)
                    cudaEventDestroy(d->slots[i].ev_gathered);
                if (d->slots[i].ev_done)
                    cudaEventDestroy(d->slots[i].ev_done);
            }
        }
        for (size_t i = 0; i < d->n_mem; i++)
            cudaFree(d->mem[i].p);
        if (d->cs_work)
            cudaFree(d->cs_work);
        if (d->dring)
            cudaFree(d->dring);
        if (d->hring)
            cudaFreeHost(d->hring);
        for (kvt_capdev_mark *m = d->marks, *nx; m; m = nx) {
            nx = m->next;
            cudaEventDestroy(m->ev);
            free(m);
        }
        if (d->side)
            cudaStreamDestroy(d->side);
    }
    free(d->slots);
    free(d->parts);
    free(d->mem);
    free(d);
}

/* Take the reserved rings if they have this device and device ring size. */
static bool take_reserved(kvt_capdev *d, int device, uint64_t bytes, uint64_t *hbytes)
{
    pthread_mutex_lock(&g_res_mu);
    bool ok = g_res.bytes == bytes && g_res.device == device;
    if (ok) {
        d->dring = g_res.dring;
        d->hring = g_res.hring;
        *hbytes = g_res.hbytes;
        memset(&g_res, 0, sizeof(g_res));
    }
    pthread_mutex_unlock(&g_res_mu);
    return ok;
}

extern "C" kvt_status kvt_capdev_create(int device, kvt_trace_writer *w, uint64_t ring_bytes,
                                        kvt_capdev **out)
{
    KVT_RETURN_IF(!w || !out, KVT_ERR_INVALID_ARG, "capture: null argument");
    *out = NULL;
    KVT_FORWARD(check_device(device));
    cudaError_t e;
    kvt_capdev *d = (kvt_capdev *)calloc(1, sizeof(*d));
    KVT_RETURN_IF(!d, KVT_ERR_NOMEM, "out of memory");
    d->device = device;
    d->w = w;
    d->planes = kvt_trace_writer_shuffles(w);
    uint64_t slot = kvt_trace_writer_max_record_bytes(w);
    uint64_t n = ring_slots(ring_bytes, slot);
    d->st.n_slots = (uint32_t)n;
    d->st.slot_bytes = slot;
    kvt_status st = KVT_OK;
    d->slots = (cd_slot *)calloc((size_t)n * CD_HOST_MULT, sizeof(cd_slot));
    if (!d->slots) {
        kvt_capdev_free(d);
        return kvt_error_set(KVT_ERR_NOMEM, "out of memory");
    }
    for (uint64_t i = 0; i < n * CD_HOST_MULT; i++)
        d->slots[i].d = d;
    uint64_t hbytes = 0;
    if (pthread_mutex_init(&d->mu, NULL) != 0) {
        kvt_capdev_free(d);
        return kvt_error_set(KVT_ERR_NOMEM, "capture: cannot create a mutex");
    }
    if (pthread_cond_init(&d->cv, NULL) != 0) {
        pthread_mutex_destroy(&d->mu);
        kvt_capdev_free(d);
        return kvt_error_set(KVT_ERR_NOMEM, "capture: cannot create a condition variable");
    }
    d->sync_ok = true;
    {
        cd_device_scope scope(device);
        if (!scope.ok) {
            st = kvt_error_set(KVT_ERR_CUDA, "capture: cannot select CUDA device %d", device);
        } else if ((e = cudaStreamCreateWithFlags(&d->side, cudaStreamNonBlocking)) !=
                   cudaSuccess) {
            st = kvt_error_set(KVT_ERR_CUDA, "capture: cannot create a stream: %s",
                               cudaGetErrorString(e));
        } else if (take_reserved(d, device, n * slot, &hbytes)) {
            /* the rings reserved ahead (kvt_capdev_reserve): nothing to allocate */
        } else if ((e = cudaMalloc(&d->dring, (size_t)(n * slot))) != cudaSuccess) {
            st = kvt_error_set(KVT_ERR_CUDA, "capture: cannot allocate a %llu-byte device ring: %s",
                               (unsigned long long)(n * slot), cudaGetErrorString(e));
        } else if (!pin_ring(&d->hring, n * slot, &hbytes)) {
            st = kvt_error_set(KVT_ERR_CUDA, "capture: cannot pin %llu bytes of host memory: %s",
                               (unsigned long long)(n * slot),
                               cudaGetErrorString(cudaGetLastError()));
        }
        d->n_hslots = (uint32_t)(hbytes / slot);
        for (uint64_t i = 0; st == KVT_OK && i < d->n_hslots; i++) {
            e = cudaEventCreateWithFlags(&d->slots[i].ev_gathered, cudaEventDisableTiming);
            if (e == cudaSuccess)
                e = cudaEventCreateWithFlags(&d->slots[i].ev_done, cudaEventDisableTiming);
            if (e != cudaSuccess)
                st = kvt_error_set(KVT_ERR_CUDA, "capture: cannot create events: %s",
                                   cudaGetErrorString(e));
        }
    }
    if (st != KVT_OK) {
        kvt_capdev_free(d);
        return st;
    }
    d->st.device_bytes = d->st.peak_device_bytes = n * slot;
    d->st.pinned_bytes = hbytes;
    *out = d;
    return KVT_OK;
}

/* ---- the ring ---- */

/* Lend completed slots to the writer, oldest first. wait: block for the oldest one if none
 * has completed (the wait counts as stall). */
static kvt_status reap(kvt_capdev *d, bool wait)
{
    while (d->count > 0) {
        uint64_t r = d->next - d->count; /* the oldest record in flight */
        uint32_t hs = (uint32_t)(r % d->n_hslots);
        cd_slot *s = &d->slots[hs];
        cudaError_t e = cudaEventQuery(s->ev_done);
        if (e == cudaErrorNotReady) {
            /* not an error, but some runtimes also leave it as the last error, which the next
               launch check (cudaGetLastError) would then report as a failure; only that one is
               cleared (another, e.g. the host program's, stays pending: the next launch check
               reports it) */
            if (cudaPeekAtLastError() == cudaErrorNotReady)
                (void)cudaGetLastError();
            if (!wait)
                return KVT_OK;
            uint64_t t0 = kvt_now_ns();
            e = cudaEventSynchronize(s->ev_done);
            d->st.stall_ns += kvt_now_ns() - t0;
            wait = false;
        }
        KVT_RETURN_IF(e != cudaSuccess, KVT_ERR_CUDA, "capture: device copy failed: %s",
                      cudaGetErrorString(e));
        pthread_mutex_lock(&d->mu);
        s->lent = true;
        d->n_lent++;
        pthread_mutex_unlock(&d->mu);
        /* handed back by release_slot, also when the writer refuses it */
        kvt_status st = kvt_trace_writer_lend_planes(
            d->w, &s->info, d->hring + (size_t)hs * d->st.slot_bytes, release_slot, s);
        d->count--;
        KVT_FORWARD(st);
    }
    return KVT_OK;
}

extern "C" kvt_status kvt_capdev_emit(kvt_capdev *d, const kvt_capdev_view *v, int64_t t0,
                                      const kvt_record_info *info)
{
    KVT_RETURN_IF(!d || !v || !info, KVT_ERR_INVALID_ARG, "capture: null argument");
    CD_SCOPE(d);
    size_t n = 0;
    KVT_FORWARD(kvt_trace_writer_parts(d->w, info, NULL, 0, &n));
    if (n > d->parts_cap) {
        kvt_record_info *np = (kvt_record_info *)realloc(d->parts, n * sizeof(*np));
        KVT_RETURN_IF(!np, KVT_ERR_NOMEM, "out of memory");
        d->parts = np;
        d->parts_cap = n;
    }
    KVT_FORWARD(kvt_trace_writer_parts(d->w, info, d->parts, n, &n));
    int out_es = (int)kvt_dtype_size(info->dtype);
    cudaStream_t prod = kvt_cu_stream(v->stream);
    for (size_t i = 0; i < n; i++) {
        const kvt_record_info *p = &d->parts[i];
        int64_t nh = p->head_end - p->head_begin, ntk = p->tok_end - p->tok_begin;
        size_t bytes = (size_t)nh * (size_t)ntk * info->dim * (size_t)out_es;
        KVT_RETURN_IF(bytes > d->st.slot_bytes, KVT_ERR_STATE,
                      "capture: a %zu-byte record does not fit a %llu-byte slot", bytes,
                      (unsigned long long)d->st.slot_bytes);
        KVT_FORWARD(reap(d, d->count == d->st.n_slots));
        /* record `next`: its device slot's previous record (next - n_slots) is no longer in
           flight, so its copy is done; its host slot may still be lent */
        uint32_t hs = (uint32_t)(d->next % d->n_hslots);
        uint32_t ds = (uint32_t)(d->next % d->st.n_slots);
        cd_slot *s = &d->slots[hs];
        pthread_mutex_lock(&d->mu);
        if (s->lent) { /* the writer still compresses from it */
            uint64_t w0 = kvt_now_ns();
            while (s->lent)
                pthread_cond_wait(&d->cv, &d->mu);
            d->st.stall_ns += kvt_now_ns() - w0;
        }
        pthread_mutex_unlock(&d->mu);
        size_t off = (size_t)ds * d->st.slot_bytes, hoff = (size_t)hs * d->st.slot_bytes;
        cd_dst dst = {
            d->dring + off, (int)info->dtype, out_es, d->planes && out_es > 1 ? 1 : 0, ntk, 0};
        KVT_FORWARD(launch_gather(v, p->head_begin - info->head_begin, nh,
                                  t0 + (int64_t)(p->tok_begin - info->tok_begin), ntk, &dst));
        KVT_CU(cudaEventRecord(s->ev_gathered, prod));
        KVT_CU(cudaStreamWaitEvent(d->side, s->ev_gathered, 0));
        KVT_CU(cudaMemcpyAsync(d->hring + hoff, d->dring + off, bytes, cudaMemcpyDeviceToHost,
                               d->side));
        KVT_CU(cudaEventRecord(s->ev_done, d->side));
        s->info = *p;
        d->next++;
        d->count++;
        if (d->count > d->st.peak_in_flight)
            d->st.peak_in_flight = d->count;
        d->st.d2h_bytes += bytes;
    }
    return KVT_OK;
}

/* ---- marks ---- */

extern "C" kvt_status kvt_capdev_mark_at(kvt_capdev *d, kvt_capdev_mark **m, void *stream)
{
    KVT_RETURN_IF(!d || !m, KVT_ERR_INVALID_ARG, "capture: null argument");
    CD_SCOPE(d);
    if (!*m) {
        kvt_capdev_mark *nm = (kvt_capdev_mark *)calloc(1, sizeof(*nm));
        KVT_RETURN_IF(!nm, KVT_ERR_NOMEM, "out of memory");
        cudaError_t e = cudaEventCreateWithFlags(&nm->ev, cudaEventDisableTiming);
        if (e != cudaSuccess) {
            free(nm);
            return kvt_error_set(KVT_ERR_CUDA, "capture: cannot create an event: %s",
                                 cudaGetErrorString(e));
        }
        nm->next = d->marks;
        d->marks = nm;
        *m = nm;
    }
    /* a wait already enqueued keeps the point it was given: recording again is fine */
    KVT_CU(cudaEventRecord((*m)->ev, kvt_cu_stream(stream)));
    return KVT_OK;
}

extern "C" kvt_status kvt_capdev_after(kvt_capdev *d, const kvt_capdev_mark *m, void *stream)
{
    KVT_RETURN_IF(!d, KVT_ERR_INVALID_ARG, "capture: null argument");
    if (!m)
        return KVT_OK;
    CD_SCOPE(d);
    KVT_CU(cudaStreamWaitEvent(kvt_cu_stream(stream), m->ev, 0));
    return KVT_OK;
}

extern "C" kvt_status kvt_capdev_side_after(kvt_capdev *d, const kvt_capdev_mark *m)
{
    KVT_RETURN_IF(!d, KVT_ERR_INVALID_ARG, "capture: null argument");
    return kvt_capdev_after(d, m, d->side);
}

extern "C" kvt_status kvt_capdev_mark_sync(kvt_capdev *d, const kvt_capdev_mark *m)
{
    KVT_RETURN_IF(!d, KVT_ERR_INVALID_ARG, "capture: null argument");
    if (!m)
        return KVT_OK;
    CD_SCOPE(d);
    KVT_CU(cudaEventSynchronize(m->ev));
    return KVT_OK;
}

extern "C" void *kvt_capdev_stream(const kvt_capdev *d)
{
    return d ? (void *)d->side : NULL;
}

extern "C" kvt_status kvt_capdev_drain(kvt_capdev *d)
{
    if (!d)
        return KVT_OK;
    CD_SCOPE(d);
    while (d->count > 0)
        KVT_FORWARD(reap(d, true));
    return KVT_OK;
}

extern "C" kvt_status kvt_capdev_sync(kvt_capdev *d)
{
    if (!d)
        return KVT_OK;
    KVT_FORWARD(kvt_capdev_drain(d));
    CD_SCOPE(d);
    KVT_CU(cudaDeviceSynchronize());
    return KVT_OK;
}

/* ---- device buffers ---- */

extern "C" kvt_status kvt_capdev_gather(kvt_capdev *d, const kvt_capdev_view *v, int64_t t0,
                                        int64_t nt, kvt_dtype dst_dt, void *dst, int64_t dst_h_rows,
                                        int64_t dst_t0)
{
    KVT_RETURN_IF(!d || !v || !dst, KVT_ERR_INVALID_ARG, "capture: null argument");
    CD_SCOPE(d);
    cd_dst dd = {(uint8_t *)dst, (int)dst_dt, (int)kvt_dtype_size(dst_dt), 0, dst_h_rows, dst_t0};
    return launch_gather(v, 0, v->n_h, t0, nt, &dd);
}

extern "C" kvt_status kvt_capdev_copy_to_host(int device, void *stream, const void *src,
                                              size_t bytes, void *dst)
{
    KVT_RETURN_IF(!src || !dst, KVT_ERR_INVALID_ARG, "capture: null argument");
    cd_device_scope scope(device); /* the producer's stream belongs to its device */
    KVT_RETURN_IF(!scope.ok, KVT_ERR_CUDA, "capture: cannot select CUDA device %d", device);
    cudaStream_t st = kvt_cu_stream(stream);
    cudaError_t e = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, st);
    if (e == cudaSuccess)
        e = cudaStreamSynchronize(st);
    KVT_RETURN_IF(e != cudaSuccess, KVT_ERR_CUDA,
                  "capture: copying a tensor of CUDA device %d to the host: %s", device,
                  cudaGetErrorString(e));
    return KVT_OK;
}

extern "C" kvt_status kvt_capdev_mem_alloc(kvt_capdev *d, size_t bytes, bool zero, void *stream,
                                           void **out)
{
    KVT_RETURN_IF(!d || !out, KVT_ERR_INVALID_ARG, "capture: null argument");
    *out = NULL;
    CD_SCOPE(d);
    if (d->n_mem == d->cap_mem) {
        size_t nc = d->cap_mem ? 2 * d->cap_mem : 16;
        cd_mem *nm = (cd_mem *)realloc(d->mem, nc * sizeof(*nm));
        KVT_RETURN_IF(!nm, KVT_ERR_NOMEM, "out of memory");
        d->mem = nm;
        d->cap_mem = nc;
    }
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, bytes ? bytes : 1);
    KVT_RETURN_IF(e != cudaSuccess, KVT_ERR_CUDA,
                  "capture: cannot allocate %zu bytes on device %d: %s", bytes, d->device,
                  cudaGetErrorString(e));
    if (zero && bytes) {
        e = cudaMemsetAsync(p, 0, bytes, kvt_cu_stream(stream));
        if (e != cudaSuccess) {
            cudaFree(p);
            return kvt_error_set(KVT_ERR_CUDA, "capture: cudaMemsetAsync: %s",
                                 cudaGetErrorString(e));
        }
    }
    d->mem[d->n_mem].p = p;
    d->mem[d->n_mem].n = bytes;
    d->n_mem++;
    d->st.device_bytes += bytes;
    if (d->st.device_bytes > d->st.peak_device_bytes)
        d->st.peak_device_bytes = d->st.device_bytes;
    *out = p;
    return KVT_OK;
}

extern "C" void kvt_capdev_mem_free(kvt_capdev *d, void *p)
{
    if (!d || !p)
        return;
    for (size_t i = 0; i < d->n_mem; i++) {
        if (d->mem[i].p == p) {
            cd_device_scope scope(d->device);
            cudaFree(p);
            d->st.device_bytes -= d->mem[i].n;
            d->mem[i] = d->mem[--d->n_mem];
            return;
        }
    }
}

extern "C" kvt_status kvt_capdev_to_host(kvt_capdev *d, const kvt_capdev_mark *after,
                                         const void *src, void *dst, size_t bytes)
{
    KVT_RETURN_IF(!d || !src || !dst, KVT_ERR_INVALID_ARG, "capture: null argument");
    CD_SCOPE(d);
    KVT_FORWARD(kvt_capdev_after(d, after, d->side));
    KVT_CU(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, d->side));
    KVT_CU(cudaStreamSynchronize(d->side));
    return KVT_OK;
}

extern "C" kvt_status kvt_capdev_colsum(kvt_capdev *d, const float *q, const float *k,
                                        double *colsum, int n_q_heads, int n_kv_heads,
                                        uint32_t q_begin, uint32_t n_q, uint32_t n_k, int head_dim,
                                        float scale, void *stream)
{
    KVT_RETURN_IF(!d, KVT_ERR_INVALID_ARG, "capture: null argument");
    CD_SCOPE(d);
    size_t need = kvt_colsum_cuda_work_floats(n_q_heads, n_q);
    if (need > d->cs_work_floats) {
        if (d->cs_work) {
            KVT_CU(cudaStreamSynchronize(kvt_cu_stream(stream))); /* earlier sums used it */
            cudaFree(d->cs_work);
            d->st.device_bytes -= d->cs_work_floats * sizeof(float);
            d->cs_work = NULL;
            d->cs_work_floats = 0;
        }
        KVT_CU(cudaMalloc(&d->cs_work, need * sizeof(float)));
        d->cs_work_floats = need;
        d->st.device_bytes += need * sizeof(float);
        if (d->st.device_bytes > d->st.peak_device_bytes)
            d->st.peak_device_bytes = d->st.device_bytes;
    }
    return kvt_colsum_accumulate_cuda(q, k, colsum, n_q_heads, n_kv_heads, q_begin, n_q, n_k,
                                      head_dim, scale, d->cs_work, stream);
}

extern "C" void kvt_capdev_get_stats(const kvt_capdev *d, kvt_capdev_stats *out)
{
    if (!out)
        return;
    if (!d) {
        memset(out, 0, sizeof(*out));
        return;
    }
    *out = d->st;
}
