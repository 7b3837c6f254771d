/* policy_hybridkv.c - `hybridkv-like` (POLICIES §9, an inferred emulation; no public code).
 * Per head (KV granularity: group mean), from the text window queries (all window queries if
 * the trace has no modality or no text query in the window):
 *   a[j]    = mean attention of those queries to prefix token j (unpooled);
 *   k_theta = fewest tokens holding theta (0.9) of the prefix mass; rho = k_theta/|P|;
 *   static  if rho <= tau, or (tau=median, default) the ceil(H/2) heads of lowest rho
 *           (ties: lower head);
 *   budget  H*(B-W) split: floor(split*total) to static heads (floor = floor(floor*b) each,
 *           the rest proportional to sigma = 1 - rho, rounding leftovers one each by
 *           descending sigma; a head holds at most the prefix P, its excess is shared again
 *           among the other static heads, and what none can hold goes to the dynamic heads),
 *           the rest uniform to dynamic heads, rounded down to chunks of C;
 *   static heads keep the window, then text prefix tokens by a, then the others by pooled a
 *           (text-prior pruning);
 *   dynamic heads keep the window plus whole chunks: for the prompt-time set (window-query
 *           metrics and set metrics) chunks ranked by the sum (chunk_score) of a; at each
 *           decode step re-selected by the max logit q.k of the group's decode queries in the
 *           chunk (chunk-wise retrieval, scored per step). Ties: lower chunk. */
#include <math.h>

#include "../replay_internal.h"

