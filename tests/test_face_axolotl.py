"""Axolotl and LLaMA-Factory configs read by ``jaxsloth train``: each project's example configs (written as they
ship them, with the model and data swapped for local ones) map onto the schema's settings, unsupported choices are
one-line errors naming the key, and one Axolotl QLoRA config trains end to end on the demo model."""

import json
import logging

import pytest

from jaxsloth import cli, demo
from jaxsloth.faces.axolotl import detect, translate_config
from jaxsloth.models.decoder import LINEARS

ALPACA_ROWS = [
    {"instruction": f"Repeat the word {w}.", "input": "", "output": w}
    for w in ("alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta")
]

# Axolotl's examples/llama-3/qlora.yml, base_model and dataset swapped (sequence_len and batch sizes shrunk).
AXOLOTL_QLORA = """\
base_model: {model}
model_type: AutoModelForCausalLM
tokenizer_type: AutoTokenizer

load_in_8bit: false
load_in_4bit: true
strict: false

datasets:
  - path: {data}
    type: {type}
dataset_prepared_path:
val_set_size: 0
output_dir: {out}

adapter: qlora
lora_model_dir:

sequence_len: 64
sample_packing: true
pad_to_sequence_len: true

lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_modules:
lora_target_linear: true
lora_fan_in_fan_out:

wandb_project:
wandb_entity:
wandb_watch:
wandb_name:
wandb_log_model:

gradient_accumulation_steps: 2
micro_batch_size: 2
num_epochs: 4
optimizer: paged_adamw_32bit
lr_scheduler: cosine
learning_rate: 0.0002

train_on_inputs: false
group_by_length: false
bf16: auto
fp16:
tf32: false

gradient_checkpointing: true
early_stopping_patience:
resume_from_checkpoint:
local_rank:
logging_steps: 1
xformers_attention:
flash_attention: true

warmup_steps: 1
evals_per_epoch: 4
eval_table_size:
saves_per_epoch: 1
debug:
deepspeed:
weight_decay: 0.0
fsdp:
fsdp_config:
special_tokens:
  pad_token: "<|end_of_text|>"
"""

# Axolotl's examples/llama-3/lora.yml (chat_template dataset), base_model and dataset swapped, 8-bit loading off.
AXOLOTL_LORA = """\
base_model: {model}
model_type: LlamaForCausalLM
tokenizer_type: AutoTokenizer

load_in_8bit: false
load_in_4bit: false
strict: false

chat_template: llama3
datasets:
  - path: {data}
    type: chat_template
    field_messages: messages
    message_property_mappings:
      role: role
      content: content
    roles:
      user:
        - user
      assistant:
        - assistant

dataset_prepared_path:
val_set_size: 0.05
output_dir: ./outputs/lora-out

sequence_len: 4096
sample_packing: false
pad_to_sequence_len: true

adapter: lora
lora_model_dir:
lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_modules:
  - q_proj
  - v_proj

wandb_project:
wandb_name:

gradient_accumulation_steps: 4
micro_batch_size: 2
num_epochs: 4
optimizer: adamw_bnb_8bit
lr_scheduler: linear
learning_rate: 0.0002

train_on_inputs: false
bf16: auto
tf32: false

gradient_checkpointing: false
logging_steps: 1
flash_attention: true

warmup_ratio: 0.1
evals_per_epoch: 4
saves_per_epoch: 1
weight_decay: 0.0
special_tokens:
   pad_token: <|end_of_text|>
"""

# LLaMA-Factory's examples/train_lora/llama3_lora_sft.yaml, model and dataset swapped.
FACTORY_LORA = """\
### model
model_name_or_path: {model}
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all
max_steps: -1

### dataset
dataset: {dataset}
dataset_dir: {dataset_dir}
template: llama3
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/llama3-8b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null
"""

# LLaMA-Factory's examples/train_qlora/llama3_lora_sft_otfq.yaml style: quantized on the fly to 4 bits.
FACTORY_QLORA = """\
model_name_or_path: {model}
quantization_bit: 4
quantization_method: bnb
trust_remote_code: true
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: q_proj,v_proj
dataset: {dataset}
template: llama3
cutoff_len: 1024
output_dir: saves/llama3-8b/lora/sft
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
train_on_prompt: true
report_to: wandb
"""


def _write(path, text):
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def alpaca_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "alpaca.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ALPACA_ROWS))
    return path


def _settings(path, *flags):
    return cli.train_settings(cli.build_parser().parse_args(["train", str(path), *map(str, flags)]))


