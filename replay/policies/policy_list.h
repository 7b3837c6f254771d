/* policy_list.h - THE policy table: one line per policy (X-macro). Adding a policy is one file
 * replay/policies/policy_<name>.c exporting `const kvt_policy_def kvt_policy_def_<name>` plus
 * one line here. The order is the order of `kvtrace replay --list-policies`.
 * No include guard on purpose: included with different KVT_POLICY definitions.
 */
KVT_POLICY(full)
KVT_POLICY(random)
KVT_POLICY(streamingllm)
KVT_POLICY(h2o)
KVT_POLICY(observed_attention)
KVT_POLICY(tova)
KVT_POLICY(snapkv)
KVT_POLICY(chunkkv)
KVT_POLICY(pyramidkv)
KVT_POLICY(adakv)
KVT_POLICY(sparsemm)
KVT_POLICY(headkv)
KVT_POLICY(knorm)
KVT_POLICY(vnorm)
KVT_POLICY(keydiff)
KVT_POLICY(expected_attention)
KVT_POLICY(mixkv_snapkv)
KVT_POLICY(mixkv_pyramidkv)
KVT_POLICY(mixkv_adakv)
KVT_POLICY(oracle)
KVT_POLICY(quest)
KVT_POLICY(hybridkv_like)
KVT_POLICY(lightkv_like)
KVT_POLICY(external)
