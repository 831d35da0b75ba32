"""Streaming: batches from an IterableDataset in order, exact resume by rows consumed, and a streamed train run."""

import json
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest

import jaxsloth
from jaxsloth.data import streaming_loader, tokenize_dataset
from tests.test_data_tokenizer import make_tokenizer

WORDS = "the cat sat on the mat and the dog sat on the log hello world how are you today".split()
TEXTS = [" ".join(WORDS[i % 7 : i % 7 + 1 + i % 11]) for i in range(40)]
DEMO = Path(jaxsloth.__file__).parent / "demo_assets"


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


def batches(loader, n):
    return [next(loader) for _ in range(n)]


def segments(batch) -> list[list[int]]:
    """The token ids of each packed example, in row order."""
    out = []
    for tokens, seg in zip(batch["tokens"], batch["segment_ids"], strict=True):
        for k in range(1, int(seg.max()) + 1):
            out.append(tokens[seg == k].tolist())
    return out


def test_stream_yields_the_examples_in_order(corpus):
    tok = make_tokenizer()
    loader = streaming_loader(corpus, tok, batch_size=2, seq_len=16, num_epochs=1)
    seen = [ids for batch in loader for ids in segments(batch)]
    reference = tokenize_dataset(corpus, tok, max_seq_length=16)  # truncated the same way
    assert seen == [e.input_ids.tolist() for e in reference.examples]
    rows = [
        seg
        for batch in streaming_loader(corpus, tok, batch_size=2, seq_len=16, pack=False, num_epochs=1)
        for seg in segments(batch)
    ]
    assert rows == seen
    for batch in streaming_loader(corpus, tok, batch_size=2, seq_len=16, num_epochs=1):
        ids = tokenize_dataset([{"text": TEXTS[0]}], tok, max_seq_length=16).examples[0]
        np.testing.assert_array_equal(batch["targets"][0, : len(ids) - 1], ids.targets()[:-1])
        break


def test_resume_is_exact_across_epochs(corpus):
    tok = make_tokenizer()
    a = streaming_loader(corpus, tok, batch_size=3, seq_len=16)
    total = sum(1 for _ in streaming_loader(corpus, tok, batch_size=3, seq_len=16, num_epochs=1))
    batches(a, total - 2)
    state = a.state_dict()
    expected = batches(a, 5)  # runs into the second epoch
    assert a.epoch == 1
    b = streaming_loader(corpus, tok, batch_size=3, seq_len=16)
    b.load_state_dict(json.loads(json.dumps(state)))  # what a checkpoint holds
    for x, y in zip(batches(b, 5), expected, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    with pytest.raises(ValueError, match="seq_len=16 but this loader has seq_len=32"):
        streaming_loader(corpus, tok, batch_size=3, seq_len=32).load_state_dict(state)
    with pytest.raises(ValueError, match="non-streaming loader"):
        b.load_state_dict({"epoch": 0, "index": 3})


def test_train_streams_a_file(monkeypatch):
    """jaxsloth.train(streaming=True) hands the training loop a streaming loader over the file (the loop itself,
    checkpointing the loader's state_dict and restoring it, is the same for every loader)."""
    from jaxsloth.data import StreamingBatchLoader
    from jaxsloth.train import loop

    model, tok = jaxsloth.load(DEMO / "model", profile="cpu", max_seq_length=64)
    model = jaxsloth.add_lora(model, r=4)
    data = str(DEMO / "train.jsonl")
    taken = []

    def fake_fit(config, params, trainable, loader, **kwargs):
        taken.extend([loader, batches(loader, 2), kwargs["train_config"].max_steps])
        return SimpleNamespace(trainable=trainable, history=[], step=2)

    monkeypatch.setattr(loop, "fit", fake_fit)
    with pytest.raises(ValueError, match="give max_steps"):
        jaxsloth.train(model, tok, data, streaming=True, progress=False)
    jaxsloth.train(model, tok, data, streaming=True, per_device_train_batch_size=4, max_steps=7, progress=False)
    loader, got, steps = taken
    assert isinstance(loader, StreamingBatchLoader) and steps == 7
    reference = streaming_loader(data, tok, batch_size=4, seq_len=64, vocab_size=model.config.vocab_size)
    for x, y in zip(got, batches(reference, 2), strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert loader.state_dict() == reference.state_dict() and loader.rows_consumed > 8  # packed: >1 per row
