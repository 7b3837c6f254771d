/* results_merge.c - `kvtrace merge`: combines the partial results of `replay --shard i/n` into
 * the result of one unsharded run. Checks the parts first (same settings, every shard and every
 * (trace, layer) unit exactly once), then copies per-head metrics, r_all and r_all by modality
 * unit by unit into the first part; every aggregate is recomputed from those by the writer.
 */
#include <stdio.h>
#include <string.h>

#include "kvt_analysis.h"

static const char *nm(const char *const *names, size_t i)
{
    return names && names[i] ? names[i] : "a part";
}

static bool same_str(const char *a, const char *b)
{
    return !strcmp(a ? a : "", b ? b : "");
}

/* the settings of b against a; a message naming the first difference */
static kvt_status check_settings(const kvt_results *a, const kvt_results *b, const char *an,
                                 const char *bn)
{
    const char *what = NULL;
    if (a->n_policies != b->n_policies)
        what = "a different number of policies";
    for (size_t i = 0; !what && i < a->n_policies; i++) {
        const kvt_results_policy *x = &a->policies[i], *y = &b->policies[i];
        if (!same_str(x->label, y->label) || !same_str(x->name, y->name))
            return kvt_error_set(KVT_ERR_INVALID_ARG,
                                 "%s and %s were run with different policies (policy %zu: %s "
                                 "vs %s); merge parts of one sharded replay only",
                                 an, bn, i, x->label, y->label);
        if (!same_str(x->options_json, y->options_json)) /* e.g. random's seed */
            return kvt_error_set(KVT_ERR_INVALID_ARG,
                                 "%s and %s were run with different options of policy %zu (%s): "
                                 "%s vs %s; merge parts of one sharded replay only",
                                 an, bn, i, x->label, x->options_json ? x->options_json : "",
                                 y->options_json ? y->options_json : "");
    }
    if (!what && a->n_budgets != b->n_budgets)
        what = "a different number of budgets";
    for (size_t i = 0; !what && i < a->n_budgets; i++)
        if (strcmp(a->budgets[i].text, b->budgets[i].text) ||
            a->budgets[i].is_fraction != b->budgets[i].is_fraction ||
            a->budgets[i].value != b->budgets[i].value)
            return kvt_error_set(KVT_ERR_INVALID_ARG,
                                 "%s and %s were run with different budgets (budget %zu: %s vs "
                                 "%s); merge parts of one sharded replay only",
                                 an, bn, i, a->budgets[i].text, b->budgets[i].text);
    if (!what && a->seed != b->seed)
        what = "different --seed values";
    if (!what && a->coverage_probes != b->coverage_probes)
        what = "different --coverage-probes values";
    if (!what && a->per_query_head != b->per_query_head)
        what = "different --per-query-head settings";
    if (!what && a->n_traces != b->n_traces)
        what = "a different number of traces";
    for (size_t t = 0; !what && t < a->n_traces; t++) {
        const kvt_trace_result *x = a->traces[t], *y = b->traces[t];
        const char *xp = x->path ? x->path : "", *yp = y->path ? y->path : "";
        if (!same_str(x->path, y->path))
            return kvt_error_set(KVT_ERR_INVALID_ARG,
                                 "%s and %s were run on different traces (trace %zu: %s vs %s); "
                                 "give every shard the same traces in the same order",
                                 an, bn, t, xp, yp);
        if (x->n_layers != y->n_layers || x->n_q_heads != y->n_q_heads ||
            x->n_kv_heads != y->n_kv_heads || x->n_tokens != y->n_tokens ||
            !same_str(x->header_json, y->header_json))
            return kvt_error_set(
                KVT_ERR_INVALID_ARG,
                "%s and %s were run on different files named %s (trace %zu: L=%d Hq=%d Hkv=%d "
                "T=%d vs L=%d Hq=%d Hkv=%d T=%d%s): give every shard the same files",
                an, bn, xp, t, x->n_layers, x->n_q_heads, x->n_kv_heads, x->n_tokens, y->n_layers,
                y->n_q_heads, y->n_kv_heads, y->n_tokens,
                x->n_layers == y->n_layers && x->n_q_heads == y->n_q_heads &&
                        x->n_kv_heads == y->n_kv_heads && x->n_tokens == y->n_tokens
                    ? ", and their headers differ"
                    : "");
        if (x->fingerprint[0] && y->fingerprint[0] && strcmp(x->fingerprint, y->fingerprint))
            return kvt_error_set(KVT_ERR_INVALID_ARG,
                                 "%s and %s were run on different files named %s (trace %zu: "
                                 "fingerprint %s vs %s): give every shard the same files",
                                 an, bn, x->path ? x->path : "", t, x->fingerprint, y->fingerprint);
    }
    if (what)
        return kvt_error_set(KVT_ERR_INVALID_ARG,
                             "%s and %s were run with %s; merge parts of one sharded replay only",
                             an, bn, what);
    return KVT_OK;
}

