/* kvt_test.h - minimal C11 test harness: expectations count failures and report file:line,
 * main() returns kvt_test_result(). Exit 77 means "not run" (ctest SKIP_RETURN_CODE).
 */
#ifndef KVT_TEST_H
#define KVT_TEST_H

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvt_common.h"

static int kvt_test_failures;
static int kvt_test_checks;

#define KVT_EXPECT(cond)                                                                           \
    do {                                                                                           \
        kvt_test_checks++;                                                                         \
        if (!(cond)) {                                                                             \
            kvt_test_failures++;                                                                   \
            fprintf(stderr, "%s:%d: FAILED: %s\n", __FILE__, __LINE__, #cond);                     \
        }                                                                                          \
    } while (0)

#define KVT_EXPECT_MSG(cond, ...)                                                                  \
    do {                                                                                           \
        kvt_test_checks++;                                                                         \
        if (!(cond)) {                                                                             \
            kvt_test_failures++;                                                                   \
            fprintf(stderr, "%s:%d: FAILED: %s: ", __FILE__, __LINE__, #cond);                     \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
        }                                                                                          \
    } while (0)

#define KVT_EXPECT_EQ_U64(a, b)                                                                    \
    do {                                                                                           \
        uint64_t kvt_a_ = (uint64_t)(a), kvt_b_ = (uint64_t)(b);                                   \
        KVT_EXPECT_MSG(kvt_a_ == kvt_b_, "%" PRIu64 " != %" PRIu64, kvt_a_, kvt_b_);               \
    } while (0)

#define KVT_EXPECT_NEAR(a, b, tol)                                                                 \
    do {                                                                                           \
        double kvt_a_ = (double)(a), kvt_b_ = (double)(b);                                         \
        KVT_EXPECT_MSG(fabs(kvt_a_ - kvt_b_) <= (tol), "%.9g vs %.9g (tol %g)", kvt_a_, kvt_b_,    \
                       (double)(tol));                                                             \
    } while (0)

#define KVT_EXPECT_STATUS(expr, want)                                                              \
    do {                                                                                           \
        kvt_status kvt_s_ = (expr);                                                                \
        KVT_EXPECT_MSG(kvt_s_ == (want), "got %s (%d: %s), want %s", kvt_status_str(kvt_s_),       \
                       (int)kvt_s_, kvt_error_msg(), kvt_status_str(want));                        \
    } while (0)

/** Abort the test program on a failed setup step (tests may exit, libraries may not). */
#define KVT_CHECK(expr)                                                                            \
    do {                                                                                           \
        kvt_status kvt_s_ = (expr);                                                                \
        if (kvt_s_ != KVT_OK) {                                                                    \
            fprintf(stderr, "%s:%d: setup failed: %s: %s (%s)\n", __FILE__, __LINE__, #expr,       \
                    kvt_status_str(kvt_s_), kvt_error_msg());                                      \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

static inline int kvt_test_result(const char *name)
{
    if (kvt_test_failures) {
        fprintf(stderr, "%s: %d of %d checks FAILED\n", name, kvt_test_failures, kvt_test_checks);
        return 1;
    }
    printf("%s: all %d checks passed\n", name, kvt_test_checks);
    return 0;
}

/** The whole file at path, NUL-terminated (caller frees); *n gets its size when n is not
 *  NULL. NULL if it cannot be opened. */
static inline unsigned char *kvt_test_slurp(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    long len = fseek(f, 0, SEEK_END) == 0 ? ftell(f) : -1;
    rewind(f);
    unsigned char *b = len >= 0 ? (unsigned char *)malloc((size_t)len + 1) : NULL;
    size_t got = b ? fread(b, 1, (size_t)len, f) : 0;
    fclose(f);
    if (b)
        b[got] = 0;
    if (n)
        *n = got;
    return b;
}

/** A temporary path unique to this test process: caller provides buf. */
static inline const char *kvt_test_tmp(char *buf, size_t cap, const char *name)
{
    const char *dir = getenv("KVT_TEST_TMPDIR");
    snprintf(buf, cap, "%s/kvt_test_%ld_%s", dir ? dir : "/tmp", (long)getpid(), name);
    return buf;
}

#endif /* KVT_TEST_H */
