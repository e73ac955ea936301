"""The YAML contract: validation, overrides, suggestions, redaction."""

import pytest
import yaml

from ftdist.config.load import load_config
from ftdist.config.redact import redacted
from ftdist.config.schema import Config
from ftdist.errors import UserError
from tests.conftest import tiny_config, write_config


def error_of(tmp_path, *overrides) -> str:
    with pytest.raises(UserError) as e:
        tiny_config(tmp_path, *overrides)
    return str(e.value)


def test_tiny_config_is_valid(tmp_path):
    cfg = tiny_config(tmp_path)
    assert isinstance(cfg, Config) and cfg.train.max_steps == 30


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    msg = error_of(tmp_path, "lora.rnak=4")
    assert "lora.rnak: unknown key" in msg and "did you mean lora.rank?" in msg


def test_key_in_the_wrong_section_suggests_the_right_one(tmp_path):
    msg = error_of(tmp_path, "rank=4")
    assert "rank: unknown key" in msg and "lora.rank" in msg


def test_wrong_type_names_key_and_value(tmp_path):
    msg = error_of(tmp_path, "train.lr=fast")
    assert "train.lr" in msg and "'fast'" in msg


def test_micro_batch_must_divide_batch(tmp_path):
    msg = error_of(tmp_path, "train.batch_size=10", "train.micro_batch_size=4")
    assert "train" in msg and "does not divide batch_size 10" in msg and "e.g. 2" in msg


def test_freeze_more_layers_than_the_model_has(tmp_path):
    msg = error_of(tmp_path, "freeze_layers=9")
    assert "freeze_layers 9 is more than the model's 4 layers" in msg


def test_freeze_all_needs_full(tmp_path):
    assert "feature extraction" in error_of(tmp_path, "method=lora", "freeze_layers=all")
    assert tiny_config(tmp_path, "method=full", "freeze_layers=all").freeze_layers == "all"


def test_model_needs_exactly_one_source(tmp_path):
    assert "exactly one of model.name_or_path" in error_of(tmp_path, "model.name_or_path=some/dir")


def test_set_overrides_parse_yaml_values(tmp_path):
    cfg = tiny_config(tmp_path, "train.lr=3e-4", "data.packing=false", "lora.target_modules=[q_proj, v_proj]")
    assert cfg.train.lr == 3e-4 and cfg.data.packing is False and cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_load_config_file_and_bad_override(tmp_path):
    path = write_config(tmp_path, tiny_config(tmp_path))
    assert load_config(path, ["train.seed=7"]).train.seed == 7
    with pytest.raises(UserError, match="expected dotted.key=value"):
        load_config(path, ["train.seed"])
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run: {name: x\n")
    with pytest.raises(UserError, match=r"bad.yaml:2: not valid YAML"):
        load_config(path)


def test_secrets_are_redacted_but_tokenizer_is_not():
    data = {"storage": {"aws_secret_access_key": "abc", "session_token": "t"}, "model": {"tokenizer": "tok/dir"}}
    out = redacted(data)
    assert out["storage"] == {"aws_secret_access_key": "***", "session_token": "***"}
    assert out["model"]["tokenizer"] == "tok/dir"


def test_a_key_written_twice_is_named_with_both_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run: {name: x}\ntrain:\n  lr: 1.0e-3\ndata: {train: d.jsonl}\ntrain:\n  lr: 2.0e-3\n")
    with pytest.raises(UserError, match=r"c.yaml:5: not valid YAML: key 'train' appears twice \(lines 2 and 5\)"):
        load_config(path)


def test_a_directory_as_the_config_says_so(tmp_path):
    with pytest.raises(UserError, match=r"is a directory; give the config file itself"):
        load_config(tmp_path)


def test_a_set_override_is_named_as_such_and_other_tools_names_are_translated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"run": {"name": "x"}, "model": {"init": {"arch": "llama"}},
                                    "data": {"train": "d.jsonl"}}))
    with pytest.raises(UserError) as e:
        load_config(path, ["train.learning_rate=1e-4"])
    assert "--set train.learning_rate: unknown key; did you mean train.lr?" in str(e.value)
    with pytest.raises(UserError, match=r"lora.lora_r: unknown key; did you mean lora.rank\?"):
        load_config(path, ["lora.lora_r=8"])


def test_qlora_with_zero3_is_refused_up_front(tmp_path):
    with pytest.raises(UserError, match="use zero_stage 2"):
        tiny_config(tmp_path, "method=qlora", "distributed.zero_stage=3")
