"""TEST STAND-IN for HuggingFace transformers - NOT transformers' code.

A minimal imitation of the parts of the transformers API that python/kvtrace/hf.py uses, for
tests/oracle/test_python_hf_capture.py on machines where transformers cannot be installed
(see ../README.md). Written for this project; shares names and module layout with
transformers (>= 4.51) so the same test code runs against either.
"""
__version__ = "4.56.0-standin"
STANDIN = True

from .configuration_utils import PretrainedConfig  # noqa: E402
from .cache_utils import DynamicCache  # noqa: E402
from .modeling_utils import (AttentionInterface, ALL_ATTENTION_FUNCTIONS,  # noqa: E402
                             PreTrainedModel)
from .generation import GenerationMixin  # noqa: E402
from .models.llama import LlamaConfig, LlamaModel, LlamaForCausalLM  # noqa: E402

__all__ = ["PretrainedConfig", "DynamicCache", "AttentionInterface", "ALL_ATTENTION_FUNCTIONS",
           "PreTrainedModel", "GenerationMixin", "LlamaConfig", "LlamaModel", "LlamaForCausalLM"]
