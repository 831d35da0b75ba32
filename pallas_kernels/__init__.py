"""Pallas GPU kernels for jaxsloth's hot paths.

One file per op. Each file holds, in order: the Pallas kernel(s), the public function with a hand-written
``jax.custom_vjp``, and ``<op>_reference`` in plain jnp, which defines the op's semantics and is the
parity target of every test.
"""
