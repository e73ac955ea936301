"""Regenerates the bundled demo data (deterministic): python data/demo/make_data.py

The task is one a tiny model can master on a CPU in minutes, so that learning is
visible in `ftdist generate`: reverse a string of digits.
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


if __name__ == "__main__":
    main()
