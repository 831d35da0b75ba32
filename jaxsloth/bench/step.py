"""End-to-end training-step benchmark on a full-size architecture with random weights (BENCHMARKS.md's workload).

    XLA_PYTHON_CLIENT_PREALLOCATE=false python -m jaxsloth.bench.step --arch llama3.1-8b --quant nf4 \\
        --batch 2 --seq 2048 --profile h200 --out step.jsonl

LoRA r=16, alpha=16 on q,k,v,o,gate,up,down, no dropout; AdamW on LoRA only; random token ids with labels = inputs.
--full-finetuning (with --quant bf16) trains every weight instead, AdamW moments as --optimizer-state says.
Reports the median step time after warm-up, tokens/s and the peak of device.memory_stats()["peak_bytes_in_use"].
Speed and memory do not depend on the weight values, so NF4 weights are random bytes (no quantization pass).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from converters.hf import load_config  # noqa: E402
from jaxsloth.bench import trace_summary  # noqa: E402
from jaxsloth.bench.timing import emit_jsonl, environment, median_ms, peak_gib  # noqa: E402
from jaxsloth.config import PROFILE_OVERRIDES, LoadConfig, LoraConfig, TrainConfig, add_arguments  # noqa: E402
from jaxsloth.lora import init_lora  # noqa: E402
from jaxsloth.models.decoder import init_params, linear_shapes, unstack_layers  # noqa: E402
from jaxsloth.models.presets import preset  # noqa: E402
from jaxsloth.ops import KERNEL_OPS  # noqa: E402
from jaxsloth.profiles import profile_for_device  # noqa: E402
from jaxsloth.quant import NF4Weight  # noqa: E402
from jaxsloth.sharding import (  # noqa: E402
    context_size,
    make_mesh,
    param_shardings,
    place_train_state,
    put_key,
    shard_batch,
)
from jaxsloth.train.host_embedding import check_host_embedding, step_params, to_host, with_embedded  # noqa: E402
from jaxsloth.train.memory import estimate_step_memory  # noqa: E402
from jaxsloth.train.step import make_optimizer, make_train_step  # noqa: E402

TRACED_STEPS = 2  # steps recorded by --trace
# The trace's per-step device times a record keeps beside its by-category sums.
TRACE_TIMES = ("span_ms_per_step", "busy_ms_per_step", "compute_busy_ms_per_step", "copy_ms_per_step",
               "copy_hidden_ms_per_step")  # fmt: skip
# The profile flags, derived from the settings schema: every Profile field and kernel op, and --long-context.
PROFILE_FLAGS = (*PROFILE_OVERRIDES, *KERNEL_OPS, "long_context")


def random_nf4(key, layers: int, out_f: int, in_f: int, blocksize: int = 64) -> NF4Weight:
    """Random NF4 bytes with the double-quantized layout of a real [layers, out, in] weight."""
    n = out_f * in_f
    nblocks = math.ceil(n / blocksize)
    k1, k2, k3 = jax.random.split(key, 3)

    @functools.partial(jax.jit, static_argnums=1)
    def random_bytes(key, size):
        # One layer at a time: a draw of bytes goes through 32-bit words, 4x the bytes it returns, which for
        # all 80 layers of 70B's gate_proj at once would be a 35 GiB temporary.
        return jax.lax.map(lambda k: jax.random.bits(k, (size,), jnp.uint8), jax.random.split(key, layers))

    return NF4Weight(
        packed=random_bytes(k1, n // 2),
        absmax=random_bytes(k2, nblocks),
        nested_absmax=0.01 + 0.01 * jax.random.uniform(k3, (layers, math.ceil(nblocks / 256)), jnp.float32),
        offset=jnp.full((layers,), 0.02, jnp.float32),
        shape=(out_f, in_f),
        blocksize=blocksize,
        double_quant=True,
        dtype="bfloat16",
    )


def build_params(config, quant: str, dtype, key, mesh=None):
    if quant == "bf16":  # with a mesh, created in place on it (one device never holds the whole model)
        init = lambda k: init_params(config, k, dtype)  # noqa: E731
        shardings = None if mesh is None else param_shardings(jax.eval_shape(init, key), mesh)
        return jax.jit(init, out_shardings=shardings)(key)
    # Non-projection params (embeddings, norms) at full precision; projections as random NF4.
    shapes = jax.eval_shape(lambda: init_params(config, key, dtype))
    keys = iter(jax.random.split(key, 64))
    params = {
        "embed": (0.02 * jax.random.normal(next(keys), shapes["embed"].shape, jnp.float32)).astype(dtype),
        "final_norm": jnp.ones(shapes["final_norm"].shape, dtype),
        "layers": {n: jnp.ones(shapes["layers"][n].shape, dtype) for n in shapes["layers"] if n.endswith("norm")},
    }
    if "lm_head" in shapes:
        params["lm_head"] = (0.02 * jax.random.normal(next(keys), shapes["lm_head"].shape, jnp.float32)).astype(dtype)
    for name, (o, i) in linear_shapes(config).items():
        params["layers"][name] = {"weight": random_nf4(next(keys), config.num_layers, o, i)}
        if config.qkv_bias and name in ("q_proj", "k_proj", "v_proj"):
            params["layers"][name]["bias"] = jnp.zeros((config.num_layers, o), dtype)
    if config.is_moe:  # the router at full precision, every expert matrix NF4, as load_in_4bit loads them
        shape = shapes["layers"]["router"]["weight"].shape
        router = (0.02 * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)
        params["layers"]["router"] = {"weight": router}
        for name in ("experts_gate_up", "experts_down"):
            lead, (o, i) = shapes["layers"][name]["weight"].shape[:2], shapes["layers"][name]["weight"].shape[2:]
            w = random_nf4(next(keys), math.prod(lead), o, i)
            params["layers"][name] = {"weight": jax.tree.map(lambda a, lead=lead: a.reshape(*lead, *a.shape[1:]), w)}
    return params


def profile_attention_blocks(profile, head_dim: int):
    """The attention tiles ``profile`` runs at ``head_dim`` in its compute dtype (its own, else the kernel's
    default)."""
    from pallas_kernels.attention import AttentionBlocks

    q = jax.ShapeDtypeStruct((1, 1, 1, head_dim), profile.dtype)
    return profile.kernels.block_for("attention", q) or AttentionBlocks.for_head_dim(head_dim, profile.dtype)


def attention_blocks(spec: str, base):
    """The Pallas attention tiles ``--attention-blocks`` names, on top of ``base`` (the profile's for the head dim):
    a JSON object of ``AttentionBlocks`` fields, or a ``jaxsloth.bench.kernel_attention --tune`` JSONL file (its last
    ``best`` row)."""
    from pallas_kernels.attention import AttentionBlocks

    if os.path.isfile(spec):
        rows = [json.loads(line) for line in open(spec) if line.strip()]
        best = [r for r in rows if r.get("kernel") == "best"]
        if not best:
            raise ValueError(f"{spec}: no 'best' row of a kernel_attention --tune run")
        settings = best[-1]["settings"]
    else:
        try:
            settings = json.loads(spec)
        except json.JSONDecodeError:
            raise ValueError(f"--attention-blocks {spec!r}: neither a file nor a JSON object") from None
    fields = {f.name for f in dataclasses.fields(AttentionBlocks)}
    if not isinstance(settings, dict) or set(settings) - fields:
        raise ValueError(f"--attention-blocks: unknown AttentionBlocks fields {sorted(set(settings) - fields)}")
    return dataclasses.replace(base, **settings)


def grouped_matmul_blocks(spec: str):
    """The Pallas grouped matmul tiles ``--grouped-matmul-blocks`` names: a JSON object of ``GroupedMatmulBlock``
    fields (the rest at their defaults), as ``jaxsloth.bench.kernel_grouped_matmul`` records them."""
    from pallas_kernels.grouped_matmul_pallas import GroupedMatmulBlock

    try:
        settings = json.loads(spec)
    except json.JSONDecodeError:
        raise ValueError(f"--grouped-matmul-blocks {spec!r}: not a JSON object") from None
    fields = {f.name for f in dataclasses.fields(GroupedMatmulBlock)}
    if not isinstance(settings, dict) or set(settings) - fields:
        raise ValueError(f"--grouped-matmul-blocks: expected GroupedMatmulBlock fields {sorted(fields)}, got {spec}")
    return GroupedMatmulBlock(**settings)


def run(args) -> dict:
    # --model-path: the architecture of a local checkpoint (its config.json); weights stay random, as with --arch.
    config = load_config(args.model_path) if args.model_path else preset(args.arch)
    model_name = os.path.basename(os.path.normpath(args.model_path)) if args.model_path else args.arch
    overrides = LoadConfig(**{k: getattr(args, k) for k in PROFILE_FLAGS if getattr(args, k) is not None})
    overrides = overrides.profile_overrides()
    if args.kernels == "reference":
        overrides.update(
            rms_norm="reference",
            rope="reference",
            glu="reference",
            cross_entropy="reference",
            nf4_matmul="reference",
        )
        overrides.setdefault("attention", "cudnn")
    for op_impl in args.op or ():
        op, impl = op_impl.split("=")
        overrides[op] = impl
    profile = profile_for_device(name=args.profile, **overrides)
    tiles = {}
    if args.attention_blocks:
        base = profile_attention_blocks(profile, config.head_dim)
        blocks = attention_blocks(args.attention_blocks, base)
        profile = profile.replace(blocks=(*dict(profile.kernels.blocks, attention=blocks).items(),))
        default = dataclasses.asdict(base)
        tiles = {k: v for k, v in dataclasses.asdict(blocks).items() if v != default[k]}  # what the record names
    if args.grouped_matmul_blocks:
        blocks = grouped_matmul_blocks(args.grouped_matmul_blocks)
        profile = profile.replace(blocks=(*dict(profile.kernels.blocks, grouped_matmul=blocks).items(),))
    if args.full_finetuning and args.quant != "bf16":
        raise SystemExit("--full-finetuning trains 16-bit weights: use --quant bf16")
    lora = None if args.full_finetuning else LoraConfig(r=16, lora_alpha=16.0)
    tc = TrainConfig(learning_rate=2e-4, max_steps=10_000, gradient_accumulation_steps=args.grad_accum)
    t0 = time.perf_counter()
    mesh = None if args.mesh is None else make_mesh(args.mesh, context_axis=args.context_axis)
    params = build_params(config, args.quant, profile.dtype, jax.random.key(0), mesh)
    layer_loop = "unrolled" if profile.unrolled_layers and mesh is None else "scan"  # as jaxsloth.train decides
    if layer_loop == "unrolled":
        params = unstack_layers(params, consume=True)
    if lora is None:  # every weight trains: the step takes them as its trainable state
        trainable, params = params, {}
    else:
        trainable = init_lora(config, lora, jax.random.key(1))
    if profile.embedding == "host":  # as jaxsloth.train runs it: the table on the host, its rows in each batch
        check_host_embedding(config, None if lora is None else trainable, mesh)
        host_params = to_host(params, consume=True)
        params = step_params(host_params)
    optimizer = make_optimizer(tc, lora, trainable, profile.optimizer_state)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch * args.grad_accum, args.seq))
    targets = np.concatenate([ids[:, 1:], np.full((ids.shape[0], 1), -100)], axis=1)
    batch = {"tokens": ids.astype(np.int32), "targets": targets.astype(np.int32)}
    if profile.embedding == "host":
        batch = with_embedded(batch, host_params)
    if args.module and (lora is None or mesh is not None):
        raise SystemExit("--module runs the LoRA step on one device: drop --full-finetuning and --mesh")
    if args.module:  # the same step over the NNX module's split state (jaxsloth.train.module_step)
        from jaxsloth.models.modules import CausalLM, split
        from jaxsloth.train.module_step import init_optimizer_state, make_module_train_step

        _, trainable, params = split(CausalLM.from_trees(config, params, trainable, lora=lora, ops=profile.ops))
        opt_state = init_optimizer_state(optimizer, trainable)
        step = make_module_train_step(config, lora, tc, profile, optimizer)
        batch = jax.tree.map(jnp.asarray, batch)
        key_of = jax.random.key
    elif mesh is None:
        opt_state = optimizer.init(trainable)
        step = make_train_step(config, lora, tc, profile, optimizer)
        batch = jax.tree.map(jnp.asarray, batch)
        key_of = jax.random.key
    else:  # --batch is the global micro-batch, split over data x fsdp; tokens/s counts every device's tokens
        params, trainable, opt_state, shardings = place_train_state(params, trainable, optimizer, mesh, args.shard_lora)
        step = make_train_step(config, lora, tc, profile, optimizer, mesh=mesh, shardings=shardings)
        batch = shard_batch(batch, mesh)
        key_of = lambda seed: put_key(jax.random.key(seed), mesh)  # noqa: E731
    jax.block_until_ready(params)
    setup_s = time.perf_counter() - t0
    # The device's peak counter cannot be reset: this is what building the inputs alone reached. When the step's
    # peak_gib equals it, the step itself stayed below and the setup, not the step, set the peak.
    setup_peak_gib = peak_gib()
    state = {"t": trainable, "o": opt_state}

    # Compiled ahead of time, so that the first run is a clean step: a long sequence's step takes minutes, and
    # --steps 0 then times that one step instead of running another.
    t0 = time.perf_counter()
    compiled = step.lower(state["t"], state["o"], params, batch, key_of(2)).compile()
    compile_s = time.perf_counter() - t0
    print(f"compiled in {compile_s:.1f} s", flush=True)
    estimate = estimate_step_memory(config, profile, batch=args.batch, seq_len=args.seq, quantized=args.quant == "nf4",
                                    lora_r=None if lora is None else lora.r, context=context_size(mesh))  # fmt: skip
    if args.compile_only:
        return _record(
            args, model_name, profile, layer_loop, compile_only=True, compile_s=compile_s, setup_s=setup_s,
            **_compiled_memory(compiled), model_estimate=dataclasses.asdict(estimate),
        )  # fmt: skip

    def one(key):
        state["t"], state["o"], m = compiled(state["t"], state["o"], params, batch, key)
        return m["loss"]

    t0 = time.perf_counter()
    loss0 = float(one(key_of(2)))
    first_ms = 1e3 * (time.perf_counter() - t0)
    print(f"first step {first_ms / 1e3:.1f} s, loss {loss0:.4f}", flush=True)
    ms = median_ms(lambda k=key_of(3): one(k), (), iters=args.steps, warmup=args.warmup) if args.steps else first_ms
    tokens = args.batch * args.grad_accum * args.seq
    trace = None
    if args.trace:
        # After the timed steps, so the profiler's overhead touches none of them.
        with jax.profiler.trace(args.trace, create_perfetto_trace=True):
            for _ in range(TRACED_STEPS):
                jax.block_until_ready(one(key_of(4)))
        trace = trace_summary.summarize(trace_summary.find_trace(args.trace), steps=TRACED_STEPS, top=40)
        with open(os.path.join(args.trace, "summary.json"), "w") as f:
            json.dump(trace, f, indent=1)
        print(json.dumps({k: trace[k] for k in ("kernel_ms_per_step", *TRACE_TIMES, "by_category_ms")}))
    return _record(
        args,
        model_name,
        profile,
        layer_loop,
        **({"attention_blocks": tiles} if tiles else {}),
        **({"grouped_matmul_blocks": json.loads(args.grouped_matmul_blocks)} if args.grouped_matmul_blocks else {}),
        **({"module_step": True} if args.module else {}),
        tokens_per_s=tokens / (ms / 1e3),
        step_ms=ms,
        peak_gib=peak_gib(),
        setup_peak_gib=setup_peak_gib,
        model_estimate_gib=estimate.device_gib,
        compile_s=compile_s,
        setup_s=setup_s,
        first_step_ms=first_ms,
        timed_steps=args.steps,
        first_loss=loss0,
        mesh=None if mesh is None else dict(mesh.shape),
        devices=1 if mesh is None else mesh.size,
        **({"trace_by_category_ms": trace["by_category_ms"]} if trace else {}),
        **({k: trace[k] for k in TRACE_TIMES} if trace else {}),
    )


def _record(args, model_name: str, profile, layer_loop: str, **fields) -> dict:
    """One JSON record: system and workload, the measurement's ``fields``, then the profile's configuration and
    the environment."""
    return {
        "system": "jaxsloth",
        "workload": f"{model_name}-{_method(args)}-b{args.batch}-s{args.seq}",
        **fields,
        "profile": profile.name,
        **{k: getattr(profile, k) for k in PROFILE_OVERRIDES},
        "layer_loop": layer_loop,
        "kernels": {k: getattr(profile.kernels, k) for k in KERNEL_OPS},
        **environment(),
    }


def _method(args) -> str:
    if args.full_finetuning:
        return "full"
    return "qlora" if args.quant == "nf4" else "lora"


def _compiled_memory(compiled) -> dict:
    """XLA's own memory plan for one step, without running it: what --compile-only reports for lengths whose
    step would take longer than a measurement can wait (the compiled program is the one a run would execute)."""
    stats = compiled.memory_analysis()
    gib = lambda b: b / 2**30  # noqa: E731
    return {
        # Arguments (weights, LoRA, optimizer state, batch) + temporaries: the device memory the step needs.
        "compiled_device_gib": gib(stats.argument_size_in_bytes + stats.temp_size_in_bytes),
        "compiled_temp_gib": gib(stats.temp_size_in_bytes),
        "compiled_argument_gib": gib(stats.argument_size_in_bytes),
        "compiled_host_temp_gib": gib(stats.host_temp_size_in_bytes),
        "device_capacity_gib": (jax.devices()[0].memory_stats() or {}).get("bytes_limit", 0) / 2**30,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="llama3.1-8b")
    p.add_argument("--quant", choices=("nf4", "bf16"), default="nf4")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--profile", default=None, help="profile name (default: from the device)")
    p.add_argument("--kernels", choices=("profile", "reference"), default="profile")
    p.add_argument("--op", action="append", help="per-op override, e.g. --op attention=pallas")
    p.add_argument(
        "--attention-blocks",
        default=None,
        help="Pallas attention tiles: a JSON object of AttentionBlocks fields or a kernel_attention --tune JSONL file",
    )
    p.add_argument(
        "--grouped-matmul-blocks",
        default=None,
        help="Pallas grouped matmul tiles (with --grouped-matmul pallas): a JSON object of GroupedMatmulBlock fields",
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps after warm-up; 0: time the first step alone")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the compiling one (long runs: 0)")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. data=2 or fsdp=2 (--batch is then global)")
    p.add_argument("--shard-lora", action="store_true", help="with --mesh: LoRA and Adam state sharded over fsdp")
    p.add_argument(
        "--context-axis", action="store_true", help="with --mesh: keep a context axis of size 1 (the ring's own cost)"
    )
    p.add_argument("--full-finetuning", action="store_true", help="train every weight, no LoRA (needs --quant bf16)")
    p.add_argument("--module", action="store_true", help="run the step over the Flax NNX module's split state")
    p.add_argument("--compile-only", action="store_true", help="report XLA's memory plan for the step; do not run")
    p.add_argument("--trace", default=None, help=f"directory: profile {TRACED_STEPS} more steps, summarize device time")
    p.add_argument("--out", default=None)
    add_arguments(p, (LoadConfig,), only=PROFILE_FLAGS)
    p.add_argument("--model-path", default=None, help="local checkpoint directory: its config.json replaces --arch")
    args = p.parse_args(argv)
    emit_jsonl([run(args)], args.out, append=True)


if __name__ == "__main__":
    main()
