/* test_capture_device_gpu.c - the device path of the capture API (label gpu; "not run" without a
 * CUDA device). The same tensors are captured twice, once as host views and once as device views
 * with the same strides, and the two traces must hold the same records:
 *   - K, V, Q_window, Q_all and the decode kinds bit for bit, for engine dtypes f32, bf16 and
 *     f16 stored as bf16, f16 or f32 (the GPU converts exactly as common/dtype.c does), through
 *     [T, H, D] and [H, T, D] memory layouts, ubatched K/V and query ranges;
 *   - ATTN_COLSUM (GPU column sums vs the host reference) within KVT_COLSUM_RTOL;
 * with records small enough to be cut in parts and a ring of a few slots, so that submissions
 * wait for free slots (backpressure) and slots are reused. After each device submission the
 * source memory is overwritten on the producer stream: the trace must still hold what was
 * submitted (the capture reads the engine's memory only before the engine's next work).
 * Two cases hand K, V and Q on three streams, two rotate every submission over four streams
 * (parts of a layer, layers, decode chunks), the keys' and values' streams kept busy (a large
 * memset, KVT_TEST_DELAY_BYTES, default 1 GiB) before each submission: the column sums and
 * the decode chunks' copies must still see what the other streams gathered, and a buffer must
 * not be refilled on one stream while another still reads it. On the CPU stand-in these
 * cases fail only with deferred streams (CUEMU_DEFER=1, test_capture_device_cuemu_defer).
 */
#include <cuda_runtime_api.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "kvt_capture.h"
#include "kvt_test.h"

/* decode steps GG: one full chunk of 64 and a partial one; KVT_COLSUM_RTOL: GPU vs host
 * column sums (colsum_cuda.h: <= ~6e-7 before the f32 output rounding) */
#define NL              2
#define HQ              4
#define HKV             2
#define DD              80
#define TT              150
#define WW              16
#define GG              70
#define KVT_COLSUM_RTOL 1e-5

#define CU_OK(call)                                                                                \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) {                                                                   \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

static float value(uint64_t seed, size_t i)
{
    uint64_t x = seed * 0x9e3779b97f4a7c15ull + i * 0xbf58476d1ce4e5b9ull;
    x ^= x >> 31;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 29;
    return (float)((double)(x >> 11) / 9007199254740992.0 * 4.0 - 2.0);
}

/* An engine tensor of h heads and t tokens, [T, H, D] (token-major) or [H, T, D] memory, in
 * dtype dt, on the host and a device copy. */
typedef struct etensor {
    void *host, *dev;
    size_t bytes;
    kvt_dtype dt;
    int64_t h, t;
    bool token_major;
    int device; /* the CUDA device current when it was made */
} etensor;

static void et_make(etensor *e, uint64_t seed, kvt_dtype dt, int64_t h, int64_t t, bool tm)
{
    e->dt = dt;
    e->h = h;
    e->t = t;
    e->token_major = tm;
    size_t n = (size_t)(h * t * DD), es = kvt_dtype_size(dt);
    e->bytes = n * es;
    e->host = malloc(e->bytes);
    for (size_t i = 0; i < n; i++) {
        float f = value(seed, i);
        if (dt == KVT_DTYPE_F32)
            memcpy((char *)e->host + 4 * i, &f, 4);
        else {
            uint16_t b = dt == KVT_DTYPE_BF16 ? kvt_f32_to_bf16(f) : kvt_f32_to_f16(f);
            memcpy((char *)e->host + 2 * i, &b, 2);
        }
    }
    CU_OK(cudaGetDevice(&e->device));
    CU_OK(cudaMalloc(&e->dev, e->bytes));
    CU_OK(cudaMemcpy(e->dev, e->host, e->bytes, cudaMemcpyHostToDevice));
}

static void et_free(etensor *e)
{
    free(e->host);
    cudaFree(e->dev);
}

