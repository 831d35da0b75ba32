"""The one settings schema: every setting of ``jaxsloth.load``, ``jaxsloth.add_lora`` and ``jaxsloth.train`` (and so
of ``jaxsloth train``) is one field of a frozen dataclass here, with its type, default and help.

    LoadConfig   the model and its GPU profile           jaxsloth.load(path, **settings)
    LoraConfig   the adapter, in PEFT's names            jaxsloth.add_lora(model, **settings)
    TrainConfig  the run, in transformers' / TRL's names jaxsloth.train(model, tokenizer, data, **settings)

The API keywords, the YAML keys and the ``jaxsloth train`` flags (``learning_rate`` -> ``--learning-rate``) are all
derived from these fields, so a setting is added in one place: one ``setting(default, "help", ...)`` field. Values are
coerced and checked in ``__post_init__`` however they arrive (a negative learning rate fails in the API, the YAML file
and the CLI alike). Old spellings (``lr``, ``epochs``, ``lora_r``, ...) keep working everywhere with a FutureWarning
naming the new one; an unknown name is an error naming the closest known one.

The GPU-profile overrides (``remat``, ``attention``, ...) are not restated: LoadConfig has one field per field of
``Profile`` and per op of ``KernelChoice``, documented from the Profile docstring's ``name: text;`` entries.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import inspect
import math
import os
import re
import types
import typing
import warnings
from collections.abc import Callable, Iterable, Mapping

import jax.numpy as jnp
from jax.sharding import Mesh

from jaxsloth import ops
from jaxsloth.data.formats import FORMATS, resolve_format
from jaxsloth.models.decoder import LAYER_LOOPS, LINEARS, REMAT_POLICIES, LoraRuntime
from jaxsloth.profiles import EMBEDDING_PLACES, LONG_CONTEXT, PROFILES, Profile, profile_for_device
from jaxsloth.train.optim8bit import OPTIMIZER_STATES

SCHEDULES = ("linear", "cosine", "constant")
# Experiment trackers report_to can name (jaxsloth.train.trackers), as transformers names them.
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
REPORT_TO_CHOICES = (*TRACKERS, "all", "none")
METHODS = ("sft", "dpo", "orpo", "simpo", "kto", "grpo")
DTYPES = ("bfloat16", "float16", "float32")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")  # TRL's GRPOConfig.loss_type
GRPO_SCALE_REWARDS = ("group", "batch", "none")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_SYNONYMS: set[str] = set()  # every setting's synonyms (see ``setting``)


def setting(
    default,
    help: str,
    *,
    aliases: Iterable[str] = (),
    synonyms: Iterable[str] = (),
    choices: Iterable[str] | None = None,
    minimum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    maximum: float | None = None,
    default_help: str | None = None,
    cli_default=None,
    positional: bool = False,
    convert: Callable | None = None,
):
    """A settings field. help: its one-line doc (CLI help, API docstring); aliases: old spellings, accepted with a
    FutureWarning; synonyms: other libraries' names for it (TRL's), accepted without a warning; choices: every
    accepted value; minimum/maximum (inclusive), above/below (exclusive): its range;
    default_help: how help words a None default; cli_default: the ``jaxsloth train`` default where it differs from
    the API's; positional: the API takes it as a positional argument, not a keyword; convert: normalizes a value
    before it is checked."""
    meta = {
        "help": help,
        "aliases": tuple(aliases),
        "synonyms": tuple(synonyms),
        "choices": None if choices is None else tuple(choices),
        "range": (minimum, above, below, maximum),
        "default_help": default_help,
        "cli_default": cli_default,
        "positional": positional,
        "convert": convert,
    }
    _SYNONYMS.update(synonyms)
    return dataclasses.field(default=default, metadata=meta)


class Settings:
    """Base of the schema dataclasses: after ``__init__`` every field is coerced to its type (an int where a float
    goes, "2e-4" from YAML, a list of names as a tuple) and checked against its choices and range, then ``_validate``
    checks what involves several fields."""

    title = "settings"

    def __post_init__(self):
        hints = _type_hints(type(self))
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f, hints[f.name], getattr(self, f.name)))
        self._validate()

    def _validate(self) -> None:
        """Checks across fields (subclasses)."""

    @classmethod
    def api_fields(cls) -> tuple[dataclasses.Field, ...]:
        """The fields the Python API takes as keywords."""
        return tuple(f for f in dataclasses.fields(cls) if not f.metadata["positional"])


def schema(cls):
    """Makes ``cls`` a frozen settings dataclass whose constructor also takes the fields' old spellings."""
    cls = dataclasses.dataclass(frozen=True)(cls) if not dataclasses.is_dataclass(cls) else cls
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        names, given = spellings((cls,)), {}
        for key, value in kwargs.items():
            name = resolve_name(key, names, cls.__name__)
            if name in given:
                raise ValueError(f"{cls.__name__}: {name} given twice (once as {key!r})")
            given[name] = value
        init(self, *args, **given)

    cls.__init__ = __init__
    return cls


