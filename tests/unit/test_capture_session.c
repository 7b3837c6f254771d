/* test_capture_session.c - the capture session API (capture/kvt_capture.h) on synthetic
 * tensors with known values:
 * - lifecycle and ordering: bad models and options, bad views (shape, dtype, batch, memory
 *   kind, overflowing strides), calls out of order (each rejected with a status and message,
 *   the session going on afterwards), an incomplete prompt at close;
 * - strided inputs: a permuted [B,T,H,D] layout and a reversed (negative-stride) head dim
 *   give byte-identical traces to contiguous [H,T,D] views; ubatch-by-ubatch submission and
 *   multi-step decode submission give the same tensors;
 * - every stored tensor read back equals what was submitted; column sums equal a brute-force
 *   T x T softmax; decode steps are chunked as asked;
 * - backpressure: submissions wait for a slow writer and the wait is recorded;
 * - a write failure mid-capture (RLIMIT_FSIZE: write() fails with EFBIG at an exact offset)
 *   returns KVT_ERR_IO, and the reader recovers every record before the failure.
 */
#include <locale.h>
#include <math.h>
#include <signal.h>
#include <sys/resource.h>

#include <cjson/cJSON.h>

#include "kvt_capture.h"
#include "kvt_test.h"
#include "kvt_trace.h"

#define NL    3
#define HQ    4
#define HKV   2
#define DD    8
#define TT    37
#define WW    5
#define GG    12
#define CHUNK 5

static char path[256], path2[256];

/* Deterministic values for (kind, layer, head, token, dim) in about [-2, 2]. */
static float val(int kind, int l, int h, int t, int d)
{
    uint64_t x = (uint64_t)kind * 1000003u + (uint64_t)l * 10007u + (uint64_t)h * 1009u +
                 (uint64_t)t * 101u + (uint64_t)d;
    x *= 0x9E3779B97F4A7C15ull;
    x ^= x >> 29;
    return (float)((double)(x % 40001) / 10000.0 - 2.0);
}

/* contiguous [H, n, D] of tokens t0.. */
static void fill(float *b, int kind, int l, int H, int t0, int n)
{
    for (int h = 0; h < H; h++)
        for (int t = 0; t < n; t++)
            for (int d = 0; d < DD; d++)
                b[((size_t)h * n + t) * DD + d] = val(kind, l, h, t0 + t, d);
}

static struct kvt_capture_model test_model(void)
{
    struct kvt_capture_model m = {.name = "unit",
                                  .arch = "llama",
                                  .n_layers = NL,
                                  .n_q_heads = HQ,
                                  .n_kv_heads = HKV,
                                  .head_dim = DD,
                                  .kv_dtype = KVT_DTYPE_F32,
                                  .rope = KVT_ROPE_DEFAULT,
                                  .rope_theta = 10000.0,
                                  .engine_name = "unit-test",
                                  .engine_version = "1"};
    return m;
}

static struct kvt_capture_opts test_opts(void)
{
    struct kvt_capture_opts o = {.n_tokens = TT,
                                 .window = WW,
                                 .n_decode = GG,
                                 .decode_chunk = CHUNK,
                                 .with_colsum = true,
                                 .with_q_all = true,
                                 .capture_json = "{\"note\":\"unit\"}",
                                 .writer = {.force = true}};
    return o;
}

enum layout { CONTIG, PERMUTED, REVERSED, UBATCH };

/* A view of tokens [t0, t0+n) of (kind, layer) in the given memory layout; `buf` must hold
 * H*n*D floats and stays owned by the caller. */
static void make_view(struct kvt_tensor_view *v, float *buf, enum layout lay, int kind, int l,
                      int H, int t0, int n)
{
    memset(v, 0, sizeof(*v));
    v->dtype = KVT_DTYPE_F32;
    if (lay == PERMUTED) { /* memory [1, n, H, D], logical [1, H, n, D] */
        for (int t = 0; t < n; t++)
            for (int h = 0; h < H; h++)
                for (int d = 0; d < DD; d++)
                    buf[((size_t)t * H + h) * DD + d] = val(kind, l, h, t0 + t, d);
        v->data = buf;
        v->ndim = 4;
        int64_t sh[4] = {1, H, n, DD}, st[4] = {(int64_t)n * H * DD, DD, (int64_t)H * DD, 1};
        memcpy(v->shape, sh, sizeof(sh));
        memcpy(v->stride, st, sizeof(st));
    } else if (lay == REVERSED) { /* memory [H, n, D] with d stored backwards */
        for (int h = 0; h < H; h++)
            for (int t = 0; t < n; t++)
                for (int d = 0; d < DD; d++)
                    buf[((size_t)h * n + t) * DD + (DD - 1 - d)] = val(kind, l, h, t0 + t, d);
        v->data = buf + DD - 1;
        v->ndim = 3;
        int64_t sh[3] = {H, n, DD}, st[3] = {(int64_t)n * DD, DD, -1};
        memcpy(v->shape, sh, sizeof(sh));
        memcpy(v->stride, st, sizeof(st));
    } else {
        fill(buf, kind, l, H, t0, n);
        kvt_tensor_view_hTd(v, buf, KVT_DTYPE_F32, H, n, DD);
    }
}

static kvt_status submit_prompt_range(kvt_capture_session *s, enum layout lay, int l, int t0, int n)
{
    static float bk[HKV * TT * DD], bv[HKV * TT * DD], bq[HQ * TT * DD];
    struct kvt_tensor_view k, v, q;
    make_view(&k, bk, lay, KVT_KIND_K, l, HKV, t0, n);
    make_view(&v, bv, lay, KVT_KIND_V, l, HKV, t0, n);
    make_view(&q, bq, lay, KVT_KIND_Q_ALL, l, HQ, t0, n);
    KVT_FORWARD(kvt_capture_submit_kv(s, l, (uint32_t)t0, &k, &v));
    return kvt_capture_submit_queries(s, l, (uint32_t)t0, &q);
}

static kvt_status submit_decode_range(kvt_capture_session *s, enum layout lay, int l, int g0, int n)
{
    static float bq[HQ * GG * DD], bk[HKV * GG * DD], bv[HKV * GG * DD];
    struct kvt_tensor_view q, k, v;
    make_view(&q, bq, lay, KVT_KIND_Q_DECODE, l, HQ, g0, n);
    make_view(&k, bk, lay, KVT_KIND_K_DECODE, l, HKV, g0, n);
    make_view(&v, bv, lay, KVT_KIND_V_DECODE, l, HKV, g0, n);
    return kvt_capture_submit_decode(s, l, (uint32_t)g0, &q, &k, &v);
}

static int32_t tok_id(int t)
{
    return (int32_t)((t * 7 + 3) % 512);
}

/* A whole capture in one layout; returns the first error. */
static const struct kvt_capture_model *g_model; /* capture()'s model; NULL: test_model() */

