/* layer_ctx.c - the layer context, computed once per layer and shared by every policy
 * (DESIGN §3): window and decode attention probabilities in f32 with their full outputs,
 * key/value norms, unit keys, their mean and the head redundancy r, and a small cache of
 * pooled window scores keyed by (W, kernel, pool, reduce, granularity).
 */
#include <math.h>
#include <string.h>

#include "cuda/ctx_gpu.h"
#include "replay_internal.h"

static kvt_status alloc_n(void **p, size_t n, size_t elem)
{
    size_t bytes;
    if (kvt_mul_overflow(n, elem, &bytes))
        return kvt_error_set(KVT_ERR_OVERFLOW, "layer context: size overflow");
    *p = kvt_calloc(bytes ? bytes : 1, 1);
    return *p ? KVT_OK : kvt_error_set(KVT_ERR_NOMEM, "layer context: out of memory");
}
#define ALLOC(ptr, n) alloc_n((void **)&(ptr), (size_t)(n), sizeof(*(ptr)))

/* The arrays a GPU context keeps on the device until a host reader fetches them: not zeroed
 * (kvt_ctx_fetch writes them whole), so that fresh pages are never touched when no one asks. */
static kvt_status alloc_lazy(void **p, size_t n, size_t elem, bool gpu)
{
    size_t bytes;
    if (!gpu)
        return alloc_n(p, n, elem);
    if (kvt_mul_overflow(n, elem, &bytes))
        return kvt_error_set(KVT_ERR_OVERFLOW, "layer context: size overflow");
    *p = kvt_malloc(bytes ? bytes : 1);
    return *p ? KVT_OK : kvt_error_set(KVT_ERR_NOMEM, "layer context: out of memory");
}
#define ALLOC_LAZY(ptr, n) alloc_lazy((void **)&(ptr), (size_t)(n), sizeof(*(ptr)), gpu)

static kvt_status cover_begin(kvt_kv_cover *c, const kvt_layer_input *in, bool is_k)
{
    c->in = in, c->what = is_k ? "K" : "V", c->covered = 0, c->n = (size_t)in->Hkv * in->T,
    c->end = 0;
    c->buf = NULL, c->cap = 0;
    c->seen = kvt_calloc(c->n ? c->n : 1, 1);
    return c->seen ? KVT_OK : kvt_error_set(KVT_ERR_NOMEM, "layer context: out of memory");
}

kvt_status kvt_kv_cover_add(kvt_kv_cover *c, const kvt_trace_piece *p, uint64_t bytes)
{
    const kvt_layer_input *in = c->in;
    const uint64_t all = (uint64_t)c->n * in->D * 2;
    const bool inside = p->head_begin < p->head_end && p->head_end <= (uint32_t)in->Hkv &&
                        p->tok_begin < p->tok_end && p->tok_end <= (uint32_t)in->T;
    const uint64_t nb =
        inside ? (uint64_t)(p->head_end - p->head_begin) * (p->tok_end - p->tok_begin) * in->D * 2
               : 0;
    KVT_RETURN_IF(!inside || p->offset % 2 || p->offset > all || nb > all - p->offset,
                  KVT_ERR_INVALID_ARG,
                  "layer %d: %s piece heads [%u,%u) x tokens [%u,%u) at byte %llu lies outside "
                  "[%d, %d] or its %llu bytes",
                  in->layer, c->what, p->head_begin, p->head_end, p->tok_begin, p->tok_end,
                  (unsigned long long)p->offset, in->Hkv, in->T, (unsigned long long)all);
    KVT_RETURN_IF(bytes && nb != bytes, KVT_ERR_INVALID_ARG,
                  "layer %d: a %s record's %llu bytes disagree with its piece", in->layer, c->what,
                  (unsigned long long)bytes);
    for (uint32_t h = p->head_begin; h < p->head_end; h++) {
        uint8_t *r = c->seen + (size_t)h * in->T;
        for (uint32_t t = p->tok_begin; t < p->tok_end; t++)
            KVT_RETURN_IF(r[t]++, KVT_ERR_INVALID_ARG,
                          "layer %d: %s pieces overlap at head %u token %u", in->layer, c->what, h,
                          t);
        c->covered += p->tok_end - p->tok_begin;
    }
    c->end = p->offset + nb > c->end ? p->offset + nb : c->end;
    return KVT_OK;
}

kvt_status kvt_kv_cover_room(kvt_kv_cover *c, size_t bytes, void **buf)
{
    if (bytes > c->cap) {
        kvt_free(c->buf);
        c->cap = 0;
        KVT_RETURN_IF(!(c->buf = kvt_malloc(bytes ? bytes : 1)), KVT_ERR_NOMEM,
                      "layer %d: out of memory reading %s", c->in->layer, c->what);
        c->cap = bytes;
    }
    *buf = c->buf;
    return KVT_OK;
}

