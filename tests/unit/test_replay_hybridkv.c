/* test_replay_hybridkv.c - hybridkv-like (POLICIES §9) on tiny hand-worked layers: k_theta and
 * the static/dynamic split (median, tau, theta), the top-down allocation (split r, the static
 * floor and sigma shares with their leftovers, dynamic caps in whole chunks, odd remainders),
 * text-prior static heads (text first by unpooled attention, vision by pooled attention, text
 * window queries only),
 * dynamic heads' chunks by sum or max and their per-decode-step re-selection (reference and fast
 * kernels), GQA, short prompts, B < W and refused options.
 * Keys are 1-D (D = 1, scale 1), so a logit is q * k. A "big" key (20) takes all of a query's
 * mass against keys of 0 (e^-20), so a head with n big prefix keys has k_theta = ceil(0.9 n).
 */
#include "replay_test_util.h"

#define BIG 20.0f

/* D=1 layer; values = keys (unused by the selection) */
static kvt_layer_input lay(int T, int W, int G, int Hq, int Hkv, const float *k, const float *qw,
                           const float *qd, const uint8_t *mod)
{
    kvt_layer_input in = tl_layer(T, 1, Hq, Hkv, W, k, k, qw);
    in.G = G, in.q_decode = qd, in.modality = mod;
    return in;
}

/* row [T] of keys: 0 except BIG at the listed positions (list ends with -1) */
static void big_at(float *row, int T, const int *pos)
{
    for (int j = 0; j < T; j++)
        row[j] = 0.0f;
    for (; *pos >= 0; pos++)
        row[*pos] = BIG;
}

/* bit h set when head h is dynamic (re-selects per decode step) */
static unsigned dyn_mask(const kvt_layer_selection *s)
{
    unsigned m = 0;
    for (int h = 0; h < kvt_layer_selection_n_heads(s); h++)
        m |= kvt_layer_selection_head_per_step(s, h) ? 1u << h : 0u;
    return m;
}

#define EXPECT_COUNTS4(s, b, c0, c1, c2, c3)                                                       \
    KVT_EXPECT_MSG(tl_count(s, b, 0) == (c0) && tl_count(s, b, 1) == (c1) &&                       \
                       tl_count(s, b, 2) == (c2) && tl_count(s, b, 3) == (c3),                     \
                   "counts %d %d %d %d, want %d %d %d %d", tl_count(s, b, 0), tl_count(s, b, 1),   \
                   tl_count(s, b, 2), tl_count(s, b, 3), c0, c1, c2, c3)

/* Layer L1: T=12, W=2, P=10, 4 heads, every query q=1. Big prefix keys per head:
 *   h0 {3}: k_theta 1, rho .1, sigma .9      h1 {0,4,5,7,9}: k 5, rho .5, sigma .5
 *   h2 {1,6,7,8}: k 4 (3 = .75 < .9), rho .4, sigma .6
 *   h3 {0..7}: k 8 (7 = .875 < .9), rho .8, sigma .2
 * With theta=0.7: h1 k 4 (.8; 3 = .6), h2 k 3 (.75), h3 k 6 (.75; 5 = .625): rho .1 .4 .3 .6 */
static float L1k[4 * 12], L1q[4 * 2], L1qd[4];
static void mk_l1(kvt_layer_input *in)
{
    static const int b0[] = {3, -1}, b1[] = {0, 4, 5, 7, 9, -1}, b2[] = {1, 6, 7, 8, -1},
                     b3[] = {0, 1, 2, 3, 4, 5, 6, 7, -1};
    const int *bs[4] = {b0, b1, b2, b3};
    for (int h = 0; h < 4; h++)
        big_at(L1k + h * 12, 12, bs[h]);
    for (int i = 0; i < 8; i++)
        L1q[i] = 1.0f;
    memset(L1qd, 0, sizeof(L1qd)); /* one decode step, only to read the classification */
    *in = lay(12, 2, 1, 4, 4, L1k, L1q, L1qd, NULL);
}

