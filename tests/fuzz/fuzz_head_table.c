/* fuzz_head_table.c - libFuzzer entry point for the per-(layer, head) table reader
 * (kvt_read_head_table in replay/alloc.c: JSON objects and arrays, and text tables such as
 * DuoAttention's full_attention_heads.tsv) and for duo-attention's init over it (clipping and
 * the model-wide ranking of the heads). The input is fed through a memfd. A table that reads
 * has at least one layer and head; duo-attention must take exactly the tables that read with
 * no missing score. The same bytes are then a layer_weights= file (replay/layer_weights.c):
 * taken, they hold at least one weight, each finite and > 0, and every layer's budget at
 * 1 and 2^20 tokens is >= 1 and never below the one at 1. Runs over the checked-in corpus as
 * the ctest fuzz_head_table_regression.
 */
#define _GNU_SOURCE /* memfd_create */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "fuzz_util.h"
#include "replay_internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char path[64], spec[128];
    int fd = kvt_fuzz_input_file(data, size, path, sizeof(path));
    if (fd < 0)
        return 0;
    int L = 0, H = 0;
    double *tab = NULL;
    bool whole = false; /* read, with a score for every (layer, head) */
    if (kvt_read_head_table(path, &L, &H, &tab) == KVT_OK) {
        if (L < 1 || H < 1 || !tab)
            abort();
        whole = true;
        for (size_t i = 0; i < (size_t)L * H; i++)
            whole = whole && !isnan(tab[i]);
        kvt_free(tab);
    }
    kvt_error_clear();
    snprintf(spec, sizeof(spec), "duo-attention:scores=%s", path);
    kvt_policy *p = NULL;
    kvt_status st = kvt_policy_create(spec, NULL, &p);
    if ((st == KVT_OK) != whole && st != KVT_ERR_NOMEM)
        abort(); /* the policy takes what the reader reads whole, and nothing else */
    kvt_policy_free(p);
    kvt_error_clear();
    snprintf(spec, sizeof(spec), "snapkv:layer_weights=%s", path);
    p = NULL;
    if (kvt_policy_create(spec, NULL, &p) == KVT_OK) {
        if (!p->lw.w || p->lw.n < 1)
            abort();
        const int B[2] = {1, 1 << 20};
        for (int l = 0; l < p->lw.n; l++) {
            int Bl[2];
            if (!isfinite(p->lw.w[l]) || !(p->lw.w[l] > 0))
                abort();
            kvt_layer_budgets(&p->lw, l, B, NULL, 2, Bl, NULL);
            if (Bl[0] < 1 || Bl[1] < Bl[0])
                abort();
        }
    }
    kvt_policy_free(p);
    kvt_error_clear();
    close(fd);
    return 0;
}