static kvt_status capture(const char *p, enum layout lay, const struct kvt_capture_opts *o,
                          struct kvt_capture_stats *stats)
{
    struct kvt_capture_model m = g_model ? *g_model : test_model();
    kvt_capture_session *s;
    KVT_FORWARD(kvt_capture_open(p, &m, o, &s));
    int32_t ids[TT];
    uint8_t mod[TT];
    for (int t = 0; t < TT; t++) {
        ids[t] = tok_id(t);
        mod[t] = t >= 10 && t < 20 ? KVT_MOD_IMAGE : KVT_MOD_TEXT;
    }
    kvt_status st = kvt_capture_set_tokens(s, ids, mod, NULL, 0);
    if (lay == UBATCH) { /* ubatches of 13, 13, 11 tokens, layer by layer within each */
        for (int t0 = 0; t0 < TT && st == KVT_OK; t0 += 13)
            for (int l = 0; l < NL && st == KVT_OK; l++)
                st = submit_prompt_range(s, lay, l, t0, TT - t0 < 13 ? TT - t0 : 13);
    } else {
        for (int l = 0; l < NL && st == KVT_OK; l++)
            st = submit_prompt_range(s, lay, l, 0, TT);
    }
    int step = lay == UBATCH ? 4 : 1; /* multi-step decode blocks cross chunk borders */
    for (int g = 0; g < GG && st == KVT_OK; g += step) {
        int n = GG - g < step ? GG - g : step;
        for (int i = 0; i < n && st == KVT_OK; i++)
            st = kvt_capture_submit_decode_token(s, (uint32_t)(g + i), tok_id(TT + g + i));
        for (int l = 0; l < NL && st == KVT_OK; l++)
            st = submit_decode_range(s, lay, l, g, n);
    }
    kvt_status cs = kvt_capture_close(s, stats);
    return st != KVT_OK ? st : cs;
}

/* Brute-force causal column sums of one layer: [HQ, TT] in double, from the full T x T. */
static void colsum_brute(int l, double *out)
{
    float scale = 1.0f / sqrtf((float)DD);
    for (int h = 0; h < HQ; h++) {
        int kh = h / (HQ / HKV);
        static double p[TT][TT];
        for (int i = 0; i < TT; i++) {
            double mx = -1e300, sum = 0;
            for (int j = 0; j <= i; j++) {
                double dot = 0;
                for (int d = 0; d < DD; d++)
                    dot += (double)val(KVT_KIND_Q_ALL, l, h, i, d) * val(KVT_KIND_K, l, kh, j, d);
                p[i][j] = dot * scale;
                if (p[i][j] > mx)
                    mx = p[i][j];
            }
            for (int j = 0; j <= i; j++)
                sum += (p[i][j] = exp(p[i][j] - mx));
            for (int j = 0; j <= i; j++)
                p[i][j] /= sum;
        }
        for (int j = 0; j < TT; j++) {
            double c = 0;
            for (int i = j; i < TT; i++)
                c += p[i][j];
            out[h * TT + j] = c;
        }
    }
}

/* Read (layer, kind) as f32 and compare with val(src_kind, l, h, t0 + t, d). */
static void expect_tensor(kvt_trace_reader *r, int l, int kind, int src_kind, int H, int t0, int n)
{
    size_t cnt = (size_t)H * n * DD;
    float *got = calloc(cnt, sizeof(float)), *want = calloc(cnt, sizeof(float));
    KVT_EXPECT_STATUS(
        kvt_trace_reader_read(r, l, kind, 0, (uint32_t)H, KVT_DTYPE_F32, got, cnt * sizeof(float)),
        KVT_OK);
    fill(want, src_kind, l, H, t0, n);
    KVT_EXPECT_MSG(!memcmp(got, want, cnt * sizeof(float)), "%s layer %d differs",
                   kvt_kind_name(kind), l);
    free(got);
    free(want);
}

static void check_contents(const char *p, double *colsum_err)
{
    kvt_trace_reader *r;
    KVT_CHECK(kvt_trace_reader_open(p, &r));
    KVT_EXPECT(!kvt_trace_reader_recovered(r));
    for (int l = 0; l < NL; l++) {
        expect_tensor(r, l, KVT_KIND_K, KVT_KIND_K, HKV, 0, TT);
        expect_tensor(r, l, KVT_KIND_V, KVT_KIND_V, HKV, 0, TT);
        expect_tensor(r, l, KVT_KIND_Q_ALL, KVT_KIND_Q_ALL, HQ, 0, TT);
        expect_tensor(r, l, KVT_KIND_Q_WINDOW, KVT_KIND_Q_ALL, HQ, TT - WW, WW);
        expect_tensor(r, l, KVT_KIND_Q_DECODE, KVT_KIND_Q_DECODE, HQ, 0, GG);
        expect_tensor(r, l, KVT_KIND_K_DECODE, KVT_KIND_K_DECODE, HKV, 0, GG);
        expect_tensor(r, l, KVT_KIND_V_DECODE, KVT_KIND_V_DECODE, HKV, 0, GG);
        float cs[HQ * TT];
        double want[HQ * TT];
        KVT_EXPECT_STATUS(
            kvt_trace_reader_read(r, l, KVT_KIND_ATTN_COLSUM, 0, HQ, KVT_DTYPE_F32, cs, sizeof(cs)),
            KVT_OK);
        colsum_brute(l, want);
        for (int i = 0; i < HQ * TT; i++) {
            double e = fabs(cs[i] - want[i]) / (1.0 + fabs(want[i]));
            if (e > *colsum_err)
                *colsum_err = e;
        }
    }
    /* decode records are chunked: ceil(12 / 5) = 3 per (layer, kind) */
    size_t n_dec = 0;
    for (size_t i = 0; i < kvt_trace_reader_n_records(r); i++) {
        kvt_record_info in;
        KVT_CHECK(kvt_trace_reader_record(r, i, &in));
        if (in.kind == KVT_KIND_Q_DECODE && in.layer == 1) {
            KVT_EXPECT(in.tok_begin % CHUNK == 0);
            KVT_EXPECT(in.tok_end - in.tok_begin == CHUNK || in.tok_end == GG);
            n_dec++;
        }
    }
    KVT_EXPECT_EQ_U64(n_dec, 3);
    int32_t ids[TT], pos[TT], dids[GG];
    uint8_t mod[TT];
    KVT_EXPECT_STATUS(
        kvt_trace_reader_read(r, -1, KVT_KIND_TOKEN_IDS, 0, 1, KVT_DTYPE_INVALID, ids, sizeof(ids)),
        KVT_OK);
    KVT_EXPECT_STATUS(
        kvt_trace_reader_read(r, -1, KVT_KIND_POSITIONS, 0, 1, KVT_DTYPE_INVALID, pos, sizeof(pos)),
        KVT_OK);
    KVT_EXPECT_STATUS(
        kvt_trace_reader_read(r, -1, KVT_KIND_MODALITY, 0, 1, KVT_DTYPE_INVALID, mod, sizeof(mod)),
        KVT_OK);
    KVT_EXPECT_STATUS(kvt_trace_reader_read(r, -1, KVT_KIND_DECODE_TOKEN_IDS, 0, 1,
                                            KVT_DTYPE_INVALID, dids, sizeof(dids)),
                      KVT_OK);
    for (int t = 0; t < TT; t++) {
        KVT_EXPECT(ids[t] == tok_id(t));
        KVT_EXPECT(pos[t] == t);
        KVT_EXPECT(mod[t] == (t >= 10 && t < 20 ? 1 : 0));
    }
    for (int g = 0; g < GG; g++)
        KVT_EXPECT(dids[g] == tok_id(TT + g));
    /* header and metadata */
    cJSON *h = cJSON_Parse(kvt_trace_reader_header_json(r));
    KVT_EXPECT(h != NULL);
    const cJSON *cap = cJSON_GetObjectItemCaseSensitive(h, "capture");
    const cJSON *mo = cJSON_GetObjectItemCaseSensitive(h, "model");
    KVT_EXPECT(cJSON_IsString(cJSON_GetObjectItemCaseSensitive(cap, "note")));
    KVT_EXPECT(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(cap, "with_q_all")));
    KVT_EXPECT(cJSON_GetObjectItemCaseSensitive(mo, "n_kv_heads")->valueint == HKV);
    KVT_EXPECT(cJSON_IsNull(cJSON_GetObjectItemCaseSensitive(h, "gpu")));
    KVT_EXPECT(!strcmp(cJSON_GetObjectItemCaseSensitive(h, "kv_dtype")->valuestring, "f32"));
    cJSON_Delete(h);
    char meta[1024] = "";
    for (size_t i = 0; i < kvt_trace_reader_n_records(r); i++) {
        kvt_record_info in;
        KVT_CHECK(kvt_trace_reader_record(r, i, &in));
        if (in.kind == KVT_KIND_META_JSON && in.tok_end < sizeof(meta))
            KVT_CHECK(kvt_trace_reader_read_record(r, i, meta, sizeof(meta) - 1));
    }
    KVT_EXPECT_MSG(strstr(meta, "\"defaulted_tables\":[\"positions\"]") &&
                       strstr(meta, "\"n_decode\":12") && strstr(meta, "\"stall_ns\":") &&
                       strstr(meta, "\"complete\":true"),
                   "meta_json: %s", meta);
    kvt_trace_reader_close(r);
}

