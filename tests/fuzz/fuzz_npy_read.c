/* fuzz_npy_read.c - libFuzzer entry point for the .npy reader of the external policy
 * (kvt_read_npy in replay/npy.c): the input is fed through a memfd, as the reader only takes a
 * path; an array that reads must hold exactly its shape's elements, each of which is read
 * (kvt_npy_at). Runs over the checked-in corpus as the ctest fuzz_npy_read_regression.
 */
#define _GNU_SOURCE /* memfd_create */
#include <stdlib.h>

#include "fuzz_util.h"
#include "replay_internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char path[64];
    int fd = kvt_fuzz_input_file(data, size, path, sizeof(path));
    if (fd < 0)
        return 0;
    kvt_npy a;
    if (kvt_read_npy(path, &a) == KVT_OK) {
        size_t count = 1;
        for (int d = 0; d < a.ndim; d++)
            count *= (size_t)a.shape[d];
        if (count != a.n || (a.elem != 2 && a.elem != 4 && a.elem != 8) || (a.n > 0 && !a.data) ||
            a.n * (size_t)a.elem > size)
            abort(); /* the shape and the data must agree */
        double sum = 0;
        for (size_t i = 0; i < a.n; i++)
            sum += kvt_npy_at(&a, i);
        if (sum == 1.25) /* keeps the walk from being optimised away */
            kvt_error_clear();
        kvt_npy_free(&a);
    }
    kvt_error_clear();
    close(fd);
    return 0;
}