static void test_classify(void)
{
    kvt_layer_input in;
    mk_l1(&in);
    const int B[] = {9};
    static const struct {
        const char *opt;
        unsigned dyn;
    } cases[] = {
        {"", 0xA},                   /* median: the 2 lowest rho (h0 .1, h2 .4) are static */
        {",tau=median", 0xA},        /* the same, spelled out */
        {",tau=0.5", 0x8},           /* rho <= .5: h1 (exactly .5) is static too */
        {",tau=0.45", 0xA},          /* h1 .5 > .45 */
        {",tau=0.1", 0xE},           /* only h0 (rho exactly .1) */
        {",tau=0.4", 0xA},           /* h2 .4 static, h1 .5 not */
        {",tau=0.4,theta=0.7", 0x8}, /* theta .7: h1 rho .4 joins the static heads */
        {",tau=0", 0xF},             /* every rho > 0: all dynamic */
        {",tau=1", 0x0},             /* all static */
    };
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        char spec[128];
        snprintf(spec, sizeof(spec), "hybridkv-like:window=2,chunk=2,kernel=1%s", cases[c].opt);
        kvt_layer_selection *s = tl_select(&in, spec, B, 1);
        KVT_EXPECT(kvt_layer_selection_n_steps(s) == 1);
        KVT_EXPECT_MSG(dyn_mask(s) == cases[c].dyn, "%s: dynamic heads 0x%x, want 0x%x", spec,
                       dyn_mask(s), cases[c].dyn);
        kvt_layer_selection_free(s);
    }
    /* "reaches" theta counts: T=9, W=1, keys 0: the 8 prefix tokens hold f = p(1/9) each,
     * exactly, and theta .5 of 8f is 4f = the mass of 4 tokens: k_theta 4, rho .5 <= tau .5 */
    float k1[9] = {0}, q1[1] = {1}, qd1[1] = {0};
    kvt_layer_input in1 = lay(9, 1, 1, 1, 1, k1, q1, qd1, NULL);
    kvt_layer_selection *s = tl_select(&in1, "hybridkv-like:window=1,theta=0.5,tau=0.5", B, 1);
    KVT_EXPECT(dyn_mask(s) == 0x0);
    kvt_layer_selection_free(s);
    /* odd H=3 with a tie: rho h0 .5 {0..4}, h1 .2 {2,3}, h2 .5 {5..9}; ceil(3/2) = 2 static:
     * h1, then h0 wins the tie at .5 over h2 (lower head) */
    float k3[3 * 12], q3[6] = {1, 1, 1, 1, 1, 1}, qd3[3] = {0};
    static const int t0[] = {0, 1, 2, 3, 4, -1}, t1[] = {2, 3, -1}, t2[] = {5, 6, 7, 8, 9, -1};
    big_at(k3, 12, t0);
    big_at(k3 + 12, 12, t1);
    big_at(k3 + 24, 12, t2);
    kvt_layer_input in3 = lay(12, 2, 1, 3, 3, k3, q3, qd3, NULL);
    s = tl_select(&in3, "hybridkv-like:window=2,chunk=2,kernel=1", B, 1);
    KVT_EXPECT(dyn_mask(s) == 0x4);
    /* b=7, H*b = 21 (odd): static floor(.5*21) = 10, dynamic 11 (the odd token). Static floor
     * floor(.2*7) = 1 each, rem 8 by sigma (h0 .5, h1 .8; sum 1.3): h0 floor(3.08) = 3,
     * h1 floor(4.92) = 4, leftover 1 -> h1 (highest sigma): caps h0 4, h1 6 (sum 10).
     * h2: 11/1 = 11 -> 5 chunks of 2 = the whole prefix. */
    KVT_EXPECT(tl_count(s, 0, 0) == 6 && tl_count(s, 0, 1) == 8 && tl_count(s, 0, 2) == 12);
    EXPECT_KEPT(s, 0, 0, -1, "0,1,2,3,10,11");     /* 5 equal big keys: lower first */
    EXPECT_KEPT(s, 0, 1, -1, "0,1,2,3,4,5,10,11"); /* 2, 3, then keys 0 by index */
    kvt_layer_selection_free(s);
}

