/* npy.c - read a NumPy .npy file of floats (np.save's format, versions 1.0 to 3.0): the magic
 * "\x93NUMPY", a version, a header length, a Python dict literal with 'descr', 'fortran_order'
 * and 'shape', then the array's bytes. Used by the external policy (scores=FILE.npy) and
 * qfilter's filters (filters=FILE.npy). Only
 * what np.save writes for a C-ordered little-endian float16/32/64 array is accepted; anything
 * else is one clear error.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "replay_internal.h"

#define NPY_MAX_HEADER (1u << 20)

/* the value text after 'key': in the header dict, or NULL */
static const char *dict_value(const char *hdr, const char *key)
{
    char pat[32];
    snprintf(pat, sizeof(pat), "'%s'", key);
    const char *p = strstr(hdr, pat);
    if (!p) {
        snprintf(pat, sizeof(pat), "\"%s\"", key);
        p = strstr(hdr, pat);
    }
    if (!p)
        return NULL;
    p += strlen(pat);
    while (*p == ' ')
        p++;
    if (*p != ':')
        return NULL;
    p++;
    while (*p == ' ')
        p++;
    return p;
}

kvt_status kvt_fopen_sized(const char *path, FILE **f, uint64_t *size)
{
    *f = kvt_fopen_regular(path);
    KVT_RETURN_IF(!*f, KVT_ERR_IO, "%s", kvt_open_error(path));
    struct stat sb;
    if (fstat(fileno(*f), &sb) != 0) {
        kvt_status st = kvt_error_set(KVT_ERR_IO, "%s: %s", path, strerror(errno));
        fclose(*f);
        *f = NULL;
        return st;
    }
    *size = (uint64_t)sb.st_size;
    return KVT_OK;
}

kvt_status kvt_npy_read_data(kvt_npy *out, uint64_t n, uint64_t bytes, FILE *f, const char *path)
{
    out->n = (size_t)n;
    out->data = kvt_malloc(bytes ? (size_t)bytes : 1);
    KVT_RETURN_IF(!out->data, KVT_ERR_NOMEM, "out of memory reading %s (%llu bytes)", path,
                  (unsigned long long)bytes);
    KVT_RETURN_IF(fread(out->data, 1, (size_t)bytes, f) != bytes, KVT_ERR_IO, "%s: read failed",
                  path);
    return KVT_OK;
}

