"""THE training loop: local mode, every Ray Train worker and every Tune trial run this function.

    train(cfg, ctx)
      build    model (load or init, 4-bit, adapters, freezing), data, batch plan, engine
      restore  the newest complete checkpoint (weights, optimizer, schedule, RNG, log), or begin:
               the retention loss before training and the baseline evaluation
      steps    each step: this rank's micro-batches, one optimizer step, a log record;
               evaluations and checkpoints at their intervals
      finish   every checkpoint committed; final model, forgetting, summary, plots, publish

Rank 0's metrics log hands every record to the run's trackers (TensorBoard, MLflow, W&B:
ftdist.tracking), which send them in the background.

What differs between modes arrives in `ctx` (rank, world size, device, data source, engine).
Every rank runs every line; rank 0 writes the log, the final model and the summary, and every
rank writes its own part of each checkpoint.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ftdist.artifacts.report import plot_run
from ftdist.config.plan import Plan, make_plan
from ftdist.config.schema import Config
from ftdist.data.rows import (
    Dataset,
    collate,
    epoch_order,
    rank_rows,
    replay_order,
    replay_share,
    source_line,
    train_order,
    with_weights,
)
from ftdist.engines.base import Engine
from ftdist.errors import UserError
from ftdist.io import safewrite
from ftdist.io.checkpoints import complete_markers, size_bytes, step_dir
from ftdist.io.layout import METRICS, SUMMARY
from ftdist.io.metrics_log import MetricsLog, read_metrics
from ftdist.io.storage import StoreUnavailable, Uploader
from ftdist.model.build import ModelBundle, build_model, compute_dtype
from ftdist.model.compiling import compile_model
from ftdist.objectives.protocol import Objective
from ftdist.objectives.registry import resolve
from ftdist.objectives.tokens import autocast, text_head
from ftdist.sizing.memory import PeakMemory
from ftdist.tracking.hub import Tracking
from ftdist.tracking.run import open_tracking
from ftdist.training import checkpoint
from ftdist.training.base import resolve_base
from ftdist.training.checkpoint import ResumePoint
from ftdist.training.context import LocalContext
from ftdist.training.evaluate import evaluate_rows, text_loss
from ftdist.training.metrics import Progress
from ftdist.training.notice import Notice, StoppedOnNotice
from ftdist.training.optim import build_optimizer
from ftdist.training.outputs import publish, save_final, write_summary
from ftdist.training.regularize import Anchors, fisher_diagonal
from ftdist.training.regularize import describe as describe_regularization


@dataclass
class TrainState:
    """The loop's own state: saved in each checkpoint's state.json, restored on resume."""

    step: int = 0
    tokens_seen: int = 0
    # Before training (step 0), the objective's `transfer` metrics: what negative transfer is told against.
    eval_start: Optional[dict] = None
    eval_loss: Optional[float] = None  # at the latest evaluation after step 0
    eval_metrics: Optional[dict] = None  # the objective's other figures then (eval_ppl, eval_accuracy, ...)
    best_eval_loss: Optional[float] = None
    retention_before: Optional[float] = None  # data.retention's loss before training
    retention_loss: Optional[float] = None  # ... at the latest evaluation
    # Per source of a list, by name: the same three figures (eval, retention before, latest).
    eval_by_source: Optional[dict] = None
    retention_before_by_source: Optional[dict] = None
    retention_by_source: Optional[dict] = None

    @classmethod
    def of_checkpoint(cls, saved: dict) -> "TrainState":
        state = cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})
        if state.eval_start is None and saved.get("eval_loss_start") is not None:  # written before objectives
            state.eval_start = {"eval_loss": saved["eval_loss_start"],
                                **({"eval_accuracy": saved["eval_accuracy_start"]}
                                   if saved.get("eval_accuracy_start") is not None else {})}
        return state


@dataclass
class Run:
    """What one rank trains with, built once."""

    cfg: Config
    ctx: LocalContext
    bundle: ModelBundle  # the model, its tokenizer and what it trains
    base_path: str
    data: Dataset
    plan: Plan
    engine: Engine  # how weights, gradients and optimizer states are laid out, stepped and saved
    objective: Objective  # each batch's loss and metrics, each evaluation's figures
    log: MetricsLog
    uploader: Uploader
    peak: PeakMemory  # this rank's device memory, measured
    tracking: Tracking  # rank 0's trackers (none on other ranks)
    anchors: Optional[Anchors] = None  # L2-SP / EWC: the pull of trained weights to their values before training
    progress: Optional[Progress] = None
    checkpoint_sizes: Optional[dict] = None  # of the latest completed checkpoint, for the summary
    checkpoint_seconds: Optional[float] = None  # how long it took (a preemption's deadline is weighed against it)
    epoch_order: Optional[tuple[int, np.ndarray]] = None  # (epoch, its row order): Run.order
    replay_pass: Optional[tuple[int, np.ndarray]] = None  # (pass, its replay row order): Run.replay_order

    @cached_property
    def base_size(self) -> Optional[int]:
        """Bytes of the base model's files (None for a hub id), beside which checkpoint sizes are told."""
        base_dir = Path(self.base_path)
        return size_bytes(base_dir) if base_dir.is_dir() else None

    def say(self, line: str) -> None:
        if self.ctx.is_main and self.ctx.show_progress:
            print(line, flush=True)

    def evaluate(self, split: str) -> tuple[float, dict, dict]:
        """The mean loss over the eval or retention rows (every rank's share), the model as it
        is now: together, by source name (empty for one source), and the objective's scores
        (retention text is scored as text, whatever the objective)."""
        names = self.cfg.data.eval_names() if split == "eval" else self.cfg.data.retention_names()
        objective = self.objective if split == "eval" else text_loss(self.bundle)
        result = evaluate_rows(self.cfg, self.ctx, self.engine, getattr(self.data, split), pad_id(self),
                               objective, max(len(names), 1))
        return result.loss, {n: v for n, v in zip(names, result.by_source) if v is not None}, result.scores

    def order(self, epoch: int) -> np.ndarray:
        """The training rows of `epoch` in order: the world's (data.shared), else this rank's
        (kept for the epoch: at a million rows drawing it takes a moment)."""
        if self.epoch_order is None or self.epoch_order[0] != epoch:
            seed = self.cfg.train.seed + (0 if self.data.shared else self.ctx.rank)
            self.epoch_order = (epoch, train_order(self.data.train, self.cfg.data.weights, seed, epoch))
        return self.epoch_order[1]

    def replay_order(self, cycle: int) -> np.ndarray:
        """The order of pass `cycle` over the replay rows (kept while the pass is read)."""
        if self.replay_pass is None or self.replay_pass[0] != cycle:
            self.replay_pass = (cycle, epoch_order(len(self.data.replay), self.cfg.train.seed, cycle))
        return self.replay_pass[1]

    def evaluates_at(self, step: int) -> bool:
        return self.data.eval is not None and (step % self.cfg.train.eval_every == 0 or step == self.plan.total_steps)

    def checkpoints_at(self, step: int) -> bool:
        return step % self.cfg.checkpoint.every_steps == 0 and step < self.plan.total_steps


