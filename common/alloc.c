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

void *kvt_malloc(size_t n)
{
    if (should_fail())
        return NULL;
    return malloc(n ? n : 1);
}

void *kvt_calloc(size_t count, size_t size)
{
    if (should_fail())
        return NULL;
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
