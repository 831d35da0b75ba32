"""Preference data shaping: tokenization equals TRL's dataset preparation; packing lays pairs out as documented."""

import types

import numpy as np
import pytest

from jaxsloth.methods.preference_data import (
    extract_prompt,
    pack,
    pack_pairs,
    pack_unpaired,
    tokenize_pair,
    tokenize_unpaired,
)
from tests.tiny_tokenizers import CHAT_FAMILIES, tiny_tokenizer

USER = {"role": "user", "content": "What colour is the sky?"}
PAIRED = [
    {"prompt": "The sky is", "chosen": " blue", "rejected": " green"},
    {"chosen": "The sky is blue", "rejected": "The sky is green"},  # implicit prompt, strings
    {"prompt": [USER], "chosen": [{"role": "assistant", "content": "Blue."}],
     "rejected": [{"role": "assistant", "content": "Green!"}]},
    {"chosen": [USER, {"role": "assistant", "content": "Blue."}],  # implicit prompt, conversations
     "rejected": [USER, {"role": "assistant", "content": "Green!"}]},
]  # fmt: skip


def _trl_args():
    return types.SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")


@pytest.mark.parametrize("family", ["llama-3.2", "qwen2"])
def test_pairs_tokenize_as_trl(family):
    from datasets import Dataset
    from trl.trainer.dpo_trainer import DPOTrainer

    tok = tiny_tokenizer(CHAT_FAMILIES[family], 131)
    for example in PAIRED:
        expected = DPOTrainer._prepare_dataset(
            types.SimpleNamespace(_tokenizer=tok), Dataset.from_list([example]), tok, _trl_args(), "train"
        )[0]
        prompt, chosen, rejected = tokenize_pair(tok, example)
        assert (prompt, chosen, rejected) == (expected["prompt_ids"], expected["chosen_ids"], expected["rejected_ids"])
        assert chosen and rejected


def test_extract_prompt_as_trl():
    from trl.data_utils import extract_prompt as trl_extract_prompt

    for example in PAIRED:
        if "prompt" not in example:
            assert extract_prompt(example) == trl_extract_prompt(example)


def test_unpaired_tokenizes_like_a_pair_completion():
    tok = tiny_tokenizer(CHAT_FAMILIES["qwen2"], 131)
    prompt, completion, desirable = tokenize_unpaired(
        tok, {"prompt": [USER], "completion": [{"role": "assistant", "content": "Blue."}], "label": True}
    )
    pair = tokenize_pair(tok, PAIRED[2])
    assert (prompt, completion, desirable) == (pair[0], pair[1], True)
    with pytest.raises(ValueError, match="'label'"):
        tokenize_unpaired(tok, {"prompt": "a", "completion": "b"})
    with pytest.raises(ValueError, match="'rejected'"):
        tokenize_pair(tok, {"prompt": "a", "chosen": "b"})


def test_pack_pairs_layout():
    pairs = [([5, 6, 7], [8, 9], [10]), ([11, 12], [13, 14, 15], [16, 17])]
    b = pack_pairs(pairs, seq_len=12)
    # Pair 0 (9 tokens) fills row 0; pair 1 (9 tokens) does not fit beside it and starts row 1.
    assert b["tokens"].shape == (2, 12)
    np.testing.assert_array_equal(b["tokens"][0], [5, 6, 7, 8, 9, 5, 6, 7, 10, 0, 0, 0])
    np.testing.assert_array_equal(b["segment_ids"][0], [1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0, 0])
    np.testing.assert_array_equal(b["positions"][0], [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0, 0])
    np.testing.assert_array_equal(b["sequence_index"][1], [2] * 5 + [3] * 4 + [-1] * 3)
    # Only completion tokens are targets, each predicted from the token before it.
    np.testing.assert_array_equal(b["targets"][0], [-100, -100, 8, 9, -100, -100, -100, 10, -100, -100, -100, -100])
    np.testing.assert_array_equal(b["targets"][1], [-100, 13, 14, 15, -100, -100, 16, 17, -100, -100, -100, -100])
    assert pack_pairs(pairs, seq_len=20)["tokens"].shape == (1, 20)
    assert pack_pairs(pairs, seq_len=20, num_rows=3)["tokens"].shape == (3, 20)
    with pytest.raises(ValueError, match="seq_len=8"):
        pack_pairs(pairs, seq_len=8)
    with pytest.raises(ValueError, match="num_rows=1"):
        pack_pairs(pairs, seq_len=12, num_rows=1)
    with pytest.raises(ValueError, match="empty prompt"):
        pack_pairs([([], [1], [2])], seq_len=8)
    with pytest.raises(ValueError, match="empty completion"):
        pack([[([1], [])]], seq_len=8)


def test_pack_unpaired_kl_pairs():
    examples = [([1, 2], [3], True), ([4], [5, 6], False), ([7], [8], True)]
    b, desirable = pack_unpaired(examples, seq_len=32)
    np.testing.assert_array_equal(desirable, [True, False, True])
    idx, tokens = b["sequence_index"][0], b["tokens"][0]
    seqs = [tokens[idx == i].tolist() for i in range(6)]
    # Examples, then each prompt with the previous example's completion (cyclically), as TRL's KL pairs.
    assert seqs == [[1, 2, 3], [4, 5, 6], [7, 8], [1, 2, 8], [4, 3], [7, 5, 6]]
