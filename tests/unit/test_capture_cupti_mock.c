/* test_capture_cupti_mock.c - the CUPTI collector (capture/cupti_timeline.c) on a mock libcupti
 * and a fake driver (tests/mock_cupti), so that it runs in CI without a GPU: scripted kernels
 * and copies must come out of kvt_timeline_stop as summaries worked by hand, and every way
 * CUPTI can fail must give a NULL collector or a failed stop with a one-line reason, never a
 * crash or a silent wrong number. ctest puts the mock's folder first on LD_LIBRARY_PATH;
 * the test opens the same library to reach its knobs (kvt_mock_cupti.h).
 */
#include <cupti.h>
#include <dlfcn.h>

#include "kvt_capture.h"
#include "kvt_mock_cupti.h"
#include "kvt_test.h"

#ifndef KVT_MOCK_CUPTI_SONAME
#error "KVT_MOCK_CUPTI_SONAME: the name the collector loads CUPTI by (tests/cmake/capture.cmake)"
#endif

static kvt_mock_cupti_set_fn mock_set;
static kvt_mock_cupti_get_fn mock_get;
static kvt_mock_cupti_kernel_fn mock_kernel;
static kvt_mock_cupti_copy_fn mock_copy;
static kvt_mock_cupti_reset_fn mock_reset;

static void load_mock(void)
{
    void *lib = dlopen(KVT_MOCK_CUPTI_SONAME, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        fprintf(stderr,
                "test_capture_cupti_mock: cannot load the mock %s (%s): run it through "
                "ctest, which puts the mock's folder on LD_LIBRARY_PATH\n",
                KVT_MOCK_CUPTI_SONAME, dlerror());
        exit(1);
    }
    *(void **)&mock_set = dlsym(lib, "kvt_mock_cupti_set");
    *(void **)&mock_get = dlsym(lib, "kvt_mock_cupti_get");
    *(void **)&mock_kernel = dlsym(lib, "kvt_mock_cupti_kernel");
    *(void **)&mock_copy = dlsym(lib, "kvt_mock_cupti_copy");
    *(void **)&mock_reset = dlsym(lib, "kvt_mock_cupti_reset");
    if (!mock_set || !mock_get || !mock_kernel || !mock_copy || !mock_reset) {
        fprintf(stderr, "test_capture_cupti_mock: %s is not the mock (no kvt_mock_cupti_*)\n",
                KVT_MOCK_CUPTI_SONAME);
        exit(1);
    }
}

static kvt_timeline *start_ok(void)
{
    char why[256] = "";
    kvt_timeline *tl = kvt_timeline_start(why, sizeof(why));
    KVT_EXPECT_MSG(tl != NULL, "start: %s", why);
    return tl;
}

/* a start that must fail: its reason must begin with "CUPTI: " and contain want */
static void start_refused(const char *want)
{
    char why[256] = "unchanged";
    kvt_timeline *tl = kvt_timeline_start(why, sizeof(why));
    KVT_EXPECT_MSG(tl == NULL, "started where it should say \"%s\"", want);
    KVT_EXPECT_MSG(!strncmp(why, "CUPTI: ", 7) && strstr(why, want) && !strchr(why, '\n'),
                   "reason \"%s\", want \"%s\"", why, want);
    if (tl) { /* don't leave it collecting for the next case */
        kvt_capture_timeline t;
        kvt_timeline_stop(tl, 0, 0, &t);
    }
}

#define CAP_CTX    1u
#define CAP_STREAM 7u

/* Kernels (context 1): attention [1000,1400), GEMM [1400,2000), other [1800,2100) on another
 * stream, attention [2500,2600); merged: [1000,2100) and [2500,2600). Copies: the capture's
 * (stream 7) [1300,1900) lies inside the first span (600 overlapped) and [2050,2700) meets it
 * for 50 and the second for 100; an engine record of 3 copies [0,500) on stream 3 is not the
 * capture's.
 * Context 2 (another GPU) has a stream 7 too: its copy [100,300) is not the capture's, and
 * its GEMM [2200,2500), inside the capture's copy [2050,2700), is not compute that copy
 * overlapped (the old collector counted 1 MiB more and 1050 ns). */
