/* capture_session.c - the host capture session (kvt_capture.h): validates what an engine
 * submits and the order it comes in, gathers strided views into the stored dtype, keeps the
 * per-layer state (tokens submitted, decode buffers, keys and accumulators for the causal
 * column sums) and hands contiguous blocks to the trace writer, which compresses and writes
 * them on its threads. Close flushes decode buffers and token tables, appends the capture
 * statistics as a meta_json record and finishes the file.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "capture_dev.h"
#include "dtype_bits.h"
#include "kvt_capture.h"

#define KVT_CAPTURE_MAX_LAYERS   (1 << 16)
#define KVT_CAPTURE_MAX_HEADS    (1 << 16)
#define KVT_CAPTURE_MAX_HEAD_DIM (1 << 16)
#define KVT_CAPTURE_DECODE_CHUNK 64u

typedef struct layer_state {
    uint32_t kv_done;     /* prompt tokens whose K/V were submitted */
    bool q_started;       /* a query range was submitted */
    uint32_t q_begin;     /* first query token submitted */
    uint32_t q_done;      /* one past the last query token submitted */
    float *k_f32;         /* [Hkv, T, D] engine keys, kept while column sums are pending */
    double *colsum;       /* [Hq, T] accumulator */
    bool kvzip_done;      /* its kvzip_score record was written */
    uint32_t dec_done;    /* decode steps submitted */
    uint32_t dec_flushed; /* decode steps written */
    uint8_t *dq;          /* [Hq, chunk, D] stored dtype */
    uint8_t *dk;          /* [Hkv, chunk, D] */
    uint8_t *dv;          /* [Hkv, chunk, D] */
    /* device views (KVT_MEM_CUDA) */
    bool kv_dev;              /* with column sums: the keys came from device memory */
    float *dk_f32;            /* device [Hkv, T, D] keys for the GPU column sums */
    kvt_capdev_mark *dk_mark; /* after every gather into dk_f32 so far (NULL: none yet) */
    double *dcolsum;          /* device [Hq, T] accumulator */
    int dec_mem;              /* decode views: 0 none yet, 1 host, 2 device */
    uint8_t *ddq, *ddk, *ddv; /* device decode chunks, laid out as dq, dk, dv */
} layer_state;

struct kvt_capture_session {
    kvt_trace_writer *w;
    char *name, *arch, *engine_name, *engine_version, *gpu;
    struct kvt_capture_model model; /* string fields point at the copies above */
    struct kvt_capture_opts opts;   /* capture_json is not kept */
    size_t es;                      /* bytes per stored element */
    uint32_t dec_chunk; /* decode steps per record: decode_chunk, at most n_decode (>= 1) */
    float scale;        /* softmax scale for column sums */
    layer_state *layers;
    bool tokens_set;
    bool have_positions, have_modality; /* tables given by the engine */
    bool prompt_complete;               /* cached once true */
    bool decode_started;
    int32_t *dec_tok; /* [chunk] decode input tokens not yet written */
    uint32_t dec_tok_done, dec_tok_flushed;
    uint8_t *scratch; /* gather buffer */
    size_t scratch_cap;
    float *qf; /* f32 queries for column sums */
    size_t qf_cap;
    float *row;        /* [T] one softmax row */
    kvt_capdev *dev;   /* device side, created by the first device view */
    int dev_device;    /* its CUDA ordinal */
    uint8_t *other[3]; /* views on other devices, copied to the host (need_dev) */
    size_t other_cap[3];
    float *dq_f32; /* device f32 queries for the GPU column sums */
    size_t dq_f32_cap;
    kvt_capdev_mark *cs_last;      /* after the last column sums (any layer's): they read dq_f32 and
                                      the sums' workspace */
    kvt_capdev_mark *dec_marks[3]; /* a decode step's gathers of Q, K, V, for the side stream */
    kvt_status err;                /* sticky write error */
    char err_msg[256];
    struct kvt_capture_stats stats;
    kvt_capture_timeline timeline; /* valid when has_timeline */
    bool has_timeline;
    char timeline_absent[256]; /* why there is none ("" = not set) */
};

/* ---- tensor views ---- */

void kvt_tensor_view_hTd(struct kvt_tensor_view *v, const void *data, kvt_dtype dtype, int64_t h,
                         int64_t t, int64_t d)
{
    memset(v, 0, sizeof(*v));
    v->data = data;
    v->dtype = dtype;
    v->ndim = 3;
    v->shape[0] = h;
    v->shape[1] = t;
    v->shape[2] = d;
    v->stride[0] = t * d;
    v->stride[1] = d;
    v->stride[2] = 1;
    v->mem = KVT_MEM_HOST;
}

/* A validated view reduced to its H, T, D axes. */
typedef struct hview {
    const uint8_t *data;
    kvt_dtype dtype;
    size_t es;
    int64_t n_h, n_t, n_d;
    int64_t s_h, s_t, s_d;
    int64_t lo, hi; /* the elements the view reaches: offsets lo..hi from element [0, 0, 0] */
    bool dev;       /* KVT_MEM_CUDA */
    int device;     /* CUDA ordinal */
    void *stream;   /* producer stream */
} hview;

static kvt_status check_view(const struct kvt_tensor_view *v, const char *what, int64_t want_h,
                             int64_t want_d, hview *out)
{
    KVT_RETURN_IF(!v || !v->data, KVT_ERR_INVALID_ARG, "%s: no tensor given", what);
    KVT_RETURN_IF(v->mem != KVT_MEM_HOST && v->mem != KVT_MEM_CUDA, KVT_ERR_INVALID_ARG,
                  "%s: unknown memory kind %d (host 0, CUDA 1)", what, (int)v->mem);
    KVT_RETURN_IF(v->mem == KVT_MEM_CUDA && v->device_idx < 0, KVT_ERR_INVALID_ARG,
                  "%s: CUDA device %d", what, v->device_idx);
    KVT_RETURN_IF(!kvt_dtype_is_float(v->dtype), KVT_ERR_INVALID_ARG,
                  "%s: dtype %d is not f32, bf16 or f16", what, (int)v->dtype);
    KVT_RETURN_IF(v->ndim != 3 && v->ndim != 4, KVT_ERR_INVALID_ARG,
                  "%s: ndim %d (want 3 for [H,T,D] or 4 for [B,H,T,D])", what, v->ndim);
    int a = v->ndim - 3;
    KVT_RETURN_IF(a == 1 && v->shape[0] != 1, KVT_ERR_INVALID_ARG,
                  "%s: batch %lld (only B = 1 is supported)", what, (long long)v->shape[0]);
    out->data = v->data;
    out->dtype = v->dtype;
    out->es = kvt_dtype_size(v->dtype);
    out->n_h = v->shape[a];
    out->n_t = v->shape[a + 1];
    out->n_d = v->shape[a + 2];
    out->s_h = v->stride[a];
    out->s_t = v->stride[a + 1];
    out->s_d = v->stride[a + 2];
    out->dev = v->mem == KVT_MEM_CUDA;
    out->device = out->dev ? v->device_idx : -1;
    out->stream = out->dev ? v->stream : NULL;
    KVT_RETURN_IF(out->n_h != want_h || out->n_d != want_d || out->n_t < 1 ||
                      out->n_t > (int64_t)UINT32_MAX,
                  KVT_ERR_INVALID_ARG, "%s: shape [H=%lld, T=%lld, D=%lld], want [%lld, >=1, %lld]",
                  what, (long long)out->n_h, (long long)out->n_t, (long long)out->n_d,
                  (long long)want_h, (long long)want_d);
    /* the furthest element must be addressable without overflow */
    int64_t ext[3] = {out->n_h - 1, out->n_t - 1, out->n_d - 1};
    int64_t st[3] = {out->s_h, out->s_t, out->s_d};
    int64_t span = 0;
    out->lo = out->hi = 0;
    for (int i = 0; i < 3; i++) {
        int64_t p;
        int64_t sa = st[i] < 0 ? -st[i] : st[i];
        KVT_RETURN_IF(st[i] == INT64_MIN || __builtin_mul_overflow(sa, ext[i], &p) ||
                          __builtin_add_overflow(span, p, &span) ||
                          __builtin_mul_overflow(span, (int64_t)out->es, &p),
                      KVT_ERR_INVALID_ARG, "%s: strides overflow", what);
        if (st[i] < 0) /* |lo| + hi = span: no overflow either */
            out->lo += st[i] * ext[i];
        else
            out->hi += st[i] * ext[i];
    }
    return KVT_OK;
}

/* one element of float dtype dt (little-endian, 2 or 4 bytes) from / to f32 */
static inline size_t float_size(kvt_dtype dt)
{
    return dt == KVT_DTYPE_BF16 || dt == KVT_DTYPE_F16 ? 2 : 4;
}

