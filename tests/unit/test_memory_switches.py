"""The memory switches of train: (gradient checkpointing, chunked loss) change what is kept for
the backward pass, never the numbers: loss and gradients equal to the plain path in float32,
for full fine-tuning, LoRA over a frozen base and QLoRA over a 4-bit one. A step or two, no Ray."""

import pytest
import torch

from ftdist.data.rows import IGNORE
from ftdist.model.source import build_initial_model
from ftdist.model.build import build_model, checkpointed_blocks
from ftdist.objectives.tokens import chunked_cross_entropy, loss_sum
from tests.conftest import tiny_config

VOCAB = 384


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("base")
    build_initial_model(tiny_config(root), root / "llama")
    return str(root / "llama")


def batch(seed: int = 0) -> dict:
    """Two rows of 24 tokens; the first 8 of each are a prompt (no targets)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 24), generator=g)
    targets = torch.roll(ids, -1, dims=1)
    targets[:, :8] = IGNORE
    targets[:, -1] = IGNORE
    return {"input_ids": ids, "targets": targets, "position_ids": torch.arange(24).expand(2, 24),
            "doc": torch.zeros(2, 24, dtype=torch.long)}


def built(tmp_path, base: str, *overrides: str):
    cfg = tiny_config(tmp_path, "model.init=null", f"model.name_or_path={base}", "lora.dropout=0", *overrides)
    torch.manual_seed(0)  # the same adapter initialisation in every build
    bundle = build_model(cfg, base, torch.device("cpu"))
    if cfg.method != "full":  # B = 0 at init would hide a wrong gradient into A
        for name, p in bundle.model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
    return bundle


def loss_and_grads(bundle) -> tuple[float, dict[str, torch.Tensor]]:
    model = bundle.model
    assert model.training  # as the loop gets it: dropout and checkpointing work in training mode only
    model.zero_grad()
    loss = loss_sum(model, batch(), torch.device("cpu"), bundle.head)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert loss_a == pytest.approx(loss_b, rel=1e-5, abs=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tmp_path, base, method):
    plain = loss_and_grads(built(tmp_path, base, f"method={method}", "train.chunked_loss=false"))
    for every in ("true", "2"):
        bundle = built(tmp_path, base, f"method={method}", "train.chunked_loss=false",
                       f"train.gradient_checkpointing={every}")
        assert any(checkpointed_blocks(bundle.model))
        assert_same(loss_and_grads(bundle), plain)


def test_every_kth_block_is_checkpointed(tmp_path, base):
    assert checkpointed_blocks(built(tmp_path, base).model) == [False] * 4
    assert checkpointed_blocks(built(tmp_path, base, "train.gradient_checkpointing=true").model) == [True] * 4
    assert checkpointed_blocks(built(tmp_path, base, "train.gradient_checkpointing=2").model) == [True, False] * 2
    assert checkpointed_blocks(built(tmp_path, base, "method=lora", "train.gradient_checkpointing=3").model) == \
        [True, False, False, True]


def saved_for_backward(bundle) -> tuple[int, int]:
    """(all bytes autograd keeps for the backward, the elements of the largest kept tensor as
    wide as the vocabulary: logits or their softmax)."""
    seen = []

    def pack(t):
        seen.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_sum(bundle.model, batch(), torch.device("cpu"), bundle.head)
    unique = {(t.data_ptr(), t.numel()): t for t in seen if t.numel()}
    wide = [t.numel() for t in unique.values() if t.dim() and t.shape[-1] == VOCAB]
    return sum(t.numel() * t.element_size() for t in unique.values()), max(wide, default=0)


def test_checkpointing_keeps_less_for_the_backward_and_chunks_never_hold_full_logits(tmp_path, base):
    logits = 2 * 24 * VOCAB  # the batch's [tokens x vocab]
    plain_bytes, plain_wide = saved_for_backward(built(tmp_path, base, "train.chunked_loss=false"))
    assert plain_wide >= logits  # the plain loss keeps the whole logits: the check below can fail
    chunked_bytes, chunked_wide = saved_for_backward(built(tmp_path, base, "train.chunked_loss=true"))
    assert chunked_wide == 0 and chunked_bytes < plain_bytes
    checkpointed_bytes, _ = saved_for_backward(built(tmp_path, base, "train.gradient_checkpointing=true"))
    assert checkpointed_bytes < 0.6 * chunked_bytes


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_chunked_loss_gives_the_same_loss_and_gradients_as_full_logits(tmp_path, base, method):
    full = loss_and_grads(built(tmp_path, base, f"method={method}", "train.chunked_loss=false"))
    bundle = built(tmp_path, base, f"method={method}", "train.chunked_loss=true")
    bundle.head.chunk = 7  # several chunks, the last one short
    assert_same(loss_and_grads(bundle), full)


def test_chunked_cross_entropy_on_its_own():
    torch.manual_seed(0)
    hidden = torch.randn(3, 10, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (3, 10))
    targets[0, :4] = IGNORE
    full = torch.nn.functional.cross_entropy((hidden @ weight.T).flatten(0, 1), targets.flatten(),
                                             ignore_index=IGNORE, reduction="sum")
    grads = torch.autograd.grad(full, (hidden, weight))
    chunked = chunked_cross_entropy(hidden, weight, None, targets, chunk=4)
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-5)
    for ours, theirs in zip(torch.autograd.grad(chunked, (hidden, weight)), grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    no_targets = torch.full((1, 5), IGNORE)
    assert float(chunked_cross_entropy(hidden[:1, :5], weight, None, no_targets, chunk=4).detach()) == 0.0


def test_the_head_gives_plain_logits_outside_the_loss(tmp_path, base):
    """Generation and any plain forward see the model as it is: logits of the full vocabulary."""
    bundle = built(tmp_path, base, "train.chunked_loss=true")
    with torch.no_grad():
        out = bundle.model(input_ids=batch()["input_ids"]).logits
    assert out.shape == (2, 24, VOCAB)


def test_compiled_blocks_and_loss_give_the_same_loss_and_gradients(tmp_path, base):
    import torch._dynamo

    from ftdist.model.compiling import compile_model

    overrides = ("method=lora", "train.gradient_checkpointing=2")
    plain = loss_and_grads(built(tmp_path, base, *overrides))
    bundle = built(tmp_path, base, *overrides)
    said = []
    torch._dynamo.reset()
    assert compile_model(bundle, torch.device("cpu"), said.append)
    names = [n for n, _ in bundle.model.named_parameters()]
    compiled = loss_and_grads(bundle)
    assert not said  # no fallback: it really ran compiled
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # a block's graph and the loss's
    assert [n for n, _ in bundle.model.named_parameters()] == names  # checkpoints keep their keys
    (loss_a, grads_a), (loss_b, grads_b) = compiled, plain
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for name in grads_b:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_failed_compilation_falls_back_once_with_one_message():
    from ftdist.model.compiling import Compiled

    def broken_backend(graph, example_inputs):
        raise RuntimeError("no kernel for this")

    said = []
    compiled = Compiled(said.append)
    double = compiled.wrap(lambda x: x * 2, backend=broken_backend)
    square = compiled.wrap(lambda x: x * x, backend=broken_backend)
    assert double(torch.tensor(3.0)).item() == 6.0 and square(torch.tensor(3.0)).item() == 9.0
    assert len(said) == 1 and said[0].startswith("train.compile: torch.compile failed (")
    assert "training uncompiled" in said[0]
