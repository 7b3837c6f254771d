/* recommend.c - `kvtrace recommend`: reads the measured quality/cost curves of a results.json
 * (aggregate over traces) and picks the cheapest (policy, budget) meeting a target, the knee
 * of each policy's curve, and per-layer / per-head budgets from the per-layer and per-head
 * grids. Definitions are in kvt_report.h (kvt_recommend).
 */
#include <math.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "kvt_report.h"
#include "report_internal.h"

static const char *const metric_names[] = {"err_window",    "err_decode", "recall_window",
                                           "recall_decode", "coverage",   "coverage_dropped",
                                           "head_overlap"};
#define N_METRICS ((int)(sizeof(metric_names) / sizeof(metric_names[0])))

const char *kvt_rec_metric_name(kvt_rec_metric m)
{
    return (int)m >= 0 && (int)m < N_METRICS ? metric_names[m] : NULL;
}

kvt_status kvt_rec_metric_parse(const char *name, kvt_rec_metric *out)
{
    for (int i = 0; i < N_METRICS; i++)
        if (!strcmp(name, metric_names[i])) {
            *out = (kvt_rec_metric)i;
            return KVT_OK;
        }
    return kvt_error_set(KVT_ERR_INVALID_ARG,
                         "unknown metric '%s' (err_window, err_decode, recall_window, "
                         "recall_decode, coverage, coverage_dropped)",
                         name);
}

bool kvt_rec_metric_is_error(kvt_rec_metric m)
{
    return m == KVT_REC_METRIC_ERR_WINDOW || m == KVT_REC_METRIC_ERR_DECODE;
}

const char *kvt_rec_metric_kind(kvt_rec_metric m)
{
    switch (m) {
    case KVT_REC_METRIC_ERR_WINDOW:
    case KVT_REC_METRIC_ERR_DECODE:
        return "an output error metric: it needs --max-error E";
    case KVT_REC_METRIC_RECALL_WINDOW:
    case KVT_REC_METRIC_RECALL_DECODE:
        return "a recall metric: it needs --min-recall R";
    case KVT_REC_METRIC_COVERAGE:
    case KVT_REC_METRIC_COVERAGE_DROPPED:
        return "a coverage metric: it needs --min-recall R";
    default:
        return "not a target metric";
    }
}

double kvt_rec_summary_value(const kvt_run_summary *s, kvt_rec_metric m)
{
    switch (m) {
    case KVT_REC_METRIC_ERR_WINDOW:
        return s->err_window;
    case KVT_REC_METRIC_ERR_DECODE:
        return s->err_decode;
    case KVT_REC_METRIC_RECALL_WINDOW:
        return s->recall_window;
    case KVT_REC_METRIC_RECALL_DECODE:
        return s->recall_decode;
    case KVT_REC_METRIC_COVERAGE:
        return s->coverage;
    case KVT_REC_METRIC_COVERAGE_DROPPED:
        return s->coverage_dropped;
    case KVT_REC_METRIC_HEAD_OVERLAP:
        return s->head_overlap;
    default:
        return NAN;
    }
}

double kvt_rec_head_value(const kvt_head_metrics *h, kvt_rec_metric m)
{
    switch (m) {
    case KVT_REC_METRIC_ERR_WINDOW:
        return h->err_window;
    case KVT_REC_METRIC_ERR_DECODE:
        return h->err_decode;
    case KVT_REC_METRIC_RECALL_WINDOW:
        return h->recall_window;
    case KVT_REC_METRIC_RECALL_DECODE:
        return h->recall_decode;
    case KVT_REC_METRIC_COVERAGE:
        return h->coverage;
    case KVT_REC_METRIC_COVERAGE_DROPPED:
        return h->coverage_dropped;
    case KVT_REC_METRIC_HEAD_OVERLAP:
        return h->head_overlap;
    default:
        return NAN;
    }
}

static bool meets(const kvt_recommendation *rec, double v)
{
    return !isnan(v) && (rec->target_is_max ? v <= rec->target : v >= rec->target);
}

/* (cost a, value va) is a better setting than (cost b, value vb): cheaper, or as cheap and
 * of better quality */
