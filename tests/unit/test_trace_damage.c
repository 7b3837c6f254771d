/* test_trace_damage.c - a trace cut at every record boundary and inside every record keeps
 * every complete record; flipped bytes in a record header or payload are named by verify
 * while intact records still read; bad magic, future versions, oversized lengths, malformed
 * JSON, a trailer promising too many records and random garbage give clear errors.
 */
#include <zlib.h>

#include "trace_test_util.h"

static char path[256], cut[256];
static uint8_t *orig;
static size_t orig_n;

typedef struct {
    uint64_t off, comp;
    int kind, layer;
} rec_pos;
static rec_pos recs[64];
static size_t n_recs;
static uint64_t index_off;

static void put32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

/* Every record still in the reader decodes, and reads back the expected layer/kind. */
static size_t count_readable(kvt_trace_reader *r)
{
    size_t ok = 0;
    for (size_t i = 0; i < kvt_trace_reader_n_records(r); i++) {
        kvt_record_info in;
        kvt_trace_reader_record(r, i, &in);
        uint8_t *buf = malloc(in.raw_bytes);
        if (kvt_trace_reader_read_record(r, i, buf, in.raw_bytes) == KVT_OK)
            ok++;
        free(buf);
    }
    return ok;
}

static void truncations(void)
{
    for (size_t i = 0; i <= n_recs; i++) {
        uint64_t boundary = i < n_recs ? recs[i].off : index_off;
        uint64_t cuts[3] = {boundary, boundary + 50, 0};
        int n_cuts = 2;
        if (i < n_recs)
            cuts[n_cuts++] = recs[i].off + 96 + recs[i].comp / 2;
        for (int c = 0; c < n_cuts; c++) {
            if (cuts[c] > orig_n)
                continue;
            tt_spit(cut, orig, (size_t)cuts[c]);
            kvt_trace_reader *r;
            kvt_status s = kvt_trace_reader_open(cut, &r);
            KVT_EXPECT_MSG(s == KVT_OK, "cut at %llu: %s", (unsigned long long)cuts[c],
                           kvt_error_msg());
            if (s != KVT_OK)
                continue;
            size_t want = i; /* records 0..i-1 are complete */
            KVT_EXPECT(kvt_trace_reader_recovered(r));
            KVT_EXPECT_MSG(kvt_trace_reader_n_records(r) == want,
                           "cut at %llu: %zu records, want %zu", (unsigned long long)cuts[c],
                           kvt_trace_reader_n_records(r), want);
            KVT_EXPECT_EQ_U64(count_readable(r), want);
            kvt_trace_reader_close(r);

            kvt_verify_report rep;
            KVT_CHECK(kvt_trace_verify(cut, &rep));
            KVT_EXPECT(!rep.trailer_ok);
            KVT_EXPECT_EQ_U64(rep.n_records_ok, want);
            KVT_EXPECT_EQ_U64(rep.n_records_bad, 0);
            /* an index cut short holds no record: nothing lost (FORMAT.md, Reading 3) */
            KVT_EXPECT_EQ_U64(rep.tail_bytes_lost, i < n_recs ? cuts[c] - boundary : 0);
            KVT_EXPECT(rep.n_problems >= 1);
            /* the layers whose tensors were lost are named */
            if (want < n_recs) {
                bool named = false;
                for (size_t p = 0; p < rep.n_problems; p++)
                    if (strstr(rep.problems[p].what, "missing"))
                        named = true;
                KVT_EXPECT_MSG(named || recs[want].kind == KVT_KIND_TOKEN_IDS,
                               "cut before record %zu: verify does not say what is missing", want);
            }
            kvt_verify_report_free(&rep);
        }
    }
    /* cuts inside the index and inside the trailer keep every record */
    uint64_t tails[2] = {index_off + 30, orig_n - 5};
    for (int c = 0; c < 2; c++) {
        tt_spit(cut, orig, (size_t)tails[c]);
        kvt_trace_reader *r;
        KVT_CHECK(kvt_trace_reader_open(cut, &r));
        KVT_EXPECT(kvt_trace_reader_recovered(r));
        KVT_EXPECT_EQ_U64(count_readable(r), n_recs);
        kvt_trace_reader_close(r);
    }
}

