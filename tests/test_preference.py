"""objective: dpo: {prompt, chosen, rejected} rows, each pair's two sequences in one row; the
policy's log-probs from a chunked head, the reference's with adapters off, from a frozen copy
or precomputed; the DPO and IPO losses against TRL's DPOTrainer; rewards and their accuracy
in the log, in evaluations and for Tune; starting from an SFT run's final/; resume and export
as for SFT. (Ray workers under ZeRO-2 and ZeRO-3: tests/test_distributed.py.)"""

import json
import math
import random
import shutil

import pytest
import torch

from ftdist.config import validate_config
from ftdist.data import IGNORE, build_dataset
from ftdist.errors import UserError
from ftdist.local import train_local
from ftdist.metrics import read_metrics
from ftdist.tokenizer import train_tokenizer
from tests.conftest import DEMO, run_cli, tiny_config, write_config

LN2 = math.log(2)


def rule_pairs(n: int, seed: int) -> list[dict]:
    """The rule the chosen responses follow: even digits, where the rejected ones have odd."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randint(3, 5)
        rows.append({"prompt": f"pick {k} digits:", "chosen": " " + " ".join(rng.choice("02468") for _ in range(k)),
                     "rejected": " " + " ".join(rng.choice("13579") for _ in range(k))})
    return rows


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def dpo_config(tmp_path, base, *extra, name: str, steps: int = 30):
    train = write_rows(tmp_path / "pairs-train.jsonl", rule_pairs(256, 0))
    eval_ = write_rows(tmp_path / "pairs-eval.jsonl", rule_pairs(48, 1))
    return tiny_config(tmp_path, "objective=dpo", "model.init=null", f"model.name_or_path={base}",
                       f"data.train={train}", f"data.eval={eval_}", "data.max_length=32", f"train.max_steps={steps}",
                       "train.batch_size=16", "train.micro_batch_size=8", "train.warmup_steps=2",
                       f"train.eval_every={steps}", "train.log_every=1", "checkpoint.every_steps=1000",
                       "lora.dropout=0", *extra, name=name)


def records(run_dir, key: str) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if key in r]


# ---------------------------------------------------------------- rows


@pytest.mark.parametrize("packing", [True, False])
def test_a_pairs_chosen_and_rejected_are_documents_of_one_row_trained_on_the_response(tmp_path, packing):
    tokenizer = train_tokenizer([p for r in rule_pairs(64, 5) for p in r.values()], 320)
    pairs = rule_pairs(24, 2)
    chat = [{"prompt": [{"role": "user", "content": p["prompt"]}], "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": p["rejected"]} for p in pairs[:4]]  # a string response beside turns renders as a turn
    cfg = tiny_config(tmp_path, "objective=dpo", f"data.train={write_rows(tmp_path / 'p.jsonl', pairs + chat)}",
                      "data.eval=null", "data.eval_fraction=0", f"data.packing={str(packing).lower()}",
                      "data.max_length=96", "data.chat_template=chatml")
    from ftdist.chat_templates import apply_choice

    apply_choice(tokenizer, "chatml")
    rows = build_dataset(cfg.data, tokenizer, 0, pairs=True).train
    responses = []
    for i in range(len(rows)):
        doc, targets = rows.row("doc", i), rows.row("targets", i)
        n_docs = int(doc.max()) + 1
        assert n_docs % 2 == 0 and (n_docs == 2 or packing)  # whole pairs only; one a row without packing
        for d in range(n_docs):
            trained = targets[(doc == d) & (targets != IGNORE)]
            responses.append(tokenizer.decode(trained.tolist()))
    from ftdist.data import turns_of

    def response(record: dict, side: str) -> str:
        """What the pair's `side` trains on: the response and the end of sequence, or the
        assistant turn as the chat template renders it after the prompt."""
        if all(isinstance(record[k], str) for k in ("prompt", "chosen", "rejected")):
            return record[side] + tokenizer.eos_token
        prompt = turns_of(record["prompt"], "user")
        whole = tokenizer.apply_chat_template(prompt + turns_of(record[side], "assistant"), tokenize=False)
        return whole[len(tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)):]

    expected = sorted((response(r, "chosen"), response(r, "rejected")) for r in pairs + chat)
    assert sorted(zip(responses[0::2], responses[1::2])) == expected


def test_a_pair_whose_chosen_equals_its_rejected_is_skipped_and_counted_or_refused(tmp_path):
    pairs = rule_pairs(8, 3)
    pairs[5] = {**pairs[5], "rejected": pairs[5]["chosen"]}
    path = write_rows(tmp_path / "p.jsonl", pairs)
    cfg = tiny_config(tmp_path, "objective=dpo", f"data.train={path}", "data.eval=null", "data.eval_fraction=0")
    with pytest.raises(UserError, match=r"p.jsonl:6: .*\"chosen\" and \"rejected\" are the same response.*"
                                        r"data.skip_bad_rows"):
        train_local(cfg, show_progress=False)
    tokenizer = train_tokenizer([p for r in pairs for p in r.values()], 320)
    data = build_dataset(cfg.data.model_copy(update={"skip_bad_rows": True}), tokenizer, 0, pairs=True)
    assert data.stats["skipped_rows"] == 1 and data.stats["examples"] == 7


def test_a_preference_file_given_to_sft_or_an_sft_file_given_to_dpo_is_one_message_naming_both(tmp_path):
    pairs = write_rows(tmp_path / "pairs.jsonl", rule_pairs(8, 3))
    cfg = tiny_config(tmp_path, f"data.train={pairs}", "data.eval=null", "data.eval_fraction=0", name="sft")
    result = run_cli("train", str(write_config(tmp_path, cfg)), "--local")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "rows are preference pairs ({prompt, chosen, rejected}), but objective sft" in result.stderr
    assert "set objective: dpo" in result.stderr and "pairs.jsonl" in result.stderr
    with pytest.raises(UserError, match=r"data.train: .*train.jsonl: rows are prompt_completion, but objective dpo "
                                        r"trains on preference pairs \(\{prompt, chosen, rejected\}\)"):
        train_local(tiny_config(tmp_path, "objective=dpo", name="dpo"), show_progress=False)
    with pytest.raises(UserError, match="data.eval: .*rows are prompt_completion, but objective dpo"):
        train_local(tiny_config(tmp_path, "objective=dpo", f"data.train={pairs}", name="dpo-eval"), show_progress=False)


def test_bad_combinations_say_which_work(tmp_path):
    with pytest.raises(UserError, match="objective dpo trains a causal LM on preference pairs: use task: causal_lm"):
        tiny_config(tmp_path, "objective=dpo", "task=classification")
    with pytest.raises(UserError, match="set data.format to preference"):
        tiny_config(tmp_path, "objective=dpo", "data.format=prompt_completion")
    with pytest.raises(UserError, match="preference rows .* train with objective: dpo"):
        tiny_config(tmp_path, "data.format=preference")
    with pytest.raises(UserError, match="which objective dpo does not train on"):
        tiny_config(tmp_path, "objective=dpo", f"regularization.replay.data={DEMO / 'general.txt'}")
    def searched(objective: str, mode: str):
        raw = tiny_config(tmp_path, f"objective={objective}").model_dump(mode="json", exclude_none=True)
        raw["data"]["format"] = "auto"
        raw["tune"] = {"name": "s", "metric": "eval_reward_accuracy", "mode": mode,
                       "space": {"dpo.beta": {"choice": [0.1, 0.3]}}}
        return validate_config(raw)

    with pytest.raises(UserError, match="tune.metric eval_reward_accuracy is a preference-tuning metric"):
        searched("sft", "max")
    with pytest.raises(UserError, match="set tune.mode: max"):
        searched("dpo", "min")
    assert searched("dpo", "max").tune.space["dpo.beta"].choice == [0.1, 0.3]
    with pytest.raises(UserError, match=r"dpo.beta"):
        tiny_config(tmp_path, "objective=dpo", "dpo.beta=0")


# ---------------------------------------------------------------- the loss


def test_the_chunked_log_probs_and_their_gradients_equal_log_softmaxs():
    from ftdist.preference import LinearLogProbs

    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(50, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    upstream = torch.randn(37, dtype=torch.float64)
    ours = LinearLogProbs.apply(hidden, weight, bias, targets, 8)  # five chunks, the last short
    theirs = torch.log_softmax(hidden @ weight.T + bias, -1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-5)
    ours_grads = torch.autograd.grad((ours.double() * upstream).sum(), (hidden, weight, bias))
    their_grads = torch.autograd.grad((theirs * upstream).sum(), (hidden, weight, bias))
    for a, b in zip(ours_grads, their_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


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


# ---------------------------------------------------------------- runs


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
@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_dpo_run_starts_from_an_sft_runs_final_and_resumes_and_exports_as_sft_does(tmp_path, pretrained_base,
                                                                                    method):
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


def test_the_memory_estimate_counts_the_reference(tmp_path):
    from ftdist import memory
    from ftdist.model import init_model_config

    def estimate(*overrides, workers=1, stage=0):
        cfg = tiny_config(tmp_path, *overrides)
        return memory.estimate(cfg, init_model_config(cfg.model.init), workers, stage, torch.bfloat16)

    sft, dpo = estimate("method=full"), estimate("method=full", "objective=dpo", "data.format=auto")
    assert sft.reference == 0 and dpo.reference == dpo.total_params * 2  # a bf16 copy
    assert dpo.device_total > sft.device_total + dpo.reference  # and rows twice as long (a pair each)
    partitioned = estimate("method=full", "objective=dpo", workers=2, stage=3)
    assert partitioned.reference == dpo.reference / 2 and "reference" in partitioned.describe()
    assert estimate("method=full", "objective=dpo", "dpo.precompute_reference=true").reference == 0
    assert estimate("method=lora", "objective=dpo").reference == 0  # adapters off: the reference is the policy
    cfg = tiny_config(tmp_path, "method=full", "objective=dpo")
    tips = memory.advice(cfg, init_model_config(cfg.model.init), dpo, 1, torch.bfloat16, dpo.device_total / 2)
    assert any("dpo.precompute_reference: true" in tip for tip in tips)
