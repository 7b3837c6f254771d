/* selection_export.c - `--export-selection FILE`: the kept token indices of every (trace,
 * policy, budget, layer, head[, decode step]) in a binary layout (default) or JSON (FILE ends
 * in .json), both specified in RESULTS.md. Worker threads deliver layers in any order, each in
 * one or more calls (kvt_selection_sink): a layer's records are encoded as they come into one
 * buffer per (policy, budget, head), joined in the file's order at its last call; the writer
 * buffers the layers and writes them in layer order, so the file is deterministic. The file is
 * written under a temporary name (kvt_create_tmp_sibling, same directory) and renamed over FILE
 * only at close, once every trace has ended complete and every byte is on disk (fsync): a failed or
 * interrupted export leaves no partial file and any old FILE untouched.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "kvt_analysis.h"
#include "sel_hash.h"

#define SEL_MAGIC     "KVTSEL\0\1"
#define SEL_REC_MAGIC 0x4C45534Bu /* "KSEL" */
#define SEL_END_MAGIC 0x444E454Bu /* "KEND": the end record (version 2) */
#define SEL_REC_BYTES 36u

/* record flags */
#define SEL_FLAG_STEP   0x1u
#define SEL_FLAG_MERGED 0x2u
#define SEL_FLAG_QHEAD  0x4u
#define SEL_FLAG_DELTA  0x8u  /* binary, version 3: the changes from the step before's set */
#define SEL_FLAG_BDELTA 0x10u /* binary, version 3: the changes from the budget before's set */

typedef struct buf {
    char *p;
    size_t n, cap;
    size_t n_recs; /* records encoded in p */
} buf;

/* The records of one (policy, budget, head) of a layer being built, encoded in step order */
typedef struct seg {
    int policy, budget, head;
    buf b;
    int32_t *last; /* binary version 3: the set of its latest step so far, a base for the step
                      after it in a later call */
    size_t last_n, last_cap;
    int last_step; /* that step; meaningful once b holds a record */
} seg;

typedef struct layer_build { /* a layer whose records come in more than one call */
    seg *segs;
    size_t n, cap;
    sel_hash by_key; /* segs by (policy, budget, head); room for cap */
} layer_build;

typedef struct kept_trace { /* blocks mode: the layers of one trace this process replayed */
    buf *blocks;            /* [n_layers] */
    bool *ready;            /* [n_layers] */
    int n_layers;
} kept_trace;

struct kvt_selection_writer {
    FILE *f;
    char *path; /* the final name */
    char *tmp;  /* where the file is written until close renames it */
    size_t n_traces, n_traces_done;
    uint64_t n_records; /* written so far (the binary end record holds the count) */
    bool json;
    int version; /* 3 where delta records may be written (a per-step policy, or two budgets) */
    bool first_json_rec;
    pthread_mutex_t mu;
    kvt_status err;
    char err_msg[256];
    size_t n_pol, n_b;
    unsigned *pflags; /* [n_pol] SEL_FLAG_* per policy */
    int trace, n_layers, next_layer;
    int *btok;    /* [n_b] */
    buf *pending; /* [n_layers] */
    bool *ready;
    layer_build *build; /* [n_layers]: the layers whose last call has not come */
    kept_trace *kept;   /* [n_traces] in blocks mode (no file: layers are kept for the caller) */
};

static bool buf_put(buf *b, const void *src, size_t n)
{
    if (b->n + n > b->cap) {
        /* small at first: a layer being built holds a buffer per policy, budget and head */
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n)
            cap *= 2;
        char *p = kvt_realloc(b->p, cap);
        if (!p)
            return false;
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, src, n);
    b->n += n;
    return true;
}

