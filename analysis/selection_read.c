/* selection_read.c - the reader of the selection export (`--export-selection FILE`, written by
 * selection_export.c): the binary layout or the JSON one of RESULTS.md, read whole into an owned
 * kvt_selection with the header, every record in file order and a sorted index for lookups by
 * (trace, policy, budget, layer, head, step). This is what a user's engine loads. Every length,
 * count, index and offset is checked against the file before use, so a truncated or damaged
 * file gives KVT_ERR_CORRUPT naming what is wrong and where. A delta record (version 3: a set
 * as its changes from the step's or the budget's before) is checked at open by applying it to
 * its base, but kept as its changes in the file's bytes, which stay in memory: only the whole
 * records and one set in every SEL_CHECKPOINT of a delta chain are held whole. The others are
 * expanded on access, from the nearest set held whole or from the chain's last set expanded
 * (a walk in file order, or by step over every head, applies one delta a record).
 */
#include <errno.h>
#include <limits.h>
#include <pthread.h>
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
#define SEL_END_MAGIC 0x444E454Bu /* "KEND" */
#define SEL_END_BYTES 16u
#define SEL_FIX_BYTES 16u
#define SEL_REC_BYTES 36u
#define SEL_MAX_LIST  65535u /* u16 indices in the records */
/* a delta record this many links from its chain's whole record is held whole: expanding any
 * record applies at most SEL_CHECKPOINT - 1 deltas, and the held sets are about 1/32 of them
 * all */
#define SEL_CHECKPOINT 32
/* the last set expanded in each delta chain is kept for the chain's next (a walk by step
 * over every head, as kvtrace.hf.e2e reads an export, comes back to each chain once a round);
 * all dropped when they pass this many bytes */
#define SEL_CACHE_BYTES ((size_t)64 << 20)

/* A delta chain's last set expanded, under the chain's first record not held (a held set's
 * step chain and budget chain are two chains) */
typedef struct sel_cached {
    size_t anc;    /* that record; SIZE_MAX: an empty slot */
    size_t rec, n; /* the record whose set it holds, and its size */
    size_t cap;
    int32_t *set; /* [cap] */
} sel_cached;

/* The shape of the records of one (trace, policy), for kvt_selection_shape */
typedef struct sel_shape {
    int trace, policy;
    int layers, heads, steps;
} sel_shape;

/* A record's lookup key, kept next to its number so that qsort needs no outside state. */
typedef struct sel_key {
    int k[6]; /* trace, policy, budget, layer, head, step */
    size_t rec;
} sel_key;

struct kvt_selection {
    kvt_selection_header hdr;
    char *generator;
    char *shard_settings;
    kvt_selection_policy *pols; /* [n_policies]; label and name owned */
    char **budgets;             /* [n_budgets] */
    char **traces;              /* [n_traces] */
    kvt_selection_record *recs; /* [n_records] in file order; idx NULL: a delta record's set,
                                   not held (expanded on access) */
    sel_key *order;             /* [n_records] keys and record numbers, sorted */
    struct sel_shape *shapes;   /* [n_shapes] each (trace, policy) with a record, in order */
    size_t n_shapes;
    int32_t *idx; /* the sets held whole, one block */
    /* delta records (binary layout): the file's bytes, each record's offset and base */
    unsigned char *file;
    size_t *off;   /* [n_records] */
    int64_t *base; /* [n_records] the record a delta record changes (the first before it
                      with a change); -1: a whole record; -2 - j: the same set as record j */
    size_t n_lazy; /* records whose set is not held: the accessors lock mu */
    size_t max_n;  /* the largest set */
    pthread_mutex_t mu;
    int32_t *tmp[2]; /* [max_n] each: the sets between the held one and the one asked for */
    struct sel_cached *cache; /* [cache_mask + 1] by the chain's held record, open addressing */
    size_t cache_mask, cache_used, cache_bytes;
    int32_t **memo; /* sets expanded for kvt_selection_record_at and _find, held until free */
    size_t n_memo, cap_memo;
};

static uint32_t rd32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static unsigned rd16(const unsigned char *p)
{
    return (unsigned)p[0] | (unsigned)p[1] << 8;
}

void kvt_selection_free(kvt_selection *s)
{
    if (!s)
        return;
    for (size_t i = 0; s->pols && i < s->hdr.n_policies; i++) {
        kvt_free((char *)s->pols[i].label);
        kvt_free((char *)s->pols[i].name);
    }
    for (size_t i = 0; s->budgets && i < s->hdr.n_budgets; i++)
        kvt_free(s->budgets[i]);
    for (size_t i = 0; s->traces && i < s->hdr.n_traces; i++)
        kvt_free(s->traces[i]);
    kvt_free(s->pols);
    kvt_free(s->budgets);
    kvt_free(s->traces);
    kvt_free(s->generator);
    kvt_free(s->shard_settings);
    kvt_free(s->recs);
    kvt_free(s->order);
    kvt_free(s->shapes);
    kvt_free(s->idx);
    kvt_free(s->file);
    kvt_free(s->off);
    kvt_free(s->base);
    kvt_free(s->tmp[0]);
    kvt_free(s->tmp[1]);
    for (size_t c = 0; s->cache && c <= s->cache_mask; c++)
        kvt_free(s->cache[c].set);
    kvt_free(s->cache);
    for (size_t i = 0; i < s->n_memo; i++)
        kvt_free(s->memo[i]);
    kvt_free(s->memo);
    pthread_mutex_destroy(&s->mu);
    kvt_free(s);
}

/* Read the whole regular file: *n bytes, NUL-terminated (for the JSON parser). */
static kvt_status slurp(const char *path, unsigned char **out, size_t *n)
{
    *out = NULL;
    FILE *f = kvt_fopen_regular(path);
    KVT_RETURN_IF(!f, KVT_ERR_IO, "%s", kvt_open_error(path));
    kvt_status st = KVT_OK;
    struct stat sb;
    if (fstat(fileno(f), &sb) != 0 || sb.st_size < 0) { /* a regular file: for its size */
        st = kvt_error_set(KVT_ERR_IO, "%s: %s", path, strerror(errno));
        goto out_close;
    }
    size_t len = (size_t)sb.st_size;
    unsigned char *b = len < SIZE_MAX ? kvt_malloc(len + 1) : NULL;
    if (!b) {
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory reading %s (%zu bytes)", path, len);
        goto out_close;
    }
    if (fread(b, 1, len, f) != len) {
        kvt_free(b);
        st = kvt_error_set(KVT_ERR_IO, "cannot read %s: %s", path,
                           ferror(f) ? strerror(errno) : "file shrank while reading");
        goto out_close;
    }
    b[len] = 0;
    *out = b;
    *n = len;
out_close:
    fclose(f);
    return st;
}

/* ---- header (the JSON object of both layouts) ---- */

static kvt_status dup_str(const cJSON *j, char **dst, const char *path, const char *what)
{
    KVT_RETURN_IF(!cJSON_IsString(j) || !j->valuestring, KVT_ERR_CORRUPT,
                  "%s: selection header: %s is not a string", path, what);
    *dst = kvt_strdup(j->valuestring);
    KVT_RETURN_IF(!*dst, KVT_ERR_NOMEM, "out of memory");
    return KVT_OK;
}

