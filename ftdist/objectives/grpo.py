"""objective: grpo. Reinforcement learning from rewards on the one loop (DeepSeekMath's GRPO, as
TRL's GRPOTrainer computes it).

Each step, on every rank, for its own prompts (a prompt's group never spans ranks):

  sample     grpo.num_generations completions per prompt from the policy (temperature, top_p,
             max_new_tokens), a micro-batch's prompts together, seeded by (train.seed, the
             batch, the micro-batch's place in it): a resumed run samples what it would have,
             and so does a run at another world size (the same micro_batch_size); under ZeRO-3
             with the weights gathered (the engine's `generating`)
  score      each completion by each of grpo.rewards (ftdist.objectives.rewards); their weighted
             sum is its reward (a completion no reward scores: none, and no advantage)
  advantage  its reward less its group's mean, divided by the group's standard deviation
             (grpo.scale_rewards)
  update     grpo.num_iterations optimizer steps on these completions (the rows' batch plan:
             ftdist.config.plan, steps_per_batch), each with the loss per completion token

               ratio = exp(logp - logp_sampling)        (1 on the first update of a batch)
               loss  = -min(ratio A, clip(ratio, 1 - epsilon, 1 + epsilon_high) A) + beta kl
               kl    = exp(ref - logp) - (ref - logp) - 1            (k3, DeepSeekMath's)

             normalised as grpo.loss says: token (the batch's completion tokens), sequence
             (each completion's mean, then their mean), dr_grpo (completions x max_new_tokens).

The reference (grpo.beta > 0) is DPO's: the adapters switched off (lora, qlora), or a frozen
copy of the starting model (full; partitioned like the policy under ZeRO-3). Evaluation samples
one greedy completion per held-out prompt: eval_reward is their mean reward, eval_accuracy the
share whose first reward reaches grpo.accuracy_at, and eval_loss is -eval_reward (lower is
better, as a loss is everywhere it is compared).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Protocol

from ftdist.objectives.base import ObjectiveBase
from ftdist.objectives.chunks import chunk_logit_bytes
from ftdist.objectives.dpo import AdaptersOff, ModelReference, frozen_reference
from ftdist.objectives.rewards import load_rewards, score

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from ftdist.config.schema import Config, GrpoConfig

# Figures of each step, reduced over ranks (step_figures): name -> how it is made from the sums.
STD_EPS = 1e-4  # TRL's: a group whose completions score alike gets advantages near 0, not a division by 0


# ---------------------------------------------------------------- the arithmetic (TRL's, per token)


def group_advantages(rewards: "torch.Tensor", group: int, scale: bool = True) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Per completion (groups of `group` consecutive completions of one prompt): its reward less
    its group's mean, over the group's standard deviation (unbiased) + 1e-4 where `scale`; and
    whether its group's rewards have no spread. NaN rewards (not scored) are left out of the
    mean and deviation, and get advantage 0."""
    import torch

    grouped = rewards.view(-1, group)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    present = (~torch.isnan(grouped)).sum(1, keepdim=True)
    variance = torch.nanmean((grouped - mean) ** 2, dim=1, keepdim=True) * present / (present - 1).clamp(min=1)
    std = torch.where(present > 1, variance.sqrt(), torch.zeros_like(variance))
    advantages = grouped - mean
    if scale:
        advantages = advantages / (std + STD_EPS)
    no_spread = torch.isclose(std, torch.zeros_like(std)).expand_as(grouped)
    return torch.nan_to_num(advantages, nan=0.0).flatten(), no_spread.flatten()


