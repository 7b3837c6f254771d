/* replay_run.c - the trace driver: reads and cross-checks the header and shapes, then runs
 * kvt_replay_layer_metrics layer by layer on a pool of pthreads (each worker holds one layer's
 * tensors at a time, so memory is about one layer per thread), and fills a kvt_trace_result.
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "cuda/ctx_gpu.h"
#include "kvt_trace.h"
#include "replay_internal.h"

/* ---- results ---- */
kvt_status kvt_trace_result_create(int n_layers, int n_q_heads, int n_kv_heads, size_t n_policies,
                                   size_t n_budgets, kvt_trace_result **out)
{
    *out = NULL;
    KVT_RETURN_IF(n_layers < 1 || n_q_heads < 1 || n_kv_heads < 1 || n_kv_heads > n_q_heads ||
                      n_policies < 1 || n_budgets < 1 || n_layers > 100000 || n_q_heads > 100000,
                  KVT_ERR_INVALID_ARG, "trace result: bad dimensions");
    size_t n_m;
    if (kvt_mul_overflow(n_policies * n_budgets, (size_t)n_layers * (size_t)n_q_heads, &n_m))
        return kvt_error_set(KVT_ERR_OVERFLOW, "trace result too large");
    kvt_trace_result *r = kvt_calloc(1, sizeof(*r));
    KVT_RETURN_IF(!r, KVT_ERR_NOMEM, "out of memory");
    r->n_layers = n_layers;
    r->n_q_heads = n_q_heads;
    r->n_kv_heads = n_kv_heads;
    r->n_policies = n_policies;
    r->n_budgets = n_budgets;
    r->policy_labels = kvt_calloc(n_policies, sizeof(char *));
    r->policy_names = kvt_calloc(n_policies, sizeof(char *));
    r->policy_flags = kvt_calloc(n_policies, sizeof(unsigned));
    r->policy_heads = kvt_calloc(n_policies, sizeof(int));
    r->policy_window = kvt_calloc(n_policies, sizeof(int));
    r->budget_texts = kvt_calloc(n_budgets, sizeof(char *));
    r->budget_tokens = kvt_calloc(n_budgets, sizeof(int));
    r->min_budget = kvt_calloc(n_policies * n_budgets, sizeof(int));
    r->r_all = kvt_malloc((size_t)n_layers * n_kv_heads * sizeof(double));
    r->r_all_mod = kvt_malloc((size_t)n_layers * n_kv_heads * KVT_N_MODALITIES * sizeof(double));
    r->m = kvt_malloc(n_m * sizeof(kvt_head_metrics));
    if (!r->policy_labels || !r->policy_names || !r->policy_flags || !r->policy_heads ||
        !r->policy_window || !r->budget_texts || !r->budget_tokens || !r->min_budget || !r->r_all ||
        !r->r_all_mod || !r->m) {
        kvt_trace_result_free(r);
        return kvt_error_set(KVT_ERR_NOMEM, "out of memory (trace result)");
    }
    for (size_t i = 0; i < (size_t)n_layers * n_kv_heads; i++)
        r->r_all[i] = NAN;
    for (size_t i = 0; i < (size_t)n_layers * n_kv_heads * KVT_N_MODALITIES; i++)
        r->r_all_mod[i] = NAN;
    for (size_t i = 0; i < n_m; i++) {
        double *d = (double *)&r->m[i];
        for (size_t k = 0; k < sizeof(r->m[0]) / sizeof(double); k++)
            d[k] = NAN;
    }
    *out = r;
    return KVT_OK;
}

void kvt_trace_result_free(kvt_trace_result *r)
{
    if (!r)
        return;
    kvt_free(r->path);
    kvt_free(r->header_json);
    kvt_free(r->model_name);
    kvt_free(r->model_arch);
    for (size_t i = 0; r->policy_labels && i < r->n_policies; i++)
        kvt_free(r->policy_labels[i]);
    for (size_t i = 0; r->policy_names && i < r->n_policies; i++)
        kvt_free(r->policy_names[i]);
    for (size_t i = 0; r->budget_texts && i < r->n_budgets; i++)
        kvt_free(r->budget_texts[i]);
    kvt_free(r->policy_labels);
    kvt_free(r->policy_names);
    kvt_free(r->policy_flags);
    kvt_free(r->policy_heads);
    kvt_free(r->policy_window);
    kvt_free(r->budget_texts);
    kvt_free(r->budget_tokens);
    kvt_free(r->min_budget);
    kvt_free(r->r_all);
    kvt_free(r->r_all_mod);
    kvt_free(r->m);
    kvt_free(r);
}

bool kvt_shard_owns(uint64_t unit, int index, int count)
{
    return count > 0 && index >= 0 && unit % (uint64_t)count == (uint64_t)index;
}

/* ---- the driver ---- */
#define KVT_ROPE_MAX_PAIRS 1024
typedef struct run_shared {
    kvt_trace_reader *rd;
    kvt_policy *const *pols;
    size_t n_pol, n_b;
    const int *btok;
    const double *bfrac; /* each budget as a fraction of T (kvt_layer_ctx.budget_frac) */
    const kvt_replay_opts *o;
    kvt_trace_result *res;
    int L, Hq, Hkv, T, D, W, G;
    double scale;   /* the header's model.attn_scale, 0 when absent (1/sqrt(D)) */
    kvt_dtype kdt;  /* K's stored dtype */
    kvt_dtype kv16; /* --device cuda: K and V read as stored in this 16-bit dtype (uploaded so,
                       widened on the GPU); KVT_DTYPE_INVALID: read in f32 */
    bool has_qd, has_kvd, has_colsum, has_qall, need_colsum, need_qall, need_rope;
    const uint8_t *mod;
    const int32_t *pos; /* [n_pos_rows, T] prompt positions, or NULL */
    int n_pos_rows;
    kvt_rope_info rope;                   /* model.rope (rope_known: parsed) */
    double rope_freq[KVT_ROPE_MAX_PAIRS]; /* rope.inv_freq points here when the header has it */
    bool rope_known;
    pthread_mutex_t mu;
    int next_layer, done, n_sel; /* n_sel: layers to replay (layer_mask) */
    /* --device cuda: the devices the workers use, gpu_dev[0..n_gpu), each with at most
       gpu_slots[i] workers holding a layer on it at once (what its free memory holds) and
       gpu_busy[i] holding one. gpu_plan: the workers wait for gpu_planned (gpu_plan_run) */
    int n_gpu, gpu_dev[KVT_MAX_CUDA_DEVICES], gpu_slots[KVT_MAX_CUDA_DEVICES];
    int gpu_busy[KVT_MAX_CUDA_DEVICES], n_threads;
    bool gpu_plan, gpu_planned;
    uint64_t gpu_bytes; /* device memory of one worker's layer */
    pthread_cond_t gpu_cv;
    kvt_status err;
    int err_layer; /* the layer err came from (-1: none, e.g. the GPU plan) */
    char err_msg[512];
    char rope_why[200]; /* why rope_known is false */
} run_shared;

/* (layer, kind) of [heads, tok, D] (*t its tokens: decode kinds may hold more) */
static kvt_status check_shape(run_shared *sh, int layer, int kind, int heads, int tok, uint32_t *t)
{
    uint32_t h, d;
    kvt_dtype dt;
    kvt_status s = kvt_trace_reader_shape(sh->rd, layer, kind, &h, t, &d, &dt);
    if (s)
        return kvt_error_set(s, "layer %d: %s missing", layer, kvt_kind_name(kind));
    uint32_t want_d = kind == KVT_KIND_ATTN_COLSUM ? 1 : (uint32_t)sh->D;
    /* decode kinds may hold more steps than every layer has (a capture cut short): the first
       tok of them */
    bool decode =
        kind == KVT_KIND_Q_DECODE || kind == KVT_KIND_K_DECODE || kind == KVT_KIND_V_DECODE;
    if ((int)h != heads || (decode ? (int)*t < tok : (int)*t != tok) || d != want_d)
        return kvt_error_set(KVT_ERR_CORRUPT,
                             "layer %d: %s has shape [%u,%u,%u], expected [%d,%d,%u]", layer,
                             kvt_kind_name(kind), h, *t, d, heads, tok, want_d);
    return KVT_OK;
}

/* (layer, kind) [heads, tok, D] into dst as `as` (KVT_DTYPE_F32, or the stored dtype) */
static kvt_status read_as(run_shared *sh, int layer, int kind, int heads, int tok, kvt_dtype as,
                          void *dst)
{
    uint32_t t, h = (uint32_t)heads, d = kind == KVT_KIND_ATTN_COLSUM ? 1 : (uint32_t)sh->D;
    KVT_FORWARD(check_shape(sh, layer, kind, heads, tok, &t));
    const size_t es = kvt_dtype_size(as);
    if ((int)t == tok)
        return kvt_trace_reader_read(sh->rd, layer, kind, 0, h, as, dst, (size_t)h * t * d * es);
    size_t all = (size_t)h * t * d, row = (size_t)tok * d;
    char *tmp = kvt_malloc(all * es);
    KVT_RETURN_IF(!tmp, KVT_ERR_NOMEM, "out of memory (layer %d %s)", layer, kvt_kind_name(kind));
    kvt_status s = kvt_trace_reader_read(sh->rd, layer, kind, 0, h, as, tmp, all * es);
    for (uint32_t i = 0; !s && i < h; i++)
        memcpy((char *)dst + i * row * es, tmp + (size_t)i * t * d * es, row * es);
    kvt_free(tmp);
    return s;
}

