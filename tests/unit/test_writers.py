"""Two writers, one run (issue 35): a run directory, a search's directory and each prepared-cache
entry have one writer at a time, held by a lock a process that ended does not keep; a second
writer is refused naming the holder; train and tune never take each other's directory."""

import json
import signal
import subprocess
import sys
import threading
import time

import pytest

from ftdist.io import runlock
from ftdist.errors import UserError
from ftdist.io.layout import LOCK_FILE, RUN_MARKER
from ftdist.launch.rundir import SEARCH, TUNE_RESUMABLE_CHANGES, check_free, prepare_run_dir, writing
from tests.conftest import REPO, run_cli, tiny_config, wait_until, write_config

HOLD = """
import sys, time
from pathlib import Path
from ftdist.io import runlock
lock = Path(sys.argv[1])
sys.argv = ["ftdist", "train", "holder.yaml", "--set", "logging.mlflow.tracking_uri=http://u:secret@h"]
runlock.lock_file(lock, lambda h: "busy")
print("held", flush=True)
time.sleep(120)
"""


def holder_process(lock) -> subprocess.Popen:
    """Another process that holds the lock file `lock` (as a running `ftdist train` does)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_keeps_nothing(tmp_path):
    cfg = tiny_config(tmp_path)
    store = prepare_run_dir(cfg, restart=False)
    proc = holder_process(store.local / LOCK_FILE)
    try:
        for attempt in (lambda: check_free(cfg), lambda: writing(cfg).__enter__(),
                        lambda: writing(cfg, restart=True).__enter__()):
            with pytest.raises(UserError, match=rf"{store.url} is being written by `ftdist train holder.yaml` "
                                                rf"\(pid {proc.pid} on .*, since .*\); a run has one writer at a time"):
                attempt()
        assert (store.local / "config.yaml").is_file()  # --restart deleted nothing
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    with writing(cfg, restart=True) as again:  # the OS dropped the killed holder's lock
        holder = json.loads((again.local / LOCK_FILE).read_text())
        assert holder["pid"] == __import__("os").getpid()
    assert (store.local / LOCK_FILE).read_text() == ""  # released: names nobody
    check_free(cfg)


def test_the_lock_is_this_commands_for_its_whole_run_and_let_go_after(tmp_path):
    cfg = tiny_config(tmp_path)
    with writing(cfg) as store:
        assert runlock.lock_holder(store.local / LOCK_FILE)["pid"] == __import__("os").getpid()
        with pytest.raises(UserError, match="is being written by"):
            with writing(cfg):
                pass
    assert runlock.lock_holder(store.local / LOCK_FILE) is None
    assert set(p.name for p in store.local.iterdir()) == {RUN_MARKER, "config.yaml", LOCK_FILE}


def test_train_and_tune_never_take_each_others_directory(tmp_path):
    run = tiny_config(tmp_path, name="exp")
    prepare_run_dir(run, restart=False)
    with pytest.raises(UserError, match=r"runs/exp is a training run's directory \(`ftdist train`\), and `ftdist "
                                        "tune` never writes into it.*set tune.name to another name"):
        check_free(run, SEARCH)
    search = tiny_config(tmp_path, name="search")
    store = prepare_run_dir(search, restart=False, resumable=TUNE_RESUMABLE_CHANGES, kind=SEARCH)
    snapshot = (store.local / "config.yaml").read_text()
    for restart in (False, True):
        with pytest.raises(UserError, match=r"runs/search is a tune search's directory \(`ftdist tune`\), and "
                                            "`ftdist train` never writes into it.*set run.name"):
            prepare_run_dir(tiny_config(tmp_path, "train.lr=0.5", name="search"), restart=restart)
    assert (store.local / "config.yaml").read_text() == snapshot
    # Nor into a trial of it; the search's own trials write there.
    trial = tiny_config(tmp_path, f"run.output={store.local}", name="trial-00001")
    with pytest.raises(UserError, match="is a tune search's directory: its trial-N runs are the search's"):
        prepare_run_dir(trial, restart=False)
    prepare_run_dir(trial, restart=False, trial=True)
    # A search's directory from before markers had a kind: told by its tuner/ and trials.
    (store.local / RUN_MARKER).write_text(json.dumps({"ftdist": "0.1"}))
    with pytest.raises(UserError, match="is a tune search's directory"):
        check_free(tiny_config(tmp_path, name="search"))


def test_restart_refuses_while_an_export_reads_the_run(tmp_path):
    cfg = tiny_config(tmp_path)
    store = prepare_run_dir(cfg, restart=False)
    (store.local / "summary.json").write_text("{}")
    with runlock.reading(store.local, store.url):
        with pytest.raises(UserError, match="is being read by another process .*ftdist export"):
            prepare_run_dir(cfg, restart=True)
        assert (store.local / "summary.json").is_file()
    with runlock.deleting(store.local, store.url):
        with pytest.raises(UserError, match="is being restarted"):
            with runlock.reading(store.local, store.url):
                pass
    prepare_run_dir(cfg, restart=True)
    assert not (store.local / "summary.json").exists()


def test_a_second_preparer_of_the_same_rows_waits_for_the_first_then_reads_them(tmp_path, monkeypatch, capsys):
    from ftdist.data import prepared

    cfg = tiny_config(tmp_path, f"storage.cache_dir={tmp_path / 'cache'}")
    where = prepared.cache_root(cfg) / "k" / "t"
    with prepared.entry_lock(cfg, where):
        monkeypatch.setattr(prepared, "WAIT_S", 0.3)
        with pytest.raises(UserError, match=rf"{where}: `ftdist .*` \(pid \d+ .*\) has been preparing these rows for "
                                            "more than 0 s"):
            with prepared.entry_lock(cfg, where):
                pass
    monkeypatch.setattr(prepared, "WAIT_S", 30)
    first = prepared.entry_lock(cfg, where)
    first.__enter__()
    threading.Timer(0.5, first.__exit__, (None, None, None)).start()
    started = time.monotonic()
    with prepared.entry_lock(cfg, where):
        assert time.monotonic() - started >= 0.4
    assert "is preparing the same rows" in capsys.readouterr().err


def test_two_trains_of_one_run_the_second_is_refused_with_one_message(tmp_path):
    cfg = tiny_config(tmp_path)
    store = prepare_run_dir(cfg, restart=False)
    proc = holder_process(store.local / LOCK_FILE)
    try:
        result = run_cli("train", str(write_config(tmp_path, cfg)), "--local")
    finally:
        proc.kill()
        proc.wait(30)
    errors = [x for x in result.stderr.splitlines() if x.startswith("ftdist: error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1 and f"pid {proc.pid}" in errors[0], result.stderr
    assert not (store.local / "metrics.jsonl").exists()
    wait_until(lambda: runlock.lock_holder(store.local / LOCK_FILE) is None, 30, "the holder's lock to go")


@pytest.mark.parametrize("argv, told", [
    (["/venv/bin/ftdist", "train", "a.yaml", "--set", "x=secret"], "ftdist train a.yaml"),
    (["/repo/ftdist/__main__.py", "tune", "s.yaml"], "ftdist tune s.yaml"),
    (["/repo/ftdist/__main__.py", "train", "--set", "x=secret", "a.yaml"], "ftdist train"),
    (["/usr/bin/python3", "-c"], "ftdist (in python3)"),
    ([], "ftdist (in python)"),
])
def test_a_lock_names_its_holder_by_command_and_config_never_other_arguments(argv, told):
    from ftdist.io.runlock import holder_command

    assert holder_command(argv) == told
