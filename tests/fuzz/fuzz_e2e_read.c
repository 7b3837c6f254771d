/* fuzz_e2e_read.c - libFuzzer entry point for the reader of the end-to-end check's e2e.json
 * (kvt_e2e_parse in report/e2e.c), which `kvtrace report --e2e` feeds to the page. Runs over
 * the checked-in corpus as the ctest fuzz_e2e_read_regression through fuzz_driver.c.
 */
#define _GNU_SOURCE /* memfd_create, in fuzz_util.h */
#include <stdlib.h>

#include "fuzz_util.h"
#include "kvt_report.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    kvt_e2e *e;
    if (kvt_e2e_parse((const char *)data, size, "input", &e) == KVT_OK) {
        size_t n = strlen(e->model); /* touch what the page reads */
        for (size_t i = 0; i < e->n_traces; i++)
            n += strlen(e->traces[i].path);
        for (size_t i = 0; i < e->n_runs; i++)
            n += strlen(e->runs[i].policy) + strlen(e->runs[i].budget);
        if (n == (size_t)-1)
            abort();
        kvt_e2e_free(e);
    }
    kvt_error_clear();
    return 0;
}
