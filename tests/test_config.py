"""The settings schema (jaxsloth.config): one field per setting, and the API keywords, YAML keys and CLI flags
derived from it; old spellings warn; bad values are refused wherever they enter."""

import dataclasses
import inspect
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsloth
from jaxsloth import cli, config, demo
from jaxsloth.lora import LoraConfig
from jaxsloth.ops import KERNEL_OPS
from jaxsloth.profiles import LONG_CONTEXT, Profile
from jaxsloth.train.step import TrainConfig, learning_rate_schedule, make_optimizer


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    train, _ = demo.task_splits(num_train=8, num_heldout=1, seed=3)
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in train))
    return path


@pytest.fixture
def captured_fit(monkeypatch):
    """jaxsloth.train up to the training loop: records the TrainConfig it would train with, trains nothing."""
    from jaxsloth.train import loop

    seen = []

    def fake_fit(config, params, trainable, loader, *, train_config, **kw):
        seen.append(train_config)
        return loop.TrainResult(trainable, None, 0, [])

    monkeypatch.setattr(loop, "fit", fake_fit)
    return seen


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = jaxsloth.load(demo.MODEL_DIR, profile="cpu", max_seq_length=64)
    return jaxsloth.add_lora(model, r=2), tokenizer


# --- one source: every face derived from the fields ------------------------------------------------------------


def test_api_signatures_are_the_schema_fields():
    for fn, schema in (
        (jaxsloth.load, config.LoadConfig),
        (jaxsloth.add_lora, LoraConfig),
        (jaxsloth.train, TrainConfig),
    ):
        params = inspect.signature(fn).parameters
        for f in schema.api_fields():
            assert params[f.name].default == f.default, (fn.__name__, f.name)
            assert f.metadata["help"] in fn.__doc__
    assert "model" not in inspect.signature(jaxsloth.load).parameters  # the positional path
    assert "data" in inspect.signature(jaxsloth.train).parameters


def test_profile_overrides_are_read_from_profile_and_kernel_choice():
    parser = cli.build_parser()
    train_flags = parser._subparsers._group_actions[0].choices["train"]._option_string_actions
    profile_fields = {f.name for f in dataclasses.fields(Profile)} - set(config._PROFILE_FIELDS_ELSEWHERE)
    assert (
        {"remat", "mlp_chunk", "loss_chunk", "remat_group", "layer_loop", "dots_layers"}
        <= set(config.PROFILE_OVERRIDES)
        <= profile_fields
    )
    for name in (*config.PROFILE_OVERRIDES, *KERNEL_OPS):
        assert name in {f.name for f in dataclasses.fields(config.LoadConfig)}
        assert config.flag(name) in train_flags
        assert name in inspect.signature(jaxsloth.load).parameters
    remat = train_flags["--remat"]
    assert "per-layer" in remat.help and "(default: the profile's)" in remat.help


def test_load_applies_profile_and_kernel_overrides():
    model, _ = jaxsloth.load(demo.MODEL_DIR, profile="cpu", remat="offload", attention="pallas", mlp_chunk=16)
    assert (model.profile.remat, model.profile.kernels.attention, model.profile.mlp_chunk) == ("offload", "pallas", 16)
    cfg = config.LoadConfig(long_context=True, kernels={"glu": "pallas"}, remat_group=2)
    assert cfg.profile_overrides() == {**LONG_CONTEXT, "glu": "pallas", "remat_group": 2}
    with pytest.raises(ValueError, match="unknown op 'attn'"):
        jaxsloth.load(demo.MODEL_DIR, kernels="attn=pallas")
    with pytest.raises(ValueError, match="remat 'some'.*attn_dots"):
        jaxsloth.load(demo.MODEL_DIR, remat="some")


# --- old spellings and unknown names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, old, new, value",
    [
        (TrainConfig, "lr", "learning_rate", 1e-3),
        (TrainConfig, "warmup", "warmup_steps", 3),
        (TrainConfig, "epochs", "num_train_epochs", 2),
        (TrainConfig, "num_epochs", "num_train_epochs", 2),
        (TrainConfig, "batch_size", "per_device_train_batch_size", 4),
        (TrainConfig, "grad_accum", "gradient_accumulation_steps", 2),
        (TrainConfig, "schedule", "lr_scheduler_type", "cosine"),
        (TrainConfig, "save_every", "save_steps", 5),
        (TrainConfig, "pack", "packing", False),
        (TrainConfig, "total_steps", "max_steps", 7),
        (LoraConfig, "lora_r", "r", 8),
        (LoraConfig, "alpha", "lora_alpha", 4.0),
        (LoraConfig, "embedding_lr", "embedding_learning_rate", 1e-5),
    ],
)
def test_old_spelling_warns_and_sets_the_new_field(cls, old, new, value):
    with pytest.warns(FutureWarning, match=f"'{old}' is deprecated; use '{new}'"):
        cfg = cls(**{old: value})
    assert getattr(cfg, new) == value


