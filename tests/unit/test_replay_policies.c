/* test_replay_policies.c - hand-worked tiny layers with the exact kept indices of every
 * policy: window protection and ties (lower index first), pooling, GQA groups (mean over the
 * group vs per query head), short prompts, B < W, PyramidKV's schedule, AdaKV's allocation
 * (3a/3b, normalize, ties) and its sums, SparseMM's static caps, MixKV cross-checks
 * (r = 1 is KeyDiff, r = 0 with flat value norms is SnapKV), MixKV on SparseMM (a composite
 * worked by hand; SparseMM's counts, mixkv-snapkv's ranking), ChunkKV's whole chunks, Quest
 * pages, oracle, merging, qfilter's calibration and its eigenvector solver, cur's blocks.
 * Keys are 1-D (D = 1, scale 1) where possible so the logits are the key values.
 */
#include "replay_test_util.h"
#include "replay_internal.h" /* kvt_pyramid_layer_budget, kvt_adakv_alloc */

static kvt_policy *mk(const char *spec)
{
    kvt_policy *p = NULL;
    KVT_CHECK(kvt_policy_create(spec, NULL, &p));
    return p;
}

/* D=1 layer: Hq query heads over Hkv KV heads, keys k[T], window queries q[Hq*W] */
static kvt_layer_input layer1d(int T, int W, int Hq, int Hkv, const float *k, const float *v,
                               const float *q)
{
    return tl_layer(T, 1, Hq, Hkv, W, k, v, q);
}

