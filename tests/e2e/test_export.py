"""ftdist export: each method's export loads with plain transformers / peft and computes what
the trained model computes; checkpoints (local mode and DeepSpeed ZeRO 0-3) export their own
weights; bad inputs are refused with one message."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftdist.cli import main
from tests.conftest import REPO, tiny_config

slow = pytest.mark.slow

# Checkpoints at step 3, the final model at step 6; no evaluation: export needs none.
SHORT = ("train.max_steps=6", "checkpoint.every_steps=3", "data.eval=null", "data.eval_fraction=0")
BATCH = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))
# Merging computes (W + s*BA) x where the adapter model computes W x + s*B(A x): the same
# function summed in another float32 order. Measured differences are ~1e-6 on logits of
# magnitude ~1; 1e-4 is far above that and far below what an unmerged or wrongly merged
# adapter changes (the lora and qlora tests check that margin).
MERGE_ATOL = 1e-4


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One short local-mode run per method. The adapter runs fine-tune the full run's base."""
    from ftdist.launch.local import train_local

    tmp = tmp_path_factory.mktemp("export-runs")
    full = Path(train_local(tiny_config(tmp, "method=full", *SHORT, name="full"), show_progress=False)["run_dir"])
    found = {"full": full}
    for method in ("lora", "qlora"):
        cfg = tiny_config(tmp, f"method={method}", "model.init=null", f"model.name_or_path={full / 'base'}",
                          "train.lr=1e-2", *SHORT, name=method)
        found[method] = Path(train_local(cfg, show_progress=False)["run_dir"])
    return found


