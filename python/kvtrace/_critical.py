"""critical_norms(): CriticalKV's ||W_o v||_1 per token of a trace, for
`kvtrace replay --policy snapkv:critical=FILE.npy` (and adakv, expected-attention, knorm, ...).

kvpress's CriticalKVPress and CriticalAdaKVPress (criticalkv_press.py, `vwl1norm`) weight a
press's scores by how much each value can move the attention output: for query head h and token
j, the L1 norm of v_j (of h's KV head) times h's slice of the output projection,
W_o[:, h*D:(h+1)*D]^T, averaged over the query heads of each KV head. The trace holds V; the
output projection comes from the model: pass each layer's o_proj weight as torch stores it
([hidden, n_q_heads * head_dim]; e.g. `[l.self_attn.o_proj.weight for l in
model.model.layers]`: a Parameter, bf16 or on a GPU, is detached and widened here). In NumPy (float64) this is about 2 T * Hq * D * hidden operations per
layer: minutes per layer of a 7B model at T = 8192 on a CPU. device="cuda" computes it with
torch on the GPU instead (float32: the norms agree with NumPy's to about 1e-6 relative), in
seconds.
"""
import numpy as np

from ._trace import model_shape, open as _open


def _weight(w, device):
    """One layer's o_proj weight as the computation takes it: a torch tensor (a Parameter that
    requires grad, bf16, on a GPU) detached, and for NumPy (device None) widened to float and
    copied to the host; anything else through np.asarray (float64 for NumPy)."""
    if hasattr(w, "detach") and hasattr(w, "dtype") and "torch" in type(w).__module__:
        w = w.detach()
        if device is not None:
            return w
        w = w.cpu()
        if not w.is_floating_point() or w.element_size() < 4:  # bf16, f16: exactly to f32
            w = w.float()
        return np.asarray(w.numpy(), np.float64)
    return np.asarray(w, np.float32 if device is not None else np.float64)


def _torch_norms(V, W, Hq, D, G, device):
    """||v W_o[h]||_1 [Hq, T] with torch on `device` (float32)"""
    import torch
    Vt = torch.as_tensor(V, dtype=torch.float32, device=device)          # [Hkv, T, D]
    Wt = torch.as_tensor(W, dtype=torch.float32, device=device)          # [hidden, Hq*D]
    with torch.no_grad():
        n = [(Vt[h // G] @ Wt[:, h * D:(h + 1) * D].T).abs().sum(-1) for h in range(Hq)]
        return torch.stack(n).double().cpu().numpy()


def critical_norms(path, o_proj, heads="kv", device=None):
    """Norms [layers, KV heads (or query heads), prompt tokens] as float64 for the trace at
    `path`; o_proj: one [hidden, n_q_heads * head_dim] array or torch tensor per layer (a list,
    or one array [layers, hidden, n_q_heads * head_dim]).

    heads: "kv" (the mean over each KV head's query heads: kvpress's layout) or "query" (one row
    per query head, for a policy replayed with heads=query).
    device: None (NumPy, float64), or a torch device ("cuda", "cuda:1", "cpu") to compute on
    with torch in float32 (torch must be installed).
    Save the result with np.save and replay with `critical=FILE.npy`: it describes this trace
    (its V), not the model."""
    if heads not in ("kv", "query"):
        raise ValueError("heads must be 'kv' or 'query', got %r" % (heads,))
    with _open(path) as t:
        L, Hq, Hkv, D, T = model_shape(t.header, path, "critical_norms")
        if len(o_proj) != L:
            raise ValueError("o_proj has %d layers; the trace has %d" % (len(o_proj), L))
        G = Hq // Hkv
        out = np.zeros((L, Hkv if heads == "kv" else Hq, T))
        for layer in range(L):
            W = _weight(o_proj[layer], device)
            if len(W.shape) != 2 or W.shape[1] != Hq * D:
                raise ValueError("o_proj[%d] has shape %s; expected [hidden, %d] (n_q_heads * "
                                 "head_dim)" % (layer, tuple(W.shape), Hq * D))
            V = t.read("V", layer, dtype="float32")  # [Hkv, T, D]
            if device is not None:
                n = _torch_norms(V, W, Hq, D, G, device)  # [Hq, T]
            else:
                V = V.astype(np.float64)
                n = np.stack([np.abs(V[h // G] @ W[:, h * D:(h + 1) * D].T).sum(axis=-1)
                              for h in range(Hq)])
            out[layer] = n if heads == "query" else n.reshape(Hkv, G, T).mean(axis=1)
        return out
