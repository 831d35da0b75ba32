"""jaxsloth: fast, lean LoRA/QLoRA fine-tuning of Hugging Face LLMs in JAX, with Pallas GPU kernels."""

# The training package is imported before the API binds the name ``train`` to the function, so a later import of
# one of its modules cannot rebind ``jaxsloth.train`` to the package.
import jaxsloth.train.step  # noqa: F401
from jaxsloth.api import Model, add_lora, load, load_adapter, save_adapter, save_gguf, save_merged, train
from jaxsloth.faces import FastLanguageModel, SFTConfig, SFTTrainer
from jaxsloth.faces.grpo import GRPOConfig, GRPOTrainer
from jaxsloth.faces.preference import (
    CPOConfig,
    CPOTrainer,
    DPOConfig,
    DPOTrainer,
    KTOConfig,
    KTOTrainer,
    ORPOConfig,
    ORPOTrainer,
)

__version__ = "0.1.0"
__all__ = [
    "CPOConfig",
    "CPOTrainer",
    "DPOConfig",
    "DPOTrainer",
    "FastLanguageModel",
    "GRPOConfig",
    "GRPOTrainer",
    "KTOConfig",
    "KTOTrainer",
    "Model",
    "ORPOConfig",
    "ORPOTrainer",
    "SFTConfig",
    "SFTTrainer",
    "add_lora",
    "load",
    "load_adapter",
    "save_adapter",
    "save_gguf",
    "save_merged",
    "train",
]