def train(cfg: Config, ctx: LocalContext) -> dict:
    """Train one rank's part of the run to the end; returns the summary."""
    seed_everything(cfg.train.seed)
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    resume = checkpoint.resume_point(ctx)
    run = build(cfg, ctx, resume)
    status = "FAILED"  # what the trackers are told, unless the run finishes
    try:
        state = restore(run, resume) if resume else TrainState()
        run.progress = Progress(run.plan.total_steps, state.step, cfg.train.log_every,
                                enabled=ctx.is_main and ctx.show_progress, told=run.objective.told)
        if state.step == 0:
            begin(run, state)
        for step in range(state.step + 1, run.plan.total_steps + 1):
            train_step(run, state, step)
            if run.evaluates_at(step):
                evaluate_and_report(run, state, step)
            if run.checkpoints_at(step):
                save_checkpoint(run, state, step)
            note_uploads(run, step)
            notice = ctx.stop_requested() if step < run.plan.total_steps else None  # the last step finishes
            if notice:
                stop_on_notice(run, state, step, notice)
        summary = finish(run, state)
        status = "FINISHED"
        return summary
    except (KeyboardInterrupt, StoppedOnNotice):
        status = "KILLED"
        raise
    except StoreUnavailable as e:
        raise StoreUnavailable(f"{e}. Training stopped; checkpoints not yet in the store are kept in "
                               f"{ctx.run_dir / checkpoint.ROOT}. Run the same command again once the store is back: "
                               "it resumes from the newest complete checkpoint") from None
    finally:
        run.tracking.end(status)  # no-op after finish()
        run.uploader.close()


