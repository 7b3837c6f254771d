/* ctx_gpu.c - the layer context's GPU backend (ctx_gpu.h): uploads a layer once, runs the
 * attention, row-mass and norm kernels of kernels/cuda on its own non-blocking stream, copies
 * their small results into the host context (the probabilities and unit keys only when a host
 * reader fetches them) and keeps the device copies (probabilities, full outputs, row sums,
 * decode-key terms, V, unit keys) for the sweeps, coverage, redundancy, window scores and
 * column sums of the layer's policies. Every copy is on that stream, through the context's own
 * pinned staging buffers (copy_up, download); downloads are waited for, so host arrays are
 * complete when a call returns (between kvt_ctx_gpu_defer on and off, the sweeps' only when
 * it is turned off). Several replay workers may each hold one at once. With a profile, the kernels
 * and copies of each call are timed by CUDA events on the stream (the GPU's own time, without the
 * launches and the host work around them, which the replay's host-side times show), read when
 * the stream has passed them: the profile adds no wait of its own (unless more than CTX_TIMERS
 * timings are in flight), so a profiled run makes the round trips an unprofiled one makes. The
 * host's waits on the stream are counted and timed.
 */
#include <cuda_runtime_api.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctx_gpu.h"
#include "kvt_kernels_cuda.h"
#include "replay_internal.h"
#include "../../kernels/ref/sweep_cuts.h"

#define CTX_GPU_MAP 12
#define CTX_STAGE   ((size_t)4 << 20)   /* bytes of each pinned staging buffer */
#define CTX_PEND    16                  /* small downloads queued in stage[0] before a wait */
#define CTX_DEC     ((size_t)256 << 20) /* bytes of decode-key probabilities held at once */
#define CTX_TIMERS  128                 /* event-timed kernels and copies in flight (profile) */

/* what a timing is booked as: TM_SWEEP + a KVT_GPU_SWEEP_* kind for the sweep kernels */
enum { TM_UPLOAD, TM_DOWNLOAD, TM_ATTN, TM_NORM, TM_COLSUM, TM_SWEEP };

typedef struct ctx_timer {
    cudaEvent_t ev[2]; /* recorded before and after the timed work */
    int what;          /* TM_* */
} ctx_timer;

typedef struct ctx_pend {
    void *dst;       /* host destination */
    size_t off, len; /* where in stage[0], how many bytes */
} ctx_pend;

typedef struct ctx_map {
    const char *h; /* host array of the context */
    char *d;       /* its device copy */
    size_t bytes;
} ctx_map;

struct kvt_ctx_gpu {
    cudaStream_t st;
    int dev; /* its CUDA device (the input's cuda_device) */
    int T, D, Hq, Hkv, Wt, Gd, rows;
    bool extra;
    int dec_rb; /* decode rows of one KV group per call when the decode keys' probabilities of
                   all groups exceed CTX_DEC, else 0: all groups' rows in one call */
    float *k, *v, *qw, *qd; /* the layer's inputs */
    float *kd, *vd;         /* decode keys and values (freed after the decode attention) */
    float *prw, *prd;       /* [Hq, Wt, T], [Hq, Gd, T] probabilities */
    double *aw, *ad;        /* [Hq, Wt, D], [Hq, Gd, D] full outputs */
    float *pr2;      /* [Hkv, rows, Gd] probabilities on decode keys, or [dec_rb, Gd] (freed after
                        their outputs) */
    double *lse;     /* [Hkv, rows] (scratch) */
    float *ku;       /* [Hkv, T, D] unit keys */
    float *ct;       /* [T, n_probe] cosine table of one KV head */
    int32_t *probe;  /* [n_probe] */
    float *best;     /* [n_cut, n_probe] */
    int n_probe;     /* of the cosine table (0: none yet) */
    size_t best_cap; /* floats of best */
    void *work;      /* the sweep kernels' workspace */
    size_t work_cap;
    double *sc, *sc_work;      /* window scores [H', P] and their workspace */
    float *qa;                 /* [T, D] one query head's prompt queries (H2O) */
    double *cs, *cs_work;      /* [T] its column sums, [2T] workspace */
    size_t sc_cap;             /* doubles of each */
    double *norm, *mean, *inv; /* [2, Hkv, T] K's then V's, [Hkv, D], unit rows' (scratch) */
    double *rsw, *rsd, *mm;    /* [Hq, Wt], [Hq, Gd] row masses, [Hq, Wt, NM] by modality */
    uint8_t *mod;              /* [T] modality codes (NULL: none) */
    double *pe, *oe;           /* [Hq, Gd], [Hq, Gd, D] the decode keys' mass and outputs */
    int32_t *order;            /* [T] the ranking being swept */
    int32_t *order_h;          /* [T] host copy of what order holds (NULL: nothing yet) */
    double *rk;                /* [rk_cap] redundancy of each cut */
    int rk_cap;
    double *rscore;  /* [rank_cap] scores being ranked */
    int32_t *rorder; /* [rank_cap] their permutations */
    size_t rank_cap;
    double *rec, *err, *rmod; /* sweep results */
    size_t res_cap;           /* elements of rec and err (rmod: x KVT_NM) */
    ctx_map map[CTX_GPU_MAP];
    int n_map;
    kvt_replay_profile *prof; /* may be NULL */
    /* with a profile: the timings not yet read, a ring (tm_head, tm_n) of tm_cap slots (tests:
       KVT_TEST_GPU_TIMERS), its first tm_made slots' events created */
    ctx_timer tm[CTX_TIMERS];
    int tm_cap, tm_head, tm_n, tm_made;
    uint64_t read_ns; /* inside the input's kv_rest (kvt_ctx_gpu_read_ns) */
    /* Every copy goes through two pinned staging buffers (CTX_STAGE bytes each; NULL when
     * cudaHostAlloc failed: copies from and to the pageable arrays directly, as before): the
     * thread's (ts, stage_take), or the context's own when another context holds those. */
    char *stage[2];
    struct thread_stage *ts;
    cudaEvent_t sev[2]; /* recorded after the last copy that used stage[i] */
    int up_next;        /* the staging buffer of the next upload piece */
    ctx_pend pend[CTX_PEND];
    int n_pend;
    size_t pend_end; /* bytes of stage[0] the queued downloads use */
    bool unsynced;   /* pageable downloads queued (no staging) */
    bool defer;      /* kvt_ctx_gpu_defer: sweeps leave their downloads queued */
};

#define PROF(g, field, v) KVT_PROF_ADD((g)->prof, field, (v))

/* A thread's pinned staging buffers, kept from one of its layer contexts to the next: pinning
 * memory is slow, and cudaFreeHost may wait for the whole device (CUDA allows its freeing
 * calls to synchronize), which at every layer's end made a worker wait for every other
 * worker's queued work. A second context alive on the same thread pins a pair of its own. A
 * replay worker frees them when it is done (kvt_ctx_gpu_thread_end), while the thread is whole;
 * another thread's exit frees them (the key's destructor, a CUDA call during the thread's
 * teardown: the fallback). */
typedef struct thread_stage {
    char *p[2];
    bool busy;    /* a context of this thread holds them */
    unsigned gen; /* stage_gen when pinned */
} thread_stage;
static unsigned stage_gen; /* kvt_ctx_gpu_release's resets so far: older pairs are gone */
static uint64_t devs_used; /* bit d: device d has a context of this process (release resets it) */
static pthread_key_t stage_key;
static pthread_once_t stage_once = PTHREAD_ONCE_INIT;
static bool stage_key_ok;

/* p[0..1] pinned, or both NULL (the error cleared: it is not sticky) */
static bool pin_pair(char *p[2])
{
    for (int i = 0; i < 2; i++)
        /* portable: a worker's next layer may run on another device */
        if (cudaHostAlloc((void **)&p[i], CTX_STAGE, cudaHostAllocPortable) != cudaSuccess) {
            cudaGetLastError();
            if (i)
                cudaFreeHost(p[0]);
            p[0] = p[1] = NULL;
            return false;
        }
    return true;
}

static void thread_stage_free(void *v)
{
    thread_stage *t = v;
    for (int i = 0; i < 2; i++)
        if (t->p[i] && t->gen == __atomic_load_n(&stage_gen, __ATOMIC_RELAXED))
            cudaFreeHost(t->p[i]);
    kvt_free(t);
}

static void stage_key_make(void)
{
    stage_key_ok = pthread_key_create(&stage_key, thread_stage_free) == 0;
}

void kvt_ctx_gpu_thread_end(void)
{
    pthread_once(&stage_once, stage_key_make);
    thread_stage *t = stage_key_ok ? pthread_getspecific(stage_key) : NULL;
    if (!t || t->busy) /* a context still holds them: the thread's exit frees them */
        return;
    pthread_setspecific(stage_key, NULL);
    thread_stage_free(t);
}

