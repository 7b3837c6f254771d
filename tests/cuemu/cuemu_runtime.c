/* cuemu_runtime.c - the runtime half of cuemu (cuda_runtime_api.h): one device (CUEMU_DEVICES=N:
 * N of them), device memory tracked so that copies in the wrong direction and host pointers
 * handed to kernels are reported as the errors a GPU would give (an illegal address). Thread-safe
 * (replay workers call it from several threads).
 *
 * Several devices keep CUDA's rules: the current device is the calling thread's own
 * (cudaSetDevice); memory, streams and events belong to the device current when they were made
 * (cudaMallocAsync: its stream's); a kernel launched on a stream of another device than the
 * current one fails (invalid resource handle), as does a kernel given memory of another device
 * (an illegal address: no peer access here), and an event recorded on another device's stream;
 * cudaMemGetInfo and cudaDeviceReset are the current device's.
 *
 * By default everything runs when it is enqueued. With CUEMU_DEFER=1 the work of a created
 * stream (kernels, async copies and memsets, frees) waits in the stream's queue and runs only
 * when something needs it done: a synchronize of the stream, an event on it that is
 * synchronized or waited for by another stream's work, a synchronous copy or the legacy
 * default stream (which wait for the blocking streams), a cudaFree or cudaDeviceSynchronize
 * (everything); a query of an event whose work has not run says not ready (a slow GPU). Work
 * on one stream that reads what another stream's work writes, with no event between them,
 * then sees the memory as it was whenever the other stream has not been made to run first:
 * cross-stream races a real GPU shows only sometimes fail here in most orders of submission.
 * Copies from pageable host memory are staged at the call and copies into it complete before
 * the call returns, as CUDA does. An event's time is taken when its stream's work reaches it
 * (deferred: when that work runs), and cudaEventElapsedTime of an event whose work has not run
 * says not ready, as CUDA does.
 *
 * CUEMU_FAIL_LAUNCH=N: the N-th kernel launch of the process (counted from 1; a test that sets
 * the variable later: from then on) faults, as a kernel with an illegal access does on a GPU:
 * it does not run, nor does any later work on its device, and the fault shows, as on a GPU, at
 * the next call that waits for the device (a stream, event or device synchronize, an event
 * query, a synchronous copy or one into pageable memory, cudaFree); from then on the error is
 * sticky: every call that uses that device returns "unspecified launch failure"
 * (cudaGetLastError too, without clearing it), frees and destroys still free, until
 * cudaDeviceReset on it. Nothing is printed, so that a test sees only the program's own
 * messages.
 *
 * CUEMU_STATS=1: at exit, how many times the host waited (stream, event and device
 * synchronizes, and copies into pageable memory, which wait for their stream), on stderr, so
 * that a test can count a program's round trips.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cuda_runtime_api.h"

typedef struct blk {
    uintptr_t p;
    size_t n;
    int dev; /* device memory: its device */
} blk;
typedef struct blk_list {
    blk *b;
    size_t n, cap;
} blk_list;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER; /* the block lists */
static blk_list blocks;                                /* device memory (cudaMalloc) */
#define MAX_DEV 8
static size_t dev_used[MAX_DEV];       /* bytes of blocks per device (under mu) */
static size_t all_used, all_peak;      /* every device's, and its largest value (CUEMU_STATS) */
static size_t dev_peak[MAX_DEV];       /* each device's largest dev_used */
static uint64_t dev_launches[MAX_DEV]; /* kernels launched per device (CUEMU_STATS) */
static uint64_t all_launches;          /* every device's (CUEMU_FAIL_LAUNCH) */
static int broken[MAX_DEV];            /* a launch faulted there: 1 not yet seen, 2 seen (sticky) */

/* the sticky error of device d's context (cudaSuccess unless a fault there has been seen) */
static cudaError_t sticky(int d)
{
    return __atomic_load_n(&broken[d], __ATOMIC_RELAXED) == 2 ? cudaErrorLaunchFailure
                                                              : cudaSuccess;
}

/* Whether the launch being made is the one CUEMU_FAIL_LAUNCH names: the N-th since the
 * variable took its current value (at the start, or set by a test between its steps); every
 * launch counted (all_launches) */
static int fault_now(void)
{
    static pthread_mutex_t fmu = PTHREAD_MUTEX_INITIALIZER;
    static char seen[32];     /* the value the count started from */
    static uint64_t base = 0; /* all_launches then */
    pthread_mutex_lock(&fmu);
    const uint64_t n = __atomic_add_fetch(&all_launches, 1, __ATOMIC_RELAXED);
    const char *e = getenv("CUEMU_FAIL_LAUNCH");
    if (!e)
        e = "";
    if (strncmp(e, seen, sizeof(seen) - 1)) {
        snprintf(seen, sizeof(seen), "%s", e);
        base = n - 1;
    }
    const unsigned long long want = *e ? strtoull(e, NULL, 10) : 0;
    pthread_mutex_unlock(&fmu);
    return want > 0 && n - base == want;
}

