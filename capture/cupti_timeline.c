/* cupti_timeline.c - the CUPTI activity collector behind kvt_timeline_start/stop (issue #6):
 * concurrent-kernel and memcpy activity records of the whole process, reduced to
 * kvt_timeline_event (a kernel keeps only its category: CUPTI owns the name strings) and
 * summarised by kvt_timeline_summarize. libcupti is loaded with dlopen, so the library runs
 * where CUPTI or the NVIDIA driver is missing; every way it can fail becomes the one-line
 * reason the trace records instead of a timeline. One collector at a time per process.
 */
#define _GNU_SOURCE /* dlinfo: the path of the CUPTI that loaded, for the reasons */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvt_capture.h"

#ifndef KVT_HAVE_CUPTI

kvt_timeline *kvt_timeline_start(char *why, size_t cap)
{
    if (why && cap)
        snprintf(why, cap, "CUPTI: kvtrace was built without CUDA/CUPTI");
    return NULL;
}

kvt_status kvt_timeline_stream_id(kvt_timeline *tl, void *stream, uint32_t *context_id,
                                  uint32_t *stream_id)
{
    (void)stream;
    *context_id = *stream_id = 0;
    KVT_RETURN_IF(!tl, KVT_ERR_INVALID_ARG, "timeline: no collector");
    return kvt_error_set(KVT_ERR_NOT_FOUND, "timeline: built without CUPTI");
}

kvt_status kvt_timeline_stop(kvt_timeline *tl, uint32_t capture_context, uint32_t capture_stream,
                             kvt_capture_timeline *out)
{
    (void)capture_context, (void)capture_stream;
    memset(out, 0, sizeof(*out));
    KVT_RETURN_IF(!tl, KVT_ERR_INVALID_ARG, "timeline: no collector");
    return kvt_error_set(KVT_ERR_STATE, "timeline: no collector (built without CUPTI)");
}

#else

#include <cupti.h>
#include <dlfcn.h>
#include <link.h>
#include <pthread.h>

#ifndef KVT_CUPTI_SONAME
#define KVT_CUPTI_SONAME "libcupti.so"
#endif
#define BUF_BYTES             (1u << 20)
/* The records read (CUpti_ActivityKernel10, CUpti_ActivityMemcpy6) are CUDA 13's: any CUDA 13
 * CUPTI (API version 13yyzz) has them, whatever update these headers came from; another major
 * version may lay them out differently */
#define KVT_CUPTI_MIN_VERSION 130000u
#define KVT_CUPTI_END_VERSION 140000u

typedef struct raw_event {
    uint64_t start, end, bytes, n_copies;
    uint32_t context, stream; /* a stream id is unique only within its context */
    uint8_t is_copy, category;
} raw_event;

struct kvt_timeline {
    pthread_mutex_t mu;
    raw_event *ev;
    size_t n, cap;
    CUpti_SubscriberHandle sub; /* held from start to stop */
    bool oom;                   /* an event was dropped for lack of memory */
    uint64_t dropped;           /* records CUPTI dropped */
    uint64_t bad_buffers;       /* buffers cut short by an incomplete or invalid record */
    CUptiResult bad_result;     /* what cuptiActivityGetNextRecord said of the last of them */
};

static struct {
    void *lib, *drv; /* CUPTI and the driver, both loaded or neither */
    CUptiResult (*enable)(CUpti_ActivityKind);
    CUptiResult (*disable)(CUpti_ActivityKind);
    CUptiResult (*reg)(CUpti_BuffersCallbackRequestFunc, CUpti_BuffersCallbackCompleteFunc);
    CUptiResult (*flush)(uint32_t);
    CUptiResult (*next)(uint8_t *, size_t, CUpti_Activity **);
    CUptiResult (*dropped)(CUcontext, uint32_t, size_t *);
    CUptiResult (*errstr)(CUptiResult, const char **);
    CUptiResult (*version)(uint32_t *);
    CUptiResult (*stream_id)(CUcontext, CUstream, uint8_t, uint32_t *);
    CUptiResult (*context_id)(CUcontext, uint32_t *);
    CUresult (*stream_ctx)(CUstream, CUcontext *); /* the driver's cuStreamGetCtx */
    CUptiResult (*subscribe)(CUpti_SubscriberHandle *, CUpti_CallbackFunc, void *);
    CUptiResult (*unsubscribe)(CUpti_SubscriberHandle);
    /* optional: names this subscriber to other tools and tells the name of the one holding
     * CUPTI (cupti_callbacks.h) */
    CUptiResult (*subscribe_v2)(CUpti_SubscriberHandle *, CUpti_CallbackFunc, void *,
                                CUpti_SubscriberParams *);
} g;
static char g_fail[320];       /* why the CUPTI this process loaded cannot be used (sticky) */
static kvt_timeline *g_active; /* the collector buffers go to; g_mu */
static bool g_starting;        /* a start is calling CUPTI without g_mu; g_mu */
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;