/* *buf of `bytes`, allocated at its first use (freed by the worker at its end) */
static kvt_status have_buf(void **buf, size_t bytes)
{
    if (!*buf && !(*buf = kvt_malloc(bytes)))
        return kvt_error_set(KVT_ERR_NOMEM, "out of memory for one layer's tensors");
    return KVT_OK;
}

/* The replay's error st of layer `layer` (-1: of none), kept with its message when it is the
 * first or comes from an earlier layer than the one kept (sh->mu held). The workers take the
 * layers in order and stop taking them at an error, but finish those they hold: the error kept
 * is the earliest layer's, as one thread would report it, whatever the threads' timing. With
 * --device cuda a layer still waiting for a GPU slot also stops at a device error (out of GPU
 * memory, a CUDA error) of a later layer (gpu_wall): it would run into the same wall, and the
 * error is then the earliest of the layers that reached the GPU. */
static bool gpu_wall(const run_shared *sh, int layer)
{
    return sh->err &&
           (sh->err_layer < layer || sh->err == KVT_ERR_NOMEM || sh->err == KVT_ERR_CUDA);
}

static void keep_err(run_shared *sh, kvt_status st, int layer)
{
    if (st && (!sh->err || layer < sh->err_layer)) {
        sh->err = st;
        sh->err_layer = layer;
        snprintf(sh->err_msg, sizeof(sh->err_msg), "%s", kvt_error_msg());
    }
}

/* The planned device with a free slot that holds the fewest layers (the first of those), or -1
 * (sh->mu held) */
static int gpu_pick(const run_shared *sh)
{
    int best = -1;
    for (int i = 0; sh->gpu_planned && i < sh->n_gpu; i++)
        if (sh->gpu_busy[i] < sh->gpu_slots[i] &&
            (best < 0 || sh->gpu_busy[i] < sh->gpu_busy[best]))
            best = i;
    return best;
}

/* Whether a worker would get a GPU now (the plan made, a slot free) or must stop (an error):
 * then it stops reading K and V ahead into host memory (kv_pre). */
static bool gpu_ready(run_shared *sh)
{
    pthread_mutex_lock(&sh->mu);
    bool r = sh->err || gpu_pick(sh) >= 0;
    pthread_mutex_unlock(&sh->mu);
    return r;
}

/* --device cuda, K or V of a layer as stored (kv16): its records read ahead into the worker's
 * host buffer (planes kept, back to back) while the GPU is not ready for the layer; the layer
 * context reads the rest straight into pinned memory as it starts (kv_rest), so that the
 * reading overlaps the CUDA context's creation and yet the tensor is not copied on the host
 * once the GPU is there. */
typedef struct kv_pre {
    run_shared *sh;
    void **buf; /* the worker's [kv] 16-bit buffer, allocated at the first record */
    size_t bytes, off;
    kvt_trace_piece *pc; /* room for every record of the tensor */
    size_t n;
} kv_pre;

static kvt_status pre_room(void *user, size_t bytes, void **buf)
{
    kv_pre *p = user;
    *buf = NULL;
    if (gpu_ready(p->sh))
        return KVT_OK; /* the context reads this record and the rest */
    KVT_FORWARD(have_buf(p->buf, p->bytes));
    KVT_RETURN_IF(bytes > p->bytes - p->off, KVT_ERR_CORRUPT,
                  "K or V records larger than the tensor");
    *buf = (uint8_t *)*p->buf + p->off;
    p->off += bytes;
    return KVT_OK;
}

static kvt_status pre_put(void *user, const kvt_trace_piece *pc, void *buf)
{
    kv_pre *p = user;
    p->pc[p->n++] = *pc;
    return KVT_OK;
}

/* K or V (kind) of layer l read ahead (kv_pre) into *buf, its pieces into *pc[*n] */
static kvt_status read_ahead(run_shared *sh, int l, int kind, void **buf, kvt_trace_piece **pc,
                             size_t *cap, size_t *n)
{
    uint32_t t;
    KVT_FORWARD(check_shape(sh, l, kind, sh->Hkv, sh->T, &t));
    const size_t need = kvt_trace_reader_n_pieces(sh->rd, l, kind);
    if (need > *cap) {
        kvt_free(*pc);
        *cap = 0;
        KVT_RETURN_IF(!(*pc = kvt_malloc(need * sizeof(**pc))), KVT_ERR_NOMEM,
                      "out of memory for one layer's tensors");
        *cap = need;
    }
    kv_pre p = {sh, buf, (size_t)sh->Hkv * sh->T * sh->D * 2, 0, *pc, 0};
    const kvt_trace_sink sink = {pre_room, pre_put, &p};
    kvt_status s = kvt_trace_reader_read_sink(sh->rd, l, kind, 0, &sink, NULL);
    *n = p.n;
    KVT_PROF_ADD(sh->o->profile, kv_ahead_bytes, p.off);
    return s;
}

typedef struct kv_rest_src {
    run_shared *sh;
    int layer;
} kv_rest_src;

/* kvt_layer_input.kv_rest: the records after those read ahead */
static kvt_status kv_rest_read(void *user, int kind, size_t first, const kvt_trace_sink *sink)
{
    const kv_rest_src *r = user;
    return kvt_trace_reader_read_sink(r->sh->rd, r->layer, kind, first, sink, NULL);
}

static kvt_status read_f32(run_shared *sh, int layer, int kind, int heads, int tok, float *dst)
{
    return read_as(sh, layer, kind, heads, tok, KVT_DTYPE_F32, dst);
}

/* K and V of a layer as stored, when the run takes them so (kv16) and the layer stores both in
 * that dtype; else (false) they are read in f32 */
static bool layer_kv16(run_shared *sh, int layer)
{
    uint32_t h, t, d;
    kvt_dtype dk = KVT_DTYPE_INVALID, dv = KVT_DTYPE_INVALID;
    return sh->kv16 && !kvt_trace_reader_shape(sh->rd, layer, KVT_KIND_K, &h, &t, &d, &dk) &&
           !kvt_trace_reader_shape(sh->rd, layer, KVT_KIND_V, &h, &t, &d, &dv) && dk == sh->kv16 &&
           dv == sh->kv16;
}

typedef struct qa_load {
    run_shared *sh;
    int layer;
} qa_load;

static kvt_status load_q_all_head(void *user, int h, float *dst)
{
    const qa_load *q = user;
    return kvt_trace_reader_read(q->sh->rd, q->layer, KVT_KIND_Q_ALL, (uint32_t)h, (uint32_t)h + 1,
                                 KVT_DTYPE_F32, dst, (size_t)q->sh->T * q->sh->D * sizeof(float));
}