/* a wait for device d: a fault there is seen now (sticky from then on) */
static cudaError_t observe(int d)
{
    if (!__atomic_load_n(&broken[d], __ATOMIC_RELAXED))
        return cudaSuccess;
    __atomic_store_n(&broken[d], 2, __ATOMIC_RELAXED);
    return cudaErrorLaunchFailure;
}

/* CUEMU_DEVICES=N: how many devices (1 to 8; 1 without it) */
static int n_devices(void)
{
    const char *e = getenv("CUEMU_DEVICES");
    long v = e && *e ? strtol(e, NULL, 10) : 1;
    return v < 1 ? 1 : v > MAX_DEV ? MAX_DEV : (int)v;
}

/* device d's memory: CUEMU_MEM_BYTES (a GPU that small: cudaMalloc past it fails; a list
 * "A,B,...": device d the d-th, the last for the devices after it), else 80 GiB that are never
 * enforced */
static size_t dev_total(int d, int *enforced)
{
    const char *e = getenv("CUEMU_MEM_BYTES");
    unsigned long long v = 0;
    for (int i = 0; e && *e && i <= d; i++) {
        char *end;
        v = strtoull(e, &end, 10);
        e = *end == ',' ? end + 1 : NULL;
    }
    if (enforced)
        *enforced = v > 0;
    return v > 0 ? (size_t)v : (size_t)80 << 30;
}
static blk_list pinned; /* pinned host memory (cudaHostAlloc): copies with it stay asynchronous */
static _Thread_local cudaError_t last_error = cudaSuccess;
static _Thread_local int cur_device = 0;

/* ---- deferred work (CUEMU_DEFER=1) ---- */
typedef struct op {
    void (*fn)(void *);
    void *ctx;
    void (*del)(void *);
    struct op *next;
} op;

struct CUstream_st {
    unsigned flags;
    int dev;         /* the device current when it was created */
    uint64_t id;     /* > 0; streams are looked up by id (a queued wait may outlive one) */
    op *head, *tail; /* queued work, oldest first (deferred mode) */
    uint64_t n_enq, n_done;
    struct CUstream_st *next; /* every live stream */
};
struct CUevent_st {
    unsigned flags;
    int dev; /* the device current when it was created */
    int recorded;
    double t_ms;  /* host clock when recorded */
    uint64_t sid; /* deferred: the stream recorded on (0: complete), and its work count then */
    uint64_t seq;
};

/* the device a stream's work runs on (NULL: the legacy default stream of the current one) */
static int stream_dev(cudaStream_t s)
{
    return s ? s->dev : cur_device;
}

/* a call on device d returns its sticky error (a fault seen there) */
#define RETURN_IF_STICKY(d)                                                                        \
    do {                                                                                           \
        const cudaError_t se_ = sticky(d);                                                         \
        if (se_ != cudaSuccess)                                                                    \
            return se_;                                                                            \
    } while (0)

static pthread_mutex_t qmu; /* recursive: the queues; held while deferred work runs */
static uint64_t n_sync_stream, n_sync_event, n_sync_device; /* CUEMU_STATS */
static pthread_once_t q_once = PTHREAD_ONCE_INIT;
static int g_defer;
static struct CUstream_st *g_streams;
static uint64_t g_next_sid = 1;

static void print_stats(void)
{
    fprintf(stderr,
            "cuemu: host waits: %llu stream synchronizes, %llu event synchronizes, %llu device "
            "synchronizes\n",
            (unsigned long long)__atomic_load_n(&n_sync_stream, __ATOMIC_RELAXED),
            (unsigned long long)__atomic_load_n(&n_sync_event, __ATOMIC_RELAXED),
            (unsigned long long)__atomic_load_n(&n_sync_device, __ATOMIC_RELAXED));
    pthread_mutex_lock(&mu);
    size_t peak = all_peak, each[MAX_DEV];
    memcpy(each, dev_peak, sizeof(each));
    pthread_mutex_unlock(&mu);
    /* device memory is host memory here: a process's peak RSS less this is its host memory */
    fprintf(stderr, "cuemu: device memory peak %llu bytes (cudaMalloc)\n",
            (unsigned long long)peak);
    fprintf(stderr, "cuemu: kernel launches %llu\n",
            (unsigned long long)__atomic_load_n(&all_launches, __ATOMIC_RELAXED));
    for (int d = 0; n_devices() > 1 && d < n_devices(); d++)
        fprintf(stderr, "cuemu: device %d: memory peak %llu bytes, %llu kernel launches\n", d,
                (unsigned long long)each[d],
                (unsigned long long)__atomic_load_n(&dev_launches[d], __ATOMIC_RELAXED));
}

