/* mock_cupti.c - a stand-in for libcupti (built as libcupti.so.<CUDA major>, tests only): the
 * part of the Activity and Callback APIs that capture/cupti_timeline.c loads, so that the
 * collector runs in CI without a GPU. Activity the test scripts (kvt_mock_cupti.h) becomes
 * real CUpti_ActivityKernel10 / CUpti_ActivityMemcpy6 records, written into buffers the
 * collector's request callback hands out and delivered at each flush from another thread, as
 * CUPTI's worker thread does. Knobs make it fail the ways the real one can: another subscriber,
 * a refused enable, an incomplete record, dropped records, another API version; built with
 * KVT_MOCK_OMIT_STREAM_ID it lacks cuptiGetStreamIdEx (a library missing a symbol).
 */
#include <cupti.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvt_mock_cupti.h"

#define EXPORT __attribute__((visibility("default")))

/* every record takes one slot, whatever its kind: the collector only walks them through
 * cuptiActivityGetNextRecord */
#define SLOT_BYTES                                                                                 \
    ((((sizeof(CUpti_ActivityKernel10) > sizeof(CUpti_ActivityMemcpy6)                             \
            ? sizeof(CUpti_ActivityKernel10)                                                       \
            : sizeof(CUpti_ActivityMemcpy6)) +                                                     \
       7) /                                                                                        \
      8) *                                                                                         \
     8)

typedef struct scripted {
    bool is_copy;
    uint32_t ctx, stream, copy_count;
    uint64_t start, end, bytes;
    const char *name;
} scripted;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static struct {
    long long knob[KVT_MOCK_UNSUBSCRIBED_CALLS + 1];
    int holder; /* of the subscriber slot: 0 none, 1 another client, 2 the collector */
    CUpti_BuffersCallbackRequestFunc request;
    CUpti_BuffersCallbackCompleteFunc complete;
    scripted *pending;
    size_t n_pending, cap_pending;
    char subscriber_name[64]; /* the collector's, from cuptiSubscribe_v2 */
} m;
static int subscriber_token; /* the handle cuptiSubscribe gives out is its address */

static void defaults(void)
{
    m.knob[KVT_MOCK_VERSION] = 130001;
    m.knob[KVT_MOCK_ENABLE_FAIL_KIND] = -1;
    m.knob[KVT_MOCK_ENABLE_FAIL_RESULT] = CUPTI_ERROR_UNKNOWN;
    m.knob[KVT_MOCK_INCOMPLETE_AT] = -1;
    m.knob[KVT_MOCK_DROPPED] = 0;
    m.knob[KVT_MOCK_RECORDS_PER_BUFFER] = 0;
    m.knob[KVT_MOCK_DELIVER_IN_ENABLE] = 0;
    m.knob[KVT_MOCK_KERNEL_ON_ENABLE] = 0;
    m.knob[KVT_MOCK_V2_REFUSES] = 0;
}

__attribute__((constructor)) static void init(void)
{
    defaults();
}

/* an Activity API call the collector makes without holding the subscriber (mu held) */
static void check_subscribed(void)
{
    if (m.holder != 2)
        m.knob[KVT_MOCK_UNSUBSCRIBED_CALLS]++;
}

EXPORT long long kvt_mock_cupti_set(int knob, long long value)
{
    pthread_mutex_lock(&mu);
    long long old = 0;
    if (knob == KVT_MOCK_OTHER_SUBSCRIBER) {
        old = m.holder == 1;
        if (value && !m.holder)
            m.holder = 1;
        else if (!value && m.holder == 1)
            m.holder = 0;
    } else if (knob >= 0 && knob <= KVT_MOCK_V2_REFUSES) { /* the settable ones */
        old = m.knob[knob];
        m.knob[knob] = value;
    }
    pthread_mutex_unlock(&mu);
    return old;
}

EXPORT long long kvt_mock_cupti_get(int knob)
{
    pthread_mutex_lock(&mu);
    long long v = 0;
    switch (knob) {
    case KVT_MOCK_OTHER_SUBSCRIBER:
        v = m.holder == 1;
        break;
    case KVT_MOCK_SUBSCRIBED:
        v = m.holder == 2;
        break;
    case KVT_MOCK_PENDING:
        v = (long long)m.n_pending;
        break;
    case KVT_MOCK_NAMED_KVTRACE:
        v = m.holder == 2 && !strcmp(m.subscriber_name, "kvtrace");
        break;
    default:
        if (knob >= 0 && knob <= KVT_MOCK_UNSUBSCRIBED_CALLS)
            v = m.knob[knob];
    }
    pthread_mutex_unlock(&mu);
    return v;
}

