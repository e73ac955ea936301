"""The YAML contract: each section a pydantic model, `Config` the sections together with the
rules across them. docs/configuration.md is generated from these classes (their fields, types,
defaults and comments).

Everything a run does is decided at the edge (ftdist.config.load validates a file into a
`Config`); the rest of ftdist receives that object and never reads files or the environment
for settings.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

from ftdist.config.echo import echo
from ftdist.engines.registry import CHOICES
from ftdist.objectives.registry import (
    config_problem,
    default_tune_metric,
    default_tune_mode,
    load,
    name_of,
    objective_class,
    parse_args,
    tune_metric_problem,
)
from ftdist.objectives.rewards import spec_problem

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


# The data formats' vocabulary, which data.columns and data.roles map onto (ftdist.data.records reads rows
# by it): the chat roles, and every key data.columns may rename (each format's top-level keys, then a turn's).
ROLES = ("system", "user", "assistant", "tool")
FIELDS = ("text", "prompt", "completion", "messages", "conversations", "instruction", "input", "output", "system",
          "chosen", "rejected", "label", "role", "content", "from", "value")


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


GGUF_SUFFIX = ".gguf"


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
    # A model directory, a hub id, an s3:// directory, an adapter run's final/, or a GGUF file
    # (llama.cpp, Ollama; local or s3://), dequantized once into the run's base/.
    name_or_path: Optional[PathStr] = None
    init: Optional[ModelInit] = None
    # The GGUF file inside the directory model.name_or_path names (a directory of several).
    gguf_file: Optional[str] = None
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
        if self.gguf_file is not None:
            if self.init is not None:
                raise ValueError("model.gguf_file names a file in the directory model.name_or_path; drop it for "
                                 "model.init")
            if self.name_or_path.lower().endswith(GGUF_SUFFIX):
                raise ValueError(f"model.name_or_path already names a GGUF file ({echo(self.name_or_path)}); drop "
                                 "model.gguf_file, or point model.name_or_path at the directory that holds it")
            if "/" in self.gguf_file or not self.gguf_file.lower().endswith(GGUF_SUFFIX):
                raise ValueError(f"model.gguf_file {echo(self.gguf_file)}: the name of a .gguf file in the "
                                 "directory model.name_or_path (no path)")
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


FORMAT = Literal["auto", "text", "prompt_completion", "chat", "alpaca", "sharegpt", "preference", "classification",
                 "prompt"]


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
    # One source (a path; docs/data.md), or a mixture: a list of sources.
    train: SOURCES
    # Unset: data.eval_fraction of each training source's rows. A list: each source evaluated
    # on its own (eval_loss/<name>) and all together (eval_loss).
    eval: Optional[SOURCES] = None
    eval_fraction: float = Field(0.05, ge=0, lt=1)
    # General text whose loss before and after tells the forgetting; a list, per source too.
    retention: Optional[SOURCES] = None
    # General text mixed into the training batches: set as regularization.replay.data.
    replay: Optional[SOURCES] = None
    # auto tells the formats apart by a row's keys (ftdist.data.records).
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
    rejected one, relative to a reference model (ftdist.objectives.dpo)."""

    beta: float = Field(0.1, gt=0)  # how far from the reference the policy may move: smaller, farther
    loss: Literal["sigmoid", "ipo"] = "sigmoid"  # sigmoid: DPO's; ipo: IPO's squared loss on mean log-probs
    # auto: the adapters switched off (lora, qlora); a frozen copy of the starting model (full),
    # partitioned like the policy under ZeRO-3.
    reference: Literal["auto"] = "auto"
    # true: one pass over the pairs before training computes the reference's log-probs, so no
    # second model is held while training.
    precompute_reference: bool = False


class RewardConfig(Section):
    """One of grpo.rewards: a built-in (exact_match, regex, json, length) or a function of yours
    by import path (module:function), and its weight in the sum (ftdist.objectives.rewards)."""

    function: str = Field(min_length=1)
    weight: float = 1.0
    column: Optional[str] = None  # exact_match, json: the prompt row's column compared with
    pattern: Optional[str] = None  # regex: found in the completion
    target: Optional[int] = Field(None, gt=0)  # length: characters past which each costs 1/target

    @model_validator(mode="after")
    def _resolves(self) -> "RewardConfig":
        problem = spec_problem(self)
        if problem:
            raise ValueError(problem)
        return self