static bool same_file(const char *a, const char *b)
{
    FILE *fa = fopen(a, "rb"), *fb = fopen(b, "rb");
    bool same = fa && fb;
    while (same) {
        int ca = fgetc(fa), cb = fgetc(fb);
        if (ca != cb)
            same = false;
        if (ca == EOF || cb == EOF)
            break;
    }
    if (fa)
        fclose(fa);
    if (fb)
        fclose(fb);
    return same;
}

static void test_layouts(void)
{
    struct kvt_capture_opts o = test_opts();
    double err = 0;
    KVT_CHECK(capture(path, CONTIG, &o, NULL));
    check_contents(path, &err);
    const enum layout others[3] = {PERMUTED, REVERSED, UBATCH};
    const char *names[3] = {"permuted [B,T,H,D]", "reversed D (negative stride)", "ubatches"};
    for (int i = 0; i < 3; i++) {
        o.writer.n_threads = i; /* the writer's output does not depend on its threads */
        KVT_CHECK(capture(path2, others[i], &o, NULL));
        check_contents(path2, &err);
        if (others[i] != UBATCH)
            KVT_EXPECT_MSG(same_file(path, path2), "%s: trace differs from contiguous", names[i]);
    }
    printf("layouts: contiguous, permuted, negative-stride and ubatch captures agree; colsum "
           "vs brute force max err %.3g\n",
           err);
    KVT_EXPECT(err < 1e-5);
    kvt_verify_report rep;
    KVT_CHECK(kvt_trace_verify(path, &rep));
    KVT_EXPECT_MSG(rep.n_problems == 0, "verify: %s", rep.n_problems ? rep.problems[0].what : "");
    kvt_verify_report_free(&rep);
}

static void test_dtypes(void)
{
    /* bf16 input stored as f16: converted through f32 with round to nearest even */
    struct kvt_capture_model m = test_model();
    m.kv_dtype = KVT_DTYPE_F16;
    struct kvt_capture_opts o = test_opts();
    o.with_colsum = o.with_q_all = false;
    o.n_decode = 0;
    kvt_capture_session *s;
    KVT_CHECK(kvt_capture_open(path, &m, &o, &s));
    uint16_t kb[HKV * TT * DD], qb[HQ * TT * DD];
    float kf[HKV * TT * DD];
    for (int l = 0; l < NL; l++) {
        fill(kf, KVT_KIND_K, l, HKV, 0, TT);
        for (int i = 0; i < HKV * TT * DD; i++)
            kb[i] = kvt_f32_to_bf16(kf[i]);
        for (int i = 0; i < HQ * TT * DD; i++)
            qb[i] = kvt_f32_to_bf16(1.0f);
        struct kvt_tensor_view k, q;
        kvt_tensor_view_hTd(&k, kb, KVT_DTYPE_BF16, HKV, TT, DD);
        /* only the last W queries, starting exactly at T - W */
        kvt_tensor_view_hTd(&q, qb, KVT_DTYPE_BF16, HQ, WW, DD);
        KVT_CHECK(kvt_capture_submit_kv(s, l, 0, &k, &k));
        KVT_CHECK(kvt_capture_submit_queries(s, l, TT - WW, &q));
    }
    KVT_CHECK(kvt_capture_close(s, NULL));
    kvt_trace_reader *r;
    KVT_CHECK(kvt_trace_reader_open(path, &r));
    uint16_t got[HKV * TT * DD];
    KVT_CHECK(kvt_trace_reader_read(r, 2, KVT_KIND_K, 0, HKV, KVT_DTYPE_INVALID, got, sizeof(got)));
    size_t bad = 0;
    for (int i = 0; i < HKV * TT * DD; i++)
        bad += got[i] != kvt_f32_to_f16(kvt_bf16_to_f32(kb[i]));
    KVT_EXPECT_EQ_U64(bad, 0);
    uint32_t nh, nt, dim;
    kvt_dtype dt;
    KVT_CHECK(kvt_trace_reader_shape(r, 0, KVT_KIND_Q_WINDOW, &nh, &nt, &dim, &dt));
    KVT_EXPECT(nh == HQ && nt == WW && dim == DD && dt == KVT_DTYPE_F16);
    KVT_EXPECT_STATUS(kvt_trace_reader_shape(r, 0, KVT_KIND_Q_DECODE, &nh, &nt, &dim, &dt),
                      KVT_ERR_NOT_FOUND);
    kvt_trace_reader_close(r);
}

