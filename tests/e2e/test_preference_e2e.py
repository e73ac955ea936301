"""objective: dpo: {prompt, chosen, rejected} rows, each pair's two sequences in one row; the
policy's log-probs from a chunked head, the reference's with adapters off, from a frozen copy
or precomputed; the DPO and IPO losses against TRL's DPOTrainer; rewards and their accuracy
in the log, in evaluations and for Tune; starting from an SFT run's final/; resume and export
as for SFT. (Ray workers under ZeRO-2 and ZeRO-3: tests/test_distributed.py.)"""

import json
import shutil

import pytest
import torch

from ftdist.launch.local import train_local
from ftdist.io.metrics_log import read_metrics
from tests.conftest import DEMO, run_cli, tiny_config
from tests.unit.test_preference import LN2, dpo_config, records, rule_pairs, write_rows


@pytest.mark.parametrize("method, precompute", [("lora", False), ("full", False), ("full", True), ("qlora", False)])
def test_with_the_reference_equal_to_the_policy_the_first_loss_is_ln2_and_rewards_zero(tmp_path, pretrained_base,
                                                                                      method, precompute):
    cfg = dpo_config(tmp_path, pretrained_base("llama"), f"method={method}",
                     f"dpo.precompute_reference={str(precompute).lower()}", name=f"ln2-{method}", steps=2)
    train_local(cfg, show_progress=False)
    first = records(tmp_path / "runs" / cfg.run.name, "loss")[0]
    assert first["step"] == 1 and abs(first["loss"] - LN2) < 1e-5
    assert first["rewards_chosen"] == first["rewards_rejected"] == first["reward_margin"] == 0.0
    assert first["reward_accuracy"] == 0.0 and first["logps_chosen"] < 0 and first["logps_rejected"] < 0
    baseline = records(tmp_path / "runs" / cfg.run.name, "eval_loss")[0]
    assert baseline["step"] == 0 and abs(baseline["eval_loss"] - LN2) < 1e-5 and baseline["eval_reward_margin"] == 0


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_the_first_steps_equal_trl_dpo_trainers(tmp_path, pretrained_base, loss):
    """TRL's DPOTrainer, the peer, on the same tiny model, pairs, beta and batch (the whole set
    of 8 pairs each step, so the order of rows cannot differ): the same loss and rewards at each
    of the first steps (the model after one and two updates: gradients and optimizer agree)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    base = pretrained_base("llama")
    pairs = rule_pairs(8, 7)
    beta, steps, lr = 0.2, 3, 5e-3
    cfg = tiny_config(tmp_path, "objective=dpo", "method=full", "model.init=null", f"model.name_or_path={base}",
                      f"data.train={write_rows(tmp_path / 'p.jsonl', pairs)}", "data.eval=null",
                      "data.eval_fraction=0", "data.packing=false", "data.max_length=32", f"dpo.beta={beta}",
                      f"dpo.loss={loss}", f"train.lr={lr}", f"train.max_steps={steps}", "train.batch_size=8",
                      "train.micro_batch_size=4", "train.warmup_steps=0", "train.schedule=constant",
                      "train.log_every=1", "train.grad_clip=1.0", "checkpoint.every_steps=1000", name=f"ours-{loss}")
    train_local(cfg, show_progress=False)
    ours = records(tmp_path / "runs" / cfg.run.name, "loss")

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[loss], learning_rate=lr, max_steps=steps,
                     per_device_train_batch_size=8, gradient_accumulation_steps=1, lr_scheduler_type="constant",
                     warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0, logging_steps=1, report_to=[],
                     save_strategy="no", use_cpu=True, max_length=64, bf16=False, fp16=False, seed=0,
                     dataloader_drop_last=False, remove_unused_columns=False)
    trainer = DPOTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=Dataset.from_list(pairs))
    trainer.train()
    theirs = [r for r in trainer.state.log_history if "loss" in r and "train_runtime" not in r]
    assert len(theirs) == len(ours) == steps
    # Within 1e-3 relative (1e-4 absolute near 0): both compute in float32, summing in other
    # orders (chunks, pairs in rows here; padded batches there), and Adam's first updates,
    # about lr * sign(gradient), let that rounding show in weights whose gradient is near 0.
    # The first step's gradient norm (the same model, before any update) agrees far closer.
    assert ours[0]["grad_norm"] == pytest.approx(theirs[0]["grad_norm"], rel=1e-5)
    for step, (a, b) in enumerate(zip(ours, theirs), 1):
        for key, trl_key in (("loss", "loss"), ("rewards_chosen", "rewards/chosen"),
                             ("rewards_rejected", "rewards/rejected"), ("reward_margin", "rewards/margins"),
                             ("reward_accuracy", "rewards/accuracies"), ("logps_chosen", "logps/chosen"),
                             ("logps_rejected", "logps/rejected")):
            assert a[key] == pytest.approx(b[trl_key], rel=1e-3, abs=1e-4), (step, key)
    assert ours[-1]["loss"] != pytest.approx(ours[0]["loss"], rel=1e-3)  # the steps did move the policy


@pytest.mark.slow
@pytest.mark.parametrize("method, precompute", [("lora", False), ("full", True)])
def test_eval_reward_accuracy_rises_to_0_9_on_a_rule_the_chosen_follow(tmp_path, pretrained_base, method, precompute):
    lr = "1e-2" if method == "lora" else "5e-4"
    cfg = dpo_config(tmp_path, pretrained_base("llama"), f"method={method}", f"train.lr={lr}",
                     f"dpo.precompute_reference={str(precompute).lower()}", f"data.retention={DEMO / 'general.txt'}",
                     name=f"rule-{method}", steps=24)
    summary = train_local(cfg, show_progress=False)
    run_dir = tmp_path / "runs" / cfg.run.name
    evals = records(run_dir, "eval_reward_accuracy")
    assert [r["step"] for r in evals] == [0, 24] and evals[0]["eval_reward_accuracy"] == 0.0
    assert evals[-1]["eval_reward_accuracy"] >= 0.9 and evals[-1]["eval_loss"] < LN2 - 0.1
    assert evals[-1]["eval_rewards_chosen"] > evals[-1]["eval_rewards_rejected"] and "forgetting" in evals[-1]
    assert summary["eval_reward_accuracy"] == evals[-1]["eval_reward_accuracy"] and "eval_ppl" not in summary
    assert (run_dir / "final" / ("adapter_config.json" if method == "lora" else "config.json")).is_file()


@pytest.mark.slow
# LoRA's SFT here; full fine-tuning's in `make test-all` (tests/matrix/test_preference_matrix.py).
@pytest.mark.parametrize("method", ["lora"])
def test_a_dpo_run_starts_from_an_sft_runs_final_and_resumes_and_exports_as_sft_does(tmp_path, pretrained_base,
                                                                                    method):
    starts_from_an_sft_runs_final(tmp_path, pretrained_base, method)


def starts_from_an_sft_runs_final(tmp_path, pretrained_base, method: str) -> None:
    """SFT first (adapters, or every weight), then DPO from its final/: the reference is the SFT
    model (the first loss is ln 2 again). Killed after a checkpoint, the rerun continues the same
    curve; the export loads as SFT's does."""
    sft = tiny_config(tmp_path, f"method={method}", "model.init=null", f"model.name_or_path={pretrained_base('llama')}",
                      "train.max_steps=4", "checkpoint.every_steps=1000", "lora.dropout=0", name=f"sft-{method}")
    sft_final = train_local(sft, show_progress=False)["final_dir"]
    cfg = dpo_config(tmp_path, sft_final, f"method={method}", "train.lr=5e-3", "checkpoint.every_steps=3",
                     "checkpoint.keep=5", name=f"dpo-{method}", steps=6)
    train_local(cfg, show_progress=False)
    run_dir = tmp_path / "runs" / cfg.run.name
    first = records(run_dir, "loss")
    assert abs(first[0]["loss"] - LN2) < 1e-5 and first[-1]["loss"] < first[0]["loss"]
    if method == "lora":  # the SFT adapters merged into their base: this run's base and its reference
        assert (run_dir / "base" / "config.json").is_file()
        merged = json.loads((run_dir / "base" / "ftdist.json").read_text())
        assert merged["merged"] and merged["trained_method"] == "lora"
    shutil.rmtree(run_dir / "final")  # as if killed after step 3's checkpoint
    train_local(cfg, show_progress=False)
    assert [r["event"] for r in read_metrics(run_dir / "metrics.jsonl") if "event" in r] == ["start", "resume"]
    again = records(run_dir, "loss")
    for key in ("loss", "rewards_chosen", "rewards_rejected", "reward_accuracy"):
        assert [r[key] for r in again] == pytest.approx([r[key] for r in first], rel=1e-6, abs=1e-9), key
    result = run_cli("export", str(run_dir), "--out", str(tmp_path / "exported"), *(["--merge"] if method == "lora" else []))
    assert result.returncode == 0, result.stderr
    result = run_cli("generate", str(tmp_path / "exported"), "--prompt", "pick 3 digits:", "--max-new-tokens", "4")
    assert result.returncode == 0 and "pick 3 digits:" in result.stdout, result.stderr
