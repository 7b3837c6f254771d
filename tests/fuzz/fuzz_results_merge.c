/* fuzz_results_merge.c - libFuzzer entry point for `kvtrace merge` (kvt_results_merge in
 * analysis/results_merge.c): the input is two or three results.json texts separated by a line
 * "--part--", each parsed as kvt_results_read would (kvt_results_parse), then merged. The seeds
 * are the partial results of real sharded replays, so that mutations reach the merge's checks
 * (settings, shard indices, every (trace, layer) unit once) and its copying. A merge that
 * succeeds must give a result that serialises and parses back, complete (no shard left) and
 * with the parts' policies, budgets and traces; a merge that fails must leave the first part as
 * it was (its text unchanged). A breach aborts. Runs over the checked-in corpus as the ctest
 * fuzz_results_merge_regression through fuzz_driver.c.
 */
#define _GNU_SOURCE /* memmem */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvt_analysis.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define SEP     "\n--part--\n"
#define MAX_PTS 3

static void fail(const char *what)
{
    fprintf(stderr, "fuzz_results_merge: %s\n", what);
    abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > (1u << 20))
        return 0;
    char *txt = malloc(size + 1);
    if (!txt)
        return 0;
    memcpy(txt, data, size);
    txt[size] = '\0';
    kvt_results *parts[MAX_PTS] = {NULL};
    const char *names[MAX_PTS] = {"part 1", "part 2", "part 3"};
    size_t n = 0;
    char *before = NULL, *after = NULL;
    size_t nb = 0, na = 0;
    for (char *p = txt; p && n < MAX_PTS;) {
        char *e = memmem(p, size - (size_t)(p - txt), SEP, strlen(SEP));
        const size_t len = e ? (size_t)(e - p) : size - (size_t)(p - txt);
        if (kvt_results_parse(p, len, names[n], &parts[n]) != KVT_OK)
            goto out;
        n++;
        p = e ? e + strlen(SEP) : NULL;
    }
    if (n < 2 || kvt_results_to_json(parts[0], &before, &nb) != KVT_OK)
        goto out;
    const size_t n_pol = parts[0]->n_policies, n_bud = parts[0]->n_budgets;
    const size_t n_tr = parts[0]->n_traces;
    if (kvt_results_merge(parts, names, n) != KVT_OK) {
        if (kvt_results_to_json(parts[0], &after, &na) != KVT_OK || na != nb ||
            memcmp(before, after, nb))
            fail("a failed merge changed the first part");
        goto out;
    }
    kvt_free(after);
    after = NULL;
    kvt_results *back = NULL;
    if (kvt_results_to_json(parts[0], &after, &na) != KVT_OK ||
        kvt_results_parse(after, na, "merged", &back) != KVT_OK)
        fail("a merged result does not serialise and parse back");
    if (back->n_policies != n_pol || back->n_budgets != n_bud || back->n_traces != n_tr ||
        back->shard_count != 0)
        fail("a merged result lost policies, budgets or traces, or is still a shard");
    kvt_results_free(back);
out:
    for (size_t i = 0; i < MAX_PTS; i++)
        kvt_results_free(parts[i]);
    kvt_free(before);
    kvt_free(after);
    free(txt);
    kvt_error_clear();
    return 0;
}
