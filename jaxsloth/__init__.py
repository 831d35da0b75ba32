"""jaxsloth: fast, lean LoRA/QLoRA fine-tuning of Hugging Face LLMs in JAX, with Pallas GPU kernels."""

# The training package is imported before the API binds the name ``train`` to the function, so a later import of
# one of its modules cannot rebind ``jaxsloth.train`` to the package.
import jaxsloth.train.step  # noqa: F401
from jaxsloth.api import Model, add_lora, load, load_adapter, save_adapter, save_gguf, save_merged, train
from jaxsloth.faces import FastLanguageModel, SFTConfig, SFTTrainer
from jaxsloth.faces.grpo import GRPOConfig as GRPOConfig
from jaxsloth.faces.grpo import GRPOTrainer as GRPOTrainer

__version__ = "0.1.0"
__all__ = [
    "FastLanguageModel",
    "Model",
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
