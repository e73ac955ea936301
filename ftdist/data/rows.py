"""Validated records (records.py) -> token rows the loop can batch.

Per record shape (ftdist.data.records normalizes every format to one of three): text, loss on
every token; prompt_completion, on the completion only; messages (chat, alpaca, sharegpt), on
the assistant turns only, rendered with the tokenizer's chat template.

Targets are shifted here, per example (targets[i] is the token after ids[i], or -100),
so that packing several examples into one row never asks a token to predict the first
token of the next example. Each packed row carries per-token document ids, from which
the attention backend's mask keeps examples apart (ftdist.model.attention), and positions that
restart per example.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from ftdist.config.schema import DataConfig
from ftdist.data.chat_templates import describe_template, rendering, require_template
from ftdist.data.records import keyed_sources, read_split, read_train
from ftdist.errors import UserError

IGNORE = -100


COLUMNS = ("ids", "targets", "positions", "doc")


@dataclass
class Rows:
    """Rows of tokens, stored flat and compact (int32, no per-row Python objects): row i of
    each column is flat[name][offsets[i]:offsets[i + 1]]. doc == -1 marks padding."""

    flat: dict[str, np.ndarray]
    offsets: np.ndarray  # int64, one more than there are rows
    source: Optional[np.ndarray] = None  # per row, which source of a mixture it came from
    # Per row, its record's other columns as JSON (a prompt row's: what objective grpo's rewards read).
    meta: Optional[np.ndarray] = None

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
                    None if self.source is None else self.source[index],
                    None if self.meta is None else self.meta[index])

    @classmethod
    def concat(cls, parts: list["Rows"], sources: bool = False) -> "Rows":
        """The rows of `parts` in order; `sources`: part i is source i of a mixture (else each
        part's own source ids are kept, if it has them)."""
        if not parts:
            return empty_rows()
        if len(parts) == 1 and not sources:
            return parts[0]
        sizes = np.concatenate([np.diff(p.offsets) for p in parts])
        if sources:
            source = np.concatenate([np.full(len(p), i, np.int16) for i, p in enumerate(parts)])
        else:
            source = None if parts[0].source is None else np.concatenate([p.source for p in parts])
        meta = np.concatenate([p.meta for p in parts]) if parts[0].meta is not None else None
        return cls({n: np.concatenate([p.flat[n] for p in parts]) for n in COLUMNS},
                   np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64), source, meta)

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
    replay: Optional[Rows] = None  # regularization.replay's text, mixed into the training batches
    # Every rank holds every training row: one order for the world, of which each rank takes its part
    # of each batch, so the batches are the same at any world size. Else (Ray Data split the rows
    # among the workers) each rank orders its own rows.
    shared: bool = True


# ---------------------------------------------------------------- tokenizing


def flat(lists: list[list], dtype=np.int32) -> tuple[np.ndarray, np.ndarray]:
    """Lists as one flat array, and their lengths."""
    lengths = np.fromiter(map(len, lists), np.int64, len(lists))
    return np.fromiter(itertools.chain.from_iterable(lists), dtype, int(lengths.sum())), lengths


def within(lengths: np.ndarray) -> np.ndarray:
    """Each element's place in its own list, for lists of these lengths stored flat."""
    return np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)