def test_old_api_keywords_still_train(tiny, data_file, captured_fit):
    model, tokenizer = tiny
    with pytest.warns(FutureWarning, match="'batch_size' is deprecated; use 'per_device_train_batch_size'"):
        jaxsloth.train(
            model, tokenizer, str(data_file), batch_size=2, grad_accum=2, num_epochs=1, schedule="cosine",
            save_every=0, pack=False, progress=False,
        )  # fmt: skip
    (tc,) = captured_fit
    assert (tc.per_device_train_batch_size, tc.gradient_accumulation_steps, tc.lr_scheduler_type) == (2, 2, "cosine")
    assert tc.packing is False and tc.max_steps >= 1  # the epoch, counted in steps


def test_unknown_keyword_names_the_closest_setting():
    with pytest.raises(ValueError, match="unknown setting 'lerning_rate'; did you mean 'learning_rate'"):
        jaxsloth.train(None, None, None, lerning_rate=1e-3)
    with pytest.raises(ValueError, match="unknown setting 'lora_aplha'; did you mean 'lora_alpha'"):
        LoraConfig(lora_aplha=8)
    with pytest.raises(ValueError, match="learning_rate given twice"), pytest.warns(FutureWarning):
        TrainConfig(learning_rate=1e-3, lr=2e-3)


def test_old_flag_and_yaml_key_warn_on_one_line(tmp_path, data_file, capsys):
    yaml = tmp_path / "old.yaml"
    yaml.write_text(f"model: {demo.MODEL_DIR}\ndata: {data_file}\nepochs: 2\nlora-r: 4\n")
    args = cli.build_parser().parse_args(["train", str(yaml), "--lr", "1e-3", "--no-pack"])
    s = cli.train_settings(args)
    assert (s["learning_rate"], s["num_train_epochs"], s["r"], s["packing"]) == (1e-3, 2, 4, False)
    err = capsys.readouterr().err.splitlines()
    assert "warning: '--lr' is deprecated; use '--learning-rate'" in err
    assert any("'epochs' is deprecated; use 'num_train_epochs'" in line for line in err)
    both = cli.build_parser().parse_args(["train", str(yaml), "--lr", "1e-3", "--learning-rate", "2e-3"])
    with pytest.raises(ValueError, match="--learning-rate and --lr|--lr and --learning-rate"):
        cli.train_settings(both)


# --- values refused where they enter ---------------------------------------------------------------------------

