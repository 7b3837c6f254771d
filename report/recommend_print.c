/* recommend_print.c - the recommendation of recommend.c as a few lines of text or as one JSON
 * object (cJSON escapes every label taken from the results). Output of `kvtrace recommend`.
 */
#include <math.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "kvt_report.h"
#include "report_internal.h"

/* whether budget b keeps the same number of tokens on every trace */
static bool same_tokens(const kvt_results *r, size_t b)
{
    for (size_t i = 1; i < r->n_traces; i++)
        if (kvt_report_kept_tokens(r->traces[i], b) != kvt_report_kept_tokens(r->traces[0], b))
            return false;
    return true;
}

/* a suggested budget: its text, "all" when it keeps the whole prompt of every trace, "-" for
   none */
static const char *btext(const kvt_recommendation *rec, const kvt_results *r, int b)
{
    return b < 0 ? "-" : rec->budget_keeps_all[b] ? "all" : r->budgets[b].text;
}

/* the tokens budget b keeps per head and layer, over every trace: "45", "45 or 20" (two
   traces, in their order), "20 to 45" (more); see same_tokens */
static const char *tokens_text(const kvt_results *r, size_t b, char *buf, size_t cap)
{
    int lo = kvt_report_kept_tokens(r->traces[0], b), hi = lo;
    for (size_t i = 1; i < r->n_traces; i++) {
        int k = kvt_report_kept_tokens(r->traces[i], b);
        lo = k < lo ? k : lo;
        hi = k > hi ? k : hi;
    }
    if (lo == hi)
        snprintf(buf, cap, "%d", lo);
    else if (r->n_traces == 2)
        snprintf(buf, cap, "%d or %d", kvt_report_kept_tokens(r->traces[0], b),
                 kvt_report_kept_tokens(r->traces[1], b));
    else
        snprintf(buf, cap, "%d to %d", lo, hi);
    return buf;
}

const char *kvt_report_num(double x, char *buf, size_t cap)
{
    if (isnan(x))
        snprintf(buf, cap, "-");
    else
        snprintf(buf, cap, "%.4g", x);
    return buf;
}

/* an entry count: an integer, "-" for none */
static const char *count_text(double x, char *buf, size_t cap)
{
    if (isnan(x))
        snprintf(buf, cap, "-");
    else
        snprintf(buf, cap, "%.0f", x);
    return buf;
}

/* why a trace has no value of the metric, or NULL when there is no simple reason */
static const char *why_not_measured(const kvt_recommendation *rec, const kvt_trace_result *t)
{
    bool decode =
        rec->metric == KVT_REC_METRIC_ERR_DECODE || rec->metric == KVT_REC_METRIC_RECALL_DECODE;
    return decode && t->n_decode == 0 ? "no decode steps" : NULL;
}

/* "mean over 2 traces", or "mean over 1 of 2 traces, layers and heads; err_decode is not
   measured on nd.kvt (no decode steps)" */
static void print_scope(const kvt_recommendation *rec, const kvt_results *r, FILE *f)
{
    const char *mn = kvt_rec_metric_name(rec->metric);
    if (rec->n_traces_measured == r->n_traces) {
        fprintf(f, "mean over %zu trace%s, layers and heads", r->n_traces,
                r->n_traces == 1 ? "" : "s");
        return;
    }
    fprintf(f, "mean over %zu of %zu traces, layers and heads; %s is not measured on ",
            rec->n_traces_measured, r->n_traces, mn);
    size_t shown = 0, n_not = r->n_traces - rec->n_traces_measured;
    for (size_t i = 0; i < r->n_traces; i++) {
        if (rec->trace_measured[i])
            continue;
        if (shown == 3) {
            fprintf(f, " and %zu more", n_not - shown);
            break;
        }
        const char *why = why_not_measured(rec, r->traces[i]);
        fprintf(f, "%s%s", shown ? ", " : "", r->traces[i]->path);
        if (why)
            fprintf(f, " (%s)", why);
        shown++;
    }
}

