/* fuzz_safetensors_read.c - libFuzzer entry point for the safetensors reader (kvt_read_safetensors
 * in replay/safetensors.c: expected-attention's stats=, qfilter's filters=): the input is fed
 * through a memfd, as the reader only takes a path, and read as each of the tensor names the
 * policies ask for and one more; a tensor that reads must hold exactly its shape's elements of
 * its dtype's size, within the input, each of which is read (kvt_npy_at). Runs over the
 * checked-in corpus as the ctest fuzz_safetensors_read_regression.
 */
#define _GNU_SOURCE /* memfd_create */
#include <stdlib.h>

#include "fuzz_util.h"
#include "replay_internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char *names[] = {"query_mean", "query_cov", "q_filters", "__metadata__", "a"};
    char path[64];
    int fd = kvt_fuzz_input_file(data, size, path, sizeof(path));
    if (fd < 0)
        return 0;
    (void)kvt_is_safetensors(path);
    for (size_t k = 0; k < sizeof(names) / sizeof(names[0]); k++) {
        kvt_npy a;
        if (kvt_read_safetensors(path, names[k], &a) == KVT_OK) {
            size_t count = 1;
            for (int d = 0; d < a.ndim; d++)
                count *= (size_t)a.shape[d];
            if (count != a.n || (a.elem != 2 && a.elem != 4 && a.elem != 8) ||
                (a.bf16 && a.elem != 2) || (a.n > 0 && !a.data) || a.n * (size_t)a.elem > size ||
                k == 3)
                abort(); /* the shape and the data must agree; __metadata__ is no tensor */
            double sum = 0;
            for (size_t i = 0; i < a.n; i++)
                sum += kvt_npy_at(&a, i);
            if (sum == 1.25) /* keeps the walk from being optimised away */
                kvt_error_clear();
            kvt_npy_free(&a);
        }
        kvt_error_clear();
    }
    close(fd);
    return 0;
}
