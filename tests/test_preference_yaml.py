"""Preference runs from Axolotl (``rl: dpo|ipo|orpo|kto|simpo``) and LLaMA-Factory (``stage: dpo|kto``) configs:
their keys map onto the schema's settings (method, beta, loss_type, ..., the data's columns), unsupported choices
are one-line errors naming the key, and rows read under the mapped columns tokenize exactly as the same pairs
written in TRL's conversational format."""

import json
from pathlib import Path

import pytest

from jaxsloth import cli, demo
from jaxsloth.config import TrainConfig
from jaxsloth.faces.axolotl import translate_config
from jaxsloth.methods.preference_data import map_fields, tokenize_pair

YML = Path("run.yml")


def _axolotl(rl: str, entry: dict, **keys) -> dict:
    raw = {"base_model": "m", "adapter": "lora", "rl": rl, "datasets": [{"path": "pairs.jsonl", **entry}], **keys}
    return translate_config(raw, YML)


@pytest.mark.parametrize(
    "rl,entry,keys,expected",
    [
        # Axolotl's examples/llama-3/instruct-dpo-lora-8b.yml dataset entry.
        ("dpo", {"type": "chat_template.default", "field_messages": "conversation", "field_chosen": "chosen",
                 "field_rejected": "rejected", "message_property_mappings": {"role": "role", "content": "content"}},
         {"rl_beta": 0.2}, {"method": "dpo", "beta": 0.2, "prompt_field": "conversation"}),
        ("ipo", {}, {"precompute_ref_log_probs": True},
         {"method": "dpo", "loss_type": "ipo", "precompute_ref_log_probs": True}),
        ("orpo", {"type": "chatml.argilla"}, {"orpo_alpha": 0.1},
         {"method": "orpo", "beta": 0.1, "prompt_field": "instruction", "chosen_field": "chosen_response",
          "rejected_field": "rejected_response", "chat_answers": True}),
        ("kto", {"type": "llama3.intel"}, {"kto_undesirable_weight": 1.5},
         {"method": "kto", "undesirable_weight": 1.5, "prompt_field": "question", "system_field": "system",
          "chat_answers": True}),
        ("simpo", {"field_prompt": "q", "field_chosen": "good", "field_rejected": "bad"}, {"simpo_gamma": 0.3},
         {"method": "simpo", "simpo_gamma": 0.3, "cpo_alpha": 1.0, "prompt_field": "q", "chosen_field": "good",
          "rejected_field": "bad"}),
    ],
)  # fmt: skip
def test_axolotl_rl_configs_map_onto_the_preference_settings(rl, entry, keys, expected):
    out = _axolotl(rl, entry, **keys)
    assert {k: out.get(k) for k in expected} == expected
    assert out["data"] == "pairs.jsonl"
    TrainConfig(**{k: v for k, v in out.items() if k in TrainConfig.__dataclass_fields__})  # valid settings
    if rl == "kto":
        assert "chosen_field" not in out  # unpaired rows keep completion / label


