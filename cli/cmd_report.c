/* cmd_report.c - `kvtrace report RESULTS -o DIR`: writes DIR/index.html (self-contained, works
 * offline from file://) and a PNG of every figure. Thin: the drawing and the page are in
 * report/ (kvt_report_write).
 */
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kvt_cli.h"
#include "kvt_report.h"

static void help(void)
{
    printf("usage: kvtrace report RESULTS -o DIR [--max-error E | --min-recall R]\n"
           "                      [--metric NAME] [--e2e E2E.json] [--force]\n\n"
           "Write a report of a results.json (kvtrace replay): DIR/index.html and a PNG of\n"
           "each figure. The page is one file that works offline from file://: PNGs and\n"
           "Chart.js are inlined and a Content-Security-Policy forbids every fetch. It\n"
           "holds the traces' metadata, the recommended setting for the quality target\n"
           "(as kvtrace recommend; default --max-error 0.1) or the nearest miss, the\n"
           "cheapest setting at a ladder of other targets, the best policy per budget and\n"
           "these figures, [their PNGs] (each PNG with its title, axes and legend or\n"
           "colour bar):\n\n"
           "  quality against budget  attention recall, output error (decode and window\n"
           "                          queries), key coverage (of all and of the dropped\n"
           "                          keys) and the overlap of the heads' kept sets of\n"
           "                          every policy against the mean kept entries per head\n"
           "                          (log scale), full cache and oracle dashed; hover a\n"
           "                          point for its policy, budget and value.\n"
           "                          [<metric>.png for err_decode, recall_decode,\n"
           "                          err_window, recall_window, coverage,\n"
           "                          coverage_dropped and head_overlap, where measured]\n"
           "  head redundancy         r per layer and KV head, a heatmap [redundancy.png]\n"
           "  recall and error per    per policy, heatmaps per layer and KV head at a\n"
           "  layer and head          budget picked with a menu; the page opens at the\n"
           "                          recommended budget (else the middle of the sweep)\n"
           "                          and the PNGs show that one; hover a cell for its\n"
           "                          value. Decode queries, else window ones.\n"
           "                          [heat_<metric>_<NN>_<policy>.png]\n"
           "  modality retention      share of the text and image tokens each policy\n"
           "                          keeps per budget; a text-only trace gets a sentence\n"
           "                          instead [modality_<text|image|video|other>.png]\n"
           "  allocated budgets       mean kept entries per head by layer, one line per\n"
           "                          budget, for the policies that spend their budget\n"
           "                          unevenly (PyramidKV, AdaKV, MixKV-AdaKV, ...)\n"
           "                          [alloc_<NN>_<policy>.png], and their kept entries\n"
           "                          per layer and head, heatmaps at a budget picked\n"
           "                          with a menu [alloc_heads_<NN>_<policy>.png]\n"
           "  end to end              with --e2e (kvtrace e2e-llama2c, kvtrace.hf.e2e):\n"
           "                          each setting's\n"
           "                          proxy err_decode against the model's next-token KL,\n"
           "                          Spearman's rho, a table of every setting [e2e.png]\n"
           "<NN> is the policy's index (two digits), <policy> its label made file-safe.\n\n"
           "The charts use Chart.js 3 (UMD build), read when the report is written:\n"
           "$KVT_CHARTJS if set, else the build's KVT_CHARTJS_PATH (Debian package\n"
           "libjs-chart.js); now %s.\n"
           "Without it the page shows the PNGs instead and says why (the heatmaps stay\n"
           "interactive). DIR is created if missing; an existing report in it is replaced\n"
           "with --force, files of the old report the new one lacks removed (DIR's other\n"
           "files are left alone; in a DIR with no report, a file named like one of the\n"
           "report's stops it).\n\n"
           "  -o, --output DIR  output directory\n"
           "  --max-error E     target: output error <= E (default 0.1)\n"
           "  --min-recall R    target: attention recall (or coverage) >= R\n"
           "  --metric NAME     the target's metric, as kvtrace recommend --metric\n"
           "  --e2e FILE        add the end-to-end check of kvtrace e2e-llama2c or\n"
           "                    kvtrace.hf.e2e (e2e.json)\n"
           "  --max-kl K        with --e2e: also name the cheapest setting whose measured\n"
           "                    mean KL is <= K nats (as kvtrace recommend --e2e)\n"
           "  --force           replace an existing report in DIR\n",
           kvt_report_chartjs_path());
}

