"""`jaxsloth demo`: a short run through the real command prints before/after answers and accuracy and writes the
adapter and the loss plot; the shipped assets are small and load offline."""

import json
import re
import subprocess
import sys
from pathlib import Path

from jaxsloth import demo

ROOT = Path(__file__).parents[1]


def test_assets_small_and_consistent():
    total = sum(p.stat().st_size for p in demo.ASSETS.rglob("*") if p.is_file())
    assert total < 2 * 2**20
    train = [json.loads(x) for x in (demo.ASSETS / "train.jsonl").read_text().splitlines()]
    heldout = [json.loads(x) for x in (demo.ASSETS / "heldout.jsonl").read_text().splitlines()]
    assert len(train) >= 200 and len(heldout) >= 20
    questions = {r["messages"][0]["content"] for r in train}
    assert not questions & {r["messages"][0]["content"] for r in heldout}  # held out means unseen
    for r in train + heldout:  # answers are exactly checkable: the shift cipher of the word
        word = r["messages"][0]["content"]
        expected = "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in word)
        assert r["messages"][1]["content"] == expected


def test_tokenizer_loads_offline_and_round_trips():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo.MODEL_DIR))
    record = demo.question("hello")
    text = tok.apply_chat_template(record["messages"], tokenize=False)
    assert text == "<|user|>hello<|end|><|assistant|>ifmmp<|end|>"
    ids = tok(text)["input_ids"]
    assert len(ids) == 3 + len("hello") + len("ifmmp") + 1  # one token per character
    assert tok.decode(ids) == text and tok.eos_token == "<|end|>"


def test_demo_command_short_run(tmp_path):
    out = tmp_path / "demo-out"
    r = subprocess.run(
        [sys.executable, "-m", "jaxsloth", "demo", "--steps", "8", "--output-dir", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={"JAX_PLATFORMS": "cpu", "PATH": "", "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    accuracies = re.findall(r"accuracy on 50 held-out questions: (\d+)%", r.stdout)
    assert len(accuracies) == 2, r.stdout
    assert "Before fine-tuning" in r.stdout and "After fine-tuning" in r.stdout
    assert re.search(r"Accuracy \d+% -> \d+%", r.stdout)
    assert "8/8" in r.stderr  # the progress bar
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 8
