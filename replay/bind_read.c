/* bind_read.c - reads for the policies whose bind hook opens the trace before its layers are
 * replayed (fastv: layer K-1's attention; cake: every layer's window attention). */
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "replay_internal.h"

double kvt_bind_trace_scale(kvt_trace_reader *r, int D)
{
    cJSON *h = cJSON_Parse(kvt_trace_reader_header_json(r));
    const cJSON *as = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(h, "model"),
                                                       "attn_scale");
    double s = cJSON_IsNumber(as) && as->valuedouble > 0 ? as->valuedouble : 1.0 / sqrt((double)D);
    cJSON_Delete(h);
    return s;
}

kvt_status kvt_bind_read_f32(kvt_trace_reader *r, int l, int kind, uint32_t heads, size_t n,
                             const char *policy, float **out)
{
    float *x = kvt_malloc(n * sizeof(float) + 1);
    KVT_RETURN_IF(!x, KVT_ERR_NOMEM, "%s: out of memory", policy);
    kvt_status st =
        kvt_trace_reader_read(r, l, kind, 0, heads, KVT_DTYPE_F32, x, n * sizeof(float));
    if (st) {
        kvt_free(x);
        return st;
    }
    *out = x;
    return KVT_OK;
}

kvt_status kvt_bind_check_qk(kvt_trace_reader *r, int l, int qkind, int Hq, int Hkv, int T,
                             const char *policy, int *nq_out, int *D_out)
{
    uint32_t nh, nt, dim;
    kvt_dtype dt;
    KVT_RETURN_IF(kvt_trace_reader_shape(r, l, qkind, &nh, &nt, &dim, &dt), KVT_ERR_NOT_FOUND,
                  "%s: layer %d has no %s", policy, l, kvt_kind_name(qkind));
    KVT_RETURN_IF(nh != (uint32_t)Hq || nt < 1 || nt > (uint32_t)T, KVT_ERR_CORRUPT,
                  "%s: layer %d's %s is [%u heads, %u queries], not [%d, 1 to %d]", policy, l,
                  kvt_kind_name(qkind), nh, nt, Hq, T);
    const int D = (int)dim, nq = (int)nt;
    KVT_RETURN_IF(kvt_trace_reader_shape(r, l, KVT_KIND_K, &nh, &nt, &dim, &dt) ||
                      nh != (uint32_t)Hkv || nt != (uint32_t)T || dim != (uint32_t)D,
                  KVT_ERR_CORRUPT, "%s: layer %d's K is not [%d, %d, %d] as its queries", policy, l,
                  Hkv, T, D);
    if (nq_out)
        *nq_out = nq;
    if (D_out)
        *D_out = D;
    return KVT_OK;
}

kvt_status kvt_bind_check_windows(const char *path, const char *policy, int L, int step, int Hq,
                                  int Hkv, int T, int W)
{
    kvt_trace_reader *r = NULL;
    KVT_FORWARD(kvt_trace_reader_open(path, &r));
    kvt_status st = KVT_OK;
    for (int l = 0; l < L && !st; l += step) {
        int nq;
        if (!(st = kvt_bind_check_qk(r, l, KVT_KIND_Q_WINDOW, Hq, Hkv, T, policy, &nq, NULL)) &&
            nq < W)
            st = kvt_error_set(KVT_ERR_INVALID_ARG,
                               "%s: window=%d but layer %d stores %d window queries (give "
                               "window=%d or less)",
                               policy, W, l, nq, nq);
    }
    kvt_trace_reader_close(r);
    return st;
}