static void test_alloc(void)
{
    kvt_layer_input in;
    mk_l1(&in);
    const int B[] = {9, 1, 2, 13};
    /* B=9: b=7, H*b = 28 -> static (h0, h2) floor(.5*28) = 14, dynamic (h1, h3) 14.
     * Static: floor floor(.2*7) = 1 each, rem 12 by sigma .9 : .6 -> h0 floor(7.2) = 7,
     * h2 floor(4.8) = 4, leftover 1 -> h0: caps 9 and 5 (sum 14 = the static share).
     * Dynamic: 14/2 = 7 per head -> floor(7/2) = 3 chunks of C=2 = 6 (1 lost per head). */
    kvt_layer_selection *s = tl_select(&in, "hybridkv-like:window=2,chunk=2,kernel=1", B, 4);
    EXPECT_COUNTS4(s, 0, 2 + 9, 2 + 6, 2 + 5, 2 + 6);
    KVT_EXPECT(tl_count(s, 0, 0) + tl_count(s, 0, 2) - 2 * 2 == 14); /* the static share */
    EXPECT_KEPT(s, 0, 0, -1, "0,1,2,3,4,5,6,7,8,10,11");             /* 3, then keys 0 by index */
    EXPECT_KEPT(s, 0, 2, -1, "0,1,6,7,8,10,11");                     /* 1,6,7,8, then 0 */
    /* h1 chunk sums: {4,5} two big; {0,1} {6,7} {8,9} one each (exact tie, lower chunk) */
    EXPECT_KEPT(s, 0, 1, -1, "0,1,4,5,6,7,10,11");
    EXPECT_KEPT(s, 0, 3, -1, "0,1,2,3,4,5,10,11"); /* four chunks of two big: the first 3 */
    for (int h = 0; h < 4; h++) {
        EXPECT_KEPT(s, 1, h, -1, "11");                               /* B=1 < W: the last token */
        EXPECT_KEPT(s, 2, h, -1, "10,11");                            /* B=W: the window only */
        EXPECT_KEPT(s, 3, h, -1, "0,1,2,3,4,5,6,7,8,9,10,11");        /* B > T: all */
        EXPECT_KEPT(s, 1, h, 0, h == 1 || h == 3 ? "11" : "(error)"); /* per-step: dynamic */
    }
    kvt_layer_selection_free(s);
    static const struct {
        const char *opt;
        int c[4];
    } cases[] = {
        /* split .3: static floor(8.4) = 8: 1 + floor(6*.6 = 3.6) + 1 leftover = 5, 1 + 2 = 3;
         * dynamic 20/2 = 10 = 5 chunks = the whole prefix */
        {",chunk=2,split=0.3", {2 + 5, 12, 2 + 3, 12}},
        /* split .75: static 21, 1 each, rem 19: h0 1 + floor(19*.6 = 11.4) = 12 > P = 10 ->
         * 10 (9 given), h2 1 + floor(7.6) = 8; rem 3 to h2 alone: 8 + 3 > P -> 10; the last 1
         * no static head can hold goes to the dynamic heads: 7 + 1 = 8, 4 each -> 2 chunks */
        {",chunk=2,split=0.75", {12, 2 + 4, 12, 2 + 4}},
        /* split 0: static 0 (the floor of 1 each is lowered to 0/2); dynamic 28/2 -> all */
        {",chunk=2,split=0", {2, 12, 2, 12}},
        /* split 1: 1 + floor(26*.6) = 16 -> P, 1 + floor(10.4) = 11 -> P: 18 of 26 given,
         * the other 8 to the dynamic heads (share 0): 4 each -> 2 chunks */
        {",chunk=2,split=1", {12, 2 + 4, 12, 2 + 4}},
        /* floor .5: 3 each, rem 8: h0 3 + floor(4.8) + 1 = 8, h2 3 + floor(3.2) = 6 */
        {",chunk=2,floor=0.5", {2 + 8, 8, 2 + 6, 8}},
        {",chunk=2,floor=1", {2 + 7, 8, 2 + 7, 8}}, /* 7 each = the whole static share: uniform */
        /* tau=1, all static, share 28: 1 each, rem 24 by sigma .9 .5 .6 .2 (sum 2.2):
         * 9.8 5.5 6.5 2.2 -> 9 5 6 2 (h0 at P = 10), 2 leftovers by sigma skipping h0 (full):
         * h2 then h1 -> 10 7 8 3, all 28 kept */
        {",chunk=2,tau=1", {12, 2 + 7, 2 + 8, 2 + 3}},
        /* C=4: 7/4 = 1 chunk; h1 {4..7} has 3 big; h3 {0..3} and {4..7} tie: the first.
         * P=10: the last chunk {8,9} is partial */
        {",chunk=4", {2 + 9, 2 + 4, 2 + 5, 2 + 4}},
    };
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        char spec[128];
        snprintf(spec, sizeof(spec), "hybridkv-like:window=2,kernel=1%s", cases[c].opt);
        kvt_layer_selection *t = tl_select(&in, spec, B, 1);
        KVT_EXPECT_MSG(tl_count(t, 0, 0) == cases[c].c[0] && tl_count(t, 0, 1) == cases[c].c[1] &&
                           tl_count(t, 0, 2) == cases[c].c[2] && tl_count(t, 0, 3) == cases[c].c[3],
                       "%s: counts %d %d %d %d", spec, tl_count(t, 0, 0), tl_count(t, 0, 1),
                       tl_count(t, 0, 2), tl_count(t, 0, 3));
        if (!strcmp(cases[c].opt, ",chunk=4")) {
            EXPECT_KEPT(t, 0, 1, -1, "4,5,6,7,10,11");
            EXPECT_KEPT(t, 0, 3, -1, "0,1,2,3,10,11");
        }
        kvt_layer_selection_free(t);
    }
    /* B = T = 12: b = P = 10, static 20: 2 each, rem 16: h0 2 + floor(9.6) = 11 -> P (8 given),
     * h2 2 + floor(6.4) = 8, the last 2 to h2 -> P; dynamic 20/2 = 10 = 5 chunks: every head
     * keeps the whole layer (the excess over P is not lost) */
    const int BT[] = {12};
    s = tl_select(&in, "hybridkv-like:window=2,chunk=2,kernel=1", BT, 1);
    EXPECT_COUNTS4(s, 0, 12, 12, 12, 12);
    kvt_layer_selection_free(s);
    /* a head that lands exactly on P is full too: tau=1, floor 0, B = 10: b = 8, share 32 by
     * sigma .9 .5 .6 .2 (2.2): 13 -> P, 7, 8, 2 (rem 5); h1 h2 h3 by .5 .6 .2 (1.3): +1, +2
     * (h2 exactly P), +0 (rem 2); h1 h3 by .5 .2: +1, +0; the last 1 to h1 by sigma -> P.
     * (Not counting h2 as full gave the last 2 one each to h1 and h3: 10 9 10 3.) */
    const int B10[] = {10};
    s = tl_select(&in, "hybridkv-like:window=2,chunk=2,kernel=1,tau=1,floor=0", B10, 1);
    EXPECT_COUNTS4(s, 0, 12, 12, 12, 2 + 2);
    kvt_layer_selection_free(s);
}