# ---------------------------------------------------------------- build, restore, begin


def build(cfg: Config, ctx: LocalContext, resume: Optional[ResumePoint]) -> Run:
    peak = PeakMemory(ctx.device)  # before the model: what training adds to the process
    base_path = resolve_base(cfg, ctx.store)
    objective = resolve(cfg)
    bundle = build_model(cfg, base_path, ctx.device, objective)
    data = ctx.load_data(cfg, bundle.tokenizer)
    plan = make_plan(cfg, len(data.train) if data.shared else ctx.all_reduce_sum(len(data.train)), ctx.world_size)
    optimizer, scheduler = build_optimizer(cfg, bundle.model, plan.total_steps)
    fisher = None
    if cfg.regularization.ewc is not None:  # at the weights before training, before ZeRO partitions them
        fisher = fisher_diagonal(cfg, bundle.model, data.retention, bundle.tokenizer.pad_token_id,
                                 text_head(bundle.head), bundle.attention, ctx.device)
    objective.before_engine(bundle.model, compute_dtype(cfg, ctx.device))  # (dpo: its frozen reference)
    # The checkpoint's layout tells the engine how to load it (another world size or ZeRO stage).
    engine = ctx.make_engine(cfg, bundle.model, optimizer, scheduler, resume.saved if resume else None)
    # Anchors: the master weights as they are now, before a checkpoint is restored into them.
    anchors = Anchors(cfg, engine, ctx.rank, fisher, ctx.all_reduce_sum) if cfg.regularization.anchored \
        else None
    del fisher
    tracking = open_tracking(cfg, ctx.store, engine.layout.record(), ctx.tracking_group,
                             resume.saved["step"] if resume else None) \
        if ctx.is_main else Tracking([])
    log = MetricsLog(ctx.run_dir / METRICS, enabled=ctx.is_main, listener=tracking.log)
    objective.start(ctx, bundle, engine, data)  # before a checkpoint is restored (dpo: its reference)
    run = Run(cfg, ctx, bundle, base_path, data, plan, engine, objective, log, Uploader(), peak, tracking, anchors)
    run.say(bundle.info.describe())
    if cfg.train.compile:
        compile_model(bundle, ctx.device, run.say)
    run.say(f"data: {data.format}, " + plan.describe(cfg))
    if data.stats.get("skipped_rows"):
        run.say(f"data: skipped {data.stats['skipped_rows']} bad rows (data.skip_bad_rows)")
    if "sources" in data.stats:  # a trial's own weights (a search may vary them), over the shared rows
        data.stats["sources"] = with_weights(data.stats["sources"], cfg.data)
        for source in data.stats["sources"]:
            run.say(f"data: {source_line(source)}")
    if data.stats.get("prepared"):
        run.say(f"data: {data.stats['train_rows']} training rows {data.stats['prepared']}")
    regularization = describe_regularization(cfg, data.replay and len(data.replay), anchors)
    if regularization:
        run.say(regularization)
    if data.stats.get("truncated"):
        run.say(f"data: {data.stats['truncated']} examples longer than data.max_length {cfg.data.max_length} "
                "were cut to it")
    if data.stats.get("dropped_no_target"):
        run.say(f"data: {data.stats['dropped_no_target']} examples dropped: no token to learn within "
                f"data.max_length {cfg.data.max_length} (raise it to keep them)")
    return run


