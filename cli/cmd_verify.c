/* cmd_verify.c - `kvtrace verify TRACE`: check every checksum; exit 0 when intact, 1 with
 * one line per damaged or missing record otherwise, 2 when the file is not a readable trace.
 */
#include <stdio.h>
#include <string.h>

#include "kvt_cli.h"
#include "kvt_trace.h"

static void on_progress(void *user, uint64_t done, uint64_t total)
{
    kvt_progress_update(user, done, total);
}

static void help(void)
{
    printf("usage: kvtrace verify TRACE [--quiet]\n\n"
           "Check every record of a trace: header and payload checksums, that each payload\n"
           "decompresses, the index and trailer, record-number gaps, and that every layer the\n"
           "header promises has its K, V and Q_window.\n\n"
           "  -q, --quiet  print nothing for an intact trace (the exit status says it);\n"
           "               a damaged one is still listed\n\n"
           "exit status: 0 intact; 1 damaged or incomplete (each problem is listed);\n"
           "             2 not a readable trace.\n");
}

int kvt_cmd_verify(int argc, char **argv)
{
    const char *path = NULL;
    bool quiet = false;
    if (kvt_cli_wants_help(argc, argv)) {
        help();
        return 0;
    }
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quiet") || !strcmp(argv[i], "-q"))
            quiet = true;
        else if (argv[i][0] == '-' && argv[i][1])
            return kvt_cli_fail("verify", "unknown option %s", argv[i]), 2;
        else if (!path)
            path = argv[i];
        else
            return kvt_cli_fail("verify", "one trace at a time (got %s and %s)", path, argv[i]), 2;
    }
    if (!path)
        return kvt_cli_fail("verify", "no trace given (usage: kvtrace verify TRACE)"), 2;
    kvt_verify_report rep;
    kvt_progress prog;
    kvt_progress_start(&prog, "verify");
    kvt_status s = kvt_trace_verify_ex(path, &rep, on_progress, &prog);
    kvt_progress_end(&prog);
    if (s != KVT_OK)
        return kvt_cli_fail_status("verify", s, path), 2;
    if (rep.n_problems == 0) {
        if (!quiet)
            printf("%s: OK (%llu records, all checksums match)\n", path,
                   (unsigned long long)rep.n_records_ok);
        kvt_verify_report_free(&rep);
        return 0;
    }
    printf("%s: DAMAGED: %llu records intact, %llu damaged, %zu problem(s)\n", path,
           (unsigned long long)rep.n_records_ok, (unsigned long long)rep.n_records_bad,
           rep.n_problems);
    for (size_t i = 0; i < rep.n_problems; i++)
        printf("  - %s\n", rep.problems[i].what);
    kvt_verify_report_free(&rep);
    return 1;
}
