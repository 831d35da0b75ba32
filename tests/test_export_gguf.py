"""GGUF export (converters.gguf, jaxsloth.save_gguf, ``jaxsloth export --gguf``): llama.cpp itself loads the file
and gives the logits of jaxsloth's unmerged LoRA forward; its tokenizer gives the Hugging Face tokenizer's ids;
gguf's reader sees llama.cpp's tensor names, shapes, types and metadata."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from converters.gguf import save_gguf
from converters.hf import load_hf_model
from jaxsloth.lora import LoraConfig, merge
from tests.tiny_models import lora_logits, random_trainable
from tests.tolerances import assert_close

gguf = pytest.importorskip("gguf")

LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024 and we'll see 12345 numbers!",
    "Tokenizers split text into pieces; llamas and alpacas graze on the hills.\n\nNew lines, tabs\tand  spaces.",
    "Hello, world! How are you doing today? I'm fine, thanks: 3.14159 and 42.",
] * 20
TEXTS = ["Hello, world!", "The llamas grazed 12345 times.\nIt's fine  ", "  tabs\tand quotes ''' ok?"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB = 384  # past the tokenizers' ids (300, about 370): the padded rows become llama.cpp's unused tokens
# hidden 96 and intermediate 160 are multiples of q8_0's 32-value block; 6 query / 2 kv heads of dim 16
DIMS = dict(
    vocab_size=VOCAB,
    hidden_size=96,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    initializer_range=0.1,
    rms_norm_eps=1e-5,
)
SPECIALS = {  # family -> (special tokens, bos, eos, pad, regex, BOS prepended by the tokenizer)
    "llama": (["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"], 0, 1, 1, LLAMA3_REGEX, True),
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, 0, 0, QWEN2_REGEX, False),
}


def _tokenizer(family: str):
    """A tiny byte-level BPE tokenizer the way Llama 3 / Qwen 2 build theirs (Split regex + ByteLevel)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials, bos, eos, pad, regex, add_bos = SPECIALS[family]
    tok = Tokenizer(models.BPE(ignore_merges=family == "llama"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{specials[bos]} $A",
            pair=f"{specials[bos]} $A {specials[bos]} $B",
            special_tokens=[(specials[bos], bos)],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None if bos is None else specials[bos],
        eos_token=specials[eos],
        pad_token=specials[pad],
        chat_template=CHAT_TEMPLATE,
    )


def _sentencepiece_tokenizer():
    """A tiny SentencePiece-style tokenizer as Llama 2 / Mistral ship it in tokenizer.json: BPE over "▁"-joined
    text with byte fallback pieces <0x00>..<0xFF> after <unk>, <s>, </s>."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizer
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=110, show_progress=False))
    model = json.loads(trained.to_str())["model"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@functools.cache
def saved_model(family: str) -> Path:
    """A tiny random transformers model (non-identity norms; Llama with Llama-3 rope scaling) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, GemmaConfig, LlamaConfig, Qwen2Config

    _, bos, eos, pad, _, _ = SPECIALS.get(
        family, SPECIALS["llama"] if family.startswith("llama") else (None, 1, 2, 0, None, None)
    )
    ids = dict(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    if family == "gemma":  # SentencePiece tokenizer, GeGLU, norms stored minus one, tied embeddings
        cfg = GemmaConfig(**DIMS, **ids, hidden_activation="gelu_pytorch_tanh")
    elif family == "llama":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        cfg = LlamaConfig(**DIMS, **ids, rope_parameters=rope)
    elif family == "llama_linear":  # linear rope scaling goes in as metadata, not as a tensor
        cfg = LlamaConfig(**DIMS, **ids, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})
    else:
        cfg = Qwen2Config(**DIMS, **ids)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name and family != "gemma" else 0.0))
    path = Path(tempfile.mkdtemp(prefix=f"tiny-gguf-{family}-")) / "model"
    model.save_pretrained(path)
    (_sentencepiece_tokenizer() if family == "gemma" else _tokenizer(family.split("_")[0])).save_pretrained(path)
    return path


def _llama_cpp(path: Path, n_ctx: int = 64):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_threads=2, verbose=False)


def _llama_cpp_logits(llm, ids) -> np.ndarray:
    """llama.cpp's logits [T, V] for the token ids ``ids`` (fed as ids: no tokenizer in between)."""
    llm.reset()
    llm.eval(list(map(int, ids)))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


NEAR_TIE = 0.05  # top-2 logit margin below which a greedy pick is a coin toss under any rounding


