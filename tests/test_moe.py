"""Mixture of experts (Qwen 3 MoE, Mixtral) against transformers and PEFT: logits, the load-balancing loss, one
LoRA training step, PEFT adapter and merged exports, checkpoints (per-expert and fused), routing ties,
generation, and the full-size parameter counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from converters.hf import load_hf_model, save_hf_model
from jaxsloth.lora import LoraConfig, init_lora, merge, with_trainable
from jaxsloth.models import forward
from tests.moe_models import MOE_FAMILIES, saved_moe_model
from tests.tiny_models import hf_model, random_trainable
from tests.tolerances import assert_close

T = 19
R, ALPHA = 4, 8.0
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module", params=MOE_FAMILIES)
def family(request):
    return _loaded(request.param)


def _loaded(name):
    path = saved_moe_model(name)
    config, params = load_hf_model(path, dtype=jnp.float32)
    return path, config, params


# The slower tests run one family each (the expert code is the same for both): the logits and checkpoint tests run
# both, and each family's own fields (Qwen 3 MoE's q/k norms and renormalisation flag, Mixtral's names and always
# renormalised weights) go through one of the training-step tests.
@pytest.fixture(scope="module")
def qwen3_moe():
    return _loaded("qwen3_moe")


@pytest.fixture(scope="module")
def mixtral():
    return _loaded("mixtral")


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor(np.asarray(ids))).logits.float().numpy()


def test_logits_match_transformers(family):
    path, config, params = family
    assert config.is_moe and config.num_experts_per_tok < config.num_experts
    ids = np.random.default_rng(1).integers(0, config.vocab_size, (2, T))
    ours = jax.jit(lambda p, t: forward(p, t, config=config))(params, jnp.asarray(ids))
    assert_close(ours, _hf_logits(hf_model(path), ids), "f32_logits")


def _batch(config, seed=5):
    """A right-padded batch: ids, HF labels and attention mask, and our tokens/targets/segment_ids."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, config.vocab_size, (2, 13))
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    labels = np.where(mask == 1, ids, -100)
    labels[0, :4] = -100  # a prompt that is not trained on
    targets = np.concatenate([labels[:, 1:], np.full((2, 1), -100)], axis=1)
    ours = {
        "tokens": jnp.asarray(ids, jnp.int32),
        "targets": jnp.asarray(targets, jnp.int32),
        "segment_ids": jnp.asarray(mask, jnp.int32),
    }
    return ids, labels, mask, ours


def test_loss_with_load_balancing_matches_transformers(mixtral):
    """The training loss (mean token loss + router_aux_loss_coef x aux_loss) and the load-balancing loss the step
    logs as router_aux_loss are transformers' loss and aux_loss over the attention mask (Qwen 3 MoE's: in its
    training-step test's loss; the jitted step with the metric: tests/test_moe_bench.py)."""
    from jaxsloth.profiles import profile_for_device
    from jaxsloth.train.step import make_loss_fn

    path, config, params = mixtral
    ids, labels, mask, batch = _batch(config)
    with torch.no_grad():
        out = hf_model(path)(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels)
        )
    lora = LoraConfig(r=R, lora_alpha=ALPHA)
    trainable = init_lora(config, lora, jax.random.key(0))  # B = 0: the model's own loss
    loss_fn = make_loss_fn(config, lora, profile_for_device(name="cpu"), with_router_aux=True)
    total, (count, balance) = jax.jit(loss_fn)(trainable, params, batch, None)
    assert abs(float(balance) - out.aux_loss.item()) < 1e-5
    assert abs(float(total / count) - out.loss.item()) < 1e-5