static void *worker(void *arg)
{
    run_shared *sh = arg;
    const int T = sh->T, D = sh->D, Hq = sh->Hq, Hkv = sh->Hkv, W = sh->W, G = sh->G;
    size_t kv = (size_t)Hkv * T * D;
    kvt_alloc_cache_begin(); /* every layer allocates the same large arrays: keep them */
    /* K and V in f32 or as stored (kv16): allocated for the first layer that reads them so */
    void *k = NULL, *v = NULL, *k16 = NULL, *v16 = NULL;
    kvt_trace_piece *kpc = NULL, *vpc = NULL; /* kv16: K's and V's records read ahead */
    size_t kpc_cap = 0, vpc_cap = 0;
    float *qw = kvt_malloc((size_t)Hq * W * D * sizeof(float));
    float *qd = sh->has_qd ? kvt_malloc((size_t)Hq * G * D * sizeof(float)) : NULL;
    float *kd = sh->has_kvd ? kvt_malloc((size_t)Hkv * G * D * sizeof(float)) : NULL;
    float *vd = sh->has_kvd ? kvt_malloc((size_t)Hkv * G * D * sizeof(float)) : NULL;
    float *cs =
        sh->need_colsum && sh->has_colsum ? kvt_malloc((size_t)Hq * T * sizeof(float)) : NULL;
    const bool stream_qa = (sh->need_colsum && !sh->has_colsum && sh->has_qall) || sh->need_qall;
    kvt_head_metrics *m = kvt_malloc(sh->n_pol * sh->n_b * (size_t)Hq * sizeof(*m));
    kvt_status st = KVT_OK;
    int l = -1; /* the layer st is about */
    if (!qw || !m || (sh->has_qd && !qd) || (sh->has_kvd && (!kd || !vd)) ||
        (sh->need_colsum && sh->has_colsum && !cs))
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory for one layer's tensors");
    for (;;) {
        pthread_mutex_lock(&sh->mu);
        if (st) {
            keep_err(sh, st, l);
            pthread_cond_broadcast(&sh->gpu_cv); /* later layers waiting for the GPU stop */
        }
        l = sh->err ? -1 : sh->next_layer++;
        pthread_mutex_unlock(&sh->mu);
        if (l < 0 || l >= sh->L)
            break;
        if (sh->o->layer_mask && !sh->o->layer_mask[l])
            continue; /* another shard's layer */
        kvt_layer_input in = {.layer = l,
                              .n_layers = sh->L,
                              .T = T,
                              .D = D,
                              .Hq = Hq,
                              .Hkv = Hkv,
                              .W = W,
                              .G = sh->has_qd ? G : 0,
                              .scale = sh->scale,
                              .q_window = qw,
                              .modality = sh->mod,
                              .positions = sh->pos,
                              .n_pos_rows = sh->n_pos_rows,
                              .rope = sh->rope_known ? &sh->rope : NULL};
        uint64_t t_read = kvt_now_ns();
        if ((st = read_f32(sh, l, KVT_KIND_Q_WINDOW, Hq, W, qw)))
            continue;
        if (sh->has_qd) {
            if ((st = read_f32(sh, l, KVT_KIND_Q_DECODE, Hq, G, qd)))
                continue;
            in.q_decode = qd;
        }
        if (sh->has_kvd) {
            if ((st = read_f32(sh, l, KVT_KIND_K_DECODE, Hkv, G, kd)) ||
                (st = read_f32(sh, l, KVT_KIND_V_DECODE, Hkv, G, vd)))
                continue;
            in.k_decode = kd;
            in.v_decode = vd;
        }
        if (cs) {
            if ((st = read_f32(sh, l, KVT_KIND_ATTN_COLSUM, Hq, T, cs)))
                continue;
            in.attn_colsum = cs;
        }
        /* K and V last: with --device cuda the GPU may be ready by then (kv_pre) */
        kv_rest_src rest = {sh, l};
        if (layer_kv16(sh, l)) {
            if ((st = read_ahead(sh, l, KVT_KIND_K, &k16, &kpc, &kpc_cap, &in.n_k_pieces)) ||
                (st = read_ahead(sh, l, KVT_KIND_V, &v16, &vpc, &vpc_cap, &in.n_v_pieces)))
                continue;
            in.k16 = k16, in.v16 = v16, in.k16_dtype = sh->kv16;
            in.k_pieces = kpc, in.v_pieces = vpc;
            in.kv_rest = kv_rest_read, in.kv_user = &rest;
        } else {
            if ((st = have_buf(&k, kv * sizeof(float))) ||
                (st = have_buf(&v, kv * sizeof(float))) ||
                (st = read_f32(sh, l, KVT_KIND_K, Hkv, T, k)) ||
                (st = read_f32(sh, l, KVT_KIND_V, Hkv, T, v)))
                continue;
            in.k = k, in.v = v;
        }
        KVT_PROF_ADD(sh->o->profile, read_ns, kvt_now_ns() - t_read);
        qa_load qal = {sh, l};
        if (stream_qa) { /* Q_all read one head at a time (H2O column sums, expected-attention) */
            uint32_t h, t, d;
            kvt_dtype dt;
            if ((st = kvt_trace_reader_shape(sh->rd, l, KVT_KIND_Q_ALL, &h, &t, &d, &dt)))
                continue;
            if ((int)h != Hq || (int)t != T || (int)d != D) {
                st = kvt_error_set(KVT_ERR_CORRUPT, "layer %d: Q_all has shape [%u,%u,%u]", l, h, t,
                                   d);
                continue;
            }
            in.q_all_head = load_q_all_head;
            in.q_all_user = &qal;
        }
        int gi = -1;        /* --device cuda: the slot's device, gpu_dev[gi] */
        if (sh->gpu_plan) { /* wait for room on a GPU; stop at an earlier layer's error or a
                               device error (gpu_wall) */
            uint64_t t_wait = kvt_now_ns();
            pthread_mutex_lock(&sh->mu);
            while (!gpu_wall(sh, l) && (gi = gpu_pick(sh)) < 0)
                pthread_cond_wait(&sh->gpu_cv, &sh->mu);
            bool stop = gpu_wall(sh, l);
            if (!stop) {
                sh->gpu_busy[gi]++;
                in.cuda_device = sh->gpu_dev[gi];
            }
            pthread_mutex_unlock(&sh->mu);
            KVT_PROF_ADD(sh->o->profile, gpu_wait_ns, kvt_now_ns() - t_wait);
            if (stop)
                break;
        }
        st = kvt_replay_layer_metrics_frac(&in, sh->pols, sh->n_pol, sh->btok, sh->bfrac, sh->n_b,
                                           sh->o, m, sh->res->r_all + (size_t)l * Hkv,
                                           sh->res->r_all_mod + (size_t)l * Hkv * KVT_NM);
        if (st) { /* "layer L: ", and the device of a CUDA error */
            char pre[64];
            const int n = snprintf(pre, sizeof(pre), "layer %d: ", l);
            const char *msg = kvt_error_msg();
            if (!strncmp(msg, pre, (size_t)n))
                msg += n; /* already said */
            if (st == KVT_ERR_CUDA && gi >= 0)
                snprintf(pre + n, sizeof(pre) - (size_t)n, "CUDA device %d: ", in.cuda_device);
            kvt_error_set(st, "%s%s", pre, msg);
        }
        if (sh->gpu_plan) { /* an error is recorded before the slot is free, so that the
                               workers waiting for it stop instead of running their layers */
            if (!st)
                KVT_PROF_ADD(sh->o->profile, gpu_device_layers[in.cuda_device], 1);
            pthread_mutex_lock(&sh->mu);
            sh->gpu_busy[gi]--;
            keep_err(sh, st, l);
            pthread_cond_broadcast(&sh->gpu_cv);
            pthread_mutex_unlock(&sh->mu);
        }
        if (st)
            continue;
        for (size_t p = 0; p < sh->n_pol; p++)
            for (size_t b = 0; b < sh->n_b; b++)
                memcpy(kvt_trace_result_at(sh->res, p, b, l, 0), m + (p * sh->n_b + b) * (size_t)Hq,
                       (size_t)Hq * sizeof(*m));
        kvt_alloc_cache_trim();
        pthread_mutex_lock(&sh->mu);
        sh->done++;
        if (sh->o->progress)
            sh->o->progress(sh->o->progress_user, (uint64_t)sh->done, (uint64_t)sh->n_sel);
        pthread_mutex_unlock(&sh->mu);
    }
    kvt_free(k);
    kvt_free(v);
    kvt_free(k16);
    kvt_free(v16);
    kvt_free(kpc);
    kvt_free(vpc);
    kvt_free(qw);
    kvt_free(qd);
    kvt_free(kd);
    kvt_free(vd);
    kvt_free(cs);
    kvt_free(m);
    kvt_alloc_cache_end();
    kvt_ctx_gpu_thread_end(); /* its pinned staging, now: freed at the thread's exit, the
                                 CUDA call ran other workers' queued kernels on cuemu with this
                                 thread's state half gone (a crash, 1 run in 12) */
    return NULL;
}

static int jint(const cJSON *o, const char *k)
{
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsNumber(x) ? x->valueint : -1;
}

/* a header string for results.json, which holds UTF-8 only: another writer's bytes that are
 * not (a name from a Latin-1 file name) become '?' */
static char *jstr(const cJSON *o, const char *k)
{
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(o, k);
    char *s = kvt_strdup(cJSON_IsString(x) ? x->valuestring : "");
    if (s)
        kvt_utf8_sanitize(s);
    return s;
}

static bool has_kind(kvt_trace_reader *rd, int layer, int kind, uint32_t *h, uint32_t *t,
                     uint32_t *d, kvt_dtype *dt)
{
    uint32_t a, b, c;
    kvt_dtype e;
    bool ok = kvt_trace_reader_shape(rd, layer, kind, h ? h : &a, t ? t : &b, d ? d : &c,
                                     dt ? dt : &e) == KVT_OK;
    kvt_error_clear();
    return ok;
}

kvt_status kvt_replay_trace_shape(const char *path, int *n_layers, int *n_tokens)
{
    kvt_trace_reader *rd;
    KVT_FORWARD(kvt_trace_reader_open(path, &rd));
    cJSON *hdr = cJSON_Parse(kvt_trace_reader_header_json(rd));
    int L = jint(cJSON_GetObjectItemCaseSensitive(hdr, "model"), "n_layers");
    int T = jint(hdr, "n_tokens");
    cJSON_Delete(hdr);
    kvt_trace_reader_close(rd);
    KVT_RETURN_IF(L < 1 || T < 1, KVT_ERR_CORRUPT, "%s: header lacks model.n_layers or n_tokens",
                  path);
    if (n_layers)
        *n_layers = L;
    if (n_tokens)
        *n_tokens = T;
    return KVT_OK;
}

/* ---- policies bound to one trace (kvt_policy_def.bind) ---- */
typedef struct bound_pols {
    kvt_policy **p;   /* [n] what the workers replay: pols[i], or &copy[i] */
    kvt_policy *copy; /* [n] */
    void **state;     /* [n] per-trace state of copy[i], or NULL */
    kvt_npy **crit;   /* [n] critical=DIR: the trace's own file (copy[i].crit), or NULL */
    size_t n;
} bound_pols;

static void unbind_policies(bound_pols *b)
{
    for (size_t i = 0; b->state && i < b->n; i++)
        if (b->state[i])
            b->p[i]->def->unbind(b->state[i]);
    for (size_t i = 0; b->crit && i < b->n; i++)
        kvt_npy_destroy(b->crit[i]);
    kvt_free(b->crit);
    kvt_free(b->p);
    kvt_free(b->copy);
    kvt_free(b->state);
    memset(b, 0, sizeof(*b));
}

/* the replay's n_threads while its policies bind (kvt_bind_threads), per calling thread */
static _Thread_local int tl_bind_threads;

int kvt_bind_threads(void)
{
    return tl_bind_threads;
}

/* every policy's bind for the trace at path; check_only (kvt_replay_check_trace): a policy's
 * check in place of its bind when it has one, which computes nothing */