/* the budgets that keep the whole prompt of every trace, "448, 1000, 100%" */
static void print_whole_budgets(const kvt_recommendation *rec, const kvt_results *r, FILE *f)
{
    size_t n = 0;
    for (size_t b = 0; b < rec->n_budgets; b++)
        if (rec->budget_keeps_all[b])
            fprintf(f, "%s%s", n++ ? ", " : "", r->budgets[b].text);
}

/* "recommended: none: ..." with why and what to do */
static void print_none(const kvt_recommendation *rec, const kvt_results *r, FILE *f)
{
    const char *mn = kvt_rec_metric_name(rec->metric);
    char a[32];
    bool all_whole = true;
    for (size_t b = 0; b < rec->n_budgets; b++)
        all_whole &= rec->budget_keeps_all[b];
    if (!rec->any_compressing) {
        fprintf(f, "recommended: none: no setting below the full cache meets the target (");
        if (all_whole) {
            fprintf(f, "budget%s ", rec->n_budgets == 1 ? "" : "s");
            print_whole_budgets(rec, r, f);
            fprintf(f, " keep%s the whole prompt", rec->n_budgets == 1 ? "s" : "");
        } else {
            fprintf(f, "every measured setting keeps the whole cache");
        }
        fprintf(f, ", and a setting that keeps the whole cache compresses nothing, so it is "
                   "never an answer): replay budgets below the prompt length\n");
        return;
    }
    if (rec->full_cache_meets)
        fprintf(f,
                "recommended: none: no setting below the full cache meets the target (%s at "
                "budget %s meets it by keeping the whole cache, which compresses nothing, so it "
                "is never an answer)",
                r->policies[rec->full_cache_policy].label, r->budgets[rec->full_cache_budget].text);
    else
        fprintf(f, "recommended: none: no setting meets the target");
    if (rec->has_closest)
        fprintf(f,
                "; the nearest is %s at budget %s (%s %s): relax the target or replay "
                "larger budgets",
                r->policies[rec->closest_policy].label, r->budgets[rec->closest_budget].text, mn,
                kvt_report_num(rec->closest_value, a, sizeof(a)));
    fputc('\n', f);
}

/* whether the registered policy `name` takes layer_weights= (it does not share the budget over
 * the layers itself) */
static bool takes_layer_weights(const char *name)
{
    for (size_t i = 0; i < kvt_policy_registry_size(); i++) {
        kvt_policy_about a;
        kvt_policy_registry_get(i, &a);
        if (!strcmp(a.name, name))
            return !(a.flags & KVT_POLICY_LAYER_BUDGETS);
    }
    return false;
}

/* whether every layer's allocated budget keeps the same tokens on every trace (and one meets
 * the target on every layer) */
static bool alloc_in_tokens(const kvt_recommendation *rec, const kvt_results *r)
{
    for (int l = 0; l < rec->n_layers; l++)
        if (rec->layer_alloc[l] < 0 || !same_tokens(r, (size_t)rec->layer_alloc[l]))
            return false;
    return rec->n_layers > 0;
}

/* layer l's allocated budget as a weight: its tokens, or its share of the prompt */
static double alloc_weight(const kvt_recommendation *rec, const kvt_results *r, int l, bool tokens)
{
    const size_t b = (size_t)rec->layer_alloc[l];
    return tokens ? kvt_report_kept_tokens(r->traces[0], b) : r->budgets[b].value;
}

static double alloc_mean(const kvt_recommendation *rec, const kvt_results *r, bool tokens)
{
    double sum = 0;
    for (int l = 0; l < rec->n_layers; l++)
        sum += alloc_weight(rec, r, l, tokens);
    return sum / rec->n_layers;
}

/* an allocation of unequal measured budgets against the uniform budget at its mean, which
 * costs about the same: when no measured budget keeps that many tokens, say how to compare
 * them (picked from a coarse grid, such an allocation can lose to it; analysis/RESULTS.md,
 * layer_weights=) */
