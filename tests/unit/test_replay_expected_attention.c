/* test_replay_expected_attention.c - expected-attention (kvpress's ExpectedAttentionPress) on
 * layers worked by hand, D = 2: the order in which each budget adds its key, from the queries'
 * mean (RoPE undone at each token's position, then turned by the mean rotation over the future
 * positions), the covariance term, sinks, the GQA mean, heads=query, ||v||, and what it
 * refuses. tests/oracle/test_expected_attention.py checks it against kvpress's own computation
 * on a real model.
 */
#include <math.h>

#include "replay_test_util.h"

#define MAXT 8

/* the order in which budgets 1..T add head h's keys, as "a,b,c" */
static const char *order_str(const kvt_layer_input *in, const char *spec, int h)
{
    static char buf[64];
    int B[MAXT];
    for (int b = 0; b < in->T; b++)
        B[b] = b + 1;
    kvt_layer_selection *s = tl_select(in, spec, B, (size_t)in->T);
    bool seen[MAXT] = {false};
    size_t n = 0;
    buf[0] = '\0';
    for (int b = 0; b < in->T; b++) {
        int32_t idx[MAXT];
        size_t cnt = 0;
        KVT_CHECK(kvt_layer_selection_kept(s, (size_t)b, h, -1, idx, MAXT, &cnt));
        KVT_EXPECT_MSG(cnt == (size_t)b + 1, "%s: budget %d keeps %zu", spec, b + 1, cnt);
        for (size_t i = 0; i < cnt; i++)
            if (!seen[idx[i]]) {
                seen[idx[i]] = true;
                n += (size_t)snprintf(buf + n, sizeof(buf) - n, "%s%d", n ? "," : "", idx[i]);
            }
    }
    kvt_layer_selection_free(s);
    return buf;
}

#define EXPECT_ORDER(in, spec, h, want)                                                            \
    do {                                                                                           \
        const char *got_ = order_str((in), (spec), (h));                                           \
        KVT_EXPECT_MSG(!strcmp(got_, (want)), "%s head %d: order {%s}, want {%s}", (spec), (h),    \
                       got_, (want));                                                              \
    } while (0)

/* one query head, one KV head, D = 2; q_all [T, 2]; the window query is the last one */
static kvt_layer_input layer(int T, int Hq, const float *k, const float *v, const float *qa,
                             const kvt_rope_info *rope)
{
    kvt_layer_input in = tl_layer(T, 2, Hq, 1, 1, k, v, qa + (size_t)(T - 1) * 2);
    in.q_all = qa;
    in.rope = rope;
    return in;
}

static const float ones[2 * MAXT] = {1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0};

/* no RoPE: z_j = s mu.k_j, and with the covariance s^2/2 k_j^T S k_j */
static void test_mean_and_covariance(void)
{
    const kvt_rope_info none = {.type = 0};
    /* mu = (1, 0): keys by their x */
    const float k[8] = {0, 0, 3, 0, 1, 0, 2, 0};
    kvt_layer_input in = layer(4, 1, k, ones, ones, &none);
    EXPECT_ORDER(&in, "expected-attention:sinks=0,cov=0,vnorm=0", 0, "1,3,2,0");
    /* sinks=2: tokens 0 and 1 first, then 3 (x=2) before 2 (x=1) */
    EXPECT_ORDER(&in, "expected-attention:sinks=2,cov=0,vnorm=0", 0, "0,1,3,2");
    /* the window (not in kvpress) goes first, most recent first */
    EXPECT_ORDER(&in, "expected-attention:sinks=0,cov=0,vnorm=0,window=1", 0, "3,1,2,0");
    /* queries (1,0) and (-1,0): mu = 0, S = diag(1, 0): z_j = s^2/2 x_j^2 */
    const float q2[8] = {1, 0, -1, 0, 1, 0, -1, 0};
    const float k2[8] = {0, 5, 2, 0, -3, 0, 1, 1};
    in = layer(4, 1, k2, ones, q2, &none);
    EXPECT_ORDER(&in, "expected-attention:sinks=0,vnorm=0", 0, "2,1,3,0");
    EXPECT_ORDER(&in, "expected-attention:sinks=0,cov=0,vnorm=0", 0, "0,1,2,3"); /* all tie */
    /* vnorm: (p + epsilon) ||v||: v = 0 for key 2 sends it last */
    const float v2[8] = {1, 0, 1, 0, 0, 0, 1, 0};
    in = layer(4, 1, k2, v2, q2, &none);
    EXPECT_ORDER(&in, "expected-attention:sinks=0", 0, "1,3,0,2");
}