# --- names -------------------------------------------------------------------------------------------------------


def spellings(schemas: Iterable[type]) -> dict[str, str]:
    """Every accepted name (field names and their old spellings) -> its field name."""
    names: dict[str, str] = {}
    for cls in schemas:
        for f in dataclasses.fields(cls):
            for name in (f.name, *f.metadata["aliases"], *f.metadata["synonyms"]):
                if names.setdefault(name, f.name) != f.name:
                    raise TypeError(f"setting name {name!r} is defined twice")
    return names


def resolve_name(name: str, names: Mapping[str, str], where: str, spell: Callable[[str], str] = str) -> str:
    """The field ``name`` stands for (``-`` read as ``_``). An old spelling warns (FutureWarning naming the new one);
    an unknown name raises ValueError naming the closest known one. where: what messages start with (a file, a
    class); spell: how they write a name (a flag)."""
    key = str(name).replace("-", "_")
    where = f"{where}: " if where else ""
    if key not in names:
        close = difflib.get_close_matches(key, list(names), n=1)
        hint = (
            f"did you mean {spell(names[close[0]])!r}?" if close else f"known: {', '.join(sorted(set(names.values())))}"
        )
        raise ValueError(f"{where}unknown setting {spell(key)!r}; {hint}")
    if names[key] != key and key not in _SYNONYMS:
        warnings.warn(
            f"{where}{spell(key)!r} is deprecated; use {spell(names[key])!r}",
            FutureWarning,
            skip_file_prefixes=(_PACKAGE_DIR,),
        )
    return names[key]


# --- values ------------------------------------------------------------------------------------------------------


@functools.cache
def _type_hints(cls) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _members(tp) -> tuple:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return typing.get_args(tp)
    return (tp,)


def _type_name(tp) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    parts = [
        "a list of names" if typing.get_origin(m) is tuple else names.get(m, getattr(m, "__name__", str(m)))
        for m in _members(tp)
        if m is not type(None)
    ]
    return " or ".join(parts)


def _as_member(m, value):
    """``value`` as type ``m``, or None when it is not one."""
    if typing.get_origin(m) is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(value)
        return None
    if isinstance(value, bool):
        return value if m is bool else None
    if m is int:
        if isinstance(value, float) and value.is_integer():  # num_train_epochs: 3.0, as transformers writes it
            return int(value)
        return value if isinstance(value, int) else None
    if m is float:
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads "2e-4" (no dot) as a string
                return float(value)
            except ValueError:
                return None
        return None
    return value if isinstance(value, m) else None


def _coerce(f: dataclasses.Field, tp, value):
    if value is None:
        if type(None) in _members(tp):
            return None
        raise ValueError(f"{f.name} must be {_type_name(tp)}, got None")
    if f.metadata["convert"] is not None:
        value = f.metadata["convert"](value)
    for m in _members(tp):
        if m is type(None):
            continue
        got = _as_member(m, value)
        if got is not None:
            value = got
            break
    else:
        raise ValueError(f"{f.name} must be {_type_name(tp)}, got {value!r}")
    choices = f.metadata["choices"]
    if choices is not None:
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, str) and v not in choices:
                raise ValueError(f"unknown {f.name} {v!r}; choose one of: {', '.join(choices)}")
    minimum, above, below, maximum = f.metadata["range"]
    if isinstance(value, int | float) and not isinstance(value, bool):
        for bound, ok, word in (
            (minimum, lambda b: value >= b, ">="),
            (above, lambda b: value > b, ">"),
            (below, lambda b: value < b, "<"),
            (maximum, lambda b: value <= b, "<="),
        ):
            if bound is not None and not ok(bound):  # (NaN fails every bound)
                raise ValueError(f"{f.name} must be {word} {bound}, got {value}")
    return value


# --- the schema --------------------------------------------------------------------------------------------------


def _dtype_name(value) -> str:
    try:
        return jnp.dtype(value).name
    except TypeError:
        return value  # not a dtype: the choices check names it


def _as_tuple(value):
    """One item or a list (or a comma-separated string, as the CLI gives it) as a tuple."""
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return tuple(value) if isinstance(value, list | tuple) else (value,)


def _reward_weights(value):
    """reward_weights (a list, or a comma-separated string) as a tuple of floats."""
    try:
        return tuple(float(v) for v in _as_tuple(value))
    except (TypeError, ValueError):
        raise ValueError(f"reward_weights must be numbers, got {value!r}") from None


def _known_format(value):
    """``value`` unchanged once the data layer knows it (it raises naming the formats it reads)."""
    if isinstance(value, str) and value != "auto":
        resolve_format(value, {})
    return value


def _kernel_pairs(value) -> str:
    """A mapping {op: impl} (YAML) as the flag's "op=impl,..." string."""
    if isinstance(value, Mapping):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return value


