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
from jaxsloth.models.modules import CausalLM, module_trees, split, state_like
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


def make_fit_step(
    config: ModelConfig,
    lora: LoraConfig,
    tc: TrainConfig,
    profile: Profile,
    optimizer: optax.GradientTransformation,
    *,
    mesh: Mesh | None = None,
    shardings: tuple | None = None,
) -> TreeCalls:
    """``make_train_step``'s signature and calling convention (``step(trainable, opt_state, params, batch, key)``,
    ``.lower(...).compile()``) over the module step: what ``jaxsloth.train``'s loop runs for a LoRA model. The trees
    become the CausalLM's split states on the way in and the LoRA state becomes the tree on the way out, both as
    references (no copy); the compiled program is the module step's."""
    states = _TreeStates(config, lora)

    def build(trainable, params):
        state_shardings = None
        if shardings is not None:
            t_sh, o_sh, p_sh = shardings
            state_shardings = (states.lora(t_sh), o_sh, state_like(states.frozen_like, params=p_sh))
        return make_module_train_step(config, lora, tc, profile, optimizer, mesh=mesh, shardings=state_shardings)

    return TreeCalls(build, states)


class _TreeStates:
    """The split states' shapes (variable types and metadata, no arrays kept), made from the first trees seen, and
    the conversions between the functional trees and those states."""

    def __init__(self, config: ModelConfig, lora: LoraConfig):
        self.config, self.lora_config = config, lora
        self.lora_like = self.frozen_like = None
        self._frozen: tuple[list, nnx.State] | None = None  # (the params' leaves, their state): reused every step

    def learn(self, trainable, params) -> None:
        if self.lora_like is None:
            _, lora_state, frozen_state = split(
                CausalLM.from_trees(self.config, params, trainable, lora=self.lora_config)
            )
            abstract = lambda s: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), s)  # noqa: E731
            self.lora_like, self.frozen_like = abstract(lora_state), abstract(frozen_state)

    def lora(self, trainable):
        return state_like(self.lora_like, trainable=trainable)

    def frozen(self, params):
        """The frozen state of ``params``; the same arrays as the last call's give the same state back (the frozen
        weights are the same arrays every step, and rebuilding the state of every layer's weights costs
        milliseconds of host time per step)."""
        leaves = jax.tree.leaves(params)
        if self._frozen is not None and len(leaves) == len(self._frozen[0]):
            if all(a is b for a, b in zip(leaves, self._frozen[0], strict=True)):
                return self._frozen[1]
        self._frozen = (leaves, state_like(self.frozen_like, params=params))
        return self._frozen[1]


class TreeCalls:
    """A module step (or its lowered / compiled form) called with the functional trees, as ``fit`` calls
    ``make_train_step``'s; ``build(trainable, params)`` makes the jitted module step once the trees' shapes are
    known."""

    def __init__(self, build: Callable, states: _TreeStates, fn: Callable | None = None):
        self.build, self.states, self.fn = build, states, fn

    def _args(self, trainable, opt_state, params, *rest):
        self.states.learn(trainable, params)
        if self.fn is None:
            self.fn = self.build(trainable, params)
        return (self.states.lora(trainable), opt_state, self.states.frozen(params), *rest)

    def __call__(self, *args):
        lora_state, opt_state, metrics = self.fn(*self._args(*args))
        return module_trees(lora_state)[1], opt_state, metrics

    def lower(self, *args) -> TreeCalls:
        args = self._args(*args)
        return TreeCalls(self.build, self.states, self.fn.lower(*args))

    def compile(self) -> TreeCalls:
        return TreeCalls(self.build, self.states, self.fn.compile())

    def memory_analysis(self):
        return self.fn.memory_analysis()