def restore(run: Run, resume: ResumePoint) -> TrainState:
    """Weights, optimizer, schedule and RNG as they were at the checkpoint; the log cut back to it."""
    ctx = run.ctx
    reached = run.log.last_step()  # before the log is cut back: the steps this resume trains again
    run.engine.load(resume.path, resume.saved)
    checkpoint.restore_rng(resume.path, ctx.rank)
    state = TrainState.of_checkpoint(resume.saved)
    if ctx.is_main and (resume.path / METRICS).is_file():  # the log as it was at the checkpoint
        safewrite.copy_file(resume.path / METRICS, run.log.path, run.log.root, "the metrics log")
    run.log.truncate_after(state.step)
    if ctx.is_main:  # what a tracker missed of the steps before the checkpoint (it was stopped before sending)
        run.tracking.catch_up(read_metrics(run.log.path))
    before, now = resume.saved.get("world_size"), ctx.world_size
    why = (ctx.restart_cause() if ctx.is_main else None) or "the run was started again"
    lost = max(reached - state.step, 0) if reached is not None else None
    run.log.append({"step": state.step, "event": "resume", "checkpoint": resume.path.name, "from_world_size": before,
                    **run.engine.layout.record(), "why": why, "steps_lost": lost})
    resized = f", {before} -> {now} workers" if before is not None and before != now else ""
    told = f"; {lost} step{'s' * (lost != 1)} lost" if lost is not None else ""
    run.say(f"resuming from {ctx.store.path(step_dir(state.step))} (step {state.step}{resized}): {why}{told}")
    return state


def begin(run: Run, state: TrainState) -> None:
    """A new run: a fresh log, the retention loss before training, the baseline evaluation."""
    data = run.data
    run.log.reset()
    if data.retention is not None:
        state.retention_before, state.retention_before_by_source, _ = run.evaluate("retention")
    run.log.append({"step": 0, "event": "start", **run.bundle.info.record(), **data.stats, **run.ctx.topology(),
                    "retention_loss_before": state.retention_before,
                    **named("retention_loss_before", state.retention_before_by_source)})
    if data.eval is not None:
        evaluate_and_report(run, state, 0)  # what every later evaluation is compared with


# ---------------------------------------------------------------- one step


def train_step(run: Run, state: TrainState, step: int) -> None:
    started = time.perf_counter()
    epoch, index = run.plan.position(step)
    # What the objective trains on this step: the rows' micro-batches, or (grpo) what it sampled from them.
    batches = run.objective.rollout(step_batches(run, epoch, index) + replay_batches(run, step), step)
    losses, grad_norm, pulled = optimizer_step(run, batches)
    figures = run.objective.step_figures()
    # Reduced over ranks (the loss) or global (DeepSpeed's grad norm): every rank stops together.
    for what, value in (("training loss", losses["loss"]), ("gradient norm", grad_norm)):
        if value is not None and not math.isfinite(value):
            stop_diverged(run, step, what, value, good_before=step - 1)
    ctx = run.ctx
    tokens = ctx.all_reduce_sum(sum(b["n_tokens"] for b in batches if not b.get("ignore")))
    state.step, state.tokens_seen = step, state.tokens_seen + tokens
    elapsed = time.perf_counter() - started
    record = {"step": step, "epoch": epoch, **losses, **figures, "lr": run.engine.lr, "grad_norm": grad_norm, **pulled,
              "tokens_per_s": tokens / elapsed, "step_time_s": elapsed, "tokens_seen": state.tokens_seen,
              "peak_memory_gib": run.peak.gib()}
    run.log.append(record)
    run.progress.step(record)