/* false, said in one line, when the input at path is one of the files the report in dir
 * replaces (index.html or a PNG) */
static bool input_ok(const char *cmd, const char *path, const char *dir)
{
    char *rdir = kvt_strdup(path), *slash = rdir ? strrchr(rdir, '/') : NULL;
    const char *base = slash ? slash + 1 : path;
    if (!rdir) {
        kvt_cli_fail(cmd, "out of memory");
        return false;
    }
    if (slash)
        slash[slash == rdir ? 1 : 0] = '\0';
    struct stat a, b;
    size_t nb = strlen(base);
    bool clash = stat(slash ? rdir : ".", &a) == 0 && stat(dir, &b) == 0 && a.st_dev == b.st_dev &&
                 a.st_ino == b.st_ino &&
                 (!strcmp(base, "index.html") || (nb > 4 && !strcmp(base + nb - 4, ".png")));
    kvt_free(rdir);
    if (clash)
        kvt_cli_fail(cmd,
                     "%s is in %s, where the report writes index.html and its PNGs: "
                     "refusing to overwrite the input (choose another -o DIR)",
                     path, dir);
    return !clash;
}

/* The report replaces DIR/index.html and DIR/<figure>.png: an existing report needs --force,
 * and no input (RESULTS, the --e2e file) may ever be one of those files. */
static bool report_output_ok(const char *cmd, const char *const *inputs, size_t n_inputs,
                             const char *dir, bool force)
{
    for (size_t i = 0; i < n_inputs; i++)
        if (inputs[i] && !input_ok(cmd, inputs[i], dir))
            return false;
    char index[4096];
    if (snprintf(index, sizeof(index), "%s/index.html", dir) >= (int)sizeof(index)) {
        kvt_cli_fail(cmd, "output directory name too long");
        return false;
    }
    struct stat ds;
    if (stat(dir, &ds) != 0)
        return true; /* a new directory: the report creates it */
    if (!S_ISDIR(ds.st_mode)) {
        kvt_cli_fail(cmd, "%s exists and is not a directory", dir);
        return false;
    }
    /* a report whose page is gone (deleted, or a commit cut short) still has its file list */
    char list[4096 + 32];
    snprintf(list, sizeof(list), "%s/.kvtrace-report-files", dir);
    if (!force && access(index, F_OK) != 0 && access(list, F_OK) == 0) {
        kvt_cli_fail(cmd, "%s holds the files of a report (%s) (use --force to replace it)", dir,
                     list);
        return false;
    }
    return kvt_cli_output_ok(cmd, index, force, inputs, n_inputs);
}

