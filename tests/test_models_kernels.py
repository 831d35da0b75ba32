"""The whole decoder with every op on its Pallas kernel (interpret mode on CPU) equals the reference path:
loss and LoRA gradients, dense and NF4 (QLoRA) base weights, Llama and Gemma 2 (softcap, windows, GeGLU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsloth.lora import LoraConfig, init_lora, with_trainable
from jaxsloth.models import init_params
from jaxsloth.models.config import config_from_hf_dict
from jaxsloth.models.decoder import LINEARS, loss_sum_and_count
from jaxsloth.ops import KernelChoice, Ops
from jaxsloth.quant import quantize_nf4
from tests.tolerances import assert_close

# Kernel-friendly but not power-of-two sizes: hidden and MLP multiples of 64 (NF4 blocks stay in a row).
_BASE = dict(
    vocab_size=200,
    hidden_size=192,
    intermediate_size=320,
    num_hidden_layers=2,
    num_attention_heads=3,
    num_key_value_heads=1,
    head_dim=64,
    rms_norm_eps=1e-5,
    max_position_embeddings=128,
)
CONFIGS = {
    "llama": {**_BASE, "model_type": "llama", "rope_theta": 10000.0},
    "gemma2": {
        **_BASE,
        "model_type": "gemma2",
        "sliding_window": 9,
        "attn_logit_softcapping": 20.0,
        "final_logit_softcapping": 15.0,
        "query_pre_attn_scalar": 64,
        "hidden_activation": "gelu_pytorch_tanh",
    },
}


def quantize_projections(params: dict) -> dict:
    """The same params with every projection weight quantized to NF4 (bitsandbytes' bytes)."""
    layers = dict(params["layers"])
    for name in LINEARS:
        layers[name] = {"weight": quantize_nf4(np.asarray(layers[name]["weight"]))}
    return {**params, "layers": layers}


def _loss_and_grads(params, trainable, batch, config, lora, ops, loss_chunk=None):
    def f(t):
        p, lt = with_trainable(params, t)
        s, c = loss_sum_and_count(
            p, batch, config=config, ops=ops, lora=lt, lora_rt=lora.runtime, head_grad=False, loss_chunk=loss_chunk
        )
        return s / c

    return jax.value_and_grad(f)(trainable)


@pytest.mark.parametrize("family,quantized", [("llama", False), ("llama", True), ("gemma2", False)])
def test_pallas_path_equals_reference(family, quantized):
    config = config_from_hf_dict(CONFIGS[family])
    params = init_params(config, jax.random.key(0), jnp.float32, std=0.05)
    if quantized:
        params = quantize_projections(params)
    lora = LoraConfig(r=4, lora_alpha=8.0)
    trainable = init_lora(config, lora, jax.random.key(1))
    trainable = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.key(2), x.shape), trainable)
    rng = np.random.default_rng(3)
    t = 37
    tokens = rng.integers(0, config.vocab_size, (2, t))
    seg = np.concatenate([np.ones((2, 20)), 2 * np.ones((2, 15)), np.zeros((2, 2))], axis=1).astype(np.int32)
    pos = np.concatenate([np.arange(20), np.arange(15), np.arange(2)])[None].repeat(2, 0).astype(np.int32)
    targets = np.where(seg > 0, rng.integers(0, config.vocab_size, (2, t)), -100)
    batch = {
        k: jnp.asarray(v, jnp.int32)
        for k, v in dict(tokens=tokens, targets=targets, positions=pos, segment_ids=seg).items()
    }

    ref_loss, ref_g = _loss_and_grads(params, trainable, batch, config, lora, Ops(KernelChoice()))
    pal_loss, pal_g = _loss_and_grads(
        params, trainable, batch, config, lora, Ops(KernelChoice.all("pallas", interpret=True))
    )
    assert_close(pal_loss, ref_loss, "f32")
    for path, a in jax.tree_util.tree_flatten_with_path(pal_g)[0]:
        b = ref_g
        for k in path:
            b = b[k.key]
        assert_close(a, b, "f32_grad", err_msg=jax.tree_util.keystr(path))


