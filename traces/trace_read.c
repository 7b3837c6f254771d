/* trace_read.c - the random-access trace reader. Opens the header, finds the index through
 * the fixed trailer at the end of the file, and reads any (layer, kind, head range) by
 * decompressing only the records that intersect it. A file without a valid trailer (killed
 * capture, full disk) is recovered by a forward scan up to its last complete record.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <zstd.h>

#include "trace_internal.h"

struct kvt_trace_reader {
    int fd;
    uint64_t file_size;
    char *json;
    uint64_t header_end;
    int major, minor;
    kvt_rec_hdr *recs; /* file order */
    size_t n_recs;
    bool recovered;
    kvt_status index_status; /* load_index's, when recovered */
    char note[256];
    uint64_t index_offset; /* finished only: where the index frame starts */
    uint64_t valid_end;    /* recovered only: end of the last complete unit */
    uint64_t n_skipped;    /* recovered only: damaged regions the scan skipped */
    _Atomic uint64_t bytes_read;
};

/* ---- index via trailer ---- */

static kvt_status load_index(kvt_trace_reader *r)
{
    uint8_t t[KVT_TRAILER_BYTES];
    uint64_t end = r->file_size;
    /* the smallest index frame (no record): 8 frame header + 16 index header + 4 checksum */
    KVT_RETURN_IF(end < r->header_end + KVT_TRAILER_BYTES + 8 + 16 + 4, KVT_ERR_TRUNCATED,
                  "file too short for an index and trailer");
    KVT_FORWARD(kvt_pread_full(r->fd, t, sizeof(t), end - KVT_TRAILER_BYTES));
    r->bytes_read += sizeof(t);
    KVT_RETURN_IF(kvt_get_u32(t) != KVT_FRAME_END || kvt_get_u32(t + 4) != 24 ||
                      kvt_get_u32(t + 28) != KVT_END_MAGIC,
                  KVT_ERR_TRUNCATED, "no trailer at the end of the file");
    KVT_RETURN_IF(kvt_get_u32(t + 24) != kvt_crc32(t + 8, 16), KVT_ERR_CHECKSUM,
                  "trailer checksum mismatch");
    uint64_t idx_off = kvt_get_u64(t + 8), n = kvt_get_u64(t + 16);
    uint64_t idx_end = end - KVT_TRAILER_BYTES;
    KVT_RETURN_IF(idx_off < r->header_end || idx_off >= idx_end, KVT_ERR_CORRUPT,
                  "trailer points outside the file");
    KVT_RETURN_IF(n > (idx_end - idx_off) / KVT_INDEX_ENTRY_BYTES, KVT_ERR_CORRUPT,
                  "trailer promises %llu records, more than the index can hold",
                  (unsigned long long)n);
    uint64_t frame = idx_end - idx_off;
    KVT_RETURN_IF(frame != 8 + 16 + n * KVT_INDEX_ENTRY_BYTES + 4, KVT_ERR_CORRUPT,
                  "index size does not match the trailer's record count");
    uint8_t *b = kvt_malloc((size_t)frame);
    KVT_RETURN_IF(!b, KVT_ERR_NOMEM, "out of memory (index)");
    kvt_status s = kvt_pread_full(r->fd, b, (size_t)frame, idx_off);
    if (s != KVT_OK)
        goto out_free;
    r->bytes_read += frame;
    size_t body = (size_t)n * KVT_INDEX_ENTRY_BYTES;
    if (kvt_get_u32(b) != KVT_FRAME_INDEX || kvt_get_u32(b + 4) != frame - 8 ||
        kvt_get_u32(b + 8) != KVT_INDEX_MAGIC || kvt_get_u32(b + 12) != n ||
        kvt_get_u32(b + 16) != KVT_INDEX_ENTRY_BYTES) {
        s = kvt_error_set(KVT_ERR_CORRUPT, "index frame header is invalid");
        goto out_free;
    }
    if (kvt_get_u32(b + 24 + body) != kvt_crc32(b + 8, 16 + body)) {
        s = kvt_error_set(KVT_ERR_CHECKSUM, "index checksum mismatch");
        goto out_free;
    }
    r->recs = kvt_calloc(n ? (size_t)n : 1, sizeof(*r->recs));
    if (!r->recs) {
        s = kvt_error_set(KVT_ERR_NOMEM, "out of memory (index)");
        goto out_free;
    }
    uint64_t prev_end = r->header_end;
    for (size_t i = 0; i < n; i++) {
        const uint8_t *e = b + 24 + i * KVT_INDEX_ENTRY_BYTES;
        kvt_rec_hdr *h = &r->recs[i];
        uint64_t off = kvt_get_u64(e);
        s = kvt_rec_decode(e + 8, h);
        if (s != KVT_OK)
            goto out_recs;
        h->info.file_offset = off;
        if (off < prev_end || off + KVT_REC_UNIT + h->info.comp_bytes > idx_off ||
            off + KVT_REC_UNIT + h->info.comp_bytes < off) {
            s = kvt_error_set(KVT_ERR_CORRUPT, "index entry %zu points outside the records", i);
            goto out_recs;
        }
        prev_end = off + KVT_REC_UNIT + h->info.comp_bytes;
    }
    r->n_recs = (size_t)n;
    r->index_offset = idx_off;
    kvt_free(b);
    return KVT_OK;
out_recs:
    kvt_free(r->recs);
    r->recs = NULL;
out_free:
    kvt_free(b);
    return s;
}

