/* fuzz_head_table.c - libFuzzer entry point for the per-(layer, head) table reader
 * (kvt_read_head_table in replay/alloc.c: JSON objects and arrays, and text tables such as
 * DuoAttention's full_attention_heads.tsv). The input is fed through a memfd. A table that
 * reads has at least one layer and head, every value walked. Runs over the checked-in corpus
 * as the ctest fuzz_head_table_regression.
 */
#define _GNU_SOURCE /* memfd_create */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "fuzz_util.h"
#include "replay_internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char path[64];
    int fd = kvt_fuzz_input_file(data, size, path, sizeof(path));
    if (fd < 0)
        return 0;
    int L = 0, H = 0;
    double *tab = NULL;
    if (kvt_read_head_table(path, &L, &H, &tab) == KVT_OK) {
        if (L < 1 || H < 1 || !tab)
            abort();
        double sum = 0;
        for (size_t i = 0; i < (size_t)L * H; i++)
            sum += isnan(tab[i]) ? 0 : tab[i];
        if (sum == 1.25) /* keeps the walk from being optimised away */
            kvt_error_clear();
        kvt_free(tab);
    }
    kvt_error_clear();
    close(fd);
    return 0;
}
