"""The objectives' registry that resolves a config to the one objective its run
optimises. `task: classification` -> classification; `objective: sft` -> sft; `objective:
dpo` -> dpo; `objective: mypkg.losses:MyObjective` -> that class, imported (from the working
directory, as `python -m` would) only when a config names it, with its `objective_args:`.

Everything here is torch-free: config validation resolves the class to check the config
against it (its rows, formats and metrics); an instance is made only where a run trains.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from typing import TYPE_CHECKING, Any, Mapping, Optional

from ftdist.objectives.protocol import TEXT_FORMATS, Direction, Objective, protocol_problems

if TYPE_CHECKING:
    from pydantic import BaseModel

    from ftdist.config.schema import Config

# Name -> the class's import path. `objective:` takes sft and dpo; `task: classification` names
# the third (its head and labels make it a task of its own, as the config has always said).
BUILT_IN = {"sft": "ftdist.objectives.sft:Sft", "dpo": "ftdist.objectives.dpo:Dpo",
            "classification": "ftdist.objectives.classification:Classification",
            "grpo": "ftdist.objectives.grpo:Grpo"}
CONFIG_NAMES = ("sft", "dpo", "grpo")
EXAMPLE_PATH = "mypkg.losses:MyObjective"
# What the rows of each shape are, in a message.
ROW_WORDS = {"text": "text rows (text, prompt/completion, chat)", "pairs": "preference rows ({prompt, chosen, rejected})",
             "labels": "{text, label} rows", "prompts": "prompt rows ({prompt, the columns its rewards read})"}


def objective_name(cfg: "Config") -> str:
    return name_of(cfg.task, cfg.objective)


def name_of(task: str, objective: str) -> str:
    """The name of a run's objective: classification for task: classification, else what
    `objective:` says (a built-in's name, or an import path)."""
    return "classification" if task == "classification" else objective


def objective_class(cfg: "Config") -> type[Objective]:
    return load(objective_name(cfg))


def resolve(cfg: "Config") -> Objective:
    """The run's objective, made from the validated config (its objective_args parsed)."""
    cls = objective_class(cfg)
    return cls(cfg, parse_args(cls, cfg.objective_args))


def load(name: str) -> type[Objective]:
    """A built-in objective's class by name, or a class by import path (module:Class).
    ValueError, saying what is wrong and the fix, for anything else."""
    path = BUILT_IN.get(name)
    if path is not None:
        module, _, attr = path.partition(":")
        return getattr(importlib.import_module(module), attr)
    return import_class(name)


def import_class(path: str) -> type[Objective]:
    module_name, sep, attr = path.partition(":")
    if not (sep and attr.isidentifier() and all(part.isidentifier() for part in module_name.split("."))):
        close = difflib.get_close_matches(path, CONFIG_NAMES, n=1, cutoff=0.6)
        raise ValueError(f"{path!r} is neither a built-in objective ({', '.join(CONFIG_NAMES)}) nor a class by import "
                         f"path (module:Class, e.g. {EXAMPLE_PATH})"
                         + (f"; did you mean {close[0]}?" if close else ""))
    module = import_module(module_name)
    cls = getattr(module, attr, None)
    if cls is None:
        classes = [n for n, v in vars(module).items() if isinstance(v, type) and v.__module__ == module.__name__]
        close = difflib.get_close_matches(attr, classes, n=1, cutoff=0.6)
        raise ValueError(f"module {module_name} ({getattr(module, '__file__', '?')}) has no {attr}"
                         + (f"; did you mean {module_name}:{close[0]}?" if close else
                            f"; name one of its classes ({', '.join(classes) or 'it defines none'})"))
    problems = protocol_problems(cls)
    if problems:
        raise ValueError(f"{path} is not an objective: {'; '.join(problems)} (the protocol: docs/objectives.md)")
    return cls


def import_module(module_name: str):
    """The module, found from the working directory first (as `python -m` finds it), then on
    sys.path. The working directory is on the path only while it is imported."""
    here = os.getcwd()
    added = here not in sys.path
    if added:
        sys.path.insert(0, here)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ValueError(f"no module {module_name} in the working directory {here} nor on Python's path: run "
                             f"from the directory that holds {module_name.replace('.', '/')}.py, or install its "
                             "package") from None
        raise ValueError(f"importing {module_name} failed: it imports {e.name}, which is not installed") from None
    except Exception as e:  # noqa: BLE001 - the user's module failing as it is imported: one line, theirs to fix
        raise ValueError(f"importing {module_name} failed: {type(e).__name__}: {e}; fix the module") from None
    finally:
        if added and here in sys.path:
            sys.path.remove(here)


def parse_args(cls: type[Objective], raw: Mapping[str, Any]) -> Optional["BaseModel"]:
    """`objective_args:` as the objective's Args model; ValueError naming the key (config
    validation shows it under objective_args)."""
    if cls.Args is None:
        if raw:
            where = f": its settings are under {cls.section}:" if cls.section else ""
            raise ValueError(f"objective {cls.name} takes no objective_args (given {', '.join(map(str, raw))}){where}; "
                             "remove objective_args")
        return None
    from pydantic import ValidationError

    try:
        return cls.Args.model_validate(dict(raw))
    except ValidationError as e:
        told = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(all)"
            if err["type"] == "extra_forbidden":
                known = list(cls.Args.model_fields)
                close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1, cutoff=0.6)
                told.append(f"{key}: unknown key"
                            + (f"; did you mean {close[0]}?" if close else f"; {cls.name} takes {', '.join(known)}"))
            elif err["type"] == "missing":
                told.append(f"{key}: required by objective {cls.name}")
            else:
                told.append(f"{key}: {err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r})")
        raise ValueError("; ".join(told)) from None