/* ---- recovery scan ---- */

static kvt_status push_rec(kvt_rec_hdr **recs, size_t *n, size_t *cap, const kvt_rec_hdr *h)
{
    if (*n == *cap) {
        size_t nc = *cap ? 2 * *cap : 64;
        kvt_rec_hdr *nr = kvt_realloc(*recs, nc * sizeof(*nr));
        KVT_RETURN_IF(!nr, KVT_ERR_NOMEM, "out of memory (record list)");
        *recs = nr;
        *cap = nc;
    }
    (*recs)[(*n)++] = *h;
    return KVT_OK;
}

/* Try to parse a complete record unit at `off`. KVT_OK: *h filled, *next = end of unit. */
static kvt_status probe_record(int fd, uint64_t size, uint64_t off, kvt_rec_hdr *h, uint64_t *next,
                               uint64_t *bytes_read)
{
    uint8_t u[KVT_REC_UNIT + 4];
    KVT_RETURN_IF(off + KVT_REC_UNIT > size, KVT_ERR_TRUNCATED, "incomplete record header");
    KVT_FORWARD(kvt_pread_full(fd, u, KVT_REC_UNIT, off));
    *bytes_read += KVT_REC_UNIT;
    KVT_RETURN_IF(kvt_get_u32(u) != KVT_FRAME_RECORD || kvt_get_u32(u + 4) != KVT_REC_HEADER_BYTES,
                  KVT_ERR_CORRUPT, "not a record frame");
    KVT_FORWARD(kvt_rec_decode(u + KVT_SKIP_HDR, h));
    uint64_t end = off + KVT_REC_UNIT + h->info.comp_bytes;
    KVT_RETURN_IF(end > size || end < off, KVT_ERR_TRUNCATED, "record payload is cut short");
    KVT_FORWARD(kvt_pread_full(fd, u, 4, off + KVT_REC_UNIT));
    *bytes_read += 4;
    KVT_RETURN_IF(kvt_get_u32(u) != KVT_ZSTD_MAGIC, KVT_ERR_CORRUPT,
                  "record payload is not a zstd frame");
    h->info.file_offset = off;
    *next = end;
    return KVT_OK;
}

/* Find the next offset > from where a record frame magic starts; size if none. */
static uint64_t resync(int fd, uint64_t size, uint64_t from, uint64_t *bytes_read)
{
    uint8_t buf[1 << 16];
    uint64_t pos = from;
    while (pos + 8 <= size) {
        size_t want = sizeof(buf);
        if (pos + want > size)
            want = (size_t)(size - pos);
        if (kvt_pread_full(fd, buf, want, pos) != KVT_OK)
            return size;
        *bytes_read += want;
        for (size_t i = 0; i + 8 <= want; i++)
            if (kvt_get_u32(buf + i) == KVT_FRAME_RECORD &&
                kvt_get_u32(buf + i + 4) == KVT_REC_HEADER_BYTES)
                return pos + i;
        pos += want - 7;
    }
    return size;
}

