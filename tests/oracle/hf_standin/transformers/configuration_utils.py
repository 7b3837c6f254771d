"""TEST STAND-IN for transformers.configuration_utils - NOT transformers' code.

PretrainedConfig (also under its 5.x name PreTrainedConfig): keyword arguments become
attributes; attn_implementation is kept as _attn_implementation. RoPE settings follow the
stand-in's style (utils/standin.py): set_rope() stores them as 4.x does (rope_theta and
rope_scaling attributes; a rope_parameters keyword is just another attribute) or as 5.x does
(one rope_parameters dict holding rope_theta and rope_type, rope_scaling the same dict, no
rope_theta attribute). rope_theta_of() is where a model reads theta under the style its config
was built with."""
from .utils import standin


class PretrainedConfig(object):
    model_type = ""
    default_theta = 10000.0

    def __init__(self, **kwargs):
        self._standin_style = standin.STYLE
        self._attn_implementation = kwargs.pop("attn_implementation", None)
        self._name_or_path = kwargs.pop("name_or_path", "")
        for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
            setattr(self, k, kwargs.pop(k, None))
        self.tie_word_embeddings = kwargs.pop("tie_word_embeddings", False)
        for k, v in kwargs.items():
            setattr(self, k, v)

    def set_rope(self, rope_theta=None, rope_scaling=None, rope_parameters=None):
        """Store the RoPE keywords the way the current style's transformers does."""
        if self._standin_style >= 5:
            rp = dict(rope_parameters or rope_scaling or {})
            rp.setdefault("rope_theta", rope_theta if rope_theta is not None
                          else self.default_theta)
            rp.setdefault("rope_type", rp.get("type", "default"))
            self.rope_parameters = rp
            self.rope_scaling = rp  # 5.x: an alias of rope_parameters
        else:
            self.rope_theta = rope_theta if rope_theta is not None else self.default_theta
            self.rope_scaling = rope_scaling
            if rope_parameters is not None:  # not a 4.x field: kept, never read
                self.rope_parameters = rope_parameters

    def rope_theta_of(self):
        """theta as the model of this config's style reads it."""
        if self._standin_style >= 5:
            return float(self.rope_parameters["rope_theta"])
        return float(self.rope_theta)

    def get_text_config(self, *args, **kwargs):
        return self


PreTrainedConfig = PretrainedConfig
