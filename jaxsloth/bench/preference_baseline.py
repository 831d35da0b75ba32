"""The DPO step: jaxsloth against TRL's DPOTrainer (PEFT + bitsandbytes) and Unsloth's DPO, one workload.

    python -m jaxsloth.bench.preference_baseline --system jaxsloth --arch llama3.1-8b --profile h200 --out dpo.jsonl
    python -m jaxsloth.bench.preference_baseline --system trl-peft-bnb --arch llama3.1-8b --out dpo.jsonl
    python -m jaxsloth.bench.preference_baseline --system unsloth --arch llama3.1-8b --out dpo.jsonl
    python -m jaxsloth.bench.preference_baseline --table dpo.jsonl

Workload: QLoRA DPO (sigmoid, beta 0.1) on random-weight models of the architecture, LoRA r=16, alpha=16 on
q,k,v,o,gate,up,down, no dropout; ``--pairs`` pairs per step, each a prompt with a chosen and a rejected answer,
each prompt + answer exactly ``--seq`` tokens (half prompt, half answer, EOS included): the demo model's character
tokenizer writes one token per letter, so every system reads the same token counts with no padding. The reference
is the policy with its adapter off in every system (TRL's with a PEFT model), computed in each step (no precompute).
tokens/s counts the chosen and rejected sequences' tokens (2 x pairs x seq); peak GiB is the framework's own
counter; the step time is the median of ``--steps`` steps after ``--warmup``.

jaxsloth: its DPO train step (``preference_train.make_preference_train_step``) on random NF4 weights, the data
through its own preference tokenizer and packer. trl-peft-bnb: ``DPOTrainer(model=<PEFT model>, args=DPOConfig(...))
.train()`` on the bench's HF + PEFT + bitsandbytes NF4 model (``torch_baseline.build_model``, plain variant: bf16,
no f32 upcast), gradient checkpointing on, train mode; the steps timed by a TrainerCallback. unsloth:
``FastLanguageModel.from_pretrained(load_in_4bit=True)``, ``get_peft_model(use_gradient_checkpointing="unsloth")``,
``for_training``, ``PatchDPOTrainer()``, then TRL's DPOTrainer as above (Unsloth's DPO recipe). Each runner refuses to
report a model not in train mode or without checkpointing; unsloth exits with status 3 when it cannot be imported.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

from jaxsloth.bench.timing import portable_command

SYSTEMS = ("jaxsloth", "trl-peft-bnb", "unsloth")
DEMO_TOKENIZER = Path(__file__).parents[1] / "demo_assets" / "model"
BETA = 0.1
LEARNING_RATE = 1e-6  # DPOConfig's default


def synthetic_pairs(n: int, seq: int, seed: int = 0) -> list[dict]:
    """``n`` string pairs in TRL's standard format whose prompt + answer is ``seq`` tokens under the demo tokenizer
    (one token per lowercase letter): a prompt of seq // 2 letters, answers of seq - seq // 2 - 1 letters plus the
    EOS TRL appends."""
    rng = random.Random(seed)
    letters = lambda k: "".join(rng.choice(string.ascii_lowercase) for _ in range(k))  # noqa: E731
    prompt_len = seq // 2
    answer_len = seq - prompt_len - 1
    return [{"prompt": letters(prompt_len), "chosen": letters(answer_len), "rejected": letters(answer_len)}
            for _ in range(n)]  # fmt: skip


def demo_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO_TOKENIZER)


def _workload(args, model_name: str) -> str:
    return f"{model_name}-qlora-dpo-p{args.pairs}-s{args.seq}"


def _common(args, step_s: list[float], peak: float | None) -> dict:
    ms = 1e3 * statistics.median(step_s)
    return {
        "tokens_per_s": 2 * args.pairs * args.seq / (ms / 1e3),
        "step_ms": ms,
        "peak_gib": peak,
        "timed_steps": len(step_s),
        "warmup": args.warmup,
        "date": datetime.date.today().isoformat(),
        "command": portable_command(),
    }


# --- jaxsloth ------------------------------------------------------------------------------------------------------


def run_jaxsloth(args) -> dict:
    import jax
    import numpy as np

    from converters.hf import load_config
    from jaxsloth.bench.step import build_params
    from jaxsloth.bench.timing import environment, peak_gib
    from jaxsloth.config import LoraConfig, TrainConfig
    from jaxsloth.lora import init_lora
    from jaxsloth.methods.preference_loader import PreferenceLoader, tokenize_preferences
    from jaxsloth.methods.preference_train import make_preference_train_step, preference_config
    from jaxsloth.models.decoder import unstack_layers
    from jaxsloth.models.presets import preset
    from jaxsloth.profiles import profile_for_device
    from jaxsloth.train.step import make_optimizer

    config = load_config(args.model_path) if args.model_path else preset(args.arch)
    model_name = os.path.basename(os.path.normpath(args.model_path)) if args.model_path else args.arch
    profile = profile_for_device(name=args.profile)
    params = build_params(config, "nf4", profile.dtype, jax.random.key(0))
    if profile.unrolled_layers:  # as jaxsloth.train runs it on one device
        params = unstack_layers(params, consume=True)
    lora = LoraConfig(r=16, lora_alpha=16.0)
    trainable = init_lora(config, lora, jax.random.key(1))
    tc = TrainConfig(method="dpo", beta=BETA, learning_rate=LEARNING_RATE, max_steps=10_000)
    optimizer = make_optimizer(tc, lora, trainable, profile.optimizer_state)
    opt_state = optimizer.init(trainable)
    pairs = synthetic_pairs(args.pairs * (1 + args.warmup + args.steps), args.seq)
    examples = tokenize_preferences(
        pairs, demo_tokenizer(), method="dpo", max_length=args.seq, pairs_per_micro=args.pairs
    )
    lengths = {len(p) + len(c) for p, cs in zip(examples.prompts, examples.completions, strict=True) for c in cs}
    if lengths != {args.seq}:
        raise RuntimeError(f"jaxsloth tokenized sequences of {sorted(lengths)} tokens, not {args.seq}")
    loader = PreferenceLoader(examples, pairs_per_micro=args.pairs, seed=0)
    step = make_preference_train_step(
        config, lora, tc, profile, optimizer, pc=preference_config(tc), sequences=loader.sequences_per_micro
    )
    batches = [jax.tree.map(jax.numpy.asarray, next(loader)) for _ in range(1 + args.warmup + args.steps)]
    t0 = time.perf_counter()
    compiled = step.lower(trainable, opt_state, params, batches[0], jax.random.key(2)).compile()
    compile_s = time.perf_counter() - t0
    print(f"compiled in {compile_s:.1f} s", flush=True)
    state = {"t": trainable, "o": opt_state}
    losses, step_s = [], []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        state["t"], state["o"], m = compiled(state["t"], state["o"], params, batch, jax.random.key(3 + i))
        losses.append(float(m["loss"]))  # blocks on the step
        if i > args.warmup:  # the first (i = 0) runs right after compiling; then the warmup steps
            step_s.append(time.perf_counter() - t0)
    return {
        "system": "jaxsloth",
        "workload": _workload(args, model_name),
        **_common(args, step_s, peak_gib()),
        "first_loss": losses[0],
        "finite": bool(np.all(np.isfinite(losses))),
        "compile_s": compile_s,
        "profile": profile.name,
        "layer_loop": "unrolled" if profile.unrolled_layers else "scan",
        **{k: v for k, v in environment().items() if k not in ("date", "command")},
    }


# --- TRL's DPOTrainer (PEFT + bitsandbytes, or Unsloth's model) ----------------------------------------------------


def dpo_config(args, output_dir: str, bf16: bool, checkpointing: bool):
    """TRL's DPOConfig for the workload: one micro-batch of --pairs pairs per step, max_length --seq, the reference
    in-step (precompute off), no logging, saving or evaluation. checkpointing: the Trainer's own gradient
    checkpointing (Unsloth's recipe leaves it off: its model checkpoints itself, use_gradient_checkpointing)."""
    from trl import DPOConfig

    return DPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=args.pairs,
        gradient_accumulation_steps=1,
        max_steps=1 + args.warmup + args.steps,
        learning_rate=LEARNING_RATE,
        beta=BETA,
        max_length=args.seq,
        precompute_ref_log_probs=False,
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        bf16=bf16,
        report_to="none",
        save_strategy="no",
        logging_steps=1_000_000,
        seed=0,
    )


