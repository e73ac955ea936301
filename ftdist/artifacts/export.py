"""ftdist export: a run's trained weights as a directory other tools load without ftdist.

  method full        a Hugging Face model directory (config.json, model.safetensors)
  lora / qlora       a PEFT adapter directory (adapter_config.json, adapter_model.safetensors)
  lora + --merge     one standalone model: the adapters merged into the base
  qlora + --merge    the same, merged into the 4-bit base *dequantized*: the weights the
                     adapters were trained against, not the original ones

Each export also holds the tokenizer and an ftdist.json saying what it is (method, merged,
source, step), so `ftdist generate OUT` loads it as it loads runs/NAME/final.

The weights come from final/ (a finished run), else from the run's newest complete
checkpoint, or from the one checkpoint named. Checkpoints hold the weights as the engine that
wrote them lays them out: a PEFT adapter directory is copied as it is, anything else is read
consolidated through the engine's reader (ftdist.engines.weights_of), whatever its format.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

from ftdist.artifacts.classify import load_classifier
from ftdist.config.load import validate_config
from ftdist.config.schema import Config, StorageConfig
from ftdist.engines.base import frozen_names, tied_names
from ftdist.engines.registry import adapter_folder, weights_of
from ftdist.errors import UserError
from ftdist.io import safewrite
from ftdist.io.checkpoints import MARKER, PREFIX, latest_step, size_bytes, step_dir
from ftdist.io.layout import BASE_DIR, CHECKPOINTS, FINAL_DIR, SNAPSHOT, SUMMARY
from ftdist.io.layout import FINAL_META as META
from ftdist.io.runlock import reading
from ftdist.io.storage import RunStore, is_remote
from ftdist.model.build import add_adapters, compute_dtype, default_device, freeze_full, load_causal_lm
from ftdist.model.source import (
    TRUST_FLAG,
    builds_own_base,
    check_model_source,
    load_tokenizer,
    refuse_remote_code,
)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class Source:
    """The weights to export: final/ or one checkpoint directory of a run."""

    run_dir: Path
    weights: Path
    cfg: Config
    step: Optional[int]

    @property
    def is_final(self) -> bool:
        return self.weights.name == FINAL_DIR

    def describe(self) -> str:
        if not self.is_final:
            return f"{self.run_dir} (checkpoint {self.weights.name})"
        return f"{self.run_dir} (final model" + (f", step {self.step})" if self.step is not None else ")")


def export(source: str, out: str, merge: bool = False, force: bool = False,
           storage: Optional[StorageConfig] = None, trust_remote_code: bool = False,
           allow: Optional[str] = None) -> str:
    """Write the export and return the one line that says what was written where.
    `trust_remote_code` (--trust-remote-code; the run's own snapshot is not asked: a copied run
    could say anything there) lets a model or tokenizer that ships code of its own load;
    `allow` names that setting in the refusal."""
    trust = {"trust_remote_code": trust_remote_code, "allow": allow}
    if not is_remote(source):
        return export_local(Path(source).expanduser(), source, out, merge, force, **trust)
    with tempfile.TemporaryDirectory(prefix="ftdist-export-") as tmp:
        return export_local(local_copy(source, storage or StorageConfig(), Path(tmp)), source, out, merge, force,
                            **trust)


def export_local(path: Path, source: str, out: str, merge: bool, force: bool, trust_remote_code: bool = False,
                 allow: Optional[str] = None) -> str:
    with reading(run_dir_of(path), str(path)):  # a --restart of the run meanwhile is refused, not exported
        return export_source(path, source, out, merge, force, trust_remote_code, allow)


def run_dir_of(path: Path) -> Path:
    """The run directory an export source lies in (a run, its final/ or one of its checkpoints)."""
    path = path.resolve() if path.exists() else path
    if (path / "state.json").is_file():
        return path.parent.parent
    return path.parent if path.name == FINAL_DIR else path


def export_source(path: Path, source: str, out: str, merge: bool, force: bool, trust_remote_code: bool,
                  allow: Optional[str]) -> str:
    src = resolve_source(path)
    # The snapshot's own model.trust_remote_code is replaced by the caller's choice.
    src = replace(src, cfg=src.cfg.model_copy(
        update={"model": src.cfg.model.model_copy(update={"trust_remote_code": trust_remote_code})}))
    method = src.cfg.method
    refuse_classifier_checkpoint(src, merge)
    if merge and method == "full":
        raise UserError(f"{source}: --merge folds LoRA adapters into their base, but this run trained every "
                        "weight (method full); drop --merge")
    out_dir = check_output(Path(out).expanduser(), src, force)
    base = base_model_of(src)
    for what, folder in (("the run's model", str(src.weights)), ("the base model", base),
                         ("model.tokenizer", src.cfg.model.tokenizer)):
        refuse_remote_code(folder, trust_remote_code, what, allow or TRUST_FLAG)
    meta = {"method": "full" if merge else method, "trained_method": method, "merged": merge,
            "source": source if is_remote(source) else str(src.weights), "step": src.step, "base_model": base,
            "qlora": src.cfg.qlora.model_dump(), "dtype": "float32", "task": src.cfg.task}

    def fill(folder: Path) -> None:
        if method == "full" or merge:
            model = full_model(src, base) if method == "full" else merged_model(src, base)
            model.config.use_cache = True  # training turns the KV cache off; generation wants it
            model.save_pretrained(folder)
        else:
            write_adapter(src, base, folder)
        load_tokenizer_of(src, base).save_pretrained(folder)
        (folder / META).write_text(json.dumps(meta, indent=2))

    write_atomically(out_dir, fill)
    return summary_line(src, out_dir, merge, base)


# ---------------------------------------------------------------- what to export


def local_copy(source: str, storage: StorageConfig, dest: Path) -> Path:
    """Download what an export of an s3:// run or checkpoint reads: the config, the summary,
    the base of a model.init run, and final/ or the one checkpoint wanted. Returns the local
    path that stands for `source`."""
    source = source.rstrip("/")
    head, parent, leaf = (source.rsplit("/", 2) + ["", ""])[:3]
    is_checkpoint = parent == CHECKPOINTS and leaf.startswith(PREFIX)
    run = RunStore(head if is_checkpoint else source, dest, storage)
    if not run.exists(SNAPSHOT):
        raise UserError(f"{run.url}: not an ftdist run (no {SNAPSHOT} there); give a run "
                        "(<run.output>/<run.name>) or one of its checkpoints")
    for rel in (SNAPSHOT, SUMMARY):
        if run.exists(rel):
            run.download(rel, dest / rel)
    if run.exists(f"{BASE_DIR}/config.json"):
        run.download(BASE_DIR, dest / BASE_DIR)
    if is_checkpoint:
        wanted = f"{CHECKPOINTS}/{leaf}"
    elif run.exists(f"{FINAL_DIR}/{META}"):
        wanted = FINAL_DIR
    else:
        step = latest_step(run)
        wanted = step_dir(step) if step is not None else None
    if wanted is not None and run.exists(wanted):
        run.download(wanted, dest / wanted)
    return dest / f"{CHECKPOINTS}/{leaf}" if is_checkpoint else dest


def resolve_source(path: Path) -> Source:
    """A checkpoint directory (state.json) or a run directory (config.yaml)."""
    if not path.is_dir():
        raise UserError(f"{path}: no such directory; give a run directory (<run.output>/<run.name>) or one of its "
                        f"checkpoints (<run>/{CHECKPOINTS}/{PREFIX}N)")
    path = path.resolve()  # "." and "step-3/.." have parents too
    if (path / "state.json").is_file():
        return checkpoint_source(path)
    if path.name == FINAL_DIR and (path / META).is_file():  # runs/NAME/final: the run's final model
        path = path.parent
    if not (path / SNAPSHOT).is_file():
        raise UserError(f"{path}: neither a run directory (no {SNAPSHOT}) nor a checkpoint (no state.json); give "
                        f"<run.output>/<run.name> or <run>/{CHECKPOINTS}/{PREFIX}N")
    cfg = run_config(path)
    if (path / FINAL_DIR / META).is_file():
        return Source(path, path / FINAL_DIR, cfg, final_step(path))
    step = latest_step(RunStore(str(path), path, cfg.storage))
    if step is None:
        raise UserError(f"{path}: the run has no final model and no complete checkpoint yet; train it further "
                        "(the same `ftdist train` command resumes it), then export")
    return checkpoint_source(path / step_dir(step))


def checkpoint_source(path: Path) -> Source:
    run_dir = path.parent.parent  # <run>/checkpoints/step-N
    if not (path / MARKER).is_file():
        # Written last, once every rank's files are there: without it the weights may be half written.
        raise UserError(f"{path}: a partial checkpoint (no {MARKER} marker: its save did not finish); export "
                        f"another checkpoint, or the run directory {run_dir} for its final model or newest "
                        "complete checkpoint")
    if not (run_dir / SNAPSHOT).is_file():
        raise UserError(f"{path}: no {SNAPSHOT} in {run_dir}, so the model this checkpoint belongs to is unknown; "
                        f"export a checkpoint inside its run directory (<run>/{CHECKPOINTS}/{PREFIX}N)")
    step = json.loads((path / "state.json").read_text()).get("step")
    return Source(run_dir, path, run_config(run_dir), step)


def run_config(run_dir: Path) -> Config:
    snapshot = run_dir / SNAPSHOT
    return validate_config(yaml.safe_load(snapshot.read_text()) or {}, source=str(snapshot))


def final_step(run_dir: Path) -> Optional[int]:
    summary = run_dir / SUMMARY
    return json.loads(summary.read_text()).get("steps") if summary.is_file() else None


def base_model_of(src: Source) -> str:
    """The base the run trained from: <run>/base for runs that built one (model.init, a GGUF
    file, adapters merged), else model.name_or_path.

    Taken from the config rather than final/ftdist.json, whose absolute path goes stale when
    a run directory is moved or copied to another machine.
    """
    if builds_own_base(src.cfg.model):
        base = src.run_dir / BASE_DIR
        if not (base / "config.json").is_file():
            raise UserError(f"{base}: the base model of this run is missing; it is written when training starts, "
                            "so copy the run directory whole")
        return str(base)
    return check_model_source(src.cfg.model.name_or_path, src.cfg.storage)


def load_tokenizer_of(src: Source, base: str):
    """The tokenizer the run trained with."""
    if src.is_final:  # saved with the final model, as training used it
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(src.weights, trust_remote_code=src.cfg.model.trust_remote_code)
    return load_tokenizer(src.cfg, base)


# ---------------------------------------------------------------- where to write


def check_output(out: Path, src: Source, force: bool) -> Path:
    if out.is_symlink():  # ftdist never writes through a link (safewrite); its parents are the user's
        target = Path(os.path.realpath(out))
        raise UserError(f"--out {out} is a symbolic link (to {target}); ftdist never writes through a link, nor "
                        f"replaces one: give the directory itself (--out {target}), or a new directory")
    resolved, run = out.resolve(), src.run_dir.resolve()
    if resolved == run or run in resolved.parents or resolved in run.parents:
        # --force would delete (part of) the very run being exported.
        raise UserError(f"--out {out}: overlaps the run directory {src.run_dir}; export to a directory outside it")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        if not force:
            raise UserError(f"--out {out}: exists and is not empty; choose a new directory, or add --force to "
                            "replace an earlier export there")
        if not is_export(out):
            raise UserError(f"--out {out}: holds files ftdist did not write (no {META} of an ftdist export there), "
                            "and --force replaces only an earlier export; choose a new directory")
    return out


def is_export(path: Path) -> bool:
    """A directory an earlier `ftdist export` wrote (its ftdist.json says what was exported)."""
    try:
        return path.is_dir() and "merged" in json.loads((path / META).read_text())
    except (OSError, ValueError):
        return False


def write_atomically(out: Path, fill: Callable[[Path], None]) -> None:
    """Fill a new directory beside OUT, then rename it into place: a failed export leaves no
    half-written OUT and no directory of its own behind, and nothing but OUT (empty, or an
    earlier export) is ever replaced; never through a link (safewrite)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.ftdist-", dir=out.parent))
    old = tmp.with_name(tmp.name + "-old")  # the earlier OUT, set aside until the new one is in place
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would stay on OUT
        fill(tmp)
        if out.is_symlink():  # made while the export ran
            raise safewrite.refuse(out, "the export")
        if out.is_dir():
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            if old.is_dir() and not out.exists():
                os.rename(old, out)
            raise
    finally:
        for leftover in (tmp, old):
            safewrite.remove_quietly(leftover, out.parent, "the export")


