# python/kvtrace: the ctypes binding (trace reader/writer, capture session) over libkvtrace.so.
# Loads the library into an unsanitized interpreter: label noasan.
if(KVT_SYS_PYTHON)
    kvt_add_script_test(test_python_binding
                        COMMAND ${KVT_SYS_PYTHON} ${KVT_TEST_DIR}/oracle/test_python_binding.py
                        LABELS cpu noasan)
endif()
if(KVT_SYS_PYTHON)
    kvt_add_script_test(test_python_capture_llama2c
                        COMMAND ${KVT_SYS_PYTHON} ${KVT_TEST_DIR}/oracle/test_python_capture_llama2c.py
                        LABELS cpu noasan)
endif()
if(KVT_SYS_PYTHON)
    # kvtrace.capture on a HF transformers model (the real library when installed, else the
    # stand-in in tests/oracle/hf_standin); needs torch (Debian's python3-torch)
    kvt_add_script_test(test_python_hf_capture
                        COMMAND ${KVT_SYS_PYTHON} ${KVT_TEST_DIR}/oracle/test_python_hf_capture.py
                        LABELS cpu noasan)
endif()
if(KVT_SYS_PYTHON)
    # stories260K as a HF Llama (python/kvtrace/llama2c_hf.py): the RoPE channel order, an
    # independent NumPy forward in HF's convention against the llama2.c oracle and the C trace
    kvt_add_script_test(test_llama2c_hf_convert
                        COMMAND ${KVT_SYS_PYTHON} ${KVT_TEST_DIR}/oracle/test_llama2c_hf_convert.py
                        LABELS cpu noasan)
endif()
if(KVT_SYS_PYTHON)
    # the GPU session's scripts (bench/capture_overhead.py, scripts/gpu_hf_check.py) run their
    # CPU dry runs, so that they do not rot between sessions that have a GPU
    kvt_add_script_test(test_gpu_scripts_dry
                        COMMAND ${KVT_SYS_PYTHON} ${KVT_TEST_DIR}/oracle/test_gpu_scripts_dry.py
                        LABELS cpu noasan)
endif()