/* every row covered (when ok); frees the tracker either way */
static kvt_status cover_end(kvt_kv_cover *c, bool ok)
{
    kvt_free(c->seen);
    kvt_free(c->buf);
    c->seen = c->buf = NULL;
    KVT_RETURN_IF(ok && c->covered != c->n, KVT_ERR_INVALID_ARG,
                  "layer %d: %s pieces cover %zu of %zu rows", c->in->layer, c->what, c->covered,
                  c->n);
    return KVT_OK;
}

kvt_status kvt_kv_cover_run(kvt_kv_cover *c, const kvt_layer_input *in, int kind,
                            kvt_status (*given)(void *user, const kvt_trace_piece *pc, size_t n_pc),
                            void *user, const kvt_trace_sink *sink, uint64_t *rest_ns)
{
    const bool is_k = kind == KVT_KIND_K;
    const kvt_trace_piece *pc = is_k ? in->k_pieces : in->v_pieces;
    const size_t n_pc = is_k ? in->n_k_pieces : in->n_v_pieces;
    KVT_FORWARD(cover_begin(c, in, is_k));
    kvt_status s = KVT_OK;
    for (size_t i = 0; i < n_pc && !s; i++)
        s = kvt_kv_cover_add(c, &pc[i], 0);
    if (!s)
        s = given(user, pc, n_pc);
    if (!s && in->kv_rest) {
        const uint64_t t0 = rest_ns ? kvt_now_ns() : 0;
        s = in->kv_rest(in->kv_user, kind, n_pc, sink);
        if (rest_ns)
            *rest_ns += kvt_now_ns() - t0;
    }
    kvt_status e = cover_end(c, !s);
    return s ? s : e;
}

/* piece p's elements (src: as stored) widened into x [Hkv, T, D] */
static kvt_status widen_piece(const kvt_layer_ctx *c, const kvt_trace_piece *p, const void *src,
                              float *x)
{
    const size_t T = (size_t)c->T, D = (size_t)c->D;
    return kvt_widen_stored_ref(c->in->k16_dtype, p->planes, src,
                                (int)(p->head_end - p->head_begin),
                                (int)(p->tok_end - p->tok_begin), c->D, T * D,
                                x + ((size_t)p->head_begin * T + p->tok_begin) * D);
}

/* K or V on the host: the input's pieces widened from src, kv_rest's records each into the
 * cover's buffer, then widened into x */
typedef struct host_sink {
    const kvt_layer_ctx *c;
    kvt_kv_cover *cov;
    const uint8_t *src;
    float *x;
    size_t last; /* the last record's bytes */
} host_sink;

static kvt_status host_given(void *user, const kvt_trace_piece *pc, size_t n_pc)
{
    host_sink *h = user;
    for (size_t i = 0; i < n_pc; i++)
        KVT_FORWARD(widen_piece(h->c, &pc[i], h->src + pc[i].offset, h->x));
    return KVT_OK;
}

static kvt_status host_room(void *user, size_t bytes, void **buf)
{
    host_sink *h = user;
    h->last = bytes;
    return kvt_kv_cover_room(h->cov, bytes, buf);
}

static kvt_status host_put(void *user, const kvt_trace_piece *p, void *buf)
{
    host_sink *h = user;
    KVT_FORWARD(kvt_kv_cover_add(h->cov, p, h->last));
    return widen_piece(h->c, p, buf, h->x);
}

/* x [Hkv, T, D] in f32 from the 16-bit src (kind: KVT_KIND_K or V): its elements in order, or
 * the input's pieces as stored and the records kv_rest reads after them */
static kvt_status widen_16(const kvt_layer_ctx *c, int kind, const uint16_t *src, float *x)
{
    const kvt_layer_input *in = c->in;
    if (!kvt_kv_stored(in))
        return kvt_convert_to_f32(in->k16_dtype, src, x, (size_t)c->Hkv * c->T * c->D);
    kvt_kv_cover cov;
    host_sink h = {c, &cov, (const uint8_t *)src, x, 0};
    const kvt_trace_sink sink = {host_room, host_put, &h};
    return kvt_kv_cover_run(&cov, in, kind, host_given, &h, &sink, NULL);
}

/* K and V widened from the input's 16-bit arrays (or pieces) into kv_own */
static kvt_status widen_kv(kvt_layer_ctx *c)
{
    const size_t n = (size_t)c->Hkv * c->T * c->D;
    if (!c->kv_own && !(c->kv_own = kvt_malloc(2 * n * sizeof(float))))
        return kvt_error_set(KVT_ERR_NOMEM, "layer %d: out of memory for K and V in f32", c->layer);
    KVT_FORWARD(widen_16(c, KVT_KIND_K, c->in->k16, c->kv_own));
    KVT_FORWARD(widen_16(c, KVT_KIND_V, c->in->v16, c->kv_own + n));
    c->k = c->kv_own, c->v = c->kv_own + n;
    return KVT_OK;
}

