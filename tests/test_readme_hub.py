"""README's "From the Hub" quickstart, run as written (only its step, token and length numbers shrunk) in a fresh
Python process against offline caches laid out as huggingface_hub and datasets lay them out.

The model id resolves from an HF_HUB_CACHE snapshot of a tiny random Llama saved with transformers, with a
llama.cpp-convertible byte-level BPE tokenizer and the Llama 3.2 Instruct chat template. The dataset id resolves
the way `datasets.load_dataset` resolves a Hub id offline: from the prepared Arrow cache under HF_DATASETS_CACHE
(`yahma___alpaca-cleaned/default/0.0.0/<commit>/`, what an earlier online load leaves there), built here with the
library's own Json builder from a few short alpaca rows. Nothing is monkeypatched."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_export_gguf import DIMS, _field, _tokenizer
from tests.test_hub import add_snapshot

gguf = pytest.importorskip("gguf")

ROOT = Path(__file__).resolve().parents[1]
MODEL_ID = "unsloth/Llama-3.2-1B-Instruct"
DATASET_ID = "yahma/alpaca-cleaned"
COMMIT = "c" * 40
LLAMA3_HEADERS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
SHRINK = {
    "max_steps=60": "max_steps=2",
    "max_new_tokens=128": "max_new_tokens=4",
    "max_seq_length=2048": "max_seq_length=256",
}
ALPACA_ROWS = [
    {"instruction": "Name a fruit.", "input": "", "output": "An apple."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hello.", "input": "", "output": "Hello!"},
    {"instruction": "Give a color.", "input": "", "output": "Blue."},
] * 4


def readme_hub_block() -> str:
    """The first ```python block under README.md's "## From the Hub" heading."""
    section = (ROOT / "README.md").read_text().split("## From the Hub", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def tiny_llama_snapshot(cache: Path, work: Path) -> None:
    """A tiny random Llama + Llama-3-style BPE tokenizer (header tokens as specials, the 3.2 Instruct template)
    as the MODEL_ID snapshot on refs/main."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = _tokenizer("llama")
    tok.add_special_tokens({"additional_special_tokens": LLAMA3_HEADERS})
    tok.chat_template = (ROOT / "tests" / "chat_templates" / "llama-3.2-instruct.jinja").read_text()
    torch.manual_seed(0)
    config = LlamaConfig(
        **DIMS, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model_dir = work / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    add_snapshot(cache, MODEL_ID, COMMIT, {f.name: f for f in model_dir.iterdir() if f.is_file()}, refs=("main",))


def alpaca_arrow_cache(datasets_cache: Path, work: Path) -> None:
    """The prepared cache `datasets.load_dataset(DATASET_ID)` leaves: <namespace>___<name>/default/0.0.0/<commit>."""
    from datasets.packaged_modules.json.json import Json

    rows = work / "alpaca_data_cleaned.json"
    rows.write_text(json.dumps(ALPACA_ROWS))
    namespace, name = DATASET_ID.split("/")
    builder = Json(
        cache_dir=str(work / "prepare"),
        dataset_name=name,
        config_id="default",
        hash=COMMIT,
        data_files={"train": str(rows)},
    )
    builder.download_and_prepare()
    (work / "prepare" / name).rename(datasets_cache / f"{namespace}___{name}")


def test_readme_hub_quickstart_runs_offline(tmp_path):
    code = readme_hub_block()
    for full, small in SHRINK.items():
        assert full in code, f"README's Hub quickstart no longer has {full!r}"
        code = code.replace(full, small)
    hub, datasets_cache, run = tmp_path / "hub", tmp_path / "datasets", tmp_path / "run"
    for d in (hub, datasets_cache, run):
        d.mkdir()
    tiny_llama_snapshot(hub, tmp_path)
    alpaca_arrow_cache(datasets_cache, tmp_path)
    (run / "quickstart.py").write_text(code)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "JAX_PLATFORMS": "cpu",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_CACHE": str(hub),
        "HF_DATASETS_CACHE": str(datasets_cache),
    }
    env.pop("HF_TOKEN", None)
    done = subprocess.run(
        [sys.executable, "quickstart.py"], cwd=run, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]

    printed = [line for line in done.stdout.splitlines() if line.startswith("[")]
    texts = ast.literal_eval(printed[-1])
    assert len(texts) == 1 and isinstance(texts[0], str)

    adapter = json.loads((run / "runs/alpaca/adapter/adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == MODEL_ID

    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = run / "runs/alpaca/merged"
    hf_model = AutoModelForCausalLM.from_pretrained(merged)
    hf_tok = AutoTokenizer.from_pretrained(merged)
    assert hf_model.config.vocab_size == DIMS["vocab_size"]
    assert hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).count("<|eot_id|>") == 2

    reader = gguf.GGUFReader(str(run / "out.gguf"))
    assert any(t.name == "token_embd.weight" for t in reader.tensors)
    assert _field(reader, "tokenizer.ggml.pre") == "llama-bpe"
    assert _field(reader, "general.architecture") == "llama"
