import os

# XLA's CPU runtime sizes its thread pool by the cores (NPROC overrides it). The Mosaic GPU interpreter runs
# each warpgroup of a CTA as a computation that blocks on simulated barriers; with fewer pool threads than
# warpgroups (3) on a 2-core CI machine, the blocked ones starve the rest and the test hangs.
os.environ.setdefault("NPROC", "8")

import jax
import pytest


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (run through the device tool)")
    for item in items:
        if "gpu" in item.keywords:
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
