"""Preflight: what can be wrong with a run, found before any weight is loaded. Local mode, the
Ray driver and the tune driver run the same checks.

  check_inputs  trackers installed and reachable, paths exist, every data row is valid
                (file:line on error), s3:// data fetched; no torch imported yet, so a mistake
                is told in the first seconds
  check_dtype   the compute dtype suits the device
  check_fits    the model's freeze depth, and its memory estimate per device against what
                is free (with what would make it fit)

Each failure is a UserError that says what to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ftdist.config.schema import SPLITS, Config, freeze_depth_problem
from ftdist.data.chat_templates import check_choice
from ftdist.data.prepared import check_cache_dir, remember_validated, shared_url, task_labels, validated
from ftdist.data.records import SPLIT_KEYS, data_paths, is_plain_text, labels_of, read_split, read_train
from ftdist.data.sources import GLOB_CHARS, check_readable, check_source, is_glob
from ftdist.errors import UserError
from ftdist.io.storage import fetch, is_remote
from ftdist.model.source import (
    adapter_start,
    check_model_source,
    gguf_location,
    gguf_model_config,
    init_model_config,
    local_gguf,
    refuse_remote_code,
    remote_code_error,
)
from ftdist.tracking.preflight import check_tracking

if TYPE_CHECKING:
    import torch

    from ftdist.sizing.memory import MemoryEstimate

@dataclass(frozen=True)
class CheckedInputs:
    cfg: Config  # the run's config with local copies of s3:// data files
    data_format: str  # the training rows' format (data.format, or what the rows are)
    skipped_rows: int  # bad rows skipped (data.skip_bad_rows)


def check_inputs(cfg: Config) -> CheckedInputs:
    check_cache_dir(cfg)  # the prepared rows and s3:// copies go there
    cfg = check_tracking(cfg)  # less the optional trackers that cannot be reached
    check_paths(cfg)
    local = localize_data(cfg)
    fmt, skipped, labels = check_data(local)
    if labels is not None:  # the task's labels, read from the rows where not given: fixed for the run
        local = local.model_copy(update={"classification": local.classification.model_copy(update={"labels": labels})})
    return CheckedInputs(local, fmt, skipped)


def check_paths(cfg: Config) -> None:
    for key, value in data_paths(cfg.data):
        if is_remote(value):  # fetched (and checked) by localize_data
            continue
        if key.startswith(("data.retention", SPLIT_KEYS["replay"])) and is_plain_text(value) and Path(value).is_file():
            check_readable(Path(value), key)  # plain text
            continue
        check_source(value, key)
    check_choice(cfg.data.chat_template)
    if cfg.model.tokenizer and cfg.model.tokenizer.startswith((".", "/")):
        if not Path(cfg.model.tokenizer).exists():
            raise UserError(f"model.tokenizer: not found: {cfg.model.tokenizer}")
    if gguf_location(cfg.model) and not is_remote(cfg.model.name_or_path):
        local_gguf(cfg.model, cfg.storage)
    elif cfg.model.name_or_path and not is_remote(cfg.model.name_or_path):  # an s3:// model is checked once fetched
        check_model_source(cfg.model.name_or_path, cfg.storage)
        if adapter_start(cfg.model.name_or_path):  # an adapter run's final/: the run merges it into its base
            from ftdist.artifacts.export import resolve_source  # torch, off the path to a config error

            resolve_source(Path(cfg.model.name_or_path).expanduser())


def localize_data(cfg: Config) -> Config:
    """The config with s3:// data files replaced by local copies (fetched once into the cache):
    data is read where the run starts (this process, or the Ray driver); and with the bucket
    copy of the prepared rows resolved, while the data's URLs still name their bucket."""
    def local_copy(path: str) -> str:
        return str(fetch_source(path, cfg.storage)) if is_remote(path) else path

    def local_copies(given):
        if isinstance(given, list):
            return [s.model_copy(update={"path": local_copy(s.path)}) for s in given]
        return given and local_copy(given)

    local = {split: local_copies(getattr(cfg.data, split)) for split in SPLITS}
    local = {k: v for k, v in local.items() if v != getattr(cfg.data, k)}
    storage = cfg.storage.model_copy(update={"prepared_url": shared_url(cfg)})
    return cfg.model_copy(update={"data": cfg.data.model_copy(update=local), "storage": storage})


def check_data(cfg: Config) -> tuple[str, int, Optional[list[str]]]:
    """Validate every training and eval row here, where an error can name its file and line
    (Ray Data would report a bad row only as a failed task). Returns (format, rows skipped,
    a classification task's labels). Data validated before (the same bytes and settings:
    ftdist.data.prepared) is not read again."""
    known = validated(cfg)
    if known is not None:
        return known
    given = task_labels(cfg)
    parts, fmt, skipped = read_train(cfg.data, given, cfg.row_shape)
    labels = None
    if cfg.row_shape == "labels":
        if fmt != "classification":
            raise UserError(f"data.train: rows are {fmt}, but task: classification needs {{text, label}} rows "
                            "(rename your columns with data.columns, e.g. {label: category})")
        labels = given or labels_of(r for part in parts for r in part)
        if len(labels) < 2:
            raise UserError(f"data.train: every row has the label {labels[0]!r}; a classifier needs two labels or more")
    elif "classification" in fmt.split("+"):
        raise UserError("data.train: rows are {text, label} (classification): set task: classification to train a "
                        "classifier on them")
    skipped += read_split(cfg.data, "eval", fmt, labels, cfg.row_shape)[2]
    read_split(cfg.data, "retention")
    read_split(cfg.data, "replay")
    remember_validated(cfg, fmt, skipped, labels)
    return fmt, skipped, labels