def test_axolotl_and_llamafactory_unsupported_preference_choices_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"run.yml: rl: 'ppo' is not supported"):
        _axolotl("ppo", {})
    with pytest.raises(ValueError, match=r"datasets\[0\].type: 'user_defined.default' is not supported for rl"):
        _axolotl("dpo", {"type": "user_defined.default"})
    base = {"model_name_or_path": "m", "finetuning_type": "lora", "dataset": str(tmp_path / "d.jsonl")}
    (tmp_path / "d.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match=r"pref_loss: 'bco' is not supported"):
        translate_config({**base, "stage": "dpo", "pref_loss": "bco"}, YML)
    with pytest.raises(ValueError, match=r"pref_ftx: 0.5: an SFT loss added to dpo is not supported"):
        translate_config({**base, "stage": "dpo", "pref_ftx": 0.5}, YML)
    with pytest.raises(ValueError, match=r"stage: 'ppo'"):
        translate_config({**base, "stage": "ppo"}, YML)


@pytest.mark.parametrize(
    "keys,expected",
    [
        ({"stage": "dpo", "pref_beta": 0.2}, {"method": "dpo", "beta": 0.2, "loss_type": "sigmoid"}),
        ({"stage": "dpo", "pref_loss": "hinge"}, {"method": "dpo", "loss_type": "hinge"}),
        ({"stage": "dpo", "pref_loss": "orpo", "pref_beta": 0.1}, {"method": "orpo", "beta": 0.1}),
        ({"stage": "dpo", "pref_loss": "simpo", "simpo_gamma": 0.5, "pref_ftx": 0.3},
         {"method": "simpo", "simpo_gamma": 0.5, "cpo_alpha": 0.3}),
        ({"stage": "kto", "kto_chosen_weight": 1.2, "ref_model": "ref"},
         {"method": "kto", "desirable_weight": 1.2, "ref_model": "ref"}),
    ],
)  # fmt: skip
def test_llamafactory_preference_stages(tmp_path, keys, expected):
    # LLaMA-Factory's examples/train_lora/llama3_lora_dpo.yaml, with a local ranking dataset in dataset_info.json.
    (tmp_path / "data").mkdir()
    info = {"pairs": {"file_name": "pairs.json", "ranking": True,
                      "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}}}  # fmt: skip
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps(info))
    raw = {"model_name_or_path": "m", "finetuning_type": "lora", "lora_target": "all", "dataset": "pairs",
           "dataset_dir": "data", "cutoff_len": 64, **keys}  # fmt: skip
    if keys["stage"] == "kto":  # KTO reads TRL's prompt/completion/label columns
        info["pairs"].pop("columns")
        (tmp_path / "data" / "dataset_info.json").write_text(json.dumps(info))
    out = translate_config(raw, tmp_path / "run.yaml")
    assert {k: out.get(k) for k in expected} == expected
    assert out["data"] == str(tmp_path / "data" / "pairs.json")
    if keys["stage"] == "dpo":
        assert (out["prompt_field"], out["chat_answers"]) == ("instruction", True)


def test_mapped_rows_tokenize_as_trls_conversational_pairs(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo.MODEL_DIR))
    system, question = "Answer with the cipher.", "Cipher of abc?"
    conversation = {
        "prompt": [{"role": "system", "content": system}, {"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": "bcd"}],
        "rejected": [{"role": "assistant", "content": "bce"}],
    }
    expected = tokenize_pair(tok, conversation)
    intel = {"system": system, "question": question, "chosen": "bcd", "rejected": "bce"}  # Axolotl's chatml.intel
    mapped = map_fields(intel, prompt_field="question", system_field="system", chat_answers=True)
    assert tokenize_pair(tok, mapped) == expected
    # chat_template.default: a conversation column, answers as single messages (here in ShareGPT's keys).
    row = {"conversation": conversation["prompt"], "chosen": {"from": "gpt", "value": "bcd"}, "rejected": "bce"}
    assert tokenize_pair(tok, map_fields(row, prompt_field="conversation")) == expected
    with pytest.raises(ValueError, match=r"no 'question' column \(prompt_field\)"):
        map_fields({"prompt": "x", "chosen": "a", "rejected": "b"}, prompt_field="question")
    # The settings reach jaxsloth train from an Axolotl YAML file.
    yml = tmp_path / "dpo.yml"
    yml.write_text(f"base_model: {demo.MODEL_DIR}\nadapter: lora\nrl: dpo\nrl_beta: 0.3\ndatasets:\n"
                   "  - path: pairs.jsonl\n    type: chatml.intel\n")  # fmt: skip
    s = cli.train_settings(cli.build_parser().parse_args(["train", str(yml)]))
    assert (s["method"], s["beta"], s["prompt_field"], s["system_field"], s["chat_answers"]) == (
        "dpo", 0.3, "question", "system", True)  # fmt: skip


def test_reference_and_column_flags_reach_the_settings():
    parser = cli.build_parser()
    args = parser.parse_args(["train", "--model", "m", "--data", "d", "--method", "dpo", "--ref-model", "ref",
                              "--prompt-field", "question", "--system-field", "system", "--chat-answers"])  # fmt: skip
    s = cli.train_settings(args)
    assert (s["ref_model"], s["prompt_field"], s["system_field"], s["chat_answers"]) == (
        "ref", "question", "system", True)  # fmt: skip
