kvt_add_test(test_trace_roundtrip SOURCES unit/test_trace_roundtrip.c LIBS kvt_traces
             LABELS cpu threads)
kvt_add_test(test_trace_damage SOURCES unit/test_trace_damage.c LIBS kvt_traces LABELS cpu)
kvt_add_script_test(test_trace_cli COMMAND bash ${KVT_TEST_DIR}/unit/test_trace_cli.sh
                    LABELS cpu)
kvt_add_test(test_trace_golden SOURCES unit/test_trace_golden.c LIBS kvt_traces LABELS cpu)
kvt_add_test(test_trace_crc32 SOURCES unit/test_trace_crc32.c LIBS kvt_traces LABELS cpu)
# The fuzz targets (fuzz_trace_read_regression etc.) are registered in fuzz.cmake.
kvt_add_test(test_trace_faults SOURCES unit/test_trace_faults.c LIBS kvt_traces
             LABELS cpu threads)
kvt_add_script_test(test_install COMMAND bash ${KVT_TEST_DIR}/unit/test_install.sh
                    LABELS cpu noasan)
