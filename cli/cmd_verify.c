/* cmd_verify.c - `kvtrace verify TRACE [--json]`: check every checksum; exit 0 when intact,
 * 1 with one line per damaged or missing record otherwise (--json: the same as one object),
 * 2 when the file is not a readable trace. A selection export (replay --export-selection) is
 * read whole by its checked reader: exit 0 when it reads, 1 with the reader's line when it is
 * damaged, 2 when it cannot be read (or is newer than this kvtrace).
 */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <string.h>

#include "kvt_analysis.h"
#include "kvt_cli.h"
#include "kvt_trace.h"

static void on_progress(void *user, uint64_t done, uint64_t total)
{
    kvt_progress_update(user, done, total);
}

static void help(void)
{
    printf("usage: kvtrace verify TRACE|SELECTION [--quiet | --json]\n\n"
           "Check every record of a trace: header and payload checksums, that each payload\n"
           "decompresses, the index and trailer, record-number gaps, and that every layer the\n"
           "header promises has its K, V and Q_window.\n\n"
           "  -q, --quiet  print nothing for an intact trace (the exit status says it);\n"
           "               a damaged one is still listed\n"
           "  --json       print the report as one JSON object: path, intact, header_ok,\n"
           "               index_ok, trailer_ok, records_ok, records_bad, records_expected\n"
           "               (null: unknown), tail_bytes_lost, problems (each: offset, record,\n"
           "               kind, layer, null where unknown, and what)\n\n"
           "exit status: 0 intact; 1 damaged or incomplete (each problem is listed);\n"
           "             2 not a readable trace.\n\n"
           "A selection export (kvtrace replay --export-selection, binary or JSON) is read\n"
           "whole by its checked reader (framing, the end record's count, every field, index\n"
           "and delta record): 0 when it reads, 1 with what is wrong and where, 2 when it\n"
           "cannot be read or is newer than this kvtrace. --json: path, kind\n"
           "(\"selection_export\"), intact, records (null when damaged), problem (null when\n"
           "intact).\n");
}

/* A selection export: read whole by kvt_selection_read; the exit status */
static int verify_selection(const char *path, bool quiet, bool json)
{
    kvt_selection *sel = NULL;
    kvt_status st = kvt_selection_read(path, &sel);
    const size_t n = sel ? kvt_selection_get_header(sel)->n_records : 0;
    kvt_selection_free(sel);
    if (st != KVT_OK && st != KVT_ERR_CORRUPT)
        return kvt_cli_fail_status("verify", st, path), 2;
    if (json) {
        cJSON *o = cJSON_CreateObject();
        char *txt = NULL;
        if (o) {
            cJSON_AddStringToObject(o, "path", path);
            cJSON_AddStringToObject(o, "kind", "selection_export");
            cJSON_AddBoolToObject(o, "intact", st == KVT_OK);
            if (st == KVT_OK) {
                cJSON_AddNumberToObject(o, "records", (double)n);
                cJSON_AddNullToObject(o, "problem");
            } else {
                cJSON_AddNullToObject(o, "records");
                cJSON_AddStringToObject(o, "problem", kvt_error_msg());
            }
            txt = cJSON_Print(o);
        }
        cJSON_Delete(o);
        if (!txt)
            return kvt_cli_fail("verify", "out of memory for the JSON report"), 2;
        kvt_utf8_sanitize(txt);
        printf("%s\n", txt);
        cJSON_free(txt);
    } else if (st == KVT_OK) {
        if (!quiet)
            printf("%s: OK (selection export, %zu records, every one read and checked)\n", path, n);
    } else {
        printf("%s: DAMAGED selection export: %s\n", path, kvt_error_msg());
    }
    kvt_error_clear();
    return st == KVT_OK ? 0 : 1;
}

