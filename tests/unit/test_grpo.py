"""objective grpo, the parts: group advantages, the KL estimator, the clipped loss and its three
normalisations against TRL's GRPOTrainer (the loss and every gradient, fp32), the sampling seed,
rewards (built-ins, a function of yours, and each way one can fail), prompt rows, and what the
config refuses. (Training end to end, resumed, on Ray workers: tests/e2e/test_grpo_e2e.py.)"""

import copy
import json
import math
import textwrap

import pytest
import torch

from ftdist.config.load import validate_config
from ftdist.errors import UserError
from ftdist.objectives.grpo import (
    completion_batch,
    count_of,
    group_advantages,
    kl_k3,
    sampling_seed,
    summed_loss,
    token_losses,
)
from ftdist.objectives.rewards import load_rewards, score
from tests.conftest import DEMO, tiny_config


def grpo_config(tmp_path, *overrides, rewards="[{function: exact_match, column: completion}]"):
    return tiny_config(tmp_path, "objective=grpo", f"grpo.rewards={rewards}", "grpo.max_new_tokens=8",
                       "grpo.num_generations=4", "train.batch_size=4", "train.micro_batch_size=2", *overrides)


# ---------------------------------------------------------------- advantages, KL, the loss


def test_advantages_are_standardised_within_each_group_and_unscored_completions_get_none():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, math.nan, 0.0, math.nan])
    advantages, no_spread = group_advantages(rewards, 4)
    first = rewards[:4]
    assert advantages[:4] == pytest.approx(((first - first.mean()) / (first.std() + 1e-4)).tolist(), rel=1e-6)
    assert advantages[4:8].tolist() == [0.0] * 4 and no_spread[4:8].all() and not no_spread[:4].any()
    scored = torch.tensor([2.0, 0.0])  # the NaNs are out of the mean and deviation, and get 0
    assert advantages[8:].tolist() == pytest.approx([(2 - 1) / (scored.std() + 1e-4), 0.0, -1 / (scored.std() + 1e-4),
                                                     0.0], rel=1e-6)
    unscaled, _ = group_advantages(rewards, 4, scale=False)
    assert unscaled[:4].tolist() == [0.5, -0.5, -0.5, 0.5]


def test_the_kl_estimate_is_zero_at_the_reference_positive_elsewhere_and_unbiased():
    logps = torch.tensor([-1.0, -2.0, -0.5])
    assert kl_k3(logps, logps).tolist() == [0.0, 0.0, 0.0]
    assert (kl_k3(logps, logps + torch.tensor([0.3, -0.7, 1.0])) > 0).all()
    # E_{x~p}[k3] = KL(p || q): sampled from p, the mean of k3 is the exact KL of two categoricals.
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.3, 0.5])
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    exact = float((p * (p / q).log()).sum())
    assert float(kl_k3(p.log()[x], q.log()[x]).mean()) == pytest.approx(exact, rel=0.02)


def test_the_ratio_is_clipped_only_where_it_would_help_and_the_sum_is_normalised_as_asked():
    logps = torch.tensor([0.0, 0.0, 0.0, 0.0])
    old = torch.log(torch.tensor([1 / 1.5, 1 / 1.5, 1 / 0.5, 1 / 0.5]))  # ratios 1.5, 1.5, 0.5, 0.5
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    losses, clipped, kl = token_losses(logps, old, advantages, 0.2, 0.2)
    assert losses.tolist() == pytest.approx([-1.2, 1.5, -0.5, 0.8]) and clipped.tolist() == [True, False, False, True]
    assert kl is None
    sequence = torch.tensor([0, 0, 0, 1])
    assert float(summed_loss(losses, sequence, 2, "token")) == pytest.approx(0.6)
    assert float(summed_loss(losses, sequence, 2, "sequence")) == pytest.approx((-1.2 + 1.5 - 0.5) / 3 + 0.8)
    assert [count_of(k, 4, 2, 8) for k in ("token", "sequence", "dr_grpo")] == [4, 2, 16]


