"""The YAML contract: pydantic models, loading with `--set` overrides, readable errors.

Everything a run does is decided here, at the edge; the rest of ftdist receives a
validated `Config` object and never reads files or the environment for settings.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from ftdist.errors import UserError

# $VAR and ${VAR} in a path: expanded from the environment at validation (here, at the edge; the
# rest of ftdist sees the expanded path), and a variable that is not set is an error naming it,
# never a directory literally named "$VAR".
_ENV_VAR = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


def expand_env(value: str) -> str:
    """`value` with each $VAR / ${VAR} replaced by the environment's value (one pass: a value
    that itself holds a $ is not expanded again); ValueError naming a variable that is not set."""
    if not isinstance(value, str) or "$" not in value:
        return value

    def one(match: re.Match) -> str:
        name = match["braced"] or match["bare"]
        if name not in os.environ:
            raise ValueError(f"${name} is not set in the environment (paths expand $VAR and ${{VAR}}); set "
                             f"{name}, or write the path out")
        return os.environ[name]

    return _ENV_VAR.sub(one, value)


# A path or URL: environment variables expanded (see expand_env).
PathStr = Annotated[str, AfterValidator(expand_env)]


class Section(BaseModel):
    # A typo in a key is an error, never silently ignored; so is a number YAML reads as .inf or
    # .nan, which no setting can use (a mixture weight of inf draws nothing from the others).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# A run's name and a search's name are directory names: a file system takes 255 bytes at most,
# and trackers and Ray name their runs by them too.
NAME_MAX = 128
SEED_MAX = 2**32 - 1  # train.seed seeds numpy, which takes 0 to 2^32-1


class RunConfig(Section):
    name: str = Field(min_length=1, max_length=NAME_MAX, pattern=r"^[A-Za-z0-9._-]+$")
    output: PathStr = "runs"


class ModelInit(Section):
    """Random weights from a config: the demo and tests build tiny models this way."""

    arch: Literal["llama", "qwen2", "mistral"] = "llama"
    hidden_size: int = Field(64, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: Optional[int] = Field(None, gt=0)
    intermediate_size: Optional[int] = Field(None, gt=0)
    vocab_size: int = Field(512, ge=64)
    max_position_embeddings: int = Field(2048, gt=0)
    tie_word_embeddings: bool = False

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelInit":
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {kv}")
        return self


class ModelConfig(Section):
    name_or_path: Optional[PathStr] = None
    init: Optional[ModelInit] = None
    tokenizer: Optional[PathStr] = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # How packed rows keep their examples apart: flex, a block mask that skips masked blocks
    # (GPU: it has no backward on CPU); sdpa, a dense [batch, 1, seq, seq] mask; eager, the
    # same mask in plain matmuls. auto: flex on a GPU where the model supports it, else sdpa.
    attention: Literal["auto", "sdpa", "flex", "eager"] = "auto"
    # Whether a model or tokenizer may run code it ships (config.json / tokenizer_config.json
    # with an `auto_map`, or a model_type transformers does not know). Off: such a model is
    # refused with one message naming this setting; on: transformers imports and runs that code.
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if (self.name_or_path is None) == (self.init is None):
            raise ValueError(
                "set exactly one of model.name_or_path (a model directory or hub id) "
                "and model.init (random weights from a config)"
            )
        return self


class LoraConfig(Section):
    rank: int = Field(8, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, modules):
        if isinstance(modules, list) and not [m for m in modules if m.strip()]:
            raise ValueError("an empty list adapts no module: name the modules (e.g. [q_proj, v_proj]), or use "
                             "all-linear (every linear layer but the output head)")
        return modules


class QloraConfig(Section):
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True


FORMAT = Literal["auto", "text", "prompt_completion", "chat", "alpaca", "sharegpt", "preference", "classification"]


class SourceConfig(Section):
    """One source of a list (data.train, data.eval, data.retention): its own format and
    mapping; in data.train its weight, the share of the training rows drawn from it (weights
    are relative); its name in per-source metrics (eval_loss/<name>)."""

    path: PathStr
    name: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9._-]+$")  # unset: the file's or directory's name
    format: Optional[FORMAT] = None  # unset: data.format (data.retention: text)
    weight: Optional[float] = Field(None, gt=0)
    columns: Optional[dict[str, str]] = None  # unset: data.columns
    roles: Optional[dict[str, list[str]]] = None  # unset: data.roles


SOURCES = Union[PathStr, list[SourceConfig]]  # one path, or a list of sources
SPLITS = ("train", "eval", "retention", "replay")
TEXT_SPLITS = ("retention", "replay")  # general text: format text, or plain text files


class DataConfig(Section):
    # One source (a path, see README: Data sources), or a mixture: a list of sources.
    train: SOURCES
    # Unset: data.eval_fraction of each training source's rows. A list: each source evaluated
    # on its own (eval_loss/<name>) and all together (eval_loss).
    eval: Optional[SOURCES] = None
    eval_fraction: float = Field(0.05, ge=0, lt=1)
    # General text whose loss before and after tells the forgetting; a list, per source too.
    retention: Optional[SOURCES] = None
    # General text mixed into the training batches: set as regularization.replay.data.
    replay: Optional[SOURCES] = None
    # auto tells the formats apart by a row's keys (ftdist.records).
    format: FORMAT = "auto"
    # Keys renamed, ftdist's name: the file's (e.g. {messages: dialog, role: speaker, content: text}).
    columns: dict[str, str] = Field(default_factory=dict)
    # More role names, ftdist's role: [the file's] (e.g. {assistant: [bot]}).
    roles: dict[str, list[str]] = Field(default_factory=dict)
    # Unset: the tokenizer's own; chatml or llama3; or a Jinja file's path.
    chat_template: Optional[PathStr] = None
    max_length: int = Field(512, gt=1)
    packing: bool = True
    skip_bad_rows: bool = False

    @model_validator(mode="after")
    def _known_names(self):
        from ftdist.records import FIELDS, ROLES

        listed = [(f"data.{split}.{i}", s) for split in SPLITS if isinstance(getattr(self, split), list)
                  for i, s in enumerate(getattr(self, split))]
        mappings = [("data", self.columns, self.roles)] + [(key, s.columns or {}, s.roles or {}) for key, s in listed]
        for where, columns, roles in mappings:
            for section, names, known in (("columns", columns, FIELDS), ("roles", roles, ROLES)):
                for name in names:
                    if name not in known:
                        raise ValueError(f"{where}.{section}: unknown key {name!r}; the keys are ftdist's names "
                                         f"({', '.join(known)}), each mapped to the file's")
        for split in SPLITS:
            if getattr(self, split) == []:
                raise ValueError(f"data.{split}: an empty list; give a path, or a list of sources ({{path, ...}})")
        for key, s in listed:
            if s.weight is not None and not key.startswith("data.train."):
                raise ValueError(f"{key}.weight: weights mix training rows; each source of data.eval and "
                                 "data.retention is evaluated on its own and, by tokens, together (replay text "
                                 "is drawn evenly): drop the weight")
        for split in SPLITS:
            given = [s.name for s in getattr(self, split) or [] if isinstance(s, SourceConfig) and s.name]
            twice = sorted({n for n in given if given.count(n) > 1})
            if twice:
                raise ValueError(f"data.{split}: the name {twice[0]} is given to two sources; give each its own")
        if isinstance(self.train, list):
            weighted = [s.weight is not None for s in self.train]
            if any(weighted) and not all(weighted):
                missing = ", ".join(f"data.train.{i}" for i, w in enumerate(weighted) if not w)
                raise ValueError(f"{missing}: no weight, where other sources have one; give every source a "
                                 "weight, or none (each source's rows then count as they are)")
        return self

    @property
    def sources(self) -> list[SourceConfig]:
        """data.train as sources, each with its own format and mapping filled in from data.*."""
        return self.split_sources("train")

    def split_sources(self, split: str) -> list[SourceConfig]:
        """data.<split> as sources (none where unset), each with its name, format and mapping
        filled in from data.*."""
        given = getattr(self, split)
        if given is None:
            return []
        given = [SourceConfig(path=given)] if isinstance(given, str) else given
        default_format = "text" if split in TEXT_SPLITS else self.format
        names = unique_names([s.name or source_name(s.path) for s in given])
        return [SourceConfig(path=s.path, name=name, format=s.format or default_format, weight=s.weight,
                             columns=self.columns if s.columns is None else s.columns,
                             roles=self.roles if s.roles is None else s.roles) for s, name in zip(given, names)]

    def source_names(self, split: str) -> list[str]:
        """The names of data.<split>'s sources, one for each source."""
        return [s.name for s in self.split_sources(split)]

    def eval_names(self) -> list[str]:
        """The names eval_loss is told per source by: data.eval's sources when it is a list;
        a training mixture's sources when the eval rows are held out of them; else none."""
        if isinstance(self.eval, list):
            return self.source_names("eval")
        if self.eval is None and isinstance(self.train, list) and self.eval_fraction > 0:
            return self.source_names("train")
        return []

    def retention_names(self) -> list[str]:
        return self.source_names("retention") if isinstance(self.retention, list) else []

    @property
    def weights(self) -> Optional[list[float]]:
        """The mixture's weights, normalized; None where rows count as they are."""
        w = [s.weight for s in self.sources]
        return None if w[0] is None else [x / sum(w) for x in w]


