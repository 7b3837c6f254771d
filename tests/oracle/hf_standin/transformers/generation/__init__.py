"""TEST STAND-IN for transformers.generation - NOT transformers' code.

GenerationMixin.generate: greedy decoding only. Each step calls the model as
self(input_ids=..., position_ids=..., past_key_values=cache, use_cache=True,
cache_position=..., attention_mask=..., return_dict=True): the prompt in one call, then one
token per call. Returns the sequences, or with return_dict_in_generate an object with
.sequences and (output_logits=True) .logits, one [B, V] float32 tensor per new token."""
import torch

from ..cache_utils import DynamicCache


class GenerateOutput(object):
    def __init__(self, sequences, logits=None):
        self.sequences = sequences
        self.logits = logits


class GenerationMixin(object):
    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=20, do_sample=False,
                 num_beams=1, return_dict_in_generate=False, output_logits=False,
                 past_key_values=None, **kwargs):
        if do_sample or num_beams != 1:
            raise NotImplementedError("the stand-in generate() is greedy only")
        cache = past_key_values if past_key_values is not None else DynamicCache()
        seq = input_ids
        eos = getattr(self.config, "eos_token_id", None)
        logits = []
        for _ in range(max_new_tokens):
            past = cache.get_seq_length()
            cache_position = torch.arange(past, seq.shape[1], device=seq.device)
            inputs = {
                "input_ids": seq[:, cache_position],
                "position_ids": cache_position.unsqueeze(0).expand(seq.shape[0], -1),
                "past_key_values": cache,
                "use_cache": True,
                "cache_position": cache_position,
            }
            if attention_mask is not None:
                inputs["attention_mask"] = attention_mask
            out = self(**inputs, return_dict=True)
            step_logits = out.logits[:, -1, :].to(dtype=torch.float32)
            logits.append(step_logits)
            nxt = step_logits.argmax(dim=-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(
                    (attention_mask.shape[0], 1))], dim=1)
            if eos is not None and bool((nxt == eos).all()):
                break
        if return_dict_in_generate:
            return GenerateOutput(seq, tuple(logits) if output_logits else None)
        return seq