static kvt_status bind_policies(kvt_policy *const *pols, size_t n, const char *path, int L, int Hq,
                                int Hkv, int T, bool check_only, bound_pols *b)
{
    memset(b, 0, sizeof(*b));
    b->p = kvt_calloc(n, sizeof(*b->p));
    b->copy = kvt_calloc(n, sizeof(*b->copy));
    b->state = kvt_calloc(n, sizeof(*b->state));
    b->crit = kvt_calloc(n, sizeof(*b->crit));
    b->n = n;
    if (!b->p || !b->copy || !b->state || !b->crit) {
        unbind_policies(b);
        return kvt_error_set(KVT_ERR_NOMEM, "out of memory");
    }
    for (size_t i = 0; i < n; i++) {
        const kvt_policy *p = pols[i];
        b->p[i] = pols[i];
        void *state = NULL;
        kvt_status st = check_only && p->def->check ? p->def->check(p, path, L, Hq, Hkv, T)
                        : p->def->bind              ? p->def->bind(p, path, L, Hq, Hkv, T, &state)
                                                    : KVT_OK;
        if (!st && p->o.critical) { /* critical=FILE checked; critical=DIR: the trace's file */
            char file[4096];
            if (p->crit)
                st = kvt_critical_check(p, p->crit, p->o.critical, L, Hq, Hkv, T);
            else if (!kvt_trace_npy_path(p->o.critical, path, file, sizeof(file)))
                st = kvt_error_set(KVT_ERR_INVALID_ARG, "%s: critical= file name too long",
                                   p->def->name);
            else if (!(st = kvt_npy_load(p->def->name, file, "[layers, KV heads, tokens]",
                                         " (critical=DIR: one NAME.npy per trace NAME.kvt)",
                                         &b->crit[i])))
                st = kvt_critical_check(p, b->crit[i], file, L, Hq, Hkv, T);
        }
        if (st) {
            if (state)
                p->def->unbind(state);
            unbind_policies(b);
            return kvt_error_set(st, "%s: %s", path, kvt_error_msg());
        }
        if (state || b->crit[i]) {
            b->copy[i] = *pols[i];
            if (state)
                b->copy[i].state = b->state[i] = state;
            if (b->crit[i])
                b->copy[i].crit = b->crit[i];
            b->p[i] = &b->copy[i];
        }
    }
    return KVT_OK;
}

/* with the GPU, the bytes of a stored K or V element as the host holds it: 16-bit ones as
 * stored, any other read as f32 */
static int gpu_kv_es(kvt_dtype kdt)
{
    return kdt == KVT_DTYPE_BF16 || kdt == KVT_DTYPE_F16 ? 2 : 4;
}

/* bytes per prompt token one worker holds (see kvt_replay_worker_bytes), fitted on the
 * llama3-8b, llama2-7b and qwen2-vl-7b shapes at T = 4K and 16K (bench/RESULTS.md, 2026-12-02):
 * f32 K, V and unit keys; f32 window and decode probabilities and one KV group's transposed
 * copy (the decode ones' only where a policy is not a decode-time cache); key/value norms; the
 * probe cosine table; per policy its ranking and scores; lightkv's merged copies, the per-step
 * policies' scratch and the per-budget policies' rankings (as if for 8 budgets: this does not know
 * their count); 1.5 KB of smaller per-token arrays. With the GPU (gpu_es: the bytes of a stored K
 * or V element, 0 without) the host holds K and V as stored (all of them when read ahead while the
 * GPU is not ready) and, of the context's large arrays, only those a policy reads on the host (its
 * host_reads; a merged set's metrics read them all): the rest stays on the device, the cosine table
 * too. */
static double worker_bytes_per_token(int Hq, int Hkv, int D, int W, int G, int probes,
                                     kvt_policy *const *pols, size_t n_pol, int gpu_es, bool group)
{
    double b;
    const int Gs = Hq / Hkv;
    int dall = 0; /* Gs where a policy sweeps its set over all decode queries (sweep.c's pdt) */
    for (size_t p = 0; p < n_pol; p++)
        dall = kvt_policy_decode_evict(pols[p]) ? dall : Gs;
    if (!gpu_es) { /* group: the decode probabilities of one KV group (KVT_DECODE_PROBS_GROUP) */
        b = 12.0 * Hkv * D + 4.0 * (Hq + Gs) * W + 4.0 * ((group ? Gs : Hq) + dall) * G +
            16.0 * Hkv + 4.0 * probes + 1536;
    } else {
        unsigned reads = 0;
        for (size_t p = 0; p < n_pol; p++)
            reads |= kvt_policy_flags(pols[p]) & KVT_POLICY_MERGED ? ~0u
                                                                   : kvt_policy_host_reads(pols[p]);
        b = 2.0 * gpu_es * Hkv * D + 16.0 * Hkv + 1536;
        if ((reads & KVT_CTX_KV) && gpu_es < 4) /* widened on the host; f32 ones are as read */
            b += 8.0 * Hkv * D;
        if (reads & KVT_CTX_KU)
            b += 4.0 * Hkv * D;
        if (reads & KVT_CTX_PRW)
            b += 4.0 * Hq * W;
        if (reads & KVT_CTX_PRD) /* group: one KV group's rows, copied from the device */
            b += 4.0 * (group ? Gs : Hq) * G;
    }
    for (size_t p = 0; p < n_pol; p++) {
        unsigned f = kvt_policy_flags(pols[p]);
        b += 8.0 * (kvt_policy_per_query_head(pols[p]) ? Hq : Hkv);
        if (f & KVT_POLICY_MERGED)
            b += 3584;
        if (pols[p]->o.merge || pols[p]->o.think > 0 || pols[p]->def == &kvt_policy_def_cam) {
            /* merged sets of up to T/2 changed entries per head and budget (counted for 8
               budgets), and merge.c's or cam's work arrays */
            int hh = kvt_policy_per_query_head(pols[p]) ? Hq : Hkv;
            b += 32.0 * hh * D + 40.0 * hh + 2048 + 32.0 * D;
        }
        if (f & KVT_POLICY_PER_STEP)
            b += 1024 + 96.0 * Hkv;
        if (f & KVT_POLICY_PER_BUDGET) /* a ranking per budget: counted for 8 budgets */
            b += 32.0 * (kvt_policy_per_query_head(pols[p]) ? Hq : Hkv);
        if (kvt_policy_decode_evict(pols[p])) /* each cache's entries' last steps: for 8
                                                 budgets */
            b += 32.0 * (kvt_policy_per_query_head(pols[p]) ? Hq : Hkv);
        if ((f & KVT_POLICY_NEEDS_ROPE) && pols[p]->o.decoding > 0 && !pols[p]->o.decode_prefill)
            b += 8.0 * D + 32.0; /* expected-attention:decoding=: the cache's keys in f64 */
        else if (f & KVT_POLICY_NEEDS_ROPE)
            b += 36.0 * D + 16.0 * Hq; /* expected-attention: f64 queries, keys, K S', angles */
        else if (pols[p]->def == &kvt_policy_def_rkv)
            /* the cache's keys in f64, the window rows' logits, five score arrays, the sort */
            b += 8.0 * D + 8.0 * ((double)Hq / Hkv) * pols[p]->o.window + 80;
        else if (pols[p]->def == &kvt_policy_def_h2o_greedy)
            /* a KV head's query heads at once: queries, 32 attention rows, partial sums; and
               the dense product's blocks */
            b += (kvt_policy_per_query_head(pols[p]) ? 1.0 : (double)Hq / Hkv) *
                     (4.0 * D + 4.0 * 32 + 8.0) +
                 8.0 * 32;
        else if (f & KVT_POLICY_NEEDS_QALL) /* one head's queries, scores */
            b += 4.0 * D + 16.0 * Hq;
    }
    return b;
}

static uint64_t worker_bytes(int T, int Hq, int Hkv, int D, int W, int G, int probes,
                             kvt_policy *const *pols, size_t n_pol, int gpu_es, bool group)
{
    if (probes > T)
        probes = T;
    double per = worker_bytes_per_token(Hq, Hkv, D, W, G, probes, pols, n_pol, gpu_es, group);
    /* per decode query its full output and the decode keys' part (f64) and its sums; the
       layer's Q_decode, K_decode and V_decode in f32 and as read (16-bit, and compressed). On
       the CPU the logits and decode-key probabilities of a block of decode rows (layer_ctx.c:
       32 MiB at most), and the output sweep's workspace and results over a KV group's decode
       queries (kvt_sweep_output_cpu: D + 256 + 11 doubles a query, and 5 per budget and
       policy) */
    const double rows = (double)Hq * G, grp = (double)(Hq / Hkv) * G;
    const double blk = grp * (8.0 * T + 12.0 * G);
    double dec = rows * (16.0 * D + 40.0) + 8.0 * G * D * (Hq + 2.0 * Hkv);
    if (!gpu_es)
        dec += (blk < 33554432.0 ? blk : 33554432.0) + 8.0 * grp * (D + 320.0);
    /* with the GPU also the two pinned buffers K and V stream through (ctx_gpu.c's CTX_STAGE) */
    return (uint64_t)(1.15 * per * T + dec) + (UINT64_C(16) << 20) +
           (gpu_es ? UINT64_C(8) << 20 : 0);
}

kvt_decode_probs kvt_replay_decode_probs_auto(int requested, int cores, int n_layers,
                                              uint64_t wb_all, uint64_t wb_group, uint64_t memory)
{
    if (!memory || wb_group >= wb_all)
        return KVT_DECODE_PROBS_ALL;
    const int n_all = kvt_replay_threads(requested, cores, n_layers, wb_all, memory);
    const int n_grp = kvt_replay_threads(requested, cores, n_layers, wb_group, memory);
    return n_grp > n_all || (double)n_all * (double)wb_all > (double)memory ? KVT_DECODE_PROBS_GROUP
                                                                            : KVT_DECODE_PROBS_ALL;
}

