/* cmd_recommend.c - `kvtrace recommend RESULTS [--max-error E | --min-recall R] [--metric NAME]
 * [--json]`: the cheapest (policy, budget) of a results.json meeting a quality target, each
 * policy's knee budget, and per-layer / per-head budgets; or `kvtrace recommend --e2e E2E.json
 * [--max-kl K]`: the cheapest setting of an end-to-end check whose measured mean KL is <= K.
 * Thin: the logic is in report/ (kvt_recommend, kvt_recommend_e2e). Exit 0: recommended; 3: no
 * setting meets the target; 1: error; 2: usage.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "kvt_cli.h"
#include "kvt_report.h"

#define EXIT_NOT_MET 3

/* "no setting meets the target" is a documented outcome (exit 3), not an error: one line on
   stderr without "error:", saying when only the full cache would meet it */
static void say_not_met(const char *cmd, const kvt_recommendation *rec)
{
    const char *mn = kvt_rec_metric_name(rec->metric), *rel = rec->target_is_max ? "<=" : ">=";
    if (!rec->any_compressing)
        fprintf(stderr,
                "kvtrace %s: no setting below the full cache meets the target: %s %s %g (every "
                "measured setting keeps the whole cache)\n",
                cmd, mn, rel, rec->target);
    else if (rec->full_cache_meets)
        fprintf(stderr,
                "kvtrace %s: no setting below the full cache meets the target: %s %s %g (only "
                "settings that keep the whole cache meet it)\n",
                cmd, mn, rel, rec->target);
    else
        fprintf(stderr,
                "kvtrace %s: no setting meets the target: %s %s %g at any measured budget\n", cmd,
                mn, rel, rec->target);
}

/* recommend --e2e: the cheapest setting whose measured mean KL is at most max_kl */
static int recommend_e2e(const char *cmd, const char *path, double max_kl, bool json)
{
    kvt_e2e *e = NULL;
    kvt_e2e_choice *c = NULL;
    kvt_status st;
    int rc = 1;
    if ((st = kvt_e2e_read(path, &e)) || (st = kvt_recommend_e2e(e, max_kl, &c))) {
        kvt_cli_fail_status(cmd, st, path);
        goto out;
    }
    st = json ? kvt_e2e_choice_write_json(c, e, stdout) : kvt_e2e_choice_print(c, e, stdout);
    if (st) {
        kvt_cli_fail_status(cmd, st, "stdout");
        goto out;
    }
    fflush(stdout);
    rc = 0;
    if (!c->found) { /* a documented outcome (exit 3), one line without "error:" */
        fprintf(stderr,
                "kvtrace %s: no setting meets the target: mean KL <= %g nats in %s (%zu "
                "candidate setting%s)\n",
                cmd, max_kl, path, c->n_candidates, c->n_candidates == 1 ? "" : "s");
        rc = EXIT_NOT_MET;
    }
out:
    kvt_e2e_choice_free(c);
    kvt_e2e_free(e);
    return rc;
}

static void help(void)
{
    printf("usage: kvtrace recommend RESULTS [--max-error E | --min-recall R] [--metric NAME]\n"
           "                         [--json]\n"
           "       kvtrace recommend --e2e E2E.json [--max-kl K] [--json]\n\n"
           "Read a results.json (kvtrace replay) and print the cheapest (policy, budget) whose\n"
           "aggregate quality meets the target (cost = kept KV entries), the knee budget of\n"
           "each policy's curve, and the smallest measured budget meeting the target on each\n"
           "layer and each head of the recommended policy (\"all\": a budget that keeps the\n"
           "whole prompt; entry counts are summed over every trace). full and oracle are\n"
           "references and never recommended, nor is a setting that keeps the whole cache (a\n"
           "budget at or above the prompt length).\n\n"
           "  --max-error E   output error must be <= E (default: --max-error 0.1)\n"
           "  --min-recall R  attention recall (or coverage) must be >= R\n"
           "  --metric NAME   err_window | err_decode (with --max-error), recall_window |\n"
           "                  recall_decode | coverage | coverage_dropped (with --min-recall);\n"
           "                  default: the decode metric when decode queries were measured,\n"
           "                  else the window one\n"
           "  --json          print one JSON object instead of text\n"
           "  --write-allocation FILE\n"
           "                  also write the layer allocation to FILE as a layer_weights= file:\n"
           "                  replay or check it end to end with POLICY:layer_weights=FILE at\n"
           "                  the budget FILE names (its mean), where each layer keeps its own\n\n"
           "With --e2e, from the end-to-end check instead (kvtrace e2e-llama2c or\n"
           "kvtrace.hf.e2e, which ran the model with each setting's kept sets): the cheapest\n"
           "applied setting (smallest kept share of the KV cache) whose measured mean\n"
           "next-token KL divergence from the uncompressed run is at most K, and each\n"
           "policy's cheapest budget meeting it. No RESULTS: the e2e.json holds the settings.\n\n"
           "  --e2e FILE      an e2e.json\n"
           "  --max-kl K      mean KL (nats) must be <= K (default 0.1)\n\n"
           "exit status: 0 recommended, 3 no setting meets the target, 1 error, 2 usage\n");
}

