# Reports and recommendations (issue #5): kvtrace recommend on constructed results with
# hand-computed answers (C), and the command on a real replay (exit codes, text, JSON).
kvt_add_test(test_report_recommend SOURCES ${KVT_TEST_DIR}/unit/test_report_recommend.c
             LIBS kvt_report LABELS cpu)
kvt_add_script_test(test_report_recommend_cli
                    COMMAND bash ${KVT_TEST_DIR}/unit/test_report_recommend_cli.sh LABELS cpu)
kvt_add_test(test_report_html SOURCES ${KVT_TEST_DIR}/unit/test_report_html.c
             LIBS kvt_report PkgConfig::CAIRO PkgConfig::CJSON LABELS cpu)
kvt_add_script_test(test_report_html_cli
                    COMMAND bash ${KVT_TEST_DIR}/unit/test_report_html_cli.sh LABELS cpu)
# The pages in headless Chromium (DevTools protocol from Python's stdlib): charts drawn, no
# console error, no dialog, no network request, hostile names shown as text. Exit 77 without
# /usr/bin/chromium. noasan: Chromium is not built with our sanitizers.
kvt_add_script_test(test_report_browser
                    COMMAND bash ${KVT_TEST_DIR}/unit/test_report_browser.sh LABELS cpu noasan
                    TIMEOUT 300)
