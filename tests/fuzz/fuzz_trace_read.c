/* fuzz_trace_read.c - libFuzzer entry point for the trace reader: header, index, recovery
 * scan, every record's decode and verify. The same entry point runs over tests/golden and the
 * checked-in corpus as an ordinary ctest through fuzz_driver.c (zstd's regression pattern).
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "kvt_trace.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int fd = memfd_create("kvt_fuzz", 0);
    if (fd < 0)
        return 0;
    if (size && write(fd, data, size) != (ssize_t)size) {
        close(fd);
        return 0;
    }
    char path[64];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    kvt_trace_reader *r;
    if (kvt_trace_reader_open(path, &r) == KVT_OK) {
        size_t n = kvt_trace_reader_n_records(r);
        for (size_t i = 0; i < n && i < 4096; i++) {
            kvt_record_info in;
            if (kvt_trace_reader_record(r, i, &in) != KVT_OK || in.raw_bytes > (64u << 20))
                continue;
            void *buf = malloc(in.raw_bytes ? in.raw_bytes : 1);
            if (buf)
                kvt_trace_reader_read_record(r, i, buf, in.raw_bytes);
            uint32_t h, t, d;
            kvt_dtype dt;
            if (kvt_trace_reader_shape(r, in.layer, in.kind, &h, &t, &d, &dt) == KVT_OK &&
                (uint64_t)h * t * d * 4 <= (64u << 20)) {
                size_t cap = (size_t)h * t * d * 4;
                void *all = malloc(cap ? cap : 1);
                if (all)
                    kvt_trace_reader_read(
                        r, in.layer, in.kind, 0, h,
                        kvt_dtype_is_float(dt) ? KVT_DTYPE_F32 : KVT_DTYPE_INVALID, all, cap);
                free(all);
            }
            free(buf);
        }
        kvt_trace_reader_close(r);
    }
    kvt_verify_report rep;
    if (kvt_trace_verify(path, &rep) == KVT_OK)
        kvt_verify_report_free(&rep);
    close(fd);
    return 0;
}
