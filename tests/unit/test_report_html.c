/* test_report_html.c - kvt_report_write on the constructed result with a hostile model name
 * and path: index.html holds them only as escaped text, has no script and fetches nothing; a
 * figure exists for each measured metric (err_decode, recall_window) and none for unmeasured
 * ones, plus the redundancy heatmap (PNG and a hover table); every PNG decodes (cairo), has the
 * expected size and is not a single colour.
 */
#include <cairo.h>
#include <sys/stat.h>

#include "test_report_util.h"

#define HOSTILE "<script>alert(1)</script><b onmouseover=\"x\">&'"

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    rewind(f);
    char *b = malloc((size_t)n + 1);
    size_t got = fread(b, 1, (size_t)n, f);
    b[got] = 0;
    fclose(f);
    return b;
}

static void check_png(const char *dir, const char *name)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/%s.png", dir, name);
    cairo_surface_t *s = cairo_image_surface_create_from_png(path);
    KVT_EXPECT_MSG(cairo_surface_status(s) == CAIRO_STATUS_SUCCESS, "%s does not decode", path);
    if (cairo_surface_status(s) == CAIRO_STATUS_SUCCESS) {
        int w = cairo_image_surface_get_width(s), h = cairo_image_surface_get_height(s);
        KVT_EXPECT(w == 900 && h == 540);
        cairo_surface_flush(s);
        const unsigned char *px = cairo_image_surface_get_data(s);
        int stride = cairo_image_surface_get_stride(s);
        uint32_t first = *(const uint32_t *)px & 0xffffffu;
        long other = 0;
        for (int y = 0; y < h; y++)
            for (int x = 0; x < w; x++)
                other += (*(const uint32_t *)(px + (size_t)y * stride + 4 * (size_t)x) &
                          0xffffffu) != first;
        KVT_EXPECT_MSG(other > 1000, "%s: only %ld pixels differ from the first", path, other);
    }
    cairo_surface_destroy(s);
    remove(path);
}

int main(void)
{
    double rgb[3];
    kvt_report_colormap(0.0, rgb);
    KVT_EXPECT(rgb[0] == 0.267 && rgb[1] == 0.005 && rgb[2] == 0.329); /* viridis ends */
    kvt_report_colormap(1.5, rgb);
    KVT_EXPECT(rgb[0] == 0.993 && rgb[1] == 0.906 && rgb[2] == 0.144);
    kvt_report_colormap(NAN, rgb);
    KVT_EXPECT(rgb[0] == 0.267);

    kvt_results *r = build(HOSTILE, HOSTILE ".kvt");
    KVT_EXPECT_NEAR(kvt_report_redundancy(r, 1, 0), 0.5, 0);
    KVT_EXPECT(isnan(kvt_report_redundancy(r, 2, 0)));
    char dir[256], path[512];
    kvt_test_tmp(dir, sizeof(dir), "report");
    KVT_EXPECT_STATUS(kvt_report_write(r, dir), KVT_OK);
    snprintf(path, sizeof(path), "%s/index.html", dir);
    char *html = slurp(path);
    KVT_EXPECT(html != NULL);
    if (html) {
        KVT_EXPECT(strstr(html,
                          "&lt;script&gt;alert(1)&lt;/script&gt;&lt;b onmouseover=&quot;x&quot;"
                          "&gt;&amp;&#39;") != NULL);
        KVT_EXPECT(strstr(html, "<script") == NULL);
        KVT_EXPECT(strstr(html, "onmouseover=\"") == NULL);
        KVT_EXPECT(strstr(html, "http://") == NULL && strstr(html, "https://") == NULL);
        KVT_EXPECT(strstr(html, "id=\"fig-err_decode\"") != NULL);
        KVT_EXPECT(strstr(html, "id=\"fig-recall_window\"") != NULL);
        KVT_EXPECT(strstr(html, "id=\"fig-coverage\"") == NULL);
        KVT_EXPECT(strstr(html, "id=\"fig-redundancy\"") != NULL);
        KVT_EXPECT(strstr(html, "title=\"layer 1, KV head 1: r = 0.5000\"") != NULL);
        KVT_EXPECT(strstr(html, "src=\"data:image/png;base64,iVBORw0KGgo") != NULL);
        /* err <= 0.1: snapkv at 80 (0.0625); tova reaches 0.125 */
        KVT_EXPECT(strstr(html, "recommended: snapkv at budget 80 ") != NULL);
        free(html);
    }
    remove(path);
    check_png(dir, "err_decode");
    check_png(dir, "recall_window");
    check_png(dir, "redundancy");
    snprintf(path, sizeof(path), "%s/coverage.png", dir);
    struct stat st;
    KVT_EXPECT(stat(path, &st) != 0);
    rmdir(dir);
    kvt_results_free(r);
    kvt_report_global_cleanup(); /* LeakSanitizer: cairo's and fontconfig's caches */
    return kvt_test_result("test_report_html");
}