def kernel_choices(op: str) -> tuple[str, ...]:
    """The implementations KernelChoice accepts for ``op`` (glu: those both swiglu and geglu have)."""
    impls = ops._IMPLEMENTATIONS  # the dispatch table is the one list of implementations
    names = ("swiglu", "geglu") if op == "glu" else (op,)
    return tuple(k for k in impls[names[0]] if all(k in impls[n] for n in names))


def parse_kernels(spec: str | None) -> dict[str, str]:
    """ "attention=pallas,glu=reference" -> {"attention": "pallas", "glu": "reference"}, each op and implementation
    checked."""
    out = {}
    for pair in (spec or "").split(","):
        if not pair.strip():
            continue
        op, sep, impl = (s.strip() for s in pair.partition("="))
        if not sep:
            raise ValueError(f"kernels: expected op=impl pairs, got {pair!r}")
        if op not in ops.KERNEL_OPS:
            raise ValueError(f"kernels: unknown op {op!r}; ops: {', '.join(ops.KERNEL_OPS)}")
        if impl not in kernel_choices(op):
            raise ValueError(
                f"kernels: unknown {op} implementation {impl!r}; choose one of: {', '.join(kernel_choices(op))}"
            )
        out[op] = impl
    return out


def _profile_doc(name: str) -> str:
    """Field ``name``'s entry in the Profile docstring ("name: text; other: ..."), without its parentheticals."""
    names = "|".join(re.escape(f.name) for f in dataclasses.fields(Profile))
    doc = " ".join((Profile.__doc__ or "").split())
    m = re.search(rf"(?:^|[;.] ){re.escape(name)}: (.*?)(?=; (?:{names}): |$)", doc)
    if m is None:
        return f"the profile's {name}"
    text = m.group(1)
    while re.search(r"\([^()]*\)", text):
        text = re.sub(r"\s*\([^()]*\)", "", text)
    return text.replace("``", "").rstrip(".; ")


# Profile fields set through other settings; every other Profile field is an override of its own.
_PROFILE_FIELDS_ELSEWHERE = {
    "name": "profile",
    "compute_dtype": "dtype",
    "kernels": "kernels and the per-op fields",
    "micro_batch": "per_device_train_batch_size",
}
_PROFILE_CHOICES = {
    "remat": REMAT_POLICIES,
    "layer_loop": LAYER_LOOPS,
    "optimizer_state": OPTIMIZER_STATES,
    "embedding": EMBEDDING_PLACES,
}


def _override_fields() -> list[tuple]:
    """LoadConfig's profile-override fields: one per simple Profile field, one per KernelChoice op; None = the
    profile's."""
    hints = typing.get_type_hints(Profile)
    out = []
    for f in dataclasses.fields(Profile):
        kinds = [m for m in _members(hints[f.name]) if m is not type(None)]
        if f.name in _PROFILE_FIELDS_ELSEWHERE or len(kinds) != 1 or kinds[0] not in (int, float, str, bool):
            continue
        help = f"profile override: {_profile_doc(f.name)}"
        field = setting(None, help, choices=_PROFILE_CHOICES.get(f.name), default_help="the profile's")
        out.append((f.name, kinds[0] | None, field))
    for op in ops.KERNEL_OPS:
        field = setting(None, f"kernel for the {op} op", choices=kernel_choices(op), default_help="the profile's")
        out.append((op, str | None, field))
    return out


@dataclasses.dataclass(frozen=True)
class _LoadFields(Settings):
    """The model to load and the GPU profile to run it with (LoadConfig adds the per-field profile overrides)."""

    title = "model and GPU profile"

    model: str | None = setting(
        None, "Hugging Face model directory or Hub id (org/name; token from HF_TOKEN)", positional=True
    )
    revision: str | None = setting(None, "branch, tag or commit of a Hub model", default_help="main")
    tokenizer: str | None = setting(
        None, "tokenizer directory or Hub id, when the model has none", default_help="the model's own"
    )
    load_in_4bit: bool = setting(False, "QLoRA: quantize the frozen weights to NF4 while loading")
    full_finetuning: bool = setting(
        False, "train every weight, no adapter (16-bit weights; optimizer_state 8bit shrinks the AdamW moments)"
    )
    max_seq_length: int = setting(2048, "tokens per packed row; longer examples are truncated", minimum=1)
    dtype: str | None = setting(
        None,
        "compute dtype of activations and frozen weights",
        choices=DTYPES,
        default_help="the profile's, bfloat16 on GPUs",
        convert=_dtype_name,
    )
    profile: str | Profile | None = setting(
        None, "GPU profile (a name, or a Profile in Python)", choices=tuple(PROFILES), default_help="from the device"
    )
    long_context: bool = setting(
        False,
        "long-sequence settings: offloaded per-layer checkpoints, MLP and loss in tiles (jaxsloth.train.memory); "
        "the other overrides apply on top",
    )
    kernels: str | None = setting(
        None, "several kernel overrides at once: op=impl pairs, e.g. attention=pallas,glu=reference",
        convert=_kernel_pairs,
    )  # fmt: skip

    def _validate(self) -> None:
        if self.full_finetuning and self.load_in_4bit:
            raise ValueError(
                "full_finetuning=True trains every weight and load_in_4bit=True freezes them in NF4: choose one"
            )
        both = set(parse_kernels(self.kernels)) & {op for op in ops.KERNEL_OPS if getattr(self, op) is not None}
        if both:
            raise ValueError(f"kernel for {sorted(both)[0]} given twice: in kernels and as its own setting")

    def profile_overrides(self) -> dict:
        """The Profile / KernelChoice fields these settings override."""
        out = dict(LONG_CONTEXT) if self.long_context else {}
        out.update(parse_kernels(self.kernels))
        given = {name: getattr(self, name) for name in (*PROFILE_OVERRIDES, *ops.KERNEL_OPS)}
        out.update({k: v for k, v in given.items() if v is not None})
        return out

    def build_profile(self) -> Profile:
        """The profile to run with: named (or the device's), with every override and the dtype applied."""
        overrides = self.profile_overrides()
        if isinstance(self.profile, Profile):
            prof = self.profile.replace(**overrides)
        else:
            prof = profile_for_device(name=self.profile, **overrides)
        return prof if self.dtype is None else prof.replace(compute_dtype=self.dtype)