static void flips(void)
{
    for (int where = 0; where < 2; where++) {
        size_t k = n_recs / 2;
        uint8_t *b = malloc(orig_n);
        memcpy(b, orig, orig_n);
        uint64_t off = where == 0 ? recs[k].off + 8 + 20 : recs[k].off + 96 + recs[k].comp / 2;
        b[off] ^= 0x10;
        tt_spit(cut, b, orig_n);
        kvt_trace_reader *r;
        KVT_CHECK(kvt_trace_reader_open(cut, &r));
        KVT_EXPECT(!kvt_trace_reader_recovered(r)); /* the index is intact */
        KVT_EXPECT_EQ_U64(count_readable(r), n_recs - 1);
        float buf[TT_HQ * TT_T * TT_D];
        kvt_status s = kvt_trace_reader_read(r, recs[k].layer, recs[k].kind, 0,
                                             recs[k].kind == KVT_KIND_Q_WINDOW ? TT_HQ : TT_HKV,
                                             KVT_DTYPE_F32, buf, sizeof(buf));
        KVT_EXPECT_STATUS(s, KVT_ERR_CHECKSUM);
        kvt_trace_reader_close(r);
        kvt_verify_report rep;
        KVT_CHECK(kvt_trace_verify(cut, &rep));
        KVT_EXPECT_EQ_U64(rep.n_records_bad, 1);
        KVT_EXPECT_EQ_U64(rep.n_records_ok, n_recs - 1);
        bool named = false;
        char want[64];
        snprintf(want, sizeof(want), "record %zu (layer %d", k, recs[k].layer);
        for (size_t p = 0; p < rep.n_problems; p++)
            if (strstr(rep.problems[p].what, want))
                named = true;
        KVT_EXPECT_MSG(named, "verify does not name %s", want);
        kvt_verify_report_free(&rep);

        /* the same damage in an unfinished file: the scan skips it and keeps the rest */
        tt_spit(cut, b, (size_t)index_off);
        KVT_CHECK(kvt_trace_reader_open(cut, &r));
        KVT_EXPECT(kvt_trace_reader_recovered(r));
        KVT_EXPECT_EQ_U64(count_readable(r), n_recs - 1);
        kvt_trace_reader_close(r);
        KVT_CHECK(kvt_trace_verify(cut, &rep));
        KVT_EXPECT_EQ_U64(rep.n_records_ok + rep.n_records_bad, where == 0 ? n_recs - 1 : n_recs);
        kvt_verify_report_free(&rep);
        free(b);
    }
}

/* the index or trailer damaged in place (bit rot) is not called an unfinished capture, nor a
 * trailer "missing or cut"; a trailer cut short is (verify said both of both) */
static bool said(const kvt_verify_report *rep, const char *what)
{
    for (size_t p = 0; p < rep->n_problems; p++)
        if (strstr(rep->problems[p].what, what))
            return true;
    return false;
}

static void index_damage(void)
{
    const struct {
        const char *want, *not_want;
    } cases[] = {
        {"there but damaged: no record lost", "not finished"},    /* the trailer's checksum */
        {"there but damaged: no record lost", "missing or cut"},  /* an index entry */
        {"missing or cut (27 bytes): no record lost", "damaged"}, /* the trailer cut short */
        {"there but damaged: no record lost", "not finished"},    /* its end magic */
    };
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        uint8_t *b = malloc(orig_n);
        memcpy(b, orig, orig_n);
        size_t n = orig_n;
        if (c == 0)
            b[orig_n - 8] ^= 0x5a; /* in the trailer's checksum */
        else if (c == 1)
            b[index_off + 8 + 16 + 3] ^= 0x5a; /* in the first index entry */
        else if (c == 2)
            n = orig_n - 5;
        else
            b[orig_n - 2] ^= 0x5a; /* in the trailer's end magic */
        tt_spit(cut, b, n);
        kvt_verify_report rep;
        KVT_CHECK(kvt_trace_verify(cut, &rep));
        KVT_EXPECT_EQ_U64(rep.n_records_ok, n_recs);
        KVT_EXPECT_EQ_U64(rep.tail_bytes_lost, 0);
        KVT_EXPECT_MSG(said(&rep, cases[c].want) && !said(&rep, cases[c].not_want),
                       "case %zu: verify does not say '%s' alone: %s | %s", c, cases[c].want,
                       rep.n_problems ? rep.problems[0].what : "",
                       rep.n_problems > 1 ? rep.problems[1].what : "");
        KVT_EXPECT(said(&rep, c == 2 ? "the trace was not finished"
                                     : "the index or trailer is "
                                       "damaged"));
        kvt_verify_report_free(&rep);
        free(b);
    }
}

