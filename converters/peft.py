"""jaxsloth LoRA adapters <-> PEFT's on-disk format (adapter_model.safetensors + adapter_config.json).

Names are PEFT's save_pretrained names for a causal LM:
``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` ([r, in]) and ``...lora_B.weight``
([out, r]); trained embeddings / LM head are ``modules_to_save``: ``base_model.model.model.embed_tokens.weight``
and ``base_model.model.lm_head.weight``.

Phi-3 checkpoints fuse q,k,v into ``qkv_proj`` and gate,up into ``gate_up_proj`` while we hold them apart. LoRAs of
rank r on q, k and v are exactly one LoRA of rank 3r on the fused projection: A = [A_q; A_k; A_v] (rows) and B
block-diagonal, since B A x = [B_q A_q x; B_k A_k x; B_v A_v x]. Its scale must stay ours, so the fused module
gets ``rank_pattern`` 3r and an ``alpha_pattern`` alpha' with alpha' / 3r (or alpha' / sqrt(3r) under rsLoRA)
equal to our scale. Importing a fused PEFT adapter gives each part the whole A and its rows of B.

Mixtures of experts (transformers 5 holds each layer's experts as fused parameters, experts.gate_up_proj
[E, 2I, D] and experts.down_proj [E, D, I]) take PEFT's ``target_parameters`` LoRA: per parameter, lora_A
[E * r, in] (expert-major rows) and lora_B [out, r * E] (expert-minor columns), the delta of expert e being
B.reshape(out, r, E)[:, :, e] @ A.reshape(E, r, in)[e]. Two parameters of one module nest their wrappers in the
module's parameter order: gate_up_proj's weights are ``...mlp.experts.base_layer.lora_A.weight``, down_proj's
``...mlp.experts.lora_A.weight`` (a lone target has the latter name).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from converters.safetensors_io import SafetensorsFile, save_file
from jaxsloth.lora import LoraConfig
from jaxsloth.models.config import ModelConfig
from jaxsloth.models.decoder import LINEARS, linear_shapes
from jaxsloth.models.moe import EXPERT_LINEARS, expert_shapes

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
_EMBED_KEY = _PREFIX + "model.embed_tokens.weight"
_LM_HEAD_KEY = _PREFIX + "lm_head.weight"
_LAYER_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
_EXPERT_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.mlp\.experts\.(base_layer\.)?lora_([AB])\.weight$")
# Our expert projections -> the transformers 5 parameters PEFT's target_parameters adapts, in the experts module's
# parameter order (the order PEFT nests their wrappers in).
_EXPERT_PARAMS = {"experts_gate_up": "mlp.experts.gate_up_proj", "experts_down": "mlp.experts.down_proj"}
# PEFT initialisations that rewrite the base weights: such an adapter is only right on its modified base model.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def _block(name: str) -> str:
    return "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj") else "mlp"


def _hf_modules(config: ModelConfig) -> dict[str, tuple[str, ...]]:
    """HF module name -> our projections it holds, in row order."""
    if config.is_moe:
        return {name: (name,) for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
    if config.fused_qkv:
        return {
            "qkv_proj": ("q_proj", "k_proj", "v_proj"),
            "o_proj": ("o_proj",),
            "gate_up_proj": ("gate_proj", "up_proj"),
            "down_proj": ("down_proj",),
        }
    return {name: (name,) for name in LINEARS}


def _row_ranges(config: ModelConfig, parts: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    shapes = linear_shapes(config)
    out, start = {}, 0
    for name in parts:
        out[name] = (start, start + shapes[name][0])
        start += shapes[name][0]
    return out


def _alpha_for(scale: float, rank: int, use_rslora: bool) -> float:
    """The alpha that gives ``scale`` at ``rank``."""
    return scale * (math.sqrt(rank) if use_rslora else rank)


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def save_peft_adapter(
    trainable: dict,
    lora_config: LoraConfig,
    model_config: ModelConfig,
    out_dir: str | os.PathLike,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Writes ``trainable`` (A [L, r, in], B [L, out, r] per projection; optional embed / lm_head copies) as a PEFT
    adapter that ``peft.PeftModel.from_pretrained(base, out_dir)`` loads. Tensors keep their dtype. Returns out_dir.
    """
    out_dir = Path(out_dir)
    layers = trainable["layers"]
    known = (*LINEARS, *EXPERT_LINEARS) if model_config.is_moe else LINEARS
    unknown = set(layers) - set(known)
    if unknown:
        raise ValueError(f"trainable has unknown projections {sorted(unknown)}; expected names from {list(known)}")
    tensors: dict[str, np.ndarray] = {}
    targets, rank_pattern, alpha_pattern = [], {}, {}
    for hf_name, parts in _hf_modules(model_config).items():
        present = [p for p in parts if p in layers]
        if not present:
            continue
        targets.append(hf_name)
        a = [np.asarray(layers[p]["a"]) for p in present]
        b = [np.asarray(layers[p]["b"]) for p in present]
        rank = sum(x.shape[1] for x in a)
        if len(parts) == 1:
            fused_a, fused_b = a[0], b[0]
        else:
            rows = _row_ranges(model_config, parts)
            fused_a = np.concatenate(a, axis=1)
            fused_b = np.zeros((model_config.num_layers, rows[parts[-1]][1], rank), fused_a.dtype)
            col = 0
            for p, bp in zip(present, b, strict=True):
                r0, r1 = rows[p]
                fused_b[:, r0:r1, col : col + bp.shape[2]] = bp
                col += bp.shape[2]
        if rank != lora_config.r:
            rank_pattern[hf_name] = rank
            alpha_pattern[hf_name] = _alpha_for(lora_config.scale, rank, lora_config.use_rslora)
        pre = f"{_PREFIX}model.layers.{{}}.{_block(hf_name)}.{hf_name}"
        for i in range(model_config.num_layers):
            tensors[pre.format(i) + ".lora_A.weight"] = fused_a[i]
            tensors[pre.format(i) + ".lora_B.weight"] = fused_b[i]
    tensors.update(_expert_tensors(layers, model_config))
    modules_to_save = []
    if "embed" in trainable:
        modules_to_save.append("embed_tokens")
        tensors[_EMBED_KEY] = np.asarray(trainable["embed"])
        if model_config.tie_word_embeddings:  # PEFT's ensure_weight_tying loads the tied head as a saved module too
            tensors[_LM_HEAD_KEY] = tensors[_EMBED_KEY]
    if "lm_head" in trainable:
        if model_config.tie_word_embeddings:
            raise ValueError("trainable has an lm_head copy but the model ties its embeddings: train 'embed' instead")
        modules_to_save.append("lm_head")
        tensors[_LM_HEAD_KEY] = np.asarray(trainable["lm_head"])
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / ADAPTER_WEIGHTS)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": lora_config.r,
        "lora_alpha": _number(lora_config.lora_alpha),
        "lora_dropout": lora_config.lora_dropout,
        "use_rslora": lora_config.use_rslora,
        "target_modules": targets,
        "target_parameters": [_EXPERT_PARAMS[n] for n in EXPERT_LINEARS if n in layers] or None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": modules_to_save or None,
        # A trained embedding of a tied model is also its LM head, as in jaxsloth's forward.
        "ensure_weight_tying": bool(modules_to_save) and model_config.tie_word_embeddings,
        "bias": "none",
        "lora_bias": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    return out_dir