int kvt_cmd_report(int argc, char **argv)
{
    const char *cmd = "report", *path = NULL, *dir = NULL, *e2e_path = NULL;
    double max_kl = NAN; /* --max-kl */
    kvt_e2e *e2e = NULL;
    bool force = false;
    kvt_cli_target tg;
    kvt_results *res = NULL;
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
        if (!strcmp(a, "-o") || !strcmp(a, "--output")) {
            if (i + 1 >= argc) {
                kvt_cli_fail(cmd, "%s needs a value", a);
                return 2;
            }
            dir = argv[++i];
        } else if (!strcmp(a, "--e2e")) {
            if (i + 1 >= argc) {
                kvt_cli_fail(cmd, "%s needs a value", a);
                return 2;
            }
            e2e_path = argv[++i];
        } else if (!strcmp(a, "--max-kl")) {
            if (i + 1 >= argc) {
                kvt_cli_fail(cmd, "%s needs a value", a);
                return 2;
            }
            if (!kvt_cli_parse_max_kl(cmd, argv[++i], &max_kl))
                return 2;
        } else if (!strcmp(a, "--force")) {
            force = true;
        } else if (a[0] == '-' && a[1]) {
            kvt_cli_fail(cmd, "unknown option %s (see kvtrace report --help)", a);
            return 2;
        } else if (path) {
            kvt_cli_fail(cmd, "one RESULTS file only ('%s' and '%s')", path, a);
            return 2;
        } else
            path = a;
    }
    if (!path || !dir) {
        kvt_cli_fail(cmd, "usage: kvtrace report RESULTS -o DIR");
        return 2;
    }
    if (!isnan(max_kl) && !e2e_path) {
        kvt_cli_fail(cmd, "--max-kl needs --e2e E2E.json (the measured KL)");
        return 2;
    }
    if (!*dir) {
        kvt_cli_fail(cmd, "an empty output directory (-o): give a directory name");
        return 2;
    }
    if (!kvt_cli_target_finish(cmd, &tg))
        return 2;
    const char *inputs[2] = {path, e2e_path}; /* e2e_path NULL without --e2e */
    if (!report_output_ok(cmd, inputs, 2, dir, force))
        return 1;
    if ((st = kvt_results_read(path, &res))) {
        kvt_cli_fail_status(cmd, st, path);
        goto out_free;
    }
    if (res->shard_count > 0) { /* the input's fault: named as the input (it named -o DIR) */
        kvt_cli_fail(cmd,
                     "%s: a partial result of replay --shard %d/%d: its summaries cover one "
                     "shard's layers (combine all parts with kvtrace merge first)",
                     path, res->shard_index, res->shard_count);
        goto out_free;
    }
    if (e2e_path) {
        if ((st = kvt_e2e_read(e2e_path, &e2e))) {
            kvt_cli_fail_status(cmd, st, e2e_path);
            goto out_free;
        }
        e2e->max_kl = max_kl;
        for (size_t k = 0; k < e2e->n_traces; k++) {
            const kvt_e2e_trace *x = &e2e->traces[k];
            if (kvt_e2e_find_trace(e2e, k, res) >= 0) /* a trace of these results */
                continue;
            const char *other = NULL; /* results' trace of that path, another capture */
            for (size_t t = 0; t < res->n_traces && !other; t++)
                if (x->fingerprint[0] && res->traces[t]->fingerprint[0] &&
                    kvt_cli_same_path(res->traces[t]->path, x->path))
                    other = res->traces[t]->fingerprint;
            char why[160] = "";
            if (other)
                snprintf(why, sizeof(why),
                         " (its trace of that path is another capture: "
                         "fingerprint %s, not %s)",
                         other, x->fingerprint);
            fprintf(stderr,
                    "kvtrace report: note: %s checked %s, which %s does not hold%s; the "
                    "end-to-end section is shown as it is\n",
                    e2e_path, x->path, path, why);
        }
    }
    /* a target given must be answerable (kvt_report_write says why not); without one the page
       says why it has no recommendation */
    const bool given = tg.have_max || tg.have_min || tg.metric;
    if ((st = kvt_report_write_e2e(res, dir, given ? &tg.o : NULL, e2e))) {
        /* writing the directory failed, or the results cannot answer: name the one at fault */
        kvt_cli_fail_status(cmd, st, st == KVT_ERR_IO || st == KVT_ERR_NOMEM ? dir : path);
        goto out_free;
    }
    printf("report: %s/index.html\n", dir);
    rc = 0;
out_free:
    kvt_e2e_free(e2e);
    kvt_results_free(res);
    kvt_report_global_cleanup();
    return rc;
}
