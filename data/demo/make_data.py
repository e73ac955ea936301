"""Regenerates the bundled demo data (deterministic): python data/demo/make_data.py

The task is one a tiny model can master on a CPU in minutes, so that learning is
visible in `ftdist generate`: reverse a string of digits. check-*.jsonl classify such
reversals as right or wrong (task: classification), on the demo model's features;
pairs-*.jsonl prefer the right reversal to a wrong one (objective: dpo, after the demo's SFT).
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent


def example(rng: random.Random) -> dict:
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 6)))
    return {"prompt": f"reverse {digits} =", "completion": f" {digits[::-1]}"}


def main() -> None:
    rng = random.Random(1234)
    for name, n in (("train", 3000), ("eval", 100)):
        with (HERE / f"{name}.jsonl").open("w") as f:
            for _ in range(n):
                f.write(json.dumps(example(rng)) + "\n")
    # The same task in the other two formats, for tests and as examples.
    with (HERE / "chat.jsonl").open("w") as f:
        for _ in range(300):
            ex = example(rng)
            messages = [{"role": "user", "content": ex["prompt"]}, {"role": "assistant", "content": ex["completion"].strip()}]
            f.write(json.dumps({"messages": messages}) + "\n")
    with (HERE / "text.jsonl").open("w") as f:
        for _ in range(300):
            ex = example(rng)
            f.write(json.dumps({"text": ex["prompt"] + ex["completion"]}) + "\n")
    # A classification task on the same strings (task: classification): is the reversal right?
    # Wrong answers differ from the right one in two digits swapped or one digit changed.
    for name, n in (("check-train", 2000), ("check-eval", 200)):
        with (HERE / f"{name}.jsonl").open("w") as f:
            for i in range(n):
                ex = example(rng)
                answer = ex["completion"].strip()
                if i % 2:
                    f.write(json.dumps({"text": ex["prompt"] + " " + wrong(answer, rng), "label": "wrong"}) + "\n")
                else:
                    f.write(json.dumps({"text": ex["prompt"] + " " + answer, "label": "right"}) + "\n")
    # Preference pairs on the same task (objective: dpo): the right reversal chosen over a wrong one.
    pairs_rng = random.Random(5678)  # its own stream: the files above stay as they were
    for name, n in (("pairs-train", 1000), ("pairs-eval", 100)):
        with (HERE / f"{name}.jsonl").open("w") as f:
            for _ in range(n):
                ex = example(pairs_rng)
                answer = ex["completion"].strip()
                f.write(json.dumps({"prompt": ex["prompt"], "chosen": " " + answer,
                                    "rejected": " " + wrong(answer, pairs_rng)}) + "\n")


    # Longer strings than the SFT data has (7 digits), as prompts (objective: grpo, after the demo's
    # SFT): the SFT model gets some of them right, and learns the rest from an exact-match reward.
    long_rng = random.Random(91011)  # its own stream: the files above stay as they were
    for name, n in (("long-train", 1000), ("long-eval", 100)):
        with (HERE / f"{name}.jsonl").open("w") as f:
            for _ in range(n):
                digits = "".join(long_rng.choice("0123456789") for _ in range(7))
                f.write(json.dumps({"prompt": f"reverse {digits} =", "completion": f" {digits[::-1]}"}) + "\n")


def wrong(answer: str, rng: random.Random) -> str:
    """The answer with one mistake in it (never the answer itself)."""
    while True:
        digits = list(answer)
        i, j = rng.sample(range(len(digits)), 2)
        if rng.random() < 0.5:
            digits[i], digits[j] = digits[j], digits[i]
        else:
            digits[i] = rng.choice([d for d in "0123456789" if d != digits[i]])
        if "".join(digits) != answer:
            return "".join(digits)


if __name__ == "__main__":
    main()
