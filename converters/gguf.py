"""jaxsloth params + tokenizer -> one GGUF file that llama.cpp, Ollama and LM Studio load.

The layout follows llama.cpp's own converter (``convert_hf_to_gguf.py``): tensors get its names (``token_embd``,
``blk.N.attn_q``, ...), the Llama architecture stores q/k projections with each head's rotary halves interleaved
(llama.cpp rotates adjacent pairs, transformers rotates the two halves of a head), 1-D tensors and norms stay f32,
and ``q8_0`` falls back to f16 for a matrix whose rows are not a multiple of the 32-value block. The file is
streamed: each tensor is converted and written on its own, so the host never holds the whole model twice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from converters.hf import TensorSlot, hf_layout
from jaxsloth.models.config import ModelConfig, RopeConfig, rope_inv_freq

log = logging.getLogger("jaxsloth")

QType = gguf.GGMLQuantizationType

# quantization name -> (file type recorded in the header, type of every 2-D weight)
QUANTIZATIONS = {
    "f16": (gguf.LlamaFileType.MOSTLY_F16, QType.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, QType.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, QType.Q8_0),
}

# model_type -> llama.cpp architecture. Mistral checkpoints are Llama layouts, as llama.cpp converts them.
ARCHITECTURES = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "mistral": gguf.MODEL_ARCH.LLAMA,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "gemma": gguf.MODEL_ARCH.GEMMA,
}

# The pre-tokenizer regexes of Llama-3 and Qwen-2 tokenizer.json files, and llama.cpp's names for them.
_PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One tensor of the file: its GGUF name, numpy shape (outermost first), storage type and a loader that
    returns its f32 values on the host."""

    name: str
    shape: tuple[int, ...]
    qtype: QType
    load: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        block, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape[:-1], dtype=np.int64)) * (self.shape[-1] // block) * type_size


def check_supported(config: ModelConfig) -> None:
    """Raises ValueError naming what llama.cpp's architectures cannot represent for this config."""
    if config.model_type not in ARCHITECTURES:
        raise ValueError(
            f"GGUF export does not support model_type {config.model_type!r} (supported: "
            f"{', '.join(ARCHITECTURES)}); export with save_merged and convert the checkpoint with llama.cpp's "
            "convert_hf_to_gguf.py"
        )
    if config.rotary_dim != config.head_dim:
        raise ValueError(f"GGUF export does not support partial rotary embeddings (rotary_dim {config.rotary_dim})")
    if config.rope.kind not in ("default", "linear", "llama3"):
        raise ValueError(
            f"GGUF export does not support rope_type {config.rope.kind!r} (supported: default, linear, llama3)"
        )


def _interleave_rotary_halves(w: np.ndarray, n_heads: int) -> np.ndarray:
    """[n_heads * head_dim, ...] with each head's rotary halves (x1 | x2) -> pairs (x1_0, x2_0, x1_1, ...): the
    layout llama.cpp's Llama rope (adjacent pairs) expects for the same attention scores."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _host_f32(params: dict, slot: TensorSlot) -> np.ndarray:
    x = params
    for p in slot.path:
        x = x[p]
    if not isinstance(x, jax.Array | np.ndarray):  # an NF4Weight (a projection the adapter did not touch)
        from jaxsloth.quant import dequantize_nf4

        return np.asarray(dequantize_nf4(jax.tree.map(lambda a: a[slot.layer], x), jnp.float32))
    return np.asarray(x if slot.layer is None else x[slot.layer], dtype=np.float32)


def _rope_factors(config: ModelConfig) -> np.ndarray:
    """Llama-3 rope: per-frequency divisors (unscaled inv_freq / scaled inv_freq), llama.cpp's ``rope_freqs``."""
    scaled, _ = rope_inv_freq(config)
    unscaled, _ = rope_inv_freq(dataclasses.replace(config, rope=RopeConfig(theta=config.rope.theta)))
    return (unscaled / scaled).astype(np.float32)


def plan_tensors(params: dict, config: ModelConfig, weight_type: QType) -> list[_Tensor]:
    """Every tensor of the file in write order, each with its storage type and loader."""
    arch = ARCHITECTURES[config.model_type]
    names = gguf.get_tensor_name_map(arch, config.num_layers)
    heads = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads}
    out = []
    if config.rope.kind == "llama3":
        factors = _rope_factors(config)
        out.append(
            _Tensor(
                gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors.shape, QType.F32, lambda: factors
            )
        )
    for hf_name, (slot,) in hf_layout(config).items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"no GGUF name for tensor {hf_name!r} of architecture {gguf.MODEL_ARCH_NAMES[arch]}")
        proj = slot.path[1] if slot.path[0] == "layers" and len(slot.path) == 3 else None
        n_heads = heads.get(proj) if arch == gguf.MODEL_ARCH.LLAMA else None
        # Gemma checkpoints store RMSNorm weights minus one; llama.cpp multiplies by the stored weight.
        offset = config.norm_weight_offset if name.endswith("_norm.weight") else 0.0

        def load(slot=slot, n_heads=n_heads, offset=offset):
            x = _host_f32(params, slot) + np.float32(offset)
            return x if n_heads is None else _interleave_rotary_halves(x, n_heads)

        qtype = weight_type
        if len(slot.shape) == 1 or name.endswith("_norm.weight"):
            qtype = QType.F32
        elif slot.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            log.warning(
                "%s: rows of %d values are not a multiple of the %s block; stored as f16",
                name,
                slot.shape[-1],
                qtype.name,
            )
            qtype = QType.F16
        out.append(_Tensor(name, tuple(slot.shape), qtype, load))
    return out


