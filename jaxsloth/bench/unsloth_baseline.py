"""Unsloth as a baseline, measured by the same rules as jaxsloth's step and the PyTorch baselines (GPU only).

    HF_HUB_OFFLINE=1 python -m jaxsloth.bench.unsloth_baseline --arch llama3.1-8b --quant nf4 --out step.jsonl

Unsloth loads only from a checkpoint directory with a tokenizer, so ``--arch`` writes a random-weight bf16 checkpoint
of the architecture with transformers into a temporary directory (``--work-dir``), beside the small tokenizer of
jaxsloth's demo model (speed and memory do not depend on the token ids or the weight values). ``--quant nf4`` loads
it with ``load_in_4bit=True`` (Unsloth's QLoRA), ``bf16`` in 16 bits. LoRA r=16, alpha=16 on q,k,v,o,gate,up,down,
no dropout, ``use_gradient_checkpointing="unsloth"``; AdamW on LoRA; random ids with labels = inputs.
``from_pretrained`` returns the model in inference mode, where Unsloth's checkpointing never runs, so the runner
calls ``FastLanguageModel.for_training(model)`` before the timed steps, as Unsloth's trainers do, records the evidence
(train mode, the layers' checkpointing flag) and refuses to report without it.
Exits with status 3 and a one-line message when unsloth cannot be imported.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import sys
import tempfile
from pathlib import Path

from jaxsloth.bench import torch_baseline
from jaxsloth.bench.timing import portable_command

EXIT_UNAVAILABLE = 3
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
DEMO_TOKENIZER = Path(__file__).parents[1] / "demo_assets" / "model"


def import_unsloth():
    """The unsloth module, or None (with the reason on stderr) when it cannot be imported here."""
    try:
        import unsloth  # noqa: F401  (must come before transformers: it patches it on import)

        return unsloth
    except Exception as e:  # unsloth raises more than ImportError without a GPU or with a mismatched stack
        print(f"unsloth baseline skipped: unsloth is not importable ({type(e).__name__}: {e})", file=sys.stderr)
        return None


def write_random_checkpoint(arch: str, directory: Path) -> Path:
    """A bf16 random-weight checkpoint of a preset architecture plus the demo model's tokenizer in ``directory``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from jaxsloth.models.presets import PRESETS

    if arch not in PRESETS:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(sorted(PRESETS))}")
    d = dict(PRESETS[arch])
    cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    AutoTokenizer.from_pretrained(DEMO_TOKENIZER).save_pretrained(directory)
    return directory


def with_tokenizer(model_path: Path, directory: Path) -> Path:
    """``model_path`` itself when it has a tokenizer, else ``directory`` holding links to its files plus the demo
    tokenizer."""
    if any((model_path / f).exists() for f in TOKENIZER_FILES):
        return model_path
    from transformers import AutoTokenizer

    for f in model_path.iterdir():
        (directory / f.name).symlink_to(f.resolve())
    AutoTokenizer.from_pretrained(DEMO_TOKENIZER).save_pretrained(directory)
    return directory


def run(args, work_dir: Path) -> dict:
    import torch
    from unsloth import FastLanguageModel

    if args.model_path:
        model_path = Path(args.model_path)
        if not (model_path / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in {model_path}")
        checkpoint = with_tokenizer(model_path, work_dir)
        model_name = os.path.basename(os.path.normpath(model_path))
    else:
        checkpoint = write_random_checkpoint(args.arch, work_dir)
        model_name = args.arch
    model, _ = FastLanguageModel.from_pretrained(
        model_name=str(checkpoint),
        max_seq_length=args.seq,
        dtype=torch.bfloat16,
        load_in_4bit=args.quant == "nf4",
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=TARGETS,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=0,
    )
    FastLanguageModel.for_training(model)
    evidence = torch_baseline.training_evidence(model)
    torch_baseline.check_training(evidence, True, "unsloth")
    # What was actually loaded: a QLoRA baseline whose linears silently stayed 16-bit would not be one.
    linear4bit = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    on_gpu = torch.cuda.is_available()
    loaded_gib = torch.cuda.memory_allocated() / 2**30 if on_gpu else None
    if args.quant == "nf4" and not linear4bit:
        print("unsloth baseline: load_in_4bit=True left no Linear4bit module; the record says so", file=sys.stderr)
    ms, peak_gib = torch_baseline.time_lora_training(
        model, model.config.vocab_size, args.batch, args.seq, args.steps, args.warmup
    )
    return {
        "system": "unsloth",
        "workload": f"{model_name}-{'qlora' if args.quant == 'nf4' else 'lora'}-b{args.batch}-s{args.seq}",
        "tokens_per_s": args.batch * args.seq / (ms / 1e3),
        "step_ms": ms,
        "peak_gib": peak_gib,
        "variant": 'for_training, checkpointing="unsloth"',
        **evidence,
        "linear4bit_modules": linear4bit,
        "loaded_gib": loaded_gib,
        "gpu": torch.cuda.get_device_name() if on_gpu else "cpu",
        "torch": torch.__version__,
        "unsloth": _version("unsloth"),
        "date": datetime.date.today().isoformat(),
        "command": portable_command(),
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="llama3.1-8b")
    p.add_argument("--model-path", default=None, help="local checkpoint directory (used instead of --arch)")
    p.add_argument("--quant", choices=("nf4", "bf16"), default="nf4")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (longest-sequence probes: 0)")
    p.add_argument("--work-dir", default=None, help="where the temporary checkpoint goes (default: the temp dir)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if import_unsloth() is None:
        return EXIT_UNAVAILABLE
    with tempfile.TemporaryDirectory(prefix="jaxsloth-unsloth-", dir=args.work_dir) as tmp:
        rec = run(args, Path(tmp))
    line = json.dumps(rec)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
