"""Ray Train + DeepSpeed on 2 CPU workers (gloo), against local mode: the cases and their checks,
shared by tests/e2e/test_distributed.py (one Ray run per method and objective) and
tests/matrix/test_distributed_matrix.py (every other ZeRO stage x method x objective, both elastic chains).

Equivalence: every step's global batch is the whole training set (32 rows, no packing),
so the two modes see exactly the same examples at every step whatever the sharding;
only the order of float sums differs (gloo all-reduce, DeepSpeed's gradient buckets and
ZeRO partitions). We allow a relative difference of 1e-3 per logged loss: float32
summation noise after a few Adam steps is around 1e-6..1e-5 here, a hundred times
smaller, while one step changes the loss by several percent, so a wrong gradient scale
(e.g. a missing 1/world_size or 1/accumulation) or a dropped shard fails by far.
"""

import json
import re
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftdist.config.load import load_config
from ftdist.config.schema import Config
from ftdist.io.metrics_log import read_metrics
from ftdist.launch.local import train_local
from tests.conftest import (
    DEMO,
    foreign_lines,
    paused,
    ray_session_dir,
    run_cli,
    small_data,
    start_cli,
    tiny_config,
    train_worker_pids,
    wait_until,
    write_config,
)

REL_TOL = 1e-3
METHOD_LR = {"full": "3e-3", "lora": "1e-2", "qlora": "1e-2"}
# Every method and every ZeRO stage: full at ZeRO-2 and ZeRO-3 also runs in the elastic chains
# below (across world sizes); each run costs most of half a minute of Ray start-up.
CASES = [("full", 0), ("lora", 1), ("qlora", 2), ("lora", 3)]
# Gradient checkpointing changes what is kept for the backward, never the curve: on under the
# two adapter stages where it meets DeepSpeed's gradient hooks (ZeRO-2) and gathered weights (ZeRO-3).
CHECKPOINTING = {("qlora", 2): "2", ("lora", 3): "true"}
# Against forgetting: the anchors' pull on each rank's share of the weights (replicated at ZeRO-0,
# fragments at ZeRO-1/2, partitions at ZeRO-3; the full runs also resume at another world
# size below) and replay's rows split across ranks. Logged: what must match local mode too.
REGULARIZATION = {
    "full": ("regularization.l2sp=3", "regularization.ewc.weight=1e5", "regularization.ewc.samples=8",
             f"regularization.replay.data={DEMO / 'general.txt'}", "regularization.replay.fraction=0.2"),
    "lora": ("regularization.l2sp=3", "regularization.ewc.weight=1e5", "regularization.ewc.samples=8"),
    "qlora": ("regularization.l2sp=3",),
}
LOGGED = {"full": ("penalty", "anchor_distance", "replay_loss"), "lora": ("penalty", "anchor_distance"),
          "qlora": ("penalty",)}
# One case also reports to every tracker: only rank 0 opens them (test_tracking checks what they hold).
TRACKED = ("qlora", 2)


def equivalence_config(tmp_path: Path, method: str, base: Path | None, *extra: str, name: str,
                       steps: int = 8) -> Config:
    train, eval_ = small_data(tmp_path)
    model = ("model.init=null", f"model.name_or_path={base}") if base else ()
    return tiny_config(tmp_path, f"method={method}", f"train.lr={METHOD_LR[method]}", *model,
                       f"data.train={train}", f"data.eval={eval_}", "data.packing=false",
                       f"data.retention={DEMO / 'general.txt'}", *REGULARIZATION[method],
                       "train.batch_size=32", "train.micro_batch_size=4", f"train.max_steps={steps}",
                       "train.warmup_steps=2", "train.eval_every=4", "train.log_every=1",
                       "checkpoint.every_steps=4", "distributed.workers=2", "distributed.max_failures=0",
                       "lora.dropout=0",  # dropout masks are random per rank: not comparable
                       *extra, name=name)


def curve(run_dir: Path, key: str) -> list[float]:
    return [r[key] for r in read_metrics(run_dir / "metrics.jsonl") if key in r]


_local_runs: dict = {}