/* traces/FORMAT.md: the records of one tensor never overlap and share dtype and dim. kvtrace's
 * writer refuses a block that breaks it (the writer goes on); verify names it in a file from
 * elsewhere (here: layer 0's V record relabelled K, its header checksum redone, the index cut
 * off so that the scan reads the headers) */
/* a sink that must not be called: the read is refused from the index */
static kvt_status sink_room_none(void *user, size_t bytes, void **buf)
{
    KVT_EXPECT_MSG(0, "read_sink asked for room for a record of a refused tensor");
    *buf = NULL;
    return KVT_OK;
}

static kvt_status sink_put_none(void *user, const kvt_trace_piece *p, void *buf)
{
    return KVT_ERR_STATE;
}

static void tensor_layout(void)
{
    char p2[256];
    kvt_test_tmp(p2, sizeof(p2), "layout.kvt");
    kvt_writer_opts o = {.force = true};
    kvt_trace_writer *w;
    KVT_CHECK(kvt_trace_writer_create(p2, tt_header_json, &o, &w));
    float x[2 * 8 * 4] = {0};
    kvt_record_info a = {.kind = KVT_KIND_K,
                         .layer = 0,
                         .head_begin = 0,
                         .head_end = 1,
                         .tok_begin = 4,
                         .tok_end = 8,
                         .dim = 4,
                         .dtype = KVT_DTYPE_F32};
    KVT_CHECK(kvt_trace_writer_append(w, &a, x));
    kvt_record_info b = a;
    b.tok_begin = 0, b.tok_end = 4; /* before the first: fine (tensors need no order) */
    KVT_CHECK(kvt_trace_writer_append(w, &b, x));
    b.head_begin = 1, b.head_end = 2, b.tok_begin = 2, b.tok_end = 8; /* another head: fine */
    KVT_CHECK(kvt_trace_writer_append(w, &b, x));
    kvt_record_info c = a;
    c.head_end = 2, c.tok_begin = 7, c.tok_end = 9; /* heads 0-1, tokens 7-8: overlaps both */
    KVT_EXPECT_STATUS(kvt_trace_writer_append(w, &c, x), KVT_ERR_INVALID_ARG);
    KVT_EXPECT(strstr(kvt_error_msg(), "layer 0 K: heads [0,2) x tokens [7,9) overlap an "
                                       "earlier record's heads [0,1) x tokens [4,8)"));
    c.head_begin = 1, c.tok_begin = 0, c.tok_end = 3; /* head 1 tokens 0-2: overlaps [2,8) */
    KVT_EXPECT_STATUS(kvt_trace_writer_append(w, &c, x), KVT_ERR_INVALID_ARG);
    c.tok_end = 2; /* head 1 tokens 0-1: the gap, fine */
    KVT_CHECK(kvt_trace_writer_append(w, &c, x));
    kvt_record_info d = a;
    d.tok_begin = 8, d.tok_end = 9, d.dtype = KVT_DTYPE_BF16;
    KVT_EXPECT_STATUS(kvt_trace_writer_append(w, &d, x), KVT_ERR_INVALID_ARG);
    KVT_EXPECT(strstr(kvt_error_msg(), "a bf16 record of dim 4, but its earlier records are f32"));
    d.dtype = KVT_DTYPE_F32, d.dim = 2;
    KVT_EXPECT_STATUS(kvt_trace_writer_append(w, &d, x), KVT_ERR_INVALID_ARG);
    d.dim = 4; /* token 8 of heads 0 and 1, in order: fine */
    KVT_CHECK(kvt_trace_writer_append(w, &d, x));
    d.head_begin = 1, d.head_end = 2;
    KVT_CHECK(kvt_trace_writer_append(w, &d, x));
    kvt_record_info m = {.kind = KVT_KIND_META_JSON,
                         .layer = -1,
                         .head_end = 1,
                         .tok_end = 2,
                         .dim = 1,
                         .dtype = KVT_DTYPE_U8};
    KVT_CHECK(kvt_trace_writer_append(w, &m, "{}")); /* meta_json records overlap by design */
    KVT_CHECK(kvt_trace_writer_append(w, &m, "{}"));
    KVT_CHECK(kvt_trace_writer_finish(w));
    kvt_trace_writer_free(w);
    kvt_trace_reader *r;
    KVT_CHECK(kvt_trace_reader_open(p2, &r));
    float k[2 * 9 * 4];
    KVT_CHECK(kvt_trace_reader_read(r, 0, KVT_KIND_K, 0, 2, KVT_DTYPE_F32, k, sizeof(k)));
    /* where head 1's [2,8) record and the two meta_json records are, and where the index is */
    uint64_t off_b2 = 0, off_meta[2] = {0, 0}, idx = 0;
    int n_meta = 0;
    for (size_t i = 0; i < kvt_trace_reader_n_records(r); i++) {
        kvt_record_info in;
        kvt_trace_reader_record(r, i, &in);
        if (in.kind == KVT_KIND_K && in.head_begin == 1 && in.tok_begin == 2)
            off_b2 = in.file_offset;
        if (in.kind == KVT_KIND_META_JSON && n_meta < 2)
            off_meta[n_meta++] = in.file_offset;
        if (in.file_offset + 96 + in.comp_bytes > idx)
            idx = in.file_offset + 96 + in.comp_bytes;
    }
    kvt_trace_reader_close(r);
    size_t n2 = 0;
    uint8_t *t2 = tt_slurp(p2, &n2);
    unlink(p2);
    KVT_EXPECT(t2 && off_b2 && n_meta == 2 && idx < n2);
    if (t2 && off_b2 && n_meta == 2 && idx < n2) {
        /* (1) head 1's [2,8) relabelled [0,6): it overlaps [0,2) and leaves [6,8) empty, the
         * same area, so counting area sees nothing; the scan reads the headers (no index) */
        uint8_t *h = t2 + off_b2;
        put32(h + 28, 0);
        put32(h + 32, 6);
        put32(h + 92, (uint32_t)crc32(0, h + 8, 84));
        tt_spit(cut, t2, (size_t)idx);
        kvt_verify_report rep;
        KVT_CHECK(kvt_trace_verify(cut, &rep));
        bool named = false;
        for (size_t q = 0; q < rep.n_problems; q++)
            named |= strstr(rep.problems[q].what, "layer 0 K: records ") &&
                     strstr(rep.problems[q].what, " overlap (heads [1,2) x tokens [");
        KVT_EXPECT_MSG(named, "verify misses an overlap that a gap of the same area hides");
        kvt_verify_report_free(&rep);
        KVT_CHECK(kvt_trace_reader_open(cut, &r)); /* and a read refuses it (gave garbage) */
        KVT_EXPECT_STATUS(
            kvt_trace_reader_read(r, 0, KVT_KIND_K, 0, 2, KVT_DTYPE_F32, k, sizeof(k)),
            KVT_ERR_CORRUPT);
        /* as does a read as stored (replay --device cuda) */
        kvt_trace_sink sink = {sink_room_none, sink_put_none, NULL};
        KVT_EXPECT_STATUS(kvt_trace_reader_read_sink(r, 0, KVT_KIND_K, 0, &sink, NULL),
                          KVT_ERR_CORRUPT);
        kvt_trace_reader_close(r);
        /* (2) the two meta_json records as a kind this version does not know (a newer minor
         * version's): skipped, as a reader skips them, not called overlapping */
        memcpy(t2 + off_b2 + 28, (uint8_t[8]){2, 0, 0, 0, 8, 0, 0, 0}, 8); /* back to [2,8) */
        put32(t2 + off_b2 + 92, (uint32_t)crc32(0, t2 + off_b2 + 8, 84));
        for (int q = 0; q < 2; q++) {
            uint8_t *mh = t2 + off_meta[q];
            mh[12] = 40;
            put32(mh + 92, (uint32_t)crc32(0, mh + 8, 84));
        }
        tt_spit(cut, t2, (size_t)idx);
        KVT_CHECK(kvt_trace_verify(cut, &rep));
        for (size_t q = 0; q < rep.n_problems; q++)
            KVT_EXPECT_MSG(!strstr(rep.problems[q].what, "overlap") &&
                               !strstr(rep.problems[q].what, "(null)"),
                           "unknown kind: %s", rep.problems[q].what);
        kvt_verify_report_free(&rep);
    }
    free(t2);

    for (int mixed = 0; mixed < 2; mixed++) {
        uint8_t *bb = malloc(orig_n);
        memcpy(bb, orig, orig_n);
        uint8_t *h = bb + recs[1].off; /* layer 0 V (bf16), after layer 0 K */
        KVT_EXPECT(recs[1].kind == KVT_KIND_V && recs[1].layer == 0);
        h[12] = KVT_KIND_K;
        if (mixed)
            h[14] = KVT_DTYPE_F16; /* the same size: the payload still decodes */
        put32(h + 92, (uint32_t)crc32(0, h + 8, 84));
        tt_spit(cut, bb, (size_t)index_off);
        kvt_verify_report rep;
        KVT_CHECK(kvt_trace_verify(cut, &rep));
        const char *want = mixed ? "layer 0 K: its records differ in dtype or dim"
                                 : "layer 0 K: records 0 and 1 overlap";
        bool named = false;
        for (size_t p = 0; p < rep.n_problems; p++)
            named |= strstr(rep.problems[p].what, want) != NULL;
        KVT_EXPECT_MSG(named, "verify does not say '%s'", want);
        kvt_verify_report_free(&rep);
        free(bb);
    }
    /* the token table [1, 37, 1] relabelled [37, 1, 1] and [1, 1, 37] (the same bytes): a
     * table another writer shaped otherwise. verify said OK; Trace.tokens read one id */
    for (int dim = 0; dim < 2; dim++) {
        uint8_t *bb = malloc(orig_n);
        memcpy(bb, orig, orig_n);
        uint8_t *h = bb + recs[n_recs - 1].off;
        KVT_EXPECT(recs[n_recs - 1].kind == KVT_KIND_TOKEN_IDS);
        put32(h + (dim ? 36 : 24), TT_T); /* Dim, or Head_End */
        put32(h + 32, 1);                 /* Tok_End */
        put32(h + 92, (uint32_t)crc32(0, h + 8, 84));
        tt_spit(cut, bb, (size_t)index_off);
        kvt_verify_report rep;
        KVT_CHECK(kvt_trace_verify(cut, &rep));
        char want[128];
        snprintf(want, sizeof(want), "token_ids: a table of %d rows and dim %d, not [1, n, 1]",
                 dim ? 1 : TT_T, dim ? TT_T : 1);
        KVT_EXPECT_MSG(said(&rep, want) && rep.n_records_bad == 0, "verify does not say '%s'",
                       want);
        kvt_verify_report_free(&rep);
        free(bb);
    }
    /* the same relabelled header (valid Header_Crc) with the index kept: the index copy says
     * layer 0 V, the header layer 0 K. verify said OK and a read took the index's word */
    {
        uint8_t *bb = malloc(orig_n);
        memcpy(bb, orig, orig_n);
        uint8_t *h = bb + recs[1].off;
        h[12] = KVT_KIND_K;
        put32(h + 92, (uint32_t)crc32(0, h + 8, 84));
        tt_spit(cut, bb, orig_n);
        kvt_verify_report rep;
        KVT_CHECK(kvt_trace_verify(cut, &rep));
        bool named = false;
        for (size_t p = 0; p < rep.n_problems; p++)
            named |= strstr(rep.problems[p].what, "(layer 0 V): its header on disk (record 1, "
                                                  "layer 0 K) disagrees with the index") != NULL;
        KVT_EXPECT_MSG(named && rep.n_records_bad == 1,
                       "verify misses a header that disagrees with the index");
        kvt_verify_report_free(&rep);
        KVT_CHECK(kvt_trace_reader_open(cut, &r));
        KVT_EXPECT(!kvt_trace_reader_recovered(r));
        kvt_record_info in;
        KVT_CHECK(kvt_trace_reader_record(r, 1, &in));
        KVT_EXPECT(in.kind == KVT_KIND_V && in.layer == 0); /* the index's word */
        void *v = malloc((size_t)in.raw_bytes + 1);
        KVT_EXPECT_STATUS(kvt_trace_reader_read_record(r, 1, v, (size_t)in.raw_bytes),
                          KVT_ERR_CORRUPT);
        free(v);
        kvt_trace_reader_close(r);
        free(bb);
    }
}

