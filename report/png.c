/* png.c - PNG figures of `kvtrace report` drawn with cairo (lines, text and PNG output
 * through libpng): one metric against budget, one line per policy, log2 budget axis.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <cairo.h>
#include <fontconfig/fontconfig.h>

#include "report_internal.h"

static const double palette[][3] = {{0.12, 0.47, 0.71}, {1.00, 0.50, 0.05}, {0.17, 0.63, 0.17},
                                    {0.84, 0.15, 0.16}, {0.58, 0.40, 0.74}, {0.55, 0.34, 0.29},
                                    {0.89, 0.47, 0.76}, {0.50, 0.50, 0.50}, {0.74, 0.74, 0.13},
                                    {0.09, 0.75, 0.81}};
#define N_PALETTE (sizeof(palette) / sizeof(palette[0]))

const double *kvt_report_palette(size_t k)
{
    return palette[k % N_PALETTE];
}

void kvt_report_series_style(cairo_t *cr, size_t k, bool ref)
{
    static const double dots[] = {2, 3}, dash_dot[] = {9, 3, 2, 3}, long_dash[] = {14, 4},
                        dash_dots[] = {9, 3, 2, 3, 2, 3}, dashed[] = {6, 4};
    static const double *const pat[] = {NULL, dots, dash_dot, long_dash, dash_dots};
    static const int n_pat[] = {0, 2, 4, 2, 6};
    const double *col = palette[k % N_PALETTE];
    const size_t g = (k / N_PALETTE) % 5;
    cairo_set_source_rgb(cr, col[0], col[1], col[2]);
    if (ref)
        cairo_set_dash(cr, dashed, 2, 0);
    else
        cairo_set_dash(cr, pat[g], n_pat[g], 0);
}

void kvt_report_marker(cairo_t *cr, size_t k, double x, double y, double r)
{
    switch ((k / N_PALETTE) % 5) {
    case 0:
        cairo_new_sub_path(cr);
        cairo_arc(cr, x, y, r, 0, 2 * M_PI);
        break;
    case 1:
        cairo_rectangle(cr, x - r, y - r, 2 * r, 2 * r);
        break;
    case 2: /* triangle up */
        cairo_move_to(cr, x, y - 1.3 * r);
        cairo_line_to(cr, x + 1.2 * r, y + 0.8 * r);
        cairo_line_to(cr, x - 1.2 * r, y + 0.8 * r);
        cairo_close_path(cr);
        break;
    case 3: /* diamond */
        cairo_move_to(cr, x, y - 1.4 * r);
        cairo_line_to(cr, x + 1.4 * r, y);
        cairo_line_to(cr, x, y + 1.4 * r);
        cairo_line_to(cr, x - 1.4 * r, y);
        cairo_close_path(cr);
        break;
    default: /* triangle down */
        cairo_move_to(cr, x, y + 1.3 * r);
        cairo_line_to(cr, x + 1.2 * r, y - 0.8 * r);
        cairo_line_to(cr, x - 1.2 * r, y - 0.8 * r);
        cairo_close_path(cr);
        break;
    }
    cairo_fill(cr);
}

void kvt_report_fit_text(cairo_t *cr, const char *text, double max_w, char *buf, size_t cap)
{
    char src[1024]; /* valid UTF-8 for cairo: a byte that is not (a label cut by a caller's
                       snprintf, a Latin-1 file name) becomes '?' */
    snprintf(src, sizeof(src), "%s", text);
    kvt_utf8_sanitize(src);
    cairo_text_extents_t te;
    size_t n = strlen(src);
    snprintf(buf, cap, "%s", src);
    cairo_text_extents(cr, buf, &te);
    if (te.x_advance <= max_w && n < cap)
        return;
    while (n > 0) { /* drop whole UTF-8 characters until the text and "..." fit */
        do
            n--;
        while (n > 0 && ((unsigned char)src[n] & 0xC0) == 0x80);
        if (n + 4 > cap)
            continue;
        snprintf(buf, cap, "%.*s\xe2\x80\xa6", (int)n, src);
        cairo_text_extents(cr, buf, &te);
        if (te.x_advance <= max_w)
            return;
    }
    snprintf(buf, cap, "\xe2\x80\xa6");
}

void kvt_report_show_fit(cairo_t *cr, const char *text, double max_w)
{
    char fit[512];
    kvt_report_fit_text(cr, text, max_w, fit, sizeof(fit));
    cairo_show_text(cr, fit);
}

