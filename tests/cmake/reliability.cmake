# Reliability (issue #9): injected faults, kills and hostile input against the kvtrace command.
# Figures and what each test covers: tests/RELIABILITY.md.
kvt_add_test(test_reliability_capture SOURCES unit/test_reliability_capture.c LIBS kvt_capture
             LABELS cpu threads TIMEOUT 300)
kvt_add_test(test_reliability_hostile SOURCES unit/test_reliability_hostile.c LIBS kvt_traces
             LABELS cpu TIMEOUT 300)
kvt_add_script_test(test_reliability_outputs
                    COMMAND bash ${KVT_TEST_DIR}/unit/test_reliability_outputs.sh LABELS cpu)
kvt_add_script_test(test_reliability_valgrind
                    COMMAND bash ${KVT_TEST_DIR}/unit/test_reliability_valgrind.sh
                    LABELS slow noasan TIMEOUT 900)