static void script_run(void)
{
    mock_kernel(CAP_CTX + 1, CAP_STREAM, 2200, 2500,
                "ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_tn");
    mock_copy(CAP_CTX + 1, CAP_STREAM, 100, 300, 1u << 20, 1);
    mock_kernel(CAP_CTX, 3, 1000, 1400,
                "void flashinfer::BatchPrefillWithPagedKVCacheKernel<KernelTraits<...>>");
    mock_kernel(CAP_CTX, 3, 1400, 2000, "nvjet_hsh_192x192_64x3_2x1_v_bz_coopB_NTN");
    mock_kernel(CAP_CTX, 4, 1800, 2100, "_ZN10flashinfer4norm13RMSNormKernelILj8EN3c108BFloat16E");
    mock_kernel(CAP_CTX, 3, 2500, 2600, "flash_fwd_kernel<Flash_fwd_kernel_traits<128>>");
    mock_copy(CAP_CTX, CAP_STREAM, 1300, 1900, 4096, 1);
    mock_copy(CAP_CTX, CAP_STREAM, 2050, 2700, 8192, 1);
    mock_copy(CAP_CTX, 3, 0, 500, 1000, 3); /* one record of 3 batched copies */
}

static void expect_run(const kvt_capture_timeline *t)
{
    KVT_EXPECT_EQ_U64(t->n_kernels, 5);
    KVT_EXPECT_EQ_U64(t->attention_ns, 400 + 100);
    KVT_EXPECT_EQ_U64(t->gemm_ns, 600 + 300);
    KVT_EXPECT_EQ_U64(t->other_ns, 300);
    KVT_EXPECT_EQ_U64(t->n_memcpy, 6); /* 4 records, one of them 3 copies */
    KVT_EXPECT_EQ_U64(t->memcpy_bytes, 4096 + 8192 + 1000 + (1u << 20));
    KVT_EXPECT_EQ_U64(t->memcpy_ns, 600 + 650 + 500 + 200);
    KVT_EXPECT_EQ_U64(t->capture_copy_bytes, 4096 + 8192);
    KVT_EXPECT_EQ_U64(t->capture_copy_ns, 600 + 650);
    KVT_EXPECT_EQ_U64(t->capture_copy_overlap_ns, 600 + 50 + 100);
}

/* A scripted run, delivered two records per buffer from CUPTI's side; the collector leaves
 * CUPTI as it found it. Then a second session in the same process. */
static void test_run(void)
{
    mock_reset();
    long long delivered = mock_get(KVT_MOCK_BUFFERS_DELIVERED);
    kvt_timeline *tl = start_ok();
    if (!tl)
        return;
    KVT_EXPECT(mock_get(KVT_MOCK_KERNEL_ENABLED) && mock_get(KVT_MOCK_MEMCPY_ENABLED));
    KVT_EXPECT(mock_get(KVT_MOCK_SUBSCRIBED));
    /* the capture's stream: its context (the driver's cuStreamGetCtx, CUPTI's id) and its id;
     * another context's stream with the same id; a stream the driver knows no context of */
    uint32_t cid = 0, sid = 0;
    KVT_CHECK(kvt_timeline_stream_id(tl, KVT_MOCK_STREAM(CAP_CTX + 1, CAP_STREAM), &cid, &sid));
    KVT_EXPECT(cid == CAP_CTX + 1 && sid == CAP_STREAM);
    KVT_EXPECT_STATUS(kvt_timeline_stream_id(tl, NULL, &cid, &sid), KVT_ERR_NOT_FOUND);
    KVT_EXPECT(cid == 0 && sid == 0);
    KVT_CHECK(kvt_timeline_stream_id(tl, KVT_MOCK_STREAM(CAP_CTX, CAP_STREAM), &cid, &sid));
    KVT_EXPECT(cid == CAP_CTX && sid == CAP_STREAM);
    mock_set(KVT_MOCK_RECORDS_PER_BUFFER, 2);
    script_run();
    KVT_EXPECT_EQ_U64(mock_get(KVT_MOCK_PENDING), 9);
    kvt_capture_timeline t;
    KVT_CHECK(kvt_timeline_stop(tl, cid, sid, &t));
    expect_run(&t);
    KVT_EXPECT_EQ_U64(mock_get(KVT_MOCK_BUFFERS_DELIVERED) - delivered, 5); /* 9 records */
    KVT_EXPECT(!mock_get(KVT_MOCK_KERNEL_ENABLED) && !mock_get(KVT_MOCK_MEMCPY_ENABLED));
    KVT_EXPECT(!mock_get(KVT_MOCK_SUBSCRIBED));
    KVT_EXPECT_EQ_U64(mock_get(KVT_MOCK_UNSUBSCRIBED_CALLS), 0); /* all while subscribed */
    mock_kernel(CAP_CTX, 3, 0, 10, "after stop");                /* not recorded any more */
    KVT_EXPECT_EQ_U64(mock_get(KVT_MOCK_PENDING), 0);

    /* the second session sees only its own activity */
    mock_set(KVT_MOCK_RECORDS_PER_BUFFER, 0);
    tl = start_ok();
    if (!tl)
        return;
    mock_copy(CAP_CTX, CAP_STREAM, 0, 10, 4, 1);
    KVT_CHECK(kvt_timeline_stop(tl, CAP_CTX, CAP_STREAM, &t));
    KVT_EXPECT_EQ_U64(t.n_memcpy, 1);
    KVT_EXPECT_EQ_U64(t.capture_copy_bytes, 4);
    KVT_EXPECT_EQ_U64(t.n_kernels, 0);
}