static const char *result_str(CUptiResult r)
{
    const char *s = NULL;
    if (g.errstr && g.errstr(r, &s) == CUPTI_SUCCESS && s)
        return s;
    return "unknown CUPTI error";
}

static void CUPTIAPI buf_requested(uint8_t **buf, size_t *size, size_t *max_records)
{
    *buf = aligned_alloc(8, BUF_BYTES);
    *size = *buf ? BUF_BYTES : 0;
    *max_records = 0;
}

static void push(kvt_timeline *tl, raw_event e)
{
    if (tl->n == tl->cap) {
        size_t cap = tl->cap ? 2 * tl->cap : 4096;
        raw_event *p = kvt_realloc(tl->ev, cap * sizeof(*p));
        if (!p) {
            tl->oom = true;
            return;
        }
        tl->ev = p, tl->cap = cap;
    }
    tl->ev[tl->n++] = e;
}

static void CUPTIAPI buf_completed(CUcontext ctx, uint32_t stream, uint8_t *buf, size_t size,
                                   size_t valid)
{
    pthread_mutex_lock(&g_mu);
    kvt_timeline *tl = g_active;
    if (tl) {
        pthread_mutex_lock(&tl->mu);
        CUpti_Activity *rec = NULL;
        CUptiResult r = CUPTI_ERROR_MAX_LIMIT_REACHED;
        /* an empty buffer is not read at all, as in NVIDIA's samples */
        while (valid && (r = g.next(buf, valid, &rec)) == CUPTI_SUCCESS) {
            if (rec->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL ||
                rec->kind == CUPTI_ACTIVITY_KIND_KERNEL) {
                const CUpti_ActivityKernel10 *k = (const CUpti_ActivityKernel10 *)rec;
                push(tl, (raw_event){.start = k->start,
                                     .end = k->end,
                                     .context = k->contextId,
                                     .stream = k->streamId,
                                     .category = (uint8_t)kvt_timeline_category(k->name)});
            } else if (rec->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
                const CUpti_ActivityMemcpy6 *c = (const CUpti_ActivityMemcpy6 *)rec;
                push(tl, (raw_event){.start = c->start,
                                     .end = c->end,
                                     .bytes = c->bytes,
                                     .n_copies = c->copyCount,
                                     .context = c->contextId,
                                     .stream = c->streamId,
                                     .is_copy = 1});
            }
        }
        /* anything but the end of the buffer is a record CUPTI calls incomplete or invalid
         * (cupti_activity.h): the rest of the buffer cannot be read */
        if (r != CUPTI_ERROR_MAX_LIMIT_REACHED) {
            tl->bad_buffers++;
            tl->bad_result = r;
        }
        size_t d = 0;
        if (g.dropped && g.dropped(ctx, stream, &d) == CUPTI_SUCCESS)
            tl->dropped += d;
        pthread_mutex_unlock(&tl->mu);
    }
    pthread_mutex_unlock(&g_mu);
    free(buf);
}

static void unload(void)
{
    if (g.lib)
        dlclose(g.lib);
    if (g.drv)
        dlclose(g.drv);
    memset(&g, 0, sizeof(g));
}

/* The file a dlopen found (a process may hold several CUPTIs: torch's, the toolkit's) */
static void lib_path(void *lib, const char *asked, char *out, size_t cap)
{
    struct link_map *lm = NULL;
    if (dlinfo(lib, RTLD_DI_LINKMAP, &lm) == 0 && lm && lm->l_name && lm->l_name[0])
        snprintf(out, cap, "%s", lm->l_name);
    else
        snprintf(out, cap, "%s", asked);
}

