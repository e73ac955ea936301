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
from ftdist.records import read_split, read_train

IGNORE = -100


@dataclass
class Example:
    ids: list[int]
    targets: list[int]


COLUMNS = ("ids", "targets", "positions", "doc")


@dataclass
class Rows:
    """Rows of tokens, stored flat and compact (int32, no per-row Python objects): row i of
    each column is flat[name][offsets[i]:offsets[i + 1]]. doc == -1 marks padding."""

    flat: dict[str, np.ndarray]
    offsets: np.ndarray  # int64, one more than there are rows
    source: Optional[np.ndarray] = None  # per row, which source of a mixture it came from

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, name: str, i: int) -> np.ndarray:
        return self.flat[name][self.offsets[i] : self.offsets[i + 1]]

    def column(self, name: str) -> list[np.ndarray]:
        return [self.row(name, i) for i in range(len(self))]

    ids = property(lambda self: self.column("ids"))
    targets = property(lambda self: self.column("targets"))
    positions = property(lambda self: self.column("positions"))
    doc = property(lambda self: self.column("doc"))

    def target_tokens(self) -> int:
        return int((self.flat["targets"] != IGNORE).sum())

    def tokens(self) -> int:
        """Real tokens, padding excluded."""
        return int((self.flat["doc"] >= 0).sum())

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.flat.values()) + self.offsets.nbytes

    def take(self, index) -> "Rows":
        """The rows at `index`, in that order."""
        index = np.asarray(index, dtype=np.int64)
        starts, ends = self.offsets[index], self.offsets[index + 1]
        picked = np.concatenate([np.arange(a, b) for a, b in zip(starts, ends)]) if len(index) else np.zeros(0, int)
        return Rows({n: a[picked] for n, a in self.flat.items()},
                    np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64),
                    None if self.source is None else self.source[index])

    @classmethod
    def concat(cls, parts: list["Rows"], sources: bool = False) -> "Rows":
        """The rows of `parts` in order; `sources`: part i is source i of a mixture (else each
        part's own source ids are kept, if it has them)."""
        if not parts:
            return empty_rows()
        sizes = np.concatenate([np.diff(p.offsets) for p in parts])
        if sources:
            source = np.concatenate([np.full(len(p), i, np.int16) for i, p in enumerate(parts)])
        else:
            source = None if parts[0].source is None else np.concatenate([p.source for p in parts])
        return cls({n: np.concatenate([p.flat[n] for p in parts]) for n in COLUMNS},
                   np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64), source)

    def of_source(self, s: int) -> np.ndarray:
        """The indices of source s's rows (every row where there is one source)."""
        return np.arange(len(self)) if self.source is None else np.flatnonzero(self.source == s)


def empty_rows() -> Rows:
    return Rows({n: np.zeros(0, np.int32) for n in COLUMNS}, np.zeros(1, np.int64))


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
    return encode_all(tokenizer, [record])[0]


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


ENCODE_BATCH = 2048  # records tokenized per call of the fast tokenizer (which runs them in parallel)


def encode_all(tokenizer, records: list[dict]) -> list[tuple[list[int], list[bool]]]:
    """encode() of every record; text and prompt/completion rows in batched tokenizer calls."""
    eos = tokenizer.eos_token_id
    out: list = [None] * len(records)
    texts = [i for i, r in enumerate(records) if "text" in r]
    prompts = [i for i, r in enumerate(records) if "prompt" in r]
    if texts:
        for i, ids in zip(texts, tokenizer([records[i]["text"] for i in texts])["input_ids"]):
            ids.append(eos)
            out[i] = (ids, [True] * len(ids))
    if prompts:
        heads = tokenizer([records[i]["prompt"] for i in prompts])["input_ids"]
        tails = tokenizer([records[i]["completion"] for i in prompts], add_special_tokens=False)["input_ids"]
        for i, head, tail in zip(prompts, heads, tails):
            out[i] = (head + tail + [eos], [False] * len(head) + [True] * (len(tail) + 1))
    for i, r in enumerate(records):
        if out[i] is None:
            out[i] = encode_chat(tokenizer, r["messages"])
    return out


def tokenize_records(tokenizer, records: list[dict], max_length: int) -> tuple[list[Example], dict]:
    examples, truncated, dropped = [], 0, 0
    for start in range(0, len(records), ENCODE_BATCH):
        for ids, mask in encode_all(tokenizer, records[start : start + ENCODE_BATCH]):
            ex, cut = to_example(ids, mask, max_length)
            truncated += cut
            if ex is None:
                dropped += 1
            else:
                examples.append(ex)
    return examples, {"examples": len(examples), "truncated": truncated, "dropped_no_target": dropped}