class ClassificationConfig(Section):
    """task: classification. `labels` unset: read from the training rows (numbers in numeric
    order, else sorted); given, a row with another label is a bad row."""

    labels: Optional[list[Union[int, str]]] = Field(None, min_length=2)
    pooling: Literal["last", "mean"] = "last"  # the example's last token's hidden state, or their mean

    @field_validator("labels", mode="before")
    @classmethod
    def _no_booleans(cls, labels):
        if isinstance(labels, list) and any(isinstance(x, bool) for x in labels):
            raise ValueError("YAML reads yes, no, true and false as booleans, not labels; quote them "
                             '(labels: ["yes", "no"])')
        return labels

    @model_validator(mode="after")
    def _distinct(self) -> "ClassificationConfig":
        if self.labels is not None and len({str(x) for x in self.labels}) != len(self.labels):
            raise ValueError("labels: a label is given twice; list each once")
        return self


class ReplayConfig(Section):
    """General text (plain text or text rows, as data.retention takes) mixed into every training
    batch: `fraction` of the batch's rows, on top of its task rows."""

    data: SOURCES
    fraction: float = Field(0.1, gt=0, lt=1)


class EwcConfig(Section):
    """Elastic weight consolidation: the diagonal Fisher of the retention loss, estimated on
    `samples` rows of data.retention before training, weighs each weight's pull to its anchor."""

    weight: float = Field(gt=0)
    samples: int = Field(64, gt=0)


