/* test_replay_merge_alloc.c - three policies worked by hand against POLICIES.md on tiny layers:
 * lightkv-like (§10 proxy): source/destination alternation inside each merge window, which
 * source goes to which destination (key cosine), how many merge for a budget and in how many
 * rounds, and the merged keys AND values, checked against weighted means whose weights (the
 * text window queries' attention summed over every query head) are recomputed here by a plain
 * loop; AdaKV alloc=b (§3b): exact kept sets per head, with and without GQA, next to alloc=a
 * (§3a); random: the window, nested sets, the prefix, seeds, and equal frequencies.
 */
#include "replay_test_util.h"
#include "replay_internal.h" /* kvt_merged_set: the merged K/V of a lightkv-like selection */

/* ---------------------------------- lightkv-like ----------------------------------------- */
enum { LT = 13, LD = 2, LHQ = 4, LHKV = 2, LW = 3 };
/* text 0-1 | image 2-9 (the prefix: mergeable) | image 10 (in the window: never merged, and
 * not a text query, so it does not weigh) | text 11-12 */
static const uint8_t lmod[LT] = {0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0};

typedef struct light {
    float k[LHKV * LT * LD], v[LHKV * LT * LD], q[LHQ * LW * LD];
    double w[LT]; /* merge weights, recomputed here */
    kvt_layer_input in;
} light;

static void light_init(light *L)
{
    /* KV head 0's keys; the image keys 2..9 are (1,0) (3,3) (0,1) (2,.2) (1,.6) (1,.5)
     * (-1,-.2) (-3,-1). KV head 1's are rotated by 90 degrees: the same cosines (so the same
     * merges) but other logits and values. */
    static const float k0[LT][LD] = {{.5f, -.5f}, {-.3f, .8f}, {1, 0},     {3, 3},     {0, 1},
                                     {2, .2f},    {1, .6f},    {1, .5f},   {-1, -.2f}, {-3, -1},
                                     {.2f, .1f},  {.4f, -.2f}, {-.1f, .3f}};
    static const float q[LHQ * LW * LD] = {.3f,  .2f,  1,    -.5f, .5f,  .8f, -.6f, .4f,
                                           .2f,  1.1f, -.7f, -.3f, .9f,  .1f, .4f,  .4f,
                                           -.2f, .6f,  .1f,  -.8f, -.5f, .5f, .6f,  .3f};
    for (int j = 0; j < LT; j++) {
        L->k[j * LD] = k0[j][0], L->k[j * LD + 1] = k0[j][1];
        L->k[(LT + j) * LD] = -k0[j][1], L->k[(LT + j) * LD + 1] = k0[j][0];
        for (int g = 0; g < LHKV; g++) {
            L->v[(g * LT + j) * LD] = 1.0f + 0.5f * (float)j + (float)g;
            L->v[(g * LT + j) * LD + 1] = 3.0f + 0.25f * (float)(j * (g + 1));
        }
    }
    memcpy(L->q, q, sizeof(q));
    /* w[j] = sum over the 4 query heads and the text window queries (positions 11 and 12) of
     * softmax over j' <= pos of q.k[j']/sqrt(2): causal, and the same for both KV heads */
    memset(L->w, 0, sizeof(L->w));
    for (int h = 0; h < LHQ; h++)
        for (int i = 0; i < LW; i++) {
            const int pos = LT - LW + i;
            if (lmod[pos] != 0)
                continue;
            const float *qi = L->q + (h * LW + i) * LD, *K = L->k + (h / 2) * LT * LD;
            double z[LT], mx = -INFINITY, Z = 0.0;
            for (int j = 0; j <= pos; j++) {
                z[j] = ((double)qi[0] * K[j * LD] + (double)qi[1] * K[j * LD + 1]) / sqrt(2.0);
                mx = fmax(mx, z[j]);
            }
            for (int j = 0; j <= pos; j++)
                Z += exp(z[j] - mx);
            for (int j = 0; j <= pos; j++)
                L->w[j] += exp(z[j] - mx) / Z;
        }
    L->in = tl_layer(LT, LD, LHQ, LHKV, LW, L->k, L->v, L->q);
    L->in.modality = lmod;
}

#define M(a, b) (1u << (a) | 1u << (b)) /* a pair of tokens */
typedef struct merge_want {
    int B;
    const char *kept; /* representative token indices */
    unsigned grp[LT]; /* grp[j]: the tokens merged into destination j (0: j is unchanged) */
} merge_want;

