"""The PyTorch baselines of PERF.md, measured by the same rules as jaxsloth's step (needs the `bench` extra).

    python -m jaxsloth.bench.torch_baseline --arch llama3.1-8b --system hf-peft --out step.jsonl
    python -m jaxsloth.bench.torch_baseline --arch llama3.1-8b --system hf-peft-bnb --out step.jsonl

hf-peft: transformers + PEFT LoRA in bf16, SDPA attention, gradient checkpointing. hf-peft-bnb: the same with the
frozen projections in bitsandbytes NF4 (double quant, bf16 compute), as QLoRA. Random weights built on the GPU from
the architecture's config; LoRA r=16, alpha=16 on q,k,v,o,gate,up,down; AdamW on LoRA; labels = inputs.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

from jaxsloth.bench.timing import emit_jsonl
from jaxsloth.models.presets import PRESETS

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _quantize_linears(model, torch, bnb):
    """Replaces every targeted nn.Linear by a bitsandbytes Linear4bit (NF4, double quant), as from_pretrained with
    a BitsAndBytesConfig does, but from the in-memory random model (no checkpoint on disk needed)."""
    for _, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child_name in TARGETS:
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=torch.bfloat16,
                    compress_statistics=True,
                    quant_type="nf4",
                    device="cpu",
                )
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
                q = q.cuda()
                setattr(module, child_name, q)
                del child
    torch.cuda.empty_cache()


def time_lora_training(model, vocab_size: int, batch: int, seq: int, steps: int, warmup: int) -> tuple[float, float]:
    """PERF.md's step on a PEFT-wrapped model: AdamW (lr 2e-4) on the trainable parameters, random ids as inputs and
    labels. Returns (median step ms, peak GiB by torch.cuda.max_memory_allocated)."""
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    ids = torch.randint(0, vocab_size, (batch, seq), device="cuda")
    torch.cuda.reset_peak_memory_stats()

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    ms = cuda_median_ms(step, steps, warmup=warmup)
    return ms, torch.cuda.max_memory_allocated() / 2**30


def cuda_median_ms(step, iters: int, warmup: int = 2) -> float:
    """Median milliseconds of a PyTorch training step on the GPU, after ``warmup`` steps."""
    import torch

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def run(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    if args.model_path:  # the architecture of a local checkpoint; weights stay random, as with --arch
        cfg = AutoConfig.from_pretrained(args.model_path)
        model_name = os.path.basename(os.path.normpath(args.model_path))
    else:
        d = dict(PRESETS[args.arch])
        cfg = AutoConfig.for_model(d.pop("model_type"), **d)
        model_name = args.arch
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation=args.attn)
    if args.system == "hf-peft-bnb":
        import bitsandbytes as bnb
        from peft import prepare_model_for_kbit_training

        _quantize_linears(model, torch, bnb)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=not args.no_checkpointing)
    if not args.no_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    model.config.use_cache = False
    ms, peak_gib = time_lora_training(model, cfg.vocab_size, args.batch, args.seq, args.steps, args.warmup)
    tokens = args.batch * args.seq
    kind = "qlora" if args.system == "hf-peft-bnb" else "lora"
    return {
        "system": args.system + ("" if not args.no_checkpointing else "-nockpt"),
        "workload": f"{model_name}-{kind}-b{args.batch}-s{args.seq}",
        "tokens_per_s": tokens / (ms / 1e3),
        "step_ms": ms,
        "peak_gib": peak_gib,
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python"] + sys.argv),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="llama3.1-8b", choices=sorted(PRESETS))
    p.add_argument("--system", choices=("hf-peft", "hf-peft-bnb"), default="hf-peft")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (longest-sequence probes: 0)")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--model-path", default=None, help="local checkpoint directory: its config.json replaces --arch")
    args = p.parse_args(argv)
    emit_jsonl([run(args)], args.out, append=True)


if __name__ == "__main__":
    main()