/* g->stage: the thread's pair when no other context holds it, else a pair of g's own */
static void stage_take(kvt_ctx_gpu *g)
{
    pthread_once(&stage_once, stage_key_make);
    thread_stage *t = stage_key_ok ? pthread_getspecific(stage_key) : NULL;
    if (stage_key_ok && !t && (t = kvt_calloc(1, sizeof(*t))) &&
        pthread_setspecific(stage_key, t)) {
        kvt_free(t);
        t = NULL;
    }
    const unsigned gen = __atomic_load_n(&stage_gen, __ATOMIC_RELAXED);
    if (t && !t->busy && t->p[0] && t->gen != gen)
        t->p[0] = t->p[1] = NULL; /* unpinned and freed by the device's reset */
    if (t && !t->busy && !t->p[0] && pin_pair(t->p))
        t->gen = gen;
    if (t && !t->busy && t->p[0]) {
        t->busy = true;
        g->ts = t, g->stage[0] = t->p[0], g->stage[1] = t->p[1];
        return;
    }
    pin_pair(g->stage);
}

/* after the context's stream is idle: the thread's pair back, or g's own freed */
static void stage_give(kvt_ctx_gpu *g)
{
    if (g->ts) {
        g->ts->busy = false;
        return;
    }
    for (int i = 0; i < 2; i++)
        if (g->stage[i])
            cudaFreeHost(g->stage[i]);
}

/* a sweep-category kernel time: into the category and its kind */
static void book_sweep(kvt_ctx_gpu *g, int kind, uint64_t ns)
{
    PROF(g, gpu_sweep_ns, ns);
    PROF(g, gpu_sweep_kind_ns[kind], ns);
}

#define GPU_OK_AS(call, what)                                                                      \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess)                                                                     \
            return kvt_error_set(KVT_ERR_CUDA, "replay --device cuda: %s: %s", what,               \
                                 cudaGetErrorString(e_));                                          \
    } while (0)
#define GPU_OK(call) GPU_OK_AS(call, #call)

int kvt_ctx_gpu_devices(char *why, size_t cap)
{
    return kvt_cuda_devices(why, cap);
}

/* The decode rows of one KV group that one call of the decode attention takes when the
 * probabilities over the decode keys of all groups' nqd rows ([Hkv, nqd, Gd] f32) would exceed
 * CTX_DEC bytes (tests: KVT_TEST_GPU_DEC_BYTES), else 0: every group's rows in one call.
 * Each row's bits are the same either way (kvt_attn_probs_batch_cuda). */
static int dec_block_rows(int Hkv, int nqd, int Gd)
{
    size_t cap = CTX_DEC;
    const char *e = getenv("KVT_TEST_GPU_DEC_BYTES");
    if (e && atoll(e) > 0)
        cap = (size_t)atoll(e);
    const size_t row = (size_t)(Gd > 0 ? Gd : 1) * sizeof(float);
    if ((size_t)Hkv * (size_t)nqd * row <= cap)
        return 0;
    const size_t n = cap / row;
    return n < 1 ? 1 : n > (size_t)nqd ? nqd : (int)n;
}

/* Device memory is stream-ordered (cudaMallocAsync on the context's stream; plain cudaMalloc
 * on a GPU without memory pools, kvt_cuda_malloc_async): freeing it does
 * not synchronise the whole device, which would stall the other workers' kernels. */
uint64_t kvt_ctx_gpu_worker_bytes(int T, int D, int Hq, int Hkv, int Wt, int Gd, bool extra,
                                  int n_probe, int n_cut)
{
    if (T < 1 || D < 1 || Hq < 1 || Hkv < 1 || Hq % Hkv)
        return 0;
    const double t = T, d = D, hq = Hq, hkv = Hkv, wt = Wt > 0 ? Wt : 0, gd = Gd > 0 ? Gd : 0;
    const double np = n_probe > 0 ? (n_probe < T ? n_probe : T) : 0, nb = n_cut > 0 ? n_cut : 1;
    const double rows = (double)(Hq / Hkv) * (wt > gd ? wt : gd), nm = KVT_NM;
    const int nqd = Hq / Hkv * (Gd > 0 ? Gd : 0), rb = extra ? dec_block_rows(Hkv, nqd, Gd) : 0;
    const double pr2 = rb ? (double)rb * gd * 4 : hkv * nqd * gd * 4; /* decode keys' probs */
    double b =
        3 * hkv * t * d * 4                              /* K, V, unit keys */
        + hq * (wt + gd) * (d * 4 + t * 4 + d * 8)       /* queries, probabilities, outputs */
        + (extra ? 2 * hkv * gd * d * 4 + pr2 : 0)       /* decode K, V, their probabilities */
        + hkv * (rows * 8 + 2 * t * 8 + d * 8)           /* lse, norms, means */
        + t * (4 + 1)                                    /* order, modality */
        + (double)kvt_unit_rows_cuda_work(T, D) * 8      /* inverse norms, mean parts */
        + hq * wt * 8 * (1 + nm) + hq * gd * 8 * (2 + d) /* masses; decode keys' part */
        + (double)kvt_sweep_cuda_work_bytes(T, (int)nb, (int)np)             /* sweep workspace */
        + (double)kvt_sweep_output_cuda_work_bytes((int)rows, T, D, (int)nb) /* chunks */
        + (double)kvt_sweep_redundancy_cuda_work_bytes(T, D, (int)nb)        /* redundancy */
        + rows * nb * 8 * (2 + nm)                                           /* sweep results */
        + np * (t + 1 + nb) * 4  /* cosine table, probes, bests */
        + 2 * (hq + hkv) * t * 8 /* window scores, workspace */
        + t * d * 4 + 3 * t * 8  /* h2o's column sums from Q_all */
        + hq * t * (12 + 28)     /* rankings: scores, orders, the sort's own */
        + (double)kvt_attn_cuda_temp_bytes((int)rows, T, extra ? Gd : 0, D,
                                           Hkv) /* the attention kernels' own */
        + (extra ? (double)kvt_attn_output_cuda_temp_bytes(rb ? rb : (int)rows, Gd, D, rb ? 1 : Hkv)
                 : 0); /* and the decode keys' output's */
    return (uint64_t)(1.05 * b) + (UINT64_C(16) << 20);
}

/* dev the calling thread's current device, its context marked for kvt_ctx_gpu_release */
static cudaError_t use_device(int dev)
{
    if (dev < 0 || dev >= 64)
        return cudaErrorInvalidDevice;
    cudaError_t e = cudaSetDevice(dev);
    if (e == cudaSuccess)
        __atomic_fetch_or(&devs_used, UINT64_C(1) << dev, __ATOMIC_RELAXED);
    return e;
}

int kvt_ctx_gpu_mem(int dev, uint64_t *free_bytes, uint64_t *total_bytes)
{
    size_t f = 0, t = 0;
    if (use_device(dev) != cudaSuccess || cudaMemGetInfo(&f, &t) != cudaSuccess) {
        cudaGetLastError();
        return -1;
    }
    *free_bytes = f, *total_bytes = t;
    return 0;
}

kvt_status kvt_ctx_gpu_release(void)
{
    __atomic_fetch_add(&stage_gen, 1, __ATOMIC_RELAXED); /* the reset unpins every pair */
    const uint64_t used = __atomic_exchange_n(&devs_used, 0, __ATOMIC_RELAXED);
    for (int d = 0; d < 64; d++)
        if (used >> d & 1) {
            GPU_OK(cudaSetDevice(d));
            GPU_OK(cudaDeviceReset());
        }
    return KVT_OK;
}

/* A kernel's own allocation out of GPU memory (KVT_ERR_NOMEM): the same advice as dalloc's */
static kvt_status kern_nomem(kvt_status st)
{
    if (st != KVT_ERR_NOMEM)
        return st;
    size_t f = 0, t = 0;
    int dev = 0;
    cudaMemGetInfo(&f, &t);
    cudaGetDevice(&dev);
    char msg[256];
    snprintf(msg, sizeof(msg), "%s", kvt_error_msg());
    return kvt_error_set(KVT_ERR_NOMEM,
                         "replay --device cuda: %s (%.1f MiB free of %.1f MiB on device %d): fewer "
                         "--threads, or --device cpu",
                         msg, f / 1048576.0, t / 1048576.0, dev);
}

static kvt_status dalloc(kvt_ctx_gpu *g, void **p, size_t bytes)
{
    cudaError_t e = (cudaError_t)kvt_cuda_malloc_async(p, bytes ? bytes : 1, g->st);
    if (e == cudaErrorMemoryAllocation) {
        cudaGetLastError(); /* not sticky: clear it */
        size_t f = 0, t = 0;
        cudaMemGetInfo(&f, &t);
        return kvt_error_set(KVT_ERR_NOMEM,
                             "replay --device cuda: out of GPU memory (%.1f MiB more for a layer; "
                             "%.1f MiB free of %.1f MiB on device %d): fewer --threads, or "
                             "--device cpu",
                             bytes / 1048576.0, f / 1048576.0, t / 1048576.0, g->dev);
    }
    GPU_OK_AS(e, "cudaMallocAsync");
    return KVT_OK;
}

static void dfree(kvt_ctx_gpu *g, void *p)
{
    if (p)
        kvt_cuda_free_async(p, g->st);
}

