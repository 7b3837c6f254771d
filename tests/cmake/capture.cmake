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
