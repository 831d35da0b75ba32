"""Evaluation during training: the eval loss against PEFT in PyTorch, when evaluations run, one compile for every
evaluation, early stopping against transformers' EarlyStoppingCallback, the best step kept, the held-out split,
sample answers, and the TRL / Axolotl faces."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from converters.hf import load_hf_model
from converters.peft import save_peft_adapter
from jaxsloth.config import TrainConfig
from jaxsloth.data import BatchLoader, Example, TokenizedDataset
from jaxsloth.lora import LoraConfig, init_lora
from jaxsloth.profiles import profile_for_device
from jaxsloth.train.checkpoint import Checkpointer
from jaxsloth.train.evaluate import BestTracker, Evaluator, eval_batches, split_off
from jaxsloth.train.loop import fit
from tests.tiny_models import hf_model, random_trainable, saved_model

LORA = LoraConfig(r=4, lora_alpha=8.0)
PROFILE = profile_for_device(name="cpu")


def _dataset(vocab: int, n: int, seed: int = 0) -> TokenizedDataset:
    """Examples of 6-12 tokens whose second half is trained (the loss mask matters)."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(n):
        k = int(rng.integers(3, 7))
        ids = rng.integers(3, vocab, 2 * k).astype(np.int32)
        trained = np.zeros(2 * k, bool)
        trained[k:] = True
        examples.append(Example(ids, trained))
    return TokenizedDataset(examples, "text", 32, 0, 0, 0, np.arange(n))


@pytest.fixture(scope="module")
def tiny():
    path = saved_model("llama")
    config, params = load_hf_model(path, dtype=jnp.float32)
    return path, config, params


def _compiles(fn) -> int:
    """How many XLA compilations running ``fn()`` took."""
    seen = []

    def listen(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            seen.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    return len(seen)


def test_eval_loss_is_peft_token_mean_and_compiles_once(tiny, tmp_path):
    path, config, params = tiny
    data = _dataset(config.vocab_size, 7)
    batches = eval_batches(data, rows=2, seq_len=16, pack=True)  # packed rows, the last batch padded
    assert len(batches) >= 2 and not batches[-1]["segment_ids"][-1].any()
    evaluator = Evaluator(batches, config=config, lora=LORA, profile=PROFILE)
    trainable = random_trainable(config, params, LORA)
    loss, count = evaluator.loss(trainable, params)

    # PEFT in PyTorch, one example at a time: the mean cross-entropy over every trained token.
    from peft import PeftModel

    save_peft_adapter(trainable, LORA, config, tmp_path, base_model_name_or_path=str(path))
    model = PeftModel.from_pretrained(hf_model(path), str(tmp_path)).eval()
    total, n = 0.0, 0
    for example in data.examples:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(example.input_ids[None].astype(np.int64))).logits[0]
        targets = torch.tensor(example.targets().astype(np.int64))
        total += torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item()
        n += int((targets != -100).sum())
    assert count == n
    assert loss == pytest.approx(total / n, rel=1e-5)

    other = random_trainable(config, params, LORA, seed=3)  # new weights, same shapes: no new compile
    assert _compiles(lambda: evaluator.loss(other, params)) == 0
    assert evaluator.loss_sum_and_count._cache_size() == 1


class Recorder:
    """A jaxsloth callback: every record, and the adapter each on_evaluate is given."""

    def __init__(self):
        self.records, self.adapters = [], {}

    def __call__(self, record):
        self.records.append(record)

    def on_evaluate(self, record, model):
        self.adapters[record["step"]] = jax.device_get(model.trainable)


def _fit(config, params, steps, evaluator, **kw):
    loader = BatchLoader(_dataset(config.vocab_size, 24), batch_size=2, seq_len=16, seed=1)
    tc = TrainConfig(learning_rate=3e-3, max_steps=steps)
    trainable = init_lora(config, LORA, jax.random.key(0))
    return fit(
        config, params, trainable, loader, lora=LORA, train_config=tc, profile=PROFILE, evaluator=evaluator, **kw
    )


def _scripted(evaluator, losses):
    """The evaluator reports ``losses`` in turn (a constructed case for early stopping and the best step)."""
    it = iter(losses)
    evaluator.loss = lambda trainable, params: (next(it), 10)
    return evaluator