static void q_init(void)
{
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_settype(&a, PTHREAD_MUTEX_RECURSIVE);
    pthread_mutex_init(&qmu, &a);
    pthread_mutexattr_destroy(&a);
    const char *e = getenv("CUEMU_DEFER");
    g_defer = e && *e && strcmp(e, "0") != 0;
    e = getenv("CUEMU_STATS");
    if (e && *e && strcmp(e, "0") != 0)
        atexit(print_stats);
}

/* a host wait, counted (CUEMU_STATS) */
static void count_wait(uint64_t *n)
{
    __atomic_fetch_add(n, 1, __ATOMIC_RELAXED);
}

static int deferred(void)
{
    pthread_once(&q_once, q_init);
    return g_defer;
}

static struct CUstream_st *stream_by_id(uint64_t id)
{
    for (struct CUstream_st *s = g_streams; s; s = s->next)
        if (s->id == id)
            return s;
    return NULL;
}

/* Run s's queued work until n_done reaches upto (qmu held). */
static void run_stream(struct CUstream_st *s, uint64_t upto)
{
    while (s->n_done < upto && s->head) {
        op *o = s->head;
        s->head = o->next;
        if (!s->head)
            s->tail = NULL;
        o->fn(o->ctx);
        if (o->del)
            o->del(o->ctx);
        free(o);
        s->n_done++;
    }
}

/* Run every stream's work (blocking_only: the streams the legacy default stream waits for). */
static void run_all(int blocking_only)
{
    if (!deferred())
        return;
    pthread_mutex_lock(&qmu);
    for (int again = 1; again;) {
        again = 0;
        for (struct CUstream_st *s = g_streams; s; s = s->next)
            if (s->head && !(blocking_only && (s->flags & cudaStreamNonBlocking))) {
                run_stream(s, s->n_enq);
                again = 1;
            }
    }
    pthread_mutex_unlock(&qmu);
}

/* Work for stream s: run now (immediate mode; the legacy default stream after the blocking
 * streams), or queued. del (may be NULL) frees ctx after fn ran. */
void cuemu_enqueue(cudaStream_t s, void (*fn)(void *), void *ctx, void (*del)(void *))
{
    op *o = NULL;
    if (deferred() && s && !(o = malloc(sizeof(*o)))) { /* no room to queue: in order, now */
        pthread_mutex_lock(&qmu);
        run_stream(s, s->n_enq);
        pthread_mutex_unlock(&qmu);
    }
    if (o) {
        o->fn = fn;
        o->ctx = ctx;
        o->del = del;
        o->next = NULL;
        pthread_mutex_lock(&qmu);
        if (s->tail)
            s->tail->next = o;
        else
            s->head = o;
        s->tail = o;
        s->n_enq++;
        pthread_mutex_unlock(&qmu);
        return;
    }
    if (deferred() && !s)
        run_all(1);
    fn(ctx);
    if (del)
        del(ctx);
}

/* a wait queued on a stream: another stream's work up to a point */
typedef struct wait_ctx {
    uint64_t sid, seq;
} wait_ctx;
static void do_wait(void *c)
{
    wait_ctx *w = c;
    struct CUstream_st *t = stream_by_id(w->sid); /* gone: its work ran when it was destroyed */
    if (t)
        run_stream(t, w->seq);
}

/* Make event e's work done (qmu taken here). */
static void event_complete(cudaEvent_t e)
{
    if (!deferred() || !e->sid)
        return;
    pthread_mutex_lock(&qmu);
    struct CUstream_st *t = stream_by_id(e->sid);
    if (t)
        run_stream(t, e->seq);
    pthread_mutex_unlock(&qmu);
}

void cuemu_set_error(cudaError_t e, const char *what)
{
    if (e != cudaSuccess) {
        fprintf(stderr, "cuemu: %s: %s\n", what, cudaGetErrorString(e));
        if (last_error == cudaSuccess)
            last_error = e;
    }
}

static cudaError_t fail(cudaError_t e, const char *what)
{
    cuemu_set_error(e, what);
    return e;
}

const char *cudaGetErrorString(cudaError_t e)
{
    switch (e) {
    case cudaSuccess:
        return "no error";
    case cudaErrorInvalidValue:
        return "invalid argument";
    case cudaErrorMemoryAllocation:
        return "out of memory";
    case cudaErrorInvalidDevice:
        return "invalid device ordinal";
    case cudaErrorInvalidDevicePointer:
        return "invalid device pointer";
    case cudaErrorInvalidResourceHandle:
        return "invalid resource handle";
    case cudaErrorNotReady:
        return "device not ready";
    case cudaErrorIllegalAddress:
        return "an illegal memory access was encountered";
    case cudaErrorLaunchFailure:
        return "unspecified launch failure";
    case cudaErrorInsufficientDriver:
        return "CUDA driver version is insufficient for CUDA runtime version";
    case cudaErrorNoDevice:
        return "no CUDA-capable device is detected";
    case cudaErrorNotSupported:
        return "operation not supported";
    }
    return "unknown error";
}

