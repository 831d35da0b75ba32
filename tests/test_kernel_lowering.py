"""Each distinct kernel is lowered once per program, however many call sites a step has. Pallas lowers every
call in Python (Triton tens of milliseconds, Mosaic GPU about a second), and a step calls each kernel at hundreds
of sites: lowered for the H200 on CPU, the Gemma-2-9B step took 177 s with 799 kernel copies (Mosaic GPU and
Triton), and 17 s with 17. These lower for the GPU on CPU (the ``triton_calls`` fixture); nothing runs a kernel."""

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.attention import AttentionBlocks, attention
from pallas_kernels.glu import swiglu
from pallas_kernels.nf4_matmul import nf4_matmul
from pallas_kernels.rms_norm import rms_norm
from pallas_kernels.rope import rope


def _norm_rope_kernels(triton_calls, layers: int) -> int:
    def loss(x, w, q, k, pos, inv_freq):
        total = 0.0
        for _ in range(layers):
            x = swiglu(rms_norm(x, w, interpret=False), x, interpret=False)
            q, k = rope(q * x[..., :1, None], k, pos, inv_freq, interpret=False)
            total = total + jnp.sum(jnp.tanh(q).astype(jnp.float32)) + jnp.sum(k.astype(jnp.float32))
        return total

    args = (
        jax.ShapeDtypeStruct((2, 40, 64), jnp.bfloat16),
        jax.ShapeDtypeStruct((64,), jnp.bfloat16),
        jax.ShapeDtypeStruct((2, 40, 4, 64), jnp.bfloat16),
        jax.ShapeDtypeStruct((2, 40, 2, 64), jnp.bfloat16),
        jax.ShapeDtypeStruct((2, 40), jnp.int32),
        jax.ShapeDtypeStruct((32,), jnp.float32),
    )
    return triton_calls(jax.grad(loss, argnums=(0, 2, 3)), *args)


def test_norm_and_rope_sites_share_their_kernels(triton_calls):
    # Two layers or eight: the same few kernels (norm, SwiGLU and rope, forward and backward), not one per site.
    two = _norm_rope_kernels(triton_calls, 2)
    assert 6 <= two <= 8
    assert _norm_rope_kernels(triton_calls, 8) == two


def _attention_kernels(triton_calls, layers: int) -> int:
    blocks = AttentionBlocks(block_q=64, block_k=64, block_q_dkv=64, block_k_dkv=64, block_q_dq=64, block_k_dq=64)

    def loss(q, k, v):
        for _ in range(layers):
            q = attention(q, k, v, causal=True, interpret=False, block=blocks)
        return jnp.sum(q.astype(jnp.float32))

    shape = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.bfloat16)
    return triton_calls(jax.grad(loss, argnums=(0, 1, 2)), shape, shape, shape)


def test_attention_sites_share_their_kernels(triton_calls):
    two = _attention_kernels(triton_calls, 2)
    assert 3 <= two <= 4  # forward, dK/dV, dQ
    assert _attention_kernels(triton_calls, 6) == two


def _nf4_kernels(triton_calls, layers: int) -> int:
    from jaxsloth.quant import quantize_nf4

    w = quantize_nf4(np.random.default_rng(0).standard_normal((128, 128)).astype(np.float32), blocksize=64)

    def loss(x, a, b):
        for _ in range(layers):
            x = jnp.tanh(nf4_matmul(x, w, a, b, 2.0, interpret=False))
        return jnp.sum(x.astype(jnp.float32))

    x = jax.ShapeDtypeStruct((40, 128), jnp.bfloat16)
    a, b = jax.ShapeDtypeStruct((16, 128), jnp.float32), jax.ShapeDtypeStruct((128, 16), jnp.float32)
    return triton_calls(jax.grad(loss, argnums=(0, 1, 2)), x, a, b)


def test_nf4_matmul_sites_share_their_kernels(triton_calls):
    two = _nf4_kernels(triton_calls, 2)
    assert 2 <= two <= 3  # forward (with the LoRA A product) and dx
    assert _nf4_kernels(triton_calls, 6) == two
