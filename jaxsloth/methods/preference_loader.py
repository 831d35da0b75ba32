"""Preference datasets -> tokenized examples -> fixed-shape packed batches, resumable like ``jaxsloth.data.BatchLoader``.

Sources are whatever the SFT path reads (``jaxsloth.data.load_records``: files, dataset folders, Hub ids,
``datasets`` objects, lists of dicts). Formats are TRL's: paired ``prompt``/``chosen``/``rejected`` (strings or
conversations, or implicit prompts) for DPO, ORPO and SimPO; unpaired ``prompt``/``completion``/``label`` for KTO
(paired data given to KTO is unpaired as TRL's ``unpair_preference_dataset`` does: chosen -> True, rejected ->
False). Every example is tokenized once (``preference_data``), the chat template applied once per conversation.

A batch holds ``pairs_per_micro`` examples per micro-batch times ``gradient_accumulation_steps``. Each micro-batch
is packed into ``pairs_per_micro`` rows of ``seq_len`` tokens (the longest group of the dataset, rounded up), a
pair's chosen and rejected in consecutive segments of one row (KTO: an example and its KL sequence), so the step
compiles once. The last partial batch of an epoch is dropped (a jitted step has fixed shapes).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from jaxsloth.methods.preference_data import pack, tokenize_pair, tokenize_unpaired

log = logging.getLogger("jaxsloth")
ROW_MULTIPLE = 8  # rows are rounded up to this many tokens


@dataclasses.dataclass
class PreferenceExamples:
    """Tokenized examples. Paired: prompt, chosen, rejected ids per pair. Unpaired (KTO): prompt, completion, label,
    and the KL completion (the previous example's completion within its block of ``pairs_per_micro``, as TRL's
    KTOTrainer assigns it at dataset preparation)."""

    prompts: list[list[int]]
    completions: list[tuple[list[int], list[int]]]  # (chosen, rejected), or (completion, KL completion)
    labels: np.ndarray | None = None  # [n] bool, KTO only
    num_dropped: int = 0

    @property
    def unpaired(self) -> bool:
        return self.labels is not None

    def __len__(self) -> int:
        return len(self.prompts)

    def groups(self, ids) -> list[list[tuple[list[int], list[int]]]]:
        """The (prompt, completion) sequences of examples ``ids``, one group (one row) per example."""
        return [[(self.prompts[i], c) for c in self.completions[i]] for i in ids]

    def group_length(self, i: int) -> int:
        return sum(len(self.prompts[i]) + len(c) for c in self.completions[i])


def unpair(example: dict) -> list[dict]:
    """A paired example -> two KTO examples (TRL's ``unpair_preference_dataset``)."""
    from jaxsloth.methods.preference_data import extract_prompt

    if "prompt" not in example:
        example = extract_prompt(example)
    return [
        {"prompt": example["prompt"], "completion": example["chosen"], "label": True},
        {"prompt": example["prompt"], "completion": example["rejected"], "label": False},
    ]


def _truncate(prompt: list[int], completion: list[int], max_length: int | None) -> list[int]:
    """The completion cut so prompt + completion <= max_length (TRL's truncation_mode="keep_start")."""
    if max_length is None:
        return completion
    return completion[: max(max_length - len(prompt), 0)]


def tokenize_preferences(
    records: list[dict], tokenizer: Any, *, method: str, max_length: int | None, pairs_per_micro: int
) -> PreferenceExamples:
    """Rows in TRL's preference formats -> PreferenceExamples. Each prompt + completion is cut to max_length tokens
    (keeping the start); an example left with an empty completion is dropped and counted."""
    if not records:
        raise ValueError("the preference dataset is empty")
    first = set(records[0])
    unpaired_data = {"completion", "label"} <= first
    if not unpaired_data and not {"chosen", "rejected"} <= first:
        raise ValueError(
            f"preference data needs prompt/chosen/rejected (or chosen/rejected) or, for kto, prompt/completion/label "
            f"columns; the first row has {sorted(first)}"
        )
    if method != "kto" and unpaired_data:
        raise ValueError(
            f"method={method!r} trains on pairs (prompt/chosen/rejected); prompt/completion/label is KTO's"
        )
    prompts, completions, labels, dropped, cut = [], [], [], 0, 0
    for row, example in enumerate(records):
        try:
            if method == "kto":
                for unpaired in [example] if unpaired_data else unpair(example):
                    prompt, completion, label = tokenize_unpaired(tokenizer, unpaired)
                    prompts.append(prompt)
                    completions.append([completion])
                    labels.append(label)
            else:
                prompt, chosen, rejected = tokenize_pair(tokenizer, example)
                prompts.append(prompt)
                completions.append([chosen, rejected])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"preference data row {row}: {e}") from e
    kept_prompts, kept, kept_labels = [], [], []
    for i, (prompt, comps) in enumerate(zip(prompts, completions, strict=True)):
        short = [_truncate(prompt, c, max_length) for c in comps]
        cut += sum(len(s) < len(c) for s, c in zip(short, comps, strict=True))
        if not prompt or not all(short):
            dropped += 1
            continue
        kept_prompts.append(prompt)
        kept.append(short)
        if labels:
            kept_labels.append(labels[i])
    if cut:
        log.warning("%d completions cut to max_length=%s tokens (prompt included)", cut, max_length)
    if dropped:
        log.warning(
            "%d preference examples dropped: an empty prompt, or no completion token within max_length", dropped
        )
    if not kept:
        raise ValueError(f"no preference example left after truncation to max_length={max_length}")
    if method != "kto":
        return PreferenceExamples(kept_prompts, [tuple(c) for c in kept], num_dropped=dropped)
    # KL completions: each block of pairs_per_micro examples (dataset order) shifted by one, as TRL's KTOTrainer.
    with_kl = []
    for start in range(0, len(kept), pairs_per_micro):
        block = [c[0] for c in kept[start : start + pairs_per_micro]]
        shifted = block[-1:] + block[:-1]
        with_kl += [
            (c, _truncate(p, k, max_length)) for c, k, p in zip(block, shifted, kept_prompts[start:], strict=False)
        ]
    return PreferenceExamples(kept_prompts, with_kl, np.asarray(kept_labels, bool), num_dropped=dropped)