/* A host wait for the stream's work, or for one event: counted and timed with a profile. */
static kvt_status tm_poll(kvt_ctx_gpu *g, bool wait);
static kvt_status wait_stream(kvt_ctx_gpu *g)
{
    const uint64_t t0 = g->prof ? kvt_now_ns() : 0;
    GPU_OK(cudaStreamSynchronize(g->st));
    if (!g->prof)
        return KVT_OK;
    PROF(g, gpu_sync_ns, kvt_now_ns() - t0);
    PROF(g, gpu_syncs, 1);
    return tm_poll(g, false); /* every timing is done now */
}

static kvt_status wait_event(kvt_ctx_gpu *g, cudaEvent_t e)
{
    const uint64_t t0 = g->prof ? kvt_now_ns() : 0;
    GPU_OK(cudaEventSynchronize(e));
    if (!g->prof)
        return KVT_OK;
    PROF(g, gpu_sync_ns, kvt_now_ns() - t0);
    PROF(g, gpu_syncs, 1);
    return KVT_OK;
}

/* Timing, with a profile only: tm_begin before a call's kernels or a copy, tm_end(what) after
 * them record events on the stream around that work; their time is read and booked by
 * tm_poll once the stream has passed them (a later call's tm_begin, a wait), so that timing
 * waits for nothing. When the ring is full, tm_begin waits for the oldest. */
#define TM_AT(f) offsetof(kvt_replay_profile, f)
static void tm_book(kvt_ctx_gpu *g, int what, uint64_t ns)
{
    static const size_t at[TM_SWEEP] = {[TM_UPLOAD] = TM_AT(gpu_upload_ns),
                                        [TM_DOWNLOAD] = TM_AT(gpu_download_ns),
                                        [TM_ATTN] = TM_AT(gpu_attn_ns),
                                        [TM_NORM] = TM_AT(gpu_norm_ns),
                                        [TM_COLSUM] = TM_AT(gpu_colsum_ns)};
    if (what >= TM_SWEEP)
        book_sweep(g, what - TM_SWEEP, ns);
    else /* (only with a profile) */
        kvt_prof_add(g->prof, (uint64_t *)((char *)g->prof + at[what]), ns);
}

/* the oldest timing (its work done) read, booked and dropped */
static cudaError_t tm_pop(kvt_ctx_gpu *g)
{
    const ctx_timer *t = &g->tm[g->tm_head];
    float ms = 0.0f;
    cudaError_t e = cudaEventElapsedTime(&ms, t->ev[0], t->ev[1]);
    if (e == cudaSuccess)
        tm_book(g, t->what, (uint64_t)((double)ms * 1e6 + 0.5));
    g->tm_head = (g->tm_head + 1) % g->tm_cap;
    g->tm_n--;
    return e;
}

/* book the timings the stream has passed, oldest first (wait: the oldest waited for first) */
static kvt_status tm_poll(kvt_ctx_gpu *g, bool wait)
{
    while (g->tm_n > 0) {
        ctx_timer *t = &g->tm[g->tm_head];
        if (wait) {
            KVT_FORWARD(wait_event(g, t->ev[1]));
            wait = false;
        } else {
            cudaError_t e = cudaEventQuery(t->ev[1]);
            if (e == cudaErrorNotReady) {
                cudaGetLastError(); /* not an error: not there yet */
                return KVT_OK;
            }
            GPU_OK_AS(e, "cudaEventQuery");
        }
        GPU_OK(tm_pop(g));
    }
    return KVT_OK;
}

static kvt_status tm_begin(kvt_ctx_gpu *g)
{
    if (!g->prof)
        return KVT_OK;
    KVT_FORWARD(tm_poll(g, false));
    if (g->tm_n == g->tm_cap)
        KVT_FORWARD(tm_poll(g, true));
    const int i = (g->tm_head + g->tm_n) % g->tm_cap; /* the slots are used in order */
    if (i == g->tm_made) {
        GPU_OK(cudaEventCreate(&g->tm[i].ev[0]));
        cudaError_t e = cudaEventCreate(&g->tm[i].ev[1]);
        if (e != cudaSuccess) {
            cudaEventDestroy(g->tm[i].ev[0]);
            return kvt_error_set(KVT_ERR_CUDA, "replay --device cuda: cudaEventCreate: %s",
                                 cudaGetErrorString(e));
        }
        g->tm_made++;
    }
    GPU_OK(cudaEventRecord(g->tm[i].ev[0], g->st));
    return KVT_OK;
}

static kvt_status tm_end(kvt_ctx_gpu *g, int what)
{
    if (!g->prof)
        return KVT_OK;
    ctx_timer *t = &g->tm[(g->tm_head + g->tm_n) % g->tm_cap];
    GPU_OK(cudaEventRecord(t->ev[1], g->st));
    t->what = what;
    g->tm_n++;
    return KVT_OK;
}

/* Copies go through pinned staging buffers: a copy from or to pageable memory is synchronous
 * and staged by the driver through its own buffers, shared by every thread of the process, so
 * that the replay's workers copied one at a time at a fraction of the link's speed (PCIe or
 * C2C DMA runs from pinned memory only). Here each context stages its own copies, in pieces
 * of CTX_STAGE bytes, the host's memcpy of one piece overlapping the transfer of the next.
 *
 * flush_down: wait for the queued small downloads and copy them out of stage[0] (before the
 * host reads them, and before the host writes into the staging buffers). */
static kvt_status flush_down(kvt_ctx_gpu *g)
{
    if (!g->n_pend && !g->unsynced)
        return KVT_OK;
    KVT_FORWARD(wait_stream(g));
    for (int i = 0; i < g->n_pend; i++)
        memcpy(g->pend[i].dst, g->stage[0] + g->pend[i].off, g->pend[i].len);
    g->n_pend = 0, g->pend_end = 0, g->unsynced = false;
    return KVT_OK;
}

/* host src [bytes] to device dst, on the stream; src may be reused when it returns */
static kvt_status copy_up(kvt_ctx_gpu *g, void *dst, const void *src, size_t bytes)
{
    PROF(g, gpu_upload_bytes, bytes);
    if (!g->stage[0]) {
        KVT_FORWARD(tm_begin(g));
        GPU_OK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, g->st));
        return tm_end(g, TM_UPLOAD);
    }
    KVT_FORWARD(flush_down(g));
    for (size_t off = 0; off < bytes; off += CTX_STAGE) {
        const size_t n = bytes - off < CTX_STAGE ? bytes - off : CTX_STAGE;
        const int b = g->up_next;
        g->up_next ^= 1;
        KVT_FORWARD(wait_event(g, g->sev[b])); /* its last transfer has read it */
        memcpy(g->stage[b], (const char *)src + off, n);
        KVT_FORWARD(tm_begin(g));
        GPU_OK(cudaMemcpyAsync((char *)dst + off, g->stage[b], n, cudaMemcpyHostToDevice, g->st));
        KVT_FORWARD(tm_end(g, TM_UPLOAD));
        GPU_OK(cudaEventRecord(g->sev[b], g->st));
    }
    return KVT_OK;
}

static kvt_status upload(kvt_ctx_gpu *g, void **dst, const void *src, size_t bytes)
{
    KVT_FORWARD(dalloc(g, dst, bytes));
    return copy_up(g, *dst, src, bytes);
}

/* device src [bytes] to host dst: a small one is queued in stage[0] and lands in dst at the
 * next flush_down; a large one is done when this returns. */
static kvt_status download(kvt_ctx_gpu *g, void *dst, const void *src, size_t bytes)
{
    PROF(g, gpu_download_bytes, bytes);
    if (!g->stage[0]) {
        KVT_FORWARD(tm_begin(g));
        GPU_OK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, g->st));
        g->unsynced = true;
        return tm_end(g, TM_DOWNLOAD);
    }
    if (bytes <= CTX_STAGE) {
        size_t off = (g->pend_end + 15) / 16 * 16;
        if (g->n_pend == CTX_PEND || off + bytes > CTX_STAGE) {
            KVT_FORWARD(flush_down(g));
            off = 0;
        }
        KVT_FORWARD(tm_begin(g));
        GPU_OK(cudaMemcpyAsync(g->stage[0] + off, src, bytes, cudaMemcpyDeviceToHost, g->st));
        g->pend[g->n_pend++] = (ctx_pend){dst, off, bytes};
        g->pend_end = off + bytes;
        return tm_end(g, TM_DOWNLOAD);
    }
    KVT_FORWARD(flush_down(g));
    size_t prev = 0, prev_n = 0; /* the piece in flight before this one */
    int pb = 0;
    for (size_t off = 0, i = 0; off < bytes; off += CTX_STAGE, i++) {
        const size_t n = bytes - off < CTX_STAGE ? bytes - off : CTX_STAGE;
        const int b = (int)(i & 1);
        KVT_FORWARD(tm_begin(g));
        GPU_OK(cudaMemcpyAsync(g->stage[b], (const char *)src + off, n, cudaMemcpyDeviceToHost,
                               g->st));
        KVT_FORWARD(tm_end(g, TM_DOWNLOAD));
        GPU_OK(cudaEventRecord(g->sev[b], g->st));
        if (prev_n) { /* the previous piece, while this one is in flight */
            KVT_FORWARD(wait_event(g, g->sev[pb]));
            memcpy((char *)dst + prev, g->stage[pb], prev_n);
        }
        prev = off, prev_n = n, pb = b;
    }
    KVT_FORWARD(wait_event(g, g->sev[pb]));
    memcpy((char *)dst + prev, g->stage[pb], prev_n);
    return KVT_OK;
}

