"""Models by Hugging Face Hub id or local directory: `resolve_model("org/name") -> local snapshot directory`.

Hub models go through `huggingface_hub.snapshot_download` (only the files jaxsloth reads: configs, tokenizer files,
safetensors shards and their index, chat templates), into the standard cache, so a model downloaded by transformers,
Unsloth or `hf download` is reused. The environment is read at call time, not at import (huggingface_hub freezes its
constants when imported): HF_HUB_CACHE / HF_HOME pick the cache, HF_TOKEN the token, and HF_HUB_OFFLINE=1 reads
the cache only.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger("jaxsloth")

# What loading needs from a model repository: everything else (PyTorch .bin/.pth, GGUF, ONNX, images) is skipped.
MODEL_FILES = (
    "*.json",  # config, generation_config, tokenizer(.json/_config), special_tokens_map, safetensors index, chat_template
    "*.safetensors",
    "*.jinja",  # chat_template.jinja
    "tokenizer.model",  # sentencepiece
    "*.tiktoken",
    "*.txt",  # merges.txt, vocab.txt
)

# "org/name" or "name": what the Hub accepts as a repository id (and what no local path spelled ./x, /x, ~/x is).
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
_TRUE = {"1", "on", "yes", "true"}


def looks_like_repo_id(name: str) -> bool:
    """True for "org/name" (or a bare "name"), never for a path starting with ".", "/" or "~" or holding ".."."""
    return bool(_REPO_ID.match(name)) and ".." not in name and not name.endswith((".", "-"))


def hub_cache_dir() -> Path:
    """The Hub cache as huggingface_hub would pick it from the environment now: HF_HUB_CACHE, else HF_HOME/hub,
    else $XDG_CACHE_HOME/huggingface/hub (default ~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    home = os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or the older TRANSFORMERS_OFFLINE) set to 1/on/yes/true."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_model(name_or_path: str | os.PathLike, revision: str | None = None, token: str | None = None) -> Path:
    """The local directory holding model `name_or_path`: the directory itself, or the Hub snapshot of that id.

    revision: a branch, tag or commit hash of a Hub model (default "main"). token: for gated or private models
    (default: HF_TOKEN, then the token `hf auth login` stored).
    Raises FileNotFoundError (no such directory, id, revision, or not cached while offline), PermissionError
    (gated or private repository without access), NotADirectoryError (a file given), each naming the model.
    """
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"model path {name!r} is a file; give a model directory or a Hub id like org/name")
    if not looks_like_repo_id(name):
        raise FileNotFoundError(f"model directory not found: {name}")
    return _snapshot(name, revision, token or os.environ.get("HF_TOKEN") or None)


def _snapshot(repo_id: str, revision: str | None, token: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = hub_cache_dir()
    offline = hub_offline()
    at = f" at revision {revision!r}" if revision else ""
    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache,
                token=token,
                local_files_only=offline,
                allow_patterns=list(MODEL_FILES),
            )
        )
    except GatedRepoError:
        raise PermissionError(
            f"model {repo_id!r} is gated: accept its terms on https://huggingface.co/{repo_id}, then pass token= "
            "or set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"model {repo_id!r}: no local directory of that name, and no such model on the Hugging Face Hub "
            "(a private one needs token= or HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"model {repo_id!r} has no revision {revision!r} on the Hugging Face Hub") from None
    except LocalEntryNotFoundError:
        # Offline, or the Hub unreachable: only the cache could answer, and it lacks this id or revision.
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub cannot be reached"
        cached = _cached_revisions(cache, repo_id)
        have = f" (cached revisions: {', '.join(cached)})" if cached else ""
        raise FileNotFoundError(
            f"model {repo_id!r}{at} is not in the Hub cache {cache}{have} and {why}; "
            "no local directory of that name either"
        ) from None


def _cached_revisions(cache: Path, repo_id: str) -> list[str]:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    refs = sorted(p.name for p in (repo / "refs").glob("*") if p.is_file())
    snapshots = sorted(p.name[:12] for p in (repo / "snapshots").glob("*") if p.is_dir())
    return refs + snapshots


def load_tokenizer(path: str | os.PathLike, revision: str | None = None, token: str | None = None):
    """The tokenizer saved beside the weights (tokenizer.json etc.) of a model directory or Hub id, or None."""
    path = resolve_model(path, revision=revision, token=token)
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        log.warning("no tokenizer files in %s", path)
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
