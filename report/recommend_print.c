/* recommend_print.c - the recommendation of recommend.c as a few lines of text or as one JSON
 * object (cJSON escapes every label taken from the results). Output of `kvtrace recommend`.
 */
#include <math.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "kvt_report.h"
#include "report_internal.h"

static const char *btext(const kvt_results *r, int b)
{
    return b < 0 ? "-" : r->budgets[b].text;
}

const char *kvt_report_num(double x, char *buf, size_t cap)
{
    if (isnan(x))
        snprintf(buf, cap, "-");
    else
        snprintf(buf, cap, "%.4g", x);
    return buf;
}

kvt_status kvt_recommendation_print(const kvt_recommendation *rec, const kvt_results *r, FILE *f)
{
    const char *mn = kvt_rec_metric_name(rec->metric);
    char a[32], b[32], e[32], g[32];
    fprintf(f, "target: %s %s %g (mean over %zu trace%s, layers and heads)\n", mn,
            rec->target_is_max ? "<=" : ">=", rec->target, r->n_traces,
            r->n_traces == 1 ? "" : "s");
    if (rec->found) {
        const kvt_run_summary *s = &rec->summary;
        fprintf(f,
                "recommended: %s at budget %s (%d tokens per head per layer): %s %s, keeps "
                "%.1f%% of the KV cache (%.3gx smaller, %.0f of %.0f entries)\n",
                r->policies[rec->policy].label, r->budgets[rec->budget].text,
                r->traces[0]->budget_tokens[rec->budget], mn,
                kvt_report_num(rec->value, a, sizeof(a)), 100.0 * s->kept_fraction,
                s->compression_ratio, s->kept_entries, s->full_entries);
    } else {
        fprintf(f, "recommended: none: no setting meets the target");
        if (rec->has_closest)
            fprintf(f,
                    "; the nearest is %s at budget %s (%s %s): relax the target or replay "
                    "larger budgets",
                    r->policies[rec->closest_policy].label, r->budgets[rec->closest_budget].text,
                    mn, kvt_report_num(rec->closest_value, a, sizeof(a)));
        fputc('\n', f);
    }
    fprintf(f, "per policy (cheapest budget meeting the target; knee of the %s curve):\n", mn);
    fprintf(f, "  %-28s %-10s %-10s %-10s %s\n", "policy", "meets at", "value", "knee", "value");
    for (size_t p = 0; p < rec->n_policies; p++) {
        const kvt_rec_curve *c = &rec->curves[p];
        fprintf(f, "  %-28s %-10s %-10s %-10s %s%s\n", r->policies[p].label,
                btext(r, c->cheapest_ok),
                kvt_report_num(c->cheapest_ok < 0 ? NAN : c->value[c->cheapest_ok], a, sizeof(a)),
                btext(r, c->knee_budget),
                kvt_report_num(c->knee_budget < 0 ? NAN : c->value[c->knee_budget], b, sizeof(b)),
                c->candidate ? "" : " (reference / not measured: not recommended)");
    }
    if (rec->found && rec->n_layers > 0) {
        fprintf(f, "per layer (%s, smallest measured budget meeting the target on the layer):\n ",
                r->policies[rec->policy].label);
        for (int l = 0; l < rec->n_layers; l++)
            fprintf(f, " L%d:%s", l, btext(r, rec->layer_budget[l]));
        fprintf(f, "\nlayer allocation (the mean over layers meets the target; budget goes "
                   "where it helps most):\n ");
        for (int l = 0; l < rec->n_layers; l++)
            fprintf(f, " L%d:%s", l, btext(r, rec->layer_alloc[l]));
        fprintf(f,
                "\nentries: uniform %s, allocation %s, per-layer %s, per-head %s (- = "
                "beyond the largest budget)\n",
                kvt_report_num(rec->uniform_entries, a, sizeof(a)),
                kvt_report_num(rec->alloc_entries, b, sizeof(b)),
                kvt_report_num(rec->layer_entries, e, sizeof(e)),
                kvt_report_num(rec->head_entries, g, sizeof(g)));
        fprintf(f, "per head (rows = layers, columns = heads):\n");
        for (int l = 0; l < rec->n_layers; l++) {
            fprintf(f, "  L%-3d", l);
            for (int h = 0; h < rec->n_heads; h++)
                fprintf(f, " %5s", btext(r, rec->head_budget[(size_t)l * rec->n_heads + h]));
            fputc('\n', f);
        }
    }
    return ferror(f) ? kvt_error_set(KVT_ERR_IO, "recommend: write failed") : KVT_OK;
}

static cJSON *budget_json(const kvt_results *r, int b)
{
    if (b < 0)
        return cJSON_CreateNull();
    cJSON *o = cJSON_CreateObject();
    if (o) {
        cJSON_AddNumberToObject(o, "index", b);
        cJSON_AddStringToObject(o, "text", r->budgets[b].text);
        cJSON_AddNumberToObject(o, "tokens", r->traces[0]->budget_tokens[b]);
    }
    return o;
}