kvt_status kvt_ctx_fetch(kvt_layer_ctx *c, unsigned what)
{
    KVT_RETURN_IF(c->selecting && (what & ~c->selecting_reads), KVT_ERR_STATE,
                  "%s: internal error: reads context arrays 0x%x on the host that its definition "
                  "does not declare (host_reads 0x%x)",
                  c->selecting->name, what, c->selecting_reads);
    if (what & c->on_device & KVT_CTX_KV) {
        KVT_FORWARD(widen_kv(c));
        c->on_device &= ~KVT_CTX_KV;
    }
    static const struct {
        unsigned bit;
        kvt_gpu_array which;
    } arr[] = {{KVT_CTX_PRW, KVT_GPU_PRW}, {KVT_CTX_PRD, KVT_GPU_PRD}, {KVT_CTX_KU, KVT_GPU_KU}};
    for (size_t i = 0; i < sizeof(arr) / sizeof(arr[0]); i++) {
        if (!(what & c->on_device & arr[i].bit))
            continue;
        if (arr[i].bit == KVT_CTX_PRD && c->prd_one) { /* the group held, and each one after */
            const int g = c->prd_g;
            c->on_device &= ~KVT_CTX_PRD, c->prd_g = -1;
            if (g >= 0)
                KVT_FORWARD(kvt_ctx_prd_group(c, g));
            continue;
        }
        void *host = arr[i].bit == KVT_CTX_PRW   ? (void *)c->prw
                     : arr[i].bit == KVT_CTX_PRD ? (void *)c->prd
                                                 : (void *)c->ku;
        KVT_FORWARD(kvt_ctx_gpu_fetch(c->gpu, arr[i].which, host));
        c->on_device &= ~arr[i].bit;
    }
    return KVT_OK;
}

static kvt_status check_finite(const float *x, size_t n, const char *what, int layer)
{
    size_t i = kvt_first_nonfinite_f32_cpu(x, n);
    if (i < n)
        return kvt_error_set(KVT_ERR_NAN, "layer %d: %s element %zu is not finite", layer, what, i);
    return KVT_OK;
}

kvt_status kvt_ctx_decode_means(kvt_layer_ctx *c, bool per_query, int P, double *out)
{
    KVT_RETURN_IF(c->Gd < 1 || P < 0 || P > c->T, KVT_ERR_INVALID_ARG,
                  "decode means: no decode queries, or P=%d", P);
    if (c->gpu) /* kvt_col_mean_cuda: bitwise kvt_col_mean_ref */
        return kvt_ctx_gpu_decode_scores(c->gpu, per_query, P, out);
    /* without the GPU, prd is on the host */
    const int per = per_query ? 1 : c->Gs, H = per_query ? c->Hq : c->Hkv, R = per * c->Gd;
    for (int h = 0; h < H; h++) {
        KVT_FORWARD(kvt_ctx_prd_group(c, kvt_ctx_kv_of(c, per_query, h)));
        kvt_col_mean_ref(kvt_ctx_prd_row(c, (size_t)h * R), R, c->T, P, out + (size_t)h * P);
    }
    return KVT_OK;
}

kvt_status kvt_ctx_check_q_all(const kvt_layer_ctx *c, const char *policy)
{
    KVT_RETURN_IF(!c->in->q_all && !c->in->q_all_head, KVT_ERR_NOT_FOUND,
                  "%s needs every prompt query (Q_all): capture with --q-all (kvtrace "
                  "capture-llama2c) or with_q_all=True (kvtrace.capture)",
                  policy);
    return KVT_OK;
}

kvt_status kvt_ctx_q_all_head(const kvt_layer_ctx *c, const char *policy, int h, float *buf,
                              const float **q)
{
    const kvt_layer_input *in = c->in;
    const size_t n = (size_t)c->T * c->D;
    KVT_FORWARD(kvt_ctx_check_q_all(c, policy));
    if (in->q_all) {
        *q = in->q_all + (size_t)h * n;
    } else {
        KVT_FORWARD(in->q_all_head(in->q_all_user, h, buf));
        *q = buf;
    }
    size_t bad = kvt_first_nonfinite_f32_cpu(*q, n);
    KVT_RETURN_IF(bad < n, KVT_ERR_NAN, "%s: Q_all of query head %d, token %zu, is not finite",
                  policy, h, bad / (size_t)c->D);
    return KVT_OK;
}

/* KV group g's decode query rows [i0, i0 + n) (n <= prd_rb) into pr [n, T], their
 * log-sum-exps and, with prd_one, softmax shifts and normalisers (dzs); the probabilities over
 * decode keys into dpr2. Again (prd_one) the rows over the prompt only, in the same calls. */
