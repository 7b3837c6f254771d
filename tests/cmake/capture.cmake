# capture/: the capture session API and the built-in llama2.c engine.
kvt_add_test(test_capture_session SOURCES unit/test_capture_session.c
             LIBS kvt_capture PkgConfig::CJSON LABELS cpu threads)
kvt_add_test(test_capture_llama2c SOURCES unit/test_capture_llama2c.c LIBS kvt_capture
             LABELS cpu threads)
kvt_add_test(test_llama2c_checkpoint SOURCES unit/test_llama2c_checkpoint.c LIBS kvt_capture
             LABELS cpu)
kvt_add_script_test(test_capture_cli COMMAND bash ${KVT_TEST_DIR}/unit/test_capture_cli.sh
                    LABELS cpu)
kvt_add_test(test_capture_timeline SOURCES unit/test_capture_timeline.c
             LIBS kvt_capture PkgConfig::CJSON LABELS cpu)
if(KVT_HAVE_CUDA AND KVT_CUPTI_INCLUDE)
    kvt_add_test(test_capture_timeline_gpu SOURCES unit/test_capture_timeline_gpu.c
                 LIBS kvt_capture CUDA::cudart LABELS gpu)
endif()
if(KVT_HAVE_CUDA)
    # the device path of the capture API: device views vs host views of the same tensors
    kvt_add_test(test_capture_device_gpu SOURCES unit/test_capture_device_gpu.c
                 LIBS kvt_capture CUDA::cudart LABELS gpu)
    # the capture's GPU column sums (colsum_cuda.cu) against kvt_colsum_accumulate_ref
    kvt_add_test(test_capture_colsum_gpu SOURCES unit/test_capture_colsum_gpu.c
                 LIBS kvt_capture kvt_traces kvt_common CUDA::cudart LABELS gpu)