class DpoConfig(Section):
    """objective: dpo. Preference pairs train the policy to rank each chosen response above its
    rejected one, relative to a reference model (ftdist.preference)."""

    beta: float = Field(0.1, gt=0)  # how far from the reference the policy may move: smaller, farther
    loss: Literal["sigmoid", "ipo"] = "sigmoid"  # sigmoid: DPO's; ipo: IPO's squared loss on mean log-probs
    # auto: the adapters switched off (lora, qlora); a frozen copy of the starting model (full),
    # partitioned like the policy under ZeRO-3.
    reference: Literal["auto"] = "auto"
    # true: one pass over the pairs before training computes the reference's log-probs, so no
    # second model is held while training.
    precompute_reference: bool = False


class RegularizationConfig(Section):
    """What counters forgetting besides freezing and a low learning rate (ftdist.regularize)."""

    replay: Optional[ReplayConfig] = None
    l2sp: float = Field(0.0, ge=0)  # the pull of each trained weight to its value before training
    ewc: Optional[EwcConfig] = None

    @property
    def anchored(self) -> bool:
        """Whether trained weights are pulled to their values before training (L2-SP, EWC)."""
        return self.l2sp > 0 or self.ewc is not None


class TrainConfig(Section):
    lr: float = Field(2.0e-4, gt=0)
    epochs: int = Field(1, gt=0)
    max_steps: Optional[int] = Field(None, gt=0)
    batch_size: int = Field(16, gt=0)
    micro_batch_size: int = Field(4, gt=0)
    warmup_steps: int = Field(10, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # cosine ends at lr * min_lr_ratio
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: Optional[float] = Field(1.0, gt=0)
    seed: int = 0  # 0 to SEED_MAX: numpy's seeds (the data order, the eval split)
    eval_every: int = Field(50, gt=0)
    log_every: int = Field(10, gt=0)
    # Activations of checkpointed blocks are recomputed in the backward pass instead of kept:
    # true, every block; k, every k-th block (the middle ground); false, none.
    gradient_checkpointing: Union[bool, PositiveInt] = False
    # Cross-entropy through the LM head over chunks of target tokens: the [tokens x vocab]
    # logits are never held whole, in the forward or the backward.
    chunked_loss: bool = True
    # torch.compile of every decoder block and of the loss; where it cannot compile, one
    # warning and the run goes on uncompiled.
    compile: bool = False

    @property
    def checkpoint_every(self) -> int:
        """Every k-th block checkpointed (1: all of them); 0: none."""
        g = self.gradient_checkpointing
        return 0 if g is False else 1 if g is True else g

    @field_validator("seed")
    @classmethod
    def _seed_in_range(cls, seed: int) -> int:
        if not 0 <= seed <= SEED_MAX:
            raise ValueError(f"must be from 0 to {SEED_MAX} (2^32-1), the seeds numpy takes")
        return seed

    @model_validator(mode="after")
    def _micro_divides(self) -> "TrainConfig":
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"micro_batch_size {self.micro_batch_size} does not divide batch_size "
                f"{self.batch_size}; pick a micro_batch_size that is a divisor "
                f"(e.g. {_largest_divisor_at_most(self.batch_size, self.micro_batch_size)})"
            )
        return self


