"""Raw rows (sources.py) -> validated records in one of three shapes the tokenizer knows,
read without the training stack (no torch), so that a bad row is reported in the first
seconds, before any model loads.

Formats (data.format; `auto` tells them apart by a row's keys):
  text               {"text"}                                        loss on every token
  prompt_completion  {"prompt", "completion"}                        loss on the completion
  chat               {"messages": [{"role", "content"}...]}          loss on assistant turns
  alpaca             {"instruction", "input"?, "output", "system"?}  -> chat, loss on the output
  sharegpt           {"conversations": [{"from", "value"}...]}       -> chat, loss on gpt turns
  preference         {"prompt", "chosen", "rejected"}                objective dpo: each a string or turns
  prompt             {"prompt", other columns...}                    objective grpo: a string or turns, and
                                                                     the columns its rewards read

data.columns renames keys (ftdist's name: the file's, for top-level keys and the keys of each
turn) and data.roles names other role names (ftdist's role: [the file's names]).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Optional

from ftdist.config.echo import echo
from ftdist.config.load import not_a_file
from ftdist.config.schema import FIELDS, ROLES, SPLITS, TEXT_SPLITS
from ftdist.data.sources import Unreadable, is_data_file, is_glob, is_hub, read_rows
from ftdist.errors import UserError

FORMATS = ("text", "prompt_completion", "chat", "alpaca", "sharegpt", "preference", "classification", "prompt")
TURN_FIELDS = ("role", "content", "from", "value")
# Role names understood without data.roles: OpenAI's and ShareGPT's.
KNOWN_ROLES = {**{r: r for r in ROLES}, "human": "user", "gpt": "assistant"}


class RowReader:
    """Validates and normalizes the rows of one config: its format, key and role mapping."""

    def __init__(self, columns: Optional[dict[str, str]] = None, roles: Optional[dict[str, list[str]]] = None,
                 labels: Optional[list] = None):
        self.labels = None if labels is None else {str(x) for x in labels}  # classification.labels, if given
        self.file_key = {**{f: f for f in FIELDS}, **(columns or {})}  # ftdist's name -> the file's
        self.our_key = {f: f for f in FIELDS} | {theirs: ours for ours, theirs in (columns or {}).items()}
        self.roles = dict(KNOWN_ROLES)
        for ours, names in (roles or {}).items():
            self.roles.update({name: ours for name in names})

    def name(self, field: str) -> str:
        """A field as the file names it, for messages."""
        return f'"{self.file_key[field]}"'

    # ------------------------------------------------------------ reading

    def read(self, path: str, fmt: str = "auto", skip_bad_rows: bool = False, key: str = "data.train",
             rows: str = "text") -> tuple[list[dict], str, int]:
        """Validated records of a source, the format they share, and how many bad rows were
        skipped. `rows`: what the objective trains on (ftdist.objectives.protocol.RowShape): preference
        pairs only where it is pairs, never elsewhere."""
        records: list[dict] = []
        skipped = 0
        for where, row in read_rows(path, key):
            try:
                if isinstance(row, Unreadable):
                    raise ValueError(row.reason)
                if fmt == "auto" and rows == "prompts" and isinstance(row, dict):
                    # A row with a prompt is a prompt row (its completion or answer a column the rewards read).
                    fmt = "prompt" if "prompt" in {self.our_key.get(k, k) for k in row} else self.detect(row)
                    refuse_other_objective(fmt, path, key, rows)
                row_fmt, record = self.normalize(row, fmt)
                if fmt == "auto":
                    fmt = row_fmt
                    refuse_other_objective(fmt, path, key, rows)
            except (ValueError, TypeError) as e:
                if skip_bad_rows:
                    skipped += 1
                    continue
                raise UserError(f"{where}: {e}; fix the row, or set data.skip_bad_rows: true to skip bad rows") from None
            records.append(record)
        refuse_other_objective(fmt, path, key, rows)
        if not records:
            raise UserError(f"{key}: {path}: no usable rows" + (f" ({skipped} bad rows skipped)" if skipped else ""))
        return records, fmt, skipped

    # ------------------------------------------------------------ one row

    def normalize(self, row: Any, fmt: str = "auto") -> tuple[str, dict]:
        """(the row's format, its record: {text} | {prompt, completion} | {messages})."""
        if not isinstance(row, dict):
            raise ValueError(f"each row must be an object of named fields, got {type(row).__name__}")
        given, row = row, {self.our_key.get(k, k): v for k, v in row.items()}
        row_fmt = self.detect(row) if fmt == "auto" else fmt  # a set format is trusted, then checked
        try:
            record = getattr(self, row_fmt)(row)
            if surrogate_at(record) is not None:
                raise ValueError(f"{surrogate_at(given)} holds a lone UTF-16 surrogate, half of a character: "
                                 "not text (JSON's \\ud800-\\udfff escapes come in pairs, e.g. \\ud83d\\ude00)")
            return row_fmt, record
        except ValueError:
            other = self.detect(row) if fmt != "auto" else fmt
            if other != fmt:
                raise ValueError(f"row is {other} but the file is {fmt} (data.format or its first row)") from None
            raise

    def detect(self, row: dict) -> str:
        if "messages" in row:
            return "chat"
        if "conversations" in row:
            return "sharegpt"
        if "instruction" in row or "output" in row:
            return "alpaca"
        if "chosen" in row or "rejected" in row:
            return "preference"
        if "prompt" in row or "completion" in row:
            return "prompt_completion"
        if "label" in row:
            return "classification"
        if "text" in row:
            return "text"
        raise ValueError(f"no known keys in [{shown_keys(row)}]: expected text, prompt+completion, messages, "
                         "conversations, instruction+output, prompt+chosen+rejected or text+label (rename yours "
                         "with data.columns)")

    def string(self, row: dict, field: str, required: bool = True, empty_ok: bool = False) -> str:
        """A string field. `required`: the row must have it (a row whose columns match its format
        only in part is named, never half-read); `empty_ok`: it may be "" (a prompt)."""
        if field not in row:
            if not required:
                return ""
            keys = shown_keys(row)
            raise ValueError(f"{self.name(field)} must be a string, and is missing: the row's keys are [{keys}], "
                             "which match no format "
                             f"in full; name yours with data.columns (e.g. data.columns: {{{field}: YOUR_KEY}}) or "
                             "set data.format")
        value = row[field]
        if not isinstance(value, str):
            raise ValueError(f"{self.name(field)} must be a string")
        if required and not empty_ok and not value.strip():
            raise ValueError(f"{self.name(field)} is empty")
        return value

    def text(self, row: dict) -> dict:
        return {"text": self.string(row, "text")}

    def classification(self, row: dict) -> dict:
        label = row.get("label")
        if isinstance(label, bool) or not isinstance(label, (str, int)) or (isinstance(label, str) and not label.strip()):
            raise ValueError(f"{self.name('label')} must be a label: a non-empty string or an integer"
                             + ("" if "label" in row else ", and is missing"))
        if self.labels is not None and str(label) not in self.labels:
            raise ValueError(f"{self.name('label')} {echo(label, 80)} is not one of classification.labels "
                             f"({', '.join(sorted(self.labels))})")
        return {"text": self.string(row, "text"), "label": label}

    def prompt_completion(self, row: dict) -> dict:
        return {"prompt": self.string(row, "prompt", empty_ok=True), "completion": self.string(row, "completion")}

    def alpaca(self, row: dict) -> dict:
        instruction, extra = self.string(row, "instruction"), self.string(row, "input", required=False)
        messages = [{"role": "system", "content": self.string(row, "system")}] if row.get("system") else []
        messages += [{"role": "user", "content": instruction + ("\n\n" + extra if extra.strip() else "")},
                     {"role": "assistant", "content": self.string(row, "output")}]
        return {"messages": messages}

    def chat(self, row: dict) -> dict:
        return {"messages": self.turns(row, "messages", "role", "content")}

    def sharegpt(self, row: dict) -> dict:
        return {"messages": self.turns(row, "conversations", "from", "value")}

    def turns(self, row: dict, field: str, role_key: str, content_key: str, need_assistant: bool = True) -> list[dict]:
        turns = row.get(field)
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"{self.name(field)} must be a non-empty list of "
                             f"{{{self.name(role_key)}, {self.name(content_key)}}}")
        messages = []
        for i, turn in enumerate(turns):
            turn = {self.our_key.get(k, k): v for k, v in turn.items()} if isinstance(turn, dict) else turn
            where = f"{self.file_key[field]}[{i}]"
            if not isinstance(turn, dict) or not isinstance(turn.get(role_key), str) \
                    or not isinstance(turn.get(content_key), str):
                raise ValueError(f"{where} must be {{{self.name(role_key)}: str, {self.name(content_key)}: str}}")
            role = self.roles.get(turn[role_key])
            if role is None:
                named = turn[role_key][:80]  # a row's value, echoed: bounded
                raise ValueError(f'{where}: unknown role "{named}"; say which it is with data.roles, '
                                 f"e.g. data.roles: {{assistant: [{named}]}} (roles: {', '.join(ROLES)})")
            messages.append({"role": role, "content": turn[content_key]})
        if need_assistant and not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{self.name(field)} needs at least one assistant turn (the loss is on them)")
        return messages

    def prompt(self, row: dict) -> dict:
        """{prompt: a string or turns (user, system), columns: every other key, as the file has it}."""
        value = row.get("prompt")
        if isinstance(value, list):
            prompt = self.turns(row, "prompt", "role", "content", need_assistant=False)
        elif isinstance(value, str) and value.strip():
            prompt = value
        else:
            raise ValueError(f"{self.name('prompt')} must be a non-empty string or a list of turns")
        return {"prompt": prompt, "columns": {str(k): v for k, v in row.items() if k != "prompt"}}

    def preference(self, row: dict) -> dict:
        record = {}
        for field in ("prompt", "chosen", "rejected"):
            value = row.get(field)
            if isinstance(value, list):
                record[field] = self.turns(row, field, "role", "content", need_assistant=field != "prompt")
            elif isinstance(value, str) and (value.strip() or field == "prompt"):
                record[field] = value
            else:
                raise ValueError(f"{self.name(field)} must be a non-empty string or a list of turns")
        if record["chosen"] == record["rejected"]:
            raise ValueError(f"{self.name('chosen')} and {self.name('rejected')} are the same response: the pair "
                             "prefers nothing")
        return record


