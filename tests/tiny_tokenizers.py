"""Tiny character tokenizers carrying the real chat templates (tests/chat_templates/) and special tokens of each
family's Instruct / -it checkpoints, for the tiny random models of tests/tiny_models.py."""

import json
from pathlib import Path

TEMPLATES = Path(__file__).parent / "chat_templates"
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]

LLAMA3 = dict(
    model="llama",
    specials=["<|finetune_right_pad_id|>", "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>",
              "<|start_header_id|>", "<|end_header_id|>", "<|python_tag|>"],
    tokens=dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>"),
    add_bos=True,
    config_ids=dict(bos_token_id=1, eos_token_id=[2, 4, 3], pad_token_id=0),
    generation_eos=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
    stops={"<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"},
    end_of_turn="<|eot_id|>",
)  # fmt: skip
GEMMA = dict(
    specials=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
    tokens=dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"),
    add_bos=True,
    config_ids=dict(bos_token_id=2, eos_token_id=1, pad_token_id=0),
    stops={"<eos>", "<end_of_turn>"},
    end_of_turn="<end_of_turn>",
)
CHAT_FAMILIES = {
    "llama-3.1": dict(LLAMA3, template="llama-3.1-instruct.jinja"),
    "llama-3.2": dict(LLAMA3, template="llama-3.2-instruct.jinja"),
    "mistral": dict(
        model="mistral",
        template="mistral-7b-instruct-v0.2.jinja",
        specials=["<unk>", "<s>", "</s>"],
        tokens=dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"),
        add_bos=True,
        config_ids=dict(bos_token_id=1, eos_token_id=2),
        generation_eos="</s>",
        stops={"</s>"},
        end_of_turn="</s>",
    ),
    # gemma-7b-it's generation config names only <eos>: <end_of_turn> comes from the tokenizer's template.
    "gemma": dict(GEMMA, model="gemma", template="gemma-it.jinja", generation_eos="<eos>"),
    "gemma2": dict(GEMMA, model="gemma2", template="gemma-2-it.jinja", generation_eos=["<eos>", "<end_of_turn>"]),
    "qwen2": dict(
        model="qwen2",
        template="qwen-2.5-instruct.jinja",
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        tokens=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
        add_bos=False,
        config_ids=dict(bos_token_id=0, eos_token_id=2),
        generation_eos=["<|im_end|>", "<|endoftext|>"],
        stops={"<|im_end|>", "<|endoftext|>"},
        end_of_turn="<|im_end|>",
    ),
    "phi3": dict(
        model="phi3",
        template="phi-3.5-mini-instruct.jinja",
        specials=["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"],
        tokens=dict(bos_token="<s>", eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<unk>"),
        add_bos=True,
        config_ids=dict(bos_token_id=1, eos_token_id=3, pad_token_id=3),
        generation_eos=["<|endoftext|>", "<|assistant|>", "<|end|>"],
        stops={"<|endoftext|>", "<|assistant|>", "<|end|>"},
        end_of_turn="<|end|>",
    ),
}


def tiny_tokenizer(case: dict, vocab_size: int):
    """A character tokenizer (printable ASCII and newline) with the case's special tokens at ids 0.., its chat
    template, and BOS added to raw text where the real tokenizer adds it."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(case["specials"] + CHARS)}
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.add_special_tokens(case["specials"])
    tok.decoder = decoders.Fuse()
    if case["add_bos"]:
        bos = case["tokens"]["bos_token"]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **case["tokens"])
    fast.chat_template = (TEMPLATES / case["template"]).read_text()
    return fast


def write_special_ids(model_dir: Path, case: dict, tok) -> None:
    """config.json's and generation_config.json's special ids as the family's checkpoints give them."""
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(case["config_ids"])
    (model_dir / "config.json").write_text(json.dumps(cfg))
    eos = tok.convert_tokens_to_ids(case["generation_eos"])
    gen_cfg = {k: v for k, v in case["config_ids"].items() if k != "eos_token_id"}
    (model_dir / "generation_config.json").write_text(json.dumps({**gen_cfg, "eos_token_id": eos}))
