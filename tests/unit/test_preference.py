"""objective: dpo: {prompt, chosen, rejected} rows, each pair's two sequences in one row; the
policy's log-probs from a chunked head, the reference's with adapters off, from a frozen copy
or precomputed; the DPO and IPO losses against TRL's DPOTrainer; rewards and their accuracy
in the log, in evaluations and for Tune; starting from an SFT run's final/; resume and export
as for SFT. (Ray workers under ZeRO-2 and ZeRO-3: tests/test_distributed.py.)"""

import json
import math
import random

import pytest
import torch

from ftdist.config.load import validate_config
from ftdist.data.rows import IGNORE, build_dataset
from ftdist.data.tokenizer import train_tokenizer
from ftdist.errors import UserError
from ftdist.io.metrics_log import read_metrics
from ftdist.launch.local import train_local
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
    from ftdist.data.chat_templates import apply_choice

    apply_choice(tokenizer, "chatml")
    rows = build_dataset(cfg.data, tokenizer, 0, shape="pairs").train
    responses = []
    for i in range(len(rows)):
        doc, targets = rows.row("doc", i), rows.row("targets", i)
        n_docs = int(doc.max()) + 1
        assert n_docs % 2 == 0 and (n_docs == 2 or packing)  # whole pairs only; one a row without packing
        for d in range(n_docs):
            trained = targets[(doc == d) & (targets != IGNORE)]
            responses.append(tokenizer.decode(trained.tolist()))
    from ftdist.data.rows import turns_of

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
    data = build_dataset(cfg.data.model_copy(update={"skip_bad_rows": True}), tokenizer, 0, shape="pairs")
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

    with pytest.raises(UserError, match="tune.metric eval_reward_accuracy is not a metric of objective sft .it is one of dpo.s: set objective: dpo"):
        searched("sft", "max")
    with pytest.raises(UserError, match="set tune.mode: max"):
        searched("dpo", "min")
    assert searched("dpo", "max").tune.space["dpo.beta"].choice == [0.1, 0.3]
    with pytest.raises(UserError, match=r"dpo.beta"):
        tiny_config(tmp_path, "objective=dpo", "dpo.beta=0")


# ---------------------------------------------------------------- the loss


def test_the_chunked_log_probs_and_their_gradients_equal_log_softmaxs():
    from ftdist.objectives.tokens import LinearLogProbs

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


# ---------------------------------------------------------------- runs


def test_the_memory_estimate_counts_the_reference(tmp_path):
    from ftdist.model.source import init_model_config
    from ftdist.sizing import memory

    def estimate(*overrides, workers=1, stage=0):
        cfg = tiny_config(tmp_path, *overrides, f"distributed.zero_stage={stage}")
        return memory.estimate(cfg, init_model_config(cfg.model.init), workers, "deepspeed", torch.bfloat16)

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
