/* trace_write.c - the streaming trace writer. Appenders copy a tensor block into a job
 * (blocking while queued bytes exceed the memory bound), a pool of threads byte-plane
 * shuffles and zstd-compresses jobs, and finished jobs are written strictly in append order
 * (so the same input gives the same file whatever the thread count). finish() writes the
 * index and trailer. Capture (capture/) and synth write through this API only.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define ZSTD_STATIC_LINKING_ONLY
#include <cjson/cJSON.h>
#include <zstd.h>

#include "trace_internal.h"

typedef struct wjob {
    kvt_rec_hdr hdr;
    uint8_t *raw; /* owned (from the pool when raw_pooled), or lent (release); let go of once
                     compressed */
    size_t raw_bytes;
    bool planes;      /* raw is already byte-plane split (kvt_trace_writer_append_planes) */
    bool raw_pooled;  /* raw came from the writer's buffer pool */
    bool comp_pooled; /* comp did */
    void (*release)(void *ctx); /* a lent payload (kvt_trace_writer_lend_planes): handed back */
    void *release_ctx;
    size_t pend_bytes; /* counted in pending_bytes: raw_bytes, or 0 for a lent payload */
    uint8_t *comp;     /* owned */
    size_t comp_bytes;
    kvt_status status;
    struct wjob *next;
} wjob;

/* Full-size record buffers are reused rather than freed: a fresh multi-megabyte allocation
 * costs a page fault per 4 KiB on first touch, which made a copy into it 3-5x slower than a
 * copy into a reused one (2 vs 10 GB/s on the development VM). */
enum { POOL_RAW, POOL_COMP };
typedef struct wpool {
    uint8_t **buf;
    size_t n, cap;
    size_t bytes; /* every buffer's size */
} wpool;

typedef struct wctx {
    ZSTD_CCtx *cctx;
    uint8_t *shuf;
    size_t shuf_cap;
} wctx;

/* The blocks appended to one (layer, kind) tensor, to refuse what traces/FORMAT.md forbids
 * (records of one tensor overlap, or differ in dtype or dim) when it is appended rather than
 * when a reader meets it. end[h] is the largest Tok_End so far of head h (for the first
 * WT_FAST_HEADS heads): a block that starts at or after it in each of its heads overlaps
 * nothing, the common case (decode steps in order); others are compared with every block. */
#define WT_FAST_HEADS 4096u
typedef struct wtensor {
    int32_t layer;
    int kind;
    kvt_dtype dtype;
    uint32_t dim;
    uint32_t *end, n_end; /* [n_end] */
    uint32_t (*blk)[4];   /* head_begin, head_end, tok_begin, tok_end of each block */
    size_t n_blk, cap_blk;
} wtensor;

struct kvt_trace_writer {
    int fd;
    char *path;  /* the file being written: the output, or a temporary next to it */
    char *final; /* replacing an existing trace (force): the output, renamed to at finish */
    bool renamed, complete;
    kvt_writer_opts opts;

    pthread_mutex_t mu;
    pthread_cond_t cv_work;  /* queue non-empty or stopping */
    pthread_cond_t cv_space; /* pending bytes dropped or a job was written */
    wjob *q_head, *q_tail;   /* waiting for compression */
    wjob *done;              /* compressed, sorted by seq, waiting to be written */
    uint32_t next_seq;       /* seq of the next appended record */
    uint32_t next_write;     /* seq of the next record to write */
    uint64_t pending_bytes;  /* raw bytes of jobs not yet written */
    bool stopping;
    bool finished;
    kvt_status err; /* sticky first error */
    char err_msg[256];

    pthread_t *threads;
    int n_threads;
    pthread_mutex_t pool_mu; /* taken alone or inside mu, never the other way round */
    wpool pool[2];           /* POOL_RAW, POOL_COMP */
    wctx sync_ctx;           /* used when n_threads == 0 */

    uint64_t offset;    /* bytes of the file written and known good */
    kvt_rec_hdr *index; /* written records, in file order */
    size_t n_index, cap_index;
    kvt_writer_stats stats;
    wtensor *tensors; /* every tensor appended to (under mu) */
    size_t n_tensors, cap_tensors;
};

static void set_err(kvt_trace_writer *w, kvt_status s, const char *msg)
{
    if (w->err == KVT_OK) {
        w->err = s;
        snprintf(w->err_msg, sizeof(w->err_msg), "%s", msg);
    }
}

static kvt_status sticky(kvt_trace_writer *w)
{
    return kvt_error_set(w->err, "%s", w->err_msg);
}

/* A buffer for a payload of `bytes` from pool `which`: a pooled full-size one when the
 * payload is at least half of it (*pooled), else a plain allocation. */
static uint8_t *buf_get(kvt_trace_writer *w, int which, size_t bytes, bool *pooled)
{
    wpool *p = &w->pool[which];
    *pooled = false;
    if (p->bytes == 0 || bytes > p->bytes || bytes < p->bytes / 2)
        return kvt_malloc(bytes ? bytes : 1);
    uint8_t *b = NULL;
    pthread_mutex_lock(&w->pool_mu);
    if (p->n > 0)
        b = p->buf[--p->n];
    pthread_mutex_unlock(&w->pool_mu);
    if (!b)
        b = kvt_malloc(p->bytes);
    *pooled = b != NULL;
    return b;
}

static void buf_put(kvt_trace_writer *w, int which, uint8_t *b, bool pooled)
{
    wpool *p = &w->pool[which];
    if (b && pooled) {
        pthread_mutex_lock(&w->pool_mu);
        if (p->n < p->cap) {
            p->buf[p->n++] = b;
            b = NULL;
        }
        pthread_mutex_unlock(&w->pool_mu);
    }
    kvt_free(b);
}

