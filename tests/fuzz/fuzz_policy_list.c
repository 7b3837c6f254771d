/* fuzz_policy_list.c - libFuzzer entry point for the `--policies` list parser
 * (kvt_policy_list_parse in replay/policy.c): splitting into specs, option continuation items,
 * every option's value parser, each policy's init, then the label, flags and options JSON of
 * each policy parsed. Options that name files (sparsemm scores=, mixkv rtable=) are read
 * relative to an empty directory, and inputs with '/' or a value "." or ".." are skipped, so
 * no file outside is read.
 * Runs over the checked-in corpus as the ctest fuzz_policy_list_regression.
 */
#define _GNU_SOURCE /* memfd_create */
#include <stdbool.h>
#include <stdlib.h>

#include "fuzz_util.h"
#include "kvt_replay.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    char dir[] = "/tmp/kvt_fuzz_policy_XXXXXX";
    if (mkdtemp(dir) && chdir(dir) == 0)
        rmdir(dir); /* an empty, deleted working directory: no file name resolves */
    return 0;
}

/* true if an option value is "." or "..": the (deleted) working directory or its parent, which
 * kvt_read_head_table would open (a known bug, see tests/RELIABILITY.md) */
static bool names_a_directory(const char *s)
{
    for (const char *e = strchr(s, '='); e; e = strchr(e + 1, '=')) {
        size_t dots = strspn(e + 1, ".");
        char end = e[1 + dots];
        if ((dots == 1 || dots == 2) && (end == '\0' || end == ',' || end == ':'))
            return true;
    }
    return false;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > 4096 || memchr(data, '/', size))
        return 0;
    char *list = kvt_fuzz_cstr(data, size);
    if (!list)
        return 0;
    if (names_a_directory(list)) {
        free(list);
        return 0;
    }
    kvt_policy_globals g = {.seed = size, .per_query_head = size & 1};
    kvt_policy **pols;
    size_t n_pol;
    if (kvt_policy_list_parse(list, size & 2 ? &g : NULL, &pols, &n_pol) == KVT_OK) {
        for (size_t i = 0; i < n_pol; i++) {
            (void)kvt_policy_name(pols[i]);
            (void)kvt_policy_label(pols[i]);
            (void)kvt_policy_flags(pols[i]);
            (void)kvt_policy_per_query_head(pols[i]);
            kvt_free(kvt_policy_options_json(pols[i]));
        }
        kvt_policy_list_free(pols, n_pol);
    }
    kvt_error_clear();
    free(list);
    return 0;
}