static kvt_status get_bool(const cJSON *o, const char *key, bool *out, const char *path, size_t i)
{
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(o, key);
    KVT_RETURN_IF(!cJSON_IsBool(j), KVT_ERR_CORRUPT,
                  "%s: selection header: policies[%zu].%s is not a boolean", path, i, key);
    *out = cJSON_IsTrue(j);
    return KVT_OK;
}

static kvt_status get_list(const cJSON *h, const char *key, const cJSON **arr, size_t *n,
                           const char *path)
{
    *arr = cJSON_GetObjectItemCaseSensitive(h, key);
    KVT_RETURN_IF(!cJSON_IsArray(*arr), KVT_ERR_CORRUPT,
                  "%s: selection header: \"%s\" is missing or not an array", path, key);
    int sz = cJSON_GetArraySize(*arr);
    KVT_RETURN_IF(sz < 0 || (unsigned)sz > SEL_MAX_LIST, KVT_ERR_CORRUPT,
                  "%s: selection header: %d %s (at most %u)", path, sz, key, SEL_MAX_LIST);
    *n = (size_t)sz;
    return KVT_OK;
}

static kvt_status read_strings(const cJSON *arr, size_t n, char ***dst, const char *path,
                               const char *key)
{
    *dst = kvt_calloc(n ? n : 1, sizeof(char *));
    KVT_RETURN_IF(!*dst, KVT_ERR_NOMEM, "out of memory");
    size_t i = 0;
    char what[64];
    for (const cJSON *j = arr->child; j && i < n; j = j->next, i++) {
        snprintf(what, sizeof(what), "%s[%zu]", key, i);
        KVT_FORWARD(dup_str(j, &(*dst)[i], path, what));
    }
    return KVT_OK;
}

/* Fill s->hdr and the lists from the parsed header object. */
static kvt_status read_header(kvt_selection *s, const cJSON *h, const char *path, int version)
{
    KVT_RETURN_IF(!cJSON_IsObject(h), KVT_ERR_CORRUPT, "%s: selection header is not a JSON object",
                  path);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(h, "selection_version");
    double vd = cJSON_IsNumber(v) ? v->valuedouble : 0; /* range first: (int) of 1e24 is UB */
    KVT_RETURN_IF(!(vd >= 1 && vd <= INT32_MAX) || vd != (double)(int)vd, KVT_ERR_CORRUPT,
                  "%s: selection header: selection_version is missing or not an integer >= 1",
                  path);
    KVT_RETURN_IF((int)vd > KVT_SELECTION_VERSION, KVT_ERR_VERSION,
                  "%s: selection_version %d is newer than this reader's %d (HINT: update kvtrace)",
                  path, (int)vd, KVT_SELECTION_VERSION);
    KVT_RETURN_IF(version > 0 && (int)vd != version, KVT_ERR_CORRUPT,
                  "%s: selection header says version %d, the file header %d", path, (int)vd,
                  version);
    s->hdr.selection_version = (int)vd;
    const cJSON *g = cJSON_GetObjectItemCaseSensitive(h, "generator");
    KVT_FORWARD(dup_str(g, &s->generator, path, "generator"));
    s->hdr.generator = s->generator;

    const cJSON *pl, *bl, *tl;
    size_t np = 0, nb = 0, nt = 0;
    KVT_FORWARD(get_list(h, "policies", &pl, &np, path));
    KVT_FORWARD(get_list(h, "budgets", &bl, &nb, path));
    KVT_FORWARD(get_list(h, "traces", &tl, &nt, path));
    s->pols = kvt_calloc(np ? np : 1, sizeof(*s->pols));
    KVT_RETURN_IF(!s->pols, KVT_ERR_NOMEM, "out of memory");
    s->hdr.n_policies = np;
    s->hdr.policies = s->pols;
    size_t i = 0;
    for (const cJSON *o = pl->child; o && i < np; o = o->next, i++) {
        kvt_selection_policy *p = &s->pols[i];
        KVT_RETURN_IF(!cJSON_IsObject(o), KVT_ERR_CORRUPT,
                      "%s: selection header: policies[%zu] is not an object", path, i);
        char what[64];
        snprintf(what, sizeof(what), "policies[%zu].label", i);
        KVT_FORWARD(
            dup_str(cJSON_GetObjectItemCaseSensitive(o, "label"), (char **)&p->label, path, what));
        snprintf(what, sizeof(what), "policies[%zu].name", i);
        KVT_FORWARD(
            dup_str(cJSON_GetObjectItemCaseSensitive(o, "name"), (char **)&p->name, path, what));
        const cJSON *gr = cJSON_GetObjectItemCaseSensitive(o, "granularity");
        const char *gs = cJSON_GetStringValue(gr);
        KVT_RETURN_IF(!gs || (strcmp(gs, "query_head") && strcmp(gs, "kv_head")), KVT_ERR_CORRUPT,
                      "%s: selection header: policies[%zu].granularity is not \"query_head\" or "
                      "\"kv_head\"",
                      path, i);
        p->query_heads = !strcmp(gs, "query_head");
        KVT_FORWARD(get_bool(o, "per_step", &p->per_step, path, i));
        KVT_FORWARD(get_bool(o, "merged", &p->merged, path, i));
    }
    s->hdr.n_budgets = nb; /* set first: kvt_selection_free frees what a failure leaves */
    KVT_FORWARD(read_strings(bl, nb, &s->budgets, path, "budgets"));
    s->hdr.budgets = (const char *const *)s->budgets;
    s->hdr.n_traces = nt;
    KVT_FORWARD(read_strings(tl, nt, &s->traces, path, "traces"));
    s->hdr.traces = (const char *const *)s->traces;
    const cJSON *sh = cJSON_GetObjectItemCaseSensitive(h, "shard");
    if (sh) { /* a part of replay --shard I/N */
        const cJSON *si = cJSON_GetObjectItemCaseSensitive(sh, "index"),
                    *sc = cJSON_GetObjectItemCaseSensitive(sh, "count");
        double di = cJSON_IsNumber(si) ? si->valuedouble : -1,
               dc = cJSON_IsNumber(sc) ? sc->valuedouble : -1;
        KVT_RETURN_IF(!(dc >= 1 && dc <= 1000000 && di >= 0 && di < dc) || di != (double)(int)di ||
                          dc != (double)(int)dc,
                      KVT_ERR_CORRUPT,
                      "%s: selection header: shard is not {\"index\": I, \"count\": N} with "
                      "0 <= I < N",
                      path);
        s->hdr.shard_index = (int)di;
        s->hdr.shard_count = (int)dc;
        cJSON *rest = cJSON_Duplicate(sh, true); /* what every part must share */
        cJSON_DeleteItemFromObjectCaseSensitive(rest, "index");
        char *txt = rest ? cJSON_PrintUnformatted(rest) : NULL;
        cJSON_Delete(rest);
        s->shard_settings = txt ? kvt_strdup(txt) : NULL;
        cJSON_free(txt);
        KVT_RETURN_IF(!s->shard_settings, KVT_ERR_NOMEM, "out of memory");
        s->hdr.shard_settings = s->shard_settings;
    }
    return KVT_OK;
}