kvt_status kvt_trace_scan(int fd, uint64_t size, uint64_t start, kvt_rec_hdr **out, size_t *n_out,
                          uint64_t *valid_end, uint64_t *n_skipped, uint64_t *bytes_read)
{
    kvt_rec_hdr *recs = NULL;
    size_t n = 0, cap = 0;
    uint64_t pos = start, skipped = 0;
    *valid_end = start;
    while (pos + 8 <= size) {
        uint8_t sk[8];
        if (kvt_pread_full(fd, sk, 8, pos) != KVT_OK)
            break;
        *bytes_read += 8;
        uint32_t m = kvt_get_u32(sk);
        if (m == KVT_FRAME_INDEX || m == KVT_FRAME_END)
            break; /* reached the index of a finished file */
        kvt_rec_hdr h;
        uint64_t next = pos;
        kvt_status s = probe_record(fd, size, pos, &h, &next, bytes_read);
        if (s == KVT_OK) {
            if (push_rec(&recs, &n, &cap, &h) != KVT_OK) {
                kvt_free(recs);
                return KVT_ERR_NOMEM;
            }
            pos = next;
            *valid_end = next;
            continue;
        }
        if (s == KVT_ERR_TRUNCATED)
            break;
        /* damaged unit: look for the next record frame */
        uint64_t nx = resync(fd, size, pos + 1, bytes_read);
        if (nx >= size)
            break;
        skipped++;
        pos = nx;
    }
    *out = recs;
    *n_out = n;
    *n_skipped = skipped;
    return KVT_OK;
}

kvt_status kvt_trace_reader_open(const char *path, kvt_trace_reader **out)
{
    kvt_status s;
    *out = NULL;
    KVT_RETURN_IF(!path, KVT_ERR_INVALID_ARG, "null path");
    kvt_trace_reader *r = kvt_calloc(1, sizeof(*r));
    KVT_RETURN_IF(!r, KVT_ERR_NOMEM, "out of memory");
    r->fd = kvt_open_regular(path); /* a FIFO would block open() for good */
    if (r->fd < 0) {
        s = kvt_error_set(KVT_ERR_IO, "%s", kvt_open_error(path));
        goto out_free;
    }
    struct stat st;
    if (fstat(r->fd, &st) != 0) { /* a regular file (kvt_open_regular): for its size */
        s = kvt_error_set(KVT_ERR_IO, "%s: %s", path, strerror(errno));
        goto out_close;
    }
    r->file_size = (uint64_t)st.st_size;
    uint64_t br = 0;
    s = kvt_read_file_header(r->fd, r->file_size, &r->json, &r->header_end, &r->major, &r->minor,
                             &br);
    r->bytes_read += br;
    if (s != KVT_OK) {
        kvt_error_set(s, "%s: %s", path, kvt_error_msg());
        goto out_close;
    }
    s = load_index(r);
    if (s == KVT_ERR_NOMEM)
        goto out_json;
    if (s != KVT_OK) {
        snprintf(r->note, sizeof(r->note), "%s; records recovered by scanning", kvt_error_msg());
        r->recovered = true;
        r->index_status = s;
        br = 0;
        s = kvt_trace_scan(r->fd, r->file_size, r->header_end, &r->recs, &r->n_recs, &r->valid_end,
                           &r->n_skipped, &br);
        r->bytes_read += br;
        if (s != KVT_OK) {
            kvt_error_set(s, "out of memory scanning %s", path);
            goto out_json;
        }
    }
    kvt_error_clear();
    *out = r;
    return KVT_OK;
out_json:
    kvt_free(r->json);
out_close:
    close(r->fd);
out_free:
    kvt_free(r);
    return s;
}

void kvt_trace_reader_close(kvt_trace_reader *r)
{
    if (!r)
        return;
    close(r->fd);
    kvt_free(r->json);
    kvt_free(r->recs);
    kvt_free(r);
}

const char *kvt_trace_reader_header_json(const kvt_trace_reader *r)
{
    return r->json;
}

static uint64_t fnv1a(uint64_t h, const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}

