"""objective: sft. Supervised fine-tuning: the summed cross-entropy over each row's target
tokens (a completion's, a chat's assistant turns', or every token of plain text), normalised
by the target tokens of the global batch; evaluations report the mean loss and its perplexity.
Every default of ObjectiveBase is this objective's."""

from __future__ import annotations

from ftdist.objectives.base import ObjectiveBase


class Sft(ObjectiveBase):
    name = "sft"