/* ---- records ---- */

/* Check one record's fields against the header; where names the record for messages. */
static kvt_status check_record(const kvt_selection *s, const kvt_selection_record *r,
                               const char *path, const char *where)
{
    KVT_RETURN_IF(r->trace < 0 || (size_t)r->trace >= s->hdr.n_traces, KVT_ERR_CORRUPT,
                  "%s: %s: trace %d outside the header's %zu traces", path, where, r->trace,
                  s->hdr.n_traces);
    KVT_RETURN_IF(r->policy < 0 || (size_t)r->policy >= s->hdr.n_policies, KVT_ERR_CORRUPT,
                  "%s: %s: policy %d outside the header's %zu policies", path, where, r->policy,
                  s->hdr.n_policies);
    KVT_RETURN_IF(r->budget < 0 || (size_t)r->budget >= s->hdr.n_budgets, KVT_ERR_CORRUPT,
                  "%s: %s: budget %d outside the header's %zu budgets", path, where, r->budget,
                  s->hdr.n_budgets);
    KVT_RETURN_IF(r->layer < 0 || r->head < 0 || r->step < -1, KVT_ERR_CORRUPT,
                  "%s: %s: negative layer %d, head %d or step %d", path, where, r->layer, r->head,
                  r->step);
    KVT_RETURN_IF(r->layer == INT_MAX || r->head == INT_MAX || r->step == INT_MAX, KVT_ERR_CORRUPT,
                  "%s: %s: layer, head or step is 2^31-1", path, where);
    KVT_RETURN_IF(r->budget_tokens < 1, KVT_ERR_CORRUPT, "%s: %s: budget_tokens %d < 1", path,
                  where, r->budget_tokens);
    const kvt_selection_policy *p = &s->pols[r->policy];
    unsigned want = (r->step >= 0 ? KVT_SELECTION_FLAG_STEP : 0) |
                    (p->merged ? KVT_SELECTION_FLAG_MERGED : 0) |
                    (p->query_heads ? KVT_SELECTION_FLAG_QHEAD : 0);
    KVT_RETURN_IF(r->flags != want, KVT_ERR_CORRUPT,
                  "%s: %s: flags 0x%x, but step %d and policy %d (%s) give 0x%x", path, where,
                  r->flags, r->step, r->policy, p->label, want);
    KVT_RETURN_IF(r->step >= 0 && !p->per_step, KVT_ERR_CORRUPT,
                  "%s: %s: decode step %d for policy %d (%s), which is not per-step", path, where,
                  r->step, r->policy, p->label);
    return KVT_OK;
}

static kvt_status check_indices(const int32_t *idx, size_t n, const char *path, const char *where)
{
    for (size_t i = 0; i < n; i++) {
        KVT_RETURN_IF(idx[i] < 0, KVT_ERR_CORRUPT, "%s: %s: index %zu is negative or above 2^31-1",
                      path, where, i);
        KVT_RETURN_IF(i > 0 && idx[i] <= idx[i - 1], KVT_ERR_CORRUPT,
                      "%s: %s: indices not ascending at %zu (%d after %d)", path, where, i, idx[i],
                      idx[i - 1]);
    }
    return KVT_OK;
}

static kvt_status alloc_records(kvt_selection *s, size_t n_rec)
{
    s->recs = kvt_calloc(n_rec ? n_rec : 1, sizeof(*s->recs));
    s->order = kvt_calloc(n_rec ? n_rec : 1, sizeof(*s->order));
    KVT_RETURN_IF(!s->recs || !s->order, KVT_ERR_NOMEM, "out of memory");
    s->hdr.n_records = n_rec;
    return KVT_OK;
}

static kvt_status alloc_indices(kvt_selection *s, size_t n_idx)
{
    s->idx = kvt_calloc(n_idx ? n_idx : 1, sizeof(*s->idx));
    KVT_RETURN_IF(!s->idx, KVT_ERR_NOMEM, "out of memory");
    return KVT_OK;
}

/* Index k of the raw list at p; above 2^31-1 reads as -1, which check_raw refuses */
static int32_t raw_idx(const unsigned char *p, size_t k)
{
    uint32_t x = rd32(p + 4 * k);
    return x > INT32_MAX ? -1 : (int32_t)x;
}

static kvt_status check_raw(const unsigned char *p, size_t n, const char *path, const char *where,
                            const char *what)
{
    for (size_t i = 0; i < n; i++) {
        int32_t x = raw_idx(p, i);
        KVT_RETURN_IF(x < 0, KVT_ERR_CORRUPT, "%s: %s: %s index %zu is above 2^31-1", path, where,
                      what, i);
        KVT_RETURN_IF(i > 0 && x <= raw_idx(p, i - 1), KVT_ERR_CORRUPT,
                      "%s: %s: %s indices not ascending at %zu (%d after %d)", path, where, what, i,
                      x, raw_idx(p, i - 1));
    }
    return KVT_OK;
}

/* A delta record (its n_rm removed then its added indices at p) applied to its base's set
 * bidx[bn], an earlier record's (what: "step S" or "budget B", for messages), into dst (room
 * for bn - n_rm + n_add): the base's set without the removed tokens, with the added ones,
 * ascending. */
static kvt_status apply_delta(const int32_t *bidx, size_t bn, const unsigned char *p, size_t n_rm,
                              size_t n_add, int32_t *dst, const char *path, const char *where,
                              const char *what)
{
    KVT_FORWARD(check_raw(p, n_rm, path, where, "removed"));
    KVT_FORWARD(check_raw(p + 4 * n_rm, n_add, path, where, "added"));
    const unsigned char *add = p + 4 * n_rm;
    size_t a = 0, rm = 0, ad = 0, k = 0, cap = bn - n_rm + n_add; /* n_rm <= bn */
    while (a < bn || ad < n_add) {
        bool take_add = ad < n_add && (a == bn || raw_idx(add, ad) < bidx[a]);
        bool drop = !take_add && rm < n_rm && raw_idx(p, rm) == bidx[a];
        /* more entries than the count: a removed token was not found */
        KVT_RETURN_IF(!drop && k == cap, KVT_ERR_CORRUPT,
                      "%s: %s: removes a token which %s's set does not hold", path, where, what);
        if (take_add) {
            dst[k++] = raw_idx(add, ad++);
            continue;
        }
        KVT_RETURN_IF(ad < n_add && raw_idx(add, ad) == bidx[a], KVT_ERR_CORRUPT,
                      "%s: %s: adds token %d, which %s's set holds", path, where, bidx[a], what);
        KVT_RETURN_IF(rm < n_rm && raw_idx(p, rm) < bidx[a], KVT_ERR_CORRUPT,
                      "%s: %s: removes token %d, which %s's set does not hold", path, where,
                      raw_idx(p, rm), what);
        if (drop)
            rm++, a++;
        else
            dst[k++] = bidx[a++];
    }
    KVT_RETURN_IF(rm < n_rm, KVT_ERR_CORRUPT,
                  "%s: %s: removes token %d, which %s's set does not hold", path, where,
                  raw_idx(p, rm), what);
    return KVT_OK;
}