def _write_hparams(w: gguf.GGUFWriter, config: ModelConfig, file_type: gguf.LlamaFileType, name: str) -> None:
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_block_count(config.num_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope.theta)
    w.add_rope_dimension_count(config.rotary_dim)
    if config.rope.kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(config.rope.factor)
    w.add_vocab_size(config.vocab_size)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _looks_like_control(text: str) -> bool:
    """Added tokens some tokenizers forget to mark special, as llama.cpp's converter treats them."""
    return text.startswith("<|") and text.endswith("|>")


def _pre_tokenizer(tokenizer_json: dict, path: Path) -> str:
    """llama.cpp's name for the byte-level BPE pre-tokenizer of this tokenizer.json."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    splits = [s["pattern"].get("Regex") for s in steps if s.get("type") == "Split"]
    if len(splits) == 1 and splits[0] in _PRE_TOKENIZERS:
        return _PRE_TOKENIZERS[splits[0]]
    raise ValueError(
        f"{path}: pre-tokenizer {splits or pre} is not one GGUF export knows (Llama-3 or Qwen-2 byte-level BPE)"
    )


def _gpt2_vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings (byte-level alphabet) and llama.cpp token types for ids 0..vocab_size-1."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # the embedding is padded past the tokenizer
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        if i not in added:
            types.append(gguf.TokenType.NORMAL)
        elif added[i].special or _looks_like_control(by_id[i]):
            types.append(gguf.TokenType.CONTROL)
        else:
            types.append(gguf.TokenType.USER_DEFINED)
    return tokens, types


def _spm_vocab(tokenizer, tokenizer_json: dict, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """SentencePiece pieces as llama.cpp's "llama" tokenizer wants them: text, score and type per id.

    tokenizer.json keeps SentencePiece's BPE as ordered merges; llama.cpp merges the adjacent pair whose result
    has the highest score, so a piece's score is minus the rank of the first merge that makes it.
    """
    merges = tokenizer_json["model"].get("merges") or []
    score = {}
    for rank, m in enumerate(merges):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        score.setdefault(a + b, -float(rank))
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    unk = tokenizer_json["model"].get("unk_token")
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-10000.0)
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(text.encode("utf-8"))
        scores.append(score.get(text, -1000.0 if i in added else 0.0))
        if i in added and (added[i].special or _looks_like_control(text)):
            types.append(gguf.TokenType.CONTROL)
        elif text == unk:
            types.append(gguf.TokenType.UNKNOWN)
        elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types.append(gguf.TokenType.BYTE)
        elif i in added:
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, scores, types


def _adds_space_prefix(tokenizer_json: dict) -> bool:
    """Whether the SentencePiece tokenizer puts "▁" before the first word (Llama 2, Mistral) or not."""
    text = json.dumps([tokenizer_json.get("normalizer"), tokenizer_json.get("pre_tokenizer")])
    return '"type": "Prepend"' in text or '"prepend_scheme": "always"' in text or '"prepend_scheme": "first"' in text


def _write_vocab(w: gguf.GGUFWriter, tokenizer, config: ModelConfig) -> None:
    """Tokenizer model, tokens, merges or scores, special ids, add-bos/eos flags and the chat template."""
    with tempfile.TemporaryDirectory(prefix="jaxsloth-gguf-") as tmp:
        tmp = Path(tmp)
        # The files llama.cpp's converter reads: what the tokenizer saves, plus config.json for special ids.
        tokenizer.save_pretrained(tmp)
        if config.hf_config:
            (tmp / "config.json").write_text(config.hf_config)
        path = tmp / "tokenizer.json"
        if not path.is_file():
            raise ValueError(
                f"GGUF export needs a fast tokenizer with a tokenizer.json (got {type(tokenizer).__name__})"
            )
        tj = json.loads(path.read_text())
        model = tj.get("model", {})
        if max(tokenizer.get_vocab().values()) >= config.vocab_size:
            raise ValueError(
                f"the tokenizer has ids up to {max(tokenizer.get_vocab().values())}, beyond the model's vocab_size {config.vocab_size}"
            )
        if model.get("type") != "BPE":
            raise ValueError(
                f"GGUF export supports BPE tokenizers only; tokenizer.json has model type {model.get('type')!r}"
            )
        if model.get("byte_fallback"):
            tokens, scores, types = _spm_vocab(tokenizer, tj, config.vocab_size)
            w.add_tokenizer_model("llama")
            w.add_tokenizer_pre("default")
            w.add_token_list(tokens)
            w.add_token_scores(scores)
            w.add_token_types(types)
            w.add_add_space_prefix(_adds_space_prefix(tj))
            special = gguf.SpecialVocab(tmp, load_merges=False, n_vocab=config.vocab_size)
        else:
            pre = _pre_tokenizer(tj, Path(getattr(tokenizer, "name_or_path", "") or "tokenizer") / "tokenizer.json")
            tokens, types = _gpt2_vocab(tokenizer, config.vocab_size)
            w.add_tokenizer_model("gpt2")
            w.add_tokenizer_pre(pre)
            w.add_token_list(tokens)
            w.add_token_types(types)
            special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=config.vocab_size)
        special.add_to_gguf(w, quiet=True)


def save_gguf(
    params: dict,
    config: ModelConfig,
    tokenizer,
    path: str | os.PathLike,
    *,
    quantization: str = "f16",
    name: str | None = None,
) -> Path:
    """Writes ``params`` (dense or NF4; adapters already merged) and ``tokenizer`` as one GGUF file at ``path``.

    quantization: "f16", "bf16" or "q8_0" for the 2-D weights (norms, biases and rope factors stay f32).
    Written to a temporary name beside ``path`` and renamed, so a failed export leaves no partial file.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unsupported GGUF quantization {quantization!r}; supported: {', '.join(QUANTIZATIONS)}")
    check_supported(config)
    if tokenizer is None:
        raise ValueError("GGUF export needs the model's tokenizer (llama.cpp reads the vocabulary from the file)")
    if "sliding_attention" in config.layer_types:
        log.warning(
            "sliding_window=%d is not stored: llama.cpp's %s architecture attends to the whole context",
            config.sliding_window,
            gguf.MODEL_ARCH_NAMES[ARCHITECTURES[config.model_type]],
        )
    file_type, weight_type = QUANTIZATIONS[quantization]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    arch = ARCHITECTURES[config.model_type]
    tensors = plan_tensors(params, config, weight_type)
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
    try:
        _write_hparams(writer, config, file_type, name or path.stem)
        _write_vocab(writer, tokenizer, config)
        for t in tensors:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            writer.write_tensor_data(gguf.quants.quantize(t.load(), t.qtype))
        writer.close()
        os.replace(tmp, path)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return path
