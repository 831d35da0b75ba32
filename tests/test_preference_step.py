"""A few preference steps on a toy set separate chosen from rejected (CPU, tiny model)."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from converters.hf import load_hf_model
from jaxsloth.config import TrainConfig
from jaxsloth.lora import LoraConfig, init_lora
from jaxsloth.methods.preference_data import pack_pairs
from jaxsloth.methods.preference_step import PreferenceConfig, make_preference_step
from jaxsloth.train.step import make_optimizer
from tests.tiny_models import saved_model


def test_dpo_steps_raise_reward_accuracy():
    config, params = load_hf_model(saved_model("llama"), dtype=jnp.float32)
    rng = np.random.default_rng(0)
    ids = lambda n: [int(x) for x in rng.integers(3, config.vocab_size, n)]  # noqa: E731
    pairs = [(ids(4), ids(5), ids(5)) for _ in range(4)]
    batch = {k: jnp.asarray(v) for k, v in pack_pairs(pairs, seq_len=48).items()}
    lora = LoraConfig(r=8, lora_alpha=16)
    trainable = init_lora(config, lora, jax.random.key(0), params)
    tc = TrainConfig(learning_rate=1e-2, lr_scheduler_type="constant", max_grad_norm=1.0, weight_decay=0.0)
    optimizer = make_optimizer(tc, lora, trainable)
    opt_state = optimizer.init(trainable)
    step = make_preference_step(config, lora, PreferenceConfig(method="dpo", beta=0.5), tc, optimizer)
    history = []
    for _ in range(8):
        trainable, opt_state, metrics = step(trainable, opt_state, params, batch, num_sequences=2 * len(pairs))
        history.append({k: float(v) for k, v in metrics.items()})
    # B starts at zero: the policy is the reference, every reward 0 (up to rounding: the two forwards compile
    # apart), the loss log 2.
    assert abs(history[0]["loss"] - math.log(2)) < 1e-6
    assert abs(history[0]["rewards/chosen"]) < 1e-5 and abs(history[0]["rewards/margins"]) < 1e-5
    assert history[-1]["rewards/accuracies"] == 1.0
    assert history[-1]["rewards/margins"] > 0.1
    assert history[-1]["loss"] < history[0]["loss"] - 0.05
    assert all(h["finite"] for h in history)
