/* cmd_merge.c - `kvtrace merge PART... -o results.json`: combines the partial results.json files
 * of `kvtrace replay --shard i/n` (one per shard, any order) into the results.json one
 * unsharded run writes. Thin: the checks and the merge are in analysis/ (kvt_results_merge).
 */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "kvt_analysis.h"
#include "kvt_cli.h"

static void help(void)
{
    printf("usage: kvtrace merge PART... -o results.json [--force]\n"
           "       kvtrace merge SELECTION_PART... -o selection.bin|.json [--force]\n\n"
           "Combine the partial results of 'kvtrace replay --shard I/N' (all N parts, any\n"
           "order) into the results.json one unsharded replay gives: per-head metrics are\n"
           "taken from the shard that replayed each (trace, layer) unit, and every per-layer,\n"
           "per-trace and aggregate summary is recomputed from them. The parts must come from\n"
           "one sharded replay: same policies, budgets, seed, coverage probes, heads and\n"
           "traces, each shard once and each unit exactly once; otherwise merge refuses.\n"
           "Given the parts of --export-selection instead (recognised by their content), it\n"
           "writes the selection export of the unsharded replay, byte for byte (binary, or\n"
           "JSON if the output ends in .json).\n\n"
           "  -o, --output FILE results.json to write\n"
           "  --force           overwrite an existing output file\n");
}

/* a selection export (binary magic, or JSON whose first key is selection_version) rather than
 * a results.json */
static bool is_selection(const char *path)
{
    char head[256] = "";
    FILE *f = kvt_fopen_regular(path);
    size_t n = f ? fread(head, 1, sizeof(head) - 1, f) : 0;
    if (f)
        fclose(f);
    head[n] = '\0';
    return (n >= 6 && !memcmp(head, "KVTSEL", 6)) || strstr(head, "\"selection_version\"");
}

int kvt_cmd_merge(int argc, char **argv)
{
    const char *cmd = "merge", *out = NULL;
    const char **names = kvt_calloc((size_t)argc + 1, sizeof(char *));
    kvt_results **parts = kvt_calloc((size_t)argc + 1, sizeof(*parts));
    size_t n = 0;
    bool force = false;
    int rc = 1;
    kvt_status st;
    if (!names || !parts) {
        kvt_cli_fail(cmd, "out of memory");
        goto out_free;
    }
    if (kvt_cli_wants_help(argc, argv)) {
        help();
        rc = 0;
        goto out_free;
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-o") || !strcmp(a, "--output")) {
            if (i + 1 >= argc) {
                kvt_cli_fail(cmd, "%s needs a value", a);
                rc = 2;
                goto out_free;
            }
            out = argv[++i];
        } else if (!strcmp(a, "--force")) {
            force = true;
        } else if (a[0] == '-' && a[1]) {
            kvt_cli_fail(cmd, "unknown option %s (see kvtrace merge --help)", a);
            rc = 2;
            goto out_free;
        } else
            names[n++] = a;
    }
    if (!n) {
        kvt_cli_fail(cmd, "no part given (usage: kvtrace merge PART... -o results.json)");
        rc = 2;
        goto out_free;
    }
    if (!out) {
        kvt_cli_fail(cmd, "no output file given (usage: kvtrace merge PART... -o results.json)");
        rc = 2;
        goto out_free;
    }
    if (!kvt_cli_output_ok(cmd, out, force, (const char *const *)names, (size_t)n))
        goto out_free;
    if (is_selection(names[0])) { /* parts of --export-selection */
        if ((st = kvt_selection_merge((const char *const *)names, n, out, force))) {
            kvt_cli_fail(cmd, "%s", kvt_error_msg());
            goto out_free;
        }
        fprintf(stderr, "merge: wrote %s (%zu selection export parts)\n", out, n);
        rc = 0;
        goto out_free;
    }
    for (size_t i = 0; i < n; i++)
        if ((st = kvt_results_read(names[i], &parts[i]))) {
            kvt_cli_fail_status(cmd, st, names[i]);
            goto out_free;
        }
    if ((st = kvt_results_merge(parts, names, n))) {
        kvt_cli_fail_status(cmd, st, "merge");
        goto out_free;
    }
    if ((st = kvt_results_write(parts[0], out, force))) {
        kvt_cli_fail_status(cmd, st, out);
        goto out_free;
    }
    fprintf(stderr, "merge: wrote %s (%zu parts, %zu trace%s)\n", out, n, parts[0]->n_traces,
            parts[0]->n_traces == 1 ? "" : "s");
    rc = 0;
out_free:
    for (size_t i = 0; parts && i < n; i++)
        kvt_results_free(parts[i]);
    kvt_free(parts);
    kvt_free(names);
    return rc;
}