/* View of tokens [t0, t0 + nt) of e, on the host or the device. */
static struct kvt_tensor_view et_view(const etensor *e, int64_t t0, int64_t nt, bool dev,
                                      cudaStream_t st)
{
    struct kvt_tensor_view v;
    memset(&v, 0, sizeof(v));
    size_t es = kvt_dtype_size(e->dt);
    int64_t sh = e->token_major ? DD : e->t * DD, stt = e->token_major ? e->h * DD : DD;
    v.data = (const char *)(dev ? e->dev : e->host) + (size_t)(t0 * stt) * es;
    v.dtype = e->dt;
    v.ndim = 4;
    v.shape[0] = 1;
    v.shape[1] = e->h;
    v.shape[2] = nt;
    v.shape[3] = DD;
    v.stride[0] = e->h * e->t * DD;
    v.stride[1] = sh;
    v.stride[2] = stt;
    v.stride[3] = 1;
    v.mem = dev ? KVT_MEM_CUDA : KVT_MEM_HOST;
    v.device_idx = dev ? e->device : 0;
    v.stream = dev ? (void *)st : NULL;
    return v;
}

/* The engine reuses its memory: clobber the device copy on the producer stream. */
static void clobber(const etensor *e, cudaStream_t st)
{
    CU_OK(cudaMemsetAsync(e->dev, 0x7f, e->bytes, st));
}

/* a device buffer the streams' delays write, and its size */
static void *g_delay;
static size_t g_delay_bytes;

/* Keep stream st busy for a while (a large memset) before the work that follows on it. */
static void delay(cudaStream_t st)
{
    CU_OK(cudaMemsetAsync(g_delay, 0x55, g_delay_bytes, st));
}

typedef struct engine {
    etensor k[NL], v[NL], q[NL];    /* prompt: K/V [Hkv, T], Q [Hq, T] */
    etensor dq[NL], dk[NL], dv[NL]; /* decode: [H, G] */
} engine;

/* SPLIT: layer l's tensors on device l and its stream there (a model split over two GPUs) */
enum { ONE, THREE, ROT, SPLIT };

/* the prompt tensors only (K, V, Q in bf16, [H, T, D]), from seed */
static void prompt_engine(engine *en, uint64_t seed)
{
    for (int l = 0; l < NL; l++) {
        et_make(&en->k[l], seed + 10 * l, KVT_DTYPE_BF16, HKV, TT, false);
        et_make(&en->v[l], seed + 1 + 10 * l, KVT_DTYPE_BF16, HKV, TT, false);
        et_make(&en->q[l], seed + 2 + 10 * l, KVT_DTYPE_BF16, HQ, TT, false);
    }
}

/* The stream of a submission: what (0 K, 1 V, 2 queries), r = layer + part (prompt) or decode
 * chunk + layer. */
static cudaStream_t pick(const cudaStream_t *S, int mode, int what, int r, int layer)
{
    return mode == SPLIT   ? S[layer]
           : mode == ONE   ? S[0]
           : mode == THREE ? S[what]
                           : S[(r + what) % 4];
}

static bool g_reserve; /* device captures reserve their ring ahead (kvt_capture_reserve_device) */

/* the test model, storing `stored` */
static struct kvt_capture_model test_model(kvt_dtype stored)
{
    struct kvt_capture_model m = {.name = "gpu-test",
                                  .arch = "llama",
                                  .n_layers = NL,
                                  .n_q_heads = HQ,
                                  .n_kv_heads = HKV,
                                  .head_dim = DD,
                                  .kv_dtype = stored,
                                  .rope = KVT_ROPE_DEFAULT,
                                  .rope_theta = 10000.0,
                                  .engine_name = "test",
                                  .engine_version = "0"};
    return m;
}

