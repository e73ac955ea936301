"""End-to-end training on CPU: every method and freeze depth learns, what is frozen stays
frozen, QLoRA's base really is 4-bit, and the outputs load with plain transformers / peft."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftdist.io.metrics_log import read_metrics
from ftdist.launch.local import train_local
from tests.conftest import complete_checkpoints, tiny_config

pytestmark = pytest.mark.slow

METHOD_LR = {"full": "3e-3", "lora": "1e-2", "qlora": "1e-2"}


def on_base(base: Path) -> tuple[str, str]:
    """Overrides that fine-tune a pretrained model directory instead of random weights."""
    return "model.init=null", f"model.name_or_path={base}"


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def run(tmp_path, *overrides, name="t"):
    cfg = tiny_config(tmp_path, *overrides, name=name)
    summary = train_local(cfg, show_progress=False)
    return cfg, Path(summary["run_dir"]), summary


def assert_learned(run_dir: Path, factor: float = 0.85):
    """The held-out loss after training is clearly below the one before (logged at step 0)."""
    evals = [r["eval_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "eval_loss" in r]
    assert evals[-1] < factor * evals[0], f"eval loss did not fall enough: {evals[0]:.3f} -> {evals[-1]:.3f}"


# One run per method, across both architectures and with and without frozen blocks; what each
# (architecture, method, freeze depth) trains is checked without training in test_model.py.
CASES = [("llama", "full", 0), ("llama", "lora", 1), ("qwen2", "qlora", 1)]


@pytest.mark.parametrize("arch, method, freeze", CASES)
def test_each_method_and_freeze_depth_lowers_the_loss(tmp_path, pretrained_base, arch, method, freeze):
    # Full fine-tuning starts from random weights; adapters from a base that knows a related skill.
    model = (f"model.init.arch={arch}",) if method == "full" else on_base(pretrained_base(arch))
    cfg, run_dir, summary = run(tmp_path, f"method={method}", f"freeze_layers={freeze}", *model,
                                f"train.lr={METHOD_LR[method]}")
    assert_learned(run_dir)
    assert summary["frozen_blocks"] == freeze
    start = read_metrics(run_dir / "metrics.jsonl")[0]
    assert 0 < start["trainable_params"] <= start["total_params"]
    assert (run_dir / "final").is_dir() and (run_dir / "loss.png").stat().st_size > 1000


def weights_of(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def test_frozen_blocks_are_bit_identical_after_training(tmp_path):
    _, run_dir, _ = run(tmp_path, "freeze_layers=2")
    before, after = weights_of(run_dir / "base"), weights_of(run_dir / "final")
    frozen = [k for k in before if k.startswith(("model.layers.0.", "model.layers.1.", "model.embed_tokens"))]
    trained = [k for k in before if k.startswith(("model.layers.2.", "model.layers.3.", "lm_head"))]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in trained if k.endswith("proj.weight") or k == "lm_head.weight")


def test_feature_extraction_trains_only_norm_and_head(tmp_path):
    _, run_dir, summary = run(tmp_path, "freeze_layers=all", "train.max_steps=10")
    before, after = weights_of(run_dir / "base"), weights_of(run_dir / "final")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"lm_head.weight", "model.norm.weight"}
    assert summary["trainable_params"] == 384 * 64 + 64


def test_qlora_base_is_4bit_and_frozen(tmp_path):
    from bitsandbytes.nn import Linear4bit

    from ftdist.model.build import build_model

    cfg = tiny_config(tmp_path, "method=qlora", "freeze_layers=1")
    _, run_dir, _ = run(tmp_path, "method=qlora", "freeze_layers=1", "train.max_steps=5", "train.eval_every=2")
    bundle = build_model(cfg, str(run_dir / "base"), torch.device("cpu"))
    quantized = [m for m in bundle.model.modules() if isinstance(m, Linear4bit)]
    assert len(quantized) == 4 * 7  # q, k, v, o, gate, up, down in each block
    for layer in quantized:
        assert layer.weight.quant_state.quant_type == "nf4" and layer.weight.requires_grad is False
        assert layer.weight.numel() * layer.weight.element_size() * 2 <= layer.weight.quant_state.shape.numel()
    lora_blocks = {n.split(".")[4] for n, p in bundle.model.named_parameters() if p.requires_grad}
    assert lora_blocks == {"1", "2", "3"}  # adapters only above the frozen block
    assert all("lora_" in n for n, p in bundle.model.named_parameters() if p.requires_grad)
    # Gradients reached the lowest adapters through every 4-bit layer above them, also
    # after evaluations (step 0 and every 2 steps): lora_B starts at zero and must have moved.
    adapter = load_file(str(run_dir / "final" / "adapter_model.safetensors"))
    lowest_b = [v for k, v in adapter.items() if ".layers.1." in k and "lora_B" in k]
    assert lowest_b and all(v.abs().sum() > 0 for v in lowest_b)


def test_adapter_checkpoints_are_a_small_fraction_of_full_ones(tmp_path):
    from ftdist.io.checkpoints import size_bytes

    bigger = ("model.init.hidden_size=256", "model.init.num_layers=2", "train.max_steps=12")
    _, full_dir, _ = run(tmp_path, *bigger, "method=full", name="full")
    _, lora_dir, _ = run(tmp_path, *bigger, "method=lora", "lora.rank=4", name="lora")
    full_ckpt, lora_ckpt = complete_checkpoints(full_dir)[-1], complete_checkpoints(lora_dir)[-1]
    ratio = size_bytes(lora_ckpt) / size_bytes(full_ckpt)
    # rank 4 on a 256-wide model: the adapters are about 2% of the weights; with their
    # AdamW state against the full model's, the checkpoint is well under 5%.
    assert ratio < 0.05, ratio
    assert not (lora_ckpt / "model.safetensors").exists() and (lora_ckpt / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_final_loads_and_generates_with_plain_transformers_and_peft(tmp_path, pretrained_base, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_source = () if method == "full" else on_base(pretrained_base("llama"))
    _, run_dir, _ = run(tmp_path, f"method={method}", "train.max_steps=10", *model_source)
    final = run_dir / "final"
    tokenizer = AutoTokenizer.from_pretrained(final)
    if method == "full":
        model = AutoModelForCausalLM.from_pretrained(final)
    else:
        base_path = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert Path(base_path) == pretrained_base("llama")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), final)
    ids = tokenizer("reverse 123 =", return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids.shape[1]


def test_same_config_and_seed_give_the_same_curve(tmp_path):
    _, a, _ = run(tmp_path, "method=lora", "train.max_steps=8", name="a")
    _, b, _ = run(tmp_path, "method=lora", "train.max_steps=8", name="b")
    assert losses(a) == losses(b)


def test_retention_loss_before_and_after_is_reported_as_forgetting(tmp_path):
    from tests.conftest import DEMO

    _, run_dir, summary = run(tmp_path, f"data.retention={DEMO / 'general.txt'}", "train.max_steps=15")
    assert summary["forgetting"] == pytest.approx(summary["retention_loss_after"] - summary["retention_loss_before"])
    start = read_metrics(run_dir / "metrics.jsonl")[0]
    assert start["retention_loss_before"] == pytest.approx(summary["retention_loss_before"])


def test_chat_and_text_formats_train(tmp_path):
    from tests.conftest import DEMO

    for name, fmt in (("chat", "chat"), ("text", "text")):
        _, run_dir, _ = run(tmp_path, f"data.train={DEMO / (name + '.jsonl')}", "data.eval=null",
                            "data.eval_fraction=0.1", f"data.format={fmt}", "train.max_steps=20", name=name)
        assert_learned(run_dir)


def test_without_packing_and_with_bf16_autocast_on_cpu(tmp_path):
    _, run_dir, _ = run(tmp_path, "data.packing=false", "train.max_steps=20", name="unpacked")
    assert_learned(run_dir)
    _, run_dir, _ = run(tmp_path, "model.dtype=bfloat16", "train.max_steps=20", name="bf16")
    assert_learned(run_dir)
