/* fuzz_capture_calls.c - libFuzzer entry point for the capture API as an engine drives it: the
 * input is a program of calls (kvt_capture_submit_kv, _submit_queries, _submit_decode,
 * _submit_decode_token, _set_tokens, _submit_kvzip, in any order, for any layer, token range and
 * step) on a small model, each with host views in one of several memory layouts (row-major,
 * token-major with a batch axis, a reversed axis, padded rows, a broadcast head axis) and dtypes
 * (f32, bf16, f16), or a view that is wrong (a head or dim too many, a batch of 2, an integer
 * dtype, no data). The entry point keeps its own account of what the session accepted, computed
 * from the logical values and not from the view's memory, and after kvt_capture_close checks the
 * capture's contract:
 *  - an accepted prompt range starts where that layer's last one ended and stays inside the
 *    prompt; an accepted decode step is the layer's next one;
 *  - close returns KVT_OK exactly when every layer's K, V and queries are complete (else
 *    KVT_ERR_STATE), and then the trace verifies without a problem;
 *  - the trace holds, for every layer, exactly the K and V tokens, window queries (and all
 *    queries, with_q_all) and decode steps accepted, each element the submitted value
 *    rounded to the trace's dtype; KVzip's scores, accepted once per layer and only when every
 *    one is in [0, 1], bit for bit;
 *  - a complete capture replays (snapkv, knorm, streamingllm; h2o with column sums or Q_all;
 *    the oracle with decode steps; kvzip when every layer has its scores).
 * A breach aborts. Runs over the checked-in corpus as the ctest fuzz_capture_calls_regression
 * through fuzz_driver.c.
 */
#define _GNU_SOURCE
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifdef KVT_FUZZ_CUDA
#include <cuda_runtime_api.h>
#endif

#include "dtype_bits.h"
#include "fuzz_util.h"
#include "kvt_capture.h"
#include "kvt_replay.h"
#include "kvt_trace.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

#define MAX_L   2
#define MAX_H   4
#define MAX_T   24
#define MAX_D   6
#define MAX_G   4
#define MAX_OPS 48

static char g_path[256];
static kvt_policy **g_pols[5]; /* replays of a complete capture: + h2o (column sums or Q_all),
                                  + oracle (decode steps); kvzip (every layer's scores) */
static size_t g_n_pol[5];
static kvt_budget *g_budgets;
static size_t g_n_budgets;

static void fail(const char *what)
{
    fprintf(stderr, "fuzz_capture_calls: %s\n", what);
    abort();
}

static uint64_t g_rng;

#ifdef KVT_FUZZ_CUDA
/* Built on cuemu (the ctest fuzz_capture_calls_cuemu): a session whose input says so gets device
 * views where a view's byte says so, on one of two streams or the legacy default stream; their
 * memory is freed after close (the session reads it on the view's stream after the call). */
static bool g_dev;
static cudaStream_t g_st[2];
static void *g_dmem[4 * MAX_OPS * 3];
static int g_n_dmem;

static void to_device(struct kvt_tensor_view *v, const uint8_t *buf, size_t bytes, unsigned pick)
{
    void *d = NULL;
    if (g_n_dmem == (int)(sizeof(g_dmem) / sizeof(g_dmem[0])) ||
        cudaMalloc(&d, bytes) != cudaSuccess || cudaMemcpy(d, buf, bytes, cudaMemcpyHostToDevice))
        fail("cuemu: no device memory for a view");
    g_dmem[g_n_dmem++] = d;
    v->data = (uint8_t *)d + ((const uint8_t *)v->data - buf);
    v->mem = KVT_MEM_CUDA;
    v->stream = pick % 3 == 2 ? NULL : g_st[pick % 3];
}
#endif

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    kvt_fuzz_scratch_path(g_path, sizeof(g_path), "capture");
    static const char *set[5] = {"snapkv:window=1,knorm,streamingllm:sinks=1",
                                 "snapkv:window=1,knorm,streamingllm:sinks=1,h2o:window=1",
                                 "snapkv:window=1,knorm,streamingllm:sinks=1,oracle",
                                 "snapkv:window=1,knorm,streamingllm:sinks=1,h2o:window=1,oracle",
                                 "kvzip,kvzip:layerwise=1,sinks=0,kvzip:uniform=1"};
    for (int i = 0; i < 5; i++)
        if (kvt_policy_list_parse(set[i], NULL, &g_pols[i], &g_n_pol[i]))
            abort();
    if (kvt_budgets_parse("1,50%", &g_budgets, &g_n_budgets))
        abort();
