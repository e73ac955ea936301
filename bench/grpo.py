"""GRPO (objective: grpo) against TRL's GRPOTrainer on CPU: the same model, prompts, reward and
settings; time per step split into sampling, scoring and the update, and completion tokens
sampled per second.

The model: a Llama of hidden 256, 4 blocks (ftdist's model.init, written once as a transformers
directory both load). The prompts: data/demo/long-train.jsonl (7-digit reversals). Each step: 16
prompts x 8 completions of up to 16 new tokens at temperature 1, the reward `partial_credit`
below, beta 0.04 (a frozen copy of the model as the reference), one update per batch, the loss
normalised per token (ftdist grpo.loss token = TRL loss_type dapo), full fine-tuning, lr 1e-5,
fp32. ftdist: `ftdist train --local` in a process of its own, its per-step figures (sample_s,
score_s, logps_s, step_time_s). TRL: GRPOTrainer with per_device_train_batch_size 64 and 2
accumulation steps (128 completions, 16 prompts per optimizer step), its generation and reward
calls timed in place. The first step of each (warm-up) is left out; medians of the rest.

Goal: ftdist's step time at most TRL's (ratio <= 1.0).

Run: .venv/bin/python bench/grpo.py [--steps N] (`make bench`). Writes bench/results/grpo.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PROMPTS = ROOT / "data" / "demo" / "long-train.jsonl"
SHAPE = {"hidden_size": 256, "num_layers": 4, "num_heads": 8, "vocab_size": 512}
PROMPTS_PER_STEP, GENERATIONS, NEW_TOKENS, BETA, LR = 16, 8, 16, 0.04, 1e-5
GOALS = {"step_time_ratio": 1.0}


def partial_credit(prompts, completions, completion=None, answer=None, **columns):
    """The share of the right answer's places the completion has right (over the longer). The
    answer column is `completion` in ftdist's rows, `answer` in TRL's (which keeps that name)."""
    scores = []
    for said, right in zip(completions, completion if completion is not None else answer):
        said, right = said.strip(), right.strip()
        scores.append(sum(a == b for a, b in zip(said, right)) / max(len(said), len(right), 1))
    return scores


def build_base(out: Path) -> Path:
    """The model both train: ftdist's model.init (a tokenizer trained on the demo data), saved."""
    sys.path.insert(0, str(ROOT))
    from ftdist.config.load import validate_config
    from ftdist.model.source import build_initial_model

    cfg = validate_config({"run": {"name": "base", "output": str(out)},
                           "model": {"init": {"arch": "llama", **SHAPE}},
                           "data": {"train": str(ROOT / "data/demo/train.jsonl"), "max_length": 32}})
    build_initial_model(cfg, out / "base")
    return out / "base"


def ftdist_run(base: Path, steps: int, out: Path) -> list[dict]:
    settings = [f"run.output={out}", "run.name=bench-grpo", "model.init=null", f"model.name_or_path={base}",
                "method=full", "objective=grpo", "model.dtype=float32",
                "grpo.rewards=[{function: 'bench.grpo:partial_credit'}]", f"grpo.num_generations={GENERATIONS}",
                f"grpo.max_new_tokens={NEW_TOKENS}", f"grpo.beta={BETA}", "grpo.loss=token",
                f"data.train={PROMPTS}", "data.format=prompt", "data.eval=null", "data.eval_fraction=0",
                "data.retention=null", "data.max_length=48", f"train.batch_size={PROMPTS_PER_STEP}",
                "train.micro_batch_size=8", f"train.max_steps={steps}", f"train.lr={LR}", "train.warmup_steps=0",
                "train.eval_every=1000", "train.log_every=1000", "checkpoint.every_steps=1000",
                "train.chunked_loss=true"]
    args = [sys.executable, "-m", "ftdist", "train", str(ROOT / "jobs/configs/tiny-demo.yaml"), "--local"]
    for s in settings:
        args += ["--set", s]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if result.returncode:
        raise SystemExit(result.stdout[-2000:] + result.stderr[-3000:])
    records = [json.loads(line) for line in (out / "bench-grpo" / "metrics.jsonl").read_text().splitlines()]
    return [{"step_s": r["step_time_s"], "sample_s": r["sample_s"], "score_s": r["score_s"],
             "logps_s": r["logps_s"], "tokens": r["completion_length"] * PROMPTS_PER_STEP * GENERATIONS}
            for r in records if "sample_s" in r]