static void alloc_note(const kvt_recommendation *rec, const kvt_results *r, FILE *f)
{
    bool mixed = false, tokens = alloc_in_tokens(rec, r);
    for (int l = 0; l < rec->n_layers && tokens; l++) {
        tokens = !rec->budget_keeps_all[rec->layer_alloc[l]];
        mixed |= rec->layer_alloc[l] != rec->layer_alloc[0];
    }
    if (!tokens || !mixed || !takes_layer_weights(r->policies[rec->policy].name))
        return;
    const int mean = (int)floor(alloc_mean(rec, r, true) + 0.5);
    for (size_t b = 0; b < rec->n_budgets; b++)
        if (same_tokens(r, b) && kvt_report_kept_tokens(r->traces[0], b) == mean)
            return;
    fprintf(f,
            "\n  (a uniform %d tokens, its mean, costs about the same and was not measured: "
            "compare %s at %d with its layer_weights= replay (recommend --write-allocation) "
            "before using it)",
            mean, r->policies[rec->policy].label, mean);
}

kvt_status kvt_recommendation_print(const kvt_recommendation *rec, const kvt_results *r, FILE *f)
{
    const char *mn = kvt_rec_metric_name(rec->metric);
    char a[32], b[32], e[32], g[32], tk[64];
    fprintf(f, "target: %s %s %g (", mn, rec->target_is_max ? "<=" : ">=", rec->target);
    print_scope(rec, r, f);
    fprintf(f, ")\n");
    if (rec->found) {
        const kvt_run_summary *s = &rec->summary;
        fprintf(f,
                "recommended: %s at budget %s (%s tokens per %s head per layer%s): %s %s, keeps "
                "%.1f%% of the KV cache (%.3gx smaller, %.0f of %.0f entries)\n",
                r->policies[rec->policy].label, r->budgets[rec->budget].text,
                tokens_text(r, rec->budget, tk, sizeof(tk)),
                kvt_report_kv_heads_factor(r, rec->policy) > 1.0 ? "query" : "KV",
                same_tokens(r, rec->budget) ? "" : ", by trace", mn,
                kvt_report_num(rec->value, a, sizeof(a)), 100.0 * s->kept_fraction,
                s->compression_ratio, s->kept_entries, s->full_entries);
        if (s->kept_fraction >= KVT_REC_BARELY)
            fprintf(f, "note: it barely compresses: the target needs nearly the whole cache "
                       "(a looser target, or budgets between the measured ones, may find a "
                       "cheaper setting)\n");
    } else {
        print_none(rec, r, f);
    }
    fprintf(f, "per policy (cheapest budget meeting the target; knee of the %s curve):\n", mn);
    fprintf(f, "  %-28s %-10s %-10s %-10s %s\n", "policy", "meets at", "value", "knee", "value");
    for (size_t p = 0; p < rec->n_policies; p++) {
        const kvt_rec_curve *c = &rec->curves[p];
        fprintf(f, "  %-28s %-10s %-10s %-10s %s%s\n", r->policies[p].label,
                c->cheapest_ok < 0 ? "-" : r->budgets[c->cheapest_ok].text,
                kvt_report_num(c->cheapest_ok < 0 ? NAN : c->value[c->cheapest_ok], a, sizeof(a)),
                c->knee_budget < 0 ? "-" : r->budgets[c->knee_budget].text,
                kvt_report_num(c->knee_budget < 0 ? NAN : c->value[c->knee_budget], b, sizeof(b)),
                c->candidate ? "" : " (reference / not measured: not recommended)");
    }
    if (rec->found && rec->n_layers > 0) {
        bool any_all = false;
        for (size_t k = 0; k < rec->n_budgets; k++)
            any_all |= rec->budget_keeps_all[k];
        fprintf(f, "per layer (%s, smallest measured budget meeting the target on the layer%s):\n ",
                r->policies[rec->policy].label, any_all ? "; all = the whole prompt" : "");
        for (int l = 0; l < rec->n_layers; l++)
            fprintf(f, " L%d:%s", l, btext(rec, r, rec->layer_budget[l]));
        fprintf(f, "\nlayer allocation (the mean over layers meets the target; budget goes "
                   "where it helps most):\n ");
        for (int l = 0; l < rec->n_layers; l++)
            fprintf(f, " L%d:%s", l, btext(rec, r, rec->layer_alloc[l]));
        alloc_note(rec, r, f);
        fprintf(f, "\nentries");
        if (r->n_traces > 1)
            fprintf(f, " summed over the %zu traces", r->n_traces);
        fprintf(f,
                " (full cache %.0f): uniform %s, allocation %s, per-layer %s, per-head %s (- = "
                "beyond the largest budget)\n",
                rec->full_entries, count_text(rec->uniform_entries, a, sizeof(a)),
                count_text(rec->alloc_entries, b, sizeof(b)),
                count_text(rec->layer_entries, e, sizeof(e)),
                count_text(rec->head_entries, g, sizeof(g)));
        fprintf(f, "per head (rows = layers, columns = %s heads):\n",
                r->n_traces && rec->n_heads != r->traces[0]->n_kv_heads ? "query" : "KV");
        for (int l = 0; l < rec->n_layers; l++) {
            fprintf(f, "  L%-3d", l);
            for (int h = 0; h < rec->n_heads; h++)
                fprintf(f, " %5s", btext(rec, r, rec->head_budget[(size_t)l * rec->n_heads + h]));
            fputc('\n', f);
        }
    }
    return ferror(f) ? kvt_error_set(KVT_ERR_IO, "recommend: write failed") : KVT_OK;
}

