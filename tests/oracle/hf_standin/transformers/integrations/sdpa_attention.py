"""TEST STAND-IN for transformers.integrations.sdpa_attention - NOT transformers' code.

sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal)
with the calling convention of the registry's functions: query [B, Hq, Tq, D], key/value
[B, Hkv, Tk, D] (GQA not expanded), returns (out [B, Tq, Hq, D], None). Written with plain
torch ops (torch 1.13 has no scaled_dot_product_attention): the causal flag applies only when
there are several queries and no mask, as a fused kernel would be called."""
import math

import torch


def repeat_kv(x, n_rep):
    """[B, Hkv, T, D] -> [B, Hkv * n_rep, T, D], each KV head repeated n_rep times in place."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x.unsqueeze(2).expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def _attention_math(q, k, v, mask, dropout_p, scale, causal):
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if causal:
        n_q, n_k = q.shape[-2], k.shape[-2]
        allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p, training=True)
    return torch.matmul(probs, v)


def sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                           is_causal=None, **kwargs):
    groups = getattr(module, "num_key_value_groups", None)
    if groups is not None:
        key = repeat_kv(key, groups)
        value = repeat_kv(value, groups)
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    causal = bool(query.shape[2] > 1 and attention_mask is None and is_causal)
    out = _attention_math(query, key, value, attention_mask, dropout, scaling, causal)
    return out.transpose(1, 2).contiguous(), None