class GrpoConfig(Section):
    """objective: grpo. Each step samples num_generations completions per prompt from the policy,
    scores them with the rewards, and moves the policy toward the completions that scored above
    their group's mean (DeepSeekMath's GRPO; ftdist.objectives.grpo)."""

    rewards: list[RewardConfig] = []
    num_generations: int = Field(8, ge=2)  # completions per prompt: a group, whose mean is the baseline
    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    # Updates per batch of completions (each with the clipped ratio to the policy that sampled them).
    num_iterations: int = Field(1, ge=1)
    beta: float = Field(0.0, ge=0)  # the KL penalty to the reference; 0: no reference held
    # The KL of each token weighted by its ratio to the sampling policy (TRL's use_bias_correction_kl,
    # on by default there); false: DeepSeekMath's plain k3.
    kl_correction: bool = False
    epsilon: float = Field(0.2, gt=0)  # the ratio's clip range, 1 - epsilon ..
    epsilon_high: Optional[float] = Field(None, gt=0)  # .. 1 + epsilon_high (unset: epsilon)
    # How the loss is normalised: token, over the batch's completion tokens (TRL's dapo); sequence,
    # each completion's mean, then their mean (GRPO's paper); dr_grpo, over completions x max_new_tokens.
    loss: Literal["token", "sequence", "dr_grpo"] = "token"
    scale_rewards: bool = True  # advantages divided by their group's standard deviation (false: Dr. GRPO)
    # Evaluation: one greedy completion per held-out prompt; accuracy is the share whose first
    # reward is at least this.
    accuracy_at: float = 1.0
    samples_logged: int = Field(2, ge=0)  # completions written to the log every train.log_every steps


class RegularizationConfig(Section):
    """What counters forgetting besides freezing and a low learning rate (ftdist.training.regularize)."""

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

    def splits_at(self, world_size: int) -> bool:
        """Whether the global batch splits into whole micro-batches on each of `world_size` ranks."""
        return self.batch_size % (self.micro_batch_size * world_size) == 0

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

    # A number: that many workers. [min, max]: an elastic run, which Ray Train starts with as many
    # as the cluster holds in the range, shrinks when nodes are lost or preempted and grows back
    # when they return; the global batch, schedule and data order stay the same at every size.
    workers: Union[int, tuple[int, int]] = 2
    engine: str = "auto"  # auto, or a name of ftdist.engines' registry
    use_gpu: Union[Literal["auto"], bool] = "auto"  # auto: GPUs when the cluster has them
    resources_per_worker: dict[str, float] = Field(default_factory=dict)  # e.g. {CPU: 8, GPU: 1}
    placement: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_params: Literal["none", "cpu"] = "none"
    deepspeed: dict[str, Any] = Field(default_factory=dict)  # raw DeepSpeed keys, merged last
    max_failures: int = Field(2, ge=0)  # worker-group restarts from the last checkpoint
    # Restarts after a node's preemption (with notice or without), counted apart from failures;
    # -1: no limit (spot nodes may be reclaimed many times in a long run).
    max_preemptions: int = Field(-1, ge=-1)
    resize_check_s: float = Field(60.0, gt=0)  # how often an elastic run looks for room to grow

    @field_validator("workers", mode="before")
    @classmethod
    def _workers_or_range(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 0:
                raise ValueError("must be 0 (local mode, no Ray) or more workers, or [min, max] for an elastic run")
            return value
        if isinstance(value, (list, tuple)) and len(value) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            low, high = value
            if low < 1 or low > high:
                raise ValueError(f"an elastic range [min, max] runs from 1 worker or more up to max >= min; "
                                 f"e.g. [1, {max(high, 2)}]")
            return low if low == high else (low, high)  # [n, n] is a fixed size
        raise ValueError("must be a number of workers, or [min, max] for an elastic run")

    @property
    def elastic(self) -> bool:
        return isinstance(self.workers, tuple)

    @property
    def min_workers(self) -> int:
        """The fewest workers the run has (all of them for a fixed size)."""
        return self.workers[0] if self.elastic else self.workers

    @property
    def max_workers(self) -> int:
        return self.workers[1] if self.elastic else self.workers

    @property
    def sizes(self) -> range:
        """Every world size the run may train at."""
        return range(self.min_workers, self.max_workers + 1)

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, value: str) -> str:
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


