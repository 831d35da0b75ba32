"""Packing and padding into fixed (batch, seq) rows, and the resumable, seeded BatchLoader."""

import json

import numpy as np
import pytest

from jaxsloth.data import IGNORE_INDEX, BatchLoader, Example, TokenizedDataset, plan_rows, tokenize_dataset
from pallas_kernels.cross_entropy import IGNORE_INDEX as LOSS_IGNORE_INDEX
from tests.test_data_formats import ANSWERS, CHAT
from tests.test_data_tokenizer import make_tokenizer

SEQ = 37
PAD = 0


def test_ignore_index_matches_the_loss():
    assert IGNORE_INDEX == LOSS_IGNORE_INDEX == -100


def random_dataset(n: int, seed: int, max_len: int = SEQ) -> TokenizedDataset:
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(n):
        length = int(rng.integers(2, max_len + 1))
        ids = rng.integers(3, 500, size=length).astype(np.int32)
        trained = rng.random(length) < 0.6
        trained[rng.integers(1, length)] = True
        examples.append(Example(ids, trained))
    return TokenizedDataset(
        examples=examples,
        format="text",
        max_seq_length=max_len,
        pad_id=PAD,
        num_truncated=0,
        num_dropped=0,
        row_index=np.arange(n),
    )


def reference_targets(example: Example) -> list[int]:
    ids, trained = example.input_ids.tolist(), example.trained.tolist()
    return [ids[j + 1] if trained[j + 1] else -100 for j in range(len(ids) - 1)] + [-100]


