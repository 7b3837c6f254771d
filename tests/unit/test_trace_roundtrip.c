/* test_trace_roundtrip.c - write -> read is bit-exact for every dtype, filter, odd shapes,
 * thread counts and record splits; identical input gives identical bytes; reading one
 * record touches only that record's bytes; f32 conversion on read; API misuse errors.
 */
#include <pthread.h>

#include "trace_test_util.h"

static char p1[256], p2[256];

/* kvt_trace_writer_lend_planes's release: counts the calls and frees the lent buffer */
static pthread_mutex_t lend_mu = PTHREAD_MUTEX_INITIALIZER;
static uint64_t lend_released;
static void lend_release(void *ctx)
{
    pthread_mutex_lock(&lend_mu);
    lend_released++;
    pthread_mutex_unlock(&lend_mu);
    free(ctx);
}

/* A producer that cuts the block into the writer's records itself and byte-plane splits each
 * (the GPU capture does) writes the same file, byte for byte, as kvt_trace_writer_append;
 * lend: each record's payload is lent (kvt_trace_writer_lend_planes, as the GPU capture's
 * pinned ring does), and handed back exactly once, also when refused. */
static void planes_same_file(const kvt_writer_opts *o, const kvt_record_info *info,
                             const uint8_t *in, bool lend)
{
    lend_released = 0;
    kvt_trace_writer *w;
    KVT_CHECK(kvt_trace_writer_create(kvt_test_tmp(p2, sizeof(p2), "planes.kvt"),
                                      "{\"format\":\"kvtrace\"}", o, &w));
    size_t n = 0, es = kvt_dtype_size(info->dtype);
    KVT_CHECK(kvt_trace_writer_parts(w, info, NULL, 0, &n));
    KVT_EXPECT(n >= 1);
    kvt_record_info *parts = calloc(n, sizeof(*parts));
    size_t n2 = 0;
    KVT_CHECK(kvt_trace_writer_parts(w, info, parts, n, &n2));
    KVT_EXPECT_EQ_U64(n2, n);
    uint64_t off = 0, total = (uint64_t)(info->head_end - info->head_begin) *
                              (info->tok_end - info->tok_begin) * info->dim * es;
    uint8_t *buf = malloc(total ? total : 1);
    bool shuf = kvt_trace_writer_shuffles(w) && es > 1;
    for (size_t i = 0; i < n; i++) {
        uint64_t nh = parts[i].head_end - parts[i].head_begin;
        uint64_t nt = parts[i].tok_end - parts[i].tok_begin;
        uint64_t bytes = nh * nt * info->dim * es;
        KVT_EXPECT(bytes <= kvt_trace_writer_max_record_bytes(w));
        /* parts tile the block in order: each one's rows follow the previous one's */
        uint64_t at = (uint64_t)(parts[i].head_begin - info->head_begin) *
                          (info->tok_end - info->tok_begin) * info->dim * es +
                      (uint64_t)(parts[i].tok_begin - info->tok_begin) * info->dim * es;
        KVT_EXPECT_EQ_U64(at, off);
        uint8_t *dst = lend ? malloc(bytes ? bytes : 1) : buf;
        if (shuf)
            kvt_byteplane_split(in + off, dst, bytes / es, es);
        else
            memcpy(dst, in + off, bytes);
        if (lend)
            KVT_CHECK(kvt_trace_writer_lend_planes(w, &parts[i], dst, lend_release, dst));
        else
            KVT_CHECK(kvt_trace_writer_append_planes(w, &parts[i], buf));
        off += bytes;
    }
    KVT_EXPECT_EQ_U64(off, total);
    if (n > 1) { /* a whole block larger than a record is refused */
        KVT_EXPECT_STATUS(kvt_trace_writer_append_planes(w, info, in), KVT_ERR_INVALID_ARG);
        if (lend) { /* and handed back */
            uint8_t *x = malloc(1);
            KVT_EXPECT_STATUS(kvt_trace_writer_lend_planes(w, info, x, lend_release, x),
                              KVT_ERR_INVALID_ARG);
        }
    }
    if (lend)
        KVT_EXPECT_STATUS(kvt_trace_writer_lend_planes(w, &parts[0], buf, NULL, NULL),
                          KVT_ERR_INVALID_ARG);
    KVT_CHECK(kvt_trace_writer_finish(w));
    if (lend) { /* every record handed back by now; one lent after finish comes back at once */
        KVT_EXPECT_EQ_U64(lend_released, n + (n > 1));
        uint8_t *x = malloc(1);
        KVT_EXPECT_STATUS(kvt_trace_writer_lend_planes(w, &parts[0], x, lend_release, x),
                          KVT_ERR_STATE);
        KVT_EXPECT_EQ_U64(lend_released, n + (n > 1) + 1);
    }
    kvt_trace_writer_free(w);
    size_t na = 0, nb = 0;
    uint8_t *a = tt_slurp(p1, &na), *b = tt_slurp(p2, &nb);
    KVT_EXPECT_MSG(a && b && na == nb && memcmp(a, b, na) == 0,
                   "append_planes file differs (%s, %zu parts)", kvt_dtype_name(info->dtype), n);
    free(a);
    free(b);
    free(buf);
    free(parts);
    unlink(p2);
}