static kvt_status sel_hybrid(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                             kvt_layer_selection *sel)
{
    KVT_FORWARD(kvt_ctx_fetch(c, KVT_CTX_PRW | KVT_CTX_KV));
    const kvt_policy_opts *o = &p->o;
    const int T = c->T, D = c->D, W = o->window, P = T - W, C = o->chunk;
    const int n_chunks = (P + C - 1) / C;
    KVT_FORWARD(kvt_ctx_check_window(c, "hybridkv-like", W));
    KVT_FORWARD(kvt_sel_init(sel, c, o->per_query, W, n_b, true));
    const int H = sel->n_heads, per = o->per_query ? 1 : c->Gs, Gd = c->Gd;
    if (Gd > 0)
        KVT_FORWARD(kvt_sel_init_steps(sel, Gd));
    kvt_status st = KVT_OK;
    size_t Pn = (size_t)(P > 0 ? P : 1), nc = (size_t)(n_chunks > 0 ? n_chunks : 1);
    double *kd = NULL, *qd = NULL, *zz = NULL, *csa = NULL; /* fast path of the step scores */
    int kd_g = -1;
    double *a = kvt_calloc((size_t)H * Pn, sizeof(double));
    double *pooled = kvt_calloc(Pn, sizeof(double));
    double *tmp = kvt_calloc(Pn, sizeof(double));
    double *rho = kvt_calloc((size_t)H, sizeof(double));
    double *cs = kvt_calloc(nc, sizeof(double));
    double *z = kvt_calloc((size_t)T, sizeof(double));
    int32_t *work = kvt_calloc((size_t)T + 1, sizeof(int32_t));
    int32_t *ord = kvt_calloc((size_t)T + 1, sizeof(int32_t));
    int32_t *cord = kvt_calloc((size_t)H * nc, sizeof(int32_t));
    int32_t *scord = kvt_calloc((size_t)H * Gd * nc + 1, sizeof(int32_t));
    double *nrho = kvt_calloc((size_t)H, sizeof(double));
    uint8_t *is_static = kvt_calloc((size_t)H, 1);
    int *caps = kvt_calloc((size_t)H, sizeof(int));
    if (!a || !pooled || !tmp || !rho || !cs || !z || !work || !ord || !cord || !scord || !nrho ||
        !is_static || !caps) {
        st = kvt_error_set(KVT_ERR_NOMEM, "hybridkv-like: out of memory");
        goto out_free;
    }
    /* a [H, P]: text window queries, mean over queries then over the head's query heads */
    const uint8_t *mod = c->in->modality;
    int n_text = 0;
    for (int i = 0; i < W; i++)
        n_text += !mod || mod[T - W + i] == 0;
    for (int h = 0; h < H; h++) {
        for (int u = 0; u < per; u++) {
            int hq = h * per + u;
            for (int i = 0; i < W; i++) {
                if (n_text && mod && mod[T - W + i] != 0)
                    continue;
                const float *pr = c->prw + ((size_t)hq * c->Wt + (c->Wt - W + i)) * T;
                for (int j = 0; j < P; j++)
                    a[(size_t)h * P + j] += pr[j];
            }
        }
        double nq = (double)per * (n_text ? n_text : W);
        for (int j = 0; j < P; j++)
            a[(size_t)h * P + j] /= nq;
        /* rho = k_theta / |P| */
        double total = 0.0, acc = 0.0;
        for (int j = 0; j < P; j++)
            total += a[(size_t)h * P + j];
        kvt_rank_desc_ref(a + (size_t)h * P, P, ord, work);
        int k = 0;
        while (k < P && acc < o->theta * total)
            acc += a[(size_t)h * P + ord[k++]];
        rho[h] = P > 0 ? (double)k / P : 0.0;
    }
    for (int h = 0; h < H; h++)
        nrho[h] = -rho[h];
    if (isnan(o->tau)) {
        kvt_rank_desc_ref(nrho, H, ord, work); /* ascending rho: the first ceil(H/2) static */
        for (int i = 0; i < H; i++)
            is_static[ord[i]] = i < (H + 1) / 2;
    } else
        for (int h = 0; h < H; h++)
            is_static[h] = rho[h] <= o->tau;
    int n_stat = 0;
    for (int h = 0; h < H; h++)
        n_stat += is_static[h];
    int n_dyn = H - n_stat;

    /* rankings (budget independent) */
    for (int h = 0; h < H; h++) {
        int32_t *o_h = sel->order + (size_t)h * T;
        if (is_static[h]) {
            if (P > 0 && (st = kvt_pool1d_ref(a + (size_t)h * P, P, o->kernel, o->pool, pooled)))
                goto out_free;
            /* text first, by the unpooled a; the others by the pooled a (POLICIES §9 step 6):
               text scores shifted above every other score (scores are >= 0) */
            const double *ah = a + (size_t)h * P;
            double top = 0.0;
            for (int j = 0; j < P; j++)
                top = pooled[j] > top ? pooled[j] : top;
            for (int j = 0; j < P; j++)
                tmp[j] = (!mod || mod[j] == 0) ? ah[j] + top + 1.0 : pooled[j];
            if ((st = kvt_rank_window(tmp, T, W, o_h)))
                goto out_free;
        } else {
            for (int i = 0; i < n_chunks; i++) {
                double s = 0.0;
                for (int j = i * C; j < P && j < (i + 1) * C; j++) {
                    double x = a[(size_t)h * P + j];
                    s = o->chunk_score == KVT_REDUCE_MAX ? (j == i * C || x > s ? x : s) : s + x;
                }
                cs[i] = s;
            }
            kvt_chunk_order(cs, n_chunks, C, P, W, T, o_h, work, cord + (size_t)h * nc);
            if (Gd > 0 && !kvt_kernels_ref_only()) {
                /* the same chunk maxima with the decode logits of all steps as one product
                 * per query head (kd: the KV head's prefix keys in double, converted once) */
                sel->step_head[h] = 1;
                if (!kd && (!(kd = kvt_malloc(Pn * D * sizeof(double))) ||
                            !(qd = kvt_malloc((size_t)Gd * D * sizeof(double))) ||
                            !(zz = kvt_malloc((size_t)Gd * Pn * sizeof(double))) ||
                            !(csa = kvt_malloc((size_t)Gd * nc * sizeof(double))))) {
                    st = kvt_error_set(KVT_ERR_NOMEM, "hybridkv-like: out of memory");
                    goto out_free;
                }
                for (size_t i = 0; i < (size_t)Gd * nc; i++)
                    csa[i] = -INFINITY;
                for (int u = 0; u < per; u++) {
                    int hq = h * per + u, g = hq / c->Gs;
                    if (kd_g != g) {
                        const float *K = c->k + (size_t)g * T * D;
                        for (size_t i = 0; i < (size_t)P * D; i++)
                            kd[i] = K[i];
                        kd_g = g;
                    }
                    const float *Q = c->in->q_decode + (size_t)hq * Gd * D;
                    for (size_t i = 0; i < (size_t)Gd * D; i++)
                        qd[i] = Q[i];
                    kvt_gemm_f64(true, Gd, P, D, c->scale, qd, D, kd, D, 0.0, zz, P);
                    for (int s = 0; s < Gd; s++) {
                        double *cs_s = csa + (size_t)s * nc;
                        const double *zs = zz + (size_t)s * P;
                        for (int j = 0; j < P; j++)
                            cs_s[j / C] = zs[j] > cs_s[j / C] ? zs[j] : cs_s[j / C];
                    }
                }
                for (int s = 0; s < Gd; s++)
                    kvt_chunk_order(csa + (size_t)s * nc, n_chunks, C, P, W, T,
                                    sel->step_order + ((size_t)h * Gd + s) * T, work,
                                    scord + ((size_t)h * Gd + s) * nc);
            } else if (Gd > 0) {
                sel->step_head[h] = 1;
                for (int s = 0; s < Gd; s++) {
                    for (int i = 0; i < n_chunks; i++)
                        cs[i] = -INFINITY;
                    for (int u = 0; u < per; u++) {
                        int hq = h * per + u;
                        kvt_dot_rows_ref(c->in->q_decode + ((size_t)hq * Gd + s) * D,
                                         c->k + (size_t)(hq / c->Gs) * T * D, P, D, c->scale, z);
                        for (int j = 0; j < P; j++)
                            cs[j / C] = z[j] > cs[j / C] ? z[j] : cs[j / C];
                    }
                    kvt_chunk_order(cs, n_chunks, C, P, W, T,
                                    sel->step_order + ((size_t)h * Gd + s) * T, work,
                                    scord + ((size_t)h * Gd + s) * nc);
                }
            }
        }
    }

    /* counts per budget; ord: the heads by descending sigma (= ascending rho), ties lower */
    kvt_rank_desc_ref(nrho, H, ord, work);
    for (int b = 0; b < n_b; b++) {
        int bb = B[b] - W;
        long total = (long)H * bb;
        long b_stat = n_dyn == 0 ? total : (n_stat == 0 ? 0 : (long)floor(o->split * total));
        long b_dyn = total - b_stat;
        if (n_stat > 0 && bb > 0) {
            long mn = (long)floor(o->floor_frac * bb);
            if (mn * n_stat > b_stat)
                mn = b_stat / n_stat;
            long rem = b_stat - mn * n_stat;
            for (int h = 0; h < H; h++)
                caps[h] = is_static[h] ? (int)mn : 0;
            /* rem by sigma over the static heads below P; a head's share beyond P goes to the
             * others (water-filling), then what no static head can hold to the dynamic heads */
            while (rem > 0) {
                double ssum = 0.0;
                int open = 0;
                for (int h = 0; h < H; h++)
                    if (is_static[h] && caps[h] < P)
                        ssum += 1.0 - rho[h], open++;
                if (open == 0)
                    break;
                long given = 0;
                bool clamped = false;
                for (int h = 0; h < H; h++)
                    if (is_static[h] && caps[h] < P) {
                        double share = ssum > 0 ? (1.0 - rho[h]) / ssum : 1.0 / open;
                        long g = (long)floor((double)rem * share);
                        if (g >= P - caps[h]) /* full: the others share the rest */
                            g = P - caps[h], clamped = true;
                        caps[h] += (int)g;
                        given += g;
                    }
                rem -= given;
                if (clamped)
                    continue;
                /* leftovers one each by descending sigma (= ascending rho), ties lower head */
                for (int i = 0; i < H && rem > 0; i++)
                    if (is_static[ord[i]] && caps[ord[i]] < P) {
                        caps[ord[i]]++;
                        rem--;
                    }
                break;
            }
            b_dyn += rem;
        }
        int dyn_chunks = (n_dyn > 0 && bb > 0) ? (int)((b_dyn / n_dyn) / C) : 0;
        for (int h = 0; h < H; h++) {
            int cnt;
            if (T <= B[b]) /* B = T keeps everything, as for every policy */
                cnt = T;
            else if (bb <= 0)
                cnt = B[b];
            else if (is_static[h])
                cnt = W + caps[h]; /* <= P: the water-filling caps each head at P */
            else
                cnt = W + kvt_chunk_count(cord + (size_t)h * nc, dyn_chunks, n_chunks, C, P);
            sel->count[(size_t)b * H + h] = cnt;
            if (sel->step_head && sel->step_head[h])
                for (int s = 0; s < Gd; s++) {
                    int sc = cnt;
                    if (T > B[b] && bb > 0)
                        sc = W + kvt_chunk_count(scord + ((size_t)h * Gd + s) * nc, dyn_chunks,
                                                 n_chunks, C, P);
                    sel->step_count[((size_t)b * H + h) * Gd + s] = sc;
                }
        }
    }
out_free:
    kvt_free(kd);
    kvt_free(qd);
    kvt_free(zz);
    kvt_free(csa);
    kvt_free(a);
    kvt_free(pooled);
    kvt_free(tmp);
    kvt_free(rho);
    kvt_free(cs);
    kvt_free(z);
    kvt_free(work);
    kvt_free(ord);
    kvt_free(cord);
    kvt_free(scord);
    kvt_free(is_static);
    kvt_free(caps);
    kvt_free(nrho);
    return st;
}

static void d_hybrid(kvt_policy_opts *o)
{
    o->window = 32;
}

const kvt_policy_def kvt_policy_def_hybridkv_like = {
    .name = "hybridkv-like",
    .host_reads = KVT_CTX_PRW | KVT_CTX_KV,
    .summary = "HybridKV-like [inferred]: static heads text-prior, dynamic heads chunk retrieval",
    .keys = "window,kernel,pool,heads,theta,tau,split,chunk,chunk_score,floor",
    .flags = KVT_POLICY_PER_STEP | KVT_POLICY_LIKE | KVT_POLICY_WINDOW_QUERY,
    .defaults = d_hybrid,
    .select = sel_hybrid,
};