# ---------------------------------------------------------------- rows


def pack(examples: list[Example], max_length: int, packing: bool, pad_id: int) -> Rows:
    """Greedy, in order: examples fill rows of max_length (padded); without packing one per row."""
    if not examples:
        return empty_rows()
    lengths = np.fromiter((len(ex.ids) for ex in examples), np.int64, len(examples))
    ids = np.fromiter((t for ex in examples for t in ex.ids), np.int32, int(lengths.sum()))
    targets = np.fromiter((t for ex in examples for t in ex.targets), np.int32, len(ids))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    positions = (np.arange(len(ids)) - np.repeat(starts, lengths)).astype(np.int32)
    if not packing:
        return Rows({"ids": ids, "targets": targets, "positions": positions, "doc": np.zeros(len(ids), np.int32)},
                    np.concatenate([[0], np.cumsum(lengths)]))
    # Each example's row, its place in the row, its document number there: a new row
    # whenever the next example would overflow this one.
    row_of, at, doc_of = (np.empty(len(examples), np.int64) for _ in range(3))
    row, used, doc = 0, 0, 0
    for k, n in enumerate(lengths.tolist()):
        if used + n > max_length and used:
            row, used, doc = row + 1, 0, 0
        row_of[k], at[k], doc_of[k] = row, used, doc
        used, doc = used + n, doc + 1
    n_rows = row + 1
    dest = np.repeat(row_of * max_length + at, lengths) + positions  # each token's place in the grid
    size = n_rows * max_length
    flat = {"ids": np.full(size, pad_id, np.int32), "targets": np.full(size, IGNORE, np.int32),
            "positions": np.zeros(size, np.int32), "doc": np.full(size, -1, np.int32)}
    flat["ids"][dest], flat["targets"][dest], flat["positions"][dest] = ids, targets, positions
    flat["doc"][dest] = np.repeat(doc_of, lengths)
    # Padding's positions count from 0 after the row's last example (what it sees is masked anyway).
    used_in_row = np.bincount(row_of, weights=lengths, minlength=n_rows).astype(np.int64)
    pad = flat["doc"] < 0
    flat["positions"][pad] = (np.tile(np.arange(max_length), n_rows) - np.repeat(used_in_row, max_length))[pad]
    return Rows(flat, np.arange(0, size + 1, max_length, dtype=np.int64))


