/* recommend_e2e.c - `kvtrace recommend --e2e E2E.json --max-kl K`: the cheapest (policy, budget)
 * whose measured next-token KL divergence from the uncompressed run (the end-to-end check of
 * kvtrace e2e-llama2c or kvtrace.hf.e2e) is at most K. The replay's proxies only predict what a
 * setting does to the model; where the model itself was run, this answers from what it did.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "kvt_report.h"
#include "report_internal.h"

/* full and oracle are references, never an answer */
static bool is_reference(const kvt_e2e_run *x)
{
    const char *n = x->name ? x->name : x->policy;
    return !strcmp(n, "full") || !strcmp(n, "oracle");
}

static bool is_candidate(const kvt_e2e_run *x)
{
    return x->applied && isfinite(x->kl_mean) && isfinite(x->kept_fraction) &&
           x->kept_fraction < 1.0 && !is_reference(x);
}

/* whether run a is cheaper than run b: the smaller kept share, then the smaller KL (a run
   before another in the file wins the remaining ties, the caller scanning in order) */
static bool cheaper(const kvt_e2e_run *a, const kvt_e2e_run *b)
{
    if (a->kept_fraction != b->kept_fraction)
        return a->kept_fraction < b->kept_fraction;
    return a->kl_mean < b->kl_mean;
}

/* whether run a has a smaller KL than run b (none: true), then a smaller kept share */
static bool lower_kl(const kvt_e2e_run *a, const kvt_e2e_run *b)
{
    return !b || a->kl_mean < b->kl_mean ||
           (a->kl_mean == b->kl_mean && a->kept_fraction < b->kept_fraction);
}

void kvt_e2e_choice_free(kvt_e2e_choice *c)
{
    if (!c)
        return;
    kvt_free(c->policy);
    kvt_free(c->candidate_policy);
    kvt_free(c->cheapest);
    kvt_free(c->lowest);
    kvt_free(c);
}

kvt_status kvt_recommend_e2e(const kvt_e2e *e, double max_kl, kvt_e2e_choice **out)
{
    *out = NULL;
    KVT_RETURN_IF(!(max_kl >= 0) || isinf(max_kl), KVT_ERR_INVALID_ARG,
                  "--max-kl %g: a KL divergence is a finite number >= 0", max_kl);
    kvt_e2e_choice *c = kvt_calloc(1, sizeof(*c));
    KVT_RETURN_IF(!c, KVT_ERR_NOMEM, "out of memory");
    c->policy = kvt_calloc(e->n_runs, sizeof(*c->policy));
    c->candidate_policy = kvt_calloc(e->n_runs, sizeof(*c->candidate_policy));
    c->cheapest = kvt_calloc(e->n_runs, sizeof(*c->cheapest));
    c->lowest = kvt_calloc(e->n_runs, sizeof(*c->lowest));
    if (!c->policy || !c->candidate_policy || !c->cheapest || !c->lowest) {
        kvt_e2e_choice_free(c);
        return kvt_error_set(KVT_ERR_NOMEM, "out of memory");
    }
    c->max_kl = max_kl;
    c->best = c->nearest = -1;
    for (size_t i = 0; i < e->n_runs; i++) {
        const kvt_e2e_run *x = &e->runs[i];
        size_t p = 0;
        while (p < c->n_policies && strcmp(c->policy[p], x->policy))
            p++;
        if (p == c->n_policies) {
            c->policy[p] = x->policy;
            c->candidate_policy[p] = !is_reference(x);
            c->cheapest[p] = c->lowest[p] = -1;
            c->n_policies++;
        }
        if (!is_candidate(x))
            continue;
        c->n_candidates++;
        if (x->kl_mean <= max_kl) {
            if (c->cheapest[p] < 0 || cheaper(x, &e->runs[c->cheapest[p]]))
                c->cheapest[p] = (long)i;
            if (c->best < 0 || cheaper(x, &e->runs[c->best]))
                c->best = (long)i;
        }
        if (lower_kl(x, c->nearest >= 0 ? &e->runs[c->nearest] : NULL))
            c->nearest = (long)i;
        if (lower_kl(x, c->lowest[p] >= 0 ? &e->runs[c->lowest[p]] : NULL))
            c->lowest[p] = (long)i;
    }
    c->found = c->best >= 0;
    if (c->found)
        c->nearest = -1;
    *out = c;
    return KVT_OK;
}

