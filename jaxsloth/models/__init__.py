"""The generic decoder and its configuration."""

from jaxsloth.models.config import ModelConfig, RopeConfig, config_from_hf_dict, rope_inv_freq
from jaxsloth.models.decoder import (
    LoraRuntime,
    count_params,
    forward,
    forward_hidden,
    init_params,
    logits_from_hidden,
    loss_sum_and_count,
)

__all__ = [
    "LoraRuntime",
    "ModelConfig",
    "RopeConfig",
    "config_from_hf_dict",
    "count_params",
    "forward",
    "forward_hidden",
    "init_params",
    "logits_from_hidden",
    "loss_sum_and_count",
    "rope_inv_freq",
]
