"""A focal loss for supervised fine-tuning (Lin et al., 2017): each target token's
cross-entropy weighted by (1 - p)^gamma, p the probability the model gives that token, so
that the tokens it already predicts well count less than the ones it gets wrong.

    objective: focal:FocalLoss     # this file, focal.py, in the directory ftdist runs from
    objective_args:
      gamma: 2.0                   # 0: plain cross-entropy

It trains on the rows sft trains on (text, prompt/completion, chat), and reports the mean
probability of the target tokens, which `ftdist tune` maximises unless tune.metric says
otherwise (the first of its metrics).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ftdist.objectives.base import ObjectiveBase


class FocalArgs(BaseModel):
    """objective_args: of the focal loss."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, never ignored
    gamma: float = Field(2.0, ge=0)  # how much less a well-predicted token counts (0: cross-entropy)


class FocalLoss(ObjectiveBase):
    name = "focal"
    # What an evaluation reports and which way is better: the first is Tune's default metric.
    metrics = {"eval_target_prob": "max", "eval_loss": "min"}
    # Summed per micro-batch by `loss`, averaged over the target tokens (ObjectiveBase.count):
    # logged at every step as target_prob, at every evaluation as eval_target_prob.
    step_metrics = ("target_prob",)
    told = ("target_prob",)  # on each step's line, each evaluation's line and the CLI's last lines
    Args = FocalArgs

    def loss(self, forward, batch, device):
        """The summed focal loss over the batch's target tokens, and the sum of their probabilities."""
        import numpy as np
        import torch

        from ftdist.data.rows import IGNORE
        from ftdist.objectives.tokens import forward_inputs

        logits = forward(**forward_inputs(batch, device, self.attention)).logits
        targets = batch["targets"].to(device)
        learn = targets != IGNORE
        logp = torch.log_softmax(logits[learn].float(), dim=-1).gather(1, targets[learn][:, None]).squeeze(1)
        p = logp.exp()
        loss = -((1 - p) ** self.args.gamma * logp).sum()
        return loss + logits.sum() * 0.0, np.array([float(p.detach().sum())])

    def logits_bytes(self, tokens, vocab, dtype_bytes):
        """Every logit, its log-softmax and their gradients, in fp32 (not computed in chunks)."""
        return 3 * tokens * vocab * 4
