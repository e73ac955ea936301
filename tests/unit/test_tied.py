"""Tied embeddings (tie_word_embeddings: the LM head's weight is the input embeddings', one tensor,
as in SmolLM2) on every path, with a tiny tied Llama: freezing, LoRA, the chunked loss, the
classifier's head, DPO's reference copy, checkpoints and resume, export and merge, the memory
estimate. (Full fine-tuning under ZeRO-3 on 2 workers: the DPO case "full-3-tied" of
tests/e2e/test_distributed.py.)"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ftdist.artifacts.export import export
from ftdist.cli import main
from ftdist.errors import UserError
from ftdist.io.metrics_log import read_metrics
from ftdist.launch.local import train_local
from ftdist.model.build import build_model
from ftdist.model.source import build_initial_model, init_model_config
from tests.conftest import tiny_config, write_config

TIED = "model.init.tie_word_embeddings=true"
EMBEDDINGS, HEAD = "model.embed_tokens.weight", "lm_head.weight"
# Checkpoint at step 3, the final model at step 6; no evaluation.
SHORT = ("train.max_steps=6", "checkpoint.every_steps=3", "data.eval=null", "data.eval_fraction=0")
BATCH = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("tied-base")
    build_initial_model(tiny_config(root, TIED), root / "base")
    return str(root / "base")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, base) -> dict[str, Path]:
    """A full run and a LoRA run (all-linear) of the tied base, checkpoints at step 3."""
    tmp = tmp_path_factory.mktemp("tied-runs")
    found = {}
    for method in ("full", "lora"):
        cfg = tiny_config(tmp, f"method={method}", "model.init=null", f"model.name_or_path={base}", "train.lr=1e-2",
                          *SHORT, name=method)
        found[method] = Path(train_local(cfg, show_progress=False)["run_dir"])
    return found


def built(tmp_path, base: str, *overrides: str):
    cfg = tiny_config(tmp_path, "model.init=null", f"model.name_or_path={base}", *overrides)
    return build_model(cfg, base, torch.device("cpu"))


def is_tied(model) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def weight_names(path: Path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def saved_tied(folder: Path) -> bool:
    """A model directory that keeps the tie: its config says so, its weights hold the tensor once."""
    names = weight_names(folder / "model.safetensors")
    return json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is True \
        and EMBEDDINGS in names and HEAD not in names


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model.eval()(input_ids=BATCH).logits.float()


# ---------------------------------------------------------------- 1. freezing


def test_frozen_blocks_freeze_a_tied_head_with_the_embeddings_and_the_model_line_says_so(tmp_path, base):
    for freeze, state in ((0, "trained"), (2, "frozen")):
        bundle = built(tmp_path, base, "method=full", f"freeze_layers={freeze}")
        head = bundle.model.get_output_embeddings().weight
        assert is_tied(bundle.model) and head.requires_grad == (freeze == 0)
        assert bundle.info.tied_head == state and bundle.info.record()["tied_head"] == state
        assert f"the LM head is tied to the input embeddings (one tensor): {state} with them" in bundle.info.describe()
        assert bundle.info.trainable_params == sum(p.numel() for p in bundle.model.parameters() if p.requires_grad)


def test_feature_extraction_of_a_tied_head_is_refused_with_the_alternatives(tmp_path, base, capsys):
    with pytest.raises(UserError, match=r"freeze_layers: all .*tie_word_embeddings.*freeze_layers: N below 4"):
        built(tmp_path, base, "method=full", "freeze_layers=all")
    # Before anything loads: `ftdist plan` (as preflight) exits 2 with the one message.
    config = write_config(tmp_path, tiny_config(tmp_path, TIED, "freeze_layers=all"))
    assert main(["plan", str(config)]) == 2
    assert "tie_word_embeddings" in capsys.readouterr().err
    # A classifier's own head is what feature extraction trains there: allowed.
    probe = built(tmp_path, base, "method=full", "freeze_layers=all", "task=classification",
                  "data.format=classification")
    assert {n for n, p in probe.model.named_parameters() if p.requires_grad} == {"score.weight"}


def test_an_untied_model_says_nothing_of_a_tie(tmp_path):
    untied = tmp_path / "untied"
    build_initial_model(tiny_config(tmp_path), untied)
    bundle = built(tmp_path, str(untied), "method=full", "freeze_layers=2")
    assert bundle.info.tied_head is None and "tied" not in bundle.info.describe()


# ---------------------------------------------------------------- 2. LoRA on all-linear


def test_lora_on_all_linear_leaves_the_tied_head_alone_and_saves_only_the_adapters(tmp_path, base, runs):
    model = built(tmp_path, base, "method=lora").model
    assert is_tied(model) and type(model.get_output_embeddings()) is torch.nn.Linear  # no adapter on the head
    assert not model.get_output_embeddings().weight.requires_grad
    for folder in (runs["lora"] / "final", runs["lora"] / "checkpoints" / "step-3" / "adapter"):
        names = weight_names(folder / "adapter_model.safetensors")
        assert names and all("lora_" in n for n in names), folder
        embeddings = 384 * 64 * 4
        assert (folder / "adapter_model.safetensors").stat().st_size < 2 * embeddings


# ---------------------------------------------------------------- 3. the chunked loss


def test_the_chunked_loss_through_a_tied_head_matches_transformers_loss_and_gradients(tmp_path, base):
    from transformers import AutoModelForCausalLM

    from ftdist.objectives.tokens import loss_sum

    bundle = built(tmp_path, base, "method=full", "train.chunked_loss=true")
    model = bundle.model
    assert bundle.head.head.weight is model.get_input_embeddings().weight  # the head computes with the tied tensor
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    assert is_tied(reference)
    labels = BATCH.clone()
    labels[:, :5] = -100  # a prompt: no loss there
    targets = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], 1)  # what the rows hold: the next token
    batch = {"input_ids": BATCH, "position_ids": torch.arange(24).repeat(2, 1), "targets": targets,
             "doc": torch.zeros(2, 24, dtype=torch.long)}
    ours = loss_sum(model, batch, torch.device("cpu"), bundle.head, bundle.attention)
    theirs = reference(input_ids=BATCH, labels=labels).loss * (targets != -100).sum()
    torch.testing.assert_close(ours, theirs)
    ours.backward()
    theirs.backward()
    # The head's gradient and the embeddings' lookup gradient, summed in the one tensor, as transformers has it.
    ours_grad, theirs_grad = model.get_input_embeddings().weight.grad, reference.get_input_embeddings().weight.grad
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-4, atol=1e-5)
    looked_up = set(BATCH.flatten().tolist())
    unused = [t for t in range(384) if t not in looked_up]
    assert ours_grad[unused].abs().sum() > 0  # rows no input uses: the head's share reached them


# ---------------------------------------------------------------- 4. the classification head


def test_a_classifier_on_a_tied_base_saves_the_embeddings_once_and_loads_as_trained(tmp_path, base):
    from ftdist.artifacts.classify import load_classifier
    from tests.unit.test_classification import topic_rows, write_rows

    train = write_rows(tmp_path / "train.jsonl", topic_rows(32, 0))
    cfg = tiny_config(tmp_path, "task=classification", "method=full", "model.init=null", f"model.name_or_path={base}",
                      f"data.train={train}", *SHORT, name="classify")
    final = Path(train_local(cfg, show_progress=False)["final_dir"])
    saved = load_file(str(final / "model.safetensors"))
    assert EMBEDDINGS in saved and HEAD not in saved and "score.weight" in saved  # the task never used the LM head
    model, _, _ = load_classifier(final)
    state = model.state_dict()
    for key, tensor in saved.items():
        assert torch.equal(state[key], tensor), key  # nothing initialised anew
    untrained = load_file(str(Path(base) / "model.safetensors"))[EMBEDDINGS]
    assert not torch.equal(saved[EMBEDDINGS], untrained)  # the tied tensor trained (as embeddings)


# ---------------------------------------------------------------- 5. DPO's reference copy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dpos_frozen_reference_keeps_the_tie_in_the_copy_apart_from_the_policy(tmp_path, base, dtype):
    from ftdist.objectives.dpo import frozen_reference

    policy = built(tmp_path, base, "method=full").model
    before = policy.get_input_embeddings().weight.detach().clone()
    reference, head = frozen_reference(policy, dtype)
    weight = reference.get_input_embeddings().weight
    assert is_tied(reference) and head.head.weight is weight and weight.dtype == dtype
    assert weight.data_ptr() != policy.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        policy.get_input_embeddings().weight.add_(1.0)  # a policy step moves the policy only
    assert is_tied(policy) and torch.equal(weight.float(), before.to(dtype).float())
    assert not weight.requires_grad and policy.get_input_embeddings().weight.requires_grad


# ---------------------------------------------------------------- 6. checkpoints and resume


def test_checkpoints_hold_the_tied_tensor_once_and_resume_to_the_same_curve(tmp_path, base, runs):
    run = runs["full"]
    checkpoint = run / "checkpoints" / "step-3"
    assert EMBEDDINGS in weight_names(checkpoint / "model.safetensors")
    assert HEAD not in weight_names(checkpoint / "model.safetensors")
    assert saved_tied(run / "final")
    # As if stopped after step 3: the checkpoint's one tensor restores the embeddings and the head alike.
    copy = tmp_path / "runs" / run.name
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "final")
    shutil.rmtree(copy / "checkpoints" / "step-6", ignore_errors=True)
    (copy / "summary.json").unlink(missing_ok=True)
    cfg = tiny_config(tmp_path, "method=full", "model.init=null", f"model.name_or_path={base}", "train.lr=1e-2",
                      *SHORT, name=run.name)
    train_local(cfg, show_progress=False)

    def losses(folder):
        return [(r["step"], r["loss"]) for r in read_metrics(folder / "metrics.jsonl") if "loss" in r]

    assert any(r.get("event") == "resume" for r in read_metrics(copy / "metrics.jsonl"))
    assert losses(copy) == pytest.approx(losses(run), rel=1e-5)
    assert saved_tied(copy / "final")
    ours, theirs = load_file(str(copy / "final" / "model.safetensors")), load_file(str(run / "final" / "model.safetensors"))
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-6)


def test_the_plain_engines_state_round_trip_keeps_the_tie(tmp_path, base):
    from ftdist.engines.plain import PlainEngine
    from ftdist.training.optim import build_optimizer

    def engine():
        cfg = tiny_config(tmp_path)
        model = built(tmp_path, base, "method=full").model
        return PlainEngine(model, *build_optimizer(cfg, model, 4), grad_clip=1.0)

    trained = engine()
    trained.step([{"input_ids": BATCH}], lambda forward, batch: forward(input_ids=batch["input_ids"],
                                                                        labels=batch["input_ids"]).loss)
    trained.save(tmp_path, is_main=True)()
    assert weight_names(tmp_path / "model.safetensors") >= {EMBEDDINGS} and HEAD not in weight_names(
        tmp_path / "model.safetensors")
    restored = engine()
    restored.load(tmp_path, {"engine": "plain"})
    assert is_tied(restored.model)
    assert torch.equal(restored.model.get_output_embeddings().weight, trained.model.get_input_embeddings().weight)


# ---------------------------------------------------------------- 7. export and merge


def test_exports_and_merges_stay_tied_and_compute_what_the_run_computes(tmp_path, base, runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for source, name in ((runs["full"], "full"), (runs["full"] / "checkpoints" / "step-3", "checkpoint"),
                         (runs["lora"], "merged"), (runs["lora"] / "checkpoints" / "step-3", "merged-checkpoint")):
        out = tmp_path / name
        export(str(source), str(out), merge=name.startswith("merged"))
        assert saved_tied(out), name
        model = AutoModelForCausalLM.from_pretrained(out)
        assert is_tied(model), name
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "full")),
                       logits(AutoModelForCausalLM.from_pretrained(runs["full"] / "final")))
    checkpoint = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint")
    saved = load_file(str(runs["full"] / "checkpoints" / "step-3" / "model.safetensors"))
    assert torch.equal(checkpoint.get_output_embeddings().weight, saved[EMBEDDINGS])
    adapters = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), runs["lora"] / "final")
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")), logits(adapters),
                               rtol=0, atol=1e-4)


# ---------------------------------------------------------------- 8. the memory estimate


def test_the_memory_estimate_counts_tied_weights_once(tmp_path, base):
    from ftdist.sizing.memory import estimate

    tied_cfg, untied_cfg = tiny_config(tmp_path, TIED), tiny_config(tmp_path)
    tied = estimate(tied_cfg, init_model_config(tied_cfg.model.init), device_type="cpu")
    untied = estimate(untied_cfg, init_model_config(untied_cfg.model.init), device_type="cpu")
    assert untied.total_params - tied.total_params == 384 * 64  # one vocabulary x hidden matrix fewer
    model = built(tmp_path, base, "method=full").model
    assert tied.total_params == tied.trainable_params == sum(p.numel() for p in model.parameters())
    frozen_cfg = tiny_config(tmp_path, TIED, "freeze_layers=2")
    frozen = estimate(frozen_cfg, init_model_config(frozen_cfg.model.init), device_type="cpu")
    assert frozen.trainable_params == built(tmp_path, base, "method=full", "freeze_layers=2").info.trainable_params
