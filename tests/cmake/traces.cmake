kvt_add_test(test_trace_roundtrip SOURCES unit/test_trace_roundtrip.c LIBS kvt_traces LABELS cpu)
kvt_add_test(test_trace_damage SOURCES unit/test_trace_damage.c LIBS kvt_traces LABELS cpu)
kvt_add_script_test(test_trace_cli COMMAND bash ${KVT_TEST_DIR}/unit/test_trace_cli.sh
                    LABELS cpu)
kvt_add_test(test_trace_golden SOURCES unit/test_trace_golden.c LIBS kvt_traces LABELS cpu)
# The fuzz entry point as a regression test over the golden files and the checked-in corpus.
kvt_add_test(fuzz_trace_read_regression SOURCES fuzz/fuzz_trace_read.c fuzz/fuzz_driver.c
             LIBS kvt_traces LABELS cpu
             ARGS ${KVT_TEST_DIR}/golden ${KVT_TEST_DIR}/fuzz/corpus/trace_read)
kvt_add_test(test_trace_faults SOURCES unit/test_trace_faults.c LIBS kvt_traces LABELS cpu)
kvt_add_script_test(test_install COMMAND bash ${KVT_TEST_DIR}/unit/test_install.sh
                    LABELS cpu noasan)
if(KVT_FUZZ)
    add_executable(fuzz_trace_read fuzz/fuzz_trace_read.c)
    target_link_libraries(fuzz_trace_read PRIVATE kvt_traces)
    target_link_options(fuzz_trace_read PRIVATE -fsanitize=fuzzer)
endif()
