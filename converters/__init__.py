"""Hugging Face <-> jaxsloth: safetensors weights, configs, PEFT adapters, merged export."""