void kvt_ctx_gpu_end(kvt_ctx_gpu *g)
{
    if (!g)
        return;
    void *bufs[] = {g->k,    g->v,      g->qw,    g->qd,      g->kd,   g->vd, g->prw,
                    g->prd,  g->aw,     g->ad,    g->pr2,     g->lse,  g->ku, g->norm,
                    g->mean, g->inv,    g->rsw,   g->rsd,     g->pe,   g->oe, g->mm,
                    g->mod,  g->order,  g->rec,   g->err,     g->rmod, g->ct, g->probe,
                    g->best, g->work,   g->sc,    g->sc_work, g->qa,   g->cs, g->cs_work,
                    g->rk,   g->rscore, g->rorder};
    if (g->st) {
        cudaSetDevice(g->dev); /* as at its start (the thread's current device since then) */
        for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++)
            dfree(g, bufs[i]);
        /* the last timings booked; quietly: the error being reported may be the caller's */
        const uint64_t t0 = g->prof ? kvt_now_ns() : 0;
        if (cudaStreamSynchronize(g->st) == cudaSuccess && g->prof) {
            PROF(g, gpu_sync_ns, kvt_now_ns() - t0);
            PROF(g, gpu_syncs, 1);
            while (g->tm_n > 0)
                tm_pop(g);
        }
        cudaGetLastError();
        cudaStreamDestroy(g->st);
    }
    for (int i = 0; i < g->tm_made; i++)
        for (int j = 0; j < 2; j++)
            cudaEventDestroy(g->tm[i].ev[j]);
    for (int i = 0; i < 2; i++)
        if (g->sev[i])
            cudaEventDestroy(g->sev[i]);
    stage_give(g);
    kvt_free(g->order_h);
    kvt_free(g);
}

/* piece p's elements as stored, at src on the device, widened into their rows of x */
static kvt_status widen_piece(kvt_ctx_gpu *g, kvt_dtype dt, const kvt_trace_piece *p,
                              const uint8_t *src, float *x)
{
    const size_t T = (size_t)g->T, D = (size_t)g->D;
    const size_t n = (size_t)(p->head_end - p->head_begin) * (p->tok_end - p->tok_begin) * D;
    KVT_FORWARD(tm_begin(g));
    KVT_FORWARD(kvt_widen_stored_cuda(
        dt, p->planes, src, (int)(p->head_end - p->head_begin), (int)(p->tok_end - p->tok_begin),
        g->D, T * D, x + ((size_t)p->head_begin * T + p->tok_begin) * D, (void *)g->st));
    PROF(g, gpu_norm_bytes, n * (sizeof(uint16_t) + sizeof(float)));
    return tm_end(g, TM_NORM);
}

/* The records kv_rest reads, on their way to the device: each decompressed into a pinned
 * staging buffer (one larger than a buffer: into the cover's, copied through them), sent to
 * its place in the unit keys' buffer while the next is decompressed, and widened from there.
 * No host copy of the tensor. */
typedef struct gpu_sink {
    kvt_ctx_gpu *g;
    kvt_kv_cover *cov;
    const uint16_t *src; /* the input's pieces, back to back from byte 0 */
    kvt_dtype dt;
    float *x;
    size_t last; /* the last record's bytes */
    int b;       /* the staging buffer room gave, -1: the cover's */
} gpu_sink;

/* the input's pieces: one upload into the unit keys' buffer, each widened from there */
static kvt_status gpu_given(void *user, const kvt_trace_piece *pc, size_t n_pc)
{
    gpu_sink *k = user;
    kvt_ctx_gpu *g = k->g;
    if (k->cov->end)
        KVT_FORWARD(copy_up(g, g->ku, k->src, (size_t)k->cov->end));
    for (size_t i = 0; i < n_pc; i++)
        KVT_FORWARD(widen_piece(g, k->dt, &pc[i], (const uint8_t *)g->ku + pc[i].offset, k->x));
    return KVT_OK;
}

static kvt_status gpu_room(void *user, size_t bytes, void **buf)
{
    gpu_sink *k = user;
    kvt_ctx_gpu *g = k->g;
    k->last = bytes;
    if (g->stage[0] && bytes <= CTX_STAGE) {
        KVT_FORWARD(flush_down(g)); /* stage[0] may hold queued downloads */
        k->b = g->up_next;
        g->up_next ^= 1;
        KVT_FORWARD(wait_event(g, g->sev[k->b])); /* its last transfer has read it */
        *buf = g->stage[k->b];
        return KVT_OK;
    }
    k->b = -1;
    return kvt_kv_cover_room(k->cov, bytes, buf);
}

static kvt_status gpu_put(void *user, const kvt_trace_piece *p, void *buf)
{
    gpu_sink *k = user;
    kvt_ctx_gpu *g = k->g;
    KVT_FORWARD(kvt_kv_cover_add(k->cov, p, k->last));
    uint8_t *d = (uint8_t *)g->ku + p->offset;
    PROF(g, kv_streamed_bytes, k->last);
    if (k->b < 0) {
        KVT_FORWARD(copy_up(g, d, buf, k->last));
    } else {
        PROF(g, gpu_upload_bytes, k->last);
        KVT_FORWARD(tm_begin(g));
        GPU_OK(cudaMemcpyAsync(d, buf, k->last, cudaMemcpyHostToDevice, g->st));
        KVT_FORWARD(tm_end(g, TM_UPLOAD));
        GPU_OK(cudaEventRecord(g->sev[k->b], g->st));
    }
    return widen_piece(g, k->dt, p, d, k->x);
}

/* K or V (kind) given in 16 bits, into a new f32 array *dst: its n elements in order, or its
 * pieces as a trace stores them (the input's, then the records kv_rest reads). Uploaded as
 * they are into the unit keys' buffer (which the norms fill later) and widened from there, the
 * pieces' byte planes merged on the way. Stream order keeps the next upload into that buffer
 * after the widening. *read_ns: the time inside kv_rest (decompression, with the copies
 * overlapping it). */
static kvt_status put_kv16(kvt_ctx_gpu *g, const kvt_layer_input *in, int kind, float **dst,
                           size_t n, uint64_t *read_ns)
{
    const uint16_t *src = kind == KVT_KIND_K ? in->k16 : in->v16;
    KVT_FORWARD(dalloc(g, (void **)dst, n * sizeof(float)));
    if (!kvt_kv_stored(in)) {
        KVT_FORWARD(copy_up(g, g->ku, src, n * sizeof(uint16_t)));
        KVT_FORWARD(tm_begin(g));
        KVT_FORWARD(kvt_widen_cuda(in->k16_dtype, (const uint16_t *)g->ku, n, *dst, (void *)g->st));
        PROF(g, gpu_norm_bytes, n * (sizeof(uint16_t) + sizeof(float)));
        return tm_end(g, TM_NORM);
    }
    kvt_kv_cover cov;
    gpu_sink k = {g, &cov, src, in->k16_dtype, *dst, 0, -1};
    const kvt_trace_sink sink = {gpu_room, gpu_put, &k};
    return kvt_kv_cover_run(&cov, in, kind, gpu_given, &k, &sink, read_ns);
}