static inline float load_f32(kvt_dtype dt, const uint8_t *p)
{
    uint32_t b = 0;
    memcpy(&b, p, float_size(dt));
    return kvt_bits_to_f32(b, dt);
}

static inline void store_from_f32(kvt_dtype dt, uint8_t *p, float f)
{
    uint32_t b = kvt_bits_from_f32(f, dt);
    memcpy(p, &b, float_size(dt));
}

/* Copy tokens [t0, t0 + nt) of the view into dst in dtype dst_dt: the row of (h, t) goes to
 * dst + (h * dst_h_rows + t) * D elements. Same dtype copies bits; otherwise converts through
 * f32 (round to nearest even). */
static void gather(const hview *v, int64_t t0, int64_t nt, kvt_dtype dst_dt, void *dst,
                   int64_t dst_h_rows)
{
    size_t des = kvt_dtype_size(dst_dt);
    bool same = dst_dt == v->dtype;
    for (int64_t h = 0; h < v->n_h; h++) {
        for (int64_t t = 0; t < nt; t++) {
            const uint8_t *src = v->data + (h * v->s_h + (t0 + t) * v->s_t) * (int64_t)v->es;
            uint8_t *d = (uint8_t *)dst + (size_t)((h * dst_h_rows + t) * v->n_d) * des;
            if (same && v->s_d == 1) {
                memcpy(d, src, (size_t)v->n_d * des);
            } else if (same) {
                for (int64_t i = 0; i < v->n_d; i++)
                    memcpy(d + (size_t)i * des, src + i * v->s_d * (int64_t)v->es, des);
            } else {
                for (int64_t i = 0; i < v->n_d; i++)
                    store_from_f32(dst_dt, d + (size_t)i * des,
                                   load_f32(v->dtype, src + i * v->s_d * (int64_t)v->es));
            }
        }
    }
}

/* ---- helpers ---- */

static kvt_status sticky(const kvt_capture_session *s)
{
    return kvt_error_set(s->err, "%s", s->err_msg);
}

static kvt_status grow(void **buf, size_t *cap, size_t need)
{
    if (*cap >= need)
        return KVT_OK;
    void *nb = kvt_realloc(*buf, need);
    KVT_RETURN_IF(!nb, KVT_ERR_NOMEM, "out of memory (%zu-byte capture buffer)", need);
    *buf = nb;
    *cap = need;
    return KVT_OK;
}

/* Append one record; a failure makes the session's error sticky. */
static kvt_status emit(kvt_capture_session *s, int kind, int32_t layer, uint32_t h1, uint32_t t0,
                       uint32_t t1, uint32_t dim, kvt_dtype dt, const void *data)
{
    kvt_record_info in = {.kind = kind,
                          .layer = layer,
                          .head_begin = 0,
                          .head_end = h1,
                          .tok_begin = t0,
                          .tok_end = t1,
                          .dim = dim,
                          .dtype = dt};
    kvt_status st = kvt_trace_writer_append(s->w, &in, data);
    if (st != KVT_OK) {
        s->err = st;
        snprintf(s->err_msg, sizeof(s->err_msg), "%s", kvt_error_msg());
        return st;
    }
    s->stats.bytes_submitted += (uint64_t)h1 * (t1 - t0) * dim * kvt_dtype_size(dt);
    return KVT_OK;
}

/* A failed device operation: records may be half queued, so the error is sticky. */
static kvt_status dev_fail(kvt_capture_session *s, kvt_status st)
{
    if (st != KVT_OK && s->err == KVT_OK) {
        s->err = st;
        snprintf(s->err_msg, sizeof(s->err_msg), "%s", kvt_error_msg());
    }
    return st;
}

/* Engines may hand each tensor on its own stream, and a view's stream is borrowed for the call
 * only: a device buffer's producer marks its stream (kvt_capdev_mark_at) in the call that
 * enqueues the work, and its consumer, in a later call, waits for the mark. */
static kvt_status dev_mark(kvt_capture_session *s, kvt_capdev_mark **m, void *stream)
{
    return dev_fail(s, kvt_capdev_mark_at(s->dev, m, stream));
}
static kvt_status dev_after(kvt_capture_session *s, const kvt_capdev_mark *m, void *stream)
{
    return dev_fail(s, kvt_capdev_after(s->dev, m, stream));
}

/* Before anything of a submission is queued: a device view needs the device side (created by
 * the first one, on its device). A view on another device (a model split over several GPUs:
 * the layers on the GPUs after the first) is copied to host memory (the session's staging
 * buffer `slot`, 0-2) once the work queued on its stream is done, and captured from there as a
 * host view: slower (the copy waits for the engine), the same records. */
static kvt_status need_dev(kvt_capture_session *s, hview *v, int slot)
{
    if (!v->dev)
        return KVT_OK;
    if (!s->dev) {
        KVT_FORWARD(kvt_capdev_create(v->device, s->w, s->opts.device_ring_bytes, &s->dev));
        s->dev_device = v->device;
        return KVT_OK;
    }
    if (v->device == s->dev_device)
        return KVT_OK;
    const int64_t lo = v->lo;
    const size_t bytes = (size_t)(v->hi - lo + 1) * v->es; /* check_view: no overflow */
    KVT_FORWARD(grow((void **)&s->other[slot], &s->other_cap[slot], bytes));
    KVT_FORWARD(
        dev_fail(s, kvt_capdev_copy_to_host(v->device, v->stream, v->data + lo * (int64_t)v->es,
                                            bytes, s->other[slot])));
    v->data = s->other[slot] - lo * (int64_t)v->es;
    v->dev = false;
    v->device = -1;
    v->stream = NULL;
    s->stats.other_device_bytes += bytes;
    return KVT_OK;
}

static kvt_capdev_view dev_view(const hview *v)
{
    kvt_capdev_view d = {v->data, v->dtype, v->n_h, v->n_t,   v->n_d,
                         v->s_h,  v->s_t,   v->s_d, v->stream};
    return d;
}

/* Gather tokens [t0, t0 + nt) of a view and append them as rows [tok0, tok0 + nt). */
static kvt_status emit_view(kvt_capture_session *s, int kind, int layer, const hview *v, int64_t t0,
                            int64_t nt, uint32_t tok0)
{
    if (v->dev) {
        kvt_record_info in = {.kind = kind,
                              .layer = layer,
                              .head_begin = 0,
                              .head_end = (uint32_t)v->n_h,
                              .tok_begin = tok0,
                              .tok_end = tok0 + (uint32_t)nt,
                              .dim = (uint32_t)v->n_d,
                              .dtype = s->model.kv_dtype};
        kvt_capdev_view dv = dev_view(v);
        KVT_FORWARD(dev_fail(s, kvt_capdev_emit(s->dev, &dv, t0, &in)));
        s->stats.bytes_submitted += (uint64_t)v->n_h * (uint64_t)nt * (uint64_t)v->n_d * s->es;
        return KVT_OK;
    }
    size_t n = (size_t)v->n_h * (size_t)nt * (size_t)v->n_d * s->es;
    KVT_FORWARD(grow((void **)&s->scratch, &s->scratch_cap, n));
    gather(v, t0, nt, s->model.kv_dtype, s->scratch, nt);
    return emit(s, kind, layer, (uint32_t)v->n_h, tok0, tok0 + (uint32_t)nt, (uint32_t)v->n_d,
                s->model.kv_dtype, s->scratch);
}

static kvt_status check_common(const kvt_capture_session *s, int layer, const char *what)
{
    KVT_RETURN_IF(!s, KVT_ERR_INVALID_ARG, "%s: null session", what);
    if (s->err != KVT_OK)
        return sticky(s);
    KVT_RETURN_IF(layer < 0 || layer >= s->model.n_layers, KVT_ERR_INVALID_ARG,
                  "%s: layer %d out of range [0, %d)", what, layer, s->model.n_layers);
    return KVT_OK;
}

/* ---- open ---- */