/* a sink that stores the records back to back, stopping before the stop-th */
typedef struct b2b_sink {
    uint8_t *dst;
    size_t off, n, stop;
    kvt_trace_piece *pc;
} b2b_sink;

static kvt_status b2b_room(void *user, size_t bytes, void **buf)
{
    b2b_sink *b = user;
    *buf = b->n == b->stop ? NULL : b->dst + b->off;
    b->off += *buf ? bytes : 0;
    return KVT_OK;
}

static kvt_status b2b_put(void *user, const kvt_trace_piece *p, void *buf)
{
    b2b_sink *b = user;
    KVT_EXPECT(p->offset + (uint8_t *)b->dst == (uint8_t *)buf); /* offset: back to back */
    b->pc[b->n++] = *p;
    return KVT_OK;
}

/* kvt_trace_reader_read_sink: the records as stored and their pieces, which put together
 * (planes merged here) give the tensor `want` [H, T, D] byte for byte, whether read in one call
 * or stopped halfway and resumed from where it stopped */
static void read_sink_check(kvt_trace_reader *r, const uint8_t *want, kvt_dtype dt, uint32_t H,
                            uint32_t T, uint32_t D)
{
    const size_t es = kvt_dtype_size(dt), bytes = (size_t)H * T * D * es;
    const size_t n_pc = kvt_trace_reader_n_pieces(r, 0, KVT_KIND_K);
    uint8_t *st = malloc(bytes), *got = malloc(bytes);
    kvt_trace_piece *pc = calloc(n_pc, sizeof(*pc));
    for (int resume = 0; resume < 2; resume++) {
        b2b_sink b = {st, 0, 0, resume ? n_pc / 2 : (size_t)-1, pc};
        kvt_trace_sink sink = {b2b_room, b2b_put, &b};
        size_t next = 99;
        memset(got, 0xAB, bytes);
        KVT_CHECK(kvt_trace_reader_read_sink(r, 0, KVT_KIND_K, 0, &sink, &next));
        KVT_EXPECT_EQ_U64(next, resume ? n_pc / 2 : n_pc);
        if (resume) {
            b.stop = (size_t)-1;
            KVT_CHECK(kvt_trace_reader_read_sink(r, 0, KVT_KIND_K, next, &sink, &next));
            KVT_EXPECT_EQ_U64(next, n_pc);
        }
        KVT_EXPECT_EQ_U64(b.n, n_pc);
        for (size_t i = 0; i < b.n; i++) {
            const kvt_trace_piece *p = &pc[i];
            const size_t nt = p->tok_end - p->tok_begin, m = (p->head_end - p->head_begin) * nt * D;
            for (size_t j = 0; j < m; j++) {
                const size_t h = p->head_begin + j / (nt * D), rest = j % (nt * D);
                uint8_t *e = got + ((h * T + p->tok_begin) * D + rest) * es;
                for (size_t q = 0; q < es; q++)
                    e[q] = st[p->offset + (p->planes ? q * m + j : j * es + q)];
            }
        }
        KVT_EXPECT_MSG(b.off == bytes && !memcmp(got, want, bytes),
                       "read_sink (resumed %d): %zu pieces do not put back the %s tensor "
                       "[%u,%u,%u]",
                       resume, b.n, kvt_dtype_name(dt), H, T, D);
    }
    b2b_sink b = {st, 0, 0, (size_t)-1, pc};
    kvt_trace_sink sink = {b2b_room, b2b_put, &b};
    KVT_EXPECT_STATUS(kvt_trace_reader_read_sink(r, 0, KVT_KIND_V, 0, &sink, NULL),
                      KVT_ERR_NOT_FOUND);
    sink.put = NULL;
    KVT_EXPECT_STATUS(kvt_trace_reader_read_sink(r, 0, KVT_KIND_K, 0, &sink, NULL),
                      KVT_ERR_INVALID_ARG);
    free(st);
    free(got);
    free(pc);
}