static bool buf_printf(buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static bool buf_printf(buf *b, const char *fmt, ...)
{
    char tmp[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    return n >= 0 && (size_t)n < sizeof(tmp) && buf_put(b, tmp, (size_t)n);
}

static void put_u32(unsigned char *p, uint32_t x)
{
    p[0] = (unsigned char)x, p[1] = (unsigned char)(x >> 8), p[2] = (unsigned char)(x >> 16);
    p[3] = (unsigned char)(x >> 24);
}

static void put_u16(unsigned char *p, uint32_t x)
{
    p[0] = (unsigned char)x, p[1] = (unsigned char)(x >> 8);
}

/* What the export says of each policy: from kvt_policy objects, or a read export's header */
static kvt_selection_policy *describe(kvt_policy *const *pols, size_t n)
{
    kvt_selection_policy *d = kvt_calloc(n ? n : 1, sizeof(*d));
    for (size_t i = 0; d && i < n; i++) {
        unsigned f = kvt_policy_flags(pols[i]);
        d[i] = (kvt_selection_policy){.label = kvt_policy_label(pols[i]),
                                      .name = kvt_policy_name(pols[i]),
                                      .query_heads = kvt_policy_per_query_head(pols[i]),
                                      .per_step = (f & KVT_POLICY_PER_STEP) != 0,
                                      .merged = (f & KVT_POLICY_MERGED) != 0};
    }
    return d;
}

/* A writer without its file: the format from path's name, the flags of each policy */
static kvt_status writer_new(const char *path, const kvt_selection_policy *pd, size_t n_pol,
                             size_t n_budgets, size_t n_traces, kvt_selection_writer **out)
{
    *out = NULL;
    KVT_RETURN_IF(n_pol > 65535 || n_budgets > 65535 || n_traces > 65535, KVT_ERR_INVALID_ARG,
                  "selection export: too many policies, budgets or traces");
    kvt_selection_writer *w = kvt_calloc(1, sizeof(*w));
    KVT_RETURN_IF(!w, KVT_ERR_NOMEM, "out of memory");
    size_t len = strlen(path);
    w->json = len >= 5 && !strcmp(path + len - 5, ".json");
    w->first_json_rec = true;
    w->n_pol = n_pol;
    w->n_b = n_budgets;
    w->n_traces = n_traces;
    w->trace = -1;
    pthread_mutex_init(&w->mu, NULL);
    w->pflags = kvt_calloc(n_pol ? n_pol : 1, sizeof(unsigned));
    w->btok = kvt_calloc(n_budgets ? n_budgets : 1, sizeof(int));
    if (!w->pflags || !w->btok) {
        kvt_selection_writer_close(w);
        return kvt_error_set(KVT_ERR_NOMEM, "out of memory");
    }
    /* 2, what readers before delta records read, where no record can have a base */
    w->version = n_budgets > 1 ? KVT_SELECTION_VERSION : 2;
    for (size_t i = 0; i < n_pol; i++) {
        w->pflags[i] = (pd[i].per_step ? SEL_FLAG_STEP : 0) | (pd[i].merged ? SEL_FLAG_MERGED : 0) |
                       (pd[i].query_heads ? SEL_FLAG_QHEAD : 0);
        if (pd[i].per_step)
            w->version = KVT_SELECTION_VERSION;
    }
    *out = w;
    return KVT_OK;
}

kvt_status kvt_selection_writer_open_blocks(const char *path, kvt_policy *const *pols, size_t n_pol,
                                            size_t n_budgets, size_t n_traces,
                                            kvt_selection_writer **out)
{
    *out = NULL;
    kvt_selection_policy *pd = describe(pols, n_pol);
    KVT_RETURN_IF(!pd, KVT_ERR_NOMEM, "out of memory");
    kvt_status st = writer_new(path, pd, n_pol, n_budgets, n_traces, out);
    kvt_free(pd);
    if (st)
        return st;
    (*out)->kept = kvt_calloc(n_traces ? n_traces : 1, sizeof(kept_trace));
    if (!(*out)->kept) {
        kvt_selection_writer_close(*out);
        *out = NULL;
        return kvt_error_set(KVT_ERR_NOMEM, "out of memory");
    }
    return KVT_OK;
}

/* The export's file and header: policies pd, budget texts, traces; shard_count > 0 marks the
 * part of `replay --shard shard_index/shard_count` */
static kvt_status open_file(const char *path, bool force, const kvt_selection_policy *pd,
                            size_t n_pol, const char *const *budgets, size_t n_budgets,
                            const char *const *trace_paths, size_t n_traces, int shard_index,
                            int shard_count, const char *shard_extra, kvt_selection_writer **out)
{
    *out = NULL;
    KVT_RETURN_IF(!force && access(path, F_OK) == 0, KVT_ERR_IO,
                  "%s exists (use --force to overwrite)", path);
    kvt_selection_writer *w = NULL;
    KVT_FORWARD(writer_new(path, pd, n_pol, n_budgets, n_traces, &w));
    kvt_status st = KVT_OK;
    char *hdr = NULL;
    cJSON *h = cJSON_CreateObject();
    if (!h) {
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
        goto out_fail;
    }
    cJSON_AddNumberToObject(h, "selection_version", w->version);
    char gen[64];
    snprintf(gen, sizeof(gen), "kvtrace %s", kvt_version_string());
    cJSON_AddStringToObject(h, "generator", gen);
    cJSON *pl = cJSON_AddArrayToObject(h, "policies");
    for (size_t i = 0; i < n_pol; i++) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "label", pd[i].label);
        cJSON_AddStringToObject(o, "name", pd[i].name);
        cJSON_AddStringToObject(o, "granularity", pd[i].query_heads ? "query_head" : "kv_head");
        cJSON_AddBoolToObject(o, "per_step", pd[i].per_step);
        cJSON_AddBoolToObject(o, "merged", pd[i].merged);
        cJSON_AddItemToArray(pl, o);
    }
    cJSON *bl = cJSON_AddArrayToObject(h, "budgets");
    for (size_t i = 0; i < n_budgets; i++)
        cJSON_AddItemToArray(bl, cJSON_CreateString(budgets[i]));
    cJSON *tl = cJSON_AddArrayToObject(h, "traces");
    for (size_t i = 0; i < n_traces; i++)
        cJSON_AddItemToArray(tl, cJSON_CreateString(trace_paths[i]));
    if (shard_count > 0) { /* last: a part's header is the whole export's plus this */
        cJSON *sh = cJSON_AddObjectToObject(h, "shard");
        cJSON_AddNumberToObject(sh, "index", shard_index);
        cJSON_AddNumberToObject(sh, "count", shard_count);
        cJSON *ex = shard_extra ? cJSON_Parse(shard_extra) : NULL, *it;
        while (ex && (it = ex->child) != NULL) /* the settings every part must share */
            cJSON_AddItemToObject(sh, it->string, cJSON_DetachItemViaPointer(ex, it));
        cJSON_Delete(ex);
    }
    hdr = cJSON_PrintUnformatted(h);
    if (!hdr) {
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
        goto out_fail;
    }
    int mode; /* a symbolic link's target is replaced, with the replaced file's permissions */
    if ((st = kvt_output_target(path, &w->path, &mode)))
        goto out_fail;
    int fd = kvt_create_tmp_sibling(w->path, 0666, &w->tmp);
    if (fd >= 0 && mode >= 0)
        (void)fchmod(fd, (mode_t)mode);
    if (fd < 0) {
        st = kvt_error_set(errno == ENOMEM ? KVT_ERR_NOMEM : KVT_ERR_IO,
                           "cannot write next to %s: %s", w->path, strerror(errno));
        goto out_fail;
    }
    w->f = fdopen(fd, "wb");
    if (!w->f) {
        st = kvt_error_set(KVT_ERR_IO, "cannot write %s: %s", w->tmp, strerror(errno));
        close(fd);
        remove(w->tmp);
        goto out_fail;
    }
    bool ok;
    if (w->json) {
        size_t hl = strlen(hdr); /* the header object, left open for "records" */
        ok = fwrite(hdr, 1, hl - 1, w->f) == hl - 1 && fputs(",\"records\":[\n", w->f) >= 0;
    } else {
        unsigned char fix[16];
        memcpy(fix, SEL_MAGIC, 8);
        put_u32(fix + 8, (uint32_t)w->version);
        put_u32(fix + 12, (uint32_t)strlen(hdr));
        ok = fwrite(fix, 1, 16, w->f) == 16 && fwrite(hdr, 1, strlen(hdr), w->f) == strlen(hdr);
    }
    if (!ok) {
        st = kvt_error_set(KVT_ERR_IO, "cannot write %s: %s", path, strerror(errno));
        goto out_fail;
    }
    cJSON_Delete(h);
    cJSON_free(hdr);
    *out = w;
    return KVT_OK;
out_fail:
    cJSON_Delete(h);
    cJSON_free(hdr);
    if (w->f) {
        fclose(w->f);
        remove(w->tmp);
    }
    w->f = NULL;
    kvt_selection_writer_close(w);
    return st;
}