kvt_status kvt_bind_read_qk(kvt_trace_reader *r, int l, int qkind, int Hq, int Hkv, int T,
                            const char *policy, kvt_bind_qk *out)
{
    int D, nq;
    memset(out, 0, sizeof(*out));
    KVT_FORWARD(kvt_bind_check_qk(r, l, qkind, Hq, Hkv, T, policy, &nq, &D));
    kvt_status st =
        kvt_bind_read_f32(r, l, qkind, (uint32_t)Hq, (size_t)Hq * nq * D, policy, &out->q);
    if (!st && (st = kvt_bind_read_f32(r, l, KVT_KIND_K, (uint32_t)Hkv, (size_t)Hkv * T * D, policy,
                                       &out->k))) {
        kvt_free(out->q);
        out->q = NULL;
    }
    if (st)
        return st;
    out->nq = nq, out->D = D, out->scale = kvt_bind_trace_scale(r, D);
    return KVT_OK;
}

kvt_status kvt_post_vision_plan(kvt_trace_reader *r, const char *policy, int last, int L, int Hq,
                                int Hkv, int T, kvt_post_vision *pl)
{
    memset(pl, 0, sizeof(*pl));
    uint8_t *mod = kvt_malloc((size_t)T + 1);
    KVT_RETURN_IF(!mod, KVT_ERR_NOMEM, "%s: out of memory", policy);
    kvt_status st = KVT_OK;
    if (kvt_trace_reader_read(r, -1, KVT_KIND_MODALITY, 0, 1, KVT_DTYPE_INVALID, mod, (size_t)T)) {
        st = kvt_error_set(KVT_ERR_NOT_FOUND,
                           "%s: the trace has no modality table (which tokens are visual), so "
                           "no post-vision queries",
                           policy);
        goto out;
    }
    int last_vis = -1;
    for (int j = 0; j < T; j++)
        if (mod[j] == KVT_MOD_IMAGE || mod[j] == KVT_MOD_VIDEO)
            last_vis = j;
    if (last_vis < 0) {
        st = kvt_error_set(KVT_ERR_INVALID_ARG,
                           "%s: the trace has no image or video tokens, so no post-vision "
                           "queries (snapkv ranks by the last prompt queries instead)",
                           policy);
        goto out;
    }
    if (last_vis == T - 1) {
        st = kvt_error_set(KVT_ERR_INVALID_ARG,
                           "%s: the prompt ends with an image or video token (%d), so no "
                           "post-vision query follows it",
                           policy, last_vis);
        goto out;
    }
    const int n_post = T - 1 - last_vis;
    const int used = last > 0 && last < n_post ? last : n_post;
    /* the stored window queries when they hold them, else Q_all */
    uint32_t nh, nt, qdim;
    kvt_dtype dt;
    int qkind = KVT_KIND_Q_WINDOW;
    const uint32_t nw = kvt_trace_reader_shape(r, 0, qkind, &nh, &nt, &qdim, &dt) ? 0 : nt;
    if (nw < (uint32_t)used) {
        qkind = KVT_KIND_Q_ALL;
        if (kvt_trace_reader_shape(r, 0, qkind, &nh, &nt, &qdim, &dt)) {
            st = kvt_error_set(KVT_ERR_NOT_FOUND,
                               "%s: the %d post-vision queries (after the last image or "
                               "video token, %d) are more than the %u window queries the trace "
                               "stores, and it has no Q_all: capture a window of %d or more "
                               "(--window, kvtrace.capture(..., window=%d)) or every query "
                               "(--q-all, with_q_all=True), or give last=%u",
                               policy, used, last_vis, nw, used, used, nw > 0 ? nw : 1);
            goto out;
        }
    }
    if (!(pl->nq = kvt_malloc((size_t)L * sizeof(int) + 1))) {
        st = kvt_error_set(KVT_ERR_NOMEM, "%s: out of memory", policy);
        goto out;
    }
    for (int l = 0; l < L && !st; l++) {
        int nq, D;
        if ((st = kvt_bind_check_qk(r, l, qkind, Hq, Hkv, T, policy, &nq, &D)))
            break;
        if (nq < used || (qkind == KVT_KIND_Q_ALL && nq != T) || (l > 0 && D != pl->D))
            st = kvt_error_set(
                KVT_ERR_CORRUPT, "%s: layer %d stores %d %s of dim %d, not %s%d of dim %d", policy,
                l, nq, kvt_kind_name(qkind), D, qkind == KVT_KIND_Q_ALL ? "" : "at least ",
                qkind == KVT_KIND_Q_ALL ? T : used, l > 0 ? pl->D : D);
        pl->nq[l] = nq, pl->D = D;
    }
    pl->used = used, pl->qkind = qkind, pl->last_vis = last_vis;
out:
    if (st) {
        kvt_free(mod);
        kvt_free(pl->nq);
        pl->nq = NULL;
    } else
        pl->mod = mod;
    return st;
}

