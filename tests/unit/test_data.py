"""JSONL formats, loss masks, packing with document masking, malformed rows."""

import json

import numpy as np
import pytest
import torch

from ftdist.model.attention import document_mask
from ftdist.data.rows import IGNORE, Encoded, Examples, collate, encode, pack, to_examples
from ftdist.errors import UserError
from ftdist.data.records import RowReader
from ftdist.data.tokenizer import IM_END, train_tokenizer
from tests.conftest import DEMO


@pytest.fixture(scope="module")
def tokenizer():
    texts = [json.loads(line)["prompt"] for line in (DEMO / "train.jsonl").read_text().splitlines()[:500]]
    return train_tokenizer(texts + (DEMO / "general.txt").read_text().split("\n\n"), 384)


def labelled_text(tokenizer, ids, mask):
    return tokenizer.decode([i for i, m in zip(ids, mask) if m])


def test_prompt_completion_trains_on_the_completion_only(tokenizer):
    ids, mask = encode(tokenizer, {"prompt": "reverse 123 =", "completion": " 321"})
    assert labelled_text(tokenizer, ids, mask) == " 321<|endoftext|>"
    assert not mask[0]


def test_text_trains_on_every_token(tokenizer):
    ids, mask = encode(tokenizer, {"text": "The river rises."})
    assert all(mask) and tokenizer.decode(ids) == "The river rises.<|endoftext|>"


def test_chat_trains_on_assistant_turns_only(tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "reverse 12 ="},
                {"role": "assistant", "content": "21"}, {"role": "user", "content": "reverse 345 ="},
                {"role": "assistant", "content": "543"}]
    ids, mask = encode(tokenizer, {"messages": messages})
    learned = labelled_text(tokenizer, ids, mask)
    assert learned.replace(IM_END, "|").replace("\n", "") == "21|543|"
    assert "reverse" not in learned and "be brief" not in learned


def examples(*pairs) -> Examples:
    """Examples from (ids, targets) lists."""
    return Examples(np.array([t for ids, _ in pairs for t in ids], np.int32),
                    np.array([t for _, targets in pairs for t in targets], np.int32),
                    np.array([len(ids) for ids, _ in pairs], np.int64))


def test_targets_are_shifted_within_the_example():
    record = Encoded.of([([5, 6, 7, 8], [False, False, True, True])])
    ex, counts = to_examples(record, max_length=10)
    assert ex.targets.tolist() == [IGNORE, 7, 8, IGNORE] and counts["truncated"] == 0
    ex, counts = to_examples(record, max_length=3)
    assert ex.ids.tolist() == [5, 6, 7] and ex.targets.tolist() == [IGNORE, 7, IGNORE] and counts["truncated"] == 1


def test_records_of_any_length_become_examples_each_shifted_on_its_own():
    """The arrays' way equals the plain definition, example by example: targets[i] is ids[i+1]
    where that token is trained; records cut to max_length; none without a target kept."""
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(0, 50, n).tolist(), (rng.random(n) < 0.5).tolist()) for n in rng.integers(1, 12, 300)]
    pairs.append(([1, 2], [True, False]))  # nothing to learn: dropped
    got, counts = to_examples(Encoded.of(pairs), max_length=6)
    want = []
    for ids, mask in pairs:
        ids, mask = ids[:6], mask[:6]
        targets = [ids[i + 1] if mask[i + 1] else IGNORE for i in range(len(ids) - 1)] + [IGNORE]
        if any(t != IGNORE for t in targets):
            want.append((ids, targets))
    assert got.lengths.tolist() == [len(ids) for ids, _ in want]
    assert got.ids.tolist() == [t for ids, _ in want for t in ids]
    assert got.targets.tolist() == [t for _, targets in want for t in targets]
    assert counts == {"truncated": sum(len(ids) > 6 for ids, _ in pairs), "dropped_no_target": len(pairs) - len(want)}


def test_packing_restarts_positions_and_masks_across_documents():
    rows = pack(examples(([1, 2, 3], [2, 3, IGNORE]), ([4, 5], [5, IGNORE]), ([6, 7, 8, 9], [7, 8, 9, IGNORE])),
                max_length=6, packing=True, pad_id=0)
    assert len(rows) == 2
    assert rows.ids[0].tolist() == [1, 2, 3, 4, 5, 0]
    assert rows.positions[0].tolist() == [0, 1, 2, 0, 1, 0]
    assert rows.doc[0].tolist() == [0, 0, 0, 1, 1, -1]
    batch = collate(rows, [0], pad_id=0)
    assert batch["doc"][0].tolist() == [0, 0, 0, 1, 1, -1]
    mask = document_mask(batch["doc"], "sdpa")[0, 0]
    assert mask[4].tolist() == [False, False, False, True, True, False]  # token 5 sees only its own document
    assert mask[2].tolist() == [True, True, True, False, False, False]
    assert batch["targets"][0].tolist() == [2, 3, IGNORE, 5, IGNORE, IGNORE]


@pytest.mark.parametrize("attention", ["sdpa", "eager", "flex_attention"])
def test_packed_rows_give_the_same_loss_as_separate_examples(attention):
    """Document masking for real, in every attention backend that runs on CPU (flex: forward
    only, it has no backward there): a packed row equals its examples run one by one."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ftdist.objectives.tokens import loss_sum

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=50)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention).eval()
    three = to_examples(Encoded.of([(list(range(1 + k, 9 + k)), [True] * 8) for k in range(3)]), 16)[0]
    packed = pack(three, 16, packing=True, pad_id=0)
    single = pack(three, 16, packing=False, pad_id=0)

    def total(rows):
        batch = collate(rows, list(range(len(rows))), 0)
        return float(loss_sum(model, batch, torch.device("cpu"), attention=attention))

    with torch.no_grad():
        packed_loss, single_loss = total(packed), total(single)
    assert len(packed) == 2 and len(single) == 3
    assert packed_loss == pytest.approx(single_loss, rel=1e-5)


def write(tmp_path, lines):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("line, reason", [
    ('{"prompt": "a", "completion": "b"', "not valid JSON"),
    ('{"prompt": "a"}', '"completion" must be a string'),
    ('{"foo": 1}', "no known keys in ['foo']"),
    ('{"text": "x"}', "row is text but the file is prompt_completion"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "row is chat but the file is prompt_completion"),
])
def test_malformed_row_names_file_and_line(tmp_path, line, reason):
    path = write(tmp_path, ['{"prompt": "a", "completion": "b"}', line])
    with pytest.raises(UserError) as e:
        RowReader().read(str(path))
    assert f"{path}:2:" in str(e.value) and reason in str(e.value) and "skip_bad_rows" in str(e.value)


def test_bad_rows_can_be_skipped_and_counted(tmp_path):
    path = write(tmp_path, ['{"text": "a"}', "not json", '{"text": ""}', '{"text": "b"}'])
    records, fmt, skipped = RowReader().read(str(path), skip_bad_rows=True)
    assert fmt == "text" and len(records) == 2 and skipped == 2


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        RowReader().read(str(tmp_path / "nope.jsonl"))
