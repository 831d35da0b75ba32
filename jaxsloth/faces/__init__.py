"""Other projects' faces over jaxsloth's API: Unsloth's ``FastLanguageModel``, TRL's ``SFTTrainer`` / ``SFTConfig``
and Axolotl / LLaMA-Factory config files. They translate arguments and call ``jaxsloth.api`` or feed the settings
schema; they hold no training logic of their own."""

from jaxsloth.faces.trl import SFTConfig, SFTTrainer, TrainOutput
from jaxsloth.faces.unsloth import FastLanguageModel, UnslothModel

__all__ = ["FastLanguageModel", "SFTConfig", "SFTTrainer", "TrainOutput", "UnslothModel"]
