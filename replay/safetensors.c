/* safetensors.c - read one float tensor of a safetensors file (the format Hugging Face hub
 * checkpoints use: an 8-byte little-endian header length N, N bytes of JSON naming each tensor's
 * dtype, shape and data_offsets [begin, end) into the bytes that follow; "__metadata__" is not a
 * tensor). kvpress's ExpectedAttentionStats (query_mean, query_cov) and QFilters (q_filters)
 * are saved so on the hub; kvtrace reads them as they are, into a kvt_npy, without PyTorch.
 * Only F64, F32, F16 and BF16 tensors are read; anything malformed is one clear error, and only
 * the named tensor's bytes are read.
 */
#include <cjson/cJSON.h>
#include <stdlib.h>
#include <string.h>

#include "replay_internal.h"

#define ST_MAX_HEADER (100u << 20) /* the format's own limit */

/* a JSON number that is an integer in [0, 2^53], into *v */
static bool st_uint(const cJSON *x, uint64_t *v)
{
    if (!cJSON_IsNumber(x))
        return false;
    const double d = x->valuedouble;
    if (!(d >= 0 && d <= 9007199254740992.0) || d != (double)(uint64_t)d)
        return false;
    *v = (uint64_t)d;
    return true;
}

/* the tensors' names, comma-separated (at most cap bytes), for the not-found message */
static void st_names(const cJSON *root, char *buf, size_t cap)
{
    size_t k = 0;
    buf[0] = '\0';
    for (const cJSON *e = root->child; e && k + 1 < cap; e = e->next) {
        if (!e->string || !strcmp(e->string, "__metadata__"))
            continue;
        int w = snprintf(buf + k, cap - k, "%s%s", k ? ", " : "", e->string);
        if (w < 0 || (size_t)w >= cap - k) {
            snprintf(buf + (cap > 5 ? cap - 5 : 0), cap > 5 ? 5 : cap, "...");
            return;
        }
        k += (size_t)w;
    }
}

bool kvt_is_safetensors(const char *path)
{
    FILE *f = kvt_fopen_regular(path);
    if (!f)
        return false;
    unsigned char b[9];
    bool yes = fread(b, 1, 9, f) == 9 && b[8] == '{';
    for (int i = 5; yes && i < 8; i++) /* a header length below 2^40 */
        yes = b[i] == 0;
    fclose(f);
    return yes;
}

kvt_status kvt_read_safetensors(const char *path, const char *name, kvt_npy *out)
{
    memset(out, 0, sizeof(*out));
    kvt_status st = KVT_OK;
    char *hdr = NULL;
    cJSON *root = NULL;
    FILE *f;
    uint64_t size;
    KVT_FORWARD(kvt_fopen_sized(path, &f, &size));
    unsigned char pre[8];
    if (fread(pre, 1, 8, f) != 8) {
        st = kvt_error_set(KVT_ERR_CORRUPT, "%s is not a safetensors file (shorter than 8 bytes)",
                           path);
        goto out;
    }
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = hlen << 8 | pre[i];
    if (hlen < 2 || hlen > ST_MAX_HEADER || hlen > size - 8) {
        st = kvt_error_set(KVT_ERR_CORRUPT,
                           "%s is not a safetensors file, or is cut short (header length %llu, "
                           "file %llu bytes)",
                           path, (unsigned long long)hlen, (unsigned long long)size);
        goto out;
    }
    hdr = kvt_malloc((size_t)hlen + 1);
    if (!hdr) {
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory reading %s", path);
        goto out;
    }
    if (fread(hdr, 1, (size_t)hlen, f) != hlen) {
        st = kvt_error_set(KVT_ERR_IO, "%s: read failed", path);
        goto out;
    }
    hdr[hlen] = '\0';
    root = cJSON_ParseWithLength(hdr, (size_t)hlen);
    if (!cJSON_IsObject(root)) {
        st =
            kvt_error_set(KVT_ERR_CORRUPT, "%s: the safetensors header is not a JSON object", path);
        goto out;
    }
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(root, name);
    if (!t || !strcmp(name, "__metadata__")) {
        char names[200];
        st_names(root, names, sizeof(names));
        st = kvt_error_set(KVT_ERR_NOT_FOUND, "%s holds no tensor named %s (it holds: %s)", path,
                           name, names[0] ? names : "none");
        goto out;
    }
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(t, "dtype");
    const cJSON *sh = cJSON_GetObjectItemCaseSensitive(t, "shape");
    const cJSON *off = cJSON_GetObjectItemCaseSensitive(t, "data_offsets");
    if (!cJSON_IsString(dt) || !cJSON_IsArray(sh) || !cJSON_IsArray(off) ||
        cJSON_GetArraySize(off) != 2) {
        st = kvt_error_set(KVT_ERR_CORRUPT,
                           "%s: tensor %s lacks a dtype, a shape or its two data_offsets", path,
                           name);
        goto out;
    }
    const char *d = dt->valuestring;
    out->elem = !strcmp(d, "F64")    ? 8
                : !strcmp(d, "F32")  ? 4
                : !strcmp(d, "F16")  ? 2
                : !strcmp(d, "BF16") ? 2
                                     : 0;
    out->bf16 = !strcmp(d, "BF16");
    if (!out->elem) {
        st = kvt_error_set(KVT_ERR_UNSUPPORTED,
                           "%s: tensor %s has dtype %.16s; expected F64, F32, F16 or BF16", path,
                           name, d);
        goto out;
    }
    uint64_t n = 1, v;
    for (const cJSON *x = sh->child; x; x = x->next) {
        if (!st_uint(x, &v) || v > INT32_MAX || out->ndim == KVT_NPY_MAX_DIMS ||
            __builtin_mul_overflow(n, v, &n)) {
            st = kvt_error_set(KVT_ERR_CORRUPT, "%s: tensor %s has a bad or unsupported shape",
                               path, name);
            goto out;
        }
        out->shape[out->ndim++] = (int)v;
    }
    uint64_t b0, b1, bytes;
    const uint64_t have = size - 8 - hlen;
    if (!st_uint(off->child, &b0) || !st_uint(off->child->next, &b1) || b0 > b1 || b1 > have ||
        __builtin_mul_overflow(n, (uint64_t)out->elem, &bytes) || bytes > SIZE_MAX ||
        b1 - b0 != bytes) {
        st = kvt_error_set(KVT_ERR_CORRUPT,
                           "%s: tensor %s's data_offsets do not hold its shape's %s bytes within "
                           "the file (cut short?)",
                           path, name, d);
        goto out;
    }
    if (fseeko(f, (off_t)(8 + hlen + b0), SEEK_SET) != 0)
        st = kvt_error_set(KVT_ERR_IO, "%s: read failed", path);
    else
        st = kvt_npy_read_data(out, n, bytes, f, path);
out:
    cJSON_Delete(root);
    kvt_free(hdr);
    fclose(f);
    if (st)
        kvt_npy_free(out);
    return st;
}
