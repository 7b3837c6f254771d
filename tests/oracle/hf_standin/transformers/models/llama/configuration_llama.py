"""TEST STAND-IN for transformers.models.llama.configuration_llama - NOT transformers' code.
Field names and defaults follow the public LlamaConfig documentation; RoPE settings are stored
as the stand-in's style prescribes (PretrainedConfig.set_rope)."""
from ...configuration_utils import PretrainedConfig


class LlamaConfig(PretrainedConfig):
    model_type = "llama"

    def __init__(self, vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None,
                 hidden_act="silu", max_position_embeddings=2048, initializer_range=0.02,
                 rms_norm_eps=1e-6, use_cache=True, pad_token_id=None, bos_token_id=1,
                 eos_token_id=2, tie_word_embeddings=False, rope_theta=None,
                 rope_scaling=None, attention_bias=False, attention_dropout=0.0,
                 mlp_bias=False, head_dim=None, rope_parameters=None, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = (num_key_value_heads if num_key_value_heads is not None
                                    else num_attention_heads)
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.mlp_bias = mlp_bias
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, tie_word_embeddings=tie_word_embeddings,
                         **kwargs)
        # 4.x: rope_theta / rope_scaling attributes; 5.x: the rope_parameters dict
        self.set_rope(rope_theta=rope_theta, rope_scaling=rope_scaling,
                      rope_parameters=rope_parameters)