/* the tokens budget b keeps per head and layer: a number when every trace keeps the same,
   else the array by trace; null for no budget */
static cJSON *tokens_json(const kvt_results *r, int b)
{
    if (b < 0)
        return cJSON_CreateNull();
    if (same_tokens(r, (size_t)b))
        return cJSON_CreateNumber(kvt_report_kept_tokens(r->traces[0], (size_t)b));
    cJSON *a = cJSON_CreateArray();
    for (size_t i = 0; a && i < r->n_traces; i++)
        cJSON_AddItemToArray(a,
                             cJSON_CreateNumber(kvt_report_kept_tokens(r->traces[i], (size_t)b)));
    return a;
}

static cJSON *budget_json(const kvt_recommendation *rec, const kvt_results *r, int b)
{
    if (b < 0)
        return cJSON_CreateNull();
    cJSON *o = cJSON_CreateObject(), *by = cJSON_CreateArray();
    if (!o || !by) {
        cJSON_Delete(o);
        cJSON_Delete(by);
        return NULL;
    }
    cJSON_AddNumberToObject(o, "index", b);
    cJSON_AddStringToObject(o, "text", r->budgets[b].text);
    if (same_tokens(r, (size_t)b))
        cJSON_AddNumberToObject(o, "tokens", kvt_report_kept_tokens(r->traces[0], (size_t)b));
    else
        cJSON_AddNullToObject(o, "tokens");
    for (size_t i = 0; i < r->n_traces; i++)
        cJSON_AddItemToArray(by,
                             cJSON_CreateNumber(kvt_report_kept_tokens(r->traces[i], (size_t)b)));
    cJSON_AddItemToObject(o, "tokens_by_trace", by);
    cJSON_AddBoolToObject(o, "whole_prompt", rec->budget_keeps_all[b]);
    return o;
}

static cJSON *num_json(double x)
{
    return isnan(x) ? cJSON_CreateNull() : cJSON_CreateNumber(x);
}

static cJSON *text_json(const kvt_recommendation *rec, const kvt_results *r, int b)
{
    return b < 0 ? cJSON_CreateNull() : cJSON_CreateString(btext(rec, r, b));
}