/* the budgets' texts, for open_file */
static const char **budget_texts(const kvt_budget *budgets, size_t n)
{
    const char **t = kvt_calloc(n ? n : 1, sizeof(char *));
    for (size_t i = 0; t && i < n; i++)
        t[i] = budgets[i].text;
    return t;
}

kvt_status kvt_selection_writer_open_part(const char *path, bool force, kvt_policy *const *pols,
                                          size_t n_pol, const kvt_budget *budgets, size_t n_budgets,
                                          const char *const *trace_paths, size_t n_traces,
                                          int shard_index, int shard_count, const char *shard_extra,
                                          kvt_selection_writer **out)
{
    *out = NULL;
    KVT_RETURN_IF(
        shard_count < 0 || (shard_count && (shard_index < 0 || shard_index >= shard_count)),
        KVT_ERR_INVALID_ARG, "selection export: bad shard %d/%d", shard_index, shard_count);
    kvt_selection_policy *pd = describe(pols, n_pol);
    const char **bt = budget_texts(budgets, n_budgets);
    kvt_status st = !pd || !bt ? kvt_error_set(KVT_ERR_NOMEM, "out of memory")
                               : open_file(path, force, pd, n_pol, bt, n_budgets, trace_paths,
                                           n_traces, shard_index, shard_count, shard_extra, out);
    kvt_free(pd);
    kvt_free(bt);
    return st;
}