cudaError_t cudaGetLastError(void)
{
    cudaError_t e = last_error;
    last_error = cudaSuccess;
    return sticky(cur_device) ? sticky(cur_device) : e;
}

cudaError_t cudaPeekAtLastError(void)
{
    return sticky(cur_device) ? sticky(cur_device) : last_error;
}

/* CUEMU_INIT_MS=N: the driver takes N ms to start (a GPU's first call), so that a caller's
 * work overlapping it can be seen to */
cudaError_t cudaGetDeviceCount(int *n)
{
    const char *e = getenv("CUEMU_INIT_MS");
    unsigned long ms = e && *e ? strtoul(e, NULL, 10) : 0;
    if (ms)
        nanosleep(&(struct timespec){(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L}, NULL);
    *n = n_devices();
    return cudaSuccess;
}

cudaError_t cudaRuntimeGetVersion(int *v)
{
    *v = 13000;
    return cudaSuccess;
}

cudaError_t cudaGetDevice(int *d)
{
    *d = cur_device;
    return cudaSuccess;
}

cudaError_t cudaSetDevice(int d)
{
    if (d < 0 || d >= n_devices())
        return fail(cudaErrorInvalidDevice, "cudaSetDevice");
    cur_device = d;
    return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp *p, int d)
{
    if (d < 0 || d >= n_devices())
        return fail(cudaErrorInvalidDevice, "cudaGetDeviceProperties");
    memset(p, 0, sizeof(*p));
    snprintf(p->name, sizeof(p->name), "cuemu (CPU emulation)");
    p->totalGlobalMem = 1ull << 32;
    p->multiProcessorCount = 1;
    p->major = 9;
    p->sharedMemPerBlock = 48 << 10;
    p->maxThreadsPerBlock = 1024;
    p->warpSize = 32;
    return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void)
{
    deferred();
    count_wait(&n_sync_device);
    run_all(0);
    return observe(cur_device);
}

/* everything queued done, then every allocation of the current device freed (streams and
 * events stay: the replay destroys its own before it releases the device) */
cudaError_t cudaDeviceReset(void)
{
    run_all(0);
    pthread_mutex_lock(&mu);
    for (size_t i = 0; i < blocks.n;)
        if (blocks.b[i].dev == cur_device) {
            free((void *)blocks.b[i].p);
            all_used -= blocks.b[i].n;
            blocks.b[i] = blocks.b[--blocks.n];
        } else {
            i++;
        }
    dev_used[cur_device] = 0;
    pthread_mutex_unlock(&mu);
    __atomic_store_n(&broken[cur_device], 0, __ATOMIC_RELAXED);
    return cudaSuccess;
}

/* ---- device memory ---- */

/* the device of the block of l that [ptr, ptr + n) lies in (0 for pinned memory), or -1 */
static int block_dev(const blk_list *l, const void *ptr, size_t n)
{
    uintptr_t p = (uintptr_t)ptr;
    int dev = -1;
    pthread_mutex_lock(&mu);
    for (size_t i = 0; i < l->n && dev < 0; i++)
        if (p >= l->b[i].p && p - l->b[i].p <= l->b[i].n && n <= l->b[i].n - (p - l->b[i].p))
            dev = l->b[i].dev;
    pthread_mutex_unlock(&mu);
    return dev;
}

/* whether [ptr, ptr + n) lies in one block of l */
static int in_blocks(const blk_list *l, const void *ptr, size_t n)
{
    return block_dev(l, ptr, n) >= 0;
}

/* add [p, p + n) of device dev to l: 0, or -1 out of memory */
static int add_block(blk_list *l, void *p, size_t n, int dev)
{
    pthread_mutex_lock(&mu);
    if (l->n == l->cap) {
        size_t nc = l->cap ? 2 * l->cap : 64;
        blk *nb = realloc(l->b, nc * sizeof(*nb));
        if (!nb) {
            pthread_mutex_unlock(&mu);
            return -1;
        }
        l->b = nb;
        l->cap = nc;
    }
    l->b[l->n].p = (uintptr_t)p;
    l->b[l->n].n = n;
    l->b[l->n].dev = dev;
    l->n++;
    pthread_mutex_unlock(&mu);
    return 0;
}

/* remove the block starting at p from l: 1, or 0 if l has none */
static int remove_block(blk_list *l, const void *p)
{
    int found = 0;
    pthread_mutex_lock(&mu);
    for (size_t i = 0; i < l->n && !found; i++)
        if (l->b[i].p == (uintptr_t)p) {
            if (l == &blocks)
                dev_used[l->b[i].dev] -= l->b[i].n, all_used -= l->b[i].n;
            l->b[i] = l->b[--l->n];
            found = 1;
        }
    pthread_mutex_unlock(&mu);
    return found;
}

int cuemu_is_device(const void *ptr, size_t n)
{
    return !ptr || in_blocks(&blocks, ptr, n);
}

int cuemu_is_device_on(const void *ptr, size_t n, int dev)
{
    return !ptr || block_dev(&blocks, ptr, n) == dev;
}

int cuemu_launch_device(cudaStream_t s)
{
    int d = stream_dev(s);
    if (d != cur_device) {
        cuemu_set_error(cudaErrorInvalidResourceHandle,
                        "kernel launch on a stream of another device than the current one");
        return -1;
    }
    if (__atomic_load_n(&broken[d], __ATOMIC_RELAXED))
        return -1; /* the context is gone: nothing runs (the error: sticky once seen) */
    if (fault_now()) {
        __atomic_store_n(&broken[d], 1, __ATOMIC_RELAXED);
        return -1;
    }
    __atomic_fetch_add(&dev_launches[d], 1, __ATOMIC_RELAXED);
    return d;
}

/* n bytes of device d's memory */
static cudaError_t malloc_on(void **p, size_t n, int d)
{
    *p = NULL;
    RETURN_IF_STICKY(d);
    int enforced;
    size_t total = dev_total(d, &enforced);
    pthread_mutex_lock(&mu);
    int room = !enforced || (dev_used[d] <= total && n <= total - dev_used[d]);
    if (room) /* reserved now, so that two threads cannot both take the last bytes */
        dev_used[d] += n, all_used += n;
    if (room && dev_used[d] > dev_peak[d])
        dev_peak[d] = dev_used[d];
    if (room && all_used > all_peak)
        all_peak = all_used;
    pthread_mutex_unlock(&mu);
    if (!room)
        return fail(cudaErrorMemoryAllocation, "cudaMalloc: out of memory (CUEMU_MEM_BYTES)");
    void *m = malloc(n ? n : 1);
    if (!m || add_block(&blocks, m, n, d) != 0) {
        free(m);
        pthread_mutex_lock(&mu);
        dev_used[d] -= n, all_used -= n;
        pthread_mutex_unlock(&mu);
        return fail(cudaErrorMemoryAllocation, "cudaMalloc");
    }
    memset(m, 0xff, n); /* a GPU's fresh memory is not zero: NaN for floats here */
    *p = m;
    return cudaSuccess;
}

cudaError_t cudaMalloc(void **p, size_t n)
{
    return malloc_on(p, n, cur_device);
}

static cudaError_t free_block(void *p);

/* A free from a thread-exit destructor (a pthread key's) on a thread that ran kernels: the
 * deferred work it runs would use the thread's scheduler destroyed, and CUDA itself does not
 * promise such calls work either: said, and the process stopped. */
static void exit_check(const char *what)
{
    if (cuemu_thread_gone()) {
        fprintf(stderr, "cuemu: %s during its thread's exit (a thread-exit destructor?)\n", what);
        abort();
    }
}

cudaError_t cudaFree(void *p)
{
    exit_check("cudaFree");
    run_all(0); /* cudaFree waits for the device */
    cudaError_t e = free_block(p);
    return observe(cur_device) ? sticky(cur_device) : e;
}

static cudaError_t free_block(void *p)
{
    if (!p)
        return cudaSuccess;
    if (remove_block(&blocks, p)) {
        free(p);
        return cudaSuccess;
    }
    return fail(cudaErrorInvalidDevicePointer, "cudaFree of a pointer cudaMalloc did not return");
}

cudaError_t cudaMemGetInfo(size_t *free_b, size_t *total_b)
{
    RETURN_IF_STICKY(cur_device);
    size_t total = dev_total(cur_device, NULL);
    pthread_mutex_lock(&mu);
    size_t used = dev_used[cur_device];
    pthread_mutex_unlock(&mu);
    *free_b = used < total ? total - used : 0;
    *total_b = total;
    return cudaSuccess;
}

static int no_pools(void)
{
    const char *e = getenv("CUEMU_NO_POOLS");
    return e && *e && strcmp(e, "0") != 0;
}

cudaError_t cudaDeviceGetAttribute(int *v, cudaDeviceAttr a, int d)
{
    if (d < 0 || d >= n_devices())
        return fail(cudaErrorInvalidDevice, "cudaDeviceGetAttribute");
    if (a != cudaDevAttrMemoryPoolsSupported)
        return fail(cudaErrorInvalidValue, "cudaDeviceGetAttribute");
    *v = !no_pools();
    return cudaSuccess;
}

/* from the pool of the stream's device */
cudaError_t cudaMallocAsync(void **p, size_t n, cudaStream_t s)
{
    if (no_pools())
        return fail(cudaErrorNotSupported, "cudaMallocAsync without memory pools");
    return malloc_on(p, n, stream_dev(s));
}

static struct CUmemPoolHandle_st {
    int unused;
} default_pool[MAX_DEV];

cudaError_t cudaDeviceGetDefaultMemPool(cudaMemPool_t *pool, int d)
{
    if (d < 0 || d >= n_devices())
        return fail(cudaErrorInvalidDevice, "cudaDeviceGetDefaultMemPool");
    if (no_pools())
        return fail(cudaErrorNotSupported, "cudaDeviceGetDefaultMemPool without memory pools");
    *pool = &default_pool[d];
    return cudaSuccess;
}

cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t pool, cudaMemPoolAttr a, void *v)
{
    if (pool < &default_pool[0] || pool >= &default_pool[n_devices()] || !v ||
        a < cudaMemPoolReuseFollowEventDependencies || a > cudaMemPoolAttrReleaseThreshold)
        return fail(cudaErrorInvalidValue, "cudaMemPoolSetAttribute");
    return cudaSuccess;
}