void kvt_report_legend_entry(cairo_t *cr, double x, double y, const char *label, size_t k,
                             double max_w)
{
    cairo_move_to(cr, x, y);
    cairo_line_to(cr, x + 22, y);
    cairo_stroke(cr);
    cairo_set_dash(cr, NULL, 0, 0);
    kvt_report_marker(cr, k, x + 11, y, 3);
    cairo_set_source_rgb(cr, 0, 0, 0);
    cairo_move_to(cr, x + 27, y + 4);
    kvt_report_show_fit(cr, label, max_w - 27);
}

int kvt_report_legend_height(int height, double top, size_t n_entries)
{
    const double need = top + 10 + 16.0 * (double)n_entries + 10;
    return need > height ? (int)ceil(need) : height;
}

void kvt_report_nice_axis(double lo, double hi, int max_ticks, double *axis_lo, double *axis_hi,
                          double *step, int *decimals)
{
    static const double mant[] = {1.0, 2.0, 2.5, 5.0};
    if (!(hi > lo) || !isfinite(lo) || !isfinite(hi))
        hi = (isfinite(lo) ? lo : (lo = 0.0)) + 1.0;
    const double span = hi - lo;
    double p = pow(10.0, floor(log10(span / (max_ticks > 0 ? max_ticks : 1)))), s = 10.0 * p;
    int dec = 0;
    for (int k = 0; k < 4; k++)
        if (ceil(span / (mant[k] * p) - 1e-9) <= max_ticks) {
            s = mant[k] * p;
            dec = (int)fmax(0.0, -floor(log10(p) + 1e-9)) + (k == 2);
            break;
        }
    if (s == 10.0 * p)
        dec = (int)fmax(0.0, -floor(log10(s) + 1e-9));
    *step = s;
    *axis_lo = floor(lo / s + 1e-9) * s;
    *axis_hi = ceil(hi / s - 1e-9) * s;
    *decimals = dec;
}

kvt_status kvt_report_save_png(cairo_surface_t *s, const char *path)
{
    kvt_status st = KVT_OK;
    errno = 0; /* cairo does not say why; the failed fopen or fwrite does */
    if (cairo_surface_write_to_png(s, path) != CAIRO_STATUS_SUCCESS)
        st = kvt_error_set(KVT_ERR_IO, "plot: cannot write %s: %s", path,
                           errno ? strerror(errno) : "cairo failed");
    cairo_surface_destroy(s);
    return st;
}

void kvt_report_grid_line(cairo_t *cr, double x0, double y0, double x1, double y1)
{
    cairo_set_source_rgb(cr, 0.90, 0.90, 0.90);
    cairo_set_line_width(cr, 1);
    cairo_move_to(cr, x0, y0);
    cairo_line_to(cr, x1, y1);
    cairo_stroke(cr);
    cairo_set_source_rgb(cr, 0, 0, 0);
}

/* ix[0..n) = 0..n-1 ordered by x (NaN last, ties in order): a line is drawn from the fewest
 * kept entries to the most, whatever order the budgets were given in */
static void order_by(const double *x, size_t n, size_t *ix)
{
    for (size_t b = 0; b < n; b++) {
        size_t i = b;
        while (i > 0 && (isnan(x[ix[i - 1]]) ? !isnan(x[b]) : x[ix[i - 1]] > x[b])) {
            ix[i] = ix[i - 1];
            i--;
        }
        ix[i] = b;
    }
}