void kvt_trace_reader_fingerprint(const kvt_trace_reader *r, char out[17])
{
    uint64_t h = fnv1a(0xcbf29ce484222325ull, r->json, strlen(r->json));
    for (size_t i = 0; i < r->n_recs; i++) {
        const kvt_rec_hdr *x = &r->recs[i];
        uint8_t b[44]; /* the fields, little-endian, so the value is the same on any host */
        kvt_put_u32(b, (uint32_t)x->info.kind);
        kvt_put_u32(b + 4, (uint32_t)x->info.layer);
        kvt_put_u32(b + 8, x->info.head_begin);
        kvt_put_u32(b + 12, x->info.head_end);
        kvt_put_u32(b + 16, x->info.tok_begin);
        kvt_put_u32(b + 20, x->info.tok_end);
        kvt_put_u32(b + 24, x->info.dim);
        kvt_put_u32(b + 28, (uint32_t)x->info.dtype);
        kvt_put_u64(b + 32, x->info.raw_bytes);
        kvt_put_u32(b + 40, x->payload_crc);
        h = fnv1a(h, b, sizeof(b));
    }
    snprintf(out, 17, "%016llx", (unsigned long long)h);
}

void kvt_trace_reader_version(const kvt_trace_reader *r, int *major, int *minor)
{
    *major = r->major;
    *minor = r->minor;
}

bool kvt_trace_reader_recovered(const kvt_trace_reader *r)
{
    return r->recovered;
}

const char *kvt_trace_reader_recovery_note(const kvt_trace_reader *r)
{
    return r->recovered ? r->note : "";
}

uint64_t kvt_trace_reader_file_bytes(const kvt_trace_reader *r)
{
    return r->file_size;
}

size_t kvt_trace_reader_n_records(const kvt_trace_reader *r)
{
    return r->n_recs;
}

int kvt_trace_reader_fd_(const kvt_trace_reader *r)
{
    return r->fd;
}

const kvt_rec_hdr *kvt_trace_reader_recs_(const kvt_trace_reader *r)
{
    return r->recs;
}

void kvt_trace_reader_layout_(const kvt_trace_reader *r, uint64_t *header_end,
                              uint64_t *index_offset)
{
    *header_end = r->header_end;
    *index_offset = r->index_offset;
}

kvt_status kvt_trace_reader_index_status_(const kvt_trace_reader *r)
{
    return r->recovered ? r->index_status : KVT_OK;
}

void kvt_trace_reader_scan_result_(const kvt_trace_reader *r, uint64_t *valid_end,
                                   uint64_t *n_skipped)
{
    *valid_end = r->valid_end;
    *n_skipped = r->n_skipped;
}

uint64_t kvt_trace_reader_bytes_read(const kvt_trace_reader *r)
{
    return r->bytes_read;
}

kvt_status kvt_trace_reader_record(const kvt_trace_reader *r, size_t i, kvt_record_info *out)
{
    KVT_RETURN_IF(i >= r->n_recs, KVT_ERR_INVALID_ARG, "record %zu out of range", i);
    *out = r->recs[i].info;
    return KVT_OK;
}

kvt_status kvt_trace_reader_shape(const kvt_trace_reader *r, int32_t layer, int kind,
                                  uint32_t *n_heads, uint32_t *n_tok, uint32_t *dim,
                                  kvt_dtype *dtype)
{
    uint32_t h = 0, t = 0, d = 0;
    kvt_dtype dt = KVT_DTYPE_INVALID;
    bool found = false;
    for (size_t i = 0; i < r->n_recs; i++) {
        const kvt_record_info *in = &r->recs[i].info;
        if (in->layer != layer || in->kind != kind)
            continue;
        if (found && (in->dim != d || in->dtype != dt))
            return kvt_error_set(KVT_ERR_CORRUPT,
                                 "records of layer %d %s disagree: %s of dim %u and %s of dim %u "
                                 "(one tensor's records share dtype and dim)",
                                 (int)layer, kvt_kind_name(kind), kvt_dtype_name(dt), d,
                                 kvt_dtype_name(in->dtype), in->dim);
        found = true;
        d = in->dim;
        dt = in->dtype;
        if (in->head_end > h)
            h = in->head_end;
        if (in->tok_end > t)
            t = in->tok_end;
    }
    if (!found)
        return kvt_error_set(KVT_ERR_NOT_FOUND, "the trace has no %s for layer %d",
                             kvt_kind_name(kind) ? kvt_kind_name(kind) : "record", (int)layer);
    if (n_heads)
        *n_heads = h;
    if (n_tok)
        *n_tok = t;
    if (dim)
        *dim = d;
    if (dtype)
        *dtype = dt;
    return KVT_OK;
}