static kvt_status begin(const kvt_layer_input *in, kvt_ctx_gpu *g)
{
    const size_t T = (size_t)g->T, D = (size_t)g->D, kv = (size_t)g->Hkv * T * D;
    const size_t rows = (size_t)g->rows, Hq = (size_t)g->Hq, Hkv = (size_t)g->Hkv;
    GPU_OK(use_device(g->dev));
    GPU_OK(cudaStreamCreateWithFlags(&g->st, cudaStreamNonBlocking));
    for (int i = 0; i < 2; i++)
        GPU_OK(cudaEventCreateWithFlags(&g->sev[i], cudaEventDisableTiming));
    stage_take(g); /* without pinned memory: copies from and to the pageable arrays directly */
    KVT_FORWARD(dalloc(g, (void **)&g->ku, kv * sizeof(float)));
    if (in->k16 || kvt_kv_stored(in)) {
        KVT_FORWARD(put_kv16(g, in, KVT_KIND_K, &g->k, kv, &g->read_ns));
        KVT_FORWARD(put_kv16(g, in, KVT_KIND_V, &g->v, kv, &g->read_ns));
    } else {
        KVT_FORWARD(upload(g, (void **)&g->k, in->k, kv * sizeof(float)));
        KVT_FORWARD(upload(g, (void **)&g->v, in->v, kv * sizeof(float)));
    }
    KVT_FORWARD(upload(g, (void **)&g->qw, in->q_window, Hq * g->Wt * D * sizeof(float)));
    KVT_FORWARD(dalloc(g, (void **)&g->prw, Hq * g->Wt * T * sizeof(float)));
    KVT_FORWARD(dalloc(g, (void **)&g->aw, Hq * g->Wt * D * sizeof(double)));
    KVT_FORWARD(dalloc(g, (void **)&g->rsw, Hq * g->Wt * sizeof(double)));
    if (in->modality) {
        KVT_FORWARD(upload(g, (void **)&g->mod, in->modality, T));
        KVT_FORWARD(dalloc(g, (void **)&g->mm, Hq * g->Wt * KVT_NM * sizeof(double)));
    }
    if (g->Gd > 0) {
        KVT_FORWARD(upload(g, (void **)&g->qd, in->q_decode, Hq * g->Gd * D * sizeof(float)));
        KVT_FORWARD(dalloc(g, (void **)&g->prd, Hq * g->Gd * T * sizeof(float)));
        KVT_FORWARD(dalloc(g, (void **)&g->ad, Hq * g->Gd * D * sizeof(double)));
        KVT_FORWARD(dalloc(g, (void **)&g->rsd, Hq * g->Gd * sizeof(double)));
    }
    if (g->extra) {
        size_t n = (size_t)g->Hkv * g->Gd * D * sizeof(float);
        KVT_FORWARD(upload(g, (void **)&g->kd, in->k_decode, n));
        KVT_FORWARD(upload(g, (void **)&g->vd, in->v_decode, n));
        const int nqd = g->Hq / g->Hkv * g->Gd;
        g->dec_rb = dec_block_rows(g->Hkv, nqd, g->Gd);
        const size_t n2 = g->dec_rb ? (size_t)g->dec_rb : Hkv * (size_t)nqd;
        KVT_FORWARD(dalloc(g, (void **)&g->pr2, n2 * (size_t)g->Gd * sizeof(float)));
        KVT_FORWARD(dalloc(g, (void **)&g->pe, Hq * g->Gd * sizeof(double)));
        KVT_FORWARD(dalloc(g, (void **)&g->oe, Hq * g->Gd * D * sizeof(double)));
    }
    KVT_FORWARD(dalloc(g, (void **)&g->lse, (Hkv * rows > 2 ? Hkv * rows : 2) * sizeof(double)));
    KVT_FORWARD(dalloc(g, (void **)&g->norm, 2 * Hkv * T * sizeof(double)));
    KVT_FORWARD(dalloc(g, (void **)&g->mean, Hkv * D * sizeof(double)));
    KVT_FORWARD(dalloc(g, (void **)&g->inv, kvt_unit_rows_cuda_work(g->T, g->D) * sizeof(double)));
    return dalloc(g, (void **)&g->order, T * sizeof(int32_t));
}

kvt_status kvt_ctx_gpu_begin(const kvt_layer_input *in, int Gd, int rows, kvt_replay_profile *prof,
                             kvt_ctx_gpu **out)
{
    *out = NULL;
    kvt_ctx_gpu *g = kvt_calloc(1, sizeof(*g));
    KVT_RETURN_IF(!g, KVT_ERR_NOMEM, "out of memory");
    g->prof = prof;
    const char *e = getenv("KVT_TEST_GPU_TIMERS");
    g->tm_cap = e && atoi(e) >= 1 && atoi(e) <= CTX_TIMERS ? atoi(e) : CTX_TIMERS;
    g->T = in->T, g->D = in->D, g->Hq = in->Hq, g->Hkv = in->Hkv, g->Wt = in->W, g->Gd = Gd;
    g->dev = in->cuda_device;
    g->rows = rows > 0 ? rows : 1;
    g->extra = Gd > 0 && in->k_decode && in->v_decode;
    kvt_status s = begin(in, g);
    if (s != KVT_OK) {
        kvt_ctx_gpu_end(g);
        return s;
    }
    *out = g;
    return KVT_OK;
}

uint64_t kvt_ctx_gpu_read_ns(const kvt_ctx_gpu *g)
{
    return g ? g->read_ns : 0;
}

kvt_status kvt_ctx_gpu_check_kv(kvt_ctx_gpu *g, size_t *bad_k, size_t *bad_v)
{
    KVT_RETURN_IF(!g, KVT_ERR_INVALID_ARG, "replay --device cuda: no context");
    const size_t n = (size_t)g->Hkv * g->T * g->D;
    unsigned long long *d = (unsigned long long *)g->lse, h[2]; /* lse: rows >= 2 doubles */
    KVT_FORWARD(tm_begin(g));
    KVT_FORWARD(kvt_first_nonfinite_cuda(g->k, n, d, (void *)g->st));
    KVT_FORWARD(kvt_first_nonfinite_cuda(g->v, n, d + 1, (void *)g->st));
    KVT_FORWARD(tm_end(g, TM_NORM)); /* booked with the norms: K and V read once more */
    PROF(g, gpu_norm_bytes, 2 * n * sizeof(float));
    KVT_FORWARD(download(g, h, d, sizeof(h)));
    KVT_FORWARD(flush_down(g));
    *bad_k = (size_t)h[0], *bad_v = (size_t)h[1];
    return KVT_OK;
}

/* the decode keys' part of n_batch groups' n rows from their probabilities p2 [n_batch, n, Gd]:
 * outputs oe [n_batch n, D] over vd [n_batch, Gd, D], masses pe [n_batch n] */
static kvt_status dec_part(kvt_ctx_gpu *g, const float *p2, int n, const float *vd, double *oe,
                           double *pe, int n_batch)
{
    const size_t Gd = (size_t)g->Gd;
    KVT_FORWARD(kern_nomem(kvt_attn_output_batch_cuda(p2, n, g->Gd, Gd, vd, g->D, oe, (size_t)g->D,
                                                      n_batch, (void *)g->st)));
    return kvt_row_mass_cuda(p2, n * n_batch, g->Gd, Gd, NULL, pe, NULL, (void *)g->st);
}

/* the decode attention group by group in blocks of dec_rb rows, each block's probabilities over
 * the decode keys (pr2) summed into their part before the next block reuses pr2 */
static kvt_status dec_blocks(kvt_ctx_gpu *g, int n_q, const int *n_vis, const int *n_vis2,
                             double scale)
{
    const size_t T = (size_t)g->T, D = (size_t)g->D, Gd = (size_t)g->Gd;
    for (int h = 0; h < g->Hkv; h++)
        for (int i0 = 0; i0 < n_q; i0 += g->dec_rb) {
            const int n = n_q - i0 < g->dec_rb ? n_q - i0 : g->dec_rb;
            const size_t r0 = (size_t)h * (size_t)n_q + (size_t)i0;
            kvt_status s = kvt_attn_probs_batch_cuda(
                g->qd + r0 * D, n, g->D, g->k + (size_t)h * T * D, g->T, n_vis + i0,
                g->kd + (size_t)h * Gd * D, g->Gd, n_vis2 + i0, scale, g->prd + r0 * T, g->pr2,
                g->lse + r0, 1, (void *)g->st);
            if (s == KVT_ERR_NAN) { /* its row is the block's: say which block */
                char msg[256];
                snprintf(msg, sizeof(msg), "%s", kvt_error_msg());
                return kvt_error_set(s, "%s (KV head %d, decode rows from %d)", msg, h, i0);
            }
            KVT_FORWARD(kern_nomem(s));
            KVT_FORWARD(
                dec_part(g, g->pr2, n, g->vd + (size_t)h * Gd * D, g->oe + r0 * D, g->pe + r0, 1));
        }
    return KVT_OK;
}