#ifdef KVT_FUZZ_CUDA
    for (int i = 0; i < 2; i++)
        if (cudaStreamCreate(&g_st[i]) != cudaSuccess)
            abort();
#endif
    return 0;
}

/* what the session accepted, as the trace must hold it (values rounded to the trace's dtype) */
typedef struct layer_acc {
    uint32_t kv_done, q_first, q_done, d_done;
    bool q_started;
    float k[MAX_H * MAX_T * MAX_D], v[MAX_H * MAX_T * MAX_D]; /* [Hkv, T, D] */
    float qw[MAX_H * MAX_T * MAX_D];                          /* [Hq, W, D] */
    float qa[MAX_H * MAX_T * MAX_D];                          /* [Hq, T, D] (with_q_all) */
    float qd[MAX_H * MAX_G * MAX_D], kd[MAX_H * MAX_G * MAX_D], vd[MAX_H * MAX_G * MAX_D];
    bool kz_done;
    float kz[MAX_H * MAX_T]; /* [Hkv, T] KVzip's scores */
} layer_acc;

typedef struct model_st {
    int L, Hq, Hkv, D;
    uint32_t T, W, G;
    kvt_dtype st; /* the trace's dtype */
    bool colsum, q_all;
    layer_acc ly[MAX_L];
} model_st;

/* A view of the logical [H, n, D] values x (f32) in source dtype dt and the input's layout;
 * mem receives the buffer (the caller frees it). The values x are rounded to dt in place, as
 * the view holds them. Returns false for a view meant to be refused. */
static bool make_view(kvt_fuzz_src *s, struct kvt_tensor_view *v, void **mem, float *x, int H,
                      int n, int D)
{
    static const kvt_dtype dts[3] = {KVT_DTYPE_F32, KVT_DTYPE_BF16, KVT_DTYPE_F16};
    const unsigned a = kvt_fuzz_take(s), b = kvt_fuzz_take(s);
    const kvt_dtype dt = dts[a % 3];
    const int layout = (int)(a / 3 % 6), bad = b < 232 ? 0 : 1 + (int)(b % 6);
    const size_t es = kvt_dtype_size(dt);
    const int pad = 3, Dp = D + pad;
    const size_t cap = (size_t)H * n * Dp + 8;
    uint8_t *buf = calloc(cap, es);
    *mem = buf;
    memset(v, 0, sizeof(*v));
    if (!buf)
        return false;
    if (layout == 5) /* a broadcast head axis: every head the values of head 0 */
        for (int h = 1; h < H; h++)
            memcpy(x + (size_t)h * n * D, x, (size_t)n * D * sizeof(float));
    for (size_t i = 0; i < (size_t)H * n * D; i++) /* as the view's dtype holds them */
        x[i] = kvt_bits_to_f32(kvt_bits_from_f32(x[i], dt), dt);
    int64_t sh = (int64_t)n * D, stt = D, sd = 1, origin = 0;
    switch (layout) {
    case 1: /* token-major [T, H, D] memory, with a batch axis */
        sh = D, stt = (int64_t)H * D;
        break;
    case 2: /* dim reversed */
        sd = -1, origin = D - 1;
        break;
    case 3: /* tokens reversed */
        stt = -D, origin = (int64_t)(n - 1) * D;
        break;
    case 4: /* padded rows */
        sh = (int64_t)n * Dp, stt = Dp;
        break;
    case 5: /* broadcast heads */
        sh = 0;
        break;
    }
    for (int h = 0; h < H; h++)
        for (int t = 0; t < n; t++)
            for (int d = 0; d < D; d++) {
                const int64_t off = origin + h * sh + t * stt + d * sd;
                const uint32_t bits = kvt_bits_from_f32(x[((size_t)h * n + t) * D + d], dt);
                memcpy(buf + off * (int64_t)es, &bits, es);
            }
    v->data = buf + origin * (int64_t)es;
    v->dtype = dt;
    v->mem = KVT_MEM_HOST;
    const int ax = layout == 1 ? 1 : 0;
    v->ndim = 3 + ax;
    if (ax)
        v->shape[0] = 1, v->stride[0] = (int64_t)H * n * D;
    v->shape[ax] = H, v->shape[ax + 1] = n, v->shape[ax + 2] = D;
    v->stride[ax] = sh, v->stride[ax + 1] = stt, v->stride[ax + 2] = sd;
#ifdef KVT_FUZZ_CUDA
    if (g_dev && b & 1 && v->data)
        to_device(v, buf, cap * es, b >> 1);
#endif
    switch (bad) {
    case 1:
        v->shape[ax]++;
        break;
    case 2:
        v->shape[ax + 2]++;
        break;
    case 3:
        v->ndim = 4, v->shape[0] = 2, v->stride[0] = 0, v->shape[1] = H, v->shape[2] = n,
        v->shape[3] = D, v->stride[1] = sh, v->stride[2] = stt, v->stride[3] = sd;
        break;
    case 4:
        v->dtype = KVT_DTYPE_I32;
        break;
    case 5:
        v->data = NULL;
        break;
    case 6:
        v->ndim = 5;
        break;
    }
    return bad == 0;
}