TRL_RUN = r"""
import json, sys, time
from pathlib import Path
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer
sys.path.insert(0, sys.argv[1])
from bench.grpo import partial_credit, PROMPTS, PROMPTS_PER_STEP, GENERATIONS, NEW_TOKENS, BETA, LR

base, steps, out = sys.argv[2], int(sys.argv[3]), sys.argv[4]
rows = [{"prompt": r["prompt"], "answer": r["completion"]} for r in map(json.loads, PROMPTS.read_text().splitlines())]
timing = {"generate": 0.0, "reward": 0.0, "tokens": 0}

class Timed(GRPOTrainer):
    def _generate(self, prompts):
        started = time.perf_counter()
        out = super()._generate(prompts)
        timing["generate"] += time.perf_counter() - started
        timing["tokens"] += sum(len(c) for c in out[1]) if isinstance(out, tuple) else 0
        return out

    def _calculate_rewards(self, *args, **kwargs):
        started = time.perf_counter()
        out = super()._calculate_rewards(*args, **kwargs)
        timing["reward"] += time.perf_counter() - started
        return out

steps_seen = []
class Clock(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        self.started = time.perf_counter()
        timing.update(generate=0.0, reward=0.0, tokens=0)
    def on_step_end(self, args, state, control, **kw):
        steps_seen.append({"step_s": time.perf_counter() - self.started, "sample_s": timing["generate"],
                           "score_s": timing["reward"], "tokens": timing["tokens"]})

torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(base)
args = GRPOConfig(output_dir=out, loss_type="dapo", beta=BETA, num_generations=GENERATIONS,
                  per_device_train_batch_size=PROMPTS_PER_STEP * GENERATIONS // 2, gradient_accumulation_steps=2,
                  max_completion_length=NEW_TOKENS, temperature=1.0, top_p=1.0, top_k=0, learning_rate=LR,
                  lr_scheduler_type="constant", warmup_steps=0, max_steps=steps, report_to=[], use_cpu=True,
                  bf16=False, logging_steps=1000, save_strategy="no", use_bias_correction_kl=False,
                  dataloader_num_workers=0, seed=0)
trainer = Timed(model=model, reward_funcs=[partial_credit], args=args, processing_class=tokenizer,
                train_dataset=Dataset.from_list(rows), callbacks=[Clock()])
trainer.train()
print(json.dumps(steps_seen))
"""


def trl_run(base: Path, steps: int, out: Path) -> list[dict]:
    result = subprocess.run([sys.executable, "-c", TRL_RUN, str(ROOT), str(base), str(steps), str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=3600)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def medians(steps: list[dict]) -> dict:
    rest = steps[1:] or steps
    found = {k: round(statistics.median(s[k] for s in rest), 4) for k in rest[0] if k != "tokens"}
    found["update_s"] = round(statistics.median(s["step_s"] - s["sample_s"] - s["score_s"] - s.get("logps_s", 0)
                                                for s in rest), 4)
    tokens = [s["tokens"] / s["sample_s"] for s in rest if s.get("tokens")]
    found["sampled_tokens_per_s"] = round(statistics.median(tokens), 1) if tokens else None
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="steps of each run (the first left out)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        base = build_base(out)
        ours = medians(ftdist_run(base, args.steps, out))
        print("ftdist", json.dumps(ours), flush=True)
        theirs = medians(trl_run(base, args.steps, out / "trl"))
        print("trl", json.dumps(theirs), flush=True)
    ratio = round(ours["step_s"] / theirs["step_s"], 3)
    result = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, CPU",
              "settings": {"shape": SHAPE, "prompts_per_step": PROMPTS_PER_STEP, "generations": GENERATIONS,
                           "max_new_tokens": NEW_TOKENS, "beta": BETA, "lr": LR, "steps": args.steps},
              "ftdist": ours, "trl": theirs, "step_time_ratio": ratio,
              "goals": GOALS, "met": {"step_time_ratio": ratio <= GOALS["step_time_ratio"]}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "grpo.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(f"| {name} | {r['step_s']:.3f} | {r['sample_s']:.3f} | {r['score_s']:.4f} | "
                     f"{r.get('logps_s', 0):.3f} | {r['update_s']:.3f} | {r['sampled_tokens_per_s'] or '-'} |"
                     for name, r in (("ftdist", ours), ("TRL GRPOTrainer", theirs)))
    (RESULTS / "grpo.md").write_text(f"""# GRPO against TRL's GRPOTrainer on CPU

{result['date']}, {result['machine']}; {json.dumps(result['settings'])}. Medians over steps 2..{args.steps}.
TRL's reference log-probs are inside its update column (computed in its step); ftdist's are apart.

| trainer | step s | sampling s | scoring s | sampling and reference log-probs s | update s | sampled tokens/s |
|---|---|---|---|---|---|---|
{rows}

Step time ratio ftdist / TRL: {ratio}. Goals {json.dumps(GOALS)}; met: {json.dumps(result['met'])}
""")
    print((RESULTS / "grpo.md").read_text())


if __name__ == "__main__":
    main()