def surrogate_at(value: Any, path: str = "") -> Optional[str]:
    """Where in a row (or a part of one) a string holds a lone UTF-16 surrogate (JSON's "\\ud800"
    alone, which json.loads lets through and no tokenizer can encode); None where none does."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"{path or 'the row'} (\\u{ord(value[e.start]):04x} at character {e.start + 1})"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = surrogate_at(item, f'{path}"{key}"' if not path and isinstance(key, str)
                             else f'{path}["{key}"]' if isinstance(key, str) else f"{path}[{key}]")
        if found:
            return found
    return None


INTEGER = re.compile(r"-?[0-9]+")


def shown_keys(row: dict, most: int = 12) -> str:
    """A row's keys for a message: a few, each cut short (a row can hold any number, any size)."""
    return ", ".join(repr(str(k)[:40]) for k in sorted(row, key=str)[:most]) + (", ..." if len(row) > most else "")


def labels_of(records: Iterable[dict]) -> list[str]:
    """The label set of classification records, each label as the string it reads as (1 and
    "1" are one label): integers in numeric order, else sorted as text (so "--1", "1.5" or "²",
    which are no integers, make the labels text)."""
    found = {str(r["label"]) for r in records}
    numeric = all(INTEGER.fullmatch(x) for x in found)
    return sorted(found, key=lambda x: (int(x), x) if numeric else (0, x))


