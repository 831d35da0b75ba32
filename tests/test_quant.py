"""NF4 quantization against bitsandbytes 0.50 on CPU (its quantize_4bit runs there through the default
backend), the bnb-4bit checkpoint tensors, and the NF4Weight pytree."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsloth.quant import (
    NF4Weight,
    _quantize_blockwise_dynamic,
    dequantize_nf4,
    nf4_from_bnb_tensors,
    nf4_to_bnb_tensors,
    quantize_nf4,
    stack_nf4,
)
from pallas_kernels.nf4_matmul import NF4_CODE, dynamic_code_map, nf4_matmul_reference
from tests.tolerances import assert_close

torch = pytest.importorskip("torch")
bnbF = pytest.importorskip("bitsandbytes.functional")

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _weight(shape, dtype: str, seed: int) -> np.ndarray:
    """Fresh random weights (never zero) in dtype, with one all-zero 64-block to hit bnb's zero handling."""
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.03
    w.reshape(-1)[64:128] = 0.0
    return np.asarray(jnp.asarray(w, dtype))


def _bnb_quantize(w: np.ndarray, double_quant: bool):
    t = torch.from_numpy(np.array(w, np.float32)).to(_TORCH_DTYPES[jnp.dtype(w.dtype).name])
    return bnbF.quantize_4bit(t, quant_type="nf4", compress_statistics=double_quant, blocksize=64)


def _bnb_tensors(w: np.ndarray, double_quant: bool) -> dict[str, np.ndarray]:
    """What bnb's Linear4bit._save_to_state_dict writes under `<prefix>.` (weight + packed quant state)."""
    packed, state = _bnb_quantize(w, double_quant)
    out = {"weight": packed.numpy()}
    out.update({"weight." + k: v.numpy() for k, v in state.as_dict(packed=True).items()})
    return out


def test_code_tables_match_bnb():
    np.testing.assert_array_equal(NF4_CODE, bnbF.get_4bit_type("nf4", device="cpu").numpy())
    np.testing.assert_array_equal(dynamic_code_map(), bnbF.create_dynamic_map().numpy())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("shape", [(96, 192), (7, 45)])  # (7, 45): odd count, partial last block
def test_nf4_bytes_match_bnb(dtype, shape):
    w = _weight(shape, dtype, seed=sum(shape))
    q = quantize_nf4(w, double_quant=False)
    packed, state = _bnb_quantize(w, double_quant=False)
    np.testing.assert_array_equal(np.asarray(q.packed), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(q.absmax), state.absmax.numpy())
    assert (q.shape, q.blocksize, q.double_quant, q.dtype) == (shape, 64, False, dtype)


def _nearest_dynamic_codes(x: np.ndarray) -> np.ndarray:
    """Independent reference for the nested stage: per block of 256, brute-force nearest level of the map
    to x / absmax (first index on a tie, i.e. the lower level)."""
    code = dynamic_code_map().astype(np.float64)
    out = []
    for start in range(0, x.size, 256):
        blk = x[start : start + 256]
        s = np.clip(blk * (np.float32(1.0) / np.abs(blk).max()), -1, 1).astype(np.float64)
        out.append(np.argmin(np.abs(s[:, None] - code[None, :]), axis=1))
    return np.concatenate(out).astype(np.uint8)


def test_double_quant_matches_bnb():
    w = _weight((128, 320), "bfloat16", seed=3)
    q = quantize_nf4(w, double_quant=True)
    packed, state = _bnb_quantize(w, double_quant=True)
    _, plain = _bnb_quantize(w, double_quant=False)
    np.testing.assert_array_equal(np.asarray(q.packed), packed.numpy().reshape(-1))
    # The offset is an f32 mean whose summation order is bnb-backend specific: equal to within an ulp.
    assert_close(np.asarray(q.offset), state.offset.numpy(), "f32")
    assert_close(np.asarray(q.nested_absmax), state.state2.absmax.numpy(), "f32")

    # The nested 8-bit stage on bnb's exact input: same second-level absmax, nearest-level codes.
    x = plain.absmax.numpy() - state.offset.numpy()
    codes, nested = _quantize_blockwise_dynamic(x)
    np.testing.assert_array_equal(nested, state.state2.absmax.numpy())
    np.testing.assert_array_equal(codes, _nearest_dynamic_codes(x))
    # bnb 0.50's CPU C++ path looks codes up in a 65536-entry table and may pick a neighbour near zero;
    # wherever it differs, ours is the nearer level.
    bnb_codes = state.absmax.numpy()
    diff = codes != bnb_codes
    assert diff.mean() < 0.02
    code = dynamic_code_map()
    s = x / np.repeat(nested, 256)[: x.size]
    assert np.all(np.abs(codes.astype(int) - bnb_codes.astype(int))[diff] == 1)
    assert np.all(np.abs(code[codes] - s)[diff] <= np.abs(code[bnb_codes] - s)[diff])


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dequantize_matches_bnb(double_quant, dtype):
    w = _weight((64, 256), dtype, seed=5)
    packed, state = _bnb_quantize(w, double_quant)
    expected = bnbF.dequantize_4bit(packed, state, quant_type="nf4").float().numpy()
    q = nf4_from_bnb_tensors(_bnb_tensors(w, double_quant))
    got = np.asarray(dequantize_nf4(q, jnp.dtype(dtype)).astype(jnp.float32))
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("double_quant", [False, True])
def test_bnb_tensors_round_trip(double_quant):
    tensors = _bnb_tensors(_weight((48, 128), "bfloat16", seed=7), double_quant)
    back = nf4_to_bnb_tensors(nf4_from_bnb_tensors(tensors))
    assert back.keys() == tensors.keys()
    for key, value in tensors.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key