def _expert_keys(present: list[str]) -> dict[str, str]:
    """Our expert projections -> the module path (after the layer) PEFT saves their LoRA under."""
    nested = len(present) > 1
    return {n: "mlp.experts.base_layer" if nested and i == 0 else "mlp.experts" for i, n in enumerate(present)}


def _expert_tensors(layers: dict, config: ModelConfig) -> dict[str, np.ndarray]:
    """PEFT's target_parameters tensors of the expert LoRAs in ``layers`` (A [L, E, r, in], B [L, E, out, r])."""
    present = [n for n in EXPERT_LINEARS if n in layers]
    out = {}
    for name, module in _expert_keys(present).items():
        a, b = np.asarray(layers[name]["a"]), np.asarray(layers[name]["b"])
        n_exp, rank, inp = a.shape[1:]
        for i in range(config.num_layers):
            pre = f"{_PREFIX}model.layers.{i}.{module}"
            out[pre + ".lora_A.weight"] = np.ascontiguousarray(a[i].reshape(n_exp * rank, inp))
            out[pre + ".lora_B.weight"] = np.ascontiguousarray(b[i].transpose(1, 2, 0).reshape(-1, rank * n_exp))
    return out


def _experts_from_peft(found: dict, cfg: dict, config: ModelConfig, weights: Path) -> dict:
    """Inverse of ``_expert_tensors``: {wrapper path: {layer: {"A", "B"}}} -> our expert LoRA trees."""
    targeted = [n for n in EXPERT_LINEARS if _EXPERT_PARAMS[n] in (cfg.get("target_parameters") or ())]
    modules = {module: name for name, module in _expert_keys(targeted).items()}
    shapes = expert_shapes(config)
    layers = {}
    for module, per_layer in found.items():
        if module not in modules or sorted(per_layer) != list(range(config.num_layers)):
            raise ValueError(f"{weights}: LoRA weights of {module!r} do not match target_parameters in every layer")
        name = modules[module]
        n_exp, out, inp = shapes[name]
        a_list, b_list = [], []
        for i in range(config.num_layers):
            a, b = per_layer[i].get("A"), per_layer[i].get("B")
            if a is None or b is None or a.shape[1] != inp or b.shape[0] != out or a.shape[0] % n_exp:
                raise ValueError(f"{weights}: layer {i} {module} LoRA does not fit {n_exp} experts of ({out}, {inp})")
            rank = a.shape[0] // n_exp
            a_list.append(a.reshape(n_exp, rank, inp))
            b_list.append(b.reshape(out, rank, n_exp).transpose(2, 0, 1))
        layers[name] = {"a": jnp.asarray(np.stack(a_list)), "b": jnp.asarray(np.stack(b_list))}
    return layers


