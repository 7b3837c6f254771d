/* test_selection_read.c - the selection export reader (analysis/selection_read.c): a replay with
 * a fixed-set, a per-query-head, a per-step (quest), a merged (lightkv-like) and a decode-time
 * cache (tova:decoding=1,prefill=1) policy is exported through the writer sink in both layouts,
 * read back, and every set is compared with kvt_replay_layer_select's; the binary file (version
 * 3, with delta records against the step and the budget before) cut at every byte and the JSON
 * one at many bytes gives KVT_ERR_CORRUPT (or OK where the cut leaves a complete file); chosen
 * damage to the delta records is named; chosen and random byte flips give an error or a valid
 * file, never a crash. A version-2 export (no per-step policy, one budget) and a version-1 copy
 * of it still read. The writer given the records again in many calls a layer, in another
 * order, writes the same bytes.
 */
#include <pthread.h>

#include "kvt_analysis.h"
#include "replay_test_util.h"

enum { L = 3, T = 48, D = 8, Hq = 4, Hkv = 2, W = 8, G = 3 };

/* The large files (4 TiB and 2 TiB of sets) are read by one thread: under ThreadSanitizer (the
 * run of the "threads" label) they add about a minute and check nothing it can see */
#if defined(__SANITIZE_THREAD__)
#define UNDER_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define UNDER_TSAN 1
#endif
#endif
#ifndef UNDER_TSAN
#define UNDER_TSAN 0
#endif
#define NPOL 5
#define NB   3
static const char *specs[NPOL] = {"snapkv:window=8", "adakv:window=8,heads=query", "quest",
                                  "lightkv-like:window=8", "tova:decoding=1,prefill=1"};

static void spit(const char *path, const unsigned char *b, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(b, 1, n, f) != n) {
        fprintf(stderr, "cannot write %s\n", path);
        exit(1);
    }
    fclose(f);
}