def test_our_tensors_load_in_bnb():
    w = _weight((32, 192), "bfloat16", seed=11)
    q = quantize_nf4(w, double_quant=True)
    tensors = {k: torch.from_numpy(v) for k, v in nf4_to_bnb_tensors(q).items()}
    weight = tensors.pop("weight")
    state = bnbF.QuantState.from_dict({k.removeprefix("weight."): v for k, v in tensors.items()}, device="cpu")
    expected = bnbF.dequantize_4bit(weight, state, quant_type="nf4").float().numpy()
    np.testing.assert_array_equal(np.asarray(dequantize_nf4(q, jnp.bfloat16).astype(jnp.float32)), expected)


def _set_state(tensors, **changes):
    key = "weight.quant_state.bitsandbytes__nf4"
    state = json.loads(bytes(tensors[key]).decode())
    state.update(changes)
    return {**tensors, key: np.frombuffer(json.dumps(state).encode(), np.uint8)}


def test_bad_bnb_tensors_raise_clear_errors():
    good = _bnb_tensors(_weight((16, 128), "bfloat16", seed=13), double_quant=True)
    key = "weight.quant_state.bitsandbytes__nf4"
    cases = [
        ({k: v for k, v in good.items() if k != "weight.absmax"}, "weight.absmax"),
        ({k: v for k, v in good.items() if k != key}, "quant_state"),
        ({**good, "weight": good["weight"][:-1]}, "'weight' must hold"),
        ({**good, "weight": good["weight"].astype(np.int8)}, "'weight' must be uint8"),
        ({**good, "weight.absmax": good["weight.absmax"].astype(np.float32)}, "'weight.absmax' must be uint8"),
        ({**good, "weight.quant_map": good["weight.quant_map"][::-1].copy()}, "quant_map"),
        ({**good, "weight.nested_quant_map": good["weight.quant_map"]}, "nested_quant_map"),
        ({**good, key: np.frombuffer(b"{not json", np.uint8)}, "not UTF-8 JSON"),
        (_set_state(good, quant_type="fp4"), "quant_type"),
        (_set_state(good, shape=[16]), "shape"),
        (_set_state(good, nested_blocksize=128), "nested_blocksize"),
        (_set_state(good, dtype="int8"), "dtype"),
        ({**good, "weight.extra": good["weight"]}, "unknown keys"),
    ]
    for tensors, match in cases:
        with pytest.raises(ValueError, match=match):
            nf4_from_bnb_tensors(tensors)


def test_quantize_rejects_bad_input():
    with pytest.raises(TypeError, match="int32"):
        quantize_nf4(np.ones((4, 64), np.int32))
    with pytest.raises(ValueError, match="NaN"):
        quantize_nf4(np.full((4, 64), np.nan, np.float32))
    with pytest.raises(ValueError, match="shape"):
        quantize_nf4(np.ones((64,), np.float32))
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(np.ones((4, 64), np.float32), blocksize=48)


def test_stacked_pytree_under_scan_and_grad():
    layers, n, k, r = 3, 64, 128, 4
    ws = _weight((layers, n, k), "bfloat16", seed=17)
    stacked = quantize_nf4(ws, double_quant=True)
    assert stacked.lead_shape == (layers,) and stacked.shape == (n, k)
    per_layer = stack_nf4([quantize_nf4(w) for w in ws])
    for a, b in zip(jax.tree_util.tree_leaves(stacked), jax.tree_util.tree_leaves(per_layer)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert stacked.packed.dtype == jnp.uint8 and stacked.absmax.dtype == jnp.uint8

    rng = np.random.default_rng(19)
    lora = {
        "a": jnp.asarray(rng.standard_normal((layers, r, k)) * 0.1, jnp.float32),
        "b": jnp.asarray(rng.standard_normal((layers, n, r)) * 0.1, jnp.float32),
    }
    x0 = jnp.asarray(rng.standard_normal((5, k)), jnp.float32)

    def loss(lora, nf4: NF4Weight):
        def layer(x, params):
            w, a, b = params
            y = nf4_matmul_reference(x, w, a, b, 2.0)
            return x + jnp.tanh(y) @ jnp.ones((n, k), jnp.float32) / n, None

        x, _ = jax.lax.scan(layer, x0, (nf4, lora["a"], lora["b"]))
        return jnp.sum(x**2)

    g_lora, g_nf4 = jax.jit(jax.grad(loss, argnums=(0, 1), allow_int=True))(lora, stacked)
    assert float(jnp.abs(g_lora["a"]).max()) > 0 and float(jnp.abs(g_lora["b"]).max()) > 0
    assert g_nf4.packed.dtype == jax.dtypes.float0 and g_nf4.absmax.dtype == jax.dtypes.float0
    assert float(jnp.abs(g_nf4.nested_absmax).max()) == 0.0 and float(jnp.abs(g_nf4.offset).max()) == 0.0
    with pytest.raises(ValueError, match="leading axes"):
        nf4_to_bnb_tensors(stacked)
    with pytest.raises(ValueError, match="stack_nf4"):
        stack_nf4([quantize_nf4(ws[0]), quantize_nf4(ws[0], double_quant=False)])
