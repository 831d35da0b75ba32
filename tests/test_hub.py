"""Models by Hub id: resolved offline from a Hub cache laid out as huggingface_hub lays it out, and the errors."""

import hashlib
import shutil
from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest

import jaxsloth
from jaxsloth import cli
from jaxsloth.hub import looks_like_repo_id, resolve_model
from jaxsloth.models import forward
from tests.tiny_models import saved_model

DEMO = Path(jaxsloth.__file__).parent / "demo_assets" / "model"
MAIN = "a" * 40
OLD = "b" * 40


def add_snapshot(cache: Path, repo_id: str, commit: str, files: dict[str, Path], refs: tuple[str, ...] = ()) -> Path:
    """One snapshot in huggingface_hub's cache layout: models--org--name/{blobs/<hash>, snapshots/<commit>/<file>
    (a relative symlink to its blob), refs/<branch> (the commit hash)}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, source in files.items():
        data = source.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob.name))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline Hub cache holding org/tiny: main = the tiny llama + the demo tokenizer; branch "old" = the demo
    model."""
    cache = tmp_path / "hub"
    model_dir = saved_model("llama")
    tokenizer_files = {f: DEMO / f for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")}
    add_snapshot(
        cache,
        "org/tiny",
        MAIN,
        {
            "config.json": model_dir / "config.json",
            "model.safetensors": model_dir / "model.safetensors",
            **tokenizer_files,
        },
        refs=("main",),
    )
    add_snapshot(cache, "org/tiny", OLD, {f.name: f for f in DEMO.iterdir()}, refs=("old",))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return cache


def logits(model, ids=((1, 5, 9, 3, 7),)):
    return np.asarray(forward(model.params, jnp.asarray(ids), config=model.config))


def test_hub_id_loads_the_same_model_as_its_directory(hub, tmp_path):
    model, tok = jaxsloth.load("org/tiny", dtype="float32")
    plain = tmp_path / "plain"
    shutil.copytree(hub / "models--org--tiny" / "snapshots" / MAIN, plain)  # copies the blobs, not the links
    reference, ref_tok = jaxsloth.load(plain, dtype="float32")
    np.testing.assert_array_equal(logits(model), logits(reference))
    assert model.path == "org/tiny"  # what the PEFT export writes as base_model_name_or_path
    assert Path(model.local_dir) == hub / "models--org--tiny" / "snapshots" / MAIN
    assert tok is not None and tok("hello world")["input_ids"] == ref_tok("hello world")["input_ids"]


def test_revision_by_branch_and_by_commit(hub):
    demo, _ = jaxsloth.load(DEMO, dtype="float32")
    for revision in ("old", OLD):
        model, _ = jaxsloth.load("org/tiny", revision=revision, dtype="float32")
        assert model.config.hidden_size == 64
        np.testing.assert_array_equal(logits(model), logits(demo))
    assert resolve_model("org/tiny", revision=MAIN).name == MAIN


def test_hf_home_picks_the_cache(hub, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # the cache is then HF_HOME/hub
    assert resolve_model("org/tiny").name == MAIN


def test_missing_id_and_revision_name_them(hub):
    with pytest.raises(FileNotFoundError, match=r"model 'org/nothing' is not in the Hub cache .*HF_HUB_OFFLINE"):
        jaxsloth.load("org/nothing")
    with pytest.raises(FileNotFoundError, match=r"'org/tiny' at revision 'v9' .*cached revisions: main, old"):
        resolve_model("org/tiny", revision="v9")


def test_local_paths_keep_their_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found: ./missing"):
        resolve_model("./missing")
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        resolve_model(tmp_path / "missing" / "deeper")
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        resolve_model(tmp_path / "f")


@pytest.mark.parametrize(
    "name, expected",
    [
        ("org/name", True),
        ("Qwen2.5-0.5B", True),
        ("unsloth/Llama-3.2-1B-Instruct", True),
        ("./x", False),
        ("/abs/dir", False),
        ("a/b/c", False),
        ("~/m", False),
        ("org/..", False),
    ],
)
def test_repo_id_shape(name, expected):
    assert looks_like_repo_id(name) is expected


@pytest.mark.parametrize(
    "error, needle",
    [
        ("GatedRepoError", "is gated: accept its terms on https://huggingface.co/org/locked"),
        ("RepositoryNotFoundError", "no such model on the Hugging Face Hub"),
        ("RevisionNotFoundError", "has no revision 'v2'"),
    ],
)
def test_hub_errors_are_one_line_naming_the_id(monkeypatch, error, needle):
    import huggingface_hub
    from huggingface_hub import errors

    seen = {}

    def refuse(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        response = SimpleNamespace(status_code=401, headers={}, request=None)  # what the error reads of a reply
        raise getattr(errors, error)("401 Client Error", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_env_token")
    with pytest.raises((PermissionError, FileNotFoundError)) as e:
        resolve_model("org/locked", revision="v2")
    message = str(e.value)
    assert needle in message and "org/locked" in message and "\n" not in message
    assert seen["token"] == "hf_env_token" and seen["revision"] == "v2" and not seen["local_files_only"]
    assert "*.safetensors" in seen["allow_patterns"]


def test_token_argument_wins_over_env(monkeypatch, tmp_path):
    import huggingface_hub

    seen = {}
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: seen.update(kw) or str(tmp_path))
    monkeypatch.setenv("HF_TOKEN", "from_env")
    assert resolve_model("org/x", token="given") == tmp_path and seen["token"] == "given"


def test_cli_generate_takes_a_hub_id(hub, capsys):
    code = cli.main(["generate", "--model", "org/tiny", "--revision", "old", "--max-new-tokens", "2", "hello"])
    assert code == 0
    code = cli.main(["generate", "--model", "org/gone", "hello"])
    err = capsys.readouterr().err
    assert code == 2 and "'org/gone' is not in the Hub cache" in err and "Traceback" not in err
