/* trace_format.c - names of kinds and modalities, record header encode/decode with every
 * field range-checked, full-length I/O helpers and the file header parser (the crc32 is in
 * crc32.c). Shared by trace_write.c, trace_read.c and trace_verify.c.
 */
#include <errno.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "trace_internal.h"

static const struct {
    int kind;
    const char *name;
} kind_names[] = {
    {KVT_KIND_K, "K"},
    {KVT_KIND_V, "V"},
    {KVT_KIND_Q_WINDOW, "Q_window"},
    {KVT_KIND_Q_DECODE, "Q_decode"},
    {KVT_KIND_K_DECODE, "K_decode"},
    {KVT_KIND_V_DECODE, "V_decode"},
    {KVT_KIND_ATTN_COLSUM, "attn_colsum"},
    {KVT_KIND_Q_ALL, "Q_all"},
    {KVT_KIND_KVZIP_SCORE, "kvzip_score"},
    {KVT_KIND_TOKEN_IDS, "token_ids"},
    {KVT_KIND_MODALITY, "modality"},
    {KVT_KIND_POSITIONS, "positions"},
    {KVT_KIND_DECODE_TOKEN_IDS, "decode_token_ids"},
    {KVT_KIND_TOKEN_TEXT, "token_text"},
    {KVT_KIND_META_JSON, "meta_json"},
};

const char *kvt_kind_name(int kind)
{
    for (size_t i = 0; i < sizeof(kind_names) / sizeof(kind_names[0]); i++)
        if (kind_names[i].kind == kind)
            return kind_names[i].name;
    return NULL;
}

int kvt_kind_from_name(const char *name)
{
    for (size_t i = 0; name && i < sizeof(kind_names) / sizeof(kind_names[0]); i++)
        if (!strcasecmp(kind_names[i].name, name))
            return kind_names[i].kind;
    return 0;
}

const char *kvt_modality_name(int m)
{
    switch (m) {
    case KVT_MOD_TEXT:
        return "text";
    case KVT_MOD_IMAGE:
        return "image";
    case KVT_MOD_VIDEO:
        return "video";
    case KVT_MOD_OTHER:
        return "other";
    default:
        return "unknown";
    }
}

/* Record header, 88 bytes (FORMAT.md §Record_Header). */
void kvt_rec_encode(const kvt_rec_hdr *h, uint8_t out[KVT_REC_HEADER_BYTES])
{
    const kvt_record_info *i = &h->info;
    memset(out, 0, KVT_REC_HEADER_BYTES);
    kvt_put_u32(out + 0, KVT_REC_MAGIC);
    kvt_put_u16(out + 4, (uint16_t)i->kind);
    out[6] = (uint8_t)i->dtype;
    out[7] = (uint8_t)i->filter;
    kvt_put_u32(out + 8, (uint32_t)i->layer);
    kvt_put_u32(out + 12, i->head_begin);
    kvt_put_u32(out + 16, i->head_end);
    kvt_put_u32(out + 20, i->tok_begin);
    kvt_put_u32(out + 24, i->tok_end);
    kvt_put_u32(out + 28, i->dim);
    kvt_put_u32(out + 32, i->seq);
    kvt_put_u32(out + 36, 0); /* Flags */
    kvt_put_u64(out + 40, i->raw_bytes);
    kvt_put_u64(out + 48, i->comp_bytes);
    kvt_put_u32(out + 56, h->payload_crc);
    /* 60..83 reserved, zero */
    kvt_put_u32(out + 84, kvt_crc32(out, 84));
}

kvt_status kvt_rec_raw_bytes(const kvt_record_info *i, uint64_t *out)
{
    size_t es = kvt_dtype_size(i->dtype), n;
    KVT_RETURN_IF(es == 0, KVT_ERR_CORRUPT, "record has unknown dtype code %d", (int)i->dtype);
    KVT_RETURN_IF(i->head_end <= i->head_begin || i->tok_end <= i->tok_begin || i->dim == 0,
                  KVT_ERR_CORRUPT, "record has an empty or inverted range");
    if (kvt_mul_overflow((size_t)(i->head_end - i->head_begin), (size_t)(i->tok_end - i->tok_begin),
                         &n) ||
        kvt_mul_overflow(n, (size_t)i->dim, &n) || kvt_mul_overflow(n, es, &n))
        return kvt_error_set(KVT_ERR_OVERFLOW, "record size overflows");
    *out = (uint64_t)n;
    return KVT_OK;
}

kvt_status kvt_rec_decode(const uint8_t in[KVT_REC_HEADER_BYTES], kvt_rec_hdr *h)
{
    KVT_RETURN_IF(kvt_get_u32(in) != KVT_REC_MAGIC, KVT_ERR_CORRUPT, "bad record magic");
    KVT_RETURN_IF(kvt_get_u32(in + 84) != kvt_crc32(in, 84), KVT_ERR_CHECKSUM,
                  "record header checksum mismatch");
    memset(h, 0, sizeof(*h));
    kvt_record_info *i = &h->info;
    i->kind = kvt_get_u16(in + 4);
    i->dtype = (kvt_dtype)in[6];
    i->filter = (kvt_filter)in[7];
    i->layer = (int32_t)kvt_get_u32(in + 8);
    i->head_begin = kvt_get_u32(in + 12);
    i->head_end = kvt_get_u32(in + 16);
    i->tok_begin = kvt_get_u32(in + 20);
    i->tok_end = kvt_get_u32(in + 24);
    i->dim = kvt_get_u32(in + 28);
    i->seq = kvt_get_u32(in + 32);
    i->raw_bytes = kvt_get_u64(in + 40);
    i->comp_bytes = kvt_get_u64(in + 48);
    h->payload_crc = kvt_get_u32(in + 56);
    KVT_RETURN_IF(i->layer < -1, KVT_ERR_CORRUPT, "record has layer %d", (int)i->layer);
    KVT_RETURN_IF(i->dim > KVT_MAX_DIM, KVT_ERR_CORRUPT, "record dim %u too large",
                  (unsigned)i->dim);
    uint64_t want;
    KVT_FORWARD(kvt_rec_raw_bytes(i, &want));
    KVT_RETURN_IF(want != i->raw_bytes, KVT_ERR_CORRUPT,
                  "record raw size %llu does not match its shape (%llu)",
                  (unsigned long long)i->raw_bytes, (unsigned long long)want);
    KVT_RETURN_IF(i->comp_bytes < 9 || i->comp_bytes > (1ull << 48), KVT_ERR_CORRUPT,
                  "record compressed size %llu out of range", (unsigned long long)i->comp_bytes);
    return KVT_OK;
}