static void pool_free(kvt_trace_writer *w)
{
    for (int i = 0; i < 2; i++) {
        for (size_t k = 0; k < w->pool[i].n; k++)
            kvt_free(w->pool[i].buf[k]);
        kvt_free(w->pool[i].buf);
        w->pool[i].buf = NULL;
        w->pool[i].n = w->pool[i].cap = 0;
    }
}

/* Let go of a job's payload: back to the pool or the allocator, or to its lender. */
static void job_drop_raw(kvt_trace_writer *w, wjob *j)
{
    if (j->release) {
        void (*rel)(void *) = j->release;
        j->release = NULL;
        rel(j->release_ctx);
    } else {
        buf_put(w, POOL_RAW, j->raw, j->raw_pooled);
    }
    j->raw = NULL;
}

static kvt_status compress_job(kvt_trace_writer *w, wctx *c, wjob *j)
{
    size_t es = kvt_dtype_size(j->hdr.info.dtype);
    bool shuf = !w->opts.no_shuffle && es > 1;
    size_t bound = ZSTD_compressBound(j->raw_bytes);
    const void *src = j->raw;
    if (shuf && !j->planes) {
        if (c->shuf_cap < j->raw_bytes) {
            uint8_t *nb = kvt_realloc(c->shuf, j->raw_bytes);
            KVT_RETURN_IF(!nb, KVT_ERR_NOMEM, "out of memory (compression buffer)");
            c->shuf = nb;
            c->shuf_cap = j->raw_bytes;
        }
        kvt_byteplane_split(j->raw, c->shuf, j->raw_bytes / es, es);
        src = c->shuf;
    }
    j->comp = buf_get(w, POOL_COMP, bound, &j->comp_pooled);
    KVT_RETURN_IF(!j->comp, KVT_ERR_NOMEM, "out of memory (compressed buffer)");
    size_t r = ZSTD_compress2(c->cctx, j->comp, bound, src, j->raw_bytes);
    KVT_RETURN_IF(ZSTD_isError(r), KVT_ERR_IO, "zstd compression failed: %s", ZSTD_getErrorName(r));
    j->comp_bytes = r;
    j->hdr.info.filter = shuf ? KVT_FILTER_BYTEPLANE : KVT_FILTER_NONE;
    j->hdr.info.comp_bytes = r;
    j->hdr.payload_crc = kvt_crc32(j->comp, r);
    job_drop_raw(w, j);
    return KVT_OK;
}

static void job_free(kvt_trace_writer *w, wjob *j)
{
    if (!j)
        return;
    job_drop_raw(w, j);
    buf_put(w, POOL_COMP, j->comp, j->comp_pooled);
    kvt_free(j);
}

/* Write one compressed job at the end of the file; on failure cut the file back to the last
 * complete record so it stays recoverable. Called with w->mu held. */
static void write_job(kvt_trace_writer *w, wjob *j)
{
    if (w->err != KVT_OK)
        return;
    if (j->status != KVT_OK) {
        set_err(w, j->status, "record compression failed");
        return;
    }
    if (w->n_index == w->cap_index) {
        size_t nc = w->cap_index ? 2 * w->cap_index : 256;
        kvt_rec_hdr *ni = kvt_realloc(w->index, nc * sizeof(*ni));
        if (!ni) {
            set_err(w, KVT_ERR_NOMEM, "out of memory (record index)");
            return;
        }
        w->index = ni;
        w->cap_index = nc;
    }
    uint8_t unit[KVT_REC_UNIT];
    j->hdr.info.file_offset = w->offset;
    kvt_put_u32(unit, KVT_FRAME_RECORD);
    kvt_put_u32(unit + 4, KVT_REC_HEADER_BYTES);
    kvt_rec_encode(&j->hdr, unit + KVT_SKIP_HDR);
    kvt_status s = kvt_write_full(w->fd, unit, sizeof(unit));
    if (s == KVT_OK)
        s = kvt_write_full(w->fd, j->comp, j->comp_bytes);
    if (s != KVT_OK) {
        char msg[256];
        snprintf(msg, sizeof(msg), "writing %s: %s", w->path, kvt_error_msg());
        set_err(w, s, msg);
        if (ftruncate(w->fd, (off_t)w->offset) == 0)
            lseek(w->fd, (off_t)w->offset, SEEK_SET);
        return;
    }
    w->index[w->n_index++] = j->hdr;
    w->offset += sizeof(unit) + j->comp_bytes;
    w->stats.n_records++;
    w->stats.raw_bytes += j->hdr.info.raw_bytes;
    w->stats.comp_bytes += j->comp_bytes;
    w->stats.file_bytes = w->offset;
}

/* Insert a compressed job into the seq-sorted done list and write every job that is next in
 * append order. Called with w->mu held. */
static void complete_job(kvt_trace_writer *w, wjob *j)
{
    wjob **pp = &w->done;
    while (*pp && (*pp)->hdr.info.seq < j->hdr.info.seq)
        pp = &(*pp)->next;
    j->next = *pp;
    *pp = j;
    while (w->done && w->done->hdr.info.seq == w->next_write) {
        wjob *d = w->done;
        w->done = d->next;
        write_job(w, d);
        w->next_write++;
        w->pending_bytes -= d->pend_bytes;
        job_free(w, d);
    }
    pthread_cond_broadcast(&w->cv_space);
}