def _peft_model(path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    cfg = PeftLoraConfig(
        r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(ATTENTION), target_parameters=EXPERT_PARAMS
    )
    model = get_peft_model(hf_model(path), cfg)
    torch.manual_seed(1)
    with torch.no_grad():  # B starts at zero in PEFT; make it non-zero so A's gradient is not trivially zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    return model


def _peft_key(i, module, ab):
    return f"base_model.model.model.layers.{i}.{module}.lora_{ab}.default.weight"


# Our expert LoRA -> PEFT's nested ParamWrapper (gate_up_proj wrapped first, so it is the inner base_layer).
_PEFT_EXPERT_MODULES = {"experts_gate_up": "mlp.experts.base_layer", "experts_down": "mlp.experts"}


def _peft_to_ours(sd, config, name, ab):
    """PEFT's tensors of one projection over the layers -> our layout ([L, r, in] / [L, out, r]; experts
    [L, E, r, in] / [L, E, out, r]), by PEFT's ParamWrapper reshapes (lora_A [E r, in], lora_B [out, r E])."""
    e = config.num_experts
    if name in ATTENTION:
        return np.stack([sd[_peft_key(i, f"self_attn.{name}", ab.upper())] for i in range(config.num_layers)])
    per = [sd[_peft_key(i, _PEFT_EXPERT_MODULES[name], ab.upper())] for i in range(config.num_layers)]
    if ab == "a":
        return np.stack([x.reshape(e, -1, x.shape[-1]) for x in per])
    return np.stack([x.reshape(x.shape[0], -1, e).transpose(2, 0, 1) for x in per])


def test_lora_step_matches_peft(qwen3_moe):
    """Loss (token loss + the load-balancing term) and every LoRA gradient, attention and experts, equal PEFT's on
    transformers, through the training step's loss (the jitted step itself: tests/test_moe_bench.py; Mixtral's
    step: the QLoRA test)."""
    path, config, params = qwen3_moe
    _check_step_against_peft(path, config, params)


def _check_step_against_peft(path, config, params):
    from jaxsloth.profiles import profile_for_device
    from jaxsloth.train.step import make_loss_fn

    peft = _peft_model(path)
    sd = {k: v.detach().numpy() for k, v in peft.state_dict().items() if "lora_" in k}
    names = (*ATTENTION, "experts_gate_up", "experts_down")
    trainable = {"layers": {n: {ab: jnp.asarray(_peft_to_ours(sd, config, n, ab)) for ab in ("a", "b")} for n in names}}
    lora = LoraConfig(r=R, lora_alpha=ALPHA)
    expected = init_lora(config, lora, jax.random.key(0))
    assert jax.tree.map(jnp.shape, expected) == jax.tree.map(jnp.shape, trainable)

    ids, labels, mask, batch = _batch(config)
    out = peft(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    assert out.aux_loss.item() > 0
    out.loss.backward()
    grads = {k: p.grad.numpy() for k, p in peft.named_parameters() if p.requires_grad}

    profile = profile_for_device(name="cpu")
    loss_fn = make_loss_fn(config, lora, profile)
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (l_sum, count), g = grad_fn(trainable, params, batch, jax.random.key(0))
    assert abs(float(l_sum / count) - out.loss.item()) < 1e-5
    for name in names:
        for ab in ("a", "b"):
            ref = _peft_to_ours(grads, config, name, ab)
            assert_close(g["layers"][name][ab] / count, ref, "f32_grad", err_msg=f"{name}.{ab}")


def test_peft_adapter_and_merged_export_load_in_transformers(qwen3_moe, tmp_path):
    """The adapter (PEFT's target_parameters layout for the experts) loads into PEFT on transformers, and the merged
    export into transformers, each with our LoRA logits; the adapter reads back unchanged."""
    from peft import PeftModel

    from converters.peft import load_peft_adapter, save_peft_adapter

    path, config, params = qwen3_moe
    lora = LoraConfig(r=R, lora_alpha=ALPHA)
    trainable = random_trainable(config, params, lora)
    assert set(trainable["layers"]) == {*ATTENTION, "experts_gate_up", "experts_down"}
    ids = np.random.default_rng(2).integers(0, config.vocab_size, (2, T))
    p, tree = with_trainable(params, trainable)
    ours = jax.jit(lambda p, t, i: forward(p, i, config=config, lora=t, lora_rt=lora.runtime))(p, tree, ids)

    save_peft_adapter(trainable, lora, config, tmp_path / "adapter")
    peft = PeftModel.from_pretrained(hf_model(path), tmp_path / "adapter").eval()
    assert_close(ours, _hf_logits(peft, ids), "f32_logits")
    back, back_lora = load_peft_adapter(tmp_path / "adapter", config)
    assert back_lora.scale == lora.scale
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back, trainable)

    save_hf_model(merge(params, trainable, lora), config, tmp_path / "merged", dtype=jnp.float32)
    assert_close(ours, _hf_logits(hf_model(tmp_path / "merged"), ids), "f32_logits")


def test_checkpoints_per_expert_and_fused(family, tmp_path):
    """save_pretrained's per-expert tensors are what export writes back, bit for bit; transformers 5's fused
    in-memory layout (experts.gate_up_proj, experts.down_proj) loads to the same params."""
    from safetensors.numpy import load_file, save_file

    path, config, params = family
    save_hf_model(params, config, tmp_path / "round", dtype=jnp.float32)
    original, written = load_file(path / "model.safetensors"), load_file(tmp_path / "round" / "model.safetensors")
    assert sorted(original) == sorted(written)
    for k in original:
        np.testing.assert_array_equal(original[k], written[k], err_msg=k)

    fused = {k: v.detach().numpy().copy() for k, v in hf_model(path).state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in fused)
    (tmp_path / "fused").mkdir()
    save_file(fused, tmp_path / "fused" / "model.safetensors")
    (tmp_path / "fused" / "config.json").write_text((path / "config.json").read_text())
    _, again = load_hf_model(tmp_path / "fused", dtype=jnp.float32)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), again, params)