@pytest.mark.parametrize("kind, kl_correction", [("token", False), ("sequence", False), ("dr_grpo", False),
                                                 ("token", True)])
def test_the_loss_and_its_gradients_equal_trls_grpo_trainer(tmp_path, kind, kl_correction):
    """TRL's GRPOTrainer._compute_loss, the peer, on the same model, prompts, completions,
    advantages, sampling and reference log-probs (fp32, temperature 0.7, beta and a clip range
    that bites): the same loss and the same gradient of every weight, within 1e-5."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from ftdist.model.build import build_model
    from ftdist.model.source import build_initial_model
    from ftdist.objectives.tokens import LogProbHead, token_logps

    torch.manual_seed(0)
    cfg = grpo_config(tmp_path, "model.init.num_layers=2", "train.chunked_loss=false")
    build_initial_model(cfg, tmp_path / "base")
    bundle = build_model(cfg, str(tmp_path / "base"), torch.device("cpu"))
    model, tokenizer = bundle.model, bundle.tokenizer
    model.config.use_cache = False
    ours_model = copy.deepcopy(model)
    prompts = [[5, 9, 14, 3], [7, 8, 2, 11]]  # one length: no left padding, so positions agree
    completions = [[20, 21, 22], [23, 24], [25, 26, 27, 28], [29], [30, 31], [32, 33, 34], [35, 36, 37, 38], [39, 40]]
    n, width = len(completions), max(map(len, completions))
    generations = n // len(prompts)
    mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completions])
    g = torch.Generator().manual_seed(1)
    advantages = torch.randn(n, generator=g)
    old = -3 - torch.rand(n, width, generator=g) * 2  # log-probs of the policy that sampled: ratios far from 1
    ref = -3 - torch.rand(n, width, generator=g) * 2
    beta, temperature = 0.05, 0.7

    args = GRPOConfig(output_dir=str(tmp_path / "trl"), loss_type={"token": "dapo", "sequence": "grpo",
                                                                     "dr_grpo": "dr_grpo"}[kind],
                      beta=beta, epsilon=0.2, epsilon_high=0.28, temperature=temperature,
                      use_bias_correction_kl=kl_correction,
                      num_generations=generations, per_device_train_batch_size=n, max_completion_length=width,
                      report_to=[], use_cpu=True, bf16=False, logging_steps=1)
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                          train_dataset=Dataset.from_list([{"prompt": "x"}] * n), processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1
    trl_model = trainer.model
    trl_model.train()
    inputs = {"prompt_ids": torch.tensor([p for p in prompts for _ in range(generations)]),
              "prompt_mask": torch.ones(n, len(prompts[0]), dtype=torch.long),
              "completion_ids": torch.tensor([c + [0] * (width - len(c)) for c in completions]),
              "completion_mask": mask, "advantages": advantages, "old_per_token_logps": old,
              "ref_per_token_logps": ref, "num_items_in_batch": mask.sum()}
    theirs = trainer._compute_loss(trl_model, inputs)
    theirs.backward()

    head = LogProbHead(ours_model.get_output_embeddings(), temperature)
    batch = completion_batch([p for p in prompts for _ in range(generations)], completions, tokenizer.pad_token_id)
    ours_model.train()
    logps = token_logps(ours_model, batch, torch.device("cpu"), head, "sdpa")
    taken = mask.flatten().nonzero().squeeze(1)
    sequence = taken // width
    losses, _, _ = token_losses(logps, old.flatten()[taken], advantages[sequence], 0.2, 0.28, beta,
                                ref.flatten()[taken], kl_correction)
    ours = summed_loss(losses, sequence, n, kind) / count_of(kind, len(taken), n, width)
    ours.backward()

    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), abs=1e-5)
    trl_grads = dict(trl_model.named_parameters())
    for name, p in ours_model.named_parameters():
        assert torch.allclose(p.grad, trl_grads[name].grad, atol=1e-5, rtol=1e-4), name


def test_each_micro_batch_of_each_batch_samples_with_its_own_seed_the_same_after_a_resume():
    seeds = {sampling_seed(42, batch, first) for batch in range(50) for first in range(8)}
    assert len(seeds) == 400 and sampling_seed(42, 3, 1) == sampling_seed(42, 3, 1) != sampling_seed(43, 3, 1)


# ---------------------------------------------------------------- rewards


def reward_specs(tmp_path, rewards: str):
    return grpo_config(tmp_path, rewards=rewards).grpo.rewards


def test_built_in_rewards_score_as_documented(tmp_path):
    specs = reward_specs(tmp_path, "[{function: exact_match, column: answer}, {function: regex, pattern: '^[0-9]+$'}, "
                                   "{function: json, column: answer}, {function: length, target: 4}]")
    completions = [" 123 ", "12a", '{"a": 1}', "123456"]
    columns = {"answer": ["123", "12a", {"a": 1}, "1"]}
    table = score(load_rewards(specs), ["p"] * 4, completions, columns, ["row 1"] * 4)
    assert [row[0] for row in table] == [1.0, 1.0, 0.0, 0.0]  # stripped equality
    assert [row[1] for row in table] == [0.0, 0.0, 0.0, 1.0]  # " 123 " has spaces
    assert [row[2] for row in table] == [1.0, 0.0, 1.0, 0.0]  # JSON equal to the column (123 == "123" read as JSON)
    assert [row[3] for row in table] == [-0.25, 0.0, -1.0, -0.5]
    chat = [[{"role": "assistant", "content": "123"}]]  # a chat prompt's completion: its assistant turn
    assert score(load_rewards(specs[:1]), ["p"], chat, {"answer": ["123"]}, ["row 1"]) == [[1.0]]


def test_a_function_of_yours_is_called_as_trl_calls_it_and_none_means_not_scored(tmp_path, monkeypatch):
    (tmp_path / "yourrewards.py").write_text(textwrap.dedent("""
        SEEN = []
        def correct(prompts, completions, answer, **rest):
            SEEN.append((prompts, completions, answer, sorted(rest)))
            return [None if c == "skip" else float(c == a) for c, a in zip(completions, answer)]
    """))
    monkeypatch.chdir(tmp_path)  # found from the working directory, as python -m finds a module
    specs = reward_specs(tmp_path, "[{function: 'yourrewards:correct', weight: 2}]")
    (reward,) = load_rewards(specs)
    assert reward.weight == 2
    table = score([reward], ["p1", "p1"], ["7", "skip"], {"answer": ["7", "7"], "level": [1, 1]}, ["row 1"] * 2)
    assert table[0] == [1.0] and math.isnan(table[1][0])
    import yourrewards

    assert yourrewards.SEEN == [(["p1", "p1"], ["7", "skip"], ["7", "7"], ["level"])]


@pytest.mark.parametrize("body, said", [
    ("raise ZeroDivisionError('oops')", "grpo.rewards.0 (myfail:bad) raised ZeroDivisionError: oops (on the "
                                        "completions of row 3"),
    ("return [1.0]", "grpo.rewards.0 (myfail:bad) returned 1 values for 2 completions (on row 3"),
    ("return [1.0, float('nan')]", "grpo.rewards.0 (myfail:bad) returned nan for a completion of row 4"),
    ("return [1.0, 'yes']", "grpo.rewards.0 (myfail:bad) returned str 'yes' for a completion of row 4"),
    ("return 3", "grpo.rewards.0 (myfail:bad) returned a int, not a list"),
    ("return [c for c in columns['missing']]", "the prompt rows have no column 'missing' (they have answer)"),
])
def test_a_reward_that_fails_stops_the_run_naming_it_and_the_row(tmp_path, monkeypatch, body, said):
    module = f"myfail{abs(hash(body))}"  # each case its own module (Python keeps what it imported)
    (tmp_path / f"{module}.py").write_text(f"def bad(prompts, completions, **columns):\n    {body}\n")
    monkeypatch.chdir(tmp_path)
    rewards = load_rewards(reward_specs(tmp_path, f"[{{function: '{module}:bad'}}]"))
    said = said.replace("myfail:", f"{module}:")
    with pytest.raises(UserError) as e:
        score(rewards, ["p", "p"], ["a", "b"], {"answer": ["1", "2"]}, ["row 3", "row 4"])
    assert said in str(e.value) and len(str(e.value)) < 600


@pytest.mark.parametrize("rewards, said", [
    ("[]", "objective grpo learns from rewards: set grpo.rewards"),
    ("[{function: exact_macth, column: a}]", "did you mean exact_match?"),
    ("[{function: exact_match}]", "the exact_match reward needs column"),
    ("[{function: regex, pattern: '('}]", "is not a regular expression"),
    ("[{function: length, target: 3, column: a}]", "the length reward takes no column"),
    ("[{function: 'nosuchmodule:f'}]", "no module nosuchmodule in the working directory"),
    ("[{function: 'json:dumsp'}]", "has no function dumsp; did you mean json:dump"),
    ("[{function: 'json:dumps', column: a}]", "settings of the built-in rewards"),
])
def test_a_reward_that_cannot_be_used_is_refused_with_the_config(tmp_path, rewards, said):
    with pytest.raises(UserError) as e:
        grpo_config(tmp_path, rewards=rewards)
    assert said in str(e.value)


@pytest.mark.parametrize("override, said", [
    ("grpo.max_new_tokens=64", "grpo.max_new_tokens 64 leaves no room for the prompt in data.max_length 64"),
    ("regularization.replay.data=" + str(DEMO / "replay.txt"), "regularization.replay mixes text into the batches"),
    ("data.format=chat", "objective grpo trains on prompt rows ({prompt, the columns its rewards read}): set "
                         "data.format to prompt (or auto), not chat"),
])
def test_settings_that_do_not_fit_grpo_are_refused(tmp_path, override, said):
    with pytest.raises(UserError) as e:
        grpo_config(tmp_path, override)
    assert said in str(e.value)


# ---------------------------------------------------------------- prompt rows


def test_prompt_rows_keep_their_columns_and_chat_prompts_end_in_the_generation_prompt(tmp_path):
    from ftdist.data.prepared import prompt_room
    from ftdist.data.rows import build_dataset, collate
    from ftdist.model.build import build_model
    from ftdist.model.source import build_initial_model

    rows = [{"prompt": "reverse 12 =", "answer": "21", "level": 1},
            {"prompt": [{"role": "user", "content": "reverse 345 ="}], "answer": "543", "level": 2}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows * 4))
    cfg = grpo_config(tmp_path, f"data.train={path}", "data.eval=null", "data.eval_fraction=0",
                      "data.chat_template=chatml")
    build_initial_model(cfg, tmp_path / "base")
    tokenizer = build_model(cfg, str(tmp_path / "base"), torch.device("cpu")).tokenizer
    dataset = build_dataset(cfg.data, tokenizer, 0, None, "prompts", prompt_room(cfg))
    assert dataset.format == "prompt" and len(dataset.train) == 8
    batch = collate(dataset.train, list(range(8)), tokenizer.pad_token_id)
    metas = [json.loads(m) for m in batch["meta"]]
    assert sorted(m["answer"] for m in metas) == ["21"] * 4 + ["543"] * 4
    assert (batch["targets"] == -100).all()  # nothing to learn from but rewards
    chat = next(i for i, m in enumerate(metas) if isinstance(m["prompt"], list))
    ids = batch["input_ids"][chat][batch["doc"][chat] >= 0].tolist()
    rendered = tokenizer.apply_chat_template(metas[chat]["prompt"], tokenize=False, add_generation_prompt=True)
    assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_rows_that_are_not_prompts_are_refused_for_grpo_and_prompt_rows_for_sft(tmp_path):
    from ftdist.data.records import read_train

    with pytest.raises(UserError) as e:
        read_train(grpo_config(tmp_path, f"data.train={DEMO / 'chat.jsonl'}").data, rows="prompts")
    assert "rows are chat, but objective grpo samples its own completions from prompt rows" in str(e.value)
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi"}\n')
    raw = grpo_config(tmp_path).model_dump(mode="json")
    raw.update(objective="sft")
    raw["data"].update(train=str(path), format="prompt")
    with pytest.raises(UserError) as e:
        validate_config(raw)
    assert "data.format prompt: prompt rows ({prompt, the columns its rewards read}) train with objective: grpo" \
        in str(e.value)


# ---------------------------------------------------------------- the estimate, Tune


def test_the_estimate_counts_every_completion_and_the_kv_cache_of_sampling(tmp_path):
    from transformers import LlamaConfig

    from ftdist.launch.fit import size_up
    from ftdist.objectives.registry import resolve
    from ftdist.sizing.memory import activation_bytes, run_shell

    model = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=2, vocab_size=1000)
    few, many = (grpo_config(tmp_path, f"grpo.num_generations={g}", "data.max_length=128") for g in (2, 16))
    acts = [activation_bytes(c, model, run_shell(c, model), 2, "cuda") for c in (few, many)]
    assert acts[1] > 7 * acts[0]  # 8x the sequences trained on per row
    # The KV cache of micro_batch_size x G sequences of max_length: 2 (K, V) x layers x kv heads x head dim.
    cache = 2 * 4 * 2 * 32 * (2 * 16) * 128 * 2
    assert resolve(many).generation_bytes(model, 2) == cache + 3 * 2 * 16 * 1000 * 4
    lines = size_up(grpo_config(tmp_path, "grpo.num_generations=2"), 80).lines
    assert "micro batch 2 prompts x 2 completions x 64 tokens" in lines[1], lines


def test_a_search_over_grpo_maximises_the_held_out_reward_unless_told_otherwise(tmp_path):
    raw = grpo_config(tmp_path).model_dump(mode="json")
    raw["tune"] = {"name": "s", "num_samples": 2, "space": {"grpo.beta": {"choice": [0.0, 0.04]},
                                                            "grpo.num_generations": {"choice": [4, 8]}}}
    cfg = validate_config(raw)
    assert (cfg.tune.metric, cfg.tune.mode) == ("eval_reward", "max")
    raw["tune"]["metric"], raw["tune"]["mode"] = "eval_reward", "min"
    with pytest.raises(UserError, match="tune.mode min with tune.metric eval_reward: higher is better"):
        validate_config(raw)


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".json"])
def test_prompt_rows_come_from_every_file_type_with_their_columns(tmp_path, suffix):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ftdist.data.prepared import prompt_room
    from ftdist.data.rows import build_dataset
    from ftdist.model.build import build_model
    from ftdist.model.source import build_initial_model

    rows = [{"prompt": f"reverse {n} =", "answer": str(n)[::-1], "level": i % 3} for i, n in enumerate(range(100, 108))]
    path = tmp_path / f"prompts{suffix}"
    if suffix == ".csv":
        path.write_text("prompt,answer,level\n" + "".join(f"{r['prompt']},{r['answer']},{r['level']}\n" for r in rows))
    elif suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text(json.dumps(rows))
    cfg = grpo_config(tmp_path, f"data.train={path}", "data.eval=null", "data.eval_fraction=0")
    build_initial_model(cfg, tmp_path / "base")
    tokenizer = build_model(cfg, str(tmp_path / "base"), torch.device("cpu")).tokenizer
    dataset = build_dataset(cfg.data, tokenizer, 0, None, "prompts", prompt_room(cfg))
    metas = sorted((json.loads(m) for m in dataset.train.meta), key=lambda m: m["prompt"])
    assert [m["prompt"] for m in metas] == [r["prompt"] for r in rows]
    assert [str(m["answer"]) for m in metas] == [r["answer"] for r in rows]
    assert [int(m["level"]) for m in metas] == [r["level"] for r in rows]