def refuse_classifier_checkpoint(src: Source, merge: bool) -> None:
    """A classifier exports from its final/ (its head and labels are written there); a qlora
    classifier's adapters stay adapters (its base is 4-bit)."""
    if src.cfg.task != "classification":
        return
    if not src.is_final:
        raise UserError(f"{src.weights}: a checkpoint of a classifier (task: classification); its head and labels "
                        f"are written with the final model: export the run once it has finished ({src.run_dir})")
    if merge and src.cfg.method == "qlora":
        raise UserError(f"{src.run_dir}: --merge of a qlora classifier is not supported (its adapters learned "
                        "against the 4-bit base); export without --merge: PEFT puts the adapters and the head on "
                        "the base loaded as AutoModelForSequenceClassification")


# ---------------------------------------------------------------- full models


def full_model(src: Source, base: str):
    """The trained model, float32 on the CPU (a classifier: *ForSequenceClassification)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if src.is_final:
        auto = AutoModelForSequenceClassification if src.cfg.task == "classification" else AutoModelForCausalLM
        return auto.from_pretrained(src.weights, dtype=torch.float32,
                                    trust_remote_code=src.cfg.model.trust_remote_code)

    # The architecture and the frozen weights; every trained weight is then replaced.
    model = load_base(base, trust_remote_code=src.cfg.model.trust_remote_code)
    freeze_full(model, src.cfg)  # which weights the run trained: a checkpoint holds those only
    load_weights(model, weights_of(src.weights, adapters_only=False), src.weights)
    return model.requires_grad_(True)


def load_base(base: str, cfg: Optional[Config] = None, trust_remote_code: Optional[bool] = None):
    """The base in float32 on the CPU. For a qlora run (cfg given), the 4-bit base dequantized.
    `trust_remote_code`: default cfg's model.trust_remote_code (False without cfg)."""
    if trust_remote_code is None:
        trust_remote_code = cfg.model.trust_remote_code if cfg is not None else False
    if cfg is None or cfg.method != "qlora":
        return load_causal_lm(base, torch.device("cpu"), what="the base model", trust_remote_code=trust_remote_code)

    # Quantized as in training (settings, compute dtype, device type): the adapters learned
    # against these 4-bit weights, not the original ones.
    device = default_device()
    model = load_causal_lm(base, device, cfg.qlora, compute_dtype(cfg, device), what="the base model",
                           trust_remote_code=trust_remote_code)
    # Float weights holding exactly the values the 4-bit ones stand for; float32, so that
    # merging small adapter updates into them loses nothing to rounding.
    return model.dequantize().to("cpu", torch.float32)