_OVERRIDES = _override_fields()
PROFILE_OVERRIDES = tuple(name for name, _, _ in _OVERRIDES if name not in ops.KERNEL_OPS)
LoadConfig = schema(
    dataclasses.make_dataclass(
        "LoadConfig",
        _OVERRIDES,
        bases=(_LoadFields,),
        frozen=True,
        module=__name__,
        namespace={"__doc__": "The model to load and the GPU profile to run it with, each profile field overridable."},
    )
)


@schema
class LoraConfig(Settings):
    """A LoRA adapter, in PEFT's names: the layer computes ``x @ W^T + scale * (dropout(x) @ A^T) @ B^T`` with
    scale = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora."""

    title = "LoRA adapter"

    r: int = setting(16, "LoRA rank", aliases=("lora_r",), minimum=1)
    lora_alpha: float = setting(
        16.0, "LoRA alpha: scale alpha / r, or alpha / sqrt(r) with use_rslora", aliases=("alpha",)
    )
    lora_dropout: float = setting(0.0, "dropout on the LoRA input", aliases=("dropout",), minimum=0.0, below=1.0)
    target_modules: tuple[str, ...] = setting(
        LINEARS, "projections to adapt", choices=LINEARS, default_help="every projection"
    )
    use_rslora: bool = setting(False, "rank-stabilised LoRA: scale alpha / sqrt(r) (Kalajdzievski 2023)")
    train_embeddings: bool = setting(False, "also train a full copy of the input embeddings (continued pretraining)")
    train_lm_head: bool = setting(False, "also train a full copy of the LM head (continued pretraining)")
    embedding_learning_rate: float | None = setting(
        None,
        "learning rate of the trained embeddings / LM head (as Unsloth's)",
        aliases=("embedding_lr",),
        above=0.0,
        default_help="learning_rate",
    )

    def _validate(self) -> None:
        if not self.target_modules:
            raise ValueError(f"target_modules is empty; choose from: {', '.join(LINEARS)}")

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def runtime(self) -> LoraRuntime:
        return LoraRuntime(scale=self.scale, dropout=self.lora_dropout)


