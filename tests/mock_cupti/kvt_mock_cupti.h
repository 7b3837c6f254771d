/* kvt_mock_cupti.h - the control interface of the mock CUPTI (mock_cupti.c, built as
 * libcupti.so.<CUDA major>) and the fake driver (mock_cuda_driver.c, built as libcuda.so.1)
 * that let capture/cupti_timeline.c run on a machine without a GPU: a test puts the mock's
 * folder on LD_LIBRARY_PATH, dlopens the mock itself to reach these functions, scripts
 * activity and failures, and checks what the collector made of them.
 *
 * Streams: the fake driver and the mock agree that a CUstream handle is
 * KVT_MOCK_STREAM(context id, stream id); cuStreamGetCtx gives that context, cuptiGetContextId
 * and cuptiGetStreamIdEx its two ids. Handles below 1 << 16 have no context.
 */
#ifndef KVT_MOCK_CUPTI_H
#define KVT_MOCK_CUPTI_H

#include <stdint.h>

#define KVT_MOCK_STREAM(ctx, id) ((void *)(uintptr_t)(((uintptr_t)(ctx) << 16) | (uintptr_t)(id)))

/** Knobs (kvt_mock_cupti_set) and read-only state (kvt_mock_cupti_get). */
enum kvt_mock_knob {
    KVT_MOCK_VERSION,            /* cuptiGetVersion's answer; default 130001 */
    KVT_MOCK_OTHER_SUBSCRIBER,   /* 1: another CUPTI client holds the only subscriber slot */
    KVT_MOCK_ENABLE_FAIL_KIND,   /* the activity kind whose cuptiActivityEnable fails; -1 none */
    KVT_MOCK_ENABLE_FAIL_RESULT, /* ... with this CUptiResult */
    KVT_MOCK_INCOMPLETE_AT,      /* the Nth record (0-based) of the next flush is incomplete */
    KVT_MOCK_DROPPED,            /* records reported dropped with the next delivered buffer */
    KVT_MOCK_RECORDS_PER_BUFFER, /* records per delivered buffer; 0: as many as fit */
    KVT_MOCK_DELIVER_IN_ENABLE,  /* 1: enabling MEMCPY records a kernel ("delivered_in_enable",
                                    [0,1) on context 1 stream 1) and delivers it at once from
                                    another thread, waiting for the callback to return */
    KVT_MOCK_KERNEL_ON_ENABLE,   /* 1: enabling CONCURRENT_KERNEL records a kernel ("engine",
                                    [0,1) on context 1 stream 1): work already running */
    KVT_MOCK_V2_REFUSES,         /* 1: cuptiSubscribe_v2 answers CUPTI_ERROR_INVALID_PARAMETER
                                    (a CUPTI that does not take the caller's params) */
    /* read only */
    KVT_MOCK_SUBSCRIBED,         /* 1 while the collector holds the subscriber slot */
    KVT_MOCK_KERNEL_ENABLED,     /* CONCURRENT_KERNEL activity enabled */
    KVT_MOCK_MEMCPY_ENABLED,     /* MEMCPY activity enabled */
    KVT_MOCK_PENDING,            /* scripted records recorded but not yet delivered */
    KVT_MOCK_BUFFERS_DELIVERED,  /* buffers handed to the completion callback, in all */
    KVT_MOCK_NAMED_KVTRACE,      /* 1: the collector's subscriber was named "kvtrace"
                                    (cuptiSubscribe_v2; the other client's name, given back
                                    when it holds the slot, is "CUPTI for mock-profiler") */
    KVT_MOCK_UNSUBSCRIBED_CALLS, /* Activity API calls made without holding the subscriber */
};

/** Set a knob; returns its previous value. */
typedef long long (*kvt_mock_cupti_set_fn)(int knob, long long value);
/** A knob's or a state's value. */
typedef long long (*kvt_mock_cupti_get_fn)(int knob);
/** Script a kernel: recorded (as a CUpti_ActivityKernel10, delivered at the next flush) only
 *  while CONCURRENT_KERNEL is enabled, as CUPTI does. name is borrowed until delivery. */
typedef void (*kvt_mock_cupti_kernel_fn)(uint32_t ctx, uint32_t stream, uint64_t start_ns,
                                         uint64_t end_ns, const char *name);
/** Script a copy (a CUpti_ActivityMemcpy6 of copy_count copies): recorded only while MEMCPY
 *  is enabled. */
typedef void (*kvt_mock_cupti_copy_fn)(uint32_t ctx, uint32_t stream, uint64_t start_ns,
                                       uint64_t end_ns, uint64_t bytes, uint32_t copy_count);
/** Back to the state of a freshly loaded mock (pending records dropped, knobs to defaults;
 *  a subscriber the collector holds stays held). */
typedef void (*kvt_mock_cupti_reset_fn)(void);

#endif /* KVT_MOCK_CUPTI_H */
