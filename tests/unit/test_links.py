"""Writes through links (issue 35): inside a run directory, an export and the cache, ftdist
writes, renames and deletes only files and directories it made, never through a symbolic link;
a link where it would write is refused with one message naming it, its target untouched."""

import os
import threading
from pathlib import Path

import pytest

from ftdist.io import safewrite
from ftdist.errors import UserError
from ftdist.launch.local import train_local
from ftdist.launch.rundir import prepare_run_dir
from tests.conftest import run_cli, tiny_config, write_config

QUICK = ("train.max_steps=2", "checkpoint.every_steps=1", "train.eval_every=2", "model.init.num_layers=1")


def users_folder(tmp_path: Path) -> tuple[Path, dict]:
    """A user's folder with a file in it, and its contents to compare with afterwards."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    return folder, snapshot(folder)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- the helpers


def test_a_file_is_never_opened_through_a_link_a_fifo_or_a_second_hard_link(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    target = tmp_path / "user.txt"
    target.write_text("the user's")
    (root / "log").symlink_to(target)
    with pytest.raises(UserError, match=r"log is a symbolic link \(to .*user.txt\) where ftdist writes the log"):
        safewrite.open_file(root / "log", root, "the log", "a")
    os.mkfifo(root / "fifo")
    done = []
    thread = threading.Thread(target=lambda: done.append(pytest.raises(UserError, safewrite.write_text, root / "fifo",
                                                                       root, "x", "y")), daemon=True)
    thread.start()
    thread.join(10)
    assert done, "opening a FIFO to write hung"
    os.link(target, root / "hard")
    with pytest.raises(UserError, match="second hard link"):
        safewrite.write_text(root / "hard", root, "x", "overwritten")
    assert target.read_text() == "the user's"


def test_dirs_are_made_deleted_and_renamed_never_through_a_link(tmp_path):
    root, (folder, before) = tmp_path / "run", users_folder(tmp_path)
    root.mkdir()
    (root / "checkpoints").symlink_to(folder)
    with pytest.raises(UserError, match="checkpoints is a symbolic link"):
        safewrite.make_dirs(root / "checkpoints" / "step-1", root, "a checkpoint")
    with pytest.raises(UserError, match="checkpoints is a symbolic link"):
        safewrite.remove(root / "checkpoints", root, "a checkpoint")
    with pytest.raises(UserError, match="checkpoints is a symbolic link"):
        safewrite.write_text(root / "checkpoints" / "x", root, "a checkpoint", "x")
    (root / "made").mkdir()
    with pytest.raises(UserError, match="checkpoints is a symbolic link"):
        safewrite.rename(root / "made", root / "checkpoints", root, "a checkpoint")
    assert snapshot(folder) == before and (root / "checkpoints").is_symlink()
    # Inside a tree ftdist deletes, a link goes (a library's own, say), its target stays.
    (root / "made" / "latest-run").symlink_to(folder)
    safewrite.remove(root / "made", root, "a tree")
    assert not (root / "made").exists() and snapshot(folder) == before
    # The path to the root is the user's own: a link there is fine.
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "via").symlink_to(tmp_path / "elsewhere")
    safewrite.make_dirs(tmp_path / "via" / "run", tmp_path / "via", "x")
    safewrite.write_text(tmp_path / "via" / "run" / "f", tmp_path / "via" / "run", "x", "ok")
    assert (tmp_path / "elsewhere" / "run" / "f").read_text() == "ok"


# ---------------------------------------------------------------- a run


@pytest.mark.parametrize("planted", ["metrics.jsonl", "final.tmp", "checkpoints", "tensorboard", "summary.json"])
def test_a_link_planted_in_a_run_is_refused_and_what_it_points_at_is_untouched(tmp_path, planted):
    cfg = tiny_config(tmp_path, *QUICK, "logging.tensorboard=true")
    store = prepare_run_dir(cfg, restart=False)
    folder, before = users_folder(tmp_path)
    target = folder / "thesis.tex" if planted.endswith((".jsonl", ".json")) else folder
    (store.local / planted).symlink_to(target)
    with pytest.raises(UserError, match=rf"{planted} is a symbolic link \(to {target}\) where ftdist writes"):
        train_local(cfg, show_progress=False)
    assert snapshot(folder) == before and (store.local / planted).is_symlink()


def test_restart_never_deletes_through_a_link(tmp_path):
    cfg = tiny_config(tmp_path)
    store = prepare_run_dir(cfg, restart=False)
    folder, before = users_folder(tmp_path)
    (store.local / "final").symlink_to(folder)
    with pytest.raises(UserError, match="final is a symbolic link"):
        prepare_run_dir(cfg, restart=True)
    assert snapshot(folder) == before


def test_a_run_directory_that_is_a_link_is_refused_naming_its_target(tmp_path):
    folder, before = users_folder(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "t").symlink_to(folder)
    cfg = tiny_config(tmp_path)
    with pytest.raises(UserError, match=rf"runs/t is a symbolic link \(to {folder}\).*run.output {tmp_path}, "
                                        "run.name mine"):
        prepare_run_dir(cfg, restart=True)
    assert snapshot(folder) == before
    # A link in run.output itself is the user's choice of where runs go.
    (tmp_path / "disk").mkdir()
    (tmp_path / "linked-runs").symlink_to(tmp_path / "disk")
    store = prepare_run_dir(tiny_config(tmp_path, f"run.output={tmp_path / 'linked-runs'}"), restart=False)
    assert (tmp_path / "disk" / "t" / "config.yaml").is_file() and store.local == tmp_path / "disk" / "t"


def test_the_prepared_cache_is_never_written_through_a_link(tmp_path):
    from ftdist.data.prepared import cache_root, data_key, remember_validated

    cfg = tiny_config(tmp_path, f"storage.cache_dir={tmp_path / 'cache'}")
    folder, before = users_folder(tmp_path)
    cache_root(cfg).mkdir(parents=True)
    (cache_root(cfg) / data_key(cfg)).symlink_to(folder)
    with pytest.raises(UserError, match="is a symbolic link"):
        remember_validated(cfg, "prompt_completion", 0)
    assert snapshot(folder) == before


# ---------------------------------------------------------------- export


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("run")
    return Path(train_local(tiny_config(tmp, *QUICK), show_progress=False)["run_dir"])


def test_an_export_into_a_link_is_refused_and_leaves_nothing_behind(tmp_path, finished_run):
    from ftdist.artifacts.export import export

    folder = tmp_path / "models"
    folder.mkdir()
    (tmp_path / "out").symlink_to(folder)
    with pytest.raises(UserError, match=rf"--out {tmp_path / 'out'} is a symbolic link \(to {folder}\).*--out {folder}"):
        export(str(finished_run), str(tmp_path / "out"), force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "out"] and not any(folder.iterdir())
    export(str(finished_run), str(folder / "export"))  # the link's target, given itself: written
    assert (folder / "export" / "ftdist.json").is_file()
    assert [p.name for p in folder.iterdir()] == ["export"]  # no staging directory left beside it


def test_the_cli_refuses_a_planted_metrics_link_with_one_message(tmp_path):
    cfg = tiny_config(tmp_path, *QUICK)
    store = prepare_run_dir(cfg, restart=False)
    folder, before = users_folder(tmp_path)
    (store.local / "metrics.jsonl").symlink_to(folder / "thesis.tex")
    result = run_cli("train", str(write_config(tmp_path, cfg)), "--local")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [x for x in result.stderr.splitlines() if x.startswith("ftdist: error:")]
    assert len(errors) == 1 and "metrics.jsonl is a symbolic link" in errors[0]
    assert snapshot(folder) == before
