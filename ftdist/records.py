"""JSONL rows -> validated records, read without the training stack (no torch), so that a
bad row is reported in the first seconds, before any model loads.

Three formats, each row one example:
  text               {"text": "..."}
  prompt_completion  {"prompt": "...", "completion": "..."}
  chat               {"messages": [{"role", "content"}...]}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ftdist.errors import UserError


def read_jsonl(path: str, fmt: str = "auto", skip_bad_rows: bool = False) -> tuple[list[dict], str, int]:
    """Validated records, the format they share, and how many bad rows were skipped."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"data file not found: {path} (check data.train / data.eval / data.retention)")
    records: list[dict] = []
    skipped = 0
    with file.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                row_fmt = check_record(record)
                if fmt == "auto":
                    fmt = row_fmt
                elif row_fmt != fmt:
                    raise ValueError(f"row is {row_fmt} but the file is {fmt} (data.format or its first row)")
            except (ValueError, TypeError) as e:
                if skip_bad_rows:
                    skipped += 1
                    continue
                reason = f"not valid JSON ({e.msg})" if isinstance(e, json.JSONDecodeError) else str(e)
                raise UserError(
                    f"{path}:{line_no}: {reason}; fix the row, or set data.skip_bad_rows: true to skip bad rows"
                ) from None
            records.append(record)
    if not records:
        raise UserError(f"{path}: no usable rows" + (f" ({skipped} bad rows skipped)" if skipped else ""))
    return records, fmt, skipped


def check_record(record: Any) -> str:
    if not isinstance(record, dict):
        raise ValueError("each row must be a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError('"messages" must be a non-empty list of {"role", "content"}')
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f'messages[{i}] must be {{"role": str, "content": str}}')
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("a chat row needs at least one assistant message (the loss is on them)")
        return "chat"
    if "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), str):
                raise ValueError(f'"{key}" must be a string')
        if not record["completion"]:
            raise ValueError('"completion" is empty')
        return "prompt_completion"
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"]:
            raise ValueError('"text" must be a non-empty string')
        return "text"
    raise ValueError('expected a "text", "prompt"+"completion" or "messages" key, got ' + str(sorted(record)))


def read_text_file(path: str) -> list[dict]:
    """Plain text (paragraphs split on blank lines) or JSONL, for retention data."""
    if path.endswith(".jsonl"):
        return read_jsonl(path, "text")[0]
    file = Path(path)
    if not file.is_file():
        raise UserError(f"data file not found: {path} (check data.retention)")
    paragraphs = [p.strip() for p in file.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    if not paragraphs:
        raise UserError(f"{path}: no text")
    return [{"text": p} for p in paragraphs]


def corpus_texts(records: list[dict]) -> list[str]:
    """All strings of the records, for training a tokenizer."""
    texts = []
    for r in records:
        if "messages" in r:
            texts.extend(m["content"] for m in r["messages"])
        elif "prompt" in r:
            texts.append(r["prompt"] + r["completion"])
        else:
            texts.append(r["text"])
    return texts


def tokenizer_corpus(data) -> list[str]:
    """The text a fresh tokenizer learns from (model.init runs): the training data, and the
    retention text. `data`: the run's DataConfig."""
    records = read_jsonl(data.train, data.format, skip_bad_rows=True)[0]
    if data.retention:
        records += read_text_file(data.retention)
    return corpus_texts(records)