EXPORT void kvt_mock_cupti_reset(void)
{
    pthread_mutex_lock(&mu);
    m.n_pending = 0;
    if (m.holder == 1)
        m.holder = 0;
    m.knob[KVT_MOCK_UNSUBSCRIBED_CALLS] = 0;
    defaults();
    pthread_mutex_unlock(&mu);
}

static void script(scripted s, int enabled_knob)
{
    pthread_mutex_lock(&mu);
    if (m.knob[enabled_knob]) {
        if (m.n_pending == m.cap_pending) {
            size_t cap = m.cap_pending ? 2 * m.cap_pending : 64;
            scripted *p = realloc(m.pending, cap * sizeof(*p));
            if (!p)
                abort(); /* a test helper: no memory, no test */
            m.pending = p, m.cap_pending = cap;
        }
        m.pending[m.n_pending++] = s;
    }
    pthread_mutex_unlock(&mu);
}

EXPORT void kvt_mock_cupti_kernel(uint32_t ctx, uint32_t stream, uint64_t start_ns, uint64_t end_ns,
                                  const char *name)
{
    script((scripted){.ctx = ctx, .stream = stream, .start = start_ns, .end = end_ns, .name = name},
           KVT_MOCK_KERNEL_ENABLED);
}

EXPORT void kvt_mock_cupti_copy(uint32_t ctx, uint32_t stream, uint64_t start_ns, uint64_t end_ns,
                                uint64_t bytes, uint32_t copy_count)
{
    script((scripted){.is_copy = true,
                      .ctx = ctx,
                      .stream = stream,
                      .start = start_ns,
                      .end = end_ns,
                      .bytes = bytes,
                      .copy_count = copy_count},
           KVT_MOCK_MEMCPY_ENABLED);
}

/* ---- the Callback API: one subscriber at a time ---- */

EXPORT CUptiResult cuptiSubscribe(CUpti_SubscriberHandle *sub, CUpti_CallbackFunc cb, void *ud)
{
    (void)cb, (void)ud;
    if (!sub)
        return CUPTI_ERROR_INVALID_PARAMETER;
    pthread_mutex_lock(&mu);
    CUptiResult r = CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED;
    if (!m.holder) {
        m.holder = 2;
        m.subscriber_name[0] = '\0'; /* unnamed (cuptiSubscribe_v2 names it after) */
        *sub = (CUpti_SubscriberHandle)&subscriber_token;
        r = CUPTI_SUCCESS;
    }
    pthread_mutex_unlock(&mu);
    return r;
}

/* the same, naming the subscriber; the other client, when there is one, is "CUPTI for
 * mock-profiler" (a name as CUPTI writes it, cut to the caller's size) */
EXPORT CUptiResult cuptiSubscribe_v2(CUpti_SubscriberHandle *sub, CUpti_CallbackFunc cb, void *ud,
                                     CUpti_SubscriberParams *params)
{
    if ((params && params->structSize != CUpti_SubscriberParams_STRUCT_SIZE) ||
        kvt_mock_cupti_get(KVT_MOCK_V2_REFUSES))
        return CUPTI_ERROR_INVALID_PARAMETER;
    CUptiResult r = cuptiSubscribe(sub, cb, ud);
    if (r == CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED && params &&
        params->oldSubscriberName && params->oldSubscriberSize)
        snprintf(params->oldSubscriberName, params->oldSubscriberSize, "%s",
                 "CUPTI for mock-profiler");
    if (r == CUPTI_SUCCESS) {
        pthread_mutex_lock(&mu);
        snprintf(m.subscriber_name, sizeof(m.subscriber_name), "%s",
                 params && params->subscriberName ? params->subscriberName : "");
        pthread_mutex_unlock(&mu);
    }
    return r;
}

EXPORT CUptiResult cuptiUnsubscribe(CUpti_SubscriberHandle sub)
{
    pthread_mutex_lock(&mu);
    CUptiResult r = CUPTI_ERROR_INVALID_PARAMETER;
    if (sub == (CUpti_SubscriberHandle)&subscriber_token && m.holder == 2) {
        m.holder = 0;
        r = CUPTI_SUCCESS;
    }
    pthread_mutex_unlock(&mu);
    return r;
}

/* ---- the Activity API ---- */

EXPORT CUptiResult cuptiActivityRegisterCallbacks(CUpti_BuffersCallbackRequestFunc request,
                                                  CUpti_BuffersCallbackCompleteFunc complete)
{
    if (!request || !complete)
        return CUPTI_ERROR_INVALID_PARAMETER;
    pthread_mutex_lock(&mu);
    check_subscribed();
    m.request = request, m.complete = complete;
    pthread_mutex_unlock(&mu);
    return CUPTI_SUCCESS;
}

