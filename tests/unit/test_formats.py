"""Data formats (alpaca, sharegpt, chat with mappings, preference), chat templates, and file
types (jsonl, json, parquet, csv, shard directories, globs, save_to_disk, s3://)."""

import json
from pathlib import Path

import pytest

from ftdist.data.chat_templates import apply_choice
from ftdist.data.rows import encode
from ftdist.errors import UserError
from ftdist.data.records import RowReader
from ftdist.data.tokenizer import train_tokenizer
from tests.conftest import DEMO, tiny_config

ALPACA = [{"instruction": "reverse", "input": "12", "output": "21"},
          {"instruction": "reverse 345", "output": "543", "system": "be brief"}]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer((DEMO / "general.txt").read_text().split("\n\n"), 384)


def learned(tokenizer, record) -> str:
    ids, mask = encode(tokenizer, record)
    return tokenizer.decode([i for i, m in zip(ids, mask) if m])


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- formats


def test_alpaca_rows_become_a_conversation_trained_on_the_output(tokenizer):
    rows = RowReader()
    fmt, record = rows.normalize(ALPACA[0])
    assert fmt == "alpaca"
    assert record == {"messages": [{"role": "user", "content": "reverse\n\n12"},
                                   {"role": "assistant", "content": "21"}]}
    assert learned(tokenizer, record) == "21<|im_end|>\n"
    _, record = rows.normalize(ALPACA[1])
    assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant"]
    assert learned(tokenizer, record) == "543<|im_end|>\n"


def test_sharegpt_rows_train_on_the_gpt_turns_only(tokenizer):
    row = {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "reverse 12"},
                             {"from": "gpt", "value": "21"}, {"from": "tool", "value": "ok"},
                             {"from": "gpt", "value": "done"}]}
    fmt, record = RowReader().normalize(row)
    assert fmt == "sharegpt"
    assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert learned(tokenizer, record) == "21<|im_end|>\ndone<|im_end|>\n"


def test_other_key_and_role_names_through_columns_and_roles(tokenizer):
    rows = RowReader(columns={"messages": "dialog", "role": "speaker", "content": "text"},
                roles={"user": ["person"], "assistant": ["bot"]})
    row = {"dialog": [{"speaker": "person", "text": "hi"}, {"speaker": "bot", "text": "hello"}]}
    fmt, record = rows.normalize(row)
    assert fmt == "chat" and learned(tokenizer, record) == "hello<|im_end|>\n"
    with pytest.raises(ValueError, match=r'dialog\[1\]: unknown role "robot".*data.roles: \{assistant: \[robot\]\}'):
        rows.normalize({"dialog": [{"speaker": "person", "text": "hi"}, {"speaker": "robot", "text": "x"}]})
    with pytest.raises(ValueError, match=r'"answer" must be a string, and is missing'):
        RowReader(columns={"completion": "answer"}).normalize({"prompt": "q", "response": "a"}, "prompt_completion")