def test_axolotl_qlora_example_maps_onto_the_schema(tmp_path, alpaca_file, caplog):
    path = _write(
        tmp_path / "qlora.yml", AXOLOTL_QLORA.format(model=demo.MODEL_DIR, data=alpaca_file, type="alpaca", out="o")
    )
    with caplog.at_level(logging.INFO, logger="jaxsloth"):
        s = _settings(path)
    assert s["model"] == str(demo.MODEL_DIR) and s["data"] == str(alpaca_file) and s["format"] == "alpaca"
    assert s["load_in_4bit"] is True and s["r"] == 32 and s["lora_alpha"] == 16 and s["lora_dropout"] == 0.05
    assert s["target_modules"] == LINEARS  # lora_target_linear: true
    assert (s["max_seq_length"], s["packing"], s["per_device_train_batch_size"]) == (64, True, 2)
    assert (s["gradient_accumulation_steps"], s["num_train_epochs"], s["lr_scheduler_type"]) == (2, 4, "cosine")
    # gradient_checkpointing: true keeps the profile's remat (every profile checkpoints)
    assert (s["learning_rate"], s["warmup_steps"], s["train_on_inputs"], s["remat"]) == (2e-4, 1, False, None)
    assert s["output_dir"] == "o" and s["dtype"] is None  # bf16: auto leaves the profile's dtype
    messages = [r.getMessage() for r in caplog.records]
    assert any("read as an Axolotl config" in m for m in messages)
    ignored = next(m for m in messages if "ignored Axolotl keys" in m)
    for key in ("optimizer", "flash_attention", "special_tokens", "model_type", "logging_steps"):
        assert key in ignored
    for key in ("wandb_project", "val_set_size", "tf32"):  # empty, 0 and false turn nothing on
        assert key not in ignored


def test_axolotl_lora_chat_template_example(tmp_path, caplog):
    text = AXOLOTL_LORA.format(model=demo.MODEL_DIR, data=demo.ASSETS / "train.jsonl")
    with caplog.at_level(logging.INFO, logger="jaxsloth"):
        s = _settings(_write(tmp_path / "lora.yml", text), "--max-steps", 3)
    assert s["format"] == "messages" and s["load_in_4bit"] is False and s["target_modules"] == ("q_proj", "v_proj")
    assert (s["packing"], s["remat"], s["warmup_ratio"], s["lr_scheduler_type"]) == (False, "none", 0.1, "linear")
    assert s["max_steps"] == 3 and s["num_train_epochs"] is None  # a flag overrides the file, as for any config
    ignored = next(r.getMessage() for r in caplog.records if "ignored Axolotl keys" in r.getMessage())
    assert "chat_template" in ignored and "val_set_size" not in ignored and s["val_set_size"] == 0.05


def test_llamafactory_lora_example_reads_dataset_info(tmp_path, alpaca_file, caplog):
    info = {"my_alpaca": {"file_name": alpaca_file.name}, "my_chat": {
        "file_name": "chat.jsonl", "formatting": "sharegpt",
        "columns": {"messages": "messages"}, "tags": {"role_tag": "role", "content_tag": "content",
                                                      "user_tag": "user", "assistant_tag": "assistant"}}}  # fmt: skip
    (alpaca_file.parent / "dataset_info.json").write_text(json.dumps(info))
    text = FACTORY_LORA.format(model=demo.MODEL_DIR, dataset="my_alpaca", dataset_dir=alpaca_file.parent)
    with caplog.at_level(logging.INFO, logger="jaxsloth"):
        s = _settings(_write(tmp_path / "sft.yaml", text))
    assert s["data"] == str(alpaca_file) and s["format"] == "alpaca"
    assert (s["r"], s["target_modules"], s["max_seq_length"], s["dataset_num_proc"]) == (8, LINEARS, 2048, 16)
    assert (s["per_device_train_batch_size"], s["gradient_accumulation_steps"], s["num_train_epochs"]) == (1, 8, 3)
    assert (s["learning_rate"], s["lr_scheduler_type"], s["warmup_ratio"], s["dtype"]) == (1e-4, "cosine", 0.1,
                                                                                          "bfloat16")  # fmt: skip
    assert s["overwrite"] is True and s["load_in_4bit"] is False and s["max_steps"] is None  # -1: from the epochs
    messages = [r.getMessage() for r in caplog.records]
    assert any("read as an LLaMA-Factory config" in m for m in messages)
    ignored = next(m for m in messages if "ignored LLaMA-Factory keys" in m)
    for key in ("template", "max_samples", "do_train", "plot_loss"):
        assert key in ignored
    assert s["report_to"] == ("none",)  # LLaMA-Factory's report_to is jaxsloth's

    text = FACTORY_LORA.format(model=demo.MODEL_DIR, dataset="my_chat", dataset_dir=alpaca_file.parent)
    s = _settings(_write(tmp_path / "chat.yaml", text))
    assert s["data"] == str(alpaca_file.parent / "chat.jsonl") and s["format"] == "messages"