@dataclass
class Encoded:
    """Records' token ids stored flat, with, per token, whether the model is trained to
    produce it: record i is ids[starts[i]:starts[i] + lengths[i]]."""

    ids: np.ndarray  # int32
    trained: np.ndarray  # bool
    lengths: np.ndarray  # int64, one per record

    @classmethod
    def of(cls, pairs: list[tuple[list[int], list[bool]]]) -> "Encoded":
        ids, lengths = flat([p[0] for p in pairs])
        return cls(ids, flat([p[1] for p in pairs], bool)[0], lengths)

    @classmethod
    def joined(cls, segments: list[tuple[np.ndarray, np.ndarray, bool]]) -> "Encoded":
        """Records made of segments, in order: (flat ids, one length per record, trained)."""
        lengths = sum(lens for _, lens, _ in segments)
        ids, trained = np.empty(int(lengths.sum()), np.int32), np.empty(int(lengths.sum()), bool)
        at = np.cumsum(lengths) - lengths
        for seg_ids, lens, flag in segments:
            dest = np.repeat(at, lens) + within(lens)
            ids[dest], trained[dest] = seg_ids, flag
            at = at + lens
        return cls(ids, trained, lengths)

    @classmethod
    def in_order(cls, pieces: list[tuple[list[int], "Encoded"]], n: int) -> "Encoded":
        """Pieces (record indices, their Encoded) as the n records in index order."""
        if len(pieces) == 1:
            return pieces[0][1]
        lengths = np.zeros(n, np.int64)
        for index, enc in pieces:
            lengths[index] = enc.lengths
        starts = np.cumsum(lengths) - lengths
        ids, trained = np.empty(int(lengths.sum()), np.int32), np.empty(int(lengths.sum()), bool)
        for index, enc in pieces:
            dest = np.repeat(starts[index], enc.lengths) + within(enc.lengths)
            ids[dest], trained[dest] = enc.ids, enc.trained
        return cls(ids, trained, lengths)

    def record(self, i: int) -> tuple[list[int], list[bool]]:
        start = int(self.lengths[:i].sum())
        end = start + int(self.lengths[i])
        return self.ids[start:end].tolist(), self.trained[start:end].tolist()


def encode(tokenizer, record: dict) -> tuple[list[int], list[bool]]:
    """Token ids and, per token, whether the model is trained to produce it."""
    return encode_all(tokenizer, [record]).record(0)