class CheckpointConfig(Section):
    every_steps: int = Field(100, gt=0)
    keep: int = Field(3, gt=0)


class DistributedConfig(Section):
    """Ray Train workers and the engine that steps them. workers: 0 is local mode (one process,
    no Ray). engine (ftdist/engines): auto is plain in local mode and deepspeed on Ray workers;
    plain also runs data-parallel on Ray workers (every state whole on each), deepspeed also in
    local mode (a world of one process). zero_stage, offload_* and the raw deepspeed keys are
    the deepspeed engine's."""

    workers: int = Field(2, ge=0)
    engine: str = "auto"  # auto, or a name of ftdist.engines' registry
    use_gpu: Union[Literal["auto"], bool] = "auto"  # auto: GPUs when the cluster has them
    resources_per_worker: dict[str, float] = Field(default_factory=dict)  # e.g. {CPU: 8, GPU: 1}
    placement: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_params: Literal["none", "cpu"] = "none"
    deepspeed: dict[str, Any] = Field(default_factory=dict)  # raw DeepSpeed keys, merged last
    max_failures: int = Field(2, ge=0)  # worker-group restarts from the last checkpoint

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, value: str) -> str:
        from ftdist.engines import CHOICES

        if value not in CHOICES:
            raise ValueError(f"distributed.engine {value!r} is not one of {', '.join(CHOICES)}")
        return value

    @model_validator(mode="after")
    def _offload_params_needs_stage_3(self) -> "DistributedConfig":
        if self.offload_params != "none" and self.zero_stage != 3:
            raise ValueError(f"offload_params needs zero_stage 3 (got zero_stage {self.zero_stage}); "
                             "set zero_stage: 3, or offload_optimizer: cpu alone for stages 1-2")
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3 (stage 0 keeps the optimizer on "
                             "each device)")
        if self.engine == "plain":
            used = [f"{key}: {value}" for key, value in (("offload_optimizer", self.offload_optimizer),
                                                         ("offload_params", self.offload_params)) if value != "none"]
            used += ["deepspeed (raw keys)"] if self.deepspeed else []
            if used:
                raise ValueError(f"distributed.engine plain keeps every state whole on each device: "
                                 f"{', '.join(used)} would do nothing; remove {'them' if len(used) > 1 else 'it'}, "
                                 "or set distributed.engine: deepspeed (or auto on Ray workers)")
        return self


class StorageConfig(Section):
    """Object storage for s3:// paths (run.output, model.name_or_path, data.*). Credentials come
    from the standard AWS environment variables or profile, never from this file."""

    endpoint_url: Optional[str] = None  # S3-compatible stores (MinIO, Ceph, moto); None: AWS
    region: Optional[str] = None
    anon: bool = False  # unsigned requests, for public buckets
    retry_deadline_s: float = Field(300.0, gt=0)  # how long calls to the store retry before the run stops
    cache_dir: PathStr = "~/.cache/ftdist"  # local working copies of s3:// runs, models and data
    # A shared copy of the prepared-data cache that a fresh node reads instead of tokenizing again.
    # None: <run.output>/.prepared for runs on s3://, else s3://BUCKET/.ftdist-prepared for s3:// data.
    prepared_url: Optional[PathStr] = None

    @model_validator(mode="after")
    def _no_credentials_in_the_url(self) -> "StorageConfig":
        from urllib.parse import urlparse

        if self.endpoint_url and urlparse(self.endpoint_url).password is not None:
            raise ValueError("storage.endpoint_url: credentials in the URL (user:password@) are not how S3 requests "
                             "are signed; give them as AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) "
                             "and drop them from the URL")
        return self


class MlflowConfig(Section):
    """An MLflow tracking server (or a file:/sqlite: store). Credentials come from MLflow's own
    variables (MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN), never from this file."""

    tracking_uri: PathStr = Field(min_length=1)
    experiment: str = Field("ftdist", min_length=1)
    run_name: Optional[str] = None  # None: run.name (a trial: its trial name, under the search's run)
    optional: bool = False  # true: a server that cannot be reached at the start is a warning, not an error


class WandbConfig(Section):
    """Weights & Biases. Online mode needs WANDB_API_KEY (or `wandb login`); offline mode writes
    <run>/wandb, for `wandb sync` later."""

    project: str = Field(min_length=1)
    entity: Optional[str] = None
    mode: Literal["online", "offline"] = "online"
    optional: bool = False