/* a damaged size field of a record's header frame: the index still finds every record, but
 * the file no longer decodes as a zstd stream and a recovery scan would lose the record, so
 * verify must say so (it reported OK before) */
static void frame_sizes(void)
{
    size_t k = n_recs / 2;
    uint8_t *b = malloc(orig_n);
    memcpy(b, orig, orig_n);
    b[recs[k].off + 4] ^= 0x80; /* 88 -> 216 */
    tt_spit(cut, b, orig_n);
    kvt_trace_reader *r;
    KVT_CHECK(kvt_trace_reader_open(cut, &r));
    KVT_EXPECT(!kvt_trace_reader_recovered(r));
    KVT_EXPECT_EQ_U64(count_readable(r), n_recs); /* the data is intact */
    kvt_trace_reader_close(r);
    kvt_verify_report rep;
    KVT_CHECK(kvt_trace_verify(cut, &rep));
    char want[96];
    snprintf(want, sizeof(want), "record %zu (layer %d %s): its frame size field is damaged", k,
             recs[k].layer, kvt_kind_name(recs[k].kind));
    bool named = false;
    for (size_t p = 0; p < rep.n_problems; p++)
        named |= strstr(rep.problems[p].what, want) != NULL;
    KVT_EXPECT_MSG(rep.n_problems == 1 && named, "verify: %zu problems, none says '%s'",
                   rep.n_problems, want);
    kvt_verify_report_free(&rep);
    free(b);
}