BAD = {
    "negative learning rate": ({"learning_rate": -2e-4}, "learning_rate"),
    "zero learning rate": ({"learning_rate": 0.0}, "learning_rate"),
    "negative clipping": ({"max_grad_norm": -1.0}, "max_grad_norm"),
    "batch size 0": ({"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
    "epochs 0": ({"num_train_epochs": 0}, "num_train_epochs"),
    "negative epochs": ({"num_train_epochs": -1}, "num_train_epochs"),
    "accumulation 0": ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
    "negative warmup": ({"warmup_steps": -1}, "warmup_steps"),
    "negative weight decay": ({"weight_decay": -0.1}, "weight_decay"),
    "warmup longer than the run": ({"warmup_steps": 10, "max_steps": 5}, "warmup_steps"),
    "warmup ratio above 1": ({"warmup_ratio": 1.5}, "warmup_ratio"),
    "warmup steps and ratio": ({"warmup_steps": 2, "warmup_ratio": 0.1}, "warmup_ratio"),
    "unknown schedule": ({"lr_scheduler_type": "cosine_restarts"}, "lr_scheduler_type"),
    "unknown format": ({"format": "csv"}, "format"),
    "learning rate not a number": ({"learning_rate": "fast"}, "learning_rate"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_api_refuses_bad_values_before_training(case, tiny, data_file, captured_fit):
    kwargs, name = BAD[case]
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=name):
        jaxsloth.train(model, tokenizer, str(data_file), progress=False, **kwargs)
    assert captured_fit == []


@pytest.mark.parametrize("case", [c for c in BAD if c != "learning rate not a number"])
def test_cli_refuses_bad_values_with_exit_2(case, data_file, capsys):
    kwargs, name = BAD[case]
    flags = [x for k, v in kwargs.items() for x in (config.flag(k), str(v))]
    code = cli.main(["train", "--model", str(demo.MODEL_DIR), "--data", str(data_file), *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert name in err and "Traceback" not in err


def test_yaml_refuses_bad_values(tmp_path, data_file, capsys):
    yaml = tmp_path / "bad.yaml"
    yaml.write_text(f"model: {demo.MODEL_DIR}\ndata: {data_file}\nlr: -1e-3\n")
    assert cli.main(["train", str(yaml)]) == 2
    assert "learning_rate must be > 0.0, got -0.001 (from " in capsys.readouterr().err


def test_bad_lora_values():
    for kwargs, name in (
        ({"r": 0}, "r"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"target_modules": ["qkv"]}, "target_modules"),
    ):
        with pytest.raises(ValueError, match=name):
            LoraConfig(**kwargs)


def test_zero_max_grad_norm_means_no_clipping():
    trainable = {"layers": {"q_proj": {"a": jnp.ones((1, 2, 3)), "b": jnp.ones((1, 3, 2))}}}
    grads = jax.tree.map(lambda x: 5.0 * x, trainable)

    def update(max_grad_norm):
        tc = TrainConfig(max_steps=10, max_grad_norm=max_grad_norm, lr_scheduler_type="constant")
        opt = make_optimizer(tc, LoraConfig(r=2), trainable)
        return opt.update(grads, opt.init(trainable), trainable)[0]

    unclipped, zero = update(None), update(0.0)
    for a, b in zip(jax.tree.leaves(unclipped), jax.tree.leaves(zero), strict=True):
        assert np.abs(np.asarray(a)).min() > 0
        np.testing.assert_array_equal(a, b)


def test_batch_size_is_never_silently_replaced():
    assert TrainConfig(per_device_train_batch_size=None).per_device_train_batch_size is None  # the profile's
    with pytest.raises(ValueError, match="per_device_train_batch_size must be >= 1, got 0"):
        TrainConfig(per_device_train_batch_size=0)


# --- a setting added in one place: warmup_ratio ----------------------------------------------------------------


def test_warmup_ratio_changes_the_schedule():
    ratio = TrainConfig(learning_rate=1.0, max_steps=20, warmup_ratio=0.25)
    steps = TrainConfig(learning_rate=1.0, max_steps=20, warmup_steps=5)
    none = TrainConfig(learning_rate=1.0, max_steps=20)
    assert ratio.num_warmup_steps == 5 == math.ceil(0.25 * 20)  # as transformers rounds
    for k in range(20):
        assert float(learning_rate_schedule(ratio)(k)) == pytest.approx(float(learning_rate_schedule(steps)(k)))
    assert float(learning_rate_schedule(ratio)(0)) == 0.0 and float(learning_rate_schedule(none)(0)) == 1.0
    assert float(learning_rate_schedule(ratio)(2)) == pytest.approx(0.4)


def test_warmup_ratio_in_api_yaml_and_cli(tiny, data_file, tmp_path, captured_fit):
    assert "warmup_ratio" in inspect.signature(jaxsloth.train).parameters
    model, tokenizer = tiny
    jaxsloth.train(model, tokenizer, str(data_file), max_steps=8, warmup_ratio=0.5, progress=False)
    yaml = tmp_path / "run.yaml"
    yaml.write_text(
        f"model: {demo.MODEL_DIR}\ndata: {data_file}\nprofile: cpu\nmax_seq_length: 64\nr: 2\nmax_steps: 10\n"
        f"warmup_ratio: 0.3\noutput_dir: {tmp_path / 'out'}\n"
    )
    assert cli.main(["train", str(yaml)]) == 0
    assert cli.main(["train", str(yaml), "--warmup-ratio", "0.2", "--max-steps", "4"]) == 0
    assert [(tc.warmup_ratio, tc.num_warmup_steps) for tc in captured_fit] == [(0.5, 4), (0.3, 3), (0.2, 1)]