def load_weights(model, state: dict[str, torch.Tensor], where: Path) -> None:
    """Copy a checkpoint's state into the model; each of its weights must be there."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that differ
        raise UserError(f"{where}: the weights do not fit the run's base model ({str(e).splitlines()[-1].strip()}); "
                        "was the run's config.yaml or base changed?") from None
    missing = sorted(set(result.missing_keys) - tied_names(model) - frozen_names(model))
    if missing or result.unexpected_keys:
        raise UserError(f"{where}: the weights do not fit the run's base model (missing {missing[:3]}, "
                        f"unexpected {result.unexpected_keys[:3]}); was the run's config.yaml or base changed?")


# ---------------------------------------------------------------- adapters


def adapter_dir(src: Source) -> Optional[Path]:
    """The PEFT adapter directory of final/ or of a checkpoint whose engine saves one; None else."""
    if (src.weights / ADAPTER_FILES[0]).is_file():
        return src.weights
    return adapter_folder(src.weights)


def write_adapter(src: Source, base: str, folder: Path) -> None:
    saved = adapter_dir(src)
    if saved is not None:  # already PEFT's format: copied byte for byte
        for name in ADAPTER_FILES:
            shutil.copy2(saved / name, folder / name)
        return
    # An engine's own files: the adapter structure on an empty (meta) copy of the base, no weights
    # loaded (a QLoRA base may not fit in memory as floats), and the trained tensors saved through it.
    model = with_new_adapters(src.cfg, skeleton(base, src.cfg.model.trust_remote_code))
    model.save_pretrained(folder, state_dict=adapter_weights(src, model))


def merged_model(src: Source, base: str):
    """The base with the adapters folded into its weights: a plain model, float32 on the CPU
    (a classifier: *ForSequenceClassification with its trained head)."""
    from peft import PeftModel

    if src.cfg.task == "classification":
        return load_classifier(src.weights, src.cfg.model.trust_remote_code)[0].merge_and_unload()
    model = load_base(base, src.cfg)
    saved = adapter_dir(src)
    if saved is not None:
        model = PeftModel.from_pretrained(model, saved)
    else:
        model = with_new_adapters(src.cfg, model)
        model.load_state_dict(adapter_weights(src, model), strict=False)
    return model.merge_and_unload()


def skeleton(base: str, trust_remote_code: bool = False):
    """The base's modules on the meta device: structure and names, no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    refuse_remote_code(base, trust_remote_code, "the base model")
    config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)  # keeps `base` as PEFT's name
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def with_new_adapters(cfg: Config, model):
    """The adapters the run trained, as training added them (targets, frozen blocks), untrained."""
    # As lora: on a float (or meta) base the qlora preparation for 4-bit weights has nothing to do.
    model, _, _ = add_adapters(model, cfg.model_copy(update={"method": "lora"}))
    return model


