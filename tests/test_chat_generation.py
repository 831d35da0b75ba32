"""Chat generation against transformers: each family's real chat template (tests/chat_templates/, the public
Jinja of the Instruct / -it checkpoints) and stop tokens, on tiny random models with tiny character tokenizers that
carry the template's special tokens. jaxsloth's greedy answer to chat messages must be transformers'
``generate(apply_chat_template(..., add_generation_prompt=True), do_sample=False, eos_token_id=<stops>)``."""

import pytest
import torch

import jaxsloth
from jaxsloth import generate as gen
from jaxsloth.data.chat import chat_token_ids
from tests.tiny_models import hf_model, saved_model
from tests.tiny_tokenizers import CHAT_FAMILIES, tiny_tokenizer, write_special_ids

NEW = 8


CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Why?"}],
    [{"role": "user", "content": "abc"}],
]  # fmt: skip


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


@pytest.mark.parametrize("name", list(CHAT_FAMILIES))
def test_chat_greedy_matches_transformers(name, tmp_path):
    case = CHAT_FAMILIES[name]
    base = saved_model(case["model"])
    hf = hf_model(base)
    tok = tiny_tokenizer(case, hf.config.vocab_size)
    stops = sorted(tok.convert_tokens_to_ids(sorted(case["stops"])))
    prompts = [list(tok.apply_chat_template(c, add_generation_prompt=True)["input_ids"]) for c in CONVERSATIONS]
    # BOS as the template writes it (once, or not at all for Phi-3 and Qwen): the tokenizer adds one more to raw
    # text, which a chat prompt must not get.
    assert [chat_token_ids(tok, c, add_generation_prompt=True) for c in CONVERSATIONS] == prompts
    if case["add_bos"]:
        in_template = int("bos_token" in tok.chat_template)
        assert [p.count(tok.bos_token_id) for p in prompts] == [in_template] * 2
        text = tok.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=True, tokenize=False)
        assert tok(text)["input_ids"].count(tok.bos_token_id) == in_template + 1

    # Make the first conversation's answer end early with the family's end-of-turn token: its output row becomes
    # twice the row of the token greedy decoding picks third, so a missed stop token changes the output.
    free = _hf_greedy(hf, prompts[0], [])
    with torch.no_grad():
        head = hf.get_output_embeddings().weight
        head[tok.convert_tokens_to_ids(case["end_of_turn"])] = 2 * head[free[2]]
    model_dir = tmp_path / "model"
    hf.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    write_special_ids(model_dir, case, tok)
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
    tok = tiny_tokenizer(CHAT_FAMILIES["llama-3.2"], 131)
    bare = tok("Hi", add_special_tokens=False)["input_ids"]
    assert gen.prompt_token_ids(tok, "Hi") == [tok.bos_token_id, *bare]


def test_cli_chat_keeps_the_conversation(monkeypatch, capsys):
    """jaxsloth chat: user turns from stdin (blank lines skipped), each answered with the whole conversation."""
    import io

    from jaxsloth import cli, demo

    monkeypatch.setattr("sys.stdin", io.StringIO("abc\n\nxyz\n"))
    assert cli.main(["chat", "--model", str(demo.MODEL_DIR), "--max-new-tokens", "6"]) == 0
    model, tok = jaxsloth.load(demo.MODEL_DIR)
    first = [{"role": "user", "content": "abc"}]
    r1 = model.generate(tok, [first], max_new_tokens=6)[0]
    second = [*first, {"role": "assistant", "content": r1}, {"role": "user", "content": "xyz"}]
    r2 = model.generate(tok, [second], max_new_tokens=6)[0]
    assert capsys.readouterr().out == f"{r1}\n{r2}\n"


def test_cli_generate_chats_by_default(capsys):
    """One prompt is streamed; the chat template wraps it when the tokenizer has one, --no-chat completes raw text."""
    from jaxsloth import cli, demo

    model, tok = jaxsloth.load(demo.MODEL_DIR)
    args = ["generate", "--model", str(demo.MODEL_DIR), "--max-new-tokens", "6", "abc"]
    assert cli.main(args) == 0
    assert (
        capsys.readouterr().out == model.generate(tok, [{"role": "user", "content": "abc"}], max_new_tokens=6)[0] + "\n"
    )
    assert cli.main([*args, "--no-chat"]) == 0
    assert capsys.readouterr().out == model.generate(tok, "abc", max_new_tokens=6)[0] + "\n"
