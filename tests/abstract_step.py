"""The LoRA train step compiled on abstract inputs (shapes only: nothing is allocated), for tests that read XLA's
memory plan or program of a step."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsloth.config import LoraConfig, TrainConfig
from jaxsloth.lora import init_lora
from jaxsloth.models.decoder import unstack_layers
from jaxsloth.train.step import make_optimizer, make_train_step


def compile_abstract_step(config, profile, params, *, tokens: int, lora: LoraConfig, tc: TrainConfig):
    """params: abstract stacked weights (``jax.eval_shape`` of their builder), unstacked here where the profile's
    layer loop is unrolled, as jaxsloth.train does -> (the compiled step, the weights it took)."""
    if profile.unrolled_layers:
        params = jax.eval_shape(unstack_layers, params)
    trainable = jax.eval_shape(lambda k: init_lora(config, lora, k), jax.random.key(1))
    optimizer = make_optimizer(tc, lora, trainable, profile.optimizer_state)
    ids = jax.ShapeDtypeStruct((1, tokens), jnp.int32)
    step = make_train_step(config, lora, tc, profile, optimizer)
    args = (trainable, jax.eval_shape(optimizer.init, trainable), params, {"tokens": ids, "targets": ids})
    return step.lower(*args, jax.eval_shape(lambda: jax.random.key(2))).compile(), params