kvt_status kvt_replay_worker_bytes(const char *path, kvt_policy *const *pols, size_t n_pol,
                                   int coverage_probes, kvt_device device, uint64_t *bytes)
{
    return kvt_replay_worker_bytes_modes(path, pols, n_pol, coverage_probes, device, bytes, NULL);
}

kvt_status kvt_replay_worker_bytes_modes(const char *path, kvt_policy *const *pols, size_t n_pol,
                                         int coverage_probes, kvt_device device, uint64_t *all,
                                         uint64_t *group)
{
    *all = 0;
    if (group)
        *group = 0;
    kvt_trace_reader *rd;
    KVT_FORWARD(kvt_trace_reader_open(path, &rd));
    cJSON *hdr = cJSON_Parse(kvt_trace_reader_header_json(rd));
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(hdr, "model");
    int Hq = jint(model, "n_q_heads"), Hkv = jint(model, "n_kv_heads");
    int D = jint(model, "head_dim"), T = jint(hdr, "n_tokens");
    cJSON_Delete(hdr);
    uint32_t h, w = 0, g = 0, d;
    kvt_dtype kdt = KVT_DTYPE_F32;
    if (!has_kind(rd, 0, KVT_KIND_K, NULL, NULL, NULL, &kdt))
        kdt = KVT_DTYPE_F32;
    if (!has_kind(rd, 0, KVT_KIND_Q_WINDOW, &h, &w, &d, NULL))
        w = 0;
    if (!has_kind(rd, 0, KVT_KIND_Q_DECODE, &h, &g, &d, NULL))
        g = 0;
    kvt_trace_reader_close(rd);
    KVT_RETURN_IF(Hq < 1 || Hkv < 1 || D < 1 || T < 1 || Hq % Hkv, KVT_ERR_CORRUPT,
                  "%s: the header lacks the model's shape or n_tokens", path);
    const int probes = coverage_probes < 0 ? KVT_DEFAULT_COVERAGE_PROBES : coverage_probes;
    const int es = device == KVT_DEVICE_CUDA ? gpu_kv_es(kdt) : 0;
    *all = worker_bytes(T, Hq, Hkv, D, (int)w, (int)g, probes, pols, n_pol, es, false);
    if (group)
        *group = worker_bytes(T, Hq, Hkv, D, (int)w, (int)g, probes, pols, n_pol, es, true);
    return KVT_OK;
}

int kvt_replay_threads(int requested, int cores, int n_layers, uint64_t worker_bytes,
                       uint64_t memory)
{
    int n = requested > 0 ? requested : cores > 0 ? cores : kvt_cpu_count();
    if (requested <= 0 && memory > 0 && worker_bytes > 0 && (uint64_t)n > memory / worker_bytes)
        n = memory / worker_bytes > 1 ? (int)(memory / worker_bytes) : 1;
    if (n_layers >= 1 && n > n_layers)
        n = n_layers;
    return n;
}

static int policy_window(const kvt_policy *p)
{
    const char *k = p->def->keys;
    if (!strncmp(k, "window", 6))
        return p->o.window;
    return !strcmp(p->def->name, "tova") ? 1 : 0;
}

const char *kvt_device_name(kvt_device d)
{
    return d == KVT_DEVICE_CUDA ? "cuda" : d == KVT_DEVICE_AUTO ? "auto" : "cpu";
}

/* the plan failed (st, with its message): the workers stop */
static void *gpu_plan_fail(run_shared *sh, kvt_status st)
{
    pthread_mutex_lock(&sh->mu);
    keep_err(sh, st, -1);
    sh->gpu_planned = true;
    pthread_cond_broadcast(&sh->gpu_cv);
    pthread_mutex_unlock(&sh->mu);
    return NULL;
}

/* The devices (bit d: device d) o asks for of n_dev visible: its cuda_devices, else this
 * process's share of them (cuda_share_*), else all */
static uint64_t wanted_devices(const kvt_replay_opts *o, int n_dev)
{
    if (o->cuda_devices)
        return o->cuda_devices;
    int k = o->cuda_share_count, me = o->cuda_share_index;
    if (k <= 1 || me < 0 || me >= k)
        k = 1, me = 0; /* not shared: every device */
    if (n_dev < k)
        return UINT64_C(1) << (me % n_dev);
    uint64_t want = 0;
    for (int d = me; d < n_dev; d += k)
        want |= UINT64_C(1) << d;
    return want;
}

/* One device's free and total memory, asked on a thread of its own (ok: known) */
typedef struct gpu_mem_ask {
    int dev;
    bool ok;
    uint64_t fr, tot;
} gpu_mem_ask;

static void *gpu_mem_run(void *arg)
{
    gpu_mem_ask *a = arg;
    a->ok = kvt_ctx_gpu_mem(a->dev, &a->fr, &a->tot) == 0;
    return NULL;
}

/* --device cuda: whether a device is there at all (the CUDA driver's start, about 0.1 s on an
 * H200), then how many workers may hold a layer on each device at once, from its free memory
 * (asking creates the process's CUDA context on it, a few hundred milliseconds on a large GPU:
 * one thread per device asks). The devices: those of o->cuda_devices (every visible one by
 * default), at most one per worker thread; those whose free memory holds no layer are left out
 * unless none does (then the one with the most free memory takes one worker, whose layer gives
 * the clear out-of-memory error). This runs on its own thread while the workers read their
 * first layers, which they do before they wait for a slot; without a device the workers stop
 * there, with the error. */
static void *gpu_plan_run(void *arg)
{
    run_shared *sh = arg;
    const uint64_t t0 = kvt_now_ns();
    char why[160] = "";
    const int n_vis = kvt_ctx_gpu_devices(why, sizeof(why));
    if (n_vis <= 0)
        return gpu_plan_fail(sh, kvt_error_set(KVT_ERR_NO_CUDA, "no usable CUDA device (%s)", why));
    const int n_dev = n_vis < KVT_MAX_CUDA_DEVICES ? n_vis : KVT_MAX_CUDA_DEVICES;
    const uint64_t vis = n_dev == 64 ? ~UINT64_C(0) : (UINT64_C(1) << n_dev) - 1;
    const uint64_t want = wanted_devices(sh->o, n_dev);
    if (want & ~vis)
        return gpu_plan_fail(sh, kvt_error_set(KVT_ERR_NO_CUDA,
                                               "CUDA device %d: not there (%d visible: %s%d)",
                                               __builtin_ctzll(want & ~vis), n_vis,
                                               n_vis > 1 ? "0-" : "", n_vis - 1));
    gpu_mem_ask ask[KVT_MAX_CUDA_DEVICES];
    pthread_t th[KVT_MAX_CUDA_DEVICES];
    bool started[KVT_MAX_CUDA_DEVICES] = {false};
    int n = 0;
    for (int d = 0; d < n_dev && n < sh->n_threads; d++)
        if (want >> d & 1)
            ask[n++] = (gpu_mem_ask){d, false, 0, 0};
    for (int i = 0; i < n && n > 1; i++)
        started[i] = !pthread_create(&th[i], NULL, gpu_mem_run, &ask[i]);
    for (int i = 0; i < n; i++)
        if (!started[i])
            gpu_mem_run(&ask[i]);
    for (int i = 0; i < n; i++)
        if (started[i])
            pthread_join(th[i], NULL);
    int slots[KVT_MAX_CUDA_DEVICES], best = 0, fits = 0;
    for (int i = 0; i < n; i++) { /* other processes' memory is already out of fr */
        uint64_t fit = ask[i].ok && sh->gpu_bytes ? ask[i].fr / sh->gpu_bytes : UINT64_MAX;
        slots[i] = fit < (uint64_t)sh->n_threads ? (int)fit : sh->n_threads;
        fits += slots[i] > 0;
        if (ask[i].fr > ask[best].fr)
            best = i;
    }
    if (!fits)
        slots[best] = 1;
    kvt_replay_profile *pr = sh->o->profile;
    uint64_t fr = 0, tot = 0, n_slots = 0, mask = 0;
    pthread_mutex_lock(&sh->mu);
    sh->n_gpu = 0;
    for (int i = 0; i < n; i++)
        if (slots[i] > 0) {
            sh->gpu_dev[sh->n_gpu] = ask[i].dev;
            sh->gpu_slots[sh->n_gpu] = slots[i];
            sh->gpu_busy[sh->n_gpu++] = 0;
            fr += ask[i].fr, tot += ask[i].tot, n_slots += (uint64_t)slots[i];
            mask |= UINT64_C(1) << ask[i].dev;
        }
    sh->gpu_planned = true;
    pthread_cond_broadcast(&sh->gpu_cv);
    pthread_mutex_unlock(&sh->mu);
    if (pr) { /* set, not added: this thread alone writes them */
        pr->gpu_worker_bytes = sh->gpu_bytes;
        pr->gpu_mem_free = fr;
        pr->gpu_mem_total = tot;
        pr->gpu_slots = n_slots < (uint64_t)sh->n_threads ? n_slots : (uint64_t)sh->n_threads;
        pr->gpu_threads = (uint64_t)sh->n_threads;
        pr->gpu_devices = mask;
    }
    KVT_PROF_ADD(pr, gpu_plan_ns, kvt_now_ns() - t0);
    return NULL;
}

kvt_status kvt_replay_release_device(void)
{
    return kvt_ctx_gpu_release();
}