/* A delta record's base: the record of the step (flag 8) or the budget (flag 16) before it,
 * same trace, policy, layer and head, earlier in the file; -1 if there is none */
static int64_t delta_base(const sel_hash *h, const kvt_selection_record *r, unsigned flag)
{
    const bool step = flag == KVT_SELECTION_FLAG_DELTA;
    const int k[6] = {r->trace, r->policy, r->budget - !step, r->layer, r->head, r->step - step};
    return sel_hash_get(h, k);
}

/* The records of the binary layout from byte `off` to the end, in three passes: the framing
 * of every record against the file size (and the end record); then the fields, each checked,
 * and each set's size (a delta record's: its base's less the removed, plus the added; the
 * base found by key among the records before it); then the indices: a whole record's copied,
 * a delta record's applied to its base's set (held whole, or live until its last delta record
 * is read) and kept only every SEL_CHECKPOINT links of its chain. */
static kvt_status read_binary_records(kvt_selection *s, const unsigned char *b, size_t size,
                                      size_t off, uint32_t version, const char *path)
{
    size_t n_rec = 0;
    bool ended = false;
    for (size_t o = off; o < size; n_rec++) {
        if (version >= 2 && size - o >= 4 && rd32(b + o) == SEL_END_MAGIC) {
            /* the end record: last in the file, and it counts the records before it */
            KVT_RETURN_IF(size - o != SEL_END_BYTES, KVT_ERR_CORRUPT,
                          "%s: end record at byte %zu: %zu bytes from it to the end of the file, "
                          "want %u",
                          path, o, size - o, SEL_END_BYTES);
            uint64_t cnt = (uint64_t)rd32(b + o + 8) | (uint64_t)rd32(b + o + 12) << 32;
            KVT_RETURN_IF(cnt != n_rec, KVT_ERR_CORRUPT,
                          "%s: end record at byte %zu counts %llu records, the file has %zu", path,
                          o, (unsigned long long)cnt, n_rec);
            size = o;
            ended = true;
            break;
        }
        KVT_RETURN_IF(size - o < SEL_REC_BYTES, KVT_ERR_CORRUPT,
                      "%s: record %zu at byte %zu is truncated: %zu of %u header bytes", path,
                      n_rec, o, size - o, SEL_REC_BYTES);
        KVT_RETURN_IF(rd32(b + o) != SEL_REC_MAGIC, KVT_ERR_CORRUPT,
                      "%s: record %zu at byte %zu: bad record magic 0x%08x (want \"KSEL\")", path,
                      n_rec, o, rd32(b + o));
        size_t cnt = rd32(b + o + 28), left = (size - o - SEL_REC_BYTES) / 4;
        KVT_RETURN_IF(cnt > left, KVT_ERR_CORRUPT,
                      "%s: record %zu at byte %zu is truncated: n = %zu indices, %zu bytes left",
                      path, n_rec, o, cnt, size - o - SEL_REC_BYTES);
        o += SEL_REC_BYTES + 4 * cnt;
    }
    KVT_RETURN_IF(version >= 2 && !ended, KVT_ERR_CORRUPT,
                  "%s: no end record after record %zu (byte %zu): the file was cut short", path,
                  n_rec, size);
    KVT_FORWARD(alloc_records(s, n_rec));
    const size_t n1 = n_rec ? n_rec : 1;
    s->off = kvt_malloc(n1 * sizeof(size_t));
    s->base = kvt_malloc(n1 * sizeof(int64_t));    /* -1: a set held whole */
    uint8_t *depth = kvt_malloc(n1);               /* links from the chain's last set held whole */
    size_t *kids = kvt_calloc(n1, sizeof(size_t)); /* delta records based on it, then left */
    int32_t **live = kvt_calloc(n1, sizeof(int32_t *)); /* sets that later deltas still need */
    sel_hash h = {0};
    kvt_status st = !s->off || !s->base || !depth || !kids || !live || !sel_hash_init(&h, n_rec)
                        ? kvt_error_set(KVT_ERR_NOMEM, "out of memory")
                        : KVT_OK;
    size_t n_idx = 0, n_all = 0, o = off;
    char where[64];
    for (size_t i = 0; i < n_rec && !st; i++) {
        const unsigned char *p = b + o;
        kvt_selection_record *r = &s->recs[i];
        snprintf(where, sizeof(where), "record %zu at byte %zu", i, o);
        r->trace = (int)rd16(p + 4);
        r->policy = (int)rd16(p + 6);
        r->budget = (int)rd16(p + 8);
        r->flags = rd16(p + 10);
        uint32_t layer = rd32(p + 12), head = rd32(p + 16), btok = rd32(p + 24);
        if (layer > INT32_MAX || head > INT32_MAX || btok > INT32_MAX) {
            st = kvt_error_set(KVT_ERR_CORRUPT,
                               "%s: %s: layer %u, head %u or budget_tokens %u above 2^31-1", path,
                               where, layer, head, btok);
            break;
        }
        r->layer = (int)layer;
        r->head = (int)head;
        r->step = (int)(int32_t)rd32(p + 20);
        r->budget_tokens = (int)btok;
        const size_t cnt = rd32(p + 28);
        /* a delta record: flag 8 (the step before) on a decode step, or 16 (the budget before)
           on a budget after the first; the record is given whole, without the flag */
        unsigned delta =
            version >= 3 ? r->flags & (KVT_SELECTION_FLAG_DELTA | KVT_SELECTION_FLAG_BDELTA) : 0;
        if ((delta == KVT_SELECTION_FLAG_DELTA && r->step >= 0) ||
            (delta == KVT_SELECTION_FLAG_BDELTA && r->budget >= 1))
            r->flags &= ~delta;
        else
            delta = 0; /* anything else is left in flags, for check_record to refuse */
        if ((st = check_record(s, r, path, where)))
            break;
        size_t n_set = cnt;
        s->off[i] = o;
        s->base[i] = -1;
        depth[i] = 0;
        if (delta) {
            const size_t n_rm = rd32(p + 32);
            const int64_t j = delta_base(&h, r, delta);
            const bool by_step = delta == KVT_SELECTION_FLAG_DELTA;
            if (j < 0) {
                st = kvt_error_set(KVT_ERR_CORRUPT,
                                   "%s: %s: a delta record of %s %d, but no record of %s %d of "
                                   "the same policy, layer and head comes before it",
                                   path, where, by_step ? "step" : "budget",
                                   by_step ? r->step : r->budget, by_step ? "step" : "budget",
                                   by_step ? r->step - 1 : r->budget - 1);
                break;
            }
            const size_t n_base = s->recs[j].n; /* its expanded size, from this pass */
            if (n_rm > cnt || n_rm > n_base) {
                st = kvt_error_set(KVT_ERR_CORRUPT,
                                   "%s: %s: a delta record removing %zu of its %zu indices from "
                                   "a set of %zu",
                                   path, where, n_rm, cnt, n_base);
                break;
            }
            n_set = n_base - n_rm + (cnt - n_rm);
            const int64_t e = s->base[j] < -1 ? -2 - s->base[j] : j; /* j's set is e's */
            if (cnt == 0) { /* no change: e's set, held if e's is; no link in its chain */
                s->base[i] = -2 - e;
                depth[i] = depth[e];
            } else {
                s->base[i] = e;
                kids[e]++;
                depth[i] = (uint8_t)((depth[e] + 1) % SEL_CHECKPOINT); /* 0: held whole */
            }
        }
        if (n_set > SIZE_MAX / 8 - n_all) {
            st = kvt_error_set(KVT_ERR_NOMEM,
                               "%s: %s: the sets add up to more indices than memory can hold", path,
                               where);
            break;
        }
        r->n = n_set; /* the expanded size */
        n_all += n_set;
        if (depth[i] != 0)
            s->n_lazy++;
        else if (s->base[i] >= -1) /* a whole record, or a delta record held whole */
            n_idx += n_set;
        if (n_set > s->max_n)
            s->max_n = n_set;
        sel_hash_put(&h, (const int[6]){r->trace, r->policy, r->budget, r->layer, r->head, r->step},
                     (int64_t)i);
        o += SEL_REC_BYTES + 4 * cnt;
    }
    sel_hash_free(&h);
    /* refuse before allocating what this machine cannot hold: the sets held whole, the
       records, and the file kept for the delta records */
    double need = 4.0 * (double)n_idx + 96.0 * (double)n_rec + (s->n_lazy ? (double)size : 0),
           mem = (double)sysconf(_SC_PHYS_PAGES) * (double)sysconf(_SC_PAGESIZE);
    if (!st && mem > 0 && need > mem)
        st = kvt_error_set(KVT_ERR_NOMEM,
                           "%s: its %zu kept sets need %.1f GiB held in memory (%.1f GiB whole), "
                           "more than this machine's memory (%.1f GiB)",
                           path, n_rec, need / 1073741824.0,
                           (4.0 * (double)n_all + 96.0 * (double)n_rec) / 1073741824.0,
                           mem / 1073741824.0);
    if (!st)
        st = alloc_indices(s, n_idx);
    int32_t *dst = s->idx, *one = NULL; /* one: a set no later record needs, checked only */
    if (!st && s->n_lazy && !(one = kvt_malloc((s->max_n ? s->max_n : 1) * sizeof(int32_t))))
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
    o = off;
    for (size_t i = 0; i < n_rec && !st; i++) {
        const unsigned char *p = b + o;
        kvt_selection_record *r = &s->recs[i];
        snprintf(where, sizeof(where), "record %zu at byte %zu", i, o);
        const size_t cnt = rd32(p + 28);
        o += SEL_REC_BYTES + 4 * cnt;
        if (s->base[i] < -1) { /* no change from its base: nothing to check */
            if (depth[i] == 0)
                r->idx = s->recs[-2 - s->base[i]].idx;
            continue;
        }
        if (s->base[i] < 0) {
            for (size_t k = 0; k < cnt; k++)
                dst[k] = raw_idx(p + SEL_REC_BYTES, k);
            if ((st = check_indices(dst, cnt, path, where)))
                break;
            r->idx = dst;
            dst += cnt;
            continue;
        }
        /* a delta record: applied to its base's set, which is held whole or live */
        const size_t j = (size_t)s->base[i];
        const kvt_selection_record *bs = &s->recs[j];
        char what[48];
        if (rd16(p + 10) & KVT_SELECTION_FLAG_DELTA)
            snprintf(what, sizeof(what), "step %d", r->step - 1);
        else
            snprintf(what, sizeof(what), "budget %d", r->budget - 1);
        int32_t *out = one;
        if (depth[i] == 0)
            out = dst, dst += r->n;
        else if (kids[i] && !(out = live[i] = kvt_malloc((r->n ? r->n : 1) * sizeof(int32_t)))) {
            st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
            break;
        }
        const size_t n_rm = rd32(p + 32);
        st = apply_delta(bs->idx ? bs->idx : live[j], bs->n, p + SEL_REC_BYTES, n_rm, cnt - n_rm,
                         out, path, where, what);
        if (depth[i] == 0)
            r->idx = out;
        if (--kids[j] == 0 && live[j]) { /* its last delta record: no longer needed */
            kvt_free(live[j]);
            live[j] = NULL;
        }
    }
    for (size_t i = 0; live && i < n_rec; i++) /* what an error left */
        kvt_free(live[i]);
    kvt_free(one);
    kvt_free(live);
    kvt_free(kids);
    kvt_free(depth);
    return st;
}

