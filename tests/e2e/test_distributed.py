"""Ray Train + DeepSpeed on 2 CPU workers against local mode, once per objective and kind of
weights: SFT with QLoRA (ZeRO-2, checkpointing every second block, every tracker; the adapters'
path with a 4-bit base), a classifier (full, top blocks: ZeRO-3, the head gathered), DPO with full
fine-tuning of a base with tied embeddings (ZeRO-3: the tied tensor and the frozen reference
partitioned; the untied case is in the matrix) resumed by 1 worker; and the plain engine
(distributed.engine: plain) data-parallel on 2 workers, resumed in local mode, and DeepSpeed in
local mode (a world of one process). The other stages and
cases run in `make test-all` (tests/matrix/test_distributed_matrix.py); the cases and checks are in
tests/distributed_cases.py."""

import shutil

import pytest
from safetensors.torch import load_file

from ftdist.config.load import load_config
from ftdist.errors import UserError
from ftdist.io.metrics_log import read_metrics
from ftdist.launch.ray_train import train_ray
from tests.conftest import ONE_RAY_AT_A_TIME, foreign_lines, run_cli, tiny_config, write_config
from tests.distributed_cases import (  # noqa: F401 (the shared tests, the fixture and the parametrization)
    REL_TOL,
    check_only_rank_0_reports_to_the_trackers,
    check_preference_resume_at_another_world_size,
    curve,
    equivalence_config,
    local_reference,
    pytest_generate_tests,
    runs,
    test_a_classifier_on_two_workers_matches_local_mode,
    test_preference_tuning_on_two_workers_matches_local_mode,
    test_two_workers_match_local_mode,
)

pytestmark = [pytest.mark.slow, pytest.mark.ray, ONE_RAY_AT_A_TIME]

LM_CASES = [("qlora", 2)]
CLASSIFIER_STAGES = (3,)
DPO_CASES = ("full-3-tied",)


