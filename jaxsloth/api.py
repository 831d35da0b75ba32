"""The two-call Python API, in Unsloth's shape::

model, tokenizer = jaxsloth.load("path/to/hf-model", load_in_4bit=True, max_seq_length=2048)
model = jaxsloth.add_lora(model, r=16, lora_alpha=16)
jaxsloth.train(model, tokenizer, "train.jsonl", max_steps=100, output_dir="runs/x")
print(model.generate(tokenizer, [[{"role": "user", "content": "Hello"}]], max_new_tokens=32))
jaxsloth.save_adapter(model, "runs/x/adapter")      # PEFT format
jaxsloth.save_merged(model, "runs/x/merged", tokenizer=tokenizer)  # 16-bit Hugging Face checkpoint
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxsloth import compile_cache
from jaxsloth.config import LoadConfig, LoraConfig, TrainConfig, takes_settings
from jaxsloth.hub import load_tokenizer, resolve_model
from jaxsloth.lora import init_lora, merge
from jaxsloth.models.config import ModelConfig
from jaxsloth.models.decoder import layers_unstacked, stack_layers, unstack_layers
from jaxsloth.profiles import Profile

log = logging.getLogger("jaxsloth")


@dataclasses.dataclass
class Model:
    """A loaded model: frozen params (maybe NF4), the profile it runs with, and its LoRA adapter once added."""

    config: ModelConfig
    params: dict
    profile: Profile
    max_seq_length: int = 2048
    path: str | None = None
    lora: LoraConfig | None = None
    trainable: dict | None = None
    local_dir: str | None = None  # where `path` (a directory or a Hub id) was read from
    full_finetuning: bool = False  # every weight trains (jaxsloth.load(..., full_finetuning=True)); no adapter

    @property
    def module(self):
        """The model as a Flax NNX module (``jaxsloth.models.modules.CausalLM``, running with the profile's ops)
        over the same arrays as ``params`` and ``trainable``: nothing is copied. Assigning a CausalLM (one trained
        with nnx.Optimizer, say) makes its arrays the model's ``params`` and ``trainable``."""
        from jaxsloth.models.modules import CausalLM

        return CausalLM.from_trees(self.config, self.params, self.trainable, lora=self.lora, ops=self.profile.ops)

    @module.setter
    def module(self, module) -> None:
        from jaxsloth.models.modules import module_trees

        self.params, self.trainable = module_trees(module)

    def generate(self, tokenizer, prompts, max_new_tokens: int = 64, **sampling) -> list[str]:
        """Answers each prompt (KV cache). Returns the new text per prompt.

        prompts: a string or list of strings (raw completion), or chat messages: one conversation
        ([{"role": "user", "content": "..."}]) or a list of them, rendered with the tokenizer's chat template.
        sampling (transformers' names): do_sample, temperature, top_k, top_p, min_p, repetition_penalty, seed,
        stop_tokens (extra ids; the model's EOS and end-of-turn tokens always stop). Greedy unless do_sample or a
        temperature > 0. See ``jaxsloth.generate.generate_text``.
        """
        from jaxsloth.generate import generate_text

        return generate_text(self, tokenizer, prompts, max_new_tokens=max_new_tokens, **sampling)


@takes_settings(LoadConfig)
def load(path: str | os.PathLike, *, token: str | None = None, **settings):
    """Loads a Hugging Face model directory or Hub id ("org/name") -> (Model, tokenizer or None when it has none).

    The profile is the named one (default: chosen from jax.devices()[0]) with every given override applied; dtype
    (frozen weights and activations) defaults to the profile's, bf16 on GPUs. token: a Hub access token (default:
    HF_TOKEN; see jaxsloth.hub.resolve_model: the Hub cache and HF_HUB_OFFLINE are honoured).
    """
    from converters.hf import load_hf_model

    compile_cache.enable()  # a second load of the same model and settings skips compiling (jaxsloth.compile_cache)
    cfg = LoadConfig(model=os.fspath(path), **settings)
    prof = cfg.build_profile()
    max_seq_length = cfg.max_seq_length
    local = resolve_model(path, revision=cfg.revision, token=token)
    config, params = load_hf_model(local, dtype=prof.dtype, load_in_4bit=cfg.load_in_4bit)
    if max_seq_length > config.max_position_embeddings:
        log.warning(
            "max_seq_length %d exceeds the model's max_position_embeddings %d",
            max_seq_length,
            config.max_position_embeddings,
        )
    model = Model(config, params, prof, max_seq_length, os.fspath(path), local_dir=str(local),
                  full_finetuning=cfg.full_finetuning)  # fmt: skip
    return model, load_tokenizer(local if cfg.tokenizer is None else cfg.tokenizer, token=token)


@takes_settings(LoraConfig)
def add_lora(model: Model, *, seed: int = 0, overwrite: bool = False, **settings) -> Model:
    """Returns the model with a fresh LoRA adapter (PEFT's initialisation, from ``seed``).

    A model that already has an adapter (trained, or loaded from PEFT) is refused unless ``overwrite=True``, which
    replaces it with a fresh one: calling add_lora again must not silently discard training.
    """
    lora = LoraConfig(**settings)
    if model.full_finetuning:
        raise ValueError("the model was loaded with full_finetuning=True: every weight trains, so it takes no adapter")
    if model.trainable is not None and not overwrite:
        raise ValueError(
            f"the model already has a LoRA adapter (r={model.lora.r}); keep training it by passing the model to "
            "jaxsloth.train as it is, or pass overwrite=True to replace it with a fresh one"
        )
    trainable = init_lora(model.config, lora, jax.random.key(seed), params=model.params)
    return dataclasses.replace(model, lora=lora, trainable=trainable)


@takes_settings(TrainConfig)
def train(model: Model, tokenizer, data, *, callbacks: Sequence = (), progress: bool = True, **settings):
    """Fine-tunes ``model``'s adapter (or, loaded with full_finetuning=True, every weight: ``model.params`` becomes
    the trained weights) on ``data``: a data file, a dataset folder or Hub id (``split``, and
    ``dataset_config`` for load_dataset's name), a list of records, or a datasets.Dataset / IterableDataset.

    Steps: max_steps, or num_train_epochs over the data (default 1 epoch). With output_dir: checkpoints (resumable;
    every save_steps steps and every 30 minutes, at the end, and on Ctrl-C / SIGTERM), metrics.jsonl, TensorBoard
    events and loss.png are written there. report_to: the experiment trackers (transformers' names: tensorboard,
    wandb, mlflow, trackio, all, none) that log the run's settings and every step's metrics. An output_dir holding another run's checkpoints is refused unless
    resume=True continues it (from its latest checkpoint, or from the checkpoint directory given as resume /
    resume_from_checkpoint; the model, LoRA, optimizer settings and data must match) or overwrite=True starts fresh
    there. resume=True where there is no checkpoint yet starts fresh. One run at a time per
    output_dir (a lock file; another live run's is refused). Updates ``model.trainable`` in place and
    returns the TrainResult (history of per-step metrics).

    mesh: a spec like "data=2,fsdp=4", a jax.sharding.Mesh, or None: every device data-parallel (one device: no
    mesh). per_device_train_batch_size is per data-parallel rank (each of data x fsdp devices takes that many
    sequences per micro-batch). shard_lora: shard LoRA and optimizer state over fsdp too (default: replicated).
    callbacks: called with each step's metrics record and each evaluation's; progress: draw a progress bar.

    Evaluation: on eval_dataset or the val_set_size examples held out of the data, every eval_steps and at the
    end, into the same records ({"step", "eval_loss", ...}); early_stopping_patience, load_best_model_at_end and
    callbacks' on_evaluate(record, model) as in ``jaxsloth.train.evaluate``.

    method: "sft" (default), or preference tuning as TRL: "dpo", "orpo", "simpo", "kto" (data in TRL's preference
    formats; beta, loss_type, ... as TRL names them; per_device_train_batch_size counts pairs or KTO examples; each
    prompt + completion is cut to model.max_seq_length; see jaxsloth.methods.preference_train). DPO / KTO's
    reference: ref_model when given, else the adapter-off policy (full fine-tuning: a frozen copy of the initial
    weights); evaluation records TRL's eval_loss, eval_rewards/chosen, ... (jaxsloth.methods.preference_eval).
    Or "grpo": TRL's GRPO on rows with a "prompt", scored by reward_funcs (callables with TRL's signature, built-in
    names or "module.path:function"; per_device_train_batch_size counts completions; see
    jaxsloth.methods.grpo_train).

    Under a profile with the unrolled layer loop (Hopper, one device), ``model.params`` is split per layer for the
    run and stacked back when it ends, however it ends (its arrays are replaced, not copied: the device never holds
    both layouts, beyond one projection's stack while they are converted).
    """
    from jaxsloth.data import BatchLoader, streaming_loader, tokenize_dataset
    from jaxsloth.sharding import batch_devices, resolve_mesh
    from jaxsloth.train import host_embedding
    from jaxsloth.train.evaluate import make_evaluator, split_off
    from jaxsloth.train.loop import fit
    from jaxsloth.train.metrics import close_all, standard_callbacks
    from jaxsloth.train.run_dir import (
        check_output_dir,
        clear_run_outputs,
        resume_step,
        run_lock,
        set_aside_later_checkpoints,
    )
    from jaxsloth.train.trackers import check_installed, run_config

    tc = TrainConfig(**settings)  # every setting checked before anything is loaded
    check_installed(tc.report_to)  # a tracker's missing package, too
    compile_cache.enable()
    if model.trainable is None and not model.full_finetuning:
        raise ValueError("the model has no adapter to train: call jaxsloth.add_lora(model, ...) first")
    if tokenizer is None:
        raise ValueError(
            f"train needs a tokenizer and the model directory {model.path} has none: pass one as the tokenizer "
            "argument (jaxsloth.train(model, tokenizer, ...)), or --tokenizer PATH on the command line"
        )
    if tc.output_dir is not None:
        check_output_dir(Path(tc.output_dir), resume=tc.resume, overwrite=tc.overwrite)
    if model.profile.embedding == "host":  # refused before any data is read
        host_embedding.check_host_embedding(
            model.config, None if model.full_finetuning else model.trainable, resolve_mesh(tc.mesh), tc.method
        )
    if tc.method == "grpo":  # sampling, rewards and steps: its own loop (jaxsloth.methods.grpo_train)
        from jaxsloth.methods.grpo_train import grpo_train

        return grpo_train(model, tokenizer, data, tc, callbacks=callbacks, progress=progress)
    device_mesh = resolve_mesh(tc.mesh)
    per_device = tc.per_device_train_batch_size
    micro = (model.profile.micro_batch if per_device is None else per_device) * batch_devices(device_mesh)
    rows = micro * tc.gradient_accumulation_steps
    where = dict(split=tc.split, name=tc.dataset_config)
    held_out = None  # the examples val_set_size holds out of the training data
    make_step = None  # fit's default: the SFT step
    if tc.method != "sft":  # preference tuning (jaxsloth.methods): its own data and step in the same loop
        from jaxsloth.methods.preference_train import preference_run

        loader, make_step, evaluator = preference_run(model, tokenizer, data, tc, micro)
    elif tc.streaming or type(data).__name__ == "IterableDataset":
        if tc.max_steps is None:
            raise ValueError("a streamed dataset has no known length: give max_steps")
        loader = streaming_loader(
            data,
            tokenizer,
            format=tc.format,
            text_field=tc.dataset_text_field,
            train_on_inputs=tc.train_on_inputs,
            batch_size=rows,
            seq_len=model.max_seq_length,
            pack=tc.packing,
            vocab_size=model.config.vocab_size,
            **where,
        )
    else:
        dataset = tokenize_dataset(
            data,
            tokenizer,
            format=tc.format,
            max_seq_length=model.max_seq_length,
            train_on_inputs=tc.train_on_inputs,
            vocab_size=model.config.vocab_size,
            text_field=tc.dataset_text_field,
            num_proc=tc.dataset_num_proc,
            **where,
        )
        if tc.val_set_size:
            dataset, held_out = split_off(dataset, tc.val_set_size, tc.seed)
        loader = BatchLoader(dataset, batch_size=rows, seq_len=model.max_seq_length, pack=tc.packing, seed=tc.seed)
    if tc.max_steps is None:  # the run's length in steps, checked again (warmup within it)
        steps = sum(loader.num_batches(e) for e in range(tc.num_train_epochs or 1))
        tc = dataclasses.replace(tc, max_steps=steps, num_train_epochs=None)
    max_steps = tc.max_steps
    if make_step is None:  # a preference run's evaluator came with its data
        evaluator = make_evaluator(model, tokenizer, tc, held_out, mesh=device_mesh)
    out = Path(tc.output_dir) if tc.output_dir is not None else None
    # On several hosts every process trains; only the first writes metrics, plots and the progress bar.
    first = jax.process_index() == 0
    held = contextlib.ExitStack()  # the output directory's lock, held until training ends however it ends
    if out is not None and first:
        held.enter_context(run_lock(out))
        if tc.overwrite:
            clear_run_outputs(out)
        elif not isinstance(tc.resume, bool):  # a checkpoint path: that step, not a later one, is the latest
            set_aside_later_checkpoints(out, resume_step(out, tc.resume))
    cbs = list(callbacks)
    # The profile's unrolled layer loop reads per-layer weight arrays: the model's own stacked weights are split for
    # the run (consumed, so the device never holds both layouts) and stacked back however it ends.
    unroll = model.profile.unrolled_layers and device_mesh is None and not layers_unstacked(model.params)
    if unroll:
        model.params = unstack_layers(model.params, consume=True)
    # embedding="host": the frozen table leaves the device for the run (consumed, so its memory is freed) and
    # comes back after it, for generation.
    if model.profile.embedding == "host":
        model.params = host_embedding.to_host(model.params, consume=True)
    result = None
    try:
        if first:
            cbs += standard_callbacks(
                out, progress=progress, total_steps=max_steps, report_to=tc.report_to,
                run_config=run_config(model, tc, data), project=tc.project, run_name=tc.run_name,
            )  # fmt: skip
        result = fit(
            model.config,
            model.params,
            None if model.full_finetuning else model.trainable,
            loader,
            lora=model.lora,
            train_config=tc,
            profile=model.profile,
            checkpoint_dir=None if out is None else str(out / "checkpoints"),
            save_every=tc.save_steps,
            keep=tc.save_total_limit,
            resume=tc.resume is not False,
            callbacks=cbs,
            mesh=device_mesh,
            shard_lora=tc.shard_lora,
            evaluator=evaluator,
            make_step=make_step,
        )
    except BaseException as e:
        if model.full_finetuning:  # the step took the weights: the last completed step's, when it handed them back
            model.params = getattr(e, "trained_weights", model.params)
        raise
    finally:
        # Every sink is closed even when one fails; a failing close never hides the error that stopped training.
        close_errors = close_all(cbs)
        if model.full_finetuning and result is not None:
            model.params = result.trainable
        if unroll and not _deleted(model.params):
            model.params = stack_layers(model.params, consume=True)
        model.params = host_embedding.to_device(model.params)
        held.close()
    if close_errors:
        raise close_errors[0]
    if not model.full_finetuning:
        model.trainable = result.trainable
    return result


def _deleted(tree) -> bool:
    """Whether a training step took (donated) these arrays and none came back (full fine-tuning's failed step)."""
    return any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(tree))