static CUptiResult set_enabled(CUpti_ActivityKind kind, long long on)
{
    pthread_mutex_lock(&mu);
    check_subscribed();
    CUptiResult r = CUPTI_SUCCESS;
    if (on && (long long)kind == m.knob[KVT_MOCK_ENABLE_FAIL_KIND])
        r = (CUptiResult)m.knob[KVT_MOCK_ENABLE_FAIL_RESULT];
    else if (kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL)
        m.knob[KVT_MOCK_KERNEL_ENABLED] = on;
    else if (kind == CUPTI_ACTIVITY_KIND_MEMCPY)
        m.knob[KVT_MOCK_MEMCPY_ENABLED] = on;
    else
        r = CUPTI_ERROR_INVALID_KIND; /* nothing else is mocked */
    pthread_mutex_unlock(&mu);
    return r;
}

EXPORT CUptiResult cuptiActivityEnable(CUpti_ActivityKind kind)
{
    CUptiResult r = set_enabled(kind, 1);
    if (r == CUPTI_SUCCESS && kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL &&
        kvt_mock_cupti_get(KVT_MOCK_KERNEL_ON_ENABLE))
        kvt_mock_cupti_kernel(1, 1, 0, 1, "engine");
    if (r == CUPTI_SUCCESS && kind == CUPTI_ACTIVITY_KIND_MEMCPY &&
        kvt_mock_cupti_get(KVT_MOCK_DELIVER_IN_ENABLE)) {
        kvt_mock_cupti_kernel(1, 1, 0, 1, "delivered_in_enable");
        cuptiActivityFlushAll(0);
    }
    return r;
}

EXPORT CUptiResult cuptiActivityDisable(CUpti_ActivityKind kind)
{
    return set_enabled(kind, 0);
}

typedef struct delivery {
    CUpti_BuffersCallbackCompleteFunc complete;
    uint8_t *buf;
    size_t size, valid;
} delivery;

static void *deliver(void *arg)
{
    const delivery *d = arg;
    d->complete(NULL, 0, d->buf, d->size, d->valid);
    return NULL;
}

static void write_record(uint8_t *slot, const scripted *s, bool incomplete)
{
    memset(slot, 0, SLOT_BYTES);
    if (s->is_copy) {
        CUpti_ActivityMemcpy6 *c = (CUpti_ActivityMemcpy6 *)slot;
        c->kind = CUPTI_ACTIVITY_KIND_MEMCPY;
        c->copyKind = CUPTI_ACTIVITY_MEMCPY_KIND_DTOH;
        c->bytes = s->bytes;
        c->start = s->start, c->end = s->end;
        c->contextId = s->ctx, c->streamId = s->stream;
        c->copyCount = s->copy_count;
    } else {
        CUpti_ActivityKernel10 *k = (CUpti_ActivityKernel10 *)slot;
        k->kind = CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL;
        k->start = s->start, k->end = s->end;
        k->contextId = s->ctx, k->streamId = s->stream;
        k->name = s->name;
    }
    if (incomplete) /* what cuptiActivityGetNextRecord refuses */
        ((CUpti_Activity *)slot)->kind = CUPTI_ACTIVITY_KIND_INVALID;
}

/* Every scripted record, in buffers from the collector's request callback, each delivered to
 * its completion callback on a thread of its own before the flush returns. */
