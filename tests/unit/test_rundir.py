"""The run directory never costs a user a file: ftdist writes only into directories it created
(its marker is there), and --restart deletes only what ftdist writes. Fast: no training."""

import pytest

from ftdist.errors import UserError
from ftdist.io.layout import RUN_MARKER
from ftdist.launch.rundir import TUNE_RESUMABLE_CHANGES, prepare_run_dir
from tests.conftest import DEMO, run_cli, tiny_config, write_config


def test_a_new_run_directory_gets_the_marker_and_the_snapshot(tmp_path):
    store = prepare_run_dir(tiny_config(tmp_path), restart=False)
    assert (store.local / RUN_MARKER).is_file() and (store.local / "config.yaml").is_file()
    prepare_run_dir(tiny_config(tmp_path), restart=False)  # the same run again: resumed, not refused


def test_an_empty_existing_directory_is_adopted(tmp_path):
    (tmp_path / "runs" / "t").mkdir(parents=True)
    store = prepare_run_dir(tiny_config(tmp_path), restart=False)
    assert (store.local / RUN_MARKER).is_file()


@pytest.mark.parametrize("restart", [False, True])
def test_a_users_folder_is_refused_and_left_as_it_was(tmp_path, restart):
    """run.name names the folder that holds the user's data: neither a first run nor
    --restart may write or delete there."""
    folder = tmp_path / "work" / "mydata"
    folder.mkdir(parents=True)
    for name in ("train.jsonl", "eval.jsonl"):
        (folder / name).write_text((DEMO / name).read_text())
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    cfg = tiny_config(tmp_path, f"run.output={folder.parent}", name="mydata")
    with pytest.raises(UserError, match="is not empty .* not an ftdist run"):
        prepare_run_dir(cfg, restart=restart)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_restart_deletes_only_what_ftdist_wrote(tmp_path):
    store = prepare_run_dir(tiny_config(tmp_path), restart=False)
    run = store.local
    written = [run / "metrics.jsonl", run / "summary.json", run / "loss.png", run / "checkpoints" / "step-1" / "x",
               run / "final" / "ftdist.json", run / "base" / "config.json"]
    for path in written:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("ftdist's")
    mine = [run / "notes.md", run / "analysis" / "plot.py"]
    for path in mine:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("the user's")
    prepare_run_dir(tiny_config(tmp_path, "train.lr=1e-4"), restart=True)  # another config: allowed with restart
    assert not any(p.exists() for p in written)
    assert all(p.read_text() == "the user's" for p in mine)
    assert (run / RUN_MARKER).is_file() and "0.0001" in (run / "config.yaml").read_text()


def test_tune_restart_removes_trials_but_not_the_users_folders(tmp_path):
    cfg = tiny_config(tmp_path, name="search")  # <run.output>/<tune.name>: the experiment's directory
    store = prepare_run_dir(cfg, restart=False, resumable=TUNE_RESUMABLE_CHANGES)
    experiment = store.local
    trial = tiny_config(tmp_path, f"run.output={experiment}", name="trial-00001")
    prepare_run_dir(trial, restart=False)
    (experiment / "trial-00001" / "metrics.jsonl").write_text("{}")
    (experiment / "results.csv").write_text("trial")
    (experiment / "tuner").mkdir()
    (experiment / "trial-00002").mkdir()  # a trial-N/ without ftdist's marker is not ftdist's
    (experiment / "trial-00002" / "mine.txt").write_text("the user's")
    prepare_run_dir(cfg, restart=True, resumable=TUNE_RESUMABLE_CHANGES)
    assert not (experiment / "trial-00001").exists() and not (experiment / "results.csv").exists()
    assert not (experiment / "tuner").exists()
    assert (experiment / "trial-00002" / "mine.txt").read_text() == "the user's"


def test_the_cli_refuses_with_one_message_and_deletes_nothing(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text((DEMO / "train.jsonl").read_text())
    cfg = tiny_config(tmp_path, f"run.output={tmp_path}", f"data.train={folder / 'train.jsonl'}", name="data")
    result = run_cli("train", str(write_config(tmp_path, cfg)), "--local", "--restart")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("ftdist: error:") == 1 and "not an ftdist run" in result.stderr
    assert (folder / "train.jsonl").read_text() == (DEMO / "train.jsonl").read_text()
    assert [p.name for p in folder.iterdir()] == ["train.jsonl"]


def test_a_damaged_snapshot_is_named_and_kept(tmp_path):
    store = prepare_run_dir(tiny_config(tmp_path), restart=False)
    snapshot = store.local / "config.yaml"
    snapshot.write_text("run: {name: t\nmodel: [")
    with pytest.raises(UserError, match=r"config.yaml: the run's config snapshot is not valid YAML.*--restart"):
        prepare_run_dir(tiny_config(tmp_path), restart=False)
    assert snapshot.read_text() == "run: {name: t\nmodel: ["
    prepare_run_dir(tiny_config(tmp_path), restart=True)  # the way out the message names
    assert "lr: 0.003" in snapshot.read_text()


def test_a_corrected_config_starts_a_run_whose_first_attempt_saved_no_checkpoint(tmp_path, capsys):
    prepare_run_dir(tiny_config(tmp_path, "train.lr=1.0"), restart=False)  # say it failed before step 1
    store = prepare_run_dir(tiny_config(tmp_path), restart=False)
    assert "saved no checkpoint; starting with this config" in capsys.readouterr().err
    assert "lr: 0.003" in (store.local / "config.yaml").read_text()
    (store.local / "checkpoints" / "step-10").mkdir(parents=True)  # now there is progress to protect
    with pytest.raises(UserError, match=r"different config \(train.lr\)"):
        prepare_run_dir(tiny_config(tmp_path, "train.lr=1.0"), restart=False)


def test_a_run_started_before_a_key_existed_resumes_when_the_key_is_at_its_default(tmp_path):
    """A snapshot written by an older ftdist lacks the keys added since; at their defaults they
    are no change (an upgrade never strands a run), set otherwise they are."""
    import yaml

    store = prepare_run_dir(tiny_config(tmp_path), restart=False)
    snapshot = store.local / "config.yaml"
    older = yaml.safe_load(snapshot.read_text())
    del older["task"], older["classification"], older["storage"]["prepared_url"]
    snapshot.write_text(yaml.safe_dump(older, sort_keys=False))
    (store.local / "checkpoints" / "step-10").mkdir(parents=True)
    prepare_run_dir(tiny_config(tmp_path), restart=False)  # resumed
    snapshot.write_text(yaml.safe_dump(older, sort_keys=False))
    with pytest.raises(UserError, match=r"different config \(classification.pooling\)"):
        prepare_run_dir(tiny_config(tmp_path, "classification.pooling=mean"), restart=False)