static void expect_open_fails(const uint8_t *b, size_t n, kvt_status want, const char *what)
{
    tt_spit(cut, b, n);
    kvt_trace_reader *r = NULL;
    kvt_status s = kvt_trace_reader_open(cut, &r);
    KVT_EXPECT_MSG(s == want, "%s: got %s (%s)", what, kvt_status_str(s), kvt_error_msg());
    KVT_EXPECT_MSG(strlen(kvt_error_msg()) > 10, "%s: no message", what);
    if (s == KVT_OK)
        kvt_trace_reader_close(r);
    kvt_verify_report rep;
    KVT_EXPECT(kvt_trace_verify(cut, &rep) == want);
}

static void hostile_headers(void)
{
    uint8_t *b = malloc(orig_n);
    size_t jl = strlen(tt_header_json);
    memcpy(b, orig, orig_n);
    b[8] ^= 0xff;
    expect_open_fails(b, orig_n, KVT_ERR_CORRUPT, "bad magic");
    memcpy(b, orig, orig_n);
    b[0] = 0x28;
    expect_open_fails(b, orig_n, KVT_ERR_CORRUPT, "bad frame magic");
    memcpy(b, orig, orig_n);
    b[12] = 2; /* major version 2 */
    expect_open_fails(b, orig_n, KVT_ERR_VERSION, "future major");
    KVT_EXPECT(strstr(kvt_error_msg(), "upgrade") != NULL);
    memcpy(b, orig, orig_n);
    put32(b + 20, 0xfffffff0u); /* JSON length */
    expect_open_fails(b, orig_n, KVT_ERR_CORRUPT, "oversized JSON length");
    memcpy(b, orig, orig_n);
    put32(b + 4, 0x7fffffffu); /* frame size */
    expect_open_fails(b, orig_n, KVT_ERR_CORRUPT, "oversized frame size");
    memcpy(b, orig, orig_n);
    b[24] = '['; /* JSON no longer an object; fix the crc so only the JSON is wrong */
    put32(b + 24 + jl, (uint32_t)crc32(0, b + 8, (uInt)(16 + jl)));
    expect_open_fails(b, orig_n, KVT_ERR_CORRUPT, "malformed JSON");
    memcpy(b, orig, orig_n);
    b[30] ^= 1; /* JSON byte changed, crc not fixed */
    expect_open_fails(b, orig_n, KVT_ERR_CHECKSUM, "header checksum");
    expect_open_fails(b, 0, KVT_ERR_CORRUPT, "empty file");
    expect_open_fails(orig, 20, KVT_ERR_CORRUPT, "20-byte file");

    /* a trailer that promises more records than exist: fall back to the scan, keep all */
    memcpy(b, orig, orig_n);
    uint8_t *t = b + orig_n - 32;
    put32(t + 16, (uint32_t)(n_recs + 5));
    put32(t + 24, (uint32_t)crc32(0, t + 8, 16));
    tt_spit(cut, b, orig_n);
    kvt_trace_reader *r;
    KVT_CHECK(kvt_trace_reader_open(cut, &r));
    KVT_EXPECT(kvt_trace_reader_recovered(r));
    KVT_EXPECT_EQ_U64(count_readable(r), n_recs);
    kvt_trace_reader_close(r);

    /* a record header claiming an enormous payload (valid crc): no crash, earlier records kept */
    memcpy(b, orig, orig_n);
    uint8_t *h = b + recs[2].off + 8;
    put32(h + 48, 0xfffffff0u);
    put32(h + 52, 0x0000ffffu);
    put32(h + 84, (uint32_t)crc32(0, h, 84));
    tt_spit(cut, b, (size_t)index_off);
    KVT_CHECK(kvt_trace_reader_open(cut, &r));
    KVT_EXPECT(kvt_trace_reader_n_records(r) >= 2);
    KVT_EXPECT(count_readable(r) == kvt_trace_reader_n_records(r));
    kvt_trace_reader_close(r);

    /* random garbage after a valid header, and pure garbage */
    kvt_rng rng;
    kvt_rng_seed(&rng, 99);
    for (int it = 0; it < 200; it++) {
        size_t n = (size_t)(kvt_rng_u64(&rng) % orig_n);
        memcpy(b, orig, orig_n);
        size_t start = it % 2 ? 0 : recs[0].off;
        for (size_t i = start; i < n; i++)
            if (kvt_rng_u64(&rng) % 4 == 0)
                b[i] = (uint8_t)kvt_rng_u64(&rng);
        tt_spit(cut, b, n);
        if (kvt_trace_reader_open(cut, &r) == KVT_OK) {
            count_readable(r);
            kvt_trace_reader_close(r);
        }
        kvt_verify_report rep;
        if (kvt_trace_verify(cut, &rep) == KVT_OK)
            kvt_verify_report_free(&rep);
    }
    free(b);
}

