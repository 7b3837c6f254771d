/* selection_merge.c - `kvtrace merge` of the selection exports of `replay --shard i/n
 * --export-selection`: each part holds the records of its shard's (trace, layer) units; the
 * merged export holds every record in the order one unsharded replay writes them (trace, then
 * layer, then the part's own order within the layer), through the same writer, so the bytes
 * are those of the unsharded export. The parts must come from one sharded replay: the same
 * policies, budgets and traces, each shard once, each unit's records in the part that owns it.
 * Memory: the parts as the reader holds them, and one layer's sets expanded at a time.
 */
#include <stdio.h>
#include <string.h>

#include "kvt_analysis.h"

/* the first difference between two parts' headers, or NULL */
static const char *header_diff(const kvt_selection_header *a, const kvt_selection_header *b,
                               char *why, size_t cap)
{
    if (a->n_policies != b->n_policies || a->n_budgets != b->n_budgets ||
        a->n_traces != b->n_traces)
        return "a different number of policies, budgets or traces";
    for (size_t i = 0; i < a->n_policies; i++) {
        const kvt_selection_policy *x = &a->policies[i], *y = &b->policies[i];
        if (strcmp(x->label, y->label) || strcmp(x->name, y->name) ||
            x->query_heads != y->query_heads || x->per_step != y->per_step ||
            x->merged != y->merged) {
            snprintf(why, cap, "different policies (policy %zu: %s vs %s)", i, x->label, y->label);
            return why;
        }
    }
    for (size_t i = 0; i < a->n_budgets; i++)
        if (strcmp(a->budgets[i], b->budgets[i])) {
            snprintf(why, cap, "different budgets (budget %zu: %s vs %s)", i, a->budgets[i],
                     b->budgets[i]);
            return why;
        }
    for (size_t i = 0; i < a->n_traces; i++)
        if (strcmp(a->traces[i], b->traces[i])) {
            snprintf(why, cap, "different traces (trace %zu: %s vs %s)", i, a->traces[i],
                     b->traces[i]);
            return why;
        }
    return NULL;
}