def local_reference(tmp_path_factory, method: str, base: Path | None, steps: int = 8) -> Path:
    if (method, steps) not in _local_runs:
        tmp = tmp_path_factory.mktemp(f"local-{method}")
        cfg = equivalence_config(tmp, method, base, name=f"local-{method}", steps=steps)
        _local_runs[method, steps] = Path(train_local(cfg, show_progress=False)["run_dir"])
    return _local_runs[method, steps]


def start_cases(tmp_path_factory, ray_local, pretrained_base, mlflow_server, lm_cases, classifier_stages,
                dpo_cases) -> dict:
    """The given cases' runs through the CLI on the session's Ray, two at a time (the session's Ray
    has 4 logical CPUs on the 2 cores): most of a tiny run's wall time is Ray's start-up and
    scheduling latency, which two runs overlap. Case -> future of (CLI result, run directory);
    LM cases are (method, stage), the others ("classification", stage) and ("dpo", name)."""
    # Built here, in the main thread, before the runs' threads start (training installs signal handlers).
    bases = {tied: pretrained_base("llama", tied) for tied in {False, *(DPO_CASES[case][3] for case in dpo_cases)}}
    base = bases[False]
    address = ray_local.get_runtime_context().gcs_address

    def run(method: str, stage: int):
        tmp = tmp_path_factory.mktemp(f"ray-{method}-{stage}")
        tracked = ("logging.tensorboard=true", f"logging.mlflow.tracking_uri={mlflow_server.url}",
                   "logging.mlflow.experiment=ray", "logging.wandb.project=ray", "logging.wandb.mode=offline")
        cfg = equivalence_config(tmp, method, None if method == "full" else base, f"distributed.zero_stage={stage}",
                                 f"train.gradient_checkpointing={CHECKPOINTING.get((method, stage), 'false')}",
                                 *(tracked if (method, stage) == TRACKED else ()), name=f"ray-{method}-{stage}")
        return run_cli("train", str(write_config(tmp, cfg)), "--address", address, timeout=900), tmp / "runs" / cfg.run.name

    def classify(stage: int):
        tmp = tmp_path_factory.mktemp(f"ray-classify-{stage}")
        cfg = classification_equivalence_config(tmp, base, "distributed.workers=2", f"distributed.zero_stage={stage}",
                                                name=f"ray-classify-{stage}")
        return run_cli("train", str(write_config(tmp, cfg)), "--address", address, timeout=900), tmp / "runs" / cfg.run.name

    def prefer(case: str):
        method, stage, precompute, tied = DPO_CASES[case]
        tmp = tmp_path_factory.mktemp(f"ray-dpo-{case}")
        cfg = dpo_equivalence_config(tmp, bases[tied], method, "distributed.workers=2",
                                     f"distributed.zero_stage={stage}",
                                     f"dpo.precompute_reference={str(precompute).lower()}", name=f"ray-dpo-{case}")
        return run_cli("train", str(write_config(tmp, cfg)), "--address", address, timeout=900), tmp / "runs" / cfg.run.name

    pool = ThreadPoolExecutor(max_workers=2)
    futures = {**{case: pool.submit(run, *case) for case in lm_cases},
               **{("classification", stage): pool.submit(classify, stage) for stage in classifier_stages},
               **{("dpo", case): pool.submit(prefer, case) for case in dpo_cases}}
    pool.shutdown(wait=False)
    return futures


def classification_equivalence_config(tmp_path: Path, base: Path, *extra: str, name: str) -> Config:
    """A classifier with its top blocks and new head trained (mean pooling), on 32 rows a step:
    the whole set every step, as equivalence_config's LM runs."""
    from tests.unit.test_classification import topic_rows, write_rows

    train = write_rows(tmp_path / "train.jsonl", topic_rows(32, 0))
    eval_ = write_rows(tmp_path / "eval.jsonl", topic_rows(16, 1))
    return tiny_config(tmp_path, "task=classification", "classification.pooling=mean", "method=full",
                       "freeze_layers=2", "model.init=null", f"model.name_or_path={base}", f"data.train={train}",
                       f"data.eval={eval_}", "data.packing=false", "train.lr=1e-3", "train.batch_size=32",
                       "train.micro_batch_size=4", "train.max_steps=8", "train.warmup_steps=2", "train.eval_every=4",
                       "train.log_every=1", "checkpoint.every_steps=4", "distributed.max_failures=0", *extra,
                       name=name)


