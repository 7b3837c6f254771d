# cuemu: the CUDA sources (kernels/cuda, the capture's device path, replay --device cuda) and
# their GPU tests built with the host C++ compiler over a CPU stand-in for CUDA
# (tests/cuemu/README.md), so that they run here and in CI on every change; the same tests
# also run on a real GPU (label gpu). In the sanitizer pass the kernels are instrumented too, so
# a kernel reading or writing outside its buffers is caught there (test_kernels_cuemu and
# test_capture_device_cuemu; the column-sum and replay ones take 5 and 14 minutes under ASan:
# label noasan). Not in the fuzz build.
include(CheckLanguage)
check_language(CXX)
if(CMAKE_CXX_COMPILER AND KVT_SYS_PYTHON AND NOT KVT_FUZZ)
    enable_language(CXX)
    set(KVT_CUEMU_DIR ${KVT_TEST_DIR}/cuemu)
    set(KVT_CUEMU_CU kernels/cuda/attn_cuda.cu kernels/cuda/coverage_cuda.cu
                     kernels/cuda/norms_cuda.cu kernels/cuda/scores_cuda.cu
                     kernels/cuda/sweep_cuda.cu kernels/cuda/device_cuda.cu
                     kernels/cuda/convert_cuda.cu
                     capture/capture_cuda.cu capture/colsum_cuda.cu)
    set(KVT_CUEMU_GEN "")
    file(MAKE_DIRECTORY ${CMAKE_CURRENT_BINARY_DIR}/cuemu) # Ninja makes it; Make does not
    foreach(cu IN LISTS KVT_CUEMU_CU)
        get_filename_component(base ${cu} NAME_WE)
        set(out ${CMAKE_CURRENT_BINARY_DIR}/cuemu/${base}.cpp)
        add_custom_command(OUTPUT ${out}
                           COMMAND ${KVT_SYS_PYTHON} ${KVT_CUEMU_DIR}/cuemu_pp.py
                                   ${PROJECT_SOURCE_DIR}/${cu} ${out}
                           DEPENDS ${PROJECT_SOURCE_DIR}/${cu} ${KVT_CUEMU_DIR}/cuemu_pp.py
                           COMMENT "cuemu: ${cu}" VERBATIM)
        list(APPEND KVT_CUEMU_GEN ${out})
    endforeach()
    set(KVT_CUEMU_INC ${KVT_CUEMU_DIR} ${PROJECT_SOURCE_DIR}/common ${PROJECT_SOURCE_DIR}/traces
                      ${PROJECT_SOURCE_DIR}/kernels ${PROJECT_SOURCE_DIR}/kernels/cuda
                      ${PROJECT_SOURCE_DIR}/capture ${PROJECT_SOURCE_DIR}/replay
                      ${PROJECT_SOURCE_DIR}/analysis ${PROJECT_SOURCE_DIR}/report
                      ${PROJECT_SOURCE_DIR}/cli ${KVT_TEST_DIR})
    # the emulated CUDA code, plus the host code that calls it (capture session, replay), built
    # again against the stand-in headers; everything else is the modules' own objects
    file(GLOB KVT_CUEMU_REPLAY ${PROJECT_SOURCE_DIR}/replay/*.c
         ${PROJECT_SOURCE_DIR}/replay/policies/*.c)
    add_library(kvt_cuemu STATIC
                ${KVT_CUEMU_GEN} ${KVT_CUEMU_DIR}/cuemu_device.cpp
                ${KVT_CUEMU_DIR}/cuemu_runtime.c ${KVT_CUEMU_DIR}/rank_cuemu.c
                ${PROJECT_SOURCE_DIR}/capture/capture_session.c
                ${PROJECT_SOURCE_DIR}/capture/llama2c.c ${PROJECT_SOURCE_DIR}/capture/timeline.c
                ${PROJECT_SOURCE_DIR}/capture/cupti_timeline.c
                ${KVT_CUEMU_REPLAY} ${PROJECT_SOURCE_DIR}/replay/cuda/ctx_gpu.c)
    kvt_target_defaults(kvt_cuemu)
    target_include_directories(kvt_cuemu BEFORE PUBLIC ${KVT_CUEMU_INC})
    target_compile_options(kvt_cuemu PRIVATE
                           $<$<COMPILE_LANGUAGE:CXX>:-std=c++17 -ffp-contract=off -Wno-unused-function>)
    if(KVT_SANITIZE) # the kernels too: a stray device access is a host access here
        target_compile_options(kvt_cuemu PRIVATE
            $<$<COMPILE_LANGUAGE:CXX>:-fsanitize=address,undefined -fno-omit-frame-pointer>)
    endif()
    target_link_libraries(kvt_cuemu PUBLIC PkgConfig::CJSON PkgConfig::ZSTD ZLIB::ZLIB
                                           Threads::Threads m ${CMAKE_DL_LIBS})
    set(KVT_CUEMU_OBJS $<TARGET_OBJECTS:kvt_common> $<TARGET_OBJECTS:kvt_traces>
                       $<TARGET_OBJECTS:kvt_kernels>)
    set(KVT_CUEMU_LIBS kvt_cuemu)
    if(KVT_HAVE_BLAS)
        list(APPEND KVT_CUEMU_LIBS PkgConfig::OPENBLAS)
    endif()

    # the GPU tests, unchanged, on the stand-in
    foreach(t test_kernels_cuda test_capture_device_gpu test_capture_colsum_gpu)
        string(REPLACE "_gpu" "" tn ${t})
        string(REPLACE "_cuda" "" tn ${tn})
        add_executable(${tn}_cuemu ${KVT_TEST_DIR}/unit/${t}.c ${KVT_CUEMU_OBJS})
        kvt_target_defaults(${tn}_cuemu)
        target_link_libraries(${tn}_cuemu PRIVATE ${KVT_CUEMU_LIBS})
        set_target_properties(${tn}_cuemu PROPERTIES LINKER_LANGUAGE CXX)
        add_test(NAME ${tn}_cuemu COMMAND ${tn}_cuemu)
        set(labels "cpu")
        if(tn STREQUAL "test_capture_colsum")
            set(labels "cpu;noasan")
        elseif(tn STREQUAL "test_capture_device") # the async capture pipeline's threads
            set(labels "cpu;threads")
        endif()
        set_tests_properties(${tn}_cuemu PROPERTIES LABELS "${labels}" SKIP_RETURN_CODE 77
                             TIMEOUT 600
                             ENVIRONMENT "KVT_COLSUM_BENCH_T=0;KVT_TEST_DELAY_BYTES=4096;CUEMU_DEVICES=2")
    endforeach()

    # two fuzz targets again, with device code (KVT_FUZZ_CUDA), over their corpora: the capture
    # API's contract under any order of calls with device views where the input says so
    # (streams deferred too), and the whole replay with --device cuda against the CPU's on
    # traces whose records do not fit together
    foreach(f capture_calls trace_records)
        add_executable(fuzz_${f}_cuemu ${KVT_TEST_DIR}/fuzz/fuzz_${f}.c
                       ${KVT_TEST_DIR}/fuzz/fuzz_driver.c ${KVT_CUEMU_OBJS})
        kvt_target_defaults(fuzz_${f}_cuemu)
        target_compile_definitions(fuzz_${f}_cuemu PRIVATE KVT_FUZZ_CUDA)
        target_link_libraries(fuzz_${f}_cuemu PRIVATE ${KVT_CUEMU_LIBS})
        set_target_properties(fuzz_${f}_cuemu PROPERTIES LINKER_LANGUAGE CXX)
    endforeach()
    add_test(NAME fuzz_trace_records_cuemu COMMAND fuzz_trace_records_cuemu
             ${KVT_TEST_DIR}/fuzz/corpus/trace_records)
    set_tests_properties(fuzz_trace_records_cuemu PROPERTIES LABELS "cpu;noasan" TIMEOUT 600)
    foreach(defer 0 1)
        add_test(NAME fuzz_capture_calls_cuemu_defer${defer} COMMAND fuzz_capture_calls_cuemu
                 ${KVT_TEST_DIR}/fuzz/corpus/capture_calls)
        set_tests_properties(fuzz_capture_calls_cuemu_defer${defer} PROPERTIES
                             LABELS "cpu;threads" TIMEOUT 600 ENVIRONMENT "CUEMU_DEFER=${defer}")
    endforeach()

    # the stand-in's several devices (CUEMU_DEVICES) keep CUDA's rules (the multi-GPU replay's
    # test relies on them)
    add_executable(test_cuemu_devices ${KVT_TEST_DIR}/unit/test_cuemu_devices.c ${KVT_CUEMU_OBJS})
    kvt_target_defaults(test_cuemu_devices)
    target_link_libraries(test_cuemu_devices PRIVATE ${KVT_CUEMU_LIBS} Threads::Threads)
    set_target_properties(test_cuemu_devices PROPERTIES LINKER_LANGUAGE CXX)
    add_test(NAME test_cuemu_devices COMMAND test_cuemu_devices)
    set_tests_properties(test_cuemu_devices PROPERTIES LABELS "cpu" TIMEOUT 60)

    # the stand-in's block scheduler: shuffled orders that expose a missing barrier, shuffles,
    # a barrier divergence and the launches after it
    set(sched_cpp ${CMAKE_CURRENT_BINARY_DIR}/cuemu/test_cuemu_sched.cpp)
    add_custom_command(OUTPUT ${sched_cpp}
                       COMMAND ${KVT_SYS_PYTHON} ${KVT_CUEMU_DIR}/cuemu_pp.py
                               ${KVT_CUEMU_DIR}/test_cuemu_sched.cu ${sched_cpp}
                       DEPENDS ${KVT_CUEMU_DIR}/test_cuemu_sched.cu ${KVT_CUEMU_DIR}/cuemu_pp.py
                       COMMENT "cuemu: tests/cuemu/test_cuemu_sched.cu" VERBATIM)
    add_executable(test_cuemu_sched ${sched_cpp} ${KVT_CUEMU_OBJS})
    kvt_target_defaults(test_cuemu_sched)
    target_compile_options(test_cuemu_sched PRIVATE -std=c++17)
    target_link_libraries(test_cuemu_sched PRIVATE ${KVT_CUEMU_LIBS})
    add_test(NAME test_cuemu_sched COMMAND test_cuemu_sched)
    set_tests_properties(test_cuemu_sched PROPERTIES LABELS "cpu" TIMEOUT 60)

    # bench_gpu_kernels on the stand-in, small: every case runs (its times mean nothing here)
    add_executable(bench_gpu_kernels_cuemu ${PROJECT_SOURCE_DIR}/bench/gpu_kernels.c
                   ${KVT_CUEMU_OBJS})
    kvt_target_defaults(bench_gpu_kernels_cuemu)
    target_link_libraries(bench_gpu_kernels_cuemu PRIVATE ${KVT_CUEMU_LIBS})
    set_target_properties(bench_gpu_kernels_cuemu PROPERTIES LINKER_LANGUAGE CXX)
    add_test(NAME bench_gpu_kernels_cuemu
             COMMAND bench_gpu_kernels_cuemu --tokens 300 --kv-heads 2 --window 8 --decode 4
                     --probes 16 --reps 1
                     --json ${CMAKE_CURRENT_BINARY_DIR}/bench_gpu_kernels_cuemu.json)
    set_tests_properties(bench_gpu_kernels_cuemu PROPERTIES LABELS "cpu" SKIP_RETURN_CODE 77
                         TIMEOUT 600)

    # the same with each stream's work deferred until something waits for it (CUEMU_DEFER=1):
    # work that reads another stream's results without an event in between fails every time
    # (the kernels' test launches on the default stream only: nothing there to defer)
    add_test(NAME test_capture_device_cuemu_defer COMMAND test_capture_device_cuemu)
    set_tests_properties(test_capture_device_cuemu_defer PROPERTIES LABELS "cpu;threads"
        SKIP_RETURN_CODE 77 TIMEOUT 600
        ENVIRONMENT "CUEMU_DEFER=1;KVT_COLSUM_BENCH_T=0;KVT_TEST_DELAY_BYTES=4096;CUEMU_DEVICES=2")

    # the same kernels on a GPU without memory pools (the plain-allocation fallback)
    # the kernels' tests once more with other orders of each block's threads (CUEMU_SEED): a
    # race between barriers that the default order happens not to expose may show in these
    add_test(NAME test_kernels_cuemu_seed1 COMMAND test_kernels_cuemu)
    set_tests_properties(test_kernels_cuemu_seed1 PROPERTIES LABELS "cpu;noasan"
                         TIMEOUT 600 ENVIRONMENT "CUEMU_SEED=1")
    add_test(NAME test_kernels_cuemu_nopools COMMAND test_kernels_cuemu)
    set_tests_properties(test_kernels_cuemu_nopools PROPERTIES LABELS "cpu" SKIP_RETURN_CODE 77
                         TIMEOUT 600 ENVIRONMENT "CUEMU_NO_POOLS=1")

    # the kvtrace command on the stand-in, for replay --device cuda end to end
    file(GLOB KVT_CUEMU_CLI ${PROJECT_SOURCE_DIR}/cli/*.c)
    add_executable(kvtrace_cuemu ${KVT_CUEMU_CLI} ${KVT_CUEMU_OBJS}
                   $<TARGET_OBJECTS:kvt_analysis> $<TARGET_OBJECTS:kvt_report>)
    kvt_target_defaults(kvtrace_cuemu)
    target_link_libraries(kvtrace_cuemu PRIVATE ${KVT_CUEMU_LIBS} PkgConfig::PNG PkgConfig::CAIRO
                                                PkgConfig::FONTCONFIG)
    set_target_properties(kvtrace_cuemu PROPERTIES LINKER_LANGUAGE CXX)
    if(KVT_HAVE_MPI) # as the kvtrace command: an MPI launch's processes share the GPUs
        target_link_libraries(kvtrace_cuemu PRIVATE MPI::MPI_C)
        target_compile_definitions(kvtrace_cuemu PRIVATE KVT_HAVE_MPI=1)
    endif()
    add_test(NAME test_replay_device_cuemu
             COMMAND bash ${KVT_TEST_DIR}/unit/test_replay_fast_vs_ref.sh cuda)
    set_tests_properties(test_replay_device_cuemu PROPERTIES LABELS "cpu;noasan"
        SKIP_RETURN_CODE 77 TIMEOUT 600
        ENVIRONMENT "KVT_SOURCE_ROOT=${PROJECT_SOURCE_DIR};KVT_BIN=$<TARGET_FILE:kvtrace_cuemu>;KVT_PYTHON=${KVT_SYS_PYTHON}")
    # hostile traces (NaN or Inf in K, V, queries; odd shapes) through replay --device cuda: the
    # same clear errors and results as the CPU path's (K and V are checked on the device)
    add_test(NAME test_reliability_hostile_cuemu COMMAND test_reliability_hostile)
    set_tests_properties(test_reliability_hostile_cuemu PROPERTIES LABELS "cpu;noasan"
        SKIP_RETURN_CODE 77 TIMEOUT 600
        ENVIRONMENT "KVT_BIN=$<TARGET_FILE:kvtrace_cuemu>;KVT_HOSTILE_REPLAY_ARGS=--device cuda")
    # replay --device cuda on a GPU without memory pools, and with deferred stream work, writes
    # the same results
    set(nop ${CMAKE_CURRENT_BINARY_DIR}/nopools)
    set(nop_args replay ${PROJECT_SOURCE_DIR}/traces/samples/stories260K.kvt --device cuda
                 --policies snapkv,adakv,h2o --budgets 48,96 --threads 2 --force)
    add_test(NAME test_replay_device_cuemu_nopools
             COMMAND sh -c "mkdir -p '${nop}' && \"$0\" \"$@\" -o '${nop}/pools.json' && \
CUEMU_NO_POOLS=1 \"$0\" \"$@\" -o '${nop}/nopools.json' && \
CUEMU_DEFER=1 \"$0\" \"$@\" -o '${nop}/defer.json' && \
cmp '${nop}/pools.json' '${nop}/nopools.json' && cmp '${nop}/pools.json' '${nop}/defer.json'"
                     $<TARGET_FILE:kvtrace_cuemu> ${nop_args})
    set_tests_properties(test_replay_device_cuemu_nopools PROPERTIES LABELS "cpu;noasan"
                         TIMEOUT 300)
    # replay --device cuda reading K and V as stored: read ahead while the GPU is not ready,
    # streamed through pinned memory after; the same metrics either way
    add_test(NAME test_replay_kv_stream_cuemu
             COMMAND bash ${KVT_TEST_DIR}/unit/test_replay_kv_stream.sh)
    set_tests_properties(test_replay_kv_stream_cuemu PROPERTIES LABELS "cpu;noasan"
        TIMEOUT 600 ENVIRONMENT
        "KVT_BIN=$<TARGET_FILE:kvtrace_cuemu>;KVT_PYTHON=${KVT_SYS_PYTHON}")
    # replay --device cuda --profile: the kernels and copies timed without a wait of the profile's
    # own (the same host waits and results as an unprofiled run)
    add_test(NAME test_replay_gpu_profile_cuemu
             COMMAND bash ${KVT_TEST_DIR}/unit/test_replay_gpu_profile.sh)
    set_tests_properties(test_replay_gpu_profile_cuemu PROPERTIES LABELS "cpu;noasan"
        TIMEOUT 600 ENVIRONMENT
        "KVT_BIN=$<TARGET_FILE:kvtrace_cuemu>;KVT_PYTHON=${KVT_SYS_PYTHON}")
    # replay --device cuda on several GPUs: the layers spread over them, the same results
    add_test(NAME test_replay_multi_gpu_cuemu
             COMMAND bash ${KVT_TEST_DIR}/unit/test_replay_multi_gpu.sh)
    set_tests_properties(test_replay_multi_gpu_cuemu PROPERTIES LABELS "cpu;noasan"
        TIMEOUT 600 ENVIRONMENT "KVT_BIN=$<TARGET_FILE:kvtrace_cuemu>")
    # replay --device cuda when a kernel faults: one clear line, exit 1, nothing written
    add_test(NAME test_replay_gpu_faults_cuemu
             COMMAND bash ${KVT_TEST_DIR}/unit/test_replay_gpu_faults.sh)
    set_tests_properties(test_replay_gpu_faults_cuemu PROPERTIES LABELS "cpu;noasan"
        TIMEOUT 900 ENVIRONMENT "KVT_BIN=$<TARGET_FILE:kvtrace_cuemu>")
    # --decode-probs group with --device cuda: the host copies one KV group's decode rows from
    # the device at a time, the same bytes as all
    add_test(NAME test_replay_decode_probs_cuemu
             COMMAND bash ${KVT_TEST_DIR}/unit/test_replay_decode_probs.sh cuda)
    set_tests_properties(test_replay_decode_probs_cuemu PROPERTIES LABELS "cpu;noasan"
        SKIP_RETURN_CODE 77 TIMEOUT 600 ENVIRONMENT "KVT_BIN=$<TARGET_FILE:kvtrace_cuemu>")
    # replay --device cuda on a GPU with little memory: workers take turns, or a clear error
    add_test(NAME test_replay_gpu_memory_cuemu
             COMMAND bash ${KVT_TEST_DIR}/unit/test_replay_gpu_memory.sh)
    set_tests_properties(test_replay_gpu_memory_cuemu PROPERTIES LABELS "cpu;noasan"
        TIMEOUT 600 ENVIRONMENT
        "KVT_BIN=$<TARGET_FILE:kvtrace_cuemu>;KVT_PYTHON=${KVT_SYS_PYTHON};KVT_SOURCE_ROOT=${PROJECT_SOURCE_DIR}")
endif()