static void roundtrip_dtype(kvt_dtype dt, uint32_t H, uint32_t T, uint32_t D, int threads,
                            bool no_shuffle, uint64_t max_rec)
{
    size_t n = (size_t)H * T * D, es = kvt_dtype_size(dt);
    uint8_t *in = malloc(n * es), *out = malloc(n * es);
    kvt_rng rng;
    kvt_rng_seed(&rng, (uint64_t)dt * 31 + H * 7 + T + D);
    for (size_t i = 0; i < n * es; i++)
        in[i] = (uint8_t)kvt_rng_u64(&rng);
    if (dt == KVT_DTYPE_F32 || dt == KVT_DTYPE_BF16 || dt == KVT_DTYPE_F16) {
        /* realistic float values (random bytes would include NaNs, which are fine too,
         * but real data is what compresses) in half of the elements */
        for (size_t i = 0; i < n; i += 2) {
            float f = (float)kvt_rng_normal(&rng);
            if (dt == KVT_DTYPE_F32)
                memcpy(in + i * 4, &f, 4);
            else {
                uint16_t h = dt == KVT_DTYPE_BF16 ? kvt_f32_to_bf16(f) : kvt_f32_to_f16(f);
                memcpy(in + i * 2, &h, 2);
            }
        }
    }
    kvt_writer_opts o = {
        .n_threads = threads, .no_shuffle = no_shuffle, .max_record_bytes = max_rec, .force = true};
    kvt_trace_writer *w;
    KVT_CHECK(kvt_trace_writer_create(kvt_test_tmp(p1, sizeof(p1), "rt.kvt"),
                                      "{\"format\":\"kvtrace\"}", &o, &w));
    kvt_record_info info = {
        .kind = KVT_KIND_K, .layer = 0, .head_end = H, .tok_end = T, .dim = D, .dtype = dt};
    KVT_CHECK(kvt_trace_writer_append(w, &info, in));
    KVT_CHECK(kvt_trace_writer_finish(w));
    kvt_trace_writer_free(w);
    planes_same_file(&o, &info, in, false);
    planes_same_file(&o, &info, in, true);

    kvt_trace_reader *r;
    KVT_CHECK(kvt_trace_reader_open(p1, &r));
    KVT_EXPECT(!kvt_trace_reader_recovered(r));
    uint32_t h2, t2, d2;
    kvt_dtype dt2;
    KVT_CHECK(kvt_trace_reader_shape(r, 0, KVT_KIND_K, &h2, &t2, &d2, &dt2));
    KVT_EXPECT(h2 == H && t2 == T && d2 == D && dt2 == dt);
    memset(out, 0xAB, n * es);
    KVT_CHECK(kvt_trace_reader_read(r, 0, KVT_KIND_K, 0, H, KVT_DTYPE_INVALID, out, n * es));
    KVT_EXPECT_MSG(memcmp(in, out, n * es) == 0, "dtype %s H%u T%u D%u threads %d shuffle %d",
                   kvt_dtype_name(dt), H, T, D, threads, !no_shuffle);
    /* a head sub-range */
    if (H > 2) {
        size_t per = (size_t)T * D * es;
        memset(out, 0, n * es);
        KVT_CHECK(
            kvt_trace_reader_read(r, 0, KVT_KIND_K, 1, H - 1, KVT_DTYPE_INVALID, out, n * es));
        KVT_EXPECT(memcmp(in + per, out, per * (H - 2)) == 0);
    }
    /* conversion to f32 */
    if (kvt_dtype_is_float(dt)) {
        float *f = malloc(n * 4), *ref = malloc(n * 4);
        KVT_CHECK(kvt_trace_reader_read(r, 0, KVT_KIND_K, 0, H, KVT_DTYPE_F32, f, n * 4));
        kvt_convert_to_f32(dt, in, ref, n);
        KVT_EXPECT(memcmp(f, ref, n * 4) == 0);
        if (H > 2) { /* a head sub-range: unshuffled and converted from inside the records */
            size_t per = (size_t)T * D;
            memset(f, 0, n * 4);
            KVT_CHECK(kvt_trace_reader_read(r, 0, KVT_KIND_K, 1, H - 1, KVT_DTYPE_F32, f, n * 4));
            KVT_EXPECT(memcmp(ref + per, f, per * (H - 2) * 4) == 0);
        }
        free(f);
        free(ref);
    } else {
        float f[4];
        KVT_EXPECT_STATUS(kvt_trace_reader_read(r, 0, KVT_KIND_K, 0, H, KVT_DTYPE_F32, f, 0),
                          KVT_ERR_INVALID_ARG);
    }
    read_sink_check(r, in, dt, H, T, D);
    KVT_EXPECT_STATUS(
        kvt_trace_reader_read(r, 0, KVT_KIND_K, 0, H, KVT_DTYPE_INVALID, out, n * es - 1),
        KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_trace_reader_read(r, 1, KVT_KIND_K, 0, H, KVT_DTYPE_INVALID, out, n * es),
                      KVT_ERR_NOT_FOUND);
    KVT_EXPECT_STATUS(
        kvt_trace_reader_read(r, 0, KVT_KIND_K, 0, H + 1, KVT_DTYPE_INVALID, out, n * es * 2),
        KVT_ERR_INVALID_ARG);
    kvt_trace_reader_close(r);
    unlink(p1);
    free(in);
    free(out);
}