/* One collector at a time; the refused second start changes nothing for the first. */
static void test_one_at_a_time(void)
{
    mock_reset();
    kvt_timeline *tl = start_ok();
    if (!tl)
        return;
    start_refused("already collecting");
    mock_kernel(CAP_CTX, 3, 0, 40, "cutlass_80_tensorop_bf16_s16816gemm");
    kvt_capture_timeline t;
    KVT_CHECK(kvt_timeline_stop(tl, 0, 0, &t));
    KVT_EXPECT_EQ_U64(t.gemm_ns, 40);
    KVT_EXPECT_EQ_U64(t.capture_copy_bytes, 0);
}

/* An enable CUPTI refuses: NULL and CUPTI's error, the kind already enabled is disabled again,
 * and the next start works. */
static void test_enable_refused(void)
{
    mock_reset();
    mock_set(KVT_MOCK_ENABLE_FAIL_KIND, CUPTI_ACTIVITY_KIND_MEMCPY);
    mock_set(KVT_MOCK_ENABLE_FAIL_RESULT, CUPTI_ERROR_NOT_COMPATIBLE);
    /* a kernel ran between the two enables: the failed start's flush delivers it into the
       collector it frees (test_capture_cupti_mock_valgrind: nothing of it may leak) */
    mock_set(KVT_MOCK_KERNEL_ON_ENABLE, 1);
    long long delivered = mock_get(KVT_MOCK_BUFFERS_DELIVERED);
    start_refused("CUPTI_ERROR_NOT_COMPATIBLE");
    KVT_EXPECT(mock_get(KVT_MOCK_BUFFERS_DELIVERED) > delivered);
    KVT_EXPECT(!mock_get(KVT_MOCK_KERNEL_ENABLED));
    KVT_EXPECT(!mock_get(KVT_MOCK_SUBSCRIBED)); /* or no later start could subscribe */
    mock_kernel(CAP_CTX, 3, 0, 10, "k");
    KVT_EXPECT_EQ_U64(mock_get(KVT_MOCK_PENDING), 0);
    mock_reset();
    kvt_timeline *tl = start_ok();
    if (!tl)
        return;
    mock_kernel(CAP_CTX, 3, 0, 10, "k");
    kvt_capture_timeline t;
    KVT_CHECK(kvt_timeline_stop(tl, 0, 0, &t));
    KVT_EXPECT_EQ_U64(t.n_kernels, 1);
}

/* Another CUPTI client (a profiler, torch.profiler) holds CUPTI's subscriber slot: NULL and a
 * reason naming the likely clients, and nothing of the other client's is touched (the old
 * collector registered its callbacks over the other's and started). Once it is gone, a start
 * works; while the collector runs, another client cannot attach. */
