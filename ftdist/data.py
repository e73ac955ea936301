"""Validated records (records.py) -> token rows the loop can batch.

Per record shape (ftdist.records normalizes every format to one of three): text, loss on
every token; prompt_completion, on the completion only; messages (chat, alpaca, sharegpt), on
the assistant turns only, rendered with the tokenizer's chat template.

Targets are shifted here, per example (targets[i] is the token after ids[i], or -100),
so that packing several examples into one row never asks a token to predict the first
token of the next example. Each packed row carries per-token document ids, from which
the attention backend's mask keeps examples apart (ftdist.attention), and positions that
restart per example.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from ftdist.config import DataConfig
from ftdist.errors import UserError
from ftdist.chat_templates import require_template
from ftdist.records import read_records, read_retention

IGNORE = -100


@dataclass
class Example:
    ids: list[int]
    targets: list[int]


@dataclass
class Rows:
    """Fixed rows of tokens. doc[i] == -1 marks padding."""

    ids: list[np.ndarray]
    targets: list[np.ndarray]
    positions: list[np.ndarray]
    doc: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.ids)

    def target_tokens(self) -> int:
        return int(sum((t != IGNORE).sum() for t in self.targets))


@dataclass
class Dataset:
    train: Rows
    eval: Optional[Rows]
    retention: Optional[Rows]
    format: str
    stats: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- tokenizing


def encode(tokenizer, record: dict) -> tuple[list[int], list[bool]]:
    """Token ids and, per token, whether the model is trained to produce it."""
    eos = tokenizer.eos_token_id
    if "text" in record:
        ids = tokenizer(record["text"])["input_ids"] + [eos]
        return ids, [True] * len(ids)
    if "prompt" in record:
        prompt = tokenizer(record["prompt"])["input_ids"]
        completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"] + [eos]
        return prompt + completion, [False] * len(prompt) + [True] * len(completion)
    return encode_chat(tokenizer, record["messages"])


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    require_template(tokenizer, "chat")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    # Character spans of assistant turns: what the template adds between the
    # generation prompt before turn i and the rendering through turn i.
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)) if i else 0
        end = len(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))
        spans.append((start, end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(s <= a < e for s, e in spans) for a, _ in enc["offset_mapping"]]
    return enc["input_ids"], mask


def to_example(ids: list[int], mask: list[bool], max_length: int) -> tuple[Optional[Example], bool]:
    """Shift targets within the example; truncate to max_length. Returns (example, truncated)."""
    truncated = len(ids) > max_length
    ids, mask = ids[:max_length], mask[:max_length]
    targets = [ids[i + 1] if mask[i + 1] else IGNORE for i in range(len(ids) - 1)] + [IGNORE]
    if all(t == IGNORE for t in targets):
        return None, truncated
    return Example(ids, targets), truncated


def tokenize_records(tokenizer, records: list[dict], max_length: int) -> tuple[list[Example], dict]:
    examples, truncated, dropped = [], 0, 0
    for r in records:
        ex, cut = to_example(*encode(tokenizer, r), max_length)
        truncated += cut
        if ex is None:
            dropped += 1
        else:
            examples.append(ex)
    return examples, {"examples": len(examples), "truncated": truncated, "dropped_no_target": dropped}


# ---------------------------------------------------------------- rows


def pack(examples: list[Example], max_length: int, packing: bool, pad_id: int) -> Rows:
    """Greedy, in order: examples fill rows of max_length; without packing one per row."""
    rows = Rows([], [], [], [])
    if not packing:
        for ex in examples:
            n = len(ex.ids)
            rows.ids.append(np.array(ex.ids))
            rows.targets.append(np.array(ex.targets))
            rows.positions.append(np.arange(n))
            rows.doc.append(np.zeros(n, dtype=np.int64))
        return rows
    ids, targets, positions, doc = [], [], [], []

    def flush():
        pad = max_length - len(ids)
        rows.ids.append(np.array(ids + [pad_id] * pad))
        rows.targets.append(np.array(targets + [IGNORE] * pad))
        rows.positions.append(np.array(positions + list(range(pad))))
        rows.doc.append(np.array(doc + [-1] * pad))

    for ex in examples:
        if len(ids) + len(ex.ids) > max_length:
            flush()
            ids, targets, positions, doc = [], [], [], []
        doc_id = (doc[-1] + 1) if doc else 0
        ids += ex.ids
        targets += ex.targets
        positions += list(range(len(ex.ids)))
        doc += [doc_id] * len(ex.ids)
    if ids:
        flush()
    return rows


def collate(rows: Rows, index: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows -> model inputs: ids, positions, document ids (the mask is the attention
    backend's: ftdist.attention), targets."""
    length = max(len(rows.ids[i]) for i in index)

    def stack(arrays, fill):
        out = np.full((len(index), length), fill, dtype=np.int64)
        for j, i in enumerate(index):
            out[j, : len(arrays[i])] = arrays[i]
        return torch.from_numpy(out)

    doc = stack(rows.doc, -1)
    return {
        "input_ids": stack(rows.ids, pad_id),
        "position_ids": stack(rows.positions, 0),
        "doc": doc,
        "targets": stack(rows.targets, IGNORE),
        "n_tokens": int((doc >= 0).sum()),  # real tokens, padding excluded
    }


# ---------------------------------------------------------------- the dataset


def build_dataset(cfg: DataConfig, tokenizer, seed: int) -> Dataset:
    records, fmt, skipped = read_records(cfg.train, cfg)
    require_template(tokenizer, fmt)
    random.Random(seed).shuffle(records)
    if cfg.eval:
        train_records = records
        eval_records, _, eval_skipped = read_records(cfg.eval, cfg, fmt, key="data.eval")
        skipped += eval_skipped
    elif cfg.eval_fraction > 0 and len(records) > 1:
        n_eval = max(1, round(len(records) * cfg.eval_fraction))
        eval_records, train_records = records[:n_eval], records[n_eval:]
    else:
        train_records, eval_records = records, []

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_examples, stats = tokenize_records(tokenizer, train_records, cfg.max_length)
    if not train_examples:
        raise UserError(f"{cfg.train}: no example has a token to learn after truncation to data.max_length")
    train = pack(train_examples, cfg.max_length, cfg.packing, pad_id)
    stats.update(format=fmt, skipped_rows=skipped, train_rows=len(train), train_target_tokens=train.target_tokens())

    eval_rows = None
    if eval_records:
        eval_examples, _ = tokenize_records(tokenizer, eval_records, cfg.max_length)
        eval_rows = pack(eval_examples, cfg.max_length, cfg.packing, pad_id)
        stats["eval_rows"] = len(eval_rows)

    retention_rows = None
    if cfg.retention:
        ret_examples, _ = tokenize_records(tokenizer, read_retention(cfg), cfg.max_length)
        retention_rows = pack(ret_examples, cfg.max_length, cfg.packing, pad_id)
        stats["retention_rows"] = len(retention_rows)
    return Dataset(train, eval_rows, retention_rows, fmt, stats)


def epoch_order(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The row order of one epoch: a function of (seed, epoch) alone, so resumable."""
    return np.random.default_rng([seed, epoch]).permutation(n_rows)