kvt_status kvt_selection_writer_open(const char *path, bool force, kvt_policy *const *pols,
                                     size_t n_pol, const kvt_budget *budgets, size_t n_budgets,
                                     const char *const *trace_paths, size_t n_traces,
                                     kvt_selection_writer **out)
{
    return kvt_selection_writer_open_part(path, force, pols, n_pol, budgets, n_budgets, trace_paths,
                                          n_traces, 0, 0, NULL, out);
}

kvt_status kvt_selection_writer_open_like(const char *path, bool force,
                                          const struct kvt_selection_header *h,
                                          kvt_selection_writer **out)
{
    return open_file(path, force, h->policies, h->n_policies, h->budgets, h->n_budgets, h->traces,
                     h->n_traces, 0, 0, NULL, out);
}

static void build_free(layer_build *lb)
{
    for (size_t i = 0; i < lb->n; i++) {
        kvt_free(lb->segs[i].b.p);
        kvt_free(lb->segs[i].last);
    }
    kvt_free(lb->segs);
    sel_hash_free(&lb->by_key);
    memset(lb, 0, sizeof(*lb));
}

static void drop_builds(kvt_selection_writer *w)
{
    for (int l = 0; w->build && l < w->n_layers; l++)
        build_free(&w->build[l]);
    kvt_free(w->build);
    w->build = NULL;
}

static void drop_pending(kvt_selection_writer *w)
{
    drop_builds(w);
    for (int l = 0; w->pending && l < w->n_layers; l++)
        kvt_free(w->pending[l].p);
    kvt_free(w->pending);
    kvt_free(w->ready);
    w->pending = NULL;
    w->ready = NULL;
}

kvt_status kvt_selection_writer_begin_trace(kvt_selection_writer *w, int trace_idx, int n_layers,
                                            const int *budget_tokens)
{
    KVT_RETURN_IF(w->trace >= 0, KVT_ERR_STATE, "selection export: previous trace not ended");
    KVT_RETURN_IF(n_layers < 1, KVT_ERR_INVALID_ARG, "selection export: no layers");
    KVT_RETURN_IF(
        w->kept && (trace_idx < 0 || (size_t)trace_idx >= w->n_traces || w->kept[trace_idx].blocks),
        KVT_ERR_INVALID_ARG, "selection export: trace %d begun twice or unknown", trace_idx);
    w->pending = kvt_calloc((size_t)n_layers, sizeof(buf));
    w->ready = kvt_calloc((size_t)n_layers, sizeof(bool));
    w->build = kvt_calloc((size_t)n_layers, sizeof(layer_build));
    if (!w->pending || !w->ready || !w->build) { /* (all zero: nothing in them to free) */
        kvt_free(w->pending);
        kvt_free(w->ready);
        kvt_free(w->build);
        w->pending = NULL;
        w->ready = NULL;
        w->build = NULL;
        return kvt_error_set(KVT_ERR_NOMEM, "out of memory");
    }
    w->trace = trace_idx;
    w->n_layers = n_layers;
    w->next_layer = 0;
    memcpy(w->btok, budget_tokens, w->n_b * sizeof(int));
    return KVT_OK;
}

static bool put_indices(buf *b, const int32_t *idx, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char x[4];
        put_u32(x, (uint32_t)idx[i]);
        if (!buf_put(b, x, 4))
            return false;
    }
    return true;
}

/* The indices of a[0..na) not in b[0..nb) (both ascending) into out (NULL: count only) */
static size_t set_minus(const int32_t *a, size_t na, const int32_t *b, size_t nb, int32_t *out)
{
    size_t k = 0;
    for (size_t i = 0, j = 0; i < na; i++) {
        while (j < nb && b[j] < a[i])
            j++;
        if (j == nb || b[j] != a[i]) {
            if (out)
                out[k] = a[i];
            k++;
        }
    }
    return k;
}

/* The indices a delta record of r against base holds (removed and added; *n_rm of them
 * removed), or SIZE_MAX without a base */
static size_t delta_size(const kvt_selection_rec *r, const kvt_selection_rec *base, size_t *n_rm)
{
    if (!base)
        return SIZE_MAX;
    *n_rm = set_minus(base->idx, base->n, r->idx, r->n, NULL);
    return *n_rm + set_minus(r->idx, r->n, base->idx, base->n, NULL);
}

/* r as a delta record (flag) against base, of n_rm removed and n_add added tokens (delta_size):
 * its removed tokens, then its added ones */