kvt_status kvt_results_merge(kvt_results *const *parts, const char *const *names, size_t n)
{
    KVT_RETURN_IF(n < 1, KVT_ERR_INVALID_ARG, "merge: no part given");
    for (size_t i = 0; i < n; i++)
        KVT_RETURN_IF(parts[i]->shard_count < 1, KVT_ERR_INVALID_ARG,
                      "%s is not a partial result (no \"shard\" object: it was written without "
                      "replay --shard)",
                      nm(names, i));
    const kvt_results *a = parts[0];
    int count = a->shard_count;
    for (size_t i = 1; i < n; i++) {
        KVT_RETURN_IF(parts[i]->shard_count != count, KVT_ERR_INVALID_ARG,
                      "%s is shard %d/%d but %s is shard %d/%d: different shard counts",
                      nm(names, 0), a->shard_index, count, nm(names, i), parts[i]->shard_index,
                      parts[i]->shard_count);
        KVT_FORWARD(check_settings(a, parts[i], nm(names, 0), nm(names, i)));
    }
    for (size_t i = 0; i < n; i++)
        for (size_t j = i + 1; j < n; j++)
            KVT_RETURN_IF(parts[i]->shard_index == parts[j]->shard_index, KVT_ERR_INVALID_ARG,
                          "shard %d/%d given twice (%s and %s)", parts[i]->shard_index, count,
                          nm(names, i), nm(names, j));
    KVT_RETURN_IF((size_t)count != n, KVT_ERR_INVALID_ARG,
                  "the parts are shards of %d but %zu part%s given: every shard 0..%d is needed",
                  count, n, n == 1 ? " was" : "s were", count - 1);
    /* every (trace, layer) unit exactly once */
    size_t total = 0;
    for (size_t t = 0; t < a->n_traces; t++)
        total += (size_t)a->traces[t]->n_layers;
    size_t *off = kvt_calloc(a->n_traces + 1, sizeof(size_t));
    int *owner = kvt_malloc((total ? total : 1) * sizeof(int));
    kvt_status st = KVT_OK;
    if (!off || !owner) {
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
        goto out_free;
    }
    for (size_t t = 0; t < a->n_traces; t++)
        off[t + 1] = off[t] + (size_t)a->traces[t]->n_layers;
    for (size_t u = 0; u < total; u++)
        owner[u] = -1;
    for (size_t i = 0; i < n; i++)
        for (size_t k = 0; k < parts[i]->n_units; k++) {
            int t = parts[i]->units[2 * k], l = parts[i]->units[2 * k + 1];
            if (t < 0 || (size_t)t >= a->n_traces || l < 0 || l >= a->traces[t]->n_layers) {
                st = kvt_error_set(KVT_ERR_INVALID_ARG,
                                   "%s lists unit (trace %d, layer %d), "
                                   "which does not exist",
                                   nm(names, i), t, l);
                goto out_free;
            }
            int *o = &owner[off[t] + (size_t)l];
            if (*o >= 0) {
                st = kvt_error_set(KVT_ERR_INVALID_ARG,
                                   "unit (trace %s, layer %d) is in both %s and %s",
                                   a->traces[t]->path, l, nm(names, (size_t)*o), nm(names, i));
                goto out_free;
            }
            *o = (int)i;
        }
    for (size_t t = 0; t < a->n_traces; t++)
        for (int l = 0; l < a->traces[t]->n_layers; l++)
            if (owner[off[t] + (size_t)l] < 0) {
                st = kvt_error_set(KVT_ERR_INVALID_ARG,
                                   "unit (trace %s, layer %d) is in no part: a shard's output "
                                   "is incomplete",
                                   a->traces[t]->path, l);
                goto out_free;
            }
    /* copy each unit's per-head data into parts[0] */
    kvt_results *dst = parts[0];
    for (size_t t = 0; t < dst->n_traces; t++) {
        kvt_trace_result *d = dst->traces[t];
        for (int l = 0; l < d->n_layers; l++) {
            int i = owner[off[t] + (size_t)l];
            if (i == 0)
                continue;
            const kvt_trace_result *s = parts[i]->traces[t];
            for (size_t p = 0; p < d->n_policies; p++)
                for (size_t b = 0; b < d->n_budgets; b++)
                    memcpy(kvt_trace_result_at(d, p, b, l, 0), kvt_trace_result_at(s, p, b, l, 0),
                           (size_t)d->n_q_heads * sizeof(kvt_head_metrics));
            memcpy(d->r_all + (size_t)l * d->n_kv_heads, s->r_all + (size_t)l * d->n_kv_heads,
                   (size_t)d->n_kv_heads * sizeof(double));
            memcpy(d->r_all_mod + (size_t)l * d->n_kv_heads * KVT_N_MODALITIES,
                   s->r_all_mod + (size_t)l * d->n_kv_heads * KVT_N_MODALITIES,
                   (size_t)d->n_kv_heads * KVT_N_MODALITIES * sizeof(double));
        }
    }
    kvt_free(dst->units);
    dst->units = NULL;
    dst->n_units = 0;
    dst->shard_index = dst->shard_count = 0;
out_free:
    kvt_free(off);
    kvt_free(owner);
    return st;
}
