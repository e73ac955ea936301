"""The run's base model: model.name_or_path as it is (s3:// fetched into the cache), or <run>/base
written once: built from model.init, a GGUF file dequantized, or an adapter run's final/ merged
into its base (an export). For s3:// runs base/ goes into the store too, so that every node and every resume loads
the very same weights."""

from __future__ import annotations

from pathlib import Path

from ftdist.artifacts.export import export
from ftdist.config.schema import Config
from ftdist.io import safewrite
from ftdist.io.layout import BASE_DIR
from ftdist.io.space import no_room_stops
from ftdist.model.source import (
    TRUST_SETTING,
    build_gguf_base,
    build_initial_model,
    builds_own_base,
    check_model_source,
    gguf_location,
)


def resolve_base(cfg: Config, store) -> str:
    """Where the base model lives: model.name_or_path (s3:// fetched into the cache), or
    <run>/base built from model.init, a GGUF file or adapters. For s3:// runs the built base goes into the store too,
    so that every node (and a resumed run on a fresh machine) loads the very same weights."""
    if not builds_own_base(cfg.model):
        return check_model_source(cfg.model.name_or_path, cfg.storage)
    base = store.root / BASE_DIR
    for name in (BASE_DIR, BASE_DIR + ".tmp", BASE_DIR + ".download", BASE_DIR + ".lock"):
        safewrite.check(store.root / name, store.root, "the base model")  # never read or written through a link
    if (base / "config.json").is_file():
        return str(base)
    build_base = no_room_for_base(*base_builder(cfg))
    if not store.remote:
        build_base(cfg, base)
        return str(base)
    from filelock import FileLock

    store.root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(store.root / (BASE_DIR + ".lock"))):  # ranks on one node: one download
        if not (base / "config.json").is_file():
            tmp = base.with_name(BASE_DIR + ".download")
            safewrite.remove(tmp, store.root, "the base model")
            if store.exists(f"{BASE_DIR}/config.json"):
                store.download(BASE_DIR, tmp)
                safewrite.rename(tmp, base, store.root, "the base model")
            else:
                build_base(cfg, base)
                store.upload(BASE_DIR, source=base)
    return str(base)


def base_builder(cfg: Config):
    """How the run's base/ is written, and what it holds (for a message)."""
    if cfg.model.init:
        return build_initial_model, "the initial weights of model.init"
    if gguf_location(cfg.model):
        return build_gguf_base, "the GGUF model dequantized"
    return merge_adapter_start, "the merged starting model"


def no_room_for_base(build, what: str):
    """`build` (cfg, base) with a full disk told as one message; its partial base/ (written
    aside as base.tmp by model.init and GGUF, in place by an adapter merge) goes, nothing else does."""
    def build_base(cfg: Config, base: Path) -> None:
        partial = base if build is merge_adapter_start else base.with_name(BASE_DIR + ".tmp")
        with no_room_stops(partial, f"{BASE_DIR}/ ({what})",
                           "free space there (or set run.output elsewhere) and run the same command again"):
            build(cfg, base)
    return build_base


def merge_adapter_start(cfg: Config, out: Path) -> None:
    """<run>/base of a run that starts from adapters: them merged into their base (ftdist
    export --merge), the model this run trains and, for dpo, its reference."""
    export(cfg.model.name_or_path, str(out), merge=True, storage=cfg.storage,
           trust_remote_code=cfg.model.trust_remote_code, allow=TRUST_SETTING)