static void do_free(void *p)
{
    free_block(p);
}

cudaError_t cudaFreeAsync(void *p, cudaStream_t s)
{
    if (no_pools())
        return fail(cudaErrorNotSupported, "cudaFreeAsync without memory pools");
    if (!p)
        return fail(cudaErrorInvalidValue, "cudaFreeAsync(NULL)");
    if (!cuemu_is_device(p, 1))
        return fail(cudaErrorInvalidDevicePointer,
                    "cudaFreeAsync of a pointer not from cudaMalloc");
    cuemu_enqueue(s, do_free, p, NULL);
    return sticky(stream_dev(s));
}

static int is_pinned(const void *ptr, size_t n)
{
    return in_blocks(&pinned, ptr, n);
}

/* CUEMU_NO_PINNED=1: no pinned memory to be had (a host whose locked-memory limit is spent),
 * so that the callers' pageable fallbacks run */
cudaError_t cudaHostAlloc(void **p, size_t n, unsigned flags)
{
    (void)flags;
    if (sticky(cur_device)) {
        *p = NULL;
        return sticky(cur_device);
    }
    const char *e = getenv("CUEMU_NO_PINNED");
    if (e && *e == '1') {
        *p = NULL;
        return fail(cudaErrorMemoryAllocation, "cudaHostAlloc");
    }
    *p = malloc(n ? n : 1);
    if (!*p || add_block(&pinned, *p, n, 0) != 0) {
        free(*p);
        *p = NULL;
        return fail(cudaErrorMemoryAllocation, "cudaHostAlloc");
    }
    return cudaSuccess;
}