/* every field of a record header but its offset: the on-disk header and the index copy */
static bool same_record(const kvt_rec_hdr *a, const kvt_rec_hdr *b)
{
    const kvt_record_info *x = &a->info, *y = &b->info;
    return x->kind == y->kind && x->layer == y->layer && x->head_begin == y->head_begin &&
           x->head_end == y->head_end && x->tok_begin == y->tok_begin && x->tok_end == y->tok_end &&
           x->dim == y->dim && x->dtype == y->dtype && x->filter == y->filter && x->seq == y->seq &&
           x->raw_bytes == y->raw_bytes && x->comp_bytes == y->comp_bytes &&
           a->payload_crc == b->payload_crc;
}

/* Read and check the record described by h, and decompress its payload into `into`
 * (raw_bytes of room) or, when into is NULL, into a fresh buffer (caller frees): the elements
 * as stored, byte-plane shuffled when its filter says so. The on-disk header must agree with h
 * (the index copy) in every field, the payload crc must match, and the zstd frame must decode
 * (its own content checksum included) to exactly raw_bytes. */
static kvt_status record_payload(int fd, const kvt_rec_hdr *h, uint8_t *into, uint8_t **out,
                                 uint64_t *bytes_read)
{
    const kvt_record_info *in = &h->info;
    kvt_status s;
    *out = NULL;
    size_t unit = KVT_REC_UNIT + (size_t)in->comp_bytes;
    KVT_RETURN_IF(in->filter != KVT_FILTER_NONE && in->filter != KVT_FILTER_BYTEPLANE,
                  KVT_ERR_UNSUPPORTED, "record %u uses unknown filter %d (newer kvtrace?)",
                  (unsigned)in->seq, (int)in->filter);
    uint8_t *buf = kvt_malloc(unit);
    KVT_RETURN_IF(!buf, KVT_ERR_NOMEM, "out of memory reading a record");
    uint8_t *raw = into ? into : kvt_malloc((size_t)in->raw_bytes);
    if (!raw) {
        s = kvt_error_set(KVT_ERR_NOMEM, "out of memory reading a record");
        goto out_free;
    }
    s = kvt_pread_full(fd, buf, unit, in->file_offset);
    if (s != KVT_OK)
        goto out_free;
    *bytes_read += unit;
    kvt_rec_hdr disk;
    if (kvt_get_u32(buf) != KVT_FRAME_RECORD ||
        kvt_rec_decode(buf + KVT_SKIP_HDR, &disk) != KVT_OK) {
        s = kvt_error_set(KVT_ERR_CHECKSUM, "record %u (layer %d %s): damaged record header",
                          (unsigned)in->seq, (int)in->layer, kvt_kind_name(in->kind));
        goto out_free;
    }
    if (!same_record(&disk, h)) { /* each frame checks out, but they describe other records */
        s = kvt_error_set(KVT_ERR_CORRUPT,
                          "record %u (layer %d %s): its header on disk (record %u, layer %d %s) "
                          "disagrees with the index",
                          (unsigned)in->seq, (int)in->layer, kvt_kind_name(in->kind),
                          (unsigned)disk.info.seq, (int)disk.info.layer,
                          kvt_kind_name(disk.info.kind));
        goto out_free;
    }
    if (kvt_crc32(buf + KVT_REC_UNIT, (size_t)in->comp_bytes) != h->payload_crc) {
        s = kvt_error_set(KVT_ERR_CHECKSUM, "record %u (layer %d %s): payload checksum mismatch",
                          (unsigned)in->seq, (int)in->layer, kvt_kind_name(in->kind));
        goto out_free;
    }
    size_t got =
        ZSTD_decompress(raw, (size_t)in->raw_bytes, buf + KVT_REC_UNIT, (size_t)in->comp_bytes);
    if (ZSTD_isError(got) || got != in->raw_bytes) {
        s = kvt_error_set(KVT_ERR_CORRUPT, "record %u (layer %d %s): payload does not decode: %s",
                          (unsigned)in->seq, (int)in->layer, kvt_kind_name(in->kind),
                          ZSTD_isError(got) ? ZSTD_getErrorName(got) : "wrong size");
        goto out_free;
    }
    kvt_free(buf);
    *out = raw;
    return KVT_OK;
out_free:
    if (!into)
        kvt_free(raw);
    kvt_free(buf);
    return s;
}

