"""jaxsloth: fast, lean LoRA/QLoRA fine-tuning of Hugging Face LLMs in JAX, with Pallas GPU kernels."""

__version__ = "0.1.0"