int kvt_cmd_recommend(int argc, char **argv)
{
    const char *cmd = "recommend", *path = NULL, *e2e_path = NULL, *alloc_path = NULL;
    double max_kl = 0.1;
    bool have_kl = false;
    kvt_cli_target tg;
    bool json = false;
    kvt_results *res = NULL;
    kvt_recommendation *rec = NULL;
    kvt_status st;
    int rc = 1;
    if (kvt_cli_wants_help(argc, argv)) {
        help();
        return 0;
    }
    kvt_cli_target_init(&tg);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int t = kvt_cli_target_arg(cmd, argc, argv, &i, &tg);
        if (t < 0)
            return 2;
        if (t > 0)
            continue;
        if (!strcmp(a, "--json")) {
            json = true;
        } else if (!strcmp(a, "--write-allocation")) {
            if (i + 1 >= argc) {
                kvt_cli_fail(cmd, "%s needs a value", a);
                return 2;
            }
            alloc_path = argv[++i];
        } else if (!strcmp(a, "--e2e") || !strcmp(a, "--max-kl")) {
            if (i + 1 >= argc) {
                kvt_cli_fail(cmd, "%s needs a value", a);
                return 2;
            }
            const char *v = argv[++i];
            if (a[2] == 'e')
                e2e_path = v;
            else if (!kvt_cli_parse_max_kl(cmd, v, &max_kl))
                return 2;
            else
                have_kl = true;
        } else if (a[0] == '-' && a[1]) {
            kvt_cli_fail(cmd, "unknown option %s (see kvtrace recommend --help)", a);
            return 2;
        } else if (path) {
            kvt_cli_fail(cmd, "one RESULTS file only ('%s' and '%s')", path, a);
            return 2;
        } else
            path = a;
    }
    if (e2e_path || have_kl) {
        const char *why = !e2e_path ? "--max-kl needs --e2e E2E.json (the measured KL)"
                          : path    ? "--e2e recommends from the e2e.json alone: give no RESULTS"
                          : tg.have_max || tg.have_min || tg.metric
                              ? "--e2e recommends by the measured KL (--max-kl K), not by "
                                "--max-error, --min-recall or --metric"
                              : NULL;
        if (!why && alloc_path)
            why = "--write-allocation writes the layer allocation of a results.json; --e2e "
                  "has none";
        if (why) {
            kvt_cli_fail(cmd, "%s", why);
            return 2;
        }
        return recommend_e2e(cmd, e2e_path, max_kl, json);
    }
    if (!path) {
        kvt_cli_fail(cmd, "no results file (usage: kvtrace recommend RESULTS [--max-error E])");
        return 2;
    }
    if (!kvt_cli_target_finish(cmd, &tg))
        return 2;
    if ((st = kvt_results_read(path, &res))) {
        kvt_cli_fail_status(cmd, st, path);
        goto out_free;
    }
    if ((st = kvt_recommend(res, &tg.o, &rec))) {
        kvt_cli_fail_status(cmd, st, path);
        goto out_free;
    }
    st = json ? kvt_recommendation_write_json(rec, res, stdout)
              : kvt_recommendation_print(rec, res, stdout);
    if (st) {
        kvt_cli_fail_status(cmd, st, "stdout");
        goto out_free;
    }
    fflush(stdout);
    if (!rec->found) {
        say_not_met(cmd, rec);
        if (alloc_path)
            fprintf(stderr, "kvtrace %s: %s not written: no allocation meets the target\n", cmd,
                    alloc_path);
        rc = EXIT_NOT_MET;
        goto out_free;
    }
    if (alloc_path) {
        char mean[32];
        if ((st = kvt_recommendation_write_allocation(rec, res, alloc_path, mean, sizeof(mean)))) {
            kvt_cli_fail_status(cmd, st, alloc_path);
            goto out_free;
        }
        if (!json) /* stdout stays one JSON object with --json */
            printf("layer allocation written to %s (replay it at the budget %s)\n", alloc_path,
                   mean);
    }
    rc = 0;
out_free:
    kvt_recommendation_free(rec);
    kvt_results_free(res);
    return rc;
}
