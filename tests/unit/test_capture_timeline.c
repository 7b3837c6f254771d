/* test_capture_timeline.c - the capture's GPU timeline summary (issue #6, CUPTI part) without a
 * GPU: kernel categories by name, the summary of hand-made activity (sums and the capture's
 * copy/compute overlap, worked by hand), the meta_json "timeline" object a session writes
 * (numbers, an absence reason, the default), and the CUPTI collector failing cleanly with a
 * reason on a machine where it cannot run (or starting and stopping where it can).
 */
#include <cjson/cJSON.h>

#include "kvt_capture.h"
#include "kvt_test.h"

static char path[256];

static void test_category(void)
{
    KVT_EXPECT(kvt_timeline_category("flash_fwd_kernel<Flash_fwd_kernel_traits<128>>") ==
               KVT_TL_ATTENTION);
    KVT_EXPECT(kvt_timeline_category("fmha_cutlassF_bf16_aligned_64x128_rf_sm80") ==
               KVT_TL_ATTENTION); /* attention before GEMM: it also says cutlass */
    KVT_EXPECT(kvt_timeline_category("void (anonymous namespace)::softmax_warp_forward<...>") ==
               KVT_TL_ATTENTION);
    KVT_EXPECT(kvt_timeline_category("ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_tn") ==
               KVT_TL_GEMM);
    KVT_EXPECT(kvt_timeline_category("sm90_xmma_gemm_bf16bf16_bf16f32") == KVT_TL_GEMM);
    KVT_EXPECT(kvt_timeline_category("MatMul_kernel") == KVT_TL_GEMM); /* case-insensitive */
    KVT_EXPECT(kvt_timeline_category("void at::native::vectorized_elementwise_kernel<4>") ==
               KVT_TL_OTHER);
    /* cuBLAS's Hopper/Blackwell GEMMs have neither "gemm" nor "cublas" in their names */
    KVT_EXPECT(kvt_timeline_category("nvjet_hsh_192x192_64x3_2x1_v_bz_coopB_NTN") == KVT_TL_GEMM);
    KVT_EXPECT(kvt_timeline_category("nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_TNT") ==
               KVT_TL_GEMM);
    /* FlashInfer: every name says "flashinfer", so "flash" marks nothing there; its attention
     * kernels (prefill, decode, paged or not, MLA) are attention, demangled or mangled ... */
    KVT_EXPECT(kvt_timeline_category(
                   "void flashinfer::BatchPrefillWithPagedKVCacheKernel<KernelTraits<...>>") ==
               KVT_TL_ATTENTION);
    KVT_EXPECT(kvt_timeline_category("_ZN10flashinfer33BatchDecodeWithPagedKVCacheKernelILj8E") ==
               KVT_TL_ATTENTION);
    KVT_EXPECT(kvt_timeline_category("void flashinfer::SingleDecodeWithKVCacheKernel<...>") ==
               KVT_TL_ATTENTION);
    KVT_EXPECT(kvt_timeline_category("void flashinfer::SinglePrefillWithKVCacheKernel<...>") ==
               KVT_TL_ATTENTION);
    KVT_EXPECT(kvt_timeline_category("void flashinfer::mla::BatchMLAPagedAttentionKernel<...>") ==
               KVT_TL_ATTENTION);
    /* ... its norms, all-reduce and sampling (even the softmax one) are not */
    KVT_EXPECT(
        kvt_timeline_category("_ZN10flashinfer4norm13RMSNormKernelILj8EN3c108BFloat16EEEvPT0_"
                              "S5_S5_jjjf") == KVT_TL_OTHER);
    KVT_EXPECT(kvt_timeline_category("void flashinfer::norm::FusedAddRMSNormKernel<8u, bf16>") ==
               KVT_TL_OTHER);
    KVT_EXPECT(kvt_timeline_category("void flashinfer::trtllm_allreduce_fusion::"
                                     "allreduce_fusion_kernel_oneshot_lamport<...>") ==
               KVT_TL_OTHER);
    KVT_EXPECT(kvt_timeline_category(
                   "void flashinfer::sampling::TopKTopPSamplingFromProbKernel<1024u, ...>") ==
               KVT_TL_OTHER);
    KVT_EXPECT(kvt_timeline_category(
                   "void flashinfer::sampling::OnlineSoftmaxFusedKernel<1024u, 4u, float>") ==
               KVT_TL_OTHER);
    /* outside FlashInfer, "flash" still marks attention (FlashAttention, vLLM's cache writes) */
    KVT_EXPECT(kvt_timeline_category("void vllm::reshape_and_cache_flash_kernel<...>") ==
               KVT_TL_ATTENTION);
    KVT_EXPECT(kvt_timeline_category("") == KVT_TL_OTHER);
    KVT_EXPECT(kvt_timeline_category(NULL) == KVT_TL_OTHER);
}