kvt_status kvt_report_plot_metric(const kvt_results *r, kvt_rec_metric metric, const char *path,
                                  int width, int height)
{
    KVT_RETURN_IF(width < 200 || height < 150, KVT_ERR_INVALID_ARG, "plot: too small");
    kvt_recommend_opts o = {metric, kvt_rec_metric_is_error(metric), 0.0};
    kvt_recommendation *rec = NULL;
    KVT_FORWARD(kvt_recommend(r, &o, &rec)); /* reuses its curves: value and n_keep */
    /* the x range of the policies' points; full (drawn as a horizontal line across) counts
       only when it is all there is */
    double x0 = INFINITY, x1 = -INFINITY, y0 = INFINITY, y1 = -INFINITY;
    for (int pass = 0; pass < 2 && !(x1 >= x0); pass++)
        for (size_t p = 0; p < rec->n_policies; p++)
            for (size_t b = 0; b < rec->n_budgets; b++) {
                double x = rec->curves[p].n_keep[b], y = rec->curves[p].value[b];
                if (isnan(x) || isnan(y) || x <= 0 ||
                    (pass == 0 && !strcmp(r->policies[p].name, "full")))
                    continue;
                x0 = fmin(x0, x), x1 = fmax(x1, x), y0 = fmin(y0, y), y1 = fmax(y1, y);
            }
    for (size_t p = 0; p < rec->n_policies; p++) /* full's value still sets the y range */
        if (!strcmp(r->policies[p].name, "full") && !isnan(rec->curves[p].value[0]))
            y0 = fmin(y0, rec->curves[p].value[0]), y1 = fmax(y1, rec->curves[p].value[0]);
    kvt_status st = KVT_OK;
    if (!(x1 >= x0)) {
        st = kvt_error_set(KVT_ERR_INVALID_ARG, "plot: nothing measured");
        goto out_free_rec;
    }
    double lx0 = floor(log2(x0)), lx1 = ceil(log2(x1));
    if (lx1 <= lx0)
        lx1 = lx0 + 1;
    double ystep;
    int ydec;
    kvt_report_nice_axis(fmin(0.0, y0), fmax(1.0, y1), 8, &y0, &y1, &ystep, &ydec);
    const int n_yt = (int)lround((y1 - y0) / ystep);
    const double ml = 70, mr = 190, mt = 40, mb = 55; /* margins: legend on the right */
    size_t n_leg = 0; /* the policies with a line: every one in the legend, however many */
    for (size_t p = 0; p < rec->n_policies; p++) {
        const kvt_rec_curve *c = &rec->curves[p];
        bool any = !strcmp(r->policies[p].name, "full") && !isnan(c->value[0]);
        for (size_t b = 0; b < rec->n_budgets && !any; b++)
            any = !isnan(c->n_keep[b]) && !isnan(c->value[b]) && c->n_keep[b] > 0;
        n_leg += any;
    }
    height = kvt_report_legend_height(height, mt, n_leg);
    cairo_surface_t *s = cairo_image_surface_create(CAIRO_FORMAT_RGB24, width, height);
    cairo_t *cr = cairo_create(s);
    const double pw = width - ml - mr, ph = height - mt - mb;
    cairo_set_source_rgb(cr, 1, 1, 1);
    cairo_paint(cr);
    cairo_select_font_face(cr, "sans-serif", CAIRO_FONT_SLANT_NORMAL, CAIRO_FONT_WEIGHT_NORMAL);
    cairo_set_font_size(cr, 13);
    cairo_set_source_rgb(cr, 0, 0, 0);
    char title[1024];
    snprintf(title, sizeof(title), "%s against budget (%s)", kvt_rec_metric_name(metric),
             r->n_traces ? r->traces[0]->model_name : "");
    cairo_move_to(cr, ml, mt - 15);
    kvt_report_show_fit(cr, title, width - ml - 10); /* "..." where it is cut */
    /* grid, axes and ticks: powers of two across, round values up */
    cairo_set_font_size(cr, 11);
    char lab[32];
    cairo_text_extents_t te;
    for (double e = lx0; e <= lx1; e++) {
        double px = ml + (e - lx0) / (lx1 - lx0) * pw;
        kvt_report_grid_line(cr, px, mt, px, mt + ph);
        cairo_move_to(cr, px, mt + ph);
        cairo_line_to(cr, px, mt + ph + 5);
        cairo_stroke(cr);
        snprintf(lab, sizeof(lab), "%.0f", exp2(e));
        cairo_text_extents(cr, lab, &te);
        cairo_move_to(cr, px - te.width / 2 - te.x_bearing, mt + ph + 18);
        cairo_show_text(cr, lab);
    }
    for (int i = 0; i <= n_yt; i++) {
        double v = y0 + ystep * i, py = mt + ph - ph * i / (double)n_yt;
        kvt_report_grid_line(cr, ml, py, ml + pw, py);
        cairo_move_to(cr, ml - 5, py);
        cairo_line_to(cr, ml, py);
        cairo_stroke(cr);
        snprintf(lab, sizeof(lab), "%.*f", ydec, fabs(v) < ystep * 1e-9 ? 0.0 : v);
        cairo_text_extents(cr, lab, &te);
        cairo_move_to(cr, ml - 8 - te.width - te.x_bearing, py + 4);
        cairo_show_text(cr, lab);
    }
    cairo_rectangle(cr, ml, mt, pw, ph);
    cairo_stroke(cr);
    cairo_move_to(cr, ml + pw / 2 - 130, height - 15);
    cairo_show_text(cr, "kept entries per KV head and layer (log scale)");
    cairo_save(cr);
    cairo_move_to(cr, 18, mt + ph / 2 + 30);
    cairo_rotate(cr, -M_PI / 2);
    cairo_show_text(cr, kvt_rec_metric_name(metric));
    cairo_restore(cr);
    /* one line per policy, legend on the right */
    cairo_set_line_width(cr, 2);
    int li = 0;
    size_t *ix = kvt_malloc(rec->n_budgets * sizeof(size_t));
    if (!ix) {
        cairo_destroy(cr);
        cairo_surface_destroy(s);
        st = kvt_error_set(KVT_ERR_NOMEM, "plot: out of memory");
        goto out_free_rec;
    }
    for (size_t p = 0; p < rec->n_policies; p++) {
        const kvt_rec_curve *c = &rec->curves[p];
        bool started = false, any = false, full = !strcmp(r->policies[p].name, "full");
        kvt_report_series_style(cr, p, full || !strcmp(r->policies[p].name, "oracle"));
        if (full && !isnan(c->value[0])) { /* the full cache: a horizontal reference */
            double py = mt + ph - (c->value[0] - y0) / (y1 - y0) * ph;
            cairo_move_to(cr, ml, py);
            cairo_line_to(cr, ml + pw, py);
            any = true;
        }
        order_by(c->n_keep, rec->n_budgets, ix);
        for (size_t bi = 0; bi < rec->n_budgets; bi++) { /* budgets in order of n_keep */
            size_t b = ix[bi];
            double x = c->n_keep[b], y = c->value[b];
            if (full || isnan(x) || isnan(y) || x <= 0)
                continue;
            double px = ml + (log2(x) - lx0) / (lx1 - lx0) * pw;
            double py = mt + ph - (y - y0) / (y1 - y0) * ph;
            if (started)
                cairo_line_to(cr, px, py);
            else
                cairo_move_to(cr, px, py);
            started = any = true;
        }
        cairo_stroke(cr);
        for (size_t b = 0; b < rec->n_budgets && !full; b++) { /* a marker per budget */
            double x = c->n_keep[b], y = c->value[b];
            if (isnan(x) || isnan(y) || x <= 0)
                continue;
            kvt_report_marker(cr, p, ml + (log2(x) - lx0) / (lx1 - lx0) * pw,
                              mt + ph - (y - y0) / (y1 - y0) * ph, 2.5);
        }
        if (!any) {
            cairo_set_dash(cr, NULL, 0, 0);
            continue;
        }
        kvt_report_legend_entry(cr, ml + pw + 10, mt + 10 + 16 * li++, r->policies[p].label, p,
                                mr - 15);
    }
    kvt_free(ix);
    cairo_destroy(cr);
    st = kvt_report_save_png(s, path);
out_free_rec:
    kvt_recommendation_free(rec);
    return st;
}

