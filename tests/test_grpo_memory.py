"""GRPO's memory, pinned on compiled CPU programs: the sampling program's KV cache (compute dtype, exactly prompt
bucket + max_completion_length slots, each prompt's slots held once for its G rows), the LM head's backward without
an f32 copy of the head, the log-prob passes; and G completions per prompt against transformers' greedy generate."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from converters.hf import load_hf_model
from jaxsloth import generate as gen
from jaxsloth.methods import grpo_step
from jaxsloth.models.config import ModelConfig
from jaxsloth.models.decoder import init_params
from tests.test_longrope import ORIG
from tests.test_longrope import _hf_generate as hf_generate
from tests.test_longrope import _model as longrope_model
from tests.tiny_models import hf_model

CONFIG = ModelConfig(
    model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
    num_kv_heads=2, head_dim=32, tie_word_embeddings=True,
)  # fmt: skip
U, G, PROMPT, NEW = 2, 16, 60, 100  # the prompt bucket is 64; NEW's bucket (128) is not used


@functools.cache
def _sampling_program():
    params = init_params(CONFIG, jax.random.key(0), jnp.float32)  # the cache follows the compute dtype, not these
    prompts = [[3 + i] * PROMPT for i in range(U)]
    args, static = gen._program_inputs(
        params, CONFIG, prompts, max_new_tokens=NEW, temperature=1.0, num_return_sequences=G, exact_length=True,
        compute_dtype=jnp.bfloat16,
    )  # fmt: skip
    return args, static


def _kv_bytes(rows_slots: int) -> int:
    """Bytes of keys and values for ``rows_slots`` (row, slot) pairs of the tiny config in bf16."""
    return 2 * CONFIG.num_layers * CONFIG.num_kv_heads * CONFIG.head_dim * 2 * rows_slots


def test_sampling_cache_is_exact_shared_compute_dtype_and_most_of_the_memory():
    """The cache: the shared prompt slots [L, U, P] and each row's new slots [L, B, NEW], in bf16. The compiled
    program's temporaries: that cache, one layer's slice of it read by the decode step's attention, and a small
    remainder; a cache of every row's prompt and NEW's bucket (B x (P + 128): the rows' prompts repeated, the slots
    rounded up) would alone exceed the bound."""
    args, static = _sampling_program()
    rest = {k: v for k, v in static.items() if k not in ("new_slots", "copies")}
    start = functools.partial(gen._start, new_slots=static["new_slots"], copies=static["copies"], **rest)
    state, pads = jax.eval_shape(start, *args)
    (prompt_k, own_k), (prompt_v, own_v) = state["cache_k"], state["cache_v"]
    kv = (CONFIG.num_kv_heads, CONFIG.head_dim)
    assert prompt_k.shape == prompt_v.shape == (CONFIG.num_layers, U, 64, *kv)
    assert own_k.shape == own_v.shape == (CONFIG.num_layers, U * G, NEW, *kv)
    assert {a.dtype for a in (prompt_k, prompt_v, own_k, own_v)} == {jnp.dtype(jnp.bfloat16)}
    assert pads.shape == (U * G,)

    memory = gen._generate_padded.lower(*args, jnp.int32(NEW), **static).compile().memory_analysis()
    exact = _kv_bytes(U * 64 + U * G * NEW)
    bound = exact * (1 + 1 / CONFIG.num_layers) + 2**19  # + the tiny model's weights' and sampling's temporaries
    assert memory.temp_size_in_bytes <= bound, (memory.temp_size_in_bytes, exact)
    assert _kv_bytes(U * G * (64 + 128)) > bound


def test_g_completions_per_prompt_match_transformers_greedy():
    """num_return_sequences rows share their prompt's cache slots and each gives transformers' greedy answer to its
    prompt alone; Phi-3's LongRoPE re-prefills the rows that cross the original context, shared slots included."""
    path = longrope_model()
    config, params = load_hf_model(path, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, config.vocab_size, n).tolist() for n in (5, ORIG - 2)]
    ours = gen.generate(params, config, prompts, max_new_tokens=6, num_return_sequences=3)
    hf = hf_model(path)
    assert ours == [hf_generate(hf, p, 6)[0] for p in prompts for _ in range(3)]


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

    config = dataclasses.replace(CONFIG, num_layers=1, layer_types=())
    params = init_params(config, jax.random.key(0), jnp.float32)
    rng = np.random.default_rng(0)
    rows, p, c = 4, 16, 16
    batch = {
        "tokens": jnp.asarray(rng.integers(3, 200, (rows, p + c)), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(p + c, dtype=jnp.int32), (rows, p + c)),
        "segment_ids": jnp.ones((rows, p + c), jnp.int32),
    }
    batch["completion_ids"] = batch["tokens"][:, p:]
    runs = {}
    for budget in (10**9, 2 * (p + c)):
        monkeypatch.setattr(grpo_step, "LOGPS_TOKENS", budget)
        fn = grpo_step.make_logps_fn(config, LoraConfig(r=4), chunk=8)
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
