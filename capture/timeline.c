/* timeline.c - the GPU timeline summary of a capture (issue #6): kernel categories by name,
 * sums of kernel and copy time, and how much of the capture's own copying overlapped compute
 * (merged kernel intervals of its context against each capture copy). Pure C; the CUPTI collector
 * that produces the events is cupti_timeline.c.
 */
#include <ctype.h>
#include <stdlib.h>
#include <string.h>

#include "kvt_capture.h"

static bool has_ci(const char *s, const char *sub)
{
    size_t n = strlen(sub);
    for (; *s; s++) {
        size_t i = 0;
        while (i < n && s[i] && tolower((unsigned char)s[i]) == sub[i])
            i++;
        if (i == n)
            return true;
    }
    return false;
}

static bool has_any(const char *name, const char *const *subs, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (has_ci(name, subs[i]))
            return true;
    return false;
}

#define N_OF(a) (sizeof(a) / sizeof((a)[0]))

int kvt_timeline_category(const char *name)
{
    static const char *const attn[] = {"attn", "attention", "flash", "fmha",
                                       "sdpa", "softmax",   "paged"};
    /* Every FlashInfer kernel says "flashinfer" (so "flash"), and its sampling kernels say
     * "softmax": in its names only these mark attention (BatchPrefillWithPagedKVCache,
     * SingleDecodeWithKVCache, BatchMLAPagedAttention...), not RMSNorm, allreduce, sampling */
    static const char *const attn_flashinfer[] = {"attn",    "attention", "fmha",  "paged",
                                                  "kvcache", "prefill",   "decode"};
    /* nvjet: cuBLAS's Hopper and Blackwell GEMMs (nvjet_hsh_192x192_64x3_2x1_v_bz_coopB_NTN) */
    static const char *const gemm[] = {"gemm",   "gemv",   "cutlass", "xmma",
                                       "cublas", "matmul", "nvjet"};
    if (!name)
        return KVT_TL_OTHER;
    if (has_ci(name, "flashinfer") ? has_any(name, attn_flashinfer, N_OF(attn_flashinfer))
                                   : has_any(name, attn, N_OF(attn)))
        return KVT_TL_ATTENTION;
    if (has_any(name, gemm, N_OF(gemm)))
        return KVT_TL_GEMM;
    return KVT_TL_OTHER;
}

typedef struct span {
    uint64_t a, b;
    uint32_t ctx;
} span;

/* by context, then by start */
static int cmp_span(const void *x, const void *y)
{
    const span *p = x, *q = y;
    if (p->ctx != q->ctx)
        return (p->ctx > q->ctx) - (p->ctx < q->ctx);
    return (p->a > q->a) - (p->a < q->a);
}

kvt_status kvt_timeline_summarize(const kvt_timeline_event *ev, size_t n, kvt_capture_timeline *t)
{
    memset(t, 0, sizeof(*t));
    KVT_RETURN_IF(n && !ev, KVT_ERR_INVALID_ARG, "timeline: no events");
    size_t nk = 0;
    for (size_t i = 0; i < n; i++)
        nk += !ev[i].is_copy;
    span *k = kvt_malloc((nk + 1) * sizeof(*k));
    KVT_RETURN_IF(!k, KVT_ERR_NOMEM, "timeline: out of memory");
    nk = 0;
    for (size_t i = 0; i < n; i++) {
        const kvt_timeline_event *e = &ev[i];
        uint64_t d = e->end_ns > e->start_ns ? e->end_ns - e->start_ns : 0;
        if (e->is_copy) {
            t->n_memcpy += e->n_copies ? e->n_copies : 1;
            t->memcpy_bytes += e->bytes;
            t->memcpy_ns += d;
            if (e->capture) {
                t->capture_copy_bytes += e->bytes;
                t->capture_copy_ns += d;
            }
            continue;
        }
        t->n_kernels++;
        int c = kvt_timeline_category(e->name);
        *(c == KVT_TL_ATTENTION ? &t->attention_ns
          : c == KVT_TL_GEMM    ? &t->gemm_ns
                                : &t->other_ns) += d;
        if (d)
            k[nk++] = (span){e->start_ns, e->end_ns, e->context};
    }
    /* kernel intervals merged, per context, into disjoint spans sorted by (context, start):
     * within a context the ends are sorted too */
    qsort(k, nk, sizeof(*k), cmp_span);
    size_t m = 0;
    for (size_t i = 0; i < nk; i++) {
        if (m && k[i].ctx == k[m - 1].ctx && k[i].a <= k[m - 1].b) {
            if (k[i].b > k[m - 1].b)
                k[m - 1].b = k[i].b;
        } else
            k[m++] = k[i];
    }
    for (size_t i = 0; i < n; i++) {
        const kvt_timeline_event *e = &ev[i];
        if (!e->is_copy || !e->capture || e->end_ns <= e->start_ns)
            continue;
        /* the copy's context's first span that ends after the copy starts, then every span of
         * that context it meets: (context, end) increases along k */
        size_t lo = 0, hi = m;
        while (lo < hi) {
            size_t mid = (lo + hi) / 2;
            if (k[mid].ctx < e->context || (k[mid].ctx == e->context && k[mid].b <= e->start_ns))
                lo = mid + 1;
            else
                hi = mid;
        }
        for (size_t j = lo; j < m && k[j].ctx == e->context && k[j].a < e->end_ns; j++) {
            uint64_t a = k[j].a > e->start_ns ? k[j].a : e->start_ns;
            uint64_t b = k[j].b < e->end_ns ? k[j].b : e->end_ns;
            if (b > a)
                t->capture_copy_overlap_ns += b - a;
        }
    }
    kvt_free(k);
    return KVT_OK;
}
