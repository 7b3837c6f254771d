"""TEST STAND-IN for transformers.cache_utils - NOT transformers' code.

DynamicCache: per layer, the keys and values seen so far ([B, Hkv, T, D]); update() appends
the new ones along the token axis and returns everything cached for that layer."""
import torch


class DynamicCache(object):
    def __init__(self, *args, **kwargs):
        self._keys = []
        self._values = []

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        while len(self._keys) <= layer_idx:
            self._keys.append(None)
            self._values.append(None)
        if self._keys[layer_idx] is None:
            self._keys[layer_idx] = key_states
            self._values[layer_idx] = value_states
        else:
            self._keys[layer_idx] = torch.cat([self._keys[layer_idx], key_states], dim=-2)
            self._values[layer_idx] = torch.cat([self._values[layer_idx], value_states], dim=-2)
        return self._keys[layer_idx], self._values[layer_idx]

    def get_seq_length(self, layer_idx=0):
        if layer_idx >= len(self._keys) or self._keys[layer_idx] is None:
            return 0
        return self._keys[layer_idx].shape[-2]

    def __len__(self):
        return len(self._keys)