kvt_status kvt_ctx_gpu_attn(kvt_ctx_gpu *g, bool decode, int n_q, const int *n_vis,
                            const int *n_vis2, double scale, double *lse, double *out,
                            double *rowsum, double *mass, double *p_extra, double *o_extra)
{
    KVT_RETURN_IF(!g || n_q < 1 || n_q > g->rows, KVT_ERR_INVALID_ARG,
                  "replay --device cuda: bad attention call (%d rows)", n_q);
    KVT_RETURN_IF(decode && g->extra && !g->pr2, KVT_ERR_INVALID_ARG,
                  "replay --device cuda: the decode attention was already computed");
    const size_t T = (size_t)g->T, D = (size_t)g->D, Hkv = (size_t)g->Hkv, nq = (size_t)n_q;
    const size_t rows = Hkv * nq; /* every group's, group after group */
    const float *q = decode ? g->qd : g->qw;
    float *dpr = decode ? g->prd : g->prw;
    double *dout = decode ? g->ad : g->aw;
    bool extra = decode && g->extra;
    const size_t nx = extra ? (size_t)g->Gd : 0;
    KVT_FORWARD(tm_begin(g));
    if (extra && g->dec_rb) /* a block of a group's rows at a time, their decode keys' part */
        KVT_FORWARD(dec_blocks(g, n_q, n_vis, n_vis2, scale));
    else
        KVT_FORWARD(kern_nomem(
            kvt_attn_probs_batch_cuda(q, n_q, g->D, g->k, g->T, n_vis, extra ? g->kd : NULL,
                                      extra ? g->Gd : 0, extra ? n_vis2 : NULL, scale, dpr,
                                      extra ? g->pr2 : NULL, g->lse, g->Hkv, (void *)g->st)));
    KVT_FORWARD(kern_nomem(
        kvt_attn_output_batch_cuda(dpr, n_q, g->T, T, g->v, g->D, dout, D, g->Hkv, (void *)g->st)));
    double *drs = decode ? g->rsd : g->rsw;
    double *dmass = !decode && g->mod ? g->mm : NULL;
    KVT_FORWARD(kvt_row_mass_cuda(dpr, (int)rows, g->T, T, dmass ? g->mod : NULL, drs, dmass,
                                  (void *)g->st));
    if (extra && !g->dec_rb) /* the decode keys' outputs and mass */
        KVT_FORWARD(dec_part(g, g->pr2, n_q, g->vd, g->oe, g->pe, g->Hkv));
    if (extra) { /* their probabilities, keys and values are done with */
        dfree(g, g->pr2), dfree(g, g->kd), dfree(g, g->vd);
        g->pr2 = NULL, g->kd = NULL, g->vd = NULL;
    }
    KVT_FORWARD(tm_end(g, TM_ATTN));
    /* at least: Q, K, V read once, P written and read back, the outputs written */
    PROF(g, gpu_attn_bytes,
         Hkv * ((nq * D + 2 * (T + nx) * D + 2 * nq * (T + nx)) * sizeof(float) +
                nq * (D + 1) * (extra ? 2 : 1) * sizeof(double)));
    PROF(g, gpu_attn_flop, 4 * (uint64_t)rows * (T + nx) * D);
    if (extra && p_extra && o_extra) {
        KVT_FORWARD(download(g, p_extra, g->pe, rows * sizeof(double)));
        KVT_FORWARD(download(g, o_extra, g->oe, rows * D * sizeof(double)));
    }
    KVT_FORWARD(download(g, lse, g->lse, rows * sizeof(double)));
    KVT_FORWARD(download(g, out, dout, rows * D * sizeof(double)));
    KVT_FORWARD(download(g, rowsum, drs, rows * sizeof(double)));
    if (dmass && mass)
        KVT_FORWARD(download(g, mass, dmass, rows * KVT_NM * sizeof(double)));
    return flush_down(g);
}

kvt_status kvt_ctx_gpu_norms(kvt_ctx_gpu *g, double *knorm, double *vnorm, double *kmean)
{
    KVT_RETURN_IF(!g, KVT_ERR_INVALID_ARG, "replay --device cuda: no context");
    const size_t T = (size_t)g->T, D = (size_t)g->D, Hkv = (size_t)g->Hkv;
    double *kn = g->norm, *vn = g->norm + Hkv * T;
    KVT_FORWARD(tm_begin(g));
    /* every KV head's rows at once: the norms are per row */
    KVT_FORWARD(kvt_row_norms_cuda(g->k, (int)(Hkv * T), g->D, kn, (void *)g->st));
    KVT_FORWARD(kvt_row_norms_cuda(g->v, (int)(Hkv * T), g->D, vn, (void *)g->st));
    for (size_t h = 0; h < Hkv; h++) /* unit keys and their mean, one head at a time */
        KVT_FORWARD(kvt_unit_rows_cuda(g->k + h * T * D, g->T, g->D, g->ku + h * T * D,
                                       g->mean + h * D, g->inv, (void *)g->st));
    KVT_FORWARD(tm_end(g, TM_NORM));
    /* at least: K and V read for the norms, K read and the unit keys written */
    PROF(g, gpu_norm_bytes, Hkv * (4 * T * D * sizeof(float) + (3 * T + D) * sizeof(double)));
    KVT_FORWARD(download(g, knorm, kn, Hkv * T * sizeof(double)));
    KVT_FORWARD(download(g, vnorm, vn, Hkv * T * sizeof(double)));
    KVT_FORWARD(download(g, kmean, g->mean, Hkv * D * sizeof(double)));
    return flush_down(g);
}

kvt_status kvt_ctx_gpu_fetch(kvt_ctx_gpu *g, kvt_gpu_array which, void *host)
{
    KVT_RETURN_IF(!g || !host, KVT_ERR_INVALID_ARG, "replay --device cuda: no context");
    const size_t T = (size_t)g->T;
    const void *src = which == KVT_GPU_PRW   ? (const void *)g->prw
                      : which == KVT_GPU_PRD ? (const void *)g->prd
                                             : (const void *)g->ku;
    const size_t n = which == KVT_GPU_PRW   ? (size_t)g->Hq * g->Wt * T
                     : which == KVT_GPU_PRD ? (size_t)g->Hq * g->Gd * T
                                            : (size_t)g->Hkv * T * g->D;
    if (!src || !n)
        return KVT_OK;
    KVT_FORWARD(download(g, host, src, n * sizeof(float)));
    return flush_down(g);
}

kvt_status kvt_ctx_gpu_fetch_prd_rows(kvt_ctx_gpu *g, size_t r0, size_t n, float *host)
{
    KVT_RETURN_IF(!g || !host || r0 + n > (size_t)g->Hq * (size_t)g->Gd, KVT_ERR_INVALID_ARG,
                  "replay --device cuda: bad decode rows %zu + %zu", r0, n);
    if (!g->prd || !n)
        return KVT_OK;
    KVT_FORWARD(download(g, host, g->prd + r0 * (size_t)g->T, n * (size_t)g->T * sizeof(float)));
    return flush_down(g);
}

static void add_map(kvt_ctx_gpu *g, const void *h, void *d, size_t bytes)
{
    if (h && d && g->n_map < CTX_GPU_MAP)
        g->map[g->n_map++] = (ctx_map){(const char *)h, (char *)d, bytes};
}

void kvt_ctx_gpu_map_prd(kvt_ctx_gpu *g, const float *host, size_t r0, size_t n)
{
    if (!g || !host || !g->prd)
        return;
    char *d = (char *)(g->prd + r0 * (size_t)g->T);
    for (int i = 0; i < g->n_map; i++)
        if (g->map[i].h == (const char *)host) {
            g->map[i].d = d, g->map[i].bytes = n * (size_t)g->T * sizeof(float);
            return;
        }
    add_map(g, host, d, n * (size_t)g->T * sizeof(float));
}

kvt_status kvt_ctx_gpu_finish(kvt_ctx_gpu *g, const kvt_layer_ctx *c)
{
    KVT_RETURN_IF(!g || !c, KVT_ERR_INVALID_ARG, "replay --device cuda: no context");
    const size_t T = (size_t)g->T, D = (size_t)g->D, Hq = (size_t)g->Hq;
    const size_t nw = Hq * g->Wt, nd = Hq * g->Gd;
    g->n_map = 0;
    add_map(g, c->prw, g->prw, nw * T * sizeof(float));
    add_map(g, c->aw, g->aw, nw * D * sizeof(double));
    add_map(g, c->rsw, g->rsw, nw * sizeof(double));
    add_map(g, c->massw_mod, g->mm, nw * KVT_NM * sizeof(double));
    /* with prd_one the host holds one KV group's rows: kvt_ctx_gpu_map_prd maps them */
    add_map(g, c->prd, g->prd, (c->prd_one ? nd / g->Hkv : nd) * T * sizeof(float));
    add_map(g, c->ad, g->ad, nd * D * sizeof(double));
    add_map(g, c->rsd, g->rsd, nd * sizeof(double));
    add_map(g, c->pd_extra, g->pe, nd * sizeof(double));
    add_map(g, c->od_extra, g->oe, nd * D * sizeof(double));
    add_map(g, c->in->modality, g->mod, T);
    return KVT_OK;
}

/* The sweep kernels' workspace for output sweeps of n_q queries (0: a set sweep, coverage of
 * n_probe probes and redundancy), n_cut cuts (grown, never shrunk). */
static kvt_status need_work(kvt_ctx_gpu *g, int n_q, int n_cut, int n_probe)
{
    size_t need = kvt_sweep_cuda_work_bytes(g->T, n_cut, n_probe);
    size_t out = n_q > 0 ? kvt_sweep_output_cuda_work_bytes(n_q, g->T, g->D, n_cut) : 0;
    size_t red = n_q > 0 ? 0 : kvt_sweep_redundancy_cuda_work_bytes(g->T, g->D, n_cut);
    need = out > need ? out : need;
    need = red > need ? red : need;
    if (need <= g->work_cap)
        return KVT_OK;
    dfree(g, g->work);
    g->work = NULL, g->work_cap = 0;
    KVT_FORWARD(dalloc(g, &g->work, need));
    g->work_cap = need;
    return KVT_OK;
}

/* The ranking `order` [T] (host) into g->order, unless it holds it already: the sweeps of one
 * head (window, decode, set metrics) share it. */
