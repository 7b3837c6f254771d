/* test_trace_faults.c - injected faults in the trace writer and reader:
 * - allocation failure at every allocation site in turn (N = 1, 2, ... until the operation
 *   succeeds): a clear KVT_ERR_NOMEM, nothing leaked (ASan), and whatever file was left is
 *   readable up to its last complete record;
 * - a full disk at every few hundred bytes (RLIMIT_FSIZE makes write() fail with EFBIG at an
 *   exact offset): the writer reports KVT_ERR_IO with the reason, cuts the file back to its
 *   last complete record, and the reader recovers every record written before the failure;
 * - an append that failed for memory before any of its records was queued may be repeated (its
 *   block is not left claimed); one that failed with part of its records queued stops the writer.
 */
#include <signal.h>
#include <sys/resource.h>

#include "trace_test_util.h"

static char path[256];

static void alloc_faults(int threads)
{
    int n_fail = 0;
    for (uint64_t n = 1; n < 10000; n++) {
        unlink(path);
        kvt_writer_opts o = {.n_threads = threads, .force = true, .max_record_bytes = 256};
        kvt_alloc_fail_at(n);
        kvt_status s = tt_write(path, &o);
        bool fired = kvt_alloc_fail_fired();
        kvt_alloc_fail_at(0);
        if (!fired) {
            KVT_EXPECT_STATUS(s, KVT_OK);
            break;
        }
        n_fail++;
        KVT_EXPECT_MSG(s == KVT_ERR_NOMEM, "alloc %llu: got %s (%s)", (unsigned long long)n,
                       kvt_status_str(s), kvt_error_msg());
        kvt_trace_reader *r;
        if (access(path, F_OK) == 0) { /* what was left must open (header intact) */
            KVT_EXPECT_MSG(kvt_trace_reader_open(path, &r) == KVT_OK, "alloc %llu: %s",
                           (unsigned long long)n, kvt_error_msg());
            if (r)
                kvt_trace_reader_close(r);
        }
    }
    KVT_EXPECT(n_fail > 10);
    printf("writer (%d threads): %d allocation sites failed in turn\n", threads, n_fail);

    /* reader: open + read every tensor with each allocation failing in turn */
    kvt_writer_opts o = {.force = true};
    KVT_CHECK(tt_write(path, &o));
    n_fail = 0;
    for (uint64_t n = 1; n < 10000; n++) {
        kvt_alloc_fail_at(n);
        kvt_trace_reader *r = NULL;
        kvt_status s = kvt_trace_reader_open(path, &r);
        float buf[TT_HQ * TT_T * TT_D];
        for (int l = 0; l < TT_LAYERS && s == KVT_OK; l++)
            s = kvt_trace_reader_read(r, l, KVT_KIND_K, 0, TT_HKV, KVT_DTYPE_F32, buf, sizeof(buf));
        kvt_verify_report rep;
        if (s == KVT_OK)
            s = kvt_trace_verify(path, &rep);
        bool fired = kvt_alloc_fail_fired();
        kvt_alloc_fail_at(0);
        if (r)
            kvt_trace_reader_close(r);
        if (!fired) {
            KVT_EXPECT_STATUS(s, KVT_OK);
            kvt_verify_report_free(&rep);
            break;
        }
        n_fail++;
        KVT_EXPECT_MSG(s == KVT_ERR_NOMEM, "reader alloc %llu: got %s (%s)", (unsigned long long)n,
                       kvt_status_str(s), kvt_error_msg());
    }
    printf("reader: %d allocation sites failed in turn\n", n_fail);
}

static void disk_full(int threads)
{
    struct rlimit old;
    getrlimit(RLIMIT_FSIZE, &old);
    size_t full_n = 0;
    kvt_writer_opts o0 = {.force = true};
    KVT_CHECK(tt_write(path, &o0));
    uint8_t *full = tt_slurp(path, &full_n);
    free(full);
    int cases = 0;
    for (rlim_t lim = 100; lim < full_n; lim += 397) {
        unlink(path);
        struct rlimit rl = {lim, old.rlim_max};
        setrlimit(RLIMIT_FSIZE, &rl);
        kvt_writer_opts o = {.n_threads = threads, .force = true};
        kvt_status s = tt_write(path, &o);
        setrlimit(RLIMIT_FSIZE, &old);
        cases++;
        if (lim < 24 + strlen(tt_header_json) + 4) { /* header did not fit: no file left */
            KVT_EXPECT_STATUS(s, KVT_ERR_IO);
            KVT_EXPECT(access(path, F_OK) != 0);
            continue;
        }
        KVT_EXPECT_MSG(s == KVT_ERR_IO, "limit %llu: got %s", (unsigned long long)lim,
                       kvt_status_str(s));
        KVT_EXPECT_MSG(strstr(kvt_error_msg(), "File too large") ||
                           strstr(kvt_error_msg(), "No space"),
                       "message does not say why: %s", kvt_error_msg());
        size_t n = 0;
        uint8_t *b = tt_slurp(path, &n);
        free(b);
        KVT_EXPECT(n <= lim);
        kvt_trace_reader *r;
        KVT_CHECK(kvt_trace_reader_open(path, &r));
        KVT_EXPECT(kvt_trace_reader_recovered(r));
        size_t nr = kvt_trace_reader_n_records(r), ok = 0;
        for (size_t i = 0; i < nr; i++) {
            kvt_record_info in;
            kvt_trace_reader_record(r, i, &in);
            uint8_t *buf = malloc(in.raw_bytes);
            ok += kvt_trace_reader_read_record(r, i, buf, in.raw_bytes) == KVT_OK;
            free(buf);
        }
        KVT_EXPECT_EQ_U64(ok, nr);
        /* the file was cut back to its last complete record: nothing partial is left */
        kvt_verify_report rep;
        KVT_CHECK(kvt_trace_verify(path, &rep));
        KVT_EXPECT_EQ_U64(rep.tail_bytes_lost, 0);
        kvt_verify_report_free(&rep);
        kvt_trace_reader_close(r);
    }
    printf("disk full (%d threads): %d limits tried\n", threads, cases);
}

