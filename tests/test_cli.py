"""The jaxsloth command: train from YAML end to end, generate, export, --help, user errors, Ctrl-C.

Runs on the demo's shipped tiny model (it has a tokenizer with a chat template)."""

import json
import subprocess
import sys

import pytest

from jaxsloth import cli, demo

SUBCOMMANDS = ("train", "generate", "export", "demo")


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    train, _ = demo.task_splits(num_train=24, num_heldout=1, seed=7)
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in train))
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_file):
    """One CLI train run from a YAML file, with a flag overriding the file's max_steps."""
    out = tmp_path_factory.mktemp("run")
    config = out / "run.yaml"
    config.write_text(
        f"model: {demo.MODEL_DIR}\ndata: {data_file}\nformat: messages\noutput_dir: {out / 'o'}\n"
        "lora_r: 4\nlora-alpha: 8\ntarget_modules: [q_proj, v_proj, down_proj]\nmax_seq_length: 64\n"
        "batch_size: 4\nmax_steps: 50\nlr: 2e-3\nprofile: cpu\nsave_every: 2\n"
    )
    code = cli.main(["train", str(config), "--max-steps", "3"])
    assert code == 0
    return out / "o"


def test_train_from_yaml_writes_everything(trained_run):
    lines = [json.loads(x) for x in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]  # --max-steps 3 overrode the file's 50
    assert all(r["loss"] > 0 and r["tokens"] > 0 for r in lines)
    assert (trained_run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert list((trained_run / "tensorboard").glob("events.out.tfevents.*"))
    assert (trained_run / "checkpoints" / "3").is_dir()
    adapter_cfg = json.loads((trained_run / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4 and adapter_cfg["lora_alpha"] == 8
    assert set(adapter_cfg["target_modules"]) == {"q_proj", "v_proj", "down_proj"}
    assert (trained_run / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_continues_from_checkpoint(trained_run, capsys, data_file):
    code, _, _ = _run(
        ["train", "--model", demo.MODEL_DIR, "--data", data_file, "--output-dir", trained_run, "--max-steps", 5,
         "--lora-r", 4, "--lora-alpha", 8, "--target-modules", "q_proj,v_proj,down_proj", "--max-seq-length", 64,
         "--batch-size", 4, "--lr", "2e-3", "--profile", "cpu", "--resume"],
        capsys,
    )  # fmt: skip
    assert code == 0
    steps = [json.loads(x)["step"] for x in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_generate_with_adapter_matches_export_merged(trained_run, tmp_path, capsys):
    prompts = ["shift abc", "shift xyz"]
    code, with_adapter, _ = _run(
        ["generate", "--model", demo.MODEL_DIR, "--adapter", trained_run / "adapter", "--chat", "--max-new-tokens", 6,
         *prompts],
        capsys,
    )  # fmt: skip
    assert code == 0
    code, base, _ = _run(["generate", "--model", demo.MODEL_DIR, "--chat", "--max-new-tokens", 6, *prompts], capsys)
    assert code == 0

    code, out, _ = _run(
        ["export", "--model", demo.MODEL_DIR, "--adapter", trained_run / "adapter", "--merged", "--dtype", "float32",
         "--out", tmp_path / "merged"],
        capsys,
    )  # fmt: skip
    assert code == 0 and "merged" in out
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "merged").iterdir()}
    code, merged, _ = _run(
        ["generate", "--model", tmp_path / "merged", "--chat", "--max-new-tokens", 6, *prompts], capsys
    )
    assert code == 0
    # The merged f32 weights compute what base + adapter computes; the untrained base says something else.
    assert merged == with_adapter
    assert len(with_adapter.split("---")) == 3

    code, out, _ = _run(
        ["export", "--model", demo.MODEL_DIR, "--adapter", trained_run / "adapter", "--out", tmp_path / "peft"],
        capsys,
    )
    assert code == 0
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 4


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    assert f"usage: jaxsloth {command}" in capsys.readouterr().out


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "jaxsloth", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for command in (*SUBCOMMANDS, "bench"):
        assert command in r.stdout


def _bad(tmp_path, data_file):
    yaml_unknown = tmp_path / "unknown.yaml"
    yaml_unknown.write_text(f"model: {demo.MODEL_DIR}\ndata: {data_file}\nlearnin_rate: 1e-3\n")
    yaml_type = tmp_path / "type.yaml"
    yaml_type.write_text(f"model: {demo.MODEL_DIR}\ndata: {data_file}\nlora_r: sixteen\n")
    return {
        "missing model dir": (["train", "--model", tmp_path / "nope", "--data", data_file], "nope"),
        "missing data": (["train", "--model", demo.MODEL_DIR, "--data", tmp_path / "x.jsonl"], "x.jsonl"),
        "no data": (["train", "--model", demo.MODEL_DIR], "--data"),
        "unknown yaml key": (["train", yaml_unknown], "learning_rate"),
        "bad yaml type": (["train", yaml_type], "lora_r"),
        "missing yaml": (["train", tmp_path / "none.yaml"], "none.yaml"),
        "steps and epochs": (
            ["train", "--model", demo.MODEL_DIR, "--data", data_file, "--max-steps", 2, "--epochs", 1],
            "--epochs",
        ),
        "bad kernel": (["train", "--model", demo.MODEL_DIR, "--data", data_file, "--kernels", "attn=x"], "attn"),
        "bad remat": (["train", "--model", demo.MODEL_DIR, "--data", data_file, "--remat", "some"], "some"),
        "missing adapter": (["generate", "--model", demo.MODEL_DIR, "--adapter", tmp_path / "ad", "hi"], "ad"),
        "no prompts": (["generate", "--model", demo.MODEL_DIR], "prompts"),
    }


def test_user_errors_exit_2_with_one_line(tmp_path, data_file, capsys):
    for name, (argv, needle) in _bad(tmp_path, data_file).items():
        code, _, err = _run(argv, capsys)
        assert code == 2, name
        lines = [x for x in err.splitlines() if x.startswith("jaxsloth")]
        assert len(lines) == 1 and needle in lines[0], (name, err)
        assert "Traceback" not in err, name


def test_bad_flag_value_is_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--lora-r", "x"])
    assert e.value.code == 2 and "--lora-r" in capsys.readouterr().err


def test_bench_dispatch_or_message(capsys, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("jaxsloth.bench.cli") is None:
        code, _, err = _run(["bench", "--help"], capsys)
        assert code == 2 and "jaxsloth.bench.cli" in err
    else:
        seen = []
        monkeypatch.setattr("jaxsloth.bench.cli.main", lambda argv: seen.append(argv) or 0)
        assert cli.main(["bench", "--x", "1"]) == 0 and seen == [["--x", "1"]]


def test_ctrl_c_saves_checkpoint_and_exits_130(tmp_path, data_file, capsys, monkeypatch):
    from jaxsloth.train import metrics as train_metrics

    def interrupt_at_2(record):
        if record["step"] == 2:
            raise KeyboardInterrupt

    real = train_metrics.standard_callbacks
    monkeypatch.setattr(train_metrics, "standard_callbacks", lambda *a, **k: [interrupt_at_2, *real(*a, **k)])
    out = tmp_path / "run"
    code, _, err = _run(
        ["train", "--model", demo.MODEL_DIR, "--data", data_file, "--output-dir", out, "--max-steps", 6,
         "--lora-r", 2, "--max-seq-length", 64, "--batch-size", 2, "--profile", "cpu"],
        capsys,
    )  # fmt: skip
    assert code == 130
    assert str(out / "checkpoints") in err and "resume" in err
    assert (out / "checkpoints" / "2").is_dir()
    assert not (out / "adapter").exists()


def test_train_help_lists_choices_and_each_default_once(capsys):
    from jaxsloth.models.decoder import REMAT_POLICIES

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    entries = {}  # "--flag ..." -> its whole help entry, continuation lines joined
    for line in text.splitlines():
        if line.startswith("  -"):
            key = line.split()[0].rstrip(",")
            entries[key] = line
        elif line.startswith("   ") and entries:
            entries[key] += " " + line.strip()
    assert "--remat {" + ",".join(REMAT_POLICIES) + "}" in entries["--remat"]
    assert "{linear,cosine,constant}" in entries["--lr-scheduler-type"]
    assert "--learning-rate" in entries and "--warmup-ratio" in entries and "--lr" not in entries  # old: hidden
    for entry in entries.values():
        assert entry.count("(default:") <= 1, entry
        assert "(default: None)" not in entry, entry