static kvt_status dec_rows(kvt_layer_ctx *c, int g, int i0, int n, float *pr, bool again)
{
    const int T = c->T, D = c->D, Gd = c->Gd;
    const size_t q0 = (size_t)g * c->Gs * Gd + (size_t)i0;
    const float *q = c->in->q_decode + q0 * D, *K = c->k + (size_t)g * T * D;
    if (again)
        return kvt_attn_probs_again(q, n, D, K, T, c->dvis, c->scale, c->dzs + 2 * q0, pr,
                                    c->dwork);
    const float *Kd = c->has_extra ? c->in->k_decode + (size_t)g * Gd * D : NULL;
    return kvt_attn_probs_zs(q, n, D, K, T, c->dvis, Kd, Gd, c->dvis2 + i0, c->scale, pr, c->dpr2,
                             c->lsed + q0, c->dzs ? c->dzs + 2 * q0 : NULL, c->dwork);
}

/* decode query row q's mass on the decode keys from its probabilities over them p2 [Gd] */
static void dec_mass(kvt_layer_ctx *c, size_t q, const float *p2)
{
    double pe = 0.0;
    for (int e = 0; e < c->Gd; e++)
        pe += p2[e];
    c->pd_extra[q] = pe;
}

kvt_status kvt_ctx_prd_group(kvt_layer_ctx *c, int g)
{
    if (!c->prd_one || c->prd_g == g)
        return KVT_OK;
    KVT_RETURN_IF(g < 0 || g >= c->Hkv, KVT_ERR_INVALID_ARG, "layer %d: no KV head %d", c->layer,
                  g);
    const int nqd = c->Gs * c->Gd;
    uint64_t t0 = kvt_now_ns();
    c->prd_g = -1;
    if (c->gpu) { /* the device holds them all: the sweeps read the group's rows there */
        const size_t r0 = (size_t)g * nqd;
        kvt_ctx_gpu_map_prd(c->gpu, c->prd, r0, (size_t)nqd);
        if (!(c->on_device & KVT_CTX_PRD)) { /* a host reader fetched them: copy the group's */
            KVT_FORWARD(kvt_ctx_gpu_fetch_prd_rows(c->gpu, r0, (size_t)nqd, c->prd));
            KVT_PROF_ADD(c->prof, prd_copied_ns, kvt_now_ns() - t0);
            KVT_PROF_ADD(c->prof, prd_copied, 1);
        }
        c->prd_g = g, c->prd_r0 = r0;
        return KVT_OK;
    }
    for (int i0 = 0; i0 < nqd; i0 += c->prd_rb) {
        const int n = nqd - i0 < c->prd_rb ? nqd - i0 : c->prd_rb;
        KVT_FORWARD(dec_rows(c, g, i0, n, c->prd + (size_t)i0 * c->T, true));
    }
    c->prd_g = g, c->prd_r0 = (size_t)g * nqd;
    KVT_PROF_ADD(c->prof, prd_again_ns, kvt_now_ns() - t0);
    KVT_PROF_ADD(c->prof, prd_again, 1);
    return KVT_OK;
}

kvt_status kvt_ctx_build(const kvt_layer_input *in, kvt_layer_ctx *c)
{
    return kvt_ctx_build_on(in, c, false, KVT_DECODE_PROBS_ALL, NULL);
}