def refuse_other_objective(fmt: str, path: str, key: str, rows: str) -> None:
    """Preference pairs train with objective dpo, and objective dpo trains on them alone;
    prompt rows are objective grpo's alone."""
    if rows == "prompts" and fmt != "prompt":
        raise UserError(f"{key}: {path}: rows are {fmt}, but objective grpo samples its own completions from prompt "
                        "rows ({\"prompt\": ..., and the columns its rewards read}); set data.format: prompt (or "
                        "auto), or set objective: sft to train on these rows")
    if rows != "prompts" and fmt == "prompt":
        raise UserError(f"{key}: {path}: prompt rows have nothing to learn from but rewards: set objective: grpo "
                        "(with grpo.rewards), or give completions (data.format: prompt_completion)")
    if rows != "pairs" and fmt == "preference":
        raise UserError(f"{key}: {path}: rows are preference pairs ({{prompt, chosen, rejected}}), but objective sft "
                        "(supervised fine-tuning) trains on text, prompt/completion or chat rows; set objective: dpo "
                        "to tune on the pairs, or train on the chosen answers: data.format: prompt_completion, "
                        "data.columns: {completion: chosen}")
    if rows == "pairs" and fmt != "preference":
        raise UserError(f"{key}: {path}: rows are {fmt}, but objective dpo trains on preference pairs ({{prompt, "
                        "chosen, rejected}); give pairs (rename your keys with data.columns, e.g. {chosen: good, "
                        "rejected: bad}), or set objective: sft to train on these rows")


