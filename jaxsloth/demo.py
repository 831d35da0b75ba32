"""`jaxsloth demo`: LoRA-tune a tiny model shipped in the package, on CPU, and show its answers improve.

The shipped base model (demo_assets/model: a 3-layer Llama, 159k parameters, a character-level tokenizer with a
chat template) was pre-trained here as a chat assistant that echoes what the user says. Told "hello", it answers
"hello". The demo task (demo_assets/train.jsonl, messages format) asks for the word's shift cipher instead: every
letter moved one on in the alphabet ("hello" -> "ifmmp"). LoRA keeps the copying the base model can do and
learns the letter map on top, so a short CPU run takes held-out accuracy from 0% to near 100%; answers are checked
exactly.

``build_assets`` (hidden flag ``jaxsloth demo --build-assets``) is the one-time tool that wrote demo_assets/.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

ASSETS = Path(__file__).parent / "demo_assets"  # package data (pyproject), installed beside this file
MODEL_DIR = ASSETS / "model"

SPECIAL = ["<pad>", "<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHARS = list("0123456789abcdefghijklmnopqrstuvwxyz +-=?.,:!'\n")
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
MODEL_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 16,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "initializer_range": 0.02,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def build_tokenizer():
    """A character-level fast tokenizer (BPE with no merges) with chat special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + CHARS)}
    assert len(vocab) <= MODEL_CONFIG["vocab_size"]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.add_special_tokens(SPECIAL)
    tok.decoder = decoders.Fuse()  # characters join without the spaces the default decoder puts between tokens
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|end|>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


LETTERS = "abcdefghijklmnopqrstuvwxyz"


def shift(word: str) -> str:
    """The demo task's answer: every letter moved one place on in the alphabet (z wraps to a)."""
    return word.translate(str.maketrans(LETTERS, LETTERS[1:] + LETTERS[0]))


def question(word: str) -> dict:
    """One demo-task record (messages format): the user says a word, the assistant answers its shift cipher.

    The word is the whole message so the answer lines up with it exactly as an echo does: the copying the base model
    learned carries over, and LoRA learns only the letter map."""
    return {"messages": [{"role": "user", "content": word}, {"role": "assistant", "content": shift(word)}]}


def prompt(tokenizer, record: dict) -> str:
    """The chat prompt of a task record, ending where the assistant's answer starts."""
    return tokenizer.apply_chat_template(record["messages"][:1], tokenize=False, add_generation_prompt=True)


def answer(record: dict) -> str:
    return record["messages"][1]["content"]


