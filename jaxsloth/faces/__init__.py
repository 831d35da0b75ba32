"""Other libraries' faces over jaxsloth's API: Unsloth's ``FastLanguageModel`` and TRL's ``SFTTrainer`` /
``SFTConfig``. They translate arguments and call ``jaxsloth.api``; they hold no training logic of their own."""

from jaxsloth.faces.trl import SFTConfig, SFTTrainer, TrainOutput
from jaxsloth.faces.unsloth import FastLanguageModel, UnslothModel

__all__ = ["FastLanguageModel", "SFTConfig", "SFTTrainer", "TrainOutput", "UnslothModel"]