kvt_status kvt_replay_resolve_device(kvt_device want, kvt_device *got, char *why, size_t cap)
{
    KVT_RETURN_IF(!got, KVT_ERR_INVALID_ARG, "null argument");
    char reason[160] = "";
    if (why && cap)
        why[0] = '\0';
    *got = KVT_DEVICE_CPU;
    if (want == KVT_DEVICE_CPU)
        return KVT_OK;
    KVT_RETURN_IF(want != KVT_DEVICE_CUDA && want != KVT_DEVICE_AUTO, KVT_ERR_INVALID_ARG,
                  "unknown device %d", (int)want);
    if (kvt_ctx_gpu_devices(reason, sizeof(reason)) > 0) {
        *got = KVT_DEVICE_CUDA;
        return KVT_OK;
    }
    if (why && cap)
        snprintf(why, cap, "%s", reason);
    KVT_RETURN_IF(want == KVT_DEVICE_CUDA, KVT_ERR_NO_CUDA, "no usable CUDA device (%s)", reason);
    return KVT_OK;
}

/* The header's model.rope into sh->rope (FORMAT.md); sh->rope_known false, with sh->rope_why,
 * when it is absent or cannot be used to undo RoPE. A trace written by kvtrace's llama2.c engine
 * before model.rope.pairs was recorded rotates interleaved pairs. */
static void parse_rope(const cJSON *hdr, run_shared *sh)
{
    const cJSON *ro =
        cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(hdr, "model"), "rope");
    const cJSON *ty = cJSON_GetObjectItemCaseSensitive(ro, "type");
    kvt_rope_info *r = &sh->rope;
    memset(r, 0, sizeof(*r));
    sh->rope_known = false;
#define ROPE_FAIL(...)                                                                             \
    do {                                                                                           \
        snprintf(sh->rope_why, sizeof(sh->rope_why), __VA_ARGS__);                                 \
        return;                                                                                    \
    } while (0)
    if (!cJSON_IsString(ty))
        ROPE_FAIL("the header does not say how RoPE was applied (model.rope.type)");
    if (!strcmp(ty->valuestring, "none")) {
        sh->rope_known = true; /* queries and keys were never rotated */
        return;
    }
    r->type = !strcmp(ty->valuestring, "default") ? 1 : !strcmp(ty->valuestring, "mrope") ? 2 : 0;
    if (!r->type)
        ROPE_FAIL("model.rope.type \"%.40s\" is not one kvtrace knows", ty->valuestring);
    const cJSON *pa = cJSON_GetObjectItemCaseSensitive(ro, "pairs");
    const cJSON *en =
        cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(hdr, "engine"), "name");
    if (cJSON_IsString(pa))
        r->pairs = !strcmp(pa->valuestring, "half")          ? 1
                   : !strcmp(pa->valuestring, "interleaved") ? 2
                                                             : 0;
    else if (!pa && cJSON_IsString(en) && !strcmp(en->valuestring, "kvtrace-llama2c"))
        r->pairs = 2;
    if (!r->pairs)
        ROPE_FAIL("the header does not say which dimensions RoPE rotates together "
                  "(model.rope.pairs \"half\" or \"interleaved\"): capture the trace "
                  "with this version of kvtrace");
    const int half = sh->D / 2;
    if (sh->D % 2 || half > KVT_ROPE_MAX_PAIRS)
        ROPE_FAIL("RoPE with head_dim %d is not supported", sh->D);
    const cJSON *th = cJSON_GetObjectItemCaseSensitive(ro, "theta");
    r->theta = cJSON_IsNumber(th) ? th->valuedouble : 0.0;
    const cJSON *fa = cJSON_GetObjectItemCaseSensitive(ro, "inv_freq");
    if (fa) {
        if (!cJSON_IsArray(fa) || cJSON_GetArraySize(fa) != half)
            ROPE_FAIL("model.rope.inv_freq is not an array of head_dim/2 = %d numbers", half);
        int i = 0;
        for (const cJSON *e = fa->child; e; e = e->next, i++) {
            if (!cJSON_IsNumber(e) || !isfinite(e->valuedouble) || e->valuedouble < 0)
                ROPE_FAIL("model.rope.inv_freq[%d] is not a finite number >= 0", i);
            sh->rope_freq[i] = e->valuedouble;
        }
        r->inv_freq = sh->rope_freq;
    } else if (!(r->theta > 0 && isfinite(r->theta))) {
        ROPE_FAIL("model.rope has neither inv_freq nor a positive theta");
    }
    const cJSON *as = cJSON_GetObjectItemCaseSensitive(ro, "attention_scaling");
    if (as && !(cJSON_IsNumber(as) && isfinite(as->valuedouble) && as->valuedouble > 0))
        ROPE_FAIL("model.rope.attention_scaling is not a positive number");
    r->attention_scaling = as ? as->valuedouble : 1.0;
    if (r->type == 2) {
        const cJSON *ms = cJSON_GetObjectItemCaseSensitive(ro, "mrope_section");
        if (!ms) { /* kvtrace.capture before it was in model.rope kept it in "capture" */
            ms = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(hdr, "capture"),
                                                  "mrope_section");
        }
        int sum = 0, i = 0;
        for (const cJSON *e = cJSON_IsArray(ms) ? ms->child : NULL; e && i < 3; e = e->next, i++) {
            r->mrope_section[i] = cJSON_IsNumber(e) && e->valuedouble >= 0 &&
                                          e->valuedouble <= half &&
                                          e->valuedouble == (int)e->valuedouble
                                      ? (int)e->valuedouble
                                      : -1;
            sum += r->mrope_section[i];
        }
        if (!cJSON_IsArray(ms) || cJSON_GetArraySize(ms) != 3 || i != 3 || sum != half ||
            r->mrope_section[0] < 0 || r->mrope_section[1] < 0 || r->mrope_section[2] < 0)
            ROPE_FAIL("an M-RoPE trace needs model.rope.mrope_section: 3 integers >= 0 "
                      "summing to head_dim/2 = %d",
                      half);
    }
#undef ROPE_FAIL
    sh->rope_known = true;
}

/* Open the trace at path into sh (reader, shape, tensors present; *hdr_out its parsed header,
 * both for the caller to free, also on failure), check the header against layer 0's records
 * and these policies against what the trace holds (stored window queries unless the budgets
 * keep the whole prompt, decode queries, column sums): every check that needs no layer's
 * tensors */