def what(cfg: "Config") -> str:
    """How messages name the run's objective."""
    return "task classification" if cfg.task == "classification" else f"objective {cfg.objective}"


def config_problem(cfg: "Config") -> Optional[str]:
    """What in the config does not fit its objective (the task, data formats, replay), or None."""
    cls = objective_class(cfg)
    if cfg.task == "classification" and cfg.objective != "sft":
        on = " on preference pairs" if load(cfg.objective).rows == "pairs" else ""
        return (f"objective {cfg.objective} trains a causal LM{on}: use task: causal_lm (a classifier trains with "
                "objective: sft)")
    formats = {cfg.data.format} | {s.format for s in cfg.data.sources if s.format}
    extra = sorted(formats - {"auto"} - set(cls.formats))
    if extra:
        owner = {f: n for n in BUILT_IN for f in load(n).formats if f not in TEXT_FORMATS}
        foreign = [f for f in extra if f in owner]
        if cls.rows == "text" and foreign:
            fmt = foreign[0]
            needs = "need task: classification" if owner[fmt] == "classification" else f"train with objective: {owner[fmt]}"
            return f"data.format {fmt}: {ROW_WORDS[load(owner[fmt]).rows]} {needs}"
        wanted = " or ".join(cls.formats) if len(cls.formats) <= 2 else f"one of {', '.join(cls.formats)}"
        return (f"{what(cfg)} trains on {ROW_WORDS[cls.rows]}: set data.format to {wanted} (or auto), not "
                f"{', '.join(extra)}")
    if cfg.regularization.replay is not None and cls.rows != "text":
        return (f"regularization.replay mixes text into the batches, which {what(cfg)} does not train on (its batches "
                f"are {ROW_WORDS[cls.rows]}): use regularization.l2sp or regularization.ewc with {what(cfg)}")
    return cls.problem(cfg) if hasattr(cls, "problem") else None


# A tune metric of every objective: the eval loss plus forgetting on data.retention (tune.trial).
PLUS_FORGETTING = "eval_loss_plus_forgetting"


def tune_metrics(cfg: "Config") -> dict[str, Direction]:
    return {**objective_class(cfg).metrics, PLUS_FORGETTING: "min"}


def default_tune_metric(cfg: "Config") -> str:
    return next(iter(objective_class(cfg).metrics))


def default_tune_mode(cfg: "Config", metric: str) -> Direction:
    return tune_metrics(cfg).get(metric, "min")


def tune_metric_problem(cfg: "Config", metric: str, mode: str) -> Optional[str]:
    metrics = tune_metrics(cfg)
    if metric not in metrics:
        owners = [n for n in BUILT_IN if metric in load(n).metrics]
        owner = ("task: classification" if owners[0] == "classification" else f"objective: {owners[0]}") \
            if owners else None
        close = difflib.get_close_matches(metric, list(metrics), n=1, cutoff=0.6)
        return (f"tune.metric {metric} is not a metric of {what(cfg)}"
                + (f" (it is one of {owners[0]}'s: set {owner})" if owner else "")
                + f"; use one of {', '.join(metrics)}" + (f" (did you mean {close[0]}?)" if close and not owner else ""))
    better = metrics[metric]
    if mode != better:
        return (f"tune.mode {mode} with tune.metric {metric}: {'higher' if better == 'max' else 'lower'} is better, so "
                f"set tune.mode: {better}")
    return None
