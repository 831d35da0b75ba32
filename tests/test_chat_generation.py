"""Chat generation against transformers: each family's real chat template (tests/chat_templates/, the public
Jinja of the Instruct / -it checkpoints) and stop tokens, on tiny random models with tiny character tokenizers that
carry the template's special tokens. jaxsloth's greedy answer to chat messages must be transformers'
``generate(apply_chat_template(..., add_generation_prompt=True), do_sample=False, eos_token_id=<stops>)``."""

import json
from pathlib import Path

import pytest
import torch

import jaxsloth
from jaxsloth import generate as gen
from jaxsloth.data.chat import chat_token_ids
from tests.tiny_models import hf_model, saved_model

TEMPLATES = Path(__file__).parent / "chat_templates"
NEW = 8
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
CASES = {
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
CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Why?"}],
    [{"role": "user", "content": "abc"}],
]  # fmt: skip


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


def _write_ids(model_dir: Path, case: dict, tok) -> None:
    """config.json's and generation_config.json's special ids as the family's checkpoints give them."""
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(case["config_ids"])
    (model_dir / "config.json").write_text(json.dumps(cfg))
    eos = case["generation_eos"]
    eos = tok.convert_tokens_to_ids(eos)
    gen_cfg = {k: v for k, v in case["config_ids"].items() if k != "eos_token_id"}
    (model_dir / "generation_config.json").write_text(json.dumps({**gen_cfg, "eos_token_id": eos}))


def _hf_greedy(model, ids, stops):
    """transformers' greedy answer to prompt ``ids``, stopping at ``stops`` (none: all NEW tokens)."""
    free = {} if stops else {"min_new_tokens": NEW}
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
            max_new_tokens=NEW,
            do_sample=False,
            eos_token_id=stops or None,
            pad_token_id=0,
            **free,
        )
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("name", list(CASES))
def test_chat_greedy_matches_transformers(name, tmp_path):
    case = CASES[name]
    base = saved_model(case["model"])
    hf = hf_model(base)
    tok = tiny_tokenizer(case, hf.config.vocab_size)
    stops = sorted(tok.convert_tokens_to_ids(sorted(case["stops"])))
    prompts = [list(tok.apply_chat_template(c, add_generation_prompt=True)["input_ids"]) for c in CONVERSATIONS]
    # One BOS: the template's. The tokenizer adds a second one to raw text, which chat prompts must not get.
    assert [chat_token_ids(tok, c, add_generation_prompt=True) for c in CONVERSATIONS] == prompts
    if case["add_bos"]:
        assert [p.count(tok.bos_token_id) for p in prompts] == [1, 1]
        text = tok.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=True, tokenize=False)
        assert tok(text)["input_ids"][:2] == [tok.bos_token_id] * 2

    # Make the first conversation's answer end early with the family's end-of-turn token: its output row becomes
    # twice the row of the token greedy decoding picks third, so a missed stop token changes the output.
    free = _hf_greedy(hf, prompts[0], [])
    with torch.no_grad():
        head = hf.get_output_embeddings().weight
        head[tok.convert_tokens_to_ids(case["end_of_turn"])] = 2 * head[free[2]]
    model_dir = tmp_path / "model"
    hf.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    _write_ids(model_dir, case, tok)
    hf = hf_model(model_dir)
    expected = [_hf_greedy(hf, p, stops) for p in prompts]
    assert expected[0][-1] in stops and len(expected[0]) <= 3

    model, loaded_tok = jaxsloth.load(model_dir, dtype="float32", profile="cpu")
    assert gen.stop_token_ids(model, loaded_tok) == stops
    ours = gen.generate(
        model.params,
        model.config,
        [gen.prompt_token_ids(loaded_tok, c) for c in CONVERSATIONS],
        max_new_tokens=NEW,
        stop_tokens=stops,
        ops=model.profile.ops,
        compute_dtype=model.profile.dtype,
    )
    assert ours == expected
    texts = model.generate(loaded_tok, CONVERSATIONS, max_new_tokens=NEW, do_sample=False)
    assert texts == [tok.decode(ids, skip_special_tokens=True) for ids in expected]


def test_raw_text_keeps_the_tokenizers_bos():
    """A plain string is raw completion: ``tokenizer(text)``, BOS once, as transformers' users tokenize."""
    tok = tiny_tokenizer(CASES["llama-3.2"], 131)
    bare = tok("Hi", add_special_tokens=False)["input_ids"]
    assert gen.prompt_token_ids(tok, "Hi") == [tok.bos_token_id, *bare]
