/* test_common_text.c - UTF-8 validation and repair (common/misc.c), which keep JSON outputs
 * readable when a name comes from a file name in another encoding: hand-worked byte strings
 * (valid 1- to 4-byte sequences, overlong forms, surrogates, past U+10FFFF, stray
 * continuation bytes, cut sequences), and every 1- and 2-byte string against a plain decoder.
 */
#include "kvt_test.h"

/* an independent reading of RFC 3629's table: the length of the well-formed sequence at p */
static int wf_len(const unsigned char *p, size_t n)
{
    unsigned b = p[0];
    if (b < 0x80)
        return 1;
    int len = b >= 0xc2 && b <= 0xdf   ? 2
              : b >= 0xe0 && b <= 0xef ? 3
              : b >= 0xf0 && b <= 0xf4 ? 4
                                       : 0;
    if (!len || (size_t)len > n)
        return 0;
    unsigned lo = 0x80, hi = 0xbf; /* the second byte's range (RFC 3629 section 4) */
    if (b == 0xe0)
        lo = 0xa0;
    else if (b == 0xed)
        hi = 0x9f;
    else if (b == 0xf0)
        lo = 0x90;
    else if (b == 0xf4)
        hi = 0x8f;
    if (p[1] < lo || p[1] > hi)
        return 0;
    for (int k = 2; k < len; k++)
        if (p[k] < 0x80 || p[k] > 0xbf)
            return 0;
    return len;
}

static ptrdiff_t wf_invalid_at(const unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n;) {
        int l = wf_len(p + i, n - i);
        if (!l)
            return (ptrdiff_t)i;
        i += (size_t)l;
    }
    return -1;
}

int main(void)
{
    static const struct {
        const char *s;
        ptrdiff_t bad;
        const char *fixed;
    } cases[] = {
        {"", -1, ""},
        {"stories260K", -1, "stories260K"},
        {"caf\xc3\xa9", -1, "caf\xc3\xa9"},           /* é, 2 bytes */
        {"\xe2\x82\xac 5", -1, "\xe2\x82\xac 5"},     /* €, 3 bytes */
        {"\xf0\x9f\x98\x80", -1, "\xf0\x9f\x98\x80"}, /* U+1F600, 4 bytes */
        {"\xf4\x8f\xbf\xbf", -1, "\xf4\x8f\xbf\xbf"}, /* U+10FFFF, the last */
        {"caf\xe9.bin", 3, "caf?.bin"},               /* Latin-1 é */
        {"\xc0\xaf", 0, "??"},                        /* overlong '/' */
        {"\xe0\x80\xaf", 0, "???"},                   /* overlong, 3 bytes */
        {"\xed\xa0\x80", 0, "???"},                   /* a surrogate, U+D800 */
        {"\xf4\x90\x80\x80", 0, "????"},              /* U+110000 */
        {"a\x80"
         "b",
         1, "a?b"},                              /* a stray continuation byte */
        {"ab\xe2\x82", 2, "ab??"},               /* cut at the end */
        {"\xe2\x82x\xc3\xa9", 0, "??x\xc3\xa9"}, /* cut, then valid again */
        {"\xff\xfe", 0, "??"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        KVT_EXPECT_MSG(kvt_utf8_invalid_at(cases[i].s) == cases[i].bad, "case %zu: %td, want %td",
                       i, kvt_utf8_invalid_at(cases[i].s), cases[i].bad);
        char buf[32];
        snprintf(buf, sizeof(buf), "%s", cases[i].s);
        size_t n_bad = kvt_utf8_sanitize(buf);
        KVT_EXPECT_MSG(!strcmp(buf, cases[i].fixed), "case %zu: sanitized to \"%s\"", i, buf);
        KVT_EXPECT_MSG((n_bad == 0) == (cases[i].bad < 0), "case %zu: %zu replaced", i, n_bad);
        KVT_EXPECT_MSG(kvt_utf8_invalid_at(buf) == -1, "case %zu: still invalid", i);
    }
    /* every string of 1 and 2 non-NUL bytes, and 3 and 4 byte ones from each lead byte with
       boundary continuation bytes, against the independent decoder */
    static const unsigned char cont[] = {0x01, 0x7f, 0x80, 0x8f, 0x90,
                                         0x9f, 0xa0, 0xbf, 0xc0, 0xff};
    int bad = 0;
    for (unsigned a = 1; a < 256; a++) {
        unsigned char s1[2] = {(unsigned char)a, 0};
        bad += kvt_utf8_invalid_at((const char *)s1) != wf_invalid_at(s1, 1);
        for (unsigned b = 1; b < 256; b++) {
            unsigned char s2[3] = {(unsigned char)a, (unsigned char)b, 0};
            bad += kvt_utf8_invalid_at((const char *)s2) != wf_invalid_at(s2, 2);
        }
        for (size_t i = 0; i < sizeof(cont); i++)
            for (size_t j = 0; j < sizeof(cont); j++)
                for (size_t k = 0; k < sizeof(cont); k++) {
                    unsigned char s4[5] = {(unsigned char)a, cont[i], cont[j], cont[k], 0};
                    unsigned char s3[4] = {(unsigned char)a, cont[i], cont[j], 0};
                    bad += kvt_utf8_invalid_at((const char *)s4) != wf_invalid_at(s4, 4);
                    bad += kvt_utf8_invalid_at((const char *)s3) != wf_invalid_at(s3, 3);
                }
    }
    KVT_EXPECT_MSG(bad == 0, "%d byte strings read differently from RFC 3629's table", bad);
    return kvt_test_result("test_common_text");
}