kvt_status kvt_ctx_build_on(const kvt_layer_input *in, kvt_layer_ctx *c, bool gpu,
                            kvt_decode_probs dp, kvt_replay_profile *prof)
{
    memset(c, 0, sizeof(*c));
    KVT_RETURN_IF(!in || !in->q_window, KVT_ERR_INVALID_ARG, "layer context: Q_window is required");
    const bool stored = kvt_kv_stored(in),
               is16 = in->k16_dtype == KVT_DTYPE_BF16 || in->k16_dtype == KVT_DTYPE_F16;
    KVT_RETURN_IF(stored ? in->k || in->v || !is16 ||
                               (in->n_k_pieces && (!in->k16 || !in->k_pieces)) ||
                               (in->n_v_pieces && (!in->v16 || !in->v_pieces))
                  : in->k16 ? !in->v16 || in->k || in->v || !is16
                            : !in->k || !in->v || in->v16,
                  KVT_ERR_INVALID_ARG,
                  "layer context: K and V are required, in f32 or 16-bit with their dtype (in "
                  "order, or as stored pieces with their arrays), one way");
    KVT_RETURN_IF(in->T < 1 || in->D < 1 || in->Hkv < 1 || in->Hq < in->Hkv || in->Hq % in->Hkv ||
                      in->W < 1 || in->W > in->T || in->G < 0,
                  KVT_ERR_INVALID_ARG,
                  "layer %d: bad shape T=%d D=%d Hq=%d Hkv=%d W=%d G=%d (need Hq a multiple of "
                  "Hkv, 1 <= W <= T)",
                  in->layer, in->T, in->D, in->Hq, in->Hkv, in->W, in->G);
    KVT_RETURN_IF(in->G > 0 && !in->q_decode, KVT_ERR_INVALID_ARG, "G > 0 without Q_decode");
    KVT_RETURN_IF(!in->k_decode != !in->v_decode, KVT_ERR_INVALID_ARG,
                  "K_decode and V_decode go together");
    c->in = in;
    c->prof = prof;
    c->T = in->T, c->D = in->D, c->Hq = in->Hq, c->Hkv = in->Hkv, c->Gs = in->Hq / in->Hkv;
    c->Wt = in->W, c->Gd = in->q_decode ? in->G : 0, c->layer = in->layer;
    c->n_layers = in->n_layers;
    c->scale = in->scale > 0.0 ? in->scale : 1.0 / sqrt((double)in->D);
    c->has_extra = c->Gd > 0 && in->k_decode;
    c->k = in->k, c->v = in->v;
    if (in->k16 || stored) /* widened on the device; on the host here, or when asked */
        c->on_device = KVT_CTX_KV;
    const int T = c->T, D = c->D, Hq = c->Hq, Hkv = c->Hkv, Wt = c->Wt, Gd = c->Gd;
    size_t kv_n = (size_t)Hkv * T * D;
    kvt_status s;
    double *work = NULL;
    int *vis = NULL, *vis2 = NULL;
    kvt_ctx_gpu *dev = NULL;

    /* K and V (the large inputs) are checked on the GPU with --device cuda, once uploaded */
    if (!gpu &&
        ((s = kvt_ctx_fetch(c, KVT_CTX_KV)) || (s = check_finite(c->k, kv_n, "K", in->layer)) ||
         (s = check_finite(c->v, kv_n, "V", in->layer))))
        goto out_fail;
    if ((s = check_finite(in->q_window, (size_t)Hq * Wt * D, "Q_window", in->layer)))
        goto out_fail;
    if (Gd > 0 && (s = check_finite(in->q_decode, (size_t)Hq * Gd * D, "Q_decode", in->layer)))
        goto out_fail;
    if (c->has_extra &&
        ((s = check_finite(in->k_decode, (size_t)Hkv * Gd * D, "K_decode", in->layer)) ||
         (s = check_finite(in->v_decode, (size_t)Hkv * Gd * D, "V_decode", in->layer))))
        goto out_fail;

    /* the query heads of one KV head share its keys: one call per KV head, Gs*rows queries */
    const int Gs = c->Gs, nqw = Gs * Wt, nqd = Gs * Gd;
    if ((s = ALLOC(work, (size_t)T + (size_t)Gd)) || (s = ALLOC(vis, nqw > nqd ? nqw : nqd)) ||
        (s = ALLOC(vis2, nqd > 0 ? nqd : 1)) || (s = ALLOC_LAZY(c->prw, (size_t)Hq * Wt * T)) ||
        (s = ALLOC(c->aw, (size_t)Hq * Wt * D)) || (s = ALLOC(c->lsew, (size_t)Hq * Wt)) ||
        (s = ALLOC(c->rsw, (size_t)Hq * Wt)) || (s = ALLOC(c->knorm, (size_t)Hkv * T)) ||
        (s = ALLOC(c->vnorm, (size_t)Hkv * T)) || (s = ALLOC_LAZY(c->ku, kv_n)) ||
        (s = ALLOC(c->kmean, (size_t)Hkv * D)) || (s = ALLOC(c->r_all, Hkv)))
        goto out_fail;
    if (in->modality && (s = ALLOC(c->massw_mod, (size_t)Hq * Wt * KVT_NM)))
        goto out_fail;
    if (gpu) {
        size_t bad_k = 0, bad_v = 0;
        s = kvt_ctx_gpu_begin(in, Gd, nqw > nqd ? nqw : nqd, prof, &dev);
        c->read_ns = kvt_ctx_gpu_read_ns(dev);
        if (s || (s = kvt_ctx_gpu_check_kv(dev, &bad_k, &bad_v)))
            goto out_fail;
        if (bad_k < kv_n || bad_v < kv_n) { /* check_finite's message */
            s = kvt_error_set(KVT_ERR_NAN, "layer %d: %s element %zu is not finite", in->layer,
                              bad_k < kv_n ? "K" : "V", bad_k < kv_n ? bad_k : bad_v);
            goto out_fail;
        }
    }

    /* window queries: query i sits at position T-Wt+i and sees keys 0..T-Wt+i (§0.1.2) */
    for (int i = 0; i < nqw; i++)
        vis[i] = T - Wt + i % Wt + 1;
    /* every group at once on the device, with the row masses; the probabilities stay there */
    if (dev && (s = kvt_ctx_gpu_attn(dev, false, nqw, vis, NULL, c->scale, c->lsew, c->aw, c->rsw,
                                     c->massw_mod, NULL, NULL)))
        goto out_fail;
    for (int g = 0; !dev && g < Hkv; g++) {
        size_t q0 = (size_t)g * nqw; /* first window query of the group: (h = g*Gs, i = 0) */
        float *pr = c->prw + q0 * T;
        const float *K = c->k + (size_t)g * T * D, *V = c->v + (size_t)g * T * D;
        if (!(s = kvt_attn_probs(in->q_window + q0 * D, nqw, D, K, T, vis, NULL, 0, NULL, c->scale,
                                 pr, NULL, c->lsew + q0, work)))
            s = kvt_attn_output(pr, nqw, T, T, V, D, c->aw + q0 * D, D);
        if (s)
            goto out_fail;
        for (int i = 0; i < nqw; i++) {
            c->rsw[q0 + i] = kvt_sum_f32_cpu(pr + (size_t)i * T, (size_t)T);
            if (in->modality)
                kvt_mass_by_mod_cpu(pr + (size_t)i * T, in->modality, T,
                                    c->massw_mod + (q0 + i) * KVT_NM);
        }
    }

    /* decode queries: step s sees every prompt key and decode keys 0..s */
    if (Gd > 0) {
        /* on the host in blocks of rows: their logits (kvt_attn_probs_cpu's [rows, T + Gd] f64)
           and dpr2 within 32 MiB; one KV group's rows at a time when all would be large */
        const size_t row_bytes = 8 * (size_t)T + 12 * (size_t)Gd;
        c->prd_rb =
            (size_t)nqd * row_bytes <= ((size_t)32 << 20)
                ? nqd
                : (int)(((size_t)32 << 20) / row_bytes > 0 ? ((size_t)32 << 20) / row_bytes : 1);
        /* with the GPU the device holds them all; group: the host one group's when it reads */
        c->prd_one = dp == KVT_DECODE_PROBS_GROUP && Hkv > 1;
        if (c->prd_one)
            KVT_PROF_ADD(prof, prd_group_layers, 1);
        c->prd_g = -1;
        if ((s = ALLOC_LAZY(c->prd, (size_t)(c->prd_one ? nqd : Hq * Gd) * T)) ||
            (s = ALLOC(c->ad, (size_t)Hq * Gd * D)) || (s = ALLOC(c->lsed, (size_t)Hq * Gd)) ||
            (s = ALLOC(c->rsd, (size_t)Hq * Gd)))
            goto out_fail;
        if (c->has_extra && ((s = ALLOC(c->pd_extra, (size_t)Hq * Gd)) ||
                             (s = ALLOC(c->od_extra, (size_t)Hq * Gd * D))))
            goto out_fail;
        if (!dev && ((s = ALLOC(c->dvis, c->prd_rb)) || (s = ALLOC(c->dvis2, nqd)) ||
                     (s = ALLOC(c->dwork, (size_t)T + Gd)) ||
                     (c->prd_one && (s = ALLOC(c->dzs, (size_t)2 * Hq * Gd))) ||
                     (c->has_extra && (s = ALLOC(c->dpr2, (size_t)c->prd_rb * Gd)))))
            goto out_fail;
        for (int i = 0; dev && i < nqd; i++) {
            vis[i] = T;
            vis2[i] = i % Gd + 1;
        }
        for (int i = 0; !dev && i < nqd; i++) {
            if (i < c->prd_rb)
                c->dvis[i] = T;
            c->dvis2[i] = i % Gd + 1;
        }
        if (dev && (s = kvt_ctx_gpu_attn(dev, true, nqd, vis, vis2, c->scale, c->lsed, c->ad,
                                         c->rsd, NULL, c->pd_extra, c->od_extra)))
            goto out_fail;
        for (int g = 0; !dev && g < Hkv; g++) {
            const float *V = c->v + (size_t)g * T * D;
            const float *Vd = c->has_extra ? in->v_decode + (size_t)g * Gd * D : NULL;
            float *pr = c->prd_one ? c->prd : c->prd + (size_t)g * nqd * T;
            for (int i0 = 0; i0 < nqd; i0 += c->prd_rb) {
                const int n = nqd - i0 < c->prd_rb ? nqd - i0 : c->prd_rb;
                const size_t q0 = (size_t)g * nqd + (size_t)i0;
                float *pb = pr + (size_t)i0 * T;
                /* the outputs over both blocks as dense products (kvt_attn_output) */
                if ((s = dec_rows(c, g, i0, n, pb, false)) ||
                    (s = kvt_attn_output(pb, n, T, T, V, D, c->ad + q0 * D, D)) ||
                    (c->has_extra &&
                     (s = kvt_attn_output(c->dpr2, n, Gd, Gd, Vd, D, c->od_extra + q0 * D, D))))
                    goto out_fail;
                for (int i = 0; i < n; i++) {
                    c->rsd[q0 + i] = kvt_sum_f32_cpu(pb + (size_t)i * T, (size_t)T);
                    if (c->has_extra)
                        dec_mass(c, q0 + i, c->dpr2 + (size_t)i * Gd);
                }
            }
            if (c->prd_one)
                c->prd_g = g, c->prd_r0 = (size_t)g * nqd;
        }
    }

    /* per KV head: norms, unit keys, their mean over all T (window included, §4.1.3), r */
    if (dev && (s = kvt_ctx_gpu_norms(dev, c->knorm, c->vnorm, c->kmean)))
        goto out_fail;
    for (int g = 0; g < Hkv; g++) {
        if (!dev) {
            const float *K = c->k + (size_t)g * T * D, *V = c->v + (size_t)g * T * D;
            kvt_row_norms(K, T, D, c->knorm + (size_t)g * T);
            kvt_row_norms(V, T, D, c->vnorm + (size_t)g * T);
            kvt_unit_rows(K, T, D, c->ku + (size_t)g * T * D, c->kmean + (size_t)g * D);
        }
        c->r_all[g] = kvt_redundancy_ref(c->kmean + (size_t)g * D, D, T);
    }
    if (dev && (s = kvt_ctx_gpu_finish(dev, c)))
        goto out_fail;
    c->gpu = dev; /* kept for the output sweeps; kvt_ctx_free ends it */
    if (dev)      /* what host readers must fetch (kvt_ctx_fetch) */
        c->on_device |= KVT_CTX_PRW | KVT_CTX_KU | (Gd > 0 ? KVT_CTX_PRD : 0u);
    kvt_free(work);
    kvt_free(vis);
    kvt_free(vis2);
    return KVT_OK;

out_fail:
    kvt_ctx_gpu_end(dev);
    kvt_free(work);
    kvt_free(vis);
    kvt_free(vis2);
    kvt_ctx_free(c);
    return s;
}

