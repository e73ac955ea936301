"""Hostile and careless inputs (issue 35): results that are not results, bounded work on any
input, small lies. Each test feeds one such input and shows the one message (or the run that
goes on) that ftdist answers with."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

from ftdist.config.load import load_config, validate_config
from ftdist.config.redact import redact_url, redacted
from ftdist.errors import UserError
from tests.conftest import DEMO, run_cli, tiny_config, write_config

BASE = {"run": {"name": "x"}, "model": {"init": {"arch": "llama"}}, "data": {"train": str(DEMO / "train.jsonl")}}


def config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- bounded work on any input


BOMB = "\n".join(["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
                 + [f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi")]
                 + ["run: {name: x}", "model: {init: {arch: llama}}", "data: {train: *i}"]) + "\n"


def test_a_yaml_alias_bomb_is_refused_in_milliseconds(tmp_path):
    path = config_file(tmp_path, BOMB)
    assert path.stat().st_size < 1000  # a few hundred bytes, 9**9 values once expanded
    started = time.monotonic()
    with pytest.raises(UserError, match=r"c.yaml: line \d+: more than 100,000 values once its aliases") as e:
        load_config(path)
    assert time.monotonic() - started < 2 and len(str(e.value)) < 400


def test_an_alias_bomb_in_a_set_value_and_a_loop_are_refused(tmp_path):
    path = write_config(tmp_path, tiny_config(tmp_path))
    flow = "{a: &a [x, x, x, x, x, x, x, x, x, x], " + ", ".join(
        f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]" for p, n in zip("abcde", "bcdef")) + "}"
    with pytest.raises(UserError, match=r"--set data.train: line 1: more than 100,000 values"):
        load_config(path, [f"data.train={flow}"])
    with pytest.raises(UserError, match=r"line 1: an alias refers to a value that contains it"):
        load_config(config_file(tmp_path, "a: &a [1, *a]\n"))


def test_a_config_file_of_megabytes_is_refused_unread(tmp_path):
    path = config_file(tmp_path, "run: {name: x}\n# " + "x" * (2 << 20) + "\n")
    with pytest.raises(UserError, match=r"c.yaml: 2.0 MiB is not a config file \(at most 1 MiB\)"):
        load_config(path)


def test_every_echo_of_a_users_value_is_bounded(tmp_path):
    huge = "9" * 500_000
    with pytest.raises(UserError) as e:
        load_config(config_file(tmp_path, yaml.safe_dump({**BASE, "train": {"lr": "x" + huge}})))
    assert "train.lr" in str(e.value) and len(str(e.value)) < 1000
    many = {**BASE, "train": {f"k{i}": 1 for i in range(500)}}
    with pytest.raises(UserError) as e:
        load_config(config_file(tmp_path, yaml.safe_dump(many)))
    assert "train.k0: unknown key" in str(e.value) and "... and 480 more" in str(e.value)
    with pytest.raises(UserError) as e:
        load_config(config_file(tmp_path, f"run: {{name: x}}\n? k{huge}\n: 1\n? k{huge}\n: 2\n"))
    assert "appears twice" in str(e.value) and len(str(e.value)) < 400


def test_a_row_of_megabytes_is_cut_by_characters_before_it_is_tokenized():
    from ftdist.data.rows import char_limit, tokenize_records
    from ftdist.data.tokenizer import train_tokenizer

    tokenizer = train_tokenizer((DEMO / "general.txt").read_text().split("\n\n"), 384)
    limit = char_limit(tokenizer, 64)
    assert limit < 10_000  # what 64 tokens can use, with room to spare: not the row's size
    text = " ".join(f"word{i}" for i in range(5_000))
    whole, _ = tokenize_records(tokenizer, [{"text": text}], 64)
    cut, counts = tokenize_records(tokenizer, [{"text": text * 2}], 64)
    assert whole.ids.tolist() == cut.ids.tolist() and counts["truncated"] == 1  # the same kept tokens
    started = time.monotonic()
    big, counts = tokenize_records(tokenizer, [{"prompt": "q", "completion": "abcdefghij" * 2_000_000},
                                               {"messages": [{"role": "user", "content": "hi " * 3_000_000},
                                                             {"role": "assistant", "content": "ok"}]}], 64)
    assert time.monotonic() - started < 10 and counts["truncated"] == 2 and big.lengths.tolist()[0] == 64


# ---------------------------------------------------------------- small lies


def test_yaml_merge_keys_are_yaml_and_x_keys_hold_anchors(tmp_path):
    text = (f"x-defaults: &defaults\n  lr: 0.001\n  max_steps: 7\n"
            f"run: {{name: x}}\nmodel: {{init: {{arch: llama}}}}\ndata: {{train: {DEMO / 'train.jsonl'}}}\n"
            "train:\n  <<: *defaults\n  max_steps: 9\n")
    cfg = load_config(config_file(tmp_path, text))
    assert (cfg.train.lr, cfg.train.max_steps) == (0.001, 9)  # merged, and the key beside it wins
    with pytest.raises(UserError, match=r"defaults: unknown key \(a block of YAML anchors .* x-defaults\)"):
        load_config(config_file(tmp_path, text.replace("x-defaults", "defaults")))
    with pytest.raises(UserError, match=r"key 'max_steps' appears twice"):
        load_config(config_file(tmp_path, text + "  max_steps: 10\n"))


def test_environment_variables_in_paths_are_expanded_or_named(tmp_path, monkeypatch):
    monkeypatch.setenv("FTDIST_TEST_HOME", str(tmp_path))
    cfg = tiny_config(tmp_path, "run.output=$FTDIST_TEST_HOME/runs", "data.eval=${FTDIST_TEST_HOME}/e.jsonl",
                      "data.train=[{path: $FTDIST_TEST_HOME/t.jsonl}]", "logging.tensorboard=$FTDIST_TEST_HOME/tb")
    assert cfg.run.output == f"{tmp_path}/runs" and cfg.data.eval == f"{tmp_path}/e.jsonl"
    assert cfg.data.train[0].path == f"{tmp_path}/t.jsonl" and cfg.logging.tensorboard == f"{tmp_path}/tb"
    monkeypatch.delenv("FTDIST_NOT_SET", raising=False)
    with pytest.raises(UserError, match=r"run.output: \$FTDIST_NOT_SET is not set in the environment"):
        tiny_config(tmp_path, "run.output=$FTDIST_NOT_SET/runs")
    assert tiny_config(tmp_path, "run.output=/a/b$").run.output == "/a/b$"  # a $ that names nothing stays


def test_every_query_value_and_userinfo_of_every_url_is_redacted():
    assert redact_url("http://bob:pw@h:5000/x?apikey=SECRET&b=2#f, then") == "http://***@h:5000/x?apikey=***&b=***#f, then"
    assert redact_url("Max retries exceeded with url: /api/2.0/x?sig=SECRET (refused)") == \
        "Max retries exceeded with url: /api/2.0/x?sig=*** (refused)"
    for kept in ("s3://bucket/part-?.jsonl", "data/*.jsonl", "file:///tmp/mlruns", "a?b=c"):
        assert redact_url(kept) == kept
    snapshot = redacted({"logging": {"mlflow": {"tracking_uri": "https://h/?apikey=SECRET"}}})
    assert "SECRET" not in json.dumps(snapshot)


def test_a_secret_in_a_tracker_url_never_reaches_an_error():
    done = run_cli("train", str(DEMO.parent.parent / "nope.yaml"), "--local")  # warm-up: the CLI answers
    assert done.returncode == 2
    from ftdist.tracking.preflight import probe_mlflow

    pytest.importorskip("mlflow")
    cfg = validate_config({**BASE, "logging": {"mlflow": {"tracking_uri": "http://u:pw@127.0.0.1:1/?apikey=SECRET"}}})
    problem = probe_mlflow(cfg.logging.mlflow)
    assert "127.0.0.1:1" in problem and "apikey=***" in problem and "SECRET" not in problem and "pw" not in problem
    with pytest.raises(UserError) as e:
        validate_config({**BASE, "logging": {"mlflow": {"tracking_uri": "http://h/?apikey=SECRET", "bad": 1}},
                         "train": {"lr": "https://h/?token=SECRET"}})
    assert "SECRET" not in str(e.value)


def test_a_fifo_is_named_as_a_fifo_never_not_found(tmp_path):
    from ftdist.data.records import plain_text
    from ftdist.data.sources import check_source

    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match=r"data.train: .*rows.jsonl is a FIFO \(named pipe\), not a regular file"):
        check_source(str(fifo), "data.train")
    with pytest.raises(UserError, match=r"is a FIFO"):
        plain_text(str(fifo), "data.retention")
    with pytest.raises(UserError, match=r"config file .*rows.jsonl is a FIFO"):
        load_config(fifo)
    with pytest.raises(UserError, match=r"data.train: not found: .*gone.jsonl"):
        check_source(str(tmp_path / "gone.jsonl"), "data.train")


def test_a_run_directory_given_to_generate_means_its_final_model(tmp_path):
    from ftdist.cli import model_directory

    run = tmp_path / "runs" / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".ftdist-run").write_text("{}")
    with pytest.raises(UserError, match=r"a run directory that has not finished: its model will be .*r/final.*"
                                        r"ftdist export"):
        model_directory(str(run))
    (run / "final").mkdir()
    (run / "final" / "ftdist.json").write_text("{}")
    assert model_directory(str(run)) == str(run / "final")
    assert model_directory(str(run / "final")) == str(run / "final")


# ---------------------------------------------------------------- results that are not results


def test_a_csv_with_a_byte_order_mark_keeps_its_first_column(tmp_path):
    from ftdist.data.sources import read_rows

    csv_file = tmp_path / "rows.csv"
    csv_file.write_bytes(b"\xef\xbb\xbfprompt, completion\r\nreverse 12,21\r\n")
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "completion": "b"}\n')
    assert [row for _, row in read_rows(str(csv_file))] == [{"prompt": "reverse 12", "completion": "21"}]
    assert [row for _, row in read_rows(str(jsonl))] == [{"prompt": "a", "completion": "b"}]


def test_columns_that_match_no_format_in_full_are_named_not_half_read():
    from ftdist.data.records import RowReader

    with pytest.raises(ValueError, match=r'"prompt" must be a string, and is missing: the row\'s keys are \[\'Prompt\', \'completion\'\]'):
        RowReader().normalize({"Prompt": "q", "completion": "a"})
    assert RowReader().normalize({"prompt": "", "completion": "a"})[1] == {"prompt": "", "completion": "a"}


def test_an_eval_file_whose_every_example_is_truncated_away_is_refused(tmp_path):
    from ftdist.data.rows import build_dataset
    from ftdist.data.tokenizer import train_tokenizer

    rows = [json.loads(x) for x in (DEMO / "eval.jsonl").read_text().splitlines()]
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({**r, "prompt": "word " * 200 + r["prompt"]}) + "\n" for r in rows))
    tokenizer = train_tokenizer((DEMO / "general.txt").read_text().split("\n\n"), 384)
    cfg = tiny_config(tmp_path, f"data.eval={long}")
    with pytest.raises(UserError, match=rf"data.eval: {long}: no token to evaluate: all {len(rows)} of its examples "
                                        r"are longer than data.max_length 64.*Raise data.max_length"):
        build_dataset(cfg.data, tokenizer, 0)
    listed = tiny_config(tmp_path, f"data.eval=[{{path: {DEMO / 'eval.jsonl'}}}, {{path: {long}}}]")
    with pytest.raises(UserError, match=r"data.eval.1: .*long.jsonl: no token to evaluate"):
        build_dataset(listed.data, tokenizer, 0)


def test_a_diverging_run_stops_at_the_step_names_its_last_good_checkpoint_and_writes_no_final(tmp_path):
    from ftdist.launch.local import train_local

    # Training loss: nan at step 3 (the weights of step 2's update): the checkpoint of step 2
    # holds them, step 1's is the last good one.
    cfg = tiny_config(tmp_path, "train.lr=1e9", "train.max_steps=5", "train.warmup_steps=0", "train.eval_every=50",
                      "checkpoint.every_steps=1", "checkpoint.keep=5", "data.eval=null", "data.eval_fraction=0")
    with pytest.raises(UserError) as e:
        train_local(cfg, show_progress=False)
    run = tmp_path / "runs" / "t"
    message = str(e.value)
    assert "diverged" in message and "lower train.lr (now 1e+09" in message and "--restart" in message
    assert not (run / "final").exists() and not (run / "summary.json").exists()
    step = int(message.split(" at step ")[1].split()[0])
    saved = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").iterdir())
    assert max(saved) < step  # no checkpoint of the step that diverged
    good = [s for s in saved if s < step - 1]
    assert (f"the last good checkpoint is {run}/checkpoints/step-{good[-1]}" if good
            else "no checkpoint before it is left") in message
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "diverged" and all(
        r["loss"] == r["loss"] for r in events if "loss" in r)  # no nan reported as a result


def test_an_eval_loss_that_is_nan_stops_the_run_too(tmp_path):
    from ftdist.launch.local import train_local

    cfg = tiny_config(tmp_path, "train.lr=1e9", "train.max_steps=2", "train.warmup_steps=1", "train.eval_every=2",
                      "checkpoint.every_steps=1", "model.init.num_layers=2")
    with pytest.raises(UserError, match=r"the eval loss is nan at step 2 of 2: the run diverged.*"
                                        r"the last good checkpoint is .*step-1"):
        train_local(cfg, show_progress=False)
    assert not (tmp_path / "runs" / "t" / "final").exists()


def test_a_run_stopped_between_final_and_its_summary_finishes_from_final(tmp_path, capsys):
    from ftdist.launch.local import train_local

    cfg = tiny_config(tmp_path, "train.max_steps=2", "train.eval_every=2", "checkpoint.every_steps=1",
                      "model.init.num_layers=2")
    first = train_local(cfg, show_progress=False)
    run = tmp_path / "runs" / "t"
    (run / "summary.json").unlink()
    log = (run / "metrics.jsonl").read_text()
    again = train_local(cfg, show_progress=False)
    assert (run / "metrics.jsonl").read_text() == log  # not trained again
    assert "finishing from final/" in capsys.readouterr().err
    for key in ("steps", "tokens_seen", "eval_loss", "best_eval_loss", "eval_ppl", "method", "final_size_bytes"):
        assert again[key] == first[key], key
