"""TEST STAND-IN for transformers.cache_utils - NOT transformers' code.

DynamicCache with the layout of transformers >= 4.54 (5.x too): .layers, one DynamicLayer per
decoder layer holding .keys and .values ([B, Hkv, T, D]); update() keeps the first tensors it
is given as they are, appends later ones along the token axis, and returns everything cached
for that layer."""
import torch


class DynamicLayer(object):
    def __init__(self):
        self.keys = None
        self.values = None

    def update(self, key_states, value_states):
        if self.keys is None:
            self.keys, self.values = key_states, value_states
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values

    def get_seq_length(self):
        return 0 if self.keys is None else self.keys.shape[-2]


class DynamicCache(object):
    def __init__(self, *args, **kwargs):
        self.layers = []

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        while len(self.layers) <= layer_idx:
            self.layers.append(DynamicLayer())
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx=0):
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].get_seq_length()

    def __len__(self):
        return len(self.layers)
