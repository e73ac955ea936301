"""`make test-all`: a classifier's head learning with QLoRA and with the top two blocks, as
tests/e2e/test_classification_e2e.py checks it with LoRA."""

import pytest

from tests.e2e.test_classification_e2e import learns_with_the_head


@pytest.mark.parametrize("method, extra", [("qlora", ("train.lr=1e-2",)), ("full", ("train.lr=1e-3", "freeze_layers=2"))])
def test_adapters_or_top_blocks_learn_with_the_head(tmp_path, pretrained_base, method, extra):
    learns_with_the_head(tmp_path, pretrained_base, method, extra)
