/* test_common_alloc.c - the allocation failure hook used by fault-injection tests fails
 * exactly the N-th allocation and reports that it fired; error messages can wrap themselves.
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
    return kvt_test_result("test_common_alloc");
}
