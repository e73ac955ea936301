"""Where a base model comes from, and what it may do: a local directory, an s3:// directory
(fetched once into the cache), a hub id, an adapter run's final/, a GGUF file (llama.cpp, Ollama;
dequantized), or model.init (random weights and a tokenizer trained on the run's text); the code a model or tokenizer asks to run, refused
unless model.trust_remote_code; its tokenizer and chat template. training/base.py writes the
run's own base/ from these."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Optional

from ftdist.config.schema import GGUF_SUFFIX, Config, ModelConfig, ModelInit
from ftdist.data.chat_templates import apply_choice
from ftdist.data.records import tokenizer_corpus
from ftdist.errors import UserError
from ftdist.io import safewrite
from ftdist.io.hub import check_reachable
from ftdist.io.storage import fetch, is_remote

TRUST_SETTING = "set model.trust_remote_code: true"


# generate, classify and export take no config: the flag, never the run's own snapshot (a copied
# run, or one from a shared bucket, could say anything there).
TRUST_FLAG = "rerun with --trust-remote-code (model.trust_remote_code: true in a config)"


REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json")


def remote_code_request(directory: Path) -> Optional[str]:
    """Why a model or tokenizer directory asks transformers to run code it ships (None: it
    does not): an `auto_map` in its config.json or tokenizer_config.json, or a model_type
    transformers does not know (only the directory's own code could build it)."""
    import json

    for name in REMOTE_CODE_FILES:
        try:
            data = json.loads((directory / name).read_text())
        except (OSError, ValueError):  # absent or unreadable: the loader names that
            continue
        if not isinstance(data, dict):
            continue
        auto_map = data.get("auto_map")
        if auto_map:
            shown = ", ".join(f"{k} -> {v}" for k, v in auto_map.items()) if isinstance(auto_map, dict) else auto_map
            return f"its {name} asks to run code of its own (auto_map: {str(shown)[:200]})"
        model_type = data.get("model_type")
        if name == "config.json" and isinstance(model_type, str) and model_type:
            from transformers import CONFIG_MAPPING

            if model_type not in CONFIG_MAPPING:
                return (f"its config.json has model_type {model_type!r}, which transformers does not know "
                        "(only code of its own could build it)")
    return None


def refuse_remote_code(source: Optional[str], trust: bool, what: str, allow: str = TRUST_SETTING) -> None:
    """UserError when `source` (a local model or tokenizer directory, or a hub id's files in the
    local Hugging Face cache) asks for code of its own and running it was not allowed (`allow`
    names the setting that would). A hub id not downloaded yet is refused by transformers itself
    when its code would be needed (trust_remote_code=False; remote_code_error), and checked here
    once its config is in the cache (the loop and `ftdist plan` ask again after reading it)."""
    if trust or not source:
        return
    directory = Path(source).expanduser()
    if directory.is_dir():
        reason = remote_code_request(directory)
        shown = str(directory)
    else:
        reason = hub_remote_code_request(source)
        shown = source
    if reason:
        raise UserError(f"{what} {shown}: {reason}; {runs_no_code(allow)}")


def runs_no_code(allow: str) -> str:
    return f"ftdist runs no code from a model unless told to: {allow}, for a model whose code you have read"


def hub_remote_code_request(repo_id: str) -> Optional[str]:
    """remote_code_request of a hub id's files as the local Hugging Face cache holds them (None:
    not cached, or asks for nothing)."""
    from huggingface_hub import try_to_load_from_cache

    folders = set()
    for name in REMOTE_CODE_FILES:
        try:
            cached = try_to_load_from_cache(repo_id, name)
        except Exception:  # noqa: BLE001 - not a hub id (a path, an s3:// URL): nothing cached under it
            return None
        if isinstance(cached, str):
            folders.add(Path(cached).parent)
    for folder in sorted(folders):
        reason = remote_code_request(folder)
        if reason:
            return reason
    return None


def remote_code_error(error: Exception, source: str, what: str, allow: str = TRUST_SETTING) -> Optional[UserError]:
    """transformers' own refusal of a hub model's custom code (trust_remote_code=False), as one line."""
    if "trust_remote_code" not in str(error):
        return None
    return UserError(f"{what} {source} asks to run code of its own; {runs_no_code(allow)}")


def adapter_start(name_or_path: Optional[str]) -> bool:
    """Whether model.name_or_path is an adapter run's final/ (say, an SFT run's LoRA adapters
    before preference tuning): the run starts from them merged into their base."""
    return bool(name_or_path) and not is_remote(name_or_path) \
        and (Path(name_or_path).expanduser() / "adapter_config.json").is_file()


def builds_own_base(model: ModelConfig) -> bool:
    """Whether the run writes its own base/ and trains from it: random weights (model.init),
    adapters merged into their base, or a GGUF file dequantized."""
    return model.init is not None or adapter_start(model.name_or_path) or gguf_location(model) is not None


# ---------------------------------------------------------------- GGUF files

GGUF_MAGIC = b"GGUF"


def gguf_location(model: ModelConfig) -> Optional[tuple[str, str]]:
    """(the folder, the file name) of a GGUF base: model.gguf_file in the directory
    model.name_or_path, a name_or_path ending in .gguf (local or s3://), or a local file (Ollama
    keeps its models as sha256-... blobs); None for every other source."""
    path = model.name_or_path
    if not path or model.init is not None:
        return None
    if model.gguf_file:
        return path.rstrip("/"), model.gguf_file
    local_file = not is_remote(path) and Path(path).expanduser().is_file()
    if path.lower().endswith(GGUF_SUFFIX) or local_file:
        folder, _, name = path.rpartition("/")
        return folder or ".", name
    return None


def gguf_key(model: ModelConfig) -> str:
    return "model.gguf_file" if model.gguf_file else "model.name_or_path"


def local_gguf(model: ModelConfig, storage) -> Path:
    """The GGUF file on this machine (an s3:// object fetched once into the cache), checked to be one."""
    folder, name = gguf_location(model)
    key = gguf_key(model)
    if is_remote(folder):
        path = fetch(f"{folder}/{name}", storage, "models")
    else:
        path = Path(folder).expanduser() / name
        if not path.is_file():
            raise UserError(f"{key}: no file at {str(path)[-200:]}; point it at a .gguf file (llama.cpp, or an "
                            "Ollama model's blob)")
    check_gguf_magic(path, key)
    return path


def check_gguf_magic(path: Path, key: str) -> None:
    try:
        with open(path, "rb") as file:
            head = file.read(len(GGUF_MAGIC))
    except OSError as e:
        raise UserError(f"{key} {str(path)[-200:]}: cannot read it ({e.strerror})") from None
    if head != GGUF_MAGIC:
        raise UserError(f"{key} {str(path)[-200:]}: not a GGUF file (it starts with {head!r}, a GGUF file with "
                        f"{GGUF_MAGIC!r}); point model.name_or_path at a .gguf file or at a Hugging Face model "
                        "directory")


def gguf_error(path: Path, key: str, error: Exception) -> UserError:
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    return UserError(f"{key} {str(path)[-200:]}: transformers cannot load this GGUF file: {first_line}. It "
                     "dequantizes the architectures and quantization types its GGUF support lists (Q4_0, Q4_1, "
                     "Q5_*, Q8_0, K-quants, IQ-quants, F16, BF16, F32): convert the model again with one of them, "
                     "or use its Hugging Face directory")


def gguf_model_config(model: ModelConfig, storage):
    """The architecture a GGUF file describes (its metadata only: no tensor is read)."""
    from transformers import AutoConfig

    path = local_gguf(model, storage)
    try:
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, NotImplementedError, KeyError, OSError) as e:
        raise gguf_error(path, gguf_key(model), e) from None