/* An integer field of a JSON record in [lo, INT32_MAX]. */
static kvt_status json_int(const cJSON *o, const char *key, int lo, int *out, const char *path,
                           const char *where)
{
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(o, key);
    double d = cJSON_IsNumber(j) ? j->valuedouble : -1e300;
    KVT_RETURN_IF(!(d >= lo && d <= INT32_MAX) || d != (double)(int32_t)d, KVT_ERR_CORRUPT,
                  "%s: %s: \"%s\" is missing, not an integer or outside [%d, 2^31-1]", path, where,
                  key, lo);
    *out = (int)d;
    return KVT_OK;
}

static kvt_status read_json_records(kvt_selection *s, const cJSON *root, const char *path)
{
    const cJSON *recs = cJSON_GetObjectItemCaseSensitive(root, "records");
    KVT_RETURN_IF(!cJSON_IsArray(recs), KVT_ERR_CORRUPT,
                  "%s: \"records\" is missing or not an array", path);
    size_t n_rec = 0, n_idx = 0;
    for (const cJSON *o = recs->child; o; o = o->next, n_rec++) {
        const cJSON *k = cJSON_GetObjectItemCaseSensitive(o, "kept");
        KVT_RETURN_IF(!cJSON_IsArray(k), KVT_ERR_CORRUPT,
                      "%s: records[%zu]: \"kept\" is missing or not an array", path, n_rec);
        for (const cJSON *x = k->child; x; x = x->next)
            n_idx++;
    }
    KVT_FORWARD(alloc_records(s, n_rec));
    KVT_FORWARD(alloc_indices(s, n_idx));
    int32_t *dst = s->idx;
    size_t i = 0;
    char where[64];
    for (const cJSON *o = recs->child; o; o = o->next, i++) {
        kvt_selection_record *r = &s->recs[i];
        snprintf(where, sizeof(where), "records[%zu]", i);
        int flags = 0;
        KVT_FORWARD(json_int(o, "trace", 0, &r->trace, path, where));
        KVT_FORWARD(json_int(o, "policy", 0, &r->policy, path, where));
        KVT_FORWARD(json_int(o, "budget", 0, &r->budget, path, where));
        KVT_FORWARD(json_int(o, "budget_tokens", 1, &r->budget_tokens, path, where));
        KVT_FORWARD(json_int(o, "layer", 0, &r->layer, path, where));
        KVT_FORWARD(json_int(o, "head", 0, &r->head, path, where));
        KVT_FORWARD(json_int(o, "step", -1, &r->step, path, where));
        KVT_FORWARD(json_int(o, "flags", 0, &flags, path, where));
        r->flags = (unsigned)flags;
        KVT_FORWARD(check_record(s, r, path, where));
        size_t n = 0;
        for (const cJSON *x = cJSON_GetObjectItemCaseSensitive(o, "kept")->child; x; x = x->next) {
            double d = cJSON_IsNumber(x) ? x->valuedouble : -1;
            KVT_RETURN_IF(!(d >= 0 && d <= INT32_MAX) || d != (double)(int32_t)d, KVT_ERR_CORRUPT,
                          "%s: %s: kept[%zu] is not an integer in [0, 2^31-1]", path, where, n);
            dst[n++] = (int32_t)d;
        }
        KVT_FORWARD(check_indices(dst, n, path, where));
        r->idx = dst;
        r->n = n;
        dst += n;
    }
    return KVT_OK;
}