kvt_status kvt_read_npy(const char *path, kvt_npy *out)
{
    memset(out, 0, sizeof(*out));
    kvt_status st = KVT_OK;
    char *hdr = NULL;
    FILE *f;
    uint64_t size;
    KVT_FORWARD(kvt_fopen_sized(path, &f, &size));
    unsigned char pre[12];
    if (fread(pre, 1, 10, f) != 10 || memcmp(pre, "\x93NUMPY", 6) != 0) {
        st = kvt_error_set(KVT_ERR_CORRUPT, "%s is not a NumPy .npy file (np.save writes one)",
                           path);
        goto out;
    }
    int major = pre[6];
    uint32_t hlen;
    long off;
    if (major == 1) {
        hlen = (uint32_t)pre[8] | (uint32_t)pre[9] << 8;
        off = 10;
    } else if (major == 2 || major == 3) {
        if (fread(pre + 10, 1, 2, f) != 2) {
            st = kvt_error_set(KVT_ERR_CORRUPT, "%s: the .npy header is cut short", path);
            goto out;
        }
        hlen = (uint32_t)pre[8] | (uint32_t)pre[9] << 8 | (uint32_t)pre[10] << 16 |
               (uint32_t)pre[11] << 24;
        off = 12;
    } else {
        st = kvt_error_set(KVT_ERR_UNSUPPORTED, "%s: .npy format version %d.%d is not supported",
                           path, major, pre[7]);
        goto out;
    }
    if (hlen > NPY_MAX_HEADER || (uint64_t)off + hlen > size) {
        st = kvt_error_set(KVT_ERR_CORRUPT, "%s: the .npy header is cut short or too long", path);
        goto out;
    }
    hdr = kvt_malloc(hlen + 1);
    if (!hdr) {
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory reading %s", path);
        goto out;
    }
    if (fread(hdr, 1, hlen, f) != hlen) {
        st = kvt_error_set(KVT_ERR_IO, "%s: read failed", path);
        goto out;
    }
    hdr[hlen] = '\0';
    const char *descr = dict_value(hdr, "descr"), *fo = dict_value(hdr, "fortran_order");
    const char *shape = dict_value(hdr, "shape");
    if (!descr || !fo || !shape || *shape != '(') {
        st = kvt_error_set(KVT_ERR_CORRUPT,
                           "%s: the .npy header lacks descr, fortran_order or "
                           "shape",
                           path);
        goto out;
    }
    char q = *descr, code[17];
    const char *end = q == '\'' || q == '"' ? strchr(descr + 1, q) : NULL;
    int dlen = end ? (int)(end - descr - 1) : 0;
    if (!end || dlen < 1 || dlen > 16) {
        st = kvt_error_set(KVT_ERR_CORRUPT, "%s: the .npy header's descr is not a dtype string",
                           path);
        goto out;
    }
    memcpy(code, descr + 1, (size_t)dlen);
    code[dlen] = '\0';
    if (dlen == 3 && code[0] == '>' && code[1] == 'f') {
        st = kvt_error_set(KVT_ERR_UNSUPPORTED,
                           "%s: big-endian floats (%s); save with astype('<f4')", path, code);
        goto out;
    }
    if (dlen != 3 || (code[0] != '<' && code[0] != '=') || code[1] != 'f' ||
        (code[2] != '2' && code[2] != '4' && code[2] != '8')) {
        st = kvt_error_set(KVT_ERR_UNSUPPORTED,
                           "%s: dtype '%s' is not a float16, float32 or float64 array (save "
                           "scores with astype(np.float32))",
                           path, code);
        goto out;
    }
    out->elem = code[2] - '0';
    if (strncmp(fo, "False", 5) != 0) {
        st = kvt_error_set(KVT_ERR_UNSUPPORTED,
                           "%s: a Fortran-ordered array; save "
                           "np.ascontiguousarray(scores)",
                           path);
        goto out;
    }
    int shape_len = (int)strcspn(shape, ")"); /* the shape's text, for messages */
    shape_len = shape[shape_len] == ')' ? shape_len + 1 : shape_len;
    shape_len = shape_len > 60 ? 60 : shape_len;
    const char *p = shape + 1;
    uint64_t n = 1;
    for (;;) {
        while (*p == ' ')
            p++;
        if (*p == ')')
            break;
        char *e;
        errno = 0;
        unsigned long long v = strtoull(p, &e, 10);
        if (e == p || errno || v > INT32_MAX || out->ndim == KVT_NPY_MAX_DIMS) {
            st = kvt_error_set(KVT_ERR_CORRUPT, "%s: bad or unsupported shape %.*s", path,
                               shape_len, shape);
            goto out;
        }
        out->shape[out->ndim++] = (int)v;
        if (__builtin_mul_overflow(n, (uint64_t)v, &n)) {
            st = kvt_error_set(KVT_ERR_CORRUPT, "%s: shape %.*s is too large", path, shape_len,
                               shape);
            goto out;
        }
        p = e;
        while (*p == ' ')
            p++;
        if (*p == ',')
            p++;
        else if (*p != ')') {
            st = kvt_error_set(KVT_ERR_CORRUPT, "%s: bad shape %.*s", path, shape_len, shape);
            goto out;
        }
    }
    uint64_t bytes, have = size - (uint64_t)off - hlen;
    if (__builtin_mul_overflow(n, (uint64_t)out->elem, &bytes) || bytes > SIZE_MAX) {
        st = kvt_error_set(KVT_ERR_CORRUPT, "%s: shape %.*s is too large", path, shape_len, shape);
        goto out;
    }
    if (have != bytes) {
        st = kvt_error_set(KVT_ERR_CORRUPT,
                           "%s: the shape needs %llu bytes of data, the file holds %llu%s", path,
                           (unsigned long long)bytes, (unsigned long long)have,
                           have < bytes ? " (cut short?)" : "");
        goto out;
    }
    st = kvt_npy_read_data(out, n, bytes, f, path);
out:
    kvt_free(hdr);
    fclose(f);
    if (st)
        kvt_npy_free(out);
    return st;
}