void kvt_report_colormap(double v, double rgb[3])
{
    /* viridis, 5 stops, linear in between; v clamped to [0, 1] */
    static const double stops[5][3] = {{0.267, 0.005, 0.329},
                                       {0.231, 0.322, 0.545},
                                       {0.129, 0.569, 0.549},
                                       {0.369, 0.788, 0.384},
                                       {0.993, 0.906, 0.144}};
    v = isnan(v) ? 0.0 : fmin(1.0, fmax(0.0, v));
    int i = v >= 1.0 ? 3 : (int)(v * 4);
    double t = v * 4 - i;
    for (int k = 0; k < 3; k++)
        rgb[k] = stops[i][k] + t * (stops[i + 1][k] - stops[i][k]);
}

/* Heatmap of grid [n_rows, n_cols] (rows = layers, top = layer 0) on [0, vmax] with a colour
 * bar, axis labels and ticks; NaN cells grey. */
static kvt_status draw_heatmap(const double *grid, int n_rows, int n_cols, double vmax,
                               const char *title, const char *col_label, const char *path,
                               int width, int height)
{
    KVT_RETURN_IF(width < 200 || height < 150 || n_rows < 1 || n_cols < 1 || !(vmax > 0),
                  KVT_ERR_INVALID_ARG, "plot: too small or empty heatmap");
    cairo_surface_t *s = cairo_image_surface_create(CAIRO_FORMAT_RGB24, width, height);
    cairo_t *cr = cairo_create(s);
    const double ml = 70, mr = 110, mt = 40, mb = 55;
    const double pw = width - ml - mr, ph = height - mt - mb, cw = pw / n_cols, ch = ph / n_rows;
    cairo_set_source_rgb(cr, 1, 1, 1);
    cairo_paint(cr);
    cairo_select_font_face(cr, "sans-serif", CAIRO_FONT_SLANT_NORMAL, CAIRO_FONT_WEIGHT_NORMAL);
    for (int l = 0; l < n_rows; l++)
        for (int h = 0; h < n_cols; h++) {
            double rgb[3], v = grid[(size_t)l * n_cols + h];
            kvt_report_colormap(v / vmax, rgb);
            if (isnan(v))
                rgb[0] = rgb[1] = rgb[2] = 0.85; /* not measured: grey */
            cairo_set_source_rgb(cr, rgb[0], rgb[1], rgb[2]);
            cairo_rectangle(cr, ml + h * cw, mt + l * ch, cw, ch);
            cairo_fill(cr);
        }
    /* colour bar 0..vmax */
    for (int i = 0; i < 100; i++) {
        double rgb[3];
        kvt_report_colormap(i / 99.0, rgb);
        cairo_set_source_rgb(cr, rgb[0], rgb[1], rgb[2]);
        cairo_rectangle(cr, ml + pw + 30, mt + ph - (i + 1) * ph / 100, 20, ph / 100 + 1);
        cairo_fill(cr);
    }
    cairo_set_source_rgb(cr, 0, 0, 0);
    cairo_set_line_width(cr, 1);
    cairo_rectangle(cr, ml, mt, pw, ph);
    cairo_rectangle(cr, ml + pw + 30, mt, 20, ph);
    cairo_stroke(cr);
    cairo_set_font_size(cr, 11);
    char lab[64];
    bool clipped = false; /* a value above vmax: the top label says "or more" */
    for (size_t i = 0; i < (size_t)n_rows * n_cols; i++)
        clipped |= grid[i] > vmax;
    for (int i = 0; i <= 4; i++) { /* counts (a scale past 10): whole numbers without decimals */
        double v = vmax * i / 4.0;
        int dec = vmax < 10 ? 2 : v == floor(v) ? 0 : 1;
        snprintf(lab, sizeof(lab), i == 4 && clipped ? "%.*f+" : "%.*f", dec, v);
        cairo_move_to(cr, ml + pw + 55, mt + ph - ph * i / 4.0 + 4);
        cairo_show_text(cr, lab);
    }
    int step_l = n_rows > 16 ? (n_rows + 15) / 16 : 1,
        step_h = n_cols > 16 ? (n_cols + 15) / 16 : 1;
    for (int l = 0; l < n_rows; l += step_l) {
        snprintf(lab, sizeof(lab), "%d", l);
        cairo_move_to(cr, ml - 25, mt + (l + 0.5) * ch + 4);
        cairo_show_text(cr, lab);
    }
    for (int h = 0; h < n_cols; h += step_h) {
        snprintf(lab, sizeof(lab), "%d", h);
        cairo_move_to(cr, ml + (h + 0.5) * cw - 4, mt + ph + 16);
        cairo_show_text(cr, lab);
    }
    cairo_move_to(cr, ml + pw / 2 - 25, height - 15);
    cairo_show_text(cr, col_label);
    cairo_save(cr);
    cairo_move_to(cr, 25, mt + ph / 2 + 15);
    cairo_rotate(cr, -M_PI / 2);
    cairo_show_text(cr, "layer");
    cairo_restore(cr);
    cairo_set_font_size(cr, 13);
    cairo_move_to(cr, ml, mt - 15);
    kvt_report_show_fit(cr, title, width - ml - 10); /* "..." where it is cut */
    cairo_destroy(cr);
    return kvt_report_save_png(s, path);
}