def encode_chat(tokenizer, messages: list[dict], first_trained: int = 0) -> tuple[list[int], list[bool]]:
    """`first_trained`: the first message whose assistant turns are trained (a preference
    pair's response after its prompt's turns)."""
    require_template(tokenizer, "chat")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    # Character spans of assistant turns: what the template adds between the
    # generation prompt before turn i and the rendering through turn i.
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < first_trained:
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)) if i else 0
        end = len(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))
        spans.append((start, end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(s <= a < e for s, e in spans) for a, _ in enc["offset_mapping"]]
    return enc["input_ids"], mask


ENCODE_BATCH = 2048  # records tokenized per call of the fast tokenizer (which runs them in parallel)


def encode_all(tokenizer, records: list[dict]) -> Encoded:
    """encode() of every record, stored flat; text and prompt/completion rows in batched
    tokenizer calls, their ids joined in arrays (no per-token Python work)."""
    eos = tokenizer.eos_token_id
    kinds = {"text": [], "prompt": [], "messages": []}
    for i, r in enumerate(records):
        kinds["text" if "text" in r else "prompt" if "prompt" in r else "messages"].append(i)
    pieces = []
    if kinds["text"]:
        index = kinds["text"]
        ids, lens = flat(tokenizer([records[i]["text"] for i in index], return_attention_mask=False)["input_ids"])
        pieces.append((index, Encoded.joined([(ids, lens, True), eos_segment(eos, len(index))])))
    if kinds["prompt"]:
        index = kinds["prompt"]
        head, head_lens = flat(tokenizer([records[i]["prompt"] for i in index], return_attention_mask=False)["input_ids"])
        tail, tail_lens = flat(tokenizer([records[i]["completion"] for i in index], add_special_tokens=False,
                                         return_attention_mask=False)["input_ids"])
        pieces.append((index, Encoded.joined([(head, head_lens, False), (tail, tail_lens, True),
                                              eos_segment(eos, len(index))])))
    if kinds["messages"]:
        index = kinds["messages"]
        pieces.append((index, Encoded.of([encode_chat(tokenizer, records[i]["messages"]) for i in index])))
    return Encoded.in_order(pieces, len(records))


def encode_pairs(tokenizer, records: list[dict]) -> Encoded:
    """Preference records as 2n sequences, each pair's chosen then its rejected: the prompt
    followed by the response, trained on the response's tokens only. Strings join as prompt and
    completion; where the prompt or a response is a list of turns, both render as one chat."""
    plain, chats = [], []
    for i, r in enumerate(records):
        (chats if any(isinstance(r[k], list) for k in ("prompt", "chosen", "rejected")) else plain).append(i)
    pieces = []
    if plain:
        sequences = [{"prompt": records[i]["prompt"], "completion": records[i][side]}
                     for i in plain for side in ("chosen", "rejected")]
        pieces.append(([2 * i + j for i in plain for j in (0, 1)], encode_all(tokenizer, sequences)))
    if chats:
        encoded = []
        for i in chats:
            prompt = turns_of(records[i]["prompt"], "user")
            encoded += [encode_chat(tokenizer, prompt + turns_of(records[i][side], "assistant"), len(prompt))
                        for side in ("chosen", "rejected")]
        pieces.append(([2 * i + j for i in chats for j in (0, 1)], Encoded.of(encoded)))
    return Encoded.in_order(pieces, 2 * len(records))


def turns_of(value, role: str) -> list[dict]:
    """A preference row's prompt or response as chat turns (a string: one turn of `role`)."""
    return value if isinstance(value, list) else [{"role": role, "content": value}] if value else []


def eos_segment(eos: int, n: int) -> tuple[np.ndarray, np.ndarray, bool]:
    return np.full(n, eos, np.int32), np.ones(n, np.int64), True


@dataclass
class Examples:
    """Training examples stored flat: ids, and targets shifted within each example
    (targets[j] is the token after ids[j] where the model learns it, else IGNORE)."""

    ids: np.ndarray  # int32
    targets: np.ndarray  # int32
    lengths: np.ndarray  # int64, one per example

    def __len__(self) -> int:
        return len(self.lengths)

    @classmethod
    def concat(cls, parts: list["Examples"]) -> "Examples":
        return cls(*(np.concatenate([getattr(p, n) for p in parts] or [np.zeros(0, t)])
                     for n, t in (("ids", np.int32), ("targets", np.int32), ("lengths", np.int64))))


def to_examples(enc: Encoded, max_length: int, pairs: bool = False) -> tuple[Examples, dict]:
    """Each record truncated to max_length, its targets shifted within it; records with no
    token to learn dropped (`pairs`: records 2k and 2k+1 are one pair, dropped together).
    Returns the examples and the counts (truncated, dropped)."""
    keep = within(enc.lengths) < max_length
    lengths = np.minimum(enc.lengths, max_length)
    ids, trained = enc.ids[keep], enc.trained[keep]
    targets = np.full(len(ids), IGNORE, np.int32)
    targets[:-1] = np.where(trained[1:], ids[1:], IGNORE)
    targets[(np.cumsum(lengths) - 1)[lengths > 0]] = IGNORE  # an example's last token predicts nothing
    learns = np.bincount(np.repeat(np.arange(len(lengths)), lengths), weights=targets != IGNORE,
                         minlength=len(lengths)) > 0
    if pairs:  # a pair whose one side has nothing to learn is no pair
        learns = np.repeat(learns.reshape(-1, 2).all(1), 2)
    token_kept = np.repeat(learns, lengths)
    return (Examples(ids[token_kept], targets[token_kept], lengths[learns]),
            {"truncated": int((enc.lengths > max_length).sum()),
             "dropped_no_target": int((~learns).sum()) // (2 if pairs else 1)})


def classification_examples(tokenizer, records: list[dict], max_length: int,
                            labels: list[str]) -> tuple[Examples, dict]:
    """{text, label} records: the text's first max_length tokens, and one target, the label's
    index, on the last of them (where the classifier reads the example: ftdist.objectives.classification)."""
    index = {label: i for i, label in enumerate(labels)}
    ids, lengths = flat(tokenizer([r["text"] for r in records], return_attention_mask=False)["input_ids"])
    kept = np.minimum(lengths, max_length)
    ids = ids[within(lengths) < max_length]
    targets = np.full(len(ids), IGNORE, np.int32)
    has = kept > 0
    targets[(np.cumsum(kept) - 1)[has]] = [index[str(r["label"])] for r, ok in zip(records, has) if ok]
    return Examples(ids, targets, kept[has]), {"truncated": int((lengths > max_length).sum()),
                                               "dropped_no_target": int((~has).sum())}


def prompt_rows(tokenizer, records: list[dict], room: int) -> tuple[Rows, dict]:
    """Prompt records (objective grpo) as rows of one prompt each: its tokens (a chat prompt
    rendered with the generation prompt after it), no targets, and its other columns as JSON.
    `room`: the most prompt tokens (data.max_length less grpo.max_new_tokens); a longer prompt
    keeps its last ones, where the question usually is."""
    import json

    strings = [i for i, r in enumerate(records) if isinstance(r["prompt"], str)]
    ids: list[list[int]] = [[] for _ in records]
    if strings:
        encoded = tokenizer([records[i]["prompt"] for i in strings], return_attention_mask=False)["input_ids"]
        for i, e in zip(strings, encoded):
            ids[i] = e
    for i, r in enumerate(records):
        if not isinstance(r["prompt"], str):
            require_template(tokenizer, "chat")
            ids[i] = tokenizer(tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True),
                               add_special_tokens=False, return_attention_mask=False)["input_ids"]
    truncated = sum(len(x) > room for x in ids)
    ids = [x[-room:] for x in ids]
    values, lengths = flat(ids)
    rows = Rows({"ids": values, "targets": np.full(len(values), IGNORE, np.int32),
                 "positions": within(lengths).astype(np.int32), "doc": np.zeros(len(values), np.int32)},
                np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                meta=np.array([json.dumps({"prompt": r["prompt"], **r["columns"]}) for r in records]))
    return rows, {"examples": len(records), "truncated": truncated, "dropped_no_target": 0}


def char_limit(tokenizer, max_length: int) -> int:
    """The most characters of one string that max_length tokens can use, with room to spare:
    max_length tokens of the vocabulary's longest token (as the vocabulary spells it: a byte-level
    token's bytes, never fewer than the characters it decodes to), twice over, so that the tokens
    kept are those of the whole string. A longer string is cut to it before it is tokenized: a
    100 MB row costs what max_length can hold, not its size."""
    try:
        longest = max(map(len, tokenizer.get_vocab()), default=1)
    except Exception:  # noqa: BLE001 - a tokenizer without a vocabulary to list: a generous bound
        longest = 64
    return 2 * max_length * max(longest, 1) + 64


TEXT_FIELDS = ("text", "prompt", "completion", "chosen", "rejected", "messages")


def cut_text(value, limit: int):
    """A record's text (a string, or turns' contents) cut to `limit` characters each."""
    if isinstance(value, str):
        return value[:limit] if len(value) > limit else value
    if isinstance(value, list):
        return [dict(t, content=cut_text(t["content"], limit)) if isinstance(t, dict) and "content" in t else t
                for t in value]
    return value


def cut_records(records: list[dict], limit: int) -> list[dict]:
    """Records whose strings fit `limit` characters (char_limit): those that do not, copied and cut."""
    def long(value) -> bool:
        if isinstance(value, str):
            return len(value) > limit
        return isinstance(value, list) and any(isinstance(t, dict) and long(t.get("content")) for t in value)

    return [{k: cut_text(v, limit) if k in TEXT_FIELDS else v for k, v in r.items()}
            if any(long(r.get(k)) for k in TEXT_FIELDS) else r for r in records]


def tokenize_records(tokenizer, records: list[dict], max_length: int, labels: Optional[list[str]] = None,
                     pairs: bool = False) -> tuple[Examples, dict]:
    """Records to examples, a batch at a time: only the arrays of each batch are kept.
    `labels`: classification rows, by these labels; `pairs`: preference rows, two examples each
    (chosen, rejected). Strings longer than max_length can use are cut first (char_limit)."""
    parts, counts = [], {"examples": 0, "truncated": 0, "dropped_no_target": 0}
    limit = char_limit(tokenizer, max_length)
    for start in range(0, len(records), ENCODE_BATCH):
        batch = cut_records(records[start : start + ENCODE_BATCH], limit)
        if labels is not None:
            examples, seen = classification_examples(tokenizer, batch, max_length, labels)
        elif pairs:
            examples, seen = to_examples(encode_pairs(tokenizer, batch), max_length, pairs=True)
        else:
            examples, seen = to_examples(encode_all(tokenizer, batch), max_length)
        parts.append(examples)
        for k, v in seen.items():
            counts[k] += v
    examples = Examples.concat(parts)
    counts["examples"] = len(examples) // (2 if pairs else 1)
    return examples, counts


# ---------------------------------------------------------------- rows


def pack(examples: Examples, max_length: int, packing: bool, pad_id: int, pairs: bool = False) -> Rows:
    """Greedy, in order: examples fill rows of max_length (padded); without packing one per row.
    `pairs`: examples 2k and 2k+1 (a preference pair's chosen and rejected) share a row, as
    documents 2j and 2j+1 of it: rows of 2 x max_length, one pair each without packing."""
    if not len(examples):
        return empty_rows()
    lengths, ids, targets = examples.lengths, examples.ids, examples.targets
    positions = within(lengths).astype(np.int32)
    if pairs:
        max_length *= 2
    if not packing and not pairs:
        return Rows({"ids": ids, "targets": targets, "positions": positions, "doc": np.zeros(len(ids), np.int32)},
                    np.concatenate([[0], np.cumsum(lengths)]))
    # Each example's row, its place in the row, its document number there: a new row
    # whenever the next example would overflow this one.
    row_of, at, doc_of = (np.empty(len(lengths), np.int64) for _ in range(3))
    row, used, doc = 0, 0, 0
    # What must fit in the row where example k starts: it and, for a pair's chosen, its rejected.
    needs = lengths.copy()
    if pairs:
        needs[0::2] += lengths[1::2]
        needs[1::2] = 0
    for k, (n, need) in enumerate(zip(lengths.tolist(), needs.tolist())):
        if used and need and (used + need > max_length or not packing):
            row, used, doc = row + 1, 0, 0
        row_of[k], at[k], doc_of[k] = row, used, doc
        used, doc = used + n, doc + 1
    n_rows = row + 1
    dest = np.repeat(row_of * max_length + at, lengths)  # each token's place in the grid
    dest += positions
    size = n_rows * max_length
    flat_rows = {"ids": np.full(size, pad_id, np.int32), "targets": np.full(size, IGNORE, np.int32),
                 "positions": np.zeros(size, np.int32), "doc": np.full(size, -1, np.int32)}
    flat_rows["ids"][dest], flat_rows["targets"][dest], flat_rows["positions"][dest] = ids, targets, positions
    flat_rows["doc"][dest] = np.repeat(doc_of.astype(np.int32), lengths)
    del dest
    # Padding's positions count from 0 after the row's last example (what it sees is masked anyway).
    used_in_row = np.bincount(row_of, weights=lengths, minlength=n_rows).astype(np.int64)
    pad = np.flatnonzero(flat_rows["doc"] < 0)
    flat_rows["positions"][pad] = pad % max_length - used_in_row[pad // max_length]
    return Rows(flat_rows, np.arange(0, size + 1, max_length, dtype=np.int64))


def collate(rows: Rows, index: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows -> model inputs: ids, positions, document ids (the mask is the attention
    backend's: ftdist.model.attention), targets."""
    length = max(int(rows.offsets[i + 1] - rows.offsets[i]) for i in index)

    def stack(name, fill, dtype=np.int64):
        out = np.full((len(index), length), fill, dtype=dtype)
        for j, i in enumerate(index):
            row = rows.row(name, i)
            out[j, : len(row)] = row
        return torch.from_numpy(out)

    doc = stack("doc", -1)
    batch = {
        "input_ids": stack("ids", pad_id),
        "position_ids": stack("positions", 0),
        "doc": doc,
        "targets": stack("targets", IGNORE),
        "n_tokens": int((doc >= 0).sum()),  # real tokens, padding excluded
    }
    if "ref" in rows.flat:  # dpo's precomputed reference log-probs (ftdist.objectives.dpo)
        batch["ref"] = stack("ref", 0.0, np.float32)
    if rows.meta is not None:  # a prompt row's columns (ftdist.objectives.grpo)
        batch["meta"] = [str(rows.meta[i]) for i in index]
    return batch


# ---------------------------------------------------------------- the dataset


def build_dataset(cfg: DataConfig, tokenizer, seed: int, labels: Optional[list[str]] = None,
                  shape: str = "text", prompt_room: int = 0) -> Dataset:
    """Each training source read, shuffled (by seed), split for eval (data.eval_fraction of
    each source, unless data.eval is given), tokenized and packed on its own; the rows of
    all sources of a split together, each row knowing its source (a mixture: train_order;
    per-source evaluation: ftdist.training.evaluate.evaluate_rows). `labels`: a classification task's
    (its training and eval rows carry one each; retention text stays text). `pairs`: objective
    dpo's preference pairs, each pair's two sequences in one row (ftdist.objectives.dpo). `shape`:
    what the objective trains on (text, labels, pairs; prompts: one prompt a row, of at most
    `prompt_room` tokens, for objective grpo's sampling)."""
    pairs = shape == "pairs"
    parts, fmt, skipped = read_train(cfg, labels, shape if shape in ("pairs", "prompts") else "text")
    require_template(tokenizer, fmt)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    counts = {"examples": 0, "truncated": 0, "dropped_no_target": 0}
    template = describe_template(cfg.chat_template, tokenizer)

    def rows_of(split_parts: list[list[dict]], tally: bool = False, task_rows: bool = True,
                per_part: Optional[list] = None) -> Rows:
        """Each part's rows, packed; the records are let go once tokenized (memory). `per_part`:
        filled with each part's (records, counts, target tokens)."""
        packed, n = [], len(split_parts)
        while split_parts:
            records = split_parts.pop(0)
            if shape == "prompts" and task_rows:
                with rendering(*template):
                    rows, seen = prompt_rows(tokenizer, records, prompt_room)
                if tally:
                    for k, v in seen.items():
                        counts[k] += v
                if per_part is not None:
                    per_part.append((len(records), seen, len(records)))
                packed.append(rows)
                continue
            with rendering(*template):
                examples, seen = tokenize_records(tokenizer, records, cfg.max_length,
                                                  labels if task_rows else None, pairs and task_rows)
            if tally:
                for k, v in seen.items():
                    counts[k] += v
            if per_part is not None:
                per_part.append((len(records), seen, int((examples.targets != IGNORE).sum())))
            del records
            packed.append(pack(examples, cfg.max_length, cfg.packing, pad_id, pairs and task_rows))
            del examples
        return Rows.concat(packed, sources=n > 1)

    held_out = []
    for i, records in enumerate(parts):
        random.Random(seed if i == 0 else f"{seed}-{i}").shuffle(records)
        if not cfg.eval and cfg.eval_fraction > 0:  # each source's share; none of a one-row source
            n_eval = max(1, round(len(records) * cfg.eval_fraction)) if len(records) > 1 else 0
            held_out.append(records[:n_eval])
            parts[i] = records[n_eval:]
    del records  # the loop's last; parts holds what is trained on
    n_sources = len(parts)
    train = rows_of(parts, tally=True)
    if not len(train):
        raise UserError("data.train: no example has a token to learn after truncation to data.max_length")
    stats = dict(counts, format=fmt, skipped_rows=skipped, train_rows=len(train),
                 train_target_tokens=train.target_tokens())
    if n_sources > 1:
        stats["sources"] = source_stats(cfg, train)

    if cfg.eval:
        held_out, _, eval_skipped = read_split(cfg, "eval", fmt, labels,
                                               shape if shape in ("pairs", "prompts") else "text")
        stats["skipped_rows"] += eval_skipped
    eval_parts: list = []
    eval_rows = rows_of(held_out, per_part=eval_parts) if any(held_out) else None
    if eval_rows is not None:
        refuse_empty_evaluation(cfg, eval_parts)
    if eval_rows is not None:
        stats["eval_rows"] = len(eval_rows)
    retention_rows = rows_of(read_split(cfg, "retention")[0], task_rows=False) if cfg.retention else None
    if retention_rows is not None:
        stats["retention_rows"] = len(retention_rows)
    replay_rows = rows_of(read_split(cfg, "replay")[0], task_rows=False) if cfg.replay else None
    if replay_rows is not None:
        stats["replay_rows"] = len(replay_rows)
    return Dataset(train, eval_rows, retention_rows, fmt, stats, replay_rows)


def refuse_empty_evaluation(cfg: DataConfig, parts: list[tuple[int, dict, int]]) -> None:
    """An eval source whose rows keep no token to evaluate (every example's targets cut away by
    data.max_length, or empty) would report an eval loss of 0 over nothing: refused, with the
    source and why, before any step. `parts`: each eval source's (records, counts, target tokens)."""
    if cfg.eval:
        named = [f"{key}: {source.path}" for key, source in keyed_sources(cfg, "eval")]
    else:
        named = [f"the data.eval_fraction of {key} held out for evaluation ({source.path})"
                 for key, source in keyed_sources(cfg, "train")]
    for where, (n_records, seen, targets) in zip(named, parts):
        if n_records and not targets:
            cut = seen.get("truncated", 0)
            why = (f"all {n_records} of its examples are longer than data.max_length {cfg.max_length} and lose "
                   "every token the loss is on (their prompts fill it)" if cut >= n_records else
                   f"none of its {n_records} examples keeps a token the loss is on within data.max_length "
                   f"{cfg.max_length} ({cut} are longer than it)")
            raise UserError(f"{where}: no token to evaluate: {why}; an eval loss over zero tokens would read 0. "
                            "Raise data.max_length, shorten the prompts, or evaluate on other rows")


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


def rank_rows(order: np.ndarray, index: int, batch_size: int, rank: int, world_size: int, shared: bool) -> list[int]:
    """Rank `rank`'s rows of global batch `index`, from an epoch's `order`. `shared` (every rank
    holds every row, `order` is the world's): its contiguous part of the world's batch, so that
    the batch is the same rows at any world size. Else `order` is the rank's own rows': its next
    batch_size / world_size of them."""
    per_rank = batch_size // world_size
    start = index * batch_size + rank * per_rank if shared else index * per_rank
    return order[start : start + per_rank].tolist()


def replay_share(step: int, rows_per_step: int, fraction: float) -> range:
    """Positions in the replay stream of step `step`'s replay rows: `fraction` of the step's
    rows (task rows and replay rows together), whole rows, exact over the run (a function of the
    step alone, so resumable)."""
    per_step = rows_per_step * fraction / (1 - fraction)
    return range(math.floor((step - 1) * per_step + 1e-9), math.floor(step * per_step + 1e-9))


def replay_order(positions: range, n_rows: int, pass_order: Callable[[int], np.ndarray]) -> list[int]:
    """The replay rows at these stream positions: pass k over the rows in `pass_order(k)`
    (epoch_order by the seed; the caller keeps the one it reads)."""
    out = []
    for position in positions:
        cycle, at = divmod(position, n_rows)
        out.append(int(pass_order(cycle)[at]))
    return out


def epoch_order(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The row order of one epoch: a function of (seed, epoch) alone, so resumable."""
    return np.random.default_rng([seed, epoch]).permutation(n_rows)
