"""build the model a run trains: load or init, quantize (QLoRA), add adapters, freeze.

`freeze_layers` is the fine-tuning spectrum as one knob:
  full  + 0      full fine-tuning
  full  + N      layer freezing: the lowest N blocks and the input embeddings get no updates
  full  + all    feature extraction: only the final norm and the head train
  lora/qlora + N adapters only on blocks N and up (the base is frozen anyway)

A tied LM head (tie_word_embeddings: the head's weight IS the input embeddings', as in SmolLM2,
Llama-3.2-1B, Qwen2.5 small) cannot be frozen apart from the embeddings: with N frozen blocks it
stays frozen with them (the model line and the summary say so); feature extraction, which would
train nothing but the final norm, is refused.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from ftdist.config.schema import Config, QloraConfig, freeze_depth_problem, frozen_blocks
from ftdist.errors import UserError
from ftdist.io.safeload import reason
from ftdist.model.attention import implementation as attention_implementation
from ftdist.model.source import TRUST_SETTING, load_tokenizer, refuse_remote_code, remote_code_error
from ftdist.objectives.registry import objective_class, resolve

if TYPE_CHECKING:
    from ftdist.objectives.protocol import Objective


@dataclass(frozen=True)
class ModelInfo:
    """What a run trains: logged at the start, kept in the summary."""

    method: str
    trainable_params: int
    total_params: int
    num_layers: int
    frozen_blocks: int
    lora_targets: Optional[tuple[str, ...]] = None  # adapter runs
    tied_head: Optional[str] = None  # a head tied to the input embeddings: "trained" or "frozen" with them

    def record(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if v is not None}

    def describe(self) -> str:
        return (f"model: {self.method}, {self.trainable_params:,} trainable of {self.total_params:,} parameters "
                f"({100 * self.trainable_params / self.total_params:.2f}%), "
                f"{self.frozen_blocks} of {self.num_layers} blocks frozen"
                + (f"; the LM head is tied to the input embeddings (one tensor): {self.tied_head} with them"
                   if self.tied_head and self.method == "full" else ""))


@dataclass
class ModelBundle:
    model: nn.Module
    tokenizer: object
    info: ModelInfo
    head: object = None  # computing the loss, handed over by the objective (None: from the logits)
    attention: str = "sdpa"  # the model's attn_implementation, deciding the mask's form


def compute_dtype(cfg: Config, device: torch.device, bf16_supported: Optional[bool] = None) -> torch.dtype:
    """The dtype matmuls run in. Trainable weights always stay float32 (master weights).
    `bf16_supported`: for a GPU not on this machine (ftdist plan); default: ask this one's."""
    name = cfg.model.dtype
    if name == "auto":
        if device.type == "cuda" and (torch.cuda.is_bf16_supported() if bf16_supported is None else bf16_supported):
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


# ---------------------------------------------------------------- loading


def quantized_load_kwargs(qlora: QloraConfig, dtype: torch.dtype, device: torch.device) -> dict:
    """from_pretrained arguments for a 4-bit NF4/FP4 base (training and generation alike)."""
    from transformers import BitsAndBytesConfig

    return {
        "dtype": dtype,
        "device_map": {"": (device.index or 0) if device.type == "cuda" else "cpu"},
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=qlora.quant_type,
            bnb_4bit_use_double_quant=qlora.double_quant,
            bnb_4bit_compute_dtype=dtype,
            # Storage dtype = compute dtype: what sharded (ZeRO-3) training needs.
            bnb_4bit_quant_storage=dtype,
        ),
    }


def load_causal_lm(path: str, device: torch.device, qlora: Optional[QloraConfig] = None,
                   dtype: torch.dtype = torch.float32, what: str = "model.name_or_path",
                   attention: Optional[str] = None, trust_remote_code: bool = False,
                   allow: str = TRUST_SETTING) -> nn.Module:
    """A causal LM from a HF directory or hub id, float32 on the CPU; with `qlora`, its frozen
    weights in 4 bits on `device` (compute in `dtype`), as training, export and generation load it.
    `attention`: an attn_implementation (default: transformers' choice). A model that asks to
    run code of its own is refused unless `trust_remote_code` (`allow` names the setting)."""
    from transformers import AutoModelForCausalLM

    refuse_remote_code(path, trust_remote_code, what, allow)
    kwargs = {"dtype": torch.float32} if qlora is None else quantized_load_kwargs(qlora, dtype, device)
    kwargs["trust_remote_code"] = trust_remote_code
    if attention:
        kwargs["attn_implementation"] = attention
    import pickle

    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except pickle.UnpicklingError as e:  # a .bin that holds more than tensors: refused, never run

        raise UserError(f"{what}: {path}: its weights hold objects other than tensors, refused unloaded "
                        f"({reason(e)}); use a copy in safetensors") from None
    except (OSError, ValueError, SafetensorError) as e:
        raise remote_code_error(e, path, what, allow) or \
            UserError(f"{what}: cannot load a causal LM from {path}: {e}") from None
    if qlora is not None:
        keep_4bit_trainable(model)
    return model