kvt_status kvt_report_plot_head_keep(const kvt_results *r, size_t pol, size_t bud, const char *path,
                                     int width, int height)
{
    KVT_RETURN_IF(r->n_traces == 0 || pol >= r->n_policies || bud >= r->n_budgets,
                  KVT_ERR_INVALID_ARG, "plot: bad policy or budget");
    const kvt_trace_result *t = r->traces[0];
    int L = t->n_layers, H = t->policy_heads[pol];
    size_t n;
    KVT_RETURN_IF(L < 1 || H < 1 || kvt_mul_overflow((size_t)L * H, sizeof(double), &n),
                  KVT_ERR_INVALID_ARG, "plot: bad shape");
    double *grid = kvt_malloc(n), vmax = 0.0;
    KVT_RETURN_IF(!grid, KVT_ERR_NOMEM, "plot: out of memory");
    for (int l = 0; l < L; l++)
        for (int h = 0; h < H; h++)
            grid[(size_t)l * H + h] = kvt_report_head_keep(r, pol, bud, l, h);
    /* one colour scale for every allocating policy with this kind of head at this budget, so
       that their figures compare (as the page's tables) */
    for (size_t q = 0; q < r->n_policies; q++) {
        if (t->policy_heads[q] != H || (q != pol && !kvt_report_policy_allocates(r, q)))
            continue;
        for (int l = 0; l < L; l++)
            for (int h = 0; h < H; h++) {
                double v = kvt_report_head_keep(r, q, bud, l, h);
                vmax = v > vmax ? v : vmax;
            }
    }
    char title[1024];
    snprintf(title, sizeof(title), "kept entries per layer and head: %s at budget %s (%s)",
             r->policies[pol].label, r->budgets[bud].text, t->model_name);
    kvt_status st =
        vmax > 0 ? draw_heatmap(grid, L, H, vmax, title,
                                H == t->n_kv_heads ? "KV head" : "query head", path, width, height)
                 : kvt_error_set(KVT_ERR_INVALID_ARG, "plot: nothing kept");
    kvt_free(grid);
    return st;
}

