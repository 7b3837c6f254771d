# Replay engine, kernels and analysis tests (issue #3).
kvt_add_test(test_kernels_ref SOURCES unit/test_kernels_ref.c LIBS kvt_replay LABELS cpu)
kvt_add_test(test_replay_policies SOURCES unit/test_replay_policies.c LIBS kvt_replay LABELS cpu)
# expected-attention (kvpress's ExpectedAttentionPress) on layers worked by hand.
kvt_add_test(test_replay_expected_attention SOURCES unit/test_replay_expected_attention.c
             LIBS kvt_replay LABELS cpu)
# HybridKV-like's classification, allocation and per-step chunks, worked by hand (POLICIES §9).
kvt_add_test(test_replay_hybridkv SOURCES unit/test_replay_hybridkv.c LIBS kvt_replay LABELS cpu)
# LightKV-like's merged keys and values, AdaKV alloc=b and random, worked by hand.
kvt_add_test(test_replay_merge_alloc SOURCES unit/test_replay_merge_alloc.c LIBS kvt_replay
             LABELS cpu)
kvt_add_test(test_replay_metrics SOURCES unit/test_replay_metrics.c LIBS kvt_replay
             LABELS cpu threads)
kvt_add_test(test_analysis_results SOURCES unit/test_analysis_results.c LIBS kvt_analysis
             PkgConfig::CJSON LABELS cpu)
kvt_add_script_test(test_replay_cli COMMAND bash ${KVT_TEST_DIR}/unit/test_replay_cli.sh
                    LABELS cpu)
# fastv's ranking from layer K-1, made per trace (column sums, Q_all, the last queries).
kvt_add_script_test(test_replay_fastv COMMAND bash ${KVT_TEST_DIR}/unit/test_replay_fastv.sh
                    LABELS cpu)
# The fast CPU kernels (kernels/cpu/) against the references, and a whole replay both ways.
kvt_add_test(test_kernels_cpu SOURCES unit/test_kernels_cpu.c LIBS kvt_replay LABELS cpu)
kvt_add_script_test(test_replay_fast_vs_ref
                    COMMAND bash ${KVT_TEST_DIR}/unit/test_replay_fast_vs_ref.sh LABELS cpu)
# Allocation failure at every site of a replay, a threaded trace replay and results I/O.
kvt_add_test(test_replay_faults SOURCES unit/test_replay_faults.c LIBS kvt_analysis kvt_replay
             LABELS cpu threads)
# The selection export reader against the replay's kept sets, cuts and damaged bytes (#9).
kvt_add_test(test_selection_read SOURCES unit/test_selection_read.c LIBS kvt_analysis kvt_replay
             LABELS cpu threads)
# replay --device cuda against the all-reference replay (label gpu; "not run" without a GPU)
kvt_add_script_test(test_replay_device_gpu
                    COMMAND bash ${KVT_TEST_DIR}/unit/test_replay_fast_vs_ref.sh cuda LABELS gpu)
# OpenBLAS's generic kernels are never used on a CPU with better ones (the re-execution).
kvt_add_script_test(test_blas_core COMMAND bash ${KVT_TEST_DIR}/unit/test_blas_core.sh LABELS cpu)
# Worker threads planned for the memory at hand (kvt_replay_worker_bytes, --memory-limit).
kvt_add_script_test(test_replay_memory COMMAND bash ${KVT_TEST_DIR}/unit/test_replay_memory.sh
                    LABELS cpu noasan)
# --decode-probs group (one KV group's decode probabilities at a time) against all: the same
# bytes for every reader of them; auto under --memory-limit. Under ASan too: kvt_ctx_prd_row
# asserts that every row read lies in the group held.
kvt_add_script_test(test_replay_decode_probs
                    COMMAND bash ${KVT_TEST_DIR}/unit/test_replay_decode_probs.sh LABELS cpu)
# The selection export the same bytes whatever the calls the replay hands a layer in (one
# index a call too), in both layouts, sharded and merged, and from e2e-llama2c.
kvt_add_script_test(test_export_chunks COMMAND bash ${KVT_TEST_DIR}/unit/test_export_chunks.sh
                    LABELS cpu)
# bench/decode_caches.sh (the decode-time caches against prefill only) on a small trace.
# noasan: with EXPORT=1 the bench walks an export through kvtrace.read_selection (Python)
kvt_add_script_test(test_bench_decode_caches
                    COMMAND bash ${KVT_TEST_DIR}/unit/test_bench_decode_caches.sh LABELS cpu noasan)
