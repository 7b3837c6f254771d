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