/* record_payload, then the filter undone: the record's elements in order (caller frees). */
kvt_status kvt_record_decode_at(int fd, const kvt_rec_hdr *h, uint8_t **out, uint64_t *bytes_read)
{
    const kvt_record_info *in = &h->info;
    uint8_t *stored;
    *out = NULL;
    KVT_FORWARD(record_payload(fd, h, NULL, &stored, bytes_read));
    if (in->filter != KVT_FILTER_BYTEPLANE) {
        *out = stored;
        return KVT_OK;
    }
    uint8_t *raw = kvt_malloc((size_t)in->raw_bytes);
    if (!raw) {
        kvt_free(stored);
        return kvt_error_set(KVT_ERR_NOMEM, "out of memory reading a record");
    }
    size_t es = kvt_dtype_size(in->dtype);
    kvt_byteplane_merge(stored, raw, (size_t)in->raw_bytes / es, es);
    kvt_free(stored);
    *out = raw;
    return KVT_OK;
}

typedef struct hrow {
    uint32_t head, tb, te;
    uint32_t rec; /* index into the caller's list */
} hrow;

static int by_head_tok(const void *x, const void *y)
{
    const hrow *a = x, *b = y;
    if (a->head != b->head)
        return a->head < b->head ? -1 : 1;
    return a->tb < b->tb ? -1 : a->tb > b->tb;
}

kvt_status kvt_records_overlap(const kvt_record_info *const *in, size_t n, bool *found, size_t *a,
                               size_t *b)
{
    *found = false;
    if (n < 2)
        return KVT_OK;
    /* every (head, record) pair's token interval, sorted by head then start: two records
       overlap exactly when two neighbours of one head do. Beyond KVT_OVERLAP_ROWS pairs (no
       trace of a real model comes near) the check is left to the callers' area count. */
    uint64_t rows = 0;
    for (size_t i = 0; i < n; i++)
        rows += (uint64_t)(in[i]->head_end - in[i]->head_begin);
    if (rows > KVT_OVERLAP_ROWS || n > UINT32_MAX)
        return KVT_OK;
    hrow *v = kvt_malloc((size_t)rows * sizeof(*v));
    KVT_RETURN_IF(!v, KVT_ERR_NOMEM, "out of memory");
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        for (uint32_t h = in[i]->head_begin; h < in[i]->head_end; h++)
            v[k++] = (hrow){h, in[i]->tok_begin, in[i]->tok_end, (uint32_t)i};
    qsort(v, k, sizeof(*v), by_head_tok);
    for (size_t i = 1; i < k && !*found; i++)
        if (v[i].head == v[i - 1].head && v[i].tb < v[i - 1].te) {
            *found = true;
            *a = v[i - 1].rec;
            *b = v[i].rec;
        }
    kvt_free(v);
    return KVT_OK;
}

static kvt_status decode_record(kvt_trace_reader *r, size_t i, uint8_t **out)
{
    uint64_t br = 0;
    kvt_status s = kvt_record_decode_at(r->fd, &r->recs[i], out, &br);
    r->bytes_read += br;
    return s;
}

/* record i's payload as stored (record_payload), for the caller to unshuffle and convert the
   rows it wants in one pass */
static kvt_status load_payload(kvt_trace_reader *r, size_t i, uint8_t *into, uint8_t **out)
{
    uint64_t br = 0;
    kvt_status s = record_payload(r->fd, &r->recs[i], into, out, &br);
    r->bytes_read += br;
    return s;
}

