"""Batched decoding from prompt embeddings with a shared, once-computed prefix.

All prompts of one `analyse_pair` call start with the same positions: BOS, the system prompt,
"USER:", the 196 visual rows and the first text tokens after them. Decoding them:

1. prefix prefill: the common prefix is run once (batch 1) into the KV cache;
2. packed suffix prefill: the remaining per-prompt tokens are concatenated into one sequence
   (batch 1, no padding) with a block mask, so each suffix sees the prefix and its own tokens
   only, at the positions it would have alone;
3. batched decode: the cache is gathered into one row per prompt ([prefix, own suffix, holes])
   and all prompts decode together; holes are masked, rows leave the batch when they finish.

Why the outputs equal decoding each prompt alone: every token attends to exactly the keys it
would see alone, at the same RoPE positions (position ids are explicit). Only floating-point
summation order differs, which does not change greedy tokens short of an exact tie.

The KV cache is preallocated for the whole generation (`PreallocatedKVLayer`), which avoids the
per-step `torch.cat` of `DynamicCache` (a quarter of a batched decode step on CPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import LlamaForCausalLM
from transformers.cache_utils import Cache, DynamicLayer

__all__ = ["PreallocatedKVLayer", "SamplingConfig", "common_prefix_length", "generate_from_embeddings"]


class PreallocatedKVLayer(DynamicLayer):
    """A `DynamicLayer` writing into buffers of shape (B, H, capacity, d) instead of concatenating.

    `keys` / `values` are views of the filled part, as `DynamicLayer` exposes them. The buffers
    grow (doubling) if `capacity` turns out too small.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self._keys = key_states.new_empty((b, h, self.capacity, d))
        self._values = value_states.new_empty((b, h, self.capacity, value_states.shape[-1]))
        self.is_initialized = True

    def _refresh(self) -> None:
        self.keys = self._keys[:, :, : self.length]
        self.values = self._values[:, :, : self.length]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[2]:
            grow = max(end, 2 * self._keys.shape[2]) - self._keys.shape[2]
            self._keys = torch.cat(
                [self._keys, self._keys.new_empty((*self._keys.shape[:2], grow, self._keys.shape[3]))], 2
            )
            self._values = torch.cat(
                [self._values, self._values.new_empty((*self._values.shape[:2], grow, self._values.shape[3]))], 2
            )
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self._refresh()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._keys = self._keys.repeat_interleave(repeats, dim=0)
            self._values = self._values.repeat_interleave(repeats, dim=0)
            self._refresh()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._keys = self._keys[indices]
            self._values = self._values[indices]
            self._refresh()

    def reset(self) -> None:
        self.length = 0
        super().reset()


def _new_cache(llm: LlamaForCausalLM, capacity: int) -> Cache:
    return Cache(layers=[PreallocatedKVLayer(capacity) for _ in range(llm.config.num_hidden_layers)])


