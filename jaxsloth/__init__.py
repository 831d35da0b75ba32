"""jaxsloth: fast, lean LoRA/QLoRA fine-tuning of Hugging Face LLMs in JAX, with Pallas GPU kernels."""

from jaxsloth.api import Model, add_lora, load, save_adapter, save_merged, train

__version__ = "0.1.0"
__all__ = ["Model", "add_lora", "load", "save_adapter", "save_merged", "train"]
