/* cli_notes.c - the warnings `kvtrace replay` and `kvtrace e2e-llama2c` give about their traces
 * and budgets: a trace recovered by scanning (cut short), layers holding different numbers of
 * decode steps, budgets whose rows a reader would misread. The commands write them to a notes
 * stream and print it once their results are written, so a run that fails says one line, its
 * error.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "kvt_cli.h"
#include "kvt_trace.h"

void kvt_cli_trace_note(FILE *notes, const char *cmd, const char *path, const kvt_trace_reader *rd,
                        int n_layers, kvt_cli_decode_held *dh)
{
    if (notes && kvt_trace_reader_recovered(rd))
        fprintf(notes,
                "kvtrace %s: warning: %s is incomplete (%s): replaying the records it holds "
                "('kvtrace verify' lists what was lost)\n",
                cmd, path, kvt_trace_reader_recovery_note(rd));
    /* the most decode steps a layer holds, and the first layer without decode keys or values
       (a header's layer count past its records is not trusted) */
    *dh = (kvt_cli_decode_held){0, 0, -1};
    for (int l = 0; l < n_layers && (size_t)l < kvt_trace_reader_n_records(rd); l++) {
        uint32_t g = 0, gk = 0, gv = 0;
        if (kvt_trace_reader_shape(rd, l, KVT_KIND_Q_DECODE, NULL, &g, NULL, NULL) == KVT_OK)
            dh->max_g = (int)g > dh->max_g ? (int)g : dh->max_g;
        if (kvt_trace_reader_shape(rd, l, KVT_KIND_K_DECODE, NULL, &gk, NULL, NULL) ||
            kvt_trace_reader_shape(rd, l, KVT_KIND_V_DECODE, NULL, &gv, NULL, NULL))
            gk = gv = 0;
        gk = gv < gk ? gv : gk;
        dh->max_kv = (int)gk > dh->max_kv ? (int)gk : dh->max_kv;
        if (!gk && dh->l_nokv < 0)
            dh->l_nokv = l;
    }
    kvt_error_clear();
}

void kvt_cli_decode_note(FILE *f, const char *cmd, const char *path, const kvt_trace_result *tr,
                         const kvt_cli_decode_held *dh)
{
    if (tr->n_decode > 0 && !tr->has_decode_kv && dh->max_kv > 0 && dh->l_nokv >= 0)
        fprintf(f,
                "kvtrace %s: warning: %s: layer %d lacks the decode steps' keys or values (other "
                "layers hold them): every layer's decode metrics leave the decode tokens' own "
                "keys out, as a trace without them does\n",
                cmd, path, dh->l_nokv);
    int max_g = dh->max_g;
    if (max_g <= tr->n_decode) /* fewer than planned but alike in every layer is a whole
                                  capture (generate stops early, makes G - 1 decode calls) */
        return;
    if (tr->n_decode > 0)
        fprintf(f,
                "kvtrace %s: warning: %s: decode metrics from %d decode steps, those every layer "
                "holds whole (some layers hold %d)\n",
                cmd, path, tr->n_decode, max_g);
    else
        fprintf(f,
                "kvtrace %s: warning: %s: no decode metrics: not every layer holds decode steps "
                "(some hold %d)\n",
                cmd, path, max_g);
}

/* whether every policy keeps the whole prompt in every layer at budget b (with layer_weights=,
 * a layer's budget may be below the budget) */
static bool keeps_all(const kvt_trace_result *tr, size_t b)
{
    for (size_t p = 0; p < tr->n_policies; p++)
        if (tr->min_budget[p * tr->n_budgets + b] < tr->n_tokens)
            return false;
    return true;
}