static kvt_status put_order(kvt_ctx_gpu *g, const int32_t *order)
{
    const size_t bytes = (size_t)g->T * sizeof(int32_t);
    if (g->order_h && !memcmp(g->order_h, order, bytes))
        return KVT_OK;
    if (!g->order_h && !(g->order_h = kvt_malloc(bytes)))
        return kvt_error_set(KVT_ERR_NOMEM, "out of memory");
    KVT_FORWARD(copy_up(g, g->order, order, bytes));
    memcpy(g->order_h, order, bytes);
    return KVT_OK;
}

/* The device copy of a host pointer into one of the context's arrays (NULL stays NULL). */
static const void *dev_of(const kvt_ctx_gpu *g, const void *h, bool *ok)
{
    if (!h)
        return NULL;
    const char *p = (const char *)h;
    for (int i = 0; i < g->n_map; i++)
        if (p >= g->map[i].h && p < g->map[i].h + g->map[i].bytes)
            return g->map[i].d + (p - g->map[i].h);
    *ok = false;
    return NULL;
}

static kvt_status sweep_output(kvt_ctx_gpu *g, int n_q, int T, int D, const float *p,
                               size_t stride_p, int group, const double *a_full, size_t stride_a,
                               const double *p_extra, size_t stride_e, const double *o_extra,
                               const double *r_full, const int32_t *order, const int32_t *cuts,
                               int n_cut, const uint8_t *mod, const double *mass_mod,
                               size_t stride_m, double *recall, double *err, double *recall_mod)
{
    KVT_RETURN_IF(!g || T != g->T || D != g->D || n_q < 0 || n_cut < 0 || group < 0 ||
                      group >= g->Hkv,
                  KVT_ERR_INVALID_ARG, "replay --device cuda: bad sweep call");
    if (n_q == 0 || n_cut == 0)
        return KVT_OK;
    bool ok = true;
    const float *dp = dev_of(g, p, &ok), *dv = g->v + (size_t)group * T * D;
    const double *da = dev_of(g, a_full, &ok), *dpe = dev_of(g, p_extra, &ok);
    const double *doe = dev_of(g, o_extra, &ok), *drf = dev_of(g, r_full, &ok);
    const uint8_t *dmod = dev_of(g, mod, &ok);
    const double *dmm = dev_of(g, mass_mod, &ok);
    KVT_RETURN_IF(!ok, KVT_ERR_STATE,
                  "replay --device cuda: internal error: a sweep input outside the layer context");
    size_t n = (size_t)n_q * n_cut;
    if (n > g->res_cap) { /* grow the result buffers */
        dfree(g, g->rec), dfree(g, g->err), dfree(g, g->rmod);
        g->rec = g->err = g->rmod = NULL;
        g->res_cap = 0;
        KVT_FORWARD(dalloc(g, (void **)&g->rec, n * sizeof(double)));
        KVT_FORWARD(dalloc(g, (void **)&g->err, n * sizeof(double)));
        KVT_FORWARD(dalloc(g, (void **)&g->rmod, n * KVT_NM * sizeof(double)));
        g->res_cap = n;
    }
    KVT_FORWARD(put_order(g, order));
    KVT_FORWARD(need_work(g, n_q, n_cut, 0));
    KVT_FORWARD(tm_begin(g));
    KVT_FORWARD(kvt_sweep_output_cuda_ws(n_q, T, D, dp, stride_p, dv, da, stride_a, dpe, stride_e,
                                         doe, drf, g->order, cuts, n_cut, dmod, dmm, stride_m,
                                         g->rec, g->err, mod ? g->rmod : NULL, g->work, g->work_cap,
                                         (void *)g->st));
    KVT_FORWARD(tm_end(g, TM_SWEEP + KVT_GPU_SWEEP_OUTPUT));
    /* at least: the walked tokens' probabilities (every token's when the row masses are not
     * given), V rows and ranks read once, each query's full output read, the results written;
     * FLOP: a product and a sum per walked token, query and dimension, 9 per query, dimension
     * and cut for the error */
    const uint64_t walk = (uint64_t)kvt_sweep_walk(cuts, n_cut, T);
    PROF(g, gpu_sweep_calls, 1);
    PROF(g, gpu_sweep_bytes,
         ((n_q + (uint64_t)D + 1) * walk + (r_full ? 0 : (uint64_t)n_q * T)) * sizeof(float) +
             ((uint64_t)n_q * D + n * (mod ? 2 + KVT_NM : 2)) * sizeof(double));
    PROF(g, gpu_sweep_flop, 2 * (uint64_t)n_q * D * walk + 9 * (uint64_t)n * D);
    KVT_FORWARD(download(g, recall, g->rec, n * sizeof(double)));
    KVT_FORWARD(download(g, err, g->err, n * sizeof(double)));
    if (mod && recall_mod)
        KVT_FORWARD(download(g, recall_mod, g->rmod, n * KVT_NM * sizeof(double)));
    /* deferred: the copies are queued in stream order, before any later kernel reuses the
       device buffers, and each has its own part of the staging buffer */
    return g->defer ? KVT_OK : flush_down(g);
}

kvt_status kvt_ctx_gpu_sweep_output(kvt_ctx_gpu *g, int n_q, int T, int D, const float *p,
                                    size_t stride_p, int group, const double *a_full,
                                    size_t stride_a, const double *p_extra, size_t stride_e,
                                    const double *o_extra, const double *r_full,
                                    const int32_t *order, const int32_t *cuts, int n_cut,
                                    const uint8_t *mod, const double *mass_mod, size_t stride_m,
                                    double *recall, double *err, double *recall_mod)
{
    uint64_t t0 = kvt_now_ns();
    kvt_status s =
        sweep_output(g, n_q, T, D, p, stride_p, group, a_full, stride_a, p_extra, stride_e, o_extra,
                     r_full, order, cuts, n_cut, mod, mass_mod, stride_m, recall, err, recall_mod);
    if (g)
        PROF(g, gpu_sweep_wall_ns, kvt_now_ns() - t0);
    return s;
}

kvt_status kvt_ctx_gpu_defer(kvt_ctx_gpu *g, bool on)
{
    KVT_RETURN_IF(!g, KVT_ERR_INVALID_ARG, "replay --device cuda: no context");
    g->defer = on;
    if (on)
        return KVT_OK;
    /* the wait for the queued kernels and copies, booked as the sweeps' host time */
    uint64_t t0 = kvt_now_ns();
    kvt_status s = flush_down(g);
    PROF(g, gpu_sweep_wall_ns, kvt_now_ns() - t0);
    return s;
}

kvt_status kvt_ctx_gpu_cosines(kvt_ctx_gpu *g, int group, const int32_t *probe, int n_probe)
{
    KVT_RETURN_IF(!g || group < 0 || group >= g->Hkv || n_probe < 1, KVT_ERR_INVALID_ARG,
                  "replay --device cuda: bad cosine table call");
    const size_t T = (size_t)g->T, D = (size_t)g->D;
    if (n_probe != g->n_probe) {
        dfree(g, g->ct), dfree(g, g->probe);
        g->ct = NULL, g->probe = NULL, g->n_probe = 0;
        KVT_FORWARD(dalloc(g, (void **)&g->ct, T * (size_t)n_probe * sizeof(float)));
        KVT_FORWARD(dalloc(g, (void **)&g->probe, (size_t)n_probe * sizeof(int32_t)));
        g->n_probe = n_probe;
    }
    KVT_FORWARD(copy_up(g, g->probe, probe, (size_t)n_probe * sizeof(int32_t)));
    KVT_FORWARD(tm_begin(g));
    KVT_FORWARD(kvt_cosine_table_cuda(g->ku + (size_t)group * T * D, g->T, g->D, g->probe, n_probe,
                                      g->ct, (void *)g->st));
    KVT_FORWARD(tm_end(g, TM_SWEEP + KVT_GPU_SWEEP_COVERAGE));
    /* at least: the unit keys read, the table written; a product and a sum per key, probe and
     * dimension (booked with the sweeps) */
    PROF(g, gpu_sweep_bytes, (T * D + T * (size_t)n_probe) * sizeof(float));
    PROF(g, gpu_sweep_flop, 2 * (uint64_t)T * n_probe * D);
    return KVT_OK;
}

