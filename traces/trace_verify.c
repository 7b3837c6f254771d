/* trace_verify.c - `kvtrace verify`: checks every record header and payload checksum
 * (decompressing each payload), the index and trailer, record-number gaps, damaged regions
 * and the tensors the JSON header promises, and describes each problem in one line.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "trace_internal.h"

static kvt_status add_problem(kvt_verify_report *rep, size_t *cap, uint64_t off, int32_t seq,
                              int kind, int32_t layer, const char *fmt, ...)
    __attribute__((format(printf, 7, 8)));

static kvt_status add_problem(kvt_verify_report *rep, size_t *cap, uint64_t off, int32_t seq,
                              int kind, int32_t layer, const char *fmt, ...)
{
    if (rep->n_problems == *cap) {
        size_t nc = *cap ? 2 * *cap : 16;
        kvt_verify_problem *np = kvt_realloc(rep->problems, nc * sizeof(*np));
        KVT_RETURN_IF(!np, KVT_ERR_NOMEM, "out of memory");
        rep->problems = np;
        *cap = nc;
    }
    kvt_verify_problem *p = &rep->problems[rep->n_problems++];
    p->file_offset = off;
    p->seq = seq;
    p->kind = kind;
    p->layer = layer;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->what, sizeof(p->what), fmt, ap);
    va_end(ap);
    return KVT_OK;
}

static int json_int(const cJSON *o, const char *a, const char *b, int dflt)
{
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(o, a);
    if (b)
        x = cJSON_GetObjectItemCaseSensitive(x, b);
    return cJSON_IsNumber(x) ? x->valueint : dflt;
}

static bool layer_absent(kvt_trace_reader *r, int l)
{
    uint32_t H, T, D;
    return kvt_trace_reader_shape(r, l, KVT_KIND_K, &H, &T, &D, NULL) != KVT_OK &&
           kvt_trace_reader_shape(r, l, KVT_KIND_V, &H, &T, &D, NULL) != KVT_OK &&
           kvt_trace_reader_shape(r, l, KVT_KIND_Q_WINDOW, &H, &T, &D, NULL) != KVT_OK;
}

/* In a trace whose header describes a model: check the header fields a replay needs, and that every
 * layer the header promises has K, V and Q_window of the promised shape. A run of layers with none
 * of them is one problem (a header promising a million layers named each). */
