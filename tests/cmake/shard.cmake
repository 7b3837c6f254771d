# Scale-out (issue #8): replay --shard i/n + kvtrace merge equal one unsharded replay.
kvt_add_script_test(test_shard_merge COMMAND bash ${KVT_TEST_DIR}/unit/test_shard_merge.sh
                    LABELS cpu)
# The cluster path: mpiexec -n N kvtrace replay equals one process (refused without MPI).
kvt_add_script_test(test_replay_mpi COMMAND bash ${KVT_TEST_DIR}/unit/test_replay_mpi.sh
                    LABELS cpu)