/* a header that does not describe the records, or promises layers that are not there: verify
 * names each (it passed head_dim 4 over dim-8 records and window 0, which replay refuses, and
 * named each of a million missing layers) */
static void promised_layers(void)
{
    const char *hdr[3] = {
        "{\"model\":{\"n_layers\":1000000,\"n_q_heads\":4,\"n_kv_heads\":2,\"head_dim\":8},"
        "\"n_tokens\":37,\"window\":5}",
        "{\"model\":{\"n_layers\":1,\"n_q_heads\":4,\"n_kv_heads\":2,\"head_dim\":4},"
        "\"n_tokens\":37,\"window\":0}",
        "{\"model\":{\"n_layers\":4,\"n_q_heads\":4,\"n_kv_heads\":2,\"head_dim\":8},"
        "\"n_tokens\":37,\"window\":5}"};
    /* the layers written: 0 and 3; 0; 0, 1 and 10 (past the header's 4: the run of absent
       layers ends at the header's last, not at the last layer with records) */
    const int layers[3][3] = {{0, 3, -1}, {0, -1, -1}, {0, 1, 10}};
    for (int c = 0; c < 3; c++) {
        kvt_writer_opts o = {.force = true};
        kvt_trace_writer *w;
        KVT_CHECK(kvt_trace_writer_create(cut, hdr[c], &o, &w));
        static float buf[TT_HQ * TT_T * TT_D];
        for (int i = 0; i < 3 && layers[c][i] >= 0; i++) {
            kvt_record_info k = {.kind = KVT_KIND_K,
                                 .layer = layers[c][i],
                                 .head_end = TT_HKV,
                                 .tok_end = TT_T,
                                 .dim = TT_D,
                                 .dtype = KVT_DTYPE_F32};
            KVT_CHECK(kvt_trace_writer_append(w, &k, buf));
            k.kind = KVT_KIND_V;
            KVT_CHECK(kvt_trace_writer_append(w, &k, buf));
            kvt_record_info q = {.kind = KVT_KIND_Q_WINDOW,
                                 .layer = layers[c][i],
                                 .head_end = TT_HQ,
                                 .tok_end = TT_W,
                                 .dim = TT_D,
                                 .dtype = KVT_DTYPE_F32};
            KVT_CHECK(kvt_trace_writer_append(w, &q, buf));
        }
        KVT_CHECK(kvt_trace_writer_finish(w));
        kvt_trace_writer_free(w);
        kvt_verify_report rep;
        KVT_CHECK(kvt_trace_verify(cut, &rep));
        if (c == 0)
            KVT_EXPECT_MSG(rep.n_problems == 2 &&
                               said(&rep, "layers 1-2: K, V and Q_window missing") &&
                               said(&rep, "layers 4-999999: K, V and Q_window missing"),
                           "%zu problems, first '%s'", rep.n_problems,
                           rep.n_problems ? rep.problems[0].what : "");
        else if (c == 2)
            KVT_EXPECT_MSG(rep.n_problems == 1 &&
                               said(&rep, "layers 2-3: K, V and Q_window missing"),
                           "%zu problems, first '%s'", rep.n_problems,
                           rep.n_problems ? rep.problems[0].what : "");
        else
            KVT_EXPECT_MSG(rep.n_problems == 4 &&
                               said(&rep, "header: window is missing or not a positive integer") &&
                               said(&rep, "layer 0 K: has 2 heads x 37 tokens x dim 8, the header "
                                          "promises 2 x 37 x 4"),
                           "%zu problems, first '%s'", rep.n_problems,
                           rep.n_problems ? rep.problems[0].what : "");
        kvt_verify_report_free(&rep);
    }
    unlink(cut);
}

