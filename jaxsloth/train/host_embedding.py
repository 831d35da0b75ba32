"""The frozen input embedding table kept on the host while training (``Profile.embedding == "host"``).

A LoRA or QLoRA step reads the input embedding once, to look up its tokens' rows, and never trains it; yet the
table sits in device memory for the whole step: 1 GiB of bf16 at Llama-3 8B (128,256 x 4,096), a seventh of a
QLoRA step's peak. Here the table is a NumPy array in host memory, each batch's rows are looked up on the host
before the step ([rows, seq, D] 16-bit values: 32 MiB for 2 x 2048 tokens at 8B) and travel with the batch as
``batch["embedded"]``, and the step's params hold a zero-row placeholder in the table's place, so the compiled
program's trees keep their structure (the NNX module still has its embedding) and take none of its bytes.

Models whose LM head is the tied embedding keep it on the device: the loss multiplies by it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxsloth.models.config import ModelConfig


def check_host_embedding(config: ModelConfig, trainable: dict | None, mesh, method: str | None = "sft") -> None:
    """Raises where the table cannot leave the device: a method other than SFT (method None: a caller's own step,
    which reads its own batch format without the looked-up rows), a tied LM head, a trained embedding, a mesh."""
    if method != "sft":
        what = "a method's own step" if method is None else f"method={method!r}"
        raise ValueError(f"embedding='host' is for supervised fine-tuning; {what} keeps the embedding on the device")
    if config.tie_word_embeddings:
        raise ValueError(
            "embedding='host': this model ties its LM head to the input embedding, which the loss reads on the "
            "device; use embedding='device'"
        )
    if trainable is None or "embed" in trainable:
        raise ValueError(
            "embedding='host' keeps a frozen embedding on the host; this run trains the embedding "
            "(full fine-tuning or embed_tokens in modules_to_save): use embedding='device'"
        )
    if mesh is not None:
        raise ValueError("embedding='host' runs on one device; drop the device mesh or use embedding='device'")


def on_host(params: dict) -> bool:
    """Whether ``params`` hold their input embedding table on the host (a NumPy array)."""
    return isinstance(params.get("embed"), np.ndarray)


def to_host(params: dict, consume: bool = False) -> dict:
    """``params`` with the embedding table copied to host memory. consume: delete the device array (the caller
    gives it up, so its memory is freed); otherwise it is freed only once no one holds it."""
    table = params["embed"]
    if isinstance(table, np.ndarray):
        return params
    host = np.asarray(jax.device_get(table))
    if consume and isinstance(table, jax.Array):
        table.delete()
    return dict(params, embed=host)


def to_device(params: dict) -> dict:
    """``params`` with a host embedding table back on the device (after training, for generation)."""
    return dict(params, embed=jnp.asarray(params["embed"])) if on_host(params) else params


def step_params(params: dict) -> dict:
    """The params a step takes: a host table replaced by a zero-row placeholder of its dtype and width."""
    if not on_host(params):
        return params
    table = params["embed"]
    return dict(params, embed=jnp.zeros((0, table.shape[1]), table.dtype))


def with_embedded(batch: dict, params: dict) -> dict:
    """``batch`` with its tokens' embedding rows (``batch["embedded"]``, [rows, seq, D]) when the table is on the
    host; unchanged otherwise."""
    if not on_host(params):
        return batch
    return dict(batch, embedded=np.take(params["embed"], np.asarray(batch["tokens"]), axis=0))
