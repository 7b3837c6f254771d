/* sel_hash.h - selection records by their key (trace, policy, budget, layer, head, step): an
 * open-addressing table of record numbers, for finding a delta record's base (the record of
 * the step or the budget before it). Shared by selection_export.c and selection_read.c;
 * internal to analysis/.
 */
#ifndef KVT_SEL_HASH_H
#define KVT_SEL_HASH_H

#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "kvt_common.h"

typedef struct sel_slot {
    int k[6];
    int64_t rec; /* -1: empty */
} sel_slot;

typedef struct sel_hash {
    sel_slot *slot;
    size_t mask;
} sel_hash;

static inline size_t sel_hash_pos(const sel_hash *h, const int k[6])
{
    uint64_t x = 0x9E3779B97F4A7C15ull;
    for (int i = 0; i < 6; i++) {
        x ^= (uint64_t)(uint32_t)k[i];
        x *= 0xBF58476D1CE4E5B9ull;
        x ^= x >> 31;
    }
    return (size_t)x & h->mask;
}

/* Room for n keys (at most half full); false when out of memory */
static inline bool sel_hash_init(sel_hash *h, size_t n)
{
    size_t cap = 16;
    while (cap < 2 * n + 2)
        cap *= 2;
    h->mask = cap - 1;
    h->slot = kvt_malloc(cap * sizeof(sel_slot));
    for (size_t i = 0; h->slot && i < cap; i++)
        h->slot[i].rec = -1;
    return h->slot != NULL;
}

static inline void sel_hash_free(sel_hash *h)
{
    kvt_free(h->slot);
    h->slot = NULL;
}

/* The record of key k, or -1 */
static inline int64_t sel_hash_get(const sel_hash *h, const int k[6])
{
    for (size_t p = sel_hash_pos(h, k);; p = (p + 1) & h->mask) {
        const sel_slot *s = &h->slot[p];
        if (s->rec < 0 || !memcmp(s->k, k, sizeof(s->k)))
            return s->rec;
    }
}

/* Key k is record rec, unless the key is there already (the first record keeps it) */
static inline void sel_hash_put(sel_hash *h, const int k[6], int64_t rec)
{
    size_t p = sel_hash_pos(h, k);
    while (h->slot[p].rec >= 0 && memcmp(h->slot[p].k, k, sizeof(h->slot[p].k)))
        p = (p + 1) & h->mask;
    if (h->slot[p].rec < 0) {
        memcpy(h->slot[p].k, k, sizeof(h->slot[p].k));
        h->slot[p].rec = rec;
    }
}

#endif /* KVT_SEL_HASH_H */
