"""The search space of `tune.space`: dotted config keys, each with a domain.

Every value a trial can get is checked against the config before any trial starts (each
choice, each end of a range), so a bad space fails at once and names its key instead of
failing trials one by one on a cluster.
"""

from __future__ import annotations

import copy
from typing import Any

from ftdist.config.load import format_validation_error, set_dotted
from ftdist.config.schema import Config, SpaceSpec, freeze_depth_problem
from ftdist.errors import UserError


def with_params(raw: dict, params: dict[str, Any]) -> dict:
    """A copy of the raw config with each searched key set to the trial's value."""
    out = copy.deepcopy(raw)
    for key, value in params.items():
        set_dotted(out, key, value)  # space keys are leaf keys: their parents are sections
    return out


def check_space(raw: dict, cfg: Config, num_layers: int) -> None:
    """Every candidate value of every key gives a valid config; else a UserError naming the key."""
    from pydantic import ValidationError

    for key, spec in cfg.tune.space.items():
        for value in spec.candidates():
            try:
                trial = Config.model_validate(with_params(raw, {key: value}))
            except ValidationError as e:
                detail = format_validation_error(e, "").split("\n", 1)[-1].strip()
                raise UserError(f"tune.space.{key}: the value {value!r} gives an invalid config: {detail}") from None
            problem = freeze_depth_problem(trial.freeze_layers, trial.method, num_layers)
            if problem:
                hint = " (randint's high end is exclusive)" if spec.kind == "randint" else ""
                raise UserError(f"tune.space.{key}: the value {value!r} gives an invalid config: {problem}{hint}")


def ray_domains(space: dict[str, SpaceSpec]) -> dict[str, Any]:
    from ray import tune

    make = {
        "choice": lambda v: tune.choice(v),
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
        "randint": lambda v: tune.randint(*v),
    }
    return {key: make[spec.kind](getattr(spec, spec.kind)) for key, spec in space.items()}

