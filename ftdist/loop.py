"""THE training loop: local mode and every Ray worker run this same function.

Read top to bottom: build model and data, plan the steps, wrap them in an engine (plain
AdamW locally, DeepSpeed in Ray workers), restore the newest complete checkpoint, then
step (accumulate, clip, update), log, evaluate, checkpoint; finally save the model,
measure forgetting and plot. Every rank runs every line; only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import functools
import math
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from transformers import get_scheduler

from ftdist import checkpoint
from ftdist.config import Config
from ftdist.context import LocalContext
from ftdist.data import IGNORE, Rows, collate, corpus_texts, epoch_order, read_jsonl
from ftdist.engine import build_engine
from ftdist.errors import UserError
from ftdist.metrics import MetricsLog, Progress, perplexity
from ftdist.model import build_model, compute_dtype, resolve_base
from ftdist.storage import StoreUnavailable, Uploader

FINAL_DIR = "final"


@dataclass
class Plan:
    rows: int
    batches_per_epoch: int
    total_steps: int
    accumulation_steps: int  # micro-batches per rank per step

    def describe(self, cfg: Config, world_size: int) -> str:
        return (
            f"{self.rows} training rows of up to {cfg.data.max_length} tokens; batch {cfg.train.batch_size} "
            f"= {world_size} x {self.accumulation_steps} micro-batches of {cfg.train.micro_batch_size}; "
            f"{self.total_steps} steps"
        )


def make_plan(cfg: Config, n_rows: int, world_size: int) -> Plan:
    t = cfg.train
    if t.batch_size % (t.micro_batch_size * world_size):
        raise UserError(
            f"train.batch_size {t.batch_size} is not a multiple of train.micro_batch_size "
            f"{t.micro_batch_size} x {world_size} workers"
        )
    per_epoch = n_rows // t.batch_size
    if per_epoch == 0:
        raise UserError(
            f"data.train gives {n_rows} rows of data.max_length tokens, fewer than train.batch_size "
            f"{t.batch_size}: add data or lower train.batch_size"
        )
    total = t.max_steps or per_epoch * t.epochs
    return Plan(n_rows, per_epoch, total, t.batch_size // (t.micro_batch_size * world_size))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(cfg: Config, model: torch.nn.Module, total_steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("nothing to train: every parameter is frozen (check method and freeze_layers)")
    # Weight decay on matrices only, not on norms and biases. Without weight decay one group:
    # DeepSpeed's universal checkpoint re-partitions ZeRO-3 states of several groups wrongly.
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.train.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ] if cfg.train.weight_decay else [{"params": params, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.train.lr)
    names = {"cosine": "cosine_with_min_lr", "linear": "linear", "constant": "constant_with_warmup"}
    extra = {"min_lr_rate": cfg.train.min_lr_ratio} if cfg.train.schedule == "cosine" else None
    scheduler = get_scheduler(
        names[cfg.train.schedule], optimizer, num_warmup_steps=min(cfg.train.warmup_steps, total_steps),
        num_training_steps=total_steps, scheduler_specific_kwargs=extra,
    )
    return optimizer, scheduler


def autocast(cfg: Config, device: torch.device):
    dtype = compute_dtype(cfg, device)
    if dtype == torch.float32 or cfg.method == "qlora":  # bitsandbytes computes in its own dtype
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def loss_sum(forward, batch: dict, device: torch.device) -> torch.Tensor:
    """Summed cross-entropy over the batch's target tokens."""
    targets = batch["targets"].to(device)
    logits = forward(
        input_ids=batch["input_ids"].to(device),
        position_ids=batch["position_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
    ).logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def target_count(batch: dict) -> int:
    return int((batch["targets"] != IGNORE).sum())


@torch.no_grad()
def evaluate(engine, model, rows: Rows, cfg: Config, ctx: LocalContext, pad_id: int) -> float:
    """Token-weighted mean loss over all rows; each rank takes every world_size-th row."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    mine = list(range(ctx.rank, len(rows), ctx.world_size))
    size = cfg.train.micro_batch_size
    # Every rank runs the same number of forward passes: under ZeRO-3 each one is collective.
    n_batches = math.ceil(math.ceil(len(rows) / ctx.world_size) / size)
    with autocast(cfg, ctx.device):
        for i in range(n_batches):
            index = mine[i * size : (i + 1) * size]
            batch = collate(rows, index or [0], pad_id)
            loss = loss_sum(engine.forward, batch, ctx.device)
            if index:  # a rank with no rows left runs row 0 and ignores it
                total, count = total + float(loss), count + target_count(batch)
    model.train(was_training)
    total, count = ctx.all_reduce_sum(total), ctx.all_reduce_sum(count)
    return total / max(count, 1)


def step_batches(cfg: Config, plan: Plan, rows: Rows, epoch: int, index: int, ctx: LocalContext,
                 pad_id: int) -> list[dict]:
    """This rank's micro-batches of global batch `index` of `epoch`, from this rank's rows
    (all rows locally, the rank's Ray Data shard in a worker) in a (seed, rank, epoch) order."""
    per_rank = cfg.train.batch_size // ctx.world_size
    order = epoch_order(len(rows), cfg.train.seed + ctx.rank, epoch)
    mine = order[index * per_rank : (index + 1) * per_rank].tolist()
    micro = cfg.train.micro_batch_size
    return [collate(rows, mine[i : i + micro], pad_id) for i in range(0, len(mine), micro)]


def optimizer_step(cfg: Config, engine, batches: list[dict], ctx: LocalContext) -> tuple[float, float]:
    """Accumulate gradients over the micro-batches, clip, update. Returns (loss, grad norm)."""
    # Normalise by the global target-token count: the same loss however the batch is split.
    # Gradients are averaged over ranks by DeepSpeed, hence the factor world_size.
    global_targets = ctx.all_reduce_sum(sum(target_count(b) for b in batches))
    loss_total = 0.0
    with autocast(cfg, ctx.device):
        for batch in batches:
            loss = loss_sum(engine.forward, batch, ctx.device)
            engine.backward(loss * ctx.world_size / global_targets)
            loss_total += float(loss.detach())
    grad_norm = engine.step()
    return ctx.all_reduce_sum(loss_total) / global_targets, grad_norm


def train(cfg: Config, ctx: LocalContext) -> dict:
    store, run_dir = ctx.store, ctx.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed)

    # -- model and data
    base_path = resolve_base(cfg, store, lambda: tokenizer_corpus(cfg))
    bundle = build_model(cfg, base_path, ctx.device)
    data = ctx.load_data(cfg, bundle.tokenizer)
    plan = make_plan(cfg, ctx.all_reduce_sum(len(data.train)), ctx.world_size)
    optimizer, scheduler = build_optimizer(cfg, bundle.model, plan.total_steps)

    # -- the newest complete checkpoint (rank 0 decides, so all ranks agree); its state says
    # how the engine must load it (another world size or ZeRO stage: universal checkpoint)
    # (all_reduce_sum is collective: no barrier needed after rank 0's clean-up)
    resume_step = int(ctx.all_reduce_sum((checkpoint.start_point(store) or 0) if ctx.is_main else 0))
    saved, resume_path = None, None
    if resume_step:
        resume_path = checkpoint.fetch_checkpoint(store, resume_step, ctx.rank, ctx.world_size)
        saved = checkpoint.read_state(resume_path)
    engine = build_engine(cfg, bundle.model, optimizer, scheduler, ctx.ds_config, saved)
    uploader = Uploader()
    try:
        return run_steps(cfg, ctx, bundle, data, plan, engine, uploader, base_path, saved, resume_path)
    except StoreUnavailable as e:
        raise StoreUnavailable(f"{e}. Training stopped; checkpoints not yet in the store are kept in "
                               f"{run_dir / checkpoint.ROOT}. Run the same command again once the store is back: "
                               "it resumes from the newest complete checkpoint") from None
    finally:
        uploader.close()


def run_steps(cfg: Config, ctx: LocalContext, bundle, data, plan: Plan, engine, uploader: Uploader,
              base_path: str, saved: Optional[dict], resume_path: Optional[Path]) -> dict:
    store, run_dir = ctx.store, ctx.run_dir
    model, tokenizer = bundle.model, bundle.tokenizer
    pad_id = tokenizer.pad_token_id
    log = MetricsLog(run_dir / checkpoint.METRICS, enabled=ctx.is_main)
    say = functools.partial(print, flush=True) if ctx.is_main and ctx.show_progress else (lambda *_: None)
    info = bundle.info
    say(
        f"model: {info['method']}, {info['trainable_params']:,} trainable of {info['total_params']:,} parameters "
        f"({100 * info['trainable_params'] / info['total_params']:.2f}%), "
        f"{info['frozen_blocks']} of {info['num_layers']} blocks frozen"
    )
    say(f"data: {data.format}, " + plan.describe(cfg, ctx.world_size))
    if data.stats.get("skipped_rows"):
        say(f"data: skipped {data.stats['skipped_rows']} bad rows (data.skip_bad_rows)")

    # -- resume from the newest complete checkpoint, or start
    state = {"step": 0, "tokens_seen": 0, "eval_loss": None, "best_eval_loss": None, "retention_before": None}
    layout = {"engine": engine.kind, "world_size": ctx.world_size,
              "zero_stage": (ctx.ds_config or {}).get("zero_optimization", {}).get("stage")}
    if saved is not None:
        engine.load(resume_path, saved)
        checkpoint.restore_rng(resume_path, ctx.rank)
        state = {k: saved[k] for k in state}
        if ctx.is_main and (resume_path / checkpoint.METRICS).is_file():  # the log as it was at the checkpoint
            shutil.copyfile(resume_path / checkpoint.METRICS, log.path)
        log.truncate_after(state["step"])
        log.append({"step": state["step"], "event": "resume", "checkpoint": resume_path.name,
                    "from_world_size": saved.get("world_size"), **layout})
        say(f"resuming from {store.path(checkpoint.step_dir(state['step']))} (step {state['step']})")
    else:
        log.reset()
        if data.retention is not None:
            state["retention_before"] = evaluate(engine, model, data.retention, cfg, ctx, pad_id)
        log.append({"step": 0, "event": "start", **info, **data.stats, **ctx.topology(),
                    "retention_loss_before": state["retention_before"]})
    progress = Progress(plan.total_steps, state["step"], cfg.train.log_every, enabled=ctx.is_main and ctx.show_progress)
    base_size = checkpoint.size_bytes(Path(base_path)) if Path(base_path).is_dir() else None
    sizes: dict = {}

    def note_uploads(step: int) -> None:
        """Surface the background jobs: a failure stops the run; finished checkpoints are logged."""
        uploader.check()
        for done in uploader.drain():
            sizes.update(checkpoint_bytes=done["bytes"], base_model_bytes=base_size)
            log.append({"step": step, "event": "checkpoint", **done, "base_model_bytes": base_size,
                        "upload_mib_per_s": done["uploaded"] / 2**20 / done["upload_s"] if done["uploaded"] else None})
            progress.write(f"checkpoint step {done['step']} complete: {describe_size(done['bytes'], base_size, info)}"
                           f" in {done['seconds']:.1f} s")

    retention_loss: dict[int, float] = {}  # by step, measured with each evaluation

    def run_eval(step: int) -> None:
        eval_loss = evaluate(engine, model, data.eval, cfg, ctx, pad_id)
        if step > 0:
            best = state["best_eval_loss"]
            state["best_eval_loss"] = eval_loss if best is None else min(best, eval_loss)
            state["eval_loss"] = eval_loss
        record = {"step": step, "eval_loss": eval_loss, "eval_ppl": perplexity(eval_loss)}
        if data.retention is not None and step > 0:  # forgetting as training goes, not only at the end
            retention_loss[step] = evaluate(engine, model, data.retention, cfg, ctx, pad_id)
            record["forgetting"] = retention_loss[step] - state["retention_before"]
        log.append(record)
        # The orchestrator (Ray Train, and Tune's early stopping above it) sees every evaluation.
        ctx.report({**record, "tokens_seen": state["tokens_seen"], "trainable_params": info["trainable_params"]})
        progress.write(f"step {step}: eval loss {eval_loss:.4f}, perplexity {perplexity(eval_loss):.2f}"
                       + (f", forgetting {record['forgetting']:+.4f}" if "forgetting" in record else ""))

    if state["step"] == 0 and data.eval is not None:
        run_eval(0)  # the baseline every later evaluation is compared with

    # -- train
    model.train()
    for step in range(state["step"] + 1, plan.total_steps + 1):
        started = time.perf_counter()
        epoch, index = divmod(step - 1, plan.batches_per_epoch)
        batches = step_batches(cfg, plan, data.train, epoch, index, ctx, pad_id)
        step_loss, grad_norm = optimizer_step(cfg, engine, batches, ctx)

        tokens = ctx.all_reduce_sum(sum(b["n_tokens"] for b in batches))
        state["step"], state["tokens_seen"] = step, state["tokens_seen"] + tokens
        elapsed = time.perf_counter() - started
        record = {
            "step": step, "epoch": epoch, "loss": step_loss,
            "lr": engine.lr, "grad_norm": grad_norm,
            "tokens_per_s": tokens / elapsed, "step_time_s": elapsed, "tokens_seen": state["tokens_seen"],
        }
        log.append(record)
        progress.step(record)

        if data.eval is not None and (step % cfg.train.eval_every == 0 or step == plan.total_steps):
            run_eval(step)

        if step % cfg.checkpoint.every_steps == 0 and step < plan.total_steps:
            state["data_position"] = {"epoch": epoch, "batch": index + 1}
            saving = time.perf_counter()
            checkpoint.save_checkpoint(store, step, engine, {**state, **layout}, cfg.checkpoint.keep, ctx, uploader)
            log.append({"step": step, "event": "checkpoint_staged", "stall_s": time.perf_counter() - saving})
        note_uploads(step)
    progress.close()
    uploader.flush()  # every checkpoint complete before the run counts as finished
    note_uploads(plan.total_steps)

    # -- finish: final model, forgetting, summary, plot
    summary = {"steps": plan.total_steps, "tokens_seen": state["tokens_seen"], **info, **sizes}
    if data.eval is not None:  # evaluated at the last step, so state holds the final numbers
        summary.update(eval_loss=state["eval_loss"], eval_ppl=perplexity(state["eval_loss"]),
                       best_eval_loss=state["best_eval_loss"])
    if data.retention is not None:
        after = retention_loss.get(plan.total_steps)
        if after is None:  # no eval data: no evaluation at the last step
            after = evaluate(engine, model, data.retention, cfg, ctx, pad_id)
        summary.update(retention_loss_before=state["retention_before"], retention_loss_after=after,
                       forgetting=after - state["retention_before"])
    model_state = engine.model_state()  # collective under ZeRO-3
    if ctx.is_main:
        save_final(run_dir, cfg, model, tokenizer, base_path, summary, model_state)
        from ftdist.report import plot_loss

        plot_loss(run_dir)
        publish(store)
    return summary


def describe_size(size: int, base_size: Optional[int], info: dict) -> str:
    text = f"{size / 2**20:.1f} MiB"
    if info["method"] != "full":
        text += " (adapters and their optimizer state"
        text += f"; the base model is {base_size / 2**20:.1f} MiB)" if base_size else ")"
    return text


def publish(store) -> None:
    """Rank 0, at the end: summary, log, plots and the final model into the store (s3:// runs).
    final/ftdist.json goes last: it is what marks the run finished."""
    for rel in ["summary.json", checkpoint.METRICS, *(p.name for p in store.local.glob("*.png"))]:
        store.upload(rel)
    marker = f"{FINAL_DIR}/ftdist.json"
    store.upload(FINAL_DIR, skip={marker})
    store.upload(marker)


def tokenizer_corpus(cfg: Config) -> list[str]:
    """The text a fresh tokenizer learns from: the training data (and retention text)."""
    from ftdist.data import read_text_file

    records = read_jsonl(cfg.data.train, cfg.data.format, skip_bad_rows=True)[0]
    if cfg.data.retention:
        records += read_text_file(cfg.data.retention)
    return corpus_texts(records)


def save_final(run_dir: Path, cfg: Config, model, tokenizer, base_path: str, summary: dict,
               model_state: dict | None = None) -> Path:
    """final/: a plain HF model (full) or PEFT adapter (lora/qlora), with the tokenizer."""
    final = run_dir / FINAL_DIR
    tmp = run_dir / (FINAL_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if model_state is None:
        model.save_pretrained(tmp)
    else:  # gathered from ZeRO-3 partitions
        model.save_pretrained(tmp, state_dict=model_state)
    tokenizer.save_pretrained(tmp)
    meta = {"method": cfg.method, "base_model": base_path, "qlora": cfg.qlora.model_dump(),
            "dtype": cfg.model.dtype}
    (tmp / "ftdist.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    summary["final_size_bytes"] = checkpoint.size_bytes(final)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=_jsonable))
    return final


def _jsonable(value):
    return float(value) if isinstance(value, (np.floating, torch.Tensor)) else str(value)