/* Layer L2: T=14, W=2, one head (static: ceil(1/2) = 1, and all H*b goes to it: cap = b).
 * Text 0..3 (keys 1 3 2 0), image 4..11 (keys 0 3 0 0 1 6 .5 0), window text (0 0). */
static void test_static(void)
{
    float k[14] = {1, 3, 2, 0, 0, 3, 0, 0, 1, 6, 0.5f, 0, 0, 0}, q[2] = {1, 1};
    uint8_t mod[14] = {0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0};
    kvt_layer_input in = lay(14, 2, 0, 1, 1, k, q, NULL, mod);
    const int B[] = {9, 4, 6};
    /* kernel 3 avg, in units of e^k: image 9 (e^1 + e^6 + e^.5 = 407.8) > 8 (1 + e + e^6 =
     * 407.1) > 10 (e^6 + e^.5 + 1 = 406.1) > 4, 5, 6 (~22.1): b=7 = 4 text + {8, 9, 10};
     * unpooled it would be 9, then 5 (e^3) */
    kvt_layer_selection *s = tl_select(&in, "hybridkv-like:window=2,kernel=3", B, 3);
    KVT_EXPECT(dyn_mask(s) == 0 && kvt_layer_selection_n_steps(s) == 0);
    EXPECT_KEPT(s, 0, 0, -1, "0,1,2,3,8,9,10,12,13");
    EXPECT_KEPT(s, 2, 0, -1, "0,1,2,3,12,13"); /* b=4: all text, not the image peak at 9 */
    kvt_layer_selection_free(s);
    /* kernel 1: more text tokens (4) than the cap (b=2): text by a, 1 (e^3) and 2 (e^2);
     * b=7: the text, then image by a: 9, 5, 8 */
    s = tl_select(&in, "hybridkv-like:window=2,kernel=1", B, 3);
    EXPECT_KEPT(s, 0, 0, -1, "0,1,2,3,5,8,9,12,13");
    EXPECT_KEPT(s, 1, 0, -1, "1,2,12,13");
    kvt_layer_selection_free(s);
    /* text beyond the cap ranks by the unpooled a (POLICIES §9 step 6), only the vision tokens
     * by the pooled one: T=10, W=2, text 0..3 (keys 2 0 1 0), image 4..7 (6 0 0 0). b=2 keeps
     * text 0 (e^2) and 2 (e^1); pooled (kernel 3) it would be 3 (e^6 next door) and 1 */
    {
        float k3[10] = {2, 0, 1, 0, 6, 0, 0, 0, 0, 0}, q3[2] = {1, 1};
        uint8_t mod3[10] = {0, 0, 0, 0, 1, 1, 1, 1, 0, 0};
        kvt_layer_input in3 = lay(10, 2, 0, 1, 1, k3, q3, NULL, mod3);
        const int B4[] = {4};
        s = tl_select(&in3, "hybridkv-like:window=2,kernel=3", B4, 1);
        EXPECT_KEPT(s, 0, 0, -1, "0,2,8,9");
        kvt_layer_selection_free(s);
    }
    /* no modality table: everything is text, a plain ranking by a: 9, 1 = 5 (tie: lower first),
     * 2, 0 = 8, 10 */
    in.modality = NULL;
    s = tl_select(&in, "hybridkv-like:window=2,kernel=1", B, 1);
    EXPECT_KEPT(s, 0, 0, -1, "0,1,2,5,8,9,10,12,13");
    kvt_layer_selection_free(s);

    /* only the text window queries score: keys 3 (token 0) and -5 (token 1), the rest 0;
     * window query 10 (q=-1) is image, query 11 (q=+1) text. Text only: token 0 (p .67).
     * Both (no modality, or no text query in the window): token 1, mean .47 (.94 from query
     * 10: e^5/(e^5 + e^-3 + 9)) over token 0's .33 (.67/2) */
    float k2[12] = {3, -5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, q2[2] = {-1, 1};
    uint8_t mod2[12] = {0};
    mod2[10] = 1;
    kvt_layer_input in2 = lay(12, 2, 0, 1, 1, k2, q2, NULL, mod2);
    const int B3[] = {3};
    s = tl_select(&in2, "hybridkv-like:window=2,kernel=1", B3, 1);
    EXPECT_KEPT(s, 0, 0, -1, "0,10,11");
    kvt_layer_selection_free(s);
    mod2[11] = 2; /* video: no text query left, both count */
    s = tl_select(&in2, "hybridkv-like:window=2,kernel=1", B3, 1);
    EXPECT_KEPT(s, 0, 0, -1, "1,10,11");
    kvt_layer_selection_free(s);
    in2.modality = NULL;
    s = tl_select(&in2, "hybridkv-like:window=2,kernel=1", B3, 1);
    EXPECT_KEPT(s, 0, 0, -1, "1,10,11");
    kvt_layer_selection_free(s);
}

/* Layer L4: one head made dynamic by tau=0, T=12, W=2, P=10, C=3: chunks {0,1,2} {3,4,5}
 * {6,7,8} and the partial {9}. Keys 10 10 .5 | 0 10.5 0 | 1 -3 0 | 10.25, window 0 0.
 * Chunk sums of e^k: 2e^10 = 44052 > e^10.5 = 36316 > e^10.25 = 28283 > ~4 (c0 c1 c3 c2);
 * maxima: c1 > c3 > c0 > c2. Decode step 0 (q=+1), max logit per chunk 10 10.5 1 10.25:
 * c1 c3 c0 c2; step 1 (q=-1): max(-k) = -.5 0 3 -10.25: c2 c1 c0 c3 (c0 under c1: maxima start at
 * -inf, not 0). */
static void test_dynamic(void)
{
    float k[12] = {10, 10, 0.5f, 0, 10.5f, 0, 1, -3, 0, 10.25f, 0, 0}, q[2] = {1, 1};
    float qd[2] = {1, -1};
    kvt_layer_input in = lay(12, 2, 2, 1, 1, k, q, qd, NULL);
    const int B[] = {8, 6, 4, 11, 13, 1}; /* b = 6, 4, 2, 9 -> 2, 1, 0, 3 chunks; all; B < W */
    for (int ref = 0; ref < 2; ref++) {
        kvt_kernels_use_ref(ref == 1); /* the step scores have a fast path and a reference */
        kvt_layer_selection *s = tl_select(&in, "hybridkv-like:window=2,chunk=3,tau=0", B, 6);
        KVT_EXPECT(kvt_layer_selection_head_per_step(s, 0) && kvt_layer_selection_has_fixed(s));
        KVT_EXPECT(kvt_layer_selection_n_steps(s) == 2);
        EXPECT_KEPT(s, 0, 0, -1, "0,1,2,3,4,5,10,11"); /* sum: c0 c1 */
        EXPECT_KEPT(s, 1, 0, -1, "0,1,2,10,11");
        EXPECT_KEPT(s, 2, 0, -1, "10,11"); /* b=2 < C: no whole chunk fits */
        EXPECT_KEPT(s, 3, 0, -1, "0,1,2,3,4,5,9,10,11");
        EXPECT_KEPT(s, 0, 0, 0, "3,4,5,9,10,11"); /* step 0: c1 + the partial c3 = 4 tokens */
        EXPECT_KEPT(s, 1, 0, 0, "3,4,5,10,11");
        EXPECT_KEPT(s, 0, 0, 1, "3,4,5,6,7,8,10,11"); /* step 1: c2 c1 */
        EXPECT_KEPT(s, 1, 0, 1, "6,7,8,10,11");
        EXPECT_KEPT(s, 3, 0, 1, "0,1,2,3,4,5,6,7,8,10,11");
        EXPECT_KEPT(s, 2, 0, 1, "10,11");
        EXPECT_KEPT(s, 4, 0, 1, "0,1,2,3,4,5,6,7,8,9,10,11");
        EXPECT_KEPT(s, 5, 0, 1, "11");
        kvt_layer_selection_free(s);
        s = tl_select(&in, "hybridkv-like:window=2,chunk=3,tau=0,chunk_score=max", B, 4);
        EXPECT_KEPT(s, 0, 0, -1, "3,4,5,9,10,11"); /* max: c1 c3 */
        EXPECT_KEPT(s, 1, 0, -1, "3,4,5,10,11");
        EXPECT_KEPT(s, 3, 0, -1, "0,1,2,3,4,5,9,10,11");
        EXPECT_KEPT(s, 0, 0, 1, "3,4,5,6,7,8,10,11"); /* steps do not depend on chunk_score */
        kvt_layer_selection_free(s);
    }
    kvt_kernels_use_ref(false);
}

/* GQA: Hq=4 on Hkv=2; KV head 0 has L4's keys except token 2 = -1, query heads 0 (window q=+1,
 * decode .1) and 1 (window q=-1, decode -2). KV head 1: keys 0 except 20 at 5, queries +1. tau=0:
 * all dynamic. a, by hand: head 0 puts .20 on 0 and 1, .33 on 4, .26 on 9; head 1 (Z = e + 4 + e^-1
 * + e^3 + ...) .73 on 7, .10 on 2, .036 on each 0 key. Group mean per chunk, sum: c2 .39 > c0 .25 >
 * c1 .20 > c3 .13; max: c2 (a7 .36) > c1 (a4 .17) > c3 (.13) > c0 (.10). Head 0 alone (sum) keeps
 * c0 c1, head 1 alone c2 c0. Decode, max over the group of q.k per chunk: head 0: 1.0 1.05
 * .1 1.025; head 1: 2 0 6 -20.5; group: 2 1.05 6 1.025 -> c2 c0. */
static void test_gqa(void)
{
    float k[24] = {10, 10, -1, 0, 10.5f, 0, 1, -3, 0, 10.25f, 0, 0};
    for (int j = 12; j < 24; j++)
        k[j] = j == 17 ? BIG : 0.0f;
    float q[8] = {1, 1, -1, -1, 1, 1, 1, 1}, qd[4] = {0.1f, -2, 1, 1};
    kvt_layer_input in = lay(12, 2, 1, 4, 2, k, q, qd, NULL);
    const int B[] = {8};
    for (int ref = 0; ref < 2; ref++) {
        kvt_kernels_use_ref(ref == 1);
        kvt_layer_selection *s = tl_select(&in, "hybridkv-like:window=2,chunk=3,tau=0", B, 1);
        KVT_EXPECT(kvt_layer_selection_n_heads(s) == 2 && dyn_mask(s) == 0x3);
        EXPECT_KEPT(s, 0, 0, -1, "0,1,2,6,7,8,10,11"); /* sum: c2 c0 */
        EXPECT_KEPT(s, 0, 0, 0, "0,1,2,6,7,8,10,11");  /* step 0: c2 c0 */
        EXPECT_KEPT(s, 0, 1, -1, "0,1,2,3,4,5,10,11"); /* token 5: c1, then c0 (tie, lower) */
        EXPECT_KEPT(s, 0, 1, 0, "0,1,2,3,4,5,10,11");  /* logit 20 in c1, the rest tie at 0 */
        kvt_layer_selection_free(s);
        s = tl_select(&in, "hybridkv-like:window=2,chunk=3,tau=0,chunk_score=max", B, 1);
        EXPECT_KEPT(s, 0, 0, -1, "3,4,5,6,7,8,10,11"); /* max: c2 c1, unlike either head */
        kvt_layer_selection_free(s);
        s = tl_select(&in, "hybridkv-like:window=2,chunk=3,tau=0,heads=query", B, 1);
        KVT_EXPECT(kvt_layer_selection_n_heads(s) == 4 && dyn_mask(s) == 0xF);
        EXPECT_KEPT(s, 0, 0, -1, "0,1,2,3,4,5,10,11"); /* head 0: c0 c1 */
        EXPECT_KEPT(s, 0, 1, -1, "0,1,2,6,7,8,10,11"); /* head 1: c2 c0 */
        EXPECT_KEPT(s, 0, 0, 0, "3,4,5,9,10,11");      /* head 0 step 0: c1 c3 */
        EXPECT_KEPT(s, 0, 1, 0, "0,1,2,6,7,8,10,11");  /* head 1 step 0: c2 c0 */
        kvt_layer_selection_free(s);
    }
    kvt_kernels_use_ref(false);
}

static void test_options(void)
{
    kvt_policy *p = NULL;
    KVT_CHECK(kvt_policy_create("hybridkv-like", NULL, &p));
    KVT_EXPECT(kvt_policy_flags(p) ==
               (KVT_POLICY_PER_STEP | KVT_POLICY_LIKE | KVT_POLICY_WINDOW_QUERY));
    char *js = kvt_policy_options_json(p);
    KVT_EXPECT(js && strstr(js, "\"window\": 32") && strstr(js, "\"chunk\": 16") &&
               strstr(js, "\"theta\": 0.9") && strstr(js, "\"split\": 0.5"));
    kvt_free(js);
    kvt_policy_free(p);
    static const char *bad[] = {
        "theta=0",   "theta=1.5",  "tau=1.5",    "tau=-0.1",      "tau=mean",
        "split=1.5", "split=-0.5", "chunk=0",    "chunk=2.5",     "floor=2",
        "kernel=4",  "pool=min",   "heads=both", "chunk_score=x", "chunk_score=mean",
        "alpha=0.2", "page=16",    "theta",      "window=0", /* it ranks by window queries: refused
                                                                when created */
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char spec[64];
        snprintf(spec, sizeof(spec), "hybridkv-like:%s", bad[i]);
        p = NULL;
        KVT_EXPECT_STATUS(kvt_policy_create(spec, NULL, &p), KVT_ERR_INVALID_ARG);
        KVT_EXPECT_MSG(p == NULL, "%s accepted", spec);
        kvt_policy_free(p);
    }
    /* more window queries than the layer stores: refused at selection */
    kvt_layer_input in;
    mk_l1(&in);
    const int B[] = {9};
    const char *sel_bad[] = {"hybridkv-like:window=3"};
    for (int i = 0; i < 1; i++) {
        KVT_CHECK(kvt_policy_create(sel_bad[i], NULL, &p));
        kvt_layer_selection *s = NULL;
        KVT_EXPECT_STATUS(kvt_replay_layer_select(&in, p, B, 1, &s), KVT_ERR_INVALID_ARG);
        kvt_layer_selection_free(s);
        kvt_policy_free(p);
    }
}

int main(void)
{
    test_classify();
    test_alloc();
    test_static();
    test_dynamic();
    test_gqa();
    test_options();
    return kvt_test_result("test_replay_hybridkv");
}
