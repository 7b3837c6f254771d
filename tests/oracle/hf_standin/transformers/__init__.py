"""TEST STAND-IN for HuggingFace transformers - NOT transformers' code.

A minimal imitation of the parts of the transformers API that python/kvtrace/hf.py uses, for
tests/oracle/test_python_hf_capture.py on machines where transformers cannot be installed
(see ../README.md). Written for this project; shares names and module layout with
transformers (>= 4.51) so the same test code runs against either. It follows the conventions
of transformers 4.x or 5.x where they differ in what kvtrace touches (utils/standin.py).
"""
from .utils import standin as _standin

__version__ = _standin.VERSIONS[_standin.STYLE]
STANDIN = True


def set_standin_style(style):
    """Follow the conventions of transformers 4.x (4) or 5.x (5) from now on (see
    utils/standin.py); sets __version__ to match. Returns the previous style."""
    global __version__
    style = int(style)
    if style not in _standin.VERSIONS:
        raise ValueError("stand-in style must be 4 or 5, not %r" % (style,))
    prev = _standin.STYLE
    _standin.STYLE = style
    __version__ = _standin.VERSIONS[style]
    return prev


from .configuration_utils import PretrainedConfig, PreTrainedConfig  # noqa: E402
from .cache_utils import DynamicCache  # noqa: E402
from .modeling_utils import (AttentionInterface, ALL_ATTENTION_FUNCTIONS,  # noqa: E402
                             PreTrainedModel)
from .generation import (GenerationConfig, GenerationMixin, LogitsProcessor,  # noqa: E402
                         LogitsProcessorList)
from .models.llama import LlamaConfig, LlamaModel, LlamaForCausalLM  # noqa: E402

__all__ = ["PretrainedConfig", "PreTrainedConfig", "DynamicCache", "AttentionInterface",
           "ALL_ATTENTION_FUNCTIONS", "PreTrainedModel", "GenerationConfig", "GenerationMixin",
           "LogitsProcessor", "LogitsProcessorList", "LlamaConfig", "LlamaModel",
           "LlamaForCausalLM", "set_standin_style"]
