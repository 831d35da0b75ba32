"""GRPO's samples: G completions per prompt from the current LoRA weights (unmerged) through
``jaxsloth.generate.generate_async`` (left-padded prompts, each run once through the prefill; a KV cache of exactly
prompt bucket + max_completion_length slots in the compute dtype), and their layout as training rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from jaxsloth.config import LoraConfig
from jaxsloth.generate import bucket, generate_async
from jaxsloth.lora import with_trainable
from jaxsloth.models.config import ModelConfig


@dataclasses.dataclass
class Rollout:
    """N = prompts x num_generations samples, each prompt's G completions in consecutive rows (TRL's order).
    completion_ids: new tokens per row, the stop token included; truncated: [N] bool, the row ran out of
    max_completion_length without a stop token (TRL: its last token is neither a stop token nor padding)."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    truncated: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(c) for c in self.completion_ids])


def start_sampling(
    params,
    trainable: dict | None,
    config: ModelConfig,
    lora: LoraConfig | None,
    prompt_ids: Sequence[Sequence[int]],
    *,
    num_generations: int,
    max_completion_length: int,
    stop_tokens: Sequence[int] = (),
    pad_token_id: int | None = None,
    temperature: float = 1.0,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    seed: int = 0,
    **generate_settings,
) -> Callable[[], Rollout]:
    """Dispatches sampling num_generations completions of each prompt with the adapter ``trainable`` applied unmerged
    (None: the base model) and returns at once a function that waits for them (the host is free meanwhile). top_k 0
    and top_p 1 mean no cut, as in TRL. generate_settings: ``generate``'s others (ops, compute_dtype,
    repetition_penalty)."""
    rows = [list(p) for p in prompt_ids for _ in range(num_generations)]
    lora_kwargs = {}
    if trainable is not None:
        params, lora_tree = with_trainable(params, trainable)
        lora_kwargs = dict(lora=lora_tree, lora_rt=lora.runtime)
    wait = generate_async(
        params,
        config,
        [list(p) for p in prompt_ids],
        num_return_sequences=num_generations,
        max_new_tokens=max_completion_length,
        temperature=temperature,
        top_p=None if top_p is None or top_p >= 1.0 else top_p,
        top_k=top_k or None,
        min_p=min_p,
        stop_tokens=stop_tokens,
        seed=seed,
        exact_length=True,  # one max_completion_length: a KV cache of exactly P + C slots, not C's bucket
        **lora_kwargs,
        **generate_settings,
    )
    ends = set(stop_tokens) | ({pad_token_id} if pad_token_id is not None else set())

    def rollout() -> Rollout:
        completions = wait()
        truncated = np.array([not c or c[-1] not in ends for c in completions])
        return Rollout(rows, completions, truncated)

    return rollout


def completion_batch(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    max_completion_length: int,
    *,
    truncated: np.ndarray | None = None,
    mask_truncated_completions: bool = False,
    pad_token_id: int = 0,
    prompt_length: int | None = None,
) -> dict:
    """Training rows [left-padded prompt (P) | completion padded on the right (C = max_completion_length)]:
    tokens, positions, segment_ids (1 = a real token, 0 = padding) [N, P + C]; completion_ids, completion_mask
    [N, C] (the loss's tokens: 0 for padding, and for truncated rows when mask_truncated_completions). P is
    prompt_length or the longest prompt rounded up to a bucket, so steps compile once per bucket."""
    n, c = len(prompt_ids), max_completion_length
    longest = max(len(p) for p in prompt_ids)
    p = prompt_length if prompt_length is not None else bucket(longest)
    if longest > p:
        raise ValueError(f"a prompt has {longest} tokens, more than prompt_length={p}")
    tokens = np.full((n, p + c), pad_token_id, np.int32)
    segment_ids = np.zeros((n, p + c), np.int32)
    mask = np.zeros((n, c), np.int32)
    for i, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        if len(completion) > c:
            raise ValueError(f"completion {i} has {len(completion)} tokens, more than max_completion_length={c}")
        tokens[i, p - len(prompt) : p] = prompt
        tokens[i, p : p + len(completion)] = completion
        segment_ids[i, p - len(prompt) : p + len(completion)] = 1
        mask[i, : len(completion)] = 1
    if mask_truncated_completions and truncated is not None:
        mask *= ~np.asarray(truncated)[:, None]
    # Positions count the real tokens only, as in generation (RoPE sees the same relative distances either way).
    positions = np.maximum(np.cumsum(segment_ids, axis=1) - 1, 0).astype(np.int32)
    return {
        "tokens": tokens,
        "positions": positions,
        "segment_ids": segment_ids,
        "completion_ids": tokens[:, p:].copy(),
        "completion_mask": mask,
    }
