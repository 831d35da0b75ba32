"""Reward functions with TRL's signature, ``f(prompts=..., completions=..., completion_ids=..., **columns) ->
list[float | None]`` (the dataset's other columns arrive as keyword lists, one value per completion; None = this
function does not score that completion), their evaluation into one [N, F] array, and two built-ins: a regex format
reward and an exact-answer reward, also named in settings (``resolve_reward_funcs``)."""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable, Sequence

import numpy as np

RewardFunc = Callable[..., list]


def reward_name(func: RewardFunc) -> str:
    """The name TRL logs a reward function under (``rewards/<name>/mean``)."""
    return getattr(func, "__name__", type(func).__name__)


def score(
    reward_funcs: Sequence[RewardFunc],
    prompts: list,
    completions: list,
    completion_ids: list[list[int]],
    columns: dict[str, list] | None = None,
    **extra,
) -> np.ndarray:
    """Calls each function on the N samples -> [N, F] f32, NaN where a function returned None. columns: the dataset's
    columns (besides prompt), one value per sample; extra: further keywords (trainer_state)."""
    out = np.zeros((len(prompts), len(reward_funcs)), np.float32)
    kwargs = {**(columns or {}), **extra}
    for i, func in enumerate(reward_funcs):
        values = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        values = list(values)
        if len(values) != len(prompts):
            raise ValueError(
                f"reward function {reward_name(func)!r} returned {len(values)} rewards for {len(prompts)} completions"
            )
        out[:, i] = [np.nan if v is None else float(v) for v in values]
    return out


def _text(completion) -> str:
    """A completion as text: a string, or a conversational completion's last message content."""
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"]


def format_reward(pattern: str, reward: float = 1.0, name: str = "format_reward") -> RewardFunc:
    """reward where the whole completion matches ``pattern`` (re.fullmatch, DOTALL), else 0."""
    regex = re.compile(pattern, re.DOTALL)

    def func(completions, **kwargs):
        return [reward if regex.fullmatch(_text(c).strip()) else 0.0 for c in completions]

    func.__name__ = name
    return func


_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str) -> str | None:
    """The answer a completion gives: the last \\boxed{...}, else the last <answer>...</answer>, else the last number;
    None when there is none."""
    for pattern in (_BOXED, _ANSWER_TAG):
        found = pattern.findall(text)
        if found:
            return found[-1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _normalise(answer: str) -> str:
    answer = answer.strip().rstrip(".").replace(",", "").replace("$", "")
    try:
        number = float(answer)
    except ValueError:
        return " ".join(answer.split())
    return str(int(number)) if number.is_integer() else str(number)


def exact_answer_reward(
    answer_column: str = "answer", extract: Callable[[str], str | None] | None = extract_answer, name: str = "accuracy"
) -> RewardFunc:
    """1 where the completion's answer (``extract``; None: the whole completion) equals the dataset's
    ``answer_column`` after normalising (whitespace, trailing period, thousands commas, 2.0 = 2), else 0; None where
    the sample has no reference answer (TRL: unscored)."""

    def func(completions, **kwargs):
        if answer_column not in kwargs:
            raise ValueError(f"exact_answer_reward: the dataset has no column {answer_column!r}")
        out = []
        for c, ref in zip(completions, kwargs[answer_column], strict=True):
            if ref is None:
                out.append(None)
                continue
            text = _text(c)
            got = extract(text) if extract is not None else text
            out.append(1.0 if got is not None and _normalise(got) == _normalise(str(ref)) else 0.0)
        return out

    func.__name__ = name
    return func


# The reward format the reasoning recipes (DeepSeek-R1, Unsloth's GRPO notebooks) ask for.
THINK_ANSWER_FORMAT = r"<think>.*?</think>\s*<answer>.*?</answer>"
BUILTIN_REWARDS: dict[str, Callable[[], RewardFunc]] = {
    "exact_answer": exact_answer_reward,
    "format": lambda: format_reward(THINK_ANSWER_FORMAT, name="format"),
}


def resolve_reward_funcs(specs: Sequence, search_dir: str | os.PathLike | None = None) -> list[RewardFunc]:
    """Reward functions from the ``reward_funcs`` setting: callables as they are; a built-in's name
    (``BUILTIN_REWARDS``: exact_answer scores the dataset's "answer" column, format asks for
    <think>...</think><answer>...</answer>); or "module.path:function", imported with ``search_dir`` (the YAML
    file's folder) searched first, then sys.path (PYTHONPATH, the working directory). Raises ValueError naming the
    bad entry."""
    funcs = []
    for spec in specs:
        if callable(spec):
            funcs.append(spec)
        elif spec in BUILTIN_REWARDS:
            funcs.append(BUILTIN_REWARDS[spec]())
        else:
            funcs.append(_import_reward(str(spec), search_dir))
    return funcs


def _import_reward(spec: str, search_dir: str | os.PathLike | None) -> RewardFunc:
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        raise ValueError(
            f"reward_funcs: {spec!r} is neither a built-in ({', '.join(BUILTIN_REWARDS)}) nor module.path:function"
        )
    path = [os.fspath(search_dir)] if search_dir is not None else []
    sys.path[:0] = path
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        where = f" (searched {path[0]} and PYTHONPATH)" if path else " (searched PYTHONPATH)"
        raise ValueError(f"reward_funcs: cannot import module {module_name!r} of {spec!r}{where}: {e}") from None
    finally:
        del sys.path[: len(path)]
    func = getattr(module, attr, None)
    if not callable(func):
        raise ValueError(f"reward_funcs: module {module_name!r} ({module.__file__}) has no function {attr!r}")
    return func