class LoggingConfig(Section):
    """Where runs report besides metrics.jsonl, from rank 0 in the background: a tracker that
    goes away costs a warning, never a step."""

    tensorboard: Union[bool, PathStr] = False  # true: <run>/tensorboard (in the bucket too for s3:// runs); or a path
    mlflow: Optional[MlflowConfig] = None
    wandb: Optional[WandbConfig] = None


class SpaceSpec(Section):
    """One searched key: exactly one of a list of choices or a range [low, high]
    (randint: integers low..high-1, as Ray Tune's; loguniform: sampled evenly in log space)."""

    choice: Optional[list[Any]] = None
    uniform: Optional[tuple[float, float]] = None
    loguniform: Optional[tuple[float, float]] = None
    randint: Optional[tuple[int, int]] = None

    @model_validator(mode="after")
    def _one_valid_domain(self) -> "SpaceSpec":
        given = [k for k in SPACE_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(SPACE_KINDS)} (got {', '.join(given) or 'none'}), "
                             "e.g. {choice: [8, 16]} or {loguniform: [1.0e-5, 1.0e-3]}")
        if self.choice is not None and not self.choice:
            raise ValueError("choice is empty: list at least one value")
        for kind in ("uniform", "loguniform", "randint"):
            bounds = getattr(self, kind)
            if bounds is not None:
                low, high = bounds
                if not low < high:
                    raise ValueError(f"{kind} [{low}, {high}]: low must be less than high")
                if kind == "loguniform" and low <= 0:
                    raise ValueError(f"loguniform [{low}, {high}]: both bounds must be positive")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in SPACE_KINDS if getattr(self, k) is not None)

    def candidates(self) -> list[Any]:
        """The values that bound what a trial can get: every choice, or a range's two ends."""
        if self.choice is not None:
            return list(self.choice)
        if self.randint is not None:
            return [self.randint[0], self.randint[1] - 1]
        return list(getattr(self, self.kind))


HIGHER_IS_BETTER = ("eval_accuracy", "eval_macro_f1", "eval_reward_accuracy", "eval_reward_margin")
SPACE_KINDS = ("choice", "uniform", "loguniform", "randint")
# What a search may vary: how the model is fine-tuned. Data, base model, storage and the run's
# name are the experiment's, the same for every trial (they share one base and one dataset).
TUNABLE_PREFIXES = ("method", "freeze_layers", "lora.", "qlora.", "train.", "checkpoint.", "regularization.",
                    "dpo.")
FIXED_IN_SEARCH = {"train.seed": "every trial starts from the same base model and data order",
                   "regularization.replay.data": "the replay text is part of the experiment's data"}
# A mixture's weights are searchable too: they choose which of the shared rows a trial draws.
MIXTURE_WEIGHT = re.compile(r"^data\.train\.(\d+)\.weight$")


class SchedulerConfig(Section):
    """asha: stop trials whose metric lags the others' at steps grace_period, x reduction_factor, ...;
    max_t is the longest a trial may run, in steps. none: every trial runs to the end."""

    type: Literal["asha", "none"] = "asha"
    grace_period: int = Field(20, gt=0)
    reduction_factor: float = Field(3, gt=1)
    max_t: int = Field(200, gt=0)

    @model_validator(mode="after")
    def _grace_within_budget(self) -> "SchedulerConfig":
        if self.type == "asha" and self.grace_period > self.max_t:
            raise ValueError(f"grace_period {self.grace_period} is more than max_t {self.max_t}")
        return self