static void capture(const char *path, engine *en, bool dev, kvt_dtype stored, uint64_t ring,
                    int mode, struct kvt_capture_stats *stats)
{
    struct kvt_capture_model m = test_model(stored);
    struct kvt_capture_opts o = {
        .n_tokens = TT,
        .window = WW,
        .n_decode = GG,
        .with_colsum = true,
        .with_q_all = true,
        .writer = {.n_threads = 2, .max_record_bytes = 6000, .force = true},
        .device_ring_bytes = 4 * 6000};
    if (ring)
        o.device_ring_bytes = ring;
    /* streams: ONE for everything; THREE: K on S[0], V on S[1], queries on S[2]; ROT: each
       submission on another of four streams (parts of one layer, layers, decode chunks), so
       that every buffer a stream fills is read or refilled from another one */
    cudaStream_t S[4];
    int n_st = mode == ONE ? 1 : mode == THREE ? 3 : mode == SPLIT ? NL : 4;
    for (int i = 0; i < n_st; i++) {
        CU_OK(cudaSetDevice(mode == SPLIT ? i : 0));
        CU_OK(cudaStreamCreate(&S[i]));
    }
    CU_OK(cudaSetDevice(0));
    bool delays = mode != ONE && mode != SPLIT && dev;
    kvt_capture_session *s;
    if (dev && g_reserve) {
        KVT_CHECK(kvt_capture_reserve_device(0, o.device_ring_bytes, o.writer.max_record_bytes));
        KVT_EXPECT(kvt_capture_device_reserved_bytes() > 0);
    }
    KVT_CHECK(kvt_capture_open(path, &m, &o, &s));
    for (int l = 0; l < NL; l++) {
        /* K/V in two ubatches, queries in two ranges */
        int64_t cut = 61;
        for (int part = 0; part < 2; part++) {
            int64_t t0 = part ? cut : 0, nt = part ? TT - cut : cut;
            cudaStream_t sk = pick(S, mode, 0, l + part, l), sv = pick(S, mode, 1, l + part, l);
            if (delays)
                delay(sk);
            struct kvt_tensor_view kv = et_view(&en->k[l], t0, nt, dev, sk);
            struct kvt_tensor_view vv = et_view(&en->v[l], t0, nt, dev, sv);
            KVT_CHECK(kvt_capture_submit_kv(s, l, (uint32_t)t0, &kv, &vv));
        }
        for (int part = 0; part < 2; part++) {
            int64_t t0 = part ? 100 : 0, nt = part ? TT - 100 : 100;
            struct kvt_tensor_view qv =
                et_view(&en->q[l], t0, nt, dev, pick(S, mode, 2, l + part, l));
            KVT_CHECK(kvt_capture_submit_queries(s, l, (uint32_t)t0, &qv));
        }
    }
    if (dev && mode != ROT) /* (ROT: a tensor's parts went on several streams) */
        for (int l = 0; l < NL; l++) {
            clobber(&en->k[l], pick(S, mode, 0, 0, l));
            clobber(&en->v[l], pick(S, mode, 1, 0, l));
            clobber(&en->q[l], pick(S, mode, 2, 0, l));
        }
    for (int64_t g = 0; g < GG; g += 10) {
        int64_t n = GG - g < 10 ? GG - g : 10;
        for (int l = 0; l < NL; l++) {
            int r = (int)(g / 10) + l;
            cudaStream_t sq = pick(S, mode, 2, r, l), sk = pick(S, mode, 0, r, l),
                         sv = pick(S, mode, 1, r, l);
            if (delays) {
                delay(sk);
                delay(sv);
            }
            struct kvt_tensor_view qv = et_view(&en->dq[l], g, n, dev, sq);
            struct kvt_tensor_view kv = et_view(&en->dk[l], g, n, dev, sk);
            struct kvt_tensor_view vv = et_view(&en->dv[l], g, n, dev, sv);
            KVT_CHECK(kvt_capture_submit_decode(s, l, (uint32_t)g, &qv, &kv, &vv));
        }
    }
    if (dev) /* the capture's own copy stream exists once a device tensor was submitted */
        KVT_EXPECT(kvt_capture_device_stream(s) != NULL);
    else
        KVT_EXPECT(kvt_capture_device_stream(s) == NULL);
    KVT_CHECK(kvt_capture_sync_device(s));
    if (dev && g_reserve) /* the session took the reserved ring */
        KVT_EXPECT_EQ_U64(kvt_capture_device_reserved_bytes(), 0);
    KVT_CHECK(kvt_capture_close(s, stats));
    CU_OK(cudaDeviceSynchronize());
    for (int i = 0; i < n_st; i++)
        CU_OK(cudaStreamDestroy(S[i]));
}

