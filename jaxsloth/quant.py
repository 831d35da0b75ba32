"""bitsandbytes-compatible NF4 weights: the pytree type (``NF4Weight``, defined in ``pallas_kernels.nf4_matmul``
beside the kernels that take it as their operand, and ``is_nf4``, the one test for it), quantization with bnb's
exact bytes, and the tensors of pre-quantized ``*-bnb-4bit`` checkpoints.

Layout of one weight W of logical shape (out, in) (the nn.Linear orientation), as bitsandbytes stores it:
- ``packed`` uint8 [cdiv(out*in, 2)]: W flattened row-major, two 4-bit NF4 codes per byte, the first
  element in the HIGH nibble (an odd count is padded with the code of 0.0);
- ``absmax`` f32 [nblocks], nblocks = cdiv(out*in, 64): max |W| over each block of 64 consecutive values;
- double quantization: ``absmax`` is instead uint8, the 8-bit code (bnb's signed dynamic map) of
  absmax - offset in blocks of 256, with ``nested_absmax`` f32 [cdiv(nblocks, 256)] the max |absmax -
  offset| of each such block and ``offset`` the f32 mean of absmax.

Quantization follows bitsandbytes' CPU/default backend (which the CUDA kernel's decision tree agrees with:
its thresholds are the same f32 midpoints): scaled = clamp(x * (1 / absmax), -1, 1) in f32 and the code is
the number of midpoints between neighbouring levels that lie strictly below it (a value exactly on a
midpoint takes the lower level). Two places where bitsandbytes' own backends disagree with each other,
and what this module does:
- the offset is an f32 mean whose summation order differs between bnb's CPU and CUDA reductions; here it
  is the f64 mean rounded to f32 (equal to either to within one f32 ulp);
- bnb 0.50's CPU C++ 8-bit quantizer looks codes up in a 65536-entry table, which picks a neighbouring
  code for ~0.2% of nested absmax values near zero; here the nested codes are the exact nearest level,
  as bnb's default backend and its CUDA kernel compute them.

The runtime never imports torch.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.nf4_matmul import NESTED_BLOCKSIZE, NF4_CODE, NF4Weight, dynamic_code_map, nf4_dequantize_reference

_FLOAT_DTYPES = ("float32", "bfloat16", "float16")
_VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def is_nf4(x) -> bool:
    """Whether ``x`` (a params leaf, or a subtree) is an NF4-quantized weight: the one test for it everywhere.
    As ``is_leaf`` of a tree walk it keeps each NF4Weight whole."""
    return isinstance(x, NF4Weight)


def stack_nf4(weights: list[NF4Weight]) -> NF4Weight:
    """Stacks per-layer NF4 weights of one kind along a new leading axis (for lax.scan over layers)."""
    if not weights:
        raise ValueError("stack_nf4 needs at least one weight")
    first = weights[0]
    static = (first.shape, first.blocksize, first.double_quant, first.dtype)
    for i, w in enumerate(weights):
        if (w.shape, w.blocksize, w.double_quant, w.dtype) != static or w.lead_shape != first.lead_shape:
            raise ValueError(
                f"stack_nf4: weight {i} has shape={w.shape}, blocksize={w.blocksize}, "
                f"double_quant={w.double_quant}, dtype={w.dtype}, lead={w.lead_shape}; weight 0 has "
                f"{static} and lead={first.lead_shape}"
            )
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *weights)


@jax.jit
def _nf4_codes_and_absmax(blocks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """blocks f32 [nblocks, blocksize] (the tail zero-padded) -> (codes uint8, absmax f32 [nblocks])."""
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    # bnb clamps absmax to 1e-38 before dividing, so an all-zero block scales to 0 (code 7). 1e-38 is an
    # f32 subnormal that XLA may flush to zero, so the zero block is handled explicitly instead.
    safe = jnp.where(absmax > 0, absmax, jnp.float32(1.0))
    scaled = jnp.clip(blocks * (jnp.float32(1.0) / safe)[:, None], -1.0, 1.0)
    mids = jnp.asarray((NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2.0))
    codes = jnp.sum(scaled[..., None] > mids, axis=-1, dtype=jnp.int32)
    return codes.astype(jnp.uint8), absmax


def _quantize_blockwise_dynamic(x: np.ndarray, blocksize: int = NESTED_BLOCKSIZE) -> tuple[np.ndarray, np.ndarray]:
    """bnb's quantize_blockwise with the signed dynamic map: x f32 [n] -> (codes uint8 [n], absmax f32
    [cdiv(n, blocksize)]), each code the nearest map level to x / absmax (ties to the lower level)."""
    n = x.size
    nb = _cdiv(n, blocksize)
    padded = np.zeros(nb * blocksize, np.float32)
    padded[:n] = x
    blocks = padded.reshape(nb, blocksize)
    absmax = np.abs(blocks).max(axis=1)
    inv = np.float32(1.0) / np.where(absmax > 0, absmax, np.float32(1.0))
    scaled = np.clip(blocks * inv[:, None], np.float32(-1.0), np.float32(1.0))
    code = dynamic_code_map()
    mids = (code[:-1] + code[1:]) / np.float32(2.0)
    q = np.searchsorted(mids, scaled.reshape(-1), side="left")
    return q[:n].astype(np.uint8), absmax.astype(np.float32)


def _quantize_one(w: np.ndarray, double_quant: bool, blocksize: int, dtype_name: str) -> NF4Weight:
    out_f, in_f = w.shape
    numel = w.size
    nblocks = _cdiv(numel, blocksize)
    flat = np.zeros(nblocks * blocksize, np.float32)
    flat[:numel] = w.reshape(-1).astype(np.float32)
    codes, absmax = _nf4_codes_and_absmax(jnp.asarray(flat.reshape(nblocks, blocksize)))
    codes = np.asarray(codes).reshape(-1)[:numel]
    if numel % 2:
        codes = np.concatenate([codes, np.array([7], np.uint8)])  # bnb pads with the code of 0.0
    packed = (codes[0::2] << 4) | codes[1::2]
    absmax = np.asarray(absmax)
    nested = offset = None
    if double_quant:
        offset = np.float32(absmax.astype(np.float64).mean())
        q, nested = _quantize_blockwise_dynamic(absmax - offset)
        absmax = q
        offset = jnp.asarray(offset)
        nested = jnp.asarray(nested)
    return NF4Weight(
        packed=jnp.asarray(packed.astype(np.uint8)),
        absmax=jnp.asarray(absmax),
        nested_absmax=nested,
        offset=offset,
        shape=(out_f, in_f),
        blocksize=blocksize,
        double_quant=double_quant,
        dtype=dtype_name,
    )


def quantize_nf4(w, *, double_quant: bool = True, blocksize: int = 64) -> NF4Weight:
    """Quantizes w [..., out, in] (numpy or jax; f32, bf16 or f16) to NF4 with bitsandbytes' bytes.

    Leading axes are quantized one matrix at a time (each with its own double-quant offset, as bnb does
    per layer) and stacked. Not jittable: the double-quant stage runs on the host.
    """
    if blocksize not in _VALID_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {_VALID_BLOCKSIZES}, got {blocksize}")
    dtype_name = jnp.dtype(w.dtype).name
    if dtype_name not in _FLOAT_DTYPES:
        raise TypeError(f"quantize_nf4 takes float32, bfloat16 or float16 weights, got {dtype_name}")
    if w.ndim < 2:
        raise ValueError(f"quantize_nf4 needs a weight of shape [..., out, in], got shape {w.shape}")
    w = np.asarray(w)
    if not np.isfinite(w.astype(np.float32)).all():
        raise ValueError(f"quantize_nf4: the weight of shape {w.shape} has NaN or inf entries")
    lead = w.shape[:-2]
    mats = w.reshape(-1, *w.shape[-2:])
    parts = [_quantize_one(m, double_quant, blocksize, dtype_name) for m in mats]
    if not lead:
        return parts[0]
    stacked = stack_nf4(parts)
    return jax.tree_util.tree_map(lambda a: a.reshape(*lead, *a.shape[1:]), stacked)


def split_nf4_rows(w: NF4Weight, start: int, stop: int) -> NF4Weight:
    """Rows [start, stop) of a single NF4 weight, exactly (Phi-3's fused qkv / gate_up split on load).

    Needs row boundaries on 64-weight blocks (true for every real model). The nested (256-block) level does not
    split along rows, so the slice keeps the double-quantized absmax in its dequantized f32 form: the same values,
    0.5 bit per weight more for these projections.
    """
    out_f, in_f = w.shape
    if not 0 <= start < stop <= out_f or (start * in_f) % w.blocksize or (stop * in_f) % w.blocksize:
        raise ValueError(
            f"cannot split rows [{start}, {stop}) of an NF4 weight of shape {w.shape}: "
            f"row boundaries must fall on {w.blocksize}-weight blocks"
        )
    absmax = np.asarray(w.absmax)
    if w.double_quant:
        nested = np.repeat(np.asarray(w.nested_absmax, np.float32), NESTED_BLOCKSIZE)[: absmax.size]
        absmax = dynamic_code_map()[absmax.astype(np.int64)] * nested + np.float32(np.asarray(w.offset))
    b0, b1 = start * in_f // w.blocksize, stop * in_f // w.blocksize
    return NF4Weight(
        packed=jnp.asarray(np.asarray(w.packed)[start * in_f // 2 : stop * in_f // 2]),
        absmax=jnp.asarray(absmax[b0:b1].astype(np.float32)),
        nested_absmax=None,
        offset=None,
        shape=(stop - start, in_f),
        blocksize=w.blocksize,
        double_quant=False,
        dtype=w.dtype,
    )


def dequantize_nf4(w: NF4Weight, dtype=jnp.bfloat16) -> jax.Array:
    """NF4Weight -> [..., out, in] in dtype (code * absmax in f32, then cast, as bnb does)."""
    return nf4_dequantize_reference(w, dtype)


_QUANT_STATE_KEY = "weight.quant_state.bitsandbytes__nf4"
_KNOWN_KEYS = {
    "weight",
    "weight.absmax",
    "weight.quant_map",
    "weight.nested_absmax",
    "weight.nested_quant_map",
    _QUANT_STATE_KEY,
}


def _require(tensors: dict[str, np.ndarray], key: str) -> np.ndarray:
    if key not in tensors:
        raise ValueError(f"bnb-4bit tensors: missing key {key!r} (have {sorted(tensors)})")
    return np.asarray(tensors[key])


def _check_array(arr: np.ndarray, key: str, dtype, size: int) -> np.ndarray:
    if arr.dtype != np.dtype(dtype):
        raise ValueError(f"bnb-4bit tensors: {key!r} must be {np.dtype(dtype).name}, got {arr.dtype}")
    if arr.size != size:
        raise ValueError(f"bnb-4bit tensors: {key!r} must hold {size} values, got shape {arr.shape}")
    return arr.reshape(-1)


def _read_quant_state(tensors: dict[str, np.ndarray]) -> dict:
    raw = _require(tensors, _QUANT_STATE_KEY)
    if raw.dtype != np.uint8:
        raise ValueError(f"bnb-4bit tensors: {_QUANT_STATE_KEY!r} must be uint8 JSON bytes, got {raw.dtype}")
    try:
        state = json.loads(bytes(raw.reshape(-1)).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"bnb-4bit tensors: {_QUANT_STATE_KEY!r} is not UTF-8 JSON: {e}") from e
    if not isinstance(state, dict):
        raise ValueError(f"bnb-4bit tensors: {_QUANT_STATE_KEY!r} must hold a JSON object, got {state!r}")
    for field in ("quant_type", "blocksize", "dtype", "shape"):
        if field not in state:
            raise ValueError(f"bnb-4bit tensors: {_QUANT_STATE_KEY!r} lacks {field!r}: {state}")
    if state["quant_type"] != "nf4":
        raise ValueError(f"bnb-4bit tensors: quant_type must be 'nf4', got {state['quant_type']!r}")
    if state["blocksize"] not in _VALID_BLOCKSIZES:
        raise ValueError(f"bnb-4bit tensors: blocksize must be one of {_VALID_BLOCKSIZES}, got {state['blocksize']}")
    if state["dtype"] not in _FLOAT_DTYPES:
        raise ValueError(f"bnb-4bit tensors: dtype must be one of {_FLOAT_DTYPES}, got {state['dtype']!r}")
    shape = state["shape"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)):
        raise ValueError(f"bnb-4bit tensors: shape must be [out, in] of positive ints, got {shape!r}")
    return state


def nf4_from_bnb_tensors(tensors: dict[str, np.ndarray]) -> NF4Weight:
    """The tensors a ``*-bnb-4bit`` safetensors checkpoint stores under one linear's prefix (keys relative
    to it: weight, weight.absmax, weight.quant_map, [weight.nested_absmax, weight.nested_quant_map,]
    weight.quant_state.bitsandbytes__nf4; other keys such as bias are ignored) -> NF4Weight.
    Raises ValueError naming the key on anything missing, malformed or not NF4."""
    unknown = sorted(k for k in tensors if k.startswith("weight") and k not in _KNOWN_KEYS)
    if unknown:
        raise ValueError(f"bnb-4bit tensors: unknown keys {unknown}")
    state = _read_quant_state(tensors)
    out_f, in_f = state["shape"]
    blocksize = state["blocksize"]
    numel = out_f * in_f
    nblocks = _cdiv(numel, blocksize)
    packed = _check_array(_require(tensors, "weight"), "weight", np.uint8, _cdiv(numel, 2))
    qmap = _check_array(_require(tensors, "weight.quant_map"), "weight.quant_map", np.float32, 16)
    if not np.array_equal(qmap, NF4_CODE):
        raise ValueError(f"bnb-4bit tensors: 'weight.quant_map' is not the NF4 code table: {qmap}")
    double_quant = "weight.nested_absmax" in tensors
    nested = offset = None
    if double_quant:
        for field in ("nested_blocksize", "nested_offset", "nested_dtype"):
            if field not in state:
                raise ValueError(f"bnb-4bit tensors: {_QUANT_STATE_KEY!r} lacks {field!r} for double quant")
        if state["nested_blocksize"] != NESTED_BLOCKSIZE:
            raise ValueError(f"bnb-4bit tensors: nested_blocksize must be 256, got {state['nested_blocksize']}")
        if state["nested_dtype"] != "float32":
            raise ValueError(f"bnb-4bit tensors: nested_dtype must be 'float32', got {state['nested_dtype']!r}")
        offset = np.float32(state["nested_offset"])
        if not np.isfinite(offset):
            raise ValueError(f"bnb-4bit tensors: nested_offset must be finite, got {state['nested_offset']}")
        absmax = _check_array(_require(tensors, "weight.absmax"), "weight.absmax", np.uint8, nblocks)
        nested = _check_array(
            _require(tensors, "weight.nested_absmax"),
            "weight.nested_absmax",
            np.float32,
            _cdiv(nblocks, NESTED_BLOCKSIZE),
        )
        nqmap = _check_array(_require(tensors, "weight.nested_quant_map"), "weight.nested_quant_map", np.float32, 256)
        if not np.array_equal(nqmap, dynamic_code_map()):
            raise ValueError("bnb-4bit tensors: 'weight.nested_quant_map' is not bnb's signed dynamic 8-bit map")
        nested, offset = jnp.asarray(nested), jnp.asarray(offset)
    else:
        if "weight.nested_quant_map" in tensors:
            raise ValueError("bnb-4bit tensors: 'weight.nested_quant_map' without 'weight.nested_absmax'")
        absmax = _check_array(_require(tensors, "weight.absmax"), "weight.absmax", np.float32, nblocks)
    return NF4Weight(
        packed=jnp.asarray(packed),
        absmax=jnp.asarray(absmax),
        nested_absmax=nested,
        offset=offset,
        shape=(out_f, in_f),
        blocksize=blocksize,
        double_quant=double_quant,
        dtype=state["dtype"],
    )


def nf4_to_bnb_tensors(w: NF4Weight) -> dict[str, np.ndarray]:
    """NF4Weight (one layer) -> the tensors bitsandbytes/transformers save under a linear's prefix
    (weight as uint8 [cdiv(out*in, 2), 1], the quant state JSON packed as uint8 bytes)."""
    if w.lead_shape:
        raise ValueError(f"nf4_to_bnb_tensors takes one layer; this weight has leading axes {w.lead_shape}")
    out = {
        "weight": np.array(w.packed).reshape(-1, 1),
        "weight.absmax": np.array(w.absmax),
        "weight.quant_map": NF4_CODE.copy(),
    }
    state = {"quant_type": "nf4", "blocksize": w.blocksize, "dtype": w.dtype, "shape": list(w.shape)}
    if w.double_quant:
        out["weight.nested_absmax"] = np.array(w.nested_absmax)
        out["weight.nested_quant_map"] = dynamic_code_map().copy()
        state.update(
            nested_blocksize=NESTED_BLOCKSIZE,
            nested_dtype="float32",
            nested_offset=float(np.asarray(w.offset)),
        )
    out[_QUANT_STATE_KEY] = np.frombuffer(json.dumps(state).encode("utf-8"), np.uint8).copy()
    return out