double kvt_npy_at(const kvt_npy *a, size_t i)
{
    const unsigned char *b = (const unsigned char *)a->data + i * (size_t)a->elem;
    if (a->elem == 8) {
        double d;
        memcpy(&d, b, 8);
        return d;
    }
    if (a->elem == 4) {
        float x;
        memcpy(&x, b, 4);
        return x;
    }
    uint16_t h;
    memcpy(&h, b, 2);
    return a->bf16 ? kvt_bf16_to_f32(h) : kvt_f16_to_f32(h);
}

void kvt_npy_free(kvt_npy *a)
{
    kvt_free(a->data);
    memset(a, 0, sizeof(*a));
}

kvt_status kvt_array_load(const char *policy, const char *path, const char *tensor, int ndim,
                          const char *dims, const char *hint, kvt_npy **out)
{
    *out = NULL;
    kvt_npy *a = kvt_calloc(1, sizeof(*a));
    KVT_RETURN_IF(!a, KVT_ERR_NOMEM, "out of memory");
    char file[4096];
    const char *from = path;
    kvt_status st = KVT_OK;
    if (tensor) {
        if (kvt_safetensors_file(path, file, sizeof(file)))
            from = file;
        else
            st = kvt_error_set(KVT_ERR_INVALID_ARG, "%s: path too long", path);
    }
    if (!st)
        st = tensor && kvt_is_safetensors(from) ? kvt_read_safetensors(from, tensor, a)
                                                : kvt_read_npy(from, a);
    if (st == KVT_OK && a->ndim != ndim)
        st = kvt_error_set(KVT_ERR_INVALID_ARG, "%s has %d dimensions; expected %d: %s", from,
                           a->ndim, ndim, dims);
    if (st) {
        kvt_npy_destroy(a);
        return kvt_error_set(st, "%s: %s%s", policy, kvt_error_msg(), hint);
    }
    *out = a;
    return KVT_OK;
}

bool kvt_safetensors_file(const char *path, char *buf, size_t cap)
{
    int n = kvt_is_dir(path) ? snprintf(buf, cap, "%s/model.safetensors", path) /* hub folder */
                             : snprintf(buf, cap, "%s", path);
    return n >= 0 && (size_t)n < cap;
}

kvt_status kvt_npy_load(const char *policy, const char *path, const char *dims, const char *hint,
                        kvt_npy **out)
{
    return kvt_array_load(policy, path, NULL, 3, dims, hint, out);
}

void kvt_npy_destroy(kvt_npy *a)
{
    if (a) {
        kvt_npy_free(a);
        kvt_free(a);
    }
}

bool kvt_trace_npy_path(const char *dir, const char *trace, char *buf, size_t cap)
{
    const char *base = strrchr(trace, '/') ? strrchr(trace, '/') + 1 : trace;
    size_t n = strlen(base);
    if (n > 4 && !strcmp(base + n - 4, ".kvt"))
        n -= 4;
    int len = snprintf(buf, cap, "%s%s%.*s.npy", dir,
                       dir[0] && dir[strlen(dir) - 1] == '/' ? "" : "/", (int)n, base);
    return len >= 0 && (size_t)len < cap;
}

bool kvt_is_dir(const char *path)
{
    struct stat sb;
    return path && stat(path, &sb) == 0 && S_ISDIR(sb.st_mode);
}

void kvt_policy_fini_npy(kvt_policy *p)
{
    kvt_npy_destroy(p->state);
    p->state = NULL;
}