static bool encode_delta(buf *b, unsigned char *h, const kvt_selection_rec *r,
                         const kvt_selection_rec *base, unsigned flag, size_t n_rm, size_t n_add)
{
    int32_t *d = kvt_malloc((n_rm + n_add ? n_rm + n_add : 1) * sizeof(int32_t));
    if (!d)
        return false;
    set_minus(base->idx, base->n, r->idx, r->n, d);
    set_minus(r->idx, r->n, base->idx, base->n, d + n_rm);
    put_u16(h + 10, (uint32_t)(flag | (h[10] | (unsigned)h[11] << 8)));
    put_u32(h + 28, (uint32_t)(n_rm + n_add));
    put_u32(h + 32, (uint32_t)n_rm);
    bool ok = buf_put(b, h, SEL_REC_BYTES) && put_indices(b, d, n_rm + n_add);
    kvt_free(d);
    return ok;
}

/* Encode r; step_base and budget_base are the records of the step and of the budget before
 * it (same policy, layer, head; NULL where there is none). The binary layout of version 3
 * writes r as its changes from one of them where that is fewer indices than the whole set
 * (the step's on a tie). */
static bool encode(kvt_selection_writer *w, buf *b, const kvt_selection_rec *r,
                   const kvt_selection_rec *step_base, const kvt_selection_rec *budget_base)
{
    unsigned flags = w->pflags[r->policy] & (SEL_FLAG_MERGED | SEL_FLAG_QHEAD);
    if (r->step >= 0)
        flags |= SEL_FLAG_STEP;
    if (w->json) {
        bool ok = buf_printf(b,
                             "{\"trace\":%d,\"policy\":%d,\"budget\":%d,\"budget_tokens\":%d,"
                             "\"layer\":%d,\"head\":%d,\"step\":%d,\"flags\":%u,\"kept\":[",
                             w->trace, r->policy, r->budget, w->btok[r->budget], r->layer, r->head,
                             r->step, flags);
        for (size_t i = 0; ok && i < r->n; i++)
            ok = buf_printf(b, i ? ",%d" : "%d", r->idx[i]);
        return ok && buf_printf(b, "]}");
    }
    unsigned char h[SEL_REC_BYTES];
    put_u32(h, SEL_REC_MAGIC);
    put_u16(h + 4, (uint32_t)w->trace);
    put_u16(h + 6, (uint32_t)r->policy);
    put_u16(h + 8, (uint32_t)r->budget);
    put_u16(h + 10, flags);
    put_u32(h + 12, (uint32_t)r->layer);
    put_u32(h + 16, (uint32_t)r->head);
    put_u32(h + 20, (uint32_t)(int32_t)r->step);
    put_u32(h + 24, (uint32_t)w->btok[r->budget]);
    put_u32(h + 28, (uint32_t)r->n);
    put_u32(h + 32, 0); /* reserved */
    if (w->version >= 3) {
        size_t rs = 0, rb = 0;
        const size_t ns = delta_size(r, step_base, &rs), nb = delta_size(r, budget_base, &rb);
        if (ns < r->n && ns <= nb)
            return encode_delta(b, h, r, step_base, SEL_FLAG_DELTA, rs, ns - rs);
        if (nb < r->n)
            return encode_delta(b, h, r, budget_base, SEL_FLAG_BDELTA, rb, nb - rb);
    }
    return buf_put(b, h, sizeof(h)) && put_indices(b, r->idx, r->n);
}

static kvt_status deliver(kvt_selection_writer *w, int layer, const buf *b);

/* The segment of r's (policy, budget, head) in lb, made where it is new; NULL when out of
 * memory */
static seg *seg_of(layer_build *lb, const kvt_selection_rec *r)
{
    const int k[6] = {0, r->policy, r->budget, 0, r->head, 0};
    int64_t j = lb->n ? sel_hash_get(&lb->by_key, k) : -1;
    if (j >= 0)
        return &lb->segs[j];
    if (lb->n == lb->cap) { /* grow the segments and the table with them */
        const size_t cap = lb->cap ? 2 * lb->cap : 64;
        seg *g = kvt_realloc(lb->segs, cap * sizeof(seg));
        if (!g)
            return NULL;
        lb->segs = g;
        sel_hash h;
        if (!sel_hash_init(&h, cap))
            return NULL;
        for (size_t i = 0; i < lb->n; i++)
            sel_hash_put(&h, (const int[6]){0, g[i].policy, g[i].budget, 0, g[i].head, 0},
                         (int64_t)i);
        sel_hash_free(&lb->by_key);
        lb->by_key = h;
        lb->cap = cap;
    }
    seg *sg = &lb->segs[lb->n];
    memset(sg, 0, sizeof(*sg));
    sg->policy = r->policy, sg->budget = r->budget, sg->head = r->head;
    sel_hash_put(&lb->by_key, k, (int64_t)lb->n++);
    return sg;
}