void kvt_ctx_free(kvt_layer_ctx *c)
{
    if (!c)
        return;
    kvt_free(c->prw);
    kvt_free(c->aw);
    kvt_free(c->lsew);
    kvt_free(c->rsw);
    kvt_free(c->rsd);
    kvt_free(c->massw_mod);
    kvt_free(c->prd);
    kvt_free(c->dvis);
    kvt_free(c->dvis2);
    kvt_free(c->dpr2);
    kvt_free(c->dwork);
    kvt_free(c->dzs);
    kvt_free(c->ad);
    kvt_free(c->pd_extra);
    kvt_free(c->od_extra);
    kvt_free(c->lsed);
    kvt_free(c->knorm);
    kvt_free(c->vnorm);
    kvt_free(c->ku);
    kvt_free(c->kmean);
    kvt_free(c->r_all);
    kvt_free(c->colsum);
    kvt_free(c->kv_own);
    kvt_ctx_gpu_end(c->gpu);
    for (int i = 0; i < c->n_cache; i++) {
        kvt_free(c->cache[i].s);
        kvt_free(c->cache[i].rank);
    }
    memset(c, 0, sizeof(*c));
}

kvt_status kvt_ctx_check_window(const kvt_layer_ctx *c, const char *policy, int W)
{
    KVT_RETURN_IF(W < 1, KVT_ERR_INVALID_ARG, "%s: window=%d must be >= 1", policy, W);
    KVT_RETURN_IF(W > c->Wt, KVT_ERR_INVALID_ARG,
                  "%s: window=%d needs %d stored window queries; the trace has %d (lower "
                  "window=, or --window for every such policy, or capture a larger window)",
                  policy, W, W, c->Wt);
    return KVT_OK;
}