static void test_summarize(void)
{
    /* kernels: attention [0,100), GEMM [50,150) (merged with it: [0,150)), other [300,400),
     * an empty one at 500. Copies: the capture's [120,320) meets [0,150) for 30 ns and
     * [300,400) for 20; the capture's [400,450) only touches [300,400); an engine copy
     * [0,1000) is not the capture's. Given out of order. */
    const kvt_timeline_event ev[] = {
        {.start_ns = 400, .end_ns = 450, .is_copy = true, .capture = true, .bytes = 10},
        {.start_ns = 300, .end_ns = 400, .name = "elementwise"},
        {.start_ns = 0, .end_ns = 1000, .is_copy = true, .bytes = 5},
        {.start_ns = 50, .end_ns = 150, .name = "cutlass_gemm"},
        {.start_ns = 120, .end_ns = 320, .is_copy = true, .capture = true, .bytes = 1000},
        {.start_ns = 0, .end_ns = 100, .name = "flash_attn"},
        {.start_ns = 500, .end_ns = 500, .name = "empty"},
    };
    kvt_capture_timeline t;
    KVT_CHECK(kvt_timeline_summarize(ev, sizeof(ev) / sizeof(ev[0]), &t));
    KVT_EXPECT_EQ_U64(t.n_kernels, 4);
    KVT_EXPECT_EQ_U64(t.attention_ns, 100);
    KVT_EXPECT_EQ_U64(t.gemm_ns, 100);
    KVT_EXPECT_EQ_U64(t.other_ns, 100);
    KVT_EXPECT_EQ_U64(t.n_memcpy, 3);
    KVT_EXPECT_EQ_U64(t.memcpy_bytes, 1015);
    KVT_EXPECT_EQ_U64(t.memcpy_ns, 1250);
    KVT_EXPECT_EQ_U64(t.capture_copy_bytes, 1010);
    KVT_EXPECT_EQ_U64(t.capture_copy_ns, 250);
    KVT_EXPECT_EQ_U64(t.capture_copy_overlap_ns, 50);
    /* a copy spanning several merged spans, and one entirely inside a kernel */
    const kvt_timeline_event ev2[] = {
        {.start_ns = 10, .end_ns = 20, .name = "a"},
        {.start_ns = 30, .end_ns = 40, .name = "b"},
        {.start_ns = 35, .end_ns = 60, .name = "c"},
        {.start_ns = 0, .end_ns = 100, .is_copy = true, .capture = true},
        {.start_ns = 36, .end_ns = 38, .is_copy = true, .capture = true},
    };
    KVT_CHECK(kvt_timeline_summarize(ev2, 5, &t));
    KVT_EXPECT_EQ_U64(t.capture_copy_ns, 102);
    KVT_EXPECT_EQ_U64(t.capture_copy_overlap_ns, 10 + 30 + 2);
    /* contexts (devices): a copy overlaps only kernels of its own context, and kernels of two
     * contexts are not merged. Context 1: [0,100); context 2: [50,150) and [140,200), merged
     * to [50,200). The capture's copy in context 1 [0,150) meets [0,100) only: 100, not 150;
     * in context 2 [120,260) meets [50,200) for 80; in context 3, which ran no kernel, 0 (not
     * 200). */
    const kvt_timeline_event ev3[] = {
        {.start_ns = 0, .end_ns = 100, .name = "a", .context = 1},
        {.start_ns = 50, .end_ns = 150, .name = "b", .context = 2},
        {.start_ns = 140, .end_ns = 200, .name = "c", .context = 2},
        {.start_ns = 0, .end_ns = 150, .is_copy = true, .capture = true, .context = 1},
        {.start_ns = 120, .end_ns = 260, .is_copy = true, .capture = true, .context = 2},
        {.start_ns = 0, .end_ns = 300, .is_copy = true, .capture = true, .context = 3},
    };
    KVT_CHECK(kvt_timeline_summarize(ev3, 6, &t));
    KVT_EXPECT_EQ_U64(t.n_kernels, 3);
    KVT_EXPECT_EQ_U64(t.capture_copy_ns, 150 + 140 + 300);
    KVT_EXPECT_EQ_U64(t.capture_copy_overlap_ns, 100 + 80 + 0);
    /* a batched copy record (CUPTI's copyCount) counts each copy; 0 counts as 1 */
    const kvt_timeline_event ev4[] = {
        {.start_ns = 0, .end_ns = 10, .is_copy = true, .bytes = 300, .n_copies = 3},
        {.start_ns = 0, .end_ns = 10, .is_copy = true, .bytes = 1},
    };
    KVT_CHECK(kvt_timeline_summarize(ev4, 2, &t));
    KVT_EXPECT_EQ_U64(t.n_memcpy, 4);
    KVT_EXPECT_EQ_U64(t.memcpy_bytes, 301);
    KVT_CHECK(kvt_timeline_summarize(NULL, 0, &t));
    KVT_EXPECT_EQ_U64(t.n_kernels + t.n_memcpy + t.capture_copy_overlap_ns, 0);
    KVT_EXPECT_STATUS(kvt_timeline_summarize(NULL, 3, &t), KVT_ERR_INVALID_ARG);
}