def load_base_model(cfg: Config, base_path: str, device: torch.device) -> nn.Module:
    from transformers import AutoConfig

    qlora = cfg.qlora if cfg.method == "qlora" else None
    trust = cfg.model.trust_remote_code
    refuse_remote_code(base_path, trust, "model.name_or_path")
    model_config = AutoConfig.from_pretrained(base_path, trust_remote_code=trust)
    attention = attention_implementation(cfg.model.attention, model_config, device)
    model = load_causal_lm(base_path, device, qlora, compute_dtype(cfg, device), attention=attention,
                           trust_remote_code=trust)
    if qlora is None:
        model.to(device)
    model.config.use_cache = False
    return model


def keep_4bit_trainable(model: nn.Module) -> None:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights.

    On CPUs with AVX512-BF16, the first forward in eval mode repacks each 4-bit weight
    for a fast inference kernel that autograd cannot pass through: training after an
    evaluation then silently stops gradients below that layer (and crashes on biased
    layers, as in Qwen2). Found here with bitsandbytes 0.50.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


# ---------------------------------------------------------------- structure


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer blocks: the ModuleList with one entry per hidden layer."""
    n_layers = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and name.split(".")[-1] in ("layers", "h", "blocks"):
            return name, module
    raise UserError(f"cannot find the transformer blocks of {type(model).__name__}; freeze_layers needs them")


def n_frozen_blocks(cfg: Config, n_layers: int) -> int:
    problem = freeze_depth_problem(cfg.freeze_layers, cfg.method, n_layers)
    if problem:
        raise UserError(problem)
    return frozen_blocks(cfg.freeze_layers, n_layers)


def ties_head(model: nn.Module) -> bool:
    """Whether the LM head's weight is the input embeddings' (tie_word_embeddings): one tensor."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embeddings is not None and head.weight is embeddings.weight


def tied_head_state(model: nn.Module) -> Optional[str]:
    """"trained" or "frozen" (with the input embeddings) for a tied LM head; None for an untied one."""
    if not ties_head(model):
        return None
    return "trained" if model.get_output_embeddings().weight.requires_grad else "frozen"


def refuse_tied_feature_extraction(n_layers: int) -> None:
    raise UserError(
        "freeze_layers: all trains only the final norm and the LM head, but this model ties its LM head to the "
        "input embeddings (tie_word_embeddings: one tensor), which freeze_layers keeps frozen: nothing but the "
        f"final norm would train. Use freeze_layers: N below {n_layers} (the top blocks train; the tied head stays "
        "frozen with the embeddings), method: lora, or task: classification (a head of its own)")


def freeze_full(model: nn.Module, cfg: Config, own_modules: Optional[tuple[str, ...]] = None) -> int:
    """Full fine-tuning with the lowest blocks (and the input embeddings) frozen. Returns how
    many blocks are frozen. `own_modules`: the objective's heads on the model (a classifier's),
    which replace the LM head (None: those of the config's objective). A tied LM head is the
    input embeddings: frozen with them."""
    _, blocks = decoder_blocks(model)
    n = n_frozen_blocks(cfg, len(blocks))
    model.requires_grad_(True)
    task_heads = [getattr(model, name) for name in objective_modules(cfg, own_modules)]
    tied = ties_head(model)
    if cfg.freeze_layers == "all" and tied and not task_heads:
        refuse_tied_feature_extraction(len(blocks))
    if task_heads and not tied:
        model.get_output_embeddings().requires_grad_(False)  # the task's loss never reaches the LM head
    if n == 0:
        return 0
    for block in blocks[:n]:
        block.requires_grad_(False)
    block_params = {id(p) for p in blocks.parameters()}
    for module in model.modules():  # token and position embeddings outside the blocks
        if isinstance(module, nn.Embedding) and not any(id(p) in block_params for p in module.parameters()):
            module.requires_grad_(False)
    if cfg.freeze_layers == "all":
        # Feature extraction: only the head learns (an LM's final norm and head; a task's new head alone).
        if task_heads:
            model.requires_grad_(False)
            for head in task_heads:
                head.requires_grad_(True)
        else:
            model.get_output_embeddings().requires_grad_(True)
    return n