/* a tensor whose records leave rows out (head 1 of 3 never written): both reads refuse it */
static void rows_missing(void)
{
    kvt_writer_opts o = {.force = true};
    kvt_trace_writer *w;
    KVT_CHECK(kvt_trace_writer_create(kvt_test_tmp(p1, sizeof(p1), "gap.kvt"),
                                      "{\"format\":\"kvtrace\"}", &o, &w));
    uint16_t x[4 * 2] = {0};
    for (uint32_t h = 0; h < 3; h += 2) {
        kvt_record_info info = {.kind = KVT_KIND_K,
                                .layer = 0,
                                .head_begin = h,
                                .head_end = h + 1,
                                .tok_end = 4,
                                .dim = 2,
                                .dtype = KVT_DTYPE_BF16};
        KVT_CHECK(kvt_trace_writer_append(w, &info, x));
    }
    KVT_CHECK(kvt_trace_writer_finish(w));
    kvt_trace_writer_free(w);
    kvt_trace_reader *r;
    KVT_CHECK(kvt_trace_reader_open(p1, &r));
    uint16_t out[3 * 4 * 2];
    kvt_trace_piece pc[2];
    KVT_EXPECT_STATUS(
        kvt_trace_reader_read(r, 0, KVT_KIND_K, 0, 3, KVT_DTYPE_INVALID, out, sizeof(out)),
        KVT_ERR_NOT_FOUND);
    b2b_sink b = {(uint8_t *)out, 0, 0, (size_t)-1, pc};
    kvt_trace_sink sink = {b2b_room, b2b_put, &b};
    KVT_EXPECT_STATUS(kvt_trace_reader_read_sink(r, 0, KVT_KIND_K, 0, &sink, NULL),
                      KVT_ERR_NOT_FOUND);
    KVT_EXPECT(b.n == 0); /* refused before any record was read */
    KVT_EXPECT(strstr(kvt_error_msg(), "records cover 8 of 12 token rows") != NULL);
    kvt_trace_reader_close(r);
    unlink(p1);
}

