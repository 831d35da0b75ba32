"""The one table of numerical tolerances used by every test. Loosen one only with a comment saying why."""

from __future__ import annotations

import numpy as np

TOLERANCES: dict[str, dict[str, float]] = {
    # Same math, same dtype, different op order (kernel vs reference, JAX vs PyTorch).
    "f32": {"atol": 1e-5, "rtol": 1e-5},
    # Gradients sum over many more terms than forward values, so rounding order differs more.
    "f32_grad": {"atol": 5e-5, "rtol": 5e-5},
    # Whole-model logits, f32, JAX vs transformers: the bar is 1e-4 max-abs.
    "f32_logits": {"atol": 1e-4, "rtol": 0.0},
    # bf16 has an 8-bit mantissa (relative step 2^-8 = 0.0039); a kernel and its reference round
    # intermediate sums at different points, so a few steps of difference are expected.
    "bf16": {"atol": 2e-2, "rtol": 2e-2},
    "bf16_grad": {"atol": 5e-2, "rtol": 5e-2},
    # Normwise: max |actual - truth| <= rtol * max |truth|, against an f32 truth computed from the same inputs.
    # For a fused kernel whose 16-bit reference rounds more often than the kernel (PEFT's LoRA linear rounds
    # the base output and the LoRA output separately): elementwise tolerances then fail on elements near zero
    # because of the reference's rounding, not the kernel's. Two bf16 steps of the output's scale.
    "bf16_normwise": {"atol": 0.0, "rtol": 2**-7},
    # Weights after AdamW steps (full fine-tuning, f32), JAX vs torch.optim.AdamW: Adam divides each gradient by its
    # own RMS, so for a gradient near eps the gradient's rounding difference becomes an update difference; measured
    # max 1.9e-6 over 3 steps at lr 1e-3, where a wrong weight decay or learning rate moves weights by 4e-5 and more.
    "adamw_f32_weights": {"atol": 5e-6, "rtol": 0.0},
    # 8-bit AdamW moments vs f32 ones: the relative norm of the difference of one step's update (every weight).
    # The dynamic map's step is ~1.4% of a value near its block's largest; measured at most 0.026 over 8 steps.
    "adam8bit_update": {"atol": 0.0, "rtol": 0.05},
    "f16": {"atol": 5e-3, "rtol": 5e-3},
    "f16_grad": {"atol": 1e-2, "rtol": 1e-2},
    # llama.cpp running a GGUF export vs jaxsloth's f32 forward, logits of magnitude up to ~10: f16 weights
    # (relative step 2^-11) and f16 activations in llama.cpp's CPU matmuls; measured max 0.01.
    "gguf_f16_logits": {"atol": 2e-2, "rtol": 0.0},
    # q8_0: 8-bit weights per 32-value block (step 1/127 of the block's largest weight), and llama.cpp quantizes
    # the activations to q8_0 before each matmul too; measured max 0.22 (mean 0.03) on logits of magnitude 5.
    "gguf_q8_0_logits": {"atol": 0.3, "rtol": 0.0},
}


def tolerance(kind: str) -> dict[str, float]:
    return TOLERANCES[kind]


def dtype_kind(dtype, grad: bool = False) -> str:
    name = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}[np.dtype(dtype).name]
    return name + ("_grad" if grad else "")


def assert_close(actual, expected, kind: str, err_msg: str = "") -> None:
    """Compares in f64 numpy with the table's atol/rtol for ``kind``."""
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64),
        np.asarray(expected, dtype=np.float64),
        err_msg=err_msg,
        **TOLERANCES[kind],
    )


def assert_normwise_close(actual, truth, kind: str, err_msg: str = "") -> None:
    """max |actual - truth| <= rtol * max |truth| (the table's ``kind``), compared in f64."""
    actual, truth = np.asarray(actual, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    err, scale = np.max(np.abs(actual - truth)), np.max(np.abs(truth))
    assert err <= TOLERANCES[kind]["rtol"] * scale, (
        f"{err_msg}: max error {err:.3g} > {TOLERANCES[kind]['rtol']:.3g} x {scale:.3g}"
    )


def assert_vjp_close(fn, reference, primals, cotangent, dtype, names) -> None:
    """``fn`` and ``reference`` agree on the output (same dtype and shape, ``dtype``'s kind) and on the gradient
    of every primal (same dtype and shape, the grad kind); ``names`` label the gradients in failures."""
    import jax

    y, vjp = jax.vjp(fn, *primals)
    y_ref, vjp_ref = jax.vjp(reference, *primals)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape, (y.dtype, y.shape, y_ref.dtype, y_ref.shape)
    assert_close(y, y_ref, dtype_kind(dtype))
    for name, g, g_ref in zip(names, vjp(cotangent), vjp_ref(cotangent), strict=True):
        assert g.dtype == g_ref.dtype and g.shape == g_ref.shape, name
        assert_close(g, g_ref, dtype_kind(dtype, grad=True), err_msg=name)