static void compare(const char *a, const char *b, const char *what)
{
    static const int kinds[] = {KVT_KIND_K,        KVT_KIND_V,          KVT_KIND_Q_WINDOW,
                                KVT_KIND_Q_ALL,    KVT_KIND_Q_DECODE,   KVT_KIND_K_DECODE,
                                KVT_KIND_V_DECODE, KVT_KIND_ATTN_COLSUM};
    kvt_trace_reader *ra, *rb;
    KVT_CHECK(kvt_trace_reader_open(a, &ra));
    KVT_CHECK(kvt_trace_reader_open(b, &rb));
    for (int l = 0; l < NL; l++) {
        for (size_t k = 0; k < sizeof(kinds) / sizeof(kinds[0]); k++) {
            uint32_t ha, ta, da, hb, tb, db;
            kvt_dtype dta, dtb;
            KVT_CHECK(kvt_trace_reader_shape(ra, l, kinds[k], &ha, &ta, &da, &dta));
            KVT_CHECK(kvt_trace_reader_shape(rb, l, kinds[k], &hb, &tb, &db, &dtb));
            KVT_EXPECT_MSG(ha == hb && ta == tb && da == db && dta == dtb, "%s: %s shape", what,
                           kvt_kind_name(kinds[k]));
            size_t n = (size_t)ha * ta * da, es = kvt_dtype_size(dta);
            uint8_t *xa = malloc(n * es), *xb = malloc(n * es);
            KVT_CHECK(kvt_trace_reader_read(ra, l, kinds[k], 0, ha, KVT_DTYPE_INVALID, xa, n * es));
            KVT_CHECK(kvt_trace_reader_read(rb, l, kinds[k], 0, hb, KVT_DTYPE_INVALID, xb, n * es));
            if (kinds[k] == KVT_KIND_ATTN_COLSUM) {
                const float *fa = (const float *)xa, *fb = (const float *)xb;
                double worst = 0;
                for (size_t i = 0; i < n; i++) {
                    double e = fabs((double)fa[i] - fb[i]) / (1.0 + fabs((double)fa[i]));
                    if (!(e <= worst))
                        worst = e; /* NaN sticks */
                }
                KVT_EXPECT_MSG(worst <= KVT_COLSUM_RTOL, "%s: layer %d colsum err %.3g", what, l,
                               worst);
                printf("  %s: layer %d colsum max rel err %.3g\n", what, l, worst);
            } else {
                KVT_EXPECT_MSG(memcmp(xa, xb, n * es) == 0, "%s: layer %d %s differs", what, l,
                               kvt_kind_name(kinds[k]));
            }
            free(xa);
            free(xb);
        }
    }
    kvt_trace_reader_close(ra);
    kvt_trace_reader_close(rb);
}

/* The trace's meta_json text (the last one), into buf. */
static void read_meta(const char *path, char *buf, size_t cap)
{
    kvt_trace_reader *r;
    buf[0] = '\0';
    KVT_CHECK(kvt_trace_reader_open(path, &r));
    for (size_t i = 0; i < kvt_trace_reader_n_records(r); i++) {
        kvt_record_info in;
        KVT_CHECK(kvt_trace_reader_record(r, i, &in));
        if (in.kind == KVT_KIND_META_JSON && in.raw_bytes < cap) {
            KVT_CHECK(kvt_trace_reader_read_record(r, i, buf, cap - 1));
            buf[in.raw_bytes] = '\0';
        }
    }
    kvt_trace_reader_close(r);
}

