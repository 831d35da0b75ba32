"""The Mosaic GPU NF4 matmul (the weight decoded in registers before each wgmma) against the dequantize-then-matmul
reference: forward and dx in the Mosaic GPU interpreter on CPU (directly and through the dispatch's "mosaic" choice),
its lowering for Hopper, and the benchmark's entry points. Nothing here runs the kernels on a GPU."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsloth.ops import KernelChoice, Ops
from jaxsloth.quant import dequantize_nf4, quantize_nf4
from pallas_kernels.lora_matmul import lora_matmul_reference
from pallas_kernels.nf4_matmul import NF4Weight
from pallas_kernels.nf4_matmul_mosaic import MosaicNF4Block, nf4_matmul_mosaic
from tests.tolerances import assert_vjp_close

# The smallest tiles: 64 rows (one wgmma M tile), 64-column decode chunks, two warpgroups of 64 output columns, and a
# two-deep ring, so the shapes below span several tiles, ring wraps and ragged M, N (and dx's K) edges.
SMALL = MosaicNF4Block(
    block_m=64,
    block_n=128,
    block_k=64,
    num_stages=2,
    bwd_block_m=64,
    bwd_block_n=64,
    bwd_block_k=128,
    bwd_num_stages=2,
)
FUSED = dataclasses.replace(SMALL, fuse_lora_a=True)


def _case(m, k, n, r, dtype, double_quant, seed):
    rng = np.random.default_rng(seed)
    q = quantize_nf4(rng.standard_normal((n, k)).astype(np.float32) * 0.05, double_quant=double_quant)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    lora = (
        ()
        if not r
        else (jnp.asarray(rng.standard_normal((r, k)) * 0.1), jnp.asarray(rng.standard_normal((n, r)) * 0.1))
    )
    dy = jnp.asarray(rng.standard_normal((m, n)), dtype)
    return q, x, lora, dy


@pytest.mark.parametrize(
    "m,k,n,r,dtype,double_quant,via_ops,block",
    [
        # M = 70 over 64-row tiles, N = 150 over 128 (forward) and 64 (dx's N step), K = 192: three forward K steps
        # through a two-deep ring and dx columns padded from 192 to 256; the LoRA A product in the forward kernel.
        (70, 192, 150, 8, jnp.bfloat16, True, False, FUSED),
        # float16, absmax without double quantization, the LoRA A product in XLA, through the dispatch's "mosaic"
        # choice (Ops.linear with leading axes, the block config from the KernelChoice).
        (40, 128, 200, 8, jnp.float16, False, True, SMALL),
    ],
)
def test_matches_reference_interpret(m, k, n, r, dtype, double_quant, via_ops, block):
    q, x, lora, dy = _case(m, k, n, r, dtype, double_quant, seed=m + n)
    w = dequantize_nf4(q, dtype)  # jaxsloth.quant's dequantization, then plain matmuls
    ops = Ops(KernelChoice(nf4_matmul="mosaic", interpret=True, blocks=(("nf4_matmul_mosaic", block),)))

    def kernel(x, *ab):
        if via_ops:
            lora = {"a": ab[0], "b": ab[1]} if ab else None
            return ops.linear(x.reshape(2, -1, k), q, lora=lora, lora_scale=0.75).reshape(m, n)
        return nf4_matmul_mosaic(x, q, *(ab or (None, None)), 0.75, interpret=True, block=block)

    def reference(x, *ab):
        return lora_matmul_reference(x, w, *ab, 0.75) if ab else jnp.dot(x, w.T)

    assert_vjp_close(kernel, reference, (x, *lora), dy, dtype, ("dx", "dlora_a", "dlora_b")[: 1 + len(lora)])


def test_unsupported_operands_raise():
    rng = np.random.default_rng(0)
    x = jnp.ones((4, 128), jnp.bfloat16)
    q = quantize_nf4(rng.standard_normal((64, 128)).astype(np.float32))
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        nf4_matmul_mosaic(x.astype(jnp.float32), q)
    q96 = quantize_nf4(rng.standard_normal((64, 96)).astype(np.float32))
    with pytest.raises(ValueError, match="multiple of 64 and blocksize 64"):
        nf4_matmul_mosaic(jnp.ones((4, 96), jnp.bfloat16), q96)
    q128 = quantize_nf4(rng.standard_normal((64, 128)).astype(np.float32), blocksize=128)
    with pytest.raises(ValueError, match="blocksize=128"):
        nf4_matmul_mosaic(x, q128)
    with pytest.raises(ValueError, match="block_n must be a multiple of 128"):
        MosaicNF4Block(block_n=64)


def _abstract_nf4(n: int, k: int) -> NF4Weight:
    """An [n, k] NF4 weight of shapes only (blocksize 64, double-quantized), for lowering without arrays."""
    nblocks = n * k // 64
    return NF4Weight(
        packed=jax.ShapeDtypeStruct((n * k // 2,), jnp.uint8),
        absmax=jax.ShapeDtypeStruct((nblocks,), jnp.uint8),
        nested_absmax=jax.ShapeDtypeStruct((nblocks // 256,), jnp.float32),
        offset=jax.ShapeDtypeStruct((), jnp.float32),
        shape=(n, k),
    )


def test_lowers_for_hopper_on_cpu_without_a_16bit_weight():
    # Both kernels lowered for an H200 at an 8B projection (gate/up: N = 14336): wgmma shapes, layouts and the
    # shared-memory plan are checked at lowering, so a tile the hardware cannot take fails here. No 16-bit [N, K]
    # array exists anywhere in the program: the weight is decoded inside the kernels only.
    n, k, m = 14336, 4096, 2000
    q = _abstract_nf4(n, k)
    x, dy = jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((m, n), jnp.bfloat16)

    def f(x, q, dy):
        y, vjp = jax.vjp(lambda x: nf4_matmul_mosaic(x, q, interpret=False), x)
        return y, vjp(dy)

    text = jax.jit(f).trace(x, q, dy).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 2
    assert f"{n}x{k}xbf16" not in text and f"{k}x{n}xbf16" not in text

    # With the LoRA A product fused, the forward's only XLA matmul is u @ B^T (rank 16); ranks past 32 take the
    # XLA product, x @ A^T.
    def forward(x, a, b, q, fuse):
        return nf4_matmul_mosaic(x, q, a, b, 2.0, interpret=False, block=MosaicNF4Block(fuse_lora_a=fuse))

    for r, fuse, dots in ((16, True, 1), (16, False, 2), (64, True, 2)):
        a, b = jax.ShapeDtypeStruct((r, k), jnp.float32), jax.ShapeDtypeStruct((n, r), jnp.float32)
        lowered = jax.jit(forward, static_argnums=4).trace(x, a, b, q, fuse).lower(lowering_platforms=("cuda",))
        text = lowered.as_text()
        assert text.count("custom_call @mosaic_gpu") == 1 and text.count("stablehlo.dot_general") == dots, (r, fuse)


def test_sites_of_one_shape_share_one_lowered_kernel():
    # Mosaic GPU lowers a kernel in Python in about a second; a training step calls these kernels at hundreds of
    # sites (an 8B step did not finish compiling in 190 s when each site lowered its own). Sites of equal shapes
    # and tiles now call one lowered function: eight chained projections lower one forward and one dx kernel.
    k = 1024
    q = _abstract_nf4(k, k)

    def loss(x, q):
        h = x
        for _ in range(8):
            h = jnp.tanh(nf4_matmul_mosaic(h, q, interpret=False))  # nonlinear: the backward needs each forward
        return h.astype(jnp.float32).sum()

    x = jax.ShapeDtypeStruct((512, k), jnp.bfloat16)
    text = jax.jit(jax.grad(loss)).trace(x, q).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 2
    assert text.count("nf4_matmul_fwd_mgpu") >= 1 and text.count("nf4_matmul_dx_mgpu") >= 1


def test_benchmark_entry_points(tmp_path, capsys, monkeypatch):
    # The GPU suite's calls (nf4_mosaic_h200.sh) at tiny shapes: the check and the timed table, each timing one call
    # (the interpreter takes seconds per call); the step's `--op nf4_matmul=mosaic` as jaxsloth.bench.step applies it.
    from jaxsloth.bench import timing
    from jaxsloth.bench.kernel_nf4_matmul import main
    from jaxsloth.profiles import profile_for_device

    assert profile_for_device(name="h200", nf4_matmul="mosaic").ops.kernels.nf4_matmul == "mosaic"

    def one_call_ms(fn, args, iters):
        jax.block_until_ready(fn(*args))
        return 1.0

    monkeypatch.setattr(timing, "kernel_ms", one_call_ms)
    main(["--check", "--smoke", "--impls", "mosaic"])
    assert "check mosaic M37xK192xN200: relative error" in capsys.readouterr().out
    out = tmp_path / "nf4.jsonl"
    main(["--smoke", "--impls", "mosaic", "--out", str(out)])
    lines = out.read_text().splitlines()
    assert len(lines) == 1 and '"impl": "mosaic"' in lines[0] and '"block_m": 64' in lines[0]


def _on_hopper() -> bool:
    return jax.default_backend() == "gpu" and any(h in jax.devices()[0].device_kind for h in ("H100", "H200", "H800"))


@pytest.mark.gpu
@pytest.mark.skipif(not _on_hopper(), reason="wgmma: Hopper only")
@pytest.mark.parametrize(
    "m,k,n,r,block",
    [
        (300, 1024, 520, 16, MosaicNF4Block()),
        (300, 1024, 520, 16, MosaicNF4Block(fuse_lora_a=True)),
        (129, 4096, 1024, 0, MosaicNF4Block(block_m=128, bwd_block_m=128)),
    ],
)
def test_matches_reference_gpu(m, k, n, r, block):
    q, x, lora, dy = _case(m, k, n, r, jnp.bfloat16, True, seed=7)
    w = dequantize_nf4(q, jnp.bfloat16)

    def kernel(x, *ab):
        return nf4_matmul_mosaic(x, q, *(ab or (None, None)), 0.75, interpret=False, block=block)

    def reference(x, *ab):
        return lora_matmul_reference(x, w, *ab, 0.75) if ab else jnp.dot(x, w.T)

    assert_vjp_close(kernel, reference, (x, *lora), dy, jnp.bfloat16, ("dx", "dlora_a", "dlora_b")[: 1 + len(lora)])