static void test_open_errors(void)
{
    struct kvt_capture_model m = test_model();
    struct kvt_capture_opts o = test_opts();
    kvt_capture_session *s = (kvt_capture_session *)&m; /* must be reset to NULL */
    o.window = 0;
    KVT_EXPECT_STATUS(kvt_capture_open(path, &m, &o, &s), KVT_ERR_INVALID_ARG);
    KVT_EXPECT(s == NULL);
    o.window = TT + 1;
    KVT_EXPECT_STATUS(kvt_capture_open(path, &m, &o, &s), KVT_ERR_INVALID_ARG);
    o = test_opts();
    o.n_tokens = 0;
    KVT_EXPECT_STATUS(kvt_capture_open(path, &m, &o, &s), KVT_ERR_INVALID_ARG);
    o = test_opts();
    o.capture_json = "[1]";
    KVT_EXPECT_STATUS(kvt_capture_open(path, &m, &o, &s), KVT_ERR_INVALID_ARG);
    /* a key that would restate (and contradict) the session's own record of the capture */
    o.capture_json = "{\"note\":\"unit\",\"with_q_all\":false}";
    KVT_EXPECT_STATUS(kvt_capture_open(path, &m, &o, &s), KVT_ERR_INVALID_ARG);
    KVT_EXPECT(strstr(kvt_error_msg(), "\"with_q_all\" is the session's own") != NULL);
    KVT_EXPECT(s == NULL);
    o = test_opts();
    m.n_kv_heads = 3;
    KVT_EXPECT_STATUS(kvt_capture_open(path, &m, &o, &s), KVT_ERR_INVALID_ARG);
    KVT_EXPECT(strstr(kvt_error_msg(), "n_kv_heads 3") != NULL);
    m = test_model();
    m.kv_dtype = KVT_DTYPE_I32;
    KVT_EXPECT_STATUS(kvt_capture_open(path, &m, &o, &s), KVT_ERR_INVALID_ARG);
    m = test_model();
    m.n_layers = 0;
    KVT_EXPECT_STATUS(kvt_capture_open(path, &m, &o, &s), KVT_ERR_INVALID_ARG);
    m = test_model();
    m.rope = (kvt_rope_kind)7;
    KVT_EXPECT_STATUS(kvt_capture_open(path, &m, &o, &s), KVT_ERR_INVALID_ARG);
    m = test_model();
    KVT_EXPECT_STATUS(kvt_capture_open(NULL, &m, &o, &s), KVT_ERR_INVALID_ARG);
    /* an existing file without force */
    KVT_CHECK(capture(path, CONTIG, &o, NULL));
    o.writer.force = false;
    KVT_EXPECT_STATUS(kvt_capture_open(path, &m, &o, &s), KVT_ERR_IO);
    KVT_EXPECT(strstr(kvt_error_msg(), "already exists") != NULL);
    KVT_EXPECT_STATUS(kvt_capture_open("/nonexistent-dir/x.kvt", &m, &o, &s), KVT_ERR_IO);
    KVT_EXPECT_STATUS(kvt_capture_close(NULL, NULL), KVT_OK);
}

/* kvt_capture_submit_kvzip: a layer's [Hkv, T] scores as one kvzip_score record, read back
 * bit for bit; a score that is not a probability (NaN, negative, above 1), null scores, a layer
 * out of range or given twice are refused, and the session goes on. */
static void test_kvzip_scores(void)
{
    struct kvt_capture_model m = test_model();
    struct kvt_capture_opts o = test_opts();
    kvt_capture_session *s = NULL;
    unlink(path);
    KVT_CHECK(kvt_capture_open(path, &m, &o, &s));
    static float sc[NL][HKV * TT];
    for (int l = 0; l < NL; l++)
        for (int i = 0; i < HKV * TT; i++)
            sc[l][i] = (val(KVT_KIND_KVZIP_SCORE, l, i / TT, i % TT, 0) + 2.0f) / 4.0f;
    sc[0][0] = 0.0f, sc[0][1] = 1.0f; /* the ends are allowed */
    KVT_CHECK(kvt_capture_submit_kvzip(s, 0, sc[0]));
    KVT_EXPECT_STATUS(kvt_capture_submit_kvzip(s, 0, sc[0]), KVT_ERR_STATE);
    KVT_EXPECT(strstr(kvt_error_msg(), "twice") != NULL);
    const float bad[3] = {NAN, -1e-7f, 1.0001f};
    for (int b = 0; b < 3; b++) {
        const float keep = sc[1][TT + 3];
        sc[1][TT + 3] = bad[b]; /* KV head 1, token 3 */
        KVT_EXPECT_STATUS(kvt_capture_submit_kvzip(s, 1, sc[1]), KVT_ERR_INVALID_ARG);
        KVT_EXPECT_MSG(strstr(kvt_error_msg(), "KV head 1, token 3") != NULL, "%s",
                       kvt_error_msg());
        sc[1][TT + 3] = keep;
    }
    KVT_EXPECT_STATUS(kvt_capture_submit_kvzip(s, 1, NULL), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_capture_submit_kvzip(s, NL, sc[1]), KVT_ERR_INVALID_ARG);
    KVT_CHECK(kvt_capture_submit_kvzip(s, 1, sc[1]));
    KVT_CHECK(kvt_capture_submit_kvzip(s, 2, sc[2]));
    /* the prompt is not complete: the close says so, and the records are kept */
    KVT_EXPECT_STATUS(kvt_capture_close(s, NULL), KVT_ERR_STATE);
    kvt_trace_reader *r = NULL;
    KVT_CHECK(kvt_trace_reader_open(path, &r));
    float got[HKV * TT];
    for (int l = 0; r && l < NL; l++) {
        uint32_t h, t, d;
        kvt_dtype dt;
        KVT_CHECK(kvt_trace_reader_shape(r, l, KVT_KIND_KVZIP_SCORE, &h, &t, &d, &dt));
        KVT_EXPECT(h == HKV && t == TT && d == 1 && dt == KVT_DTYPE_F32);
        KVT_CHECK(kvt_trace_reader_read(r, l, KVT_KIND_KVZIP_SCORE, 0, HKV, KVT_DTYPE_F32, got,
                                        sizeof(got)));
        KVT_EXPECT_MSG(!memcmp(got, sc[l], sizeof(got)), "layer %d's scores differ", l);
    }
    kvt_trace_reader_close(r);
    KVT_EXPECT(!strcmp(kvt_kind_name(KVT_KIND_KVZIP_SCORE), "kvzip_score"));
    KVT_EXPECT(kvt_kind_from_name("kvzip_score") == KVT_KIND_KVZIP_SCORE);
}

