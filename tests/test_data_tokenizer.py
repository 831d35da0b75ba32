"""A tiny byte-level BPE tokenizer trained in-process (no hub) for the data tests, plus its sanity checks."""

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>"]

_CORPUS = [
    "the cat sat on the mat and the dog sat on the log",
    "what is two plus two? two plus two is four.",
    "Below is an instruction that describes a task.",
    "Write a response that appropriately completes the request.",
    "### Instruction: ### Input: ### Response: user assistant system",
    "hello world, how are you today? I am fine, thank you.",
]

# ChatML: what Qwen and many fine-tunes use; the end-of-turn token doubles as EOS.
CHATML = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The same layout with the assistant part wrapped in {% generation %} (return_assistant_tokens_mask path).
CHATML_GENERATION = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A template whose finished assistant turns differ from its generation prompt (an empty think block, as in
# reasoning models) and which adds a default system prompt: the incremental renderer must still find answers.
CHATML_THINK = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nyou are helpful<|im_end|>\n' }}"
    "{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@functools.cache
def _tokenizer_json() -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=331, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer)
    # Like Llama: encoding with special tokens prepends BOS.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok.to_str()


def make_tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """A fresh tokenizer (tests may change it): BOS <s> (added on encode), EOS <|im_end|>, PAD <pad>."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
    )
    tok.chat_template = chat_template
    return tok


def test_tokenizer_round_trips_and_adds_bos():
    tok = make_tokenizer()
    text = "hello <|im_start|>user\nwhat is 7?<|im_end|>\n"
    ids = tok(text, add_special_tokens=True)["input_ids"]
    assert ids[0] == tok.bos_token_id == 1
    assert tok.decode(ids[1:]) == text
    assert tok.eos_token_id == 2 and tok.pad_token_id == 0
