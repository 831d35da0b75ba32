"""converters.hf: exact round trip, clear errors for every bad-checkpoint case."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from converters.hf import load_hf_model, save_hf_model
from converters.safetensors_io import SafetensorsError, SafetensorsFile, save_file
from tests.tiny_models import FAMILIES, saved_model


def _tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        sf = SafetensorsFile(f)
        out.update({k: np.array(sf[k]) for k in sf})
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_exact(family, tmp_path):
    src = saved_model(family)
    config, params = load_hf_model(src, dtype=jnp.float32)
    save_hf_model(params, config, tmp_path / "out")
    a, b = _tensors(src), _tensors(tmp_path / "out")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_round_trip_through_transformers_sharded(tmp_path):
    """Our sharded export (with an index) loads in transformers with identical tensors."""
    import torch
    from transformers import AutoModelForCausalLM

    src = saved_model("qwen2")
    config, params = load_hf_model(src, dtype=jnp.float32)
    save_hf_model(params, config, tmp_path / "out", max_shard_size=100_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict()
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).state_dict()
    assert ours.keys() == ref.keys()
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k


def _copy(tmp_path, family="llama"):
    dst = tmp_path / "m"
    shutil.copytree(saved_model(family), dst)
    return dst


def test_missing_config(tmp_path):
    d = _copy(tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_model(d)


def test_missing_weights(tmp_path):
    d = _copy(tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_model(d)


def test_missing_shard_names_path(tmp_path):
    src = saved_model("llama")
    config, params = load_hf_model(src, dtype=jnp.float32)
    d = save_hf_model(params, config, tmp_path / "sharded", max_shard_size=50_000)
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_hf_model(d)


def test_truncated_file_names_file(tmp_path):
    d = _copy(tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(SafetensorsError, match=r"model\.safetensors.*truncated"):
        load_hf_model(d)


def test_corrupt_header_names_file(tmp_path):
    d = _copy(tmp_path)
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:16] = b"\xff" * 8
    f.write_bytes(bytes(data))
    with pytest.raises(SafetensorsError, match=r"model\.safetensors.*corrupt"):
        load_hf_model(d)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    d = _copy(tmp_path)
    t = _tensors(d)
    t["model.layers.1.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"][:-1]
    save_file(t, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\(135, 96\).*\(136, 96\)"):
        load_hf_model(d)


def test_missing_and_unexpected_keys_listed(tmp_path):
    d = _copy(tmp_path)
    t = _tensors(d)
    del t["model.layers.2.self_attn.k_proj.weight"]
    t["model.layers.2.self_attn.extra.weight"] = np.zeros(3, np.float32)
    save_file(t, d / "model.safetensors")
    with pytest.raises(ValueError) as e:
        load_hf_model(d)
    msg = str(e.value)
    assert "missing keys" in msg and "model.layers.2.self_attn.k_proj.weight" in msg
    assert "unexpected keys" in msg and "model.layers.2.self_attn.extra.weight" in msg


def test_unsupported_model_type_lists_supported(tmp_path):
    d = _copy(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"gpt2.*llama, mistral, gemma, gemma2, qwen2, phi3"):
        load_hf_model(d)


@pytest.mark.parametrize("name", ["gemma3-1b", "gemma3-12b"])
def test_gemma3_hub_config_fields_read_as_transformers_reads_them(name):
    """The Hub's Gemma 3 config.json (rope_local_base_freq, sliding_window_pattern, rope_scaling; a multimodal
    checkpoint's text_config listing only what differs from Gemma3TextConfig's defaults) gives the ModelConfig
    of transformers' own reading of it (rope_parameters per layer type, layer_types)."""
    import dataclasses

    from transformers import Gemma3TextConfig

    from jaxsloth.models.config import GEMMA3_TEXT_DEFAULTS, config_from_hf_dict
    from jaxsloth.models.presets import PRESETS

    hub = {k: v for k, v in PRESETS[name].items() if k != "model_type"}
    ours = config_from_hf_dict({"model_type": "gemma3_text", **hub})
    theirs = config_from_hf_dict(Gemma3TextConfig(**hub).to_dict())
    sparse = {k: v for k, v in hub.items() if GEMMA3_TEXT_DEFAULTS.get(k, object()) != v}
    multimodal = config_from_hf_dict({"model_type": "gemma3", "text_config": sparse, "vision_config": {}})
    for config in (ours, multimodal):
        for field in dataclasses.fields(config):
            if field.name != "hf_config":
                assert getattr(config, field.name) == getattr(theirs, field.name), field.name
    assert theirs.layer_types.count("full_attention") == theirs.num_layers // 6
    assert theirs.local_rope.theta == 10000.0 and theirs.rope.theta == 1e6