static kvt_status check_model(const struct kvt_capture_model *m, const struct kvt_capture_opts *o)
{
    KVT_RETURN_IF(!m || !o, KVT_ERR_INVALID_ARG, "model and options are required");
    KVT_RETURN_IF(m->n_layers < 1 || m->n_layers > KVT_CAPTURE_MAX_LAYERS, KVT_ERR_INVALID_ARG,
                  "model: n_layers %d out of range [1, %d]", m->n_layers, KVT_CAPTURE_MAX_LAYERS);
    KVT_RETURN_IF(m->n_q_heads < 1 || m->n_q_heads > KVT_CAPTURE_MAX_HEADS, KVT_ERR_INVALID_ARG,
                  "model: n_q_heads %d out of range", m->n_q_heads);
    KVT_RETURN_IF(m->n_kv_heads < 1 || m->n_kv_heads > m->n_q_heads ||
                      m->n_q_heads % m->n_kv_heads != 0,
                  KVT_ERR_INVALID_ARG, "model: n_kv_heads %d must divide n_q_heads %d",
                  m->n_kv_heads, m->n_q_heads);
    KVT_RETURN_IF(m->head_dim < 1 || m->head_dim > KVT_CAPTURE_MAX_HEAD_DIM, KVT_ERR_INVALID_ARG,
                  "model: head_dim %d out of range", m->head_dim);
    KVT_RETURN_IF(!kvt_dtype_is_float(m->kv_dtype), KVT_ERR_INVALID_ARG,
                  "model: kv_dtype must be f32, bf16 or f16");
    KVT_RETURN_IF(m->rope != KVT_ROPE_NONE && m->rope != KVT_ROPE_DEFAULT &&
                      m->rope != KVT_ROPE_MROPE,
                  KVT_ERR_INVALID_ARG, "model: unknown rope kind %d", (int)m->rope);
    /* Both finite and > 0 (the header's model.attn_scale must be positive, FORMAT.md; a
       negative theta would be written as it is), with 0 keeping its meaning: 1/sqrt(D), and a
       theta not known (written as 0, which a replay takes for none). */
    KVT_RETURN_IF(!(m->attn_scale >= 0.0) || !isfinite(m->attn_scale), KVT_ERR_INVALID_ARG,
                  "model: attn_scale must be finite and > 0 (or 0 for 1/sqrt(head_dim)), got %g",
                  m->attn_scale);
    KVT_RETURN_IF(!(m->rope_theta >= 0.0) || !isfinite(m->rope_theta), KVT_ERR_INVALID_ARG,
                  "model: rope_theta must be finite and > 0 (or 0 when not known), got %g",
                  m->rope_theta);
    KVT_RETURN_IF(m->rope_pairs != KVT_ROPE_PAIRS_UNKNOWN && m->rope_pairs != KVT_ROPE_PAIRS_HALF &&
                      m->rope_pairs != KVT_ROPE_PAIRS_INTERLEAVED,
                  KVT_ERR_INVALID_ARG, "model: unknown rope pairs %d", (int)m->rope_pairs);
    KVT_RETURN_IF((m->rope_pairs || m->rope_inv_freq) && m->head_dim % 2, KVT_ERR_INVALID_ARG,
                  "model: rope pairs need an even head_dim (%d)", m->head_dim);
    for (int i = 0; m->rope_inv_freq && i < m->head_dim / 2; i++)
        KVT_RETURN_IF(!(m->rope_inv_freq[i] >= 0.0) || !isfinite(m->rope_inv_freq[i]),
                      KVT_ERR_INVALID_ARG,
                      "model: rope_inv_freq[%d] = %g is not a finite "
                      "frequency >= 0",
                      i, m->rope_inv_freq[i]);
    KVT_RETURN_IF(!(m->rope_attention_scaling >= 0.0) || !isfinite(m->rope_attention_scaling),
                  KVT_ERR_INVALID_ARG,
                  "model: rope_attention_scaling must be finite and >= 0, got %g",
                  m->rope_attention_scaling);
    {
        const int *ms = m->mrope_section;
        bool any = ms[0] || ms[1] || ms[2];
        KVT_RETURN_IF(any && (ms[0] < 0 || ms[1] < 0 || ms[2] < 0 ||
                              (long)ms[0] + ms[1] + ms[2] != m->head_dim / 2 ||
                              m->rope != KVT_ROPE_MROPE),
                      KVT_ERR_INVALID_ARG,
                      "model: mrope_section [%d,%d,%d] must be >= 0 and sum to head_dim/2 = %d, "
                      "with rope mrope",
                      ms[0], ms[1], ms[2], m->head_dim / 2);
    }
    KVT_RETURN_IF(o->n_tokens < 1 || o->n_tokens > (1u << 30), KVT_ERR_INVALID_ARG,
                  "n_tokens %u out of range [1, 2^30]", o->n_tokens);
    KVT_RETURN_IF(o->window < 1 || o->window > o->n_tokens, KVT_ERR_INVALID_ARG,
                  "window %u must be in [1, n_tokens = %u]", o->window, o->n_tokens);
    KVT_RETURN_IF(o->n_decode > (1u << 30), KVT_ERR_INVALID_ARG, "n_decode %u too large",
                  o->n_decode);
    return KVT_OK;
}

static const char *rope_name(kvt_rope_kind k)
{
    return k == KVT_ROPE_DEFAULT ? "default" : k == KVT_ROPE_MROPE ? "mrope" : "none";
}

/* A finite number as the 17 significant digits that read back to the same double: cJSON's
 * printer writes 15 whenever they read back within DBL_EPSILON, 1 ulp off for some values
 * (float32 0.01 as a double), and RoPE's frequencies should reach the replay exactly. */
static cJSON *exact_number(double x)
{
    char buf[32];
    snprintf(buf, sizeof(buf), "%.17g", x);
    for (char *c = buf; *c; c++) /* a locale's decimal comma (a host program's setlocale) */
        if (!((*c >= '0' && *c <= '9') || *c == '-' || *c == '+' || *c == 'e' || *c == 'E'))
            *c = '.';
    return cJSON_CreateRaw(buf);
}

/* The trace's JSON header (FORMAT.md §JSON header). Caller frees with cJSON_free. */
static kvt_status build_header(const kvt_capture_session *s, const char *capture_json, char **out)
{
    const struct kvt_capture_model *m = &s->model;
    const struct kvt_capture_opts *o = &s->opts;
    kvt_status st = KVT_OK;
    cJSON *extra = NULL;
    cJSON *root = cJSON_CreateObject();
    if (!root)
        return kvt_error_set(KVT_ERR_NOMEM, "out of memory (header)");
    char created[64];
    snprintf(created, sizeof(created), "kvtrace %s capture", kvt_version_string());
    cJSON_AddStringToObject(root, "format", "kvtrace");
    cJSON *fv = cJSON_AddArrayToObject(root, "format_version");
    if (fv) {
        cJSON_AddItemToArray(fv, cJSON_CreateNumber(KVT_FORMAT_MAJOR));
        cJSON_AddItemToArray(fv, cJSON_CreateNumber(KVT_FORMAT_MINOR));
    }
    cJSON_AddStringToObject(root, "created_by", created);
    cJSON_AddStringToObject(root, "endianness", "little");
    cJSON *mo = cJSON_AddObjectToObject(root, "model");
    if (mo) {
        cJSON_AddStringToObject(mo, "name", m->name);
        cJSON_AddStringToObject(mo, "arch", m->arch);
        cJSON_AddNumberToObject(mo, "n_layers", m->n_layers);
        cJSON_AddNumberToObject(mo, "n_q_heads", m->n_q_heads);
        cJSON_AddNumberToObject(mo, "n_kv_heads", m->n_kv_heads);
        cJSON_AddNumberToObject(mo, "head_dim", m->head_dim);
        cJSON_AddNumberToObject(
            mo, "attn_scale", m->attn_scale > 0 ? m->attn_scale : 1.0 / sqrt((double)m->head_dim));
        cJSON *ro = cJSON_AddObjectToObject(mo, "rope");
        if (ro) {
            cJSON_AddStringToObject(ro, "type", rope_name(m->rope));
            if (m->rope != KVT_ROPE_NONE)
                cJSON_AddNumberToObject(ro, "theta", m->rope_theta);
            if (m->rope_pairs)
                cJSON_AddStringToObject(
                    ro, "pairs", m->rope_pairs == KVT_ROPE_PAIRS_HALF ? "half" : "interleaved");
            if (m->rope_inv_freq) {
                cJSON *fa = cJSON_AddArrayToObject(ro, "inv_freq");
                for (int i = 0; fa && i < m->head_dim / 2; i++)
                    cJSON_AddItemToArray(fa, exact_number(m->rope_inv_freq[i]));
            }
            if (m->rope_attention_scaling > 0)
                cJSON_AddItemToObject(ro, "attention_scaling",
                                      exact_number(m->rope_attention_scaling));
            if (m->mrope_section[0] || m->mrope_section[1] || m->mrope_section[2]) {
                cJSON *sa = cJSON_AddArrayToObject(ro, "mrope_section");
                for (int i = 0; sa && i < 3; i++)
                    cJSON_AddItemToArray(sa, cJSON_CreateNumber(m->mrope_section[i]));
            }
        }
    }
    cJSON_AddStringToObject(root, "kv_dtype", kvt_dtype_name(m->kv_dtype));
    cJSON_AddNumberToObject(root, "n_tokens", o->n_tokens);
    cJSON_AddNumberToObject(root, "window", o->window);
    cJSON_AddNumberToObject(root, "n_decode", o->n_decode);
    cJSON *en = cJSON_AddObjectToObject(root, "engine");
    if (en) {
        cJSON_AddStringToObject(en, "name", m->engine_name);
        cJSON_AddStringToObject(en, "version", m->engine_version);
    }
    if (m->gpu)
        cJSON_AddStringToObject(root, "gpu", m->gpu);
    else
        cJSON_AddNullToObject(root, "gpu");
    cJSON *ca = cJSON_AddObjectToObject(root, "capture");
    if (ca) {
        cJSON_AddStringToObject(ca, "api", "kvt_capture");
        cJSON_AddBoolToObject(ca, "with_colsum", o->with_colsum);
        cJSON_AddBoolToObject(ca, "with_q_all", o->with_q_all);
        cJSON_AddNumberToObject(ca, "decode_chunk", o->decode_chunk);
        cJSON_AddNumberToObject(ca, "zstd_level", o->writer.level ? o->writer.level : 3);
        cJSON_AddBoolToObject(ca, "byteplane", !o->writer.no_shuffle);
    }
    if (capture_json) {
        extra = cJSON_Parse(capture_json);
        if (!extra || !cJSON_IsObject(extra)) {
            st = kvt_error_set(KVT_ERR_INVALID_ARG, "capture_json is not a JSON object");
            goto out;
        }
        /* the session's own record of how it captured is not the caller's to restate */
        static const char *const own[] = {"api",          "with_colsum", "with_q_all",
                                          "decode_chunk", "zstd_level",  "byteplane"};
        for (const cJSON *it = extra->child; it; it = it->next)
            for (size_t i = 0; i < sizeof(own) / sizeof(own[0]); i++)
                if (it->string && !strcmp(it->string, own[i])) {
                    st = kvt_error_set(KVT_ERR_INVALID_ARG,
                                       "capture_json: \"%s\" is the session's own record of "
                                       "the capture (set by its options): name your key "
                                       "otherwise",
                                       own[i]);
                    goto out;
                }
        while (ca && extra->child) {
            cJSON *it = cJSON_DetachItemViaPointer(extra, extra->child);
            cJSON_DeleteItemFromObjectCaseSensitive(ca, it->string);
            cJSON_AddItemToObject(ca, it->string, it);
        }
    }
    *out = cJSON_PrintUnformatted(root);
    if (!*out || !mo || !ca || !en)
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory (header)");
out:
    cJSON_Delete(extra);
    cJSON_Delete(root);
    return st;
}