def _step_timer(cuda: bool):
    """A TrainerCallback timing each optimizer step (after the data is fetched, through the optimizer update) and
    recording the model's training evidence at the first step."""
    from transformers import TrainerCallback

    from jaxsloth.bench.torch_baseline import training_evidence

    def sync():
        if cuda:
            import torch

            torch.cuda.synchronize()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.evidence: dict | None = None

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if self.evidence is None and model is not None:
                self.evidence = training_evidence(model)
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.times.append(time.perf_counter() - self.t0)

    return StepTimer()


def dataset_lengths(dataset) -> dict | None:
    """The token counts TRL prepared for the first example (prompt, chosen, rejected), or None when its columns
    are named otherwise."""
    first = dataset[0]
    if not all(f"{k}_ids" in first for k in ("prompt", "chosen", "rejected")):
        return None
    return {k: len(first[f"{k}_ids"]) for k in ("prompt", "chosen", "rejected")}


def train_with_trl(args, model, tokenizer, output_dir: str, system: str, trainer_checkpointing: bool) -> dict:
    """TRL's DPOTrainer over the synthetic pairs; the model is a PEFT model (reference: its adapter off). Returns the
    record's measured fields; ``same_workload`` says whether TRL tokenized every prompt + answer to --seq tokens."""
    import torch
    from datasets import Dataset
    from trl import DPOTrainer

    from jaxsloth.bench.torch_baseline import check_training

    cuda = torch.cuda.is_available()
    pairs = synthetic_pairs(args.pairs * (1 + args.warmup + args.steps), args.seq)
    timer = _step_timer(cuda)
    trainer = DPOTrainer(
        model=model,
        ref_model=None,
        args=dpo_config(args, output_dir, bf16=cuda, checkpointing=trainer_checkpointing),
        train_dataset=Dataset.from_list(pairs),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    lengths = dataset_lengths(trainer.train_dataset)
    same = lengths is None or {lengths["prompt"] + lengths["chosen"], lengths["prompt"] + lengths["rejected"]} == {
        args.seq
    }
    if not same:  # measured all the same, and marked: the record says what was trained
        print(f"{system}: TRL tokenized {lengths}, not prompt + answer = {args.seq} tokens", file=sys.stderr)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    if timer.evidence is None:
        raise RuntimeError(f"{system}: the trainer ran no step")
    check_training(timer.evidence, True, system)
    step_s = timer.times[1 + args.warmup :]
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return {
        **_common(args, step_s, peak),
        **timer.evidence,
        "trl_lengths": lengths,
        "same_workload": same,
        "gpu": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "trl": _version("trl"),
    }


def run_trl(args, work_dir: Path) -> dict:
    from jaxsloth.bench import torch_baseline

    device = "cuda" if _cuda() else "cpu"
    cfg, model_name = torch_baseline.hf_config(args)
    model = torch_baseline.build_model(cfg, "hf-peft-bnb", "plain", "sdpa", True, device=device)
    measured = train_with_trl(args, model, demo_tokenizer(), str(work_dir), "trl-peft-bnb", True)
    return {
        "system": "trl-peft-bnb",
        "workload": _workload(args, model_name),
        **measured,
        "variant": "DPOTrainer, PEFT model, bnb NF4, checkpointing, bf16 (no f32 upcast)",
        "peft": _version("peft"),
        "bitsandbytes": _version("bitsandbytes"),
    }


def run_unsloth(args, work_dir: Path) -> dict:
    import torch
    import unsloth  # before trl: it patches
    from unsloth import FastLanguageModel

    from jaxsloth.bench import unsloth_baseline

    patch = getattr(unsloth, "PatchDPOTrainer", None)
    if patch is not None:  # Unsloth's DPO recipe; releases that patch TRL on import alone have dropped it
        patch()
    if args.model_path:
        checkpoint = unsloth_baseline.with_tokenizer(Path(args.model_path), work_dir)
        model_name = os.path.basename(os.path.normpath(args.model_path))
    else:
        checkpoint = unsloth_baseline.write_random_checkpoint(args.arch, work_dir)
        model_name = args.arch
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(checkpoint), max_seq_length=args.seq, dtype=torch.bfloat16, load_in_4bit=True
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=unsloth_baseline.TARGETS,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=0,
    )
    FastLanguageModel.for_training(model)
    linear4bit = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    measured = train_with_trl(args, model, tokenizer or demo_tokenizer(), str(work_dir / "out"), "unsloth", False)
    return {
        "system": "unsloth",
        "workload": _workload(args, model_name),
        **measured,
        "variant": 'PatchDPOTrainer + DPOTrainer, load_in_4bit, checkpointing="unsloth"',
        "linear4bit_modules": linear4bit,
        "patch_dpo_trainer": patch is not None,
        "unsloth": _version("unsloth"),
    }


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _version(package: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# --- table ---------------------------------------------------------------------------------------------------------


def table(rows: list[dict]) -> str:
    """A markdown table of the latest record per system: tokens/s, step ms, peak GiB and jaxsloth's ratios."""
    latest = {r["system"]: r for r in rows}
    ours = latest.get("jaxsloth")
    lines = ["| system | tokens/s | step ms | peak GiB | jaxsloth speed-up | jaxsloth memory ratio |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for system in SYSTEMS:
        r = latest.get(system)
        if r is None:
            lines.append(f"| {system} | (no record) | | | | |")
            continue
        peak = "" if r.get("peak_gib") is None else f"{r['peak_gib']:.2f}"
        speedup = memory = ""
        if ours is not None and system != "jaxsloth":
            speedup = f"{ours['tokens_per_s'] / r['tokens_per_s']:.2f}x"
            if ours.get("peak_gib") and r.get("peak_gib"):
                memory = f"{ours['peak_gib'] / r['peak_gib']:.2f}"
        name = system if r.get("same_workload", True) else f"{system} (other token counts: {r['trl_lengths']})"
        lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.0f} | {peak} | {speedup} | {memory} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system", choices=SYSTEMS)
    p.add_argument("--table", default=None, help="print the table of this JSONL file's records and exit")
    p.add_argument("--arch", default="llama3.1-8b")
    p.add_argument("--model-path", default=None, help="local checkpoint directory: its config.json replaces --arch")
    p.add_argument("--profile", default=None, help="jaxsloth: the profile (default: from the device)")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--seq", type=int, default=1024, help="tokens of each prompt + answer")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--work-dir", default=None, help="temporary checkpoints and trainer output (default: temp dir)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.table:
        print(table([json.loads(line) for line in open(args.table) if line.strip()]))
        return 0
    if args.system is None:
        p.error("give --system or --table")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.system == "unsloth":
        from jaxsloth.bench.unsloth_baseline import EXIT_UNAVAILABLE, import_unsloth

        if import_unsloth() is None:
            return EXIT_UNAVAILABLE
    with tempfile.TemporaryDirectory(prefix="jaxsloth-dpo-", dir=args.work_dir) as tmp:
        runner = {"jaxsloth": lambda: run_jaxsloth(args), "trl-peft-bnb": lambda: run_trl(args, Path(tmp)),
                  "unsloth": lambda: run_unsloth(args, Path(tmp))}[args.system]  # fmt: skip
        rec = runner()
    line = json.dumps(rec)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