kvt_status kvt_report_plot_redundancy(const kvt_results *r, const char *path, int width, int height)
{
    KVT_RETURN_IF(r->n_traces == 0, KVT_ERR_INVALID_ARG, "plot: no trace");
    const kvt_trace_result *t = r->traces[0];
    int L = t->n_layers, H = t->n_kv_heads;
    size_t n;
    KVT_RETURN_IF(L < 1 || H < 1 || kvt_mul_overflow((size_t)L * H, sizeof(double), &n),
                  KVT_ERR_INVALID_ARG, "plot: bad shape");
    double *grid = kvt_malloc(n);
    KVT_RETURN_IF(!grid, KVT_ERR_NOMEM, "plot: out of memory");
    for (int l = 0; l < L; l++)
        for (int h = 0; h < H; h++)
            grid[(size_t)l * H + h] = kvt_report_redundancy(r, l, h);
    char title[1024];
    snprintf(title, sizeof(title), "head redundancy r of all keys (%s)", t->model_name);
    kvt_status st = draw_heatmap(grid, L, H, 1.0, title, "KV head", path, width, height);
    kvt_free(grid);
    return st;
}

kvt_status kvt_report_plot_head_metric(const kvt_results *r, size_t pol, size_t bud,
                                       kvt_rec_metric metric, double vmax, const char *path,
                                       int width, int height)
{
    KVT_RETURN_IF(r->n_traces == 0 || pol >= r->n_policies || bud >= r->n_budgets ||
                      !kvt_rec_metric_name(metric),
                  KVT_ERR_INVALID_ARG, "plot: bad policy, budget or metric");
    const kvt_trace_result *t = r->traces[0];
    int L = t->n_layers, H = t->policy_heads[pol];
    size_t n;
    KVT_RETURN_IF(L < 1 || H < 1 || kvt_mul_overflow((size_t)L * H, sizeof(double), &n),
                  KVT_ERR_INVALID_ARG, "plot: bad shape");
    double *grid = kvt_malloc(n);
    KVT_RETURN_IF(!grid, KVT_ERR_NOMEM, "plot: out of memory");
    for (int l = 0; l < L; l++)
        for (int h = 0; h < H; h++)
            grid[(size_t)l * H + h] = kvt_report_head_value(r, pol, bud, metric, l, h);
    char title[1024];
    snprintf(title, sizeof(title), "%s per layer and head: %s at budget %s (%s)",
             kvt_rec_metric_name(metric), r->policies[pol].label, r->budgets[bud].text,
             t->model_name);
    kvt_status st =
        draw_heatmap(grid, L, H, vmax, title, H == t->n_kv_heads ? "KV head" : "query head", path,
                     width, height);
    kvt_free(grid);
    return st;
}

/* Lines over categories: y [n_series, n_x] (NaN = gap) against the x labels, y axis from 0 to
 * y_max, legend on the right (series that have no point are left out of it). */
typedef struct line_fig {
    const char *title, *x_title, *y_title;
    size_t n_x, n_series;
    const char *const *x_labels;      /* [n_x] */
    const char *const *series_labels; /* [n_series] */
    const double *y;                  /* [n_series, n_x] */
    const bool *dashed;               /* [n_series] or NULL */
    double y_max;
} line_fig;

