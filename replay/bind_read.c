/* bind_read.c - reads for the policies whose bind hook opens the trace before its layers are
 * replayed (fastv: layer K-1's attention; cake: every layer's window attention). */
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
