/* fuzz_budgets.c - libFuzzer entry point for the `--budgets` list parser (kvt_budgets_parse in
 * replay/policy.c) and the token count of each parsed budget at a few prompt lengths. Runs
 * over the checked-in corpus as the ctest fuzz_budgets_regression through fuzz_driver.c.
 */
#define _GNU_SOURCE /* memfd_create */
#include <stdlib.h>

#include "fuzz_util.h"
#include "kvt_replay.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > 4096)
        return 0;
    char *list = kvt_fuzz_cstr(data, size);
    if (!list)
        return 0;
    kvt_budget *b;
    size_t n;
    if (kvt_budgets_parse(list, &b, &n) == KVT_OK) {
        static const int n_tokens[] = {1, 7, 448, 131072, 2147483647};
        for (size_t i = 0; i < n; i++)
            for (size_t k = 0; k < sizeof(n_tokens) / sizeof(n_tokens[0]); k++)
                if (kvt_budget_tokens(&b[i], n_tokens[k]) < 1)
                    __builtin_trap(); /* documented: every budget keeps >= 1 token */
        kvt_free(b);
    }
    kvt_error_clear();
    free(list);
    return 0;
}
