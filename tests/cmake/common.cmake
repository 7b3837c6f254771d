kvt_add_test(test_common_dtype SOURCES unit/test_common_dtype.c LABELS cpu)
kvt_add_test(test_common_alloc SOURCES unit/test_common_alloc.c LABELS cpu)