/* logical values [H, n, D] from the input's seed */
static void values(kvt_fuzz_src *s, float *x, int H, int n, int D)
{
    g_rng = 0x9E3779B97F4A7C15ull ^
            ((uint64_t)kvt_fuzz_take(s) << 24 | (uint64_t)H << 16 | (unsigned)n);
    for (size_t i = 0; i < (size_t)H * n * D; i++)
        x[i] = kvt_fuzz_rnd(&g_rng);
}

/* rows [t0, t0 + n) of dst [H, rows, D] from x [H, n, D], rounded to the trace's dtype */
static void keep(float *dst, int rows, const float *x, int H, int t0, int n, int D, kvt_dtype st)
{
    for (int h = 0; h < H; h++)
        for (int t = 0; t < n; t++)
            for (int d = 0; d < D; d++) {
                const float f = x[((size_t)h * n + t) * D + d];
                dst[((size_t)h * rows + t0 + t) * D + d] =
                    kvt_bits_to_f32(kvt_bits_from_f32(f, st), st);
            }
}

static uint32_t pick_tok(kvt_fuzz_src *s, uint32_t expected, uint32_t T)
{
    const unsigned b = kvt_fuzz_take(s);
    return b < 192 ? expected : b % (T + 2);
}

static void op_kv(kvt_fuzz_src *s, kvt_capture_session *ses, model_st *m, bool clean_all)
{
    const int l = clean_all ? 0 : (int)(kvt_fuzz_take(s) % (unsigned)(m->L + 1));
    for (int li = clean_all ? 0 : l; li < (clean_all ? m->L : l + 1); li++) {
        layer_acc *a = li < m->L ? &m->ly[li] : NULL;
        const uint32_t expect = a ? a->kv_done : 0;
        const uint32_t t0 = clean_all ? expect : pick_tok(s, expect, m->T);
        int n = clean_all ? (int)(m->T - expect) : 1 + (int)(kvt_fuzz_take(s) % m->T);
        if (n < 1)
            continue;
        float xk[MAX_H * (MAX_T + 1) * MAX_D], xv[MAX_H * (MAX_T + 1) * MAX_D];
        values(s, xk, m->Hkv, n, m->D);
        values(s, xv, m->Hkv, n, m->D);
        struct kvt_tensor_view vk, vv;
        void *bk, *bv;
        const bool ok_k = make_view(s, &vk, &bk, xk, m->Hkv, n, m->D);
        const bool ok_v = make_view(s, &vv, &bv, xv, m->Hkv, n, m->D);
        const kvt_status st = kvt_capture_submit_kv(ses, li, t0, &vk, &vv);
        if (st == KVT_OK) {
            if (!a || !ok_k || !ok_v || t0 != expect || t0 + (uint32_t)n > m->T)
                fail("submit_kv accepted a bad layer, view or token range");
            keep(a->k, (int)m->T, xk, m->Hkv, (int)t0, n, m->D, m->st);
            keep(a->v, (int)m->T, xv, m->Hkv, (int)t0, n, m->D, m->st);
            a->kv_done += (uint32_t)n;
        }
        free(bk), free(bv);
    }
}

