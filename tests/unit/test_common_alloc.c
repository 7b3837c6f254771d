/* test_common_alloc.c - the allocation failure hook used by fault-injection tests fails
 * exactly the N-th allocation and reports that it fired; error messages can wrap themselves;
 * the per-thread cache of large blocks reuses a freed block for a request of about its size
 * (zeroed for calloc), never a small one, still obeys the failure hook, and frees at the end.
 */
#include "kvt_test.h"

int main(void)
{
    kvt_alloc_fail_at(3);
    void *a = kvt_malloc(8), *b = kvt_malloc(8), *c = kvt_malloc(8), *d = kvt_malloc(8);
    KVT_EXPECT(a && b && !c && d);
    KVT_EXPECT(kvt_alloc_fail_fired());
    KVT_EXPECT_EQ_U64(kvt_alloc_fail_at(0), 4);
    kvt_free(a);
    kvt_free(b);
    kvt_free(d);
    void *e = kvt_calloc(2, 2);
    KVT_EXPECT(e != NULL);
    KVT_EXPECT(!kvt_alloc_fail_fired());
    kvt_free(e);
    char *s = kvt_strdup("kv");
    KVT_EXPECT(s && !strcmp(s, "kv"));
    kvt_free(s);
    KVT_EXPECT(!strcmp(kvt_status_str(KVT_ERR_CORRUPT), "corrupt input"));
    KVT_EXPECT(kvt_error_set(KVT_ERR_IO, "x %d", 5) == KVT_ERR_IO);
    KVT_EXPECT(!strcmp(kvt_error_msg(), "x 5"));
    /* adding context around the current message, the way callers do */
    kvt_error_set(KVT_ERR_IO, "writing the index of %s: %s", "t.kvt", kvt_error_msg());
    KVT_EXPECT(!strcmp(kvt_error_msg(), "writing the index of t.kvt: x 5"));

#if defined(__GLIBC__)
    const size_t MB = (size_t)1 << 20;
    kvt_alloc_cache_begin();
    unsigned char *big = kvt_malloc(3 * MB);
    KVT_EXPECT(big != NULL);
    memset(big, 0xab, 3 * MB);
    kvt_free(big);
    unsigned char *again = kvt_malloc(3 * MB - 100); /* about the same size: the same block */
    KVT_EXPECT(again == big);
    kvt_free(again);
    unsigned char *z = kvt_calloc(3, MB); /* reused, and zeroed */
    KVT_EXPECT(z == big);
    size_t nz = 0;
    for (size_t i = 0; i < 3 * MB; i++)
        nz += z[i] != 0;
    KVT_EXPECT_EQ_U64(nz, 0);
    kvt_free(z);
    void *twice = kvt_malloc(7 * MB); /* more than 1.5x the cached block: a new one */
    KVT_EXPECT(twice != NULL && twice != (void *)big);
    void *small = kvt_malloc(MB / 2); /* under 1 MiB: never from the cache */
    KVT_EXPECT(small != NULL && small != (void *)big);
    kvt_free(small);
    kvt_alloc_fail_at(1); /* the hook comes first, cached block or not */
    KVT_EXPECT(kvt_malloc(3 * MB) == NULL && kvt_alloc_fail_fired());
    kvt_alloc_fail_at(0);
    kvt_free(twice);
    KVT_EXPECT(kvt_alloc_cache_bytes() >= 10 * MB); /* the 3 and 7 MiB blocks */
    kvt_alloc_cache_trim(); /* both were cached after the last trim (none): kept */
    KVT_EXPECT(kvt_alloc_cache_bytes() >= 10 * MB);
    void *t1 = kvt_malloc(3 * MB);
    KVT_EXPECT(t1 == big);
    KVT_EXPECT(kvt_alloc_cache_bytes() >= 7 * MB && kvt_alloc_cache_bytes() < 10 * MB);
    kvt_alloc_cache_trim(); /* the 7 MiB block went unused since the last trim: freed */
    KVT_EXPECT_EQ_U64(kvt_alloc_cache_bytes(), 0);
    kvt_free(t1);
    KVT_EXPECT(kvt_alloc_cache_bytes() >= 3 * MB);
    kvt_alloc_cache_end(); /* frees what is cached (the valgrind/ASan runs check) */
    KVT_EXPECT_EQ_U64(kvt_alloc_cache_bytes(), 0);
    void *after = kvt_malloc(3 * MB);
    KVT_EXPECT(after != NULL);
    kvt_free(after);
#endif
    return kvt_test_result("test_common_alloc");
}
