"""The training step over a CausalLM's split NNX state.

``graphdef, lora_state, frozen_state = jaxsloth.models.modules.split(model)``; the jitted step takes the two states
(plain pytrees), differentiates only the LoRA state and closes over no array. Inside, the states become the
functional core's trees (references, no copy) and the step is ``make_train_step``'s, so the compiled program is the
same one: the same loss, gradients and update, bit for bit. The optimizer state is the one ``make_train_step`` keeps
(optax over the LoRA tree), so checkpoints keep their format::

    graphdef, lora_state, frozen_state = split(model)
    opt_state = init_optimizer_state(optimizer, lora_state)
    step = make_module_train_step(config, lora, tc, profile, optimizer)
    lora_state, opt_state, metrics = step(lora_state, opt_state, frozen_state, batch, key)
    model = nnx.merge(graphdef, lora_state, frozen_state)
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxsloth.config import LoraConfig, TrainConfig
from jaxsloth.models.config import ModelConfig
from jaxsloth.models.modules import module_trees, state_like
from jaxsloth.profiles import Profile
from jaxsloth.sharding import batch_sharding, replicated
from jaxsloth.train.step import train_step_fn


def init_optimizer_state(optimizer: optax.GradientTransformation, lora_state: nnx.State):
    """The optimizer state over the LoRA tree (the format ``make_train_step`` and checkpoints use)."""
    return optimizer.init(module_trees(lora_state)[1])


def make_module_train_step(
    config: ModelConfig,
    lora: LoraConfig,
    tc: TrainConfig,
    profile: Profile,
    optimizer: optax.GradientTransformation,
    *,
    mesh: Mesh | None = None,
    shardings: tuple | None = None,
) -> Callable:
    """Jitted ``step(lora_state, opt_state, frozen_state, batch, key) -> (lora_state, opt_state, metrics)``.

    lora_state, frozen_state: ``nnx.split(model, LoRAParam, ...)``'s states of a CausalLM; lora_state and opt_state
    are donated. batch, key, metrics, mesh: as ``make_train_step``. shardings: (lora_state, opt_state,
    frozen_state) shardings, the states' shapes with a NamedSharding per array (``state_like`` of the trees of
    ``jaxsloth.sharding.place_train_state``)."""
    inner = train_step_fn(config, lora, tc, profile, optimizer, mesh=mesh)

    def step(lora_state, opt_state, frozen_state, batch, key):
        params, _ = module_trees(frozen_state)
        _, trainable = module_trees(lora_state)
        new_trainable, new_opt, metrics = inner(trainable, opt_state, params, batch, key)
        return state_like(lora_state, trainable=new_trainable), new_opt, metrics

    if shardings is None:
        return jax.jit(step, donate_argnums=(0, 1))
    l_sh, o_sh, f_sh = shardings
    rep = replicated(mesh)
    return jax.jit(
        step,
        donate_argnums=(0, 1),
        in_shardings=(l_sh, o_sh, f_sh, batch_sharding(mesh), rep),
        out_shardings=(l_sh, o_sh, rep),
    )