def step_batches(run: Run, epoch: int, index: int) -> list[dict]:
    """This rank's micro-batches of global batch `index` of `epoch`: its part of the world's
    batch when every rank holds every row (the same batch at any world size), else the next
    rows of its own Ray Data shard in a (seed, rank, epoch) order."""
    cfg, ctx, rows = run.cfg, run.ctx, run.data.train
    mine = rank_rows(run.order(epoch), index, cfg.train.batch_size, ctx.rank, ctx.world_size, run.data.shared)
    micro = cfg.train.micro_batch_size
    return [collate(rows, mine[i : i + micro], pad_id(run)) for i in range(0, len(mine), micro)]


def replay_batches(run: Run, step: int) -> list[dict]:
    """This rank's replay rows of step `step` (regularization.replay), as micro-batches of
    their own. The global batch's replay rows are `fraction` of its rows, drawn from one
    stream of the replay text (by train.seed); each rank takes every world_size-th: the same
    rows whatever the number of workers."""
    replay = run.cfg.regularization.replay
    if replay is None:
        return []
    cfg, ctx, rows = run.cfg, run.ctx, run.data.replay
    drawn = replay_order(replay_share(step, cfg.train.batch_size, replay.fraction), len(rows), run.replay_order)
    mine, micro = drawn[ctx.rank :: ctx.world_size], cfg.train.micro_batch_size
    batches = [dict(collate(rows, mine[i : i + micro], pad_id(run)), replay=True) for i in range(0, len(mine), micro)]
    # Every rank runs as many micro-batches (under ZeRO each is collective): one short of rows
    # runs a row it ignores.
    short = math.ceil(math.ceil(len(drawn) / ctx.world_size) / micro) - len(batches)
    if short > 0:
        batches += [dict(collate(rows, drawn[:1], pad_id(run)), replay=True, ignore=True)] * short
    return batches


def optimizer_step(run: Run, batches: list[dict]) -> tuple[dict, float, dict]:
    """One update over this rank's micro-batches. Returns the global batch's loss (and, with
    replay rows, theirs apart) and the objective's metrics, the grad norm, and the anchors'
    penalty before the update."""
    cfg, ctx, objective = run.cfg, run.ctx, run.objective
    # Normalised by the global count (the objective's: target tokens, pairs): the same loss however the
    # batch is split. Gradients are averaged over ranks (every engine), hence the factor world_size.
    global_count = ctx.all_reduce_sum(sum(objective.count(b) for b in batches if not b.get("ignore")))
    # Task rows' loss sum and count, replay rows' loss sum and count, the objective's metric sums.
    summed = np.zeros(4 + len(objective.step_metrics))
    pulled: dict = {}

    def micro_batch_loss(forward, batch: dict) -> torch.Tensor:
        with autocast(cfg, ctx.device):
            loss, metrics = objective.loss(forward, batch, ctx.device)
        if batch.get("ignore"):
            return loss * 0.0
        at = 2 if batch.get("replay") else 0
        summed[at : at + 2] += (float(loss.detach()), objective.count(batch))
        summed[4:] += metrics
        return loss * ctx.world_size / global_count

    def before_update() -> None:
        if run.anchors is not None:
            pulled.update(run.anchors.pull(run.engine.lr))

    grad_norm = run.engine.step(batches, micro_batch_loss, before_update)
    totals = ctx.all_reduce_sum(summed)
    task_sum, task_count, replay_sum, replay_targets = totals[:4]
    losses = {"loss": task_sum / max(task_count, 1),
              **{m: v / max(task_count, 1) for m, v in zip(objective.step_metrics, totals[4:])}}
    if replay_targets:
        losses["replay_loss"] = replay_sum / replay_targets
    return losses, grad_norm, pulled