static void *worker_main(void *arg)
{
    kvt_trace_writer *w = arg;
    wctx c = {0};
    c.cctx = ZSTD_createCCtx();
    if (c.cctx) {
        ZSTD_CCtx_setParameter(c.cctx, ZSTD_c_compressionLevel, w->opts.level);
        ZSTD_CCtx_setParameter(c.cctx, ZSTD_c_checksumFlag, 1);
        ZSTD_CCtx_setParameter(c.cctx, ZSTD_c_contentSizeFlag, 1);
    }
    pthread_mutex_lock(&w->mu);
    for (;;) {
        while (!w->q_head && !w->stopping)
            pthread_cond_wait(&w->cv_work, &w->mu);
        if (!w->q_head)
            break;
        wjob *j = w->q_head;
        w->q_head = j->next;
        if (!w->q_head)
            w->q_tail = NULL;
        bool failed = w->err != KVT_OK; /* read under mu: set_err writes it under mu */
        pthread_mutex_unlock(&w->mu);
        if (!c.cctx)
            j->status = kvt_error_set(KVT_ERR_NOMEM, "out of memory (zstd context)");
        else if (failed)
            j->status = KVT_OK; /* will be dropped by write_job; skip the work */
        else
            j->status = compress_job(w, &c, j);
        pthread_mutex_lock(&w->mu);
        if (j->status != KVT_OK)
            set_err(w, j->status, kvt_error_msg());
        complete_job(w, j);
    }
    pthread_mutex_unlock(&w->mu);
    ZSTD_freeCCtx(c.cctx);
    kvt_free(c.shuf);
    return NULL;
}

static kvt_status write_file_header(kvt_trace_writer *w, const char *json)
{
    size_t jl = strlen(json);
    size_t n = 8 + 16 + jl + 4;
    uint8_t *b = kvt_malloc(n);
    KVT_RETURN_IF(!b, KVT_ERR_NOMEM, "out of memory");
    kvt_put_u32(b, KVT_FRAME_HEADER);
    kvt_put_u32(b + 4, (uint32_t)(16 + jl + 4));
    kvt_put_u32(b + 8, KVT_FILE_MAGIC);
    kvt_put_u16(b + 12, KVT_FORMAT_MAJOR);
    kvt_put_u16(b + 14, KVT_FORMAT_MINOR);
    kvt_put_u32(b + 16, 0); /* Flags */
    kvt_put_u32(b + 20, (uint32_t)jl);
    memcpy(b + 24, json, jl);
    kvt_put_u32(b + 24 + jl, kvt_crc32(b + 8, 16 + jl));
    kvt_status s = kvt_write_full(w->fd, b, n);
    kvt_free(b);
    if (s == KVT_OK)
        w->offset = n;
    return s;
}