static kvt_status open_checked(const char *path, kvt_policy *const *pols, size_t n_pol,
                               const kvt_budget *budgets, size_t n_budgets, run_shared *sh,
                               cJSON **hdr_out)
{
    kvt_status st;
    KVT_FORWARD(kvt_trace_reader_open(path, &sh->rd));
    cJSON *hdr = *hdr_out = cJSON_Parse(kvt_trace_reader_header_json(sh->rd));
    KVT_RETURN_IF(!hdr, KVT_ERR_CORRUPT, "%s: the trace header is not valid JSON", path);
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(hdr, "model");
    sh->L = jint(model, "n_layers"), sh->Hq = jint(model, "n_q_heads");
    sh->Hkv = jint(model, "n_kv_heads"), sh->D = jint(model, "head_dim");
    sh->T = jint(hdr, "n_tokens"), sh->W = jint(hdr, "window");
    {
        /* one message per field, so that the user knows which one is wrong */
        const struct {
            const char *name;
            int value;
        } f[] = {{"model.n_layers", sh->L},     {"model.n_q_heads", sh->Hq},
                 {"model.n_kv_heads", sh->Hkv}, {"model.head_dim", sh->D},
                 {"n_tokens", sh->T},           {"window", sh->W}};
        for (size_t i = 0; i < sizeof(f) / sizeof(f[0]); i++)
            if (f[i].value < 1) {
                st = kvt_error_set(KVT_ERR_CORRUPT,
                                   f[i].value == 0 && i == 0
                                       ? "%s: the trace has no layers (%s = 0): nothing to replay"
                                       : "%s: the header's %s is missing or not a positive integer",
                                   path, f[i].name);
                return st;
            }
        /* the model's softmax scale, as the capture recorded it (Gemma-style models differ from
           1/sqrt(D)); absent in traces of other writers: 1/sqrt(D) */
        const cJSON *as = cJSON_GetObjectItemCaseSensitive(model, "attn_scale");
        if (as && !(cJSON_IsNumber(as) && isfinite(as->valuedouble) && as->valuedouble > 0)) {
            st = kvt_error_set(KVT_ERR_CORRUPT,
                               "%s: the header's model.attn_scale is not a positive number", path);
            return st;
        }
        sh->scale = as ? as->valuedouble : 0.0;
        parse_rope(hdr, sh);
        if (sh->Hq % sh->Hkv) {
            st = kvt_error_set(KVT_ERR_CORRUPT,
                               "%s: %d query heads are not a multiple of %d KV heads (GQA needs "
                               "n_q_heads = G x n_kv_heads)",
                               path, sh->Hq, sh->Hkv);
            return st;
        }
    }
    /* cross-check with the stored tensors of layer 0 */
    uint32_t h, t, d;
    if (!has_kind(sh->rd, 0, KVT_KIND_K, &h, &t, &d, &sh->kdt) || (int)h != sh->Hkv ||
        (int)t != sh->T || (int)d != sh->D) {
        st = kvt_error_set(KVT_ERR_CORRUPT,
                           "%s: layer 0 K is missing or does not match the header [%d,%d,%d]", path,
                           sh->Hkv, sh->T, sh->D);
        return st;
    }
    if (!has_kind(sh->rd, 0, KVT_KIND_Q_WINDOW, &h, &t, &d, NULL) || (int)h != sh->Hq ||
        (int)d != sh->D) {
        st = kvt_error_set(KVT_ERR_CORRUPT, "%s: layer 0 Q_window is missing or not [%d,W,%d]",
                           path, sh->Hq, sh->D);
        return st;
    }
    sh->W = (int)t; /* the records say how many window queries were stored */
    /* decode steps: those every layer holds whole. A capture cut short in its decode steps
       (killed, disk full) leaves layers with different counts, and a layer's K_decode may end
       before its Q_decode: the replay uses the steps all of them have */
    uint32_t g_q = UINT32_MAX, g_kv = UINT32_MAX;
    int l_noq = -1; /* the first layer without decode queries, when layer 0 has them */
    for (int l = 0; l < sh->L && g_q > 0; l++) { /* (a layer without decode steps ends it: the
                                                    header's layer count is not trusted) */
        uint32_t tq = 0, tk = 0, tv = 0;
        (void)has_kind(sh->rd, l, KVT_KIND_Q_DECODE, NULL, &tq, NULL, NULL); /* absent: 0 */
        if (!tq && l > 0)
            l_noq = l;
        if (!has_kind(sh->rd, l, KVT_KIND_K_DECODE, NULL, &tk, NULL, NULL) ||
            !has_kind(sh->rd, l, KVT_KIND_V_DECODE, NULL, &tv, NULL, NULL))
            tk = tv = 0;
        g_q = tq < g_q ? tq : g_q;
        g_kv = tk < g_kv ? tk : g_kv;
        g_kv = tv < g_kv ? tv : g_kv;
    }
    if (sh->L > 0 && g_q > 0) {
        sh->has_qd = true;
        /* with decode keys in every layer, the steps all three kinds hold (the decode queries
           see the decode keys); without, the queries' */
        sh->has_kvd = g_kv > 0;
        sh->G = (int)(sh->has_kvd && g_kv < g_q ? g_kv : g_q);
    }
    int l_cut = -1; /* the first layer without its prompt tensors: a trace cut inside them */
    for (int l = 0; l < sh->L && l_cut < 0 && kvt_trace_reader_recovered(sh->rd); l++)
        if (!has_kind(sh->rd, l, KVT_KIND_K, NULL, NULL, NULL, NULL) ||
            !has_kind(sh->rd, l, KVT_KIND_V, NULL, NULL, NULL, NULL) ||
            !has_kind(sh->rd, l, KVT_KIND_Q_WINDOW, NULL, NULL, NULL, NULL))
            l_cut = l;
    sh->has_colsum = has_kind(sh->rd, 0, KVT_KIND_ATTN_COLSUM, NULL, NULL, NULL, NULL);
    sh->has_qall = has_kind(sh->rd, 0, KVT_KIND_Q_ALL, NULL, NULL, NULL, NULL);
    for (size_t p = 0; p < n_pol; p++) {
        unsigned f = kvt_policy_flags(pols[p]);
        KVT_RETURN_IF(pols[p]->lw.w && pols[p]->lw.n != sh->L, KVT_ERR_INVALID_ARG,
                      "%s: policy %s: layer_weights=%s has %d weights; the trace has %d layers "
                      "(one weight per layer)",
                      path, kvt_policy_label(pols[p]), pols[p]->o.layer_weights, pols[p]->lw.n,
                      sh->L);
        /* every layer's every budget above the prompt's T tokens: the short-prompt rule keeps
           the whole prompt, whatever the policy (run_select), which then needs none of the
           trace's window queries */
        bool whole = n_budgets > 0;
        for (size_t b = 0; whole && b < n_budgets; b++)
            whole =
                kvt_layer_budget_min(&pols[p]->lw, kvt_budget_tokens(&budgets[b], sh->T)) > sh->T;
        /* (chunk_scores=own|kvpress reads each chunk's last queries from Q_all instead) */
        const char *cw_what;
        const int cw = kvt_chunk_min_len(pols[p], &cw_what);
        const bool own_q = cw > 0 && pols[p]->def->chunk_queries;
        KVT_RETURN_IF((f & KVT_POLICY_WINDOW_QUERY) && pols[p]->o.window > sh->W && !whole &&
                          !own_q,
                      KVT_ERR_INVALID_ARG,
                      "%s: policy %s: window=%d needs %d stored window queries; the trace has %d "
                      "(lower window=, or --window for every such policy, or capture a larger "
                      "window)",
                      path, kvt_policy_label(pols[p]), pols[p]->o.window, pols[p]->o.window, sh->W);
        if (cw > 0 && !whole) { /* chunk_scores=own|kvpress: every chunk longer than its window */
            char who[512];
            snprintf(who, sizeof(who), "%s: policy %s", path, kvt_policy_label(pols[p]));
            KVT_FORWARD(kvt_chunk_window_check(who, pols[p]->o.chunk_length, cw, cw_what, sh->T));
        }
        KVT_RETURN_IF(pols[p]->o.think > 0 && pols[p]->o.think_window > sh->W, KVT_ERR_INVALID_ARG,
                      "%s: policy %s: think_window=%d needs %d stored window queries; the trace "
                      "has %d (lower think_window=, or capture a larger window)",
                      path, kvt_policy_label(pols[p]), pols[p]->o.think_window,
                      pols[p]->o.think_window, sh->W);
        if ((f & KVT_POLICY_NEEDS_DECODE) && !sh->has_qd) {
            if (l_noq > 0) /* some layers have them: a trace cut short, not one without them */
                st = kvt_error_set(
                    KVT_ERR_NOT_FOUND,
                    "policy %s needs decode queries (Q_decode) in every layer, and layer "
                    "%d has none%s; drop the policy or replay a whole trace",
                    kvt_policy_label(pols[p]), l_noq,
                    kvt_trace_reader_recovered(sh->rd)
                        ? " (the trace is incomplete, recovered by scanning: see "
                          "kvtrace verify)"
                        : "");
            else if (kvt_trace_reader_recovered(sh->rd) && jint(hdr, "n_decode") > 0)
                /* cut short before the decode steps its capture planned */
                st = kvt_error_set(
                    KVT_ERR_NOT_FOUND,
                    "policy %s needs decode queries (Q_decode), and %s holds none: the trace is "
                    "incomplete (recovered by scanning), cut short %s; drop the policy or "
                    "replay a whole trace (see kvtrace verify)",
                    kvt_policy_label(pols[p]), path,
                    l_cut >= 0 ? "inside the prompt" : "before its decode steps");
            else
                st = kvt_error_set(KVT_ERR_NOT_FOUND,
                                   "policy %s needs decode queries (Q_decode), which %s does not "
                                   "have; capture decode steps or drop the policy",
                                   kvt_policy_label(pols[p]), path);
            return st;
        }
        KVT_RETURN_IF((f & KVT_POLICY_DECODE_EVICT) && !sh->has_kvd, KVT_ERR_NOT_FOUND,
                      "policy %s evicts decode tokens too (%s), so it needs their keys and "
                      "values (K_decode, V_decode) in every layer, which %s does not have; "
                      "capture decode keys or drop the policy",
                      kvt_policy_label(pols[p]), kvt_policy_decode_option(pols[p]), path);
        if (f & KVT_POLICY_NEEDS_QALL) {
            sh->need_qall = true;
            if (!sh->has_qall) {
                st = kvt_error_set(
                    KVT_ERR_NOT_FOUND,
                    "policy %s needs every prompt query (Q_all), which the trace does "
                    "not have: capture with --q-all (kvtrace capture-llama2c) or "
                    "with_q_all=True (kvtrace.capture), or drop the policy",
                    kvt_policy_label(pols[p]));
                return st;
            }
        }
        sh->need_rope |= (f & KVT_POLICY_NEEDS_ROPE) != 0;
        if ((f & KVT_POLICY_NEEDS_ROPE) && !sh->rope_known) {
            st = kvt_error_set(KVT_ERR_NOT_FOUND, "policy %s: %s", kvt_policy_label(pols[p]),
                               sh->rope_why);
            return st;
        }
        if (f & KVT_POLICY_NEEDS_COLSUM) {
            sh->need_colsum = true;
            if (!sh->has_colsum && !sh->has_qall) {
                st = kvt_error_set(KVT_ERR_NOT_FOUND,
                                   "policy %s needs attention column sums: %s has neither "
                                   "attn_colsum nor Q_all",
                                   kvt_policy_label(pols[p]), path);
                return st;
            }
        }
    }
    return KVT_OK;
}

kvt_status kvt_replay_check_trace(const char *path, kvt_policy *const *pols, size_t n_pol,
                                  const kvt_budget *budgets, size_t n_budgets)
{
    run_shared sh;
    memset(&sh, 0, sizeof(sh));
    cJSON *hdr = NULL;
    bound_pols b;
    kvt_status st = open_checked(path, pols, n_pol, budgets, n_budgets, &sh, &hdr);
    if (!st && !(st = bind_policies(pols, n_pol, path, sh.L, sh.Hq, sh.Hkv, sh.T, true, &b)))
        unbind_policies(&b);
    cJSON_Delete(hdr);
    kvt_trace_reader_close(sh.rd);
    return st;
}

