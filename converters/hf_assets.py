"""The files beside a Hugging Face checkpoint's weights that make its folder usable on its own: the tokenizer (with
its chat template) and ``generation_config.json`` (the stop tokens ``generate`` uses)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from jaxsloth.models.config import ModelConfig

log = logging.getLogger("jaxsloth")

GENERATION_CONFIG = "generation_config.json"
# What AutoTokenizer reads, for every kind of tokenizer a supported model ships (fast JSON, SentencePiece, BPE).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def source_file(model_path: str | os.PathLike | None, name: str) -> Path | None:
    """The file ``name`` of the model ``model_path`` came from: in its directory, or, for a Hub id, in the local
    Hugging Face cache (never downloaded). None when there is none."""
    if model_path is None:
        return None
    local = Path(model_path)
    if local.is_dir():
        return local / name if (local / name).is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(str(model_path), name)
    except Exception:  # not a valid repo id: no cached file either
        return None
    return Path(found) if isinstance(found, str) else None


def write_generation_config(out_dir: Path, config: ModelConfig, source: str | os.PathLike | None) -> Path:
    """Copies the source model's generation_config.json, or writes one with config.json's bos / eos / pad ids."""
    out = out_dir / GENERATION_CONFIG
    found = source_file(source, GENERATION_CONFIG)
    if found is not None:
        shutil.copyfile(found, out)
        return out
    ids = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    }
    ids = {k: list(v) if isinstance(v, tuple) else v for k, v in ids.items() if v is not None}
    out.write_text(json.dumps(ids, indent=2, sort_keys=True) + "\n")
    return out


def write_tokenizer(out_dir: Path, tokenizer, source: str | os.PathLike | None) -> bool:
    """Saves ``tokenizer`` (its chat template included) into out_dir, or, when None, copies the source model's
    tokenizer files. Returns False, with a warning, when there is no tokenizer to write."""
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
        return True
    copied = False
    for name in TOKENIZER_FILES:
        found = source_file(source, name)
        if found is not None:
            shutil.copyfile(found, out_dir / name)
            copied = True
    if not copied:
        log.warning(
            "no tokenizer written to %s (none passed, none beside the source model %s): pass tokenizer= so "
            "AutoTokenizer can load the folder",
            out_dir,
            source,
        )
    return copied