@schema
class TrainConfig(Settings):
    """A training run, in transformers' TrainingArguments / TRL's SFTConfig names. Linear warmup from 0 over
    warmup_steps (or warmup_ratio of the run), then lr_scheduler_type to 0 at max_steps; AdamW with weight decay
    on matrices; global-norm clipping; loss averaged over every counted token of the accumulated micro-batches."""

    title = "training"

    data: str | None = setting(
        None,
        "training data: a .jsonl/.json/.parquet/.csv/.arrow/.txt file, a dataset folder or a Hub dataset id",
        positional=True,
    )
    split: str = setting("train", "dataset split to train on (files and folders: train)")
    dataset_config: str | None = setting(None, "dataset configuration name (load_dataset's name=)")
    streaming: bool = setting(False, "stream the dataset in order instead of loading it whole (needs max_steps)")
    dataset_num_proc: int | None = setting(None, "processes tokenizing the dataset", minimum=1, default_help="1")
    dataset_text_field: str | None = setting(None, "train on the raw text of this column (format text)")
    format: str = setting(
        "auto",
        f"data format: auto (from the first row's keys), {', '.join(FORMATS)} (sharegpt and other aliases too)",
        convert=_known_format,
    )
    output_dir: str | os.PathLike | None = setting(
        None,
        "checkpoints, metrics.jsonl, tensorboard/, loss.png (and the CLI's adapter/)",
        default_help="nothing written",
        cli_default="jaxsloth-run",
    )
    report_to: tuple[str, ...] = setting(
        ("tensorboard",),
        "experiment trackers logging the settings and each step's metrics (all: every one installed; none: only "
        "metrics.jsonl and loss.png); wandb, mlflow and trackio are extras: pip install 'jaxsloth[wandb]'",
        choices=REPORT_TO_CHOICES,
    )
    run_name: str | None = setting(None, "the run's name in wandb, mlflow and trackio", default_help="theirs")
    project: str | None = setting(
        None,
        "wandb / trackio project and MLflow experiment",
        default_help="WANDB_PROJECT / TRACKIO_PROJECT / MLFLOW_EXPERIMENT_NAME, else jaxsloth",
    )
    max_steps: int | None = setting(
        None, "optimizer steps", aliases=("total_steps",), minimum=1, default_help="num_train_epochs over the data"
    )
    num_train_epochs: int | None = setting(
        None, "epochs over the data when max_steps is not given", aliases=("epochs", "num_epochs"), minimum=1,
        default_help="1",
    )  # fmt: skip
    per_device_train_batch_size: int | None = setting(
        None,
        "sequences per micro-batch per data-parallel rank (each of data x fsdp devices)",
        aliases=("batch_size",),
        minimum=1,
        default_help="the profile's",
    )
    gradient_accumulation_steps: int = setting(
        1, "micro-batches per optimizer step", aliases=("grad_accum",), minimum=1
    )
    learning_rate: float = setting(2e-4, "peak learning rate", aliases=("lr",), above=0.0)
    lr_scheduler_type: str = setting(
        "linear", "learning-rate decay after warmup", aliases=("schedule",), choices=SCHEDULES
    )
    warmup_steps: int = setting(0, "linear warmup steps from 0", aliases=("warmup",), minimum=0)
    warmup_ratio: float = setting(
        0.0, "warmup as a fraction of max_steps (instead of warmup_steps)", minimum=0.0, maximum=1.0
    )
    weight_decay: float = setting(0.0, "AdamW weight decay (matrices only)", minimum=0.0)
    max_grad_norm: float | None = setting(1.0, "gradient clipping by global norm (0 or None: off)", minimum=0.0)
    adam_beta1: float = setting(0.9, "AdamW beta1", aliases=("adam_b1",), minimum=0.0, below=1.0)
    adam_beta2: float = setting(0.999, "AdamW beta2", aliases=("adam_b2",), minimum=0.0, below=1.0)
    adam_epsilon: float = setting(1e-8, "AdamW epsilon", aliases=("adam_eps",), above=0.0)
    packing: bool = setting(True, "pack several examples per row", aliases=("pack",))
    train_on_inputs: bool = setting(False, "also train on prompts / user turns")
    save_steps: int = setting(
        500,
        "checkpoint every N steps (0: no step interval); besides, every 30 minutes, at the end and on Ctrl-C / SIGTERM",
        aliases=("save_every",),
        minimum=0,
    )
    save_total_limit: int = setting(3, "checkpoints kept: the latest N (and the best evaluated step)", minimum=1)
    resume: bool | str | os.PathLike = setting(
        False,
        "continue the run in output_dir from its latest checkpoint (none there: start fresh), or from the checkpoint "
        "directory given (output_dir/checkpoints/<step>; flag: --resume-from-checkpoint PATH)",
        synonyms=("resume_from_checkpoint",),
    )
    overwrite: bool = setting(
        False, "start fresh in an output_dir that holds another run (its checkpoints, metrics and adapter are removed)"
    )
    on_nonfinite: str = setting(
        "stop", "on a NaN/Inf loss: stop (naming the step) or skip the update", choices=("stop", "skip")
    )
    seed: int = setting(0, "seed for data order and dropout (and, in the CLI, LoRA init)")
    mesh: str | Mesh | None = setting(
        None,
        "device mesh, e.g. data=2,fsdp=4 (context=N splits each sequence)",
        default_help="every device data-parallel",
    )
    shard_lora: bool = setting(False, "also shard LoRA and optimizer state over the fsdp axis")
    eval_dataset: str | object | None = setting(
        None,
        "evaluation data, read like data: a file, a dataset folder or a Hub dataset id (in Python also a list of "
        "records or a datasets.Dataset)",
    )
    eval_split: str | None = setting(None, "dataset split of eval_dataset", default_help="split")
    val_set_size: float = setting(
        0.0,
        "hold out training examples for evaluation, chosen by seed: a fraction (0 < x < 1) or a count (>= 1)",
        minimum=0.0,
    )
    eval_strategy: str = setting(
        "steps",
        "with eval data: evaluate every eval_steps and at the end (steps), or never during training (no)",
        aliases=("evaluation_strategy",),
        choices=("steps", "no"),
    )
    eval_steps: int | None = setting(None, "evaluate every N steps", minimum=1, default_help="only at the end")
    per_device_eval_batch_size: int | None = setting(
        None, "sequences per evaluation batch per data-parallel rank", minimum=1,
        default_help="per_device_train_batch_size",
    )  # fmt: skip
    eval_prompts: tuple[str, ...] = setting(
        (),
        "prompts answered greedily at each evaluation, logged as eval_samples (a user turn of the chat template when "
        "the data is conversations; the CLI takes one)",
        default_help="none",
        convert=lambda v: (v,) if isinstance(v, str) else v,
    )  # fmt: skip
    eval_max_new_tokens: int = setting(32, "tokens generated per eval prompt", minimum=1)
    early_stopping_patience: int | None = setting(
        None,
        "stop after this many evaluations in a row without eval_loss improving on the best by more than "
        "early_stopping_threshold",
        minimum=1,
        default_help="never",
    )
    early_stopping_threshold: float = setting(0.0, "least eval_loss improvement that counts", minimum=0.0)
    load_best_model_at_end: bool = setting(
        False, "end with the adapter of the step with the lowest eval_loss (its checkpoint is never rotated away)"
    )
    # Preference tuning (jaxsloth.methods), in TRL's names and with its defaults (DPOConfig, CPOConfig, KTOConfig).
    method: str = setting(
        "sft", "sft, preference tuning: dpo, orpo, simpo (TRL's CPO loss), kto, or grpo (rewards)", choices=METHODS
    )
    beta: float | None = setting(
        None, "preference methods: beta (DPO/SimPO/KTO temperature; ORPO's lambda); grpo: KL coefficient (0: none)",
        minimum=0.0, default_help="0.1; grpo: 0.0",
    )  # fmt: skip
    loss_type: str | None = setting(
        None, "DPO loss: sigmoid, ipo or hinge; grpo: grpo, bnpo, dr_grpo or dapo",
        choices=(*DPO_LOSS_TYPES, *GRPO_LOSS_TYPES), default_help="sigmoid; grpo: dapo",
    )  # fmt: skip
    label_smoothing: float = setting(
        0.0, "DPO / SimPO: probability that a pair's labels are flipped (cDPO)", minimum=0.0, below=0.5
    )
    simpo_gamma: float = setting(0.5, "SimPO target reward margin", minimum=0.0)
    cpo_alpha: float = setting(0.0, "SimPO: weight of the chosen NLL added to the loss (CPO-SimPO)", minimum=0.0)
    desirable_weight: float = setting(1.0, "KTO: weight of desirable examples' losses", above=0.0)
    undesirable_weight: float = setting(1.0, "KTO: weight of undesirable examples' losses", above=0.0)
    precompute_ref_log_probs: bool = setting(
        False, "DPO / KTO: compute the reference log-probs once before training instead of in every step"
    )
    ref_model: str | object | None = setting(
        None,
        "DPO / KTO: the reference model, a model directory or Hub id (in Python also a jaxsloth Model), sharing the "
        "policy's tokenizer",
        default_help="the policy with its adapter off; with full fine-tuning, a frozen copy of the initial weights",
    )
    prompt_field: str = setting("prompt", "preference data: the column holding the prompt")
    chosen_field: str = setting("chosen", "preference data: the column holding the chosen answer")
    rejected_field: str = setting("rejected", "preference data: the column holding the rejected answer")
    system_field: str | None = setting(
        None, "preference data: a column holding a system prompt, a system turn before a conversational prompt"
    )
    chat_answers: bool = setting(
        False,
        "preference data: string prompts and answers become a user turn and assistant turns, formatted by the "
        "tokenizer's chat template (Axolotl's chatml.* and llama3.* types)",
    )
    # GRPO (jaxsloth.methods.grpo_train), in TRL's GRPOConfig names and with its defaults; beta and loss_type above.
    reward_funcs: tuple[str, ...] | object = setting(
        (), "grpo: reward functions, each a built-in (exact_answer, format) or module.path:function (TRL's signature; "
        "imported from the YAML file's folder or PYTHONPATH; in Python also callables)", convert=_as_tuple,
    )  # fmt: skip
    reward_weights: tuple[float, ...] | object | None = setting(
        None, "grpo: weight of each reward function", convert=_reward_weights, default_help="1 each"
    )
    num_generations: int = setting(8, "grpo: completions sampled per prompt (the group)", minimum=2)
    num_generations_eval: int | None = setting(
        None, "grpo: completions sampled per eval prompt", minimum=1, default_help="num_generations"
    )
    max_prompt_length: int | None = setting(
        None, "grpo: prompt tokens kept (the end of a longer prompt)", minimum=1, default_help="all"
    )
    max_completion_length: int = setting(512, "grpo: most tokens sampled per completion", minimum=1)
    temperature: float = setting(1.0, "grpo: sampling temperature", above=0.0)
    top_p: float = setting(1.0, "grpo: nucleus sampling (1: off)", above=0.0, maximum=1.0)
    top_k: int = setting(0, "grpo: sample among the k likeliest tokens (0: off)", minimum=0)
    min_p: float | None = setting(None, "grpo: drop tokens below min_p x the top probability", minimum=0.0, maximum=1.0)
    repetition_penalty: float = setting(1.0, "grpo: transformers' repetition penalty while sampling", above=0.0)
    epsilon: float = setting(0.2, "grpo: clipping range of the importance ratio", minimum=0.0)
    epsilon_high: float | None = setting(None, "grpo: upper clipping range (DAPO)", minimum=0.0, default_help="epsilon")
    scale_rewards: str = setting(
        "group", "grpo: divide advantages by the group's or batch's reward std, or not", choices=GRPO_SCALE_REWARDS
    )
    num_iterations: int = setting(1, "grpo: optimizer steps per batch of samples (old log-probs kept)", minimum=1)
    mask_truncated_completions: bool = setting(False, "grpo: leave completions that hit max_completion_length out")
    use_bias_correction_kl: bool = setting(True, "grpo: weigh the KL term by the importance ratio (TRL's default)")
    sampling_chunks: int = setting(
        1, "grpo: sample each generation in this many pieces, scoring one piece's rewards on the host while the "
        "device samples the next (for slow rewards; smaller sampling batches)", minimum=1,
    )  # fmt: skip

    def _validate(self) -> None:
        self._validate_method()
        if self.max_steps is not None and self.num_train_epochs is not None:
            raise ValueError("give max_steps or num_train_epochs, not both")
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("give warmup_steps or warmup_ratio, not both")
        if self.resume is not False and self.overwrite:
            raise ValueError(
                "give resume or overwrite, not both: resume continues the run in output_dir, overwrite replaces it"
            )
        if self.resume is not False and self.output_dir is None:
            raise ValueError("resume needs output_dir, the directory whose checkpoints it continues")
        if ("all" in self.report_to or "none" in self.report_to) and len(self.report_to) > 1:
            raise ValueError(f"report_to {','.join(self.report_to)}: 'all' and 'none' stand alone")
        if self.max_steps is not None and self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} is longer than the run (max_steps={self.max_steps})")
        if self.val_set_size >= 1 and not float(self.val_set_size).is_integer():
            raise ValueError(f"val_set_size must be a fraction below 1 or a whole count, got {self.val_set_size}")
        if self.val_set_size and self.eval_dataset is not None:
            raise ValueError("give eval_dataset or val_set_size, not both")
        if self.val_set_size and self.streaming:
            raise ValueError("val_set_size cannot hold out examples of a streamed dataset: give eval_dataset")
        if self.eval_steps is not None and self.eval_strategy == "steps" and not self.has_eval_data:
            raise ValueError("eval_steps needs eval data: give eval_dataset or val_set_size")
        for name in ("early_stopping_patience", "load_best_model_at_end"):
            if getattr(self, name) and not self.evaluates:
                raise ValueError(
                    f"{name} needs evaluations during training: give eval_dataset or val_set_size"
                    + (" and eval_strategy='steps'" if self.eval_strategy == "no" else "")
                )

    def _validate_method(self) -> None:
        """beta and loss_type default by method (TRL's: 0.1 and sigmoid for preference methods, 0 and dapo for
        GRPO); the GRPO settings fit together."""
        grpo = self.method == "grpo"
        if self.beta is None:
            object.__setattr__(self, "beta", 0.0 if grpo else 0.1)
        if self.loss_type is None:
            object.__setattr__(self, "loss_type", "dapo" if grpo else "sigmoid")
        if not grpo and self.method != "sft" and self.beta <= 0:
            raise ValueError(f"beta must be > 0 for method={self.method!r}, got {self.beta}")
        kinds = GRPO_LOSS_TYPES if grpo else DPO_LOSS_TYPES
        if self.loss_type not in kinds:
            raise ValueError(f"loss_type={self.loss_type!r} is not one of method={self.method!r}'s: {', '.join(kinds)}")
        for v in self.reward_funcs:
            if not (isinstance(v, str) or callable(v)):
                raise ValueError(f"reward_funcs: {v!r} is neither a name (module.path:function) nor a callable")
        if grpo and not self.reward_funcs:
            raise ValueError(
                "method='grpo' needs reward_funcs (built-ins: exact_answer, format; or module.path:function)"
            )
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} values for {len(self.reward_funcs)} reward_funcs"
            )

    @property
    def has_eval_data(self) -> bool:
        return self.eval_dataset is not None or self.val_set_size > 0

    @property
    def evaluates(self) -> bool:
        """Whether the run evaluates during training (eval data given and eval_strategy not "no")."""
        return self.has_eval_data and self.eval_strategy != "no"

    @property
    def num_warmup_steps(self) -> int:
        """Warmup steps: warmup_steps, or warmup_ratio of max_steps rounded up (as transformers)."""
        if not self.warmup_ratio:
            return self.warmup_steps
        if self.max_steps is None:
            raise ValueError("warmup_ratio needs max_steps (jaxsloth.train sets it from num_train_epochs)")
        return math.ceil(self.warmup_ratio * self.max_steps)