static kvt_status draw_lines(const line_fig *fg, const char *path, int width, int height)
{
    KVT_RETURN_IF(width < 200 || height < 150 || fg->n_x < 1, KVT_ERR_INVALID_ARG,
                  "plot: too small or empty");
    const double ml = 70, mr = 190, mt = 40, mb = 55;
    size_t n_leg = 0; /* the series with a point: every one in the legend */
    for (size_t k = 0; k < fg->n_series; k++) {
        bool any = false;
        for (size_t i = 0; i < fg->n_x && !any; i++)
            any = !isnan(fg->y[k * fg->n_x + i]);
        n_leg += any;
    }
    height = kvt_report_legend_height(height, mt, n_leg);
    cairo_surface_t *s = cairo_image_surface_create(CAIRO_FORMAT_RGB24, width, height);
    cairo_t *cr = cairo_create(s);
    const double pw = width - ml - mr, ph = height - mt - mb;
    double y_lo, y_max, ystep; /* round ticks from 0 (kvt_report_nice_axis) */
    int ydec;
    kvt_report_nice_axis(0.0, fg->y_max > 0 ? fg->y_max : 1.0, 8, &y_lo, &y_max, &ystep, &ydec);
    const int n_yt = (int)lround(y_max / ystep);
    /* categories at the centres of n_x equal slots */
    const double slot = pw / (double)fg->n_x;
    cairo_set_source_rgb(cr, 1, 1, 1);
    cairo_paint(cr);
    cairo_select_font_face(cr, "sans-serif", CAIRO_FONT_SLANT_NORMAL, CAIRO_FONT_WEIGHT_NORMAL);
    cairo_set_source_rgb(cr, 0, 0, 0);
    cairo_set_font_size(cr, 13);
    cairo_move_to(cr, ml, mt - 15);
    kvt_report_show_fit(cr, fg->title, width - ml - 10); /* "..." where it is cut */
    cairo_set_font_size(cr, 11);
    char lab[32];
    for (int i = 0; i <= n_yt; i++) /* grid first, under the axes and lines */
        kvt_report_grid_line(cr, ml, mt + ph - ph * i / (double)n_yt, ml + pw,
                             mt + ph - ph * i / (double)n_yt);
    cairo_set_line_width(cr, 1);
    cairo_rectangle(cr, ml, mt, pw, ph);
    cairo_stroke(cr);
    size_t step = fg->n_x > 16 ? (fg->n_x + 15) / 16 : 1;
    for (size_t i = 0; i < fg->n_x; i += step) {
        double px = ml + (i + 0.5) * slot;
        cairo_move_to(cr, px, mt + ph);
        cairo_line_to(cr, px, mt + ph + 5);
        cairo_stroke(cr);
        cairo_text_extents_t ext;
        cairo_text_extents(cr, fg->x_labels[i], &ext);
        cairo_move_to(cr, px - ext.width / 2, mt + ph + 18);
        cairo_show_text(cr, fg->x_labels[i]);
    }
    for (int i = 0; i <= n_yt; i++) {
        double v = ystep * i, py = mt + ph - ph * i / (double)n_yt;
        cairo_move_to(cr, ml - 5, py);
        cairo_line_to(cr, ml, py);
        cairo_stroke(cr);
        snprintf(lab, sizeof(lab), "%.*f", ydec, v);
        cairo_text_extents_t te;
        cairo_text_extents(cr, lab, &te);
        cairo_move_to(cr, ml - 8 - te.width - te.x_bearing, py + 4);
        cairo_show_text(cr, lab);
    }
    cairo_text_extents_t ext;
    cairo_text_extents(cr, fg->x_title, &ext);
    cairo_move_to(cr, ml + pw / 2 - ext.width / 2, height - 15);
    cairo_show_text(cr, fg->x_title);
    cairo_save(cr);
    cairo_text_extents(cr, fg->y_title, &ext);
    cairo_move_to(cr, 18, mt + ph / 2 + ext.width / 2);
    cairo_rotate(cr, -M_PI / 2);
    cairo_show_text(cr, fg->y_title);
    cairo_restore(cr);
    cairo_set_line_width(cr, 2);
    int li = 0;
    for (size_t k = 0; k < fg->n_series; k++) {
        const double *y = fg->y + k * fg->n_x;
        bool started = false, any = false;
        kvt_report_series_style(cr, k, fg->dashed && fg->dashed[k]);
        for (size_t i = 0; i < fg->n_x; i++) {
            double px = ml + (i + 0.5) * slot, py = mt + ph - fmin(y[i], y_max) / y_max * ph;
            if (isnan(y[i])) {
                started = false;
                continue;
            }
            if (!started)
                cairo_move_to(cr, px, py);
            else
                cairo_line_to(cr, px, py);
            started = any = true;
        }
        cairo_stroke(cr);
        for (size_t i = 0; i < fg->n_x; i++) /* a marker per point */
            if (!isnan(y[i]))
                kvt_report_marker(cr, k, ml + (i + 0.5) * slot,
                                  mt + ph - fmin(y[i], y_max) / y_max * ph, 2.5);
        if (!any) {
            cairo_set_dash(cr, NULL, 0, 0);
            continue;
        }
        kvt_report_legend_entry(cr, ml + pw + 10, mt + 10 + 16 * li++, fg->series_labels[k], k,
                                mr - 15);
    }
    cairo_destroy(cr);
    return kvt_report_save_png(s, path);
}

static const char *const mod_names[KVT_N_MODALITIES] = {"text", "image", "video", "other"};

