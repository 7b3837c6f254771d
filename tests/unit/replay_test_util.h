/* replay_test_util.h - in-memory layers for the replay and kernel tests: a random layer with
 * owned tensors (seeded kvt_rng), and small helpers to read a kept set.
 */
#ifndef REPLAY_TEST_UTIL_H
#define REPLAY_TEST_UTIL_H

#include "kvt_replay.h"
#include "kvt_test.h"
#include "kvt_trace.h"

typedef struct test_layer {
    kvt_layer_input in;
    float *k, *v, *qw, *qd, *kd, *vd, *cs;
    uint8_t *mod;
} test_layer;

/* a one-layer input of Hq query heads over Hkv KV heads: keys/values [Hkv, T, D], window
 * queries [Hq, W, D] (no decode steps, no modality: set them on the result) */
static inline kvt_layer_input tl_layer(int T, int D, int Hq, int Hkv, int W, const float *k,
                                       const float *v, const float *q)
{
    return (kvt_layer_input){.layer = 0,
                             .n_layers = 1,
                             .T = T,
                             .D = D,
                             .Hq = Hq,
                             .Hkv = Hkv,
                             .W = W,
                             .k = k,
                             .v = v,
                             .q_window = q};
}

static inline float *tl_randn(kvt_rng *r, size_t n, double scale)
{
    float *x = malloc(n * sizeof(float) + 4);
    for (size_t i = 0; i < n; i++)
        x[i] = (float)(kvt_rng_normal(r) * scale);
    return x;
}

/* A random layer; G decode steps with decode K/V when G > 0; modality: the middle third of
 * the prefix is image when with_mod. */
static inline void tl_random(test_layer *t, uint64_t seed, int T, int D, int Hq, int Hkv, int W,
                             int G, bool with_mod)
{
    memset(t, 0, sizeof(*t));
    kvt_rng r;
    kvt_rng_seed(&r, seed);
    t->k = tl_randn(&r, (size_t)Hkv * T * D, 1.0);
    t->v = tl_randn(&r, (size_t)Hkv * T * D, 1.0);
    t->qw = tl_randn(&r, (size_t)Hq * W * D, 1.5);
    if (G > 0) {
        t->qd = tl_randn(&r, (size_t)Hq * G * D, 1.5);
        t->kd = tl_randn(&r, (size_t)Hkv * G * D, 1.0);
        t->vd = tl_randn(&r, (size_t)Hkv * G * D, 1.0);
    }
    if (with_mod) {
        t->mod = calloc((size_t)T, 1);
        for (int j = T / 3; j < 2 * T / 3; j++)
            t->mod[j] = 1;
    }
    t->in = tl_layer(T, D, Hq, Hkv, W, t->k, t->v, t->qw);
    t->in.n_layers = 4, t->in.G = G, t->in.modality = t->mod;
    t->in.q_decode = t->qd, t->in.k_decode = t->kd, t->in.v_decode = t->vd;
}

static inline void tl_free(test_layer *t)
{
    free(t->k);
    free(t->v);
    free(t->qw);
    free(t->qd);
    free(t->kd);
    free(t->vd);
    free(t->cs);
    free(t->mod);
    memset(t, 0, sizeof(*t));
}

/* select spec's kept sets on a layer at budgets B[nb]; a failure is a test failure (and exits:
 * there is nothing to look at) */
static inline kvt_layer_selection *tl_select(const kvt_layer_input *in, const char *spec,
                                             const int *B, size_t nb)
{
    kvt_policy *p = NULL;
    KVT_CHECK(kvt_policy_create(spec, NULL, &p));
    kvt_layer_selection *s = NULL;
    kvt_status st = kvt_replay_layer_select(in, p, B, nb, &s);
    KVT_EXPECT_MSG(st == KVT_OK, "%s: %s", spec, kvt_error_msg());
    kvt_policy_free(p);
    if (!s)
        exit(1);
    return s;
}

/* the number of entries head h keeps at budget index b (prompt-time set), -1 on an error */
static inline int tl_count(const kvt_layer_selection *s, size_t b, int h)
{
    int32_t idx[4096];
    size_t n = 0;
    return kvt_layer_selection_kept(s, b, h, -1, idx, 4096, &n) ? -1 : (int)n;
}