static void session_free(kvt_capture_session *s)
{
    if (!s)
        return;
    kvt_capdev_free(s->dev); /* device buffers go with it */
    kvt_trace_writer_free(s->w);
    if (s->layers) {
        for (int l = 0; l < s->model.n_layers; l++) {
            layer_state *ls = &s->layers[l];
            kvt_free(ls->k_f32);
            kvt_free(ls->colsum);
            kvt_free(ls->dq);
            kvt_free(ls->dk);
            kvt_free(ls->dv);
        }
    }
    kvt_free(s->layers);
    kvt_free(s->dec_tok);
    kvt_free(s->scratch);
    for (int i = 0; i < 3; i++)
        kvt_free(s->other[i]);
    kvt_free(s->qf);
    kvt_free(s->row);
    kvt_free(s->name);
    kvt_free(s->arch);
    kvt_free(s->engine_name);
    kvt_free(s->engine_version);
    kvt_free(s->gpu);
    kvt_free(s);
}

static char *dup_or(const char *str, const char *dflt, bool *fail)
{
    char *d = kvt_strdup(str ? str : dflt);
    if (!d)
        *fail = true;
    return d;
}

kvt_status kvt_capture_open(const char *path, const struct kvt_capture_model *model,
                            const struct kvt_capture_opts *opts, kvt_capture_session **out)
{
    KVT_RETURN_IF(!out, KVT_ERR_INVALID_ARG, "null output pointer");
    *out = NULL;
    KVT_RETURN_IF(!path, KVT_ERR_INVALID_ARG, "no output path");
    KVT_FORWARD(check_model(model, opts));
    kvt_status st;
    char *hdr = NULL;
    kvt_capture_session *s = kvt_calloc(1, sizeof(*s));
    KVT_RETURN_IF(!s, KVT_ERR_NOMEM, "out of memory");
    s->model = *model;
    s->opts = *opts;
    s->opts.capture_json = NULL;
    if (s->opts.decode_chunk == 0)
        s->opts.decode_chunk = KVT_CAPTURE_DECODE_CHUNK;
    /* a chunk past the planned steps holds them all: buffers of decode_chunk = 2^31 steps were
       allocated before (8 GiB for the token ids alone) */
    s->dec_chunk = s->opts.decode_chunk;
    if (s->dec_chunk > s->opts.n_decode)
        s->dec_chunk = s->opts.n_decode > 0 ? s->opts.n_decode : 1;
    bool fail = false;
    s->name = dup_or(model->name, "unknown", &fail);
    s->arch = dup_or(model->arch, "unknown", &fail);
    s->engine_name = dup_or(model->engine_name, "unknown", &fail);
    s->engine_version = dup_or(model->engine_version, "unknown", &fail);
    s->gpu = model->gpu ? dup_or(model->gpu, "", &fail) : NULL;
    s->model.name = s->name;
    s->model.arch = s->arch;
    s->model.engine_name = s->engine_name;
    s->model.engine_version = s->engine_version;
    s->model.gpu = s->gpu;
    s->es = kvt_dtype_size(model->kv_dtype);
    s->scale =
        model->attn_scale > 0 ? (float)model->attn_scale : 1.0f / sqrtf((float)model->head_dim);
    s->layers = kvt_calloc((size_t)model->n_layers, sizeof(*s->layers));
    s->dec_tok = kvt_calloc(s->dec_chunk, sizeof(int32_t));
    if (fail || !s->layers || !s->dec_tok) {
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
        goto out_free_s;
    }
    if (opts->with_colsum) {
        s->row = kvt_calloc(opts->n_tokens, sizeof(float));
        if (!s->row) {
            st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
            goto out_free_s;
        }
    }
    st = build_header(s, opts->capture_json, &hdr);
    s->model.rope_inv_freq = NULL; /* the caller's array: only the header holds it */
    if (st != KVT_OK)
        goto out_free_s;
    st = kvt_trace_writer_create(path, hdr, &s->opts.writer, &s->w);
    cJSON_free(hdr);
    if (st != KVT_OK)
        goto out_free_s;
    *out = s;
    return KVT_OK;

out_free_s:
    session_free(s);
    return st;
}

/* ---- tokens ---- */

static kvt_status write_tokens(kvt_capture_session *s, const int32_t *ids, const uint8_t *mod,
                               const int32_t *pos, int n_pos_rows)
{
    uint32_t T = s->opts.n_tokens;
    if (ids)
        KVT_FORWARD(emit(s, KVT_KIND_TOKEN_IDS, -1, 1, 0, T, 1, KVT_DTYPE_I32, ids));
    if (mod)
        KVT_FORWARD(emit(s, KVT_KIND_MODALITY, -1, 1, 0, T, 1, KVT_DTYPE_U8, mod));
    if (pos)
        KVT_FORWARD(
            emit(s, KVT_KIND_POSITIONS, -1, (uint32_t)n_pos_rows, 0, T, 1, KVT_DTYPE_I32, pos));
    return KVT_OK;
}

kvt_status kvt_capture_set_tokens(kvt_capture_session *s, const int32_t *token_ids,
                                  const uint8_t *modality, const int32_t *positions, int n_pos_rows)
{
    KVT_FORWARD(check_common(s, 0, "set_tokens"));
    KVT_RETURN_IF(s->tokens_set, KVT_ERR_STATE, "set_tokens: token tables were already given");
    KVT_RETURN_IF(s->decode_started, KVT_ERR_STATE,
                  "set_tokens: must come before the first decode step");
    uint32_t T = s->opts.n_tokens;
    if (positions) {
        int want = s->model.rope == KVT_ROPE_MROPE ? 3 : 1;
        KVT_RETURN_IF(n_pos_rows != want, KVT_ERR_INVALID_ARG,
                      "set_tokens: %d position rows, this model (rope %s) needs %d", n_pos_rows,
                      rope_name(s->model.rope), want);
    }
    if (modality)
        for (uint32_t i = 0; i < T; i++)
            KVT_RETURN_IF(modality[i] > KVT_MOD_OTHER, KVT_ERR_INVALID_ARG,
                          "set_tokens: modality %u of token %u is not 0..3", modality[i], i);
    s->tokens_set = true;
    s->have_positions = positions != NULL;
    s->have_modality = modality != NULL;
    return write_tokens(s, token_ids, modality, positions, n_pos_rows);
}

/* ---- prompt ---- */

