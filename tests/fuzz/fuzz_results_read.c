/* fuzz_results_read.c - libFuzzer entry point for the results.json reader (kvt_results_read in
 * analysis/results_json.c) and what `recommend` and `report` then compute from a result set
 * read from disk: the run summary of every (policy, budget) and of every trace and layer.
 * The input is fed through a memfd, as the reader only takes a path. Runs over the
 * checked-in corpus as the ctest fuzz_results_read_regression through fuzz_driver.c.
 */
#define _GNU_SOURCE /* memfd_create */
#include <stdlib.h>

#include "fuzz_util.h"
#include "kvt_analysis.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char path[64];
    int fd = kvt_fuzz_input_file(data, size, path, sizeof(path));
    if (fd < 0)
        return 0;
    kvt_results *r;
    if (kvt_results_read(path, &r) == KVT_OK) {
        kvt_run_summary s;
        for (size_t p = 0; p < r->n_policies && p < 64; p++)
            for (size_t b = 0; b < r->n_budgets && b < 64; b++) {
                (void)kvt_summarize_results(r, p, b, &s);
                for (size_t t = 0; t < r->n_traces && t < 8; t++)
                    (void)kvt_summarize_trace(r->traces[t], p, b, 0, &s);
            }
        kvt_results_free(r);
    }
    kvt_error_clear();
    close(fd);
    return 0;
}