def test_evaluates_every_eval_steps_and_at_the_end(tiny):
    _, config, params = tiny
    batches = eval_batches(_dataset(config.vocab_size, 5, seed=9), rows=2, seq_len=16, pack=True)
    evaluator = Evaluator(batches, config=config, lora=LORA, profile=PROFILE, every=2, as_model=_as_model)
    recorder = Recorder()
    result = _fit(config, params, 5, evaluator, callbacks=[recorder])
    evals = [r for r in recorder.records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 5] == [r["step"] for r in result.evals]
    assert [r["step"] for r in recorder.records if "loss" in r] == [1, 2, 3, 4, 5]
    assert recorder.records.index(evals[0]) == 2  # after step 2's record
    # The last evaluation is of the returned adapter.
    assert evals[-1]["eval_loss"] == pytest.approx(evaluator.loss(result.trainable, params)[0], rel=1e-6)
    assert sorted(recorder.adapters) == [2, 4, 5]
    assert evaluator.loss_sum_and_count._cache_size() == 1  # three evaluations, one compile


def _as_model(trainable, params):
    from jaxsloth.api import Model

    return Model(None, params, PROFILE, trainable=trainable, lora=LORA)


def _transformers_stop(losses, patience, threshold) -> int:
    """The evaluation (1-based) after which transformers' EarlyStoppingCallback stops training."""
    from transformers import EarlyStoppingCallback, TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(
        "unused", eval_strategy="steps", save_strategy="steps", load_best_model_at_end=True, report_to=[]
    )
    callback = EarlyStoppingCallback(early_stopping_patience=patience, early_stopping_threshold=threshold)
    state, control = TrainerState(), TrainerControl()
    for i, loss in enumerate(losses, 1):
        callback.on_evaluate(args, state, control, metrics={"eval_loss": loss})
        if state.best_metric is None or loss < state.best_metric:  # as Trainer._determine_best_metric
            state.best_metric = loss
        if control.should_training_stop:
            return i
    return len(losses)


def test_early_stopping_stops_where_transformers_does_and_keeps_the_best(tiny, tmp_path):
    _, config, params = tiny
    losses = [3.0, 2.0, 1.95, 2.1, 1.99, 1.0, 0.5]
    stop = _transformers_stop(losses, patience=3, threshold=0.1)
    assert stop == 5  # step 3 improves by less than the threshold: it is the best, but counts toward patience
    batches = eval_batches(_dataset(config.vocab_size, 3), rows=2, seq_len=16, pack=True)
    evaluator = Evaluator(
        batches,
        config=config,
        lora=LORA,
        profile=PROFILE,
        every=1,
        tracker=BestTracker(patience=3, threshold=0.1),
        load_best=True,
        as_model=_as_model,
    )
    recorder = Recorder()
    ckpt_dir = tmp_path / "checkpoints"
    result = _fit(
        config, params, 7, _scripted(evaluator, losses), callbacks=[recorder], checkpoint_dir=str(ckpt_dir), keep=1
    )
    assert result.step == stop and [r["step"] for r in result.evals] == [1, 2, 3, 4, 5]
    assert result.best_step == 3
    # The best step's checkpoint outlives rotation (keep=1) beside the last one, and it is what the run returns.
    assert sorted(s for s, _ in Checkpointer(ckpt_dir).step_dirs()) == [3, 5]
    for got, want in zip(jax.tree.leaves(result.trainable), jax.tree.leaves(recorder.adapters[3]), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
    assert not np.array_equal(jax.tree.leaves(recorder.adapters[3])[0], jax.tree.leaves(recorder.adapters[5])[0])
    meta = json.loads((ckpt_dir / "5" / "meta" / "metadata").read_text())
    assert meta["eval"] == {"best_loss": 1.95, "best_step": 3, "bad_evals": 3}


def test_val_set_size_split_is_seeded_and_disjoint():
    data = _dataset(50, 10)
    train, held = split_off(data, 0.25, seed=4)
    assert (len(train), len(held)) == (7, 3)  # ceil(0.25 * 10), as datasets' train_test_split
    assert sorted([*train.row_index, *held.row_index]) == list(range(10))
    again_train, again_held = split_off(data, 0.25, seed=4)
    assert list(again_held.row_index) == list(held.row_index)
    assert [e.input_ids.tolist() for e in held.examples] == [
        data.examples[i].input_ids.tolist() for i in held.row_index
    ]
    assert list(split_off(data, 0.25, seed=5)[1].row_index) != list(held.row_index)
    assert len(split_off(data, 4, seed=4)[1]) == 4
    with pytest.raises(ValueError, match="val_set_size=10"):
        split_off(data, 10, seed=0)
    with pytest.raises(ValueError, match="whole count"):
        TrainConfig(val_set_size=2.5)
    with pytest.raises(ValueError, match="early_stopping_patience needs evaluations"):
        TrainConfig(early_stopping_patience=2)
    with pytest.raises(ValueError, match="eval_steps needs eval data"):
        TrainConfig(eval_steps=10)
    with pytest.raises(ValueError, match="not both"):
        TrainConfig(val_set_size=0.1, eval_dataset="eval.jsonl")


def test_train_val_set_size_logs_eval_loss_and_samples(tmp_path):
    import jaxsloth
    from jaxsloth import demo

    # The unrolled layer loop (Hopper's) trains on per-layer weights; the sample answers need them stacked.
    model, tokenizer = jaxsloth.load(demo.MODEL_DIR, max_seq_length=64, profile="cpu", layer_loop="unrolled")
    model = jaxsloth.add_lora(model, r=4, lora_alpha=8)
    records = demo.task_splits(num_train=24, num_heldout=0)[0]
    prompts = ["hi", "the sky is"]
    result = jaxsloth.train(
        model, tokenizer, records, max_steps=3, per_device_train_batch_size=4, val_set_size=6, eval_steps=2,
        eval_prompts=prompts, eval_max_new_tokens=4, output_dir=tmp_path, progress=False,
    )  # fmt: skip
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 3] and all(r["eval_tokens"] > 0 for r in evals)
    assert [s["prompt"] for s in evals[-1]["eval_samples"]] == prompts
    asked = [[{"role": "user", "content": p}] for p in prompts]  # conversations data: asked as a user turn
    assert [s["completion"] for s in evals[-1]["eval_samples"]] == model.generate(tokenizer, asked, max_new_tokens=4)
    assert result.evals[-1]["eval_loss"] == evals[-1]["eval_loss"]


