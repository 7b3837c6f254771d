"""TEST STAND-IN for transformers.modeling_utils - NOT transformers' code.

AttentionInterface (a GeneralInterface whose class-wide table starts with "sdpa" only; no
"eager": models fall back to their own eager function), the shared ALL_ATTENTION_FUNCTIONS
instance, and a PreTrainedModel base (config, dtype/device, weight initialisation)."""
import torch
from torch import nn

from .integrations.sdpa_attention import sdpa_attention_forward
from .utils.generic import GeneralInterface


class AttentionInterface(GeneralInterface):
    _global_mapping = {"sdpa": sdpa_attention_forward}

    def get_interface(self, attn_implementation, default):
        if attn_implementation is None or attn_implementation == "eager":
            return default
        if attn_implementation not in self:
            raise KeyError("%r is not a registered attention implementation"
                           % attn_implementation)
        return self[attn_implementation]


ALL_ATTENTION_FUNCTIONS = AttentionInterface()


class PreTrainedModel(nn.Module):
    config_class = None
    base_model_prefix = "model"

    def __init__(self, config, *args, **kwargs):
        super().__init__()
        self.config = config
        if getattr(config, "_attn_implementation", None) is None:
            config._attn_implementation = "sdpa"

    @property
    def dtype(self):
        for p in self.parameters():
            return p.dtype
        return torch.get_default_dtype()

    @property
    def device(self):
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def _init_weights(self, module):
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            with torch.no_grad():
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()

    def post_init(self):
        for m in self.modules():
            self._init_weights(m)