def test_llamafactory_qlora_example_with_a_file_path(tmp_path, alpaca_file):
    s = _settings(_write(tmp_path / "q.yaml", FACTORY_QLORA.format(model=demo.MODEL_DIR, dataset=alpaca_file)))
    assert (s["r"], s["lora_alpha"]) == (8, 16)  # LLaMA-Factory's default alpha: twice the rank
    assert s["load_in_4bit"] is True and s["target_modules"] == ("q_proj", "v_proj") and s["train_on_inputs"] is True
    assert s["data"] == str(alpaca_file) and s["format"] == "auto" and s["max_seq_length"] == 1024


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"base_model": "m", "datasets": [{"path": "d"}]}, "adapter: None: jaxsloth trains LoRA or QLoRA"),
        ({"base_model": "m", "adapter": "lora", "load_in_8bit": True, "datasets": [{"path": "d"}]}, "load_in_8bit"),
        ({"base_model": "m", "adapter": "lora", "datasets": [{"path": "a"}, {"path": "b"}]}, "2 datasets given"),
        ({"base_model": "m", "adapter": "lora", "datasets": [{"path": "a", "type": "orpo.chat"}]}, "datasets[0].type"),
        (
            {"base_model": "m", "adapter": "lora", "lr_scheduler": "one_cycle", "datasets": [{"path": "a"}]},
            "lr_scheduler: scheduler 'one_cycle'",
        ),  # fmt: skip
        (
            {"base_model": "m", "adapter": "lora", "lora_target_modules": ["qkv"], "datasets": [{"path": "a"}]},
            "unknown projection 'qkv'",
        ),  # fmt: skip
        ({"model_name_or_path": "m", "finetuning_type": "full", "dataset": "x"}, "finetuning_type: 'full' is not"),
        ({"model_name_or_path": "m", "stage": "ppo", "dataset": "x"}, "stage: 'ppo'"),
        ({"model_name_or_path": "m", "stage": "sft", "quantization_bit": 8, "dataset": "x"}, "quantization_bit: 8"),
        ({"model_name_or_path": "m", "stage": "sft", "dataset": "nowhere"}, "give the data file's path"),
    ],
)
def test_unsupported_choices_are_errors_naming_the_key(tmp_path, raw, message):
    with pytest.raises(ValueError, match=r"^" + str(tmp_path / "c.yml").replace("\\", "\\\\")) as e:
        translate_config(raw, tmp_path / "c.yml")
    assert message in str(e.value)


def test_axolotl_modules_to_save_train_embeddings_and_head():
    raw = {"base_model": "m", "adapter": "lora", "datasets": [{"path": "d"}], "lora_modules_to_save": ["lm_head"]}
    out = translate_config(raw, None)
    assert (out["train_embeddings"], out["train_lm_head"]) == (False, True)
    with pytest.raises(ValueError, match="lora_modules_to_save: 'norm'"):
        translate_config({**raw, "lora_modules_to_save": ["norm"]}, None)


def test_jaxsloth_configs_pass_through_unchanged():
    raw = {"model": "m", "data": "d", "lora_r": 4, "datasets": "not a list"}
    assert detect(raw) is None and translate_config(raw, None) == raw


def test_axolotl_qlora_config_trains_on_the_demo_model(tmp_path):
    # The demo's chat data: the Alpaca prompt alone is longer than the demo model's 128 positions.
    out, data = tmp_path / "run", demo.ASSETS / "train.jsonl"
    text = AXOLOTL_QLORA.format(model=demo.MODEL_DIR, data=data, type="chat_template", out=out)
    path = _write(tmp_path / "qlora.yml", text)
    assert cli.main(["train", str(path), "--max-steps", "2", "--profile", "cpu"]) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["loss"] > 0 for r in records)
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 32 and adapter["lora_alpha"] == 16 and set(adapter["target_modules"]) == set(LINEARS)