/* test_model() with half pairs, the frequencies f and this attention_scaling */
static struct kvt_capture_model rope_model(const double *f, double scaling)
{
    struct kvt_capture_model m = test_model();
    m.rope_pairs = KVT_ROPE_PAIRS_HALF;
    m.rope_inv_freq = f;
    m.rope_attention_scaling = scaling;
    return m;
}

/* The JSON header of the trace at `path` (cJSON_Delete it), or NULL */
static cJSON *read_header(void)
{
    kvt_trace_reader *r = NULL;
    KVT_CHECK(kvt_trace_reader_open(path, &r));
    cJSON *h = r ? cJSON_Parse(kvt_trace_reader_header_json(r)) : NULL;
    kvt_trace_reader_close(r);
    return h;
}

static const cJSON *rope_of(const cJSON *h)
{
    return cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(h, "model"), "rope");
}

/* rope_theta and attn_scale: finite and > 0, or 0 (theta not known, written as 0; attn_scale
 * 1/sqrt(D)). A negative theta was written into the header ("theta": -5), and a negative
 * attn_scale was refused as "attn_scale and rope_theta must be finite". */
static void test_theta_and_scale(void)
{
    struct kvt_capture_model m = test_model();
    struct kvt_capture_opts o = test_opts();
    kvt_capture_session *s = NULL;
    const double bad[] = {-5.0, -1e-300, NAN, INFINITY, -INFINITY};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char got[64];
        snprintf(got, sizeof(got), "got %g", bad[i]);
        m = test_model();
        m.rope_theta = bad[i];
        KVT_EXPECT_STATUS(kvt_capture_open(path, &m, &o, &s), KVT_ERR_INVALID_ARG);
        KVT_EXPECT_MSG(strstr(kvt_error_msg(), "rope_theta must be finite and > 0") &&
                           strstr(kvt_error_msg(), got),
                       "%s", kvt_error_msg());
        m = test_model();
        m.attn_scale = bad[i];
        KVT_EXPECT_STATUS(kvt_capture_open(path, &m, &o, &s), KVT_ERR_INVALID_ARG);
        KVT_EXPECT_MSG(strstr(kvt_error_msg(), "attn_scale must be finite and > 0") &&
                           strstr(kvt_error_msg(), got),
                       "%s", kvt_error_msg());
        KVT_EXPECT(s == NULL);
    }
    /* 0 keeps its meaning */
    m = test_model();
    m.rope_theta = 0;
    m.attn_scale = 0;
    g_model = &m;
    KVT_CHECK(capture(path, CONTIG, &o, NULL));
    g_model = NULL;
    cJSON *h = read_header();
    const cJSON *th = cJSON_GetObjectItemCaseSensitive(rope_of(h), "theta");
    const cJSON *sc = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(h, "model"),
                                                       "attn_scale");
    KVT_EXPECT(cJSON_IsNumber(th) && th->valuedouble == 0.0);
    KVT_EXPECT(cJSON_IsNumber(sc) && fabs(sc->valuedouble - 1.0 / sqrt((double)DD)) < 1e-15);
    cJSON_Delete(h);
}

/* writer and decode settings past their range: a zstd level zstd would clamp is refused (100
 * was recorded as given), and a decode chunk past the planned steps holds them all (2^31 steps
 * allocated 8 GiB of token ids before the first step) */