static void op_queries(kvt_fuzz_src *s, kvt_capture_session *ses, model_st *m, bool clean_all)
{
    const int l = clean_all ? 0 : (int)(kvt_fuzz_take(s) % (unsigned)(m->L + 1));
    for (int li = clean_all ? 0 : l; li < (clean_all ? m->L : l + 1); li++) {
        layer_acc *a = li < m->L ? &m->ly[li] : NULL;
        const uint32_t expect = a && a->q_started ? a->q_done : 0;
        const uint32_t t0 = clean_all ? expect : pick_tok(s, expect, m->T);
        int n = clean_all ? (int)(m->T - expect) : 1 + (int)(kvt_fuzz_take(s) % m->T);
        if (n < 1)
            continue;
        float xq[MAX_H * (MAX_T + 1) * MAX_D];
        values(s, xq, m->Hq, n, m->D);
        struct kvt_tensor_view vq;
        void *bq;
        const bool ok = make_view(s, &vq, &bq, xq, m->Hq, n, m->D);
        const kvt_status st = kvt_capture_submit_queries(ses, li, t0, &vq);
        if (st == KVT_OK) {
            if (!a || !ok || (a->q_started && t0 != a->q_done) || t0 + (uint32_t)n > m->T ||
                (!a->q_started && t0 > m->T - m->W) ||
                ((m->colsum || m->q_all) && !a->q_started && t0 != 0) ||
                (m->colsum && a->kv_done < t0 + (uint32_t)n))
                fail("submit_queries accepted a bad layer, view or token range");
            if (!a->q_started)
                a->q_first = t0, a->q_started = true;
            const uint32_t w0 = m->T - m->W; /* the window's rows */
            for (int t = 0; t < n; t++)
                if (t0 + (uint32_t)t >= w0)
                    for (int h = 0; h < m->Hq; h++)
                        keep(a->qw, (int)m->W, xq + ((size_t)h * n + t) * m->D, 1,
                             (int)((uint32_t)h * m->W + t0 + (uint32_t)t - w0), 1, m->D, m->st);
            keep(a->qa, (int)m->T, xq, m->Hq, (int)t0, n, m->D, m->st);
            a->q_done = t0 + (uint32_t)n;
        }
        free(bq);
    }
}

static void op_decode(kvt_fuzz_src *s, kvt_capture_session *ses, model_st *m)
{
    const int l = (int)(kvt_fuzz_take(s) % (unsigned)(m->L + 1));
    layer_acc *a = l < m->L ? &m->ly[l] : NULL;
    const uint32_t step = pick_tok(s, a ? a->d_done : 0, m->G);
    const int n = 1 + (int)(kvt_fuzz_take(s) % 3);
    float xq[MAX_H * 3 * MAX_D], xk[MAX_H * 3 * MAX_D], xv[MAX_H * 3 * MAX_D];
    values(s, xq, m->Hq, n, m->D);
    values(s, xk, m->Hkv, n, m->D);
    values(s, xv, m->Hkv, n, m->D);
    struct kvt_tensor_view vq, vk, vv;
    void *bq, *bk, *bv;
    const bool ok_q = make_view(s, &vq, &bq, xq, m->Hq, n, m->D);
    const bool ok_k = make_view(s, &vk, &bk, xk, m->Hkv, n, m->D);
    const bool ok = make_view(s, &vv, &bv, xv, m->Hkv, n, m->D) && ok_q && ok_k;
    if (kvt_capture_submit_decode(ses, l, step, &vq, &vk, &vv) == KVT_OK) {
        if (!a || !ok || step != a->d_done || step + (uint32_t)n > m->G)
            fail("submit_decode accepted a bad layer, view or step");
        for (int i = 0; i < m->L; i++)
            if (m->ly[i].kv_done != m->T || !m->ly[i].q_started || m->ly[i].q_done != m->T)
                fail("submit_decode accepted a step before the prompt was complete");
        keep(a->qd, (int)m->G, xq, m->Hq, (int)step, n, m->D, m->st);
        keep(a->kd, (int)m->G, xk, m->Hkv, (int)step, n, m->D, m->st);
        keep(a->vd, (int)m->G, xv, m->Hkv, (int)step, n, m->D, m->st);
        a->d_done += (uint32_t)n;
    }
    free(bq), free(bk), free(bv);
}