kvt_status kvt_trace_reader_read_record(kvt_trace_reader *r, size_t i, void *dst, size_t dst_cap)
{
    KVT_RETURN_IF(i >= r->n_recs, KVT_ERR_INVALID_ARG, "record %zu out of range", i);
    KVT_RETURN_IF(dst_cap < r->recs[i].info.raw_bytes, KVT_ERR_INVALID_ARG,
                  "buffer too small for record %zu", i);
    uint8_t *raw;
    KVT_FORWARD(decode_record(r, i, &raw));
    memcpy(dst, raw, (size_t)r->recs[i].info.raw_bytes);
    kvt_free(raw);
    return KVT_OK;
}

size_t kvt_trace_reader_n_pieces(const kvt_trace_reader *r, int32_t layer, int kind)
{
    size_t n = 0;
    for (size_t i = 0; r && i < r->n_recs; i++)
        n += r->recs[i].info.layer == layer && r->recs[i].info.kind == kind;
    return n;
}

/* Records of (layer, kind) that overlap cannot be told from the area they cover when a gap of
 * the same area is elsewhere: checked exactly before a read (the rows of a gap would be left
 * unwritten). */
static kvt_status check_overlap(const kvt_trace_reader *r, int32_t layer, int kind)
{
    size_t n_t = kvt_trace_reader_n_pieces(r, layer, kind);
    const kvt_record_info **tv = kvt_malloc((n_t ? n_t : 1) * sizeof(*tv));
    KVT_RETURN_IF(!tv, KVT_ERR_NOMEM, "out of memory");
    n_t = 0;
    for (size_t i = 0; i < r->n_recs; i++)
        if (r->recs[i].info.layer == layer && r->recs[i].info.kind == kind)
            tv[n_t++] = &r->recs[i].info;
    bool ov = false;
    size_t oa = 0, ob = 0;
    kvt_status os = kvt_records_overlap(tv, n_t, &ov, &oa, &ob);
    if (os == KVT_OK && ov)
        os =
            kvt_error_set(KVT_ERR_CORRUPT,
                          "layer %d %s: records %u and %u overlap (heads [%u,%u) x tokens [%u,%u) "
                          "and [%u,%u) x [%u,%u))",
                          (int)layer, kvt_kind_name(kind), tv[oa]->seq, tv[ob]->seq,
                          tv[oa]->head_begin, tv[oa]->head_end, tv[oa]->tok_begin, tv[oa]->tok_end,
                          tv[ob]->head_begin, tv[ob]->head_end, tv[ob]->tok_begin, tv[ob]->tok_end);
    kvt_free(tv);
    return os;
}

/* The read's last check: every token row of heads [head_begin, head_end) covered once. */
static kvt_status check_covered(int32_t layer, int kind, uint32_t head_begin, uint32_t head_end,
                                uint32_t T, uint64_t covered)
{
    uint64_t want = (uint64_t)(head_end - head_begin) * T;
    KVT_RETURN_IF(covered != want, covered < want ? KVT_ERR_NOT_FOUND : KVT_ERR_CORRUPT,
                  "layer %d %s heads [%u,%u): records cover %llu of %llu token rows%s", (int)layer,
                  kvt_kind_name(kind), head_begin, head_end, (unsigned long long)covered,
                  (unsigned long long)want,
                  covered < want ? " (records missing)" : " (overlapping records)");
    return KVT_OK;
}

