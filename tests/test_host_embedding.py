"""The input embedding kept on the host (Profile.embedding="host"): the same losses and adapters as on the device,
none of the table's bytes in the step, and clear errors where it cannot apply."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from converters.hf import load_hf_model
from jaxsloth.config import LoadConfig
from jaxsloth.lora import init_lora
from jaxsloth.models.decoder import forward_hidden
from jaxsloth.train.host_embedding import check_host_embedding, on_host, step_params, to_host, with_embedded
from jaxsloth.train.memory import GIB, estimate_step_memory
from jaxsloth.train.step import TrainConfig, make_optimizer, make_train_step
from tests.test_training import LORA, PROFILE, _dataset, _run
from tests.tiny_models import saved_model

HOST = dataclasses.replace(PROFILE, embedding="host")


def _model(family="llama"):
    config, params = load_hf_model(saved_model(family), dtype=jnp.float32)
    return config, params, init_lora(config, LORA, jax.random.key(0))


def _batch(config, rows=2, seq=16):
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (rows, seq)).astype(np.int32)
    targets = np.concatenate([ids[:, 1:], np.full((rows, 1), -100, np.int32)], axis=1)
    return {"tokens": ids, "targets": targets}


def test_scaled_embeddings_from_rows_equal_the_lookup():
    # Gemma scales its embedding by sqrt(hidden): rows looked up elsewhere take the same scale and cast.
    config, params, _ = _model("gemma")
    tokens = jnp.asarray(_batch(config)["tokens"])
    rows = jnp.take(params["embed"], tokens, axis=0)
    a = forward_hidden(params, tokens, config=config, compute_dtype=jnp.bfloat16)
    b = forward_hidden(step_params(to_host(params)), tokens, config=config, compute_dtype=jnp.bfloat16, embedded=rows)
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_step_with_the_table_on_the_host_equals_the_device_step_and_holds_none_of_it():
    config, params, trainable = _model()
    tc = TrainConfig(learning_rate=1e-3, max_steps=10)
    optimizer = make_optimizer(tc, LORA, trainable)
    step = make_train_step(config, LORA, tc, PROFILE, optimizer)
    batch = _batch(config)
    host = to_host(params)
    assert on_host(host) and not on_host(params)
    runs = {}
    for name, p, b in (("device", params, batch), ("host", step_params(host), with_embedded(batch, host))):
        t = jax.tree.map(jnp.copy, trainable)
        args = (t, optimizer.init(t), p, jax.tree.map(jnp.asarray, b), jax.random.key(1))
        compiled = step.lower(*args).compile()
        new_t, _, m = compiled(*args)
        runs[name] = (new_t, float(m["loss"]), compiled.memory_analysis().argument_size_in_bytes)
    (t_dev, loss_dev, args_dev), (t_host, loss_host, args_host) = runs["device"], runs["host"]
    assert loss_host == loss_dev
    jax.tree.map(np.testing.assert_array_equal, t_host, t_dev)
    # The step's arguments lose the whole table and gain only the batch's rows (XLA aligns each buffer: bytes).
    table = params["embed"].size * params["embed"].dtype.itemsize
    rows = batch["tokens"].size * config.hidden_size * params["embed"].dtype.itemsize
    assert args_dev - args_host == pytest.approx(table - rows, abs=256)


def test_fit_with_the_table_on_the_host_gives_the_device_run_losses():
    config, params, trainable = _model()
    device = _run(config, params, trainable, 6)
    host = _run(config, params, init_lora(config, LORA, jax.random.key(0)), 6, profile=HOST)
    assert [r["loss"] for r in host.history] == [r["loss"] for r in device.history]
    jax.tree.map(np.testing.assert_array_equal, host.trainable, device.trainable)


def test_evaluation_looks_up_rows_on_the_host_too():
    from jaxsloth.train.evaluate import Evaluator, eval_batches

    config, params, trainable = _model()
    batches = eval_batches(_dataset(config.vocab_size, n=6), rows=2, seq_len=16, pack=True)
    ev = Evaluator(batches, config=config, lora=LORA, profile=PROFILE)
    assert ev.loss(trainable, to_host(params)) == ev.loss(trainable, params)


def test_host_embedding_refuses_what_it_cannot_keep_off_the_device():
    config, params, trainable = _model()
    tied, _, tied_trainable = _model("llama_tied")
    with pytest.raises(ValueError, match="ties its LM head"):
        check_host_embedding(tied, tied_trainable, None)
    with pytest.raises(ValueError, match="trains the embedding"):
        check_host_embedding(config, dict(trainable, embed=params["embed"]), None)
    with pytest.raises(ValueError, match="trains the embedding"):
        check_host_embedding(config, None, None)  # full fine-tuning
    with pytest.raises(ValueError, match="one device"):
        check_host_embedding(config, trainable, object())
    with pytest.raises(ValueError, match="supervised fine-tuning"):
        _run(config, params, trainable, 1, profile=HOST, make_step=make_train_step)


def test_the_memory_model_moves_the_table_to_the_host():
    config, params, _ = _model()
    kw = dict(batch=2, seq_len=16, quantized=False)
    dev, host = estimate_step_memory(config, PROFILE, **kw), estimate_step_memory(config, HOST, **kw)
    table = config.vocab_size * config.hidden_size * PROFILE.dtype.itemsize / GIB
    assert dev.device_gib - host.device_gib == pytest.approx(table)
    assert host.host_gib - dev.host_gib == pytest.approx(table) and host.host_fixed_gib == pytest.approx(table)
    tied = _model("llama_tied")[0]
    assert estimate_step_memory(tied, HOST, **kw) == estimate_step_memory(tied, PROFILE, **kw)


def test_embedding_is_a_setting_of_the_profile():
    assert LoadConfig(embedding="host").build_profile().embedding == "host"
    with pytest.raises(ValueError, match="embedding"):
        LoadConfig(embedding="disk")


def test_api_training_keeps_the_table_on_the_host_and_gives_it_back(tmp_path):
    import jaxsloth
    from jaxsloth import demo

    data = str(demo.MODEL_DIR.parent / "train.jsonl")
    losses, embeds = {}, {}
    for place in ("device", "host"):
        model, tokenizer = jaxsloth.load(demo.MODEL_DIR, profile="cpu", embedding=place, max_seq_length=64)
        model = jaxsloth.add_lora(model, r=2)
        result = jaxsloth.train(model, tokenizer, data, max_steps=3, progress=False, report_to="none")
        losses[place] = [r["loss"] for r in result.history]
        embeds[place] = model.params["embed"]
    assert losses["host"] == losses["device"]
    # After the run the table is a device array again, for generation, with the same values.
    assert isinstance(embeds["host"], jax.Array)
    np.testing.assert_array_equal(np.asarray(embeds["host"]), np.asarray(embeds["device"]))
