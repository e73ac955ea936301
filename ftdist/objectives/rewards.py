"""objective grpo's rewards: built-ins by name, or a function of yours by import path
(`mypkg.rewards:is_correct`, found from the working directory as `python -m` finds it).

Every reward is called as TRL calls its reward functions:

    fn(prompts=[...], completions=[...], **columns) -> [float | None, ...]

one entry per completion; `columns`: each other column of the prompt rows, a list aligned
with the completions. A completion is a string for a string prompt, and a list holding one
assistant turn ({"role": "assistant", "content": ...}) for a chat prompt. None: not scored by
this reward (a completion no reward scores gets no advantage). A reward that raises, returns
the wrong number of values, or a value that is not a number stops the run, naming it and the
row.

Built-ins (each 1.0 or 0.0 unless said):
  exact_match  the completion, stripped, equals the row's `column`, stripped
  regex        `pattern` is found in the completion (re.search; anchor it for a whole match)
  json         the completion is valid JSON; with `column`: JSON equal to the column (a string
               column is read as JSON where it is JSON)
  length       -(characters beyond `target`) / `target`: 0 up to target, -1 at twice it

Torch-free: config validation imports a named function to check it exists.
"""

from __future__ import annotations

import difflib
import inspect
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ftdist.errors import UserError
from ftdist.objectives.registry import import_module

BUILT_IN_ARGS = {"exact_match": ("column",), "regex": ("pattern",), "json": (), "length": ("target",)}
ARGS = ("column", "pattern", "target")
EXAMPLE_PATH = "mypkg.rewards:is_correct"


def text_of(completion: Any) -> str:
    """A completion's text: the string, or its assistant turn's content."""
    if isinstance(completion, list):
        return "".join(t.get("content", "") for t in completion if isinstance(t, dict))
    return str(completion)


def exact_match(column: str):
    def reward(prompts, completions, **columns):
        return [float(text_of(c).strip() == str(v).strip()) for c, v in zip(completions, columns[column])]
    return reward


def regex(pattern: str):
    compiled = re.compile(pattern)

    def reward(prompts, completions, **columns):
        return [float(compiled.search(text_of(c)) is not None) for c in completions]
    return reward


def as_json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def json_reward(column: Optional[str] = None):
    def reward(prompts, completions, **columns):
        scores = []
        for i, c in enumerate(completions):
            try:
                parsed = json.loads(text_of(c))
            except ValueError:
                scores.append(0.0)
                continue
            scores.append(1.0 if column is None else float(parsed == as_json(columns[column][i])))
        return scores
    return reward


def length(target: int):
    def reward(prompts, completions, **columns):
        return [-max(0, len(text_of(c)) - target) / target for c in completions]
    return reward


@dataclass(frozen=True)
class Reward:
    """One of grpo.rewards, ready to call: how messages name it, its weight, the function."""

    name: str
    weight: float
    fn: Callable[..., list]


def spec_problem(spec) -> Optional[str]:
    """What is wrong with one grpo.rewards entry (a RewardConfig), or None. Imports a function
    named by import path (its module from the working directory first)."""
    name = spec.function
    given = {a for a in ARGS if getattr(spec, a) is not None}
    if name in BUILT_IN_ARGS:
        needs = set(BUILT_IN_ARGS[name])
        missing, extra = needs - given, given - needs - ({"column"} if name == "json" else set())
        if missing:
            return f"the {name} reward needs {', '.join(sorted(missing))}"
        if extra:
            return f"the {name} reward takes no {', '.join(sorted(extra))}"
        if name == "regex":
            try:
                re.compile(spec.pattern)
            except re.error as e:
                return f"pattern {spec.pattern[:200]!r} is not a regular expression: {e}"
        return None
    if ":" not in name:
        close = difflib.get_close_matches(name, list(BUILT_IN_ARGS), n=1, cutoff=0.6)
        return (f"{name[:200]!r} is neither a built-in reward ({', '.join(BUILT_IN_ARGS)}) nor a function by import "
                f"path (module:function, e.g. {EXAMPLE_PATH})" + (f"; did you mean {close[0]}?" if close else ""))
    if given:
        return (f"{', '.join(sorted(given))}: settings of the built-in rewards; a function of your own gets the "
                "row's columns as keyword arguments")
    try:
        imported(name)
    except ValueError as e:
        return str(e)
    return None