kvt_status kvt_window_scores_from_probs(const float *prw, int Hq, int Hkv, int Wt, int T, int W,
                                        int kernel, kvt_pool pool, kvt_reduce reduce,
                                        bool per_query, double *s)
{
    const int P = T - W, H = per_query ? Hq : Hkv;
    double *a = NULL, *red = NULL;
    kvt_status st;
    if ((st = ALLOC(a, (size_t)Hq * P)) || (st = ALLOC(red, (size_t)H * P)))
        goto out;
    /* a_h[j] = (1/W) sum over the last W window queries of Pr[i, j], j in P (§0.1.4) */
    for (int h = 0; h < Hq; h++)
        kvt_col_mean_ref(prw + ((size_t)h * Wt + (Wt - W)) * T, W, T, P, a + (size_t)h * P);
    if (per_query)
        memcpy(red, a, (size_t)Hq * P * sizeof(double));
    else if ((st = kvt_gqa_reduce_ref(a, Hq, Hkv, P, reduce, red)))
        goto out;
    for (int h = 0; h < H && !st; h++)
        st = kvt_pool1d_ref(red + (size_t)h * P, P, kernel, pool, s + (size_t)h * P);
out:
    kvt_free(a);
    kvt_free(red);
    return st;
}

kvt_status kvt_ctx_window_scores(kvt_layer_ctx *c, int W, int kernel, kvt_pool pool,
                                 kvt_reduce reduce, bool per_query, const double **out)
{
    KVT_FORWARD(kvt_ctx_check_window(c, "window scores", W));
    for (int i = 0; i < c->n_cache; i++) {
        const kvt_score_entry *e = &c->cache[i];
        if (e->W == W && e->kernel == kernel && e->pool == pool && e->reduce == reduce &&
            e->per_query == (int)per_query) {
            *out = e->s;
            return KVT_OK;
        }
    }
    const int T = c->T, P = T - W, H = kvt_ctx_heads(c, per_query);
    double *s = NULL;
    kvt_status st;
    if ((st = ALLOC(s, (size_t)H * (P > 0 ? P : 1))))
        goto out_free;
    if (P > 0 && c->gpu) { /* the same, from the device's probabilities */
        if ((st = kvt_ctx_gpu_window_scores(c->gpu, W, kernel, pool, reduce, per_query, s)))
            goto out_free;
    } else if (P > 0 && (st = kvt_window_scores_from_probs(c->prw, c->Hq, c->Hkv, c->Wt, T, W,
                                                           kernel, pool, reduce, per_query, s))) {
        goto out_free;
    }
    if (c->n_cache == KVT_SCORE_CACHE) { /* evict the oldest */
        kvt_free(c->cache[0].s);
        kvt_free(c->cache[0].rank);
        memmove(c->cache, c->cache + 1, sizeof(c->cache[0]) * (KVT_SCORE_CACHE - 1));
        c->n_cache--;
    }
    c->cache[c->n_cache++] = (kvt_score_entry){
        .W = W, .kernel = kernel, .per_query = per_query, .pool = pool, .reduce = reduce, .s = s};
    *out = s;
    s = NULL;
out_free:
    kvt_free(s);
    return st;
}