kvt_status kvt_trace_writer_create(const char *path, const char *header_json,
                                   const kvt_writer_opts *opts, kvt_trace_writer **out)
{
    kvt_status s;
    *out = NULL;
    KVT_RETURN_IF(!path || !header_json, KVT_ERR_INVALID_ARG, "path and header are required");
    cJSON *root = cJSON_Parse(header_json);
    bool ok = root && cJSON_IsObject(root);
    cJSON_Delete(root);
    KVT_RETURN_IF(!ok, KVT_ERR_INVALID_ARG, "trace header is not a JSON object");
    KVT_RETURN_IF(strlen(header_json) > KVT_MAX_JSON, KVT_ERR_INVALID_ARG,
                  "trace header JSON is larger than %u bytes", KVT_MAX_JSON);

    /* zstd would clamp another level silently, and the header would record it as given */
    KVT_RETURN_IF(opts && opts->level != 0 &&
                      (opts->level < ZSTD_minCLevel() || opts->level > ZSTD_maxCLevel()),
                  KVT_ERR_INVALID_ARG, "zstd level %d is out of range [%d, %d]", opts->level,
                  ZSTD_minCLevel(), ZSTD_maxCLevel());
    kvt_trace_writer *w = kvt_calloc(1, sizeof(*w));
    KVT_RETURN_IF(!w, KVT_ERR_NOMEM, "out of memory");
    w->fd = -1;
    if (opts)
        w->opts = *opts;
    if (w->opts.level == 0)
        w->opts.level = 3;
    if (w->opts.max_pending_bytes == 0)
        w->opts.max_pending_bytes = 256ull << 20;
    if (w->opts.max_record_bytes == 0)
        w->opts.max_record_bytes = KVT_WRITER_MAX_RECORD_DEFAULT;
    if (w->opts.n_threads < 0)
        w->opts.n_threads = 0;
    /* A new file is written in place (a crash leaves its complete records readable there).
       An existing trace (force) is replaced only by a committed finish: the new one is written
       next to it and renamed over it, so a failure keeps the old one. A symbolic link is
       followed (its target is replaced, with the target's permissions). Anything but a regular
       file (a device, a FIFO, a directory) is never replaced. */
    char *target; /* path, or a symbolic link's target (kvt_output_target) */
    int mode;     /* an existing file's permissions, or -1 */
    if ((s = kvt_output_target(path, &target, &mode)) != KVT_OK)
        goto out_free_w;
    struct stat ex;
    if (mode >= 0) {
        if (stat(target, &ex) != 0 || !S_ISREG(ex.st_mode)) {
            s = kvt_error_set(KVT_ERR_IO,
                              "%s exists and is not a regular file: refusing to "
                              "replace it",
                              path);
            kvt_free(target);
            goto out_free_w;
        }
        if (!w->opts.force) {
            s = kvt_error_set(KVT_ERR_IO, "%s already exists (use --force to overwrite)", path);
            kvt_free(target);
            goto out_free_w;
        }
        w->final = target;
        w->fd = kvt_create_tmp_sibling(w->final, 0644, &w->path);
        if (w->fd < 0) {
            s = kvt_error_set(errno == ENOMEM ? KVT_ERR_NOMEM : KVT_ERR_IO,
                              "cannot write next to %s: %s", w->final, strerror(errno));
            goto out_free_path;
        }
        (void)fchmod(w->fd, (mode_t)mode); /* the replaced trace's permissions */
    } else {
        w->path = target;
        w->fd = open(w->path, O_WRONLY | O_CREAT | O_CLOEXEC | O_EXCL, 0644);
        if (w->fd < 0) {
            if (errno == EEXIST)
                s = kvt_error_set(KVT_ERR_IO, "%s already exists (use --force to overwrite)", path);
            else
                s = kvt_error_set(KVT_ERR_IO, "cannot create %s: %s", path, strerror(errno));
            goto out_free_path;
        }
    }
    s = write_file_header(w, header_json);
    if (s != KVT_OK)
        goto out_close;
    w->stats.file_bytes = w->offset;
    /* room for every thread's job in flight and a queue behind it */
    for (int i = 0; i < 2; i++) {
        w->pool[i].cap = 2 * (size_t)w->opts.n_threads + 4;
        w->pool[i].buf = kvt_calloc(w->pool[i].cap, sizeof(uint8_t *));
        if (!w->pool[i].buf) {
            s = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
            goto out_pool;
        }
    }
    if (w->opts.max_record_bytes <= (64u << 20)) { /* else records are rare: no pool */
        w->pool[POOL_RAW].bytes = (size_t)w->opts.max_record_bytes;
        w->pool[POOL_COMP].bytes = ZSTD_compressBound((size_t)w->opts.max_record_bytes);
    }
    if (pthread_mutex_init(&w->mu, NULL) != 0) {
        s = kvt_error_set(KVT_ERR_NOMEM, "cannot create a mutex");
        goto out_pool;
    }
    if (pthread_mutex_init(&w->pool_mu, NULL) != 0) {
        pthread_mutex_destroy(&w->mu);
        s = kvt_error_set(KVT_ERR_NOMEM, "cannot create a mutex");
        goto out_pool;
    }
    pthread_cond_init(&w->cv_work, NULL);
    pthread_cond_init(&w->cv_space, NULL);
    if (w->opts.n_threads == 0) {
        w->sync_ctx.cctx = ZSTD_createCCtx();
        if (!w->sync_ctx.cctx) {
            s = kvt_error_set(KVT_ERR_NOMEM, "out of memory (zstd context)");
            goto out_sync;
        }
        ZSTD_CCtx_setParameter(w->sync_ctx.cctx, ZSTD_c_compressionLevel, w->opts.level);
        ZSTD_CCtx_setParameter(w->sync_ctx.cctx, ZSTD_c_checksumFlag, 1);
        ZSTD_CCtx_setParameter(w->sync_ctx.cctx, ZSTD_c_contentSizeFlag, 1);
    } else {
        w->threads = kvt_calloc((size_t)w->opts.n_threads, sizeof(pthread_t));
        if (!w->threads) {
            s = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
            goto out_sync;
        }
        for (int i = 0; i < w->opts.n_threads; i++) {
            if (pthread_create(&w->threads[i], NULL, worker_main, w) != 0) {
                s = kvt_error_set(KVT_ERR_NOMEM, "cannot start compression thread");
                goto out_threads;
            }
            w->n_threads++;
        }
    }
    *out = w;
    return KVT_OK;

out_threads:
    pthread_mutex_lock(&w->mu);
    w->stopping = true;
    pthread_cond_broadcast(&w->cv_work);
    pthread_mutex_unlock(&w->mu);
    for (int i = 0; i < w->n_threads; i++)
        pthread_join(w->threads[i], NULL);
    kvt_free(w->threads);
out_sync:
    ZSTD_freeCCtx(w->sync_ctx.cctx);
    pthread_cond_destroy(&w->cv_space);
    pthread_cond_destroy(&w->cv_work);
    pthread_mutex_destroy(&w->pool_mu);
    pthread_mutex_destroy(&w->mu);
out_pool:
    pool_free(w);
out_close:
    close(w->fd);
    unlink(w->path); /* only ever the file created above */
out_free_path:
    kvt_tmp_forget(w->path); /* a temporary sibling when replacing (w->final) */
    kvt_free(w->path);
    kvt_free(w->final);
out_free_w:
    kvt_free(w);
    return s;
}

static kvt_status validate_info(const kvt_record_info *in)
{
    KVT_RETURN_IF(!kvt_kind_name(in->kind), KVT_ERR_INVALID_ARG, "unknown record kind %d",
                  in->kind);
    KVT_RETURN_IF(kvt_dtype_size(in->dtype) == 0, KVT_ERR_INVALID_ARG, "unknown dtype %d",
                  (int)in->dtype);
    KVT_RETURN_IF(in->head_end <= in->head_begin || in->tok_end <= in->tok_begin || in->dim == 0,
                  KVT_ERR_INVALID_ARG, "empty %s block (heads [%u,%u) tokens [%u,%u) dim %u)",
                  kvt_kind_name(in->kind), in->head_begin, in->head_end, in->tok_begin, in->tok_end,
                  in->dim);
    KVT_RETURN_IF(in->dim > KVT_MAX_DIM, KVT_ERR_INVALID_ARG, "dim %u too large", in->dim);
    KVT_RETURN_IF(in->layer < -1, KVT_ERR_INVALID_ARG, "layer %d is invalid", (int)in->layer);
    /* the tables (kinds 16 and up) are [1, n, 1], positions [P, T, 1] with P = 1 or 3 */
    const uint32_t h_max = in->kind == KVT_KIND_POSITIONS ? 3 : 1;
    KVT_RETURN_IF(in->kind >= KVT_KIND_TOKEN_IDS && (in->head_end > h_max || in->dim != 1),
                  KVT_ERR_INVALID_ARG,
                  "%s block of rows [%u,%u) and dim %u: the table is [%s, n, 1] "
                  "(traces/FORMAT.md)",
                  kvt_kind_name(in->kind), in->head_begin, in->head_end, in->dim,
                  h_max == 3 ? "1 or 3" : "1");
    return KVT_OK;
}