void kvt_post_vision_free(kvt_post_vision *pl)
{
    kvt_free(pl->nq);
    kvt_free(pl->mod);
    pl->nq = NULL;
    pl->mod = NULL;
}

kvt_status kvt_post_vision_check(const kvt_policy *p, const char *path, int L, int Hq, int Hkv,
                                 int T)
{
    kvt_trace_reader *r = NULL;
    kvt_post_vision pl;
    KVT_FORWARD(kvt_trace_reader_open(path, &r));
    kvt_status st = kvt_post_vision_plan(r, p->def->name, p->o.last, L, Hq, Hkv, T, &pl);
    kvt_post_vision_free(&pl);
    kvt_trace_reader_close(r);
    return st;
}

/* ---- kvt_bind_each_layer ---- */
#define BIND_MAX_THREADS 64

typedef struct bind_layers {
    int L;
    kvt_status (*fn)(void *arg, int l);
    void *arg;
    int next; /* the next layer to take (atomic) */
    int stop; /* a layer failed (atomic) */
} bind_layers;

typedef struct bind_thread {
    bind_layers *w;
    int layer; /* the layer that failed, or -1 */
    kvt_status st;
    char msg[512];
} bind_thread;

static void *bind_run(void *arg)
{
    bind_thread *th = arg;
    bind_layers *w = th->w;
    for (;;) {
        const int l = __atomic_fetch_add(&w->next, 1, __ATOMIC_RELAXED);
        if (l >= w->L || __atomic_load_n(&w->stop, __ATOMIC_RELAXED))
            break;
        kvt_status st = w->fn(w->arg, l);
        if (st) { /* the message is this thread's: kept for the caller */
            th->layer = l, th->st = st;
            snprintf(th->msg, sizeof(th->msg), "%s", kvt_error_msg());
            __atomic_store_n(&w->stop, 1, __ATOMIC_RELAXED);
            break;
        }
    }
    return NULL;
}

kvt_status kvt_bind_each_layer(int L, uint64_t per_thread, kvt_status (*fn)(void *arg, int l),
                               void *arg)
{
    int n_th = kvt_bind_threads() > 0 ? kvt_bind_threads() : kvt_cpu_count();
    n_th = n_th < L ? n_th : L;
    n_th = n_th < BIND_MAX_THREADS ? n_th : BIND_MAX_THREADS;
    const uint64_t avail = kvt_mem_available();
    if (per_thread && avail && (uint64_t)n_th * per_thread > avail / 2)
        n_th = (int)(avail / 2 / per_thread);
    n_th = n_th > 1 ? n_th : 1;
    bind_layers w = {.L = L, .fn = fn, .arg = arg};
    bind_thread th[BIND_MAX_THREADS];
    pthread_t tid[BIND_MAX_THREADS];
    bool started[BIND_MAX_THREADS] = {false};
    for (int i = 0; i < n_th; i++)
        th[i] = (bind_thread){.w = &w, .layer = -1};
    for (int i = 1; i < n_th; i++)
        started[i] = !pthread_create(&tid[i], NULL, bind_run, &th[i]);
    bind_run(&th[0]);
    for (int i = 1; i < n_th; i++)
        if (started[i])
            pthread_join(tid[i], NULL);
    int worst = -1;
    for (int i = 0; i < n_th; i++)
        if (th[i].layer >= 0 && (worst < 0 || th[i].layer < th[worst].layer))
            worst = i;
    return worst < 0 ? KVT_OK : kvt_error_set(th[worst].st, "%s", th[worst].msg);
}
