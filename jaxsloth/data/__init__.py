"""Data pipeline: files or datasets -> tokenized, loss-masked, packed fixed-shape batches.

    records = load_records("train.jsonl")            # or .json, .parquet, a list of dicts, a datasets.Dataset
    data = tokenize_dataset(records, tokenizer, format="auto", max_seq_length=2048,
                            train_on_inputs=False, truncate=True, vocab_size=model_vocab)
    loader = BatchLoader(data, batch_size=8, seq_len=2048, pack=True, seed=0)
    for batch in loader: ...                         # forever, or num_epochs=N
    state = loader.state_dict(); loader.load_state_dict(state)   # resume at the same batch

Public API:
- `load_records(source) -> list[dict]`: JSONL, JSON (a list or {"data": [...]}), Parquet, lists of dicts,
  and any object iterating dict rows (Hugging Face `datasets.Dataset`, duck-typed: `datasets` is optional).
- `tokenize_dataset(records, tokenizer, *, format="auto", max_seq_length=2048, train_on_inputs=False,
  truncate=True, vocab_size=None, use_chat_template=False) -> TokenizedDataset`. Formats, detected from
  the first row's keys or forced:
  "text" ({"text"}: every token trained, BOS if the tokenizer adds one, EOS appended);
  "alpaca" ({"instruction", "input"?, "output"}: the Stanford Alpaca prompt, or the chat template with
  use_chat_template=True; loss on the output and EOS only unless train_on_inputs);
  "messages" ({"messages": [{"role", "content"}]}, or sharegpt {"conversations": [{"from", "value"}]}
  with human/gpt roles; alias format "sharegpt"): rendered with `tokenizer.apply_chat_template`, loss
  on assistant turns (answer + end-of-turn token) only unless train_on_inputs.
  Validation errors name the row: missing/mistyped fields, token ids >= vocab_size, too-long examples
  with truncate=False; also an empty dataset or a missing chat template. Truncations are logged and
  counted in `TokenizedDataset.num_truncated`; examples left with no trained token are dropped
  (`num_dropped`).
- `BatchLoader(dataset, batch_size, seq_len, *, pack=True, seed=0, shuffle=True, num_epochs=None,
  drop_last=False)`: iterator of batches; `state_dict()` / `load_state_dict()`; `num_batches(epoch)`.
- `plan_rows`, `build_batch`: the packing steps, for callers that schedule rows themselves.

Batch contract (numpy int32, all [batch, seq]):
  tokens       input ids (pad id in padding)
  targets      the NEXT token of the same example where it is trained; -100 for untrained tokens (prompts,
               user turns), padding, and each example's last token (so no example predicts the next one)
  positions    0, 1, ... restarting for each packed example
  segment_ids  1..k for the k examples packed in a row, 0 for padding (attention never crosses segments)
"""

from jaxsloth.data.formats import FORMATS, detect_format
from jaxsloth.data.loader import BatchLoader
from jaxsloth.data.packing import build_batch, plan_rows
from jaxsloth.data.sources import load_records, open_dataset
from jaxsloth.data.streaming import StreamingBatchLoader, streaming_loader
from jaxsloth.data.tokenization import IGNORE_INDEX, Example, TokenizedDataset, make_encoder, tokenize_dataset

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "BatchLoader",
    "Example",
    "StreamingBatchLoader",
    "TokenizedDataset",
    "build_batch",
    "detect_format",
    "load_records",
    "make_encoder",
    "open_dataset",
    "plan_rows",
    "streaming_loader",
    "tokenize_dataset",
]