CLASSIFIER_STAGES = (2, 3)

# Preference tuning (objective dpo): name -> (method, ZeRO stage, precompute_reference, tied). The full
# run's frozen reference partitioned like the policy (ZeRO-3), adapters switched off (ZeRO-2; a
# 4-bit base at ZeRO-0), and the reference's log-probs computed before training on each worker's shard.
# Tied: a base whose LM head is its input embeddings (tie_word_embeddings, as SmolLM2's), one tensor
# partitioned under ZeRO-3, in the policy and in its frozen copy, and saved once.
DPO_CASES = {"full-3": ("full", 3, False, False), "full-3-tied": ("full", 3, False, True),
             "lora-2": ("lora", 2, False, False), "full-2-precomputed": ("full", 2, True, False),
             "qlora-0": ("qlora", 0, False, False)}
DPO_LOGGED = ("loss", "rewards_chosen", "rewards_rejected", "reward_margin", "logps_chosen", "eval_loss",
              "eval_reward_accuracy", "eval_reward_margin")


def dpo_equivalence_config(tmp_path: Path, base: Path, method: str, *extra: str, name: str) -> Config:
    """32 pairs, one a row: the whole set every step, as equivalence_config's LM runs."""
    from tests.unit.test_preference import rule_pairs, write_rows

    train = write_rows(tmp_path / "pairs-train.jsonl", rule_pairs(32, 0))
    eval_ = write_rows(tmp_path / "pairs-eval.jsonl", rule_pairs(16, 1))
    return tiny_config(tmp_path, "objective=dpo", f"method={method}", "model.init=null", f"model.name_or_path={base}",
                       f"data.train={train}", f"data.eval={eval_}", "data.packing=false", "data.max_length=32",
                       f"train.lr={'5e-4' if method == 'full' else '1e-2'}", "train.batch_size=32",
                       "train.micro_batch_size=4", "train.max_steps=8", "train.warmup_steps=2", "train.eval_every=4",
                       "train.log_every=1", "checkpoint.every_steps=4", "distributed.max_failures=0",
                       "lora.dropout=0", *extra, name=name)


_dpo_local_runs: dict = {}


def dpo_local_reference(tmp_path_factory, method: str, base: Path) -> Path:
    """Local mode's run of a method on a base (its reference not precomputed: the same numbers,
    see test_preference)."""
    if (method, base) not in _dpo_local_runs:
        tmp = tmp_path_factory.mktemp(f"local-dpo-{method}")
        cfg = dpo_equivalence_config(tmp, base, method, name=f"local-dpo-{method}")
        _dpo_local_runs[method, base] = Path(train_local(cfg, show_progress=False)["run_dir"])
    return _dpo_local_runs[method, base]


def check_preference_case(tmp_path_factory, pretrained_base, runs: dict, case: str) -> None:
    """A DPO case on 2 workers: local mode's loss, rewards and evaluations, and final weights."""
    method, stage, precompute, tied = DPO_CASES[case]
    result, run_dir = runs["dpo", case].result()
    assert result.returncode == 0, result.stdout + result.stderr
    assert not foreign_lines(result.stdout, result.stderr), result.stdout + result.stderr
    copy = method == "full" and not precompute  # the estimate counts the frozen copy, a rank's share of it
    assert bool(re.search(r"memory \(estimate\): .*reference [\d.]+, activations", result.stdout)) == copy
    local = dpo_local_reference(tmp_path_factory, method, pretrained_base("llama", tied))
    for key in DPO_LOGGED:  # rewards start at 0: near it, an absolute 1e-4 (a 4-bit base's rounding)
        ours, theirs = curve(run_dir, key), curve(local, key)
        assert len(ours) == len(theirs) >= 2 and ours == pytest.approx(theirs, rel=REL_TOL, abs=1e-4), key
    assert curve(run_dir, "loss")[0] == pytest.approx(0.6931472, abs=1e-5) and curve(run_dir, "eval_reward_margin")[-1] > 0
    # The final weights, each within 1% of local mode's by norm: Adam's steps of about lr * sign(gradient)
    # let float rounding (a 4-bit base's most) show element by element where a gradient is near 0.
    name = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    ours, theirs = load_file(str(run_dir / "final" / name)), load_file(str(local / "final" / name))
    assert ours.keys() == theirs.keys() and ours
    for key in ours:
        assert float((ours[key] - theirs[key]).norm()) <= 1e-2 * float(theirs[key].norm()) + 1e-6, key
    if tied:  # gathered from the ZeRO-3 partitions, the tie kept: the tensor saved once, the config tied
        config = json.loads((run_dir / "final" / "config.json").read_text())
        assert config["tie_word_embeddings"] is True and "lm_head.weight" not in ours
        assert "model.embed_tokens.weight" in ours


