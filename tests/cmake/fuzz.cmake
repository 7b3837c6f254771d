# Fuzz targets (tests/fuzz/fuzz_<name>.c, libFuzzer entry points). Each one is registered twice:
#  - always, as the ctest fuzz_<name>_regression (label cpu): the entry point linked with
#    fuzz/fuzz_driver.c and run over its checked-in corpus tests/fuzz/corpus/<name>/ (plus
#    extra inputs such as tests/golden), so every input that once crashed stays a test;
#  - with -DKVT_FUZZ=ON (clang), as the libFuzzer executable fuzz_<name> that
#    scripts/fuzz.sh runs for a bounded time.
# kvt_add_fuzz(NAME LIBS kvt_x... [INCLUDES dir...] [DEFINES d...] [EXTRA_INPUTS path...])
function(kvt_add_fuzz name)
    cmake_parse_arguments(F "" "" "LIBS;INCLUDES;DEFINES;EXTRA_INPUTS" ${ARGN})
    set(src ${KVT_TEST_DIR}/fuzz/fuzz_${name}.c)
    kvt_add_test(fuzz_${name}_regression SOURCES ${src} fuzz/fuzz_driver.c LIBS ${F_LIBS}
                 LABELS cpu ARGS ${F_EXTRA_INPUTS} ${KVT_TEST_DIR}/fuzz/corpus/${name})
    target_include_directories(fuzz_${name}_regression PRIVATE ${F_INCLUDES})
    target_compile_definitions(fuzz_${name}_regression PRIVATE ${F_DEFINES})
    if(KVT_FUZZ)
        add_executable(fuzz_${name} ${src})
        kvt_target_defaults(fuzz_${name})
        target_include_directories(fuzz_${name} PRIVATE ${KVT_TEST_DIR} ${F_INCLUDES})
        target_compile_definitions(fuzz_${name} PRIVATE ${F_DEFINES})
        target_link_libraries(fuzz_${name} PRIVATE ${F_LIBS} kvt_common)
        target_link_options(fuzz_${name} PRIVATE -fsanitize=fuzzer)
    endif()
endfunction()

kvt_add_fuzz(trace_read LIBS kvt_traces EXTRA_INPUTS ${KVT_TEST_DIR}/golden)
kvt_add_fuzz(trace_header LIBS kvt_replay kvt_traces INCLUDES ${KVT_SOURCE_ROOT}/traces
             DEFINES KVT_FUZZ_BODY_TRACE="${KVT_TEST_DIR}/golden/v1_small.kvt")
kvt_add_fuzz(results_read LIBS kvt_analysis)
kvt_add_fuzz(results_merge LIBS kvt_analysis)
kvt_add_fuzz(policy_list LIBS kvt_replay)
kvt_add_fuzz(budgets LIBS kvt_replay)
kvt_add_fuzz(selection_read LIBS kvt_analysis)
kvt_add_fuzz(npy_read LIBS kvt_replay INCLUDES ${KVT_SOURCE_ROOT}/replay)
kvt_add_fuzz(safetensors_read LIBS kvt_replay INCLUDES ${KVT_SOURCE_ROOT}/replay)
kvt_add_fuzz(head_table LIBS kvt_replay INCLUDES ${KVT_SOURCE_ROOT}/replay)
kvt_add_fuzz(e2e_read LIBS kvt_report)
kvt_add_fuzz(trace_records LIBS kvt_replay kvt_traces)
kvt_add_fuzz(capture_calls LIBS kvt_capture kvt_replay kvt_traces INCLUDES ${KVT_SOURCE_ROOT}/common)