/* the per-layer and per-head suggestions and their entry counts, into the recommendation o */
static bool suggestions_json(const kvt_recommendation *rec, const kvt_results *r, cJSON *o)
{
    cJSON *lb = cJSON_AddArrayToObject(o, "layer_budget_tokens");
    cJSON *hb = cJSON_AddArrayToObject(o, "head_budget_tokens");
    cJSON *ab = cJSON_AddArrayToObject(o, "layer_alloc_tokens");
    cJSON *lt = cJSON_AddArrayToObject(o, "layer_budget");
    cJSON *ht = cJSON_AddArrayToObject(o, "head_budget");
    cJSON *at = cJSON_AddArrayToObject(o, "layer_alloc");
    if (!lb || !hb || !ab || !lt || !ht || !at)
        return false;
    for (int l = 0; l < rec->n_layers; l++) {
        cJSON_AddItemToArray(lb, tokens_json(r, rec->layer_budget[l]));
        cJSON_AddItemToArray(lt, text_json(rec, r, rec->layer_budget[l]));
        cJSON_AddItemToArray(ab, tokens_json(r, rec->layer_alloc[l]));
        cJSON_AddItemToArray(at, text_json(rec, r, rec->layer_alloc[l]));
        cJSON *row = cJSON_CreateArray(), *trow = cJSON_CreateArray();
        if (!row || !trow) {
            cJSON_Delete(row);
            cJSON_Delete(trow);
            return false;
        }
        cJSON_AddItemToArray(hb, row);
        cJSON_AddItemToArray(ht, trow);
        for (int h = 0; h < rec->n_heads; h++) {
            int b = rec->head_budget[(size_t)l * rec->n_heads + h];
            cJSON_AddItemToArray(row, tokens_json(r, b));
            cJSON_AddItemToArray(trow, text_json(rec, r, b));
        }
    }
    cJSON_AddItemToObject(o, "uniform_entries", num_json(rec->uniform_entries));
    cJSON_AddItemToObject(o, "alloc_entries", num_json(rec->alloc_entries));
    cJSON_AddItemToObject(o, "layer_entries", num_json(rec->layer_entries));
    cJSON_AddItemToObject(o, "head_entries", num_json(rec->head_entries));
    return true;
}

/* n_traces, n_traces_measured and the traces the metric is not measured on, into root */
static bool scope_json(const kvt_recommendation *rec, const kvt_results *r, cJSON *root)
{
    cJSON_AddNumberToObject(root, "n_traces", (double)r->n_traces);
    cJSON_AddNumberToObject(root, "n_traces_measured", (double)rec->n_traces_measured);
    cJSON *nm = cJSON_AddArrayToObject(root, "traces_not_measured");
    if (!nm)
        return false;
    for (size_t i = 0; i < r->n_traces; i++) {
        if (rec->trace_measured[i])
            continue;
        cJSON *t = cJSON_CreateObject();
        if (!t)
            return false;
        cJSON_AddItemToArray(nm, t);
        cJSON_AddStringToObject(t, "path", r->traces[i]->path);
        const char *why = why_not_measured(rec, r->traces[i]);
        cJSON_AddItemToObject(t, "why", why ? cJSON_CreateString(why) : cJSON_CreateNull());
    }
    return true;
}

kvt_status kvt_report_print_json(const cJSON *root, FILE *f)
{
    char *text = cJSON_Print(root);
    KVT_RETURN_IF(!text, KVT_ERR_NOMEM, "out of memory");
    kvt_status st = fprintf(f, "%s\n", text) < 0 || ferror(f)
                        ? kvt_error_set(KVT_ERR_IO, "recommend: write failed")
                        : KVT_OK;
    cJSON_free(text);
    return st;
}

