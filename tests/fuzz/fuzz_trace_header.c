/* fuzz_trace_header.c - libFuzzer entry point for the JSON header of a trace. The input is the
 * header's JSON text. The entry point wraps it in a valid file header frame (magic, version,
 * length, crc32), so every input gets past the checksum to the JSON parser, and puts the records
 * of a real small trace (KVT_FUZZ_BODY_TRACE, tests/golden/v1_small.kvt) behind it; their index
 * offsets no longer match, so the reader recovers them by scanning. Then it runs everything that
 * reads the header: kvt_read_file_header (traces/trace_format.c), the reader, verify's
 * "promised layers" check, and replay, which takes the model shape, token count and window from
 * the header and cross-checks them with the stored tensors. Runs over the checked-in corpus as
 * the ctest fuzz_trace_header_regression through fuzz_driver.c.
 */
#define _GNU_SOURCE /* memfd_create */
#include <stdlib.h>

#include "fuzz_util.h"
#include "kvt_replay.h"
#include "kvt_trace.h"
#include "trace_internal.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);

static uint8_t *g_body; /* the real trace after its header frame: records, index, trailer */
static size_t g_body_bytes;
static kvt_policy **g_pols;
static size_t g_n_pol;
static kvt_budget *g_budgets;
static size_t g_n_budgets;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    FILE *f = fopen(KVT_FUZZ_BODY_TRACE, "rb");
    uint8_t fh[8];
    if (!f || fread(fh, 1, sizeof(fh), f) != sizeof(fh)) {
        fprintf(stderr, "fuzz_trace_header: cannot read %s\n", KVT_FUZZ_BODY_TRACE);
        abort();
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    long start = 8 + (long)kvt_get_u32(fh + 4);
    g_body_bytes = (size_t)(n - start);
    g_body = malloc(g_body_bytes);
    fseek(f, start, SEEK_SET);
    if (n <= start || !g_body || fread(g_body, 1, g_body_bytes, f) != g_body_bytes)
        abort();
    fclose(f);
    if (kvt_policy_list_parse("snapkv:window=4,knorm,streamingllm", NULL, &g_pols, &g_n_pol) ||
        kvt_budgets_parse("8,50%", &g_budgets, &g_n_budgets))
        abort();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > (1u << 20))
        return 0;
    uint8_t fh[24], crc[4];
    kvt_put_u32(fh, KVT_FRAME_HEADER);
    kvt_put_u32(fh + 4, (uint32_t)(16 + size + 4));
    kvt_put_u32(fh + 8, KVT_FILE_MAGIC);
    kvt_put_u16(fh + 12, KVT_FORMAT_MAJOR);
    kvt_put_u16(fh + 14, KVT_FORMAT_MINOR);
    kvt_put_u32(fh + 16, 0); /* Flags */
    kvt_put_u32(fh + 20, (uint32_t)size);
    kvt_put_u32(crc, kvt_crc32_update(kvt_crc32(fh + 8, 16), data, size));
    const void *parts[] = {fh, data, crc, g_body};
    const size_t n[] = {sizeof(fh), size, sizeof(crc), g_body_bytes};
    char path[64];
    int fd = kvt_fuzz_memfd(parts, n, 4, path, sizeof(path));
    if (fd < 0)
        return 0;

    char *json = NULL;
    uint64_t header_end = 0, bytes_read = 0;
    int major, minor;
    if (kvt_read_file_header(fd, sizeof(fh) + size + sizeof(crc) + g_body_bytes, &json, &header_end,
                             &major, &minor, &bytes_read) == KVT_OK)
        kvt_free(json);
    kvt_trace_reader *r;
    if (kvt_trace_reader_open(path, &r) == KVT_OK) {
        (void)kvt_trace_reader_header_json(r);
        kvt_trace_reader_close(r);
    }
    kvt_verify_report rep;
    if (kvt_trace_verify(path, &rep) == KVT_OK)
        kvt_verify_report_free(&rep);
    int n_layers, n_tokens;
    if (kvt_replay_trace_shape(path, &n_layers, &n_tokens) == KVT_OK) {
        kvt_replay_opts o = {.n_threads = 1, .coverage_probes = 4};
        kvt_trace_result *res;
        if (kvt_replay_trace(path, g_pols, g_n_pol, g_budgets, g_n_budgets, &o, &res) == KVT_OK)
            kvt_trace_result_free(res);
    }
    kvt_error_clear();
    close(fd);
    return 0;
}
