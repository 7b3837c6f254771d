/* bind_read.c - reads for the policies whose bind hook opens the trace before its layers are
 * replayed (fastv: layer K-1's attention; cake: every layer's window attention). */
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