/* RoPE undone at each token, then the mean rotation over the future positions. Pre-RoPE every
 * query is (1, 0); at frequency pi/2 the stored queries turn a quarter per token. */
static void test_rope(void)
{
    const double f[1] = {M_PI / 2};
    kvt_rope_info r = {.type = 1, .pairs = 2, .inv_freq = f};
    float qa[10];
    for (int t = 0; t < 5; t++) {
        qa[2 * t] = (float)cos(t * M_PI / 2);
        qa[2 * t + 1] = (float)sin(t * M_PI / 2);
    }
    const float k[10] = {5, 0, 0, 1, 0, 3, 2, 2, 4, -1.5f};
    kvt_layer_input in = layer(5, 1, k, ones, qa, &r);
    /* future=1: position 5 turns (1,0) to (0,1): keys by their y */
    EXPECT_ORDER(&in, "expected-attention:sinks=0,cov=0,vnorm=0,future=1", 0, "2,3,1,0,4");
    /* future=2: positions 5 and 6 average to cos -1/2, sin 1/2: mu' = (-1/2, 1/2), so
       z ~ (y - x) / 2 = -2.5, 0.5, 1.5, 0, -2.75 */
    EXPECT_ORDER(&in, "expected-attention:sinks=0,cov=0,vnorm=0,future=2", 0, "2,1,3,0,4");
    /* half pairs are the same pair when D = 2; attention_scaling 2 is undone, then redone */
    r.pairs = 1;
    r.attention_scaling = 2;
    for (int i = 0; i < 10; i++)
        qa[i] *= 2;
    EXPECT_ORDER(&in, "expected-attention:sinks=0,cov=0,vnorm=0,future=2", 0, "2,1,3,0,4");
    EXPECT_ORDER(&in, "expected-attention:sinks=0,cov=0,vnorm=0,future=1", 0, "2,3,1,0,4");
    /* the positions table: four tokens whose stored queries turn a whole circle. Undone at
       positions 0..3 they are (1,0); position 4 is a whole turn: keys by their x */
    const float q4[8] = {1, 0, 0, 1, -1, 0, 0, -1};
    const float k4[8] = {5, 0, 1, 1, -1, 3, 2, 2};
    kvt_rope_info r4 = {.type = 1, .pairs = 2, .inv_freq = f};
    int32_t pos[4] = {0, 1, 2, 3};
    in = layer(4, 1, k4, ones, q4, &r4);
    in.positions = pos;
    in.n_pos_rows = 1;
    EXPECT_ORDER(&in, "expected-attention:sinks=0,cov=0,vnorm=0,future=1", 0, "0,3,1,2");
    /* at position 0 nothing is undone: the queries average to exactly 0 and every key ties */
    for (int t = 0; t < 4; t++)
        pos[t] = 0;
    EXPECT_ORDER(&in, "expected-attention:sinks=0,cov=0,vnorm=0,future=1", 0, "0,1,2,3");
}

/* two query heads on one KV head: head 0's mean is (4/s, 0), head 1's (0, 4/s) */
static void test_gqa(void)
{
    const kvt_rope_info none = {.type = 0};
    const double a = 4.0 * sqrt(2.0);
    float qa[12];
    for (int t = 0; t < 3; t++) {
        qa[2 * t] = (float)a, qa[2 * t + 1] = 0;         /* head 0 */
        qa[6 + 2 * t] = 0, qa[6 + 2 * t + 1] = (float)a; /* head 1 */
    }
    const float k[6] = {1, 0, 0, 1, 0, 0};
    const float v[6] = {1, 0, 0, 3, 0, 0}; /* ||v|| = 1, 3, 0 */
    kvt_layer_input in = tl_layer(3, 2, 2, 1, 1, k, v, qa + 4);
    in.q_all = qa;
    in.rope = &none;
    /* the group's mean: keys 0 and 1 tie, key 2 last */
    EXPECT_ORDER(&in, "expected-attention:sinks=0,cov=0,vnorm=0", 0, "0,1,2");
    /* times ||v||: key 1 (x3) first */
    EXPECT_ORDER(&in, "expected-attention:sinks=0,cov=0", 0, "1,0,2");
    /* heads=query: head 0 gives key 0 e^4/(e^4+2) x 1 > key 1 1/(e^4+2) x 3; head 1 key 1 */
    EXPECT_ORDER(&in, "expected-attention:sinks=0,cov=0,heads=query", 0, "0,1,2");
    EXPECT_ORDER(&in, "expected-attention:sinks=0,cov=0,heads=query", 1, "1,0,2");
    /* epsilon 1 lifts every key by ||v||: key 1 (3 (p+1)) passes key 0 in head 0 */
    EXPECT_ORDER(&in, "expected-attention:sinks=0,cov=0,heads=query,epsilon=1", 0, "1,0,2");
}

