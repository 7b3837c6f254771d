# tests/oracle: the independent NumPy replay oracle (written from POLICIES.md alone), its
# hand-worked self-test, and the comparison of `kvtrace replay` against it (analysis/RESULTS.md).
# Python tests load libkvtrace.so into an unsanitized interpreter: label noasan.
#   test_replay_oracle_selftest  the oracle's hand-worked self-test
#   test_peer_torch              bench/peer_torch.py (issue #7's PyTorch peer) agrees with
#                                peer_numpy and with kvtrace on the CPU (Debian's PyTorch);
#                                "not run" without torch
#   test_replay_vs_oracle        kvtrace replay against the oracle (compare_replay.py)
#   test_format_spec             traces/FORMAT.md: an independent reader written from it alone
#                                (format_reader.py) against the binding and the CLI on real
#                                traces, cut short, damaged and with newer versions/kinds
#   test_external_policy         external:scores=FILE.npy (a user's own scores) against NumPy:
#                                kept sets, knorm's metrics from -|k|, bad files
#   test_e2e_llama2c             kvtrace e2e-llama2c: the decode rerun with each policy's kept
#                                sets against llama2c_oracle.py's masked float64 forward
#   test_recommend_e2e           kvtrace recommend --e2e: the cheapest setting of a measured KL
#                                on a hand-made e2e.json and against the rule on a real one
if(KVT_SYS_PYTHON)
    foreach(t test_replay_oracle_selftest test_peer_torch test_format_spec test_external_policy
              test_e2e_llama2c test_replay_cut_decode test_recommend_e2e)
        kvt_add_script_test(${t}
                            COMMAND ${KVT_SYS_PYTHON} ${KVT_TEST_DIR}/oracle/${t}.py
                            LABELS cpu noasan)
    endforeach()
    kvt_add_script_test(test_replay_vs_oracle
                        COMMAND ${KVT_SYS_PYTHON} ${KVT_TEST_DIR}/oracle/compare_replay.py
                        LABELS cpu noasan TIMEOUT 900)
endif()