def row_length(examples: PreferenceExamples) -> int:
    """Tokens per packed row: the longest example's sequences together, rounded up to ROW_MULTIPLE."""
    longest = max(examples.group_length(i) for i in range(len(examples)))
    return -(-longest // ROW_MULTIPLE) * ROW_MULTIPLE


def pack_examples(examples: PreferenceExamples, ids, seq_len: int) -> dict[str, np.ndarray]:
    """Examples ``ids`` -> ``preference_data.pack`` rows, one row per example ([len(ids), seq_len] each), sequences
    numbered as the losses read them: pairs chosen 2i, rejected 2i + 1; KTO examples 0..n-1, KL sequences n..2n-1
    (plus "desirable" [n] bool)."""
    out = pack(examples.groups(ids), seq_len, num_rows=len(ids))
    if examples.unpaired:
        n, index = len(ids), out["sequence_index"]
        out["sequence_index"] = np.where(index < 0, -1, np.where(index % 2 == 0, index // 2, n + index // 2))
        out["sequence_index"] = out["sequence_index"].astype(np.int32)
        out["desirable"] = examples.labels[np.asarray(ids)]
    return out


def sequence_order(examples: PreferenceExamples, values: np.ndarray) -> np.ndarray:
    """Per-example values [n, 2] (chosen/rejected, or completion/KL) -> [2n] in ``pack_examples``'s sequence order."""
    return values.T.reshape(-1) if examples.unpaired else values.reshape(-1)


class PreferenceLoader:
    """Iterator of preference batches: ``pack_examples`` arrays of ``gradient_accumulation_steps`` micro-batches
    stacked along rows ([accum * pairs_per_micro, seq_len]; "desirable" and "ref_logps" [accum * sequences]).

    Epoch e visits the examples in a permutation drawn from (seed, e). ``ref_logps`` ([n, 2] per example, from
    ``preference_train.precompute_reference``) adds each batch's precomputed reference log-probs. ``method`` is
    recorded in the state (a run's identity) only. state_dict() /
    load_state_dict() as BatchLoader's: a resumed loader yields exactly the batches the first would have next."""

    def __init__(
        self,
        examples: PreferenceExamples,
        *,
        pairs_per_micro: int,
        gradient_accumulation_steps: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        ref_logps: np.ndarray | None = None,
        method: str = "dpo",
    ):
        if pairs_per_micro < 1:
            raise ValueError(f"pairs_per_micro must be >= 1, got {pairs_per_micro}")
        self.examples = examples
        self.pairs_per_micro = pairs_per_micro
        self.accum = gradient_accumulation_steps
        self.batch_size = pairs_per_micro * gradient_accumulation_steps
        if len(examples) < self.batch_size:
            raise ValueError(
                f"the preference dataset has {len(examples)} examples, fewer than one batch "
                f"({pairs_per_micro} per device x {gradient_accumulation_steps} accumulation steps)"
            )
        self.seq_len = row_length(examples)
        self.seed, self.shuffle, self.num_epochs = seed, shuffle, num_epochs
        self.ref_logps = ref_logps
        self.method = method  # in the state: a checkpoint of one method never resumes another
        self.num_tokens = sum(examples.group_length(i) for i in range(len(examples)))
        self.epoch = self.index = 0

    @property
    def sequences_per_micro(self) -> int:
        return 2 * self.pairs_per_micro

    def __iter__(self) -> PreferenceLoader:
        return self

    def num_batches(self, epoch: int = 0) -> int:
        return len(self.examples) // self.batch_size

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.examples)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def __next__(self) -> dict[str, np.ndarray]:
        if self.index >= self.num_batches():
            self.epoch, self.index = self.epoch + 1, 0
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        ids = self._order(self.epoch)[self.index * self.batch_size : (self.index + 1) * self.batch_size]
        self.index += 1
        micros = [ids[k : k + self.pairs_per_micro] for k in range(0, len(ids), self.pairs_per_micro)]
        parts = [pack_examples(self.examples, m, self.seq_len) for m in micros]
        batch = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        if self.ref_logps is not None:
            batch["ref_logps"] = np.concatenate(
                [sequence_order(self.examples, self.ref_logps[m]) for m in micros]
            ).astype(np.float32)
        return batch

    def state_dict(self) -> dict[str, int | str]:
        return {"epoch": self.epoch, "index": self.index, **self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"epoch", "index"} - set(state)
        if missing:
            raise ValueError(f"loader state is missing {sorted(missing)}")
        for key, value in self._fingerprint().items():
            if key in state and type(value)(state[key]) != value:
                raise ValueError(f"loader state has {key}={state[key]!r} but this loader has {key}={value!r}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def _fingerprint(self) -> dict[str, int | str]:
        return {
            "method": self.method,
            "seed": self.seed,
            "num_examples": len(self.examples),
            "num_tokens": self.num_tokens,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "unpaired": int(self.examples.unpaired),
            "shuffle": int(self.shuffle),
        }