def read_split(data, split: str, train_format: Optional[str] = None, labels: Optional[list] = None,
               rows: str = "text") -> tuple[list[list[dict]], str, int]:
    """Each source of data.<split>'s validated records (one list per source), the format they
    have (several: joined by "+"), and the bad rows skipped. Eval sources of no format of their
    own must have the training rows' `train_format` (where that is one format; dpo's are pairs); retention
    and replay sources are text, or plain text files (paragraphs split on blank lines). `labels`: the
    classification labels a row may have (unset: any). `rows`: what the objective trains on
    (ftdist.objectives.protocol.RowShape; pairs: preference pairs only)."""
    parts, formats, skipped = [], [], 0
    for key, source in keyed_sources(data, split):
        fmt = source.format
        if split == "eval" and fmt == "auto" and train_format and "+" not in train_format and \
                rows not in ("pairs", "prompts"):
            fmt = train_format
        if split in TEXT_SPLITS and is_plain_text(source.path):
            records, bad = plain_text(source.path, key), 0
        else:
            records, fmt, bad = RowReader(source.columns, source.roles, labels).read(
                source.path, fmt, data.skip_bad_rows, key, "text" if split in TEXT_SPLITS else rows)
        parts.append(records)
        formats.append(fmt)
        skipped += bad
    return parts, "+".join(dict.fromkeys(formats)), skipped


def read_train(data, labels: Optional[list] = None, rows: str = "text") -> tuple[list[list[dict]], str, int]:
    """Each training source's validated records (one list per source of a mixture), the
    format they have (a mixture of several: joined by "+"), and the bad rows skipped."""
    return read_split(data, "train", labels=labels, rows=rows)


def keyed_sources(data, split: str) -> list[tuple[str, Any]]:
    """(the config key that names it, the source) for each source of data.<split>."""
    single = not isinstance(getattr(data, split), list)
    key = SPLIT_KEYS.get(split, f"data.{split}")
    return [(key if single else f"{key}.{i}", s) for i, s in enumerate(data.split_sources(split))]


SPLIT_KEYS = {"replay": "regularization.replay.data"}  # where a split's sources are set, when not data.<split>


def is_plain_text(path: str) -> bool:
    """A plain text file (retention text), not a data source of rows."""
    return not (is_data_file(path) or is_glob(path) or is_hub(path) or Path(path).is_dir())


def plain_text(path: str, key: str) -> list[dict]:
    """A plain text file's paragraphs (split on blank lines) as text records."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{key}: {not_a_file(file)}")
    try:
        paragraphs = [p.strip() for p in file.read_text(encoding="utf-8-sig").split("\n\n") if p.strip()]
    except UnicodeDecodeError as e:
        raise UserError(f"{key}: {path}: not valid UTF-8 (byte {e.start}); save it as UTF-8") from None
    if not paragraphs:
        raise UserError(f"{key}: {path}: no text")
    return [{"text": p} for p in paragraphs]


def corpus_texts(records: Iterable[dict]) -> list[str]:
    """All strings of the records, for training a tokenizer."""
    texts = []
    for r in records:
        if "messages" in r:
            texts.extend(m["content"] for m in r["messages"])
        elif "chosen" in r:
            for value in (r["prompt"], r["chosen"], r["rejected"]):
                texts.extend([m["content"] for m in value] if isinstance(value, list) else [value])
        elif "columns" in r:  # a prompt row: its prompt, and the string columns its rewards compare with
            value = r["prompt"]
            texts.extend([m["content"] for m in value] if isinstance(value, list) else [value])
            texts.extend(v for v in r["columns"].values() if isinstance(v, str))
        elif "prompt" in r:
            texts.append(r["prompt"] + r["completion"])
        else:
            texts.append(r["text"])
    return texts


def tokenizer_corpus(data, rows: str = "text") -> list[str]:
    """The text a fresh tokenizer learns from (model.init runs): the training data, and the
    retention text. `data`: the run's DataConfig."""
    parts = read_split(data.model_copy(update={"skip_bad_rows": True}), "train", rows=rows)[0] \
        + read_split(data, "retention")[0]
    # What training can use of a text is its first max_length tokens: the tokenizer learns from no more
    # (a 100 MB row would cost BPE training its size, and teach it nothing a run sees).
    limit = data.max_length * CORPUS_CHARS_PER_TOKEN
    return [t[:limit] for t in corpus_texts(r for part in parts for r in part)]


CORPUS_CHARS_PER_TOKEN = 32  # the most characters of a text a fresh tokenizer's token is counted to cover


def data_paths(data) -> list[tuple[str, str]]:
    """(config key, path) of every data source: each source of train, eval, retention, replay."""
    return [(key, source.path) for split in SPLITS for key, source in keyed_sources(data, split)]
