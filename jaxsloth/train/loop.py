"""The host training loop: batches in, jitted steps, metrics out, checkpoints, resume, non-finite and OOM handling.

``fit`` is what ``jaxsloth.train`` and the CLI call. Metrics go to callbacks (progress bar, JSONL, TensorBoard);
checkpoints hold everything needed to continue with exactly the losses an uninterrupted run gives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxsloth.lora import LoraConfig
from jaxsloth.models.config import ModelConfig
from jaxsloth.profiles import Profile
from jaxsloth.quant import is_nf4
from jaxsloth.sharding import batch_devices, context_size, place_train_state, put_key, shard_batch
from jaxsloth.train.checkpoint import Checkpointer, array_to_key, key_to_array
from jaxsloth.train.evaluate import Evaluator
from jaxsloth.train.host_embedding import check_host_embedding, step_params, to_host, with_embedded
from jaxsloth.train.identity import check_identity, run_identity
from jaxsloth.train.interrupts import InterruptGuard
from jaxsloth.train.module_step import make_fit_step
from jaxsloth.train.saving import RunSaver, consumed
from jaxsloth.train.step import (
    NonFiniteLossError,
    TrainConfig,
    explain_oom,
    is_oom,
    learning_rate_schedule,
    make_optimizer,
    make_train_step,
)

log = logging.getLogger("jaxsloth")
Callback = Callable[[dict], None]


@dataclasses.dataclass
class TrainResult:
    trainable: dict
    opt_state: object
    step: int
    history: list[dict]
    interrupted: bool = False
    evals: list[dict] = dataclasses.field(default_factory=list)  # the evaluation records (jaxsloth.train.evaluate)
    best_step: int | None = None  # the step of the lowest eval_loss


def validate_batch(batch: dict[str, np.ndarray], vocab_size: int, step: int) -> None:
    """JAX clamps out-of-range gathers silently: catch bad token ids before they train garbage."""
    for key in ("tokens", "targets"):
        if key not in batch:
            raise ValueError(f"batch for step {step} has no {key!r} array (keys: {sorted(batch)})")
    tokens = batch["tokens"]
    hi, lo = int(tokens.max()), int(tokens.min())
    if hi >= vocab_size or lo < 0:
        bad = hi if hi >= vocab_size else lo
        row = int(np.argwhere(tokens == bad)[0][0])
        raise ValueError(f"step {step}: token id {bad} in batch row {row} is outside the vocabulary [0, {vocab_size})")
    t = batch["targets"]
    if int(t.max()) >= vocab_size or int(t[t != -100].min(initial=0)) < 0:
        raise ValueError(f"step {step}: a target id is outside the vocabulary [0, {vocab_size}) and is not -100")


def real_tokens(batch: dict) -> int:
    """The tokens of ``batch`` that are not padding (segment id 0); every token when it has no segment ids."""
    segments = batch.get("segment_ids")
    return int(batch["tokens"].size if segments is None else np.count_nonzero(segments))


def _device_memory_gib() -> float | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def _is_quantized(params) -> bool:
    return any(is_nf4(x) for x in jax.tree.leaves(params, is_leaf=is_nf4))


def _check_memory(config, profile, params, micro_batch, seq_len, lora_r: int | None, context: int = 1) -> None:
    """Before the first compile: a step the memory model says cannot fit fails now, naming the longest length."""
    from jaxsloth.train.memory import check_fits, machine_memory_gib

    mem = machine_memory_gib()
    if mem is None:
        return
    quantized = _is_quantized(params)
    check_fits(
        config,
        profile,
        batch=micro_batch,
        seq_len=seq_len,
        quantized=quantized,
        lora_r=lora_r,
        device_gib=mem[0],
        host_gib=mem[1],
        context=context,
    )


def _compile_step(step_fn, args, config, profile, params, micro_batch, seq_len, lora_r, context: int = 1):
    """The step compiled ahead of time for one batch shape, its XLA memory plan checked against the machine."""
    from jaxsloth.train.memory import check_compiled_plan, longest_sequence, machine_memory_gib

    log.info("compiling the training step for %d x %d tokens per device", micro_batch, seq_len)
    t0 = time.perf_counter()
    compiled = step_fn.lower(*args).compile()
    log.info("compiled in %.1f s", time.perf_counter() - t0)
    mem, stats = machine_memory_gib(), compiled.memory_analysis()
    if mem is not None and stats is not None:
        quantized = _is_quantized(params)
        longest = longest_sequence(
            config,
            profile,
            batch=micro_batch,
            quantized=quantized,
            device_gib=mem[0],
            host_gib=mem[1],
            lora_r=lora_r,
            context=context,
        )
        device, host = check_compiled_plan(
            stats,
            batch=micro_batch,
            seq_len=seq_len,
            device_gib=mem[0],
            host_gib=mem[1],
            longest_tokens=longest.tokens,
        )
        log.info(
            "compiled step for %d x %d tokens: XLA plans %.1f GiB device, %.1f GiB host",
            micro_batch,
            seq_len,
            device,
            host,
        )
    return compiled


# Periodic checkpoints by default, so a run killed without warning (OOM killer, preemption without SIGTERM, power)
# loses at most this much: 500 steps bounds the loss on fast small models, 30 minutes on slow large ones, and
# a LoRA checkpoint (adapter + optimizer state) is small enough that saving this often costs well under 1%.
SAVE_EVERY_STEPS = 500
SAVE_EVERY_SECONDS = 30 * 60


def _loader_state(loader) -> dict | None:
    return loader.state_dict() if hasattr(loader, "state_dict") else None


@contextlib.contextmanager
def _oom_explained(batch: int, seq_len: int, profile) -> Iterator[None]:
    """Turns XLA's out-of-memory error (a generic runtime error) into one that says what to change."""
    try:
        yield
    except Exception as e:
        if is_oom(e):
            raise explain_oom(e, batch=batch, seq_len=seq_len, profile=profile) from e
        raise


