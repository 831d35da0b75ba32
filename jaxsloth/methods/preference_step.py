"""The preference training step: policy log-probs (with the LoRA, or every weight in full fine-tuning) and reference
log-probs of packed sequences in one jitted function, the method's loss, value_and_grad over the trained tree and
the SFT step's AdamW (``make_optimizer``). With LoRA the reference is the same weights with the adapter off (no
second copy of the weights); a separate reference model (TRL's ``ref_model``) is a frozen argument of the step."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jaxsloth.config import LoraConfig, TrainConfig
from jaxsloth.lora import with_trainable
from jaxsloth.methods.logprobs import sequence_logps
from jaxsloth.methods.preference import dpo_loss, kto_loss, orpo_loss, simpo_loss
from jaxsloth.models.config import ModelConfig
from jaxsloth.ops import Ops

METHODS = ("dpo", "orpo", "simpo", "kto")


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
    """The method and its settings, in TRL's names and with TRL's defaults (DPOConfig, ORPOConfig, CPOConfig,
    KTOConfig). ``loss_type`` is DPO's ("sigmoid", "ipo", "hinge"); ``cpo_alpha`` weighs SimPO's optional NLL."""

    method: str = "dpo"
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    cpo_alpha: float = 0.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: expected one of {METHODS}")
        if self.beta <= 0:
            raise ValueError(f"beta={self.beta} must be > 0")

    @property
    def needs_reference(self) -> bool:
        return self.method in ("dpo", "kto")


def preference_loss(pc: PreferenceConfig, sums, counts, ref_sums=None, desirable=None) -> tuple[jax.Array, dict]:
    """Per-sequence summed log-probs and completion-token counts, [num_sequences], laid out as
    ``preference_data.pack_pairs`` (chosen 2i, rejected 2i + 1) or ``pack_unpaired`` (examples, then KL
    sequences) -> (loss, metrics)."""
    if pc.method == "kto":
        n = sums.shape[0] // 2
        return kto_loss(
            sums[:n],
            ref_sums[:n],
            jax.lax.stop_gradient(sums[n:]),
            ref_sums[n:],
            desirable,
            beta=pc.beta,
            desirable_weight=pc.desirable_weight,
            undesirable_weight=pc.undesirable_weight,
        )
    chosen, rejected = sums[0::2], sums[1::2]
    chosen_n, rejected_n = counts[0::2], counts[1::2]
    if pc.method == "dpo":
        return dpo_loss(
            chosen,
            rejected,
            ref_sums[0::2],
            ref_sums[1::2],
            beta=pc.beta,
            loss_type=pc.loss_type,
            label_smoothing=pc.label_smoothing,
            chosen_tokens=chosen_n,
            rejected_tokens=rejected_n,
        )
    if pc.method == "orpo":
        return orpo_loss(chosen, rejected, chosen_n, rejected_n, beta=pc.beta)
    return simpo_loss(
        chosen,
        rejected,
        chosen_n,
        rejected_n,
        beta=pc.beta,
        simpo_gamma=pc.simpo_gamma,
        label_smoothing=pc.label_smoothing,
        cpo_alpha=pc.cpo_alpha,
    )


def make_preference_loss_fn(
    config: ModelConfig,
    lora: LoraConfig | None,
    pc: PreferenceConfig,
    ops: Ops = Ops(),
    *,
    ref_config: ModelConfig | None = None,
    **forward_kwargs,
) -> Callable:
    """-> loss_fn(trainable, params, batch, num_sequences, dropout_key=None, ref_params=None) -> (loss, metrics).
    batch: ``pack`` rows, plus "desirable" [n] bool for KTO and, when the reference was precomputed, "ref_logps"
    [num_sequences]. lora None: full fine-tuning (trainable is every weight of the model, params unused).

    The reference (DPO, KTO): batch["ref_logps"] when given; else ``ref_params``, a separate frozen model of
    architecture ``ref_config`` (default: the policy's), as TRL's ``ref_model``; else the policy's own weights with
    the adapter off. forward_kwargs go to ``forward_hidden`` (remat, compute_dtype, ...)."""

    def loss_fn(trainable, params, batch, num_sequences: int, dropout_key=None, ref_params=None):
        kwargs = dict(ops=ops, **forward_kwargs)
        if lora is None:
            sums, counts = sequence_logps(trainable, batch, num_sequences, config=config, **kwargs)
        else:
            p, lora_tree = with_trainable(params, trainable)
            sums, counts = sequence_logps(
                p, batch, num_sequences, config=config, lora=lora_tree, lora_rt=lora.runtime, dropout_key=dropout_key,
                **kwargs,
            )  # fmt: skip
        ref_sums = None
        if pc.needs_reference and "ref_logps" in batch:
            ref_sums = batch["ref_logps"]
        elif pc.needs_reference and ref_params is not None:
            ref_sums, _ = sequence_logps(ref_params, batch, num_sequences, config=ref_config or config, **kwargs)
        elif pc.needs_reference:
            if lora is None:
                raise ValueError(
                    f"method={pc.method!r} with full fine-tuning needs a reference model (ref_model) or precomputed "
                    "reference log-probs"
                )
            # The reference: the base weights (untrained embeddings too), adapter off.
            ref_sums, _ = sequence_logps(params, batch, num_sequences, config=config, lora=None, **kwargs)
        if ref_sums is not None:
            ref_sums = jax.lax.stop_gradient(ref_sums)
        return preference_loss(pc, sums, counts, ref_sums, batch.get("desirable"))

    return loss_fn


def make_preference_step(
    config: ModelConfig,
    lora: LoraConfig,
    pc: PreferenceConfig,
    tc: TrainConfig,
    optimizer: optax.GradientTransformation,
    ops: Ops = Ops(),
    **forward_kwargs,
) -> Callable:
    """Jitted ``step(trainable, opt_state, params, batch, num_sequences) -> (trainable, opt_state, metrics)``
    (num_sequences static). A non-finite loss or gradient keeps the old state (``finite=False``), as the SFT step."""
    grad_fn = jax.value_and_grad(make_preference_loss_fn(config, lora, pc, ops, **forward_kwargs), has_aux=True)

    def step(trainable, opt_state, params, batch, num_sequences: int):
        (loss, metrics), grads = grad_fn(trainable, params, batch, num_sequences)
        updates, new_opt = optimizer.update(grads, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        metrics = {**metrics, "loss": loss, "grad_norm": grad_norm, "finite": finite}
        return keep(new_trainable, trainable), keep(new_opt, opt_state), metrics

    return jax.jit(step, static_argnames="num_sequences", donate_argnums=(0, 1))