static void run_case(kvt_dtype engine_dt, kvt_dtype stored, bool token_major, uint64_t ring,
                     int mode)
{
    engine en;
    uint64_t seed = (uint64_t)engine_dt * 101 + (uint64_t)stored * 7 + token_major;
    for (int l = 0; l < NL; l++) {
        CU_OK(cudaSetDevice(mode == SPLIT ? l : 0));
        et_make(&en.k[l], seed + 10 * l + 1, engine_dt, HKV, TT, token_major);
        et_make(&en.v[l], seed + 10 * l + 2, engine_dt, HKV, TT, token_major);
        et_make(&en.q[l], seed + 10 * l + 3, engine_dt, HQ, TT, token_major);
        et_make(&en.dq[l], seed + 10 * l + 4, engine_dt, HQ, GG, token_major);
        et_make(&en.dk[l], seed + 10 * l + 5, engine_dt, HKV, GG, token_major);
        et_make(&en.dv[l], seed + 10 * l + 6, engine_dt, HKV, GG, token_major);
    }
    CU_OK(cudaSetDevice(0));
    char pa[256], pb[256], what[128];
    snprintf(what, sizeof(what), "%s->%s %s ring %llu%s", kvt_dtype_name(engine_dt),
             kvt_dtype_name(stored), token_major ? "[T,H,D]" : "[H,T,D]", (unsigned long long)ring,
             mode == THREE   ? ", K/V/Q on three streams"
             : mode == ROT   ? ", streams rotated"
             : mode == SPLIT ? ", layers on two devices"
                             : "");
    struct kvt_capture_stats sh, sd;
    capture(kvt_test_tmp(pa, sizeof(pa), "host.kvt"), &en, false, stored, ring, mode, &sh);
    capture(kvt_test_tmp(pb, sizeof(pb), "dev.kvt"), &en, true, stored, ring, mode, &sd);
    KVT_EXPECT_EQ_U64(sd.bytes_submitted, sh.bytes_submitted);
    KVT_EXPECT(sd.device_d2h_bytes > 0 && sd.device_slots >= 2);
    /* split: the second device's layer went through host memory, nothing else did */
    KVT_EXPECT((sd.other_device_bytes > 0) == (mode == SPLIT) && sh.other_device_bytes == 0);
    KVT_EXPECT(sd.device_peak_slots <= sd.device_slots);
    /* pinned: four host slots per device slot (lent to the writer until compressed) */
    KVT_EXPECT_EQ_U64(sd.pinned_bytes, 4ull * sd.device_slots * 6000);
    KVT_EXPECT(sd.device_bytes >= (uint64_t)sd.device_slots * 6000);
    KVT_EXPECT_EQ_U64(sh.device_d2h_bytes, 0);
    printf("%s: %llu bytes via the ring, %u slots (peak %u in flight), stall %.3f ms, device "
           "%.1f MiB, pinned %.1f MiB\n",
           what, (unsigned long long)sd.device_d2h_bytes, sd.device_slots, sd.device_peak_slots,
           sd.device_stall_ns / 1e6, sd.device_bytes / 1048576.0, sd.pinned_bytes / 1048576.0);
    compare(pa, pb, what);
    /* the device path's statistics are in the trace (capture_stats.device), the host's not */
    char meta[4096], want[128];
    read_meta(pb, meta, sizeof(meta));
    snprintf(want, sizeof(want), "\"device\":{\"cuda_device\":0,\"d2h_bytes\":%llu,",
             (unsigned long long)sd.device_d2h_bytes);
    KVT_EXPECT_MSG(strstr(meta, want) != NULL, "%s: meta_json %s", what, meta);
    read_meta(pa, meta, sizeof(meta));
    KVT_EXPECT_MSG(meta[0] != 0, "%s: the host trace has no meta_json", what);
    KVT_EXPECT_MSG(strstr(meta, "\"device\":{") == NULL, "%s: host meta_json %s", what, meta);
    kvt_verify_report rep;
    KVT_CHECK(kvt_trace_verify(pb, &rep));
    KVT_EXPECT_MSG(rep.n_problems == 0, "%s: verify found %zu problems", what, rep.n_problems);
    kvt_verify_report_free(&rep);
    unlink(pa);
    unlink(pb);
    for (int l = 0; l < NL; l++) {
        et_free(&en.k[l]);
        et_free(&en.v[l]);
        et_free(&en.q[l]);
        et_free(&en.dq[l]);
        et_free(&en.dk[l]);
        et_free(&en.dv[l]);
    }
}

/* kvt_capture_reserve_device: the size a session would allocate; the same size kept, another
 * replacing it; released; a device that does not exist refused. (A session taking it: run_case
 * with g_reserve.) */