def save_adapter(model: Model, path: str | os.PathLike, tokenizer=None, overwrite: bool = False) -> Path:
    """Writes the adapter in PEFT format (adapter_model.safetensors + adapter_config.json; its
    base_model_name_or_path is ``model.path``), and the tokenizer beside it when one is passed, into a new or empty
    directory; ``overwrite=True`` replaces the files of an earlier export there (see ``_export``)."""
    from converters.peft import save_peft_adapter

    if model.trainable is None:
        raise ValueError("the model has no adapter: call jaxsloth.add_lora first")
    trainable = _on_host(model.trainable)
    if jax.process_index() != 0:
        return Path(path)

    def write(p: Path) -> Path:
        out = save_peft_adapter(trainable, model.lora, model.config, p, base_model_name_or_path=model.path)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
        return out

    return _export(path, overwrite, write)


def load_adapter(model: Model, path: str | os.PathLike) -> Model:
    """The model with the PEFT LoRA adapter in ``path`` (saved by jaxsloth or by PEFT) in place of its own."""
    from converters.peft import load_peft_adapter

    trainable, lora = load_peft_adapter(path, model.config)
    return dataclasses.replace(model, lora=lora, trainable=trainable)


def _export(path: str | os.PathLike, overwrite: bool, write) -> Path:
    """Runs ``write(path)`` into a directory that holds nothing else from us (jaxsloth.train.run_dir); a failed
    write (disk full) leaves no partial file and raises one OSError naming the directory."""
    from jaxsloth.train.run_dir import prepare_export_dir, remove_partial_files

    path = prepare_export_dir(path, overwrite=overwrite)
    try:
        return write(path)
    except OSError as e:
        remove_partial_files(path)
        raise OSError(e.errno, f"{e.strerror or e} while exporting", str(path)) from e