/* Load the driver and CUPTI and resolve every function, or load nothing. A CUPTI that loads
 * but cannot be used (a missing function, another API version) stays unusable for the process:
 * its reason is kept in g_fail and given again without loading it again. A library or driver
 * not found is not kept: a later start may find one that was loaded since (torch's libcupti). */
static bool load(char *why, size_t cap)
{
    if (g.lib)
        return true;
    if (g_fail[0]) {
        snprintf(why, cap, "%s", g_fail);
        return false;
    }
    /* CUPTI needs the driver; without it, say so rather than CUPTI's "unknown error" */
    g.drv = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!g.drv) {
        snprintf(why, cap, "CUPTI: no NVIDIA driver (libcuda.so.1 not found): no GPU to time");
        return false;
    }
    const char *asked = KVT_CUPTI_SONAME;
    g.lib = dlopen(asked, RTLD_NOW | RTLD_LOCAL);
    if (!g.lib) {
        const char *e = dlerror();
        snprintf(why, cap, "CUPTI: cannot load %s (%s)", asked, e ? e : "not found");
        asked = "libcupti.so"; /* an unversioned link; the version check below decides */
        g.lib = dlopen(asked, RTLD_NOW | RTLD_LOCAL);
        if (!g.lib) {
            unload();
            return false;
        }
        why[0] = '\0';
    }
    char path[160];
    lib_path(g.lib, asked, path, sizeof(path));
    const struct {
        void **fn;
        const char *name;
    } sym[] = {
        {(void **)&g.enable, "cuptiActivityEnable"},
        {(void **)&g.disable, "cuptiActivityDisable"},
        {(void **)&g.reg, "cuptiActivityRegisterCallbacks"},
        {(void **)&g.flush, "cuptiActivityFlushAll"},
        {(void **)&g.next, "cuptiActivityGetNextRecord"},
        {(void **)&g.dropped, "cuptiActivityGetNumDroppedRecords"},
        {(void **)&g.errstr, "cuptiGetResultString"},
        {(void **)&g.version, "cuptiGetVersion"},
        {(void **)&g.stream_id, "cuptiGetStreamIdEx"},
        {(void **)&g.subscribe, "cuptiSubscribe"},
        {(void **)&g.unsubscribe, "cuptiUnsubscribe"},
        {(void **)&g.context_id, "cuptiGetContextId"},
    };
    for (size_t i = 0; i < sizeof(sym) / sizeof(sym[0]); i++) {
        *sym[i].fn = dlsym(g.lib, sym[i].name);
        if (!*sym[i].fn) {
            snprintf(g_fail, sizeof(g_fail), "CUPTI: %s lacks %s", path, sym[i].name);
            goto out_unusable;
        }
    }
    *(void **)&g.subscribe_v2 = dlsym(g.lib, "cuptiSubscribe_v2"); /* may be absent */
    *(void **)&g.stream_ctx = dlsym(g.drv, "cuStreamGetCtx");
    if (!g.stream_ctx) {
        lib_path(g.drv, "libcuda.so.1", path, sizeof(path));
        snprintf(g_fail, sizeof(g_fail), "CUPTI: %s lacks cuStreamGetCtx", path);
        goto out_unusable;
    }
    uint32_t v = 0;
    CUptiResult r = g.version(&v);
    if (r != CUPTI_SUCCESS) {
        snprintf(g_fail, sizeof(g_fail), "CUPTI: %s: cuptiGetVersion: %s", path, result_str(r));
        goto out_unusable;
    }
    if (v < KVT_CUPTI_MIN_VERSION || v >= KVT_CUPTI_END_VERSION) {
        snprintf(g_fail, sizeof(g_fail),
                 "CUPTI: %s has API version %u; kvtrace reads CUDA 13's records: it needs "
                 "%u <= version < %u",
                 path, v, (unsigned)KVT_CUPTI_MIN_VERSION, (unsigned)KVT_CUPTI_END_VERSION);
        goto out_unusable;
    }
    return true;
out_unusable:
    snprintf(why, cap, "%s", g_fail);
    unload();
    return false;
}

/* The subscriber only holds CUPTI's one subscriber slot while the collector runs: no domain
 * or callback is enabled, so this is never called */
