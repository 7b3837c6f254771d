/* cmd_info.c - `kvtrace info TRACE [--json]`: model and shape, tensors present with raw and
 * compressed bytes and the ratio per kind, modality counts, capture metadata, the decode steps
 * captured against those planned, and anything missing or damaged (recovered traces say what
 * the recovery found). `kvtrace info SEL` of a selection export (replay --export-selection)
 * describes it: layout, version, size against every set written whole, traces, budgets, and
 * per policy its sets' granularity, shape, records and mean kept per budget. A results.json
 * is named as such, with the commands that read it.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "kvt_analysis.h"
#include "kvt_cli.h"
#include "kvt_trace.h"

static void help(void)
{
    printf("usage: kvtrace info TRACE|SELECTION [--json]\n\n"
           "Show a trace's model and shape, the tensors it holds (layers, shape, dtype, raw and\n"
           "compressed bytes, ratio per kind), token modality counts, capture metadata, and\n"
           "whether the trace is complete. --json prints the same as one JSON object.\n\n"
           "layers: how many of the model's layers hold the tensor, whatever the number of\n"
           "records it is split into ('-', and 0 in JSON, for the token tables and metadata,\n"
           "which belong to no layer). G is the decode steps planned; when the trace holds\n"
           "fewer (the capture stopped early, e.g. Ctrl-C, or a recovered trace lost them), the\n"
           "steps it holds come first: G=81 (100 planned; ...). In JSON, \"decode_steps\" has\n"
           "\"planned\", \"captured\" (from the capture's meta_json capture_stats.n_decode, or\n"
           "else the fewest Q_decode steps of any layer: \"captured_from\") and \"stopped_early\"\n"
           "(captured < planned); \"complete\" means the file was finished (index and trailer),\n"
           "not recovered by scanning.\n\n"
           "Given a selection export (kvtrace replay --export-selection, binary or JSON), it\n"
           "shows its layout and version, its size against every set written whole (a set is\n"
           "stored as its changes from the step's or the budget's before where that is\n"
           "smaller), the traces and budgets, and per policy: its sets (KV or query heads, per\n"
           "step, merged), layers, heads, decode steps, records and the mean kept per set at\n"
           "each budget (--json: the same, with \"kind\": \"selection_export\").\n");
}

typedef struct kind_sum {
    uint64_t n_records, raw, comp;
    int n_layers; /* distinct layers >= 0 holding the kind */
    uint32_t heads, toks, dim;
    kvt_dtype dtype;
} kind_sum;

/* one record's place, for counting layers and decode steps per layer */
typedef struct rec_place {
    int kind;
    int32_t layer;
    uint32_t tok_end;
} rec_place;

static int place_cmp(const void *a, const void *b)
{
    const rec_place *x = a, *y = b;
    if (x->kind != y->kind)
        return x->kind < y->kind ? -1 : 1;
    return x->layer < y->layer ? -1 : x->layer > y->layer;
}

/* Records of one tensor are split along heads and tokens, and decode steps are written in
 * chunks, so a layer has any number of records: count each kind's distinct layers (layer -1,
 * the tables, is none). Also returns the decode steps every layer 0..n_layers-1 holds (the
 * fewest Q_decode steps of any layer, 0 if a layer has none). Sorts pl. */
static uint32_t count_layers(rec_place *pl, size_t n, kind_sum *ks, int n_layers)
{
    qsort(pl, n, sizeof(*pl), place_cmp);
    uint32_t dec_min = UINT32_MAX;
    int dec_layers = 0;
    for (size_t i = 0; i < n;) {
        size_t j = i;
        uint32_t toks = 0;
        for (; j < n && pl[j].kind == pl[i].kind && pl[j].layer == pl[i].layer; j++)
            toks = pl[j].tok_end > toks ? pl[j].tok_end : toks;
        if (pl[i].layer >= 0) {
            ks[pl[i].kind].n_layers++;
            if (pl[i].kind == KVT_KIND_Q_DECODE && pl[i].layer < n_layers) {
                dec_layers++;
                dec_min = toks < dec_min ? toks : dec_min;
            }
        }
        i = j;
    }
    return n_layers > 0 && dec_layers == n_layers ? dec_min : 0;
}

