"""The ``jaxsloth`` command: train, generate, export, demo, bench.

    jaxsloth train run.yaml --max-steps 200        # YAML keys are the flag names; flags override the file
    jaxsloth generate --model M --adapter runs/x/adapter "Hello"
    jaxsloth export --model M --adapter runs/x/adapter --merged --out merged/
    jaxsloth export --model M --adapter runs/x/adapter --gguf q8_0 --out model.gguf
    jaxsloth demo

Errors a user causes (a missing file, a bad value) print one line and exit 2; Ctrl-C during training saves a
checkpoint, says where, and exits 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import sys
from pathlib import Path

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError)


@dataclasses.dataclass(frozen=True)
class Option:
    """One train setting: a YAML key and a ``--flag`` (underscores become dashes)."""

    name: str
    type: type
    default: object
    help: str


TRAIN_OPTIONS = (
    Option("model", str, None, "Hugging Face model directory (config.json + safetensors + tokenizer)"),
    Option("data", str, None, "training data: .jsonl, .json or .parquet"),
    Option("format", str, "auto", "data format: auto, text, alpaca, messages (sharegpt)"),
    Option("output_dir", str, "jaxsloth-run", "checkpoints, metrics.jsonl, tensorboard/, loss.png and adapter/"),
    Option("lora_r", int, 16, "LoRA rank"),
    Option("lora_alpha", float, 16.0, "LoRA alpha (scale alpha / r, or alpha / sqrt(r) with --use-rslora)"),
    Option("lora_dropout", float, 0.0, "dropout on the LoRA input"),
    Option("target_modules", list, None, "comma-separated projections (default: all of q,k,v,o,gate,up,down_proj)"),
    Option("use_rslora", bool, False, "rank-stabilised LoRA scaling"),
    Option("load_in_4bit", bool, False, "QLoRA: quantize the frozen weights to NF4 while loading"),
    Option("max_seq_length", int, 2048, "tokens per packed row; longer examples are truncated"),
    Option("batch_size", int, None, "sequences per micro-batch (default: the profile's)"),
    Option("grad_accum", int, 1, "micro-batches per optimizer step"),
    Option("max_steps", int, None, "optimizer steps (default: --epochs over the data)"),
    Option("epochs", int, None, "epochs over the data when --max-steps is not given (default 1)"),
    Option("lr", float, 2e-4, "peak learning rate"),
    Option("warmup", int, 0, "linear warmup steps"),
    Option("schedule", str, "linear", "learning-rate decay after warmup: linear, cosine or constant"),
    Option("weight_decay", float, 0.0, "AdamW weight decay"),
    Option("max_grad_norm", float, 1.0, "gradient clipping by global norm (0 = off)"),
    Option("train_on_inputs", bool, False, "also train on prompts / user turns"),
    Option("pack", bool, True, "pack several examples per row"),
    Option("save_every", int, 0, "checkpoint every N steps (0: only at the end and on Ctrl-C)"),
    Option("resume", bool, True, "continue from the latest checkpoint in output_dir"),
    Option("on_nonfinite", str, "stop", "on a NaN/Inf loss: stop (naming the step) or skip the update"),
    Option("seed", int, 0, "seed for LoRA init, data order and dropout"),
    Option("mesh", str, None, "device mesh, e.g. data=2,fsdp=4 (default: every device data-parallel)"),
    Option("shard_lora", bool, False, "also shard LoRA and optimizer state over the fsdp axis"),
    Option("profile", str, None, "GPU profile name (default: from the device): h200, h100, a100, ada, t4, cpu, ..."),
    Option("dtype", str, None, "compute dtype override: bfloat16, float16, float32"),
    Option("remat", str, None, "profile override: rematerialisation per layer (none, dots, full, offload)"),
    Option("mlp_chunk", int, None, "profile override: tokens per MLP tile for long sequences"),
    Option("loss_chunk", int, None, "profile override: tokens per loss tile for long sequences"),
    Option("remat_group", int, None, "profile override: layers per residual checkpoint (longest sequences: 2)"),
    Option(
        "layer_loop", str, None, "profile override: scan, unrolled, or auto (Hopper: unrolled but for full/offload)"
    ),
    Option("dots_layers", int, None, "profile override: the first N layers keep every projection output (dots)"),
    Option(
        "long_context",
        bool,
        False,
        "long-sequence settings: offloaded per-layer checkpoints, MLP and loss in tiles (see jaxsloth.train.memory)",
    ),
    Option("kernels", str, None, "profile override: op=impl pairs, e.g. attention=pallas,glu=reference"),
)
_TRAIN = {o.name: o for o in TRAIN_OPTIONS}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="LoRA/QLoRA fine-tune a model on a dataset",
        description="Fine-tune from a YAML config file and/or flags (flags override the file; YAML keys are the "
        "flag names with - or _). Writes checkpoints, metrics.jsonl, tensorboard/, loss.png and a PEFT adapter "
        "to --output-dir.",
    )
    p.add_argument("config", nargs="?", help="YAML file of settings")
    for o in TRAIN_OPTIONS:
        # Every default is None here so a given flag can be told from an absent one; the real defaults apply later.
        if o.type is bool:
            p.add_argument(_flag(o.name), action=argparse.BooleanOptionalAction, default=None, help=o.help)
        else:
            kind = str if o.type is list else o.type
            p.add_argument(_flag(o.name), type=kind, default=None, help=f"{o.help} (default: {o.default})")


def _check_value(o: Option, value, where: str):
    if value is None:
        return None
    if o.type is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{where}: {o.name} must be a list of names or a comma-separated string, got {value!r}")
        return value
    if o.type is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if o.type is float and isinstance(value, str):
        try:  # YAML 1.1 reads "2e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, o.type) or (o.type is int and isinstance(value, bool)):
        raise ValueError(f"{where}: {o.name} must be {o.type.__name__}, got {value!r}")
    return value


def train_settings(args: argparse.Namespace) -> dict:
    """Defaults < YAML file < flags, validated: the resolved settings of a train run."""
    settings = {o.name: o.default for o in TRAIN_OPTIONS}
    if args.config is not None:
        import yaml

        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of settings, got a {type(loaded).__name__}")
        for key, value in loaded.items():
            name = str(key).replace("-", "_")
            if name not in _TRAIN:
                raise ValueError(f"{path}: unknown setting {key!r}; known: {', '.join(_TRAIN)}")
            settings[name] = _check_value(_TRAIN[name], value, str(path))
    for o in TRAIN_OPTIONS:
        given = getattr(args, o.name)
        if given is not None:
            settings[o.name] = _check_value(o, given, _flag(o.name))
    for required in ("model", "data"):
        if settings[required] is None:
            raise ValueError(f"no {required} given: pass {_flag(required)} or set {required}: in the YAML file")
    if settings["max_steps"] is not None and settings["epochs"] is not None:
        raise ValueError("give --max-steps or --epochs, not both")
    return settings


_PROFILE_FIELDS = ("remat", "mlp_chunk", "loss_chunk", "remat_group", "layer_loop", "dots_layers")


def _profile_overrides(s: dict) -> dict:
    overrides = {}
    if s["long_context"]:
        from jaxsloth.profiles import LONG_CONTEXT

        overrides.update(LONG_CONTEXT)
    overrides.update({k: s[k] for k in _PROFILE_FIELDS if s[k] is not None})
    for pair in (s["kernels"] or "").split(","):
        if not pair.strip():
            continue
        op, sep, impl = pair.partition("=")
        if not sep:
            raise ValueError(f"--kernels: expected op=impl pairs, got {pair!r}")
        overrides[op.strip()] = impl.strip()
    return overrides


def _existing_dir(path: str, what: str) -> str:
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{what} directory not found: {path}")
    return path


def cmd_train(args: argparse.Namespace) -> int:
    s = train_settings(args)
    import jaxsloth
    from jaxsloth.ops import KernelChoice
    from jaxsloth.sharding import initialize_distributed

    initialize_distributed()  # several hosts: JAX_COORDINATOR_ADDRESS etc. or SLURM; before any device is touched

    overrides = _profile_overrides(s)
    ops = [f.name for f in dataclasses.fields(KernelChoice)]
    unknown = set(overrides) - set(ops) - set(_PROFILE_FIELDS)
    if unknown:
        raise ValueError(f"--kernels: unknown op {sorted(unknown)[0]!r}; ops: {', '.join(ops)}")
    model, tokenizer = jaxsloth.load(
        _existing_dir(s["model"], "model"),
        load_in_4bit=s["load_in_4bit"],
        max_seq_length=s["max_seq_length"],
        dtype=s["dtype"],
        profile=s["profile"],
        **overrides,
    )
    model = jaxsloth.add_lora(
        model,
        r=s["lora_r"],
        lora_alpha=s["lora_alpha"],
        lora_dropout=s["lora_dropout"],
        target_modules=s["target_modules"],
        use_rslora=s["use_rslora"],
        seed=s["seed"],
    )
    out = Path(s["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    try:
        result = jaxsloth.train(
            model,
            tokenizer,
            s["data"],
            format=s["format"],
            batch_size=s["batch_size"],
            grad_accum=s["grad_accum"],
            max_steps=s["max_steps"],
            num_epochs=s["epochs"],
            learning_rate=s["lr"],
            warmup_steps=s["warmup"],
            schedule=s["schedule"],
            weight_decay=s["weight_decay"],
            max_grad_norm=s["max_grad_norm"] or None,
            pack=s["pack"],
            train_on_inputs=s["train_on_inputs"],
            output_dir=out,
            save_every=s["save_every"],
            resume=s["resume"],
            on_nonfinite=s["on_nonfinite"],
            seed=s["seed"],
            mesh=s["mesh"],
            shard_lora=s["shard_lora"],
        )
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: checkpoint saved in {out / 'checkpoints'}; run the same command again to resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    adapter = jaxsloth.save_adapter(model, out / "adapter")
    last = result.history[-1]["loss"] if result.history else float("nan")
    print(f"trained {result.step} steps (final loss {last:.4f}); PEFT adapter: {adapter}; metrics: {out}")
    return 0


def _load_with_adapter(args: argparse.Namespace):
    import jaxsloth

    model, tokenizer = jaxsloth.load(
        _existing_dir(args.model, "model"), load_in_4bit=args.load_in_4bit, max_seq_length=args.max_seq_length
    )
    if args.adapter is not None:
        from converters.peft import load_peft_adapter

        trainable, lora = load_peft_adapter(_existing_dir(args.adapter, "adapter"), model.config)
        model = dataclasses.replace(model, lora=lora, trainable=trainable)
    return model, tokenizer


def _add_model_args(p: argparse.ArgumentParser, adapter_required: bool = False) -> None:
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--adapter", required=adapter_required, help="PEFT LoRA adapter directory")
    p.add_argument("--load-in-4bit", action="store_true", help="quantize the base weights to NF4 while loading")
    p.add_argument("--max-seq-length", type=int, default=2048, help="longest sequence (prompt + new tokens)")


def cmd_generate(args: argparse.Namespace) -> int:
    prompts = list(args.prompts)
    if args.prompts_file is not None:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file not found: {path}")
        prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompts: give them as arguments or with --prompts-file")
    model, tokenizer = _load_with_adapter(args)
    if tokenizer is None:
        raise ValueError(f"no tokenizer files in {args.model}")
    if args.chat:
        from jaxsloth.data.chat import require_chat_template

        require_chat_template(tokenizer, "--chat")
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
    sampling = {"temperature": args.temperature, "seed": args.seed}
    if args.top_k is not None:
        sampling["top_k"] = args.top_k
    if args.top_p is not None:
        sampling["top_p"] = args.top_p
    outputs = model.generate(tokenizer, prompts, max_new_tokens=args.max_new_tokens, **sampling)
    for text in outputs:
        print(text if len(outputs) == 1 else f"{text}\n---")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import jaxsloth

    if args.gguf is not None:
        return _export_gguf(args)
    if Path(args.out).exists() and any(Path(args.out).iterdir()) and not args.overwrite:
        raise FileExistsError(f"output directory {args.out} is not empty (pass --overwrite)")
    model, tokenizer = _load_with_adapter(args)
    if args.merged:
        path = jaxsloth.save_merged(model, args.out, dtype=args.dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        print(f"merged {args.dtype} checkpoint: {path}")
    else:
        path = jaxsloth.save_adapter(model, args.out)
        print(f"PEFT adapter: {path}")
    return 0


def _export_gguf(args: argparse.Namespace) -> int:
    """--out is the .gguf file, or a directory that gets model-<quantization>.gguf."""
    import jaxsloth

    out = Path(args.out)
    path = out if out.suffix == ".gguf" else out / f"model-{args.gguf}.gguf"
    if path.exists() and not args.overwrite:
        raise FileExistsError(f"{path} exists (pass --overwrite)")
    model, tokenizer = _load_with_adapter(args)
    if tokenizer is None:
        raise ValueError(f"no tokenizer files in {args.model} (GGUF files carry the vocabulary)")
    print(f"GGUF {args.gguf}: {jaxsloth.save_gguf(model, tokenizer, path, quantization=args.gguf)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from jaxsloth import demo

    if args.build_assets:
        demo.build_assets()
        return 0
    demo.run_demo(args.output_dir, steps=args.steps)
    return 0


def cmd_bench(argv: list[str]) -> int:
    if importlib.util.find_spec("jaxsloth.bench.cli") is None:
        print(
            "jaxsloth bench: the benchmark suite (jaxsloth.bench.cli) is not part of this install; the kernel "
            "micro-benchmarks run as python -m jaxsloth.bench.kernel_<op>",
            file=sys.stderr,
        )
        return EXIT_USAGE
    from jaxsloth.bench.cli import main as bench_main

    return bench_main(argv) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxsloth", description="LoRA/QLoRA fine-tuning of Hugging Face LLMs in JAX")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_parser(sub)

    g = sub.add_parser("generate", help="complete prompts with a model (and a LoRA adapter)")
    _add_model_args(g)
    g.add_argument("prompts", nargs="*", help="prompt texts")
    g.add_argument("--prompts-file", help="file with one prompt per line")
    g.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn with the chat template")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int, default=0)

    e = sub.add_parser("export", help="write a model's adapter as PEFT, or merge it into a 16-bit checkpoint")
    _add_model_args(e, adapter_required=True)
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--merged", action="store_true", help="merge the adapter into the weights (HF checkpoint)")
    e.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    e.add_argument(
        "--gguf",
        nargs="?",
        const="f16",
        choices=("f16", "bf16", "q8_0"),
        help="merge and write one GGUF file for llama.cpp / Ollama / LM Studio (default f16); --out: a .gguf path or a directory",
    )
    e.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")

    d = sub.add_parser("demo", help="LoRA-tune the tiny built-in model on CPU and show its answers improve")
    d.add_argument("--output-dir", default="jaxsloth-demo", help="where the adapter and loss.png go")
    d.add_argument("--steps", type=int, default=None, help="training steps (default: the full demo)")
    d.add_argument("--build-assets", action="store_true", help=argparse.SUPPRESS)

    sub.add_parser("bench", help="benchmarks (arguments pass through to jaxsloth.bench.cli)", add_help=False)
    return parser


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "export": cmd_export, "demo": cmd_demo}


class _ProgressSafeHandler(logging.StreamHandler):
    """Log lines printed above a running progress bar (tqdm.write) instead of onto its line."""

    def emit(self, record):
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after "bench", --help included, belongs to the bench CLI
        return cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    # (A no-op where the root logger already has handlers, e.g. under pytest, as basicConfig always is.)
    logging.basicConfig(format="%(message)s", handlers=[_ProgressSafeHandler()])
    logging.getLogger("jaxsloth").setLevel(logging.INFO)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (*USER_ERRORS, FileExistsError) as e:
        print(f"jaxsloth {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (FloatingPointError, MemoryError) as e:  # non-finite loss, a step that does not fit: explained already
        print(f"jaxsloth {args.command}: {e}", file=sys.stderr)
        return 1