def _check_supported(cfg: dict, path: Path) -> None:
    def bad(field, why):
        raise ValueError(f"{path}: unsupported PEFT adapter: {field}={cfg.get(field)!r} ({why})")

    if cfg.get("peft_type") != "LORA":
        bad("peft_type", "only LORA adapters are supported")
    if cfg.get("use_dora"):
        bad("use_dora", "DoRA is not supported")
    if cfg.get("bias", "none") != "none":
        bad("bias", "only bias='none' is supported")
    if cfg.get("lora_bias"):
        bad("lora_bias", "LoRA biases are not supported")
    if cfg.get("layers_to_transform") is not None:
        bad("layers_to_transform", "every layer must carry the same projections")
    if cfg.get("layer_replication"):
        bad("layer_replication", "replicated layers are not supported")
    if cfg.get("fan_in_fan_out"):
        bad("fan_in_fan_out", "only nn.Linear-oriented weights are supported")
    if set(cfg.get("target_parameters") or ()) - set(_EXPERT_PARAMS.values()):
        bad("target_parameters", f"LoRA on parameters other than {sorted(_EXPERT_PARAMS.values())} is unsupported")
    if cfg.get("trainable_token_indices"):
        bad("trainable_token_indices", "trainable tokens are not supported; use modules_to_save")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        bad("init_lora_weights", "this initialisation changes the base weights")
    for m in cfg.get("modules_to_save") or ():
        if m.split(".")[-1] not in ("embed_tokens", "lm_head"):
            bad("modules_to_save", f"{m!r}: only embed_tokens and lm_head can be saved whole")