/* |got - want| <= 1e-6 * max|want| over the D components */
static bool near_vec(const float *got, const double *want)
{
    double scale = fmax(fabs(want[0]), fabs(want[1])), err = 0.0;
    for (int d = 0; d < LD; d++)
        err = fmax(err, fabs((double)got[d] - want[d]));
    return err <= 1e-6 * scale;
}

/* every head's merged set of budget b: the kept indices, which entries changed, and each
 * changed entry's K and V = sum_{i in grp} w_i x_i / sum_{i in grp} w_i (weights add up over
 * rounds, so a destination of several rounds is the weighted mean of all it absorbed) */
static void check_merged(const light *L, const kvt_layer_selection *s, size_t b,
                         const merge_want *mw)
{
    for (int g = 0; g < LHKV; g++) {
        EXPECT_KEPT(s, b, g, -1, mw->kept);
        const kvt_merged_set *ms = &s->merged[b * (size_t)s->n_heads + (size_t)g];
        int ce = 0;
        for (int e = 0; e < ms->n; e++) {
            const int j = ms->idx[e];
            const unsigned grp = j >= 0 && j < LT ? mw->grp[j] : 0;
            KVT_EXPECT_MSG((ms->changed[e] != 0) == (grp != 0), "B=%d head %d token %d changed %d",
                           mw->B, g, j, ms->changed[e]);
            if (!ms->changed[e])
                continue;
            double ws = 0.0, ek[LD] = {0}, ev[LD] = {0};
            for (int i = 0; i < LT; i++)
                if (grp >> i & 1u) {
                    ws += L->w[i];
                    for (int d = 0; d < LD; d++) {
                        ek[d] += L->w[i] * L->k[(g * LT + i) * LD + d];
                        ev[d] += L->w[i] * L->v[(g * LT + i) * LD + d];
                    }
                }
            for (int d = 0; d < LD && grp; d++)
                ek[d] /= ws, ev[d] /= ws;
            const float *gk = ms->k + (size_t)ce * LD, *gv = ms->v + (size_t)ce * LD;
            KVT_EXPECT_MSG(grp && near_vec(gk, ek) && near_vec(gv, ev),
                           "B=%d head %d dst %d: K (%.9g, %.9g) want (%.9g, %.9g), V (%.9g, %.9g) "
                           "want (%.9g, %.9g)",
                           mw->B, g, j, gk[0], gk[1], ek[0], ek[1], gv[0], gv[1], ev[0], ev[1]);
            ce++;
        }
        KVT_EXPECT(ce == ms->n_changed);
    }
}

static bool same_merged(const kvt_merged_set *a, const kvt_merged_set *b)
{
    const size_t nc = (size_t)a->n_changed * LD * sizeof(float);
    return a->n == b->n && a->n_changed == b->n_changed &&
           !memcmp(a->idx, b->idx, (size_t)a->n * sizeof(int32_t)) &&
           !memcmp(a->changed, b->changed, (size_t)a->n) && !memcmp(a->k, b->k, nc) &&
           !memcmp(a->v, b->v, nc);
}