def _step_record(step: int, m: dict, batch: dict, dt: float, learning_rate: Callable, tc) -> dict:
    """The log record of one completed step (``m``: the step's metrics, on the host)."""
    n_seq, seq_len = batch["tokens"].shape
    real = real_tokens(batch)
    record = {
        "step": step,
        "loss": float(m["loss"]),
        "grad_norm": float(m["grad_norm"]),
        "tokens": int(m["tokens"]),
        "real_tokens": real,
        "seq_tokens": n_seq * seq_len,
        "step_time_s": dt,
        "tokens_per_s": real / dt,  # padding left out: the throughput of the data
        "learning_rate": float(learning_rate(step - 1)),  # this step's update (optax counts from 0)
        "peak_gib": _device_memory_gib(),
        "total_steps": tc.max_steps,
    }
    record.update({k: float(v) for k, v in m.items() if k not in record and k != "finite"})
    return record


def fit(
    config: ModelConfig,
    params: dict,
    trainable: dict | None,
    loader: Iterator[dict[str, np.ndarray]],
    *,
    lora: LoraConfig | None,
    train_config: TrainConfig,
    profile: Profile,
    checkpoint_dir: str | None = None,
    save_every: int = SAVE_EVERY_STEPS,
    save_every_seconds: float = SAVE_EVERY_SECONDS,
    keep: int = 3,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    mesh: Mesh | None = None,
    shard_lora: bool = False,
    evaluator: Evaluator | None = None,
    make_step: Callable | None = None,
) -> TrainResult:
    """Trains ``trainable`` for train_config.max_steps steps over batches from ``loader``.

    loader yields dicts of [grad_accum * micro_batch, seq] int32 arrays (see jaxsloth.data) and, to resume at the
    same batch, has state_dict()/load_state_dict(). With ``checkpoint_dir``: resumes from its latest whole
    checkpoint (when ``resume``; one written for another model, LoRA, optimizer or data raises
    ResumeMismatchError naming the setting), saves every ``save_every`` steps or ``save_every_seconds`` (0: off),
    at the end, and on Ctrl-C or SIGTERM, then raises TrainingInterrupted (a KeyboardInterrupt) saying what was
    saved. Whatever stops the run, a checkpoint holds the state of one completed step: the LoRA and optimizer
    state, the data position and the random key as they were after that step, so a resumed run gives exactly the
    losses and weights of an uninterrupted one. Callbacks with a ``resume(step)`` method are told the step
    training starts from (0 or the checkpoint's) before the first record.

    params: stacked per layer (the layer scan) or split per layer by ``jaxsloth.models.decoder.unstack_layers`` (the
    unrolled loop, faster on Hopper; ``jaxsloth.train`` does that split itself when the profile asks for it): the
    step runs whichever layout it is given.

    mesh (jaxsloth.sharding.make_mesh): train over several devices / hosts. The loader then yields the GLOBAL batch
    on every process (same seed, same order); each process places only its own rows. Frozen weights shard over
    fsdp, LoRA and optimizer state are replicated, or sharded over fsdp with ``shard_lora``. Checkpoints are
    sharded and restore onto the current mesh, so a run may resume on a different device count.

    evaluator (jaxsloth.train.evaluate): evaluate every ``evaluator.every`` steps and after the last one, each
    record going to the callbacks; stop early when its tracker says so. With ``evaluator.load_best`` the best
    step's checkpoint is kept from rotation and the result holds the best step's adapter (the last checkpoint
    still holds the last step, to resume from). Early-stopping state is saved with each checkpoint.
    Full fine-tuning: trainable and lora None. Every weight of ``params`` trains; the step takes (donates) the
    arrays of ``params`` rather than a copy, and TrainResult.trainable holds the trained weights. A run that fails
    hands the last step's weights back on the exception's ``trained_weights`` (when the failed step had not already
    taken them). Over a mesh the weights and optimizer state are replicated (data-parallel).
    make_step: builds the step as ``make_train_step`` does (same arguments and signature; default: the NNX module
    step over the model's split state, ``jaxsloth.train.module_step.make_fit_step``, or with full fine-tuning
    ``make_train_step``; e.g. a preference
    method's, jaxsloth.methods.preference_train); its metrics beyond loss, tokens and grad_norm join each record.
    """
    tc = train_config
    identity = run_identity(config, params, lora, tc, loader)
    full = trainable is None
    if profile.embedding == "host":
        check_host_embedding(config, trainable, mesh, method="sft" if make_step is None else None)
        params = to_host(params)
    if full:  # every weight trains: no copy of the model beside it
        trainable, params = params, {}
    else:
        # The step donates its state buffers; copy (LoRA is small) so the caller's arrays stay valid.
        trainable = jax.tree.map(jnp.copy, trainable)
    lora_r = None if full else lora.r
    optimizer = make_optimizer(tc, lora, trainable, profile.optimizer_state)
    shardings = None
    if mesh is None:
        opt_state = optimizer.init(trainable)
    else:
        params, trainable, opt_state, shardings = place_train_state(params, trainable, optimizer, mesh, shard_lora)
    train_params = step_params(params)  # what the step takes: the table's zero-row placeholder when on the host
    key = jax.random.key(tc.seed)
    step = 0
    ckpt = Checkpointer(checkpoint_dir, keep=keep) if checkpoint_dir else None
    found = ckpt.latest_good() if ckpt is not None and resume else None
    if found is None and resume and ckpt is not None and not ckpt.step_dirs():
        log.info("resume: no checkpoint in %s yet; starting from step 0", ckpt.directory)
    if found is not None:
        step_dir = ckpt.directory / str(found[0])
        check_identity(found[1].get("identity") or {}, identity, str(step_dir))
        abstract = {"trainable": trainable, "opt_state": opt_state, "key": key_to_array(key)}
        state, meta = ckpt.restore(found[0], abstract)
        trainable, opt_state, key = state["trainable"], state["opt_state"], array_to_key(state["key"])
        step = int(meta["step"])
        if evaluator is not None and meta.get("eval") is not None:
            evaluator.tracker.load_state_dict(meta["eval"])
            if evaluator.load_best and evaluator.tracker.best_step is not None:
                ckpt.kept_steps.add(evaluator.tracker.best_step)
        if meta.get("data") is not None and hasattr(loader, "load_state_dict"):
            loader.load_state_dict(meta["data"])
        log.info("resumed from %s at step %d", step_dir, step)
    for cb in callbacks:
        if hasattr(cb, "resume"):
            cb.resume(step)

    # The state of the last completed step: what every checkpoint holds, whatever interrupts the loop.
    data_state = _loader_state(loader)
    guard = InterruptGuard()
    saver = RunSaver(ckpt, guard, identity, step)

    def save() -> None:
        saver.save(
            step,
            (trainable, opt_state),
            lambda: (
                {"trainable": trainable, "opt_state": opt_state, "key": key_to_array(key)},
                {"step": step, "data": data_state, "eval": evaluator and evaluator.tracker.state_dict()},
            ),
        )

    if make_step is None:  # a LoRA model trains through its NNX module's split state; full fine-tuning on the trees
        make_step = make_train_step if lora is None else make_fit_step
    step_fn = make_step(config, lora, tc, profile, optimizer, mesh=mesh, shardings=shardings)
    learning_rate = learning_rate_schedule(tc)
    compiled_steps: dict[tuple[int, int], Callable] = {}  # batch shape -> the step compiled (and checked) for it
    history: list[dict] = []
    evals: list[dict] = []
    best_trainable = None  # a copy of the best step's adapter (load_best)
    start_step = step

    def evaluate() -> None:
        nonlocal best_trainable
        evals.append(evaluator.evaluate(step, trainable, params, callbacks))
        if evaluator.load_best and evaluator.tracker.best_step == step:
            best_trainable = jax.tree.map(jnp.copy, trainable)  # the step donates trainable's buffers
            if ckpt is not None:
                save()
                ckpt.kept_steps.clear()
                ckpt.kept_steps.add(step)

    failure: BaseException | None = None
    with guard:
        try:
            while step < tc.max_steps:
                try:
                    batch = next(loader)
                except StopIteration:
                    log.info("data exhausted after %d steps", step)
                    break
                fetched_state = _loader_state(loader)
                validate_batch(batch, config.vocab_size, step + 1)
                n_seq, seq_len = batch["tokens"].shape
                if not history:
                    micro = n_seq // tc.gradient_accumulation_steps // batch_devices(mesh)
                    _check_memory(
                        config, profile, trainable if full else params, micro, seq_len, lora_r, context_size(mesh)
                    )
                if n_seq % tc.gradient_accumulation_steps:
                    raise ValueError(
                        f"batch of {n_seq} sequences does not split into gradient_accumulation_steps={tc.gradient_accumulation_steps} micro-batches"
                    )
                if mesh is not None and (n_seq // tc.gradient_accumulation_steps) % batch_devices(mesh):
                    raise ValueError(
                        f"micro-batch of {n_seq // tc.gradient_accumulation_steps} sequences does not split over the "
                        f"{batch_devices(mesh)} data x fsdp devices of mesh {dict(mesh.shape)}"
                    )
                next_key, sub = jax.random.split(key)
                t0 = time.perf_counter()
                if mesh is None:
                    device_batch = jax.tree.map(jnp.asarray, with_embedded(batch, params))
                else:
                    device_batch, sub = shard_batch(batch, mesh), put_key(sub, mesh)
                args = (trainable, opt_state, train_params, device_batch, sub)
                if (n_seq, seq_len) not in compiled_steps:
                    micro = n_seq // tc.gradient_accumulation_steps // batch_devices(mesh)
                    with _oom_explained(n_seq, seq_len, profile):
                        compiled_steps[n_seq, seq_len] = _compile_step(
                            step_fn, args, config, profile, params, micro, seq_len, lora_r, context_size(mesh)
                        )
                # The step, its result, the loader position and key that go with it, and its record in the logs
                # are committed together: a signal waits for them rather than leave a checkpointed step unlogged.
                with guard.hold(f"finishing step {step + 1}"):
                    with _oom_explained(n_seq, seq_len, profile):
                        new_trainable, new_opt_state, m = compiled_steps[n_seq, seq_len](*args)
                        m = jax.device_get(m)
                    trainable, opt_state, key, data_state = new_trainable, new_opt_state, next_key, fetched_state
                    step += 1
                    record = _step_record(step, m, batch, time.perf_counter() - t0, learning_rate, tc)
                    if not bool(m["finite"]):
                        if tc.on_nonfinite == "stop":
                            raise NonFiniteLossError(
                                f"loss became {record['loss']} (grad norm {record['grad_norm']}) at step {step}; the "
                                "update was not applied. Lower the learning rate, check the data, or set "
                                "on_nonfinite='skip'."
                            )
                        log.warning("step %d: non-finite loss %s, update skipped", step, record["loss"])
                        record["skipped"] = True
                    history.append(record)
                    for cb in callbacks:
                        cb(record)
                if evaluator is not None and evaluator.due(step):
                    evaluate()
                    if evaluator.tracker.should_stop:
                        log.info(
                            "early stopping at step %d: eval_loss has not improved on %.4f (step %d) for %d evaluations",
                            step,
                            evaluator.tracker.best_loss,
                            evaluator.tracker.best_step,
                            evaluator.tracker.bad_evals,
                        )
                        guard.check()
                        break
                if saver.due(step, save_every, save_every_seconds):
                    save()
                guard.check()  # a signal held during the step or the save stops the run here, its step recorded
            if evaluator is not None and step > start_step and evaluator.last_step != step:
                evaluate()
        except BaseException as e:  # noqa: BLE001 - saved below, then re-raised
            failure = e
            if isinstance(e, KeyboardInterrupt) and ckpt is not None:
                log.warning("%s at step %d: saving a checkpoint", e or "interrupted", step)
        try:
            failure = saver.finish(step, failure, save)
        finally:
            if ckpt is not None:
                ckpt.close()
    if failure is not None:
        if full and not consumed(trainable):
            failure.trained_weights = trainable
        raise failure
    best_step = None if evaluator is None else evaluator.tracker.best_step
    if evaluator is not None and evaluator.load_best and best_step not in (None, step):
        if best_trainable is None:  # the best step came before this run resumed: read its checkpoint
            abstract = {"trainable": trainable, "opt_state": opt_state, "key": key_to_array(key)}
            reader = Checkpointer(checkpoint_dir, keep=keep)
            best_trainable = reader.restore(best_step, abstract)[0]["trainable"]
            reader.close()
        log.info("returning the adapter of step %d (eval_loss %.4f)", best_step, evaluator.tracker.best_loss)
        trainable = best_trainable
    return TrainResult(trainable, opt_state, step, history, evals=evals, best_step=best_step)