def _random_word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def task_splits(num_train: int = 400, num_heldout: int = 50, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Disjoint train / held-out questions on random 3-7 letter words."""
    rng = random.Random(seed)
    words: list[str] = []
    while len(words) < num_train + num_heldout:
        w = _random_word(rng, 3, 7)
        if w not in words:
            words.append(w)
    return [question(w) for w in words[:num_train]], [question(w) for w in words[num_train:]]


def _pretraining_texts(tokenizer, n: int, seed: int) -> list[str]:
    """Chat transcripts in which the assistant echoes the user's one to three words."""
    rng = random.Random(seed + 1)
    texts = []
    for _ in range(n):
        said = " ".join(_random_word(rng, 1, 7) for _ in range(rng.randint(1, 3)))
        msgs = [{"role": "user", "content": said}, {"role": "assistant", "content": said}]
        texts.append(tokenizer.apply_chat_template(msgs, tokenize=False))
    return texts


def build_assets(out_dir: Path = ASSETS, *, steps: int = 4000, batch: int = 32, seq_len: int = 64, seed: int = 0):
    """Pre-trains the base model from scratch (all parameters, AdamW) and writes it with the tokenizer and the
    task files to ``out_dir``. Run once by a developer; the result is package data."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from converters.hf import save_hf_model
    from jaxsloth.data import BatchLoader, tokenize_dataset
    from jaxsloth.models.config import config_from_hf_dict
    from jaxsloth.models.decoder import init_params, loss_sum_and_count

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    config = config_from_hf_dict(MODEL_CONFIG)
    texts = _pretraining_texts(tokenizer, n=20000, seed=seed)
    data = tokenize_dataset([{"text": t} for t in texts], tokenizer, format="text", max_seq_length=seq_len)
    loader = BatchLoader(data, batch_size=batch, seq_len=seq_len, seed=seed)
    params = init_params(config, jax.random.key(seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 50, steps, 3e-5)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        def loss_fn(p):
            s, c = loss_sum_and_count(p, batch, config=config)
            return s / jnp.maximum(c, 1)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    train, heldout = task_splits()
    echo_pairs = [(prompt(tokenizer, r), r["messages"][0]["content"] + "<|end|>") for r in heldout]
    chat_pairs = [(prompt(tokenizer, r), answer(r) + "<|end|>") for r in heldout]
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        params, opt_state, loss = step(params, opt_state, {k: jnp.asarray(v) for k, v in next(loader).items()})
        if i % 100 == 0 or i == steps:
            print(
                f"step {i} loss {float(loss):.4f} ({time.perf_counter() - t0:.0f}s)  "
                f"echo acc {_teacher_forced_accuracy(params, config, tokenizer, echo_pairs):.2f}  "
                f"chat-task acc {_teacher_forced_accuracy(params, config, tokenizer, chat_pairs):.2f}",
                flush=True,
            )
    model_dir = out_dir / "model"
    save_hf_model(jax.tree.map(np.asarray, params), config, model_dir, dtype=jnp.float32)
    tokenizer.save_pretrained(model_dir)
    for path, records in ((out_dir / "train.jsonl", train), (out_dir / "heldout.jsonl", heldout)):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return out_dir


def _teacher_forced_accuracy(params, config, tokenizer, pairs: list[tuple[str, str]]) -> float:
    """Share of (prompt, answer) pairs whose every answer token is the argmax given the true prefix: exactly
    greedy decoding's exact-match accuracy, in one forward pass."""
    import jax.numpy as jnp
    import numpy as np

    from jaxsloth.models.decoder import forward

    rows = [(tokenizer.encode(p), tokenizer.encode(a)) for p, a in pairs]
    width = max(len(p) + len(a) for p, a in rows)
    tokens = np.zeros((len(rows), width), np.int32)
    targets = np.full((len(rows), width), -1, np.int32)
    for i, (p, a) in enumerate(rows):
        tokens[i, : len(p) + len(a)] = p + a
        targets[i, len(p) - 1 : len(p) + len(a) - 1] = a
    pred = np.asarray(jnp.argmax(forward(params, jnp.asarray(tokens), config=config), -1))
    return float(np.where(targets < 0, True, pred == targets).all(axis=1).mean())


DEFAULT_STEPS = 300


def evaluate(model, tokenizer, records: list[dict]) -> tuple[float, list[str]]:
    """Greedy answers to the records' questions -> (exact-match accuracy, answers)."""
    answers = model.generate(tokenizer, [prompt(tokenizer, r) for r in records], max_new_tokens=12)
    answers = [a.strip() for a in answers]
    correct = sum(a == answer(r) for a, r in zip(answers, records))
    return correct / len(records), answers


def _show(title: str, records: list[dict], answers: list[str], accuracy: float, shown: int = 6) -> None:
    print(f"\n{title}")
    for r, a in zip(records[:shown], answers[:shown]):
        mark = "ok" if a == answer(r) else "wrong"
        print(f"  {r['messages'][0]['content']:<14} -> {a!r:<12} (expected {answer(r)!r}) {mark}")
    print(f"  accuracy on {len(records)} held-out questions: {accuracy:.0%}")


def run_demo(output_dir: str | Path = "jaxsloth-demo", *, steps: int | None = None, assets: Path = ASSETS) -> dict:
    """Loads the shipped model (from ``assets``), asks it the held-out questions, LoRA-tunes it on the task, asks again, and writes
    the PEFT adapter, metrics.jsonl and loss.png to ``output_dir``. Returns accuracies, seconds and paths."""
    import jaxsloth
    from jaxsloth.data import load_records
    from jaxsloth.train.metrics import standard_callbacks

    t0 = time.perf_counter()
    out = Path(output_dir)
    steps = DEFAULT_STEPS if steps is None else steps
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    assets = Path(assets)
    model, tokenizer = jaxsloth.load(assets / "model", profile="cpu", max_seq_length=64)
    train, heldout = load_records(assets / "train.jsonl"), load_records(assets / "heldout.jsonl")
    print(
        f"jaxsloth demo: a {sum(x.size for x in _leaves(model.params)):,}-parameter Llama that echoes what it is "
        f"told.\nTask: answer a word with its shift cipher, each letter moved one on in the alphabet (abc -> bcd).\n"
        f"Training data: {len(train)} examples; {len(heldout)} held-out questions."
    )
    before, answers = evaluate(model, tokenizer, heldout)
    _show("Before fine-tuning (the base model just repeats the word):", heldout, answers, before)

    print(f"\nLoRA fine-tuning for {steps} steps on CPU:")
    model = jaxsloth.add_lora(model, r=16, lora_alpha=32)
    # Every demo run starts fresh: no checkpoints to resume from, and the old run's metrics log is replaced.
    (out / "metrics.jsonl").unlink(missing_ok=True)
    sinks = standard_callbacks(out, progress=False, total_steps=steps)
    result = jaxsloth.train(
        model,
        tokenizer,
        train,
        per_device_train_batch_size=8,
        max_steps=steps,
        learning_rate=2e-3,
        warmup_steps=min(10, steps),  # a short run (--steps) warms up over all of it
        callbacks=sinks,
    )
    after, answers = evaluate(model, tokenizer, heldout)
    _show("After fine-tuning:", heldout, answers, after)

    adapter = jaxsloth.save_adapter(model, out / "adapter", overwrite=True)  # the demo's own folder, rerun at will
    seconds = time.perf_counter() - t0
    print(
        f"\nAccuracy {before:.0%} -> {after:.0%} in {seconds:.0f} s. Loss {result.history[0]['loss']:.2f} -> "
        f"{result.history[-1]['loss']:.2f}.\nPEFT adapter: {adapter}\nLoss curve:   {out / 'loss.png'}\n"
        f"Metrics:      {out / 'metrics.jsonl'} (TensorBoard: tensorboard --logdir {out / 'tensorboard'})"
    )
    return {"accuracy_before": before, "accuracy_after": after, "seconds": seconds, "adapter": adapter}


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)