static void test_refused(void)
{
    const float k[8] = {0, 0, 3, 0, 1, 0, 2, 0};
    const int B[1] = {2};
    kvt_layer_input in = layer(4, 1, k, ones, ones, NULL);
    kvt_policy *p = NULL;
    KVT_CHECK(kvt_policy_create("expected-attention", NULL, &p));
    kvt_layer_selection *s = NULL;
    KVT_EXPECT_STATUS(kvt_replay_layer_select(&in, p, B, 1, &s), KVT_ERR_NOT_FOUND);
    KVT_EXPECT(strstr(kvt_error_msg(), "model.rope") != NULL);
    kvt_rope_info r = {.type = 1, .pairs = 0, .theta = 10000};
    in.rope = &r;
    KVT_EXPECT_STATUS(kvt_replay_layer_select(&in, p, B, 1, &s), KVT_ERR_NOT_FOUND);
    KVT_EXPECT(strstr(kvt_error_msg(), "pairs") != NULL);
    r.pairs = 2;
    r.type = 2; /* M-RoPE without sections or position rows */
    KVT_EXPECT_STATUS(kvt_replay_layer_select(&in, p, B, 1, &s), KVT_ERR_NOT_FOUND);
    KVT_EXPECT(strstr(kvt_error_msg(), "mrope_section") != NULL);
    r.type = 1;
    in.q_all = NULL;
    KVT_EXPECT_STATUS(kvt_replay_layer_select(&in, p, B, 1, &s), KVT_ERR_NOT_FOUND);
    KVT_EXPECT(strstr(kvt_error_msg(), "Q_all") != NULL);
    KVT_EXPECT(s == NULL);
    /* a NaN query, a frequency whose angles overflow: refused, not ranked as ties */
    kvt_policy_free(p);
    KVT_CHECK(kvt_policy_create("expected-attention:sinks=0", NULL, &p));
    float qn[8] = {1, 0, 1, 0, NAN, 0, 1, 0};
    in.q_all = qn;
    KVT_EXPECT_STATUS(kvt_replay_layer_select(&in, p, B, 1, &s), KVT_ERR_NAN);
    KVT_EXPECT(strstr(kvt_error_msg(), "Q_all of query head 0, token 2, is not finite") != NULL);
    in.q_all = ones;
    const double huge[1] = {1e308};
    r.inv_freq = huge;
    KVT_EXPECT_STATUS(kvt_replay_layer_select(&in, p, B, 1, &s), KVT_ERR_NAN);
    KVT_EXPECT(strstr(kvt_error_msg(), "not finite") != NULL);
    const double tiny[1] = {1e-3};
    r.inv_freq = tiny;
    r.attention_scaling = 1e-320; /* undone: the queries overflow */
    KVT_EXPECT_STATUS(kvt_replay_layer_select(&in, p, B, 1, &s), KVT_ERR_NAN);
    KVT_EXPECT(s == NULL);
    kvt_policy_free(p);
    KVT_EXPECT_STATUS(kvt_policy_create("expected-attention:future=0", NULL, &p),
                      KVT_ERR_INVALID_ARG);
    KVT_EXPECT_STATUS(kvt_policy_create("expected-attention:kernel=3", NULL, &p),
                      KVT_ERR_INVALID_ARG);
}

int main(void)
{
    test_mean_and_covariance();
    test_rope();
    test_gqa();
    test_refused();
    return kvt_test_result("test_replay_expected_attention");
}
