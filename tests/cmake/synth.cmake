# traces/synth.c: the synthetic trace generator and `kvtrace synth`.
kvt_add_test(test_synth SOURCES unit/test_synth.c LIBS kvt_traces PkgConfig::CJSON
             LABELS cpu threads TIMEOUT 120)
kvt_add_script_test(test_synth_cli COMMAND bash ${KVT_TEST_DIR}/unit/test_synth_cli.sh
                    LABELS cpu)
