/* trace_internal.h - on-disk structures of the .kvt format shared by the writer, reader and
 * verifier: little-endian encode/decode of the file header, record header, index and
 * trailer (layouts in FORMAT.md). Not installed.
 */
#ifndef KVT_TRACE_INTERNAL_H
#define KVT_TRACE_INTERNAL_H

#include <stdio.h>

#include "kvt_trace.h"

#define KVT_INDEX_MAGIC 0x5849564Bu /* "KVIX" */
#define KVT_ZSTD_MAGIC  0xFD2FB528u
#define KVT_SKIP_HDR    8u /* skippable frame: u32 magic + u32 size */
#define KVT_REC_UNIT    (KVT_SKIP_HDR + KVT_REC_HEADER_BYTES) /* bytes before a payload */
#define KVT_MAX_JSON    (64u << 20) /* readers refuse larger JSON headers */
#define KVT_MAX_DIM     (1u << 20)

static inline void kvt_put_u16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}
static inline void kvt_put_u32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}
static inline void kvt_put_u64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}
static inline uint16_t kvt_get_u16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}
static inline uint32_t kvt_get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static inline uint64_t kvt_get_u64(const uint8_t *p)
{
    return (uint64_t)kvt_get_u32(p) | ((uint64_t)kvt_get_u32(p + 4) << 32);
}

/** crc32 (zlib polynomial) of n bytes. */
uint32_t kvt_crc32(const void *p, size_t n);
/** crc32 continuing from `crc`. */
uint32_t kvt_crc32_update(uint32_t crc, const void *p, size_t n);

/** A record as stored: the info plus its payload checksum. */
typedef struct kvt_rec_hdr {
    kvt_record_info info; /* file_offset set by the caller */
    uint32_t payload_crc;
} kvt_rec_hdr;

/** Encode the 88-byte record header (computes its crc). */
void kvt_rec_encode(const kvt_rec_hdr *h, uint8_t out[KVT_REC_HEADER_BYTES]);
/** Decode and validate (magic, crc, field ranges); KVT_ERR_CORRUPT with a message. */
kvt_status kvt_rec_decode(const uint8_t in[KVT_REC_HEADER_BYTES], kvt_rec_hdr *h);
/** Rectangle size in bytes of a record, with overflow checks. */
kvt_status kvt_rec_raw_bytes(const kvt_record_info *i, uint64_t *out);

/** Read exactly n bytes at off (pread loop); KVT_ERR_TRUNCATED at EOF, KVT_ERR_IO. */
kvt_status kvt_pread_full(int fd, void *buf, size_t n, uint64_t off);
/** Write all n bytes (write loop); KVT_ERR_IO with errno text. */
kvt_status kvt_write_full(int fd, const void *buf, size_t n);

/** Parse and validate the file header frame at offset 0. On success *json (caller frees
 *  with kvt_free) and *header_end (offset of the first byte after the frame). */
kvt_status kvt_read_file_header(int fd, uint64_t file_size, char **json, uint64_t *header_end,
                                int *major, int *minor, uint64_t *bytes_read);

/** Forward scan of record units from `start` (recovery). Damaged units are skipped by
 *  searching for the next record frame. *out (caller frees) gets the complete records in file
 *  order, *valid_end the end of the last complete unit, *n_skipped the damaged regions. */
kvt_status kvt_trace_scan(int fd, uint64_t size, uint64_t start, kvt_rec_hdr **out, size_t *n_out,
                          uint64_t *valid_end, uint64_t *n_skipped, uint64_t *bytes_read);
/** Elements [first, first + count) of n elements of `elem` bytes stored as byte planes
 *  (kvt_byteplane_split's layout), merged into dst: kvt_byteplane_merge of a slice. */
void kvt_byteplane_merge_range(const void *planes, size_t n, size_t elem, size_t first,
                               size_t count, void *dst);
/** The same slice of a float tensor of dtype dt (f16, bf16 or f32) converted to f32 in the
 *  same pass, bit for bit what kvt_byteplane_merge then kvt_convert_to_f32 give. */
void kvt_byteplane_to_f32(kvt_dtype dt, const void *planes, size_t n, size_t first, size_t count,
                          float *dst);
/** Read, check and decode one record (see trace_read.c); caller frees *out. */
kvt_status kvt_record_decode_at(int fd, const kvt_rec_hdr *h, uint8_t **out, uint64_t *bytes_read);

/* Reader internals for trace_verify.c. */
int kvt_trace_reader_fd_(const kvt_trace_reader *r);
const kvt_rec_hdr *kvt_trace_reader_recs_(const kvt_trace_reader *r);
/** Where a finished trace's records start (the end of the header frame) and its index frame
 *  starts. */
void kvt_trace_reader_layout_(const kvt_trace_reader *r, uint64_t *header_end,
                              uint64_t *index_offset);
/** What the recovery scan of a recovered reader found (see kvt_trace_scan). */
void kvt_trace_reader_scan_result_(const kvt_trace_reader *r, uint64_t *valid_end,
                                   uint64_t *n_skipped);
/** A tensor's name in messages: "layer 3 K", or "token_ids" for a table (layer -1). */
static inline const char *kvt_tensor_name(int32_t layer, int kind, char *buf, size_t cap)
{
    if (layer < 0)
        snprintf(buf, cap, "%s", kvt_kind_name(kind));
    else
        snprintf(buf, cap, "layer %d %s", (int)layer, kvt_kind_name(kind));
    return buf;
}

/** Whether two of the n records `in[i]` (of one tensor) overlap, exactly, from each head's
 *  token intervals sorted: *a and *b receive an overlapping pair. Tensors of more than
 *  KVT_OVERLAP_ROWS (record, head) pairs are not checked (*found false). KVT_ERR_NOMEM, or
 *  KVT_OK with *found. */
#define KVT_OVERLAP_ROWS (1u << 22)
kvt_status kvt_records_overlap(const kvt_record_info *const *in, size_t n, bool *found, size_t *a,
                               size_t *b);
/** Why a recovered reader could not use the index: KVT_ERR_TRUNCATED when the file ends
 *  without a trailer (never finished), another status when the trailer or index is there but
 *  damaged; KVT_OK when not recovered. */
kvt_status kvt_trace_reader_index_status_(const kvt_trace_reader *r);

#endif /* KVT_TRACE_INTERNAL_H */