kvt_status kvt_capture_submit_kv(kvt_capture_session *s, int layer, uint32_t tok_begin,
                                 const struct kvt_tensor_view *k, const struct kvt_tensor_view *v)
{
    KVT_FORWARD(check_common(s, layer, "submit_kv"));
    hview hk, hv;
    KVT_FORWARD(check_view(k, "submit_kv: K", s->model.n_kv_heads, s->model.head_dim, &hk));
    KVT_FORWARD(check_view(v, "submit_kv: V", s->model.n_kv_heads, s->model.head_dim, &hv));
    KVT_RETURN_IF(hk.n_t != hv.n_t, KVT_ERR_INVALID_ARG, "submit_kv: K has %lld tokens, V has %lld",
                  (long long)hk.n_t, (long long)hv.n_t);
    KVT_RETURN_IF(s->decode_started, KVT_ERR_STATE,
                  "submit_kv: layer %d: prompt K/V after decode started", layer);
    layer_state *ls = &s->layers[layer];
    uint32_t T = s->opts.n_tokens, n = (uint32_t)hk.n_t;
    KVT_RETURN_IF(tok_begin != ls->kv_done, KVT_ERR_STATE,
                  "submit_kv: layer %d: tokens from %u submitted, next expected %u", layer,
                  tok_begin, ls->kv_done);
    KVT_RETURN_IF(n > T - tok_begin, KVT_ERR_INVALID_ARG,
                  "submit_kv: layer %d: tokens [%u, %u) go past n_tokens %u", layer, tok_begin,
                  tok_begin + n, T);
    KVT_FORWARD(need_dev(s, &hk, 0));
    KVT_FORWARD(need_dev(s, &hv, 1));
    KVT_RETURN_IF(s->opts.with_colsum && tok_begin > 0 && ls->kv_dev != hk.dev, KVT_ERR_STATE,
                  "submit_kv: layer %d: with column sums, a layer's keys must all be host or all "
                  "device tensors",
                  layer);
    if (s->opts.with_colsum && hk.dev && !ls->dk_f32) {
        size_t bytes = (size_t)s->model.n_kv_heads * (size_t)s->model.head_dim * T * sizeof(float);
        KVT_FORWARD(kvt_capdev_mem_alloc(s->dev, bytes, false, hk.stream, (void **)&ls->dk_f32));
    } else if (s->opts.with_colsum && !hk.dev && !ls->k_f32) {
        size_t cnt;
        if (kvt_mul_overflow((size_t)s->model.n_kv_heads * (size_t)s->model.head_dim, T, &cnt) ||
            kvt_mul_overflow(cnt, sizeof(float), &cnt))
            return kvt_error_set(KVT_ERR_OVERFLOW, "submit_kv: key buffer size overflows");
        ls->k_f32 = kvt_malloc(cnt);
        KVT_RETURN_IF(!ls->k_f32, KVT_ERR_NOMEM, "out of memory (keys for column sums)");
    }
    KVT_FORWARD(emit_view(s, KVT_KIND_K, layer, &hk, 0, hk.n_t, tok_begin));
    KVT_FORWARD(emit_view(s, KVT_KIND_V, layer, &hv, 0, hv.n_t, tok_begin));
    if (s->opts.with_colsum && hk.dev) {
        kvt_capdev_view dk = dev_view(&hk);
        /* chained: after the earlier gathers (maybe on other streams), so that the mark covers
           them all */
        KVT_FORWARD(dev_after(s, ls->dk_mark, hk.stream));
        KVT_FORWARD(dev_fail(
            s, kvt_capdev_gather(s->dev, &dk, 0, hk.n_t, KVT_DTYPE_F32, ls->dk_f32, T, tok_begin)));
        KVT_FORWARD(dev_mark(s, &ls->dk_mark, hk.stream));
    } else if (ls->k_f32) {
        gather(&hk, 0, hk.n_t, KVT_DTYPE_F32, ls->k_f32 + (size_t)tok_begin * hk.n_d, T);
    }
    ls->kv_dev = hk.dev;
    ls->kv_done += n;
    s->stats.n_submits++;
    return KVT_OK;
}

void kvt_colsum_accumulate_ref(const float *q, const float *k, double *colsum, int n_q_heads,
                               int n_kv_heads, uint32_t q_begin, uint32_t n_q, uint32_t n_k,
                               int head_dim, float scale, float *scratch)
{
    int group = n_q_heads / n_kv_heads;
    size_t D = (size_t)head_dim;
    for (int h = 0; h < n_q_heads; h++) {
        const float *kh = k + (size_t)(h / group) * n_k * D; /* [n_k, D] */
        double *cs = colsum + (size_t)h * n_k;
        for (uint32_t qi = 0; qi < n_q; qi++) {
            const float *qv = q + ((size_t)h * n_q + qi) * D; /* [D] */
            uint32_t i = q_begin + qi;
            float mx = -INFINITY;
            for (uint32_t j = 0; j <= i; j++) {
                float dot = 0.0f;
                for (size_t d = 0; d < D; d++)
                    dot += qv[d] * kh[(size_t)j * D + d];
                scratch[j] = dot * scale;
                if (scratch[j] > mx)
                    mx = scratch[j];
            }
            double sum = 0.0;
            for (uint32_t j = 0; j <= i; j++) {
                scratch[j] = expf(scratch[j] - mx);
                sum += scratch[j];
            }
            double inv = 1.0 / sum;
            for (uint32_t j = 0; j <= i; j++)
                cs[j] += (double)scratch[j] * inv;
        }
    }
}

static kvt_status finish_colsum(kvt_capture_session *s, int layer)
{
    layer_state *ls = &s->layers[layer];
    uint32_t T = s->opts.n_tokens;
    size_t n = (size_t)s->model.n_q_heads * T;
    if (ls->dcolsum) { /* the GPU's sums: wait for them, free the layer's device buffers */
        ls->colsum = kvt_malloc(n * sizeof(double));
        KVT_RETURN_IF(!ls->colsum, KVT_ERR_NOMEM, "out of memory (column sums)");
        KVT_FORWARD(dev_fail(s, kvt_capdev_to_host(s->dev, s->cs_last, ls->dcolsum, ls->colsum,
                                                   n * sizeof(double))));
        kvt_capdev_mem_free(s->dev, ls->dcolsum);
        kvt_capdev_mem_free(s->dev, ls->dk_f32);
        ls->dcolsum = NULL;
        ls->dk_f32 = NULL;
    }
    KVT_FORWARD(grow((void **)&s->scratch, &s->scratch_cap, n * sizeof(float)));
    float *out = (float *)(void *)s->scratch;
    for (size_t i = 0; i < n; i++)
        out[i] = (float)ls->colsum[i];
    KVT_FORWARD(emit(s, KVT_KIND_ATTN_COLSUM, layer, (uint32_t)s->model.n_q_heads, 0, T, 1,
                     KVT_DTYPE_F32, out));
    kvt_free(ls->colsum);
    ls->colsum = NULL;
    kvt_free(ls->k_f32);
    ls->k_f32 = NULL;
    return KVT_OK;
}

kvt_status kvt_capture_submit_kvzip(kvt_capture_session *s, int layer, const float *score)
{
    KVT_FORWARD(check_common(s, layer, "submit_kvzip"));
    KVT_RETURN_IF(!score, KVT_ERR_INVALID_ARG, "submit_kvzip: layer %d: null scores", layer);
    layer_state *ls = &s->layers[layer];
    KVT_RETURN_IF(ls->kvzip_done, KVT_ERR_STATE, "submit_kvzip: layer %d: scores given twice",
                  layer);
    const uint32_t T = s->opts.n_tokens;
    const size_t n = (size_t)s->model.n_kv_heads * T;
    for (size_t i = 0; i < n; i++) /* an attention probability: NaN or above 1 is a bug */
        KVT_RETURN_IF(!(score[i] >= 0.0f && score[i] <= 1.0f), KVT_ERR_INVALID_ARG,
                      "submit_kvzip: layer %d, KV head %zu, token %zu: score %g is not in [0, 1]",
                      layer, i / T, i % T, (double)score[i]);
    KVT_FORWARD(emit(s, KVT_KIND_KVZIP_SCORE, layer, (uint32_t)s->model.n_kv_heads, 0, T, 1,
                     KVT_DTYPE_F32, score));
    ls->kvzip_done = true;
    return KVT_OK;
}

