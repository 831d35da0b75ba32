"""Data pipeline: files, dataset folders, Hub ids or datasets -> tokenized, loss-masked, packed fixed-shape batches.

    data = tokenize_dataset("train.jsonl", tokenizer, format="auto", max_seq_length=2048,   # or a list of dicts,
                            train_on_inputs=False, truncate=True, vocab_size=model_vocab)   # "org/name", a Dataset
    loader = BatchLoader(data, batch_size=8, seq_len=2048, pack=True, seed=0)
    for batch in loader: ...                         # forever, or num_epochs=N
    state = loader.state_dict(); loader.load_state_dict(state)   # resume at the same batch
    stream = streaming_loader("big.jsonl", tokenizer, batch_size=8, seq_len=2048)   # in order, never all in memory

Public API:
- `open_dataset(source, split="train", name=None, streaming=False)`: a list of dicts or a `datasets.Dataset` /
  `IterableDataset` from a data file (.jsonl/.json/.parquet/.csv/.tsv/.arrow/.txt), a dataset folder (data files
  or `save_to_disk` output), a Hub dataset id, a `datasets` object (a DatasetDict by `split`) or a list of dicts.
  `load_records(source, split=..., name=...) -> list[dict]`: the same rows as a list.
- `tokenize_dataset(records, tokenizer, *, format="auto", max_seq_length=2048, train_on_inputs=False,
  truncate=True, vocab_size=None, use_chat_template=False, text_field=None, num_proc=None, split="train",
  name=None) -> TokenizedDataset`. A `datasets.Dataset` (every file, folder and Hub id) is tokenized with
  `Dataset.map(num_proc=...)` and cached on disk by datasets, keyed by the data, tokenizer, settings and this
  code: later runs, resumes and the other hosts of a run read the tokens back. Formats, detected from the first
  row's keys or forced:
  "text" ({"text"}, or any column named by text_field: every token trained, BOS if the tokenizer adds one, EOS
  appended);
  "alpaca" ({"instruction", "input"?, "output"}: the Stanford Alpaca prompt, or the chat template with
  use_chat_template=True; loss on the output and EOS only unless train_on_inputs);
  "messages" ({"messages": [{"role", "content"}]}, or sharegpt {"conversations": [{"from", "value"}]}
  with human/gpt roles; alias format "sharegpt"): rendered with `tokenizer.apply_chat_template`, loss
  on assistant turns (answer + end-of-turn token) only unless train_on_inputs. Tool calling: assistant turns
  with "tool_calls", "tool" turns, and a "tools" column (schemas, or their JSON) passed as the template's tools;
  "prompt_completion" (TRL's {"prompt", "completion"}: strings, or lists of messages rendered with the chat
  template): loss on the completion (and EOS) only unless train_on_inputs.
  Validation errors name the file and row: missing/mistyped fields, a conversation the chat template
  rejects, token ids >= vocab_size, too-long examples with truncate=False; also non-UTF-8 bytes (with the
  line), an empty dataset, a folder without data files, an undetectable format (with the columns) or a
  missing chat template. Truncations are logged and counted in `TokenizedDataset.num_truncated`; examples
  left with no trained token are dropped (`num_dropped`).
- `BatchLoader(dataset, batch_size, seq_len, *, pack=True, seed=0, shuffle=True, num_epochs=None,
  drop_last=False)`: iterator of batches; `state_dict()` / `load_state_dict()`; `num_batches(epoch)`.
- `streaming_loader(data, tokenizer, *, batch_size, seq_len, ...) -> StreamingBatchLoader`: the same batches
  from a stream read in order (packed greedily, not shuffled); its state is the number of source rows consumed,
  and resuming skips exactly those (see jaxsloth.data.streaming).
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