static void reserve(void)
{
    KVT_EXPECT_EQ_U64(kvt_capture_device_reserved_bytes(), 0);
    kvt_capture_release_device_reserve(); /* none held: nothing happens */
    KVT_CHECK(kvt_capture_reserve_device(0, 4 * 6000, 6000));
    KVT_EXPECT_EQ_U64(kvt_capture_device_reserved_bytes(), 4 * 6000);
    KVT_CHECK(kvt_capture_reserve_device(0, 4 * 6000 + 100, 6000)); /* the same 4 slots */
    KVT_EXPECT_EQ_U64(kvt_capture_device_reserved_bytes(), 4 * 6000);
    KVT_CHECK(kvt_capture_reserve_device(0, 1ull << 20, 6000));
    KVT_EXPECT_EQ_U64(kvt_capture_device_reserved_bytes(), (1048576 / 6000) * 6000);
    KVT_CHECK(kvt_capture_reserve_device(0, 0, 0)); /* the defaults: 64 slots of 4 MiB */
    KVT_EXPECT_EQ_U64(kvt_capture_device_reserved_bytes(), 256ull << 20);
    kvt_capture_release_device_reserve();
    KVT_EXPECT_EQ_U64(kvt_capture_device_reserved_bytes(), 0);
    KVT_EXPECT_STATUS(kvt_capture_reserve_device(4096, 0, 6000), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_EQ_U64(kvt_capture_device_reserved_bytes(), 0);
}

/* A device capture of the prompt; the first failing call's status (the session stops there). */
static kvt_status capture_dev_status(const char *path, engine *en, cudaStream_t st)
{
    struct kvt_capture_model m = test_model(KVT_DTYPE_BF16);
    struct kvt_capture_opts o = {
        .n_tokens = TT,
        .window = WW,
        .with_q_all = true,
        .writer = {.n_threads = 2, .max_record_bytes = 6000, .force = true},
        .device_ring_bytes = 4 * 6000};
    kvt_capture_session *s;
    kvt_status r = kvt_capture_open(path, &m, &o, &s);
    if (r != KVT_OK)
        return r;
    for (int l = 0; l < NL && r == KVT_OK; l++) {
        struct kvt_tensor_view kv = et_view(&en->k[l], 0, TT, true, st);
        struct kvt_tensor_view vv = et_view(&en->v[l], 0, TT, true, st);
        struct kvt_tensor_view qv = et_view(&en->q[l], 0, TT, true, st);
        r = kvt_capture_submit_kv(s, l, 0, &kv, &vv);
        if (r == KVT_OK)
            r = kvt_capture_submit_queries(s, l, 0, &qv);
    }
    kvt_status c = kvt_capture_close(s, NULL);
    return r != KVT_OK ? r : c;
}

/* A trace a failure cut short (at: where, for the messages): when the file is there, it
 * verifies without a bad record. 1 when it holds records. */
static int partial_ok(const char *p, const char *what, long at)
{
    if (access(p, F_OK) != 0)
        return 0;
    kvt_verify_report rep;
    KVT_CHECK(kvt_trace_verify(p, &rep));
    KVT_EXPECT_MSG(rep.header_ok && rep.n_records_bad == 0, "%s %ld: %zu bad records", what, at,
                   rep.n_records_bad);
    const int has = rep.n_records_ok > 0;
    kvt_verify_report_free(&rep);
    return has;
}

/* A full disk (RLIMIT_FSIZE) at many offsets while the device ring's slots are lent to the
 * compression threads: an error comes back, nothing hangs or leaks (every lent slot is handed
 * back before the ring is freed), and the file keeps every complete record, readable. */
static void write_failure(void)
{
    engine en;
    prompt_engine(&en, 900);
    cudaStream_t st;
    CU_OK(cudaStreamCreate(&st));
    char p[256];
    kvt_test_tmp(p, sizeof(p), "dev_full.kvt");
    KVT_CHECK(capture_dev_status(p, &en, st));
    FILE *f = fopen(p, "rb");
    KVT_EXPECT(f != NULL);
    long full = 0;
    if (f) {
        fseek(f, 0, SEEK_END);
        full = ftell(f);
        fclose(f);
    }
    struct rlimit old, rl;
    getrlimit(RLIMIT_FSIZE, &old);
    signal(SIGXFSZ, SIG_IGN);
    int cases = 0, recovered = 0;
    for (long lim = 200; lim < full; lim += full / 23 + 1) {
        unlink(p);
        rl = old;
        rl.rlim_cur = (rlim_t)lim;
        setrlimit(RLIMIT_FSIZE, &rl);
        kvt_status r = capture_dev_status(p, &en, st);
        setrlimit(RLIMIT_FSIZE, &old);
        cases++;
        KVT_EXPECT_MSG(r == KVT_ERR_IO, "limit %ld: got %s (%s)", lim, kvt_status_str(r),
                       kvt_error_msg());
        recovered += partial_ok(p, "limit", lim); /* no file: the header did not fit */
    }
    printf("device capture, disk full: %d limits tried, %d partial traces with records\n", cases,
           recovered);
    KVT_EXPECT(cases > 10 && recovered > 5);
    unlink(p);
    CU_OK(cudaStreamDestroy(st));
    for (int l = 0; l < NL; l++) {
        et_free(&en.k[l]);
        et_free(&en.v[l]);
        et_free(&en.q[l]);
    }
}

/* Records of the tensors of trace a (layers 0..NL-1) that differ from the same rectangle of
 * trace b (each record's decoded elements as stored); *n: a's records compared. */
static int records_differ(const char *a, const char *b, int *n)
{
    kvt_trace_reader *ra, *rb;
    KVT_CHECK(kvt_trace_reader_open(a, &ra));
    KVT_CHECK(kvt_trace_reader_open(b, &rb));
    int bad = 0;
    *n = 0;
    for (size_t i = 0; i < kvt_trace_reader_n_records(ra); i++) {
        kvt_record_info ri;
        KVT_CHECK(kvt_trace_reader_record(ra, i, &ri));
        if (ri.layer < 0)
            continue; /* tables and metadata */
        uint32_t h, t, d;
        kvt_dtype dt;
        KVT_CHECK(kvt_trace_reader_shape(rb, ri.layer, ri.kind, &h, &t, &d, &dt));
        const size_t es = kvt_dtype_size(ri.dtype), nh = ri.head_end - ri.head_begin;
        const size_t nt = ri.tok_end - ri.tok_begin, row = nt * ri.dim * es;
        uint8_t *x = malloc(nh * row), *y = malloc((size_t)h * t * d * es);
        KVT_CHECK(kvt_trace_reader_read_record(ra, i, x, nh * row));
        KVT_CHECK(kvt_trace_reader_read(rb, ri.layer, ri.kind, 0, h, KVT_DTYPE_INVALID, y,
                                        (size_t)h * t * d * es));
        bool same = dt == ri.dtype && d == ri.dim && ri.head_end <= h && ri.tok_end <= t;
        for (size_t j = 0; same && j < nh; j++)
            same = !memcmp(x + j * row,
                           y + (((ri.head_begin + j) * (size_t)t + ri.tok_begin) * d) * es, row);
        bad += !same;
        (*n)++;
        free(x);
        free(y);
    }
    kvt_trace_reader_close(ra);
    kvt_trace_reader_close(rb);
    return bad;
}

/* A kernel that faults during the capture (the capture's own, or the engine's: the same to a
 * sticky error), at every kernel launch of a session in turn: the session's calls and its close
 * return an error (KVT_ERR_CUDA) without hanging, and the file keeps every complete record,
 * readable, each holding what the engine submitted (none written from work the fault stopped:
 * compared with a capture without a fault). Only on cuemu, whose CUEMU_FAIL_LAUNCH makes the N-th
 * launch from its setting fault; the device is reset after each (which a real GPU's fault needs
 * too). */
static void gpu_fault(void)
{
    struct cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess || strncmp(prop.name, "cuemu", 5)) {
        printf("device capture, GPU fault: not run (cuemu only)\n");
        return;
    }
    char p[256], clean[256], k[32];
    kvt_test_tmp(p, sizeof(p), "dev_fault.kvt");
    kvt_test_tmp(clean, sizeof(clean), "dev_fault_clean.kvt");
    int faults = 0, recovered = 0, n = 0;
    for (;; n++) { /* n = 0: no fault, the reference */
        engine en;
        prompt_engine(&en, 700);
        cudaStream_t st;
        CU_OK(cudaStreamCreate(&st));
        unlink(p);
        snprintf(k, sizeof(k), "%d", n);
        setenv("CUEMU_FAIL_LAUNCH", k, 1);
        kvt_status r = capture_dev_status(n ? p : clean, &en, st);
        unsetenv("CUEMU_FAIL_LAUNCH");
        cudaStreamDestroy(st);
        cudaDeviceReset(); /* the broken context gone, the engine's memory with it */
        cudaGetLastError();
        for (int l = 0; l < NL; l++) {
            free(en.k[l].host);
            free(en.v[l].host);
            free(en.q[l].host);
        }
        if (n == 0)
            KVT_CHECK(r);
        if (n == 0)
            continue;
        if (r == KVT_OK)
            break; /* n is past the session's launches: no fault */
        faults++;
        KVT_EXPECT_MSG(r == KVT_ERR_CUDA, "launch %d: got %s (%s)", n, kvt_status_str(r),
                       kvt_error_msg());
        recovered += partial_ok(p, "launch", n);
        if (access(p, F_OK) != 0)
            continue;
        int compared = 0, bad = records_differ(p, clean, &compared);
        KVT_EXPECT_MSG(bad == 0,
                       "launch %d: %d of %d records differ from the capture without a "
                       "fault",
                       n, bad, compared);
    }
    printf("device capture, GPU fault: at each of %d launches an error, %d partial traces with "
           "records, each as without the fault\n",
           faults, recovered);
    KVT_EXPECT(faults > 3 && recovered > 0);
    unlink(p);
    unlink(clean);
}

