"""The run directory never costs a user a file: ftdist writes only into directories it created
(its marker is there), and --restart deletes only what ftdist writes. Fast: no training."""

import pytest

from ftdist.errors import UserError
from ftdist.io.layout import RUN_MARKER
from ftdist.launch.rundir import prepare_run_dir
from tests.conftest import tiny_config


@pytest.mark.s3
def test_the_same_rules_on_object_storage(tmp_path, s3):
    s3.fs.pipe_file(s3.url("runs", "mine", "data.csv"), b"the user's")
    with pytest.raises(UserError, match="not an ftdist run"):
        prepare_run_dir(tiny_config(tmp_path, *s3.overrides(), name="mine"), restart=True)
    assert s3.fs.cat_file(s3.url("runs", "mine", "data.csv")) == b"the user's"

    cfg = tiny_config(tmp_path, *s3.overrides(), name="run")
    prepare_run_dir(cfg, restart=False)
    s3.fs.pipe_file(s3.url("runs", "run", "metrics.jsonl"), b"{}")
    s3.fs.pipe_file(s3.url("runs", "run", "checkpoints", "step-1", "COMPLETE"), b"{}")
    s3.fs.pipe_file(s3.url("runs", "run", "notes.md"), b"the user's")
    prepare_run_dir(cfg, restart=True)
    names = {p.rsplit("/", 1)[-1] for p in s3.fs.ls(s3.url("runs", "run"))}
    assert names == {RUN_MARKER, "config.yaml", "notes.md"}
