/* summary.c - the result set (kvt_results) and the aggregation of per-head metrics into
 * per-layer, per-trace (model) and multi-trace summaries, per modality included. Means skip
 * NaN (not applicable); entries and bytes are sums; ratios are recomputed from the sums.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "kvt_analysis.h"

kvt_status kvt_results_create(kvt_policy *const *pols, size_t n_pol, const kvt_budget *budgets,
                              size_t n_budgets, kvt_results **out)
{
    *out = NULL;
    KVT_RETURN_IF(n_pol < 1 || n_budgets < 1, KVT_ERR_INVALID_ARG, "results: no policy/budget");
    kvt_results *r = kvt_calloc(1, sizeof(*r));
    KVT_RETURN_IF(!r, KVT_ERR_NOMEM, "out of memory");
    r->results_version = KVT_RESULTS_VERSION;
    char gen[64];
    snprintf(gen, sizeof(gen), "kvtrace %s", kvt_version_string());
    r->generator = kvt_strdup(gen);
    r->policies = kvt_calloc(n_pol, sizeof(*r->policies));
    r->budgets = kvt_calloc(n_budgets, sizeof(*r->budgets));
    r->coverage_probes = -1;
    if (!r->generator || !r->policies || !r->budgets)
        goto out_nomem;
    r->n_policies = n_pol;
    for (size_t i = 0; i < n_pol; i++) {
        r->policies[i].label = kvt_strdup(kvt_policy_label(pols[i]));
        r->policies[i].name = kvt_strdup(kvt_policy_name(pols[i]));
        r->policies[i].options_json = kvt_policy_options_json(pols[i]);
        r->policies[i].flags = kvt_policy_flags(pols[i]);
        if (!r->policies[i].label || !r->policies[i].name || !r->policies[i].options_json)
            goto out_nomem;
    }
    r->n_budgets = n_budgets;
    memcpy(r->budgets, budgets, n_budgets * sizeof(*budgets));
    *out = r;
    return KVT_OK;
out_nomem:
    kvt_results_free(r);
    return kvt_error_set(KVT_ERR_NOMEM, "out of memory");
}

void kvt_results_free(kvt_results *r)
{
    if (!r)
        return;
    for (size_t i = 0; r->policies && i < r->n_policies; i++) {
        kvt_free(r->policies[i].label);
        kvt_free(r->policies[i].name);
        kvt_free(r->policies[i].options_json);
    }
    kvt_free(r->policies);
    kvt_free(r->budgets);
    for (size_t i = 0; i < r->n_traces; i++)
        kvt_trace_result_free(r->traces[i]);
    kvt_free(r->traces);
    kvt_free(r->units);
    kvt_free(r->generator);
    kvt_free(r);
}

kvt_status kvt_results_set_shard(kvt_results *r, int index, int count, const int *units,
                                 size_t n_units)
{
    KVT_RETURN_IF(count < 1 || index < 0 || index >= count, KVT_ERR_INVALID_ARG,
                  "results: shard %d/%d out of range", index, count);
    int *u = NULL;
    if (n_units) {
        u = kvt_malloc(n_units * 2 * sizeof(int));
        KVT_RETURN_IF(!u, KVT_ERR_NOMEM, "out of memory");
        memcpy(u, units, n_units * 2 * sizeof(int));
    }
    kvt_free(r->units);
    r->units = u;
    r->n_units = n_units;
    r->shard_index = index;
    r->shard_count = count;
    return KVT_OK;
}

kvt_status kvt_results_add_trace(kvt_results *r, kvt_trace_result *t)
{
    if (t->n_policies != r->n_policies || t->n_budgets != r->n_budgets) {
        kvt_trace_result_free(t);
        return kvt_error_set(KVT_ERR_INVALID_ARG, "results: trace with other policies/budgets");
    }
    kvt_trace_result **a = kvt_realloc(r->traces, (r->n_traces + 1) * sizeof(*a));
    if (!a) {
        kvt_trace_result_free(t);
        return kvt_error_set(KVT_ERR_NOMEM, "out of memory");
    }
    r->traces = a;
    r->traces[r->n_traces++] = t;
    return KVT_OK;
}

typedef struct acc {
    double s;
    long n;
} acc;

static void add(acc *a, double x)
{
    if (!isnan(x)) {
        a->s += x;
        a->n++;
    }
}

static double mean(const acc *a)
{
    return a->n ? a->s / (double)a->n : NAN;
}

kvt_status kvt_summarize_trace(const kvt_trace_result *t, size_t pol, size_t bud, int layer,
                               kvt_run_summary *out)
{
    KVT_RETURN_IF(pol >= t->n_policies || bud >= t->n_budgets || layer >= t->n_layers,
                  KVT_ERR_INVALID_ARG, "summary: index out of range");
    memset(out, 0, sizeof(*out));
    int l0 = layer < 0 ? 0 : layer, l1 = layer < 0 ? t->n_layers : layer + 1;
    int H = t->policy_heads[pol];
    acc nk = {0}, rw = {0}, ew = {0}, rd = {0}, ed = {0}, cv = {0}, cr = {0}, rk = {0}, ra = {0},
        ov = {0}, cd = {0}, ho = {0}, rwm[KVT_N_MODALITIES] = {{0}}, cvm[KVT_N_MODALITIES] = {{0}},
        rkm[KVT_N_MODALITIES] = {{0}}, ram[KVT_N_MODALITIES] = {{0}};
    double kept = 0.0, km[KVT_N_MODALITIES] = {0};
    for (int l = l0; l < l1; l++) {
        for (int g = 0; g < t->n_kv_heads; g++) {
            add(&ra, t->r_all[(size_t)l * t->n_kv_heads + g]);
            for (int k = 0; k < KVT_N_MODALITIES; k++)
                add(&ram[k], t->r_all_mod[((size_t)l * t->n_kv_heads + g) * KVT_N_MODALITIES + k]);
        }
        for (int h = 0; h < H; h++) {
            const kvt_head_metrics *m = kvt_trace_result_at(t, pol, bud, l, h);
            add(&nk, m->n_keep);
            if (!isnan(m->n_keep))
                kept += m->n_keep;
            add(&rw, m->recall_window);
            add(&ew, m->err_window);
            add(&rd, m->recall_decode);
            add(&ed, m->err_decode);
            add(&cv, m->coverage);
            add(&cr, m->coverage_radius);
            add(&rk, m->r_kept);
            add(&ov, m->oracle_overlap);
            add(&cd, m->coverage_dropped);
            add(&ho, m->head_overlap);
            for (int k = 0; k < KVT_N_MODALITIES; k++) {
                add(&rwm[k], m->recall_window_mod[k]);
                add(&cvm[k], m->coverage_mod[k]);
                add(&rkm[k], m->r_kept_mod[k]);
                if (!isnan(m->n_keep_mod[k]))
                    km[k] += m->n_keep_mod[k];
            }
        }
    }
    out->n_keep = mean(&nk);
    out->recall_window = mean(&rw);
    out->err_window = mean(&ew);
    out->recall_decode = mean(&rd);
    out->err_decode = mean(&ed);
    out->coverage = mean(&cv);
    out->coverage_radius = mean(&cr);
    out->r_kept = mean(&rk);
    out->r_all = mean(&ra);
    out->oracle_overlap = mean(&ov);
    out->coverage_dropped = mean(&cd);
    out->head_overlap = mean(&ho);
    int nl = l1 - l0;
    for (int k = 0; k < KVT_N_MODALITIES; k++) {
        out->recall_window_mod[k] = mean(&rwm[k]);
        out->coverage_mod[k] = mean(&cvm[k]);
        out->r_kept_mod[k] = mean(&rkm[k]);
        out->r_all_mod[k] = mean(&ram[k]);
        out->kept_mod[k] = t->has_modality ? km[k] : NAN;
        out->total_mod[k] =
            t->has_modality ? (double)t->modality_counts[k] * nl * t->n_kv_heads : NAN;
    }
    double eb = (double)t->head_dim * 2.0 * t->kv_elem_bytes;
    out->kept_entries = kept;
    out->full_entries = (double)nl * t->n_kv_heads * t->n_tokens;
    out->kept_bytes = kept * eb;
    out->full_bytes = out->full_entries * eb;
    out->compression_ratio = kept > 0 ? out->full_entries / kept : NAN;
    out->kept_fraction = out->full_entries > 0 ? kept / out->full_entries : NAN;
    return KVT_OK;
}

kvt_status kvt_summarize_results(const kvt_results *r, size_t pol, size_t bud, kvt_run_summary *out)
{
    memset(out, 0, sizeof(*out));
    KVT_RETURN_IF(r->n_traces == 0, KVT_ERR_INVALID_ARG, "summary: no trace");
    enum { NV = 11 }; /* per-trace means averaged over traces */
    acc a[NV + 4 * KVT_N_MODALITIES];
    memset(a, 0, sizeof(a));
    double kept_mod[KVT_N_MODALITIES] = {0}, tot_mod[KVT_N_MODALITIES] = {0};
    bool any_mod = false;
    for (size_t i = 0; i < r->n_traces; i++) {
        kvt_run_summary s;
        KVT_FORWARD(kvt_summarize_trace(r->traces[i], pol, bud, -1, &s));
        const double v[NV] = {s.n_keep,           s.recall_window, s.err_window,
                              s.recall_decode,    s.err_decode,    s.coverage,
                              s.coverage_radius,  s.r_kept,        s.oracle_overlap,
                              s.coverage_dropped, s.head_overlap};
        for (int k = 0; k < NV; k++)
            add(&a[k], v[k]);
        for (int k = 0; k < KVT_N_MODALITIES; k++) {
            add(&a[NV + k], s.recall_window_mod[k]);
            add(&a[NV + KVT_N_MODALITIES + k], s.coverage_mod[k]);
            add(&a[NV + 2 * KVT_N_MODALITIES + k], s.r_kept_mod[k]);
            add(&a[NV + 3 * KVT_N_MODALITIES + k], s.r_all_mod[k]);
            if (!isnan(s.kept_mod[k])) {
                any_mod = true;
                kept_mod[k] += s.kept_mod[k];
                tot_mod[k] += s.total_mod[k];
            }
        }
        out->r_all += s.r_all / (double)r->n_traces;
        out->kept_entries += s.kept_entries;
        out->full_entries += s.full_entries;
        out->kept_bytes += s.kept_bytes;
        out->full_bytes += s.full_bytes;
    }
    out->n_keep = mean(&a[0]);
    out->recall_window = mean(&a[1]);
    out->err_window = mean(&a[2]);
    out->recall_decode = mean(&a[3]);
    out->err_decode = mean(&a[4]);
    out->coverage = mean(&a[5]);
    out->coverage_radius = mean(&a[6]);
    out->r_kept = mean(&a[7]);
    out->oracle_overlap = mean(&a[8]);
    out->coverage_dropped = mean(&a[9]);
    out->head_overlap = mean(&a[10]);
    for (int k = 0; k < KVT_N_MODALITIES; k++) {
        out->recall_window_mod[k] = mean(&a[NV + k]);
        out->coverage_mod[k] = mean(&a[NV + KVT_N_MODALITIES + k]);
        out->r_kept_mod[k] = mean(&a[NV + 2 * KVT_N_MODALITIES + k]);
        out->r_all_mod[k] = mean(&a[NV + 3 * KVT_N_MODALITIES + k]);
        out->kept_mod[k] = any_mod ? kept_mod[k] : NAN;
        out->total_mod[k] = any_mod ? tot_mod[k] : NAN;
    }
    out->compression_ratio = out->kept_bytes > 0 ? out->full_bytes / out->kept_bytes : NAN;
    out->kept_fraction = out->full_entries > 0 ? out->kept_entries / out->full_entries : NAN;
    return KVT_OK;
}