/* One block split into several records, its append failing at each allocation in turn; the
 * caller then repeats it. Either the repeat succeeds and the trace holds the block exactly, or
 * the writer had queued part of it and every later call fails with the first error: never an
 * "overlap" refusal of the caller's own retry, never a trace with a hole in the tensor. */
static void retry_after_nomem(int threads)
{
    enum { H = 4, T = 16, D = 8 };
    float x[H * T * D], back[H * T * D];
    for (int i = 0; i < H * T * D; i++)
        x[i] = (float)i * 0.25f - 3.0f;
    kvt_record_info k = {.kind = KVT_KIND_K,
                         .layer = 0,
                         .head_end = H,
                         .tok_end = T,
                         .dim = D,
                         .dtype = KVT_DTYPE_F32};
    kvt_record_info v = k;
    v.kind = KVT_KIND_V;
    int n_retried = 0, n_stopped = 0;
    for (uint64_t n = 1; n < 1000; n++) {
        unlink(path);
        /* 256-byte records: a head's 512 bytes are two records, the block eight */
        kvt_writer_opts o = {.n_threads = threads, .force = true, .max_record_bytes = 256};
        kvt_trace_writer *w;
        KVT_CHECK(kvt_trace_writer_create(path, tt_header_json, &o, &w));
        kvt_alloc_fail_at(n);
        kvt_status s = kvt_trace_writer_append(w, &k, x);
        bool fired = kvt_alloc_fail_fired();
        kvt_alloc_fail_at(0);
        if (!fired) {
            KVT_EXPECT_STATUS(s, KVT_OK);
            kvt_trace_writer_free(w);
            break;
        }
        if (s == KVT_OK) { /* a compression thread's allocation failed: finish says so */
            KVT_EXPECT_STATUS(kvt_trace_writer_finish(w), KVT_ERR_NOMEM);
            kvt_trace_writer_free(w);
            continue;
        }
        KVT_EXPECT_MSG(s == KVT_ERR_NOMEM, "alloc %llu: got %s (%s)", (unsigned long long)n,
                       kvt_status_str(s), kvt_error_msg());
        s = kvt_trace_writer_append(w, &k, x);
        if (s == KVT_OK) {
            n_retried++;
            KVT_CHECK(kvt_trace_writer_append(w, &v, x));
            KVT_CHECK(kvt_trace_writer_finish(w));
            kvt_trace_writer_free(w);
            kvt_trace_reader *r;
            KVT_CHECK(kvt_trace_reader_open(path, &r));
            KVT_CHECK(
                kvt_trace_reader_read(r, 0, KVT_KIND_K, 0, H, KVT_DTYPE_F32, back, sizeof(back)));
            KVT_EXPECT(memcmp(back, x, sizeof(x)) == 0);
            kvt_trace_reader_close(r);
            continue;
        }
        n_stopped++;
        KVT_EXPECT_MSG(s == KVT_ERR_NOMEM, "alloc %llu: the repeated append got %s (%s)",
                       (unsigned long long)n, kvt_status_str(s), kvt_error_msg());
        KVT_EXPECT_STATUS(kvt_trace_writer_append(w, &v, x), KVT_ERR_NOMEM);
        KVT_EXPECT_STATUS(kvt_trace_writer_finish(w), KVT_ERR_NOMEM);
        kvt_trace_writer_free(w);
    }
    /* both outcomes were reached: a failure at the first record's job, and one further on */
    KVT_EXPECT(n_retried >= 2);
    KVT_EXPECT(n_stopped >= 1);
    printf("retry after NOMEM (%d threads): %d repeated, %d stopped\n", threads, n_retried,
           n_stopped);
}

int main(void)
{
    signal(SIGXFSZ, SIG_IGN);
    kvt_test_tmp(path, sizeof(path), "faults.kvt");
    alloc_faults(0);
    alloc_faults(2);
    disk_full(0);
    disk_full(2);
    retry_after_nomem(0);
    retry_after_nomem(2);
    unlink(path);
    return kvt_test_result("test_trace_faults");
}
