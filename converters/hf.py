"""Hugging Face model directory <-> jaxsloth (ModelConfig + stacked param pytree).

Loading reads ``config.json`` and the safetensors weights (single file or sharded with an index) one tensor at a
time from memory maps into preallocated stacked host arrays, so the checkpoint is never held twice; with
``load_in_4bit`` each projection is quantized to NF4 as it is read, so the full-precision model never exists whole.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from converters.safetensors_io import SafetensorsFile, save_file
from jaxsloth.models.config import ModelConfig, config_from_hf_dict
from jaxsloth.models.decoder import linear_shapes
from jaxsloth.quant import is_nf4

# Keys some checkpoints carry that hold no weights of ours (buffers older transformers saved).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class TensorSlot:
    """Where one HF tensor goes: a path in the param tree, a layer index (or None), and a row range for fused
    checkpoint tensors (Phi-3's qkv_proj and gate_up_proj are split into our separate projections)."""

    path: tuple[str, ...]
    layer: int | None
    shape: tuple[int, ...]
    rows: tuple[int, int] | None = None
    # Per-expert checkpoint tensors (mixtures of experts): the expert and the rows of the stacked expert tensor
    # (per layer: ``stack_shape``) this tensor fills.
    expert: int | None = None
    expert_rows: tuple[int, int] | None = None
    stack_shape: tuple[int, ...] | None = None

    @property
    def layer_shape(self) -> tuple[int, ...]:
        """The shape of one layer's slice of the param this slot fills."""
        return self.stack_shape or self.shape

    def region(self) -> tuple:
        """Index of this slot's part within one layer's slice of the param."""
        if self.expert is None:
            return ()
        return (self.expert,) if self.expert_rows is None else (self.expert, slice(*self.expert_rows))


def load_config(model_dir: str | os.PathLike) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {Path(model_dir)} (expected {path})")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    try:
        return config_from_hf_dict(d)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _norm_names(config: ModelConfig) -> dict[str, str]:
    if config.post_norms:  # Gemma 2 and 3: post_attention_layernorm is a real post-norm; the MLP has its own pre-norm
        return {
            "input_layernorm": "attn_norm",
            "post_attention_layernorm": "attn_post_norm",
            "pre_feedforward_layernorm": "mlp_norm",
            "post_feedforward_layernorm": "mlp_post_norm",
        }
    return {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"}


def hf_layout(config: ModelConfig, fused_experts: bool = False) -> dict[str, list[TensorSlot]]:
    """Every HF tensor name this config's checkpoint holds -> the slot(s) it fills (``fused_experts``: the
    checkpoint's experts are fused per layer, ``has_fused_experts``)."""
    D, V = config.hidden_size, config.vocab_size
    out: dict[str, list[TensorSlot]] = {
        "model.embed_tokens.weight": [TensorSlot(("embed",), None, (V, D))],
        "model.norm.weight": [TensorSlot(("final_norm",), None, (D,))],
    }
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = [TensorSlot(("lm_head",), None, (V, D))]
    shapes = linear_shapes(config)
    for i in range(config.num_layers):
        pre = f"model.layers.{i}."
        for hf, ours in _norm_names(config).items():
            out[pre + hf + ".weight"] = [TensorSlot(("layers", ours), i, (D,))]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if config.fused_qkv and name != "o_proj":
                continue
            out[f"{pre}self_attn.{name}.weight"] = [TensorSlot(("layers", name, "weight"), i, shapes[name])]
            if config.qkv_bias and name != "o_proj":
                out[f"{pre}self_attn.{name}.bias"] = [TensorSlot(("layers", name, "bias"), i, shapes[name][:1])]
        if config.qk_norm:
            for name in ("q_norm", "k_norm"):
                out[f"{pre}self_attn.{name}.weight"] = [TensorSlot(("layers", name), i, (config.head_dim,))]
        if config.fused_qkv:
            nq, nk = shapes["q_proj"][0], shapes["k_proj"][0]
            bounds = {"q_proj": (0, nq), "k_proj": (nq, nq + nk), "v_proj": (nq + nk, nq + 2 * nk)}
            out[f"{pre}self_attn.qkv_proj.weight"] = [
                TensorSlot(("layers", n, "weight"), i, shapes[n], bounds[n]) for n in ("q_proj", "k_proj", "v_proj")
            ]
            f = config.intermediate_size
            out[f"{pre}mlp.gate_up_proj.weight"] = [
                TensorSlot(("layers", "gate_proj", "weight"), i, shapes["gate_proj"], (0, f)),
                TensorSlot(("layers", "up_proj", "weight"), i, shapes["up_proj"], (f, 2 * f)),
            ]
        elif config.is_moe:
            out.update(_moe_layout(config, i, fused_experts))
            continue
        else:
            for name in ("gate_proj", "up_proj"):
                out[f"{pre}mlp.{name}.weight"] = [TensorSlot(("layers", name, "weight"), i, shapes[name])]
        out[f"{pre}mlp.down_proj.weight"] = [TensorSlot(("layers", "down_proj", "weight"), i, shapes["down_proj"])]
    return out


# Per-expert checkpoint names (what transformers' save_pretrained writes): mixture block, router, and the names of
# the gate, up and down projections of expert N.
_EXPERT_NAMES = {
    "mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
    "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
}


def _moe_layout(config: ModelConfig, i: int, fused_experts: bool) -> dict[str, list[TensorSlot]]:
    """Layer i's router and experts. Checkpoints hold one tensor per expert projection; transformers 5's in-memory
    layout, fused per layer (mlp.experts.gate_up_proj [E, 2I, D], mlp.experts.down_proj [E, D, I]), loads too."""
    from jaxsloth.models.moe import expert_shapes

    block, gate, up, down = _EXPERT_NAMES[config.model_type]
    shapes = expert_shapes(config)
    e, d, inter = config.num_experts, config.hidden_size, config.moe_intermediate_size
    if fused_experts:
        block = "mlp"
    pre = f"model.layers.{i}.{block}."
    out = {pre + "gate.weight": [TensorSlot(("layers", "router", "weight"), i, (e, d))]}
    gate_up, down_path = ("layers", "experts_gate_up", "weight"), ("layers", "experts_down", "weight")
    if fused_experts:
        out[pre + "experts.gate_up_proj"] = [TensorSlot(gate_up, i, shapes["experts_gate_up"])]
        out[pre + "experts.down_proj"] = [TensorSlot(down_path, i, shapes["experts_down"])]
        return out
    for x in range(e):
        ex = f"{pre}experts.{x}."
        up_shape, stack = (inter, d), shapes["experts_gate_up"]
        out[f"{ex}{gate}.weight"] = [TensorSlot(gate_up, i, up_shape, None, x, (0, inter), stack)]
        out[f"{ex}{up}.weight"] = [TensorSlot(gate_up, i, up_shape, None, x, (inter, 2 * inter), stack)]
        out[f"{ex}{down}.weight"] = [TensorSlot(down_path, i, (d, inter), None, x, None, shapes["experts_down"])]
    return out


def has_fused_experts(keys) -> bool:
    """Whether a checkpoint holds transformers 5's fused expert tensors rather than one tensor per expert."""
    return any(k.endswith("mlp.experts.gate_up_proj") for k in keys)


def is_expert_path(path: tuple[str, ...]) -> bool:
    """Router and experts, which fill their stacked tensors from one checkpoint tensor per expert: under
    load_in_4bit the experts are quantized once a whole stack is read (each expert matrix on its own, as
    bitsandbytes quantizes a matrix), the router (small, frozen, routing on exact logits) never."""
    return len(path) > 1 and path[1] in ("router", "experts_gate_up", "experts_down")


# Multimodal checkpoints whose text tower is read alone (Gemma 3): where the tower's "model." and "lm_head." tensors
# are, and the prefixes of the other towers, whose tensors stay unread. Hub checkpoints use the first naming.
_TEXT_TOWERS = (
    (
        {"model.": "language_model.model.", "lm_head.": "language_model.lm_head."},
        ("vision_tower.", "multi_modal_projector."),
    ),
    (
        {"model.": "model.language_model.", "lm_head.": "lm_head."},
        ("model.vision_tower.", "model.multi_modal_projector."),
    ),
)


def text_tower_layout(layout: dict[str, list[TensorSlot]], keys) -> tuple[dict[str, list[TensorSlot]], set[str]]:
    """``layout`` renamed to where the checkpoint holding ``keys`` keeps the text model (a multimodal checkpoint
    nests it), and the checkpoint's tensors of other towers, which loading skips."""
    keys = set(keys)
    if "model.embed_tokens.weight" in keys:
        return layout, set()
    for renames, others in _TEXT_TOWERS:
        if renames["model."] + "embed_tokens.weight" in keys:

            def rename(k, renames=renames):
                old = next(p for p in renames if k.startswith(p))
                return renames[old] + k[len(old) :]

            return {rename(k): v for k, v in layout.items()}, {k for k in keys if k.startswith(others)}
    return layout, set()


def _fused_shape(slots: list[TensorSlot]) -> tuple[int, ...]:
    if slots[0].rows is None:
        return slots[0].shape
    return (slots[-1].rows[1], *slots[0].shape[1:])


def checkpoint_files(model_dir: str | os.PathLike) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it (single file or sharded index)."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
        files = {k: model_dir / v for k, v in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise FileNotFoundError(f"checkpoint shard missing: {shard} (listed in {index})")
        return files
    if single.is_file():
        return dict.fromkeys(SafetensorsFile(single).keys(), single)
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")


class CheckpointReader:
    """Opens each shard once and hands out tensors by HF name."""

    def __init__(self, model_dir: str | os.PathLike):
        self.files = checkpoint_files(model_dir)
        self._open: dict[Path, SafetensorsFile] = {}

    def file_of(self, key: str) -> SafetensorsFile:
        path = self.files[key]
        if path not in self._open:
            self._open[path] = SafetensorsFile(path)
        f = self._open[path]
        if key not in f:
            raise ValueError(f"{path}: tensor {key!r} listed in the index is not in the file")
        return f

    def __getitem__(self, key: str) -> np.ndarray:
        return self.file_of(key)[key]

    def keys(self):
        return self.files.keys()


def _check_keys(found, expected, model_dir, allow_extra=()) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(
        k for k in set(found) - set(expected) if not k.endswith(_IGNORED_SUFFIXES) and k not in allow_extra
    )
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            parts.append(
                f"unexpected keys ({len(unexpected)}): {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}"
            )
        raise ValueError(f"checkpoint in {model_dir} does not match its config.json: " + "; ".join(parts))


def _np_dtype(dtype) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(jnp.dtype(dtype).name)


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree


def iter_layer_tensors(
    reader: CheckpointReader,
    layout: dict[str, list[TensorSlot]],
    model_dir,
    quantize: Callable[[tuple[str, ...], np.ndarray], object] | None = None,
) -> Iterator:
    """Yields (slot, numpy tensor) for every slot, reading each HF tensor once and validating its shape.

    With ``quantize``, a fused projection (Phi-3's qkv_proj, gate_up_proj) is quantized whole, as bitsandbytes
    quantizes the checkpoint's tensor, and yielded as (slot, NF4Weight) row splits: the NF4 codes are
    bitsandbytes' bytes and the double-quantized absmax keeps bitsandbytes' values (dequantized to f32, since
    the nested blocks of 256 do not split along rows; see ``jaxsloth.quant.split_nf4_rows``). Quantizing the
    splits instead would change the double-quant statistics (offset, nested blocks) and so the weights."""
    from jaxsloth.quant import split_nf4_rows

    for key, slots in layout.items():
        f = reader.file_of(key)
        expected = _fused_shape(slots)
        found = f.shape(key)
        if tuple(found) != tuple(expected):
            raise ValueError(f"{f.path}: tensor {key!r} has shape {tuple(found)}, config.json implies {expected}")
        t = f[key]
        fused = quantize is not None and slots[0].rows is not None and slots[0].path[-1] == "weight"
        w = quantize(slots[0].path, np.asarray(t)) if fused else None
        if w is not None:
            for slot in slots:
                yield slot, split_nf4_rows(w, *slot.rows)
            continue
        for slot in slots:
            yield slot, (t if slot.rows is None else t[slot.rows[0] : slot.rows[1]])


_BNB_SUFFIXES = (
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    ".quant_state.bitsandbytes__nf4",
)


def is_bnb_4bit(config: ModelConfig) -> bool:
    """A pre-quantized ``*-bnb-4bit`` checkpoint (config.json's quantization_config says so)."""
    q = (json.loads(config.hf_config) if config.hf_config else {}).get("quantization_config") or {}
    return q.get("quant_method") == "bitsandbytes" and bool(q.get("load_in_4bit") or q.get("_load_in_4bit"))


def _bnb_group(reader: CheckpointReader, key: str) -> dict[str, np.ndarray]:
    """The tensors of one bnb-4bit linear, keyed relative to its prefix (weight, weight.absmax, ...)."""
    prefix = key[: -len("weight")]
    return {k[len(prefix) :]: np.asarray(reader[k]) for k in reader.keys() if k == key or k.startswith(key + ".")}


def _load_bnb_projection(reader, key, slots):
    """Pre-quantized projection -> [(slot, NF4Weight)]; fused Phi-3 tensors are split by rows, bit-exactly."""
    from jaxsloth.quant import nf4_from_bnb_tensors, split_nf4_rows

    try:
        w = nf4_from_bnb_tensors(_bnb_group(reader, key))
    except ValueError as e:
        raise ValueError(f"{reader.files[key]}: {key}: {e}") from None
    expected = _fused_shape(slots)
    if tuple(w.shape) != tuple(expected):
        raise ValueError(
            f"{reader.files[key]}: tensor {key!r} has shape {tuple(w.shape)}, config.json implies {expected}"
        )
    if slots[0].rows is None:
        return [(slots[0], w)]
    return [(s, split_nf4_rows(w, *s.rows)) for s in slots]


def load_params(
    model_dir: str | os.PathLike,
    config: ModelConfig | None = None,
    *,
    dtype=jnp.bfloat16,
    quantize: Callable[[tuple[str, ...], np.ndarray], object] | None = None,
    progress: Callable[[int, int], None] | None = None,
):
    """Reads the weights of ``model_dir`` into the stacked param tree (host numpy, then one device_put per leaf).

    quantize(path, weight [out, in]) -> a quantized per-layer weight (NF4Weight) for projections, or None to keep it;
    quantized layers are stacked with ``jaxsloth.quant.stack_nf4``.
    """
    config = config or load_config(model_dir)
    reader = CheckpointReader(model_dir)
    layout, other_towers = text_tower_layout(hf_layout(config, has_fused_experts(reader.keys())), reader.keys())
    allow = [k for k in ("lm_head.weight", "language_model.lm_head.weight") if config.tie_word_embeddings]
    allow += other_towers
    prequantized = {}
    if is_bnb_4bit(config):
        prequantized = {
            k: v
            for k, v in layout.items()
            if v[0].path[-1] == "weight" and v[0].path[0] == "layers" and not is_expert_path(v[0].path)
        }
        allow += [k + sfx for k in prequantized for sfx in _BNB_SUFFIXES]
        layout = {k: v for k, v in layout.items() if k not in prequantized}
    _check_keys(reader.keys(), list(layout) + list(prequantized), model_dir, allow_extra=set(allow))
    np_dtype = _np_dtype(dtype)
    params: dict = {}
    quantized: dict[tuple[str, ...], list] = {}
    total = len(layout) + len(prequantized)

    def tensors():
        yield from iter_layer_tensors(reader, layout, model_dir, quantize)
        for key, slots in prequantized.items():
            yield from _load_bnb_projection(reader, key, slots)

    for n, (slot, t) in enumerate(tensors()):
        is_proj = slot.path[-1] == "weight" and not is_expert_path(slot.path)
        if is_nf4(t):  # pre-quantized
            q = t
        else:
            q = quantize(slot.path, np.asarray(t)) if (quantize is not None and is_proj) else None
        if q is not None:
            quantized.setdefault(slot.path, [None] * config.num_layers)[slot.layer] = q
        elif slot.layer is None:
            _set(params, slot.path, np.asarray(t).astype(np_dtype))
        else:
            try:
                buf = _get(params, slot.path)
            except KeyError:
                buf = np.empty((config.num_layers, *slot.layer_shape), np_dtype)
                _set(params, slot.path, buf)
            buf[(slot.layer, *slot.region())] = t
        if progress is not None:
            progress(n + 1, total)
    if quantize is not None:
        for name in ("experts_gate_up", "experts_down") if config.is_moe else ():
            path = ("layers", name, "weight")
            dense = _get(params, path)
            if not is_nf4(dense):
                _set(params, path, quantize(path, dense))
    if quantized:
        from jaxsloth.quant import stack_nf4

        for path, per_layer in quantized.items():
            _set(params, path, stack_nf4(per_layer))
    return config, jax.tree.map(jnp.asarray, params)


def load_hf_model(
    model_dir: str | os.PathLike,
    *,
    dtype=jnp.bfloat16,
    load_in_4bit: bool = False,
    double_quant: bool = True,
    progress=None,
):
    """model_dir -> (ModelConfig, params).

    load_in_4bit: quantize every projection to bitsandbytes NF4 as it is read (in ``dtype`` first, as transformers
    does before bitsandbytes quantizes), so the full-precision model never sits in memory whole. Pre-quantized
    ``*-bnb-4bit`` checkpoints load as NF4 whatever this flag says.
    """
    config = load_config(model_dir)
    quantize = None
    if load_in_4bit:
        from jaxsloth.quant import quantize_nf4

        np_dtype = _np_dtype(dtype)

        def quantize(path, w):
            return quantize_nf4(w.astype(np_dtype), double_quant=double_quant)

    return load_params(model_dir, config, dtype=dtype, quantize=quantize, progress=progress)


def to_hf_state_dict(params, config: ModelConfig, dtype=None) -> dict[str, np.ndarray]:
    """Inverse of loading: HF tensor name -> numpy array (fused tensors re-fused, layers unstacked)."""

    def host(x, layer):
        if is_nf4(x):  # exported dequantized
            from jaxsloth.quant import dequantize_nf4

            x = dequantize_nf4(jax.tree.map(lambda a: a[layer], x), dtype or jnp.bfloat16)
            return np.asarray(x)
        a = x if layer is None else x[layer]
        a = np.asarray(a)
        return a if dtype is None else a.astype(_np_dtype(dtype))

    layers: dict = {}  # path -> (layer, host copy): one read per layer for the many per-expert tensors

    def part(s: TensorSlot):
        if s.expert is None:
            return host(_get(params, s.path), s.layer)
        if layers.get(s.path, (None,))[0] != s.layer:
            layers[s.path] = (s.layer, host(_get(params, s.path), s.layer))
        return layers[s.path][1][s.region()]

    out = {}
    for key, slots in hf_layout(config).items():
        parts = [part(s) for s in slots]
        out[key] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    return out


def _torch_dtype_name(a: np.ndarray) -> str:
    return {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}.get(a.dtype.name, "float32")


def parse_size(size: int | str) -> int:
    """Bytes from an int or transformers' size strings: "5GB" (10^9), "500MiB" (2^20), "100KB"."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B)?\s*", str(size).upper())
    if m is None:
        raise ValueError(f"max_shard_size {size!r} is not a size like 5GB, 500MB, 2GiB or a byte count")
    unit = m.group(2) or "B"
    base = 1024 if unit.endswith("IB") else 1000
    return int(float(m.group(1)) * base ** (" KMGT".index(unit[0]) if unit != "B" else 0))


def save_hf_model(
    params,
    config: ModelConfig,
    out_dir: str | os.PathLike,
    *,
    dtype=None,
    max_shard_size: int | str = "5GB",
    tokenizer=None,
    source: str | os.PathLike | None = None,
) -> Path:
    """Writes a folder ``AutoModelForCausalLM`` + ``AutoTokenizer`` + ``generate`` work from alone: config.json,
    safetensors (sharded with a model.safetensors.index.json above ``max_shard_size``: bytes or "5GB" / "2GiB" as
    transformers writes it), generation_config.json and the tokenizer (``tokenizer``, else the files beside the
    ``source`` model, a directory or a cached Hub id; see ``converters.hf_assets``).

    NF4 weights are dequantized to ``dtype`` (default bf16). Files are written atomically.
    """
    from converters.hf_assets import write_generation_config, write_tokenizer

    max_shard_bytes = parse_size(max_shard_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = to_hf_state_dict(params, config, dtype)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], out_dir / "model.safetensors")
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out_dir / name)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(a.nbytes for a in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    hf = json.loads(config.hf_config) if config.hf_config else {}
    hf.pop("quantization_config", None)
    hf["dtype"] = _torch_dtype_name(next(iter(state.values())))
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
    write_generation_config(out_dir, config, source)
    write_tokenizer(out_dir, tokenizer, source)
    return out_dir
