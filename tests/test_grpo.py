"""GRPO's host-side pieces: built-in rewards, reward scoring with TRL's signature and the training-row layout."""

import numpy as np
import pytest

from jaxsloth.methods.grpo import GRPOLossConfig, group_advantages
from jaxsloth.methods.rewards import exact_answer_reward, extract_answer, format_reward, score
from jaxsloth.methods.rollout import completion_batch


def test_builtin_rewards():
    fmt = format_reward(r"<think>.*</think>\s*<answer>.*</answer>")
    assert fmt(completions=["<think>x\ny</think> <answer>4</answer>", "4"]) == [1.0, 0.0]
    assert extract_answer(r"so \boxed{1,234.0} done") == "1,234.0"
    assert extract_answer("<answer> 12 </answer> then 13") == "12"
    assert extract_answer("it is 3, not 4.") == "4"
    assert extract_answer("no digits") is None
    acc = exact_answer_reward()
    texts = [r"\boxed{1234}", "The answer is 7.", [{"role": "assistant", "content": "<answer>x y</answer>"}], "5"]
    assert acc(completions=texts, answer=["1,234", "7", "x  y", None]) == [1.0, 1.0, 1.0, None]
    with pytest.raises(ValueError, match="no column 'answer'"):
        acc(completions=["1"], solution=["1"])


def test_score_passes_columns_and_marks_none():
    def half(prompts, completions, completion_ids, level, **kwargs):
        return [None if lv == 0 else len(c) * lv for c, lv in zip(completions, level)]

    r = score([half, format_reward("a+")], ["p", "p"], ["aa", "b"], [[1, 2], [3]], {"level": [0, 2]})
    np.testing.assert_array_equal(r, np.array([[np.nan, 1.0], [2.0, 0.0]], np.float32))
    with pytest.raises(ValueError, match="returned 1 rewards for 2"):
        score([lambda **k: [1.0]], ["p", "p"], ["a", "b"], [[1], [2]])


def test_advantages_and_loss_settings_checked():
    adv, metrics = group_advantages(np.array([[1.0], [1.0], [0.0], [2.0]]), [1.0], 2, "group", ["r"])
    np.testing.assert_allclose(adv, [0.0, 0.0, -1 / (np.sqrt(2) + 1e-4), 1 / (np.sqrt(2) + 1e-4)], rtol=1e-6)
    assert metrics["frac_reward_zero_std"] == 0.5
    with pytest.raises(ValueError, match="scale_rewards='mean'"):
        group_advantages(np.zeros((2, 1)), [1.0], 2, "mean")
    with pytest.raises(ValueError, match="not whole groups"):
        group_advantages(np.zeros((3, 1)), [1.0], 2)
    with pytest.raises(ValueError, match="loss_type='ppo'"):
        GRPOLossConfig(loss_type="ppo")


def test_completion_batch_layout():
    b = completion_batch([[5, 6], [7]], [[8, 9, 2], [10, 11, 12, 13]], 4, truncated=np.array([False, True]),
                         mask_truncated_completions=True, pad_token_id=0, prompt_length=3)  # fmt: skip
    np.testing.assert_array_equal(b["tokens"], [[0, 5, 6, 8, 9, 2, 0], [0, 0, 7, 10, 11, 12, 13]])
    np.testing.assert_array_equal(b["segment_ids"], [[0, 1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(b["positions"], [[0, 0, 1, 2, 3, 4, 4], [0, 0, 0, 1, 2, 3, 4]])
    np.testing.assert_array_equal(b["completion_mask"], [[1, 1, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(b["completion_ids"], [[8, 9, 2, 0], [10, 11, 12, 13]])
    with pytest.raises(ValueError, match="more than max_completion_length=2"):
        completion_batch([[1]], [[1, 2, 3]], 2)
