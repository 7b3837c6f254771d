"""TEST STAND-IN for transformers.models.llama.modeling_llama - NOT transformers' code.

A Llama decoder written for this project's tests with the module tree and parameter names of
transformers' LlamaForCausalLM (model.embed_tokens, model.layers[i].self_attn.{q,k,v,o}_proj,
.mlp.{gate,up,down}_proj, .input_layernorm, .post_attention_layernorm, model.norm, lm_head)
and its attention calling convention: the attention module projects q/k/v to [B, H, T, D],
applies rotate-half RoPE, appends k/v to the cache (past_key_values.update returns all cached
keys/values of the layer), then calls the function ALL_ATTENTION_FUNCTIONS holds for
config._attn_implementation, or its own eager function for "eager"."""
import torch
from torch import nn

from ...cache_utils import DynamicCache
from ...generation import GenerationMixin
from ...integrations.sdpa_attention import repeat_kv
from ...modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from .configuration_llama import LlamaConfig


class BaseModelOutputWithPast(object):
    def __init__(self, last_hidden_state, past_key_values=None):
        self.last_hidden_state = last_hidden_state
        self.past_key_values = past_key_values


class CausalLMOutputWithPast(object):
    def __init__(self, logits, past_key_values=None):
        self.logits = logits
        self.past_key_values = past_key_values


class LlamaRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        xf = x.to(torch.float32)
        inv_rms = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.variance_epsilon)
        return self.weight * (xf * inv_rms).to(dtype)


class LlamaRotaryEmbedding(nn.Module):
    """cos/sin tables [B, T, D] for integer positions [B, T] (frequencies theta^(-2i/D) in the
    buffer inv_freq [D/2], each repeated for the two halves of the head), times
    attention_scaling (1.0 here: the factor transformers' scaled RoPE types such as YaRN set)."""

    def __init__(self, config, device=None):
        super().__init__()
        d = config.head_dim
        exponents = torch.arange(0, d, 2, dtype=torch.float32) / d
        theta = config.rope_theta_of()  # config.rope_theta (4.x), rope_parameters (5.x)
        self.register_buffer("inv_freq", 1.0 / (theta ** exponents), persistent=False)
        self.attention_scaling = 1.0

    @torch.no_grad()
    def forward(self, x, position_ids):
        angles = position_ids[:, :, None].to(torch.float32) * self.inv_freq[None, None, :].to(
            x.device)
        full = torch.cat([angles, angles], dim=-1)
        cos = full.cos() * self.attention_scaling
        sin = full.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0,
                            **kwargs):
    k = repeat_kv(key, module.num_key_value_groups)
    v = repeat_kv(value, module.num_key_value_groups)
    w = torch.matmul(query, k.transpose(2, 3)) * scaling
    if attention_mask is not None:
        w = w + attention_mask[:, :, :, : k.shape[-2]]
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    w = nn.functional.dropout(w, p=dropout, training=module.training)
    out = torch.matmul(w, v).transpose(1, 2).contiguous()
    return out, w


class LlamaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=config.mlp_bias)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LlamaAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        h = config.hidden_size
        self.q_proj = nn.Linear(h, config.num_attention_heads * self.head_dim,
                                bias=config.attention_bias)
        self.k_proj = nn.Linear(h, config.num_key_value_heads * self.head_dim,
                                bias=config.attention_bias)
        self.v_proj = nn.Linear(h, config.num_key_value_heads * self.head_dim,
                                bias=config.attention_bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, h,
                                bias=config.attention_bias)

    def forward(self, hidden_states, position_embeddings, attention_mask=None,
                past_key_values=None, cache_position=None, **kwargs):
        b, t = hidden_states.shape[:2]
        shape = (b, t, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx,
                                          {"sin": sin, "cos": cos,
                                           "cache_position": cache_position})
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward)
        out, weights = attention_interface(
            self, q, k, v, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling, **kwargs)
        out = out.reshape(b, t, -1).contiguous()
        return self.o_proj(out), weights


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, cache_position=None, position_embeddings=None, **kwargs):
        attn_out, _ = self.self_attn(self.input_layernorm(hidden_states),
                                     position_embeddings=position_embeddings,
                                     attention_mask=attention_mask,
                                     past_key_values=past_key_values,
                                     cache_position=cache_position, **kwargs)
        hidden_states = hidden_states + attn_out
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class LlamaPreTrainedModel(PreTrainedModel):
    config_class = LlamaConfig
    base_model_prefix = "model"


def _attention_mask_4d(config, attention_mask, n_q, n_k, dtype, device):
    """None for sdpa without padding when the queries are all the keys or one (causality by the
    is_causal flag, as transformers skips the mask then), else an additive [B, 1, n_q, n_k]
    mask: query i (absolute position n_k - n_q + i) sees keys <= its position that are not
    padding (several queries after a cache: the flag's top-left alignment would be wrong)."""
    has_padding = attention_mask is not None and bool((attention_mask == 0).any())
    if config._attn_implementation != "eager" and not has_padding and n_q in (1, n_k):
        return None
    q_pos = torch.arange(n_k - n_q, n_k, device=device)[:, None]
    k_pos = torch.arange(n_k, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :n_k].to(torch.bool)
    neg = torch.finfo(dtype).min
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, neg)


class LlamaModel(LlamaPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([LlamaDecoderLayer(config, i)
                                     for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, use_cache=None, cache_position=None,
                **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        n_q = inputs_embeds.shape[1]
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if cache_position is None:
            cache_position = torch.arange(past, past + n_q, device=inputs_embeds.device)
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0)
        mask = _attention_mask_4d(self.config, attention_mask, n_q, past + n_q,
                                  inputs_embeds.dtype, inputs_embeds.device)
        hidden = inputs_embeds
        position_embeddings = self.rotary_emb(hidden, position_ids)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids,
                           past_key_values=past_key_values, use_cache=use_cache,
                           cache_position=cache_position,
                           position_embeddings=position_embeddings, **kwargs)
        return BaseModelOutputWithPast(self.norm(hidden), past_key_values)


class LlamaForCausalLM(LlamaPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                cache_position=None, logits_to_keep=0, return_dict=True, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=past_key_values,
                         inputs_embeds=inputs_embeds, use_cache=use_cache,
                         cache_position=cache_position, **kwargs)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:, :]
        return CausalLMOutputWithPast(self.lm_head(hidden), out.past_key_values)