TRAIN_SCHEMAS = (LoadConfig, LoraConfig, TrainConfig)
spellings(TRAIN_SCHEMAS)  # one name, one setting, across the whole command


# --- derived faces: API signatures and docs, CLI flags -------------------------------------------------------------


def _default_text(f: dataclasses.Field) -> str | None:
    m = f.metadata
    if m["default_help"] is not None:
        return m["default_help"]
    default = m["cli_default"] if m["cli_default"] is not None else f.default
    return None if default is None else str(default)


def describe(f: dataclasses.Field, cli: bool = False) -> str:
    """One line of help: the doc, the accepted values (the CLI shows single choices in the flag's metavar), then
    the default once."""
    text, choices = f.metadata["help"], f.metadata["choices"]
    if choices and isinstance(f.default, tuple):
        text += f"; {'comma-separated' if cli else 'any'} of: {','.join(choices)}"
    elif choices and not cli:
        text += f"; one of: {', '.join(choices)}"
    default = _default_text(f)
    return text if default is None else f"{text} (default: {default})"


def takes_settings(*schemas: type) -> Callable:
    """Decorator for an API function whose ``**settings`` are the keyword fields of ``schemas``: its signature
    (``help()``, IDEs) and docstring list them, with their types, defaults and help."""

    def wrap(fn):
        sig = inspect.signature(fn)
        params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        taken = {p.name for p in params}
        lines = []
        for cls in schemas:
            hints = _type_hints(cls)
            for f in cls.api_fields():
                if f.name in taken:
                    continue
                params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                                annotation=hints[f.name]))  # fmt: skip
                lines.append(f"    {f.name}: {describe(f)}")
        fn.__signature__ = sig.replace(parameters=params)
        names = " / ".join(f"jaxsloth.config.{c.__name__}" for c in schemas)
        fn.__doc__ = f"{(fn.__doc__ or '').rstrip()}\n\n    Settings ({names}):\n\n" + "\n".join(lines)
        return fn

    return wrap


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _flag_type(tp):
    kinds = [m for m in _members(tp) if m is not type(None)]
    if bool in kinds:
        return bool
    for kind in kinds:
        if kind in (int, float):
            return kind
    return str