@dataclass
class SamplingConfig:
    """Sampling settings. The default (`do_sample=False`) is greedy and deterministic."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


def common_prefix_length(embeddings: Sequence[torch.Tensor]) -> int:
    """Number of leading rows identical (bit for bit) in every (L_i, D) tensor."""
    first = embeddings[0]
    length = min(e.shape[0] for e in embeddings)
    same = torch.ones(length, dtype=torch.bool, device=first.device)
    for e in embeddings[1:]:
        same &= (e[:length] == first[:length]).all(dim=-1)
    mismatch = (~same).nonzero()
    return int(mismatch[0]) if len(mismatch) else length


def _select(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,)."""
    if not sampling.do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / max(sampling.temperature, 1e-5), dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > sampling.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_from_embeddings(
    llm: LlamaForCausalLM,
    embeddings: Sequence[torch.Tensor],
    max_new_tokens: int | Sequence[int],
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int = 0,
    share_prefix: bool = True,
    sampling: SamplingConfig | None = None,
) -> list[list[int]]:
    """Decode every prompt; returns the generated ids per prompt (EOS excluded).

    embeddings: per prompt (L_i, D) input embeddings (text with visual rows spliced in).
    max_new_tokens: one limit for all prompts or one per prompt.
    share_prefix: prefill the common prefix once (only used when there are >= 2 prompts).
    """
    sampling = sampling or SamplingConfig()
    batch = len(embeddings)
    if batch == 0:
        return []
    limits = [max_new_tokens] * batch if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != batch:
        raise ValueError("max_new_tokens must be an int or one value per prompt")
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    lengths = [int(e.shape[0]) for e in embeddings]
    max_positions = llm.config.max_position_embeddings
    for i, length in enumerate(lengths):
        if length >= max_positions:
            raise ValueError(f"Prompt {i} has {length} positions; the LLM supports {max_positions}")
        limits[i] = max(0, min(limits[i], max_positions - length))

    decoder, lm_head = llm.get_decoder(), llm.get_output_embeddings()
    embed_tokens = llm.get_input_embeddings()
    device = embeddings[0].device
    generator = torch.Generator(device=device).manual_seed(sampling.seed) if sampling.do_sample else None

    # ---- 1. shared prefix, once
    prefix = common_prefix_length(embeddings) if share_prefix and batch > 1 else 0
    prefix = min(prefix, min(lengths) - 1)  # each prompt keeps >= 1 suffix row to produce its logits
    suffix_lengths = [length - prefix for length in lengths]
    packed_length = sum(suffix_lengths)
    cache = _new_cache(llm, prefix + packed_length + (max(limits) if batch == 1 else 0))
    if prefix > 0:
        decoder(inputs_embeds=embeddings[0][:prefix].unsqueeze(0), past_key_values=cache, use_cache=True)

    # ---- 2. all suffixes packed into one row; block mask keeps them apart
    starts = [sum(suffix_lengths[:i]) for i in range(batch)]
    packed = torch.cat([e[prefix:] for e in embeddings], dim=0).unsqueeze(0)
    positions = torch.cat([torch.arange(prefix, length, device=device) for length in lengths]).unsqueeze(0)
    block_mask = None
    if batch > 1:
        segment = torch.repeat_interleave(
            torch.arange(batch, device=device), torch.tensor(suffix_lengths, device=device)
        )
        causal = torch.ones(packed_length, packed_length, dtype=torch.bool, device=device).tril()
        own = (segment[:, None] == segment[None, :]) & causal
        sees_prefix = torch.ones(packed_length, prefix, dtype=torch.bool, device=device)
        block_mask = torch.cat([sees_prefix, own], dim=1)[None, None]  # (1, 1, N, P + N), True = attend
    hidden = decoder(
        inputs_embeds=packed,
        attention_mask=block_mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state[0]
    last_rows = torch.tensor([s + n - 1 for s, n in zip(starts, suffix_lengths, strict=True)], device=device)
    logits = lm_head(hidden[last_rows])

    # ---- 3. one decode row per prompt: [prefix, own suffix, masked holes up to the longest suffix]
    width = max(suffix_lengths)
    mask = None
    if batch > 1:
        index = torch.zeros((batch, prefix + width), dtype=torch.long, device=device)
        mask = torch.zeros((batch, prefix + width), dtype=torch.long, device=device)
        index[:, :prefix] = torch.arange(prefix, device=device)
        mask[:, :prefix] = 1
        for i in range(batch):
            index[i, prefix : prefix + suffix_lengths[i]] = torch.arange(
                prefix + starts[i], prefix + starts[i] + suffix_lengths[i], device=device
            )
            mask[i, prefix : prefix + suffix_lengths[i]] = 1
        packed_cache, cache = cache, _new_cache(llm, prefix + width + max(limits))
        for source, target in zip(packed_cache.layers, cache.layers, strict=True):
            # (1, H, P + N, d) -> (B, H, P + W, d)
            keys = source.keys[0][:, index].transpose(0, 1)
            values = source.values[0][:, index].transpose(0, 1)
            target.update(keys, values)
        del packed_cache
    padded = mask is not None and bool((mask == 0).any())

    # Rows that finish are removed from the batch and from the cache.
    outputs: list[list[int]] = [[] for _ in range(batch)]
    active = list(range(batch))  # original index of each row still in the batch
    next_position = torch.tensor(lengths, device=device)
    step = 0
    while True:
        tokens = _select(logits, sampling, generator).tolist()
        keep = []
        for row, (i, token) in enumerate(zip(active, tokens, strict=True)):
            if limits[i] <= len(outputs[i]):
                continue
            if token in eos:
                continue
            outputs[i].append(token)
            if len(outputs[i]) < limits[i]:
                keep.append(row)
        if not keep:
            break
        if len(keep) < len(active):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask = mask[index] if mask is not None else None
            next_position = next_position[index]
            active = [active[r] for r in keep]
            tokens = [tokens[r] for r in keep]
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
            padded = padded and bool((mask == 0).any())
        new = embed_tokens(torch.tensor(tokens, device=device).unsqueeze(1))
        hidden = decoder(
            inputs_embeds=new,
            attention_mask=mask if padded else None,
            position_ids=(next_position + step).unsqueeze(1),
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        logits = lm_head(hidden[:, -1])
        step += 1
    return outputs