static kvt_status set_sweep(kvt_ctx_gpu *g, int group, const int32_t *order, const int32_t *cuts,
                            int n_cut, float *best, double *rk)
{
    KVT_RETURN_IF(!g || group < 0 || group >= g->Hkv || n_cut < 0 || (best && !g->n_probe),
                  KVT_ERR_INVALID_ARG,
                  "replay --device cuda: bad set sweep (coverage before a cosine table?)");
    if (n_cut == 0)
        return KVT_OK;
    const size_t T = (size_t)g->T, D = (size_t)g->D, n = best ? (size_t)n_cut * g->n_probe : 0;
    if (n > g->best_cap) {
        dfree(g, g->best);
        g->best = NULL, g->best_cap = 0;
        KVT_FORWARD(dalloc(g, (void **)&g->best, n * sizeof(float)));
        g->best_cap = n;
    }
    if (n_cut > g->rk_cap) {
        dfree(g, g->rk);
        g->rk = NULL, g->rk_cap = 0;
        KVT_FORWARD(dalloc(g, (void **)&g->rk, (size_t)n_cut * sizeof(double)));
        g->rk_cap = n_cut;
    }
    KVT_FORWARD(put_order(g, order));
    KVT_FORWARD(need_work(g, 0, n_cut, best ? g->n_probe : 0));
    if (best) { /* coverage and redundancy timed apart */
        KVT_FORWARD(tm_begin(g));
        KVT_FORWARD(kvt_coverage_best_cuda_ws(g->ct, g->T, g->n_probe, g->order, cuts, n_cut,
                                              g->best, g->work, g->work_cap, (void *)g->st));
        KVT_FORWARD(tm_end(g, TM_SWEEP + KVT_GPU_SWEEP_COVERAGE));
    }
    KVT_FORWARD(tm_begin(g));
    KVT_FORWARD(kvt_sweep_redundancy_cuda_ws(g->ku + (size_t)group * T * D, g->T, g->D, g->order,
                                             cuts, n_cut, g->rk, g->work, g->work_cap,
                                             (void *)g->st));
    KVT_FORWARD(tm_end(g, TM_SWEEP + KVT_GPU_SWEEP_REDUNDANCY));
    /* at least: the kept rows of the table (up to the last cut) and their indices read, best
     * written; the kept unit keys read; a sum per kept key and dimension */
    const uint64_t last = (uint64_t)cuts[n_cut - 1];
    PROF(g, gpu_sweep_calls, 1);
    PROF(g, gpu_sweep_bytes,
         (last * ((best ? g->n_probe : 0) + 1 + D) + n) * sizeof(float) + n_cut * sizeof(double));
    PROF(g, gpu_sweep_flop, last * D + 2 * (uint64_t)n_cut * D);
    if (best)
        KVT_FORWARD(download(g, best, g->best, n * sizeof(float)));
    KVT_FORWARD(download(g, rk, g->rk, (size_t)n_cut * sizeof(double)));
    return g->defer ? KVT_OK : flush_down(g);
}

kvt_status kvt_ctx_gpu_set_sweep(kvt_ctx_gpu *g, int group, const int32_t *order,
                                 const int32_t *cuts, int n_cut, float *best, double *rk)
{
    uint64_t t0 = kvt_now_ns();
    kvt_status s = set_sweep(g, group, order, cuts, n_cut, best, rk);
    if (g)
        PROF(g, gpu_sweep_wall_ns, kvt_now_ns() - t0);
    return s;
}

/* the scores' buffers, (Hq + Hkv) x T doubles each: every kind of scores at any window fits */
static kvt_status need_scores(kvt_ctx_gpu *g)
{
    const size_t need = (size_t)(g->Hq + g->Hkv) * (size_t)g->T;
    if (need <= g->sc_cap)
        return KVT_OK;
    dfree(g, g->sc), dfree(g, g->sc_work);
    g->sc = g->sc_work = NULL, g->sc_cap = 0;
    KVT_FORWARD(dalloc(g, (void **)&g->sc, need * sizeof(double)));
    KVT_FORWARD(dalloc(g, (void **)&g->sc_work, need * sizeof(double)));
    g->sc_cap = need;
    return KVT_OK;
}

kvt_status kvt_ctx_gpu_window_scores(kvt_ctx_gpu *g, int W, int kernel, kvt_pool pool,
                                     kvt_reduce reduce, bool per_query, double *out)
{
    KVT_RETURN_IF(!g || W < 1 || W > g->Wt || W >= g->T, KVT_ERR_INVALID_ARG,
                  "replay --device cuda: bad window scores call (W=%d)", W);
    const size_t P = (size_t)(g->T - W), H = (size_t)(per_query ? g->Hq : g->Hkv);
    KVT_FORWARD(need_scores(g));
    KVT_FORWARD(tm_begin(g));
    KVT_FORWARD(kvt_window_scores_cuda(g->prw, g->Hq, g->Hkv, g->Wt, W, g->T, kernel, pool, reduce,
                                       per_query, g->sc_work, g->sc, (void *)g->st));
    KVT_FORWARD(tm_end(g, TM_SWEEP + KVT_GPU_SWEEP_SCORES));
    /* at least: the last W window rows of every query head read, the scores written */
    PROF(g, gpu_sweep_bytes, (size_t)g->Hq * W * P * sizeof(float) + H * P * sizeof(double));
    KVT_FORWARD(download(g, out, g->sc, H * P * sizeof(double)));
    return flush_down(g);
}

kvt_status kvt_ctx_gpu_decode_scores(kvt_ctx_gpu *g, bool per_query, int P, double *out)
{
    KVT_RETURN_IF(!g || g->Gd < 1 || P < 0 || P > g->T, KVT_ERR_INVALID_ARG,
                  "replay --device cuda: bad decode scores call (P=%d)", P);
    const int per = per_query ? 1 : g->Hq / g->Hkv, H = per_query ? g->Hq : g->Hkv;
    KVT_FORWARD(need_scores(g));
    KVT_FORWARD(tm_begin(g));
    KVT_FORWARD(kvt_col_mean_cuda(g->prd, H, per * g->Gd, g->T, P, g->sc, (void *)g->st));
    KVT_FORWARD(tm_end(g, TM_SWEEP + KVT_GPU_SWEEP_SCORES));
    /* at least: the decode probabilities of the prefix read, the scores written */
    PROF(g, gpu_sweep_bytes,
         (size_t)g->Hq * g->Gd * P * sizeof(float) + (size_t)H * P * sizeof(double));
    KVT_FORWARD(download(g, out, g->sc, (size_t)H * P * sizeof(double)));
    return flush_down(g);
}

kvt_status kvt_ctx_gpu_rank(kvt_ctx_gpu *g, const double *score, int H, int P, int32_t *order)
{
    KVT_RETURN_IF(!g || H < 1 || H > g->Hq || P < 1 || P > g->T, KVT_ERR_INVALID_ARG,
                  "replay --device cuda: bad rank call (H=%d P=%d)", H, P);
    const size_t n = (size_t)H * P;
    if (n > g->rank_cap) {
        dfree(g, g->rscore), dfree(g, g->rorder);
        g->rscore = NULL, g->rorder = NULL, g->rank_cap = 0;
        KVT_FORWARD(dalloc(g, (void **)&g->rscore, n * sizeof(double)));
        KVT_FORWARD(dalloc(g, (void **)&g->rorder, n * sizeof(int32_t)));
        g->rank_cap = n;
    }
    KVT_FORWARD(copy_up(g, g->rscore, score, n * sizeof(double)));
    KVT_FORWARD(tm_begin(g));
    KVT_FORWARD(kvt_rank_desc_segmented_cuda(g->rscore, H, P, g->rorder, (void *)g->st));
    KVT_FORWARD(tm_end(g, TM_SWEEP + KVT_GPU_SWEEP_RANK));
    /* at least: the scores read, the keys and indices written and read once per 8-bit pass
     * (8 passes of 64-bit keys), the permutations written */
    PROF(g, gpu_sweep_bytes, n * (sizeof(double) + 8 * 2 * (8 + 4) + 4));
    KVT_FORWARD(download(g, order, g->rorder, n * sizeof(int32_t)));
    return flush_down(g);
}

kvt_status kvt_ctx_gpu_colsum_head(kvt_ctx_gpu *g, int h, const float *q, double scale, double *out)
{
    KVT_RETURN_IF(!g || h < 0 || h >= g->Hq, KVT_ERR_INVALID_ARG,
                  "replay --device cuda: bad column-sum call");
    const size_t T = (size_t)g->T, D = (size_t)g->D;
    if (!g->qa) {
        KVT_FORWARD(dalloc(g, (void **)&g->qa, T * D * sizeof(float)));
        KVT_FORWARD(dalloc(g, (void **)&g->cs, T * sizeof(double)));
        KVT_FORWARD(dalloc(g, (void **)&g->cs_work, 2 * T * sizeof(double)));
    }
    KVT_FORWARD(copy_up(g, g->qa, q, T * D * sizeof(float)));
    const float *K = g->k + (size_t)(h / (g->Hq / g->Hkv)) * T * D;
    KVT_FORWARD(tm_begin(g));
    KVT_FORWARD(
        kvt_attn_colsum_cuda(g->qa, K, g->T, g->D, scale, g->cs_work, g->cs, (void *)g->st));
    KVT_FORWARD(tm_end(g, TM_COLSUM));
    /* at least: the head's queries and keys read, the sums written; the logits of the causal
     * triangle, computed in both passes (row stats, column sums), 2 flop per dimension */
    PROF(g, gpu_colsum_bytes, 2 * T * D * sizeof(float) + T * sizeof(double));
    PROF(g, gpu_colsum_flop, (uint64_t)T * (T + 1) / 2 * 4 * D);
    KVT_FORWARD(download(g, out, g->cs, T * sizeof(double)));
    return flush_down(g);
}
