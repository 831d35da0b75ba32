"""Other projects' faces over jaxsloth's API: Unsloth's ``FastLanguageModel``, TRL's ``SFTTrainer`` / ``SFTConfig``
and preference trainers (``DPOTrainer``, ``ORPOTrainer``, ``CPOTrainer`` for SimPO, ``KTOTrainer``), and Axolotl /
LLaMA-Factory config files. They translate arguments and call ``jaxsloth.api`` or feed the settings schema; they hold
no training logic of their own."""

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
from jaxsloth.faces.trl import SFTConfig, SFTTrainer, TrainOutput
from jaxsloth.faces.unsloth import FastLanguageModel, UnslothModel

__all__ = [
    "CPOConfig",
    "CPOTrainer",
    "DPOConfig",
    "DPOTrainer",
    "FastLanguageModel",
    "KTOConfig",
    "KTOTrainer",
    "ORPOConfig",
    "ORPOTrainer",
    "SFTConfig",
    "SFTTrainer",
    "TrainOutput",
    "UnslothModel",
]