static void test_lightkv(void)
{
    light L;
    light_init(&L);
    /* merge_window=4: the 8 image entries in token order form runs {2,3,4,5} {6,7,8,9};
     * sources are a run's even positions (2,4 | 6,8), destinations its odd ones (3,5 | 7,9).
     * Each source's best destination by key cosine (not by dot product: 3 has the larger dot
     * with 2, 3 vs 2, but cosine .707 vs .995):
     *   6->7 = 1.3/(1.166*1.118) = .997;   2->5 = 2/2.010 = .995 (2->3 = .707);
     *   8->9 = 3.2/(1.020*3.162) = .992;   4->3 = 3/4.243 = .707 (4->5 = .0995).
     * Target image entries = B - (T - n_image) = B - (13 - 8) = B - 5 (image token 10 is in the
     * window: not counted); B >= T merges nothing; the target is at least 1.
     * Round 2 (B <= 8) runs on the 4 survivors {3,5,7,9}: sources 3', 7', destinations 5', 9'.
     * The angles of 3' (45..90 deg), 5' (0..5.7), 7' (26.6..31), 9' (191..198) make 7'->5' the
     * best (<= 31 deg apart), then 3'->5' (>= 39 deg; 9' is > 90 deg from both). Round 3
     * (B = 4, target 1): the last source 5'' merges into 9' whatever its cosine. */
    const merge_want want[] = {
        {13, "0,1,2,3,4,5,6,7,8,9,10,11,12", {0}},                        /* B = T: as is */
        {12, "0,1,2,3,4,5,7,8,9,10,11,12", {[7] = M(6, 7)}},              /* target 7: 1 merge */
        {11, "0,1,3,4,5,7,8,9,10,11,12", {[5] = M(2, 5), [7] = M(6, 7)}}, /* 6: 2 merges */
        /* target 5: 3 merges; target 4: all 4 candidates, a whole round */
        {10, "0,1,3,4,5,7,9,10,11,12", {[5] = M(2, 5), [7] = M(6, 7), [9] = M(8, 9)}},
        {9, "0,1,3,5,7,9,10,11,12", {[3] = M(3, 4), [5] = M(2, 5), [7] = M(6, 7), [9] = M(8, 9)}},
        /* target 3: round 1, then the best of round 2: 7' into 5' */
        {8, "0,1,3,5,9,10,11,12", {[3] = M(3, 4), [5] = M(2, 5) | M(6, 7), [9] = M(8, 9)}},
        /* target 2: round 2 whole, destination 5' takes both sources */
        {7, "0,1,5,9,10,11,12", {[5] = M(2, 3) | M(4, 5) | M(6, 7), [9] = M(8, 9)}},
        /* B - 5 < 1: target 1, three rounds; 6 entries are kept, more than B */
        {4, "0,1,9,10,11,12", {[9] = M(2, 3) | M(4, 5) | M(6, 7) | M(8, 9)}},
    };
    enum { NW = sizeof(want) / sizeof(want[0]) };
    int B[NW];
    for (int i = 0; i < NW; i++)
        B[i] = want[i].B;
    const char *spec = "lightkv-like:window=3,merge_window=4";
    kvt_layer_selection *s = tl_select(&L.in, spec, B, NW);
    KVT_EXPECT(s->merged != NULL && kvt_layer_selection_has_fixed(s));
    KVT_EXPECT(kvt_layer_selection_n_heads(s) == LHKV);
    for (int b = 0; b < NW; b++)
        check_merged(&L, s, (size_t)b, &want[b]);
    /* one budget at a time goes through the same rounds (with many, a partial last round is
     * applied to a copy): bit-identical sets */
    for (int b = 0; b < NW; b++) {
        kvt_layer_selection *one = tl_select(&L.in, spec, &B[b], 1);
        for (int g = 0; g < LHKV; g++)
            KVT_EXPECT_MSG(same_merged(&one->merged[g], &s->merged[(size_t)b * LHKV + g]),
                           "B=%d head %d alone differs", B[b], g);
        kvt_layer_selection_free(one);
    }
    /* heads=query: every query head has its KV head's sets (same keys, same layer-wide
     * weights), each its own copy */
    kvt_layer_selection *q =
        tl_select(&L.in, "lightkv-like:window=3,merge_window=4,heads=query", B, NW);
    KVT_EXPECT(kvt_layer_selection_n_heads(q) == LHQ);
    for (int b = 0; b < NW; b++)
        for (int h = 0; h < LHQ; h++) {
            const kvt_merged_set *mq = &q->merged[(size_t)b * LHQ + h];
            const kvt_merged_set *mk = &s->merged[(size_t)b * LHKV + h / (LHQ / LHKV)];
            KVT_EXPECT_MSG(same_merged(mq, mk), "B=%d query head %d differs from its KV head", B[b],
                           h);
            KVT_EXPECT(h == 0 || mq->idx != q->merged[(size_t)b * LHQ + h - 1].idx);
        }
    kvt_layer_selection_free(q);
    kvt_layer_selection_free(s);

    /* merge_window=3: runs {2,3,4} {5,6,7} {8,9}: sources 2,4 | 5,7 | 8, destinations 3 | 6 | 9.
     * 7->6 = .997, 8->9 = .992, 5->6 = 2.12/(2.010*1.166) = .904, then 2->3 and 4->3 tie at
     * 3/4.243 = .707 exactly: the lower token index goes first. */
    const merge_want w3[] = {
        {10, "0,1,2,3,4,6,9,10,11,12", {[6] = M(5, 6) | M(6, 7), [9] = M(8, 9)}},
        {9, "0,1,3,4,6,9,10,11,12", {[3] = M(2, 3), [6] = M(5, 6) | M(6, 7), [9] = M(8, 9)}},
    };
    const int B3[] = {10, 9};
    s = tl_select(&L.in, "lightkv-like:window=3,merge_window=3", B3, 2);
    for (int b = 0; b < 2; b++)
        check_merged(&L, s, (size_t)b, &w3[b]);
    kvt_layer_selection_free(s);
    /* merge_window=2: pairs {2,3} {4,5} {6,7} {8,9}: 6->7 .997, 8->9 .992, 2->3 .707, 4->5 .0995;
     * B = 11 takes the first two (with windows of 4 it took 6->7 and 2->5) */
    const merge_want w2 = {11, "0,1,2,3,4,5,7,9,10,11,12", {[7] = M(6, 7), [9] = M(8, 9)}};
    s = tl_select(&L.in, "lightkv-like:window=3,merge_window=2", &w2.B, 1);
    check_merged(&L, s, 0, &w2);
    kvt_layer_selection_free(s);
    /* window=2 of the 3 stored queries: image token 10 joins the prefix (9 image entries,
     * target B - 4) as a run of its own with no destination; the weights come from the same
     * text queries (11, 12), read from the last 2 stored rows. B = 12: 6->7 as above; B = 9:
     * round 1 whole, 10 stays. */
    const merge_want ww[] = {
        {12, "0,1,2,3,4,5,7,8,9,10,11,12", {[7] = M(6, 7)}},
        {9, "0,1,3,5,7,9,10,11,12", {[3] = M(3, 4), [5] = M(2, 5), [7] = M(6, 7), [9] = M(8, 9)}},
    };
    const int Bw[] = {12, 9};
    s = tl_select(&L.in, "lightkv-like:window=2,merge_window=4", Bw, 2);
    for (int b = 0; b < 2; b++)
        check_merged(&L, s, (size_t)b, &ww[b]);
    kvt_layer_selection_free(s);
    /* no modality: no image token, nothing merges whatever the budget */
    L.in.modality = NULL;
    const merge_want none = {4, "0,1,2,3,4,5,6,7,8,9,10,11,12", {0}};
    s = tl_select(&L.in, spec, &none.B, 1);
    check_merged(&L, s, 0, &none);
    kvt_layer_selection_free(s);
}