/* ---- lookup index ---- */

static sel_key make_key(const kvt_selection_record *r, size_t rec)
{
    return (sel_key){{r->trace, r->policy, r->budget, r->layer, r->head, r->step}, rec};
}

static int key_cmp(const void *x, const void *y)
{
    const sel_key *a = x, *b = y;
    for (int i = 0; i < 6; i++)
        if (a->k[i] != b->k[i])
            return a->k[i] < b->k[i] ? -1 : 1;
    return 0;
}

static kvt_status build_index(kvt_selection *s, const char *path)
{
    size_t n = s->hdr.n_records;
    for (size_t i = 0; i < n; i++)
        s->order[i] = make_key(&s->recs[i], i);
    qsort(s->order, n, sizeof(*s->order), key_cmp);
    for (size_t i = 1; i < n; i++) {
        const sel_key *a = &s->order[i - 1], *b = &s->order[i];
        KVT_RETURN_IF(key_cmp(a, b) == 0, KVT_ERR_CORRUPT,
                      "%s: records %zu and %zu are both (trace %d, policy %d, budget %d, layer %d, "
                      "head %d, step %d)",
                      path, a->rec < b->rec ? a->rec : b->rec, a->rec < b->rec ? b->rec : a->rec,
                      b->k[0], b->k[1], b->k[2], b->k[3], b->k[4], b->k[5]);
    }
    /* the shape of each (trace, policy): the sort keeps its records together */
    size_t n_sh = 0;
    for (size_t i = 0; i < n; i++)
        n_sh += i == 0 || memcmp(s->order[i].k, s->order[i - 1].k, 2 * sizeof(int)) != 0;
    s->shapes = kvt_malloc((n_sh ? n_sh : 1) * sizeof(*s->shapes));
    KVT_RETURN_IF(!s->shapes, KVT_ERR_NOMEM, "out of memory");
    for (size_t i = 0; i < n; i++) {
        const int *k = s->order[i].k;
        if (i == 0 || memcmp(k, s->order[i - 1].k, 2 * sizeof(int)) != 0)
            s->shapes[s->n_shapes++] = (sel_shape){k[0], k[1], 0, 0, 0};
        sel_shape *h = &s->shapes[s->n_shapes - 1];
        if (k[3] >= h->layers)
            h->layers = k[3] + 1;
        if (k[4] >= h->heads)
            h->heads = k[4] + 1;
        if (k[5] >= h->steps)
            h->steps = k[5] + 1;
    }
    return KVT_OK;
}

/* ---- the two layouts ---- */

static kvt_status parse_binary(kvt_selection *s, const unsigned char *b, size_t size,
                               const char *path)
{
    KVT_RETURN_IF(size < SEL_FIX_BYTES, KVT_ERR_CORRUPT,
                  "%s: truncated: %zu bytes, the selection export header needs %u", path, size,
                  SEL_FIX_BYTES);
    KVT_RETURN_IF(memcmp(b, SEL_MAGIC, 6) != 0, KVT_ERR_CORRUPT,
                  "%s: not a selection export (bad magic at byte 0)", path);
    KVT_RETURN_IF(memcmp(b, SEL_MAGIC, 8) != 0, KVT_ERR_VERSION,
                  "%s: selection export magic of another major layout (bytes 6-7: %02x %02x)", path,
                  b[6], b[7]);
    uint32_t version = rd32(b + 8), hlen = rd32(b + 12);
    KVT_RETURN_IF(version == 0, KVT_ERR_CORRUPT, "%s: version 0 at byte 8", path);
    KVT_RETURN_IF(version > KVT_SELECTION_VERSION, KVT_ERR_VERSION,
                  "%s: selection export version %u is newer than this reader's %d (HINT: update "
                  "kvtrace)",
                  path, version, KVT_SELECTION_VERSION);
    KVT_RETURN_IF(hlen > size - SEL_FIX_BYTES, KVT_ERR_CORRUPT,
                  "%s: header_len %u at byte 12 runs past the end of the file (%zu bytes)", path,
                  hlen, size);
    cJSON *h = cJSON_ParseWithLength((const char *)b + SEL_FIX_BYTES, hlen);
    if (!h)
        return kvt_error_set(KVT_ERR_CORRUPT, "%s: header (bytes 16..%u) is not valid JSON", path,
                             SEL_FIX_BYTES + hlen);
    kvt_status st = read_header(s, h, path, (int)version);
    cJSON_Delete(h);
    KVT_FORWARD(st);
    return read_binary_records(s, b, size, SEL_FIX_BYTES + hlen, version, path);
}

static kvt_status parse_json(kvt_selection *s, const unsigned char *b, size_t size,
                             const char *path)
{
    cJSON *root = cJSON_ParseWithLength((const char *)b, size);
    if (!root)
        return kvt_error_set(KVT_ERR_CORRUPT, "%s: not valid JSON (truncated?)", path);
    s->hdr.json = true;
    kvt_status st = read_header(s, root, path, 0);
    if (st == KVT_OK)
        st = read_json_records(s, root, path);
    cJSON_Delete(root);
    return st;
}

kvt_status kvt_selection_read(const char *path, kvt_selection **out)
{
    *out = NULL;
    unsigned char *b = NULL;
    size_t size = 0;
    KVT_FORWARD(slurp(path, &b, &size));
    kvt_status st;
    kvt_selection *s = kvt_calloc(1, sizeof(*s));
    if (!s) {
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
        goto out_free_buf;
    }
    pthread_mutex_init(&s->mu, NULL);
    st = size > 0 && b[0] == '{' ? parse_json(s, b, size, path) : parse_binary(s, b, size, path);
    if (st == KVT_OK)
        st = build_index(s, path);
    if (st != KVT_OK) {
        kvt_selection_free(s);
        goto out_free_buf;
    }
    if (s->n_lazy) { /* the delta records are expanded from the file's bytes */
        s->file = b;
        b = NULL;
    } else { /* every set held whole */
        kvt_free(s->off);
        kvt_free(s->base);
        s->off = NULL;
        s->base = NULL;
    }
    *out = s;
out_free_buf:
    kvt_free(b);
    return st;
}