/* the report as one JSON object on stdout; false when out of memory */
static bool print_json(const char *path, const kvt_verify_report *rep)
{
    cJSON *o = cJSON_CreateObject(), *probs = NULL;
    if (o) {
        cJSON_AddStringToObject(o, "path", path);
        cJSON_AddBoolToObject(o, "intact", rep->n_problems == 0);
        cJSON_AddBoolToObject(o, "header_ok", rep->header_ok);
        cJSON_AddBoolToObject(o, "index_ok", rep->index_ok);
        cJSON_AddBoolToObject(o, "trailer_ok", rep->trailer_ok);
        cJSON_AddNumberToObject(o, "records_ok", (double)rep->n_records_ok);
        cJSON_AddNumberToObject(o, "records_bad", (double)rep->n_records_bad);
        if (rep->n_records_expected)
            cJSON_AddNumberToObject(o, "records_expected", (double)rep->n_records_expected);
        else
            cJSON_AddNullToObject(o, "records_expected");
        cJSON_AddNumberToObject(o, "tail_bytes_lost", (double)rep->tail_bytes_lost);
        probs = cJSON_AddArrayToObject(o, "problems");
    }
    bool ok = probs != NULL;
    for (size_t i = 0; ok && i < rep->n_problems; i++) {
        const kvt_verify_problem *pr = &rep->problems[i];
        cJSON *e = cJSON_CreateObject();
        ok = e && cJSON_AddItemToArray(probs, e);
        if (!ok) {
            cJSON_Delete(e);
            break;
        }
        if (pr->file_offset) /* 0: no place in the file (a record or a field missing) */
            cJSON_AddNumberToObject(e, "offset", (double)pr->file_offset);
        else
            cJSON_AddNullToObject(e, "offset");
        const char *kind = pr->kind ? kvt_kind_name(pr->kind) : NULL;
        if (pr->seq >= 0)
            cJSON_AddNumberToObject(e, "record", pr->seq);
        else
            cJSON_AddNullToObject(e, "record");
        if (kind)
            cJSON_AddStringToObject(e, "kind", kind);
        else
            cJSON_AddNullToObject(e, "kind");
        if (pr->layer >= 0)
            cJSON_AddNumberToObject(e, "layer", pr->layer);
        else
            cJSON_AddNullToObject(e, "layer");
        cJSON_AddStringToObject(e, "what", pr->what);
    }
    char *js = ok ? cJSON_Print(o) : NULL;
    if (js) { /* a path that is not UTF-8 was refused; bytes of a damaged record's text: '?' */
        kvt_utf8_sanitize(js);
        printf("%s\n", js);
    }
    cJSON_free(js);
    cJSON_Delete(o);
    return js != NULL;
}

int kvt_cmd_verify(int argc, char **argv)
{
    const char *path = NULL;
    bool quiet = false, json = false;
    if (kvt_cli_wants_help(argc, argv)) {
        help();
        return 0;
    }
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quiet") || !strcmp(argv[i], "-q"))
            quiet = true;
        else if (!strcmp(argv[i], "--json"))
            json = true;
        else if (argv[i][0] == '-' && argv[i][1])
            return kvt_cli_fail("verify", "unknown option %s", argv[i]), 2;
        else if (!path)
            path = argv[i];
        else
            return kvt_cli_fail("verify", "one trace at a time (got %s and %s)", path, argv[i]), 2;
    }
    if (!path)
        return kvt_cli_fail("verify", "no trace given (usage: kvtrace verify TRACE)"), 2;
    if (quiet && json)
        return kvt_cli_fail("verify", "--quiet and --json: choose one"), 2;
    if (json && !kvt_cli_json_text_ok("verify", "the path", path))
        return 2;
    uint32_t hlen;
    const int what = kvt_cli_sniff("verify", path, &hlen);
    if (what == KVT_CLI_FILE_SELECTION)
        return verify_selection(path, quiet, json);
    if (what == KVT_CLI_FILE_RESULTS)
        return 2; /* refused in one line by kvt_cli_sniff */
    kvt_verify_report rep;
    kvt_progress prog;
    kvt_progress_start(&prog, "verify");
    kvt_status s = kvt_trace_verify_ex(path, &rep, on_progress, &prog);
    kvt_progress_end(&prog);
    if (s != KVT_OK)
        return kvt_cli_fail_status("verify", s, path), 2;
    if (json) {
        const int rc = rep.n_problems ? 1 : 0;
        const bool printed = print_json(path, &rep);
        kvt_verify_report_free(&rep);
        if (!printed)
            return kvt_cli_fail("verify", "out of memory for the JSON report"), 2;
        return rc;
    }
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