cudaError_t cudaMallocHost(void **p, size_t n)
{
    return cudaHostAlloc(p, n, 0);
}

cudaError_t cudaFreeHost(void *p)
{
    exit_check("cudaFreeHost");
    run_all(0); /* as cudaFree */
    remove_block(&pinned, p);
    free(p);
    return cudaSuccess;
}

/* 0, or the error of a copy whose pointers are not on the sides its kind says */
static cudaError_t copy_check(void *dst, const void *src, size_t n, cudaMemcpyKind k, int *dd,
                              int *sd)
{
    *dd = cuemu_is_device(dst, n);
    *sd = cuemu_is_device(src, n);
    int want_d = k == cudaMemcpyHostToDevice || k == cudaMemcpyDeviceToDevice;
    int want_s = k == cudaMemcpyDeviceToHost || k == cudaMemcpyDeviceToDevice;
    if (k != cudaMemcpyDefault && k != cudaMemcpyHostToHost && (*dd != want_d || *sd != want_s))
        return fail(cudaErrorInvalidValue,
                    "cudaMemcpy: a pointer is not on the side its kind says");
    return cudaSuccess;
}

/* a copy done now (cudaMemcpy, or an async one that need not wait) */
static cudaError_t copy_now(void *dst, const void *src, size_t n, cudaMemcpyKind k)
{
    if (n == 0)
        return cudaSuccess;
    int dd, sd;
    cudaError_t e = copy_check(dst, src, n, k, &dd, &sd);
    if (e != cudaSuccess)
        return e;
    run_all(1); /* the legacy default stream waits for the blocking streams */
    memmove(dst, src, n);
    return cudaSuccess;
}

cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, cudaMemcpyKind k)
{
    if (observe(cur_device))
        return sticky(cur_device);
    return copy_now(dst, src, n, k);
}

