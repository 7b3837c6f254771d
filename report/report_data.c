/* report_data.c - the numbers behind the per-head heatmaps, the modality retention figure and
 * the layer allocation figures of `kvtrace report`: per-(layer, head) metric values and kept
 * entries and per-layer kept entries averaged over the traces, which policies allocate, the heatmap
 * budget, and where Chart.js is read from. Reads a kvt_results only (analysis/).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvt_report.h"
#include "report_internal.h"

#ifndef KVT_CHARTJS_PATH /* set by report/CMakeLists.txt (cache variable of the same name) */
#define KVT_CHARTJS_PATH "/usr/share/javascript/chart.js/chart.min.js"
#endif

/* the mean over the traces that have (layer, head) of a value of its cell, NaN values left
 * out (metric: a kvt_rec_metric, or -1 for the kept entries) */
static double head_mean(const kvt_results *r, size_t pol, size_t bud, int metric, int layer,
                        int head)
{
    double sum = 0.0;
    int n = 0;
    if (pol >= r->n_policies || bud >= r->n_budgets || layer < 0 || head < 0)
        return NAN;
    for (size_t i = 0; i < r->n_traces; i++) {
        const kvt_trace_result *t = r->traces[i];
        if (layer >= t->n_layers || head >= t->policy_heads[pol])
            continue;
        const kvt_head_metrics *m = kvt_trace_result_at(t, pol, bud, layer, head);
        double v = metric < 0 ? m->n_keep : kvt_rec_head_value(m, (kvt_rec_metric)metric);
        if (!isnan(v))
            sum += v, n++;
    }
    return n ? sum / n : NAN;
}

double kvt_report_head_value(const kvt_results *r, size_t pol, size_t bud, kvt_rec_metric metric,
                             int layer, int head)
{
    return head_mean(r, pol, bud, (int)metric, layer, head);
}

double kvt_report_kv_heads_factor(const kvt_results *r, size_t pol)
{
    if (r->n_traces == 0 || pol >= r->n_policies || r->traces[0]->n_kv_heads < 1)
        return 1.0;
    const kvt_trace_result *t = r->traces[0];
    return (double)t->policy_heads[pol] / t->n_kv_heads;
}

double kvt_report_head_keep(const kvt_results *r, size_t pol, size_t bud, int layer, int head)
{
    return head_mean(r, pol, bud, -1, layer, head);
}

double kvt_report_layer_keep(const kvt_results *r, size_t pol, size_t bud, int layer)
{
    double sum = 0.0;
    int n = 0;
    if (pol >= r->n_policies || bud >= r->n_budgets || layer < 0)
        return NAN;
    for (size_t i = 0; i < r->n_traces; i++) {
        const kvt_trace_result *t = r->traces[i];
        kvt_run_summary s;
        if (layer >= t->n_layers || kvt_summarize_trace(t, pol, bud, layer, &s) || isnan(s.n_keep))
            continue;
        sum += s.n_keep, n++;
    }
    return n ? sum / n : NAN;
}

static bool is_reference(const kvt_results *r, size_t pol)
{
    const char *name = r->policies[pol].name;
    return !strcmp(name, "full") || !strcmp(name, "oracle");
}

bool kvt_report_policy_allocates(const kvt_results *r, size_t pol)
{
    if (pol >= r->n_policies || is_reference(r, pol))
        return false;
    for (size_t i = 0; i < r->n_traces; i++) {
        const kvt_trace_result *t = r->traces[i];
        for (size_t b = 0; b < r->n_budgets; b++) {
            double first = NAN;
            for (int l = 0; l < t->n_layers; l++)
                for (int h = 0; h < t->policy_heads[pol]; h++) {
                    double v = kvt_trace_result_at(t, pol, b, l, h)->n_keep;
                    if (isnan(v))
                        continue;
                    if (isnan(first))
                        first = v;
                    else if (fabs(v - first) > 1e-9)
                        return true;
                }
        }
    }
    return false;
}