def test_qlora_step_matches_peft_on_the_dequantized_weights(mixtral, tmp_path):
    """load_in_4bit quantizes attention and every expert matrix on its own to NF4 (bitsandbytes' bytes for that
    matrix) and keeps the router exact. The QLoRA step's loss and LoRA gradients equal PEFT's on transformers holding
    the dequantized weights (bitsandbytes dequantizes before each matmul: the same arithmetic in f32)."""
    from jaxsloth.quant import is_nf4, quantize_nf4

    path, config, params = mixtral
    _, q = load_hf_model(path, dtype=jnp.float32, load_in_4bit=True)
    for n in (*ATTENTION, "experts_gate_up", "experts_down"):
        assert is_nf4(q["layers"][n]["weight"]), n
    np.testing.assert_array_equal(np.asarray(q["layers"]["router"]["weight"]), params["layers"]["router"]["weight"])
    one = quantize_nf4(np.asarray(params["layers"]["experts_down"]["weight"][1, 3]))
    np.testing.assert_array_equal(np.asarray(q["layers"]["experts_down"]["weight"].packed[1, 3]), one.packed)
    np.testing.assert_array_equal(np.asarray(q["layers"]["experts_down"]["weight"].absmax[1, 3]), one.absmax)
    save_hf_model(q, config, tmp_path / "dequantized", dtype=jnp.float32)
    _check_step_against_peft(tmp_path / "dequantized", config, q)


def test_greedy_generation_matches_transformers(qwen3_moe):
    from jaxsloth.generate import generate

    path, config, params = qwen3_moe
    prompts = [[5, 9, 17, 33, 2 + 1], [7, 11, 13]]
    ours = generate(params, config, prompts, max_new_tokens=6, temperature=0.0, stop_tokens=())
    model = hf_model(path)
    for prompt, got in zip(prompts, ours, strict=True):
        with torch.no_grad():
            ref = model.generate(
                torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        assert got == ref[0, len(prompt) :].tolist()


def test_routing_ties_resolve_as_torch_topk():
    """Experts with equal router rows tie on every token. Where torch.topk's choice follows from the values (both
    tied experts in the top k, or both out), both frameworks pick the same experts with the same weights; a tie at
    the k-th place goes to the lower expert id here, while torch's CPU selection (an unstable partition) may take
    either, so there the two choices must be the tied pair and the weights equal."""
    from jaxsloth.models.config import config_from_hf_dict
    from jaxsloth.models.moe import route
    from tests.moe_models import hf_moe_config

    for fam in MOE_FAMILIES:
        config = config_from_hf_dict(hf_moe_config(fam).to_dict())
        rng = np.random.default_rng(0)
        w = rng.normal(size=(config.num_experts, config.hidden_size)).astype(np.float32)
        w[2] = w[1]
        x = rng.normal(size=(64, config.hidden_size)).astype(np.float32)
        weights, experts, _ = route(jnp.asarray(x), jnp.asarray(w), config)
        probs = torch.softmax(torch.tensor(x) @ torch.tensor(w).T, dim=-1)
        ref_w, ref_i = torch.topk(probs, config.num_experts_per_tok, dim=-1)
        if config.norm_topk_prob:
            ref_w = ref_w / ref_w.sum(-1, keepdim=True)
        assert_close(np.sort(np.asarray(weights), -1), np.sort(ref_w.numpy(), -1), "f32")
        both = 0
        for ours, ref in zip(np.asarray(experts), ref_i.numpy(), strict=True):
            if {1, 2} <= set(ours):
                both += 1
            if set(ours) != set(ref):
                assert set(ours) ^ set(ref) == {1, 2} and 1 in ours, (ours, ref)
        assert both > 0


@pytest.mark.parametrize("name", ["mixtral-8x7b"])  # Qwen3-30B-A3B: 12 s on the meta device; published count only
def test_full_size_param_count_matches_transformers(name):
    """The eval_shape count equals transformers' model built on the meta device (and the published count; every
    preset's: tests/test_full_size_shapes.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from jaxsloth.models import count_params, init_params
    from jaxsloth.models.presets import PRESETS, PUBLISHED_PARAM_COUNTS, preset

    config = preset(name)
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0), jnp.bfloat16))
    d = dict(PRESETS[name])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(d.pop("model_type"), **d))
    assert count_params(shapes) == sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAM_COUNTS[name]


def test_unsupported_moe_configs_name_the_field():
    from jaxsloth.models.config import config_from_hf_dict
    from tests.moe_models import hf_moe_config

    d = hf_moe_config("qwen3_moe").to_dict()
    with pytest.raises(ValueError, match="mlp_only_layers"):
        config_from_hf_dict({**d, "mlp_only_layers": [1]})
    with pytest.raises(ValueError, match="router_jitter_noise"):
        config_from_hf_dict({**hf_moe_config("mixtral").to_dict(), "router_jitter_noise": 0.1})
    config = config_from_hf_dict(d)
    with pytest.raises(ValueError, match="gate_proj/up_proj"):
        init_lora(config, LoraConfig(r=4, target_modules=("q_proj", "gate_proj")), jax.random.key(0))
    with pytest.raises(ValueError, match="lora_dropout"):
        init_lora(config, LoraConfig(r=4, lora_dropout=0.1), jax.random.key(0))