/* keys x and y of n ints in lexicographic order */
static int cmp_keys(const int *x, const int *y, int n)
{
    for (int i = 0; i < n; i++)
        if (x[i] != y[i])
            return (x[i] > y[i]) - (x[i] < y[i]);
    return 0;
}

/* records in the file's order within a layer: policy, budget, head, step */
static int cmp_rec(const void *a, const void *b)
{
    const kvt_selection_rec *x = *(const kvt_selection_rec *const *)a,
                            *y = *(const kvt_selection_rec *const *)b;
    const int c = cmp_keys((const int[4]){x->policy, x->budget, x->head, x->step},
                           (const int[4]){y->policy, y->budget, y->head, y->step}, 4);
    return c ? c : (x > y) - (x < y); /* (one key twice: in the call's order) */
}

/* x and y are records of one segment (policy, budget, head) */
static bool same_seg(const kvt_selection_rec *x, const kvt_selection_rec *y)
{
    return x->policy == y->policy && x->budget == y->budget && x->head == y->head;
}

/* Encode one call's records into their segments of lb. A record's base is the record of the
 * step before it (in the call, or the latest step of an earlier call) or of the budget before
 * it (in the call); either comes before it in the file, which orders a layer by policy,
 * budget, head and step. */
static bool build_add(kvt_selection_writer *w, layer_build *lb, const kvt_selection_rec *recs,
                      size_t n)
{
    const bool bases = !w->json && w->version >= 3;
    const kvt_selection_rec **ord = kvt_malloc((n + 1) * sizeof(*ord));
    sel_hash hs = {0}; /* the call's records by key: a budget base is among them */
    bool ok = ord && (!bases || sel_hash_init(&hs, n));
    for (size_t i = 0; ok && i < n; i++) {
        ord[i] = &recs[i];
        if (bases)
            sel_hash_put(
                &hs,
                (const int[6]){0, recs[i].policy, recs[i].budget, 0, recs[i].head, recs[i].step},
                (int64_t)i);
    }
    if (ok)
        qsort(ord, n, sizeof(*ord), cmp_rec); /* each segment's records in a run, steps in order */
    seg *sg = NULL;
    for (size_t i = 0; ok && i < n; i++) {
        const kvt_selection_rec *r = ord[i], *sb = NULL, *bb = NULL;
        const bool first = !i || !same_seg(ord[i - 1], r);
        if (first && !(sg = seg_of(lb, r))) {
            ok = false;
            break;
        }
        kvt_selection_rec carried = {.idx = sg->last, .n = sg->last_n};
        if (bases && r->step >= 0 && !first && ord[i - 1]->step == r->step - 1)
            sb = ord[i - 1];
        else if (bases && r->step >= 0 && first && sg->b.n_recs && sg->last_step == r->step - 1)
            sb = &carried;
        const int64_t jb = bases && r->budget >= 1
                               ? sel_hash_get(&hs, (const int[6]){0, r->policy, r->budget - 1, 0,
                                                                  r->head, r->step})
                               : -1;
        bb = jb >= 0 ? &recs[jb] : NULL;
        if (w->json && sg->b.n_recs)
            ok = buf_put(&sg->b, ",\n", 2);
        ok = ok && encode(w, &sg->b, r, sb, bb);
        sg->b.n_recs++;
        const bool end = i + 1 == n || !same_seg(ord[i + 1], r);
        if (ok && bases && end) { /* the segment's latest set, for the next call's first step */
            if (r->n > sg->last_cap) {
                int32_t *g = kvt_realloc(sg->last, r->n * sizeof(int32_t));
                ok = g != NULL;
                if (g)
                    sg->last = g, sg->last_cap = r->n;
            }
            if (ok && r->n)
                memcpy(sg->last, r->idx, r->n * sizeof(int32_t));
            sg->last_n = r->n;
            sg->last_step = r->step;
        }
    }
    sel_hash_free(&hs);
    kvt_free(ord);
    return ok;
}

static int cmp_seg(const void *a, const void *b)
{
    const seg *x = *(const seg *const *)a, *y = *(const seg *const *)b;
    return cmp_keys((const int[3]){x->policy, x->budget, x->head},
                    (const int[3]){y->policy, y->budget, y->head}, 3);
}