/* --------------------------------- AdaKV alloc=b ----------------------------------------- */
typedef struct ada_case {
    const char *spec;
    int b;               /* budget index */
    const char *kept[4]; /* per head */
} ada_case;

static void check_ada(const kvt_layer_input *in, const int *B, int nb, const ada_case *c, int n,
                      int H)
{
    for (int i = 0; i < n; i++) {
        kvt_layer_selection *s = tl_select(in, c[i].spec, B, (size_t)nb);
        KVT_EXPECT(kvt_layer_selection_n_heads(s) == H);
        int sum = 0;
        for (int h = 0; h < H; h++) {
            const char *got = tl_kept_str(s, (size_t)c[i].b, h, -1);
            KVT_EXPECT_MSG(!strcmp(got, c[i].kept[h]), "%s B=%d head %d: {%s}, want {%s}",
                           c[i].spec, B[c[i].b], h, got, c[i].kept[h]);
            sum += tl_count(s, (size_t)c[i].b, h);
        }
        /* 3b keeps exactly H' * B (H' * b prefix + H' * W window); 3a may not */
        if (strstr(c[i].spec, "alloc=b"))
            KVT_EXPECT_MSG(sum == H * B[c[i].b], "%s: total %d, want %d", c[i].spec, sum,
                           H * B[c[i].b]);
        kvt_layer_selection_free(s);
    }
}