/* "transformers 4.56.0, ... (kvtrace.hf.e2e)" or "the built-in llama2.c engine (kvtrace
   e2e-llama2c)", and the traces */
static void print_source(const kvt_e2e *e, FILE *f)
{
    if (e->engine)
        fprintf(f, "measured end to end by kvtrace.hf.e2e (%s) on the model %s", e->engine,
                e->model);
    else
        fprintf(f,
                "measured end to end by kvtrace e2e-llama2c (the built-in llama2.c engine) on "
                "the model %s",
                e->model);
    int steps = 0;
    for (size_t t = 0; t < e->n_traces; t++)
        steps += e->traces[t].n_decode;
    fprintf(f, ", %zu trace%s, %d decode step%s in all\n", e->n_traces, e->n_traces == 1 ? "" : "s",
            steps, steps == 1 ? "" : "s");
}

/* one setting's measures: "snapkv at 96 (96 tokens per head): mean KL ..." */
static void print_setting(const kvt_e2e_run *x, FILE *f)
{
    char a[32], b[32], c[32], d[32], g[32];
    fprintf(f,
            "%s at %s (%d tokens per head on the first trace): mean KL %s nats (largest %s), "
            "top-1 agreement %s%%, keeping %s%% of the KV cache (%sx smaller)",
            x->policy, x->budget, x->budget_tokens, kvt_report_num(x->kl_mean, a, sizeof(a)),
            kvt_report_num(x->kl_max, b, sizeof(b)), kvt_report_num(100.0 * x->top1, c, sizeof(c)),
            kvt_report_num(100.0 * x->kept_fraction, d, sizeof(d)),
            kvt_report_num(1.0 / x->kept_fraction, g, sizeof(g)));
}

kvt_status kvt_e2e_choice_print(const kvt_e2e_choice *c, const kvt_e2e *e, FILE *f)
{
    char a[32], b[32];
    if (c->found) {
        const kvt_e2e_run *x = &e->runs[c->best];
        fputs("recommended: ", f);
        print_setting(x, f);
        fprintf(f, "; target mean KL <= %s\n", kvt_report_num(c->max_kl, a, sizeof(a)));
        fprintf(f, "the replay's proxies there: err_decode %s, recall_decode %s\n",
                kvt_report_num(x->err_decode, a, sizeof(a)),
                kvt_report_num(x->recall_decode, b, sizeof(b)));
    } else {
        fprintf(f, "no setting meets mean KL <= %s (%zu candidate setting%s measured)\n",
                kvt_report_num(c->max_kl, a, sizeof(a)), c->n_candidates,
                c->n_candidates == 1 ? "" : "s");
        if (c->nearest >= 0) {
            fputs("nearest: ", f);
            print_setting(&e->runs[c->nearest], f);
            fputc('\n', f);
        }
    }
    print_source(e, f);
    fputs("cheapest budget meeting the target, per policy:\n", f);
    int w = 6;
    for (size_t p = 0; p < c->n_policies; p++)
        w = (int)strlen(c->policy[p]) > w ? (int)strlen(c->policy[p]) : w;
    w = w > 40 ? 40 : w;
    for (size_t p = 0; p < c->n_policies; p++) {
        const long k = c->cheapest[p];
        fprintf(f, "  %-*s  ", w, c->policy[p]);
        if (!c->candidate_policy[p])
            fputs("(a reference)\n", f);
        else if (k < 0 && c->lowest[p] < 0)
            fputs("- (no setting measured)\n", f);
        else if (k < 0)
            fprintf(f, "- (its smallest mean KL: %s at %s)\n",
                    kvt_report_num(e->runs[c->lowest[p]].kl_mean, a, sizeof(a)),
                    e->runs[c->lowest[p]].budget);
        else
            fprintf(f, "%s (mean KL %s, keeps %s%%)\n", e->runs[k].budget,
                    kvt_report_num(e->runs[k].kl_mean, a, sizeof(a)),
                    kvt_report_num(100.0 * e->runs[k].kept_fraction, b, sizeof(b)));
    }
    return ferror(f) ? kvt_error_set(KVT_ERR_IO, "recommend: write failed") : KVT_OK;
}