def export(capsys, *args) -> tuple[int, str, str]:
    """`ftdist export ARGS` in this process: (exit code, stdout, stderr)."""
    code = main(["export", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def base_model(runs):
    """A fresh copy each time: PEFT adds its layers into the base it is given."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(runs["full"] / "base")


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model.eval()(input_ids=BATCH).logits.float()


def meta(out: Path) -> dict:
    return json.loads((out / "ftdist.json").read_text())


@slow
def test_full_run_exports_its_final_model(runs, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    code, stdout, _ = export(capsys, runs["full"], "--out", out)
    assert code == 0
    assert stdout.count("\n") == 1 and stdout.startswith("exported the full model of") and f"to {out}: " in stdout
    assert stdout.rstrip().endswith(" MB")
    written = meta(out)
    assert (written["method"], written["merged"], written["step"]) == ("full", False, 6)
    assert written["source"] == str((runs["full"] / "final").resolve())
    exported = AutoModelForCausalLM.from_pretrained(out)
    final = AutoModelForCausalLM.from_pretrained(runs["full"] / "final")
    # Exact: the same float32 weights, bit for bit, through the same code.
    assert torch.equal(logits(exported), logits(final))


@slow
def test_lora_exports_the_adapter_and_merges_it(runs, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftdist.artifacts.generate import load_trained

    adapter, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    code, stdout, _ = export(capsys, runs["lora"], "--out", adapter)
    assert code == 0 and ": adapter " in stdout and "(base model " in stdout
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "model.safetensors").exists()
    assert meta(adapter)["method"] == "lora" and meta(adapter)["merged"] is False
    reference = logits(PeftModel.from_pretrained(base_model(runs), runs["lora"] / "final"))
    # Exact: the adapter file is final/'s, byte for byte.
    assert torch.equal(logits(PeftModel.from_pretrained(base_model(runs), adapter)), reference)
    assert torch.equal(logits(load_trained(adapter, torch.device("cpu"))[0]), reference)  # as `ftdist generate` does

    code, stdout, _ = export(capsys, runs["lora"], "--out", merged_dir, "--merge")
    assert code == 0 and "merged into its base" in stdout
    assert not (merged_dir / "adapter_config.json").exists() and meta(merged_dir)["method"] == "full"
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert (logits(base_model(runs)) - reference).abs().max() > 100 * MERGE_ATOL  # the adapters changed the model
    torch.testing.assert_close(logits(merged), reference, rtol=0, atol=MERGE_ATOL)


@slow
def test_qlora_merges_into_the_dequantized_4bit_base(runs, tmp_path, capsys):
    from bitsandbytes.nn import Linear4bit
    from peft import PeftModel, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from ftdist.artifacts.export import run_config
    from ftdist.artifacts.generate import load_trained
    from ftdist.model.build import build_model

    out = tmp_path / "merged"
    code, stdout, _ = export(capsys, runs["qlora"], "--out", out, "--merge")
    assert code == 0 and "merged into its dequantized 4-bit base" in stdout
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any(isinstance(m, Linear4bit) for m in merged.modules())
    assert {p.dtype for p in merged.parameters()} == {torch.float32}

    # The training-time model: the run's own build (4-bit base, adapters) with final/'s adapters.
    trained = build_model(run_config(runs["qlora"]), str(runs["full"] / "base"), torch.device("cpu")).model
    set_peft_model_state_dict(trained, load_file(str(runs["qlora"] / "final" / "adapter_model.safetensors")))
    assert any(isinstance(m, Linear4bit) for m in trained.modules())
    reference = logits(trained)
    # The dequantized weights are exactly the values the 4-bit layers compute with (float32
    # compute on CPU): what remains is the merge's summation order, as for lora (measured 4e-7).
    torch.testing.assert_close(logits(merged), reference, rtol=0, atol=MERGE_ATOL)
    # Merged into the original float weights instead, the quantization error shows, far above that.
    naive = PeftModel.from_pretrained(base_model(runs), runs["qlora"] / "final").merge_and_unload()
    assert (logits(naive) - reference).abs().max() > 100 * MERGE_ATOL

    # Unmerged, the export says qlora, so `ftdist generate` puts the adapters on the 4-bit base
    # again, as it does for final/. (Its 4-bit model in eval mode may take bitsandbytes' CPU
    # inference kernel, a few 1e-3 off the training computation: hence final/ as the reference.)
    adapter = tmp_path / "adapter"
    assert export(capsys, runs["qlora"], "--out", adapter)[0] == 0
    assert meta(adapter)["method"] == "qlora"
    from_final, from_export = (load_trained(d, torch.device("cpu"))[0] for d in (runs["qlora"] / "final", adapter))
    assert any(isinstance(m, Linear4bit) for m in from_export.modules())
    assert torch.equal(logits(from_export), logits(from_final))


@slow
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_a_checkpoint_exports_its_own_weights(runs, tmp_path, capsys, method):
    checkpoint, out = runs[method] / "checkpoints" / "step-3", tmp_path / "out"
    code, stdout, _ = export(capsys, checkpoint, "--out", out)
    assert code == 0 and "(checkpoint step-3)" in stdout and meta(out)["step"] == 3
    name = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    saved_file = checkpoint / name if method == "full" else checkpoint / "adapter" / name
    saved, exported, final = (load_file(str(f)) for f in (saved_file, out / name, runs[method] / "final" / name))
    assert saved.keys() == exported.keys() and all(torch.equal(saved[k], exported[k]) for k in saved)
    assert any(not torch.equal(final[k], exported[k]) for k in final)  # step 3's weights, not the final ones


@slow
def test_unfinished_run_exports_its_newest_complete_checkpoint(runs, tmp_path, capsys):
    # The full run as if stopped after step 3 while saving step 5 (no COMPLETE marker yet).
    run = tmp_path / "run"
    shutil.copytree(runs["full"], run, ignore=shutil.ignore_patterns("final"))
    partial = run / "checkpoints" / "step-5"
    shutil.copytree(run / "checkpoints" / "step-3", partial)
    (partial / "COMPLETE").unlink()
    code, stdout, _ = export(capsys, run, "--out", tmp_path / "out")
    assert code == 0 and f"{run} (checkpoint step-3)" in stdout and meta(tmp_path / "out")["step"] == 3

    code, stdout, stderr = export(capsys, partial, "--out", tmp_path / "out2")
    assert code == 2 and stdout == "" and f"{partial}: a partial checkpoint" in stderr
    assert not (tmp_path / "out2").exists()


@slow
def test_bad_requests_are_refused_with_one_message(runs, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    cases = [
        ((runs["full"], "--out", tmp_path / "a", "--merge"), ("method full", "drop --merge")),
        ((runs["lora"], "--out", taken), (f"--out {taken}: exists and is not empty", "--force")),
        ((tmp_path, "--out", tmp_path / "b"), (f"{tmp_path}: neither a run directory", "checkpoints/step-N")),
        ((runs["full"], "--out", runs["full"] / "exported"), ("overlaps the run directory", "outside it")),
    ]
    for args, needles in cases:
        code, stdout, stderr = export(capsys, *args)
        assert code == 2 and stdout == "" and stderr.count("ftdist: error:") == 1, (args, stderr)
        assert all(n in stderr for n in needles), (needles, stderr)
    assert (taken / "notes.txt").is_file() and not (tmp_path / "a").exists()
    # --force replaces an earlier export, never a directory ftdist did not write.
    code, stdout, stderr = export(capsys, runs["lora"], "--out", taken, "--force")
    assert code == 2 and "holds files ftdist did not write" in stderr and stderr.count("ftdist: error:") == 1
    assert [p.name for p in taken.iterdir()] == ["notes.txt"] and [p.name for p in tmp_path.iterdir()].count("taken") == 1
    earlier = tmp_path / "earlier"
    assert export(capsys, runs["full"], "--out", earlier)[0] == 0
    assert export(capsys, runs["lora"], "--out", earlier, "--force")[0] == 0
    assert (earlier / "adapter_config.json").is_file() and not (earlier / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "taken"]  # no staging left behind


# ---------------------------------------------------------------- DeepSpeed checkpoints

DEEPSPEED_CASES = [(method, stage) for method in ("full", "lora") for stage in (0, 2, 3)]


def make_deepspeed_runs(root: str, base: str) -> None:
    """Run in a fresh process (it sets up torch.distributed): per case, a run directory whose
    only checkpoint DeepSpeedEngine wrote after two steps, as a Ray worker would at world
    size 1, and expected.safetensors, the trained tensors read from the live engine."""
    import deepspeed
    from safetensors.torch import save_file

    from ftdist.config.load import config_yaml
    from ftdist.engines.deepspeed import DeepSpeedEngine, skip_inference_comm_op
    from ftdist.model.build import build_model
    from ftdist.training.optim import build_optimizer

    skip_inference_comm_op()  # as the engine does, before DeepSpeed's comm backend starts
    deepspeed.init_distributed("gloo")
    for method, stage in DEEPSPEED_CASES:
        cfg = tiny_config(Path(root), f"method={method}", "model.init=null", f"model.name_or_path={base}",
                          "distributed.workers=1", f"distributed.zero_stage={stage}", "train.batch_size=4",
                          name=f"{method}-zero{stage}")
        run_dir = Path(root) / "runs" / cfg.run.name
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(config_yaml(cfg))
        model = build_model(cfg, base, torch.device("cpu")).model
        optimizer, scheduler = build_optimizer(cfg, model, 2)
        engine = DeepSpeedEngine.build(cfg, model, optimizer, scheduler, world_size=1)
        for _ in range(2):
            engine.step([BATCH], lambda forward, batch: forward(input_ids=batch, labels=batch).loss)
        checkpoint = run_dir / "checkpoints" / "step-2"
        checkpoint.mkdir(parents=True)
        engine.save(checkpoint, True)
        (checkpoint / "state.json").write_text(json.dumps({"step": 2, "engine": "deepspeed", "zero_stage": stage}))
        (checkpoint / "COMPLETE").write_text("{}")
        state = engine.model_state()  # ZeRO-3: gathered from the partitions
        if state is None:
            state = model.state_dict() if method == "full" else {
                n: p for n, p in model.named_parameters() if p.requires_grad}
        save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(run_dir / "expected.safetensors"))


@pytest.fixture(scope="module")
def deepspeed_runs(runs, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("deepspeed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0"}
    base = str(runs["full"] / "base")
    code = f"from tests.e2e.test_export import make_deepspeed_runs; make_deepspeed_runs({str(root)!r}, {base!r})"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return root / "runs"


@slow
@pytest.mark.parametrize("method, stage", DEEPSPEED_CASES)
def test_deepspeed_checkpoint_exports_the_trained_weights(runs, deepspeed_runs, tmp_path, capsys, method, stage):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, out = deepspeed_runs / f"{method}-zero{stage}", tmp_path / "out"
    code, stdout, _ = export(capsys, run, "--out", out)  # no final/: the newest complete checkpoint
    assert code == 0 and "(checkpoint step-2)" in stdout
    expected = load_file(str(run / "expected.safetensors"))
    if method == "full":
        exported = load_file(str(out / "model.safetensors"))
        assert exported.keys() == expected.keys() and all(torch.equal(exported[k], expected[k]) for k in expected)
        return
    model = PeftModel.from_pretrained(base_model(runs), out)
    exported = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert exported.keys() == expected.keys() and all(torch.equal(exported[k], expected[k]) for k in expected)
    assert any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in exported.items())  # trained

    assert export(capsys, run, "--out", tmp_path / "merged", "--merge")[0] == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(merged), logits(model), rtol=0, atol=MERGE_ATOL)