def collate(rows: Rows, index: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows -> model inputs: ids, positions, document ids (the mask is the attention
    backend's: ftdist.attention), targets."""
    length = max(int(rows.offsets[i + 1] - rows.offsets[i]) for i in index)

    def stack(name, fill):
        out = np.full((len(index), length), fill, dtype=np.int64)
        for j, i in enumerate(index):
            row = rows.row(name, i)
            out[j, : len(row)] = row
        return torch.from_numpy(out)

    doc = stack("doc", -1)
    return {
        "input_ids": stack("ids", pad_id),
        "position_ids": stack("positions", 0),
        "doc": doc,
        "targets": stack("targets", IGNORE),
        "n_tokens": int((doc >= 0).sum()),  # real tokens, padding excluded
    }


# ---------------------------------------------------------------- the dataset


def build_dataset(cfg: DataConfig, tokenizer, seed: int) -> Dataset:
    """Each training source read, shuffled (by seed), split for eval (data.eval_fraction of
    each source, unless data.eval is given), tokenized and packed on its own; the rows of
    all sources of a split together, each row knowing its source (a mixture: train_order;
    per-source evaluation: ftdist.objective.evaluate_rows)."""
    parts, fmt, skipped = read_train(cfg)
    require_template(tokenizer, fmt)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    counts = {"examples": 0, "truncated": 0, "dropped_no_target": 0}

    def rows_of(split_parts: list[list[dict]], tally: bool = False) -> Rows:
        packed = []
        for records in split_parts:
            examples, seen = tokenize_records(tokenizer, records, cfg.max_length)
            if tally:
                for k, v in seen.items():
                    counts[k] += v
            packed.append(pack(examples, cfg.max_length, cfg.packing, pad_id))
        return Rows.concat(packed, sources=len(packed) > 1)

    held_out = []
    for i, records in enumerate(parts):
        random.Random(seed if i == 0 else f"{seed}-{i}").shuffle(records)
        if not cfg.eval and cfg.eval_fraction > 0:  # each source's share; none of a one-row source
            n_eval = max(1, round(len(records) * cfg.eval_fraction)) if len(records) > 1 else 0
            held_out.append(records[:n_eval])
            parts[i] = records[n_eval:]
    train = rows_of(parts, tally=True)
    if not len(train):
        raise UserError("data.train: no example has a token to learn after truncation to data.max_length")
    stats = dict(counts, format=fmt, skipped_rows=skipped, train_rows=len(train),
                 train_target_tokens=train.target_tokens())
    if len(parts) > 1:
        stats["sources"] = source_stats(cfg, train)

    if cfg.eval:
        held_out, _, eval_skipped = read_split(cfg, "eval", fmt)
        stats["skipped_rows"] += eval_skipped
    eval_rows = rows_of(held_out) if any(held_out) else None
    if eval_rows is not None:
        stats["eval_rows"] = len(eval_rows)
    retention_rows = rows_of(read_split(cfg, "retention")[0]) if cfg.retention else None
    if retention_rows is not None:
        stats["retention_rows"] = len(retention_rows)
    return Dataset(train, eval_rows, retention_rows, fmt, stats)


# ---------------------------------------------------------------- row order, mixtures


def source_stats(cfg: DataConfig, train: Rows) -> list[dict]:
    """Per source of a mixture: its packed rows, real tokens, and its share of an epoch's rows."""
    quotas = mixture_quotas(train, cfg.weights)
    n = len(cfg.sources)
    real = np.add.reduceat((train.flat["doc"] >= 0).astype(np.int64), train.offsets[:-1])  # per row (none empty)
    rows, tokens = np.bincount(train.source, minlength=n), np.bincount(train.source, weights=real, minlength=n)
    return [{"path": source.path, "rows": int(rows[s]), "tokens": int(tokens[s]), "weight": source.weight,
             "share": quotas[s] / len(train)} for s, source in enumerate(cfg.sources)]


def with_weights(sources: list[dict], cfg: DataConfig) -> list[dict]:
    """Per-source stats with this config's weights and shares (the rows are the same)."""
    if cfg.weights is None:
        return sources
    return [dict(s, weight=c.weight, share=w) for s, c, w in zip(sources, cfg.sources, cfg.weights)]


def source_line(source: dict) -> str:
    """One source of a mixture, as the start of a run and `ftdist prepare` tell it."""
    return (f"{source['path']}: {source['rows']} rows, {source['tokens']} tokens, {source['share']:.1%} of each "
            "epoch's rows" + (f" (weight {source['weight']:g})" if source["weight"] is not None else ""))


def mixture_quotas(rows: Rows, weights: Optional[list[float]]) -> list[int]:
    """How many of an epoch's len(rows) draws each source gets: by weight (largest remainder),
    among the sources that have rows here; without weights, the rows each source has."""
    if rows.source is None:
        return [len(rows)]
    counts = np.bincount(rows.source, minlength=len(weights) if weights else 0).tolist()
    if weights is None:
        return counts
    present = [w if c else 0.0 for w, c in zip(weights, counts)]
    exact = np.array(present) / sum(present) * len(rows)
    quotas = np.floor(exact).astype(int)
    for s in np.argsort(-(exact - quotas), kind="stable")[: len(rows) - int(quotas.sum())]:
        quotas[s] += 1
    return quotas.tolist()


def train_order(rows: Rows, weights: Optional[list[float]], seed: int, epoch: int) -> np.ndarray:
    """The training rows of one epoch, in order: a function of (seed, epoch) alone, so
    resumable at the exact position. A weighted mixture draws each source's quota of the
    epoch's len(rows) rows, going through its rows in a shuffled order (again, reshuffled,
    when the quota is larger than the source), then shuffles the draws together."""
    if weights is None or rows.source is None:
        return epoch_order(len(rows), seed, epoch)
    drawn = []
    for s, quota in enumerate(mixture_quotas(rows, weights)):
        mine = rows.of_source(s)
        if quota == 0:
            continue
        passes = -(-quota // len(mine))
        rng = np.random.default_rng([seed, epoch, s + 1])
        drawn.append(np.concatenate([rng.permutation(mine) for _ in range(passes)])[:quota])
    return np.random.default_rng([seed, epoch]).permutation(np.concatenate(drawn))


def epoch_order(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The row order of one epoch: a function of (seed, epoch) alone, so resumable."""
    return np.random.default_rng([seed, epoch]).permutation(n_rows)