static bool better(const kvt_recommendation *rec, double a, double va, double b, double vb)
{
    return a < b || (a == b && (rec->target_is_max ? va < vb : va > vb));
}

static bool is_reference(const kvt_results_policy *p)
{
    return !strcmp(p->name, "full") || !strcmp(p->name, "oracle");
}

static bool is_decode_metric(kvt_rec_metric m)
{
    return m == KVT_REC_METRIC_ERR_DECODE || m == KVT_REC_METRIC_RECALL_DECODE;
}

/* tokens per head and layer that budget b keeps on trace t: a budget at or above the prompt
   keeps the prompt, not more */
/* whether some candidate policy has a value of metric m on trace t */
static bool trace_measures(const kvt_results *r, const kvt_trace_result *t, kvt_rec_metric m)
{
    for (size_t p = 0; p < r->n_policies; p++) {
        if (is_reference(&r->policies[p]))
            continue;
        for (size_t b = 0; b < r->n_budgets; b++)
            for (int l = 0; l < t->n_layers; l++)
                for (int h = 0; h < t->policy_heads[p]; h++)
                    if (!isnan(kvt_rec_head_value(kvt_trace_result_at(t, p, b, l, h), m)))
                        return true;
    }
    return false;
}

/* the error of a metric no candidate has a value of, saying why: only the references have
   it, or it needs decode queries and no trace has any */
static kvt_status not_measured(const kvt_results *r, kvt_rec_metric m, const kvt_run_summary *sum)
{
    const char *mn = kvt_rec_metric_name(m);
    size_t nb = r->n_budgets;
    bool candidate = false;
    for (size_t p = 0; p < r->n_policies; p++)
        candidate |= !is_reference(&r->policies[p]);
    if (!candidate) /* not a metric's fault */
        return kvt_error_set(KVT_ERR_INVALID_ARG,
                             "recommend: the results hold only reference policies (full, "
                             "oracle), which are never recommended: replay compression policies");
    char refs[64] = "";
    for (size_t p = 0; p < r->n_policies; p++) {
        bool has = false;
        for (size_t b = 0; b < nb; b++)
            has |= !isnan(kvt_rec_summary_value(&sum[p * nb + b], m));
        if (has && is_reference(&r->policies[p]) && !strstr(refs, r->policies[p].name)) {
            size_t n = strlen(refs);
            snprintf(refs + n, sizeof(refs) - n, "%s%s", n ? " and " : "", r->policies[p].name);
        }
    }
    if (refs[0])
        return kvt_error_set(KVT_ERR_INVALID_ARG,
                             "recommend: %s is measured only for %s (%s, never recommended)", mn,
                             refs, strstr(refs, " and ") ? "references" : "a reference");
    bool decode = false;
    for (size_t i = 0; i < r->n_traces; i++)
        decode |= r->traces[i]->n_decode > 0;
    if (is_decode_metric(m) && !decode)
        return kvt_error_set(KVT_ERR_INVALID_ARG,
                             "recommend: %s is not measured: %s no decode steps (try --metric %s)",
                             mn, r->n_traces == 1 ? "the trace has" : "no trace has",
                             m == KVT_REC_METRIC_ERR_DECODE ? "err_window" : "recall_window");
    return kvt_error_set(KVT_ERR_INVALID_ARG, "recommend: %s is not measured for any policy", mn);
}

void kvt_recommendation_free(kvt_recommendation *rec)
{
    if (!rec)
        return;
    for (size_t i = 0; rec->curves && i < rec->n_policies; i++) {
        kvt_free(rec->curves[i].value);
        kvt_free(rec->curves[i].n_keep);
        kvt_free(rec->curves[i].kept_entries);
    }
    kvt_free(rec->curves);
    kvt_free(rec->budget_keeps_all);
    kvt_free(rec->trace_measured);
    kvt_free(rec->layer_budget);
    kvt_free(rec->head_budget);
    kvt_free(rec->layer_alloc);
    kvt_free(rec);
}

/* Kneedle on the points (x[i], y[i]) of `idx` (n of them, sorted by x); returns a budget
 * index or -1. */
