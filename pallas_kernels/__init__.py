"""Pallas GPU kernels for jaxsloth's hot paths.

One file per op (attention, with two kernel backends, is a package: ``common``, ``triton``, ``mosaic`` and the
public op in its ``__init__``). Each holds the Pallas kernel(s), the public function with a hand-written
``jax.custom_vjp``, and ``<op>_reference`` in plain jnp, which defines the op's semantics and is the parity target
of every test. Kernels take their block configs from the caller, with a default for any GPU since Ampere; nothing
here asks which GPU it runs on (``jaxsloth.profiles`` decides that).
"""
