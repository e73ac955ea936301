"""Hostile files (issue 35): ftdist runs no code that a file it reads carries.

Two ways a file could run code: a pickle (a checkpoint's torch files, a base model's .bin,
DeepSpeed's files) and a model or tokenizer that ships its own Python (`auto_map`). Each test
plants one whose code would create a marker file, and shows the marker never appears and what
ftdist does instead: a checkpoint is named as damaged and the run resumes from the one before;
a model is refused with one line naming the directory and `model.trust_remote_code: true`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ftdist.errors import UserError
from tests.conftest import (
    REPO,
    complete_checkpoints,
    run_cli,
    tiny_config,
    write_config,
)


class Hostile:
    """Unpickled with weights_only=False, it creates `marker` (any code could run there)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path, **beside) -> None:
    """A torch file at `path` that holds, among plain data, a pickle that runs code."""
    torch.save({**beside, "state": {}, "param_groups": [], "payload": Hostile(marker)}, path)


def reseal(checkpoint: Path) -> None:
    """COMPLETE's manifest rewritten for the files as they are now: one who can plant a file in a
    bucket can rewrite the marker too, so the checksums are no defence against them."""
    from ftdist.training.checkpoint import manifest

    marker = json.loads((checkpoint / "COMPLETE").read_text())
    marker["files"] = manifest(checkpoint)
    (checkpoint / "COMPLETE").write_text(json.dumps(marker))