typedef struct copy_ctx {
    void *dst;
    const void *src;
    size_t n;
    int v;        /* memset value */
    void *staged; /* owned copy of pageable source bytes */
} copy_ctx;
static void do_copy(void *c)
{
    copy_ctx *x = c;
    memmove(x->dst, x->staged ? x->staged : x->src, x->n);
}
static void do_set(void *c)
{
    copy_ctx *x = c;
    memset(x->dst, x->v, x->n);
}
static void del_copy(void *c)
{
    copy_ctx *x = c;
    free(x->staged);
    free(x);
}

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, cudaMemcpyKind k, cudaStream_t s)
{
    const int sdev = stream_dev(s);
    RETURN_IF_STICKY(sdev);
    /* a copy into pageable memory waits for its stream: a fault shows */
    if (n && !cuemu_is_device(dst, n) && !is_pinned(dst, n) && observe(sdev))
        return sticky(sdev);
    if (!deferred() || !s || n == 0)
        return copy_now(dst, src, n, k);
    int dd, sd;
    cudaError_t e = copy_check(dst, src, n, k, &dd, &sd);
    if (e != cudaSuccess)
        return e;
    if (!dd && !is_pinned(dst, n)) { /* into pageable memory: done when the call returns */
        cudaStreamSynchronize(s);
        memmove(dst, src, n);
        return cudaSuccess;
    }
    copy_ctx *x = calloc(1, sizeof(*x));
    if (!x)
        return fail(cudaErrorMemoryAllocation, "cudaMemcpyAsync");
    x->dst = dst;
    x->src = src;
    x->n = n;
    if (!sd && !is_pinned(src, n)) { /* from pageable memory: staged now, as CUDA does */
        x->staged = malloc(n);
        if (!x->staged) {
            free(x);
            return fail(cudaErrorMemoryAllocation, "cudaMemcpyAsync");
        }
        memcpy(x->staged, src, n);
    }
    cuemu_enqueue(s, do_copy, x, del_copy);
    return cudaSuccess;
}

cudaError_t cudaMemset(void *p, int v, size_t n)
{
    RETURN_IF_STICKY(cur_device);
    if (!cuemu_is_device(p, n))
        return fail(cudaErrorInvalidValue, "cudaMemset of memory that is not a device block");
    run_all(1);
    memset(p, v, n);
    return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t s)
{
    RETURN_IF_STICKY(stream_dev(s));
    if (!deferred() || !s)
        return cudaMemset(p, v, n);
    if (!cuemu_is_device(p, n))
        return fail(cudaErrorInvalidValue, "cudaMemset of memory that is not a device block");
    copy_ctx *x = calloc(1, sizeof(*x));
    if (!x)
        return fail(cudaErrorMemoryAllocation, "cudaMemsetAsync");
    x->dst = p;
    x->v = v;
    x->n = n;
    cuemu_enqueue(s, do_set, x, del_copy);
    return cudaSuccess;
}

/* ---- streams and events: everything has completed when it is enqueued ---- */

cudaError_t cudaStreamCreate(cudaStream_t *s)
{
    return cudaStreamCreateWithFlags(s, 0);
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags)
{
    if (sticky(cur_device)) {
        *s = NULL;
        return sticky(cur_device);
    }
    *s = calloc(1, sizeof(**s));
    if (!*s)
        return fail(cudaErrorMemoryAllocation, "cudaStreamCreate");
    (*s)->flags = flags;
    (*s)->dev = cur_device;
    deferred();
    pthread_mutex_lock(&qmu);
    (*s)->id = g_next_sid++;
    (*s)->next = g_streams;
    g_streams = *s;
    pthread_mutex_unlock(&qmu);
    return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t s)
{
    if (!s)
        return fail(cudaErrorInvalidResourceHandle, "cudaStreamDestroy");
    deferred();
    pthread_mutex_lock(&qmu);
    run_stream(s, s->n_enq); /* its work completes */
    for (struct CUstream_st **pp = &g_streams; *pp; pp = &(*pp)->next)
        if (*pp == s) {
            *pp = s->next;
            break;
        }
    pthread_mutex_unlock(&qmu);
    cudaError_t e = sticky(s->dev);
    free(s);
    return e;
}

cudaError_t cudaStreamSynchronize(cudaStream_t s)
{
    deferred();
    count_wait(&n_sync_stream);
    const cudaError_t e = observe(stream_dev(s));
    if (!deferred())
        return e;
    if (!s) {
        run_all(1);
        return e;
    }
    pthread_mutex_lock(&qmu);
    run_stream(s, s->n_enq);
    pthread_mutex_unlock(&qmu);
    return e;
}

cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags)
{
    (void)flags;
    if (!e)
        return fail(cudaErrorInvalidResourceHandle, "cudaStreamWaitEvent");
    RETURN_IF_STICKY(stream_dev(s));
    if (!deferred() || !e->sid)
        return cudaSuccess;
    if (!s) {
        event_complete(e);
        return cudaSuccess;
    }
    wait_ctx *w = malloc(sizeof(*w)); /* the event as it is now: a later record does not count */
    if (!w)
        return fail(cudaErrorMemoryAllocation, "cudaStreamWaitEvent");
    w->sid = e->sid;
    w->seq = e->seq;
    cuemu_enqueue(s, do_wait, w, free);
    return cudaSuccess;
}

cudaError_t cudaEventCreate(cudaEvent_t *e)
{
    return cudaEventCreateWithFlags(e, 0);
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned flags)
{
    if (sticky(cur_device)) {
        *e = NULL;
        return sticky(cur_device);
    }
    *e = calloc(1, sizeof(**e));
    if (!*e)
        return fail(cudaErrorMemoryAllocation, "cudaEventCreate");
    (*e)->flags = flags;
    (*e)->dev = cur_device;
    return cudaSuccess;
}

cudaError_t cudaEventDestroy(cudaEvent_t e)
{
    if (e)
        event_complete(e); /* a queued stamp still points at it (CUDA allows the destroy) */
    free(e);
    return cudaSuccess;
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

/* deferred: an event's time, taken when its stream's work reaches it (unless recorded again) */
typedef struct stamp_ctx {
    cudaEvent_t e;
    uint64_t sid, seq;
} stamp_ctx;
static void do_stamp(void *c)
{
    stamp_ctx *x = c;
    if (x->e->sid == x->sid && x->e->seq == x->seq)
        x->e->t_ms = now_ms();
}

cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s)
{
    if (!e)
        return fail(cudaErrorInvalidResourceHandle, "cudaEventRecord");
    if (e->dev != stream_dev(s)) /* as CUDA */
        return fail(cudaErrorInvalidResourceHandle,
                    "cudaEventRecord of an event on a stream of another device");
    RETURN_IF_STICKY(e->dev);
    e->t_ms = now_ms();
    e->recorded = 1;
    e->sid = 0;
    if (deferred() && s) {
        stamp_ctx *x = malloc(sizeof(*x));
        if (!x)
            return fail(cudaErrorMemoryAllocation, "cudaEventRecord");
        pthread_mutex_lock(&qmu);
        x->e = e;
        x->sid = s->id;
        x->seq = s->n_enq + 1;               /* complete once the stamp has run */
        cuemu_enqueue(s, do_stamp, x, free); /* (run at once when it cannot be queued) */
        e->sid = s->id;
        e->seq = s->n_enq;
        pthread_mutex_unlock(&qmu);
    } else if (deferred()) {
        run_all(1);
    }
    return cudaSuccess;
}

/* deferred: e's work has not run yet */
static int event_pending(cudaEvent_t e)
{
    if (!deferred() || !e->sid)
        return 0;
    pthread_mutex_lock(&qmu);
    struct CUstream_st *t = stream_by_id(e->sid);
    int pending = t && t->n_done < e->seq;
    pthread_mutex_unlock(&qmu);
    return pending;
}

/* Deferred work not yet run is not ready (a slow GPU): the caller has to wait for it. */
cudaError_t cudaEventQuery(cudaEvent_t e)
{
    if (!e)
        return fail(cudaErrorInvalidResourceHandle, "cudaEventQuery");
    if (observe(e->dev))
        return sticky(e->dev);
    if (!event_pending(e))
        return cudaSuccess;
    /* as the strictest CUDA runtimes: "not ready" is also the last error (PyTorch clears it
       after a query), so a caller must clear it before its next cudaGetLastError check */
    if (last_error == cudaSuccess)
        last_error = cudaErrorNotReady;
    return cudaErrorNotReady;
}

cudaError_t cudaEventSynchronize(cudaEvent_t e)
{
    if (!e)
        return fail(cudaErrorInvalidResourceHandle, "cudaEventSynchronize");
    deferred();
    count_wait(&n_sync_event);
    event_complete(e);
    return observe(e->dev);
}

cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b)
{
    if (!a || !b || (a->flags & cudaEventDisableTiming) || (b->flags & cudaEventDisableTiming))
        return fail(cudaErrorInvalidResourceHandle, "cudaEventElapsedTime");
    RETURN_IF_STICKY(a->dev);
    if (!a->recorded || !b->recorded) /* as CUDA: an event never recorded has no time */
        return fail(cudaErrorInvalidResourceHandle, "cudaEventElapsedTime");
    if (event_pending(a) || event_pending(b)) /* as CUDA: not yet reached, no time yet */
        return fail(cudaErrorNotReady, "cudaEventElapsedTime");
    *ms = (float)(b->t_ms - a->t_ms);
    return cudaSuccess;
}