void kvt_cli_budget_notes(FILE *f, const char *cmd, const char *path, const kvt_trace_result *tr)
{
    char below[512] = "";
    size_t n_all = 0, lb = 0;
    int n_below_pol = 0, wmax = 0, T = tr->n_tokens;
    for (size_t b = 0; b < tr->n_budgets; b++)
        n_all += keeps_all(tr, b);
    for (size_t b = 0; b < tr->n_budgets; b++) {
        int B = tr->budget_tokens[b];
        int n = 0;
        for (size_t p = 0; p < tr->n_policies; p++)
            if (B < tr->policy_window[p] && B < T && tr->policy_window[p] < T) {
                n++;
                wmax = tr->policy_window[p] > wmax ? tr->policy_window[p] : wmax;
            }
        if (n > 1 && lb < sizeof(below)) { /* one such policy ties with none */
            lb += (size_t)snprintf(below + lb, sizeof(below) - lb, "%s%s", lb ? ", " : "",
                                   tr->budget_texts[b]);
            n_below_pol = n > n_below_pol ? n : n_below_pol;
        }
        for (size_t c = 0; c < b && n_all < tr->n_budgets; c++)
            if (tr->budget_tokens[c] == B || (keeps_all(tr, b) && keeps_all(tr, c))) {
                if (!keeps_all(tr, b))
                    fprintf(f,
                            "kvtrace %s: warning: %s: budgets %s and %s are both %d tokens: "
                            "their rows repeat\n",
                            cmd, path, tr->budget_texts[c], tr->budget_texts[b], B);
                else
                    fprintf(f,
                            "kvtrace %s: warning: %s: budgets %s and %s both keep the whole "
                            "prompt (T=%d): their rows repeat\n",
                            cmd, path, tr->budget_texts[c], tr->budget_texts[b], T);
                break;
            }
    }
    if (n_all == tr->n_budgets && n_all) /* one such budget shows as 100.0% kept */
        fprintf(f,
                "kvtrace %s: warning: %s: every budget keeps the whole prompt (T=%d): nothing "
                "is compressed\n",
                cmd, path, T);
    if (lb)
        fprintf(f,
                "kvtrace %s: warning: %s: at budget%s %s, up to %d policies have an "
                "observation window above the budget (up to %d tokens): each keeps only the "
                "window's last B tokens there, so they tie\n",
                cmd, path, strchr(below, ',') ? "s" : "", below, n_below_pol, wmax);
    /* chunk_length=: each chunk keeps at least one token, so a budget under one token per
       chunk keeps more than it names */
    for (size_t p = 0; p < tr->n_policies; p++) {
        if (!(tr->policy_flags[p] & KVT_POLICY_CHUNKED))
            continue;
        char over[256] = "";
        size_t lo = 0;
        double first = 0.0;
        for (size_t b = 0; b < tr->n_budgets; b++) {
            const int B = tr->budget_tokens[b];
            double sum = 0.0;
            int n = 0;
            for (int l = 0; B < T && l < tr->n_layers; l++)
                for (int h = 0; h < tr->policy_heads[p]; h++) {
                    const double k = kvt_trace_result_at(tr, p, b, l, h)->n_keep;
                    if (!isnan(k)) {
                        sum += k;
                        n++;
                    }
                }
            if (n == 0 || sum / n <= 1.01 * B + 0.5 || lo >= sizeof(over))
                continue;
            if (!lo)
                first = sum / n;
            lo += (size_t)snprintf(over + lo, sizeof(over) - lo, "%s%s", lo ? ", " : "",
                                   tr->budget_texts[b]);
        }
        if (lo)
            fprintf(f,
                    "kvtrace %s: warning: %s: %s keeps more than the budget at %s (%.1f "
                    "entries per head at the first): each chunk of chunk_length= keeps at least "
                    "one token, as kvpress's max(1, ...) does, so those rows cost more than "
                    "their budget\n",
                    cmd, path, tr->policy_labels[p], over, first);
    }
    for (size_t p = 0; p < tr->n_policies && n_all < tr->n_budgets; p++)
        if (tr->policy_window[p] >= T)
            fprintf(f,
                    "kvtrace %s: warning: %s: %s's observation window (%d tokens) covers the "
                    "whole prompt (T=%d): it keeps the last B tokens at every budget, nothing "
                    "of its own ranking\n",
                    cmd, path, tr->policy_labels[p], tr->policy_window[p], T);
}