static void test_other_subscriber(void)
{
    mock_reset();
    mock_set(KVT_MOCK_OTHER_SUBSCRIBER, 1);
    /* CUPTI names the client holding it (cuptiSubscribe_v2): the reason says which */
    start_refused("another CUPTI client is attached: CUPTI for mock-profiler (");
    KVT_EXPECT(mock_get(KVT_MOCK_OTHER_SUBSCRIBER)); /* still the other's */
    KVT_EXPECT(!mock_get(KVT_MOCK_KERNEL_ENABLED) && !mock_get(KVT_MOCK_MEMCPY_ENABLED));
    KVT_EXPECT_EQ_U64(mock_get(KVT_MOCK_UNSUBSCRIBED_CALLS), 0);
    mock_set(KVT_MOCK_OTHER_SUBSCRIBER, 0);
    kvt_timeline *tl = start_ok();
    if (!tl)
        return;
    KVT_EXPECT(mock_get(KVT_MOCK_NAMED_KVTRACE)); /* other tools see "CUPTI for kvtrace" */
    mock_set(KVT_MOCK_OTHER_SUBSCRIBER, 1);       /* a profiler started during the capture */
    KVT_EXPECT(!mock_get(KVT_MOCK_OTHER_SUBSCRIBER));
    mock_kernel(CAP_CTX, 3, 0, 10, "k");
    kvt_capture_timeline t;
    KVT_CHECK(kvt_timeline_stop(tl, 0, 0, &t));
    KVT_EXPECT_EQ_U64(t.n_kernels, 1);
    KVT_EXPECT(!mock_get(KVT_MOCK_SUBSCRIBED));
    /* a cuptiSubscribe_v2 that refuses the params: cuptiSubscribe, unnamed, still guards */
    mock_set(KVT_MOCK_V2_REFUSES, 1);
    tl = start_ok();
    if (!tl)
        return;
    KVT_EXPECT(mock_get(KVT_MOCK_SUBSCRIBED) && !mock_get(KVT_MOCK_NAMED_KVTRACE));
    KVT_CHECK(kvt_timeline_stop(tl, 0, 0, &t));
    mock_set(KVT_MOCK_OTHER_SUBSCRIBER, 1);
    start_refused("another CUPTI client is attached (Nsight Systems/Compute");
    mock_reset();
}

/* A buffer CUPTI delivers while start is still enabling, from another thread that start waits
 * for: the callback must neither wait for start (the old collector held its lock across the
 * CUPTI calls: a deadlock, turned into a failure by the alarm in main) nor lose the record. */
static void test_delivery_during_start(void)
{
    mock_reset();
    mock_set(KVT_MOCK_DELIVER_IN_ENABLE, 1);
    kvt_timeline *tl = start_ok();
    mock_set(KVT_MOCK_DELIVER_IN_ENABLE, 0);
    if (!tl)
        return;
    kvt_capture_timeline t;
    KVT_CHECK(kvt_timeline_stop(tl, 0, 0, &t));
    KVT_EXPECT_EQ_U64(t.n_kernels, 1);
    KVT_EXPECT_EQ_U64(t.other_ns, 1);
}

/* Records CUPTI dropped: the summary would be short, so stop fails and says how many. */
static void test_dropped(void)
{
    mock_reset();
    kvt_timeline *tl = start_ok();
    if (!tl)
        return;
    mock_kernel(CAP_CTX, 3, 0, 10, "k");
    mock_set(KVT_MOCK_DROPPED, 3);
    kvt_capture_timeline t;
    KVT_EXPECT_STATUS(kvt_timeline_stop(tl, 0, 0, &t), KVT_ERR_STATE);
    KVT_EXPECT_MSG(!strcmp(kvt_error_msg(), "timeline: 3 activity records dropped: CUPTI had no "
                                            "buffer space for them"),
                   "%s", kvt_error_msg());
}

/* A CUPTI that loads but cannot be used (a missing function, another major version): NULL and
 * a reason naming the file that loaded, then the same reason again on every later start,
 * nothing loaded or enabled in between (the old collector started the second time with NULL
 * functions). Run as its own process: the refusal lasts for the process. */