def _pattern_value(pattern: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of the module's name."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_peft_adapter(path: str | os.PathLike, model_config: ModelConfig) -> tuple[dict, LoraConfig]:
    """Reads a PEFT LoRA adapter directory -> (trainable tree, LoraConfig) for ``model_config``'s model.

    Per-module ranks (rank_pattern) are zero-padded to the largest, per-module alphas (alpha_pattern) folded into
    B, so one scale serves every projection; fused Phi-3 modules are split by rows of B. Unsupported adapters
    (DoRA, biases, layers_to_transform, ...) raise ValueError naming the config field.
    """
    path = Path(path)
    cfg_path = path / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {path}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON: {e}") from None
    _check_supported(cfg, cfg_path)
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {path} (pickled adapter_model.bin is not read)")
    f = SafetensorsFile(weights)
    r, alpha, rslora = int(cfg["r"]), float(cfg["lora_alpha"]), bool(cfg.get("use_rslora", False))
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=float(cfg.get("lora_dropout") or 0.0), use_rslora=rslora)
    modules = _hf_modules(model_config)
    found: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    found_experts: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    trainable: dict = {}
    for key in f:
        if key == _EMBED_KEY:
            trainable["embed"] = jnp.asarray(f[key])
            continue
        if key == _LM_HEAD_KEY:
            trainable["lm_head"] = jnp.asarray(f[key])
            continue
        e = _EXPERT_KEY.match(key) if model_config.is_moe else None
        if e is not None:
            module = "mlp.experts." + (e.group(2) or "")
            found_experts.setdefault(module.rstrip("."), {}).setdefault(int(e.group(1)), {})[e.group(3)] = np.asarray(
                f[key], np.float32
            )
            continue
        m = _LAYER_KEY.match(key)
        if m is None or m.group(3) not in modules or m.group(2) != _block(m.group(3)):
            raise ValueError(
                f"{weights}: tensor {key!r} is not a LoRA weight of a {model_config.model_type} projection"
            )
        layer = int(m.group(1))
        if layer >= model_config.num_layers:
            raise ValueError(f"{weights}: tensor {key!r} is for layer {layer}; the model has {model_config.num_layers}")
        found.setdefault(m.group(3), {}).setdefault(layer, {})[m.group(4)] = np.asarray(f[key], np.float32)
    if "embed" in trainable and model_config.tie_word_embeddings and not cfg.get("ensure_weight_tying"):
        raise ValueError(
            f"{cfg_path}: ensure_weight_tying={cfg.get('ensure_weight_tying')!r} with a saved embed_tokens on a model "
            "with tied embeddings: PEFT then keeps the old LM head, which jaxsloth's tied model cannot express"
        )
    if "lm_head" in trainable and model_config.tie_word_embeddings:
        trainable.pop("lm_head")  # PEFT's tied copy of the trained embedding
    shapes = linear_shapes(model_config)
    layers = {}
    for hf_name, per_layer in found.items():
        missing = sorted(set(range(model_config.num_layers)) - set(per_layer))
        if missing:
            raise ValueError(f"{weights}: {hf_name} has LoRA weights in some layers but not in layers {missing}")
        a_list, b_list = [], []
        for i in range(model_config.num_layers):
            ab = per_layer[i]
            if set(ab) != {"A", "B"}:
                raise ValueError(f"{weights}: layer {i} {hf_name} lacks lora_{'B' if 'A' in ab else 'A'}.weight")
            rank = ab["A"].shape[0]
            module = f"model.layers.{i}.{_block(hf_name)}.{hf_name}"
            alpha_m = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, alpha))
            scale_m = alpha_m / (math.sqrt(rank) if rslora else rank)
            a_list.append(ab["A"])
            b_list.append(ab["B"] * np.float32(scale_m / lora.scale) if scale_m != lora.scale else ab["B"])
        rank = max(a.shape[0] for a in a_list)
        a = np.stack([np.pad(x, ((0, rank - x.shape[0]), (0, 0))) for x in a_list])
        b = np.stack([np.pad(x, ((0, 0), (0, rank - x.shape[1]))) for x in b_list])
        parts = modules[hf_name]
        rows = _row_ranges(model_config, parts)
        for p in parts:
            r0, r1 = rows[p]
            if a.shape[2] != shapes[p][1] or b.shape[1] != rows[parts[-1]][1]:
                raise ValueError(
                    f"{weights}: {hf_name} LoRA shapes A {a.shape[1:]}, B {b.shape[1:]} do not fit the model's "
                    f"{hf_name} ({rows[parts[-1]][1]}, {shapes[p][1]})"
                )
            layers[p] = {"a": jnp.asarray(a), "b": jnp.asarray(b[:, r0:r1])}
    layers.update(_experts_from_peft(found_experts, cfg, model_config, weights))
    if not layers:
        raise ValueError(f"{weights}: no LoRA weights found")
    lora = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=lora.lora_dropout,
        use_rslora=rslora,
        target_modules=tuple(n for n in LINEARS if n in layers or _adapts_expert(n, layers)),
        train_embeddings="embed" in trainable,
        train_lm_head="lm_head" in trainable,
    )
    return {"layers": layers, **trainable}, lora


def _adapts_expert(name: str, layers: dict) -> bool:
    """Whether target_modules' dense MLP name ``name`` selects an expert LoRA present in ``layers``."""
    from jaxsloth.models.moe import EXPERT_TARGETS

    return EXPERT_TARGETS.get(name) in layers
