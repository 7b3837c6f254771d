"""TEST STAND-IN for transformers.models.llama - NOT transformers' code."""
from .configuration_llama import LlamaConfig
from .modeling_llama import LlamaModel, LlamaForCausalLM, LlamaPreTrainedModel

__all__ = ["LlamaConfig", "LlamaModel", "LlamaForCausalLM", "LlamaPreTrainedModel"]
