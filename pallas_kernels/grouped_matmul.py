"""The grouped matmul of mixture-of-experts layers: rows sorted by expert, each group times its expert's weight.

    y[M, N] = x[M, K] @ w[g, N, K]^T   for the rows m of group g (groups are consecutive runs of group_sizes rows)

Only the reference, ``jax.lax.ragged_dot_general`` (XLA's grouped GEMM); a kernel replaces it through
``jaxsloth.ops`` once one is measured faster in the training step. The weights keep the HF orientation [out, in]
of every other projection, so the contraction is over the weight's last axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((1,), (2,)), ((), ())),
    lhs_ragged_dimensions=(0,),
    rhs_group_dimensions=(0,),
)


def grouped_matmul_reference(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x: [M, K] rows sorted by group; w: [G, N, K]; group_sizes: [G] int32 summing to M -> [M, N] in x.dtype."""
    return jax.lax.ragged_dot_general(x, w.astype(x.dtype), group_sizes.astype(jnp.int32), _DIMS)
