/* alloc.c - the only allocation entry points of the library, with a failure hook so tests
 * can fail the N-th allocation and check that every cleanup path runs (SQLite's OOM test).
 */
#include "kvt_common.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

static _Atomic uint64_t g_count;   /* allocations since the last arm */
static _Atomic uint64_t g_fail_at; /* 0 = off */
static _Atomic int g_fired;

uint64_t kvt_alloc_fail_at(uint64_t n)
{
    uint64_t c = atomic_exchange(&g_count, 0);
    atomic_store(&g_fail_at, n);
    atomic_store(&g_fired, 0);
    return c;
}

bool kvt_alloc_fail_fired(void)
{
    return atomic_load(&g_fired) != 0;
}

static bool should_fail(void)
{
    uint64_t c = atomic_fetch_add(&g_count, 1) + 1;
    uint64_t f = atomic_load(&g_fail_at);
    if (f != 0 && c == f) {
        atomic_store(&g_fired, 1);
        return true;
    }
    return false;
}

/* The per-thread cache of large blocks (kvt_alloc_cache_begin): a replay worker allocates and
 * frees the same few tens of MiB-sized arrays for every layer; glibc hands blocks that large
 * back to the kernel on free, so each layer paid its page faults and the kernel's zeroing
 * again (~10% of the replay's CPU time). Cached blocks are reused best-fit (at most 1.5x the
 * request); kvt_alloc_cache_end frees them. glibc only (malloc_usable_size). */
#if defined(__GLIBC__)
#include <malloc.h>
#define CACHE_ON 1
#else
#define CACHE_ON 0
#endif
#define CACHE_MIN   (1u << 20) /* blocks under 1 MiB are glibc's business */
#define CACHE_SLOTS 24

typedef struct block_cache {
    int on, n;
    unsigned gen;
    void *p[CACHE_SLOTS];
    size_t size[CACHE_SLOTS];
    unsigned born[CACHE_SLOTS]; /* gen when cached */
} block_cache;
static _Thread_local block_cache t_cache;

void kvt_alloc_cache_begin(void)
{
    t_cache.on = CACHE_ON;
}

void kvt_alloc_cache_end(void)
{
    for (int i = 0; i < t_cache.n; i++)
        free(t_cache.p[i]);
    memset(&t_cache, 0, sizeof(t_cache));
}

size_t kvt_alloc_cache_bytes(void)
{
    size_t b = 0;
    for (int i = 0; i < t_cache.n; i++)
        b += t_cache.size[i];
    return b;
}

void kvt_alloc_cache_trim(void)
{
    for (int i = 0; i < t_cache.n;)
        if (t_cache.born[i] != t_cache.gen) { /* cached before the last trim, unused since */
            free(t_cache.p[i]);
            t_cache.n--;
            t_cache.p[i] = t_cache.p[t_cache.n];
            t_cache.size[i] = t_cache.size[t_cache.n];
            t_cache.born[i] = t_cache.born[t_cache.n];
        } else
            i++;
    t_cache.gen++;
}

static void *cache_take(size_t n)
{
    if (!t_cache.on || n < CACHE_MIN)
        return NULL;
    int best = -1;
    for (int i = 0; i < t_cache.n; i++)
        if (t_cache.size[i] >= n && t_cache.size[i] - n <= n / 2 &&
            (best < 0 || t_cache.size[i] < t_cache.size[best]))
            best = i;
    if (best < 0)
        return NULL;
    void *p = t_cache.p[best];
    t_cache.n--;
    t_cache.p[best] = t_cache.p[t_cache.n];
    t_cache.size[best] = t_cache.size[t_cache.n];
    t_cache.born[best] = t_cache.born[t_cache.n];
    return p;
}

void *kvt_malloc(size_t n)
{
    if (should_fail())
        return NULL;
    void *p = cache_take(n);
    return p ? p : malloc(n ? n : 1);
}

void *kvt_calloc(size_t count, size_t size)
{
    if (should_fail())
        return NULL;
    size_t n;
    if (t_cache.on && !kvt_mul_overflow(count, size, &n)) {
        void *p = cache_take(n);
        if (p)
            return memset(p, 0, n);
    }
    return calloc(count ? count : 1, size ? size : 1);
}

void *kvt_realloc(void *p, size_t n)
{
    if (should_fail())
        return NULL;
    return realloc(p, n ? n : 1);
}

void kvt_free(void *p)
{
#if CACHE_ON
    if (p && t_cache.on) {
        size_t n = malloc_usable_size(p);
        if (n >= CACHE_MIN) {
            if (t_cache.n == CACHE_SLOTS) { /* full: drop the smallest */
                int s = 0;
                for (int i = 1; i < CACHE_SLOTS; i++)
                    s = t_cache.size[i] < t_cache.size[s] ? i : s;
                if (t_cache.size[s] >= n) {
                    free(p);
                    return;
                }
                free(t_cache.p[s]);
                t_cache.p[s] = p, t_cache.size[s] = n, t_cache.born[s] = t_cache.gen;
                return;
            }
            t_cache.p[t_cache.n] = p, t_cache.born[t_cache.n] = t_cache.gen;
            t_cache.size[t_cache.n++] = n;
            return;
        }
    }
#endif
    free(p);
}

char *kvt_strdup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = kvt_malloc(n);
    if (d)
        memcpy(d, s, n);
    return d;
}