# ---------------------------------------------------------------- evaluations, checkpoints


def evaluate_and_report(run: Run, state: TrainState, step: int) -> None:
    """Eval loss (and, with data.retention, forgetting) into the log, the orchestrator and the terminal."""
    ctx, data = run.ctx, run.data
    eval_loss, by_source, scores = run.evaluate("eval")
    for name, value in {"": eval_loss, **by_source}.items():
        if not math.isfinite(value):
            stop_diverged(run, step, f"eval loss{' of ' + name if name else ''}", value, good_before=step)
    record = {"step": step, "eval_loss": eval_loss, **named("eval_loss", by_source), **scores}
    line = f"step {step}: eval loss {eval_loss:.4f}" + run.objective.describe(scores) + told(by_source, ".4f")
    if step == 0:
        state.eval_start = {m: record[m] for m in run.objective.transfer if record.get(m) is not None}
    else:
        state.eval_loss, state.eval_by_source, state.eval_metrics = eval_loss, by_source, scores
        state.best_eval_loss = eval_loss if state.best_eval_loss is None else min(state.best_eval_loss, eval_loss)
        if data.retention is not None:  # forgetting as training goes, not only at the end
            state.retention_loss, state.retention_by_source, _ = run.evaluate("retention")
            if not math.isfinite(state.retention_loss):
                stop_diverged(run, step, "retention loss", state.retention_loss, good_before=step)
            forgetting = forgetting_by_source(state)
            record.update(retention_loss=state.retention_loss, forgetting=state.retention_loss - state.retention_before,
                          **named("retention_loss", state.retention_by_source), **named("forgetting", forgetting))
            line += f", forgetting {record['forgetting']:+.4f}" + told(forgetting, "+.4f")
    run.log.append(record)
    # The orchestrator (Ray Train, and Tune's early stopping above it) sees every evaluation.
    ctx.report({**record, "tokens_seen": state.tokens_seen, "trainable_params": run.bundle.info.trainable_params,
                "total_steps": run.plan.total_steps})
    run.progress.write(line)


def named(metric: str, by_source: Optional[dict]) -> dict:
    """Per-source figures as metrics: metric/<source name>."""
    return {f"{metric}/{name}": value for name, value in (by_source or {}).items()}


def told(by_source: Optional[dict], fmt: str) -> str:
    """Per-source figures for the terminal: " (code 1.2345, chat 2.3456)"."""
    return f" ({', '.join(f'{n} {v:{fmt}}' for n, v in by_source.items())})" if by_source else ""


def forgetting_by_source(state: TrainState) -> dict:
    before = state.retention_before_by_source or {}
    return {n: v - before[n] for n, v in (state.retention_by_source or {}).items() if n in before}


def save_checkpoint(run: Run, state: TrainState, step: int) -> None:
    """Stage this rank's part of the checkpoint; the uploader commits it in the background."""
    started = time.perf_counter()
    checkpoint.save_checkpoint(run.ctx.store, step, run.engine, {**asdict(state), **run.engine.layout.record()},
                               run.cfg.checkpoint.keep, run.ctx, run.uploader)
    run.log.append({"step": step, "event": "checkpoint_staged", "stall_s": time.perf_counter() - started})


def note_uploads(run: Run, step: int) -> None:
    """Surface the background jobs: a failure stops the run; finished checkpoints are logged."""
    run.uploader.check()
    for done in run.uploader.drain():
        base_size = run.base_size
        run.checkpoint_sizes = {"checkpoint_bytes": done["bytes"], "base_model_bytes": base_size}
        run.checkpoint_seconds = done["seconds"]
        run.log.append({"step": step, "event": "checkpoint", **done, "base_model_bytes": base_size,
                        "upload_mib_per_s": done["uploaded"] / 2**20 / done["upload_s"] if done["uploaded"] else None})
        size = checkpoint.describe_size(done["bytes"], base_size, run.bundle.info.method)
        run.progress.write(f"checkpoint step {done['step']} complete: {size} in {done['seconds']:.1f} s")


