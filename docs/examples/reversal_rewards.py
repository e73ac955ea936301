"""A reward of your own for objective grpo (docs/grpo.md): partial credit on the digit-reversal
task, so that a completion that is almost right scores above one that is far off, where an
exact match scores both 0.

    grpo:
      rewards:
        - {function: exact_match, column: completion}
        - {function: docs.examples.reversal_rewards:matching_digits, weight: 0.5}

Called as TRL calls its reward functions: the prompts, the completions, and each other column
of the prompt rows as a list aligned with them (here `completion`, the right answer).
"""


def matching_digits(prompts, completions, completion, **columns):
    """The share of the answer's places that the completion has right, over the longer of
    the two (a missing or extra digit costs its place)."""
    scores = []
    for said, right in zip(completions, completion):
        said, right = said.strip(), right.strip()
        same = sum(a == b for a, b in zip(said, right))
        scores.append(same / max(len(said), len(right), 1))
    return scores