kvt_status kvt_pread_full(int fd, void *buf, size_t n, uint64_t off)
{
    uint8_t *p = buf;
    while (n > 0) {
        ssize_t r = pread(fd, p, n, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return kvt_error_set(KVT_ERR_IO, "read failed at offset %llu: %s",
                                 (unsigned long long)off, strerror(errno));
        }
        if (r == 0)
            return kvt_error_set(KVT_ERR_TRUNCATED, "file ends at offset %llu",
                                 (unsigned long long)off);
        p += r;
        n -= (size_t)r;
        off += (uint64_t)r;
    }
    return KVT_OK;
}

kvt_status kvt_write_full(int fd, const void *buf, size_t n)
{
    const uint8_t *p = buf;
    while (n > 0) {
        ssize_t r = write(fd, p, n);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return kvt_error_set(KVT_ERR_IO, "write failed: %s", strerror(errno));
        }
        if (r == 0)
            return kvt_error_set(KVT_ERR_IO, "write failed: no progress (disk full?)");
        p += r;
        n -= (size_t)r;
    }
    return KVT_OK;
}

kvt_status kvt_read_file_header(int fd, uint64_t file_size, char **json, uint64_t *header_end,
                                int *major, int *minor, uint64_t *bytes_read)
{
    uint8_t fh[8 + 16];
    kvt_status s;
    *json = NULL;
    if (file_size < sizeof(fh) + 4)
        return kvt_error_set(KVT_ERR_CORRUPT, "not a kvtrace file (only %llu bytes)",
                             (unsigned long long)file_size);
    KVT_FORWARD(kvt_pread_full(fd, fh, sizeof(fh), 0));
    *bytes_read += sizeof(fh);
    KVT_RETURN_IF(kvt_get_u32(fh) != KVT_FRAME_HEADER || kvt_get_u32(fh + 8) != KVT_FILE_MAGIC,
                  KVT_ERR_CORRUPT, "not a kvtrace file (bad magic bytes)");
    uint32_t frame_size = kvt_get_u32(fh + 4);
    int ma = kvt_get_u16(fh + 12), mi = kvt_get_u16(fh + 14);
    uint32_t json_len = kvt_get_u32(fh + 20);
    KVT_RETURN_IF(ma != KVT_FORMAT_MAJOR, KVT_ERR_VERSION,
                  "trace format version %d.%d; this kvtrace reads version %d.x (HINT: %s)", ma, mi,
                  KVT_FORMAT_MAJOR,
                  ma > KVT_FORMAT_MAJOR ? "upgrade kvtrace" : "the file is not a valid trace");
    KVT_RETURN_IF(json_len > KVT_MAX_JSON, KVT_ERR_CORRUPT, "JSON header length %u too large",
                  (unsigned)json_len);
    KVT_RETURN_IF((uint64_t)frame_size != 16ull + json_len + 4ull, KVT_ERR_CORRUPT,
                  "file header frame size %u is inconsistent", (unsigned)frame_size);
    KVT_RETURN_IF(8ull + frame_size > file_size, KVT_ERR_CORRUPT,
                  "the file is cut short inside its header (%llu of its %llu bytes), before "
                  "any record",
                  (unsigned long long)file_size, 8ull + frame_size);
    uint8_t *buf = kvt_malloc((size_t)json_len + 4 + 1);
    KVT_RETURN_IF(!buf, KVT_ERR_NOMEM, "out of memory reading the JSON header");
    s = kvt_pread_full(fd, buf, (size_t)json_len + 4, sizeof(fh));
    if (s != KVT_OK)
        goto out_free;
    *bytes_read += (uint64_t)json_len + 4;
    uint32_t crc = kvt_crc32_update(kvt_crc32(fh + 8, 16), buf, json_len);
    if (crc != kvt_get_u32(buf + json_len)) {
        s = kvt_error_set(KVT_ERR_CHECKSUM, "file header checksum mismatch");
        goto out_free;
    }
    buf[json_len] = '\0';
    cJSON *root = cJSON_ParseWithLength((const char *)buf, json_len);
    bool is_obj = root && cJSON_IsObject(root);
    cJSON_Delete(root);
    if (!is_obj) {
        s = kvt_error_set(KVT_ERR_CORRUPT, "JSON header is not a valid JSON object");
        goto out_free;
    }
    *json = (char *)buf;
    *header_end = 8ull + frame_size;
    *major = ma;
    *minor = mi;
    return KVT_OK;
out_free:
    kvt_free(buf);
    return s;
}