/* Check the block against the earlier blocks of its tensor and remember it (under mu). */
static kvt_status claim_block_locked(kvt_trace_writer *w, const kvt_record_info *in)
{
    if (in->kind == KVT_KIND_META_JSON) /* whole JSON objects that overlap by design */
        return KVT_OK;
    char name[64];
    wtensor *t = NULL;
    for (size_t i = 0; i < w->n_tensors && !t; i++)
        if (w->tensors[i].layer == in->layer && w->tensors[i].kind == in->kind)
            t = &w->tensors[i];
    if (!t) {
        if (w->n_tensors == w->cap_tensors) {
            size_t nc = w->cap_tensors ? 2 * w->cap_tensors : 64;
            wtensor *nt = kvt_realloc(w->tensors, nc * sizeof(*nt));
            KVT_RETURN_IF(!nt, KVT_ERR_NOMEM, "out of memory");
            w->tensors = nt;
            w->cap_tensors = nc;
        }
        t = &w->tensors[w->n_tensors++];
        memset(t, 0, sizeof(*t));
        t->layer = in->layer;
        t->kind = in->kind;
        t->dtype = in->dtype;
        t->dim = in->dim;
    } else {
        KVT_RETURN_IF(in->dtype != t->dtype || in->dim != t->dim, KVT_ERR_INVALID_ARG,
                      "%s: a %s record of dim %u, but its earlier records are %s of dim %u (the "
                      "records of one tensor share dtype and dim: traces/FORMAT.md)",
                      kvt_tensor_name(in->layer, in->kind, name, sizeof(name)),
                      kvt_dtype_name(in->dtype), in->dim, kvt_dtype_name(t->dtype), t->dim);
        bool clear = in->head_end <= WT_FAST_HEADS;
        for (uint32_t h = in->head_begin; clear && h < in->head_end; h++)
            clear = h >= t->n_end || in->tok_begin >= t->end[h];
        for (size_t i = 0; !clear && i < t->n_blk; i++) {
            const uint32_t *b = t->blk[i];
            KVT_RETURN_IF(in->head_begin < b[1] && b[0] < in->head_end && in->tok_begin < b[3] &&
                              b[2] < in->tok_end,
                          KVT_ERR_INVALID_ARG,
                          "%s: heads [%u,%u) x tokens [%u,%u) overlap an earlier record's heads "
                          "[%u,%u) x tokens [%u,%u) (the records of one tensor never overlap: "
                          "traces/FORMAT.md)",
                          kvt_tensor_name(in->layer, in->kind, name, sizeof(name)), in->head_begin,
                          in->head_end, in->tok_begin, in->tok_end, b[0], b[1], b[2], b[3]);
        }
    }
    if (t->n_blk == t->cap_blk) {
        size_t nc = t->cap_blk ? 2 * t->cap_blk : 8;
        uint32_t(*nb)[4] = kvt_realloc(t->blk, nc * sizeof(*nb));
        KVT_RETURN_IF(!nb, KVT_ERR_NOMEM, "out of memory");
        t->blk = nb;
        t->cap_blk = nc;
    }
    uint32_t fast_end = in->head_end < WT_FAST_HEADS ? in->head_end : WT_FAST_HEADS;
    if (fast_end > t->n_end) {
        uint32_t *ne = kvt_realloc(t->end, fast_end * sizeof(*ne));
        KVT_RETURN_IF(!ne, KVT_ERR_NOMEM, "out of memory");
        memset(ne + t->n_end, 0, (fast_end - t->n_end) * sizeof(*ne));
        t->end = ne;
        t->n_end = fast_end;
    }
    for (uint32_t h = in->head_begin; h < fast_end; h++)
        if (in->tok_end > t->end[h])
            t->end[h] = in->tok_end;
    uint32_t *b = t->blk[t->n_blk++];
    b[0] = in->head_begin, b[1] = in->head_end, b[2] = in->tok_begin, b[3] = in->tok_end;
    return KVT_OK;
}

static kvt_status claim_block(kvt_trace_writer *w, const kvt_record_info *in)
{
    pthread_mutex_lock(&w->mu);
    /* a stopped writer says why it stopped, not that its caller's retry overlaps */
    kvt_status s = w->err != KVT_OK ? sticky(w) : claim_block_locked(w, in);
    pthread_mutex_unlock(&w->mu);
    return s;
}

/* Forget a claimed block none of whose records was queued (an allocation failed first), so the
 * caller may append it again. The per-head high-water marks are recomputed from the blocks left. */
static void unclaim_block(kvt_trace_writer *w, const kvt_record_info *in)
{
    if (in->kind == KVT_KIND_META_JSON)
        return;
    pthread_mutex_lock(&w->mu);
    for (size_t i = 0; i < w->n_tensors; i++) {
        wtensor *t = &w->tensors[i];
        if (t->layer != in->layer || t->kind != in->kind)
            continue;
        for (size_t k = t->n_blk; k-- > 0;) {
            uint32_t *b = t->blk[k];
            if (b[0] != in->head_begin || b[1] != in->head_end || b[2] != in->tok_begin ||
                b[3] != in->tok_end)
                continue;
            memmove(t->blk[k], t->blk[k + 1], (t->n_blk - k - 1) * sizeof(*t->blk));
            t->n_blk--;
            for (uint32_t h = in->head_begin; h < in->head_end && h < t->n_end; h++) {
                t->end[h] = 0;
                for (size_t j = 0; j < t->n_blk; j++)
                    if (t->blk[j][0] <= h && h < t->blk[j][1] && t->blk[j][3] > t->end[h])
                        t->end[h] = t->blk[j][3];
            }
            break;
        }
        break;
    }
    pthread_mutex_unlock(&w->mu);
}