def stop_on_notice(run: Run, state: TrainState, step: int, notice: Notice) -> None:
    """Asked to stop (SIGTERM, a node's preemption notice, a resize): a checkpoint at this step
    (unless one was just staged), committed before the run (or this worker group) ends, so that
    the resume loses no step. A deadline too near for that is said with the figures; the newest
    complete checkpoint stays the resume point until this one is complete."""
    started = time.time()
    if notice.deadline is not None:
        left, took = notice.deadline - started, run.checkpoint_seconds
        if took is None or took > left:
            newest = [m["step"] for m in complete_markers(run.ctx.store)]
            run.progress.write(f"stopping: {notice.reason}: {left:.0f} s left, and "
                               + (f"a checkpoint took {took:.1f} s" if took is not None else "no checkpoint is timed yet")
                               + f": step {step}'s may not be committed in time; if not, the run resumes from "
                               + (f"step {newest[-1]}" if newest else "the start") + " (the newest complete checkpoint)")
            run.log.append({"step": step, "event": "short_notice", "seconds_left": left, "checkpoint_s": took})
    if not run.checkpoints_at(step):
        save_checkpoint(run, state, step)
    run.uploader.flush()
    note_uploads(run, step)
    committed = time.time()
    run.log.append({"step": step, "event": "stopped", "reason": notice.reason, "commit_s": committed - started,
                    **({"deadline_left_s": notice.deadline - committed} if notice.deadline is not None else {})})
    run.progress.close()
    then = ("Ray Train restarts the workers on the nodes there are" if notice.restarts else
            "run the same command again to resume from it")
    raise StoppedOnNotice(f"{notice.reason}: after step {step} of {run.plan.total_steps}, with a checkpoint "
                          f"({run.ctx.store.path(step_dir(step))}) committed in {committed - started:.1f} s; {then}, "
                          "no step lost", notice)


# ---------------------------------------------------------------- divergence


def stop_diverged(run: Run, step: int, what: str, value: float, good_before: int) -> None:
    """A loss (or gradient norm) that is not a number stops the run at this step, on every rank
    (each checks a value every rank shares), with one message: what diverged, the last good
    checkpoint, what to lower. Nothing of the diverged state is written: no checkpoint of this
    step, no final/, no summary; the checkpoints already made are kept. `good_before`: the
    newest step whose weights are known good (the weights saved at step k gave the loss of step
    k + 1, so a training loss that diverges at step n condemns the checkpoint of step n - 1)."""
    cfg, ctx = run.cfg, run.ctx
    run.log.append({"step": step, "event": "diverged", "what": what, "value": str(value)})
    try:  # the checkpoints staged before this step, committed (or their failure told) first
        run.uploader.flush()
    except Exception:  # noqa: BLE001 - the stop's message matters more than a late upload
        pass
    good = [m["step"] for m in complete_markers(ctx.store) if m["step"] < good_before]
    kept = (f"the last good checkpoint is {ctx.store.path(step_dir(good[-1]))}"
            + (" (newer ones hold the diverged weights)" if any(
                m["step"] >= good_before for m in complete_markers(ctx.store)) else "")
            if good else "no checkpoint before it is left")
    t = cfg.train
    if step == 0:
        fix = ("before any step, so it is the model's or the data's: check model.dtype (float16 overflows where "
               "bfloat16 does not) and the weights of model.name_or_path")
    else:
        fix = (f"lower train.lr (now {t.lr:g}; e.g. {t.lr / 10:g})"
               + (f", lengthen train.warmup_steps (now {t.warmup_steps})" if t.warmup_steps < 100 else "")
               + (", set train.grad_clip (e.g. 1.0)" if t.grad_clip is None else f", or lower train.grad_clip "
                  f"(now {t.grad_clip:g})")
               + "; then rerun with --restart")
    raise UserError(f"{ctx.store.url}: the {what} is {value} at step {step} of {run.plan.total_steps}: the run "
                    f"diverged and stopped, without writing final/ or a checkpoint of this state; {kept}. To go "
                    f"on, {fix}")


