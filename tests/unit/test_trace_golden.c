/* test_trace_golden.c - format stability: the writer reproduces the checked-in version-1.1
 * file byte for byte; the version-1.0 file of the same records (written before kind 9 existed)
 * still reads, as 1.0, with the same records; and the checked-in bad files give their
 * documented status codes. Regenerate v1_1_small.kvt (only on a deliberate format change, with a
 * version bump) with KVT_REGEN_GOLDEN=1.
 */
#include "trace_test_util.h"

int main(void)
{
    const char *root = getenv("KVT_SOURCE_ROOT");
    if (!root) {
        printf("SKIP: KVT_SOURCE_ROOT not set\n");
        return 77;
    }
    char golden[1024], tmp[256];
    snprintf(golden, sizeof(golden), "%s/tests/golden/v1_1_small.kvt", root);
    kvt_writer_opts o = {.force = true};
    if (getenv("KVT_REGEN_GOLDEN")) {
        KVT_CHECK(tt_write(golden, &o));
        printf("regenerated %s\n", golden);
    }
    KVT_CHECK(tt_write(kvt_test_tmp(tmp, sizeof(tmp), "golden.kvt"), &o));
    size_t na, nb;
    uint8_t *a = tt_slurp(golden, &na), *b = tt_slurp(tmp, &nb);
    KVT_EXPECT_MSG(a && b && na == nb && memcmp(a, b, na) == 0,
                   "the writer no longer produces tests/golden/v1_1_small.kvt byte for byte: a "
                   "format change needs a version bump and FORMAT.md update");
    /* the 1.0 file: the same bytes but for Version_Minor and the header's crc32 */
    char old[1024];
    snprintf(old, sizeof(old), "%s/tests/golden/v1_small.kvt", root);
    size_t no;
    uint8_t *o10 = tt_slurp(old, &no);
    KVT_EXPECT(o10 && b && no == nb && o10[14] == 0 && b[14] == KVT_FORMAT_MINOR);
    size_t n_diff = 0;
    for (size_t i = 0; o10 && b && no == nb && i < no; i++)
        n_diff += o10[i] != b[i];
    KVT_EXPECT_MSG(n_diff <= 5, "v1_small.kvt and v1_1_small.kvt differ in %zu bytes", n_diff);
    kvt_trace_reader *r10 = NULL, *r11 = NULL;
    KVT_CHECK(kvt_trace_reader_open(old, &r10));
    KVT_CHECK(kvt_trace_reader_open(golden, &r11));
    if (r10 && r11) {
        int ma, mi;
        kvt_trace_reader_version(r10, &ma, &mi);
        KVT_EXPECT(ma == 1 && mi == 0);
        kvt_trace_reader_version(r11, &ma, &mi);
        KVT_EXPECT(ma == KVT_FORMAT_MAJOR && mi == KVT_FORMAT_MINOR);
        KVT_EXPECT_EQ_U64(kvt_trace_reader_n_records(r10), kvt_trace_reader_n_records(r11));
        KVT_EXPECT(!kvt_trace_reader_recovered(r10));
    }
    kvt_trace_reader_close(r10);
    kvt_trace_reader_close(r11);
    free(o10);
    free(a);
    free(b);
    unlink(tmp);

    static const struct {
        const char *file;
        kvt_status want;
    } bad[] = {
        {"bad_magic.kvt", KVT_ERR_CORRUPT},        {"future_version.kvt", KVT_ERR_VERSION},
        {"oversized_length.kvt", KVT_ERR_CORRUPT}, {"bad_header_crc.kvt", KVT_ERR_CHECKSUM},
        {"malformed_json.kvt", KVT_ERR_CORRUPT},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char p[1024];
        snprintf(p, sizeof(p), "%s/tests/golden/%s", root, bad[i].file);
        kvt_trace_reader *r = NULL;
        kvt_status s = kvt_trace_reader_open(p, &r);
        KVT_EXPECT_MSG(s == bad[i].want, "%s: got %s (%s)", bad[i].file, kvt_status_str(s),
                       kvt_error_msg());
        if (s == KVT_OK)
            kvt_trace_reader_close(r);
    }
    /* a truncated record: readable, recovered, the complete records kept */
    char p[1024];
    snprintf(p, sizeof(p), "%s/tests/golden/truncated_record.kvt", root);
    kvt_trace_reader *r;
    KVT_CHECK(kvt_trace_reader_open(p, &r));
    KVT_EXPECT(kvt_trace_reader_recovered(r));
    KVT_EXPECT_EQ_U64(kvt_trace_reader_n_records(r), 4);
    kvt_trace_reader_close(r);
    return kvt_test_result("test_trace_golden");
}