static cJSON *num_json(double x)
{
    return isnan(x) ? cJSON_CreateNull() : cJSON_CreateNumber(x);
}

kvt_status kvt_recommendation_write_json(const kvt_recommendation *rec, const kvt_results *r,
                                         FILE *f)
{
    kvt_status st = KVT_OK;
    char *text = NULL;
    cJSON *root = cJSON_CreateObject(), *pols = cJSON_CreateArray();
    if (!root || !pols) {
        cJSON_Delete(pols);
        goto out_nomem;
    }
    cJSON_AddItemToObject(root, "policies", pols);
    cJSON_AddStringToObject(root, "metric", kvt_rec_metric_name(rec->metric));
    cJSON_AddStringToObject(root, "target_kind", rec->target_is_max ? "max" : "min");
    cJSON_AddNumberToObject(root, "target", rec->target);
    cJSON_AddBoolToObject(root, "found", rec->found);
    if (rec->found) {
        cJSON *o = cJSON_AddObjectToObject(root, "recommendation");
        if (!o)
            goto out_nomem;
        cJSON_AddStringToObject(o, "label", r->policies[rec->policy].label);
        cJSON_AddNumberToObject(o, "policy", (double)rec->policy);
        cJSON_AddItemToObject(o, "budget", budget_json(r, (int)rec->budget));
        cJSON_AddItemToObject(o, "value", num_json(rec->value));
        cJSON_AddItemToObject(o, "kept_entries", num_json(rec->summary.kept_entries));
        cJSON_AddItemToObject(o, "full_entries", num_json(rec->summary.full_entries));
        cJSON_AddItemToObject(o, "kept_fraction", num_json(rec->summary.kept_fraction));
        cJSON_AddItemToObject(o, "compression_ratio", num_json(rec->summary.compression_ratio));
        if (rec->n_layers > 0) {
            cJSON *lb = cJSON_AddArrayToObject(o, "layer_budget_tokens");
            cJSON *hb = cJSON_AddArrayToObject(o, "head_budget_tokens");
            cJSON *ab = cJSON_AddArrayToObject(o, "layer_alloc_tokens");
            if (!lb || !hb || !ab)
                goto out_nomem;
            const int *tok = r->traces[0]->budget_tokens;
            for (int l = 0; l < rec->n_layers; l++) {
                int b = rec->layer_budget[l];
                cJSON_AddItemToArray(lb, b < 0 ? cJSON_CreateNull() : cJSON_CreateNumber(tok[b]));
                b = rec->layer_alloc[l];
                cJSON_AddItemToArray(ab, b < 0 ? cJSON_CreateNull() : cJSON_CreateNumber(tok[b]));
                cJSON *row = cJSON_CreateArray();
                if (!row)
                    goto out_nomem;
                cJSON_AddItemToArray(hb, row);
                for (int h = 0; h < rec->n_heads; h++) {
                    b = rec->head_budget[(size_t)l * rec->n_heads + h];
                    cJSON_AddItemToArray(row,
                                         b < 0 ? cJSON_CreateNull() : cJSON_CreateNumber(tok[b]));
                }
            }
            cJSON_AddItemToObject(o, "uniform_entries", num_json(rec->uniform_entries));
            cJSON_AddItemToObject(o, "alloc_entries", num_json(rec->alloc_entries));
            cJSON_AddItemToObject(o, "layer_entries", num_json(rec->layer_entries));
            cJSON_AddItemToObject(o, "head_entries", num_json(rec->head_entries));
        }
    } else {
        cJSON_AddNullToObject(root, "recommendation");
    }
    if (rec->has_closest) {
        cJSON *o = cJSON_AddObjectToObject(root, "nearest");
        if (!o)
            goto out_nomem;
        cJSON_AddStringToObject(o, "label", r->policies[rec->closest_policy].label);
        cJSON_AddNumberToObject(o, "policy", (double)rec->closest_policy);
        cJSON_AddItemToObject(o, "budget", budget_json(r, (int)rec->closest_budget));
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
        cJSON_AddItemToObject(o, "cheapest_meeting", budget_json(r, c->cheapest_ok));
        cJSON_AddItemToObject(o, "knee", budget_json(r, c->knee_budget));
        cJSON_AddItemToObject(o, "values", v);
        for (size_t b = 0; b < rec->n_budgets; b++)
            cJSON_AddItemToArray(v, num_json(c->value[b]));
    }
    text = cJSON_Print(root);
    if (!text)
        goto out_nomem;
    if (fprintf(f, "%s\n", text) < 0 || ferror(f))
        st = kvt_error_set(KVT_ERR_IO, "recommend: write failed");
out_free:
    cJSON_free(text);
    cJSON_Delete(root);
    return st;
out_nomem:
    st = kvt_error_set(KVT_ERR_NOMEM, "out of memory");
    goto out_free;
}