kvt_status kvt_ctx_colsum(kvt_layer_ctx *c, const double **out)
{
    if (c->colsum) {
        *out = c->colsum;
        return KVT_OK;
    }
    const kvt_layer_input *in = c->in;
    const int T = c->T, D = c->D, Hq = c->Hq;
    KVT_RETURN_IF(!in->attn_colsum && !in->q_all && !in->q_all_head, KVT_ERR_NOT_FOUND,
                  "%s needs attention column sums: the trace has neither attn_colsum nor Q_all "
                  "for layer %d (capture with column sums or all queries)",
                  c->selecting ? c->selecting->name : "h2o", c->layer);
    kvt_status s = ALLOC(c->colsum, (size_t)Hq * T);
    if (s)
        return s;
    if (in->attn_colsum) {
        for (size_t i = 0; i < (size_t)Hq * T; i++)
            c->colsum[i] = in->attn_colsum[i];
        if ((s = check_finite(in->attn_colsum, (size_t)Hq * T, "attn_colsum", c->layer)))
            goto out_fail;
    } else {
        /* one query head at a time: from q_all, or loaded on demand into qh */
        double *work = NULL;
        float *qh = NULL;
        if ((s = ALLOC(work, T)) || (!in->q_all && (s = ALLOC(qh, (size_t)T * D))))
            goto out_colsum;
        for (int h = 0; h < Hq && !s; h++) {
            const float *q = in->q_all ? in->q_all + (size_t)h * T * D : qh;
            if ((!in->q_all && (s = in->q_all_head(in->q_all_user, h, qh))) ||
                (s = check_finite(q, (size_t)T * D, "Q_all", c->layer)))
                break;
            if (c->gpu) /* the keys are on the device already */
                s = kvt_ctx_gpu_colsum_head(c->gpu, h, q, c->scale, c->colsum + (size_t)h * T);
            else
                s = kvt_attn_colsum(q, c->k + (size_t)(h / c->Gs) * T * D, T, D, c->scale, work,
                                    c->colsum + (size_t)h * T);
        }
    out_colsum:
        kvt_free(work);
        kvt_free(qh);
        if (s)
            goto out_fail;
    }
    *out = c->colsum;
    return KVT_OK;
out_fail:
    kvt_free(c->colsum);
    c->colsum = NULL;
    return s;
}

kvt_status kvt_ctx_rank_window_all(kvt_layer_ctx *c, kvt_layer_selection *s, const double *score,
                                   int W)
{
    kvt_score_entry *e = NULL;
    for (int i = 0; i < c->n_cache && !e; i++)
        if (c->cache[i].s == score && c->cache[i].W == W && c->cache[i].per_query == s->per_query)
            e = &c->cache[i];
    size_t n = (size_t)s->n_heads * s->T;
    if (e && e->rank) {
        memcpy(s->order, e->rank, n * sizeof(int32_t));
        return KVT_OK;
    }
    KVT_FORWARD(kvt_sel_rank_window_all(s, score, W));
    if (e) {
        KVT_RETURN_IF(!(e->rank = kvt_malloc(n * sizeof(int32_t) + 1)), KVT_ERR_NOMEM,
                      "rank: out of memory");
        memcpy(e->rank, s->order, n * sizeof(int32_t));
    }
    return KVT_OK;
}
