import os

# XLA's CPU runtime sizes its thread pool by the cores (NPROC overrides it). The Mosaic GPU interpreter runs
# each warpgroup of a CTA as a computation that blocks on simulated barriers; with fewer pool threads than
# warpgroups (3) on a 2-core CI machine, the blocked ones starve the rest and the test hangs.
os.environ.setdefault("NPROC", "8")

import jax
import pytest

from jaxsloth import compile_cache

# Every test compiles through jaxsloth's persistent cache, as a user's second run does (not only the tests that
# call jaxsloth.load), and so do the processes tests start (JAX reads its options from the environment there); a
# warm cache makes the suite's second run skip compiling. JAXSLOTH_COMPILE_CACHE=off runs it cold.
if compile_cache.enable() is not None:
    for _name in ("jax_compilation_cache_dir", *compile_cache._THRESHOLDS):
        os.environ.setdefault(_name.upper(), str(getattr(jax.config, _name)))

# The GPU tests in parts that each finish within ten minutes on one H200 (README, "Tests"):
# `pytest -m gpu_attention`, `pytest -m gpu_kernels`, `pytest -m gpu_models`; `pytest -m gpu` runs them all.
GPU_PARTS = {
    "test_kernel_attention.py": "gpu_attention",
    "test_bench.py": "gpu_models",
    "test_generate.py": "gpu_models",
    "test_models_kernels.py": "gpu_models",
}


def pytest_configure(config):
    for part, what in (
        ("gpu_attention", "attention kernels"),
        ("gpu_kernels", "other kernels"),
        ("gpu_models", "models"),
    ):
        config.addinivalue_line("markers", f"{part}: the GPU tests of the {what} (a part of `gpu`)")


def pytest_collection_modifyitems(config, items):
    on_gpu = jax.default_backend() == "gpu"
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" not in item.keywords:
            continue
        item.add_marker(getattr(pytest.mark, GPU_PARTS.get(item.path.name, "gpu_kernels")))
        if not on_gpu:
            item.add_marker(skip)


@pytest.fixture
def triton_calls(monkeypatch):
    """``triton_calls(f, *args)``: how many Triton kernels jit(f) lowers to for an H100 (the GPU is simulated,
    so a Pallas op the Triton lowering lacks fails in CI rather than on the GPU machine)."""
    gpu_info = pytest.importorskip("jax._src.pallas.triton.gpu_info")
    monkeypatch.setattr(gpu_info, "get_gpu_info", lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100))

    def count(f, *args) -> int:
        return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text().count("xla.gpu.triton")

    return count