def check_preference_resume_at_another_world_size(tmp_path, tmp_path_factory, pretrained_base, runs: dict,
                                                  ray_local, case: str) -> None:
    """A full ZeRO-3 DPO run of 2 workers, as if killed after step 4's checkpoint, resumed by 1
    worker: the policy's states re-partitioned (DeepSpeed's universal checkpoint) and the frozen
    reference built again from the start; the same curve as local mode."""
    import shutil

    tied = DPO_CASES[case][3]
    result, run_dir = runs["dpo", case].result()
    assert result.returncode == 0, result.stdout + result.stderr
    copy = tmp_path / "runs" / run_dir.name
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "final")
    # The run's own config (its data where it wrote it), where the copy lies, on 1 worker.
    cfg = load_config(run_dir / "config.yaml", [f"run.output={tmp_path / 'runs'}", "distributed.workers=1"])
    result = run_cli("train", str(write_config(tmp_path, cfg)), "--address",
                     ray_local.get_runtime_context().gcs_address, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    resumes = [(r["from_world_size"], r["world_size"]) for r in read_metrics(copy / "metrics.jsonl")
               if r.get("event") == "resume"]
    assert resumes == [(2, 1)] and "resuming from" in result.stdout
    local = dpo_local_reference(tmp_path_factory, "full", pretrained_base("llama", tied))
    for key in DPO_LOGGED:
        assert curve(copy, key) == pytest.approx(curve(local, key), rel=REL_TOL, abs=1e-4), key


def check_classifier_case(tmp_path, pretrained_base, runs: dict, stage: int) -> None:
    """The new head's gradients partitioned (ZeRO-2), or the head gathered in its forward and
    saved whole (ZeRO-3): the same curve, the same accuracy and the same final weights as one
    process."""
    result, run_dir = runs["classification", stage].result()
    assert result.returncode == 0, result.stdout + result.stderr
    assert not foreign_lines(result.stdout, result.stderr), result.stdout + result.stderr
    local = Path(train_local(classification_equivalence_config(tmp_path, pretrained_base("llama"), name="local"),
                             show_progress=False)["run_dir"])
    for key in ("loss", "eval_loss", "eval_accuracy", "eval_macro_f1"):
        ours, theirs = curve(run_dir, key), curve(local, key)
        assert len(ours) == len(theirs) > 2 and ours == pytest.approx(theirs, rel=REL_TOL), key
    ours, theirs = load_file(str(run_dir / "final" / "model.safetensors")), load_file(str(local / "final" / "model.safetensors"))
    assert ours.keys() == theirs.keys() and "score.weight" in ours
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-2, atol=1e-4, msg=key)


