# python/kvtrace: the ctypes binding (trace reader/writer, capture session) over libkvtrace.so.
# Loads the library into an unsanitized interpreter: label noasan. Each test is
# tests/oracle/NAME.py:
#   test_python_binding          the binding's reader, writer and capture session
#   test_python_capture_llama2c  a NumPy forward of stories260K through the capture binding
#                                against the C engine's sample trace
#   test_python_selection        kvtrace.read_selection: a replay's exported kept sets (binary
#                                and JSON) against the JSON file read by the json module
#   test_python_replay_sets      kvtrace.replay_sets: every kept set of the export, and a merged
#                                policy's keys and values against merge_kv written in NumPy
#   test_python_hf_capture       kvtrace.capture on a HF transformers model (the real library
#                                when installed, else the stand-in in tests/oracle/hf_standin);
#                                needs torch (Debian's python3-torch)
#   test_python_hf_kvzip         kvtrace.hf.kvzip_scores against NumPy from uncached forwards,
#                                and capture(kvzip=)
#   test_python_hf_e2e           kvtrace.hf.e2e (the end-to-end check on a HF model) on the HF
#                                stories260K against kvtrace e2e-llama2c on the C engine
#   test_llama2c_hf_convert      stories260K as a HF Llama (python/kvtrace/llama2c_hf.py): the
#                                RoPE channel order, an independent NumPy forward in HF's
#                                convention against the llama2.c oracle and the C trace
#   test_expected_attention      kvtrace replay's expected-attention against an independent
#                                implementation of kvpress's ExpectedAttentionPress on the HF
#                                stories260K (hidden states, q_proj, rotary_emb), on a C-engine
#                                trace and a kvtrace.capture trace of one prompt; needs torch
#   test_expected_attention_synth  expected-attention on synthetic M-RoPE (tiny-vl, qwen2-vl-7b)
#                                and rotate_half (llama3-8b) traces against a NumPy check with
#                                full per-token rotation matrices
#   test_lagkv                   lagkv against NumPy written from kvpress's LagKVPress.score
#   test_noncausal_attention     noncausal-attention against NumPy written from kvpress's
#                                NonCausalAttnPress
#   test_qfilter                 qfilter against NumPy: kvpress's QFilterPress score with given
#                                filters, and the calibration on the window queries (eigh)
#   test_cur                     cur against NumPy written from kvpress's CURPress.score
#   test_adaptive                adaptive=1 on the kvpress score policies against NumPy written
#                                from kvpress's AdaKVPress over each press's scores
#   test_critical                critical= (CriticalKV, CriticalAdaKV) against NumPy written from
#                                kvpress's criticalkv_press.py; kvtrace.critical_norms against
#                                its vwl1norm
#   test_keydiff_block           keydiff-block against NumPy written from kvpress's
#                                BlockPress(KeyDiffPress), and its per-budget sets' metrics
#                                against external's on the same sets
#   test_duo_simlayer            duo-attention and simlayerkv against NumPy written from
#                                kvpress's DuoAttentionPress (at its head_compression_ratio's
#                                budgets) and SimLayerKVPress
#   test_finch                   finch against NumPy written from kvpress's FinchPress.score
#   test_cam                     cam against NumPy written from KVCache-Factory's CAMKVCluster
#                                (with kvtrace's draws, and their expectation)
#   test_elastic_cache           elastic-cache against NumPy written from Elastic Cache's
#                                ElasticCache (kept sets, merged keys and values, errors)
#   test_compactor               leverage and compactor against NumPy written from kvpress's
#                                LeverageScorePress and CompactorPress
#   test_kvzip                   capture-llama2c --kvzip's scores and the kvzip policy's kept
#                                sets against NumPy written from kvpress's KVzipPress
#   test_kvzip_hand              kvzip's kept sets on scores worked by hand, and its refusals
#   test_chunkkv_reuse           chunkkv:reuse=N keeps each group's first layer's chunks
#   test_h2o_greedy              h2o-greedy's kept sets against NumPy written from H2O's greedy
#                                eviction (POLICIES §6) on stories260K captures with Q_all
#   test_h2o_greedy_hand         h2o-greedy's kept sets on attention worked by hand, and its
#                                refusals
#   test_merge                   merge=pivot|weighted: output errors against NumPy written from
#                                KVCache-Factory's merge_kv
#   test_aircache                aircache-like's kept sets against NumPy written from the
#                                method as analysis/RESULTS.md states it, and refusals
#   test_think                   think=R (ThinK's key channel pruning): pruned keys and output
#                                errors against NumPy written from KVCache-Factory's
#                                key_pruner_query_driven and kvpress's ThinKPress, and refusals
#   test_layer_weights           layer_weights=FILE: each layer of a policy with weights equals
#                                the plain policy at its own budget (every metric and kept set),
#                                the rounding in exact arithmetic, recommend --write-allocation
#                                replayed, e2e-llama2c, and the refusals
#   test_chunk_length            chunk_length=N against NumPy written from kvpress's FinchPress
#                                (chunk_length) and ChunkPress(KnormPress), with layer_weights=
#                                and a ranking per budget, and refusals
#   test_chunk_scores            chunk_scores=own|kvpress against NumPy written from kvpress's
#                                ChunkPress over SnapKVPress, TOVAPress, KeyDiffPress,
#                                ExpectedAttentionPress, CompactorPress and the other presses
#                                with chunk_rank (the kvpress rotation of the chunks' queries),
#                                and refusals
#   test_ea_stats                expected-attention:stats=FILE (kvpress's
#                                ExpectedAttentionStatsPress) against NumPy, the safetensors
#                                reader (f64/f32/f16/bf16, a hub folder; qfilter's q_filters),
#                                kvtrace.ea_stats against a full-matrix RoPE undo, and malformed
#                                files refused
#   test_dms                     dms=THRESHOLD (kvpress's DMSPress at prefill) over knorm,
#                                keydiff, qfilter, expected-attention and external against NumPy,
#                                capped at the budget, and refusals
#   test_decoding                decoding=N (kvpress's DecodingPress; prefill=1:
#                                PrefillDecodingPress) over knorm, keydiff, qfilter and tova,
#                                streamingllm's rolling cache, and dms_decoding=1 (DMSPress(decoding=True)) over knorm and
#                                qfilter: each step's cache and the decode metrics against
#                                NumPy, hand-worked ties, and refusals
#   test_decoding_ea             expected-attention:decoding=N (kvpress's DecodingPress over
#                                ExpectedAttentionPress, and over its stats= press; prefill=1):
#                                each step's cache and the decode metrics against NumPy on three
#                                traces (M-RoPE among them), and refusals
#   test_rkv                     rkv (R-KV): prompt-time sets, each step's cache and the decode
#                                metrics against NumPy written from R-KV's HF code, and refusals
#   test_gpu_scripts_dry         the GPU session's scripts (bench/capture_overhead.py,
#                                scripts/gpu_hf_check.py, bench/run_gpu.sh,
#                                scripts/gpu_session.sh) run their CPU dry runs, so that they
#                                do not rot between sessions that have a GPU
if(KVT_SYS_PYTHON)
    foreach(t test_python_binding test_python_capture_llama2c test_python_hf_capture
              test_python_hf_kvzip test_python_hf_reserve test_python_hf_e2e
              test_python_selection test_python_replay_sets
              test_llama2c_hf_convert test_gpu_scripts_dry test_expected_attention
              test_expected_attention_synth test_lagkv test_noncausal_attention
              test_qfilter test_cur test_adaptive test_keydiff_block test_critical
              test_duo_simlayer test_merge test_finch test_cam test_elastic_cache
              test_compactor test_kvzip test_kvzip_hand test_chunkkv_reuse
              test_h2o_greedy test_h2o_greedy_hand test_think test_aircache
              test_layer_weights test_chunk_length test_chunk_scores test_ea_stats
              test_dms test_decoding test_decoding_ea test_h2o_greedy_decode
              test_rkv)
        kvt_add_script_test(${t}
                            COMMAND ${KVT_SYS_PYTHON} ${KVT_TEST_DIR}/oracle/${t}.py
                            LABELS cpu noasan)
    endforeach()
endif()
