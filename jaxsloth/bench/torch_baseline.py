"""The PyTorch baselines, measured by the same rules as jaxsloth's step (needs the `bench` extra).

    python -m jaxsloth.bench.torch_baseline --arch llama3.1-8b --system hf-peft --out step.jsonl
    python -m jaxsloth.bench.torch_baseline --arch llama3.1-8b --system hf-peft-bnb --variant plain --out step.jsonl

hf-peft: transformers + PEFT LoRA in bf16, SDPA attention, gradient checkpointing. hf-peft-bnb: the same with the
frozen projections in bitsandbytes NF4 (double quant, bf16 compute), as QLoRA. Random weights built on the GPU from
the architecture's config; LoRA r=16, alpha=16 on q,k,v,o,gate,up,down; AdamW on LoRA; labels = inputs. The model
trains as its users train it: train mode, gradient checkpointing on (the record says both). ``--variant kbit``
prepares the QLoRA model with PEFT's ``prepare_model_for_kbit_training``, as its guides do; it upcasts every
non-quantized weight to f32, which costs about half the speed, so the bench runs both variants and compares against
the faster (BENCHMARKS.md, 8B QLoRA).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

from jaxsloth.bench.timing import emit_jsonl, portable_command
from jaxsloth.models.presets import PRESETS

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Mixtures of experts in transformers 5 hold each layer's experts as fused parameters, not nn.Linear: PEFT adapts them
# with target_parameters (LoRA per expert), the layout jaxsloth trains and exports.
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
MOE_MODEL_TYPES = ("qwen3_moe", "mixtral")
# hf-peft-bnb's preparations: "plain" (train mode and checkpointing only) or "kbit" (prepare_model_for_kbit_training).
VARIANTS = ("plain", "kbit")


def training_evidence(model) -> dict:
    """What shows the model trains as its users train it: the wrapper, the causal LM and the decoder (the ``.model``
    chain, whose flags decide whether checkpointing runs, in transformers as in Unsloth) all in train mode (a PEFT
    wrapper can be in train mode around a model in inference mode), and whether any module's gradient checkpointing
    flag is set (transformers sets True; Unsloth sets its mode's name, e.g. "unsloth")."""
    import torch

    chain = [model]
    while isinstance(getattr(chain[-1], "model", None), torch.nn.Module) and len(chain) < 8:
        chain.append(chain[-1].model)
    flags = [
        m.gradient_checkpointing
        for m in model.modules()
        if isinstance(getattr(m, "gradient_checkpointing", None), bool | str)
    ]
    return {"train_mode": all(m.training for m in chain), "gradient_checkpointing": any(bool(f) for f in flags)}


def check_training(evidence: dict, checkpointing: bool, system: str) -> None:
    """Refuses to report a baseline whose model is not configured as asked: a model in inference mode skips its
    checkpointing and measures another program than its users run."""
    if not evidence["train_mode"]:
        raise RuntimeError(f"{system} baseline: the model is not in train mode; refusing to report")
    if evidence["gradient_checkpointing"] != checkpointing:
        state = "off" if checkpointing else "on"
        raise RuntimeError(f"{system} baseline: gradient checkpointing is {state}; refusing to report")


def _quantize_linears(model, torch, bnb, device: str = "cuda"):
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
                q = q.to(device)  # Params4bit quantizes on the move
                setattr(module, child_name, q)
                del child
    if device == "cuda":
        torch.cuda.empty_cache()


def time_lora_training(model, vocab_size: int, batch: int, seq: int, steps: int, warmup: int) -> tuple[float, float]:
    """The bench's step on a PEFT-wrapped model: AdamW (lr 2e-4) on the trainable parameters, random ids as inputs and
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


def hf_config(args):
    """(transformers config, model name) of ``--model-path``'s config.json or of the ``--arch`` preset."""
    from transformers import AutoConfig

    if args.model_path:  # the architecture of a local checkpoint; weights stay random, as with --arch
        return AutoConfig.from_pretrained(args.model_path), os.path.basename(os.path.normpath(args.model_path))
    d = dict(PRESETS[args.arch])
    return AutoConfig.for_model(d.pop("model_type"), **d), args.arch


def build_model(cfg, system: str, variant: str, attn: str, checkpointing: bool, device: str = "cuda"):
    """The PEFT-wrapped random-weight model, in train mode with gradient checkpointing as asked."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if variant not in VARIANTS or (variant == "kbit" and system != "hf-peft-bnb"):
        raise ValueError(f"variant {variant!r} does not apply to {system}; hf-peft-bnb runs {', '.join(VARIANTS)}")
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation=attn)
    if system == "hf-peft-bnb":
        import bitsandbytes as bnb

        _quantize_linears(model, torch, bnb, device)
        if variant == "kbit":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    experts = EXPERT_PARAMETERS if cfg.model_type in MOE_MODEL_TYPES else None
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, target_parameters=experts)
    model = get_peft_model(model, lora)
    model.config.use_cache = False
    model.train()  # checkpointing only runs in train mode
    return model


def variant_label(variant: str, attn: str, checkpointing: bool) -> str:
    """The record's ``variant``: what distinguishes this configuration in BENCHMARKS.md's tables."""
    parts = ["checkpointing" if checkpointing else "no checkpointing", f"attn={attn}"]
    return ", ".join(parts + (["prepare_model_for_kbit_training"] if variant == "kbit" else []))


def run(args) -> dict:
    import torch

    cfg, model_name = hf_config(args)
    checkpointing = not args.no_checkpointing
    model = build_model(cfg, args.system, args.variant, args.attn, checkpointing)
    evidence = training_evidence(model)
    check_training(evidence, checkpointing, args.system)
    ms, peak_gib = time_lora_training(model, cfg.vocab_size, args.batch, args.seq, args.steps, args.warmup)
    tokens = args.batch * args.seq
    kind = "qlora" if args.system == "hf-peft-bnb" else "lora"
    return {
        "system": args.system + ("" if checkpointing else "-nockpt"),
        "workload": f"{model_name}-{kind}-b{args.batch}-s{args.seq}",
        "tokens_per_s": tokens / (ms / 1e3),
        "step_ms": ms,
        "peak_gib": peak_gib,
        "variant": variant_label(args.variant, args.attn, checkpointing),
        **evidence,
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": portable_command(),
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
    p.add_argument(
        "--variant", choices=VARIANTS, default="plain", help="hf-peft-bnb: kbit = prepare_model_for_kbit_training"
    )
    p.add_argument("--out", default=None)
    p.add_argument("--model-path", default=None, help="local checkpoint directory: its config.json replaces --arch")
    args = p.parse_args(argv)
    emit_jsonl([run(args)], args.out, append=True)


if __name__ == "__main__":
    main()