kvt_status kvt_selection_merge(const char *const *paths, size_t n, const char *out, bool force)
{
    KVT_RETURN_IF(n == 0, KVT_ERR_INVALID_ARG, "no part given");
    kvt_status st = KVT_OK;
    kvt_selection **sel = kvt_calloc(n, sizeof(*sel));
    const kvt_selection **by_shard = kvt_calloc(n, sizeof(*by_shard));
    size_t *cur = kvt_calloc(n, sizeof(size_t)); /* next record of each part */
    int *n_layers = NULL, *btok = NULL;
    uint64_t *trace_base = NULL; /* [n_traces] the unit number of each trace's layer 0 */
    kvt_selection_rec *recs = NULL;
    int32_t *pool = NULL; /* the layer's sets, expanded */
    kvt_selection_writer *w = NULL;
    size_t cap_recs = 0, cap_pool = 0;
    if (!sel || !by_shard || !cur) {
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < n && !st; i++)
        st = kvt_selection_read(paths[i], &sel[i]);
    if (st)
        goto out;
    /* one sharded replay: same header, shard count n, each index once */
    const kvt_selection_header *h0 = kvt_selection_get_header(sel[0]);
    for (size_t i = 0; i < n; i++) {
        const kvt_selection_header *h = kvt_selection_get_header(sel[i]);
        char why[512];
        const char *d = header_diff(h0, h, why, sizeof(why));
        if (!h->shard_count) {
            st = kvt_error_set(KVT_ERR_INVALID_ARG,
                               "%s is a whole selection export, not a part of replay "
                               "--shard",
                               paths[i]);
            goto out;
        }
        if (!d && (!h0->shard_settings) != (!h->shard_settings))
            d = "different settings (one part says its seed, options and traces, one does not)";
        else if (!d && h->shard_settings && strcmp(h0->shard_settings, h->shard_settings))
            d = "different settings (seed, policy options, shard count or trace contents)";
        if (d) {
            st = kvt_error_set(KVT_ERR_INVALID_ARG,
                               "%s and %s were exported with %s; merge the parts of one "
                               "sharded replay only",
                               paths[0], paths[i], d);
            goto out;
        }
        if ((size_t)h->shard_count != n) {
            st = kvt_error_set(KVT_ERR_INVALID_ARG,
                               "%s is shard %d/%d but %zu parts were given: every shard "
                               "0..%d is needed once",
                               paths[i], h->shard_index, h->shard_count, n, h->shard_count - 1);
            goto out;
        }
        if (by_shard[h->shard_index]) {
            st = kvt_error_set(KVT_ERR_INVALID_ARG, "shard %d/%d given twice (%s)", h->shard_index,
                               h->shard_count, paths[i]);
            goto out;
        }
        by_shard[h->shard_index] = sel[i];
    }
    /* per trace: its layers (1 + the largest layer of any record) and budgets in tokens */
    const size_t nt = h0->n_traces, nb = h0->n_budgets;
    n_layers = kvt_calloc(nt ? nt : 1, sizeof(int));
    btok = kvt_calloc((nt ? nt : 1) * (nb ? nb : 1), sizeof(int));
    if (!n_layers || !btok) {
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
        goto out;
    }
    for (size_t s = 0; s < n; s++) {
        const kvt_selection *p = by_shard[s];
        for (size_t i = 0; i < kvt_selection_get_header(p)->n_records; i++) {
            kvt_selection_record rec, *r = &rec;
            kvt_selection_record_info(p, i, r);
            if (r->layer + 1 > n_layers[r->trace])
                n_layers[r->trace] = r->layer + 1;
            int *bt = &btok[(size_t)r->trace * nb + (size_t)r->budget];
            if (*bt && *bt != r->budget_tokens) {
                st = kvt_error_set(KVT_ERR_INVALID_ARG,
                                   "budget %s of %s is %d tokens in one part and %d in another: "
                                   "not parts of one sharded replay",
                                   h0->budgets[r->budget], h0->traces[r->trace], *bt,
                                   r->budget_tokens);
                goto out;
            }
            *bt = r->budget_tokens;
        }
    }
    /* units are numbered as replay --shard numbers them (trace_base[t] + layer); each must be
       in its owner's part: one pass over every record */
    uint64_t base = 0;
    trace_base = kvt_calloc(nt ? nt : 1, sizeof(uint64_t));
    if (!trace_base) {
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
        goto out;
    }
    for (size_t t = 0; t < nt; t++) {
        if (!n_layers[t]) {
            st = kvt_error_set(KVT_ERR_INVALID_ARG, "no part holds a record of %s", h0->traces[t]);
            goto out;
        }
        trace_base[t] = base;
        base += (uint64_t)n_layers[t];
    }
    for (size_t s = 0; s < n; s++) {
        const kvt_selection *p = by_shard[s];
        for (size_t i = 0; i < kvt_selection_get_header(p)->n_records; i++) {
            kvt_selection_record rec, *r = &rec;
            kvt_selection_record_info(p, i, r);
            if (!kvt_shard_owns(trace_base[r->trace] + (uint64_t)r->layer, (int)s, (int)n)) {
                st = kvt_error_set(KVT_ERR_INVALID_ARG,
                                   "shard %zu/%zu holds layer %d of %s, which another shard "
                                   "replays: not a part of one sharded replay",
                                   s, n, r->layer, h0->traces[r->trace]);
                goto out;
            }
        }
    }
    if ((st = kvt_selection_writer_open_like(out, force, h0, &w)))
        goto out;
    base = 0;
    for (size_t t = 0; t < nt && !st; t++) {
        st = kvt_selection_writer_begin_trace(w, (int)t, n_layers[t], btok + t * nb);
        for (int l = 0; l < n_layers[t] && !st; l++) {
            int s = 0;
            while (s < (int)n && !kvt_shard_owns(base + (uint64_t)l, s, (int)n))
                s++;
            const kvt_selection *p = by_shard[s];
            size_t n_recs = 0, n_idx = 0, total = kvt_selection_get_header(p)->n_records;
            /* the owner's records of (t, l): contiguous, next in its file order */
            while (cur[s] + n_recs < total) {
                kvt_selection_record rec, *r = &rec;
                kvt_selection_record_info(p, cur[s] + n_recs, r);
                if ((size_t)r->trace != t || r->layer != l)
                    break;
                if (r->n > cap_pool - n_idx) {
                    size_t nc = cap_pool ? 2 * cap_pool : 4096;
                    while (nc - n_idx < r->n)
                        nc *= 2;
                    int32_t *g = kvt_realloc(pool, nc * sizeof(*pool));
                    if (!g) {
                        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
                        break;
                    }
                    pool = g;
                    cap_pool = nc;
                }
                if ((st = kvt_selection_copy_set(p, cur[s] + n_recs, pool + n_idx, r->n)))
                    break;
                if (n_recs == cap_recs) {
                    size_t nc = cap_recs ? 2 * cap_recs : 256;
                    kvt_selection_rec *g = kvt_realloc(recs, nc * sizeof(*recs));
                    if (!g) {
                        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
                        break;
                    }
                    recs = g;
                    cap_recs = nc;
                }
                recs[n_recs++] = (kvt_selection_rec){.policy = r->policy,
                                                     .budget = r->budget,
                                                     .layer = r->layer,
                                                     .head = r->head,
                                                     .step = r->step,
                                                     .n = r->n};
                n_idx += r->n;
            }
            for (size_t i = 0, o = 0; i < n_recs; o += recs[i++].n) /* the pool is final */
                recs[i].idx = pool + o;
            if (!st && !n_recs)
                st = kvt_error_set(KVT_ERR_INVALID_ARG,
                                   "layer %d of %s is in no part (shard %d/%zu lacks it, "
                                   "or its records are out of order)",
                                   l, h0->traces[t], s, n);
            if (!st)
                st = kvt_selection_writer_sink(w, l, recs, n_recs, true);
            cur[s] += n_recs;
        }
        if (!st)
            st = kvt_selection_writer_end_trace(w);
        base += (uint64_t)n_layers[t];
    }
    for (size_t s = 0; s < n && !st; s++)
        if (cur[s] != kvt_selection_get_header(by_shard[s])->n_records)
            st = kvt_error_set(KVT_ERR_INVALID_ARG,
                               "shard %zu/%zu holds records out of (trace, layer) order", s, n);
out:
    if (w) {
        if (st)
            kvt_selection_writer_discard(w); /* removes the temporary; the error stays */
        else
            st = kvt_selection_writer_close(w); /* renames into place */
    }
    for (size_t i = 0; sel && i < n; i++)
        kvt_selection_free(sel[i]);
    kvt_free(sel);
    kvt_free(by_shard);
    kvt_free(cur);
    kvt_free(n_layers);
    kvt_free(trace_base);
    kvt_free(btok);
    kvt_free(recs);
    kvt_free(pool);
    return st;
}