static void determinism_and_threads(void)
{
    size_t na, nb;
    for (int threads = 0; threads <= 4; threads++) {
        kvt_writer_opts o = {.n_threads = threads,
                             .force = true,
                             .max_record_bytes = 200,
                             .max_pending_bytes = 1000};
        KVT_CHECK(
            tt_write(kvt_test_tmp(threads ? p2 : p1, sizeof(p1), threads ? "b.kvt" : "a.kvt"), &o));
        if (threads == 0)
            continue;
        uint8_t *a = tt_slurp(p1, &na), *b = tt_slurp(p2, &nb);
        KVT_EXPECT_MSG(a && b && na == nb && memcmp(a, b, na) == 0,
                       "%d threads give a different file", threads);
        free(a);
        free(b);
    }
    /* contents of the split records reassemble */
    kvt_trace_reader *r;
    KVT_CHECK(kvt_trace_reader_open(p2, &r));
    KVT_EXPECT(kvt_trace_reader_n_records(r) > 3 * TT_LAYERS); /* records were split */
    float got[TT_HQ * TT_T * TT_D];
    size_t nkv = (size_t)TT_HKV * TT_T * TT_D;
    for (int l = 0; l < TT_LAYERS; l++) {
        KVT_CHECK(
            kvt_trace_reader_read(r, l, KVT_KIND_V, 0, TT_HKV, KVT_DTYPE_F32, got, sizeof(got)));
        int bad = 0;
        for (size_t i = 0; i < nkv; i++)
            if (got[i] != kvt_bf16_to_f32(kvt_f32_to_bf16(tt_value(l, KVT_KIND_V, i))))
                bad++;
        KVT_EXPECT_EQ_U64(bad, 0);
        KVT_CHECK(kvt_trace_reader_read(r, l, KVT_KIND_Q_WINDOW, 0, TT_HQ, KVT_DTYPE_INVALID, got,
                                        sizeof(got)));
        bad = 0;
        for (size_t i = 0; i < (size_t)TT_HQ * TT_W * TT_D; i++)
            if (got[i] != tt_value(l, KVT_KIND_Q_WINDOW, i))
                bad++;
        KVT_EXPECT_EQ_U64(bad, 0);
    }
    kvt_trace_reader_close(r);
    unlink(p1);
    unlink(p2);
}

static void random_access_bytes(void)
{
    kvt_writer_opts o = {.force = true};
    KVT_CHECK(tt_write(kvt_test_tmp(p1, sizeof(p1), "ra.kvt"), &o));
    kvt_trace_reader *r;
    KVT_CHECK(kvt_trace_reader_open(p1, &r));
    uint64_t b0 = kvt_trace_reader_bytes_read(r);
    /* open reads the header, the trailer and the index: nothing else */
    size_t n = kvt_trace_reader_n_records(r);
    uint64_t expect = 24 + strlen(tt_header_json) + 4 + 32 + 8 + 16 + 96 * n + 4;
    KVT_EXPECT_EQ_U64(b0, expect);
    for (size_t i = 0; i < n; i++) {
        kvt_record_info in;
        KVT_CHECK(kvt_trace_reader_record(r, i, &in));
        if (in.kind != KVT_KIND_V || in.layer != 1)
            continue;
        float buf[TT_HKV * TT_T * TT_D];
        KVT_CHECK(
            kvt_trace_reader_read(r, 1, KVT_KIND_V, 0, TT_HKV, KVT_DTYPE_F32, buf, sizeof(buf)));
        KVT_EXPECT_EQ_U64(kvt_trace_reader_bytes_read(r) - b0, 96 + in.comp_bytes);
    }
    kvt_trace_reader_close(r);
    unlink(p1);
}