kvt_status kvt_report_plot_modality(const kvt_results *r, int m, const char *path, int width,
                                    int height)
{
    KVT_RETURN_IF(m < 0 || m >= KVT_N_MODALITIES || r->n_traces == 0 ||
                      !(kvt_report_modality_tokens(r, m) > 0),
                  KVT_ERR_INVALID_ARG, "plot: no tokens of modality %d", m);
    size_t P = r->n_policies, B = r->n_budgets, n;
    KVT_RETURN_IF(kvt_mul_overflow(P * B, sizeof(double), &n), KVT_ERR_INVALID_ARG,
                  "plot: too many runs");
    double *y = kvt_malloc(n);
    const char **x_labels = kvt_malloc(B * sizeof(*x_labels));
    const char **labels = kvt_malloc(P * sizeof(*labels));
    bool *dashed = kvt_malloc(P * sizeof(*dashed));
    size_t *order = kvt_malloc(B * sizeof(*order));
    kvt_status st = KVT_OK;
    if (!y || !x_labels || !labels || !dashed || !order) {
        st = kvt_error_set(KVT_ERR_NOMEM, "plot: out of memory");
        goto out_free;
    }
    kvt_report_budget_order(r, order); /* the category axis, smallest budget first */
    for (size_t b = 0; b < B; b++)
        x_labels[b] = r->budgets[order[b]].text;
    for (size_t p = 0; p < P; p++) {
        labels[p] = r->policies[p].label;
        dashed[p] = !strcmp(r->policies[p].name, "full") || !strcmp(r->policies[p].name, "oracle");
        for (size_t b = 0; b < B; b++)
            y[p * B + b] = kvt_report_modality_share(r, p, order[b], m);
    }
    char title[1024];
    snprintf(title, sizeof(title), "share of %s tokens kept, per policy and budget (%s)",
             mod_names[m], r->traces[0]->model_name);
    line_fig fg = {title,
                   "budget (tokens per head and layer, smallest first)",
                   "share of tokens kept",
                   B,
                   P,
                   x_labels,
                   labels,
                   y,
                   dashed,
                   1.0};
    st = draw_lines(&fg, path, width, height);
out_free:
    kvt_free(order);
    kvt_free(dashed);
    kvt_free(labels);
    kvt_free(x_labels);
    kvt_free(y);
    return st;
}

kvt_status kvt_report_plot_layer_keep(const kvt_results *r, size_t pol, const char *path, int width,
                                      int height)
{
    KVT_RETURN_IF(r->n_traces == 0 || pol >= r->n_policies, KVT_ERR_INVALID_ARG,
                  "plot: bad policy");
    int L = r->traces[0]->n_layers;
    size_t B = r->n_budgets, n;
    KVT_RETURN_IF(L < 1 || kvt_mul_overflow((size_t)L * B, sizeof(double), &n), KVT_ERR_INVALID_ARG,
                  "plot: bad shape");
    double *y = kvt_malloc(n);
    char *x_text = kvt_malloc((size_t)L * 12);
    const char **x_labels = kvt_malloc((size_t)L * sizeof(*x_labels));
    const char **labels = kvt_malloc(B * sizeof(*labels));
    char *b_text = kvt_malloc(B * 40);
    size_t *order = kvt_malloc(B * sizeof(*order));
    kvt_status st = KVT_OK;
    if (!y || !x_text || !x_labels || !labels || !b_text || !order) {
        st = kvt_error_set(KVT_ERR_NOMEM, "plot: out of memory");
        goto out_free;
    }
    kvt_report_budget_order(r, order); /* the legend, smallest budget first */
    double y_max = 0.0;
    for (int l = 0; l < L; l++) {
        snprintf(x_text + (size_t)l * 12, 12, "%d", l);
        x_labels[l] = x_text + (size_t)l * 12;
    }
    for (size_t b = 0; b < B; b++) {
        snprintf(b_text + b * 40, 40, "budget %s", r->budgets[order[b]].text);
        labels[b] = b_text + b * 40;
        for (int l = 0; l < L; l++) {
            double v = kvt_report_layer_keep(r, pol, order[b], l);
            y[b * L + l] = v;
            if (!isnan(v))
                y_max = fmax(y_max, v);
        }
    }
    char title[1024];
    snprintf(title, sizeof(title), "kept entries per head by layer: %s, one line per budget",
             r->policies[pol].label);
    line_fig fg = {title, "layer", "mean kept entries per head", (size_t)L, B, x_labels, labels, y,
                   NULL,  y_max};
    st = draw_lines(&fg, path, width, height);
out_free:
    kvt_free(order);
    kvt_free(b_text);
    kvt_free(labels);
    kvt_free(x_labels);
    kvt_free(x_text);
    kvt_free(y);
    return st;
}

double kvt_report_redundancy(const kvt_results *r, int layer, int head)
{
    double sum = 0.0;
    int n = 0;
    for (size_t i = 0; i < r->n_traces; i++) {
        const kvt_trace_result *t = r->traces[i];
        if (layer >= t->n_layers || head >= t->n_kv_heads)
            continue;
        double v = t->r_all[(size_t)layer * t->n_kv_heads + head];
        if (!isnan(v))
            sum += v, n++;
    }
    return n ? sum / n : NAN;
}

void kvt_report_global_cleanup(void)
{
    cairo_debug_reset_static_data();
    FcFini();
}