def kl_k3(logps: "torch.Tensor", ref_logps: "torch.Tensor") -> "torch.Tensor":
    """Per token, the k3 estimate of KL(policy || reference): exp(ref - logp) - (ref - logp) - 1."""
    import torch

    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def token_losses(logps: "torch.Tensor", old_logps: "torch.Tensor", advantages: "torch.Tensor", epsilon: float,
                 epsilon_high: float, beta: float = 0.0, ref_logps: Optional["torch.Tensor"] = None,
                 kl_correction: bool = False) -> tuple["torch.Tensor", "torch.Tensor", Optional["torch.Tensor"]]:
    """Per completion token: the clipped policy-gradient loss (plus beta x k3 KL, weighted by the
    ratio where `kl_correction`: the completions came from the sampling policy, not this one),
    whether its ratio was clipped where the clip changed the loss, and its KL (None without a
    reference)."""
    import torch

    ratio = torch.exp(logps - old_logps)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    losses = -torch.min(ratio * advantages, clipped_ratio * advantages)
    clipped = ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon_high) & (advantages > 0))
    kl = None
    if beta:
        kl = kl_k3(logps, ref_logps)
        if kl_correction:
            kl = kl * ratio
        losses = losses + beta * kl
    return losses, clipped, kl


def summed_loss(losses: "torch.Tensor", sequence: "torch.Tensor", n_sequences: int, kind: str) -> "torch.Tensor":
    """A micro-batch's loss as a sum, which the loop divides by the global count (`count_of`):
    token and dr_grpo sum every token's loss; sequence sums each completion's mean."""
    import torch

    if kind != "sequence":
        return losses.sum()
    sums = torch.zeros(n_sequences, dtype=losses.dtype, device=losses.device).index_add(0, sequence, losses)
    lengths = torch.zeros(n_sequences, dtype=losses.dtype, device=losses.device).index_add(
        0, sequence, torch.ones_like(losses))
    return (sums / lengths.clamp(min=1)).sum()


def count_of(kind: str, tokens: int, sequences: int, max_new_tokens: int) -> int:
    """What a micro-batch's loss sum is normalised by, summed over the global batch."""
    return tokens if kind == "token" else sequences if kind == "sequence" else sequences * max_new_tokens


# ---------------------------------------------------------------- sampling


class Generator(Protocol):
    """What samples completions: a faster one (vLLM) may stand in for transformers' own."""

    def generate(self, model: "nn.Module", prompts: list[list[int]], n: int, seed: Optional[int]) -> list[list[int]]:
        """`n` completions of each prompt (prompt-major), each up to its first EOS (kept),
        sampled under `seed` (None: greedy)."""


class TransformersGenerator:
    """model.generate on the prompts together (left-padded), with the KV cache."""

    def __init__(self, settings: "GrpoConfig", pad_id: int, eos_id: Optional[int]):
        self.settings, self.pad_id, self.eos_id = settings, pad_id, eos_id

    def generate(self, model: "nn.Module", prompts: list[list[int]], n: int, seed: Optional[int]) -> list[list[int]]:
        import torch

        device = next(model.parameters()).device
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        s = self.settings
        how = {"do_sample": False} if seed is None else \
            {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p, "top_k": 0}
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=s.max_new_tokens,
                                 min_new_tokens=1, num_return_sequences=n, pad_token_id=self.pad_id,
                                 eos_token_id=self.eos_id, use_cache=True, **how)
        completions = []
        for row in out[:, width:].tolist():
            if self.eos_id is not None and self.eos_id in row:
                row = row[: row.index(self.eos_id) + 1]
            completions.append(row)
        return completions


def sampling_seed(seed: int, batch: int, first: int) -> int:
    """The seed of a micro-batch's sampling: by its batch (its place in the run, not the step it
    is sampled at) and its first prompt's place in the global batch. A rank's micro-batches are
    its contiguous part of the global batch, so with the same micro_batch_size the micro-batches,
    their seeds and their samples are the same at any world size, and after a resume."""
    import numpy as np

    return int(np.random.SeedSequence([seed, batch, first]).generate_state(1, np.uint64)[0] >> 1)


# ---------------------------------------------------------------- the objective