EXPORT CUptiResult cuptiActivityFlushAll(uint32_t flag)
{
    (void)flag;
    pthread_mutex_lock(&mu);
    check_subscribed();
    CUpti_BuffersCallbackRequestFunc request = m.request;
    CUpti_BuffersCallbackCompleteFunc complete = m.complete;
    scripted *recs = m.pending;
    size_t n = m.n_pending;
    long long incomplete_at = m.knob[KVT_MOCK_INCOMPLETE_AT];
    size_t per_buffer = (size_t)m.knob[KVT_MOCK_RECORDS_PER_BUFFER];
    bool dropped = m.knob[KVT_MOCK_DROPPED] != 0;
    if (request && complete) {
        m.pending = NULL, m.n_pending = m.cap_pending = 0;
        m.knob[KVT_MOCK_INCOMPLETE_AT] = -1;
    }
    pthread_mutex_unlock(&mu);
    if (!request || !complete)
        return CUPTI_SUCCESS;
    size_t i = 0;
    for (bool first = true; i < n || (first && dropped); first = false) {
        /* an empty buffer too when there are only drops to report */
        uint8_t *buf = NULL;
        size_t size = 0, max_records = 0;
        request(&buf, &size, &max_records);
        if (!buf || ((uintptr_t)buf & 7) || size < SLOT_BYTES) {
            fprintf(stderr, "mock_cupti: the request callback gave an unusable buffer\n");
            abort();
        }
        size_t fit = size / SLOT_BYTES, put = 0;
        if (per_buffer && per_buffer < fit)
            fit = per_buffer;
        for (; put < fit && i < n; put++, i++)
            write_record(buf + put * SLOT_BYTES, &recs[i], (long long)i == incomplete_at);
        delivery d = {complete, buf, size, put * SLOT_BYTES};
        pthread_t th;
        if (pthread_create(&th, NULL, deliver, &d) != 0)
            abort();
        pthread_join(th, NULL);
        pthread_mutex_lock(&mu);
        m.knob[KVT_MOCK_BUFFERS_DELIVERED]++;
        pthread_mutex_unlock(&mu);
    }
    free(recs);
    return CUPTI_SUCCESS;
}

EXPORT CUptiResult cuptiActivityGetNextRecord(uint8_t *buffer, size_t valid, CUpti_Activity **rec)
{
    if (!buffer || !rec)
        return CUPTI_ERROR_INVALID_PARAMETER;
    uint8_t *p = *rec ? (uint8_t *)*rec + SLOT_BYTES : buffer;
    if (p + SLOT_BYTES > buffer + valid)
        return CUPTI_ERROR_MAX_LIMIT_REACHED;
    if (((CUpti_Activity *)p)->kind == CUPTI_ACTIVITY_KIND_INVALID)
        return CUPTI_ERROR_INVALID_KIND; /* "incomplete or invalid" */
    *rec = (CUpti_Activity *)p;
    return CUPTI_SUCCESS;
}

EXPORT CUptiResult cuptiActivityGetNumDroppedRecords(CUcontext ctx, uint32_t stream, size_t *n)
{
    (void)ctx, (void)stream;
    if (!n)
        return CUPTI_ERROR_INVALID_PARAMETER;
    pthread_mutex_lock(&mu);
    *n = (size_t)m.knob[KVT_MOCK_DROPPED];
    m.knob[KVT_MOCK_DROPPED] = 0;
    pthread_mutex_unlock(&mu);
    return CUPTI_SUCCESS;
}

EXPORT CUptiResult cuptiGetResultString(CUptiResult r, const char **str)
{
    static _Thread_local char other[48];
    switch (r) {
    case CUPTI_SUCCESS:
        *str = "CUPTI_SUCCESS";
        break;
    case CUPTI_ERROR_INVALID_KIND:
        *str = "CUPTI_ERROR_INVALID_KIND";
        break;
    case CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED:
        *str = "CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED";
        break;
    case CUPTI_ERROR_NOT_COMPATIBLE:
        *str = "CUPTI_ERROR_NOT_COMPATIBLE";
        break;
    default:
        snprintf(other, sizeof(other), "CUPTI_ERROR_%d", (int)r);
        *str = other;
    }
    return CUPTI_SUCCESS;
}

EXPORT CUptiResult cuptiGetVersion(uint32_t *version)
{
    pthread_mutex_lock(&mu);
    *version = (uint32_t)m.knob[KVT_MOCK_VERSION];
    pthread_mutex_unlock(&mu);
    return CUPTI_SUCCESS;
}

/* the fake driver's contexts are their ids (mock_cuda_driver.c) */
EXPORT CUptiResult cuptiGetContextId(CUcontext ctx, uint32_t *id)
{
    if (!id)
        return CUPTI_ERROR_INVALID_PARAMETER;
    if (!ctx)
        return CUPTI_ERROR_INVALID_CONTEXT;
    *id = (uint32_t)(uintptr_t)ctx;
    return CUPTI_SUCCESS;
}

#ifndef KVT_MOCK_OMIT_STREAM_ID
EXPORT CUptiResult cuptiGetStreamIdEx(CUcontext ctx, CUstream stream, uint8_t per_thread,
                                      uint32_t *id)
{
    (void)per_thread;
    uintptr_t h = (uintptr_t)stream;
    if (!id)
        return CUPTI_ERROR_INVALID_PARAMETER;
    if (h >> 16 == 0 || (ctx && (uintptr_t)ctx != h >> 16))
        return CUPTI_ERROR_INVALID_STREAM;
    *id = (uint32_t)(h & 0xffff);
    return CUPTI_SUCCESS;
}
#endif