def adapter_weights(src: Source, model) -> dict[str, torch.Tensor]:
    """The trained adapter tensors of a checkpoint in an engine's own files, by the model's parameter names."""
    state = weights_of(src.weights, adapters_only=True)
    expected = {name: param.shape for name, param in model.named_parameters() if param.requires_grad}
    wrong = [name for name, shape in expected.items() if name not in state or state[name].shape != shape]
    if wrong:
        raise UserError(f"{src.weights}: {len(wrong)} of the run's {len(expected)} adapter tensors are missing "
                        f"from the checkpoint or shaped otherwise (e.g. {wrong[0]}); was the run's config.yaml "
                        "changed?")
    return {name: state[name] for name in expected}


# ---------------------------------------------------------------- the last line


def summary_line(src: Source, out: Path, merge: bool, base: str) -> str:
    method = src.cfg.method
    size = f"{size_bytes(out) / 1e6:.1f} MB"
    if method == "full":
        return f"exported the full model of {src.describe()} to {out}: {size}"
    if merge:
        into = "its dequantized 4-bit base" if method == "qlora" else "its base"
        return f"exported the {method} adapters of {src.describe()} merged into {into} to {out}: model {size}"
    base_dir = Path(base)
    base_size = f"{size_bytes(base_dir) / 1e6:.1f} MB at {base}" if base_dir.is_dir() else base
    return f"exported the {method} adapters of {src.describe()} to {out}: adapter {size} (base model {base_size})"