/* A one-layer capture; how = 0: a timeline, 1: an absence reason, 2: neither. Returns the
 * parsed "timeline" object of the trace's meta_json (caller frees the root in *root). */
static const cJSON *capture_and_read(int how, cJSON **root)
{
    struct kvt_capture_model m = {.name = "unit",
                                  .arch = "llama",
                                  .n_layers = 1,
                                  .n_q_heads = 1,
                                  .n_kv_heads = 1,
                                  .head_dim = 4,
                                  .kv_dtype = KVT_DTYPE_F32,
                                  .engine_name = "unit-test",
                                  .engine_version = "1"};
    struct kvt_capture_opts o = {.n_tokens = 4, .window = 2, .writer = {.force = true}};
    kvt_capture_session *s;
    KVT_CHECK(kvt_capture_open(path, &m, &o, &s));
    float buf[16];
    for (int i = 0; i < 16; i++)
        buf[i] = (float)i * 0.25f;
    struct kvt_tensor_view v;
    kvt_tensor_view_hTd(&v, buf, KVT_DTYPE_F32, 1, 4, 4);
    KVT_CHECK(kvt_capture_submit_kv(s, 0, 0, &v, &v));
    KVT_CHECK(kvt_capture_submit_queries(s, 0, 0, &v));
    if (how == 0) {
        kvt_capture_timeline t = {.n_kernels = 7,
                                  .attention_ns = 1000,
                                  .gemm_ns = 2000,
                                  .other_ns = 300,
                                  .n_memcpy = 3,
                                  .memcpy_bytes = 123456789012ull,
                                  .memcpy_ns = 5000,
                                  .capture_copy_bytes = 4096,
                                  .capture_copy_ns = 400,
                                  .capture_copy_overlap_ns = 360};
        KVT_CHECK(kvt_capture_set_timeline_absent(s, "replaced by the timeline below"));
        KVT_CHECK(kvt_capture_set_timeline(s, &t));
    } else if (how == 1) {
        KVT_EXPECT_STATUS(kvt_capture_set_timeline_absent(s, ""), KVT_ERR_INVALID_ARG);
        KVT_EXPECT_STATUS(kvt_capture_set_timeline(s, NULL), KVT_ERR_INVALID_ARG);
        KVT_CHECK(kvt_capture_set_timeline_absent(s, "CUPTI: no NVIDIA driver\nretry"));
    }
    KVT_CHECK(kvt_capture_close(s, NULL));
    kvt_trace_reader *r;
    KVT_CHECK(kvt_trace_reader_open(path, &r));
    char meta[2048] = "";
    for (size_t i = 0; i < kvt_trace_reader_n_records(r); i++) {
        kvt_record_info in;
        KVT_CHECK(kvt_trace_reader_record(r, i, &in));
        if (in.kind == KVT_KIND_META_JSON && in.raw_bytes < sizeof(meta))
            KVT_CHECK(kvt_trace_reader_read_record(r, i, meta, sizeof(meta) - 1));
    }
    kvt_trace_reader_close(r);
    *root = cJSON_Parse(meta);
    KVT_EXPECT_MSG(*root != NULL, "meta_json: %s", meta);
    return cJSON_GetObjectItemCaseSensitive(*root, "timeline");
}