def check_lm_case(tmp_path_factory, pretrained_base, runs: dict, method: str, stage: int) -> None:
    """An SFT case on 2 workers: the plan line, local mode's curves (loss, evaluations, forgetting,
    the regularizers' figures, the gradient norm), checkpoints and final weights."""
    result, run_dir = runs[method, stage].result()
    assert result.returncode == 0, result.stdout + result.stderr
    local = local_reference(tmp_path_factory, method, None if method == "full" else pretrained_base("llama"))
    # Nothing on the terminal but ftdist's own lines; the plan and the memory estimate come
    # first, before any worker starts.
    assert not foreign_lines(result.stdout, result.stderr), result.stdout + result.stderr
    out = result.stdout
    assert out.index(f"plan: 2 workers on cpu (gloo), DeepSpeed ZeRO-{stage}, placement PACK; global batch 32 = "
                     "2 workers x 4 accumulation steps x micro batch 4") < out.index("model: ")
    assert re.search(r"memory \(estimate\): weights [\d.]+, gradients [\d.]+, optimizer [\d.]+, anchors [\d.]+, "
                     r"activations [\d.]+ = [\d.]+ GiB per device", out)

    start = read_metrics(run_dir / "metrics.jsonl")[0]
    # Each worker holds all 32 rows (small data) and takes its half of each global batch.
    assert start["world_size"] == 2 and start["shard_rows"] == 32
    for key in ("loss", "eval_loss", "forgetting", *LOGGED[method]):
        ours, theirs = curve(run_dir, key), curve(local, key)
        assert len(ours) == len(theirs) >= 2
        assert ours == pytest.approx(theirs, rel=REL_TOL, abs=1e-6), key
    assert curve(run_dir, "loss")[-1] < 0.9 * curve(run_dir, "loss")[0]
    assert curve(run_dir, "grad_norm") == pytest.approx(curve(local, "grad_norm"), rel=1e-2)  # before clipping
    # Checkpoints hold every rank's DeepSpeed files and are marked complete.
    ckpt = run_dir / "checkpoints" / "step-4"
    assert (ckpt / "COMPLETE").is_file() and (ckpt / "rng-0.safetensors").is_file() \
        and (ckpt / "rng-1.safetensors").is_file()

    # The final model is a normal HF / PEFT directory (consolidated under ZeRO-3), equal to local mode's.
    final, local_final = run_dir / "final", local / "final"
    name = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    ours, theirs = load_file(str(final / name)), load_file(str(local_final / name))
    assert ours.keys() == theirs.keys() and ours
    for key in ours:
        assert ours[key].shape == theirs[key].shape, key
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-2, atol=1e-4, msg=key)
    if method != "full":  # adapters trained, not the zero-initialised B matrices
        assert any(float(t.abs().max()) > 0 for k, t in ours.items() if "lora_B" in k)