/* KVzip's scores of one layer (or one past the last), each a probability, or one of them NaN,
 * negative or above 1: accepted exactly when the layer is real, has none yet and every score
 * is in [0, 1] */
static void op_kvzip(kvt_fuzz_src *s, kvt_capture_session *ses, model_st *m)
{
    const int l = (int)(kvt_fuzz_take(s) % (unsigned)(m->L + 1));
    const unsigned fault = kvt_fuzz_take(s) % 8;
    float x[MAX_H * MAX_T];
    const size_t n = (size_t)m->Hkv * m->T;
    for (size_t i = 0; i < n; i++)
        x[i] = (float)kvt_fuzz_take(s) / 255.0f;
    static const float bad[3] = {NAN, -1e-30f, 1.0000001f};
    if (fault < 3)
        x[kvt_fuzz_take(s) % n] = bad[fault];
    const kvt_status st = kvt_capture_submit_kvzip(ses, l, x);
    const bool ok = l < m->L && !m->ly[l].kz_done && fault >= 3;
    if ((st == KVT_OK) != ok)
        fail(ok ? "valid KVzip scores were refused" : "KVzip scores were accepted wrongly");
    if (ok) {
        m->ly[l].kz_done = true;
        memcpy(m->ly[l].kz, x, n * sizeof(float));
    }
}

static void op_tables(kvt_fuzz_src *s, kvt_capture_session *ses, model_st *m)
{
    const unsigned b = kvt_fuzz_take(s);
    int32_t ids[MAX_T], pos[3 * MAX_T];
    uint8_t mod[MAX_T];
    for (uint32_t t = 0; t < m->T; t++) {
        ids[t] = (int32_t)kvt_fuzz_take(s);
        mod[t] = (uint8_t)(b & 8 ? kvt_fuzz_take(s) % 5 : 0); /* 4: not a modality */
        pos[t] = pos[m->T + t] = pos[2 * m->T + t] = (int32_t)t;
    }
    const int rows = b & 16 ? 3 : b & 32 ? 2 : 1;
    kvt_capture_set_tokens(ses, b & 1 ? ids : NULL, b & 2 ? mod : NULL, b & 4 ? pos : NULL, rows);
}

/* the trace's (layer, kind) must be [H, n, D] of the trace's dtype holding want [H, rows, D]'s
 * first n rows; absent when n is 0 */
