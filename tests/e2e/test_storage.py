"""Runs on object storage, against a real S3 server (moto_server on loopback), in local mode:
everything lands in the bucket, a killed driver resumes from the store on a fresh machine,
an outage is ridden out, a store gone for good stops the run with the local copy kept,
partial checkpoints are never resumed from, and credentials never show."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftdist.config.schema import StorageConfig
from ftdist.io.metrics_log import read_metrics
from ftdist.io.storage import RunStore
from ftdist.training.checkpoint import prune
from tests.conftest import (
    DEMO,
    FAKE_SECRET,
    REPO,
    paused,
    run_cli,
    start_cli,
    tiny_config,
    wait_until,
    write_config,
)
from tests.gguf_files import tiny_hf_llama, write_gguf
from tests.trackers import tensorboard_scalars

pytestmark = pytest.mark.s3


def logged_steps(path: Path) -> list[int]:
    return [r["step"] for r in read_metrics(path) if "loss" in r]


def complete_steps(s3, run: str) -> list[int]:
    root = s3.url("runs", run, "checkpoints")
    if not s3.fs.exists(root):
        return []
    steps = [int(p.rsplit("-", 1)[1]) for p in s3.fs.ls(root) if s3.fs.exists(f"{p}/COMPLETE")]
    return sorted(steps)


@pytest.mark.slow
def test_a_run_on_s3_writes_everything_to_the_store_and_reports_adapter_sizes(tmp_path, s3, pretrained_base):
    train = s3.put(DEMO / "train.jsonl", "data", "train.jsonl")
    evaluation = s3.put(DEMO / "eval.jsonl", "data", "eval.jsonl")
    base = s3.put(pretrained_base("llama"), "models", "base")
    cfg = tiny_config(tmp_path, "method=lora", "lora.rank=2", "model.init=null", f"model.name_or_path={base}",
                      f"data.train={train}", f"data.eval={evaluation}", "train.max_steps=6",
                      "checkpoint.every_steps=3", "train.eval_every=3", "logging.tensorboard=true",
                      "logging.wandb.project=s3", "logging.wandb.mode=offline", *s3.overrides(), name="lora-s3")
    config = write_config(tmp_path, cfg)
    result = run_cli("train", str(config), "--local")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out

    run = s3.url("runs", "lora-s3")
    names = {p.rsplit("/", 1)[1] for p in s3.fs.ls(run)}
    assert {"config.yaml", "metrics.jsonl", "summary.json", "final", "loss.png", "checkpoints"} <= names
    assert s3.fs.exists(f"{run}/final/adapter_model.safetensors") and s3.fs.exists(f"{run}/final/ftdist.json")
    checkpoint = f"{run}/checkpoints/step-3"
    files = {p.rsplit("/", 1)[1] for p in s3.fs.ls(checkpoint)}
    assert {"COMPLETE", "done-0", "state.json", "adapter", "optimizer.pt", "rng-0.safetensors"} <= files
    assert "model.safetensors" not in files  # adapters only: the base is not in the checkpoint
    assert f"done: model in {run}/final" in result.stdout
    # The trackers' files are in the bucket too: TensorBoard's events, W&B's offline run, their ids.
    assert {"tensorboard", "wandb", "tracking.json"} <= names
    s3.fs.get(f"{run}/tensorboard", str(tmp_path / "tb"), recursive=True)
    assert [step for step, _ in tensorboard_scalars(tmp_path / "tb")["loss"]] == [1, 2, 3, 4, 5, 6]
    assert s3.fs.glob(f"{run}/wandb/offline-run-*/run-*.wandb")

    # The checkpoint's size, next to the base model's: megabytes against (here) a few more.
    summary = json.loads(s3.fs.cat_file(f"{run}/summary.json"))
    assert 0 < summary["checkpoint_bytes"] < summary["base_model_bytes"] / 3  # rank 2 on a 64-wide model
    assert "checkpoint step 3 complete:" in result.stdout and "(adapters and their optimizer state; the base model is" in result.stdout

    # The local copy is a cache: nothing of the run needs it once the run is finished.
    again = run_cli("train", str(config), "--local")
    assert again.returncode == 0 and "already finished" in again.stdout

    # Export straight from the store: the adapters of final/, and a merged standalone model.
    export_dir = tmp_path / "export"
    exported = run_cli("export", run, "--out", str(export_dir), "--endpoint-url", s3.relay.url)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    (tmp_path / "final.safetensors").write_bytes(s3.fs.cat_file(f"{run}/final/adapter_model.safetensors"))
    ours, theirs = load_file(str(export_dir / "adapter_model.safetensors")), load_file(str(tmp_path / "final.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    merged = run_cli("export", run, "--out", str(tmp_path / "merged"), "--merge", "--endpoint-url", s3.relay.url)
    assert merged.returncode == 0 and (tmp_path / "merged" / "model.safetensors").is_file(), merged.stderr

    # Credentials never appear: not in the output, the snapshot, the log or the local cache.
    texts = [out, again.stdout, again.stderr, s3.fs.cat_file(f"{run}/config.yaml").decode(),
             s3.fs.cat_file(f"{run}/metrics.jsonl").decode()]
    texts += [p.read_text(errors="ignore") for p in s3.cache.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", ".yaml", ".txt")]
    assert not any(FAKE_SECRET in t for t in texts)


def test_a_gguf_object_in_the_store_becomes_the_runs_base_in_the_store(tmp_path, s3):
    """model.name_or_path: s3://.../x.gguf, fetched once into the cache, dequantized into base/,
    which goes into the run's store with the rest: an export on another machine merges onto it."""
    hf = tiny_hf_llama(tmp_path / "hf", tied=True)
    gguf = s3.put(write_gguf(hf, tmp_path / "tiny.gguf", "Q8_0"), "models", "tiny.gguf")
    cfg = tiny_config(tmp_path, "method=lora", "model.init=null", f"model.name_or_path={gguf}", "train.max_steps=2",
                      "checkpoint.every_steps=2", "train.eval_every=2", *s3.overrides(), name="gguf-s3")
    result = run_cli("train", str(write_config(tmp_path, cfg)), "--local")
    assert result.returncode == 0, result.stdout + result.stderr
    run = s3.url("runs", "gguf-s3")
    assert json.loads(s3.fs.cat_file(f"{run}/base/config.json"))["tie_word_embeddings"] is True
    assert s3.fs.exists(f"{run}/base/tokenizer.json") and s3.fs.exists(f"{run}/base/chat_template.jinja")
    assert list(s3.cache.rglob("tiny-*.gguf"))  # fetched once into the cache
    merged = run_cli("export", run, "--out", str(tmp_path / "merged"), "--merge", "--endpoint-url", s3.relay.url)
    assert merged.returncode == 0 and (tmp_path / "merged" / "model.safetensors").is_file(), merged.stderr


