# Reports and recommendations (issue #5): kvtrace recommend on constructed results with
# hand-computed answers (C), and the command on a real replay (exit codes, text, JSON).
kvt_add_test(test_report_recommend SOURCES ${KVT_TEST_DIR}/unit/test_report_recommend.c
             LIBS kvt_report LABELS cpu)
kvt_add_script_test(test_report_recommend_cli
                    COMMAND bash ${KVT_TEST_DIR}/unit/test_report_recommend_cli.sh LABELS cpu)
kvt_add_test(test_report_html SOURCES ${KVT_TEST_DIR}/unit/test_report_html.c
             LIBS kvt_report PkgConfig::CAIRO LABELS cpu)
kvt_add_script_test(test_report_html_cli
                    COMMAND bash ${KVT_TEST_DIR}/unit/test_report_html_cli.sh LABELS cpu)
