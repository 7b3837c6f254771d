/* cpu_internal.h - shared by the fast CPU kernels (kernels/cpu/): KVT_CLONES builds a
 * function for the baseline and for AVX2+FMA (x86-64-v3) and AVX-512 (x86-64-v4), the loader
 * picks the best one the CPU runs (GCC target_clones on x86-64 Linux; elsewhere a no-op).
 * Internal to kernels/.
 */
#ifndef KVT_CPU_INTERNAL_H
#define KVT_CPU_INTERNAL_H

#include <stddef.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) &&       \
    !defined(KVT_NO_CLONES) && !defined(__SANITIZE_THREAD__) /* TSan: resolvers run before it */
#define KVT_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define KVT_CLONES
#endif

/* Loops that visit rows in ranking order (i.e. at random) fetch the row PREFETCH tokens
 * ahead, so that its memory latency overlaps the work on the current one. */
#define PREFETCH 6
static inline void prefetch_row(const float *row, size_t n)
{
    for (size_t o = 0; o < n * sizeof(float); o += 64)
        __builtin_prefetch((const char *)row + o);
}

#endif /* KVT_CPU_INTERNAL_H */
