/* policy_quest.c - `quest` (POLICIES §15): pages of P tokens (default 16) with per-channel key
 * min/max; at every decode step each head ranks the pages by the upper bound
 * U = sum_c max(q_c*min_c, q_c*max_c) (GQA: max over the group's query heads, group=sum for the
 * sum) and reads the top ceil(B/P) pages (kept tokens = their sizes, measured), plus the page
 * being written: the prompt's last page while it is partial (T not a multiple of P) and the
 * decode tokens have not yet filled it, i.e. at steps s with T % P + s + 1 <= P; once full it
 * is ranked like the others, by the bounds of its prompt keys. Retrieval, not
 * eviction: there is no prompt-time set, so window-query metrics are null and set metrics are
 * averaged over decode steps. The decode tokens themselves are always attended. The first
 * dense_layers layers (default 2, as in the original) stay dense. Ties: lower page first. */
#include "../replay_internal.h"

static kvt_status sel_quest(kvt_layer_ctx *c, const kvt_policy *p, const int *B, int n_b,
                            kvt_layer_selection *sel)
{
    const kvt_policy_opts *o = &p->o;
    KVT_RETURN_IF(c->Gd < 1, KVT_ERR_NOT_FOUND,
                  "quest needs decode queries: the trace has no Q_decode for layer %d", c->layer);
    const int T = c->T, D = c->D, Gd = c->Gd, Pg = o->page, n_pages = (T + Pg - 1) / Pg;
    KVT_FORWARD(kvt_ctx_fetch(c, KVT_CTX_KV));
    KVT_FORWARD(kvt_sel_init(sel, c, o->per_query, 0, n_b, false));
    KVT_FORWARD(kvt_sel_init_steps(sel, Gd));
    const int H = sel->n_heads, per = o->per_query ? 1 : c->Gs;
    float *kmin = kvt_malloc((size_t)n_pages * D * sizeof(float));
    float *kmax = kvt_malloc((size_t)n_pages * D * sizeof(float));
    double *U = kvt_malloc((size_t)n_pages * sizeof(double));
    double *Ug = kvt_malloc((size_t)n_pages * sizeof(double));
    int32_t *pord = kvt_malloc((size_t)n_pages * sizeof(int32_t));
    int32_t *work = kvt_malloc((size_t)n_pages * sizeof(int32_t));
    kvt_status st = KVT_OK;
    if (!kmin || !kmax || !U || !Ug || !pord || !work) {
        st = kvt_error_set(KVT_ERR_NOMEM, "quest: out of memory");
        goto out_free;
    }
    bool dense = c->layer < o->dense_layers;
    for (int h = 0; h < H; h++) {
        int g = kvt_ctx_kv_of(c, o->per_query, h);
        sel->step_head[h] = 1;
        if ((st = kvt_page_bounds_ref(c->k + (size_t)g * T * D, T, D, Pg, kmin, kmax)))
            goto out_free;
        for (int s = 0; s < Gd; s++) {
            for (int i = 0; i < n_pages; i++)
                Ug[i] = 0.0;
            for (int u = 0; u < per; u++) {
                int hq = h * per + u;
                kvt_page_upper_ref(c->in->q_decode + ((size_t)hq * Gd + s) * D, kmin, kmax, n_pages,
                                   D, U);
                for (int i = 0; i < n_pages; i++)
                    Ug[i] = o->group == KVT_REDUCE_SUM ? Ug[i] + U[i]
                            : (u == 0 || U[i] > Ug[i]) ? U[i]
                                                       : Ug[i];
            }
            if (dense)
                for (int i = 0; i < n_pages; i++)
                    pord[i] = i;
            else
                kvt_rank_desc_ref(Ug, n_pages, pord, work);
            /* the page being written: the prompt's last page while it is partial, i.e. while
               the decode tokens (step s writes its own, the s+1-th) have not filled it */
            const int wp = !dense && T % Pg && T % Pg + s + 1 <= Pg ? n_pages - 1 : -1;
            int32_t *ord = sel->step_order + ((size_t)h * Gd + s) * T;
            int t = 0;
            if (wp >= 0)
                for (int j = wp * Pg; j < T; j++)
                    ord[t++] = j;
            const int head = t; /* tokens of the page being written, kept at every budget */
            for (int i = 0; i < n_pages; i++)
                for (int j = pord[i] * Pg; pord[i] != wp && j < T && j < (pord[i] + 1) * Pg; j++)
                    ord[t++] = j;
            for (int b = 0; b < n_b; b++) {
                int cnt = T;
                if (!dense && B[b] < T) {
                    int np = (B[b] + Pg - 1) / Pg;
                    cnt = head;
                    for (int i = 0, taken = 0; taken < np && i < n_pages; i++) {
                        if (pord[i] == wp)
                            continue;
                        int j0 = pord[i] * Pg, j1 = j0 + Pg < T ? j0 + Pg : T;
                        cnt += j1 - j0;
                        taken++;
                    }
                }
                sel->step_count[((size_t)b * H + h) * Gd + s] = cnt;
            }
        }
    }
out_free:
    kvt_free(kmin);
    kvt_free(kmax);
    kvt_free(U);
    kvt_free(Ug);
    kvt_free(pord);
    kvt_free(work);
    return st;
}

const kvt_policy_def kvt_policy_def_quest = {
    .name = "quest",
    .host_reads = KVT_CTX_KV,
    .summary = "Quest: per-decode-step page retrieval by key bounds",
    .keys = "page,dense_layers,group,heads",
    .flags = KVT_POLICY_PER_STEP | KVT_POLICY_NEEDS_DECODE,
    .select = sel_quest,
};
