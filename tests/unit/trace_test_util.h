/* trace_test_util.h - helpers shared by the trace tests: write a small multi-layer trace with
 * known contents, read a whole file, write bytes to a file.
 */
#ifndef KVT_TRACE_TEST_UTIL_H
#define KVT_TRACE_TEST_UTIL_H

#include <sys/stat.h>

#include "kvt_test.h"
#include "kvt_trace.h"

#define TT_LAYERS 3
#define TT_HKV    2
#define TT_HQ     4
#define TT_T      37
#define TT_W      5
#define TT_D      8

static const char *tt_header_json =
    "{\"format\":\"kvtrace\",\"model\":{\"name\":\"unit\",\"arch\":\"llama\",\"n_layers\":3,"
    "\"n_q_heads\":4,\"n_kv_heads\":2,\"head_dim\":8},\"n_tokens\":37,\"window\":5,"
    "\"n_decode\":0,\"kv_dtype\":\"bf16\"}";

/* Deterministic element values for (layer, kind, index). */
static inline float tt_value(int layer, int kind, size_t i)
{
    uint64_t x = (uint64_t)layer * 1000003u + (uint64_t)kind * 7919u + i * 2654435761u;
    x ^= x >> 13;
    return (float)((double)(x % 20001) / 1000.0 - 10.0);
}

/* Write K, V (bf16) and Q_window (f32) for TT_LAYERS layers plus token ids. */
static inline kvt_status tt_write(const char *path, const kvt_writer_opts *o)
{
    kvt_trace_writer *w;
    KVT_FORWARD(kvt_trace_writer_create(path, tt_header_json, o, &w));
    size_t nkv = (size_t)TT_HKV * TT_T * TT_D, nq = (size_t)TT_HQ * TT_W * TT_D;
    float buf[TT_HQ * TT_T * TT_D];
    uint16_t b16[TT_HKV * TT_T * TT_D];
    kvt_status s = KVT_OK;
    for (int l = 0; l < TT_LAYERS && s == KVT_OK; l++) {
        for (int kind = KVT_KIND_K; kind <= KVT_KIND_V && s == KVT_OK; kind++) {
            for (size_t i = 0; i < nkv; i++)
                buf[i] = tt_value(l, kind, i);
            kvt_convert_from_f32(KVT_DTYPE_BF16, buf, b16, nkv);
            kvt_record_info in = {.kind = kind,
                                  .layer = l,
                                  .head_end = TT_HKV,
                                  .tok_end = TT_T,
                                  .dim = TT_D,
                                  .dtype = KVT_DTYPE_BF16};
            s = kvt_trace_writer_append(w, &in, b16);
        }
        for (size_t i = 0; i < nq && s == KVT_OK; i++)
            buf[i] = tt_value(l, KVT_KIND_Q_WINDOW, i);
        kvt_record_info q = {.kind = KVT_KIND_Q_WINDOW,
                             .layer = l,
                             .head_end = TT_HQ,
                             .tok_end = TT_W,
                             .dim = TT_D,
                             .dtype = KVT_DTYPE_F32};
        if (s == KVT_OK)
            s = kvt_trace_writer_append(w, &q, buf);
    }
    int32_t ids[TT_T];
    for (int t = 0; t < TT_T; t++)
        ids[t] = 100 + t;
    kvt_record_info ti = {.kind = KVT_KIND_TOKEN_IDS,
                          .layer = -1,
                          .head_end = 1,
                          .tok_end = TT_T,
                          .dim = 1,
                          .dtype = KVT_DTYPE_I32};
    if (s == KVT_OK)
        s = kvt_trace_writer_append(w, &ti, ids);
    if (s == KVT_OK)
        s = kvt_trace_writer_finish(w);
    kvt_trace_writer_free(w);
    return s;
}

static inline uint8_t *tt_slurp(const char *path, size_t *n)
{
    return kvt_test_slurp(path, n);
}

static inline int tt_spit(const char *path, const uint8_t *b, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f)
        return -1;
    size_t w = fwrite(b, 1, n, f);
    fclose(f);
    return w == n ? 0 : -1;
}

#endif
