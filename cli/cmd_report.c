/* cmd_report.c - `kvtrace report RESULTS -o DIR`: writes DIR/index.html (self-contained, works
 * offline from file://) and a PNG of every figure. Thin: the drawing and the page are in
 * report/ (kvt_report_write).
 */
#include <stdio.h>
#include <string.h>

#include "kvt_cli.h"
#include "kvt_report.h"

static void help(void)
{
    printf("usage: kvtrace report RESULTS -o DIR\n\n"
           "Write a report of a results.json (kvtrace replay): DIR/index.html, one file that\n"
           "works offline (figures inlined, no network), with the traces' metadata, the\n"
           "recommended settings (as kvtrace recommend --max-error 0.1), the best policy per\n"
           "budget, the head redundancy heatmap and the quality-against-budget figures; and\n"
           "a PNG of each figure: redundancy.png and <metric>.png for err_decode,\n"
           "recall_decode, err_window, recall_window and coverage, where measured.\n"
           "DIR is created if missing; its report files are overwritten.\n\n"
           "  -o, --output DIR  output directory\n");
}

int kvt_cmd_report(int argc, char **argv)
{
    const char *cmd = "report", *path = NULL, *dir = NULL;
    kvt_results *res = NULL;
    kvt_status st;
    int rc = 1;
    if (kvt_cli_wants_help(argc, argv)) {
        help();
        return 0;
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-o") || !strcmp(a, "--output")) {
            if (i + 1 >= argc) {
                kvt_cli_fail(cmd, "%s needs a value", a);
                return 2;
            }
            dir = argv[++i];
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
    if ((st = kvt_results_read(path, &res))) {
        kvt_cli_fail_status(cmd, st, path);
        goto out_free;
    }
    if ((st = kvt_report_write(res, dir))) {
        kvt_cli_fail_status(cmd, st, dir);
        goto out_free;
    }
    printf("report: %s/index.html\n", dir);
    rc = 0;
out_free:
    kvt_results_free(res);
    kvt_report_global_cleanup();
    return rc;
}
