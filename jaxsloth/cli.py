"""The ``jaxsloth`` command: train, generate, chat, export, demo, bench.

    jaxsloth train run.yaml --max-steps 200        # YAML keys are the flag names; flags override the file
    jaxsloth generate --model M --adapter runs/x/adapter "Hello"   # through the chat template when it has one
    jaxsloth chat --model M --adapter runs/x/adapter             # a conversation: user turns from stdin
    jaxsloth export --model M --adapter runs/x/adapter --merged --out merged/
    jaxsloth export --model M --adapter runs/x/adapter --gguf q8_0 --out model.gguf
    jaxsloth demo

Errors a user causes (a missing file, a bad value) print one line and exit 2; a failed write (disk full) prints
one line naming the path and exits 1; Ctrl-C (SIGTERM) during training saves a checkpoint, says which and where,
and exits 130 (143).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import re
import sys
import warnings
from pathlib import Path

from jaxsloth import config

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, PermissionError)


def _add_train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="LoRA/QLoRA fine-tune a model on a dataset",
        description="Fine-tune from a YAML config file and/or flags (flags override the file; YAML keys are the "
        "flag names with - or _, as in jaxsloth.config). Writes checkpoints, metrics.jsonl, tensorboard/, loss.png "
        "and a PEFT adapter to --output-dir.",
    )
    p.add_argument("config", nargs="?", help="YAML file of settings")
    config.add_arguments(p, config.TRAIN_SCHEMAS)


# The train settings inspect-data reads: tokenizer, data, format and packing, not the model's weights or the run.
INSPECT_SETTINGS = (
    "model", "revision", "tokenizer", "max_seq_length", "data", "split", "dataset_config", "dataset_text_field",
    "format", "train_on_inputs", "packing", "seed", "dataset_num_proc",
)  # fmt: skip


def _add_inspect_parser(sub) -> None:
    p = sub.add_parser(
        "inspect-data",
        help="show what training sees of a dataset: examples with their trained tokens marked, and counts",
        description="Tokenize the data as jaxsloth train would (the tokenizer only, no weights are loaded); print a "
        "few examples with the trained tokens marked and the counts of examples, tokens, trained tokens, truncated "
        "and dropped examples and the packing efficiency. Takes the same YAML file and flags as train.",
    )
    p.add_argument("config", nargs="?", help="YAML file of train settings (jaxsloth, Axolotl or LLaMA-Factory)")
    config.add_arguments(p, config.TRAIN_SCHEMAS, only=INSPECT_SETTINGS)
    p.add_argument("--num-examples", type=int, default=3, help="examples to show (default: 3)")
    p.add_argument("--color", action=argparse.BooleanOptionalAction, default=None,
                   help="mark trained tokens in green (default: when stdout is a terminal), else as [[...]]")  # fmt: skip


def cmd_inspect_data(args: argparse.Namespace) -> int:
    from jaxsloth.data import tokenize_dataset
    from jaxsloth.data.inspect import describe_dataset
    from jaxsloth.hub import load_tokenizer

    s = train_settings(args)
    if s["tokenizer"] is not None:
        _existing_dir(s["tokenizer"], "tokenizer")
    tokenizer = load_tokenizer(s["tokenizer"] or s["model"], revision=None if s["tokenizer"] else s["revision"])
    if tokenizer is None:
        raise ValueError(f"no tokenizer files in {s['model']}: pass --tokenizer PATH")
    data = tokenize_dataset(
        s["data"], tokenizer, format=s["format"], max_seq_length=s["max_seq_length"],
        train_on_inputs=s["train_on_inputs"], text_field=s["dataset_text_field"], num_proc=s["dataset_num_proc"],
        split=s["split"], name=s["dataset_config"],
    )  # fmt: skip
    color = sys.stdout.isatty() if args.color is None else args.color
    print(describe_dataset(data, tokenizer, num_examples=args.num_examples, color=color, pack=s["packing"],
                           seed=s["seed"]))  # fmt: skip
    return 0


def _read_yaml(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got a {type(loaded).__name__}")
    return loaded


def train_settings(args: argparse.Namespace) -> dict:
    """Defaults < YAML file < flags, validated by the schema (jaxsloth.config): field name -> value for every
    setting of a train run. Old spellings print a one-line warning naming the new one."""
    names = config.spellings(config.TRAIN_SCHEMAS)
    given = config.cli_defaults(config.TRAIN_SCHEMAS)
    source: dict[str, str] = {}  # where each given setting came from, for error messages
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FutureWarning)
        if args.config is not None:
            from jaxsloth.faces.axolotl import translate_config

            path = Path(args.config)  # a jaxsloth, Axolotl or LLaMA-Factory config
            for key, value in translate_config(_read_yaml(path), path).items():
                name = config.resolve_name(key, names, str(path))
                given[name], source[name] = value, f"{path}: {key}"
        flags = config.flag_values(args, config.TRAIN_SCHEMAS)
        if "max_steps" in flags:  # --max-steps replaces the file's run length in epochs (as transformers' max_steps)
            given.pop("num_train_epochs", None)
        for name, (spelling, value) in flags.items():
            given[name], source[name] = value, spelling
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    for required in ("model", "data"):
        if given.get(required) is None:
            raise ValueError(f"no {required} given: pass {config.flag(required)} or set {required}: in the YAML file")
    try:
        built = config.split_settings(given)
    except ValueError as e:
        named = [where for name, where in source.items() if re.search(rf"\b{name}\b", str(e))]
        raise ValueError(f"{e} (from {', '.join(named)})" if named else str(e)) from None
    return {f.name: getattr(obj, f.name) for obj in built for f in dataclasses.fields(obj)}


def _api_settings(schema: type, s: dict) -> dict:
    """The keyword settings of the API function that takes ``schema``."""
    return {f.name: s[f.name] for f in schema.api_fields()}


def _existing_dir(path: str, what: str) -> str:
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{what} directory not found: {path}")
    return path


def cmd_train(args: argparse.Namespace) -> int:
    s = train_settings(args)
    import jaxsloth
    from jaxsloth.sharding import initialize_distributed

    initialize_distributed()  # several hosts: JAX_COORDINATOR_ADDRESS etc. or SLURM; before any device is touched

    if s["full_finetuning"]:
        lora_set = [f.name for f in dataclasses.fields(config.LoraConfig) if s[f.name] != f.default]
        if lora_set:
            raise ValueError(f"full_finetuning trains every weight, with no adapter: drop {', '.join(lora_set)}")
    out = Path(s["output_dir"])
    if s["method"] == "grpo":  # reward functions named in the YAML are looked for beside it first
        from jaxsloth.methods.rewards import resolve_reward_funcs

        where = Path(args.config).resolve().parent if args.config is not None else None
        s["reward_funcs"] = tuple(resolve_reward_funcs(s["reward_funcs"], where))
    data = _checked_before_loading(s, out)
    model, tokenizer = jaxsloth.load(s["model"], **_api_settings(config.LoadConfig, s))
    if not s["full_finetuning"]:
        model = jaxsloth.add_lora(model, seed=s["seed"], **_api_settings(config.LoraConfig, s))
    out.mkdir(parents=True, exist_ok=True)
    try:
        result = jaxsloth.train(model, tokenizer, data, **{**_api_settings(config.TrainConfig, s), "output_dir": out})
    except KeyboardInterrupt as e:
        from jaxsloth.train.interrupts import interrupted_message

        message, code = interrupted_message(e, out / "checkpoints")
        print(f"\n{message}", file=sys.stderr)
        return code
    if s["full_finetuning"]:  # every weight trained: the whole model, in its own dtype
        dtype = model.profile.dtype.name
        saved = f"model: {jaxsloth.save_merged(model, out / 'model', dtype=dtype, tokenizer=tokenizer, overwrite=True)}"
    else:
        saved = f"PEFT adapter: {jaxsloth.save_adapter(model, out / 'adapter', overwrite=True)}"  # this run's own
    if not result.history:
        print(
            f"the run in {out} is already complete (step {result.step} of {result.step}); nothing to train. Pass a "
            f"larger --max-steps (with --resume) to train further, or --overwrite to start again. {saved}"
        )
        return 0
    last = result.history[-1]["loss"]
    print(f"trained {result.step} steps (final loss {last:.4f}); {saved}; metrics: {out}")
    return 0


def _checked_before_loading(s: dict, out: Path):
    """What can be checked without the model, checked before it loads (minutes for a large one): the output
    directory may be written as asked, the --tokenizer directory exists, and the data is read and its format
    detected. Returns the records (or the data source itself when it is streamed)."""
    from jaxsloth.data import load_records
    from jaxsloth.data.formats import resolve_format
    from jaxsloth.train.run_dir import check_output_dir

    check_output_dir(out, resume=s["resume"], overwrite=s["overwrite"])
    if s["tokenizer"] is not None:
        _existing_dir(s["tokenizer"], "tokenizer")
    if s["eval_dataset"] is not None:  # read before the model loads too, then passed on as records
        split = s["eval_split"] or s["split"]
        s["eval_dataset"] = load_records(s["eval_dataset"], split=split, name=s["dataset_config"])
    if s["streaming"]:
        return s["data"]
    records = load_records(s["data"], split=s["split"], name=s["dataset_config"])
    if s["method"] != "grpo":  # GRPO's rows are prompts, not one of the SFT formats
        resolve_format(s["format"], records[0], s["dataset_text_field"])
    return records


# The load settings that generate, chat and export take, as flags derived from the schema.
MODEL_FLAGS = ("model", "revision", "tokenizer", "load_in_4bit", "max_seq_length")


def _load_with_adapter(args: argparse.Namespace):
    import jaxsloth

    values = {name: value for name, (_, value) in config.flag_values(args, [config.LoadConfig]).items()}
    if values.get("model") is None:
        raise ValueError("--model is required: a Hugging Face model directory or Hub id (org/name)")
    if values.get("tokenizer") is not None:
        _existing_dir(values["tokenizer"], "tokenizer")
    model, tokenizer = jaxsloth.load(values.pop("model"), **values)
    if args.adapter is not None:
        model = jaxsloth.load_adapter(model, _existing_dir(args.adapter, "adapter"))
    return model, tokenizer


def _add_model_args(p: argparse.ArgumentParser, adapter_required: bool = False) -> None:
    config.add_arguments(p, [config.LoadConfig], only=MODEL_FLAGS)
    p.add_argument("--adapter", required=adapter_required, help="PEFT LoRA adapter directory")


def _sampling(args: argparse.Namespace) -> dict:
    """The sampling flags as ``Model.generate`` takes them (a temperature > 0 samples)."""
    names = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _print_stream(pieces) -> str:
    """Prints text pieces as they come, then a newline; returns the whole text."""
    text = ""
    for piece in pieces:
        print(piece, end="", flush=True)
        text += piece
    print(flush=True)
    return text


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
        raise ValueError(f"no tokenizer files in {args.model}: pass --tokenizer PATH (a directory with tokenizer.json)")
    chat = args.chat if args.chat is not None else getattr(tokenizer, "chat_template", None) is not None
    if chat:
        from jaxsloth.data.chat import require_chat_template

        require_chat_template(tokenizer, "--chat")
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompts = [[*system, {"role": "user", "content": p}] for p in prompts]
    elif args.system:
        raise ValueError("--system needs the chat template (drop --no-chat)")
    if len(prompts) == 1:  # one prompt: print its tokens as they are decoded
        from jaxsloth.generate import stream_text

        _print_stream(stream_text(model, tokenizer, prompts[0], args.max_new_tokens, **_sampling(args)))
        return 0
    outputs = model.generate(tokenizer, prompts, max_new_tokens=args.max_new_tokens, **_sampling(args))
    for text in outputs:
        print(f"{text}\n---")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Reads user turns from stdin, one a line, and answers each with the whole conversation so far."""
    from jaxsloth.data.chat import require_chat_template
    from jaxsloth.generate import stream_text

    model, tokenizer = _load_with_adapter(args)
    if tokenizer is None:
        raise ValueError(f"no tokenizer files in {args.model}")
    require_chat_template(tokenizer, "jaxsloth chat")
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat: one message a line; /reset starts over, /exit or Ctrl-D ends", file=sys.stderr)
    while True:
        if interactive:
            print(">>> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            messages = list(start)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        reply = _print_stream(stream_text(model, tokenizer, messages, args.max_new_tokens, **_sampling(args)))
        messages.append({"role": "assistant", "content": reply})


def cmd_export(args: argparse.Namespace) -> int:
    import jaxsloth

    if args.gguf is not None:
        return _export_gguf(args)
    if Path(args.out).exists() and any(Path(args.out).iterdir()) and not args.overwrite:
        raise FileExistsError(f"output directory {args.out} is not empty (pass --overwrite)")
    model, tokenizer = _load_with_adapter(args)
    if args.merged:
        path = jaxsloth.save_merged(
            model,
            args.out,
            dtype=args.dtype,
            tokenizer=tokenizer,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
        )
        print(f"merged {args.dtype} checkpoint: {path}")
    else:
        path = jaxsloth.save_adapter(model, args.out, overwrite=args.overwrite)
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


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", help="system prompt (chat template)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, help="sample at this temperature (default: greedy)")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, help="sample from the most likely tokens holding this probability")
    p.add_argument("--min-p", type=float, help="drop tokens below min_p x the most likely token's probability")
    p.add_argument("--repetition-penalty", type=float, help="> 1 discourages tokens already in the text")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxsloth", description="LoRA/QLoRA fine-tuning of Hugging Face LLMs in JAX")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_parser(sub)
    _add_inspect_parser(sub)

    g = sub.add_parser("generate", help="answer prompts with a model (and a LoRA adapter)")
    _add_model_args(g)
    g.add_argument("prompts", nargs="*", help="prompt texts (one prompt: its answer is printed as it is decoded)")
    g.add_argument("--prompts-file", help="file with one prompt per line")
    g.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="send each prompt as a user turn through the chat template (default: when the tokenizer has one); "
        "--no-chat completes the raw text",
    )
    _add_generation_args(g)

    c = sub.add_parser("chat", help="talk with a model: user turns from stdin, answers through its chat template")
    _add_model_args(c)
    _add_generation_args(c)

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
    e.add_argument("--max-shard-size", default="5GB", help="merged weights: largest safetensors file (e.g. 2GB)")

    d = sub.add_parser("demo", help="LoRA-tune the tiny built-in model on CPU and show its answers improve")
    d.add_argument("--output-dir", default="jaxsloth-demo", help="where the adapter and loss.png go")
    d.add_argument("--steps", type=int, default=None, help="training steps (default: the full demo)")
    d.add_argument("--build-assets", action="store_true", help=argparse.SUPPRESS)

    sub.add_parser("bench", help="benchmarks (arguments pass through to jaxsloth.bench.cli)", add_help=False)
    return parser


COMMANDS = {
    "train": cmd_train,
    "inspect-data": cmd_inspect_data,
    "generate": cmd_generate,
    "chat": cmd_chat,
    "export": cmd_export,
    "demo": cmd_demo,
}


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
    except OSError as e:  # disk full, no permission: not the user's command; partial files are removed already
        print(f"jaxsloth {args.command}: error: {e}", file=sys.stderr)
        return 1