def test_quantized_model_through_the_xla_nf4_path():
    # The decoder's QLoRA linears through the plain-XLA NF4 path (f32 activations): loss and LoRA gradients
    # equal the reference path's.
    config = config_from_hf_dict(CONFIGS["llama"])
    params = init_params(config, jax.random.key(0), jnp.float32, std=0.05)
    params = quantize_projections(params)
    lora = LoraConfig(r=4, lora_alpha=8.0)
    trainable = jax.tree.map(
        lambda x: x + 0.02 * jax.random.normal(jax.random.key(2), x.shape), init_lora(config, lora, jax.random.key(1))
    )
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, (2, 21))
    batch = {"tokens": jnp.asarray(tokens, jnp.int32), "targets": jnp.asarray(np.roll(tokens, -1, axis=1), jnp.int32)}
    ref_loss, ref_g = _loss_and_grads(params, trainable, batch, config, lora, Ops(KernelChoice()))
    loss, g = _loss_and_grads(params, trainable, batch, config, lora, Ops(KernelChoice(nf4_matmul="xla16")))
    assert_close(loss, ref_loss, "f32")
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g)[0], jax.tree.leaves(ref_g), strict=True):
        assert_close(a, b, "f32_grad", err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("family,loss_chunk", [("llama", None), ("gemma2", None), ("llama", 16)])
def test_chunked_loss_through_the_decoder(family, loss_chunk):
    # The token-chunked loss (gradient in the forward pass) as the decoder calls it, Gemma 2's final softcap
    # included, and inside the decoder's own rematerialised loss tiles: loss and LoRA gradients equal the reference
    # path's.
    config = config_from_hf_dict(CONFIGS[family])
    params = init_params(config, jax.random.key(0), jnp.float32, std=0.05)
    lora = LoraConfig(r=4, lora_alpha=8.0)
    trainable = jax.tree.map(
        lambda x: x + 0.02 * jax.random.normal(jax.random.key(2), x.shape), init_lora(config, lora, jax.random.key(1))
    )
    tokens = np.random.default_rng(4).integers(0, config.vocab_size, (2, 21))
    targets = np.roll(tokens, -1, axis=1)
    targets[:, -1] = -100
    batch = {"tokens": jnp.asarray(tokens, jnp.int32), "targets": jnp.asarray(targets, jnp.int32)}
    ref_loss, ref_g = _loss_and_grads(params, trainable, batch, config, lora, Ops(KernelChoice()))
    chunked = Ops(KernelChoice(cross_entropy="chunked"))
    loss, g = _loss_and_grads(params, trainable, batch, config, lora, chunked, loss_chunk=loss_chunk)
    assert_close(loss, ref_loss, "f32")
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g)[0], jax.tree.leaves(ref_g), strict=True):
        assert_close(a, b, "f32_grad", err_msg=jax.tree_util.keystr(path))


def _attention_forwards_per_remat(family, attention, remats, interpret=True, dtype=jnp.float32, t=19):
    """Attention forward launches in the jaxpr of the LoRA gradient per remat policy, and the gradients."""
    config = config_from_hf_dict(CONFIGS[family])
    params = init_params(config, jax.random.key(0), dtype, std=0.05)
    lora = LoraConfig(r=4, lora_alpha=8.0)
    trainable = init_lora(config, lora, jax.random.key(1))
    trainable = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.key(2), x.shape), trainable)
    tokens = np.random.default_rng(5).integers(0, config.vocab_size, (1, t))
    batch = {"tokens": jnp.asarray(tokens, jnp.int32), "targets": jnp.asarray(np.roll(tokens, -1, 1), jnp.int32)}
    ops = Ops(KernelChoice(attention=attention, interpret=interpret))
    launch = "name=flash_attention_fwd" if attention == "pallas" else "dot_product_attention_fwd"

    def loss(t, remat):
        p, lt = with_trainable(params, t)
        s, c = loss_sum_and_count(p, batch, config=config, ops=ops, lora=lt, lora_rt=lora.runtime, remat=remat)
        return s / c

    counts = {r: str(jax.make_jaxpr(jax.grad(lambda t, r=r: loss(t, r)))(trainable)).count(launch) for r in remats}
    grads = {r: jax.grad(lambda t, r=r: loss(t, r))(trainable) for r in remats}
    return counts, grads


def test_dots_remat_keeps_the_attention_forward():
    # "dots" keeps the attention launch's outputs (output, log-sum-exp) besides the projections, so the backward
    # runs no second attention forward; the gradients equal the un-rematerialised step's.
    counts, grads = _attention_forwards_per_remat("gemma2", "pallas", ("none", "dots", "attn_dots"))
    assert counts["dots"] == counts["none"] < counts["attn_dots"]
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(grads["dots"])[0], jax.tree.leaves(grads["none"]), strict=True
    ):
        assert_close(a, b, "f32_grad", err_msg=jax.tree_util.keystr(path))


@pytest.mark.gpu
def test_dots_remat_keeps_the_cudnn_attention_forward():
    # cuDNN's flash attention takes 16-bit inputs only, and refused a 19-token sequence on the H200.
    counts, _ = _attention_forwards_per_remat(
        "llama", "cudnn", ("none", "dots", "attn_dots"), interpret=None, dtype=jnp.bfloat16, t=64
    )
    assert counts["dots"] == counts["none"] < counts["attn_dots"]
