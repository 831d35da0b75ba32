"""Phi-3's fused qkv_proj / gate_up_proj quantized on load as bitsandbytes quantizes the fused tensor.

bitsandbytes quantizes the checkpoint's fused tensor, so its double-quant statistics (the absmax mean offset and
the nested blocks of 256 absmax) are those of the fused tensor; quantizing our split projections separately gives
other statistics and other weights. The reference is bitsandbytes' own quantizer, step by step, with two
choices fixed where bitsandbytes' result depends on its device (tests/test_quant.py checks both against it):
the offset is the exactly rounded mean (bitsandbytes takes torch's f32 mean, summed in a device-dependent
order: they can differ by one f32 step), and the nested 8-bit codes are the nearest levels, as its CUDA kernel
and its pure-torch backend pick them (its CPU library looks codes up in a table and may pick a neighbour).
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from converters.hf import load_hf_model
from converters.safetensors_io import SafetensorsFile, save_file
from jaxsloth.models import forward
from jaxsloth.quant import dequantize_nf4
from tests.test_load_4bit import _dequant_from_bnb_state, _is_proj
from tests.tiny_models import saved_model

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes.functional import QuantState, get_4bit_type, quantize_blockwise  # noqa: E402

FUSED = {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "mlp.gate_up_proj": ("gate_proj", "up_proj")}


def _exact_mean(absmax: torch.Tensor) -> torch.Tensor:
    return torch.tensor(np.float32(absmax.numpy().astype(np.float64).mean()))


def _nearest_codes(x: torch.Tensor, state2) -> torch.Tensor:
    """bitsandbytes' pure-torch quantize_blockwise codes (backends/default/ops.py; its CUDA kernel's rounding):
    x / absmax per block of 256, bucketized on the midpoints of the dynamic map."""
    scale = torch.repeat_interleave(state2.absmax, 256)[: x.numel()]
    scaled = torch.clamp(x * (1.0 / scale.clamp(min=1e-38)), -1, 1)
    code = state2.code
    return torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, out_int32=True).to(torch.uint8)


def _bnb_quantize(w: torch.Tensor, offset=_exact_mean):
    """bitsandbytes' quantize_4bit (NF4, blocks of 64, double quant) step by step with its own ops, the offset
    taken by ``offset(absmax)``: (packed, QuantState)."""
    packed, absmax = torch.ops.bitsandbytes.quantize_4bit.default(w, 64, "nf4", torch.uint8)
    off = offset(absmax)
    _, state2 = quantize_blockwise(absmax - off, blocksize=256)
    qabsmax = _nearest_codes(absmax - off, state2)
    state = QuantState(
        absmax=qabsmax,
        shape=w.shape,
        dtype=w.dtype,
        blocksize=64,
        code=get_4bit_type("nf4", device=w.device),
        quant_type="nf4",
        offset=off,
        state2=state2,
    )
    return packed, state


def test_the_reference_is_bitsandbytes_quantize_4bit():
    w = torch.from_numpy(
        np.array(SafetensorsFile(saved_model("phi3") / "model.safetensors")[_key(1, "mlp.gate_up_proj")])
    )
    packed, state = bnb.functional.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
    ours_packed, ours_state = _bnb_quantize(w, offset=lambda a: a.mean())
    assert torch.equal(packed, ours_packed)
    assert torch.equal(state.offset, ours_state.offset)
    assert torch.equal(state.state2.absmax, ours_state.state2.absmax)
    near = (state.absmax.int() - ours_state.absmax.int()).abs()
    assert near.max() <= 1 and near.float().mean() < 0.02  # bnb's CPU table lookup: at most a neighbouring level
    assert float(_exact_mean(torch.ops.bitsandbytes.quantize_4bit.default(w, 64, "nf4", torch.uint8)[1])) == float(
        state.offset
    )  # this tensor's means agree, so the exact-mean reference is bitsandbytes' own result here


def _key(layer: int, fused: str) -> str:
    return f"model.layers.{layer}.{fused}.weight"


def test_fused_projections_quantize_like_bitsandbytes_on_the_fused_tensor():
    path = saved_model("phi3")
    config, params = load_hf_model(path, dtype=jnp.float32, load_in_4bit=True)
    sf = SafetensorsFile(path / "model.safetensors")
    for layer in range(config.num_layers):
        for fused, parts in FUSED.items():
            packed, state = _bnb_quantize(torch.from_numpy(np.array(sf[_key(layer, fused)])))
            ours = [jax.tree.map(lambda a, i=layer: a[i], params["layers"][p]["weight"]) for p in parts]
            where = f"layer {layer} {fused}"
            ours_packed = np.concatenate([np.asarray(o.packed) for o in ours])
            np.testing.assert_array_equal(ours_packed, packed.numpy().reshape(-1), err_msg=where)
            ours_w = np.concatenate([np.asarray(dequantize_nf4(o, jnp.float32)) for o in ours])
            np.testing.assert_array_equal(ours_w, _dequant_from_bnb_state(packed, state).numpy(), err_msg=where)


def test_bnb_prequantized_phi3_gives_the_logits_of_quantizing_on_load(tmp_path):
    """A *-bnb-4bit Phi-3 checkpoint written from bitsandbytes' quantization and QuantState serialization loads
    to exactly the weights, so exactly the logits, of quantizing the f32 checkpoint on load."""
    src = saved_model("phi3")
    dst = tmp_path / "bnb"
    shutil.copytree(src, dst)
    sf = SafetensorsFile(dst / "model.safetensors")
    tensors = {k: np.array(sf[k]) for k in sf}
    for key in [k for k in tensors if _is_proj(k)]:
        packed, state = _bnb_quantize(torch.from_numpy(tensors.pop(key)))
        tensors[key] = packed.numpy()
        for k, v in state.as_dict(packed=True).items():
            tensors[f"{key}.{k}"] = v.numpy()
    save_file(tensors, dst / "model.safetensors")
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (dst / "config.json").write_text(json.dumps(cfg))

    config, pre = load_hf_model(dst, dtype=jnp.float32)
    _, ours = load_hf_model(src, dtype=jnp.float32, load_in_4bit=True)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 11)))
    np.testing.assert_array_equal(
        np.asarray(forward(ours, ids, config=config)), np.asarray(forward(pre, ids, config=config))
    )