static void test_writer_ranges(void)
{
    struct kvt_capture_model m = test_model();
    struct kvt_capture_opts o = test_opts();
    kvt_capture_session *s = NULL;
    o.writer.level = 100;
    KVT_EXPECT_STATUS(kvt_capture_open(path, &m, &o, &s), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_MSG(strstr(kvt_error_msg(), "zstd level 100 is out of range"), "%s",
                   kvt_error_msg());
    KVT_EXPECT(s == NULL);
    o = test_opts();
    o.decode_chunk = 1u << 31;
    KVT_CHECK(capture(path, CONTIG, &o, NULL));
    kvt_trace_reader *r;
    KVT_CHECK(kvt_trace_reader_open(path, &r));
    size_t n_dec = 0;
    for (size_t i = 0; i < kvt_trace_reader_n_records(r); i++) {
        kvt_record_info in;
        KVT_CHECK(kvt_trace_reader_record(r, i, &in));
        if (in.kind == KVT_KIND_Q_DECODE) {
            KVT_EXPECT(in.tok_begin == 0 && in.tok_end == GG);
            n_dec++;
        }
    }
    KVT_EXPECT_EQ_U64(n_dec, NL); /* one record per layer, every step */
    kvt_trace_reader_close(r);
}

/* The optional RoPE details reach model.rope exactly, and bad ones are refused at open. */
static void test_rope_details(void)
{
    double f[DD / 2];
    for (int i = 0; i < DD / 2; i++)
        f[i] = 1.0 / (3.0 + i); /* not representable in a short decimal: the header is exact */
    f[1] = (double)0.01f; /* cJSON's own printer writes 15 digits, which read back 1 ulp off */
    struct kvt_capture_model m = rope_model(f, 1.25);
    struct kvt_capture_opts o = test_opts();
    g_model = &m;
    KVT_CHECK(capture(path, CONTIG, &o, NULL));
    g_model = NULL;
    cJSON *h = read_header();
    const cJSON *ro = rope_of(h);
    const cJSON *pairs = cJSON_GetObjectItemCaseSensitive(ro, "pairs");
    const cJSON *fa = cJSON_GetObjectItemCaseSensitive(ro, "inv_freq");
    const cJSON *sc = cJSON_GetObjectItemCaseSensitive(ro, "attention_scaling");
    KVT_EXPECT(cJSON_IsString(pairs) && !strcmp(pairs->valuestring, "half"));
    KVT_EXPECT(cJSON_GetArraySize(fa) == DD / 2);
    for (int i = 0; i < DD / 2 && cJSON_GetArraySize(fa) == DD / 2; i++)
        KVT_EXPECT_MSG(cJSON_GetArrayItem(fa, i)->valuedouble == f[i], "inv_freq[%d] %.17g", i,
                       cJSON_GetArrayItem(fa, i)->valuedouble);
    KVT_EXPECT(cJSON_IsNumber(sc) && sc->valuedouble == 1.25);
    KVT_EXPECT(!cJSON_GetObjectItemCaseSensitive(ro, "mrope_section"));
    cJSON_Delete(h);
    /* refused */
    kvt_capture_session *s = NULL;
    m.rope_pairs = (kvt_rope_pairs)3;
    KVT_EXPECT_STATUS(kvt_capture_open(path, &m, &o, &s), KVT_ERR_INVALID_ARG);
    KVT_EXPECT(strstr(kvt_error_msg(), "rope pairs 3") != NULL);
    m.rope_pairs = KVT_ROPE_PAIRS_INTERLEAVED;
    f[1] = NAN;
    KVT_EXPECT_STATUS(kvt_capture_open(path, &m, &o, &s), KVT_ERR_INVALID_ARG);
    KVT_EXPECT(strstr(kvt_error_msg(), "rope_inv_freq[1]") != NULL);
    f[1] = -1.0;
    KVT_EXPECT_STATUS(kvt_capture_open(path, &m, &o, &s), KVT_ERR_INVALID_ARG);
    f[1] = 0.5;
    m.rope_attention_scaling = -1.0;
    KVT_EXPECT_STATUS(kvt_capture_open(path, &m, &o, &s), KVT_ERR_INVALID_ARG);
    m.rope_attention_scaling = 0;
    m.mrope_section[0] = DD / 2; /* a section with 1-D RoPE */
    KVT_EXPECT_STATUS(kvt_capture_open(path, &m, &o, &s), KVT_ERR_INVALID_ARG);
    KVT_EXPECT(strstr(kvt_error_msg(), "mrope_section") != NULL);
    m.rope = KVT_ROPE_MROPE;
    m.mrope_section[1] = 1; /* sums to D/2 + 1 */
    KVT_EXPECT_STATUS(kvt_capture_open(path, &m, &o, &s), KVT_ERR_INVALID_ARG);
    m.mrope_section[0] = DD / 2 - 1; /* sums to D/2 */
    KVT_EXPECT_STATUS(kvt_capture_open(path, &m, &o, &s), KVT_OK);
    KVT_EXPECT(s != NULL);
    (void)kvt_capture_close(s, NULL); /* nothing submitted: incomplete, whatever it says */
}

/* A host program that set a decimal-comma locale (Python's locale.setlocale(LC_ALL, "") under
 * a German LANG): model.rope's numbers still print with a '.', so the header is JSON. Skipped
 * where no such locale can be made (localedef, or the de_DE source, missing). */
static void test_rope_decimal_comma(void)
{
    char dir[512], cmd[1200];
    kvt_test_tmp(dir, sizeof(dir), "locales");
    snprintf(cmd, sizeof(cmd),
             "mkdir -p '%s' && localedef -i de_DE -f UTF-8 '%s/de_DE.UTF-8' >/dev/null 2>&1", dir,
             dir);
    const char *old = getenv("LOCPATH");
    char *saved = old ? strdup(old) : NULL;
    if (system(cmd) != 0 || setenv("LOCPATH", dir, 1) != 0 ||
        !setlocale(LC_NUMERIC, "de_DE.UTF-8")) {
        printf("note: no de_DE locale could be made: the decimal-comma check did not run\n");
    } else {
        char probe[16];
        snprintf(probe, sizeof(probe), "%.1f", 1.5);
        KVT_EXPECT_MSG(!strcmp(probe, "1,5"), "the locale prints %s", probe);
        double f[DD / 2] = {0.5, 0.25, 0.125, 1.1};
        struct kvt_capture_model m = rope_model(f, 1.1);
        struct kvt_capture_opts o = test_opts();
        g_model = &m;
        KVT_CHECK(capture(path, CONTIG, &o, NULL));
        g_model = NULL;
        setlocale(LC_NUMERIC, "C");
        cJSON *h = read_header();
        const cJSON *ro = rope_of(h);
        const cJSON *fa = cJSON_GetObjectItemCaseSensitive(ro, "inv_freq");
        KVT_EXPECT(cJSON_GetArraySize(fa) == DD / 2 &&
                   cJSON_GetArrayItem(fa, 3)->valuedouble == 1.1);
        KVT_EXPECT(cJSON_GetObjectItemCaseSensitive(ro, "attention_scaling")->valuedouble == 1.1);
        cJSON_Delete(h);
    }
    setlocale(LC_NUMERIC, "C");
    if (saved)
        setenv("LOCPATH", saved, 1);
    else
        unsetenv("LOCPATH");
    free(saved);
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        printf("note: %s left behind\n", dir);
}

/* Every rejected call leaves the session usable: the capture still finishes intact. */
static void test_ordering(void)
{
    struct kvt_capture_model m = test_model();
    struct kvt_capture_opts o = test_opts();
    kvt_capture_session *s;
    KVT_CHECK(kvt_capture_open(path, &m, &o, &s));
    static float bk[HKV * TT * DD], bq[HQ * TT * DD];
    struct kvt_tensor_view k, q, bad;
    make_view(&k, bk, CONTIG, KVT_KIND_K, 0, HKV, 0, TT);
    make_view(&q, bq, CONTIG, KVT_KIND_Q_ALL, 0, HQ, 0, TT);

    /* bad layers and views */
    KVT_EXPECT_STATUS(kvt_capture_submit_kv(s, -1, 0, &k, &k), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_capture_submit_kv(s, NL, 0, &k, &k), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_capture_submit_kv(s, 0, 0, &q, &q), KVT_ERR_INVALID_ARG);
    KVT_EXPECT(strstr(kvt_error_msg(), "shape") != NULL);
    KVT_EXPECT_STATUS(kvt_capture_submit_kv(s, 0, 0, NULL, &k), KVT_ERR_INVALID_ARG);
    bad = k;
    bad.dtype = KVT_DTYPE_I32;
    KVT_EXPECT_STATUS(kvt_capture_submit_kv(s, 0, 0, &bad, &k), KVT_ERR_INVALID_ARG);
    bad = k;
    bad.ndim = 2;
    KVT_EXPECT_STATUS(kvt_capture_submit_kv(s, 0, 0, &bad, &k), KVT_ERR_INVALID_ARG);
    bad = k;
    bad.mem = (kvt_mem)7;
    KVT_EXPECT_STATUS(kvt_capture_submit_kv(s, 0, 0, &bad, &k), KVT_ERR_INVALID_ARG);
    bad.mem = KVT_MEM_CUDA;
    bad.device_idx = -1;
    KVT_EXPECT_STATUS(kvt_capture_submit_kv(s, 0, 0, &bad, &k), KVT_ERR_INVALID_ARG);
    /* a device view the session cannot serve (no CUDA in this build or machine, or no such
     * device): refused before anything is queued, and the session goes on with host views */
    bad.device_idx = 9999;
    kvt_status dst = kvt_capture_submit_kv(s, 0, 0, &bad, &k);
    KVT_EXPECT(dst == KVT_ERR_NO_CUDA || dst == KVT_ERR_INVALID_ARG);
    KVT_EXPECT(strstr(kvt_error_msg(), "CUDA") != NULL);
    bad = k;
    bad.ndim = 4;
    bad.shape[0] = 2;
    bad.shape[1] = HKV;
    bad.shape[2] = TT;
    bad.shape[3] = DD;
    KVT_EXPECT_STATUS(kvt_capture_submit_kv(s, 0, 0, &bad, &k), KVT_ERR_INVALID_ARG);
    KVT_EXPECT(strstr(kvt_error_msg(), "batch") != NULL);
    bad = k;
    bad.stride[1] = INT64_MAX / 4;
    KVT_EXPECT_STATUS(kvt_capture_submit_kv(s, 0, 0, &bad, &k), KVT_ERR_INVALID_ARG);
    bad = k;
    bad.shape[1] = TT - 1;
    KVT_EXPECT_STATUS(kvt_capture_submit_kv(s, 0, 0, &bad, &k), KVT_ERR_INVALID_ARG);
    bad = k;
    bad.shape[1] = TT + 1;
    KVT_EXPECT_STATUS(kvt_capture_submit_kv(s, 0, 0, &bad, &bad), KVT_ERR_INVALID_ARG);

    /* order */
    struct kvt_tensor_view k5 = k;
    k5.shape[1] = 5;
    KVT_EXPECT_STATUS(kvt_capture_submit_kv(s, 0, 5, &k5, &k5), KVT_ERR_STATE);
    KVT_EXPECT(strstr(kvt_error_msg(), "next expected 0") != NULL);
    KVT_EXPECT_STATUS(kvt_capture_submit_queries(s, 0, 0, &q), KVT_ERR_STATE); /* no keys yet */
    KVT_EXPECT(strstr(kvt_error_msg(), "keys") != NULL);
    struct kvt_tensor_view q5 = q;
    q5.shape[1] = 5;
    KVT_EXPECT_STATUS(kvt_capture_submit_queries(s, 0, 3, &q5), KVT_ERR_STATE); /* not at 0 */
    KVT_EXPECT_STATUS(kvt_capture_submit_decode_token(s, 1, 7), KVT_ERR_STATE);
    KVT_EXPECT_STATUS(kvt_capture_submit_decode_token(s, GG, 7), KVT_ERR_STATE);
    {
        static float dq[HQ * DD], dk[HKV * DD];
        struct kvt_tensor_view vq, vk;
        kvt_tensor_view_hTd(&vq, dq, KVT_DTYPE_F32, HQ, 1, DD);
        kvt_tensor_view_hTd(&vk, dk, KVT_DTYPE_F32, HKV, 1, DD);
        KVT_EXPECT_STATUS(kvt_capture_submit_decode(s, 0, 0, &vq, &vk, &vk), KVT_ERR_STATE);
        KVT_EXPECT(strstr(kvt_error_msg(), "prompt must be complete") != NULL);
    }
    /* token tables */
    int32_t pos3[3 * TT] = {0};
    uint8_t mod[TT] = {0};
    mod[4] = 9;
    KVT_EXPECT_STATUS(kvt_capture_set_tokens(s, NULL, NULL, pos3, 3), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_capture_set_tokens(s, NULL, mod, NULL, 0), KVT_ERR_INVALID_ARG);

    /* now the real capture, through the same session */
    kvt_status st = KVT_OK;
    for (int l = 0; l < NL && st == KVT_OK; l++)
        st = submit_prompt_range(s, CONTIG, l, 0, TT);
    KVT_CHECK(st);
    int32_t ids[TT];
    for (int t = 0; t < TT; t++) {
        ids[t] = tok_id(t);
        mod[t] = t >= 10 && t < 20;
    }
    KVT_CHECK(kvt_capture_set_tokens(s, ids, mod, NULL, 0));
    KVT_EXPECT_STATUS(kvt_capture_set_tokens(s, ids, mod, NULL, 0), KVT_ERR_STATE);
    KVT_EXPECT_STATUS(kvt_capture_submit_kv(s, 0, TT, &k5, &k5), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_capture_submit_queries(s, 0, TT, &q5), KVT_ERR_INVALID_ARG);
    for (int g = 0; g < GG; g++) {
        KVT_CHECK(kvt_capture_submit_decode_token(s, (uint32_t)g, tok_id(TT + g)));
        for (int l = 0; l < NL; l++) {
            if (g == 3 && l == 1) {
                KVT_EXPECT_STATUS(submit_decode_range(s, CONTIG, l, g + 1, 1), KVT_ERR_STATE);
                KVT_EXPECT_STATUS(submit_decode_range(s, CONTIG, l, g, GG), KVT_ERR_INVALID_ARG);
                KVT_EXPECT(strstr(kvt_error_msg(), "planned n_decode") != NULL);
            }
            KVT_CHECK(submit_decode_range(s, CONTIG, l, g, 1));
        }
    }
    KVT_EXPECT_STATUS(kvt_capture_submit_decode_token(s, GG, 1), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_capture_submit_kv(s, 0, 0, &k, &k), KVT_ERR_STATE);
    KVT_EXPECT_STATUS(kvt_capture_set_tokens(s, ids, NULL, NULL, 0), KVT_ERR_STATE);
    struct kvt_capture_stats stats;
    KVT_EXPECT_STATUS(kvt_capture_close(s, &stats), KVT_OK);
    KVT_EXPECT_EQ_U64(stats.n_decode, GG);
    double err = 0;
    check_contents(path, &err);
    KVT_EXPECT(err < 1e-5);

    /* closing with an incomplete prompt over an existing trace (force): the complete one
     * above stays, the incomplete one is finished next to it */
    KVT_CHECK(kvt_capture_open(path, &m, &o, &s));
    KVT_CHECK(submit_prompt_range(s, CONTIG, 0, 0, TT));
    KVT_CHECK(kvt_capture_submit_kv(s, 1, 0, &k5, &k5));
    KVT_EXPECT_STATUS(kvt_capture_close(s, NULL), KVT_ERR_STATE);
    kvt_verify_report rep;
    KVT_CHECK(kvt_trace_verify(path, &rep));
    KVT_EXPECT(rep.trailer_ok && rep.n_records_bad == 0 && rep.n_problems == 0);
    kvt_verify_report_free(&rep);
    err = 0;
    check_contents(path, &err);
    KVT_EXPECT(err < 1e-5);
    char cmd[600];
    snprintf(cmd, sizeof(cmd), "ls %s.tmp.* >/dev/null 2>&1 && rm -f %s.tmp.*", path, path);
    KVT_EXPECT(system(cmd) == 0); /* the incomplete one, kept next to it */

    /* the same into a new file: finished in place, flagged, reported */
    remove(path);
    KVT_CHECK(kvt_capture_open(path, &m, &o, &s));
    KVT_CHECK(submit_prompt_range(s, CONTIG, 0, 0, TT));
    KVT_CHECK(kvt_capture_submit_kv(s, 1, 0, &k5, &k5));
    KVT_EXPECT_STATUS(kvt_capture_close(s, NULL), KVT_ERR_STATE);
    KVT_EXPECT_MSG(strstr(kvt_error_msg(), "layer 1 has K/V for 5 of 37") != NULL, "%s",
                   kvt_error_msg());
    KVT_CHECK(kvt_trace_verify(path, &rep));
    KVT_EXPECT(rep.trailer_ok && rep.n_records_bad == 0 && rep.n_problems > 0);
    kvt_verify_report_free(&rep);
}

/* A slow writer (one thread, a memory bound of one record) makes submissions wait. */
static void test_backpressure(void)
{
    struct kvt_capture_model m = test_model();
    m.head_dim = 64;
    struct kvt_capture_opts o = {
        .n_tokens = 4096,
        .window = 8,
        .writer = {.n_threads = 1, .force = true, .max_pending_bytes = 2u << 20}};
    kvt_capture_session *s;
    KVT_CHECK(kvt_capture_open(path, &m, &o, &s));
    size_t n = (size_t)HKV * 4096 * 64;
    float *b = malloc(n * sizeof(float));
    kvt_rng rng;
    kvt_rng_seed(&rng, 5);
    for (size_t i = 0; i < n; i++)
        b[i] = (float)kvt_rng_normal(&rng);
    struct kvt_tensor_view k, q;
    kvt_tensor_view_hTd(&k, b, KVT_DTYPE_F32, HKV, 4096, 64);
    kvt_tensor_view_hTd(&q, b, KVT_DTYPE_F32, HQ, 8, 64);
    for (int l = 0; l < NL; l++) {
        KVT_CHECK(kvt_capture_submit_kv(s, l, 0, &k, &k));
        KVT_CHECK(kvt_capture_submit_queries(s, l, 4096 - 8, &q));
    }
    struct kvt_capture_stats st;
    kvt_capture_get_stats(s, &st);
    KVT_CHECK(kvt_capture_close(s, &st));
    printf("backpressure: %llu bytes submitted, peak pending %llu, stalled %.2f ms\n",
           (unsigned long long)st.bytes_submitted, (unsigned long long)st.writer.peak_pending_bytes,
           (double)st.stall_ns / 1e6);
    KVT_EXPECT(st.stall_ns > 0);
    KVT_EXPECT(st.writer.peak_pending_bytes <= (2u << 20));
    free(b);
}

/* A full disk at many offsets: an error comes back, the file keeps every complete record. */
static void test_write_failure(int threads)
{
    struct kvt_capture_opts o = test_opts();
    o.writer.n_threads = threads;
    o.writer.max_record_bytes = 512; /* many small records: many places to fail */
    KVT_CHECK(capture(path, CONTIG, &o, NULL));
    FILE *f = fopen(path, "rb");
    fseek(f, 0, SEEK_END);
    long full = ftell(f);
    fclose(f);
    struct rlimit old, rl;
    getrlimit(RLIMIT_FSIZE, &old);
    signal(SIGXFSZ, SIG_IGN);
    int cases = 0, recovered = 0;
    uint64_t max_ok = 0;
    for (long lim = 150; lim < full; lim += 509) {
        unlink(path);
        rl = old;
        rl.rlim_cur = (rlim_t)lim;
        setrlimit(RLIMIT_FSIZE, &rl);
        kvt_status s = capture(path, CONTIG, &o, NULL);
        char msg[256];
        snprintf(msg, sizeof(msg), "%s", kvt_error_msg());
        setrlimit(RLIMIT_FSIZE, &old);
        cases++;
        KVT_EXPECT_MSG(s == KVT_ERR_IO, "limit %ld: got %s (%s)", lim, kvt_status_str(s), msg);
        if (access(path, F_OK) != 0)
            continue; /* the header itself did not fit: nothing left behind */
        kvt_trace_reader *r;
        kvt_status os = kvt_trace_reader_open(path, &r);
        KVT_EXPECT_MSG(os == KVT_OK, "limit %ld: reopen: %s", lim, kvt_error_msg());
        if (os != KVT_OK)
            continue;
        KVT_EXPECT(kvt_trace_reader_recovered(r));
        size_t nrec = kvt_trace_reader_n_records(r);
        for (size_t i = 0; i < nrec; i++) {
            kvt_record_info in;
            KVT_CHECK(kvt_trace_reader_record(r, i, &in));
            uint8_t *buf = malloc(in.raw_bytes);
            KVT_EXPECT_STATUS(kvt_trace_reader_read_record(r, i, buf, in.raw_bytes), KVT_OK);
            if (in.kind == KVT_KIND_K) { /* the values are the submitted ones */
                const float *got = (const float *)(void *)buf;
                size_t j = 0;
                bool same = true;
                for (uint32_t h = in.head_begin; h < in.head_end; h++)
                    for (uint32_t t = in.tok_begin; t < in.tok_end; t++)
                        for (int d = 0; d < DD; d++)
                            same = same && got[j++] == val(KVT_KIND_K, in.layer, (int)h, (int)t, d);
                KVT_EXPECT_MSG(same, "limit %ld: record %zu holds other values", lim, i);
            }
            free(buf);
        }
        uint64_t size = kvt_trace_reader_file_bytes(r);
        KVT_EXPECT_MSG(size <= (uint64_t)lim, "limit %ld: file is %llu bytes", lim,
                       (unsigned long long)size);
        if (nrec > max_ok)
            max_ok = nrec;
        recovered++;
        kvt_trace_reader_close(r);
        kvt_verify_report rep;
        KVT_CHECK(kvt_trace_verify(path, &rep));
        KVT_EXPECT(rep.header_ok && rep.n_records_bad == 0 && rep.n_records_ok == nrec);
        kvt_verify_report_free(&rep);
    }
    printf("write failure (%d threads): %d limits tried, %d partial traces recovered (up to "
           "%llu records)\n",
           threads, cases, recovered, (unsigned long long)max_ok);
    KVT_EXPECT(recovered > 10);
}

/* Every allocation failing in turn: a clear KVT_ERR_NOMEM, no leak (ASan), and whatever file
 * was left opens. */
static void test_alloc_faults(void)
{
    struct kvt_capture_opts o = test_opts();
    int n_fail = 0;
    for (uint64_t n = 1; n < 100000; n++) {
        unlink(path);
        kvt_alloc_fail_at(n);
        kvt_status s = capture(path, UBATCH, &o, NULL);
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
        if (access(path, F_OK) == 0) {
            KVT_EXPECT_MSG(kvt_trace_reader_open(path, &r) == KVT_OK, "alloc %llu: %s",
                           (unsigned long long)n, kvt_error_msg());
            kvt_trace_reader_close(r);
        }
    }
    printf("allocation faults: %d allocation sites failed in turn\n", n_fail);
    KVT_EXPECT(n_fail > 20);
}

int main(void)
{
    kvt_test_tmp(path, sizeof(path), "capture.kvt");
    kvt_test_tmp(path2, sizeof(path2), "capture2.kvt");
    test_open_errors();
    test_kvzip_scores();
    test_theta_and_scale();
    test_writer_ranges();
    test_rope_details();
    test_rope_decimal_comma();
    test_ordering();
    test_layouts();
    test_dtypes();
    test_backpressure();
    test_alloc_faults();
    test_write_failure(0);
    test_write_failure(2);
    unlink(path);
    unlink(path2);
    return kvt_test_result("test_capture_session");
}