/* Several engine threads append different layers at once into one writer. */
typedef struct app_arg {
    kvt_trace_writer *w;
    int layer;
    kvt_status s;
} app_arg;

static void *append_layer(void *p)
{
    app_arg *a = p;
    float buf[TT_HKV * TT_T * TT_D];
    for (int kind = KVT_KIND_K; kind <= KVT_KIND_V && a->s == KVT_OK; kind++) {
        for (size_t i = 0; i < sizeof(buf) / sizeof(buf[0]); i++)
            buf[i] = tt_value(a->layer, kind, i);
        kvt_record_info in = {.kind = kind,
                              .layer = a->layer,
                              .head_end = TT_HKV,
                              .tok_end = TT_T,
                              .dim = TT_D,
                              .dtype = KVT_DTYPE_F32};
        a->s = kvt_trace_writer_append(a->w, &in, buf);
    }
    return NULL;
}

static void concurrent_appenders(void)
{
    enum { N = 8 };
    kvt_writer_opts o = {.n_threads = 2, .force = true, .max_pending_bytes = 4096};
    kvt_trace_writer *w;
    KVT_CHECK(kvt_trace_writer_create(kvt_test_tmp(p1, sizeof(p1), "conc.kvt"), "{}", &o, &w));
    pthread_t th[N];
    app_arg args[N];
    for (int i = 0; i < N; i++) {
        args[i] = (app_arg){w, i, KVT_OK};
        pthread_create(&th[i], NULL, append_layer, &args[i]);
    }
    for (int i = 0; i < N; i++) {
        pthread_join(th[i], NULL);
        KVT_EXPECT_STATUS(args[i].s, KVT_OK);
    }
    KVT_CHECK(kvt_trace_writer_finish(w));
    kvt_writer_stats st;
    kvt_trace_writer_get_stats(w, &st);
    KVT_EXPECT(st.peak_pending_bytes <= 4096 + sizeof(float) * TT_HKV * TT_T * TT_D);
    kvt_trace_writer_free(w);
    kvt_trace_reader *r;
    KVT_CHECK(kvt_trace_reader_open(p1, &r));
    float got[TT_HKV * TT_T * TT_D];
    int bad = 0;
    for (int l = 0; l < N; l++)
        for (int kind = KVT_KIND_K; kind <= KVT_KIND_V; kind++) {
            KVT_CHECK(
                kvt_trace_reader_read(r, l, kind, 0, TT_HKV, KVT_DTYPE_F32, got, sizeof(got)));
            for (size_t i = 0; i < sizeof(got) / sizeof(got[0]); i++)
                bad += got[i] != tt_value(l, kind, i);
        }
    KVT_EXPECT_EQ_U64(bad, 0);
    kvt_trace_reader_close(r);
    unlink(p1);
}