@pytest.mark.slow
def test_a_killed_driver_resumes_from_the_store_on_a_fresh_machine_never_from_a_partial_checkpoint(tmp_path, s3):
    common = ("train.max_steps=60", "checkpoint.every_steps=10", "train.log_every=1", "train.eval_every=20",
              "checkpoint.keep=2")
    cfg = tiny_config(tmp_path, *common, *s3.overrides(), name="killed")
    config = write_config(tmp_path, cfg)
    proc = start_cli("train", str(config), "--local")
    local_log = Path(wait_until(lambda: next(s3.cache.rglob("rank-0/metrics.jsonl"), None), 120, "the run's log", proc))
    complete = wait_until(lambda: complete_steps(s3, "killed"), 120, "a complete checkpoint in the store", proc)
    wait_until(lambda: len(logged_steps(local_log)) >= complete[-1] + 3, 60, "steps past the checkpoint", proc)
    with paused([proc.pid]):  # it cannot finish before it is killed
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = logged_steps(local_log)[-1]
    newest = complete_steps(s3, "killed")[-1]
    assert killed_at < 60, "the run finished before it was killed"

    # What a cut upload leaves behind: a newer step directory with some of the files and a
    # done marker, but no COMPLETE. It must never be resumed from.
    run = s3.url("runs", "killed")
    cut = f"{run}/checkpoints/step-{newest + 10}"
    s3.fs.pipe_file(f"{cut}/state.json", json.dumps({"step": newest + 10}).encode())
    s3.fs.pipe_file(f"{cut}/done-0", b"{}")
    s3.fs.pipe_file(f"{cut}/model.safetensors", b"cut short")
    shutil.rmtree(s3.cache)  # a fresh machine: only the store is left

    result = run_cli("train", str(config), "--local")
    assert result.returncode == 0, result.stdout + result.stderr
    records = [json.loads(x) for x in s3.fs.cat_file(f"{run}/metrics.jsonl").decode().splitlines()]
    resumes = [r for r in records if r.get("event") == "resume"]
    assert [r["checkpoint"] for r in resumes] == [f"step-{newest}"]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 61))  # every step exactly once, those after the checkpoint redone
    assert all(s3.fs.exists(f"{run}/checkpoints/{d.rsplit('/', 1)[1]}/COMPLETE") for d in s3.fs.ls(f"{run}/checkpoints"))

    # The same model as a run that was never interrupted.
    plain = tiny_config(tmp_path, *common, name="uninterrupted")
    assert run_cli("train", str(write_config(tmp_path, plain, "plain.yaml")), "--local").returncode == 0
    resumed = s3.fs.cat_file(f"{run}/final/model.safetensors")
    (tmp_path / "resumed.safetensors").write_bytes(resumed)
    a = load_file(str(tmp_path / "resumed.safetensors"))
    b = load_file(str(tmp_path / "runs" / "uninterrupted" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:  # the same steps on the same batches with restored optimizer and RNG state
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def start_until_step(tmp_path: Path, s3, name: str, step: int, *overrides: str) -> tuple[subprocess.Popen, Path]:
    """`ftdist train --local` in the background on the bucket, once `step` is logged: (process, local log)."""
    cfg = tiny_config(tmp_path, "train.max_steps=400", "train.log_every=1", *overrides, *s3.overrides(), name=name)
    proc = start_cli("train", str(write_config(tmp_path, cfg)), "--local")
    local_log = Path(wait_until(lambda: next(s3.cache.rglob("rank-0/metrics.jsonl"), None), 120, "the run's log", proc))
    wait_until(lambda: len(logged_steps(local_log)) >= step, 120, f"step {step}", proc)
    return proc, local_log


@pytest.mark.slow
def test_an_outage_during_an_upload_is_ridden_out_without_stopping_training(tmp_path, s3):
    proc, local_log = start_until_step(tmp_path, s3, "outage", 60, "checkpoint.every_steps=100", "train.eval_every=1000")
    s3.relay.down()  # the checkpoint at step 100 is written while the store is away
    down_at, down_since = logged_steps(local_log)[-1], time.monotonic()
    wait_until(lambda: list(s3.cache.rglob("rank-0/checkpoints/step-100/rng-0.safetensors")), 120,
               "the checkpoint at step 100 staged locally", proc)
    # The store stays away for at least 4 s and 40 steps past step 100: training must go on meanwhile.
    wait_until(lambda: time.monotonic() - down_since > 4 and logged_steps(local_log)[-1] > 140, 120,
               "40 steps past the staged checkpoint with the store away", proc)
    steps_while_down = logged_steps(local_log)[-1] - down_at
    assert not complete_steps(s3, "outage")
    s3.relay.up()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert steps_while_down > 40, steps_while_down  # training went on
    records = [json.loads(x) for x in s3.fs.cat_file(s3.url("runs", "outage", "metrics.jsonl")).decode().splitlines()]
    done = {r["step"]: r for r in records if r.get("event") == "checkpoint"}
    assert {100, 200, 300} <= set(done)
    assert done[100]["seconds"] > 2  # it waited for the store and retried, then completed
    assert complete_steps(s3, "outage") == [200, 300]  # keep: 2 (no eval yet, so no best to keep)


@pytest.mark.slow
def test_a_store_gone_past_the_deadline_stops_the_run_with_the_local_copy_kept(tmp_path, s3):
    proc, _ = start_until_step(tmp_path, s3, "gone", 10, "checkpoint.every_steps=50", "storage.retry_deadline_s=2")
    s3.relay.down()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out
    assert "Traceback" not in out
    message = [line for line in out.splitlines() if line.startswith("ftdist: error:")]
    assert len(message) == 1 and "did not answer for 2 s (storage.retry_deadline_s)" in message[0], out
    kept = next(s3.cache.rglob("rank-0/checkpoints/step-50"), None)
    assert kept is not None, out
    assert str(kept.parent) in message[0] and (kept / "model.safetensors").is_file() and (kept / "optimizer.pt").is_file()


@pytest.mark.slow
def test_missing_credentials_and_a_missing_bucket_are_one_clear_message(tmp_path, s3):
    cfg = tiny_config(tmp_path, "train.max_steps=2", *s3.overrides(), name="creds")
    config = write_config(tmp_path, cfg)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true")
    result = subprocess.run([sys.executable, "-m", "ftdist", "train", str(config), "--local"], cwd=REPO,
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "no AWS credentials found" in result.stderr and "AWS_ACCESS_KEY_ID" in result.stderr

    cfg = tiny_config(tmp_path, "train.max_steps=2", *s3.overrides(), "run.output=s3://no-such-bucket/runs", name="nb")
    result = run_cli("train", str(write_config(tmp_path, cfg, "nb.yaml")), "--local")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "s3://no-such-bucket/runs/nb" in result.stderr and FAKE_SECRET not in result.stderr + result.stdout


def test_prune_keeps_the_newest_and_the_best_and_drops_partial_leftovers(tmp_path):
    store = RunStore(str(tmp_path), tmp_path, StorageConfig())
    losses = {10: 2.0, 20: 0.5, 30: 1.0, 40: 1.5, 50: 1.2}
    for step, loss in losses.items():
        store.write_text(f"checkpoints/step-{step}/COMPLETE", json.dumps({"eval_loss": loss}))
    store.write_text("checkpoints/step-15/done-0", "{}")  # a dead partial, older than the newest
    store.write_text("checkpoints/step-60/done-0", "{}")  # one in progress: left alone
    prune(store, keep=2)
    left = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "checkpoints").iterdir())
    assert left == [20, 40, 50, 60]  # the newest two, the best (step 20), the one in progress


def test_a_store_that_does_not_answer_is_told_at_its_first_failure(capsys):
    from ftdist.io.storage import retrying

    failures = iter([ConnectionError("connection refused"), ConnectionError("connection refused")])

    def flaky() -> str:
        error = next(failures, None)
        if error:
            raise error
        return "answered"

    assert retrying(flaky, "reading s3://b/k", deadline_s=30) == "answered"
    lines = [x for x in capsys.readouterr().err.splitlines() if x]
    assert lines == ["ftdist: warning: reading s3://b/k: the object store does not answer (ConnectionError: connection refused); "
                     "retrying for up to 30 s (storage.retry_deadline_s)"]


def test_a_throttling_store_is_retried_like_an_outage_and_a_permission_error_is_not(s3):
    import threading
    import time

    from ftdist.config.schema import StorageConfig
    from ftdist.errors import UserError
    from ftdist.io.storage import filesystem, retrying

    storage = StorageConfig(endpoint_url=s3.relay.url, region="us-east-1", retry_deadline_s=60)
    fs = filesystem(s3.url(), storage)
    target = s3.url("throttled.txt")
    s3.relay.answer_with((503, "SlowDown"))
    threading.Timer(3, s3.relay.answer_with, (None,)).start()
    started = time.monotonic()
    retrying(lambda: fs.pipe_file(target, b"written"), f"writing {target}", storage.retry_deadline_s)
    assert time.monotonic() - started >= 2.5  # it was throttled, then retried through (s3fs's own tries, then ours)
    assert s3.fs.cat_file(target) == b"written"
    s3.relay.answer_with((403, "AccessDenied"))
    with pytest.raises(UserError, match="access denied; check the AWS credentials"):
        retrying(lambda: fs.pipe_file(target, b"again"), f"writing {target}", storage.retry_deadline_s)
    s3.relay.answer_with(None)
    assert s3.fs.cat_file(target) == b"written"


def test_an_s3_run_has_one_writer_by_its_lease_which_a_dead_holder_does_not_keep(s3, tmp_path, monkeypatch):
    """The lease object: a second writer is refused naming the first; a lease past its expiry, or
    whose holder on this host is gone, is taken over; the holder's renewals keep it; released, it goes."""
    from ftdist.errors import UserError
    from ftdist.io import runlock
    from ftdist.io.layout import LEASE_FILE
    from ftdist.launch.rundir import check_free, writing

    monkeypatch.setattr(runlock, "LEASE_RENEW_S", 0.2)
    cfg = tiny_config(tmp_path, *s3.overrides())
    lease = s3.url("runs", "t", LEASE_FILE)
    with writing(cfg) as store:
        first = json.loads(s3.fs.cat_file(lease))
        assert first["pid"] == os.getpid() and first["expires"] > time.time()
        wait_until(lambda: json.loads(s3.fs.cat_file(lease))["expires"] > first["expires"], 10, "a renewal")
        for attempt in (lambda: check_free(cfg), lambda: writing(cfg).__enter__()):
            with pytest.raises(UserError, match=rf"{store.url} is being written by `.*` \(pid {os.getpid()} on "):
                attempt()
    assert not s3.fs.exists(lease)
    for stale in ({"host": "elsewhere", "pid": 1, "expires": time.time() - 1},  # expired
                  {"host": __import__("socket").gethostname(), "pid": 2**22 + 7, "expires": time.time() + 600}):
        s3.fs.pipe_file(lease, json.dumps({**stale, "command": "ftdist train old.yaml", "token": "old"}).encode())
        with writing(cfg):
            assert json.loads(s3.fs.cat_file(lease))["pid"] == os.getpid()
    s3.fs.pipe_file(lease, json.dumps({"host": "elsewhere", "pid": 1, "command": "ftdist train other.yaml",
                                       "since": "then", "token": "x", "expires": time.time() + 600}).encode())
    with pytest.raises(UserError, match=r"being written by `ftdist train other.yaml` \(pid 1 on elsewhere"):
        with writing(cfg):
            pass
