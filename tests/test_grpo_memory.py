"""GRPO's memory, pinned on compiled CPU programs: the sampling program's KV cache (compute dtype, exactly prompt
bucket + max_completion_length slots, each prompt's slots held once for its G rows), the LM head's backward without
an f32 copy of the head, the log-prob passes; and G completions per prompt against transformers' greedy generate."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from converters.hf import load_hf_model
from jaxsloth import generate as gen
from jaxsloth.methods import grpo_step
from jaxsloth.models.config import ModelConfig
from jaxsloth.models.decoder import init_params
from tests.test_generate import _hf_greedy
from tests.tiny_models import hf_model, saved_model

CONFIG = ModelConfig(
    model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
    num_kv_heads=2, head_dim=32, tie_word_embeddings=True,
)  # fmt: skip
U, G, PROMPT, NEW = 2, 16, 60, 100  # the prompt bucket is 64; NEW's bucket (128) is not used


@functools.cache
def _sampling_program():
    params = init_params(CONFIG, jax.random.key(0), jnp.bfloat16)
    prompts = [[3 + i] * PROMPT for i in range(U)]
    args, static = gen._program_inputs(
        params, CONFIG, prompts, max_new_tokens=NEW, temperature=1.0, num_return_sequences=G, exact_length=True,
        compute_dtype=jnp.bfloat16,
    )  # fmt: skip
    return args, static


def _kv_bytes(rows_slots: int) -> int:
    """Bytes of keys and values for ``rows_slots`` (row, slot) pairs of the tiny config in bf16."""
    return 2 * CONFIG.num_layers * CONFIG.num_kv_heads * CONFIG.head_dim * 2 * rows_slots


def test_sampling_cache_is_exact_shared_and_in_the_compute_dtype():
    args, static = _sampling_program()
    static = dict(static)
    new_slots, copies = static.pop("new_slots"), static.pop("copies")
    state, pads = jax.eval_shape(functools.partial(gen._start, new_slots=new_slots, copies=copies, **static), *args)
    (prompt_k, own_k), (prompt_v, own_v) = state["cache_k"], state["cache_v"]
    kv = (CONFIG.num_kv_heads, CONFIG.head_dim)
    assert prompt_k.shape == prompt_v.shape == (CONFIG.num_layers, U, 64, *kv)
    assert own_k.shape == own_v.shape == (CONFIG.num_layers, U * G, NEW, *kv)
    assert {a.dtype for a in (prompt_k, prompt_v, own_k, own_v)} == {jnp.dtype(jnp.bfloat16)}
    assert pads.shape == (U * G,)


def test_sampling_program_memory_is_the_cache_and_little_more():
    """The compiled program's temporaries: the shared prompt slots (U x P) and each row's new slots (B x NEW), one
    layer's slice of them read by the decode step's attention, and a small remainder. A cache of every row's prompt and NEW's bucket (B x (P + 128), the rows' prompts repeated
    and the slots rounded up) would alone exceed the bound."""
    args, static = _sampling_program()
    memory = gen._generate_padded.lower(*args, jnp.int32(NEW), **static).compile().memory_analysis()
    exact = _kv_bytes(U * 64 + U * G * NEW)
    bound = exact * (1 + 1 / CONFIG.num_layers) + 2**19  # + the tiny model's weights' and sampling's temporaries
    assert memory.temp_size_in_bytes <= bound, (memory.temp_size_in_bytes, exact)
    assert _kv_bytes(U * G * (64 + 128)) > bound


def test_g_completions_per_prompt_match_transformers_greedy():
    """num_return_sequences rows share their prompt's cache slots (sliding window and softcaps: Gemma 2)."""
    path = saved_model("gemma2")
    config, params = load_hf_model(path, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, config.vocab_size, n).tolist() for n in (5, 13, 2)]
    ours = gen.generate(params, config, prompts, max_new_tokens=9, num_return_sequences=3)
    hf = _hf_greedy(hf_model(path), prompts, 9)
    assert ours == [row for row in hf for _ in range(3)]


def test_head_backward_keeps_the_head_in_the_compute_dtype():
    """The log-prob gradient reaches the hidden states through a bf16 head: no f32 [V, D] copy of it exists."""
    params = {"embed": jnp.zeros((CONFIG.vocab_size, CONFIG.hidden_size), jnp.bfloat16)}
    hidden = jax.ShapeDtypeStruct((48, CONFIG.hidden_size), jnp.bfloat16)
    targets = jax.ShapeDtypeStruct((48,), jnp.int32)

    def loss(h, t):
        return grpo_step.token_logps_entropy(params, h, t, config=CONFIG, chunk=16)[0].sum()

    hlo = jax.jit(jax.grad(loss)).lower(hidden, targets).compile().as_text()
    assert f"f32[{CONFIG.vocab_size},{CONFIG.hidden_size}]" not in hlo


def test_logps_run_in_passes_of_a_micro_batch(monkeypatch):
    """A whole generation's log-probs run LOGPS_TOKENS tokens at a time: the same values, fewer temporaries."""
    from jaxsloth.config import LoraConfig

    params = init_params(CONFIG, jax.random.key(0), jnp.float32)
    rng = np.random.default_rng(0)
    rows, p, c = 8, 8, 8
    batch = {
        "tokens": jnp.asarray(rng.integers(3, 200, (rows, p + c)), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(p + c, dtype=jnp.int32), (rows, p + c)),
        "segment_ids": jnp.ones((rows, p + c), jnp.int32),
    }
    batch["completion_ids"] = batch["tokens"][:, p:]
    runs = {}
    for budget in (10**9, 2 * (p + c)):
        monkeypatch.setattr(grpo_step, "LOGPS_TOKENS", budget)
        fn = grpo_step.make_logps_fn(CONFIG, LoraConfig(r=4))
        runs[budget] = (fn(None, params, batch), fn.lower(None, params, batch).compile().memory_analysis())
    (whole, whole_mem), (passes, passes_mem) = runs.values()
    np.testing.assert_allclose(passes, whole, rtol=1e-5, atol=1e-5)
    assert passes_mem.temp_size_in_bytes < whole_mem.temp_size_in_bytes


def test_grpo_forward_settings_keep_only_layer_inputs():
    assert grpo_step.grpo_forward_settings({"remat": "attn_dots", "compute_dtype": "x"}) == {
        "remat": "full",
        "compute_dtype": "x",
    }
    assert grpo_step.grpo_forward_settings({"remat": "offload"})["remat"] == "offload"
    assert grpo_step.grpo_forward_settings({"remat": "none"})["remat"] == "none"