static void misuse(void)
{
    kvt_trace_writer *w;
    kvt_writer_opts o = {.force = true};
    kvt_test_tmp(p1, sizeof(p1), "misuse.kvt");
    KVT_EXPECT_STATUS(kvt_trace_writer_create(p1, "[1,2]", &o, &w), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_trace_writer_create(p1, "{bad json", &o, &w), KVT_ERR_INVALID_ARG);
    KVT_CHECK(kvt_trace_writer_create(p1, "{}", &o, &w));
    uint8_t d[16] = {0};
    kvt_record_info in = {.kind = KVT_KIND_K,
                          .layer = 0,
                          .head_end = 1,
                          .tok_end = 0,
                          .dim = 4,
                          .dtype = KVT_DTYPE_F32};
    KVT_EXPECT_STATUS(kvt_trace_writer_append(w, &in, d), KVT_ERR_INVALID_ARG); /* empty */
    in.tok_end = 1;
    in.kind = 999;
    KVT_EXPECT_STATUS(kvt_trace_writer_append(w, &in, d), KVT_ERR_INVALID_ARG); /* bad kind */
    in.kind = KVT_KIND_K;
    in.dtype = (kvt_dtype)77;
    KVT_EXPECT_STATUS(kvt_trace_writer_append(w, &in, d), KVT_ERR_INVALID_ARG); /* bad dtype */
    in.dtype = KVT_DTYPE_F32;
    KVT_CHECK(kvt_trace_writer_append(w, &in, d));
    KVT_CHECK(kvt_trace_writer_finish(w));
    KVT_EXPECT_STATUS(kvt_trace_writer_append(w, &in, d), KVT_ERR_STATE);
    KVT_EXPECT_STATUS(kvt_trace_writer_finish(w), KVT_ERR_STATE);
    kvt_trace_writer_free(w);
    /* an existing file is not overwritten without force */
    o.force = false;
    KVT_EXPECT_STATUS(kvt_trace_writer_create(p1, "{}", &o, &w), KVT_ERR_IO);
    KVT_EXPECT(strstr(kvt_error_msg(), "already exists") != NULL);
    kvt_trace_reader *r;
    KVT_CHECK(kvt_trace_reader_open(p1, &r)); /* and is still intact */
    KVT_EXPECT_EQ_U64(kvt_trace_reader_n_records(r), 1);
    kvt_trace_reader_close(r);
    unlink(p1);
    /* a finished trace without records (a capture that stopped before its first layer) opens
     * through its index, not by recovery, and verifies clean; a new trace is written in
     * place, one replacing a trace (force) next to it and renamed at the finish */
    o.force = true;
    for (int replace = 0; replace < 2; replace++) {
        KVT_CHECK(kvt_trace_writer_create(p1, "{}", &o, &w));
        const char *file = kvt_trace_writer_file(w);
        if (replace)
            KVT_EXPECT(file && strcmp(file, p1) != 0 && !strncmp(file, p1, strlen(p1)) &&
                       access(file, F_OK) == 0);
        else
            KVT_EXPECT(file && !strcmp(file, p1));
        KVT_CHECK(kvt_trace_writer_finish(w));
        KVT_EXPECT(!strcmp(kvt_trace_writer_file(w), p1)); /* after the rename: the trace */
        kvt_trace_writer_free(w);
        KVT_CHECK(kvt_trace_reader_open(p1, &r));
        KVT_EXPECT(!kvt_trace_reader_recovered(r) && kvt_trace_reader_n_records(r) == 0);
        kvt_trace_reader_close(r);
        kvt_verify_report rep;
        KVT_CHECK(kvt_trace_verify(p1, &rep));
        KVT_EXPECT(rep.header_ok && rep.index_ok && rep.trailer_ok && rep.n_problems == 0);
        kvt_verify_report_free(&rep);
    }
    unlink(p1);
    KVT_EXPECT_STATUS(kvt_trace_reader_open("/nonexistent/x.kvt", &r), KVT_ERR_IO);
    KVT_EXPECT_STATUS(kvt_trace_writer_create("/nonexistent/x.kvt", "{}", &o, &w), KVT_ERR_IO);
}

int main(void)
{
    static const kvt_dtype dts[] = {KVT_DTYPE_F16, KVT_DTYPE_BF16, KVT_DTYPE_F32, KVT_DTYPE_I32,
                                    KVT_DTYPE_U8};
    for (size_t i = 0; i < 5; i++) {
        for (int shuf = 0; shuf < 2; shuf++) {
            roundtrip_dtype(dts[i], 4, 33, 16, 0, shuf, 0);
            roundtrip_dtype(dts[i], 1, 1, 1, 2, shuf, 0); /* T=1, D=1 */
            roundtrip_dtype(dts[i], 3, 1, 7, 0, shuf, 0);
            roundtrip_dtype(dts[i], 5, 17, 3, 3, shuf, 64); /* split along tokens */
            roundtrip_dtype(dts[i], 7, 9, 8, 1, shuf, 300); /* split along heads */
        }
    }
    rows_missing();
    determinism_and_threads();
    random_access_bytes();
    concurrent_appenders();
    misuse();
    return kvt_test_result("test_trace_roundtrip");
}