bool kvt_report_metric_measured(const kvt_results *r, kvt_rec_metric metric)
{
    for (size_t p = 0; p < r->n_policies; p++)
        for (size_t b = 0; b < r->n_budgets; b++) {
            kvt_run_summary s;
            if (!kvt_summarize_results(r, p, b, &s) && !isnan(kvt_rec_summary_value(&s, metric)))
                return true;
        }
    return false;
}

/* a budget's tokens kept (at most the prompt, as recommend counts them), the mean over traces;
   ties (two budgets that keep the whole prompt) stay in the order given */
static double budget_tokens_mean(const kvt_results *r, size_t b)
{
    double s = 0.0;
    for (size_t t = 0; t < r->n_traces; t++)
        s += kvt_report_kept_tokens(r->traces[t], b);
    return r->n_traces ? s / (double)r->n_traces : (double)r->budgets[b].value;
}

void kvt_report_budget_order(const kvt_results *r, size_t *order)
{
    for (size_t b = 0; b < r->n_budgets; b++) { /* insertion sort: stable, few budgets */
        size_t i = b;
        double key = budget_tokens_mean(r, b);
        while (i > 0 && budget_tokens_mean(r, order[i - 1]) > key) {
            order[i] = order[i - 1];
            i--;
        }
        order[i] = b;
    }
}

/* the middle budget of the sweep, in size order */
static size_t middle_budget(const kvt_results *r)
{
    size_t *order = kvt_malloc(r->n_budgets * sizeof(size_t)), b = r->n_budgets / 2;
    if (order) {
        kvt_report_budget_order(r, order);
        b = order[r->n_budgets / 2];
    }
    kvt_free(order);
    return b;
}

size_t kvt_report_heat_budget(const kvt_results *r, const kvt_recommend_opts *target,
                              bool *recommended)
{
    const kvt_recommend_opts dflt = KVT_RECOMMEND_OPTS_DEFAULT;
    kvt_recommendation *rec = NULL;
    size_t b = middle_budget(r);
    bool found = false;
    if (kvt_recommend(r, target ? target : &dflt, &rec) == KVT_OK && rec->found) {
        b = rec->budget;
        found = true;
    }
    kvt_recommendation_free(rec);
    if (recommended)
        *recommended = found;
    return b;
}

double kvt_report_modality_share(const kvt_results *r, size_t pol, size_t bud, int m)
{
    /* kept entries over (selection heads x layers x the modality's tokens), summed over the
       traces: a heads=query policy's G sets per KV head (its stored copies, which kept_entries
       counts) are G heads here, so the share stays that of the tokens a head keeps */
    double kept = 0.0, total = 0.0;
    if (m < 0 || m >= KVT_N_MODALITIES || pol >= r->n_policies || bud >= r->n_budgets)
        return NAN;
    for (size_t i = 0; i < r->n_traces; i++) {
        const kvt_trace_result *t = r->traces[i];
        kvt_run_summary s;
        if (!t->has_modality || kvt_summarize_trace(t, pol, bud, -1, &s) || isnan(s.kept_mod[m]))
            continue;
        const double g = t->n_kv_heads > 0 ? (double)t->policy_heads[pol] / t->n_kv_heads : 1.0;
        kept += s.kept_mod[m];
        total += s.total_mod[m] * g;
    }
    return total > 0 ? kept / total : NAN;
}

double kvt_report_modality_tokens(const kvt_results *r, int m)
{
    double n = 0.0;
    if (m < 0 || m >= KVT_N_MODALITIES)
        return 0.0;
    for (size_t i = 0; i < r->n_traces; i++)
        if (r->traces[i]->has_modality)
            n += (double)r->traces[i]->modality_counts[m];
    return n;
}

const char *kvt_report_chartjs_path(void)
{
    const char *env = getenv("KVT_CHARTJS");
    return env && *env ? env : KVT_CHARTJS_PATH;
}
