"""What each point of the fine-tuning spectrum trains, on both architectures, read off the
built model (no training beyond one step): the unit side of test_train's end-to-end runs."""

import pytest
import torch

from ftdist.errors import UserError
from ftdist.model.source import build_initial_model
from ftdist.model.build import build_model
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    out = {}
    for arch in ("llama", "qwen2"):
        build_initial_model(tiny_config(root, f"model.init.arch={arch}"), root / arch)
        out[arch] = str(root / arch)
    return out


def built(tmp_path, base: str, *overrides: str):
    cfg = tiny_config(tmp_path, "model.init=null", f"model.name_or_path={base}", *overrides)
    return build_model(cfg, base, torch.device("cpu"))


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def blocks_of(names) -> set[int]:
    return {int(n.split("layers.")[1].split(".")[0]) for n in names if "layers." in n}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("freeze", [0, 1, 3])
def test_full_with_frozen_layers_trains_the_top_blocks_norm_and_head(tmp_path, bases, arch, freeze):
    bundle = built(tmp_path, bases[arch], "method=full", f"freeze_layers={freeze}")
    names = trainable(bundle.model)
    assert blocks_of(names) == set(range(freeze, 4))
    assert {"model.norm.weight", "lm_head.weight"} <= names
    assert ("model.embed_tokens.weight" in names) == (freeze == 0)  # embeddings freeze with the lowest blocks
    assert bundle.info.frozen_blocks == freeze
    assert bundle.info.trainable_params == sum(p.numel() for p in bundle.model.parameters() if p.requires_grad)


def test_feature_extraction_trains_only_the_final_norm_and_head(tmp_path, bases):
    bundle = built(tmp_path, bases["llama"], "method=full", "freeze_layers=all")
    assert trainable(bundle.model) == {"model.norm.weight", "lm_head.weight"}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapters_sit_only_on_the_blocks_above_the_frozen_ones(tmp_path, bases, arch, method):
    bundle = built(tmp_path, bases[arch], f"method={method}", "freeze_layers=2", "lora.rank=4")
    names = trainable(bundle.model)
    assert names and all("lora_" in n for n in names)
    assert blocks_of(names) == {2, 3}
    assert bundle.info.lora_targets == ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj")
    hidden, inter = 64, 256  # rank 4 on each of the 7 projections of 2 blocks: 4 * (in + out) each
    per_block = 4 * ((hidden + hidden) * 2 + (hidden + hidden) * 2 + (hidden + inter) * 2 + (inter + hidden))
    assert bundle.info.trainable_params == 2 * per_block


def test_a_freeze_depth_the_model_lacks_is_one_message(tmp_path, bases):
    with pytest.raises(UserError, match="freeze_layers 5 is more than the model's 4 layers"):
        built(tmp_path, bases["llama"], "method=full", "freeze_layers=5")
    with pytest.raises(UserError, match="leaves no block for lora adapters"):
        built(tmp_path, bases["llama"], "method=lora", "freeze_layers=4")


def test_qlora_on_biased_projections_keeps_gradients_flowing_after_an_evaluation(tmp_path, bases):
    """Qwen2's biased q/k/v in 4 bits: after an eval-mode forward (bitsandbytes may repack the
    weights for an inference kernel), training must still reach the lowest adapters."""
    bundle = built(tmp_path, bases["qwen2"], "method=qlora", "freeze_layers=1")
    model, ids = bundle.model, torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.eval()(input_ids=ids)
    model.train()(input_ids=ids, labels=ids).loss.backward()
    # lora_B: its gradient is nonzero from the first step (lora_A's waits for B to move off zero)
    lowest = [p for n, p in model.named_parameters() if ".layers.1." in n and "lora_B" in n]
    assert lowest and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lowest)


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_the_model_comes_in_training_mode_so_dropout_is_on(tmp_path, bases, method):
    """from_pretrained gives eval mode; training in it would silently drop lora.dropout."""
    bundle = built(tmp_path, bases["llama"], f"method={method}", "lora.dropout=0.5")
    assert bundle.model.training and all(m.training for m in bundle.model.modules())
    ids = torch.randint(0, 384, (1, 12), generator=torch.Generator().manual_seed(0))
    if method != "full":  # two forwards differ: the adapters' dropout masks are drawn anew
        for name, p in bundle.model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)
        with torch.no_grad():
            first, second = (bundle.model(input_ids=ids).logits for _ in range(2))
        assert not torch.allclose(first, second)