/* Queue (or, without threads, compress and write) one record covering a contiguous block.
 * *queued says whether it got as far as the queue (its failure then is sticky). With release,
 * the payload is lent rather than copied: release(ctx) is called once the writer is done with
 * it, whatever happens (before return when the record is refused). A lent payload does not
 * count against max_pending_bytes (its lender bounds it) and never waits for room. */
static kvt_status append_one(kvt_trace_writer *w, const kvt_record_info *info, const void *data,
                             size_t bytes, bool planes, void (*release)(void *), void *ctx,
                             bool *queued)
{
    *queued = false;
    wjob *j = kvt_calloc(1, sizeof(*j));
    if (!j) {
        if (release)
            release(ctx);
        return kvt_error_set(KVT_ERR_NOMEM, "out of memory");
    }
    if (release) {
        j->raw = (uint8_t *)(uintptr_t)data;
        j->release = release;
        j->release_ctx = ctx;
    } else {
        j->raw = buf_get(w, POOL_RAW, bytes, &j->raw_pooled);
        if (!j->raw) {
            kvt_free(j);
            return kvt_error_set(KVT_ERR_NOMEM, "out of memory (%zu-byte record)", bytes);
        }
        memcpy(j->raw, data, bytes);
        j->pend_bytes = bytes;
    }
    j->raw_bytes = bytes;
    j->planes = planes;
    j->hdr.info = *info;
    j->hdr.info.raw_bytes = bytes;

    uint64_t t0 = kvt_now_ns(), waited = 0;
    pthread_mutex_lock(&w->mu);
    while (w->err == KVT_OK && !release && w->pending_bytes > 0 &&
           w->pending_bytes + bytes > w->opts.max_pending_bytes) {
        pthread_cond_wait(&w->cv_space, &w->mu);
        waited = 1;
    }
    if (waited)
        w->stats.stall_ns += kvt_now_ns() - t0;
    if (w->err != KVT_OK) {
        kvt_status s = sticky(w);
        pthread_mutex_unlock(&w->mu);
        job_free(w, j);
        return s;
    }
    j->hdr.info.seq = w->next_seq++;
    *queued = true;
    w->pending_bytes += j->pend_bytes;
    if (w->pending_bytes > w->stats.peak_pending_bytes)
        w->stats.peak_pending_bytes = w->pending_bytes;
    if (w->n_threads == 0) {
        j->status = compress_job(w, &w->sync_ctx, j);
        if (j->status != KVT_OK)
            set_err(w, j->status, kvt_error_msg());
        complete_job(w, j);
    } else {
        if (w->q_tail)
            w->q_tail->next = j;
        else
            w->q_head = j;
        w->q_tail = j;
        pthread_cond_signal(&w->cv_work);
    }
    kvt_status s = w->err == KVT_OK ? KVT_OK : sticky(w);
    pthread_mutex_unlock(&w->mu);
    return s;
}

/* How a block is cut into records: whole (n == 1), groups of hp whole heads, or each head's
 * tokens in chunks of tp. */
typedef struct split_plan {
    uint32_t n_heads, n_tok, hp, tp; /* hp == 0: token chunks */
    uint64_t row, per_head;          /* bytes */
    size_t n;                        /* records */
} split_plan;

static void plan_split(const kvt_trace_writer *w, const kvt_record_info *info, split_plan *sp)
{
    size_t es = kvt_dtype_size(info->dtype);
    uint64_t max = w->opts.max_record_bytes;
    sp->n_heads = info->head_end - info->head_begin;
    sp->n_tok = info->tok_end - info->tok_begin;
    sp->row = (uint64_t)info->dim * es;
    sp->per_head = sp->row * sp->n_tok;
    /* a meta_json record is one JSON object: never split, so a reader parses each record */
    if (sp->per_head * sp->n_heads <= max || info->kind == KVT_KIND_META_JSON) {
        sp->hp = sp->n_heads;
        sp->tp = sp->n_tok;
        sp->n = 1;
    } else if (sp->per_head <= max) { /* groups of whole heads */
        sp->hp = (uint32_t)(max / sp->per_head);
        sp->tp = sp->n_tok;
        sp->n = (sp->n_heads + sp->hp - 1) / sp->hp;
    } else { /* one head is larger than a record: split each head along tokens */
        uint64_t tp = max / sp->row;
        sp->hp = 0;
        sp->tp = tp ? (uint32_t)(tp < sp->n_tok ? tp : sp->n_tok) : 1u;
        sp->n = (size_t)sp->n_heads * ((sp->n_tok + sp->tp - 1) / sp->tp);
    }
}

/* Record i of the plan, and the byte offset of its rows in the block. */
static void plan_part(const split_plan *sp, const kvt_record_info *info, size_t i,
                      kvt_record_info *part, uint64_t *offset)
{
    *part = *info;
    if (sp->hp) {
        uint32_t h = (uint32_t)i * sp->hp;
        part->head_begin = info->head_begin + h;
        part->head_end = part->head_begin + (sp->hp < sp->n_heads - h ? sp->hp : sp->n_heads - h);
        *offset = (uint64_t)h * sp->per_head;
        return;
    }
    uint32_t per = (sp->n_tok + sp->tp - 1) / sp->tp;
    uint32_t h = (uint32_t)(i / per), t = (uint32_t)(i % per) * sp->tp;
    part->head_begin = info->head_begin + h;
    part->head_end = part->head_begin + 1;
    part->tok_begin = info->tok_begin + t;
    part->tok_end = part->tok_begin + (sp->tp < sp->n_tok - t ? sp->tp : sp->n_tok - t);
    *offset = h * sp->per_head + t * sp->row;
}