endif()
# The CUPTI collector on any machine: a mock libcupti (its Activity API scripted by the test)
# and a fake libcuda.so.1 (tests/mock_cupti), found first through LD_LIBRARY_PATH. Built
# wherever the collector itself is (CUPTI's headers found).
if(KVT_HAVE_CUDA AND KVT_CUPTI_INCLUDE)
    set(KVT_MOCK_CUPTI_DIR ${CMAKE_CURRENT_BINARY_DIR}/mock_cupti)
    set(KVT_MOCK_CUPTI_SONAME libcupti.so.${CUDAToolkit_VERSION_MAJOR})
    # kvt_mock_library(target source file_name folder [definitions...])
    function(kvt_mock_library tgt src file dir)
        add_library(${tgt} SHARED ${KVT_TEST_DIR}/mock_cupti/${src})
        kvt_target_defaults(${tgt})
        target_compile_definitions(${tgt} PRIVATE ${ARGN})
        target_include_directories(${tgt} PRIVATE ${KVT_TEST_DIR}/mock_cupti)
        target_include_directories(${tgt} SYSTEM PRIVATE ${KVT_CUPTI_INCLUDE}
                                                         ${CUDAToolkit_INCLUDE_DIRS})
        target_link_libraries(${tgt} PRIVATE Threads::Threads)
        set_target_properties(${tgt} PROPERTIES PREFIX "" OUTPUT_NAME ${file} SUFFIX ""
                              NO_SONAME OFF C_VISIBILITY_PRESET hidden
                              LIBRARY_OUTPUT_DIRECTORY ${dir})
    endfunction()
    kvt_mock_library(kvt_mock_cupti mock_cupti.c ${KVT_MOCK_CUPTI_SONAME} ${KVT_MOCK_CUPTI_DIR})
    kvt_mock_library(kvt_mock_cuda_driver mock_cuda_driver.c libcuda.so.1 ${KVT_MOCK_CUPTI_DIR})
    # a CUPTI that lacks a function the collector needs
    kvt_mock_library(kvt_mock_cupti_nosym mock_cupti.c ${KVT_MOCK_CUPTI_SONAME}
                     ${KVT_MOCK_CUPTI_DIR}/nosym KVT_MOCK_OMIT_STREAM_ID)
    kvt_add_test(test_capture_cupti_mock SOURCES unit/test_capture_cupti_mock.c
                 LIBS kvt_capture ${CMAKE_DL_LIBS} LABELS cpu)
    target_include_directories(test_capture_cupti_mock PRIVATE ${KVT_TEST_DIR}/mock_cupti)
    target_include_directories(test_capture_cupti_mock SYSTEM PRIVATE ${KVT_CUPTI_INCLUDE}
                                                                      ${CUDAToolkit_INCLUDE_DIRS})
    target_compile_definitions(test_capture_cupti_mock
                               PRIVATE KVT_MOCK_CUPTI_SONAME="${KVT_MOCK_CUPTI_SONAME}")
    add_dependencies(test_capture_cupti_mock kvt_mock_cupti kvt_mock_cupti_nosym
                     kvt_mock_cuda_driver)
    set_property(TEST test_capture_cupti_mock APPEND PROPERTY ENVIRONMENT_MODIFICATION
                 "LD_LIBRARY_PATH=path_list_prepend:${KVT_MOCK_CUPTI_DIR}")
    # the same under valgrind: this build (CUPTI's headers found) is the only one that has the
    # collector, so its failure paths are checked for leaks and bad reads here
    find_program(KVT_VALGRIND valgrind)
    if(KVT_VALGRIND)
        add_test(NAME test_capture_cupti_mock_valgrind
                 COMMAND ${KVT_VALGRIND} -q --error-exitcode=1 --leak-check=full
                         --errors-for-leak-kinds=definite,indirect
                         $<TARGET_FILE:test_capture_cupti_mock>)
        set_tests_properties(test_capture_cupti_mock_valgrind PROPERTIES LABELS "cpu;noasan"
            TIMEOUT 300 ENVIRONMENT_MODIFICATION
            "LD_LIBRARY_PATH=path_list_prepend:${KVT_MOCK_CUPTI_DIR}")
    endif()
    # an unusable CUPTI is refused for the rest of the process: one process per case
    add_test(NAME test_capture_cupti_mock_nosym
             COMMAND test_capture_cupti_mock nosym ${KVT_MOCK_CUPTI_DIR}/nosym)
    set_tests_properties(test_capture_cupti_mock_nosym PROPERTIES LABELS cpu TIMEOUT 60
        ENVIRONMENT_MODIFICATION
        "LD_LIBRARY_PATH=path_list_prepend:${KVT_MOCK_CUPTI_DIR};LD_LIBRARY_PATH=path_list_prepend:${KVT_MOCK_CUPTI_DIR}/nosym")
    # the Python binding's side (CaptureSession(timeline=True)) over the same mock
    if(KVT_SYS_PYTHON)
        kvt_add_script_test(test_python_timeline_mock
            COMMAND ${KVT_SYS_PYTHON} ${KVT_TEST_DIR}/oracle/test_python_timeline_mock.py
            LABELS cpu noasan)
        set_property(TEST test_python_timeline_mock APPEND PROPERTY ENVIRONMENT
                     "KVT_MOCK_CUPTI_SONAME=${KVT_MOCK_CUPTI_SONAME}")
        set_property(TEST test_python_timeline_mock APPEND PROPERTY ENVIRONMENT_MODIFICATION
                     "LD_LIBRARY_PATH=path_list_prepend:${KVT_MOCK_CUPTI_DIR}")
    endif()
    foreach(v 120000 140000) # CUDA 12's CUPTI, and a future major version
        add_test(NAME test_capture_cupti_mock_v${v}
                 COMMAND test_capture_cupti_mock version ${v} ${KVT_MOCK_CUPTI_DIR})
        set_tests_properties(test_capture_cupti_mock_v${v} PROPERTIES LABELS cpu TIMEOUT 60
            ENVIRONMENT_MODIFICATION "LD_LIBRARY_PATH=path_list_prepend:${KVT_MOCK_CUPTI_DIR}")
    endforeach()
endif()