static void test_unusable(const char *want, const char *dir)
{
    char why[320] = "", why2[320] = "";
    kvt_timeline *tl = kvt_timeline_start(why, sizeof(why));
    KVT_EXPECT_MSG(tl == NULL, "started on an unusable CUPTI");
    KVT_EXPECT_MSG(!strncmp(why, "CUPTI: ", 7) && strstr(why, want) && !strchr(why, '\n'),
                   "reason \"%s\", want \"%s\"", why, want);
    char file[300];
    snprintf(file, sizeof(file), "%s/%s", dir, KVT_MOCK_CUPTI_SONAME);
    KVT_EXPECT_MSG(strstr(why, file) != NULL, "reason \"%s\" does not name %s", why, file);
    for (int i = 0; i < 2; i++) {
        kvt_timeline *tl2 = kvt_timeline_start(why2, sizeof(why2));
        KVT_EXPECT_MSG(tl2 == NULL && !strcmp(why2, why), "start %d: \"%s\"", i + 2, why2);
        if (tl2) {
            uint32_t cid, sid;
            kvt_capture_timeline t;
            kvt_timeline_stream_id(tl2, KVT_MOCK_STREAM(CAP_CTX, CAP_STREAM), &cid, &sid);
            kvt_timeline_stop(tl2, 0, 0, &t);
        }
    }
    KVT_EXPECT(!mock_get(KVT_MOCK_KERNEL_ENABLED) && !mock_get(KVT_MOCK_MEMCPY_ENABLED));
    KVT_EXPECT(!mock_get(KVT_MOCK_SUBSCRIBED));
    if (tl) {
        kvt_capture_timeline t;
        kvt_timeline_stop(tl, 0, 0, &t);
    }
}

/* An incomplete record (work still running at a forced flush): cuptiActivityGetNextRecord
 * refuses it and the rest of its buffer, so stop fails with a reason instead of summing what
 * came before it (the old collector returned KVT_OK with 1 of 3 kernels and no copy). */
static void test_incomplete(void)
{
    mock_reset();
    kvt_timeline *tl = start_ok();
    if (!tl)
        return;
    mock_kernel(CAP_CTX, 3, 0, 10, "k");
    mock_kernel(CAP_CTX, 3, 10, 20, "k");
    mock_kernel(CAP_CTX, 3, 20, 30, "k");
    mock_copy(CAP_CTX, CAP_STREAM, 0, 5, 64, 1);
    mock_set(KVT_MOCK_INCOMPLETE_AT, 1);
    kvt_capture_timeline t;
    KVT_EXPECT_STATUS(kvt_timeline_stop(tl, CAP_CTX, CAP_STREAM, &t), KVT_ERR_STATE);
    KVT_EXPECT_MSG(!strcmp(kvt_error_msg(), "timeline: 1 activity buffer(s) held incomplete or "
                                            "invalid records (CUPTI_ERROR_INVALID_KIND): work "
                                            "still ran at stop; synchronise every device before "
                                            "stopping"),
                   "%s", kvt_error_msg());
    KVT_EXPECT(!mock_get(KVT_MOCK_SUBSCRIBED));
}

/* argv: nothing (the main cases) | "nosym" DIR: the mock in DIR lacks cuptiGetStreamIdEx |
 * "version" V DIR: the mock in DIR reports API version V (outside CUDA 13's range) */
int main(int argc, char **argv)
{
    alarm(60); /* a deadlock fails the test instead of hanging it */
    load_mock();
    if (argc == 3 && !strcmp(argv[1], "nosym")) {
        test_unusable("lacks cuptiGetStreamIdEx", argv[2]);
        return kvt_test_result("test_capture_cupti_mock nosym");
    }
    if (argc == 4 && !strcmp(argv[1], "version")) {
        char want[64];
        snprintf(want, sizeof(want), "has API version %s;", argv[2]);
        mock_set(KVT_MOCK_VERSION, atoll(argv[2]));
        test_unusable(want, argv[3]);
        return kvt_test_result("test_capture_cupti_mock version");
    }
    if (argc != 1) {
        fprintf(stderr, "usage: %s [nosym DIR | version V DIR]\n", argv[0]);
        return 2;
    }
    test_run();
    test_one_at_a_time();
    test_enable_refused();
    test_other_subscriber();
    test_dropped();
    test_incomplete();
    test_delivery_during_start();
    test_run(); /* everything before left CUPTI usable */
    return kvt_test_result("test_capture_cupti_mock");
}