/* lb's segments in file order into *out (its bytes and record count) */
static bool build_join(const kvt_selection_writer *w, layer_build *lb, buf *out)
{
    memset(out, 0, sizeof(*out));
    seg **ord = kvt_malloc((lb->n + 1) * sizeof(*ord));
    size_t bytes = 0;
    for (size_t i = 0; ord && i < lb->n; i++) {
        ord[i] = &lb->segs[i];
        bytes += lb->segs[i].b.n + 2;
    }
    bool ok = ord && (!bytes || (out->p = kvt_malloc(bytes)) != NULL);
    if (ok) {
        out->cap = bytes;
        qsort(ord, lb->n, sizeof(*ord), cmp_seg);
    }
    for (size_t i = 0; ok && i < lb->n; i++) {
        const buf *b = &ord[i]->b;
        if (w->json && out->n_recs && b->n_recs)
            ok = buf_put(out, ",\n", 2);
        ok = ok && buf_put(out, b->p, b->n);
        out->n_recs += b->n_recs;
    }
    kvt_free(ord);
    if (!ok) {
        kvt_free(out->p);
        memset(out, 0, sizeof(*out));
    }
    return ok;
}

kvt_status kvt_selection_writer_sink(void *writer, int layer, const kvt_selection_rec *recs,
                                     size_t n_recs, bool last)
{
    kvt_selection_writer *w = writer;
    KVT_RETURN_IF(w->trace < 0 || layer < 0 || layer >= w->n_layers, KVT_ERR_STATE,
                  "selection export: layer %d outside the current trace", layer);
    layer_build *lb = &w->build[layer];
    buf b;
    const bool ok = build_add(w, lb, recs, n_recs) && (!last || build_join(w, lb, &b));
    if (!ok || last)
        build_free(lb);
    if (!ok)
        return kvt_error_set(KVT_ERR_NOMEM, "selection export: out of memory");
    return last ? deliver(w, layer, &b) : KVT_OK;
}

/* Take the encoded layer b (ownership too); a file writer writes every layer that is next in
 * order, a blocks writer keeps it for end_trace */
static kvt_status deliver(kvt_selection_writer *w, int layer, const buf *b)
{
    pthread_mutex_lock(&w->mu);
    if (w->ready[layer]) { /* delivered twice: keep the first */
        pthread_mutex_unlock(&w->mu);
        kvt_free(b->p);
        return kvt_error_set(KVT_ERR_STATE, "selection export: layer %d delivered twice", layer);
    }
    w->pending[layer] = *b;
    w->ready[layer] = true;
    while (!w->kept && !w->err && w->next_layer < w->n_layers && w->ready[w->next_layer]) {
        buf *p = &w->pending[w->next_layer];
        bool wok = true;
        if (w->json && p->n > 0) {
            if (!w->first_json_rec)
                wok = fputs(",\n", w->f) >= 0;
            w->first_json_rec = false;
        }
        if (wok && p->n > 0)
            wok = fwrite(p->p, 1, p->n, w->f) == p->n;
        w->n_records += p->n_recs;
        if (!wok) {
            w->err = KVT_ERR_IO;
            snprintf(w->err_msg, sizeof(w->err_msg),
                     "selection export: cannot write %s: %s (an existing %s is unchanged)", w->path,
                     strerror(errno), w->path);
        }
        kvt_free(p->p);
        memset(p, 0, sizeof(*p));
        w->next_layer++;
    }
    kvt_status st = w->err;
    pthread_mutex_unlock(&w->mu);
    return st ? kvt_error_set(st, "%s", w->err_msg) : KVT_OK;
}

kvt_status kvt_selection_writer_begin_trace_part(kvt_selection_writer *w, int trace_idx,
                                                 int n_layers, const int *budget_tokens,
                                                 const uint8_t *mask)
{
    KVT_FORWARD(kvt_selection_writer_begin_trace(w, trace_idx, n_layers, budget_tokens));
    for (int l = 0; mask && l < n_layers; l++) {
        buf none = {0}; /* another shard's layer: nothing of it here */
        if (!mask[l])
            KVT_FORWARD(deliver(w, l, &none));
    }
    return KVT_OK;
}

kvt_status kvt_selection_writer_put_block(kvt_selection_writer *w, int layer, char *bytes, size_t n,
                                          size_t n_recs)
{
    buf b = {.p = bytes, .n = n, .cap = n, .n_recs = n_recs};
    if (w->kept || w->trace < 0 || layer < 0 || layer >= w->n_layers) {
        kvt_free(bytes);
        return kvt_error_set(KVT_ERR_STATE, "selection export: layer %d outside the current trace",
                             layer);
    }
    return deliver(w, layer, &b);
}