static int knee(const double *x, const double *y, const int *idx, int n)
{
    if (n < 3)
        return -1;
    double x0 = x[idx[0]], x1 = x[idx[n - 1]], y0 = y[idx[0]], y1 = y[idx[n - 1]];
    if (!(x1 > x0) || y1 == y0)
        return -1;
    int best = -1;
    double best_d = 0.0;
    for (int i = 1; i < n - 1; i++) {
        double d = (y[idx[i]] - y0) / (y1 - y0) - (x[idx[i]] - x0) / (x1 - x0);
        if (d > best_d + 1e-12) {
            best_d = d;
            best = idx[i];
        }
    }
    return best;
}

/* sort budget indices by key ascending (insertion sort; ties keep index order), skipping
 * NaN keys and NaN values; returns the count */
static int sorted_points(const double *key, const double *val, size_t n, int *idx)
{
    int k = 0;
    for (size_t b = 0; b < n; b++) {
        if (isnan(key[b]) || (val && isnan(val[b])))
            continue;
        int j = k++;
        while (j > 0 && key[idx[j - 1]] > key[b]) {
            idx[j] = idx[j - 1];
            j--;
        }
        idx[j] = (int)b;
    }
    return k;
}

/* the greedy layer allocation of kvt_recommend; lv [L, nb] in the order of `order`; lc [L, nb]
   the entries each layer keeps at each budget (budget order) */
static void allocate(kvt_recommendation *rec, const double *lv, size_t nb, const int *order,
                     int n_order, const double *lc)
{
    int L = rec->n_layers, *k = rec->layer_alloc;
    double sign = rec->target_is_max ? 1.0 : -1.0;
    rec->alloc_entries = NAN;
    for (int l = 0; l < L; l++)
        k[l] = 0;
    for (;;) {
        double s = 0.0;
        for (int l = 0; l < L; l++)
            s += lv[(size_t)l * nb + (size_t)k[l]];
        if (meets(rec, s / L))
            break;
        int best = -1;
        double best_gain = -INFINITY;
        for (int l = 0; l < L; l++) {
            if (k[l] + 1 >= n_order)
                continue;
            const double *v = &lv[(size_t)l * nb], *c = &lc[(size_t)l * nb];
            double added = c[order[k[l] + 1]] - c[order[k[l]]];
            double gain = sign * (v[k[l]] - v[k[l] + 1]) / (added > 0 ? added : 1.0);
            if (isnan(gain))
                gain = -INFINITY; /* still movable, as a last resort */
            if (best < 0 || gain > best_gain) {
                best = l;
                best_gain = gain;
            }
        }
        if (best < 0) { /* every layer at the largest budget and still short */
            for (int l = 0; l < L; l++)
                k[l] = -1;
            return;
        }
        k[best]++;
    }
    /* the greedy steps can overshoot (a big step taken last where a smaller one elsewhere
       would have done): step layers back down, the largest saving first, while the mean
       still meets the target */
    for (;;) {
        double s = 0.0;
        for (int l = 0; l < L; l++)
            s += lv[(size_t)l * nb + (size_t)k[l]];
        int best = -1;
        double best_save = 0.0;
        for (int l = 0; l < L; l++) {
            if (k[l] == 0)
                continue;
            const double *v = &lv[(size_t)l * nb], *c = &lc[(size_t)l * nb];
            double save = c[order[k[l]]] - c[order[k[l] - 1]];
            if (!isnan(v[k[l] - 1]) && meets(rec, (s - v[k[l]] + v[k[l] - 1]) / L) &&
                save > best_save) {
                best = l;
                best_save = save;
            }
        }
        if (best < 0)
            break;
        k[best]--;
    }
    rec->alloc_entries = 0.0;
    for (int l = 0; l < L; l++) {
        k[l] = order[k[l]];
        rec->alloc_entries += lc[(size_t)l * nb + (size_t)k[l]];
    }
}

