"""A config file read: YAML with bounds (size, aliases, keys written twice), `--set` overrides,
validation into a `Config`, and every mistake told in one message naming the file, the key and
the fix ("did you mean"); the redacted snapshot a run keeps."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import ValidationError

from ftdist.config.echo import MAX_ECHO_CHARS, echo
from ftdist.config.redact import redact_url, redacted
from ftdist.config.schema import Config, all_keys
from ftdist.errors import UserError


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read YAML, apply `dotted.key=value` overrides, validate. Errors are UserErrors."""
    return validate_config(load_raw(path, overrides), source=str(path), overridden=override_keys(overrides))


# A config is a page of settings: bounds far above any real one, so that a hostile or careless
# file (a YAML alias bomb: a few hundred bytes that expand to millions of nodes) is refused in
# milliseconds instead of hanging validation, and no message ever echoes more than a line of it.
MAX_CONFIG_BYTES = 1 << 20  # 1 MiB of YAML


MAX_CONFIG_NODES = 100_000  # values once every alias is expanded


MAX_ERRORS_TOLD = 20  # problems of one config listed in its message


MERGE_TAG = "tag:yaml.org,2002:merge"


class StrictLoader(yaml.SafeLoader):
    """safe_load, but a key written twice in one mapping is an error: YAML would keep the
    last silently (a second `train:` section replacing the first). Merge keys (`<<: *defaults`)
    are YAML's own way to reuse a mapping: the keys written beside them override the merged ones."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {echo(key, 80)} appears twice (lines {seen[key]} and {line}); keep one",
                    key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep)


def expanded_size(node, limit: int = MAX_CONFIG_NODES) -> int:
    """How many values a composed YAML document holds once every alias is expanded, counted
    without expanding (a node reached by several aliases counts each time); ValueError for a
    node that contains itself, and as soon as the count passes `limit`."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(n) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ValueError(f"line {n.start_mark.line + 1}: an alias refers to a value that contains it (a "
                             "loop); write the value out")
        total = 1
        if isinstance(n.value, list):
            active.add(key)
            for child in n.value:
                for part in (child if isinstance(child, tuple) else (child,)):
                    total += size(part)
                    if total > limit:
                        raise ValueError(f"line {n.start_mark.line + 1}: more than {limit:,} values once its "
                                         "aliases (*name) are expanded; a config is a page of settings: write "
                                         "it out without nesting aliases")
            active.discard(key)
        sizes[key] = total
        return total

    return size(node)