/* Decode steps captured: the capture's own count (meta_json capture_stats.n_decode, the steps
 * captured in every layer; the last meta_json that has it), or -1 when no meta_json says
 * (older traces, other writers, a capture killed before its close). */
static int meta_n_decode(const cJSON *meta)
{
    int g = -1;
    for (int i = 0; i < cJSON_GetArraySize(meta); i++) {
        const cJSON *x = cJSON_GetObjectItemCaseSensitive(
            cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(meta, i), "capture_stats"),
            "n_decode");
        if (cJSON_IsNumber(x) && x->valuedouble >= 0 && x->valuedouble <= 2147483647.0)
            g = (int)x->valuedouble;
    }
    return g;
}

static int get_int(const cJSON *o, const char *k)
{
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsNumber(x) ? x->valueint : -1;
}

static const char *get_str(const cJSON *o, const char *k)
{
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsString(x) ? x->valuestring : NULL;
}

/* The text output prints strings from the trace as they are: control bytes in them (an
 * escape sequence a terminal would obey; C1 ones too, as UTF-8) become '?' first (--json
 * escapes them instead). */
static void printable_text(char *s)
{
    for (unsigned char *p = (unsigned char *)s; p && *p; p++) {
        if (*p < 0x20 || *p == 0x7f)
            *p = '?';
        else if (p[0] == 0xc2 && p[1] >= 0x80 && p[1] <= 0x9f) /* C1: U+0080..9F */
            p[0] = p[1] = '?';
    }
}

static void printable_strings(cJSON *j)
{
    for (; j; j = j->next) {
        if (cJSON_IsString(j))
            printable_text(j->valuestring);
        if (!(j->type & cJSON_StringIsConst))
            printable_text(j->string); /* a key (the metadata lines print objects whole) */
        printable_strings(j->child);
    }
}

static double tl_num(const cJSON *o, const char *k)
{
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsNumber(x) ? x->valuedouble : 0.0;
}

/* the capture's GPU timeline summary (meta_json "timeline"), or why there is none */
static void print_timeline(const cJSON *meta)
{
    const cJSON *tl = NULL;
    for (int i = 0; i < cJSON_GetArraySize(meta) && !tl; i++)
        tl = cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(meta, i), "timeline");
    if (!cJSON_IsObject(tl)) {
        printf("\ntimeline   not recorded\n");
        return;
    }
    const cJSON *absent = cJSON_GetObjectItemCaseSensitive(tl, "absent");
    if (cJSON_IsString(absent)) {
        printf("\ntimeline   absent: %s\n", absent->valuestring);
        return;
    }
    double a = tl_num(tl, "attention_ns"), g = tl_num(tl, "gemm_ns"), o = tl_num(tl, "other_ns");
    double cc = tl_num(tl, "capture_copy_ns"), ov = tl_num(tl, "capture_copy_overlap_ns");
    printf("\ntimeline   GPU kernels %.3f ms (attention %.3f, GEMM %.3f, other %.3f ms; %.0f "
           "kernels)\n",
           (a + g + o) / 1e6, a / 1e6, g / 1e6, o / 1e6, tl_num(tl, "n_kernels"));
    printf("           copies %.2f MB in %.3f ms (%.0f); the capture's own %.2f MB in %.3f ms, "
           "%.1f%% of it overlapping compute\n",
           tl_num(tl, "memcpy_bytes") / 1e6, tl_num(tl, "memcpy_ns") / 1e6, tl_num(tl, "n_memcpy"),
           tl_num(tl, "capture_copy_bytes") / 1e6, cc / 1e6, cc > 0 ? 100.0 * ov / cc : 0.0);
}

/* the device path's statistics (meta_json capture_stats.device), when the capture had one */

static void print_device(const cJSON *meta)
{
    const cJSON *dv = NULL;
    for (int i = 0; i < cJSON_GetArraySize(meta) && !dv; i++)
        dv = cJSON_GetObjectItemCaseSensitive(
            cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(meta, i), "capture_stats"),
            "device");
    if (!cJSON_IsObject(dv))
        return;
    printf("device     CUDA device %.0f: %.2f MB copied through %.0f ring slots (at most %.0f in "
           "flight), %.3f ms waiting for a slot; %.1f MB device and %.1f MB pinned memory\n",
           tl_num(dv, "cuda_device"), tl_num(dv, "d2h_bytes") / 1e6, tl_num(dv, "ring_slots"),
           tl_num(dv, "peak_slots_in_flight"), tl_num(dv, "stall_ns") / 1e6,
           tl_num(dv, "device_bytes") / 1e6, tl_num(dv, "pinned_bytes") / 1e6);
    if (tl_num(dv, "other_device_bytes") > 0) /* a model split over GPUs */
        printf("           %.2f MB from tensors on other GPUs, copied to the host and captured "
               "from there\n",
               tl_num(dv, "other_device_bytes") / 1e6);
}