# ---------------------------------------------------------------- finish


def finish(run: Run, state: TrainState) -> dict:
    """Every checkpoint committed, then the final model, forgetting, summary and plots."""
    cfg, ctx, data = run.cfg, run.ctx, run.data
    run.progress.close()
    run.uploader.flush()  # every checkpoint complete before the run counts as finished
    note_uploads(run, run.plan.total_steps)
    summary = {"steps": run.plan.total_steps, "tokens_seen": state.tokens_seen, **run.bundle.info.record(),
               **(run.checkpoint_sizes or {}), "peak_memory_gib": run.peak.gib(),
               **({"data_sources": data.stats["sources"]} if "sources" in data.stats else {})}
    if data.eval is not None:  # evaluated at the last step: the state holds the final numbers
        summary.update(eval_loss=state.eval_loss, best_eval_loss=state.best_eval_loss)
        if state.eval_by_source:
            summary["eval_loss_by_source"] = state.eval_by_source
        summary.update(state.eval_metrics or {})  # the objective's figures (eval_ppl, eval_accuracy, ...)
        worse = negative_transfer(state, run.objective)
        if worse:
            summary["negative_transfer"] = worse
    if data.retention is not None:
        if data.eval is None:
            state.retention_loss, state.retention_by_source, _ = run.evaluate("retention")
            if not math.isfinite(state.retention_loss):
                stop_diverged(run, run.plan.total_steps, "retention loss", state.retention_loss,
                              good_before=run.plan.total_steps)
        summary.update(retention_loss_before=state.retention_before, retention_loss_after=state.retention_loss,
                       forgetting=state.retention_loss - state.retention_before)
        if state.retention_by_source:
            before, after = state.retention_before_by_source, state.retention_by_source
            summary["retention_by_source"] = {n: {"before": before[n], "after": after[n], "forgetting": f}
                                              for n, f in forgetting_by_source(state).items()}
    model_state = run.engine.model_state()  # collective under ZeRO-3
    if ctx.is_main:
        restarts = [{k: r.get(k) for k in ("step", "from_world_size", "world_size", "why", "steps_lost")}
                    for r in read_metrics(run.log.path) if r.get("event") == "resume"]
        if restarts:  # each resume and resize: where, from and to how many workers, why, the steps it cost
            summary["restarts"] = restarts
        final = save_final(ctx.run_dir, cfg, run.bundle.model, run.bundle.tokenizer, run.base_path, model_state)
        summary["final_size_bytes"] = size_bytes(final)
        write_summary(ctx.run_dir, summary)
        plots = plot_run(ctx.run_dir)
        unsent = run.tracking.end("FINISHED", [ctx.run_dir / SUMMARY, *plots])
        if any(unsent.values()):  # what a tracker missed (all of it is in metrics.jsonl)
            summary["tracking_unsent"] = unsent
            write_summary(ctx.run_dir, summary)
        publish(ctx.store)
    return summary


def negative_transfer(state: TrainState, objective: Objective) -> dict:
    """The objective's `transfer` metrics before training and at the end, where the end is
    worse (the eval loss higher, a classifier's accuracy lower); empty where none is."""
    worse = {}
    now = {"eval_loss": state.eval_loss, **(state.eval_metrics or {})}
    for metric, start in (state.eval_start or {}).items():
        end = now.get(metric)
        if metric in objective.transfer and end is not None and (
                end > start if objective.metrics[metric] == "min" else end < start):
            worse.update({f"{metric}_start": start, f"{metric}_end": end})
    return worse


def pad_id(run: Run) -> int:
    return run.bundle.tokenizer.pad_token_id


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