kvt_status kvt_capture_submit_queries(kvt_capture_session *s, int layer, uint32_t tok_begin,
                                      const struct kvt_tensor_view *q)
{
    KVT_FORWARD(check_common(s, layer, "submit_queries"));
    hview hq;
    KVT_FORWARD(check_view(q, "submit_queries: Q", s->model.n_q_heads, s->model.head_dim, &hq));
    KVT_RETURN_IF(s->decode_started, KVT_ERR_STATE,
                  "submit_queries: layer %d: prompt queries after decode started", layer);
    layer_state *ls = &s->layers[layer];
    uint32_t T = s->opts.n_tokens, W = s->opts.window, n = (uint32_t)hq.n_t;
    bool need_all = s->opts.with_colsum || s->opts.with_q_all;
    if (!ls->q_started) {
        KVT_RETURN_IF(need_all && tok_begin != 0, KVT_ERR_STATE,
                      "submit_queries: layer %d: with column sums or Q_all, queries must start "
                      "at token 0 (got %u)",
                      layer, tok_begin);
        KVT_RETURN_IF(tok_begin > T - W, KVT_ERR_STATE,
                      "submit_queries: layer %d: first query %u is inside the window [%u, %u): "
                      "the window would be incomplete",
                      layer, tok_begin, T - W, T);
    } else {
        KVT_RETURN_IF(tok_begin != ls->q_done, KVT_ERR_STATE,
                      "submit_queries: layer %d: tokens from %u submitted, next expected %u", layer,
                      tok_begin, ls->q_done);
    }
    KVT_RETURN_IF(n > T - tok_begin, KVT_ERR_INVALID_ARG,
                  "submit_queries: layer %d: tokens [%u, %u) go past n_tokens %u", layer, tok_begin,
                  tok_begin + n, T);
    uint32_t tok_end = tok_begin + n;
    KVT_FORWARD(need_dev(s, &hq, 0));
    if (s->opts.with_colsum) {
        KVT_RETURN_IF(ls->kv_done < tok_end, KVT_ERR_STATE,
                      "submit_queries: layer %d: queries up to token %u need its keys first "
                      "(keys submitted for %u tokens)",
                      layer, tok_end, ls->kv_done);
        KVT_RETURN_IF(hq.dev != ls->kv_dev, KVT_ERR_STATE,
                      "submit_queries: layer %d: with column sums, queries and keys must both be "
                      "host or both device tensors",
                      layer);
    }
    if (s->opts.with_colsum && hq.dev) {
        size_t need = (size_t)hq.n_h * n * (size_t)hq.n_d * sizeof(float);
        if (need > s->dq_f32_cap) { /* the earlier sums that read it first */
            KVT_FORWARD(dev_fail(s, kvt_capdev_mark_sync(s->dev, s->cs_last)));
            kvt_capdev_mem_free(s->dev, s->dq_f32);
            s->dq_f32 = NULL;
            s->dq_f32_cap = 0;
            KVT_FORWARD(kvt_capdev_mem_alloc(s->dev, need, false, hq.stream, (void **)&s->dq_f32));
            s->dq_f32_cap = need;
        }
        if (!ls->dcolsum)
            KVT_FORWARD(kvt_capdev_mem_alloc(s->dev,
                                             (size_t)s->model.n_q_heads * T * sizeof(double), true,
                                             hq.stream, (void **)&ls->dcolsum));
    } else if (s->opts.with_colsum) {
        size_t nq = (size_t)hq.n_h * n * (size_t)hq.n_d;
        size_t qcap = s->qf_cap;
        KVT_FORWARD(grow((void **)&s->qf, &qcap, nq * sizeof(float)));
        s->qf_cap = qcap;
        if (!ls->colsum) {
            ls->colsum = kvt_calloc((size_t)s->model.n_q_heads * T, sizeof(double));
            KVT_RETURN_IF(!ls->colsum, KVT_ERR_NOMEM, "out of memory (column sums)");
        }
    }
    if (s->opts.with_q_all)
        KVT_FORWARD(emit_view(s, KVT_KIND_Q_ALL, layer, &hq, 0, hq.n_t, tok_begin));
    uint32_t w0 = T - W;
    if (tok_end > w0) {
        uint32_t a = tok_begin > w0 ? tok_begin : w0;
        KVT_FORWARD(emit_view(s, KVT_KIND_Q_WINDOW, layer, &hq, (int64_t)(a - tok_begin),
                              tok_end - a, a - w0));
    }
    if (s->opts.with_colsum && hq.dev) { /* enqueued on the query's stream; host time only */
        uint64_t t0 = kvt_now_ns();
        kvt_capdev_view dq = dev_view(&hq);
        /* dq_f32 and the sums' workspace: after the last sums that read them (any layer's,
         * which also chains this layer's accumulation); the keys: after their gathers */
        KVT_FORWARD(dev_after(s, s->cs_last, hq.stream));
        KVT_FORWARD(dev_after(s, ls->dk_mark, hq.stream));
        KVT_FORWARD(dev_fail(
            s, kvt_capdev_gather(s->dev, &dq, 0, hq.n_t, KVT_DTYPE_F32, s->dq_f32, hq.n_t, 0)));
        KVT_FORWARD(
            dev_fail(s, kvt_capdev_colsum(s->dev, s->dq_f32, ls->dk_f32, ls->dcolsum,
                                          s->model.n_q_heads, s->model.n_kv_heads, tok_begin, n, T,
                                          s->model.head_dim, s->scale, hq.stream)));
        KVT_FORWARD(dev_mark(s, &s->cs_last, hq.stream)); /* covers this layer's sums too */
        s->stats.colsum_ns += kvt_now_ns() - t0;
    } else if (s->opts.with_colsum) {
        uint64_t t0 = kvt_now_ns();
        gather(&hq, 0, hq.n_t, KVT_DTYPE_F32, s->qf, hq.n_t);
        kvt_colsum_accumulate_ref(s->qf, ls->k_f32, ls->colsum, s->model.n_q_heads,
                                  s->model.n_kv_heads, tok_begin, n, T, s->model.head_dim, s->scale,
                                  s->row);
        s->stats.colsum_ns += kvt_now_ns() - t0;
    }
    if (!ls->q_started) {
        ls->q_started = true;
        ls->q_begin = tok_begin;
    }
    ls->q_done = tok_end;
    s->stats.n_submits++;
    if (s->opts.with_colsum && tok_end == T)
        KVT_FORWARD(finish_colsum(s, layer));
    return KVT_OK;
}

/* ---- decode ---- */

/* The first layer whose prompt is incomplete, with a message; -1 if all are complete. */
static int prompt_gap(const kvt_capture_session *s, char *msg, size_t cap)
{
    uint32_t T = s->opts.n_tokens;
    for (int l = 0; l < s->model.n_layers; l++) {
        const layer_state *ls = &s->layers[l];
        if (ls->kv_done != T) {
            snprintf(msg, cap, "layer %d has K/V for %u of %u prompt tokens", l, ls->kv_done, T);
            return l;
        }
        if (ls->q_done != T) {
            snprintf(msg, cap, "layer %d has queries up to token %u of %u", l, ls->q_done, T);
            return l;
        }
    }
    return -1;
}

static kvt_status flush_decode(kvt_capture_session *s, int layer)
{
    layer_state *ls = &s->layers[layer];
    uint32_t n = ls->dec_done - ls->dec_flushed, C = s->dec_chunk;
    if (n == 0)
        return KVT_OK;
    size_t row = (size_t)s->model.head_dim * s->es;
    int hq = s->model.n_q_heads, hkv = s->model.n_kv_heads;
    if (ls->dec_mem == 2) { /* the device chunk, same layout */
        size_t cq = row * C * (size_t)hq, ckv = row * C * (size_t)hkv;
        /* the side stream waited for every gather into the chunk (submit_decode) */
        KVT_FORWARD(dev_fail(s, kvt_capdev_to_host(s->dev, NULL, ls->ddq, ls->dq, cq)));
        KVT_FORWARD(dev_fail(s, kvt_capdev_to_host(s->dev, NULL, ls->ddk, ls->dk, ckv)));
        KVT_FORWARD(dev_fail(s, kvt_capdev_to_host(s->dev, NULL, ls->ddv, ls->dv, ckv)));
    }
    if (n < C) { /* compact [H, C, D] to [H, n, D] */
        for (int h = 1; h < hq; h++)
            memmove(ls->dq + h * n * row, ls->dq + h * C * row, n * row);
        for (int h = 1; h < hkv; h++) {
            memmove(ls->dk + h * n * row, ls->dk + h * C * row, n * row);
            memmove(ls->dv + h * n * row, ls->dv + h * C * row, n * row);
        }
    }
    uint32_t g0 = ls->dec_flushed, g1 = ls->dec_done;
    uint32_t D = (uint32_t)s->model.head_dim;
    KVT_FORWARD(
        emit(s, KVT_KIND_Q_DECODE, layer, (uint32_t)hq, g0, g1, D, s->model.kv_dtype, ls->dq));
    KVT_FORWARD(
        emit(s, KVT_KIND_K_DECODE, layer, (uint32_t)hkv, g0, g1, D, s->model.kv_dtype, ls->dk));
    KVT_FORWARD(
        emit(s, KVT_KIND_V_DECODE, layer, (uint32_t)hkv, g0, g1, D, s->model.kv_dtype, ls->dv));
    ls->dec_flushed = g1;
    return KVT_OK;
}