def check_only_rank_0_reports_to_the_trackers(runs: dict, mlflow_server) -> None:
    from tests.trackers import tensorboard_scalars, wandb_history

    result, run_dir = runs[TRACKED].result()
    assert result.returncode == 0, result.stdout + result.stderr
    logged = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    client = mlflow_server.client()
    runs = client.search_runs([client.get_experiment_by_name("ray").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # one run, though two workers trained
    assert (runs[0].data.tags["workers"], runs[0].data.tags["zero_stage"]) == ("2", str(TRACKED[1]))
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")) == logged
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert [s for s, _ in tensorboard_scalars(run_dir / "tensorboard")["loss"]] == logged
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    assert [s for s, _ in wandb_history(run_dir, "loss")] == logged


# Workers per driver, every driver but the last SIGKILLed: ZeRO-2 goes from 2 workers to 1,
# ZeRO-3 from 1 to 2.
ELASTIC = {2: [2, 1], 3: [1, 2]}


def check_killed_drivers_resume_from_s3_at_another_world_size(tmp_path, tmp_path_factory, ray_local, s3) -> None:
    """For each ZeRO family, drivers one after another on one run in the store, each but the last
    SIGKILLed once a new checkpoint is complete, each with another number of workers: DeepSpeed's
    universal checkpoint re-partitions the ZeRO states. The curve and the final weights must
    still be local mode's (see the module docstring for the tolerance). The two families' runs
    go side by side, as the matrix's do."""
    steps = 16
    local = local_reference(tmp_path_factory, "full", None, steps=steps)
    address = ray_local.get_runtime_context().gcs_address

    def drive(stage: int) -> str:
        name = f"elastic-{stage}"
        (tmp_path / name).mkdir()
        cfg = equivalence_config(tmp_path / name, "full", None, f"distributed.zero_stage={stage}", *s3.overrides(),
                                 f"train.gradient_checkpointing={'true' if stage == 3 else 'false'}", name=name,
                                 steps=steps)
        config = str(write_config(tmp_path / name, cfg))
        run = s3.url("runs", name)

        def complete() -> list[int]:
            root = f"{run}/checkpoints"
            found = s3.fs.ls(root) if s3.fs.exists(root) else []
            return sorted(int(p.rsplit("-", 1)[1]) for p in found if s3.fs.exists(f"{p}/COMPLETE"))

        newest = 0
        *killed, last = ELASTIC[stage]
        for workers in killed:
            proc = start_cli("train", config, "--address", address, "--set", f"distributed.workers={workers}")
            newest = wait_until(lambda: [s for s in complete() if s > newest], 420, "a new checkpoint", proc)[-1]
            with paused(train_worker_pids(ray_session_dir())):  # the run cannot finish before its driver is gone
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
            assert newest < steps, "the run finished before its driver was killed"
        result = run_cli("train", config, "--address", address, "--set", f"distributed.workers={last}", timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        return run

    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = {stage: pool.submit(drive, stage) for stage in sorted(ELASTIC)}
    for stage, future in runs.items():
        run = future.result()
        records = [json.loads(line) for line in s3.fs.cat_file(f"{run}/metrics.jsonl").decode().splitlines()]
        resumes = [(r["from_world_size"], r["world_size"], r["zero_stage"]) for r in records
                   if r.get("event") == "resume"]
        sizes = ELASTIC[stage]
        assert resumes == [(a, b, stage) for a, b in zip(sizes, sizes[1:])]
        losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
        assert [step for step, _ in losses] == list(range(1, steps + 1))  # every step once
        assert [loss for _, loss in losses] == pytest.approx(curve(local, "loss"), rel=REL_TOL), stage
        for key in LOGGED["full"]:  # the anchors' shares and the replay stream, re-split at each world size
            assert [r[key] for r in records if key in r] == pytest.approx(curve(local, key), rel=REL_TOL), (stage, key)

        final = tmp_path / f"final-{stage}.safetensors"
        final.write_bytes(s3.fs.cat_file(f"{run}/final/model.safetensors"))
        ours, theirs = load_file(str(final)), load_file(str(local / "final" / "model.safetensors"))
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-2, atol=1e-4, msg=key)


# ---------------------------------------------------------------- the tests, collected by each tier's module
# A tier's module (tests/e2e/test_distributed.py, tests/matrix/test_distributed_matrix.py) imports these
# with `pytest_generate_tests` and `runs`, and names its own LM_CASES, CLASSIFIER_STAGES and DPO_CASES.


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory, ray_local, pretrained_base, mlflow_server) -> dict:
    """The module's cases, started once for all its tests."""
    m = request.module
    return start_cases(tmp_path_factory, ray_local, pretrained_base, mlflow_server, m.LM_CASES, m.CLASSIFIER_STAGES,
                       m.DPO_CASES)


def pytest_generate_tests(metafunc) -> None:
    m = metafunc.module
    for name, cases in (("lm_case", m.LM_CASES), ("classifier_stage", m.CLASSIFIER_STAGES), ("dpo_case", m.DPO_CASES)):
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, cases, ids=lambda case: "-".join(map(str, case)) if isinstance(case, tuple)
                                 else str(case))


def test_two_workers_match_local_mode(tmp_path_factory, pretrained_base, runs, lm_case):
    check_lm_case(tmp_path_factory, pretrained_base, runs, *lm_case)


def test_a_classifier_on_two_workers_matches_local_mode(tmp_path, pretrained_base, runs, classifier_stage):
    check_classifier_case(tmp_path, pretrained_base, runs, classifier_stage)


def test_preference_tuning_on_two_workers_matches_local_mode(tmp_path_factory, pretrained_base, runs, dpo_case):
    check_preference_case(tmp_path_factory, pretrained_base, runs, dpo_case)