def _on_host(tree):
    """The full value of every (possibly sharded over several hosts) array, on every process."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    # Only arrays split across hosts are gathered; process_allgather would concatenate a process-local array
    # (frozen params never placed on the mesh) with the other hosts' copies.
    return jax.tree.map(
        lambda x: (
            multihost_utils.process_allgather(x, tiled=True)
            if isinstance(x, jax.Array) and not x.is_fully_addressable
            else x
        ),
        tree,
    )


def save_merged(
    model: Model,
    path: str | os.PathLike,
    dtype: str = "bfloat16",
    tokenizer=None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Writes a 16-bit Hugging Face checkpoint with the adapter merged in (NF4 weights dequantized first), with
    generation_config.json and the tokenizer (``tokenizer``, else the files beside ``model.path``), so
    transformers' AutoModelForCausalLM, AutoTokenizer and generate work from the folder alone. Weights are sharded
    above ``max_shard_size`` (bytes, or "5GB" / "2GiB" as transformers writes it). The directory must be new or
    empty; ``overwrite=True`` replaces the files of an earlier export there."""
    from converters.hf import save_hf_model

    params = (
        model.params if model.trainable is None else merge(model.params, model.trainable, model.lora, jnp.dtype(dtype))
    )
    params = _on_host(params)
    if jax.process_index() != 0:
        return Path(path)
    return _export(
        path,
        overwrite,
        lambda p: save_hf_model(
            params,
            model.config,
            p,
            dtype=jnp.dtype(dtype),
            max_shard_size=max_shard_size,
            tokenizer=tokenizer,
            source=model.local_dir or model.path,
        ),
    )


def save_gguf(model: Model, tokenizer, path: str | os.PathLike, quantization: str = "f16") -> Path:
    """Writes one GGUF file for llama.cpp, Ollama and LM Studio: the adapter merged in (NF4 weights dequantized),
    the tokenizer and chat template included. quantization: "f16", "bf16" or "q8_0"."""
    from converters.gguf import QUANTIZATIONS, check_supported
    from converters.gguf import save_gguf as write_gguf

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unsupported GGUF quantization {quantization!r}; supported: {', '.join(QUANTIZATIONS)}")
    check_supported(model.config)
    # Merged once into the stored precision (q8_0 is quantized from the model's own dtype).
    dtype = {"f16": jnp.float16, "bf16": jnp.bfloat16}.get(quantization, model.profile.dtype)
    params = model.params if model.trainable is None else merge(model.params, model.trainable, model.lora, dtype)
    params = _on_host(params)
    if jax.process_index() != 0:
        return Path(path)
    return write_gguf(params, model.config, tokenizer, path, quantization=quantization)