kvt_status kvt_trace_reader_read(kvt_trace_reader *r, int32_t layer, int kind, uint32_t head_begin,
                                 uint32_t head_end, kvt_dtype as_dtype, void *dst, size_t dst_cap)
{
    uint32_t H, T, D;
    kvt_dtype st;
    KVT_RETURN_IF(!r || !dst, KVT_ERR_INVALID_ARG, "null argument");
    KVT_FORWARD(kvt_trace_reader_shape(r, layer, kind, &H, &T, &D, &st));
    KVT_RETURN_IF(head_end <= head_begin || head_end > H, KVT_ERR_INVALID_ARG,
                  "heads [%u,%u) out of range for layer %d %s (%u heads)", head_begin, head_end,
                  (int)layer, kvt_kind_name(kind), H);
    kvt_dtype out_dt = as_dtype == KVT_DTYPE_INVALID ? st : as_dtype;
    KVT_RETURN_IF(out_dt != st && !(out_dt == KVT_DTYPE_F32 && kvt_dtype_is_float(st)),
                  KVT_ERR_INVALID_ARG, "cannot read %s data as %s", kvt_dtype_name(st),
                  kvt_dtype_name(out_dt));
    size_t oes = kvt_dtype_size(out_dt), need;
    KVT_RETURN_IF(kvt_mul_overflow((size_t)(head_end - head_begin) * T, (size_t)D * oes, &need),
                  KVT_ERR_OVERFLOW, "tensor size overflows");
    KVT_RETURN_IF(dst_cap < need, KVT_ERR_INVALID_ARG,
                  "buffer of %zu bytes too small for %zu bytes", dst_cap, need);
    size_t ies = kvt_dtype_size(st);
    KVT_FORWARD(check_overlap(r, layer, kind));
    uint64_t covered = 0;
    uint8_t *out = dst;
    for (size_t i = 0; i < r->n_recs; i++) {
        const kvt_record_info *in = &r->recs[i].info;
        if (in->layer != layer || in->kind != kind || in->head_end <= head_begin ||
            in->head_begin >= head_end)
            continue;
        uint8_t *raw;
        KVT_FORWARD(load_payload(r, i, NULL, &raw));
        uint32_t h0 = in->head_begin > head_begin ? in->head_begin : head_begin;
        uint32_t h1 = in->head_end < head_end ? in->head_end : head_end;
        size_t nt = in->tok_end - in->tok_begin, n = (size_t)in->raw_bytes / ies;
        for (uint32_t h = h0; h < h1; h++) {
            size_t first = (size_t)(h - in->head_begin) * nt * D;
            uint8_t *d = out + (((size_t)(h - head_begin) * T + in->tok_begin) * D) * oes;
            if (in->filter == KVT_FILTER_BYTEPLANE && out_dt == st)
                kvt_byteplane_merge_range(raw, n, ies, first, nt * D, d);
            else if (in->filter == KVT_FILTER_BYTEPLANE)
                kvt_byteplane_to_f32(st, raw, n, first, nt * D, (float *)(void *)d);
            else if (out_dt == st)
                memcpy(d, raw + first * ies, nt * D * ies);
            else
                kvt_convert_to_f32(st, raw + first * ies, (float *)(void *)d, nt * D);
        }
        covered += (uint64_t)(h1 - h0) * nt;
        kvt_free(raw);
    }
    return check_covered(layer, kind, head_begin, head_end, T, covered);
}

kvt_status kvt_trace_reader_read_sink(kvt_trace_reader *r, int32_t layer, int kind, size_t first,
                                      const kvt_trace_sink *sink, size_t *next)
{
    uint32_t H, T, D;
    kvt_dtype st;
    KVT_RETURN_IF(!r || !sink || !sink->room || !sink->put, KVT_ERR_INVALID_ARG, "null argument");
    KVT_FORWARD(kvt_trace_reader_shape(r, layer, kind, &H, &T, &D, &st));
    KVT_FORWARD(check_overlap(r, layer, kind));
    uint64_t covered = 0, off = 0;
    for (size_t i = 0; i < r->n_recs; i++) {
        const kvt_record_info *in = &r->recs[i].info;
        if (in->layer == layer && in->kind == kind)
            covered += (uint64_t)(in->head_end - in->head_begin) * (in->tok_end - in->tok_begin);
    }
    KVT_FORWARD(check_covered(layer, kind, 0, H, T, covered));
    size_t j = 0; /* the tensor's records in file order */
    for (size_t i = 0; i < r->n_recs; i++) {
        const kvt_record_info *in = &r->recs[i].info;
        if (in->layer != layer || in->kind != kind)
            continue;
        if (j++ >= first) {
            void *buf = NULL;
            uint8_t *raw;
            KVT_FORWARD(sink->room(sink->user, (size_t)in->raw_bytes, &buf));
            if (!buf) {
                if (next)
                    *next = j - 1;
                return KVT_OK;
            }
            KVT_FORWARD(load_payload(r, i, buf, &raw));
            const kvt_trace_piece p = {in->head_begin,
                                       in->head_end,
                                       in->tok_begin,
                                       in->tok_end,
                                       in->filter == KVT_FILTER_BYTEPLANE,
                                       off};
            KVT_FORWARD(sink->put(sink->user, &p, buf));
        }
        off += in->raw_bytes;
    }
    if (next)
        *next = j;
    return KVT_OK;
}