/* kept set of (budget, head, step) as a string "1,3,6,7" (static buffer) */
static inline const char *tl_kept_str(const kvt_layer_selection *s, size_t b, int h, int step)
{
    static char buf[4096];
    int32_t idx[1024];
    size_t n = 0;
    buf[0] = '\0';
    if (kvt_layer_selection_kept(s, b, h, step, idx, 1024, &n) != KVT_OK)
        return "(error)";
    size_t len = 0;
    for (size_t i = 0; i < n && len + 16 < sizeof(buf); i++)
        len += (size_t)snprintf(buf + len, sizeof(buf) - len, "%s%d", i ? "," : "", idx[i]);
    return buf;
}

#define EXPECT_KEPT(sel, b, h, step, want)                                                         \
    do {                                                                                           \
        const char *kvt_got_ = tl_kept_str((sel), (b), (h), (step));                               \
        KVT_EXPECT_MSG(strcmp(kvt_got_, (want)) == 0, "kept {%s}, want {%s}", kvt_got_, (want));   \
    } while (0)

/* a trace file of L layers with K, V, Q_window, decode Q/K/V and layer 0's modality */
/* a trace whose header names the model `name` (written as given: any bytes but '"') */
static inline void tl_write_trace_named(const char *path, const char *name, int L, int T, int D,
                                        int Hq, int Hkv, int W, int G, test_layer *layers)
{
    char hdr[512];
    snprintf(hdr, sizeof(hdr),
             "{\"format\":\"kvtrace\",\"model\":{\"name\":\"%s\",\"arch\":\"llama\","
             "\"n_layers\":%d,\"n_q_heads\":%d,\"n_kv_heads\":%d,\"head_dim\":%d,"
             "\"rope\":{\"type\":\"default\",\"theta\":10000}},\"kv_dtype\":\"f32\","
             "\"n_tokens\":%d,\"window\":%d,\"n_decode\":%d}",
             name, L, Hq, Hkv, D, T, W, G);
    kvt_writer_opts wo = {.force = true};
    kvt_trace_writer *w;
    KVT_CHECK(kvt_trace_writer_create(path, hdr, &wo, &w));
    for (int l = 0; l < L; l++) {
        test_layer *t = &layers[l];
        kvt_record_info k = {.kind = KVT_KIND_K,
                             .layer = l,
                             .head_end = (uint32_t)Hkv,
                             .tok_end = (uint32_t)T,
                             .dim = (uint32_t)D,
                             .dtype = KVT_DTYPE_F32};
        KVT_CHECK(kvt_trace_writer_append(w, &k, t->k));
        k.kind = KVT_KIND_V;
        KVT_CHECK(kvt_trace_writer_append(w, &k, t->v));
        kvt_record_info q = {.kind = KVT_KIND_Q_WINDOW,
                             .layer = l,
                             .head_end = (uint32_t)Hq,
                             .tok_end = (uint32_t)W,
                             .dim = (uint32_t)D,
                             .dtype = KVT_DTYPE_F32};
        KVT_CHECK(kvt_trace_writer_append(w, &q, t->qw));
        q.kind = KVT_KIND_Q_DECODE;
        q.tok_end = (uint32_t)G;
        KVT_CHECK(kvt_trace_writer_append(w, &q, t->qd));
        kvt_record_info kd = {.kind = KVT_KIND_K_DECODE,
                              .layer = l,
                              .head_end = (uint32_t)Hkv,
                              .tok_end = (uint32_t)G,
                              .dim = (uint32_t)D,
                              .dtype = KVT_DTYPE_F32};
        KVT_CHECK(kvt_trace_writer_append(w, &kd, t->kd));
        kd.kind = KVT_KIND_V_DECODE;
        KVT_CHECK(kvt_trace_writer_append(w, &kd, t->vd));
    }
    kvt_record_info mo = {.kind = KVT_KIND_MODALITY,
                          .layer = -1,
                          .head_end = 1,
                          .tok_end = (uint32_t)T,
                          .dim = 1,
                          .dtype = KVT_DTYPE_U8};
    KVT_CHECK(kvt_trace_writer_append(w, &mo, layers[0].mod));
    KVT_CHECK(kvt_trace_writer_finish(w));
    kvt_trace_writer_free(w);
}

static inline void tl_write_trace(const char *path, int L, int T, int D, int Hq, int Hkv, int W,
                                  int G, test_layer *layers)
{
    tl_write_trace_named(path, "tiny", L, T, D, Hq, Hkv, W, G, layers);
}

#endif /* REPLAY_TEST_UTIL_H */