static kvt_status check_promised(kvt_trace_reader *r, kvt_verify_report *rep, size_t *cap)
{
    cJSON *root = cJSON_Parse(kvt_trace_reader_header_json(r));
    if (!cJSON_IsObject(cJSON_GetObjectItemCaseSensitive(root, "model"))) {
        cJSON_Delete(root); /* not a model's trace (a container written by other means) */
        return KVT_OK;
    }
    static const char *const need[6][2] = {{"model", "n_layers"},   {"model", "n_q_heads"},
                                           {"model", "n_kv_heads"}, {"model", "head_dim"},
                                           {"n_tokens", NULL},      {"window", NULL}};
    int v[6];
    kvt_status s = KVT_OK;
    for (int i = 0; i < 6 && s == KVT_OK; i++)
        if ((v[i] = json_int(root, need[i][0], need[i][1], 0)) <= 0)
            s = add_problem(rep, cap, 0, -1, 0, -1,
                            "header: %s%s%s is missing or not a positive integer (a replay "
                            "needs it)",
                            need[i][0], need[i][1] ? "." : "", need[i][1] ? need[i][1] : "");
    const int L = v[0], hq = v[1], hkv = v[2], D = v[3], T = v[4], W = v[5];
    if (s == KVT_OK && hq > 0 && hkv > 0 && hq % hkv)
        s = add_problem(rep, cap, 0, -1, 0, -1,
                        "header: %d query heads are not a multiple of %d KV heads", hq, hkv);
    static const int kinds[] = {KVT_KIND_K, KVT_KIND_V, KVT_KIND_Q_WINDOW};
    int l_end = 0; /* past the last layer with one of them: beyond it every layer is absent */
    for (size_t i = 0; i < kvt_trace_reader_n_records(r); i++) {
        kvt_record_info in;
        if (kvt_trace_reader_record(r, i, &in) == KVT_OK &&
            (in.kind == KVT_KIND_K || in.kind == KVT_KIND_V || in.kind == KVT_KIND_Q_WINDOW) &&
            in.layer >= l_end)
            l_end = in.layer + 1;
    }
    for (int l = 0; l < L && s == KVT_OK; l++) {
        if (l >= l_end || layer_absent(r, l)) {
            int e = l >= l_end ? L - 1 : l; /* a run before l_end ends before it */
            while (e + 1 < l_end && e + 1 < L && layer_absent(r, e + 1))
                e++;
            s = e == l ? add_problem(rep, cap, 0, -1, KVT_KIND_K, l,
                                     "layer %d: K, V and Q_window missing", l)
                       : add_problem(rep, cap, 0, -1, KVT_KIND_K, l,
                                     "layers %d-%d: K, V and Q_window missing", l, e);
            l = e;
            continue;
        }
        for (size_t k = 0; k < 3 && s == KVT_OK; k++) {
            uint32_t H, Tt, Dd;
            const bool q = kinds[k] == KVT_KIND_Q_WINDOW;
            int want_h = q ? hq : hkv, want_t = q ? W : T;
            if (kvt_trace_reader_shape(r, l, kinds[k], &H, &Tt, &Dd, NULL) != KVT_OK)
                s = add_problem(rep, cap, 0, -1, kinds[k], l, "layer %d %s: missing", l,
                                kvt_kind_name(kinds[k]));
            else if ((want_h > 0 && H != (uint32_t)want_h) ||
                     (want_t > 0 && Tt != (uint32_t)want_t) || (D > 0 && Dd != (uint32_t)D))
                s = add_problem(rep, cap, 0, -1, kinds[k], l,
                                "layer %d %s: has %u heads x %u tokens x dim %u, the header "
                                "promises %d x %d x %d",
                                l, kvt_kind_name(kinds[k]), H, Tt, Dd, want_h, want_t, D);
        }
    }
    cJSON_Delete(root);
    kvt_error_clear();
    return s;
}

typedef struct tkey {
    int32_t layer;
    int kind;
    size_t i;
} tkey;

static int by_tensor(const void *a, const void *b)
{
    const tkey *x = a, *y = b;
    if (x->layer != y->layer)
        return x->layer < y->layer ? -1 : 1;
    if (x->kind != y->kind)
        return x->kind < y->kind ? -1 : 1;
    return x->i < y->i ? -1 : x->i > y->i;
}

/* What traces/FORMAT.md asks of a tensor's records as a whole (another writer may not have
 * kept to it; kvtrace's refuses it at append): one dtype and dim, no overlap (checked exactly,
 * kvt_records_overlap), and (in a finished trace) no rows missing from [0, max Head_End) x
 * [0, max Tok_End), found by area once there is no overlap; a token table of the shape a table
 * has ([1, n, 1]; positions [1 or 3, T, 1]). Records of a kind this version
 * does not know are skipped, as a reader skips them; meta_json records overlap by design. */