def test_sft_trainer_eval_dataset_logs_eval_loss(tmp_path):
    from transformers import EarlyStoppingCallback

    from jaxsloth import SFTConfig, SFTTrainer, demo

    train, held = demo.task_splits(num_train=16, num_heldout=6)
    trainer = SFTTrainer(
        model=str(demo.MODEL_DIR),
        train_dataset=train,
        eval_dataset=held,
        args=SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                       max_length=64, eval_strategy="steps", eval_steps=2, report_to="none"),
        callbacks=[EarlyStoppingCallback(early_stopping_patience=5)],
    )  # fmt: skip
    assert trainer.train_config.early_stopping_patience == 5
    trainer.train()
    evals = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]
    assert [r["step"] for r in evals] == [2, 4]
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-6)
    assert metrics["eval_tokens"] == evals[-1]["eval_tokens"]


def test_axolotl_and_llamafactory_eval_keys(tmp_path):
    from jaxsloth.config import split_settings
    from jaxsloth.faces.axolotl import translate_config

    axolotl = {
        "base_model": "m", "adapter": "lora", "datasets": [{"path": "d.jsonl"}], "val_set_size": 0.05,
        "eval_steps": 20, "early_stopping_patience": 3, "load_best_model_at_end": True, "eval_batch_size": 2,
    }  # fmt: skip
    tc = split_settings(translate_config(axolotl, tmp_path / "a.yml"))[2]
    assert (tc.val_set_size, tc.eval_steps, tc.early_stopping_patience) == (0.05, 20, 3)
    assert tc.load_best_model_at_end and tc.per_device_eval_batch_size == 2
    factory = {"model_name_or_path": "m", "stage": "sft", "dataset": str(tmp_path / "d.jsonl"), "val_size": 0.1,
               "eval_steps": 5, "eval_strategy": "steps", "per_device_eval_batch_size": 3}  # fmt: skip
    (tmp_path / "d.jsonl").write_text("{}\n")
    tc = split_settings(translate_config(factory, tmp_path / "f.yml"))[2]
    assert (tc.val_set_size, tc.eval_steps, tc.per_device_eval_batch_size) == (0.1, 5, 3)


def test_cli_flags_and_yaml_keys(tmp_path):
    from jaxsloth import cli

    yaml = tmp_path / "run.yml"
    yaml.write_text("model: m\ndata: d.jsonl\nval_set_size: 0.1\neval_prompts:\n  - Hello\n  - how are you?\n")
    flags = ["--eval-steps", "3", "--early-stopping-patience", "2", "--load-best-model-at-end"]
    s = cli.train_settings(cli.build_parser().parse_args(["train", str(yaml), *flags]))
    assert (s["val_set_size"], s["eval_steps"], s["early_stopping_patience"]) == (0.1, 3, 2)
    assert s["load_best_model_at_end"] and s["eval_prompts"] == ("Hello", "how are you?")
    s = cli.train_settings(
        cli.build_parser().parse_args(
            ["train", "--model", "m", "--data", "d", "--eval-dataset", "e.jsonl", "--eval-prompts", "Hi, you"]
        )
    )
    assert s["eval_dataset"] == "e.jsonl" and s["eval_prompts"] == ("Hi, you",)
