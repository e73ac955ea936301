"""Ray's documented recipe for Hugging Face models, as a user would write it: a TorchTrainer
whose workers each run transformers' Trainer (+ PEFT LoRA), with Ray Train's
RayTrainReportCallback and prepare_trainer ("Get Started with Distributed Training using
Hugging Face Transformers", Ray Train V2 docs).

Used by bench/ray_vs_hf_recipe.py as the reference for ftdist's whole-command time: the same
tiny model (ftdist's <run>/base, a HF directory with its tokenizer), the same LoRA (rank,
alpha, dropout, all linear layers), the same prompt/completion rows with the loss on the
completion (+ EOS) only, truncated to max_length, micro batch 4 x 2 accumulation steps x 2
workers, lr/warmup/cosine schedule, grad clip 1.0, an eval and a checkpoint every 30 steps,
the final adapter saved by rank 0.

Run: python bench/hf_recipe.py --base RUN/base --out DIR [--address ADDR]
Writes DIR/recipe_timing.json (rank 0: per-step times and phase timestamps).
"""

from __future__ import annotations

import argparse
import json
import os
import time

STARTED = time.time()

import ray  # noqa: E402
import ray.train  # noqa: E402
import ray.train.huggingface.transformers  # noqa: E402
from ray.train import RunConfig, ScalingConfig  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402

IGNORE = -100


def train_func(config: dict) -> None:
    phases = {"worker_start": time.time()}
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback,
                              TrainingArguments)

    phases["worker_imports"] = time.time()
    tokenizer = AutoTokenizer.from_pretrained(config["base"])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(config["base"], dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=config["rank"], lora_alpha=config["alpha"],
                                             lora_dropout=config["dropout"], target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    phases["model_built"] = time.time()

    def tokenize(path: str) -> list[dict]:
        rows = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                record = json.loads(line)
                prompt = tokenizer(record["prompt"])["input_ids"]
                completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
                ids = (prompt + completion + [tokenizer.eos_token_id])[: config["max_length"]]
                labels = ([IGNORE] * len(prompt) + completion + [tokenizer.eos_token_id])[: config["max_length"]]
                if any(t != IGNORE for t in labels[1:]):
                    rows.append({"input_ids": ids, "labels": labels})
        return rows

    def collate(rows: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in rows)
        pad = lambda seq, fill: seq + [fill] * (width - len(seq))  # noqa: E731
        return {"input_ids": torch.tensor([pad(r["input_ids"], tokenizer.pad_token_id) for r in rows]),
                "labels": torch.tensor([pad(r["labels"], IGNORE) for r in rows]),
                "attention_mask": torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in rows])}

    train_rows, eval_rows = tokenize(config["train"]), tokenize(config["eval"])
    phases["data_ready"] = time.time()

    step_times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.perf_counter() - self.began)

    args = TrainingArguments(
        output_dir=config["out"] + "/hf", per_device_train_batch_size=config["micro"],
        per_device_eval_batch_size=config["micro"], gradient_accumulation_steps=config["accumulation"],
        max_steps=config["steps"], learning_rate=config["lr"], warmup_steps=config["warmup"],
        lr_scheduler_type="cosine", max_grad_norm=1.0, weight_decay=0.0, logging_steps=10,
        eval_strategy="steps", eval_steps=config["every"], save_strategy="steps", save_steps=config["every"],
        save_total_limit=2, report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=0,
        use_cpu=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_rows, eval_dataset=eval_rows,
                      data_collator=collate, callbacks=[StepTimer()])
    trainer.add_callback(ray.train.huggingface.transformers.RayTrainReportCallback())
    trainer = ray.train.huggingface.transformers.prepare_trainer(trainer)
    phases["trainer_built"] = time.time()
    trainer.train()
    phases["trained"] = time.time()
    if ray.train.get_context().get_world_rank() == 0:
        trainer.save_model(config["out"] + "/final")
        phases["saved"] = time.time()
        with open(config["out"] + "/recipe_timing.json", "w") as f:
            json.dump({"phases": phases, "step_times": step_times, "log": trainer.state.log_history}, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--address", default=None)
    parser.add_argument("--train", default="data/demo/train.jsonl")
    parser.add_argument("--eval", default="data/demo/eval.jsonl")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    ray.init(address=args.address)
    driver_ready = time.time()
    config = {"base": os.path.abspath(args.base), "out": os.path.abspath(args.out),
              "train": os.path.abspath(args.train), "eval": os.path.abspath(args.eval),
              "rank": 8, "alpha": 16, "dropout": 0.05, "max_length": 64, "micro": 4,
              "accumulation": 16 // (4 * args.workers), "steps": args.steps, "lr": 3e-3, "warmup": 10, "every": 30}
    trainer = TorchTrainer(train_func, train_loop_config=config,
                           scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=False),
                           run_config=RunConfig(name="hf-recipe", storage_path=config["out"] + "/ray"))
    trainer.fit()
    timing_path = os.path.join(args.out, "recipe_timing.json")
    timing = json.load(open(timing_path))
    timing["phases"].update(process_start=STARTED, driver_ready=driver_ready, fit_done=time.time())
    json.dump(timing, open(timing_path, "w"))


if __name__ == "__main__":
    main()