def parse_yaml(text: str, where: str) -> Any:
    """YAML text (a config file, a --set value) as data, bounded: `where` names it in errors."""
    loader = StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            expanded_size(node)
        except ValueError as e:
            raise UserError(f"{where}: {e}") from None
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: Path, what: str = "config") -> Any:
    """A YAML file's content; a UserError naming the file (and line) for every way it can be wrong."""
    if path.is_dir():
        raise UserError(f"{path}: is a directory; give the {what} file itself (e.g. {path / 'config.yaml'})")
    if not path.is_file():
        raise UserError(f"{what} file {not_a_file(path)}")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise UserError(f"{path}: {size / 2**20:.1f} MiB is not a {what} file (at most {MAX_CONFIG_BYTES // 2**20} "
                        "MiB); give the YAML file of settings (data belongs in data.train's files)")
    try:
        return parse_yaml(path.read_text(encoding="utf-8"), str(path))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 (byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = str(getattr(e, "problem", None) or e)
        raise UserError(f"{where}: not valid YAML: {redact_url(problem[:2 * MAX_ECHO_CHARS])}") from None


def not_a_file(path: Path) -> str:
    """Why `path` cannot be read as a file, in words: "not found: PATH", or what it is instead
    (a FIFO, a socket, a device: reading one would block or never end)."""
    import stat

    try:
        mode = path.stat().st_mode
    except OSError:
        return f"not found: {path}"
    kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    return f"{path} is {kind}, not a regular file; ftdist reads its inputs more than once: save it to a file"


EXTENSION_PREFIX = "x-"  # top-level keys ftdist ignores: a place for YAML anchors (x-defaults: &defaults ...)


def is_extension_key(key: Any) -> bool:
    return isinstance(key, str) and key.startswith(EXTENSION_PREFIX)


def load_raw(path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """The YAML as written, with the overrides applied, not yet validated."""
    path = Path(path)
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections (run:, model:, ...)")
    raw = {k: v for k, v in raw.items() if not is_extension_key(k)}
    for item in overrides:
        apply_override(raw, item)
    return raw


def validate_config(raw: dict[str, Any], source: str = "config", overridden: frozenset[str] = frozenset()) -> Config:
    """`overridden`: the keys --set gave, which an error names as such (not the file's)."""
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise UserError(format_validation_error(e, source, overridden)) from None


def override_keys(overrides: list[str]) -> frozenset[str]:
    return frozenset(item.partition("=")[0].strip() for item in overrides)


def apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {echo(item)}: expected dotted.key=value, e.g. --set train.lr=3e-4")
    try:
        value = parse_yaml(text, f"--set {key.strip()}") if text.strip() else None
    except yaml.YAMLError:
        value = text
    try:
        set_dotted(raw, key.strip(), value)
    except KeyError as e:
        raise UserError(f"--set {echo(item)}: {e.args[0]}") from None


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """raw[a][b][c] = value for key "a.b.c", creating absent sections (a list's items by index:
    data.train.1.weight); KeyError(what is wrong) where a part is neither a section nor an item."""
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        if isinstance(node, list):  # a list's item by its index: data.train.1.weight
            if not part.isdigit() or int(part) >= len(node):
                raise KeyError(f"{part} is not an index of that list (it has {len(node)} items, from 0)")
            child = node[int(part)]
        else:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
        if not isinstance(child, (dict, list)):
            raise KeyError(f"{part} is not a section")
        node = child
    if isinstance(node, list):
        raise KeyError(f"{leaf} is an item of a list: set one of its keys, e.g. {key}.weight")
    node[leaf] = value


def format_validation_error(error: ValidationError, source: str, overridden: frozenset[str] = frozenset()) -> str:
    lines = [f"{source}: invalid configuration"]
    errors = error.errors()
    locs = [tuple(str(p)[:MAX_ECHO_CHARS] for p in err["loc"] if not _is_union_tag(p)) for err in errors]
    for err, where in list(zip(errors, locs))[:MAX_ERRORS_TOLD]:
        # A union's other branch ("should be a valid string" for a list of sources) where the
        # error is inside the branch the value took.
        if err["type"].endswith("_type") and any(len(o) > len(where) and o[:len(where)] == where for o in locs):
            continue
        loc = list(where)
        key = ".".join(loc) or "(top level)"
        if any(key == k or key.startswith(k + ".") for k in overridden):
            key = f"--set {key}"
        if err["type"] == "extra_forbidden":
            hint = suggest_key(loc)
            lines.append(f"  {key}: unknown key" + (f"; did you mean {hint}?" if hint else "")
                         + ("" if hint or len(loc) > 1 else f" (a block of YAML anchors to reuse goes under a key "
                                                            f"starting with {EXTENSION_PREFIX}, which ftdist ignores: "
                                                            f"{EXTENSION_PREFIX}{key})"))
            continue
        if err["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {echo(value)})"
        lines.append(f"  {key}: {redact_url(msg)[:2 * MAX_ECHO_CHARS]}{shown}")
    if len(errors) > MAX_ERRORS_TOLD:
        lines.append(f"  ... and {len(errors) - MAX_ERRORS_TOLD} more")
    return "\n".join(_dedupe(lines))


def _is_union_tag(part: Any) -> bool:
    # pydantic names union members in locations ("int", "literal['all']"): not keys.
    return isinstance(part, str) and (part in {"int", "str", "float", "bool"} or "[" in part)


def _dedupe(lines: list[str]) -> list[str]:
    seen: set[str] = set()
    return [x for x in lines if not (x in seen or seen.add(x))]


# What other tools (HF Trainer, PEFT, Axolotl) call a key: the suggestion for it names ours.
KNOWN_ALIASES = {"learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs",
                 "per_device_train_batch_size": "micro_batch_size", "max_seq_length": "max_length",
                 "sequence_len": "max_length", "r": "rank", "lora_r": "rank", "lora_alpha": "alpha",
                 "lora_dropout": "dropout", "max_grad_norm": "grad_clip", "lr_scheduler_type": "schedule",
                 "gradient_accumulation_steps": "batch_size", "dataset": "train"}


def suggest_key(loc: list[str]) -> Optional[str]:
    keys = all_keys()
    dotted = ".".join(loc)
    alias = KNOWN_ALIASES.get(loc[-1])
    if alias:
        ours = [k for k in keys if k.rsplit(".", 1)[-1] == alias]
        in_section = [k for k in ours if k.rsplit(".", 1)[0] == ".".join(loc[:-1])]
        if in_section or ours:
            return (in_section or ours)[0]
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == loc[-1] and k != dotted]
    if same_leaf:  # the right key in another section ("rank" at the top level -> lora.rank)
        return same_leaf[0]
    close = difflib.get_close_matches(dotted, keys, n=1, cutoff=0.6)
    if close:
        return close[0]
    leaf = loc[-1]
    by_leaf = [k for k in keys if difflib.SequenceMatcher(None, k.rsplit(".", 1)[-1], leaf).ratio() > 0.75]
    return by_leaf[0] if by_leaf else None


def config_yaml(cfg: Config) -> str:
    return yaml.safe_dump(redacted(cfg.model_dump(mode="json")), sort_keys=False)