SPACE_KINDS = ("choice", "uniform", "loguniform", "randint")
# What a search may vary: how the model is fine-tuned. Data, base model, storage and the run's
# name are the experiment's, the same for every trial (they share one base and one dataset).
TUNABLE_PREFIXES = ("method", "freeze_layers", "lora.", "qlora.", "train.", "checkpoint.", "regularization.",
                    "dpo.", "grpo.")
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
    # One of the objective's metrics (ftdist.objectives), or eval_loss_plus_forgetting; unset:
    # the objective's first (eval_loss for the built-ins).
    metric: Optional[str] = None
    forgetting_weight: float = Field(0.0, ge=0)  # eval_loss_plus_forgetting = eval_loss + weight * forgetting
    mode: Optional[Literal["min", "max"]] = None  # unset: which way the metric is better
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
                                 "lora.*, qlora.*, train.*, checkpoint.*, regularization.*, dpo.* or grpo.* keys")
        return self


class Config(Section):
    run: RunConfig
    model: ModelConfig
    # causal_lm: next-token loss on the rows' targets; classification: a new head over labels.
    task: Literal["causal_lm", "classification"] = "causal_lm"
    classification: ClassificationConfig = ClassificationConfig()
    # sft: supervised, the loss on the target tokens; dpo: preference pairs (prompt, chosen, rejected);
    # or a class of your own by import path, module:Class (ftdist.objectives, docs/objectives.md).
    objective: str = "sft"
    # The settings of an objective of your own, as its Args model takes them.
    objective_args: dict[str, Any] = {}
    dpo: DpoConfig = DpoConfig()
    grpo: GrpoConfig = GrpoConfig()
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

    @field_validator("objective")
    @classmethod
    def _an_objective(cls, name: str) -> str:
        """A built-in's name, or an import path whose class meets the protocol (imported here)."""
        load(name)
        return name

    @field_validator("objective_args")
    @classmethod
    def _its_args(cls, args: dict[str, Any], info) -> dict[str, Any]:
        if "objective" not in info.data or "task" not in info.data:  # already told
            return args

        parse_args(load(name_of(info.data["task"], info.data["objective"])), args)
        return args

    @property
    def row_shape(self) -> str:
        """What the data path builds for the run's objective: text, pairs or labels."""
        return objective_class(self).rows

    @property
    def steps_per_batch(self) -> int:
        """Optimizer steps each global batch of rows serves (grpo.num_iterations: one batch of
        completions, several updates)."""
        return self.grpo.num_iterations if self.row_shape == "prompts" else 1

    @property
    def row_length(self) -> int:
        """The most tokens a row holds: data.max_length, or twice it for preference pairs
        (a row holds a pair: its chosen and rejected sequences, each up to max_length)."""
        return self.data.max_length * (2 if self.row_shape == "pairs" else 1)

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
        if self.method == "qlora" and self.distributed.min_workers > 0 and self.distributed.zero_stage == 3 and \
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

        problem = config_problem(self) or elastic_batch_problem(self.train, self.distributed)
        if problem:
            raise ValueError(problem)
        r = self.regularization
        if r.ewc is not None and self.data.retention is None:
            raise ValueError("regularization.ewc estimates its Fisher on data.retention: set data.retention "
                             "(general text, held out), or use regularization.l2sp, which needs none")
        if self.tune is not None:
            metric = self.tune.metric or default_tune_metric(self)
            mode = self.tune.mode or default_tune_mode(self, metric)
            problem = tune_metric_problem(self, metric, mode)
            if problem:
                raise ValueError(problem)
            self.tune.metric, self.tune.mode = metric, mode  # resolved: what Tune and the reports read
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



def elastic_batch_problem(train: TrainConfig, distributed: DistributedConfig) -> Optional[str]:
    """An elastic range at some size of which the global batch cannot be kept exactly (it must
    split into whole micro-batches on every worker), with the smallest batch that works."""
    if not distributed.elastic:
        return None
    micro, batch = train.micro_batch_size, train.batch_size
    broken = [n for n in distributed.sizes if not train.splits_at(n)]
    if not broken:
        return None
    unit = math.lcm(*(micro * n for n in distributed.sizes))
    works = -(-batch // unit) * unit
    return (f"distributed.workers {list(distributed.workers)}: train.batch_size {batch} does not split into whole "
            f"micro-batches of {micro} at {', '.join(map(str, broken))} worker(s), so the global batch would change "
            f"with the world size; set train.batch_size to a multiple of {unit} (e.g. {works}), or narrow the range")


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


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