kvt_status kvt_recommendation_write_json(const kvt_recommendation *rec, const kvt_results *r,
                                         FILE *f)
{
    kvt_status st = KVT_OK;
    cJSON *root = cJSON_CreateObject(), *pols = cJSON_CreateArray();
    if (!root || !pols) {
        cJSON_Delete(pols);
        goto out_nomem;
    }
    cJSON_AddItemToObject(root, "policies", pols);
    cJSON_AddStringToObject(root, "metric", kvt_rec_metric_name(rec->metric));
    cJSON_AddStringToObject(root, "target_kind", rec->target_is_max ? "max" : "min");
    cJSON_AddNumberToObject(root, "target", rec->target);
    if (!scope_json(rec, r, root))
        goto out_nomem;
    cJSON_AddBoolToObject(root, "found", rec->found);
    if (rec->found) {
        cJSON *o = cJSON_AddObjectToObject(root, "recommendation");
        if (!o)
            goto out_nomem;
        cJSON_AddStringToObject(o, "label", r->policies[rec->policy].label);
        cJSON_AddNumberToObject(o, "policy", (double)rec->policy);
        cJSON_AddItemToObject(o, "budget", budget_json(rec, r, (int)rec->budget));
        cJSON_AddItemToObject(o, "value", num_json(rec->value));
        cJSON_AddItemToObject(o, "kept_entries", num_json(rec->summary.kept_entries));
        cJSON_AddItemToObject(o, "full_entries", num_json(rec->summary.full_entries));
        cJSON_AddItemToObject(o, "kept_fraction", num_json(rec->summary.kept_fraction));
        cJSON_AddItemToObject(o, "compression_ratio", num_json(rec->summary.compression_ratio));
        /* the text's "it barely compresses" note */
        cJSON_AddBoolToObject(o, "barely_compresses", rec->summary.kept_fraction >= KVT_REC_BARELY);
        if (rec->n_layers > 0 && !suggestions_json(rec, r, o))
            goto out_nomem;
    } else {
        cJSON_AddNullToObject(root, "recommendation");
        /* why: nothing meets ("not_met"), only settings keeping the whole cache meet
           ("only_full_cache_meets"), or no setting keeps less than the whole cache
           ("no_compressing_setting") */
        cJSON_AddStringToObject(root, "why_none",
                                !rec->any_compressing   ? "no_compressing_setting"
                                : rec->full_cache_meets ? "only_full_cache_meets"
                                                        : "not_met");
        if (rec->full_cache_meets) {
            cJSON *o = cJSON_AddObjectToObject(root, "full_cache_setting");
            if (!o)
                goto out_nomem;
            cJSON_AddStringToObject(o, "label", r->policies[rec->full_cache_policy].label);
            cJSON_AddNumberToObject(o, "policy", (double)rec->full_cache_policy);
            cJSON_AddItemToObject(o, "budget", budget_json(rec, r, (int)rec->full_cache_budget));
            cJSON_AddItemToObject(
                o, "value",
                num_json(rec->curves[rec->full_cache_policy].value[rec->full_cache_budget]));
        }
    }
    if (rec->has_closest) {
        cJSON *o = cJSON_AddObjectToObject(root, "nearest");
        if (!o)
            goto out_nomem;
        cJSON_AddStringToObject(o, "label", r->policies[rec->closest_policy].label);
        cJSON_AddNumberToObject(o, "policy", (double)rec->closest_policy);
        cJSON_AddItemToObject(o, "budget", budget_json(rec, r, (int)rec->closest_budget));
        cJSON_AddItemToObject(o, "value", num_json(rec->closest_value));
    }
    for (size_t p = 0; p < rec->n_policies; p++) {
        const kvt_rec_curve *c = &rec->curves[p];
        cJSON *o = cJSON_CreateObject(), *v = cJSON_CreateArray();
        if (!o || !v) {
            cJSON_Delete(o);
            cJSON_Delete(v);
            goto out_nomem;
        }
        cJSON_AddItemToArray(pols, o);
        cJSON_AddStringToObject(o, "label", r->policies[p].label);
        cJSON_AddBoolToObject(o, "candidate", c->candidate);
        cJSON_AddItemToObject(o, "cheapest_meeting", budget_json(rec, r, c->cheapest_ok));
        cJSON_AddItemToObject(o, "knee", budget_json(rec, r, c->knee_budget));
        cJSON_AddItemToObject(o, "values", v);
        for (size_t b = 0; b < rec->n_budgets; b++)
            cJSON_AddItemToArray(v, num_json(c->value[b]));
    }
    st = kvt_report_print_json(root, f);
out_free:
    cJSON_Delete(root);
    return st;
out_nomem:
    st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
    goto out_free;
}