static uint32_t rd32le(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void put32(unsigned char *p, uint32_t x)
{
    p[0] = (unsigned char)x, p[1] = (unsigned char)(x >> 8), p[2] = (unsigned char)(x >> 16);
    p[3] = (unsigned char)(x >> 24);
}

static char last_msg[512]; /* read_bytes' error message */

/* Read b[0..n) from path; walk every record (the fuzz target's walk). */
static kvt_status read_bytes(const char *path, const unsigned char *b, size_t n, size_t *n_rec)
{
    spit(path, b, n);
    kvt_selection *s = NULL;
    kvt_status st = kvt_selection_read(path, &s);
    snprintf(last_msg, sizeof(last_msg), "%s", st ? kvt_error_msg() : "");
    *n_rec = 0;
    if (st == KVT_OK) {
        const kvt_selection_header *h = kvt_selection_get_header(s);
        *n_rec = h->n_records;
        for (size_t i = 0; i < h->n_records; i++) {
            const kvt_selection_record *r = kvt_selection_record_at(s, i);
            const int32_t *idx;
            size_t cnt;
            KVT_EXPECT(kvt_selection_find(s, r->trace, r->policy, r->budget, r->layer, r->head,
                                          r->step, &idx, &cnt) == KVT_OK &&
                       idx == r->idx && cnt == r->n);
        }
    }
    kvt_selection_free(s);
    kvt_error_clear();
    return st;
}

/* Every (layer, policy, budget, head, step) of the replay is in the export with the same set,
 * and the export has nothing else. */
static void compare(const kvt_selection *s, kvt_layer_selection *sel[L][NPOL], const char *what)
{
    const kvt_selection_header *h = kvt_selection_get_header(s);
    KVT_EXPECT(h->selection_version == KVT_SELECTION_VERSION && h->generator);
    KVT_EXPECT(h->n_policies == NPOL && h->n_budgets == NB && h->n_traces == 1);
    for (int p = 0; p < NPOL && h->n_policies == NPOL; p++)
        KVT_EXPECT(!strcmp(h->policies[p].label, specs[p]));
    KVT_EXPECT(h->n_budgets == NB && !strcmp(h->budgets[1], "25%"));
    KVT_EXPECT(h->policies[1].query_heads && !h->policies[0].query_heads);
    KVT_EXPECT(h->policies[2].per_step && !h->policies[2].merged && h->policies[3].merged);
    KVT_EXPECT(h->policies[4].per_step && !h->policies[0].per_step);
    size_t matched = 0;
    int bad = 0;
    for (int l = 0; l < L; l++)
        for (int p = 0; p < NPOL; p++) {
            const kvt_layer_selection *ls = sel[l][p];
            int nh = kvt_layer_selection_n_heads(ls), ns = kvt_layer_selection_n_steps(ls);
            int el, eh, es;
            KVT_EXPECT(kvt_selection_shape(s, 0, p, &el, &eh, &es) == KVT_OK && el == L &&
                       eh == nh && es == ns);
            for (int b = 0; b < NB; b++)
                for (int head = 0; head < nh; head++)
                    for (int step = -1; step < ns; step++) {
                        bool exists = step < 0 ? kvt_layer_selection_has_fixed(ls)
                                               : kvt_layer_selection_head_per_step(ls, head);
                        const int32_t *got;
                        size_t n_got;
                        kvt_status st = kvt_selection_find(s, 0, p, b, l, head, step, &got, &n_got);
                        if (!exists) {
                            bad += st != KVT_ERR_NOT_FOUND;
                            continue;
                        }
                        int32_t want[T + G]; /* a decode-time cache holds decode tokens */
                        size_t nw = 0;
                        KVT_CHECK(
                            kvt_layer_selection_kept(ls, (size_t)b, head, step, want, T + G, &nw));
                        if (st != KVT_OK || n_got != nw || memcmp(got, want, nw * sizeof(*want))) {
                            if (bad++ < 5)
                                fprintf(stderr, "%s: l%d p%d b%d h%d s%d: %s, %zu vs %zu\n", what,
                                        l, p, b, head, step, kvt_status_str(st), n_got, nw);
                            continue;
                        }
                        matched++;
                    }
        }
    KVT_EXPECT_MSG(bad == 0, "%s: %d sets differ", what, bad);
    KVT_EXPECT_MSG(matched == h->n_records, "%s: %zu sets matched, %zu records", what, matched,
                   h->n_records);
    /* per layer: snapkv 3x2, adakv 3x4, quest 3x2x3 steps, lightkv 3x2, tova 3x2x(1 + 3) */
    KVT_EXPECT_EQ_U64(h->n_records, L * (6 + 12 + 18 + 6 + 24));
    const int32_t *idx;
    size_t n;
    KVT_EXPECT_STATUS(kvt_selection_find(s, 0, 0, 0, L, 0, -1, &idx, &n), KVT_ERR_NOT_FOUND);
    KVT_EXPECT(idx == NULL && n == 0);
    KVT_EXPECT(kvt_selection_record_at(s, h->n_records) == NULL);
    const kvt_selection_record *r0 = kvt_selection_record_at(s, 0);
    KVT_EXPECT(r0 && r0->layer == 0 && r0->policy == 0 && r0->step == -1 && r0->n == 12 &&
               r0->budget_tokens == 12);
}

/* ---- delta chains held lazily: a hand-built file of tova (policy 4, per-step) records ---- */

enum { LZ_N0 = 100, LZ_STEPS = 100, LZ_RECS = 2 * (LZ_STEPS + 1) };

typedef struct lz_rec {
    int budget, step, n;
    int32_t set[LZ_N0];
    bool held; /* the reader holds it whole: a whole record, every 32nd changing link of a
                  chain, or no change from a held set */
    int same;  /* the record whose set it is (no change), or -1 */
} lz_rec;

/* A tova record at q: cnt indices pay (NULL: 0 .. cnt - 1), n_rm of them removed; the byte
 * after it */
static unsigned char *lz_put(unsigned char *q, int budget, unsigned flags, int step, size_t cnt,
                             size_t n_rm, const int32_t *pay)
{
    put32(q, 0x4C45534Bu);
    q[6] = 4; /* tova */
    q[8] = (unsigned char)budget;
    q[10] = (unsigned char)flags;
    put32(q + 20, (uint32_t)step);
    put32(q + 24, 12);
    put32(q + 28, (uint32_t)cnt);
    put32(q + 32, (uint32_t)n_rm);
    q += 36;
    for (size_t k = 0; k < cnt; k++, q += 4)
        put32(q, pay ? (uint32_t)pay[k] : (uint32_t)k);
    return q;
}

typedef struct lz_job {
    const kvt_selection *s;
    const lz_rec *want;
    uint64_t seed;
    int bad;
} lz_job;

static void *lz_thread(void *arg)
{
    lz_job *j = arg;
    kvt_rng rng;
    kvt_rng_seed(&rng, j->seed);
    int32_t buf[LZ_N0];
    for (int it = 0; it < 2000; it++) {
        size_t i = (size_t)(kvt_rng_u64(&rng) % LZ_RECS);
        if (kvt_selection_copy_set(j->s, i, buf, LZ_N0) != KVT_OK ||
            memcmp(buf, j->want[i].set, (size_t)j->want[i].n * 4))
            j->bad++;
    }
    return NULL;
}

/* Budget 0: a whole prompt set {200..299}, then 100 steps, step s removing the set's (7s mod
 * 100)-th token and adding 199 - s (first in the set: a merge in place would overwrite what
 * it still reads), but steps 35 and 9, 19, ... 99 unchanged. Budget 1: its prompt set the
 * budget before's less token 200, and 100 unchanged steps. Checks which sets are held, that every
 * way of reaching a set gives it (copy in file, reverse and random order, record_at, find, four
 * threads at once), and the argument errors. */
static void lazy_checks(const unsigned char *raw, const char *xpath)
{
    static lz_rec want[LZ_RECS];
    size_t hl = rd32le(raw + 12), cap = 16 + hl + LZ_RECS * 36 + 2 * LZ_N0 * 4 + 16 + 4096;
    unsigned char *b = calloc(cap, 1), *q = b + 16 + hl;
    KVT_CHECK(b ? KVT_OK : KVT_ERR_NOMEM);
    memcpy(b, raw, 16 + hl);
    int r = 0, depth = 0;
    lz_rec *w = &want[r];
    *w = (lz_rec){0, -1, LZ_N0, {0}, true, -1};
    for (int k = 0; k < LZ_N0; k++)
        w->set[k] = 200 + k;
    q = lz_put(q, 0, 0, -1, LZ_N0, 0, w->set);
    for (int st = 0; st < LZ_STEPS; st++) {
        const lz_rec *pv = &want[r];
        w = &want[++r];
        *w = *pv;
        w->step = st;
        if (st % 10 == 9 || st == 35) { /* unchanged */
            w->same = pv->same >= 0 ? pv->same : r - 1;
            q = lz_put(q, 0, 9, st, 0, 0, NULL);
            continue;
        }
        const int x = st * 7 % LZ_N0; /* the set's x-th token leaves; 199 - st comes first */
        int32_t pay[2] = {pv->set[x], 199 - st};
        memmove(w->set + 1, w->set, (size_t)x * 4);
        w->set[0] = 199 - st;
        w->same = -1;
        w->held = ++depth % 32 == 0;
        q = lz_put(q, 0, 9, st, 2, 1, pay);
    }
    w = &want[++r]; /* budget 1, the prompt set: a budget delta */
    *w = want[0];
    w->budget = 1;
    w->held = false;
    w->n = LZ_N0 - 1;
    memmove(w->set, w->set + 1, (LZ_N0 - 1) * 4);
    const int32_t first = 200;
    q = lz_put(q, 1, 0x10, -1, 1, 1, &first);
    const int b1 = r;
    for (int st = 0; st < LZ_STEPS; st++) {
        w = &want[++r];
        *w = want[b1];
        w->step = st;
        w->same = b1;
        q = lz_put(q, 1, 9, st, 0, 0, NULL);
    }
    put32(q, 0x444E454Bu);
    put32(q + 8, LZ_RECS);
    q += 16;
    spit(xpath, b, (size_t)(q - b));
    free(b);
    kvt_selection *s = NULL;
    KVT_EXPECT_STATUS(kvt_selection_read(xpath, &s), KVT_OK);
    if (!s)
        return;
    KVT_EXPECT(kvt_selection_get_header(s)->n_records == LZ_RECS);
    int n_held = 0;
    for (size_t i = 0; i < LZ_RECS; i++) { /* held exactly where the rule says */
        kvt_selection_record info;
        KVT_EXPECT_STATUS(kvt_selection_record_info(s, i, &info), KVT_OK);
        const lz_rec *e = &want[i];
        KVT_EXPECT_MSG(info.budget == e->budget && info.step == e->step && info.n == (size_t)e->n &&
                           (info.idx != NULL) == e->held && info.flags == (e->step >= 0 ? 1u : 0u),
                       "record %zu: budget %d step %d n %zu held %d, want %d %d %d %d", i,
                       info.budget, info.step, info.n, info.idx != NULL, e->budget, e->step, e->n,
                       e->held);
        n_held += info.idx != NULL;
        if (info.idx && e->same >= 0) { /* an unchanged held set is its base's, not a copy */
            kvt_selection_record bi;
            kvt_selection_record_info(s, (size_t)e->same, &bi);
            KVT_EXPECT(bi.idx == info.idx);
        }
    }
    /* budget 0's prompt set, steps 34 and 71 (its 32nd and 64th change) and step 35 (no
       change from 34) */
    KVT_EXPECT_MSG(n_held == 4, "%d sets held", n_held);
    int32_t buf[LZ_N0 + 1];
    for (int pass = 0; pass < 4; pass++) { /* file, reverse, random order, then by step */
        kvt_rng rng;
        kvt_rng_seed(&rng, 77);
        int bad = 0;
        for (size_t k = 0; k < LZ_RECS; k++) {
            size_t i = pass == 0   ? k
                       : pass == 1 ? LZ_RECS - 1 - k
                       : pass == 2 ? (size_t)(kvt_rng_u64(&rng) % LZ_RECS)
                                   : (k % 2) * (size_t)(b1 + 1) + k / 2 + (k % 2 == 0);
            if (i >= LZ_RECS)
                continue;
            buf[want[i].n] = -7; /* guard */
            if (kvt_selection_copy_set(s, i, buf, (size_t)want[i].n) != KVT_OK ||
                memcmp(buf, want[i].set, (size_t)want[i].n * 4) || buf[want[i].n] != -7)
                bad++;
        }
        KVT_EXPECT_MSG(bad == 0, "copy pass %d: %d sets differ", pass, bad);
    }
    pthread_t th[4];
    lz_job jobs[4];
    for (int t = 0; t < 4; t++) {
        jobs[t] = (lz_job){s, want, 100 + (uint64_t)t, 0};
        KVT_EXPECT(pthread_create(&th[t], NULL, lz_thread, &jobs[t]) == 0);
    }
    for (int t = 0; t < 4; t++) {
        pthread_join(th[t], NULL);
        KVT_EXPECT_MSG(jobs[t].bad == 0, "thread %d: %d sets differ", t, jobs[t].bad);
    }
    KVT_EXPECT_STATUS(kvt_selection_copy_set(s, 5, buf, (size_t)want[5].n - 1),
                      KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_selection_copy_set(s, LZ_RECS, buf, LZ_N0), KVT_ERR_INVALID_ARG);
    kvt_selection_record info;
    KVT_EXPECT_STATUS(kvt_selection_record_info(s, LZ_RECS, &info), KVT_ERR_INVALID_ARG);
    /* record_at and find expand and hold: the same pointer after */
    const kvt_selection_record *ra = kvt_selection_record_at(s, 57);
    KVT_EXPECT(ra && ra->idx && ra->n == (size_t)want[57].n &&
               !memcmp(ra->idx, want[57].set, (size_t)want[57].n * 4));
    kvt_selection_record_info(s, 57, &info);
    KVT_EXPECT(ra && info.idx == ra->idx);
    const int32_t *fi = NULL;
    size_t fn = 0, fr = 0;
    KVT_EXPECT_STATUS(kvt_selection_find(s, 0, 4, 1, 0, 0, 40, &fi, &fn), KVT_OK);
    KVT_EXPECT(fi && fn == (size_t)want[b1].n && !memcmp(fi, want[b1].set, fn * 4));
    KVT_EXPECT_STATUS(kvt_selection_find_record(s, 0, 4, 1, 0, 0, 40, &fr), KVT_OK);
    KVT_EXPECT(fr == (size_t)b1 + 41);
    KVT_EXPECT_STATUS(kvt_selection_find_record(s, 0, 4, 2, 0, 0, 40, &fr), KVT_ERR_NOT_FOUND);
    KVT_EXPECT(fr == SIZE_MAX);
    kvt_selection_free(s);
}

/* One layer's records of s (whole sets) handed to w in calls as kvt_selection_sink allows:
 * per_step 0 = the layer in one call, else each (policy, head)'s steps one a call (the prompt
 * set with step 0), every budget of a step in its call; each call's records reversed */
static kvt_status feed_layer(kvt_selection_writer *w, const kvt_selection *s, int layer,
                             bool per_step)
{
    const size_t nr = kvt_selection_get_header(s)->n_records;
    kvt_selection_rec *call = calloc(nr + 1, sizeof(*call));
    uint8_t *sent = calloc(nr + 1, 1);
    kvt_status st = call && sent ? KVT_OK : KVT_ERR_NOMEM;
    for (size_t i = 0; !st && i < nr; i++) { /* i: the first record of a call not sent */
        const kvt_selection_record *a = kvt_selection_record_at(s, i);
        if (a->layer != layer || sent[i])
            continue;
        const int step = a->step < 0 ? 0 : a->step;
        size_t n = 0;
        for (size_t j = i; j < nr; j++) {
            const kvt_selection_record *r = kvt_selection_record_at(s, j);
            if (r->layer != layer || sent[j] ||
                (per_step && (r->policy != a->policy || r->head != a->head ||
                              (r->step < 0 ? 0 : r->step) != step)))
                continue;
            sent[j] = 1;
            call[n++] = (kvt_selection_rec){.policy = r->policy,
                                            .budget = r->budget,
                                            .layer = r->layer,
                                            .head = r->head,
                                            .step = r->step,
                                            .idx = r->idx,
                                            .n = r->n};
        }
        for (size_t k = 0; k < n / 2; k++) {
            kvt_selection_rec t = call[k];
            call[k] = call[n - 1 - k];
            call[n - 1 - k] = t;
        }
        st = kvt_selection_writer_sink(w, layer, call, n, false);
    }
    if (!st)
        st = kvt_selection_writer_sink(w, layer, NULL, 0, true);
    free(call);
    free(sent);
    return st;
}

/* The export written again from its records, in many calls a layer (kvt_selection_sink's
 * contract; records in another order within a call, layers last to first): the same bytes in
 * both layouts, so a step's delta record finds its base in an earlier call */
static void writer_calls(const kvt_selection *sb, const unsigned char *raw, size_t n,
                         const unsigned char *rawj, size_t nj, kvt_policy **pols,
                         const kvt_budget *bud, size_t nb, const char *const *tp, const int *btok)
{
    char path[256];
    for (int k = 0; k < 4; k++) {
        const bool json = k & 1, per_step = k >= 2;
        kvt_test_tmp(path, sizeof(path), json ? "sel_calls.json" : "sel_calls.bin");
        kvt_selection_writer *w;
        KVT_CHECK(kvt_selection_writer_open(path, true, pols, NPOL, bud, nb, tp, 1, &w));
        KVT_CHECK(kvt_selection_writer_begin_trace(w, 0, L, btok));
        for (int l = L - 1; l >= 0; l--)
            KVT_EXPECT_STATUS(feed_layer(w, sb, l, per_step), KVT_OK);
        KVT_CHECK(kvt_selection_writer_end_trace(w));
        KVT_CHECK(kvt_selection_writer_close(w));
        size_t got_n = 0;
        unsigned char *got = kvt_test_slurp(path, &got_n);
        const unsigned char *want = json ? rawj : raw;
        const size_t want_n = json ? nj : n;
        KVT_EXPECT_MSG(got && got_n == want_n && !memcmp(got, want, want_n),
                       "%s written %s: %zu bytes, %s the replay's %zu", json ? "JSON" : "binary",
                       per_step ? "a step a call" : "a layer a call", got_n,
                       got && got_n == want_n ? "differing from" : "against", want_n);
        free(got);
        remove(path);
    }
}

int main(void)
{
    test_layer layers[L];
    for (int l = 0; l < L; l++) {
        tl_random(&layers[l], 900 + (uint64_t)l, T, D, Hq, Hkv, W, G, true);
        layers[l].in.layer = l;
        layers[l].in.n_layers = L;
    }
    char tpath[256], bpath[256], jpath[256], xpath[256], v2path[256];
    kvt_test_tmp(tpath, sizeof(tpath), "a.kvt");
    kvt_test_tmp(bpath, sizeof(bpath), "sel.bin");
    kvt_test_tmp(jpath, sizeof(jpath), "sel.json");
    kvt_test_tmp(xpath, sizeof(xpath), "sel_cut.bin");
    kvt_test_tmp(v2path, sizeof(v2path), "sel_v2.bin");
    tl_write_trace(tpath, L, T, D, Hq, Hkv, W, G, layers);

    kvt_policy *pols[NPOL];
    for (int i = 0; i < NPOL; i++)
        KVT_CHECK(kvt_policy_create(specs[i], NULL, &pols[i]));
    kvt_budget *bud;
    size_t nb;
    KVT_CHECK(kvt_budgets_parse("12,25%,100", &bud, &nb));
    const char *tp[1] = {tpath};
    int btok[NB] = {12, 12, 100};
    const char *paths[3] = {bpath, jpath, v2path};
    /* no per-step policy and one budget: no record has a base, version 2 */
    kvt_policy *fixed[3] = {pols[0], pols[1], pols[3]};
    for (int k = 0; k < 3; k++) { /* binary with 3 threads (out-of-order layers), then JSON */
        kvt_policy **pp = k == 2 ? fixed : pols;
        size_t np = k == 2 ? 3 : NPOL;
        kvt_selection_writer *w;
        const size_t nbk = k == 2 ? 1 : nb;
        KVT_CHECK(kvt_selection_writer_open(paths[k], true, pp, np, bud, nbk, tp, 1, &w));
        KVT_CHECK(kvt_selection_writer_begin_trace(w, 0, L, btok));
        kvt_replay_opts o = {.n_threads = k ? 1 : 3,
                             .coverage_probes = -1,
                             .sink = kvt_selection_writer_sink,
                             .sink_user = w};
        kvt_trace_result *tr = NULL;
        KVT_CHECK(kvt_replay_trace(tpath, pp, np, bud, nbk, &o, &tr));
        kvt_trace_result_free(tr);
        KVT_CHECK(kvt_selection_writer_end_trace(w));
        KVT_CHECK(kvt_selection_writer_close(w));
    }
    kvt_layer_selection *sel[L][NPOL];
    for (int l = 0; l < L; l++)
        for (int p = 0; p < NPOL; p++)
            KVT_CHECK(kvt_replay_layer_select(&layers[l].in, pols[p], btok, NB, &sel[l][p]));

    /* round trip, both layouts; they hold the same records in the same order */
    kvt_selection *sb = NULL, *sj = NULL;
    KVT_EXPECT_STATUS(kvt_selection_read(bpath, &sb), KVT_OK);
    KVT_EXPECT_STATUS(kvt_selection_read(jpath, &sj), KVT_OK);
    if (sb && sj) {
        compare(sb, sel, "binary");
        compare(sj, sel, "json");
        KVT_EXPECT(!kvt_selection_get_header(sb)->json && kvt_selection_get_header(sj)->json);
        size_t nr = kvt_selection_get_header(sb)->n_records, diff = 0;
        for (size_t i = 0; i < nr; i++) {
            const kvt_selection_record *a = kvt_selection_record_at(sb, i);
            const kvt_selection_record *b = kvt_selection_record_at(sj, i);
            diff += !b || a->trace != b->trace || a->policy != b->policy ||
                    a->budget != b->budget || a->layer != b->layer || a->head != b->head ||
                    a->step != b->step || a->flags != b->flags ||
                    a->budget_tokens != b->budget_tokens || a->n != b->n ||
                    memcmp(a->idx, b->idx, a->n * sizeof(int32_t));
        }
        KVT_EXPECT_MSG(diff == 0, "%zu records differ between binary and JSON", diff);
    }
    /* record boundaries of the binary file, then its end record */
    size_t n = 0, nj = 0;
    unsigned char *raw = kvt_test_slurp(bpath, &n), *rawj = kvt_test_slurp(jpath, &nj);
    KVT_CHECK(raw && rawj ? KVT_OK : KVT_ERR_IO);
    size_t n_rec_all = sb ? kvt_selection_get_header(sb)->n_records : 0;
    size_t *bound = calloc(n_rec_all + 1, sizeof(size_t));
    size_t off = 16 + (raw[12] | (size_t)raw[13] << 8), n_bound = 0, full_bytes = off + 16;
    size_t n_delta = 0, d1 = 0, d1_rec = 0;  /* a delta of one removed and one added token */
    size_t n_bdelta = 0, bd = 0, bd_rec = 0; /* a budget delta adding tokens, none removed */
    bound[n_bound++] = off;
    for (size_t i = 0; sb && i < n_rec_all; i++) {
        const kvt_selection_record *r = kvt_selection_record_at(sb, i);
        unsigned flags = raw[off + 10];
        KVT_EXPECT(r->flags == (flags & 7u)); /* the reader gives the set whole, unflagged */
        if (flags & 8u) {
            n_delta++;
            if (!d1 && rd32le(raw + off + 28) == 2 && rd32le(raw + off + 32) == 1)
                d1 = off, d1_rec = i;
        }
        if (flags & 16u) {
            n_bdelta++;
            if (!bd && rd32le(raw + off + 28) >= 2 && rd32le(raw + off + 32) == 0)
                bd = off, bd_rec = i;
        }
        full_bytes += 36 + 4 * r->n;
        off += 36 + 4 * (size_t)rd32le(raw + off + 28);
        bound[n_bound++] = off;
    }
    KVT_EXPECT(off + 16 == n && rd32le(raw + off) == 0x444E454Bu &&
               rd32le(raw + off + 8) == n_rec_all && rd32le(raw + off + 12) == 0);
    KVT_EXPECT(rd32le(raw + 8) == 3 && d1 > 0); /* tova's steps: one in, one out */
    KVT_EXPECT(bd > 0); /* a larger budget's set: the smaller one's and more */
    printf("binary export: %zu bytes, %zu with every set whole; of %zu records, %zu step deltas "
           "and %zu budget deltas\n",
           n, full_bytes, n_rec_all, n_delta, n_bdelta);
    KVT_EXPECT(n < full_bytes);

    /* truncation at every byte (binary): only the whole file reads, even a cut exactly at a
     * record boundary is caught (no end record) */
    int bad_cut = 0;
    for (size_t len = 0; len <= n; len++) {
        size_t nr;
        kvt_status st = read_bytes(xpath, raw, len, &nr);
        kvt_status want = len == n ? KVT_OK : KVT_ERR_CORRUPT;
        if ((st != want || (len == n && nr != n_rec_all)) && bad_cut++ < 5)
            fprintf(stderr, "binary cut at %zu: %s (%zu records), want %s\n", len,
                    kvt_status_str(st), nr, kvt_status_str(want));
    }
    KVT_EXPECT_MSG(bad_cut == 0, "%d binary cuts read wrong", bad_cut);
    /* an export without a per-step policy is version 2 (older readers read it); a version-1
     * copy of it (no end record) still reads, with version 1's limit: a cut at a record
     * boundary reads as a shorter export */
    {
        size_t n2 = 0;
        unsigned char *v2 = kvt_test_slurp(v2path, &n2);
        KVT_CHECK(v2 && n2 > 32 ? KVT_OK : KVT_ERR_IO);
        KVT_EXPECT(rd32le(v2 + 8) == 2);
        size_t n1 = n2 - 16;
        unsigned char *v1 = malloc(n1);
        memcpy(v1, v2, n1);
        put32(v1 + 8, 1);
        size_t *bound2 = calloc(n_rec_all + 1, sizeof(size_t)), n_bound2 = 0; /* its records' */
        for (size_t o = 16 + rd32le(v2 + 12); o <= n1 && n_bound2 <= n_rec_all; n_bound2++) {
            bound2[n_bound2] = o;
            o += o + 36 <= n1 ? 36 + 4 * (size_t)rd32le(v2 + o + 28) : n1;
        }
        KVT_EXPECT(n_bound2 == L * (2 + 4 + 2) + 1);
        free(v2);
        const char *key = "\"selection_version\":2";
        size_t at = 0;
        for (size_t i = 16; !at && i + 21 <= bound2[0]; i++)
            if (!memcmp(v1 + i, key, 21))
                at = i + 20;
        KVT_EXPECT(at > 0);
        if (at)
            v1[at] = '1';
        size_t b_i = 0;
        bad_cut = 0;
        for (size_t len = 0; len <= n1; len++) {
            size_t nr;
            kvt_status st = read_bytes(xpath, v1, len, &nr);
            while (b_i < n_bound2 && bound2[b_i] < len)
                b_i++;
            bool complete = b_i < n_bound2 && bound2[b_i] == len;
            kvt_status want = complete ? KVT_OK : KVT_ERR_CORRUPT;
            if ((st != want || (complete && nr != b_i)) && bad_cut++ < 5)
                fprintf(stderr, "v1 cut at %zu: %s (%zu records), want %s\n", len,
                        kvt_status_str(st), nr, kvt_status_str(want));
        }
        KVT_EXPECT_MSG(bad_cut == 0, "%d version-1 cuts read wrong", bad_cut);
        free(v1);
        free(bound2);
    }
    /* truncation of the JSON layout: every 7th byte and the last 64 */
    bad_cut = 0;
    for (size_t len = 0; len < nj; len += (len + 64 < nj ? 7 : 1)) {
        size_t nr;
        kvt_status st = read_bytes(xpath, rawj, len, &nr);
        bool complete = len + 1 >= nj; /* only the final newline may go */
        kvt_status want = complete ? KVT_OK : KVT_ERR_CORRUPT;
        if (st != want && bad_cut++ < 5)
            fprintf(stderr, "json cut at %zu of %zu: %s\n", len, nj, kvt_status_str(st));
    }
    KVT_EXPECT_MSG(bad_cut == 0, "%d JSON cuts read wrong", bad_cut);

    /* chosen damage to the binary file */
    unsigned char *m = malloc(n + 64);
    size_t r0 = bound[0]; /* first record */
    size_t nr;
    struct {
        size_t at;
        uint32_t val;
        int bytes;
        kvt_status want;
    } cases[] = {
        {0, 'X', 1, KVT_ERR_CORRUPT},                /* magic */
        {7, 2, 1, KVT_ERR_VERSION},                  /* another major layout */
        {8, 4, 4, KVT_ERR_VERSION},                  /* newer version */
        {8, 1, 4, KVT_ERR_CORRUPT},                  /* version 1 file, header says 3 */
        {8, 2, 4, KVT_ERR_CORRUPT},                  /* version 2 file, header says 3 */
        {n - 8, 7, 4, KVT_ERR_CORRUPT},              /* end record miscounts */
        {n - 16, 0x444E454Cu, 4, KVT_ERR_CORRUPT},   /* end record magic */
        {8, 0, 4, KVT_ERR_CORRUPT},                  /* version 0 */
        {12, 0xFFFFFFF0u, 4, KVT_ERR_CORRUPT},       /* header_len past the end */
        {12, 3, 4, KVT_ERR_CORRUPT},                 /* header cut short: bad JSON */
        {r0, 0x4C45534Cu, 4, KVT_ERR_CORRUPT},       /* record magic */
        {r0 + 4, 1, 2, KVT_ERR_CORRUPT},             /* trace index */
        {r0 + 6, NPOL, 2, KVT_ERR_CORRUPT},          /* policy index */
        {r0 + 8, NB, 2, KVT_ERR_CORRUPT},            /* budget index */
        {r0 + 10, 1, 2, KVT_ERR_CORRUPT},            /* step flag on the prompt set */
        {r0 + 12, 0x80000000u, 4, KVT_ERR_CORRUPT},  /* layer above 2^31-1 */
        {r0 + 20, (uint32_t)-2, 4, KVT_ERR_CORRUPT}, /* step -2 */
        {r0 + 20, 0, 4, KVT_ERR_CORRUPT},            /* decode step of snapkv */
        {r0 + 24, 0, 4, KVT_ERR_CORRUPT},            /* budget_tokens 0 */
        {r0 + 28, 0x40000000u, 4, KVT_ERR_CORRUPT},  /* n past the end */
        {r0 + 28, 13, 4, KVT_ERR_CORRUPT},           /* n one too many: framing breaks */
        {r0 + 36 + 4, 0, 4, KVT_ERR_CORRUPT},        /* indices not ascending */
        {r0 + 36, 0x80000000u, 4, KVT_ERR_CORRUPT},  /* index above 2^31-1 */
        {bound[1] + 16, 0, 4, KVT_ERR_CORRUPT},      /* record 1 (head 1) becomes head 0 */
    };
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        memcpy(m, raw, n);
        if (cases[c].bytes == 1)
            m[cases[c].at] = (unsigned char)cases[c].val;
        else if (cases[c].bytes == 2)
            m[cases[c].at] = (unsigned char)cases[c].val,
            m[cases[c].at + 1] = (unsigned char)(cases[c].val >> 8);
        else
            put32(m + cases[c].at, cases[c].val);
        kvt_status st = read_bytes(xpath, m, n, &nr);
        KVT_EXPECT_MSG(st == cases[c].want, "case %zu (byte %zu): got %s (%s)", c, cases[c].at,
                       kvt_status_str(st), kvt_error_msg());
    }
    /* damage to a delta record (tova at 12 tokens: one removed, one added): each named */
    const kvt_selection_record *dp = sb && d1_rec ? kvt_selection_record_at(sb, d1_rec - 1) : NULL;
    uint32_t removed = rd32le(raw + d1 + 36), held = 0;
    for (size_t i = 0; dp && i < dp->n && held == removed; i++)
        held = (uint32_t)dp->idx[i];
    KVT_EXPECT(dp && held != removed);
    /* the budget delta's base (the budget before): a token it holds */
    const kvt_selection_record *bdr = sb && bd ? kvt_selection_record_at(sb, bd_rec) : NULL;
    const int32_t *bidx = NULL;
    size_t bn = 0;
    KVT_EXPECT(bdr &&
               kvt_selection_find(sb, 0, bdr->policy, bdr->budget - 1, bdr->layer, bdr->head,
                                  bdr->step, &bidx, &bn) == KVT_OK &&
               bn > 0);
    /* the base's last token, held, to stand last in the added list (above the one before) */
    const uint32_t bcnt = bd ? rd32le(raw + bd + 28) : 0, bflags = bd ? rd32le(raw + bd + 10) : 0;
    const uint32_t bheld = bn ? (uint32_t)bidx[bn - 1] : 0;
    KVT_EXPECT(bd && bcnt >= 2 && bheld > rd32le(raw + bd + 36 + 4 * (bcnt - 2)));
    struct {
        size_t at;
        uint32_t val;
        const char *msg;
    } dcases[] = {
        {bd + 36 + 4 * (bcnt - 1), bheld, "which budget"}, /* adds a token held */
        {bd + 10, (bflags & 0xffffu) | 8u, "flags 0x1"},   /* both delta flags */
        {bd + 32, bcnt + 1, "a delta record removing"},    /* removes more than held */
        {bd + 8, (bflags << 16) | 0u, "flags 0x1"},        /* budget 0: no budget before it */
        {d1 + 32, 3, "a delta record removing 3 of its 2 indices"},
        {d1 + 36, 0x7FFFFFFFu, "which step"}, /* removes a token not held */
        {d1 + 40, held, "which step"},        /* adds a token held */
        {d1 + 20, rd32le(raw + d1 + 20) + 1, "a delta record of step"},  /* not after its step */
        {d1 + 16, rd32le(raw + d1 + 16) ^ 1u, "a delta record of step"}, /* another head's */
        {d1 + 36, 0x80000000u, "removed index 0 is above 2^31-1"},
        {bound[1] + 10, 8, "flags 0x8"},  /* a delta flag on a prompt-time set */
        {r0 + 10, 8, "record 0 at byte"}, /* the first record a delta */
    };
    for (size_t c = 0; c < sizeof(dcases) / sizeof(dcases[0]); c++) {
        memcpy(m, raw, n);
        put32(m + dcases[c].at, dcases[c].val);
        if (dcases[c].at == bound[1] + 10 || dcases[c].at == r0 + 10 || dcases[c].at == bd + 10)
            m[dcases[c].at + 2] = raw[dcases[c].at + 2],
                             m[dcases[c].at + 3] = raw[dcases[c].at + 3];
        kvt_status st = read_bytes(xpath, m, n, &nr);
        KVT_EXPECT_MSG(st == KVT_ERR_CORRUPT && strstr(last_msg, dcases[c].msg),
                       "delta case %zu (byte %zu): got %s (%s)", c, dcases[c].at,
                       kvt_status_str(st), last_msg);
    }
    {
        size_t n2 = 0; /* a delta flag in a version-2 file */
        unsigned char *v2 = kvt_test_slurp(v2path, &n2);
        size_t o1 =
            v2 ? 16 + rd32le(v2 + 12) + 36 + 4 * (size_t)rd32le(v2 + 16 + rd32le(v2 + 12) + 28) : 0;
        KVT_EXPECT(v2 && o1 + 36 < n2);
        if (v2 && o1 + 36 < n2) {
            v2[o1 + 10] |= 8;
            kvt_status st = read_bytes(xpath, v2, n2, &nr);
            KVT_EXPECT_MSG(st == KVT_ERR_CORRUPT && strstr(last_msg, "flags 0x8"),
                           "delta flag in version 2: %s (%s)", kvt_status_str(st), last_msg);
        }
        free(v2);
    }
    memcpy(m, raw, n); /* bytes after the end record */
    memset(m + n, 0, 5);
    KVT_EXPECT_STATUS(read_bytes(xpath, m, n + 5, &nr), KVT_ERR_CORRUPT);
    KVT_EXPECT_STATUS(read_bytes(xpath, m, 0, &nr), KVT_ERR_CORRUPT);
    kvt_selection *none = NULL;
    unlink(xpath);
    KVT_EXPECT_STATUS(kvt_selection_read(xpath, &none), KVT_ERR_IO);
    KVT_EXPECT(none == NULL);

    /* random flips (1-4 bytes): an error or a valid file, never a crash */
    kvt_rng rng;
    kvt_rng_seed(&rng, 12345);
    int outcomes[3] = {0, 0, 0};
    for (int it = 0; it < 3000; it++) {
        memcpy(m, raw, n);
        int k = 1 + (int)(kvt_rng_u64(&rng) % 4);
        for (int j = 0; j < k; j++)
            m[kvt_rng_u64(&rng) % n] ^= (unsigned char)(1u << (kvt_rng_u64(&rng) % 8));
        kvt_status st = read_bytes(xpath, m, n, &nr);
        KVT_EXPECT_MSG(st == KVT_OK || st == KVT_ERR_CORRUPT || st == KVT_ERR_VERSION,
                       "flip %d: %s", it, kvt_status_str(st));
        outcomes[st == KVT_OK ? 0 : st == KVT_ERR_CORRUPT ? 1 : 2]++;
    }
    printf("random flips: %d ok, %d corrupt, %d version\n", outcomes[0], outcomes[1], outcomes[2]);
    KVT_EXPECT(outcomes[1] > 0);

    free(m);

    /* delta records that would expand to 4 TiB: one set of 2^20 tokens, then 2^20 steps that
     * keep it (36 bytes each). Unchanged sets are the same set, held once: the file reads,
     * and the last step's set is the first's memory */
    if (UNDER_TSAN)
        printf("large files: not read under ThreadSanitizer\n");
    if (!UNDER_TSAN) {
        size_t hl = rd32le(raw + 12), nset = (size_t)1 << 20, nsteps = (size_t)1 << 20;
        size_t nbomb = 16 + hl + 36 + 4 * nset + 36 * nsteps + 16;
        unsigned char *bomb = calloc(nbomb, 1), *q = bomb + 16 + hl;
        KVT_CHECK(bomb ? KVT_OK : KVT_ERR_NOMEM);
        memcpy(bomb, raw, 16 + hl);
        for (size_t st = 0; st <= nsteps; st++) /* step -1 whole, then steps 0.. as deltas */
            q = lz_put(q, 0, st ? 9 : 0, (int)st - 1, st ? 0 : nset, 0, NULL);
        put32(q, 0x444E454Bu);
        put32(q + 8, (uint32_t)(nsteps + 1));
        spit(xpath, bomb, nbomb);
        kvt_selection *sm = NULL;
        KVT_EXPECT_STATUS(kvt_selection_read(xpath, &sm), KVT_OK);
        const int32_t *idx = NULL, *idx0 = NULL;
        size_t cnt = 0, cnt0 = 0;
        KVT_EXPECT(sm &&
                   kvt_selection_find(sm, 0, 4, 0, 0, 0, (int)nsteps - 1, &idx, &cnt) == KVT_OK &&
                   kvt_selection_find(sm, 0, 4, 0, 0, 0, -1, &idx0, &cnt0) == KVT_OK &&
                   cnt == nset && idx == idx0 && idx[0] == 0 && idx[nset - 1] == (int32_t)nset - 1);
        kvt_selection_free(sm);
        free(bomb);
    }
    /* 2 TiB held: one set of 2^24 tokens, then 2^20 steps that each change one token (44
     * bytes each, 108 MiB in all): one set in every 32 steps is held whole, 2^15 sets of 64
     * MiB. Refused before anything is allocated for the sets */
    if (!UNDER_TSAN) {
        size_t hl = rd32le(raw + 12), nset = (size_t)1 << 24, nsteps = (size_t)1 << 20;
        size_t nbomb = 16 + hl + 36 + 4 * nset + 44 * nsteps + 16;
        unsigned char *bomb = calloc(nbomb, 1), *q = bomb + 16 + hl;
        KVT_CHECK(bomb ? KVT_OK : KVT_ERR_NOMEM);
        memcpy(bomb, raw, 16 + hl);
        for (size_t st = 0; st <= nsteps; st++) { /* step s removes token s, adds 2^24 + s */
            const int32_t pay[2] = {(int32_t)st - 1, (int32_t)(nset + st) - 1};
            q = st ? lz_put(q, 0, 9, (int)st - 1, 2, 1, pay) : lz_put(q, 0, 0, -1, nset, 0, NULL);
        }
        put32(q, 0x444E454Bu);
        put32(q + 8, (uint32_t)(nsteps + 1));
        kvt_status st = read_bytes(xpath, bomb, nbomb, &nr);
        KVT_EXPECT_MSG(st == KVT_ERR_NOMEM && strstr(last_msg, "more than this machine's memory"),
                       "2 TiB of held sets: %s (%s)", kvt_status_str(st), last_msg);
        /* the same with 64 steps reads: steps 31 and 63 (the 32nd and 64th change) held */
        size_t nsmall = 16 + hl + 36 + 4 * nset + 44 * 64;
        memcpy(bomb + nsmall, q, 16);
        put32(bomb + nsmall + 8, 65);
        kvt_selection *sm = NULL;
        spit(xpath, bomb, nsmall + 16);
        KVT_EXPECT_STATUS(kvt_selection_read(xpath, &sm), KVT_OK);
        const int32_t *idx = NULL;
        size_t cnt = 0;
        KVT_EXPECT(sm && kvt_selection_find(sm, 0, 4, 0, 0, 0, 63, &idx, &cnt) == KVT_OK &&
                   cnt == nset && idx[0] == 64 && idx[nset - 1] == (int32_t)(nset + 63));
        kvt_selection_record info;
        KVT_EXPECT(sm && kvt_selection_record_info(sm, 32, &info) == KVT_OK && info.idx &&
                   info.idx[0] == 32 && kvt_selection_record_info(sm, 31, &info) == KVT_OK &&
                   !info.idx);
        kvt_selection_free(sm);
        free(bomb);
    }
    if (sb)
        writer_calls(sb, raw, n, rawj, nj, pols, bud, nb, tp, btok);
    lazy_checks(raw, xpath);
    free(bound);
    free(raw);
    free(rawj);
    kvt_selection_free(sb);
    kvt_selection_free(sj);
    kvt_selection_free(NULL);

    /* the header of a part of replay --shard: "shard" read back; a bad one refused */
    static const char *shard_hdr[] = {"{\"index\":1,\"count\":2}",   "{\"index\":2,\"count\":2}",
                                      "{\"index\":-1,\"count\":2}",  "{\"index\":0,\"count\":0}",
                                      "{\"index\":0.5,\"count\":2}", "7"};
    for (int c = 0; c < 6; c++) {
        char js[512];
        int len = snprintf(js, sizeof(js),
                           "{\"selection_version\":2,\"generator\":\"t\",\"policies\":[],"
                           "\"budgets\":[],\"traces\":[],\"shard\":%s,\"records\":[]}",
                           shard_hdr[c]);
        kvt_selection *ps = NULL;
        spit(xpath, (const unsigned char *)js, (size_t)len);
        kvt_status st = kvt_selection_read(xpath, &ps);
        KVT_EXPECT_MSG(st == (c == 0 ? KVT_OK : KVT_ERR_CORRUPT), "shard %s: %s", shard_hdr[c],
                       kvt_status_str(st));
        if (ps) {
            const kvt_selection_header *ph = kvt_selection_get_header(ps);
            KVT_EXPECT(ph->shard_index == 1 && ph->shard_count == 2);
        }
        kvt_selection_free(ps);
    }
    for (int l = 0; l < L; l++)
        for (int p = 0; p < NPOL; p++)
            kvt_layer_selection_free(sel[l][p]);
    for (int i = 0; i < NPOL; i++)
        kvt_policy_free(pols[i]);
    kvt_free(bud);
    for (int l = 0; l < L; l++)
        tl_free(&layers[l]);
    unlink(tpath);
    unlink(bpath);
    unlink(jpath);
    unlink(xpath);
    return kvt_test_result("test_selection_read");
}