class TuneConfig(Section):
    """`ftdist tune`: a Ray Tune search over config keys; each trial is one Ray Train run."""

    # outputs in <run.output>/<name>/
    name: str = Field(min_length=1, max_length=NAME_MAX, pattern=r"^[A-Za-z0-9._-]+$")
    num_samples: int = Field(8, gt=0)
    metric: Literal["eval_loss", "eval_loss_plus_forgetting", "eval_accuracy", "eval_macro_f1",
                    "eval_reward_accuracy", "eval_reward_margin"] = "eval_loss"
    forgetting_weight: float = Field(0.0, ge=0)  # eval_loss_plus_forgetting = eval_loss + weight * forgetting
    mode: Literal["min", "max"] = "min"
    search: Literal["random", "optuna"] = "random"
    scheduler: SchedulerConfig = SchedulerConfig()
    max_concurrent_trials: int = Field(2, gt=0)
    space: dict[str, SpaceSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _known_tunable_keys(self) -> "TuneConfig":
        leaves = set(all_keys(leaves_only=True))
        for key in self.space:
            if MIXTURE_WEIGHT.match(key):  # checked against data.train by Config
                continue
            if key not in leaves:
                hint = difflib.get_close_matches(key, sorted(leaves), n=1, cutoff=0.6)
                what = "a section, not a key" if key in set(all_keys()) else "not a config key"
                raise ValueError(f"space key {key!r} is {what}" + (f"; did you mean {hint[0]}?" if hint else ""))
            if not key.startswith(TUNABLE_PREFIXES) or key in FIXED_IN_SEARCH:
                why = FIXED_IN_SEARCH.get(key, "data, model, storage, run and distributed keys are the "
                                               "experiment's, the same for every trial")
                raise ValueError(f"space key {key!r} cannot be searched: {why}; search method, freeze_layers, "
                                 "lora.*, qlora.*, train.*, checkpoint.*, regularization.* or dpo.* keys")
        return self


class Config(Section):
    run: RunConfig
    model: ModelConfig
    # causal_lm: next-token loss on the rows' targets; classification: a new head over labels.
    task: Literal["causal_lm", "classification"] = "causal_lm"
    classification: ClassificationConfig = ClassificationConfig()
    # sft: supervised, the loss on the target tokens; dpo: preference pairs (prompt, chosen, rejected).
    objective: Literal["sft", "dpo"] = "sft"
    dpo: DpoConfig = DpoConfig()
    method: Literal["full", "lora", "qlora"] = "lora"
    freeze_layers: Union[int, Literal["all"]] = 0
    lora: LoraConfig = LoraConfig()
    qlora: QloraConfig = QloraConfig()
    data: DataConfig
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    distributed: DistributedConfig = DistributedConfig()
    storage: StorageConfig = StorageConfig()
    logging: LoggingConfig = LoggingConfig()
    regularization: RegularizationConfig = RegularizationConfig()
    tune: Optional[TuneConfig] = None  # read by `ftdist tune` only

    @property
    def row_length(self) -> int:
        """The most tokens a row holds: data.max_length, or twice it for dpo, whose rows hold a
        pair (its chosen and rejected sequences, each up to max_length)."""
        return self.data.max_length * (2 if self.objective == "dpo" else 1)

    @model_validator(mode="before")
    @classmethod
    def _replay_text_is_data(cls, raw: Any) -> Any:
        """regularization.replay.data is the replay text's one key; the data path reads it as
        data.replay, a split like the others (checked, prepared, shipped to workers)."""
        if not isinstance(raw, dict):
            return raw
        replay = (raw.get("regularization") or {}).get("replay")
        data = raw.get("data")
        given = data.get("replay") if isinstance(data, dict) else None
        wanted = replay.get("data") if isinstance(replay, dict) else None
        if given is not None and given != wanted:
            raise ValueError("data.replay: set the replay text as regularization.replay.data (with its fraction)")
        if wanted is not None and isinstance(data, dict):
            raw = {**raw, "data": {**data, "replay": wanted}}
        return raw

    @model_validator(mode="after")
    def _combinations(self) -> "Config":
        if self.method == "qlora" and self.distributed.workers > 0 and self.distributed.zero_stage == 3 and \
                self.distributed.engine != "plain":
            raise ValueError(
                "method qlora with distributed.zero_stage 3 is not supported: use zero_stage 2 (the 4-bit base "
                "is small and frozen, so ZeRO-2 shards what grows: the adapters' gradients and optimizer "
                "states), or method lora with zero_stage 3"
            )
        if isinstance(self.freeze_layers, int):
            if self.freeze_layers < 0:
                raise ValueError("freeze_layers must be 0 or more, or 'all'")
            problem = self.model.init and freeze_depth_problem(self.freeze_layers, self.method,
                                                                self.model.init.num_layers)
            if problem:
                raise ValueError(problem)
        elif self.method != "full":
            raise ValueError(
                "freeze_layers 'all' leaves no block for adapters; use method: full with "
                "freeze_layers: all for feature extraction (only the final norm and head "
                "train), or a number of blocks for lora/qlora"
            )
        formats = {self.data.format} | {s.format for s in self.data.sources if s.format}
        if self.task == "classification" and not formats <= {"auto", "classification"}:
            raise ValueError(f"task classification trains on {{text, label}} rows: set data.format to classification "
                             f"(or auto), not {', '.join(sorted(formats - {'auto', 'classification'}))}")
        if self.task == "causal_lm" and "classification" in formats:
            raise ValueError("data.format classification rows ({text, label}) need task: classification")
        if self.objective == "dpo":
            if self.task == "classification":
                raise ValueError("objective dpo trains a causal LM on preference pairs: use task: causal_lm (a "
                                 "classifier trains with objective: sft)")
            if not formats <= {"auto", "preference"}:
                raise ValueError(f"objective dpo trains on preference rows ({{prompt, chosen, rejected}}): set "
                                 f"data.format to preference (or auto), not "
                                 f"{', '.join(sorted(formats - {'auto', 'preference'}))}")
        elif "preference" in formats:
            raise ValueError("data.format preference rows ({prompt, chosen, rejected}) train with objective: dpo")
        r = self.regularization
        if r.ewc is not None and self.data.retention is None:
            raise ValueError("regularization.ewc estimates its Fisher on data.retention: set data.retention "
                             "(general text, held out), or use regularization.l2sp, which needs none")
        if r.replay is not None and self.task == "classification":
            raise ValueError("regularization.replay mixes text into the batches, which a classifier's head does "
                             "not train on: use regularization.l2sp or regularization.ewc with task classification")
        if r.replay is not None and self.objective == "dpo":
            raise ValueError("regularization.replay mixes text into the batches, which objective dpo does not "
                             "train on (its batches are pairs): use regularization.l2sp or regularization.ewc")
        if self.tune is not None:
            higher_is_better = self.tune.metric in HIGHER_IS_BETTER
            if self.tune.metric in ("eval_accuracy", "eval_macro_f1") and self.task != "classification":
                raise ValueError(f"tune.metric {self.tune.metric} is a classification metric: set task: "
                                 "classification, or use eval_loss")
            if self.tune.metric.startswith("eval_reward") and self.objective != "dpo":
                raise ValueError(f"tune.metric {self.tune.metric} is a preference-tuning metric: set objective: dpo, "
                                 "or use eval_loss")
            if (self.tune.mode == "max") != higher_is_better:
                raise ValueError(f"tune.mode {self.tune.mode} with tune.metric {self.tune.metric}: "
                                 f"{'higher' if higher_is_better else 'lower'} is better, so set tune.mode: "
                                 f"{'max' if higher_is_better else 'min'}")
            if self.data.eval is None and self.data.eval_fraction == 0:
                raise ValueError("tune compares trials by their eval loss: set data.eval, or data.eval_fraction "
                                 "above 0")
            if self.tune.metric == "eval_loss_plus_forgetting" and self.data.retention is None:
                raise ValueError("tune.metric eval_loss_plus_forgetting measures forgetting on data.retention: set "
                                 "data.retention (held-out general text), or use tune.metric eval_loss")
            for key in self.tune.space:
                match = MIXTURE_WEIGHT.match(key)
                if match and (self.data.weights is None or int(match.group(1)) >= len(self.data.sources)):
                    raise ValueError(f"tune.space: {key} names no weighted source; data.train has "
                                     f"{len(self.data.sources)} source(s)"
                                     + ("" if self.data.weights else ", without weights (give each a weight)"))
        return self


def source_name(path: str) -> str:
    """A source's default name: its file's name less the data suffixes, or its directory's
    (a hub id's dataset name; a glob's directory)."""
    if path.startswith("hf:"):  # hf:org/name:split
        path = path[3:].split(":")[0]
    last = re.split(r"[/:]", path.rstrip("/").split("*")[0].rstrip("/"))
    name = next((part for part in reversed(last) if part), "data")
    for suffix in (".gz", ".jsonl", ".json", ".parquet", ".csv", ".txt", ".arrow"):
        name = name.removesuffix(suffix)
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "data"


def unique_names(names: list[str]) -> list[str]:
    """Names made unique by their place where they repeat (a-0, a-1)."""
    return [f"{n}-{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def frozen_blocks(freeze_layers: Union[int, str], num_layers: int) -> int:
    """How many of the lowest blocks `freeze_layers` freezes in a model of `num_layers`."""
    return num_layers if freeze_layers == "all" else int(freeze_layers)


def freeze_depth_problem(freeze_layers: Union[int, str], method: str, num_layers: int) -> Optional[str]:
    """What is wrong with this freeze depth for a model of `num_layers` blocks, or None.
    The one home of the rule: config validation, preflight, the tune space and model building."""
    n = frozen_blocks(freeze_layers, num_layers)
    if n > num_layers:
        return (f"freeze_layers {n} is more than the model's {num_layers} layers; use at most {num_layers}, "
                "or 'all' for feature extraction")
    if method != "full" and n >= num_layers:
        return (f"freeze_layers {n} leaves no block for {method} adapters (the model has {num_layers}); lower "
                "freeze_layers, or use method: full for feature extraction")
    return None


# ---------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read YAML, apply `dotted.key=value` overrides, validate. Errors are UserErrors."""
    return validate_config(load_raw(path, overrides), source=str(path), overridden=override_keys(overrides))


# A config is a page of settings: bounds far above any real one, so that a hostile or careless
# file (a YAML alias bomb: a few hundred bytes that expand to millions of nodes) is refused in
# milliseconds instead of hanging validation, and no message ever echoes more than a line of it.
MAX_CONFIG_BYTES = 1 << 20  # 1 MiB of YAML
MAX_CONFIG_NODES = 100_000  # values once every alias is expanded
MAX_ECHO_CHARS = 200  # of a user's value quoted in a message
MAX_ERRORS_TOLD = 20  # problems of one config listed in its message


def echo(value: Any, limit: int = MAX_ECHO_CHARS) -> str:
    """repr(value) for a message, cut to `limit` characters (a user's value can be any size)
    and with credentials in URLs redacted."""
    return redact_url(_bounded_repr(value, limit))


def _bounded_repr(value: Any, limit: int) -> str:
    if isinstance(value, (list, tuple, dict)) and len(value) > limit:  # no repr of a huge container
        return f"<a {type(value).__name__} of {len(value)} items>"
    if isinstance(value, str) and len(value) > min(limit, 80):  # cut, with the length it had
        return f"{value[:50]!r}... ({len(value)} characters)"
    try:
        text = repr(value)
    except RecursionError:  # a structure that contains itself
        return f"<a {type(value).__name__} that contains itself>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def all_keys(model: Optional[type[BaseModel]] = None, prefix: str = "", leaves_only: bool = False) -> list[str]:
    """Every dotted key of the contract (sections too, unless leaves_only), for suggestions."""
    keys = []
    for name, field in (model or Config).model_fields.items():
        dotted = f"{prefix}{name}"
        sub = _section_type(field.annotation)
        if sub is None or not leaves_only:
            keys.append(dotted)
        if sub is not None and sub is not SpaceSpec:
            keys.extend(all_keys(sub, dotted + ".", leaves_only))
    return keys


def _section_type(annotation: Any) -> Optional[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


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


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


# ---------------------------------------------------------------- snapshots

SECRET_WORDS = ("secret", "password", "access_key", "credential", "api_key")


def is_secret_key(key: Any) -> bool:
    key = str(key).lower()
    return any(w in key for w in SECRET_WORDS) or key == "token" or key.endswith("_token")


# Every URL a user gives may carry a credential: in its userinfo (user:password@) or in any query
# value (?token=..., &apikey=..., &sig=...: no list of key names can know them all). Each is
# replaced wherever a URL is shown, logged, snapshotted or sent to a tracker; the host, path and
# the query's keys stay, so the message still says where.
_URL = re.compile(r"""[A-Za-z][A-Za-z0-9+.-]*://[^\s'"<>`]+"""  # scheme://...
                  r"""|(?<![\w.~-])/[^\s'"<>`?]*\?[^\s'"<>`]*=[^\s'"<>`]*""")  # /path?key=value (a client's "url:")
_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/?#@\s]*@")
_QUERY_VALUE = re.compile(r"(?P<key>(?:^|&|;)[^=&;#]*)=(?P<value>[^&;#]*)")
REDACTED = "***"


def redact_url(text: str) -> str:
    """`text` with the credentials every URL in it can carry replaced: its userinfo
    (http://user:pass@host -> http://***@host) and every query value (?apikey=k&x=1 ->
    ?apikey=***&x=***), whatever the keys are named."""
    if not isinstance(text, str) or ("://" not in text and "?" not in text):
        return text
    return _URL.sub(lambda m: _redact_one(m.group(0)), text)


def _redact_one(url: str) -> str:
    trail = len(url) - len(url.rstrip(".,;:)]}!"))  # the sentence's punctuation, not the URL's
    if trail:
        return _redact_one(url[:-trail]) + url[-trail:]
    url = _USERINFO.sub(rf"\g<scheme>{REDACTED}@", url)
    head, sep, rest = url.partition("?")
    if not sep:
        return url
    query, hash_, fragment = rest.partition("#")
    if "=" not in query:  # a glob's ? (s3://bucket/part-?.jsonl), not a query
        return url
    query = _QUERY_VALUE.sub(lambda m: f"{m['key']}={REDACTED}" if m["value"] else m.group(0), query)
    return f"{head}?{query}{hash_}{fragment}"


def redacted(data: Any) -> Any:
    """A copy with values of secret-looking keys, and credentials inside URLs, replaced: for
    snapshots, logs and trackers."""
    if isinstance(data, dict):
        return {
            k: ("***" if v is not None and is_secret_key(k) else redacted(v))
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [redacted(v) for v in data]
    if isinstance(data, str):
        return redact_url(data)
    return data


def config_yaml(cfg: Config) -> str:
    return yaml.safe_dump(redacted(cfg.model_dump(mode="json")), sort_keys=False)