static kvt_status suggest(const kvt_results *r, kvt_recommendation *rec)
{
    const kvt_trace_result *t0 = r->traces[0];
    size_t pol = rec->policy, nb = r->n_budgets;
    int L = t0->n_layers, H = t0->policy_heads[pol];
    for (size_t i = 1; i < r->n_traces; i++)
        if (r->traces[i]->n_layers != L || r->traces[i]->policy_heads[pol] != H)
            return KVT_OK; /* different models: no per-layer suggestion */
    /* the budgets in the order of the tokens they keep per head (summed over traces); each
       suggestion is priced by the entries the policy keeps there (lc, per head below), summed
       over the traces as summary.kept_entries is: a policy whose layers or heads keep other
       than the budget (quest's dense layers, adakv's allocation, chunkkv's whole chunks) is
       priced by what it keeps */
    kvt_status st = KVT_OK;
    double *cost = kvt_malloc(nb * sizeof(double));
    int *order = kvt_malloc(nb * sizeof(int));
    double *lv = kvt_malloc((size_t)L * nb * sizeof(double)); /* [L, nb] layer values */
    double *lc = kvt_calloc((size_t)L * nb, sizeof(double));  /* [L, nb] layer entries */
    size_t n_lh = (size_t)L * (size_t)H;
    rec->layer_budget = kvt_malloc((size_t)L * sizeof(int));
    rec->layer_alloc = kvt_malloc((size_t)L * sizeof(int));
    rec->head_budget = kvt_malloc(n_lh * sizeof(int));
    if (!cost || !order || !lv || !lc || !rec->layer_budget || !rec->head_budget ||
        !rec->layer_alloc) {
        st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
        goto out;
    }
    for (size_t b = 0; b < nb; b++) {
        cost[b] = 0.0;
        for (size_t i = 0; i < r->n_traces; i++)
            cost[b] += kvt_report_kept_tokens(r->traces[i], b);
    }
    int n_order = sorted_points(cost, NULL, nb, order);
    rec->n_layers = L;
    rec->n_heads = H;
    rec->uniform_entries = 0.0;
    rec->layer_entries = 0.0;
    rec->head_entries = 0.0;
    for (int l = 0; l < L; l++) {
        rec->layer_budget[l] = -1;
        for (int k = 0; k < n_order; k++) {
            double s = 0.0;
            int n = 0;
            for (size_t i = 0; i < r->n_traces; i++) {
                kvt_run_summary sm;
                if ((st = kvt_summarize_trace(r->traces[i], pol, (size_t)order[k], l, &sm)))
                    goto out;
                lc[(size_t)l * nb + (size_t)order[k]] += sm.kept_entries;
                double v = kvt_rec_summary_value(&sm, rec->metric);
                if (!isnan(v))
                    s += v, n++;
            }
            lv[(size_t)l * nb + (size_t)k] = n ? s / n : NAN;
            if (rec->layer_budget[l] < 0 && n && meets(rec, s / n))
                rec->layer_budget[l] = order[k];
        }
        rec->uniform_entries += lc[(size_t)l * nb + rec->budget];
        rec->layer_entries +=
            rec->layer_budget[l] < 0 ? NAN : lc[(size_t)l * nb + (size_t)rec->layer_budget[l]];
        for (int h = 0; h < H; h++) {
            int *hb = &rec->head_budget[(size_t)l * H + h];
            *hb = -1;
            for (int k = 0; k < n_order && *hb < 0; k++) {
                double s = 0.0;
                int n = 0;
                for (size_t i = 0; i < r->n_traces; i++) {
                    double v = kvt_rec_head_value(
                        kvt_trace_result_at(r->traces[i], pol, (size_t)order[k], l, h),
                        rec->metric);
                    if (!isnan(v))
                        s += v, n++;
                }
                if (n && meets(rec, s / n))
                    *hb = order[k];
            }
            for (size_t i = 0; i < r->n_traces && *hb >= 0; i++) { /* a null head: none */
                double nk = kvt_trace_result_at(r->traces[i], pol, (size_t)*hb, l, h)->n_keep;
                rec->head_entries += isnan(nk) ? 0.0 : nk;
            }
            if (*hb < 0)
                rec->head_entries = NAN;
        }
    }
    allocate(rec, lv, nb, order, n_order, lc);
    /* the greedy steps can end above the uniform setting it is meant to improve on (a small
       budget's saving in one layer, a big step in another): then the uniform budget is the
       allocation, which the recommendation already shows meets the target */
    if (!isnan(rec->uniform_entries) && !(rec->alloc_entries < rec->uniform_entries)) {
        for (int l = 0; l < L; l++)
            rec->layer_alloc[l] = (int)rec->budget;
        rec->alloc_entries = rec->uniform_entries;
    }
    /* every layer meeting the target on its own (the per-layer suggestion) meets it on the
       mean too: an allocation never costs more */
    if (!isnan(rec->layer_entries) && rec->layer_entries < rec->alloc_entries) {
        for (int l = 0; l < L; l++)
            rec->layer_alloc[l] = rec->layer_budget[l];
        rec->alloc_entries = rec->layer_entries;
    }
out:
    kvt_free(cost);
    kvt_free(order);
    kvt_free(lv);
    kvt_free(lc);
    return st;
}

