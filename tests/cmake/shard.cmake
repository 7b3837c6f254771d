# Scale-out (issue #8): replay --shard i/n + kvtrace merge equal one unsharded replay.
kvt_add_script_test(test_shard_merge COMMAND bash ${KVT_TEST_DIR}/unit/test_shard_merge.sh
                    LABELS cpu)