static kvt_status flush_decode_tokens(kvt_capture_session *s)
{
    uint32_t n = s->dec_tok_done - s->dec_tok_flushed;
    if (n == 0)
        return KVT_OK;
    KVT_FORWARD(emit(s, KVT_KIND_DECODE_TOKEN_IDS, -1, 1, s->dec_tok_flushed, s->dec_tok_done, 1,
                     KVT_DTYPE_I32, s->dec_tok));
    s->dec_tok_flushed = s->dec_tok_done;
    return KVT_OK;
}

kvt_status kvt_capture_submit_decode(kvt_capture_session *s, int layer, uint32_t step,
                                     const struct kvt_tensor_view *q,
                                     const struct kvt_tensor_view *k,
                                     const struct kvt_tensor_view *v)
{
    KVT_FORWARD(check_common(s, layer, "submit_decode"));
    hview hq, hk, hv;
    int Hq = s->model.n_q_heads, Hkv = s->model.n_kv_heads, D = s->model.head_dim;
    KVT_FORWARD(check_view(q, "submit_decode: Q", Hq, D, &hq));
    KVT_FORWARD(check_view(k, "submit_decode: K", Hkv, D, &hk));
    KVT_FORWARD(check_view(v, "submit_decode: V", Hkv, D, &hv));
    KVT_RETURN_IF(hq.n_t != hk.n_t || hq.n_t != hv.n_t, KVT_ERR_INVALID_ARG,
                  "submit_decode: Q, K and V cover %lld, %lld and %lld steps", (long long)hq.n_t,
                  (long long)hk.n_t, (long long)hv.n_t);
    if (!s->prompt_complete) {
        char msg[160];
        if (prompt_gap(s, msg, sizeof(msg)) >= 0)
            return kvt_error_set(KVT_ERR_STATE,
                                 "submit_decode: the prompt must be complete first: %s", msg);
        s->prompt_complete = true;
    }
    layer_state *ls = &s->layers[layer];
    uint32_t n = (uint32_t)hq.n_t, G = s->opts.n_decode, C = s->dec_chunk;
    KVT_RETURN_IF(step != ls->dec_done, KVT_ERR_STATE,
                  "submit_decode: layer %d: step %u submitted, next expected %u", layer, step,
                  ls->dec_done);
    KVT_RETURN_IF(n > G - step, KVT_ERR_INVALID_ARG,
                  "submit_decode: layer %d: steps [%u, %u) go past the planned n_decode %u", layer,
                  step, step + n, G);
    KVT_RETURN_IF(hk.dev != hq.dev || hv.dev != hq.dev, KVT_ERR_INVALID_ARG,
                  "submit_decode: layer %d: Q, K and V must all be host or all device tensors",
                  layer);
    KVT_FORWARD(need_dev(s, &hq, 0)); /* (views on another device become host views) */
    KVT_FORWARD(need_dev(s, &hk, 1));
    KVT_FORWARD(need_dev(s, &hv, 2));
    int mem = hq.dev ? 2 : 1;
    KVT_RETURN_IF(ls->dec_mem && ls->dec_mem != mem, KVT_ERR_STATE,
                  "submit_decode: layer %d: decode steps from %s tensors after %s ones", layer,
                  hq.dev ? "device" : "host", hq.dev ? "host" : "device");
    if (hq.dev && !ls->ddq) {
        size_t row = (size_t)D * s->es * C;
        KVT_FORWARD(
            kvt_capdev_mem_alloc(s->dev, row * (size_t)Hq, false, hq.stream, (void **)&ls->ddq));
        KVT_FORWARD(
            kvt_capdev_mem_alloc(s->dev, row * (size_t)Hkv, false, hq.stream, (void **)&ls->ddk));
        KVT_FORWARD(
            kvt_capdev_mem_alloc(s->dev, row * (size_t)Hkv, false, hq.stream, (void **)&ls->ddv));
    }
    if (!ls->dq) {
        size_t row = (size_t)D * s->es * C;
        ls->dq = kvt_malloc(row * (size_t)Hq);
        ls->dk = kvt_malloc(row * (size_t)Hkv);
        ls->dv = kvt_malloc(row * (size_t)Hkv);
        if (!ls->dq || !ls->dk || !ls->dv) {
            kvt_free(ls->dq);
            kvt_free(ls->dk);
            kvt_free(ls->dv);
            ls->dq = ls->dk = ls->dv = NULL;
            return kvt_error_set(KVT_ERR_NOMEM, "out of memory (decode buffers)");
        }
    }
    s->decode_started = true;
    ls->dec_mem = mem;
    size_t row = (size_t)D * s->es;
    for (uint32_t t = 0; t < n;) {
        uint32_t c = ls->dec_done - ls->dec_flushed;
        uint32_t take = C - c < n - t ? C - c : n - t;
        kvt_dtype dt = s->model.kv_dtype;
        if (hq.dev) { /* into the device chunk; copied to the host one at the flush */
            kvt_capdev_view vq = dev_view(&hq), vk = dev_view(&hk), vv = dev_view(&hv);
            KVT_FORWARD(dev_fail(s, kvt_capdev_gather(s->dev, &vq, t, take, dt, ls->ddq, C, c)));
            KVT_FORWARD(dev_fail(s, kvt_capdev_gather(s->dev, &vk, t, take, dt, ls->ddk, C, c)));
            KVT_FORWARD(dev_fail(s, kvt_capdev_gather(s->dev, &vv, t, take, dt, ls->ddv, C, c)));
            /* the flush copies on the side stream: it waits for each gather now, so the
               engine's streams wait for nothing of the capture's */
            void *st[3] = {hq.stream, hk.stream, hv.stream}; /* one mark per distinct stream */
            for (int i = 0; i < 3; i++) {
                if ((i > 0 && st[i] == st[0]) || (i > 1 && st[i] == st[1]))
                    continue;
                KVT_FORWARD(dev_mark(s, &s->dec_marks[i], st[i]));
                KVT_FORWARD(dev_fail(s, kvt_capdev_side_after(s->dev, s->dec_marks[i])));
            }
        } else {
            gather(&hq, t, take, dt, ls->dq + c * row, C);
            gather(&hk, t, take, dt, ls->dk + c * row, C);
            gather(&hv, t, take, dt, ls->dv + c * row, C);
        }
        ls->dec_done += take;
        t += take;
        if (ls->dec_done - ls->dec_flushed == C)
            KVT_FORWARD(flush_decode(s, layer));
    }
    s->stats.n_submits++;
    return KVT_OK;
}

kvt_status kvt_capture_submit_decode_token(kvt_capture_session *s, uint32_t step, int32_t token_id)
{
    KVT_FORWARD(check_common(s, 0, "submit_decode_token"));
    KVT_RETURN_IF(step != s->dec_tok_done, KVT_ERR_STATE,
                  "submit_decode_token: step %u submitted, next expected %u", step,
                  s->dec_tok_done);
    KVT_RETURN_IF(step >= s->opts.n_decode, KVT_ERR_INVALID_ARG,
                  "submit_decode_token: step %u is past the planned n_decode %u", step,
                  s->opts.n_decode);
    s->dec_tok[s->dec_tok_done - s->dec_tok_flushed] = token_id;
    s->dec_tok_done++;
    s->stats.n_submits++;
    if (s->dec_tok_done - s->dec_tok_flushed == s->dec_chunk)
        KVT_FORWARD(flush_decode_tokens(s));
    return KVT_OK;
}

/* ---- close ---- */

static void update_stats(kvt_capture_session *s)
{
    kvt_trace_writer_get_stats(s->w, &s->stats.writer);
    s->stats.stall_ns = s->stats.writer.stall_ns;
    if (s->dev) {
        kvt_capdev_stats ds;
        kvt_capdev_get_stats(s->dev, &ds);
        s->stats.device_d2h_bytes = ds.d2h_bytes;
        s->stats.device_stall_ns = ds.stall_ns;
        s->stats.device_bytes = ds.peak_device_bytes;
        s->stats.pinned_bytes = ds.pinned_bytes;
        s->stats.device_peak_slots = ds.peak_in_flight;
        s->stats.device_slots = ds.n_slots;
    }
    uint32_t g = s->opts.n_decode ? UINT32_MAX : 0;
    for (int l = 0; l < s->model.n_layers; l++)
        if (s->layers[l].dec_done < g)
            g = s->layers[l].dec_done;
    s->stats.n_decode = g;
}

void kvt_capture_get_stats(kvt_capture_session *s, struct kvt_capture_stats *out)
{
    memset(out, 0, sizeof(*out));
    if (!s)
        return;
    update_stats(s);
    *out = s->stats;
}