kvt_status kvt_recommend(const kvt_results *r, const kvt_recommend_opts *o,
                         kvt_recommendation **out)
{
    *out = NULL;
    KVT_RETURN_IF(r->shard_count > 0, KVT_ERR_INVALID_ARG,
                  "recommend: a partial result of replay --shard (combine with kvtrace merge)");
    KVT_RETURN_IF(r->n_traces == 0 || r->n_policies == 0 || r->n_budgets == 0, KVT_ERR_INVALID_ARG,
                  "recommend: results without traces, policies or budgets");
    KVT_RETURN_IF(isnan(o->target), KVT_ERR_INVALID_ARG, "recommend: target is NaN");
    kvt_status st = KVT_OK;
    size_t np = r->n_policies, nb = r->n_budgets;
    int *idx = NULL;
    kvt_run_summary *sum = NULL;
    kvt_recommendation *rec = kvt_calloc(1, sizeof(*rec));
    if (!rec)
        return kvt_error_set(KVT_ERR_NOMEM, "out of memory");
    rec->target_is_max = o->target_is_max;
    rec->target = o->target;
    rec->n_policies = np;
    rec->n_budgets = nb;
    rec->n_traces = r->n_traces;
    rec->layer_entries = rec->head_entries = rec->uniform_entries = rec->alloc_entries = NAN;
    rec->curves = kvt_calloc(np, sizeof(*rec->curves));
    rec->budget_keeps_all = kvt_calloc(nb, sizeof(bool));
    rec->trace_measured = kvt_calloc(r->n_traces, sizeof(bool));
    idx = kvt_malloc(nb * sizeof(int));
    if (!rec->curves || !rec->budget_keeps_all || !rec->trace_measured || !idx)
        goto out_nomem;
    for (size_t b = 0; b < nb; b++) {
        rec->budget_keeps_all[b] = true;
        for (size_t i = 0; i < r->n_traces; i++)
            rec->budget_keeps_all[b] &=
                kvt_report_kept_tokens(r->traces[i], b) == r->traces[i]->n_tokens;
    }
    /* every aggregate once; the metric is chosen after */
    sum = kvt_malloc(np * nb * sizeof(*sum));
    if (!sum)
        goto out_nomem;
    for (size_t p = 0; p < np && !st; p++)
        for (size_t b = 0; b < nb && !st; b++)
            st = kvt_summarize_results(r, p, b, &sum[p * nb + b]);
    if (st)
        goto out_free;
    rec->full_entries = sum[0].full_entries; /* the same for every (policy, budget) */
    kvt_rec_metric m = o->metric;
    if (m == KVT_REC_METRIC_AUTO) {
        m = o->target_is_max ? KVT_REC_METRIC_ERR_DECODE : KVT_REC_METRIC_RECALL_DECODE;
        bool any = false;
        for (size_t p = 0; p < np; p++)
            for (size_t b = 0; b < nb; b++)
                any |= !is_reference(&r->policies[p]) &&
                       !isnan(kvt_rec_summary_value(&sum[p * nb + b], m));
        if (!any)
            m = o->target_is_max ? KVT_REC_METRIC_ERR_WINDOW : KVT_REC_METRIC_RECALL_WINDOW;
    } else if (!kvt_rec_metric_name(m) || kvt_rec_metric_is_error(m) != o->target_is_max) {
        st = kvt_error_set(KVT_ERR_INVALID_ARG, "recommend: %s is %s",
                           kvt_rec_metric_name(m) ? kvt_rec_metric_name(m) : "the metric",
                           kvt_rec_metric_kind(m));
        goto out_free;
    }
    rec->metric = m;
    for (size_t i = 0; i < r->n_traces; i++) {
        rec->trace_measured[i] = trace_measures(r, r->traces[i], m);
        rec->n_traces_measured += rec->trace_measured[i];
    }
    bool measured = false;
    for (size_t p = 0; p < np; p++) {
        kvt_rec_curve *c = &rec->curves[p];
        c->policy = p;
        c->knee_budget = c->cheapest_ok = -1;
        c->value = kvt_malloc(nb * sizeof(double));
        c->n_keep = kvt_malloc(nb * sizeof(double));
        c->kept_entries = kvt_malloc(nb * sizeof(double));
        if (!c->value || !c->n_keep || !c->kept_entries)
            goto out_nomem;
        bool any = false, ref = is_reference(&r->policies[p]);
        for (size_t b = 0; b < nb; b++) {
            const kvt_run_summary *s = &sum[p * nb + b];
            c->value[b] = kvt_rec_summary_value(s, m);
            c->n_keep[b] = s->n_keep * kvt_report_kv_heads_factor(r, p);
            c->kept_entries[b] = s->kept_entries;
            any |= !isnan(c->value[b]);
            /* a setting that keeps the whole cache (a short prompt, quest's dense layers)
               compresses nothing: it is no answer, however good its value; but "nothing
               meets" says when such a setting would */
            if (!ref && !kvt_rec_compresses(rec, p, b)) {
                if (meets(rec, c->value[b]) &&
                    (!rec->full_cache_meets ||
                     better(
                         rec, s->kept_entries, c->value[b],
                         rec->curves[rec->full_cache_policy].kept_entries[rec->full_cache_budget],
                         rec->curves[rec->full_cache_policy].value[rec->full_cache_budget]))) {
                    rec->full_cache_meets = true;
                    rec->full_cache_policy = p, rec->full_cache_budget = b;
                }
                continue;
            }
            rec->any_compressing |= !ref && !isnan(c->value[b]);
            if (meets(rec, c->value[b]) &&
                (c->cheapest_ok < 0 ||
                 better(rec, s->kept_entries, c->value[b], c->kept_entries[c->cheapest_ok],
                        c->value[c->cheapest_ok])))
                c->cheapest_ok = (int)b;
        }
        c->candidate = any && !ref;
        measured |= c->candidate;
        c->knee_budget =
            knee(c->n_keep, c->value, idx, sorted_points(c->n_keep, c->value, nb, idx));
        if (c->candidate && c->cheapest_ok >= 0) {
            double cost = c->kept_entries[c->cheapest_ok];
            if (!rec->found || better(rec, cost, c->value[c->cheapest_ok],
                                      rec->summary.kept_entries, rec->value)) {
                rec->found = true;
                rec->policy = p;
                rec->budget = (size_t)c->cheapest_ok;
                rec->value = c->value[c->cheapest_ok];
                rec->summary = sum[p * nb + (size_t)c->cheapest_ok];
            }
        }
    }
    if (!measured) {
        st = not_measured(r, m, sum);
        goto out_free;
    }
    if (rec->found)
        rec->full_cache_meets = false;               /* only said when nothing is recommended */
    for (size_t p = 0; p < np && !rec->found; p++) { /* nothing meets: the nearest miss */
        const kvt_rec_curve *c = &rec->curves[p];
        for (size_t b = 0; b < nb && c->candidate; b++) {
            double v = c->value[b];
            if (isnan(v) || !kvt_rec_compresses(rec, p, b))
                continue;
            double best = rec->closest_value;
            bool nearer = !rec->has_closest || (o->target_is_max ? v < best : v > best) ||
                          (v == best &&
                           c->kept_entries[b] <
                               rec->curves[rec->closest_policy].kept_entries[rec->closest_budget]);
            if (nearer) {
                rec->has_closest = true;
                rec->closest_policy = p, rec->closest_budget = b, rec->closest_value = v;
            }
        }
    }
    if (rec->found && (st = suggest(r, rec)))
        goto out_free;
    *out = rec;
    rec = NULL;
out_free:
    kvt_free(sum);
    kvt_free(idx);
    kvt_recommendation_free(rec);
    return st;
out_nomem:
    st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
    goto out_free;
}