static void test_adakv_b(void)
{
    /* 3 heads, no GQA, D = 1 (logits = q * k): T = 9, W = 2 (tokens 7, 8), prefix 0..6,
     * kernel 1, so the score is the mean over the two window queries of softmax(q k)[j]:
     *   h0 (q 1,1):   .0024 .9524 .0064 .0009 .0174 .0003 .0106  -> ranks 1 4 6 2 0 3 5
     *   h1 (q 1,.5):  .2378 .0294 .0558 .3551 .0162 .0783 .1117  -> ranks 3 0 6 5 2 1 4
     *   h2 (q 1,1):   .1099 .1639 .0994 .1342 .0900 .1483 .1214  -> ranks 1 5 3 6 0 2 4
     * B = 5: b = 3, 9 prefix picks. alpha 0: the global top 9 are .9524 | .3551 .2378 .1117 |
     * .1639 .1483 .1342 .1214 .1099 -> 1, 3, 5. 3b forces n_safe = floor(alpha*B) entries per
     * head, the W window entries first, so only n_safe - W prefix ones:
     *   alpha .6: n_safe 3, 1 forced: every head has 1 already -> 1, 3, 5 (forcing n_safe = 3
     *             prefix tokens would give 3, 3, 3);
     *   alpha .8: n_safe 4, 2 forced (h0 adds token 4 = .0174); the other 3 picks of the rest:
     *             .1342 .1214 (h2) .1117 (h1) > .1099 (h2) -> 2, 3, 4;
     *   alpha 1:  n_safe 5, 3 forced = b -> 3, 3, 3.
     * 3a at alpha .8 (normalize 0): round(n*.2 + floor(.8*3)) = round(2.2, 2.6, 3.0) = 2, 3, 3:
     * one short of H*b. B = 3 (b = 1): the top 3 are .9524 | .3551 .2378 -> 1, 2, 0 (h2 keeps
     * only its window); alpha 1 forces floor(3) - 2 = 1 each. B <= W: the most recent B. */
    const float k[27] = {-1,  5, 0,   -2, 1,   -3,  .5f, 0,   0, 2,   -1,  0, 2.5f, -2,
                         .5f, 1, .5f, 0,  .2f, .6f, .1f, .4f, 0, .5f, .3f, 0, 0};
    const float v[27] = {0}, q[6] = {1, 1, 1, .5f, 1, 1};
    const kvt_layer_input in = tl_layer(9, 1, 3, 3, 2, k, v, q);
    const int B[] = {5, 3, 2, 1};
    const ada_case c[] = {
        {"adakv:window=2,kernel=1,alloc=b,alpha=0", 0, {"1,7,8", "0,3,6,7,8", "0,1,3,5,6,7,8"}},
        {"adakv:window=2,kernel=1,alloc=b,alpha=0.6", 0, {"1,7,8", "0,3,6,7,8", "0,1,3,5,6,7,8"}},
        {"adakv:window=2,kernel=1,alloc=b,alpha=0.8", 0, {"1,4,7,8", "0,3,6,7,8", "1,3,5,6,7,8"}},
        {"adakv:window=2,kernel=1,alloc=b,alpha=1", 0, {"1,4,6,7,8", "0,3,6,7,8", "1,3,5,7,8"}},
        {"adakv:window=2,kernel=1,alloc=a,normalize=0,alpha=0.8",
         0,
         {"1,4,7,8", "0,3,6,7,8", "1,3,5,7,8"}},
        {"adakv:window=2,kernel=1,alloc=b,alpha=0", 1, {"1,7,8", "0,3,7,8", "7,8"}},
        {"adakv:window=2,kernel=1,alloc=b,alpha=1", 1, {"1,7,8", "3,7,8", "1,7,8"}},
        {"adakv:window=2,kernel=1,alloc=b,alpha=0.8", 2, {"7,8", "7,8", "7,8"}},
        {"adakv:window=2,kernel=1,alloc=b,alpha=0.8", 3, {"8", "8", "8"}},
    };
    check_ada(&in, B, 4, c, (int)(sizeof(c) / sizeof(c[0])), 3);

    /* GQA: Hq 4 on Hkv 2, T = 10, W = 2 (tokens 8, 9), prefix 0..7. Query heads 0, 1 (q 1, -2)
     * pull KV head 0 two ways; heads 2, 3 (q 1, 1.5) agree on KV head 1's token 1.
     *   kv0 = mean(h0, h1): .3419(3) .2224(5) .1350(4) .1289(7) .0505(0) .0324(2) .0280(1) .0245(6)
     *   kv1 = mean(h2, h3): .9144(1) .0267(4) .0155(5) .0112(7) ...
     * B = 6: b = 4, 8 picks. alpha 0: .9144 then kv0's first seven (.0280 > .0267) -> 7, 1.
     * reduce=max instead: kv0 .6789(3) .4447(5) .2697(4) .2497(7) .0992(0) .0602(2) .0365(6),
     * kv1 .9730(1) .0426(4): .0426 > .0365 -> 6, 2, so the group mean is what is tested.
     * alpha .75: n_safe floor(4.5) = 4, 2 forced (kv1 adds token 4), then kv0's next four
     * .1350 .1289 .0505 .0324 -> 6, 2; alpha 1: 4 forced -> 4, 4. 3a alpha .75:
     * round(7*.25 + floor(3)) = round(4.75) = 5, round(.25 + 3) = 3 -> 5, 3.
     * heads=query allocates the 16 picks over the query heads' own scores:
     *   h0: .4447(5) .2697(4) .0992(0) .0602(2) .0365(6) .0221(1) .0081(7)
     *   h1: .6789(3) .2497(7) .0338(1) .0124(6) .0046(2)
     *   h2: .8559(1) .0426(4) .0258(5) .0191(7) .0157(2) .0095(6);  h3: .9730(1) .0108(4) .0051(5)
     * alpha 0: the top 16 end at .0124 (h1) > .0108 (h3) -> 6, 4, 5, 1; alpha .75 forces 2
     * each (h3 adds .0108), the 8 others end at .0157 (h2) > .0124 (h1) -> 6, 3, 5, 2. */
    const float kg[20] = {1,  -.5f, .5f, -2, 2, 2.5f, 0,    -1.5f, 0, 0,
                          -1, 4,    0,   -2, 1, .5f,  -.5f, .2f,   0, 0};
    const float vg[20] = {0}, qg[8] = {1, 1, -2, -2, 1, 1, 1.5f, 1.5f};
    const kvt_layer_input ig = tl_layer(10, 1, 4, 2, 2, kg, vg, qg);
    const int Bg[] = {6};
    const ada_case cg[] = {
        {"adakv:window=2,kernel=1,alloc=b,alpha=0", 0, {"0,1,2,3,4,5,7,8,9", "1,8,9"}},
        {"adakv:window=2,kernel=1,alloc=b,alpha=0,reduce=max", 0, {"0,2,3,4,5,7,8,9", "1,4,8,9"}},
        {"adakv:window=2,kernel=1,alloc=b,alpha=0.75", 0, {"0,2,3,4,5,7,8,9", "1,4,8,9"}},
        {"adakv:window=2,kernel=1,alloc=b,alpha=1", 0, {"3,4,5,7,8,9", "1,4,5,7,8,9"}},
        {"adakv:window=2,kernel=1,alloc=a,normalize=0,alpha=0.75",
         0,
         {"0,3,4,5,7,8,9", "1,4,5,8,9"}},
    };
    check_ada(&ig, Bg, 1, cg, (int)(sizeof(cg) / sizeof(cg[0])), 2);
    const ada_case cq[] = {
        {"adakv:window=2,kernel=1,alloc=b,alpha=0,heads=query",
         0,
         {"0,1,2,4,5,6,8,9", "1,3,6,7,8,9", "1,2,4,5,7,8,9", "1,8,9"}},
        {"adakv:window=2,kernel=1,alloc=b,alpha=0.75,heads=query",
         0,
         {"0,1,2,4,5,6,8,9", "1,3,7,8,9", "1,2,4,5,7,8,9", "1,4,8,9"}},
    };
    check_ada(&ig, Bg, 1, cq, (int)(sizeof(cq) / sizeof(cq[0])), 4);
}

