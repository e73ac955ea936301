"""model.attention: which backend a run gets, and the mask each backend is given. That every
backend keeps packed examples apart is tested in test_data (packed rows equal single ones)."""

import pytest
import torch
from transformers import LlamaConfig

from ftdist.model.attention import document_mask, implementation
from ftdist.errors import UserError

LLAMA = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=50)


def test_auto_picks_flex_on_a_gpu_and_sdpa_on_cpu():
    assert implementation("auto", LLAMA, torch.device("cpu")) == "sdpa"
    assert implementation("auto", LLAMA, torch.device("cuda", 0)) == "flex_attention"
    assert implementation("sdpa", LLAMA, torch.device("cuda", 0)) == "sdpa"
    assert implementation("eager", LLAMA, torch.device("cpu")) == "eager"


def test_flex_on_cpu_is_refused_with_the_fix():
    with pytest.raises(UserError, match="no backward pass on CPU; use model.attention: auto"):
        implementation("flex", LLAMA, torch.device("cpu"))


def test_one_unpadded_example_per_row_needs_no_mask():
    assert document_mask(torch.zeros(2, 8, dtype=torch.long), "sdpa") is None
    assert document_mask(torch.zeros(2, 8, dtype=torch.long), "flex_attention") is None


def test_each_backend_gets_the_mask_in_its_own_form():
    doc = torch.tensor([[0, 0, 1, 1, -1]])
    dense = document_mask(doc, "sdpa")
    assert dense.dtype == torch.bool and dense.shape == (1, 1, 5, 5)
    assert dense[0, 0, 3].tolist() == [False, False, True, True, False]
    additive = document_mask(doc, "eager")  # eager attention adds it to the scores
    assert additive.dtype == torch.float32 and (additive == 0).equal(dense)
    blocks = document_mask(doc, "flex_attention")
    assert type(blocks).__name__ == "BlockMask" and blocks.shape == (1, 1, 5, 5)
    assert blocks.to_dense().shape[-1] >= 1  # a compressed mask, not [seq x seq] booleans