def enable_gradient_checkpointing(model: nn.Module, every: int) -> None:
    """Recompute the activations of every `every`-th decoder block in the backward pass instead
    of keeping them. Non-reentrant checkpointing: correct under adapters over a frozen or 4-bit
    base (the input embeddings' output is made to require grad as well) and with ZeRO-3."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.enable_input_require_grads()
        for i, block in enumerate(decoder_blocks(model)[1]):
            block.gradient_checkpointing = i % every == 0


def checkpointed_blocks(model: nn.Module) -> list[bool]:
    """For each decoder block: is its forward recomputed in the backward pass?"""
    return [bool(getattr(block, "gradient_checkpointing", False)) for block in decoder_blocks(model)[1]]


def linear_names(blocks: nn.ModuleList) -> list[str]:
    """Leaf names of the linear layers inside the blocks (q_proj, ..., down_proj); bitsandbytes'
    4-bit layers are nn.Linear too (no need to import it, which takes seconds, for a float model)."""
    names = set()
    for name, module in blocks.named_modules():
        if isinstance(module, nn.Linear):
            names.add(name.split(".")[-1])
    return sorted(names)


def add_adapters(model: nn.Module, cfg: Config,
                 own_modules: Optional[tuple[str, ...]] = None) -> tuple[nn.Module, int, list[str]]:
    """LoRA adapters on the blocks above the frozen ones: (PEFT model, blocks frozen, targets).
    `own_modules`: the objective's heads, which train whole (None: the config's objective's)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    blocks_name, blocks = decoder_blocks(model)
    n = n_frozen_blocks(cfg, len(blocks))
    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # ours: build_model
    targets = cfg.lora.target_modules
    # PEFT refuses layers_to_transform with the string "all-linear": name the layers.
    target_list = linear_names(blocks) if targets == "all-linear" else list(targets)
    known = set(linear_names(blocks))
    unknown = [t for t in target_list if t not in known]
    if unknown:
        raise UserError(
            f"lora.target_modules: {unknown} are not linear layers of this model; choose from {sorted(known)} or 'all-linear'"
        )
    lora = LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=target_list,
        layers_to_transform=list(range(n, len(blocks))) if n else None,
        layers_pattern=blocks_name.split(".")[-1] if n else None,
        modules_to_save=list(objective_modules(cfg, own_modules)) or None,  # an objective's new head trains whole
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora), n, target_list


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); 4-bit weights count as the parameters they stand for."""
    trainable = total = 0
    for p in model.parameters():
        quant_state = getattr(p, "quant_state", None)
        n = math.prod(quant_state.shape) if quant_state is not None else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def objective_modules(cfg: Config, own_modules: Optional[tuple[str, ...]]) -> tuple[str, ...]:
    """The modules an objective adds to the model: `own_modules`, or where not given, those
    of the config's objective (a checkpoint's export rebuilds the model it trained)."""
    if own_modules is not None:
        return own_modules

    return objective_class(cfg).own_modules


def build_model(cfg: Config, base_path: str, device: torch.device,
                objective: Optional["Objective"] = None) -> ModelBundle:
    """The model as `objective` (default: the config's) trains it: its modules added, frozen or
    adapted, and its loss head (made by the objective) in place of the LM head's forward."""
    if objective is None:
        objective = resolve(cfg)
    tokenizer = load_tokenizer(cfg, base_path)
    model = load_base_model(cfg, base_path, device)
    objective.prepare_model(model)
    targets = None
    if cfg.train.checkpoint_every:
        enable_gradient_checkpointing(model, cfg.train.checkpoint_every)
    if cfg.method == "full":
        frozen = freeze_full(model, cfg, objective.own_modules)
    else:
        model, frozen, targets = add_adapters(model, cfg, objective.own_modules)
    trainable, total = count_parameters(model)
    info = ModelInfo(cfg.method, trainable, total, model.config.num_hidden_layers, frozen,
                     tuple(targets) if targets else None, tied_head_state(model))
    # from_pretrained gives a model in eval mode: no dropout, and no gradient checkpointing
    # (transformers checkpoints only in training mode). Evaluation switches back and forth.
    model.train()
    return ModelBundle(model, tokenizer, info, objective.make_head(model), model.config._attn_implementation)


def plain_linear_head(model: nn.Module, key: str, fix: str) -> nn.Linear:
    """The LM head, which a chunked loss computes with: it must be a plain linear layer. `key`:
    what asks for the chunks (train.chunked_loss, an objective), and `fix`: what to do instead."""
    head = model.get_output_embeddings()
    if getattr(model.config, "final_logit_softcapping", None) or type(head) is not nn.Linear:
        raise UserError(f"{key}: {type(model).__name__}'s LM head is not a plain linear layer (it caps or wraps its "
                        f"logits); {fix}")
    return head


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