/* ---- a selection export (replay --export-selection), and other kvtrace outputs ---- */

/* A string of the export as printed: control characters made '?' (printable_text), in buf */
static const char *shown(const char *s, char *buf, size_t cap)
{
    snprintf(buf, cap, "%s", s ? s : "");
    printable_text(buf);
    return buf;
}

typedef struct pol_sum {
    int layers, heads, steps;
    size_t records;
    double *kept; /* [n_budgets] summed set sizes, then the mean */
    size_t *n;    /* [n_budgets] sets */
} pol_sum;

static int info_selection(const char *path, bool json, uint32_t hlen)
{
    kvt_selection *sel = NULL;
    kvt_status st = kvt_selection_read(path, &sel);
    if (st)
        return kvt_cli_fail_status("info", st, path);
    const kvt_selection_header *h = kvt_selection_get_header(sel);
    size_t np = h->n_policies, nb = h->n_budgets;
    int rc = 1;
    cJSON *out = NULL;
    pol_sum *ps = kvt_calloc(np ? np : 1, sizeof(*ps));
    size_t npb = np * nb > 0 ? np * nb : 1;
    double *kept = kvt_calloc(npb, sizeof(double));
    size_t *cnt = kvt_calloc(npb, sizeof(size_t));
    if (!ps || !kept || !cnt) {
        kvt_cli_fail("info", "out of memory");
        goto out;
    }
    double whole = 16.0 + hlen + 16.0; /* the binary layout with every set written whole */
    for (size_t i = 0; i < h->n_records; i++) {
        kvt_selection_record rec, *r = &rec; /* its fields: the set is not needed */
        kvt_selection_record_info(sel, i, r);
        ps[r->policy].records++;
        kept[(size_t)r->policy * nb + (size_t)r->budget] += (double)r->n;
        cnt[(size_t)r->policy * nb + (size_t)r->budget]++;
        whole += 36.0 + 4.0 * (double)r->n;
    }
    for (size_t p = 0; p < np; p++) {
        ps[p].kept = kept + p * nb;
        ps[p].n = cnt + p * nb;
        for (size_t t = 0; t < h->n_traces; t++) { /* the largest over the traces */
            int nl, nh, ns;
            kvt_selection_shape(sel, (int)t, (int)p, &nl, &nh, &ns);
            ps[p].layers = nl > ps[p].layers ? nl : ps[p].layers;
            ps[p].heads = nh > ps[p].heads ? nh : ps[p].heads;
            ps[p].steps = ns > ps[p].steps ? ns : ps[p].steps;
        }
    }
    FILE *f = kvt_fopen_regular(path);
    double fbytes = 0;
    if (f && fseek(f, 0, SEEK_END) == 0)
        fbytes = (double)ftell(f);
    if (f)
        fclose(f);

    if (json) {
        out = cJSON_CreateObject();
        if (!out) {
            kvt_cli_fail("info", "out of memory");
            goto out;
        }
        cJSON_AddStringToObject(out, "kind", "selection_export");
        cJSON_AddStringToObject(out, "path", path);
        cJSON_AddStringToObject(out, "layout", h->json ? "json" : "binary");
        cJSON_AddNumberToObject(out, "selection_version", h->selection_version);
        cJSON_AddStringToObject(out, "generator", h->generator);
        cJSON_AddNumberToObject(out, "file_bytes", fbytes);
        if (!h->json)
            cJSON_AddNumberToObject(out, "whole_bytes", whole);
        cJSON *tl = cJSON_AddArrayToObject(out, "traces");
        for (size_t t = 0; t < h->n_traces; t++)
            cJSON_AddItemToArray(tl, cJSON_CreateString(h->traces[t]));
        cJSON *bl = cJSON_AddArrayToObject(out, "budgets");
        for (size_t b = 0; b < nb; b++)
            cJSON_AddItemToArray(bl, cJSON_CreateString(h->budgets[b]));
        if (h->shard_count) {
            cJSON *sh = cJSON_AddObjectToObject(out, "shard");
            cJSON_AddNumberToObject(sh, "index", h->shard_index);
            cJSON_AddNumberToObject(sh, "count", h->shard_count);
        }
        cJSON_AddNumberToObject(out, "records", (double)h->n_records);
        cJSON *pl = cJSON_AddArrayToObject(out, "policies");
        for (size_t p = 0; p < np; p++) {
            const kvt_selection_policy *d = &h->policies[p];
            cJSON *o = cJSON_CreateObject();
            cJSON_AddItemToArray(pl, o);
            cJSON_AddStringToObject(o, "label", d->label);
            cJSON_AddStringToObject(o, "name", d->name);
            cJSON_AddStringToObject(o, "granularity", d->query_heads ? "query_head" : "kv_head");
            cJSON_AddBoolToObject(o, "per_step", d->per_step);
            cJSON_AddBoolToObject(o, "merged", d->merged);
            cJSON_AddNumberToObject(o, "layers", ps[p].layers);
            cJSON_AddNumberToObject(o, "heads", ps[p].heads);
            cJSON_AddNumberToObject(o, "steps", ps[p].steps);
            cJSON_AddNumberToObject(o, "records", (double)ps[p].records);
            cJSON *mk = cJSON_AddArrayToObject(o, "mean_kept");
            for (size_t b = 0; b < nb; b++)
                cJSON_AddItemToArray(
                    mk, ps[p].n[b] ? cJSON_CreateNumber(ps[p].kept[b] / (double)ps[p].n[b])
                                   : cJSON_CreateNull());
        }
        char *js = cJSON_Print(out);
        if (!js) {
            kvt_cli_fail("info", "out of memory");
            goto out;
        }
        kvt_utf8_sanitize(js);
        printf("%s\n", js);
        cJSON_free(js);
        rc = 0;
        goto out;
    }
    char a[24], b[24], txt[4096];
    printf("selection  %s (%s, version %d, %s", path, h->json ? "JSON" : "binary",
           h->selection_version, kvt_cli_bytes_text(fbytes, a, sizeof(a)));
    if (!h->json && whole > fbytes * 1.001)
        printf("; every set whole: %s, %.1fx", kvt_cli_bytes_text(whole, b, sizeof(b)),
               whole / fbytes);
    printf(")\n");
    if (h->shard_count)
        printf("part       shard %d of %d (kvtrace merge joins the parts)\n", h->shard_index,
               h->shard_count);
    printf("generator  %s\n", shown(h->generator, txt, sizeof(txt)));
    for (size_t t = 0; t < h->n_traces; t++)
        printf("%-10s %s\n", t ? "" : "traces", shown(h->traces[t], txt, sizeof(txt)));
    printf("budgets   ");
    for (size_t i = 0; i < nb; i++)
        printf("%s %s", i ? "," : "", shown(h->budgets[i], txt, sizeof(txt)));
    printf("\nrecords    %zu\n\n", h->n_records);
    int wl = 6; /* the policy column: the longest label, up to 48 */
    for (size_t p = 0; p < np; p++) {
        size_t len = strlen(h->policies[p].label);
        wl = len > 48 ? 48 : (int)len > wl ? (int)len : wl;
    }
    printf("%-*s  %-27s %6s %6s %6s %9s\n", wl, "policy", "sets", "layers", "heads", "steps",
           "records");
    for (size_t p = 0; p < np; p++) {
        const kvt_selection_policy *d = &h->policies[p];
        char kind[48];
        snprintf(kind, sizeof(kind), "%s%s%s", d->query_heads ? "query heads" : "KV heads",
                 d->per_step ? ", per step" : "", d->merged ? ", merged" : "");
        printf("%-*s  %-27s %6d %6d %6d %9zu\n", wl, shown(d->label, txt, sizeof(txt)), kind,
               ps[p].layers, ps[p].heads, ps[p].steps, ps[p].records);
        printf("  mean kept:");
        for (size_t i = 0; i < nb; i++) {
            shown(h->budgets[i], txt, sizeof(txt));
            if (ps[p].n[i])
                printf(" %s %.1f", txt, ps[p].kept[i] / (double)ps[p].n[i]);
            else
                printf(" %s -", txt);
            printf(i + 1 < nb ? "," : "\n");
        }
    }
    rc = 0;
out:
    cJSON_Delete(out);
    kvt_free(ps);
    kvt_free(kept);
    kvt_free(cnt);
    kvt_selection_free(sel);
    return rc;
}