const kvt_selection_header *kvt_selection_get_header(const kvt_selection *s)
{
    return &s->hdr;
}

/* The first position in a[0..n) holding a value >= x */
static size_t lower_bound(const int32_t *a, size_t n, int32_t x)
{
    size_t lo = 0;
    while (n > 0) {
        size_t half = n / 2;
        if (a[lo + half] < x)
            lo += half + 1, n -= half + 1;
        else
            n = half;
    }
    return lo;
}

/* apply_delta for a record checked at open: the runs of the base's set between the changes
 * copied whole (a decode step's one token in and one out costs two copies) */
static void apply_checked(const int32_t *b, size_t bn, const unsigned char *p, size_t n_rm,
                          size_t n_add, int32_t *dst)
{
    const unsigned char *add = p + 4 * n_rm;
    size_t a = 0, k = 0, rm = 0, ad = 0;
    while (rm < n_rm || ad < n_add) {
        const int32_t xr = rm < n_rm ? raw_idx(p, rm) : INT32_MAX,
                      xa = ad < n_add ? raw_idx(add, ad) : INT32_MAX;
        const bool is_rm = xr < xa; /* never equal: a removed token is held, an added one not */
        const size_t pos = a + lower_bound(b + a, bn - a, is_rm ? xr : xa);
        memcpy(dst + k, b + a, (pos - a) * sizeof(int32_t));
        k += pos - a;
        if (is_rm)
            a = pos + 1, rm++;
        else
            a = pos, dst[k++] = xa, ad++;
    }
    memcpy(dst + k, b + a, (bn - a) * sizeof(int32_t));
}

/* The cache slot of chain anc: its entry, or the empty slot where it would go */
static sel_cached *cache_slot(const kvt_selection *s, size_t anc)
{
    size_t c = (size_t)(((uint64_t)anc * 0x9E3779B97F4A7C15ull) >> 32) & s->cache_mask;
    while (s->cache[c].anc != anc && s->cache[c].anc != SIZE_MAX)
        c = (c + 1) & s->cache_mask;
    return &s->cache[c];
}

/* Keep record rec's set (n indices at src) as chain anc's last: the table grown at half full,
 * every entry dropped first when they would pass SEL_CACHE_BYTES. Without memory nothing is
 * kept (the cache is an optimisation). */
static void cache_put(kvt_selection *s, size_t anc, size_t rec, const int32_t *src, size_t n)
{
    if (s->cache && s->cache_bytes + 4 * n > SEL_CACHE_BYTES) {
        for (size_t c = 0; c <= s->cache_mask; c++) {
            kvt_free(s->cache[c].set);
            s->cache[c] = (sel_cached){.anc = SIZE_MAX};
        }
        s->cache_used = s->cache_bytes = 0;
    }
    if (!s->cache || 2 * (s->cache_used + 1) > s->cache_mask + 1) {
        const size_t old = s->cache ? s->cache_mask + 1 : 0, cap = old ? 2 * old : 64;
        sel_cached *t = kvt_malloc(cap * sizeof(*t)), *o = s->cache;
        if (!t)
            return;
        for (size_t c = 0; c < cap; c++)
            t[c] = (sel_cached){.anc = SIZE_MAX};
        s->cache = t;
        s->cache_mask = cap - 1;
        for (size_t c = 0; c < old; c++)
            if (o[c].anc != SIZE_MAX)
                *cache_slot(s, o[c].anc) = o[c];
        kvt_free(o);
    }
    sel_cached *e = cache_slot(s, anc);
    if (e->cap < n || !e->set) {
        int32_t *g = kvt_realloc(e->set, (n ? n : 1) * sizeof(int32_t));
        if (!g)
            return;
        s->cache_bytes += 4 * ((n ? n : 1) - e->cap);
        e->set = g;
        e->cap = n ? n : 1;
    }
    if (e->anc == SIZE_MAX)
        s->cache_used++;
    e->anc = anc;
    e->rec = rec;
    e->n = n;
    memcpy(e->set, src, n * sizeof(int32_t));
}

/* Record i's set into dst (room for its n), s->mu held: from its set held whole, or its
 * chain's deltas applied (at most SEL_CHECKPOINT - 1 of them, through s->tmp) from the held
 * set the chain starts from or, where it is one of i's bases, from the chain's last set
 * expanded; with keep, the result becomes the chain's last (hold() keeps dst itself) */
static kvt_status expand(kvt_selection *s, size_t i, int32_t *dst, bool keep)
{
    if (s->base && s->base[i] < -1) /* no change from the record it names */
        i = (size_t)(-2 - s->base[i]);
    const kvt_selection_record *r = &s->recs[i];
    if (r->idx) {
        memcpy(dst, r->idx, r->n * sizeof(int32_t));
        return KVT_OK;
    }
    size_t chain[SEL_CHECKPOINT], m = 0, j = i;
    for (; !s->recs[j].idx; j = (size_t)s->base[j])
        if (m == SEL_CHECKPOINT || s->base[j] < 0) /* cannot be: open checked every chain */
            return kvt_error_set(KVT_ERR_CORRUPT, "selection: record %zu has no base", i);
        else
            chain[m++] = j;
    const int32_t *src = s->recs[j].idx;
    size_t n_src = s->recs[j].n, q = m; /* apply chain[q - 1] .. chain[0] */
    const size_t top = chain[m - 1];    /* the chain's key: its first record not held */
    const sel_cached *e = s->cache ? cache_slot(s, top) : NULL;
    for (size_t t = 0; e && e->anc == top && t < m; t++)
        if (chain[t] == e->rec) {
            src = e->set, n_src = e->n, q = t;
            break;
        }
    if (q == 0) { /* i's own set is the chain's last */
        memcpy(dst, src, r->n * sizeof(int32_t));
        return KVT_OK;
    }
    for (int t = 0; q > 1 && t < 2; t++)
        if (!s->tmp[t] && !(s->tmp[t] = kvt_malloc(s->max_n * sizeof(int32_t) + 4)))
            return kvt_error_set(KVT_ERR_NOMEM, "out of memory");
    while (q-- > 0) {
        const size_t k = chain[q];
        const unsigned char *p = s->file + s->off[k];
        const size_t cnt = rd32(p + 28), n_rm = rd32(p + 32);
        int32_t *out = q ? s->tmp[q & 1] : dst;
        apply_checked(src, n_src, p + SEL_REC_BYTES, n_rm, cnt - n_rm, out);
        src = out;
        n_src = s->recs[k].n;
    }
    if (keep)
        cache_put(s, top, i, dst, r->n);
    return KVT_OK;
}