def losses(run_dir: Path) -> list[tuple[int, float]]:
    from ftdist.io.metrics_log import read_metrics

    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def resumes(run_dir: Path) -> list[str]:
    from ftdist.io.metrics_log import read_metrics

    return [r["checkpoint"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "resume"]


# ---------------------------------------------------------------- checkpoints


def six_steps(tmp_path: Path):
    """A tiny local run of 6 steps, checkpoints at steps 2 and 4 (then final/): its directory and a rerun."""
    from ftdist.launch.rundir import prepare_run_dir
    from ftdist.training.context import LocalContext
    from ftdist.training.loop import train

    cfg = tiny_config(tmp_path, "model.init.num_layers=2", "train.max_steps=6", "checkpoint.every_steps=2",
                      "checkpoint.keep=5", "train.eval_every=2")
    store = prepare_run_dir(cfg, restart=False)

    def run() -> None:
        train(cfg, LocalContext(store=store, device=torch.device("cpu"), show_progress=False))

    run()
    return store.local, run


def test_the_rng_state_is_saved_as_safetensors_and_restored_exactly(tmp_path):
    import random

    import numpy as np

    from ftdist.training.checkpoint import load_rng, rng_state, save_rng, set_rng_state

    random.random(), np.random.normal(), torch.rand(3)  # a cached Gaussian in numpy's state too
    save_rng(tmp_path / "rng-0.safetensors")
    expected = (random.random(), float(np.random.normal()), np.random.rand(2).tolist(), torch.rand(4).tolist())
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    set_rng_state(load_rng(tmp_path / "rng-0.safetensors"))
    assert (random.random(), float(np.random.normal()), np.random.rand(2).tolist(), torch.rand(4).tolist()) == expected
    state = load_rng(tmp_path / "rng-0.safetensors")
    assert state["python"][0] == rng_state()["python"][0] and state["numpy"][0] == "MT19937"
    raw = (tmp_path / "rng-0.safetensors").read_bytes()  # safetensors: a length, a JSON header, raw bytes
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert set(header) == {"__metadata__", "python", "numpy", "torch"}


@pytest.mark.parametrize("plant_in, named", [
    ("optimizer.pt", "optimizer.pt holds objects other than tensors and data, refused unloaded"),
    ("rng-0.pt", "rng-0.pt holds objects other than tensors and data, refused unloaded"),
])
def test_a_planted_pickle_in_a_checkpoint_never_runs_and_the_checkpoint_is_skipped(tmp_path, capsys, plant_in,
                                                                                    named):
    run_dir, run = six_steps(tmp_path)
    curve = losses(run_dir)
    step4 = run_dir / "checkpoints" / "step-4"
    marker = tmp_path / "PWNED"
    if plant_in == "rng-0.pt":  # as an older run's RNG file, which ftdist still reads
        (step4 / "rng-0.safetensors").unlink()
    plant(step4 / plant_in, marker)
    reseal(step4)  # the checksums match: only loading it tells

    shutil.rmtree(run_dir / "final")
    run()
    assert not marker.exists()
    assert f"step-4 is damaged ({named}" in capsys.readouterr().err
    assert resumes(run_dir) == ["step-2"]
    assert [loss for _, loss in losses(run_dir)] == pytest.approx([loss for _, loss in curve], rel=1e-6)
    # The damaged one was removed and saved again, whole, by the resumed run.
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step-2", "step-4"]
    assert not (step4 / "rng-0.pt").exists() and (step4 / "rng-0.safetensors").is_file()

    # The only checkpoint left, with a planted pickle: the run stops, nothing runs, the checkpoint stays.
    shutil.rmtree(run_dir / "final")
    shutil.rmtree(run_dir / "checkpoints" / "step-2")
    plant(step4 / "optimizer.pt", marker)
    reseal(step4)
    with pytest.raises(UserError, match=r"step-4 is damaged \(optimizer.pt holds objects other than tensors .* "
                                        r"only checkpoint left"):
        run()
    assert (step4 / "COMPLETE").is_file()
    assert not marker.exists()


def test_a_checkpoint_whose_manifest_lacks_the_file_list_is_damaged_not_trusted(tmp_path, capsys):
    run_dir, run = six_steps(tmp_path)
    step4 = run_dir / "checkpoints" / "step-4"
    marker = tmp_path / "PWNED"
    plant(step4 / "optimizer.pt", marker)
    for complete in (json.dumps({"eval_loss": None, "world_size": 1}), "{not json"):  # no "files"; garbled
        (step4 / "COMPLETE").write_text(complete)
        shutil.rmtree(run_dir / "final")
        run()
        assert "step-4 is damaged (COMPLETE lists no files" in capsys.readouterr().err
        assert resumes(run_dir) == ["step-2"]
        assert not marker.exists()
        plant(step4 / "optimizer.pt", marker)  # the run saved step-4 again, whole


def test_an_older_runs_rng_pt_still_resumes_read_weights_only(tmp_path, capsys):
    """Runs saved before the RNG state was safetensors wrote rng-<rank>.pt (numpy's state: an
    array): read with weights_only=True and numpy's array classes allowed, the curve is the same."""
    from ftdist.training.checkpoint import load_rng

    run_dir, run = six_steps(tmp_path)
    curve = losses(run_dir)
    step4 = run_dir / "checkpoints" / "step-4"
    torch.save(load_rng(step4 / "rng-0.safetensors"), step4 / "rng-0.pt")  # what older runs saved
    (step4 / "rng-0.safetensors").unlink()
    reseal(step4)
    shutil.rmtree(run_dir / "final")
    run()
    assert "damaged" not in capsys.readouterr().err
    assert resumes(run_dir) == ["step-4"]
    assert [loss for _, loss in losses(run_dir)] == pytest.approx([loss for _, loss in curve], rel=1e-6)


def test_restore_rng_refuses_a_planted_pickle_without_running_it(tmp_path):
    import pickle

    from ftdist.training.checkpoint import restore_rng

    marker = tmp_path / "PWNED"
    plant(tmp_path / "rng-0.pt", marker)
    with pytest.raises(pickle.UnpicklingError):
        restore_rng(tmp_path, 0)
    assert not marker.exists()


def test_deepspeeds_own_loads_are_made_weights_only_with_the_allow_list_for_the_call_only(tmp_path):
    """DeepSpeed calls torch.load(weights_only=False) itself: inside weights_only_loads() that is
    weights_only=True with the allow-list, which a real checkpoint's classes pass; outside,
    torch.load is torch's own again."""
    import pickle

    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from ftdist.io.safeload import weights_only_loads

    marker = tmp_path / "PWNED"
    plant(tmp_path / "hostile.pt", marker)
    torch.save({"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
                "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}], "w": torch.ones(2)},
               tmp_path / "deepspeed.pt")
    with weights_only_loads():
        with pytest.raises(pickle.UnpicklingError):
            torch.load(tmp_path / "hostile.pt", weights_only=False)
        with weights_only_loads():  # nests
            loaded = torch.load(tmp_path / "deepspeed.pt", weights_only=False)
        with pytest.raises(pickle.UnpicklingError):
            torch.load(tmp_path / "hostile.pt", weights_only=False)
    assert not marker.exists()
    assert loaded["zero_stage"] == ZeroStageEnum.gradients and loaded["param_slice_mappings"][0]["w"].numel == 4
    assert torch.load is torch.serialization.load


@pytest.mark.parametrize("stage", [0, 2])
def test_export_of_a_deepspeed_checkpoint_with_a_planted_pickle_is_refused_unrun(tmp_path, stage):
    """The export reader (DeepSpeedEngine.read_weights): ZeRO-0's model states read by ftdist,
    ZeRO 1-3 through DeepSpeed's zero_to_fp32 (its loads made weights-only)."""
    from ftdist.engines.deepspeed import DeepSpeedEngine

    marker = tmp_path / "PWNED"
    tag = tmp_path / "step-2" / "deepspeed"
    tag.mkdir(parents=True)
    plant(tag / "mp_rank_00_model_states.pt", marker, module={"w": torch.ones(2)})
    if stage:
        plant(tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    with pytest.raises(UserError, match=r"step-2: cannot read its DeepSpeed files as weights only \(.*GLOBAL"):
        DeepSpeedEngine.read_weights(tmp_path / "step-2", adapters_only=False)
    assert not marker.exists()


def deepspeed_checkpoints(root: str) -> None:
    """Run in a fresh process (it sets up torch.distributed): for ZeRO 0-3 a real DeepSpeed
    checkpoint is written and read back through DeepSpeedEngine.load (and, for 1-3, through
    DeepSpeed's universal conversion, as a resume at another world size does), and each with a
    planted pickle is refused, its code never run."""
    import deepspeed

    from ftdist.engines.deepspeed import DeepSpeedEngine, skip_inference_comm_op
    from ftdist.io.safeload import why_unloadable
    from ftdist.model.build import build_model
    from ftdist.model.source import build_initial_model
    from ftdist.training.optim import build_optimizer

    skip_inference_comm_op()
    deepspeed.init_distributed("gloo")
    root = Path(root)
    base = root / "base"
    build_initial_model(tiny_config(root, "model.init.num_layers=2"), base)
    batch = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(0))
    marker = root / "PWNED"
    for method, stage in [("full", 0), ("lora", 1), ("full", 2), ("lora", 3)]:
        cfg = tiny_config(root, f"method={method}", "model.init=null", f"model.name_or_path={base}",
                          "distributed.workers=1", f"distributed.zero_stage={stage}", "train.batch_size=4")

        def engine(resume=None):
            model = build_model(cfg, str(base), torch.device("cpu")).model
            optimizer, scheduler = build_optimizer(cfg, model, 2)
            return DeepSpeedEngine.build(cfg, model, optimizer, scheduler, world_size=1, resume=resume)

        trained = engine()
        for _ in range(2):
            trained.step([batch], lambda forward, b: forward(input_ids=b, labels=b).loss)
        checkpoint = root / f"{method}-{stage}"
        trained.save(checkpoint, True)
        saved = {"step": 2, "engine": "deepspeed", "world_size": 1, "zero_stage": stage}
        files = sorted(checkpoint.rglob("*.pt"))
        assert files and all(why_unloadable(f) is None for f in files), [(f, why_unloadable(f)) for f in files]
        engine().load(checkpoint, saved)
        if stage:  # another world size: DeepSpeed's universal conversion, then its universal loader
            other = {**saved, "world_size": 2}
            engine(resume=other).load(checkpoint, other)
        target = checkpoint / "deepspeed" / ("zero_pp_rank_0_mp_rank_00_optim_states.pt" if stage
                                             else "mp_rank_00_model_states.pt")
        original = target.read_bytes()
        plant(target, marker)
        assert "holds objects other than tensors" in why_unloadable(target)
        for resume in ([saved, {**saved, "world_size": 2}] if stage else [saved]):
            try:
                engine(resume=resume if resume["world_size"] != 1 else None).load(checkpoint, resume)
            except Exception as e:  # noqa: BLE001 - refused, whatever DeepSpeed wraps it in
                assert "GLOBAL" in str(e) or "weights_only" in str(e) or "Weights only" in str(e), repr(e)
            else:
                raise AssertionError(f"ZeRO-{stage}: a planted pickle loaded")
            assert not marker.exists(), f"ZeRO-{stage}: the planted pickle ran"
        target.write_bytes(original)
    print("ok")


@pytest.mark.slow
def test_deepspeed_checkpoints_load_weights_only_and_refuse_a_planted_pickle(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "OMP_NUM_THREADS": "1"}
    code = f"from tests.unit.test_hostile_files import deepspeed_checkpoints; deepspeed_checkpoints({str(tmp_path)!r})"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-4000:]
    assert not (tmp_path / "PWNED").exists()


# ---------------------------------------------------------------- models that ship code


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with its tokenizer, as a Hugging Face directory."""
    from ftdist.model.source import build_initial_model

    root = tmp_path_factory.mktemp("base")
    build_initial_model(tiny_config(root, "model.init.num_layers=2"), root / "base")
    return root / "base"


def with_custom_code(base: Path, dest: Path, marker: Path) -> Path:
    """The base as a model that asks for code of its own (auto_map), whose import creates `marker`."""
    shutil.copytree(base, dest)
    config = json.loads((dest / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (dest / "config.json").write_text(json.dumps(config))
    (dest / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n\n"
        "class EvilConfig(LlamaConfig):\n    pass\n\n\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    return dest


def refused(result, directory: Path, setting: str = "model.trust_remote_code: true") -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("ftdist: error: "), result.stderr[-3000:]
    assert str(directory) in lines[0] and setting in lines[0] and "auto_map" in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout


@pytest.fixture
def modules_cache(tmp_path, monkeypatch) -> Path:
    """transformers copies a model's own code here before it imports it (the CLI's children inherit it)."""
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf-modules"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return tmp_path / "hf-modules"


def test_a_model_that_ships_code_is_refused_by_every_command_and_its_code_never_runs(tmp_path, base_dir,
                                                                                      modules_cache):
    marker = tmp_path / "PWNED"
    evil = with_custom_code(base_dir, tmp_path / "evil", marker)
    cfg = tiny_config(tmp_path, "model.init=null", f"model.name_or_path={evil}", "train.max_steps=2")
    config = write_config(tmp_path, cfg)

    refused(run_cli("train", str(config), "--local"), evil)
    assert not (tmp_path / "runs" / "t").exists()  # refused before the run directory is made
    refused(run_cli("plan", str(config)), evil)
    refused(run_cli("prepare", str(config)), evil)
    refused(run_cli("generate", str(evil), "--prompt", "hi"), evil)

    # classify: a classification run's final/ that ships code
    classifier = shutil.copytree(evil, tmp_path / "classifier")
    (classifier / "ftdist.json").write_text(json.dumps({"task": "classification", "method": "full",
                                                        "classification": {"labels": ["a", "b"], "pooling": "last"}}))
    refused(run_cli("classify", str(classifier), "--text", "hi"), classifier)

    # export: a run whose final/ ships code (its own snapshot is not asked: a copied run could
    # say trust_remote_code: true there)
    run_dir = tmp_path / "copied-run"
    shutil.copytree(evil, run_dir / "final")
    (run_dir / "final" / "ftdist.json").write_text(json.dumps({"method": "full", "task": "causal_lm"}))
    trusting = tiny_config(tmp_path, "model.init=null", f"model.name_or_path={evil}", "model.trust_remote_code=true")
    write_config(run_dir, trusting)
    refused(run_cli("export", str(run_dir), "--out", str(tmp_path / "out")), run_dir / "final")
    assert not (tmp_path / "out").exists()

    assert not marker.exists() and not modules_cache.exists()


def test_with_trust_remote_code_the_models_own_code_loads(tmp_path, base_dir, modules_cache):
    """The setting reaches transformers: with it, the model's own module is imported (its marker
    appears) by plan, a short local training run and generate."""
    marker = tmp_path / "RAN"
    evil = with_custom_code(base_dir, tmp_path / "custom", marker)
    cfg = tiny_config(tmp_path, "model.init=null", f"model.name_or_path={evil}", "model.trust_remote_code=true",
                      "train.max_steps=2", "train.eval_every=2", "checkpoint.every_steps=2")
    config = write_config(tmp_path, cfg)

    result = run_cli("plan", str(config))
    assert result.returncode == 0 and marker.exists(), result.stderr[-3000:]
    marker.unlink()
    result = run_cli("train", str(config), "--local")
    assert result.returncode == 0 and marker.exists(), result.stderr[-3000:]
    marker.unlink()
    result = run_cli("generate", str(evil), "--prompt", "hi", "--max-new-tokens", "2", "--trust-remote-code")
    assert result.returncode == 0 and marker.exists(), result.stderr[-3000:]


def test_what_asks_for_code_of_its_own(tmp_path, base_dir, monkeypatch):
    """An auto_map in config.json or tokenizer_config.json, or a model_type transformers does not
    know; the base itself asks for none. Refused unless trusted."""
    from ftdist.model.source import refuse_remote_code, remote_code_error, remote_code_request

    assert remote_code_request(base_dir) is None
    tokenizer = shutil.copytree(base_dir, tmp_path / "tokenizer")
    config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({**config, "auto_map": {
        "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    unknown = shutil.copytree(base_dir, tmp_path / "unknown")
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "evil-net"}))

    assert "tokenizer_config.json asks to run code of its own" in remote_code_request(tokenizer)
    assert "model_type 'evil-net'" in remote_code_request(unknown)
    for directory in (tokenizer, unknown):
        with pytest.raises(UserError, match=r"model.tokenizer .*set model.trust_remote_code: true"):
            refuse_remote_code(str(directory), False, "model.tokenizer")
        refuse_remote_code(str(directory), True, "model.tokenizer")  # allowed: no error
    # A hub id: checked once its files are in the local Hugging Face cache; before that,
    # transformers itself refuses its code (trust_remote_code=False), in one line too.
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--org--evil" / "snapshots" / "abc123"
    shutil.copytree(base_dir, snapshot)
    config = json.loads((snapshot / "config.json").read_text())
    (snapshot / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "m.M"}}))
    (cache / "models--org--evil" / "refs").mkdir()
    (cache / "models--org--evil" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(UserError, match=r"^model.name_or_path org/evil: its config.json asks to run code of its own"):
        refuse_remote_code("org/evil", False, "model.name_or_path")
    refuse_remote_code("org/evil", True, "model.name_or_path")
    refuse_remote_code("org/not-downloaded", False, "model.name_or_path")  # left to transformers
    refuse_remote_code("s3://bucket/model", False, "model.name_or_path")
    error = ValueError("The repository org/evil contains custom code ... pass the argument `trust_remote_code=True`")
    assert "model.trust_remote_code: true" in str(remote_code_error(error, "org/evil", "model.name_or_path"))
    assert remote_code_error(ValueError("something else"), "org/evil", "model.name_or_path") is None


def test_a_base_models_bin_with_a_planted_pickle_is_refused_unrun(tmp_path, base_dir, modules_cache):
    """A base model whose weights are a pickle (pytorch_model.bin) holding code: one message, before
    anything loads; nothing runs."""
    marker = tmp_path / "PWNED"
    base = shutil.copytree(base_dir, tmp_path / "bin-base")
    (base / "model.safetensors").unlink()
    plant(base / "pytorch_model.bin", marker, **{"model.embed_tokens.weight": torch.zeros(384, 64)})
    cfg = tiny_config(tmp_path, "model.init=null", f"model.name_or_path={base}", "train.max_steps=2")
    result = run_cli("train", str(write_config(tmp_path, cfg)), "--local")
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "pytorch_model.bin holds objects other than tensors" in lines[0], result.stderr
    assert str(base) in lines[0] and "Traceback" not in result.stderr
    assert not marker.exists()

    # The same file reached past preflight (a hub model's download): load_causal_lm says it in one line.
    from ftdist.model.build import load_causal_lm

    with pytest.raises(UserError, match=r"its weights hold objects other than tensors, refused unloaded"):
        load_causal_lm(str(base), torch.device("cpu"))
    assert not marker.exists()