kvt_status kvt_selection_writer_take_block(kvt_selection_writer *w, int trace, int layer,
                                           char **bytes, size_t *n, size_t *n_recs)
{
    *bytes = NULL;
    *n = *n_recs = 0;
    kept_trace *k = w->kept && trace >= 0 && (size_t)trace < w->n_traces ? &w->kept[trace] : NULL;
    KVT_RETURN_IF(!k || layer < 0 || layer >= k->n_layers || !k->ready[layer], KVT_ERR_NOT_FOUND,
                  "selection export: no layer %d of trace %d here", layer, trace);
    *bytes = k->blocks[layer].p;
    *n = k->blocks[layer].n;
    *n_recs = k->blocks[layer].n_recs;
    memset(&k->blocks[layer], 0, sizeof(buf));
    k->ready[layer] = false;
    return KVT_OK;
}

kvt_status kvt_selection_writer_end_trace(kvt_selection_writer *w)
{
    KVT_RETURN_IF(w->trace < 0, KVT_ERR_STATE, "selection export: no trace begun");
    if (w->kept) { /* blocks mode: the layers that came are kept, whichever they are */
        kept_trace *k = &w->kept[w->trace];
        k->blocks = w->pending;
        k->ready = w->ready;
        k->n_layers = w->n_layers;
        drop_builds(w);
        w->pending = NULL;
        w->ready = NULL;
        w->trace = -1;
        w->n_traces_done++;
        return KVT_OK;
    }
    bool complete = w->next_layer == w->n_layers;
    drop_pending(w);
    w->trace = -1;
    KVT_RETURN_IF(w->err, w->err, "%s", w->err_msg);
    KVT_RETURN_IF(!complete, KVT_ERR_STATE, "selection export: trace ended with layers missing");
    w->n_traces_done++;
    return KVT_OK;
}

/* Finish the temporary file and rename it over the final name; on any failure remove it. */
static kvt_status commit(kvt_selection_writer *w)
{
    kvt_status st = KVT_OK;
    int err = 0;
    unsigned char end[16]; /* binary: "KEND", reserved, u64 record count */
    put_u32(end, SEL_END_MAGIC);
    put_u32(end + 4, 0);
    put_u32(end + 8, (uint32_t)w->n_records);
    put_u32(end + 12, (uint32_t)(w->n_records >> 32));
    bool ok = (w->json ? fputs("\n]}\n", w->f) >= 0 : fwrite(end, 1, 16, w->f) == 16) &&
              fflush(w->f) == 0 && fsync(fileno(w->f)) == 0;
    if (!ok)
        err = errno;
    if (fclose(w->f) != 0 && ok) {
        ok = false;
        err = errno;
    }
    w->f = NULL;
    if (!ok)
        st = kvt_error_set(KVT_ERR_IO,
                           "selection export: cannot write %s: %s (an existing %s is unchanged)",
                           w->path, strerror(err), w->path);
    else if (rename(w->tmp, w->path) != 0)
        st = kvt_error_set(KVT_ERR_IO, "selection export: cannot rename %s to %s: %s", w->tmp,
                           w->path, strerror(errno));
    if (st) {
        remove(w->tmp);
        return st;
    }
    kvt_fsync_dir_of(w->path); /* make the rename durable */
    return KVT_OK;
}

/* close, publishing the export only when `publish` and it is complete */
static kvt_status writer_close(kvt_selection_writer *w, bool publish)
{
    if (!w)
        return KVT_OK;
    kvt_status st = w->err;
    if (w->f) {
        if (publish && st == KVT_OK && w->trace < 0 && w->n_traces_done == w->n_traces) {
            st = commit(w);
        } else { /* failed, incomplete or discarded: nothing is published */
            fclose(w->f);
            remove(w->tmp);
            if (!publish)
                st = KVT_OK;
            else if (st)
                kvt_error_set(st, "%s", w->err_msg);
            else
                st = kvt_error_set(KVT_ERR_STATE,
                                   "selection export: %zu of %zu traces complete; %s not written",
                                   w->n_traces_done, w->n_traces, w->path);
        }
        w->f = NULL;
    }
    drop_pending(w);
    for (size_t t = 0; w->kept && t < w->n_traces; t++) {
        for (int l = 0; l < w->kept[t].n_layers; l++)
            kvt_free(w->kept[t].blocks[l].p);
        kvt_free(w->kept[t].blocks);
        kvt_free(w->kept[t].ready);
    }
    kvt_free(w->kept);
    kvt_free(w->path);
    kvt_tmp_forget(w->tmp);
    kvt_free(w->tmp);
    pthread_mutex_destroy(&w->mu);
    kvt_free(w->pflags);
    kvt_free(w->btok);
    kvt_free(w);
    return st;
}

kvt_status kvt_selection_writer_close(kvt_selection_writer *w)
{
    return writer_close(w, true);
}

void kvt_selection_writer_discard(kvt_selection_writer *w)
{
    writer_close(w, false);
}