/* Record i with its set held: a delta record's expanded and kept until kvt_selection_free */
static kvt_status hold(kvt_selection *s, size_t i)
{
    if (!s->n_lazy)
        return KVT_OK;
    pthread_mutex_lock(&s->mu);
    kvt_status st = KVT_OK;
    kvt_selection_record *r = &s->recs[i], *a = r; /* a: the record whose set r's is */
    if (s->base[i] < -1)
        a = &s->recs[-2 - s->base[i]];
    if (!a->idx) {
        int32_t *set = NULL;
        if (s->n_memo == s->cap_memo) {
            size_t nc = s->cap_memo ? 2 * s->cap_memo : 64;
            int32_t **g = kvt_realloc(s->memo, nc * sizeof(*g));
            if (g)
                s->memo = g, s->cap_memo = nc;
        }
        if (s->n_memo == s->cap_memo || !(set = kvt_malloc((r->n ? r->n : 1) * sizeof(int32_t))))
            st = kvt_error_set(KVT_ERR_NOMEM, "out of memory expanding a kept set");
        else if ((st = expand(s, i, set, false)) != KVT_OK)
            kvt_free(set);
        else
            a->idx = s->memo[s->n_memo++] = set;
    }
    if (!st)
        r->idx = a->idx;
    pthread_mutex_unlock(&s->mu);
    return st;
}

const kvt_selection_record *kvt_selection_record_at(const kvt_selection *s, size_t i)
{
    if (i >= s->hdr.n_records || hold((kvt_selection *)s, i) != KVT_OK)
        return NULL;
    return &s->recs[i];
}

kvt_status kvt_selection_record_info(const kvt_selection *s, size_t i, kvt_selection_record *out)
{
    KVT_RETURN_IF(i >= s->hdr.n_records, KVT_ERR_INVALID_ARG,
                  "selection: no record %zu (the export has %zu)", i, s->hdr.n_records);
    if (s->n_lazy)
        pthread_mutex_lock((pthread_mutex_t *)&s->mu);
    *out = s->recs[i];
    if (s->n_lazy)
        pthread_mutex_unlock((pthread_mutex_t *)&s->mu);
    return KVT_OK;
}

kvt_status kvt_selection_copy_set(const kvt_selection *s, size_t i, int32_t *dst, size_t cap)
{
    KVT_RETURN_IF(i >= s->hdr.n_records, KVT_ERR_INVALID_ARG,
                  "selection: no record %zu (the export has %zu)", i, s->hdr.n_records);
    KVT_RETURN_IF(cap < s->recs[i].n, KVT_ERR_INVALID_ARG,
                  "selection: record %zu holds %zu indices, room for %zu given", i, s->recs[i].n,
                  cap);
    kvt_selection *w = (kvt_selection *)s;
    if (s->n_lazy)
        pthread_mutex_lock(&w->mu);
    kvt_status st = expand(w, i, dst, true);
    if (s->n_lazy)
        pthread_mutex_unlock(&w->mu);
    return st;
}

kvt_status kvt_selection_find_record(const kvt_selection *s, int trace, int policy, int budget,
                                     int layer, int head, int step, size_t *i)
{
    *i = SIZE_MAX;
    const sel_key key = {{trace, policy, budget, layer, head, step}, 0};
    const sel_key *hit = bsearch(&key, s->order, s->hdr.n_records, sizeof(*s->order), key_cmp);
    if (hit) {
        *i = hit->rec;
        return KVT_OK;
    }
    return kvt_error_set(KVT_ERR_NOT_FOUND,
                         "selection: no record for trace %d, policy %d, budget %d, layer %d, head "
                         "%d, step %d",
                         trace, policy, budget, layer, head, step);
}

kvt_status kvt_selection_find(const kvt_selection *s, int trace, int policy, int budget, int layer,
                              int head, int step, const int32_t **idx, size_t *n)
{
    *idx = NULL;
    *n = 0;
    size_t i;
    KVT_FORWARD(kvt_selection_find_record(s, trace, policy, budget, layer, head, step, &i));
    KVT_FORWARD(hold((kvt_selection *)s, i));
    *idx = s->recs[i].idx;
    *n = s->recs[i].n;
    return KVT_OK;
}

kvt_status kvt_selection_mask(const kvt_selection *s, int trace, int policy, int budget, int layer,
                              int step, size_t n_tokens, uint8_t *out, size_t cap)
{
    int nl, nh, ns;
    KVT_FORWARD(kvt_selection_shape(s, trace, policy, &nl, &nh, &ns));
    KVT_RETURN_IF(n_tokens && (size_t)nh > cap / n_tokens, KVT_ERR_INVALID_ARG,
                  "selection: a mask of %d heads x %zu tokens, room for %zu bytes given", nh,
                  n_tokens, cap);
    if (nh && n_tokens)
        memset(out, 0, (size_t)nh * n_tokens);
    const bool per_step = s->hdr.policies[policy].per_step;
    int32_t *set = NULL;
    size_t room = 0;
    kvt_status st = KVT_OK;
    for (int h = 0; h < nh && !st; h++) {
        size_t i;
        st = kvt_selection_find_record(s, trace, policy, budget, layer, h, step, &i);
        if (st == KVT_ERR_NOT_FOUND && per_step && step >= 0 && step < ns) /* a static head */
            st = kvt_selection_find_record(s, trace, policy, budget, layer, h, -1, &i);
        const size_t n = st ? 0 : s->recs[i].n;
        if (!st && n > room) {
            int32_t *g = kvt_realloc(set, n * sizeof(int32_t));
            st = g ? KVT_OK : kvt_error_set(KVT_ERR_NOMEM, "selection: out of memory");
            set = g ? g : set;
            room = g ? n : room;
        }
        if (!st)
            st = kvt_selection_copy_set(s, i, set, room);
        for (size_t j = 0; !st && j < n; j++) {
            if ((size_t)set[j] >= n_tokens) /* (ascending: the last is the largest) */
                st = kvt_error_set(KVT_ERR_INVALID_ARG,
                                   "selection: layer %d head %d keeps token %d, beyond "
                                   "n_tokens=%zu",
                                   layer, h, (int)set[j], n_tokens);
            else
                out[(size_t)h * n_tokens + (size_t)set[j]] = 1;
        }
    }
    kvt_free(set);
    return st;
}

kvt_status kvt_selection_shape(const kvt_selection *s, int trace, int policy, int *n_layers,
                               int *n_heads, int *n_steps)
{
    *n_layers = *n_heads = *n_steps = 0;
    KVT_RETURN_IF(trace < 0 || (size_t)trace >= s->hdr.n_traces || policy < 0 ||
                      (size_t)policy >= s->hdr.n_policies,
                  KVT_ERR_INVALID_ARG, "selection: no trace %d or policy %d", trace, policy);
    size_t lo = 0, hi = s->n_shapes; /* the first shape at or after (trace, policy) */
    while (lo < hi) {
        const size_t mid = lo + (hi - lo) / 2;
        const sel_shape *h = &s->shapes[mid];
        if (h->trace < trace || (h->trace == trace && h->policy < policy))
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo < s->n_shapes && s->shapes[lo].trace == trace && s->shapes[lo].policy == policy) {
        *n_layers = s->shapes[lo].layers;
        *n_heads = s->shapes[lo].heads;
        *n_steps = s->shapes[lo].steps;
    }
    return KVT_OK;
}
