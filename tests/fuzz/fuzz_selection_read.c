/* fuzz_selection_read.c - libFuzzer entry point for the selection export reader
 * (kvt_selection_read in analysis/selection_read.c), binary and JSON layouts: the input is fed
 * through a memfd, as the reader only takes a path; a file that reads is then walked record by
 * record through the accessors: kvt_selection_copy_set first (a delta record's set expanded
 * from the file without being held), then kvt_selection_record_at, which must give the same
 * set, kvt_selection_find, which must find each record's own set, kvt_selection_record_info
 * and kvt_selection_shape, which must give what a scan of the records gives, touching every
 * kept index. Runs over the
 * checked-in corpus as the ctest fuzz_selection_read_regression through fuzz_driver.c.
 */
#define _GNU_SOURCE /* memfd_create */
#include <stdlib.h>
#include <string.h>

#include "fuzz_util.h"
#include "kvt_analysis.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char path[64];
    int fd = kvt_fuzz_input_file(data, size, path, sizeof(path));
    if (fd < 0)
        return 0;
    kvt_selection *s;
    if (kvt_selection_read(path, &s) == KVT_OK) {
        const kvt_selection_header *h = kvt_selection_get_header(s);
        size_t sum = 0;
        for (size_t i = 0; i < h->n_records; i++) { /* copied in reverse: chains walked back */
            const size_t k = h->n_records - 1 - i;
            kvt_selection_record info;
            if (kvt_selection_record_info(s, k, &info) != KVT_OK)
                abort();
            int32_t *buf = malloc((info.n ? info.n : 1) * sizeof(int32_t));
            if (!buf || kvt_selection_copy_set(s, k, buf, info.n) != KVT_OK)
                abort();
            const kvt_selection_record *r = kvt_selection_record_at(s, k);
            if (!r || r->n != info.n || memcmp(r->idx, buf, info.n * sizeof(int32_t)))
                abort(); /* the copy and the held set agree */
            free(buf);
        }
        for (size_t i = 0; i < h->n_records; i++) {
            const kvt_selection_record *r = kvt_selection_record_at(s, i);
            const int32_t *idx;
            size_t cnt;
            if (!r ||
                kvt_selection_find(s, r->trace, r->policy, r->budget, r->layer, r->head, r->step,
                                   &idx, &cnt) != KVT_OK ||
                idx != r->idx || cnt != r->n)
                abort(); /* every record must be found as itself */
            for (size_t k = 0; k < cnt; k++)
                sum += (size_t)idx[k];
            if ((size_t)r->trace >= h->n_traces || (size_t)r->policy >= h->n_policies ||
                (size_t)r->budget >= h->n_budgets || !h->policies[r->policy].label ||
                !h->budgets[r->budget] || !h->traces[r->trace])
                abort();
        }
        int want[8][64][3] = {{{0}}}; /* the shapes of the first traces and policies, by a scan */
        for (size_t i = 0; i < h->n_records; i++) {
            kvt_selection_record r;
            kvt_selection_record_info(s, i, &r);
            if (r.trace < 8 && r.policy < 64) {
                int *w = want[r.trace][r.policy];
                w[0] = r.layer >= w[0] ? r.layer + 1 : w[0];
                w[1] = r.head >= w[1] ? r.head + 1 : w[1];
                w[2] = r.step >= w[2] ? r.step + 1 : w[2];
            }
        }
        for (size_t t = 0; t < h->n_traces && t < 8; t++)
            for (size_t p = 0; p < h->n_policies && p < 64; p++) {
                int nl, nh, ns;
                const int *w = want[t][p];
                if (kvt_selection_shape(s, (int)t, (int)p, &nl, &nh, &ns) != KVT_OK || nl != w[0] ||
                    nh != w[1] || ns != w[2])
                    abort();
            }
        const int32_t *idx;
        size_t cnt;
        (void)kvt_selection_find(s, 0, 0, 0, 0, 0, -1, &idx, &cnt);
        if (sum == 1) /* keeps the walk from being optimised away */
            kvt_error_clear();
        kvt_selection_free(s);
    }
    kvt_error_clear();
    close(fd);
    return 0;
}
