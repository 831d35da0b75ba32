"""The PyTorch side of the GRPO bench (``grpo_bench``'s workload and record shape): TRL's GRPOTrainer and
transformers' ``generate``.

    python -m jaxsloth.bench.grpo_baseline --system trl --arch llama3.2-1b --quant nf4 --out grpo.jsonl
    python -m jaxsloth.bench.grpo_baseline --system hf-generate --arch llama3.2-1b --quant bf16 --mode sampling

trl (--mode step): TRL's GRPOTrainer as its users run it without vLLM: the random-weight model wrapped by PEFT
(``torch_baseline.build_model``: bitsandbytes NF4 for --quant nf4, gradient checkpointing, train mode),
transformers' generation, bf16, beta 0, one generation per optimizer step (per_device_train_batch_size =
generations, gradient_accumulation_steps = prompts), every completion --completion-len tokens
(generation_kwargs min_new_tokens forbids EOS). Sampling time: TRL's ``_generate_and_score_completions`` (generation
and rewards, as jaxsloth's sample_s); training: the rest of the optimizer step. hf-generate (--mode sampling):
``generate`` on the PEFT model (adapter unmerged), the same batch and lengths, KV cache, sampling at temperature 1.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from jaxsloth.bench import torch_baseline
from jaxsloth.bench.grpo_bench import (
    add_workload_args,
    bench_record,
    char_tokenizer,
    varied_reward,
    workload_prompts,
)
from jaxsloth.bench.timing import emit_jsonl


def _model(args, checkpointing: bool):
    import torch

    cfg, _ = torch_baseline.hf_config(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    system = "hf-peft-bnb" if args.quant == "nf4" else "hf-peft"
    model = torch_baseline.build_model(cfg, system, "plain", "sdpa", checkpointing, device=device)
    model.config.use_cache = True  # generation keeps its KV cache (TRL turns checkpointing off while generating)
    return model, cfg, device


def _peak_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def run_trl(args) -> dict:
    """TRL's GRPO steps on the workload -> one record (medians over the steps after the first)."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    model, cfg, device = _model(args, checkpointing=True)
    tokenizer = char_tokenizer(cfg.vocab_size)
    data = Dataset.from_list([{"prompt": p} for p in workload_prompts(args.prompts, args.prompt_len)])
    out = tempfile.mkdtemp(prefix="grpo-trl-")
    config = GRPOConfig(
        output_dir=out, per_device_train_batch_size=args.generations, gradient_accumulation_steps=args.prompts,
        num_generations=args.generations, max_completion_length=args.completion_len,
        generation_kwargs={"min_new_tokens": args.completion_len}, max_steps=args.steps + 1, learning_rate=1e-5,
        beta=0.0, bf16=device == "cuda", gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, use_vllm=False, logging_steps=1, report_to="none",
        save_strategy="no", seed=0,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=model, reward_funcs=varied_reward, args=config, train_dataset=data, processing_class=tokenizer
    )
    sampling: list[float] = []
    steps: list[tuple[float, float]] = []  # (step seconds, sampling seconds within it)
    generate_and_score = trainer._generate_and_score_completions

    def timed_generate_and_score(*a, **kw):
        t0 = time.perf_counter()
        result = generate_and_score(*a, **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        sampling.append(time.perf_counter() - t0)
        return result

    trainer._generate_and_score_completions = timed_generate_and_score

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            self.t0, self.before = time.perf_counter(), len(sampling)

        def on_step_end(self, *a, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            steps.append((time.perf_counter() - self.t0, sum(sampling[self.before :])))

    trainer.add_callback(StepTimes())
    t0 = time.perf_counter()
    trainer.train()
    timed = steps[1:] or steps
    sample_s = statistics.median(s for _, s in timed)
    step_s = statistics.median(t for t, _ in timed)
    last = [h for h in trainer.state.log_history if "loss" in h][-1]
    completion_tokens = args.prompts * args.generations * args.completion_len
    return bench_record(
        args, "trl", mode="step", sample_s=sample_s, train_s=step_s - sample_s, step_s=step_s,
        first_step_s=steps[0][0], peak_gib=_peak_gib(), completion_tokens=completion_tokens, loss=last["loss"],
        reward_std=last.get("reward_std"), completion_length=last.get("completions/mean_length"),
        wall_s=time.perf_counter() - t0, **_versions(),
    )  # fmt: skip


def run_generate(args) -> dict:
    """transformers' generate on the PEFT model (adapter unmerged) -> one record (median over --steps after one
    warm-up)."""
    import torch

    model, cfg, device = _model(args, checkpointing=False)
    model.eval()
    tokenizer = char_tokenizer(cfg.vocab_size)
    prompts = [p for p in workload_prompts(args.prompts, args.prompt_len) for _ in range(args.generations)]
    inputs = tokenizer(prompts, return_tensors="pt").to(device)
    times, new = [], None
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.completion_len,
                min_new_tokens=args.completion_len, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, use_cache=True,
            )  # fmt: skip
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        new = out[:, inputs["input_ids"].shape[1] :]
    tokens = int(new.numel())
    seconds = statistics.median(times[1:] or times)
    return bench_record(
        args, "hf-generate", mode="sampling", sample_s=seconds, completion_tokens=tokens,
        tokens_per_s=tokens / seconds, first_s=times[0], peak_gib=_peak_gib(), **_versions(),
    )  # fmt: skip


def _versions() -> dict:
    import torch
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import trl

        out["trl"] = trl.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p)
    p.add_argument("--system", choices=("trl", "hf-generate"), default="trl")
    args = p.parse_args(argv)
    if (args.system == "trl") != (args.mode == "step"):
        raise SystemExit(f"--system {args.system} measures --mode {'step' if args.system == 'trl' else 'sampling'}")
    record = run_trl(args) if args.system == "trl" else run_generate(args)
    emit_jsonl([record], args.out, append=True)


if __name__ == "__main__":
    main()