def segments(batch) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(tokens, targets, positions) of every segment of a batch, checking the row layout on the way:
    segments are contiguous and numbered 1..k from the row start, padding (segment 0) only at the end."""
    out = []
    for b in range(batch["tokens"].shape[0]):
        seg = batch["segment_ids"][b]
        k = int(seg.max())
        used = int((seg > 0).sum())
        np.testing.assert_array_equal(seg[used:], 0)
        assert np.all(np.diff(seg[:used]) >= 0)
        assert (sorted(set(seg[:used].tolist())) == list(range(1, k + 1))) or k == 0
        np.testing.assert_array_equal(batch["tokens"][b, used:], PAD)
        np.testing.assert_array_equal(batch["targets"][b, used:], -100)
        np.testing.assert_array_equal(batch["positions"][b, used:], 0)
        for s in range(1, k + 1):
            idx = np.flatnonzero(seg == s)
            out.append(tuple(tuple(batch[key][b, idx].tolist()) for key in ("tokens", "targets", "positions")))
    return out


def epoch_batches(loader: BatchLoader) -> list[dict]:
    return [next(loader) for _ in range(loader.num_batches(loader.epoch))]


@pytest.mark.parametrize("pack", [True, False])
def test_epoch_holds_every_example_once_with_exact_targets(pack):
    data = random_dataset(41, seed=1)
    loader = BatchLoader(data, batch_size=3, seq_len=SEQ, pack=pack, seed=5)
    batches = epoch_batches(loader)
    for batch in batches:
        assert set(batch) == {"tokens", "targets", "positions", "segment_ids"}
        for array in batch.values():
            assert array.dtype == np.int32 and array.shape == (3, SEQ)
        if not pack:
            assert batch["segment_ids"].max() <= 1
    found = [s for batch in batches for s in segments(batch)]
    expected = [(tuple(e.input_ids.tolist()), tuple(reference_targets(e)), tuple(range(len(e)))) for e in data.examples]
    # Equal multisets: no example lost, split across rows, shifted into another, or given foreign targets.
    assert sorted(found) == sorted(expected)
    assert all(s[1][-1] == -100 for s in found)
    if pack:
        assert len(batches) < -(-len(data) // 3)


def test_packing_beats_padding_and_rows_fit():
    data = random_dataset(200, seed=2, max_len=20)
    order = np.random.default_rng(0).permutation(len(data))
    packed = plan_rows(data.lengths, order, SEQ, pack=True)
    padded = plan_rows(data.lengths, order, SEQ, pack=False)
    assert sorted(i for row in packed for i in row) == list(range(len(data)))
    assert all(data.lengths[row].sum() <= SEQ for row in packed)
    assert padded == [[int(i)] for i in order]
    assert len(packed) < 0.6 * len(padded)
    assert plan_rows(data.lengths, order, SEQ, pack=True) == packed


def test_unshuffled_padding_keeps_dataset_order():
    data = random_dataset(5, seed=3)
    loader = BatchLoader(data, batch_size=2, seq_len=SEQ, pack=False, shuffle=False, num_epochs=1)
    batches = list(loader)
    assert len(batches) == 3
    firsts = [
        b["tokens"][r, : len(data[2 * i + r])].tolist()
        for i, b in enumerate(batches)
        for r in range(2)
        if 2 * i + r < 5
    ]
    assert firsts == [e.input_ids.tolist() for e in data.examples]
    # The final partial batch is filled with an all-padding row.
    np.testing.assert_array_equal(batches[-1]["segment_ids"][1], 0)
    assert len(list(BatchLoader(data, 2, SEQ, pack=False, num_epochs=1, drop_last=True))) == 2


def test_same_seed_same_batches_other_seed_or_epoch_differs():
    data = random_dataset(30, seed=4)
    a = BatchLoader(data, 2, SEQ, seed=7)
    b = BatchLoader(data, 2, SEQ, seed=7)
    c = BatchLoader(data, 2, SEQ, seed=8)
    first_a, first_b, first_c = epoch_batches(a), epoch_batches(b), epoch_batches(c)
    second_a = epoch_batches(a)
    for x, y in zip(first_a, first_b):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert any(not np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(first_a, first_c))
    assert any(not np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(first_a, second_a))


@pytest.mark.parametrize("pack", [True, False])
def test_resume_sees_the_same_batches(pack):
    data = random_dataset(23, seed=5)
    run = BatchLoader(data, 4, SEQ, pack=pack, seed=3)
    split = run.num_batches(0) + 1  # stop one batch into the second epoch
    for _ in range(split):
        next(run)
    state = json.loads(json.dumps(run.state_dict()))  # must survive a checkpoint as plain data
    assert (state["epoch"], state["index"]) == (1, 1)
    expected = [next(run) for _ in range(run.num_batches(1) + 2)]
    resumed = BatchLoader(data, 4, SEQ, pack=pack, seed=3)
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_state_at_epoch_end_and_num_epochs():
    data = random_dataset(9, seed=6)
    loader = BatchLoader(data, 2, SEQ, seed=1, num_epochs=2)
    n0 = loader.num_batches(0)
    for _ in range(n0):
        next(loader)
    assert loader.state_dict()["epoch"] == 0 and loader.state_dict()["index"] == n0
    rest = list(loader)
    assert len(rest) == loader.num_batches(1)
    with pytest.raises(StopIteration):
        next(loader)


def test_load_state_rejects_other_settings():
    data = random_dataset(9, seed=7)
    state = BatchLoader(data, 2, SEQ, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed=1 but this loader has seed=2"):
        BatchLoader(data, 2, SEQ, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size=2 but this loader has batch_size=3"):
        BatchLoader(data, 3, SEQ, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="num_examples=9 but this loader has num_examples=8"):
        BatchLoader(random_dataset(8, seed=7), 2, SEQ, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match=r"missing \['index'\]"):
        BatchLoader(data, 2, SEQ).load_state_dict({"epoch": 0})


def test_loader_errors():
    data = random_dataset(4, seed=8)
    longest = int(data.lengths.max())
    with pytest.raises(ValueError, match=f"longest example \\({longest} tokens\\)"):
        BatchLoader(data, 2, longest - 1)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        BatchLoader(data, 0, SEQ)
    with pytest.raises(ValueError, match="no batch to yield"):
        next(BatchLoader(data, 8, SEQ, pack=False, drop_last=True))
    with pytest.raises(ValueError, match=r"example \d+ has \d+ tokens > seq_len 3"):
        plan_rows(data.lengths, np.arange(4), 3, pack=True)


def test_packed_chat_targets_decode_to_answers():
    tok = make_tokenizer()
    data = tokenize_dataset(CHAT * 3, tok, max_seq_length=128)
    assert data.num_truncated == 0
    loader = BatchLoader(data, 2, 160, seed=0, num_epochs=1)
    answers, most_segments = [], 0
    for batch in loader:
        most_segments = max(most_segments, int(batch["segment_ids"].max()))
        for _, targets, _ in segments(batch):
            trained = [t for t in targets if t != -100]
            answers.append(tok.decode(trained))
    assert most_segments >= 2
    expected = ["<|im_end|>".join(a) + "<|im_end|>" for a in ANSWERS] * 3
    assert sorted(answers) == sorted(expected)
