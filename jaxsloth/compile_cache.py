"""JAX's persistent compilation cache, on by default, so a second run of the same model and settings loads its
compiled steps from disk instead of compiling them again (tens of seconds to minutes on a GPU).

Where: ``$JAXSLOTH_COMPILE_CACHE`` (a directory, or ``off``), else ``$XDG_CACHE_HOME/jaxsloth/jax_compile``, else
``~/.cache/jaxsloth/jax_compile``. A cache directory the user gave JAX themselves (``JAX_COMPILATION_CACHE_DIR`` or
``jax.config.update("jax_compilation_cache_dir", ...)``) is used as it is, with their thresholds.

``enable()`` runs where work starts (``jaxsloth.load``, ``jaxsloth.train``, the CLI), not on import: importing
jaxsloth leaves JAX's global configuration as the user had it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

log = logging.getLogger("jaxsloth")

ENV = "JAXSLOTH_COMPILE_CACHE"
OFF = ("off", "0", "false", "no", "none")
# Programs that compile in under half a second are cheaper to compile again than to read back: the cache keeps the
# train and generation steps (seconds to minutes), not the many small helpers around them.
MIN_COMPILE_SECONDS = 0.5
# Least recently used entries are evicted past this size (a large model's train step is tens of MB).
MAX_SIZE_BYTES = 4 << 30

# JAX's option: (JAX's default, ours).
_THRESHOLDS = {
    "jax_persistent_cache_min_compile_time_secs": (1.0, MIN_COMPILE_SECONDS),
    "jax_persistent_cache_min_entry_size_bytes": (0, -1),  # -1: no size filter, compile time alone decides
    "jax_compilation_cache_max_size": (-1, MAX_SIZE_BYTES),
}

_enabled: Path | None = None


def default_dir() -> Path:
    """The cache directory when nothing else is said: the user's cache folder (XDG), jaxsloth/jax_compile."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxsloth" / "jax_compile"


def enable() -> Path | None:
    """Turns the persistent cache on (once per process) and returns its directory; None when it is off (the
    environment says so) or when the user's own JAX cache directory is in use."""
    global _enabled
    if _enabled is not None:
        return _enabled
    setting = os.environ.get(ENV, "").strip()
    if setting.lower() in OFF or jax.config.jax_compilation_cache_dir:
        return None
    path = Path(setting).expanduser() if setting else default_dir()
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)  # executables are loaded from here: the user's only
    except OSError as e:
        log.warning("compilation cache off: cannot create %s (%s); set %s to a writable directory or off", path, e, ENV)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    for name, (jax_default, ours) in _THRESHOLDS.items():
        if getattr(jax.config, name) == jax_default:  # one the user set (flag, environment, code) is kept
            jax.config.update(name, ours)
    _enabled = path
    log.debug("persistent compilation cache: %s", path)
    return path
