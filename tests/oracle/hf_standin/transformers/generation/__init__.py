"""TEST STAND-IN for transformers.generation - NOT transformers' code.

LogitsProcessor, LogitsProcessorList (applied in order to (input_ids, scores)), and a
GenerationConfig that only holds attributes (output_logits among them).
GenerationMixin.generate: greedy decoding only; the prompt in one call, then one token per call,
each as self(input_ids=..., position_ids=..., past_key_values=cache, use_cache=True,
attention_mask=..., return_dict=True). Following the stand-in's style (utils/standin.py):
4.x also passes cache_position and takes the position ids from it; 5.x builds the position ids
from the attention mask before the first call (cumulative sum - 1; 0..T-1 without a mask),
extends them by one per new token, and passes no cache_position. The next token is the argmax
of the scores after logits_processor. Returns the sequences, or with return_dict_in_generate an
object with .sequences and (output_logits=True) .logits, the raw logits (before the
processors), one [B, V] float32 tensor per new token."""
import torch

from ..cache_utils import DynamicCache
from ..utils import standin


class LogitsProcessor(object):
    def __call__(self, input_ids, scores):
        raise NotImplementedError("a LogitsProcessor subclass implements __call__")


class LogitsProcessorList(list):
    def __call__(self, input_ids, scores):
        for processor in self:
            scores = processor(input_ids, scores)
        return scores


class GenerationConfig(object):
    def __init__(self, **kwargs):
        self.output_logits = False
        self.output_scores = False
        self.return_dict_in_generate = False
        self.__dict__.update(kwargs)


class GenerateOutput(object):
    def __init__(self, sequences, logits=None):
        self.sequences = sequences
        self.logits = logits


class GenerationMixin(object):
    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=20, do_sample=False,
                 num_beams=1, return_dict_in_generate=False, output_logits=False,
                 past_key_values=None, logits_processor=None, **kwargs):
        if do_sample or num_beams != 1:
            raise NotImplementedError("the stand-in generate() is greedy only")
        v5 = standin.STYLE >= 5
        cache = past_key_values if past_key_values is not None else DynamicCache()
        seq = input_ids
        eos = getattr(self.config, "eos_token_id", None)
        logits = []
        position_ids = None
        if v5:  # prepared once, from the mask, then extended
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(
                    attention_mask == 0, 0)
            else:
                position_ids = torch.arange(seq.shape[1], device=seq.device)[None].expand(
                    seq.shape[0], -1)
        for _ in range(max_new_tokens):
            past = cache.get_seq_length()
            inputs = {"input_ids": seq[:, past:], "past_key_values": cache, "use_cache": True}
            if v5:
                inputs["position_ids"] = position_ids[:, past:]
            else:
                cache_position = torch.arange(past, seq.shape[1], device=seq.device)
                inputs["cache_position"] = cache_position
                inputs["position_ids"] = cache_position.unsqueeze(0).expand(seq.shape[0], -1)
            if attention_mask is not None:
                inputs["attention_mask"] = attention_mask
            out = self(**inputs, return_dict=True)
            step_logits = out.logits[:, -1, :].to(dtype=torch.float32)
            logits.append(step_logits)
            scores = step_logits
            if logits_processor is not None:
                scores = logits_processor(seq, step_logits.clone())
            nxt = scores.argmax(dim=-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(
                    (attention_mask.shape[0], 1))], dim=1)
            if v5:
                position_ids = torch.cat([position_ids, position_ids[:, -1:] + 1], dim=1)
            if eos is not None and bool((nxt == eos).all()):
                break
        if return_dict_in_generate:
            return GenerateOutput(seq, tuple(logits) if output_logits else None)
        return seq