def test_the_plain_engine_on_two_workers_matches_local_mode_and_resumes_there(tmp_path, tmp_path_factory,
                                                                             pretrained_base, ray_local):
    """distributed.engine: plain on 2 Ray workers: gradients all-reduced, every state whole on each
    worker (the anchors' penalty summed once). Local mode's curve and final adapters; its
    checkpoint, written by rank 0, resumes in local mode (one process) to the same curve. First in
    the module: it runs alone, before the shared cases start."""
    base = pretrained_base("llama")
    cfg = equivalence_config(tmp_path, "qlora", base, "distributed.engine=plain", name="ray-plain")
    result = run_cli("train", str(write_config(tmp_path, cfg)), "--address", ray_local.get_runtime_context().gcs_address,
                     timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not foreign_lines(result.stdout, result.stderr), result.stdout + result.stderr
    assert "plan: 2 workers on cpu (gloo), plain engine (data-parallel" in result.stdout
    run_dir = tmp_path / "runs" / "ray-plain"
    start = read_metrics(run_dir / "metrics.jsonl")[0]
    assert start["world_size"] == 2 and start["shard_rows"] == 32  # every row on each worker, half of each batch
    local = local_reference(tmp_path_factory, "qlora", base)
    for key in ("loss", "eval_loss", "forgetting", "penalty", "grad_norm"):
        ours, theirs = curve(run_dir, key), curve(local, key)
        assert len(ours) == len(theirs) >= 2 and ours == pytest.approx(theirs, rel=REL_TOL, abs=1e-6), key
    ours = load_file(str(run_dir / "final" / "adapter_model.safetensors"))
    theirs = load_file(str(local / "final" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys() and ours
    for key in ours:
        assert float((ours[key] - theirs[key]).norm()) <= 1e-2 * float(theirs[key].norm()) + 1e-6, key
    checkpoint = run_dir / "checkpoints" / "step-4"
    assert sorted(p.name for p in checkpoint.iterdir() if not p.name.startswith(("rng-", "done-"))) == \
        ["COMPLETE", "adapter", "metrics.jsonl", "optimizer.pt", "scheduler.pt", "state.json"]

    # As if stopped after step 4's checkpoint, resumed by one process: the plain layout loads at any world size.
    copy = tmp_path / "resumed" / "ray-plain"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "final")
    shutil.rmtree(copy / "checkpoints" / "step-8", ignore_errors=True)
    resumed = load_config(run_dir / "config.yaml", [f"run.output={copy.parent}", "distributed.workers=0"])
    result = run_cli("train", str(write_config(tmp_path, resumed, "resumed.yaml")), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    events = [(r["from_world_size"], r["world_size"], r["engine"]) for r in read_metrics(copy / "metrics.jsonl")
              if r.get("event") == "resume"]
    assert events == [(2, 1, "plain")]
    for key in ("loss", "eval_loss", "penalty"):
        assert curve(copy, key) == pytest.approx(curve(local, key), rel=REL_TOL, abs=1e-6), key


def test_deepspeed_in_local_mode_matches_the_plain_engine(tmp_path, tmp_path_factory, pretrained_base):
    """distributed.engine: deepspeed with --local: ZeRO-2 in a world of one process (gloo), the
    4-bit base's adapters and their anchors' fragments: the plain engine's curve and adapters."""
    base = pretrained_base("llama")
    cfg = equivalence_config(tmp_path, "qlora", base, "distributed.engine=deepspeed", "distributed.zero_stage=2",
                             name="local-deepspeed")
    result = run_cli("train", str(write_config(tmp_path, cfg)), "--local", timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not foreign_lines(result.stdout, result.stderr), result.stdout + result.stderr
    run_dir = tmp_path / "runs" / "local-deepspeed"
    assert any(p.name.startswith("zero_pp_rank_0_") for p in (run_dir / "checkpoints" / "step-4").rglob("*.pt"))
    local = local_reference(tmp_path_factory, "qlora", base)
    for key in ("loss", "eval_loss", "forgetting", "penalty"):
        ours, theirs = curve(run_dir, key), curve(local, key)
        assert len(ours) == len(theirs) >= 2 and ours == pytest.approx(theirs, rel=REL_TOL, abs=1e-6), key
    assert curve(run_dir, "grad_norm") == pytest.approx(curve(local, "grad_norm"), rel=1e-2)
    ours = load_file(str(run_dir / "final" / "adapter_model.safetensors"))
    theirs = load_file(str(local / "final" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys() and ours
    for key in ours:
        assert float((ours[key] - theirs[key]).norm()) <= 1e-2 * float(theirs[key].norm()) + 1e-6, key


def test_only_rank_0_reports_to_the_trackers(runs, mlflow_server):
    check_only_rank_0_reports_to_the_trackers(runs, mlflow_server)


def test_a_preference_run_resumes_at_another_world_size(tmp_path, tmp_path_factory, pretrained_base, runs, ray_local):
    check_preference_resume_at_another_world_size(tmp_path, tmp_path_factory, pretrained_base, runs, ray_local,
                                                  "full-3-tied")


def test_preflight_refuses_a_run_that_cannot_fit_before_any_worker(tmp_path, ray_local, capsys):
    huge = ["model.init.hidden_size=8192", "model.init.num_layers=48", "model.init.num_heads=64",
            "model.init.vocab_size=128000", "distributed.zero_stage=0"]
    cfg = tiny_config(tmp_path, *huge, name="huge")
    with pytest.raises(UserError) as refused:
        train_ray(cfg)
    message = str(refused.value)
    assert "per cpu device" in message and "weights" in message and "optimizer" in message
    assert "distributed.zero_stage" in message
    assert "use method: qlora" in message
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_placement_the_cluster_cannot_meet_is_refused(tmp_path, ray_local):
    cfg = tiny_config(tmp_path, "distributed.placement=STRICT_SPREAD", name="spread")
    with pytest.raises(UserError, match="STRICT_SPREAD .* 1 nodes"):
        train_ray(cfg)
    cfg = tiny_config(tmp_path, "distributed.workers=5", name="many")
    with pytest.raises(UserError, match="need 5 CPU but the Ray cluster has 4"):
        train_ray(cfg)