static void test_snapkv(void)
{
    const float k[8] = {0, 3, 1, 3, 2, 0.5f, 0, 0}, v[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    const float q[2] = {1, 1};
    kvt_layer_input in = layer1d(8, 2, 1, 1, k, v, q);
    const int B[] = {4, 5, 3, 1, 10, 8};
    kvt_layer_selection *s = tl_select(&in, "snapkv:window=2,kernel=1", B, 6);
    EXPECT_KEPT(s, 0, 0, -1, "1,3,6,7"); /* 1 and 3 tie: lower index first */
    EXPECT_KEPT(s, 1, 0, -1, "1,3,4,6,7");
    EXPECT_KEPT(s, 2, 0, -1, "1,6,7");
    EXPECT_KEPT(s, 3, 0, -1, "7");               /* B < W: the most recent B tokens */
    EXPECT_KEPT(s, 4, 0, -1, "0,1,2,3,4,5,6,7"); /* short prompt: everything */
    EXPECT_KEPT(s, 5, 0, -1, "0,1,2,3,4,5,6,7"); /* B == T */
    kvt_layer_selection_free(s);
    /* avgpool k=3 with zero padding: scores ~ [7.03, 7.94, 14.3, 10.07, 9.71, 3.01] */
    s = tl_select(&in, "snapkv:window=2,kernel=3,pool=avg", B, 2);
    EXPECT_KEPT(s, 0, 0, -1, "2,3,6,7");
    EXPECT_KEPT(s, 1, 0, -1, "2,3,4,6,7");
    kvt_layer_selection_free(s);
    /* maxpool k=3: positions 0..4 all see a key of value 3 (exact ties), 5 does not */
    s = tl_select(&in, "snapkv:window=2,kernel=3,pool=max", B, 2);
    EXPECT_KEPT(s, 0, 0, -1, "0,1,6,7");
    kvt_layer_selection_free(s);
    /* errors: a window larger than the stored one, a bad option, an unknown policy */
    kvt_policy *p = mk("snapkv:window=4");
    kvt_layer_selection *bad = NULL;
    KVT_EXPECT_STATUS(kvt_replay_layer_select(&in, p, B, 1, &bad), KVT_ERR_INVALID_ARG);
    kvt_policy_free(p);
    /* ... unless every budget is above the prompt (the short-prompt rule): kept whole by every
       window policy, which reads none of its window */
    const char *wide[] = {"snapkv:window=4",
                          "pyramidkv:window=4",
                          "adakv:window=4",
                          "mixkv-snapkv:window=4",
                          "chunkkv:window=4",
                          "cam:window=4",
                          "snapkv:window=4,merge=pivot",
                          "h2o:window=4"};
    const int Bover[] = {9, 64};
    for (size_t i = 0; i < sizeof(wide) / sizeof(wide[0]); i++) {
        s = tl_select(&in, wide[i], Bover, 2);
        for (int b = 0; b < 2; b++) {
            const char *got = tl_kept_str(s, (size_t)b, 0, -1);
            KVT_EXPECT_MSG(!strcmp(got, "0,1,2,3,4,5,6,7"), "%s at B=%d: kept {%s}", wide[i],
                           Bover[b], got);
        }
        kvt_layer_selection_free(s);
    }
    KVT_EXPECT_STATUS(kvt_policy_create("snapkv:kernel=4", NULL, &p), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_policy_create("snapkv:alpha=0.1", NULL, &p), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_policy_create("nosuch", NULL, &p), KVT_ERR_INVALID_ARG);
}

static void test_gqa(void)
{
    /* two query heads on one KV head: head 0 (q=+1) likes token 0, head 1 (q=-1) token 1 */
    const float k[6] = {3, -2, 0, 0, 0, 0}, v[6] = {1, 1, 1, 1, 1, 1};
    const float q[4] = {1, 1, -1, -1};
    kvt_layer_input in = layer1d(6, 2, 2, 1, k, v, q);
    const int B[] = {4, 3};
    kvt_layer_selection *s = tl_select(&in, "snapkv:window=2,kernel=1", B, 2);
    KVT_EXPECT(kvt_layer_selection_n_heads(s) == 1);
    EXPECT_KEPT(s, 0, 0, -1, "0,1,4,5"); /* group mean: 0 (.42) > 1 (.33) > 2 = 3 (.06) */
    EXPECT_KEPT(s, 1, 0, -1, "0,4,5");
    kvt_layer_selection_free(s);
    s = tl_select(&in, "snapkv:window=2,kernel=1,heads=query", B, 1);
    KVT_EXPECT(kvt_layer_selection_n_heads(s) == 2);
    EXPECT_KEPT(s, 0, 0, -1, "0,2,4,5"); /* head 0: 0, then 2 and 3 tie (lower first) */
    EXPECT_KEPT(s, 0, 1, -1, "1,2,4,5");
    kvt_layer_selection_free(s);
    s = tl_select(&in, "snapkv:window=2,kernel=1,reduce=max", B, 1);
    EXPECT_KEPT(s, 0, 0, -1, "0,1,4,5");
    kvt_layer_selection_free(s);
    /* the global per-query-head default */
    kvt_policy_globals g = {.per_query_head = true};
    kvt_policy *p = NULL;
    KVT_CHECK(kvt_policy_create("snapkv:window=2,kernel=1", &g, &p));
    KVT_CHECK(kvt_replay_layer_select(&in, p, B, 1, &s));
    KVT_EXPECT(kvt_layer_selection_n_heads(s) == 2);
    kvt_layer_selection_free(s);
    kvt_policy_free(p);
}

static void test_pyramid(void)
{
    /* the schedule by hand (POLICIES §2) */
    /* T=200, W=8, B=40, L=4: base 32, min 1, max 63, steps 20 */
    KVT_EXPECT(kvt_pyramid_layer_budget(40, 8, 200, 4, 0, 20, false) == 63);
    KVT_EXPECT(kvt_pyramid_layer_budget(40, 8, 200, 4, 1, 20, false) == 43);
    KVT_EXPECT(kvt_pyramid_layer_budget(40, 8, 200, 4, 3, 20, false) == 3);
    /* T=20, W=4, B=14, L=3: max 20 >= 16 -> max 16, min 4, steps 6 */
    KVT_EXPECT(kvt_pyramid_layer_budget(14, 4, 20, 3, 0, 20, false) == 16);
    KVT_EXPECT(kvt_pyramid_layer_budget(14, 4, 20, 3, 2, 20, false) == 4);
    /* T=18 < 2*base: KVCache-Factory falls back to uniform, MixKV does not */
    KVT_EXPECT(kvt_pyramid_layer_budget(14, 4, 18, 3, 0, 20, true) == 10);
    KVT_EXPECT(kvt_pyramid_layer_budget(14, 4, 18, 3, 0, 20, false) == 14);
    KVT_EXPECT(kvt_pyramid_layer_budget(14, 4, 18, 3, 2, 20, false) == 6);
    KVT_EXPECT(kvt_pyramid_layer_budget(14, 4, 10, 3, 0, 20, false) == -1);  /* short */
    KVT_EXPECT(kvt_pyramid_layer_budget(14, 4, 100, 1, 0, 20, false) == 10); /* L = 1 */
    /* kvpress's PyramidKVPress (align=kvpress), window inside. T=4096, ratio 0.5, W=64, L=32:
       x 2048, min 102.4, max 3993.6, steps 125.52: layers 0/15/31 keep 3994/2111/102 */
    KVT_EXPECT(kvt_pyramid_kvpress_count(0.5, 64, 4096, 32, 0, 20) == 3994);
    KVT_EXPECT(kvt_pyramid_kvpress_count(0.5, 64, 4096, 32, 15, 20) == 2111);
    KVT_EXPECT(kvt_pyramid_kvpress_count(0.5, 64, 4096, 32, 31, 20) == 102);
    /* ratio 0.2: max 6389.76 clamped to T-W = 4032, min 2521.6 */
    KVT_EXPECT(kvt_pyramid_kvpress_count(0.2, 64, 4096, 32, 0, 20) == 4032);
    KVT_EXPECT(kvt_pyramid_kvpress_count(0.2, 64, 4096, 32, 31, 20) == 2522);
    /* T=1002, ratio 0.75: x 250.5, min 12.525 < W: SnapKV's round(x) = 250 (half to even) */
    KVT_EXPECT(kvt_pyramid_kvpress_count(0.75, 64, 1002, 32, 0, 20) == 250);
    KVT_EXPECT(kvt_pyramid_kvpress_count(0.75, 64, 1010, 32, 5, 20) == 252); /* 252.5 */
    /* T=1001, ratio 0.5: max clamped to T-W = 937 makes min 64 = W: no fallback */
    KVT_EXPECT(kvt_pyramid_kvpress_count(0.5, 64, 1001, 32, 0, 20) == 937);
    KVT_EXPECT(kvt_pyramid_kvpress_count(0.5, 64, 1001, 32, 31, 20) == 64);
    /* one layer (kvpress divides by zero): the plain budget, not the pyramid's top */
    KVT_EXPECT(kvt_pyramid_kvpress_count(0.5, 64, 4096, 1, 0, 20) == 2048);
    /* through the policy: T=200, W=4, B=100 (ratio 0.5), L=3: min 5, max 195, steps 95 */
    for (int l = 0; l < 3; l++) {
        test_layer t;
        tl_random(&t, 5, 200, 4, 2, 1, 4, 0, false);
        t.in.layer = l;
        t.in.n_layers = 3;
        const int B[] = {100};
        kvt_layer_selection *s = tl_select(&t.in, "pyramidkv:window=4,align=kvpress", B, 1);
        KVT_EXPECT_MSG(tl_count(s, 0, 0) == 195 - 95 * l, "align=kvpress layer %d keeps %d", l,
                       tl_count(s, 0, 0));
        kvt_layer_selection_free(s);
        tl_free(&t);
    }

    /* through the policy: per-layer counts, the same ranking as snapkv */
    const int want[3][3] = {{24, 14, 4}, {20, 14, 8}, {18, 14, 10}};
    const int Ts[3] = {40, 20, 18};
    for (int c = 0; c < 3; c++)
        for (int l = 0; l < 3; l++) {
            test_layer t;
            tl_random(&t, 11 + (uint64_t)c, Ts[c], 4, 2, 1, 4, 0, false);
            t.in.layer = l;
            t.in.n_layers = 3;
            const int B[] = {14, 100};
            kvt_layer_selection *s = tl_select(&t.in, "pyramidkv:window=4", B, 2);
            KVT_EXPECT_MSG(tl_count(s, 0, 0) == want[c][l], "T=%d layer %d: %d, want %d", Ts[c], l,
                           tl_count(s, 0, 0), want[c][l]);
            KVT_EXPECT(tl_count(s, 1, 0) == Ts[c]);
            kvt_layer_selection *sn = tl_select(&t.in, "snapkv:window=4", B, 1);
            /* pyramid's kept set is a prefix of the same ranking as snapkv's */
            int32_t a[64], b2[64];
            size_t na, nb2;
            kvt_layer_selection_kept(s, 0, 0, -1, a, 64, &na);
            kvt_layer_selection_kept(sn, 0, 0, -1, b2, 64, &nb2);
            if (na == nb2)
                KVT_EXPECT(memcmp(a, b2, na * sizeof(int32_t)) == 0);
            kvt_layer_selection_free(sn);
            kvt_layer_selection_free(s);
            tl_free(&t);
        }
}

static void test_adakv(void)
{
    /* kvt_adakv_alloc by hand: H=2, P=4, b=2 */
    const double p[8] = {0.4, 0.3, 0.2, 0.1, /* head 1 */ 0.2, 0.19, 0.01, 0.0};
    int caps[2];
    /* unnormalised global top-4: .4 .3 then .2 (head 0) and .2 (head 1) tie -> head 0 */
    KVT_CHECK(kvt_adakv_alloc(p, 2, 4, 2, 1, 0.0, false, 'a', caps));
    KVT_EXPECT(caps[0] == 3 && caps[1] == 1);
    /* normalised: head 0 x .7 -> .28 .21 .14; head 1 x .975 -> .195 .185 -> 2 and 2 */
    KVT_CHECK(kvt_adakv_alloc(p, 2, 4, 2, 1, 0.0, true, 'a', caps));
    KVT_EXPECT(caps[0] == 2 && caps[1] == 2);
    /* alpha 0.5: cap = round(n*.5 + floor(.5*2)) = round(2.5)=2 (ties to even), round(1.5)=2 */
    KVT_CHECK(kvt_adakv_alloc(p, 2, 4, 2, 1, 0.5, false, 'a', caps));
    KVT_EXPECT(caps[0] == 2 && caps[1] == 2);
    /* 3b: n_safe = floor(alpha*B) with B = b + W = 3; alpha=1 forces b each */
    KVT_CHECK(kvt_adakv_alloc(p, 2, 4, 2, 1, 1.0, false, 'b', caps));
    KVT_EXPECT(caps[0] == 2 && caps[1] == 2);
    KVT_CHECK(kvt_adakv_alloc(p, 2, 4, 2, 1, 0.5, false, 'b', caps)); /* n_safe 1 <= W */
    KVT_EXPECT(caps[0] == 3 && caps[1] == 1);

    /* through the policy: with alpha = 0 the layer total is exactly H*B; with 0.2 within H/2 */
    test_layer t;
    tl_random(&t, 5, 64, 8, 8, 4, 8, 0, false);
    const int B[] = {12, 20, 40, 100};
    const char *specs[] = {"adakv:window=8,alpha=0", "adakv:window=8,alpha=0,normalize=0",
                           "adakv:window=8,alpha=0,alloc=b", "adakv:window=8",
                           "mixkv-adakv:window=8,alpha=0"};
    for (int sp = 0; sp < 5; sp++) {
        kvt_layer_selection *s = tl_select(&t.in, specs[sp], B, 4);
        for (int b = 0; b < 3; b++) {
            int sum = 0, mn = 1 << 30, mx = 0;
            for (int h = 0; h < 4; h++) {
                int c = tl_count(s, (size_t)b, h);
                sum += c;
                mn = c < mn ? c : mn;
                mx = c > mx ? c : mx;
            }
            /* alpha 0.2: round() drifts by up to H/2 and floor(alpha*b) loses up to H */
            if (sp == 3)
                KVT_EXPECT_MSG(abs(sum - 4 * B[b]) <= 4, "%s B=%d sum %d", specs[sp], B[b], sum);
            else
                KVT_EXPECT_MSG(sum == 4 * B[b], "%s B=%d sum %d", specs[sp], B[b], sum);
            KVT_EXPECT(mn >= 8 && mx <= 64);
        }
        for (int h = 0; h < 4; h++)
            KVT_EXPECT(tl_count(s, 3, h) == 64); /* B > T: short prompt */
        kvt_layer_selection_free(s);
    }
    /* skip=1: layer 0 keeps the uniform B per head, layer 1 allocates as without skip (and
     * unevenly, or this checks nothing) */
    t.in.n_layers = 2;
    for (int l = 0; l < 2; l++) {
        t.in.layer = l;
        kvt_layer_selection *sk = tl_select(&t.in, "adakv:window=8,alpha=0,skip=1", B, 3);
        kvt_layer_selection *no = tl_select(&t.in, "adakv:window=8,alpha=0", B, 3);
        bool uneven = false;
        for (int b = 0; b < 3; b++)
            for (int h = 0; h < 4; h++) {
                uneven |= tl_count(no, (size_t)b, h) != B[b];
                KVT_EXPECT(tl_count(sk, (size_t)b, h) ==
                           (l == 0 ? B[b] : tl_count(no, (size_t)b, h)));
            }
        KVT_EXPECT(uneven);
        kvt_layer_selection_free(sk);
        kvt_layer_selection_free(no);
    }
    tl_free(&t);
}

static void test_positions_and_norms(void)
{
    /* streamingllm: sinks + most recent */
    test_layer t;
    tl_random(&t, 3, 10, 2, 1, 1, 2, 0, false);
    const int B[] = {6, 3, 2};
    kvt_layer_selection *s = tl_select(&t.in, "streamingllm", B, 2);
    EXPECT_KEPT(s, 0, 0, -1, "0,1,2,3,8,9");
    EXPECT_KEPT(s, 1, 0, -1, "0,1,2");
    kvt_layer_selection_free(s);
    s = tl_select(&t.in, "full", B, 1);
    EXPECT_KEPT(s, 0, 0, -1, "0,1,2,3,4,5,6,7,8,9");
    kvt_layer_selection_free(s);
    tl_free(&t);

    /* knorm / vnorm / keydiff on 2-D keys */
    const float k[10] = {3, 0, 1, 0, 0, 2, 0.5f, 0, 0, 4}; /* norms 3 1 2 .5 4 */
    const float v[10] = {1, 0, 5, 0, 2, 0, 0, 4, 3, 0};    /* norms 1 5 2 4 3 */
    const float q[2] = {1, 1};
    kvt_layer_input in = {.layer = 0,
                          .n_layers = 1,
                          .T = 5,
                          .D = 2,
                          .Hq = 1,
                          .Hkv = 1,
                          .W = 1,
                          .k = k,
                          .v = v,
                          .q_window = q};
    s = tl_select(&in, "knorm", B + 2, 1);
    EXPECT_KEPT(s, 0, 0, -1, "1,3");
    kvt_layer_selection_free(s);
    s = tl_select(&in, "knorm:window=1", B + 2, 1);
    EXPECT_KEPT(s, 0, 0, -1, "3,4");
    kvt_layer_selection_free(s);
    s = tl_select(&in, "vnorm", B + 2, 1);
    EXPECT_KEPT(s, 0, 0, -1, "1,3");
    kvt_layer_selection_free(s);
    /* token 3 points elsewhere; the mean unit key tilts towards y, so [1,0.1] is closer to it
     * than [1,0]: -cos ranks 3, then 0,1,2 (ties), then 4 */
    const float kd[10] = {1, 0, 1, 0, 1, 0, 0, 1, 1, 0.1f};
    in.k = kd;
    s = tl_select(&in, "keydiff", B + 2, 1);
    EXPECT_KEPT(s, 0, 0, -1, "0,3");
    kvt_layer_selection_free(s);

    /* keys that cancel out (D = 1, each key's negative to an f32 ulp; fuzz_trace_records found
     * such a head, where the CPU and the GPU kept different sets): the mean unit key is zero
     * but for the sums' rounding (here 7e-18 on the CPU, which ranked every negative key
     * first), so it counts as zero and keydiff's scores tie: the lower indices */
    const float kc[16] = {1.7787472f,   1.27351642f,  -0.153476298f, -1.77874744f,
                          1.10558116f,  0.948594809f, -1.10558128f,  -0.134706736f,
                          1.29151905f,  -1.27351642f, 1.31802881f,   -1.31802893f,
                          -1.29151893f, 0.134706721f, -0.948594689f, 0.153476298f};
    const float vc[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    kvt_layer_input ic = layer1d(16, 1, 1, 1, kc, vc, q);
    const int B5[] = {5};
    s = tl_select(&ic, "keydiff", B5, 1);
    EXPECT_KEPT(s, 0, 0, -1, "0,1,2,3,4");
    kvt_layer_selection_free(s);
}

static void test_tova_h2o_oracle(void)
{
    /* tova: the last window query (head mean), last token always kept */
    const float k[6] = {1, 0, 2, -1, 3, 0}, v[6] = {0};
    const float q[4] = {-5, 1, 9, 1}; /* 2 heads x W=2; only the last rows (1, 1) matter */
    kvt_layer_input in = layer1d(6, 2, 2, 1, k, v, q);
    const int B[] = {3, 4};
    kvt_layer_selection *s = tl_select(&in, "tova", B, 2);
    EXPECT_KEPT(s, 0, 0, -1, "2,4,5");
    EXPECT_KEPT(s, 1, 0, -1, "0,2,4,5");
    kvt_layer_selection_free(s);

    /* h2o from attn_colsum (2 query heads, mean) */
    const float cs[12] = {5, 1, 3, 3, 0, 0, /* head 1 */ 5, 1, 3, 3, 9, 9};
    in.attn_colsum = cs;
    s = tl_select(&in, "h2o:window=2", B, 2);
    EXPECT_KEPT(s, 0, 0, -1, "0,4,5");
    EXPECT_KEPT(s, 1, 0, -1, "0,2,4,5"); /* 2 and 3 tie */
    kvt_layer_selection_free(s);
    /* observed-attention (kvpress): each sum over the T - j queries that see key j, mean over
       the group: 0.83, 0.2, 0.75, 1, 2.25, 4.5; no window */
    s = tl_select(&in, "observed-attention", B, 2);
    EXPECT_KEPT(s, 0, 0, -1, "3,4,5");
    EXPECT_KEPT(s, 1, 0, -1, "0,3,4,5");
    kvt_layer_selection_free(s);
    s = tl_select(&in, "observed-attention:heads=query", B, 2); /* head 0: 0.83, .2, .75, 1, 0, 0 */
    EXPECT_KEPT(s, 0, 0, -1, "0,2,3");
    EXPECT_KEPT(s, 1, 0, -1, "0,1,2,3");
    EXPECT_KEPT(s, 0, 1, -1, "3,4,5");
    kvt_layer_selection_free(s);
    in.attn_colsum = NULL;
    kvt_policy *p = mk("h2o");
    kvt_layer_selection *bad = NULL;
    KVT_EXPECT_STATUS(kvt_replay_layer_select(&in, p, B, 1, &bad), KVT_ERR_NOT_FOUND);
    KVT_EXPECT(strstr(kvt_error_msg(), "attn_colsum") && strstr(kvt_error_msg(), "Q_all"));
    kvt_policy_free(p);
    /* h2o from Q_all equals h2o from the column sums computed by the kernel */
    test_layer t;
    tl_random(&t, 21, 24, 4, 2, 1, 4, 0, false);
    kvt_rng r;
    kvt_rng_seed(&r, 4);
    float *qa = tl_randn(&r, 2 * 24 * 4, 1.0);
    float *csum = malloc(2 * 24 * sizeof(float));
    double work[24], cd[24];
    for (int h = 0; h < 2; h++) {
        KVT_CHECK(kvt_attn_colsum_ref(qa + h * 24 * 4, t.k, 24, 4, 0.5, work, cd));
        for (int j = 0; j < 24; j++)
            csum[h * 24 + j] = (float)cd[j];
    }
    t.in.q_all = qa;
    const int B2[] = {10};
    kvt_layer_selection *s1 = tl_select(&t.in, "h2o:window=4", B2, 1);
    t.in.q_all = NULL;
    t.in.attn_colsum = csum;
    kvt_layer_selection *s2 = tl_select(&t.in, "h2o:window=4", B2, 1);
    char a1[256];
    snprintf(a1, sizeof(a1), "%s", tl_kept_str(s1, 0, 0, -1));
    EXPECT_KEPT(s2, 0, 0, -1, a1);
    kvt_layer_selection_free(s1);
    kvt_layer_selection_free(s2);
    free(qa);
    free(csum);
    tl_free(&t);

    /* oracle: ranks by the decode queries' attention over all T (no window) */
    const float ko[5] = {0, 2, 1, 3, 0}, vo[5] = {0}, qw[1] = {1}, qd[2] = {1, 1};
    kvt_layer_input io = layer1d(5, 1, 1, 1, ko, vo, qw);
    const int B3[] = {2, 4};
    p = mk("oracle");
    KVT_EXPECT_STATUS(kvt_replay_layer_select(&io, p, B3, 1, &bad), KVT_ERR_NOT_FOUND);
    kvt_policy_free(p);
    io.q_decode = qd;
    io.G = 2;
    s = tl_select(&io, "oracle", B3, 2);
    EXPECT_KEPT(s, 0, 0, -1, "1,3");
    EXPECT_KEPT(s, 1, 0, -1, "0,1,2,3"); /* 0 and 4 tie: lower first */
    kvt_layer_selection_free(s);
}

/* chunkkv: W=1, kernel 1, so a token's score is the last query's probability e^k/Z; both
 * heads have Z = 16 (x = e^k below). Summed over the heads the prefix reads 7,2,2, 2,2,6, 4,4:
 * chunks of 3 are [0,3) mean 11/3, [3,6) 10/3, and the short [6,8) mean 4, which ranks first
 * although its sum (8) is the smallest. Head 1 alone would rank token 5 first. */
static void test_chunkkv(void)
{
    const double x0[9] = {6, 1, 1, 1, 1, 1, 2, 2, 1}, x1[9] = {1, 1, 1, 1, 1, 5, 2, 2, 2};
    float k[18], v[18] = {0};
    for (int j = 0; j < 9; j++) {
        k[j] = (float)log(x0[j]);
        k[9 + j] = (float)log(x1[j]);
    }
    const float q[2] = {1, 1};
    kvt_layer_input in = layer1d(9, 1, 2, 2, k, v, q);
    const int B[] = {4, 6, 7, 8, 3, 1, 9, 12};
    kvt_layer_selection *s = tl_select(&in, "chunkkv:window=1,kernel=1,chunk=3", B, 8);
    for (int h = 0; h < 2; h++) {          /* one set for the layer */
        EXPECT_KEPT(s, 0, h, -1, "6,7,8"); /* b=3: one chunk, the short one: 3 < B kept */
        EXPECT_KEPT(s, 1, h, -1, "6,7,8"); /* b=5: still one whole chunk */
        EXPECT_KEPT(s, 2, h, -1, "0,1,2,6,7,8");
        EXPECT_KEPT(s, 3, h, -1, "0,1,2,6,7,8");
        EXPECT_KEPT(s, 4, h, -1, "8"); /* b=2 < chunk: the window only */
        EXPECT_KEPT(s, 5, h, -1, "8");
        EXPECT_KEPT(s, 6, h, -1, "0,1,2,3,4,5,6,7,8");
        EXPECT_KEPT(s, 7, h, -1, "0,1,2,3,4,5,6,7,8"); /* short prompt */
    }
    kvt_layer_selection_free(s);
    /* chunks of 4: [0,4) sums 13, [4,8) 16 */
    s = tl_select(&in, "chunkkv:window=1,kernel=1,chunk=4", B, 3);
    EXPECT_KEPT(s, 0, 1, -1, "8");
    EXPECT_KEPT(s, 1, 0, -1, "4,5,6,7,8");
    EXPECT_KEPT(s, 2, 1, -1, "4,5,6,7,8");
    kvt_layer_selection_free(s);
    /* a chunk larger than the prefix: one short chunk of 8 */
    s = tl_select(&in, "chunkkv:window=1,kernel=1,chunk=20", B, 7);
    EXPECT_KEPT(s, 3, 0, -1, "8"); /* B=8 is not a whole chunk of 20 */
    EXPECT_KEPT(s, 6, 0, -1, "0,1,2,3,4,5,6,7,8");
    kvt_layer_selection_free(s);
    /* snapkv on the same layer keeps per head: head 1's best token is 5 */
    s = tl_select(&in, "snapkv:window=1,kernel=1", B, 5);
    EXPECT_KEPT(s, 4, 1, -1, "5,6,8");
    EXPECT_KEPT(s, 4, 0, -1, "0,6,8");
    kvt_layer_selection_free(s);
    /* align=kvpress: chunks of the whole sequence, the window token scoring 2 x 6 (the largest
     * prefix score of any head, 6, once per head): chunks of 2 read 4.5, 2, 4, 4 and [8,9) 12,
     * ranked 4, 0, 2, 3 (a tie: the lower first), 1; max(1, floor(5B/9)) of them are kept */
    s = tl_select(&in, "chunkkv:window=1,kernel=1,chunk=2,align=kvpress", B, 8);
    for (int h = 0; h < 2; h++) {
        EXPECT_KEPT(s, 0, h, -1, "0,1,8");     /* B=4: 2 chunks, 3 tokens */
        EXPECT_KEPT(s, 1, h, -1, "0,1,4,5,8"); /* B=6: 3 */
        EXPECT_KEPT(s, 2, h, -1, "0,1,4,5,8"); /* B=7: 3 (the window apart, 3 whole chunks) */
        EXPECT_KEPT(s, 3, h, -1, "0,1,4,5,6,7,8");
        EXPECT_KEPT(s, 4, h, -1, "8"); /* B=3: 1 chunk */
        EXPECT_KEPT(s, 5, h, -1, "8"); /* B=1: at least one chunk */
        EXPECT_KEPT(s, 6, h, -1, "0,1,2,3,4,5,6,7,8");
    }
    kvt_layer_selection_free(s);
    s = tl_select(&in, "chunkkv:window=1,kernel=1,chunk=2", B, 5);
    EXPECT_KEPT(s, 2, 0, -1, "0,1,4,5,6,7,8"); /* the prefix accounting: B=7 is W + 3 chunks */
    EXPECT_KEPT(s, 4, 0, -1, "0,1,8");
    kvt_layer_selection_free(s);
    /* chunks of 3: [6,9) holds the window and ranks first (20/3); B=1 keeps it, 3 tokens */
    s = tl_select(&in, "chunkkv:window=1,kernel=1,chunk=3,align=kvpress", B, 6);
    EXPECT_KEPT(s, 5, 1, -1, "6,7,8");
    EXPECT_KEPT(s, 1, 1, -1, "0,1,2,6,7,8");
    kvt_layer_selection_free(s);
    kvt_policy *p = NULL;
    KVT_EXPECT_STATUS(kvt_policy_create("chunkkv:align=sequence", NULL, &p), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_policy_create("snapkv:align=kvpress", NULL, &p), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_policy_create("chunkkv:chunk=0", NULL, &p), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_policy_create("chunkkv:sinks=4", NULL, &p), KVT_ERR_INVALID_ARG);
}

static void test_random(void)
{
    test_layer t;
    tl_random(&t, 9, 50, 4, 2, 2, 8, 0, false);
    const int B[] = {20, 12};
    kvt_policy_globals g1 = {.seed = 1}, g2 = {.seed = 2};
    kvt_policy *p1, *p2, *p3;
    KVT_CHECK(kvt_policy_create("random:window=8", &g1, &p1));
    KVT_CHECK(kvt_policy_create("random:window=8", &g1, &p2));
    KVT_CHECK(kvt_policy_create("random:window=8", &g2, &p3));
    kvt_layer_selection *s1, *s2, *s3;
    KVT_CHECK(kvt_replay_layer_select(&t.in, p1, B, 2, &s1));
    KVT_CHECK(kvt_replay_layer_select(&t.in, p2, B, 2, &s2));
    KVT_CHECK(kvt_replay_layer_select(&t.in, p3, B, 2, &s3));
    char a[512];
    snprintf(a, sizeof(a), "%s", tl_kept_str(s1, 0, 1, -1));
    EXPECT_KEPT(s2, 0, 1, -1, a);                             /* same seed, same set */
    KVT_EXPECT(strcmp(tl_kept_str(s3, 0, 1, -1), a) != 0);    /* other seed, other set */
    KVT_EXPECT(strstr(a, "42,43,44,45,46,47,48,49") != NULL); /* window kept */
    KVT_EXPECT(tl_count(s1, 0, 0) == 20 && tl_count(s1, 1, 0) == 12);
    kvt_layer_selection_free(s1);
    kvt_layer_selection_free(s2);
    kvt_layer_selection_free(s3);
    kvt_policy_free(p1);
    kvt_policy_free(p2);
    kvt_policy_free(p3);
    tl_free(&t);
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    fputs(text, f);
    fclose(f);
}

static void test_sparsemm_and_mixkv(void)
{
    char path[256], spec[400];
    kvt_test_tmp(path, sizeof(path), "heads.json");
    write_file(path, "{\"0-0\": 3, \"1-0\": [0.5, 1.5]}");
    /* sigma = .75 / .25; b = 8, min = floor(.25*8) = 2; caps round(.75*6*2+2)=11, round(5)=5 */
    test_layer t;
    tl_random(&t, 2, 20, 4, 1, 1, 2, 0, false);
    t.in.n_layers = 2;
    snprintf(spec, sizeof(spec), "sparsemm:window=2,ratio=0.25,scores=%s", path);
    const int B[] = {10, 30};
    for (int l = 0; l < 2; l++) {
        t.in.layer = l;
        kvt_layer_selection *s = tl_select(&t.in, spec, B, 2);
        KVT_EXPECT(tl_count(s, 0, 0) == (l == 0 ? 13 : 7));
        KVT_EXPECT(tl_count(s, 1, 0) == 20);
        kvt_layer_selection_free(s);
    }
    kvt_policy *p = NULL;
    KVT_EXPECT_STATUS(kvt_policy_create("sparsemm", NULL, &p), KVT_ERR_INVALID_ARG);
    /* headkv, the same table: b = 8, beta 1.01: floor(8/1.01) = 7, min = 8 - 7 = 1; caps
     * round(.75*7*2 + 1) = round(11.5) = 12 (ties to even), round(.25*7*2 + 1) = round(4.5) =
     * 4: kept 14 and 6. beta = 2: floor(8/2) = 4, min 4: round(.75*4*2 + 4) = 10, round(6) =
     * 6: kept 12 and 8. Ranked by SnapKV's score with HeadKV's kernel 7 and max pooling. */
    const int Bh[] = {10, 30};
    for (int beta2 = 0; beta2 < 2; beta2++)
        for (int l = 0; l < 2; l++) {
            t.in.layer = l;
            snprintf(spec, sizeof(spec), "headkv:window=2%s,scores=%s", beta2 ? ",beta=2" : "",
                     path);
            kvt_layer_selection *s = tl_select(&t.in, spec, Bh, 2);
            int want = beta2 ? (l == 0 ? 12 : 8) : (l == 0 ? 14 : 6);
            KVT_EXPECT_MSG(tl_count(s, 0, 0) == want, "%s layer %d: %d, want %d", spec, l,
                           tl_count(s, 0, 0), want);
            KVT_EXPECT(tl_count(s, 1, 0) == 20); /* B > T: all */
            const int Bs[] = {want};
            kvt_layer_selection *sn = tl_select(&t.in, "snapkv:window=2,kernel=7,pool=max", Bs, 1);
            char a[256];
            snprintf(a, sizeof(a), "%s", tl_kept_str(s, 0, 0, -1));
            EXPECT_KEPT(sn, 0, 0, -1, a);
            kvt_layer_selection_free(sn);
            kvt_layer_selection_free(s);
        }
    KVT_EXPECT_STATUS(kvt_policy_create("headkv", NULL, &p), KVT_ERR_INVALID_ARG); /* no file */
    snprintf(spec, sizeof(spec), "headkv:beta=0.5,scores=%s", path);
    KVT_EXPECT_STATUS(kvt_policy_create(spec, NULL, &p), KVT_ERR_INVALID_ARG);
    tl_free(&t);

    /* GQA (Hq 4, Hkv 2): query-head scores 1, 1, 2, 4 sum per KV head to sigma .25 / .75;
     * B = 12, W = 2: b = 10, min = floor(.25*10) = 2, caps round(.25*8*2+2) = 6 and
     * round(.75*8*2+2) = 14, kept W + cap = 8 and 16. The same table by KV head (2 columns:
     * 2, 6) gives the same; heads=query takes each query head's own sigma (1/8 .. 4/8):
     * caps round(s*8*4+2) = 6, 6, 10, 18 -> clamped to the prefix 18: kept 8, 8, 12, 20. */
    tl_random(&t, 3, 20, 4, 4, 2, 2, 0, false);
    t.in.n_layers = 1, t.in.layer = 0;
    const char *tabs[4] = {"[[1, 1, 2, 4]]", "[[2, 6]]", "1\t1\t2\t4\n", " 2, 6\r\n\n"};
    const int B1[] = {12};
    for (int i = 0; i < 4; i++) { /* JSON, and the same tables as text */
        write_file(path, tabs[i]);
        snprintf(spec, sizeof(spec), "sparsemm:window=2,ratio=0.25,scores=%s", path);
        kvt_layer_selection *s = tl_select(&t.in, spec, B1, 1);
        KVT_EXPECT_MSG(tl_count(s, 0, 0) == 8 && tl_count(s, 0, 1) == 16, "%s: %d %d", tabs[i],
                       tl_count(s, 0, 0), tl_count(s, 0, 1));
        kvt_layer_selection_free(s);
    }
    write_file(path, tabs[0]);
    snprintf(spec, sizeof(spec), "sparsemm:window=2,ratio=0.25,heads=query,scores=%s", path);
    kvt_layer_selection *sq = tl_select(&t.in, spec, B1, 1);
    KVT_EXPECT(tl_count(sq, 0, 0) == 8 && tl_count(sq, 0, 1) == 8 && tl_count(sq, 0, 2) == 12 &&
               tl_count(sq, 0, 3) == 20);
    kvt_layer_selection_free(sq);
    tl_free(&t);

    /* MixKV with r = 1 everywhere ranks by diversity only: KeyDiff restricted to the prefix */
    tl_random(&t, 8, 40, 8, 4, 2, 8, 0, false);
    kvt_test_tmp(path, sizeof(path), "r1.json");
    write_file(path, "[[1, 1], [1, 1], [1, 1], [1, 1]]");
    snprintf(spec, sizeof(spec), "mixkv-snapkv:window=8,rtable=%s", path);
    const int B2[] = {12, 20, 30};
    kvt_layer_selection *m = tl_select(&t.in, spec, B2, 3),
                        *kd = tl_select(&t.in, "keydiff:window=8", B2, 3);
    for (int b = 0; b < 3; b++)
        for (int h = 0; h < 2; h++) {
            char a[1024];
            snprintf(a, sizeof(a), "%s", tl_kept_str(kd, (size_t)b, h, -1));
            EXPECT_KEPT(m, (size_t)b, h, -1, a);
        }
    kvt_layer_selection_free(m);
    kvt_layer_selection_free(kd);
    /* r = 0 and values of equal norm: the VNorm term vanishes, so MixKV = SnapKV. The
     * "-value" entries (value-cache redundancy in MixKV's tables) come last and are not r:
     * were they read, r = 1 would make this KeyDiff. */
    for (size_t i = 0; i < 2 * 40; i++)
        for (int d = 0; d < 8; d++)
            t.v[i * 8 + d] = d == (int)(i % 8) ? 1.0f : 0.0f;
    kvt_test_tmp(path, sizeof(path), "r0.json");
    write_file(path, "{\"0-0-key\": [0, 0], \"0-1-key\": 0, \"0-0-value\": [1, 1], "
                     "\"0-1-value\": 1}");
    snprintf(spec, sizeof(spec), "mixkv-snapkv:window=8,rtable=%s", path);
    m = tl_select(&t.in, spec, B2, 3);
    kvt_layer_selection *sn = tl_select(&t.in, "snapkv:window=8", B2, 3);
    for (int b = 0; b < 3; b++)
        for (int h = 0; h < 2; h++) {
            char a[1024];
            snprintf(a, sizeof(a), "%s", tl_kept_str(sn, (size_t)b, h, -1));
            EXPECT_KEPT(m, (size_t)b, h, -1, a);
        }
    kvt_layer_selection_free(m);
    kvt_layer_selection_free(sn);
    /* mixkv-pyramidkv keeps pyramidkv's counts; a missing rtable entry is an error */
    t.in.layer = 1;
    kvt_layer_selection *mp = tl_select(&t.in, "mixkv-pyramidkv:window=8", B2, 3);
    kvt_layer_selection *pp = tl_select(&t.in, "pyramidkv:window=8", B2, 3);
    for (int b = 0; b < 3; b++)
        KVT_EXPECT(tl_count(mp, (size_t)b, 0) == tl_count(pp, (size_t)b, 0));
    kvt_layer_selection_free(mp);
    kvt_layer_selection_free(pp);
    KVT_CHECK(kvt_policy_create(spec, NULL, &p));
    kvt_layer_selection *bad = NULL;
    KVT_EXPECT_STATUS(kvt_replay_layer_select(&t.in, p, B2, 1, &bad), KVT_ERR_NOT_FOUND);
    kvt_policy_free(p);
    /* a head given twice, an unknown suffix, junk after the head: refused when created */
    const char *bad_tables[] = {"{\"0-0\": 0, \"0-0-key\": 1}", "{\"0-0-query\": 0}",
                                "{\"0-0x\": 0}", "{\"0-0-value\": 0}"};
    for (size_t i = 0; i < sizeof(bad_tables) / sizeof(bad_tables[0]); i++) {
        write_file(path, bad_tables[i]);
        p = NULL;
        KVT_EXPECT_STATUS(kvt_policy_create(spec, NULL, &p), KVT_ERR_CORRUPT);
        kvt_policy_free(p);
    }
    tl_free(&t);
}

/* mixkv-sparsemm (POLICIES §4.3): SparseMM's caps from the head-score file, each head's top-cap
 * by MixKV's composite c. */
static void test_mixkv_sparsemm(void)
{
    char path[256], rpath[256], spec[600];
    /* By hand: T=8, W=2, D=1 (logits = key values), one head, kernel 1, the same tensors in
       layers 0 and 1. Keys 2 -1 1 .5 -.5 1.5 | 1 1, values 1 4 2 1 3 .5 | 1 1, window queries
       1 1: p = [.3485 .0174 .1282 .0778 .0286 .2114] over the prefix (mean .1353).
       Online r: six unit keys +1, two -1: m = .5, r = (8*.25 - 1)/7 = 1/7.
       v' = minmax(|v|) = [1 7 3 1 5 0]/7, scaled to mean(p): [.0478 .3343 .1433 .0478 .2388 0].
       d' = minmax(-sign(k)*m) = [0 1 0 0 1 0], scaled to mean(p): [0 .4059 0 0 .4059 0].
       c = r d' + (1-r)(p + v') = [.3396 .3594 .2327 .1076 .2872 .1812]: 1 0 4 2 5 3
       (attention alone: 0 5 2 3 4 1).
       Scores {"0-0": 3, "1-0": 1}: sigma .75 / .25. B = 5: b = 3, min = floor(.1*3) = 0; caps
       round(.75*3*2) = round(4.5) = 4 and round(.25*3*2) = round(1.5) = 2 (ties to even):
       layer 0 keeps {1 0 4 2} + window, layer 1 {1 0} + window; sparsemm keeps 0 5 2 3 / 0 5. */
    const float k[8] = {2, -1, 1, 0.5f, -0.5f, 1.5f, 1, 1}, v[8] = {1, 4, 2, 1, 3, 0.5f, 1, 1};
    const float q[2] = {1, 1};
    kvt_layer_input in = layer1d(8, 2, 1, 1, k, v, q);
    in.n_layers = 2;
    kvt_test_tmp(path, sizeof(path), "mixsp_heads.json");
    write_file(path, "{\"0-0\": 3, \"1-0\": 1}");
    const int B[] = {5, 1, 8, 20};
    const char *want_mix[2] = {"0,1,2,4,6,7", "0,1,6,7"}, *want_smm[2] = {"0,2,3,5,6,7", "0,5,6,7"};
    for (int l = 0; l < 2; l++) {
        in.layer = l;
        snprintf(spec, sizeof(spec), "mixkv-sparsemm:window=2,kernel=1,scores=%s", path);
        kvt_layer_selection *s = tl_select(&in, spec, B, 4);
        EXPECT_KEPT(s, 0, 0, -1, want_mix[l]);
        EXPECT_KEPT(s, 1, 0, -1, "7");               /* B < W: the most recent B tokens */
        EXPECT_KEPT(s, 2, 0, -1, "0,1,2,3,4,5,6,7"); /* B = T keeps everything */
        EXPECT_KEPT(s, 3, 0, -1, "0,1,2,3,4,5,6,7"); /* short prompt */
        kvt_layer_selection_free(s);
        snprintf(spec, sizeof(spec), "sparsemm:window=2,kernel=1,scores=%s", path);
        s = tl_select(&in, spec, B, 1);
        EXPECT_KEPT(s, 0, 0, -1, want_smm[l]);
        kvt_layer_selection_free(s);
    }
    /* rtable: r = 0 in layer 0 ranks by p + v' = [.3962 .3516 .2715 .1255 .2674 .2114]: 0 1 2 4
       5 3; r = 1 in layer 1 by d' alone: the negative keys 1 and 4 */
    kvt_test_tmp(rpath, sizeof(rpath), "mixsp_r.json");
    write_file(rpath, "[[0], [1]]");
    const char *want_r[2] = {"0,1,2,4,6,7", "1,4,6,7"};
    for (int l = 0; l < 2; l++) {
        in.layer = l;
        snprintf(spec, sizeof(spec), "mixkv-sparsemm:window=2,kernel=1,scores=%s,rtable=%s", path,
                 rpath);
        kvt_layer_selection *s = tl_select(&in, spec, B, 1);
        EXPECT_KEPT(s, 0, 0, -1, want_r[l]);
        kvt_layer_selection_free(s);
    }
    /* method= (MixKV's ablations) with mixkv-snapkv at B = 5 (b = 3): attn by p
       (0 5 2: snapkv's set), vnorm by p + v' (0 1 2), keydiff by d' (1 4 tie exactly, then
       the zeros: 0), mixkv by d' + p + v' = [.396 .758 .272 .126 .673 .211] (1 4 0), knorm
       by p + k', k' = minmax(-|k|) to mean(p) = [0 .148 .148 .221 .221 .074]:
       [.349 .165 .276 .299 .250 .285] (0 3 5). On layer 1 (layer 0's tensors) with an
       rtable of layer 0 only: a method without r does not read it */
    static const struct {
        const char *method, *want;
    } mcases[] = {{"attn", "0,2,5,6,7"},  {"vnorm", "0,1,2,6,7"}, {"keydiff", "0,1,4,6,7"},
                  {"mixkv", "0,1,4,6,7"}, {"knorm", "0,3,5,6,7"}, {"headwise", "0,1,4,6,7"}};
    write_file(rpath, "[[0.5]]");
    in.layer = 1;
    for (size_t i = 0; i < sizeof(mcases) / sizeof(mcases[0]); i++) {
        snprintf(spec, sizeof(spec), "mixkv-snapkv:window=2,kernel=1,method=%s%s%s",
                 mcases[i].method, strcmp(mcases[i].method, "headwise") ? ",rtable=" : "",
                 strcmp(mcases[i].method, "headwise") ? rpath : "");
        kvt_layer_selection *s = tl_select(&in, spec, B, 1);
        const char *got = tl_kept_str(s, 0, 0, -1);
        KVT_EXPECT_MSG(!strcmp(got, mcases[i].want), "method=%s: kept {%s}, want {%s}",
                       mcases[i].method, got, mcases[i].want);
        kvt_layer_selection_free(s);
    }
    in.layer = 0;

    /* GQA (Hq 4, Hkv 2), the hand-worked table of test_sparsemm_and_mixkv: query-head scores
       1 1 2 4, ratio .25, B = 12: kept 8 and 16 (heads=query: 8 8 12 20). The counts are
       sparsemm's at every budget, and each head's set is mixkv-snapkv's at that head's count:
       the top of the same composite ranking. Some head must differ from sparsemm's set, or
       this layer would not tell the composite from attention. */
    test_layer t;
    tl_random(&t, 3, 20, 4, 4, 2, 2, 0, false);
    t.in.n_layers = 1, t.in.layer = 0;
    write_file(path, "[[1, 1, 2, 4]]");
    const int Bg[] = {12, 6, 2, 1, 19, 20, 25};
    const int nbg = (int)(sizeof(Bg) / sizeof(Bg[0]));
    for (int hq = 0; hq < 2; hq++) {
        const char *heads = hq ? ",heads=query" : "";
        snprintf(spec, sizeof(spec), "mixkv-sparsemm:window=2,ratio=0.25%s,scores=%s", heads, path);
        kvt_layer_selection *m = tl_select(&t.in, spec, Bg, (size_t)nbg);
        snprintf(spec, sizeof(spec), "sparsemm:window=2,ratio=0.25%s,scores=%s", heads, path);
        kvt_layer_selection *sm = tl_select(&t.in, spec, Bg, (size_t)nbg);
        const int H = kvt_layer_selection_n_heads(m);
        KVT_EXPECT(H == (hq ? 4 : 2) && kvt_layer_selection_n_heads(sm) == H);
        if (hq)
            KVT_EXPECT(tl_count(m, 0, 0) == 8 && tl_count(m, 0, 1) == 8 &&
                       tl_count(m, 0, 2) == 12 && tl_count(m, 0, 3) == 20);
        else
            KVT_EXPECT(tl_count(m, 0, 0) == 8 && tl_count(m, 0, 1) == 16);
        int differ = 0;
        for (int b = 0; b < nbg; b++)
            for (int h = 0; h < H; h++) {
                int n = tl_count(m, (size_t)b, h);
                KVT_EXPECT_MSG(n == tl_count(sm, (size_t)b, h), "%s B=%d head %d: %d, sparsemm %d",
                               heads, Bg[b], h, n, tl_count(sm, (size_t)b, h));
                if (Bg[b] >= 20)
                    KVT_EXPECT(n == 20);
                char a[1024];
                snprintf(a, sizeof(a), "%s", tl_kept_str(sm, (size_t)b, h, -1));
                differ += strcmp(a, tl_kept_str(m, (size_t)b, h, -1)) != 0;
                const int Bn[] = {n};
                snprintf(spec, sizeof(spec), "mixkv-snapkv:window=2%s", heads);
                kvt_layer_selection *ms = tl_select(&t.in, spec, Bn, 1);
                snprintf(a, sizeof(a), "%s", tl_kept_str(ms, 0, h, -1));
                EXPECT_KEPT(m, (size_t)b, h, -1, a);
                kvt_layer_selection_free(ms);
            }
        KVT_EXPECT_MSG(differ > 0, "%s: every set equals sparsemm's", heads);
        kvt_layer_selection_free(m);
        kvt_layer_selection_free(sm);
    }

    /* errors: no scores= (at create), a table that does not fit the model (at select: 3
       columns for 4 query heads / 2 KV heads), a layer missing from the rtable */
    kvt_policy *p = NULL;
    KVT_EXPECT_STATUS(kvt_policy_create("mixkv-sparsemm", NULL, &p), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_policy_create("mixkv-sparsemm:rtable=none.json", NULL, &p),
                      KVT_ERR_INVALID_ARG);
    snprintf(spec, sizeof(spec), "mixkv-sparsemm:scores=%s,rtable=/nonexistent/r.json", path);
    KVT_EXPECT(kvt_policy_create(spec, NULL, &p) != KVT_OK);
    const int B1[] = {12};
    write_file(path, "[[1, 1, 2]]");
    snprintf(spec, sizeof(spec), "mixkv-sparsemm:window=2,scores=%s", path);
    KVT_CHECK(kvt_policy_create(spec, NULL, &p));
    kvt_layer_selection *bad = NULL;
    KVT_EXPECT_STATUS(kvt_replay_layer_select(&t.in, p, B1, 1, &bad), KVT_ERR_INVALID_ARG);
    kvt_policy_free(p);
    write_file(path, "[[1, 1, 2, 4]]");
    write_file(rpath, "[[0.5]]"); /* KV head 1 has no entry */
    snprintf(spec, sizeof(spec), "mixkv-sparsemm:window=2,scores=%s,rtable=%s", path, rpath);
    KVT_CHECK(kvt_policy_create(spec, NULL, &p));
    KVT_EXPECT_STATUS(kvt_replay_layer_select(&t.in, p, B1, 1, &bad), KVT_ERR_NOT_FOUND);
    kvt_policy_free(p);
    tl_free(&t);
}

/* decoding=N (kvpress's DecodingPress) through the selection API: keys [norm, 0] of norms
 * 3 1 2 1 5 4 (prompt) and 1 6 2 1 (decode steps), knorm:decoding=2 at B = 2. The cache is
 * the whole prompt; after steps 1 and 3 it keeps the 2 smallest norms, ties to the earlier
 * token: after step 1 tokens 1, 3 and 6 (norm 1) tie, 1 and 3 stay; after step 3 1, 3 and 9
 * tie again. Step s sees the cache before the compression that follows it. */
static void test_decoding(void)
{
    const float k[12] = {3, 0, 1, 0, 2, 0, 1, 0, 5, 0, 4, 0}, v[12] = {0};
    const float kd[8] = {1, 0, 6, 0, 2, 0, 1, 0}, vd[8] = {0};
    const float qw[2] = {1, 0}, qd[8] = {1, 0, 0, 1, 1, 1, 0, 1};
    kvt_layer_input in = {.layer = 0,
                          .n_layers = 1,
                          .T = 6,
                          .D = 2,
                          .Hq = 1,
                          .Hkv = 1,
                          .W = 1,
                          .G = 4,
                          .k = k,
                          .v = v,
                          .q_window = qw,
                          .q_decode = qd,
                          .k_decode = kd,
                          .v_decode = vd};
    const int B[] = {2, 20};
    kvt_layer_selection *s = tl_select(&in, "knorm:decoding=2", B, 2);
    KVT_EXPECT(kvt_layer_selection_has_fixed(s) && kvt_layer_selection_n_steps(s) == 4 &&
               kvt_layer_selection_head_per_step(s, 0));
    EXPECT_KEPT(s, 0, 0, -1, "0,1,2,3,4,5"); /* the prompt whole at prefill */
    EXPECT_KEPT(s, 0, 0, 0, "0,1,2,3,4,5,6");
    EXPECT_KEPT(s, 0, 0, 1, "0,1,2,3,4,5,6,7");
    EXPECT_KEPT(s, 0, 0, 2, "1,3,8");
    EXPECT_KEPT(s, 0, 0, 3, "1,3,8,9");
    EXPECT_KEPT(s, 1, 0, 3, "0,1,2,3,4,5,6,7,8,9"); /* B = 20: nothing evicted */
    kvt_layer_selection_free(s);
    /* prefill=1 at B = 3: the prompt's 3 smallest norms (1, 3, then 2), then after step 1 the
       cache 1 2 3 6 7 keeps 1 3 6, after step 3 (1 3 6 8 9: four norms of 1) 1 3 6 */
    const int B3[] = {3};
    s = tl_select(&in, "knorm:decoding=2,prefill=1", B3, 1);
    EXPECT_KEPT(s, 0, 0, -1, "1,2,3");
    EXPECT_KEPT(s, 0, 0, 1, "1,2,3,6,7");
    EXPECT_KEPT(s, 0, 0, 2, "1,3,6,8");
    EXPECT_KEPT(s, 0, 0, 3, "1,3,6,8,9");
    int32_t idx[16];
    size_t n = 0;
    KVT_EXPECT_STATUS(kvt_layer_selection_kept(s, 0, 0, 4, idx, 16, &n), KVT_ERR_NOT_FOUND);
    KVT_EXPECT_STATUS(kvt_layer_selection_kept(s, 0, 0, 3, idx, 2, &n), KVT_ERR_INVALID_ARG);
    KVT_EXPECT(n == 5);
    kvt_layer_selection_free(s);
    /* without the decode steps' keys the caches cannot be followed */
    in.k_decode = in.v_decode = NULL;
    kvt_policy *p = NULL;
    KVT_CHECK(kvt_policy_create("knorm:decoding=2", NULL, &p));
    kvt_layer_selection *bad = NULL;
    KVT_EXPECT_STATUS(kvt_replay_layer_select(&in, p, B3, 1, &bad), KVT_ERR_NOT_FOUND);
    kvt_policy_free(p);
}

/* decoding= over tova and streamingllm through the selection API: two KV heads (one query head
 * each), head 0's keys [a, 0] with a = 3 1 2 1 5 4 (prompt) and 1 6 2 1 (decode), head 1's all
 * zero; every query [1, 0]. tova's scores are the layer's (the mean over both heads: head 0's
 * softmax grows with a, head 1's is uniform), so both heads hold one cache, the newest token
 * first: at prefill 5, then 4 (5) and 0 (3); then one token leaves per step: 0 (3) after step
 * 0, 6 (1) after step 1, 5 (4) after step 2. streamingllm:sinks=1 keeps token 0 and the most
 * recent: step s sees 0 and tokens T + s - 2 .. T + s. */
static void test_decoding_layer(void)
{
    const float k[24] = {3, 0, 1, 0, 2, 0, 1, 0, 5, 0, 4, 0}, v[24] = {0};
    const float kd[16] = {1, 0, 6, 0, 2, 0, 1, 0}, vd[16] = {0};
    const float qw[4] = {1, 0, 1, 0};
    const float qd[16] = {1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0};
    kvt_layer_input in = {.layer = 0,
                          .n_layers = 1,
                          .T = 6,
                          .D = 2,
                          .Hq = 2,
                          .Hkv = 2,
                          .W = 1,
                          .G = 4,
                          .k = k,
                          .v = v,
                          .q_window = qw,
                          .q_decode = qd,
                          .k_decode = kd,
                          .v_decode = vd};
    const int B3[] = {3};
    kvt_layer_selection *s = tl_select(&in, "tova:decoding=1,prefill=1", B3, 1);
    KVT_EXPECT(kvt_layer_selection_n_steps(s) == 4);
    for (int h = 0; h < 2; h++) {
        EXPECT_KEPT(s, 0, h, -1, "0,4,5");
        EXPECT_KEPT(s, 0, h, 0, "0,4,5,6");
        EXPECT_KEPT(s, 0, h, 1, "4,5,6,7");
        EXPECT_KEPT(s, 0, h, 2, "4,5,7,8");
        EXPECT_KEPT(s, 0, h, 3, "4,7,8,9");
    }
    kvt_layer_selection_free(s);
    s = tl_select(&in, "streamingllm:sinks=1,decoding=1,prefill=1", B3, 1);
    for (int h = 0; h < 2; h++) {
        EXPECT_KEPT(s, 0, h, -1, "0,4,5");
        EXPECT_KEPT(s, 0, h, 0, "0,4,5,6");
        EXPECT_KEPT(s, 0, h, 1, "0,5,6,7");
        EXPECT_KEPT(s, 0, h, 3, "0,7,8,9");
    }
    kvt_layer_selection_free(s);
}

static void test_quest(void)
{
    /* pages of 2: page 0 = [1,0],[0,1]; page 1 = [-1,0],[0,-1]; page 2 = [2,2],[0,0] */
    const float k[12] = {1, 0, 0, 1, -1, 0, 0, -1, 2, 2, 0, 0}, v[12] = {0};
    const float qw[2] = {1, 0}, qd[4] = {1, 0, 0, -1};
    kvt_layer_input in = {.layer = 0,
                          .n_layers = 1,
                          .T = 6,
                          .D = 2,
                          .Hq = 1,
                          .Hkv = 1,
                          .W = 1,
                          .G = 2,
                          .k = k,
                          .v = v,
                          .q_window = qw,
                          .q_decode = qd};
    const int B[] = {2, 3, 6};
    kvt_layer_selection *s = tl_select(&in, "quest:page=2,dense_layers=0", B, 3);
    KVT_EXPECT(!kvt_layer_selection_has_fixed(s));
    KVT_EXPECT(kvt_layer_selection_n_steps(s) == 2);
    /* step 0, q=[1,0]: U = 1, 0, 2 -> pages 2, 0, 1 */
    EXPECT_KEPT(s, 0, 0, 0, "4,5");
    EXPECT_KEPT(s, 1, 0, 0, "0,1,4,5"); /* ceil(3/2) = 2 pages: 4 tokens, measured */
    EXPECT_KEPT(s, 2, 0, 0, "0,1,2,3,4,5");
    /* step 1, q=[0,-1]: U = 0 (page 0), 1 (page 1), 0 (page 2) -> pages 1, 0, 2 */
    EXPECT_KEPT(s, 0, 0, 1, "2,3");
    EXPECT_KEPT(s, 1, 0, 1, "0,1,2,3");
    kvt_layer_selection_free(s);
    s = tl_select(&in, "quest:page=2", B, 1); /* layer 0 < dense_layers=2: dense */
    EXPECT_KEPT(s, 0, 0, 0, "0,1,2,3,4,5");
    kvt_layer_selection_free(s);
    /* T = 5: page 2 is token 4 alone, the page the decode tokens are written into. Step 0
     * writes the 2nd of its 2 slots: kept at every budget, on top of the ceil(B/2) best of the
     * other pages (U = 1, 0). At step 1 it is full and ranked by U = -2: pages 1, 0, 2. */
    in.T = 5;
    const int B5[] = {2, 3, 5};
    s = tl_select(&in, "quest:page=2,dense_layers=0", B5, 3);
    EXPECT_KEPT(s, 0, 0, 0, "0,1,4");
    EXPECT_KEPT(s, 1, 0, 0, "0,1,2,3,4");
    EXPECT_KEPT(s, 2, 0, 0, "0,1,2,3,4");
    EXPECT_KEPT(s, 0, 0, 1, "2,3");
    EXPECT_KEPT(s, 1, 0, 1, "0,1,2,3");
    kvt_layer_selection_free(s);

    /* GQA: two query heads share the KV head; pages of 1, so U = q.k per token. Head 0
     * (q=[1,0]) gives U = 3, 0, 2; head 1 (q=[0,1]) gives 0, 2, 2. group=max: 3, 2, 2 ->
     * tokens 0, 1, 2 (tie: lower page); group=sum: 3, 2, 4 -> 2, 0, 1. */
    const float kg[6] = {3, 0, 0, 2, 2, 2}, vg[6] = {0}, qwg[4] = {1, 0, 0, 1};
    const float qdg[4] = {1, 0, 0, 1};
    in.T = 3, in.Hq = 2, in.G = 1; /* the layer above with two query heads, one decode step */
    in.k = kg, in.v = vg, in.q_window = qwg, in.q_decode = qdg;
    const int Bg[] = {1, 2};
    s = tl_select(&in, "quest:page=1,dense_layers=0", Bg, 2); /* group=max by default */
    EXPECT_KEPT(s, 0, 0, 0, "0");
    EXPECT_KEPT(s, 1, 0, 0, "0,1");
    kvt_layer_selection_free(s);
    s = tl_select(&in, "quest:page=1,dense_layers=0,group=sum", Bg, 2);
    EXPECT_KEPT(s, 0, 0, 0, "2");
    EXPECT_KEPT(s, 1, 0, 0, "0,2");
    kvt_layer_selection_free(s);
}

static void test_like_policies(void)
{
    /* lightkv-like: 6 vision tokens (2..7) among 10; B=6 leaves 2 vision entries */
    test_layer t;
    tl_random(&t, 31, 10, 4, 2, 1, 2, 3, false);
    uint8_t mod[10] = {0, 0, 1, 1, 1, 1, 1, 1, 0, 0};
    t.in.modality = mod;
    const int B[] = {6, 10, 8};
    kvt_layer_selection *s = tl_select(&t.in, "lightkv-like:window=2", B, 3);
    KVT_EXPECT(kvt_layer_selection_has_fixed(s));
    int32_t idx[16];
    size_t n;
    KVT_CHECK(kvt_layer_selection_kept(s, 0, 0, -1, idx, 16, &n));
    KVT_EXPECT(n == 6 && idx[0] == 0 && idx[1] == 1 && idx[4] == 8 && idx[5] == 9);
    KVT_CHECK(kvt_layer_selection_kept(s, 1, 0, -1, idx, 16, &n));
    KVT_EXPECT(n == 10);
    KVT_CHECK(kvt_layer_selection_kept(s, 2, 0, -1, idx, 16, &n));
    KVT_EXPECT(n == 8);
    kvt_layer_selection_free(s);
    tl_free(&t);

    /* hybridkv-like: counts within the budget, per-step sets for dynamic heads, static heads
     * take text before vision */
    tl_random(&t, 41, 96, 8, 8, 4, 8, 3, true);
    const int B2[] = {24, 40, 200};
    s = tl_select(&t.in, "hybridkv-like:window=8,chunk=4", B2, 3);
    int n_dyn = 0;
    for (int h = 0; h < 4; h++) {
        n_dyn += kvt_layer_selection_head_per_step(s, h);
        KVT_EXPECT(tl_count(s, 2, h) == 96);
        for (int b = 0; b < 2; b++)
            KVT_EXPECT(tl_count(s, (size_t)b, h) >= 8 && tl_count(s, (size_t)b, h) <= B2[b] * 4);
        if (!kvt_layer_selection_head_per_step(s, h)) {
            /* static: caps are ~16-20 and the prefix holds 56 text tokens (the image is
             * tokens 32..63), so every kept token is text */
            int32_t big[128];
            KVT_CHECK(kvt_layer_selection_kept(s, 0, h, -1, big, 128, &n));
            for (size_t i = 0; i < n; i++)
                KVT_EXPECT(big[i] < 32 || big[i] >= 64);
        }
    }
    KVT_EXPECT(n_dyn == 2); /* median split */
    kvt_layer_selection_free(s);
    tl_free(&t);
}

/* kvt_sym_top_eigvec: the residual of the pair it returns, and that no other direction has a
 * larger Rayleigh quotient, on random and awkward symmetric matrices */
static void check_top_eig(const double *a0, int n, const char *what)
{
    double *a = malloc((size_t)n * n * sizeof(double)), *x = malloc((size_t)n * sizeof(double));
    double *w = malloc(((size_t)n * n + 8 * (size_t)n) * sizeof(double));
    double *y = malloc((size_t)n * sizeof(double));
    memcpy(a, a0, (size_t)n * n * sizeof(double));
    kvt_sym_top_eigvec(a, n, x, w);
    double nx = 0, lam = 0, anorm = 0, res = 0;
    for (int i = 0; i < n; i++) {
        nx += x[i] * x[i];
        y[i] = 0;
        for (int j = 0; j < n; j++) {
            y[i] += a0[(size_t)i * n + j] * x[j];
            anorm = fmax(anorm, fabs(a0[(size_t)i * n + j]));
        }
        lam += x[i] * y[i];
    }
    for (int i = 0; i < n; i++)
        res = fmax(res, fabs(y[i] - lam * x[i]));
    KVT_EXPECT_MSG(fabs(nx - 1) < 1e-12, "%s: |x|^2 = %.17g", what, nx);
    KVT_EXPECT_MSG(res <= 1e-12 * n * fmax(anorm, 1e-300), "%s: residual %g (|a| %g)", what, res,
                   anorm);
    kvt_rng r;
    kvt_rng_seed(&r, 99);
    for (int t = 0; t < 200; t++) { /* random directions, and the axes */
        double num = 0, den = 0;
        for (int i = 0; i < n; i++)
            y[i] = t < n ? i == t : kvt_rng_normal(&r);
        for (int i = 0; i < n; i++) {
            den += y[i] * y[i];
            for (int j = 0; j < n; j++)
                num += y[i] * a0[(size_t)i * n + j] * y[j];
        }
        KVT_EXPECT_MSG(num / den <= lam + 1e-12 * n * anorm,
                       "%s: a direction's quotient %.17g "
                       "above the eigenvalue %.17g",
                       what, num / den, lam);
    }
    free(a), free(x), free(w), free(y);
}

static void test_qfilter(void)
{
    kvt_rng r;
    kvt_rng_seed(&r, 5);
    const int ns[] = {1, 2, 3, 5, 8, 64, 128};
    double *a = malloc(128 * 128 * sizeof(double)), *q = malloc(300 * 128 * sizeof(double));
    for (size_t t = 0; t < sizeof(ns) / sizeof(ns[0]); t++) {
        const int n = ns[t];
        char what[64];
        for (int i = 0; i < n; i++) /* random symmetric */
            for (int j = 0; j <= i; j++)
                a[i * n + j] = a[j * n + i] = kvt_rng_normal(&r);
        snprintf(what, sizeof(what), "random %d", n);
        check_top_eig(a, n, what);
        for (int i = 0; i < 300 * n; i++) /* q^T q of 300 anisotropic rows, as calibration */
            q[i] = kvt_rng_normal(&r) * (i % n == 1 ? 5.0 : 1.0) - (i % n == 0 ? 2.0 : 0.0);
        for (int i = 0; i < n; i++)
            for (int j = 0; j < n; j++) {
                double c = 0;
                for (int k = 0; k < 300; k++)
                    c += q[k * n + i] * q[k * n + j];
                a[i * n + j] = c;
            }
        snprintf(what, sizeof(what), "gram %d", n);
        check_top_eig(a, n, what);
        for (int i = 0; i < n * n; i++) /* negative definite diagonal: the least negative */
            a[i] = i % (n + 1) ? 0.0 : -1.0 - (i / (n + 1)) % 3;
        snprintf(what, sizeof(what), "negative diagonal %d", n);
        check_top_eig(a, n, what);
        for (int i = 0; i < n * n; i++) /* repeated top eigenvalue: any vector of its space */
            a[i] = i % (n + 1) ? 0.0 : 2.0;
        snprintf(what, sizeof(what), "identity %d", n);
        check_top_eig(a, n, what);
        for (int i = 0; i < n * n; i++) /* distinct diagonal, the largest last */
            a[i] = i % (n + 1) ? 0.0 : i / (n + 1);
        snprintf(what, sizeof(what), "increasing diagonal %d", n);
        check_top_eig(a, n, what);
        for (int i = 0; i < n; i++) /* sparse: the tridiagonal form splits into blocks */
            for (int j = 0; j <= i; j++)
                a[i * n + j] = a[j * n + i] = kvt_rng_uniform(&r) < 0.8 ? 0.0 : kvt_rng_normal(&r);
        snprintf(what, sizeof(what), "sparse %d", n);
        check_top_eig(a, n, what);
        memset(a, 0, (size_t)n * n * sizeof(double)); /* zero */
        snprintf(what, sizeof(what), "zero %d", n);
        check_top_eig(a, n, what);
    }
    /* columns with nothing below the diagonal (no reflection) and a block that has */
    const double blk[16] = {1, 0, 0, 0, 0, 3, 0, 2, 0, 0, 0, 0, 0, 2, 0, 3};
    check_top_eig(blk, 4, "block");
    free(a);
    free(q);

    /* D = 2, two query heads over one KV head, two window queries each. heads=kv: the queries
     * (-3,0) (-1,0) (0,2) (0,1) give sum q q^T = diag(10, 5), f = +-(1,0); the projections sum
     * to -4 with (1,0), so f = (1,0) and token j scores -k_j.x: 3 (2), 1 (1), 2 (0), 4 (-1),
     * 0 (-3). heads=query: head 1 alone has diag(0, 5), f = (0,-1) (its projections on (0,1)
     * sum to 3 > 0), scores k_j.y: 1 (5), 4 (1), 0 and 2 (0, ties to the earlier), 3 (-9). */
    const float k[10] = {3, 0, -1, 5, 0, 0, -2, -9, 1, 1}, v[10] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    const float qw[8] = {-3, 0, -1, 0, 0, 2, 0, 1};
    kvt_layer_input in = tl_layer(5, 2, 2, 1, 2, k, v, qw);
    const int B[] = {2, 3, 4};
    kvt_layer_selection *s = tl_select(&in, "qfilter", B, 3);
    EXPECT_KEPT(s, 0, 0, -1, "1,3");
    EXPECT_KEPT(s, 1, 0, -1, "1,2,3");
    EXPECT_KEPT(s, 2, 0, -1, "1,2,3,4");
    kvt_layer_selection_free(s);
    s = tl_select(&in, "qfilter:window=1", B, 1); /* token 4 first, then 3 */
    EXPECT_KEPT(s, 0, 0, -1, "3,4");
    kvt_layer_selection_free(s);
    s = tl_select(&in, "qfilter:heads=query", B, 3);
    EXPECT_KEPT(s, 0, 0, -1, "1,3");
    EXPECT_KEPT(s, 0, 1, -1, "1,4");
    EXPECT_KEPT(s, 2, 1, -1, "0,1,2,4");
    kvt_layer_selection_free(s);
    /* every query zero: f = 0, all scores tie, the earliest tokens */
    const float qz[8] = {0};
    in.q_window = qz;
    s = tl_select(&in, "qfilter", B, 1);
    EXPECT_KEPT(s, 0, 0, -1, "0,1");
    kvt_layer_selection_free(s);
}

/* cur on D = 1: k = 1 2 1 1 3 0, v = 1: k2 = 1 4 1 1 9 0. Blocks of 2 (local=2) make k2
 * .2 .8 .5 .5 1 0 and v2 .5 everywhere; kv_product .1 .4 .25 .25 .5 0 (over 1.5); sinks=1 puts
 * token 0 first at 1: ranking 0, 4, 1, then 2 and 3 tied (the earlier first), 5. key alone with
 * local=2 and no sinks: 4, 1, 2, 3, 0, 5; with local=0 (the plain norms): 4, 1, 0, 2, 3, 5. */
static void test_cur(void)
{
    const float k[6] = {1, 2, 1, 1, 3, 0}, v[6] = {1, 1, 1, 1, 1, 1}, q[1] = {1};
    kvt_layer_input in = layer1d(6, 1, 1, 1, k, v, q);
    const int B[] = {3, 4};
    kvt_layer_selection *s = tl_select(&in, "cur:local=2,sinks=1", B, 2);
    EXPECT_KEPT(s, 0, 0, -1, "0,1,4");
    EXPECT_KEPT(s, 1, 0, -1, "0,1,2,4");
    kvt_layer_selection_free(s);
    s = tl_select(&in, "cur:local=2,sinks=0,leverage=key", B, 2);
    EXPECT_KEPT(s, 0, 0, -1, "1,2,4");
    EXPECT_KEPT(s, 1, 0, -1, "1,2,3,4");
    kvt_layer_selection_free(s);
    s = tl_select(&in, "cur:local=0,sinks=0,leverage=key", B, 1);
    EXPECT_KEPT(s, 0, 0, -1, "0,1,4");
    kvt_layer_selection_free(s);
    /* leverage=value: every v2 ties (.5 in blocks of 2); the sinks, then the earliest */
    s = tl_select(&in, "cur:local=2,leverage=value,sinks=2", B, 1);
    EXPECT_KEPT(s, 0, 0, -1, "0,1,2");
    kvt_layer_selection_free(s);
}

/* adaptive=1 (kvpress's AdaKVPress over the press) on knorm, D = 1, two KV heads: keys 1 2 3 4 5
 * and .1 .2 .3 9 9 score -|k|. B = 2, alpha .2: n_safe = 0, and the layer's top 4 are head 1's
 * -.1 -.2 -.3 and head 0's -1: one token for head 0, three for head 1 (B = 3: the top 6 add
 * head 0's -2 and -3). alpha = 1 forces n_safe = 2 each. window=1, B = 3: the last token, and
 * the top 4 of the prefixes [0, 4) shared as at B = 2. Keys 1 2 3 4 5 and 1 3 3 4 5 at B = 2:
 * -1, -1, -2, then head 0's -3 before head 1's (ties to the lower head). */
static void test_adaptive_scores(void)
{
    const float k[10] = {1, 2, 3, 4, 5, 0.1f, 0.2f, 0.3f, 9, 9}, v[10] = {0}, q[2] = {1, 1};
    kvt_layer_input in = layer1d(5, 1, 2, 2, k, v, q);
    const int B[] = {2, 3};
    kvt_layer_selection *s = tl_select(&in, "knorm:adaptive=1", B, 2);
    EXPECT_KEPT(s, 0, 0, -1, "0");
    EXPECT_KEPT(s, 0, 1, -1, "0,1,2");
    EXPECT_KEPT(s, 1, 0, -1, "0,1,2");
    EXPECT_KEPT(s, 1, 1, -1, "0,1,2");
    kvt_layer_selection_free(s);
    s = tl_select(&in, "knorm:adaptive=1,alpha=1", B, 1);
    EXPECT_KEPT(s, 0, 0, -1, "0,1");
    EXPECT_KEPT(s, 0, 1, -1, "0,1");
    kvt_layer_selection_free(s);
    s = tl_select(&in, "knorm:adaptive=1,window=1", B + 1, 1);
    EXPECT_KEPT(s, 0, 0, -1, "0,4");
    EXPECT_KEPT(s, 0, 1, -1, "0,1,2,4");
    kvt_layer_selection_free(s);
    const float kt[10] = {1, 2, 3, 4, 5, 1, 3, 3, 4, 5};
    in.k = kt;
    s = tl_select(&in, "knorm:adaptive=1", B, 1);
    EXPECT_KEPT(s, 0, 0, -1, "0,1,2");
    EXPECT_KEPT(s, 0, 1, -1, "0");
    kvt_layer_selection_free(s);
}

/* keydiff-block on D = 2, keys (1,0) (1,0) (0,1) (1,0). B = 1, one block: candidates 0..3, mean
 * unit key (.75, .25): token 2 is the least like it. B = 1, block=1: two candidates at a time,
 * always equally like their mean (a tie): token 0 stays. B = 2: token 2, then 0, 1, 3 tie: 0. */
static void test_keydiff_block(void)
{
    const float k[8] = {1, 0, 1, 0, 0, 1, 1, 0}, v[8] = {0}, q[2] = {1, 1};
    kvt_layer_input in = tl_layer(4, 2, 1, 1, 1, k, v, q);
    const int B[] = {1, 2, 4};
    kvt_layer_selection *s = tl_select(&in, "keydiff-block", B, 3);
    EXPECT_KEPT(s, 0, 0, -1, "2");
    EXPECT_KEPT(s, 1, 0, -1, "0,2");
    EXPECT_KEPT(s, 2, 0, -1, "0,1,2,3");
    kvt_layer_selection_free(s);
    s = tl_select(&in, "keydiff-block:block=1", B, 2);
    EXPECT_KEPT(s, 0, 0, -1, "0");
    EXPECT_KEPT(s, 1, 0, -1, "0,2");
    kvt_layer_selection_free(s);
}

/* np.save of n float64 of the given shape, e.g. "(1, 1, 6)" (format 1.0: the header padded
 * to 64 bytes) */
static void write_npy(const char *path, const char *shape, const double *x, int n)
{
    char hdr[128];
    int len = snprintf(hdr, sizeof(hdr), "{'descr': '<f8', 'fortran_order': False, 'shape': %s, }",
                       shape);
    while ((10 + len + 1) % 64)
        hdr[len++] = ' ';
    hdr[len++] = '\n';
    FILE *f = fopen(path, "wb");
    fwrite("\x93NUMPY\x01\x00", 1, 8, f);
    fputc(len & 255, f);
    fputc(len >> 8, f);
    fwrite(hdr, 1, (size_t)len, f);
    fwrite(x, sizeof(double), (size_t)n, f);
    fclose(f);
}

/* critical= on knorm, D = 1: keys 1..6 score -1..-6 (s ranks 0..5); norms w = 6 5 4 3 2 .1 make
 * (s + 1e-4) w rank 5, 0, 1, 4, 2, 3. B keeps floor(B/2) by s, the rest by the product among the
 * others: B = 1: {5}; 2: {0} + {5}; 3: {0} + {5, 1}; 4: {0, 1} + {5, 4} (1 moves from the second
 * stage to the first, and the second takes 4). first=1: the plain knorm sets. */
static void test_critical(void)
{
    const float k[6] = {1, 2, 3, 4, 5, 6}, v[6] = {0}, q[1] = {1};
    const double w[6] = {6, 5, 4, 3, 2, 0.1};
    char path[256], spec[400];
    kvt_test_tmp(path, sizeof(path), "crit.npy");
    write_npy(path, "(1, 1, 6)", w, 6);
    kvt_layer_input in = layer1d(6, 1, 1, 1, k, v, q);
    const int B[] = {1, 2, 3, 4};
    snprintf(spec, sizeof(spec), "knorm:critical=%s", path);
    kvt_layer_selection *s = tl_select(&in, spec, B, 4);
    EXPECT_KEPT(s, 0, 0, -1, "5");
    EXPECT_KEPT(s, 1, 0, -1, "0,5");
    EXPECT_KEPT(s, 2, 0, -1, "0,1,5");
    EXPECT_KEPT(s, 3, 0, -1, "0,1,4,5");
    kvt_layer_selection_free(s);
    snprintf(spec, sizeof(spec), "knorm:first=1,critical=%s", path);
    s = tl_select(&in, spec, B, 4);
    EXPECT_KEPT(s, 0, 0, -1, "0");
    EXPECT_KEPT(s, 3, 0, -1, "0,1,2,3");
    kvt_layer_selection_free(s);
    remove(path);
}

/* duo-attention, 2 layers x 2 KV heads, T = 20, sinks 2 + recent 3: a streaming head keeps
 * {0, 1, 17, 18, 19}. The table 0.5 0 / 1.7 -0.2 clips to 0.5 0 / 1 0, so the heads stream
 * in the order (0,1), (1,1) (tied at 0: the lower layer first; unclipped, (1,1) would be first),
 * (0,0), (1,0). N = 4 heads, span = 20 - 5:
 * B = 17 streams ceil(4*3/15) = 1 head, B = 16 ceil(16/15) = 2, B = 10 ceil(40/15) = 3, B = 4
 * all 4 (each keeping 5, over the budget), B = 20 none. The same table as JSON and as .npy;
 * heads=query gives each query head its KV head's set. */
static void test_duo_attention(void)
{
    char path[256], spec[400];
    const char *stream = "0,1,17,18,19", *all = "0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19";
    const int B[] = {17, 16, 10, 4, 20};
    /* want[b][layer][head]: 1 if that head streams */
    const int want[5][2][2] = {
        {{0, 1}, {0, 0}}, {{0, 1}, {0, 1}}, {{1, 1}, {0, 1}}, {{1, 1}, {1, 1}}, {{0, 0}, {0, 0}}};
    const double npy[4] = {0.5, 0, 1.7, -0.2};
    test_layer t;
    tl_random(&t, 5, 20, 2, 4, 2, 2, 0, false);
    t.in.n_layers = 2;
    for (int form = 0; form < 4; form++) {
        kvt_test_tmp(path, sizeof(path), form == 2 ? "duo.npy" : "duo.tsv");
        if (form == 2)
            write_npy(path, "(2, 2)", npy, 4);
        else
            write_file(path,
                       form == 1 ? "[[0.5, 0], [1.7, -0.2]]" : "# gates\n0.5\t0\n\n1.7 -2e-1\n");
        snprintf(spec, sizeof(spec), "duo-attention:sinks=2,recent=3,scores=%s%s", path,
                 form == 3 ? ",heads=query" : "");
        for (int l = 0; l < 2; l++) {
            t.in.layer = l;
            kvt_layer_selection *s = tl_select(&t.in, spec, B, 5);
            for (int b = 0; b < 5; b++)
                for (int h = 0; h < (form == 3 ? 4 : 2); h++)
                    EXPECT_KEPT(s, b, h, -1, want[b][l][form == 3 ? h / 2 : h] ? stream : all);
            kvt_layer_selection_free(s);
        }
    }
    /* a prompt no longer than sinks + recent is kept whole at every budget */
    snprintf(spec, sizeof(spec), "duo-attention:sinks=5,recent=15,scores=%s", path);
    kvt_layer_selection *s = tl_select(&t.in, spec, B, 5);
    for (int b = 0; b < 5; b++)
        EXPECT_KEPT(s, b, 0, -1, all);
    kvt_layer_selection_free(s);
    /* refused: no file; a table of another shape (at select); a missing score; bad text */
    kvt_policy *p = NULL;
    KVT_EXPECT_STATUS(kvt_policy_create("duo-attention", NULL, &p), KVT_ERR_INVALID_ARG);
    write_file(path, "0.5 0.1 0.2\n0.3 0.4 0.6\n");
    snprintf(spec, sizeof(spec), "duo-attention:scores=%s", path);
    p = mk(spec);
    kvt_layer_selection *bad = NULL;
    KVT_EXPECT_STATUS(kvt_replay_layer_select(&t.in, p, B, 1, &bad), KVT_ERR_INVALID_ARG);
    kvt_policy_free(p);
    write_file(path, "{\"0-0\": 1, \"0-1\": 1, \"1-0\": 1}");
    KVT_EXPECT_STATUS(kvt_policy_create(spec, NULL, &p), KVT_ERR_INVALID_ARG);
    const char *texts[] = {"0.5 0.1\n0.3\n", "0.5 nan\n0.1 0.2\n", "0.5 0.1x\n", "\n#\n"};
    for (int i = 0; i < 4; i++) {
        write_file(path, texts[i]);
        KVT_EXPECT_STATUS(kvt_policy_create(spec, NULL, &p), KVT_ERR_CORRUPT);
    }
    remove(path);
    tl_free(&t);
}

/* simlayerkv, D = 1, scale 1, one head: the last query's logits are the keys. Keys 10 at
 * tokens 0 and 7 (e^10 each), 0 elsewhere; T = 12, the last column (11) left out of the score.
 * B = 5, sinks 2, last 1: n_recent = 4, columns 0, 1 and 7..10 hold (2e^10 + 4) / (2e^10 + 10)
 * > 0.9: lazy, keeps {0, 1} and the last 3 (not 7). With the 10 at token 4 instead: (e^10 + 5) /
 * (2e^10 + 10) = 0.5: not lazy (all 12), lazy at threshold=0.4. B = 9: n_recent = 8 scores
 * columns 3..10, which hold token 4 (lazy), and keeps the last 7 (5..11), kvpress's offset.
 * B = 10: T <= B + 2: all. */
static void test_simlayerkv(void)
{
    float k[12] = {10, 0, 0, 0, 0, 0, 0, 10, 0, 0, 0, 0};
    const float v[12] = {0}, q[2] = {1, 1};
    kvt_layer_input in = layer1d(12, 2, 1, 1, k, v, q);
    const int B[] = {5, 9, 10};
    const char *all = "0,1,2,3,4,5,6,7,8,9,10,11";
    kvt_layer_selection *s = tl_select(&in, "simlayerkv:sinks=2", B, 3);
    EXPECT_KEPT(s, 0, 0, -1, "0,1,9,10,11");
    EXPECT_KEPT(s, 2, 0, -1, all);
    kvt_layer_selection_free(s);
    k[7] = 0, k[4] = 10;
    s = tl_select(&in, "simlayerkv:sinks=2", B, 3);
    EXPECT_KEPT(s, 0, 0, -1, all);
    EXPECT_KEPT(s, 1, 0, -1, "0,1,5,6,7,8,9,10,11");
    kvt_layer_selection_free(s);
    s = tl_select(&in, "simlayerkv:sinks=2,threshold=0.4", B, 1);
    EXPECT_KEPT(s, 0, 0, -1, "0,1,9,10,11");
    kvt_layer_selection_free(s);
    s = tl_select(&in, "simlayerkv:sinks=2,threshold=1", B, 2);
    EXPECT_KEPT(s, 1, 0, -1, all);
    kvt_layer_selection_free(s);
    kvt_policy *p = mk("simlayerkv:last=3"); /* the trace holds 2 window queries */
    kvt_layer_selection *bad = NULL;
    KVT_EXPECT_STATUS(kvt_replay_layer_select(&in, p, B, 1, &bad), KVT_ERR_INVALID_ARG);
    kvt_policy_free(p);
}

/* merge= (KVCache-Factory's merge_kv), D = 2: streamingllm sinks=1 keeps {0, 3} at B = 2 and
 * {0, 2, 3} at B = 3. Keys k0 (1, 0), k1 (1, .1), k2 (.1, 1), k3 (0, 1): token 1 is nearest
 * k0, token 2 nearest k3. Values v_j = (j, 10 j). pivot, B = 2: k0' = (1.5 k0 + .5 k1) / 2 =
 * (1, .025), v0' = (.25, 2.5); k3' = (.025, 1), v3' = (2.75, 27.5). B = 3: only entry 0
 * changes. weighted, B = 2: w = (cos(k1, k0) + 1) / 2, k0' = (k0 + w k1) / (1 + w). */
static void test_merge(void)
{
    const float k[8] = {1, 0, 1, 0.1f, 0.1f, 1, 0, 1}, v[8] = {0, 0, 1, 10, 2, 20, 3, 30};
    const float q[2] = {1, 1};
    kvt_layer_input in = tl_layer(4, 2, 1, 1, 1, k, v, q);
    const int B[] = {2, 3, 4};
    kvt_layer_selection *s = tl_select(&in, "streamingllm:sinks=1,merge=pivot", B, 3);
    KVT_EXPECT(s->merged != NULL);
    EXPECT_KEPT(s, 0, 0, -1, "0,3");
    EXPECT_KEPT(s, 1, 0, -1, "0,2,3");
    const kvt_merged_set *m = &s->merged[0];
    KVT_EXPECT(m->n == 2 && m->n_changed == 2 && m->changed[0] && m->changed[1]);
    const float want[2][4] = {{1, 0.025f, 0.25f, 2.5f}, {0.025f, 1, 2.75f, 27.5f}};
    for (int e = 0; e < 2; e++)
        for (int d = 0; d < 2; d++)
            KVT_EXPECT_MSG(fabsf(m->k[e * 2 + d] - want[e][d]) < 1e-6f &&
                               fabsf(m->v[e * 2 + d] - want[e][2 + d]) < 1e-5f,
                           "pivot entry %d dim %d: k %g v %g", e, d, m->k[e * 2 + d],
                           m->v[e * 2 + d]);
    m = &s->merged[1];
    KVT_EXPECT(m->n == 3 && m->n_changed == 1 && m->changed[0] && !m->changed[1] &&
               !m->changed[2] && fabsf(m->k[1] - 0.025f) < 1e-6f);
    KVT_EXPECT(s->merged[2].n == 4 && s->merged[2].n_changed == 0); /* B = T: nothing dropped */
    kvt_layer_selection_free(s);
    s = tl_select(&in, "streamingllm:sinks=1,merge=weighted", B, 1);
    m = &s->merged[0];
    double w = (1.0 / sqrt(1.01) + 1.0) / 2.0;
    KVT_EXPECT_MSG(m->n_changed == 2 && fabsf(m->k[0] - 1.0f) < 1e-6f &&
                       fabs(m->k[1] - 0.1 * w / (1 + w)) < 1e-6 &&
                       fabs(m->v[1] - 10 * w / (1 + w)) < 1e-5,
                   "weighted: k0' (%g, %g), v0' (%g, %g)", m->k[0], m->k[1], m->v[0], m->v[1]);
    kvt_layer_selection_free(s);
    kvt_policy *p = NULL; /* only the policies KVCache-Factory merges, and known modes */
    KVT_EXPECT_STATUS(kvt_policy_create("knorm:merge=pivot", NULL, &p), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_policy_create("snapkv:merge=average", NULL, &p), KVT_ERR_INVALID_ARG);
    p = mk("snapkv:merge=weighted");
    KVT_EXPECT(kvt_policy_flags(p) & KVT_POLICY_MERGED);
    kvt_policy_free(p);
}

/* think=R (think.c) worked by hand. T = 4, D = 4, 2 query heads on 1 KV head, 2 window queries;
 * keys k0 (1,2,0,1), k1 (1,0,3,1), k2 (2,1,1,0), k3 (0,1,1,2), values v_j = (j,j,j,j); window
 * queries, head 0: (1,1,1,1), (2,0,1,1); head 1: (0,1,1,1), (1,1,0,1). streamingllm:sinks=1
 * keeps {0, 3} at B = 2 and every token at B = 4.
 * heads=kv: q_c = mean of q_c^2 over both heads' queries = (1.5, .75, .75, 1).
 *   B = 2: k_c over k0, k3 = (.5, 2.5, .5, 2.5), scores (.75, 1.875, .375, 2.5): channels 2 and
 *   0 pruned (think=0.5: 2 of 4); token 0 before the last think_recent=1 token: k0' (0,2,0,1),
 *   token 3 as it is.
 *   B = 4: k_c = (1.5, 1.5, 2.75, 1.5), scores (2.25, 1.125, 2.0625, 1.5): channels 1 and 3;
 *   tokens 0..2 changed.
 * heads=query, think=0.25 (1 channel), think_recent=0, B = 2: head 0's q_c = (2.5, .5, 1, 1),
 *   scores (1.25, 1.25, .5, 2.5): channel 2; head 1's q_c = (.5, 1, .5, 1), scores (.25, 2.5,
 *   .25, 2.5): channels 0 and 2 tie, the lower (0) is pruned. Both tokens change. */
static void test_think(void)
{
    const float k[16] = {1, 2, 0, 1, 1, 0, 3, 1, 2, 1, 1, 0, 0, 1, 1, 2};
    const float v[16] = {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3};
    const float q[16] = {1, 1, 1, 1, 2, 0, 1, 1, 0, 1, 1, 1, 1, 1, 0, 1};
    kvt_layer_input in = tl_layer(4, 4, 2, 1, 2, k, v, q);
    const int B[] = {2, 4};
    kvt_layer_selection *s =
        tl_select(&in, "streamingllm:sinks=1,think=0.5,think_window=2,think_recent=1", B, 2);
    KVT_EXPECT(s->merged != NULL);
    EXPECT_KEPT(s, 0, 0, -1, "0,3");
    const kvt_merged_set *m = &s->merged[0];
    const float k0[4] = {0, 2, 0, 1};
    KVT_EXPECT(m->n == 2 && m->n_changed == 1 && m->changed[0] && !m->changed[1] &&
               m->idx[0] == 0 && m->idx[1] == 3 && !memcmp(m->k, k0, sizeof(k0)) &&
               !m->v /* the values are the tokens' own */);
    m = &s->merged[1];
    const float kall[12] = {1, 0, 0, 0, 1, 0, 3, 0, 2, 0, 1, 0};
    KVT_EXPECT_MSG(m->n == 4 && m->n_changed == 3 && m->changed[2] && !m->changed[3] &&
                       !memcmp(m->k, kall, sizeof(kall)) && !m->v,
                   "B = 4: %d entries, %d changed, k0' (%g, %g, %g, %g)", m->n, m->n_changed,
                   m->k[0], m->k[1], m->k[2], m->k[3]);
    kvt_layer_selection_free(s);
    s = tl_select(&in, "streamingllm:sinks=1,heads=query,think=0.25,think_window=2,think_recent=0",
                  B, 1);
    const float h0[8] = {1, 2, 0, 1, 0, 1, 0, 2}, h1[8] = {0, 2, 0, 1, 0, 1, 1, 2};
    KVT_EXPECT(s->n_heads == 2 && s->merged[0].n_changed == 2 && s->merged[1].n_changed == 2 &&
               !memcmp(s->merged[0].k, h0, sizeof(h0)) && !memcmp(s->merged[1].k, h1, sizeof(h1)));
    kvt_layer_selection_free(s);
    s = tl_select(&in, "streamingllm:sinks=1,think=0.2,think_window=2", B,
                  1); /* floor(0.8): none */
    KVT_EXPECT(s->merged && s->merged[0].n == 2 && s->merged[0].n_changed == 0);
    kvt_layer_selection_free(s);
    /* more window queries than stored: refused */
    kvt_policy *p = mk("streamingllm:think=0.5,think_window=3");
    kvt_layer_selection *bad = NULL;
    KVT_EXPECT_STATUS(kvt_replay_layer_select(&in, p, B, 1, &bad), KVT_ERR_INVALID_ARG);
    KVT_EXPECT(bad == NULL && strstr(kvt_error_msg(), "think_window=3 needs 3 stored window"));
    KVT_EXPECT(kvt_policy_flags(p) & KVT_POLICY_MERGED);
    char *o = kvt_policy_options_json(p);
    KVT_EXPECT_MSG(o && strstr(o, "\"think\": 0.5, \"think_window\": 3, \"think_recent\": 32"),
                   "options %s", o ? o : "(null)");
    free(o);
    kvt_policy_free(p);
    p = mk("snapkv:think=0"); /* off: a plain policy, and its options say nothing of it */
    o = kvt_policy_options_json(p);
    KVT_EXPECT(!(kvt_policy_flags(p) & KVT_POLICY_MERGED) && o && !strstr(o, "think"));
    free(o);
    kvt_policy_free(p);
    const char *refused[] = {"snapkv:think=0.4,merge=pivot",
                             "lookm:think=0.4",
                             "elastic-cache:think=0.4",
                             "quest:think=0.4",
                             "lightkv-like:think=0.4",
                             "cam:think=0.4",
                             "snapkv:think=1.5",
                             "snapkv:think=-0.1",
                             "snapkv:think_window=8",
                             "snapkv:think=0.4,think_window=0"};
    for (size_t i = 0; i < sizeof(refused) / sizeof(refused[0]); i++) {
        p = NULL;
        KVT_EXPECT_MSG(kvt_policy_create(refused[i], NULL, &p) == KVT_ERR_INVALID_ARG && !p,
                       "%s accepted", refused[i]);
    }
    p = mk("lookm:think=0.4,merge=none"); /* lookm's plain sets */
    KVT_EXPECT(kvt_policy_flags(p) & KVT_POLICY_MERGED);
    kvt_policy_free(p);
}

/* merged sets a and b hold the same entries and (within 1e-6) the same merged K and V */
static void expect_same_merged(const kvt_merged_set *a, const kvt_merged_set *b, int D,
                               const char *what, int budget, int head)
{
    bool same = a->n == b->n && a->n_changed == b->n_changed &&
                !memcmp(a->idx, b->idx, (size_t)a->n * sizeof(int32_t)) &&
                !memcmp(a->changed, b->changed, (size_t)a->n);
    for (int i = 0; same && i < a->n_changed * D; i++)
        same = fabsf(a->k[i] - b->k[i]) <= 1e-6f * (1 + fabsf(b->k[i])) &&
               fabsf(a->v[i] - b->v[i]) <= 1e-6f * (1 + fabsf(b->v[i]));
    KVT_EXPECT_MSG(same, "%s budget %d head %d: merged with the other budgets differs from alone",
                   what, budget, head);
}

/* merge.c carries each dropped token's nearest kept token from one budget to the next (in
 * increasing kept count) when the kept sets are nested, and starts afresh when they are not:
 * either way each budget's merged set must be the one merged from that budget alone. A random
 * layer (T = 60, D = 8, 4 query heads on 2 KV heads): snapkv's nested sets with the budgets
 * out of order (and one past T), per query head; keydiff-block's sets, which are not nested,
 * merged directly. */
/* A context holding the decode probabilities one KV group at a time (KVT_DECODE_PROBS_GROUP)
 * against one holding them all: the same decode outputs, log-sum-exps, row sums and decode-key
 * parts from the build, and every group's rows, computed again in an order that goes back and
 * forth, bit for bit; the oracle's decode means too. With big set, a group's rows take two
 * kvt_attn_probs calls (their logits past 32 MiB). */
static void check_decode_groups(uint64_t seed, int T, int D, int Hq, int Hkv, int W, int G,
                                bool big)
{
    test_layer t;
    tl_random(&t, seed, T, D, Hq, Hkv, W, G, true);
    kvt_layer_ctx a, g;
    KVT_CHECK(kvt_ctx_build_on(&t.in, &a, false, KVT_DECODE_PROBS_ALL, NULL));
    KVT_CHECK(kvt_ctx_build_on(&t.in, &g, false, KVT_DECODE_PROBS_GROUP, NULL));
    const int Gs = Hq / Hkv, nqd = Gs * G;
    const size_t rows = (size_t)Hq * G;
    KVT_EXPECT(!a.prd_one && g.prd_one == (Hkv > 1));
    KVT_EXPECT_MSG(big ? g.prd_rb < nqd && g.prd_rb * 2 >= nqd : g.prd_rb == nqd,
                   "T=%d G=%d: %d rows per call of %d", T, G, g.prd_rb, nqd);
    KVT_EXPECT(!memcmp(a.ad, g.ad, rows * D * sizeof(double)));
    KVT_EXPECT(!memcmp(a.lsed, g.lsed, rows * sizeof(double)));
    KVT_EXPECT(!memcmp(a.rsd, g.rsd, rows * sizeof(double)));
    KVT_EXPECT(!memcmp(a.pd_extra, g.pd_extra, rows * sizeof(double)));
    KVT_EXPECT(!memcmp(a.od_extra, g.od_extra, rows * D * sizeof(double)));
    KVT_EXPECT(!g.prd_one || g.prd_g == Hkv - 1); /* the build's last */
    int order[16], n = 0;
    order[n++] = 0, order[n++] = Hkv - 1, order[n++] = Hkv - 1;
    for (int k = 0; k < Hkv && n < 16; k++)
        order[n++] = k;
    order[n++] = 0;
    int bad = 0;
    for (int i = 0; i < n; i++) {
        KVT_CHECK(kvt_ctx_prd_group(&g, order[i]));
        for (size_t r = (size_t)order[i] * nqd; r < (size_t)(order[i] + 1) * nqd; r++)
            bad += memcmp(kvt_ctx_prd_row(&g, r), kvt_ctx_prd_row(&a, r), (size_t)T * 4) != 0;
    }
    KVT_EXPECT_MSG(bad == 0, "%d decode rows differ", bad);
    for (int pq = 0; pq < 2; pq++) {
        const int H = pq ? Hq : Hkv, P = T - W;
        double *ma = malloc((size_t)H * P * sizeof(double));
        double *mg = malloc((size_t)H * P * sizeof(double));
        KVT_CHECK(kvt_ctx_decode_means(&a, pq, P, ma));
        KVT_CHECK(kvt_ctx_decode_means(&g, pq, P, mg));
        KVT_EXPECT(!memcmp(ma, mg, (size_t)H * P * sizeof(double)));
        free(ma);
        free(mg);
    }
    KVT_EXPECT_STATUS(kvt_ctx_prd_group(&g, Hkv), Hkv > 1 ? KVT_ERR_INVALID_ARG : KVT_OK);
    kvt_ctx_free(&a);
    kvt_ctx_free(&g);
    tl_free(&t);
}

static void test_decode_groups(void)
{
    check_decode_groups(11, 90, 16, 6, 3, 5, 7, false);    /* 3 groups of 2 */
    check_decode_groups(12, 33, 8, 8, 8, 4, 3, false);     /* MHA: a group per head */
    check_decode_groups(13, 40, 8, 4, 1, 4, 5, false);     /* one group: nothing to hold apart */
    check_decode_groups(14, 5000, 16, 4, 2, 8, 400, true); /* 800 rows of 5400 f64 logits */
}

static void test_merge_budgets(void)
{
    enum { T = 60, D = 8, NB = 6 };
    test_layer t;
    tl_random(&t, 91, T, D, 4, 2, 4, 0, false);
    const int B[NB] = {40, 9, 20, 5, 70, 21};
    const char *spec[2] = {"snapkv:window=4,merge=pivot",
                           "snapkv:window=4,merge=weighted,heads=query"};
    for (int p = 0; p < 2; p++) {
        kvt_layer_selection *all = tl_select(&t.in, spec[p], B, NB);
        for (int b = 0; b < NB; b++) {
            kvt_layer_selection *one = tl_select(&t.in, spec[p], &B[b], 1);
            for (int h = 0; h < all->n_heads; h++)
                expect_same_merged(&all->merged[(size_t)b * all->n_heads + h], &one->merged[h], D,
                                   spec[p], B[b], h);
            kvt_layer_selection_free(one);
        }
        kvt_layer_selection_free(all);
    }
    kvt_layer_ctx c;
    KVT_CHECK(kvt_ctx_build(&t.in, &c));
    kvt_layer_selection *all = tl_select(&t.in, "keydiff-block:block=7", B, NB);
    /* not nested: a larger budget drops some token a smaller one keeps (else the fresh start
       would not run) */
    int not_nested = 0;
    for (int b = 0; b < NB; b++)
        for (int b2 = 0; b2 < NB; b2++) {
            if (B[b] >= B[b2] || B[b2] >= T)
                continue;
            char in[T] = {0};
            const int32_t *r2 = kvt_sel_ranking(all, b2, 0);
            for (int i = 0; i < all->count[b2 * all->n_heads]; i++)
                in[r2[i]] = 1;
            const int32_t *r = kvt_sel_ranking(all, b, 0);
            for (int i = 0; i < all->count[b * all->n_heads]; i++)
                not_nested += !in[r[i]];
        }
    KVT_EXPECT_MSG(not_nested > 0, "keydiff-block's sets are nested here");
    KVT_CHECK(kvt_sel_merge(&c, 'w', all));
    for (int b = 0; b < NB; b++) {
        kvt_layer_selection *one = tl_select(&t.in, "keydiff-block:block=7", &B[b], 1);
        KVT_CHECK(kvt_sel_merge(&c, 'w', one));
        for (int h = 0; h < all->n_heads; h++)
            expect_same_merged(&all->merged[(size_t)b * all->n_heads + h], &one->merged[h], D,
                               "keydiff-block", B[b], h);
        kvt_layer_selection_free(one);
    }
    kvt_layer_selection_free(all);
    kvt_ctx_free(&c);
    tl_free(&t);
}

/* finch, D = 1: window queries q = 1 (position 4) and -1 (position 5) over keys 1, -1, 0, 0, 0,
 * -.3165. P0 = (.447, .060, .164, .164, .164), P1 = (.049, .364, .134, .134, .134, .184).
 * SnapKV's mean ranks token 0 (.248) above token 1 (.212); FINCH weighs query i by T - W + i
 * = 4 and 5: token 0 1.017, token 1 1.032, so B = 3 keeps {1} and the window (weights 5 and 6,
 * one off, would keep token 0: 1.265 against 1.244); normalize=0 is SnapKV's. */
static void test_finch(void)
{
    const float k[6] = {1, -1, 0, 0, 0, -0.3165f}, v[6] = {0}, q[2] = {1, -1};
    kvt_layer_input in = layer1d(6, 2, 1, 1, k, v, q);
    const int B[] = {3, 4, 1};
    kvt_layer_selection *s = tl_select(&in, "finch:window=2", B, 3);
    EXPECT_KEPT(s, 0, 0, -1, "1,4,5");
    EXPECT_KEPT(s, 1, 0, -1, "0,1,4,5");
    EXPECT_KEPT(s, 2, 0, -1, "5"); /* B < W: the most recent */
    kvt_layer_selection_free(s);
    s = tl_select(&in, "finch:window=2,normalize=0", B, 1);
    EXPECT_KEPT(s, 0, 0, -1, "0,4,5");
    kvt_layer_selection_free(s);
    s = tl_select(&in, "snapkv:window=2,kernel=1", B, 1);
    EXPECT_KEPT(s, 0, 0, -1, "0,4,5");
    kvt_layer_selection_free(s);
    kvt_policy *p = mk("finch:window=3"); /* the trace holds 2 window queries */
    kvt_layer_selection *bad = NULL;
    KVT_EXPECT_STATUS(kvt_replay_layer_select(&in, p, B, 1, &bad), KVT_ERR_INVALID_ARG);
    kvt_policy_free(p);
}

/* cam, D = 1, every key 1 and both window queries 0: query 0 (position 4) spreads 1/5 over
 * tokens 0..4, query 1 1/6 over all six, so a = (.183, .183, .183, .183, .183, .083). ratio=0
 * (start 0), W = 2: every p_t = a_t / max(a[t], a[t+1]) = 1 for t = 0..3, so the draws and
 * their expectation agree and v = 1..6 becomes 1, 2.5, 4.75, 7.625, 11.1875, 9.8125 (each v_t,
 * as merged, adds v_t / 2 to the next two). B = 3 keeps the window and token 0 (ties), B = 6
 * all, merged; B = 7 > T all, unchanged. */
static void test_cam(void)
{
    const float k[6] = {1, 1, 1, 1, 1, 1}, v[6] = {1, 2, 3, 4, 5, 6}, q[2] = {0, 0};
    kvt_layer_input in = layer1d(6, 2, 1, 1, k, v, q);
    const int B[] = {3, 6, 7};
    const double want[6] = {1, 2.5, 4.75, 7.625, 11.1875, 9.8125};
    for (int e = 0; e < 2; e++) {
        kvt_layer_selection *s =
            tl_select(&in, e ? "cam:window=2,ratio=0,expected=1" : "cam:window=2,ratio=0", B, 3);
        EXPECT_KEPT(s, 0, 0, -1, "0,4,5");
        const kvt_merged_set *m = &s->merged[0];
        KVT_EXPECT(m->n == 3 && m->n_changed == 2 && !m->changed[0] &&
                   fabsf(m->v[0] - 11.1875f) < 1e-5f && fabsf(m->v[1] - 9.8125f) < 1e-5f);
        m = &s->merged[1];
        KVT_EXPECT(m->n == 6 && m->n_changed == 5);
        for (int j = 1; j < 6; j++)
            KVT_EXPECT_MSG(fabs(m->v[j - 1] - want[j]) < 1e-5, "B = 6 token %d: %g, want %g", j,
                           m->v[j - 1], want[j]);
        KVT_EXPECT(s->merged[2].n == 6 && s->merged[2].n_changed == 0);
        kvt_layer_selection_free(s);
    }
    kvt_layer_selection *s = tl_select(&in, "cam:window=2,ratio=1", B, 2); /* start = T */
    KVT_EXPECT(s->merged[1].n == 6 && s->merged[1].n_changed == 0);
    kvt_layer_selection_free(s);
}

/* lookm (LOOK-M's text prior), D = 1, 2 query heads on 1 KV head, column sums given; tokens 2..5
 * are image tokens. Group mean scores 5, 1, 3, 3, 4.5, 4.5, 1, 1: the text-prior ranking is the
 * text 0, 1, 6, 7 (ties to the lower index), then the images 4, 5, 2, 3. Budget B keeps the
 * floor(B/2) most recent tokens and the first B - R of that ranking before them. */
static void test_lookm(void)
{
    const float k[8] = {1, 0, 2, -1, 3, 0, 1, 2}, v[8] = {0};
    const float q[2] = {1, 1};
    const float cs[16] = {5, 1, 3, 3, 0, 0, 2, 1, /* head 1 */ 5, 1, 3, 3, 9, 9, 0, 1};
    const uint8_t mod[8] = {0, 0, 1, 1, 1, 1, 0, 0};
    kvt_layer_input in = layer1d(8, 1, 2, 1, k, v, q);
    in.attn_colsum = cs;
    in.modality = mod;
    const int B[] = {2, 4, 5, 7, 8};
    kvt_layer_selection *s = tl_select(&in, "lookm:merge=none", B, 5);
    EXPECT_KEPT(s, 0, 0, -1, "0,7");                    /* R = 1 */
    EXPECT_KEPT(s, 1, 0, -1, "0,1,6,7");                /* R = 2: 7, 6, then text 0, 1 */
    EXPECT_KEPT(s, 2, 0, -1, "0,1,4,6,7");              /* then the best image token */
    EXPECT_KEPT(s, 3, 0, -1, "0,1,2,4,5,6,7");          /* R = 3: 5 is recent; then 4, 2 */
    EXPECT_KEPT(s, 4, 0, -1, "0,1,2,3,4,5,6,7");        /* B = T */
    KVT_EXPECT(s->merged == NULL && s->border != NULL); /* a ranking per budget */
    kvt_layer_selection_free(s);
    /* the default merges (LOOK-M's pivot merge) over the same kept sets */
    s = tl_select(&in, "lookm", B, 5);
    KVT_EXPECT(s->merged != NULL && s->merged[1].n == 4);
    EXPECT_KEPT(s, 2, 0, -1, "0,1,4,6,7");
    kvt_layer_selection_free(s);
    /* no recent part: the ranking alone; all recent: the last B */
    s = tl_select(&in, "lookm:merge=none,recent_share=0", B, 3);
    EXPECT_KEPT(s, 0, 0, -1, "0,1");
    EXPECT_KEPT(s, 2, 0, -1, "0,1,4,6,7");
    kvt_layer_selection_free(s);
    s = tl_select(&in, "lookm:merge=none,recent_share=1", B, 3);
    EXPECT_KEPT(s, 1, 0, -1, "4,5,6,7");
    kvt_layer_selection_free(s);
    /* per query head, no recent part, B = 3: head 0's text scores 5, 1, 2, 1 keep 0, 6, 1;
       head 1's 5, 1, 0, 1 keep 0, 1, 7 (1 and 7 tie: the lower index) */
    const int B3[] = {3};
    s = tl_select(&in, "lookm:merge=none,recent_share=0,heads=query", B3, 1);
    EXPECT_KEPT(s, 0, 0, -1, "0,1,6");
    EXPECT_KEPT(s, 0, 1, -1, "0,1,7");
    kvt_layer_selection_free(s);
    /* without a modality table every token is text: H2O's order 0, 4, 5, 2, 3, 1, 6, 7 */
    in.modality = NULL;
    s = tl_select(&in, "lookm:merge=none", B, 2);
    EXPECT_KEPT(s, 1, 0, -1, "0,4,6,7");
    kvt_layer_selection_free(s);
    /* no column sums and no Q_all: refused, saying what to capture */
    in.attn_colsum = NULL;
    kvt_policy *p = mk("lookm");
    kvt_layer_selection *bad = NULL;
    KVT_EXPECT_STATUS(kvt_replay_layer_select(&in, p, B, 1, &bad), KVT_ERR_NOT_FOUND);
    KVT_EXPECT(strstr(kvt_error_msg(), "attn_colsum") && strstr(kvt_error_msg(), "Q_all"));
    kvt_policy_free(p);
    p = NULL;
    KVT_EXPECT_STATUS(kvt_policy_create("lookm:recent_share=1.5", NULL, &p), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_policy_create("lookm:window=8", NULL, &p), KVT_ERR_INVALID_ARG);
    KVT_EXPECT(p == NULL);
}

/* elastic-cache (Elastic Cache), D = 1, 2 query heads on 1 KV head, column sums given, k_j = j,
 * v_j = 10 j, sinks=2. The heads' mean scores of the tokens between the sinks and the last,
 * 2..8: 1, 5, 2, 2, 0, 4, 3; the ranking is 9, the sinks 0, 1, then 3, 7, 8, 4, 5, 2, 6. */
static void test_elastic_cache(void)
{
    const float k[10] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9};
    const float v[10] = {0, 10, 20, 30, 40, 50, 60, 70, 80, 90}, q[2] = {1, 1};
    const float cs[20] = {9, 9, 1, 6, 2, 3, 0, 4, 2, 1, /* head 1 */ 9, 9, 1, 4, 2, 1, 0, 4, 4, 1};
    kvt_layer_input in = layer1d(10, 1, 2, 1, k, v, q);
    in.attn_colsum = cs;
    const int B[] = {2, 3, 4, 6, 10};
    kvt_layer_selection *s = tl_select(&in, "elastic-cache:sinks=2", B, 5);
    KVT_EXPECT(s->merged != NULL && kvt_layer_selection_n_heads(s) == 1);
    EXPECT_KEPT(s, 0, 0, -1, "0,9"); /* no anchor: the rest is evicted */
    EXPECT_KEPT(s, 1, 0, -1, "0,1,9");
    EXPECT_KEPT(s, 2, 0, -1, "0,1,3,9");     /* 2, 4..8 all merge into anchor 3 */
    EXPECT_KEPT(s, 3, 0, -1, "0,1,3,7,8,9"); /* 2, 4, 5 into 3 (5: a tie, the earlier); 6 into 7 */
    EXPECT_KEPT(s, 4, 0, -1, "0,1,2,3,4,5,6,7,8,9");
    KVT_EXPECT(s->merged[0].n == 2 && s->merged[0].n_changed == 0);
    KVT_EXPECT(s->merged[1].n == 3 && s->merged[1].n_changed == 0);
    const kvt_merged_set *m = &s->merged[2];
    KVT_EXPECT(m->n == 4 && m->n_changed == 1 && m->changed[2] && m->idx[2] == 3);
    KVT_EXPECT_MSG(fabsf(m->k[0] - 5.0f) < 1e-6f && fabsf(m->v[0] - 50.0f) < 1e-5f,
                   "B = 4: anchor 3 merged to k %g v %g, want 5 and 50", m->k[0], m->v[0]);
    m = &s->merged[3];
    KVT_EXPECT(m->n == 6 && m->n_changed == 2 && m->changed[2] && m->changed[3] && !m->changed[4] &&
               !m->changed[0] && !m->changed[5]);
    KVT_EXPECT_MSG(fabsf(m->k[0] - 3.5f) < 1e-6f && fabsf(m->v[0] - 35.0f) < 1e-5f &&
                       fabsf(m->k[1] - 6.5f) < 1e-6f && fabsf(m->v[1] - 65.0f) < 1e-5f,
                   "B = 6: anchors 3, 7 merged to (%g, %g), (%g, %g)", m->k[0], m->v[0], m->k[1],
                   m->v[1]);
    KVT_EXPECT(s->merged[4].n == 10 && s->merged[4].n_changed == 0);
    kvt_layer_selection_free(s);
    /* one set per layer: per query head, each head keeps the same */
    s = tl_select(&in, "elastic-cache:sinks=2,heads=query", B, 4);
    KVT_EXPECT(kvt_layer_selection_n_heads(s) == 2);
    EXPECT_KEPT(s, 3, 0, -1, "0,1,3,7,8,9");
    EXPECT_KEPT(s, 3, 1, -1, "0,1,3,7,8,9");
    KVT_EXPECT(s->merged[3 * 2 + 1].n_changed == 2 &&
               fabsf(s->merged[3 * 2 + 1].k[1] - 6.5f) < 1e-6f);
    kvt_layer_selection_free(s);
    /* no sinks: 0 and 1 (score 9) are the anchors at B = 3, and 2..8 merge into 1 */
    s = tl_select(&in, "elastic-cache:sinks=0", B + 1, 1);
    EXPECT_KEPT(s, 0, 0, -1, "0,1,9");
    KVT_EXPECT(s->merged[0].n_changed == 1 && s->merged[0].changed[1] &&
               fabsf(s->merged[0].k[0] - 4.5f) < 1e-6f && fabsf(s->merged[0].v[0] - 45.0f) < 1e-5f);
    kvt_layer_selection_free(s);
    /* the default sinks (4) */
    s = tl_select(&in, "elastic-cache", B + 3, 1);
    /* the sinks 0..3 take no merges: 4, 5, 6 and 8 all go to the one anchor, 7 */
    EXPECT_KEPT(s, 0, 0, -1, "0,1,2,3,7,9");
    KVT_EXPECT(s->merged[0].n_changed == 1 && s->merged[0].changed[4] &&
               fabsf(s->merged[0].k[0] - 6.0f) < 1e-6f);
    kvt_layer_selection_free(s);
    /* merge=none: the same anchors, not merged (the ablation); merge=position is the default */
    s = tl_select(&in, "elastic-cache:sinks=2,merge=none", B, 5);
    KVT_EXPECT(s->merged == NULL);
    EXPECT_KEPT(s, 3, 0, -1, "0,1,3,7,8,9");
    kvt_layer_selection_free(s);
    s = tl_select(&in, "elastic-cache:sinks=2,merge=position", B, 5);
    KVT_EXPECT(s->merged != NULL && s->merged[3].n_changed == 2);
    kvt_layer_selection_free(s);
    /* no column sums and no Q_all: refused, saying what to capture */
    in.attn_colsum = NULL;
    kvt_policy *p = mk("elastic-cache");
    kvt_layer_selection *bad = NULL;
    KVT_EXPECT_STATUS(kvt_replay_layer_select(&in, p, B, 1, &bad), KVT_ERR_NOT_FOUND);
    KVT_EXPECT(strstr(kvt_error_msg(), "attn_colsum") && strstr(kvt_error_msg(), "Q_all"));
    kvt_policy_free(p);
    p = NULL;
    KVT_EXPECT_STATUS(kvt_policy_create("elastic-cache:window=8", NULL, &p), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_policy_create("elastic-cache:sinks=-1", NULL, &p), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_policy_create("snapkv:merge=position", NULL, &p), KVT_ERR_INVALID_ARG);
    KVT_EXPECT(strstr(kvt_error_msg(), "elastic-cache's own merge"));
    KVT_EXPECT(p == NULL);
}

/* leverage and compactor, D = 1, one head, no RoPE: keys 0, 5, 0, 1, 2, 3, 9, 0. Leverage is the
 * squared distance to the keys' mean (2.5) over their sum plus 1e-2, whatever the sketch: 6
 * (6.5^2), then 0, 1, 2, 7 (2.5^2, tied: the earlier first), 3, then 4 and 5. */
static void test_leverage_compactor(void)
{
    const float k[8] = {0, 5, 0, 1, 2, 3, 9, 0}, v[8] = {1, 1, 1, 1, 1, 1, 1, 1}, q[1] = {0};
    const float qa[8] = {0};
    const kvt_rope_info none = {.type = 0};
    kvt_layer_input in = layer1d(8, 1, 1, 1, k, v, q);
    in.rope = &none;
    const int B[] = {1, 5, 6};
    const char *lev[] = {"leverage", "leverage:sketch=0", "leverage:sketch=3,seed=9"};
    for (int i = 0; i < 3; i++) {
        kvt_layer_selection *s = tl_select(&in, lev[i], B, 3);
        EXPECT_KEPT(s, 0, 0, -1, "6");
        EXPECT_KEPT(s, 1, 0, -1, "0,1,2,6,7");
        EXPECT_KEPT(s, 2, 0, -1, "0,1,2,3,6,7");
        kvt_layer_selection_free(s);
    }
    /* compactor:sinks=1,recent=1: 0 and 7 protected; the middle 1..6 as a prompt of its own.
       Every query is 0, so each middle key gets one chunk's worth of attention (1) times ||v||
       = 1, pooled over 3 with zeros outside: 2/3 at 1 and 6, 1 inside. blend=0 ranks by that
       alone (2, 3, 4, 5 tie, then 1, 6); a large blend by the middle keys' leverage: their mean
       is 10/3, so 6, 2, 3, 1, 4, 5. */
    in.q_all = qa;
    const int C[] = {1, 2, 3, 4, 5};
    kvt_layer_selection *s = tl_select(&in, "compactor:sinks=1,recent=1,blend=0", C, 5);
    EXPECT_KEPT(s, 0, 0, -1, "0"); /* below the protected count: the earlier first */
    EXPECT_KEPT(s, 1, 0, -1, "0,7");
    EXPECT_KEPT(s, 2, 0, -1, "0,2,7");
    EXPECT_KEPT(s, 4, 0, -1, "0,2,3,4,7");
    kvt_layer_selection_free(s);
    s = tl_select(&in, "compactor:sinks=1,recent=1,blend=1000,sketch=0", C, 5);
    EXPECT_KEPT(s, 2, 0, -1, "0,6,7");
    EXPECT_KEPT(s, 3, 0, -1, "0,2,6,7");
    EXPECT_KEPT(s, 4, 0, -1, "0,2,3,6,7");
    kvt_layer_selection_free(s);
    /* the default blend is each budget's 1 - B/T: the same sets as blend=0.625 at B = 3
       (2 first: its leverage z 0.19 and attention z 0.65 beat 6's 1.93 and -1.29) and as
       blend=0.375 at B = 5 */
    s = tl_select(&in, "compactor:sinks=1,recent=1", C, 5);
    KVT_EXPECT(s->border != NULL); /* a ranking per budget */
    EXPECT_KEPT(s, 2, 0, -1, "0,2,7");
    const char *fixed[] = {"compactor:sinks=1,recent=1,blend=0.625",
                           "compactor:sinks=1,recent=1,blend=0.375"};
    for (int i = 0; i < 2; i++) {
        const int bi = i == 0 ? 2 : 4;
        char want[64];
        snprintf(want, sizeof(want), "%s", tl_kept_str(s, (size_t)bi, 0, -1));
        kvt_layer_selection *f = tl_select(&in, fixed[i], C, 5);
        const char *got = tl_kept_str(f, (size_t)bi, 0, -1);
        KVT_EXPECT_MSG(!strcmp(got, want), "%s at B = %d: {%s}, default {%s}", fixed[i], C[bi], got,
                       want);
        kvt_layer_selection_free(f);
    }
    kvt_layer_selection_free(s);
    /* refusals: compactor without Q_all, either without the trace's RoPE */
    kvt_policy *p = mk("compactor");
    kvt_layer_selection *bad = NULL;
    in.q_all = NULL;
    KVT_EXPECT_STATUS(kvt_replay_layer_select(&in, p, B, 1, &bad), KVT_ERR_NOT_FOUND);
    KVT_EXPECT(strstr(kvt_error_msg(), "Q_all"));
    kvt_policy_free(p);
    in.rope = NULL;
    p = mk("leverage");
    KVT_EXPECT_STATUS(kvt_replay_layer_select(&in, p, B, 1, &bad), KVT_ERR_NOT_FOUND);
    KVT_EXPECT(strstr(kvt_error_msg(), "leverage") && strstr(kvt_error_msg(), "model.rope"));
    kvt_policy_free(p);
    p = NULL;
    KVT_EXPECT_STATUS(kvt_policy_create("compactor:blend=-1", NULL, &p), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_policy_create("leverage:sketch=5000", NULL, &p), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_policy_create("compactor:window=4", NULL, &p), KVT_ERR_INVALID_ARG);
    KVT_EXPECT(p == NULL);
    KVT_CHECK(kvt_policy_create("compactor:blend=ratio", NULL, &p));
    kvt_policy_free(p);
}

/* vl-cache's layer budgets (kvt_vlcache_counts), worked by hand: L x B tokens in proportion to
 * the densities, each layer held to [1, T], the rest to the largest remainders. */
static void test_vlcache_counts(void)
{
    int n[3];
    const double d1[3] = {0.5, 0.25, 0.25}; /* 120 as 60, 30, 30 */
    KVT_CHECK(kvt_vlcache_counts(d1, 3, 100, 40, n));
    KVT_EXPECT_MSG(n[0] == 60 && n[1] == 30 && n[2] == 30, "%d %d %d", n[0], n[1], n[2]);
    /* 180 as 162, 9, 9: the first held at 100, its 62 shared by the others alike: 40 each */
    const double d2[3] = {0.9, 0.05, 0.05};
    KVT_CHECK(kvt_vlcache_counts(d2, 3, 100, 60, n));
    KVT_EXPECT_MSG(n[0] == 100 && n[1] == 40 && n[2] == 40, "%d %d %d", n[0], n[1], n[2]);
    /* 30 as 14.99, 14.99, 0.015: the last held at 1, 29 left as 14.5 and 14.5; the token the
       two halves leave goes to the lower layer */
    const double d3[3] = {1, 1, 0.001};
    KVT_CHECK(kvt_vlcache_counts(d3, 3, 100, 10, n));
    KVT_EXPECT_MSG(n[0] == 15 && n[1] == 14 && n[2] == 1, "%d %d %d", n[0], n[1], n[2]);
    /* 2 x 6 as 12/22 (9 and 13): 4.91, 7.09: 4 and 7, the last token to the larger remainder */
    const double d4[2] = {9.0 / 21, 13.0 / 21};
    KVT_CHECK(kvt_vlcache_counts(d4, 2, 8, 6, n));
    KVT_EXPECT_MSG(n[0] == 5 && n[1] == 7, "%d %d", n[0], n[1]);
    KVT_CHECK(kvt_vlcache_counts(d4, 2, 8, 8, n)); /* B >= T: everything */
    KVT_EXPECT(n[0] == 8 && n[1] == 8);
    KVT_CHECK(kvt_vlcache_counts(d4, 2, 8, 1, n)); /* every layer at least one token */
    KVT_EXPECT(n[0] == 1 && n[1] == 1);
    const double bad[2] = {0.5, 0};
    KVT_EXPECT_STATUS(kvt_vlcache_counts(bad, 2, 8, 4, n), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_vlcache_counts(d4, 0, 8, 4, n), KVT_ERR_INVALID_ARG);
}

/* aircache-like's layer weights (kvt_aircache_weights), worked by hand. Strengths 1, 2, 3 over
 * their mean 2: .5, 1, 1.5; skewnesses -1, 0, 2 shifted up by 1 to 0, 1, 3, over their mean 4/3:
 * 0, .75, 2.25; the means .25, .875, 1.875, over the largest: 2/15, 7/15, 1. */
static void test_aircache_weights(void)
{
    double w[3];
    const double st[3] = {1, 2, 3}, sk[3] = {-1, 0, 2};
    kvt_aircache_weights(st, sk, 3, w);
    KVT_EXPECT_MSG(fabs(w[0] - 2.0 / 15) < 1e-15 && fabs(w[1] - 7.0 / 15) < 1e-15 && w[2] == 1.0,
                   "%.17g %.17g %.17g", w[0], w[1], w[2]);
    /* no skewness above the shift (all equal, negative): that term is 1 for each layer */
    const double flat[3] = {-2, -2, -2};
    kvt_aircache_weights(st, flat, 3, w); /* (.5+1)/2, (1+1)/2, (1.5+1)/2 over 1.25 */
    KVT_EXPECT_MSG(fabs(w[0] - 0.6) < 1e-15 && fabs(w[1] - 0.8) < 1e-15 && w[2] == 1.0,
                   "%.17g %.17g %.17g", w[0], w[1], w[2]);
    /* a layer with neither strength nor skewness keeps a weight of 1e-12 (one token) */
    const double st0[2] = {0, 1}, sk0[2] = {0, 1};
    kvt_aircache_weights(st0, sk0, 2, w);
    KVT_EXPECT_MSG(w[0] == 1e-12 && w[1] == 1.0, "%.17g %.17g", w[0], w[1]);
    int n[2];
    KVT_CHECK(kvt_vlcache_counts(w, 2, 50, 10, n)); /* 20 visual tokens: 1 and 19 */
    KVT_EXPECT_MSG(n[0] == 1 && n[1] == 19, "%d %d", n[0], n[1]);
}

/* cake's layer budgets (kvt_cake_counts), worked by hand from cake/utils.py adjust_budgets:
 * T = 100, W = 10 (prefix 90), B = 60: (60 - 10) x L prefix tokens split by the preferences. */
static void test_cake(void)
{
    int n[4];
    /* 1, 1, 1, 7 of 200: 20, 20, 20, 140; 50 above 90 go to the first three, 16 each and the
       remainder 2 one each to the first two: 37, 37, 36, 90 */
    const double p1[4] = {1, 1, 1, 7};
    KVT_CHECK(kvt_cake_counts(p1, 4, 100, 10, 60, n));
    KVT_EXPECT_MSG(n[0] == 47 && n[1] == 47 && n[2] == 46 && n[3] == 100, "%d %d %d %d", n[0], n[1],
                   n[2], n[3]);
    /* 1, 2, 4 of 150: 21.4, 42.9, 85.7 truncated to 21, 42, 85 (148); the 2 left go one each to
       the first two layers below 90 */
    const double p2[3] = {1, 2, 4};
    KVT_CHECK(kvt_cake_counts(p2, 3, 100, 10, 60, n));
    KVT_EXPECT_MSG(n[0] == 32 && n[1] == 53 && n[2] == 95, "%d %d %d", n[0], n[1], n[2]);
    const double p0[3] = {0, 0, 0}; /* no preference: alike */
    KVT_CHECK(kvt_cake_counts(p0, 3, 100, 10, 60, n));
    KVT_EXPECT(n[0] == 60 && n[1] == 60 && n[2] == 60);
    KVT_CHECK(kvt_cake_counts(p2, 3, 100, 10, 8, n)); /* B <= W: the last B */
    KVT_EXPECT(n[0] == 8 && n[1] == 8 && n[2] == 8);
    KVT_CHECK(kvt_cake_counts(p2, 3, 100, 10, 90, n)); /* T <= B + W: all of it */
    KVT_EXPECT(n[0] == 100 && n[1] == 100 && n[2] == 100);
    KVT_EXPECT_STATUS(kvt_cake_counts(p2, 0, 100, 10, 60, n), KVT_ERR_INVALID_ARG);
    /* the budgets need every layer: one layer alone is refused; window=1 has no variance */
    const float k[6] = {1, 0, 2, -1, 3, 0}, v[6] = {0}, q[2] = {1, 1};
    kvt_layer_input in = layer1d(6, 2, 1, 1, k, v, q);
    kvt_policy *p = mk("cake:window=2");
    kvt_layer_selection *bad = NULL;
    const int B[1] = {3};
    KVT_EXPECT_STATUS(kvt_replay_layer_select(&in, p, B, 1, &bad), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_MSG(strstr(kvt_error_msg(), "replay the whole trace"), "%s", kvt_error_msg());
    kvt_policy_free(p);
    p = NULL;
    KVT_EXPECT_STATUS(kvt_policy_create("cake:window=1", NULL, &p), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_policy_create("cake:tau1=0", NULL, &p), KVT_ERR_INVALID_ARG);
    /* kvzip's threshold is over every layer's scores, which only the trace has: one layer alone
       is refused too (its kept sets: tests/oracle/test_kvzip_hand.py, test_kvzip.py) */
    p = mk("kvzip");
    KVT_EXPECT_STATUS(kvt_replay_layer_select(&in, p, B, 1, &bad), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_MSG(strstr(kvt_error_msg(), "replay the whole trace"), "%s", kvt_error_msg());
    kvt_policy_free(p);
    p = NULL;
    KVT_EXPECT_STATUS(kvt_policy_create("kvzip:window=2", NULL, &p), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_policy_create("kvzip:layerwise=2", NULL, &p), KVT_ERR_INVALID_ARG);
    /* chunkkv:reuse=N takes a layer's chunks from its group's first layer: one layer alone is
       refused (its kept sets: tests/oracle/test_chunkkv_reuse.py); reuse=1 runs alone */
    p = mk("chunkkv:window=2,chunk=2,reuse=2");
    KVT_EXPECT_STATUS(kvt_replay_layer_select(&in, p, B, 1, &bad), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_MSG(strstr(kvt_error_msg(), "replay the whole trace"), "%s", kvt_error_msg());
    kvt_policy_free(p);
    p = mk("chunkkv:window=2,chunk=2,reuse=1");
    KVT_CHECK(kvt_replay_layer_select(&in, p, B, 1, &bad));
    kvt_layer_selection_free(bad);
    bad = NULL;
    kvt_policy_free(p);
    p = NULL;
    KVT_EXPECT_STATUS(kvt_policy_create("chunkkv:reuse=0", NULL, &p), KVT_ERR_INVALID_ARG);
}

static void test_parse(void)
{
    kvt_policy **ps = NULL;
    size_t n = 0;
    KVT_CHECK(kvt_policy_list_parse("snapkv,adakv:alpha=0.3,alloc=b,snapkv:kernel=7,pool=max", NULL,
                                    &ps, &n));
    KVT_EXPECT(n == 3);
    KVT_EXPECT(!strcmp(kvt_policy_label(ps[1]), "adakv:alpha=0.3,alloc=b"));
    KVT_EXPECT(!strcmp(kvt_policy_label(ps[2]), "snapkv:kernel=7,pool=max"));
    char *js = kvt_policy_options_json(ps[2]);
    KVT_EXPECT(strstr(js, "\"kernel\": 7") && strstr(js, "\"pool\": \"max\""));
    kvt_free(js);
    kvt_policy_list_free(ps, n);
    KVT_EXPECT_STATUS(kvt_policy_list_parse("snapkv,snapkv", NULL, &ps, &n), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_policy_list_parse("kernel=3", NULL, &ps, &n), KVT_ERR_INVALID_ARG);
    /* Quest's page score is a max or a sum over the group; mean is refused, not read as max */
    KVT_EXPECT_STATUS(kvt_policy_list_parse("quest:group=mean", NULL, &ps, &n),
                      KVT_ERR_INVALID_ARG);
    KVT_CHECK(kvt_policy_list_parse("quest:group=sum,snapkv:reduce=mean", NULL, &ps, &n));
    kvt_policy_list_free(ps, n);
    /* a path cut at a comma is named as such, for every option that takes a path */
    KVT_EXPECT_STATUS(kvt_policy_list_parse("mixkv-snapkv:rtable=/tmp/a,b.json", NULL, &ps, &n),
                      KVT_ERR_INVALID_ARG);
    KVT_EXPECT_MSG(strstr(kvt_error_msg(), "a rtable= path may not contain a comma"), "%s",
                   kvt_error_msg());
    /* label=NAME, accepted by every policy: the label, not an option; labels are unique */
    KVT_CHECK(
        kvt_policy_list_parse("snapkv:kernel=7,label=k7,knorm:label=norms,snapkv", NULL, &ps, &n));
    KVT_EXPECT(n == 3 && !strcmp(kvt_policy_label(ps[0]), "k7") &&
               !strcmp(kvt_policy_label(ps[1]), "norms") &&
               !strcmp(kvt_policy_label(ps[2]), "snapkv"));
    js = kvt_policy_options_json(ps[0]);
    KVT_EXPECT(strstr(js, "\"kernel\": 7") && !strstr(js, "label"));
    kvt_free(js);
    kvt_policy_list_free(ps, n);
    const char *bad_labels[] = {
        "snapkv:label=a,knorm:label=a",
        "snapkv:label=knorm,knorm",
        "snapkv:label=a:b",
        "snapkv:label=a,label=b",
        "snapkv:label=",
        "snapkv:label=x\ty",
        "snapkv:label=0123456789012345678901234567890123456789012345678901234567890123456789"};
    for (size_t i = 0; i < sizeof(bad_labels) / sizeof(bad_labels[0]); i++)
        KVT_EXPECT_MSG(kvt_policy_list_parse(bad_labels[i], NULL, &ps, &n) == KVT_ERR_INVALID_ARG,
                       "'%s'", bad_labels[i]);
    kvt_budget *b = NULL;
    KVT_CHECK(kvt_budgets_parse("64,128,10%,12.5%", &b, &n));
    KVT_EXPECT(n == 4 && !b[0].is_fraction && b[2].is_fraction);
    KVT_EXPECT(kvt_budget_tokens(&b[1], 50) == 128);
    KVT_EXPECT(kvt_budget_tokens(&b[2], 1000) == 100);
    KVT_EXPECT(kvt_budget_tokens(&b[3], 100) == 13); /* 12.5 rounds half up */
    KVT_EXPECT(kvt_budget_tokens(&b[2], 3) == 1);    /* at least 1 */
    kvt_free(b);
    KVT_EXPECT_STATUS(kvt_budgets_parse("0", &b, &n), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_budgets_parse("64,", &b, &n), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_budgets_parse("101%", &b, &n), KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_budgets_parse("1.5", &b, &n), KVT_ERR_INVALID_ARG);
    /* plain decimals only: no hex, exponents, signs or spaces, which strtod would take */
    const char *odd[] = {"0x10", "1e2", "+8", " 8", "8 ", "5.", ".5%", "5.%", "1e1%"};
    for (size_t i = 0; i < sizeof(odd) / sizeof(odd[0]); i++)
        KVT_EXPECT_MSG(kvt_budgets_parse(odd[i], &b, &n) == KVT_ERR_INVALID_ARG, "'%s'", odd[i]);
    KVT_CHECK(kvt_budgets_parse("0.5%", &b, &n));
    kvt_free(b);
    /* a product on .5 rounds up exactly: P/100 in double made 0.205 * 300 = 61.4999... -> 61 */
    KVT_CHECK(kvt_budgets_parse("20.5%,28.5%,34.5%,56.5%,12.5%,0.25%,99.999%,100%", &b, &n));
    const int want_300[] = {62, 86, 104, 170, 38, 1, 300, 300};
    for (size_t i = 0; i < n; i++)
        KVT_EXPECT_MSG(kvt_budget_tokens(&b[i], 300) == want_300[i], "%s of 300: %d", b[i].text,
                       kvt_budget_tokens(&b[i], 300));
    KVT_EXPECT(kvt_budget_tokens(&b[5], 200) == 1);                 /* 0.5: half up */
    KVT_EXPECT(kvt_budget_tokens(&b[6], 2000000000) == 1999980000); /* no overflow */
    kvt_free(b);
    /* policy options take plain decimals too (window=1e1 and window=0x10 were 10 and 16, while
       --budgets refused both); a real option may have a fraction or an exponent */
    const char *bad_opt[] = {"snapkv:window=1e1", "snapkv:window=0x10", "snapkv:window=16.0",
                             "snapkv:window=+16", "adakv:alpha=0x0.8",  "adakv:alpha=inf",
                             "adakv:alpha=.",     "adakv:alpha=1e",     "random:seed=-1",
                             "random:seed=1e3",   "random:seed=+3",     "snapkv:"};
    for (size_t i = 0; i < sizeof(bad_opt) / sizeof(bad_opt[0]); i++) {
        kvt_policy *p = NULL;
        KVT_EXPECT_MSG(kvt_policy_create(bad_opt[i], NULL, &p) == KVT_ERR_INVALID_ARG, "'%s'",
                       bad_opt[i]);
        kvt_policy_free(p);
    }
    const char *good_opt[] = {"snapkv:window=16", "adakv:alpha=.5",
                              "adakv:alpha=1e-1", "adakv:alpha=0.25",
                              "adakv:alpha=1.",   "random:seed=18446744073709551615"};
    for (size_t i = 0; i < sizeof(good_opt) / sizeof(good_opt[0]); i++) {
        kvt_policy *p = NULL;
        KVT_EXPECT_MSG(kvt_policy_create(good_opt[i], NULL, &p) == KVT_OK, "'%s': %s", good_opt[i],
                       kvt_error_msg());
        kvt_policy_free(p);
    }
    KVT_EXPECT(kvt_policy_registry_size() == 45);
}

/* layer_weights=FILE (layer_weights.c): a text file of 70 weights (the reader grows past its
 * first 64), B_l = max(1, floor(B * w_l * L / sum(w) + 0.5)) by hand, a JSON array on a
 * one-layer-per-call replay, and the refusals. */
static void test_layer_weights(void)
{
    char path[512], spec[600], text[1024] = "# 70 layers\n";
    for (int i = 0; i < 69; i++)
        strcat(text, i % 2 ? "1,\n" : "1 ");
    strcat(text, "8 # the last\n");
    kvt_test_tmp(path, sizeof(path), "lw70.txt");
    write_file(path, text);
    snprintf(spec, sizeof(spec), "streamingllm:layer_weights=%s", path);
    kvt_policy *p = NULL;
    KVT_CHECK(kvt_policy_create(spec, NULL, &p));
    KVT_EXPECT(p->lw.n == 70 && p->lw.w[0] == 1 && p->lw.w[68] == 1 && p->lw.w[69] == 8);
    const int B[] = {1, 11, 77};
    const double f[] = {0.5, 0.5, 0.5};
    int Bl[3];
    double fl[3];
    /* sum 77, L 70: the last layer's w L / sum = 560/77 = 7.27: 7.27 -> 7, 80 -> 80, 560 */
    kvt_layer_budgets(&p->lw, 69, B, f, 3, Bl, fl);
    KVT_EXPECT_MSG(Bl[0] == 7 && Bl[1] == 80 && Bl[2] == 560, "%d %d %d", Bl[0], Bl[1], Bl[2]);
    KVT_EXPECT_NEAR(fl[0], 0.5 * 560 / 77, 1e-15);
    /* the others' 70/77 = 0.909: 0.909 -> 1, 10 -> 10, 70 -> 70 */
    kvt_layer_budgets(&p->lw, 0, B, NULL, 3, Bl, NULL);
    KVT_EXPECT_MSG(Bl[0] == 1 && Bl[1] == 10 && Bl[2] == 70, "%d %d %d", Bl[0], Bl[1], Bl[2]);
    kvt_policy_free(p);

    /* weights [2, 1, 1]: at B = 2 layer 0 keeps floor(2*2*3/4 + 0.5) = floor(3.5) = 3 (half up),
       layer 1 floor(1.5 + 0.5) = 2; streamingllm:sinks=1 then keeps 0,2,3 and 0,3 */
    kvt_test_tmp(path, sizeof(path), "lw3.json");
    write_file(path, "[2, 1, 1]\n");
    const float k[16] = {1, 2, 0, 1, 1, 0, 3, 1, 2, 1, 1, 0, 0, 1, 1, 2};
    const float q[16] = {1, 1, 1, 1, 2, 0, 1, 1, 0, 1, 1, 1, 1, 1, 0, 1};
    kvt_layer_input in = tl_layer(4, 4, 2, 1, 2, k, k, q);
    in.n_layers = 3;
    const int B2[] = {2};
    snprintf(spec, sizeof(spec), "streamingllm:sinks=1,layer_weights=%s", path);
    kvt_layer_selection *s = tl_select(&in, spec, B2, 1);
    EXPECT_KEPT(s, 0, 0, -1, "0,2,3");
    kvt_layer_selection_free(s);
    in.layer = 1;
    s = tl_select(&in, spec, B2, 1);
    EXPECT_KEPT(s, 0, 0, -1, "0,3");
    kvt_layer_selection_free(s);
    in.n_layers = 2; /* three weights, two layers */
    KVT_CHECK(kvt_policy_create(spec, NULL, &p));
    KVT_EXPECT_STATUS(kvt_replay_layer_select(&in, p, B2, 1, &s), KVT_ERR_INVALID_ARG);
    KVT_EXPECT(strstr(kvt_error_msg(), "has 3 weights; the trace has 2 layers"));
    kvt_policy_free(p);
    /* refusals when the policy is created */
    const struct {
        const char *text, *want;
    } bad[] = {{"1 0 1", "weight 1 is 0"},
               {"1 -1", "weight 1 is -1"},
               {"[1, x]", "'x' is not a number"},
               {"# none\n", "no weights"}};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        write_file(path, bad[i].text);
        KVT_EXPECT_STATUS(kvt_policy_create(spec, NULL, &p), KVT_ERR_INVALID_ARG);
        KVT_EXPECT_MSG(strstr(kvt_error_msg(), bad[i].want), "%s: %s", bad[i].text,
                       kvt_error_msg());
    }
    snprintf(spec, sizeof(spec), "pyramidkv:layer_weights=%s", path);
    KVT_EXPECT_STATUS(kvt_policy_create(spec, NULL, &p), KVT_ERR_INVALID_ARG);
    KVT_EXPECT(strstr(kvt_error_msg(), "shares the budget out over the layers itself"));
}

/* chunk_length=C (chunk_length.c) by hand. T = 4, one KV head, keys with squared norms 6, 11,
 * 6, 6: knorm ranks 0, 2, 3, 1 (ties to the earlier token). chunk_length=2 cuts [0, 1], [2, 3]:
 * at B = 1 (f = 0.25) each chunk keeps max(1, int(0.5)) = 1, token 0 and token 2, where the
 * plain policy keeps token 0 alone; at B = 2 (f = 0.5) the same; at B = 3 (f = 0.75) int(1.5)
 * = 1 again; at B = 4 everything. keydiff-block (a ranking per budget) keeps 1 per chunk too. */
static void test_chunk_length(void)
{
    const float k[16] = {1, 2, 0, 1, 1, 0, 3, 1, 2, 1, 1, 0, 0, 1, 1, 2};
    const float q[16] = {1, 1, 1, 1, 2, 0, 1, 1, 0, 1, 1, 1, 1, 1, 0, 1};
    kvt_layer_input in = tl_layer(4, 4, 2, 1, 2, k, k, q);
    const int B[] = {1, 2, 3, 4};
    kvt_layer_selection *s = tl_select(&in, "knorm", B, 1);
    EXPECT_KEPT(s, 0, 0, -1, "0");
    kvt_layer_selection_free(s);
    s = tl_select(&in, "knorm:chunk_length=2", B, 4);
    EXPECT_KEPT(s, 0, 0, -1, "0,2");
    EXPECT_KEPT(s, 1, 0, -1, "0,2");
    EXPECT_KEPT(s, 2, 0, -1, "0,2");
    EXPECT_KEPT(s, 3, 0, -1, "0,1,2,3");
    kvt_layer_selection_free(s);
    s = tl_select(&in, "keydiff-block:block=2,chunk_length=2", B, 3);
    KVT_EXPECT(s->border && s->count[0] == 2 && s->count[1] == 2 && s->count[2] == 2);
    for (int b = 0; b < 3; b++) {
        const int32_t *r = kvt_sel_ranking(s, b, 0);
        KVT_EXPECT_MSG((r[0] < 2) != (r[1] < 2), "budget %d: %d and %d in one chunk", b, r[0],
                       r[1]);
    }
    kvt_layer_selection_free(s);
}

/* chunk_scores=own by hand: keydiff over T = 6 keys (1,0), (1,0), (0,1) | (0,1), (0,1), (1,0),
 * chunk_length=3, B = 3 (f = 0.5: int(1.5) = 1 per chunk). The prompt's mean unit key is
 * (1/2, 1/2), every key equally like it: the ties keep the earlier token, 0 and 3. Each
 * chunk's own mean is (2/3, 1/3) and (1/3, 2/3): the least like it are tokens 2 and 5. */
static void test_chunk_scores(void)
{
    const float k[12] = {1, 0, 1, 0, 0, 1, 0, 1, 0, 1, 1, 0};
    const float q[2] = {1, 1};
    kvt_layer_input in = tl_layer(6, 2, 1, 1, 1, k, k, q);
    const int B[] = {3, 6};
    kvt_layer_selection *s = tl_select(&in, "keydiff:chunk_length=3", B, 2);
    EXPECT_KEPT(s, 0, 0, -1, "0,3");
    EXPECT_KEPT(s, 1, 0, -1, "0,1,2,3,4,5");
    kvt_layer_selection_free(s);
    s = tl_select(&in, "keydiff:chunk_length=3,chunk_scores=own", B, 2);
    EXPECT_KEPT(s, 0, 0, -1, "2,5");
    EXPECT_KEPT(s, 1, 0, -1, "0,1,2,3,4,5");
    kvt_layer_selection_free(s);
    /* window=1 keeps each chunk's last token first: 2 and 5 again, then at B = 4 (int(2) = 2
       per chunk) the next of each chunk's own ranking, 0 and 5's chunk's 3 */
    const int B4[] = {4};
    s = tl_select(&in, "keydiff:chunk_length=3,chunk_scores=own,window=1", B4, 1);
    EXPECT_KEPT(s, 0, 0, -1, "0,2,3,5");
    kvt_layer_selection_free(s);
    /* snapkv reads each chunk's last queries: Q_all, which this input lacks */
    kvt_policy *p = NULL;
    KVT_CHECK(kvt_policy_create("snapkv:window=1,chunk_length=3,chunk_scores=own", NULL, &p));
    kvt_layer_selection *x = NULL;
    KVT_EXPECT_STATUS(kvt_replay_layer_select(&in, p, B, 2, &x), KVT_ERR_NOT_FOUND);
    KVT_EXPECT(x == NULL && strstr(kvt_error_msg(), "Q_all"));
    kvt_policy_free(p);
    KVT_EXPECT_STATUS(kvt_policy_create("knorm:chunk_scores=own", NULL, &p), KVT_ERR_INVALID_ARG);
    KVT_EXPECT(strstr(kvt_error_msg(), "is an option of chunk_length="));
}

int main(void)
{
    test_snapkv();
    test_gqa();
    test_pyramid();
    test_adakv();
    test_positions_and_norms();
    test_tova_h2o_oracle();
    test_chunkkv();
    test_random();
    test_sparsemm_and_mixkv();
    test_mixkv_sparsemm();
    test_quest();
    test_decoding();
    test_decoding_layer();
    test_like_policies();
    test_qfilter();
    test_cur();
    test_adaptive_scores();
    test_keydiff_block();
    test_critical();
    test_duo_attention();
    test_simlayerkv();
    test_merge();
    test_merge_budgets();
    test_decode_groups();
    test_think();
    test_layer_weights();
    test_chunk_length();
    test_chunk_scores();
    test_finch();
    test_cam();
    test_lookm();
    test_elastic_cache();
    test_leverage_compactor();
    test_cake();
    test_vlcache_counts();
    test_aircache_weights();
    test_parse();
    return kvt_test_result("test_replay_policies");
}