def add_arguments(parser: argparse.ArgumentParser, schemas: Iterable[type], only: Iterable[str] | None = None) -> None:
    """One ``--flag`` per field of ``schemas`` (or of those named in ``only``), in a group per schema; every default
    is None so that a given flag can be told from an absent one (the schema's defaults apply later). Old spellings
    are hidden flags of their own (``flag_values`` warns about them)."""
    only = None if only is None else set(only)
    for cls in schemas:
        group = parser.add_argument_group(cls.title)
        hints = _type_hints(cls)
        for f in dataclasses.fields(cls):
            if only is not None and f.name not in only:
                continue
            kind = _flag_type(hints[f.name])
            choices = f.metadata["choices"]
            for name in (f.name, *f.metadata["aliases"], *f.metadata["synonyms"]):
                help = describe(f, cli=True) if name == f.name else argparse.SUPPRESS
                if kind is bool and name in f.metadata["synonyms"] and str in _members(hints[f.name]):
                    # A switch that also takes a path: --resume, and TRL's --resume-from-checkpoint PATH.
                    group.add_argument(flag(name), dest=name, default=None, metavar="PATH", help=help)
                elif kind is bool:
                    group.add_argument(flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None,
                                       help=help)  # fmt: skip
                else:
                    metavar = (
                        "NAMES" if isinstance(f.default, tuple) else "{" + ",".join(choices) + "}" if choices else None
                    )
                    group.add_argument(flag(name), dest=name, type=kind, default=None, metavar=metavar, help=help)


def flag_values(args: argparse.Namespace, schemas: Iterable[type]) -> dict[str, tuple[str, object]]:
    """The flags given on the command line: field name -> (the flag as typed, value). An old spelling warns; a
    setting given under two spellings is an error."""
    names = spellings(schemas)
    out: dict[str, tuple[str, object]] = {}
    for spelling, name in names.items():
        value = getattr(args, spelling, None)
        if value is None:
            continue
        resolve_name(spelling, names, "", spell=flag)
        if name in out:
            raise ValueError(f"{out[name][0]} and {flag(spelling)} set the same setting; give one")
        out[name] = (flag(spelling), value)
    return out


def cli_defaults(schemas: Iterable[type]) -> dict[str, object]:
    """The settings whose ``jaxsloth train`` default differs from the API's."""
    return {
        f.name: f.metadata["cli_default"]
        for cls in schemas
        for f in dataclasses.fields(cls)
        if f.metadata["cli_default"] is not None
    }


def split_settings(values: Mapping[str, object], schemas: Iterable[type] = TRAIN_SCHEMAS) -> list:
    """One validated object per schema from a flat field name -> value mapping."""
    return [cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values}) for cls in schemas]