static kvt_status check_tensors(const kvt_rec_hdr *recs, size_t n, bool finished,
                                kvt_verify_report *rep, size_t *cap)
{
    if (n == 0)
        return KVT_OK;
    tkey *k = kvt_malloc(n * sizeof(*k));
    const kvt_record_info **g = kvt_malloc(n * sizeof(*g));
    if (!k || !g) {
        kvt_free(k);
        kvt_free(g);
        return kvt_error_set(KVT_ERR_NOMEM, "out of memory");
    }
    for (size_t i = 0; i < n; i++)
        k[i] = (tkey){recs[i].info.layer, recs[i].info.kind, i};
    qsort(k, n, sizeof(*k), by_tensor);
    kvt_status s = KVT_OK;
    for (size_t a = 0, b; a < n && s == KVT_OK; a = b) {
        const kvt_record_info *f = &recs[k[a].i].info;
        uint32_t H = 0, T = 0;
        uint64_t covered = 0;
        bool mixed = false, big = false;
        size_t m = 0;
        for (b = a; b < n && k[b].layer == f->layer && k[b].kind == f->kind; b++) {
            const kvt_record_info *in = &recs[k[b].i].info;
            g[m++] = in;
            mixed |= in->dtype != f->dtype || in->dim != f->dim;
            H = in->head_end > H ? in->head_end : H;
            T = in->tok_end > T ? in->tok_end : T;
            uint64_t area =
                (uint64_t)(in->head_end - in->head_begin) * (in->tok_end - in->tok_begin);
            big |= area > UINT64_MAX - covered;
            covered += big ? 0 : area;
        }
        if (f->kind == KVT_KIND_META_JSON || !kvt_kind_name(f->kind))
            continue;
        char name[64];
        kvt_tensor_name(f->layer, f->kind, name, sizeof(name));
        bool ov = false;
        size_t x = 0, y = 0;
        if ((s = kvt_records_overlap(g, m, &ov, &x, &y)) != KVT_OK)
            break;
        uint64_t want = (uint64_t)H * T;
        if (mixed)
            s = add_problem(rep, cap, f->file_offset, -1, f->kind, f->layer,
                            "%s: its records differ in dtype or dim (unreadable)", name);
        else if (ov)
            s = add_problem(rep, cap, g[y]->file_offset, (int32_t)g[y]->seq, f->kind, f->layer,
                            "%s: records %u and %u overlap (heads [%u,%u) x tokens [%u,%u) and "
                            "[%u,%u) x [%u,%u); unreadable)",
                            name, g[x]->seq, g[y]->seq, g[x]->head_begin, g[x]->head_end,
                            g[x]->tok_begin, g[x]->tok_end, g[y]->head_begin, g[y]->head_end,
                            g[y]->tok_begin, g[y]->tok_end);
        else if (big || covered > want) /* only past kvt_records_overlap's size limit */
            s = add_problem(rep, cap, f->file_offset, -1, f->kind, f->layer,
                            "%s: its records overlap (they cover more than its %u heads x %u "
                            "tokens; unreadable)",
                            name, H, T);
        else if (finished && covered < want)
            s = add_problem(rep, cap, f->file_offset, -1, f->kind, f->layer,
                            "%s: its records leave %llu of its %u heads x %u token rows "
                            "uncovered (unreadable)",
                            name, (unsigned long long)(want - covered), H, T);
        /* a token table (kinds 16 and up) is [1, n, 1], positions [1 or 3, T, 1]: kvtrace's
           writer refuses other blocks, another writer's are named here */
        const uint32_t rows_max = f->kind == KVT_KIND_POSITIONS ? 3 : 1;
        if (s == KVT_OK && !mixed && f->kind >= KVT_KIND_TOKEN_IDS && (H > rows_max || f->dim != 1))
            s = add_problem(rep, cap, f->file_offset, -1, f->kind, f->layer,
                            "%s: a table of %u rows and dim %u, not [%s, n, 1] "
                            "(traces/FORMAT.md): readers refuse it or take its first row and "
                            "column",
                            name, H, f->dim, rows_max == 3 ? "1 or 3" : "1");
    }
    kvt_free(k);
    kvt_free(g);
    return s;
}

kvt_status kvt_trace_verify(const char *path, kvt_verify_report *rep)
{
    return kvt_trace_verify_ex(path, rep, NULL, NULL);
}