kvt_status kvt_trace_writer_append(kvt_trace_writer *w, const kvt_record_info *info,
                                   const void *data)
{
    KVT_RETURN_IF(!w || !info || !data, KVT_ERR_INVALID_ARG, "null argument");
    KVT_FORWARD(validate_info(info));
    KVT_RETURN_IF(w->finished, KVT_ERR_STATE, "append after finish");
    uint64_t total;
    KVT_FORWARD(kvt_rec_raw_bytes(info, &total));
    KVT_FORWARD(claim_block(w, info));
    split_plan sp;
    plan_split(w, info, &sp);
    const uint8_t *p = data;
    for (size_t i = 0; i < sp.n; i++) {
        kvt_record_info part;
        uint64_t off;
        plan_part(&sp, info, i, &part, &off);
        uint64_t bytes =
            (uint64_t)(part.head_end - part.head_begin) * (part.tok_end - part.tok_begin) * sp.row;
        bool queued;
        kvt_status s = append_one(w, &part, p + off, (size_t)bytes, false, NULL, NULL, &queued);
        if (s == KVT_OK)
            continue;
        if (i == 0 && !queued) { /* nothing of the block was queued: it may be appended again */
            unclaim_block(w, info);
            return s;
        }
        if (!queued) { /* part of the block is queued: the tensor has a hole, so stop here */
            pthread_mutex_lock(&w->mu);
            set_err(w, s, kvt_error_msg());
            pthread_mutex_unlock(&w->mu);
        }
        return s;
    }
    return KVT_OK;
}

kvt_status kvt_trace_writer_parts(const kvt_trace_writer *w, const kvt_record_info *info,
                                  kvt_record_info *parts, size_t cap, size_t *n)
{
    KVT_RETURN_IF(!w || !info || !n || (cap && !parts), KVT_ERR_INVALID_ARG, "null argument");
    KVT_FORWARD(validate_info(info));
    uint64_t total;
    KVT_FORWARD(kvt_rec_raw_bytes(info, &total));
    split_plan sp;
    plan_split(w, info, &sp);
    *n = sp.n;
    for (size_t i = 0; i < sp.n && i < cap; i++) {
        uint64_t off;
        plan_part(&sp, info, i, &parts[i], &off);
    }
    return KVT_OK;
}

bool kvt_trace_writer_shuffles(const kvt_trace_writer *w)
{
    return w && !w->opts.no_shuffle;
}

uint64_t kvt_trace_writer_max_record_bytes(const kvt_trace_writer *w)
{
    return w ? w->opts.max_record_bytes : 0;
}

const char *kvt_trace_writer_file(const kvt_trace_writer *w)
{
    return !w ? NULL : w->renamed ? w->final : w->path;
}

/* *taken: whether append_one got the payload (a lent one is then handed back by it) */
static kvt_status append_planes(kvt_trace_writer *w, const kvt_record_info *info,
                                const void *planes, void (*release)(void *), void *ctx, bool *taken)
{
    *taken = false;
    KVT_RETURN_IF(!w || !info || !planes, KVT_ERR_INVALID_ARG, "null argument");
    KVT_FORWARD(validate_info(info));
    KVT_RETURN_IF(w->finished, KVT_ERR_STATE, "append after finish");
    uint64_t total;
    KVT_FORWARD(kvt_rec_raw_bytes(info, &total));
    KVT_RETURN_IF(total > w->opts.max_record_bytes, KVT_ERR_INVALID_ARG,
                  "append_planes: a %llu-byte record is larger than max_record_bytes %llu",
                  (unsigned long long)total, (unsigned long long)w->opts.max_record_bytes);
    KVT_FORWARD(claim_block(w, info));
    bool planes_ok = !w->opts.no_shuffle && kvt_dtype_size(info->dtype) > 1, queued;
    *taken = true;
    kvt_status s = append_one(w, info, planes, (size_t)total, planes_ok, release, ctx, &queued);
    if (s != KVT_OK && !queued)
        unclaim_block(w, info);
    return s;
}

kvt_status kvt_trace_writer_append_planes(kvt_trace_writer *w, const kvt_record_info *info,
                                          const void *planes)
{
    bool taken;
    return append_planes(w, info, planes, NULL, NULL, &taken);
}

kvt_status kvt_trace_writer_lend_planes(kvt_trace_writer *w, const kvt_record_info *info,
                                        const void *planes, void (*release)(void *ctx), void *ctx)
{
    if (!release)
        return kvt_error_set(KVT_ERR_INVALID_ARG, "lend_planes: no release function");
    bool taken;
    kvt_status s = append_planes(w, info, planes, release, ctx, &taken);
    if (!taken) /* refused before append_one took it (which hands it back itself) */
        release(ctx);
    return s;
}

kvt_status kvt_trace_writer_append_json(kvt_trace_writer *w, const char *json)
{
    KVT_RETURN_IF(!w || !json, KVT_ERR_INVALID_ARG, "null argument");
    size_t n = strlen(json);
    KVT_RETURN_IF(n == 0 || n > UINT32_MAX, KVT_ERR_INVALID_ARG, "bad JSON length");
    kvt_record_info info = {.kind = KVT_KIND_META_JSON,
                            .layer = -1,
                            .head_end = 1,
                            .tok_end = (uint32_t)n,
                            .dim = 1,
                            .dtype = KVT_DTYPE_U8};
    return kvt_trace_writer_append(w, &info, json);
}

/* Wait until every queued job has been written. */
static void drain(kvt_trace_writer *w)
{
    pthread_mutex_lock(&w->mu);
    while (w->next_write != w->next_seq)
        pthread_cond_wait(&w->cv_space, &w->mu);
    pthread_mutex_unlock(&w->mu);
}