static void CUPTIAPI no_callback(void *ud, CUpti_CallbackDomain domain, CUpti_CallbackId id,
                                 const void *data)
{
    (void)ud, (void)domain, (void)id, (void)data;
}

static void tracing_refused(char *why, size_t cap, CUptiResult r)
{
    snprintf(why, cap, "CUPTI: activity tracing unavailable: %s", result_str(r));
}

/* The collector that buf_completed fills: set before the first CUPTI call that may deliver a
 * buffer, cleared before the collector is freed (a callback uses it under g_mu only). */
static void set_active(kvt_timeline *tl)
{
    pthread_mutex_lock(&g_mu);
    g_active = tl;
    pthread_mutex_unlock(&g_mu);
}

kvt_timeline *kvt_timeline_start(char *why, size_t cap)
{
    char tmp[8];
    if (!why || !cap)
        why = tmp, cap = sizeof(tmp);
    why[0] = '\0';
    /* Claim the start, then call CUPTI without g_mu: were CUPTI to deliver a buffer while
     * registering or enabling, buf_completed, which takes g_mu, would wait for this very call */
    pthread_mutex_lock(&g_mu);
    bool busy = g_active || g_starting;
    if (!busy)
        g_starting = true;
    pthread_mutex_unlock(&g_mu);
    if (busy) {
        snprintf(why, cap, "CUPTI: another kvtrace timeline is already collecting");
        return NULL;
    }
    kvt_timeline *tl = NULL;
    if (!load(why, cap))
        goto out_done;
    tl = kvt_calloc(1, sizeof(*tl));
    if (!tl) {
        snprintf(why, cap, "CUPTI: out of memory");
        goto out_done;
    }
    pthread_mutex_init(&tl->mu, NULL);
    /* Subscribe before anything else (cupti_callbacks.h): it is the call that tells another
     * CUPTI client. The activity calls report no such error: without this, the collector would
     * take over the other client's buffer callbacks and turn its tracing off at stop. Held
     * until stop, it keeps a profiler started meanwhile from attaching. */
    char other[CUPTI_OLD_SUBSCRIBER_NAME_MIN_LEN + 1] = "";
    CUptiResult r = CUPTI_ERROR_INVALID_PARAMETER;
    if (g.subscribe_v2) {
        CUpti_SubscriberParams sp = {.structSize = CUpti_SubscriberParams_STRUCT_SIZE,
                                     .subscriberName = "kvtrace",
                                     .oldSubscriberName = other,
                                     .oldSubscriberSize = sizeof(other) - 1};
        r = g.subscribe_v2(&tl->sub, no_callback, NULL, &sp);
        other[sizeof(other) - 1] = '\0';
        for (char *c = other; *c; c++) /* one line of UTF-8 in the trace's reason */
            if ((unsigned char)*c < 0x20 || *c == 0x7f)
                *c = ' ';
        kvt_utf8_sanitize(other);
    }
    if (r == CUPTI_ERROR_INVALID_PARAMETER) /* no _v2, or one that refuses these params */
        r = g.subscribe(&tl->sub, no_callback, NULL);
    if (r == CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED) {
        if (other[0])
            snprintf(why, cap, "CUPTI: another CUPTI client is attached: %s (%s)", other,
                     result_str(r));
        else
            snprintf(why, cap,
                     "CUPTI: another CUPTI client is attached (Nsight Systems/Compute, cuda-gdb, "
                     "compute-sanitizer, torch.profiler...): %s",
                     result_str(r));
        goto out_free;
    }
    if (r != CUPTI_SUCCESS) {
        snprintf(why, cap, "CUPTI: cannot subscribe: %s", result_str(r));
        goto out_free;
    }
    set_active(tl);
    r = g.reg(buf_requested, buf_completed);
    if (r != CUPTI_SUCCESS) {
        tracing_refused(why, cap, r);
        goto out_unsubscribe;
    }
    r = g.enable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
    if (r != CUPTI_SUCCESS) {
        tracing_refused(why, cap, r);
        goto out_unsubscribe;
    }
    r = g.enable(CUPTI_ACTIVITY_KIND_MEMCPY);
    if (r != CUPTI_SUCCESS) {
        tracing_refused(why, cap, r);
        goto out_disable_kernels;
    }
    goto out_done;

out_disable_kernels:
    g.disable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
    g.flush(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED); /* into this collector, not the next one */
out_unsubscribe:
    set_active(NULL);
    g.unsubscribe(tl->sub);
out_free:
    pthread_mutex_destroy(&tl->mu);
    kvt_free(tl->ev); /* what the flush above delivered into it */
    kvt_free(tl);
    tl = NULL;
out_done:
    pthread_mutex_lock(&g_mu);
    g_starting = false;
    pthread_mutex_unlock(&g_mu);
    return tl;
}

