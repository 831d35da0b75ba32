"""JAX's persistent compilation cache: on where work starts (not on import), in the user's cache folder or where
JAXSLOTH_COMPILE_CACHE says, off when it says off, and the user's own JAX cache directory left as they set it. The
cache hit is checked across two fresh processes, as a second run of the same command would be."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The same tiny run each time: load the demo model and compile a function of its weights, counting JAX's
# persistent-cache hits.
SCRIPT = r"""
import json, jax
import jaxsloth
from jaxsloth import demo

hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(1) if event == "/jax/compilation_cache/cache_hits" else None
)
imported = jax.config.jax_compilation_cache_dir  # importing jaxsloth must not have set it
model, tokenizer = jaxsloth.load(demo.MODEL_DIR, profile="cpu", max_seq_length=32, dtype="float32")
jax.jit(lambda p: sum(jax.numpy.sum(x * x) for x in jax.tree.leaves(p)))(model.params).block_until_ready()
print(json.dumps({"imported": imported, "dir": jax.config.jax_compilation_cache_dir, "hits": len(hits),
                  "min_secs": jax.config.jax_persistent_cache_min_compile_time_secs}))
"""


def _run(tmp_path, **env) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAXSLOTH_COMPILE"))}
    # HOME and XDG_CACHE_HOME point into tmp_path, so the default location is checked without touching the user's.
    base.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), HOME=str(tmp_path / "home"), XDG_CACHE_HOME="")
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT], env={**base, **env}, capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _entries(path: Path) -> set[str]:
    return {p.name for p in path.glob("*-cache")} if path.is_dir() else set()


def test_default_location_is_the_users_cache_folder(monkeypatch, tmp_path):
    from jaxsloth.compile_cache import default_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_dir() == tmp_path / "xdg" / "jaxsloth" / "jax_compile"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_dir() == tmp_path / ".cache" / "jaxsloth" / "jax_compile"


def test_second_process_reads_the_compiled_programs_back(tmp_path):
    # Every program is cached (the user's threshold, kept), so the tiny run's compiles count.
    cache = tmp_path / "home" / ".cache" / "jaxsloth" / "jax_compile"
    env = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    first = _run(tmp_path, **env)
    assert first["imported"] is None and first["dir"] == str(cache) and first["min_secs"] == 0
    written = _entries(cache)
    assert written, "the first run wrote nothing to the cache"
    second = _run(tmp_path, **env)
    assert second["hits"] >= len(written) > first["hits"] == 0
    assert _entries(cache) == written  # nothing compiled again


@pytest.fixture
def unset(monkeypatch):
    """jaxsloth.compile_cache as in a process that has not enabled it, with no JAX cache directory set and JAX's
    default thresholds; JAX's options are restored afterwards (nothing is compiled meanwhile)."""
    import jax

    from jaxsloth import compile_cache

    names = ("jax_compilation_cache_dir", *compile_cache._THRESHOLDS)
    saved = {n: getattr(jax.config, n) for n in names}
    monkeypatch.setattr(compile_cache, "_enabled", None)
    jax.config.update("jax_compilation_cache_dir", None)
    for name, (jax_default, _) in compile_cache._THRESHOLDS.items():  # an earlier test's load may have set ours
        jax.config.update(name, jax_default)
    yield compile_cache, jax.config
    for n, v in saved.items():
        jax.config.update(n, v)


def test_off_changes_nothing(unset, monkeypatch, tmp_path):
    compile_cache, config = unset
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("JAXSLOTH_COMPILE_CACHE", "off")
    assert compile_cache.enable() is None
    assert config.jax_compilation_cache_dir is None and not (tmp_path / ".cache").exists()


def test_the_users_own_jax_cache_dir_and_thresholds_are_kept(unset, monkeypatch, tmp_path):
    compile_cache, config = unset
    monkeypatch.delenv("JAXSLOTH_COMPILE_CACHE", raising=False)
    config.update("jax_compilation_cache_dir", str(tmp_path / "theirs"))
    assert compile_cache.enable() is None
    assert config.jax_compilation_cache_dir == str(tmp_path / "theirs")
    assert config.jax_persistent_cache_min_compile_time_secs == 1.0  # JAX's, untouched
    # No directory of theirs, a threshold of theirs: ours is the directory, theirs the threshold.
    config.update("jax_compilation_cache_dir", None)
    config.update("jax_persistent_cache_min_compile_time_secs", 3.0)
    monkeypatch.setenv("JAXSLOTH_COMPILE_CACHE", str(tmp_path / "ours"))
    assert compile_cache.enable() == tmp_path / "ours" and (tmp_path / "ours").is_dir()
    assert config.jax_compilation_cache_dir == str(tmp_path / "ours")
    assert config.jax_persistent_cache_min_compile_time_secs == 3.0
    assert config.jax_persistent_cache_min_entry_size_bytes == -1
    assert config.jax_compilation_cache_max_size == compile_cache.MAX_SIZE_BYTES