static cJSON *setting_json(const kvt_e2e_run *x)
{
    cJSON *o = cJSON_CreateObject();
    if (!o)
        return NULL;
    cJSON_AddStringToObject(o, "label", x->policy);
    if (x->name)
        cJSON_AddStringToObject(o, "name", x->name);
    cJSON_AddStringToObject(o, "budget", x->budget);
    cJSON_AddNumberToObject(o, "budget_tokens", x->budget_tokens);
    cJSON_AddItemToObject(o, "kl_mean", kvt_json_number(x->kl_mean));
    cJSON_AddItemToObject(o, "kl_max", kvt_json_number(x->kl_max));
    cJSON_AddItemToObject(o, "top1_agreement", kvt_json_number(x->top1));
    cJSON_AddItemToObject(o, "nll_mean", kvt_json_number(x->nll));
    cJSON_AddItemToObject(o, "kept_fraction", kvt_json_number(x->kept_fraction));
    cJSON_AddItemToObject(o, "compression_ratio", kvt_json_number(1.0 / x->kept_fraction));
    cJSON *p = cJSON_AddObjectToObject(o, "proxy");
    cJSON_AddItemToObject(p, "err_decode", kvt_json_number(x->err_decode));
    cJSON_AddItemToObject(p, "recall_decode", kvt_json_number(x->recall_decode));
    return o;
}

kvt_status kvt_e2e_choice_write_json(const kvt_e2e_choice *c, const kvt_e2e *e, FILE *f)
{
    cJSON *root = cJSON_CreateObject();
    if (!root)
        return kvt_error_set(KVT_ERR_NOMEM, "out of memory");
    cJSON_AddStringToObject(root, "metric", "kl_mean");
    cJSON_AddStringToObject(root, "target_kind", "max");
    cJSON_AddItemToObject(root, "target", kvt_json_number(c->max_kl));
    cJSON_AddStringToObject(root, "source", "e2e");
    cJSON_AddStringToObject(root, "model", e->model);
    if (e->engine)
        cJSON_AddStringToObject(root, "engine", e->engine);
    else
        cJSON_AddNullToObject(root, "engine");
    cJSON_AddNumberToObject(root, "n_traces", (double)e->n_traces);
    cJSON_AddNumberToObject(root, "n_candidates", (double)c->n_candidates);
    cJSON_AddBoolToObject(root, "found", c->found);
    cJSON_AddItemToObject(root, "recommendation",
                          c->found ? setting_json(&e->runs[c->best]) : cJSON_CreateNull());
    if (c->nearest >= 0)
        cJSON_AddItemToObject(root, "nearest", setting_json(&e->runs[c->nearest]));
    cJSON *pol = cJSON_AddArrayToObject(root, "policies");
    bool ok = pol != NULL;
    for (size_t p = 0; ok && p < c->n_policies; p++) {
        cJSON *o = cJSON_CreateObject();
        if (!(ok = o != NULL))
            break;
        cJSON_AddItemToArray(pol, o);
        cJSON_AddStringToObject(o, "label", c->policy[p]);
        cJSON_AddBoolToObject(o, "candidate", c->candidate_policy[p]);
        cJSON_AddItemToObject(o, "cheapest_meeting",
                              c->cheapest[p] >= 0 ? setting_json(&e->runs[c->cheapest[p]])
                                                  : cJSON_CreateNull());
        cJSON_AddItemToObject(o, "lowest_kl",
                              c->lowest[p] >= 0 ? setting_json(&e->runs[c->lowest[p]])
                                                : cJSON_CreateNull());
    }
    kvt_status st =
        ok ? kvt_report_print_json(root, f) : kvt_error_set(KVT_ERR_NOMEM, "out of memory");
    cJSON_Delete(root);
    return st;
}