kvt_status kvt_timeline_stream_id(kvt_timeline *tl, void *stream, uint32_t *context_id,
                                  uint32_t *stream_id)
{
    *context_id = *stream_id = 0;
    KVT_RETURN_IF(!tl, KVT_ERR_INVALID_ARG, "timeline: no collector");
    /* CUPTI's stream ids are unique within a context only: the context's id goes with it */
    CUcontext ctx = NULL;
    CUresult cr = g.stream_ctx((CUstream)stream, &ctx);
    KVT_RETURN_IF(cr != CUDA_SUCCESS || !ctx, KVT_ERR_NOT_FOUND,
                  "timeline: the stream's context: cuStreamGetCtx error %d", (int)cr);
    CUptiResult r = g.context_id(ctx, context_id);
    KVT_RETURN_IF(r != CUPTI_SUCCESS, KVT_ERR_NOT_FOUND, "timeline: context id: %s", result_str(r));
    r = g.stream_id(NULL, (CUstream)stream, 0, stream_id);
    KVT_RETURN_IF(r != CUPTI_SUCCESS, KVT_ERR_NOT_FOUND, "timeline: stream id: %s", result_str(r));
    return KVT_OK;
}

kvt_status kvt_timeline_stop(kvt_timeline *tl, uint32_t capture_context, uint32_t capture_stream,
                             kvt_capture_timeline *out)
{
    memset(out, 0, sizeof(*out));
    KVT_RETURN_IF(!tl, KVT_ERR_INVALID_ARG, "timeline: no collector");
    g.flush(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED); /* delivers every buffer to buf_completed */
    g.disable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
    g.disable(CUPTI_ACTIVITY_KIND_MEMCPY);
    g.flush(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
    g.unsubscribe(tl->sub); /* before a new start can subscribe */
    set_active(NULL);
    static const char *cat_name[] = {"attention", "gemm", "other"};
    kvt_timeline_event *ev = kvt_malloc((tl->n + 1) * sizeof(*ev));
    kvt_status st = KVT_OK;
    if (!ev || tl->oom)
        st = kvt_error_set(KVT_ERR_NOMEM, "timeline: out of memory for the activity records");
    for (size_t i = 0; !st && i < tl->n; i++) {
        const raw_event *e = &tl->ev[i];
        ev[i] = (kvt_timeline_event){.start_ns = e->start,
                                     .end_ns = e->end,
                                     .is_copy = e->is_copy,
                                     .capture = e->is_copy && capture_stream &&
                                                e->context == capture_context &&
                                                e->stream == capture_stream,
                                     .bytes = e->bytes,
                                     .n_copies = e->n_copies,
                                     .name = cat_name[e->category < 3 ? e->category : 2],
                                     .context = e->context};
    }
    if (!st)
        st = kvt_timeline_summarize(ev, tl->n, out);
    if (!st && tl->bad_buffers)
        st = kvt_error_set(KVT_ERR_STATE,
                           "timeline: %llu activity buffer(s) held incomplete or invalid "
                           "records (%s): work still ran at stop; synchronise every device "
                           "before stopping",
                           (unsigned long long)tl->bad_buffers, result_str(tl->bad_result));
    if (!st && tl->dropped)
        st = kvt_error_set(KVT_ERR_STATE,
                           "timeline: %llu activity records dropped: CUPTI had no buffer space "
                           "for them",
                           (unsigned long long)tl->dropped);
    kvt_free(ev);
    kvt_free(tl->ev);
    pthread_mutex_destroy(&tl->mu);
    kvt_free(tl);
    return st;
}

#endif /* KVT_HAVE_CUPTI */