def fetch_source(url: str, storage) -> Path:
    """A local copy of an s3:// data source; a glob's directory is fetched, the glob kept."""
    if not is_glob(url):
        return fetch(url, storage, "data")
    head = url[: min(url.index(c) for c in GLOB_CHARS if c in url)]
    base = head[: head.rindex("/")]
    return fetch(base, storage, "data") / url[len(base) + 1 :]


def check_dtype(cfg: Config, device: "torch.device") -> None:
    import torch

    if cfg.model.dtype == "float16" and device.type == "cpu":
        raise UserError(
            f"model.dtype float16 needs a GPU{' (for qlora too)' if cfg.method == 'qlora' else ''}; "
            "on CPU use float32 or bfloat16 (or auto)"
        )
    if cfg.model.dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("model.dtype bfloat16: this GPU has no bfloat16; use float16 or auto")


def model_config_of(cfg: Config):
    from transformers import AutoConfig

    if cfg.model.init:
        if cfg.model.tokenizer and not is_remote(cfg.model.tokenizer):
            refuse_remote_code(cfg.model.tokenizer, cfg.model.trust_remote_code, "model.tokenizer")
        return init_model_config(cfg.model.init)
    if gguf_location(cfg.model):
        return gguf_model_config(cfg.model, cfg.storage)
    source = check_model_source(cfg.model.name_or_path, cfg.storage)
    if adapter_start(source):  # the adapters' base: the model they merge into
        from ftdist.artifacts.export import base_model_of, resolve_source

        source = base_model_of(resolve_source(Path(source)))
    trust = cfg.model.trust_remote_code
    refuse_remote_code(source, trust, "model.name_or_path")
    if cfg.model.tokenizer and not is_remote(cfg.model.tokenizer):
        refuse_remote_code(cfg.model.tokenizer, trust, "model.tokenizer")
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust)
    except (OSError, ValueError) as e:
        raise remote_code_error(e, source, "model.name_or_path") or \
            UserError(f"model.name_or_path {source}: cannot read its config: {e}") from None
    refuse_remote_code(source, trust, "model.name_or_path")  # a hub id: its config.json is in the cache now
    return config


def estimate_fit(cfg: Config, dtype: "torch.dtype", workers: int, engine: str,
                 available: float, device_type: str = "cuda") -> tuple["MemoryEstimate", float, list[str]]:
    """The memory estimate per device, the bytes of `available` a run may fill
    (memory.usable), and what would make the run fit when it exceeds them (empty when it fits).
    `engine`: the engine's name (ftdist.engines), which says how states divide over `workers`."""
    from ftdist.sizing import memory

    model_config = model_config_of(cfg)
    problem = freeze_depth_problem(cfg.freeze_layers, cfg.method, model_config.num_hidden_layers)
    if problem:
        raise UserError(problem)
    check_length(cfg, model_config)
    est = memory.estimate(cfg, model_config, workers, engine, dtype, device_type)
    limit = memory.usable(available, device_type)
    tips = memory.advice(cfg, model_config, est, workers, dtype, limit, engine) if est.device_total > limit else []
    return est, limit, tips


def check_length(cfg: Config, model_config) -> None:
    """data.max_length within the positions the model has: past them no memory would help."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit and cfg.data.max_length > limit:
        source = "model.init.max_position_embeddings" if cfg.model.init else "max_position_embeddings in its config.json"
        raise UserError(f"data.max_length {cfg.data.max_length} is longer than the model's {limit} positions "
                        f"({source}); set data.max_length to at most {limit}")


def check_fits(cfg: Config, device: "torch.device", workers: int = 1, engine: str = "plain",
               available: Optional[float] = None) -> "MemoryEstimate":
    """The memory estimate per device; a UserError with advice when it exceeds `available`."""
    import psutil
    import torch

    from ftdist.model.build import compute_dtype
    from ftdist.sizing.memory import GiB

    if available is None:
        available = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available
    est, limit, tips = estimate_fit(cfg, compute_dtype(cfg, device), workers, engine, available, device.type)
    if tips:
        usable = f" ({limit / GiB:.1f} GiB usable)" if limit < available else ""
        raise UserError(
            f"the model ({est.total_params / 1e9:.2f}B parameters, method {cfg.method}) needs about "
            f"{est.device_total / GiB:.1f} GiB per {device.type} device to train ({est.describe()}) but "
            f"{available / GiB:.1f} GiB is free{usable}; " + "; or ".join(tips)
        )
    return est