int main(void)
{
    kvt_writer_opts o = {.force = true};
    KVT_CHECK(tt_write(kvt_test_tmp(path, sizeof(path), "dmg.kvt"), &o));
    kvt_test_tmp(cut, sizeof(cut), "dmg_cut.kvt");
    orig = tt_slurp(path, &orig_n);
    kvt_trace_reader *r;
    KVT_CHECK(kvt_trace_reader_open(path, &r));
    n_recs = kvt_trace_reader_n_records(r);
    KVT_EXPECT_EQ_U64(n_recs, TT_LAYERS * 3 + 1);
    for (size_t i = 0; i < n_recs; i++) {
        kvt_record_info in;
        kvt_trace_reader_record(r, i, &in);
        recs[i] = (rec_pos){in.file_offset, in.comp_bytes, in.kind, in.layer};
        KVT_EXPECT_EQ_U64(in.seq, i);
    }
    index_off = recs[n_recs - 1].off + 96 + recs[n_recs - 1].comp;
    kvt_trace_reader_close(r);
    kvt_verify_report rep;
    KVT_CHECK(kvt_trace_verify(path, &rep));
    KVT_EXPECT_EQ_U64(rep.n_problems, 0);
    KVT_EXPECT_EQ_U64(rep.n_records_ok, n_recs);
    kvt_verify_report_free(&rep);

    truncations();
    flips();
    index_damage();
    tensor_layout();
    frame_sizes();
    hostile_headers();
    promised_layers();
    unlink(path);
    unlink(cut);
    free(orig);
    return kvt_test_result("test_trace_damage");
}