@dataclass
class Rollout:
    """A batch's completions as update micro-batches, and what the step reports of them."""

    batch: int  # which batch of rows (steps_per_batch steps share one)
    first_step: int  # the step that sampled it
    micro_batches: list[dict]
    sums: "np.ndarray"  # FIGURE_SUMS, this rank's
    samples: list[dict]
    # This rank's seconds sampling, scoring, and computing the sampling policy's and the reference's
    # log-probs (the step that made the batch; the rest of its step_time_s is the update).
    seconds: dict


class Grpo(ObjectiveBase):
    """Prompt rows; each step's micro-batches are completions sampled from them (rollout)."""

    name = "grpo"
    section = "grpo"
    rows = "prompts"
    formats = ("prompt",)
    metrics = {"eval_reward": "max", "eval_loss": "min", "eval_accuracy": "max", "eval_completion_length": "min"}
    told = ("reward", "accuracy")
    transfer = ("eval_reward",)
    evaluation_size = 2  # per batch: completions at grpo.accuracy_at, their tokens

    def __init__(self, cfg: "Config", args=None):
        super().__init__(cfg, args)
        self.settings = cfg.grpo
        self.rewards = load_rewards(cfg.grpo.rewards)
        self.sequences_per_row = cfg.grpo.num_generations
        self.epsilon_high = cfg.grpo.epsilon_high if cfg.grpo.epsilon_high is not None else cfg.grpo.epsilon
        self.reference = None
        self.frozen: Optional[tuple] = None
        self.rollout_now: Optional[Rollout] = None
        self.update_sums = None  # this step's [clipped tokens, kl sum, tokens]
        self.step_now = 0
        self.evaluation = None  # the last evaluation batch's sums

    @classmethod
    def problem(cls, cfg: "Config") -> Optional[str]:
        g = cfg.grpo
        if not g.rewards:
            return ("objective grpo learns from rewards: set grpo.rewards, e.g. [{function: exact_match, column: "
                    "answer}] or [{function: mypkg.rewards:is_correct}]")
        if g.max_new_tokens >= cfg.data.max_length:
            return (f"grpo.max_new_tokens {g.max_new_tokens} leaves no room for the prompt in data.max_length "
                    f"{cfg.data.max_length} (prompt and completion together): raise data.max_length or lower "
                    "grpo.max_new_tokens")
        if cfg.task != "causal_lm":
            return "objective grpo samples text: use task: causal_lm"
        return None

    # ---- the model
    def make_head(self, model: "nn.Module"):
        """Each completion token's log-prob, in chunks; logits while sampling."""
        from ftdist.model.build import plain_linear_head
        from ftdist.objectives.tokens import LogProbHead

        self.attention = model.config._attn_implementation
        self.head = LogProbHead(plain_linear_head(model, "objective grpo", "objective grpo computes log-probs "
                                                                          "through it in chunks: use a model whose head is"),
                                self.settings.temperature)
        return self.head

    def before_engine(self, model: "nn.Module", dtype: "torch.dtype") -> None:
        if self.settings.beta and self.cfg.method == "full":
            self.frozen = frozen_reference(model, dtype)

    def start(self, ctx, bundle, engine, data) -> None:
        self.ctx, self.engine, self.tokenizer = ctx, engine, bundle.tokenizer
        pad = bundle.tokenizer.pad_token_id if bundle.tokenizer.pad_token_id is not None else \
            bundle.tokenizer.eos_token_id
        self.pad_id = pad
        self.generator: Generator = TransformersGenerator(self.settings, pad, bundle.tokenizer.eos_token_id)
        if self.frozen is not None:
            model, head = self.frozen
            head.temperature = self.settings.temperature
            self.frozen = None
            self.reference = ModelReference(ctx.make_reference(self.cfg, model), head, self.attention)
        elif self.settings.beta:
            self.reference = AdaptersOff(engine.model, engine.forward, self.head, self.attention)

    # ---- a step: sample, score, update
    def rollout(self, batches: list[dict], step: int) -> list[dict]:
        import numpy as np

        batch = (step - 1) // self.settings.num_iterations
        if self.rollout_now is None or self.rollout_now.batch != batch:
            self.rollout_now = self.sample(batches, batch, step)
        self.update_sums, self.step_now = np.zeros(3), step
        return self.rollout_now.micro_batches

    def sample(self, batches: list[dict], batch: int, step: int) -> Rollout:
        import numpy as np
        import torch

        ctx, g = self.ctx, self.settings
        # This rank's prompts are its contiguous part of the global batch (every rank as many).
        first = ctx.rank * sum(len(b["meta"]) for b in batches)
        model = self.engine.model
        was_training = model.training
        model.eval()
        started = time.perf_counter()
        prompts, metas, completions = [], [], []
        with torch.no_grad(), self.engine.generating() as policy:
            for b in batches:
                ids = prompt_ids(b)
                seed = sampling_seed(self.cfg.train.seed, batch, first)
                first += len(ids)
                prompts.append(ids)
                metas.append([json.loads(m) for m in b["meta"]])
                completions.append(self.generator.generate(policy, ids, g.num_generations, seed))
        sampled = time.perf_counter()
        micro, sums, samples = [], np.zeros(len(FIGURE_SUMS) + 2 * len(self.rewards)), []
        for ids, meta, done in zip(prompts, metas, completions):
            table, rewards = self.scored(meta, done, g.num_generations)
            advantages, no_spread = group_advantages(torch.tensor(rewards, dtype=torch.float32), g.num_generations,
                                                     g.scale_rewards)
            sequences = [p for p in ids for _ in range(g.num_generations)]
            update = completion_batch(sequences, done, self.pad_id)
            update["advantages"] = advantages
            micro.append(update)
            kept = [r for r in rewards if not math.isnan(r)]
            values = np.array(table, dtype=np.float64).reshape(len(done), len(self.rewards))
            sums += np.array([len(kept), sum(kept), sum(r * r for r in kept), float(no_spread.sum()),
                              len(done), sum(map(len, done)), *np.nansum(values, axis=0),
                              *(~np.isnan(values)).sum(axis=0)])
            if len(samples) < g.samples_logged:
                samples.extend({"prompt": bounded(meta[j // g.num_generations]["prompt"], 300),
                                "completion": bounded(self.tokenizer.decode(done[j], skip_special_tokens=True), 500),
                                "reward": None if math.isnan(rewards[j]) else rewards[j]}  # None: not scored
                               for j in range(min(g.samples_logged - len(samples), len(done))))
        scored = time.perf_counter()
        # The sampling policy's log-probs (ratios on later updates) and the reference's, before any update.
        if g.num_iterations > 1 or self.reference is not None:
            from ftdist.objectives.tokens import autocast, token_logps

            with torch.no_grad(), autocast(self.cfg, ctx.device):
                for update in micro:
                    if g.num_iterations > 1:
                        update["old_logps"] = token_logps(self.engine.forward, update, ctx.device, self.head,
                                                          self.attention).detach().float()
                    if self.reference is not None:
                        update["ref_logps"] = self.reference.logps(update, ctx.device).detach().float()
        model.train(was_training)
        seconds = {"sample_s": sampled - started, "score_s": scored - sampled,
                   "logps_s": time.perf_counter() - scored}
        return Rollout(batch, step, micro, sums, samples, seconds)

    def scored(self, meta: list[dict], completions: list[list[int]], n: int) -> tuple[list[list[float]], list[float]]:
        """Each completion's scores by each reward, and their weighted sum (NaN where none scored)."""
        chat = isinstance(meta[0]["prompt"], list)
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in completions]
        done = [[{"role": "assistant", "content": t}] for t in texts] if chat else texts
        rows = [m for m in meta for _ in range(n)]
        columns = {k: [r.get(k) for r in rows] for k in dict.fromkeys(k for r in meta for k in r if k != "prompt")}
        names = [f"the prompt {bounded(r['prompt'], 80)!r}" for r in rows]
        table = score(self.rewards, [r["prompt"] for r in rows], done, columns, names)
        totals = []
        for values in table:
            weighted = [w.weight * v for w, v in zip(self.rewards, values) if not math.isnan(v)]
            totals.append(sum(weighted) if weighted else math.nan)
        return table, totals

    def count(self, batch: dict) -> int:
        if "advantages" not in batch:  # an evaluation's prompts
            return len(batch["meta"])
        from ftdist.objectives.tokens import target_count

        return count_of(self.settings.loss, target_count(batch), len(batch["advantages"]), self.settings.max_new_tokens)

    def loss(self, forward, batch: dict, device: "torch.device") -> tuple["torch.Tensor", "np.ndarray"]:
        import numpy as np

        if "advantages" not in batch:
            return self.evaluate(batch, device), np.zeros(0)
        from ftdist.data.rows import IGNORE
        from ftdist.objectives.tokens import token_logps

        g = self.settings
        logps = token_logps(forward, batch, device, self.head, self.attention)
        keep = (batch["targets"] != IGNORE).flatten().nonzero().squeeze(1)
        sequence = (keep // batch["targets"].shape[1]).to(device)
        advantages = batch["advantages"].to(device).index_select(0, sequence)
        old = batch["old_logps"].to(device) if "old_logps" in batch else logps.detach()
        ref = batch["ref_logps"].to(device) if "ref_logps" in batch else None
        losses, clipped, kl = token_losses(logps.float(), old, advantages, g.epsilon, self.epsilon_high, g.beta, ref,
                                           g.kl_correction)
        self.update_sums += (float(clipped.sum()), float(kl.sum()) if kl is not None else 0.0, len(losses))
        return summed_loss(losses, sequence, len(batch["advantages"]), g.loss), np.zeros(0)

    def step_figures(self) -> dict[str, float]:
        """The step's rewards (mean, std, per reward), the share of groups whose completions all
        scored alike (they teach nothing), completion length, KL and clip fraction, over ranks."""
        import numpy as np

        rollout = self.rollout_now
        totals = self.ctx.all_reduce_sum(np.concatenate([rollout.sums, self.update_sums]))
        scored, total, squares, no_spread, completions, tokens = totals[:6]
        k = len(self.rewards)
        per_reward, per_reward_scored = totals[6 : 6 + k], totals[6 + k : 6 + 2 * k]
        clipped, kl, update_tokens = totals[6 + 2 * k:]
        figures = {"zero_spread": no_spread / completions, "completion_length": tokens / completions,
                   "clip_fraction": clipped / max(update_tokens, 1)}
        if scored:  # a step whose completions no reward scored has no reward to report
            mean = total / scored
            figures.update(reward=mean, reward_std=math.sqrt(max(squares / scored - mean * mean, 0) * scored
                                                             / max(scored - 1, 1)))
        if k > 1:  # each reward's mean over the completions it scored
            figures.update({f"reward/{name}": v / n for name, v, n in
                            zip(reward_names(self.rewards), per_reward, per_reward_scored) if n})
        if self.settings.beta:
            figures["kl"] = kl / max(update_tokens, 1)
        if self.step_now == self.rollout_now.first_step:
            figures.update(rollout.seconds)
        if rollout.samples and self.ctx.is_main and self.step_now % self.cfg.train.log_every == 0:
            figures["samples"] = rollout.samples  # a few completions, their prompts and rewards
        return figures

    # ---- evaluation
    def evaluate(self, batch: dict, device: "torch.device") -> "torch.Tensor":
        """One greedy completion per prompt, scored: the batch's summed negative reward (its
        accurate completions and their tokens kept for evaluation_sums)."""
        import torch

        meta = [json.loads(m) for m in batch["meta"]]
        with self.engine.generating() as policy:
            # One prompt at a time: greedy decoding of a prompt then never depends on the padding of
            # the others evaluated beside it (which differs with the world size).
            done = [self.generator.generate(policy, [ids], 1, None)[0] for ids in prompt_ids(batch)]
        table, rewards = self.scored(meta, done, 1)
        accurate = sum(1 for values in table if not math.isnan(values[0]) and values[0] >= self.settings.accuracy_at)
        self.evaluation = (accurate, sum(map(len, done)))
        return torch.tensor(-sum(0.0 if math.isnan(r) else r for r in rewards), dtype=torch.float64)

    def evaluation_sums(self, batch: dict) -> "np.ndarray":
        import numpy as np

        return np.array(self.evaluation, dtype=np.float64)

    def scores(self, loss: float, count: float, sums: "np.ndarray") -> dict[str, float]:
        return {"eval_reward": 0.0 - loss if loss else 0.0, "eval_accuracy": float(sums[0]) / count,
                "eval_completion_length": float(sums[1]) / count}

    def describe(self, scores: dict) -> str:
        return (f", reward {scores['eval_reward']:.4f}, accuracy {scores['eval_accuracy']:.3f}, "
                f"completion length {scores['eval_completion_length']:.1f}")

    # ---- the memory estimate
    def logits_bytes(self, tokens: int, vocab: int, dtype_bytes: int) -> float:
        return chunk_logit_bytes(tokens, vocab, dtype_bytes)

    def reference_bytes(self, total_params: int, weight_bytes: int) -> float:
        return total_params * weight_bytes if self.settings.beta and self.cfg.method == "full" else 0.0

    def generation_bytes(self, model_config, dtype_bytes: int) -> float:
        """Sampling a micro-batch: the KV cache of micro_batch_size x num_generations sequences
        of data.max_length tokens, and one position's logits in fp32 (with the sampler's copies)."""
        sequences = self.cfg.train.micro_batch_size * self.settings.num_generations
        heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
        head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
        cache = 2 * model_config.num_hidden_layers * heads * head_dim * sequences * self.cfg.data.max_length * dtype_bytes
        return cache + 3 * sequences * model_config.vocab_size * 4


# Per rank, summed: completions scored, their rewards' sum and sum of squares, completions in
# groups without spread, completions, completion tokens; then each reward's sum, and how many it scored.
FIGURE_SUMS = ("scored", "reward_sum", "reward_squares", "no_spread", "completions", "completion_tokens")


def reward_names(rewards) -> list[str]:
    """How the log names each reward's figure: a built-in's name or a function's, numbered where
    two share one."""
    names = [r.name.rpartition(":")[2] for r in rewards]
    return [f"{n}_{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def bounded(value, limit: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


def prompt_ids(batch: dict) -> list[list[int]]:
    """Each prompt row's tokens, padding dropped."""
    return [ids[doc >= 0].tolist() for ids, doc in zip(batch["input_ids"], batch["doc"])]


def completion_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict:
    """Prompt + completion sequences as the loop's batches are (one a row, right-padded),
    with targets on the completion tokens only."""
    import torch

    from ftdist.data.rows import IGNORE

    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    n = len(prompts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    targets = torch.full((n, width), IGNORE, dtype=torch.long)
    doc = torch.full((n, width), -1, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        seq = p + c
        ids[i, : len(seq)] = torch.tensor(seq)
        doc[i, : len(seq)] = 0
        positions[i, : len(seq)] = torch.arange(len(seq))
        targets[i, len(p) - 1 : len(seq) - 1] = torch.tensor(c)  # the token after each position
    return {"input_ids": ids, "position_ids": positions, "doc": doc, "targets": targets,
            "n_tokens": int((doc >= 0).sum())}