def build_gguf_base(cfg: Config, out: Path) -> None:
    """The GGUF file's weights dequantized (float32, or model.dtype where it names a half type),
    its tokenizer and chat template, saved as one plain HF directory: resume, export, merge,
    DPO's reference and `ftdist plan` then read a base like any other."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, key = local_gguf(cfg.model, cfg.storage), gguf_key(cfg.model)
    dtype = torch.float32 if cfg.model.dtype in ("auto", "float32") else getattr(torch, cfg.model.dtype)
    try:  # transformers draws a progress bar of its own here, which no setting turns off
        with contextlib.redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except (ValueError, NotImplementedError, KeyError, OSError) as e:
        raise gguf_error(path, key, e) from None
    # The weights are plain tensors now; the marks of the GGUF loading would make
    # save_pretrained refuse the model as "quantized".
    model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    save_base(model, tokenizer, out)


def save_base(model, tokenizer, out: Path) -> None:
    """Written aside, then renamed: a crash never leaves a half-written base behind."""
    tmp = out.with_name(out.name + ".tmp")
    safewrite.remove(tmp, out.parent, "the base model")
    safewrite.make_dirs(tmp, out.parent, "the base model")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    safewrite.rename(tmp, out, out.parent, "the base model")


def tokenizer_source(cfg: Config) -> Optional[str]:
    name = cfg.model.tokenizer
    return str(fetch(name, cfg.storage, "models")) if name and is_remote(name) else name


def init_model_config(init: ModelInit, tokenizer=None):
    from transformers import AutoConfig

    special = {}
    if tokenizer is not None:
        special = {"eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
                   "pad_token_id": tokenizer.pad_token_id}
    return AutoConfig.for_model(
        init.arch,
        hidden_size=init.hidden_size,
        intermediate_size=init.intermediate_size or 4 * init.hidden_size,
        num_hidden_layers=init.num_layers,
        num_attention_heads=init.num_heads,
        num_key_value_heads=init.num_kv_heads or init.num_heads,
        vocab_size=init.vocab_size,
        max_position_embeddings=init.max_position_embeddings,
        tie_word_embeddings=init.tie_word_embeddings,
        **special,
    )


def build_initial_model(cfg: Config, out: Path) -> None:
    """Random weights from model.init plus a tokenizer (model.tokenizer, or one trained on the
    run's text), saved as one HF directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftdist.data.tokenizer import train_tokenizer

    init, tokenizer_path = cfg.model.init, tokenizer_source(cfg)
    if tokenizer_path:
        trust = cfg.model.trust_remote_code
        refuse_remote_code(tokenizer_path, trust, "model.tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=trust)
    else:
        tokenizer = train_tokenizer(tokenizer_corpus(cfg.data, cfg.row_shape), init.vocab_size)
    if len(tokenizer) > init.vocab_size:
        raise UserError(
            f"model.init.vocab_size {init.vocab_size} is smaller than the tokenizer's "
            f"{len(tokenizer)} tokens; raise it to at least {len(tokenizer)}"
        )
    model_config = init_model_config(init, tokenizer)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.train.seed)
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    save_base(model, tokenizer, out)


def run_tokenizer_source(cfg: Config, base_path: str) -> str:
    """Where the run's tokenizer loads from: model.tokenizer over a base model's own."""
    return tokenizer_source(cfg) if (cfg.model.tokenizer and not cfg.model.init) else base_path


def load_tokenizer(cfg: Config, base_path: str):
    """The run's tokenizer, with data.chat_template set on it."""
    from transformers import AutoTokenizer

    source = run_tokenizer_source(cfg, base_path)
    trust = cfg.model.trust_remote_code
    refuse_remote_code(source, trust, "model.tokenizer" if source != base_path else "model.name_or_path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust)
    except (OSError, ValueError) as e:
        raise remote_code_error(e, source, "model.tokenizer") or \
            UserError(f"model.tokenizer: cannot load a tokenizer from {source}: {e}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    apply_choice(tokenizer, cfg.data.chat_template)
    return tokenizer


def check_model_source(name_or_path: str, storage) -> str:
    """A local model directory, a hub id, or an s3:// directory (fetched once into the cache)."""
    if is_remote(name_or_path):
        local = fetch(name_or_path, storage, "models")
        if not (local / "config.json").is_file():
            raise UserError(f"model.name_or_path {name_or_path}: no config.json there; point it at a Hugging Face "
                            "model directory in the bucket")
        check_weight_files(local, "model.name_or_path")
        return str(local)
    path = Path(name_or_path)
    looks_local = name_or_path.startswith((".", "/", "~")) or path.exists()
    if looks_local:
        path = path.expanduser()
        if (path / "adapter_config.json").is_file():  # an adapter run's final/ (checked by preflight.check_paths)
            return str(path)
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*" + GGUF_SUFFIX)) if path.is_dir() else []
            if ggufs:
                raise UserError(f"model.name_or_path {name_or_path}: no config.json there, but GGUF files "
                                f"({', '.join(ggufs[:5])[:300]}); set model.gguf_file to the one to train")
            raise UserError(
                f"model.name_or_path {name_or_path}: no config.json there; "
                "point it at a Hugging Face model directory (or a hub id, or a .gguf file)"
            )
        check_weight_files(path, "model.name_or_path")
        return str(path)
    check_reachable("model.name_or_path", name_or_path)
    return name_or_path  # a hub id


def check_weight_files(model_dir: Path, key: str) -> None:
    """Each .safetensors file's header read, which tells a truncated or damaged file (its
    tensors would reach past its end) in milliseconds, before the model loads; each torch
    weights file (pytorch_model*.bin) read as tensors only, never unpickled: one that holds
    anything else (a planted pickle's code) is refused before the model loads."""
    from safetensors import SafetensorError, safe_open

    from ftdist.io.safeload import why_unloadable

    for file in sorted(model_dir.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise UserError(f"{key} {model_dir}: {file.name} is damaged or incomplete ({e}); copy or download "
                            "it again") from None
    for file in sorted([*model_dir.glob("*.bin"), *model_dir.glob("*.pt"), *model_dir.glob("*.pth")]):
        problem = why_unloadable(file, allowed=False)
        if problem:
            raise UserError(f"{key} {model_dir}: {file.name} {problem}; ftdist loads a model's weights as tensors "
                            "only: use a copy in safetensors, or download it again") from None
