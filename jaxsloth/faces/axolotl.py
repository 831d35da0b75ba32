"""Axolotl and LLaMA-Factory training configs, read as jaxsloth settings.

``jaxsloth train axolotl.yml`` takes a config written for Axolotl (``base_model`` + ``datasets``, or ``adapter``)
or for LLaMA-Factory (``model_name_or_path`` + ``finetuning_type`` or ``stage``): ``translate_config`` maps its keys
onto the schema's settings (jaxsloth.config), which then validates them like any other YAML file; their tracker
keys (Axolotl's wandb_*, LLaMA-Factory's report_to) become report_to / project / run_name. Keys with no jaxsloth
equivalent that do not change what is trained (logging, attention backends) are ignored and listed in
one log line; keys that would change it in a way jaxsloth cannot follow (full fine-tuning, 8-bit loading, several
datasets, custom prompt formats) are errors naming the key.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from jaxsloth.data.formats import ROLE_NAMES
from jaxsloth.models.decoder import LINEARS
from jaxsloth.train.trackers import split_foreign_report_to

logger = logging.getLogger(__name__)

SCHEDULES = ("linear", "cosine", "constant")


def detect(raw: Mapping[str, Any]) -> str | None:
    """ "Axolotl", "LLaMA-Factory", or None for a jaxsloth config."""
    if "base_model" in raw and ("datasets" in raw or "adapter" in raw):
        return "Axolotl"
    if "model_name_or_path" in raw and ("finetuning_type" in raw or "stage" in raw):
        return "LLaMA-Factory"
    return None


def translate_config(raw: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """``raw`` (a YAML file's mapping) as jaxsloth setting name -> value: unchanged for a jaxsloth config, mapped
    for an Axolotl or LLaMA-Factory one (logging which, and every ignored key). Raises ValueError naming the file
    and key for what jaxsloth cannot do."""
    kind = detect(raw)
    if kind is None:
        return dict(raw)
    mapper = _Mapper(raw, path)
    (_axolotl if kind == "Axolotl" else _llamafactory)(mapper)
    if mapper.out.get("max_steps", 0) <= 0:  # transformers' max_steps: -1 (or 0) means "from the epochs"
        mapper.out.pop("max_steps", None)
    else:  # both projects (transformers): max_steps > 0 overrides the epochs
        mapper.out.pop("num_train_epochs", None)
    logger.info("%s: read as an %s config", path, kind)
    if mapper.ignored:
        logger.info("%s: ignored %s keys (no jaxsloth equivalent): %s", path, kind, ", ".join(mapper.ignored))
    return mapper.out


class _Mapper:
    """Walks a foreign config once: every key is either mapped (``take``) or listed as ignored."""

    def __init__(self, raw: Mapping[str, Any], path: Path):
        self.raw, self.path = dict(raw), path
        self.out: dict[str, Any] = {}
        self.ignored: list[str] = []

    def error(self, key: str, message: str) -> ValueError:
        return ValueError(f"{self.path}: {key}: {message}")

    def take(self, key: str, name: str | None = None, convert: Callable[[Any], Any] = lambda v: v) -> None:
        """Maps ``key`` (when present and not null) to setting ``name`` (default: the same name)."""
        if key in self.raw:
            value = self.raw.pop(key)
            if value is not None:
                self.out[name or key] = convert(value)

    def pop(self, key: str, default: Any = None) -> Any:
        return self.raw.pop(key, default)

    def ignore_rest(self) -> None:
        """Lists every key left that turns something on (empty, false and 0 values turn nothing on)."""
        self.ignored += [k for k, v in self.raw.items() if v not in (None, False, 0, "", [], {})]
        self.raw.clear()


def _schedule(mapper: _Mapper, key: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        name = str(value).removesuffix("_schedule_with_warmup")
        if name not in SCHEDULES:
            raise mapper.error(key, f"scheduler {value!r} is not supported; choose one of: {', '.join(SCHEDULES)}")
        return name

    return convert


def _targets(mapper: _Mapper, key: str, value: Any) -> tuple[str, ...]:
    """A list (or comma list) of projection names, or "all" / "all-linear" for every projection."""
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    if names in (["all"], ["all-linear"]):
        return LINEARS
    unknown = [n for n in names if n not in LINEARS]
    if unknown:
        raise mapper.error(key, f"unknown projection {unknown[0]!r}; jaxsloth adapts: {', '.join(LINEARS)}")
    return tuple(names)


def _dtype(m: _Mapper) -> None:
    """bf16: true / fp16: true -> dtype; "auto" (the device's choice) is the profile's, so it is left to it."""
    for key, dtype in (("bf16", "bfloat16"), ("fp16", "float16")):
        if m.raw.get(key) is True:
            m.pop(key)
            m.out["dtype"] = dtype


# --- Axolotl -------------------------------------------------------------------------------------------------------

# Axolotl dataset types -> our formats (completion: the raw text of the entry's `field`, default "text").
_AXOLOTL_TYPES = {"alpaca": "alpaca", "sharegpt": "messages", "chat_template": "messages", "completion": "text"}
_AXOLOTL_SAME = (
    "gradient_accumulation_steps", "max_steps", "learning_rate", "warmup_steps", "warmup_ratio", "train_on_inputs",
    "seed", "weight_decay", "max_grad_norm", "save_steps", "output_dir", "lora_alpha", "lora_dropout", "load_in_4bit",
    "val_set_size", "eval_steps", "eval_strategy", "early_stopping_patience", "load_best_model_at_end",
    "eval_max_new_tokens",
)  # fmt: skip


def _axolotl(m: _Mapper) -> None:
    m.take("base_model", "model")
    m.take("tokenizer_config", "tokenizer")
    for key in _AXOLOTL_SAME:
        m.take(key)
    m.take("sequence_len", "max_seq_length")
    m.take("micro_batch_size", "per_device_train_batch_size")
    m.take("eval_batch_size", "per_device_eval_batch_size")
    m.take("num_epochs", "num_train_epochs")
    m.take("lr_scheduler", "lr_scheduler_type", _schedule(m, "lr_scheduler"))
    m.take("sample_packing", "packing")
    m.take("lora_r", "r")
    m.take("peft_use_rslora", "use_rslora")
    m.take("auto_resume_from_checkpoints", "resume")
    m.take("resume_from_checkpoint", "resume")  # a checkpoint path, which wins over auto-resume
    # Every GPU profile already checkpoints activations (its remat is tuned per GPU): true keeps the profile's.
    checkpointing = m.pop("gradient_checkpointing")
    if checkpointing is False or checkpointing == "offload":
        m.out["remat"] = "none" if checkpointing is False else "offload"
    saved = m.pop("lora_modules_to_save") or []
    unknown = [name for name in saved if name not in ("embed_tokens", "lm_head")]
    if unknown:
        raise m.error("lora_modules_to_save", f"{unknown[0]!r}: jaxsloth trains full copies of embed_tokens and "
                      "lm_head only")  # fmt: skip
    m.out.update({"train_embeddings": "embed_tokens" in saved, "train_lm_head": "lm_head" in saved})
    adapter = m.pop("adapter")
    if adapter not in ("lora", "qlora"):
        raise m.error("adapter", f"{adapter!r}: jaxsloth trains LoRA or QLoRA adapters only (adapter: lora or qlora)")
    if adapter == "qlora":
        if m.out.get("load_in_4bit") is False:
            raise m.error("load_in_4bit", "adapter: qlora needs the base model in 4 bits (load_in_4bit: true)")
        m.out["load_in_4bit"] = True
    if m.pop("load_in_8bit"):
        raise m.error("load_in_8bit", "8-bit loading is not supported; use adapter: qlora (4-bit NF4) or lora")
    modules, linear = m.pop("lora_target_modules"), m.pop("lora_target_linear")
    if linear:
        m.out["target_modules"] = LINEARS
    elif modules:
        m.out["target_modules"] = _targets(m, "lora_target_modules", modules)
    _dtype(m)
    _axolotl_trackers(m)
    rl = m.pop("rl")
    if rl:
        _axolotl_preference(m, rl)
        _axolotl_preference_dataset(m, m.pop("datasets"))
    else:
        _axolotl_dataset(m, m.pop("datasets"))
    m.ignore_rest()


def _axolotl_trackers(m: _Mapper) -> None:
    """wandb_project turns Weights & Biases on (beside jaxsloth's TensorBoard events), wandb_name names the run,
    use_tensorboard: false turns TensorBoard off. wandb_mode and wandb_entity reach wandb through its environment,
    as Axolotl passes them; wandb_mode: disabled keeps wandb off."""
    trackers = ["tensorboard"] if m.pop("use_tensorboard") is not False else []
    project, mode, entity = m.pop("wandb_project"), m.pop("wandb_mode"), m.pop("wandb_entity")
    m.take("wandb_name", "run_name")
    if project and mode != "disabled":
        trackers.append("wandb")
        m.out["project"] = project
        for variable, value in (("WANDB_MODE", mode), ("WANDB_ENTITY", entity)):
            if value:
                os.environ[variable] = str(value)
    m.out["report_to"] = tuple(trackers) or ("none",)


def _axolotl_dataset(m: _Mapper, datasets: Any) -> None:
    if not datasets:
        raise m.error("datasets", "no dataset given (a list with one entry: path and type)")
    if not isinstance(datasets, list) or not all(isinstance(d, Mapping) for d in datasets):
        raise m.error("datasets", "expected a list of {path, type} entries")
    if len(datasets) > 1:
        raise m.error(
            "datasets", f"{len(datasets)} datasets given; jaxsloth trains on one: concatenate them into one file"
        )
    entry = dict(datasets[0])
    if not entry.get("path"):
        raise m.error("datasets[0].path", "missing")
    m.out["data"] = entry.pop("path")
    if entry.get("data_files"):
        m.out["data"] = entry.pop("data_files")
    kind = entry.pop("type", None)
    if kind is not None:
        if not isinstance(kind, str) or kind.split(":")[0] not in _AXOLOTL_TYPES:
            raise m.error(
                "datasets[0].type",
                f"{kind!r} is not supported; jaxsloth reads: {', '.join(_AXOLOTL_TYPES)} (or leave type out to "
                "detect the format from the columns)",
            )
        m.out["format"] = _AXOLOTL_TYPES[kind.split(":")[0]]
        if m.out["format"] == "text":
            m.out["dataset_text_field"] = entry.pop("field", None) or "text"
    field = entry.pop("field_messages", None)
    if field not in (None, "messages", "conversations"):
        raise m.error("datasets[0].field_messages", f"{field!r}: jaxsloth reads conversations from 'messages' or "
                      "'conversations'; rename the column")  # fmt: skip
    for key, allowed in (("role", ("role", "from")), ("content", ("content", "value"))):
        mapped = (entry.get("message_property_mappings") or {}).get(key, allowed[0])
        if mapped not in allowed:
            raise m.error(f"datasets[0].message_property_mappings.{key}", f"{mapped!r}: jaxsloth reads turns' "
                          f"{' or '.join(allowed)}; rename the field in the data")  # fmt: skip
    entry.pop("message_property_mappings", None)
    for role, names in (entry.pop("roles", None) or {}).items():
        for name in names:
            if ROLE_NAMES.get(name) != role:
                raise m.error(f"datasets[0].roles.{role}", f"{name!r} is not read as {role!r} by jaxsloth; rename "
                              "the role in the data")  # fmt: skip
    if entry.get("split") is not None:
        m.out["split"] = entry.pop("split")
    if entry.get("name") is not None:
        m.out["dataset_config"] = entry.pop("name")
    m.ignored += [f"datasets[0].{k}" for k, v in entry.items() if v not in (None, False, 0, "", [], {})]


# Axolotl's rl methods -> (method, DPO loss_type); ipo is Axolotl's name for DPO with the IPO loss.
_AXOLOTL_RL = {"dpo": ("dpo", None), "ipo": ("dpo", "ipo"), "orpo": ("orpo", None), "kto": ("kto", None),
               "simpo": ("simpo", None)}  # fmt: skip
# Axolotl's preference dataset types (prefix chatml / llama3: the strings formatted as chat turns; the template is
# the tokenizer's) -> their column names: prompt, chosen, rejected, system.
_AXOLOTL_PREFERENCE_TYPES = {
    "intel": ("question", "chosen", "rejected", "system"),
    "argilla": ("instruction", "chosen_response", "rejected_response", None),
    "prompt_pairs": ("prompt", "chosen", "rejected", None),
    "icr": ("input", "chosen", "rejected", None),
    "default": ("prompt", "chosen", "rejected", "system"),
}


# The schema's column settings' defaults (TRL's names; no system column).
_SCHEMA_COLUMNS = {"prompt_field": "prompt", "chosen_field": "chosen", "rejected_field": "rejected",
                   "system_field": None}  # fmt: skip


def _axolotl_preference(m: _Mapper, rl: Any) -> None:
    """rl: dpo | ipo | orpo | kto | simpo and their settings (TRL's trainers, as Axolotl builds them)."""
    if rl not in _AXOLOTL_RL:
        raise m.error("rl", f"{rl!r} is not supported; jaxsloth trains rl: {', '.join(_AXOLOTL_RL)}")
    method, loss_type = _AXOLOTL_RL[rl]
    m.out["method"] = method
    if loss_type:
        m.out["loss_type"] = loss_type
    m.take("rl_beta", "beta")
    if method == "orpo":
        m.take("orpo_alpha", "beta")  # Axolotl passes orpo_alpha as ORPOConfig's beta (the paper's lambda)
    m.take("dpo_label_smoothing", "label_smoothing")
    m.take("precompute_ref_log_probs")
    m.take("simpo_gamma")
    if method == "simpo":  # CPOConfig's cpo_alpha (1.0 unless given), which Axolotl leaves in place
        alpha = m.pop("cpo_alpha")
        m.out["cpo_alpha"] = 1.0 if alpha is None else alpha
    m.take("kto_desirable_weight", "desirable_weight")
    m.take("kto_undesirable_weight", "undesirable_weight")


def _axolotl_preference_dataset(m: _Mapper, datasets: Any) -> None:
    """One preference dataset: its path, and its type's columns (field_prompt / field_chosen / field_rejected /
    field_system, or chat_template.default's field_messages, override them)."""
    if not datasets or not isinstance(datasets, list) or not all(isinstance(d, Mapping) for d in datasets):
        raise m.error("datasets", "expected a list with one {path, type} entry")
    if len(datasets) > 1:
        raise m.error(
            "datasets", f"{len(datasets)} datasets given; jaxsloth trains on one: concatenate them into one file"
        )
    entry = dict(datasets[0])
    if not entry.get("path"):
        raise m.error("datasets[0].path", "missing")
    m.out["data"] = entry.pop("data_files", None) or entry.pop("path")
    entry.pop("path", None)
    kind = entry.pop("type", None)
    columns: tuple = ("prompt", "chosen", "rejected", None)
    if kind is not None:
        prefix, _, name = str(kind).partition(".")
        if prefix in ("chatml", "llama3") and name in _AXOLOTL_PREFERENCE_TYPES:
            columns = _AXOLOTL_PREFERENCE_TYPES[name]
            m.out["chat_answers"] = True
        elif kind == "chat_template.default":
            columns = (entry.pop("field_messages", None) or "messages", "chosen", "rejected", None)
            for key in ("role", "content"):
                mapped = (entry.get("message_property_mappings") or {}).get(key, key)
                if mapped != key:
                    raise m.error(f"datasets[0].message_property_mappings.{key}", f"{mapped!r}: jaxsloth reads "
                                  f"turns' {key}; rename the field in the data")  # fmt: skip
            entry.pop("message_property_mappings", None)
        else:
            types = [f"{p}.{n}" for p in ("chatml", "llama3") for n in _AXOLOTL_PREFERENCE_TYPES]
            raise m.error("datasets[0].type", f"{kind!r} is not supported for rl; jaxsloth reads: "
                          f"{', '.join(types)}, chat_template.default (or leave type out for TRL's columns)")  # fmt: skip
    prompt, chosen, rejected, system = columns
    names = {"prompt_field": ("field_prompt", prompt), "chosen_field": ("field_chosen", chosen),
             "rejected_field": ("field_rejected", rejected), "system_field": ("field_system", system)}  # fmt: skip
    if m.out["method"] == "kto":  # unpaired rows: prompt, completion, label
        names = {k: v for k, v in names.items() if k in ("prompt_field", "system_field")}
    for setting, (key, default) in names.items():
        value = entry.pop(key, None) or default
        if value != _SCHEMA_COLUMNS[setting]:
            m.out[setting] = value
    for key in ("field_chosen", "field_rejected"):
        entry.pop(key, None)
    if entry.get("split") is not None:
        m.out["split"] = entry.pop("split")
    if entry.get("name") is not None:
        m.out["dataset_config"] = entry.pop("name")
    m.ignored += [f"datasets[0].{k}" for k, v in entry.items() if v not in (None, False, 0, "", [], {})]


# --- LLaMA-Factory -------------------------------------------------------------------------------------------------

_FACTORY_SAME = (
    "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "num_train_epochs", "max_steps",
    "warmup_ratio", "warmup_steps", "output_dir", "save_steps", "seed", "weight_decay", "max_grad_norm", "lora_alpha",
    "lora_dropout", "use_rslora", "packing", "eval_steps", "eval_strategy", "per_device_eval_batch_size",
    "load_best_model_at_end",
)  # fmt: skip
# dataset_info.json columns each formatting reads, under the names jaxsloth's alpaca / sharegpt formats read.
_FACTORY_COLUMNS = {
    "alpaca": {"prompt": ("instruction",), "query": ("input",), "response": ("output",)},
    "sharegpt": {"messages": ("conversations", "messages")},
}

_FACTORY_TAGS = {
    "role_tag": ("from", "role"),
    "content_tag": ("value", "content"),
    "user_tag": ("human", "user"),
    "assistant_tag": ("gpt", "assistant"),
    "system_tag": ("system",),
}


def _llamafactory(m: _Mapper) -> None:
    m.take("model_name_or_path", "model")
    stage = m.pop("stage", "sft")
    if stage not in ("sft", "pt", "dpo", "kto"):
        raise m.error("stage", f"{stage!r}: jaxsloth trains stage sft, pt, dpo or kto")
    if stage in ("dpo", "kto"):
        _factory_preference(m, stage)
    kind = m.pop("finetuning_type", "lora")
    if kind != "lora":
        raise m.error("finetuning_type", f"{kind!r} is not supported yet; jaxsloth trains LoRA adapters (lora)")
    for key in _FACTORY_SAME:
        m.take(key)
    m.take("lora_rank", "r")
    m.take("val_size", "val_set_size")
    m.take("cutoff_len", "max_seq_length")
    m.take("lr_scheduler_type", convert=_schedule(m, "lr_scheduler_type"))
    m.take("train_on_prompt", "train_on_inputs")
    m.take("overwrite_output_dir", "overwrite")
    m.take("resume_from_checkpoint", "resume")
    if m.out.get("resume"):  # as in LLaMA-Factory, an asked-for resume wins over overwrite_output_dir
        m.out.pop("overwrite", None)
    m.take("preprocessing_num_workers", "dataset_num_proc")
    m.take("lora_target", "target_modules", lambda v: _targets(m, "lora_target", v))
    m.take("run_name")
    if m.raw.get("report_to") is not None:
        m.out["report_to"], others = split_foreign_report_to(m.pop("report_to"))
        m.ignored += [f"report_to: {name}" for name in others]
    # LLaMA-Factory's defaults where they differ from jaxsloth's: rank 8, alpha twice the rank, and transformers'
    # 3 epochs.
    m.out.setdefault("r", 8)
    m.out.setdefault("lora_alpha", 2 * m.out["r"])
    if "max_steps" not in m.out or m.out["max_steps"] <= 0:
        m.out.setdefault("num_train_epochs", 3)
    bits = m.pop("quantization_bit")
    if bits not in (None, 4):
        raise m.error("quantization_bit", f"{bits}: jaxsloth quantizes to 4 bits (NF4) only")
    if bits == 4:
        m.out["load_in_4bit"] = True
    _dtype(m)
    _factory_dataset(m, m.pop("dataset"), m.pop("dataset_dir", "data"), stage)
    m.ignore_rest()


# LLaMA-Factory's pref_loss -> (method, DPO loss_type).
_FACTORY_LOSSES = {"sigmoid": ("dpo", "sigmoid"), "ipo": ("dpo", "ipo"), "hinge": ("dpo", "hinge"),
                   "orpo": ("orpo", None), "simpo": ("simpo", None)}  # fmt: skip


def _factory_preference(m: _Mapper, stage: str) -> None:
    """stage: dpo (pref_loss: sigmoid, ipo, hinge, orpo, simpo) or kto, with pref_beta, simpo_gamma, pref_ftx (the
    SFT loss weight: SimPO's cpo_alpha), kto_chosen_weight / kto_rejected_weight and ref_model."""
    m.take("pref_beta", "beta")
    m.take("ref_model")
    ftx = m.pop("pref_ftx") or 0.0
    if stage == "kto":
        m.out["method"] = "kto"
        m.take("kto_chosen_weight", "desirable_weight")
        m.take("kto_rejected_weight", "undesirable_weight")
        m.pop("pref_loss")
    else:
        loss = m.pop("pref_loss", "sigmoid")
        if loss not in _FACTORY_LOSSES:
            raise m.error("pref_loss", f"{loss!r} is not supported; jaxsloth trains: {', '.join(_FACTORY_LOSSES)}")
        m.out["method"], loss_type = _FACTORY_LOSSES[loss]
        if loss_type:
            m.out["loss_type"] = loss_type
        m.take("simpo_gamma")
        if m.out["method"] == "simpo":
            m.out["cpo_alpha"] = ftx
            ftx = 0.0
        m.take("dpo_label_smoothing", "label_smoothing")
    if ftx:
        raise m.error("pref_ftx", f"{ftx}: an SFT loss added to {m.out['method']} is not supported (SimPO's only)")


def _factory_dataset(m: _Mapper, names: Any, dataset_dir: str, stage: str) -> None:
    if not names:
        raise m.error("dataset", "no dataset given")
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    if len(names) > 1:
        raise m.error("dataset", f"{len(names)} datasets given; jaxsloth trains on one: concatenate them into one file")
    name = names[0]
    folder = Path(dataset_dir) if Path(dataset_dir).is_absolute() else m.path.parent / dataset_dir
    if not (folder / "dataset_info.json").is_file():
        if not Path(dataset_dir).is_absolute() and Path(dataset_dir, "dataset_info.json").is_file():
            folder = Path(dataset_dir)  # relative to the working directory, as LLaMA-Factory reads it
        elif Path(name).is_file():
            m.out["data"] = name
            return
        else:
            raise m.error("dataset", f"{name!r} is neither a file nor listed in {folder / 'dataset_info.json'} "
                          "(not found); give the data file's path as dataset:")  # fmt: skip
    info = json.loads((folder / "dataset_info.json").read_text())
    if name not in info:
        raise m.error(
            "dataset", f"{name!r} is not in {folder / 'dataset_info.json'}; give a name it lists or a file path"
        )
    entry = info[name]
    where = f"{folder / 'dataset_info.json'}: {name}"
    if entry.get("file_name"):
        m.out["data"] = str(folder / entry["file_name"])
    elif entry.get("hf_hub_url"):
        m.out["data"] = entry["hf_hub_url"]
        if entry.get("subset"):
            m.out["dataset_config"] = entry["subset"]
        if entry.get("split"):
            m.out["split"] = entry["split"]
    else:
        raise ValueError(f"{where}: needs file_name or hf_hub_url; give the data file's path as dataset:")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in _FACTORY_COLUMNS:
        raise ValueError(f"{where}: formatting {formatting!r} is not supported (alpaca or sharegpt)")
    columns = dict(entry.get("columns") or {})
    if stage in ("dpo", "kto"):
        _factory_preference_columns(m, where, formatting, columns, stage)
    elif stage == "pt":
        m.out["format"], m.out["dataset_text_field"] = "text", columns.pop("prompt", "text")
    else:
        m.out["format"] = "alpaca" if formatting == "alpaca" else "messages"
        for role, column in columns.items():
            if column not in _FACTORY_COLUMNS[formatting].get(role, ()):
                raise ValueError(f"{where}: column {role}={column!r} is not supported; jaxsloth's {formatting} format "
                                 f"reads {_FACTORY_COLUMNS[formatting]}: rename the column in the data")  # fmt: skip
    tags = entry.get("tags") or {}
    for tag, column in tags.items():
        if column not in _FACTORY_TAGS.get(tag, ()):
            raise ValueError(f"{where}: tag {tag}={column!r} is not supported; jaxsloth reads from/value or "
                             "role/content turns with human/gpt or user/assistant roles")  # fmt: skip


def _factory_preference_columns(m: _Mapper, where: str, formatting: str, columns: dict, stage: str) -> None:
    """A ranking dataset's columns: alpaca's prompt (a user turn) or sharegpt's conversation, and the chosen and
    rejected answers, formatted by the tokenizer's chat template as LLaMA-Factory's template formats them."""
    if stage == "kto":
        if columns:
            raise ValueError(f"{where}: stage kto reads TRL's prompt/completion/label columns; leave columns out")
        return
    prompt = (
        columns.pop("prompt", "instruction") if formatting == "alpaca" else columns.pop("messages", "conversations")
    )
    if columns.pop("query", None):
        raise ValueError(f"{where}: column query (the alpaca input appended to the prompt) is not supported for "
                         "ranking data: join it into the prompt column")  # fmt: skip
    m.out.update(prompt_field=prompt, chat_answers=True)
    for role in ("chosen", "rejected", "system"):
        column = columns.pop(role, None)
        if column is not None:
            m.out[f"{role}_field"] = column
    if columns:
        raise ValueError(f"{where}: columns {sorted(columns)} are not supported for ranking data (prompt / messages, "
                         "chosen, rejected, system)")  # fmt: skip