def imported(path: str) -> Callable[..., list]:
    module_name, _, attr = path.partition(":")
    if not (attr.isidentifier() and all(p.isidentifier() for p in module_name.split("."))):
        raise ValueError(f"{path[:200]!r} is not an import path (module:function, e.g. {EXAMPLE_PATH})")
    module = import_module(module_name)
    fn = getattr(module, attr, None)
    if not callable(fn):
        functions = [n for n, v in vars(module).items() if inspect.isfunction(v) and v.__module__ == module.__name__]
        close = difflib.get_close_matches(attr, functions, n=1, cutoff=0.6)
        raise ValueError(f"module {module_name} ({getattr(module, '__file__', '?')}) has no function {attr}"
                         + (f"; did you mean {module_name}:{close[0]}?" if close else
                            f"; name one of its functions ({', '.join(functions) or 'it defines none'})"))
    return fn


def load_rewards(specs) -> list[Reward]:
    """grpo.rewards as callables (validated config: every name resolves)."""
    rewards = []
    for spec in specs:
        name = spec.function
        if name == "exact_match":
            fn = exact_match(spec.column)
        elif name == "regex":
            fn = regex(spec.pattern)
        elif name == "json":
            fn = json_reward(spec.column)
        elif name == "length":
            fn = length(spec.target)
        else:
            fn = imported(name)
        rewards.append(Reward(name, spec.weight, fn))
    return rewards


def score(rewards: list[Reward], prompts: list, completions: list, columns: dict[str, list],
          rows: list[str]) -> list[list[float]]:
    """Each completion's score by each reward ([completion][reward]; NaN: not scored). `rows`:
    how messages name each completion's prompt row. A reward that fails stops the run with
    one message naming it and the row."""
    n = len(completions)
    table = [[math.nan] * len(rewards) for _ in range(n)]
    for k, reward in enumerate(rewards):
        where = f"grpo.rewards.{k} ({reward.name[:200]})"
        try:
            values = reward.fn(prompts=prompts, completions=completions, **columns)
        except KeyError as e:
            missing = e.args[0] if e.args else "?"
            raise UserError(f"{where}: the prompt rows have no column {str(missing)[:80]!r} (they have "
                            f"{', '.join(sorted(columns)) or 'none besides prompt'}): add it to the rows, or name "
                            "another column") from None
        except Exception as e:  # noqa: BLE001 - the user's function: one line naming it and the rows
            raise UserError(f"{where} raised {type(e).__name__}: {str(e)[:300]} (on the completions of {rows[0]}"
                            f"{' ...' if len(set(rows)) > 1 else ''}); fix the function") from None
        try:
            count = len(values)
        except TypeError:
            raise UserError(f"{where} returned a {type(values).__name__}, not a list with one number (or None) per "
                            f"completion (on {rows[0]})") from None
        if count != n:
            raise UserError(f"{where} returned {count} values for {n} completions (on {rows[0]}"
                            f"{' ...' if len(set(rows)) > 1 else ''}): return one number (or None) per completion")
        for i, v in enumerate(values):
            if v is None:
                continue
            if not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
                raise UserError(f"{where} returned {type(v).__name__} {str(v)[:80]!r} for a completion of {rows[i]}: "
                                "each value is a number or None")
            value = float(v)
            if not math.isfinite(value):
                raise UserError(f"{where} returned {value} for a completion of {rows[i]}: a reward must be a finite "
                                "number (None: not scored)")
            table[i][k] = value
    return table
