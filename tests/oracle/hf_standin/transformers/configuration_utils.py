"""TEST STAND-IN for transformers.configuration_utils - NOT transformers' code."""


class PretrainedConfig(object):
    model_type = ""

    def __init__(self, **kwargs):
        self._attn_implementation = kwargs.pop("attn_implementation", None)
        self._name_or_path = kwargs.pop("name_or_path", "")
        for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
            setattr(self, k, kwargs.pop(k, None))
        self.tie_word_embeddings = kwargs.pop("tie_word_embeddings", False)
        for k, v in kwargs.items():
            setattr(self, k, v)

    def get_text_config(self, *args, **kwargs):
        return self
