"""Faults that once ended in a traceback, each now one `ftdist: error:` message naming the file,
key or flag and the fix: flags, config values, rows, chat templates that leave Jinja's sandbox,
permissions, a full disk (a file-size limit stands in for one) and HOME."""

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import pytest

from ftdist.data.chat_templates import check_choice, rendering
from ftdist.cli import build_parser
from ftdist.config.schema import SEED_MAX
from ftdist.errors import UserError, path_problem
from ftdist.data.records import RowReader, labels_of
from tests.conftest import DEMO, REPO, run_cli, tiny_config, write_config
from tests.unit.test_cli import assert_user_error

ESCAPE = "{{ messages.__class__.__mro__[1].__subclasses__() }}"


# ---------------------------------------------------------------- flags


@pytest.mark.parametrize("argv, flag", [
    (["plan", "c.yaml", "--gpu-memory", "0"], "--gpu-memory"),
    (["plan", "c.yaml", "--gpu-memory", "-5"], "--gpu-memory"),
    (["plan", "c.yaml", "--gpu-memory", "nan"], "--gpu-memory"),
    (["plan", "c.yaml", "--gpu-memory", "inf"], "--gpu-memory"),
    (["plan", "c.yaml", "--workers", "-1"], "--workers"),
    (["generate", "m", "--prompt", "hi", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["generate", "m", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "m", "--prompt", ""], "--prompt"),
    (["generate", "m", "--prompt", "hi", "--temperature", "-1"], "--temperature"),
    (["generate", "m", "--prompt", "hi", "--seed", str(SEED_MAX + 1)], "--seed"),
    (["generate", "m", "--prompt", "hi", "--seed", "-1"], "--seed"),
    (["classify", "m", "--text", "  "], "--text"),
])
def test_a_flag_out_of_range_is_refused_as_that_flag_in_one_line(argv, flag, capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"ftdist: error: {argv[0]}: argument {flag}: "), err
    assert f"see ftdist {argv[0]} --help" in err


def test_flags_in_range_are_taken():
    from ftdist import cli

    assert cli.SEED_MAX == SEED_MAX
    args = build_parser().parse_args(["plan", "c.yaml", "--gpu-memory", "24", "--workers", "0"])
    assert (args.gpu_memory, args.workers) == (24.0, 0)
    args = build_parser().parse_args(["generate", "m", "--prompt", "hi", "--temperature", "0", "--seed",
                                      str(SEED_MAX), "--max-new-tokens", "1"])
    assert (args.temperature, args.seed, args.max_new_tokens) == (0.0, SEED_MAX, 1)


def test_a_flag_error_through_the_command_is_one_message():
    result = run_cli("plan", "nope.yaml", "--gpu-memory", "nan")
    assert_user_error(result, "argument --gpu-memory", "finite")
    assert "usage:" not in result.stderr


# ---------------------------------------------------------------- config values


@pytest.mark.parametrize("override, needles", [
    ("train.seed=-1", ("train.seed", "4294967295")),
    (f"train.seed={SEED_MAX + 1}", ("train.seed", "4294967295")),
    ("lora.target_modules=[]", ("lora.target_modules", "all-linear")),
    ("train.lr=.inf", ("train.lr", "finite")),
    ("train.lr=.nan", ("train.lr",)),
    (f"data.train=[{{path: {DEMO / 'train.jsonl'}, weight: .inf}}, {{path: {DEMO / 'eval.jsonl'}, weight: 1}}]",
     ("data.train.0.weight", "finite")),
    ("run.name=" + "a" * 300, ("run.name", "at most 128 characters", "(300 characters)")),
])
def test_a_config_value_no_run_can_use_names_its_key(tmp_path, override, needles):
    with pytest.raises(UserError) as e:
        tiny_config(tmp_path, override)
    for needle in needles:
        assert needle in str(e.value), str(e.value)
    assert "valid string" not in str(e.value)  # not the other branch of data.train's union
    assert "a" * 100 not in str(e.value)  # a long value is cut


def test_the_largest_seed_is_taken(tmp_path):
    assert tiny_config(tmp_path, f"train.seed={SEED_MAX}").train.seed == SEED_MAX


# ---------------------------------------------------------------- rows


@pytest.mark.parametrize("line, field", [
    ('{"prompt": "a", "completion": "b \\ud800"}', '"completion"'),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "\\udc00"}]}',
     '"messages"[1]["content"]'),
    ('{"text": "t \\udfff", "label": "x"}', '"text"'),
])
def test_a_lone_surrogate_is_a_bad_row_naming_its_field(line, field):
    with pytest.raises(ValueError, match="lone UTF-16 surrogate") as e:
        RowReader().normalize(json.loads(line))
    assert str(e.value).startswith(field)