int kvt_cmd_info(int argc, char **argv)
{
    const char *path = NULL;
    bool json = false;
    int rc = 1;
    if (kvt_cli_wants_help(argc, argv)) {
        help();
        return 0;
    }
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--json"))
            json = true;
        else if (argv[i][0] == '-' && argv[i][1])
            return kvt_cli_fail("info", "unknown option %s", argv[i]), 2;
        else if (!path)
            path = argv[i];
        else
            return kvt_cli_fail("info", "one trace at a time"), 2;
    }
    if (!path)
        return kvt_cli_fail("info", "no trace given (usage: kvtrace info TRACE [--json])"), 2;

    if (json && !kvt_cli_json_text_ok("info", "the path", path))
        return 1;
    uint32_t hlen;
    int what = kvt_cli_sniff("info", path, &hlen);
    if (what == KVT_CLI_FILE_SELECTION)
        return info_selection(path, json, hlen);
    if (what == KVT_CLI_FILE_RESULTS)
        return 1; /* refused in one line by kvt_cli_sniff */
    kvt_trace_reader *r;
    kvt_status s = kvt_trace_reader_open(path, &r);
    if (s != KVT_OK)
        return kvt_cli_fail_status("info", s, path);
    cJSON *hdr = cJSON_Parse(kvt_trace_reader_header_json(r));
    cJSON *out = cJSON_CreateObject();
    cJSON *meta = cJSON_CreateArray();
    if (!hdr || !out || !meta) {
        kvt_cli_fail("info", "out of memory");
        goto out_free;
    }

    kind_sum ks[KVT_KIND_MAX + 1];
    memset(ks, 0, sizeof(ks));
    uint64_t mods[4] = {0}, n_tok_mod = 0;
    size_t n = kvt_trace_reader_n_records(r), n_pl = 0;
    rec_place *pl = kvt_malloc((n ? n : 1) * sizeof(*pl));
    if (!pl) {
        kvt_cli_fail("info", "out of memory");
        goto out_free;
    }
    for (size_t i = 0; i < n; i++) {
        kvt_record_info in;
        kvt_trace_reader_record(r, i, &in);
        if (in.kind <= 0 || in.kind > KVT_KIND_MAX)
            continue;
        kind_sum *k = &ks[in.kind];
        pl[n_pl++] = (rec_place){.kind = in.kind, .layer = in.layer, .tok_end = in.tok_end};
        k->n_records++;
        k->raw += in.raw_bytes;
        k->comp += in.comp_bytes + 8 + KVT_REC_HEADER_BYTES; /* with its header frame */
        if (in.head_end > k->heads)
            k->heads = in.head_end;
        if (in.tok_end > k->toks)
            k->toks = in.tok_end;
        k->dim = in.dim;
        k->dtype = in.dtype;
        if (in.kind == KVT_KIND_META_JSON) {
            char *txt = kvt_malloc((size_t)in.raw_bytes + 1);
            if (txt && kvt_trace_reader_read_record(r, i, txt, in.raw_bytes) == KVT_OK) {
                txt[in.raw_bytes] = '\0';
                cJSON *m = cJSON_Parse(txt);
                if (m)
                    cJSON_AddItemToArray(meta, m);
            }
            kvt_free(txt);
        }
    }
    uint32_t th, tt, td;
    if (kvt_trace_reader_shape(r, -1, KVT_KIND_MODALITY, &th, &tt, &td, NULL) == KVT_OK) {
        uint8_t *m = kvt_malloc((size_t)tt);
        if (m && kvt_trace_reader_read(r, -1, KVT_KIND_MODALITY, 0, 1, KVT_DTYPE_INVALID, m, tt) ==
                     KVT_OK) {
            for (uint32_t t = 0; t < tt; t++)
                mods[m[t] < 4 ? m[t] : 3]++;
            n_tok_mod = tt;
        }
        kvt_free(m);
    }
    kvt_error_clear();

    int ma, mi;
    kvt_trace_reader_version(r, &ma, &mi);
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(hdr, "model");
    /* decode steps: planned (the header's n_decode) and captured (the capture's count, or for a
     * trace without it, what the records hold in every layer) */
    uint32_t rec_decode = count_layers(pl, n_pl, ks, get_int(model, "n_layers"));
    kvt_free(pl);
    int g_planned = get_int(hdr, "n_decode"), g_meta = meta_n_decode(meta);
    int g_captured = g_meta >= 0 ? g_meta : (int)rec_decode;
    bool g_short = g_planned >= 0 && g_captured < g_planned;
    uint64_t tot_raw = 0, tot_comp = 0;
    for (int k = 1; k <= KVT_KIND_MAX; k++) {
        tot_raw += ks[k].raw;
        tot_comp += ks[k].comp;
    }
    bool recovered = kvt_trace_reader_recovered(r);

    if (json) {
        cJSON *ver = cJSON_AddArrayToObject(out, "format_version");
        cJSON_AddItemToArray(ver, cJSON_CreateNumber(ma));
        cJSON_AddItemToArray(ver, cJSON_CreateNumber(mi));
        cJSON_AddStringToObject(out, "path", path);
        cJSON_AddNumberToObject(out, "file_bytes", (double)kvt_trace_reader_file_bytes(r));
        cJSON_AddBoolToObject(out, "complete", !recovered);
        if (recovered)
            cJSON_AddStringToObject(out, "recovery_note", kvt_trace_reader_recovery_note(r));
        cJSON_AddItemToObject(out, "header", cJSON_Duplicate(hdr, 1));
        cJSON *dec = cJSON_AddObjectToObject(out, "decode_steps");
        if (g_planned >= 0)
            cJSON_AddNumberToObject(dec, "planned", g_planned);
        else
            cJSON_AddNullToObject(dec, "planned");
        cJSON_AddNumberToObject(dec, "captured", g_captured);
        cJSON_AddStringToObject(dec, "captured_from", g_meta >= 0 ? "capture_stats" : "records");
        cJSON_AddBoolToObject(dec, "stopped_early", g_short);
        cJSON *kinds = cJSON_AddObjectToObject(out, "tensors");
        for (int k = 1; k <= KVT_KIND_MAX; k++) {
            if (!ks[k].n_records)
                continue;
            cJSON *o = cJSON_AddObjectToObject(kinds, kvt_kind_name(k));
            cJSON_AddNumberToObject(o, "records", (double)ks[k].n_records);
            cJSON_AddNumberToObject(o, "layers", ks[k].n_layers);
            cJSON *shape = cJSON_AddArrayToObject(o, "shape");
            cJSON_AddItemToArray(shape, cJSON_CreateNumber(ks[k].heads));
            cJSON_AddItemToArray(shape, cJSON_CreateNumber(ks[k].toks));
            cJSON_AddItemToArray(shape, cJSON_CreateNumber(ks[k].dim));
            cJSON_AddStringToObject(o, "dtype", kvt_dtype_name(ks[k].dtype));
            cJSON_AddNumberToObject(o, "raw_bytes", (double)ks[k].raw);
            cJSON_AddNumberToObject(o, "stored_bytes", (double)ks[k].comp);
            cJSON_AddNumberToObject(o, "ratio", ks[k].comp ? (double)ks[k].raw / ks[k].comp : 0);
        }
        if (n_tok_mod) {
            cJSON *mo = cJSON_AddObjectToObject(out, "modality_counts");
            for (int m = 0; m < 4; m++)
                cJSON_AddNumberToObject(mo, kvt_modality_name(m), (double)mods[m]);
        }
        cJSON_AddItemToObject(out, "metadata", meta);
        meta = NULL;
        char *js = cJSON_Print(out);
        if (js) { /* a path or another writer's header string that is not UTF-8: '?' per byte,
                     so that the output is JSON text (cJSON copies such bytes through) */
            kvt_utf8_sanitize(js);
            printf("%s\n", js);
        }
        cJSON_free(js);
        rc = 0;
        goto out_free;
    }

    printable_strings(hdr);
    printable_strings(meta);
    const char *name = get_str(model, "name");
    const cJSON *eng = cJSON_GetObjectItemCaseSensitive(hdr, "engine");
    const char *gpu = get_str(hdr, "gpu");
    char fsz[24];
    printf("trace      %s (format %d.%d, %s)%s\n", path, ma, mi,
           kvt_cli_bytes_text((double)kvt_trace_reader_file_bytes(r), fsz, sizeof(fsz)),
           recovered ? "  ** INCOMPLETE: recovered by scanning **" : "");
    printf("model      %s (%s)\n", name ? name : "?",
           get_str(model, "arch") ? get_str(model, "arch") : "?");
    char g_txt[96];
    if (g_short) /* the capture's own count, or only what the records hold */
        snprintf(g_txt, sizeof(g_txt), "%d (%d planned; %s)", g_captured, g_planned,
                 g_meta >= 0 ? "capture stopped early" : "the records hold fewer");
    else
        snprintf(g_txt, sizeof(g_txt), "%d", g_planned);
    printf("shape      L=%d Hq=%d Hkv=%d D=%d  T=%d W=%d G=%s  kv dtype %s\n",
           get_int(model, "n_layers"), get_int(model, "n_q_heads"), get_int(model, "n_kv_heads"),
           get_int(model, "head_dim"), get_int(hdr, "n_tokens"), get_int(hdr, "window"), g_txt,
           get_str(hdr, "kv_dtype") ? get_str(hdr, "kv_dtype") : "?");
    printf("engine     %s %s%s%s\n", get_str(eng, "name") ? get_str(eng, "name") : "?",
           get_str(eng, "version") ? get_str(eng, "version") : "", gpu ? "  gpu " : "",
           gpu ? gpu : "");
    printf("\n%-18s %6s %9s  %-18s %-5s %12s %12s %7s\n", "tensor", "layers", "records", "shape",
           "dtype", "raw", "stored", "ratio");
    for (int k = 1; k <= KVT_KIND_MAX; k++) {
        if (!ks[k].n_records)
            continue;
        char shape[64], layers[16] = "-";
        snprintf(shape, sizeof(shape), "[%u,%u,%u]", ks[k].heads, ks[k].toks, ks[k].dim);
        if (ks[k].n_layers)
            snprintf(layers, sizeof(layers), "%d", ks[k].n_layers);
        char a[24], b[24];
        printf("%-18s %6s %9llu  %-18s %-5s %12s %12s %6.2fx\n", kvt_kind_name(k), layers,
               (unsigned long long)ks[k].n_records, shape, kvt_dtype_name(ks[k].dtype),
               kvt_cli_bytes_text((double)ks[k].raw, a, sizeof(a)),
               kvt_cli_bytes_text((double)ks[k].comp, b, sizeof(b)),
               ks[k].comp ? (double)ks[k].raw / (double)ks[k].comp : 0.0);
    }
    char a[24], b[24];
    printf("%-18s %6s %9zu  %-18s %-5s %12s %12s %6.2fx\n", "total", "", n, "", "",
           kvt_cli_bytes_text((double)tot_raw, a, sizeof(a)),
           kvt_cli_bytes_text((double)tot_comp, b, sizeof(b)),
           tot_comp ? (double)tot_raw / (double)tot_comp : 0.0);
    printf("(stored: the records' frames; the file adds the header and index)\n");
    if (n_tok_mod)
        printf("\nmodality   text %llu, image %llu, video %llu, other %llu (of %llu tokens)\n",
               (unsigned long long)mods[0], (unsigned long long)mods[1],
               (unsigned long long)mods[2], (unsigned long long)mods[3],
               (unsigned long long)n_tok_mod);
    print_timeline(meta);
    print_device(meta);
    for (int i = 0; i < cJSON_GetArraySize(meta); i++) {
        char *js = cJSON_PrintUnformatted(cJSON_GetArrayItem(meta, i));
        if (js)
            printf("metadata   %s\n", js);
        cJSON_free(js);
    }
    if (recovered)
        printf(
            "\nwarning    %s\n           run 'kvtrace verify %s' for the list of what was lost\n",
            kvt_trace_reader_recovery_note(r), path);
    rc = 0;
out_free:
    cJSON_Delete(meta);
    cJSON_Delete(out);
    cJSON_Delete(hdr);
    kvt_trace_reader_close(r);
    return rc;
}
