kvt_add_test(test_common_dtype SOURCES unit/test_common_dtype.c LABELS cpu)
kvt_add_test(test_common_alloc SOURCES unit/test_common_alloc.c LABELS cpu)
# The command's progress line and library messages on the same stderr.
kvt_add_test(test_cli_progress SOURCES unit/test_cli_progress.c ${KVT_SOURCE_ROOT}/cli/cli_util.c
             LIBS kvt_report LABELS cpu)
target_include_directories(test_cli_progress PRIVATE ${KVT_SOURCE_ROOT}/cli)
# kvt_mem_available on fake /proc and cgroup trees, and kvt_replay_threads.
kvt_add_test(test_common_memory SOURCES unit/test_common_memory.c LIBS kvt_replay LABELS cpu)
# UTF-8 validation and repair (names from file names, before they go into JSON).
kvt_add_test(test_common_text SOURCES unit/test_common_text.c LABELS cpu)