def test_a_surrogate_pair_is_text():
    assert RowReader().normalize(json.loads('{"prompt": "\\ud83d\\ude00", "completion": "ok"}'))[1]["prompt"] == "😀"


def test_a_lone_surrogate_in_a_file_names_the_line_and_can_be_skipped(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join((DEMO / "train.jsonl").read_text().splitlines()[:40])
                    + '\n{"prompt": "a", "completion": "\\ud800"}\n')
    with pytest.raises(UserError, match=f"{data}:41: .*surrogate.*data.skip_bad_rows"):
        RowReader().read(str(data))
    assert RowReader().read(str(data), skip_bad_rows=True)[2] == 1


def test_labels_that_only_look_like_integers_are_text():
    assert labels_of([{"label": "--1"}, {"label": "2"}, {"label": "²"}]) == ["--1", "2", "²"]
    assert labels_of([{"label": 10}, {"label": "-2"}, {"label": "3"}]) == ["-2", "3", "10"]


# ---------------------------------------------------------------- chat templates


@pytest.mark.parametrize("template, needle", [
    (ESCAPE, "reach outside Jinja's sandbox"),
    ("{% set _ = messages.append(1) %}{{ messages }}", "reach outside Jinja's sandbox"),
    ("{{ cycler.__init__.__globals__ }}", "reach outside Jinja's sandbox"),
    ("{% for m in messages %}{{ m.content }}", "not a valid Jinja template (line 1"),
])
def test_a_chat_template_file_that_escapes_or_breaks_is_told_before_the_run(tmp_path, template, needle):
    path = tmp_path / "t.jinja"
    path.write_text(template)
    with pytest.raises(UserError) as e:
        check_choice(str(path))
    assert str(e.value).startswith(f"data.chat_template {path}: ") and needle in str(e.value), str(e.value)


def test_templates_that_work_pass_preflight(tmp_path):
    path = tmp_path / "t.jinja"
    # transformers' {% generation %} tag, and a template that refuses other roles (raise_exception)
    path.write_text("{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}"
                    "{{ raise_exception('roles') }}{% endif %}{% generation %}{{ m.content }}{% endgeneration %}"
                    "{% endfor %}")
    check_choice(str(path))
    check_choice("chatml")
    check_choice(None)


def test_a_tokenizers_own_template_that_escapes_is_one_message_naming_it(tmp_path):
    from ftdist.data.rows import build_dataset
    from ftdist.data.tokenizer import train_tokenizer

    tokenizer = train_tokenizer((DEMO / "general.txt").read_text().split("\n\n"), 384)
    tokenizer.chat_template = "{% if messages | length > 1 %}" + ESCAPE + "{% endif %}"  # only with real rows
    cfg = tiny_config(tmp_path, f"data.train={DEMO / 'chat.jsonl'}", "data.eval=null")
    with pytest.raises(UserError, match="^the tokenizer's chat template: the template tried to reach outside "
                                        "Jinja's sandbox .*; set data.chat_template to one that works"):
        build_dataset(cfg.data, tokenizer, 0)


def test_rendering_tells_a_templates_own_refusal():
    from jinja2.exceptions import TemplateError

    with pytest.raises(UserError, match="^X: the template failed: roles must alternate; fix it$"):
        with rendering("X", "fix it"):
            raise TemplateError("roles must alternate")


# ---------------------------------------------------------------- permissions (as root: setpriv)