kvt_status kvt_recommendation_write_allocation(const kvt_recommendation *rec, const kvt_results *r,
                                               const char *path, char *budget, size_t cap_b)
{
    KVT_RETURN_IF(!rec->found || rec->n_layers < 1, KVT_ERR_INVALID_ARG,
                  "no layer allocation to write: nothing meets the target");
    for (int l = 0; l < rec->n_layers; l++)
        KVT_RETURN_IF(rec->layer_alloc[l] < 0, KVT_ERR_INVALID_ARG,
                      "no layer allocation to write: none meets the target");
    /* a weight per layer: its budget's tokens, or (traces of different lengths) its share */
    const bool tokens = alloc_in_tokens(rec, r);
    size_t cap = 1024 + (size_t)rec->n_layers * 32, len = 0;
    char *txt = kvt_malloc(cap);
    KVT_RETURN_IF(!txt, KVT_ERR_NOMEM, "out of memory");
    const double mean = alloc_mean(rec, r, tokens);
    /* the label is the spec as given, unless label=NAME named it */
    const char *label = r->policies[rec->policy].label, *name = r->policies[rec->policy].name;
    const size_t nl = strlen(name);
    const bool spec = !strncmp(label, name, nl) && (label[nl] == '\0' || label[nl] == ':');
    char m[32], how[200];
    if (!takes_layer_weights(name))
        snprintf(how, sizeof(how),
                 "another policy with layer_weights=FILE (%s shares its budget over the layers "
                 "itself)",
                 name);
    else if (spec)
        snprintf(how, sizeof(how), "%s%slayer_weights=FILE", label, strchr(label, ':') ? "," : ":");
    else
        snprintf(how, sizeof(how), "the spec labelled %s with layer_weights=FILE", label);
    if (tokens)
        snprintf(m, sizeof(m), "%.10g", mean);
    else
        snprintf(m, sizeof(m), "%.10g%%", 100.0 * mean);
    len += (size_t)snprintf(
        txt + len, cap - len,
        "# kvtrace recommend: the layer allocation of %s whose mean over layers meets %s %s "
        "%g\n# one weight per layer (%s); a replay of %s at the budget %s\n"
        "# (their mean) gives each layer this budget%s; compare it with the uniform policy at\n"
        "# that budget, in the same replay and end to end: the allocation was picked from the\n"
        "# measured budgets only\n",
        label, kvt_rec_metric_name(rec->metric), rec->target_is_max ? "<=" : ">=", rec->target,
        tokens ? "its budget in tokens" : "its budget's share of the prompt", how, m,
        tokens && mean != floor(mean) ? " (a whole number of tokens near it: within about a "
                                        "token of it)"
                                      : "");
    for (int l = 0; l < rec->n_layers && len < cap; l++)
        len += (size_t)snprintf(txt + len, cap - len, tokens ? "%.0f\n" : "%.17g\n",
                                alloc_weight(rec, r, l, tokens));
    kvt_status st = len < cap ? kvt_write_file_atomic(path, txt, len ? len - 1 : 0)
                              : kvt_error_set(KVT_ERR_NOMEM, "allocation text too long");
    kvt_free(txt);
    if (!st && budget)
        snprintf(budget, cap_b, "%s", m);
    return st;
}