/* ------------------------------------- random -------------------------------------------- */
static void kept_set(const kvt_layer_selection *s, size_t b, int h, uint8_t *in_set, int T)
{
    int32_t idx[64];
    size_t n = 0;
    memset(in_set, 0, (size_t)T);
    KVT_CHECK(kvt_layer_selection_kept(s, b, h, -1, idx, 64, &n));
    for (size_t i = 0; i < n; i++)
        in_set[idx[i]] = 1;
}

static kvt_layer_selection *run_seed(const kvt_layer_input *in, uint64_t seed, const int *B,
                                     size_t nb)
{
    char spec[64];
    snprintf(spec, sizeof(spec), "random:window=4,seed=%llu", (unsigned long long)seed);
    return tl_select(in, spec, B, nb);
}

static void test_random(void)
{
    enum { T = 20, W = 4, P = T - W };
    test_layer t;
    tl_random(&t, 7, T, 4, 2, 2, W, 0, false);
    const int B[] = {2, 4, 7, 10, 16, 20, 30};
    enum { NB = sizeof(B) / sizeof(B[0]) };
    kvt_layer_selection *s = run_seed(&t.in, 123, B, NB);
    for (int h = 0; h < 2; h++) {
        EXPECT_KEPT(s, 0, h, -1, "18,19"); /* B < W: the most recent B */
        EXPECT_KEPT(s, 1, h, -1, "16,17,18,19");
        EXPECT_KEPT(s, 5, h, -1, "0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19");
        EXPECT_KEPT(s, 6, h, -1, "0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19");
        uint8_t prev[T], cur[T];
        kept_set(s, 0, h, prev, T);
        for (int b = 1; b < NB; b++) {
            KVT_EXPECT(tl_count(s, (size_t)b, h) == (B[b] < T ? B[b] : T));
            kept_set(s, (size_t)b, h, cur, T);
            int n_prefix = 0;
            for (int j = 0; j < T; j++) {
                KVT_EXPECT_MSG(!prev[j] || cur[j], "B=%d drops token %d of B=%d", B[b], j,
                               B[b - 1]); /* nested: one shuffle, cut per budget */
                if (B[b] >= W && j >= P)
                    KVT_EXPECT(cur[j]); /* the window */
                n_prefix += j < P && cur[j];
            }
            /* the rest, min(B, T) - W, is drawn from the prefix */
            KVT_EXPECT(B[b] < W || n_prefix == (B[b] < T ? B[b] : T) - W);
            memcpy(prev, cur, sizeof(cur));
        }
    }
    /* heads, layers and seeds draw different sets (B = 10: 6 of 16 prefix tokens) */
    char a[256];
    snprintf(a, sizeof(a), "%s", tl_kept_str(s, 3, 0, -1));
    KVT_EXPECT(strcmp(a, tl_kept_str(s, 3, 1, -1)) != 0);
    kvt_layer_selection *o = run_seed(&t.in, 124, B, NB);
    KVT_EXPECT(strcmp(a, tl_kept_str(o, 3, 0, -1)) != 0);
    kvt_layer_selection_free(o);
    t.in.layer = 1;
    o = run_seed(&t.in, 123, B, NB);
    KVT_EXPECT(strcmp(a, tl_kept_str(o, 3, 0, -1)) != 0);
    kvt_layer_selection_free(o);
    t.in.layer = 0;
    kvt_layer_selection_free(s);

    /* equal frequencies over N seeds x 2 heads: at B = 8 (4 of 16 prefix tokens) each token is
     * kept with p = 1/4: mean 2N/4 = 1500, sd sqrt(6000 * 1/4 * 3/4) = 33.5, allowed +-170
     * (5 sd); at B = 5 the one prefix token is uniform over 16: chi-square (15 dof, mean 15)
     * below 50 (p ~ 1e-5). "Always the first b" or any fixed set fails both. */
    enum { N = 3000 };
    const int Bf[] = {8, 5};
    int cnt8[P] = {0}, cnt5[P] = {0};
    for (uint64_t seed = 1; seed <= N; seed++) {
        kvt_layer_selection *r = run_seed(&t.in, seed, Bf, 2);
        for (int h = 0; h < 2; h++) {
            uint8_t in8[T], in5[T];
            kept_set(r, 0, h, in8, T);
            kept_set(r, 1, h, in5, T);
            for (int j = 0; j < P; j++)
                cnt8[j] += in8[j], cnt5[j] += in5[j];
        }
        kvt_layer_selection_free(r);
    }
    double chi2 = 0.0;
    for (int j = 0; j < P; j++) {
        KVT_EXPECT_MSG(abs(cnt8[j] - 2 * N / 4) <= 170, "token %d kept %d times of %d, want ~%d", j,
                       cnt8[j], 2 * N, 2 * N / 4);
        const double e = 2.0 * N / P;
        chi2 += (cnt5[j] - e) * (cnt5[j] - e) / e;
    }
    KVT_EXPECT_MSG(chi2 < 50.0, "chi-square %.1f of the B=5 pick over 16 tokens", chi2);
    tl_free(&t);
}

int main(void)
{
    test_lightkv();
    test_adakv_b();
    test_random();
    return kvt_test_result("test_replay_merge_alloc");
}