/* Positions 0..T-1 and all-text modality for tables the engine did not give. */
static kvt_status write_default_tokens(kvt_capture_session *s, cJSON *defaults)
{
    uint32_t T = s->opts.n_tokens;
    KVT_FORWARD(grow((void **)&s->scratch, &s->scratch_cap, (size_t)T * sizeof(int32_t)));
    int32_t *pos = (int32_t *)(void *)s->scratch;
    if (!s->have_positions && s->model.rope != KVT_ROPE_MROPE) {
        for (uint32_t i = 0; i < T; i++)
            pos[i] = (int32_t)i;
        KVT_FORWARD(emit(s, KVT_KIND_POSITIONS, -1, 1, 0, T, 1, KVT_DTYPE_I32, pos));
        cJSON_AddItemToArray(defaults, cJSON_CreateString("positions"));
    }
    if (!s->have_modality) {
        memset(s->scratch, KVT_MOD_TEXT, T);
        KVT_FORWARD(emit(s, KVT_KIND_MODALITY, -1, 1, 0, T, 1, KVT_DTYPE_U8, s->scratch));
        cJSON_AddItemToArray(defaults, cJSON_CreateString("modality"));
    }
    return KVT_OK;
}

/* Everything close writes before the writer's finish. */
static kvt_status close_records(kvt_capture_session *s, bool *complete, char *gap, size_t cap)
{
    if (s->dev)
        KVT_FORWARD(dev_fail(s, kvt_capdev_drain(s->dev)));
    for (int l = 0; l < s->model.n_layers; l++)
        KVT_FORWARD(flush_decode(s, l));
    KVT_FORWARD(flush_decode_tokens(s));
    cJSON *meta = cJSON_CreateObject();
    KVT_RETURN_IF(!meta, KVT_ERR_NOMEM, "out of memory (meta_json)");
    cJSON *defaults = cJSON_AddArrayToObject(meta, "defaulted_tables");
    kvt_status st = KVT_OK;
    if (defaults)
        st = write_default_tokens(s, defaults);
    *complete = prompt_gap(s, gap, cap) < 0;
    char *txt = NULL;
    if (st == KVT_OK) {
        update_stats(s);
        cJSON *cs = cJSON_AddObjectToObject(meta, "capture_stats");
        if (cs) {
            cJSON_AddBoolToObject(cs, "complete", *complete);
            if (!*complete)
                cJSON_AddStringToObject(cs, "missing", gap);
            cJSON_AddNumberToObject(cs, "n_decode", s->stats.n_decode);
            cJSON_AddNumberToObject(cs, "n_decode_tokens", s->dec_tok_done);
            cJSON_AddNumberToObject(cs, "n_submits", (double)s->stats.n_submits);
            cJSON_AddNumberToObject(cs, "bytes_submitted", (double)s->stats.bytes_submitted);
            cJSON_AddNumberToObject(cs, "stall_ns", (double)s->stats.stall_ns);
            if (s->dev) {
                cJSON *dv = cJSON_AddObjectToObject(cs, "device");
                if (dv) {
                    cJSON_AddNumberToObject(dv, "cuda_device", s->dev_device);
                    cJSON_AddNumberToObject(dv, "d2h_bytes", (double)s->stats.device_d2h_bytes);
                    cJSON_AddNumberToObject(dv, "stall_ns", (double)s->stats.device_stall_ns);
                    cJSON_AddNumberToObject(dv, "device_bytes", (double)s->stats.device_bytes);
                    cJSON_AddNumberToObject(dv, "pinned_bytes", (double)s->stats.pinned_bytes);
                    cJSON_AddNumberToObject(dv, "ring_slots", s->stats.device_slots);
                    cJSON_AddNumberToObject(dv, "peak_slots_in_flight", s->stats.device_peak_slots);
                    cJSON_AddNumberToObject(dv, "other_device_bytes",
                                            (double)s->stats.other_device_bytes);
                }
            }
        }
        cJSON *tl = cJSON_AddObjectToObject(meta, "timeline");
        if (tl && s->has_timeline) {
            const kvt_capture_timeline *t = &s->timeline;
            cJSON_AddStringToObject(tl, "source", "cupti");
            cJSON_AddNumberToObject(tl, "n_kernels", (double)t->n_kernels);
            cJSON_AddNumberToObject(tl, "attention_ns", (double)t->attention_ns);
            cJSON_AddNumberToObject(tl, "gemm_ns", (double)t->gemm_ns);
            cJSON_AddNumberToObject(tl, "other_ns", (double)t->other_ns);
            cJSON_AddNumberToObject(tl, "n_memcpy", (double)t->n_memcpy);
            cJSON_AddNumberToObject(tl, "memcpy_bytes", (double)t->memcpy_bytes);
            cJSON_AddNumberToObject(tl, "memcpy_ns", (double)t->memcpy_ns);
            cJSON_AddNumberToObject(tl, "capture_copy_bytes", (double)t->capture_copy_bytes);
            cJSON_AddNumberToObject(tl, "capture_copy_ns", (double)t->capture_copy_ns);
            cJSON_AddNumberToObject(tl, "capture_copy_overlap_ns",
                                    (double)t->capture_copy_overlap_ns);
        } else if (tl)
            cJSON_AddStringToObject(tl, "absent",
                                    s->timeline_absent[0] ? s->timeline_absent
                                                          : "not collected by this engine");
        txt = cJSON_PrintUnformatted(meta);
        if (!cs || !tl || !txt || !defaults)
            st = kvt_error_set(KVT_ERR_NOMEM, "out of memory (meta_json)");
    }
    if (st == KVT_OK) {
        st = kvt_trace_writer_append_json(s->w, txt);
        if (st != KVT_OK) {
            s->err = st;
            snprintf(s->err_msg, sizeof(s->err_msg), "%s", kvt_error_msg());
        }
    }
    cJSON_free(txt);
    cJSON_Delete(meta);
    return st;
}

kvt_status kvt_capture_set_timeline(kvt_capture_session *s, const kvt_capture_timeline *t)
{
    KVT_RETURN_IF(!s || !t, KVT_ERR_INVALID_ARG, "set_timeline: NULL argument");
    s->timeline = *t;
    s->has_timeline = true;
    s->timeline_absent[0] = '\0';
    return KVT_OK;
}

kvt_status kvt_capture_set_timeline_absent(kvt_capture_session *s, const char *reason)
{
    KVT_RETURN_IF(!s || !reason || !reason[0], KVT_ERR_INVALID_ARG,
                  "set_timeline_absent: a reason is required");
    snprintf(s->timeline_absent, sizeof(s->timeline_absent), "%s", reason);
    for (char *c = s->timeline_absent; *c; c++) /* one line */
        if (*c == '\n' || *c == '\r')
            *c = ' ';
    s->has_timeline = false;
    return KVT_OK;
}

const char *kvt_capture_file(const kvt_capture_session *s)
{
    return s ? kvt_trace_writer_file(s->w) : NULL;
}

void *kvt_capture_device_stream(const kvt_capture_session *s)
{
    return s ? kvt_capdev_stream(s->dev) : NULL;
}

kvt_status kvt_capture_reserve_device(int device, uint64_t ring_bytes, uint64_t max_record_bytes)
{
    return kvt_capdev_reserve(device, ring_bytes, max_record_bytes);
}

void kvt_capture_release_device_reserve(void)
{
    kvt_capdev_unreserve();
}

uint64_t kvt_capture_device_reserved_bytes(void)
{
    return kvt_capdev_reserved_bytes();
}

kvt_status kvt_capture_sync_device(kvt_capture_session *s)
{
    KVT_RETURN_IF(!s, KVT_ERR_INVALID_ARG, "sync_device: null session");
    return s->dev ? dev_fail(s, kvt_capdev_sync(s->dev)) : KVT_OK;
}

kvt_status kvt_capture_close(kvt_capture_session *s, struct kvt_capture_stats *stats)
{
    if (stats)
        memset(stats, 0, sizeof(*stats));
    if (!s)
        return KVT_OK;
    kvt_status st = s->err != KVT_OK ? sticky(s) : KVT_OK;
    if (st != KVT_OK && s->dev)
        (void)kvt_capdev_drain(s->dev); /* records already copied still reach the file */
    bool complete = false;
    char gap[160] = "";
    if (st == KVT_OK)
        st = close_records(s, &complete, gap, sizeof(gap));
    if (st == KVT_OK) {
        /* an incomplete capture never replaces an existing trace (force): it stays next to
           it, and the old one is kept */
        st = kvt_trace_writer_finish_ex(s->w, complete);
        if (st == KVT_OK && !complete)
            st = kvt_error_set(KVT_ERR_STATE, "capture closed with an incomplete prompt: %s", gap);
    }
    if (stats) {
        update_stats(s);
        *stats = s->stats;
    }
    session_free(s);
    return st;
}