def without_root() -> list[str]:
    """What makes a command obey file permissions here: nothing for a user, setpriv for root."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("root without setpriv: permissions cannot be denied to this process")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


def run_unprivileged(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*without_root(), sys.executable, "-m", "ftdist", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_unreadable_data_and_an_unwritable_cache_are_named_by_their_keys(tmp_path):
    data = tmp_path / "locked.jsonl"
    shutil.copyfile(DEMO / "train.jsonl", data)
    data.chmod(0)
    path = write_config(tmp_path, tiny_config(tmp_path, f"data.train={data}"))
    assert_user_error(run_unprivileged("train", str(path), "--local"), "data.train: cannot read", str(data),
                      "Permission denied")
    shards = tmp_path / "shards"
    shards.mkdir()
    shutil.copyfile(DEMO / "train.jsonl", shards / "a.jsonl")
    shards.chmod(0)
    path = write_config(tmp_path, tiny_config(tmp_path, f"data.train={shards}"))
    assert_user_error(run_unprivileged("train", str(path), "--local"), f"data.train: cannot read {shards} ")
    cache = tmp_path / "locked-cache"
    cache.mkdir(mode=0o555)
    path = write_config(tmp_path, tiny_config(tmp_path, f"storage.cache_dir={cache}"))
    for command in (["train", str(path), "--local"], ["prepare", str(path)]):
        assert_user_error(run_unprivileged(*command), "storage.cache_dir: cannot write", str(cache))
    assert not (tmp_path / "runs").exists()


def test_report_on_a_read_only_run_directory(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 2.0 / s, "lr": 1e-3, "tokens_per_s": 100.0}) + "\n" for s in (1, 2, 3)))
    run.chmod(0o555)
    assert_user_error(run_unprivileged("report", str(run)), f"{run}: cannot write the report", "Permission denied",
                      "cp -r")
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]


# ---------------------------------------------------------------- a full disk


@contextmanager
def file_size_limit(limit: int):
    """This process's writes past `limit` bytes fail with EFBIG, as on a full disk (SIGXFSZ
    ignored, as the CLI does); the limit lifted after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_full_disk_while_writing_the_prepared_rows_keeps_no_half(tmp_path):
    from ftdist.data.rows import Rows
    from ftdist.data.prepared import save

    class Dataset:  # what save reads of one
        format, stats = "text", {}
        train = Rows({n: np.zeros(100_000, np.int32) for n in ("ids", "targets", "positions", "doc")},
                     np.array([0, 100_000]))
        eval = retention = replay = None

    where = tmp_path / "prepared" / "key" / "tok"
    with file_size_limit(64 * 1024), pytest.raises(UserError) as e:
        save(Dataset(), where, tmp_path)
    assert str(e.value).startswith("storage.cache_dir: the prepared rows: no room to write it in")
    assert "File too large" in str(e.value) and "run the same command again" in str(e.value)
    assert not where.exists() and list(where.parent.iterdir()) == []  # no staging directory left


def test_a_full_disk_while_writing_final_keeps_the_checkpoints_and_says_where_a_rerun_starts(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from ftdist.model.source import init_model_config
    from ftdist.training.outputs import save_final
    from ftdist.data.tokenizer import train_tokenizer

    cfg = tiny_config(tmp_path)
    run = tmp_path / "runs" / "t"
    step = run / "checkpoints" / "step-20"
    step.mkdir(parents=True)
    (step / "COMPLETE").write_text("{}")
    tokenizer = train_tokenizer((DEMO / "general.txt").read_text().split("\n\n"), 384)
    model = AutoModelForCausalLM.from_config(init_model_config(cfg.model.init, tokenizer), dtype=torch.float32)
    with file_size_limit(64 * 1024), pytest.raises(UserError) as e:
        save_final(run, cfg, model, tokenizer, "base")
    assert str(e.value).startswith(f"final/ (the trained model): no room to write it in {run} (File too large)")
    assert "it resumes from step-20" in str(e.value)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"] and (step / "COMPLETE").is_file()


def test_a_full_disk_while_building_base_leaves_no_half_base(tmp_path):
    from ftdist.training.base import no_room_for_base

    def build(cfg, base):  # as build_initial_model: aside, then renamed
        tmp = base.with_name("base.tmp")
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"x" * 200_000)
        tmp.rename(base)

    base = tmp_path / "base"
    with file_size_limit(64 * 1024), pytest.raises(UserError, match="^base/ .*: no room to write it in"):
        no_room_for_base(build, "the initial weights of model.init")(tiny_config(tmp_path), base)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- HOME, and what the net catches


def test_home_that_is_not_a_directory_is_named(tmp_path, monkeypatch):
    from ftdist.data.prepared import check_cache_dir

    monkeypatch.setenv("HOME", "/dev/null")
    cfg = tiny_config(tmp_path, "storage.cache_dir=~/.cache/ftdist")
    with pytest.raises(UserError, match=r"^storage.cache_dir: cannot write /dev/null/\.cache/ftdist/prepared "
                                        r"\(Not a directory\); ~/.cache/ftdist is under HOME, and HOME "
                                        r"\(/dev/null\) is not a directory"):
        check_cache_dir(cfg)
    check_cache_dir(tiny_config(tmp_path, f"storage.cache_dir={tmp_path / 'cache'}"))


def test_os_errors_the_user_fixes_are_told_others_are_not():
    told = path_problem(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/x"))
    assert told.startswith("/data/x: No space left on device; free space there")
    assert path_problem(PermissionError(errno.EACCES, "Permission denied", "/a", None, "/b")).startswith(
        "/a (to /b): Permission denied; give this user access")
    assert "File too large" in path_problem(RuntimeError("Error while serializing: I/O error (os error 27)"))
    assert path_problem(OSError(errno.EBADF, "Bad file descriptor")) is None
    assert path_problem(RuntimeError("os error 9")) is None
    assert path_problem(ValueError("no")) is None


def test_an_os_error_anywhere_in_a_command_is_one_message(tmp_path, monkeypatch, capsys):
    from ftdist import cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setitem(cli.__dict__, "cmd_report", full)
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"ftdist: error: {tmp_path / 'x'}: No space left on device; free space there, or point ftdist " \
                  "at another disk, and run the same command again\n"