@pytest.mark.parametrize("family", ["llama", "llama_linear", "qwen2", "gemma"])
def test_llama_cpp_logits_match_jaxsloth(family, tmp_path):
    """A random LoRA (embeddings too) merged and exported in f16 and q8_0: llama.cpp's logits for the same ids are
    jaxsloth's unmerged-LoRA logits within the GGUF tolerances, and q8_0 keeps every clear greedy pick."""
    from transformers import AutoTokenizer

    path = saved_model(family)
    config, params = load_hf_model(path, dtype=jnp.float32)
    lora = LoraConfig(r=4, lora_alpha=8.0, train_embeddings=True, train_lm_head=not config.tie_word_embeddings)
    trainable = random_trainable(config, params, lora)
    merged, tokenizer = merge(params, trainable, lora), AutoTokenizer.from_pretrained(path)
    ids = np.random.default_rng(0).integers(0, VOCAB, 24)
    ours = lora_logits(params, trainable, lora, config, ids[None])[0]

    f16 = _llama_cpp_logits(_llama_cpp(save_gguf(merged, config, tokenizer, tmp_path / "f16.gguf")), ids)
    assert_close(f16, ours, "gguf_f16_logits")

    q8 = _llama_cpp_logits(
        _llama_cpp(save_gguf(merged, config, tokenizer, tmp_path / "q8.gguf", quantization="q8_0")), ids
    )
    assert_close(q8, ours, "gguf_q8_0_logits")
    top2 = np.sort(ours, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > NEAR_TIE
    assert clear.mean() >= 0.75  # most picks are clear, so the check below has something to check
    np.testing.assert_array_equal(q8.argmax(-1)[clear], ours.argmax(-1)[clear])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_llama_cpp_tokenizes_like_hugging_face(family, tmp_path):
    from transformers import AutoTokenizer

    path = saved_model(family)
    config, params = load_hf_model(path, dtype=jnp.float32)
    hf = AutoTokenizer.from_pretrained(path)
    llm = _llama_cpp(save_gguf(params, config, hf, tmp_path / "m.gguf"))
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == hf(text)["input_ids"], text
    assert llm.token_eos() == SPECIALS[family][2]
    # The chat template travels with the file, and its special tokens are single tokens to llama.cpp.
    assert llm.metadata["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert (
        llm.tokenize(b"<|im_start|>user", add_bos=False, special=True)
        == hf("<|im_start|>user", add_special_tokens=False)["input_ids"]
    )


def test_llama_cpp_tokenizes_sentencepiece_like_hugging_face(tmp_path):
    """Llama 2 / Mistral style vocabularies go in as llama.cpp's "llama" (SentencePiece) tokenizer."""
    config, params = load_hf_model(saved_model("llama"), dtype=jnp.float32)
    hf = _sentencepiece_tokenizer()
    out = save_gguf(params, config, hf, tmp_path / "m.gguf")
    assert _field(gguf.GGUFReader(out), "tokenizer.ggml.model") == "llama"
    llm = _llama_cpp(out)
    for text in [*TEXTS, "é ü 🦙 zzz"]:  # the last one needs byte fallback
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == hf(text)["input_ids"], text
    assert (llm.token_bos(), llm.token_eos()) == (1, 2)


def _field(reader, key):
    f = reader.fields[key]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode()
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        return [f.parts[i].tolist() for i in f.data]
    return f.parts[f.data[0]].tolist()[0]


@pytest.mark.parametrize(("family", "quantization"), [("llama", "q8_0"), ("qwen2", "bf16")])
def test_reader_sees_llama_cpp_layout(family, quantization, tmp_path):
    """Names, shapes and types as llama.cpp's converter writes them, and metadata from config.json itself."""
    from transformers import AutoTokenizer

    path = saved_model(family)
    hf_cfg = json.loads((path / "config.json").read_text())
    config, params = load_hf_model(path, dtype=jnp.float32)
    out = save_gguf(params, config, AutoTokenizer.from_pretrained(path), tmp_path / "m.gguf", quantization=quantization)
    reader = gguf.GGUFReader(out)
    arch = {"llama": "llama", "qwen2": "qwen2"}[family]
    assert _field(reader, "general.architecture") == arch
    expected = {
        f"{arch}.block_count": hf_cfg["num_hidden_layers"],
        f"{arch}.context_length": hf_cfg["max_position_embeddings"],
        f"{arch}.embedding_length": hf_cfg["hidden_size"],
        f"{arch}.feed_forward_length": hf_cfg["intermediate_size"],
        f"{arch}.attention.head_count": hf_cfg["num_attention_heads"],
        f"{arch}.attention.head_count_kv": hf_cfg["num_key_value_heads"],
        f"{arch}.rope.dimension_count": hf_cfg["head_dim"],
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": {"llama": "llama-bpe", "qwen2": "qwen2"}[family],
        "tokenizer.ggml.eos_token_id": hf_cfg["eos_token_id"],
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    assert {k: _field(reader, k) for k in expected} == expected
    theta = hf_cfg.get("rope_parameters", {}).get("rope_theta") or hf_cfg.get("rope_theta")
    assert _field(reader, f"{arch}.rope.freq_base") == pytest.approx(theta)
    assert _field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(hf_cfg["rms_norm_eps"])
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == VOCAB
    assert len(reader.fields["tokenizer.ggml.merges"].data) > 0

    weight = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "bf16": gguf.GGMLQuantizationType.BF16}[quantization]
    D, F, V, H, K, Hd = 96, 160, VOCAB, 6, 2, 16
    want = {
        "token_embd.weight": ((D, V), weight),
        "output.weight": ((D, V), weight),
        "output_norm.weight": ((D,), None),
    }
    for i in range(hf_cfg["num_hidden_layers"]):
        b = f"blk.{i}."
        want |= {
            b + "attn_norm.weight": ((D,), None),
            b + "ffn_norm.weight": ((D,), None),
            b + "attn_q.weight": ((D, H * Hd), weight),
            b + "attn_k.weight": ((D, K * Hd), weight),
            b + "attn_v.weight": ((D, K * Hd), weight),
            b + "attn_output.weight": ((H * Hd, D), weight),
            b + "ffn_gate.weight": ((D, F), weight),
            b + "ffn_up.weight": ((D, F), weight),
            b + "ffn_down.weight": ((F, D), weight),
        }
        if family == "qwen2":
            want |= {
                b + "attn_q.bias": ((H * Hd,), None),
                b + "attn_k.bias": ((K * Hd,), None),
                b + "attn_v.bias": ((K * Hd,), None),
            }
    if family == "llama":  # Llama-3 rope scaling: one divisor per rotary frequency
        want["rope_freqs.weight"] = ((Hd // 2,), None)
    got = {t.name: (tuple(int(n) for n in t.shape), t.tensor_type) for t in reader.tensors}
    assert set(got) == set(want)
    for name, (shape, qtype) in want.items():  # ggml order: innermost dimension first; vectors stay f32
        assert got[name] == (shape, qtype or gguf.GGMLQuantizationType.F32), name

    # The embedding is the checkpoint's own, not permuted or transposed (q/k are, which the llama.cpp tests check).
    from safetensors.numpy import load_file

    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    stored = gguf.quants.dequantize(np.asarray(embd.data), embd.tensor_type).reshape(V, D)
    np.testing.assert_allclose(stored, load_file(path / "model.safetensors")["model.embed_tokens.weight"], atol=0.01)


def test_qlora_export_matches_llama_cpp(tmp_path):
    """jaxsloth.save_gguf on a 4-bit model whose adapter covers q_proj only: the adapted projections are merged,
    the others dequantized from NF4, and llama.cpp gives the QLoRA forward's logits."""
    import dataclasses

    import jaxsloth

    model, tokenizer = jaxsloth.load(saved_model("qwen2"), load_in_4bit=True, dtype="float32", max_seq_length=64)
    model = jaxsloth.add_lora(model, r=4, target_modules=["q_proj"])
    model = dataclasses.replace(model, trainable=random_trainable(model.config, model.params, model.lora))
    assert not isinstance(model.params["layers"]["up_proj"]["weight"], jnp.ndarray)  # NF4
    ids = np.random.default_rng(1).integers(0, VOCAB, 16)
    ours = lora_logits(model.params, model.trainable, model.lora, model.config, ids[None])[0]
    theirs = _llama_cpp_logits(_llama_cpp(jaxsloth.save_gguf(model, tokenizer, tmp_path / "m.gguf")), ids)
    assert_close(theirs, ours, "gguf_f16_logits")


def test_api_and_cli_export(tmp_path):
    """jaxsloth.save_gguf on a loaded model with an adapter, and ``jaxsloth export --gguf`` from its PEFT files."""
    import jaxsloth
    from jaxsloth.cli import main

    path = saved_model("qwen2")
    model, tokenizer = jaxsloth.load(path, dtype="float32", max_seq_length=64)
    model = jaxsloth.add_lora(model, r=4, seed=1)
    out = jaxsloth.save_gguf(model, tokenizer, tmp_path / "api" / "m.gguf", quantization="q8_0")
    assert _field(gguf.GGUFReader(out), "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    jaxsloth.save_adapter(model, tmp_path / "adapter")
    argv = [
        "export",
        "--model",
        str(path),
        "--adapter",
        str(tmp_path / "adapter"),
        "--gguf",
        "--out",
        str(tmp_path / "cli"),
    ]
    assert main(argv) == 0
    reader = gguf.GGUFReader(tmp_path / "cli" / "model-f16.gguf")
    assert _field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    assert main(argv) == 2  # the file exists: --overwrite needed


def test_unsupported_inputs_are_refused(tmp_path):
    from transformers import AutoTokenizer

    from jaxsloth.models.config import config_from_hf_dict
    from tests.tiny_models import hf_config

    path = saved_model("qwen2")
    config, params = load_hf_model(path, dtype=jnp.float32)
    tok = AutoTokenizer.from_pretrained(path)
    for family in ("gemma2", "phi3"):
        with pytest.raises(ValueError, match=f"model_type '{family}'"):
            save_gguf(params, config_from_hf_dict(hf_config(family).to_dict()), tok, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="q4_k"):
        save_gguf(params, config, tok, tmp_path / "x.gguf", quantization="q4_k")
    with pytest.raises(ValueError, match="tokenizer"):
        save_gguf(params, config, None, tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())  # no partial file left behind
