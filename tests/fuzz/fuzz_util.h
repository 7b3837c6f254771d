/* fuzz_util.h - helpers shared by the libFuzzer entry points in tests/fuzz/: put the input
 * bytes into an anonymous memory file (memfd) so that readers that only take a path can be
 * fed from memory, through /proc/self/fd/N, without touching the disk.
 */
#ifndef KVT_FUZZ_UTIL_H
#define KVT_FUZZ_UTIL_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Write the n bytes of each of the n_parts parts into a new memfd and print its path into
 * path[path_cap]. Returns the fd (close it when done) or -1. */
static inline int kvt_fuzz_memfd(const void *const *parts, const size_t *n, size_t n_parts,
                                 char *path, size_t path_cap)
{
    int fd = memfd_create("kvt_fuzz", 0);
    if (fd < 0)
        return -1;
    for (size_t i = 0; i < n_parts; i++) {
        const uint8_t *p = parts[i];
        size_t left = n[i];
        while (left) {
            ssize_t w = write(fd, p, left);
            if (w <= 0) {
                close(fd);
                return -1;
            }
            p += w;
            left -= (size_t)w;
        }
    }
    snprintf(path, path_cap, "/proc/self/fd/%d", fd);
    return fd;
}

/* The whole input in a new memfd for a reader that only takes a path (path[path_cap]): the
 * fd (close it when done), or -1 for an input over 4 MiB or a failure. */
static inline int kvt_fuzz_input_file(const uint8_t *data, size_t size, char *path, size_t path_cap)
{
    if (size > (4u << 20))
        return -1;
    const void *parts[] = {data};
    const size_t n[] = {size};
    return kvt_fuzz_memfd(parts, n, 1, path, path_cap);
}

/* The input as a NUL-terminated string (stops at the first NUL byte), or NULL. Caller frees. */
static inline char *kvt_fuzz_cstr(const uint8_t *data, size_t size)
{
    char *s = malloc(size + 1);
    if (!s)
        return NULL;
    memcpy(s, data, size);
    s[size] = '\0';
    return s;
}

/* An input read as a program, a byte at a time (zeros once it is used up): the structured
 * targets (fuzz_trace_records, fuzz_capture_calls) draw every choice from it. */
typedef struct kvt_fuzz_src {
    const uint8_t *p;
    size_t n;
} kvt_fuzz_src;

static inline unsigned kvt_fuzz_take(kvt_fuzz_src *s)
{
    if (!s->n)
        return 0;
    s->n--;
    return *s->p++;
}

/* xorshift64 from *state: the next value, uniform in [-2, 2) */
static inline float kvt_fuzz_rnd(uint64_t *state)
{
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    return (float)((double)(*state >> 11) / 9007199254740992.0 * 4.0 - 2.0);
}

/* A file of this process for a target that writes one: $TMPDIR (or /tmp)/kvt_fuzz_NAME_PID.kvt */
static inline void kvt_fuzz_scratch_path(char *path, size_t cap, const char *name)
{
    const char *tmp = getenv("TMPDIR");
    snprintf(path, cap, "%s/kvt_fuzz_%s_%d.kvt", tmp && *tmp ? tmp : "/tmp", name, (int)getpid());
}

#endif /* KVT_FUZZ_UTIL_H */