/* A device view on a device that does not exist is refused before anything is queued. */
static void bad_device(void)
{
    struct kvt_capture_model m = {.name = "x",
                                  .arch = "llama",
                                  .n_layers = 1,
                                  .n_q_heads = 1,
                                  .n_kv_heads = 1,
                                  .head_dim = 4,
                                  .kv_dtype = KVT_DTYPE_F32};
    struct kvt_capture_opts o = {.n_tokens = 2, .window = 1, .writer = {.force = true}};
    char p[256];
    kvt_capture_session *s;
    KVT_CHECK(kvt_capture_open(kvt_test_tmp(p, sizeof(p), "bad.kvt"), &m, &o, &s));
    float x[8] = {0};
    struct kvt_tensor_view v;
    kvt_tensor_view_hTd(&v, x, KVT_DTYPE_F32, 1, 2, 4);
    v.mem = KVT_MEM_CUDA;
    v.device_idx = 4096;
    KVT_EXPECT_STATUS(kvt_capture_submit_kv(s, 0, 0, &v, &v), KVT_ERR_INVALID_ARG);
    kvt_tensor_view_hTd(&v, x, KVT_DTYPE_F32, 1, 2, 4); /* the session is still usable */
    KVT_CHECK(kvt_capture_submit_kv(s, 0, 0, &v, &v));
    KVT_CHECK(kvt_capture_submit_queries(s, 0, 0, &v));
    KVT_CHECK(kvt_capture_close(s, NULL));
    unlink(p);
}

