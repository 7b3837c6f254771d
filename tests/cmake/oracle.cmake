# tests/oracle: the independent NumPy replay oracle (written from POLICIES.md alone), its
# hand-worked self-test, and the comparison of `kvtrace replay` against it (analysis/RESULTS.md).
# Python tests load libkvtrace.so into an unsanitized interpreter: label noasan.
if(KVT_SYS_PYTHON)
    kvt_add_script_test(test_replay_oracle_selftest
                        COMMAND ${KVT_SYS_PYTHON} ${KVT_TEST_DIR}/oracle/test_replay_oracle_selftest.py
                        LABELS cpu noasan)
    kvt_add_script_test(test_replay_vs_oracle
                        COMMAND ${KVT_SYS_PYTHON} ${KVT_TEST_DIR}/oracle/compare_replay.py
                        LABELS cpu noasan TIMEOUT 900)
endif()
if(KVT_SYS_PYTHON)
    # bench/peer_torch.py (issue #7's PyTorch peer) agrees with peer_numpy and with kvtrace on
    # the CPU (Debian's PyTorch); "not run" without torch
    kvt_add_script_test(test_peer_torch
                        COMMAND ${KVT_SYS_PYTHON} ${KVT_TEST_DIR}/oracle/test_peer_torch.py
                        LABELS cpu noasan)
endif()