static double num(const cJSON *o, const char *k)
{
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsNumber(x) ? x->valuedouble : -1.0;
}

static void test_session_meta(void)
{
    cJSON *root;
    const cJSON *tl = capture_and_read(0, &root);
    KVT_EXPECT(cJSON_IsObject(tl));
    KVT_EXPECT(!strcmp(cJSON_GetObjectItemCaseSensitive(tl, "source")->valuestring, "cupti"));
    KVT_EXPECT(!cJSON_GetObjectItemCaseSensitive(tl, "absent"));
    KVT_EXPECT(num(tl, "n_kernels") == 7 && num(tl, "attention_ns") == 1000);
    KVT_EXPECT(num(tl, "gemm_ns") == 2000 && num(tl, "other_ns") == 300);
    KVT_EXPECT(num(tl, "n_memcpy") == 3 && num(tl, "memcpy_bytes") == 123456789012.0);
    KVT_EXPECT(num(tl, "memcpy_ns") == 5000 && num(tl, "capture_copy_bytes") == 4096);
    KVT_EXPECT(num(tl, "capture_copy_ns") == 400 && num(tl, "capture_copy_overlap_ns") == 360);
    cJSON_Delete(root);

    tl = capture_and_read(1, &root);
    const cJSON *ab = cJSON_GetObjectItemCaseSensitive(tl, "absent");
    KVT_EXPECT(cJSON_IsString(ab) &&
               !strcmp(ab->valuestring, "CUPTI: no NVIDIA driver retry")); /* one line */
    KVT_EXPECT(!cJSON_GetObjectItemCaseSensitive(tl, "n_kernels"));
    cJSON_Delete(root);

    tl = capture_and_read(2, &root);
    ab = cJSON_GetObjectItemCaseSensitive(tl, "absent");
    KVT_EXPECT(cJSON_IsString(ab) && !strcmp(ab->valuestring, "not collected by this engine"));
    cJSON_Delete(root);
}

/* Where CUPTI cannot run (no driver, no GPU, not built in) start says why; where it can, an
 * idle process has no activity. Either way capture goes on. */
static void test_collector(void)
{
    char why[256] = "unchanged";
    kvt_timeline *tl = kvt_timeline_start(why, sizeof(why));
    if (!tl) {
        KVT_EXPECT_MSG(!strncmp(why, "CUPTI: ", 7) && strlen(why) > 8 && !strchr(why, '\n'),
                       "reason: %s", why);
        printf("test_capture_timeline: no timeline here: %s\n", why);
        kvt_capture_timeline t;
        KVT_EXPECT_STATUS(kvt_timeline_stop(NULL, 0, 0, &t), KVT_ERR_INVALID_ARG);
        return;
    }
    char why2[128] = "";
    KVT_EXPECT(kvt_timeline_start(why2, sizeof(why2)) == NULL); /* one at a time */
    KVT_EXPECT(strstr(why2, "already") != NULL);
    kvt_capture_timeline t;
    KVT_CHECK(kvt_timeline_stop(tl, 0, 0, &t));
    KVT_EXPECT_EQ_U64(t.capture_copy_bytes, 0);
}

int main(void)
{
    kvt_test_tmp(path, sizeof(path), "timeline.kvt");
    test_category();
    test_summarize();
    test_session_meta();
    test_collector();
    unlink(path);
    return kvt_test_result("test_capture_timeline");
}