int main(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
        printf("SKIP: no CUDA device\n");
        return 77;
    }
    struct cudaDeviceProp prop;
    CU_OK(cudaGetDeviceProperties(&prop, 0));
    printf("device: %s\n", prop.name);
    const char *db = getenv("KVT_TEST_DELAY_BYTES");
    g_delay_bytes = db ? (size_t)strtoull(db, NULL, 10) : (size_t)1 << 30;
    if (g_delay_bytes < 4)
        g_delay_bytes = 4;
    CU_OK(cudaMalloc(&g_delay, g_delay_bytes));
    run_case(KVT_DTYPE_BF16, KVT_DTYPE_BF16, false, 0, ONE);
    run_case(KVT_DTYPE_BF16, KVT_DTYPE_BF16, true, 0, ONE);
    run_case(KVT_DTYPE_F32, KVT_DTYPE_BF16, true, 0, ONE);
    run_case(KVT_DTYPE_F16, KVT_DTYPE_F32, false, 0, ONE);
    run_case(KVT_DTYPE_F32, KVT_DTYPE_F16, true, 1ull << 20, ONE); /* a roomier ring */
    run_case(KVT_DTYPE_BF16, KVT_DTYPE_F32, false, 0, THREE);
    run_case(KVT_DTYPE_F16, KVT_DTYPE_BF16, true, 0, THREE);
    run_case(KVT_DTYPE_BF16, KVT_DTYPE_BF16, false, 0, ROT);
    run_case(KVT_DTYPE_F32, KVT_DTYPE_F16, true, 0, ROT);
    reserve();
    g_reserve = true; /* a session that takes a reserved ring writes the same trace */
    run_case(KVT_DTYPE_BF16, KVT_DTYPE_BF16, true, 0, THREE);
    g_reserve = false;
    CU_OK(cudaFree(g_delay));
    if (n >= 2) /* a model split over two GPUs: the second's layers captured through the host */
        run_case(KVT_DTYPE_BF16, KVT_DTYPE_BF16, true, 0, SPLIT);
    else
        printf("layers on two devices: not run (%d CUDA device)\n", n);
    bad_device();
    write_failure();
    gpu_fault(); /* last: it resets the device */
    return kvt_test_result("test_capture_device_gpu");
}
