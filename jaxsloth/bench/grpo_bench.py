"""GRPO on random weights: jaxsloth's sampling speed and GRPO step (sampling and training time, peak memory), and the
workload every GRPO runner shares (``grpo_baseline`` runs TRL's and transformers' side of it).

    python -m jaxsloth.bench.grpo_bench --arch llama3.2-1b --quant nf4 --mode step --out grpo.jsonl
    python -m jaxsloth.bench.grpo_bench --arch llama3.2-1b --quant bf16 --mode sampling --out grpo.jsonl

Workload: --prompts prompts of --prompt-len tokens (random letters of a character tokenizer over the model's
vocabulary), --generations completions each, every completion --completion-len tokens (no stop token: jaxsloth
samples without one, the baselines forbid EOS with min_new_tokens), LoRA r=16 alpha=16 on every projection, rewards
varying with the completion so the loss is not zero. step: jaxsloth.train's GRPO loop (method="grpo", beta 0, one
generation per step: per_device_train_batch_size = generations, gradient_accumulation_steps = prompts), --steps steps,
the first (compiling) left out of the medians. sampling: ``rollout.start_sampling`` with the adapter unmerged.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import string
import time

import numpy as np

from jaxsloth.bench.timing import emit_jsonl, portable_command

LORA = dict(r=16, lora_alpha=16.0)


def char_tokenizer(vocab_size: int):
    """A character tokenizer over ``vocab_size`` ids: <pad> 0, <eos> 1, the ASCII letters, then filler tokens. No BOS
    is added, so a prompt of n letters is n tokens for every runner."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>"]
    vocab = {t: i for i, t in enumerate(specials + list(string.ascii_letters))}
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def workload_prompts(n: int, length: int, seed: int = 0) -> list[str]:
    """n prompts of ``length`` random letters (``length`` tokens of ``char_tokenizer``)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list(string.ascii_letters))
    return ["".join(rng.choice(letters, length)) for _ in range(n)]


def varied_reward(prompts, completions, completion_ids, **kwargs) -> list[float]:
    """A reward that varies with the completion (its token ids' sum modulo 7, over 6), so advantages are not zero."""
    return [float(sum(ids) % 7) / 6.0 for ids in completion_ids]


def workload_name(args) -> str:
    model = os.path.basename(os.path.normpath(args.model_path)) if args.model_path else args.arch
    kind = "qlora" if args.quant == "nf4" else "lora"
    return f"{model}-{kind}-p{args.prompts}xg{args.generations}-{args.prompt_len}+{args.completion_len}"


def _model(args):
    import jax

    from converters.hf import load_config
    from jaxsloth.api import Model
    from jaxsloth.bench.step import build_params
    from jaxsloth.config import LoraConfig
    from jaxsloth.lora import init_lora
    from jaxsloth.models.presets import preset
    from jaxsloth.profiles import profile_for_device

    config = load_config(args.model_path) if args.model_path else preset(args.arch)
    profile = profile_for_device(name=args.profile)
    params = build_params(config, args.quant, profile.dtype, jax.random.key(0))
    lora = LoraConfig(**LORA)
    trainable = init_lora(config, lora, jax.random.key(1))
    length = args.prompt_len + args.completion_len
    return Model(config, params, profile, max_seq_length=length, lora=lora, trainable=trainable)


def run_step(args) -> dict:
    """jaxsloth's GRPO steps on the workload -> one record (medians over the steps after the first)."""
    from jaxsloth.config import TrainConfig
    from jaxsloth.methods.grpo_train import grpo_train

    model = _model(args)
    tokenizer = char_tokenizer(model.config.vocab_size)
    data = [{"prompt": p} for p in workload_prompts(args.prompts, args.prompt_len)]
    tc = TrainConfig(
        method="grpo", reward_funcs=[varied_reward], num_generations=args.generations,
        max_completion_length=args.completion_len, per_device_train_batch_size=args.generations,
        gradient_accumulation_steps=args.prompts, max_steps=args.steps + 1, learning_rate=1e-5, report_to="none",
    )  # fmt: skip
    t0 = time.perf_counter()
    result = grpo_train(model, tokenizer, data, tc, progress=False, stop_tokens=())
    timed = result.history[1:] or result.history
    sample_s = statistics.median(r["generate_s"] + r["reward_s"] for r in timed)
    train_s = statistics.median(r["train_s"] for r in timed)
    return bench_record(
        args, "jaxsloth", mode="step", sample_s=sample_s, train_s=train_s, step_s=sample_s + train_s,
        first_step_s=result.history[0]["step_time_s"], peak_gib=max((r["peak_gib"] for r in result.history if r["peak_gib"] is not None), default=None),
        completion_tokens=int(result.history[-1]["tokens"]), loss=result.history[-1]["loss"],
        reward_std=result.history[-1]["reward_std"], wall_s=time.perf_counter() - t0, **_jax_versions(),
    )  # fmt: skip


def run_sampling(args) -> dict:
    """jaxsloth's batched sampling with the LoRA unmerged -> one record (median over --steps after one warm-up)."""
    import jax

    from jaxsloth.methods.rollout import start_sampling

    model = _model(args)
    tokenizer = char_tokenizer(model.config.vocab_size)
    prompt_ids = [tokenizer(p)["input_ids"] for p in workload_prompts(args.prompts, args.prompt_len)]

    def sample(seed: int):
        return start_sampling(
            model.params, model.trainable, model.config, model.lora, prompt_ids, num_generations=args.generations,
            max_completion_length=args.completion_len, seed=seed, ops=model.profile.ops,
            compute_dtype=model.profile.dtype,
        )()  # fmt: skip

    times, rollout = [], None
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        rollout = sample(i)
        times.append(time.perf_counter() - t0)
    tokens = int(rollout.lengths.sum())
    seconds = statistics.median(times[1:] or times)
    peak = (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    trace = {}
    if args.trace:  # one more sampling under the profiler, after the timed ones: where each decode step's time goes
        from jaxsloth.bench import trace_summary

        with jax.profiler.trace(args.trace, create_perfetto_trace=True):
            sample(args.steps + 1)
        # Per decode step: device time by kind of kernel, and the trace's span, whose excess over the kernels'
        # time is the device waiting (launches, host work) rather than computing.
        summary = trace_summary.summarize(trace_summary.find_trace(args.trace), steps=args.completion_len, top=40)
        with open(os.path.join(args.trace, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        trace = {
            "trace_per_decode_step_ms": {
                "kernels": round(summary["kernel_ms_per_step"], 3),
                "span": round(summary["span_ms_per_step"], 3),
                **summary["by_category_ms"],
            }
        }
        print(json.dumps(trace), flush=True)
    return bench_record(
        args, "jaxsloth", mode="sampling", sample_s=seconds, completion_tokens=tokens, tokens_per_s=tokens / seconds,
        first_s=times[0], peak_gib=None if peak is None else peak / 2**30, **trace, **_jax_versions(),
    )  # fmt: skip


def _jax_versions() -> dict:
    import jax

    return {"jax": jax.__version__, "gpu": jax.devices()[0].device_kind}


def bench_record(args, system: str, **fields) -> dict:
    """One JSONL record: system, workload, the measured fields, date and the command that reran it."""
    return {
        "system": system,
        "workload": workload_name(args),
        **fields,
        "date": datetime.date.today().isoformat(),
        "command": portable_command(),
    }


def markdown_table(records: list[dict]) -> str:
    """The records as one markdown table per mode: GRPO steps (sampling / training split, peak memory, the step time
    relative to TRL's on the same workload) and sampling speed (tokens/s, relative to transformers' generate)."""
    lines = []
    steps = [r for r in records if r.get("mode") == "step"]
    if steps:
        lines += [
            "| workload | system | sampling s | training s | step s | vs TRL | peak GiB |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in steps:
            trl = [t for t in steps if t["system"] == "trl" and t["workload"] == r["workload"]]
            speedup = f"{trl[-1]['step_s'] / r['step_s']:.2f}x" if trl else "-"
            peak = "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.1f}"
            lines.append(
                f"| {r['workload']} | {r['system']} | {r['sample_s']:.1f} | {r['train_s']:.1f} | {r['step_s']:.1f} | "
                f"{speedup} | {peak} |"
            )
    sampling = [r for r in records if r.get("mode") == "sampling"]
    if sampling:
        lines += [
            "",
            "| workload | system | tokens/s | seconds | vs generate | peak GiB |",
            "|---|---|---|---|---|---|",
        ]
        for r in sampling:
            hf = [t for t in sampling if t["system"] == "hf-generate" and t["workload"] == r["workload"]]
            speedup = f"{r['tokens_per_s'] / hf[-1]['tokens_per_s']:.2f}x" if hf else "-"
            peak = "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.1f}"
            lines.append(
                f"| {r['workload']} | {r['system']} | {r['tokens_per_s']:,.0f} | {r['sample_s']:.1f} | {speedup} | "
                f"{peak} |"
            )
    return "\n".join(lines)


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """The workload's flags, shared by every GRPO runner."""
    p.add_argument("--arch", default="llama3.2-1b")
    p.add_argument("--model-path", default=None, help="local checkpoint directory: its config.json replaces --arch")
    p.add_argument("--quant", choices=("nf4", "bf16"), default="nf4")
    p.add_argument("--mode", choices=("step", "sampling"), default="step")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--completion-len", type=int, default=768)
    p.add_argument("--steps", type=int, default=3, help="timed steps or samplings (+ one warm-up)")
    p.add_argument("--out", default=None)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p)
    p.add_argument("--profile", default=None, help="jaxsloth GPU profile (default: the device's)")
    p.add_argument("--table", default=None, help="print the markdown table of this JSONL file's records instead")
    p.add_argument(
        "--trace", default=None, help="sampling: directory; profile one more sampling, summarize device time"
    )
    args = p.parse_args(argv)
    if args.trace and args.mode != "sampling":
        p.error("--trace profiles the sampling mode only (--mode sampling)")
    if args.table is not None:
        with open(args.table) as f:
            print(markdown_table([json.loads(line) for line in f if line.strip()]))
        return
    record = run_step(args) if args.mode == "step" else run_sampling(args)
    emit_jsonl([record], args.out, append=True)


if __name__ == "__main__":
    main()