kvt_status kvt_trace_verify_ex(const char *path, kvt_verify_report *rep, kvt_progress_fn progress,
                               void *user)
{
    memset(rep, 0, sizeof(*rep));
    size_t cap = 0;
    kvt_trace_reader *r;
    KVT_FORWARD(kvt_trace_reader_open(path, &r));
    rep->header_ok = true;
    int fd = kvt_trace_reader_fd_(r);
    uint64_t size = kvt_trace_reader_file_bytes(r);
    uint64_t br = 0;
    kvt_status s = KVT_OK;
    const kvt_rec_hdr *recs = kvt_trace_reader_recs_(r);
    size_t n = kvt_trace_reader_n_records(r);
    uint64_t valid_end = 0, skipped = 0;

    if (!kvt_trace_reader_recovered(r)) {
        rep->trailer_ok = true;
        rep->index_ok = true;
        rep->n_records_expected = n;
    } else {
        kvt_trace_reader_scan_result_(r, &valid_end, &skipped);
        uint8_t fh[8]; /* where the scan stopped: an index (whole or cut) and a cut trailer hold
                          no record, so nothing is lost there */
        bool index = valid_end < size && kvt_pread_full(fd, fh, sizeof(fh), valid_end) == KVT_OK &&
                     kvt_get_u32(fh) == KVT_FRAME_INDEX;
        uint64_t after = index && valid_end + 8 + kvt_get_u32(fh + 4) <= size
                             ? size - valid_end - 8 - kvt_get_u32(fh + 4)
                             : 0; /* bytes after a complete index frame */
        /* a file that ends without a trailer was never finished; a trailer or index that is
         * there, whole, but fails its checks (a checksum, a magic word) was damaged after */
        bool damaged = index && after == KVT_TRAILER_BYTES;
        bool unfinished = !damaged && kvt_trace_reader_index_status_(r) == KVT_ERR_TRUNCATED;
        s = add_problem(rep, &cap, size, -1, 0, -1, "no valid index: %s (%s)",
                        kvt_trace_reader_recovery_note(r),
                        unfinished ? "the trace was not finished: capture killed or disk full?"
                                   : "the index or trailer is damaged");
        if (s == KVT_OK && skipped)
            s = add_problem(rep, &cap, 0, -1, 0, -1,
                            "%llu damaged region(s) skipped while scanning (unreadable record "
                            "headers)",
                            (unsigned long long)skipped);
        if (s != KVT_OK)
            goto out;
        if (damaged)
            s = add_problem(rep, &cap, valid_end, -1, 0, -1,
                            "the index at offset %llu and the trailer after it are there but "
                            "damaged: no record lost",
                            (unsigned long long)valid_end);
        else if (index && valid_end + 8 + kvt_get_u32(fh + 4) <= size)
            s = add_problem(rep, &cap, valid_end, -1, 0, -1,
                            "the index frame at offset %llu is complete but the trailer after "
                            "it is missing or cut (%llu bytes): no record lost",
                            (unsigned long long)valid_end, (unsigned long long)after);
        else if (index)
            s = add_problem(rep, &cap, valid_end, -1, 0, -1,
                            "the last %llu bytes (from offset %llu) are an index cut short: no "
                            "record lost",
                            (unsigned long long)(size - valid_end), (unsigned long long)valid_end);
        else if (s == KVT_OK && valid_end < size) {
            rep->tail_bytes_lost = size - valid_end;
            s = add_problem(rep, &cap, valid_end, -1, 0, -1,
                            "last %llu bytes (from offset %llu) are an incomplete record: lost",
                            (unsigned long long)(size - valid_end), (unsigned long long)valid_end);
        }
        if (s != KVT_OK)
            goto out;
    }

    /* every record: header agreement, payload checksum, decompression */
    uint32_t max_seq = 0;
    for (size_t i = 0; i < n; i++) {
        uint8_t *raw;
        const kvt_record_info *in = &recs[i].info;
        if (in->seq > max_seq)
            max_seq = in->seq;
        kvt_status cs = kvt_record_decode_at(fd, &recs[i], &raw, &br);
        if (progress)
            progress(user, i + 1, n);
        if (cs == KVT_OK) {
            kvt_free(raw);
            rep->n_records_ok++;
            continue;
        }
        if (cs == KVT_ERR_NOMEM) {
            s = cs;
            goto out;
        }
        rep->n_records_bad++;
        s = add_problem(rep, &cap, in->file_offset, (int32_t)in->seq, in->kind, in->layer, "%s",
                        kvt_error_msg());
        if (s != KVT_OK)
            goto out;
    }
    /* a finished trace is one chain of frames: the header, each record's header frame (88
     * bytes) and payload frame, the index. The index finds a record whose frame header or
     * neighbourhood is damaged, but zstd -d and a recovery scan walk the chain: check it */
    if (!kvt_trace_reader_recovered(r)) {
        uint64_t at, idx_off;
        kvt_trace_reader_layout_(r, &at, &idx_off);
        for (size_t i = 0; i <= n && s == KVT_OK; i++) {
            const kvt_record_info *in = i < n ? &recs[i].info : NULL;
            uint64_t off = in ? in->file_offset : idx_off;
            uint8_t fh[8];
            if (off != at)
                s = add_problem(rep, &cap, at, -1, 0, -1,
                                "%llu bytes at offset %llu belong to no record (the file no "
                                "longer decodes as a zstd stream)",
                                (unsigned long long)(off - at), (unsigned long long)at);
            else if (in && kvt_pread_full(fd, fh, sizeof(fh), off) == KVT_OK &&
                     kvt_get_u32(fh) == KVT_FRAME_RECORD &&
                     kvt_get_u32(fh + 4) != KVT_REC_HEADER_BYTES)
                s = add_problem(rep, &cap, off, (int32_t)in->seq, in->kind, in->layer,
                                "record %u (layer %d %s): its frame size field is damaged (%u, "
                                "not %u): the index still finds it, but zstd -d and a recovery "
                                "scan do not",
                                (unsigned)in->seq, (int)in->layer, kvt_kind_name(in->kind),
                                (unsigned)kvt_get_u32(fh + 4), (unsigned)KVT_REC_HEADER_BYTES);
            if (in)
                at = off + KVT_REC_UNIT + in->comp_bytes;
        }
        if (s != KVT_OK)
            goto out;
    }
    /* record numbers are 0..n-1 in a complete trace: name the gaps */
    if (n > 0) {
        uint8_t *seen = kvt_calloc((size_t)max_seq + 1, 1);
        if (!seen) {
            s = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
            goto out;
        }
        for (size_t i = 0; i < n; i++)
            seen[recs[i].info.seq] = 1;
        for (uint32_t q = 0; q <= max_seq && s == KVT_OK; q++) {
            if (seen[q])
                continue;
            uint32_t e = q;
            while (e + 1 <= max_seq && !seen[e + 1])
                e++;
            s = add_problem(rep, &cap, 0, (int32_t)q, 0, -1,
                            e == q ? "record %u is missing" : "records %u-%u are missing",
                            (unsigned)q, (unsigned)e);
            q = e;
        }
        kvt_free(seen);
        if (s != KVT_OK)
            goto out;
    }
    s = check_tensors(recs, n, !kvt_trace_reader_recovered(r), rep, &cap);
    if (s == KVT_OK)
        s = check_promised(r, rep, &cap);
out:
    kvt_trace_reader_close(r);
    if (s != KVT_OK) {
        kvt_verify_report_free(rep);
        return s;
    }
    return KVT_OK;
}

void kvt_verify_report_free(kvt_verify_report *rep)
{
    if (!rep)
        return;
    kvt_free(rep->problems);
    rep->problems = NULL;
    rep->n_problems = 0;
}