static kvt_status write_index_and_trailer(kvt_trace_writer *w)
{
    size_t n = w->n_index, body;
    if (kvt_mul_overflow(n, KVT_INDEX_ENTRY_BYTES, &body) || body > UINT32_MAX - 64)
        return kvt_error_set(KVT_ERR_OVERFLOW, "too many records for one index");
    size_t user = 16 + body + 4;
    size_t total = 8 + user + KVT_TRAILER_BYTES;
    uint8_t *b = kvt_malloc(total);
    KVT_RETURN_IF(!b, KVT_ERR_NOMEM, "out of memory (index)");
    kvt_put_u32(b, KVT_FRAME_INDEX);
    kvt_put_u32(b + 4, (uint32_t)user);
    kvt_put_u32(b + 8, KVT_INDEX_MAGIC);
    kvt_put_u32(b + 12, (uint32_t)n);
    kvt_put_u32(b + 16, KVT_INDEX_ENTRY_BYTES);
    kvt_put_u32(b + 20, 0);
    for (size_t i = 0; i < n; i++) {
        uint8_t *e = b + 24 + i * KVT_INDEX_ENTRY_BYTES;
        kvt_put_u64(e, w->index[i].info.file_offset);
        kvt_rec_encode(&w->index[i], e + 8);
    }
    kvt_put_u32(b + 24 + body, kvt_crc32(b + 8, 16 + body));
    uint8_t *t = b + 8 + user;
    kvt_put_u32(t, KVT_FRAME_END);
    kvt_put_u32(t + 4, 24);
    kvt_put_u64(t + 8, w->offset);
    kvt_put_u64(t + 16, (uint64_t)n);
    kvt_put_u32(t + 24, kvt_crc32(t + 8, 16));
    kvt_put_u32(t + 28, KVT_END_MAGIC);
    kvt_status s = kvt_write_full(w->fd, b, total);
    kvt_free(b);
    if (s != KVT_OK) {
        if (ftruncate(w->fd, (off_t)w->offset) != 0)
            kvt_log(KVT_LOG_WARN, "could not cut the partial index from %s", w->path);
        return kvt_error_set(s, "writing the index of %s: %s", w->path, kvt_error_msg());
    }
    w->offset += total;
    w->stats.file_bytes = w->offset;
    if (fsync(w->fd) != 0)
        return kvt_error_set(KVT_ERR_IO, "fsync %s: %s", w->path, strerror(errno));
    return KVT_OK;
}

kvt_status kvt_trace_writer_finish(kvt_trace_writer *w)
{
    return kvt_trace_writer_finish_ex(w, true);
}

kvt_status kvt_trace_writer_finish_ex(kvt_trace_writer *w, bool commit)
{
    KVT_RETURN_IF(!w, KVT_ERR_INVALID_ARG, "null writer");
    KVT_RETURN_IF(w->finished, KVT_ERR_STATE, "trace already finished");
    drain(w);
    w->finished = true;
    if (w->err != KVT_OK)
        return sticky(w);
    kvt_status s = write_index_and_trailer(w);
    w->complete = s == KVT_OK;
    if (s == KVT_OK && w->final && commit) {
        if (rename(w->path, w->final) != 0) {
            s = kvt_error_set(KVT_ERR_IO, "cannot rename %s to %s: %s", w->path, w->final,
                              strerror(errno));
        } else {
            w->renamed = true;
            kvt_fsync_dir_of(w->final); /* the rename itself durable */
        }
    }
    if (s != KVT_OK)
        set_err(w, s, kvt_error_msg());
    return s;
}

void kvt_trace_writer_get_stats(kvt_trace_writer *w, kvt_writer_stats *out)
{
    pthread_mutex_lock(&w->mu);
    *out = w->stats;
    pthread_mutex_unlock(&w->mu);
}

static void writer_free(kvt_trace_writer *w, bool discard)
{
    if (!w)
        return;
    drain(w);
    pthread_mutex_lock(&w->mu);
    w->stopping = true;
    pthread_cond_broadcast(&w->cv_work);
    pthread_mutex_unlock(&w->mu);
    for (int i = 0; i < w->n_threads; i++)
        pthread_join(w->threads[i], NULL);
    kvt_free(w->threads);
    ZSTD_freeCCtx(w->sync_ctx.cctx);
    kvt_free(w->sync_ctx.shuf);
    pthread_cond_destroy(&w->cv_space);
    pthread_cond_destroy(&w->cv_work);
    pool_free(w);
    pthread_mutex_destroy(&w->pool_mu);
    pthread_mutex_destroy(&w->mu);
    if (w->fd >= 0)
        close(w->fd);
    if (discard && !w->renamed) /* the file this writer created, never a committed trace */
        unlink(w->path);
    else if (w->final && !w->renamed) /* not committed: the old trace stays, the new one too */
        kvt_log(KVT_LOG_WARN, "the new trace (%s) is in %s; %s is unchanged",
                w->complete ? "finished" : "unfinished, recoverable", w->path, w->final);
    kvt_free(w->index);
    for (size_t i = 0; i < w->n_tensors; i++) {
        kvt_free(w->tensors[i].end);
        kvt_free(w->tensors[i].blk);
    }
    kvt_free(w->tensors);
    kvt_tmp_forget(w->path); /* the unfinished one stays, named in the warning above */
    kvt_free(w->path);
    kvt_free(w->final);
    kvt_free(w);
}

void kvt_trace_writer_free(kvt_trace_writer *w)
{
    writer_free(w, false);
}

void kvt_trace_writer_discard(kvt_trace_writer *w)
{
    writer_free(w, true);
}