static void expect_tensor(kvt_trace_reader *r, int l, int kind, int H, uint32_t n, int rows, int D,
                          kvt_dtype st, const float *want)
{
    uint32_t h, t, d;
    kvt_dtype dt;
    const kvt_status s = kvt_trace_reader_shape(r, l, kind, &h, &t, &d, &dt);
    if (n == 0) {
        if (s != KVT_ERR_NOT_FOUND)
            fail("the trace holds a tensor nothing was accepted for");
        return;
    }
    if (s || h != (uint32_t)H || t != n || d != (uint32_t)D || dt != st)
        fail("a tensor's shape or dtype is not what was accepted");
    float got[MAX_H * MAX_T * MAX_D];
    if (kvt_trace_reader_read(r, l, kind, 0, (uint32_t)H, KVT_DTYPE_F32, got, sizeof(got)))
        fail("an accepted tensor does not read back");
    for (int hh = 0; hh < H; hh++)
        for (uint32_t tt = 0; tt < n; tt++)
            if (memcmp(got + ((size_t)hh * n + tt) * D, want + ((size_t)hh * rows + tt) * D,
                       (size_t)D * sizeof(float)))
                fail("a tensor's values are not those submitted, rounded to the trace's dtype");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    kvt_fuzz_src s = {data, size};
    static model_st m; /* large: not on the stack */
    memset(&m, 0, sizeof(m));
    m.L = 1 + (int)(kvt_fuzz_take(&s) % MAX_L);
    m.Hkv = 1 + (int)(kvt_fuzz_take(&s) % 2);
    m.Hq = m.Hkv * (1 + (int)(kvt_fuzz_take(&s) % 2));
    m.D = 1 + (int)(kvt_fuzz_take(&s) % MAX_D);
    m.T = 1 + kvt_fuzz_take(&s) % MAX_T;
    m.W = 1 + kvt_fuzz_take(&s) % m.T;
    m.G = kvt_fuzz_take(&s) % (MAX_G + 1);
    static const kvt_dtype dts[3] = {KVT_DTYPE_F32, KVT_DTYPE_BF16, KVT_DTYPE_F16};
    m.st = dts[kvt_fuzz_take(&s) % 3];
    const unsigned fl = kvt_fuzz_take(&s);
    m.colsum = fl & 1, m.q_all = fl & 2;
    struct kvt_capture_model md = {.name = "fuzz",
                                   .arch = "llama",
                                   .n_layers = m.L,
                                   .n_q_heads = m.Hq,
                                   .n_kv_heads = m.Hkv,
                                   .head_dim = m.D,
                                   .kv_dtype = m.st,
                                   .rope = KVT_ROPE_DEFAULT,
                                   .rope_theta = 10000.0};
    struct kvt_capture_opts o = {.n_tokens = m.T,
                                 .window = m.W,
                                 .n_decode = m.G,
                                 .decode_chunk = fl >> 2 & 3,
                                 .with_colsum = m.colsum,
                                 .with_q_all = m.q_all};
    o.writer.force = true;
    o.writer.level = 1;
    o.writer.n_threads = fl & 16 ? 1 : 0;
    o.writer.max_record_bytes = fl & 32 ? 64 : 0; /* records cut along heads and tokens */
#ifdef KVT_FUZZ_CUDA
    g_dev = fl & 64;
    if (g_dev) { /* a ring of 2 or 8 slots, not the default 256 MiB */
        o.writer.max_record_bytes = fl & 32 ? 64 : 4096;
        o.device_ring_bytes = (fl & 128 ? 8 : 2) * o.writer.max_record_bytes;
    }
#endif
    kvt_capture_session *ses;
    if (kvt_capture_open(g_path, &md, &o, &ses))
        fail("a valid model and options were refused");
    for (int i = 0; i < MAX_OPS && s.n; i++) {
        switch (kvt_fuzz_take(&s) % 8) {
        case 0:
        case 1:
            op_kv(&s, ses, &m, false);
            break;
        case 2:
        case 3:
            op_queries(&s, ses, &m, false);
            break;
        case 4:
            op_decode(&s, ses, &m);
            break;
        case 5:
            kvt_capture_submit_decode_token(ses, kvt_fuzz_take(&s) % (m.G + 2),
                                            (int32_t)kvt_fuzz_take(&s));
            break;
        case 6: /* the tables, or a quarter of the time KVzip's scores */
            if (s.n && (s.p[0] & 0xC0) == 0xC0)
                op_kvzip(&s, ses, &m);
            else
                op_tables(&s, ses, &m);
            break;
        case 7: /* the rest of the prompt, in order, clean */
            op_kv(&s, ses, &m, true);
            op_queries(&s, ses, &m, true);
            break;
        }
    }
    bool complete = true;
    for (int l = 0; l < m.L; l++)
        complete &= m.ly[l].kv_done == m.T && m.ly[l].q_started && m.ly[l].q_done == m.T;
    const kvt_status cs = kvt_capture_close(ses, NULL);
#ifdef KVT_FUZZ_CUDA
    if (cudaDeviceSynchronize() != cudaSuccess)
        fail("cuemu: the device failed");
    while (g_n_dmem > 0)
        cudaFree(g_dmem[--g_n_dmem]);
#endif
    if (cs != (complete ? KVT_OK : KVT_ERR_STATE))
        fail(complete ? "close of a complete prompt failed"
                      : "close of an incomplete prompt "
                        "did not say so");
    /* an incomplete capture leaves its records in the file it wrote (no trace existed before) */
    kvt_verify_report rep;
    if (kvt_trace_verify(g_path, &rep))
        fail("the closed trace cannot be verified");
    const bool clean =
        rep.header_ok && rep.trailer_ok && rep.index_ok && !rep.n_records_bad && !rep.n_problems;
    kvt_verify_report_free(&rep);
    if (complete && !clean)
        fail("a complete capture's trace has problems");
    kvt_trace_reader *r;
    if (kvt_trace_reader_open(g_path, &r))
        fail("the closed trace cannot be opened");
    for (int l = 0; l < m.L; l++) {
        const layer_acc *a = &m.ly[l];
        const int T = (int)m.T, W = (int)m.W, G = (int)m.G;
        expect_tensor(r, l, KVT_KIND_K, m.Hkv, a->kv_done, T, m.D, m.st, a->k);
        expect_tensor(r, l, KVT_KIND_V, m.Hkv, a->kv_done, T, m.D, m.st, a->v);
        const uint32_t w0 = m.T - m.W;
        const uint32_t nw = a->q_started && a->q_done > w0 ? a->q_done - w0 : 0;
        expect_tensor(r, l, KVT_KIND_Q_WINDOW, m.Hq, nw, W, m.D, m.st, a->qw);
        expect_tensor(r, l, KVT_KIND_Q_ALL, m.Hq, m.q_all && a->q_started ? a->q_done : 0, T, m.D,
                      m.st, a->qa);
        expect_tensor(r, l, KVT_KIND_Q_DECODE, m.Hq, a->d_done, G, m.D, m.st, a->qd);
        expect_tensor(r, l, KVT_KIND_K_DECODE, m.Hkv, a->d_done, G, m.D, m.st, a->kd);
        expect_tensor(r, l, KVT_KIND_V_DECODE, m.Hkv, a->d_done, G, m.D, m.st, a->vd);
        expect_tensor(r, l, KVT_KIND_KVZIP_SCORE, m.Hkv, a->kz_done ? m.T : 0, T, 1, KVT_DTYPE_F32,
                      a->kz);
    }
    kvt_trace_reader_close(r);
    if (complete) { /* what a capture finished whole must replay */
        bool dec = m.ly[0].d_done > 0;
        for (int l = 1; l < m.L; l++)
            dec &= m.ly[l].d_done == m.ly[0].d_done;
        const int pi = (m.colsum || m.q_all ? 1 : 0) + (dec ? 2 : 0);
        kvt_replay_opts ro = {.n_threads = 1, .coverage_probes = 4};
        kvt_trace_result *res;
        if (kvt_replay_trace(g_path, g_pols[pi], g_n_pol[pi], g_budgets, g_n_budgets, &ro, &res)) {
            fprintf(stderr, "fuzz_capture_calls: replay: %s\n", kvt_error_msg());
            fail("a complete capture does not replay");
        }
        kvt_trace_result_free(res);
        bool kz = true;
        for (int l = 0; l < m.L; l++)
            kz &= m.ly[l].kz_done;
        if (kz &&
            kvt_replay_trace(g_path, g_pols[4], g_n_pol[4], g_budgets, g_n_budgets, &ro, &res)) {
            fprintf(stderr, "fuzz_capture_calls: kvzip replay: %s\n", kvt_error_msg());
            fail("a complete capture with every layer's KVzip scores does not replay kvzip");
        }
        if (kz)
            kvt_trace_result_free(res);
    }
    kvt_error_clear();
    unlink(g_path);
    return 0;
}