def test_an_unknown_chat_role_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r'messages\[0\]: unknown role "narrator"'):
        RowReader().normalize({"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]})


def test_preference_rows_are_validated_then_refused_for_sft(tmp_path):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    assert RowReader().normalize(good) == ("preference", good)
    with pytest.raises(ValueError, match='"rejected" must be a non-empty string'):
        RowReader().normalize({"prompt": "q", "chosen": "a", "rejected": ""})
    path = write_jsonl(tmp_path / "pref.jsonl", [good])
    with pytest.raises(UserError, match=r"preference pairs .*objective sft.*set objective: dpo.*"
                                        r"data.columns: \{completion: chosen\}"):
        RowReader().read(str(path))
    # Trained on the chosen answers, as the message says.
    records, fmt, _ = RowReader(columns={"completion": "chosen"}).read(str(path), "prompt_completion")
    assert fmt == "prompt_completion" and records == [{"prompt": "q", "completion": "a"}]


def test_unknown_mapping_keys_are_config_errors():
    with pytest.raises(UserError, match=r"data.columns: unknown key 'dialogue'"):
        tiny_config(Path("/tmp"), "data.columns={dialogue: dialog}")
    with pytest.raises(UserError, match=r"data.roles: unknown key 'bot'"):
        tiny_config(Path("/tmp"), "data.roles={bot: [gpt]}")


# ---------------------------------------------------------------- chat templates


def test_named_and_file_chat_templates(tokenizer, tmp_path):
    record = RowReader().normalize(ALPACA[0])[1]
    llama3 = train_tokenizer(["x"], 300)
    apply_choice(llama3, "llama3")
    ids, _ = encode(llama3, record)
    assert llama3.decode(ids).startswith("<|start_header_id|>user<|end_header_id|>\n\nreverse\n\n12<|eot_id|>")
    assert learned(llama3, record) == "21<|eot_id|>"
    jinja = tmp_path / "plain.jinja"
    jinja.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}assistant: {% endif %}")
    plain = train_tokenizer(["x"], 300)
    apply_choice(plain, str(jinja))
    assert learned(plain, record) == "21\n"
    with pytest.raises(UserError, match="neither a named template"):
        apply_choice(plain, str(tmp_path / "missing.jinja"))


def test_a_chat_row_without_a_template_names_the_fix():
    from ftdist.data.chat_templates import require_template

    bare = train_tokenizer(["x"], 300)
    bare.chat_template = None
    with pytest.raises(UserError, match="data.format sharegpt .* set data.chat_template: chatml"):
        require_template(bare, "sharegpt")


# ---------------------------------------------------------------- file types


def rows_of_demo(n: int = 12) -> list[dict]:
    return [json.loads(line) for line in (DEMO / "train.jsonl").read_text().splitlines()[:n]]


def write_each_type(folder: Path, rows: list[dict]) -> dict[str, Path]:
    import pandas as pd
    from datasets import Dataset

    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    files = {"jsonl": write_jsonl(folder / "d.jsonl", rows), "json": folder / "d.json",
             "parquet": folder / "d.parquet", "csv": folder / "d.csv", "shards": folder / "shards",
             "glob": folder / "shards" / "part-*.parquet", "save_to_disk": folder / "saved"}
    files["json"].write_text(json.dumps(rows, indent=1))
    frame.to_parquet(files["parquet"])
    frame.to_csv(files["csv"], index=False)
    files["shards"].mkdir()
    half = len(rows) // 2
    frame[:half].to_parquet(files["shards"] / "part-0.parquet")
    frame[half:].to_parquet(files["shards"] / "part-1.parquet")
    Dataset.from_list(rows).save_to_disk(str(files["save_to_disk"]))
    return files


def test_every_file_type_gives_the_same_records(tmp_path):
    rows = rows_of_demo()
    for kind, path in write_each_type(tmp_path, rows).items():
        records, fmt, _ = RowReader().read(str(path))
        assert fmt == "prompt_completion" and records == rows, kind


def test_alpaca_in_csv_keeps_an_empty_input_empty(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('instruction,input,output\nreverse 12,,21\n"reverse, twice",34,43\n')
    records, fmt, _ = RowReader().read(str(path))
    assert fmt == "alpaca" and records[0]["messages"][0]["content"] == "reverse 12"
    assert records[1]["messages"][0]["content"] == "reverse, twice\n\n34"


@pytest.mark.parametrize("kind, where", [("jsonl", "d.jsonl:2"), ("json", "d.json: row 1"),
                                         ("parquet", "d.parquet: row 1"), ("csv", "d.csv:3"),
                                         ("save_to_disk", "saved: row 1")])
def test_a_bad_row_is_named_by_file_line_or_row_and_field(tmp_path, kind, where):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": ""}, {"prompt": "d", "completion": "e"}]
    path = write_each_type(tmp_path, rows)[kind]
    with pytest.raises(UserError) as e:
        RowReader().read(str(path))
    assert where in str(e.value) and '"completion" is empty' in str(e.value)
    records, _, skipped = RowReader().read(str(path), skip_bad_rows=True)
    assert skipped == 1 and [r["prompt"] for r in records] == ["a", "d"]


def test_invalid_utf8_is_a_bad_row_in_jsonl_and_csv(tmp_path):
    jsonl = tmp_path / "u.jsonl"
    jsonl.write_bytes(b'{"text": "fine"}\n{"text": "bad \xff byte"}\n{"text": "also fine"}\n')
    with pytest.raises(UserError, match=r"u.jsonl:2: not valid UTF-8 \(byte 0xff at column 15\)"):
        RowReader().read(str(jsonl))
    assert RowReader().read(str(jsonl), skip_bad_rows=True)[2] == 1
    csv = tmp_path / "u.csv"
    csv.write_bytes(b'text\nfine\nbad \xff byte\n')
    with pytest.raises(UserError, match=r"u.csv:3: not valid UTF-8"):
        RowReader().read(str(csv))
    assert RowReader().read(str(csv), skip_bad_rows=True)[0] == [{"text": "fine"}]


@pytest.mark.parametrize("make, message", [
    (lambda d: (d / "x.json").write_text('{"rows": []}'), "must be an array of rows"),
    (lambda d: (d / "x.json").write_text('[{"text": "a"},\n{"text": '), r"x.json:2: not valid JSON"),
    (lambda d: (d / "x.parquet").write_bytes(b"PAR1 not really"), "not a readable parquet file"),
    (lambda d: (d / "x.txt").write_text("hello"), "not a data file type"),
    (lambda d: (d / "x").mkdir(), "holds no data files"),
])
def test_unreadable_sources_are_one_message(tmp_path, make, message):
    make(tmp_path)
    path = next(p for p in tmp_path.iterdir() if p.name.startswith("x"))
    with pytest.raises(UserError, match=message):
        RowReader().read(str(path))


def test_shards_of_mixed_types_and_empty_globs_are_refused(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}])
    (tmp_path / "b.csv").write_text("text\nb\n")
    with pytest.raises(UserError, match=r"mixes file types \(csv, jsonl\)"):
        RowReader().read(str(tmp_path))
    with pytest.raises(UserError, match="matches no file"):
        RowReader().read(str(tmp_path / "*.parquet"))


def test_a_datasetdict_directory_names_its_splits(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list([{"text": "a"}])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(UserError, match=r"DatasetDict with splits \['train'\].*dd/train"):
        RowReader().read(str(tmp_path / "dd"))


def test_a_hub_dataset_without_network_is_one_message(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # Read at import: the environment variables alone would come too late here.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"data.train: cannot load the hub dataset nobody/none \(split test\)"):
        RowReader().read("hf:nobody/none:test")


# ---------------------------------------------------------------- end to end