kvt_status kvt_replay_trace(const char *path, kvt_policy *const *pols, size_t n_pol,
                            const kvt_budget *budgets, size_t n_budgets, const kvt_replay_opts *o,
                            kvt_trace_result **out)
{
    *out = NULL;
    kvt_replay_opts def = {.coverage_probes = -1};
    if (!o)
        o = &def;
    if (o->device == KVT_DEVICE_AUTO) { /* a copy with the device resolved, for the workers */
        def = *o;
        KVT_FORWARD(kvt_replay_resolve_device(o->device, &def.device, NULL, 0));
        o = &def;
    }
    (void)kvt_kernels_ref_only(); /* set the kernels up now (BLAS single-threaded, its idle
                                     threads stopped) rather than in the first worker */
    run_shared sh;
    memset(&sh, 0, sizeof(sh));
    kvt_status st;
    cJSON *hdr = NULL;
    kvt_trace_result *res = NULL;
    uint8_t *mod = NULL;
    int32_t *pos = NULL;
    int *btok = NULL;
    double *bfrac = NULL;
    pthread_t *th = NULL;
    bound_pols bound = {0};
    if ((st = open_checked(path, pols, n_pol, budgets, n_budgets, &sh, &hdr)))
        goto out_free;
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(hdr, "model");
    tl_bind_threads = o->n_threads;
    st = bind_policies(pols, n_pol, path, sh.L, sh.Hq, sh.Hkv, sh.T, false, &bound);
    tl_bind_threads = 0;
    if (st)
        goto out_free;
    if ((st = kvt_trace_result_create(sh.L, sh.Hq, sh.Hkv, n_pol, n_budgets, &res)))
        goto out_free;
    res->path = kvt_strdup(path);
    res->header_json = kvt_strdup(kvt_trace_reader_header_json(sh.rd));
    kvt_trace_reader_fingerprint(sh.rd, res->fingerprint);
    res->model_name = jstr(model, "name");
    res->model_arch = jstr(model, "arch");
    res->head_dim = sh.D, res->n_tokens = sh.T, res->window_stored = sh.W;
    res->n_decode = sh.has_qd ? sh.G : 0;
    res->has_decode_kv = sh.has_kvd;
    res->kv_elem_bytes = (int)kvt_dtype_size(sh.kdt);
    snprintf(res->kv_dtype, sizeof(res->kv_dtype), "%s",
             kvt_dtype_name(sh.kdt) ? kvt_dtype_name(sh.kdt) : "?");
    int n_probe = o->coverage_probes < 0 ? KVT_DEFAULT_COVERAGE_PROBES : o->coverage_probes;
    res->n_probes = n_probe < sh.T ? n_probe : sh.T;
    btok = kvt_malloc(n_budgets * sizeof(int));
    bfrac = kvt_malloc(n_budgets * sizeof(double));
    if (!res->path || !res->header_json || !res->model_name || !res->model_arch || !btok ||
        !bfrac) {
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
        goto out_free;
    }
    for (size_t p = 0; p < n_pol; p++) {
        res->policy_labels[p] = kvt_strdup(kvt_policy_label(pols[p]));
        res->policy_names[p] = kvt_strdup(kvt_policy_name(pols[p]));
        res->policy_flags[p] = kvt_policy_flags(pols[p]);
        res->policy_heads[p] = pols[p]->o.per_query ? sh.Hq : sh.Hkv;
        res->policy_window[p] = policy_window(pols[p]);
        if (!res->policy_labels[p] || !res->policy_names[p]) {
            st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
            goto out_free;
        }
    }
    for (size_t b = 0; b < n_budgets; b++) {
        btok[b] = res->budget_tokens[b] = kvt_budget_tokens(&budgets[b], sh.T);
        bfrac[b] = budgets[b].is_fraction ? budgets[b].value : (double)btok[b] / sh.T;
        res->budget_texts[b] = kvt_strdup(budgets[b].text);
        if (!res->budget_texts[b]) {
            st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
            goto out_free;
        }
        for (size_t p = 0; p < n_pol; p++) /* each run's smallest layer budget */
            res->min_budget[p * n_budgets + b] = kvt_layer_budget_min(&pols[p]->lw, btok[b]);
    }
    uint32_t h, t, d;
    if (has_kind(sh.rd, -1, KVT_KIND_MODALITY, &h, &t, &d, NULL) && (int)t == sh.T) {
        mod = kvt_malloc((size_t)sh.T);
        if (!mod) {
            st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
            goto out_free;
        }
        if ((st = kvt_trace_reader_read(sh.rd, -1, KVT_KIND_MODALITY, 0, 1, KVT_DTYPE_INVALID, mod,
                                        (size_t)sh.T)))
            goto out_free;
        for (int i = 0; i < sh.T; i++) {
            mod[i] = mod[i] < KVT_N_MODALITIES ? mod[i] : KVT_MOD_OTHER;
            res->modality_counts[mod[i]]++;
        }
        res->has_modality = true;
        sh.mod = mod;
    }
    if (sh.need_rope && has_kind(sh.rd, -1, KVT_KIND_POSITIONS, &h, &t, &d, NULL) &&
        (int)t == sh.T && d == 1 && (h == 1 || h == 3)) { /* for undoing RoPE */
        pos = kvt_malloc((size_t)h * sh.T * sizeof(int32_t));
        if (!pos) {
            st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
            goto out_free;
        }
        if ((st = kvt_trace_reader_read(sh.rd, -1, KVT_KIND_POSITIONS, 0, h, KVT_DTYPE_INVALID, pos,
                                        (size_t)h * sh.T * sizeof(int32_t))))
            goto out_free;
        sh.pos = pos;
        sh.n_pos_rows = (int)h;
    }
    sh.pols = bound.p, sh.n_pol = n_pol, sh.n_b = n_budgets, sh.btok = btok, sh.bfrac = bfrac;
    sh.o = o;
    sh.res = res;
    if (o->layer_mask && o->layer_mask_len != (size_t)sh.L) {
        st = kvt_error_set(KVT_ERR_INVALID_ARG, "%s: layer mask of %zu layers for a trace of %d",
                           path, o->layer_mask_len, sh.L);
        goto out_free;
    }
    sh.n_sel = sh.L;
    for (int l = 0; o->layer_mask && l < sh.L; l++)
        sh.n_sel -= !o->layer_mask[l];
    int n_th = o->n_threads;
    if (n_th <= 0 || o->decode_probs == KVT_DECODE_PROBS_AUTO) {
        /* as many threads as the cores, and as the memory holds; the decode probabilities held
           whole unless that many workers would not fit */
        const int n_probe_all =
            o->coverage_probes < 0 ? KVT_DEFAULT_COVERAGE_PROBES : o->coverage_probes;
        const int es = o->device == KVT_DEVICE_CUDA ? gpu_kv_es(sh.kdt) : 0;
        const uint64_t mem = o->memory_limit ? o->memory_limit : kvt_mem_available();
        uint64_t wb[2];
        for (int grp = 0; grp < 2; grp++)
            wb[grp] = worker_bytes(sh.T, sh.Hq, sh.Hkv, sh.D, sh.W, sh.has_qd ? sh.G : 0,
                                   n_probe_all, pols, n_pol, es, grp == 1);
        kvt_decode_probs dp = o->decode_probs;
        if (dp == KVT_DECODE_PROBS_AUTO) {
            dp = kvt_replay_decode_probs_auto(o->n_threads, 0, sh.n_sel, wb[0], wb[1], mem);
            if (o != &def)
                def = *o;
            def.decode_probs = dp;
            o = &def;
            sh.o = o;
        }
        if (n_th <= 0)
            n_th = kvt_replay_threads(0, 0, sh.n_sel, wb[dp == KVT_DECODE_PROBS_GROUP], mem);
    }
    if (n_th > sh.L)
        n_th = sh.L;
    sh.n_threads = n_th;
    sh.gpu_plan = o->device == KVT_DEVICE_CUDA;
    if (sh.gpu_plan && (sh.kdt == KVT_DTYPE_BF16 || sh.kdt == KVT_DTYPE_F16))
        sh.kv16 = sh.kdt; /* half the bytes to read, to copy and to upload */
    if (sh.gpu_plan)      /* the workers on the GPU at once: what it holds (gpu_plan_run) */
        sh.gpu_bytes = kvt_ctx_gpu_worker_bytes(sh.T, sh.D, sh.Hq, sh.Hkv, sh.W,
                                                sh.has_qd ? sh.G : 0, sh.has_kvd, n_probe,
                                                (int)(n_budgets * n_pol)); /* shared sweeps */
    th = kvt_calloc((size_t)n_th, sizeof(pthread_t));
    if (!th) {
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
        goto out_free;
    }
    pthread_mutex_init(&sh.mu, NULL);
    pthread_cond_init(&sh.gpu_cv, NULL);
    uint64_t t_wall = kvt_now_ns();
    pthread_t plan_th;
    bool plan_started = sh.gpu_plan && !pthread_create(&plan_th, NULL, gpu_plan_run, &sh);
    if (sh.gpu_plan && !plan_started)
        gpu_plan_run(&sh);
    int started = 0;
    for (; started < n_th; started++)
        if (pthread_create(&th[started], NULL, worker, &sh))
            break;
    if (started == 0)
        worker(&sh); /* no thread could start: run in the caller */
    for (int i = 0; i < started; i++)
        pthread_join(th[i], NULL);
    if (plan_started)
        pthread_join(plan_th, NULL);
    KVT_PROF_ADD(o->profile, wall_ns, kvt_now_ns() - t_wall);
    pthread_mutex_destroy(&sh.mu);
    pthread_cond_destroy(&sh.gpu_cv);
    if (sh.err) {
        st = kvt_error_set(sh.err, "%s", sh.err_msg);
        goto out_free;
    }
    *out = res;
    res = NULL;
    st = KVT_OK;
out_free:
    kvt_free(th);
    kvt_free(btok);
    kvt_free(bfrac);
    kvt_free(mod);
    kvt_free(pos);
    kvt_trace_result_free(res);
    cJSON_Delete(hdr);
    kvt_trace_reader_close(sh.rd);
    unbind_policies(&bound);
    return st;
}
